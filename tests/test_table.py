"""The inference table: writer (bounded queue, one writer, loss bound), schema migrations, feedback,
reading prompts and preference pairs, maintenance, importers and the ``tao table`` commands.

Every test taking ``url`` runs on a SQLite file in tmp_path and, when ``TAO_TEST_POSTGRES_URL`` names
a PostgreSQL database (``postgresql+psycopg://user@host:port/db``, emptied before and after each
test), on PostgreSQL too; without it those runs are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from tao_core.errors import TaoInputError
from tao_core.table import InferenceTable, UnknownRequestError, preference_pairs, read_prompts
from tao_core.table_cli import table_group
from tao_core.table_rows import sampled
from tao_core.table_schema import SCHEMA_VERSION, create_engine, metadata, migrate, resolve_url

REPO = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("TAO_TEST_POSTGRES_URL")
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _empty_database(url: str) -> None:
    engine = sa.create_engine(url)
    metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield str(tmp_path / "inference.db")
        return
    if not PG_URL:
        pytest.skip("TAO_TEST_POSTGRES_URL is not set; set it to an empty PostgreSQL database "
                    "(postgresql+psycopg://user@host:port/db) to run this test on PostgreSQL")
    _empty_database(PG_URL)
    yield PG_URL
    _empty_database(PG_URL)


@pytest.fixture
def tables():
    """Open tables through this fixture; each is closed after the test."""
    opened: list[InferenceTable] = []

    def open_table(url, **options) -> InferenceTable:
        opened.append(InferenceTable.open(url, **options))
        return opened[-1]

    yield open_table
    for t in opened:
        t.close(timeout=10)


def chat(i: int, text: str | None = None, answers: tuple[str, ...] = ("a", "b"), **extra) -> dict:
    """A logged chat exchange with one choice per answer."""
    return {
        "request_id": f"r{i:05d}",
        "request_json": {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                                      {"role": "user", "content": text or f"question {i}"}]},
        "response_json": {"object": "chat.completion", "choices": [
            {"index": k, "message": {"role": "assistant", "content": a}, "finish_reason": "stop"}
            for k, a in enumerate(answers)]},
        "status_code": 200,
        "prompt_token_ids": [1, 2, i],
        "completion_token_ids": [[3, k] for k in range(len(answers))],
        "completion_logprobs": [[-0.5, -0.25 * k] for k in range(len(answers))],
        **extra,
    }


def count(url) -> int:
    with InferenceTable.open(url) as t:
        return t.summary()["exchanges"]


# -- writing -----------------------------------------------------------------------------------------


def test_a_logged_exchange_reads_back_field_for_field(url, tables):
    t = tables(url)
    record = chat(1, client_request_id="c-1", request_time=T0, execution_ms=12.5, served_model="tiny",
                  model_version="r3", requester="key-1", tag="arm-a", policy_version="r3")
    t.log(record)
    assert t.flush(timeout=30)
    row = t.get("r00001")
    expected = {**record, "sampling_fraction": 1.0}
    assert row == expected
    assert row["request_time"].tzinfo is not None
    assert t.stats()["written"] == 1 and t.get("missing") is None


def test_default_table_is_a_wal_sqlite_file_under_tao_home(tmp_path, monkeypatch, tables):
    from tao_core.models import tao_home

    monkeypatch.setenv("TAO_HOME", str(tmp_path / "home"))
    assert resolve_url(None) == f"sqlite:///{tao_home() / 'inference.db'}"
    t = tables(None)
    t.log(chat(1))
    assert t.flush(timeout=30)
    db = sqlite3.connect(tmp_path / "home" / "inference.db")
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("SELECT count(*) FROM exchanges").fetchone() == (1,)
    with t.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL


def test_bad_urls_and_options_are_clear_errors(tmp_path):
    with pytest.raises(TaoInputError, match="in-memory"):
        InferenceTable.open("sqlite://")
    with pytest.raises(TaoInputError, match="not a database URL"):
        InferenceTable.open("::nonsense::://x")
    with pytest.raises(TaoInputError, match="sample_fraction"):
        InferenceTable.open(tmp_path / "x.db", sample_fraction=1.5)


def test_table_module_imports_without_fastapi():
    code = "import sys; sys.modules['fastapi'] = None; import tao_core.table, tao_core.table_cli; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_full_queue_drops_records_and_log_never_blocks(url, tables):
    t = tables(url, maxsize=10, batch_size=5, flush_interval=3600)
    gate, stalled = threading.Event(), threading.Event()

    @sa.event.listens_for(t.engine, "before_cursor_execute")
    def hold_the_writer(conn, cursor, statement, *args):
        if statement.lstrip().upper().startswith("INSERT INTO EXCHANGES"):
            stalled.set()
            gate.wait()

    for i in range(5):
        t.log(chat(i))
    assert stalled.wait(30), "the writer never took its batch"
    flood = threading.Thread(target=lambda: [t.log(chat(i)) for i in range(5, 105)])
    flood.start()
    flood.join(60)
    assert not flood.is_alive(), "log() blocked while the writer was stalled"
    stats = t.stats()
    assert (stats["queued"], stats["dropped"], stats["written"], stats["logged"]) == (10, 90, 0, 15)
    gate.set()
    assert t.close(timeout=30)
    assert t.stats()["written"] == 15
    assert count(url) == 15


CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import sqlalchemy as sa
    from tao_core.table import InferenceTable

    url, maxsize, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    table = InferenceTable.open(url, maxsize=maxsize, batch_size=batch, flush_interval=3600)
    armed, stalled = threading.Event(), threading.Event()

    @sa.event.listens_for(table.engine, "commit")
    def hold_before_commit(conn):  # the batch is inserted, its transaction not yet committed
        if armed.is_set():
            stalled.set()
            time.sleep(600)

    def record(i):
        return {"request_id": f"r{i:05d}", "request_json": {"i": i, "text": "x" * i},
                "completion_token_ids": [[i] * 7], "completion_logprobs": [[-0.5] * 7]}

    for i in range(3 * batch):
        table.log(record(i))
    while table.stats()["written"] < 3 * batch:
        time.sleep(0.01)
    armed.set()
    for i in range(3 * batch, 4 * batch):
        table.log(record(i))
    stalled.wait(60)
    for i in range(4 * batch, 4 * batch + 3 * maxsize):
        table.log(record(i))
    print(json.dumps(table.stats()), flush=True)
    time.sleep(600)
""")


