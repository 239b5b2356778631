"""tao_kernels' custom-op registration: schemas, fake implementations, autograd, torch.compile graphs."""

from __future__ import annotations

import pytest
import tao_kernels
import torch
from tao_kernels.kl import _kl_bwd, _kl_fwd
from tao_kernels.logprob import _logprob_bwd, _logprob_fwd
from tao_kernels.policy_loss import _policy_fwd

N, H, V = 9, 8, 50


@pytest.fixture
def head():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    bias = torch.randn(V, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[2] = -100
    return hidden, weight, bias, targets


def test_opcheck_logprob(head):
    hidden, weight, bias, targets = head
    torch.library.opcheck(_logprob_fwd, (hidden, weight, bias, targets, 0.7, -100, True, 4, "torch"))
    lse = torch.randn(N)
    args = (torch.randn(N), torch.randn(N), hidden.detach(), weight.detach(), bias.detach(), targets, lse,
            torch.rand(N), 0.7, -100, 4, "torch", [True, True, True])
    torch.library.opcheck(_logprob_bwd, args)


def test_opcheck_kl(head):
    hidden, weight, bias, targets = head
    ref_h, ref_w = hidden.detach() * 2, weight.detach() + 0.1
    valid = targets != -100
    torch.library.opcheck(_kl_fwd, (hidden, weight, bias, ref_h, ref_w, None, valid, 0.7, 4, "torch"))
    stats = [torch.rand(N), torch.randn(N), torch.randn(N)]
    args = (torch.randn(N), hidden.detach(), weight.detach(), bias.detach(), ref_h, ref_w, None, valid, *stats,
            0.7, 4, "torch", [True, True, True, True, True, False])
    torch.library.opcheck(_kl_bwd, args)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_opcheck_policy_loss(head, ratio_level):
    hidden, weight, bias, targets = head
    cu = torch.tensor([0, 4, 9])
    old = torch.randn(N) - 4
    args = (hidden, weight, bias, targets, torch.randn(N), old, cu, old + 0.1, None, None, 0.1, "k3", 0.2, 0.28,
            ratio_level, "seq_mean", 0, 1.0, -100, True, 4, "torch", [True, True, True])
    torch.library.opcheck(_policy_fwd, args)


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def test_compiled_graph_matches_eager(head):
    hidden, weight, bias, targets = head
    upstream = torch.randn(N)

    def step(h, w, b):
        logp, ent = tao_kernels.linear_logprob(h, w, targets, bias=b, return_entropy=True, temperature=0.8)
        kl = tao_kernels.linear_kl(h, w, h.detach() * 0.5, w.detach(), targets, bias=b)
        return (logp * upstream).sum() + 0.1 * ent.sum() + kl.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(hidden, weight, bias)
    compiled_loss = compiled(hidden, weight, bias)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(_grads(compiled_loss, (hidden, weight, bias)), _grads(eager_loss, (hidden, weight, bias)), strict=True):
        torch.testing.assert_close(a, b)


def test_compiled_policy_loss_matches_eager(head):
    hidden, weight, _, targets = head
    cu = torch.tensor([0, 4, 9])
    adv, old = torch.randn(N), torch.randn(N) - 4

    def loss(h, w):
        out = tao_kernels.linear_policy_loss(h, w, targets, adv, old, cu_seqlens=cu, ref_logprobs=old + 0.2, kl_coef=0.1)
        return out.loss, out.clip_fraction

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (c_loss, c_frac), (e_loss, e_frac) = compiled(hidden, weight), loss(hidden, weight)
    torch.testing.assert_close(c_loss, e_loss)
    torch.testing.assert_close(c_frac, e_frac)
    for a, b in zip(_grads(c_loss, (hidden, weight)), _grads(e_loss, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b)


def test_package_does_not_import_tao_core():
    import subprocess
    import sys

    code = "import sys, tao_kernels; assert not any(m.startswith('tao_core') for m in sys.modules), 'tao_core imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_resolution(monkeypatch):
    from tao_kernels._backend import resolve_backend

    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu) == "triton"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", cpu)
