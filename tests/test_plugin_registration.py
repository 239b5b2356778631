"""Registering components: a hook registers all of its components or none, and every bad
registration (wrong type, bad name, raising, returning, late or misspelled hooks) is an error
naming the plugin."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import tao_core
from tao_core.errors import PluginError
from tao_core.plugins import PluginManager
from tests.test_plugins import TEST_OBJECTIVE, ConstantScorer, EveryHookPlugin, rmx_group, rmx_train


def _manager_with(plugin: object, name: str = "p") -> PluginManager:
    manager = PluginManager(autoload=False)
    manager.register(plugin, name=name)
    return manager


def _only_error(manager: PluginManager, name: str = "p") -> str:
    with pytest.warns(UserWarning, match=f"tao plugin {name!r}"):
        infos = {i.name: i for i in manager.plugin_infos()}
    assert infos[name].error, infos
    return infos[name].error


@pytest.mark.parametrize("exc", [RuntimeError("boom"), SystemExit(3), GeneratorExit()])
def test_hook_that_raises_registers_nothing(exc):
    class HalfThenRaise:
        @tao_core.hookimpl
        def tao_register_scorers(self, register):
            register("half-1", ConstantScorer)
            register("half-2", ConstantScorer, aliases=("h2",))
            raise exc

        @tao_core.hookimpl
        def tao_register_tasks(self, register):
            register("other-kind-ok", dict)

    manager = _manager_with(HalfThenRaise())
    error = _only_error(manager)
    assert f"tao_register_scorers raised {type(exc).__name__}" in error and "none of its scorers" in error
    reg = manager.registry
    assert reg.names("scorers") == []
    with pytest.raises(PluginError, match="unknown scorer 'h2'"):
        reg.get("scorers", "h2")
    assert reg.get("tasks", "other-kind-ok") is dict  # the plugin's other hooks are unaffected


def test_keyboard_interrupt_in_hook_propagates_and_nothing_is_cached():
    calls = []

    class Interrupted:
        @tao_core.hookimpl
        def tao_register_scorers(self, register):
            calls.append(1)
            register("ki", ConstantScorer)
            if len(calls) == 1:
                raise KeyboardInterrupt

    manager = _manager_with(Interrupted())
    with pytest.raises(KeyboardInterrupt):
        _ = manager.registry
    assert manager.registry.get("scorers", "ki") is ConstantScorer  # rebuilt on the next use


@pytest.mark.parametrize(
    ("kind", "obj", "expected"),
    [
        ("scorers", ConstantScorer(), "a factory obj(**options) -> Scorer"),
        ("generators", "sample", "a factory obj(model, **options) -> Generator"),
        ("advantages", 0.5, "a function obj(rewards, mask)"),
        ("objectives", {"loss": None}, "an Objective"),
        ("tasks", None, "a factory obj(**options) -> Task"),
        ("commands", rmx_train.callback, "a click.Command or click.Group"),
    ],
)
def test_wrong_component_type_names_plugin_and_name(kind, obj, expected):
    raised = []
    good = {"commands": rmx_group, "objectives": TEST_OBJECTIVE}.get(kind, ConstantScorer)

    @tao_core.hookimpl
    def hook(register):
        register("good-first", good)
        try:
            register("bad-one", obj)
        except PluginError as e:  # the plugin swallows the error: its hook still counts as failed
            raised.append(str(e))

    wrong = SimpleNamespace(**{f"tao_register_{kind}": hook})
    manager = _manager_with(wrong, name="wrong-plugin")
    error = _only_error(manager, "wrong-plugin")
    assert f"'bad-one' is {type(obj).__name__}" in error and expected in error
    assert manager.registry.names(kind) == []  # not even the good first registration
    assert raised and raised[0].startswith(f"plugin 'wrong-plugin', tao_register_{kind}: ")


@pytest.mark.parametrize(
    ("name", "aliases", "match"),
    [
        ("", (), "name '' must be a non-empty string"),
        (3, (), "name 3 must be"),
        ("two words", (), "without spaces"),
        ("ok", "single", "must be a tuple or list of names, got 'single'"),
        ("ok", ("",), "alias '' of scorer 'ok'"),
    ],
)
def test_bad_names_and_aliases(name, aliases, match):
    class BadName:
        @tao_core.hookimpl
        def tao_register_scorers(self, register):
            register(name, ConstantScorer, aliases=aliases)

    manager = _manager_with(BadName())
    assert match in _only_error(manager)
    assert manager.registry.names("scorers") == []


def test_hook_returning_a_value_registers_nothing():
    class OldStyle:
        @tao_core.hookimpl
        def tao_register_scorers(self, register):
            return [("constant", ConstantScorer)]

    manager = _manager_with(OldStyle())
    error = _only_error(manager)
    assert "tao_register_scorers returned list" in error and "instead of calling register" in error
    assert manager.registry.names("scorers") == []


def test_register_after_the_hook_returned_is_an_error():
    kept = []

    class Late:
        @tao_core.hookimpl
        def tao_register_scorers(self, register):
            kept.append(register)

    manager = _manager_with(Late(), name="late")
    _ = manager.registry
    with pytest.raises(PluginError, match="plugin 'late' called register\\('x', ...\\) after tao_register_scorers"):
        kept[0]("x", ConstantScorer)
    assert manager.registry.names("scorers") == []


def test_bad_hook_signature_and_double_registration_are_plugin_errors():
    manager = PluginManager(autoload=False)

    class WrongArg:
        @tao_core.hookimpl
        def tao_register_scorers(self, reg):  # pluggy only passes `register`
            reg("x", ConstantScorer)

    with pytest.raises(PluginError, match="plugin 'wrong-arg' cannot be registered"):
        manager.register(WrongArg(), name="wrong-arg")
    plugin = EveryHookPlugin()
    manager.register(plugin, name="once")
    with pytest.raises(PluginError, match="plugin 'twice' cannot be registered.*different name"):
        manager.register(plugin, name="twice")
    with pytest.raises(PluginError, match="plugin 'once' cannot be registered.*already registered"):
        manager.register(EveryHookPlugin(), name="once")


def test_misspelled_hook_is_an_error():
    manager = PluginManager(autoload=False)

    class Typo:
        @tao_core.hookimpl
        def tao_register_scorer(self, register):  # missing the final "s"
            register("x", 1)

    with pytest.raises(PluginError, match="tao_register_scorer"):
        manager.register(Typo(), name="typo")
    assert not manager.pm.has_plugin("typo")
