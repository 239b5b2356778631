"""``sql-exec``: run candidate SQL read-only against the prompt's SQLite database and vote.

The database is ``prompt.metadata["db_path"]``. Every query runs in a sandbox of four layers:

1. the file is opened with ``mode=ro`` (a URI), so SQLite itself refuses to write it;
2. an authorizer allows only ``SELECT``, reading columns, calling functions, recursive CTEs and
   the pragmas that only read the schema (``PRAGMA table_info(t)`` and friends); all else is denied
   at prepare time: writes, ``CREATE TEMP TABLE`` (which a read-only connection alone allows),
   ``ATTACH`` (and with it ``VACUUM INTO``), transactions, state-changing pragmas;
3. ``setlimit`` bounds strings and blobs (``zeroblob(1e8)`` fails), SQL text length and attached
   databases; the statement must start with ``SELECT``, ``WITH``, ``VALUES`` or ``PRAGMA``;
4. a progress handler interrupts a query past its time limit (an endless recursive CTE), and at
   most ``max_rows`` rows are fetched.

Modes: ``consensus`` (default, label-free): candidates vote with their result sets, normalized as
a multiset of rows (a list when the query has a top-level ``ORDER BY``), floats to 6 significant
digits, column names ignored; a candidate scores 1.0 when it agrees with the largest cluster and
0.0 otherwise. Empty and failed results never win; a group whose largest cluster holds less than
``min_share`` of the group, or where two clusters tie for largest, abstains. ``executes``: 1.0
when the query runs and returns rows, else 0.0. ``gold`` (evaluation only): 1.0 when the result
equals that of ``prompt.metadata["gold_sql"]``.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tao_core.types import Candidate, Prompt, Score

_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, 33}  # 33: RECURSIVE
# Pragmas that only read the schema, as statements (``PRAGMA table_info(t)``). Their table-valued
# forms (``pragma_table_info('t')``) are denied: their first use asks to update sqlite_master.
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
_DENIED_FUNCTIONS = {"load_extension"}
_FENCE = re.compile(r"```[ \t]*(?:sql|sqlite)?[ \t]*\n?(.*?)(?:```|\Z)", re.IGNORECASE | re.DOTALL)
_BARE = re.compile(r"\b(?:SELECT\b|WITH\s+(?:RECURSIVE\s+)?\w+\s*(?:\([^)]*\)\s*)?AS\s*\().*?(?=;|\n\s*\n|```|\Z)",
                   re.IGNORECASE | re.DOTALL)
_STRINGS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.DOTALL)
_FIRST_WORD = re.compile(r"\s*(\w+)")


def extract_sql(text: str) -> str | None:
    """The query in a model's answer: the first fenced block that holds SQL, else a bare SELECT/WITH."""
    for block in _FENCE.findall(text):
        block = block.strip().rstrip(";").strip()
        if re.match(r"(SELECT|WITH|VALUES)\b", block, re.IGNORECASE):
            return block
    m = _BARE.search(text)
    return m.group(0).strip().rstrip(";").strip() if m else None


def is_ordered(sql: str) -> bool:
    """Whether the query orders its result: an ``ORDER BY`` outside any parentheses."""
    stripped = _STRINGS.sub(" ", sql)
    depth = 0
    for m in re.finditer(r"[()]|\border\s+by\b", stripped, re.IGNORECASE):
        tok = m.group(0)
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif depth == 0:
            return True
    return False


def _norm_value(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}")
    return v


def result_key(rows: list[tuple], ordered: bool) -> tuple:
    """A hashable, comparable form of a result set (see the module docstring)."""
    normed = [tuple(_norm_value(v) for v in row) for row in rows]
    if ordered:
        return ("list", tuple(normed))
    return ("bag", frozenset(Counter(normed).items()))


