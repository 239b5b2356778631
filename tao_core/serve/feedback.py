"""``POST /v1/feedback``: a rating of an answer, or the preferred one of its ``n`` choices.

The body is ``{"request_id", "rating"?, "preferred_choice"?, "comment"?, "source"?}`` (at least one
of rating / preferred_choice), ``request_id`` being the ``id`` of a response this server logged (also
its ``X-Request-Id`` header). It is stored beside the exchange in the inference table
(:meth:`tao_core.table.InferenceTable.log_feedback`), from which ``tao_core.table.preference_pairs``
builds the preference pairs a reward model trains on. Feedback is rare, so it is written at once (in
a worker thread): a 200 means it is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse, Response

from tao_core.errors import TaoInputError
from tao_core.serve.protocol import ApiError, read_json_object

FIELDS = ("request_id", "rating", "preferred_choice", "comment", "source")


async def parse(request: Request, limit: int) -> dict[str, Any]:
    """The body's fields, checked for shape (the table checks their values)."""
    body = await read_json_object(request, limit, FIELDS, "feedback")
    if not isinstance(body.get("request_id"), str) or not body["request_id"]:
        raise ApiError(400, "request_id must be the id of a response this server gave (a non-empty string)",
                       param="request_id")
    return body


async def store(logger: Any, body: dict[str, Any]) -> Response:
    """Write ``body`` through ``logger.log_feedback``; 404 for an unknown request id, 400 for bad values."""
    log_feedback = getattr(logger, "log_feedback", None)
    if log_feedback is None:
        raise ApiError(400, "this server keeps no inference table, so it takes no feedback (start tao serve "
                       "without --no-table)", code="feedback_unavailable")
    from tao_core.table import UnknownRequestError

    try:
        feedback_id = await asyncio.to_thread(log_feedback, **body)
    except UnknownRequestError as e:
        raise ApiError(404, str(e), param="request_id", code="request_not_found") from None
    except TaoInputError as e:
        param = next((f for f in FIELDS[1:] if f in str(e)), None)
        raise ApiError(400, str(e), param=param) from None
    return JSONResponse({"object": "feedback", "id": feedback_id, "request_id": body["request_id"]})
