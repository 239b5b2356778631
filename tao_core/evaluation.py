"""A run's held-out evaluation, task by task: what the eval lines report and what the promotion gate pairs.

Every example is evaluated by :func:`tao_core.tasks.evaluate` (the task's prompt, greedy decoding, its
answer check). A task that combines others, such as the ``mixture`` task plugin, lists them in a
``components`` attribute (``{name: Task}``) and tags each held-out prompt with its component
(``Prompt.task``). Then:

- each component's examples are evaluated by that component, with its own completion budget
  (``max_new_tokens``) and check;
- every per-example row carries its task (``row["task"]``); the rows are plain dicts, so the tag
  survives the gather of the ranks' shards under ``torchrun``;
- the run's value is the mean of the per-task metrics (each task counts once, whatever its number of
  examples), and its interval the mean of the per-task 95% Wilson bounds, wider than the interval of
  the mean when the tasks' errors are independent; the eval line adds ``tasks``: each task's metric,
  value, interval and n;
- the promotion gate (:func:`tao_core.promotion.decide`) judges each task on its own items.

A plain task (no ``components``) is one task: its rows carry its name and its result is what
:func:`tao_core.tasks.evaluate` returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tao_core.tasks import EvalExample, EvalResult, Task, evaluate, result_of


def components(task: Task) -> dict[str, Task]:
    """The tasks ``task`` combines (its ``components`` attribute), empty for a plain task."""
    parts = getattr(task, "components", None)
    return dict(parts) if isinstance(parts, Mapping) else {}


def evaluate_rows(task: Task, sampler: Any, examples: Sequence[EvalExample]) -> list[dict[str, Any]]:
    """One row per example, in order: ``prompt_id``, ``completion``, ``value`` and ``task``.

    A component's examples are evaluated together by the component (one batch per task)."""
    parts = components(task)
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.prompt.task if ex.prompt.task in parts else task.name, []).append(i)
    rows: list[dict[str, Any]] = [{} for _ in examples]
    for name, where in by_task.items():
        result = evaluate(parts.get(name, task), sampler, [examples[i] for i in where])
        for i, row in zip(where, result.per_example, strict=True):
            rows[i] = {**row, "task": name}
    return rows


def _split(task: Task, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by task, in order of first appearance (a row without a tag is the run's task's)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(str(row.get("task", task.name)), []).append(dict(row))
    return out


def per_task(task: Task, rows: Sequence[Mapping[str, Any]]) -> dict[str, EvalResult]:
    """Each task's result over its rows, under its own metric name."""
    parts = components(task)
    return {name: result_of(name, getattr(parts.get(name), "metric", task.metric), group)
            for name, group in _split(task, rows).items()}


def summarize(task: Task, rows: list[dict[str, Any]]) -> EvalResult:
    """The run's result over every row: a plain task's mean, or the mean of a combined task's per-task metrics."""
    if not components(task):
        return result_of(task.name, task.metric, rows)
    tasks = list(per_task(task, rows).values())
    k = max(1, len(tasks))
    return EvalResult(task.name, task.metric, sum(r.value for r in tasks) / k, sum(r.ci_low for r in tasks) / k,
                      sum(r.ci_high for r in tasks) / k, len(rows), rows)


def eval_record(task: Task, result: EvalResult) -> dict[str, Any]:
    """The fields of an eval line: the result's, and ``tasks`` (per-task results) for a combined task."""
    rec = result.to_dict()
    if components(task):
        rec["tasks"] = {name: {k: v for k, v in r.to_dict().items() if k != "task"}
                        for name, r in per_task(task, result.per_example).items()}
    return rec


def gate_items(task: Task, rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The per-item results the promotion gate pairs, by task: ``prompt_id`` and ``value`` of each row."""
    return {name: [{"prompt_id": r["prompt_id"], "value": r["value"]} for r in group]
            for name, group in _split(task, rows).items()}
