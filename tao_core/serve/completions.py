"""One chat or completion request through the server: body in, engine request out, answer back.

:func:`answer` reads and checks the body (:mod:`~tao_core.serve.protocol`), tokenizes the prompt (the
model's chat template for chat), hands an engine request to the :class:`~tao_core.serve.engine_loop.EngineLoop`
and waits for its first event, so a request the engine refuses is still a proper HTTP error. Then it
answers with the whole response, or streams server-sent events: each step's new text per choice
(:class:`~tao_core.serve.text.TextStream`), one last chunk per choice with its finish reason, the usage
chunk when asked, ``data: [DONE]``. A client that goes away aborts its engine request. Every exchange
ends in :meth:`Exchanges.end <tao_core.serve.exchange.Exchanges.end>` exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from tao_core.engine import EngineRequest
from tao_core.engine.sampler import stop_string_checker
from tao_core.models import LoadedModel
from tao_core.serve.engine_loop import Closed, EngineLoop, Finished, Overloaded, Submission, TokenEvent
from tao_core.serve.exchange import Exchange, Exchanges
from tao_core.serve.protocol import ApiError, GenerationRequest, parse_json_body, parse_request
from tao_core.serve.responses import Shapes, TokenSlice, usage
from tao_core.serve.settings import ServeConfig
from tao_core.serve.text import Choice, TextStream, finish_sample, text_offsets
from tao_core.serve.versions import ModelVersions
from tao_core.types import Prompt

log = logging.getLogger(__name__)

ENDPOINTS = {"chat": ("/v1/chat/completions", "chatcmpl"), "completion": ("/v1/completions", "cmpl")}


class ClientGone(Exception):
    """The client disconnected before its answer was sent (logged as status 499)."""


@dataclass
class ServerState:
    """What every request needs: the model, the engine loop, the settings, the exchange log, the versions."""

    lm: LoadedModel
    loop: EngineLoop
    config: ServeConfig
    served_model: str  # the model id clients send
    exchanges: Exchanges
    checker_tokenizer: Any  # a copy of the tokenizer for the engine thread's stop-string checks
    context_length: int  # the model's positions: prompt + completion
    vocab_size: int
    versions: ModelVersions = field(init=False)  # the served model version, reload and rollback

    def __post_init__(self) -> None:
        self.versions = ModelVersions(self.loop, self.lm.model, version=self.config.model_version,
                                      model_dir=self.lm.path, exchanges=self.exchanges)

    def prompt_ids(self, req: GenerationRequest) -> list[int]:
        """The tokens the model is conditioned on; 400 naming ``messages`` or ``prompt`` when there are none
        or too many."""
        param = "messages" if req.kind == "chat" else "prompt"
        try:
            if req.messages is not None:
                ids = self.lm.prompt_token_ids(Prompt(id="request", messages=req.messages))
            elif isinstance(req.prompt, str):
                ids = [int(t) for t in self.lm.tokenizer(req.prompt, add_special_tokens=True)["input_ids"]]
            else:
                ids = list(req.prompt or [])
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise ApiError(400, f"prompt token ids outside [0, {self.vocab_size}): {bad[:5]}", param=param)
        except ApiError:
            raise
        except Exception as e:  # e.g. a chat template that refuses the conversation
            raise ApiError(400, f"cannot tokenize {param}: {type(e).__name__}: {e}", param=param) from None
        if not ids:
            raise ApiError(400, f"{param} has no tokens", param=param)
        if len(ids) >= self.context_length:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the model's context holds {self.context_length} "
                           f"including at least one new token: shorten {param}", param=param,
                           code="context_length_exceeded")
        return ids

    def submission(self, req: GenerationRequest, prompt_ids: list[int]) -> Submission:
        checker = stop_string_checker(self.checker_tokenizer, req.params.stop)
        return Submission(EngineRequest(prompt_ids, req.params, stop_checker=checker), req.stream,
                          asyncio.get_running_loop())

    def shapes(self, req: GenerationRequest, ex: Exchange) -> Shapes:
        return Shapes(req.kind, self.lm.tokenizer, request_id=ex.request_id, created=int(time.time()),
                      model=self.served_model, version=ex.model_version,
                      top_logprobs=req.params.top_logprobs, include_usage=req.include_usage)

    def finish(self, samples: Sequence[Any], req: GenerationRequest) -> list[Choice]:
        return [finish_sample(self.lm.tokenizer, s, req.params.stop, self.lm.eos_token_ids) for s in samples]


async def answer(state: ServerState, request: Request, kind: str) -> Response:
    """The route body of ``/v1/chat/completions`` (``kind`` "chat") and ``/v1/completions`` ("completion")."""
    endpoint, prefix = ENDPOINTS[kind]
    ex = state.exchanges.begin(endpoint, prefix, request.headers.get("x-client-request-id"),
                               requester=request.scope.get("state", {}).get("key_id"))  # set by AuthMiddleware
    try:
        return await _answer(state, request, kind, ex)
    except ApiError as e:
        state.exchanges.end(ex, e.status, e.body())
        return error_response(e, ex.request_id)
    except ClientGone:
        state.exchanges.end(ex, 499)
        return Response(status_code=499)
    except Exception as e:
        log.exception("tao serve: request %s failed", ex.request_id)
        err = ApiError(500, f"internal server error ({type(e).__name__}: {e}); the server log has request {ex.request_id}")
        state.exchanges.end(ex, 500, err.body())
        return error_response(err, ex.request_id)


def error_response(e: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = dict(e.headers)
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _answer(state: ServerState, request: Request, kind: str, ex: Exchange) -> Response:
    body = await read_json(request, state.config.max_body_bytes, ex)
    req = parse_request(kind, body, state.config, state.served_model)
    prompt = ex.prompt_token_ids = state.prompt_ids(req)
    sub = state.submission(req, prompt)
    try:
        state.loop.submit(sub)
    except Overloaded as e:
        raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": str(state.config.retry_after_s)}) from None
    except Closed as e:
        raise ApiError(503, str(e), code="shutting_down", headers={"Retry-After": str(state.config.retry_after_s)}) from None
    try:
        first = await _first_event(state.loop, sub, request)
    finally:
        ex.model_version = sub.version or ex.model_version  # the version the engine loop admitted it under
    if isinstance(first, Finished) and (problem := _failure(first)) is not None:
        raise problem
    shapes = state.shapes(req, ex)
    headers = {"X-Request-Id": ex.request_id}
    if req.stream:
        events = _events(state, ex, req, sub, first, shapes)
        return StreamingResponse(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
    assert isinstance(first, Finished)
    choices = state.finish(first.result.samples, req)
    slices = [_whole_slice(state.lm.tokenizer, c, req) if req.logprobs else None for c in choices]
    response = shapes.response(choices, usage(len(prompt), sum(len(c.token_ids) for c in choices)), slices)
    state.exchanges.end(ex, 200, response, choices)  # queued before the answer leaves: feedback on it finds the row
    return JSONResponse(response, headers=headers)


async def read_json(request: Request, limit: int, ex: Exchange) -> Any:
    """The body as JSON, at most ``limit`` bytes (413 above, checked before and while reading)."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body exceeds this server's limit of {limit} bytes "
                         "(tao serve --max-body-bytes)", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    size, parts = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        parts.append(chunk)
    raw = b"".join(parts)
    try:
        body = parse_json_body(raw)
    except ApiError:
        ex.request_json = raw.decode("utf-8", "replace")  # logged as the text it was
        raise
    ex.request_json = body
    return body


