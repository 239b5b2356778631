"""FSDP2 (``torch.distributed.fsdp.fully_shard``): ranks that each hold a shard of the model.

``distributed.strategy = "fsdp"`` under several ranks. Each decoder layer is one FSDP group and a
small root module over the whole causal LM (:class:`tao_core.distributed.Root`) is another, holding
the embeddings, the final norm and the LM head (tied or not). Every parameter, its gradient and its
AdamW moments are split by rows over the ranks (``Shard(0)``); a layer's weights are all-gathered
just for its forward and its backward, and its gradients are reduce-scattered.

The rest reads as in one process (:mod:`tao_core.distributed`):

* **Loss.** The trainer computes a loss inside ``root(fn)``: the root's forward gathers the head
  and embeddings, the decoder's layers gather themselves, and the head weight the fused loss reads
  is the full one. Reductions *sum* (divide factor 1): each rank's micro-batches are already
  weighted by the global loss units, as with ``strategy = "ddp"``. FSDP's collectives run
  once per micro-batch forward and backward, so every rank runs the same number of micro-batches:
  a rank with fewer repeats one of the step's micro-batches with weight 0
  (:func:`tao_core.distributed.even_micro_batches`).
* **Sampling.** :meth:`Sharding.full_weights` gathers every group once for a whole generate or
  evaluation phase and frees the copies after it: tao's engine calls the layers' submodules (the
  projections, norms, MLP), never a layer's own forward, so no FSDP hook fires in between and the
  engine reads the gathered tensors in its usual layout, as the trainer's forward does.
* **Precision.** On CUDA with bf16 (``train.precision`` "auto" or "bf16") parameters are gathered
  in bf16 and gradients reduced in float32 (``MixedPrecisionPolicy``); the shards and AdamW stay
  float32. On the CPU (gloo) everything is float32.

Memory per rank: weights, gradients and AdamW moments ``16P / N`` bytes plus, while sampling, the
gathered weights (``4P``, ``2P`` in bf16) and the engine's cache; see docs/distributed.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tao_core.distributed import Dist, DistributedError, Root
from tao_core.engine.runner import unwrap


def rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of an ``n``-row tensor that ``rank`` holds under FSDP2's ``Shard(0)``
    (``torch.chunk``: blocks of ``ceil(n / world_size)``, the last ones shorter or empty)."""
    block = math.ceil(n / world_size) if n else 0
    return min(rank * block, n), min((rank + 1) * block, n)


class Sharding:
    """FSDP2 over one trainer's policy (and frozen reference, when it has one)."""

    collectives = "weight all-gathers and gradient reduce-scatters (FSDP)"  # the training step's, for errors

    def __init__(self, dist: Dist, model: torch.nn.Module, reference: torch.nn.Module | None, precision: str) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.dist = dist
        device = torch.device(dist.device)
        self.mesh = init_device_mesh(device.type, (dist.world_size,))
        bf16 = device.type == "cuda" and precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
        self.mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        self.root = self._shard(model)
        self.ref_root = self._shard(reference) if reference is not None else None

    def _shard(self, model: torch.nn.Module) -> Root:
        core = getattr(unwrap(model), "model", None)
        if core is None or not hasattr(core, "layers"):
            raise DistributedError(f"distributed.strategy = 'fsdp': {type(model).__name__} has no decoder layers "
                                   "(model.layers) to shard; use strategy 'ddp'")
        for layer in core.layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=self.mp)
        root = Root(model)
        fully_shard(root, mesh=self.mesh, mp_policy=self.mp)
        for m in _groups(root):
            m.set_gradient_divide_factor(1.0)  # sum: micro-batches carry the global loss weights
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
        return root

    # -- the generate phase ------------------------------------------------------------------------
    @contextmanager
    def full_weights(self) -> Iterator[None]:
        """Within the block, every parameter of the policy is its full (gathered) tensor; freed after."""
        groups = _groups(self.root)
        self.dist.named("gather weights (fsdp)", lambda: [m.unshard() for m in groups])
        try:
            yield
        finally:
            for m in groups:
                m.reshard()

    # -- whole tensors ---------------------------------------------------------------------------
    def full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each (sharded) tensor gathered whole (one all-gather each; every rank calls it), kept on
        the CPU of rank 0 alone, the rank that writes files: the others get an empty dict."""
        out: dict[int, torch.Tensor] = {}
        named = {}
        for name, t in tensors.items():
            if id(t) not in out:
                whole = t.detach()
                if isinstance(whole, DTensor):
                    whole = self.dist.named(f"gather {name}", lambda w=whole: w.full_tensor())
                if not self.dist.is_main:
                    continue
                out[id(t)] = whole.cpu().clone() if whole.device.type != "cpu" else whole.clone()
            named[name] = out[id(t)]
        return named

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """``model``'s whole state dict on rank 0 (None elsewhere; a collective: every rank calls it),
        a tied weight once, under its first name (as ``save_pretrained`` writes it)."""
        seen: set[int] = set()
        own = {k: v for k, v in model.state_dict(keep_vars=True).items() if not (id(v) in seen or seen.add(id(v)))}
        full = self.full(own)  # empty on the ranks other than 0
        return full if self.dist.is_main else None

    def load_full(self, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
        """Copy whole tensors into this rank's shards of ``params`` (same names)."""
        with torch.no_grad():
            for name, p in params.items():
                local, start, stop = self.local(p)
                if stop > start:
                    local.copy_(tensors[name][start:stop])

    def local(self, t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """This rank's rows of ``t`` and where they lie: ``(local tensor, start, stop)``."""
        if not isinstance(t, DTensor):
            return t, 0, t.shape[0] if t.dim() else 0
        local = t.to_local()
        start, stop = rows(t.shape[0], self.dist.rank, self.dist.world_size)
        if local.shape[0] != stop - start:
            raise DistributedError(f"rank {self.dist.rank}: a shard of {local.shape[0]} rows where FSDP's Shard(0) "
                                   f"puts rows {start}-{stop} of {t.shape[0]}")
        return local, start, stop

    def like(self, param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``local`` rows as a tensor sharded like ``param`` (an optimizer moment of it)."""
        return DTensor.from_local(local.to(param.device), param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())


def _groups(root: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


def attach_engine(lm: Any, sharding: Sharding) -> None:
    """Give ``lm`` tao's engine sampler, built over gathered weights (its dtype and device are the
    ones it will sample with) and without re-laying any weight: FSDP owns the parameters' storage."""
    from tao_core.engine import EngineSampler, unsupported_reason
    from tao_core.engine.core import EngineConfig

    reason = unsupported_reason(lm.model)
    if reason is not None or lm.sampler_backend == "hf":
        raise DistributedError(f"distributed.strategy = 'fsdp' samples with tao's engine, which cannot run model "
                               f"{lm.name} ({reason or 'generate.sampler = hf'}); use strategy 'ddp'")
    with sharding.full_weights():
        lm.sampler_cache = (lm.model, lm.sampler_backend, EngineSampler(lm, EngineConfig(k_major_weights=False)))
