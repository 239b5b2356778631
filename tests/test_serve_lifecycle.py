"""`tao serve` from start to shutdown: draining, the engine loop, the inference table, feedback and
the `tao serve` command in a process of its own (the shared server's tests: tests/test_serve.py)."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402

from tao_core.engine import Engine, EngineRequest, SampleResult  # noqa: E402
from tao_core.engine.sampler import stop_string_checker  # noqa: E402
from tao_core.models import load_model  # noqa: E402
from tao_core.serve.engine_loop import Closed, EngineLoop, Finished, Submission  # noqa: E402
from tao_core.serve.text import TextStream, finish_sample  # noqa: E402
from tao_core.types import Prompt, SamplingParams  # noqa: E402
from tests.conftest import make_tiny_tokenizer  # noqa: E402
from tests.test_serve import (  # noqa: E402
    CONFIG,
    MODEL,
    QUESTION,
    RecordingLogger,
    StepGate,
    _idle_cache,
    running_server,
    sse,
    streamed_text,
    wait_until,
)


def test_shutdown_lets_a_stream_in_flight_finish_then_closes_the_logger(tiny_model_dir):
    logger = RecordingLogger()
    with running_server(load_model(str(tiny_model_dir)), CONFIG, logger) as s:
        gate = StepGate(s.state.loop.engine)
        s.state.loop.engine.step = gate.step
        gate.allow(1)
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 30, "seed": 2, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            s.server.should_exit = True  # a graceful shutdown begins with the stream in flight
            gate.open()
            events = sse(lines)
        s.thread.join(60)
        assert not s.thread.is_alive()
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")
    assert [r["status_code"] for r in logger.records] == [200] and logger.closed
    assert not s.state.loop.alive


def test_the_engine_loop_drains_then_refuses(tiny_model_dir):
    """shutdown() lets the requests in flight finish normally; later submissions are refused."""
    lm = load_model(str(tiny_model_dir))
    engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids)
    loop = EngineLoop(engine, max_queue=4)
    prompt = lm.prompt_token_ids(Prompt(id="p", messages=QUESTION))

    async def main() -> list[Finished]:
        subs = [Submission(EngineRequest(prompt, SamplingParams(n=2, max_new_tokens=8, seed=i)), False,
                           asyncio.get_running_loop()) for i in range(3)]
        loop.start()
        for sub in subs:
            loop.submit(sub)
        assert await asyncio.to_thread(loop.shutdown, 60)
        with pytest.raises(Closed):
            loop.submit(Submission(EngineRequest(prompt, SamplingParams()), False, asyncio.get_running_loop()))
        return [await sub.events.get() for sub in subs]

    results = asyncio.run(main())
    assert all(r.result.error is None and [s.finish_reason in ("stop", "length") for s in r.result.samples] == [True] * 2
               for r in results)
    assert loop.running == loop.waiting == 0 and not loop.alive and _idle_cache(engine)


# --- text ---------------------------------------------------------------------------------------

def test_streamed_text_is_always_a_prefix_of_the_final_cut():
    """Random token sequences (special tokens and split UTF-8 bytes included) with stop strings taken
    from their own text: what a stream sends before the end is a prefix of the samplers' final text,
    and with the rest it is that text, token counts included."""
    tok = make_tiny_tokenizer()
    rng = random.Random(0)
    eos = [tok.eos_token_id]
    cut_by_stop = 0
    for _ in range(300):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        text = tok.decode(ids, skip_special_tokens=True)
        stops = []
        if len(text) > 4 and rng.random() < 0.7:
            start = rng.randrange(len(text) - 3)
            stops = [text[start : start + rng.randrange(1, 4)], "\u2603never"]
        checker = stop_string_checker(tok, stops)
        sampled = []
        for t in ids:  # as the engine samples: it stops at EOS or once a stop string is complete
            sampled.append(t)
            if t in eos or (checker is not None and checker(sampled)):
                break
        stream, sent = TextStream(tok, stops), ""
        final = finish_sample(tok, SampleResult(sampled, [0.0] * len(sampled), "stop"), stops, eos)
        for t in sampled:
            stream.push(t)
            piece, _ = stream.ready()
            sent += piece
            assert final.text.startswith(sent) and stream.sent_tokens <= len(final.token_ids)
        rest, _ = stream.finish(final)
        assert sent + rest == final.text and stream.sent_tokens == len(final.token_ids)
        cut_by_stop += bool(stops) and final.finish_reason == "stop"
    assert cut_by_stop > 50


def test_the_serve_package_and_command_import_without_fastapi():
    code = ("import sys; import tao_core.serve, tao_core.serve.cli; "
            "assert 'fastapi' not in sys.modules and 'starlette' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the inference table and the command -----------------------------------------------------------

def test_the_inference_table_holds_what_was_served(tiny_model_dir, tmp_path):
    """The real InferenceTable as the logger: its rows match the answers (closed and flushed by the shutdown)."""
    from tao_core.table import InferenceTable

    table = InferenceTable.open(tmp_path / "inference.db")
    with running_server(load_model(str(tiny_model_dir)), CONFIG, table) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        whole = c.chat.completions.create(model=MODEL, messages=QUESTION, n=2, max_tokens=8, seed=1, logprobs=True)
        chunks = list(c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, seed=1, stream=True))
        refused = httpx.post(f"{s.url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION, "n": 0})
    with InferenceTable.open(tmp_path / "inference.db") as reopened:
        row = reopened.get(whole.id)
        assert row["status_code"] == 200 and row["response_json"]["choices"][0]["message"]["content"] == \
            whole.choices[0].message.content
        assert [len(ids) for ids in row["completion_token_ids"]] == [len(ch.logprobs.content) for ch in whole.choices]
        assert row["completion_logprobs"][1] == pytest.approx([e.logprob for e in whole.choices[1].logprobs.content])
        streamed = reopened.get(chunks[0].id)
        assert streamed["response_json"]["choices"][0]["message"]["content"] == streamed_text(chunks)[0]
        assert streamed["completion_token_ids"][0] == row["completion_token_ids"][0]  # the same seed, the same tokens
        error = reopened.get(refused.headers["x-request-id"])
        assert error["status_code"] == 400 and error["response_json"] == refused.json()
        assert reopened.summary()["exchanges"] == 3


def test_the_serve_command_serves_and_logs_until_terminated(tiny_model_dir, tmp_path):
    """``tao serve`` in a process of its own: it answers, and SIGTERM shuts it down gracefully with the
    exchange written to the table."""
    from tao_core.table import InferenceTable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db, log = tmp_path / "inference.db", tmp_path / "serve.log"
    code = "from tao_core.serve.cli import serve_cmd; serve_cmd()"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, str(tiny_model_dir), "--port", str(port), "--served-model",
                                 MODEL, "--table", str(db), "--threads", "1", "--max-tokens-limit", "32",
                                 "--keys", str(tmp_path / "keys.json")],  # not the developer's own key store
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, "tao serve to answer /health", timeout=120)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=33)  # --max-tokens-limit 32
        proc.terminate()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn shuts down gracefully, then exits by the signal it caught
    assert proc.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in log.read_text(), log.read_text()
    with InferenceTable.open(db) as table:
        assert table.get(r.id)["status_code"] == 200


def test_feedback_is_stored_beside_the_exchange_and_bad_feedback_is_refused(tiny_model_dir, tmp_path):
    """POST /v1/feedback on a served answer: stored in the table next to it, and it becomes a
    preference pair; an unknown id is a 404, a bad value or field a 400 naming it."""
    from tao_core.table import InferenceTable, preference_pairs

    db = tmp_path / "inference.db"
    table = InferenceTable.open(db)
    with running_server(load_model(str(tiny_model_dir)), CONFIG, table) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=60)
        answer = c.chat.completions.create(model=MODEL, messages=QUESTION, n=2, max_tokens=8, seed=3)
        ok = httpx.post(f"{s.url}/v1/feedback", json={"request_id": answer.id, "preferred_choice": 1,
                                                       "comment": "the second is right", "source": "test"})
        assert ok.status_code == 200 and ok.json()["request_id"] == answer.id
        unknown = httpx.post(f"{s.url}/v1/feedback", json={"request_id": "chatcmpl-nope", "rating": 1.0})
        bad_choice = httpx.post(f"{s.url}/v1/feedback", json={"request_id": answer.id, "preferred_choice": 7})
        extra = httpx.post(f"{s.url}/v1/feedback", json={"request_id": answer.id, "stars": 5})
        nothing = httpx.post(f"{s.url}/v1/feedback", json={"request_id": answer.id})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "request_id"
    assert bad_choice.status_code == 400 and bad_choice.json()["error"]["param"] == "preferred_choice"
    assert extra.status_code == 400 and extra.json()["error"]["param"] == "stars"
    assert nothing.status_code == 400
    pairs = preference_pairs(str(db))
    texts = [ch.message.content for ch in answer.choices]
    if texts[0] != texts[1]:
        assert [(p["chosen"], p["rejected"]) for p in pairs] == [(texts[1], texts[0])]
    with InferenceTable.open(db) as reopened:
        assert reopened.summary()["feedback"] == 1
