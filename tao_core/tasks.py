"""The ``Task`` protocol and the fixed evaluation protocol every task shares.

Evaluation is always: the task's own prompt, greedy decoding, the task's answer check, and a
Wilson 95% confidence interval over the held-out examples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tao_core.types import Prompt


@dataclass
class EvalExample:
    """A held-out prompt with its reference, used for evaluation only (never for training)."""

    prompt: Prompt
    reference: Any  # the label: an answer, a gold SQL query, a constraint spec
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """A task suite: unlabeled training prompts plus a labeled held-out split."""

    name: str
    metric: str  # name of the evaluation metric, e.g. "accuracy"
    default_generator: str  # registered generator name
    default_scorer: str  # registered scorer name (label-free or verifier)
    default_objective: str  # registered objective used when the config sets no train.objective
    max_new_tokens: int  # completion budget used for evaluation and by default for sampling

    def train_prompts(self, limit: int | None = None) -> list[Prompt]:
        """Unlabeled training prompts (metadata may carry verifier context, never the answer)."""
        ...

    def eval_examples(self, limit: int | None = None) -> list[EvalExample]:
        """The held-out labeled split, disjoint from the training prompts."""
        ...

    def check(self, example: EvalExample, completion: str) -> float:
        """The metric for one example: 1.0 correct, 0.0 wrong (or a value in [0, 1])."""
        ...

    def reference(self, prompt: Prompt) -> str | None:
        """The response a labeled dataset would hold for training prompt ``prompt``, or None.

        The response is written in the format the task's prompt asks for (``"Answer: 85"`` for
        ``arithmetic``, the gold query in a ```` ```sql ```` block for ``sql``), so that ``tao sft``
        can train on it as the supervised baseline TAO is compared against. Return None when the
        task has no label for the prompt (a label-free task, or a prompt from a user's file): the
        pipeline never calls this, and ``tao sft`` refuses such a task with a clear error.
        """
        ...


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class EvalResult:
    task: str
    metric: str
    value: float
    ci_low: float
    ci_high: float
    n: int
    per_example: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, with_examples: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("task", "metric", "value", "ci_low", "ci_high", "n")}
        if with_examples:
            d["per_example"] = self.per_example
        return d


def evaluate(task: Task, sampler: Any, examples: Sequence[EvalExample] | None = None,
             limit: int | None = None) -> EvalResult:
    """Greedy-decode every held-out example with ``sampler`` (a :class:`~tao_core.sampler.Sampler`)
    and apply the task's check."""
    from tao_core.types import SamplingParams

    examples = list(examples if examples is not None else task.eval_examples(limit))
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=task.max_new_tokens)
    groups = sampler.sample([e.prompt for e in examples], params)
    rows = [{"prompt_id": ex.prompt.id, "completion": group[0].text, "value": float(task.check(ex, group[0].text))}
            for ex, group in zip(examples, groups, strict=True)]
    return result_of(task.name, task.metric, rows)


def result_of(name: str, metric: str, rows: list[dict[str, Any]]) -> EvalResult:
    """The result over per-example ``rows`` (each with its ``value``): their mean and 95% Wilson interval."""
    total = 0.0
    for row in rows:
        total += row["value"]
    lo, hi = wilson_interval(total, len(rows))
    return EvalResult(name, metric, total / len(rows) if rows else 0.0, lo, hi, len(rows), rows)
