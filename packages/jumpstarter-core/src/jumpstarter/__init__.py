"""Jumpstarter: run work on nodes and keep what came of it.

The public API, importable from here::

    from jumpstarter.protocol import JumpStarterProtocol
    from jumpstarter import hookimpl, NodeDriver, Transport, JumpstarterError

Names are imported on first use, so ``import jumpstarter`` (and ``jmp --version``)
stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {
    "JumpStarterProtocol": "jumpstarter.protocol",
    "Config": "jumpstarter.config",
    "NodeConfig": "jumpstarter.config",
    "load_config": "jumpstarter.config",
    "AsyncSession": "jumpstarter.client.session",
    "AsyncNode": "jumpstarter.client.session",
    "AsyncTask": "jumpstarter.client.session",
    "Session": "jumpstarter.client.sync",
    "Node": "jumpstarter.client.sync",
    "Task": "jumpstarter.client.sync",
    "NodeDriver": "jumpstarter.plugins.interfaces",
    "RunningProcess": "jumpstarter.plugins.interfaces",
    "OutputWriter": "jumpstarter.plugins.interfaces",
    "Transport": "jumpstarter.plugins.interfaces",
    "NodeFiles": "jumpstarter.plugins.interfaces",
    "FileStat": "jumpstarter.plugins.interfaces",
    "NodeConsole": "jumpstarter.plugins.interfaces",
    "PowerDriver": "jumpstarter.plugins.interfaces",
    "NodeServer": "jumpstarter.node.server",
    "NodeConnection": "jumpstarter.node.dispatch",
    "hookimpl": "jumpstarter.plugins.hookspecs",
    "hookspec": "jumpstarter.plugins.hookspecs",
    "get_plugin_manager": "jumpstarter.plugins.manager",
    "JumpstarterError": "jumpstarter.errors",
    "ConfigError": "jumpstarter.errors",
    "PluginError": "jumpstarter.errors",
    "TransportError": "jumpstarter.errors",
    "NodeError": "jumpstarter.errors",
    "NotFound": "jumpstarter.errors",
    "Conflict": "jumpstarter.errors",
    "BadRequest": "jumpstarter.errors",
    "SpawnFailed": "jumpstarter.errors",
    "PowerFailed": "jumpstarter.errors",
    "Unauthorized": "jumpstarter.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .client.session import AsyncNode, AsyncSession, AsyncTask
    from .client.sync import Node, Session, Task
    from .config import Config, NodeConfig, load_config
    from .errors import (
        BadRequest,
        ConfigError,
        Conflict,
        JumpstarterError,
        NodeError,
        NotFound,
        PluginError,
        PowerFailed,
        SpawnFailed,
        TransportError,
        Unauthorized,
    )
    from .node.dispatch import NodeConnection
    from .node.server import NodeServer
    from .plugins.hookspecs import hookimpl, hookspec
    from .plugins.interfaces import (
        FileStat,
        NodeConsole,
        NodeDriver,
        NodeFiles,
        OutputWriter,
        PowerDriver,
        RunningProcess,
        Transport,
    )
    from .plugins.manager import get_plugin_manager
    from .protocol import JumpStarterProtocol


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jumpstarter' has no attribute {name!r}")
    return getattr(import_module(module), name)
