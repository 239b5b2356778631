"""Benchmark ``linear_logprob`` forward + backward with a per-token upstream gradient.

Providers: tao Triton (CUDA), tao chunked torch, naive eager, naive under ``torch.compile``, and
Liger-Kernel's fused linear cross-entropy / cut-cross-entropy when installed (CUDA; their per-token
loss is ``-log p(target)``, so the same work). CSV to stdout, see ``bench/_harness.py``.

    python bench/logprob.py --quick          # CPU, N=4096 H=576 V=49152 fp32, one iteration
    python bench/logprob.py                  # on a GPU: N=16384 H=4096 V=128256 bf16
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tao_kernels  # noqa: E402
from _harness import Provider, importable, main, needs_cuda  # noqa: E402
from tao_kernels.reference import naive_logprob  # noqa: E402


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "hidden": torch.randn(n, h, generator=g, device=device).to(dtype).requires_grad_(True),
        "weight": (torch.randn(v, h, generator=g, device=device) / h**0.5).to(dtype).requires_grad_(True),
        "targets": torch.randint(0, v, (n,), generator=g, device=device),
        "upstream": torch.randn(n, generator=g, device=device),
    }


def _tao(backend: str):
    def run(x: dict) -> torch.Tensor:
        logp = tao_kernels.linear_logprob(x["hidden"], x["weight"], x["targets"], backend=backend)
        return (logp * x["upstream"]).sum()

    return run


def _naive(x: dict) -> torch.Tensor:
    return (naive_logprob(x["hidden"], x["weight"], x["targets"]) * x["upstream"]).sum()


_compiled_naive = torch.compile(_naive)


def _liger(x: dict) -> torch.Tensor:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")(x["weight"], x["hidden"], x["targets"])
    return (-loss.float() * x["upstream"]).sum()


def _cce(x: dict) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(x["hidden"], x["weight"], x["targets"], reduction="none")
    return (-loss.float() * x["upstream"]).sum()


def _missing(module: str):
    return lambda device: needs_cuda(device) or (None if importable(module) else f"{module} not installed")


PROVIDERS = {
    "tao_triton": Provider(_tao("triton"), needs_cuda, in_quick=False),
    "tao_torch": Provider(_tao("torch")),
    "naive_eager": Provider(_naive),
    "naive_compile": Provider(_compiled_naive, in_quick=False),
    "liger": Provider(_liger, _missing("liger_kernel"), in_quick=False),
    "cce": Provider(_cce, _missing("cut_cross_entropy"), in_quick=False),
}

if __name__ == "__main__":
    main("linear_logprob", PROVIDERS, make_inputs, quick_shape=(4096, 576, 49152))
