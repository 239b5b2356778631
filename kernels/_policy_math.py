"""Per-token policy-loss algebra on ``[N]`` vectors, shared by the fused paths and the references.

Packed sequences: ``cu_seqlens`` (int, ``[S+1]``, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == N``) holds
the offsets of ``S`` sequences laid end to end. Everything here is O(N); the vocabulary never appears.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_LEVELS = ("token", "sequence")
LOSS_AGGS = ("token_mean", "seq_mean", "fixed_length")


def check_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int) -> None:
    """Raise a ValueError naming the problem when ``cu_seqlens`` does not describe ``n_tokens``.

    Under ``torch.compile`` only the shape and dtype are checked.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int tensor [S+1] with S >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must hold integers, got {cu_seqlens.dtype}")
    if torch.compiler.is_compiling():
        return  # the value checks below read the tensor: eager mode only (no graph break)
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    if first != 0 or last != n_tokens:
        raise ValueError(f"cu_seqlens must run from 0 to N={n_tokens}, got {first}..{last}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing (sequence lengths >= 0)")


def segment_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Sequence index of every token, ``[N]`` int64."""
    positions = torch.arange(n_tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)


def sequence_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``sum_{t in s} values_t`` for every sequence ``s``: ``[S]``."""
    seg = segment_ids(cu_seqlens, values.shape[0])
    out = torch.zeros(cu_seqlens.numel() - 1, dtype=values.dtype, device=values.device)
    return out.index_add(0, seg, values)


def aggregation_weights(
    valid: torch.Tensor, cu_seqlens: torch.Tensor, loss_agg: str, max_len: int | None = None
) -> torch.Tensor:
    """Weights ``w_t`` with ``loss = sum_t w_t * loss_t`` (float32 ``[N]``, 0 at ignored tokens).

    - ``token_mean``:   ``w_t = 1 / (number of valid tokens in the batch)``
    - ``seq_mean``:     ``w_t = 1 / (S' * L_s)``, ``L_s`` valid tokens of t's sequence, ``S'`` sequences
      with at least one valid token (mean over sequences of the per-sequence token mean)
    - ``fixed_length``: ``w_t = 1 / (S * max_len)`` (Dr. GRPO's constant normaliser, arXiv:2503.20783)
    """
    mask = valid.to(torch.float32)
    if loss_agg == "token_mean":
        return mask / mask.sum().clamp(min=1.0)
    if loss_agg == "seq_mean":
        lengths = sequence_sums(mask, cu_seqlens)
        n_seqs = (lengths > 0).sum().clamp(min=1).to(torch.float32)
        per_token_len = lengths[segment_ids(cu_seqlens, mask.shape[0])]
        return mask / (per_token_len.clamp(min=1.0) * n_seqs)
    if loss_agg == "fixed_length":
        if max_len is None or max_len <= 0:
            raise ValueError("loss_agg='fixed_length' needs max_len > 0 (Dr. GRPO's constant normaliser)")
        return mask / float((cu_seqlens.numel() - 1) * max_len)
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def importance_ratio(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    valid: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ratio_level: str,
) -> torch.Tensor:
    """Importance ratio per token (1 at ignored tokens), differentiable w.r.t. ``logprobs``.

    - ``token``:    ``r_t = exp(logp_t - old_t)``
    - ``sequence``: GSPO's token form (arXiv:2507.18071), ``r_t = sg[s] * exp(logp_t - sg[logp_t])`` with
      ``s = exp(mean_{t in seq, valid}(logp_t - old_t))``: every token of a sequence carries the
      sequence ratio, and ``d r_t / d logp_t = s``.
    """
    log_ratio = torch.where(valid, logprobs - old_logprobs, torch.zeros_like(logprobs))
    if ratio_level == "token":
        return torch.exp(log_ratio)
    if ratio_level == "sequence":
        mask = valid.to(log_ratio.dtype)
        seq_lr = sequence_sums(log_ratio.detach(), cu_seqlens) / sequence_sums(mask, cu_seqlens).clamp(min=1.0)
        seq_lr_tok = seq_lr[segment_ids(cu_seqlens, logprobs.shape[0])]
        live = torch.where(valid, logprobs - logprobs.detach(), torch.zeros_like(logprobs))
        return torch.exp(live + seq_lr_tok)
    raise ValueError(f"ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    cu_seqlens: torch.Tensor,
    clip_low: float,
    clip_high: float,
    ratio_level: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, ``pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))``.

    Returns ``(pg [N], ratio [N], clipped [N] bool)``; ``clipped`` marks tokens where the clipped branch
    is strictly larger (so the token gets no gradient). Ignored tokens give ``pg = 0``.
    """
    ratio = importance_ratio(logprobs, old_logprobs, valid, cu_seqlens, ratio_level)
    unclipped = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped_loss)
    pg = torch.where(valid, pg, torch.zeros_like(pg))
    return pg, ratio, (clipped_loss > unclipped) & valid


def surrogate_grad(ratio: torch.Tensor, advantages: torch.Tensor, clipped: torch.Tensor) -> torch.Tensor:
    """``d pg_t / d logp_t = -A_t r_t`` where the unclipped branch is active, else 0 (both ratio levels)."""
    return torch.where(clipped, torch.zeros_like(ratio), -advantages * ratio)


def sampled_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Schulman's estimators of ``KL(pi || pi_ref)`` from one sample, with ``d = logp_ref - logp``.

    - ``k1 = -d``                      (unbiased, high variance, can be negative)
    - ``k2 = d^2 / 2``                 (biased, low variance)
    - ``k3 = exp(d) - 1 - d``          (unbiased, >= 0)
    """
    d = ref_logprobs - logprobs
    if kind == "k1":
        return -d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {kind!r}")


def sampled_kl_grad(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """``d k / d logp``: k1 -> 1, k2 -> -d, k3 -> 1 - exp(d), with ``d = logp_ref - logp``."""
    d = ref_logprobs - logprobs
    if kind == "k1":
        return torch.ones_like(d)
    if kind == "k2":
        return -d
    if kind == "k3":
        return -torch.expm1(d)
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {kind!r}")
