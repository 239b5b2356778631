"""The flywheel config: what ``tao flywheel CONFIG`` serves, when it runs a round, and how it gates one.

One TOML file, read into :class:`FlywheelConfig` and checked whole before anything starts: every key's
type and range (the same checks as the run config, :mod:`tao_core.fields`), the ``[serve]`` keys against
:class:`~tao_core.serve.settings.ServeConfig`, the round's run config (``round``, a file or an inline
table) as :func:`tao_core.config.validate` checks any run config, and the gate scorer's name. Errors name
the key (``trigger.min_new_prompts``, ``round.train.lr``) and the file. docs/flywheel.md lists every key.

Nothing here imports torch or a plugin at import time.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from tao_core.errors import ModelLoadError, PluginError, TaoInputError
from tao_core.fields import Rule, between, check_fields, one_of, show
from tao_core.toml_text import dump_toml

DTYPES = ("float32", "bfloat16", "float16")
# Run-config keys the flywheel sets for every round: giving them in `round` is an error naming the key.
ROUND_OWNED = {
    "model": "each round starts from the served model",
    "output_dir": "each round writes to <output_dir>/rounds/round-NNN",
    "prompts_file": "a round's prompts are the served table's",
    "prompt_column": "a round's prompts are the served table's",
    "threads": "set round_threads in the flywheel config",
    "table.url": "a round reads the served table ([table] url of the flywheel config)",
}


@dataclass
class TriggerConfig:
    """When the controller starts a round (either condition; at least one must be set)."""

    min_new_prompts: int = 64  # new distinct prompts logged since the last round; 0: no count trigger
    interval_s: float = 0.0  # seconds since the last round (or the start), with >= 1 new prompt; 0: no schedule
    poll_s: float = 5.0  # how often the controller looks at the table
    retry_s: float = 600.0  # after a failed round, wait this long before the next try


@dataclass
class GateConfig:
    """The promotion gate: the round's model against the served one on the table's held-out slice."""

    scorer: str | None = None  # registered scorer judging each answer alone (required; not the policy)
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of the scorer
    alpha: float = 0.05  # a regression must be significant at this level (paired one-sided test) ...
    tolerance: float = 0.0  # ... and larger than this drop of the mean score to reject the round
    max_prompts: int = 256  # held-out prompts judged at most (the newest)
    min_prompts: int = 8  # fewer judged prompts (both answers scored): the round is not promoted
    max_new_tokens: int = 256  # answer length cap of both models (greedy decoding)
    timeout_s: float = 120.0  # one scorer call running longer is an error score (the item is left out)
    task_eval: bool = True  # also require the run's own task evaluation to have kept new weights


@dataclass
class TableSettings:
    """The inference table the server logs to and the rounds read."""

    url: str | None = None  # SQLite file or SQLAlchemy URL; None: $TAO_HOME/inference.db
    sample_fraction: float = 1.0  # share of exchanges logged (by a hash of the request id)


@dataclass
class FlywheelConfig:
    """``tao flywheel CONFIG``: serve a model, and promote the rounds the gate lets through."""

    model: str = "smollm2-135m"  # the model served first (a restart serves the last promoted round's)
    output_dir: str = "runs/flywheel"  # flywheel.jsonl, flywheel.log's of rounds, rounds/round-NNN/
    dtype: str = "float32"  # torch dtype of the served model
    device: str = "cpu"  # torch device of the served model (cpu, cuda, cuda:1)
    server_threads: int | None = None  # torch threads of this process (server and gate); None: torch's default
    round_threads: int | None = None  # torch/OpenMP threads of each round process; None: torch's default
    round: str | dict[str, Any] = field(default_factory=dict)  # the run config of a round: a TOML path or a table
    serve: dict[str, Any] = field(default_factory=dict)  # tao serve settings (ServeConfig keys)
    table: TableSettings = field(default_factory=TableSettings)
    trigger: TriggerConfig = field(default_factory=TriggerConfig)
    gate: GateConfig = field(default_factory=GateConfig)


RULES: dict[str, Rule] = {
    "model": Rule("a non-empty string", lambda v: bool(v.strip())),
    "output_dir": Rule("a non-empty path", lambda v: bool(v.strip()) and "\0" not in v),
    "dtype": one_of(*DTYPES),
    "device": Rule("a non-empty string", lambda v: bool(v.strip())),
    "server_threads": between(1, 1024),
    "round_threads": between(1, 1024),
    "table.url": Rule("a non-empty string", lambda v: bool(v.strip())),
    "table.sample_fraction": between(0, 1, lo_open=True),
    "trigger.min_new_prompts": between(0),
    "trigger.interval_s": between(0),
    "trigger.poll_s": between(0, lo_open=True),
    "trigger.retry_s": between(0),
    "gate.scorer": Rule("a non-empty string", lambda v: bool(v.strip())),
    "gate.alpha": between(0, 1, lo_open=True, hi_open=True),
    "gate.tolerance": between(0),
    "gate.max_prompts": between(1),
    "gate.min_prompts": between(1),
    "gate.max_new_tokens": between(1, 65536),
    "gate.timeout_s": between(0, lo_open=True),
}


def load_flywheel_config(path: str | Path) -> FlywheelConfig:
    """Read and check a flywheel config; every problem is reported at once, each naming its key."""
    from tao_core.config import from_dict

    path = Path(path)
    data = _read_toml(path, "flywheel config")
    try:
        cfg = from_dict(FlywheelConfig, data)
    except TaoInputError as e:
        raise TaoInputError(f"{path}: {e}") from None
    problems = check_flywheel(cfg)
    if len(problems) == 1:
        raise TaoInputError(f"{path}: {problems[0]}")
    if problems:
        raise TaoInputError(f"{path}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def check_flywheel(cfg: FlywheelConfig) -> list[str]:
    """Every problem of ``cfg``, each naming its key (empty: the config is valid)."""
    bad = check_fields(cfg, RULES)
    problems = list(bad.values())
    t, g = cfg.trigger, cfg.gate
    if not bad.keys() & {"trigger.min_new_prompts", "trigger.interval_s"} and not (t.min_new_prompts or t.interval_s):
        problems.append("trigger: min_new_prompts and interval_s are both 0, so no round would ever start; set one "
                        "or both")
    if "gate.min_prompts" not in bad and "gate.max_prompts" not in bad and g.min_prompts > g.max_prompts:
        problems.append(f"gate.min_prompts = {g.min_prompts} exceeds gate.max_prompts = {g.max_prompts}")
    if g.scorer is None:
        problems.append("gate.scorer is not set; name a scorer that judges each answer alone and does not use the "
                        "model under test: a verifier, 'rules', or a frozen judge or reward model")
    elif "gate.scorer" not in bad:
        problems += _scorer_problems(cfg)
    if "output_dir" not in bad and Path(cfg.output_dir).exists() and not Path(cfg.output_dir).is_dir():
        problems.append(f"output_dir {show(cfg.output_dir)} is a file; the flywheel's directory must be a directory "
                        "or not exist yet")
    problems += _serve_problems(cfg.serve)
    if not cfg.round:
        problems.append("round is not set: give the run config of a round, a TOML file path or an inline [round] "
                        "table (task, rounds, steps_per_round, [round.train], ...)")
    else:
        try:
            round_config(cfg, 1, model_dir=cfg.model if "model" not in bad else "model",  # reported once
                         table_url=cfg.table.url or "inference.db", since=None)
        except TaoInputError as e:
            problems.append(str(e))
    return problems


def _serve_problems(serve: dict[str, Any]) -> list[str]:
    from tao_core.serve.settings import ServeConfig

    names = [f.name for f in dataclasses.fields(ServeConfig)]
    unknown = [k for k in serve if k not in names]
    if "model_version" in serve:
        return ["serve.model_version is set by the flywheel: 0 for the starting model, N for round N's"]
    if unknown:
        return [f"unknown config key 'serve.{unknown[0]}'; accepted here: {', '.join(n for n in names if n != 'model_version')}"]
    try:
        ServeConfig(**serve)
    except TaoInputError as e:
        return [str(e).replace("invalid serve settings: ", "serve: ")]
    except TypeError as e:
        return [f"serve: {e}"]
    return []


def _scorer_problems(cfg: FlywheelConfig) -> list[str]:
    """The gate scorer is registered and none of its options names the served model or the flywheel's
    own models: a judge on the policy's weights would grade the model under test by itself."""
    from tao_core.plugins import get_registry

    g, reg = cfg.gate, get_registry()
    try:
        reg.entry("scorers", g.scorer)
    except PluginError:
        return [f"gate.scorer = {show(g.scorer)} is not a registered scorer; available: {', '.join(reg.names('scorers'))}"]
    policy = {cfg.model, str(Path(cfg.model).expanduser().resolve())}
    # where the policy's files are: its directory (an alias or cache name resolved) and the flywheel's rounds
    owned = [Path(cfg.output_dir).expanduser().resolve(), *_model_paths(cfg.model)]
    problems = []
    for key, value in _strings(g.options, "gate.options"):
        resolved = Path(value).expanduser().resolve() if "\0" not in value else None
        if value in policy or (resolved is not None and (str(resolved) in policy or
                                                         any(resolved.is_relative_to(d) for d in owned))):
            problems.append(f"{key} = {show(value)} names the served model (the policy): the gate must not depend on "
                            "the model under test; judge with a frozen copy kept elsewhere, a verifier or rules")
    return problems


