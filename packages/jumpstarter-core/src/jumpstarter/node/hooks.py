"""Lease hooks: what a node does before each lease starts and after each ends.

::

    [nodes.rpi-b]
    before_lease = "./power-cycle.sh && ./wait-for-boot.sh"   # /bin/sh -c, on the node's machine
    after_lease = "./power-off.sh"
    hook_timeout = 300

    [nodes.rpi4]
    power = { driver = "command", on = ["uhubctl", "-a", "on", "-p", "2"], off = ["uhubctl", "-a", "off", "-p", "2"] }
    before_lease = ["power cycle", "./wait-for-boot.sh"]   # a list of steps, in order
    after_lease = ["power off"]

A hook is a shell command (a string), or a list of steps run one after the other until
one fails. A step ``"power on"``, ``"power off"`` or ``"power cycle"`` switches the
node's board through its power driver, in the node's own process (the same code as
``jmp power``); any other step is a shell command. A node whose hooks have power steps
needs power control (a ``power`` table, or a driver that brings its own, such as
``qemu``): without it the node server refuses to start, saying so.

``before_lease`` runs when a session takes the node, before it gets the lease;
``after_lease`` runs once a lease has ended and its tasks have ended, before anyone
else gets the node. Shell steps see ``JMP_NODE``, ``JMP_SESSION`` (the session's name)
and ``JMP_LEASE_ID``. A hook that fails (a step's non-zero exit, no such command, a
power action that failed, past ``hook_timeout`` for the whole hook) makes the node
``unhealthy``: it is leased to no one, and ``jmp node list`` shows the hook's error,
until a ``before_lease`` run succeeds (each session that asks for the node by name
tries it again) or an operator clears it (``jmp node clear NAME``).
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from jumpstarter.config import power_step
from jumpstarter.errors import ConfigError, PowerFailed
from jumpstarter.node.power import switch_power

if TYPE_CHECKING:
    from jumpstarter.plugins.interfaces import PowerDriver

log = logging.getLogger(__name__)


def hook_steps(hook: str | list[str] | None) -> list[str]:
    """The steps of a hook: a string is one shell command, a list is steps."""
    if not hook:
        return []
    return [hook] if isinstance(hook, str) else list(hook)


@dataclass
class LeaseHooks:
    """The hooks of one node (either may be None), how long each may take, and the
    node's power driver (for power steps)."""

    node: str
    before_lease: str | list[str] | None = None
    after_lease: str | list[str] | None = None
    timeout: float = 300.0
    power: PowerDriver | None = None

    def __post_init__(self) -> None:
        if self.power is not None:
            return
        for which in ("before_lease", "after_lease"):
            for step in hook_steps(getattr(self, which)):
                if power_step(step):
                    raise ConfigError(
                        f"node {self.node!r}: {which}: {step!r} needs power control; give the node one in "
                        'the config: power = {driver = "command", on = [...], off = [...]}'
                    )

    async def run(self, which: str, *, session_name: str, lease_id: str) -> str | None:
        """Run the hook ``which`` (``before_lease`` or ``after_lease``), step by step;
        None when it succeeded or there is none, else one line saying how it failed."""
        env = {**os.environ, "JMP_NODE": self.node, "JMP_SESSION": session_name, "JMP_LEASE_ID": lease_id}
        step = ""
        try:
            with anyio.fail_after(self.timeout):
                for step in hook_steps(getattr(self, which)):
                    action = power_step(step)
                    error = await (self._power(which, action) if action else self._shell(which, step, env))
                    if error is not None:
                        return error
        except TimeoutError:
            return f"{which} timed out after {self.timeout:g}s: {step}"
        return None

    async def _power(self, which: str, action: str) -> str | None:
        assert self.power is not None  # __post_init__ made sure
        try:
            await switch_power(self.power, action)
        except PowerFailed as exc:
            return f"{which} failed: {exc}"
        except Exception as exc:  # a power plugin's bug must still leave the node unhealthy, saying so
            log.exception("power %s of node %s failed", action, self.node)
            return f"{which} failed: power {action}: {exc or type(exc).__name__}"
        return None

    async def _shell(self, which: str, command: str, env: dict[str, str]) -> str | None:
        try:
            done = await anyio.run_process(
                ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, check=False, env=env
            )
        except OSError as exc:
            return f"{which} could not run: {exc.strerror}: {command}"
        if done.returncode == 0:
            return None
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        last = f": {said[-1].strip()}" if said else ""
        return f"{which} failed (exit {done.returncode}){last}"