async def _first_event(loop: EngineLoop, sub: Submission, request: Request) -> list[TokenEvent] | Finished:
    """The submission's first event (its tokens or its result), or :class:`ClientGone` (the request is aborted)."""
    got = asyncio.ensure_future(sub.events.get())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler was cancelled (a server shutting down past its timeout)
        loop.cancel(sub)
        raise
    finally:
        gone.cancel()
        if not got.done():
            got.cancel()
    if got.done() and not got.cancelled():
        return got.result()
    loop.cancel(sub)
    raise ClientGone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _failure(event: Finished) -> ApiError | None:
    """The error answer of a request the engine refused or could not finish; None when it finished."""
    result = event.result
    if event.server_error is not None:
        return ApiError(500, f"the engine failed: {event.server_error}", code="engine_error")
    if result.error is not None:
        return ApiError(400, f"the engine refused the request: {result.error}")
    if any(s.finish_reason in ("abort", "error") for s in result.samples):
        return ApiError(503, "the server stopped before this request finished", code="shutting_down")
    return None


def _whole_slice(tokenizer, c: Choice, req: GenerationRequest) -> TokenSlice:
    offsets = text_offsets(tokenizer, c.token_ids, c.text) if req.kind == "completion" else []
    return TokenSlice(c.token_ids, c.logprobs, c.top_logprobs or [[] for _ in c.token_ids], offsets)


