"""The flywheel's promotion gate: the round's model against the served one, on the same held-out prompts.

1. **Prompts**: the inference table's held-out slice, the prompts :func:`tao_core.table_prompts.prepare`
   holds out of every round by the hash of their text (the round config's ``[table]`` filters and
   ``holdout``), over the whole table from the first round's ``since`` on, the newest
   ``gate.max_prompts``. No round ever trained on them.
2. **Answers**: both models answer each prompt once, greedily (``gate.max_new_tokens``), in this
   process, each loaded from its directory for the gate and freed after: one extra copy of the
   weights at a time besides the served one.
3. **Scores**: the gate scorer judges each answer alone (a group of one; the scorer must be
   ``pointwise``). A prompt where either answer is not scored ``ok`` is left out of the pairing.
4. **Decision**: :func:`tao_core.promotion.decide` on the paired per-prompt scores: the round is
   rejected when its mean falls by more than ``gate.tolerance`` with one-sided paired ``p <
   gate.alpha``; fewer than ``gate.min_prompts`` judged prompts is a rejection too (too little
   evidence to swap a served model). With ``gate.task_eval``, the run's own held-out task
   evaluation must also have kept new weights (its ``final`` model is not the one it started from).
"""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any

from tao_core.errors import TaoInputError
from tao_core.flywheel_config import GateConfig
from tao_core.types import Candidate, Prompt

GATE_TASK = "held_out"  # the name of the gate's one "task" in promotion.decide


def load_gate_scorer(g: GateConfig) -> Any:
    """The gate scorer, refused unless it judges each answer on its own (``pointwise = True``)."""
    from tao_core.scorer import load_scorer

    try:
        scorer = load_scorer(g.scorer, **g.options)
    except TaoInputError as e:
        raise TaoInputError(f"gate.options: {e}") from None
    if not getattr(scorer, "pointwise", False):
        raise TaoInputError(
            f"gate.scorer = {g.scorer!r} judges a candidate by its group (it does not set pointwise = True), as "
            "majority votes and consensus scorers do: their labels come from the samples of the model under test, "
            "so they cannot judge it. Use a scorer that judges each answer alone: a verifier, 'rules', or a "
            "frozen judge or reward model")
    return scorer


def held_out_prompts(table: Any, max_prompts: int) -> list[Prompt]:
    """The newest ``max_prompts`` of the table's held-out slice; ``table`` is the round's
    :class:`~tao_core.config.TableConfig` (url, filters, the first round's ``since``, ``holdout``)."""
    from tao_core.table_prompts import from_table

    return from_table(table).held_out[-max_prompts:]


def answers(model_dir: str | Path, prompts: list[Prompt], max_new_tokens: int, *, dtype: str,
            device: str) -> list[Candidate]:
    """One greedy answer per prompt from the model in ``model_dir`` (loaded here, freed after)."""
    from tao_core.models import load_model
    from tao_core.sampler import sampler_for
    from tao_core.types import SamplingParams

    lm = load_model(str(model_dir), dtype=dtype, device=device)
    try:
        groups = sampler_for(lm).sample(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    finally:
        del lm
        gc.collect()
    return [g[0] for g in groups]


def judge(scorer: Any, prompts: list[Prompt], old: list[Candidate], new: list[Candidate],
          g: GateConfig) -> dict[str, Any]:
    """Score both models' answers and decide; the gate's record (``promoted``, ``reason`` and the numbers)."""
    from tao_core.promotion import decide
    from tao_core.scoring import ScorerLimits, score_groups

    limits = ScorerLimits(timeout_s=g.timeout_s)
    old_scores = score_groups(scorer, prompts, [[c] for c in old], limits=limits)
    new_scores = score_groups(scorer, prompts, [[c] for c in new], limits=limits)
    old_rows, new_rows, left_out = [], [], []
    for p, (a,), (b,) in zip(prompts, old_scores, new_scores, strict=True):
        if a.status == "ok" and b.status == "ok":
            old_rows.append({"prompt_id": p.id, "value": a.value})
            new_rows.append({"prompt_id": p.id, "value": b.value})
        else:
            left_out.append(next(s.reason for s in (a, b) if s.status != "ok"))
    record: dict[str, Any] = {"prompts": len(prompts), "judged": len(old_rows), "left_out": len(left_out),
                              "alpha": g.alpha, "tolerance": g.tolerance}
    if left_out:
        record["first_left_out"] = (left_out[0] or "")[:200]
    if len(old_rows) < g.min_prompts:
        return {**record, "promoted": False,
                "reason": f"{len(old_rows)} held-out prompts judged, fewer than gate.min_prompts = {g.min_prompts}: "
                          "too little evidence to swap the served model (log more traffic, or lower gate.min_prompts)"}
    decision = decide({GATE_TASK: old_rows}, {GATE_TASK: new_rows}, alpha=g.alpha, tolerance=g.tolerance)
    test = decision.to_dict()["tasks"][GATE_TASK]
    numbers = {k: test[k] for k in ("old_mean", "new_mean", "diff", "wins", "losses", "p_worse", "method")}
    return {**record, **numbers, "promoted": decision.promoted, "reason": decision.reason}


def task_evaluation(run_dir: Path) -> dict[str, Any] | None:
    """The run's own held-out task evaluation (its ``final`` record in metrics.jsonl), or None when it
    wrote none: ``{"task", "metric", "before", "after", "best_step", "kept_new_weights"}``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a torn last line: the records before it stand
    final = next((r for r in reversed(rows) if r.get("type") == "final"), None)
    first = next((r for r in rows if r.get("type") == "eval"), None)
    if final is None or first is None:
        return None
    return {"task": first.get("task"), "metric": first.get("metric"), "before": final.get("before"),
            "after": final.get("after"), "best_step": final.get("step"), "kept_new_weights": final.get("step", 0) > 0}


def gate_table(run_table: Any, table_url: str, first_since: str | None) -> Any:
    """The round's ``[table]`` settings over the whole table from the first round's ``since`` on."""
    return dataclasses.replace(run_table, url=table_url, since=first_since)
