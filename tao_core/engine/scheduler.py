"""Requests, their sequences, and admission into the running batch under the KV-cache budget.

A request (``Group``) is one prompt with ``n`` samples. It is admitted as a whole when the cache
can hold its worst case: the prompt's blocks not already in the prefix index plus, per sample, the
blocks its completion can grow into. Those future blocks are reserved, not allocated, so a
request that finishes early gives them back, and no running sequence is ever preempted. A request
that does not fit waits in the queue (first come, first served); one that could never fit fails.

The prompt is prefilled once; its ``n`` samples then share its full blocks and each gets its own
copy of the last, partly filled block. A request aborted (or failed) in flight gives back its
blocks and its reservation at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tao_core.engine.cache import BlockKVCache, block_digests
from tao_core.types import SamplingParams

# on_token(request_id, sample index, token id, log-prob): once per sampled token, in order
TokenCallback = Callable[[int, int, int, float], None]


@dataclass
class EngineRequest:
    """A prompt as token ids with its sampling parameters; the engine knows nothing of text."""

    prompt_ids: list[int]  # tokens the model is conditioned on
    params: SamplingParams  # n, temperature, filters, max_new_tokens, stop_token_ids, seed, top_logprobs
    stop_checker: Callable[[list[int]], bool] | None = None  # sees a sample's new ids after each token
    ignore_eos: bool = False  # keep sampling past the model's EOS tokens (benchmarks)
    weight_set: str = "policy"  # the parameters it samples with: "policy" (the model's) or an added set
    on_token: TokenCallback | None = None  # streaming; if it raises, this request alone ends with an error


@dataclass
class SampleResult:
    token_ids: list[int]  # completion tokens, a final stop token included
    logprobs: list[float]  # log_softmax(logits / temperature)[token], one per token
    finish_reason: str  # "stop", "length", "abort" (engine.abort) or "error" (its request failed)
    # per token, the params.top_logprobs most likely (token id, log-prob) under the same definition
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class EngineResult:
    request_id: int
    samples: list[SampleResult] = field(default_factory=list)  # n of them unless rejected at admission
    error: str | None = None  # why this request alone was rejected or failed


@dataclass(eq=False)
class Sequence:
    """One sample being decoded: its tokens so far and the cache blocks holding their K/V."""

    group: Group
    index: int  # sample index within the request, 0..n-1
    tokens: list[int]  # prompt + generated
    blocks: list[int]  # cache blocks in order; token at position p lives in blocks[p // block_size]
    uniforms: list[float]  # this sample's random stream, one draw per new token
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # filled when asked
    reserved: int = 0  # blocks set aside for this sample's future growth
    finish_reason: str | None = None


@dataclass(eq=False)
class Group:
    """A request in flight: its prompt, its samples and its result."""

    request_id: int
    request: EngineRequest
    max_new: int  # max_new_tokens, clamped to the model's context
    stop_ids: frozenset[int]
    salt: bytes = b""  # prefix-index salt of its weight set (empty for the policy)
    seqs: list[Sequence] = field(default_factory=list)
    prompt_blocks: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # leading prompt tokens found in the prefix index (not recomputed)
    fork_blocks: list[int] = field(default_factory=list)  # partial-block copies for samples 1..n-1
    pending_reserved: int = 0  # blocks reserved for it between admission and the fork of its samples

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    def result(self, error: str | None = None) -> EngineResult:
        """The request's result from its samples so far (each ``"abort"`` if it never started)."""
        if not self.seqs:
            samples = [SampleResult([], [], "abort") for _ in range(self.params.n)]
        else:
            samples = [SampleResult(s.generated, s.logprobs, s.finish_reason or "abort", s.top_logprobs) for s in self.seqs]
        return EngineResult(self.request_id, samples, error)


