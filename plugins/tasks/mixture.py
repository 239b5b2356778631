"""``mixture``: one run over several tasks, each with its weight, scorer, generator and held-out split.

Configured as ``task = "mixture"`` with one table per task in ``task_options.tasks``::

    [[task_options.tasks]]
    name = "arithmetic"          # a registered task (not a mixture)
    weight = 2                   # its share of the training prompts: weight / sum of weights
    options = { n_train = 512 }  # the task's own options
    scorer = "majority-vote"     # default: the task's default scorer
    scorer_options = { ... }
    generator = "diverse"        # default: the task's default generator
    generator_options = { ... }
    eval_limit = 64              # its held-out examples; default: the run's eval_limit
    max_new_tokens = 32          # its sampling budget; default: the task's own (generate.max_new_tokens caps it)

**Training prompts.** Each task's prompts, in an order seeded by ``seed``, interleaved by smooth
weighted round-robin: every prefix of the pool holds the tasks in the weights' proportions, and the
whole pool exactly (each epoch of the run visits it once). The scarcest task for its weight sets the
pool's size; the others contribute ``weight`` times as many prompts per unit of weight, the rest of
their prompts unused. A prompt keeps its task's id and text; ``Prompt.task`` and
``metadata["task"]`` name its task, and ``metadata["route"]`` its scorer, generator and budget,
which the ``by-task`` scorer and generator (:mod:`tao_plugins.tasks.routing`, the task's defaults)
follow. The prompts are self-describing, so a resumed run routes them as the first did.

**Evaluation.** Every task's held-out examples, tagged the same way; the pipeline evaluates each
task with its own budget and check, reports each task's metric and their mean (the metric
``task_mean``), and promotes a round only if no task regresses (:mod:`tao_core.evaluation`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import random
from dataclasses import dataclass
from typing import Any

from tao_core.config import MAX_NEW_TOKENS
from tao_core.errors import PluginError, TaoError, TaoInputError
from tao_core.plugins import get_registry
from tao_core.tasks import EvalExample, Task
from tao_core.types import Prompt

NAME = "mixture"
ROUTER = "by-task"  # the scorer and generator that follow metadata["route"]
KEYS = ("name", "weight", "options", "scorer", "scorer_options", "generator", "generator_options", "eval_limit",
        "max_new_tokens")
WHERE = "task_options.tasks"


@dataclass(frozen=True)
class Part:
    """One task of a mixture."""

    name: str  # the task's registered name (aliases resolved)
    task: Task
    weight: float
    eval_limit: int | None  # None: the run's eval_limit
    route: dict[str, Any]  # task, scorer, scorer_options, generator, generator_options, max_new_tokens


def _keywords(key: str, options: Any, what: str, factory: Any, positional: int) -> list[str]:
    """``options`` is a table whose keys ``factory`` accepts as keywords (after ``positional`` arguments)."""
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        return [f"{key} must be a table of option = value, got {options!r:.80}"]
    try:
        params = list(inspect.signature(factory).parameters.values())[positional:]
    except (TypeError, ValueError):  # no signature to read: the factory checks its options itself
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [f"{key}.{k} is not an option of {what}; it accepts: {', '.join(names) or 'none'}"
            for k in options if k not in names]


def _component(kind: str, key: str, name: Any, problems: list[str]) -> Any:
    """The registered entry ``name`` of ``kind``, or None with a problem naming ``key`` and what is available."""
    reg = get_registry()
    what = kind[:-1]
    available = ", ".join(n for n in reg.names(kind) if n not in (NAME, ROUTER))
    if not isinstance(name, str) or not name:
        problems.append(f"{key} must name a registered {what}; available: {available}")
        return None
    try:
        entry = reg.entry(kind, name)
    except PluginError:
        problems.append(f"{key} = {name!r} is not a registered {what}; available: {available}")
        return None
    if entry.name in (NAME, ROUTER):
        problems.append(f"{key} = {name!r}: a mixture's tasks are plain tasks, each with its own {what}; "
                        f"available: {available}")
        return None
    return entry


def _positive_int(key: str, value: Any, hi: int, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
        problems.append(f"{key} must be an integer in [1, {hi}], got {value!r:.80}")
        return None
    return value


def _entry(i: int, raw: Any, seen: dict[str, int], problems: list[str]) -> tuple[Any, dict[str, Any]] | None:
    """One checked ``task_options.tasks[i]`` table: (the task's entry, its settings), or None with problems."""
    key = f"{WHERE}[{i}]"
    if not isinstance(raw, dict):
        problems.append(f"{key} must be a table such as {{name = \"arithmetic\", weight = 1}}, got {raw!r:.80}")
        return None
    before = len(problems)
    problems += [f"{key}.{k} is not a key of a mixture entry; accepted: {', '.join(KEYS)}" for k in raw if k not in KEYS]
    task = _component("tasks", f"{key}.name", raw.get("name"), problems)
    if task is not None:
        if task.name in seen:
            problems.append(f"{key}.name = {raw['name']!r} repeats task {task.name!r} of {WHERE}[{seen[task.name]}]; "
                            "list each task once (its weight sets its share)")
        seen.setdefault(task.name, i)
        problems += _keywords(f"{key}.options", raw.get("options", {}), f"task {task.name!r}", task.obj, 0)
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight <= 0:
        problems.append(f"{key}.weight must be a finite number > 0, got {weight!r:.80}")
    chosen = {}
    for kind, positional in (("scorer", 0), ("generator", 1)):
        if task is None and kind not in raw:
            continue  # its default is the unknown task's
        default = getattr(task.obj, f"default_{kind}", None) if task is not None else None
        entry = _component(f"{kind}s", f"{key}.{kind}", raw.get(kind, default), problems)
        if entry is not None:
            chosen[kind] = entry.name
            problems += _keywords(f"{key}.{kind}_options", raw.get(f"{kind}_options", {}), f"{kind} {entry.name!r}",
                                  entry.obj, positional)
    eval_limit = _positive_int(f"{key}.eval_limit", raw.get("eval_limit"), 10**9, problems)
    budget = _positive_int(f"{key}.max_new_tokens", raw.get("max_new_tokens"), MAX_NEW_TOKENS, problems)
    if len(problems) > before:
        return None
    route = {"task": task.name, "scorer": chosen["scorer"], "scorer_options": dict(raw.get("scorer_options", {})),
             "generator": chosen["generator"], "generator_options": dict(raw.get("generator_options", {})),
             "max_new_tokens": budget}
    return task, {"weight": float(weight), "eval_limit": eval_limit, "options": dict(raw.get("options", {})),
                  "route": route}


def parse_parts(tasks: Any) -> list[Part]:
    """The mixture's tasks from ``task_options.tasks``, every problem reported in one error."""
    if not isinstance(tasks, list) or not tasks:
        raise TaoInputError(f"mixture task: {WHERE} must be a non-empty list of tables, one per task "
                            f"({{name = \"arithmetic\", weight = 1}}), got {tasks!r:.80}")
    problems: list[str] = []
    seen: dict[str, int] = {}
    checked = [_entry(i, raw, seen, problems) for i, raw in enumerate(tasks)]
    if problems:
        raise TaoInputError("mixture task: " + "; ".join(problems))
    parts = []
    for i, (entry, settings) in enumerate(c for c in checked if c is not None):  # none is None here
        try:
            task = entry.obj(**settings["options"])
        except TaoError as e:
            raise TaoInputError(f"mixture task: {WHERE}[{i}] ({entry.name}): {e}") from None
        except Exception as e:  # a task plugin's constructor that fails: name it
            raise PluginError(f"mixture task: {WHERE}[{i}]: task {entry.name!r} (plugin {entry.plugin!r}) failed to "
                              f"start: {type(e).__name__}: {e}") from e
        route = settings["route"]
        if route["max_new_tokens"] is None:
            route["max_new_tokens"] = int(task.max_new_tokens)
        parts.append(Part(entry.name, task, settings["weight"], settings["eval_limit"], route))
    return parts


def shares(weights: list[float], available: list[int]) -> list[int]:
    """Prompts taken from each task: proportional to the weights, as many as the scarcest task allows."""
    scale = min(n / w for n, w in zip(available, weights, strict=True))
    return [min(n, math.floor(w * scale + 1e-9)) for n, w in zip(available, weights, strict=True)]


def interleave(counts: list[int]) -> list[int]:
    """Task indices, ``counts[i]`` of task ``i``, by smooth weighted round-robin: each prefix keeps the proportions."""
    total, credit, out = sum(counts), [0] * len(counts), []
    for _ in range(total):
        credit = [c + n for c, n in zip(credit, counts, strict=True)]
        best = max(range(len(counts)), key=lambda i: (credit[i], -i))
        credit[best] -= total
        out.append(best)
    return out


class MixtureTask:
    """The ``mixture`` task. Options: ``tasks`` (one table per task, see the module docstring) and
    ``seed`` (the order each task's training prompts are drawn in)."""

    name = NAME
    metric = "task_mean"  # the mean of the tasks' own metrics
    default_generator = ROUTER
    default_scorer = ROUTER

    def __init__(self, tasks: list[dict[str, Any]], seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TaoInputError(f"mixture task: task_options.seed must be an integer, got {seed!r:.80}")
        self.parts = parse_parts(tasks)
        self.seed = seed
        self.components: dict[str, Task] = {p.name: p.task for p in self.parts}  # what tao_core.evaluation reads
        objectives = {getattr(p.task, "default_objective", None) for p in self.parts}
        self.default_objective = objectives.pop() if len(objectives) == 1 else None  # None: train.objective required
        self.max_new_tokens = max(p.route["max_new_tokens"] for p in self.parts)

    def _tag(self, part: Part, prompt: Prompt, route: bool) -> Prompt:
        extra = {"task": part.name, **({"route": part.route} if route else {})}
        return dataclasses.replace(prompt, task=part.name, metadata={**prompt.metadata, **extra})

    def train_prompts(self, limit: int | None = None) -> list[Prompt]:
        pools = []
        for part in self.parts:
            pool = list(part.task.train_prompts())
            if not pool:
                raise TaoInputError(f"mixture task: task {part.name!r} gave no training prompts")
            random.Random(f"{NAME}:{self.seed}:{part.name}").shuffle(pool)
            pools.append(pool)
        counts = shares([p.weight for p in self.parts], [len(p) for p in pools])
        for part, n in zip(self.parts, counts, strict=True):
            if n == 0:
                raise TaoInputError(f"mixture task: task {part.name!r} (weight {part.weight:g}) gets no prompt: the "
                                    f"scarcest task for its weight sets the pool's size; raise this weight or give the "
                                    f"scarce task more prompts (its n_train option, where it has one)")
        taken = [0] * len(self.parts)
        out = []
        for i in interleave(counts):
            out.append(self._tag(self.parts[i], pools[i][taken[i]], route=True))
            taken[i] += 1
        _unique([p.id for p in out], "training prompt")
        return out[:limit] if limit is not None else out

    def eval_examples(self, limit: int | None = None) -> list[EvalExample]:
        out = []
        for part in self.parts:
            for ex in part.task.eval_examples(part.eval_limit if part.eval_limit is not None else limit):
                out.append(dataclasses.replace(ex, prompt=self._tag(part, ex.prompt, route=False)))
        _unique([e.prompt.id for e in out], "held-out example")
        return out

    def _part(self, prompt: Prompt) -> Task:
        task = self.components.get(prompt.task or "")
        if task is None:
            raise TaoInputError(f"mixture task: prompt {prompt.id!r} belongs to task {prompt.task!r}, not one of the "
                                f"mixture's tasks {sorted(self.components)}")
        return task

    def check(self, example: EvalExample, completion: str) -> float:
        return self._part(example.prompt).check(example, completion)

    def reference(self, prompt: Prompt) -> str | None:
        """The labeled response of the prompt's own task (None for a prompt of no task of the mixture)."""
        task = self.components.get(prompt.task or "")
        return None if task is None else task.reference(prompt)


def _unique(ids: list[str], what: str) -> None:
    seen: set[str] = set()
    twice = []
    for i in ids:
        if i in seen:
            twice.append(i)
        seen.add(i)
    if twice:
        raise TaoInputError(f"mixture task: two tasks give a {what} the same id ({twice[:3]}); prompt ids must be "
                            "unique in a run, so these tasks cannot be mixed as they are")


TASKS = {NAME: MixtureTask}
