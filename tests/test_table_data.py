"""The inference table's data: feedback, reading prompts and preference pairs, maintenance, importers
and the ``tao table`` commands (the writer and migrations: tests/test_table.py).

Every test taking ``url`` runs on a SQLite file in tmp_path and on PostgreSQL: the session's own
server (tests/pg_server.py starts one, installing the Debian package when missing), or the database
``TAO_TEST_POSTGRES_URL`` names; emptied before and after each test. When no server can be had those
runs are skipped with the reason, and fail under ``CI=true``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from tao_core.errors import TaoInputError
from tao_core.table import InferenceTable, UnknownRequestError, preference_pairs, read_prompts
from tao_core.table_cli import table_group
from tao_core.table_schema import SCHEMA_VERSION
from tests.table_support import T0, _write_jsonl, chat

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
