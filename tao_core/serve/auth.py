"""Who may call ``tao serve``: bearer keys on ``/v1/*``, admin keys on ``/admin/*``, a rate per caller.

:class:`AuthMiddleware` wraps the whole application, so every path is covered however its route
was added (``tao_core.serve.admin`` only adds routes). Per request path:

| path | needs |
|---|---|
| ``/health``, ``/metrics``, anything else outside the two below | nothing |
| ``/v1/*`` | an ``api`` or ``admin`` key, unless the server is bound to loopback and the store holds no valid ``api`` key (the open mode: anyone on this machine) |
| ``/admin/*`` | always an ``admin`` key, or the in-memory admin token given to ``create_app`` |

The key comes as ``Authorization: Bearer KEY``. A missing, unknown or revoked key is a 401
(``missing_api_key``, ``invalid_api_key``); an ``api`` key on ``/admin/*`` a 403
(``insufficient_permissions``); every error in OpenAI's error-object shape. Before the route runs,
each ``/v1/*`` request takes a token from its caller's bucket (:class:`TokenBuckets`: per key id,
or per client address in the open mode): the key's own rate limit or the server's
``--rate-limit``, in requests per minute; an empty bucket answers 429 with ``Retry-After``, the
whole seconds until the bucket holds a token again. The caller's key id reaches the route as
``request.state.key_id`` (None in the open mode) and from there the logged exchange's ``requester``.

Nothing here imports FastAPI: the checks are plain functions over the ASGI scope.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tao_core.errors import TaoInputError
from tao_core.serve.keys import KeyStore, LiveKeys
from tao_core.serve.protocol import ApiError

log = logging.getLogger(__name__)

ADMIN_TOKEN_ID = "admin-token"  # the caller id of the in-memory admin token
_MAX_BUCKETS = 10_000  # buckets kept before full (idle) ones are dropped; a full bucket is a fresh one


@dataclass(frozen=True)
class Caller:
    """Who a request comes from."""

    key_id: str | None  # the stored key's id, ADMIN_TOKEN_ID, or None in the open mode
    role: str  # "api", "admin", or "open" (loopback with no api key in the store)
    rate_limit: int | None  # the key's requests per minute; None: the server's


class TokenBuckets:
    """One token bucket per caller: holds at most ``per_minute`` tokens, refills ``per_minute`` a minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when counted)

    def take(self, caller: str, per_minute: int) -> float:
        """Take one token for ``caller``: 0.0 when taken, else the seconds until one is there."""
        if per_minute <= 0:
            return 0.0
        now = self.clock()
        tokens, then = self._buckets.get(caller, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - then) * per_minute / 60.0)
        if tokens >= 1.0:
            self._buckets[caller] = (tokens - 1.0, now)
            if len(self._buckets) > _MAX_BUCKETS:
                self._forget_full(per_minute)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1.0 - tokens) * 60.0 / per_minute

    def _forget_full(self, per_minute: int) -> None:
        now = self.clock()
        for caller, (tokens, then) in list(self._buckets.items()):
            if tokens + (now - then) * per_minute / 60.0 >= per_minute:
                del self._buckets[caller]


