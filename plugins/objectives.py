"""Built-in objectives, seven of them (their advantage estimators: ``tao_plugins.advantages``).

Every policy-gradient objective is the same clipped surrogate computed by
``tao_kernels.linear_policy_loss`` with different defaults; ``online_dpo`` and ``best_of_n_sft`` are
losses of other shapes on sequence log-probs from ``tao_kernels.linear_logprob``. Notation: ``r_t``
is the importance ratio ``pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t)`` (per token, or per sequence
with ``ratio_level = "sequence"``), ``A`` the sequence's advantage, ``eps_l`` / ``eps_h`` the clip
range and ``beta_kl`` the KL weight.
"""

from __future__ import annotations

import tao_kernels
import torch
import torch.nn.functional as F

import tao_core
from tao_core.batching import TrainBatch
from tao_core.objectives import (
    LossConfig,
    LossOutput,
    Objective,
    select_informative,
)


def clipped_policy_loss(batch: TrainBatch, hidden: torch.Tensor, weight: torch.Tensor, cfg: LossConfig) -> LossOutput:
    """PPO's clipped surrogate with an optional KL penalty (the GRPO family).

    Schulman et al. 2017, https://arxiv.org/abs/1707.06347; per-token form of Shao et al. 2024,
    https://arxiv.org/abs/2402.03300:
    ``L = agg_t [ -min(r_t A, clip(r_t, 1 - eps_l, 1 + eps_h) A) + beta_kl KL_t ]``,
    with ``agg`` the mean over tokens, the mean over sequences of per-sequence means, or the sum
    divided by ``sequences x max_len`` (``cfg.loss_agg``).
    """
    out = tao_kernels.linear_policy_loss(
        hidden,
        weight,
        batch.targets,
        batch.advantages,
        batch.old_logprobs,
        cu_seqlens=batch.cu_seqlens,
        ref_logprobs=batch.ref_logprobs,
        ref_hidden=batch.ref_hidden,
        ref_weight=batch.ref_weight,
        kl_coef=cfg.kl_coef,
        kl_estimator=cfg.kl_estimator,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        ratio_level=cfg.ratio_level,
        loss_agg=cfg.loss_agg,
        max_len=cfg.max_len,
        temperature=batch.temperature,
    )
    metrics = {}
    for name in ("kl", "entropy", "clip_fraction"):
        value = getattr(out, name, None)
        if value is not None:
            metrics[name] = float(value.float().mean())
    return LossOutput(out.loss, metrics, metric_units=batch.n_tokens)  # token means, whatever the loss's units


def _sequence_logprobs(batch: TrainBatch, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[S] sum of token log-probs per sequence, at temperature 1 (the policy itself)."""
    lp = tao_kernels.linear_logprob(hidden, weight, batch.targets)
    return torch.zeros(batch.n_seqs, dtype=lp.dtype, device=lp.device).index_add(0, batch.seq_index().to(lp.device), lp)


def dpo_loss(batch: TrainBatch, hidden: torch.Tensor, weight: torch.Tensor, cfg: LossConfig) -> LossOutput:
    """Online DPO on the group's best (chosen, ``w``) and worst (rejected, ``l``) candidate by score.

    Rafailov et al. 2023, https://arxiv.org/abs/2305.18290; online variant: Guo et al. 2024,
    https://arxiv.org/abs/2402.04792.
    ``L = -log sigmoid(beta [(log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l))])``, averaged
    over pairs; sequences come in (chosen, rejected) order.
    """
    policy = _sequence_logprobs(batch, hidden, weight)
    ref = torch.zeros_like(policy).index_add(0, batch.seq_index().to(policy.device), batch.ref_logprobs.to(policy))
    delta = (policy - ref).view(-1, 2)
    margin = cfg.beta * (delta[:, 0] - delta[:, 1])
    loss = -F.logsigmoid(margin).mean()
    return LossOutput(loss, {"dpo_margin": float(margin.detach().mean()), "dpo_accuracy": float((margin > 0).float().mean())})


def sft_loss(batch: TrainBatch, hidden: torch.Tensor, weight: torch.Tensor, cfg: LossConfig) -> LossOutput:
    """Rejection-sampling fine-tuning: the NLL of the group's best candidate(s), mean over tokens.

    Yuan et al. 2023 (RFT), https://arxiv.org/abs/2308.01825; Dong et al. 2023 (RAFT),
    https://arxiv.org/abs/2304.06767. ``L = -(1 / |T|) sum_{t in T} log pi(y_t | x, y_<t)`` over the
    tokens ``T`` of the selected candidates (temperature 1).
    """
    lp = tao_kernels.linear_logprob(hidden, weight, batch.targets)
    return LossOutput(-lp.mean(), {"nll": float(-lp.detach().mean())})


def select_best_worst(rewards: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per group with >= 2 ok scores and a strict best > worst: [(best, +1), (worst, -1)] (first on ties)."""
    out = []
    for g in range(rewards.shape[0]):
        ok = mask[g].nonzero().flatten().tolist()
        if len(ok) < 2:
            out.append([])
            continue
        best = max(ok, key=lambda i: float(rewards[g, i]))
        worst = min(ok, key=lambda i: float(rewards[g, i]))
        out.append([(best, 1.0), (worst, -1.0)] if rewards[g, best] > rewards[g, worst] else [])
    return out


