"""Reading record files (JSON lines, CSV/TSV, Parquet) with one bad-row policy.

Every file tao reads row by row goes through :func:`read_records`: prompt files, preference pairs,
task data, and the run directory's ``metrics.jsonl``, ``candidates.jsonl`` and ``scores.jsonl``.
It yields ``(line, record)`` with each record a ``dict``; for Parquet ``line`` is the 1-based row
number. Every problem is a :class:`~tao_core.errors.TaoInputError` whose message starts with
``FILE:LINE:`` when a row is at fault and ``FILE:`` when the whole file is.

What the reader accepts, and its limits:

- ``.jsonl``, ``.ndjson`` and ``.json`` hold one JSON object per line (a pretty-printed ``.json``
  document is not JSON lines). Blank lines are skipped; the last line may lack a newline.
- Text is UTF-8, checked line by line so a bad byte is reported at its line and column. A UTF-8
  byte-order mark at the start is ignored; a UTF-16 or UTF-32 one is a file error.
- A physical line holds at most ``max_line_bytes`` bytes (:data:`MAX_LINE_BYTES`, 16 MiB: a
  100,000-character prompt or a candidate of tens of thousands of tokens fits) and a CSV field at
  most as many characters. Longer lines are reported, never read whole into memory.
- JSON nests at most :data:`MAX_DEPTH` levels, so no later stage (copying, writing, templating)
  recurses without bound; integers are limited to Python's 4,300 digits; an unpaired UTF-16
  surrogate escape (``"\\ud800"``) is not text and is a bad row.
- ``.csv`` / ``.tsv``: the first non-blank row is the header (names unique); every row must have
  exactly as many fields as the header. Quoting is strict: a quoted field may span lines (a row's
  line is where it starts) but must be closed, and a '"' inside it doubled. NUL characters are
  kept as text; all values are strings.
- ``.parquet`` (needs pyarrow): a value JSON cannot hold (bytes, dates, decimals) is a bad row,
  since records end up in JSON run files.

``on_error="raise"`` stops at the first bad row; ``"skip"`` leaves bad rows out and lists them as
``(line, reason)`` in :attr:`Records.skipped`, so nothing is dropped silently. Callers hand their
own row-level checks to :meth:`Records.reject`, which applies the same policy. A file-level problem
(missing file, unsupported type, unreadable header or Parquet file) always raises.
``tolerate_torn_tail=True`` drops a bad *last* line of JSON lines that has no newline: what a kill in the middle
of an append leaves behind (the metrics log); a bad line anywhere else is still an error.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from tao_core.errors import TaoInputError

OnError = Literal["raise", "skip"]

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv", ".tsv")
MAX_LINE_BYTES = 16 * 1024 * 1024  # one physical line; also the CSV field limit, in characters
_CSV_NO_LIMIT = 2**31 - 1  # the largest field limit every platform's C long holds
MAX_DEPTH = 100  # JSON nesting levels; real prompt rows and run records use fewer than 10

_UTF16_32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)


class Records:
    """The rows of one file as ``(line, dict)``, iterated once; see the module docstring."""

    def __init__(self, path: Path, on_error: OnError, max_line_bytes: int, tolerate_torn_tail: bool) -> None:
        self.path, self.on_error = path, on_error
        self.max_line_bytes, self.tolerate_torn_tail = max_line_bytes, tolerate_torn_tail
        self.skipped: list[tuple[int, str]] = []  # (line, reason) of each row left out under "skip"

    def reject(self, line: int, reason: str) -> None:
        """Apply the bad-row policy: raise ``FILE:LINE: reason``, or record the row as skipped."""
        if self.on_error == "raise":
            raise TaoInputError(f"{self.path}:{line}: {reason}")
        self.skipped.append((line, reason))

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        suffix = self.path.suffix.lower()
        if suffix in JSON_SUFFIXES:
            return self._json_lines()
        if suffix in CSV_SUFFIXES:
            return self._csv_rows("\t" if suffix == ".tsv" else ",")
        return self._parquet_rows()

    def _lines(self) -> Iterator[tuple[int, bytes | None, bool]]:
        """``(line, bytes, ends_with_newline)``; bytes are None for a line over the limit."""
        with open(self.path, "rb") as f:
            lineno = 0
            while raw := f.readline(self.max_line_bytes + 1):
                lineno += 1
                if lineno == 1:
                    if raw.startswith(_UTF16_32_BOMS):
                        raise TaoInputError(f"{self.path}: the file is UTF-16 or UTF-32 (it starts with a "
                                            "byte-order mark); save it as UTF-8")
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                ended = raw.endswith(b"\n")
                if len(raw) > self.max_line_bytes and not ended:
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass
                    yield lineno, None, bool(rest)
                else:
                    yield lineno, raw, ended

    def _decode(self, raw: bytes | None) -> str:
        if raw is None:
            raise TaoInputError(f"line is longer than {self.max_line_bytes} bytes (the max_line_bytes "
                                "limit); split the record or raise the limit")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TaoInputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None

    def _json_lines(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for lineno, raw, ended in self._lines():
            try:
                text = self._decode(raw)
                if not text.strip():
                    continue
                record = _parse_line(text)
            except TaoInputError as e:
                if not (self.tolerate_torn_tail and not ended):
                    self.reject(lineno, str(e))
                continue
            yield lineno, record

    def _csv_rows(self, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
        bad_lines: dict[int, str] = {}

        def text_lines() -> Iterator[str]:
            # The csv module reads decoded lines; a line that cannot be decoded is passed on with
            # replacement characters (so quoting stays in step) and its row is rejected below.
            for lineno, raw, _ in self._lines():
                try:
                    yield self._decode(raw)
                except TaoInputError as e:
                    bad_lines[lineno] = str(e)
                    yield "\n" if raw is None else raw.decode("utf-8", "replace")

        reader = csv.reader(text_lines(), delimiter=delimiter, strict=True)
        header: list[str] | None = None
        header_line = 0
        while True:
            start = reader.line_num + 1
            # csv's own field limit (128 KiB by default, process-wide) would stop mid-field and lose
            # track of the quoting; lift it while reading this row and check the fields after.
            previous_limit = csv.field_size_limit(_CSV_NO_LIMIT)
            try:
                row = next(reader)
                problem = next((why if n == start else f"line {n}: {why}"
                                for n, why in bad_lines.items() if start <= n <= reader.line_num), None)
            except StopIteration:
                return
            except csv.Error as e:
                problem = _csv_problem(str(e))
            finally:
                csv.field_size_limit(previous_limit)
            if problem is None and any(len(value) > self.max_line_bytes for value in row):
                problem = (f"a field is longer than {self.max_line_bytes} characters (the max_line_bytes limit); "
                           "shorten it or raise the limit")
            if header is None:
                if problem is not None:
                    raise TaoInputError(f"{self.path}:{start}: cannot read the header row: {problem}")
                if row:
                    header, header_line = row, start
                    duplicates = sorted(name for name, count in Counter(header).items() if count > 1)
                    if duplicates:
                        raise TaoInputError(f"{self.path}:{start}: duplicate column name(s) {duplicates[:20]} "
                                            "in the header; column names must be unique")
            elif problem is not None:
                self.reject(start, problem)
            elif row:
                if len(row) == len(header):
                    yield start, dict(zip(header, row, strict=True))
                else:
                    fix = (f"quote a field that contains {delimiter!r}" if len(row) > len(header)
                           else "give every column a value, empty if need be")
                    self.reject(start, f"{len(row)} field(s), but the header (line {header_line}) names "
                                       f"{len(header)}; {fix}")

    def _parquet_rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise TaoInputError(f"{self.path}: reading Parquet needs pyarrow: pip install 'tao-core[parquet]'") from None
        try:
            rows = pq.read_table(self.path).to_pylist()
        except (OSError, pa.ArrowException) as e:
            raise TaoInputError(f"{self.path}: not a readable Parquet file ({e})") from None
        for number, row in enumerate(rows, 1):
            row = {k: _iso(v) for k, v in row.items()}  # timestamp and date columns as ISO 8601 text
            unstorable = [k for k, v in row.items() if not _json_storable(v)]
            if unstorable:
                types = ", ".join(f"{k!r} ({type(row[k]).__name__})" for k in unstorable)
                self.reject(number, f"column(s) {types} hold values JSON cannot store; cast them to strings")
                continue
            yield number, row


def _iso(value: Any) -> Any:
    """A Parquet ``timestamp`` / ``date`` / ``time`` value as ISO 8601 text (as JSONL or CSV would hold it)."""
    return value.isoformat() if isinstance(value, datetime.date | datetime.time) else value


def loads(text: str) -> Any:
    """``json.loads`` within the reader's limits; a :class:`TaoInputError` says what is wrong."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaoInputError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise TaoInputError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # the one other failure: an integer longer than Python converts
        raise TaoInputError(f"invalid JSON: an integer has more than {sys.get_int_max_str_digits()} digits") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and _too_deep(value):
        raise TaoInputError(f"JSON nested deeper than {MAX_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise TaoInputError("a string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), "
                                "which is not text") from None
    return value