def test_sigkill_loses_at_most_the_queue_plus_the_batch_in_flight(url, tmp_path):
    """Killed while a batch is written but not committed and the queue is full: every committed row
    is whole, the uncommitted batch is absent, and the loss is at most maxsize + batch_size."""
    maxsize, batch = 40, 10
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), url, str(maxsize), str(batch)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(120, child.kill)
    watchdog.start()
    try:
        line = child.stdout.readline()
        assert line, child.stderr.read()
        stats = json.loads(line)
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        watchdog.cancel()
        child.kill()
    assert stats["written"] == 3 * batch and stats["queued"] == maxsize
    lost = stats["logged"] - stats["written"]
    assert 0 < lost <= maxsize + batch
    if not url.startswith("postgresql"):
        assert sqlite3.connect(url).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with InferenceTable.open(url) as t:
        assert t.summary()["exchanges"] == stats["written"]
        for i in range(3 * batch):
            row = t.get(f"r{i:05d}")
            assert row["request_json"] == {"i": i, "text": "x" * i}
            assert row["completion_token_ids"] == [[i] * 7] and row["completion_logprobs"] == [[-0.5] * 7]
        assert t.get(f"r{3 * batch:05d}") is None  # the batch in flight was never committed


def test_close_writes_everything_queued(url, tables):
    t = tables(url, batch_size=1000, flush_interval=3600)
    for i in range(300):
        t.log(chat(i))
    assert t.stats()["written"] == 0
    assert t.close(timeout=60)
    assert t.stats()["written"] == 300 and count(url) == 300
    t.log(chat(999))
    assert t.stats()["dropped"] == 1 and "after close" in t.stats()["last_error"]


