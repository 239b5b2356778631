"""The scorer runtime: every scorer call of a run goes through :func:`score_groups`.

A scorer (see ``tao_core.hookspecs.tao_register_scorers``) sees one prompt and its whole group of
candidates and returns one :class:`~tao_core.types.Score` per candidate. The runtime makes that
call safe and cheap, one job per module:

- :mod:`tao_core.scorer`: what a scorer is (:class:`Scorer`), the :class:`ScorerLimits` it runs
  under, its name, version and options, and :func:`load_scorer` by registered name.
- :mod:`tao_core.score_guard`: one guarded group call (:func:`score_group`): errors, wrong
  results and hangs become ``error`` scores naming the scorer; the run goes on.
- :mod:`tao_core.score_cache`: :class:`ScoreCache` keeps ``ok`` and ``abstain`` scores on disk.
- :mod:`tao_core.ensemble`: :class:`Ensemble` combines weighted, normalized scorers.
- this module: many groups, one scorer (or an ensemble's parts), with budgets, concurrency and
  the cache.

**Budgets.** ``max_calls`` and ``max_total_s`` bound a scorer's group calls and wall time per
:func:`score_groups` call; groups past the budget get ``error`` scores saying which budget ran out
(they were never judged, and they never count as 0).

**Concurrency.** ``workers > 1`` scores that many groups at once on a thread pool, for scorers
that wait on I/O.

**Cache.** Scores are keyed by scorer name, version, options (:func:`scorer_options`), prompt and
candidate text. A scorer whose score depends on the whole group (consensus, listwise ranking) is
keyed by the group too; one that sets the attribute ``pointwise = True`` is keyed per candidate,
and only the candidates missing from the cache are sent to it. Errors are never cached.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tao_core.ensemble import Ensemble, Normalization, normalize
from tao_core.errors import TaoInputError
from tao_core.score_cache import ScoreCache
from tao_core.score_guard import group_errors, score_group
from tao_core.scorer import Scorer, ScorerLimits, load_scorer, scorer_id, scorer_options
from tao_core.types import Candidate, Prompt, Score

# The runtime's public names, importable from here wherever they live.
__all__ = ["Ensemble", "Normalization", "ScoreCache", "Scorer", "ScorerLimits", "load_scorer", "normalize",
           "score_group", "score_groups", "scorer_id", "scorer_options"]


def score_groups(scorer: Any, prompts: Sequence[Prompt], groups: Sequence[Sequence[Candidate]], *,
                 cache: ScoreCache | str | os.PathLike | None = None,
                 limits: ScorerLimits | Mapping[str, ScorerLimits] | None = None) -> list[list[Score]]:
    """Score every group with a scorer (an object, a registered name, or an :class:`Ensemble`).

    Returns one list of scores per group, aligned with its candidates, with ``prompt_id`` and
    ``index`` filled in. ``limits`` is one :class:`ScorerLimits` for every scorer, or a mapping
    from scorer name to limits (names not in it get the defaults); an ensemble's parts are each run
    under their own limits and cached under their own names.
    """
    if len(prompts) != len(groups):
        raise TaoInputError(f"score_groups: {len(prompts)} prompts but {len(groups)} candidate groups")
    if isinstance(scorer, str):
        scorer = load_scorer(scorer)
    if cache is not None and not isinstance(cache, ScoreCache):
        cache = ScoreCache(cache)

    def limits_for(s: Any) -> ScorerLimits:
        if isinstance(limits, Mapping):
            return limits.get(scorer_id(s)[0], ScorerLimits())
        return limits or ScorerLimits()

    if isinstance(scorer, Ensemble):
        parts = [_score_all(p, prompts, groups, cache, limits_for(p)) for p, _ in scorer.parts]
        out = []
        for gi, prompt in enumerate(prompts):
            combined = scorer.combine([part[gi] for part in parts])
            out.append([dataclasses.replace(s, prompt_id=prompt.id, index=i) for i, s in enumerate(combined)])
        return out
    return _score_all(scorer, prompts, groups, cache, limits_for(scorer))


# A group still to score: (group index, positions of the candidates to send, the group's cache keys).
_Job = tuple[int, list[int], list[str]]


def _score_all(scorer: Any, prompts: Sequence[Prompt], groups: Sequence[Sequence[Candidate]],
               cache: ScoreCache | None, limits: ScorerLimits) -> list[list[Score]]:
    """One scorer over every group: cached scores first, then the missing ones under the budget."""
    name, version = scorer_id(scorer)
    budget = _Budget(limits)  # started before the cache lookup: max_total_s counts it
    results, jobs = _from_cache(scorer, prompts, groups, cache)

    def run(job: _Job) -> None:
        gi, positions, keys = job
        subgroup = [groups[gi][i] for i in positions]
        exhausted = budget.take()
        if exhausted:
            scores = group_errors(f"scorer {name!r}: {exhausted}; group not scored", name, version, len(subgroup))
            for s in scores:
                s.prompt_id = prompts[gi].id
        else:
            scores = score_group(scorer, prompts[gi], subgroup, limits)
        for pos, s in zip(positions, scores, strict=True):
            results[gi][pos] = s
        if cache is not None and not exhausted:
            cache.put([keys[p] for p in positions], scores)

    if limits.workers > 1 and len(jobs) > 1:
        with ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix=f"tao-{name}") as pool:
            list(pool.map(run, jobs))
    else:
        for job in jobs:
            run(job)
    out = []
    for prompt, row in zip(prompts, results, strict=True):
        fixed = []
        for i, s in enumerate(row):
            assert s is not None
            fixed.append(dataclasses.replace(s, prompt_id=prompt.id, index=i))
        out.append(fixed)
    return out


def _from_cache(scorer: Any, prompts: Sequence[Prompt], groups: Sequence[Sequence[Candidate]],
                cache: ScoreCache | None) -> tuple[list[list[Score | None]], list[_Job]]:
    """Each group's cached scores (``None`` where missing) and the jobs that fill in the rest: the
    missing candidates of a pointwise scorer, the whole group of any other."""
    name, version = scorer_id(scorer)
    pointwise = bool(getattr(scorer, "pointwise", False))
    options = scorer_options(scorer)
    results: list[list[Score | None]] = []
    jobs: list[_Job] = []
    for gi, (prompt, group) in enumerate(zip(prompts, groups, strict=True)):
        keys = ScoreCache.keys(name, version, prompt, group, pointwise, options) if cache is not None else []
        got = cache.get(keys) if cache is not None and group else [None] * len(group)
        results.append(got)
        missing = [i for i, s in enumerate(got) if s is None]
        if missing and not pointwise:
            missing = list(range(len(group)))
        if missing:
            jobs.append((gi, missing, keys))
    return results, jobs


class _Budget:
    """The call and time budget of one scorer in one :func:`score_groups` call; thread-safe."""

    def __init__(self, limits: ScorerLimits) -> None:
        self.limits = limits
        self.calls = 0
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> str | None:
        """Reserve one call, or say which budget ran out."""
        with self.lock:
            if self.limits.max_calls is not None and self.calls >= self.limits.max_calls:
                return f"call budget of {self.limits.max_calls} group calls exhausted"
            if self.limits.max_total_s is not None and time.monotonic() - self.start >= self.limits.max_total_s:
                return f"time budget of {self.limits.max_total_s:g} s exhausted"
            self.calls += 1
            return None
