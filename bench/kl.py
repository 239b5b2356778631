"""Benchmark exact ``linear_kl`` (both models' hidden states) forward + backward, per-token upstream gradient.

Providers: tao Triton (CUDA), tao chunked torch, naive eager and naive under ``torch.compile``
(no public library computes the exact full-vocabulary KL from hidden states). The reference model
is frozen (its inputs need no gradient), as in RL training. CSV to stdout, see ``bench/_harness.py``.

    python bench/kl.py --quick               # CPU, N=1024 H=576 V=49152 fp32, one iteration
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tao_kernels  # noqa: E402
from _harness import Provider, main, needs_cuda  # noqa: E402
from tao_kernels.reference import naive_kl  # noqa: E402


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(v, h, generator=g, device=device) / h**0.5
    return {
        "hidden": torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_(True),
        "weight": weight.to(dtype).requires_grad_(True),
        "ref_hidden": torch.randn(n, h, generator=g, device=device).to(dtype),
        "ref_weight": (weight + 0.1 * torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype),
        "targets": torch.randint(0, v, (n,), generator=g, device=device),
        "upstream": torch.randn(n, generator=g, device=device),
    }


def _tao(backend: str):
    def run(x: dict) -> torch.Tensor:
        kl = tao_kernels.linear_kl(
            x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["targets"], backend=backend
        )
        return (kl * x["upstream"]).sum()

    return run


def _naive(x: dict) -> torch.Tensor:
    kl = naive_kl(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["targets"])
    return (kl * x["upstream"]).sum()


PROVIDERS = {
    "tao_triton": Provider(_tao("triton"), needs_cuda, in_quick=False),
    "tao_torch": Provider(_tao("torch")),
    "naive_eager": Provider(_naive),
    "naive_compile": Provider(torch.compile(_naive), in_quick=False),
}

if __name__ == "__main__":
    main("linear_kl", PROVIDERS, make_inputs, quick_shape=(1024, 576, 49152))
