"""The plugin module named by this package's ``jmp.plugins`` entry point."""

from __future__ import annotations

from collections.abc import Callable

from jumpstarter import hookimpl


@hookimpl
def jmp_register_node_drivers(register: Callable[[str, type], None]) -> None:
    from .node import SerialNodeDriver
    from .qemu import QemuNodeDriver

    register("serial", SerialNodeDriver)
    register("qemu", QemuNodeDriver)


@hookimpl
def jmp_register_power_drivers(register: Callable[[str, type], None]) -> None:
    from .power import CommandPower, HttpPower

    register("command", CommandPower)
    register("http", HttpPower)
