"""A refactor changes no number: a fixed tiny-model run is compared bit for bit with a recording.

The run (the tiny random Llama of ``conftest``, the arithmetic task's prompts, a scorer plugin
with a varied signal, 2 rounds x 2 steps, checkpoints, evaluation) goes through ``tao run`` in a
subprocess with one thread. Its ``metrics.jsonl`` minus wall-clock fields and the SHA-256 of every
final weight tensor must equal ``tests/data/golden/tiny-run.json``.

Floating-point results depend on the CPU's vector instructions (oneDNN, MKL and the engine's
native kernels pick their code paths from them), so the recording names the CPU it was made on and
is compared exactly there; on another CPU the test is skipped with that reason. After a change
that is *meant* to change numbers, re-record with::

    TAO_GOLDEN_RECORD=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_pipeline import _config, _finish, _tao, plugin_path  # noqa: F401, F811 (a fixture)

GOLDEN = Path(__file__).parent / "data" / "golden" / "tiny-run.json"
TIMING = {"time", "seconds"}


def _timing(key: str) -> bool:
    return key in TIMING or key.endswith(("_s", "_seconds"))


def _cpu() -> str:
    """CPU model and the vector-instruction flags numerical code dispatches on."""
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", "x86_64"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    isa = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return f"{model} | {' '.join(isa)}"


def _observe(run: Path) -> dict:
    metrics = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        metrics.append({k: v for k, v in row.items() if not _timing(k)})
    tensors = load_file(str(run / "final" / "model.safetensors"))
    weights = {
        name: hashlib.sha256(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes()).hexdigest()
        for name, t in sorted(tensors.items())
    }
    return {"metrics": metrics, "weights": weights}


def test_tiny_run_matches_recording(tmp_path, tiny_model_dir, plugin_path, monkeypatch):  # noqa: F811
    import torch

    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    cfg = _config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run")
    _finish(_tao(["run", str(cfg)], plugin_path))
    seen = _observe(tmp_path / "run")
    cpu, versions = _cpu(), f"torch {torch.__version__}"
    if os.environ.get("TAO_GOLDEN_RECORD") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps({"cpu": cpu, "versions": versions, **seen}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    if (golden["cpu"], golden["versions"]) != (cpu, versions):
        pytest.skip(f"recorded on {golden['cpu']} with {golden['versions']}; this is {cpu} with {versions}")
    assert len(seen["metrics"]) == len(golden["metrics"])
    for i, (got, want) in enumerate(zip(seen["metrics"], golden["metrics"], strict=True)):
        assert got == want, f"metrics.jsonl line {i + 1} differs from the recording"
    assert seen["weights"] == golden["weights"]
