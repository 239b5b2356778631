"""The training inputs of a step: scored candidate groups -> rewards, advantages and the segments
the trainer packs into micro-batches (:mod:`tao_core.batching`).

:class:`SegmentBuilder` is the part of :class:`tao_core.train.Trainer` that turns a step's groups and
scores into :class:`~tao_core.batching.Segment` objects and the reward and advantage metrics; the
trainer owns the model, the optimizer and the update.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tao_core.batching import Segment
from tao_core.errors import PluginError, TaoInputError
from tao_core.offpolicy import drop_truncated, overlong_penalties, trained_prompt
from tao_core.types import Candidate, Score


class SegmentBuilder:
    """Rewards, advantages and segments of a step; mixed into :class:`~tao_core.train.Trainer`,
    whose ``cfg``, ``objective``, ``advantage_name`` and ``advantage_fn`` it reads."""

    def _rewards(self, groups: Sequence[Sequence[Candidate]], scores: Sequence[Sequence[Score]],
                 max_new_tokens: int | None) -> tuple[torch.Tensor, torch.Tensor, dict, dict[str, float]]:
        """[G, n] rewards (the scores, plus the overlong penalty when set), the mask of candidates
        that count (ok score, tokens, a prompt to train under), each one's trained prompt, and metrics.

        ``reward_mean`` / ``reward_std`` are the scorers' values, before any penalty."""
        n_groups, width = len(groups), max((len(g) for g in groups), default=0)
        rewards = torch.zeros(n_groups, width)
        mask = torch.zeros(n_groups, width, dtype=torch.bool)
        prompts: dict[tuple[int, int], list[int]] = {}
        off_policy = empty = 0
        for g, (cands, scs) in enumerate(zip(groups, scores, strict=True)):
            if len(cands) != len(scs):
                raise TaoInputError(f"group {g}: {len(cands)} candidates but {len(scs)} scores")
            for i, (c, s) in enumerate(zip(cands, scs, strict=True)):
                if not s.is_ok:
                    continue
                prompt = trained_prompt(c, self.cfg.off_policy)
                if prompt is None:
                    off_policy += 1  # sampled under another prompt or weights, and not trained here
                elif not c.token_ids:
                    empty += 1  # no token to learn from
                else:
                    rewards[g, i] = s.value
                    mask[g, i] = True
                    prompts[g, i] = prompt
        ok = rewards[mask]
        metrics = {
            "reward_mean": float(ok.mean()) if ok.numel() else float("nan"),
            "reward_std": float(ok.std()) if ok.numel() > 1 else 0.0,
            "scored": float(ok.numel()),
            "off_policy_dropped": float(off_policy),
            "empty_dropped": float(empty),
        }
        if self.cfg.overlong_buffer > 0:
            penalties, counts = overlong_penalties(groups, mask, max_new_tokens, self.cfg.overlong_buffer,
                                                   self.cfg.overlong_penalty)
            rewards = rewards + penalties
            metrics.update(counts)
        return rewards, mask, prompts, metrics

    def _segments(self, groups: Sequence[Sequence[Candidate]], scores: Sequence[Sequence[Score]],
                  max_new_tokens: int | None = None,
                  policy_temperature: float | None = None) -> tuple[list[Segment], dict[str, float]]:
        rewards, mask, prompts, stats = self._rewards(groups, scores, max_new_tokens)
        adv = self.advantage_fn(rewards, mask)
        if not isinstance(adv, torch.Tensor) or adv.shape != rewards.shape or not torch.isfinite(adv).all():
            raise PluginError(
                f"advantage estimator {self.advantage_name!r} must return a finite tensor of shape "
                f"{tuple(rewards.shape)}, got {getattr(adv, 'shape', type(adv).__name__)}"
            )
        unit = self.objective.unit
        selection = self.objective.select(rewards, mask, adv)
        if self.cfg.mask_truncated:
            selection, masked = drop_truncated(groups, selection, unit)
            stats["truncated_masked"] = float(masked)
        segments, seq_adv, skipped, off_trained = [], [], int((mask.sum(1) < 2).sum()), 0
        for g, picks in enumerate(selection):
            by_prompt: dict[tuple, list[tuple[int, float]]] = {}
            for i, a in picks:
                c = groups[g][i]
                # an off-policy candidate trains the policy as it samples its own prompt: at the policy's
                # temperature, not the one it was drawn at (its log-probs stay the behaviour policy's)
                moved = policy_temperature is not None and c.metadata.get("off_policy") and self.cfg.off_policy == "importance"
                temperature = policy_temperature if moved else c.temperature
                by_prompt.setdefault((tuple(prompts[g, i]), temperature), []).append((i, a))
            if unit > 1 and len(by_prompt) > 1:
                skipped += 1  # a pair must share its prompt
                continue
            for (prompt_ids, temperature), items in by_prompt.items():
                cands = [groups[g][i] for i, _ in items]
                off = [bool(c.metadata.get("off_policy")) for c in cands]
                segments.append(Segment(list(prompt_ids), [list(c.token_ids) for c in cands],
                                        [list(c.logprobs) for c in cands], [a for _, a in items],
                                        [float(rewards[g, i]) for i, _ in items], float(temperature),
                                        off if any(off) else None, group=g))
                seq_adv.extend(a for _, a in items)
                off_trained += sum(off)
        sa = torch.tensor(seq_adv) if seq_adv else torch.zeros(1)
        stats.update({
            "adv_mean": float(sa.mean()),
            "adv_std": float(sa.std()) if sa.numel() > 1 else 0.0,
            "adv_abs_mean": float(sa.abs().mean()),
            "skipped_groups": float(skipped),
            "sequences": float(len(seq_adv)),
        })
        if self.cfg.off_policy == "importance":
            stats["off_policy_trained"] = float(off_trained)
        return segments, stats
