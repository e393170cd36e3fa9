"""The entry point of the Python API: :class:`JumpStarterProtocol`."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jumpstarter.config import Config, NodeConfig, load_config
from jumpstarter.errors import ConfigError
from jumpstarter.plugins.manager import Plugins, get_plugin_manager

if TYPE_CHECKING:
    from jumpstarter.client.session import AsyncSession
    from jumpstarter.client.sync import Session
    from jumpstarter.node.server import NodeServer


class JumpStarterProtocol:
    """Holds the configuration and the plugins, and opens sessions.

    ``config`` is looked up as :func:`jumpstarter.config.load_config` describes unless
    given; ``plugins`` are loaded from the ``jmp.plugins`` entry points unless given.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        config_path: str | os.PathLike[str] | None = None,
        plugins: Plugins | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config if config is not None else load_config(config_path, env)
        self._plugins = plugins
        self._env = env
        from jumpstarter.enclosing import EnclosingTask

        self.enclosing = EnclosingTask.from_env(env)
        """The task this process runs in (from ``JMP_TASK_ID`` and the rest), or None."""

    @property
    def plugins(self) -> Plugins:
        if self._plugins is None:
            self._plugins = get_plugin_manager(self._env)
        return self._plugins

    def create_session(self, name: str = "default") -> Session:
        """A session for use in ``with``; its methods block."""
        from jumpstarter.client.sync import Session

        return Session(self.create_async_session(name))

    def create_async_session(self, name: str = "default") -> AsyncSession:
        """A session for use in ``async with`` (anyio: asyncio or trio)."""
        from jumpstarter.client.session import AsyncSession

        return AsyncSession(self, name)

    async def lease_by_labels(
        self, session: AsyncSession, selector: dict[str, str], *, duration: float | None, wait: float | None
    ) -> tuple[NodeConfig, Callable[[], Awaitable[None]]]:
        """Lease a node with the labels ``selector`` from the shared registry for
        ``session``: how to reach that node, and how to end the lease (see
        :func:`jumpstarter.store.registry.lease_for_session`)."""
        from jumpstarter.store.registry import lease_for_session

        return await lease_for_session(session, selector, duration=duration, wait=wait)

    async def resolve_node(self, name: str | None = None) -> NodeConfig:
        """How to reach the node ``name`` (default: ``default_node``), wherever it is
        described: a config entry of its own (``[nodes.NAME]`` with a transport,
        endpoint or driver, or ``local``), else the shared registry, with credentials
        from ``[registry]`` overridden by a ``[nodes.NAME]`` entry that holds only
        those. Raises :class:`~jumpstarter.config.UnknownNode` for a name nothing
        describes, :class:`ConfigError` naming the file and key for an entry the
        registry cannot complete, :class:`~jumpstarter.errors.NodeOffline` for a
        registered node that is offline. Never takes such an entry for a local node."""
        config = self.config
        name = name or config.default_node
        enclosing = self.enclosing
        if enclosing is not None and enclosing.url and name == enclosing.node:
            # Inside a task of that node: reached the way the node told the task.
            return NodeConfig(name=name, transport=enclosing.transport or "grpc", endpoint=enclosing.url)
        entry = config.nodes.get(name)
        if entry is not None and config.is_complete(entry):
            return entry
        if entry is None and name == "local":
            return config.node(name)
        record = await self._registered(name)
        if record is None:
            if entry is None:
                config.node(name)  # UnknownNode, saying where it looked
            where = config.source or "config"
            why = (
                f"and no node {name!r} is registered in the shared store"
                if config.shared_store
                else "and the store is not a shared postgresql:// store whose registry could say where it is"
            )
            raise ConfigError(f"{where}: nodes.{name}: no transport, endpoint or driver of its own, {why}")
        if not record.online:
            from jumpstarter.errors import NodeOffline

            raise NodeOffline(name, record.last_seen or None)
        return config.registered_node(
            name, transport=record.transport, endpoint=record.endpoint, driver=record.driver, labels=record.labels
        )

    async def _registered(self, name: str) -> Any:
        """The registry's record of node ``name`` (a
        :class:`~jumpstarter.store.registry.NodeRecord`), or None (no shared store,
        or not registered there)."""
        if not self.config.shared_store:
            return None
        from jumpstarter.errors import NotFound
        from jumpstarter.store.base import open_store
        from jumpstarter.store.registry import NodeRegistry

        store = open_store(self.config.store_url)
        await store.open()
        try:
            return await NodeRegistry(store).node(name)
        except NotFound:
            return None
        finally:
            await store.aclose()

    def token_for(self, node: NodeConfig) -> str | None:
        """The token to present to ``node``, read from its ``token_file`` (inside a
        task of that node, the task's own token)."""
        enclosing = self.enclosing
        if enclosing is not None and enclosing.url and node.endpoint == enclosing.url and node.token_file is None:
            return enclosing.token
        if node.token_file is None:
            return None
        try:
            return Path(node.token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"node {node.name!r}: cannot read token_file {node.token_file}: {exc.strerror}"
            ) from None

    def make_node_server(
        self, node: NodeConfig, *, token: str | None = None, in_client_process: bool = False
    ) -> NodeServer:
        """A node server for ``node`` with its configured driver and this config's
        store (not yet running: ``await task_group.start(server.run)``).

        ``in_client_process``: the server runs inside the client's process (the local
        transport), so a detached task runs under an agent process of its own
        (:mod:`jumpstarter.node.agent`) and outlives the client."""
        from functools import partial

        from jumpstarter.node.agent import start_detached
        from jumpstarter.node.server import build_node_server

        detach = partial(start_detached, self.config) if in_client_process else None
        return build_node_server(self.config, self.plugins, node, token=token, detach=detach)
