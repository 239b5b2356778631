"""Multi-task runs through the tools around the pipeline: teacher voters in a mixture's config,
``tao eval`` and ``tao sft`` per task, the report's per-task columns and ``tao run``'s summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tao_plugins.commands import run_eval
from tao_plugins.tasks.arithmetic import evaluate_expression

from tao_core.cli import cli
from tao_core.config import RunConfig, from_dict, validate, weight_set_routes
from tao_core.errors import TaoInputError
from tao_core.types import Candidate

EXAMPLE = Path(__file__).parents[1] / "examples" / "configs" / "multi-task.toml"
ROUTED = {"templates": ["default", "steps"], "template_weight_sets": {"steps": "teacher"}}


def _mixture_cfg(voters: str, generator_options: dict | None) -> RunConfig:
    arithmetic = {"name": "arithmetic", "generator": "diverse", "scorer": "majority-vote",
                  **({"generator_options": generator_options} if generator_options is not None else {})}
    return from_dict(RunConfig, {"task": "mixture", "output_dir": "unused-run-dir", "generate": {"voters": voters},
                                 "task_options": {"tasks": [{"name": "instructions"}, arithmetic]}})


def _lines(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("type") == kind]


# -- teacher voters in a mixture -------------------------------------------------------------------

def test_teacher_voters_in_a_mixture_need_an_entry_routing_templates_to_the_teacher():
    cfg = _mixture_cfg("ema", ROUTED)
    validate(cfg)
    assert weight_set_routes(cfg) == {"task_options.tasks[1].generator_options.template_weight_sets": {"steps": "teacher"}}
    validate(_mixture_cfg("frozen", ROUTED))
    for options in (None, {"templates": ["default", "steps"]}, {**ROUTED, "template_weight_sets": {}}):
        with pytest.raises(TaoInputError) as e:
            validate(_mixture_cfg("ema", options))
        assert "generate.voters = 'ema' keeps a teacher copy" in str(e.value)
        assert "generate.options.template_weight_sets" in str(e.value)
        assert "generator_options.template_weight_sets of a task_options.tasks entry" in str(e.value)
    with pytest.raises(TaoInputError, match=r"task_options.tasks\[1\].generator_options.template_weight_sets "
                                            r"\{'steps': 'teacher'\} routes templates to weight sets, but "
                                            r"generate.voters = 'policy' makes none"):
        validate(_mixture_cfg("policy", ROUTED))
    validate(_mixture_cfg("policy", {"templates": ["default", "steps"]}))


@pytest.mark.parametrize("weight_set, warned", [("teacher", False), ("drafts", True)])
def test_the_pipeline_warns_when_no_mixture_entry_routes_a_template_to_the_teacher(
        weight_set, warned, tmp_path, tiny_model_dir, capsys):
    from tao_core.pipeline import Pipeline

    cfg = _mixture_cfg("ema", {**ROUTED, "template_weight_sets": {"steps": weight_set}})
    cfg.model, cfg.output_dir = str(tiny_model_dir), str(tmp_path / "run")
    pipe = Pipeline(cfg, progress=False)
    pipe.dir.release()
    assert pipe.teacher is not None
    said = capsys.readouterr().out
    assert ("warning: generate.voters = 'ema' but no generator template samples with the 'teacher' weights (none "
            "of task_options.tasks[1].generator_options.template_weight_sets names it)" in said) is warned


def test_the_example_config_samples_arithmetic_voters_with_an_ema_teacher():
    from tao_core.config import load_config

    cfg = load_config(EXAMPLE)
    assert (cfg.generate.voters, cfg.generate.ema_rate, cfg.score.gate) == ("ema", 0.95, [0.625, 1.0])
    assert (cfg.train.off_policy, cfg.train.is_level, cfg.train.is_cap) == ("importance", "token", 2.0)
    assert weight_set_routes(cfg) == {
        "task_options.tasks[0].generator_options.template_weight_sets": {"tens": "teacher", "column": "teacher"}}


def test_the_example_config_runs_a_step_and_prints_and_reports_each_task(tmp_path, tiny_model_dir):
    """One step of examples/configs/multi-task.toml on a tiny model: the arithmetic voters sample with
    the EMA teacher, `tao run` prints each task's before and after, `tao report` a column per task."""
    out = tmp_path / "run"
    sets = {"model": f'"{tiny_model_dir}"', "seed": 1, "rounds": 1, "steps_per_round": 1, "prompts_per_step": 3,
            "eval_limit": 2, "checkpoint_every": 1, "threads": 1, "generate.n": 6, "generate.max_new_tokens": 4,
            "guard.eval_every": 0}
    args = ["run", str(EXAMPLE), "--output-dir", str(out)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    result = CliRunner().invoke(cli, args, catch_exceptions=False, env={"TQDM_DISABLE": "1"})
    assert result.exit_code == 0, result.output
    assert "no generator template samples with" not in result.output
    (final,) = _lines(out, "final")
    for name, r in final["tasks"].items():
        metric = _lines(out, "eval")[0]["tasks"][name]["metric"]
        assert f"  {name} {metric}: {r['before']:.3f} -> {r['after']:.3f} ({r['after'] - r['before']:+.3f}, n=2)" \
            in result.output
    assert set(final["tasks"]) == {"arithmetic", "sql", "instructions"}
    prompts = [json.loads(line) for f in out.glob("steps/*/prompts.jsonl") for line in f.read_text().splitlines()]
    assert sorted(p["task"] for p in prompts) == ["arithmetic", "instructions", "sql"]  # seed 1's first step
    candidates = [json.loads(line) for f in out.glob("steps/*/candidates.jsonl") for line in f.read_text().splitlines()]
    voters = [c for c in candidates if c.get("template") in ("tens", "column")]
    assert voters and all(c["metadata"].get("weight_set") == "teacher" for c in voters)
    (step,) = _lines(out, "step")
    assert any("ratio" in k for k in step) and "gate_groups" in step

    result = CliRunner().invoke(cli, ["report", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    at = lines.index("| step | round | value | 95% CI | n | arithmetic accuracy | sql execution_accuracy | "
                     "instructions strict_accuracy |")
    evals = _lines(out, "eval")
    assert len(evals) == 2 and lines[at + 1] == "|---|---|---|---|---|---|---|---|"
    for line, e in zip(lines[at + 2:at + 4], evals, strict=True):
        assert line == (f"| {e['step']} | {e['round']} | {e['value']:.3f} | [{e['ci_low']:.3f}, {e['ci_high']:.3f}] | "
                        f"{e['n']} |" + "".join(f" {e['tasks'][t]['value']:.3f} (2) |"
                                                 for t in ("arithmetic", "sql", "instructions")))


# -- tao eval and tao sft per task -----------------------------------------------------------------

class _Oracle:
    """A sampler answering arithmetic right and anything else wrong; records each call's budget by task."""

    def __init__(self):
        self.budgets: dict[str, set[int]] = {}

    def sample(self, prompts, params):
        out = []
        for i, p in enumerate(prompts):
            self.budgets.setdefault(p.task, set()).add(params.max_new_tokens)
            text = f"Answer: {evaluate_expression(p.metadata['expression'])}" if p.task == "arithmetic" else "no"
            out.append([Candidate(p.id, i, text, [1], [2], [-0.5], finish_reason="stop")])
        return out


MIX = 'tasks=[{name = "arithmetic", max_new_tokens = 7}, {name = "instructions"}]'


@pytest.fixture
def oracle(monkeypatch):
    import tao_core.sampler
    import tao_core.sft

    sampler = _Oracle()
    monkeypatch.setattr(tao_core.sampler, "sampler_for", lambda lm: sampler)
    monkeypatch.setattr(tao_core.sft, "sampler_for", lambda lm: sampler)
    return sampler


def test_tao_eval_reports_each_task_at_its_own_budget_and_the_mean(oracle, tiny_model_dir, tmp_path):
    per_example = tmp_path / "rows.jsonl"
    result = CliRunner().invoke(cli, ["eval", "--task", "mixture", "--model", str(tiny_model_dir), "--option", MIX,
                                      "--limit", "3", "--json", "-o", str(per_example)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = json.loads(result.output.strip().splitlines()[-1])
    assert (got["task"], got["metric"], got["value"], got["n"]) == ("mixture", "task_mean", 0.5, 6)
    assert {t: (r["metric"], r["value"], r["n"]) for t, r in got["tasks"].items()} == {
        "arithmetic": ("accuracy", 1.0, 3), "instructions": ("strict_accuracy", 0.0, 3)}
    # each task decoded at its own task's budget (the task's evaluation budget, as the pipeline's evaluation)
    from tao_core.plugins import get_component

    assert oracle.budgets == {name: {get_component("tasks", name)().max_new_tokens}
                              for name in ("arithmetic", "instructions")}
    rows = [json.loads(line) for line in per_example.read_text().splitlines()]
    assert [r["task"] for r in rows] == ["arithmetic"] * 3 + ["instructions"] * 3
    text = CliRunner().invoke(cli, ["eval", "--task", "mixture", "--model", str(tiny_model_dir), "--option", MIX,
                                    "--limit", "2"], catch_exceptions=False).output
    assert "mixture task_mean 0.500" in text and "n=4" in text
    assert "  arithmetic accuracy 1.000" in text and "  instructions strict_accuracy 0.000" in text


def test_run_eval_of_a_plain_task_is_the_tasks_evaluation(oracle, tiny_lm):
    from tao_core.plugins import get_component
    from tao_core.tasks import evaluate

    got = run_eval("arithmetic", tiny_lm, limit=4)
    task = get_component("tasks", "arithmetic")()
    want = evaluate(task, _Oracle(), task.eval_examples(4))
    assert got.to_dict() == want.to_dict() == {**want.to_dict(), "value": 1.0, "n": 4}


def test_tao_sft_on_a_mixture_logs_each_task(oracle, tiny_model_dir, tmp_path):
    from tao_core.api import sft

    toml = tmp_path / "sft.toml"
    toml.write_text(f'task = "mixture"\nmodel = "{tiny_model_dir}"\noutput_dir = "{tmp_path / "unused"}"\n'
                    "rounds = 1\nsteps_per_round = 2\nprompts_per_step = 2\neval_limit = 2\nthreads = 1\n"
                    '[[task_options.tasks]]\nname = "arithmetic"\n[[task_options.tasks]]\nname = "sql"\n'
                    "[train]\nlr = 3e-3\n")
    result = sft(str(toml), output_dir=str(tmp_path / "sft"))
    evals = _lines(tmp_path / "sft", "eval")
    assert [e["epoch"] for e in evals] == [0, 1]
    for e in evals:
        assert (e["metric"], e["value"], e["n"]) == ("task_mean", 0.5, 4)
        assert {t: (r["value"], r["n"]) for t, r in e["tasks"].items()} == {"arithmetic": (1.0, 2), "sql": (0.0, 2)}
    assert set(oracle.budgets) == {"arithmetic", "sql"} and all(len(b) == 1 for b in oracle.budgets.values())
    assert oracle.budgets["arithmetic"] != oracle.budgets["sql"]
    (final,) = _lines(tmp_path / "sft", "final")
    assert final["tasks"] == {"arithmetic": {"before": 1.0, "after": 1.0}, "sql": {"before": 0.0, "after": 0.0}}
    assert result.before["tasks"]["sql"]["n"] == 2 and result.after["value"] == 0.5
