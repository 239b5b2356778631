"""``sql-exec`` on real SQLite files: the sandbox, result normalization and execution consensus.

The Spider sample ships in ``tests/data/spider-sample``. The last tests are hostile input: a long
C-level call, a dying worker, wide blob rows, the group result budget, db_path outside the allowed
directories, and workers that end with their caller.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tao_plugins.scorers.sql import SqlExecScorer, SqlLimits, SqlSandbox, extract_sql, is_ordered, result_key
from tao_plugins.scorers.sql_pool import close_pools, open_readonly, pool_for

from tao_core.scoring import score_groups
from tao_core.types import Candidate, Prompt, Score

SPIDER = Path(__file__).resolve().parent / "data" / "spider-sample"


@pytest.fixture(scope="module")
def spider() -> Path:
    return SPIDER


def scorer(**options) -> SqlExecScorer:
    """``sql-exec`` allowed to read the Spider sample."""
    return SqlExecScorer(allowed_dirs=[SPIDER], **options)


@pytest.fixture(scope="module")
def questions(spider) -> list[dict]:
    return [json.loads(line) for line in (spider / "questions.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def db(spider, tmp_path) -> Path:
    """A writable copy: only the sandbox stands between a query and the file."""
    path = tmp_path / "concert_singer.sqlite"
    shutil.copy(spider / "concert_singer.sqlite", path)
    path.chmod(0o644)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cands(texts: list[str], pid: str = "q") -> list[Candidate]:
    return [Candidate(pid, i, t, [1], [], []) for i, t in enumerate(texts)]


MALICIOUS = [
    "DROP TABLE singer",
    "DELETE FROM singer",
    "INSERT INTO singer (Singer_ID, Name) VALUES (99, 'x')",
    "UPDATE singer SET Age = 0",
    "CREATE TABLE evil (x)",
    "CREATE TEMP TABLE evil (x)",
    "ATTACH DATABASE '{dir}/other.sqlite' AS other",
    "VACUUM INTO '{dir}/copy.sqlite'",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = WAL",
    "PRAGMA writable_schema = ON",
    "PRAGMA table_info(singer); PRAGMA user_version = 3",
    "SELECT name FROM pragma_table_info('singer')",
    "SELECT 1; DROP TABLE singer",
    "BEGIN IMMEDIATE",
    "REINDEX",
    "ANALYZE",
    "SELECT load_extension('/tmp/evil')",
    "WITH x AS (SELECT 1) DELETE FROM singer",
    "SELECT zeroblob(1e8)",
    "SELECT length(randomblob(100000000))",
    "SELECT hex(zeroblob(600000))",
    "SELECT group_concat(Name) FROM singer, singer, singer, singer, singer, (SELECT zeroblob(100000))",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r",
]


@pytest.mark.parametrize("sql", MALICIOUS)
def test_malicious_sql_fails_and_never_changes_the_database(db, sql):
    before = digest(db)
    files = sorted(p.name for p in db.parent.iterdir())
    result = SqlSandbox(SqlLimits(timeout_s=0.3, max_rows=1000)).execute(str(db), sql.format(dir=db.parent))
    assert result.rows is None and result.error
    assert digest(db) == before
    assert sorted(p.name for p in db.parent.iterdir()) == files  # no journal, WAL, copy or attached file
    if "RECURSIVE" in sql and "count" not in sql:
        assert "row cap" in result.error
    elif "RECURSIVE" in sql:
        assert "time limit of 0.3 s exceeded" in result.error and result.stopped
        assert result.seconds < 5.0  # stopped by the progress handler, not left running


@pytest.mark.parametrize("sql", MALICIOUS)
def test_malicious_sql_through_the_scorer_scores_zero_or_error(db, sql):
    """A query that fails on its own scores 0; one the sandbox stopped (the time limit) is an error."""
    before = digest(db)
    prompt = Prompt(id="evil", text="q", metadata={"db_path": str(db)})
    scorer = SqlExecScorer(timeout_s=0.3, mode="executes", allowed_dirs=[db.parent])
    [score] = score_groups(scorer, [prompt], [cands([f"```sql\n{sql.format(dir=db.parent)}\n```"], "evil")])[0]
    if "RECURSIVE" in sql and "count" in sql:
        assert score.status == "error" and "time limit" in score.reason
    else:
        assert score.status == "ok" and score.value == 0.0 and score.reason
    assert digest(db) == before


@pytest.mark.parametrize("sql", ["CREATE TEMP TABLE t (x)", "CREATE TEMP VIEW v AS SELECT 1", "DROP TABLE singer",
                                 "ATTACH DATABASE ':memory:' AS m", "VACUUM INTO '{dir}/copy.sqlite'",
                                 "PRAGMA user_version = 3", "PRAGMA query_only = 0", "SAVEPOINT s"])
def test_the_authorizer_alone_denies_state_changes(db, sql):
    """Without the statement-word check: the read-only connection's authorizer denies each of these."""
    conn = open_readonly(str(db), SqlLimits())
    with pytest.raises(sqlite3.DatabaseError, match="not authorized|authorization denied"):
        conn.execute(sql.format(dir=db.parent))
    conn.close()