@dataclass
class ExecResult:
    """One query's outcome: ``rows`` when it ran, else ``error``."""

    rows: list[tuple] | None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class SqlLimits:
    """The sandbox limits of one query."""

    timeout_s: float = 1.0  # wall time per query, enforced by the progress handler
    max_rows: int = 10_000  # more rows than this is an error ("row cap")
    max_length: int = 1_000_000  # bytes in any string or blob (SQLITE_LIMIT_LENGTH)
    max_sql_length: int = 100_000  # bytes of SQL text (SQLITE_LIMIT_SQL_LENGTH)
    progress_every: int = 10_000  # VM instructions between deadline checks


def _authorizer(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    if action == sqlite3.SQLITE_FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


class SqlSandbox:
    """Read-only connections to SQLite files, pooled per path (thread-safe), and a guarded execute."""

    def __init__(self, limits: SqlLimits | None = None) -> None:
        self.limits = limits or SqlLimits()
        self._idle: dict[str, list[sqlite3.Connection]] = {}
        self._lock = threading.Lock()

    def _open(self, path: str) -> sqlite3.Connection:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"database {path!r} not found")
        conn = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limits.max_length)
        conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, self.limits.max_sql_length)
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        conn.set_authorizer(_authorizer)
        return conn

    def execute(self, db_path: str, sql: str) -> ExecResult:
        """Run one query; never raises for a bad query (the error is in the result)."""
        start = time.monotonic()
        word = _FIRST_WORD.match(_STRINGS.sub(" ", sql))
        if not word or word.group(1).upper() not in ("SELECT", "WITH", "VALUES", "PRAGMA"):
            return ExecResult(None, "only SELECT, WITH, VALUES and schema-reading PRAGMA statements are run")
        key = str(db_path)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            conn = idle.pop() if idle else None
        try:
            conn = conn or self._open(key)
        except (OSError, sqlite3.Error) as e:
            return ExecResult(None, f"cannot open database: {e}")
        deadline = start + self.limits.timeout_s
        conn.set_progress_handler(lambda: time.monotonic() > deadline, self.limits.progress_every)
        try:
            cur = conn.execute(sql)
            rows = cur.fetchmany(self.limits.max_rows + 1)
            cur.close()
            if len(rows) > self.limits.max_rows:
                return ExecResult(None, f"more than {self.limits.max_rows} rows (row cap)", time.monotonic() - start)
            return ExecResult(rows, None, time.monotonic() - start)
        except sqlite3.Error as e:
            msg = str(e)
            if msg == "interrupted" and time.monotonic() > deadline:
                msg = f"time limit of {self.limits.timeout_s:g} s exceeded"
            return ExecResult(None, f"{type(e).__name__}: {msg}", time.monotonic() - start)
        except (MemoryError, OverflowError, ValueError) as e:
            return ExecResult(None, f"{type(e).__name__}: {e}", time.monotonic() - start)
        finally:
            conn.set_progress_handler(None, 0)
            if conn.in_transaction:
                conn.rollback()
            with self._lock:
                self._idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for c in conns:
                    c.close()
            self._idle.clear()


_DEFAULT_SANDBOX = SqlSandbox()


def execution_match(db_path: str, predicted_sql: str, gold_sql: str, sandbox: SqlSandbox | None = None) -> bool:
    """Whether a predicted query returns the gold query's result (ordered when gold orders)."""
    box = sandbox or _DEFAULT_SANDBOX
    gold = box.execute(db_path, gold_sql)
    if gold.rows is None:
        raise ValueError(f"gold query failed on {db_path}: {gold.error}\n{gold_sql}")
    pred = box.execute(db_path, predicted_sql)
    if pred.rows is None:
        return False
    ordered = is_ordered(gold_sql)
    return result_key(pred.rows, ordered) == result_key(gold.rows, ordered)


Mode = Literal["consensus", "executes", "gold"]