def _too_deep(value: Any) -> bool:
    """Whether lists and objects nest more than :data:`MAX_DEPTH` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > MAX_DEPTH:
            return True
        stack += [(c, depth + 1) for c in children if isinstance(c, dict | list)]
    return False


def _parse_line(text: str) -> dict[str, Any]:
    value = loads(text)
    if not isinstance(value, dict):
        raise TaoInputError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _csv_problem(message: str) -> str:
    """The csv module's error, said for the person who wrote the file."""
    if message.startswith("new-line character seen in unquoted field"):
        return "a line break (\\r) inside an unquoted field; quote the field"
    if message == "unexpected end of data":
        return "a quoted field is never closed (a '\"' is missing before the end of the file)"
    return f"malformed CSV: {message}; a field that contains '\"' must be quoted, with '\"' doubled inside"


def _json_storable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """One JSON document holding an object (``config.json``), within the same limits as a record."""
    path = Path(path)
    try:
        text = path.read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8")
        value = loads(text)
    except OSError as e:
        raise TaoInputError(f"{path}: cannot read the file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise TaoInputError(f"{path}: not valid UTF-8 (byte offset {e.start}); save the file as UTF-8") from None
    except TaoInputError as e:
        raise TaoInputError(f"{path}: {e}") from None
    if not isinstance(value, dict):
        raise TaoInputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_records(
    path: str | os.PathLike,
    *,
    on_error: OnError = "raise",
    max_line_bytes: int = MAX_LINE_BYTES,
    tolerate_torn_tail: bool = False,
) -> Records:
    """Open a record file for iteration as ``(line, dict)``; file-level problems raise here.

    See the module docstring for the formats, the limits and the bad-row policy.
    """
    path = Path(path)
    if on_error not in ("raise", "skip"):
        raise TaoInputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not path.is_file():
        raise TaoInputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (*JSON_SUFFIXES, *CSV_SUFFIXES, ".parquet"):
        raise TaoInputError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv, .tsv or .parquet")
    return Records(path, on_error, max_line_bytes, tolerate_torn_tail)
