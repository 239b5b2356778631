"""The PNG figures of ``tao report``: each function draws one figure from a run's metric lines.

The data come from :mod:`tao_core.report` (``RunData``, compute points); nothing here reads files.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]


def save_figure(path: Path, draw: Callable[..., None], panels: int = 1) -> None:
    """Draw ``panels`` side-by-side axes with ``draw(ax)`` (or ``draw(axes)``) and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6.4 * panels if panels > 1 else 6.4, 3.6), dpi=100, squeeze=False)
    axes = list(axes[0])
    draw(axes[0] if panels == 1 else axes)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def series(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that have ``key``."""
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def stage_seconds(row: dict[str, Any]) -> tuple[float, float, float]:
    """A step's (generate, score, train) seconds; an SFT step only trains."""
    return row.get("generate_s", 0.0), row.get("score_s", 0.0), row.get("train_s", 0.0)


def reward_kl(ax, steps: Rows) -> None:
    ax.plot(*series(steps, "reward_mean"), label="reward (mean of ok scores)")
    xs, ys = series(steps, "kl")
    if xs:
        ax.plot(xs, ys, label="KL to reference")
    ax.set_xlabel("step")
    ax.legend()


def stage_times(ax, steps: Rows) -> None:
    x = [r["step"] for r in steps]
    g, s, t = zip(*(stage_seconds(r) for r in steps), strict=True)
    ax.bar(x, g, label="generate")
    ax.bar(x, s, bottom=g, label="score")
    ax.bar(x, t, bottom=[a + b for a, b in zip(g, s, strict=True)], label="train")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend()


def throughput(ax, steps: Rows) -> None:
    xs, ys = series(steps, "generate_tokens_per_s")
    if xs:
        ax.plot(xs, ys, label="generation tokens/s")
    ax.plot(*series(steps, "tokens_per_s"), label="training tokens/s")
    ax.set_xlabel("step")
    ax.legend()


def _errorbar(ax, xs: Sequence[float], pts: Rows, **kw: Any) -> None:
    ax.errorbar(xs, [p["value"] for p in pts],
                yerr=[[p["value"] - p["ci_low"] for p in pts], [p["ci_high"] - p["value"] for p in pts]],
                marker="o", capsize=3, **kw)


def heldout(ax, evals: Rows, metric: str) -> None:
    _errorbar(ax, [e["step"] for e in evals], evals)
    ax.set_xlabel("step")
    ax.set_ylabel(f"held-out {metric}")


def gain_per_hour(ax, points: Rows, metric: str) -> None:
    base = points[0]["value"]
    ax.plot([p["tuning_s"] / 3600 for p in points], [p["value"] - base for p in points], marker="o")
    ax.set_xlabel("tuning compute (hours: generate + score + train)")
    ax.set_ylabel(f"gain in held-out {metric}")


def quality_vs_compute(axes, points: Rows, metric: str, unit: str, boundaries: Sequence[tuple[str, float]]) -> None:
    """Left: held-out metric against ``unit`` (candidates generated, or labeled examples seen) with
    a dotted line at each round's end; right: against tuning minutes."""
    left, right = axes
    _errorbar(left, [p["compute"] for p in points], points)
    for label, x in boundaries:
        left.axvline(x, color="grey", linestyle=":", linewidth=1)
        left.annotate(label, (x, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=8,
                      ha="right", va="bottom", color="grey")
    left.set_xlabel(unit)
    left.set_ylabel(f"held-out {metric}")
    _errorbar(right, [p["tuning_s"] / 60 for p in points], points)
    right.set_xlabel("tuning minutes (evaluation excluded)")
    right.set_ylabel(f"held-out {metric}")


def methods_compared(axes, rows: Rows, curves: Sequence[tuple[str, Rows]], metric: str) -> None:
    """Left: held-out before (grey) and after (colour) with 95% intervals per method; right: each
    run's held-out metric against its tuning minutes."""
    left, right = axes
    xs = list(range(len(rows)))
    _errorbar(left, [x - 0.08 for x in xs], [r["before"] for r in rows], color="grey", linestyle="none",
              label="before")
    _errorbar(left, [x + 0.08 for x in xs], [r["after"] for r in rows], color="tab:blue", linestyle="none",
              label="after")
    left.set_xticks(xs, [r["short"] for r in rows], fontsize=8)
    left.set_xlim(-0.5, len(rows) - 0.5)
    left.set_ylabel(f"held-out {metric}")
    left.legend()
    for label, points in curves:
        _errorbar(right, [p["tuning_s"] / 60 for p in points], points, label=label)
    right.set_xlabel("tuning minutes (evaluation excluded)")
    right.set_ylabel(f"held-out {metric}")
    right.legend(fontsize=8)
