"""``EngineSampler``: the :class:`~tao_core.sampler.Sampler` over the engine.

The thin text layer around the token-level engine: chat templating through ``LoadedModel``, stop
strings checked on an incremental decode of each sample's recent tokens, and the final cut with
:func:`~tao_core.completion.finish_completion`, shared with the Hugging Face sampler. Weight sets
registered here are kept and registered again with the engine built when the model is replaced.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import torch

from tao_core.completion import finish_completion, top_logprobs_metadata
from tao_core.engine.core import Engine, EngineConfig
from tao_core.engine.scheduler import EngineRequest
from tao_core.engine.weights import POLICY
from tao_core.errors import TaoInputError
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


def replaced_model_error(error: TaoInputError, name: str) -> TaoInputError:
    """``error`` (weight set ``name`` refused by a model that replaced the one it was registered
    for) with what happened and what to do."""
    return TaoInputError(
        f"{error}. Weight set {name!r} was registered before the model was replaced (e.g. wrapped with LoRA "
        f"adapters), whose parameter names it no longer matches: remove_weight_set({name!r}) and register one "
        "built from the current model (create the Teacher after the Trainer)"
    )


def mark_weight_set(candidate: Candidate, weight_set: str) -> None:
    """Record on ``candidate`` that it was drawn from ``weight_set`` when that is not the policy:
    ``metadata["weight_set"]`` and ``metadata["off_policy"] = True`` (its log-probs are the set's)."""
    if weight_set != POLICY:
        candidate.metadata = {**candidate.metadata, "weight_set": weight_set, "off_policy": True}


class EngineSampler:
    """Samples with tao's in-process engine (Llama-family models); see :mod:`tao_core.engine`."""

    name = "engine"

    def __init__(self, model: LoadedModel, config: EngineConfig | None = None) -> None:
        self.lm = model
        self.config = config or EngineConfig()
        self.engine = Engine(model.model, eos_token_ids=model.eos_token_ids, config=self.config)
        self._weight_sets: dict[str, dict[str, torch.Tensor]] = {}  # name -> tensors, as registered

    def release(self) -> None:
        """Free the KV-cache memory until the next ``sample`` call."""
        self.engine.release_cache()

    def _current_engine(self) -> Engine:
        """The engine over ``lm.model``: rebuilt, with the weight sets registered again, when the
        model was replaced (e.g. wrapped by peft)."""
        if self.lm.model is not self.engine.model:
            self.engine.release_cache()
            engine = Engine(self.lm.model, eos_token_ids=self.lm.eos_token_ids, config=self.config)
            for name, tensors in self._weight_sets.items():
                try:
                    engine.add_weight_set(name, tensors)
                except TaoInputError as e:
                    raise replaced_model_error(e, name) from None
            self.engine = engine
        return self.engine

    @property
    def weight_sets(self) -> list[str]:
        return [POLICY, *self._weight_sets]

    def add_weight_set(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Register weight set ``name`` (``{parameter name: tensor}``, held as given, not copied) with
        the engine; see :meth:`Engine.add_weight_set`."""
        self._current_engine().add_weight_set(name, tensors)
        self._weight_sets[name] = dict(tensors)

    def remove_weight_set(self, name: str) -> None:
        """Remove weight set ``name`` (also when it no longer fits a model that replaced the old one)."""
        if name not in self._weight_sets:
            raise TaoInputError(f"no weight set {name!r}; the sampler has {', '.join(self.weight_sets)}")
        if self.lm.model is self.engine.model:  # else the engine is rebuilt without it at the next call
            self.engine.remove_weight_set(name)
        del self._weight_sets[name]

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, *,
               weight_set: str = POLICY) -> list[list[Candidate]]:
        params.validate()
        engine = self._current_engine()
        if weight_set not in engine.weight_sets:
            raise TaoInputError(f"unknown weight set {weight_set!r}; the sampler has {', '.join(engine.weight_sets)} "
                                "(register one with add_weight_set, e.g. Teacher.attach)")
        tok = self.lm.tokenizer
        encoded = [self.lm.prompt_token_ids(p) for p in prompts]
        checker = stop_string_checker(tok, params.stop)
        requests = [
            EngineRequest(ids, dataclasses.replace(params, seed=prompt_seed(params.seed, p.id)), stop_checker=checker,
                          weight_set=weight_set)
            for p, ids in zip(prompts, encoded, strict=True)
        ]
        results = engine.run(requests)
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
        for group in groups:
            for c in group:
                mark_weight_set(c, weight_set)
        return groups
