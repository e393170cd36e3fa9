"""The node server: one node's driver, store, leases and tasks, served to clients.

Every transport serves this same object: it opens one
:class:`~jumpstarter.node.dispatch.NodeConnection` per client connection
(:meth:`NodeServer.connect`). The work is split by concern: who holds the node
(:class:`~jumpstarter.node.leases.Leases`), what runs on it
(:class:`~jumpstarter.node.tasks.Tasks`), and what each request asks
(:mod:`jumpstarter.node.dispatch`).
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus as StartedStatus  # not the protocol's TaskStatus
from jumpstarter_protocol import MAX_MESSAGE_SIZE, NodeInfo

from jumpstarter._version import __version__
from jumpstarter.config import NodeConfig
from jumpstarter.node.dispatch import NodeConnection
from jumpstarter.node.files import DEFAULT_MAX_TRANSFER, Files
from jumpstarter.node.hooks import LeaseHooks
from jumpstarter.node.leases import Leases
from jumpstarter.node.tasks import OUTPUT_CHUNK, Detacher, Tasks
from jumpstarter.plugins.interfaces import NodeDriver
from jumpstarter.store.base import Store

if TYPE_CHECKING:
    from jumpstarter.config import Config
    from jumpstarter.plugins.manager import Plugins

log = logging.getLogger(__name__)


class NodeServer:
    """Serves one node: its driver, its store, its leases and its running tasks.

    Run it with ``await task_group.start(server.run)``; :meth:`close` stops it,
    stopping the tasks it still runs. ``detach`` starts detached tasks under agents
    of their own (for a node served inside a client's process).
    """

    def __init__(
        self,
        node: NodeConfig,
        driver: NodeDriver,
        store: Store,
        hook: Any,
        *,
        data_dir: Path,
        driver_name: str | None = None,
        token: str | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        detach: Detacher | None = None,
    ) -> None:
        self.node = node
        self.driver = driver
        self.store = store
        self.hook = hook
        self.data_dir = data_dir
        self.token = token
        self.max_message_size = max_message_size
        capabilities = list(driver.capabilities)
        limits = {"max_message_size": max_message_size, "output_chunk": OUTPUT_CHUNK}
        # --- files
        max_transfer = node.max_transfer or DEFAULT_MAX_TRANSFER
        root = str(node.files_root.expanduser().absolute()) if node.files_root else None
        self.files = Files(node.name, driver.files, store, root=root, max_transfer=max_transfer)
        if driver.files is not None:
            capabilities += [] if "files" in capabilities else ["files"]
            limits["max_transfer"] = max_transfer
        elif "files" in capabilities:
            capabilities.remove("files")  # announced, but the driver gives no NodeFiles
        self.info = NodeInfo(
            name=node.name,
            labels=node.labels,
            driver=driver_name or node.driver,
            capabilities=capabilities,
            limits=limits,
            jumpstarter_version=__version__,
            start_timeout=driver.start_timeout,
            lease_timeout=node.hook_timeout if node.before_lease else 0.0,
        )
        self.agent = f"{socket.gethostname()}:{os.getpid()}"
        self.leases = Leases(node.name, holder=self.agent)
        self.tasks = Tasks(
            node,
            driver,
            store,
            hook,
            data_dir=data_dir,
            agent=self.agent,
            detach=detach,
            on_session_deleted=self._session_deleted,
            on_task_finished=self.leases.task_ended,
        )
        if node.before_lease or node.after_lease:
            # Raises ConfigError for a power step on a node without power control, so
            # the node refuses to start rather than fail its first lease.
            self.leases.hooks = LeaseHooks(
                node.name, node.before_lease, node.after_lease, node.hook_timeout, power=driver.power
            )
        self.leases.sessions_running = self.tasks.sessions_running
        self.leases.stop_session = self.tasks.stop_session
        self.url: str | None = None
        """Where a task on this machine reaches this server (``jmp node serve`` sets it)."""
        self.transport: str | None = None
        self._task_tokens: dict[str, str] = {}  # token -> task id
        self._closed = anyio.Event()
        self._connections: weakref.WeakSet[NodeConnection] = weakref.WeakSet()

    @property
    def registry(self) -> Any:
        """The :class:`~jumpstarter.store.registry.NodeRegistry` of a shared store
        (``jmp node serve --store postgresql://…``), or None."""
        return self.leases.registry

    @registry.setter
    def registry(self, registry: Any) -> None:
        self.leases.registry = registry

    async def run(self, *, task_status: StartedStatus[NodeServer] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open the store, mark tasks a dead agent left running as ``lost``, serve
        until :meth:`close`, then stop what still runs."""
        await self.store.open()
        try:
            await self.tasks.mark_lost()
            async with anyio.create_task_group() as tg:
                self.tasks.serve_in(tg)
                self.leases.serve_in(tg)
                tg.start_soon(self._serve_driver)
                task_status.started(self)
                await self._closed.wait()
                with anyio.CancelScope(shield=True):
                    await self.tasks.shut_down()
                    self.leases.release_all()  # a lease still held ends with the server
                    await self.leases.settle()  # after_lease hooks due run to their end
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.driver.aclose()
                await self.store.aclose()

    def close(self) -> None:
        self._closed.set()

    def task_env(self, task: Any, session_name: str) -> dict[str, str]:
        """The environment that tells ``task`` where it runs (see
        :mod:`jumpstarter.enclosing`), with a token of its own when this server is
        reachable from the task."""
        from jumpstarter.enclosing import EnclosingTask

        token = None
        if self.url is not None:
            token = secrets.token_urlsafe(24)
            self._task_tokens[token] = task.id
        return EnclosingTask(
            node=self.node.name,
            session=session_name,
            session_id=task.session_id or "",
            task_id=task.id,
            url=self.url,
            transport=self.transport if self.url else None,
            token=token,
        ).env()

    def task_of_token(self, token: str | None) -> str | None:
        """The task whose own token ``token`` is, or None."""
        if not token:
            return None
        for known, task_id in self._task_tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return task_id
        return None
    async def _serve_driver(self) -> None:
        state_dir = self.data_dir / "nodes" / self.node.name
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self.driver.serve(state_dir)
        except Exception:  # a broken driver must not take the node down
            log.exception("node driver of %s failed while serving", self.node.name)

    def connect(self) -> NodeConnection:
        """A new client connection."""
        connection = NodeConnection(self)
        self._connections.add(connection)
        return connection

    def _session_deleted(self, session_id: str) -> None:
        # Connections of that session record it again with their next task.
        for connection in list(self._connections):
            if connection.session_id == session_id:
                connection.forget_session_record()

    async def keep_registered(self, *, endpoint: str, transport: str, interval: float) -> None:
        """Register this node in the shared registry, then send a heartbeat (and keep
        the current lease alive) every ``interval`` seconds until cancelled; the node
        goes offline at once when this ends."""
        registry = self.registry
        await registry.register(
            self.node.name,
            labels=self.node.labels,
            endpoint=endpoint,
            transport=transport,
            driver=self.info.driver,
            agent=self.agent,
        )
        try:
            while True:
                await anyio.sleep(interval)
                await registry.heartbeat(self.node.name)
                # Every agent also ends what ran out, so a node that died is marked
                # offline (its tasks lost) within the timeout even when no one looks.
                await registry.sweep()
                await self.leases.keep_alive_in_registry()
                # Tasks of a lease that ran out (or was released with --stop), which
                # may have ended elsewhere (a client's or another agent's sweep).
                for session_id, why in await registry.tasks_to_stop(self.node.name):
                    self.tasks.stop_session(session_id, why)
        finally:
            with anyio.CancelScope(shield=True):
                await registry.go_offline(self.node.name)


def build_node_server(
    config: Config,
    plugins: Plugins,
    node: NodeConfig,
    *,
    token: str | None = None,
    detach: Detacher | None = None,
) -> NodeServer:
    """A node server for ``node`` with its configured driver and ``config``'s store
    (not yet running: ``await task_group.start(server.run)``)."""
    from jumpstarter.store.base import open_store

    driver_cls = plugins.node_driver(node.driver)
    driver = driver_cls(node)
    if node.power is not None:
        options = {k: v for k, v in node.power.items() if k != "driver"}
        driver.power = plugins.power_driver(node.power["driver"])(options)
    return NodeServer(
        node,
        driver,
        open_store(config.store_url),
        plugins.hook,
        data_dir=config.data_path,
        driver_name=node.driver,
        token=token,
        detach=detach,
    )
