"""The interfaces a plugin implements: a node driver (with its optional file access)
and a transport.

A **node driver** runs work on a node. It has one method, :meth:`NodeDriver.spawn`,
which starts a task and hands back a :class:`RunningProcess`; the node server does the
rest (task state, timeouts, output storage, the store, leases, hooks). What more a
node can do it announces in ``capabilities``, and the node server refuses a request
for anything not announced, naming the node and the capability:

``stdin``
    ``spec.stdin``: :meth:`RunningProcess.write_input` and :meth:`~RunningProcess.close_input`;
``pty``
    ``spec.pty``: the task runs on a terminal; :meth:`RunningProcess.resize`;
``files``
    :attr:`NodeDriver.files` is a :class:`NodeFiles`: files put on and fetched from
    the node (the node server adds checksums, temporary names, resuming and the
    files root on top of it).
``console``
    :attr:`NodeDriver.console` is a :class:`NodeConsole`: a board's console, its
    transcript read by anyone, typed on by the lease holder (``jmp console``).
``power``
    :attr:`NodeDriver.power` is a :class:`PowerDriver` (``jmp power``); the node
    server sets it from the node's ``power = {driver = "…", …}`` config, or the
    driver brings its own (a QEMU board powers its VM).

A **power driver** switches a board on and off: :class:`PowerDriver`, registered
from a plugin's ``jmp_register_power_drivers`` hook.

A **transport** carries protocol messages between a client and a node server:
:meth:`Transport.request` for one request and its reply, :meth:`Transport.read_output`
for a task's output stream, :meth:`Transport.put_file` and :meth:`Transport.get_file`
for file transfers (a node with the ``files`` capability), and :meth:`Transport.aclose`.

Both are registered from a plugin's ``jmp_register_node_drivers`` and
``jmp_register_transports`` hooks (see :mod:`jumpstarter.hookspecs`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from jumpstarter_protocol import (
    FileChunk,
    FileEnd,
    GetFile,
    OutputChunk,
    OutputEnd,
    PutFile,
    ReadOutput,
    TaskSpec,
)

if TYPE_CHECKING:
    from jumpstarter.config import NodeConfig
    from jumpstarter.node.server import NodeServer

Stream = Literal["stdout", "stderr"]


class OutputWriter(Protocol):
    """Where a running process's output goes. ``write`` never blocks for long and
    never drops bytes; call it in the order the bytes were produced."""

    def write(self, stream: Stream, data: bytes) -> None: ...


class ProcessLost(Exception):
    """Raised by :meth:`RunningProcess.wait` when the node lost track of the process
    (say, the connection to the host it runs on dropped): the task ends ``lost``, with
    this exception's message as the reason."""


class RunningProcess(ABC):
    """A task's process as a node driver started it."""

    pid: int | None = None

    message: str | None = None
    """Why the process ended, where the driver knows more than an exit code says
    (say, a board power cycled because its shell hung); kept as the task's message."""

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

    async def write_input(self, data: bytes) -> None:
        """Write ``data`` to the task's input (``spec.stdin`` or ``spec.pty``), in
        order; waits while the task does not read. Raises
        :class:`~jumpstarter.errors.BadRequest` when the task has no input or it was
        closed, :class:`~jumpstarter.errors.Conflict` once the task has exited."""
        raise _unsupported("stdin")

    async def close_input(self) -> None:
        """End the task's input: EOF on its stdin (on a terminal, the end-of-file
        character). Closing twice is not an error."""
        raise _unsupported("stdin")

    async def resize(self, rows: int, cols: int) -> None:
        """Set the size of the task's terminal (``spec.pty``); the program gets
        SIGWINCH as from any terminal."""
        raise _unsupported("pty")


