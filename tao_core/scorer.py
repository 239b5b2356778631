"""What a scorer is: its protocol, the limits it runs under, its identity and options, and loading
one by its registered name.

The runtime that calls scorers is :mod:`tao_core.scoring`; one guarded call is
:mod:`tao_core.score_guard`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from tao_core.errors import PluginError, TaoError, TaoInputError
from tao_core.plugins import get_registry
from tao_core.types import Candidate, Prompt, Score


@runtime_checkable
class Scorer(Protocol):
    """What a registered scorer factory returns (see ``tao_register_scorers``)."""

    name: str
    version: str
    # Optional ``options``: a JSON-able mapping of what changes the scores; part of the cache key.

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]: ...


@dataclass
class ScorerLimits:
    """How one scorer is run; the same names in the TOML config, the CLI and the Python API."""

    timeout_s: float | None = 60.0  # per group call; past it the group's scores are errors
    max_calls: int | None = None  # group calls per score_groups() run; None = unlimited
    max_total_s: float | None = None  # wall time per score_groups() run; None = unlimited
    workers: int = 1  # groups scored at once on threads; > 1 for scorers that wait on I/O
    isolation: Literal["thread", "process"] = "thread"  # "process": a killable forked child per call

    def __post_init__(self) -> None:
        problems = []
        if self.timeout_s is not None and not self.timeout_s > 0:
            problems.append(f"timeout_s must be > 0 or None, got {self.timeout_s!r}")
        if self.max_calls is not None and (not isinstance(self.max_calls, int) or self.max_calls < 0):
            problems.append(f"max_calls must be an integer >= 0 or None, got {self.max_calls!r}")
        if self.max_total_s is not None and not self.max_total_s > 0:
            problems.append(f"max_total_s must be > 0 or None, got {self.max_total_s!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            problems.append(f"workers must be an integer >= 1, got {self.workers!r}")
        if self.isolation not in ("thread", "process"):
            problems.append(f"isolation must be 'thread' or 'process', got {self.isolation!r}")
        if problems:
            raise TaoInputError("invalid scorer limits: " + "; ".join(problems))


def scorer_id(scorer: Any) -> tuple[str, str]:
    """``(name, version)`` of a scorer object, with an error naming what is missing."""
    name = getattr(scorer, "name", None)
    if not isinstance(name, str) or not name:
        raise TaoInputError(f"scorer {scorer!r} has no 'name' attribute (a non-empty string)")
    if not callable(getattr(scorer, "score", None)):
        raise TaoInputError(f"scorer {name!r} has no score(prompt, candidates) method")
    return name, str(getattr(scorer, "version", "") or "0")


def scorer_options(scorer: Any) -> str:
    """The scorer's ``options`` attribute as canonical JSON, ``""`` when it has none: its part of the
    cache key. A scorer may set ``options`` itself; :func:`load_scorer` sets the options it was given."""
    options = getattr(scorer, "options", None)
    return json.dumps(options, sort_keys=True, default=str) if options else ""


def load_scorer(name: str, **options: Any) -> Any:
    """Instantiate a registered scorer by name (or alias) with its options."""
    entry = get_registry().entry("scorers", name)
    try:
        scorer = entry.obj(**options)
    except TaoError:
        raise
    except TypeError as e:
        raise TaoInputError(f"scorer {name!r} (plugin {entry.plugin!r}) rejected options {options}: {e}") from None
    except Exception as e:  # a plugin's constructor that fails: name it, not a traceback from inside tao
        raise PluginError(f"scorer {name!r} (plugin {entry.plugin!r}) failed to start: {type(e).__name__}: {e}") from e
    if options and getattr(scorer, "options", None) is None:
        with contextlib.suppress(AttributeError):  # a scorer with __slots__ keeps options out of its key
            scorer.options = dict(options)
    return scorer
