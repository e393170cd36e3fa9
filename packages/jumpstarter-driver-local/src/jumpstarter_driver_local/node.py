"""The local node: each task is a subprocess of this machine in its own process group.

Output is read from two pipes of our own (enlarged to 1 MiB where the kernel lets us)
with non-blocking reads, so a task that writes fast is never held up by the node and
neither stream can starve the other.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
from collections.abc import Mapping, Sequence

import anyio
import anyio.lowlevel
from jumpstarter import NodeConfig, NodeDriver, RunningProcess
from jumpstarter.errors import SpawnFailed
from jumpstarter.plugins import Containment, OutputWriter, Stream, TaskProcesses
from jumpstarter_protocol import TaskSpec

READ_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class LocalNodeDriver(NodeDriver):
    """Runs each task as a subprocess of this machine, in a new session (and so a
    new process group), with stdin from /dev/null, contained (see
    :class:`~jumpstarter.plugins.Containment`: a cgroup per task where the node may
    make one, the node as child subreaper) so that stop, timeout and crash recovery
    reach every process the task starts. Files are this machine's
    (:class:`~jumpstarter_driver_local.files.LocalFiles`)."""

    capabilities = ["exec", "shell", "env", "cwd", "timeout", "process-group", "files"]

    def __init__(self, node: NodeConfig) -> None:
        super().__init__(node)
        from .files import LocalFiles

        self.files = LocalFiles()
        self.containment = Containment()

    async def spawn(self, spec: TaskSpec, output: OutputWriter) -> RunningProcess:
        return await self.start_process(spec.command, output, cwd=spec.cwd, env=spec.env)

    async def start_process(
        self,
        command: Sequence[str],
        output: OutputWriter,
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> LocalProcess:
        """Start ``command`` as :meth:`spawn` starts a task: its own process group,
        contained, stdin from /dev/null, output to ``output``; ``env`` is added to
        this process's environment, ``pass_fds`` stay open in the child. Drivers built
        on this one (say, one that runs each task in a directory of its own) call it
        from their ``spawn``. Raises :class:`SpawnFailed` (see :func:`spawn_failed`),
        also when this process is out of file handles for the task's pipes."""
        pipes: list[tuple[int, int]] = []
        try:
            pipes.append(_pipe())
            pipes.append(_pipe())
            # Popen, not anyio.open_process: asyncio would watch each child with a
            # thread of its own; the exit is waited for through a pidfd instead.
            process, processes = self.containment.spawn(
                lambda: subprocess.Popen(
                    list(command),
                    stdin=subprocess.DEVNULL,
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
            raise spawn_failed(command[0], exc) from None
        finally:
            for _, write_end in pipes:
                os.close(write_end)
        return LocalProcess(process, processes, output, pipes[0][0], pipes[1][0])


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        fcntl.fcntl(read_end, _F_SETPIPE_SZ, READ_SIZE)
    except OSError:
        pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size works
    return read_end, write_end


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
    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        processes: TaskProcesses,
        output: OutputWriter,
        stdout: int,
        stderr: int,
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.processes = processes
        self._output = output
        self._fds = {"stdout": stdout, "stderr": stderr}
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
                async with anyio.create_task_group() as either:
                    for event in (drained, self._killed):
                        either.start_soon(_set_then_cancel, event, either.cancel_scope)
                if not drained.is_set():  # stopped: read what is there, then close
                    with anyio.move_on_after(DRAIN_AFTER_STOP):
                        await drained.wait()
                tg.cancel_scope.cancel()
            return code
        finally:
            for fd in self._fds.values():
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
