"""The entry point of the Python API: :class:`JumpStarterProtocol`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, NodeConfig, load_config
from .errors import ConfigError
from .plugins import Plugins, get_plugin_manager

if TYPE_CHECKING:
    from .client import AsyncSession
    from .server import NodeServer
    from .sync import Session


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

    @property
    def plugins(self) -> Plugins:
        if self._plugins is None:
            self._plugins = get_plugin_manager(self._env)
        return self._plugins

    def create_session(self, name: str = "default") -> Session:
        """A session for use in ``with``; its methods block."""
        from .sync import Session

        return Session(self.create_async_session(name))

    def create_async_session(self, name: str = "default") -> AsyncSession:
        """A session for use in ``async with`` (anyio: asyncio or trio)."""
        from .client import AsyncSession

        return AsyncSession(self, name)

    def token_for(self, node: NodeConfig) -> str | None:
        """The token to present to ``node``, read from its ``token_file``."""
        if node.token_file is None:
            return None
        try:
            return Path(node.token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"node {node.name!r}: cannot read token_file {node.token_file}: {exc.strerror}"
            ) from None

    def make_node_server(self, node: NodeConfig, *, token: str | None = None) -> NodeServer:
        """A node server for ``node`` with its configured driver and this config's
        store (not yet running: ``await task_group.start(server.run)``)."""
        from .server import NodeServer
        from .store import open_store

        driver_cls = self.plugins.node_driver(node.driver)
        return NodeServer(
            node,
            driver_cls(node),
            open_store(self.config.store_url),
            self.plugins.hook,
            data_dir=self.config.data_path,
            driver_name=node.driver,
            token=token,
        )
