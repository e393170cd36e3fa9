"""Lease hooks: commands a node runs before each lease starts and after each ends.

::

    [nodes.rpi-b]
    before_lease = "./power-cycle.sh && ./wait-for-boot.sh"   # /bin/sh -c, on the node's machine
    after_lease = "./power-off.sh"
    hook_timeout = 300

``before_lease`` runs when a session takes the node, before it gets the lease;
``after_lease`` runs once a lease has ended and its tasks have ended, before anyone
else gets the node. Each sees ``JMP_NODE``, ``JMP_SESSION`` (the session's name) and
``JMP_LEASE_ID``. A hook that fails (a non-zero exit, no such command, past
``hook_timeout``) makes the node ``unhealthy``: it is leased to no one, and ``jmp node
list`` shows the hook's error, until a ``before_lease`` run succeeds (each session that
asks for the node by name tries it again) or an operator clears it (``jmp node clear
NAME``).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import anyio


@dataclass
class LeaseHooks:
    """The hooks of one node (either may be None) and how long each may take."""

    node: str
    before_lease: str | None = None
    after_lease: str | None = None
    timeout: float = 300.0

    async def run(self, which: str, *, session_name: str, lease_id: str) -> str | None:
        """Run the hook ``which`` (``before_lease`` or ``after_lease``); None when it
        succeeded or there is none, else one line saying how it failed."""
        command = getattr(self, which)
        if not command:
            return None
        env = {**os.environ, "JMP_NODE": self.node, "JMP_SESSION": session_name, "JMP_LEASE_ID": lease_id}
        try:
            with anyio.fail_after(self.timeout):
                done = await anyio.run_process(
                    ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, check=False, env=env
                )
        except TimeoutError:
            return f"{which} timed out after {self.timeout:g}s: {command}"
        except OSError as exc:
            return f"{which} could not run: {exc.strerror}: {command}"
        if done.returncode == 0:
            return None
        said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        last = f": {said[-1].strip()}" if said else ""
        return f"{which} failed (exit {done.returncode}){last}"