class Scheduler:
    """Owns the waiting queue, the running sequences and the block accounting of one cache."""

    def __init__(self, cache: BlockKVCache, *, max_running: int) -> None:
        self.cache = cache
        self.max_running = max_running  # sequences decoded together at most
        self.waiting: deque[Group] = deque()
        self.running: list[Sequence] = []
        self.reserved = 0  # blocks promised to running sequences, not yet allocated

    def _plan(self, g: Group) -> tuple[int, int, int]:
        """(prefix blocks found in the index, blocks needed now incl. reservations, of them evictable hits)."""
        bs = self.cache.block_size
        prompt_len, n = len(g.prompt), g.params.n
        # at least the last prompt token is recomputed: its logits start the completion
        digests = block_digests(g.prompt[: prompt_len - 1], bs, g.salt)
        hits = evictable_hits = 0
        for d in digests:
            if not self.cache.would_hit(d):
                break
            hits += 1
            evictable_hits += self.cache.is_evictable(d)
        return hits, self.blocks_needed(prompt_len, n, g.max_new, bs, hits), evictable_hits

    @staticmethod
    def blocks_needed(prompt_len: int, n: int, max_new: int, block_size: int, hits: int = 0) -> int:
        """Worst-case blocks for a request: the shared full prompt blocks, then each sample's own."""
        full = prompt_len // block_size
        # the last sampled token's K/V is never written: a sample holds prompt_len + max_new - 1 tokens
        own = -(-(prompt_len + max_new - 1) // block_size) - full
        return (full - hits) + n * own

    def never_fits(self, g: Group) -> str | None:
        need = self.blocks_needed(len(g.prompt), g.params.n, g.max_new, self.cache.block_size)
        if need > self.cache.num_blocks:
            return (
                f"needs {need * self.cache.block_size} KV-cache tokens ({len(g.prompt)} prompt + "
                f"{g.params.n} x {g.max_new} new), the cache holds {self.cache.num_blocks * self.cache.block_size}; "
                f"raise max_kv_tokens or lower n / max_new_tokens"
            )
        if g.params.n > self.max_running:
            return f"n={g.params.n} exceeds max_running={self.max_running} sequences"
        return None

    def admit(self) -> list[Group]:
        """Move waiting requests into the batch while they fit; allocate their prompt blocks."""
        admitted = []
        while self.waiting:
            g = self.waiting[0]
            if len(self.running) + sum(x.params.n for x in admitted) + g.params.n > self.max_running:
                break
            hits, need, evictable_hits = self._plan(g)
            if need + evictable_hits > self.cache.num_free - self.reserved:
                break
            self.waiting.popleft()
            self._allocate(g, hits, need)
            admitted.append(g)
        return admitted

    def _allocate(self, g: Group, hits: int, need: int) -> None:
        cache, bs = self.cache, self.cache.block_size
        prompt_len, n = len(g.prompt), g.params.n
        digests = block_digests(g.prompt, bs, g.salt)
        for d in digests[:hits]:
            b = cache.lookup(d)
            assert b is not None
            g.prompt_blocks.append(b)
        for i in range(hits, -(-prompt_len // bs)):
            b = cache.new_block()
            g.prompt_blocks.append(b)
            if i < len(digests):
                cache.index(b, digests[i], g.request.weight_set)
        partial = prompt_len % bs != 0
        g.fork_blocks = [cache.new_block() for _ in range(n - 1)] if partial else []
        g.cached_tokens = hits * bs
        allocated_now = (len(digests) - hits) + (n if partial else 0)
        self.reserved += need - allocated_now
        g.pending_reserved = need - allocated_now
        cache.stats.prefix_hit_tokens += g.cached_tokens
        cache.stats.prefilled_tokens += prompt_len - g.cached_tokens

    def fork(self, g: Group, uniforms: list[list[float]]) -> list[Sequence]:
        """After the prompt's prefill: ``n`` sequences sharing its full blocks."""
        cache, bs = self.cache, self.cache.block_size
        prompt_len, full = len(g.prompt), len(g.prompt) // self.cache.block_size
        own_total = -(-(prompt_len + g.max_new - 1) // bs) - full
        seqs = []
        for j in range(g.params.n):
            if j == 0:
                blocks = list(g.prompt_blocks)
            else:
                blocks = list(g.prompt_blocks[:full])
                for b in blocks:
                    cache.retain(b)
                if prompt_len % bs:
                    dst = g.fork_blocks[j - 1]
                    cache.copy_block(g.prompt_blocks[full], dst, prompt_len % bs)
                    blocks.append(dst)
            held_own = len(blocks) - full
            seqs.append(Sequence(g, j, list(g.prompt), blocks, uniforms[j], reserved=own_total - held_own))
        g.seqs = seqs
        g.pending_reserved = 0  # now held by the samples (Sequence.reserved)
        return seqs

    def grow(self, seq: Sequence) -> None:
        """Give ``seq`` a block for its next position if it has none (from its reservation)."""
        if (len(seq.tokens) - 1) // self.cache.block_size >= len(seq.blocks):
            seq.blocks.append(self.cache.new_block())
            seq.reserved -= 1
            self.reserved -= 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark ``seq`` finished and return its blocks and reservation."""
        seq.finish_reason = reason
        for b in seq.blocks:
            self.cache.free(b)
        seq.blocks = []
        self.reserved -= seq.reserved
        seq.reserved = 0

    def stop_group(self, g: Group, reason: str) -> None:
        """Finish every unfinished sample of running request ``g`` with ``reason`` and drop them
        from the batch (the engine's abort, or its request failing). A request admitted but not yet
        forked (interrupted in its prefill) gives back its prompt blocks and reservation."""
        if not g.seqs:
            for b in [*g.prompt_blocks, *g.fork_blocks]:
                self.cache.free(b)
            g.prompt_blocks, g.fork_blocks = [], []
            self.reserved -= g.pending_reserved
            g.pending_reserved = 0
        for s in g.seqs:
            if s.finish_reason is None:
                self.finish(s, reason)
        self.running = [s for s in self.running if s.group is not g]

    def find(self, request_id: int) -> Group | None:
        """The waiting or running request with this id, or None."""
        for g in self.waiting:
            if g.request_id == request_id:
                return g
        for s in self.running:
            if s.group.request_id == request_id:
                return s.group
        return None
