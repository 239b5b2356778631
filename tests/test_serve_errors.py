"""`tao serve`'s errors on the real server: every bad parameter is a 400 naming it, in OpenAI's
error-object shape, and malformed, oversized and over-long requests are refused the same way. The
server and fixtures are :mod:`tests.test_serve`'s."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
import openai  # noqa: E402

from tests.test_serve import CONFIG, MODEL, QUESTION, client, lm, served  # noqa: E402, F401 (fixtures)

# --- parameters --------------------------------------------------------------------------------------

CHAT_ERRORS = [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": CONFIG.max_n + 1}, "n"),
    ({"max_tokens": CONFIG.max_tokens_limit + 1}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"top_p": 0}, "top_p"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"stop": [1]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": "x"}, "seed"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"foo": 1}, "foo"),
    ({"model": None}, "model"),
]


@pytest.mark.parametrize(("change", "param"), CHAT_ERRORS, ids=[p for _, p in CHAT_ERRORS])
def test_a_bad_chat_parameter_is_a_400_naming_it(served, change, param):  # noqa: F811 (fixtures of tests.test_serve)
    body = {"model": MODEL, "messages": QUESTION, **change}
    response = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json() == {"error": {"message": response.json()["error"]["message"], "type": "invalid_request_error",
                                         "param": param, "code": None}}
    record = served.logger.find(response.headers["x-request-id"])
    assert record["status_code"] == 400 and record["response_json"] == response.json()


COMPLETION_ERRORS = [
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [10**6]}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize(("change", "param"), COMPLETION_ERRORS, ids=[p for _, p in COMPLETION_ERRORS])
def test_a_bad_completion_parameter_is_a_400_naming_it(served, change, param):  # noqa: F811 (fixtures of tests.test_serve)
    response = httpx.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": "hi", **change}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and response.json()["error"]["type"] == "invalid_request_error"


def test_errors_are_in_openai_shape(served, client):  # noqa: F811 (fixtures of tests.test_serve)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, n=10)
    assert bad.value.response.json()["error"]["param"] == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert missing.value.response.json()["error"] == {
        "message": missing.value.response.json()["error"]["message"], "type": "invalid_request_error",
        "param": "model", "code": "model_not_found"}
    url = f"{served.url}/v1/chat/completions"
    for content in (b"{not json", b"[1, 2]", b'{"model": NaN}'):
        response = httpx.post(url, content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error", content
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * CONFIG.max_body_bytes}]})
    response = httpx.post(url, content=huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    for method, path, status in (("GET", "/v1/nowhere", 404), ("GET", "/v1/chat/completions", 405)):
        response = httpx.request(method, f"{served.url}{path}")
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    too_long = [{"role": "user", "content": "0 1 2 3 4 5 6 7 8 9 " * 200}]
    response = httpx.post(url, json={"model": MODEL, "messages": too_long})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
