"""The local node: each task is a subprocess of this machine in its own process group.

Output is read from two pipes of our own (enlarged to 1 MiB where the kernel lets us)
with non-blocking reads, so a task that writes fast is never held up by the node and
neither stream can starve the other.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

import anyio
import anyio.lowlevel
from jumpstarter import NodeConfig, NodeDriver, RunningProcess
from jumpstarter.errors import SpawnFailed
from jumpstarter.plugins import OutputWriter, Stream
from jumpstarter_protocol import TaskSpec

READ_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class LocalNodeDriver(NodeDriver):
    """Runs each task as a subprocess of this machine, in a new session (and so a
    new process group), with stdin from /dev/null; files are this machine's
    (:class:`~jumpstarter_driver_local.files.LocalFiles`)."""

    capabilities = ["exec", "shell", "env", "cwd", "timeout", "process-group", "files"]

    def __init__(self, node: NodeConfig) -> None:
        super().__init__(node)
        from .files import LocalFiles

        self.files = LocalFiles()

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
        stdin from /dev/null, output to ``output``; ``env`` is added to this process's
        environment, ``pass_fds`` stay open in the child. Drivers built on this one
        (say, one that runs each task in a directory of its own) call it from their
        ``spawn``. Raises :class:`SpawnFailed` (see :func:`spawn_failed`)."""
        pipes = [_pipe(), _pipe()]
        try:
            process = await anyio.open_process(
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
        except OSError as exc:
            for read_end, _ in pipes:
                os.close(read_end)
            raise spawn_failed(command[0], exc) from None
        finally:
            for _, write_end in pipes:
                os.close(write_end)
        return LocalProcess(process, output, pipes[0][0], pipes[1][0])


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


class LocalProcess(RunningProcess):
    def __init__(self, process: anyio.abc.Process, output: OutputWriter, stdout: int, stderr: int) -> None:
        self.process = process
        self.pid = process.pid
        self._output = output
        self._fds = {"stdout": stdout, "stderr": stderr}
        self._exited = anyio.Event()

    async def wait(self) -> int:
        try:
            async with anyio.create_task_group() as tg:
                for stream, fd in self._fds.items():
                    tg.start_soon(self._pump, stream, fd)
                await self.process.wait()
                self._exited.set()
        finally:
            for fd in self._fds.values():
                os.close(fd)
        return self.process.returncode if self.process.returncode is not None else -1

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
        """SIGTERM to the process group; SIGKILL to whatever of it is left after
        ``grace`` seconds (a child that ignores SIGTERM included)."""
        if not self._signal(signal.SIGTERM):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not self._signal(0):
                return
            await anyio.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
        self._signal(signal.SIGKILL)

    def _signal(self, signum: int) -> bool:
        """Send ``signum`` to the task's process group; False if the group is gone."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
