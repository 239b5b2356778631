"""Built-in CLI commands registered through the tao_register_commands hook: ``eval`` and ``rm``.

``tao eval --task NAME --model M [--limit K] [--option KEY=VALUE] [--json]``: the fixed evaluation
protocol of :func:`tao_core.tasks.evaluate` (the task's own prompt, greedy decoding, the task's
answer check) on the task's held-out split, reported with a Wilson 95% confidence interval. A task
that combines others (``mixture``) is evaluated as the pipeline does (:mod:`tao_core.evaluation`):
each task at its own budget with its own check, reported per task and as their mean. Task options
use the one ``KEY=VALUE`` syntax of :mod:`tao_core.options` (TOML values).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click

import tao_core
from tao_core.errors import TaoInputError
from tao_core.evaluation import eval_record, evaluate_rows, summarize
from tao_core.options import parse_key_values
from tao_core.tasks import EvalResult, Task
from tao_core.types import Candidate, Prompt, SamplingParams


class _Chunked:
    """Runs a sampler over the prompts in chunks, with a progress bar on stderr."""

    def __init__(self, sampler: Any, chunk: int, label: str) -> None:
        self.sampler, self.chunk, self.label = sampler, chunk, label
        self.name = getattr(sampler, "name", "sampler")

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Candidate]]:
        from tqdm import tqdm

        out: list[list[Candidate]] = []
        with tqdm(total=len(prompts), desc=self.label, unit="prompt", disable=None, file=None) as bar:
            for start in range(0, len(prompts), self.chunk):
                part = list(prompts[start : start + self.chunk])
                out += self.sampler.sample(part, params)
                bar.update(len(part))
        return out


def build_task(task_name: str, task_options: dict[str, Any] | None = None) -> Task:
    """The registered task ``task_name`` built with ``task_options``; a bad option is an input error."""
    try:
        return tao_core.get_component("tasks", task_name)(**(task_options or {}))
    except TypeError as e:
        raise TaoInputError(f"task {task_name!r}: bad option ({e}); pass options as --option KEY=VALUE") from None


def evaluate_task(task: Task, model: Any, *, limit: int | None = None, chunk: int = 32) -> EvalResult:
    """Evaluate ``model`` (a name/path or a loaded model) on ``task``'s held-out split, each task of a
    combined task (``mixture``) at its own budget with its own check (:mod:`tao_core.evaluation`)."""
    from tao_core.models import LoadedModel, load_model
    from tao_core.sampler import sampler_for

    if limit is not None and limit < 1:
        raise TaoInputError(f"--limit must be >= 1, got {limit}")
    lm = model if isinstance(model, LoadedModel) else load_model(model)
    examples = task.eval_examples(limit)
    if not examples:
        raise TaoInputError(f"task {task.name!r} has no evaluation examples")
    return summarize(task, evaluate_rows(task, _Chunked(sampler_for(lm), chunk, f"eval {task.name}"), examples))


def run_eval(task_name: str, model: Any, *, limit: int | None = None, task_options: dict[str, Any] | None = None,
             chunk: int = 32) -> EvalResult:
    """Evaluate ``model`` (a name/path or a loaded model) on a registered task; returns an EvalResult."""
    return evaluate_task(build_task(task_name, task_options), model, limit=limit, chunk=chunk)


@click.command("eval")
@click.option("--task", "task_name", required=True, help="Registered task (`tao plugins` lists them).")
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
              help="Alias, cache name, GGUF file or HF dir.")
@click.option("--limit", type=int, default=None,
              help="Evaluate only the first K held-out examples (of each task, for a mixture).")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="Task option, e.g. --option level=mul2 (repeatable; the value is read as TOML, else as text, "
                   "as --set's).")
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="Also write one JSON line per example (prompt id, completion, value, task) here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object (with `tasks`, each "
                                                      "task's result, for a mixture).")
def eval_cmd(task_name: str, model_spec: str, limit: int | None, options: tuple[str, ...], output: str | None,
             as_json: bool) -> None:
    """Evaluate a model on a task's held-out split: greedy decoding, the task's prompt and check,
    with a Wilson 95% confidence interval; a mixture reports each task and their mean."""
    from tao_core.types import write_jsonl

    task = build_task(task_name, parse_key_values(options, "--option"))
    result = evaluate_task(task, model_spec, limit=limit)
    if output:
        write_jsonl(output, result.per_example)
    record = eval_record(task, result)
    if as_json:
        click.echo(json.dumps({**record, "model": model_spec}))
        return
    click.echo(f"{result.task} {result.metric} {result.value:.3f} "
               f"(95% CI {result.ci_low:.3f}-{result.ci_high:.3f}, n={result.n}, model {model_spec})")
    for name, r in record.get("tasks", {}).items():
        click.echo(f"  {name} {r['metric']} {r['value']:.3f} (95% CI {r['ci_low']:.3f}-{r['ci_high']:.3f}, n={r['n']})")


@tao_core.hookimpl
def tao_register_commands(register):
    from tao_plugins.rm_commands import rm_group

    register("eval", eval_cmd)
    register("rm", rm_group)
