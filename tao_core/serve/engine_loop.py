"""The one thread that owns the engine: HTTP handlers hand it requests and cancellations, it steps.

:class:`~tao_core.engine.Engine` is not thread-safe, so exactly one thread adds, aborts and steps. Handlers
(on the asyncio event loop) put commands in an inbox under a condition; the thread sleeps on that
condition while nothing is in flight (no busy wait), otherwise it applies the commands and runs one
``engine.step()``, so requests join and leave the running batch at every step (continuous batching).
Tokens come back through each request's ``on_token`` callback; after the step, each request's new tokens
go to its asyncio queue in one ``call_soon_threadsafe``, then its result when it finished.

Admission: at most ``max_queue`` requests may wait (accepted, no token sampled yet); the next one is
refused with :class:`Overloaded`. Shutdown refuses new requests (:class:`Closed`), lets those in flight
finish (``engine.start_drain``), and aborts what is left after a timeout.

Model versions (:class:`WeightRouter`, this thread only): each request is admitted under the version
served when its ``add`` command is applied (``Submission.version``) and runs on that version's weights to
its end. A :class:`Swap` command registers the new version's tensors as an engine weight set and sends
every later request to it; once no request in flight uses the model's own parameters, the new tensors are
copied into them in place and new requests run on the parameters again; the weight set is removed when
its last request finishes. Two copies of the weights exist during a swap, one before and after (each
with its packed twin under ``pack_weights``: tao_core.engine.linear.PackedLinears).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from tao_core.engine import Engine, EngineRequest, EngineResult
from tao_core.engine.weights import POLICY
from tao_core.serve.metrics import Metrics

log = logging.getLogger(__name__)

# (sample index, token id, log-prob, top log-probs [(token id, log-prob)], [] unless asked for)
TokenEvent = tuple[int, int, float, list[tuple[int, float]]]


class Overloaded(Exception):
    """The wait queue is full: answer 429 with Retry-After."""


class Closed(Exception):
    """The server is shutting down: answer 503."""


@dataclass
class Finished:
    """The last event of a request: the engine's result, or why the server failed it."""

    result: EngineResult
    server_error: str | None = None  # the engine step raised: a 500, not the request's fault


@dataclass(eq=False)
class Submission:
    """One HTTP request's engine request and the asyncio queue its events come back on.

    The queue receives lists of :data:`TokenEvent` (streaming requests only) and finally one
    :class:`Finished`.
    """

    request: EngineRequest  # its on_token is set by the loop
    stream: bool  # send each step's tokens, not only the result
    aloop: asyncio.AbstractEventLoop  # the event loop of the handler waiting for it
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    accepted_at: float = field(default_factory=time.perf_counter)
    request_id: int | None = None  # the engine's id, set by the loop thread
    first_token_at: float | None = None
    pending: list[TokenEvent] = field(default_factory=list)  # this step's tokens (loop thread)
    group: Any = None  # the engine's in-flight request, read for streamed top log-probs
    version: str | None = None  # the model version it was admitted under, set by the loop thread


@dataclass(eq=False)
class Swap:
    """A command: serve ``tensors`` (every parameter of the model by name, shaped, typed and placed like
    it: :func:`tao_core.serve.versions.read_weights`) as model version ``version``."""

    version: str
    tensors: dict[str, torch.Tensor]  # handed to the engine when applied; the command keeps no reference
    applied: Future = field(default_factory=Future)  # done when requests admitted from now on get ``version``
    settled: Future = field(default_factory=Future)  # done when the old weights are gone (one copy again)


