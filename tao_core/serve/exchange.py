"""Every request/response exchange, for the inference table and for ``/metrics``.

The server hands each finished exchange to an :class:`ExchangeLogger` (``tao_core.table.InferenceTable``
is one) as one dict, success or error. ``log`` must return at once; the server also catches anything it
raises, so logging never blocks or fails a request. The record's keys are the table's ``exchanges``
columns (``tao_core.table_schema.EXCHANGE_COLUMNS``):

| key | value |
|---|---|
| ``request_id`` | the server's id, also the response's ``id`` and ``X-Request-Id`` header (``chatcmpl-...``, ``cmpl-...``) |
| ``client_request_id`` | the request's ``X-Client-Request-Id`` header, or None |
| ``request_time`` | when the request arrived, an aware UTC ``datetime`` |
| ``status_code`` | the HTTP status (499: the client went away before the answer ended) |
| ``execution_ms`` | from arrival to the answer's last byte, in milliseconds |
| ``request_json`` | the request body as parsed JSON (its text when it is not JSON; None when unread) |
| ``response_json`` | the response object; for a stream the assembled completion object; the error object on an error; None at 499 |
| ``served_model``, ``model_version`` | the model id clients send, and the version that answered: the one the request was admitted under (:mod:`tao_core.serve.versions`; the served one when no model ran) |
| ``requester`` | the API key id of the caller (None: the loopback server is open, with no API key) |
| ``tag`` | ``ServeConfig.tag`` (e.g. an A/B arm), or None |
| ``prompt_token_ids`` | the tokens the model was conditioned on (None before they were known) |
| ``completion_token_ids`` | one list per choice, a final stop token included (None unless 200) |
| ``completion_logprobs`` | one list per choice: each token's log-prob, ``log_softmax(logits / T)`` before truncation |
| ``policy_version`` | the version of the weights that sampled the tokens (the same as ``model_version``) |
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from tao_core.serve.metrics import Metrics
from tao_core.serve.text import Choice, finite

log = logging.getLogger(__name__)


@runtime_checkable
class ExchangeLogger(Protocol):
    """Where exchanges go: ``log`` returns at once (queue the record; drop it when full), ``close`` writes
    what is queued and is called once at shutdown, after the last request."""

    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> Any: ...


@dataclass
class Exchange:
    """One request from its arrival to its answer's last byte."""

    endpoint: str  # "/v1/chat/completions" or "/v1/completions"
    request_id: str
    client_request_id: str | None
    requester: str | None = None  # the caller's API key id (tao_core.serve.auth); None: the open loopback mode
    request_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    started: float = field(default_factory=time.perf_counter)
    request_json: Any = None
    prompt_token_ids: list[int] | None = None
    model_version: str = ""  # the version answering: the served one at arrival, then the one it was admitted under
    ended: bool = False


class Exchanges:
    """Starts exchanges and ends each one exactly once: counted in ``/metrics``, handed to the logger."""

    def __init__(self, logger: ExchangeLogger | None, metrics: Metrics, *, served_model: str, model_version: str,
                 tag: str | None = None) -> None:
        self.logger = logger
        self.metrics = metrics
        self.served_model = served_model
        self.model_version = model_version  # the served version (tao_core.serve.versions keeps it current)
        self.tag = tag
        self.log_failures = 0  # records the logger raised on (each is also in the server log)

    def begin(self, endpoint: str, id_prefix: str, client_request_id: str | None,
              requester: str | None = None) -> Exchange:
        return Exchange(endpoint, f"{id_prefix}-{uuid.uuid4().hex}", client_request_id, requester,
                        model_version=self.model_version)

    def end(self, ex: Exchange, status: int, response: Any = None, choices: Sequence[Choice] | None = None) -> None:
        """Count and log ``ex`` answered with ``status`` (once; later calls do nothing)."""
        if ex.ended:
            return
        ex.ended = True
        seconds = time.perf_counter() - ex.started
        self.metrics.request_done(ex.endpoint, status, seconds)
        if self.logger is None:
            return
        record = {
            "request_id": ex.request_id,
            "client_request_id": ex.client_request_id,
            "request_time": ex.request_time,
            "status_code": status,
            "execution_ms": round(seconds * 1000.0, 3),
            "request_json": ex.request_json,
            "response_json": response,
            "served_model": self.served_model,
            "model_version": ex.model_version,
            "requester": ex.requester,
            "tag": self.tag,
            "prompt_token_ids": ex.prompt_token_ids,
            "completion_token_ids": None if choices is None else [list(c.token_ids) for c in choices],
            "completion_logprobs": None if choices is None else [[finite(float(x)) for x in c.logprobs] for c in choices],
            "policy_version": ex.model_version,
        }
        try:
            self.logger.log(record)
        except Exception:  # logging never fails a request
            self.log_failures += 1
            log.exception("tao serve: the exchange logger raised on request %s; the answer is unaffected", ex.request_id)

    def close(self) -> None:
        if self.logger is None:
            return
        try:
            self.logger.close()
        except Exception:
            log.exception("tao serve: closing the exchange logger failed")
