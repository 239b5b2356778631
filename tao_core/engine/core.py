"""The engine loop on token ids: admit requests, prefill them, decode every running sequence.

Each :meth:`Engine.step` admits what fits, prefills the admitted prompts in one packed forward,
then decodes one token for every running sequence in one batched forward, and reads the sampled
tokens and log-probs back to the host once. Requests join and leave the batch at every step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from tao_core.engine.cache import BlockKVCache, kv_bytes_per_token
from tao_core.engine.runner import LlamaRunner, PrefillSeq, decode_batch
from tao_core.engine.sampling import SamplingBatch, sample
from tao_core.engine.scheduler import EngineRequest, EngineResult, Group, SampleResult, Scheduler, Sequence
from tao_core.errors import TaoInputError
from tao_core.onednn import k_major_linears

_GOLDEN = 0x9E3779B97F4A7C15  # spreads the per-sample seeds of one request apart


@dataclass
class EngineConfig:
    """Engine settings; the same names as the ``[engine]`` table of the TOML config."""

    max_kv_tokens: int | None = None  # KV-cache capacity in tokens; None: 25% of free memory, at most 32,768 on CPU
    block_size: int = 16  # tokens per cache block; prefixes are shared in whole blocks
    max_running: int = 256  # sequences decoded together at most
    max_prefill_tokens: int = 4096  # new prompt tokens per prefill forward (one prompt always goes in)
    k_major_weights: bool = True  # float32 CPU: store Linear weights K-major once (tao_core.onednn.k_major_linears)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


def weights_version(model: torch.nn.Module) -> int:
    """Changes whenever a parameter is modified in place (optimizer step) or replaced."""
    return hash(tuple((p.data_ptr(), p._version) for p in model.parameters()))


class Engine:
    """Continuous-batching engine over a Llama-family model's live parameters."""

    def __init__(self, model: torch.nn.Module, *, eos_token_ids: Seq[int], config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.runner = LlamaRunner(model)
        if self.config.k_major_weights:
            k_major_linears(model)  # float32 CPU Linear weights, when oneDNN is used; others are left as they are
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        r = self.runner
        per_token = kv_bytes_per_token(r.num_layers, r.num_kv_heads, r.head_dim, r.param_dtype)
        tokens = self.config.max_kv_tokens
        if tokens is None:
            cap = 32768 if r.device.type == "cpu" else 1 << 20
            tokens = min(cap, free_memory_bytes(r.device) // 4 // per_token)
        bs = self.config.block_size
        self.cache = BlockKVCache(
            num_layers=r.num_layers,
            num_kv_heads=r.num_kv_heads,
            head_dim=r.head_dim,
            block_size=bs,
            num_blocks=max(1, tokens // bs),
            dtype=r.param_dtype,
            device=r.device,
        )
        self.scheduler = Scheduler(self.cache, max_running=self.config.max_running)
        self._weights_version: int | None = None
        self._next_id = 0
        self._done: dict[int, EngineResult] = {}

    # public API -------------------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> int:
        """Queue a request; a bad one is answered at once with an error result, others are unaffected."""
        rid = self._next_id
        self._next_id += 1
        try:
            g = self._make_group(rid, request)
        except TaoInputError as e:
            self._done[rid] = EngineResult(rid, error=str(e))
            return rid
        problem = self.scheduler.never_fits(g)
        if problem:
            self._done[rid] = EngineResult(rid, error=f"request {rid}: {problem}")
            return rid
        self.scheduler.waiting.append(g)
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def step(self) -> list[EngineResult]:
        """Admit, prefill, decode one token for every running sequence; return finished requests."""
        with torch.inference_mode():
            self.cache.allocate()
            self._check_weights()
            admitted = self.scheduler.admit()
            if not admitted and not self.scheduler.running and self.scheduler.waiting:
                raise RuntimeError("the engine cannot admit any request although nothing is running")
            budget = self.config.max_prefill_tokens
            batch: list[Group] = []
            for g in admitted:
                new = len(g.prompt) - g.cached_tokens
                if batch and new > budget:
                    self._prefill(batch)
                    batch, budget = [], self.config.max_prefill_tokens
                batch.append(g)
                budget -= new
            if batch:
                self._prefill(batch)
            if self.scheduler.running:
                self._decode()
        done, self._done = list(self._done.values()), {}
        return done

    def run(self, requests: Seq[EngineRequest]) -> list[EngineResult]:
        """Run ``requests`` to completion; results in the same order."""
        was_training = self.model.training
        self.model.eval()  # no dropout (e.g. LoRA's) while sampling
        try:
            ids = [self.add_request(r) for r in requests]
            results: dict[int, EngineResult] = {}
            while self.has_unfinished():
                results.update((r.request_id, r) for r in self.step())
            results.update(self._done)
            self._done = {}
            return [results[i] for i in ids]
        finally:
            self.model.train(was_training)

    def release_cache(self) -> None:
        """Free the KV-cache memory (e.g. for a training step); the next step allocates it again."""
        if self.has_unfinished():
            raise RuntimeError("cannot release the KV cache while requests are running")
        self.cache.release()

    # internals --------------------------------------------------------------------------------
    def _make_group(self, rid: int, req: EngineRequest) -> Group:
        p = req.params
        p.validate()
        prompt = req.prompt_ids
        where = f"request {rid}"
        if len(prompt) == 0:
            raise TaoInputError(f"{where}: empty prompt (no tokens)")
        vocab = self.runner.vocab_size
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise TaoInputError(f"{where}: prompt token ids outside [0, {vocab}): {bad[:5]}")
        if len(prompt) >= self.runner.max_positions:
            raise TaoInputError(
                f"{where}: prompt of {len(prompt)} tokens does not fit the model's context of "
                f"{self.runner.max_positions} tokens; shorten it"
            )
        bad = [t for t in p.stop_token_ids if t >= vocab]
        if bad:
            raise TaoInputError(f"{where}: stop_token_ids outside the vocabulary of {vocab}: {bad}")
        max_new = min(p.max_new_tokens, self.runner.max_positions - len(prompt))
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if req.ignore_eos else self.eos_token_ids)
        return Group(rid, req, max_new, stop_ids)

    def _check_weights(self) -> None:
        version = weights_version(self.model)
        if version != self._weights_version:
            self.cache.invalidate()
            self._weights_version = version

    def _uniforms(self, g: Group) -> list[list[float]]:
        seed = g.params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        out = []
        for j in range(g.params.n):
            gen = torch.Generator().manual_seed((seed + j * _GOLDEN) % 2**64)
            out.append(torch.rand(g.max_new, generator=gen).tolist())
        return out

    def _sampling_batch(self, rows: list[tuple[Sequence | Group, int, list[float]]]) -> SamplingBatch:
        params = [(x.group if isinstance(x, Sequence) else x).params for x, _, _ in rows]
        return SamplingBatch.build(
            temperature=[float(p.temperature) for p in params],
            top_k=[p.top_k for p in params],
            top_p=[float(p.top_p) for p in params],
            min_p=[float(p.min_p) for p in params],
            uniform=[u[step] for _, step, u in rows],
            device=self.runner.device,
        )

    def _prefill(self, groups: list[Group]) -> None:
        bs = self.cache.block_size
        ids, pos, slots, seqs = [], [], [], []
        for g in groups:
            start, prompt = g.cached_tokens, g.prompt
            ids.extend(prompt[start:])
            pos.extend(range(start, len(prompt)))
            slots.extend(g.prompt_blocks[p // bs] * bs + p % bs for p in range(start, len(prompt)))
            seqs.append(PrefillSeq(start, len(prompt) - start, torch.tensor(g.prompt_blocks, device=self.runner.device)))
        dev = self.runner.device
        as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=dev)  # noqa: E731
        hidden = self.runner.forward(as_t(ids), as_t(pos), as_t(slots), self.cache, self.runner.prefill_attend(self.cache, seqs))
        last = torch.tensor([0] + [s.length for s in seqs], device=dev).cumsum(0)[1:] - 1
        logits = self.runner.logits(hidden[last])  # [groups, vocab]
        rows, row_of = [], []
        uniforms = [self._uniforms(g) for g in groups]
        for gi, g in enumerate(groups):
            for j in range(g.params.n):
                rows.append((g, 0, uniforms[gi][j]))
                row_of.append(gi)
        tokens, logprobs = sample(logits[torch.tensor(row_of, device=dev)], self._sampling_batch(rows))
        tok_list, lp_list = _to_host(tokens, logprobs)
        r = 0
        for gi, g in enumerate(groups):
            for seq in self.scheduler.fork(g, uniforms[gi]):
                if not self._append(seq, tok_list[r], lp_list[r]):
                    self.scheduler.running.append(seq)
                r += 1

    def _decode(self) -> None:
        sched, bs = self.scheduler, self.cache.block_size
        running = sched.running
        for s in running:
            sched.grow(s)
        lengths = [len(s.tokens) for s in running]  # context incl. the new token
        dev = self.runner.device
        ids = torch.tensor([s.tokens[-1] for s in running], dtype=torch.int64, device=dev)
        pos_list = [n - 1 for n in lengths]
        slots = torch.tensor([s.blocks[p // bs] * bs + p % bs for s, p in zip(running, pos_list, strict=True)], device=dev)
        pos = torch.tensor(pos_list, dtype=torch.int64, device=dev)
        # samples of one request decoded together share its full prompt blocks: cascade attention on
        # the PyTorch path; the native kernel reads them in place (they are adjacent in the batch)
        gathered = not self.runner.native_decode(self.cache)
        count: dict[int, int] = {}
        for s in running:
            count[id(s.group)] = count.get(id(s.group), 0) + 1
        shared = [len(s.group.prompt) // bs if gathered and count[id(s.group)] > 1 else 0 for s in running]
        batch = decode_batch(
            [s.blocks for s in running], lengths, [id(s.group) for s in running], shared, bs, self.cache.dtype, dev,
            gathered=gathered,
        )
        hidden = self.runner.forward(ids, pos, slots, self.cache, self.runner.decode_attend(self.cache, batch))
        rows = [(s, len(s.generated), s.uniforms) for s in running]
        tokens, logprobs = sample(self.runner.logits(hidden), self._sampling_batch(rows))
        tok_list, lp_list = _to_host(tokens, logprobs)
        sched.running = [s for s, t, lp in zip(running, tok_list, lp_list, strict=True) if not self._append(s, t, lp)]

    def _append(self, seq: Sequence, token: int, logprob: float) -> bool:
        """Record a sampled token; finish the sequence (and maybe its request) if it stops; True then."""
        g = seq.group
        seq.tokens.append(token)
        seq.generated.append(token)
        seq.logprobs.append(logprob)
        if token in g.stop_ids:
            reason = "stop"
        elif g.request.stop_checker is not None and g.request.stop_checker(seq.generated):
            reason = "stop"
        elif len(seq.generated) >= g.max_new:
            reason = "length"
        else:
            return False
        self.scheduler.finish(seq, reason)
        if all(s.finish_reason is not None for s in g.seqs):
            self._done[g.request_id] = EngineResult(
                g.request_id, [SampleResult(s.generated, s.logprobs, s.finish_reason) for s in g.seqs]
            )
        return True


def _to_host(tokens: torch.Tensor, logprobs: torch.Tensor) -> tuple[list[int], list[float]]:
    """The step's one host synchronization: tokens and log-probs in one transfer."""
    both = torch.stack([tokens.double(), logprobs.double()]).tolist()
    return [int(t) for t in both[0]], both[1]
