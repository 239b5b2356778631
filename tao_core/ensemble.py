"""Ensembles: weighted scorers, each normalized within the group first, combined into one score.

An ensemble is ``ok`` where at least one weighted part is, and keeps every part in its details.
:func:`tao_core.scoring.score_groups` runs each part under its own limits and cache key; the
``ensemble`` scorer plugin builds one from registered names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from tao_core.errors import TaoInputError
from tao_core.score_guard import score_group
from tao_core.scorer import ScorerLimits, load_scorer, scorer_id
from tao_core.types import Candidate, Prompt, Score

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
