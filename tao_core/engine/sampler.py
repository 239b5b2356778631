"""Token sampling for a batch of rows, each with its own parameters and its own uniform draw.

Definitions (applied in this order, as in ``transformers``), for one row with logits ``z``:

- ``logp = log_softmax(z / T)`` with ``T`` the temperature (1 for greedy rows). The sampled token's
  ``logp`` is its log-prob, the project's one definition (before any truncation).
- top-k: keep tokens whose scaled logit is >= the k-th largest (ties at the k-th value are kept).
- top-p: over the top-k survivors sorted by probability, keep the smallest set whose probability
  (renormalized) reaches ``top_p``: a token is kept when the mass strictly before it is < ``top_p``.
- min-p: keep tokens with ``p >= min_p * p_max`` (the ratio does not change with renormalization).
- Draw: inverse CDF over the surviving probabilities in token-id order with the row's uniform ``u``,
  so a row's token depends only on its logits and its own random stream. Greedy rows take the argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def sample(logits: torch.Tensor, b: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return ``(tokens [B] int64, logprobs [B] float32)``.

    ``logits`` is ``[B, V]`` in any float dtype; the math runs in float32.
    """
    z = logits.float()
    if b.any_temperature:
        z = z / b.temperature.unsqueeze(-1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # log_softmax(z) = z - lse
    if b.any_sampled:
        if b.any_top_k or b.any_top_p or b.any_min_p:
            probs = filtered_probs(z - lse, b)
        else:
            probs = torch.sub(z, lse).exp_()
        cdf = probs.cumsum_(-1)
        total = cdf[:, -1:]
        target = torch.minimum(b.uniform.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
        tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
        if b.any_greedy:
            tokens = torch.where(b.greedy, z.argmax(-1), tokens)
    else:
        tokens = z.argmax(-1)
    return tokens, (z.gather(-1, tokens.unsqueeze(-1)) - lse).squeeze(-1)
