"""`distributed.strategy = "fsdp"` on the CPU (gloo, loopback, 2 processes of torchrun): FSDP2
(`fully_shard`) gives the 1-process run, its sharded checkpoint resumes on 1 process and on 2, and
each rank's engine, sampling from the weights gathered for the phase, gives the trainer's log-probs.

Tolerance: as with DDP ranks (tests/test_distributed.py), the samples are the same tokens and
the loss the same global loss, but not bit for bit: each rank packs only its own groups, and FSDP
reduce-scatters each micro-batch's gradient (a sum over ranks in another order than one process's
accumulation). Measured on this machine: gradient norms agree to 7.5e-7 relative, final weights to
8.2e-7, losses to 4e-6 (step 1's, 2e-9, is rounding noise). The bounds are those of the DDP
test: 1e-5 relative for gradient norms and final weights, 1e-4 relative (or 1e-8 absolute) for losses.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_distributed import (  # noqa: F401 (one_process is a fixture)
    LOSS_ATOL,
    LOSS_RTOL,
    RTOL,
    _close,
    _env,
    _final,
    _free_port,
    _ok,
    _steps,
    _tao,
    _torchrun,
    one_process,
)
from tests.test_pipeline import plugin_path  # noqa: F401 (a fixture)


def _fsdp_config(one: Path, dest: Path) -> Path:
    """The 1-process run's config with FSDP, and micro-batches small enough that the two ranks hold
    unequal numbers of them (the one with fewer repeats one at weight 0: the same update)."""
    text = one.read_text().replace("[distributed]\n", '[distributed]\nstrategy = "fsdp"\n')
    dest.write_text(text.replace("[train]\n", "[train]\nmicro_batch_tokens = 40\n"))
    return dest


def _same_run(ref: Path, out: Path, world_sizes: list[int]) -> None:
    one, two = _steps(ref), _steps(out)
    assert [r["world_size"] for r in two] == world_sizes
    for a, b in zip(one, two, strict=True):
        assert a["reward_mean"] == b["reward_mean"] and a["tokens"] == b["tokens"]  # the same samples
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL, abs=LOSS_ATOL)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=RTOL)
    assert _close(_final(ref), _final(out)) < RTOL


def test_fsdp_two_ranks_equal_one_process_and_its_checkpoint_resumes_on_one_and_two(
        tmp_path, one_process, plugin_path):  # noqa: F811
    cfg, ref = one_process
    fsdp = _fsdp_config(cfg, tmp_path / "fsdp.toml")
    out = tmp_path / "two"
    proc = _ok(_torchrun(["run", str(fsdp), "--output-dir", str(out)], plugin_path))
    assert proc.stdout.count("step 3: held-out") == 1  # rank 0 alone prints
    _same_run(ref, out, [2, 2, 2])
    assert [r["micro_batches"] for r in _steps(out)] != [r["micro_batches"] for r in _steps(ref)]
    evals = [[(r["value"], r["n"]) for r in (json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "eval"] for d in (ref, out)]
    assert evals[0] == evals[1]
    ckpt = out / "checkpoints" / "step-00003"
    assert sorted(p.name for p in (ckpt / "shards").iterdir()) == ["rank-00000-of-00002.safetensors",
                                                                   "rank-00001-of-00002.safetensors"]
    assert not (ckpt / "trainable.safetensors").exists()
    listed = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert {"shards.json", "shards/rank-00001-of-00002.safetensors"} <= set(listed)
    _rows_for_any_rank_count(ckpt)
    _corrupt_shard_falls_back(out, tmp_path / "broken")

    killed = tmp_path / "killed"
    proc = _torchrun(["run", str(fsdp), "--output-dir", str(killed)], plugin_path,
                     TAO_FAULT="train.before:3", TAO_FAULT_RANK="1")  # rank 1 dies at step 3
    assert proc.returncode != 0 and "rank 1 did not answer" in proc.stderr, proc.stderr[-4000:]
    assert (killed / "checkpoints" / "step-00002" / "shards.json").exists()
    again = tmp_path / "killed-again"
    shutil.copytree(killed, again, ignore=shutil.ignore_patterns(".lock"))
    _ok(_tao(["run", "--resume", str(killed)], plugin_path))  # the 2-rank shards, assembled by one process
    _same_run(ref, killed, [2, 2, 1])
    _ok(_torchrun(["run", "--resume", str(again)], plugin_path))  # the shards, read back by 2 ranks
    _same_run(ref, again, [2, 2, 2])


def _rows_for_any_rank_count(ckpt: Path) -> None:
    """Each rank's rows of every weight and AdamW moment, for 1, 3 and 5 ranks, read from the shard
    files 2 ranks wrote, are the rows of the whole tensors one process assembles."""
    import torch

    from tao_core.checkpoint import Rows, read
    from tao_core.dist_fsdp import rows

    state, _ = read(ckpt)
    whole = {f"trainable/{n}": t for n, t in state["trainable"].items()}
    whole.update({f"state/{i}/{k}": v for i, per in state["optimizer"]["state"].items() for k, v in per.items()
                  if k.startswith("exp_avg")})
    reader = Rows(ckpt)
    assert set(reader.index) == set(whole)
    for key, full in whole.items():
        for world in (1, 3, 5):
            spans = [rows(full.shape[0], r, world) for r in range(world)]
            got = torch.cat([reader.read(key, a, b) for a, b in spans if b > a])
            assert torch.equal(got, full), (key, world)


def _corrupt_shard_falls_back(run: Path, copy: Path) -> None:
    """A shard file that does not match the manifest makes its checkpoint invalid: the run directory
    falls back to the previous one, whole (one process) or lazily (FSDP ranks) alike."""
    from tao_core.dist_checkpoint import read_lazy
    from tao_core.rundir import RunDir

    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
    shard = copy / "checkpoints" / "step-00003" / "shards" / "rank-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    for found in (RunDir(copy).load_checkpoint(), RunDir(copy).load_checkpoint(read=read_lazy)):
        assert found[0].name == "step-00002"
        assert "rank-00001-of-00002.safetensors: SHA-256 differs from the manifest" in found[3][0]
    state = RunDir(copy).load_checkpoint()[1]  # the shards of step 2, assembled whole
    assert state["step"] == 2 and all(t.dim() for t in state["trainable"].values())


def test_a_one_process_checkpoint_resumes_sharded_on_two_ranks(tmp_path, one_process, plugin_path):  # noqa: F811
    """A whole checkpoint (one process) read back as FSDP shards: each rank reads its rows of it."""
    _, ref = one_process
    out = tmp_path / "one-then-two"  # the 1-process run as it stood after step 2
    shutil.copytree(ref, out, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-00003")
    (out / "checkpoints" / "latest").write_text("step-00002")
    saved = json.loads((out / "config.json").read_text())
    saved["distributed"]["strategy"] = "fsdp"
    (out / "config.json").write_text(json.dumps(saved))
    _ok(_torchrun(["run", "--resume", str(out)], plugin_path))
    steps = _steps(out)
    assert [r["world_size"] for r in steps] == [1, 1, 2]
    assert _close(_final(ref), _final(out)) < RTOL


GAP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from tao_core.config import DistributedConfig, TrainConfig
    from tao_core.distributed import Dist
    from tao_core.engine import EngineRequest
    from tao_core.models import load_model
    from tao_core.sampler import sampler_for
    from tao_core.train import Trainer
    from tao_core.types import SamplingParams
    from tao_core.dist_fsdp import attach_engine

    torch.manual_seed(0)
    dist = Dist.from_env(DistributedConfig(backend="gloo", timeout_s=60, strategy="fsdp"))
    lm = load_model(sys.argv[1], sampler="engine")
    trainer = Trainer(lm, TrainConfig(objective="grpo", lr=1e-2), dist=dist, strategy="fsdp")
    sharded = [type(p).__name__ for p in lm.model.parameters()]
    attach_engine(lm, trainer.sharding)
    engine = sampler_for(lm).engine
    prompts = [[1, 2, 3, 4, 5, 6, 7] * 3, [1, 2, 3, 4, 5, 6, 7] * 3 + [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]]
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=5 + dist.rank)

    def phase():
        # one generate phase (weights gathered once), then the trainer's log-probs of what it sampled
        with trainer.full_weights():
            res = engine.run([EngineRequest(p, params) for p in prompts])
            whole = [type(p).__name__ for p in lm.model.parameters()]
        gap, first = 0.0, None
        for p, r in zip(prompts, res):
            for s in r.samples:
                ids = torch.tensor([p + s.token_ids])

                def fwd():
                    with torch.no_grad():
                        return (lm.model(ids).logits[0, len(p) - 1:-1].float(),)

                logits = trainer.sharding.root(fwd)[0]
                want = torch.log_softmax(logits / 0.8, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0]
                gap = max(gap, (want - torch.tensor(s.logprobs)).abs().max().item())
                first = s.logprobs if first is None else first
        trainer.sharding.root.reshard()
        return gap, whole, first

    gap, whole, before = phase()
    after = [type(p).__name__ for p in lm.model.parameters()]
    local = sum(p.to_local().numel() for p in lm.model.parameters())
    total = sum(p.numel() for p in lm.model.parameters())
    with torch.no_grad():  # new weights, as after an optimizer step: the next phase must sample from them
        for p in lm.model.parameters():
            p.to_local().mul_(1.05)
    gap2, _, later = phase()
    moved = max(abs(a - b) for a, b in zip(before, later))
    open(f"{sys.argv[2]}/rank-{dist.rank}.json", "w").write(json.dumps({"rank": dist.rank, "gap": gap, "gap2": gap2,
        "moved": moved, "sharded": sharded + after, "whole": whole, "local": local, "total": total}))
    dist.close()
""")



