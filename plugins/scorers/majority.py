"""``majority-vote``: reward agreement with the group's majority answer (test-time RL style, no label).

Each candidate's final answer is extracted (see :func:`extract_answer` for the modes) and
normalized; the most common answer of the group is its pseudo-label, and a candidate scores 1.0
when its answer equals it, 0.0 otherwise (or, with ``reward="share"``, the share of the group that
gave the same answer). Candidates with no extractable answer abstain. The whole group abstains
when fewer than ``min_answers`` answers were extracted, when the top answers tie (with
``ties="abstain"``), or when the majority's share of the group is below ``min_share``: the collapse
guard, since rewarding a weak consensus teaches a weak model to agree rather than to be right.

Every score's ``details`` carry ``majority`` (the normalized majority answer; None when the top
answers tie or too few answered) and ``margin`` (the majority's share among the voters, those
without an answer included; None when there is no majority), read by the margin gate and the
flip-rate monitor.

The extraction helpers are shared by the tasks and the ``diverse`` generator.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Literal

from tao_core.errors import TaoInputError
from tao_core.types import Candidate, Prompt, Score

ExtractMode = Literal["number", "answer-line", "regex", "json-field", "last-line", "text"]
EXTRACT_MODES = ("number", "answer-line", "regex", "json-field", "last-line", "text")

# "Answer: 85", "Final answer = 85", "the answer is 85": the text after the marker, to the line end.
_ANSWER_LINE = re.compile(r"(?i)\b(?:final\s+)?answer\s*(?:is\s*:?|:|=)\s*(.+)")
_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?(?![\d])|(?<![\w.])-?\.\d+")
_FENCED_JSON = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def normalize_number(raw: str) -> str | None:
    """``"1,234"`` -> ``"1234"``, ``"12.50"`` -> ``"12.5"``, ``"7.0"`` -> ``"7"``; None if not a number."""
    s = raw.strip().replace(",", "")
    try:
        value = float(s)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(round(value, 9))


def numbers_in(text: str) -> list[str]:
    """Every number in ``text``, normalized, in order (thousands separators allowed)."""
    out = []
    for m in _NUMBER.finditer(text):
        raw = m.group(0)
        if "," in raw and not re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", raw):
            # "12,34" is a list, not a number: take its parts
            out.extend(n for part in raw.split(",") if part and (n := normalize_number(part)) is not None)
            continue
        n = normalize_number(raw)
        if n is not None:
            out.append(n)
    return out


def answer_line(text: str) -> str | None:
    """The text after the last "Answer:" / "The answer is" marker, up to its line end; None if absent."""
    matches = _ANSWER_LINE.findall(text)
    if not matches:
        return None
    return matches[-1].strip()


def find_json(text: str) -> Any:
    """The first JSON value in ``text``: the whole text, a fenced block, or the first ``{...}``.

    Raises ``ValueError`` when none parses.
    """
    candidates = [text.strip(), *(m.strip() for m in _FENCED_JSON.findall(text))]
    decoder = json.JSONDecoder()
    for c in candidates:
        try:
            return json.loads(c)
        except json.JSONDecodeError:
            pass
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return decoder.raw_decode(text, i)[0]
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON value found")


def _normalize_text(s: str) -> str:
    s = re.sub(r"\s+", " ", s).strip().strip("*`\"'").strip()
    s = s.rstrip(".!").strip()
    n = normalize_number(s)
    return n if n is not None else s.lower()


def extract_answer(text: str, mode: ExtractMode = "number", *, pattern: str | re.Pattern | None = None,
                   field: str | None = None) -> str | None:
    """A candidate's final answer, normalized so equal answers compare equal; None if absent.

    Modes:
      ``number``: the first number of the answer line when there is one, else the last number.
      ``answer-line``: the answer line's text (the line of a step-by-step response after
      "Answer:" or "the answer is"); a number there is normalized as one.
      ``regex``: group 1 of ``pattern``'s last match (the whole match when it has no group).
      ``json-field``: ``field`` (dotted path, e.g. ``"result.answer"``) of the first JSON object.
      ``last-line``: the last non-empty line. ``text``: the whole response.
    """
    if mode == "number":
        line = answer_line(text)
        if line is not None and (nums := numbers_in(line)):
            return nums[0]
        nums = numbers_in(text)
        return nums[-1] if nums else None
    if mode == "answer-line":
        line = answer_line(text)
        return _normalize_text(line) if line else None
    if mode == "regex":
        if pattern is None:
            raise TaoInputError("extract mode 'regex' needs a pattern")
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        matches = list(rx.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        got = last.group(1) if rx.groups else last.group(0)
        return _normalize_text(got) if got and got.strip() else None
    if mode == "json-field":
        if not field:
            raise TaoInputError("extract mode 'json-field' needs a field name (e.g. 'answer')")
        try:
            value: Any = find_json(text)
        except ValueError:
            return None
        for key in field.split("."):
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return json.dumps(value, sort_keys=True)
        return _normalize_text(str(value)) or None
    if mode == "last-line":
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return _normalize_text(lines[-1]) if lines else None
    if mode == "text":
        return _normalize_text(text) or None
    raise TaoInputError(f"unknown extract mode {mode!r}; choose one of {list(EXTRACT_MODES)}")


class AnswerExtractor:
    """A configured :func:`extract_answer`; checks its options once, at construction."""

    def __init__(self, mode: ExtractMode = "number", pattern: str | None = None, field: str | None = None,
                 where: str = "extract") -> None:
        if mode not in EXTRACT_MODES:
            raise TaoInputError(f"{where}: unknown extract mode {mode!r}; choose one of {list(EXTRACT_MODES)}")
        if mode == "regex":
            if not pattern:
                raise TaoInputError(f"{where}: extract mode 'regex' needs pattern=")
            try:
                self.pattern: re.Pattern | None = re.compile(pattern)
            except re.error as e:
                raise TaoInputError(f"{where}: invalid regex {pattern!r}: {e}") from None
        else:
            self.pattern = None
        if mode == "json-field" and not field:
            raise TaoInputError(f"{where}: extract mode 'json-field' needs field= (e.g. 'answer')")
        self.mode, self.field = mode, field

    def __call__(self, text: str) -> str | None:
        return extract_answer(text, self.mode, pattern=self.pattern, field=self.field)


class MajorityVoteScorer:
    """Options:

    ``extract``: answer extraction mode (see :func:`extract_answer`), with ``pattern`` for
    ``regex`` and ``field`` for ``json-field``. ``reward``: ``"binary"`` (1 agrees with the
    majority, 0 not) or ``"share"`` (the share of the group giving the same answer).
    ``min_share``: the group abstains when the majority answer has fewer than this share of all
    candidates (including those without an answer). ``min_answers``: the group abstains with fewer
    extracted answers. ``ties``: ``"abstain"`` (no majority when the top answers tie) or
    ``"first"`` (the tied answer seen first wins). ``voters``: the prompt templates
    (``Candidate.template``) whose candidates vote, e.g. ``["column"]`` for answers sampled under a
    structured prompt by the ``diverse`` generator; every candidate is then scored against the
    voters' majority, and ``min_share`` / ``min_answers`` count voters only; a non-voter that gives
    no answer scores 0 (it failed a question the voters agree on). None: all vote.
    """

    name = "majority-vote"
    version = "2"  # part of the score cache key: bumped when values or details change
    pointwise = False  # a candidate's score depends on the whole group

    def __init__(self, extract: ExtractMode = "number", pattern: str | None = None, field: str | None = None,
                 reward: Literal["binary", "share"] = "binary", min_share: float = 0.0,
                 min_answers: int = 2, ties: Literal["abstain", "first"] = "abstain",
                 voters: list[str] | None = None) -> None:
        self.extractor = AnswerExtractor(extract, pattern, field, where="majority-vote")
        if reward not in ("binary", "share"):
            raise TaoInputError(f"majority-vote: reward must be 'binary' or 'share', got {reward!r}")
        if not isinstance(min_share, int | float) or not 0.0 <= min_share <= 1.0:
            raise TaoInputError(f"majority-vote: min_share must be in [0, 1], got {min_share!r}")
        if not isinstance(min_answers, int) or min_answers < 1:
            raise TaoInputError(f"majority-vote: min_answers must be an integer >= 1, got {min_answers!r}")
        if ties not in ("abstain", "first"):
            raise TaoInputError(f"majority-vote: ties must be 'abstain' or 'first', got {ties!r}")
        if voters is not None and (isinstance(voters, str) or not voters
                                   or not all(isinstance(v, str) for v in voters)):
            raise TaoInputError(f"majority-vote: voters must be a non-empty list of template names, got {voters!r}")
        self.reward, self.min_share, self.min_answers, self.ties = reward, float(min_share), min_answers, ties
        self.voters = None if voters is None else set(voters)

    def _all_abstain(self, reason: str, answers: list[str | None], **details: Any) -> list[Score]:
        details = {"majority": None, "margin": None, **details}
        return [Score.abstain(f"majority-vote: {reason}", scorer=self.name, version=self.version,
                              details={"answer": a, **details}) for a in answers]

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        answers = [self.extractor(c.text) for c in candidates]
        voting = [a for a, c in zip(answers, candidates, strict=True) if self.voters is None or c.template in self.voters]
        votes = Counter(a for a in voting if a is not None)
        n_answers = sum(votes.values())
        if n_answers < self.min_answers:
            who = "candidates" if self.voters is None else f"voters (templates {sorted(self.voters)})"
            return self._all_abstain(f"only {n_answers} of {len(voting)} {who} gave an answer "
                                     f"(min_answers={self.min_answers})", answers)
        ranked = votes.most_common()
        majority, top = ranked[0]
        total = len(voting)
        share = top / total
        if len(ranked) > 1 and ranked[1][1] == top and self.ties == "abstain":
            tied = sorted(a for a, v in ranked if v == top)
            return self._all_abstain(f"no majority: answers {tied} tie with {top} votes each", answers,
                                     share=share)
        if share < self.min_share:
            return self._all_abstain(f"majority answer {majority!r} has {top}/{total} votes, "
                                     f"below min_share={self.min_share}", answers, majority=majority,
                                     share=share, margin=share)
        out = []
        for a, c in zip(answers, candidates, strict=True):
            if a is None and self.voters is not None and c.template not in self.voters:
                # the voters agreed on an answer this (scored, non-voting) response failed to give
                out.append(Score.ok(0.0, f"gave no answer; the voters' majority is {majority!r} ({top}/{total})",
                                    scorer=self.name, version=self.version,
                                    details={"answer": None, "majority": majority, "share": share, "votes": 0,
                                             "margin": share}))
                continue
            if a is None:
                out.append(Score.abstain("majority-vote: no answer could be extracted", scorer=self.name,
                                         version=self.version,
                                         details={"answer": None, "majority": majority, "margin": share}))
                continue
            details = {"answer": a, "majority": majority, "share": share, "votes": votes[a], "margin": share}
            value = float(a == majority) if self.reward == "binary" else votes[a] / total
            why = "agrees with the majority" if a == majority else f"disagrees with the majority {majority!r}"
            out.append(Score.ok(value, f"{why} ({top}/{total})", scorer=self.name,
                                version=self.version, details=details))
        return out


SCORERS = {"majority-vote": (MajorityVoteScorer, ("majority",))}
