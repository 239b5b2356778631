"""`tao serve`: the real server on a loopback port, driven by the official `openai` client and httpx.

One server over the tiny model serves most tests. A test that needs requests to pile up holds the
server's engine loop before each engine step (:class:`StepGate`) and lets steps through when it is ready,
so nothing here depends on how fast anything runs.
"""

from __future__ import annotations

import json
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
import uvicorn  # noqa: E402

from tao_core.engine import Engine  # noqa: E402
from tao_core.models import load_model  # noqa: E402
from tao_core.serve.app import create_app  # noqa: E402
from tao_core.serve.settings import ServeConfig  # noqa: E402
from tao_core.types import Prompt  # noqa: E402
from tests.conftest import completion_logprobs  # noqa: E402

MODEL = "tiny"
# an empty key store of its own (open on loopback), never the developer's $TAO_HOME/keys.json
KEYS = Path(tempfile.mkdtemp(prefix="tao-serve-keys-")) / "keys.json"
CONFIG = ServeConfig(served_model=MODEL, model_version="v1", tag="test", max_queue=8, max_tokens_limit=64,
                     default_max_tokens=24, max_n=4, max_body_bytes=16_384, keys=str(KEYS), rate_limit=0)
QUESTION = [{"role": "user", "content": "What is 12 plus 35?"}]


class RecordingLogger:
    """An ExchangeLogger that keeps the records; ``fail`` makes ``log`` raise."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.closed = False
        self.fail = False

    def log(self, record: dict[str, Any]) -> None:
        if self.fail:
            raise RuntimeError("the table is down")
        self.records.append(record)

    def close(self) -> None:
        self.closed = True

    def find(self, request_id: str) -> dict[str, Any]:
        wait_until(lambda: any(r["request_id"] == request_id for r in self.records), f"the record of {request_id}")
        return next(r for r in self.records if r["request_id"] == request_id)


@dataclass
class Running:
    app: Any
    server: uvicorn.Server
    thread: threading.Thread
    port: int
    logger: RecordingLogger

    @property
    def state(self):
        return self.app.state.tao

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics").text


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` if it never does (a hang, not a timing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@contextmanager
def on_loopback(app) -> Iterator[tuple[uvicorn.Server, threading.Thread, int]]:
    """``app`` under uvicorn in a thread on a free loopback port: (server, thread, port); stopped on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the server to start")
    assert server.started, "uvicorn did not start"
    try:
        yield server, thread, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@contextmanager
def running_server(lm, config: ServeConfig, logger: RecordingLogger) -> Iterator[Running]:
    app = create_app(lm, config, logger=logger)
    with on_loopback(app) as (server, thread, port):
        yield Running(app, server, thread, port, logger)


