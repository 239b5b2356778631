"""The Python API: the same operations as the CLI, with the same names."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tao_core.config import RunConfig
from tao_core.errors import TaoInputError
from tao_core.models import LoadedModel, load_model
from tao_core.plugins import get_component
from tao_core.types import Candidate, Prompt, SamplingParams

if TYPE_CHECKING:
    from tao_core.sft import SftResult


def _as_model(model: str | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def generate(
    prompts: Sequence[Prompt | str],
    params: SamplingParams | None = None,
    *,
    model: str | LoadedModel = "smollm2-135m",
    generator: str | None = None,
    **generator_options: Any,
) -> list[list[Candidate]]:
    """Sample one group of ``params.n`` candidates per prompt: with a registered generator, or with
    none (``generator=None``) straight from the model's sampler (:func:`tao_core.sampler.sampler_for`)."""
    lm = _as_model(model)
    if isinstance(prompts, str | Prompt):  # one prompt, not a sequence of characters
        prompts = [prompts]
    ps = [p if isinstance(p, Prompt) else Prompt(id=f"p{i}", text=p) for i, p in enumerate(prompts)]
    if generator is None:
        if generator_options:
            raise TaoInputError(f"generator options {sorted(generator_options)} need a generator; name one")
        from tao_core.sampler import sampler_for

        return sampler_for(lm).sample(ps, params or SamplingParams())
    gen = get_component("generators", generator)(lm, **generator_options)
    return gen.generate(ps, params or SamplingParams())


def sft(
    config: str | os.PathLike | RunConfig,
    *,
    examples: int | None = None,
    epochs: int = 1,
    overrides: dict[str, Any] | None = None,
    output_dir: str | None = None,
    eval_each_epoch: bool = True,
    progress: bool = True,
    lm: LoadedModel | None = None,
) -> SftResult:
    """Supervised fine-tuning on the task's labeled training prompts (``tao sft``).

    ``config`` is a TOML run config path (as for ``tao run``) or a :class:`RunConfig`;
    ``overrides`` maps dotted keys to values (``{"train.lr": 1e-5}``, the CLI's ``--set``);
    ``output_dir`` defaults to the config's ``output_dir`` with ``-sft`` appended. See
    :func:`tao_core.sft.sft` for the rest.
    """
    from tao_core.config import load_config
    from tao_core.sft import sft as run_sft

    if isinstance(config, RunConfig):
        cfg = copy.deepcopy(config)
        if overrides:
            raise TaoInputError("overrides apply to a TOML config path; set the fields of a RunConfig directly")
    else:
        cfg = load_config(config, overrides)
    cfg.output_dir = output_dir or f"{cfg.output_dir.rstrip('/')}-sft"
    return run_sft(cfg, examples=examples, epochs=epochs, eval_each_epoch=eval_each_epoch, progress=progress, lm=lm)


__all__ = ["generate", "load_model", "sft"]
