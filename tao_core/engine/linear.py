"""``nn.Linear`` modules applied through oneDNN on CPU, reading the module's own weight tensor.

PyTorch sends a float32 ``nn.Linear`` on CPU to MKL's ``sgemm``, which on AMD processors runs an
AVX2 code path; oneDNN picks its kernels from the CPU's features alone and uses AVX-512 where the
CPU has it. On the AMD EPYC (Zen 5) we benchmark on, one thread, float32, ``[128, 576] x [576,
1536]``: MKL 96 GFLOP/s, oneDNN 212 GFLOP/s; the ``[128, 576] x [576, 49152]`` LM head: 80 vs 204.

``torch.ops.mkldnn._linear_pointwise`` is the op Inductor uses for CPU linears; given a plain
(strided) weight it multiplies by that tensor directly: no packed copy of the weights is made or
kept, so an optimizer step is seen by the next call. Anything other than a plain ``nn.Linear``
(a peft LoRA layer, a quantized layer) is called as a module, so its own forward applies.

:class:`PackedLinears` (``EngineConfig(pack_weights=True)``, what ``tao serve`` uses) multiplies by a
copy of each weight reordered once into oneDNN's blocked layout instead: a second copy of the linear
weights in memory, repacked when a weight changes (its data pointer or in-place version counter), for
about a fifth less time per decode step (SmolLM2-135M, 32 rows, 2-core AMD EPYC: 85-87 ms instead of
105-111 ms). Writes that change a weight without either (a fused optimizer step on CPU, buffers swapped
in with ``param.data = ...``, writes through ``param.data`` or a numpy view) are not seen:
:meth:`tao_core.engine.Engine.weights_changed` drops every copy (and the engine's cached prefixes,
which rely on the same signal).
"""

from __future__ import annotations

import weakref
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


class PackedLinears:
    """``(module, x) -> x @ W.T + b`` for plain ``nn.Linear`` modules with ``W`` packed by oneDNN (see the
    module docstring); other modules run their forward.

    One packed copy per weight tensor (a weight set's tensors get their own), made on first use and
    again whenever that tensor's ``(data_ptr, _version)`` changes; it is dropped when the tensor is
    freed. Each entry holds the storage it was packed from, so a new tensor cannot take that address
    and pass for it; :meth:`clear` drops everything (writes the stamp cannot see).
    """

    def __init__(self) -> None:
        # id(weight) -> (weakref to it, (data_ptr, _version) when packed, packed copy, the packed-from storage)
        self._packed: dict[int, tuple[weakref.ref, tuple[int, int], torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._packed)

    def clear(self) -> None:
        """Drop every packed copy: each weight is packed again at its next use."""
        self._packed.clear()

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if type(module) is not torch.nn.Linear:
            return module(x)
        w = module.weight
        entry = self._packed.get(id(w))
        stamp = (w.data_ptr(), w._version)
        if entry is None or entry[0]() is not w or entry[1] != stamp:
            entry = self._pack(w, stamp)
        return onednn.packed_linear(x, entry[2], module.bias)

    def _pack(self, w: torch.Tensor, stamp: tuple[int, int]) -> tuple[weakref.ref, tuple[int, int], torch.Tensor,
                                                                      torch.Tensor]:
        key, table = id(w), self._packed

        def forget(ref: weakref.ref) -> None:  # the weight was freed: free its copy (unless repacked since)
            if key in table and table[key][0] is ref:
                del table[key]

        entry = (weakref.ref(w, forget), stamp, onednn.pack_weight(w), w.detach())
        table[key] = entry
        return entry


def linear_for(device: torch.device, dtype: torch.dtype, *, pack: bool = False) -> LinearFn:
    """The linear to use for parameters on ``device`` in ``dtype``: oneDNN for float32 on CPU when it
    is available and agrees with ``F.linear`` (over packed weight copies with ``pack``, when packing
    agrees too), else the module's own forward."""
    if device.type != "cpu" or dtype != torch.float32 or not onednn.available():
        return module_linear
    return PackedLinears() if pack and onednn.packing_available() else _onednn_linear
