"""The text-level end of sampling, shared by both samplers: cut a raw completion where it stops.

A sampler (:mod:`tao_core.sampler`) returns raw token ids and their log-probs; this module turns one
into the candidate's ids, log-probs, text and finish reason (and its top log-probs, when asked for)
the same way whichever backend sampled it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tao_core.types import FinishReason


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


def top_logprobs_metadata(top: list[list[tuple[int, float]]], num_tokens: int) -> dict[str, Any]:
    """The ``Candidate.metadata`` entry of a completion's top log-probs (``SamplingParams.top_logprobs``),
    cut like its tokens to the first ``num_tokens``: ``{"top_logprobs": [[[token id, log-prob], ...]
    per token]}``, most likely first; nothing when none were asked for (the candidate is unchanged)."""
    if not top:
        return {}
    return {"top_logprobs": [[[int(i), float(lp)] for i, lp in position] for position in top[:num_tokens]]}