def select_best(rewards: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor) -> list[list[tuple[int, float]]]:
    """Per group with >= 2 ok scores that differ: every candidate whose score equals the group's best."""
    out = []
    for g in range(rewards.shape[0]):
        ok = mask[g].nonzero().flatten().tolist()
        vals = [float(rewards[g, i]) for i in ok]
        if len(ok) < 2 or max(vals) == min(vals):
            out.append([])
            continue
        out.append([(i, 1.0) for i, v in zip(ok, vals, strict=True) if v == max(vals)])
    return out


OBJECTIVES = [
    # GRPO (Shao et al. 2024): group-normalized advantages, per-sequence mean of token losses.
    Objective("grpo", clipped_policy_loss, advantage="group_norm", defaults={"loss_agg": "seq_mean"}),
    # Dr. GRPO (Liu et al. 2025): no std division, no length normalization (fixed-length sum).
    Objective("dr_grpo", clipped_policy_loss, advantage="group_mean", defaults={"loss_agg": "fixed_length"}),
    # DAPO (Yu et al. 2025, https://arxiv.org/abs/2503.14476): clip-higher, token-level mean, groups
    # whose advantages are all zero dropped (dynamic sampling without resampling).
    Objective(
        "dapo",
        clipped_policy_loss,
        advantage="group_norm",
        select=select_informative,
        defaults={"loss_agg": "token_mean", "clip_high": 0.28},
    ),
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline; with one update per batch the clipped
    # surrogate's gradient is REINFORCE's, A * grad log pi, length-normalized per sequence.
    Objective("rloo", clipped_policy_loss, advantage="leave_one_out", defaults={"loss_agg": "seq_mean"}),
    # PPO-clip with a KL penalty to the reference (Schulman et al. 2017; Ouyang et al. 2022,
    # https://arxiv.org/abs/2203.02155), critic-free with a global reward baseline.
    Objective(
        "ppo_clip_kl",
        clipped_policy_loss,
        advantage="baseline",
        defaults={"loss_agg": "token_mean", "kl_coef": 0.05, "kl_estimator": "k3"},
    ),
    Objective(
        "online_dpo",
        dpo_loss,
        advantage="group_mean",
        needs_reference=True,
        select=select_best_worst,
        logprob_temperature=1.0,
        unit=2,
        units=lambda batch, cfg: batch.n_seqs / 2,
    ),
    Objective(
        "best_of_n_sft",
        sft_loss,
        advantage="group_mean",
        select=select_best,
        logprob_temperature=1.0,
        units=lambda batch, cfg: batch.n_tokens,
    ),
]


@tao_core.hookimpl
def tao_register_objectives(register) -> None:
    for objective in OBJECTIVES:
        register(objective.name, objective)