def test_each_ranks_engine_gives_the_trainers_logprobs_under_fsdp(tmp_path, tiny_model_dir, plugin_path):  # noqa: F811
    script = tmp_path / "gap.py"
    script.write_text(GAP_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(script), str(tiny_model_dir), str(tmp_path)]
    proc = subprocess.run(cmd, env=_env(plugin_path, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        assert set(r["sharded"]) == {"DTensor"}  # every parameter is a shard before and after the phase
        assert set(r["whole"]) == {"Parameter"}  # and whole during it
        assert r["local"] < 0.6 * r["total"]  # each rank holds about half
        assert r["gap"] <= 1e-4 and r["gap2"] <= 1e-4, r  # before and after the weights change
        assert r["moved"] > 1e-3  # the second phase sampled from the new weights (no stale cached prefix)


def test_fsdp_refuses_what_it_does_not_shard(tmp_path, tiny_model_dir):
    from tao_core.config import load_config, validate
    from tao_core.errors import TaoInputError
    from tests.test_pipeline import _config

    cfg = _config(tmp_path / "c.toml", tiny_model_dir, tmp_path / "run")
    cfg.write_text(cfg.read_text().replace('scorer = "test-letter"', 'scorer = "arithmetic-check"'))
    validate(load_config(cfg, {"distributed.strategy": "fsdp"}))  # the default run shards
    with pytest.raises(TaoInputError, match="distributed.strategy must be one of 'ddp', 'fsdp', got 'zero3'"):
        load_config(cfg, {"distributed.strategy": "zero3"})
    with pytest.raises(TaoInputError, match="does not shard LoRA adapters: use strategy 'ddp'"):
        validate(load_config(cfg, {"distributed.strategy": "fsdp", "train.lora": True}))
    with pytest.raises(TaoInputError, match="generate.sampler = 'hf' would regather them on every decode step"):
        validate(load_config(cfg, {"distributed.strategy": "fsdp", "generate.sampler": "hf"}))
