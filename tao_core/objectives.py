"""Objectives and advantage estimators: the two parts of an RL recipe that plugins replace separately.

An **advantage estimator** maps the scores of each prompt's group to one advantage per candidate:
``fn(rewards[G, n], mask[G, n]) -> adv[G, n]``, where ``mask`` is True for candidates with an ``ok``
score. Masked candidates (abstained, errored, padding of short groups) are left out of every
statistic and get advantage 0; a group with fewer than two ``ok`` candidates carries no comparison,
so every estimator gives it advantage 0 and the trainer counts it as skipped.

An :class:`Objective` names a loss over a packed :class:`~tao_core.batching.TrainBatch`, the final
hidden states of the completion tokens and the head weight, plus its default advantage estimator,
whether it needs a reference model, which candidates it trains on, and its defaults for the loss
settings. The recipes themselves (``grpo``, ``dapo``, ``online_dpo``, ...) live in
``tao_plugins.objectives``; the machinery they share (chunked log-probs, ratios, clipping, KL,
aggregation) lives once in ``tao_kernels``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tao_core.batching import TrainBatch

STD_EPS = 1e-4  # added to the group std in group_norm (as TRL's GRPO): equal rewards give 0, not NaN


def _masked_stats(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group: ok count [G, 1], mean [G, 1] over ok entries, and the validity mask (>= 2 ok) [G, 1]."""
    m = mask.to(rewards.dtype)
    count = m.sum(1, keepdim=True)
    mean = (rewards * m).sum(1, keepdim=True) / count.clamp(min=1)
    return count, mean, count >= 2


def group_norm(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO advantage: ``(r_i - mean(r)) / (std(r) + 1e-4)`` within the group, over ok scores.

    Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300 (section 4.1.2). ``std`` is the
    unbiased (n - 1) sample standard deviation, as in TRL's ``GRPOTrainer``.
    """
    count, mean, valid = _masked_stats(rewards, mask)
    m = mask.to(rewards.dtype)
    var = (((rewards - mean) * m) ** 2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
    adv = (rewards - mean) / (var.sqrt() + STD_EPS)
    return torch.where(mask & valid, adv, torch.zeros_like(adv))


def group_mean(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Dr. GRPO advantage: ``r_i - mean(r)`` within the group, without the std division.

    Liu et al. 2025, Understanding R1-Zero-Like Training, https://arxiv.org/abs/2503.20783.
    """
    _, mean, valid = _masked_stats(rewards, mask)
    adv = rewards - mean
    return torch.where(mask & valid, adv, torch.zeros_like(adv))


def leave_one_out(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RLOO advantage: ``r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean(r))`` over the k ok scores.

    Ahmadian et al. 2024, Back to Basics, https://arxiv.org/abs/2402.14740 (after Kool et al. 2019).
    """
    count, mean, valid = _masked_stats(rewards, mask)
    adv = count / (count - 1).clamp(min=1) * (rewards - mean)
    return torch.where(mask & valid, adv, torch.zeros_like(adv))


def baseline(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE with a global baseline: ``r_i - b``, ``b`` the mean of all ok scores in the batch.

    Williams 1992, https://doi.org/10.1007/BF00992696. The baseline spans every group of the step
    rather than one group (groups with fewer than two ok scores are still skipped, as everywhere).
    """
    _, _, valid = _masked_stats(rewards, mask)
    keep = mask & valid
    b = rewards[keep].mean() if keep.any() else rewards.new_zeros(())
    return torch.where(keep, rewards - b, torch.zeros_like(rewards))


ADVANTAGE_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "group_norm": group_norm,
    "group_mean": group_mean,
    "leave_one_out": leave_one_out,
    "baseline": baseline,
}


@dataclass(frozen=True)
class LossConfig:
    """The loss settings of one step, after the objective's defaults filled what the user left unset."""

    kl_coef: float  # weight of the KL(policy || reference) term; 0 disables the reference
    kl_estimator: str  # "k1" | "k2" | "k3" (sampled, Schulman) | "exact" (full vocabulary)
    clip_low: float  # ratio clipped below at 1 - clip_low
    clip_high: float  # ratio clipped above at 1 + clip_high
    ratio_level: str  # "token" | "sequence" importance ratios
    loss_agg: str  # "token_mean" | "seq_mean" | "fixed_length"
    max_len: int | None  # fixed_length normalizer (tokens per sequence)
    beta: float  # DPO inverse temperature


@dataclass
class LossOutput:
    """A micro-batch's loss (a mean over ``units`` of the objective) and detached float metrics."""

    loss: torch.Tensor  # scalar with gradient
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. kl, entropy, clip_fraction


# (rewards[G, n], mask[G, n], advantages[G, n]) -> per group, the (candidate index, weight) to train on
Selector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[list[tuple[int, float]]]]


def select_all(rewards: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Policy-gradient selection: every ok candidate of a group with >= 2 ok scores, weight = advantage."""
    out = []
    for g in range(rewards.shape[0]):
        ok = mask[g].nonzero().flatten().tolist()
        out.append([(i, float(adv[g, i])) for i in ok] if len(ok) >= 2 else [])
    return out


def select_informative(rewards: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Like :func:`select_all`, but drops groups whose advantages are all zero (DAPO's dynamic sampling)."""
    return [sel if any(a != 0 for _, a in sel) else [] for sel in select_all(rewards, mask, adv)]


@dataclass(frozen=True)
class Objective:
    """A training objective: its loss function plus what the trainer needs to know to feed it.

    ``loss(batch, hidden, weight, cfg)`` gets a packed micro-batch, the policy's final hidden states
    at the positions predicting ``batch.targets`` (``[N, H]``), the head weight (``[V, H]``) and the
    resolved :class:`LossConfig`, and returns a :class:`LossOutput` whose loss is a mean over the
    micro-batch's ``units`` (tokens, sequences or pairs); the trainer weighs micro-batches by those
    units so that gradient accumulation equals one big batch.
    """

    name: str  # registered name
    loss: Callable[[TrainBatch, torch.Tensor, torch.Tensor, LossConfig], LossOutput]
    advantage: str = "group_norm"  # default advantage estimator (registered name)
    needs_reference: bool = False  # True: needs the reference model even when kl_coef == 0
    select: Selector = select_all  # which candidates of each group are trained on, with which weight
    unit: int = 1  # completions that must stay in one segment together (2: a DPO pair)
    units: Callable[[TrainBatch, LossConfig], float] | None = None  # None: from cfg.loss_agg
    defaults: dict[str, Any] = field(default_factory=dict)  # LossConfig defaults, e.g. {"clip_high": 0.28}
    logprob_temperature: float | None = None  # temperature of its log-probs; None: the sampling one

    def batch_units(self, batch: TrainBatch, cfg: LossConfig) -> float:
        """How much this micro-batch weighs in the step's mean loss."""
        if self.units is not None:
            return float(self.units(batch, cfg))
        return float(batch.n_tokens if cfg.loss_agg == "token_mean" else batch.n_seqs)