class SqlExecScorer:
    """``sql-exec``: see the module docstring. Options: ``mode``, ``min_share``, and SqlLimits fields."""

    name = "sql-exec"
    version = "1"

    def __init__(self, mode: Mode = "consensus", min_share: float = 0.3, **limits: Any) -> None:
        if mode not in ("consensus", "executes", "gold"):
            raise ValueError(f"sql-exec: mode must be 'consensus', 'executes' or 'gold', got {mode!r}")
        if not 0 < min_share <= 1:
            raise ValueError(f"sql-exec: min_share must be in (0, 1], got {min_share!r}")
        try:
            self.sandbox = SqlSandbox(SqlLimits(**limits))
        except TypeError:
            raise TypeError(f"sql-exec: unknown option(s) {sorted(limits)}; accepted: mode, min_share, "
                            f"{', '.join(SqlLimits.__dataclass_fields__)}") from None
        self.mode = mode
        self.min_share = min_share
        self.pointwise = mode != "consensus"  # a consensus score depends on the whole group

    def _run(self, db_path: str, candidates: list[Candidate]) -> list[tuple[str | None, ExecResult]]:
        seen: dict[str, ExecResult] = {}
        out = []
        for c in candidates:
            sql = extract_sql(c.text)
            if sql is None:
                out.append((None, ExecResult(None, "no SQL query found in the answer")))
                continue
            if sql not in seen:
                seen[sql] = self.sandbox.execute(db_path, sql)
            out.append((sql, seen[sql]))
        return out

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        db_path = prompt.metadata.get("db_path")
        if not db_path:
            return [Score.error(f"sql-exec: prompt {prompt.id!r} has no metadata['db_path']")] * len(candidates)
        runs = self._run(str(db_path), candidates)
        if self.mode == "executes":
            return [Score.ok(1.0 if r.rows else 0.0, r.error or ("" if r.rows else "empty result"),
                             details={"rows": None if r.rows is None else len(r.rows)}) for _, r in runs]
        if self.mode == "gold":
            return self._gold(prompt, runs)
        return self._consensus(runs)

    def _gold(self, prompt: Prompt, runs: list[tuple[str | None, ExecResult]]) -> list[Score]:
        gold_sql = prompt.metadata.get("gold_sql")
        if not gold_sql:
            return [Score.error(f"sql-exec gold mode: prompt {prompt.id!r} has no metadata['gold_sql']")] * len(runs)
        gold = self.sandbox.execute(str(prompt.metadata["db_path"]), gold_sql)
        if gold.rows is None:
            return [Score.error(f"sql-exec gold mode: gold query failed: {gold.error}")] * len(runs)
        ordered = is_ordered(gold_sql)
        want = result_key(gold.rows, ordered)
        return [Score.ok(0.0, r.error) if r.rows is None
                else Score.ok(float(result_key(r.rows, ordered) == want), "matches gold" if
                              result_key(r.rows, ordered) == want else "differs from gold")
                for _, r in runs]

    def _consensus(self, runs: list[tuple[str | None, ExecResult]]) -> list[Score]:
        keys = [result_key(r.rows, is_ordered(sql or "")) if r.rows else None for sql, r in runs]
        votes = Counter(k for k in keys if k is not None)
        cluster_ids = {k: i for i, (k, _) in enumerate(votes.most_common())}
        n = len(runs)
        ranked = votes.most_common(2)
        top = ranked[0][1] if ranked else 0
        if not ranked:
            reason = "no candidate returned a non-empty result"
        elif len(ranked) > 1 and ranked[1][1] == top:
            reason = f"tie: two result clusters of {top} candidates each"
        elif top / n < self.min_share:
            reason = f"largest result cluster is {top}/{n} < min_share {self.min_share:g}"
        else:
            reason = ""
        if reason:
            return [Score.abstain(f"sql-exec consensus: {reason}",
                                  details={"cluster": cluster_ids.get(k), "error": r.error})
                    for k, (_, r) in zip(keys, runs, strict=True)]
        winner = ranked[0][0]
        out = []
        for k, (_, r) in zip(keys, runs, strict=True):
            details = {"cluster": cluster_ids.get(k), "cluster_size": votes[k] if k else 0,
                       "share": top / n, "rows": None if r.rows is None else len(r.rows)}
            if k == winner:
                out.append(Score.ok(1.0, f"agrees with the largest result cluster ({top}/{n})", details=details))
            else:
                why = r.error or ("empty result" if r.rows is not None and not r.rows else "different result")
                out.append(Score.ok(0.0, why, details=details))
        return out


SCORERS = {"sql-exec": SqlExecScorer}
