"""``sql-exec``: run candidate SQL read-only against the prompt's SQLite database and vote.

The database is ``prompt.metadata["db_path"]``. It must resolve (symlinks followed) to a file under
an allowed directory: the packaged ``sql`` task data (``tao_plugins/data/sql``), a ``data_dir``
given to the ``sql`` task (the task allows it when constructed), and the scorer option
``allowed_dirs``. Nothing else is allowed by default, not even the prompts file's own directory: a
prompts file is data (often fed back from serving) and may sit beside run files such as the score
cache. A path outside is an error score naming the path and the option that allows it.

Every query runs in a sandbox of four layers:

1. a worker process (``tao_plugins.scorers.sql_pool``: a fresh interpreter, reused across calls)
   with its own memory and CPU limits, killed by the caller when a query outruns its time limit;
2. the file is opened with ``mode=ro`` (a URI), so SQLite itself refuses to write it;
3. an authorizer allows only ``SELECT``, reading columns, calling functions, recursive CTEs and
   the pragmas that only read the schema (``PRAGMA table_info(t)`` and friends); all else is denied
   at prepare time: writes, ``CREATE TEMP TABLE`` (which a read-only connection alone allows),
   ``ATTACH`` (and with it ``VACUUM INTO``), transactions, state-changing pragmas;
4. SQLite's limits bound strings and blobs (``zeroblob(1e8)`` fails), result columns, SQL text
   length and attached databases; the statement must start with ``SELECT``, ``WITH``, ``VALUES`` or
   ``PRAGMA``; rows per query and bytes of one group's results are capped.

The default limits (:class:`SqlLimits`, each also a scorer option): 1 s per query (killed at
1.5 s), 10,000 rows, 1,000,000 bytes per value, 100 columns, 100,000 bytes of SQL, 32 MiB of
results per group, 512 MiB of memory per worker, 2 worker processes. A query the sandbox stopped
(time, memory, result budget, a dead worker) scores ``error``: its result is unknown. A query
that fails on its own (bad SQL, a denied statement, the row or length cap) is a wrong answer.

Modes: ``consensus`` (default, label-free): candidates vote with their result sets, normalized as
a multiset of rows (a list when the query has a top-level ``ORDER BY``), floats to 6 significant
digits, column names ignored. The vote resists degenerate agreement
(:mod:`tao_plugins.scorers.sql_consensus`): a result counts by how informative it is, copies of one
query count less than structurally different queries, an empty or single-valued result cannot win
on copies of one query, and failed queries score below every query that ran (0.0 < ``valid_value``
< 1.0 for the winning cluster); a group with no informative consensus abstains (or, when some of
its queries failed, ranks by validity only). Options: ``min_share``, ``constant_weight``,
``copy_weight``, ``constant_min_structures``, ``valid_value`` (see there). Each score's
``details`` hold ``margin`` and ``majority`` (the winning result's id). The gold query is never
read. ``executes``: 1.0 when the query runs and returns rows, else 0.0. ``gold`` (evaluation
only): 1.0 when the result equals that of ``prompt.metadata["gold_sql"]``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from tao_plugins.scorers.sql_consensus import Ballot, Cluster, ConsensusRules, Verdict, vote
from tao_plugins.scorers.sql_pool import ExecResult, SqlLimits, pool_for

from tao_core.types import Candidate, Prompt, Score

__all__ = ["ExecResult", "SqlExecScorer", "SqlLimits", "SqlSandbox", "allow_dir", "execution_match",
           "extract_sql", "is_ordered", "resolve_db_path", "result_key"]

PACKAGED_DATA = Path(__file__).resolve().parents[1] / "data" / "sql"
_ALLOWED_DIRS = {str(PACKAGED_DATA)}  # resolved, as strings: resolve_db_path runs once per group
_ALLOWED_LOCK = threading.Lock()
_FENCE = re.compile(r"```[ \t]*(?:sql|sqlite)?[ \t]*\n?(.*?)(?:```|\Z)", re.IGNORECASE | re.DOTALL)
_BARE = re.compile(r"\b(?:SELECT\b|WITH\s+(?:RECURSIVE\s+)?\w+\s*(?:\([^)]*\)\s*)?AS\s*\().*?(?=;|\n\s*\n|```|\Z)",
                   re.IGNORECASE | re.DOTALL)
_STRINGS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*.*?\*/", re.DOTALL)
_FIRST_WORD = re.compile(r"\s*(\w+)")


def allow_dir(path: str | Path) -> None:
    """Allow databases under ``path`` for every ``sql-exec`` scorer of this process (the task calls it)."""
    with _ALLOWED_LOCK:
        _ALLOWED_DIRS.add(str(Path(path).resolve()))


def resolve_db_path(db_path: str, allowed: Sequence[str]) -> str:
    """The database file ``db_path`` resolves to, symlinks followed; ValueError when not under ``allowed``
    (resolved directories, as strings)."""
    try:
        path = os.path.realpath(db_path, strict=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"sql-exec: db_path {db_path!r} not found ({e})") from None
    if not os.path.isfile(path):
        raise ValueError(f"sql-exec: db_path {db_path!r} is not a file")
    if not any(path.startswith(d.rstrip(os.sep) + os.sep) for d in allowed):
        raise ValueError(f"sql-exec: db_path {db_path!r} resolves to {path!r}, outside the allowed directories "
                         f"{sorted(allowed)}; to allow it, add its directory to the scorer option allowed_dirs "
                         f"(config: [score.options] allowed_dirs = [\"{os.path.dirname(path)}\"])")
    return path


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


_STATEMENT_ERROR = "only SELECT, WITH, VALUES and schema-reading PRAGMA statements are run"


class SqlSandbox:
    """Runs queries in the shared worker pool under ``limits`` (thread-safe; see the module docstring)."""

    def __init__(self, limits: SqlLimits | None = None) -> None:
        self.limits = limits or SqlLimits()

    def execute(self, db_path: str, sql: str) -> ExecResult:
        """Run one query; never raises for a bad query (the error is in the result)."""
        return self.execute_group(db_path, [sql])[0]

    def execute_group(self, db_path: str, sqls: Sequence[str]) -> list[ExecResult]:
        """Run a group's queries in order on one worker, sharing one result budget; one result each."""
        words = [_FIRST_WORD.match(_STRINGS.sub(" ", sql)) for sql in sqls]
        runnable = [bool(w) and w.group(1).upper() in ("SELECT", "WITH", "VALUES", "PRAGMA") for w in words]
        todo = [sql for sql, ok in zip(sqls, runnable, strict=True) if ok]
        ran = iter(pool_for(self.limits).run(str(db_path), todo, self.limits) if todo else [])
        return [next(ran) if ok else ExecResult(None, _STATEMENT_ERROR) for ok in runnable]


