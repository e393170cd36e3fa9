"""Every hook a Jumpstarter plugin can implement, grouped by phase.

A plugin is a module (or object) with functions marked ``@hookimpl`` and named after
the specs below, found through the ``jmp.plugins`` entry-point group::

    # pyproject.toml of your package
    [project.entry-points."jmp.plugins"]
    mydriver = "my_package.plugin"

    # my_package/plugin.py
    from jumpstarter import hookimpl

    @hookimpl
    def jmp_register_node_drivers(register):
        register("mydriver", MyDriver)

Registration hooks hand the plugin a ``register`` function, so the core can check
names at once. Notification hooks return nothing; an exception in one is a bug in
that plugin and propagates. ``jmp drivers`` shows what each installed plugin
registers; docs/writing-a-node-driver.md and docs/writing-a-transport.md walk through
a whole plugin package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click
    from jumpstarter_protocol import Result, TaskInfo

    from jumpstarter.client.session import AsyncNode, AsyncSession
    from jumpstarter.plugins.interfaces import NodeDriver, PowerDriver, Transport

hookspec = pluggy.HookspecMarker("jmp")
hookimpl = pluggy.HookimplMarker("jmp")


# --- connect: how nodes are reached --------------------------------------------------


@hookspec
def jmp_register_transports(register: Callable[[str, type[Transport]], None]) -> None:
    """Register transports: call ``register(name, TransportClass)`` once per
    transport. Called once, the first time the core needs the list of transports
    (and by ``jmp drivers``, one plugin at a time). A node's ``transport = "name"`` in
    the config picks one. Returns nothing; ``register`` raises
    :class:`~jumpstarter.errors.PluginError` for a name another plugin took."""


@hookspec
def jmp_session_connected(session: AsyncSession, node: AsyncNode) -> None:
    """Called in the client after ``session`` has connected to ``node`` (handshake
    done, lease held). Returns nothing."""


@hookspec
def jmp_session_disconnected(session: AsyncSession, node: AsyncNode) -> None:
    """Called in the client when ``session`` lets go of ``node`` (release or close),
    before the connection is closed. Returns nothing."""


# --- task: how work runs ---------------------------------------------------------------


@hookspec
def jmp_register_node_drivers(register: Callable[[str, type[NodeDriver]], None]) -> None:
    """Register node drivers: call ``register(name, DriverClass)`` once per driver.
    Called once, the first time the core needs the list of drivers (and by ``jmp
    drivers``, one plugin at a time). A node's ``driver = "name"`` in the config picks
    one. Returns nothing; ``register`` raises :class:`~jumpstarter.errors.PluginError`
    for a name another plugin took."""


@hookspec
def jmp_register_power_drivers(register: Callable[[str, type[PowerDriver]], None]) -> None:
    """Register power drivers: call ``register(name, PowerDriverClass)`` once per
    back end. Called once, the first time a node server needs one (and by ``jmp
    drivers``, one plugin at a time). A node's ``power = {driver = "name", …}`` in
    the config picks one; the rest of that table is the class's ``options``.
    Returns nothing; ``register`` raises :class:`~jumpstarter.errors.PluginError`
    for a name another plugin took."""


@hookspec
def jmp_task_created(task: TaskInfo) -> None:
    """Called on the node after a task was created (state ``pending``). Returns
    nothing."""


@hookspec
def jmp_task_started(task: TaskInfo) -> None:
    """Called on the node after a task's process started (state ``running``).
    Returns nothing."""


@hookspec
def jmp_task_finished(task: TaskInfo) -> None:
    """Called on the node after a task reached its final state and all its output
    was stored. Returns nothing."""


# --- result: what came of it -------------------------------------------------------------


@hookspec
def jmp_result_added(task: TaskInfo, results: list[Result]) -> None:
    """Called on the node after a batch of results was committed for ``task``.
    Returns nothing."""


@hookspec
def jmp_results_exported(results: list[Result], format: str) -> None:
    """Called in the client after ``jmp result query`` wrote ``results`` in
    ``format`` (``table``, ``json``, ``csv``, ``junit``…). Returns nothing."""


# --- cli ------------------------------------------------------------------------------------


@hookspec
def jmp_register_commands(cli: click.Group) -> None:
    """Add subcommands to ``jmp``: call ``cli.add_command(command)``. Called at most
    once per ``jmp`` run: when a command that is not built in is asked for, or when
    ``jmp --help`` lists them (and by ``jmp drivers``, on a scratch group, to list
    what each plugin adds). Import your commands inside the hook, so ``jmp --help``
    stays fast. Returns nothing."""
