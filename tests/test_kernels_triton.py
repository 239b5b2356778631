"""The Triton kernels of tao_kernels, run on the CPU by Triton's interpreter, against float64.

Triton decides at ``@triton.jit`` time whether to interpret, so the kernels must be imported in a
process started with ``TRITON_INTERPRET=1``: the module fixture runs this file as a script in such a
subprocess (``python -m tests.test_kernels_triton``), which computes every case's errors and prints
them as JSON; the tests here apply the tolerance rule to them. Shapes are tiny: the interpreter runs
each program in numpy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tao_kernels
import torch
from tao_kernels.reference import naive_kl, naive_logprob, naive_policy_loss

from tests.test_kernels import CU, assert_within_rule, leaves, make_head, policy_inputs, reference_errors

REPO = Path(__file__).resolve().parents[1]


def _logprob_case(dtype, entropy, n=41, h=48, v=1271, chunk=16):
    hidden, weight, bias, targets = make_head(n, h, v, dtype)
    kw = dict(temperature=0.7, return_entropy=entropy)
    fused = lambda hh, w, b: tao_kernels.linear_logprob(hh, w, targets, bias=b, chunk_size=chunk, backend="triton", **kw)
    naive = lambda hh, w, b: naive_logprob(hh, w, targets, bias=b, **kw)
    fused_err, naive_err, out = reference_errors(fused, naive, (hidden, weight, bias), dtype, 2 if entropy else 1)
    ignored = targets == -100
    zero_at_ignored = all(bool(torch.all(o[ignored] == 0)) for o in out)
    return {"fused": fused_err, "naive": naive_err, "ok": zero_at_ignored and bool(torch.all(out[0] <= 0))}


def _extreme_case():
    hidden, weight, bias, targets = make_head(33, 16, 300, torch.float32, scale=1e4)
    h, w, b = leaves((hidden, weight, bias * 1e4), torch.float32)
    logp, ent = tao_kernels.linear_logprob(h, w, targets, bias=b, return_entropy=True, chunk_size=5, backend="triton")
    (logp.sum() + ent.sum()).backward()
    finite = bool(torch.isfinite(logp).all() and torch.isfinite(ent).all())
    grads_finite = all(bool(torch.isfinite(t.grad).all()) for t in (h, w, b))
    return {"fused": [], "naive": [], "ok": finite and grads_finite and bool(torch.all(logp <= 0))}


def _kl_case(dtype):
    hidden, weight, bias, targets = make_head(41, 24, 1271, dtype, seed=2)
    ref_hidden, ref_weight, ref_bias, _ = make_head(41, 40, 1271, dtype, seed=3)
    master = (hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    fused = lambda h, w, b, rh, rw, rb: tao_kernels.linear_kl(
        h, w, rh, rw, targets, bias=b, ref_bias=rb, temperature=1.3, chunk_size=16, backend="triton"
    )
    naive = lambda h, w, b, rh, rw, rb: naive_kl(h, w, rh, rw, targets, bias=b, ref_bias=rb, temperature=1.3)
    fused_err, naive_err, out = reference_errors(fused, naive, master, dtype, 1)
    return {"fused": fused_err, "naive": naive_err, "ok": bool(torch.all(out[0][targets == -100] == 0))}


def _policy_case(dtype, ratio_level, loss_agg, kl_estimator):
    hidden, weight, bias, targets, adv, old, ref, ref_hidden, ref_weight = policy_inputs(dtype)
    kw = dict(
        cu_seqlens=CU, ref_logprobs=ref, ref_hidden=ref_hidden, ref_weight=ref_weight, kl_coef=0.1,
        kl_estimator=kl_estimator, clip_low=0.2, clip_high=0.28, ratio_level=ratio_level, loss_agg=loss_agg,
        max_len=16, temperature=0.9,
    )
    fused = lambda h, w, b: (
        tao_kernels.linear_policy_loss(h, w, targets, adv, old, bias=b, chunk_size=6, backend="triton", **kw).loss,
    )
    naive = lambda h, w, b: (naive_policy_loss(h, w, targets, adv, old, bias=b, **kw),)
    fused_err, naive_err, _ = reference_errors(fused, naive, (hidden, weight, bias), dtype, 1)
    return {"fused": fused_err, "naive": naive_err, "ok": True}


CASES = {
    "logprob-fp32-entropy": lambda: _logprob_case(torch.float32, True),
    "logprob-bf16-entropy": lambda: _logprob_case(torch.bfloat16, True),
    "logprob-fp16": lambda: _logprob_case(torch.float16, False),
    "logprob-vocab49152": lambda: _logprob_case(torch.float32, True, n=6, h=32, v=49152, chunk=4),
    "logprob-extreme-logits": _extreme_case,
    "kl-fp32": lambda: _kl_case(torch.float32),
    "kl-bf16": lambda: _kl_case(torch.bfloat16),
    "kl-fp16": lambda: _kl_case(torch.float16),
    "policy-token-seq_mean-exact": lambda: _policy_case(torch.float32, "token", "seq_mean", "exact"),
    "policy-sequence-fixed_length-k3": lambda: _policy_case(torch.float32, "sequence", "fixed_length", "k3"),
    "policy-token-token_mean-k2-bf16": lambda: _policy_case(torch.bfloat16, "token", "token_mean", "k2"),
}


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_kernels_triton"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_kernel_under_interpreter(interpreted, case):
    result = interpreted[case]
    assert "error" not in result, f"{case} raised in the interpreter: {result.get('error')}"
    assert result["ok"], f"{case}: ignored positions, sign or finiteness check failed"
    assert_within_rule(result["fused"], result["naive"], case)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (the pytest fixture does)")
    results = {}
    for name, case in CASES.items():
        try:
            results[name] = case()
        except Exception as exc:  # reported per case by the test above
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))
