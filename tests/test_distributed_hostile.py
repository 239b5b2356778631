"""`tao run` under torchrun, used the way it should not be: a launcher's environment that does not
hold together, a rank that cannot meet the others, torchrun itself stopped (Slurm's scancel, a
preemption), a rank that does not see rank 0's run directory, a timeout too short for the work.

Most checks run in this process: the launcher's environment is set with ``monkeypatch`` and the
failure reports read an in-process ``HashStore`` in place of torchrun's. One test launches 2 ranks
(gloo, loopback, the tiny model) and stops torchrun with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as tdist

from tao_core import dist_checkpoint
from tao_core.config import DistributedConfig
from tao_core.distributed import Dist, DistributedError, main_process, pid_namespace, process_alive
from tests.test_distributed import (
    LOSS_ATOL,
    LOSS_RTOL,
    RTOL,
    _close,
    _cmdline,
    _env,
    _final,
    _free_port,
    _ok,
    _steps,
    _tao,
    _torchrun,
)
from tests.test_distributed_faults import _write
from tests.test_pipeline import plugin_path  # noqa: F401 (a fixture)

LAUNCHER = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def launcher(monkeypatch):
    """Set the launcher's variables (all others unset): ``launcher(WORLD_SIZE="2", ...)``."""
    for key in LAUNCHER:
        monkeypatch.delenv(key, raising=False)

    def put(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return put


FULL = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}


@pytest.mark.parametrize("bad, named", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer >= 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not an integer >= 1"),
    ({"RANK": "5"}, "RANK='5' is not an integer in [0, 2)"),
    ({"RANK": "-1"}, "RANK='-1' is not an integer in [0, 2)"),
    ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer >= 0"),
    ({"MASTER_PORT": "0"}, "MASTER_PORT='0' is not an integer in [1, 65536)"),
])
def test_an_inconsistent_launcher_environment_is_refused_before_joining(launcher, bad, named):
    """Before: ``WORLD_SIZE=abc`` was a ValueError traceback; ``RANK=5`` of 2 waited 22 s to connect
    to a store nobody hosts, then a DistNetworkError traceback."""
    launcher(**{**FULL, **bad})
    with pytest.raises(DistributedError) as caught:
        Dist.from_env(DistributedConfig(timeout_s=30))
    assert named in str(caught.value) and "torchrun" in str(caught.value)
    assert not tdist.is_initialized()


def test_a_rank_that_cannot_meet_the_others_says_where_it_looked(launcher):
    """RANK=1 of 2 set by hand, nobody at MASTER_ADDR:MASTER_PORT: a named error within the timeout
    (before: torch's DistNetworkError with a C++ stack)."""
    launcher(**{**FULL, "MASTER_PORT": str(_free_port())})
    with pytest.raises(DistributedError) as caught:
        Dist.from_env(DistributedConfig(timeout_s=2, backend="gloo"))
    message = str(caught.value)
    assert message.startswith(f"rank 1 of 2: could not join the other ranks at 127.0.0.1:{os.environ['MASTER_PORT']}")
    assert "start every rank with torchrun" in message
    assert not tdist.is_initialized()


def test_nccl_with_more_processes_than_gpus_is_refused(launcher, monkeypatch):
    launcher(**FULL)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DistributedError, match=r"LOCAL_RANK=1, but this node has 1 GPU\(s\)"):
        Dist.from_env(DistributedConfig(backend="nccl"))