class NodeDriver(ABC):
    """Runs tasks on a node. One instance serves one node.

    ``capabilities`` lists what the node can do, for ``FetchConfig``.
    """

    capabilities: ClassVar[list[str]] = []

    start_timeout: float = 0.0
    """Seconds :meth:`spawn` may legitimately take (booting a board to its shell, an
    SSH login), announced to clients as ``NodeInfo.start_timeout`` so that one with a
    deadline per request waits that long for a start's reply."""

    files: NodeFiles | None = None
    """File access on the node, for a driver with the ``files`` capability."""

    console: NodeConsole | None = None
    """The board's console, for a driver with the ``console`` capability."""

    power: PowerDriver | None = None
    """How the node's board is powered: set by the node server from the node's
    ``power`` config (before :meth:`serve` starts), or by the driver itself."""

    def __init__(self, node: NodeConfig) -> None:
        self.node = node

    def check_spec(self, spec: TaskSpec) -> None:
        """Raise :class:`~jumpstarter.errors.BadRequest` for a spec no task of this
        node can run with, before anything is stored for it: by default a ``cwd`` that
        is not a directory of this machine. A driver whose tasks run on another machine
        overrides it (and checks the ``cwd`` there, in :meth:`spawn`)."""
        if spec.cwd is None:
            return
        from jumpstarter.errors import BadRequest

        try:
            usable = Path(spec.cwd).is_dir()
        except OSError as exc:  # a name too long for the file system, say
            shown = spec.cwd if len(spec.cwd) <= 80 else spec.cwd[:79] + "…"
            raise BadRequest(f"working directory cannot be used: {shown}: {exc.strerror}") from None
        if not usable:
            raise BadRequest(f"working directory does not exist: {spec.cwd}")

    @abstractmethod
    async def spawn(self, spec: TaskSpec, output: OutputWriter) -> RunningProcess:
        """Start the task described by ``spec``; its output goes to ``output``.

        Raise :class:`~jumpstarter.errors.SpawnFailed` when the command cannot be
        started, :class:`~jumpstarter.errors.BadRequest` when the spec cannot be
        honoured (say, a missing ``cwd``). Return as soon as the task runs."""

    async def serve(self, state_dir: Path) -> None:
        """Work the driver does for as long as the node server runs (a console's
        reader, a VM); ``state_dir`` is a directory of this node's own on the node
        machine for what the driver keeps (a console transcript). Started once when
        the node server starts, cancelled when it stops (before :meth:`aclose`). The
        default does nothing."""

    async def aclose(self) -> None:
        """Release what the driver holds. Called once when the node server stops."""


@dataclass(frozen=True)
class FileStat:
    """What a node knows of a path."""

    kind: Literal["file", "dir", "link", "other"]
    size: int
    mode: int
    """The permission bits (``0o755``), without the file type."""
    mtime: float


class NodeFiles(ABC):
    """The files of a node, as plain operations on its paths; a driver with the
    ``files`` capability provides one as :attr:`NodeDriver.files`.

    Paths are absolute paths of the node (the node server resolves relative ones and
    confines them to a files root). Every method raises :class:`OSError` with the
    errno of what went wrong (``ENOENT``, ``EACCES``, ``ENOSPC``, ``EISDIR``…); the
    node server turns those into replies a user can read. Checksums, temporary names
    and resuming are the node server's: a driver only moves bytes."""

    @abstractmethod
    async def stat(self, path: str) -> FileStat | None:
        """What ``path`` is, without following a final symlink; None if it does
        not exist."""

    @abstractmethod
    async def real_path(self, path: str) -> str:
        """``path`` with every symlink and ``..`` resolved, as far as it exists
        (the rest appended as it is), like ``os.path.realpath``."""

    @abstractmethod
    async def list_dir(self, path: str) -> list[str]:
        """The names in directory ``path``, sorted."""

    @abstractmethod
    def read(self, path: str, offset: int = 0) -> AsyncIterator[bytes]:
        """The bytes of file ``path`` from ``offset`` to its end, in chunks (an
        async generator: closing it stops the read)."""

    @abstractmethod
    async def write(self, path: str, chunks: AsyncIterator[bytes], *, offset: int = 0) -> int:
        """Write ``chunks`` into file ``path`` from ``offset`` on (created if
        missing, mode 0600; cut to ``offset`` first) and make them durable; the size
        of the file afterwards."""

    @abstractmethod
    async def rename(self, source: str, target: str) -> None:
        """Move ``source`` to ``target`` at once, replacing a file there."""

    @abstractmethod
    async def remove(self, path: str) -> None:
        """Remove file ``path``; not an error if it is gone already."""

    @abstractmethod
    async def make_dir(self, path: str, mode: int = 0o755) -> None:
        """Create directory ``path`` and its missing parents; not an error if it
        exists."""

    @abstractmethod
    async def chmod(self, path: str, mode: int) -> None:
        """Set the permission bits of ``path``."""