class WeightRouter:
    """Which weights each request runs on, and the swap from one model version to the next (loop thread
    only; see the module docstring)."""

    def __init__(self, engine: Engine, version: str = "0") -> None:
        self.engine = engine
        self.version = version  # new requests are admitted under this version
        self.policy_version = version  # the model's own parameters hold this version
        self._sets: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # version -> (engine weight set, tensors)
        self._settled: list[Future] = []
        self._swaps = 0

    def name(self, version: str) -> None:
        """Name the version the model's parameters hold (before the loop starts)."""
        if self._swaps:
            raise RuntimeError("name() names the weights the engine starts with; use a Swap to change them")
        self.version = self.policy_version = version

    def route(self, sub: Submission) -> None:
        sub.version = self.version
        sub.request.weight_set = POLICY if self.version == self.policy_version else self._sets[self.version][0]

    def begin(self, swap: Swap) -> None:
        """Apply ``swap``: requests admitted from now on run on its tensors."""
        tensors, swap.tensors = swap.tensors, {}
        if self._sets or swap.version == self.version:  # tao_core.serve.versions waits for the last swap to settle
            _resolve(swap.applied, RuntimeError(
                f"cannot swap to version {swap.version!r}: version {self.version!r} is served and the swap to it "
                f"has not settled (weight sets {sorted(self._sets)}); wait for the previous swap's `settled`"))
            return
        name = f"serve-version-{self._swaps}"
        self._swaps += 1
        try:
            self.engine.add_weight_set(name, tensors)
        except Exception as e:
            _resolve(swap.applied, e)
            return
        self._sets[swap.version] = (name, tensors)
        self.version = swap.version
        self._settled.append(swap.settled)
        _resolve(swap.applied)

    def settle(self, live: Iterable[Submission]) -> None:
        """Fold the served version into the model's parameters once nobody runs on the old ones, and drop
        the weight sets nobody uses any more."""
        users = Counter(sub.request.weight_set for sub in live)
        if self.policy_version != self.version and not users[POLICY]:
            params = dict(self.engine.model.named_parameters())
            with torch.no_grad():
                for name, tensor in self._sets[self.version][1].items():
                    params[name].copy_(tensor)
            self.policy_version = self.version  # the engine drops cached prefixes of the old weights
        for version, (name, _) in list(self._sets.items()):
            if (version != self.version or version == self.policy_version) and not users[name]:
                self.engine.remove_weight_set(name)
                del self._sets[version]
        if not self._sets:
            for f in self._settled:
                _resolve(f)
            self._settled = []

    def fail_pending(self, reason: str) -> None:
        for f in self._settled:
            _resolve(f, Closed(reason))
        self._settled = []


def _resolve(f: Future, error: BaseException | None = None) -> None:
    """Complete ``f`` from the loop thread, unless whoever waited for it gave up (cancelled it)."""
    try:
        if error is None:
            f.set_result(None)
        else:
            f.set_exception(error)
    except InvalidStateError:
        pass


