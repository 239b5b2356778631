"""The engine loop on token ids: admit requests, prefill them, decode every running sequence.

Each :meth:`Engine.step` admits what fits, prefills the admitted prompts in packed forwards, then
decodes one token for every running sequence in one batched forward per weight set, and reads the
sampled tokens and log-probs (and any top log-probs asked for) back to the host once. Requests
join and leave the batch at every step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tao_core.engine.cache import BlockKVCache, kv_bytes_per_token
from tao_core.engine.runner import LlamaRunner, PrefillSeq, decode_batch
from tao_core.engine.sampling import SamplingBatch, sample, top_logprobs
from tao_core.engine.scheduler import EngineRequest, EngineResult, Group, Scheduler, Sequence
from tao_core.engine.weights import POLICY, WeightSet, make_weight_set, swapped_in
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
    pack_weights: bool = False  # float32 CPU: multiply by oneDNN-packed copies of the Linear weights (tao_core.engine.linear)


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
    """Continuous-batching engine over a Llama-family model's live parameters.

    One thread adds, aborts and steps (the engine is not thread-safe: a server runs the step loop
    in one thread and hands it requests and aborts through a queue).
    """

    def __init__(self, model: torch.nn.Module, *, eos_token_ids: Seq[int], config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.model = model
        self.runner = LlamaRunner(model, pack_weights=self.config.pack_weights)
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
        self._weight_sets: dict[str, WeightSet] = {}
        self._set_versions: dict[str, int] = {}
        self._next_id = 0
        self._groups: dict[int, Group] = {}  # requests in flight (waiting or running) by id
        self._done: dict[int, EngineResult] = {}
        self._draining = False
        self._in_step = False
        self._pending_aborts: list[int] = []  # asked for during a step (from a callback), applied after it

    # requests ---------------------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> int:
        """Queue a request; a bad one is answered at once with an error result, others are unaffected."""
        rid = self._next_id
        self._next_id += 1
        if self._draining:
            self._done[rid] = EngineResult(rid, error=f"request {rid}: engine is draining (resume_admission() accepts again)")
            return rid
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
        self._groups[rid] = g
        return rid

    def abort(self, request_id: int) -> bool:
        """Stop a waiting or running request now: its cache blocks and reservation are freed and its
        result (``finish_reason`` ``"abort"``, the tokens sampled so far) comes with the next
        :meth:`step`. False when no such request is in flight. Called from an ``on_token`` callback,
        it takes effect at the end of the current step."""
        if request_id not in self._groups:
            return False
        if self._in_step:
            self._pending_aborts.append(request_id)
        else:
            self._stop(self._groups[request_id], "abort")
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    def run(self, requests: Seq[EngineRequest]) -> list[EngineResult]:
        """Run ``requests`` to completion; results in the same order (others finishing meanwhile
        stay for the next :meth:`step`)."""
        with self._eval_mode():
            ids = [self.add_request(r) for r in requests]
            results: dict[int, EngineResult] = {}
            while self.has_unfinished():
                results.update((r.request_id, r) for r in self.step())
            results.update(self._done)
            wanted = set(ids)
            self._done = {i: r for i, r in results.items() if i not in wanted}
            return [results[i] for i in ids]

    # drain ------------------------------------------------------------------------------------
    def start_drain(self) -> None:
        """Refuse new requests from now on (each is answered with an error result); requests in
        flight, waiting ones included, finish normally. ``has_unfinished()`` says when none is left."""
        self._draining = True

    def drain(self) -> list[EngineResult]:
        """:meth:`start_drain`, then step until nothing is in flight; the results finished meanwhile."""
        self.start_drain()
        out: list[EngineResult] = []
        with self._eval_mode():
            while self.has_unfinished():
                out += self.step()
        return out + self._take_done()

    def resume_admission(self) -> None:
        """Accept requests again after :meth:`start_drain` or :meth:`drain`."""
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    # weight sets ------------------------------------------------------------------------------
    def weights_changed(self) -> None:
        """Say that weights changed in a way PyTorch's version counters do not record (a fused optimizer
        step on CPU, buffers swapped in with ``param.data = ...``, writes through ``param.data`` or numpy):
        cached prompt prefixes and packed weight copies are dropped. In-place ops, ``copy_``,
        ``load_state_dict`` and non-fused optimizers need no call."""
        self.cache.invalidate()
        clear = getattr(self.runner.linear, "clear", None)
        if clear is not None:
            clear()

    def add_weight_set(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Add weight set ``name``: ``tensors`` maps parameter names (as in ``model.named_parameters()``)
        to the tensors that replace them; every other parameter is the policy's, shared. The tensors
        are held, not copied: modify them in place (an EMA step) and the set's cached prefixes are
        dropped at the next step."""
        if name in self._weight_sets:
            raise TaoInputError(f"weight set {name!r} exists; remove_weight_set({name!r}) first, or update its tensors in place")
        ws = make_weight_set(self.model, name, tensors)
        self._weight_sets[name] = ws
        self._set_versions[name] = ws.version()

    def remove_weight_set(self, name: str) -> None:
        """Remove weight set ``name`` and its cached prefixes; refused while a request uses it."""
        if name not in self._weight_sets:
            raise TaoInputError(f"no weight set {name!r}; the engine has {', '.join(self.weight_sets)}")
        users = [rid for rid, g in self._groups.items() if g.request.weight_set == name]
        if users:
            raise TaoInputError(f"weight set {name!r} is used by requests {users[:5]} in flight; abort them or let them finish")
        del self._weight_sets[name], self._set_versions[name]
        self.cache.invalidate(name)

    @property
    def weight_sets(self) -> list[str]:
        return [POLICY, *self._weight_sets]

    # the step ---------------------------------------------------------------------------------
    def step(self) -> list[EngineResult]:
        """Admit, prefill, decode one token for every running sequence; return finished requests."""
        self._in_step = True
        try:
            with torch.inference_mode():
                self.cache.allocate()
                self._check_weights()
                admitted = self.scheduler.admit()
                if not admitted and not self.scheduler.running and self.scheduler.waiting:
                    raise RuntimeError("the engine cannot admit any request although nothing is running")
                for name, groups in self._by_set(admitted, lambda g: g.request.weight_set):
                    with swapped_in(self.model, self._weight_sets.get(name)):
                        self._prefill_chunks(groups)
                if self.scheduler.running:
                    self._decode()
        except BaseException as e:  # an interrupt or a cancellation mid-step: keep the engine usable
            self._in_step = False
            self._abort_all(f"the engine step was interrupted ({type(e).__name__}); request aborted")
            raise
        finally:
            self._in_step = False
        for rid in self._pending_aborts:
            if rid in self._groups:
                self._stop(self._groups[rid], "abort")
        self._pending_aborts = []
        return self._take_done()

    def release_cache(self) -> None:
        """Free the KV-cache memory (e.g. for a training step); the next step allocates it again."""
        if self.has_unfinished():
            raise RuntimeError("cannot release the KV cache while requests are running")
        self.cache.release()

    # internals --------------------------------------------------------------------------------
    def _take_done(self) -> list[EngineResult]:
        done, self._done = list(self._done.values()), {}
        return done

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()  # no dropout (e.g. LoRA's) while sampling
        try:
            yield
        finally:
            self.model.train(was_training)

    def _by_set(self, items: list, weight_set: Callable[[Any], str]) -> list[tuple[str, list]]:
        """``items`` split by weight set, order kept within each; one part when only the policy exists."""
        if not self._weight_sets:
            return [(POLICY, items)] if items else []
        parts: dict[str, list] = {}
        for x in items:
            parts.setdefault(weight_set(x), []).append(x)
        return list(parts.items())

    def _abort_all(self, error: str) -> None:
        """End every request in flight with ``error`` and free everything it holds: after an
        exception inside a step, no half-made state (a sample without its token) survives."""
        for g in list(self._groups.values()):
            self._stop(g, "abort", error)
        self._pending_aborts = []
        self.cache.invalidate()  # a prefill cut short leaves indexed prompt blocks without their K/V

    def _stop(self, g: Group, reason: str, error: str | None = None) -> None:
        """End request ``g`` now (abort or failure): free what it holds, record its result."""
        if g in self.scheduler.waiting:
            self.scheduler.waiting.remove(g)
        else:
            self.scheduler.stop_group(g, reason)
        del self._groups[g.request_id]
        self._done[g.request_id] = g.result(error)

    def _make_group(self, rid: int, req: EngineRequest) -> Group:
        p = req.params
        p.validate()
        prompt = req.prompt_ids
        where = f"request {rid}"
        if req.weight_set != POLICY and req.weight_set not in self._weight_sets:
            raise TaoInputError(f"{where}: unknown weight set {req.weight_set!r}; the engine has {', '.join(self.weight_sets)}")
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
        ws = self._weight_sets.get(req.weight_set)
        return Group(rid, req, max_new, stop_ids, ws.salt if ws is not None else b"")

    def _check_weights(self) -> None:
        """Drop cached prefixes computed under weights that changed since: every set's when the
        policy changed (sets share its other parameters), one set's when its own tensors did."""
        version = weights_version(self.model)
        if version != self._weights_version:
            self.cache.invalidate()
            self._weights_version = version
        for name, ws in self._weight_sets.items():
            v = ws.version()
            if v != self._set_versions[name]:
                self.cache.invalidate(name)
                self._set_versions[name] = v

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
            top_logprobs=[p.top_logprobs for p in params],
        )

    def _prefill_chunks(self, groups: list[Group]) -> None:
        """Prefill ``groups`` (one weight set's) in forwards of at most ``max_prefill_tokens`` new tokens."""
        budget = self.config.max_prefill_tokens
        batch: list[Group] = []
        for g in groups:
            new = len(g.prompt) - g.cached_tokens
            if batch and new > budget:
                self._prefill(batch)
                batch, budget = [], self.config.max_prefill_tokens
            batch.append(g)
            budget -= new
        if batch:
            self._prefill(batch)

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
        batch = self._sampling_batch(rows)
        tok_list, lp_list, top_list = _to_host(*_sample(logits[torch.tensor(row_of, device=dev)], batch, batch.max_top_logprobs))
        r = 0
        for gi, g in enumerate(groups):
            for seq in self.scheduler.fork(g, uniforms[gi]):
                if not self._append(seq, tok_list[r], lp_list[r], top_list and top_list[r]):
                    self.scheduler.running.append(seq)
                r += 1

    def _decode(self) -> None:
        """One token for every running sequence: a forward per weight set, one host transfer."""
        sched = self.scheduler
        for s in sched.running:
            sched.grow(s)
        parts = []
        for name, seqs in self._by_set(sched.running, lambda s: s.group.request.weight_set):
            with swapped_in(self.model, self._weight_sets.get(name)):
                logits = self._decode_logits(seqs)
            parts.append((seqs, logits, self._sampling_batch([(s, len(s.generated), s.uniforms) for s in seqs])))
        k = max(b.max_top_logprobs for _, _, b in parts)
        sampled = [_sample(logits, b, k) for _, logits, b in parts]
        if len(sampled) == 1:
            tok_list, lp_list, top_list = _to_host(*sampled[0])
            order = parts[0][0]
        else:
            tops = [t for _, _, t in sampled]
            top = None if k == 0 else (torch.cat([i for i, _ in tops]), torch.cat([v for _, v in tops]))
            tok_list, lp_list, top_list = _to_host(torch.cat([t for t, _, _ in sampled]), torch.cat([lp for _, lp, _ in sampled]), top)
            order = [s for seqs, _, _ in parts for s in seqs]
        sched.running = [
            s for i, s in enumerate(order) if not self._append(s, tok_list[i], lp_list[i], top_list and top_list[i])
        ]

    def _decode_logits(self, running: list[Sequence]) -> torch.Tensor:
        """``[len(running), vocab]`` logits of the next token of each sequence (one forward)."""
        bs = self.cache.block_size
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
        return self.runner.logits(hidden)

    def _append(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]] | None) -> bool:
        """Record a sampled token; finish the sequence (and maybe its request) if it stops; True then."""
        if seq.finish_reason is not None:  # its request was stopped earlier in this step
            return True
        g = seq.group
        seq.tokens.append(token)
        seq.generated.append(token)
        seq.logprobs.append(logprob)
        if top and g.params.top_logprobs:
            seq.top_logprobs.append(top[: g.params.top_logprobs])
        if g.request.on_token is not None:
            try:
                g.request.on_token(g.request_id, seq.index, token, logprob)
            except Exception as e:  # the caller's code: its failure ends its own request only
                self._stop(g, "error", f"request {g.request_id}: on_token callback raised {type(e).__name__}: {e}")
                return True
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
            del self._groups[g.request_id]
            self._done[g.request_id] = g.result()
        return True


def _sample(
    logits: torch.Tensor, b: SamplingBatch, k: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Tokens and log-probs of each row, and the ``k`` top log-probs when ``k`` > 0 (on the device)."""
    tokens, logprobs = sample(logits, b)
    return tokens, logprobs, (top_logprobs(logits, b, k) if k else None)


def _to_host(
    tokens: torch.Tensor, logprobs: torch.Tensor, top: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[list[int], list[float], list[list[tuple[int, float]]] | None]:
    """The step's one host synchronization: tokens and log-probs (and top log-probs) in one transfer."""
    if top is None:
        both = torch.stack([tokens.double(), logprobs.double()]).tolist()
        return [int(t) for t in both[0]], both[1], None
    ids, values = top
    k = ids.shape[1]
    rows = torch.cat([tokens.double()[:, None], logprobs.double()[:, None], ids.double(), values.double()], 1).tolist()
    return (
        [int(r[0]) for r in rows],
        [r[1] for r in rows],
        [[(int(i), v) for i, v in zip(r[2 : 2 + k], r[2 + k :], strict=True)] for r in rows],
    )
