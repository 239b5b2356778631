"""Tokens to text for the server: one sample's text as its tokens stream in, and its final cut.

The final text of a sample is :func:`tao_core.completion.finish_completion`'s, the rule every tao sampler
uses (cut at the first stop token or stop string). A stream must send only text that this final cut
keeps, so :class:`TextStream` decodes incrementally (a window of recent tokens, as vLLM's detokenizer
does, so each token costs two short decodes), holds back an incomplete UTF-8 character and the last
``len(longest stop string) - 1`` characters (they may begin a stop string), never sends past a stop
string, and sends text only at token boundaries so each chunk carries the log-probs of its own tokens.
The rest comes with :meth:`TextStream.finish`, so the chunks concatenate to the final text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tao_core.completion import finish_completion
from tao_core.engine import SampleResult

_FLOOR = -9999.0  # a -inf log-prob as JSON can carry it (JSON has no infinity)


@dataclass
class Choice:
    """One sample as the client gets it: text, tokens (a final stop token included), log-probs."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" or "length"
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per token, when asked for


def finish_sample(tokenizer, sample: SampleResult, stop: Sequence[str], stop_token_ids: Sequence[int]) -> Choice:
    """The sample's final text and tokens, cut as tao's samplers cut them (``finish_completion``)."""
    ids, lps, text, finish = finish_completion(tokenizer, sample.token_ids, sample.logprobs, stop=stop,
                                               stop_token_ids=stop_token_ids)
    reason = "stop" if "stop" in (finish, sample.finish_reason) else "length"
    return Choice(text, ids, lps, reason, [list(p) for p in sample.top_logprobs[: len(ids)]])


def token_text(tokenizer, token_id: int) -> str:
    """One token as text, special tokens spelled out (``<|im_end|>``); a part of a character is U+FFFD."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _FLOOR


class TextStream:
    """One sample's text as its tokens arrive (see the module docstring for what is held back)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the decoded text of ids, up to an incomplete character at the end
        self.ends: list[int] = []  # len(text) once token i's characters are complete
        self._prefix = 0  # the decode window starts here: text before it is final
        self._read = 0  # tokens before this are in text
        self.sent_chars = 0
        self.sent_tokens = 0

    def push(self, token_id: int) -> None:
        """Add the next sampled token."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        now = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.ends.extend([len(self.text)] * (len(self.ids) - len(self.ends)))

    def ready(self) -> tuple[str, int]:
        """The text that can be sent now and how many tokens it covers; both are then counted as sent."""
        limit = len(self.text)
        if self.stop:
            hits = [i for i in (self.text.find(s, self.sent_chars) for s in self.stop) if i >= 0]
            limit = min(hits) if hits else limit - self.holdback
        k = self.sent_tokens
        while k < len(self.ends) and self.ends[k] <= limit:
            k += 1
        if k == self.sent_tokens:
            return "", 0
        return self._send(self.text[self.sent_chars : self.ends[k - 1]], k - self.sent_tokens)

    def finish(self, final: Choice) -> tuple[str, int]:
        """The rest of the final text and the number of final tokens not sent yet."""
        return self._send(final.text[self.sent_chars :], max(0, len(final.token_ids) - self.sent_tokens))

    def start_of(self, i: int) -> int:
        """Where token ``i``'s text starts (the end of the complete text before it)."""
        if i == 0:
            return 0
        return self.ends[i - 1] if i <= len(self.ends) else len(self.text)

    def _send(self, text: str, count: int) -> tuple[str, int]:
        self.sent_chars += len(text)
        self.sent_tokens += count
        return text, count


def text_offsets(tokenizer, token_ids: Sequence[int], text: str) -> list[int]:
    """Where each token's text starts in ``text`` (the completion's final text), for ``text_offset``."""
    stream = TextStream(tokenizer)
    for t in token_ids:
        stream.push(t)
    return [min(stream.start_of(i), len(text)) for i in range(len(token_ids))]
