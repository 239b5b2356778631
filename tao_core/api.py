"""The Python API: the same operations as the CLI, with the same names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tao_core.models import LoadedModel, load_model
from tao_core.plugins import get_component
from tao_core.types import Candidate, Prompt, SamplingParams


def _as_model(model: str | LoadedModel) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load_model(model)


def generate(
    prompts: Sequence[Prompt | str],
    params: SamplingParams | None = None,
    *,
    model: str | LoadedModel = "smollm2-135m",
    generator: str = "sample",
    **generator_options: Any,
) -> list[list[Candidate]]:
    """Sample one group of ``params.n`` candidates per prompt with a registered generator."""
    lm = _as_model(model)
    ps = [p if isinstance(p, Prompt) else Prompt(id=f"p{i}", text=p) for i, p in enumerate(prompts)]
    gen = get_component("generators", generator)(lm, **generator_options)
    return gen.generate(ps, params or SamplingParams())


__all__ = ["generate", "load_model"]