class EngineLoop:
    """Runs ``engine`` in one thread for any number of asyncio handlers; see the module docstring."""

    def __init__(self, engine: Engine, *, max_queue: int, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.weights = WeightRouter(engine)  # the loop thread's; name its first version before start()
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []  # commands, applied in order by the thread
        self._live: dict[int, Submission] = {}  # engine id -> submission (loop thread only)
        self._stepped: set[int] = set()  # requests that got a token in the current step (loop thread only)
        self._waiting = 0  # accepted, no token yet (under _cond)
        self._running = 0  # generating (under _cond)
        self._closed = False  # no new requests (under _cond)
        self._stopping = False  # drained: exit once nothing is in flight (loop thread only)
        self._thread: threading.Thread | None = None

    # called from the event loop ---------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tao-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, sub: Submission) -> None:
        """Queue ``sub`` for the engine; :class:`Overloaded` when ``max_queue`` requests wait, :class:`Closed`
        when shutting down."""
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise Overloaded(f"{self._waiting} requests are waiting for the engine, the most this server "
                                 f"queues (tao serve --max-queue {self.max_queue}); retry later")
            self._waiting += 1
            self._inbox.append(("add", sub))
            self._cond.notify()

    def swap(self, swap: Swap) -> None:
        """Queue a model version swap (:class:`Swap`); :class:`Closed` when shutting down."""
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            self._inbox.append(("swap", swap))
            self._cond.notify()

    def cancel(self, sub: Submission) -> None:
        """Abort ``sub`` (its client went away): the engine frees its cache blocks at once."""
        with self._cond:
            self._inbox.append(("cancel", sub))
            self._cond.notify()

    def shutdown(self, timeout: float) -> bool:
        """Refuse new requests, let those in flight finish for up to ``timeout`` seconds, abort the rest,
        stop the thread. True when everything finished without an abort."""
        with self._cond:
            self._closed = True
            self._inbox.append(("drain", None))
            self._cond.notify()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        with self._cond:
            self._inbox.append(("abort_all", None))
            self._cond.notify()
        self._thread.join()
        return False

    @property
    def waiting(self) -> int:
        with self._cond:
            return self._waiting

    @property
    def running(self) -> int:
        with self._cond:
            return self._running

    @property
    def alive(self) -> bool:
        """The thread runs and takes new requests."""
        with self._cond:
            return self._thread is not None and self._thread.is_alive() and not self._closed

    # the loop thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._inbox and not self._live and not self._stopping:
                    self._cond.wait()
                commands, self._inbox = self._inbox, []
                if not commands and not self._live:
                    self.weights.fail_pending("the server shut down before the model version swap settled")
                    return  # drained
            try:
                for op, sub in commands:
                    self._apply(op, sub)
                if self._live:
                    self._step()
                self.weights.settle(self._live.values())
            except Exception as e:  # a bug here must not leave handlers waiting forever
                log.exception("tao serve: the engine loop failed")
                self._fail_all(f"the engine loop failed: {type(e).__name__}: {e}")

    def _apply(self, op: str, sub: Any) -> None:
        if op == "add":
            sub.request.on_token = self._on_token
            self.weights.route(sub)
            try:
                sub.request_id = self.engine.add_request(sub.request)
            except Exception as e:  # a bad request gets an error result; this is a bug: fail it alone
                log.exception("tao serve: engine.add_request failed")
                self._ended(sub)
                self._post(sub, Finished(EngineResult(-1, error=str(e)), server_error=f"{type(e).__name__}: {e}"))
                return
            self._live[sub.request_id] = sub
            if sub.stream and sub.request.params.top_logprobs:
                # on_token carries no top log-probs: read them from the engine's request, found once
                sub.group = self.engine.scheduler.find(sub.request_id)
        elif op == "swap":
            self.weights.begin(sub)
        elif op == "cancel":
            if sub.request_id in self._live:
                self.engine.abort(sub.request_id)
        elif op == "drain":
            self.engine.start_drain()
            self._stopping = True
        elif op == "abort_all":
            for rid in list(self._live):
                self.engine.abort(rid)

    def _on_token(self, request_id: int, index: int, token: int, logprob: float) -> None:
        sub = self._live.get(request_id)
        if sub is None:
            return
        if sub.first_token_at is None:
            sub.first_token_at = time.perf_counter()
            self.metrics.first_token(sub.first_token_at - sub.accepted_at)
            with self._cond:
                self._waiting -= 1
                self._running += 1
        self._stepped.add(request_id)
        if sub.stream:
            top = sub.group.seqs[index].top_logprobs[-1] if sub.group is not None else []
            sub.pending.append((index, token, logprob, list(top)))

    def _step(self) -> None:
        self._stepped = set()
        try:
            results = self.engine.step()
        except Exception as e:  # the engine has aborted what was in flight; fail those requests
            log.exception("tao serve: an engine step failed")
            self._fail_all(f"the engine step failed: {type(e).__name__}: {e}")
            return
        if self._stepped:
            self.metrics.step(len(self._stepped))
        for rid in self._stepped:
            sub = self._live.get(rid)
            if sub is not None and sub.pending:
                self._post(sub, sub.pending)
                sub.pending = []
        for result in results:
            sub = self._live.pop(result.request_id, None)
            if sub is None:
                continue
            self._ended(sub)
            self.metrics.finished(len(sub.request.prompt_ids), [s.finish_reason for s in result.samples],
                                  sum(len(s.token_ids) for s in result.samples))
            self._post(sub, Finished(result))

    def _fail_all(self, reason: str) -> None:
        for rid, sub in list(self._live.items()):
            self._ended(sub)
            self._post(sub, Finished(EngineResult(rid, error=reason), server_error=reason))
        self._live.clear()

    def _ended(self, sub: Submission) -> None:
        with self._cond:
            if sub.first_token_at is None:
                self._waiting -= 1
            else:
                self._running -= 1

    @staticmethod
    def _post(sub: Submission, item: list[TokenEvent] | Finished) -> None:
        try:
            sub.aloop.call_soon_threadsafe(sub.events.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody waits for this any more
            pass
