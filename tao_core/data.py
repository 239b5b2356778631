"""Loading user prompts from JSONL, CSV or Parquet.

A row becomes a :class:`~tao_core.types.Prompt` from a chat ``messages`` column or a text column
(``column``, or the first of ``prompt``, ``text``, ``question``, ``input``). Bad rows are reported
with their line (row) number; ``on_error="raise"`` stops at the first, ``"skip"`` collects them in
``LoadReport.skipped`` so nothing is ever dropped silently.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tao_core.errors import TaoInputError
from tao_core.types import Prompt

TEXT_COLUMNS = ("prompt", "text", "question", "input")


@dataclass
class LoadReport:
    prompts: list[Prompt] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def _rows(path: Path) -> list[tuple[int, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((lineno, json.loads(line)))
                except json.JSONDecodeError as e:
                    rows.append((lineno, TaoInputError(f"invalid JSON ({e.msg} at column {e.colno})")))
        return rows
    if suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
            # line 1 is the header
            return [(i + 2, row) for i, row in enumerate(reader)]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TaoInputError(f"{path}: reading Parquet needs pyarrow: pip install 'tao-core[parquet]'") from None
        table = pq.read_table(path)
        return [(i + 1, row) for i, row in enumerate(table.to_pylist())]
    raise TaoInputError(f"{path}: unsupported prompt file type {suffix!r}; use .jsonl, .csv, .tsv or .parquet")


def _row_to_prompt(row: Any, column: str | None, default_id: str, task: str | None) -> Prompt:
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise TaoInputError(f"expected an object, got {type(row).__name__}")
    pid = str(row.get("id", default_id))
    meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
    if column is None and "messages" in row:
        messages = row["messages"]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError:
                raise TaoInputError("'messages' is a string but not JSON") from None
        return Prompt(id=pid, messages=messages, task=row.get("task", task), metadata=meta)
    if column is not None:
        if column not in row:
            raise TaoInputError(f"missing column {column!r} (columns: {sorted(row)})")
        col = column
    else:
        col = next((c for c in TEXT_COLUMNS if c in row), None)
        if col is None:
            raise TaoInputError(f"no prompt column: expected 'messages' or one of {list(TEXT_COLUMNS)}, got {sorted(row)}")
    text = row[col]
    if not isinstance(text, str):
        raise TaoInputError(f"column {col!r} must hold text, got {type(text).__name__}")
    extra = {k: v for k, v in row.items() if k not in (col, "id", "task", "metadata")}
    return Prompt(id=pid, text=text, task=row.get("task", task), metadata={**extra, **meta})


def load_prompts_report(
    path: str | os.PathLike,
    *,
    column: str | None = None,
    task: str | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    max_chars: int | None = 100_000,
) -> LoadReport:
    """Load prompts and report every bad row with its line number."""
    path = Path(path)
    if not path.is_file():
        raise TaoInputError(f"{path}: prompt file not found")
    if on_error not in ("raise", "skip"):
        raise TaoInputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = LoadReport()
    seen: set[str] = set()
    for lineno, row in _rows(path):
        try:
            p = _row_to_prompt(row, column, f"{path.stem}-{lineno}", task)
            size = sum(len(m["content"]) for m in p.as_messages())
            if max_chars is not None and size > max_chars:
                raise TaoInputError(f"prompt has {size} characters, more than the limit of {max_chars}")
            if p.id in seen:
                raise TaoInputError(f"duplicate prompt id {p.id!r}")
            seen.add(p.id)
            report.prompts.append(p)
        except TaoInputError as e:
            if on_error == "raise":
                raise TaoInputError(f"{path}:{lineno}: {e}") from None
            report.skipped.append((lineno, str(e)))
    if not report.prompts:
        raise TaoInputError(f"{path}: no usable prompts" + (f" ({len(report.skipped)} bad rows)" if report.skipped else ""))
    return report


def load_prompts(path: str | os.PathLike, **kw: Any) -> list[Prompt]:
    """Load prompts; see :func:`load_prompts_report` for the options."""
    return load_prompts_report(path, **kw).prompts