def test_a_rank_left_in_the_environment_of_one_process_changes_nothing(launcher):
    """``RANK=1`` without ``WORLD_SIZE`` (a leftover export): one process, which writes the run
    directory and so must print its result (before: the CLI printed nothing)."""
    launcher(RANK="1")
    assert Dist.from_env(DistributedConfig()) == Dist() and main_process()
    launcher(WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    assert main_process()
    launcher(WORLD_SIZE="2")
    assert not main_process()


# -- who is blamed for a failure: the store's records, without processes ---------------------------

def _ranks(store: tdist.Store, me: int, seq: int, timeout_s: float = 4.0) -> Dist:
    d = Dist(rank=me, world_size=2, timeout_s=timeout_s)
    d._seq = seq
    d._store = lambda: store  # torchrun's store, here an in-process one
    return d


def _peer(store: tdist.Store, rank: int, arrived: int, *, pid: int | None = None, host: str | None = None,
          failed: bool = False) -> None:
    store.set(f"tao/arrived/{rank}", str(arrived))
    store.set(f"tao/who/{rank}", f"{host or pid_namespace()} {pid or os.getpid()}")
    if failed:
        store.set(f"tao/failed/{rank}", str(arrived))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_torchrun_stopped_every_rank_blames_none():
    """SIGTERM to torchrun reaches every rank at once. Rank 0 waits in collective 5 (it cannot report
    while it waits), rank 1 computes after collective 4. Before: rank 1 waited the grace period and
    blamed rank 0, then rank 0 blamed rank 1 (which had reported)."""
    store = tdist.HashStore()
    _peer(store, 0, arrived=5)
    behind = _ranks(store, me=1, seq=4)
    assert behind.silent() == []
    message = behind.describe_failure("stopped by the launcher (SIGTERM)")
    assert message.endswith("; a peer rank failed or was stopped") and "did not answer" not in message
    _peer(store, 1, arrived=4, failed=True)  # rank 1 reported, then exited: rank 0's collective fails
    assert _ranks(store, me=0, seq=5).silent() == []
    store = tdist.HashStore()
    _peer(store, 1, arrived=5)  # rank 1 waits in collective 5, in C++; rank 0 computed inside it (a DDP step)
    assert _ranks(store, me=0, seq=5).silent(stopped=True) == []
    _peer(store, 1, arrived=5, pid=_dead_pid())  # the launcher stopped rank 0 because rank 1 died
    assert _ranks(store, me=0, seq=5).silent(stopped=True) == [1]


def test_a_dead_or_hung_peer_is_still_blamed():
    store = tdist.HashStore()
    _peer(store, 1, arrived=4, pid=_dead_pid())  # died before collective 5, on this host
    assert _ranks(store, me=0, seq=5).silent() == [1]
    _peer(store, 1, arrived=6, pid=_dead_pid())  # died while waiting in a later collective
    assert _ranks(store, me=0, seq=5).silent() == [1]
    _peer(store, 1, arrived=5)  # alive in the same collective, never reports: it hangs in it
    assert _ranks(store, me=0, seq=5, timeout_s=0.8).silent() == [1]
    _peer(store, 1, arrived=4, host="another-node")  # alive elsewhere, never reached the collective
    assert _ranks(store, me=0, seq=5, timeout_s=0.8).silent() == [1]
    _peer(store, 1, arrived=6, host="another-node")  # ahead on another node: it waits for rank 0
    assert _ranks(store, me=0, seq=5, timeout_s=0.8).silent() == []


def test_process_alive_tells_a_zombie_from_a_live_process():
    assert process_alive(os.getpid())
    assert not process_alive(_dead_pid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # exited, not reaped: a zombie until wait()
            if not process_alive(child.pid):
                break
            time.sleep(0.05)
        assert not process_alive(child.pid)
    finally:
        child.wait()


def test_a_timeout_says_it_may_be_too_short():
    """``timeout_s = 1`` under torchrun failed in the first collective with "Timed out waiting 750ms";
    the error now says what to do when no rank died."""
    d = Dist(rank=0, world_size=2, timeout_s=1)
    with pytest.raises(DistributedError) as caught:
        d.named("broadcast rank 0's weights (ddp)", lambda: (_ for _ in ()).throw(
            RuntimeError("[unbound_buffer.cc:129] Timed out waiting 750ms for send operation to complete")))
    assert "raise distributed.timeout_s" in str(caught.value)
    d._failing = False
    with pytest.raises(DistributedError) as caught:
        d.named("candidates", lambda: (_ for _ in ()).throw(RuntimeError("[pair.cc:553] Connection closed by peer")))
    assert "timeout_s" in str(caught.value) and "raise distributed.timeout_s" not in str(caught.value)


def test_a_rank_that_does_not_see_rank_0s_directory_says_so(tmp_path):
    """Several nodes without a shared file system: rank 1 is handed a checkpoint directory that does
    not exist on its node (before: a bare "cannot write .../shards/rank-00001-of-00002.safetensors")."""
    gone = tmp_path / "elsewhere" / ".tmp-0000"
    dist = SimpleNamespace(rank=1, is_main=False, broadcast=lambda name, value: str(gone),
                           gather=lambda name, items: pytest.fail("rank 1 wrote its shard"))
    with pytest.raises(DistributedError, match=r"rank 1 does not see .*\.tmp-0000, which rank 0 made: the ranks "
                                               r"must share the run directory's file system"):
        dist_checkpoint.save(None, 3, SimpleNamespace(dist=dist), {})
    with pytest.raises(DistributedError, match="rank 1 does not see"):
        dist_checkpoint.load(SimpleNamespace(dist=dist), dist_checkpoint.LazyState(gone, {}, {}))


# -- one launch: torchrun stopped with SIGTERM ---------------------------------------------------------

def test_stopping_torchrun_stops_every_rank_blaming_none(tmp_path, tiny_model_dir, plugin_path):  # noqa: F811
    """What Slurm's scancel or a preemption does: SIGTERM to torchrun, which forwards it to every
    rank. Each rank reports it; none blames another (before: each said the other "did not answer");
    no process is left; the run resumes."""
    out = tmp_path / "stopped"
    cfg = _write(tmp_path / "c.toml", tiny_model_dir, out)
    cfg.write_text(cfg.read_text().replace("steps_per_round = 3", "steps_per_round = 40"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "tao_core.cli", "run", str(cfg)]
    launcher = subprocess.Popen(cmd, env=_env(plugin_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    try:
        for _ in range(1200):
            if metrics.exists() and '"type": "step"' in metrics.read_text():
                break
            assert launcher.poll() is None, launcher.communicate()[1][-4000:]
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} of 2: stopped by the launcher (SIGTERM)" in err or \
               f"rank {rank} of 2: collective" in err, err[-4000:]
    assert "did not answer" not in err, err[-4000:]
    assert "(SIGKILL)" not in err  # every rank ended on its own, before torchrun's SIGKILL
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(cfg).encode() in _cmdline(p)]
    steps = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert any(r["type"] == "step" for r in steps)


# -- a rank with nothing to do ---------------------------------------------------------------------------

def test_a_rank_with_no_prompt_and_no_held_out_example(tmp_path, tiny_model_dir, plugin_path):  # noqa: F811
    """prompts_per_step = 1 and eval_limit = 1 on 2 FSDP ranks: rank 1 serves no prompt and no held-out
    example, yet joins every gather and runs spare micro-batches at weight 0; the run is the 1-process
    one (measured: identical, since rank 0 computes everything; bounds of tests/test_distributed.py)."""
    runs = {}
    for name, launch in (("one", _tao), ("two", _torchrun)):
        out = tmp_path / name
        cfg = _write(tmp_path / f"{name}.toml", tiny_model_dir, out, distributed='strategy = "fsdp"\n')
        cfg.write_text(cfg.read_text().replace("prompts_per_step = 3", "prompts_per_step = 1")
                       .replace("eval_limit = 5", "eval_limit = 1"))
        _ok(launch(["run", str(cfg)], plugin_path))
        runs[name] = out
    one, two = _steps(runs["one"]), _steps(runs["two"])
    assert [r["world_size"] for r in two] == [2, 2, 2]
    for a, b in zip(one, two, strict=True):
        assert (a["reward_mean"], a["tokens"]) == (b["reward_mean"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL, abs=LOSS_ATOL)
    evals = [[(r["value"], r["n"]) for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "eval"] for d in (runs["one"], runs["two"])]
    assert evals[0] == evals[1] and evals[0][0][1] == 1
    assert _close(_final(runs["one"]), _final(runs["two"])) < RTOL


def test_the_failure_message_names_the_newest_finished_checkpoint_without_reading_it(tmp_path):
    """A failing run names its newest finished checkpoint from the directory listing alone (torchrun kills the
    ranks 30 s after its SIGTERM, too soon to hash a large model): an unfinished one (no manifest) is passed
    over, a finished one is named even when a file in it is damaged (``--resume`` verifies and falls back)."""
    from tao_core.checkpoint import MANIFEST
    from tao_core.rundir import RunDir

    rd = RunDir(tmp_path / "run", writes=False)
    assert rd.latest_checkpoint() is None
    for name, finished in (("step-00002", True), ("step-00004", False)):
        (rd.checkpoints / name).mkdir(parents=True)
        (rd.checkpoints / name / "model.safetensors").write_bytes(b"not safetensors")
        if finished:
            (rd.checkpoints / name / MANIFEST).write_text("{}")
    assert rd.latest_checkpoint() == rd.checkpoints / "step-00002"


@pytest.mark.parametrize("argv", [["sft", "x.toml"], ["eval", "--help"], ["demo"]])
def test_one_process_commands_refuse_a_launcher(argv):
    """Under torchrun only `tao run` runs on several ranks; every other command says so instead of running N
    copies into one directory."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "tao_core.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"`tao {argv[0]}` runs in one process" in proc.stderr and "without torchrun" in proc.stderr
