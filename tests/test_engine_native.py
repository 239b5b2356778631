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
        if "no C compiler" in reason or "Linux x86-64 only" in reason:
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


def test_engine_tokens_and_logprobs_equal_with_and_without_the_native_kernel(lib, model):
    from tao_core.engine import EngineRequest
    from tao_core.types import SamplingParams

    def run(use_native: bool):
        eng = make_engine(model)
        assert eng.runner.native_attention
        eng.runner.native_attention = use_native
        p = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=7)
        return eng.generate([EngineRequest(x, p) for x in PROMPTS])

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
