"""What bench/label_free.py measures: the studies, their variants and the ablation's components, in one place.

A *variant* is a run config: a recipe or example config file with keys removed and keys set. An ablation
variant removes one component of the reference recipe (``label-free-teacher``): its config keys are
deleted, so they fall back to their defaults, which switch the component off (docs/label-free.md's
table; ``docs/config.md`` for each default). A component the recipe does not switch on has nothing to
remove and gets no variant. Nothing here computes an answer: variants only change run configs.
"""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tao_core.toml_text import dump_toml  # noqa: F401 (the driver writes its run configs with it)

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "plugins" / "tasks" / "recipes"


@dataclass(frozen=True)
class Component:
    """A part of the label-free recipe that an ablation variant removes (deletes ``keys``)."""

    name: str  # the variant is called "no-<name>"
    keys: tuple[str, ...]  # dotted config keys deleted to remove it (their defaults switch it off)
    on: Callable[[Any], bool]  # is it switched on in this RunConfig?
    about: str  # what removing it leaves


COMPONENTS = (
    Component("teacher", ("generate.voters", "generate.ema_rate", "generate.options.template_weight_sets"),
              lambda c: c.generate.voters != "policy", "the voters sample with the policy's own weights"),
    Component("gate", ("score.gate",), lambda c: c.score.gate is not None, "every prompt trains, whatever its voter margin"),
    Component("importance", ("train.off_policy", "train.is_level", "train.is_cap"),
              lambda c: c.train.off_policy == "importance", "the voters' completions are dropped from training"),
    Component("flip-guard", ("guard.max_flip_rate",), lambda c: c.guard.max_flip_rate is not None,
              "no flip-rate warning (the rate is still logged)"),
    Component("mask-truncated", ("train.mask_truncated",), lambda c: c.train.mask_truncated,
              "completions cut at max_new_tokens train"),
    Component("dynamic-sampling", ("generate.dynamic_sampling", "generate.max_resample"),
              lambda c: c.generate.dynamic_sampling, "zero-variance groups are skipped, not replaced"),
    Component("lr-decay", ("train.lr_schedule",), lambda c: c.train.lr_schedule != "constant",
              "a constant learning rate for the whole run"),
    Component("overlong-penalty", ("train.overlong_buffer", "train.overlong_penalty"),
              lambda c: c.train.overlong_buffer > 0, "no soft overlong penalty"),
)


@dataclass(frozen=True)
class Variant:
    name: str
    base: Path  # the TOML config it starts from
    about: str
    sets: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    removes: tuple[str, ...] = ()  # dotted keys deleted
    seconds_per_step: float = 38.0  # the budget's figure when nothing is measured yet ...
    source: str = "label-free-teacher, 2 threads: 25.4 min of tuning for 40 steps (docs/results.md)"  # ... and where it is from


TEACHER = Variant("label-free-teacher", RECIPES / "label-free-teacher.toml",
                  "the new recipe: EMA voters, importance-sampled voter completions, margin gate, ...")
BASELINES = (
    Variant("majority-vote", RECIPES / "demo.toml", "plain majority vote over on-policy samples (the demo's "
            "settings, `tao demo --scorer majority-vote`)", sets={"score.scorer": "majority-vote"},
            seconds_per_step=6.3, source="tao demo, 2 threads: 4.2 min of tuning for 40 steps (docs/results.md)"),
    Variant("label-free", RECIPES / "label-free.toml", "the structured-prompt consensus recipe (voters share the "
            "policy's weights)", seconds_per_step=12.0,
            source="tao demo --label-free, 2 threads: 3.9 min of tuning for 20 steps (docs/results.md)"),
)
SQL = Variant("sql-consensus", REPO / "examples" / "configs" / "sql-consensus.toml",
              "execution consensus (sql-exec, mode consensus)", seconds_per_step=22.0,
              source="sql-consensus.toml, 1 thread: 7.3 min of tuning for 20 steps (docs/results.md)")
MULTI = Variant("multi-task", REPO / "examples" / "configs" / "multi-task.toml",
                "arithmetic + sql + instructions in one run (task mixture), each with its own label-free scorer",
                seconds_per_step=60.0, source="an estimate (12 prompts a step over three tasks); nothing measured yet")


@dataclass(frozen=True)
class Study:
    name: str
    about: str
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    steps: tuple[int, ...] | None  # None: the config's own rounds x steps_per_round
    evaluation: str  # "fresh": bench/fresh_eval.py's problems; "task": the task's own held-out split
    reference: str | None = None  # ablation: deltas against this variant; its round shape is every variant's
    shape: tuple[str, ...] = ()  # keys copied from the reference's config into every variant
    paired: bool = False  # the summary adds each task's paired test against the starting model


def ablation_variants() -> tuple[Variant, ...]:
    """Plain majority vote, the current recipe, the new one, and the new one without each component it switches on."""
    cfg = load_run_config(TEACHER.base)
    removed = tuple(Variant(f"no-{c.name}", TEACHER.base, f"{TEACHER.name} without {c.name}: {c.about}",
                            removes=c.keys) for c in COMPONENTS if c.on(cfg))
    return (*BASELINES, TEACHER, *removed)


def components_off() -> list[Component]:
    """The components the reference recipe does not switch on (no variant: nothing to remove)."""
    cfg = load_run_config(TEACHER.base)
    return [c for c in COMPONENTS if not c.on(cfg)]


def study(name: str) -> Study:
    if name == "arithmetic":
        return Study(name, "label-free arithmetic on bench/fresh_eval.py's held-out problems", (TEACHER,),
                     (0, 1, 2), (40, 80), "fresh")
    if name == "sql":
        return Study(name, "SQL execution accuracy on the evaluation databases", (SQL,), (0, 1, 2), None, "task")
    if name == "multitask":
        return Study(name, "one label-free run over arithmetic, sql and instructions, each task on its own held-out split",
                     (MULTI,), (0,), (40,), "task", paired=True)
    if name == "ablation":
        return Study(name, "one component removed at a time, 40 steps each", ablation_variants(), (0,), (40,),
                     "fresh", reference=TEACHER.name, shape=("steps_per_round", "guard.eval_every"))
    raise ValueError(name)


STUDIES = ("arithmetic", "sql", "multitask", "ablation")


# -- config data ------------------------------------------------------------------------------------
def read_toml(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def load_run_config(path: Path, overrides: dict[str, Any] | None = None):
    from tao_core.config import load_config

    return load_config(path, overrides)


def get_dotted(data: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{dotted}: {part!r} holds {child!r}, not a table of keys")
        node = child
    node[last] = copy.deepcopy(value)


def delete_dotted(data: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node = get_dotted(data, ".".join(parents)) if parents else data
    if isinstance(node, dict):
        node.pop(last, None)


def variant_data(variant: Variant, reference: dict[str, Any] | None, shape: tuple[str, ...]) -> dict[str, Any]:
    """The variant's config as TOML data: its base with its removals and settings (and the reference's shape keys)."""
    data = read_toml(variant.base)
    for key in variant.removes:
        delete_dotted(data, key)
    for key, value in variant.sets.items():
        set_dotted(data, key, value)
    for key in shape:
        value = get_dotted(reference or {}, key)
        if value is None:
            delete_dotted(data, key)
        else:
            set_dotted(data, key, value)
    return data
