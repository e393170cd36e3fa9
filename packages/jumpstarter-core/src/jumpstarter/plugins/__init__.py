"""What a plugin author implements and imports: the hooks, the node driver and
transport interfaces, and the plugin manager that finds plugins.

Runs on both sides of the wire. Imports nothing of the client, the node or the store
(type hints aside): a plugin's interface must not pull in the machinery behind it.

- :mod:`jumpstarter.plugins.hookspecs` — every hook, grouped by phase;
- :mod:`jumpstarter.plugins.interfaces` — :class:`NodeDriver`, :class:`RunningProcess`,
  :class:`Transport`, :class:`OutputWriter`, :class:`NodeFiles`, :class:`PowerDriver`,
  :class:`NodeConsole`;
- :mod:`jumpstarter.plugins.containment` — :class:`Containment`: every process of a
  task found and killed (cgroup v2, child subreaper), for drivers that run processes;
- :mod:`jumpstarter.plugins.threads` — helpers for drivers that move bytes on threads;
- :mod:`jumpstarter.plugins.manager` — :func:`get_plugin_manager` and the entry-point
  group ``jmp.plugins``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jumpstarter._lazy import lazy_exports

_EXPORTS = {
    "hookimpl": "jumpstarter.plugins.hookspecs",
    "hookspec": "jumpstarter.plugins.hookspecs",
    "NodeDriver": "jumpstarter.plugins.interfaces",
    "RunningProcess": "jumpstarter.plugins.interfaces",
    "ProcessLost": "jumpstarter.plugins.interfaces",
    "OutputWriter": "jumpstarter.plugins.interfaces",
    "Stream": "jumpstarter.plugins.interfaces",
    "Transport": "jumpstarter.plugins.interfaces",
    "ClientContext": "jumpstarter.plugins.interfaces",
    "NodeFiles": "jumpstarter.plugins.interfaces",
    "FileStat": "jumpstarter.plugins.interfaces",
    "Containment": "jumpstarter.plugins.containment",
    "TaskProcesses": "jumpstarter.plugins.containment",
    "ThreadWorker": "jumpstarter.plugins.threads",
    "read_ahead": "jumpstarter.plugins.threads",
    "NodeConsole": "jumpstarter.plugins.interfaces",
    "PowerDriver": "jumpstarter.plugins.interfaces",
    "ENTRY_POINT_GROUP": "jumpstarter.plugins.manager",
    "Plugins": "jumpstarter.plugins.manager",
    "get_plugin_manager": "jumpstarter.plugins.manager",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from jumpstarter.plugins.containment import Containment, TaskProcesses
    from jumpstarter.plugins.hookspecs import hookimpl, hookspec
    from jumpstarter.plugins.interfaces import (
        ClientContext,
        FileStat,
        NodeConsole,
        NodeDriver,
        NodeFiles,
        OutputWriter,
        ProcessLost,
        PowerDriver,
        RunningProcess,
        Stream,
        Transport,
    )
    from jumpstarter.plugins.manager import ENTRY_POINT_GROUP, Plugins, get_plugin_manager
    from jumpstarter.plugins.threads import ThreadWorker, read_ahead
