"""The two interfaces a plugin implements: a node driver and a transport.

A **node driver** runs work on a node. It has one method, :meth:`NodeDriver.spawn`,
which starts a task and hands back a :class:`RunningProcess`; the node server does the
rest (task state, timeouts, output storage, the store, leases, hooks).

A **transport** carries protocol messages between a client and a node server:
:meth:`Transport.request` for one request and its reply, :meth:`Transport.read_output`
for a task's output stream, and :meth:`Transport.aclose`.

Both are registered from a plugin's ``jmp_register_node_drivers`` and
``jmp_register_transports`` hooks (see :mod:`jumpstarter.hookspecs`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol

from jumpstarter_protocol import OutputChunk, OutputEnd, ReadOutput, TaskSpec

if TYPE_CHECKING:
    from .config import NodeConfig
    from .server import NodeServer

Stream = Literal["stdout", "stderr"]


class OutputWriter(Protocol):
    """Where a running process's output goes. ``write`` never blocks for long and
    never drops bytes; call it in the order the bytes were produced."""

    def write(self, stream: Stream, data: bytes) -> None: ...


class RunningProcess(ABC):
    """A task's process as a node driver started it."""

    pid: int | None = None

    @abstractmethod
    async def wait(self) -> int:
        """Copy all output to the writer given to ``spawn`` and return the exit code
        once the process has exited and its output is drained; ``-N`` when a signal N
        killed it. The node server calls this exactly once."""

    @abstractmethod
    async def terminate(self, grace: float) -> None:
        """Stop the process and everything it started: a polite signal (SIGTERM to
        the process group), then a kill (SIGKILL) after ``grace`` seconds. May be
        called more than once, and after the process has exited."""


class NodeDriver(ABC):
    """Runs tasks on a node. One instance serves one node.

    ``capabilities`` lists what the node can do, for ``FetchConfig``.
    """

    capabilities: ClassVar[list[str]] = []

    def __init__(self, node: NodeConfig) -> None:
        self.node = node

    @abstractmethod
    async def spawn(self, spec: TaskSpec, output: OutputWriter) -> RunningProcess:
        """Start the task described by ``spec``; its output goes to ``output``.

        Raise :class:`~jumpstarter.errors.SpawnFailed` when the command cannot be
        started, :class:`~jumpstarter.errors.BadRequest` when the spec cannot be
        honoured (say, a missing ``cwd``). Return as soon as the task runs."""

    async def aclose(self) -> None:
        """Release what the driver holds. Called once when the node server stops."""


class ClientContext(Protocol):
    """What the core gives a transport when it connects."""

    async def start_node_server(self, node: NodeConfig) -> NodeServer:
        """Start a node server for ``node`` in this process (for in-process
        transports); it stops when the session closes."""
        ...


class Transport(ABC):
    """Carries messages between one client connection and one node server."""

    @classmethod
    @abstractmethod
    async def connect(cls, node: NodeConfig, context: ClientContext) -> Transport:
        """Open a connection to ``node``. Raise
        :class:`~jumpstarter.errors.TransportError` when it cannot be reached."""

    @abstractmethod
    async def request(self, message: object) -> object:
        """Send one request and return its reply (an ``Error`` reply is returned,
        not raised). Raise :class:`~jumpstarter.errors.TransportError` when the
        connection fails."""

    @abstractmethod
    def read_output(self, request: ReadOutput) -> AsyncGenerator[OutputChunk | OutputEnd | object, None]:
        """Yield the output chunks answering ``request``, then one ``OutputEnd``
        (or an ``Error``). An async generator: the client closes it (``aclose``) as
        soon as it stops reading, and the stream ends then."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connection. Tasks on the node go on running."""

    @classmethod
    async def serve(cls, server: NodeServer, options: dict[str, object]) -> None:
        """Serve ``server`` to clients of this transport until cancelled (``jmp node
        serve``). ``options`` come from the command line (listen address, TLS files,
        token…). Transports that only reach nodes need not implement it."""
        raise NotImplementedError(f"transport {cls.__name__} cannot serve a node")
