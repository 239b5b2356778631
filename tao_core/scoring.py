"""The scorer runtime: every scorer call of a run goes through :func:`score_groups`.

A scorer (see ``tao_core.hookspecs.tao_register_scorers``) sees one prompt and its whole group of
candidates and returns one :class:`~tao_core.types.Score` per candidate. This module makes that
call safe and cheap:

- **Errors are scores.** An exception, a wrong-length list or a non-``Score`` item becomes an
  ``error`` score for each candidate of the group, naming the scorer; the run goes on.
- **Hangs are stopped.** With ``isolation="thread"`` (the default) the call runs in a daemon
  thread and is *abandoned* once ``timeout_s`` passes: its candidates get ``error`` scores at
  once, but Python cannot kill a thread, so a scorer that truly never returns keeps one thread
  (and whatever it holds) until the process exits. That suits I/O-bound and cooperative scorers
  (an HTTP judge, a SQLite query with its own progress handler). ``isolation="process"`` runs
  each group call in a forked child that is killed at the deadline: hard isolation for CPU-bound
  or untrusted scorers, at the price of a fork per group and picklable scores.
- **Budgets.** ``max_calls`` and ``max_total_s`` bound a scorer's group calls and wall time per
  :func:`score_groups` call; groups past the budget get ``error`` scores saying which budget ran
  out (they were never judged, and they never count as 0).
- **Concurrency.** ``workers > 1`` scores that many groups at once on a thread pool, for scorers
  that wait on I/O.
- **Cache.** :class:`~tao_core.score_cache.ScoreCache` keeps ``ok`` and ``abstain`` scores on disk (SQLite) keyed by
  scorer name, version, options (:func:`scorer_options`), prompt and candidate text. A scorer
  whose score depends on the whole group (consensus, listwise ranking) is keyed by the group too;
  one that sets the attribute ``pointwise = True`` is keyed per candidate, and only the candidates
  missing from the cache are sent to it. Errors are never cached.
- **Ensembles.** :class:`Ensemble` combines weighted scorers after normalizing each one within
  the group; it is ``ok`` where at least one weighted part is, and keeps every part in its details.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from tao_core.errors import PluginError, TaoError, TaoInputError
from tao_core.score_cache import ScoreCache
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


def load_scorer(name: str, **options: Any) -> Any:
    """Instantiate a registered scorer by name (or alias) with its options."""
    from tao_core.plugins import get_registry

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


def scorer_options(scorer: Any) -> str:
    """The scorer's ``options`` attribute as canonical JSON, ``""`` when it has none: its part of the
    cache key. A scorer may set ``options`` itself; :func:`load_scorer` sets the options it was given."""
    options = getattr(scorer, "options", None)
    return json.dumps(options, sort_keys=True, default=str) if options else ""


# ---------------------------------------------------------------------------------------------
# One guarded group call


class _Timeout(Exception):
    pass


def _group_errors(reason: str, name: str, version: str, n: int, **details: Any) -> list[Score]:
    return [Score.error(reason, scorer=name, version=version, index=i, details=dict(details)) for i in range(n)]


def _validate(result: Any, name: str, version: str, n: int) -> list[Score]:
    """Check a scorer's return value; fill in scorer/version/index on copies of its scores."""
    if not isinstance(result, list | tuple):
        return _group_errors(
            f"scorer {name!r} returned {type(result).__name__}, expected a list of {n} Score objects",
            name, version, n)
    if len(result) != n:
        return _group_errors(f"scorer {name!r} returned {len(result)} scores for {n} candidates", name, version, n)
    bad = [i for i, s in enumerate(result) if not isinstance(s, Score)]
    if bad:
        return _group_errors(
            f"scorer {name!r} returned a {type(result[bad[0]]).__name__} at position {bad[0]}, "
            f"expected Score (Score.ok / Score.abstain / Score.error)", name, version, n)
    return [dataclasses.replace(s, scorer=s.scorer or name, version=s.version or version, index=i,
                                details=dict(s.details)) for i, s in enumerate(result)]


def _run_thread(fn: Callable[[], Any], timeout: float | None, label: str) -> Any:
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported as the group's error score
            box["exc"], box["tb"] = e, traceback.format_exc()
        finally:
            done.set()

    threading.Thread(target=target, daemon=True, name=f"tao-scorer-{label}").start()
    if not done.wait(timeout):
        raise _Timeout
    if "exc" in box:
        raise _Raised(box["exc"], box["tb"])
    return box["value"]


class _Raised(Exception):
    def __init__(self, exc: BaseException, tb: str) -> None:
        super().__init__(str(exc))
        self.exc, self.tb = exc, tb


