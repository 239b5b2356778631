"""Token sampling for a batch of rows, each with its own parameters and its own uniform draw.

Definitions (applied in this order, as in ``transformers``), for one row with logits ``z``:

- ``logp = log_softmax(z / T)`` with ``T`` the temperature (1 for greedy rows). The sampled token's
  ``logp`` is its log-prob, the project's one definition (before any truncation).
- top-k: keep tokens whose scaled logit is >= the k-th largest (ties at the k-th value are kept).
- top-p: over the top-k survivors sorted by probability, keep the smallest set whose probability
  (renormalized) reaches ``top_p``: a token is kept when the mass strictly before it is < ``top_p``.
- min-p: keep tokens with ``p >= min_p * p_max`` (the ratio does not change with renormalization).
- Draw: inverse CDF over the surviving probabilities in token-id order with the row's uniform ``u``
  (``draw``), so a row's token depends only on its logits and its own random stream. Greedy rows
  take the argmax.
- Top log-probs (``top_logprobs``): the k largest ``logp`` of a row and their token ids, the same
  definition as the sampled token's log-prob (before truncation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tao_core.engine import native


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device (``B`` rows)."""

    temperature: torch.Tensor  # [B] float32; 1.0 for greedy rows
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] int64; 0 disables
    top_p: torch.Tensor  # [B] float32; 1.0 disables
    min_p: torch.Tensor  # [B] float32; 0.0 disables
    uniform: torch.Tensor  # [B] float32 in [0, 1): the row's draw for this step
    any_greedy: bool  # host-side flags so unused steps cost nothing
    any_temperature: bool  # some row has a temperature other than 1
    any_sampled: bool
    any_top_k: bool
    max_top_k: int  # largest top-k of a sampled row (0 if none), so no device read is needed
    any_top_p: bool
    any_min_p: bool
    max_top_logprobs: int = 0  # largest number of top log-probs a row asks for (0: none)

    @classmethod
    def build(
        cls,
        *,
        temperature: list[float],
        top_k: list[int],
        top_p: list[float],
        min_p: list[float],
        uniform: list[float],
        device: torch.device,
        top_logprobs: list[int] | None = None,
    ) -> SamplingBatch:
        greedy = [t == 0 for t in temperature]
        return cls(
            temperature=torch.tensor([1.0 if g else t for g, t in zip(greedy, temperature, strict=True)], dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
            uniform=torch.tensor(uniform, dtype=torch.float32, device=device),
            any_greedy=any(greedy),
            any_temperature=any(t not in (0, 1) for t in temperature),
            any_sampled=not all(greedy),
            any_top_k=any(k > 0 and not g for k, g in zip(top_k, greedy, strict=True)),
            max_top_k=max((k for k, g in zip(top_k, greedy, strict=True) if not g), default=0),
            any_top_p=any(p < 1 and not g for p, g in zip(top_p, greedy, strict=True)),
            any_min_p=any(m > 0 and not g for m, g in zip(min_p, greedy, strict=True)),
            max_top_logprobs=max(top_logprobs, default=0) if top_logprobs else 0,
        )


def filtered_probs(logp: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Unnormalized probabilities after top-k, top-p and min-p; ``logp`` is ``[B, V]`` log_softmax(z/T)."""
    probs = logp.exp()
    vocab = probs.shape[-1]
    if b.any_top_k:
        # rows without top-k compare against -inf: nothing is dropped
        kmax = min(b.max_top_k, vocab)
        top = torch.topk(logp, kmax, dim=-1).values  # [B, kmax] sorted descending
        k = torch.where(b.top_k > 0, b.top_k.clamp(max=kmax), 0)
        kth = torch.where(k > 0, top.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1), -torch.inf).unsqueeze(-1)
        probs = probs.masked_fill(logp < kth, 0.0)
    if b.any_top_p:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        total = sorted_p.sum(-1, keepdim=True)
        before = (sorted_p.cumsum(-1) - sorted_p) / total  # mass strictly before each token
        drop_sorted = before >= b.top_p.unsqueeze(-1)
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    if b.any_min_p:
        pmax = probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < b.min_p.unsqueeze(-1) * pmax, 0.0)
    return probs


def _chunk_size(vocab: int) -> int:
    """Tokens per chunk of the two-level draw: the largest power of two <= 1024 dividing ``vocab``."""
    return min(vocab & -vocab, 1024)


def draw(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw over ``weights [B, V]`` (unnormalized, >= 0, some > 0 per row) in token-id order.

    Row b returns the first token whose cumulative weight exceeds ``uniform[b] * total``; a token of
    weight 0 is never returned. The CDF is built in two levels (per-chunk sums, then the cumulative
    sum inside the one chunk the draw falls in) so no pass writes a ``[B, V]`` cumulative sum.
    """
    bsz, vocab = weights.shape
    c = _chunk_size(vocab)
    if c < 64:  # odd vocabulary: one level
        cdf = weights.cumsum(-1)
        total = cdf[:, -1:]
        target = torch.minimum(uniform.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
        return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=vocab - 1)
    chunks = weights.view(bsz, vocab // c, c)
    ccdf = chunks.sum(-1).cumsum_(-1)  # [B, V / c]
    total = ccdf[:, -1:]
    target = torch.minimum(uniform.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    ci = torch.searchsorted(ccdf, target, right=True).clamp_(max=ccdf.shape[1] - 1)  # [B, 1]: a chunk of mass > 0
    before = torch.where(ci > 0, ccdf.gather(-1, (ci - 1).clamp(min=0)), 0.0)
    inner = chunks.gather(1, ci.unsqueeze(-1).expand(bsz, 1, c)).squeeze(1).cumsum_(-1)  # [B, c]
    # the draw's offset inside its chunk, kept below the chunk's own (positive) total
    rest = torch.minimum((target - before).clamp_(min=0), torch.nextafter(inner[:, -1:], torch.zeros_like(before)))
    ti = torch.searchsorted(inner, rest, right=True).clamp_(max=c - 1)
    return (ci * c + ti).squeeze(-1)


_NATIVE: bool | None = None


def native_sampling(enable: bool | None = None) -> bool:
    """Whether unfiltered float32 CPU rows are drawn by the native kernel (the same definition, one
    pass over the logits less and no ``[B, V]`` intermediate); ``enable`` sets it (tests compare)."""
    global _NATIVE
    if enable is not None:
        _NATIVE = enable
    if _NATIVE is None:
        _NATIVE = native.library() is not None
    return _NATIVE


def sample(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return ``(tokens [B] int64, logprobs [B] float32)``.

    ``logits`` is ``[B, V]`` in any float dtype; the math runs in float32. Without filters one
    ``[B, V]`` tensor is written (``e = exp(z - max)``), giving both ``logsumexp = max + log(sum e)``
    and the draw's weights; no ``[B, V]`` cumulative sum is written.
    """
    z = logits.float()
    if b.any_temperature:
        z = z / b.temperature.unsqueeze(-1)
    filtered = b.any_top_k or b.any_top_p or b.any_min_p
    if b.any_sampled and not b.any_greedy and not filtered and z.device.type == "cpu" and native_sampling():
        out = native.sample(z, b.uniform, _chunk_size(z.shape[-1]))
        if out is not None:
            return out
    if not b.any_sampled:
        tokens = z.argmax(-1)
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
    else:
        zmax = z.amax(-1, keepdim=True)
        e = torch.sub(z, zmax).exp_()
        lse = zmax + e.sum(-1, keepdim=True).log_()
        weights = filtered_probs(z - lse, b) if filtered else e
        tokens = draw(weights, b.uniform)
        if b.any_greedy:
            tokens = torch.where(b.greedy, z.argmax(-1), tokens)
    return tokens, (z.gather(-1, tokens.unsqueeze(-1)) - lse).squeeze(-1)


def top_logprobs(logits: torch.Tensor, b: SamplingBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens of each row: ``(ids [B, k] int64, logprobs [B, k] float32)``,
    log-probs ``log_softmax(logits / T)`` as for the sampled token, largest first."""
    z = logits.float()
    if b.any_temperature:
        z = z / b.temperature.unsqueeze(-1)
    values, ids = torch.topk(z, min(k, z.shape[-1]), dim=-1)
    return ids, values - torch.logsumexp(z, dim=-1, keepdim=True)
