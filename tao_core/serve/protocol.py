"""OpenAI's request and error shapes: parse a body into a :class:`GenerationRequest` or an :class:`ApiError`.

Every problem is a 400 in OpenAI's error-object shape naming the field (``param``): a wrong type, a value
out of range, an argument this server does not know. Fields whose OpenAI meaning needs a feature tao
serve lacks (penalties, logit bias, tools, JSON mode, echo, suffix) are accepted only at the value that
changes nothing; any other value is refused rather than silently ignored. ``null`` means "not given".
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tao_core.errors import TaoInputError
from tao_core.serve.settings import ServeConfig
from tao_core.types import Prompt, SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # the engine's bound (SamplingParams.top_logprobs)
_SEED_RANGE = (-(2**63), 2**63 - 1)
_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}

_COMMON = {"model", "n", "temperature", "top_p", "max_tokens", "stop", "seed", "logprobs", "stream",
           "stream_options", "user"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = _COMMON | {"prompt", "best_of"}
# accepted only at the value that changes nothing
_NO_OP: dict[str, tuple[Callable[[Any], bool], str]] = {
    "frequency_penalty": (lambda v: v == 0, "0"),
    "presence_penalty": (lambda v: v == 0, "0"),
    "logit_bias": (lambda v: v == {}, "{}"),
}
CHAT_NO_OP = {
    **_NO_OP,
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}'),
    "tools": (lambda v: v == [], "[]"),
    "tool_choice": (lambda v: v == "none", '"none"'),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "a boolean (there are no tools)"),
    "store": (lambda v: v is False, "false"),
    "metadata": (lambda v: isinstance(v, dict), "an object (it is not stored)"),
    "service_tier": (lambda v: v in ("auto", "default"), '"auto" or "default"'),
}
COMPLETION_NO_OP = {**_NO_OP, "echo": (lambda v: v is False, "false"), "suffix": (lambda v: v == "", '""')}
_MESSAGE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An answer in OpenAI's error-object shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON; a 400 when it is not JSON, nests too deeply, or holds a ``NaN``/``Infinity``
    constant or an unpaired UTF-16 surrogate escape (``"\\ud800"``: not text, and no table can store it)."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise ApiError(400, "the request body nests arrays or objects too deeply") from None
    except UnicodeEncodeError:
        raise ApiError(400, "the request body holds an unpaired UTF-16 surrogate escape (such as \"\\ud800\"), "
                       "which is not text") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    return body


async def read_json_object(request: Any, limit: int, fields: tuple[str, ...], route: str) -> dict[str, Any]:
    """A small request body read as a JSON object with only ``fields``: 413 past ``limit`` bytes (a
    chunked body included), 400 for anything else, naming the first unknown field."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the request body exceeds this server's limit of {limit} bytes", code="request_too_large")
    body = parse_json_body(raw)
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; {route} takes {', '.join(fields)}", param=unknown[0])
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


@dataclass
class GenerationRequest:
    """A chat or completion request, checked: what the engine and the response builder need."""

    kind: str  # "chat" (/v1/chat/completions) or "completion" (/v1/completions)
    model: str  # the served model it names
    params: SamplingParams  # n, temperature, top_p, max_new_tokens, stop, seed, top_logprobs
    logprobs: bool = False  # return each sampled token's log-prob (top_logprobs alternatives in params)
    stream: bool = False  # answer as server-sent events
    include_usage: bool = False  # streaming: a last chunk with the token counts
    messages: list[dict[str, str]] | None = None  # chat: the conversation, roles system/user/assistant
    prompt: str | list[int] | None = None  # completion: text, or token ids taken as they are


