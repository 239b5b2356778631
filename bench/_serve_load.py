"""The serving benchmark's workload, its HTTP clients and the statistics every mode shares.

A level is ``clients`` closed-loop clients that each send ``requests_per_client`` requests one after
another; client ``c``'s ``j``-th request asks the prompt ``prompts[(c * requests_per_client + j) % len]``,
the same in every mode. Each request leaves a :class:`Trace` (times relative to the level's start, tokens
returned, error), whether it went over HTTP (:func:`run_http_level`) or straight to the engine
(``_serve_offline.py``); :func:`summarize` turns a level's traces into the numbers of a CSV row.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx

CUT = "cut by the time limit"


@dataclass
class Workload:
    """What every mode is asked: the same prompts, clients and ``max_tokens``, greedy decoding."""

    prompts: list[str]  # user messages, one chat turn each
    requests_per_client: int
    max_tokens: int

    def prompt(self, client: int, j: int) -> str:
        return self.prompts[(client * self.requests_per_client + j) % len(self.prompts)]


@dataclass
class Trace:
    """One request as its client saw it; seconds since the level started."""

    start: float
    first_token: float | None = None  # first non-empty text (HTTP) or first sampled token (offline)
    end: float | None = None  # the response complete; None when it failed or was cut
    tokens: int = 0  # tokens returned: the usage count when it came, else the text chunks received
    error: str | None = None


@dataclass
class LevelResult:
    clients: int
    traces: list[Trace] = field(default_factory=list)
    seconds: float = 0.0  # the measured window: to the last completion, or to the time limit when cut
    cut: bool = False  # the time limit ended the level with requests unsent or in flight

    def to_json(self) -> dict:
        return {"clients": self.clients, "seconds": self.seconds, "cut": self.cut,
                "traces": [asdict(t) for t in self.traces]}

    @classmethod
    def from_json(cls, obj: dict) -> LevelResult:
        return cls(obj["clients"], [Trace(**t) for t in obj["traces"]], obj["seconds"], obj["cut"])


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics; None if empty."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(level: LevelResult) -> dict:
    """The CSV numbers of one level: rates over the measured window, latency and TTFT of completed requests."""
    done = [t for t in level.traces if t.error is None and t.end is not None]
    latencies = [t.end - t.start for t in done]
    ttfts = [t.first_token - t.start for t in done if t.first_token is not None]
    tokens = sum(t.tokens for t in level.traces)  # tokens a cut or failed request returned count too
    window = level.seconds or float("nan")
    errors = sorted({t.error for t in level.traces if t.error is not None and t.error != CUT})

    def r(x: float | None, digits: int = 3) -> float | str:
        return "" if x is None else round(x, digits)

    return {
        "clients": level.clients, "requests": len(done), "failed": len(level.traces) - len(done),
        "seconds": r(level.seconds, 2), "requests_per_s": r(len(done) / window), "output_tokens": tokens,
        "output_tokens_per_s": r(tokens / window, 1), "p50_latency_s": r(percentile(latencies, 50)),
        "p99_latency_s": r(percentile(latencies, 99)), "ttft_p50_s": r(percentile(ttfts, 50)),
        "errors": "; ".join(errors)[:300],
    }


async def _one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                       client_request_id: str, trace: Trace, t0: float) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    chunks, usage = 0, None
    async with http.stream("POST", url, json=body, headers={"X-Client-Request-Id": client_request_id}) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"error in the stream: {str(obj['error'])[:200]}")
            if obj.get("usage"):
                usage = int(obj["usage"]["completion_tokens"])
            for choice in obj.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    trace.tokens = chunks
                    if trace.first_token is None:
                        trace.first_token = time.perf_counter() - t0
    trace.tokens = usage if usage is not None else chunks
    trace.end = time.perf_counter() - t0


async def run_http_level(url: str, model: str, work: Workload, clients: int, deadline: float, tag: str) -> LevelResult:
    """``clients`` streaming clients against ``url`` (a chat-completions endpoint) until done or ``deadline``
    (``time.perf_counter()``); what is in flight at the deadline is cancelled and counted as cut."""
    level = LevelResult(clients)
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    timeout = httpx.Timeout(None, connect=30.0)

    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as http:

        async def client_loop(c: int) -> None:
            for j in range(work.requests_per_client):
                if time.perf_counter() >= deadline:
                    return
                trace = Trace(start=time.perf_counter() - t0)
                level.traces.append(trace)
                try:
                    await _one_request(http, url, model, work.prompt(c, j), work.max_tokens,
                                       f"{tag}-{c}-{j}", trace, t0)
                except asyncio.CancelledError:
                    trace.error = CUT
                    raise
                except Exception as e:  # the request failed; the client goes on with its next one
                    trace.error = f"{type(e).__name__}: {e}"[:300]

        tasks = [asyncio.create_task(client_loop(c)) for c in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    unsent = len(level.traces) < clients * work.requests_per_client
    level.cut = bool(pending) or unsent
    ends = [t.end for t in level.traces if t.end is not None]
    level.seconds = deadline - t0 if level.cut else max(ends, default=time.perf_counter() - t0)
    return level
