"""Checking a settings dataclass field by field: its type hint, finiteness and a :class:`Rule`.

The run config (:mod:`tao_core.config`) and plugins' own settings (the reward-model trainer's)
share these checks, so every settings object tao reads rejects the same bad values the same way.
Imports nothing heavy.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

INT64 = 2**63  # every other integer fits in a signed 64-bit integer (torch tensors, RNG seeds)


@dataclass(frozen=True)
class Rule:
    """What a field accepts beyond its type: ``text`` for messages and the reference, ``test`` checks it."""

    text: str
    test: Callable[[Any], bool]


def between(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Rule:
    """Numbers from ``lo`` to ``hi``, each end excluded where ``*_open``, either end optional."""

    def test(v: float) -> bool:
        above = lo is None or (v > lo if lo_open else v >= lo)
        below = hi is None or (v < hi if hi_open else v <= hi)
        return above and below

    if lo is not None and hi is not None:
        text = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"{'>' if lo_open else '>='} {lo}"
    else:
        text = f"{'<' if hi_open else '<='} {hi}"
    return Rule(text, test)


def one_of(*choices: str) -> Rule:
    return Rule("one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices)


def field_hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple and Ellipsis not in args:
        return isinstance(value, list | tuple) and len(value) == len(args) and all(map(type_ok, value, args))
    if origin in (list, tuple):
        return isinstance(value, list | tuple) and all(type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(type_ok(k, args[0]) for k in value)
    return isinstance(value, hint)


def hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return not isinstance(value, list | tuple) or all(map(is_finite, value))


def check_fields(cfg: Any, rules: dict[str, Rule], prefix: str = "") -> dict[str, str]:
    """Every field of dataclass ``cfg`` (and of its dataclass sections) against its type hint, finiteness,
    the signed 64-bit range and ``rules[key]``: ``{key: message}`` for each bad one."""
    problems: dict[str, str] = {}
    for name, hint in field_hints(type(cfg)).items():
        key, value = prefix + name, getattr(cfg, name)
        rule = rules.get(key)
        if dataclasses.is_dataclass(hint):
            if isinstance(value, hint):
                problems |= check_fields(value, rules, key + ".")
            else:
                problems[key] = f"{key} must be a {hint.__name__} (a table), got {show(value)}"
        elif not type_ok(value, hint):
            problems[key] = f"{key} must be {hint_name(hint)}, got {show(value)} ({type(value).__name__})"
        elif not is_finite(value):
            problems[key] = f"{key} must be finite, got {show(value)}"
        elif isinstance(value, int) and not -INT64 <= value < INT64:
            problems[key] = f"{key} must fit in a signed 64-bit integer, got {show(value)}"
        elif value is not None and rule is not None and not rule.test(value):
            problems[key] = f"{key} must be {rule.text}, got {show(value)}"
    return problems


def _iso(v: str) -> bool:
    try:
        datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


ISO_TIME = Rule("an ISO 8601 date or time (2026-05-01, 2026-05-01T12:00:00+00:00)", _iso)
