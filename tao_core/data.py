"""Loading user prompts from JSONL, CSV or Parquet.

A row becomes a :class:`~tao_core.types.Prompt` from a chat ``messages`` column or a text column
(``column``, or the first of ``prompt``, ``text``, ``question``, ``input``). The file is read by
:func:`tao_core.records.read_records` (formats, size limits and the bad-row policy are documented
there); on top of it a row is bad when it has no prompt, when ``messages`` is not a non-empty list
of ``{"role": "system" | "user" | "assistant", "content": str}`` objects, when the prompt is empty
or longer than ``max_chars`` characters, or when its ``id`` repeats an earlier row's. Bad rows are
reported with their line (row) number; ``on_error="raise"`` stops at the first, ``"skip"`` collects
them in ``LoadReport.skipped`` so nothing is ever dropped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tao_core.errors import TaoInputError
from tao_core.records import OnError, loads, read_records
from tao_core.types import Prompt

TEXT_COLUMNS = ("prompt", "text", "question", "input")


@dataclass
class LoadReport:
    prompts: list[Prompt] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def _names(row: dict[str, Any]) -> str:
    names = sorted(row)
    return f"{names[:20]}" + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def _json_field(row: dict[str, Any], key: str) -> Any:
    """``row[key]``, parsed when it is a string (a CSV cell holding JSON)."""
    value = row[key]
    if isinstance(value, str):
        try:
            return loads(value)
        except TaoInputError as e:
            raise TaoInputError(f"{key!r} is a string but not JSON: {e}") from None
    return value


def _row_to_prompt(row: dict[str, Any], column: str | None, default_id: str, task: str | None) -> Prompt:
    pid = row.get("id", default_id)
    if isinstance(pid, bool) or not isinstance(pid, str | int):
        raise TaoInputError(f"'id' must be a string or an integer, got {type(pid).__name__}")
    row_task = row.get("task", task)
    if row_task is not None and not isinstance(row_task, str):
        raise TaoInputError(f"'task' must be a task name, got {type(row_task).__name__}")
    meta = _json_field(row, "metadata") if "metadata" in row else {}
    if not isinstance(meta, dict):
        raise TaoInputError(f"'metadata' must be an object, got {type(meta).__name__}")
    if column is None and "messages" in row:
        return Prompt(id=pid, messages=_json_field(row, "messages"), task=row_task, metadata=meta)
    if column is not None:
        if column not in row:
            raise TaoInputError(f"missing column {column!r} (columns: {_names(row)})")
        col = column
    else:
        col = next((c for c in TEXT_COLUMNS if c in row), None)
        if col is None:
            raise TaoInputError(f"no prompt column: expected 'messages' or one of {list(TEXT_COLUMNS)}, "
                                f"got {_names(row)}")
    text = row[col]
    if not isinstance(text, str):
        raise TaoInputError(f"column {col!r} must hold text, got {type(text).__name__}")
    extra = {k: v for k, v in row.items() if k not in (col, "id", "task", "metadata")}
    return Prompt(id=pid, text=text, task=row_task, metadata={**extra, **meta})


def load_prompts_report(
    path: str | os.PathLike,
    *,
    column: str | None = None,
    task: str | None = None,
    on_error: OnError = "raise",
    max_chars: int | None = 100_000,
) -> LoadReport:
    """Load prompts and report every bad row with its line number."""
    path = Path(path)
    records = read_records(path, on_error=on_error)
    report = LoadReport(skipped=records.skipped)
    seen: set[str] = set()
    for lineno, row in records:
        try:
            p = _row_to_prompt(row, column, f"{path.stem}-{lineno}", task)
            size = sum(len(m["content"]) for m in p.as_messages())
            if max_chars is not None and size > max_chars:
                raise TaoInputError(f"prompt has {size} characters, more than the limit of {max_chars}")
            if p.id in seen:
                raise TaoInputError(f"duplicate prompt id {p.id!r}")
        except TaoInputError as e:
            records.reject(lineno, str(e))
            continue
        seen.add(p.id)
        report.prompts.append(p)
    if not report.prompts:
        if not report.skipped:
            raise TaoInputError(f"{path}: the file holds no rows")
        raise TaoInputError(f"{path}: no usable prompts ({len(report.skipped)} bad rows, the first at line "
                            f"{min(report.skipped)[0]}: {min(report.skipped)[1]})")
    return report


def load_prompts(path: str | os.PathLike, **kw: Any) -> list[Prompt]:
    """Load prompts; see :func:`load_prompts_report` for the options."""
    return load_prompts_report(path, **kw).prompts