class StreamedChoice:
    """One choice of a streamed answer: its text so far and the tokens' log-probs."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.text = TextStream(tokenizer, stop)
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.sent: list[str] = []

    def add(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        self.text.push(token)
        self.logprobs.append(logprob)
        self.top.append(top)

    def ready(self) -> tuple[str, TokenSlice]:
        start = self.text.sent_tokens
        text, count = self.text.ready()
        self.sent.append(text)
        end = start + count
        return text, TokenSlice(self.text.ids[start:end], self.logprobs[start:end], self.top[start:end],
                                [self.text.start_of(i) for i in range(start, end)])

    def final(self, c: Choice) -> tuple[str, TokenSlice]:
        start = self.text.sent_tokens
        text, count = self.text.finish(c)
        self.sent.append(text)
        end = start + count
        top = c.top_logprobs or [[] for _ in c.token_ids]
        return text, TokenSlice(c.token_ids[start:end], c.logprobs[start:end], top[start:end],
                                [min(self.text.start_of(i), len(c.text)) for i in range(start, end)])


async def _events(state: ServerState, ex: Exchange, req: GenerationRequest, sub: Submission,
                  first: list[TokenEvent] | Finished, shapes: Shapes) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer; the exchange ends here (499 when the client goes away)."""
    streams = [StreamedChoice(state.lm.tokenizer, req.params.stop) for _ in range(req.params.n)]
    ended: tuple[int, Any, list[Choice] | None] | None = None
    try:
        if req.kind == "chat":
            for j in range(req.params.n):
                yield _sse(shapes.chunk(j, "", None, first=True))
        event = first
        while not isinstance(event, Finished):
            for chunk in _token_chunks(streams, event, shapes, req.logprobs):
                yield _sse(chunk)
            event = await sub.events.get()
        problem = _failure(event)
        if problem is not None:
            ended = (problem.status, problem.body(), None)
            yield _sse(problem.body())
        else:
            choices = state.finish(event.result.samples, req)
            for j, (stream, c) in enumerate(zip(streams, choices, strict=True)):
                text, tokens = stream.final(c)
                yield _sse(shapes.chunk(j, text, tokens if req.logprobs else None, c.finish_reason))
            counts = usage(len(sub.request.prompt_ids), sum(len(c.token_ids) for c in choices))
            if req.include_usage:
                yield _sse(shapes.usage_chunk(counts))
            ended = (200, _assembled(state, req, shapes, streams, choices, counts), choices)
        state.exchanges.end(ex, *ended)  # queued before [DONE]: feedback sent on it finds the row
        yield "data: [DONE]\n\n"
    except Exception as e:  # a bug mid-stream: say so in the stream, as OpenAI's API does
        log.exception("tao serve: streaming request %s failed", ex.request_id)
        err = ApiError(500, f"internal server error ({type(e).__name__}: {e}); the server log has request {ex.request_id}")
        ended = (500, err.body(), None)
        yield _sse(err.body())
        yield "data: [DONE]\n\n"
    finally:
        if ended is None:
            state.loop.cancel(sub)
            state.exchanges.end(ex, 499)
        else:
            state.exchanges.end(ex, *ended)


def _token_chunks(streams: list[StreamedChoice], events: list[TokenEvent], shapes: Shapes,
                  logprobs: bool) -> Iterator[dict[str, Any]]:
    touched: dict[int, None] = {}
    for j, token, lp, top in events:
        streams[j].add(token, lp, top)
        touched[j] = None
    for j in touched:
        text, tokens = streams[j].ready()
        if text or (logprobs and tokens.ids):
            yield shapes.chunk(j, text, tokens if logprobs else None)


def _assembled(state: ServerState, req: GenerationRequest, shapes: Shapes, streams: list[StreamedChoice],
               choices: list[Choice], counts: dict[str, int]) -> dict[str, Any]:
    """The completion object a stream amounts to (its text as streamed), for the exchange log."""
    sent = [Choice("".join(s.sent), c.token_ids, c.logprobs, c.finish_reason, c.top_logprobs)
            for s, c in zip(streams, choices, strict=True)]
    slices = [_whole_slice(state.lm.tokenizer, c, req) if req.logprobs else None for c in sent]
    return shapes.response(sent, counts, slices)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"
