"""The engine's float32 CPU linear (oneDNN on the module's own weight) against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tao_core import onednn
from tao_core.engine.linear import linear_for, module_linear


@pytest.mark.skipif(not onednn.available(), reason="oneDNN linear not available in this torch build")
@pytest.mark.parametrize(("rows", "bias"), [(128, False), (41, True), (1, False)])
def test_onednn_linear_matches_f_linear_and_sees_weight_updates(rows, bias):
    fn = linear_for(torch.device("cpu"), torch.float32)
    assert fn is not module_linear
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
