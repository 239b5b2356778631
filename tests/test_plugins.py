"""The plugin manager: every hook, aliases, duplicates, bad plugins and TAO_LOAD_PLUGINS."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import tomllib
import types
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner

import tao_core
from tao_core.errors import PluginError
from tao_core.plugins import KINDS, PluginManager, get_plugin_manager, reset_plugin_manager
from tao_core.types import Score
from tests.conftest import REPO


class ConstantScorer:
    name = "constant"
    version = "1"

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def score(self, prompt, candidates):
        return [Score.ok(self.value, scorer=self.name) for _ in candidates]


@click.group("rmx")
def rmx_group() -> None:
    """A nested command group registered by a test plugin."""


@rmx_group.command("train")
@click.option("--steps", type=int, default=1)
def rmx_train(steps: int) -> None:
    click.echo(f"trained {steps} steps")


TEST_OBJECTIVE = SimpleNamespace(name="test-obj", loss=lambda batch, hidden, weight, cfg: None)


class EveryHookPlugin:
    """Implements all six hooks, one component each."""

    @tao_core.hookimpl
    def tao_register_generators(self, register):
        register("test-gen", object, aliases=("tg",))

    @tao_core.hookimpl
    def tao_register_scorers(self, register):
        register("test-constant", ConstantScorer)

    @tao_core.hookimpl
    def tao_register_advantages(self, register):
        register("test-adv", lambda rewards, mask: rewards)

    @tao_core.hookimpl
    def tao_register_objectives(self, register):
        register("test-obj", TEST_OBJECTIVE)

    @tao_core.hookimpl
    def tao_register_tasks(self, register):
        register("test-task", dict)

    @tao_core.hookimpl
    def tao_register_commands(self, register):
        register("rmx", rmx_group)


@pytest.fixture
def pm():
    """The process-wide manager with the test plugin registered, removed afterwards."""
    manager = get_plugin_manager()
    name = manager.register(EveryHookPlugin(), name="every-hook-test")
    yield manager
    manager.unregister(name)


def test_every_hook_registers(pm):
    reg = pm.registry
    assert reg.get("generators", "test-gen") is object
    assert reg.get("generators", "tg") is object  # alias
    assert reg.get("scorers", "test-constant") is ConstantScorer
    assert reg.get("advantages", "test-adv")(3, None) == 3
    assert reg.get("objectives", "test-obj") is TEST_OBJECTIVE
    assert reg.get("tasks", "test-task") is dict
    assert reg.get("commands", "rmx") is rmx_group
    info = {i.name: i for i in pm.plugin_infos()}["every-hook-test"]
    assert set(info.registers) == set(KINDS)
    assert info.hooks == sorted(f"tao_register_{k}" for k in KINDS)


def test_registered_command_runs_nested(pm):
    from tao_core.cli import cli

    result = CliRunner().invoke(cli, ["rmx", "train", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output


def test_unregister_removes_components(pm):
    pm.unregister("every-hook-test")
    with pytest.raises(PluginError, match="unknown scorer 'test-constant'"):
        pm.registry.get("scorers", "test-constant")
    pm.register(EveryHookPlugin(), name="every-hook-test")  # the fixture unregisters it again


def test_unknown_name_lists_available(pm):
    with pytest.raises(PluginError) as e:
        pm.registry.get("scorers", "no-such-scorer")
    assert "test-constant" in str(e.value) and "tao plugins" in str(e.value)


def test_duplicate_name_names_both_plugins(pm):
    class Dup:
        @tao_core.hookimpl
        def tao_register_scorers(self, register):
            register("test-constant", ConstantScorer)
            register("dup-only", ConstantScorer)

    with pytest.warns(UserWarning, match="duplicate scorer name 'test-constant'"):
        pm.register(Dup(), name="dup-plugin")
        reg = pm.registry
    try:
        with pytest.raises(PluginError) as e:
            reg.get("scorers", "test-constant")
        assert "'every-hook-test'" in str(e.value) and "'dup-plugin'" in str(e.value)
        assert "test-constant" not in reg.names("scorers")
        assert reg.get("scorers", "dup-only") is ConstantScorer  # the plugins' other names still work
        assert reg.get("generators", "test-gen") is object
        info = {i.name: i for i in pm.plugin_infos()}
        assert "duplicate scorer name 'test-constant'" in info["dup-plugin"].error
        assert "duplicate scorer name 'test-constant'" in info["every-hook-test"].error
    finally:
        pm.unregister("dup-plugin")
    assert pm.registry.get("scorers", "test-constant") is ConstantScorer


class DupCommand:
    """Registers a command name the every-hook plugin already has, and one named like a built-in."""

    @tao_core.hookimpl
    def tao_register_commands(self, register):
        register("rmx", click.Command("rmx"))
        register("run", click.Command("run", help="plugin's run"))
        register("dupcmd-ok", click.Command("dupcmd-ok", callback=lambda: click.echo("ok from plugin")))


@pytest.fixture
def dup_cmd(pm):
    with pytest.warns(UserWarning):
        pm.register(DupCommand(), name="dup-cmd")
        _ = pm.registry
    yield pm
    pm.unregister("dup-cmd")


def test_help_and_plugins_work_and_show_duplicates(dup_cmd):
    from tao_core.cli import cli

    res = CliRunner().invoke(cli, ["--help"])
    assert res.exit_code == 0, res.output
    assert "Plugin errors" in res.output and "duplicate command name 'rmx'" in res.output
    assert "dupcmd-ok" in res.output
    res = CliRunner().invoke(cli, ["plugins"])
    assert res.exit_code == 0, res.output
    # pluggy's order: the plugin registered last is called first
    assert "FAILED: duplicate command name 'rmx': registered by plugin 'dup-cmd' and again by plugin " \
           "'every-hook-test'" in res.output
    res = CliRunner().invoke(cli, ["plugins", "--json"])
    assert res.exit_code == 0, res.output
    data = {p["name"]: p for p in json.loads(res.output)}
    assert "'rmx'" in data["dup-cmd"]["error"] and "'run'" in data["dup-cmd"]["error"]
    res = CliRunner().invoke(cli, ["rmx", "train"])  # using the duplicate name is an error naming both
    assert res.exit_code == 2 and "'every-hook-test'" in res.output and "'dup-cmd'" in res.output
    res = CliRunner().invoke(cli, ["dupcmd-ok"])
    assert res.exit_code == 0 and "ok from plugin" in res.output


def test_builtin_command_wins_over_plugin_command(dup_cmd):
    from tao_core.cli import cli

    res = CliRunner().invoke(cli, ["run", "--help"])
    assert res.exit_code == 0 and "Run TAO from a TOML config" in res.output
    assert "plugin's run" not in res.output
    res = CliRunner().invoke(cli, ["plugins"])
    assert "FAILED: command name 'run' is taken by a built-in tao command, which wins; rename command 'run' " \
           "in plugin 'dup-cmd'" in res.output
    assert "run" not in dup_cmd.registry.names("commands")


def test_plugin_command_alias_resolves(pm):
    class Aliased:
        @tao_core.hookimpl
        def tao_register_commands(self, register):
            register("alias-cmd", click.Command("alias-cmd", callback=lambda: click.echo("aliased")),
                     aliases=("ac",))

    pm.register(Aliased(), name="aliased")
    try:
        from tao_core.cli import cli

        res = CliRunner().invoke(cli, ["ac"])
        assert res.exit_code == 0 and "aliased" in res.output
    finally:
        pm.unregister("aliased")


def test_duplicate_alias_is_an_error():
    manager = PluginManager(autoload=False)

    class A:
        @tao_core.hookimpl
        def tao_register_tasks(self, register):
            register("one", dict, aliases=("shared",))

    class B:
        @tao_core.hookimpl
        def tao_register_tasks(self, register):
            register("two", list, aliases=("shared",))

    manager.register(A(), name="a")
    manager.register(B(), name="b")  # registered last, so called first (pluggy's order)
    with pytest.warns(UserWarning, match="'shared'"):
        reg = manager.registry
    with pytest.raises(PluginError, match="'shared'.*'b'.*'a'"):
        reg.get("tasks", "shared")
    assert reg.get("tasks", "two") is list
    with pytest.raises(PluginError, match="unknown task 'one'"):  # a's registration clashed as a whole
        reg.get("tasks", "one")


def test_plugin_raising_in_hook_is_reported_and_others_keep_working():
    manager = PluginManager(autoload=False)

    class Broken:
        @tao_core.hookimpl
        def tao_register_scorers(self, register):
            raise RuntimeError("boom in plugin")

    manager.register(Broken(), name="broken")
    manager.register(EveryHookPlugin(), name="good")
    with pytest.warns(UserWarning, match="broken"):
        reg = manager.registry
    assert reg.get("scorers", "test-constant") is ConstantScorer
    info = {i.name: i for i in manager.plugin_infos()}
    assert "boom in plugin" in info["broken"].error


def _fake_dist(root: Path, dist: str, ep_name: str, module: str, source: str) -> None:
    """A minimal installed distribution with one ``tao`` entry point, found via sys.path."""
    info = root / f"{dist}-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[tao]\n{ep_name} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


def _run_tao(args: list[str], env_extra: dict[str, str], pythonpath: Path | None = None):
    env = {**os.environ, **env_extra}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-m", "tao_core.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_failing_import_is_reported_and_rest_keep_working(tmp_path):
    _fake_dist(tmp_path, "bad-plugin", "bad", "tao_bad_plugin", "raise ImportError('missing dependency xyz')\n")
    _fake_dist(
        tmp_path,
        "good-plugin",
        "good",
        "tao_good_plugin",
        """
        import tao_core

        @tao_core.hookimpl
        def tao_register_scorers(register):
            register("good-scorer", object)
        """,
    )
    out = _run_tao(["plugins", "--json"], {}, tmp_path)
    assert out.returncode == 0, out.stderr
    data = {p["name"]: p for p in json.loads(out.stdout)}
    assert data["good"]["registers"] == {"scorers": ["good-scorer"]}
    assert data["good"]["version"] == "0.3"
    assert "missing dependency xyz" in data["bad"]["error"]
    assert "tao plugin 'bad'" in out.stderr and "Traceback" in out.stderr


def test_hostile_installed_plugins_leave_help_and_plugins_working(tmp_path):
    """Exit at import, a misspelled hook, a duplicate of a built-in scorer, an entry point declared twice."""
    _fake_dist(tmp_path / "a", "exit-plugin", "exits", "tao_exit_plugin", "import sys\nsys.exit('bye')\n")
    _fake_dist(tmp_path / "a", "typo-plugin", "typo", "tao_typo_plugin", """
        import tao_core

        @tao_core.hookimpl
        def tao_register_scorer(register):
            register("x", object)
        """)
    _fake_dist(tmp_path / "a", "dupone", "dup", "tao_dup_plugin", """
        import tao_core

        @tao_core.hookimpl
        def tao_register_scorers(register):
            register("arithmetic-check", object)
        """)
    # No "-" in these two dist names: importlib reads a .dist-info folder's name up to its first "-".
    _fake_dist(tmp_path / "b", "duptwo", "dup", "tao_dup_plugin_two", "")
    pythonpath = f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}"
    out = _run_tao(["--help"], {"PYTHONPATH": pythonpath})
    assert out.returncode == 0, out.stderr
    assert "Plugin errors" in out.stdout and "run " in out.stdout
    for needle in ("exits", "SystemExit: bye", "typo", "unknown hook", "duplicate scorer name 'arithmetic-check'"):
        assert needle in out.stdout, needle
    out = _run_tao(["plugins", "--json"], {"PYTHONPATH": pythonpath})
    assert out.returncode == 0, out.stderr
    data = {p["name"]: p for p in json.loads(out.stdout)}
    assert "failed to import tao_exit_plugin (SystemExit: bye)" in data["exits"]["error"]
    assert "tao_register_scorer" in data["typo"]["error"] and "skipped" in data["typo"]["error"]
    assert "'builtin-scorers'" in data["dup"]["error"] and "'dup'" in data["dup"]["error"]
    assert "declared twice, by dupone (tao_dup_plugin) and by duptwo" in data["dup"]["error"]
    assert "duplicate scorer name" in data["builtin-scorers"]["error"]
    assert data["builtin-generators"].get("error") is None


def test_tao_load_plugins_restricts_and_empty_loads_none(tmp_path):
    out = _run_tao(["plugins", "--json"], {"TAO_LOAD_PLUGINS": ""})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    out = _run_tao(["plugins", "--json"], {"TAO_LOAD_PLUGINS": "builtin-generators"})
    names = [p["name"] for p in json.loads(out.stdout)]
    assert names == ["builtin-generators"]
    out = _run_tao(["plugins", "--json"], {"TAO_LOAD_PLUGINS": "builtin-generators,not-installed"})
    assert "not-installed" in out.stderr


def test_builtins_register_through_entry_points():
    reset_plugin_manager()
    try:
        infos = {i.name: i for i in get_plugin_manager().plugin_infos()}
    finally:
        reset_plugin_manager()
    assert infos["builtin-generators"].registers["generators"] and infos["builtin-generators"].version
    assert all(i.error is None for n, i in infos.items() if n.startswith("builtin-")), infos


def test_plugins_json_schema():
    out = _run_tao(["plugins", "--json"], {})
    data = json.loads(out.stdout)
    assert data and all(set(p) >= {"name", "version", "hooks", "registers"} for p in data)
    for p in data:
        assert set(p["registers"]) <= set(KINDS)
        assert all(isinstance(v, list) for v in p["registers"].values())


# ---------------------------------------------------------------------------------------------
# The hook reference (docs/hooks.md) and the examples it shows


def _hook_reference():
    spec = importlib.util.spec_from_file_location("hook_reference", REPO / "scripts" / "hook_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hook_reference_is_current():
    page = (REPO / "docs" / "hooks.md").read_text()
    assert page == _hook_reference().render(), "docs/hooks.md is stale: run .venv/bin/python scripts/hook_reference.py"
    for kind in KINDS:
        assert f"### `tao_register_{kind}(register)`" in page and f"| `{kind}` |" in page


def _check_generator(factory):
    assert callable(factory)  # its factory needs a loaded model; tests/test_generators.py samples for real


def _check_scorer(factory):
    from tao_core.scoring import score_groups
    from tao_core.types import Candidate, Prompt

    group = [Candidate(prompt_id="p", index=i, text=t, prompt_token_ids=[], token_ids=[], logprobs=[])
             for i, t in enumerate(["abc", ""])]
    scores = score_groups(factory(), [Prompt(id="p", text="q")], [group])[0]
    assert [(s.status, s.value) for s in scores] == [("ok", 3.0), ("abstain", None)]


def _check_advantage(fn):
    import torch

    adv = fn(torch.tensor([[1.0, 3.0, 5.0], [2.0, 9.0, 9.0]]), torch.tensor([[True, True, False], [True, False, False]]))
    assert adv.tolist() == [[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


def _check_objective(objective):
    import torch

    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8)
    batch = SimpleNamespace(targets=torch.tensor([1, 2, 3, 4]), advantages=torch.tensor([1.0, 1.0, -1.0, -1.0]))
    out = objective.loss(batch, hidden, weight, None)
    out.loss.backward()
    assert out.loss.dim() == 0 and torch.isfinite(hidden.grad).all()


def _check_task(factory):
    task = factory()
    train, held_out = task.train_prompts(), task.eval_examples()
    assert train and held_out and not {p.id for p in train} & {e.prompt.id for e in held_out}
    assert task.check(held_out[0], f"It is {held_out[0].reference}.") == 1.0 and task.check(held_out[0], "?") == 0.0
    assert task.reference(train[0]) is not None


def _check_command(command):
    res = CliRunner().invoke(command, ["tao"])
    assert res.exit_code == 0 and res.output == "hello tao\n", res.output


EXAMPLE_CHECKS = {"generators": _check_generator, "scorers": _check_scorer, "advantages": _check_advantage,
                  "objectives": _check_objective, "tasks": _check_task, "commands": _check_command}


@pytest.mark.parametrize("kind", KINDS)
def test_hook_reference_example_registers_and_works(kind):
    """Each hook's docstring example, run as a plugin: it registers one component without error."""
    plugin = types.ModuleType(f"hook_example_{kind}")
    exec(compile(_hook_reference().example(kind), f"tao_register_{kind} example", "exec"), plugin.__dict__)
    manager = PluginManager(autoload=False)
    manager.register(plugin, name="example")
    [info] = manager.plugin_infos()
    assert info.error is None and list(info.registers) == [kind] and len(info.registers[kind]) == 1, info
    EXAMPLE_CHECKS[kind](manager.registry.get(kind, info.registers[kind][0]))


def test_minimal_plugin_of_the_hook_reference_is_discovered_and_its_tests_pass(tmp_path):
    """The page's plugin and its test file, installed as a distribution with the page's entry points."""
    reference = _hook_reference()
    project = tomllib.loads(reference.PYPROJECT)["project"]
    (tmp_path / "tao_has_answer.py").write_text(reference.MODULE)
    (tmp_path / "test_tao_has_answer.py").write_text(reference.TESTS)
    info = tmp_path / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    entry_points = "".join(f"{name} = {module}\n" for name, module in project["entry-points"]["tao"].items())
    (info / "entry_points.txt").write_text(f"[tao]\n{entry_points}")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tao_has_answer.py"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "2 passed" in out.stdout, out.stdout + out.stderr
