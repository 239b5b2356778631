"""Hook ordering: tao calls each plugin's register hook on its own, in the order pluggy would
(``tryfirst`` first, ``trylast`` last, otherwise the plugin registered last first), and a failing
plugin is still named and skipped alone."""

from __future__ import annotations

import pytest

import tao_core
from tao_core.plugins import PluginManager, call_order
from tests.test_plugins import ConstantScorer


def _plugin(label: str, calls: list[str], *, raises: bool = False, aliases: tuple[str, ...] = (), **order: bool):
    """A plugin object whose scorer hook records ``label`` in ``calls``, then registers scorer
    ``label`` (with ``aliases``) or raises."""

    class Plugin:
        @tao_core.hookimpl(**order)
        def tao_register_scorers(self, register):
            calls.append(label)
            if raises:
                raise RuntimeError(f"{label} broke")
            register(label, ConstantScorer, aliases=aliases)

    return Plugin()


def _manager(*plugins: tuple[str, object]) -> PluginManager:
    manager = PluginManager(autoload=False)
    for name, plugin in plugins:
        manager.register(plugin, name=name)
    return manager


def test_tryfirst_and_trylast_override_registration_order():
    calls: list[str] = []
    # Registered in the opposite of the order they are called in.
    manager = _manager(("early", _plugin("early", calls, tryfirst=True)),
                       ("plain-1", _plugin("plain-1", calls)),
                       ("plain-2", _plugin("plain-2", calls)),
                       ("late", _plugin("late", calls, trylast=True)))
    assert manager.registry.names("scorers") == ["early", "late", "plain-1", "plain-2"]
    assert calls == ["early", "plain-2", "plain-1", "late"]


def test_order_is_the_one_pluggy_calls_hooks_in():
    calls: list[str] = []
    manager = _manager(("a", _plugin("a", calls, trylast=True)), ("b", _plugin("b", calls)),
                       ("c", _plugin("c", calls, tryfirst=True)), ("d", _plugin("d", calls)))
    _ = manager.registry
    ours, calls[:] = list(calls), []
    manager.pm.hook.tao_register_scorers(register=lambda name, obj, aliases=(): None)
    assert ours == calls == ["c", "d", "b", "a"]
    hook = manager.pm.hook.tao_register_scorers
    assert [impl.plugin_name for impl in call_order(hook)] == ours


def test_tryfirst_plugin_claims_a_shared_alias_first():
    """The plugin called first owns a name; a later plugin's clashing registration is left out as a whole."""
    calls: list[str] = []
    manager = _manager(("plain", _plugin("plain-scorer", calls, aliases=("shared",))),
                       ("first", _plugin("first-scorer", calls, aliases=("shared",), tryfirst=True)))
    with pytest.warns(UserWarning, match="duplicate scorer name 'shared': registered by plugin 'first' and again "
                                         "by plugin 'plain'"):
        reg = manager.registry
    assert reg.names("scorers") == ["first-scorer"]


def test_failing_tryfirst_plugin_is_named_and_the_others_still_register():
    calls: list[str] = []
    manager = _manager(("ok-1", _plugin("ok-1", calls)),
                       ("broken", _plugin("broken", calls, raises=True, tryfirst=True)),
                       ("ok-2", _plugin("ok-2", calls, trylast=True)))
    with pytest.warns(UserWarning, match="tao plugin 'broken': tao_register_scorers raised RuntimeError: broken broke"):
        infos = {i.name: i for i in manager.plugin_infos()}
    assert calls == ["broken", "ok-1", "ok-2"]
    assert manager.registry.names("scorers") == ["ok-1", "ok-2"]
    assert "broken broke" in infos["broken"].error and "none of its scorers are registered" in infos["broken"].error
    assert infos["ok-1"].error is None and infos["ok-2"].error is None


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
def test_hook_wrapper_is_an_error_naming_the_plugin(style):
    calls: list[str] = []

    class Wrapping:
        @tao_core.hookimpl(**{style: True})
        def tao_register_scorers(self, register):
            calls.append("wrapper")
            register("wrapped", ConstantScorer)
            yield

    manager = _manager(("wrapping", Wrapping()), ("ok", _plugin("ok", calls)))
    with pytest.warns(UserWarning, match="tao plugin 'wrapping': tao_register_scorers is a hook wrapper"):
        infos = {i.name: i for i in manager.plugin_infos()}
    assert "tryfirst=True" in infos["wrapping"].error
    assert calls == ["ok"]  # the wrapper's body never ran
    assert manager.registry.names("scorers") == ["ok"]


def test_hook_taking_register_as_a_keyword_with_a_default():
    """Recent pluggy passes an argument that has a default by keyword; tao does the same."""

    class KeywordPlugin:
        @tao_core.hookimpl
        def tao_register_scorers(self, register=None):
            register("keyword-scorer", ConstantScorer)

    manager = _manager(("keyword", KeywordPlugin()))
    assert manager.registry.get("scorers", "keyword-scorer") is ConstantScorer
