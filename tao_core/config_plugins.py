"""The plugin checks of a run config: every component it names is registered, and every option
given to a component is a keyword its factory accepts (:func:`tao_core.config.validate` calls them)."""

from __future__ import annotations

import inspect
from typing import Any

from tao_core.errors import PluginError
from tao_core.fields import show

# Fields naming a registered component: key -> registry kind.
PLUGINS = {"task": "tasks", "generate.generator": "generators", "score.scorer": "scorers",
           "train.objective": "objectives", "train.advantage": "advantages"}
# Keyword options of a component's factory: key -> (the key naming the component, the attribute of
# the task factory naming its default when that key is None, positional arguments the caller passes).
OPTIONS = {"task_options": ("task", None, 0),
           "generate.options": ("generate.generator", "default_generator", 1),  # factory(model, **options)
           "score.options": ("score.scorer", "default_scorer", 0)}


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def plugin_problems(cfg: Any, bad: dict[str, str]) -> list[str]:
    """Named plugins are registered and their options are keywords of their factories, for the
    keys whose values passed :func:`check_values`."""
    from tao_core.plugins import get_registry

    reg = get_registry()
    problems, factories = [], {}
    if cfg.task is None and "task" not in bad:
        problems.append(f"task is not set; name a registered task: {', '.join(reg.names('tasks'))}")
    for key, kind in PLUGINS.items():
        name = _get(cfg, key)
        if name is None or key in bad:
            continue
        try:
            factories[key] = reg.entry(kind, name).obj
        except PluginError:
            problems.append(f"{key} = {show(name)} is not a registered {kind[:-1]}; "
                            f"available: {', '.join(reg.names(kind))}")
    for key, (name_key, task_default, positional) in OPTIONS.items():
        name = _get(cfg, name_key)
        if name is None and task_default is not None:
            name = getattr(factories.get("task"), task_default, None)  # a class attribute of the task factory
        if not isinstance(name, str) or name_key in bad or key in bad:
            continue
        try:
            factory = reg.entry(PLUGINS[name_key], name).obj
        except PluginError:
            continue  # reported above, or a task's missing default (reported when the task is built)
        problems += _option_problems(key, _get(cfg, key), f"{PLUGINS[name_key][:-1]} {name!r}", factory, positional)
    return problems


def _option_problems(key: str, options: dict[str, Any], what: str, factory: Any, positional: int) -> list[str]:
    """``options`` against the keyword parameters of ``factory`` (after ``positional`` ones)."""
    try:
        params = list(inspect.signature(factory).parameters.values())[positional:]
    except (TypeError, ValueError):  # no signature to read (a builtin): the factory checks its options
        return []
    keywords = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    problems = []
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = ", ".join(p.name for p in keywords) or "none"
        problems += [f"{key}.{k} is not an option of {what}; it accepts: {accepted}"
                     for k in options if k not in {p.name for p in keywords}]
    missing = [p.name for p in keywords if p.default is p.empty and p.name not in options]
    if missing:
        problems.append(f"{key} lacks {', '.join(missing)}, required by {what}")
    return problems
