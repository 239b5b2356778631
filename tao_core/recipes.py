"""Recipes: run configs that a task plugin ships beside its code, run by name with ``tao demo``.

A task class lists its recipes in a ``recipes`` attribute, ``{name: path}``, each path relative to
the directory of the module defining the class (package data, so a pip-installed plugin ships
them)::

    class ArithmeticTask:
        recipes = {"demo": "recipes/demo.toml", "label-free": "recipes/label-free.toml"}

A recipe file is an ordinary ``tao run`` config (it names its task). ``tao demo NAME`` finds NAME
among the recipes of every registered task; ``TASK/NAME`` picks one task's when two tasks ship a
recipe of the same name. A bad entry (a name that is not a plain word, a path that is not a file)
is skipped and reported by ``tao demo --list``, so one plugin's mistake never hides the others'
recipes. The core knows no recipe by name (the CLI's default, ``arithmetic/demo``, is an alias).
"""

from __future__ import annotations

import inspect
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tao_core.errors import PluginError, TaoInputError
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
        """The file's leading comment up to its first full stop (or ''): what the recipe does."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return ""
        lines = []
        for line in text.splitlines():
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
        comment = " ".join(lines)
        return comment.split(". ")[0].rstrip(".") + "." if comment else ""


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _task_recipes(task: str, factory) -> tuple[list[Recipe], list[str]]:
    """A task's valid recipes, and a line per invalid entry (bad name, path or missing file)."""
    listed = getattr(factory, "recipes", None) or {}
    if not isinstance(listed, dict):
        return [], [f"task {task!r}: `recipes` must be a dict {{name: path}}, got {type(listed).__name__}"]
    try:
        base = Path(inspect.getfile(factory)).parent
    except TypeError:
        return [], [f"task {task!r}: its factory has no source file to find its recipes beside"]
    good, problems = [], []
    for name, rel in listed.items():
        where = f"task {task!r}, recipe {name!r}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            problems.append(f"{where}: a recipe name is letters, digits, '.', '_' or '-' (64 at most)")
        elif not isinstance(rel, str | os.PathLike):
            problems.append(f"{where}: path must be a string, got {type(rel).__name__}")
        elif not (base / rel).resolve().is_file():
            problems.append(f"{where}: {(base / rel).resolve()} is not a file in the task's package")
        else:
            good.append(Recipe(task, name, (base / rel).resolve()))
    return good, problems


def list_recipes(*, with_problems: bool = False):
    """Every valid recipe of every registered task, sorted by task then name; with
    ``with_problems``, also a line per skipped entry (``(recipes, problems)``)."""
    reg = get_registry()
    out, problems = [], []
    for task in reg.names("tasks"):
        try:
            entry = reg.lookup("tasks", task)
        except PluginError as e:  # a duplicate task name: the registry's own error says which plugins
            problems.append(str(e))
            continue
        if entry is not None:
            good, bad = _task_recipes(task, entry.obj)
            out += good
            problems += bad
    out.sort(key=lambda r: (r.task, r.name))
    return (out, problems) if with_problems else out


def find_recipe(name: str) -> Recipe:
    """The recipe called ``name`` (or ``task/name``); a clear error when none or several match."""
    recipes, problems = list_recipes(with_problems=True)
    task, sep, short = name.rpartition("/")
    hits = [r for r in recipes if r.name == short and (not sep or r.task == task)]
    if not hits:
        known = ", ".join(r.qualified for r in recipes) or "none (no registered task ships one)"
        skipped = f"; skipped: {'; '.join(problems)}" if problems else ""
        raise TaoInputError(f"no recipe named {name!r}; recipes: {known} (list them with `tao demo --list`){skipped}")
    if len(hits) > 1:
        raise TaoInputError(f"recipe {name!r} is shipped by several tasks: "
                            + ", ".join(r.qualified for r in hits) + "; name one as TASK/RECIPE")
    return hits[0]
