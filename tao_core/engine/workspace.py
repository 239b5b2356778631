"""Decode attention over a contiguous copy of the running sequences' keys and values.

The block cache stays the record of every sequence's K/V (prefix sharing, the memory budget); the
workspace is what one decode step reads. Gathering each sequence's blocks into a padded tensor at
every step copies the whole batch's K/V once per layer per step (scenario (b) of the benchmark,
128 sequences of ~110 tokens: 2 x 11 MB per layer, 0.66 GB per step). Here each running sequence
owns a row of ``[layers, kv_heads, rows, capacity, head_dim]`` tensors holding its whole context,
filled from its blocks once when it joins the batch; a step only writes the new token's K/V to its
row (and to its block), then attends with one SDPA call over the rows' valid prefixes (no copy of the rows).

A finished sequence leaves its row empty; a sequence that joins takes an empty row. The rows are
rebuilt (every sequence gathered from its blocks again) only when a joining sequence finds no
empty row or is longer than the capacity, or when most rows are empty. Memory: one more copy of
the running sequences' K/V, ``rows x capacity x kv_bytes_per_token``; freed with the cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tao_core.engine.cache import BlockKVCache


class DecodeWorkspace:
    """Row-per-sequence K/V for decode attention; see the module docstring."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, group: int, scale: float) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.group = group  # query heads per KV head
        self.scale = scale  # softmax scale of the scores
        self.k: torch.Tensor | None = None  # [layers, kv_heads, rows, capacity, head_dim]
        self.v: torch.Tensor | None = None
        self.owner: list[object | None] = []  # row -> the sequence in it, None when empty
        self._row_of: dict[int, int] = {}  # id(sequence) -> row
        # set by prepare() for the current step
        self.rows: torch.Tensor | None = None  # [B] int64: row of each running sequence
        self.positions: torch.Tensor | None = None  # [B] int64: position of each sequence's new token
        self.slots: torch.Tensor | None = None  # [B] int64: row * capacity + position, in a layer's flat rows
        self.mask: torch.Tensor | None = None  # [1, rows, 1, span] bool: True where a key is attended
        self.span = 0  # keys read this step: the longest context, rounded up to the block size
        self.identity = False  # running sequence i sits in row i for every i, all rows used
        self.rebuilds = 0  # times every row was reloaded from the blocks
        self.reused_rows = 0  # joining sequences placed in a row left empty by a finished one

    def release(self) -> None:
        self.k = self.v = None
        self.owner, self._row_of = [], {}

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[3]

    def prepare(
        self,
        running: Sequence,
        lengths: Sequence[int],
        final_lengths: Sequence[int],
        tables: Sequence[Sequence[int]],
        cache: BlockKVCache,
    ) -> None:
        """Place every running sequence in a row (loading the K/V of those that join) for one step.

        ``lengths[i]``: context of sequence i including its new token, whose K/V this step computes;
        ``final_lengths[i]``: the most tokens it can hold; ``tables[i]``: its cache blocks.
        """
        live = {id(s) for s in running}
        for r, s in enumerate(self.owner):
            if s is not None and id(s) not in live:
                del self._row_of[id(s)]
                self.owner[r] = None
        joining = [i for i, s in enumerate(running) if id(s) not in self._row_of]
        empty = [r for r, s in enumerate(self.owner) if s is None]
        bs = cache.block_size
        need_cap = -(-max(final_lengths) // bs) * bs
        rebuild = (
            self.k is None
            or len(joining) > len(empty)
            or need_cap > self.capacity
            or 2 * len(running) < len(self.owner)
        )
        if rebuild:
            self.rebuilds += 1
            self._allocate(len(running), need_cap, cache)
            self.owner, self._row_of = list(running), {id(s): i for i, s in enumerate(running)}
            self._load(list(range(len(running))), [lengths[i] - 1 for i in range(len(running))], [tables[i] for i in range(len(running))], cache)
        elif joining:
            rows = empty[: len(joining)]
            self.reused_rows += len(rows)
            for r, i in zip(rows, joining, strict=True):
                self.owner[r] = running[i]
                self._row_of[id(running[i])] = r
            self._load(rows, [lengths[i] - 1 for i in joining], [tables[i] for i in joining], cache)
        dev = cache.device
        row_list = [self._row_of[id(s)] for s in running]
        self.identity = len(self.owner) == len(running) and row_list == list(range(len(running)))
        self.rows = torch.tensor(row_list, dtype=torch.int64, device=dev)
        self.positions = torch.tensor([n - 1 for n in lengths], dtype=torch.int64, device=dev)
        self.slots = self.rows * self.capacity + self.positions
        self.span = -(-max(lengths) // bs) * bs
        row_len = [1] * len(self.owner)  # empty rows attend to one (stale) key: no all -inf row
        for r, n in zip(row_list, lengths, strict=True):
            row_len[r] = n
        keep = torch.arange(self.span, device=dev).unsqueeze(0) < torch.tensor(row_len, device=dev).unsqueeze(1)
        self.mask = keep[None, :, None, :]

    def _allocate(self, rows: int, capacity: int, cache: BlockKVCache) -> None:
        shape = (self.num_layers, self.num_kv_heads, rows, capacity, self.head_dim)
        if self.k is None or self.k.shape != shape:
            self.k = self.v = None  # drop the old rows before the new ones exist
            self.k = torch.zeros(shape, dtype=cache.dtype, device=cache.device)  # zeros: empty rows stay finite
            self.v = torch.zeros(shape, dtype=cache.dtype, device=cache.device)

    def _load(self, rows: list[int], known: list[int], tables: list[Sequence[int]], cache: BlockKVCache) -> None:
        """Copy the first ``known[j]`` tokens of each listed sequence from its blocks into row ``rows[j]``."""
        if not rows:
            return
        bs, dev = cache.block_size, cache.device
        nb = max(1, max(-(-n // bs) for n in known))
        table = torch.tensor([list(t[:nb]) + [0] * (nb - len(t[:nb])) for t in tables], dtype=torch.int64, device=dev)
        flat = table.flatten()
        idx = torch.tensor(rows, dtype=torch.int64, device=dev)
        shape = (len(rows), nb * bs, self.num_kv_heads, self.head_dim)
        for src, dst in ((cache.k, self.k), (cache.v, self.v)):
            for layer in range(self.num_layers):
                blocks = src[layer].index_select(0, flat).view(shape).permute(2, 0, 1, 3)  # [KVH, n, nb*bs, D]
                dst[layer, :, :, : nb * bs].index_copy_(1, idx, blocks)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``[B, heads * head_dim]`` attention output of the new tokens ``q [B, H, D]``, after
        writing their ``k, v [B, KVH, D]`` to the sequences' rows."""
        wk, wv = self.k[layer], self.v[layer]  # [KVH, rows, capacity, D]
        kvh, nrows, span, d, g = self.num_kv_heads, len(self.owner), self.span, self.head_dim, self.group
        wk.view(kvh, -1, d).index_copy_(1, self.slots, k.transpose(0, 1).to(wk.dtype))
        wv.view(kvh, -1, d).index_copy_(1, self.slots, v.transpose(0, 1).to(wv.dtype))
        bsz = q.shape[0]
        qh = q.to(wk.dtype).view(bsz, kvh, g, d).transpose(0, 1)  # [KVH, B, G, D]
        if not self.identity:
            qh = torch.zeros((kvh, nrows, g, d), dtype=wk.dtype, device=q.device).index_copy_(1, self.rows, qh)
        # batch = KV heads, "heads" = rows: each row's G query heads attend to its own keys
        out = F.scaled_dot_product_attention(qh, wk[:, :, :span], wv[:, :, :span], attn_mask=self.mask, scale=self.scale)
        if not self.identity:
            out = out.index_select(1, self.rows)
        return out.transpose(0, 1).reshape(bsz, kvh * g * d).to(q.dtype)
