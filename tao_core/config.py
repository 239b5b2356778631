"""The run configuration: one dataclass tree, read from TOML with every key checked up front.

The names are the same in the TOML file, the ``tao run`` flags and the Python API
(``tao_core.pipeline.run(RunConfig(...))``). An unknown key, a wrong type or a missing plugin is an
error naming the key path (``train.lr``) and what is accepted, before any work starts.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tao_core.errors import PluginError, TaoInputError
from tao_core.train import TrainConfig


@dataclass
class GenerateConfig:
    """Stage 1: how candidates are sampled."""

    generator: str | None = None  # registered generator; None: the task's default
    options: dict[str, Any] = field(default_factory=dict)  # keyword options for the generator factory
    n: int = 8  # candidates per prompt (the group size)
    temperature: float = 1.0  # sampling temperature (also divides the logits of Candidate.logprobs)
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    max_new_tokens: int | None = None  # None: the task's evaluation budget
    stop: list[str] = field(default_factory=list)  # stop strings


@dataclass
class ScoreConfig:
    """Stage 2: how candidates are scored."""

    scorer: str | None = None  # registered scorer; None: the task's default
    options: dict[str, Any] = field(default_factory=dict)  # keyword options for the scorer factory
    timeout_s: float = 120.0  # a group call running longer becomes an error score
    cache: bool = True  # reuse scores of identical (scorer, version, prompt, candidate)


@dataclass
class GuardConfig:
    """Safeguards against silent collapse of label-free rewards."""

    eval_every: int = 0  # also evaluate every K steps (0: only at each round's end)
    promote_tolerance: float = 0.0  # a round is promoted when its metric >= best - tolerance
    rollback: bool = True  # a regressing round's weights are replaced by the best checkpoint's
    min_entropy: float | None = None  # warn when the mean token entropy falls below this
    min_length_ratio: float = 0.3  # warn when mean completion length < ratio x the first step's
    max_kl: float | None = None  # warn when the KL to the reference exceeds this
    hacking_drop: float = 0.1  # warn when reward rises while the held-out metric drops this much
    stop_on_collapse: bool = False  # stop the run (keeping the best checkpoint) at the first warning


@dataclass
class RunConfig:
    """A TAO run: rounds of generate -> score -> train -> evaluate."""

    task: str = "arithmetic"  # registered task: training prompts, held-out split, defaults
    task_options: dict[str, Any] = field(default_factory=dict)  # keyword options for the task factory
    model: str = "smollm2-135m"  # alias, cache name, GGUF file or Hugging Face directory
    prompts_file: str | None = None  # unlabeled user prompts (JSONL/CSV/Parquet) instead of the task's
    prompt_column: str | None = None  # column of prompts_file holding the text
    output_dir: str = "runs/tao"  # the run directory
    seed: int = 0  # seeds prompt order, sampling and training
    rounds: int = 1  # generate -> score -> train -> evaluate rounds
    steps_per_round: int = 10  # optimizer steps per round, each on fresh samples
    prompts_per_step: int = 8  # prompts per step (x generate.n candidates)
    eval_limit: int | None = 128  # held-out examples evaluated (None: all)
    checkpoint_every: int = 5  # steps between checkpoints (and one at each round's end)
    threads: int | None = None  # torch CPU threads (None: torch's default)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        return isinstance(value, list | tuple) and all(_type_ok(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts; errors name the key path and what is accepted."""
    if not isinstance(data, dict):
        raise TaoInputError(f"{path or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            raise TaoInputError(f"unknown config key {where!r}; accepted here: {', '.join(sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, where)
            continue
        if not _type_ok(value, hint):
            raise TaoInputError(
                f"config key {where!r} must be {_hint_name(hint)}, got {value!r} ({type(value).__name__})"
            )
        kwargs[key] = tuple(value) if typing.get_origin(hint) is tuple else value
    return cls(**kwargs)


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML run config; ``overrides`` maps dotted keys (``train.lr``) to values."""
    path = Path(path)
    if not path.is_file():
        raise TaoInputError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TaoInputError(f"{path}: invalid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    try:
        cfg = from_dict(RunConfig, data)
    except TaoInputError as e:
        raise TaoInputError(f"{path}: {e}") from None
    validate(cfg, where=str(path))
    return cfg


def validate(cfg: RunConfig, where: str = "config") -> None:
    """Check values and that every named plugin exists, before any work starts."""
    from tao_core.plugins import get_registry

    problems = []
    for key in ("rounds", "steps_per_round", "prompts_per_step", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            problems.append(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.generate.n < 2:
        problems.append(f"generate.n must be >= 2 (group statistics need two candidates), got {cfg.generate.n}")
    try:
        cfg.train.validate()
    except TaoInputError as e:
        problems.append(str(e))
    reg = get_registry()
    named = [("tasks", "task", cfg.task), ("generators", "generate.generator", cfg.generate.generator),
             ("scorers", "score.scorer", cfg.score.scorer), ("objectives", "train.objective", cfg.train.objective),
             ("advantages", "train.advantage", cfg.train.advantage)]
    for kind, key, name in named:
        if name is None:
            continue
        try:
            reg.entry(kind, name)
        except PluginError:
            problems.append(f"{key} = {name!r} is not a registered {kind[:-1]}; available: {', '.join(reg.names(kind))}")
    if cfg.prompts_file is not None and not Path(cfg.prompts_file).is_file():
        problems.append(f"prompts_file {cfg.prompts_file!r} not found")
    if problems:
        raise TaoInputError(f"{where}: " + "; ".join(problems))