def test_reads_are_allowed(db):
    box = SqlSandbox()
    assert [r[1] for r in box.execute(str(db), "PRAGMA table_info(singer)").rows][:2] == ["Singer_ID", "Name"]
    assert "not authorized" in box.execute(str(db), "SELECT name FROM pragma_table_info('singer')").error
    assert box.execute(str(db), "SELECT count(*) FROM sqlite_master").rows[0][0] > 0
    assert box.execute(str(db), "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
                                "SELECT sum(n) FROM r").rows == [(15,)]
    assert box.execute(str(db), "VALUES (1, 'a')").rows == [(1, "a")]
    assert box.execute(str(db) + ".missing", "SELECT 1").error.startswith("cannot open database")


def test_every_spider_gold_query_runs_in_the_sandbox(spider, questions):
    box = SqlSandbox()
    for q in questions:
        r = box.execute(str(spider / f"{q['db']}.sqlite"), q["gold_sql"])
        assert r.error is None, (q["gold_sql"], r.error)
        assert len(r.rows) == q["row_count"], q["gold_sql"]


def test_extract_sql():
    assert extract_sql("Here:\n```sql\nSELECT a FROM t;\n```\nDone") == "SELECT a FROM t"
    assert extract_sql("```\nselect 1\n```") == "select 1"
    assert extract_sql("```python\nprint(1)\n```\n```sql\nSELECT 2\n```") == "SELECT 2"
    assert extract_sql("```sql\nSELECT name FROM singer WHERE age > 3") == "SELECT name FROM singer WHERE age > 3"
    assert extract_sql("The answer is SELECT count(*) FROM singer; because ...") == "SELECT count(*) FROM singer"
    assert extract_sql("WITH a AS (SELECT 1) SELECT * FROM a\n\nExplanation: ...") == "WITH a AS (SELECT 1) SELECT * FROM a"
    assert extract_sql("Answer with a query: SELECT 1") == "SELECT 1"
    assert extract_sql("WITH RECURSIVE r(n) AS (SELECT 1) SELECT n FROM r") == "WITH RECURSIVE r(n) AS (SELECT 1) SELECT n FROM r"
    assert extract_sql("I do not know.") is None


def test_ordering_and_normalization():
    assert is_ordered("SELECT a FROM t ORDER BY a")
    assert not is_ordered("SELECT a FROM (SELECT a FROM t ORDER BY a)")
    assert not is_ordered("SELECT a, rank() OVER (ORDER BY b) FROM t")
    assert not is_ordered("SELECT 'order by' FROM t")
    assert result_key([(1, "a"), (2, "b")], False) == result_key([(2, "b"), (1, "a")], False)
    assert result_key([(1,), (2,)], True) != result_key([(2,), (1,)], True)
    assert result_key([(1,), (1,)], False) != result_key([(1,)], False)  # a multiset, not a set
    assert result_key([(0.1 + 0.2,)], False) == result_key([(0.3,)], False)
    assert result_key([(1.0000004,)], True) == result_key([(1,)], True)
    assert result_key([(1.001,)], True) != result_key([(1,)], True)


def prompt_for(spider: Path, q: dict, i: int = 0, **meta) -> Prompt:
    return Prompt(id=f"q{i}", text=q["question"], metadata={"db_path": str(spider / f"{q['db']}.sqlite"), **meta})


