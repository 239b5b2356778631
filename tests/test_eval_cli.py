"""``tao eval``: the fixed evaluation protocol through the CLI, on a tiny random model."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tao_plugins.commands import run_eval

import tao_core
from tao_core.cli import cli
from tao_core.plugins import get_plugin_manager
from tao_core.tasks import EvalExample, wilson_interval
from tao_core.types import Prompt


class EvenTask:
    """Examples with an even index count as correct whatever the model says; records what it saw."""

    name = "even-test"
    metric = "accuracy"
    default_generator = "sample"
    default_scorer = "majority-vote"
    max_new_tokens = 4

    last_options: dict = {}  # the options the latest instance was built with

    def __init__(self, size: int = 5, tags: dict | None = None) -> None:
        self.size = size
        self.seen: list[str] = []
        EvenTask.last_options = {"size": size, "tags": tags}

    def train_prompts(self, limit=None):
        return [Prompt(id=f"t{i}", text=f"train {i}") for i in range(limit or 3)]

    def eval_examples(self, limit=None):
        n = self.size if limit is None else min(limit, self.size)
        return [EvalExample(Prompt(id=f"e{i}", text=f"What is {i} plus 1?"), i % 2 == 0) for i in range(n)]

    def check(self, example, completion):
        assert isinstance(completion, str)
        return float(example.reference)


class _TestTasks:
    @tao_core.hookimpl
    def tao_register_tasks(self, register):
        register("even-test", EvenTask)


@pytest.fixture
def even_task():
    pm = get_plugin_manager()
    name = pm.register(_TestTasks(), name="test-even-task")
    yield
    pm.unregister(name)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_builtin_commands_are_registered():
    result = invoke("eval", "--help")
    assert result.exit_code == 0
    assert "--task" in result.output and "--limit" in result.output and "--json" in result.output
    result = invoke("rm", "--help")
    assert result.exit_code == 0 and "train" in result.output


def test_eval_json_reports_metric_with_wilson_ci(even_task, tiny_model_dir, tmp_path):
    out = tmp_path / "per_example.jsonl"
    result = invoke("eval", "--task", "even-test", "--model", str(tiny_model_dir), "--json", "-o", str(out))
    assert result.exit_code == 0, result.output
    got = json.loads(result.output.strip().splitlines()[-1])
    lo, hi = wilson_interval(3, 5)
    assert got["task"] == "even-test" and got["metric"] == "accuracy" and got["n"] == 5
    assert got["value"] == pytest.approx(0.6)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((lo, hi))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [f"e{i}" for i in range(5)]
    assert [r["value"] for r in rows] == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_eval_limit_and_options_and_text_output(even_task, tiny_model_dir):
    result = invoke("eval", "--task", "even-test", "--model", str(tiny_model_dir), "--limit", "2",
                    "--option", "size=9")
    assert result.exit_code == 0, result.output
    assert "even-test accuracy 0.500" in result.output and "n=2" in result.output


def test_eval_real_task_on_tiny_model_is_greedy_and_deterministic(tiny_lm):
    a = run_eval("arithmetic", tiny_lm, limit=3)
    b = run_eval("arithmetic", tiny_lm, limit=3)
    assert a.n == 3 and 0.0 <= a.value <= 1.0 and a.ci_low <= a.value <= a.ci_high
    assert [r["completion"] for r in a.per_example] == [r["completion"] for r in b.per_example]
    assert [r["prompt_id"] for r in a.per_example] == [f"arithmetic-add2-eval-{i}" for i in range(3)]


def test_eval_errors_name_the_problem(even_task, tiny_model_dir):
    r = CliRunner().invoke(cli, ["eval", "--task", "no-such-task", "--model", str(tiny_model_dir)])
    assert r.exit_code == 2 and "unknown task 'no-such-task'" in r.output
    r = CliRunner().invoke(cli, ["eval", "--task", "even-test", "--model", str(tiny_model_dir), "--option", "size"])
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = CliRunner().invoke(cli, ["eval", "--task", "even-test", "--model", str(tiny_model_dir), "--option", "colour=3"])
    assert r.exit_code == 2 and "bad option" in r.output
    r = CliRunner().invoke(cli, ["eval", "--task", "even-test", "--model", str(tiny_model_dir), "--limit", "0"])
    assert r.exit_code == 2 and "--limit" in r.output


def test_eval_options_are_toml_and_old_json_is_deprecated(even_task, tiny_model_dir):
    base = ["eval", "--task", "even-test", "--model", str(tiny_model_dir), "--limit", "1"]
    r = CliRunner().invoke(cli, [*base, "--option", "size=3", "--option", 'tags={level = "mul2", n = [1, 2]}'])
    assert r.exit_code == 0, r.output
    assert EvenTask.last_options == {"size": 3, "tags": {"level": "mul2", "n": [1, 2]}}
    assert "deprecated" not in r.output
    r = CliRunner().invoke(cli, [*base, "--option", 'tags={"level": "mul2", "n": [1, 2]}'])
    assert r.exit_code == 0, r.output
    assert EvenTask.last_options == {"size": 5, "tags": {"level": "mul2", "n": [1, 2]}}
    assert 'JSON values are deprecated' in r.output and 'write tags={level = "mul2", n = [1, 2]}' in r.output


@pytest.mark.real_model
def test_eval_arithmetic_on_the_embedded_model():
    result = invoke("eval", "--task", "arithmetic", "--model", "smollm2-135m", "--limit", "4", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output.strip().splitlines()[-1])
    assert got["n"] == 4 and got["task"] == "arithmetic" and 0.0 <= got["ci_low"] <= got["value"] <= got["ci_high"]
