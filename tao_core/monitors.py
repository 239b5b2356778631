"""Label-free training signals about the voters: the margin gate and the flip-rate monitor.

Both read what a voting scorer reports in every score of a group (``majority-vote``, ``sql-exec``):
``details["margin"]``, the majority's share of the votes in [0, 1], and ``details["majority"]``, the
majority answer (any JSON value). A group without them (another scorer, or no majority) is counted
and otherwise left alone.

- :func:`gate_groups`: train only on prompts whose voter margin lies in a band ``[lo, hi]``. A margin
  near 1/k (no real majority) makes the pseudo-label a coin toss; a margin of 1 with every on-policy
  sample agreeing teaches nothing (zero variance) and, on a prompt the voters all get wrong, only
  entrenches the error. The band keeps the prompts in between, where the majority-vote reward of
  test-time RL (TTRL, https://arxiv.org/abs/2504.16084) is both likely right and informative.
- :class:`FlipMonitor`: the share of revisited prompts whose voter majority changed since their last
  visit. Voters that follow the policy drift with it; a rising flip rate is the sign, seen before
  the held-out score falls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tao_core.errors import TaoInputError
from tao_core.types import Score


def group_detail(group: Sequence[Score], key: str) -> Any:
    """``details[key]`` of the first score of ``group`` that reports one (not None), else None."""
    return next((s.details[key] for s in group if s.details.get(key) is not None), None)


def group_margin(group: Sequence[Score]) -> float | None:
    """The group's voter margin (``details["margin"]``), checked to be a number in [0, 1]; None if absent."""
    m = group_detail(group, "margin")
    if m is None:
        return None
    if not isinstance(m, int | float) or isinstance(m, bool) or not 0.0 <= m <= 1.0:
        who = next((s.scorer for s in group if s.details.get("margin") is not None), "?")
        pid = group[0].prompt_id if group else "?"
        raise TaoInputError(f"scorer {who!r} reported margin {m!r} for prompt {pid!r}; a margin is the "
                            "majority's share of the votes, a number in [0, 1]: fix the scorer")
    return float(m)


def gate_groups(scores: Sequence[Sequence[Score]],
                band: Sequence[float] | None) -> tuple[list[list[Score]], dict[str, Any]]:
    """Turn the ok scores of each group whose voter margin lies outside ``band = [lo, hi]`` (both
    ends included) into abstentions with the reason ``"gated: margin X outside [lo, hi]"``.

    Gating decides per prompt, never per candidate: a kept group keeps every score, its minority
    candidates' included (a 0 for disagreeing with a confident majority is what teaches), and a
    gated group abstains whole. Scores that are not ok are left as they are; a gated score keeps its
    details plus ``gated_value``, the value it had. Groups without a margin are left as they are and
    counted. ``band`` None gates nothing (the statistics are still computed). The input is not
    modified.

    Returns the scores and ``{"gate_groups", "gate_in_band", "gate_outside", "gate_no_margin",
    "gate_scores_gated", "gate_margin_mean"}`` (the mean over groups with a margin; None if none).
    """
    if band is not None:
        if len(band) != 2 or not 0.0 <= band[0] <= band[1] <= 1.0:
            raise TaoInputError(f"score.gate: give two numbers lo <= hi in [0, 1], got {list(band)!r}")
        lo, hi = float(band[0]), float(band[1])
    out: list[list[Score]] = []
    margins: list[float] = []
    outside = no_margin = gated_scores = 0
    for group in scores:
        m = group_margin(group)
        if m is None:
            no_margin += 1
            out.append(list(group))
            continue
        margins.append(m)
        if band is None or lo <= m <= hi:
            out.append(list(group))
            continue
        outside += 1
        reason = f"gated: margin {m:.4g} outside [{lo:g}, {hi:g}]"
        kept = []
        for s in group:
            if s.is_ok:
                gated_scores += 1
                s = Score.abstain(reason, scorer=s.scorer, version=s.version, prompt_id=s.prompt_id,
                                  index=s.index, details={**s.details, "gated_value": s.value})
            kept.append(s)
        out.append(kept)
    stats = {
        "gate_groups": len(out),
        "gate_in_band": len(margins) - outside,
        "gate_outside": outside,
        "gate_no_margin": no_margin,
        "gate_scores_gated": gated_scores,
        "gate_margin_mean": sum(margins) / len(margins) if margins else None,
    }
    return out, stats


def group_majorities(scores: Sequence[Sequence[Score]]) -> list[Any]:
    """Each group's voter majority (``details["majority"]``), None where the group reports none."""
    return [group_detail(group, "majority") for group in scores]


def _canonical(value: Any) -> str:
    """One string per majority, equal for equal JSON values (a tuple and the list it is saved as)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr)


class FlipMonitor:
    """The share of revisited prompts whose voter majority changed since their last visit.

    ``observe`` is called once per step with the step's prompt ids and their groups' majorities
    (:func:`group_majorities`). A prompt seen before with a majority is *revisited*; it *flipped* when
    its majority differs from the one recorded at that visit. ``flip_rate = flipped / revisited``
    (None when nothing was revisited). A group without a majority (None: the voters abstained) is
    neither counted nor recorded: the prompt keeps its last majority. Majorities are compared as
    JSON values, so a resumed run (whose scores were read back from JSON) compares like the
    original. A prompt listed twice in one step is compared with its first listing.
    """

    def __init__(self) -> None:
        self._last: dict[str, str] = {}  # prompt id -> canonical JSON of its last majority

    def observe(self, prompt_ids: Sequence[str], majorities: Sequence[Any]) -> dict[str, Any]:
        if len(prompt_ids) != len(majorities):
            raise TaoInputError(f"FlipMonitor.observe: {len(prompt_ids)} prompt ids but {len(majorities)} majorities; "
                                "give one majority (or None) per prompt")
        revisited = flipped = 0
        for pid, majority in zip(prompt_ids, majorities, strict=True):
            if majority is None:
                continue
            now = _canonical(majority)
            before = self._last.get(pid)
            if before is not None:
                revisited += 1
                flipped += before != now
            self._last[pid] = now
        return {"flip_rate": flipped / revisited if revisited else None, "revisited": revisited}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: ``{"last": {prompt id: canonical JSON of its last majority}}``."""
        return {"last": dict(self._last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last = state.get("last") if isinstance(state, dict) else None
        if not isinstance(last, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in last.items()):
            raise TaoInputError("FlipMonitor: the saved state must be {'last': {prompt id: string}} as written by "
                                "state_dict(); was the checkpoint written by another version?")
        self._last = dict(last)
