"""``by-task``: the scorer and the generator that send each prompt to its own task's.

A prompt of the ``mixture`` task carries its route in ``metadata["route"]``: its task, scorer and
scorer options, generator and generator options, and sampling budget (``max_new_tokens``). The
``by-task`` scorer scores each group with the route's scorer; the ``by-task`` generator samples the
prompts of each route together with the route's generator, at the route's budget (capped by the
step's, so ``generate.max_new_tokens`` caps every task). Routed scorers and generators are built on
first use and kept; a score keeps the name of the scorer that gave it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tao_core.errors import PluginError, TaoError, TaoInputError
from tao_core.plugins import get_component
from tao_core.scoring import ScorerLimits, load_scorer, score_groups
from tao_core.types import Candidate, Prompt, SamplingParams, Score

if TYPE_CHECKING:
    from tao_core.models import LoadedModel

ROUTE = "route"  # the Prompt.metadata key the mixture task writes


def route_of(prompt: Prompt, who: str) -> dict[str, Any]:
    """The prompt's route, or an error saying where routed prompts come from."""
    route = prompt.metadata.get(ROUTE)
    if not isinstance(route, dict):
        raise TaoInputError(f"{who}: prompt {prompt.id!r} carries no route (metadata['route']); the by-task scorer and "
                            "generator serve the prompts of the mixture task (task = \"mixture\"), not prompts from "
                            "prompts_file or the inference table")
    return route


def _key(*parts: Any) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


class ByTaskScorer:
    """``by-task``: each group scored by its prompt's route's scorer (no options of its own)."""

    name = "by-task"
    version = "1"

    def __init__(self) -> None:
        self._scorers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _scorer(self, route: dict[str, Any]) -> Any:
        key = _key(route["scorer"], route["scorer_options"])
        with self._lock:
            if key not in self._scorers:
                try:
                    self._scorers[key] = load_scorer(route["scorer"], **route["scorer_options"])
                except TaoError as e:
                    raise TaoInputError(f"task {route['task']!r}: its scorer {route['scorer']!r} did not start: {e} "
                                        "(task_options.tasks: scorer_options)") from None
            return self._scorers[key]

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        scorer = self._scorer(route_of(prompt, "by-task scorer"))
        # no deadline of its own: the runtime's deadline covers this whole call
        return score_groups(scorer, [prompt], [candidates], limits=ScorerLimits(timeout_s=None))[0]


class ByTaskGenerator:
    """``by-task``: each route's prompts sampled together by the route's generator (no options of its own)."""

    name = "by-task"

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._generators: dict[str, Any] = {}

    def _generator(self, route: dict[str, Any]) -> Any:
        key = _key(route["generator"], route["generator_options"])
        if key not in self._generators:
            try:
                self._generators[key] = get_component("generators", route["generator"])(
                    self.model, **route["generator_options"])
            except (TaoError, TypeError) as e:
                raise TaoInputError(f"task {route['task']!r}: its generator {route['generator']!r} did not start: "
                                    f"{e} (task_options.tasks: generator_options)") from None
        return self._generators[key]

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]:
        batches: dict[str, tuple[dict[str, Any], list[int]]] = {}
        for i, p in enumerate(prompts):
            route = route_of(p, "by-task generator")
            key = _key(route["generator"], route["generator_options"], route["max_new_tokens"])
            batches.setdefault(key, (route, []))[1].append(i)
        out: list[list[Candidate]] = [[] for _ in prompts]
        for route, where in batches.values():
            budget = min(params.max_new_tokens, int(route["max_new_tokens"]))
            groups = self._generator(route).generate([prompts[i] for i in where],
                                                      dataclasses.replace(params, max_new_tokens=budget))
            if len(groups) != len(where):
                raise PluginError(f"by-task generator: generator {route['generator']!r} of task {route['task']!r} "
                                  f"returned {len(groups)} groups for {len(where)} prompts")
            for i, group in zip(where, groups, strict=True):
                out[i] = group
        return out


SCORERS = {"by-task": ByTaskScorer}
GENERATORS = {"by-task": ByTaskGenerator}
