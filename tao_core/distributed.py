"""Data parallelism over ``torch.distributed``: which rank serves what, and the few named collectives.

``torchrun --nproc-per-node N -m tao_core.cli run CONFIG`` starts N copies of the same run; each
reads its place from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Every rank holds the whole model and its own engine, samples with
the weights it trains, and:

* serves a contiguous block of each step's prompts (:meth:`Dist.shard`): a prompt's whole group on
  one rank, its sampling seed derived from the run's seed, the step and the prompt's id (never from
  the rank), so which rank serves a prompt changes no result;
* shares its candidates, scores and evaluation rows with every rank (:meth:`Dist.gather`), so the
  advantages, the dynamic-sampling and promotion decisions and the metrics are computed on the
  whole batch, the same on every rank;
* trains on the micro-batches of its own groups, weighted by the *global* loss units, and sums the
  gradients over ranks once per optimizer step (:meth:`Dist.reduce_gradients`): the gradient of the
  global loss, as DDP's all-reduce gives, while ranks may hold unequal numbers of micro-batches.

With ``distributed.strategy = "fsdp"`` each rank holds a shard of the model instead
(:mod:`tao_core.dist_fsdp`): the same blocks and gathers, FSDP's reduce-scatter in place of
:meth:`Dist.reduce_gradients`, the weights gathered once per sampling phase (:meth:`Dist.named`
names that gather's failures like the collectives here).

Rank 0 alone reads and writes the run directory; what it reads (checkpoints, stored candidates,
best weights) reaches the others by :meth:`Dist.broadcast`. With one process (no launcher) every
collective returns its input and nothing of ``torch.distributed`` is touched.

Failures: every collective runs under ``distributed.timeout_s``. Before each one a rank records
its arrival in the launcher's key-value store; when a collective fails (a peer died: its socket
closed) or times out (a peer hangs), the failing rank records that in the store and waits briefly
(``FAILURE_GRACE_S``) for its peers to report the same: the ranks that never arrived, or never
report, are named in the :class:`DistributedError`. The launcher ends the remaining ranks when one
exits.
"""

from __future__ import annotations

import datetime
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from tao_core.config import DistributedConfig
from tao_core.errors import TaoError

T = TypeVar("T")
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
FAILURE_GRACE_S = 10.0  # how long a failed rank waits for its peers to report the same failure
FAULT_RANK_ENV = "TAO_FAULT_RANK"  # tests: TAO_FAULT (tao_core.fsio) strikes on this rank only


class DistributedError(TaoError):
    """A rank died, hung or failed: the run stopped on every rank."""