def test_a_partial_batch_is_committed_after_flush_interval(url, tables):
    t = tables(url, batch_size=1000, flush_interval=0.05)
    for i in range(3):
        t.log(chat(i))
    deadline = time.monotonic() + 60
    while t.stats()["written"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert t.stats()["written"] == 3 and t.stats()["batches"] >= 1


def test_eight_threads_logging_write_every_row_exactly_once(url, tables):
    t = tables(url, batch_size=64, flush_interval=0.01)
    per_thread = 250

    def worker(k: int) -> None:
        for i in range(per_thread):
            t.log(chat(k * per_thread + i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.close(timeout=60)
    assert t.stats()["written"] == 8 * per_thread and t.stats()["dropped"] == 0
    engine = create_engine(resolve_url(url))
    with engine.connect() as conn:
        ids = conn.exec_driver_sql("SELECT request_id FROM exchanges").scalars().all()
    engine.dispose()
    assert sorted(ids) == [f"r{i:05d}" for i in range(8 * per_thread)]


def test_malformed_records_are_counted_with_reasons_never_raised(url, tables):
    t = tables(url)
    bad = [
        {"request_json": {}},
        "not a dict",
        {"request_id": "r-unknown", "colour": "red"},
        {"request_id": "r-set", "request_json": {"x": {1, 2}}},
        {"request_id": "r-nan", "completion_token_ids": [[1]], "completion_logprobs": [[float("nan")]]},
        {"request_id": "r-shape", "completion_token_ids": [[1, 2]], "completion_logprobs": [[-1.0]]},
        {"request_id": "r-flat", "completion_token_ids": [1, 2]},
        {"request_id": "r-time", "request_time": "yesterday"},
        {"request_id": "r-status", "status_code": "200"},
        {"request_id": "r-surrogate", "response_json": {"text": "\ud800"}},
    ]
    for record in bad:
        t.log(record)
    t.log(chat(1))
    t.log(chat(1))  # the same request id twice in one batch
    assert t.flush(timeout=30)
    t.log(chat(1))  # and again, already in the table
    assert t.close(timeout=30)
    stats = t.stats()
    assert stats["written"] == 1 and stats["rejected"] == len(bad) + 2
    reasons = " | ".join(stats["rejected_reasons"])
    for needle in ("missing request_id", "unknown field(s) ['colour']", "'request_json' is not JSON-able",
                   "NaN", "one log-prob per token", "one list per choice", "'request_time' must be a datetime",
                   "'status_code' must be an integer", "surrogate", "logged twice", "already in the table"):
        assert needle in reasons


def test_bodies_can_be_left_out_keeping_the_token_columns(url, tables):
    t = tables(url, store_bodies=False)
    t.log(chat(1))
    assert t.flush(timeout=30)
    row = t.get("r00001")
    assert row["request_json"] is None and row["response_json"] is None
    assert row["prompt_token_ids"] == [1, 2, 1] and row["completion_token_ids"] == [[3, 0], [3, 1]]
    assert t.prompts().skipped == [("r00001", "the request body was not stored (store_bodies=False)")]


def test_a_body_over_the_cap_becomes_a_valid_json_marker(url, tables):
    t = tables(url, max_body_bytes=100)
    small = {"messages": [{"role": "user", "content": "ü" * 20}]}  # 40 bytes of text, 79 of JSON
    big = {"messages": [{"role": "user", "content": "ü" * 40}]}  # 80 bytes of text: over the cap
    t.log({"request_id": "small", "request_json": small})
    t.log({"request_id": "big", "request_json": big, "response_json": {"text": "ok"}})
    assert t.flush(timeout=30)
    assert t.get("small")["request_json"] == small
    size = len(json.dumps(big, ensure_ascii=False, separators=(",", ":")).encode())
    assert t.get("big")["request_json"] == {"truncated": True, "bytes": size}
    assert t.get("big")["response_json"] == {"text": "ok"}
    assert ("big", "the request body was truncated (max_body_bytes)") in t.prompts().skipped


def test_sampling_is_a_stable_fraction_by_request_id(url, tables):
    ids = [f"req-{i}" for i in range(2000)]
    kept = {i for i in ids if sampled(i, 0.3)}
    assert 0.25 < len(kept) / len(ids) < 0.35
    code = ("import sys; from tao_core.table_rows import sampled; "
            "print(sum(sampled(f'req-{i}', 0.3) for i in range(2000)))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == str(len(kept)), other.stderr
    assert {i for i in ids if sampled(i, 0.5)} >= kept  # a larger fraction keeps every id a smaller one kept
    t = tables(url, sample_fraction=0.3)
    for i in ids[:200]:
        t.log({"request_id": i})
    assert t.close(timeout=30)
    assert t.stats()["sampled_out"] == 200 - len(kept & set(ids[:200]))
    with InferenceTable.open(url) as again:
        assert {i for i in ids[:200] if again.get(i)} == kept & set(ids[:200])
        assert again.get(sorted(kept)[0])["sampling_fraction"] == 0.3
        unlogged = next(i for i in ids if i not in kept)
    with InferenceTable.open(url, sample_fraction=0.3) as sampling, \
            pytest.raises(UnknownRequestError, match="sample_fraction is 0.3"):
        sampling.log_feedback(unlogged, rating=1)


# -- schema versions ---------------------------------------------------------------------------------

V1_DDL = """
CREATE TABLE exchanges (
    request_id VARCHAR(128) NOT NULL, client_request_id VARCHAR(256), request_time DATETIME NOT NULL,
    status_code INTEGER, execution_ms FLOAT, request_json TEXT, response_json TEXT, served_model VARCHAR(256),
    model_version VARCHAR(256), requester VARCHAR(256), tag VARCHAR(256), prompt_token_ids TEXT,
    completion_token_ids TEXT, completion_logprobs TEXT, policy_version VARCHAR(256), PRIMARY KEY (request_id));
CREATE INDEX ix_exchanges_request_time ON exchanges (request_time);
CREATE TABLE feedback (
    id INTEGER NOT NULL, request_id VARCHAR(128) NOT NULL, time DATETIME NOT NULL, rating FLOAT,
    preferred_choice INTEGER, comment TEXT, source VARCHAR(256), PRIMARY KEY (id),
    CONSTRAINT feedback_has_a_value CHECK (rating IS NOT NULL OR preferred_choice IS NOT NULL),
    FOREIGN KEY(request_id) REFERENCES exchanges (request_id));
CREATE INDEX ix_feedback_request_id ON feedback (request_id);
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version VALUES (1);
INSERT INTO exchanges (request_id, request_time, status_code, request_json, completion_token_ids)
    VALUES ('old-1', '2025-01-02 03:04:05.000000', 200, '{"prompt":"two plus two"}', '[[5,6]]');
INSERT INTO exchanges (request_id, request_time, status_code, request_json)
    VALUES ('old-2', '2025-01-03 03:04:05.000000', 200, '{"prompt":"three"}');
INSERT INTO feedback (request_id, time, rating) VALUES ('old-1', '2025-01-02 04:00:00.000000', 1.0);
"""


def _sqlite_layout(path: Path) -> dict:
    db = sqlite3.connect(path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    layout = {name: (db.execute(f"PRAGMA table_info({name})").fetchall(),
                     sorted(r[1:3] for r in db.execute(f"PRAGMA index_list({name})")),
                     db.execute(f"PRAGMA foreign_key_list({name})").fetchall()) for name in tables}
    db.close()
    return layout


def test_the_v1_migration_still_creates_the_frozen_v1_schema(tmp_path):
    frozen = sqlite3.connect(tmp_path / "frozen.db")
    frozen.executescript(V1_DDL.split("INSERT")[0])
    frozen.close()
    engine = create_engine(resolve_url(tmp_path / "made.db"))
    assert migrate(engine, target=1) == 1
    engine.dispose()
    assert _sqlite_layout(tmp_path / "made.db") == _sqlite_layout(tmp_path / "frozen.db")


def test_a_v1_database_file_is_migrated_keeping_its_rows(tmp_path):
    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(V1_DDL)
    db.close()
    with InferenceTable.open(path) as t:
        assert t.summary()["schema_version"] == SCHEMA_VERSION == 2
        old = t.get("old-1")
        assert old["request_json"] == {"prompt": "two plus two"} and old["completion_token_ids"] == [[5, 6]]
        assert old["request_time"] == T0 and old["sampling_fraction"] == 1.0
        assert t.feedback_for("old-1")[0]["rating"] == 1.0
        assert [p.text for p in t.prompts().prompts] == ["two plus two", "three"]
        t.log({"request_id": "new", "request_json": {"prompt": "four"}})
    with InferenceTable.open(path) as t:  # reopening a current file changes nothing
        assert t.summary()["exchanges"] == 3 and t.get("new")["sampling_fraction"] == 1.0


def test_migrations_run_in_order_on_any_backend_and_newer_is_refused(url):
    engine = create_engine(resolve_url(url))
    assert migrate(engine, target=1) == 1
    columns = {c["name"] for c in sa.inspect(engine).get_columns("exchanges")}
    assert "sampling_fraction" not in columns and "policy_version" in columns
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO exchanges (request_id, request_time) VALUES ('v1-row', '2025-01-02 03:04:05')")
    with InferenceTable.open(url) as t:
        assert t.get("v1-row")["sampling_fraction"] == 1.0
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE schema_version SET version = {SCHEMA_VERSION + 1}")
    engine.dispose()
    with pytest.raises(TaoInputError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade tao"):
        InferenceTable.open(url)


# -- feedback ----------------------------------------------------------------------------------------


def test_feedback_is_validated_and_stored_beside_its_exchange(url, tables):
    t = tables(url, flush_interval=3600, batch_size=1000)
    t.log(chat(1, answers=("a", "b", "c")))
    fid = t.log_feedback("r00001", preferred_choice=2, comment="c is right", source="ui")  # flushes the queue first
    t.log_feedback("r00001", rating=-1)
    stored = t.feedback_for("r00001")
    assert [f["id"] for f in stored][0] == fid
    assert [(f["rating"], f["preferred_choice"], f["comment"], f["source"]) for f in stored] == [
        (None, 2, "c is right", "ui"), (-1.0, None, None, None)]
    bad = [({}, "a 'rating' or a 'preferred_choice'"), ({"rating": "good"}, "finite number"),
           ({"rating": float("inf")}, "finite number"), ({"rating": True}, "finite number"),
           ({"preferred_choice": -1}, "choice index"), ({"preferred_choice": 1.5}, "choice index"),
           ({"preferred_choice": 3}, "out of range: request 'r00001' has 3 choice"),
           ({"rating": 1, "comment": "x" * 20_000}, "'comment'"), ({"rating": 1, "source": 5}, "'source'")]
    for kwargs, message in bad:
        with pytest.raises(TaoInputError, match=message):
            t.log_feedback("r00001", **kwargs)
    with pytest.raises(UnknownRequestError, match="unknown request_id 'nope'"):
        t.log_feedback("nope", rating=1)
    with pytest.raises(TaoInputError, match="request_id"):
        t.log_feedback("", rating=1)
    assert len(t.feedback_for("r00001")) == 2


# -- maintenance -------------------------------------------------------------------------------------


def test_prune_and_delete_remove_exchanges_with_their_feedback(url, tables):
    t = tables(url)
    for i in range(6):
        t.log(chat(i, request_time=T0 + timedelta(days=i)))
    assert t.flush(timeout=30)
    for i in range(6):
        t.log_feedback(f"r{i:05d}", rating=1)
    assert t.prune(T0 + timedelta(days=2)) == 2
    assert t.get("r00001") is None and t.get("r00002") is not None
    assert t.delete(["r00003", "r00003", "r00004", "never-logged"]) == 2
    summary = t.summary()
    assert (summary["exchanges"], summary["feedback"]) == (2, 2)
    assert t.prune(T0 - timedelta(days=1)) == 0 and t.delete([]) == 0


# -- importers ---------------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_import_openai_chat_log_reports_a_bad_row_at_its_line(url, tables, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "model": "gpt"},
        {"id": "given-id", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}]},
        {"messages": []},
        "{not json",
    ]
    log = _write_jsonl(tmp_path / "chat.jsonl", rows)
    t = tables(url)
    with pytest.raises(TaoInputError, match=rf"{log}:3: 'messages' must be a non-empty list"):
        t.import_openai_chat_log(log)
    assert t.summary()["exchanges"] == 0  # nothing was committed before the bad row stopped the import
    report = t.import_openai_chat_log(log, on_error="skip", tag="imported")
    assert (report.imported, report.already_present) == (2, 0)
    assert [line for line, _ in report.skipped] == [3, 4]
    again = t.import_openai_chat_log(log, on_error="skip")
    assert (again.imported, again.already_present) == (0, 2)
    given = t.get("given-id")
    assert given["response_json"] is None and given["status_code"] is None
    first = next(p for p in t.prompts().prompts if p.id != "given-id")
    assert first.text == "hi" and first.id.startswith("chatlog-")
    assert t.get(first.id)["response_json"]["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert t.get(first.id)["served_model"] == "gpt" and t.get(first.id)["request_json"]["messages"] == [
        {"role": "user", "content": "hi"}]


def _gateway_rows() -> list[dict]:
    request = {"messages": [{"role": "user", "content": "What is SQL?"}]}
    response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "A query language."}}]}
    return [
        {"databricks_request_id": "db-1", "client_request_id": "", "request_time": "2025-03-01T10:00:00.000Z",
         "status_code": "200", "execution_duration_ms": "321", "sampling_fraction": "1.0",
         "request": json.dumps(request), "response": json.dumps(response), "served_entity_id": "llama-8b",
         "requester": "alice@example.com", "request_date": "2025-03-01"},
        {"databricks_request_id": "db-2", "client_request_id": "c2", "request_time": "2025-03-01 11:00:00",
         "status_code": "429", "execution_duration_ms": "", "sampling_fraction": "",
         "request": json.dumps({"prompt": "hello"}), "response": "", "served_entity_id": "llama-8b",
         "requester": "bob", "request_date": "2025-03-01"},
        {"databricks_request_id": "db-3", "client_request_id": "", "request_time": "not a time",
         "status_code": "200", "execution_duration_ms": "1", "sampling_fraction": "1",
         "request": "{}", "response": "{}", "served_entity_id": "x", "requester": "y", "request_date": ""},
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_import_gateway_export_in_each_format(url, tables, tmp_path, fmt):
    rows = _gateway_rows()
    path = tmp_path / f"export.{fmt}"
    if fmt == "jsonl":
        _write_jsonl(path, rows)
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq = pytest.importorskip("pyarrow.parquet")
        import pyarrow as pa

        pq.write_table(pa.Table.from_pylist(rows), path)
    t = tables(url)
    with pytest.raises(TaoInputError, match=rf"{path}:\d+: 'request_time' is not an ISO 8601 time"):
        t.import_gateway_export(path)
    report = t.import_gateway_export(path, on_error="skip")
    assert report.imported + report.already_present == 2 and len(report.skipped) == 1
    one = t.get("db-1")
    assert one["request_time"] == datetime(2025, 3, 1, 10, tzinfo=UTC)
    assert (one["status_code"], one["execution_ms"], one["served_model"], one["requester"]) == (
        200, 321.0, "llama-8b", "alice@example.com")
    assert one["client_request_id"] is None and one["response_json"]["choices"][0]["message"]["content"] == \
        "A query language."
    two = t.get("db-2")
    assert (two["status_code"], two["response_json"], two["execution_ms"]) == (429, None, None)
    assert [p.text for p in t.prompts().prompts] == ["What is SQL?"]  # the 429 is not a prompt for a round


# -- reading -----------------------------------------------------------------------------------------


def test_read_prompts_filters_and_orders(url, tables):
    t = tables(url)
    t.log(chat(1, request_time=T0, tag="a", served_model="m1", requester="k1"))
    t.log(chat(2, request_time=T0 + timedelta(hours=1), tag="b", served_model="m1", requester="k2"))
    t.log(chat(3, request_time=T0 + timedelta(hours=2), tag="a", served_model="m2", requester="k1"))
    t.log({"request_id": "completion", "request_time": T0 + timedelta(hours=3), "status_code": 200,
           "request_json": {"prompt": ["Once upon a time"], "max_tokens": 5}})
    t.log({"request_id": "parts", "request_time": T0 + timedelta(hours=4), "status_code": 200, "request_json": {
        "messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"},
                     {"role": "user", "content": [{"type": "text", "text": "new"}, {"type": "text", "text": "q"}]}]}})
    t.log(chat(6, request_time=T0 + timedelta(hours=5), status_code=500))
    t.log({"request_id": "no-user", "request_time": T0 + timedelta(hours=6), "request_json": {
        "messages": [{"role": "system", "content": "s"}]}})
    t.close()

    def ids(**filters):
        return [p.id for p in read_prompts(url, **filters)]

    assert ids() == ["r00001", "r00002", "r00003", "completion", "parts"]
    assert ids(tag="a") == ["r00001", "r00003"]
    assert ids(model="m1", requester="k2") == ["r00002"]
    assert ids(since=T0 + timedelta(hours=1)) == ["r00002", "r00003", "completion", "parts"]
    assert ids(limit=2) == ["r00001", "r00002"]
    with InferenceTable.open(url) as again:
        found = again.prompts()
    texts = {p.id: p.text for p in found.prompts}
    assert texts["completion"] == "Once upon a time" and texts["parts"] == "new\nq"
    assert found.skipped == [("no-user", "the chat request has no user message")]
    assert found.prompts[0].metadata == {"requester": "k1", "model": "m1", "model_version": None, "tag": "a",
                                         "time": T0.isoformat()}


