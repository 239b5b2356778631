"""Built-in scorers (TAO stage 2).

Each scorer module in this package exposes a ``SCORERS`` dict, ``{name: factory}`` (a factory may
also be ``(factory, aliases)``); this entry point registers every present module's dict. A module
that is not installed in this checkout is simply not registered; one that fails to import raises,
so the plugin manager reports it by name instead of losing its scorers silently.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import tao_core

# Scorer modules of this package, registered in this order.
SCORER_MODULES = ("sql", "majority", "rules", "reward_model", "judge", "arithmetic", "ensemble")


def present_modules(package: str, names: tuple[str, ...]) -> list[ModuleType]:
    mods = []
    for name in names:
        full = f"{package}.{name}"
        if importlib.util.find_spec(full) is not None:
            mods.append(importlib.import_module(full))
    return mods


def register_tables(register: Any, modules: list[ModuleType], attr: str) -> None:
    """Register each module's ``attr`` dict: ``{name: factory}`` or ``{name: (factory, aliases)}``."""
    for mod in modules:
        for name, obj in getattr(mod, attr, {}).items():
            if isinstance(obj, tuple):
                factory, aliases = obj
                register(name, factory, aliases=tuple(aliases))
            else:
                register(name, obj)


@tao_core.hookimpl
def tao_register_scorers(register):
    register_tables(register, present_modules(__name__, SCORER_MODULES), "SCORERS")
