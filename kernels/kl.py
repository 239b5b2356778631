"""``linear_kl``: exact full-vocabulary KL(pi || pi_ref) per token, and the sampled estimators k1/k2/k3.

Exact KL, with ``x = (h W^T + b) / T``, ``y = (h_ref W_ref^T + b_ref) / T``, ``p = softmax(x)``,
``q = softmax(y)``::

    KL      = sum_v p_v (log p_v - log q_v) = sum_v p_v (x_v - y_v) - lse(x) + lse(y)
    dKL/dx_v = p_v (log p_v - log q_v - KL)          dKL/dy_v = q_v - p_v

Both heads stream through the same token chunks (one ``[C, V]`` logits chunk per head at a time): the
forward costs 2 matmuls; the backward recomputes both chunks (2, ``log q`` is needed even for a frozen
reference) plus 2 per head whose inputs need a gradient.

Registered as ``tao_kernels::linear_kl_fwd`` / ``_bwd`` custom ops with fake implementations.
"""

from typing import Optional

import torch

from ._backend import chunk_rows, resolve_backend, rows_for
from ._chunked import Head, SliceGrads, backward_grads, forward_stats
from ._policy_math import sampled_kl
from ._rows import RowStats
from .logprob import check_head


def _kl_chunk(chunk_size: int, hidden: torch.Tensor, weight: torch.Tensor) -> int:
    """Token rows per chunk: by default half the single-head default, as two heads' logits coexist."""
    if chunk_size:
        return chunk_rows(chunk_size, hidden.shape[0], weight.shape[0], hidden.device)
    return max(1, chunk_rows(0, hidden.shape[0], weight.shape[0], hidden.device) // 2)


@torch.library.custom_op("tao_kernels::linear_kl_fwd", mutates_args=())
def _kl_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (custom_op schema inference)
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: Optional[torch.Tensor],  # noqa: UP045
    valid: torch.Tensor,
    temperature: float,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kl [N], lse [N], ref_lse [N])`` float32; ``kl`` is 0 where ``valid`` is false."""
    chunk = _kl_chunk(chunk_size, hidden, weight)
    tgt = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    stats = forward_stats(
        Head(hidden, weight, bias), tgt, temperature, False, chunk, rows_for(backend),
        ref=Head(ref_hidden, ref_weight, ref_bias),
    )
    kl = torch.where(valid, stats.kl, torch.zeros((), dtype=torch.float32, device=hidden.device))
    return kl, stats.lse, stats.ref_lse


@_kl_fwd.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, temperature, chunk_size, backend):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("tao_kernels::linear_kl_bwd", mutates_args=())
def _kl_bwd(
    grad_kl: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    ref_bias: Optional[torch.Tensor],  # noqa: UP045
    valid: torch.Tensor,
    kl: torch.Tensor,
    lse: torch.Tensor,
    ref_lse: torch.Tensor,
    temperature: float,
    chunk_size: int,
    backend: str,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Gradients for ``(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)``; empty where not needed."""
    chunk = _kl_chunk(chunk_size, hidden, weight)
    head, ref = Head(hidden, weight, bias), Head(ref_hidden, ref_weight, ref_bias)
    tgt = torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    c_kl = grad_kl.float() * valid.to(torch.float32)
    stats = RowStats(lse=lse, logp=lse, kl=kl, ref_lse=ref_lse)
    acc = SliceGrads(head, tuple(needs[:3]))
    ref_acc = SliceGrads(ref, tuple(needs[3:])) if any(needs[3:]) else None
    backward_grads(
        head, tgt, stats, temperature, (torch.zeros_like(c_kl), None, c_kl), acc, chunk, rows_for(backend),
        ref=ref, ref_grads=ref_acc,
    )
    grads = list(acc.result()) + (list(ref_acc.result()) if ref_acc is not None else [None] * 3)
    return [g if g is not None else hidden.new_empty(0) for g in grads]


@_kl_bwd.register_fake
def _(grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, lse, ref_lse,
      temperature, chunk_size, backend, needs):
    like = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    return [torch.empty_like(t) if (need and t is not None) else hidden.new_empty(0) for t, need in zip(like, needs, strict=True)]


def _kl_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, temperature, chunk_size, backend = inputs
    kl, lse, ref_lse = output
    ctx.save_for_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, lse, ref_lse)
    ctx.config = (temperature, chunk_size, backend)


def _kl_backward(ctx, grad_kl, _grad_lse, _grad_ref_lse):
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, lse, ref_lse = ctx.saved_tensors
    temperature, chunk_size, backend = ctx.config
    present = (True, True, bias is not None, True, True, ref_bias is not None)
    input_slots = (0, 1, 2, 3, 4, 5)
    needs = [bool(ctx.needs_input_grad[i]) and present[i] for i in input_slots]
    grads = _kl_bwd(
        grad_kl, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, valid, kl, lse, ref_lse,
        temperature, chunk_size, backend, needs,
    )
    return (*[g if need else None for g, need in zip(grads, needs, strict=True)], None, None, None, None)


_kl_fwd.register_autograd(_kl_backward, setup_context=_kl_setup)


def linear_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    targets_or_mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact ``KL(pi || pi_ref)`` over the full vocabulary, per token, float32 ``[N]``.

    Args:
        hidden, weight, bias: the policy's ``[N, H]`` hidden states and ``[V, H]`` head (and ``[V]`` bias).
        ref_hidden, ref_weight, ref_bias: the reference model's ``[N, H_ref]`` states and ``[V, H_ref]`` head.
        targets_or_mask: ``[N]`` token ids (positions equal to ``ignore_index`` give 0 and no gradient) or
            a bool mask (True = keep); None keeps every position.
        temperature: divides both models' logits.

    Gradients flow to every input that requires one (detach the reference inputs to freeze them).
    """
    check_head("linear_kl", hidden, weight, bias)
    check_head("linear_kl (reference)", ref_hidden, ref_weight, ref_bias)
    n = hidden.shape[0]
    if ref_hidden.shape[0] != n or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"linear_kl: the two models must share N and V, got hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)}, ref_hidden {tuple(ref_hidden.shape)}, ref_weight {tuple(ref_weight.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"linear_kl: temperature must be > 0, got {temperature}")
    if targets_or_mask is None:
        valid = torch.ones(n, dtype=torch.bool, device=hidden.device)
    elif targets_or_mask.dtype == torch.bool:
        valid = targets_or_mask
    else:
        valid = targets_or_mask != ignore_index
    if tuple(valid.shape) != (n,):
        raise ValueError(f"linear_kl: targets_or_mask must be [N]={n}, got {tuple(valid.shape)}")
    name = resolve_backend(backend, hidden.device)
    kl, _, _ = _kl_fwd(
        hidden, weight, bias, ref_hidden, ref_weight.to(ref_hidden.dtype), ref_bias, valid,
        float(temperature), int(chunk_size or 0), name,
    )
    return kl


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    kind: str = "k3",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Schulman's sampled estimators of ``KL(pi || pi_ref)`` per token (``d = ref_logprobs - logprobs``).

    ``k1 = -d`` (unbiased), ``k2 = d^2 / 2``, ``k3 = exp(d) - 1 - d`` (unbiased and >= 0). Differentiable
    in both arguments. ``mask`` (bool, True = keep) zeroes other positions without NaN gradients.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"kl_estimate: shapes differ, {tuple(logprobs.shape)} vs {tuple(ref_logprobs.shape)}")
    if mask is not None:
        ref_logprobs = torch.where(mask, ref_logprobs, logprobs.detach())
    kl = sampled_kl(logprobs, ref_logprobs, kind)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl
