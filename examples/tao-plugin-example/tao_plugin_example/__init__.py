"""An example tao plugin: one scorer and one generator, registered through the ``tao`` entry point."""

from __future__ import annotations

import tao_core
from tao_core import Score
from tao_core.sampler import sampler_for


class ConciseScorer:
    """Scores ``1 / (1 + words / target_words)``: shorter answers score higher; empty ones abstain."""

    name = "concise"
    version = "1"

    def __init__(self, target_words: int = 20) -> None:
        self.target_words = target_words

    def score(self, prompt, candidates):
        out = []
        for c in candidates:
            words = len(c.text.split())
            if words == 0:
                out.append(Score.abstain("empty completion", scorer=self.name, version=self.version))
            else:
                out.append(Score.ok(1.0 / (1.0 + words / self.target_words), scorer=self.name, version=self.version))
        return out


class SystemPromptedGenerator:
    """Samples every prompt under a fixed system prompt; candidates are marked with that template."""

    name = "system-prompted"

    def __init__(self, model, system: str = "Answer in one short sentence.") -> None:
        self.sampler = sampler_for(model)
        self.system = system

    def generate(self, prompts, params):
        wrapped = [
            tao_core.Prompt(id=p.id, messages=[{"role": "system", "content": self.system}, *p.as_messages()],
                            task=p.task, metadata=p.metadata)
            for p in prompts
        ]
        groups = self.sampler.sample(wrapped, params)
        for group in groups:
            for c in group:
                c.generator, c.template = self.name, "system-prompted"
        return groups


@tao_core.hookimpl
def tao_register_scorers(register):
    register("concise", ConciseScorer)


@tao_core.hookimpl
def tao_register_generators(register):
    register("system-prompted", SystemPromptedGenerator)
