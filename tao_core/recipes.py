"""Recipes: run configs that a task plugin ships beside its code, run by name with ``tao demo``.

A task class lists its recipes in a ``recipes`` attribute, ``{name: path}``, each path relative to
the directory of the module defining the class (package data, so a pip-installed plugin ships
them)::

    class ArithmeticTask:
        recipes = {"demo": "recipes/demo.toml", "label-free": "recipes/label-free.toml"}

A recipe file is an ordinary ``tao run`` config (it names its task). ``tao demo NAME`` finds NAME
among the recipes of every registered task; ``TASK/NAME`` picks one task's when two tasks ship a
recipe of the same name. The core knows no recipe by name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from tao_core.errors import TaoInputError
from tao_core.plugins import get_registry


@dataclass(frozen=True)
class Recipe:
    task: str  # the registered task that ships it
    name: str  # its name within the task
    path: Path  # the TOML config file

    @property
    def qualified(self) -> str:
        return f"{self.task}/{self.name}"

    def summary(self) -> str:
        """The first line of the file's leading comment, or ''."""
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
            if line.strip():
                break
        return ""


def _task_recipes(task: str, factory) -> list[Recipe]:
    listed = getattr(factory, "recipes", None) or {}
    if not isinstance(listed, dict):
        raise TaoInputError(f"task {task!r}: `recipes` must be a dict {{name: path}}, got {type(listed).__name__}")
    try:
        base = Path(inspect.getfile(factory)).parent
    except TypeError:
        base = Path.cwd()
    return [Recipe(task, str(name), (base / rel).resolve()) for name, rel in listed.items()]


def list_recipes() -> list[Recipe]:
    """Every recipe of every registered task, sorted by task then name."""
    reg = get_registry()
    out = []
    for task in reg.names("tasks"):
        entry = reg.lookup("tasks", task)
        if entry is not None:
            out += _task_recipes(task, entry.obj)
    return sorted(out, key=lambda r: (r.task, r.name))


def find_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (or ``task/name``); a clear error when none or several match."""
    recipes = list_recipes()
    task, sep, short = name.rpartition("/")
    hits = [r for r in recipes if r.name == short and (not sep or r.task == task)]
    if not hits:
        known = ", ".join(r.qualified for r in recipes) or "none (no registered task ships one)"
        raise TaoInputError(f"no recipe named {name!r}; recipes: {known} (list them with `tao demo --list`)")
    if len(hits) > 1:
        raise TaoInputError(f"recipe {name!r} is shipped by several tasks: "
                            + ", ".join(r.qualified for r in hits) + "; name one as TASK/RECIPE")
    recipe = hits[0]
    if not recipe.path.is_file():
        raise TaoInputError(f"recipe {recipe.qualified}: file {recipe.path} is missing from the task's package")
    return recipe
