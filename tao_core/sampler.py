"""Samplers: the token-level backends a generator calls, and the choice of one for a model.

A sampler turns prompts into one group of ``params.n`` candidates per prompt, each carrying its
prompt and completion token ids and per-token log-probs under the project's definition
(``log_softmax(logits / temperature)`` before truncation, see :class:`tao_core.types.Candidate`).
Two exist: :class:`~tao_core.engine.EngineSampler` (tao's in-process engine, Llama-family models)
and :class:`HFSampler` (``transformers``' ``generate``, any causal LM). A model's declared
``LoadedModel.sampler_backend`` (``load_model(..., sampler=...)``) says which one
:func:`sampler_for` builds.

Both sample with a named weight set as well as the policy: ``add_weight_set(name, {parameter name:
tensor})`` registers one (a frozen or EMA teacher, :mod:`tao_core.teacher`) and
``sample(..., weight_set=name)`` draws from it; every parameter the set does not name is the
policy's own. A candidate drawn from a set other than ``"policy"`` carries
``metadata["weight_set"]`` and ``metadata["off_policy"] = True``: its log-probs are the set's, not
the policy's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from tao_core.completion import finish_completion, top_logprobs_metadata
from tao_core.engine import POLICY, EngineSampler, unsupported_reason
from tao_core.engine.sampler import mark_weight_set, replaced_model_error
from tao_core.engine.weights import WeightSet, make_weight_set, swapped_in
from tao_core.errors import TaoInputError
from tao_core.models import SAMPLER_BACKENDS, LoadedModel
from tao_core.types import Candidate, Prompt, SamplingParams

__all__ = ["SAMPLER_BACKENDS", "HFSampler", "Sampler", "mark_weight_set", "sampler_for"]


@runtime_checkable
class Sampler(Protocol):
    """Prompts + sampling parameters -> one group of ``params.n`` candidates per prompt, drawn from
    the policy or from a weight set registered with ``add_weight_set``."""

    name: str  # written to each candidate's ``generator`` field ("engine", "hf-generate")

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, *,
               weight_set: str = POLICY) -> list[list[Candidate]]: ...

    def add_weight_set(self, name: str, tensors: dict[str, torch.Tensor]) -> None: ...

    def remove_weight_set(self, name: str) -> None: ...


class HFSampler:
    """Samples with ``transformers`` ``generate``: works for any causal LM, slower than the engine.

    A weight set is swapped into the model's modules for the duration of ``generate``
    (:func:`torch.nn.utils.stateless._reparametrize_module`, as the engine does for each forward),
    so both backends read the same tensors for the same set.
    """

    name = "hf-generate"

    def __init__(self, model: LoadedModel, *, batch_size: int = 32) -> None:
        self.lm = model
        self.batch_size = batch_size  # sequences per generate() call (prompts x n)
        self._sets: dict[str, tuple[torch.nn.Module, WeightSet]] = {}  # name -> (model checked against, set)

    @property
    def weight_sets(self) -> list[str]:
        return [POLICY, *self._sets]

    def add_weight_set(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Register weight set ``name`` (``{parameter name: tensor}``, held as given, not copied)."""
        if name in self._sets:
            raise TaoInputError(f"weight set {name!r} exists; remove_weight_set({name!r}) first, or update its tensors in place")
        self._sets[name] = (self.lm.model, make_weight_set(self.lm.model, name, tensors))

    def remove_weight_set(self, name: str) -> None:
        if name not in self._sets:
            raise TaoInputError(f"no weight set {name!r}; the sampler has {', '.join(self.weight_sets)}")
        del self._sets[name]

    def _weight_set(self, name: str) -> WeightSet | None:
        """The set to swap in (None for the policy), checked again when the model was replaced."""
        if name == POLICY:
            return None
        if name not in self._sets:
            raise TaoInputError(f"unknown weight set {name!r}; the sampler has {', '.join(self.weight_sets)} "
                                "(register one with add_weight_set, e.g. Teacher.attach)")
        checked, ws = self._sets[name]
        if checked is not self.lm.model:  # the model was replaced (e.g. wrapped by peft)
            try:
                ws = make_weight_set(self.lm.model, ws.name, ws.tensors)
            except TaoInputError as e:
                raise replaced_model_error(e, name) from None
            self._sets[name] = (self.lm.model, ws)
        return ws

    @torch.no_grad()
    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, *,
               weight_set: str = POLICY) -> list[list[Candidate]]:
        from transformers import GenerationConfig

        params.validate()
        ws = self._weight_set(weight_set)
        tok, model = self.lm.tokenizer, self.lm.model
        eos = self.lm.eos_token_ids
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        encoded = [self.lm.prompt_token_ids(p) for p in prompts]
        jobs = [(pi, j) for pi in range(len(prompts)) for j in range(params.n)]
        groups: list[list[Candidate]] = [[] for _ in prompts]
        gen_cfg = GenerationConfig(
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else None,
            top_k=params.top_k if not params.greedy else None,
            top_p=params.top_p if not params.greedy else None,
            min_p=params.min_p if (params.min_p > 0 and not params.greedy) else None,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=[*eos, *params.stop_token_ids] or None,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
            stop_strings=list(params.stop) or None,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        device = self.lm.device
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            seqs = [encoded[pi] for pi, _ in batch]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, width - len(s) :] = torch.tensor(s)
                mask[r, width - len(s) :] = 1
            with swapped_in(model, ws):
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen_cfg,
                    tokenizer=tok if params.stop else None,
                )
            rows = [(prompts[pi].id, j, seq) for (pi, j), seq in zip(batch, seqs, strict=True)]
            for (pi, _), cand in zip(batch, self._candidates(out, width, rows, params), strict=True):
                mark_weight_set(cand, weight_set)
                groups[pi].append(cand)
        return groups

    def _candidates(self, out, width: int, rows: list[tuple[str, int, list[int]]],
                    params: SamplingParams) -> list[Candidate]:
        """One candidate per row of a ``generate`` output; ``rows``: (prompt id, index, prompt token ids)."""
        tok, temp = self.lm.tokenizer, params.logprob_temperature
        new = out.sequences[:, width:].cpu()
        # logits[t]: [batch, vocab] raw (before processors) at step t
        logits = torch.stack(out.logits, dim=1).float().cpu()
        logp = torch.log_softmax(logits / temp, dim=-1)
        lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        top = logp.topk(params.top_logprobs, dim=-1) if params.top_logprobs else None
        cands = []
        for r, (prompt_id, index, seq) in enumerate(rows):
            raw_ids, raw_lp = new[r].tolist(), lp[r].tolist()
            raw_top = [] if top is None else [
                list(zip(i, v, strict=True)) for i, v in zip(top.indices[r].tolist(), top.values[r].tolist(), strict=True)
            ]
            ids_, lps, text, finish = finish_completion(
                tok, raw_ids, raw_lp, stop=params.stop, stop_token_ids=[*self.lm.eos_token_ids, *params.stop_token_ids]
            )
            cands.append(Candidate(
                prompt_id=prompt_id,
                index=index,
                text=text,
                prompt_token_ids=list(seq),
                token_ids=ids_,
                logprobs=lps,
                finish_reason=finish,
                temperature=temp,
                generator=self.name,
                metadata=top_logprobs_metadata(raw_top, len(ids_)),
            ))
        return cands


