"""Named weight sets: other parameters the engine can sample with, sharing the rest with the policy.

The policy (``"policy"``) is the model's own parameters. A weight set overrides some of them by
name (a frozen or EMA teacher, a reference model): only those tensors are held, everything else
is the policy's tensor itself, never copied. A request names its set; the engine runs each set's
requests in forwards of their own, with the set's tensors swapped into the modules for the
duration of that forward (:func:`torch.nn.utils.stateless._reparametrize_module`), so the
runner, its linears and kernels read them exactly as they read the policy's.

The set holds the caller's tensors, not copies: an in-place update (an EMA step) is seen by the
next forward, and its version check (:meth:`WeightSet.version`) drops the set's cached prefixes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.nn.utils.stateless import _reparametrize_module

from tao_core.errors import TaoInputError

POLICY = "policy"  # the model's own parameters


@dataclass
class WeightSet:
    """A named override of some of the model's parameters."""

    name: str
    tensors: dict[str, torch.Tensor]  # as given: parameter name -> tensor
    swap: dict[str, torch.Tensor]  # every name the forward reads them under (tied aliases included)

    @property
    def salt(self) -> bytes:
        """Prefix-index salt: a set never finds another set's cached blocks."""
        return b"weight-set\0" + self.name.encode() + b"\0"

    def version(self) -> int:
        """Changes whenever one of the set's tensors is modified in place or replaced."""
        return hash(tuple((t.data_ptr(), t._version) for t in self.tensors.values()))


def make_weight_set(model: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> WeightSet:
    """Check ``tensors`` against ``model``'s parameters and build the set; errors name the parameter."""
    if not isinstance(name, str) or not name or name == POLICY:
        raise TaoInputError(f"weight set name must be a non-empty string other than {POLICY!r}, got {name!r}")
    if not isinstance(tensors, dict) or not tensors:
        raise TaoInputError(f"weight set {name!r}: give a non-empty dict of parameter name -> tensor")
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, t in tensors.items():
        p = params.get(key)
        if p is None:
            example = next(iter(params), "")
            raise TaoInputError(
                f"weight set {name!r}: the model has no parameter {key!r} (names as in "
                f"model.named_parameters(), e.g. {example!r})"
            )
        if not isinstance(t, torch.Tensor):
            raise TaoInputError(f"weight set {name!r}: {key} must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device:
            raise TaoInputError(
                f"weight set {name!r}: {key} is {tuple(t.shape)} {t.dtype} on {t.device}, the model's is "
                f"{tuple(p.shape)} {p.dtype} on {p.device}; give a tensor of the same shape, dtype and device"
            )
    # a parameter tied to another (an embedding shared with the LM head) is read under both names
    swap = dict(tensors)
    for alias, p in params.items():
        if alias not in swap:
            for key in tensors:
                if params[key] is p:
                    swap[alias] = tensors[key]
                    break
    return WeightSet(name, dict(tensors), swap)


@contextlib.contextmanager
def swapped_in(model: torch.nn.Module, ws: WeightSet | None) -> Iterator[None]:
    """Within the block ``model``'s modules hold ``ws``'s tensors (nothing is swapped for None)."""
    if ws is None:
        yield
        return
    with _reparametrize_module(model, dict(ws.swap)):
        yield
