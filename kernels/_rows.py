"""Row math on one block of raw logits, in pure PyTorch (the CPU production path).

A *block* is a set of raw logits ``z = h @ W.T + b`` in the input dtype: ``C`` tokens against the whole
vocabulary (``[C, V]``, the forward), or in the backward all tokens against a vocabulary slice (the
statistics then come from the forward). Every quantity is taken over tempered logits ``x = z / T``
in float32:

    lse     = logsumexp(x)                         logp_v = x_v - lse,  p = exp(logp)
    logp_t  = x_target - lse                       H = -sum_v p_v logp_v
    KL      = sum_v p_v (logp_v - logq_v)          (q from the reference model's chunk z_ref)

Gradient of ``c_lp * logp_t + c_ent * H + c_kl * KL`` with respect to the raw logits (per row)::

    d/dz_v     = (p_v * u_v + c_lp * [v == target]) / T
    u_v        = -c_lp - c_ent (logp_v + H) + c_kl (logp_v - logq_v - KL)
    d/dz_ref_v = c_kl (q_v - p_v) / T

``u`` is affine in ``logp`` and ``logq``: ``u = a logp + b logq + k`` with ``a = c_kl - c_ent``,
``b = -c_kl``, ``k = -c_lp - c_ent H - c_kl KL``, which is how it is evaluated below (in place).

On the CPU the elementwise work is memory-bound, so it is done in as few passes as possible over the
whole block: ATen's fused ``_log_softmax`` kernel for the statistics and in-place updates of the
logits for the gradient. The Triton backend implements the same two functions (``stats``, ``grad``)
as fused kernels; the loops over blocks in ``_chunked.py`` are shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowStats:
    """Per-row results of one chunk (all float32 ``[C]``; optional ones are None when not asked)."""

    lse: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    ref_lse: torch.Tensor | None = None


class Workspace:
    """Float32 scratch buffers of ``capacity`` elements, allocated once per op call, reused by every chunk.

    ``get(i, rows, cols)`` views buffer ``i`` as a contiguous ``[rows, cols]`` tensor. Reuse matters on
    the CPU: a fresh multi-megabyte tensor per chunk costs page faults on first touch.
    """

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.capacity, self.device = capacity, device
        self._buffers: dict[int, torch.Tensor] = {}

    def get(self, index: int, rows: int, cols: int) -> torch.Tensor:
        if rows * cols > self.capacity:
            raise ValueError(f"workspace holds {self.capacity} elements, asked for {rows} x {cols}")
        if index not in self._buffers:
            self._buffers[index] = torch.empty(self.capacity, dtype=torch.float32, device=self.device)
        return self._buffers[index][: rows * cols].view(rows, cols)


def _tempered(z: torch.Tensor, temperature: float, ws: Workspace, index: int, in_place: bool) -> torch.Tensor:
    """``float32(z) / T``: over ``z`` itself when ``in_place`` and ``z`` is float32, else in buffer ``index``.

    Half ``z`` is widened first (``torch.div(z_half, T, out=f32)`` would divide in the half dtype).
    """
    if not (in_place and z.dtype == torch.float32):
        z = ws.get(index, *z.shape).copy_(z)
    if temperature != 1.0:
        z.div_(temperature)
    return z


def _log_softmax(x: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log_softmax(x) into out, logsumexp(x))``; the lse is read at each row's max, where it is exact."""
    m, argmax = x.max(dim=1, keepdim=True)
    torch.ops.aten._log_softmax.out(x, 1, False, out=out)
    return out, (m - out.gather(1, argmax)).squeeze(1)


class TorchRows:
    """The pure-PyTorch implementation of the per-chunk row math."""

    @staticmethod
    def stats(
        z: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        need_entropy: bool,
        ws: Workspace,
        z_ref: torch.Tensor | None = None,
        consume: bool = False,
    ) -> RowStats:
        """lse, target log-prob (and entropy, and exact KL against ``z_ref``) of every row.

        ``targets`` must be valid indices (ignored rows are masked by the caller). ``z`` and ``z_ref``
        are left untouched unless ``consume`` (then float32 logits are overwritten, saving copies).
        """
        read_only = not consume and z.dtype == torch.float32 and temperature == 1.0
        x = z if read_only else _tempered(z, temperature, ws, 0, in_place=consume)
        logp, lse = _log_softmax(x, ws.get(1, *z.shape))
        out = RowStats(lse=lse, logp=logp.gather(1, targets[:, None]).squeeze(1))  # <= 0 by construction
        if not (need_entropy or z_ref is not None):
            return out
        p = torch.exp(logp, out=x if consume else ws.get(2, *z.shape))
        # The row sums below go through torch.sum (cascade summation, as accurate as the naive path).
        if z_ref is not None:
            y = z_ref if read_only else _tempered(z_ref, temperature, ws, 3, in_place=consume)
            logq, out.ref_lse = _log_softmax(y, ws.get(4, *z.shape))
            out.kl = logq.neg_().add_(logp).mul_(p).sum(dim=1)  # sum p (log p - log q)
        if need_entropy:
            out.entropy = -p.mul_(logp).sum(dim=1)
        return out

    @staticmethod
    def grad(
        z: torch.Tensor,
        targets: torch.Tensor,
        stats: RowStats,
        temperature: float,
        c_lp: torch.Tensor,
        ws: Workspace,
        c_ent: torch.Tensor | None = None,
        c_kl: torch.Tensor | None = None,
        z_ref: torch.Tensor | None = None,
        need_ref_grad: bool = False,
        col_offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dL/dz, dL/dz_ref)`` in float32 for the row coefficients (see the module docstring).

        ``z`` may be a vocabulary slice starting at column ``col_offset`` (the row statistics are those
        of the full rows). Written over ``z`` (``z_ref``) when it is float32, else into workspace buffers.
        """
        logp = _tempered(z, temperature, ws, 0, in_place=True).sub_(stats.lse[:, None])
        dz_ref = None
        if c_ent is None and c_kl is None:
            dz = logp.exp_().mul_((-c_lp)[:, None])
        else:
            a = torch.zeros_like(c_lp)
            k = -c_lp
            if c_ent is not None:
                a = a - c_ent
                k = k - c_ent * stats.entropy
            if c_kl is not None:
                a = a + c_kl
                k = k - c_kl * stats.kl
            p = torch.exp(logp, out=ws.get(1, *z.shape))
            u = logp.mul_(a[:, None]).add_(k[:, None])
            if c_kl is not None:
                logq = _tempered(z_ref, temperature, ws, 2, in_place=need_ref_grad)
                logq.sub_(stats.ref_lse[:, None])
                u.addcmul_(logq, c_kl[:, None], value=-1.0)
                if need_ref_grad:
                    dz_ref = logq.exp_().sub_(p).mul_((c_kl / temperature)[:, None])
            dz = u.mul_(p)
        local = targets - col_offset
        inside = (local >= 0) & (local < dz.shape[1])
        one_hot = torch.where(inside, c_lp, torch.zeros_like(c_lp)).to(dz.dtype)
        dz.scatter_add_(1, local.clamp(0, dz.shape[1] - 1)[:, None], one_hot[:, None])
        if temperature != 1.0:
            dz.div_(temperature)
        return dz, dz_ref
