"""Recipes: the task plugins' packaged configs, `tao demo [RECIPE]`, and the example configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from tao_core.cli import cli
from tao_core.config import load_config, validate
from tao_core.errors import TaoInputError
from tao_core.recipes import find_recipe, list_recipes

EXAMPLES = Path(__file__).parents[1] / "examples" / "configs"


def test_the_arithmetic_task_ships_its_recipes_as_package_data():
    found = {r.qualified: r for r in list_recipes()}
    assert {"arithmetic/demo", "arithmetic/label-free"} <= set(found)
    for recipe in found.values():
        cfg = load_config(recipe.path)  # validated whole
        assert cfg.task == recipe.task, recipe
        assert recipe.summary(), f"{recipe.path} starts with no comment saying what it does"
        assert "tao_plugins" in recipe.path.parts or "plugins" in recipe.path.parts


def test_label_free_recipe_scores_by_consensus_of_structured_voters():
    cfg = load_config(find_recipe("label-free").path)
    assert cfg.score.scorer == "majority-vote"  # no verifier, no calculator
    voters = cfg.score.options["voters"]
    templates = cfg.generate.options["extra_templates"]
    assert voters == list(templates) and all("{question}" in templates[v] for v in voters)
    assert "default" in cfg.generate.options["templates"]  # the on-policy samples that are trained


def test_find_recipe_errors_name_the_choices():
    with pytest.raises(TaoInputError, match="no recipe named 'nope'; recipes: .*arithmetic/demo"):
        find_recipe("nope")
    with pytest.raises(TaoInputError, match="no recipe named 'sql/demo'"):
        find_recipe("sql/demo")
    assert find_recipe("arithmetic/demo") == find_recipe("demo")


def test_demo_cli_options():
    runner = CliRunner()
    result = runner.invoke(cli, ["demo", "--label-free", "--scorer", "majority-vote"])
    assert result.exit_code == 2 and "--label-free sets its own scorer" in result.output
    result = runner.invoke(cli, ["demo", "nope"])
    assert result.exit_code == 2 and "no recipe named 'nope'" in result.output
    result = runner.invoke(cli, ["demo", "--list"])
    assert result.exit_code == 0 and "arithmetic/label-free" in result.output
    result = runner.invoke(cli, ["demo", "--steps", "0"])
    assert result.exit_code == 2 and "0 is not in the range 1<=x<=1000000" in result.output
    result = runner.invoke(cli, ["demo", "--set", "train.lr=fast"])
    assert result.exit_code == 2 and "train.lr" in result.output


def test_example_configs_validate():
    """Every example is a valid run config, but the flywheel's, which its own loader checks."""
    configs = sorted(EXAMPLES.glob("*.toml"))
    assert configs and EXAMPLES / "flywheel.toml" in configs
    for path in configs:
        if path.name == "flywheel.toml":
            pytest.importorskip("fastapi")
            from tao_core.flywheel_config import load_flywheel_config

            load_flywheel_config(path)
        else:
            validate(load_config(path), where=str(path))


def test_the_demo_examples_are_the_recipes_themselves():
    for name, recipe in (("demo.toml", "demo"), ("label-free-arithmetic.toml", "label-free")):
        assert (EXAMPLES / name).resolve() == find_recipe(recipe).path


def test_bad_recipe_entries_are_skipped_and_reported(tmp_path, monkeypatch):
    from tao_core.recipes import _task_recipes

    (tmp_path / "ok.toml").write_text("# A fine recipe. More words.\ntask = 'arithmetic'\n")
    (tmp_path / "adir.toml").mkdir()
    mod = tmp_path / "third_party_task.py"
    mod.write_text("class T:\n    recipes = {'ok': 'ok.toml', 'gone': 'gone.toml', 'dir': 'adir.toml', "
                   "'../evil': 'ok.toml', '': 'ok.toml', 'none': None}\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("third_party_task", mod)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(__import__("sys").modules, "third_party_task", module)
    spec.loader.exec_module(module)
    good, problems = _task_recipes("t", module.T)
    assert [r.name for r in good] == ["ok"] and good[0].summary() == "A fine recipe."
    assert len(problems) == 5 and any("gone.toml is not a file" in p for p in problems)
    assert any("'../evil'" in p and "a recipe name is" in p for p in problems)
    assert _task_recipes("t", type("L", (), {"recipes": ["a.toml"]}))[1] == [
        "task 't': `recipes` must be a dict {name: path}, got list"]


def test_demo_argument_rules():
    runner = CliRunner()
    for args, message in ((["demo", "demo", "--label-free"], "--label-free names the recipe"),
                          (["demo", "--steps", "5"], "not a multiple of the recipe's 2 rounds"),
                          (["demo", "--steps", "4", "--set", "steps_per_round=3"], "not both"),
                          (["demo", "--list", "--label-free"], "--list takes no other argument")):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_a_failing_demo_leaves_the_earlier_demo_run_alone(tmp_path):
    from tao_core.rundir import RunDir

    out = tmp_path / "demo-run"
    RunDir(out).claim("run", info={"recipe": "demo"}).release()
    (out / "metrics.jsonl").write_text('{"type": "eval"}\n')
    result = CliRunner().invoke(cli, ["demo", "--output-dir", str(out), "--set", f"model='{tmp_path / 'missing'}'"])
    assert result.exit_code == 2, result.output
    assert (out / "metrics.jsonl").read_text() == '{"type": "eval"}\n'  # the model failed before any deletion