def test_preference_pairs_from_feedback_load_as_reward_model_pairs(url, tables, tmp_path):
    from tao_plugins.reward_training import load_pairs

    t = tables(url)
    t.log(chat(1, answers=("bad", "good", "good")))  # preferred choice 1 over choices 0 and 2 (2 is identical)
    t.log(chat(2, text="same prompt", answers=("great",)))
    t.log(chat(3, text="same prompt", answers=("awful",)))
    t.log(chat(4, text="same prompt", answers=("meh",)))
    t.log({"request_id": "completion", "request_json": {"prompt": "Say hi"},
           "response_json": {"choices": [{"index": 0, "text": "hi"}, {"index": 1, "text": "bye"}]}})
    assert t.flush(timeout=30)
    t.log_feedback("r00001", preferred_choice=1)
    t.log_feedback("r00002", rating=1)
    t.log_feedback("r00003", rating=0)
    t.log_feedback("r00004", rating=0.5)  # at the threshold: neither chosen nor rejected
    t.log_feedback("completion", preferred_choice=0)
    pairs = preference_pairs(url)
    system_and = [{"role": "system", "content": "be brief"}]
    assert pairs == [
        {"messages": [*system_and, {"role": "user", "content": "question 1"}], "chosen": "good", "rejected": "bad"},
        {"prompt": "Say hi", "chosen": "hi", "rejected": "bye"},
        {"messages": [*system_and, {"role": "user", "content": "same prompt"}], "chosen": "great",
         "rejected": "awful"},
    ]
    assert t.preference_pairs(rating_threshold=0.7)[2]["rejected"] in ("awful", "meh")
    assert len(t.preference_pairs(rating_threshold=0.7)) == 4
    path = _write_jsonl(tmp_path / "pairs.jsonl", pairs)
    loaded, skipped = load_pairs(path)
    assert len(loaded) == 3 and skipped == []


