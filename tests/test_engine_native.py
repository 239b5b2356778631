"""The engine's native CPU kernels: built here, equal to PyTorch, guarded against bad tables, and the
engine gives the same tokens with and without them."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tao_core.engine import native

from .test_engine import PROMPTS, make_engine, max_gap
from .test_engine import model as model  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def lib():
    if native.library() is None:
        reason = native.unavailable_reason() or ""
        if "no C compiler" in reason or "Linux x86-64 only" in reason or reason == "TAO_NATIVE=0":
            pytest.skip(reason)
        pytest.fail(f"the native kernels should build on this machine: {reason}")
    return native.library()


def reference(q, kc, vc, table, lengths, scale):
    """Plain softmax attention per sequence over its gathered keys (query heads grouped per KV head)."""
    b, h, d = q.shape
    kvh = kc.shape[2]
    out = torch.empty_like(q)
    for i in range(b):
        n = int(lengths[i])
        k = kc[table[i]].reshape(-1, kvh, d)[:n].repeat_interleave(h // kvh, 1).double()
        v = vc[table[i]].reshape(-1, kvh, d)[:n].repeat_interleave(h // kvh, 1).double()
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[i].double(), k) * scale, -1)
        out[i] = torch.einsum("hn,nhd->hd", w, v).float()
    return out


@pytest.mark.parametrize(
    "kvh,group,d,bs",
    [(1, 1, 8, 1), (2, 3, 16, 4), (3, 3, 64, 16), (4, 2, 128, 32), (2, 8, 32, 64)],
)
def test_decode_attention_matches_softmax_attention(lib, kvh, group, d, bs):
    g = torch.Generator().manual_seed(kvh * 100 + d)
    nb = 40
    kc = torch.randn(nb, bs, kvh, d, generator=g) * 2
    vc = torch.randn(nb, bs, kvh, d, generator=g)
    lengths = torch.tensor([1, bs, bs + 1, 3 * bs - 1, 5 * bs])
    width = (int(lengths.max()) + bs - 1) // bs
    table = torch.randperm(nb, generator=g)[: 5 * width].view(5, width)
    table[1, 1:] = 0  # padding past a sequence's blocks is never read
    table[3, :2] = table[2, :2]  # a shared prefix
    q = torch.randn(5, kvh * group, d, generator=g)
    got = native.decode_attention(q, kc, vc, table, lengths, d**-0.5)
    want = reference(q, kc, vc, table, lengths, d**-0.5)
    assert (got - want).abs().max().item() < 1e-5


def test_large_scores_do_not_overflow(lib):
    kc = torch.full((2, 4, 1, 8), 30.0)
    vc = torch.arange(64, dtype=torch.float32).view(2, 4, 1, 8)
    q = torch.full((1, 1, 8), 30.0)
    out = native.decode_attention(q, kc, vc, torch.tensor([[1, 0]]), torch.tensor([7]), 1.0)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, vc[[1, 0]].reshape(-1, 8)[:7].mean(0, keepdim=True)[None], atol=1e-4)


def test_bad_tables_and_shapes_are_errors_not_reads(lib):
    kc = vc = torch.zeros(4, 4, 1, 8)
    q = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="context lengths"):
        native.decode_attention(q, kc, vc, torch.tensor([[0, 1]]), torch.tensor([9]), 1.0)
    with pytest.raises(ValueError, match="context lengths"):
        native.decode_attention(q, kc, vc, torch.tensor([[0, 1]]), torch.tensor([0]), 1.0)
    with pytest.raises(ValueError, match="block ids"):
        native.decode_attention(q, kc, vc, torch.tensor([[0, 4]]), torch.tensor([6]), 1.0)
    with pytest.raises(ValueError, match="float32"):
        native.decode_attention(q.double(), kc, vc, torch.tensor([[0]]), torch.tensor([1]), 1.0)
    wide = torch.zeros(4, 65, 1, 8)  # blocks of 65 tokens, beyond the compiled limit
    with pytest.raises(ValueError, match="limits"):
        native.decode_attention(q, wide, wide, torch.tensor([[0]]), torch.tensor([1]), 1.0)


def test_add_rmsnorm_matches_the_llama_norm_and_adds_in_place(lib):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(40, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    h, delta = torch.randn(7, 40, generator=g) * 5, torch.randn(7, 40, generator=g)
    want_h = h + delta
    with torch.no_grad():
        want = norm(want_h)
    got = native.add_rmsnorm(h, delta, norm.weight.detach(), 1e-5)
    assert torch.allclose(h, want_h) and (got - want).abs().max().item() < 1e-5
    assert torch.allclose(native.add_rmsnorm(h, None, norm.weight.detach(), 1e-5), want, atol=1e-5)
    with pytest.raises(ValueError, match="shape of h"):
        native.add_rmsnorm(h, delta[:3], norm.weight.detach(), 1e-5)


def test_rope_store_matches_transformers_rotary_and_writes_the_cache_rows(lib):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(2)
    t, h, kvh, d = 5, 6, 2, 16
    q, k, v = torch.randn(t, h, d, generator=g), torch.randn(t, kvh, d, generator=g), torch.randn(t, kvh, d, generator=g)
    angles = torch.rand(t, d // 2, generator=g) * 10
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    want_q, want_k = want_q[0], want_k[0]
    kc, vc = torch.zeros(4, 4, kvh, d), torch.zeros(4, 4, kvh, d)
    slots = torch.tensor([0, 5, 6, 15, 9])
    qq, kk = q.clone(), k.clone()
    native.rope_store(qq, kk, v, cos, sin, slots, kc, vc)
    assert (qq - want_q.transpose(0, 1)).abs().max().item() < 1e-5
    assert (kk - want_k.transpose(0, 1)).abs().max().item() < 1e-5
    assert torch.equal(kc.view(-1, kvh, d)[slots], kk) and torch.equal(vc.view(-1, kvh, d)[slots], v)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots] = False
    assert not kc.view(-1, kvh, d)[untouched].any()
    with pytest.raises(ValueError, match="cache slots"):
        native.rope_store(qq, kk, v, cos, sin, torch.tensor([0, 1, 2, 3, 16]), kc, vc)


def test_silu_mul_matches_torch_including_extreme_inputs(lib):
    gate = torch.cat([torch.linspace(-200, 200, 401), torch.randn(1000) * 4])
    up = torch.randn(gate.shape, generator=torch.Generator().manual_seed(3))
    want = torch.nn.functional.silu(gate) * up
    got = native.silu_mul(gate.clone(), up)
    assert torch.isfinite(got).all() and (got - want).abs().max().item() < 1e-4


def test_native_sampling_draws_by_the_inverse_cdf_definition(lib):
    from tao_core.engine import sampling

    g = torch.Generator().manual_seed(4)
    rows, vocab = 256, 4096
    z = torch.randn(rows, vocab, generator=g) * torch.linspace(0.5, 6, rows).unsqueeze(-1)
    z[:8, 100:] = -1e4  # rows with almost all mass on a few tokens
    u = torch.rand(rows, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2**-24
    tokens, logprobs = native.sample(z, u, 1024)
    cdf = torch.softmax(z.double(), -1).cumsum(-1)
    want = (cdf <= u.double().unsqueeze(-1) * cdf[:, -1:]).sum(-1).clamp(max=vocab - 1)
    # a different summation order may move a draw only when u sits within rounding of a CDF step
    close = (cdf.gather(-1, want.unsqueeze(-1)).squeeze(-1) - u.double()).abs() < 1e-6
    assert ((tokens == want) | close).all() and (tokens == want).float().mean() > 0.99
    lp = torch.log_softmax(z, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert (logprobs - lp).abs().max().item() < 1e-5
    # sampling uses it for unfiltered rows and keeps the PyTorch path for the rest
    batch = sampling.SamplingBatch.build(
        temperature=[1.0] * rows, top_k=[0] * rows, top_p=[1.0] * rows, min_p=[0.0] * rows,
        uniform=u.tolist(), device=torch.device("cpu"),
    )
    before = sampling.native_sampling()
    try:
        sampling.native_sampling(False)
        t_torch, lp_torch = sampling.sample(z, batch)
        sampling.native_sampling(True)
        t_nat, lp_nat = sampling.sample(z, batch)
    finally:
        sampling.native_sampling(before)
    same = t_nat == t_torch
    assert same.float().mean() > 0.99 and (lp_nat - lp_torch)[same].abs().max() < 1e-5
    assert native.sample(torch.zeros(2, 8193), torch.zeros(2), 1) is None  # too many chunks: PyTorch path


def test_engine_tokens_and_logprobs_equal_with_and_without_the_native_kernels(lib, model):
    from tao_core.engine import EngineRequest, sampling
    from tao_core.types import SamplingParams

    def run(use_native: bool):
        eng = make_engine(model)
        assert eng.runner.native_attention and eng.runner.native_ops
        eng.runner.native_attention = eng.runner.native_ops = use_native
        before = sampling.native_sampling()
        sampling.native_sampling(use_native)
        try:
            p = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7)
            return eng.run([EngineRequest(x, p) for x in PROMPTS])
        finally:
            sampling.native_sampling(before)

    with_native, without = run(True), run(False)
    for a, b in zip(with_native, without, strict=True):
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
        for sa, sb in zip(a.samples, b.samples, strict=True):
            assert max(abs(x - y) for x, y in zip(sa.logprobs, sb.logprobs, strict=True)) < 1e-5
    assert max_gap(model, PROMPTS, with_native, 1.0) < 1e-4


def test_loading_the_library_keeps_denormals_and_can_be_turned_off(lib, tmp_path):
    tiny = torch.tensor([1e-40])
    assert (tiny * 1.0).item() != 0.0  # linked without -ffast-math's flush-to-zero startup code
    code = "from tao_core.engine import native; print(native.library() is None, native.unavailable_reason())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**__import__("os").environ, "TAO_NATIVE": "0"},
    ).stdout
    assert out.strip() == "True TAO_NATIVE=0"