def distinct_values(db: Path, sql: str) -> int:
    """How many distinct values the result of ``sql`` holds, read with plain sqlite3."""
    with sqlite3.connect(db) as conn:
        return len({v for row in conn.execute(sql).fetchall() for v in row})


def matches_nothing(db: Path, sql: str) -> bool:
    """No rows, or one distinct row of only 0s and NULLs (an aggregate over no rows), read with plain sqlite3."""
    with sqlite3.connect(db) as conn:
        rows = set(conn.execute(sql).fetchall())
    return not rows or (len(rows) == 1 and all(v is None or (isinstance(v, int | float) and v == 0)
                                               for row in rows for v in row))


def distinct_rows(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as conn:
        return len(set(conn.execute(sql).fetchall()))


def test_consensus_on_spider_gold_queries(spider, questions):
    """Copies of the gold query win when its result is informative; a single-valued one needs a second
    structure (``... WHERE 1 NOTNULL``); an empty one (or only 0/NULL) never wins. Failed queries score 0, below every query that ran."""
    prompts, groups = [], []
    for i, q in enumerate(questions):
        gold = q["gold_sql"]
        texts = [f"```sql\n{gold}\n```", f"The query is {gold}", f"```sql\n{gold};\n```",
                 "```sql\nSELECT 12345\n```", "```sql\nSELECT * FROM no_such_table\n```", "no idea",
                 f"SELECT * FROM ({gold}) AS sub WHERE 1 NOTNULL"]
        prompts.append(prompt_for(spider, q, i))
        groups.append(cands(texts, f"q{i}"))
    out = score_groups(scorer(), prompts, groups)
    for q, scores in zip(questions, out, strict=True):
        gold, db = q["gold_sql"], spider / f"{q['db']}.sqlite"
        nothing = matches_nothing(db, gold)
        assert [s.value for s in scores[3:6]] == [0.1, 0.0, 0.0], gold
        assert scores[4].reason.startswith("OperationalError: no such table")
        assert scores[5].reason == "no SQL query found in the answer"
        if nothing:  # an empty result (or a count of 0) never wins: the group ranks by validity only
            assert [s.value for s in scores] == [0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.1], gold
            assert scores[0].details["majority"] is None and scores[0].details["margin"] is None
            continue
        wrapped_same = not is_ordered(gold) or q["row_count"] == 1  # the wrapper drops a top-level ORDER BY
        assert [s.value for s in scores[:3]] == [1.0, 1.0, 1.0], gold
        assert scores[6].value == (1.0 if wrapped_same else 0.1), gold
        assert scores[0].details["cluster"] == 0 and scores[0].details["cluster_size"] == 3 + wrapped_same
        assert scores[0].details["structures"] == 1 + wrapped_same
    constant = [i for i, q in enumerate(questions) if distinct_rows(spider / f"{q['db']}.sqlite", q["gold_sql"]) == 1]
    assert constant  # the sample has single-record answers (counts): without the second structure they lose
    alone = score_groups(scorer(), [prompts[i] for i in constant], [g[:6] for i, g in enumerate(groups) if i in constant])
    assert all([s.value for s in g] == [0.1, 0.1, 0.1, 0.1, 0.0, 0.0] for g in alone)


def test_equivalent_queries_agree(spider, questions):
    q = next(q for q in questions if q["gold_sql"] == "SELECT count(*) FROM singer")
    texts = ["SELECT count(*) FROM singer", "SELECT COUNT(Singer_ID) FROM singer AS s",
             "SELECT count(*) + 0.0 FROM singer", "SELECT count(*) FROM singer WHERE Age > 30"]
    scores = scorer().score(prompt_for(spider, q), cands(texts))
    assert [s.value for s in scores] == [1.0, 1.0, 1.0, 0.1]
    assert scores[0].details["structures"] == 3


def test_empty_results_never_win_and_small_or_tied_clusters_abstain(spider, questions):
    q = questions[0]
    empty = "SELECT Name FROM singer WHERE Age > 1000"
    texts = [empty, empty, empty, "SELECT count(*) FROM singer", "SELECT nope"]
    scores = scorer(min_share=0.2).score(prompt_for(spider, q), cands(texts))
    assert [s.value for s in scores] == [0.1, 0.1, 0.1, 0.1, 0.0]  # no winner: ranked by validity only
    assert "no informative consensus" in scores[0].reason and "empty result" in scores[0].reason
    quiet = scorer().score(prompt_for(spider, q), cands(texts[:4]))  # nothing failed: nothing to rank
    assert {s.status for s in quiet} == {"abstain"} and "no informative consensus" in quiet[0].reason
    names = ["SELECT Name FROM singer WHERE Age > 40", "SELECT Name FROM singer WHERE Age > 40",
             "SELECT Name FROM singer"]
    small = scorer(min_share=0.8).score(prompt_for(spider, q), cands(names))
    assert {s.status for s in small} == {"abstain"} and "< min_share 0.8" in small[0].reason
    assert [s.value for s in scorer().score(prompt_for(spider, q), cands(names))] == [1.0, 1.0, 0.1]
    two = ["SELECT 1 UNION SELECT 2", "SELECT 1 UNION SELECT 2", "SELECT 3 UNION SELECT 4", "SELECT 3 UNION SELECT 4"]
    tie = scorer().score(prompt_for(spider, q), cands(two))
    assert {s.status for s in tie} == {"abstain"} and "tie" in tie[0].reason


def test_gold_mode_and_executes_mode(spider, questions):
    q = next(q for q in questions if "ORDER BY" in q["gold_sql"] and q["row_count"] > 1)
    gold = q["gold_sql"]
    unordered = gold.split("ORDER BY")[0]
    p = prompt_for(spider, q, gold_sql=gold)
    got = scorer(mode="gold").score(p, cands([gold, unordered, "SELECT nope", "hello"]))
    assert [s.value for s in got] == [1.0, 0.0, 0.0, 0.0]
    missing = scorer(mode="gold").score(prompt_for(spider, q), cands([gold]))
    assert missing[0].status == "error" and "gold_sql" in missing[0].reason
    runs = scorer(mode="executes").score(p, cands([gold, "SELECT nope", "SELECT 1 WHERE 0"]))
    assert [s.value for s in runs] == [1.0, 0.0, 0.0]
    assert SqlExecScorer(mode="executes").pointwise and not SqlExecScorer().pointwise


def test_missing_db_path_and_bad_options():
    [s] = score_groups(SqlExecScorer(), [Prompt(id="x", text="q")], [cands(["SELECT 1"], "x")])[0]
    assert isinstance(s, Score) and s.status == "error" and "db_path" in s.reason
    with pytest.raises(ValueError, match="mode"):
        SqlExecScorer(mode="vote")
    with pytest.raises(TypeError, match="unknown option"):
        SqlExecScorer(timeout=3)


def test_cache_hit_on_spider(spider, questions, tmp_path):
    prompts = [prompt_for(spider, q, i) for i, q in enumerate(questions[:5])]
    groups = [cands([q["gold_sql"]] * 2 + ["SELECT 1"], f"q{i}") for i, q in enumerate(questions[:5])]
    first = score_groups(scorer(), prompts, groups, cache=tmp_path)
    from tao_core.scoring import ScoreCache

    cache = ScoreCache(tmp_path)
    second = score_groups(scorer(), prompts, groups, cache=cache)
    assert cache.hits == 15 and cache.misses == 0
    assert [[s.to_dict() for s in g] for g in first] == [[s.to_dict() for s in g] for g in second]


def test_concurrent_scoring_matches_sequential(spider, questions):
    prompts = [prompt_for(spider, q, i) for i, q in enumerate(questions)]
    groups = [cands([q["gold_sql"], "SELECT 1", q["gold_sql"] + " /* again */"], f"q{i}") for i, q in enumerate(questions)]
    from tao_core.scoring import ScorerLimits

    seq = score_groups(scorer(), prompts, groups)
    par = score_groups(scorer(), prompts, groups, limits=ScorerLimits(workers=4))
    assert [[s.to_dict() for s in g] for g in seq] == [[s.to_dict() for s in g] for g in par]


# ---------------------------------------------------------------------------------------------
# Hostile input

# One call of SQLite's instr(): 800 KB of '0' searched for 400 KB of '0' then '1', many seconds in C
# with no VM opcode boundary, so the progress handler never runs.
INSTR = "SELECT instr(hex(zeroblob(400000)) || '1', hex(zeroblob(200000)) || '1')"
CONCERT = SPIDER / "concert_singer.sqlite"


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def gone(pid: int) -> bool:
    """The process has exited and been reaped: it burns no CPU and is no zombie."""
    return not Path(f"/proc/{pid}").exists()


def test_one_long_c_call_is_killed_at_the_wall_limit_and_scores_error():
    s = scorer(mode="executes", timeout_s=0.3, processes=1, memory_mb=384)
    prompt = Prompt(id="p", text="q", metadata={"db_path": str(CONCERT)})
    assert s.score(prompt, cands(["SELECT 1"]))[0].value == 1.0  # the pool's worker is up
    pool = pool_for(s.sandbox.limits)
    [pid] = pool.pids()
    start = time.monotonic()
    scores = s.score(prompt, cands([INSTR, "SELECT count(*) FROM singer"]))
    assert time.monotonic() - start < 3.0
    assert scores[0].status == "error" and "time limit of 0.3 s exceeded: the worker was killed" in scores[0].reason
    assert scores[1].status == "ok" and scores[1].value == 1.0  # the rest of the group ran on a fresh worker
    assert gone(pid) and pool.pids() and pid not in pool.pids()


def test_a_worker_that_dies_gives_an_error_with_its_reason_and_the_group_goes_on():
    s = scorer(mode="executes", timeout_s=20, processes=1, memory_mb=320)
    prompt = Prompt(id="p", text="q", metadata={"db_path": str(CONCERT)})
    s.score(prompt, cands(["SELECT 1"]))
    [pid] = pool_for(s.sandbox.limits).pids()
    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()  # as the OOM killer would
    scores = s.score(prompt, cands(["SELECT 1", INSTR, "SELECT 2"]))
    assert [x.status for x in scores] == ["ok", "error", "ok"]
    assert "worker process died running this query (killed by SIGKILL" in scores[1].reason
    assert gone(pid)


def test_wide_blob_rows_and_big_sorts_stay_out_of_the_callers_memory():
    wide = "SELECT " + ", ".join(["zeroblob(999999)"] * 300)  # one 300 MB row
    before = rss_mb()
    assert "too many columns in result set" in SqlSandbox().execute(str(CONCERT), wide).error
    big = SqlSandbox(SqlLimits(max_columns=300, timeout_s=10)).execute(str(CONCERT), wide)
    assert big.stopped and big.rows is None and ("MemoryError" in big.error or "result budget" in big.error)
    budget = SqlSandbox(SqlLimits(timeout_s=10)).execute(str(CONCERT), "SELECT " + ", ".join(["zeroblob(999999)"] * 90))
    assert budget.stopped and "result budget" in budget.error
    sort = ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 200) "
            "SELECT length(x) FROM (SELECT randomblob(900000) AS x FROM r ORDER BY x)")  # 180 MB to sort
    small = SqlSandbox(SqlLimits(memory_mb=64, timeout_s=10)).execute(str(CONCERT), sort)
    assert small.stopped and "memory_mb=64" in small.error
    assert rss_mb() - before < 50


