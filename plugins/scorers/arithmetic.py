"""``arithmetic-check``: a verifier that computes the answer from the problem text itself.

It parses the prompt's question (the ``arithmetic`` task's plain-word and word-problem forms, or
any "What is 12 times 7 plus 3?"), evaluates it with a small parser (never ``eval``), and scores a
candidate 1.0 when its extracted final number equals the result, 0.0 when it differs or when no
answer can be found (a missing answer is wrong). It never reads a stored answer. When the problem
cannot be parsed from the text, it falls back to ``metadata["expression"]``; if that is absent or
unparseable too, every candidate abstains.
"""

from __future__ import annotations

from tao_plugins.scorers.majority import AnswerExtractor, ExtractMode
from tao_plugins.tasks.arithmetic import evaluate_expression, parse_problem

from tao_core.types import Candidate, Prompt, Score


def problem_text(prompt: Prompt) -> str:
    """The text a problem is parsed from: ``text``, or the last user turn of ``messages``."""
    if prompt.text is not None:
        return prompt.text
    users = [m["content"] for m in prompt.as_messages() if m.get("role") == "user"]
    return users[-1] if users else prompt.as_messages()[-1]["content"]


class ArithmeticCheckScorer:
    """Options: ``extract`` (answer extraction mode, default ``"number"``: the ``Answer:`` line's
    number, else the last number), with ``pattern`` / ``field`` for the ``regex`` / ``json-field``
    modes."""

    name = "arithmetic-check"
    version = "1"
    pointwise = True  # each candidate is checked on its own

    def __init__(self, extract: ExtractMode = "number", pattern: str | None = None,
                 field: str | None = None) -> None:
        self.extractor = AnswerExtractor(extract, pattern, field, where="arithmetic-check")

    def expected(self, prompt: Prompt) -> tuple[int | None, str]:
        """The problem's result and the expression it came from; ``(None, reason)`` if unparseable."""
        text = problem_text(prompt)
        expr = parse_problem(text)
        if expr is None:
            meta = prompt.metadata.get("expression")
            if not isinstance(meta, str):
                return None, f"no arithmetic problem found in prompt {prompt.id!r} ({text[:80]!r})"
            expr = meta
        try:
            return evaluate_expression(expr), expr
        except ValueError as e:
            return None, f"prompt {prompt.id!r}: {e}"

    def score(self, prompt: Prompt, candidates: list[Candidate]) -> list[Score]:
        want, expr = self.expected(prompt)
        if want is None:
            return [Score.abstain(f"arithmetic-check: {expr}", scorer=self.name, version=self.version)
                    for _ in candidates]
        out = []
        for c in candidates:
            got = self.extractor(c.text)
            details = {"expression": expr, "extracted": got}
            if got is None:
                out.append(Score.ok(0.0, "no answer found", scorer=self.name, version=self.version,
                                    details=details))
                continue
            try:
                right = float(got) == want
            except ValueError:
                right = False
            out.append(Score.ok(float(right), "correct" if right else f"wrong: {got} != {expr}",
                                scorer=self.name, version=self.version, details=details))
        return out


SCORERS = {"arithmetic-check": (ArithmeticCheckScorer, ("calculator",))}
