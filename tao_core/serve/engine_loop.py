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
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tao_core.engine import Engine, EngineRequest, EngineResult
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


class EngineLoop:
    """Runs ``engine`` in one thread for any number of asyncio handlers; see the module docstring."""

    def __init__(self, engine: Engine, *, max_queue: int, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._inbox: list[tuple[str, Submission | None]] = []  # commands, applied in order by the thread
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
                    return  # drained
            try:
                for op, sub in commands:
                    self._apply(op, sub)
                if self._live:
                    self._step()
            except Exception as e:  # a bug here must not leave handlers waiting forever
                log.exception("tao serve: the engine loop failed")
                self._fail_all(f"the engine loop failed: {type(e).__name__}: {e}")

    def _apply(self, op: str, sub: Submission | None) -> None:
        if op == "add":
            assert sub is not None
            sub.request.on_token = self._on_token
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
        elif op == "cancel":
            assert sub is not None
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
