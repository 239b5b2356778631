"""``llm-judge``: a local language model grades the candidates against a rubric.

Two modes, both decoded greedily through :func:`tao_core.sampler.sampler_for`:

- ``listwise`` (RULER style, https://openpipe.ai/blog/ruler): the judge sees the whole group at once,
  numbered, and answers ``{"scores": {"1": 7, "2": 3, ...}}``; relative judgement within a group is
  what group-normalized RL advantages need.
- ``pointwise``: one judge call per candidate, answering ``{"score": 7}``.

Scores are on the rubric's 0-10 scale. A verdict that cannot be parsed, or that leaves a candidate
out or scores it outside 0-10, abstains for that candidate with the verdict's opening as the reason:
never a silent 0. Parsing accepts JSON anywhere in the reply (also inside a code fence) and, failing
that, lines such as ``Candidate 2: 7/10`` or ``Score: 7``.

With ``dedupe`` the judge sees one of each group of near-duplicates (the same text up to case and
whitespace, or marked ``metadata["near_duplicate_of"]`` by the generator) and the score is copied to
the others (``details["copied_from"]``), so it neither pays for nor is swayed by repeats.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from tao_core.errors import TaoInputError
from tao_core.types import Candidate, Prompt, SamplingParams, Score

DEFAULT_RUBRIC = (
    "Judge how well the response answers the user's request. Correctness matters most, then "
    "completeness and clarity. 10: fully correct and helpful. 5: partly correct or unclear. "
    "0: wrong, off-topic or empty."
)
SYSTEM = "You are a strict and fair grader. You reply with JSON only."
MODES = ("listwise", "pointwise")
_SNIPPET_CHARS = 200
_LIST_LINE = re.compile(
    r"^\W*(?:candidate|response|answer)?\s*#?\[?(\d+)\]?\s*[:=)\-]\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?",
    re.IGNORECASE | re.MULTILINE,
)
_POINT_PATTERNS = (
    re.compile(r"score\W{0,4}(\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(\d+(?:\.\d+)?)\s*/\s*10\b"),
    re.compile(r"^\s*(\d+(?:\.\d+)?)\s*$"),
)


def snippet(verdict: str) -> str:
    """The verdict's opening on one line, for abstain reasons."""
    flat = " ".join(verdict.split())
    return flat if len(flat) <= _SNIPPET_CHARS else flat[:_SNIPPET_CHARS] + "..."


def _json_values(text: str) -> list[Any]:
    """Every JSON object that parses starting at some ``{`` in ``text`` (outermost ones only).

    Bare arrays are not read: ``[3] = 1`` in a line-format verdict is not a list of scores.
    """
    decoder = json.JSONDecoder()
    found = []
    i = 0
    while i < len(text):
        if text[i] == "{":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                i += 1
                continue
            found.append(value)
            i = end
        else:
            i += 1
    return found


