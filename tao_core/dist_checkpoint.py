"""Sharded checkpoints under FSDP2: each rank writes its rows, rank 0 the index and the manifest.

The format is :mod:`tao_core.checkpoint`'s (safetensors and JSON, a manifest written last, nothing
pickled; see its docstring for the layout): every rank writes ``shards/rank-R-of-N.safetensors``
with its rows of each weight and AdamW moment, then rank 0 writes ``shards.json`` (where each
tensor's rows are), ``trainer.json``, ``optimizer.safetensors`` (RNG states, AdamW's step counts),
``pipeline.json`` and the manifest listing every file with its SHA-256, and renames the directory
into place (:meth:`tao_core.rundir.RunDir.save_checkpoint`: the same keep-two and ``latest`` rules).
The ranks must share the run directory's file system, as a resume already requires.

Loading reshards: rank 0 verifies every file against the manifest (:func:`read_lazy`, falling back
to the previous checkpoint as for a whole one), and each rank reads only the rows it now holds
(:func:`load`) from the shard files, whatever rank count wrote them, or from a whole checkpoint
written by one process or by replicated ranks (whose AdamW moments sit in ``optimizer.safetensors``
and so reach every rank whole, once, from rank 0). A sharded checkpoint read by one process (or by
``strategy = "ddp"`` ranks) is assembled whole by :func:`tao_core.checkpoint.read`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch.distributed.tensor import DTensor

from tao_core import checkpoint
from tao_core.checkpoint import SHARD_INDEX, TRAINABLE, CheckpointError, Rows, shard_file
from tao_core.distributed import DistributedError
from tao_core.fsio import fault_point, write_file


@dataclass
class LazyState:
    """A verified checkpoint whose weights and moments are still on disk: what rank 0 broadcasts."""

    directory: Path
    meta: dict[str, Any]  # trainer.json
    others: dict[str, torch.Tensor]  # optimizer.safetensors: RNG states, unsharded optimizer tensors


def read_lazy(directory: Path) -> tuple[LazyState, dict[str, Any]]:
    """``(LazyState, pipeline_state)`` of a checkpoint whose every file matches its manifest; a
    :class:`~tao_core.checkpoint.CheckpointError` otherwise (the run directory falls back)."""
    meta, pipeline_state, others = checkpoint.verify(directory)
    return LazyState(directory, meta, others), pipeline_state


# -- writing --------------------------------------------------------------------------------------
def save(rd: Any, step: int, trainer: Any, pipeline_state: dict[str, Any]) -> None:
    """Checkpoint ``step`` of an FSDP trainer into run directory ``rd``; every rank calls it."""
    dist = trainer.dist
    if dist.is_main:
        rd.save_checkpoint(step, None, pipeline_state, write=lambda tmp, _, state: _write_main(tmp, trainer, state))
    else:
        tmp = Path(dist.broadcast("checkpoint directory", None))
        shared(tmp, dist.rank)
        dist.gather("checkpoint shards", [_write_shard(tmp, trainer)])
    dist.broadcast("checkpoint written", step)


def shared(directory: Path, rank: int) -> None:
    """Refuse, naming what to do, a directory of rank 0's that this rank does not see: the ranks
    write and read the shards of one checkpoint directory on a file system they share."""
    if not directory.is_dir():
        raise DistributedError(f"rank {rank} does not see {directory}, which rank 0 made: the ranks must share "
                              "the run directory's file system (put output_dir on a shared mount, see "
                              "docs/distributed.md)")


def _local_tensors(trainer: Any) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """This rank's rows of every sharded weight and optimizer tensor, and ``[shape, start, stop]`` of each."""
    sharding = trainer.sharding
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, list] = {}

    def add(key: str, t: torch.Tensor) -> None:
        local, start, stop = sharding.local(t.detach())
        tensors[key] = local.cpu().contiguous().clone()
        where[key] = [list(t.shape), start, stop]

    for name, p in trainer._trainable().items():
        add(TRAINABLE + name, p)
    for idx, per_param in trainer.optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            if isinstance(value, DTensor):
                add(f"state/{idx}/{key}", value)
    return tensors, where


