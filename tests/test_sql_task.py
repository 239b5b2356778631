"""The ``sql`` task: shipped databases, disjoint splits, gold queries, execution-match check."""

from __future__ import annotations

import hashlib
import json
import runpy
import shutil
import sqlite3

import pytest
from tao_plugins.scorers.sql import SqlExecScorer, SqlSandbox
from tao_plugins.tasks.sql import DATA_DIR, SqlTask

import tao_core
from tao_core.errors import TaoInputError
from tao_core.scoring import score_groups
from tao_core.tasks import Task
from tao_core.types import Candidate, Prompt


@pytest.fixture(scope="module")
def task() -> SqlTask:
    return tao_core.get_component("tasks", "sql")()


def test_registered_and_follows_the_protocol(task):
    assert isinstance(task, Task)
    assert (task.name, task.default_scorer, task.default_generator) == ("sql", "sql-exec", "sample")
    assert "sql-exec" in tao_core.get_registry().names("scorers")


def test_splits_use_disjoint_databases(task):
    train = task.train_prompts()
    evals = task.eval_examples()
    assert len(train) >= 150 and len(evals) >= 60
    train_dbs = {p.metadata["db"] for p in train}
    eval_dbs = {e.prompt.metadata["db"] for e in evals}
    assert len(train_dbs) == 4 and len(eval_dbs) == 2 and not train_dbs & eval_dbs
    assert {p.metadata["db_path"] for p in train}.isdisjoint({e.metadata["db_path"] for e in evals})
    assert len({p.id for p in train} | {e.prompt.id for e in evals}) == len(train) + len(evals)


def test_training_prompts_carry_no_answer(task):
    golds = {json.loads(line)["gold_sql"] for line in (DATA_DIR / "questions.jsonl").read_text().splitlines()}
    for p in task.train_prompts():
        assert set(p.metadata) == {"db_path", "db"} and p.task == "sql"
        assert not any(g in p.text for g in golds)
        assert "CREATE TABLE" in p.text and "```sql" in p.text


def test_limit_draws_from_every_eval_database(task):
    assert len({e.prompt.metadata["db"] for e in task.eval_examples(10)}) == 2
    assert [e.prompt.id for e in task.eval_examples(5)] == [e.prompt.id for e in task.eval_examples(5)]


def test_every_gold_query_returns_rows_in_the_sandbox(task):
    box = SqlSandbox()
    for line in (DATA_DIR / "questions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        r = box.execute(str(task.db_path(rec["db"])), rec["gold_sql"])
        assert r.error is None and r.rows, rec


def test_check_is_execution_match(task):
    ex = next(e for e in task.eval_examples() if "ORDER BY" in e.reference and "LIMIT 3" in e.reference)
    gold = ex.reference
    assert task.check(ex, f"```sql\n{gold}\n```") == 1.0
    assert task.check(ex, gold.replace("SELECT ", "SELECT  ", 1) + ";") == 1.0
    assert task.check(ex, gold.replace("LIMIT 3", "LIMIT 2")) == 0.0
    assert task.check(ex, gold.replace("DESC", "ASC") if "DESC" in gold else gold.replace("ASC", "DESC")) == 0.0
    assert task.check(ex, "I cannot answer that.") == 0.0
    assert task.check(ex, "```sql\nDROP TABLE players\n```") == 0.0
    unordered = next(e for e in task.eval_examples() if "GROUP BY" in e.reference and "ORDER" not in e.reference)
    # the same rows in another order still match an unordered gold query
    assert task.check(unordered, unordered.reference + " ORDER BY 2 DESC, 1") == 1.0


def test_databases_are_rebuilt_byte_for_byte(tmp_path):
    runpy.run_path(str(DATA_DIR / "build.py"), run_name="build")["main"](tmp_path)
    for shipped in [DATA_DIR / "questions.jsonl", *sorted(DATA_DIR.glob("*.sqlite"))]:
        rebuilt = tmp_path / shipped.name
        assert hashlib.sha256(rebuilt.read_bytes()).digest() == hashlib.sha256(shipped.read_bytes()).digest(), shipped


def test_shipped_databases_stay_unchanged_by_scoring(task):
    before = {p.name: p.read_bytes() for p in DATA_DIR.glob("*.sqlite")}
    prompts = task.train_prompts(8)
    groups = [[Candidate(p.id, i, t, [], [], []) for i, t in enumerate(
        ["```sql\nSELECT 1\n```", "DELETE FROM customers", "```sql\nSELECT count(*) FROM sqlite_master\n```"])]
        for p in prompts]
    out = score_groups(SqlExecScorer(), prompts, groups)
    assert all(len(g) == 3 for g in out)
    assert {p.name: p.read_bytes() for p in DATA_DIR.glob("*.sqlite")} == before


def test_bad_data_dir_is_reported(tmp_path):
    with pytest.raises(TaoInputError, match="questions.jsonl not found"):
        SqlTask(data_dir=tmp_path)
    (tmp_path / "questions.jsonl").write_text(json.dumps({"db": "x", "split": "train", "question": "q",
                                                          "gold_sql": "SELECT 1"}) + "\n")
    with pytest.raises(TaoInputError, match=r"questions.jsonl:1: database x.sqlite not in"):
        SqlTask(data_dir=tmp_path)
    sqlite3.connect(tmp_path / "x.sqlite").close()
    with open(tmp_path / "questions.jsonl", "a") as f:
        f.write(json.dumps({"db": "x", "split": "eval", "question": "q", "gold_sql": "SELECT 1"}) + "\n")
    with pytest.raises(TaoInputError, match="in both splits"):
        SqlTask(data_dir=tmp_path)


@pytest.mark.real_model
def test_embedded_model_answers_are_scored(task):
    from tao_core.sampler import sampler_for
    from tao_core.types import SamplingParams

    lm = tao_core.load_model("smollm2-135m")
    ex = task.eval_examples(1)[0]
    [group] = sampler_for(lm).sample([ex.prompt], SamplingParams(n=3, temperature=1.0, max_new_tokens=48, seed=0))
    [scores] = score_groups(SqlExecScorer(), [ex.prompt], [group])
    assert len(scores) == 3 and all(s.prompt_id == ex.prompt.id and s.scorer == "sql-exec" for s in scores)
    assert all(s.status in ("ok", "abstain") and (s.status != "ok" or s.value in (0.0, 0.1, 1.0)) for s in scores)
    assert all(task.check(ex, c.text) in (0.0, 1.0) for c in group)


def test_a_data_dir_given_to_the_task_is_allowed_for_sql_exec(tmp_path):
    """The scorer reads a database under the task's data_dir, and nothing else outside its allowed dirs."""
    data = tmp_path / "my-sql"
    shutil.copytree(DATA_DIR, data, ignore=shutil.ignore_patterns("build.py", "__pycache__"))
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(data, elsewhere)
    scorer = SqlExecScorer(mode="executes")
    outside = Prompt(id="x", text="q", metadata={"db_path": str(elsewhere / "retail.sqlite")})
    [[denied]] = score_groups(scorer, [outside], [[Candidate("x", 0, "SELECT 1", [], [], [])]])
    assert denied.status == "error" and "outside the allowed directories" in denied.reason
    task = SqlTask(data_dir=data)
    prompt = task.train_prompts(1)[0]
    assert prompt.metadata["db_path"].startswith(str(data.resolve()))
    [[ok]] = score_groups(scorer, [prompt], [[Candidate(prompt.id, 0, "SELECT 1", [], [], [])]])
    assert ok.status == "ok" and ok.value == 1.0
