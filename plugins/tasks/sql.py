"""``sql``: natural-language questions over small SQLite databases that ship with the package.

The databases and questions are built by ``plugins/data/sql/build.py`` (see there). Training
prompts come from four databases; the evaluation split uses two others that training never sees.
A prompt shows the database schema and the question and asks for one SQLite query in a ``sql``
code block; ``prompt.metadata["db_path"]`` tells the ``sql-exec`` scorer where to run it.
Training prompts never carry the gold query. The metric is execution accuracy: the completion's
query returns the gold query's result (as a multiset of rows, or in order when the gold orders).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

from tao_plugins.scorers.sql import allow_dir, execution_match, extract_sql

from tao_core.errors import TaoInputError
from tao_core.records import read_records
from tao_core.tasks import EvalExample
from tao_core.types import Prompt

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "sql"

PROMPT = (
    "Given this SQLite database schema:\n\n{schema}\n\n"
    "Write one SQLite query that answers the question: {question}\n"
    "Answer with only the query in a ```sql code block."
)


def read_schema(db_path: Path) -> str:
    """The ``CREATE TABLE`` statements of a database, read-only."""
    conn = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND sql IS NOT NULL "
                            "ORDER BY rowid").fetchall()
    finally:
        conn.close()
    return ";\n".join(r[0] for r in rows) + ";"


class SqlTask:
    """The ``sql`` task. Options: ``data_dir`` (a folder with ``questions.jsonl`` and its databases;
    constructing the task allows ``sql-exec`` to read databases under it)."""

    name = "sql"
    metric = "execution_accuracy"
    default_generator = "sample"
    default_objective = "grpo"
    default_scorer = "sql-exec"
    max_new_tokens = 128  # the gold queries are one line; a fenced answer fits easily

    def __init__(self, data_dir: str | Path | None = None, seed: int = 0) -> None:
        self.data_dir = Path(data_dir) if data_dir is not None else DATA_DIR
        path = self.data_dir / "questions.jsonl"
        if not path.is_file():
            raise TaoInputError(f"sql task: {path} not found; build it with plugins/data/sql/build.py")
        self.records: list[dict[str, Any]] = []
        for lineno, rec in read_records(path):
            missing = {"db", "split", "question", "gold_sql"} - set(rec)
            if missing or rec["split"] not in ("train", "eval"):
                raise TaoInputError(f"{path}:{lineno}: need db, question, gold_sql and split "
                                    f"'train' or 'eval' (missing {sorted(missing)})")
            wrong = [k for k in ("db", "question", "gold_sql") if not isinstance(rec[k], str) or not rec[k].strip()]
            if wrong:
                raise TaoInputError(f"{path}:{lineno}: {wrong} must be non-empty strings")
            if not (self.data_dir / f"{rec['db']}.sqlite").is_file():
                raise TaoInputError(f"{path}:{lineno}: database {rec['db']}.sqlite not in {self.data_dir}")
            self.records.append(rec)
        train_dbs = {r["db"] for r in self.records if r["split"] == "train"}
        eval_dbs = {r["db"] for r in self.records if r["split"] == "eval"}
        if train_dbs & eval_dbs:
            raise TaoInputError(f"{path}: databases {sorted(train_dbs & eval_dbs)} are in both splits; "
                                f"the evaluation split must use databases training never sees")
        self.seed = seed
        self._schemas: dict[str, str] = {}
        self._train_gold: dict[str, str] | None = None  # training prompt text -> gold query, built on demand
        allow_dir(self.data_dir)

    def db_path(self, db: str) -> Path:
        return (self.data_dir / f"{db}.sqlite").resolve()

    def _prompt(self, rec: dict[str, Any], pid: str) -> Prompt:
        db = rec["db"]
        if db not in self._schemas:
            self._schemas[db] = read_schema(self.db_path(db))
        text = PROMPT.format(schema=self._schemas[db], question=rec["question"])
        return Prompt(id=pid, text=text, task=self.name, metadata={"db_path": str(self.db_path(db)), "db": db})

    def _split(self, split: str) -> list[tuple[int, dict[str, Any]]]:
        rows = [(i, r) for i, r in enumerate(self.records) if r["split"] == split]
        random.Random(self.seed).shuffle(rows)  # so a limit draws from every database
        return rows

    def train_prompts(self, limit: int | None = None) -> list[Prompt]:
        rows = self._split("train")[:limit]
        return [self._prompt(r, f"sql-train-{i}") for i, r in rows]

    def eval_examples(self, limit: int | None = None) -> list[EvalExample]:
        rows = self._split("eval")[:limit]
        return [EvalExample(self._prompt(r, f"sql-eval-{i}"), r["gold_sql"], {"db_path": str(self.db_path(r["db"]))})
                for i, r in rows]

    def check(self, example: EvalExample, completion: str) -> float:
        sql = extract_sql(completion)
        if sql is None:
            return 0.0
        return float(execution_match(example.metadata["db_path"], sql, example.reference))

    def reference(self, prompt: Prompt) -> str | None:
        """The gold query in a ```` ```sql ```` block, for a training prompt of this task; else None.

        Found by the prompt's text (schema and question), so prompts rebuilt elsewhere match too;
        held-out questions are never given a reference.
        """
        if self._train_gold is None:
            self._train_gold = {self._prompt(r, "").text: r["gold_sql"] for _, r in self._split("train")}
        gold = self._train_gold.get(prompt.text or "")
        return None if gold is None else f"```sql\n{gold.strip()}\n```"


TASKS = {"sql": SqlTask}
