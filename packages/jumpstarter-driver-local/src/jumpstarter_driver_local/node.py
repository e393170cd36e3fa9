"""The local node: each task is a subprocess of this machine in its own process group.

Output is read from two pipes of our own (enlarged to 1 MiB where the kernel lets us)
with non-blocking reads, so a task that writes fast is never held up by the node and
neither stream can starve the other.

A task with ``spec.stdin`` reads a pipe the node writes its input to; one with
``spec.pty`` runs on a pseudo-terminal of its own (its controlling terminal, in a new
session), whose output is the task's ``stdout``. Either way the task is contained
(:class:`~jumpstarter.plugins.Containment`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
import termios
from collections.abc import Mapping, Sequence

import anyio
import anyio.lowlevel
from jumpstarter import NodeConfig, NodeDriver, RunningProcess
from jumpstarter.errors import BadRequest, Conflict, SpawnFailed
from jumpstarter.plugins import Containment, OutputWriter, Stream, TaskProcesses
from jumpstarter_protocol import TaskSpec

READ_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class LocalNodeDriver(NodeDriver):
    """Runs each task as a subprocess of this machine, in a new session (and so a
    new process group), with stdin from /dev/null unless the spec asks for input or a
    terminal, contained (see :class:`~jumpstarter.plugins.Containment`: a cgroup per
    task where the node may make one, the node as child subreaper) so that stop,
    timeout and crash recovery reach every process the task starts. Files are this
    machine's (:class:`~jumpstarter_driver_local.files.LocalFiles`)."""

    capabilities = ["exec", "shell", "env", "cwd", "timeout", "process-group", "files", "stdin", "pty"]

    def __init__(self, node: NodeConfig) -> None:
        super().__init__(node)
        from .files import LocalFiles

        self.files = LocalFiles()
        self.containment = Containment()

    async def spawn(self, spec: TaskSpec, output: OutputWriter) -> RunningProcess:
        if spec.pty is not None:
            return await self.start_on_terminal(
                spec.command, output, spec.pty.rows, spec.pty.cols, cwd=spec.cwd, env=spec.env
            )
        return await self.start_process(spec.command, output, cwd=spec.cwd, env=spec.env, stdin=spec.stdin)

    async def start_process(
        self,
        command: Sequence[str],
        output: OutputWriter,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        stdin: bool = False,
    ) -> LocalProcess:
        """Start ``command`` as :meth:`spawn` starts a task: its own process group,
        contained, stdin from /dev/null (from a pipe :meth:`LocalProcess.write_input`
        writes to, with ``stdin``), output to ``output``; ``env`` is added to this
        process's environment, ``pass_fds`` stay open in the child. Drivers built on
        this one (say, one that runs each task in a directory of its own) call it from
        their ``spawn``. Raises :class:`SpawnFailed` (see :func:`spawn_failed`), also
        when this process is out of file handles for the task's pipes."""
        pipes: list[tuple[int, int]] = []
        input_read: int = subprocess.DEVNULL
        input_write: int | None = None
        try:
            pipes.append(_pipe())
            pipes.append(_pipe())
            if stdin:
                input_read, input_write = os.pipe()
            # Popen, not anyio.open_process: asyncio would watch each child with a
            # thread of its own; the exit is waited for through a pidfd instead.
            process, processes = self.containment.spawn(
                lambda: subprocess.Popen(
                    list(command),
                    stdin=input_read,
                    stdout=pipes[0][1],
                    stderr=pipes[1][1],
                    cwd=cwd,
                    # None inherits this process's environment as is: copying it into a
                    # dict for Popen to encode back costs a tenth of a fast task's start.
                    env={**os.environ, **env} if env else None,
                    start_new_session=True,
                    pass_fds=pass_fds,
                )
            )
        except OSError as exc:
            for read_end, _ in pipes:
                os.close(read_end)
            if input_write is not None:
                os.close(input_write)
            raise spawn_failed(command[0], exc) from None
        finally:
            for _, write_end in pipes:
                os.close(write_end)
            if input_write is not None:
                os.close(input_read)
        if input_write is not None:
            os.set_blocking(input_write, False)
            _enlarge(input_write)  # fewer turns while a task reads its input
        fds: dict[Stream, int] = {"stdout": pipes[0][0], "stderr": pipes[1][0]}
        return LocalProcess(process, processes, output, fds, input_write)

    async def start_on_terminal(
        self,
        command: Sequence[str],
        output: OutputWriter,
        rows: int,
        cols: int,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> LocalProcess:
        """Start ``command`` on a new pseudo-terminal of ``rows`` x ``cols``: stdin,
        stdout and stderr are the terminal, which is the controlling terminal of the
        task's new session; what the terminal shows goes to ``output`` as ``stdout``."""
        environment = {**os.environ, **env} if env else None
        # TIOCSCTTY must be done in the child. Python code there (preexec_fn) makes
        # subprocess fork() a multi-threaded process, which crashes under grpc; setsid(1)
        # does it in C and then executes the command (the same pid). It cannot tell us a
        # command was not found, so that is looked for here, as the shell would. (No
        # start_new_session: setsid(1) forks when it already leads a group.)
        program = command[0]
        if os.sep not in program and shutil.which(program, path=(environment or os.environ).get("PATH")) is None:
            raise spawn_failed(program, FileNotFoundError(errno.ENOENT, "No such file or directory"))
        main, secondary = os.openpty()
        try:
            set_terminal_size(main, rows, cols)
            process, processes = self.containment.spawn(
                lambda: subprocess.Popen(
                    [SETSID, "--ctty", "--", *command],
                    stdin=secondary,
                    stdout=secondary,
                    stderr=secondary,
                    cwd=cwd,
                    env=environment,
                )
            )
        except OSError as exc:
            os.close(main)
            raise spawn_failed(program, exc) from None
        finally:
            os.close(secondary)  # the task holds it now; its end reads as EIO on ours
        os.set_blocking(main, False)
        return LocalProcess(process, processes, output, {"stdout": main}, main, terminal=True)


def set_terminal_size(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the terminal ``fd``; the kernel sends SIGWINCH to its
    foreground process group when the size changes."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


SETSID = shutil.which("setsid") or "/usr/bin/setsid"
"""util-linux's ``setsid``: ``setsid --ctty CMD`` makes a new session whose
controlling terminal is its stdin, then executes CMD in the same process."""


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    _enlarge(read_end)
    return read_end, write_end


def _enlarge(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, READ_SIZE)
    except OSError:
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size works


def spawn_failed(command: str, exc: OSError) -> SpawnFailed:
    """The :class:`SpawnFailed` for ``command`` that could not be executed: its
    message names the command, ``details["errno"]`` the reason (``ENOENT`` makes
    ``jmp run`` exit 127, anything else 126)."""
    code = errno.errorcode.get(exc.errno or 0, "EIO")
    if exc.errno == errno.ENOENT:
        text = f"command not found: {command}"
    elif exc.errno == errno.EACCES:
        text = f"permission denied: {command}"
    else:
        text = f"cannot start {command}: {exc.strerror}"
    return SpawnFailed(text, details={"errno": code, "command": command})


DRAIN_AFTER_STOP = 1.0
"""Seconds the output of a stopped task is still read once its processes are dead:
a process outside the task's reach (see :class:`~jumpstarter.plugins.Containment`)
may hold its pipes open forever, and a stop must not wait for it."""


class LocalProcess(RunningProcess):
    """A task's subprocess: ``fds`` are the read ends of its output, ``input`` the
    fd its input is written to (a pipe, or the terminal's main side)."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        processes: TaskProcesses,
        output: OutputWriter,
        fds: dict[Stream, int],
        input: int | None = None,
        *,
        terminal: bool = False,
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.processes = processes
        self._output = output
        self._fds = fds
        self._input = input
        self._input_closed = input is None
        self._terminal = terminal
        self._exited = anyio.Event()
        self._killed = anyio.Event()

    async def wait(self) -> int:
        """The task has ended when its first process has exited and its output is
        closed (by every process holding it, or by a stop); whatever of it is left
        then is killed."""
        try:
            async with anyio.create_task_group() as tg:
                drained = anyio.Event()

                async def pump_all() -> None:
                    async with anyio.create_task_group() as pumps:
                        for stream, fd in self._fds.items():
                            pumps.start_soon(self._pump, stream, fd)
                    drained.set()

                tg.start_soon(pump_all)
                tg.start_soon(self.processes.track)
                code = await self.processes.wait_leader()
                # Popen would otherwise warn that its child still runs.
                self.popen.returncode = code
                self._exited.set()
                async with anyio.create_task_group() as either:
                    for event in (drained, self._killed):
                        either.start_soon(_set_then_cancel, event, either.cancel_scope)
                if not drained.is_set():  # stopped: read what is there, then close
                    with anyio.move_on_after(DRAIN_AFTER_STOP):
                        await drained.wait()
                tg.cancel_scope.cancel()
            return code
        finally:
            # A write still waiting on an fd is woken (it raises) before the fd goes.
            if self._input is not None and not (self._terminal or self._input_closed):
                anyio.notify_closing(self._input)
                os.close(self._input)
            self._input_closed = True
            for fd in self._fds.values():
                anyio.notify_closing(fd)
                os.close(fd)
            with anyio.CancelScope(shield=True):
                await self.processes.release()

    async def _pump(self, stream: Stream, fd: int) -> None:
        write = self._output.write
        since_turn = 0
        while True:
            try:
                data = os.read(fd, READ_SIZE)
            except BlockingIOError:
                since_turn = 0
                await anyio.wait_readable(fd)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # a terminal whose last user closed it
                    return
                raise
            if not data:
                return
            write(stream, data)
            # A task whose pipe is never empty would keep the event loop to itself:
            # after each READ_SIZE bytes, readers (and every other request) have their
            # turn. Not after each read: when the task writes in small pieces, a turn
            # per piece would cost more than the bytes.
            since_turn += len(data)
            if since_turn >= READ_SIZE:
                since_turn = 0
                await anyio.lowlevel.checkpoint()

    async def write_input(self, data: bytes) -> None:
        if self._input is None:
            raise BadRequest("this task takes no input")
        view = memoryview(data)
        while view:
            if self._input_closed or self._exited.is_set():
                raise Conflict("the task has exited; it reads no more input")
            try:
                written = os.write(self._input, view)
            except BlockingIOError:
                await anyio.wait_writable(self._input)
                continue
            except (BrokenPipeError, anyio.ClosedResourceError):
                raise Conflict("the task no longer reads its input") from None
            view = view[written:]

    async def close_input(self) -> None:
        if self._input_closed:
            return
        if self._terminal:
            # A terminal stays open: EOF is its end-of-file character at a line's start.
            eof = termios.tcgetattr(self._input)[6][termios.VEOF]
            await self.write_input(eof if isinstance(eof, bytes) else bytes([eof]))
            return
        self._input_closed = True
        assert self._input is not None
        os.close(self._input)

    async def resize(self, rows: int, cols: int) -> None:
        if not self._terminal or self._input_closed:
            raise BadRequest("this task has no terminal")
        assert self._input is not None
        set_terminal_size(self._input, rows, cols)

    async def terminate(self, grace: float) -> None:
        """SIGTERM to every process of the task; SIGKILL to whatever of it is left
        after ``grace`` seconds (a child that ignores SIGTERM, or left the process
        group, included). Then the output is read for at most
        :data:`DRAIN_AFTER_STOP` seconds and closed."""
        try:
            await self.processes.stop(grace)
        finally:
            self._killed.set()


async def _set_then_cancel(event: anyio.Event, scope: anyio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
