"""A lean forward pass for Llama-family decoders over a block KV cache.

The runner calls the Hugging Face model's own submodules (embedding, norms, q/k/v/o projections,
MLP, LM head), so it reads the live parameter tensors with no copy: an optimizer step is visible to
the next forward, and LoRA layers that peft put in place of the projections apply their adapters.
What it replaces is the glue: the per-token positions, the cache writes and the attention over
cache blocks, which ``transformers`` would do with padded batches and a growing cache.

Tokens of all sequences are packed into one ``[T, hidden]`` matrix, so every projection is one
matmul over the whole batch; only attention is per sequence (prefill) or padded (decode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tao_core.engine import native
from tao_core.engine.cache import BlockKVCache
from tao_core.engine.linear import linear_for

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` module under a peft wrapper (the wrapper's LoRA layers stay in its tree)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the fast path cannot run ``model``, or None when it can."""
    base = unwrap(model)
    cfg = getattr(base, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        return f"model type {mtype!r} is not one of {SUPPORTED_MODEL_TYPES}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        return f"sliding-window attention ({window} tokens) is not implemented"
    core = getattr(base, "model", None)
    if core is None or not hasattr(core, "layers") or not hasattr(core, "rotary_emb") or not hasattr(base, "lm_head"):
        return "the model does not have the Llama module layout (model.layers, model.rotary_emb, lm_head)"
    mlp = getattr(core.layers[0], "mlp", None) if len(core.layers) else None
    if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return "the layers' MLP is not the gated Llama MLP (gate_proj, up_proj, down_proj, act_fn)"
    return None


@dataclass
class SharedPrefix:
    """Prompt blocks shared by the samples of one request, attended once for all of them.

    ``Gn`` groups of at most ``M`` running sequences; member slot ``g * M + j`` is the j-th member of
    group g. Cascade attention (Hydragen, arXiv 2402.05099): the members' queries are stacked as
    the rows of one attention over the group's prefix, each sequence attends to its own blocks
    alone, and the two partial results are merged with their log-sum-exps.
    """

    block_table: torch.Tensor  # [Gn, max_prefix_blocks] int64; padding points at block 0 (masked out)
    mask: torch.Tensor  # [Gn, 1, 1, max_prefix_blocks * block_size] float: 0 attended, -inf not
    members: torch.Tensor  # [Gn * M] int64: the batch row in each member slot; B (a zero query) if empty
    rows: torch.Tensor  # [R] int64: batch rows that have a shared prefix
    slots: torch.Tensor  # [R] int64: their member slots


@dataclass
class DecodeBatch:
    """One new token for each of ``B`` sequences."""

    full_table: torch.Tensor  # [B, all_blocks] int64: every block of each sequence; padding -> block 0
    lengths: torch.Tensor  # [B] int64: context lengths, the new token included
    # for the PyTorch path's gathered attention only (None when the native kernel reads full_table):
    block_table: torch.Tensor | None = None  # [B, max_blocks] int64: blocks after the shared prefix
    mask: torch.Tensor | None = None  # [B, 1, 1, max_blocks * block_size] float: 0 where attended, -inf not
    prefix: SharedPrefix | None = None  # None: every block is in block_table


def decode_batch(
    tables: list[list[int]],
    lengths: list[int],
    groups: list[int],
    shared: list[int],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    gathered: bool = True,
) -> DecodeBatch:
    """The decode batch of sequences with blocks ``tables``, contexts ``lengths`` (the new token
    included), group ids ``groups``, and ``shared[i]`` leading blocks that sequence i shares with
    the other members of its group (0: attended as its own). ``gathered=False``: only the full
    tables and lengths, all the native kernel reads."""
    bs = block_size
    as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    width = max(len(t) for t in tables)
    full, lens = as_t([t + [0] * (width - len(t)) for t in tables]), as_t(lengths)
    if not gathered:
        return DecodeBatch(full, lens)
    own = [t[f:] for t, f in zip(tables, shared, strict=True)]
    own_len = [n - f * bs for n, f in zip(lengths, shared, strict=True)]

    def padded(lists: list[list[int]], valid: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in lists)
        table = torch.tensor([x + [0] * (width - len(x)) for x in lists], dtype=torch.int64, device=device)
        keep = torch.arange(width * bs, device=device).unsqueeze(0) < torch.tensor(valid, device=device).unsqueeze(1)
        mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, -torch.inf)
        return table, mask[:, None, None, :]

    table, mask = padded(own, own_len)
    members: dict[int, list[int]] = {}
    for i, (g, f) in enumerate(zip(groups, shared, strict=True)):
        if f:
            members.setdefault(g, []).append(i)
    if not members:
        return DecodeBatch(full, lens, table, mask)
    width = max(len(m) for m in members.values())
    slot_rows, rows, slots = [], [], []
    for gi, m in enumerate(members.values()):
        for j, i in enumerate(m):
            rows.append(i)
            slots.append(gi * width + j)
        slot_rows.extend(m + [len(tables)] * (width - len(m)))
    firsts = [m[0] for m in members.values()]
    pre_table, pre_mask = padded([tables[i][: shared[i]] for i in firsts], [shared[i] * bs for i in firsts])
    prefix = SharedPrefix(pre_table, pre_mask, as_t(slot_rows), as_t(rows), as_t(slots))
    return DecodeBatch(full, lens, table, mask, prefix)


