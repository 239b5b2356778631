"""The sampler's filters against their definitions on a tiny vocabulary (statistical, fixed seed).

With 40,000 draws a kept token's frequency has a standard deviation of at most 0.0025, so the
0.015 bound is 6 sigma: a correct sampler fails it with probability < 1e-8, while any filter that
keeps a wrong set of tokens moves some frequency by far more (and dropped tokens must never appear).
"""

from __future__ import annotations

import pytest
import torch

from tao_core.engine.sampling import SamplingBatch, sample

DRAWS = 40_000
LOGITS = torch.log(torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.08, 0.04, 0.01]))


def draw(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logits=LOGITS):
    gen = torch.Generator().manual_seed(1234)
    u = torch.rand(DRAWS, generator=gen).tolist()
    batch = SamplingBatch.build(
        temperature=[temperature] * DRAWS,
        top_k=[top_k] * DRAWS,
        top_p=[top_p] * DRAWS,
        min_p=[min_p] * DRAWS,
        uniform=u,
        device=torch.device("cpu"),
    )
    tokens, logprobs = sample(logits.expand(DRAWS, -1), batch)
    return torch.bincount(tokens, minlength=logits.numel()).double() / DRAWS, tokens, logprobs


def expected(keep: list[int], temperature: float = 1.0) -> torch.Tensor:
    p = torch.softmax(LOGITS.double() / temperature, -1)
    mask = torch.zeros_like(p)
    mask[keep] = 1
    return p * mask / (p * mask).sum()


def check(freq: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.all(freq[want == 0] == 0), f"dropped tokens were sampled: {freq}"
    assert (freq - want).abs().max() < 0.015, f"frequencies {freq} vs expected {want}"


@pytest.mark.parametrize(
    ("kwargs", "keep"),
    [
        ({}, list(range(8))),
        ({"top_k": 3}, [0, 1, 2]),
        # mass before token i: 0, .30, .50, .65, ... -> tokens with mass-before < 0.6 are 0, 1, 2
        ({"top_p": 0.6}, [0, 1, 2]),
        ({"top_p": 0.5}, [0, 1]),
        # p >= 0.35 * 0.30 = 0.105 -> tokens 0..3
        ({"min_p": 0.35}, [0, 1, 2, 3]),
        # top-k 5 renormalizes to mass .87; top-p 0.5 then keeps mass-before < .5*.87 = .435 -> 0, 1
        ({"top_k": 5, "top_p": 0.5}, [0, 1]),
    ],
)
def test_filters_match_definitions(kwargs, keep):
    freq, _, _ = draw(**kwargs)
    check(freq, expected(keep))


def test_temperature_reshapes_distribution_and_logprobs():
    freq, tokens, logprobs = draw(temperature=0.5)
    check(freq, expected(list(range(8)), 0.5))
    want = torch.log_softmax(LOGITS / 0.5, -1)[tokens]
    assert torch.allclose(logprobs, want, atol=1e-6)


def test_logprobs_are_before_truncation():
    _, tokens, logprobs = draw(top_k=2)
    assert torch.allclose(logprobs, torch.log_softmax(LOGITS, -1)[tokens], atol=1e-6)


def test_greedy_rows_take_argmax_next_to_sampled_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    batch = SamplingBatch.build(
        temperature=[0.0, 1.0], top_k=[0, 0], top_p=[1.0, 1.0], min_p=[0.0, 0.0], uniform=[0.99, 0.99],
        device=torch.device("cpu"),
    )
    tokens, logprobs = sample(logits, batch)
    assert tokens.tolist() == [1, 2]  # u=0.99 lands in the last token's CDF interval
    assert torch.allclose(logprobs, torch.log_softmax(logits, -1)[[0, 1], [1, 2]])


def test_extreme_uniforms_never_pick_a_filtered_token():
    logits = torch.tensor([[5.0, 4.0, -1.0, -2.0]]).expand(3, -1)
    batch = SamplingBatch.build(
        temperature=[1.0] * 3, top_k=[2] * 3, top_p=[1.0] * 3, min_p=[0.0] * 3,
        uniform=[0.0, 0.5, 1.0 - 2**-24], device=torch.device("cpu"),
    )
    tokens, _ = sample(logits, batch)
    assert set(tokens.tolist()) <= {0, 1}
    assert tokens.tolist()[0] == 0 and tokens.tolist()[2] == 1


def test_rows_keep_their_own_filters_in_a_mixed_batch():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]]).expand(4, -1)
    batch = SamplingBatch.build(
        temperature=[1.0, 1.0, 0.0, 1.0], top_k=[1, 0, 3, 3], top_p=[1.0, 1.0, 1.0, 0.5], min_p=[0.0] * 4,
        uniform=[0.999] * 4, device=torch.device("cpu"),
    )
    tokens, _ = sample(logits, batch)
    # top-1 -> 0; no filter -> the last token for u near 1; greedy -> 0; top-3 then top-p 0.5 -> {0}
    assert tokens.tolist() == [0, 3, 0, 0]


def test_two_level_draw_matches_a_full_cumulative_sum():
    from tao_core.engine.sampling import draw as two_level

    gen = torch.Generator().manual_seed(5)
    weights = torch.rand(64, 4096, generator=gen) ** 8  # uneven, many chunks
    weights[:, 1000:3000] = 0  # whole chunks and chunk parts without mass
    weights[0] = 0
    weights[0, 4095] = 1.0  # all mass on the last token
    u = torch.rand(64, generator=gen)
    u[1], u[2] = 0.0, 1.0 - 2**-24  # extreme draws
    cdf = weights.double().cumsum(-1)
    want = torch.searchsorted(cdf, (u.double() * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    got = two_level(weights, u)
    assert torch.all(weights.gather(-1, got.unsqueeze(-1)) > 0)
    # float32 chunk sums vs a float64 cumsum: the same token unless u falls within rounding of a boundary
    assert (got != want.clamp(max=4095)).sum() <= 1
    assert got[0] == 4095
