"""Data parallelism over ``torch.distributed``: which rank serves what, and the few named collectives.

``torchrun --nproc-per-node N -m tao_core.cli run CONFIG`` starts N copies of the same run; each
reads its place from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``). Every rank samples with its own engine from the weights it trains,
and:

* serves a contiguous block of each step's prompts (:meth:`Dist.shard`): a prompt's whole group on
  one rank, its sampling seed derived from the run's seed, the step and the prompt's id (never from
  the rank), so which rank serves a prompt changes no result;
* shares its candidates, scores and evaluation rows with every rank (:meth:`Dist.gather`), so the
  advantages, the dynamic-sampling and promotion decisions and the metrics are computed on the
  whole batch, the same on every rank;
* trains on the micro-batches of its own groups, weighted by the *global* loss units, as many
  micro-batches on every rank (:func:`even_micro_batches` repeats one at weight 0 where a rank has
  fewer), and the gradients are *summed* over ranks: the gradient of the global loss.

``distributed.strategy`` says how the ranks hold the model. ``"ddp"`` (:class:`Replicas`): every rank
holds all of it under torch's ``DistributedDataParallel``, which sums the gradients in buckets during
the backward of an optimizer step's last micro-batch (the others run under ``no_sync``). ``"fsdp"``
(:mod:`tao_core.dist_fsdp`): each rank holds a shard (FSDP2), FSDP gathers the weights for each
forward and backward and reduce-scatters the gradients, and the engine samples from weights gathered
once per sampling phase.

Rank 0 alone reads and writes the run directory; what it reads (checkpoints, stored candidates,
best weights) reaches the others by :meth:`Dist.broadcast`. With one process (no launcher) every
collective returns its input and nothing of ``torch.distributed`` is touched.

Failures: a rank that dies or hangs ends the run within ``distributed.timeout_s``, whatever
collective its peers wait in: the named ones here, and torch's own inside a :meth:`Dist.watch` block
(DDP's bucket all-reduce, FSDP's all-gather and reduce-scatter, which the trainer runs in one).
Before each one a rank records its arrival in the launcher's key-value store; when a collective fails
(a peer died: its socket closed) or times out (a peer hangs: after ``timeout_s`` less the grace
period), the failing rank records that in the store and waits for the grace period
(:attr:`Dist.grace_s`) for its peers to report the same: the ranks that never report are named in
the :class:`DistributedError`, except a rank ahead (it waits in a later collective, for this one)
unless it is known dead (each rank records its host and pid: a peer on the same host whose process
is gone). The launcher ends the remaining ranks when one exits, and every rank when it is stopped
itself (SIGTERM, which each rank reports as such, blaming only the peers known dead; then SIGKILL
after 30 s). A launcher's
environment that does not hold together (``RANK`` outside ``[0, WORLD_SIZE)``, a non-integer, no
rank 0 to meet) is a :class:`DistributedError` saying what to do.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from tao_core.config import DistributedConfig
from tao_core.errors import TaoError
from tao_core.fsio import fault_point

T = TypeVar("T")
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
FAILURE_GRACE_S = 10.0  # how long (at most) a failed rank waits for its peers to report the same failure
FAULT_RANK_ENV = "TAO_FAULT_RANK"  # tests: TAO_FAULT (tao_core.fsio) and TAO_FAULT_HANG strike on this rank only
HANG_ENV = "TAO_FAULT_HANG"  # tests: NAME[:K] makes this process stop answering at its K-th hang_point(NAME)
# what a backend's failure says (gloo and nccl raise plain RuntimeErrors): a peer closed, a timeout
BACKEND_FAILURE = ("connection closed", "connection reset", "timed out", "timeout", "pair closure", "gloo", "nccl")
_hang_arrivals: dict[str, int] = {}


class DistributedError(TaoError):
    """A rank died, hung or failed: the run stopped on every rank."""


def launched() -> bool:
    """Whether this process is one rank of several started by a launcher (torchrun, Slurm + torchrun);
    a :class:`DistributedError` when ``WORLD_SIZE`` is not a positive integer."""
    return _env_int("WORLD_SIZE", "1", 1) > 1


def _env_int(key: str, default: str, low: int, high: int | None = None) -> int:
    """The launcher's variable ``key`` as an integer in ``[low, high)``; a clear error otherwise."""
    raw = os.environ.get(key, default)
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value >= high):
        span = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high})"
        raise DistributedError(f"the launcher's environment: {key}={raw!r} is not {span}; start the ranks with "
                               "torchrun, or unset RANK, WORLD_SIZE and LOCAL_RANK to run one process "
                               "(see docs/distributed.md)")
    return value


