"""A rank that hangs or dies under torchrun (gloo, loopback, 2 processes, a tiny model): the run ends
within ``distributed.timeout_s`` with an error naming the rank and the last valid checkpoint, whatever
collective the others wait in (DDP's bucket all-reduce, FSDP's reduce-scatter), no process is left
behind, and ``--resume`` completes. The test hooks: ``TAO_FAULT_HANG=NAME:K`` (this rank stops
answering at its K-th arrival at hang point NAME) and ``TAO_FAULT=NAME:K`` (it is killed there), on
the rank ``TAO_FAULT_RANK`` names; ``train.backward`` is the point before each micro-batch's backward.

The hung run trains LoRA adapters under DDP in micro-batches of 40 tokens, so each rank accumulates
several under ``no_sync`` and the rank with fewer runs spares at weight 0, and its resume on 2 ranks
ends on the 1-process run's weights, within the tolerance of tests/test_distributed.py (an
uninterrupted 2-rank LoRA run: 1.2e-7 relative with one micro-batch a rank, 7e-8 with micro-batches
of 40 tokens in full fine-tuning, measured on this machine).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tao_core.distributed import Dist, DistributedError
from tao_core.errors import PluginError
from tests.test_distributed import CHANGES, RTOL, _close, _cmdline, _final, _ok, _steps, _tao, _torchrun
from tests.test_pipeline import _config, plugin_path  # noqa: F401 (a fixture)

TIMEOUT_S = 20  # distributed.timeout_s of these runs: collectives time out after 15 s, then 5 s of grace
SLACK_S = 30  # what a loaded 2-core machine adds: step 3's sampling before the hang, the launcher's shutdown
LORA = '[train]\nlora = true\nlora_target_modules = ["q_proj", "v_proj"]\nmicro_batch_tokens = 40\n'
# rank 1 then runs 8 micro-batches a step (its own and spares, as many as rank 0's): its 17th
# backward is step 3's first
HANG = "train.backward:17"


def _write(cfg: Path, model: Path, out: Path, train: str = "[train]\n", distributed: str = "") -> Path:
    """tests/test_distributed.py's 3-step run (checkpoints after every step), with a short timeout."""
    text = _config(cfg, model, out).read_text().replace("[train]\n", train)
    for old, new in CHANGES.items():
        text = text.replace(old, new)
    cfg.write_text(f"{text}\n[distributed]\ntimeout_s = {TIMEOUT_S}\n{distributed}")
    return cfg


@pytest.fixture(scope="module")
def lora_one_process(tmp_path_factory, tiny_model_dir, plugin_path):  # noqa: F811
    root = tmp_path_factory.mktemp("lora-one")
    cfg = _write(root / "c.toml", tiny_model_dir, root / "run", train=LORA)
    _ok(_tao(["run", str(cfg)], plugin_path))
    return cfg, root / "run"


def _left_behind(out: Path) -> list[str]:
    """The processes whose command line names the run directory (the ranks and their launcher)."""
    return [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and str(out).encode() in _cmdline(p)]


def _named(stderr: str, out: Path, collective: str) -> None:
    """The error names the collective rank 0 waited in, rank 1 and the last valid checkpoint, once each."""
    assert f"rank 0 of 2: the training step's {collective} failed or timed out" in stderr, stderr[-4000:]
    assert f"the last valid checkpoint is {out / 'checkpoints' / 'step-00002'}" in stderr
    lines = [line for line in stderr.splitlines() if "did not answer" in line]
    assert lines and all(line.count("rank 1 did not answer") == 1 for line in lines), lines
    assert "rank 0 did not answer" not in stderr


