"""The promotion gate: a candidate model replaces the current one only if no task regresses.

Every run (and the flywheel) asks the same question after a round: is the new model worse than the
one it would replace on any task? Each task is judged on the *same* held-out items scored under
both models, by a one-sided paired sign-flip test of the per-item differences ``new - old``:

- ``T = sum_i (new_i - old_i)``; under "no difference" each nonzero difference is equally likely to
  have either sign, so ``p = P(T* <= T)`` over the 2^m sign flips of the m nonzero differences.
- For 0/1 metrics (accuracy) this is the exact one-sided McNemar test: ``p = P(Bin(m, 1/2) >=
  losses)``, with ``losses`` the items right before and wrong after. For other values it is exact
  for m <= 16 and a seeded Monte Carlo estimate (100,000 flips, reproducible) above.

A task *regresses* when its mean drops by more than ``tolerance`` and that drop is significant
(``p < alpha``). Pairing removes the item-to-item variance that makes two independent confidence
intervals overlap even when one model is worse on nearly every item; the test needs no
distributional assumption and no normal approximation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tao_core.errors import TaoInputError

EXACT_MAX = 16  # nonzero differences up to which every sign flip is enumerated (2^16 rows)
MONTE_CARLO_DRAWS = 100_000
MONTE_CARLO_SEED = 0


@dataclass(frozen=True)
class PairedTest:
    n: int  # paired items
    old_mean: float
    new_mean: float
    wins: int  # items better under the new model
    losses: int  # items worse under the new model
    p_worse: float  # one-sided p-value of "new is worse"
    method: str  # "exact-mcnemar", "exact-sign-flip", "monte-carlo-sign-flip" or "no-difference"

    @property
    def diff(self) -> float:
        return self.new_mean - self.old_mean


def paired_test(old: Sequence[float], new: Sequence[float]) -> PairedTest:
    """One-sided paired sign-flip test that ``new`` is worse than ``old`` (same items, same order)."""
    if len(old) != len(new):
        raise TaoInputError(f"paired test: {len(old)} old values but {len(new)} new ones; pair the same items")
    if len(old) == 0:
        raise TaoInputError("paired test: no items to compare")
    a, b = np.asarray(old, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise TaoInputError("paired test: the per-item values must be finite numbers")
    d = b - a
    nz = d[d != 0]
    wins, losses = int((nz > 0).sum()), int((nz < 0).sum())
    stats = dict(n=len(d), old_mean=float(a.mean()), new_mean=float(b.mean()), wins=wins, losses=losses)
    m = len(nz)
    if m == 0:
        return PairedTest(**stats, p_worse=1.0, method="no-difference")
    if np.allclose(np.abs(nz), np.abs(nz[0]), rtol=0, atol=1e-12):
        # every difference has the same size: T depends on the count of negative signs alone
        p = sum(math.comb(m, k) for k in range(losses, m + 1)) / 2**m
        return PairedTest(**stats, p_worse=float(p), method="exact-mcnemar")
    observed = float(nz.sum())
    if m <= EXACT_MAX:
        signs = ((np.arange(2**m)[:, None] >> np.arange(m)) & 1) * 2 - 1  # every sign assignment
        totals = signs @ np.abs(nz)
        p = float((totals <= observed + 1e-12).mean())
        return PairedTest(**stats, p_worse=p, method="exact-sign-flip")
    rng, hits, left = np.random.default_rng(MONTE_CARLO_SEED), 0, MONTE_CARLO_DRAWS
    chunk = max(1, (1 << 22) // m)  # sign draws in blocks of ~4M entries: memory stays flat in m
    while left:
        k = min(chunk, left)
        totals = (rng.integers(0, 2, size=(k, m), dtype=np.int8) * 2 - 1) @ np.abs(nz)
        hits, left = hits + int((totals <= observed + 1e-12).sum()), left - k
    p = (1 + hits) / (1 + MONTE_CARLO_DRAWS)
    return PairedTest(**stats, p_worse=float(p), method="monte-carlo-sign-flip")


@dataclass(frozen=True)
class TaskVerdict:
    task: str
    test: PairedTest
    regressed: bool


@dataclass
class Decision:
    promoted: bool
    verdicts: list[TaskVerdict] = field(default_factory=list)
    alpha: float = 0.05
    tolerance: float = 0.0

    @property
    def reason(self) -> str:
        bad = [v for v in self.verdicts if v.regressed]
        if not bad:
            return "no task regressed: " + ", ".join(
                f"{v.task} {v.test.old_mean:.3f} -> {v.test.new_mean:.3f}" for v in self.verdicts)
        return "; ".join(f"{v.task} regressed {v.test.old_mean:.3f} -> {v.test.new_mean:.3f} "
                         f"({v.test.losses} items worse, {v.test.wins} better, paired p = {v.test.p_worse:.3g} "
                         f"< {self.alpha})" for v in bad)

    def to_dict(self) -> dict[str, Any]:
        return {"promoted": self.promoted, "alpha": self.alpha, "tolerance": self.tolerance, "reason": self.reason,
                "tasks": {v.task: {**asdict(v.test), "diff": v.test.diff, "regressed": v.regressed}
                          for v in self.verdicts}}


def _paired_values(task: str, old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]):
    """Per-item values of ``old`` and ``new`` (rows with ``prompt_id`` and ``value``) on the same items."""
    def index(rows: Sequence[Mapping[str, Any]], which: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for i, row in enumerate(rows):
            try:
                key, value = str(row["prompt_id"]), float(row["value"])
            except (KeyError, TypeError, ValueError):
                raise TaoInputError(f"task {task!r}: {which} evaluation row {i} lacks a prompt_id and a numeric "
                                    "value") from None
            if key in out:
                raise TaoInputError(f"task {task!r}: {which} evaluation lists item {key!r} twice")
            out[key] = value
        return out

    a, b = index(old, "old"), index(new, "new")
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())[:5]
        raise TaoInputError(f"task {task!r}: old and new evaluations cover different items (e.g. {only}); the gate "
                            "compares the two models on the same held-out items")
    keys = sorted(a)
    return [a[k] for k in keys], [b[k] for k in keys]


def decide(old: Mapping[str, Sequence[Mapping[str, Any]]], new: Mapping[str, Sequence[Mapping[str, Any]]], *,
           alpha: float = 0.05, tolerance: float = 0.0) -> Decision:
    """Promote ``new`` over ``old`` unless some task regresses.

    ``old`` and ``new`` map each task name to its per-item evaluation rows (``EvalResult.per_example``:
    dicts with ``prompt_id`` and ``value``), both on the same items. A task regresses when its mean
    falls by more than ``tolerance`` and the paired one-sided p-value is below ``alpha``.
    """
    if not 0 < alpha < 1:
        raise TaoInputError(f"promotion gate: alpha must be in (0, 1), got {alpha!r}")
    if not tolerance >= 0:
        raise TaoInputError(f"promotion gate: tolerance must be >= 0, got {tolerance!r}")
    if set(old) != set(new):
        raise TaoInputError(f"promotion gate: old covers tasks {sorted(old)}, new {sorted(new)}; judge the same tasks")
    if not old:
        raise TaoInputError("promotion gate: no task to judge")
    verdicts = []
    for task in sorted(old):
        test = paired_test(*_paired_values(task, old[task], new[task]))
        regressed = test.diff < -tolerance and test.p_worse < alpha
        verdicts.append(TaskVerdict(task, test, regressed))
    return Decision(not any(v.regressed for v in verdicts), verdicts, alpha, tolerance)