def hang_point(name: str) -> None:
    """Stop answering here, for good, when ``TAO_FAULT_HANG`` names this point (``NAME[:K]``: the K-th
    arrival, default the first): a rank that hangs, for the tests. The process only sleeps, so the
    launcher's SIGTERM still ends it. It is also a fault point (``TAO_FAULT`` kills the process here,
    :func:`tao_core.fsio.fault_point`). Costs a dict lookup when unset; users never need it."""
    fault_point(name)
    raw = os.environ.get(HANG_ENV)
    if not raw:
        return
    point, _, k = raw.partition(":")
    if point != name:
        return
    _hang_arrivals[name] = _hang_arrivals.get(name, 0) + 1
    if _hang_arrivals[name] == int(k or 1):
        while True:
            time.sleep(3600)


def main_process() -> bool:
    """Whether this process is rank 0 (or the only process): the one that writes and prints. A
    ``RANK`` left in the environment of a single process (``WORLD_SIZE`` unset or 1) changes nothing."""
    return not launched() or os.environ.get("RANK", "0").strip() == "0"


@dataclass
class Dist:
    """This process's place among the ranks, and the collectives the pipeline and trainer call.

    ``Dist()`` is the single process: rank 0 of 1, every collective the identity.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where this rank's model lives ("cuda:<local_rank>" with nccl)
    timeout_s: float = 600.0  # a failure ends the run after this long: collectives time out, then the grace period
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

        world = _env_int("WORLD_SIZE", "1", 1)
        rank, local = _env_int("RANK", "", 0, world), _env_int("LOCAL_RANK", "", 0)
        _env_int("MASTER_PORT", "", 1, 65536)
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
        device = "cpu"
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise DistributedError("distributed.backend = 'nccl' needs CUDA GPUs, and torch sees none; use 'gloo'")
            if local >= torch.cuda.device_count():
                raise DistributedError(f"rank {rank}: LOCAL_RANK={local}, but this node has {torch.cuda.device_count()} "
                                       "GPU(s): start at most that many processes per node (--nproc-per-node)")
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if os.environ.get(FAULT_RANK_ENV, str(rank)) != str(rank):
            os.environ.pop("TAO_FAULT", None)
            os.environ.pop(HANG_ENV, None)
        self = cls(rank, world, local, device, cfg.timeout_s)
        if not dist.is_initialized():
            self._join(backend)
        self._arrive()
        self._register()
        signal.signal(signal.SIGTERM, self._terminated)
        return self

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _join(self, backend: str) -> None:
        """Join the process group at ``MASTER_ADDR:MASTER_PORT``; a failure (a peer that never comes,
        an address nobody listens at) is a :class:`DistributedError` saying what to check."""
        import torch.distributed as dist

        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=self.timeout_s - self.grace_s))
        except (dist.DistError, RuntimeError) as e:
            first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            raise DistributedError(f"rank {self.rank} of {self.world_size}: could not join the other ranks at {where} "
                                   f"(distributed.timeout_s = {self.timeout_s:g}; {type(e).__name__}: {first}); "
                                   "start every rank with torchrun (one per node, the same --nnodes and "
                                   "--nproc-per-node, one rendezvous endpoint; see docs/distributed.md)") from None

    @property
    def grace_s(self) -> float:
        """How long a rank whose collective failed waits for its peers to report the same (a quarter of
        ``timeout_s``, at most ``FAILURE_GRACE_S``); collectives time out this much before ``timeout_s``."""
        return min(FAILURE_GRACE_S, self.timeout_s / 4)

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

    def named(self, name: str, run: Callable[[], T]) -> T:
        """``run()``, a collective of torch's own (an FSDP gather, DDP's first broadcast), under the
        failure handling of the collectives above: a failure or timeout names the ranks to blame."""
        if self.world_size == 1:
            return run()
        box: list[Any] = []
        self._collective(name, lambda: box.append(run()))
        return box[0]

    @contextmanager
    def watch(self, name: str) -> Iterator[None]:
        """A block that every rank runs and in which torch runs collectives of its own (DDP's bucket
        all-reduce, FSDP's all-gather and reduce-scatter): a backend's failure or timeout in it is a
        :class:`DistributedError` naming the ranks to blame, as for the collectives above; any
        other error (a plugin's, a bug) passes unchanged."""
        if self.world_size == 1:
            yield
            return
        self._seq += 1
        self._arrive()
        try:
            yield
        except Exception as e:  # noqa: BLE001 (only a backend's failure is rewritten; the rest is re-raised)
            if isinstance(e, DistributedError) or not backend_failure(e):
                raise
            self._fail(f"{name} failed or timed out", e)

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

    def _register(self) -> None:
        """Record in the launcher's store where this rank runs (:func:`pid_namespace` and pid): a peer
        that sees the same processes can then tell that this one is gone (:meth:`silent`)."""
        try:
            self._store().set(f"tao/who/{self.rank}", f"{pid_namespace()} {os.getpid()}")
        except Exception:  # noqa: BLE001 (the store is only a witness)
            pass

    def silent(self, *, stopped: bool = False) -> list[int]:
        """The ranks to blame for this rank's failure, from what every rank recorded in the launcher's
        store. A peer that reports a failure of its own (a collective's, the launcher's SIGTERM)
        answered, and is never blamed; a peer known dead (on this host, its process is gone) is.

        When a collective of this rank failed or timed out, a peer is also blamed when it reports
        nothing within :attr:`grace_s` and is not ahead: a peer ahead waits in a later collective, for
        this rank, and cannot report while it waits. When the launcher stopped this rank (``stopped``:
        SIGTERM, sent to every rank when one fails or when torchrun itself is stopped), a live peer
        may be waiting in a collective for this one: only the dead are blamed, so stopping torchrun
        blames no rank."""
        try:
            store = self._store()
            store.set(f"tao/failed/{self.rank}", str(self._seq))
            others = [r for r in range(self.world_size) if r != self.rank]
            arrived = {r: int(store.get(f"tao/arrived/{r}")) if store.check([f"tao/arrived/{r}"]) else -1
                       for r in others}
            deadline = time.monotonic() + self.grace_s
            while True:
                unreported = [r for r in others if not store.check([f"tao/failed/{r}"])]
                dead = {r for r in unreported if self._dead(store, r)}
                quiet = [r for r in unreported if r in dead or (not stopped and arrived[r] <= self._seq)]
                if all(r in dead for r in quiet) or time.monotonic() > deadline:
                    return quiet
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 (the store went with the launcher: nothing more to learn)
            return []

    def _dead(self, store: Any, rank: int) -> bool:
        """Whether peer ``rank`` ran in this host's process namespace and its process is gone (or a zombie)."""
        key = f"tao/who/{rank}"
        if not store.check([key]):
            return False
        host, _, pid = store.get(key).decode().rpartition(" ")
        return host == pid_namespace() and not process_alive(int(pid))

    def describe_failure(self, what: str, *, stopped: bool = False) -> str:
        """``what`` happened on this rank, with the ranks to blame when the store knows them
        (``stopped``: by the launcher's SIGTERM, :meth:`silent`)."""
        blamed = self.silent(stopped=stopped)
        who = (f"rank {', '.join(map(str, blamed))} did not answer (it died or hangs)" if blamed
               else "a peer rank failed or was stopped")
        return f"rank {self.rank} of {self.world_size}: {what}; {who}"

    def _collective(self, name: str, run: Callable[[], Any]) -> None:
        self._seq += 1
        self._arrive()
        try:
            run()
        except DistributedError:  # already named (a nested collective, or the launcher's SIGTERM in this one)
            raise
        except Exception as e:  # noqa: BLE001 (gloo and nccl raise RuntimeError subclasses of their own)
            self._fail(f"collective {name!r} failed or timed out", e)

    def _fail(self, what: str, e: Exception) -> None:
        self._failing = True
        first = str(e).splitlines()[0][:300] if str(e) else ""
        hint = ("; if every rank was alive, one worked longer than that between two collectives (loading the model, "
                "a long generation or scoring, rank 0 writing a checkpoint or the model alone): raise "
                "distributed.timeout_s" if "timed out" in str(e).lower() or "timeout" in str(e).lower() else "")
        raise DistributedError(self.describe_failure(
            f"{what} (distributed.timeout_s = {self.timeout_s:g}): {type(e).__name__}: {first}") + hint) from None

    def _terminated(self, signum: int, frame: Any) -> None:
        """SIGTERM from the launcher, which ends every rank when one fails (or when it is stopped
        itself): report it as a failure, naming the peers to blame if any."""
        if self._failing:
            return
        self._failing = True
        raise DistributedError(self.describe_failure("stopped by the launcher (SIGTERM), which ends every rank "
                                                     "when one of them fails or when it is stopped itself",
                                                     stopped=True))


def backend_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective's failure (a peer's socket closed, a timeout), not a bug: torch's
    ``DistError``, or the plain RuntimeError gloo and nccl raise, which says so (:data:`BACKEND_FAILURE`)."""
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(m in text for m in BACKEND_FAILURE))


def pid_namespace() -> str:
    """This machine's boot and process namespace: two processes that print the same string see the
    same pids (a host name alone can repeat across nodes or containers)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:  # no /proc (macOS)
        return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] not in "ZX"
    except FileNotFoundError:
        return False
    except (OSError, ValueError, IndexError):  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def scalar(t: torch.Tensor) -> float:
    """A scalar tensor as a float: a DTensor's whole value under FSDP (a collective: every rank calls it)."""
    full = getattr(t, "full_tensor", None)
    return float(full() if callable(full) else t)


