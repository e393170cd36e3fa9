"""Where a task runs, as its node tells it: the environment every task gets.

A node server starts each task with::

    JMP_NODE            the node's name (its real one, as the store records it)
    JMP_SESSION         the name of the session that started the task
    JMP_SESSION_ID      that session's id
    JMP_TASK_ID         the task's id
    JMP_NODE_URL        how to reach the node from the task (a node served by
    JMP_NODE_TRANSPORT  ``jmp node serve``; absent for a node served in the client's
    JMP_TASK_TOKEN      process), the transport for it, and a token that lets the
                        task record results of its own task, and nothing else

so that ``pytest --jmp-session S`` and ``jmp result add`` run inside the task record
into the enclosing session and task, through the node that runs it, in the node's
store of record (:meth:`jumpstarter.protocol.JumpStarterProtocol.resolve_node`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EnclosingTask:
    """The task this process runs in, and how to reach its node."""

    node: str
    session: str
    session_id: str
    task_id: str
    url: str | None = None
    transport: str | None = None
    token: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EnclosingTask | None:
        """The enclosing task named by ``env`` (default: this process's), or None."""
        env = os.environ if env is None else env
        if not (env.get("JMP_TASK_ID") and env.get("JMP_NODE")):
            return None
        return cls(
            node=env["JMP_NODE"],
            session=env.get("JMP_SESSION", ""),
            session_id=env.get("JMP_SESSION_ID", ""),
            task_id=env["JMP_TASK_ID"],
            url=env.get("JMP_NODE_URL") or None,
            transport=env.get("JMP_NODE_TRANSPORT") or None,
            token=env.get("JMP_TASK_TOKEN") or None,
        )

    def env(self) -> dict[str, str]:
        """The variables a task is started with."""
        values = {
            "JMP_NODE": self.node,
            "JMP_SESSION": self.session,
            "JMP_SESSION_ID": self.session_id,
            "JMP_TASK_ID": self.task_id,
            "JMP_NODE_URL": self.url,
            "JMP_NODE_TRANSPORT": self.transport,
            "JMP_TASK_TOKEN": self.token,
        }
        return {k: v for k, v in values.items() if v is not None}
