"""Boards on a serial console for Jumpstarter.

- :class:`SerialNodeDriver` (``driver = "serial"``): runs each task on a board's
  shell over its console, framed by markers that carry the exit code;
- :class:`QemuNodeDriver` (``driver = "qemu"``): the same over a QEMU VM's serial
  console, the VM being the board's power;
- consoles (:mod:`.console`): where the bytes come from, a UART or any pyserial URL,
  or a QEMU VM's socket;
- power back ends (:mod:`.power`): ``command`` and ``http``; ``qemu`` with the VM.

Names are imported on first use: ``jmp --help`` loads the plugin module, and must not
pay for pydantic and pyserial. See docs/driver-serial.md.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Console": ".console",
    "PortConsole": ".console",
    "UnixConsole": ".console",
    "SerialNodeDriver": ".node",
    "CommandPower": ".power",
    "HttpPower": ".power",
    "QemuNodeDriver": ".qemu",
    "QemuPower": ".qemu",
    "QemuVM": ".qemu",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jumpstarter_driver_serial' has no attribute {name!r}")
    return getattr(import_module(module, __name__), name)
