"""Plugin manager: discovers ``tao`` entry points and owns the registry of named components.

Built-in components in ``tao_plugins`` are registered through the very same entry points as
third-party packages. Loading is lazy (first use of :func:`get_plugin_manager`) and can be
restricted with ``TAO_LOAD_PLUGINS`` (comma-separated entry-point or distribution names; an empty
value loads none).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from tao_core import hookspecs
from tao_core.errors import PluginError

ENTRY_POINT_GROUP = "tao"
KINDS = ("generators", "scorers", "advantages", "objectives", "tasks", "commands")
_SINGULAR = {
    "generators": "generator",
    "scorers": "scorer",
    "advantages": "advantage estimator",
    "objectives": "objective",
    "tasks": "task",
    "commands": "command",
}


@dataclass
class Entry:
    """One registered component."""

    kind: str
    name: str
    obj: Any
    plugin: str
    aliases: tuple[str, ...] = ()


@dataclass
class PluginInfo:
    """What ``tao plugins`` shows for one plugin."""

    name: str
    version: str | None
    hooks: list[str] = field(default_factory=list)
    registers: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None  # import or registration traceback, when it failed

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "hooks": self.hooks,
            "registers": self.registers,
        }
        if self.error:
            d["error"] = self.error
        return d


class Registry:
    """Names -> components, per kind, with aliases and duplicate detection."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._aliases: dict[str, dict[str, str]] = {k: {} for k in KINDS}

    def add(self, kind: str, name: str, obj: Any, plugin: str, aliases: tuple[str, ...] = ()) -> None:
        if kind not in KINDS:
            raise PluginError(f"plugin {plugin!r}: unknown kind {kind!r}; kinds are {list(KINDS)}")
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r}: {_SINGULAR[kind]} name must be a non-empty string")
        for n in (name, *aliases):
            owner = self._owner(kind, n)
            if owner is not None:
                raise PluginError(
                    f"duplicate {_SINGULAR[kind]} name {n!r}: registered by plugin {owner.plugin!r} "
                    f"and again by plugin {plugin!r}; rename one or restrict TAO_LOAD_PLUGINS"
                )
        self._entries[kind][name] = Entry(kind, name, obj, plugin, tuple(aliases))
        for a in aliases:
            self._aliases[kind][a] = name

    def _owner(self, kind: str, name: str) -> Entry | None:
        if name in self._entries[kind]:
            return self._entries[kind][name]
        if name in self._aliases[kind]:
            return self._entries[kind][self._aliases[kind][name]]
        return None

    def entry(self, kind: str, name: str) -> Entry:
        e = self._owner(kind, name)
        if e is None:
            avail = ", ".join(sorted(self._entries[kind])) or "none"
            raise PluginError(
                f"unknown {_SINGULAR[kind]} {name!r}; available: {avail}. "
                f"`tao plugins` lists what each installed plugin registers."
            )
        return e

    def get(self, kind: str, name: str) -> Any:
        return self.entry(kind, name).obj

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]


