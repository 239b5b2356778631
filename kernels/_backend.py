"""Backend choice: ``"auto"`` picks Triton for CUDA tensors when Triton imports, else chunked PyTorch."""

from __future__ import annotations

import os

import torch

from ._chunked import default_chunk_size
from ._rows import TorchRows

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when the ``triton`` package imports (it has no wheels outside Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` (Triton kernels then run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name (``"triton"`` or ``"torch"``) for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; use backend='torch' on this platform")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before "
                "importing tao_kernels to run the kernels on the CPU, or use backend='torch'"
            )
    return backend


def rows_for(backend: str):
    """The row-math implementation of a resolved backend."""
    if backend == "triton":
        from ._triton import TritonRows

        return TritonRows
    return TorchRows


def chunk_rows(chunk_size: int | None, n_tokens: int, vocab: int, device: torch.device | None = None) -> int:
    """``chunk_size`` validated, or the default for this vocabulary (0 in the custom ops means default)."""
    if chunk_size is None or chunk_size == 0:
        return default_chunk_size(n_tokens, vocab, device)
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return max(1, min(chunk_size, max(n_tokens, 1)))