# -- the tao table commands --------------------------------------------------------------------------


def test_tao_table_commands(url, tmp_path):
    runner = CliRunner()
    with InferenceTable.open(url) as t:
        for i in range(4):
            t.log(chat(i, request_time=T0 + timedelta(days=i), served_model="tiny", model_version="r1"))
    log = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": 5}])
    result = runner.invoke(table_group, ["import", str(log), "--format", "openai-chat", "--table", url])
    assert isinstance(result.exception, TaoInputError) and f"{log}:2:" in str(result.exception)
    result = runner.invoke(table_group, ["import", str(log), "--format", "openai-chat", "--skip-bad-rows",
                                         "--tag", "old", "--table", url])
    assert result.exit_code == 0, result.output
    assert "imported 1 exchange(s)" in result.output and "0 already present" in result.output
    assert f"skipped {log}:2:" in result.output
    result = runner.invoke(table_group, ["prune", "--before", "2025-01-04", "--table", url])
    assert result.exit_code == 0 and "deleted 2 exchange(s)" in result.output, result.output
    result = runner.invoke(table_group, ["delete", "r00002", "nope", "--table", url])
    assert "deleted 1 of 2" in result.output and "1 request id(s) were not in the table" in result.output
    result = runner.invoke(table_group, ["stats", "--json", "--table", url])
    summary = json.loads(result.output)
    assert summary["exchanges"] == 2 and summary["schema_version"] == SCHEMA_VERSION
    assert {(m["served_model"], m["exchanges"]) for m in summary["per_model"]} == {("tiny", 1), (None, 1)}
    result = runner.invoke(table_group, ["stats", "--table", url])
    assert "exchanges: 2" in result.output
    result = runner.invoke(table_group, ["prune", "--before", "last tuesday", "--table", url])
    assert isinstance(result.exception, TaoInputError) and "ISO 8601" in str(result.exception)
