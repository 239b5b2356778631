"""The ``Generator`` protocol: what a generator plugin (registry kind ``"generators"``) provides.

A generator turns prompts into one group of ``params.n`` candidates per prompt (``sample``,
``diverse``, ...). It decides what to ask (templates, temperatures, how many) and calls a
:class:`~tao_core.sampler.Sampler` (``tao_core.sampler.sampler_for(model)``) for the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from tao_core.types import Candidate, Prompt, SamplingParams


@runtime_checkable
class Generator(Protocol):
    """Prompts + sampling parameters -> one group of candidates per prompt."""

    name: str  # the registered name, written to each candidate's ``generator`` field

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]: ...