def test_a_groups_results_share_one_byte_budget():
    box = SqlSandbox(SqlLimits(max_result_bytes=1_000_000))
    got = box.execute_group(str(CONCERT), [f"SELECT zeroblob(400000), {i}" for i in range(3)])
    assert [r.rows is not None for r in got] == [True, True, False]
    assert got[2].stopped and "max_result_bytes=1000000 (result budget)" in got[2].error
    s = scorer(mode="executes", max_result_bytes=1_000_000)
    prompt = Prompt(id="p", text="q", metadata={"db_path": str(CONCERT)})
    scores = s.score(prompt, cands([f"SELECT zeroblob(400000), {i}" for i in range(3)]))
    assert [x.status for x in scores] == ["ok", "ok", "error"]


def test_db_path_must_resolve_under_an_allowed_dir(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(CONCERT, allowed / "db.sqlite")
    shutil.copy(CONCERT, tmp_path / "outside.sqlite")
    (allowed / "link.sqlite").symlink_to(tmp_path / "outside.sqlite")
    (allowed / "up").symlink_to(tmp_path)
    s = SqlExecScorer(mode="executes", allowed_dirs=[allowed])

    def score(path: Path | str) -> Score:
        prompt = Prompt(id="p", text="q", metadata={"db_path": str(path)})
        return s.score(prompt, cands(["SELECT count(*) FROM singer"]))[0]

    assert score(allowed / "db.sqlite").value == 1.0
    for bad in [tmp_path / "outside.sqlite", allowed / "link.sqlite", allowed / "up" / "outside.sqlite",
                allowed / ".." / "outside.sqlite", "/etc/passwd"]:
        got = score(bad)
        assert got.status == "error" and "outside the allowed directories" in got.reason, bad
        assert "allowed_dirs" in got.reason and str(bad) in got.reason
    assert "not found" in score(allowed / "missing.sqlite").reason
    assert "outside the allowed directories" in SqlExecScorer().score(
        Prompt(id="p", text="q", metadata={"db_path": str(CONCERT)}), cands(["SELECT 1"]))[0].reason
    with pytest.raises(ValueError, match="not directories"):
        SqlExecScorer(allowed_dirs=[tmp_path / "nope"])


def test_close_pools_stops_every_worker():
    s = scorer(timeout_s=0.5, processes=2, memory_mb=448)
    prompt = Prompt(id="p", text="q", metadata={"db_path": str(CONCERT)})
    threads = [threading.Thread(target=s.score, args=(prompt, cands(["SELECT 1", INSTR]))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pids = pool_for(s.sandbox.limits).pids()
    assert len(pids) == 2
    close_pools()
    assert all(gone(p) for p in pids)


def test_workers_end_with_a_caller_script_that_has_no_main_guard(tmp_path):
    script = tmp_path / "score.py"  # re-run by a spawn or forkserver worker, it would score again
    script.write_text(
        "from tao_plugins.scorers.sql import SqlSandbox\n"
        "from tao_plugins.scorers.sql_pool import SqlLimits, pool_for\n"
        f"print(SqlSandbox().execute({str(CONCERT)!r}, 'SELECT count(*) FROM singer').rows)\n"
        "print(pool_for(SqlLimits()).pids())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows, pids = out.stdout.splitlines()
    assert rows == "[(6,)]" and all(gone(int(p)) for p in json.loads(pids))


def test_process_isolation_gives_the_forked_child_its_own_workers(spider, questions):
    """A forked group call must not talk to its parent's workers: a killed child would leave a reply behind."""
    from tao_core.scoring import ScorerLimits

    prompts = [prompt_for(spider, q, i) for i, q in enumerate(questions[:3])]
    groups = [cands([q["gold_sql"], "SELECT 1", "SELECT nope"], f"q{i}") for i, q in enumerate(questions[:3])]
    s = scorer(mode="executes")
    threaded = score_groups(s, prompts, groups)
    forked = score_groups(s, prompts, groups, limits=ScorerLimits(isolation="process", timeout_s=30))
    again = score_groups(s, prompts, groups)
    assert [[x.to_dict() for x in g] for g in threaded] == [[x.to_dict() for x in g] for g in forked]
    assert [[x.to_dict() for x in g] for g in threaded] == [[x.to_dict() for x in g] for g in again]


def test_table_dumps_and_padded_constants_do_not_win(spider, questions):
    """A reviewer's attacks: copies of SELECT * (aliased or not) outweighed a narrow correct answer,
    and a count with a literal column added counted as informative."""
    q = questions[0]
    names = "SELECT Name FROM singer WHERE Age > 30"
    got = scorer().score(prompt_for(spider, q), cands([names] * 4 + ["SELECT * FROM singer", "SELECT * FROM singer AS t"]))
    assert [s.value for s in got] == [1.0] * 4 + [0.1, 0.1]
    padded = scorer().score(prompt_for(spider, q), cands(["SELECT count(*) FROM singer"] * 3
                                                         + ["SELECT count(*), 'n' FROM singer"] * 2))
    assert {s.status for s in padded} == {"abstain"}  # constants from one structure each: no winner
