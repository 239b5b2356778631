"""The engine's float32 CPU linear (oneDNN on the module's own weight) against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tao_core import onednn
from tao_core.engine.linear import PackedLinears, linear_for, module_linear


@pytest.mark.skipif(not onednn.available(), reason="oneDNN linear not available in this torch build")
@pytest.mark.parametrize("pack", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize(("rows", "bias"), [(128, False), (41, True), (1, False), (300, True)])
def test_onednn_linear_matches_f_linear_and_sees_weight_updates(rows, bias, pack):
    if pack and not onednn.packing_available():
        pytest.skip("oneDNN weight packing not available in this torch build")
    fn = linear_for(torch.device("cpu"), torch.float32, pack=pack)
    assert fn is not module_linear and isinstance(fn, PackedLinears) == pack
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 1271, bias=bias)
    x = torch.randn(rows, 576)
    with torch.inference_mode():
        got = fn(lin, x)
    want = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    assert got.shape == (rows, 1271) and (got.double() - want).abs().max() < 1e-4
    with torch.no_grad():
        lin.weight.mul_(-2)  # an in-place update, as an optimizer step makes
    with torch.inference_mode():
        assert torch.allclose(fn(lin, x), F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-4)


def test_other_modules_and_dtypes_run_their_own_forward():
    class Doubling(torch.nn.Linear):  # a subclass (e.g. a LoRA layer) keeps its own forward
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Doubling(8, 4)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        out = linear_for(torch.device("cpu"), torch.float32)(layer, x)
        assert torch.allclose(out, layer(x))
    assert linear_for(torch.device("cpu"), torch.bfloat16) is module_linear
    assert linear_for(torch.device("meta"), torch.float32) is module_linear


# packed weight copies (EngineConfig(pack_weights=True), tao serve's default) ---------------------------
packing = pytest.mark.skipif(not onednn.packing_available(), reason="oneDNN weight packing not available here")


@packing
def test_packed_copy_follows_in_place_updates_and_replaced_tensors():
    fn = PackedLinears()
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        first = fn(lin, x)
    with torch.no_grad():
        lin.weight.mul_(-2)  # an optimizer step, or a served version copied into the parameters
    with torch.inference_mode():
        assert torch.allclose(fn(lin, x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
        assert not torch.allclose(fn(lin, x), first, atol=1e-3)
    lin.weight = torch.nn.Parameter(torch.randn(48, 64))  # a new tensor under the same module
    with torch.inference_mode():
        assert torch.allclose(fn(lin, x), F.linear(x, lin.weight, lin.bias), atol=1e-5)
    assert len(fn) == 1  # the replaced tensor was freed, and its packed copy with it


@packing
def test_packed_engine_samples_what_the_plain_engine_samples(tiny_model_dir):
    from transformers import LlamaForCausalLM

    from tao_core.engine import Engine, EngineConfig, EngineRequest
    from tao_core.types import SamplingParams

    model = LlamaForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    prompts = [list(range(5, 18)), [40, 41, 42, 43, 44, 45, 46], list(range(5, 18)) + [60, 61]]

    def run(pack: bool):
        eng = Engine(model, eos_token_ids=[], config=EngineConfig(max_kv_tokens=2048, block_size=4, pack_weights=pack))
        assert isinstance(eng.runner.linear, PackedLinears) == pack
        res = eng.run([EngineRequest(p, SamplingParams(n=2, temperature=0.8, seed=i, max_new_tokens=12))
                       for i, p in enumerate(prompts)])
        return eng, [(s.token_ids, s.logprobs) for r in res for s in r.samples]

    _, plain = run(False)
    eng, packed = run(True)
    for (tokens, lps), (want_tokens, want_lps) in zip(packed, plain, strict=True):
        assert tokens == want_tokens
        assert (torch.tensor(lps) - torch.tensor(want_lps)).abs().max() < 1e-5
    with torch.no_grad():  # in-place weight changes reach the packed engine's next request
        for p in model.parameters():
            p.mul_(1.5)
    _, plain_after = run(False)
    again = eng.run([EngineRequest(p, SamplingParams(n=2, temperature=0.8, seed=i, max_new_tokens=12))
                     for i, p in enumerate(prompts)])
    got = [(s.token_ids, s.logprobs) for r in again for s in r.samples]
    assert [t for t, _ in got] == [t for t, _ in plain_after] != [t for t, _ in plain]
