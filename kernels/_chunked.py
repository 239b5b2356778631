"""The chunk loops shared by every backend: stream ``C`` tokens at a time through the LM head.

Memory arithmetic: the naive path holds ``[N, V]`` float32 logits several times over (the logits, the
log-softmax saved for backward, and in backward their gradient): at N=4096, V=49152 that is 805 MB
each, 2.3 GB at peak. Here one chunk ``[C, V]`` of logits exists at a time, in the input dtype, and
its gradient is written over it; the CPU path adds float32 ``[C, V]`` scratch buffers (one for the
log-softmax in the forward, one more for the entropy; ``_rows.Workspace``). ``C`` is chosen so that
``C * V`` is about ``CHUNK_ELEMENTS`` (8 Mi elements, 32 MB of float32): C = 160 at V=49152, 64 at
V=128256. The gradients themselves (``[N, H]`` and ``[V, H]``, float32 accumulators for half inputs)
are the only other allocations: about 190 MB in all for the example, against 2.3 GB.

Matmuls per pass: forward 1 (``z = h_c W^T``), backward 3 (recompute ``z``, ``dz W``, ``dz^T h_c``).
A scalar loss whose per-token coefficients are known once the chunk's statistics are (the policy
loss with token-level ratios) does forward and backward in one pass of 3 matmuls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._rows import RowStats, Workspace

CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(n_tokens: int, vocab: int) -> int:
    """Rows per chunk so that one ``[C, V]`` float32 buffer is about 32 MB (a multiple of 16 when > 16)."""
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(n_tokens, rows))


@dataclass
class Head:
    """One LM head's inputs: ``hidden [N, H]``, ``weight [V, H]``, optional ``bias [V]``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def logits_into(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Raw logits of tokens ``start:stop`` written into ``out`` (``[stop - start, V]``, input dtype)."""
        z = out[: stop - start]
        torch.mm(self.hidden[start:stop], self.weight.t(), out=z)
        if self.bias is not None:
            z.add_(self.bias)
        return z

    def chunk_buffer(self, rows: int) -> torch.Tensor:
        return torch.empty(rows, self.weight.shape[0], dtype=self.hidden.dtype, device=self.hidden.device)


class GradAccumulator:
    """Gradients of one head, accumulated chunk by chunk from ``dL/dz``.

    ``grad_hidden[c] = dz @ W`` (rows are independent: written once, in the input dtype, as the naive
    path rounds it); ``grad_weight += dz^T @ h_c`` and ``grad_bias += sum_rows dz`` accumulate in
    float32 and are cast to the input dtype at the end.
    """

    def __init__(self, head: Head, need_hidden: bool, need_weight: bool, need_bias: bool) -> None:
        self.head = head
        h, w = head.hidden, head.weight
        self.grad_hidden = torch.empty_like(h) if need_hidden else None
        self.grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_weight else None
        self.grad_bias = (
            torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
            if need_bias and head.bias is not None
            else None
        )

    def add(self, start: int, stop: int, dz: torch.Tensor) -> None:
        h_c, w = self.head.hidden[start:stop], self.head.weight
        if self.grad_hidden is not None:
            torch.mm(dz.to(w.dtype), w, out=self.grad_hidden[start:stop])
        if self.grad_weight is not None:
            if dz.dtype == torch.float32:
                self.grad_weight.addmm_(dz.t(), h_c.float())
            else:
                self.grad_weight.add_(torch.mm(dz.t(), h_c.to(dz.dtype)))
        if self.grad_bias is not None:
            self.grad_bias.add_(dz.sum(dim=0, dtype=torch.float32))

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        w = self.head.weight
        gw = self.grad_weight.to(w.dtype) if self.grad_weight is not None else None
        gb = self.grad_bias.to(self.head.bias.dtype) if self.grad_bias is not None else None
        return self.grad_hidden, gw, gb


def _empty_stats(n: int, device: torch.device, entropy: bool, ref: bool) -> RowStats:
    new = lambda: torch.zeros(n, dtype=torch.float32, device=device)
    return RowStats(
        lse=new(), logp=new(), entropy=new() if entropy else None, kl=new() if ref else None,
        ref_lse=new() if ref else None,
    )


def _store(full: RowStats, start: int, stop: int, part: RowStats) -> None:
    for name in ("lse", "logp", "entropy", "kl", "ref_lse"):
        dst = getattr(full, name)
        if dst is not None:
            dst[start:stop] = getattr(part, name)


