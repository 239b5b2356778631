"""Benchmark ``linear_policy_loss`` (GRPO: token-level ratio, clip 0.2/0.28, k3 KL from reference
log-probs, token-mean aggregation) forward + backward.

Providers: tao Triton (CUDA), tao chunked torch, naive eager, naive under ``torch.compile``, and
Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (``loss_type="bnpo"``, the same loss; torch.compile'd on
CUDA, eager on the CPU) when installed. The batch is ``N / 512`` sequences of 512 tokens (Liger needs
them as a ``[B, T, H]`` batch). CSV to stdout, see ``bench/_harness.py``.

    python bench/policy_loss.py --quick      # CPU, N=2048 H=576 V=49152 fp32, one iteration
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tao_kernels  # noqa: E402
from _harness import Provider, importable, main, needs_cuda  # noqa: E402
from tao_kernels.reference import naive_policy_loss  # noqa: E402

SEQ_LEN = 512
SETTINGS = dict(kl_coef=0.04, kl_estimator="k3", clip_low=0.2, clip_high=0.28, loss_agg="token_mean")


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    seq_len = min(SEQ_LEN, n)
    n_seqs = n // seq_len
    n = n_seqs * seq_len
    weight = torch.randn(v, h, generator=g, device=device) / h**0.5
    old = -torch.rand(n, generator=g, device=device) * 5
    return {
        "hidden": torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_(True),
        "weight": weight.to(dtype).requires_grad_(True),
        "targets": torch.randint(0, v, (n,), generator=g, device=device),
        "seq_advantages": torch.randn(n_seqs, generator=g, device=device),
        "old_logprobs": old,
        "ref_logprobs": old + 0.1 * torch.randn(n, generator=g, device=device),
        "cu_seqlens": torch.arange(0, n + 1, seq_len, device=device),
        "seq_len": seq_len,
    }


def _per_token(x: dict) -> torch.Tensor:
    return x["seq_advantages"].repeat_interleave(x["seq_len"])


def _tao(backend: str):
    def run(x: dict) -> torch.Tensor:
        return tao_kernels.linear_policy_loss(
            x["hidden"], x["weight"], x["targets"], _per_token(x), x["old_logprobs"], cu_seqlens=x["cu_seqlens"],
            ref_logprobs=x["ref_logprobs"], compute_entropy=False, backend=backend, **SETTINGS,
        ).loss

    return run


def _naive(x: dict) -> torch.Tensor:
    return naive_policy_loss(
        x["hidden"], x["weight"], x["targets"], _per_token(x), x["old_logprobs"], cu_seqlens=x["cu_seqlens"],
        ref_logprobs=x["ref_logprobs"], **SETTINGS,
    )


def _liger(x: dict) -> torch.Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    n_seqs, seq_len = x["seq_advantages"].shape[0], x["seq_len"]
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=SETTINGS["kl_coef"], compiled=x["hidden"].is_cuda, loss_type="bnpo",
        epsilon_low=SETTINGS["clip_low"], epsilon_high=SETTINGS["clip_high"],
    )
    shape = (n_seqs, seq_len)
    loss, _ = loss_fn(
        x["hidden"].view(*shape, -1), x["weight"], x["targets"].view(shape),
        torch.ones(shape, device=x["hidden"].device), x["seq_advantages"],
        ref_per_token_logps=x["ref_logprobs"].view(shape), old_per_token_logps=x["old_logprobs"].view(shape),
    )
    return loss


PROVIDERS = {
    "tao_triton": Provider(_tao("triton"), needs_cuda, in_quick=False),
    "tao_torch": Provider(_tao("torch")),
    "naive_eager": Provider(_naive),
    "naive_compile": Provider(torch.compile(_naive), in_quick=False),
    "liger": Provider(_liger, lambda device: None if importable("liger_kernel.chunked_loss") else "liger_kernel not installed"),
}

if __name__ == "__main__":
    main("linear_policy_loss", PROVIDERS, make_inputs, quick_shape=(2048, 576, 49152))
