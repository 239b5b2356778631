"""TOML text from plain data: the configs tao writes for its own children (flywheel rounds, benchmark runs).

:mod:`tomllib` reads TOML but the standard library writes none; this writes the subset tao's configs use
(tables of strings, numbers, booleans, lists and inline tables; ``None`` values left out) so that
``tomllib.loads(dump_toml(d))`` gives ``d`` back without its ``None`` values.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tao_core.errors import TaoInputError
from tao_core.fields import show


def dump_toml(data: dict[str, Any], prefix: str = "") -> str:
    """``data`` as TOML: a table's plain keys, then its sub-tables (``[a.b]``), recursively."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            lines += ["", f"[{name}]", dump_toml(v, name).rstrip("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else json.dumps(k, ensure_ascii=False)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + "}"
    raise TaoInputError(f"cannot write {show(v)} ({type(v).__name__}) to a TOML config")