def _model_paths(model: str) -> list[Path]:
    """The served model's files: its resolved path (an alias, cache name or directory), if it resolves."""
    from tao_core.models import resolve_model_path

    paths = [Path(model).expanduser().resolve()] if Path(model).expanduser().exists() else []
    try:
        paths.append(Path(resolve_model_path(model)).resolve())
    except (ModelLoadError, OSError):
        pass  # loading the model reports it
    return paths


def _strings(value: Any, key: str):
    """(key path, string) for every string inside nested dicts and lists of ``value``."""
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{key}[{i}]")


# ---------------------------------------------------------------------------------------------
# The run config of one round


def round_data(cfg: FlywheelConfig) -> tuple[dict[str, Any], str]:
    """The round's run config as a dict (read from its file when ``round`` is a path) and where it came from."""
    if isinstance(cfg.round, str):
        where = f"round = {cfg.round!r}"
        try:
            return _read_toml(Path(cfg.round), "round run config"), where
        except TaoInputError as e:
            raise TaoInputError(f"{where}: {e} (a relative path is read from the directory tao flywheel runs "
                                f"in, {Path.cwd()})") from None
    return copy.deepcopy(cfg.round), "round"


def round_config(cfg: FlywheelConfig, n: int, *, model_dir: str, table_url: str,
                 since: datetime | None) -> tuple[Any, dict[str, Any]]:
    """Round ``n``'s run config, checked (a :class:`~tao_core.config.RunConfig`), and the dict to write
    for ``tao run``: the user's round config with the keys the flywheel owns filled in (model,
    output_dir, threads, table.url, and table.since from the second round on)."""
    from tao_core.config import RunConfig, from_dict, validate

    data, where = round_data(cfg)
    table = data.get("table", {})
    for key, why in ROUND_OWNED.items():
        section, _, name = key.rpartition(".")  # section: "" or "table"
        holder = table if section else data
        if isinstance(holder, dict) and name in holder:
            raise TaoInputError(f"{where}: {key} is set by the flywheel ({why}); leave it out")
    data.update(model=str(model_dir), output_dir=str(round_dir(cfg, n)))
    if cfg.round_threads is not None:
        data["threads"] = cfg.round_threads
    if isinstance(table, dict):  # anything else: from_dict names the key
        data["table"] = {**table, "url": table_url, **({"since": since.isoformat()} if since else {})}
    try:
        run = from_dict(RunConfig, data)
        validate(run, where=where)
    except TaoInputError as e:
        message = str(e)
        raise TaoInputError(message if message.startswith(where) else f"{where}: {message}") from None
    if run.table.holdout <= 0:
        raise TaoInputError(f"{where}: table.holdout = {run.table.holdout} holds no prompt out; the gate judges the "
                            "held-out slice, so give a share > 0 (default 0.1)")
    return run, data


def round_dir(cfg: FlywheelConfig, n: int) -> Path:
    return Path(cfg.output_dir) / "rounds" / f"round-{n:03d}"


def write_toml(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` (nested dicts of strings, numbers, booleans and lists; None left out) as TOML."""
    path.write_text(dump_toml(data), encoding="utf-8")
    tomllib.loads(path.read_text(encoding="utf-8"))  # what `tao run` will read: fail here, not in the round


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise TaoInputError(f"{path}: {what} not found" if not path.exists() else f"{path}: is not a file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
    except (OSError, UnicodeDecodeError) as e:
        raise TaoInputError(f"{path}: cannot read the {what}: {e}") from None
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise TaoInputError(f"{path}: invalid TOML: {e}") from None
