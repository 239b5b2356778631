"""The TAO pipeline on a tiny model: artifacts, config errors, kill + resume bit for bit, guards, report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tao_core.config import RunConfig, from_dict, load_config
from tao_core.errors import TaoInputError
from tests.test_plugins import _fake_dist

# A scorer with a learnable, varied signal on a random model: reward the letter "e".
SCORER_PLUGIN = """
import tao_core
from tao_core import Score

class LetterScorer:
    name = "test-letter"
    version = "1"
    def __init__(self, letter="e"):
        self.letter = letter
    def score(self, prompt, candidates):
        return [Score.ok(c.text.count(self.letter) / (1 + len(c.text)), scorer=self.name) for c in candidates]

class BrevityScorer:
    name = "test-brevity"
    version = "1"
    def score(self, prompt, candidates):
        return [Score.ok(-float(len(c.token_ids)), scorer=self.name) for c in candidates]

@tao_core.hookimpl
def tao_register_scorers(register):
    register("test-letter", LetterScorer)
    register("test-brevity", BrevityScorer)
"""


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline-plugin")
    _fake_dist(root, "tao-test-scorers", "test-scorers", "tao_test_scorers", SCORER_PLUGIN)
    return root


def _config(path: Path, model: Path, out: Path, **extra: str) -> Path:
    body = textwrap.dedent(f"""
        task = "arithmetic"
        model = "{model}"
        output_dir = "{out}"
        rounds = 2
        steps_per_round = 2
        prompts_per_step = 2
        eval_limit = 4
        checkpoint_every = 1
        seed = 3

        [generate]
        n = 4
        max_new_tokens = 6

        [score]
        scorer = "test-letter"

        [train]
        lr = 3e-3
    """)
    for k, v in extra.items():
        body += f"\n{k} = {v}\n"
    path.write_text(body)
    return path


def _tao(args: list[str], plugin_path: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(plugin_path), "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tao_core.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def test_config_errors_name_the_key(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run")
    cfg.write_text(cfg.read_text() + "\n[train2]\nlr = 1\n")
    with pytest.raises(TaoInputError, match="unknown config key 'train2'"):
        load_config(cfg)
    cfg = _config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run")
    with pytest.raises(TaoInputError, match=r"'train.lr' must be .*float.*got 'fast'"):
        load_config(cfg, {"train.lr": "fast"})
    with pytest.raises(TaoInputError, match="unknown config key 'generate.temp'; accepted here: .*temperature"):
        load_config(cfg, {"generate.temp": 0.5})
    with pytest.raises(TaoInputError, match="score.scorer = 'no-such' is not a registered scorer"):
        load_config(cfg, {"score.scorer": "no-such"})
    with pytest.raises(TaoInputError, match="train.objective = 'ppo2'"):
        load_config(cfg, {"train.objective": "ppo2"})
    assert from_dict(RunConfig, {"train": {"betas": [0.9, 0.95]}}).train.betas == (0.9, 0.95)


def test_kill_and_resume_is_bit_identical(tmp_path, tiny_model_dir, plugin_path):
    full = _config(tmp_path / "full.toml", tiny_model_dir, tmp_path / "full")
    _finish(_tao(["run", str(full)], plugin_path))

    killed = _config(tmp_path / "killed.toml", tiny_model_dir, tmp_path / "killed")
    proc = _tao(["run", str(killed)], plugin_path)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill mid-run, right after step 3's scores hit the disk
        if (tmp_path / "killed" / "steps" / "step-00002" / "scores.jsonl").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    step0 = tmp_path / "killed" / "steps" / "step-00000" / "candidates.jsonl"
    mtime = step0.stat().st_mtime_ns
    out = _finish(_tao(["run", "--resume", str(tmp_path / "killed")], plugin_path))
    assert "held-out accuracy after" in out
    assert step0.stat().st_mtime_ns == mtime  # finished generation is never repeated

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a), "resumed weights differ from the uninterrupted run"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "step"] == [1, 2, 3, 4]
    for d in ("full", "killed"):
        assert (tmp_path / d / "rounds" / "round-001" / "model" / "config.json").exists()
    # the round models are plain Hugging Face directories
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "rounds" / "round-002" / "model"))
    changed = any(not (a[k] == base[k]).all() for k in a if k in base)
    rolled_back = all(r["rolled_back"] for r in rows if r["type"] == "round")
    assert changed or rolled_back


def test_guard_catches_length_collapse(tmp_path, tiny_model_dir, plugin_path):
    """Rewarding brevity with a large learning rate collapses the outputs; the guard stops the run."""
    cfg = _config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run")
    text = cfg.read_text().replace('scorer = "test-letter"', 'scorer = "test-brevity"')
    text = text.replace("lr = 3e-3", "lr = 3e-2").replace("steps_per_round = 2", "steps_per_round = 6")
    text = text.replace("max_new_tokens = 6", "max_new_tokens = 16")
    cfg.write_text(text + "\n[guard]\nstop_on_collapse = true\nmin_length_ratio = 0.5\n")
    out = _finish(_tao(["run", str(cfg)], plugin_path))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    warnings = [r for r in rows if r["type"] == "warning"]
    assert warnings and warnings[0]["kind"] == "length_collapse", rows
    steps = [r["step"] for r in rows if r["type"] == "step"]
    assert max(steps) < 12, "the run went on after the guard fired"
    assert "warning:" in out
    report = _finish(_tao(["report", str(tmp_path / "run")], plugin_path))
    assert "report.md" in report
    md = (tmp_path / "run" / "report.md").read_text()
    assert "length_collapse" in md and "plots/reward_kl.png" in md
    for png in ("reward_kl.png", "stage_times.png", "heldout.png", "tokens_per_s.png", "gain_per_hour.png"):
        assert (tmp_path / "run" / "plots" / png).stat().st_size > 1000
    assert "<table>" in (tmp_path / "run" / "report.html").read_text()


def test_run_refuses_to_overwrite(tmp_path, tiny_model_dir):
    from tao_core import pipeline

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    cfg = load_config(_config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run"), {"score.scorer": None})
    with pytest.raises(TaoInputError, match="not empty and is not a tao directory"):
        pipeline.run(cfg)


def test_the_sampler_backend_is_declared_in_the_config(tmp_path, tiny_model_dir):
    from tao_core.config import SAMPLERS
    from tao_core.models import SAMPLER_BACKENDS
    from tao_core.pipeline import Pipeline
    from tao_core.sampler import HFSampler, sampler_for

    assert SAMPLERS == SAMPLER_BACKENDS
    cfg = load_config(_config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run"),
                      {"score.scorer": None, "generate.sampler": "hf"})
    pipe = Pipeline(cfg)
    try:
        assert pipe.lm.sampler_backend == "hf" and isinstance(sampler_for(pipe.lm), HFSampler)
    finally:
        pipe.dir.release()
    with pytest.raises(TaoInputError, match="generate.sampler must be one of 'auto', 'engine', 'hf'"):
        load_config(_config(tmp_path / "d.toml", tiny_model_dir, tmp_path / "run2"), {"generate.sampler": "vllm"})


def test_a_run_takes_its_objective_from_the_config_or_the_task(tmp_path, tiny_model_dir):
    from tao_core import pipeline
    from tao_core.plugins import get_plugin_manager
    from tests.test_sft import _UnlabeledTasks

    pm = get_plugin_manager()
    name = pm.register(_UnlabeledTasks(), name="test-unlabeled-task-objective")
    try:
        cfg = load_config(_config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run"),
                          {"task": "unlabeled-test", "score.scorer": None})
        with pytest.raises(TaoInputError, match="train.objective is not set and task 'unlabeled-test' names no default_objective"):
            pipeline.Pipeline(cfg)
    finally:
        pm.unregister(name)
    assert not (tmp_path / "run").exists()
