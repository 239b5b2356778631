"""Naive references that materialize the full ``[N, V]`` logits.

Tests and benchmarks only: these are the straightforward code a user would write, under autograd,
with the inputs in their own dtype. They are the baseline every fused path is measured against
(``naive_logprob`` is the one place the benchmarks' "naive" provider is defined).

Definitions shared by every backend (``z`` are the tempered logits of one token)::

    z       = (h @ W.T + b) / T                   # [V], computed as (h @ W.T).float() / T
    logp_v  = z_v - logsumexp(z)                  # log-softmax
    logp    = logp_{target}                       # log pi(target)
    H       = -sum_v p_v logp_v                   # entropy, p = softmax(z)
    KL      = sum_v p_v (logp_v - logq_v)         # exact KL(pi || pi_ref), q from the ref model

Ignored positions (``targets == ignore_index``) give 0 for every per-token output and no gradient.
"""

from __future__ import annotations

import torch

from ._policy_math import aggregation_weights, clipped_surrogate, sampled_kl


def naive_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``(h @ W.T + b).float() / T``: the ``[N, V]`` tempered logits, in float32 (float64 stays)."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    if logits.dtype != torch.float64:
        logits = logits.float()
    return logits / temperature


def naive_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax((h @ W.T).float() / T)`` gathered at the targets (and the entropy)."""
    logprobs_all = torch.log_softmax(naive_logits(hidden, weight, bias, temperature), dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = logprobs_all.gather(1, safe_targets[:, None]).squeeze(1)
    logprobs = torch.where(valid, logprobs, torch.zeros_like(logprobs))
    if not return_entropy:
        return logprobs
    entropy = -(logprobs_all.exp() * logprobs_all).sum(-1)
    return logprobs, torch.where(valid, entropy, torch.zeros_like(entropy))


def naive_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Exact ``KL(pi || pi_ref) = sum_v p_v (logp_v - logq_v)`` per token, from both models' logits."""
    logp = torch.log_softmax(naive_logits(hidden, weight, bias, temperature), dim=-1)
    logq = torch.log_softmax(naive_logits(ref_hidden, ref_weight, ref_bias, temperature), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    if targets is None:
        return kl
    valid = targets if targets.dtype == torch.bool else targets != ignore_index
    return torch.where(valid, kl, torch.zeros_like(kl))


def naive_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ratio_level: str = "token",
    loss_agg: str = "token_mean",
    max_len: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The clipped policy loss of ``linear_policy_loss`` written plainly on materialized logits.

    Returns the scalar loss only; it is differentiable w.r.t. hidden, weight and bias.
    """
    valid = targets != ignore_index
    logprobs = naive_logprob(
        hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index
    )
    weights = aggregation_weights(valid, cu_seqlens, loss_agg, max_len).to(logprobs.dtype)
    pg, _, _ = clipped_surrogate(
        logprobs, old_logprobs, advantages, valid, cu_seqlens, clip_low, clip_high, ratio_level
    )
    per_token = pg
    if kl_coef != 0.0:
        if kl_estimator == "exact":
            kl = naive_kl(
                hidden, weight, ref_hidden.detach(), ref_weight.detach(), targets, bias=bias,
                temperature=temperature, ignore_index=ignore_index,
            )
        else:
            ref = torch.where(valid, ref_logprobs, torch.zeros_like(ref_logprobs))
            kl = sampled_kl(logprobs, ref, kl_estimator)
        per_token = per_token + kl_coef * kl
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    return (per_token * weights).sum()
