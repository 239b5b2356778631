"""Packing a training step's completions into micro-batches without padding waste.

The unit is a :class:`Segment`: one prompt and some of its sampled completions. Two layouts feed
the same loss:

* ``shared_prefix`` (the default): one row per segment, ``[prompt, c_1[:-1], ..., c_k[:-1]]``, with
  a 4D attention mask in which each completion sees the prompt and its own earlier tokens only, and
  position ids restarting after the prompt for every completion. The prompt is computed once per
  group and its gradient is the sum over the group's completions, exactly as if each completion had
  its own copy. A completion's last token is never an input (nothing is predicted from it).
* ``padded``: the straightforward layout, one right-padded row ``[prompt, c_i[:-1]]`` per
  completion; kept as the reference the tests and the benchmark compare against.

Either way the model's final hidden states are gathered at the positions that predict completion
tokens only, so the language-model head runs on ``N`` completion tokens and never on the prompt or
the padding. Rows of a micro-batch are padded to the longest row; a padding position attends only to
itself, so no attention row is empty and no NaN can reach a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tao_core.config import LAYOUTS


@dataclass
class Segment:
    """One prompt with some of its completions, as trained together in one row."""

    prompt_ids: list[int]  # the tokens the candidates were sampled from (never re-tokenized)
    completions: list[list[int]]  # completion token ids, each non-empty
    old_logprobs: list[list[float]]  # sampler's log-probs, one per completion token
    advantages: list[float]  # one per completion (for DPO: +1 chosen / -1 rejected, pairs in order)
    rewards: list[float]  # the completions' scores
    temperature: float  # the temperature of ``old_logprobs`` (Candidate.temperature)
    off_policy: list[bool] | None = None  # per completion: sampled by another policy (another prompt
    # or weights), so ``old_logprobs`` are that behaviour policy's; None: every completion on-policy
    group: int | None = None  # index of its prompt's group in the step (the rank serving that prompt trains it)

    @property
    def n_tokens(self) -> int:
        """Tokens this segment costs in the shared-prefix layout (its row length)."""
        return len(self.prompt_ids) + sum(len(c) - 1 for c in self.completions)


@dataclass
class ModelInputs:
    """What the decoder runs on: rows, their positions and mask, and where completions are predicted."""

    input_ids: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor  # [B, 1, L, L] bool (True = may attend) or [B, L] 0/1 for ``padded``
    gather_index: torch.Tensor  # [N] long: flat index into B*L of the position predicting each target


@dataclass
class TrainBatch:
    """A micro-batch's completion tokens, flattened (packed, no padding): everything a loss needs.

    Sequence ``s`` occupies tokens ``cu_seqlens[s]:cu_seqlens[s+1]``.
    """

    targets: torch.Tensor  # [N] long: completion tokens
    old_logprobs: torch.Tensor  # [N] fp32: the sampling policy's log-probs of ``targets``
    advantages: torch.Tensor  # [N] fp32: each sequence's advantage repeated over its tokens
    cu_seqlens: torch.Tensor  # [S+1] long: sequence offsets into N
    seq_advantages: torch.Tensor  # [S] fp32
    seq_rewards: torch.Tensor  # [S] fp32
    temperature: float  # temperature of ``old_logprobs``; the policy loss divides logits by it
    ref_logprobs: torch.Tensor | None = None  # [N] fp32 under the reference model, when needed
    ref_hidden: torch.Tensor | None = None  # [N, H] reference hidden states (exact KL only)
    ref_weight: torch.Tensor | None = None  # [V, H] reference head weight (exact KL only)
    off_policy: torch.Tensor | None = None  # [N] bool: tokens of off-policy completions, whose
    # ``old_logprobs`` are the behaviour policy's (see tao_core.offpolicy); None: all on-policy
    extra: dict = field(default_factory=dict)  # room for a plugin objective's own inputs

    @property
    def n_tokens(self) -> int:
        return int(self.targets.numel())

    @property
    def n_seqs(self) -> int:
        return int(self.cu_seqlens.numel() - 1)

    def seq_index(self) -> torch.Tensor:
        """[N] long: the sequence each token belongs to."""
        return torch.repeat_interleave(torch.arange(self.n_seqs, device=self.cu_seqlens.device), self.cu_seqlens.diff())


def split_segment(seg: Segment, budget: int, unit: int = 1) -> list[Segment]:
    """Split a segment whose row exceeds ``budget`` tokens into several, each repeating the prompt.

    Completions move in blocks of ``unit`` (2 keeps a DPO pair together). A single block longer than
    the budget still forms one segment: the budget bounds batching, it never drops data.
    """
    if seg.n_tokens <= budget or len(seg.completions) <= unit:
        return [seg]
    out: list[Segment] = []
    start = 0
    p = len(seg.prompt_ids)
    while start < len(seg.completions):
        end = start + unit
        size = p + sum(len(c) - 1 for c in seg.completions[start:end])
        while end < len(seg.completions):
            more = sum(len(c) - 1 for c in seg.completions[end : end + unit])
            if size + more > budget:
                break
            size += more
            end += unit
        sl = slice(start, end)
        off = None if seg.off_policy is None else seg.off_policy[sl]
        out.append(Segment(seg.prompt_ids, seg.completions[sl], seg.old_logprobs[sl], seg.advantages[sl],
                           seg.rewards[sl], seg.temperature, off))
        start = end
    return out


def plan_micro_batches(segments: list[Segment], budget: int, unit: int = 1) -> list[list[Segment]]:
    """Group segments, in order, into micro-batches of at most ``budget`` row tokens each.

    Segments of different sampling temperatures never share a micro-batch (the loss takes one).
    """
    pieces = [s for seg in segments for s in split_segment(seg, budget, unit)]
    batches: list[list[Segment]] = []
    size = 0
    for s in pieces:
        if batches and size + s.n_tokens <= budget and batches[-1][0].temperature == s.temperature:
            batches[-1].append(s)
            size += s.n_tokens
        else:
            batches.append([s])
            size = s.n_tokens
    return batches


def _loss_inputs(segments: list[Segment]) -> TrainBatch:
    comps = [c for s in segments for c in s.completions]
    lens = torch.tensor([len(c) for c in comps], dtype=torch.long)
    cu = torch.zeros(len(comps) + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lens, 0)
    seq_adv = torch.tensor([a for s in segments for a in s.advantages], dtype=torch.float32)
    off = None
    if any(s.off_policy is not None and any(s.off_policy) for s in segments):
        flags = [f for s in segments for f in (s.off_policy or [False] * len(s.completions))]
        off = torch.repeat_interleave(torch.tensor(flags, dtype=torch.bool), lens)
    return TrainBatch(
        targets=torch.tensor([t for c in comps for t in c], dtype=torch.long),
        old_logprobs=torch.tensor([x for s in segments for lp in s.old_logprobs for x in lp], dtype=torch.float32),
        advantages=torch.repeat_interleave(seq_adv, lens),
        cu_seqlens=cu,
        seq_advantages=seq_adv,
        seq_rewards=torch.tensor([r for s in segments for r in s.rewards], dtype=torch.float32),
        temperature=segments[0].temperature,
        off_policy=off,
    )


def _rows_shared_prefix(segments: list[Segment]) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[int]]:
    """Per row: token ids, position ids, segment ids (0 prompt, i+1 completion i); flat gather offsets."""
    rows, positions, seg_ids, gather = [], [], [], []
    for s in segments:
        p = len(s.prompt_ids)
        ids, pos, sid, g = list(s.prompt_ids), list(range(p)), [0] * p, []
        for i, c in enumerate(s.completions):
            start = len(ids)
            g.extend([p - 1] + [start + j for j in range(len(c) - 1)])
            ids.extend(c[:-1])
            pos.extend(range(p, p + len(c) - 1))
            sid.extend([i + 1] * (len(c) - 1))
        rows.append(ids)
        positions.append(pos)
        seg_ids.append(sid)
        gather.append(g)
    return rows, positions, seg_ids, gather


def pack(segments: list[Segment], layout: str = "shared_prefix", pad_id: int = 0) -> tuple[ModelInputs, TrainBatch]:
    """Build the decoder inputs and the flat loss inputs of one micro-batch."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    batch = _loss_inputs(segments)
    if layout == "shared_prefix":
        rows, positions, seg_ids, gathers = _rows_shared_prefix(segments)
    else:
        rows, positions, seg_ids, gathers = [], [], [], []
        for s in segments:
            p = len(s.prompt_ids)
            for c in s.completions:
                rows.append(list(s.prompt_ids) + c[:-1])
                positions.append(list(range(p + len(c) - 1)))
                seg_ids.append([0] * (p + len(c) - 1))
                gathers.append(list(range(p - 1, p + len(c) - 1)))
    width = max(len(r) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, width), dtype=torch.long)
    sid = torch.full((b, width), -1, dtype=torch.long)
    gather = []
    for r, (ids, pos, s, g) in enumerate(zip(rows, positions, seg_ids, gathers, strict=True)):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        position_ids[r, : len(pos)] = torch.tensor(pos)
        sid[r, : len(s)] = torch.tensor(s)
        gather.extend(r * width + x for x in g)
    if layout == "padded":
        mask = (sid >= 0).long()
    else:
        q, k = sid[:, :, None], sid[:, None, :]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal & (q >= 0) & ((k == 0) | (k == q))
        mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax row
        mask = mask[:, None]
    inputs = ModelInputs(input_ids, position_ids, mask, torch.tensor(gather, dtype=torch.long))
    return inputs, batch


def final_hidden(decoder: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
    """[N, H] final (normed) hidden states at the positions that predict the completion tokens.

    ``decoder`` is the transformer body without its head (``model.get_decoder()``); the full
    ``[tokens, vocab]`` logits are never formed.
    """
    device = next(decoder.parameters()).device
    mask = inputs.attention_mask.to(device)
    impl = getattr(decoder.config, "_attn_implementation", None) or "sdpa"
    if mask.dim() == 4 and impl not in ("sdpa", "eager"):
        raise ValueError(
            f"the shared-prefix layout needs a 4D attention mask, which attention {impl!r} does not take; "
            "load the model with attn_implementation='sdpa' or train with layout='padded'"
        )
    if mask.dim() == 4 and impl == "eager":
        # eager attention adds the mask to the scores: turn "may attend" into 0 / -inf-ish
        dtype = next(decoder.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    out = decoder(
        input_ids=inputs.input_ids.to(device),
        position_ids=inputs.position_ids.to(device),
        attention_mask=mask,
        use_cache=False,
    )
    h = out.last_hidden_state
    return h.reshape(-1, h.shape[-1]).index_select(0, inputs.gather_index.to(device))
