"""SIGKILL at fixed points inside every stage of ``tao run``: each resume ends bit for bit where an
uninterrupted run ends.

The points are :func:`tao_core.fsio.fault_point` names (and written files' names, for a write torn
in half) that ``TAO_FAULT=NAME[:K]`` turns into a ``SIGKILL`` of the K-th arrival. The default test
chains them: one run directory is killed at every point in turn, each process resuming what the
previous one left, then a last resume finishes it. The slow matrix (`pytest -m slow
tests/test_faults.py`) kills a fresh run at each point alone and resumes it once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_pipeline import SCORER_PLUGIN, _config
from tests.test_plugins import _fake_dist

# (TAO_FAULT value, where it strikes), in the order a run reaches them, so each process of the
# chain gets past the previous point. Runs have 2 rounds x 2 steps, a checkpoint every step and an
# evaluation at each round's end.
POINTS = [
    ("eval.before:1", "the baseline evaluation, before any checkpoint"),
    ("generate.before:1", "stage 1, before sampling"),
    ("candidates.jsonl:1", "stage 1, candidates file torn half-written"),
    ("generate.after:1", "stage 1 done, nothing scored"),
    ("score.before:1", "stage 2, before scoring"),
    ("scores.jsonl:1", "stage 2, scores file torn half-written"),
    ("score.after:1", "stage 2 done, not trained"),
    ("train.before:1", "stage 3, before the optimizer step"),
    ("train.after:1", "stage 3 done, step not logged"),
    ("metrics.jsonl:1", "a metrics line torn half-written"),
    ("checkpoint.before:1", "before the checkpoint"),
    ("trainable.safetensors:1", "a checkpoint's weights torn half-written"),
    ("checkpoint.before-manifest:1", "between a checkpoint's files and its manifest"),
    ("manifest.json:1", "a manifest torn half-written"),
    ("checkpoint.before-rename:1", "a complete checkpoint not yet renamed into place"),
    ("checkpoint.before-latest:1", "a checkpoint in place, latest not yet updated"),
    ("latest:1", "the latest pointer torn half-written"),
    ("eval.after:1", "a round's evaluation done, not logged"),
    ("best.after:1", "the best weights saved, round not finished"),
    ("round.after-model:1", "a round's model written, round not logged"),
    ("final.before:1", "all steps done, final model not written"),
    ("final.after:1", "final model in place, last metrics line not written"),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("faults")
    _fake_dist(root / "plugin", "tao-test-scorers", "test-scorers", "tao_test_scorers", SCORER_PLUGIN)
    env = {**os.environ, "PYTHONPATH": str(root / "plugin"), "TQDM_DISABLE": "1"}
    env.pop("TAO_FAULT", None)
    ref = _config(root / "ref.toml", tiny_model_dir, root / "ref")
    _tao(["run", str(ref)], env)
    return {"root": root, "env": env, "model": tiny_model_dir, "final": _weights(root / "ref")}


def _tao(args: list[str], env: dict, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**env, "TAO_FAULT": fault} if fault else env
    proc = subprocess.run([sys.executable, "-m", "tao_core.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    if fault:
        assert proc.returncode == -signal.SIGKILL, f"{fault} was never reached:\n{proc.stderr[-2000:]}"
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _weights(run: Path) -> dict:
    return load_file(str(run / "final" / "model.safetensors"))


def _check_finished(run: Path, expected: dict) -> None:
    got = _weights(run)
    assert got.keys() == expected.keys()
    assert all((got[k] == expected[k]).all() for k in got), "resumed weights differ from the uninterrupted run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "step"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [0, 2, 4]
    assert [r["type"] for r in rows].count("final") == 1


def test_kill_at_every_point_in_one_chain_then_resume(setup):
    run = setup["root"] / "chain"
    cfg = _config(setup["root"] / "chain.toml", setup["model"], run)
    _tao(["run", str(cfg)], setup["env"], fault=POINTS[0][0])
    for fault, _ in POINTS[1:]:
        _tao(["run", "--resume", str(run)], setup["env"], fault=fault)
    _tao(["run", "--resume", str(run)], setup["env"])
    _check_finished(run, setup["final"])


@pytest.mark.slow
@pytest.mark.parametrize("fault", [f for f, _ in POINTS])
def test_kill_at_one_point_then_resume(setup, fault):
    run = setup["root"] / fault.replace(":", "-")
    cfg = _config(setup["root"] / f"{run.name}.toml", setup["model"], run)
    _tao(["run", str(cfg)], setup["env"], fault=fault)
    _tao(["run", "--resume", str(run)], setup["env"])
    _check_finished(run, setup["final"])
