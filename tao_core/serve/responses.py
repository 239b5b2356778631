"""OpenAI's response shapes: whole responses, streamed chunks and log-probs, for chat and completions.

Log-probs list every completion token, a final stop token included (its text is the special token's,
e.g. ``<|im_end|>``, and adds nothing to the content): their sum is the completion's log-probability
under the policy, the number training uses. Each is ``log_softmax(logits / T)`` at the sampled token
before top-p truncation (T = 1 when greedy), tao's one definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tao_core.serve.text import Choice, finite, token_text


@dataclass
class TokenSlice:
    """Some consecutive tokens of one choice with their log-probs, for a response or a chunk."""

    ids: Sequence[int]
    logprobs: Sequence[float]
    top: Sequence[Sequence[tuple[int, float]]]  # per token, [] when no top log-probs were asked for
    offsets: Sequence[int]  # where each token's text starts in the choice's text (completions' text_offset)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Shapes:
    """The response and chunk objects of one request (``kind`` "chat" or "completion")."""

    def __init__(self, kind: str, tokenizer, *, request_id: str, created: int, model: str, version: str,
                 top_logprobs: int, include_usage: bool = False) -> None:
        self.kind = kind
        self.tokenizer = tokenizer
        self.head = {"id": request_id, "object": "", "created": created, "model": model,
                     "system_fingerprint": f"tao-{version}"}
        self.top_k = top_logprobs
        self.include_usage = include_usage

    def response(self, choices: Sequence[Choice], counts: dict[str, int], slices: Sequence[TokenSlice | None]) -> dict[str, Any]:
        """The whole (non-streamed) response; ``slices[j]`` is choice j's tokens when log-probs were asked for."""
        out = []
        for j, (c, s) in enumerate(zip(choices, slices, strict=True)):
            if self.kind == "chat":
                out.append({"index": j, "message": {"role": "assistant", "content": c.text},
                            "logprobs": self._logprobs(s), "finish_reason": c.finish_reason})
            else:
                out.append({"index": j, "text": c.text, "logprobs": self._logprobs(s), "finish_reason": c.finish_reason})
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self.head, "object": obj, "choices": out, "usage": counts}

    def chunk(self, index: int, text: str, tokens: TokenSlice | None, finish_reason: str | None = None,
              *, first: bool = False) -> dict[str, Any]:
        """One streamed chunk of choice ``index``: new text, its tokens' log-probs, the finish reason at the end."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text} if text or tokens is not None or first else {}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": index, "delta": delta, "logprobs": self._logprobs(tokens), "finish_reason": finish_reason}
            return self._chunk([choice])
        return self._chunk([{"index": index, "text": text, "logprobs": self._logprobs(tokens), "finish_reason": finish_reason}])

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices, the token counts."""
        return {**self._chunk([]), "usage": counts}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        out = {**self.head, "object": obj, "choices": choices}
        if self.include_usage:
            out["usage"] = None
        return out

    def _logprobs(self, s: TokenSlice | None) -> dict[str, Any] | None:
        if s is None:
            return None
        if self.kind == "chat":
            return {"content": [self._entry(t, lp, top) for t, lp, top in zip(s.ids, s.logprobs, s.top, strict=True)],
                    "refusal": None}
        tops = None
        if self.top_k:
            tops = [{token_text(self.tokenizer, i): finite(v) for i, v in top} for top in s.top]
        return {"tokens": [token_text(self.tokenizer, t) for t in s.ids], "token_logprobs": [finite(lp) for lp in s.logprobs],
                "top_logprobs": tops, "text_offset": list(s.offsets)}

    def _entry(self, token_id: int, logprob: float, top: Sequence[tuple[int, float]]) -> dict[str, Any]:
        text = token_text(self.tokenizer, token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode()),
                "top_logprobs": [self._alternative(i, v) for i, v in top]}

    def _alternative(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(self.tokenizer, token_id)
        return {"token": text, "logprob": finite(logprob), "bytes": list(text.encode())}
