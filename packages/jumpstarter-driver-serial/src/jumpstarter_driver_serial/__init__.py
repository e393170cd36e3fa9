"""Boards on a serial console for Jumpstarter.

- :class:`SerialNodeDriver` (``driver = "serial"``): runs each task on a board's
  shell over its console, framed by markers that carry the exit code;
- :class:`QemuNodeDriver` (``driver = "qemu"``): the same over a QEMU VM's serial
  console, the VM being the board's power;
- consoles (:mod:`.console`): where the bytes come from, a UART or any pyserial URL,
  or a QEMU VM's socket;
- power back ends (:mod:`.power`): ``command`` and ``http``; ``qemu`` with the VM.

See docs/driver-serial.md.
"""

from .console import Console, PortConsole, UnixConsole
from .node import SerialNodeDriver
from .power import CommandPower, HttpPower
from .qemu import QemuNodeDriver, QemuPower, QemuVM

__all__ = [
    "Console",
    "PortConsole",
    "UnixConsole",
    "SerialNodeDriver",
    "QemuNodeDriver",
    "QemuPower",
    "QemuVM",
    "CommandPower",
    "HttpPower",
]
