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
    "AsyncSession": "jumpstarter.client",
    "AsyncNode": "jumpstarter.client",
    "AsyncTask": "jumpstarter.client",
    "Session": "jumpstarter.sync",
    "Node": "jumpstarter.sync",
    "Task": "jumpstarter.sync",
    "NodeDriver": "jumpstarter.driver",
    "RunningProcess": "jumpstarter.driver",
    "OutputWriter": "jumpstarter.driver",
    "Transport": "jumpstarter.driver",
    "NodeServer": "jumpstarter.server",
    "NodeConnection": "jumpstarter.server",
    "hookimpl": "jumpstarter.hookspecs",
    "hookspec": "jumpstarter.hookspecs",
    "get_plugin_manager": "jumpstarter.plugins",
    "JumpstarterError": "jumpstarter.errors",
    "ConfigError": "jumpstarter.errors",
    "PluginError": "jumpstarter.errors",
    "TransportError": "jumpstarter.errors",
    "NodeError": "jumpstarter.errors",
    "NotFound": "jumpstarter.errors",
    "Conflict": "jumpstarter.errors",
    "BadRequest": "jumpstarter.errors",
    "SpawnFailed": "jumpstarter.errors",
    "Unauthorized": "jumpstarter.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .client import AsyncNode, AsyncSession, AsyncTask
    from .config import Config, NodeConfig, load_config
    from .driver import NodeDriver, OutputWriter, RunningProcess, Transport
    from .errors import (
        BadRequest,
        ConfigError,
        Conflict,
        JumpstarterError,
        NodeError,
        NotFound,
        PluginError,
        SpawnFailed,
        TransportError,
        Unauthorized,
    )
    from .hookspecs import hookimpl, hookspec
    from .plugins import get_plugin_manager
    from .protocol import JumpStarterProtocol
    from .server import NodeConnection, NodeServer
    from .sync import Node, Session, Task


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jumpstarter' has no attribute {name!r}")
    return getattr(import_module(module), name)
