"""The client side: sessions, node and task handles, and the blocking facade.

Runs in the user's process (``jmp``, a CI script, a pytest run). It reaches nodes only
through a :class:`~jumpstarter.plugins.Transport` and imports nothing of the node
server or the store: whatever a node does, it does behind the protocol.

- :mod:`jumpstarter.client.session` — the async API (the real one);
- :mod:`jumpstarter.client.sync` — the blocking API, a thin facade over it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jumpstarter._lazy import lazy_exports

_EXPORTS = {
    "AsyncSession": "jumpstarter.client.session",
    "AsyncNode": "jumpstarter.client.session",
    "AsyncTask": "jumpstarter.client.session",
    "Session": "jumpstarter.client.sync",
    "Node": "jumpstarter.client.sync",
    "Task": "jumpstarter.client.sync",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from jumpstarter.client.session import AsyncNode, AsyncSession, AsyncTask
    from jumpstarter.client.sync import Node, Session, Task
