"""Row math on one chunk of raw logits, in pure PyTorch (the CPU production path).

A *chunk* is ``C`` tokens' raw logits ``z = h_c @ W.T + b`` (``[C, V]``, the input dtype). Every
quantity is taken over tempered logits ``x = z / T`` in float32:

    lse     = logsumexp(x)                         logp_v = x_v - lse,  p = exp(logp)
    logp_t  = x_target - lse                       H = -sum_v p_v logp_v
    KL      = sum_v p_v (logp_v - logq_v)          (q from the reference model's chunk z_ref)

Gradient of ``c_lp * logp_t + c_ent * H + c_kl * KL`` with respect to the raw logits (per row)::

    d/dz_v     = (p_v * u_v + c_lp * [v == target]) / T
    u_v        = -c_lp - c_ent (logp_v + H) + c_kl (logp_v - logq_v - KL)
    d/dz_ref_v = c_kl (q_v - p_v) / T

``u`` is affine in ``logp`` and ``logq``: ``u = a logp + b logq + k`` with ``a = c_kl - c_ent``,
``b = -c_kl``, ``k = -c_lp - c_ent H - c_kl KL``, which is how it is evaluated below (in place).

The Triton backend implements the same two functions (``stats``, ``grad``) as fused kernels; the chunk
loops in ``_chunked.py`` are shared.
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
    """Float32 ``[C, V]`` scratch buffers, allocated once per op call and reused for every chunk.

    Reuse matters on the CPU: a fresh multi-megabyte tensor per chunk costs page faults on first touch.
    """

    def __init__(self, rows: int, cols: int, device: torch.device) -> None:
        self.rows, self.cols, self.device = rows, cols, device
        self._buffers: list[torch.Tensor] = []

    def get(self, index: int, rows: int) -> torch.Tensor:
        while len(self._buffers) <= index:
            self._buffers.append(torch.empty(self.rows, self.cols, dtype=torch.float32, device=self.device))
        return self._buffers[index][:rows]


def _tempered(z: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``out = float32(z) / T`` (``out`` may be ``z`` itself when it is float32).

    A half ``z`` is widened first: ``torch.div(z, T, out=float32)`` would divide in the half dtype.
    """
    if out is not z and (z.dtype != torch.float32 or temperature == 1.0):
        out.copy_(z)
        z = out
    if temperature != 1.0:
        return torch.div(z, temperature, out=out)
    return out


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

        ``targets`` must be valid indices (ignored rows are masked by the caller). ``z`` is left
        untouched unless ``consume`` is true.
        """
        rows = z.shape[0]
        x = z if (consume and z.dtype == torch.float32) else ws.get(0, rows)
        x = _tempered(z, temperature, x)
        m = x.amax(dim=1, keepdim=True)
        x_t = x.gather(1, targets[:, None]).squeeze(1)
        x.sub_(m)  # x - max
        e = torch.exp(x, out=ws.get(1, rows))
        s = e.sum(dim=1)
        log_s = torch.log(s)
        lse = m.squeeze(1) + log_s
        out = RowStats(lse=lse, logp=(x_t - m.squeeze(1)) - log_s)  # <= 0 by construction
        if z_ref is not None:
            y = _tempered(z_ref, temperature, ws.get(2, rows))
            m_q = y.amax(dim=1, keepdim=True)
            y.sub_(m_q)
            log_s_q = torch.log(torch.exp(y, out=ws.get(3, rows)).sum(dim=1))
            out.ref_lse = m_q.squeeze(1) + log_s_q
            # KL = sum p (x - m - log s) - sum p (y - m_q - log s_q) = sum p (x - y) - log s + log s_q
            y.sub_(x).neg_()  # x - y (both shifted)
            out.kl = torch.mul(e, y, out=ws.get(3, rows)).sum(dim=1) / s - log_s + log_s_q
        if need_entropy:
            # H = log s - sum e (x - m) / s
            out.entropy = log_s - e.mul_(x).sum(dim=1) / s
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(dL/dz, dL/dz_ref)`` in float32 for the row coefficients (see the module docstring).

        Consumes ``z`` when it is float32; the returned tensors are workspace views.
        """
        rows = z.shape[0]
        logp = _tempered(z, temperature, z if z.dtype == torch.float32 else ws.get(0, rows))
        logp.sub_(stats.lse[:, None])
        p = torch.exp(logp, out=ws.get(1, rows))
        a = torch.zeros_like(c_lp)
        k = -c_lp
        if c_ent is not None:
            a = a - c_ent
            k = k - c_ent * stats.entropy
        logq = None
        if c_kl is not None:
            logq = _tempered(z_ref, temperature, ws.get(2, rows)).sub_(stats.ref_lse[:, None])
            a = a + c_kl
            k = k - c_kl * stats.kl
        dz_ref = None
        if c_ent is None and c_kl is None:
            dz = p.mul_(k[:, None])
        else:
            u = logp.mul_(a[:, None]).add_(k[:, None])
            if logq is not None:
                u.addcmul_(logq, c_kl[:, None], value=-1.0)
                if need_ref_grad:
                    dz_ref = logq.exp_().sub_(p).mul_((c_kl / temperature)[:, None])
            dz = p.mul_(u)
        dz.scatter_add_(1, targets[:, None], c_lp[:, None].to(dz.dtype))
        if temperature != 1.0:
            dz.div_(temperature)
        return dz, dz_ref
