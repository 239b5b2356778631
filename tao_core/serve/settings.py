"""``ServeConfig``: the settings of ``tao serve``, the same names as its CLI flags.

Nothing here imports torch or FastAPI, so the command line can show its defaults cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from tao_core.errors import TaoInputError


@dataclass
class ServeConfig:
    """How ``tao serve`` answers; ``tao serve --help`` shows the same names as flags."""

    host: str = "127.0.0.1"  # loopback: only this machine can connect
    port: int = 8000  # TCP port
    served_model: str = ""  # the model id clients send; "" serves it under the MODEL argument as given
    model_version: str = "0"  # the starting model's version (POST /admin/reload serves the next); logged per exchange
    tag: str | None = None  # written to every logged exchange (e.g. an A/B arm), for filtering rounds
    max_queue: int = 256  # requests accepted but not generating yet; one more is answered 429 + Retry-After
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for (400 above)
    default_max_tokens: int = 512  # a chat request without max_tokens; the engine reserves KV cache for it all
    max_n: int = 16  # the largest n (completions per request)
    max_body_bytes: int = 1 << 20  # request bodies above this are answered 413
    retry_after_s: int = 1  # the Retry-After header of a 429 or 503, in seconds
    drain_timeout_s: float = 30.0  # on shutdown, in-flight requests get this long to finish, then are aborted
    max_kv_tokens: int | None = None  # the engine's KV-cache capacity in tokens (None: EngineConfig's default)
    max_running: int = 256  # sequences the engine decodes together at most (EngineConfig.max_running)
    pack_weights: bool = True  # the engine multiplies by oneDNN-packed weight copies: a second copy, ~20% faster decode
    keys: str | None = None  # the API key store (tao keys); None: $TAO_HOME/keys.json
    rate_limit: int = 600  # /v1 requests per minute per key (per client address when open); a key's own limit wins; 0: none

    def __post_init__(self) -> None:
        positive = ("port", "max_queue", "max_tokens_limit", "default_max_tokens", "max_n", "max_body_bytes", "max_running")
        problems = [f"{name} must be an integer >= 1, got {getattr(self, name)!r}"
                    for name in positive if not _is_int(getattr(self, name)) or getattr(self, name) < 1]
        if not isinstance(self.pack_weights, bool):
            problems.append(f"pack_weights must be true or false, got {self.pack_weights!r}")
        if not _is_int(self.retry_after_s) or self.retry_after_s < 0:
            problems.append(f"retry_after_s must be an integer >= 0, got {self.retry_after_s!r}")
        if not _is_int(self.rate_limit) or self.rate_limit < 0:
            problems.append(f"rate_limit must be requests per minute >= 0 (0: unlimited), got {self.rate_limit!r}")
        if not isinstance(self.drain_timeout_s, int | float) or self.drain_timeout_s < 0:
            problems.append(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s!r}")
        if self.max_kv_tokens is not None and (not _is_int(self.max_kv_tokens) or self.max_kv_tokens < 1):
            problems.append(f"max_kv_tokens must be an integer >= 1 or None, got {self.max_kv_tokens!r}")
        if _is_int(self.default_max_tokens) and _is_int(self.max_tokens_limit) and self.default_max_tokens > self.max_tokens_limit:
            problems.append(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})")
        if problems:
            raise TaoInputError("invalid serve settings: " + "; ".join(problems))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
