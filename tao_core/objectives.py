"""Objectives and advantage estimators: the two parts of a training objective that plugins replace separately.

An **advantage estimator** maps the scores of each prompt's group to one advantage per candidate:
``fn(rewards[G, n], mask[G, n]) -> adv[G, n]``, where ``mask`` is True for candidates with an ``ok``
score. Masked candidates (abstained, errored, padding of short groups) are left out of every
statistic and get advantage 0; a group with fewer than two ``ok`` candidates carries no comparison,
so every estimator gives it advantage 0 and the trainer counts it as skipped.

An :class:`Objective` names a loss over a packed :class:`~tao_core.batching.TrainBatch`, the final
hidden states of the completion tokens and the head weight, plus its default advantage estimator,
whether it needs a reference model, which candidates it trains on, and its defaults for the loss
settings. The objectives themselves (``grpo``, ``dapo``, ``online_dpo``, ...) live in
``tao_plugins.objectives`` and the estimators in ``tao_plugins.advantages``; the machinery they share (chunked log-probs, ratios, clipping, KL,
aggregation) lives once in ``tao_kernels``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tao_core.batching import TrainBatch


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
    """A micro-batch's loss (a mean over ``units`` of the objective) and detached float metrics.

    ``metric_units`` says how many items the metrics are means over, when not the loss's units: the
    policy losses' entropy, KL and clip fraction are token means while grpo's loss is a mean over
    sequences. Weighing each micro-batch's metrics by it keeps them the whole batch's however the
    batch is packed into micro-batches or shared among ranks."""

    loss: torch.Tensor  # scalar with gradient
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. kl, entropy, clip_fraction
    metric_units: float | None = None  # what ``metrics`` are means over (tokens, for per-token metrics); None: ``units``


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
    advantage: str  # its default advantage estimator (a registered name; train.advantage overrides it)
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
