"""``linear_logprob``: log pi(target) and the entropy per token, straight from hidden states.

Math (per token, ``x = (h W^T + b) / T``, ``p = softmax(x)``)::

    logp = x_target - logsumexp(x)                H = logsumexp(x) - sum_v p_v x_v
    dlogp/dx_v = [v == target] - p_v              dH/dx_v = -p_v (log p_v + H)

With upstream gradients ``g`` (log-prob) and ``g_H`` (entropy), ``dL/dz = (g ([v == t] - p) - g_H p
(log p + H)) / T`` for the raw logits ``z = h W^T + b``; then ``dL/dh = dz W``, ``dL/dW = dz^T h``,
``dL/db = sum_tokens dz``. The forward keeps only ``logsumexp`` and ``H`` (``[N]`` each); the backward
recomputes each chunk's logits (a per-token upstream gradient cannot be folded into the forward), so
no ``[N, V]`` tensor ever exists (see ``_chunked.py`` for the memory arithmetic).

Registered as the custom ops ``tao_kernels::linear_logprob_fwd`` / ``_bwd`` with fake implementations,
so the op is a single opaque node inside ``torch.compile`` graphs.
"""

from typing import Optional

import torch

from ._backend import chunk_rows, resolve_backend, rows_for
from ._chunked import Head, SliceGrads, backward_grads, forward_stats
from ._rows import RowStats


def check_head(where: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise a ValueError naming ``where`` when the LM-head inputs do not fit together."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"{where}: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden size mismatch, hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise ValueError(f"{where}: hidden and weight must share one float dtype, got {hidden.dtype}, {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"{where}: hidden on {hidden.device} but weight on {weight.device}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{where}: bias must be [V]={weight.shape[0]}, got {tuple(bias.shape)}")


def check_targets(where: str, targets: torch.Tensor, n: int) -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"{where}: targets must be [N]={n}, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{where}: targets must be integer token ids, got {targets.dtype}")


def safe_targets(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid [N] bool, targets with ignored entries replaced by 0, int64)``."""
    valid = targets != ignore_index
    return valid, torch.where(valid, targets, torch.zeros_like(targets)).long()


@torch.library.custom_op("tao_kernels::linear_logprob_fwd", mutates_args=())
def _logprob_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045 (custom_op schema inference)
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    chunk_size: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logp [N], entropy [N] or [0], lse [N])``, float32, zeros at ignored positions."""
    valid, tgt = safe_targets(targets, ignore_index)
    rows = rows_for(backend)
    chunk = chunk_rows(chunk_size, hidden.shape[0], weight.shape[0], hidden.device)
    stats = forward_stats(Head(hidden, weight, bias), tgt, temperature, return_entropy, chunk, rows)
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logp = torch.where(valid, stats.logp, zero)
    entropy = torch.where(valid, stats.entropy, zero) if return_entropy else logp.new_empty(0)
    return logp, entropy, stats.lse


@_logprob_fwd.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, return_entropy, chunk_size, backend):
    n = hidden.shape[0]
    new = lambda size: hidden.new_empty(size, dtype=torch.float32)
    return new(n), new(n if return_entropy else 0), new(n)


@torch.library.custom_op("tao_kernels::linear_logprob_bwd", mutates_args=())
def _logprob_bwd(
    grad_logp: torch.Tensor,
    grad_entropy: Optional[torch.Tensor],  # noqa: UP045
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],  # noqa: UP045
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],  # noqa: UP045
    temperature: float,
    ignore_index: int,
    chunk_size: int,
    backend: str,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dL/dhidden, dL/dweight, dL/dbias)``; an input whose ``needs`` flag is false gets an empty tensor."""
    valid, tgt = safe_targets(targets, ignore_index)
    rows = rows_for(backend)
    chunk = chunk_rows(chunk_size, hidden.shape[0], weight.shape[0], hidden.device)
    head = Head(hidden, weight, bias)
    mask = valid.to(torch.float32)
    c_lp = grad_logp.float() * mask
    c_ent = grad_entropy.float() * mask if grad_entropy is not None else None
    stats = RowStats(lse=lse, logp=lse, entropy=entropy)
    acc = SliceGrads(head, tuple(needs))
    backward_grads(head, tgt, stats, temperature, (c_lp, c_ent, None), acc, chunk, rows)
    # a fresh empty tensor per unneeded gradient: a custom op's outputs must not alias each other
    return tuple(g if g is not None else hidden.new_empty(0) for g in acc.result())


@_logprob_bwd.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index,
      chunk_size, backend, needs):
    return (
        torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
        torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
        torch.empty_like(bias) if (needs[2] and bias is not None) else hidden.new_empty(0),
    )


def _fwd_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, temperature, ignore_index, return_entropy, chunk_size, backend = inputs
    _, entropy, lse = output
    ctx.set_materialize_grads(False)  # an unused entropy output gets no zero-filled gradient
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if return_entropy else None)
    ctx.config = (temperature, ignore_index, return_entropy, chunk_size, backend)


def _fwd_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    temperature, ignore_index, return_entropy, chunk_size, backend = ctx.config
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    gh, gw, gb = _logprob_bwd(
        grad_logp, grad_entropy if return_entropy else None, hidden, weight, bias, targets, lse, entropy,
        temperature, ignore_index, chunk_size, backend, needs,
    )
    return (gh if needs[0] else None, gw if needs[1] else None, gb if needs[2] else None,
            None, None, None, None, None, None)


_logprob_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each target under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` final hidden states (packed tokens, any float dtype).
        weight: ``[V, H]`` LM-head weight, same dtype and device as ``hidden``.
        targets: ``[N]`` token ids; ``ignore_index`` marks positions that give 0 and get no gradient.
        bias: optional ``[V]`` LM-head bias.
        temperature: divides the logits, exactly as the sampler does when it reports log-probs.
        return_entropy: also return the entropy of the full distribution per token (differentiable).
        chunk_size: tokens per chunk (default: ``C x V`` about 16 Mi elements on the CPU, 256 Mi on a GPU).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``logprobs [N]`` float32, or ``(logprobs, entropy)`` when ``return_entropy``.
    """
    check_head("linear_logprob", hidden, weight, bias)
    check_targets("linear_logprob", targets, hidden.shape[0])
    if temperature <= 0:
        raise ValueError(f"linear_logprob: temperature must be > 0, got {temperature}")
    name = resolve_backend(backend, hidden.device)
    logp, entropy, _ = _logprob_fwd(
        hidden, weight, bias, targets, float(temperature), int(ignore_index), bool(return_entropy),
        int(chunk_size or 0), name,
    )
    return (logp, entropy) if return_entropy else logp
