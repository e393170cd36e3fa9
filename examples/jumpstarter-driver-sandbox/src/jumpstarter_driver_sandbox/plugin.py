"""The plugin module named by this package's ``jmp.plugins`` entry point.

It imports nothing heavy: the driver and the command are imported when a hook is
called, so ``jmp --help`` stays fast with this package installed."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from jumpstarter import hookimpl

if TYPE_CHECKING:
    import click


@hookimpl
def jmp_register_node_drivers(register: Callable[[str, type], None]) -> None:
    from .node import SandboxNodeDriver

    register("sandbox", SandboxNodeDriver)


@hookimpl
def jmp_register_commands(cli: click.Group) -> None:
    from .cli import sandbox

    cli.add_command(sandbox)
