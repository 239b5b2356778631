"""The run configuration: one dataclass tree, read from TOML, checked whole before any work starts.

The names are the same in the TOML file, the ``tao run`` flags and the Python API
(``tao_core.pipeline.run(RunConfig(...))``). :func:`validate` is the one check of a config: every
field's type and allowed range (``RULES``; floats must also be finite), that every named plugin is
registered and that its options are keywords its factory accepts. Every problem is collected and
reported in one :class:`~tao_core.errors.TaoInputError` naming its key path (``train.lr``).

This module imports neither torch nor a plugin at import time, so a config can be read and checked
where torch is not installed; ``docs/config.md`` is generated from it by ``scripts/config_reference.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import stat
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tao_core import fields
from tao_core.config_plugins import OPTIONS, PLUGINS, plugin_problems  # noqa: F401 (OPTIONS, PLUGINS: read here by the docs and tests)
from tao_core.errors import TaoInputError
from tao_core.fields import Rule, between, check_fields, field_hints, hint_name, one_of, show, type_ok

PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")
LAYOUTS = ("shared_prefix", "padded")  # micro-batch layouts of tao_core.batching.pack
KL_ESTIMATORS = ("k1", "k2", "k3", "exact")
RATIO_LEVELS = ("token", "sequence")
LOSS_AGGS = ("token_mean", "seq_mean", "fixed_length")
OLD_LOGPROBS = ("sampled", "current")
VOTERS = ("policy", "frozen", "ema")
OFF_POLICY = ("drop", "importance")
BACKENDS = ("auto", "gloo", "nccl")  # torch.distributed backends of [distributed]
STRATEGIES = ("ddp", "fsdp")  # how [distributed] ranks hold the model (see docs/distributed.md)
SAMPLERS = ("auto", "engine", "hf")  # tao_core.models.SAMPLER_BACKENDS (that module imports torch)

# Upper bounds on the values that size an allocation (a bigger one is a typo, not a plan).
MAX_GROUP = 1024  # generate.n: candidates held per prompt
MAX_NEW_TOKENS = 65536  # generate.max_new_tokens: the KV cache is sized for it
MAX_PROMPTS_PER_STEP = 4096  # prompts_per_step: x generate.n candidates per step
MAX_MICRO_BATCH_TOKENS = 1 << 20  # train.micro_batch_tokens: ~2 MB of activations per token
MAX_LORA_R = 4096  # train.lora_r
MAX_THREADS = 1024  # threads
MAX_SEED = 2**32 - 1  # seed, train.seed: what every RNG (random, numpy, torch) accepts


@dataclass
class GenerateConfig:
    """Stage 1: how candidates are sampled."""

    generator: str | None = None  # registered generator; None: the task's default
    sampler: str = "auto"  # token backend under the generator: "engine" (tao's), "hf" (transformers), "auto" (engine if it can)
    options: dict[str, Any] = field(default_factory=dict)  # keyword options for the generator factory
    n: int = 8  # candidates per prompt (the group size; group statistics need two)
    temperature: float = 1.0  # sampling temperature (also divides the logits of Candidate.logprobs); 0: greedy
    top_k: int = 0  # keep the k most likely tokens; 0 disables
    top_p: float = 1.0  # nucleus sampling; 1 disables
    min_p: float = 0.0  # drop tokens with p < min_p x p_max; 0 disables
    max_new_tokens: int | None = None  # completion length cap; None: the task's evaluation budget
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the completion
    voters: str = "policy"  # weights the generator's teacher templates sample with: "policy", "frozen" (the
    # starting weights, refreshed on promotion) or "ema" (a copy following the policy at ema_rate)
    ema_rate: float = 0.99  # "ema": teacher = rate * teacher + (1 - rate) * policy after every optimizer step
    dynamic_sampling: bool = False  # replace groups whose scores are all equal by groups of fresh prompts (DAPO)
    max_resample: int = 2  # dynamic sampling: extra generate + score rounds per step at most


@dataclass
class ScoreConfig:
    """Stage 2: how candidates are scored."""

    scorer: str | None = None  # registered scorer; None: the task's default
    options: dict[str, Any] = field(default_factory=dict)  # keyword options for the scorer factory
    timeout_s: float = 120.0  # a group call running longer becomes an error score
    cache: bool = True  # reuse scores of identical (scorer, version, prompt, candidate)
    gate: list[float] | None = None  # [lo, hi]: train only on prompts whose voter margin (the majority's
    # share, Score.details["margin"]) lies in this band; None: every prompt


@dataclass
class GuardConfig:
    """Safeguards against silent collapse of label-free rewards."""

    eval_every: int = 0  # also evaluate every K steps (0: only at each round's end)
    promote_tolerance: float = 0.0  # a round regresses a task only when its mean falls by more than this (and significantly)
    rollback: bool = True  # a regressing round's weights are replaced by the best checkpoint's
    min_entropy: float | None = None  # warn when the mean token entropy falls below this (None: never)
    min_length_ratio: float = 0.3  # warn when mean completion length < ratio x the first step's
    max_kl: float | None = None  # warn when the KL to the reference exceeds this (None: never)
    hacking_drop: float = 0.1  # warn when reward rises while the held-out metric drops this much
    stop_on_collapse: bool = False  # stop the run (keeping the best checkpoint) at the first warning
    max_flip_rate: float | None = None  # warn when more than this share of revisited prompts changed their
    # voter majority (None: never; the rate is logged as flip_rate whenever a scorer reports majorities)
    promote_alpha: float = 0.05  # ... and the paired test (same held-out items, old vs new model) gives one-sided p < alpha


@dataclass
class TrainConfig:
    """How to train: the same names in the TOML config, the CLI flags and the Python API.

    ``old_logprobs = "current"`` takes the policy's own log-probs at the start of the step (detached,
    from the same forward, so the first update's ratio is exactly 1, as TRL does with one iteration)
    instead of the sampler's. Use it with ``precision = "bf16"`` on a CPU: measured on SmolLM2-135M,
    CPU bf16 autocast runs the step about 2x faster than fp32 but moves token log-probs by 0.03 nats
    on average (0.2-0.26 at worst) from the fp32 sampler's, enough to clip tokens spuriously when
    the ratio is taken against the sampled log-probs.
    """

    objective: str | None = None  # registered objective: grpo, dr_grpo, dapo, rloo, ppo_clip_kl, ...; None: the task's default
    advantage: str | None = None  # registered advantage estimator; None: the objective's default
    lr: float | None = None  # AdamW learning rate; None: 5e-6 for full fine-tuning, 1e-4 with LoRA
    lr_schedule: str = "constant"  # "constant" | "linear" (decay to 0) | "cosine" (decay to 0), after warm-up
    warmup_steps: int = 0  # steps of linear warm-up from lr / (warmup_steps + 1) to lr
    total_steps: int | None = None  # length of a decaying schedule; None: the run's rounds x steps_per_round
    weight_decay: float = 0.0  # AdamW decoupled weight decay (TRL's default)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW moment decay rates
    eps: float = 1e-8  # AdamW denominator epsilon
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    micro_batch_tokens: int = 1024  # token budget of one forward/backward (rows incl. prompts): ~2 MB of
    # fp32 activations per token on SmolLM2-135M, so ~2 GB per micro-batch
    ppo_epochs: int = 1  # optimizer updates over the same batch per step (PPO mini-steps)
    kl_coef: float | None = None  # KL(policy || reference) weight; None: the objective's default (0 mostly)
    kl_estimator: str | None = None  # "k1" | "k2" | "k3" | "exact"; None: the objective's default or k3
    clip_low: float | None = None  # ratio clipped at 1 - clip_low; None: the objective's default or 0.2
    clip_high: float | None = None  # ratio clipped at 1 + clip_high; None: the objective's default or 0.2
    ratio_level: str | None = None  # "token" | "sequence" importance ratios; None: objective's or token
    loss_agg: str | None = None  # "token_mean" | "seq_mean" | "fixed_length"; None: the objective's
    max_len: int | None = None  # fixed_length normalizer; None: the step's longest completion
    beta: float = 0.1  # online DPO inverse temperature
    lora: bool = False  # train LoRA adapters instead of every weight
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale numerator (scale = alpha / r)
    lora_dropout: float = 0.0  # LoRA dropout; 0 keeps the training log-probs equal to the sampler's
    lora_target_modules: str | list[str] = "all-linear"  # peft target modules (never the head)
    precision: str = "auto"  # "auto": bf16 autocast on a bf16-capable GPU, fp32 on the CPU; "fp32" | "bf16"
    old_logprobs: str = "sampled"  # PPO's old policy: "sampled" (Candidate.logprobs) | "current" (see above)
    layout: str = "shared_prefix"  # "shared_prefix" (prompt once per group) | "padded" (reference)
    seed: int = 0  # seeds LoRA initialization
    off_policy: str = "drop"  # candidates marked off_policy (sampled under another prompt or weights):
    # "drop" them, or train the policy's own prompt on them with truncated "importance" sampling
    is_level: str = "token"  # importance ratios per "token" or per "sequence" (off_policy = "importance")
    is_cap: float = 2.0  # importance ratios are truncated at this C (TRL's vllm_importance_sampling_cap)
    overlong_buffer: int = 0  # soft overlong penalty (DAPO) over the last N tokens before max_new_tokens; 0: off
    overlong_penalty: float = 1.0  # the penalty a completion of max_new_tokens gets, rising linearly over the buffer
    mask_truncated: bool = False  # completions cut at max_new_tokens (finish_reason "length") get no loss

    def validate(self) -> None:
        """The value checks of :func:`validate` for this section alone (no plugin look-ups): the
        trainer runs them, since it is also used without a :class:`RunConfig`."""
        _raise("invalid training config", list(check_values(self, "train.").values()))


@dataclass
class TableConfig:
    """Prompts from the inference table (``tao serve``'s log) instead of the task's; see tao_core.table_prompts."""

    url: str | None = None  # SQLAlchemy URL or SQLite file of the table; None: not used
    since: str | None = None  # only exchanges at or after this ISO 8601 date/time (UTC)
    tag: str | None = None  # only exchanges with this tag
    model: str | None = None  # only exchanges answered by this served model
    requester: str | None = None  # only this requester's (API key id's) exchanges
    near_duplicate: float = 0.9  # prompts whose word-trigram Jaccard similarity reaches this are one; 1: off
    max_key_share: float = 0.2  # no requester contributes more than this share of the prompts
    holdout: float = 0.1  # share of prompts (a stable slice by text hash) held out of training


@dataclass
class DistributedConfig:
    """Several processes under torchrun (see docs/distributed.md); read only when the launcher's environment is set."""

    backend: str = "auto"  # "auto" (nccl on CUDA GPUs, gloo on the CPU) | "gloo" | "nccl"
    timeout_s: float = 600.0  # a rank that dies or stops answering ends the run after at most this many seconds
    strategy: str = "ddp"  # "ddp" (DistributedDataParallel: every rank holds the whole model) | "fsdp" (FSDP2 shards)


@dataclass
class RunConfig:
    """A TAO run: rounds of generate -> score -> train -> evaluate."""

    task: str | None = None  # registered task (required): training prompts, held-out split, defaults
    task_options: dict[str, Any] = field(default_factory=dict)  # keyword options for the task factory
    model: str = "smollm2-135m"  # alias, cache name, GGUF file or Hugging Face directory
    prompts_file: str | None = None  # unlabeled user prompts (JSONL/CSV/Parquet) instead of the task's
    prompt_column: str | None = None  # column of prompts_file holding the text (needs prompts_file)
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
    table: TableConfig = field(default_factory=TableConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# What each field accepts

NON_EMPTY = Rule("a non-empty string", lambda v: bool(v.strip()))
PATH = Rule("a non-empty path", lambda v: bool(v.strip()) and "\0" not in v)
STRINGS = Rule("a list of non-empty strings", lambda v: all(v))
MODULES = Rule("a non-empty string or list of non-empty strings",
               lambda v: bool(v.strip()) if isinstance(v, str) else bool(v) and all(s.strip() for s in v))
GATE = Rule("two numbers lo <= hi in [0, 1]", lambda v: len(v) == 2 and 0 <= v[0] <= v[1] <= 1)
BETAS = Rule("two numbers in [0, 1)", lambda v: all(0 <= b < 1 for b in v))

RULES: dict[str, Rule] = {
    "model": NON_EMPTY,
    "prompts_file": PATH,
    "prompt_column": NON_EMPTY,
    "output_dir": PATH,
    "seed": between(0, MAX_SEED),
    "rounds": between(1),
    "steps_per_round": between(1),
    "prompts_per_step": between(1, MAX_PROMPTS_PER_STEP),
    "eval_limit": between(1),
    "checkpoint_every": between(1),
    "threads": between(1, MAX_THREADS),
    "generate.n": between(2, MAX_GROUP),
    "table.url": NON_EMPTY,
    "table.since": fields.ISO_TIME,
    "table.tag": NON_EMPTY,
    "table.model": NON_EMPTY,
    "table.requester": NON_EMPTY,
    "table.near_duplicate": between(0, 1, lo_open=True),
    "table.max_key_share": between(0, 1, lo_open=True),
    "table.holdout": between(0, 1, hi_open=True),
    "generate.sampler": one_of(*SAMPLERS),
    "generate.temperature": between(0),
    "generate.top_k": between(0),
    "generate.top_p": between(0, 1, lo_open=True),
    "generate.min_p": between(0, 1, hi_open=True),
    "generate.max_new_tokens": between(1, MAX_NEW_TOKENS),
    "generate.stop": STRINGS,
    "generate.voters": one_of(*VOTERS),
    "generate.ema_rate": between(0, 1, hi_open=True),
    "generate.max_resample": between(0, 16),
    "score.gate": GATE,
    "score.timeout_s": between(0, lo_open=True),
    "guard.eval_every": between(0),
    "guard.promote_tolerance": between(0),
    "guard.min_entropy": between(0),
    "guard.min_length_ratio": between(0, 1),
    "guard.max_kl": between(0),
    "guard.max_flip_rate": between(0, 1),
    "guard.promote_alpha": between(0, 1, lo_open=True, hi_open=True),
    "guard.hacking_drop": between(0),
    "train.lr": between(0, lo_open=True),
    "train.lr_schedule": one_of(*LR_SCHEDULES),
    "train.warmup_steps": between(0),
    "train.total_steps": between(1),
    "train.weight_decay": between(0),
    "train.betas": BETAS,
    "train.eps": between(0, lo_open=True),
    "train.max_grad_norm": between(0),
    "train.micro_batch_tokens": between(1, MAX_MICRO_BATCH_TOKENS),
    "train.ppo_epochs": between(1),
    "train.kl_coef": between(0),
    "train.kl_estimator": one_of(*KL_ESTIMATORS),
    "train.clip_low": between(0, 1, hi_open=True),
    "train.clip_high": between(0),
    "train.ratio_level": one_of(*RATIO_LEVELS),
    "train.loss_agg": one_of(*LOSS_AGGS),
    "train.max_len": between(1),
    "train.beta": between(0, lo_open=True),
    "train.lora_r": between(1, MAX_LORA_R),
    "train.lora_alpha": between(1),
    "train.lora_dropout": between(0, 1, hi_open=True),
    "train.lora_target_modules": MODULES,
    "train.precision": one_of(*PRECISIONS),
    "train.old_logprobs": one_of(*OLD_LOGPROBS),
    "train.off_policy": one_of(*OFF_POLICY),
    "train.is_level": one_of(*RATIO_LEVELS),
    "train.is_cap": between(1),
    "train.overlong_buffer": between(0, MAX_NEW_TOKENS),
    "train.overlong_penalty": between(0),
    "train.layout": one_of(*LAYOUTS),
    "train.seed": between(0, MAX_SEED),
    "distributed.backend": one_of(*BACKENDS),
    "distributed.timeout_s": between(0, lo_open=True),
    "distributed.strategy": one_of(*STRATEGIES),
}


def check_values(cfg: Any, prefix: str = "", rules: dict[str, Rule] | None = None) -> dict[str, str]:
    """:func:`~tao_core.fields.check_fields` with :data:`RULES` unless ``rules`` is given: ``{key:
    message}`` for each bad field. Plugin names and options are :func:`validate`'s."""
    return check_fields(cfg, RULES if rules is None else rules, prefix)


def _raise(where: str, problems: list[str]) -> None:
    if len(problems) == 1:
        raise TaoInputError(f"{where}: {problems[0]}")
    if problems:
        raise TaoInputError(f"{where}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------------------------
# Reading and checking a config


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts; errors name the key path and what is accepted.

    Types are checked here, ranges and plugins by :func:`validate`.
    """
    if not isinstance(data, dict):
        raise TaoInputError(f"{path or 'config'}: expected a table, got {show(data)} ({type(data).__name__})")
    hints = field_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in hints:
            raise TaoInputError(f"unknown config key {where!r}; accepted here: {', '.join(hints)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, where)
            continue
        if not type_ok(value, hint):
            raise TaoInputError(
                f"config key {where!r} must be {hint_name(hint)}, got {show(value)} ({type(value).__name__})"
            )
        kwargs[key] = tuple(value) if typing.get_origin(hint) is tuple else value
    return cls(**kwargs)


def _override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b] = value`` for ``dotted = "a.b"``; every part but the last must be a table."""
    parts = dotted.split(".") if isinstance(dotted, str) else [""]
    if not all(p.strip() for p in parts):
        raise TaoInputError(f"override {dotted!r}: a key is a dotted path of names, like 'train.lr'")
    node: dict[str, Any] = data
    section: type | None = RunConfig  # None: inside a free-form options table
    for depth, name in enumerate(parts[:-1], 1):
        where = ".".join(parts[:depth])
        if section is not None:
            hints = field_hints(section)
            if name not in hints:
                raise TaoInputError(f"override {dotted!r}: unknown config key {where!r}; accepted here: "
                                    f"{', '.join(hints)}")
            hint = hints[name]
            if not (dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict):
                raise TaoInputError(f"override {dotted!r}: {where!r} is a {hint_name(hint)}, not a table of keys")
            section = hint if dataclasses.is_dataclass(hint) else None
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise TaoInputError(f"override {dotted!r}: {where!r} holds {show(child)}, not a table of keys")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a TOML run config; ``overrides`` maps dotted keys (``train.lr``) to values. The result
    has passed :func:`validate`."""
    path = Path(path)
    kind = _probe(str(path))
    if kind != "a file":
        raise TaoInputError(f"{path}: " + ("config file not found" if kind == "nothing" else f"is {kind}, not a config file"))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))  # a BOM is not TOML
    except (OSError, UnicodeDecodeError) as e:
        raise TaoInputError(f"{path}: cannot read the config: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise TaoInputError(f"{path}: invalid TOML: {e}") from None
    except RecursionError:
        raise TaoInputError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    try:
        for dotted, value in copy.deepcopy(overrides or {}).items():  # the caller's dicts stay as given
            _override(data, dotted, value)
        cfg = from_dict(RunConfig, data)
    except TaoInputError as e:
        raise TaoInputError(f"{path}: {e}") from None
    validate(cfg, where=str(path))
    return cfg


def validate(cfg: RunConfig, where: str = "config") -> None:
    """Check every field (type, range, finiteness), the named plugins and their options, and the
    input files; raise one :class:`TaoInputError` listing every problem. Call it before any model
    load or run-directory write."""
    if not isinstance(cfg, RunConfig):
        raise TaoInputError(f"{where}: expected a RunConfig, got {type(cfg).__name__}")
    bad = check_values(cfg)
    if any(section in bad for section in ("generate", "score", "train")):
        _raise(where, list(bad.values()))  # the checks below read inside each section
    _raise(where, [*bad.values(), *_file_problems(cfg, bad), *plugin_problems(cfg, bad), *_pair_problems(cfg, bad)])


def weight_set_routes(cfg: RunConfig) -> dict[str, Any]:
    """Every ``template_weight_sets`` table of the run's generator options, by key path: the run
    generator's (``generate.options``) and those a task's options carry in ``generator_options``
    tables (a mixture's ``task_options.tasks[i].generator_options``); empty tables left out."""
    found: dict[str, Any] = {}
    if isinstance(cfg.generate.options, dict) and cfg.generate.options.get("template_weight_sets"):
        found["generate.options.template_weight_sets"] = cfg.generate.options["template_weight_sets"]

    def walk(node: Any, path: str, depth: int) -> None:
        if depth > 8:  # task options are a few tables deep; deeper is no generator's
            return
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            where = f"{path}[{key}]" if isinstance(node, list) else f"{path}.{key}"
            if key == "generator_options" and isinstance(value, dict) and value.get("template_weight_sets"):
                found[f"{where}.template_weight_sets"] = value["template_weight_sets"]
            else:
                walk(value, where, depth + 1)

    walk(cfg.task_options, "task_options", 0)
    return found


def _voter_problems(cfg: RunConfig) -> list[str]:
    """``generate.voters`` and the templates routed to weight sets must agree."""
    routes = weight_set_routes(cfg)
    if cfg.generate.voters == "policy" and routes:
        where = "; ".join(f"{k} {show(v)}" for k, v in routes.items())
        return [f"{where} routes templates to weight sets, but generate.voters = 'policy' makes none: set "
                "generate.voters to 'frozen' or 'ema'"]
    if cfg.generate.voters != "policy" and not routes:
        return [f"generate.voters = {cfg.generate.voters!r} keeps a teacher copy of the weights, but no template "
                "samples with it: set generate.options.template_weight_sets (e.g. {tens = \"teacher\"}) or, in a "
                "mixture, the generator_options.template_weight_sets of a task_options.tasks entry"]
    return []


def _pair_problems(cfg: RunConfig, bad: dict[str, str]) -> list[str]:
    """Keys that are valid alone but not together (found here, not at the first step)."""
    g, t, problems = cfg.generate, cfg.train, []
    if "generate.voters" not in bad:
        problems += _voter_problems(cfg)
    if cfg.table.url is not None and cfg.prompts_file is not None:
        problems.append("prompts_file and table.url both name the training prompts; keep one")
    if cfg.distributed.strategy == "fsdp":
        problems += _fsdp_problems(cfg)
    if ("train.overlong_buffer" not in bad and "generate.max_new_tokens" not in bad and g.max_new_tokens is not None
            and t.overlong_buffer > g.max_new_tokens):
        problems.append(f"train.overlong_buffer = {t.overlong_buffer} exceeds generate.max_new_tokens = "
                        f"{g.max_new_tokens}: the penalty ramps over the last tokens before the cap")
    return problems


def _fsdp_problems(cfg: RunConfig) -> list[str]:
    """What ``distributed.strategy = "fsdp"`` does not run (yet): each with what to do instead."""
    g, t, problems = cfg.generate, cfg.train, []
    if t.lora:
        problems.append("distributed.strategy = 'fsdp' does not shard LoRA adapters: use strategy 'ddp' with "
                        "train.lora (the frozen base is the bulk and fits where full fine-tuning does not)")
    if g.sampler == "hf":
        problems.append("distributed.strategy = 'fsdp' samples with tao's engine over weights gathered once per "
                        "generate phase; generate.sampler = 'hf' would regather them on every decode step: use "
                        "'engine' or 'auto' (Llama-family models), or strategy 'ddp'")
    if g.voters != "policy":
        problems.append(f"distributed.strategy = 'fsdp' keeps no sharded teacher: generate.voters = {g.voters!r} "
                        "needs strategy 'ddp'")
    return problems


def _file_problems(cfg: RunConfig, bad: dict[str, str]) -> list[str]:
    """The files the config names, for the keys whose values passed :func:`check_values`."""
    problems = []
    if cfg.prompts_file is None and cfg.prompt_column is not None:
        problems.append(f"prompt_column = {show(cfg.prompt_column)} needs prompts_file, the file holding that column")
    if "prompts_file" not in bad and cfg.prompts_file is not None:
        kind = _probe(cfg.prompts_file)
        if kind != "a file":
            problems.append(f"prompts_file {show(cfg.prompts_file)} " +
                            ("not found" if kind == "nothing" else f"is {kind}; give a JSONL, CSV or Parquet file"))
    if "output_dir" not in bad and _probe(cfg.output_dir) not in ("nothing", "a directory"):
        problems.append(f"output_dir {show(cfg.output_dir)} is {_probe(cfg.output_dir)}; the run directory must be "
                        "a directory or not exist yet")
    return problems


def _probe(path: str) -> str:
    """What ``path`` names: "a file", "a directory", "nothing", "something else" or why it can't be looked at."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "nothing"
    except (OSError, ValueError) as e:
        return f"unusable ({getattr(e, 'strerror', None) or e})"
    return "a file" if stat.S_ISREG(mode) else "a directory" if stat.S_ISDIR(mode) else "something else"
