"""Block KV cache: preallocated key/value tensors, a block allocator with reference counts, and a
prefix index so that sequences starting with the same tokens share the blocks holding them.

Memory arithmetic: one cached token costs ``2 (K and V) * layers * kv_heads * head_dim * bytes``;
SmolLM2-135M in fp32 is ``2 * 30 * 3 * 64 * 4 = 46,080`` bytes per token, so 32,768 tokens take
1.4 GiB. The tensors are allocated once (``allocate``) and freed on request (``release``), e.g. so
a training step on the same GPU can use the memory; the engine allocates them again when needed.

A full block of prompt tokens is indexed by a digest of every token up to its end, so a block is
found again only for the exact same prefix. Blocks nobody references stay indexed (evictable, least
recently used first) until the memory is needed or the model's weights change (``invalidate``).
Each indexed block belongs to the weight set whose forward computed it: the digests of a set other
than the policy start from a salt (its name), so two sets never share a block, and one set's
blocks can be forgotten alone (``invalidate(owner)``) when its tensors change.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one token occupies across all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def block_digests(token_ids: Sequence[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """Chained digests of the full blocks of ``token_ids``: digest i covers tokens [0, (i+1)*block_size)
    and the ``salt`` (a weight set's; empty for the policy)."""
    out, parent = [], salt
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(",".join(map(str, token_ids[start : start + block_size])).encode())
        parent = h.digest()
        out.append(parent)
    return out


@dataclass
class CacheStats:
    """Counters since the cache was built; the tests and the benchmark read them."""

    prefix_hit_tokens: int = 0  # prompt tokens whose KV was found in the prefix index (not recomputed)
    prefilled_tokens: int = 0  # prompt tokens whose KV was computed
    invalidations: int = 0  # times the prefix index (or one weight set's part of it) was dropped: weights changed
    evictions: int = 0  # indexed blocks reused for other data


class BlockKVCache:
    """``k`` and ``v``: ``[layers, num_blocks, block_size, kv_heads, head_dim]``, plus block bookkeeping."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs at least one block of at least one token, got {num_blocks} x {block_size}")
        self.shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        self.device = torch.device(device)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.stats = CacheStats()
        self._reset_bookkeeping()

    def _reset_bookkeeping(self) -> None:
        self.refcount = [0] * self.num_blocks
        self._free: deque[int] = deque(range(self.num_blocks))  # unreferenced, not indexed
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced, indexed; LRU first
        self._digest_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._owner_of: dict[int, str] = {}  # indexed block -> the weight set whose forward wrote it

    # memory -----------------------------------------------------------------------------------
    @property
    def allocated(self) -> bool:
        return self.k is not None

    @property
    def nbytes(self) -> int:
        return 2 * self.num_blocks * self.block_size * self.shape[0] * self.shape[3] * self.shape[4] * (
            torch.empty((), dtype=self.dtype).element_size()
        )

    def allocate(self) -> None:
        """Allocate the K/V tensors (no-op when allocated); the prefix index starts empty."""
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self.v = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
            self._reset_bookkeeping()

    def release(self) -> None:
        """Free the K/V tensors; only valid while no sequence holds a block."""
        if any(self.refcount):
            raise RuntimeError("cannot release the KV cache while sequences still hold blocks")
        self.k = self.v = None
        self._reset_bookkeeping()

    # blocks -----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_indexed(self) -> int:
        """Blocks currently findable by prefix digest."""
        return len(self._block_of)

    def new_block(self) -> int:
        """A block with reference count 1; evicts the least recently used indexed block if needed."""
        if self._free:
            b = self._free.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            del self._block_of[self._digest_of.pop(b)]
            del self._owner_of[b]
            self.stats.evictions += 1
        else:
            raise RuntimeError("KV cache out of blocks (the scheduler should have prevented this)")
        self.refcount[b] = 1
        return b

    def retain(self, block: int) -> None:
        self.refcount[block] += 1

    def free(self, block: int) -> None:
        """Drop one reference; an unreferenced block stays findable if it is indexed."""
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self._digest_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def lookup(self, digest: bytes) -> int | None:
        """The block indexed under ``digest``, retained for the caller; None if absent."""
        b = self._block_of.get(digest)
        if b is None:
            return None
        if self.refcount[b] == 0:
            del self._evictable[b]
        self.refcount[b] += 1
        return b

    def would_hit(self, digest: bytes) -> bool:
        return digest in self._block_of

    def is_evictable(self, digest: bytes) -> bool:
        b = self._block_of.get(digest)
        return b is not None and self.refcount[b] == 0

    def index(self, block: int, digest: bytes, owner: str = "policy") -> None:
        """Make ``block`` findable under ``digest`` (its KV must be written in the same forward by
        weight set ``owner``)."""
        if digest in self._block_of or block in self._digest_of:
            return
        self._block_of[digest] = block
        self._digest_of[block] = digest
        self._owner_of[block] = owner

    def invalidate(self, owner: str | None = None) -> None:
        """Forget the indexed prefixes of weight set ``owner`` (None: of every set) because its
        weights changed; referenced blocks stay in use."""
        if owner is None:
            if self._block_of:
                self.stats.invalidations += 1
            self._free.extend(self._evictable)
            self._evictable.clear()
            self._block_of.clear()
            self._digest_of.clear()
            self._owner_of.clear()
            return
        blocks = [b for b, o in self._owner_of.items() if o == owner]
        if blocks:
            self.stats.invalidations += 1
        for b in blocks:
            del self._block_of[self._digest_of.pop(b)], self._owner_of[b]
            if b in self._evictable:
                del self._evictable[b]
                self._free.append(b)

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy the first ``num_tokens`` slots of block ``src`` into ``dst`` in every layer."""
        self.k[:, dst, :num_tokens] = self.k[:, src, :num_tokens]
        self.v[:, dst, :num_tokens] = self.v[:, src, :num_tokens]