def sampler_for(model: LoadedModel) -> Sampler:
    """The sampler ``model.sampler_backend`` asks for: ``"engine"``, ``"hf"``, or ``"auto"`` (the
    engine when it supports the model, else ``transformers``).

    One sampler per loaded model: the pipeline's generator and its evaluations (and any plugin
    asking again) share it, and with it one KV cache. A new one is made when ``model.model`` was
    replaced since (e.g. wrapped with LoRA adapters) or the backend was changed.
    """
    backend = model.sampler_backend
    if backend not in SAMPLER_BACKENDS:
        raise TaoInputError(f"model {model.name}: unknown sampler backend {backend!r}; use one of {', '.join(SAMPLER_BACKENDS)}")
    cached = model.sampler_cache
    if cached is not None and cached[0] is model.model and cached[1] == backend:
        return cached[2]
    sampler: Sampler
    if backend == "hf":
        sampler = HFSampler(model)
    else:
        reason = unsupported_reason(model.model)
        if reason is not None and backend == "engine":
            raise TaoInputError(
                f"model {model.name}: the sampler backend is \"engine\" but tao's engine cannot run this model "
                f"({reason}); set generate.sampler to \"auto\" or \"hf\""
            )
        sampler = EngineSampler(model) if reason is None else HFSampler(model)
    model.sampler_cache = (model.model, backend, sampler)
    return sampler
