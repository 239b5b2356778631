"""Scorer throughput with the cache off: ``sql-exec`` on the Spider sample databases.

The sample ships in ``tests/data/spider-sample`` (two databases, 87 questions; see its LICENSE.md).

Each of the 87 Spider sample questions becomes a group of 8 candidates, all distinct queries (the
gold query, wrappers of it that return the same or a different result, a wrong query, a failing
one), so the scorer's de-duplication within a group never saves an execution. Prints CSV rows:
the median over ``--repeats`` passes of candidates scored per second, directly
(``scorer.score``) and through the runtime (``tao_core.scoring.score_groups``, one guarded thread
call per group), for each mode.

    .venv/bin/python bench/scorers.py [--repeats 7] [--append results.csv]

``sql-exec`` runs each group's queries in a worker process (``tao_plugins.scorers.sql_pool``); the
first pass of each row warms the pool and the connections and is not timed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import io
import platform
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from tao_plugins.scorers.sql import SqlExecScorer

from tao_core.records import read_records
from tao_core.scoring import ScorerLimits, score_groups
from tao_core.types import Candidate, Prompt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import append_csv  # noqa: E402

SPIDER = Path(__file__).resolve().parents[1] / "tests" / "data" / "spider-sample"
FIELDS = ["bench", "path", "mode", "groups", "group_size", "candidates", "seconds_median", "candidates_per_s",
          "cpu", "python", "sqlite", "date"]


def workload(spider: Path) -> tuple[list[Prompt], list[list[Candidate]]]:
    questions = [q for _, q in read_records(spider / "questions.jsonl")]
    prompts, groups = [], []
    for i, q in enumerate(questions):
        gold = q["gold_sql"].strip().rstrip(";")
        wrong = "SELECT * FROM singer" if q["db"] == "concert_singer" else "SELECT * FROM Pets"
        texts = [f"```sql\n{gold}\n```", f"SELECT * FROM ({gold})", f"{gold} /* same */",
                 f"SELECT count(*) FROM ({gold})", f"SELECT * FROM ({gold}) LIMIT 1", wrong,
                 f"SELECT * FROM missing_table_{i}", f"The answer:\n```sql\nSELECT DISTINCT * FROM ({gold})\n```"]
        prompts.append(Prompt(id=f"q{i}", text=q["question"],
                              metadata={"db_path": str(spider / f"{q['db']}.sqlite"), "gold_sql": gold}))
        groups.append([Candidate(f"q{i}", j, t, [], [], []) for j, t in enumerate(texts)])
    return prompts, groups


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s), else the machine type."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed passes per row (median reported)")
    ap.add_argument("--append", type=Path, help="also append the rows to this CSV file")
    args = ap.parse_args()
    if not SPIDER.is_dir():
        sys.exit(f"bench/scorers.py: the Spider sample is missing at {SPIDER}")
    prompts, groups = workload(SPIDER)
    n_cands = sum(len(g) for g in groups)
    meta = {"cpu": cpu_model(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "date": datetime.date.today().isoformat()}
    rows = []
    for mode in ("consensus", "executes", "gold"):
        for path in ("direct", "score_groups"):
            scorer = SqlExecScorer(mode=mode, allowed_dirs=[SPIDER])
            times = []
            for _ in range(args.repeats + 1):  # the first pass starts the workers and opens the connections
                t0 = time.perf_counter()
                if path == "direct":
                    for p, g in zip(prompts, groups, strict=True):
                        scorer.score(p, g)
                else:
                    score_groups(scorer, prompts, groups, limits=ScorerLimits(timeout_s=30))
                times.append(time.perf_counter() - t0)
            med = statistics.median(times[1:])
            rows.append({"bench": "sql-exec", "path": path, "mode": mode, "groups": len(groups),
                         "group_size": len(groups[0]), "candidates": n_cands, "seconds_median": f"{med:.4f}",
                         "candidates_per_s": f"{n_cands / med:.0f}", **meta})
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    print(out.getvalue(), end="")
    if args.append:
        append_csv(args.append, FIELDS, rows)


if __name__ == "__main__":
    main()