class Guard:
    """The checks of one server: its keys, whether it is bound to loopback, its default rate limit."""

    def __init__(self, keys: LiveKeys, *, loopback: bool, rate_limit: int, admin_token: str | None = None,
                 buckets: TokenBuckets | None = None) -> None:
        self.keys = keys
        self.loopback = loopback
        self.rate_limit = rate_limit
        self.admin_token = admin_token
        self.buckets = buckets or TokenBuckets()

    def caller(self, path: str, authorization: str | list[str] | None) -> Caller | None:
        """The caller of ``path`` (None: a path that needs no key); ApiError 401/403 when not allowed, 400 for
        more than one ``Authorization`` header (``authorization``: the header's values)."""
        admin = path == "/admin" or path.startswith("/admin/")
        if not admin and not path.startswith("/v1/"):
            return None
        values = authorization if isinstance(authorization, list) else [authorization] if authorization else []
        if len(values) > 1:  # which one counts would depend on the proxy or framework: refuse both
            raise ApiError(400, f"the request has {len(values)} Authorization headers; send exactly one "
                           "('Authorization: Bearer KEY')", code="invalid_authorization_header")
        key = _bearer(values[0] if values else None)
        if admin and key is not None and self.admin_token and hmac.compare_digest(
                key.encode("utf-8"), self.admin_token.encode("utf-8")):
            return Caller(ADMIN_TOKEN_ID, "admin", 0)
        try:
            found = None if key is None else self.keys.find(key)
            open_mode = not admin and self.loopback and not self.keys.has_api_key()
        except TaoInputError as e:  # the key file turned unreadable: refuse rather than trust stale keys
            log.error("tao serve: %s", e)  # the why and the path are for the operator, not for any caller
            raise ApiError(503, "the server cannot read its API keys; ask its operator (the server log says why)",
                           code="key_store_unreadable") from None
        if open_mode:  # any key or none; a valid stored key still names its caller
            return Caller(found.id, found.role, found.rate_limit) if found and found.active else Caller(None, "open", None)
        if key is None:
            given = " (the Authorization header given is not of that form)" if values else ""
            raise ApiError(401, f"You didn't provide an API key: send it as 'Authorization: Bearer KEY'{given} "
                           "(tao keys create makes one)", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if found is None or not found.active:
            what = "was revoked" if found is not None else "is not a key of this server"
            raise ApiError(401, f"Incorrect API key provided: the key {_shown(key)} {what}", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if admin and found.role != "admin":
            raise ApiError(403, f"the key {found.id} has role {found.role!r}; {path} needs an admin key "
                           "(tao keys create --admin)", code="insufficient_permissions")
        return Caller(found.id, found.role, found.rate_limit)

    def admit(self, caller: Caller, client: str) -> None:
        """Take a token from the caller's bucket (the client address's in the open mode); 429 when empty."""
        limit = self.rate_limit if caller.rate_limit is None else caller.rate_limit
        who = caller.key_id if caller.key_id is not None else f"address {client}"
        wait = self.buckets.take(who, limit)
        if wait > 0:
            raise ApiError(429, f"Rate limit reached for {who}: {limit} requests per minute; retry in {wait:.1f} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(max(1, math.ceil(wait)))})


class AuthMiddleware:
    """ASGI middleware that answers every request the :class:`Guard` refuses, before any route runs."""

    def __init__(self, app: Callable[..., Awaitable[None]], guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorization = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        try:
            caller = self.guard.caller(scope["path"], authorization)
            if caller is not None and scope["path"].startswith("/v1/"):
                self.guard.admit(caller, (scope.get("client") or ("unknown",))[0])
        except ApiError as e:
            await _send_error(send, e)
            return
        if caller is not None:
            scope.setdefault("state", {})["key_id"] = caller.key_id
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` lets only this machine connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, keys: LiveKeys | KeyStore) -> None:
    """Refuse to serve ``host`` beyond loopback while the key store holds no valid ``api`` key."""
    live = keys if isinstance(keys, LiveKeys) else LiveKeys(keys)
    if is_loopback(host) or live.has_api_key():
        return
    raise TaoInputError(
        f"tao serve will not bind {host}: it is reachable from other machines and the key store "
        f"{live.store.path} holds no API key, so anyone could use the model. Run `tao keys create --name NAME` "
        "first (clients then send the key as 'Authorization: Bearer KEY'), or bind 127.0.0.1.")


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


def _shown(key: str) -> str:
    return f"ending in {key[-4:]!r}" if len(key) >= 16 else "given"


async def _send_error(send: Callable, e: ApiError) -> None:
    body = json.dumps(e.body()).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("latin-1"))]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
