"""Built-in generators (TAO stage 1)."""

from __future__ import annotations

from collections.abc import Sequence

import tao_core
from tao_core.generation import sampler_for
from tao_core.models import LoadedModel
from tao_core.types import Candidate, Prompt, SamplingParams


class SampleGenerator:
    """``sample``: ``n`` i.i.d. samples per prompt under the task's own prompt."""

    name = "sample"

    def __init__(self, model: LoadedModel) -> None:
        self.sampler = sampler_for(model)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]:
        groups = self.sampler.generate(prompts, params)
        for group in groups:
            for c in group:
                c.generator = self.name
        return groups


@tao_core.hookimpl
def tao_register_generators(register):
    register("sample", SampleGenerator, aliases=("iid",))