def _child(conn: Any, scorer: Any, prompt: Prompt, candidates: list[Candidate]) -> None:
    try:
        out = scorer.score(prompt, candidates)
        payload: Any = ("ok", [s.to_dict() if isinstance(s, Score) else s for s in out]
                        if isinstance(out, list | tuple) else out)
        try:
            conn.send(payload)
        except Exception as e:  # an unpicklable return value
            conn.send(("exc", f"{type(e).__name__}: {e}", traceback.format_exc()))
    except BaseException as e:  # noqa: BLE001
        conn.send(("exc", f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        conn.close()


def _run_process(scorer: Any, prompt: Prompt, candidates: list[Candidate], timeout: float | None) -> Any:
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, scorer, prompt, candidates), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise _Timeout
        try:
            msg = recv.recv()
        except EOFError:
            proc.join(1.0)
            raise _Raised(RuntimeError(f"scorer process died (exit code {proc.exitcode})"), "") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join(5.0)
        recv.close()
    if msg[0] == "exc":
        raise _Raised(RuntimeError(msg[1]), msg[2])
    return [Score.from_dict(d) if isinstance(d, dict) else d for d in msg[1]]


def score_group(scorer: Any, prompt: Prompt, candidates: list[Candidate],
                limits: ScorerLimits | None = None) -> list[Score]:
    """Score one group safely: always one Score per candidate, with prompt_id and index set."""
    limits = limits or ScorerLimits()
    name, version = scorer_id(scorer)
    n = len(candidates)
    if n == 0:
        return []
    try:
        if limits.isolation == "process":
            result = _run_process(scorer, prompt, candidates, limits.timeout_s)
        elif limits.timeout_s is None:
            try:
                result = scorer.score(prompt, candidates)
            except Exception as e:
                raise _Raised(e, traceback.format_exc()) from None
        else:
            result = _run_thread(lambda: scorer.score(prompt, candidates), limits.timeout_s, name)
        scores = _validate(result, name, version, n)
    except _Timeout:
        how = "killed" if limits.isolation == "process" else "abandoned"
        scores = _group_errors(f"scorer {name!r} timed out after {limits.timeout_s:g} s on prompt "
                               f"{prompt.id!r} (call {how})", name, version, n)
    except _Raised as e:
        scores = _group_errors(f"scorer {name!r} raised {type(e.exc).__name__}: {e.exc} on prompt {prompt.id!r}",
                               name, version, n, traceback=e.tb)
    for s in scores:
        s.prompt_id = prompt.id
    return scores


# ---------------------------------------------------------------------------------------------
# Many groups, one scorer


class _Budget:
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


def _score_all(scorer: Any, prompts: Sequence[Prompt], groups: Sequence[Sequence[Candidate]],
               cache: ScoreCache | None, limits: ScorerLimits) -> list[list[Score]]:
    name, version = scorer_id(scorer)
    pointwise = bool(getattr(scorer, "pointwise", False))
    options = scorer_options(scorer)
    budget = _Budget(limits)
    results: list[list[Score | None]] = []
    jobs: list[tuple[int, list[int], list[str]]] = []  # (group, candidate positions to score, keys)
    for gi, (prompt, group) in enumerate(zip(prompts, groups, strict=True)):
        keys = ScoreCache.keys(name, version, prompt, group, pointwise, options) if cache is not None else []
        got = cache.get(keys) if cache is not None and group else [None] * len(group)
        results.append(got)
        missing = [i for i, s in enumerate(got) if s is None]
        if missing and not pointwise:
            missing = list(range(len(group)))
        if missing:
            jobs.append((gi, missing, keys))

    def run(job: tuple[int, list[int], list[str]]) -> None:
        gi, positions, keys = job
        subgroup = [groups[gi][i] for i in positions]
        exhausted = budget.take()
        if exhausted:
            scores = _group_errors(f"scorer {name!r}: {exhausted}; group not scored", name, version, len(subgroup))
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


# ---------------------------------------------------------------------------------------------
# Ensemble

Normalization = Literal["zscore", "minmax", "none"]


def normalize(values: Sequence[float | None], how: Normalization) -> list[float | None]:
    """Normalize one scorer's ok values within a group; ``None`` (not ok) stays ``None``.

    ``zscore``: (v - mean) / std, 0 for a constant group; ``minmax``: (v - min) / (max - min),
    0.5 for a constant group; ``none``: unchanged.
    """
    ok = [v for v in values if v is not None]
    if how == "none" or not ok:
        return list(values)
    if how == "zscore":
        mean = sum(ok) / len(ok)
        std = math.sqrt(sum((v - mean) ** 2 for v in ok) / len(ok))
        return [None if v is None else ((v - mean) / std if std > 1e-12 else 0.0) for v in values]
    if how == "minmax":
        lo, hi = min(ok), max(ok)
        return [None if v is None else ((v - lo) / (hi - lo) if hi - lo > 1e-12 else 0.5) for v in values]
    raise TaoInputError(f"unknown normalization {how!r}; use 'zscore', 'minmax' or 'none'")


class Ensemble:
    """A weighted combination of scorers, each normalized within the group first.

    A candidate's value is the weighted mean of its normalized ``ok`` part values, re-weighted
    over the parts that are ok for it (a part that abstained or failed is left out, never counted
    as 0). It is ``ok`` where at least one part with weight > 0 is ok; otherwise ``abstain`` when every part
    abstained, ``error`` when any failed. ``details["parts"]`` keeps each part's status, raw value,
    normalized value, weight and reason.
    """

    name = "ensemble"

    def __init__(self, parts: Sequence[tuple[Any, float]], normalization: Normalization = "zscore",
                 limits: ScorerLimits | None = None) -> None:
        if not parts:
            raise TaoInputError("ensemble: give at least one (scorer, weight) part")
        names = [scorer_id(s)[0] for s, _ in parts]
        if len(set(names)) != len(names):
            raise TaoInputError(f"ensemble: scorer names must be distinct, got {names}")
        for n, (_, w) in zip(names, parts, strict=True):
            if not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
                raise TaoInputError(f"ensemble: weight of scorer {n!r} must be a finite number >= 0, got {w!r}")
        if normalization not in ("zscore", "minmax", "none"):
            raise TaoInputError(f"ensemble: unknown normalization {normalization!r}; use 'zscore', 'minmax' or 'none'")
        if not any(w > 0 for _, w in parts):
            raise TaoInputError("ensemble: at least one weight must be > 0")
        self.parts = [(s, float(w)) for s, w in parts]
        self.normalization = normalization
        self.limits = limits
        self.version = ";".join(f"{n}@{scorer_id(s)[1]}*{w:g}" for n, (s, w) in zip(names, self.parts, strict=True))
        self.version += f";{normalization}"

    @classmethod
    def from_names(cls, scorers: Mapping[str, float] | str, normalization: Normalization = "zscore",
                   options: Mapping[str, Mapping[str, Any]] | None = None) -> Ensemble:
        """Build from registered names: ``{"sql-exec": 1.0, "rules": 0.5}`` or ``"sql-exec:1,rules:0.5"``."""
        if isinstance(scorers, str):
            spec: dict[str, float] = {}
            for item in filter(None, (p.strip() for p in scorers.split(","))):
                name, _, weight = item.partition(":")
                try:
                    spec[name.strip()] = float(weight) if weight else 1.0
                except ValueError:
                    raise TaoInputError(f"ensemble: bad weight in {item!r}; write name:weight, e.g. rules:0.5") from None
            scorers = spec
        options = options or {}
        return cls([(load_scorer(n, **dict(options.get(n, {}))), w) for n, w in scorers.items()], normalization)

    def combine(self, part_scores: Sequence[Sequence[Score]]) -> list[Score]:
        """Combine each part's scores for one group (outer: parts, inner: candidates)."""
        n = len(part_scores[0]) if part_scores else 0
        normed = [normalize([s.value if s.is_ok else None for s in scores], self.normalization)
                  for scores in part_scores]
        out = []
        for i in range(n):
            parts: dict[str, Any] = {}
            total = weight = 0.0
            statuses = []
            for (scorer, w), scores, norm in zip(self.parts, part_scores, normed, strict=True):
                s = scores[i]
                statuses.append(s.status)
                parts[scorer_id(scorer)[0]] = {"status": s.status, "value": s.value, "normalized": norm[i],
                                               "weight": w, "reason": s.reason}
                if norm[i] is not None and w > 0:
                    total += w * norm[i]
                    weight += w
            reason = "; ".join(f"{k}: {p['status']}" + (f" {p['value']:g}" if p["value"] is not None else "")
                               + (f" ({p['reason']})" if p["reason"] else "") for k, p in parts.items())
            details = {"parts": parts, "normalization": self.normalization}
            kw = {"scorer": self.name, "version": self.version, "index": i, "details": details}
            if weight > 0:
                out.append(Score.ok(total / weight, reason, **kw))
            elif "error" in statuses:
                out.append(Score.error(reason or "every part failed", **kw))
            else:
                out.append(Score.abstain(reason or "every part abstained", **kw))
        return out

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        """Score one group, each part through :func:`score_group` (no cache)."""
        return self.combine([score_group(s, prompt, candidates, self.limits) for s, _ in self.parts])