class StepGate:
    """Holds the engine loop before each engine step until the test lets one step (``allow``) or all
    (``open``) through."""

    def __init__(self, engine: Engine) -> None:
        self._step = engine.step
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()

    def step(self):
        while not self._open.is_set() and not self._permits.acquire(timeout=0.01):
            pass
        return self._step()

    def allow(self, steps: int = 1) -> None:
        for _ in range(steps):
            self._permits.release()

    def open(self) -> None:
        self._open.set()


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def served(lm) -> Iterator[Running]:
    with running_server(lm, CONFIG, RecordingLogger()) as running:
        yield running


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def gate(served, monkeypatch) -> Iterator[StepGate]:
    loop = served.state.loop
    gate = StepGate(loop.engine)
    monkeypatch.setattr(loop.engine, "step", gate.step)
    try:
        yield gate
    finally:
        gate.open()
        wait_until(lambda: loop.running == 0 and loop.waiting == 0, "the engine loop to go idle")


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text (0 when absent)."""
    selector = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    m = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def sse(lines: Iterator[str]) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def streamed_text(chunks, kind: str = "chat") -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = (c.delta.content or "") if kind == "chat" else c.text
            texts[c.index] = texts.get(c.index, "") + piece
    return texts


# --- answers ---------------------------------------------------------------------------------------

def test_chat_completion_answers_and_is_logged(served, client, lm):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=12, seed=3, extra_headers={"X-Client-Request-Id": "client-7"})
    r = raw.parse()
    assert raw.headers["x-request-id"] == r.id and r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion" and r.model == MODEL and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length") and choice.logprobs is None
    prompt = lm.prompt_token_ids(Prompt(id="p", messages=QUESTION))
    record = served.logger.find(r.id)
    assert r.usage.prompt_tokens == len(prompt) == len(record["prompt_token_ids"])
    assert record["prompt_token_ids"] == prompt
    assert r.usage.completion_tokens == len(record["completion_token_ids"][0]) <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lm.tokenizer.decode(record["completion_token_ids"][0], skip_special_tokens=True) == choice.message.content
    assert {k: record[k] for k in ("client_request_id", "status_code", "served_model", "model_version", "policy_version",
                                   "tag")} == {"client_request_id": "client-7", "status_code": 200, "served_model": MODEL,
                                               "model_version": "v1", "policy_version": "v1", "tag": "test"}
    assert record["request_json"]["messages"] == QUESTION and record["response_json"]["id"] == r.id
    assert record["execution_ms"] > 0 and record["request_time"].tzinfo is not None
    assert len(record["completion_logprobs"][0]) == len(record["completion_token_ids"][0])


def test_completions_take_text_or_token_ids(served, client, lm):
    by_text = client.completions.create(model=MODEL, prompt="hello world", max_tokens=8, seed=4)
    ids = lm.tokenizer("hello world")["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, seed=4)
    assert by_text.object == "text_completion" and by_text.id.startswith("cmpl-")
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens <= 8
    assert served.logger.find(by_ids.id)["prompt_token_ids"] == ids


def test_n_samples_are_independent_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, n=3, max_tokens=16, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    one = client.chat.completions.create(model=MODEL, messages=QUESTION, n=1, max_tokens=16, seed=5)
    assert one.choices[0].message.content == r.choices[0].message.content  # sample j's stream: seed and j only


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_chunks_concatenate_to_the_unstreamed_answer(client, kind):
    if kind == "chat":
        args = {"model": MODEL, "messages": QUESTION, "n": 2, "max_tokens": 20, "seed": 11}
        whole = client.chat.completions.create(**args)
        chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        expected = {c.index: c.message.content for c in whole.choices}
    else:
        args = {"model": MODEL, "prompt": "What is 12 plus", "n": 2, "max_tokens": 20, "seed": 11}
        whole = client.completions.create(**args)
        chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        expected = {c.index: c.text for c in whole.choices}
    assert streamed_text(chunks, kind) == expected
    finish = {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1]) and len({chunk.id for chunk in chunks}) == 1


def test_a_stream_ends_with_done_and_without_usage_unless_asked(served):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "seed": 1, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_logprobs_and_top_logprobs_match_a_full_forward(served, client, lm):
    args = {"model": MODEL, "messages": QUESTION, "max_tokens": 10, "seed": 8, "temperature": 0.7,
            "logprobs": True, "top_logprobs": 3}
    r = client.chat.completions.create(**args)
    record = served.logger.find(r.id)
    prompt, tokens = record["prompt_token_ids"], record["completion_token_ids"][0]
    entries = r.choices[0].logprobs.content
    assert len(entries) == len(tokens) == r.usage.completion_tokens
    reference = completion_logprobs(lm.model, prompt, tokens, temperature=0.7)
    assert [e.logprob for e in entries] == pytest.approx(reference.tolist(), abs=1e-4)
    assert [e.logprob for e in entries] == pytest.approx(record["completion_logprobs"][0], abs=1e-6)
    import torch

    with torch.no_grad():
        logits = lm.model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1] / 0.7
    top = torch.log_softmax(logits.float(), -1).topk(3).values
    for e, token, expected in zip(entries, tokens, top.tolist(), strict=True):
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(expected, abs=1e-4)
        assert e.token == lm.tokenizer.decode([token]) and e.bytes == list(e.token.encode())
    streamed = [e for chunk in client.chat.completions.create(**args, stream=True) for c in chunk.choices
                if c.logprobs for e in c.logprobs.content]
    assert [(e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.logprob, [t.logprob for t in e.top_logprobs]) for e in entries]

    c = client.completions.create(model=MODEL, prompt="hello world", max_tokens=6, seed=2, logprobs=2)
    lp = c.choices[0].logprobs
    ids = served.logger.find(c.id)["completion_token_ids"][0]
    reference = completion_logprobs(lm.model, lm.tokenizer("hello world")["input_ids"], ids)
    assert lp.token_logprobs == pytest.approx(reference.tolist(), abs=1e-4)
    assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids)
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset == sorted(lp.text_offset)


def _text_with_a_stop(client) -> tuple[int, str, str]:
    """A seed whose answer holds a two-character ASCII string first found a few characters in."""
    for seed in range(40):
        text = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, seed=seed).choices[0].message.content
        for k in range(3, len(text) - 2):
            stop = text[k : k + 2]
            if stop.isascii() and stop.isprintable() and text.find(stop) == k:
                return seed, text, stop
    raise AssertionError("no seed gave a text with a usable stop string")


def test_stop_strings_cut_the_text_like_the_samplers(client):
    seed, text, stop = _text_with_a_stop(client)
    args = {"model": MODEL, "messages": QUESTION, "max_tokens": 40, "seed": seed, "stop": ["never-there", stop]}
    r = client.chat.completions.create(**args)
    assert r.choices[0].message.content == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**args, stream=True))
    assert streamed_text(chunks) == {0: text[: text.find(stop)]}
    single = client.chat.completions.create(**{**args, "stop": stop})
    assert single.choices[0].message.content == text[: text.find(stop)]


# --- continuous batching, aborts, overload --------------------------------------------------------

def _steps_with_more_than(text: str, bound: int) -> float:
    return metric(text, "tao_step_requests_count") - metric(text, "tao_step_requests_bucket", le=str(bound))


def test_concurrent_requests_share_engine_steps(served, client, gate):
    before = _steps_with_more_than(served.metrics(), 4)
    loop = served.state.loop
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.chat.completions.create, model=MODEL, max_tokens=12, seed=i,
                               messages=[{"role": "user", "content": f"What is {i} plus 35?"}]) for i in range(8)]
        wait_until(lambda: loop.waiting == 8, "8 requests waiting")
        gate.open()
        answers = [f.result() for f in futures]
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    assert _steps_with_more_than(served.metrics(), 4) > before  # one engine step decoded more than 4 of them


def test_a_full_queue_is_429_with_retry_after(served, client, gate):
    loop = served.state.loop
    with ThreadPoolExecutor(CONFIG.max_queue) as pool:
        futures = [pool.submit(client.chat.completions.create, model=MODEL, messages=QUESTION, max_tokens=4, seed=i)
                   for i in range(CONFIG.max_queue)]
        wait_until(lambda: loop.waiting == CONFIG.max_queue, "a full queue")
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        gate.open()
        assert all(f.result().choices for f in futures)
    response = refused.value.response
    assert response.status_code == 429 and response.headers["retry-after"] == str(CONFIG.retry_after_s)
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "queue_full" and "--max-queue" in error["message"]
    assert served.logger.find(response.headers["x-request-id"])["status_code"] == 429


def _idle_cache(engine: Engine) -> bool:
    return engine.cache.num_free == engine.cache.num_blocks and engine.scheduler.reserved == 0


def test_a_client_that_disconnects_mid_stream_aborts_its_request(served, gate):
    engine, loop = served.state.loop.engine, served.state.loop
    assert _idle_cache(engine)
    aborted = metric(served.metrics(), "tao_samples_total", finish_reason="abort")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 64, "seed": 2, "stream": True}
    gate.allow(1)
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=60) as response:
        request_id = response.headers["x-request-id"]
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
    assert served.logger.find(request_id)["status_code"] == 499  # the stream ended: the request is cancelled
    assert loop.running == 1 and not _idle_cache(engine)
    gate.open()
    wait_until(lambda: loop.running == 0, "the aborted request to leave the batch")
    assert _idle_cache(engine)  # every block and reservation it held is free again
    assert metric(served.metrics(), "tao_samples_total", finish_reason="abort") == aborted + 1


def test_a_client_that_gives_up_before_the_first_token_aborts_its_request(served, gate):
    loop = served.state.loop
    aborted = metric(served.metrics(), "tao_samples_total", finish_reason="abort")
    before = len(served.logger.records)
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 64, "seed": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_until(lambda: len(served.logger.records) > before, "the exchange to be logged")
    assert served.logger.records[-1]["status_code"] == 499 and served.logger.records[-1]["response_json"] is None
    gate.open()
    wait_until(lambda: loop.running == 0 and loop.waiting == 0, "the request to end")
    assert _idle_cache(loop.engine)
    assert metric(served.metrics(), "tao_samples_total", finish_reason="abort") == aborted + 1


def test_a_failing_logger_never_fails_a_request(served, client):
    failures = served.state.exchanges.log_failures
    served.logger.fail = True
    try:
        r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, stream=True))
    finally:
        served.logger.fail = False
    assert r.choices and chunks
    wait_until(lambda: served.state.exchanges.log_failures == failures + 2, "both failures to be counted")


# --- health, models, metrics ----------------------------------------------------------------------

def test_health_models_and_metrics(served, client):
    health = httpx.get(f"{served.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["model_version"] == "v1"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "tao"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    response = httpx.get(f"{served.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name, kind in (("tao_requests_total", "counter"), ("tao_generated_tokens_total", "counter"),
                       ("tao_requests_running", "gauge"), ("tao_requests_waiting", "gauge"),
                       ("tao_time_to_first_token_seconds", "histogram"), ("tao_request_latency_seconds", "histogram")):
        assert f"# TYPE {name} {kind}" in text
    assert metric(text, "tao_requests_total", endpoint="/v1/chat/completions", status="200") >= 1
    assert metric(text, "tao_generated_tokens_total") >= 4 and metric(text, "tao_requests_running") == 0
    assert metric(text, "tao_time_to_first_token_seconds_count") >= 1
    assert metric(text, "tao_request_latency_seconds_bucket", le="+Inf") == metric(text, "tao_request_latency_seconds_count")


# --- shutdown and the engine loop ----------------------------------------------------------------


def test_an_exchange_is_logged_before_its_answer_reaches_the_client(served, client):
    """Feedback a client sends the moment it has its answer must find the row: the exchange is handed to
    the logger before the response (or a stream's ``[DONE]``) leaves, not in a task after it."""
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert any(r["request_id"] == whole.id for r in served.logger.records)  # no waiting: already there
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, stream=True))
    assert any(r["request_id"] == chunks[0].id and r["status_code"] == 200 for r in served.logger.records)