def test_a_hung_rank_is_named_within_the_timeout_and_the_run_resumes(tmp_path, lora_one_process, plugin_path):  # noqa: F811
    """Rank 1 stops answering before its first step-3 backward; rank 0 waits in DDP's bucket all-reduce."""
    cfg, ref = lora_one_process
    out = tmp_path / "hung"
    proc = _torchrun(["run", str(cfg), "--output-dir", str(out)], plugin_path,
                     TAO_FAULT_HANG=HANG, TAO_FAULT_RANK="1")
    ended = time.time()
    assert proc.returncode != 0
    _named(proc.stderr, out, "gradient all-reduce (DDP)")
    assert "rank 1 of 2: stopped by the launcher (SIGTERM)" in proc.stderr  # the hung rank was ended
    since = ended - (out / "checkpoints" / "step-00002" / "manifest.json").stat().st_mtime
    assert TIMEOUT_S * 3 / 4 <= since < TIMEOUT_S + SLACK_S  # the collective timed out; then the grace
    assert not _left_behind(out)
    assert not (out / "final").exists()
    _ok(_torchrun(["run", "--resume", str(out)], plugin_path))
    steps = _steps(out)
    assert [r["world_size"] for r in steps] == [2, 2, 2] and all(r["micro_batches"] > 2 for r in steps)
    assert _close(_final(ref), _final(out)) < RTOL  # LoRA under DDP: the 1-process run


def test_a_rank_killed_inside_fsdps_collectives_is_named(tmp_path, tiny_model_dir, plugin_path):  # noqa: F811
    """Rank 1 dies after its step-3 forward; rank 0 fails in FSDP's reduce-scatter. (A killed rank's
    run resuming, sharded or not: tests/test_distributed.py and tests/test_distributed_fsdp.py.)"""
    out = tmp_path / "killed"
    cfg = _write(tmp_path / "fsdp.toml", tiny_model_dir, out, distributed='strategy = "fsdp"\n')
    proc = _torchrun(["run", str(cfg)], plugin_path, TAO_FAULT="train.backward:3", TAO_FAULT_RANK="1")
    assert proc.returncode != 0
    _named(proc.stderr, out, "weight all-gathers and gradient reduce-scatters (FSDP)")
    assert not _left_behind(out)
    assert [r["world_size"] for r in _steps(out)] == [2, 2]


# -- the failure message, without processes (no process group: the store knows no peer) -------------

def test_an_error_already_named_is_not_named_again():
    """The launcher's SIGTERM while a rank waits in a collective is reported once (it was wrapped
    in the collective's own failure, naming the peers twice)."""
    d = Dist(rank=1, world_size=2, timeout_s=4)
    with pytest.raises(DistributedError) as caught:
        d.named("checkpoint", lambda: d._terminated(signal.SIGTERM, None))
    message = str(caught.value)
    assert message.startswith("rank 1 of 2: stopped by the launcher (SIGTERM)")
    assert message.count("rank 1 of 2") == 1 and "collective" not in message
    with pytest.raises(DistributedError) as caught, d.watch("the training step's update"):
        raise DistributedError("rank 1 of 2: collective 'loss' failed; rank 0 did not answer (it died or hangs)")
    assert str(caught.value).count("did not answer") == 1


def test_a_backend_failure_in_a_watched_block_is_named_and_other_errors_pass():
    d = Dist(rank=0, world_size=2, timeout_s=4)
    with pytest.raises(DistributedError, match=r"^rank 0 of 2: the training step's update failed or timed out "
                                               r"\(distributed.timeout_s = 4\): RuntimeError: \[pair.cc:553\] "
                                               r"Connection closed by peer; a peer rank failed or was stopped$"):
        with d.watch("the training step's update"):
            raise RuntimeError("[pair.cc:553] Connection closed by peer\nmore")
    for error in (PluginError("objective 'x' returned a non-finite loss (nan)"), RuntimeError("shape mismatch"),
                  ValueError("bad")):
        d._failing = False
        with pytest.raises(type(error)) as caught, d.watch("the training step's update"):
            raise error
        assert caught.value is error
    assert d.grace_s == 1.0 and Dist(timeout_s=600).grace_s == 10.0  # a quarter of the timeout, at most 10 s
