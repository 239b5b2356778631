"""``nn.Linear`` modules applied through oneDNN on CPU, reading the module's own weight tensor.

PyTorch sends a float32 ``nn.Linear`` on CPU to MKL's ``sgemm``, which on AMD processors runs an
AVX2 code path; oneDNN picks its kernels from the CPU's features alone and uses AVX-512 where the
CPU has it. On the AMD EPYC (Zen 5) we benchmark on, one thread, float32, ``[128, 576] x [576,
1536]``: MKL 96 GFLOP/s, oneDNN 212 GFLOP/s; the ``[128, 576] x [576, 49152]`` LM head: 80 vs 204.

``torch.ops.mkldnn._linear_pointwise`` is the op Inductor uses for CPU linears; given a plain
(strided) weight it multiplies by that tensor directly: no packed copy of the weights is made or
kept, so an optimizer step is seen by the next call. Anything other than a plain ``nn.Linear``
(a peft LoRA layer, a quantized layer) is called as a module, so its own forward applies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tao_core import onednn

LinearFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def module_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``: the module's own forward."""
    return module(x)


def _onednn_linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` through oneDNN for a plain ``nn.Linear``; other modules run their forward."""
    if type(module) is not torch.nn.Linear:
        return module(x)
    return onednn.linear(x.contiguous(), module.weight, module.bias)


def linear_for(device: torch.device, dtype: torch.dtype) -> LinearFn:
    """The linear to use for parameters on ``device`` in ``dtype``: oneDNN for float32 on CPU when it
    is available and agrees with ``F.linear``, else the module's own forward."""
    if device.type != "cpu" or dtype != torch.float32:
        return module_linear
    return _onednn_linear if onednn.available() else module_linear