class NodeConsole(ABC):
    """A board's console as the node keeps it: a transcript of every byte the board
    printed (boot logs, kernel panics, tasks), and a way to type on it."""

    @abstractmethod
    async def read(self, offset: int | None, limit: int, wait: float) -> tuple[int, bytes, int]:
        """Up to ``limit`` transcript bytes from ``offset`` (None: the end): ``(offset,
        data, end)``, ``end`` being where the transcript ends now. Waits up to ``wait``
        seconds while there is nothing to return."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Type ``data`` on the console. Raises :class:`~jumpstarter.errors.Conflict`
        while a task runs on it, :class:`~jumpstarter.errors.NodeError` when the
        board's console is not connected."""

    @property
    @abstractmethod
    def busy(self) -> str | None:
        """What runs on the console now (``"a task"``, ``"a file transfer"``), if
        anything: the console is read-only meanwhile."""


PowerStateName = Literal["on", "off", "unknown"]


class PowerDriver(ABC):
    """Switches one board's power. One instance per node, made from the node's
    ``power = {driver = "name", …}`` config: ``options`` is that table without
    ``driver``.

    Every action raises :class:`~jumpstarter.errors.PowerFailed` with one line
    saying what failed (the command, the URL, its answer)."""

    pause: float = 1.0
    """Seconds off within :meth:`cycle` (option ``pause``)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = dict(options)
        pause = self.options.pop("pause", self.pause)
        if not isinstance(pause, int | float) or isinstance(pause, bool) or pause < 0:
            from jumpstarter.errors import ConfigError

            raise ConfigError(f"power.pause: expected seconds (a number >= 0), got {pause!r}")
        self.pause = float(pause)

    @abstractmethod
    async def on(self) -> None:
        """Switch the board on (no error when it is on already)."""

    @abstractmethod
    async def off(self) -> None:
        """Switch the board off (no error when it is off already)."""

    async def cycle(self) -> None:
        """Off, :attr:`pause` seconds, on. Back ends with a cycle of their own (a PDU's
        reboot action) override it."""
        import anyio

        await self.off()
        await anyio.sleep(self.pause)
        await self.on()

    async def status(self) -> PowerStateName:
        """``on``, ``off``, or ``unknown`` when the back end cannot tell (the default)."""
        return "unknown"

    async def aclose(self) -> None:
        """Release what the back end holds (not the board's power: it stays as it is)."""


def _unsupported(capability: str) -> Exception:
    from jumpstarter.errors import BadRequest

    return BadRequest(f"this node driver has no {capability!r} capability")


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

    # --- files (optional: a transport that cannot carry files keeps these) -----------

    async def put_file(
        self, header: PutFile, chunks: AsyncIterator[FileChunk | FileEnd], *, hashed: bool = False
    ) -> object:
        """Send one upload: ``header``, then ``chunks`` (``FileChunk`` messages and one
        ``FileEnd``); return the node's reply (``FileWritten`` or an ``Error``). Raise
        :class:`~jumpstarter.errors.TransportError` when the connection breaks: the
        client then asks the node where to resume (``OpenUpload``).

        ``hashed``: the caller computed the ``FileEnd``'s sha256 of exactly these
        chunk objects (the client's own put does). A transport that hands the objects
        to a node server in this process lets the node take that sha256 instead of
        hashing the same bytes again; one that sends them over a wire ignores it."""
        from jumpstarter.errors import TransportError

        raise TransportError(f"transport {type(self).__name__} cannot carry files")

    def get_file(self, request: GetFile) -> AsyncGenerator[FileChunk | FileEnd | object, None]:
        """Yield the ``FileChunk`` messages answering ``request``, then one
        ``FileEnd`` (or an ``Error``). A transport that reconnects resumes from the
        offset it reached, as :meth:`read_output` does."""
        from jumpstarter.errors import TransportError

        raise TransportError(f"transport {type(self).__name__} cannot carry files")

    @classmethod
    async def serve(cls, server: NodeServer, options: dict[str, object]) -> None:
        """Serve ``server`` to clients of this transport until cancelled (``jmp node
        serve``). ``options`` come from the command line (listen address, TLS files,
        token…). Transports that only reach nodes need not implement it."""
        raise NotImplementedError(f"transport {cls.__name__} cannot serve a node")