def _slice(full: RowStats, start: int, stop: int) -> RowStats:
    pick = lambda t: None if t is None else t[start:stop]
    return RowStats(
        lse=full.lse[start:stop], logp=full.logp[start:stop], entropy=pick(full.entropy),
        kl=pick(full.kl), ref_lse=pick(full.ref_lse),
    )


def forward_stats(
    head: Head,
    safe_targets: torch.Tensor,
    temperature: float,
    need_entropy: bool,
    chunk_size: int,
    rows,
    ref: Head | None = None,
) -> RowStats:
    """Statistics of every token (``[N]`` each), one chunk of logits at a time (1 matmul per head)."""
    n, vocab = head.hidden.shape[0], head.weight.shape[0]
    out = _empty_stats(n, head.hidden.device, need_entropy, ref is not None)
    ws = Workspace(chunk_size, vocab, head.hidden.device)
    zbuf = head.chunk_buffer(chunk_size)
    zref_buf = ref.chunk_buffer(chunk_size) if ref is not None else None
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        z = head.logits_into(start, stop, zbuf)
        z_ref = ref.logits_into(start, stop, zref_buf) if ref is not None else None
        part = rows.stats(z, safe_targets[start:stop], temperature, need_entropy, ws, z_ref=z_ref, consume=True)
        _store(out, start, stop, part)
    return out


def backward_grads(
    head: Head,
    safe_targets: torch.Tensor,
    stats: RowStats,
    temperature: float,
    coefs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    grads: GradAccumulator,
    chunk_size: int,
    rows,
    ref: Head | None = None,
    ref_grads: GradAccumulator | None = None,
) -> None:
    """Recompute each chunk's logits and accumulate the gradients of ``sum c_lp logp + c_ent H + c_kl KL``.

    ``coefs = (c_lp, c_ent, c_kl)`` are ``[N]`` float32 (``c_ent``/``c_kl`` may be None).
    """
    c_lp, c_ent, c_kl = coefs
    n, vocab = head.hidden.shape[0], head.weight.shape[0]
    ws = Workspace(chunk_size, vocab, head.hidden.device)
    zbuf = head.chunk_buffer(chunk_size)
    zref_buf = ref.chunk_buffer(chunk_size) if ref is not None else None
    pick = lambda t, a, b: None if t is None else t[a:b]
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        z = head.logits_into(start, stop, zbuf)
        z_ref = ref.logits_into(start, stop, zref_buf) if ref is not None else None
        dz, dz_ref = rows.grad(
            z, safe_targets[start:stop], _slice(stats, start, stop), temperature, c_lp[start:stop], ws,
            c_ent=pick(c_ent, start, stop), c_kl=pick(c_kl, start, stop), z_ref=z_ref,
            need_ref_grad=ref_grads is not None,
        )
        grads.add(start, stop, dz)
        if ref_grads is not None:
            ref_grads.add(start, stop, dz_ref)


CoefFn = Callable[[int, int, RowStats], tuple[torch.Tensor, torch.Tensor | None]]


def fused_pass(
    head: Head,
    safe_targets: torch.Tensor,
    temperature: float,
    need_entropy: bool,
    coef_fn: CoefFn,
    grads: GradAccumulator | None,
    chunk_size: int,
    rows,
    ref: Head | None = None,
) -> RowStats:
    """Forward and backward in one pass: per chunk, statistics, then ``(c_lp, c_kl) = coef_fn(start, stop,
    stats)``, then the gradient of ``sum c_lp logp + c_kl KL`` (skipped when ``grads`` is None)."""
    n, vocab = head.hidden.shape[0], head.weight.shape[0]
    out = _empty_stats(n, head.hidden.device, need_entropy, ref is not None)
    ws = Workspace(chunk_size, vocab, head.hidden.device)
    zbuf = head.chunk_buffer(chunk_size)
    zref_buf = ref.chunk_buffer(chunk_size) if ref is not None else None
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        z = head.logits_into(start, stop, zbuf)
        z_ref = ref.logits_into(start, stop, zref_buf) if ref is not None else None
        tgt = safe_targets[start:stop]
        part = rows.stats(z, tgt, temperature, need_entropy, ws, z_ref=z_ref, consume=grads is None)
        _store(out, start, stop, part)
        if grads is None:
            continue
        c_lp, c_kl = coef_fn(start, stop, part)
        dz, _ = rows.grad(z, tgt, part, temperature, c_lp, ws, c_kl=c_kl, z_ref=z_ref)
        grads.add(start, stop, dz)
    return out
