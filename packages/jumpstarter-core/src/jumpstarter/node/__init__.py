"""The node side: what serves one node to its clients.

Runs where the node is (``jmp node serve``, a detached task's agent, or in the
client's process for the local node). It uses the store and the plugin interfaces and
never imports the client or the CLI.

- :mod:`jumpstarter.node.server` — :class:`NodeServer`, which ties the rest together;
- :mod:`jumpstarter.node.dispatch` — :class:`NodeConnection`: one client's requests;
- :mod:`jumpstarter.node.leases` — who holds the node, and the queue;
- :mod:`jumpstarter.node.tasks` — starting, supervising, stopping and following tasks;
- :mod:`jumpstarter.node.output` — the output log of a task;
- :mod:`jumpstarter.node.agent` — the process that keeps a detached task alive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jumpstarter._lazy import lazy_exports

_EXPORTS = {
    "NodeServer": "jumpstarter.node.server",
    "NodeConnection": "jumpstarter.node.dispatch",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from jumpstarter.node.dispatch import NodeConnection
    from jumpstarter.node.server import NodeServer