def launched() -> bool:
    """Whether this process is one rank of several started by a launcher (torchrun, Slurm + torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process() -> bool:
    """Whether this process is rank 0 (or the only process): the one that writes and prints."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Dist:
    """This process's place among the ranks, and the collectives the pipeline and trainer call.

    ``Dist()`` is the single process: rank 0 of 1, every collective the identity.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this rank's model lives ("cuda:<local_rank>" with nccl)
    timeout_s: float = 600.0  # collectives give up after this long
    _seq: int = field(default=0, repr=False)  # collectives called so far (the same count on every rank)
    _failing: bool = field(default=False, repr=False)  # a failure is being reported: a SIGTERM waits

    @classmethod
    def from_env(cls, cfg: DistributedConfig) -> Dist:
        """The single process without a launcher; else join the process group the launcher's
        environment describes (gloo on the CPU, nccl on CUDA GPUs unless ``cfg.backend`` says)."""
        if not launched():
            return cls()
        missing = [k for k in LAUNCHER_ENV if k not in os.environ]
        if missing:
            raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set: "
                                   "start the ranks with torchrun (see docs/distributed.md)")
        import torch.distributed as dist

        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        device = "cpu"
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise DistributedError("distributed.backend = 'nccl' needs CUDA GPUs, and torch sees none; use 'gloo'")
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if os.environ.get(FAULT_RANK_ENV, str(rank)) != str(rank):
            os.environ.pop("TAO_FAULT", None)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
        self = cls(rank, world, local, device, cfg.timeout_s)
        self._arrive()
        signal.signal(signal.SIGTERM, self._terminated)
        return self

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """The indices of ``n`` items (a step's prompts, held-out examples) this rank serves: a
        contiguous block, the blocks in rank order, sizes differing by at most one."""
        return range(self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size)

    # -- collectives -------------------------------------------------------------------------------
    def gather(self, name: str, local: Sequence[T]) -> list[T]:
        """Every rank's ``local`` items, concatenated in rank order (each rank's :meth:`shard` block)."""
        if self.world_size == 1:
            return list(local)
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world_size
        self._collective(name, lambda: dist.all_gather_object(parts, list(local)))
        return [item for part in parts for item in part]

    def broadcast(self, name: str, value: T | None) -> T:
        """Rank 0's ``value`` on every rank (the others pass None)."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        box = [value if self.is_main else None]
        self._collective(name, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def sum(self, name: str, values: Sequence[float]) -> list[float]:
        """Elementwise sums of ``values`` over ranks (in float64)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._collective(name, lambda: dist.all_reduce(t))
        return t.cpu().tolist()

    def reduce_gradients(self, name: str, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum each parameter's gradient over ranks, in place, in one all-reduce per dtype.

        A rank that trained on nothing contributes zeros; a parameter no rank gave a gradient keeps
        ``grad = None`` (as in one process, where AdamW then leaves it alone)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, group in by_dtype.items():
            flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype,
                                                                                            device=p.device)
                                for p in group),
                              torch.tensor([float(p.grad is not None) for p in group], dtype=dtype, device=group[0].device)])
            self._collective(f"{name} ({dtype})", lambda flat=flat: dist.all_reduce(flat))
            offset, had = 0, flat[-len(group):]
            for i, p in enumerate(group):
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).clone() if had[i] > 0 else None
                offset += n

    def named(self, name: str, run: Callable[[], T]) -> T:
        """``run()``, a collective of torch's own (an FSDP gather), under the failure handling of
        the collectives above: a failure or timeout names the ranks to blame."""
        if self.world_size == 1:
            return run()
        box: list[Any] = []
        self._collective(name, lambda: box.append(run()))
        return box[0]

    def close(self) -> None:
        """Leave the process group (the single process has none)."""
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    # -- failures ----------------------------------------------------------------------------------
    def _store(self):
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()

    def _arrive(self) -> None:
        """Record in the launcher's store that this rank reached collective number ``_seq``."""
        try:
            self._store().set(f"tao/arrived/{self.rank}", str(self._seq))
        except Exception:  # noqa: BLE001 (the store is only a witness; the collective itself reports)
            pass

    def silent(self) -> list[int]:
        """The ranks to blame for a failed collective: those that never reached it, and those that do
        not report its failure within ``FAILURE_GRACE_S`` (a rank that died or hangs inside it). A live
        peer waiting in the same collective fails too and reports, unless it arrived more than the
        grace period after this rank."""
        try:
            store = self._store()
            store.set(f"tao/failed/{self.rank}", str(self._seq))
            others = [r for r in range(self.world_size) if r != self.rank]
            late = [r for r in others if not store.check([f"tao/arrived/{r}"])
                    or int(store.get(f"tao/arrived/{r}")) < self._seq]
            deadline = time.monotonic() + min(FAILURE_GRACE_S, self.timeout_s)
            while True:
                quiet = [r for r in others if r not in late and not store.check([f"tao/failed/{r}"])]
                if not quiet or time.monotonic() > deadline:
                    return sorted(late + quiet)
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 (the store went with the launcher: nothing more to learn)
            return []

    def describe_failure(self, what: str) -> str:
        """``what`` happened on this rank, with the ranks to blame when the store knows them."""
        blamed = self.silent()
        who = (f"rank {', '.join(map(str, blamed))} did not answer (it died or hangs)" if blamed
               else "a peer rank failed")
        return f"rank {self.rank} of {self.world_size}: {what}; {who}"

    def _collective(self, name: str, run: Callable[[], Any]) -> None:
        self._seq += 1
        self._arrive()
        try:
            run()
        except Exception as e:  # noqa: BLE001 (gloo and nccl raise RuntimeError subclasses of their own)
            self._failing = True
            raise DistributedError(self.describe_failure(
                f"collective {name!r} failed or timed out (distributed.timeout_s = {self.timeout_s:g}): "
                f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")) from None

    def _terminated(self, signum: int, frame: Any) -> None:
        """SIGTERM from the launcher, which ends every rank when one fails: report it as a failure."""
        if self._failing:
            return
        self._failing = True
        raise DistributedError(self.describe_failure("stopped by the launcher (SIGTERM), which ends every rank "
                                                     "when one of them fails"))
