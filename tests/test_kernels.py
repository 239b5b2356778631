"""tao_kernels (chunked PyTorch backend) against a float64 reference.

Rule from the kernels issue: for every output and every gradient, the max absolute error against the
float64 reference is at most ``2 x`` the naive path's error in the same dtype, plus ``1e-6``.
"""

from __future__ import annotations

import pytest
import tao_kernels
import torch
from tao_kernels.reference import naive_kl, naive_logprob, naive_policy_loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_head(n, h, v, dtype, seed=0, bias=True, scale=1.0, n_ignored=3):
    """Float64 master inputs (hidden, weight, bias, targets); ``n_ignored`` positions get -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64) * scale
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h**0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.1 if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:n_ignored]] = -100
    return hidden, weight, b, targets


def leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]


def run(fn, inputs, upstream):
    """Outputs of ``fn(*inputs)`` (a tuple) and the gradients of ``sum(out * upstream)`` w.r.t. inputs."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    total = sum((o.double() * u).sum() for o, u in zip(outs, upstream, strict=True))
    live = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(total, live)
    return [o.detach().double() for o in outs], [g.double() for g in grads]


def max_errors(values, exact):
    return [(v - e).abs().max().item() for v, e in zip(values, exact, strict=True)]


def reference_errors(fused_fn, naive_fn, master, dtype, n_outputs, seed=1):
    """Max abs errors against float64 of the fused and the naive path, outputs then gradients.

    Returns ``(fused_errors, naive_errors, fused_outputs)``; the upstream gradient is random.
    """
    g = torch.Generator().manual_seed(seed)
    n = master[0].shape[0]
    upstream = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(n_outputs)]
    exact_out, exact_grads = run(naive_fn, leaves(master, torch.float64), upstream)
    naive_out, naive_grads = run(naive_fn, leaves(master, dtype), upstream)
    fused_out, fused_grads = run(fused_fn, leaves(master, dtype), upstream)
    exact = exact_out + exact_grads
    return max_errors(fused_out + fused_grads, exact), max_errors(naive_out + naive_grads, exact), fused_out


def assert_within_rule(fused_errors, naive_errors, what):
    """Output/gradient ``i`` (outputs first): fused error <= 2 x naive error + 1e-6."""
    for i, (err_fused, err_naive) in enumerate(zip(fused_errors, naive_errors, strict=True)):
        assert err_fused <= 2 * err_naive + 1e-6, (
            f"{what}, value {i}: fused error {err_fused:.3g} > 2 x naive {err_naive:.3g} + 1e-6"
        )


def check_against_reference(fused_fn, naive_fn, master, dtype, n_outputs, seed=1):
    fused_errors, naive_errors, fused_out = reference_errors(fused_fn, naive_fn, master, dtype, n_outputs, seed)
    assert_within_rule(fused_errors, naive_errors, f"{dtype}")
    return fused_out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_logprob_odd_shape(dtype, entropy):
    hidden, weight, bias, targets = make_head(41, 48, 1271, dtype)
    kw = dict(temperature=0.7, return_entropy=entropy)
    fused = lambda h, w, b: tao_kernels.linear_logprob(h, w, targets, bias=b, chunk_size=8, backend="torch", **kw)
    naive = lambda h, w, b: naive_logprob(h, w, targets, bias=b, **kw)
    out = check_against_reference(fused, naive, (hidden, weight, bias), dtype, 2 if entropy else 1)
    ignored = targets == -100
    for o in out:
        assert torch.all(o[ignored] == 0)
    assert torch.all(out[0] <= 0)


def test_logprob_ignored_rows_get_no_gradient():
    hidden, weight, _, targets = make_head(16, 8, 50, torch.float32, bias=False, n_ignored=5)
    h, w = leaves((hidden, weight), torch.float32)
    logp, ent = tao_kernels.linear_logprob(h, w, targets, return_entropy=True, backend="torch")
    (logp.sum() + ent.sum()).backward()
    ignored = targets == -100
    assert torch.all(h.grad[ignored] == 0)
    assert torch.all(h.grad[~ignored].abs().sum(1) > 0)


