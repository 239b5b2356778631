"""``linear_policy_loss``: the clipped policy-gradient loss of the GRPO family, from hidden states.

Per token ``t`` (ignored tokens contribute nothing), with ``logp_t`` from ``linear_logprob``::

    r_t    = exp(logp_t - old_t)                              ratio_level="token"   (PPO / GRPO)
    r_t    = sg[s] exp(logp_t - sg[logp_t]),  s = exp(mean_{t in seq}(logp_t - old_t))
                                                              ratio_level="sequence" (GSPO, token form)
    pg_t   = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high))
    kl_t   = k1 | k2 | k3 (logp_t, ref_t)    or the exact sum_v p_v (log p_v - log q_v)   (kl_estimator)
    loss   = sum_t w_t (pg_t + kl_coef kl_t)                  w_t from loss_agg (_policy_math)

The loss is a scalar, so its gradient is known chunk by chunk: ``dloss/dlogp_t = w_t (dpg_t/dlogp_t +
kl_coef dk_t/dlogp_t)`` with ``dpg_t/dlogp_t = -A_t r_t`` on the unclipped branch (0 when clipped),
and the exact KL contributes ``w_t kl_coef p_v (log p_v - log q_v - kl_t)`` to the logits' gradient.
With token-level ratios the forward computes the gradients in the same pass as the loss (3 matmuls, like
Liger's chunked losses) and the backward only scales them by the upstream scalar. Sequence-level ratios
need every token of a sequence first: one statistics pass, then a gradient pass (4 matmuls). The
reference model's inputs never receive a gradient here.

Registered as the custom op ``tao_kernels::linear_policy_loss_fwd`` with a fake implementation.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from ._backend import chunk_rows, resolve_backend, rows_for
from ._chunked import Head, SliceGrads, TokenGrads, backward_grads, forward_stats, fused_pass
from ._policy_math import (
    KL_ESTIMATORS,
    LOSS_AGGS,
    RATIO_LEVELS,
    aggregation_weights,
    check_cu_seqlens,
    clipped_surrogate,
    sampled_kl,
    sampled_kl_grad,
    surrogate_grad,
)
from ._rows import RowStats
from .logprob import check_head, check_targets, safe_targets


@dataclass
class PolicyLossOutput:
    """The loss and its detached metrics (per-token tensors are float32 ``[N]``, 0 at ignored tokens)."""

    loss: torch.Tensor  # scalar; differentiable w.r.t. hidden, weight, bias
    logprobs: torch.Tensor  # log pi(target)
    ratio: torch.Tensor  # importance ratio (the sequence ratio on every token when ratio_level="sequence")
    clipped: torch.Tensor  # bool [N]: the clipped branch was strictly active (no gradient)
    clip_fraction: torch.Tensor  # scalar: clipped tokens / valid tokens
    pg_loss: torch.Tensor  # scalar: sum_t w_t pg_t
    kl: torch.Tensor | None  # per-token KL (sampled or exact); None when no reference was given
    kl_loss: torch.Tensor  # scalar: sum_t w_t kl_t (before kl_coef)
    entropy: torch.Tensor | None  # per-token entropy of the full distribution when compute_entropy


@torch.library.custom_op("tao_kernels::linear_policy_loss_fwd", mutates_args=())
def _policy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (custom_op schema inference)
    targets: torch.Tensor,
    advantages: torch.Tensor,
    old_logprobs: torch.Tensor,
    cu_seqlens: torch.Tensor,
    ref_logprobs: Optional[torch.Tensor],  # noqa: UP045
    ref_hidden: Optional[torch.Tensor],  # noqa: UP045
    ref_weight: Optional[torch.Tensor],  # noqa: UP045
    kl_coef: float,
    kl_estimator: str,
    clip_low: float,
    clip_high: float,
    ratio_level: str,
    loss_agg: str,
    max_len: int,
    temperature: float,
    ignore_index: int,
    compute_entropy: bool,
    chunk_size: int,
    backend: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    """``[loss, pg_loss, kl_loss, logprobs, ratio, clipped, kl, entropy, grad_h, grad_w, grad_b]``."""
    n = hidden.shape[0]
    valid, tgt = safe_targets(targets, ignore_index)
    weights = aggregation_weights(valid, cu_seqlens, loss_agg, max_len or None)
    adv, old = advantages.float(), old_logprobs.float()
    exact = kl_estimator == "exact" and ref_hidden is not None
    sampled = kl_estimator != "exact" and ref_logprobs is not None
    ref_lp = torch.where(valid, ref_logprobs.float(), 0.0) if sampled else None
    ref = Head(ref_hidden.detach(), ref_weight.detach().to(ref_hidden.dtype)) if exact else None
    head = Head(hidden, weight, bias)
    rows, chunk = rows_for(backend), chunk_rows(chunk_size, n, weight.shape[0], hidden.device)
    one_pass = ratio_level == "token"  # coefficients known chunk by chunk: gradients in the same pass
    grad_class = TokenGrads if one_pass else SliceGrads
    acc = grad_class(head, tuple(needs)) if any(needs) else None
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)

    def coefficients(sl: slice, logp: torch.Tensor, level: str):
        v = valid[sl]
        _, ratio, clipped = clipped_surrogate(
            logp, old[sl], adv[sl], v, cu_seqlens, clip_low, clip_high, level
        )
        c = surrogate_grad(ratio, adv[sl], clipped)
        if sampled:
            c = c + kl_coef * sampled_kl_grad(logp, ref_lp[sl], kl_estimator)
        w = weights[sl]
        c = torch.where(v, c * w, zero)  # garbage (even NaN) inputs at ignored tokens never leak
        return c, (kl_coef * w if exact else None)

    if one_pass or acc is None:

        def coef_fn(start: int, stop: int, part: RowStats):
            logp = torch.where(valid[start:stop], part.logp, zero)
            return coefficients(slice(start, stop), logp, "token")

        stats = fused_pass(head, tgt, temperature, compute_entropy, coef_fn, acc, chunk, rows, ref=ref)
    else:
        stats = forward_stats(head, tgt, temperature, compute_entropy, chunk, rows, ref=ref)
    logp = torch.where(valid, stats.logp, zero)
    pg, ratio, clipped = clipped_surrogate(
        logp, old, adv, valid, cu_seqlens, clip_low, clip_high, ratio_level
    )
    if exact:
        kl = torch.where(valid, stats.kl, zero)
    elif sampled:
        kl = torch.where(valid, sampled_kl(logp, ref_lp, kl_estimator), zero)
    else:
        kl = torch.zeros_like(logp)
    if ratio_level == "sequence" and acc is not None:
        c_lp, c_kl = coefficients(slice(0, n), logp, "sequence")
        backward_grads(head, tgt, stats, temperature, (c_lp, None, c_kl), acc, chunk, rows, ref=ref)
    pg_loss, kl_loss = (weights * pg).sum(), (weights * kl).sum()
    entropy = torch.where(valid, stats.entropy, zero) if compute_entropy else logp.new_empty(0)
    grads = acc.result() if acc is not None else (None, None, None)
    return [pg_loss + kl_coef * kl_loss, pg_loss, kl_loss, logp, ratio.detach(), clipped, kl, entropy,
            *[g if g is not None else hidden.new_empty(0) for g in grads]]


@_policy_fwd.register_fake
def _(hidden, weight, bias, targets, advantages, old_logprobs, cu_seqlens, ref_logprobs, ref_hidden,
      ref_weight, kl_coef, kl_estimator, clip_low, clip_high, ratio_level, loss_agg, max_len, temperature,
      ignore_index, compute_entropy, chunk_size, backend, needs):
    n = hidden.shape[0]
    f32 = lambda *size: hidden.new_empty(size, dtype=torch.float32)
    grads = [
        torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
        torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
        torch.empty_like(bias) if (needs[2] and bias is not None) else hidden.new_empty(0),
    ]
    return [f32(), f32(), f32(), f32(n), f32(n), hidden.new_empty(n, dtype=torch.bool), f32(n),
            f32(n if compute_entropy else 0), *grads]


def _policy_setup(ctx, inputs, output) -> None:
    ctx.set_materialize_grads(False)  # else autograd builds zero "gradients" for the [V, H] grad outputs
    ctx.save_for_backward(*output[8:11])
    ctx.needs = inputs[-1]


def _policy_backward(ctx, grad_outputs):
    gh, gw, gb = ctx.saved_tensors
    grad_loss = grad_outputs[0]  # the op returns a list: its gradients arrive as one list
    if grad_loss is None:  # only the metrics were used downstream
        return (None,) * 23
    scaled = [g * grad_loss.to(g.dtype) if need else None for g, need in zip((gh, gw, gb), ctx.needs, strict=True)]
    return (*scaled, *([None] * 20))


_policy_fwd.register_autograd(_policy_backward, setup_context=_policy_setup)


def linear_policy_loss(
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
    compute_entropy: bool = True,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> PolicyLossOutput:
    """Clipped policy-gradient loss plus a KL penalty, never holding more than one chunk of logits.

    Args:
        hidden, weight, bias: the policy's ``[N, H]`` final hidden states and ``[V, H]`` LM head.
        targets: ``[N]`` sampled token ids (``ignore_index`` = prompt/padding, no loss, no gradient).
        advantages: ``[N]`` per-token advantages (a sequence's advantage broadcast to its tokens).
        old_logprobs: ``[N]`` log-probs of the targets under the policy that sampled them.
        cu_seqlens: ``[S+1]`` int offsets of the packed sequences (``0 ... N``).
        ref_logprobs: ``[N]`` reference log-probs, for the sampled estimators k1/k2/k3.
        ref_hidden, ref_weight: the reference model's ``[N, H_ref]`` states and ``[V, H_ref]`` head, for
            ``kl_estimator="exact"``.
        kl_coef: weight of the KL term (0 disables it; the KL metric is still reported when a reference
            is given).
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]`` (DAPO's
            asymmetric clip when they differ).
        ratio_level: ``"token"`` (PPO/GRPO) or ``"sequence"`` (GSPO).
        loss_agg: ``"token_mean"``, ``"seq_mean"`` or ``"fixed_length"`` (needs ``max_len``, Dr. GRPO).
        temperature: divides the logits (the sampler's temperature).
        compute_entropy: also report the per-token entropy (a few extra passes over each chunk).
    """
    check_head("linear_policy_loss", hidden, weight, bias)
    n = hidden.shape[0]
    check_targets("linear_policy_loss", targets, n)
    for name, vec in (("advantages", advantages), ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if vec is not None and tuple(vec.shape) != (n,):
            raise ValueError(f"linear_policy_loss: {name} must be [N]={n} (per token), got {tuple(vec.shape)}")
    check_cu_seqlens(cu_seqlens, n)
    if kl_estimator not in (*KL_ESTIMATORS, "exact"):
        raise ValueError(f"linear_policy_loss: kl_estimator must be one of {(*KL_ESTIMATORS, 'exact')}, got {kl_estimator!r}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"linear_policy_loss: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"linear_policy_loss: loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if loss_agg == "fixed_length" and (max_len is None or max_len <= 0):
        raise ValueError("linear_policy_loss: loss_agg='fixed_length' needs max_len > 0 (Dr. GRPO's normaliser)")
    if kl_estimator == "exact":
        if (ref_hidden is None) != (ref_weight is None) or (kl_coef != 0.0 and ref_hidden is None):
            raise ValueError("linear_policy_loss: kl_estimator='exact' needs both ref_hidden and ref_weight")
        if ref_hidden is not None:
            check_head("linear_policy_loss (reference)", ref_hidden, ref_weight.to(ref_hidden.dtype), None)
            if ref_hidden.shape[0] != n or ref_weight.shape[0] != weight.shape[0]:
                raise ValueError("linear_policy_loss: ref_hidden/ref_weight must share N and V with the policy")
    elif kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError(f"linear_policy_loss: kl_estimator={kl_estimator!r} with kl_coef != 0 needs ref_logprobs")
    if temperature <= 0:
        raise ValueError(f"linear_policy_loss: temperature must be > 0, got {temperature}")
    grad_on = torch.is_grad_enabled()
    needs = [grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad]
    out = _policy_fwd(
        hidden, weight, bias, targets, advantages, old_logprobs, cu_seqlens,
        ref_logprobs if kl_estimator != "exact" else None, ref_hidden if kl_estimator == "exact" else None,
        ref_weight if kl_estimator == "exact" else None, float(kl_coef), kl_estimator, float(clip_low),
        float(clip_high), ratio_level, loss_agg, int(max_len or 0), float(temperature), int(ignore_index),
        bool(compute_entropy), int(chunk_size or 0), resolve_backend(backend, hidden.device), needs,
    )
    loss, pg_loss, kl_loss, logp, ratio, clipped, kl, entropy = out[:8]
    has_ref = ref_hidden is not None if kl_estimator == "exact" else ref_logprobs is not None
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    return PolicyLossOutput(
        loss=loss, logprobs=logp.detach(), ratio=ratio.detach(), clipped=clipped,
        clip_fraction=(clipped.sum() / n_valid).detach(), pg_loss=pg_loss.detach(),
        kl=kl.detach() if has_ref else None, kl_loss=kl_loss.detach(),
        entropy=entropy.detach() if compute_entropy else None,
    )
