"""``POST /admin/reload`` and ``POST /admin/rollback``: change the served model version by hand.

Thin routes over :class:`tao_core.serve.versions.ModelVersions` (``state.versions``), which the flywheel
calls directly; who may call ``/admin/*`` is :mod:`tao_core.serve.auth`'s business, not this module's.

| route | body | answer |
|---|---|---|
| ``POST /admin/reload`` | ``{"model": "<model directory>", "version": "<optional name>"}`` | 200 ``{"version", "previous", "model"}`` once requests admitted from then on get the new version; 400 naming the problem (no such directory, weights that do not fit the served model, a version name in use), nothing changed |
| ``POST /admin/rollback`` | none | 200 ``{"version", "previous", "model"}``: the version before the current one, read again from its directory; 409 when there is none |

Both wait for a reload or rollback in progress (they are serialized), answer 503 while the server shuts
down, and 500 when the engine refused the new weights (the served version is unchanged).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from tao_core.serve.completions import ServerState, error_response
from tao_core.serve.engine_loop import Closed
from tao_core.serve.protocol import ApiError, read_json_object
from tao_core.serve.versions import VersionError

log = logging.getLogger(__name__)
RELOAD_FIELDS = ("model", "version")


def register_admin_routes(app: FastAPI, state: ServerState) -> None:
    """Add the admin routes over ``state.versions`` to ``app``."""

    @app.post("/admin/reload")
    async def reload(request: Request) -> Response:
        try:
            body = await _reload_body(request, state.config.max_body_bytes)
            return await _answer(state, state.versions.reload(body["model"], body.get("version")))
        except ApiError as e:
            return error_response(e)

    @app.post("/admin/rollback")
    async def rollback() -> Response:
        return await _answer(state, state.versions.rollback())


async def _answer(state: ServerState, change: Any) -> Response:
    """Await a reload or rollback; its result, or the error answer that says why nothing changed."""
    try:
        return JSONResponse(await change)
    except VersionError as e:
        code = "no_previous_version" if e.status == 409 else "invalid_model_version"
        return error_response(ApiError(e.status, str(e), param=e.param, code=code))
    except Closed as e:
        return error_response(ApiError(503, f"{e}; the model version was not changed", code="shutting_down"))
    except Exception as e:
        log.exception("tao serve: the model version swap failed")
        return error_response(ApiError(500, f"the engine did not take the new weights ({type(e).__name__}: {e}); "
                                       f"version {state.versions.current!r} is still served", code="swap_failed"))


async def _reload_body(request: Request, limit: int) -> dict[str, Any]:
    body = await read_json_object(request, limit, RELOAD_FIELDS, "/admin/reload")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "model must be the path of a model directory on the server's machine (a non-empty "
                       "string), e.g. runs/NAME/final", param="model")
    if body.get("version") is not None and not isinstance(body["version"], str):
        raise ApiError(400, f"version must be a string or null, got {type(body['version']).__name__}", param="version")
    return body