_DEFAULT_SANDBOX = SqlSandbox()


def execution_match(db_path: str, predicted_sql: str, gold_sql: str, sandbox: SqlSandbox | None = None) -> bool:
    """Whether a predicted query returns the gold query's result (ordered when gold orders)."""
    gold, pred = (sandbox or _DEFAULT_SANDBOX).execute_group(db_path, [gold_sql, predicted_sql])
    if gold.rows is None:
        raise ValueError(f"gold query failed on {db_path}: {gold.error}\n{gold_sql}")
    if pred.rows is None:
        return False
    ordered = is_ordered(gold_sql)
    return result_key(pred.rows, ordered) == result_key(gold.rows, ordered)


Mode = Literal["consensus", "executes", "gold"]
Run = tuple[str | None, ExecResult]  # a candidate's query (None: none found) and its result


class SqlExecScorer:
    """``sql-exec``: see the module docstring. Options: ``mode``, ``allowed_dirs``, the consensus rules
    (:class:`~tao_plugins.scorers.sql_consensus.ConsensusRules`) and the :class:`SqlLimits` fields;
    ``options`` holds them all, defaults filled in (the cache key)."""

    name = "sql-exec"
    version = "4"

    def __init__(self, mode: Mode = "consensus", min_share: float = 0.3, constant_weight: float = 0.25,
                 copy_weight: float = 0.25, constant_min_structures: int = 2, valid_value: float = 0.1,
                 allowed_dirs: Sequence[str | Path] | str | Path = (), **limits: Any) -> None:
        if mode not in ("consensus", "executes", "gold"):
            raise ValueError(f"sql-exec: mode must be 'consensus', 'executes' or 'gold', got {mode!r}")
        self.rules = ConsensusRules(min_share, constant_weight, copy_weight, constant_min_structures, valid_value)
        self.rules.check()
        try:
            self.sandbox = SqlSandbox(SqlLimits(**limits))
        except TypeError:
            raise TypeError(f"sql-exec: unknown option(s) {sorted(limits)}; accepted: mode, allowed_dirs, "
                            f"{', '.join(ConsensusRules.__dataclass_fields__)}, "
                            f"{', '.join(SqlLimits.__dataclass_fields__)}") from None
        dirs = [allowed_dirs] if isinstance(allowed_dirs, str | Path) else list(allowed_dirs)
        missing = [str(d) for d in dirs if not Path(d).is_dir()]
        if missing:
            raise ValueError(f"sql-exec: allowed_dirs {missing} are not directories")
        self.allowed_dirs = sorted({str(Path(d).resolve()) for d in dirs})
        self.mode = mode
        self.pointwise = mode != "consensus"  # a consensus score depends on the whole group
        self.options = {"mode": mode, **dataclasses.asdict(self.rules), "allowed_dirs": self.allowed_dirs,
                        **dataclasses.asdict(self.sandbox.limits)}

    def _run(self, db_path: str, candidates: list[Candidate], first: Sequence[str] = ()
             ) -> tuple[list[Run], dict[str, ExecResult]]:
        """Each candidate's query and result, and the results of all queries run (``first`` first), in one group."""
        sqls = [extract_sql(c.text) for c in candidates]
        distinct = list(dict.fromkeys([*first, *(s for s in sqls if s is not None)]))
        results = dict(zip(distinct, self.sandbox.execute_group(db_path, distinct), strict=True))
        none = ExecResult(None, "no SQL query found in the answer")
        return [(s, none if s is None else results[s]) for s in sqls], results

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        db_path = prompt.metadata.get("db_path")
        if not db_path:
            return [Score.error(f"sql-exec: prompt {prompt.id!r} has no metadata['db_path']")] * len(candidates)
        with _ALLOWED_LOCK:
            allowed = sorted(_ALLOWED_DIRS | set(self.allowed_dirs))
        try:
            path = resolve_db_path(str(db_path), allowed)
        except ValueError as e:
            return [Score.error(str(e))] * len(candidates)
        if self.mode == "gold":
            return self._gold(prompt, path, candidates)
        runs = self._run(path, candidates)[0]
        if self.mode == "executes":
            return [_stopped(r) or Score.ok(1.0 if r.rows else 0.0, r.error or ("" if r.rows else "empty result"),
                                            details={"rows": None if r.rows is None else len(r.rows)}) for _, r in runs]
        return self._consensus(runs)

    def _gold(self, prompt: Prompt, path: str, candidates: list[Candidate]) -> list[Score]:
        gold_sql = prompt.metadata.get("gold_sql")
        if not gold_sql:
            return [Score.error(f"sql-exec gold mode: prompt {prompt.id!r} has no metadata['gold_sql']")] * len(candidates)
        runs, results = self._run(path, candidates, [gold_sql])
        gold = results[gold_sql]
        if gold.rows is None:
            return [Score.error(f"sql-exec gold mode: gold query failed: {gold.error}")] * len(runs)
        ordered = is_ordered(gold_sql)
        want = result_key(gold.rows, ordered)
        out = []
        for _, r in runs:
            same = r.rows is not None and result_key(r.rows, ordered) == want
            out.append(_stopped(r) or Score.ok(float(same), r.error or ("matches gold" if same else "differs from gold")))
        return out

    def _consensus(self, runs: list[Run]) -> list[Score]:
        # one row has no order: an ordered and an unordered query returning it agree
        ballots = [Ballot(sql, result_key(r.rows, len(r.rows) > 1 and is_ordered(sql))) for sql, r in runs
                   if sql is not None and r.rows is not None]
        verdict = vote(ballots, self.rules)
        ballot = iter(ballots)
        failed = any(r.rows is None and not r.stopped for _, r in runs)
        out = []
        for sql, r in runs:
            cluster = verdict.clusters[next(ballot).key] if sql is not None and r.rows is not None else None
            out.append(self._consensus_score(r, cluster, verdict, failed))
        return out

    def _consensus_score(self, r: ExecResult, cluster: Cluster | None, verdict: Verdict, failed: bool) -> Score:
        """One candidate's score (see :mod:`tao_plugins.scorers.sql_consensus` for the order of values)."""
        details: dict[str, Any] = {"margin": verdict.margin, "majority": verdict.majority,
                                   "rows": None if r.rows is None else len(r.rows)}
        if cluster is not None:
            details.update(cluster=cluster.id, cluster_size=cluster.members, structures=cluster.structures,
                           informativeness=round(cluster.info, 6), weight=round(cluster.weight, 6))
        if r.stopped:
            return Score.error(f"sql-exec: {r.error}", details=details)
        no_winner = f"sql-exec consensus: no informative consensus: {verdict.reason}"
        if cluster is None:  # the query failed on its own, or none was found: below every query that ran
            return Score.ok(0.0, r.error or "no result", details=details)
        if verdict.winner is None:
            if not failed:
                return Score.abstain(no_winner, details=details)
            return Score.ok(self.rules.valid_value, f"{no_winner}; the query ran, others failed", details=details)
        if cluster is verdict.winner:
            return Score.ok(1.0, f"agrees with the winning result cluster ({cluster.members} candidates, "
                                 f"{cluster.structures} distinct queries, margin {verdict.margin:.3f})", details=details)
        return Score.ok(self.rules.valid_value, "empty result" if not r.rows else "different result", details=details)


def _stopped(r: ExecResult) -> Score | None:
    """An error score for a query the sandbox stopped (its result is unknown), else None."""
    return Score.error(f"sql-exec: {r.error}") if r.stopped else None


SCORERS = {"sql-exec": SqlExecScorer}
