"""Finding and loading plugins.

:func:`get_plugin_manager` builds the pluggy manager: add the hook specs, honour the
environment switches, load the ``jmp.plugins`` entry points, then check every hook
implementation against its spec. Nothing is loaded at import time.

Environment switches:

``JMP_PLUGINS=a,b``
    load only these entry points (by entry-point name); ``JMP_PLUGINS=`` loads none.
``JMP_DISABLE_PLUGINS=a,b``
    load every entry point but these.
``JMP_TRACE_PLUGINS=1``
    print each hook call and its result to stderr.

A plugin that fails to import is recorded in :attr:`Plugins.failed` with the reason,
and everything else goes on working. A name in either switch that no installed entry
point has (a typo) is recorded in :attr:`Plugins.warnings`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from jumpstarter.plugins import hookspecs

# PluginError is imported where it is raised: jumpstarter.errors pulls in the protocol
# and pydantic, which ``jmp --help`` (it loads plugins for their commands) never needs.

ENTRY_POINT_GROUP = "jmp.plugins"


@dataclass
class PluginInfo:
    """One entry point and what became of it."""

    name: str
    value: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None


@dataclass
class Registration:
    name: str
    target: type
    plugin: str


@dataclass
class Plugins:
    """The plugin manager plus what the plugins registered."""

    manager: pluggy.PluginManager
    entry_points: list[PluginInfo] = field(default_factory=list)
    only: frozenset[str] | None = None
    """The names ``JMP_PLUGINS`` allows; ``None`` when it is not set."""
    disabled: frozenset[str] = frozenset()
    """The installed entry points ``JMP_DISABLE_PLUGINS`` kept from loading."""
    warnings: list[str] = field(default_factory=list)
    """One line per name in ``JMP_PLUGINS`` or ``JMP_DISABLE_PLUGINS`` that no
    installed entry point has, e.g. ``JMP_PLUGINS names no installed plugin 'nosuch'
    (installed: grpc, local)``; the CLI prints them as warnings."""

    @property
    def hook(self) -> Any:
        return self.manager.hook

    @property
    def failed(self) -> list[PluginInfo]:
        return [info for info in self.entry_points if info.error]

    @cached_property
    def transports(self) -> dict[str, Registration]:
        return self._collect(self.hook.jmp_register_transports, "transport")

    @cached_property
    def node_drivers(self) -> dict[str, Registration]:
        return self._collect(self.hook.jmp_register_node_drivers, "node driver")

    @cached_property
    def power_drivers(self) -> dict[str, Registration]:
        return self._collect(self.hook.jmp_register_power_drivers, "power driver")

    def power_driver(self, name: str) -> type:
        """The power driver class registered as ``name``; :class:`PluginError` if none."""
        return self._lookup(self.power_drivers, name, "power driver")

    def transport(self, name: str) -> type:
        """The transport class registered as ``name``; :class:`PluginError` if none."""
        return self._lookup(self.transports, name, "transport")

    def node_driver(self, name: str) -> type:
        """The node driver class registered as ``name``; :class:`PluginError` if none."""
        return self._lookup(self.node_drivers, name, "node driver")

    def _collect(self, hook: Any, kind: str) -> dict[str, Registration]:
        found: dict[str, Registration] = {}
        everyone = [impl.plugin for impl in hook.get_hookimpls()]
        for impl in hook.get_hookimpls():
            plugin = self.manager.get_name(impl.plugin) or repr(impl.plugin)
            # One plugin at a time, so each registration is credited to its plugin;
            # through pluggy's caller, so JMP_TRACE_PLUGINS sees the call.
            only_this = self.manager.subset_hook_caller(
                hook.name, remove_plugins=[p for p in everyone if p is not impl.plugin]
            )

            def register(name: str, target: type, *, _plugin: str = plugin) -> None:
                from jumpstarter.errors import PluginError

                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_plugin!r} registered a {kind} without a name")
                if name in found:
                    raise PluginError(
                        f"{kind} {name!r} is registered twice: by plugin "
                        f"{found[name].plugin!r} and by plugin {_plugin!r}"
                    )
                found[name] = Registration(name, target, _plugin)

            only_this(register=register)
        return found

    def _lookup(self, registry: Mapping[str, Registration], name: str, kind: str) -> type:
        if name in registry:
            return registry[name].target
        known = ", ".join(sorted(registry)) or "none"
        message = f"unknown {kind} {name!r}; installed: {known}"
        failed = [info for info in self.failed if info.name == name]
        if failed:
            message += f" (plugin {name!r} failed to load: {failed[0].error})"
        message += self._switch_hint()
        from jumpstarter.errors import PluginError

        raise PluginError(message)

    def _switch_hint(self) -> str:
        """Why fewer plugins loaded than are installed, when a switch is the reason."""
        if self.only is not None:
            if not self.only:
                return " (JMP_PLUGINS is set but empty: no plugin may load)"
            return f" (JMP_PLUGINS is set: only {_quoted(self.only)} may load)"
        if self.disabled:
            return f" (JMP_DISABLE_PLUGINS is set: {_quoted(self.disabled)} may not load)"
        return ""


def get_plugin_manager(
    env: Mapping[str, str] | None = None,
    extra: list[object] | None = None,
    trace: Callable[[str], None] | None = None,
) -> Plugins:
    """Build the plugin manager: specs, switches, entry points, then ``extra``
    (plugin objects registered by the caller, as tests do), then the check."""
    env = os.environ if env is None else env
    manager = pluggy.PluginManager("jmp")
    manager.add_hookspecs(hookspecs)
    only = _names(env.get("JMP_PLUGINS"))
    blocked = _names(env.get("JMP_DISABLE_PLUGINS")) or set()
    for name in blocked:
        manager.set_blocked(name)
    infos = []
    installed = entry_points(group=ENTRY_POINT_GROUP)
    for ep in installed:
        if (only is not None and ep.name not in only) or ep.name in blocked:
            continue
        infos.append(_load(manager, ep))
    for plugin in extra or ():
        manager.register(plugin)
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        from jumpstarter.errors import PluginError

        raise PluginError(f"plugin {exc.plugin_name!r} is invalid: {exc}") from None
    if env.get("JMP_TRACE_PLUGINS"):
        _trace(manager, trace or (lambda line: print(line, file=sys.stderr)))
    names = {ep.name for ep in installed}
    # A typo in a switch would otherwise pass in silence, and the user would only
    # see "unknown transport 'local'" later.
    known = ", ".join(sorted(names)) or "none"
    warnings = [
        f"{switch} names no installed plugin {name!r} (installed: {known})"
        for switch, given in (("JMP_PLUGINS", only or set()), ("JMP_DISABLE_PLUGINS", blocked))
        for name in sorted(given - names)
    ]
    return Plugins(
        manager,
        infos,
        only=None if only is None else frozenset(only),
        disabled=frozenset(blocked & names),
        warnings=warnings,
    )


def _quoted(names: frozenset[str]) -> str:
    return ", ".join(repr(name) for name in sorted(names))


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _load(manager: pluggy.PluginManager, ep: EntryPoint) -> PluginInfo:
    dist = ep.dist
    info = PluginInfo(ep.name, ep.value, dist.name if dist else None, dist.version if dist else None)
    if manager.get_plugin(ep.name) is not None or manager.is_blocked(ep.name):
        return info
    try:
        plugin = ep.load()
        manager.register(plugin, name=ep.name)
    except Exception as exc:  # any failure in a plugin's import is that plugin's
        info.error = f"{type(exc).__name__}: {exc}"
    return info


def _trace(manager: pluggy.PluginManager, write: Callable[[str], None]) -> None:
    def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
        names = ", ".join(manager.get_name(impl.plugin) or "?" for impl in impls)
        write(f"jmp: hook {hook_name}({', '.join(kwargs)}) -> [{names}]")

    def after(outcome: Any, hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
        exc = outcome.exception
        write(f"jmp: hook {hook_name} done" + (f": raised {exc!r}" if exc else ""))

    manager.add_hookcall_monitoring(before, after)
