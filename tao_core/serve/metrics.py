"""The server's counters, gauges and histograms, rendered in Prometheus' text format for ``GET /metrics``.

Updated from both the event loop (requests) and the engine thread (tokens, steps), under one lock.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Sequence

LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # requests


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus expects."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = list(buckets)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.bounds, self.counts, strict=True)]
        return [*out, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]


class Metrics:
    """What ``/metrics`` reports; see :meth:`render` for the names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, HTTP status) -> count
        self.samples: dict[str, int] = defaultdict(int)  # finish reason -> samples
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.step_requests = Histogram(BATCH_BUCKETS)

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            self.latency.observe(seconds)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def step(self, requests: int) -> None:
        with self._lock:
            self.step_requests.observe(requests)

    def finished(self, prompt_tokens: int, reasons: Sequence[str], tokens: int) -> None:
        """An engine request ended: its prompt length, each sample's finish reason, the tokens sampled."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += tokens
            for r in reasons:
                self.samples[r] += 1

    def render(self, *, running: int, waiting: int) -> str:
        with self._lock:
            blocks = [
                _block("tao_requests_total", "counter", "HTTP requests answered, by endpoint and status "
                       "(499: the client went away before the answer ended).",
                       [f'tao_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]),
                _block("tao_samples_total", "counter", "Completions finished, by finish reason (abort: client gone).",
                       [f'tao_samples_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.samples.items())]),
                _block("tao_prompt_tokens_total", "counter", "Prompt tokens of the requests the engine finished.",
                       [f"tao_prompt_tokens_total {self.prompt_tokens}"]),
                _block("tao_generated_tokens_total", "counter", "Tokens sampled by the engine (before stop-string cuts).",
                       [f"tao_generated_tokens_total {self.generated_tokens}"]),
                _block("tao_requests_running", "gauge", "Requests generating now.", [f"tao_requests_running {running}"]),
                _block("tao_requests_waiting", "gauge", "Requests accepted, not generating yet (bounded by --max-queue).",
                       [f"tao_requests_waiting {waiting}"]),
                _block("tao_time_to_first_token_seconds", "histogram", "From acceptance to the first sampled token.",
                       self.ttft.lines("tao_time_to_first_token_seconds")),
                _block("tao_request_latency_seconds", "histogram", "From the request's arrival to the end of its answer.",
                       self.latency.lines("tao_request_latency_seconds")),
                _block("tao_step_requests", "histogram", "Requests that got a token in one engine step (continuous batching).",
                       self.step_requests.lines("tao_step_requests")),
            ]
        return "".join(blocks)


def _block(name: str, kind: str, help_text: str, lines: list[str]) -> str:
    return "\n".join([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]) + "\n"


def _number(x: float) -> str:
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)
