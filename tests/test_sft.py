"""``tao sft`` on a tiny model: labeled references, NLL going down, the run directory, errors, and
the report's quality-vs-compute table and TAO-vs-SFT section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tao_core
from tao_core.api import sft
from tao_core.cli import cli
from tao_core.config import RunConfig, from_dict
from tao_core.errors import TaoInputError
from tao_core.pipeline import step_prompts
from tao_core.plugins import get_component, get_plugin_manager
from tao_core.tasks import EvalExample
from tao_core.types import Prompt


def _cfg(model: Path, out: Path, **extra) -> RunConfig:
    data = {"task": "arithmetic", "model": str(model), "output_dir": str(out), "rounds": 2, "steps_per_round": 2,
            "prompts_per_step": 3, "eval_limit": 3, "seed": 5, "threads": 1, "train": {"lr": 3e-3}}
    return from_dict(RunConfig, {**data, **extra})


def _toml(path: Path, model: Path, out: Path, task: str = "arithmetic") -> Path:
    path.write_text(f'task = "{task}"\nmodel = "{model}"\noutput_dir = "{out}"\nrounds = 1\nsteps_per_round = 2\n'
                    "prompts_per_step = 2\neval_limit = 2\nthreads = 1\n\n[train]\nlr = 3e-3\n")
    return path


def test_arithmetic_reference_is_the_answer_line_the_check_accepts():
    task = get_component("tasks", "arithmetic")()
    for p in task.train_prompts(20):
        ref = task.reference(p)
        answer = sum(int(x) for x in p.metadata["expression"].split(" + "))  # add2: "a + b"
        assert ref == f"Answer: {answer}"
        assert task.check(EvalExample(p, answer), ref) == 1.0
    assert task.reference(Prompt(id="from-a-file", text="What is 2 plus 2?")) is None


def test_sql_reference_is_the_gold_query_for_training_prompts_only():
    task = get_component("tasks", "sql")()
    prompts = task.train_prompts(6)
    for p in prompts:
        ref = task.reference(p)
        assert ref.startswith("```sql\n") and ref.endswith("\n```")
        gold = next(r["gold_sql"] for r in task.records if r["split"] == "train" and r["question"] in p.text)
        assert task.check(EvalExample(p, gold, {"db_path": p.metadata["db_path"]}), ref) == 1.0
    assert all(task.reference(e.prompt) is None for e in task.eval_examples(5))


def test_instructions_task_has_no_labels():
    task = get_component("tasks", "instructions")()
    assert task.reference(task.train_prompts(1)[0]) is None


def test_sft_lowers_nll_and_writes_a_loadable_run(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from tao_core import sft as sft_mod
    from tao_core.models import load_model

    cfg = _cfg(tiny_model_dir, tmp_path / "run")
    result = sft(cfg, epochs=3, progress=False, output_dir=str(tmp_path / "run"))
    assert result.examples == 2 * 2 * 3  # rounds x steps_per_round x prompts_per_step
    assert result.steps == 3 * 4  # 12 examples in batches of 3, three epochs
    nll = [e["train_nll"] for e in result.evals]
    assert len(nll) == 4 and nll[-1] < nll[0] - 0.5, nll
    # the examples are the prompts the TAO run of the same config trains on, in its order
    task = get_component("tasks", "arithmetic")()
    tao_ids = [p.id for s in range(4) for p in step_prompts(task.train_prompts(), 5, s, 3)]
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "sft" and config["sft"]["examples"] == 12 and config["task"] == "arithmetic"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["type"] == "step"]
    evals = [r for r in rows if r["type"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in ("loss", "nll", "grad_norm", "tokens", "lr", "train_s", "tokens_per_s", "epoch", "examples_seen"):
        assert all(key in r for r in steps), key
    assert steps[-1]["examples_seen"] == 36
    for key in ("task", "metric", "value", "ci_low", "ci_high", "n", "step", "epoch"):
        assert all(key in r for r in evals), key
    final = [r for r in rows if r["type"] == "final"]
    assert len(final) == 1 and final[0]["kind"] == "sft" and final[0]["tuning_seconds"] > 0
    # final/ is a Hugging Face directory holding the trained weights
    model = AutoModelForCausalLM.from_pretrained(str(run / "final"))
    lm = load_model(str(run / "final"))
    data = sft_mod.labeled_examples(task, [p for p in task.train_prompts() if p.id in tao_ids], lm)
    assert sft_mod.mean_nll(lm, data) == pytest.approx(nll[-1], rel=1e-4)
    assert model.config.vocab_size == lm.model.config.vocab_size
    assert json.loads((run / "final" / "tao_run.json").read_text())["kind"] == "sft"


def test_sft_with_lora_writes_merged_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, tmp_path / "lora", train={"lora": True, "lora_r": 4, "lr": 3e-3})
    result = sft(cfg, examples=4, epochs=3, progress=False, output_dir=str(tmp_path / "lora"))
    assert result.evals[-1]["train_nll"] < result.evals[0]["train_nll"]
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora" / "final"))
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_sft_bad_input_is_a_clear_error(tmp_path, tiny_model_dir):
    cfg = _cfg(tiny_model_dir, tmp_path / "a")
    with pytest.raises(TaoInputError, match="examples must be an integer >= 1, got 0"):
        sft(cfg, examples=0, progress=False)
    with pytest.raises(TaoInputError, match="epochs must be an integer >= 1, got -1"):
        sft(cfg, epochs=-1, progress=False)
    with pytest.raises(TaoInputError, match="examples = 5000, but task 'arithmetic' gives 1024 training prompts"):
        sft(cfg, examples=5000, progress=False)
    with pytest.raises(TaoInputError, match="task 'instructions' has no labeled response for training prompt"):
        sft(_cfg(tiny_model_dir, tmp_path / "b", task="instructions"), progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(TaoInputError, match="is not empty"):
        sft(cfg, output_dir=str(tmp_path / "full"), progress=False)


class _UnlabeledTasks:
    """Registers a task written before Task.reference existed: training prompts, no reference()."""

    @tao_core.hookimpl
    def tao_register_tasks(self, register):
        class Unlabeled:
            name = "unlabeled-test"
            metric = "accuracy"
            default_generator = "sample"
            default_scorer = "majority-vote"
            max_new_tokens = 4

            def train_prompts(self, limit=None):
                return [Prompt(id=f"t{i}", text=f"say {i}") for i in range(limit or 20)]

            def eval_examples(self, limit=None):
                return []

            def check(self, example, completion):
                return 0.0

        register("unlabeled-test", Unlabeled)


def test_sft_refuses_a_task_without_reference(tmp_path, tiny_model_dir):
    pm = get_plugin_manager()
    name = pm.register(_UnlabeledTasks(), name="test-unlabeled-task")
    try:
        with pytest.raises(TaoInputError, match="task 'unlabeled-test' has no reference\\(prompt\\) method"):
            sft(_cfg(tiny_model_dir, tmp_path / "u", task="unlabeled-test"), progress=False)
    finally:
        pm.unregister(name)
    assert not (tmp_path / "u-sft").exists()  # nothing written before the error


def test_sft_cli(tmp_path, tiny_model_dir):
    runner = CliRunner()
    toml = _toml(tmp_path / "c.toml", tiny_model_dir, tmp_path / "tao")
    res = runner.invoke(cli, ["sft", str(toml), "--examples", "0"])
    assert res.exit_code == 2 and "examples must be an integer >= 1" in res.output
    res = runner.invoke(cli, ["sft", str(_toml(tmp_path / "i.toml", tiny_model_dir, tmp_path / "i", "instructions"))])
    assert res.exit_code == 2 and "no labeled response" in res.output
    res = runner.invoke(cli, ["sft", str(_toml(tmp_path / "u.toml", tiny_model_dir, tmp_path / "u", "nope"))])
    assert res.exit_code == 2 and "task = 'nope' is not a registered task" in res.output
    res = runner.invoke(cli, ["sft", str(toml), "--set", "train.lr=bad"])
    assert res.exit_code == 2 and "'train.lr' must be" in res.output
    res = runner.invoke(cli, ["sft", str(toml), "--epochs", "2", "--set", "prompts_per_step=1", "--no-eval-each-epoch"])
    assert res.exit_code == 0, res.output
    assert "labeled examples: 2 x 2 epoch(s), 4 steps" in res.output  # 1 round x 2 steps x 1 prompt
    out = tmp_path / "tao-sft"  # the default: the config's output_dir with -sft appended
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["type"] == "eval"] == [0, 2]
    res = runner.invoke(cli, ["sft", str(toml), "-o", str(tmp_path / "other"), "--examples", "1"])
    assert res.exit_code == 0 and (tmp_path / "other" / "final" / "config.json").exists()


def _fake_tao_run(root: Path) -> None:
    """A TAO run directory's config and metrics: 4 steps of 2 prompts x 3 candidates in 2 rounds."""
    root.mkdir()
    cfg = {"task": "arithmetic", "task_options": {}, "model": "m", "eval_limit": 3, "prompts_per_step": 2,
           "generate": {"n": 3}, "score": {"scorer": "arithmetic-check"}, "train": {"objective": "grpo"}}
    (root / "config.json").write_text(json.dumps(cfg))
    rows = [{"type": "eval", "step": 0, "round": 0, "metric": "accuracy", "value": 0.2, "ci_low": 0.1, "ci_high": 0.4, "n": 3}]
    for s in range(1, 5):
        rows.append({"type": "step", "step": s, "round": (s + 1) // 2, "reward_mean": 0.5, "generate_s": 10.0,
                     "score_s": 1.0, "train_s": 19.0, "tokens_per_s": 5.0, "generate_tokens_per_s": 9.0,
                     "scores_ok": 5, "scores_abstain": 1, "scores_error": 0})
        if s % 2 == 0:
            rows.append({"type": "eval", "step": s, "round": s // 2, "metric": "accuracy", "value": 0.2 + 0.1 * s,
                         "ci_low": 0.1, "ci_high": 0.9, "n": 3})
            rows.append({"type": "round", "step": s, "round": s // 2, "value": 0.2 + 0.1 * s, "promoted": True,
                         "rolled_back": False})
    rows.append({"type": "final", "step": 4, "before": 0.2, "after": 0.6, "tuning_seconds": 120.0})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_quality_vs_compute_and_tao_vs_sft(tmp_path, tiny_model_dir):
    _fake_tao_run(tmp_path / "tao")
    cfg = _cfg(tiny_model_dir, tmp_path / "x")
    sft(cfg, examples=2, epochs=2, progress=False, output_dir=str(tmp_path / "sft"))
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "tao"), "--sft", str(tmp_path / "sft")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "tao" / "report.md").read_text()
    # candidates generated so far = steps x (ok + abstained + errored); minutes = generate + score + train
    assert "| 0 | 0 | 0 | 0.0 | 0.200 [0.100, 0.400] |" in md
    assert "| 2 | 1 | 12 | 1.0 | 0.400 [0.100, 0.900] |" in md
    assert "| 4 | 2 | 24 | 2.0 | 0.600 [0.100, 0.900] |" in md
    assert "## TAO vs SFT" in md
    assert "| TAO (grpo, scorer arithmetic-check) | 0 | 8 unlabeled, 24 candidates | 0.200 [0.100, 0.400] |" in md
    assert "| SFT, 2 labeled x 2 epoch(s) | 2 | 2 labeled x 2 epoch(s) |" in md
    assert "| TAO (grpo, scorer arithmetic-check) | 4 | 2 | 24 | 2.0 | 0.600 [0.100, 0.900] |" in md
    assert "| SFT, 2 labeled x 2 epoch(s) | 2 | 2 | 4 |" in md  # every evaluation, with its compute
    assert "not comparable**: `" in md and "model = `" in md  # the fake run names another model
    for png in ("quality_vs_compute.png", "tao_vs_sft.png", "heldout.png", "stage_times.png"):
        assert (tmp_path / "tao" / "plots" / png).stat().st_size > 1000, png
    assert "plots/tao_vs_sft.png" in (tmp_path / "tao" / "report.html").read_text()
    # an SFT run directory reports on its own: compute is labeled examples seen
    res = CliRunner().invoke(cli, ["report", str(tmp_path / "sft")])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "sft" / "report.md").read_text()
    assert "| step | epoch | labeled examples seen |" in md and "| 1 | 1 | 2 |" in md and "| 2 | 2 | 4 |" in md
    assert "Guard warnings" not in md and "reward_kl.png" not in md and "| step | epoch | value |" in md


