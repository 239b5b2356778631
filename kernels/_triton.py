"""Triton row kernels: the GPU implementation of ``_rows.TorchRows`` (same math, same interface).

The chunk loops of ``_chunked.py`` produce one ``[C, V]`` chunk of raw logits with a cuBLAS matmul;
these kernels replace the half-dozen elementwise PyTorch passes over that chunk with two fused ones:

- ``_row_stats_kernel``: one program per row streams the vocabulary in ``BLOCK_V`` tiles with an
  online log-sum-exp, picking the target logit and accumulating the entropy and the exact KL as it
  goes (one read of the chunk, float32 accumulation whatever the input dtype).
- ``_row_grad_kernel``: one program per ``(row, vocab tile)`` writes ``dL/dz`` over a block of logits
  (a token chunk, or in the backward a vocabulary slice of every row) in place, in their own dtype,
  so the two gradient matmuls read it directly (no extra buffer).

Online statistics (``x = z / T`` over the tiles seen so far, ``m`` their running max)::

    s = sum e^{x - m}            b = sum e^{x - m} (x - m)            c = sum e^{x - m} ((x - m) - (y - m_q))
    on m -> m': s' = r s + tile sums, b' = r (b + s (m - m')) + ..., c' = r (c + s ((m - m') - (m_q - m_q'))) + ...
    with r = e^{m - m'};   lse = m + log s,   H = log s - b / s,   KL = c / s - log s + log s_q

Shifting every accumulator by its own running max keeps ``H`` and ``KL`` free of the cancellation a
plain ``lse - sum p x`` suffers when logits are huge.

Run on the CPU with ``TRITON_INTERPRET=1`` set before this module is imported (the tests do so in a
subprocess).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import RowStats, Workspace

STATS_BLOCK_V = 2048  # vocab tile of the stats kernel (one program per row; 8 warps)
GRAD_BLOCK_V = 1024  # vocab tile of the gradient kernel (one program per row and tile; 4 warps)


@triton.jit
def _row_stats_kernel(
    z_ptr,  # [C, V] raw logits of the chunk, input dtype, row stride stride_z
    zref_ptr,  # [C, V] raw reference logits (read only when HAS_REF), row stride stride_zref
    tgt_ptr,  # [C] int64 target ids, all valid
    lse_ptr,  # [C] float32 out: logsumexp(z / T)
    logp_ptr,  # [C] float32 out: log p(target)
    ent_ptr,  # [C] float32 out: entropy (written when ENTROPY)
    kl_ptr,  # [C] float32 out: KL(p || q) (written when HAS_REF)
    ref_lse_ptr,  # [C] float32 out: logsumexp(z_ref / T) (written when HAS_REF)
    V,
    stride_z,
    stride_zref,
    temperature,
    ENTROPY: tl.constexpr,
    HAS_REF: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    zref_row = zref_ptr + row * stride_zref
    tgt = tl.load(tgt_ptr + row)
    m = -float("inf")
    s = 0.0
    b = 0.0
    m_q = -float("inf")
    s_q = 0.0
    c = 0.0
    x_t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(z_row + cols, mask=mask, other=-float("inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m == -float("inf"), 0.0, m - m_new)
        r = tl.exp(shift)
        xs = tl.where(mask, x - m_new, 0.0)  # shifted logits, 0 off the end (no inf * 0)
        e = tl.where(mask, tl.exp(xs), 0.0)
        x_t += tl.sum(tl.where(cols == tgt, x, 0.0), 0)
        if ENTROPY:
            b = r * (b + s * shift) + tl.sum(e * xs, 0)
        if HAS_REF:
            y = tl.load(zref_row + cols, mask=mask, other=-float("inf")).to(tl.float32) / temperature
            m_q_new = tl.maximum(m_q, tl.max(y, 0))
            shift_q = tl.where(m_q == -float("inf"), 0.0, m_q - m_q_new)
            ys = tl.where(mask, y - m_q_new, 0.0)
            s_q = tl.exp(shift_q) * s_q + tl.sum(tl.where(mask, tl.exp(ys), 0.0), 0)
            c = r * (c + s * (shift - shift_q)) + tl.sum(e * (xs - ys), 0)
            m_q = m_q_new
        s = r * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    tl.store(lse_ptr + row, m + log_s)
    tl.store(logp_ptr + row, (x_t - m) - log_s)
    if ENTROPY:
        tl.store(ent_ptr + row, log_s - b / s)
    if HAS_REF:
        log_s_q = tl.log(s_q)
        tl.store(kl_ptr + row, c / s - log_s + log_s_q)
        tl.store(ref_lse_ptr + row, m_q + log_s_q)


@triton.jit
def _row_grad_kernel(
    z_ptr,  # [C, V] raw logits in, dL/dz out (in place, same dtype), row stride stride_z
    zref_ptr,  # [C, V] raw reference logits in; dL/dz_ref out when REF_GRAD; row stride stride_zref
    tgt_ptr,  # [C] int64 target ids, all valid
    lse_ptr,  # [C] float32 logsumexp(z / T)
    ref_lse_ptr,  # [C] float32 logsumexp(z_ref / T) (read when HAS_REF)
    coef_a_ptr,  # [C] float32 a = c_kl - c_ent       (u = a logp + b logq + k)
    coef_b_ptr,  # [C] float32 b = -c_kl              (read when HAS_REF)
    coef_k_ptr,  # [C] float32 k = -c_lp - c_ent H - c_kl KL
    c_lp_ptr,  # [C] float32 upstream gradient of log p(target)
    V,  # columns of this block of logits (a vocabulary slice starting at column col_offset)
    col_offset,
    stride_z,
    stride_zref,
    temperature,
    HAS_REF: tl.constexpr,
    REF_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = cols < V
    z_row = z_ptr + row * stride_z
    x = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32) / temperature
    logp = x - tl.load(lse_ptr + row)
    p = tl.exp(logp)
    u = tl.load(coef_a_ptr + row) * logp + tl.load(coef_k_ptr + row)
    if HAS_REF:
        zref_row = zref_ptr + row * stride_zref
        y = tl.load(zref_row + cols, mask=mask, other=0.0).to(tl.float32) / temperature
        logq = y - tl.load(ref_lse_ptr + row)
        c_kl = -tl.load(coef_b_ptr + row)
        u -= c_kl * logq
        if REF_GRAD:
            dzr = c_kl * (tl.exp(logq) - p) / temperature
            tl.store(zref_row + cols, dzr.to(zref_ptr.dtype.element_ty), mask=mask)
    c_lp = tl.load(c_lp_ptr + row)
    tgt = tl.load(tgt_ptr + row) - col_offset
    dz = (p * u + tl.where(cols == tgt, c_lp, 0.0)) / temperature
    tl.store(z_row + cols, dz.to(z_ptr.dtype.element_ty), mask=mask)


class TritonRows:
    """Launchers with the interface of ``_rows.TorchRows`` (the workspace is not needed here)."""

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
        rows, vocab = z.shape
        new = lambda: torch.empty(rows, dtype=torch.float32, device=z.device)
        lse, logp = new(), new()
        ent = new() if need_entropy else lse
        kl, ref_lse = (new(), new()) if z_ref is not None else (lse, lse)
        zr = z_ref if z_ref is not None else z
        _row_stats_kernel[(rows,)](
            z, zr, targets, lse, logp, ent, kl, ref_lse, vocab, z.stride(0), zr.stride(0), float(temperature),
            ENTROPY=need_entropy, HAS_REF=z_ref is not None,
            BLOCK_V=min(STATS_BLOCK_V, triton.next_power_of_2(vocab)), num_warps=8,
        )
        return RowStats(
            lse=lse, logp=logp, entropy=ent if need_entropy else None,
            kl=kl if z_ref is not None else None, ref_lse=ref_lse if z_ref is not None else None,
        )

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
        """``dL/dz`` written over ``z`` (and ``dL/dz_ref`` over ``z_ref``), in their dtype.

        ``z`` may be a vocabulary slice starting at column ``col_offset``.
        """
        rows, vocab = z.shape
        c_lp = c_lp.float().contiguous()
        a = torch.zeros_like(c_lp)
        k = -c_lp
        if c_ent is not None:
            a = a - c_ent
            k = k - c_ent * stats.entropy
        has_ref = c_kl is not None
        if has_ref:
            a = a + c_kl
            k = k - c_kl * stats.kl
        b = -c_kl.float().contiguous() if has_ref else a
        zr = z_ref if has_ref else z
        block = min(GRAD_BLOCK_V, triton.next_power_of_2(vocab))
        _row_grad_kernel[(rows, triton.cdiv(vocab, block))](
            z, zr, targets, stats.lse, stats.ref_lse if has_ref else stats.lse, a.contiguous(), b,
            k.contiguous(), c_lp, vocab, col_offset, z.stride(0), zr.stride(0), float(temperature),
            HAS_REF=has_ref, REF_GRAD=has_ref and need_ref_grad, BLOCK_V=block, num_warps=4,
        )
        return z, (z_ref if has_ref and need_ref_grad else None)