def parse_request(kind: str, body: Any, config: ServeConfig, served_model: str) -> GenerationRequest:
    """Check ``body`` (the parsed JSON) of a ``kind`` request; raise :class:`ApiError` naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    chat = kind == "chat"
    _check_arguments(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, CHAT_NO_OP if chat else COMPLETION_NO_OP)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter (a non-empty string)", param="model")
    if model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves `{served_model}` (GET /v1/models)",
                       param="model", code="model_not_found")
    n = _integer(body, "n", 1, 1, config.max_n, "tao serve --max-n")
    if not chat and body.get("best_of") not in (None, n):
        raise ApiError(400, f"best_of must equal n ({n}): every sampled completion is returned", param="best_of")
    stream = _boolean(body, "stream", False)
    include_usage = _stream_options(body, stream)
    top, logprobs = _logprobs(body, chat)
    default_max = config.default_max_tokens if chat else COMPLETION_DEFAULT_MAX_TOKENS
    max_tokens = _integer(body, "max_tokens", min(default_max, config.max_tokens_limit), 1, config.max_tokens_limit,
                          "tao serve --max-tokens-limit")
    if chat and body.get("max_completion_tokens") is not None:
        max_tokens = _integer(body, "max_completion_tokens", max_tokens, 1, config.max_tokens_limit,
                              "tao serve --max-tokens-limit")
    params = SamplingParams(
        n=n,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        max_new_tokens=max_tokens,
        stop=_stop(body),
        seed=_integer(body, "seed", None, *_SEED_RANGE),
        top_logprobs=top,
    )
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "user must be a string", param="user")
    request = GenerationRequest(kind, model, params, logprobs, stream, include_usage)
    if chat:
        request.messages = parse_messages(body.get("messages"))
    else:
        request.prompt = _prompt(body.get("prompt"))
    return request


def parse_messages(value: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as tao's ``{"role", "content"}`` pairs (text parts joined; ``developer`` is
    ``system``); 400 naming the message and key for anything else."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty array of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        role = m.get("role")
        if role not in _MESSAGE_ROLES:
            raise ApiError(400, f"{where}.role must be one of {sorted(_MESSAGE_ROLES)}, got {_clip(role)} "
                           "(tool messages are not supported)", param=f"{where}.role")
        for key, v in m.items():
            if key not in ("role", "content", "name") and v not in (None, [], ""):
                raise ApiError(400, f"{where}.{key} is not supported by tao serve", param=f"{where}.{key}")
        out.append({"role": _MESSAGE_ROLES[role], "content": _content(m.get("content"), f"{where}.content")})
    try:
        Prompt(id="request", messages=out)
    except TaoInputError:
        raise ApiError(400, "every message's content is empty", param="messages") from None
    return out


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                               "(images and audio are not supported)", param=f"{where}[{j}]")
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where} must be a string or an array of text parts, got {_clip(value)}", param=where)


def _prompt(value: Any) -> str | list[int]:
    """A completion prompt: a string, token ids, or an array holding exactly one of those."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
        value = value[0]
    if isinstance(value, str):
        if not value:
            raise ApiError(400, "prompt is empty", param="prompt")
        return value
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return list(value)
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str | list) for p in value):
        raise ApiError(400, f"prompt holds {len(value)} prompts; tao serve takes one prompt per request "
                       "(send them as separate, concurrent requests)", param="prompt")
    raise ApiError(400, f"prompt must be a non-empty string or array of token ids, got {_clip(value)}", param="prompt")


def _check_arguments(body: dict[str, Any], known: set[str], no_op: dict[str, tuple[Callable[[Any], bool], str]]) -> None:
    for key, value in body.items():
        if key in known or value is None:
            continue
        if key in no_op:
            accepts, allowed = no_op[key]
            if not accepts(value):
                raise ApiError(400, f"{key}={_clip(value)} is not supported by tao serve (only {allowed})", param=key)
            continue
        raise ApiError(400, f"Unrecognized request argument supplied: {key}", param=key)


def _logprobs(body: dict[str, Any], chat: bool) -> tuple[int, bool]:
    """(top log-probs per token, whether log-probs are returned): chat ``logprobs: true`` +
    ``top_logprobs: k``; completions ``logprobs: k``."""
    if not chat:
        k = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        return (k or 0), k is not None
    wanted = _boolean(body, "logprobs", False)
    k = _integer(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if k is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return (k or 0), wanted


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {_clip(options)}", param="stream_options")
    for key, value in options.items():
        if key not in ("include_usage", "include_obfuscation") or not isinstance(value, bool | None):
            raise ApiError(400, f"stream_options.{key}={_clip(value)} is not supported (include_usage: a boolean)",
                           param=f"stream_options.{key}")
    return bool(options.get("include_usage"))


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or an array of them, got {_clip(stop)}", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop holds {len(stops)} strings, at most {MAX_STOP_STRINGS}", param="stop")
    return stops


def _top_p(body: dict[str, Any]) -> float:
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be in (0, 1]; for greedy decoding set temperature to 0", param="top_p")
    return top_p


def _integer(body: dict[str, Any], key: str, default: Any, lo: int, hi: int, raise_with: str = "") -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{key} must be an integer, got {_clip(value)}", param=key)
    if value < lo or value > hi:
        limit = f" (this server's limit; {raise_with} raises it)" if raise_with and value > hi else ""
        raise ApiError(400, f"{key} must be in [{lo}, {hi}]{limit}, got {value}", param=key)
    return value


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, f"{key} must be a number, got {_clip(value)}", param=key)
    if not lo <= value <= hi:
        raise ApiError(400, f"{key} must be in [{lo:g}, {hi:g}], got {value}", param=key)
    return float(value)


def _boolean(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be true or false, got {_clip(value)}", param=key)
    return value


def _clip(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