@pytest.mark.parametrize("vocab", [49152, 128256])
def test_logprob_realistic_vocab(vocab):
    hidden, weight, bias, targets = make_head(24, 32, vocab, torch.float32, bias=False)
    fused = lambda h, w: tao_kernels.linear_logprob(h, w, targets, return_entropy=True, backend="torch")
    naive = lambda h, w: naive_logprob(h, w, targets, return_entropy=True)
    check_against_reference(fused, naive, (hidden, weight), torch.float32, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logprob_extreme_logits_stay_finite_and_nonpositive(dtype):
    hidden, weight, bias, targets = make_head(33, 16, 300, dtype, scale=1e4)
    h, w, b = leaves((hidden, weight, bias * 1e4), dtype)
    logp, ent = tao_kernels.linear_logprob(h, w, targets, bias=b, return_entropy=True, chunk_size=5, backend="torch")
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert torch.all(logp <= 0)
    assert torch.all(ent >= -1e-3)
    (logp.sum() + ent.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (h, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kl_exact_against_reference(dtype):
    hidden, weight, bias, targets = make_head(41, 24, 1271, dtype, seed=2)
    ref_hidden, ref_weight, ref_bias, _ = make_head(41, 40, 1271, dtype, seed=3)
    master = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    fused = lambda h, w, b, rh, rw, rb: tao_kernels.linear_kl(
        h, w, rh, rw, targets, bias=b, ref_bias=rb, temperature=1.3, chunk_size=16, backend="torch"
    )
    naive = lambda h, w, b, rh, rw, rb: naive_kl(h, w, rh, rw, targets, bias=b, ref_bias=rb, temperature=1.3)
    kl = check_against_reference(fused, naive, master, dtype, 1)[0]
    assert torch.all(kl[targets == -100] == 0)
    assert torch.all(kl >= -1e-5)


def test_kl_with_itself_is_zero_and_mask_accepted():
    hidden, weight, _, _ = make_head(12, 8, 90, torch.float32, bias=False)
    h, w = hidden.float(), weight.float()
    mask = torch.arange(12) % 3 != 0
    kl = tao_kernels.linear_kl(h, w, h, w, mask, backend="torch")
    assert kl.abs().max().item() < 1e-5
    assert torch.all(kl[~mask] == 0)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimate_formulas_and_mask(kind):
    logp = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -0.5, 80.0])
    d = ref - logp.detach()
    expected = {"k1": -d, "k2": 0.5 * d**2, "k3": torch.exp(d) - 1 - d}[kind]
    mask = torch.tensor([True, True, True, False])
    kl = tao_kernels.kl_estimate(logp, ref, kind, mask=mask)
    torch.testing.assert_close(kl[:3], expected[:3])
    assert kl[3] == 0
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[3] == 0
    if kind == "k3":
        assert torch.all(kl >= 0)


CU = torch.tensor([0, 10, 25, 25, 41])  # four packed sequences, one empty


def policy_inputs(dtype, seed=4):
    hidden, weight, bias, targets = make_head(41, 24, 1271, dtype, seed=seed)
    targets[10:13] = -100
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        logp = naive_logprob(hidden, weight, targets, bias=bias, temperature=0.9).double()
    old = logp + 0.3 * torch.randn(41, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(41, generator=g, dtype=torch.float64)
    adv = torch.randn(41, generator=g, dtype=torch.float64)
    ref_hidden, ref_weight, _, _ = make_head(41, 16, 1271, dtype, seed=seed + 2, bias=False)
    return hidden, weight, bias, targets, adv, old, ref, ref_hidden, ref_weight


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "fixed_length"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3", "exact"])
def test_policy_loss_against_reference(ratio_level, loss_agg, kl_estimator):
    dtype = torch.float32
    hidden, weight, bias, targets, adv, old, ref, ref_hidden, ref_weight = policy_inputs(dtype)
    kw = dict(
        cu_seqlens=CU, ref_logprobs=ref, ref_hidden=ref_hidden.float(), ref_weight=ref_weight.float(),
        kl_coef=0.1, kl_estimator=kl_estimator, clip_low=0.2, clip_high=0.28, ratio_level=ratio_level,
        loss_agg=loss_agg, max_len=16, temperature=0.9,
    )
    fused = lambda h, w, b: (
        tao_kernels.linear_policy_loss(h, w, targets, adv, old, bias=b, chunk_size=6, backend="torch", **kw).loss,
    )
    naive = lambda h, w, b: (naive_policy_loss(h, w, targets, adv, old, bias=b, **kw),)
    check_against_reference(fused, naive, (hidden, weight, bias), dtype, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_policy_loss_half_precision(dtype):
    hidden, weight, bias, targets, adv, old, ref, _, _ = policy_inputs(dtype, seed=7)
    kw = dict(cu_seqlens=CU, ref_logprobs=ref, kl_coef=0.05, clip_low=0.2, clip_high=0.28, temperature=0.9)
    fused = lambda h, w, b: (
        tao_kernels.linear_policy_loss(h, w, targets, adv, old, bias=b, chunk_size=8, backend="torch", **kw).loss,
    )
    naive = lambda h, w, b: (naive_policy_loss(h, w, targets, adv, old, bias=b, **kw),)
    check_against_reference(fused, naive, (hidden, weight, bias), dtype, 1)


def test_policy_loss_metrics():
    hidden, weight, bias, targets, adv, old, ref, _, _ = policy_inputs(torch.float32)
    h, w, b = hidden.float(), weight.float(), bias.float()
    out = tao_kernels.linear_policy_loss(
        h, w, targets, adv, old, cu_seqlens=CU, ref_logprobs=ref, kl_coef=0.1, clip_low=0.1, clip_high=0.1,
        temperature=0.9, bias=b, backend="torch",
    )
    valid = targets != -100
    logp, ent = naive_logprob(h, w, targets, bias=b, temperature=0.9, return_entropy=True)
    torch.testing.assert_close(out.logprobs, logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.entropy, ent, atol=1e-5, rtol=0)
    ratio = torch.where(valid, torch.exp(logp.double() - old), 1.0)
    torch.testing.assert_close(out.ratio.double(), ratio, atol=1e-4, rtol=1e-4)
    outside = ((ratio < 0.9) & (adv < 0)) | ((ratio > 1.1) & (adv > 0))
    assert out.clipped.sum().item() == (outside & valid).sum().item() > 0
    assert out.clip_fraction.item() == pytest.approx((outside & valid).sum().item() / valid.sum().item())
    k3 = torch.exp(ref - logp.double()) - 1 - (ref - logp.double())
    torch.testing.assert_close(out.kl.double(), torch.where(valid, k3, 0.0), atol=1e-4, rtol=1e-4)
    assert not out.loss.requires_grad


def test_policy_loss_fully_ignored_sequence_has_no_nan():
    hidden, weight, bias, targets, adv, old, ref, _, _ = policy_inputs(torch.float32)
    targets[:10] = -100
    old[:10] = float("nan")  # garbage at ignored positions must not leak
    adv[:10] = float("inf")
    ref[:10] = float("nan")
    h, w = leaves((hidden, weight), torch.float32)
    for agg in ("token_mean", "seq_mean", "fixed_length"):
        out = tao_kernels.linear_policy_loss(
            h, w, targets, adv, old, cu_seqlens=CU, ref_logprobs=ref, kl_coef=0.1, loss_agg=agg, max_len=16,
            backend="torch",
        )
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
        assert torch.all(h.grad[:10] == 0)
        h.grad = w.grad = None


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens must run from 0"),
        (dict(loss_agg="fixed_length"), "max_len"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(kl_coef=0.1), "needs ref_logprobs"),
        (dict(kl_coef=0.1, kl_estimator="exact"), "ref_hidden and ref_weight"),
        (dict(ratio_level="seq"), "ratio_level"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_policy_loss_errors_name_the_problem(change, message):
    hidden, weight, _, targets = make_head(12, 8, 40, torch.float32, bias=False)
    kw = dict(cu_seqlens=torch.tensor([0, 4, 12]))
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        tao_kernels.linear_policy_loss(hidden.float(), weight.float(), targets, torch.ones(12), torch.zeros(12), **kw)


def test_logprob_errors_name_the_problem(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="hidden size mismatch"):
        tao_kernels.linear_logprob(torch.zeros(3, 4), torch.zeros(7, 5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        tao_kernels.linear_logprob(torch.zeros(3, 4), torch.zeros(7, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tao_kernels.linear_logprob(torch.zeros(3, 4), torch.zeros(7, 4), torch.zeros(3, dtype=torch.long), backend="triton")


def test_entropy_alone_in_the_loss():
    """The log-prob output unused: its gradient is absent, the entropy's still flows."""
    hidden, weight, bias, targets = make_head(20, 16, 300, torch.float32)
    fused = lambda h, w, b: (
        tao_kernels.linear_logprob(h, w, targets, bias=b, return_entropy=True, chunk_size=6, backend="torch")[1],
    )
    naive = lambda h, w, b: (naive_logprob(h, w, targets, bias=b, return_entropy=True)[1],)
    check_against_reference(fused, naive, (hidden, weight, bias), torch.float32, 1)