def _write_shard(tmp: Path, trainer: Any) -> dict[str, Any]:
    """Write this rank's shard file into ``tmp``; its manifest entry and tensor positions."""
    tensors, where = _local_tensors(trainer)
    name = shard_file(trainer.dist.rank, trainer.dist.world_size)
    data = st_save(tensors)
    write_file(tmp / name, data)
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "tensors": where}


def _write_main(tmp: Path, trainer: Any, pipeline_state: dict[str, Any]) -> None:
    """Rank 0's part: share the directory, write its shard, then the index, the rest and the manifest."""
    from tao_core.train import rng_state

    dist = trainer.dist
    (tmp / "shards").mkdir()
    dist.broadcast("checkpoint directory", str(tmp))
    entries = dist.gather("checkpoint shards", [_write_shard(tmp, trainer)])
    index: dict[str, Any] = {"world_size": dist.world_size, "tensors": {}}
    for rank, entry in enumerate(entries):
        for key, (shape, start, stop) in entry["tensors"].items():
            index["tensors"].setdefault(key, {"shape": shape, "pieces": []})["pieces"].append([rank, start, stop])
    opt = trainer.optimizer.state_dict()
    plain = {idx: {k: v for k, v in per.items() if not isinstance(v, DTensor)} for idx, per in opt["state"].items()}
    _, others, meta = checkpoint.trainer_state_to_parts(
        {"step": trainer.step_count, "trainable": {}, "optimizer": {"state": plain, "param_groups": opt["param_groups"]},
         "rng": rng_state()})
    pipeline_state = dict(pipeline_state)
    if pipeline_state.pop(checkpoint.PIPELINE_TENSORS, None):
        raise CheckpointError("a sharded checkpoint keeps no pipeline tensors (a teacher); use strategy 'ddp'")
    files = {SHARD_INDEX: json.dumps(index).encode(), "optimizer.safetensors": st_save(others),
             "trainer.json": json.dumps(meta).encode(), "pipeline.json": json.dumps(pipeline_state, indent=2).encode()}
    for name, data in files.items():
        write_file(tmp / name, data)
    listed = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    listed.update({e["file"]: {"bytes": e["bytes"], "sha256": e["sha256"]} for e in entries})
    fault_point("checkpoint.before-manifest")
    manifest = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "step": meta["step"], "files": listed}
    write_file(tmp / checkpoint.MANIFEST, json.dumps(manifest, indent=2))


# -- loading --------------------------------------------------------------------------------------
def load(trainer: Any, state: LazyState) -> None:
    """Set an FSDP trainer's shards, optimizer, step and RNGs from ``state``, each rank reading its rows."""
    from tao_core.train import set_rng_state

    shared(state.directory, trainer.dist.rank)
    sharding, rows = trainer.sharding, Rows(state.directory)
    params = trainer._trainable()
    missing = [n for n in params if not rows.has(TRAINABLE + n)]
    if missing:
        raise CheckpointError(f"{state.directory}: lacks {len(missing)} trainable tensors, e.g. {missing[:3]}; was it "
                              "saved with the same model and lora setting?")
    with torch.no_grad():
        for name, p in params.items():
            local, start, stop = sharding.local(p)
            if stop > start:
                local.copy_(rows.read(TRAINABLE + name, start, stop))
    full = checkpoint.trainer_state_from_parts({}, state.others, state.meta)
    opt_state = full["optimizer"]["state"]
    for idx, per_param in opt_state.items():
        p = trainer.params[idx]
        _, start, stop = sharding.local(p)
        for key in [k for k, v in per_param.items() if isinstance(v, torch.Tensor) and v.shape == p.shape]:
            per_param[key] = sharding.like(p, per_param[key][start:stop])  # a whole checkpoint's moment
        if rows.index is not None:
            for key in [k.rsplit("/", 1)[1] for k in rows.index if k.startswith(f"state/{idx}/")]:
                per_param[key] = sharding.like(p, rows.read(f"state/{idx}/{key}", start, stop)
                                               if stop > start else p.to_local()[:0].clone())
    trainer.optimizer.load_state_dict(full["optimizer"])
    trainer.step_count = int(full["step"])
    set_rng_state(full["rng"])
