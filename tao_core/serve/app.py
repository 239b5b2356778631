"""The FastAPI application of ``tao serve``: routes, error shapes, and the engine loop's lifespan.

Routes stay thin: ``/v1/chat/completions`` and ``/v1/completions`` hand the request to
:func:`tao_core.serve.completions.answer`, ``/v1/feedback`` to :mod:`tao_core.serve.feedback`; ``/v1/models``, ``/health`` and ``/metrics`` report state.
:class:`~tao_core.serve.auth.AuthMiddleware` wraps every route: a bearer key on ``/v1/*`` (unless bound
to loopback with no API key in the store), an admin key on ``/admin/*``, a rate per caller.
Every error, the framework's own 404 and 405 included, is in OpenAI's error-object shape. The
lifespan starts the engine loop, and at shutdown drains it (requests in flight finish, for up to
``ServeConfig.drain_timeout_s``) and closes the exchange logger after the last request.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response

from tao_core.engine import Engine, EngineConfig, unsupported_reason
from tao_core.errors import TaoInputError
from tao_core.models import LoadedModel
from tao_core.serve import feedback as feedback_route
from tao_core.serve.admin import register_admin_routes
from tao_core.serve.auth import AuthMiddleware, Guard, check_binding, is_loopback
from tao_core.serve.completions import ServerState, answer, error_response
from tao_core.serve.engine_loop import EngineLoop
from tao_core.serve.exchange import ExchangeLogger, Exchanges
from tao_core.serve.keys import KeyStore, LiveKeys
from tao_core.serve.metrics import Metrics
from tao_core.serve.protocol import ApiError
from tao_core.serve.settings import ServeConfig

log = logging.getLogger(__name__)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def create_app(lm: LoadedModel, config: ServeConfig | None = None, *, logger: ExchangeLogger | None = None,
               admin_token: str | None = None) -> FastAPI:
    """The server over ``lm`` (a Llama-family model tao's engine runs); ``logger`` receives every exchange.

    Keys come from the store ``config.keys`` (reread when it changes); ``admin_token``, a secret held in
    memory only, is accepted on ``/admin/*`` besides the store's admin keys. A ``config.host`` beyond
    loopback with no API key in the store is refused (TaoInputError).
    """
    config = config or ServeConfig()
    keys = LiveKeys(KeyStore(config.keys))
    check_binding(config.host, keys)
    reason = unsupported_reason(lm.model)
    if reason is not None:
        raise TaoInputError(f"tao serve samples with tao's engine, which cannot run model {lm.name}: {reason}")
    lm.model.eval()
    engine = Engine(lm.model, eos_token_ids=lm.eos_token_ids,
                    config=EngineConfig(max_kv_tokens=config.max_kv_tokens, max_running=config.max_running,
                                       pack_weights=config.pack_weights))
    metrics = Metrics()
    served = config.served_model or lm.name
    state = ServerState(
        lm=lm,
        loop=EngineLoop(engine, max_queue=config.max_queue, metrics=metrics),
        config=config,
        served_model=served,
        exchanges=Exchanges(logger, metrics, served_model=served, model_version=config.model_version, tag=config.tag),
        checker_tokenizer=copy.deepcopy(lm.tokenizer),  # the engine thread decodes with its own copy
        context_length=engine.runner.max_positions,
        vocab_size=engine.runner.vocab_size,
    )
    app = FastAPI(title="tao serve", lifespan=_lifespan(state), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tao = state
    app.add_middleware(AuthMiddleware, guard=Guard(keys, loopback=is_loopback(config.host),
                                                   rate_limit=config.rate_limit, admin_token=admin_token))
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    created = int(time.time())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(state, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(state, request, "completion")

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        try:
            return await feedback_route.store(state.exchanges.logger,
                                              await feedback_route.parse(request, config.max_body_bytes))
        except ApiError as e:
            return error_response(e)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served, created, state.versions.current)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != served:
            return error_response(ApiError(404, f"The model `{model_id}` does not exist; this server serves `{served}`",
                                           param="model", code="model_not_found"))
        return JSONResponse(_model_card(served, created, state.versions.current))

    @app.get("/health")
    async def health() -> Response:
        ok = state.loop.alive
        body = {"status": "ok" if ok else "unavailable", "model": served, "model_version": state.versions.current,
                "running": state.loop.running, "waiting": state.loop.waiting}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return PlainTextResponse(metrics.render(running=state.loop.running, waiting=state.loop.waiting),
                                 media_type=PROMETHEUS_TEXT)

    register_admin_routes(app, state)
    return app


def _lifespan(state: ServerState):
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.loop.start()
        try:
            yield
        finally:
            finished = await asyncio.to_thread(state.loop.shutdown, state.config.drain_timeout_s)
            if not finished:
                log.warning("tao serve: requests still running after %ss were aborted", state.config.drain_timeout_s)
            await asyncio.to_thread(state.exchanges.close)  # writes what the logger still holds

    return lifespan


def _model_card(name: str, created: int, version: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tao", "version": version}


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"{request.method} {request.url.path}: no such route (see GET /v1/models, POST /v1/chat/completions)"
    return error_response(ApiError(exc.status_code, message))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("tao serve: %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, f"internal server error ({type(exc).__name__})"))
