"""``KEY=VALUE`` option flags: one syntax for every command (``tao run/sft --set``, ``tao eval --option``).

The key is everything before the first ``=`` (surrounding spaces dropped), so a value may hold ``=``
itself (``name=a=b``). The value is read as one TOML value, as it would be written after ``key =`` in
the config file: ``3``, ``1e-5``, ``true``, ``"quoted"``, ``[1, 2]``, ``{level = "mul2"}``,
``2024-05-01``; anything that is not exactly one TOML value is the raw string (``level=mul2`` gives
``"mul2"``).

``tao eval --option`` used to read its values as JSON. A JSON spelling that TOML does not read
(an object ``{"a": 1}``, ``null``, ``NaN``, an array holding those) is still accepted, with the same
value as before, and a deprecation note on stderr giving the TOML spelling (``{a = 1}``); TOML has no
null, so for ``null`` the note says to leave the option out.
"""

from __future__ import annotations

import json
import math
import re
import sys
import tomllib
from collections.abc import Iterable
from typing import Any

from tao_core.errors import TaoInputError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def parse_key_values(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """``["train.lr=1e-5", "level=mul2"]`` -> ``{"train.lr": 1e-05, "level": "mul2"}``.

    Each value is a TOML value, else the raw string; a later item overrides an earlier one with the
    same key. ``flag`` names the option in errors and deprecation notes. Raises
    :class:`~tao_core.errors.TaoInputError` for an item without ``=`` or with an empty key.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problem = "no '='" if not sep else "an empty KEY"
            raise TaoInputError(f"{flag} {item!r}: {problem}; write KEY=VALUE, e.g. {flag} name=value "
                                "(the value is read as TOML, else as plain text)")
        parsed[key] = _value(key, raw, flag)
    return parsed


def _value(key: str, raw: str, flag: str) -> Any:
    try:
        doc = tomllib.loads(f"v = {raw}")
        if set(doc) == {"v"}:  # exactly one value: "1\nother = 2" is text, not a value and a key
            return doc["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    spelling = _toml_spelling(value)
    if spelling is not None:
        advice = f"write {key}={spelling}"
    elif value is None:
        advice = "TOML has no null: leave the option out to get its default"
    else:
        advice = "TOML has no null, so this value has no TOML spelling: drop its null entries"
    print(f"warning: {flag} {key}={raw}: JSON values are deprecated, option values are TOML; {advice}",
          file=sys.stderr)
    return value


def _toml_spelling(value: Any) -> str | None:
    """``value`` written as a TOML inline value (``{a = 1}``, ``[1, "x"]``, ``nan``); None when it holds a
    None, which TOML cannot spell."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string with \uXXXX escapes is a TOML basic string
    if isinstance(value, list):
        parts = [_toml_spelling(v) for v in value]
        return None if None in parts else "[" + ", ".join(parts) + "]"
    if isinstance(value, dict):
        parts = [_toml_spelling(v) for v in value.values()]
        if None in parts:
            return None
        keys = [k if _BARE_KEY.fullmatch(k) else json.dumps(k) for k in value]
        return "{" + ", ".join(f"{k} = {v}" for k, v in zip(keys, parts, strict=True)) + "}"
    raise TypeError(f"no TOML spelling for {type(value).__name__}")