def test_sft_step_micro_batches_accumulate_to_one_batch(tiny_model_dir):
    """An SFT step is Trainer.optimize over packed micro-batches weighted by response tokens: split
    under a small micro_batch_tokens it computes the loss and gradient of one micro-batch."""
    from tao_core.models import load_model
    from tao_core.sft import labeled_examples, sft_step
    from tao_core.train import TrainConfig, Trainer

    task = get_component("tasks", "arithmetic")()
    runs = []
    for budget in (4096, 40):
        lm = load_model(str(tiny_model_dir))
        trainer = Trainer(lm, TrainConfig(lr=1e-2, micro_batch_tokens=budget), custom_loss=True)
        record = sft_step(trainer, labeled_examples(task, task.train_prompts(5), lm))
        runs.append((record, {n: p.grad.clone() for n, p in lm.model.named_parameters() if p.grad is not None}))
    (one, g_one), (many, g_many) = runs
    assert one["micro_batches"] == 1 and many["micro_batches"] > 1
    assert one["tokens"] == many["tokens"] and one["sequences"] == many["sequences"] == 5
    assert many["nll"] == pytest.approx(one["nll"], rel=1e-5) and many["loss"] == pytest.approx(one["loss"], rel=1e-5)
    for n, g in g_one.items():
        torch.testing.assert_close(g_many[n], g, rtol=1e-4, atol=1e-6)
