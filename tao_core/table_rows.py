"""One exchange record -> one ``exchanges`` row: checks, JSON encoding, body policy, sampling.

:func:`encode_record` is what the table's writer thread (and the importers) run on each record; it
never touches the database. A record that cannot be stored raises :class:`RejectedRecord` with the
reason, which the writer counts in ``stats()["rejected_reasons"]``; nothing is raised to the caller
of ``log``. What a record holds is listed in :data:`tao_core.table_schema.EXCHANGE_COLUMNS`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tao_core.table_schema import EXCHANGE_COLUMNS, ID_LENGTH, NAME_LENGTH, to_db_time

BODY_COLUMNS = ("request_json", "response_json")
NAME_COLUMNS = ("served_model", "model_version", "requester", "tag", "policy_version")
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB of UTF-8 JSON per body; a longer body becomes the truncation marker


class RejectedRecord(ValueError):
    """A record the table cannot store; ``str(e)`` is the reason."""


@dataclass(frozen=True)
class BodyPolicy:
    """What is kept of request and response bodies."""

    store_bodies: bool = True  # False: request_json / response_json stay NULL (token columns are still stored)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # a body longer than this (UTF-8 JSON) is stored as the marker


def truncation_marker(size: int) -> str:
    """What replaces a body over ``max_body_bytes``: valid JSON that says so and gives the size."""
    return json.dumps({"truncated": True, "bytes": size})


def dumps(value: Any, field: str) -> str:
    """Compact JSON text of ``value``, or :class:`RejectedRecord` naming the field and the problem."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
    except (TypeError, ValueError) as e:
        raise RejectedRecord(f"{field!r} is not JSON-able ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise RejectedRecord(f"{field!r} nests too deeply to encode as JSON") from None
    except UnicodeEncodeError:
        raise RejectedRecord(f"{field!r} holds an unpaired UTF-16 surrogate, which is not text") from None
    return text


def encode_body(value: Any, field: str, policy: BodyPolicy) -> str | None:
    if value is None or not policy.store_bodies:
        return None
    text = dumps(value, field)
    size = len(text.encode("utf-8"))
    return truncation_marker(size) if size > policy.max_body_bytes else text


def sampled(request_id: str, fraction: float) -> bool:
    """Whether ``request_id`` falls in the logged ``fraction``: the same answer in every process and run."""
    if fraction >= 1.0:
        return True
    if fraction <= 0.0:
        return False
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _name(record: dict[str, Any], key: str, limit: int = NAME_LENGTH, cut: bool = False) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RejectedRecord(f"{key!r} must be a string, got {type(value).__name__}")
    if "\x00" in value:
        raise RejectedRecord(f"{key!r} holds a NUL character")
    if len(value) > limit:
        if not cut:
            raise RejectedRecord(f"{key!r} is longer than {limit} characters")
        value = value[:limit]
    return value


def _int_list(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(type(t) is int for t in value):
        raise RejectedRecord(f"{field!r} must be a list of integers")
    return value


def _per_choice(value: Any, field: str, kind: type) -> list[list[Any]]:
    if not isinstance(value, list) or not all(isinstance(choice, list) for choice in value):
        raise RejectedRecord(f"{field!r} must be a list with one list per choice")
    for choice in value:
        if not all(type(x) is kind or (kind is float and type(x) is int) for x in choice):
            raise RejectedRecord(f"{field!r} must hold {kind.__name__}s")
    return value


def _tokens(record: dict[str, Any]) -> dict[str, str | None]:
    prompt, ids, logprobs = (record.get(k) for k in ("prompt_token_ids", "completion_token_ids",
                                                     "completion_logprobs"))
    if ids is not None:
        _per_choice(ids, "completion_token_ids", int)
    if logprobs is not None:
        _per_choice(logprobs, "completion_logprobs", float)
        if ids is not None and [len(c) for c in ids] != [len(c) for c in logprobs]:
            raise RejectedRecord("'completion_logprobs' must have one log-prob per token of 'completion_token_ids'")
        if any(not math.isfinite(x) for choice in logprobs for x in choice):
            raise RejectedRecord("'completion_logprobs' holds a NaN or infinite value")
    return {
        "prompt_token_ids": None if prompt is None else dumps(_int_list(prompt, "prompt_token_ids"), "prompt_token_ids"),
        "completion_token_ids": None if ids is None else dumps(ids, "completion_token_ids"),
        "completion_logprobs": None if logprobs is None else dumps(logprobs, "completion_logprobs"),
    }


def _number(record: dict[str, Any], key: str, kind: type) -> Any:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise RejectedRecord(f"{key!r} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {type(value).__name__}")
    if not math.isfinite(value):
        raise RejectedRecord(f"{key!r} must be finite")
    return value


def encode_record(record: Any, received_at: float, policy: BodyPolicy, sampling_fraction: float) -> dict[str, Any]:
    """The ``exchanges`` row for ``record``; ``received_at`` (epoch seconds) stands in for a missing request_time."""
    if not isinstance(record, dict):
        raise RejectedRecord(f"a record must be a dict, got {type(record).__name__}")
    unknown = sorted(set(record) - set(EXCHANGE_COLUMNS))
    if unknown:
        raise RejectedRecord(f"unknown field(s) {unknown[:10]}")
    request_id = record.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise RejectedRecord("missing request_id (a non-empty string)")
    if len(request_id) > ID_LENGTH or "\x00" in request_id:
        raise RejectedRecord(f"request_id is longer than {ID_LENGTH} characters or holds a NUL character")
    when = record.get("request_time")
    if when is None:
        when = datetime.fromtimestamp(received_at, UTC)
    elif not isinstance(when, datetime):
        raise RejectedRecord(f"'request_time' must be a datetime, got {type(when).__name__}")
    fraction = record.get("sampling_fraction")
    fraction = sampling_fraction if fraction is None else fraction
    row = {
        "request_id": request_id,
        "client_request_id": _name(record, "client_request_id", cut=True),
        "request_time": to_db_time(when),
        "status_code": _number(record, "status_code", int),
        "execution_ms": _number(record, "execution_ms", float),
        "sampling_fraction": _number({"sampling_fraction": fraction}, "sampling_fraction", float),
        **{key: _name(record, key) for key in NAME_COLUMNS},
        **{key: encode_body(record.get(key), key, policy) for key in BODY_COLUMNS},
        **_tokens(record),
    }
    return row
