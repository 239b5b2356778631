"""oneDNN float32 linears for the training step: same values and gradients as ``F.linear``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tao_core import onednn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def test_values_and_gradients_match_f_linear():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 37, generator=g, requires_grad=True)
    w = torch.randn(41, 37, generator=g, requires_grad=True)
    b = torch.randn(41, generator=g, requires_grad=True)
    up = torch.randn(3, 7, 41, generator=g)
    y = onednn.OneDNNLinear.apply(x, w, b)
    grads = torch.autograd.grad(y, (x, w, b), up)
    y_ref = torch.nn.functional.linear(x, w, b)
    ref = torch.autograd.grad(y_ref, (x, w, b), up)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_model_gradients_match_and_modules_are_restored():
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 11))

    def grads(ctx) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        model.zero_grad()
        with ctx as routed:
            loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), routed, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, routed, got = grads(onednn.onednn_linears(model))
    assert routed == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the head
    assert not any("forward" in vars(m) for m in model.modules())  # restored
    ref_loss, _, ref = grads(_plain())
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5, msg=name)


class _plain:
    """A ``with`` block that routes nothing (the reference run)."""

    def __enter__(self) -> int:
        return 0

    def __exit__(self, *exc) -> None:
        return None


@pytest.mark.skipif(not onednn.available(), reason="oneDNN does not agree with F.linear here")
def test_k_major_weights_keep_values_parameters_and_gradients():
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 11))
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    ref_loss = model(ids, labels=ids).loss
    ref = torch.autograd.grad(ref_loss, list(params.values()))

    relaid = onednn.k_major_linears(model)
    assert relaid == 2 * 7  # q, k, v, o, gate, up, down per layer; the LM head is tied to the embedding
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q is params["model.layers.0.self_attn.q_proj.weight"] and q.stride() == (1, q.shape[0])
    assert model.lm_head.weight.is_contiguous()  # tied: left as it was
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    with onednn.onednn_linears(model):
        loss = model(ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(params, grads, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
        assert got.stride() == params[name].stride(), name  # gradients in the weights' own layout
    assert onednn.k_major_linears(model) == 0  # already K-major: nothing to do