@dataclass
class PrefillSeq:
    """The new tokens of one sequence in a packed prefill: tokens [start, start + length) of it."""

    start: int  # tokens already in the cache before this forward (a shared prefix)
    length: int  # new tokens; their rows in the packed batch are consecutive
    blocks: torch.Tensor  # [ceil((start + length) / block_size)] int64: the sequence's blocks


def gather_blocks(layer_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``[len(blocks), block_size * kv_heads * head_dim]`` copy of the listed blocks of one layer.

    ``index_select`` over whole flattened blocks copies contiguous rows; it is several times faster
    on CPU than advanced indexing of the 4-D cache.
    """
    return torch.index_select(layer_cache.view(layer_cache.shape[0], -1), 0, blocks)


# RMSNorm classes whose forward is exactly ``weight * x * rsqrt(mean(x^2) + variance_epsilon)``
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """``[x2, x1]`` for ``x = [x1, x2]`` along the last dimension (rotate_half without the sign)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding ``x * cos + rotate_half(x) * sin`` with the sign of ``rotate_half`` folded
    into ``signed_sin = [-sin1, sin2]``."""
    return torch.addcmul(x * cos, swap_halves(x), signed_sin)


class LlamaRunner:
    """Runs ``prefill`` and ``decode`` forwards of a Llama-family model on a :class:`BlockKVCache`."""

    def __init__(self, model: torch.nn.Module, *, pack_weights: bool = False) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the engine's fast path cannot run this model: {reason}")
        self.model = model
        base = unwrap(model)
        self.core = base.model
        self.lm_head = base.lm_head
        cfg = base.config
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.num_heads // self.num_kv_heads
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        self.scale = float(self.core.layers[0].self_attn.scaling)  # attention softmax scale
        # (module, x) -> module's linear map of x; over packed weight copies with pack_weights
        self.linear = linear_for(self.device, self.param_dtype, pack=pack_weights)
        # float32 RMSNorms as one fused op (the same math as their forward; bf16 ones round differently)
        self.fused_norm = self.param_dtype == torch.float32
        # decode attention in place over the cache blocks (native kernel), else gathered + SDPA
        self.native_attention = self._native_fits()
        # the glue between the linears (residual add + RMSNorm, RoPE + cache write, SiLU * up) as
        # native kernels, when every norm and activation is one whose math they implement
        self.native_ops = self.native_attention and self._plain_llama_glue()

    def _native_fits(self) -> bool:
        if self.device.type != "cpu" or self.param_dtype != torch.float32 or native.library() is None:
            return False
        max_group, max_dim, _, max_heads = native.LIMITS
        return self.group <= max_group and self.head_dim <= max_dim and self.num_heads <= max_heads

    def native_decode(self, cache: BlockKVCache) -> bool:
        """Whether decode attention over ``cache`` runs in the native kernel (the engine then builds
        only full block tables, :func:`decode_batch` with ``gathered=False``)."""
        return self.native_attention and cache.dtype == torch.float32 and cache.block_size <= native.LIMITS[2]

    def _plain_llama_glue(self) -> bool:
        norms = [self.core.norm]
        for layer in self.core.layers:
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
            if hasattr(layer.self_attn, "q_norm"):
                norms += [layer.self_attn.q_norm, layer.self_attn.k_norm]
            act = layer.mlp.act_fn
            if not (isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"):
                return False
        return all(type(n).__name__ in RMS_NORMS and n.weight.dtype == torch.float32 for n in norms) and self.head_dim % 2 == 0

    @property
    def param_dtype(self) -> torch.dtype:
        return self.core.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.core.embed_tokens.weight.device

    def norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module(x)`` for an RMSNorm module, through ``F.rms_norm`` when that is the same math."""
        if self.fused_norm and type(module).__name__ in RMS_NORMS:
            return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
        return module(x)

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        cache: BlockKVCache,
        attend,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm for packed tokens.

        ``token_ids``, ``positions``, ``slots`` (flat cache slot ``block * block_size + offset`` each
        token's K/V is written to): ``[T]`` int64. ``attend(layer, q, k, v)`` returns ``[T, heads *
        head_dim]`` given this layer's new ``q [T, H, D]`` and ``k, v [T, KVH, D]`` (already cached).
        """
        t, lin, norm = token_ids.shape[0], self.linear, self.norm
        h = self.core.embed_tokens(token_ids)  # a new tensor, updated in place below
        cos, sin = self.core.rotary_emb(h, positions.unsqueeze(0))
        if self.native_ops and cache.dtype == torch.float32:
            return self._forward_native(h, cos[0].contiguous(), sin[0].contiguous(), slots, cache, attend)
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # [T, 1, head_dim]
        half = self.head_dim // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        for i, layer in enumerate(self.core.layers):
            attn = layer.self_attn
            r = norm(layer.input_layernorm, h)
            q = lin(attn.q_proj, r).view(t, self.num_heads, self.head_dim)
            k = lin(attn.k_proj, r).view(t, self.num_kv_heads, self.head_dim)
            v = lin(attn.v_proj, r).view(t, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):
                q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            cache.k[i].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots, k.to(cache.dtype))
            cache.v[i].view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, slots, v.to(cache.dtype))
            h += lin(attn.o_proj, attend(i, q, k, v))
            m, r = layer.mlp, norm(layer.post_attention_layernorm, h)
            h += lin(m.down_proj, m.act_fn(lin(m.gate_proj, r)).mul_(lin(m.up_proj, r)))
        return norm(self.core.norm, h)

    def _forward_native(self, h, cos, sin, slots, cache, attend) -> torch.Tensor:
        """:meth:`forward` with the glue between linears in native kernels (same math, fewer passes)."""
        t, lin, nh, kvh, d = h.shape[0], self.linear, self.num_heads, self.num_kv_heads, self.head_dim
        native.check_slots(slots, cache.k[0])  # once: every layer writes the same slots
        layers = self.core.layers
        first = layers[0].input_layernorm
        r = native.add_rmsnorm(h, None, first.weight, first.variance_epsilon)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            q = lin(attn.q_proj, r).view(t, nh, d)
            k = lin(attn.k_proj, r).view(t, kvh, d)
            v = lin(attn.v_proj, r).view(t, kvh, d)
            if hasattr(attn, "q_norm"):
                q, k = self.norm(attn.q_norm, q).contiguous(), self.norm(attn.k_norm, k).contiguous()
            native.rope_store(q, k, v, cos, sin, slots, cache.k[i], cache.v[i], check=False)
            post = layer.post_attention_layernorm
            r = native.add_rmsnorm(h, lin(attn.o_proj, attend(i, q, k, v)), post.weight, post.variance_epsilon)
            m = layer.mlp
            gate = native.silu_mul(lin(m.gate_proj, r).contiguous(), lin(m.up_proj, r))
            nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.core.norm
            r = native.add_rmsnorm(h, lin(m.down_proj, gate), nxt.weight, nxt.variance_epsilon)
        return r

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, vocab]`` float32 logits for ``[N, hidden]`` final hidden states."""
        return self.linear(self.lm_head, hidden).float()

    # attention --------------------------------------------------------------------------------
    def decode_attend(self, cache: BlockKVCache, batch: DecodeBatch):
        """Attention for one new token per sequence over its cached blocks.

        Float32 on CPU (``native_attention``): the native kernel reads each sequence's blocks in
        place (:func:`tao_core.engine.native.decode_attention`); the samples of one request are
        adjacent in the batch, so their shared prompt blocks are read from the core's cache. Otherwise
        each layer gathers the blocks into a padded copy (streaming reads of whole blocks; the copy
        then stays in the last-level cache for the attention that reads it): reading the cached K/V
        from memory once per layer bounds this step, so a prefix shared by a request's samples is
        read once for all of them (:class:`SharedPrefix`), not once per sample.
        """
        bsz = batch.lengths.shape[0]
        kvh, g, d = self.num_kv_heads, self.group, self.head_dim
        if self.native_decode(cache):
            table, lengths = batch.full_table, batch.lengths
            native.check_table(table, lengths, cache.num_blocks, cache.block_size)
            heads, scale = self.num_heads, self.scale

            def attend_native(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                out = native.decode_attention(q, cache.k[layer], cache.v[layer], table, lengths, scale, check=False)
                return out.view(bsz, heads * d)

            return attend_native
        if batch.block_table is None:
            raise ValueError("this decode batch has no gathered tables (decode_batch(gathered=False)) for the PyTorch path")
        flat_table = batch.block_table.flatten()
        pre = batch.prefix
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # also returns the log-sum-exp

        def gathered(layer: int, table: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            shape = (n, -1, kvh, d)
            return (
                gather_blocks(cache.k[layer], table).view(shape).transpose(1, 2),
                gather_blocks(cache.v[layer], table).view(shape).transpose(1, 2),
            )

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            kg, vg = gathered(layer, flat_table, bsz)
            # the query heads sharing a KV head become `group` query rows of that head
            qg = q.view(bsz, kvh, g, d).to(kg.dtype)
            if pre is None:
                out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=batch.mask, scale=self.scale)
                return out.reshape(bsz, self.num_heads * d).to(q.dtype)
            out, lse = flash(qg, kg, vg, attn_mask=batch.mask, scale=self.scale)  # [B, KVH, G, D], [B, KVH, G]
            ngroups = pre.block_table.shape[0]
            kp, vp = gathered(layer, pre.block_table.flatten(), ngroups)
            width = pre.members.shape[0] // ngroups
            qx = torch.cat((qg, qg.new_zeros(1, kvh, g, d)))[pre.members]  # [Gn * M, KVH, G, D]
            qp = qx.view(ngroups, width, kvh, g, d).transpose(1, 2).reshape(ngroups, kvh, width * g, d)
            op, lp = flash(qp, kp, vp, attn_mask=pre.mask, scale=self.scale)
            op = op.view(ngroups, kvh, width, g, d).transpose(1, 2).reshape(-1, kvh, g, d)[pre.slots]
            lp = lp.view(ngroups, kvh, width, g).transpose(1, 2).reshape(-1, kvh, g)[pre.slots]
            lo = lse[pre.rows]
            top = torch.maximum(lo, lp)
            wo, wp = (lo - top).exp_().unsqueeze(-1), (lp - top).exp_().unsqueeze(-1)
            merged = (out[pre.rows] * wo + op * wp) / (wo + wp)
            out = out.index_copy(0, pre.rows, merged.to(out.dtype))
            return out.reshape(bsz, self.num_heads * d).to(q.dtype)

        return attend

    def prefill_attend(self, cache: BlockKVCache, seqs: list[PrefillSeq]):
        """Causal attention of each sequence's new tokens over its cached prefix and themselves."""
        scale = self.scale
        masks = []
        for s in seqs:
            if s.start == 0:
                masks.append(None)
            else:
                ctx = torch.arange(s.start + s.length, device=self.device)
                pos = torch.arange(s.start, s.start + s.length, device=self.device)
                masks.append(ctx.unsqueeze(0) <= pos.unsqueeze(1))

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            outs, row = [], 0
            for s, mask in zip(seqs, masks, strict=True):
                qs = q[row : row + s.length].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
                if s.start == 0:
                    ks = k[row : row + s.length].transpose(0, 1).unsqueeze(0)
                    vs = v[row : row + s.length].transpose(0, 1).unsqueeze(0)
                    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
                else:
                    ctx = s.start + s.length
                    shape = (-1, self.num_kv_heads, self.head_dim)
                    ks = gather_blocks(cache.k[layer], s.blocks).view(shape)[:ctx].transpose(0, 1).unsqueeze(0).to(q.dtype)
                    vs = gather_blocks(cache.v[layer], s.blocks).view(shape)[:ctx].transpose(0, 1).unsqueeze(0).to(q.dtype)
                    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
                outs.append(o[0].transpose(0, 1).reshape(s.length, -1))
                row += s.length
            return torch.cat(outs) if len(outs) > 1 else outs[0]

        return attend