def _as_score(value: Any) -> float | None:
    """A number in [0, 10] (also as a string like "7" or "7/10"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*", value)
        value = float(m.group(1)) if m else None
    if isinstance(value, int | float) and 0 <= value <= 10:
        return float(value)
    return None


def _listwise_from_json(value: Any, n: int) -> dict[int, float]:
    if isinstance(value, dict) and "scores" in value:
        value = value["scores"]
    out: dict[int, float] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            m = re.fullmatch(r"\D*(\d+)", str(k).strip())
            s = _as_score(v.get("score") if isinstance(v, dict) else v)
            if m and s is not None and 1 <= int(m.group(1)) <= n:
                out[int(m.group(1))] = s
    elif isinstance(value, list):
        for pos, item in enumerate(value, 1):
            if isinstance(item, dict):
                ident = item.get("id", item.get("candidate", pos))
                s = _as_score(item.get("score"))
                try:
                    ident = int(ident)
                except (TypeError, ValueError):
                    continue
            else:
                ident, s = pos, _as_score(item)
            if s is not None and 1 <= ident <= n:
                out[ident] = s
    return out


def parse_listwise(verdict: str, n: int) -> dict[int, float]:
    """Scores by candidate number (1-based) from a listwise verdict; candidates it missed are absent.

    The first JSON value that yields any score wins; otherwise lines like ``Candidate 2: 7/10``.
    """
    for value in _json_values(verdict):
        scores = _listwise_from_json(value, n)
        if scores:
            return scores
    out: dict[int, float] = {}
    for m in _LIST_LINE.finditer(verdict):
        ident, s = int(m.group(1)), _as_score(float(m.group(2)))
        if s is not None and 1 <= ident <= n and ident not in out:
            out[ident] = s
    return out


def parse_pointwise(verdict: str) -> float | None:
    """The 0-10 score in a pointwise verdict (``{"score": 7}``, ``Score: 7``, ``7/10``), else None."""
    for value in _json_values(verdict):
        if isinstance(value, dict) and "score" in value:
            s = _as_score(value["score"])
            if s is not None:
                return s
    for pattern in _POINT_PATTERNS:
        m = pattern.search(verdict)
        if m:
            return _as_score(float(m.group(1)))
    return None


def representatives(candidates: list[Candidate]) -> list[int]:
    """For each candidate, the index of the first candidate it duplicates (itself when unique)."""
    first_by_text: dict[str, int] = {}
    rep: list[int] = []
    for i, c in enumerate(candidates):
        key = " ".join(c.text.lower().split())
        marked = c.metadata.get("near_duplicate_of")
        if isinstance(marked, int) and not isinstance(marked, bool) and 0 <= marked < i:
            rep.append(rep[marked])
        else:
            rep.append(first_by_text.setdefault(key, i))
    return rep


def _task_text(prompt: Prompt) -> str:
    messages = prompt.as_messages()
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class LLMJudgeScorer:
    """Grades candidates with a local model against ``rubric``; see the module docstring."""

    name = "llm-judge"

    def __init__(
        self,
        model: Any = "smollm2-135m",  # a model spec for tao_core.models.load_model, or a LoadedModel
        *,
        mode: str = "listwise",  # "listwise" (whole group in one call) or "pointwise" (one call each)
        rubric: str = DEFAULT_RUBRIC,  # what a 0-10 score means, shown to the judge
        max_new_tokens: int = 256,  # verdict length cap
        dedupe: bool = True,  # judge one of each near-duplicate, copy its score to the others
        max_chars: int = 2000,  # each candidate is cut to this many characters in the judge's prompt
    ) -> None:
        from tao_core.models import LoadedModel, load_model

        if mode not in MODES:
            raise TaoInputError(f"llm-judge scorer: mode must be one of {list(MODES)}, got {mode!r}")
        if not isinstance(rubric, str) or not rubric.strip():
            raise TaoInputError("llm-judge scorer: rubric must be a non-empty string")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise TaoInputError(f"llm-judge scorer: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(max_chars, int) or max_chars < 1:
            raise TaoInputError(f"llm-judge scorer: max_chars must be an integer >= 1, got {max_chars!r}")
        self.model = model if isinstance(model, LoadedModel) else load_model(model)
        self.mode, self.rubric, self.max_new_tokens = mode, rubric, max_new_tokens
        self.pointwise = mode == "pointwise"  # a listwise verdict depends on the whole group
        self.dedupe, self.max_chars = dedupe, max_chars
        key = json.dumps([self.model.name, mode, rubric, max_new_tokens, dedupe, max_chars])
        self.version = f"1-{hashlib.sha1(key.encode()).hexdigest()[:10]}"

    def _cut(self, text: str) -> str:
        return text if len(text) <= self.max_chars else text[: self.max_chars] + " [...]"

    def listwise_prompt(self, prompt: Prompt, texts: list[str]) -> Prompt:
        """The judge's prompt showing the task and ``texts`` numbered from 1."""
        shown = "\n\n".join(f"## Candidate {i}\n{self._cut(t)}" for i, t in enumerate(texts, 1))
        form = ", ".join(f'"{i}": <score of candidate {i}>' for i in range(1, min(len(texts), 3) + 1))
        form += ", ..." if len(texts) > 3 else ""
        user = (
            f"Grade each candidate response to the task below.\n\nRubric: {self.rubric}\n\n"
            f"## Task\n{_task_text(prompt)}\n\n{shown}\n\n"
            f"Give each of the {len(texts)} candidates an integer score from 0 to 10. Reply with JSON "
            f'only, in this form: {{"scores": {{{form}}}}}'
        )
        return Prompt(id=f"judge-{prompt.id}", messages=[{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": user}])

    def pointwise_prompt(self, prompt: Prompt, text: str, index: int) -> Prompt:
        """The judge's prompt for one candidate."""
        user = (
            f"Grade the response to the task below.\n\nRubric: {self.rubric}\n\n"
            f"## Task\n{_task_text(prompt)}\n\n## Response\n{self._cut(text)}\n\n"
            'Give the response an integer score from 0 to 10. Reply with JSON only, in this form: '
            '{"score": <score>}'
        )
        return Prompt(id=f"judge-{prompt.id}-{index}", messages=[{"role": "system", "content": SYSTEM},
                                                                  {"role": "user", "content": user}])

    def _verdicts(self, prompts: list[Prompt]) -> list[Candidate]:
        from tao_core.sampler import sampler_for

        params = SamplingParams(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens)
        return [group[0] for group in sampler_for(self.model).sample(prompts, params)]

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        if not candidates:
            return []
        rep = representatives(candidates) if self.dedupe else list(range(len(candidates)))
        unique = sorted(set(rep))
        texts = [candidates[i].text for i in unique]
        judged: dict[int, Score] = {}
        tag = {"scorer": self.name, "version": self.version}
        if self.mode == "listwise":
            verdict = self._verdicts([self.listwise_prompt(prompt, texts)])[0]
            parsed = parse_listwise(verdict.text, len(texts))
            for number, i in enumerate(unique, 1):
                judged[i] = self._to_score(parsed.get(number), verdict, f"candidate {number}", tag)
        else:
            verdicts = self._verdicts([self.pointwise_prompt(prompt, t, i) for i, t in zip(unique, texts, strict=True)])
            for i, verdict in zip(unique, verdicts, strict=True):
                judged[i] = self._to_score(parse_pointwise(verdict.text), verdict, "the response", tag)
        out = []
        for i, r in enumerate(rep):
            s = judged[r]
            if r != i:
                s = Score(s.status, s.value, s.reason, **tag, details={**s.details, "copied_from": r})
            out.append(s)
        return out

    def _to_score(self, value: float | None, verdict: Candidate, what: str, tag: dict[str, str]) -> Score:
        details = {"mode": self.mode, "verdict": snippet(verdict.text)}
        if value is not None:
            return Score.ok(value, **tag, details=details)
        cut = f" (verdict cut at max_new_tokens={self.max_new_tokens})" if verdict.finish_reason == "length" else ""
        return Score.abstain(f"judge verdict gave no 0-10 score for {what}{cut}: {snippet(verdict.text)!r}",
                             **tag, details=details)


SCORERS = {"llm-judge": LLMJudgeScorer}