class Root(torch.nn.Module):
    """A module over a causal LM whose forward is ``fn()``: ``root(fn)`` runs the trainer's own loss
    computation (``fn`` reads the model it closes over) as the forward of the DDP or FSDP wrapper
    around it, so the wrapper's hooks frame it (DDP's bucket all-reduce, FSDP's gathers).

    Return the loss tensor at the top level of ``fn``'s result (a tuple), where the wrapper looks
    for it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[], T]) -> T:
        return fn()


class Replicas:
    """``distributed.strategy = "ddp"``: torch's ``DistributedDataParallel`` over a loaded model's policy.

    Every rank holds the whole model; DDP wraps it in place (the engine keeps sampling from the very
    same parameters) after broadcasting rank 0's weights. ``root(fn)`` runs a micro-batch's loss as
    DDP's forward; the gradients are *summed* over ranks (the micro-batches carry the global loss
    weights), in buckets, during the backward of the optimizer step's last micro-batch: the others
    run under ``no_sync`` (:meth:`accumulating`). The gradients then are views into the buckets (no
    second copy between steps). Every trainable parameter must reach each
    micro-batch's loss (a causal LM's, full or LoRA, do; DDP names one that does not)."""

    collectives = "gradient all-reduce (DDP)"  # what the training step's collectives are, for errors

    def __init__(self, dist: Dist, lm: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        from tao_core.sampler import sampler_for

        # the engine starts first: it may store float32 CPU Linear weights K-major (tao_core.onednn),
        # and DDP lays its gradient buckets out like the parameters as they are when it wraps them
        sampler_for(lm)
        device = torch.device(dist.device)
        ids = [device.index] if device.type == "cuda" else None
        self.root = dist.named("broadcast rank 0's weights (ddp)", lambda: DistributedDataParallel(
            Root(lm.model), device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True))
        self.root.register_comm_hook(None, _sum_hook)

    def accumulating(self, more: bool) -> AbstractContextManager:
        """The context of one micro-batch's forward and backward: while ``more`` micro-batches of the
        optimizer step follow, its gradients stay local (``no_sync``); the last one's backward sums them all."""
        return self.root.no_sync() if more else nullcontext()


def _sum_hook(state, bucket):  # noqa: ANN001, ANN202 (DDP refuses annotations other than its own classes)
    """DDP's communication hook: a bucket's gradients summed over ranks (DDP's own hook averages);
    returns the future of the summed ``bucket.buffer()``."""
    import torch.distributed as dist

    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def even_micro_batches(dist: Dist, packed: list, units: list[float], spare: Callable[[], Any]) -> tuple[list, list[float]]:
    """``packed`` and ``units`` extended to the largest micro-batch count over ranks with ``spare()``
    at weight 0. FSDP communicates in every micro-batch's forward and backward, DDP in the last one's
    backward: with as many micro-batches on every rank, the same collectives meet."""
    most = max(dist.gather("micro-batch counts", [len(packed)]))
    extra = most - len(packed)
    if extra <= 0:
        return packed, units
    one = spare()
    return [*packed, *([one] * extra)], [*units, *([0.0] * extra)]
