"""Float32 ``nn.Linear`` layers on CPU through oneDNN, with gradients, for the training step.

PyTorch sends a float32 CPU matmul to MKL's ``sgemm``, which on AMD processors runs an AVX2 code
path; oneDNN picks its kernels from the CPU's features and uses AVX-512 where there is one. On the
2-core AMD EPYC this project is measured on, one thread, ``[1024, 576] x [576, 1536]``: MKL 96 ms,
oneDNN 42 ms forward; the two backward products (``dX = dY W``, ``dW = dY^T X``) gain the same.

:func:`onednn_linears` routes every plain float32 ``nn.Linear`` of a model through
:class:`OneDNNLinear` for the duration of a ``with`` block. The op reads the module's own weight
tensor (strided views for the transposes: no copy of the weights is made), so numerics are float32
throughout; results differ from MKL's only by summation order (~1e-6 relative).
This module is the one home of the op and of the check that it agrees with ``F.linear`` here; the
sampling engine's linears (:mod:`tao_core.engine.linear`) use it too. ``TAO_ONEDNN=0`` in the
environment turns both off (plain ``F.linear``).
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_AGREES: bool | None = None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` through oneDNN for a 2-D ``x``; ``weight`` may be a strided view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def available() -> bool:
    """Whether the oneDNN op exists here and matches ``F.linear`` / ``torch.mm`` on a small odd shape,
    bias and transposed operands included (checked once per process; ``TAO_ONEDNN=0``: False)."""
    global _AGREES
    if os.environ.get("TAO_ONEDNN", "1") == "0":
        return False
    if _AGREES is None:
        _AGREES = False
        if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            g = torch.Generator().manual_seed(0)
            x, w, u, b = (torch.randn(5, 37, generator=g), torch.randn(41, 37, generator=g),
                          torch.randn(5, 41, generator=g), torch.randn(41, generator=g))
            try:
                with torch.no_grad():
                    ok = torch.allclose(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
                    ok = ok and torch.allclose(linear(u, w.T), u @ w, rtol=1e-5, atol=1e-5)  # dX = dY W
                    ok = ok and torch.allclose(linear(u.T, x.T), u.T @ x, rtol=1e-5, atol=1e-5)  # dW = dY^T X
            except RuntimeError:
                ok = False
            _AGREES = bool(ok)
    return _AGREES


def pack_weight(weight: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """A copy of ``weight [out, in]`` reordered into oneDNN's blocked layout for :func:`packed_linear`
    (``rows``: the typical row count of ``x``, a hint for the layout; any row count works)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a 2-D ``x`` and a weight packed by :func:`pack_weight` (no gradient):
    :func:`linear`'s op, which takes a packed weight as it takes a plain one."""
    return linear(x.contiguous(), packed, bias)


def packing_available() -> bool:
    """Whether :func:`pack_weight` exists here and :func:`packed_linear` matches ``F.linear`` on odd shapes
    and row counts (checked once per process; False when :func:`available` is)."""
    global _PACKED_AGREES
    if _PACKED_AGREES is None:
        _PACKED_AGREES = False
        if available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
            g = torch.Generator().manual_seed(0)
            w, b = torch.randn(41, 37, generator=g), torch.randn(41, generator=g)
            try:
                with torch.no_grad():
                    packed = pack_weight(w)
                    _PACKED_AGREES = all(
                        torch.allclose(packed_linear(x, packed, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
                        for x in (torch.randn(rows, 37, generator=g) for rows in (1, 5, 32, 67)))
            except RuntimeError:
                _PACKED_AGREES = False
    return _PACKED_AGREES


_PACKED_AGREES: bool | None = None


class OneDNNLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``dx = dy W``, ``dW = dy^T x``, ``db = sum(dy)``, each product one
    oneDNN call on (possibly transposed) views; ``x`` is flattened to ``[tokens, in]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = linear(x2, weight, bias)
        ctx.save_for_backward(x2, weight)
        ctx.lead, ctx.has_bias = lead, bias is not None
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, weight.shape[0]).contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = linear(g2, weight.T).view(*ctx.lead, weight.shape[1])
        if ctx.needs_input_grad[1]:
            # dW in the weight's own layout (K-major weights: see k_major_linears)
            gw = linear(x2.T, g2.T).T if weight.stride(0) == 1 and weight.stride(1) != 1 else linear(g2.T, x2.T)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g2.sum(0)
        return gx, gw, gb


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return F.linear(x, self.weight, self.bias)
    return OneDNNLinear.apply(x, self.weight, self.bias)


@contextmanager
def onednn_linears(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, the model's plain float32 CPU ``nn.Linear`` layers (LoRA base layers
    included) compute through :class:`OneDNNLinear`; yields how many were routed (0 when oneDNN is
    not available or does not agree with MKL here). The modules are restored on exit."""
    routed: list[torch.nn.Linear] = []
    if available():
        for m in model.modules():
            if (type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
                    and m.weight.dtype == torch.float32 and "forward" not in vars(m)):
                m.forward = types.MethodType(_forward, m)
                routed.append(m)
    try:
        yield len(routed)
    finally:
        for m in routed:
            del m.forward


def k_major_linears(model: torch.nn.Module) -> int:
    """Store the weight of each plain float32 CPU ``nn.Linear`` of ``model`` K-major, once, in place.

    The values and the ``[out, in]`` shape stay; the storage becomes the transpose (strides
    ``(1, out)``), the layout oneDNN's matmul multiplies fastest (presumably no per-call reorder
    of the weight): on the 2-core AMD EPYC, SmolLM2-135M's projections at 32 rows take 27 ms
    instead of 32 ms per decode step, 11-14% less at 32-128 rows. The Parameter objects are kept (``param.data`` is
    replaced), so optimizers and the engine keep reading the same tensors; weights tied to another
    module (an embedding shared with the LM head) are left as they are. Returns how many weights
    were re-laid. ``save_pretrained`` writes them contiguous as usual.
    """
    if not available():
        return 0
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    done = 0
    with torch.no_grad():
        for m in model.modules():
            w = getattr(m, "weight", None)
            if (type(m) is torch.nn.Linear and isinstance(w, torch.nn.Parameter) and uses.get(id(w)) == 1
                    and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2 and w.is_contiguous()
                    and w.shape[0] > 1 and w.shape[1] > 1):
                w.data = w.data.t().contiguous().t()
                done += 1
    return done
