"""The chunk loops shared by every backend: stream the LM head without ever holding ``[N, V]`` logits.

Forward (statistics): token chunks of ``C`` rows, each against the whole vocabulary (a row's
log-sum-exp needs all of it). Backward (gradients, once the per-row statistics are known): vocabulary
slices of ``S`` columns, each against all ``N`` tokens, so ``grad_weight[slice] = dz^T h`` is one
matmul written once (no ``[V, H]`` accumulator, ``W`` read once) and only the small ``[N, H]``
``grad_hidden`` accumulates (in float32). A scalar loss whose per-token coefficients are known once a
chunk's statistics are (the policy loss with token-level ratios) does forward and backward in one
token-chunk pass instead, accumulating ``grad_weight`` in float32.

Memory arithmetic: the naive path holds ``[N, V]`` float32 logits several times over (the logits, the
log-softmax saved for backward, and in backward their gradient): at N=4096, V=49152 that is 805 MB
each, 2.3 GB at peak. Here one block of logits exists at a time, ``C x V`` or ``N x S`` with about
``CHUNK_ELEMENTS`` elements (16 Mi on the CPU; 256 Mi on a GPU, where 5% of the naive peak is
gigabytes), in the input dtype, and its gradient is written over it; the CPU path adds float32
scratch buffers of the same size (the log-softmax in the forward, one more for the entropy;
``_rows.Workspace``). On the CPU, C = 336 at V=49152 (128 at V=128256) and S = 3968 at N=4096. The
gradients themselves (``[N, H]`` and ``[V, H]``) are the only other allocations: 190 MB at peak in
all for the example (measured), against 2.3 GB.

Matmuls: forward 1 (``z = h W^T``), backward 3 (recompute ``z``, ``dz W``, ``dz^T h``); the one-pass
policy loss 3 in all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._rows import RowStats, Workspace

CHUNK_ELEMENTS = 1 << 24  # CPU: 64 MB float32 blocks, under 10% of the naive path's peak with the grads
CUDA_CHUNK_ELEMENTS = 1 << 28  # GPU: 512 MB bf16 blocks, large enough to keep the matmuls efficient


def default_chunk_size(n_tokens: int, vocab: int, device: torch.device | None = None) -> int:
    """Token rows per forward chunk: ``C * V`` about ``CHUNK_ELEMENTS`` (a multiple of 16 when > 16)."""
    budget = CUDA_CHUNK_ELEMENTS if device is not None and device.type == "cuda" else CHUNK_ELEMENTS
    rows = max(1, budget // max(vocab, 1))
    if rows > 16:
        rows -= rows % 16
    return max(1, min(n_tokens, rows))


def slice_size(n_tokens: int, vocab: int, chunk_rows: int) -> int:
    """Vocabulary columns per backward slice: as many elements as a forward chunk (multiple of 128)."""
    cols = max(1, (chunk_rows * vocab) // max(n_tokens, 1))
    if cols > 128:
        cols -= cols % 128
    return max(1, min(vocab, cols))


@dataclass
class Head:
    """One LM head's inputs: ``hidden [N, H]``, ``weight [V, H]``, optional ``bias [V]``."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def buffer(self, elements: int) -> torch.Tensor:
        return torch.empty(elements, dtype=self.hidden.dtype, device=self.hidden.device)

    def token_logits(self, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Raw logits ``[stop - start, V]`` of tokens ``start:stop`` (input dtype), written into ``buf``."""
        z = buf[: (stop - start) * self.weight.shape[0]].view(stop - start, -1)
        torch.mm(self.hidden[start:stop], self.weight.t(), out=z)
        if self.bias is not None:
            z.add_(self.bias)
        return z

    def vocab_logits(self, start: int, stop: int, buf: torch.Tensor) -> torch.Tensor:
        """Raw logits ``[N, stop - start]`` of vocabulary columns ``start:stop``, written into ``buf``."""
        z = buf[: self.hidden.shape[0] * (stop - start)].view(self.hidden.shape[0], stop - start)
        torch.mm(self.hidden, self.weight[start:stop].t(), out=z)
        if self.bias is not None:
            z.add_(self.bias[start:stop])
        return z


def _wanted(flags: tuple[bool, bool, bool], head: Head) -> tuple[bool, bool, bool]:
    return flags[0], flags[1], flags[2] and head.bias is not None


class SliceGrads:
    """Gradients of one head from vocabulary slices of ``dL/dz`` (``[N, S]``).

    ``grad_weight[s] = dz^T h`` and ``grad_bias[s] = sum_rows dz`` are written once per slice (one
    rounding to the input dtype, as in the naive path); ``grad_hidden += dz W[s]`` accumulates in float32.
    """

    def __init__(self, head: Head, needs: tuple[bool, bool, bool]) -> None:
        self.head = head
        h, w = head.hidden, head.weight
        need_h, need_w, need_b = _wanted(needs, head)
        self.grad_hidden = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        self.grad_weight = torch.empty_like(w) if need_w else None
        self.grad_bias = torch.empty_like(head.bias) if need_b else None
        self._hidden32 = None

    def add(self, start: int, stop: int, dz: torch.Tensor) -> None:
        h, w_s = self.head.hidden, self.head.weight[start:stop]
        if self.grad_hidden is not None:
            if dz.dtype == torch.float32:
                self.grad_hidden.addmm_(dz, w_s.float())
            else:
                self.grad_hidden.add_(torch.mm(dz, w_s.to(dz.dtype)))
        if self.grad_weight is not None:
            if dz.dtype == h.dtype:
                torch.mm(dz.t(), h, out=self.grad_weight[start:stop])
            else:
                if self._hidden32 is None:
                    self._hidden32 = h.to(dz.dtype)
                self.grad_weight[start:stop] = torch.mm(dz.t(), self._hidden32)
        if self.grad_bias is not None:
            self.grad_bias[start:stop] = dz.sum(dim=0, dtype=torch.float32)

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        gh = self.grad_hidden.to(self.head.hidden.dtype) if self.grad_hidden is not None else None
        return gh, self.grad_weight, self.grad_bias


class TokenGrads:
    """Gradients of one head from token chunks of ``dL/dz`` (``[C, V]``), for the one-pass losses.

    ``grad_hidden[c] = dz W`` is written once per chunk; ``grad_weight += dz^T h_c`` and ``grad_bias``
    accumulate in float32 and are cast to the input dtype at the end.
    """

    def __init__(self, head: Head, needs: tuple[bool, bool, bool]) -> None:
        self.head = head
        h, w = head.hidden, head.weight
        need_h, need_w, need_b = _wanted(needs, head)
        self.grad_hidden = torch.empty_like(h) if need_h else None
        self.grad_weight = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        self.grad_bias = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None

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


def forward_stats(
    head: Head,
    safe_targets: torch.Tensor,
    temperature: float,
    need_entropy: bool,
    chunk_size: int,
    rows,
    ref: Head | None = None,
) -> RowStats:
    """Statistics of every token (``[N]`` each), one token chunk of logits at a time (1 matmul per head)."""
    n, vocab = head.hidden.shape[0], head.weight.shape[0]
    out = _empty_stats(n, head.hidden.device, need_entropy, ref is not None)
    ws = Workspace(chunk_size * vocab, head.hidden.device)
    zbuf = head.buffer(chunk_size * vocab)
    zref_buf = ref.buffer(chunk_size * vocab) if ref is not None else None
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        z = head.token_logits(start, stop, zbuf)
        z_ref = ref.token_logits(start, stop, zref_buf) if ref is not None else None
        part = rows.stats(z, safe_targets[start:stop], temperature, need_entropy, ws, z_ref=z_ref, consume=True)
        _store(out, start, stop, part)
    return out


def backward_grads(
    head: Head,
    safe_targets: torch.Tensor,
    stats: RowStats,
    temperature: float,
    coefs: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],
    grads: SliceGrads,
    chunk_size: int,
    rows,
    ref: Head | None = None,
    ref_grads: SliceGrads | None = None,
) -> None:
    """Recompute the logits slice by slice and build the gradients of ``sum c_lp logp + c_ent H + c_kl KL``.

    ``coefs = (c_lp, c_ent, c_kl)`` are ``[N]`` float32 (``c_ent``/``c_kl`` may be None); ``stats``
    holds every row's statistics from the forward.
    """
    c_lp, c_ent, c_kl = coefs
    n, vocab = head.hidden.shape[0], head.weight.shape[0]
    cols = slice_size(n, vocab, chunk_size)
    ws = Workspace(n * cols, head.hidden.device)
    zbuf = head.buffer(n * cols)
    zref_buf = ref.buffer(n * cols) if ref is not None else None
    for start in range(0, vocab, cols):
        stop = min(vocab, start + cols)
        z = head.vocab_logits(start, stop, zbuf)
        z_ref = ref.vocab_logits(start, stop, zref_buf) if ref is not None else None
        dz, dz_ref = rows.grad(
            z, safe_targets, stats, temperature, c_lp, ws, c_ent=c_ent, c_kl=c_kl, z_ref=z_ref,
            need_ref_grad=ref_grads is not None, col_offset=start,
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
    grads: TokenGrads | None,
    chunk_size: int,
    rows,
    ref: Head | None = None,
) -> RowStats:
    """Forward and backward in one pass: per chunk, statistics, then ``(c_lp, c_kl) = coef_fn(start, stop,
    stats)``, then the gradient of ``sum c_lp logp + c_kl KL`` (skipped when ``grads`` is None)."""
    n, vocab = head.hidden.shape[0], head.weight.shape[0]
    out = _empty_stats(n, head.hidden.device, need_entropy, ref is not None)
    ws = Workspace(chunk_size * vocab, head.hidden.device)
    zbuf = head.buffer(chunk_size * vocab)
    zref_buf = ref.buffer(chunk_size * vocab) if ref is not None else None
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        z = head.token_logits(start, stop, zbuf)
        z_ref = ref.token_logits(start, stop, zref_buf) if ref is not None else None
        tgt = safe_targets[start:stop]
        part = rows.stats(z, tgt, temperature, need_entropy, ws, z_ref=z_ref, consume=grads is None)
        _store(out, start, stop, part)
        if grads is None:
            continue
        c_lp, c_kl = coef_fn(start, stop, part)
        dz, _ = rows.grad(z, tgt, part, temperature, c_lp, ws, c_kl=c_kl, z_ref=z_ref)
        grads.add(start, stop, dz)
    return out
