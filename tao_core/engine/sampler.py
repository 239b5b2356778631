"""``EngineSampler``: the :class:`~tao_core.sampler.Sampler` over the engine.

The thin text layer around the token-level engine: chat templating through ``LoadedModel``, stop
strings checked on an incremental decode of each sample's recent tokens, and the final cut with
:func:`~tao_core.completion.finish_completion`, shared with the Hugging Face sampler.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

from tao_core.completion import finish_completion, top_logprobs_metadata
from tao_core.engine.core import Engine, EngineConfig
from tao_core.engine.scheduler import EngineRequest
from tao_core.models import LoadedModel
from tao_core.types import Candidate, Prompt, SamplingParams


def stop_string_checker(tokenizer, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """A check that a sample's text now contains a stop string, decoding only its last tokens.

    The window is long enough for any stop string even when each character takes four byte tokens;
    a string completed at this step lies inside it (earlier completions were caught earlier).
    """
    if not stop:
        return None
    window = 4 * max(len(s) for s in stop) + 8
    stops = list(stop)

    def check(token_ids: list[int]) -> bool:
        text = tokenizer.decode(token_ids[-window:], skip_special_tokens=True)
        return any(s in text for s in stops)

    return check


def prompt_seed(seed: int | None, prompt_id: str) -> int | None:
    """The engine seed of one prompt: its samples depend on the run's seed and its id only."""
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{prompt_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EngineSampler:
    """Samples with tao's in-process engine (Llama-family models); see :mod:`tao_core.engine`."""

    name = "engine"

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.lm = model
        self.config = config or EngineConfig()
        self.engine = Engine(model.model, eos_token_ids=model.eos_token_ids, config=self.config)

    def release(self) -> None:
        """Free the KV-cache memory until the next ``sample`` call."""
        self.engine.release_cache()

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]:
        params.validate()
        if self.lm.model is not self.engine.model:  # the model was replaced (e.g. wrapped by peft)
            self.engine.release_cache()
            self.engine = Engine(self.lm.model, eos_token_ids=self.lm.eos_token_ids, config=self.config)
        tok = self.lm.tokenizer
        encoded = [self.lm.prompt_token_ids(p) for p in prompts]
        checker = stop_string_checker(tok, params.stop)
        requests = [
            EngineRequest(ids, dataclasses.replace(params, seed=prompt_seed(params.seed, p.id)), stop_checker=checker)
            for p, ids in zip(prompts, encoded, strict=True)
        ]
        results = self.engine.run(requests)
        stop_ids = [*self.lm.eos_token_ids, *params.stop_token_ids]
        temp = params.logprob_temperature
        groups: list[list[Candidate]] = []
        for prompt, ids, res in zip(prompts, encoded, results, strict=True):
            if res.error is not None:
                groups.append([
                    Candidate(prompt.id, j, "", list(ids), [], [], "error", temp, self.name, metadata={"error": res.error})
                    for j in range(params.n)
                ])
                continue
            group = []
            for j, s in enumerate(res.samples):
                out_ids, lps, text, finish = finish_completion(
                    tok, s.token_ids, s.logprobs, stop=params.stop, stop_token_ids=stop_ids
                )
                group.append(Candidate(
                    prompt_id=prompt.id,
                    index=j,
                    text=text,
                    prompt_token_ids=list(ids),
                    token_ids=out_ids,
                    logprobs=lps,
                    finish_reason="stop" if "stop" in (finish, s.finish_reason) else finish,
                    temperature=temp,
                    generator=self.name,
                    metadata=top_logprobs_metadata(s.top_logprobs, len(out_ids)),
                ))
            groups.append(group)
        return groups