def _allowed_names() -> set[str] | None:
    raw = os.environ.get("TAO_LOAD_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


class PluginManager:
    """Wraps a :class:`pluggy.PluginManager` and builds the registry from its hooks."""

    def __init__(self, *, autoload: bool = True) -> None:
        self.pm = pluggy.PluginManager("tao")
        self.pm.add_hookspecs(hookspecs)
        self.versions: dict[str, str | None] = {}
        self.failures: dict[str, str] = {}
        self._registry: Registry | None = None
        self._lock = threading.RLock()
        if autoload:
            self.load_entrypoints()

    def load_entrypoints(self) -> None:
        """Import every allowed ``tao`` entry point; failures are recorded and warned, not raised."""
        allowed = _allowed_names()
        seen: set[str] = set()
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            if allowed is not None and ep.name not in allowed and dist_name not in allowed:
                continue
            if ep.name in seen or self.pm.has_plugin(ep.name):
                continue
            seen.add(ep.name)
            version = dist.version if dist is not None else None
            try:
                obj = ep.load()
            except Exception:
                tb = traceback.format_exc()
                self.failures[ep.name] = tb
                self.versions[ep.name] = version
                warnings.warn(
                    f"tao plugin {ep.name!r} ({ep.value}) failed to import and is skipped:\n{tb}",
                    stacklevel=2,
                )
                continue
            self.register(obj, name=ep.name, version=version)
        if allowed:
            missing = allowed - seen - {self._dist_of(n) for n in seen}
            for name in sorted(missing):
                warnings.warn(f"TAO_LOAD_PLUGINS names {name!r}, but no such tao plugin is installed", stacklevel=2)

    def _dist_of(self, plugin_name: str) -> str | None:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP, name=plugin_name):
            if getattr(ep, "dist", None) is not None:
                return ep.dist.metadata["Name"]
        return None

    def register(self, plugin: Any, name: str | None = None, version: str | None = None) -> str:
        """Register a plugin object (module, class or instance) and check its hook names."""
        with self._lock:
            registered = self.pm.register(plugin, name=name)
            if registered is None:
                raise PluginError(f"plugin {name!r} is already registered")
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as e:
                self.pm.unregister(name=registered)
                raise PluginError(
                    f"plugin {registered!r} implements an unknown hook: {e}. "
                    f"Known hooks: {', '.join(f'tao_register_{k}' for k in KINDS)}"
                ) from None
            self.versions[registered] = version
            self._registry = None
            return registered

    def unregister(self, name: str) -> None:
        with self._lock:
            self.pm.unregister(name=name)
            self.versions.pop(name, None)
            self._registry = None

    @property
    def registry(self) -> Registry:
        with self._lock:
            if self._registry is None:
                self._registry = self._build_registry()
            return self._registry

    def _build_registry(self) -> Registry:
        reg = Registry()
        errors: dict[str, str] = {}
        for kind in KINDS:
            caller = getattr(self.pm.hook, f"tao_register_{kind}")
            # get_hookimpls() lists registrations oldest first: stable names, first owner wins.
            for impl in caller.get_hookimpls():
                plugin = impl.plugin_name

                def register(name: str, obj: Any, *, aliases: tuple[str, ...] | list[str] = (),
                             _kind: str = kind, _plugin: str = plugin) -> None:
                    reg.add(_kind, name, obj, _plugin, tuple(aliases))

                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception:
                    errors[plugin] = traceback.format_exc()
                    warnings.warn(
                        f"tao plugin {plugin!r} raised in tao_register_{kind} and its "
                        f"{kind} are skipped:\n{errors[plugin]}",
                        stacklevel=3,
                    )
        self.failures.update(errors)
        return reg

    def plugin_infos(self) -> list[PluginInfo]:
        """One :class:`PluginInfo` per loaded or failed plugin, sorted by name."""
        reg = self.registry
        infos: dict[str, PluginInfo] = {}
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            infos[name] = PluginInfo(name, self.versions.get(name), hooks, {})
        for kind in KINDS:
            for e in reg.entries(kind):
                infos.setdefault(e.plugin, PluginInfo(e.plugin, self.versions.get(e.plugin)))
                infos[e.plugin].registers.setdefault(kind, []).append(e.name)
        for name, tb in self.failures.items():
            info = infos.setdefault(name, PluginInfo(name, self.versions.get(name)))
            info.error = tb.strip().splitlines()[-1] if tb else "failed"
        return [infos[n] for n in sorted(infos)]


_MANAGER: PluginManager | None = None
_MANAGER_LOCK = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created (and entry points loaded) on first use."""
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is None:
            _MANAGER = PluginManager()
        return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the process-wide manager; the next use reloads entry points (tests, env changes)."""
    global _MANAGER
    with _MANAGER_LOCK:
        _MANAGER = None


def get_registry() -> Registry:
    return get_plugin_manager().registry


def get_component(kind: str, name: str) -> Any:
    """Look up a registered component by kind and name (or alias); unknown names list what exists."""
    return get_registry().get(kind, name)
