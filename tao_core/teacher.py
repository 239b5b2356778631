"""Teachers: voters on weights apart from the policy, held as a named weight set of the samplers.

Label-free rewards from the policy's own majority drift with the policy: the voters learn what the
policy learns, agree more and more, and the majority locks onto its errors. A teacher samples the
voters from other weights: the starting weights (:meth:`Teacher.frozen`, refreshed when a round is
promoted) or an exponential moving average that follows the policy slowly (:meth:`Teacher.ema`,
the "mean teacher" of Tarvainen & Valpola 2017, https://arxiv.org/abs/1703.01780).

A teacher holds one tensor per trainable parameter of the model (``requires_grad``), named as in
``model.named_parameters()``; every other parameter is the policy's own, shared by the samplers'
weight sets (:meth:`tao_core.engine.Engine.add_weight_set`). Its tensors are registered once
(:meth:`Teacher.attach`) and updated in place, so the engine sees every update: a changed tensor
drops the set's cached prefixes at the next engine step.

Memory (the tensors and nothing else):

- full fine-tuning: every parameter is trainable, so a teacher is a second copy of the weights (4
  bytes per parameter in float32: 540 MB for SmolLM2-135M);
- LoRA: only the adapters are trainable, so a teacher is a second adapter (a few MB at rank 16);
- an EMA teacher of a model held in bfloat16 or float16 also keeps a float32 accumulator of the same
  parameters (2 more bytes per parameter for bfloat16), since an EMA step ``(1 - rate) * (policy -
  teacher)`` is mostly below half a bfloat16 unit of the teacher's value and would be rounded away.

Create a teacher on the model in its final form: after the :class:`~tao_core.train.Trainer` (which
wraps it with LoRA adapters when ``train.lora``), since the adapters are what a LoRA teacher copies.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tao_core.errors import TaoInputError
from tao_core.models import LoadedModel
from tao_core.sampler import Sampler

LOW_PRECISION = (torch.bfloat16, torch.float16)  # an EMA of these accumulates in float32


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters an optimizer updates: ``{name: parameter}`` for every ``requires_grad`` one."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class Teacher:
    """A named weight set over a model's trainable parameters: frozen, or an EMA of the policy.

    ``rate`` is the EMA rate, ``teacher = rate * teacher + (1 - rate) * policy`` at each
    :meth:`update`; a frozen teacher has rate 1 (``update`` leaves it as it is).
    """

    def __init__(self, lm: LoadedModel, *, rate: float, name: str = "teacher") -> None:
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
            raise TaoInputError(f"teacher {name!r}: the EMA rate must be a number in [0, 1] (1: frozen), got {rate!r}")
        if not isinstance(name, str) or not name or name == "policy":
            raise TaoInputError(f"teacher: the weight set name must be a non-empty string other than 'policy', got {name!r}")
        self.lm = lm
        self.name = name
        self.rate = float(rate)
        self._model = lm.model  # the model whose parameters it follows
        self._policy = trainable(lm.model)
        if not self._policy:
            raise TaoInputError(f"teacher {name!r}: model {lm.name} has no trainable parameter (requires_grad) to copy")
        with torch.no_grad():
            # clone keeps each parameter's layout (K-major CPU linears stay K-major)
            self.tensors: dict[str, torch.Tensor] = {n: p.detach().clone() for n, p in self._policy.items()}
            self._master: dict[str, torch.Tensor] = {
                n: p.detach().float() for n, p in self._policy.items() if self.rate < 1.0 and p.dtype in LOW_PRECISION
            }

    @classmethod
    def frozen(cls, lm: LoadedModel, name: str = "teacher") -> Teacher:
        """A copy of the model's trainable parameters as they are now: the starting weights.

        Memory: a second copy of the trainable weights (full fine-tuning: the whole model; LoRA: a
        second adapter). :meth:`refresh` moves it to the current policy (on promotion).
        """
        return cls(lm, rate=1.0, name=name)

    @classmethod
    def ema(cls, lm: LoadedModel, rate: float, name: str = "teacher") -> Teacher:
        """A copy that follows the policy slowly: ``teacher = rate * teacher + (1 - rate) * policy``
        at each :meth:`update` (``rate`` in [0, 1); 0.99 averages over about the last 100 steps).

        Memory: a second copy of the trainable weights (full fine-tuning: the whole model; LoRA: a
        second adapter), plus a float32 accumulator when the model is in bfloat16 or float16.
        """
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
            raise TaoInputError(f"teacher {name!r}: the EMA rate must be in [0, 1) (1 would never move: use "
                                f"Teacher.frozen), got {rate!r}")
        return cls(lm, rate=rate, name=name)

    @property
    def kind(self) -> str:
        return "frozen" if self.rate == 1.0 else "ema"

    def _live_policy(self) -> dict[str, torch.nn.Parameter]:
        if self.lm.model is not self._model:
            raise TaoInputError(
                f"teacher {self.name!r}: the model was replaced since the teacher was made (e.g. wrapped with LoRA "
                "adapters); make the teacher after the Trainer, on the model it will follow"
            )
        return self._policy

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step after an optimizer step, in place: ``teacher.lerp_(policy, 1 - rate)``, i.e.
        ``teacher = rate * teacher + (1 - rate) * policy``. A frozen teacher is left as it is."""
        if self.rate == 1.0:
            return
        weight = 1.0 - self.rate
        for n, p in self._live_policy().items():
            master = self._master.get(n)
            if master is None:
                self.tensors[n].lerp_(p.detach(), weight)
            else:
                master.lerp_(p.detach().float(), weight)
                self.tensors[n].copy_(master)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the current policy in (voters refreshed when a round is promoted)."""
        for n, p in self._live_policy().items():
            self.tensors[n].copy_(p.detach())
            if n in self._master:
                self._master[n].copy_(p.detach())

    def attach(self, sampler: Sampler) -> None:
        """Register the teacher's tensors with ``sampler`` as weight set :attr:`name`; from then on
        ``sampler.sample(..., weight_set=name)`` draws from the teacher, and every in-place update is
        seen by the next sample."""
        sampler.add_weight_set(self.name, self.tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{parameter name: tensor}`` (safetensors-ready): the float32 accumulator where one is kept."""
        return {n: self._master.get(n, t).detach().clone() for n, t in self.tensors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Continue from :meth:`state_dict`, copying into the registered tensors in place."""
        missing = sorted(set(self.tensors) - set(state))
        extra = sorted(set(state) - set(self.tensors))
        if missing or extra:
            raise TaoInputError(
                f"teacher {self.name!r}: the saved state does not fit this model's trainable parameters "
                f"(missing {missing[:3]}, unexpected {extra[:3]}); was it saved with the same model and lora setting?"
            )
        for n, t in self.tensors.items():
            saved = state[n]
            if not isinstance(saved, torch.Tensor) or saved.shape != t.shape:
                got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
                raise TaoInputError(f"teacher {self.name!r}: saved {n} is {got}, the model's is {tuple(t.shape)}")
        for n, t in self.tensors.items():
            if n in self._master:
                self._master[n].copy_(state[n])
                t.copy_(self._master[n])
            else:
                t.copy_(state[n])
