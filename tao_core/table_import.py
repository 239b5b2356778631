"""Importing exchanges into the inference table from other logs, through the project's one reader.

Both importers read with :func:`tao_core.records.read_records` (JSONL, CSV/TSV, Parquet; its limits
and bad-row policy): ``on_error="raise"`` stops at the first bad row with ``FILE:LINE: reason``,
``"skip"`` leaves bad rows out and lists them in :attr:`ImportReport.skipped`. Rows are committed
in chunks of :data:`CHUNK_ROWS`, and importing is idempotent (a row whose request_id is already in
the table is counted in ``already_present``, not written again): after a stop at a bad row, fix it
and import the file again.

- OpenAI chat log (``--format openai-chat``): one ``{"messages": [...]}`` conversation per row, as
  in OpenAI's chat fine-tuning files (``messages`` may be a JSON string in a CSV cell). A final
  ``assistant`` message is the response (a ``chat.completion`` object with one choice, status 200);
  the messages before it, with the row's other fields (``model``, ``tools``...), are the request.
  ``id`` becomes the request_id (else ``chatlog-`` and a hash of the row, so equal rows are one
  exchange); ``model`` the served_model; ``request_time`` (ISO 8601) the time, else the import's.
- Databricks AI Gateway inference-table export (``--format gateway``): the columns
  ``databricks_request_id`` (required), ``client_request_id``, ``request_time`` (ISO 8601 text),
  ``status_code``, ``execution_duration_ms``, ``sampling_fraction``, ``request`` and ``response``
  (JSON text or objects), ``served_entity_id`` (-> served_model) and ``requester``; other columns
  (``request_date``, ``logging_error_codes``) are ignored. A Parquet export must hold its timestamps
  as text (``CAST(request_time AS STRING)``): the reader does not take Parquet timestamp values.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from tao_core.errors import TaoInputError
from tao_core.records import loads, read_records
from tao_core.table_rows import BodyPolicy, RejectedRecord, encode_record
from tao_core.table_schema import exchanges, writing

CHUNK_ROWS = 500  # rows per committed transaction and per IN list (under SQLite's oldest parameter limit, 999)
FORMATS = ("openai-chat", "gateway")


@dataclass
class ImportReport:
    path: str
    imported: int = 0  # rows written
    already_present: int = 0  # rows whose request_id the table already held
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason) of bad rows under on_error="skip"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "imported": self.imported, "already_present": self.already_present,
                "skipped": [{"line": line, "reason": why} for line, why in self.skipped]}


def _json_value(row: dict[str, Any], key: str) -> Any:
    value = row.get(key)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            return loads(value)
        except TaoInputError as e:
            raise TaoInputError(f"{key!r} is not JSON text: {e}") from None
    return value


def _optional(row: dict[str, Any], key: str) -> Any:
    """``row[key]`` with an empty CSV cell as None."""
    value = row.get(key)
    return None if value == "" else value


def _number(row: dict[str, Any], key: str, kind: type) -> Any:
    value = _optional(row, key)
    if isinstance(value, str):
        try:
            value = kind(value)
        except ValueError:
            raise TaoInputError(f"{key!r} must be {'an integer' if kind is int else 'a number'}, got {value!r:.40}") from None
    return value


def _time(row: dict[str, Any], key: str) -> datetime | None:
    value = _optional(row, key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise TaoInputError(f"{key!r} must be an ISO 8601 time, got {type(value).__name__}")
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise TaoInputError(f"{key!r} is not an ISO 8601 time: {value!r:.40}") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def chat_log_record(row: dict[str, Any], tag: str | None) -> dict[str, Any]:
    """One chat-log row as an exchange record (see the module docstring)."""
    messages = _json_value(row, "messages")
    if not isinstance(messages, list) or not messages:
        raise TaoInputError("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TaoInputError(f"messages[{i}] needs a string 'role' and a 'content'")
    response = None
    if messages[-1]["role"] == "assistant":
        response = {"object": "chat.completion",
                    "choices": [{"index": 0, "message": messages[-1], "finish_reason": "stop"}]}
        messages = messages[:-1]
    if not any(m["role"] == "user" for m in messages):
        raise TaoInputError("the conversation has no user message before its final answer")
    request_id = _optional(row, "id")
    if request_id is None:
        canonical = json.dumps(row, sort_keys=True, ensure_ascii=False)
        request_id = "chatlog-" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    elif not isinstance(request_id, str | int) or isinstance(request_id, bool):
        raise TaoInputError(f"'id' must be a string, got {type(request_id).__name__}")
    model = _optional(row, "model")
    request = {k: v for k, v in row.items() if k not in ("id", "request_time")}
    request["messages"] = messages
    return {"request_id": str(request_id), "request_time": _time(row, "request_time"), "request_json": request,
            "response_json": response, "status_code": 200 if response is not None else None,
            "served_model": model if isinstance(model, str) else None, "tag": tag}


def gateway_record(row: dict[str, Any], tag: str | None) -> dict[str, Any]:
    """One AI Gateway inference-table row as an exchange record (see the module docstring)."""
    request_id = _optional(row, "databricks_request_id")
    if not isinstance(request_id, str) or not request_id.strip():
        raise TaoInputError("'databricks_request_id' is missing or empty")
    request_time = _time(row, "request_time")
    if request_time is None:
        raise TaoInputError("'request_time' is missing")
    return {"request_id": request_id, "client_request_id": _optional(row, "client_request_id"),
            "request_time": request_time, "status_code": _number(row, "status_code", int),
            "execution_ms": _number(row, "execution_duration_ms", float),
            "sampling_fraction": _number(row, "sampling_fraction", float),
            "request_json": _json_value(row, "request"), "response_json": _json_value(row, "response"),
            "served_model": _optional(row, "served_entity_id"), "requester": _optional(row, "requester"), "tag": tag}


def _insert_new(engine: sa.Engine, rows: list[dict[str, Any]], report: ImportReport) -> None:
    """Write the rows whose request_id is not in the table yet, in one transaction."""
    with writing(engine) as conn:
        ids = [r["request_id"] for r in rows]
        present = set(conn.execute(sa.select(exchanges.c.request_id)
                                   .where(exchanges.c.request_id.in_(ids))).scalars())
        fresh = {r["request_id"]: r for r in rows if r["request_id"] not in present}
        if fresh:
            conn.execute(sa.insert(exchanges), list(fresh.values()))
    report.imported += len(fresh)
    report.already_present += len(rows) - len(fresh)


def _import(engine: sa.Engine, policy: BodyPolicy, path: str | os.PathLike, on_error: str,
            to_record: Callable[[dict[str, Any]], dict[str, Any]]) -> ImportReport:
    records = read_records(path, on_error=on_error)  # type: ignore[arg-type]
    report = ImportReport(str(path))
    started = time.time()
    chunk: list[dict[str, Any]] = []
    try:
        for line, raw in records:
            try:
                chunk.append(encode_record(to_record(raw), started, policy, 1.0))
            except (TaoInputError, RejectedRecord) as e:
                records.reject(line, str(e))
            if len(chunk) >= CHUNK_ROWS:
                _insert_new(engine, chunk, report)
                chunk = []
        if chunk:
            _insert_new(engine, chunk, report)
    except TaoInputError as e:
        if report.imported:
            raise TaoInputError(f"{e}\n({report.imported} row(s) before it were imported; fix the row and import "
                                "the file again: rows already in the table are skipped)") from None
        raise
    report.skipped = records.skipped
    return report


def import_openai_chat_log(engine: sa.Engine, policy: BodyPolicy, path: str | os.PathLike, *,
                           tag: str | None = None, on_error: str = "raise") -> ImportReport:
    """Import an OpenAI-format chat log (see the module docstring)."""
    return _import(engine, policy, path, on_error, lambda row: chat_log_record(row, tag))


def import_gateway_export(engine: sa.Engine, policy: BodyPolicy, path: str | os.PathLike, *,
                          tag: str | None = None, on_error: str = "raise") -> ImportReport:
    """Import a Databricks AI Gateway inference-table export (see the module docstring)."""
    return _import(engine, policy, path, on_error, lambda row: gateway_record(row, tag))
