"""Plugin manager: discovers ``tao`` entry points and owns the registry of named components.

Built-in components in ``tao_plugins`` are registered through the very same entry points as
third-party packages. Loading is lazy (first use of :func:`get_plugin_manager`) and can be
restricted with ``TAO_LOAD_PLUGINS`` (comma-separated entry-point or distribution names; an empty
value loads none).

A plugin cannot take tao down: a failed import, a hook that raises (``SystemExit`` included; only
``KeyboardInterrupt`` propagates), a component that is not what its kind needs, or a name taken by
another plugin or by a built-in command is recorded against the plugin, warned about, and shown by
``tao plugins`` and ``tao --help``. Each hook's registrations are staged and committed only when
the hook returns normally, so a failing hook leaves nothing half-registered.

The implementations of a hook are called one plugin at a time, so that each failure is the
plugin's own, in pluggy's order (:func:`call_order`): ``tryfirst`` first, ``trylast`` last,
otherwise the plugin registered last first.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import click
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
# kind -> (check of a registered object, what the hook asks for in words: errors and the hook reference)
EXPECTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "generators": (callable, "a factory obj(model, **options) -> Generator"),
    "scorers": (callable, "a factory obj(**options) -> Scorer"),
    "advantages": (callable, "a function obj(rewards, mask) -> advantages"),
    "objectives": (lambda o: callable(getattr(o, "loss", None)), "an Objective (an object with a callable .loss)"),
    "tasks": (callable, "a factory obj(**options) -> Task"),
    "commands": (lambda o: isinstance(o, click.Command), "a click.Command or click.Group"),
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
    error: str | None = None  # what failed (import, a hook, a name clash), one problem per line

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


def _valid_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and not any(c.isspace() for c in name)


def check_component(kind: str, name: Any, obj: Any, aliases: Any = ()) -> tuple[str, ...]:
    """Raise :class:`PluginError` unless ``name``, ``aliases`` and ``obj`` fit ``kind``; return the aliases."""
    where = f"tao_register_{kind}"
    what = _SINGULAR[kind]
    if not _valid_name(name):
        raise PluginError(f"{where}: {what} name {name!r} must be a non-empty string without spaces")
    if isinstance(aliases, str) or not isinstance(aliases, tuple | list):
        raise PluginError(
            f"{where}: aliases of {what} {name!r} must be a tuple or list of names, got {aliases!r} "
            f"(write aliases=({aliases!r},) for one alias)"
        )
    for a in aliases:
        if not _valid_name(a):
            raise PluginError(f"{where}: alias {a!r} of {what} {name!r} must be a non-empty string without spaces")
    check, expected = EXPECTED[kind]
    if not check(obj):
        raise PluginError(
            f"{where}: {what} {name!r} is {type(obj).__name__} {obj!r:.80}, not {expected}; "
            f"register the factory itself (e.g. the class), not an instance or a value"
        )
    return tuple(dict.fromkeys(a for a in aliases if a != name))


class Registry:
    """Names -> components, per kind, with aliases, reserved names and duplicate detection.

    A name two plugins register is *conflicted*: looking it up raises an error naming both, and
    both plugins carry that error in :attr:`errors`; their other names keep working.
    """

    def __init__(self, reserved: dict[str, dict[str, str]] | None = None) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._aliases: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self._conflicts: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self._reserved = {k: dict((reserved or {}).get(k, {})) for k in KINDS}  # name -> its owner, in words
        self.errors: dict[str, list[str]] = {}  # plugin name -> problems found while registering it

    def record_error(self, plugin: str, message: str) -> None:
        self.errors.setdefault(plugin, []).append(message)

    def add(self, kind: str, name: str, obj: Any, plugin: str, aliases: tuple[str, ...] = ()) -> bool:
        """Add a checked component; on a clash record the error (against both plugins) and return False."""
        what = _SINGULAR[kind]
        for n in (name, *aliases):
            if n in self._reserved[kind]:
                self.record_error(
                    plugin,
                    f"{what} name {n!r} is taken by {self._reserved[kind][n]}, which wins; "
                    f"rename {what} {name!r} in plugin {plugin!r}",
                )
                return False
        for n in (name, *aliases):
            owner = self._owner(kind, n)
            if owner is not None:
                message = (
                    f"duplicate {what} name {n!r}: registered by plugin {owner.plugin!r} and again by plugin "
                    f"{plugin!r}; neither is used under that name until one is renamed, uninstalled or left "
                    f"out of TAO_LOAD_PLUGINS"
                )
                self._conflicts[kind].setdefault(n, message)
                self.record_error(owner.plugin, message)
                if plugin != owner.plugin:
                    self.record_error(plugin, message)
                return False
        self._entries[kind][name] = Entry(kind, name, obj, plugin, aliases)
        for a in aliases:
            self._aliases[kind][a] = name
        return True

    def _owner(self, kind: str, name: str) -> Entry | None:
        if name in self._entries[kind]:
            return self._entries[kind][name]
        if name in self._aliases[kind]:
            return self._entries[kind][self._aliases[kind][name]]
        return None

    def lookup(self, kind: str, name: str) -> Entry | None:
        """The entry for a name or alias, None when unknown; a conflicted name raises :class:`PluginError`."""
        if name in self._conflicts[kind]:
            raise PluginError(self._conflicts[kind][name])
        return self._owner(kind, name)

    def entry(self, kind: str, name: str) -> Entry:
        e = self.lookup(kind, name)
        if e is None:
            avail = ", ".join(self.names(kind)) or "none"
            raise PluginError(
                f"unknown {_SINGULAR[kind]} {name!r}; available: {avail}. "
                f"`tao plugins` lists what each installed plugin registers."
            )
        return e

    def get(self, kind: str, name: str) -> Any:
        return self.entry(kind, name).obj

    def names(self, kind: str) -> list[str]:
        """Usable names of a kind (conflicted ones left out)."""
        return sorted(n for n in self._entries[kind] if n not in self._conflicts[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in self.names(kind)]

    def plugin_entries(self, kind: str) -> list[Entry]:
        """Every entry a plugin registered, conflicted names included (what ``tao plugins`` shows)."""
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]


class _Staging:
    """The registrations of one hook call, committed only if the hook returns normally."""

    def __init__(self, kind: str, plugin: str) -> None:
        self.kind = kind
        self.plugin = plugin
        self.items: list[tuple[str, Any, tuple[str, ...]]] = []
        self.error: str | None = None  # the first bad registration, even if the plugin swallowed it
        self.open = True

    def register(self, name: str, obj: Any, *, aliases: tuple[str, ...] | list[str] = ()) -> None:
        if not self.open:
            raise PluginError(
                f"plugin {self.plugin!r} called register({name!r}, ...) after tao_register_{self.kind} "
                f"returned; call it only while the hook runs"
            )
        try:
            checked = check_component(self.kind, name, obj, aliases)
        except PluginError as e:
            self.error = self.error or str(e)
            raise PluginError(f"plugin {self.plugin!r}, {e}") from None
        self.items.append((name, obj, checked))


def call_order(hook: pluggy.HookCaller) -> list[pluggy.HookImpl]:
    """A hook's implementations in the order pluggy calls them: ``tryfirst`` ones first, ``trylast``
    ones last, and otherwise the most recently registered plugin first (``get_hookimpls()`` lists
    them the other way round, oldest and ``trylast`` first)."""
    return list(reversed(hook.get_hookimpls()))


def _register_from(impl: pluggy.HookImpl, kind: str, reg: Registry) -> tuple[str, BaseException | None] | None:
    """Call one plugin's ``tao_register_<kind>`` and add what it registered to ``reg``, all or nothing.

    Returns None when the hook returned normally, else ``(problem, the exception it raised or None)``.
    """
    hook = f"tao_register_{kind}"
    if impl.hookwrapper or impl.wrapper:
        return (f"{hook} is a hook wrapper; tao calls each plugin's register hook on its own, so a failing "
                f"plugin is isolated, and takes no wrappers: drop wrapper=True/hookwrapper=True and order "
                f"plugins with tryfirst=True/trylast=True; none of its {kind} are registered"), None
    staged = _Staging(kind, impl.plugin_name)
    arguments = {"register": staged.register}
    try:
        result = impl.function(*(arguments[a] for a in impl.argnames),
                               **{k: arguments[k] for k in impl.kwargnames if k in arguments})
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # SystemExit included: a plugin must not end tao
        result = e
    finally:
        staged.open = False
    if staged.error is not None:
        message = staged.error
    elif isinstance(result, BaseException):
        message = f"{hook} raised {type(result).__name__}: {result}"
    elif result is not None:
        message = f"{hook} returned {type(result).__name__} {result!r:.80} instead of calling register(name, obj)"
    else:
        for name, obj, aliases in staged.items:
            reg.add(kind, name, obj, impl.plugin_name, aliases)
        return None
    return f"{message}; none of its {kind} are registered", result if isinstance(result, BaseException) else None


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
        self.load_errors: dict[str, list[str]] = {}  # plugin name -> why it could not be loaded or registered
        self._reserved: dict[str, dict[str, str]] = {k: {} for k in KINDS}
        self._registry: Registry | None = None
        self._lock = threading.RLock()
        if autoload:
            self.load_entrypoints()

    def _load_failed(self, name: str, message: str, details: str = "") -> None:
        self.load_errors.setdefault(name, []).append(message)
        warnings.warn(f"tao plugin {name!r}: {message}" + (f"\n{details}" if details else ""), stacklevel=3)

    def load_entrypoints(self) -> None:
        """Import every allowed ``tao`` entry point; failures are recorded and warned, not raised."""
        allowed = _allowed_names()
        seen: dict[str, str] = {}  # entry-point name -> "distribution (module)" that provided it
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            if allowed is not None and ep.name not in allowed and dist_name not in allowed:
                continue
            source = f"{dist_name or 'an unknown distribution'} ({ep.value})"
            if ep.name in seen:
                self._load_failed(
                    ep.name,
                    f"entry point name declared twice, by {seen[ep.name]} and by {source}; only the first is "
                    f"loaded; uninstall one of them",
                )
                continue
            if self.pm.has_plugin(ep.name):
                continue
            seen[ep.name] = source
            self.versions[ep.name] = dist.version if dist is not None else None
            try:
                obj = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as e:  # SystemExit at import must not end tao either
                self._load_failed(
                    ep.name,
                    f"failed to import {ep.value} ({type(e).__name__}: {e}) and is skipped",
                    traceback.format_exc(),
                )
                continue
            try:
                self.register(obj, name=ep.name, version=self.versions[ep.name])
            except PluginError as e:
                self._load_failed(ep.name, f"{e}; the plugin is skipped")
        if allowed:
            missing = allowed - set(seen) - {self._dist_of(n) for n in seen}
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
            try:
                registered = self.pm.register(plugin, name=name)
            except (ValueError, pluggy.PluginValidationError) as e:
                raise PluginError(f"plugin {name!r} cannot be registered: {e}") from None
            if registered is None:
                raise PluginError(f"plugin {name!r} cannot be registered: it is None or its name is blocked")
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
            self.load_errors.pop(name, None)
            self._registry = None

    def reserve(self, kind: str, names: Iterable[str], owner: str) -> None:
        """Keep ``names`` of ``kind`` for ``owner`` (e.g. the CLI's built-in commands): a plugin's clash is an error."""
        with self._lock:
            wanted = {**self._reserved[kind], **dict.fromkeys(names, owner)}
            if wanted != self._reserved[kind]:
                self._reserved[kind] = wanted
                self._registry = None

    @property
    def registry(self) -> Registry:
        with self._lock:
            if self._registry is None:
                self._registry = self._build_registry()
            return self._registry

    def _build_registry(self) -> Registry:
        reg = Registry(self._reserved)
        tracebacks: dict[str, str] = {}  # problem -> the traceback of the hook that raised
        for kind in KINDS:
            for impl in call_order(getattr(self.pm.hook, f"tao_register_{kind}")):
                problem = _register_from(impl, kind, reg)
                if problem is not None:
                    message, exc = problem
                    reg.record_error(impl.plugin_name, message)
                    if exc is not None:
                        tracebacks[message] = "".join(traceback.format_exception(exc))
        warned: set[str] = set()
        for plugin, problems in reg.errors.items():
            for p in problems:
                if p not in warned:
                    warned.add(p)
                    details = tracebacks.get(p, "")
                    warnings.warn(f"tao plugin {plugin!r}: {p}" + (f"\n{details}" if details else ""), stacklevel=4)
        return reg

    def plugin_infos(self) -> list[PluginInfo]:
        """One :class:`PluginInfo` per loaded or failed plugin, sorted by name."""
        reg = self.registry
        infos: dict[str, PluginInfo] = {}
        for name, plugin in self.pm.list_name_plugin():
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            infos[name] = PluginInfo(name, self.versions.get(name), hooks, {})
        for kind in KINDS:
            for e in reg.plugin_entries(kind):
                infos.setdefault(e.plugin, PluginInfo(e.plugin, self.versions.get(e.plugin)))
                infos[e.plugin].registers.setdefault(kind, []).append(e.name)
        for errors in (self.load_errors, reg.errors):
            for name, problems in errors.items():
                info = infos.setdefault(name, PluginInfo(name, self.versions.get(name)))
                info.error = "\n".join([*([info.error] if info.error else []), *problems])
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
