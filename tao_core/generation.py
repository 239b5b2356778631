"""The ``Generator`` protocol and its Hugging Face ``generate`` implementation.

A generator turns prompts into one group of ``params.n`` candidates per prompt, each carrying its
prompt and completion token ids and per-token log-probs under the project's definition
(``log_softmax(logits / temperature)`` before truncation, see :class:`tao_core.types.Candidate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from tao_core.models import LoadedModel
from tao_core.types import Candidate, FinishReason, Prompt, SamplingParams


@runtime_checkable
class Generator(Protocol):
    """Prompts + sampling parameters -> one group of candidates per prompt."""

    name: str

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]: ...


def finish_completion(
    tokenizer,
    token_ids: list[int],
    logprobs: list[float],
    *,
    stop: Sequence[str],
    stop_token_ids: Sequence[int],
) -> tuple[list[int], list[float], str, FinishReason]:
    """Cut a raw completion at its first stop token or stop string; return ids, logprobs, text, reason.

    The stop token itself stays in ``token_ids`` (it was sampled and the policy's log-prob covers
    it); a stop string is removed from the text and the tokens after the one completing it dropped.
    """
    stop_set = set(stop_token_ids)
    finish: FinishReason = "length"
    for i, t in enumerate(token_ids):
        if t in stop_set:
            token_ids, logprobs, finish = token_ids[: i + 1], logprobs[: i + 1], "stop"
            break
    body = token_ids[:-1] if finish == "stop" else token_ids
    text = tokenizer.decode(body, skip_special_tokens=True)
    if stop:
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            cut, _ = min(hits)
            text = text[:cut]
            # keep the shortest token prefix whose decoding covers the text up to the stop string
            for k in range(1, len(body) + 1):
                if len(tokenizer.decode(body[:k], skip_special_tokens=True)) > cut:
                    token_ids, logprobs = body[:k], logprobs[:k]
                    break
            finish = "stop"
    return list(token_ids), list(logprobs), text, finish


class HFGenerator:
    """Samples with ``transformers`` ``generate``: works for any causal LM, slower than the engine."""

    name = "hf-generate"

    def __init__(self, model: LoadedModel, *, batch_size: int = 32) -> None:
        self.lm = model
        self.batch_size = batch_size  # sequences per generate() call (prompts x n)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]:
        from transformers import GenerationConfig

        params.validate()
        tok, model = self.lm.tokenizer, self.lm.model
        eos = self.lm.eos_token_ids
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        encoded = [self.lm.prompt_token_ids(p) for p in prompts]
        jobs = [(pi, j) for pi in range(len(prompts)) for j in range(params.n)]
        groups: list[list[Candidate]] = [[] for _ in prompts]
        temp = params.logprob_temperature
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
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gen_cfg,
                tokenizer=tok if params.stop else None,
            )
            new = out.sequences[:, width:].cpu()
            # logits[t]: [batch, vocab] raw (before processors) at step t
            logits = torch.stack(out.logits, dim=1).float().cpu()
            lp = torch.log_softmax(logits / temp, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
            for r, (pi, j) in enumerate(batch):
                raw_ids, raw_lp = new[r].tolist(), lp[r].tolist()
                ids_, lps, text, finish = finish_completion(
                    tok, raw_ids, raw_lp, stop=params.stop, stop_token_ids=[*eos, *params.stop_token_ids]
                )
                groups[pi].append(
                    Candidate(
                        prompt_id=prompts[pi].id,
                        index=j,
                        text=text,
                        prompt_token_ids=list(seqs[r]),
                        token_ids=ids_,
                        logprobs=lps,
                        finish_reason=finish,
                        temperature=temp,
                        generator=self.name,
                    )
                )
        return groups


def sampler_for(model: LoadedModel) -> Generator:
    """The fastest available token-level sampler for ``model``: the engine for Llama-family models.

    One sampler per loaded model: the pipeline's generator and its evaluations (and any plugin
    asking again) share it, and with it one KV cache. A new one is made when ``model.model`` was
    replaced since (e.g. wrapped with LoRA adapters).
    """
    from tao_core.engine import EngineGenerator, unsupported_reason

    cached = getattr(model, "_tao_sampler", None)
    if cached is not None and cached[0] is model.model:
        return cached[1]
    sampler = EngineGenerator(model) if unsupported_reason(model.model) is None else HFGenerator(model)
    model._tao_sampler = (model.model, sampler)
    return sampler
