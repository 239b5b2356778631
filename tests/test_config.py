"""The run config as a contract: every field checked (type, range, finiteness, plugin, options) before
any work, every problem named by its key path, and nothing but a TaoInputError for any input."""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tao_core.config import (
    OPTIONS,
    PLUGINS,
    RULES,
    GenerateConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    load_config,
    validate,
)
from tao_core.errors import TaoInputError

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _keys(cls: type = RunConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Every leaf key path of the config with its type hint."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            out |= _keys(hint, f"{prefix}{name}.")
        else:
            out[prefix + name] = hint
    return out


KEYS = _keys()
SECTIONS = ("generate", "score", "train", "guard")


@pytest.fixture(scope="module")
def toml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "run.toml"
    path.write_text('task = "arithmetic"\noutput_dir = "unused-run-dir"\n')
    return path


def test_config_imports_without_torch():
    """The config (and the errors it raises) can be read and checked where torch is absent."""
    code = (
        "import sys, importlib.abc\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'torch':\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "import tao_core.errors, tao_core.config\n"
        "from tao_core.config import RunConfig, check_values, from_dict\n"
        "assert not check_values(from_dict(RunConfig, {'train': {'lr': 1e-5}}))\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_train_config_is_the_configs():
    from tao_core import train

    assert train.TrainConfig is TrainConfig


def test_every_field_is_checked():
    """A field is covered by a range rule, a plugin look-up or an options check; only flags are free."""
    for key, hint in KEYS.items():
        assert key in RULES or key in PLUGINS or key in OPTIONS or hint is bool, f"{key}: add it to RULES"
    assert not set(RULES) - set(KEYS), "RULES names a key that is no config field"


def test_config_reference_is_current():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (REPO / "docs" / "config.md").read_text()
    assert page == module.render(), "docs/config.md is stale: run .venv/bin/python scripts/config_reference.py"
    for key in KEYS:
        assert f"| `{key}` |" in page


# --------------------------------------------------------------------------------------------
# Regressions: each value accepted (or replaced, or failing late) before, and its siblings.

BAD = [
    ({"train.lr": float("nan")}, "train.lr must be finite, got nan"),
    ({"train.lr": float("inf")}, "train.lr must be finite, got inf"),
    ({"train.lr": 0.0}, "train.lr must be > 0, got 0.0"),
    ({"train.max_grad_norm": -1.0}, "train.max_grad_norm must be >= 0, got -1.0"),
    ({"train.lora_r": 0}, r"train.lora_r must be in \[1, 4096\], got 0"),
    ({"train.betas": [2, -1]}, r"train.betas must be two numbers in \[0, 1\), got \(2, -1\)"),
    ({"train.betas": [0.9, float("nan")]}, "train.betas must be finite"),
    ({"train.betas": [0.9]}, r"'train.betas' must be tuple\[float, float\], got \[0.9\]"),
    ({"train.eps": 0.0}, "train.eps must be > 0"),
    ({"train.beta": -0.1}, "train.beta must be > 0"),
    ({"train.clip_low": 1.0}, r"train.clip_low must be in \[0, 1\)"),
    ({"train.lora_dropout": 1.0}, r"train.lora_dropout must be in \[0, 1\)"),
    ({"train.lora_target_modules": []}, "train.lora_target_modules must be a non-empty string or list"),
    ({"train.micro_batch_tokens": 10**9}, r"train.micro_batch_tokens must be in \[1, 1048576\]"),
    ({"train.seed": -1}, "train.seed must be in"),
    ({"train.precision": "fp16"}, "train.precision must be one of 'auto', 'fp32', 'bf16', got 'fp16'"),
    ({"eval_limit": -5}, "eval_limit must be >= 1, got -5"),
    ({"eval_limit": 0}, "eval_limit must be >= 1, got 0"),
    ({"threads": -1}, r"threads must be in \[1, 1024\], got -1"),
    ({"threads": 0}, r"threads must be in \[1, 1024\], got 0"),
    ({"seed": 2**40}, "seed must be in"),
    ({"prompts_per_step": 10**6}, "prompts_per_step must be in"),
    ({"output_dir": ""}, "output_dir must be a non-empty path"),
    ({"output_dir": "a\0b"}, "output_dir must be a non-empty path"),
    ({"model": " "}, "model must be a non-empty string"),
    ({"generate.n": 10**9}, r"generate.n must be in \[2, 1024\], got 1000000000"),
    ({"generate.n": 1}, r"generate.n must be in \[2, 1024\], got 1"),
    ({"generate.temperature": -1}, "generate.temperature must be >= 0, got -1"),
    ({"generate.max_new_tokens": 0}, r"generate.max_new_tokens must be in \[1, 65536\], got 0"),
    ({"generate.top_p": 0.0}, r"generate.top_p must be in \(0, 1\]"),
    ({"generate.min_p": 1.0}, r"generate.min_p must be in \[0, 1\)"),
    ({"generate.top_k": -1}, "generate.top_k must be >= 0"),
    ({"generate.top_k": 2**64}, "generate.top_k must fit in a signed 64-bit integer"),
    ({"generate.stop": ["", "x"]}, "generate.stop must be a list of non-empty strings"),
    ({"score.timeout_s": 0}, "score.timeout_s must be > 0"),
    ({"score.timeout_s": float("inf")}, "score.timeout_s must be finite"),
    ({"guard.min_length_ratio": 2.0}, r"guard.min_length_ratio must be in \[0, 1\]"),
    ({"guard.max_kl": -1.0}, "guard.max_kl must be >= 0"),
    ({"prompt_column": "text"}, "prompt_column = 'text' needs prompts_file"),
    ({"task_options.levle": "add3"}, "task_options.levle is not an option of task 'arithmetic'; it accepts: level, "),
    ({"generate.generator": "diverse", "generate.options.temps": [1.0]},
     "generate.options.temps is not an option of generator 'diverse'; it accepts: temperatures, "),
    ({"generate.options.templates": ["x"]},  # the task's default generator, 'sample', takes no options
     "generate.options.templates is not an option of generator 'sample'; it accepts: none"),
    ({"score.scorer": "majority-vote", "score.options.vote": 1}, "score.options.vote is not an option of scorer"),
    ({"score.scorer": "ensemble"}, "score.options lacks scorers, required by scorer 'ensemble'"),
    ({"model.x": 1}, "override 'model.x': 'model' is a str, not a table of keys"),
    ({"a..b": 1}, r"override 'a..b': a key is a dotted path of names"),
    ({"": 1}, "override '': a key is a dotted path of names"),
    ({".lr": 1}, r"override '.lr': a key is a dotted path"),
    ({"train.": 1}, r"override 'train.': a key is a dotted path"),
    ({"nope.x": 1}, "override 'nope.x': unknown config key 'nope'; accepted here: task, "),
    ({"train.lr.x": 1}, r"override 'train.lr.x': 'train.lr' is a float \| None, not a table"),
    ({"train": 1}, "train: expected a table, got 1"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[m[:40] for _, m in BAD])
def test_bad_values_are_named_before_any_work(toml, overrides, message):
    with pytest.raises(TaoInputError, match=message) as e:
        load_config(toml, overrides)
    assert str(e.value).startswith(f"{toml}: ")


def test_every_problem_is_listed_at_once(toml):
    with pytest.raises(TaoInputError) as e:
        load_config(toml, {"train.lr": float("nan"), "threads": 0, "generate.temperature": -1,
                           "task_options.bogus": 1})
    lines = str(e.value).splitlines()
    assert lines[0] == f"{toml}: 4 problems:"
    assert [line.split()[1] for line in lines[1:]] == ["threads", "generate.temperature", "train.lr",
                                                        "task_options.bogus"]


def test_good_values_and_overrides_pass(toml):
    cfg = load_config(toml, {"generate.max_new_tokens": 1, "generate.temperature": 0.0, "train.max_grad_norm": 0.0,
                             "generate.generator": "diverse", "generate.options.temperatures": [0.5],
                             "score.scorer": "sql-exec", "score.options.any_limit": 1,  # sql-exec takes **limits
                             "eval_limit": None, "train.betas": [0.0, 0.5]})
    assert cfg.generate.max_new_tokens == 1 and cfg.generate.options == {"temperatures": [0.5]}
    assert cfg.train.betas == (0.0, 0.5)


def test_files_the_config_names(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(TaoInputError, match="prompts_file '.*missing.jsonl' not found"):
        validate(RunConfig(prompts_file=str(tmp_path / "missing.jsonl")))
    with pytest.raises(TaoInputError, match="prompts_file .* is a directory; give a JSONL"):
        validate(RunConfig(prompts_file=str(tmp_path)))
    with pytest.raises(TaoInputError, match="output_dir .* is a file; the run directory must be a directory"):
        validate(RunConfig(output_dir=str(tmp_path / "file")))
    with pytest.raises(TaoInputError, match=r"output_dir 'a+\.\.\. is unusable \(File name too long\)"):
        validate(RunConfig(output_dir="a" * 5000))


def test_config_files_that_cannot_be_read(tmp_path):
    with pytest.raises(TaoInputError, match="config file not found"):
        load_config(tmp_path / "none.toml")
    with pytest.raises(TaoInputError, match="is a directory, not a config file"):
        load_config(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'model = "\xff"\n')
    with pytest.raises(TaoInputError, match="bad.toml: cannot read the config: 'utf-8' codec"):
        load_config(bad)
    bad.write_text("a = " + "[" * 100_000)
    with pytest.raises(TaoInputError, match="bad.toml: invalid TOML: arrays or tables nested too deeply"):
        load_config(bad)
    bad.write_text("seed = 1\nmodel = = 1\n")
    with pytest.raises(TaoInputError, match=r"bad.toml: invalid TOML: .*line 2"):
        load_config(bad)


def test_python_api_values_are_checked_too():
    """A RunConfig built in Python (no from_dict) gets the same type checks."""
    with pytest.raises(TaoInputError, match=r"rounds must be int, got '3' \(str\)"):
        validate(RunConfig(rounds="3"))
    with pytest.raises(TaoInputError, match="generate must be a GenerateConfig"):
        validate(RunConfig(generate={"n": 4}))
    with pytest.raises(TaoInputError, match=r"task_options must be dict\[str, Any\], got \{1: 2\}"):
        validate(RunConfig(task_options={1: 2}))
    with pytest.raises(TaoInputError, match="expected a RunConfig, got dict"):
        validate({})
    long = "x" * 10_000
    with pytest.raises(TaoInputError) as e:
        validate(RunConfig(task=long))
    assert "is not a registered task" in str(e.value) and len(str(e.value)) < 500


def test_trainer_checks_its_own_section():
    with pytest.raises(TaoInputError, match="invalid training config: train.lr must be finite"):
        TrainConfig(lr=float("nan")).validate()
    TrainConfig(objective="not-registered").validate()  # plugin names are validate()'s: sft trains its own


def test_options_of_an_unknown_plugin_are_not_guessed(toml):
    with pytest.raises(TaoInputError) as e:
        load_config(toml, {"generate.generator": "nope", "generate.options.x": 1})
    assert "generate.generator = 'nope' is not a registered generator" in str(e.value)
    assert "generate.options.x" not in str(e.value)


# --------------------------------------------------------------------------------------------
# Properties: any input ends in a config or a TaoInputError that says where.

_names = st.sampled_from(sorted({part for key in KEYS for part in key.split(".")} | set(SECTIONS) | {"options"}))
_text = st.text(max_size=12)
_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | _text)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(_names | _text, inner, max_size=3), max_leaves=8)
_config_dicts = st.dictionaries(_names | _text, _values | st.dictionaries(_names | _text, _values, max_size=4),
                                max_size=6)


def _names_where(message: str, extra: list[str]) -> bool:
    return any(k in message for k in [*KEYS, *SECTIONS, *extra])


@PROPERTY
@given(data=_config_dicts)
def test_any_dict_gives_a_config_or_a_named_error(data):
    try:
        validate(from_dict(RunConfig, data))
    except TaoInputError as e:
        keys = [repr(str(k))[1:-1] for k in data] + [str(k) for k in data]
        assert _names_where(str(e), keys), str(e)


@PROPERTY
@given(overrides=st.dictionaries(
    st.lists(_names | _text, min_size=1, max_size=4).map(".".join) | st.sampled_from(sorted(KEYS)),
    _values, max_size=4))
def test_any_override_gives_a_config_or_a_named_error(toml, overrides):
    try:
        load_config(toml, overrides)
    except TaoInputError as e:
        assert str(e).startswith(f"{toml}: "), str(e)


@PROPERTY
@given(key=st.sampled_from(sorted(KEYS)), value=_values)
def test_any_value_of_a_known_key_is_accepted_or_named(toml, key, value):
    try:
        load_config(toml, {key: value})
    except TaoInputError as e:
        assert key in str(e) or key.rsplit(".", 1)[0] + ".options" in str(e) or "prompts_file" in str(e), str(e)


@PROPERTY
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_text_as_toml_gives_a_config_or_a_named_error(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "random.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except TaoInputError as e:
        assert str(e).startswith(f"{path}: "), str(e)


def test_generate_defaults_are_valid():
    assert GenerateConfig().max_new_tokens is None  # None: the task's budget; 0 is rejected, never replaced
    validate(RunConfig(task="arithmetic", output_dir="unused-run-dir"))


def test_a_config_names_its_task_and_a_task_its_default_objective():
    with pytest.raises(TaoInputError, match="task is not set; name a registered task: .*arithmetic"):
        validate(RunConfig(output_dir="unused-run-dir"))
    from tao_core.plugins import get_component

    assert get_component("objectives", get_component("tasks", "arithmetic").default_objective)


def test_load_config_leaves_the_callers_overrides_alone(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('task = "arithmetic"\noutput_dir = "unused-run-dir"\n')
    inner = {"lr": 1e-5}
    cfg = load_config(path, {"train": inner, "train.lr": 2e-5})
    assert cfg.train.lr == 2e-5 and inner == {"lr": 1e-5}


def test_keys_that_only_fail_together_are_caught_before_the_run():
    base = {"task": "arithmetic", "output_dir": "unused-run-dir"}
    with pytest.raises(TaoInputError, match="generate.voters = 'policy' makes none"):
        validate(from_dict(RunConfig, {**base, "generate": {"generator": "diverse", "options": {
            "templates": ["default", "plain"], "template_weight_sets": {"plain": "teacher"}}}}))
    with pytest.raises(TaoInputError, match="no template samples with it"):
        validate(from_dict(RunConfig, {**base, "generate": {"voters": "ema"}}))
    with pytest.raises(TaoInputError, match="train.overlong_buffer = 64 exceeds generate.max_new_tokens = 6"):
        validate(from_dict(RunConfig, {**base, "generate": {"max_new_tokens": 6}, "train": {"overlong_buffer": 64}}))
