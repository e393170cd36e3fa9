"""The node's side of power control: one action on the node's power driver.

``jmp power`` (the ``Power`` request) and lease hook steps such as ``"power off"``
both come here, so a board is switched the same way whoever asks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jumpstarter.plugins.interfaces import PowerDriver, PowerStateName

ACTIONS = ("on", "off", "cycle", "status")


async def switch_power(power: PowerDriver, action: str) -> PowerStateName:
    """Do ``action`` (``on``, ``off``, ``cycle`` or ``status``) on ``power``; the
    board's power state after it. Raises
    :class:`~jumpstarter.errors.PowerFailed` when the back end fails."""
    if action == "on":
        await power.on()
    elif action == "off":
        await power.off()
    elif action == "cycle":
        await power.cycle()
    elif action != "status":
        raise ValueError(f"unknown power action {action!r}")
    return await power.status()
