"""The inference table: writer (bounded queue, one writer, loss bound), options and schema
migrations; feedback, reading, maintenance, importers and commands are in tests/test_table_data.py.

Every test taking ``url`` runs on a SQLite file in tmp_path and on PostgreSQL: the session's own
server (tests/pg_server.py starts one, installing the Debian package when missing), or the database
``TAO_TEST_POSTGRES_URL`` names; emptied before and after each test. When no server can be had those
runs are skipped with the reason, and fail under ``CI=true``.
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
from pathlib import Path

import pytest
import sqlalchemy as sa

from tao_core.errors import TaoInputError
from tao_core.table import InferenceTable, UnknownRequestError
from tao_core.table_rows import sampled
from tao_core.table_schema import SCHEMA_VERSION, create_engine, migrate, resolve_url
from tests.table_support import REPO, T0, chat, count

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
