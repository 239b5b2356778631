"""The data contracts every stage shares: prompts, sampling parameters, candidates and scores.

Each type is a dataclass with ``to_dict`` / ``from_dict`` and a JSONL round-trip through
:func:`write_jsonl` / :func:`read_jsonl`. ``from_dict`` rejects unknown keys and wrong types with
an error that names the field, so a malformed file fails at its line, not three stages later.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from tao_core.errors import TaoInputError
from tao_core.fsio import append_line, write_file
from tao_core.records import read_records

T = TypeVar("T")

FinishReason = Literal["stop", "length", "error"]
ROLES = ("system", "user", "assistant")  # chat roles a prompt's messages may take
ScoreStatus = Literal["ok", "abstain", "error"]


def _check_fields(cls: type, data: dict[str, Any], where: str) -> None:
    if not isinstance(data, dict):
        raise TaoInputError(f"{where}: expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TaoInputError(
            f"{where}: unknown field(s) {unknown} for {cls.__name__}; accepted: {sorted(names)}"
        )
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in data]
    if missing:
        raise TaoInputError(f"{where}: missing field(s) {missing} for {cls.__name__}")


def _clip(value: Any, limit: int = 80) -> str:
    """``repr`` of a bad value, cut short enough for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Record:
    """``to_dict`` / ``from_dict`` shared by the JSONL record types."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "record") -> Any:
        _check_fields(cls, data, where)
        return cls(**data)


@dataclass
class Prompt(_Record):
    """One unlabeled input: chat ``messages`` or plain ``text`` (exactly one of them)."""

    id: str  # unique within a run; candidates and scores point back to it
    messages: list[dict[str, str]] | None = None  # chat format: [{"role": ..., "content": ...}]
    text: str | None = None  # plain text, wrapped as one user turn when the model has a chat template
    task: str | None = None  # name of the registered task this prompt belongs to, if any
    metadata: dict[str, Any] = field(default_factory=dict)  # free: e.g. {"db_path": ...}

    def __post_init__(self) -> None:
        self.id = str(self.id)
        if (self.messages is None) == (self.text is None):
            raise TaoInputError(f"prompt {self.id!r}: give exactly one of 'messages' or 'text'")
        if self.text is not None:
            if not isinstance(self.text, str):
                raise TaoInputError(f"prompt {self.id!r}: 'text' must be a string, got {type(self.text).__name__}")
            if not self.text.strip():
                raise TaoInputError(f"prompt {self.id!r}: 'text' is empty")
        if self.messages is not None:
            if not isinstance(self.messages, list) or not self.messages:
                raise TaoInputError(f"prompt {self.id!r}: 'messages' must be a non-empty list of "
                                    "{'role': ..., 'content': ...} objects")
            for i, m in enumerate(self.messages):
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise TaoInputError(
                        f"prompt {self.id!r}: messages[{i}] needs 'role' and 'content' keys, got {_clip(m)}"
                    )
                if m["role"] not in ROLES:
                    raise TaoInputError(f"prompt {self.id!r}: messages[{i}] 'role' must be one of {list(ROLES)}, "
                                        f"got {_clip(m['role'])}")
                if not isinstance(m["content"], str):
                    raise TaoInputError(f"prompt {self.id!r}: messages[{i}] 'content' must be a string, "
                                        f"got {_clip(m['content'])}")
            if not any(m["content"].strip() for m in self.messages):
                raise TaoInputError(f"prompt {self.id!r}: every message's 'content' is empty")

    def as_messages(self) -> list[dict[str, str]]:
        """The prompt as a chat: ``messages`` as given, or ``text`` as a single user turn."""
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.text or ""}]


@dataclass
class SamplingParams(_Record):
    """How to sample: the same names in the TOML config, the CLI flags and the Python API."""

    n: int = 1  # candidates per prompt
    temperature: float = 1.0  # 0 means greedy; log-probs then use temperature 1
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus: smallest set with cumulative probability >= top_p; 1 disables
    min_p: float = 0.0  # drop tokens with p < min_p * p_max; 0 disables
    max_new_tokens: int = 128  # completion length cap (finish reason "length")
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the returned text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens besides the model's EOS
    seed: int | None = None  # per-request random stream; None draws one from the global RNG
    top_logprobs: int = 0  # also return the k (0..20) most likely tokens' log-probs at each sampled position

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        problems = []
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, int | float) or self.temperature < 0 or math.isnan(self.temperature):
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables), got {self.top_k!r}")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_p, int | float) or not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1), got {self.min_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            problems.append(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.top_logprobs, int) or isinstance(self.top_logprobs, bool) or not 0 <= self.top_logprobs <= 20:
            problems.append(f"top_logprobs must be an integer in [0, 20], got {self.top_logprobs!r}")
        if problems:
            raise TaoInputError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def logprob_temperature(self) -> float:
        """The temperature that divides the logits for ``Candidate.logprobs`` (1 when greedy)."""
        return 1.0 if self.greedy else float(self.temperature)


@dataclass
class Candidate(_Record):
    """One sampled response to a prompt.

    ``logprobs[i]`` is the project's single definition of a token's log-probability under the
    policy: ``log_softmax(logits / temperature)[token_ids[i]]``, taken *before* any top-k / top-p /
    min-p truncation (temperature 1 for greedy decoding). The engine, the Hugging Face sampler and
    the training step's fused kernels all compute exactly this, so the sampled log-probs serve as
    the old policy's log-probs in the RL loss.
    """

    prompt_id: str  # Prompt.id this candidate answers
    index: int  # position within the prompt's group, 0..n-1
    text: str  # decoded completion, stop string removed
    prompt_token_ids: list[int]  # the exact tokens the model was conditioned on
    token_ids: list[int]  # completion tokens, including a final EOS / stop token if one was sampled
    logprobs: list[float]  # one per completion token, see the class docstring
    finish_reason: FinishReason = "length"  # "stop" (EOS, stop token or string), "length" or "error"
    temperature: float = 1.0  # temperature used for sampling and for ``logprobs``
    generator: str = ""  # registered name of the generator that produced it
    template: str = "default"  # prompt template it was sampled under
    metadata: dict[str, Any] = field(default_factory=dict)  # e.g. {"off_policy": true, "near_duplicate_of": 2}

    def __post_init__(self) -> None:
        if len(self.logprobs) != len(self.token_ids):
            raise TaoInputError(
                f"candidate {self.prompt_id}/{self.index}: {len(self.logprobs)} logprobs for "
                f"{len(self.token_ids)} tokens"
            )


@dataclass
class Score(_Record):
    """A scorer's verdict on one candidate: a value when ``ok``, otherwise a reason.

    Abstained and errored candidates are left out of group statistics; they never count as 0.
    """

    status: ScoreStatus  # "ok" | "abstain" | "error"
    value: float | None = None  # set exactly when status == "ok"
    reason: str = ""  # why it abstained or failed (optional detail when ok)
    scorer: str = ""  # registered scorer name
    version: str = ""  # scorer version, part of the score cache key
    prompt_id: str = ""  # filled in when scores are written next to candidates
    index: int = -1  # candidate index within its group
    details: dict[str, Any] = field(default_factory=dict)  # per-scorer extras (cluster id, parts)

    def __post_init__(self) -> None:
        if self.status not in ("ok", "abstain", "error"):
            raise TaoInputError(f"score status must be ok, abstain or error, got {self.status!r}")
        if self.status == "ok":
            if not isinstance(self.value, int | float) or isinstance(self.value, bool) or not math.isfinite(self.value):
                raise TaoInputError(f"an ok score needs a finite float value, got {self.value!r}")
            self.value = float(self.value)
        elif self.value is not None:
            raise TaoInputError(f"a {self.status} score carries no value (got {self.value!r})")
        elif not self.reason:
            raise TaoInputError(f"a {self.status} score needs a reason")

    @classmethod
    def ok(cls, value: float, reason: str = "", **kw: Any) -> Score:
        return cls("ok", float(value), reason, **kw)

    @classmethod
    def abstain(cls, reason: str, **kw: Any) -> Score:
        return cls("abstain", None, reason, **kw)

    @classmethod
    def error(cls, reason: str, **kw: Any) -> Score:
        return cls("error", None, reason, **kw)

    @property
    def is_ok(self) -> bool:
        return self.status == "ok"


def write_jsonl(path: str | os.PathLike, records: Iterable[Any], *, append: bool = False) -> int:
    """Write dataclass records (or dicts) as JSON lines through :mod:`tao_core.fsio`: atomically (a
    complete, fsynced file renamed into place), or appended and fsynced with ``append``.

    Returns the number of lines written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r.to_dict() if hasattr(r, "to_dict") else r, ensure_ascii=False) for r in records]
    if not append:
        write_file(path, "".join(line + "\n" for line in lines))
    elif lines:
        append_line(path, "\n".join(lines))
    return len(lines)


def read_jsonl(path: str | os.PathLike, cls: type[T]) -> list[T]:
    """Read a JSONL file of ``cls`` records; errors name the file and line."""
    out = []
    for lineno, obj in read_records(path):
        where = f"{path}:{lineno}"
        try:
            out.append(cls.from_dict(obj, where=where))  # type: ignore[attr-defined]
        except TaoInputError as e:
            msg = str(e)
            raise TaoInputError(msg if msg.startswith(where) else f"{where}: {msg}") from None
        except TypeError as e:
            raise TaoInputError(f"{where}: {e}") from None
    return out
