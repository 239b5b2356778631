"""Built-in advantage estimators: a prompt's group of scores -> one advantage per candidate.

The contract (see :mod:`tao_core.objectives`): ``fn(rewards[G, n], mask[G, n]) -> adv[G, n]``,
``mask`` True for candidates with an ``ok`` score. Masked candidates are left out of every statistic
and get advantage 0; a group with fewer than two ``ok`` candidates gets 0 everywhere (the trainer
counts it as skipped).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import tao_core

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


@tao_core.hookimpl
def tao_register_advantages(register) -> None:
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        register(name, fn)
