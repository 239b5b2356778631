"""`tao run` under torchrun on the CPU (gloo, loopback): 2 ranks give the 1-process run, a rank's
death is a named error within the timeout, and a 2-rank checkpoint resumes on 1 process.

Tolerance: the two runs sample the same tokens (seeds come from the prompt ids, never the rank) and
train on the same global loss, but not bit for bit: each rank packs only its own groups into
micro-batches, so the matrix shapes (and the float rounding of every matmul) differ, and the
gradient is a sum over ranks added in another order than one process's accumulation. Measured on
this machine: gradient norms agree to 2e-7 relative, final weights to 1.1e-6 relative (norm of the
difference over the norm), losses to 5e-6 relative. The bounds: 1e-5 for gradient norms and
weights; 1e-4 relative (or 1e-8 absolute) for losses, which are small means of nearly cancelling
terms (step 1's, where every ratio is 1, is 2e-9: rounding noise).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_pipeline import _config, plugin_path  # noqa: F401 (a fixture)

RTOL = 1e-5  # gradient norms and final weights
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-8
TIMEOUT_S = 30  # distributed.timeout_s of these runs
# the pipeline test's config, 1 round x 3 steps of 3 prompts (2 ranks serve 2 and 1), 5 held-out examples
CHANGES = {"rounds = 2": "rounds = 1", "steps_per_round = 2": "steps_per_round = 3",
           "prompts_per_step = 2": "prompts_per_step = 3", "eval_limit = 4": "eval_limit = 5",
           "[train]\n": '[train]\nobjective = "ppo_clip_kl"\n'}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(plugins: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(plugins), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TAO_FAULT", "TAO_FAULT_RANK"):
        env.pop(k, None) if k not in extra else None
    return env


def _torchrun(args: list[str], plugins: Path, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "tao_core.cli", *args]
    return subprocess.run(cmd, env=_env(plugins, **env), capture_output=True, text=True, timeout=400)


def _tao(args: list[str], plugins: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tao_core.cli", *args], env=_env(plugins),
                          capture_output=True, text=True, timeout=400)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "step"]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative difference of two weight sets: ||a - b|| / ||a|| over all tensors."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a) ** 0.5
    return diff / sum(float(a[k].double().norm() ** 2) for k in a) ** 0.5


def _final(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir, plugin_path):  # noqa: F811
    """The 1-process reference run (ppo_clip_kl: a batch-wide baseline, token-mean loss, KL to the reference)."""
    root = tmp_path_factory.mktemp("one")
    cfg = _config(root / "c.toml", tiny_model_dir, root / "run")
    text = cfg.read_text()
    for old, new in CHANGES.items():
        assert old in text
        text = text.replace(old, new)
    cfg.write_text(f"{text}\n[distributed]\ntimeout_s = {TIMEOUT_S}\n")
    _ok(_tao(["run", str(cfg)], plugin_path))
    return cfg, root / "run"


def test_two_ranks_equal_one_process(tmp_path, one_process, plugin_path):  # noqa: F811
    cfg, ref = one_process
    out = tmp_path / "two"
    proc = _ok(_torchrun(["run", str(cfg), "--output-dir", str(out)], plugin_path))
    assert proc.stdout.count("run directory:") == 1 and proc.stdout.count("step 3: held-out") == 1  # rank 0 alone prints
    one, two = _steps(ref), _steps(out)
    assert [r["world_size"] for r in one] == [1, 1, 1] and [r["world_size"] for r in two] == [2, 2, 2]
    for a, b in zip(one, two, strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["sequences"] == b["sequences"]  # the same samples
        assert a["tokens"] == b["tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL, abs=LOSS_ATOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=RTOL)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-8)
    assert _close(_final(ref), _final(out)) < RTOL
    evals = [[(r["value"], r["n"]) for r in (json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "eval"] for d in (ref, out)]
    assert evals[0] == evals[1]  # the sharded evaluation gathers every example
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00002", "step-00003"]


def test_a_dead_rank_is_named_and_the_run_resumes_on_one_process(tmp_path, one_process, plugin_path):  # noqa: F811
    cfg, ref = one_process
    out = tmp_path / "killed"
    start = time.monotonic()
    proc = _torchrun(["run", str(cfg), "--output-dir", str(out)], plugin_path,
                     TAO_FAULT="train.before:3", TAO_FAULT_RANK="1")  # rank 1 dies at step 3
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "rank 1 did not answer" in proc.stderr, proc.stderr[-4000:]
    assert f"the last valid checkpoint is {out / 'checkpoints' / 'step-00002'}" in proc.stderr
    assert elapsed < 120 + TIMEOUT_S
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(out).encode() in _cmdline(p)]
    assert not (out / "final").exists()
    _ok(_tao(["run", "--resume", str(out)], plugin_path))  # the 2-rank checkpoint, resumed by one process
    steps = _steps(out)
    assert [r["world_size"] for r in steps] == [2, 2, 1]
    assert _close(_final(ref), _final(out)) < RTOL


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_two_nodes_through_a_c10d_rendezvous(tmp_path, one_process, plugin_path):  # noqa: F811
    """Two launchers of one rank each (as on two machines) meet at a c10d rendezvous on loopback."""
    cfg, ref = one_process
    out, port = tmp_path / "nodes", _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "tao-test",
           "-m", "tao_core.cli", "run", str(cfg), "--output-dir", str(out)]
    nodes = [subprocess.Popen(cmd, env=_env(plugin_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [node.communicate(timeout=400) for node in nodes]
    for node, (_, err) in zip(nodes, results, strict=True):
        assert node.returncode == 0, err[-4000:]
    assert sum(o.count("run directory:") for o, _ in results) == 1  # one launcher's rank 0 printed
    assert [r["world_size"] for r in _steps(out)] == [2, 2, 2]
    assert [r["loss"] for r in _steps(out)] == pytest.approx([r["loss"] for r in _steps(ref)], rel=LOSS_RTOL,
                                                                  abs=LOSS_ATOL)
    assert _close(_final(ref), _final(out)) < RTOL
