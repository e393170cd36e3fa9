"""The sandbox node: each task in a fresh directory holding a copy of a workspace,
under resource limits, removed when the task ends.

A sandbox is ``<root>/jmp-sandbox-<pid>-<random>``, where ``<pid>`` is the node
process that made it: ``jmp sandbox clean`` removes only sandboxes whose node process
is gone, never one a task still runs in.

Processes, output and stopping are the local node's (:class:`LocalNodeDriver`): this
driver only prepares the directory, sets the limits and cleans up. The limits are set
with ``setrlimit`` in the child, between fork and exec. anyio starts processes with no
hook at that point (and a ``preexec_fn`` is unsafe in a process with threads), so the
child first runs a few lines of Python, :data:`LAUNCHER`, that set the limits and
exec the task's command. If that exec fails, the launcher says why over a pipe that
exec closes, as :mod:`subprocess` does, so a missing command is reported exactly as
the local node reports it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
from jumpstarter import NodeConfig, RunningProcess
from jumpstarter.errors import BadRequest, ConfigError, InternalError, SpawnFailed
from jumpstarter.plugins import OutputWriter
from jumpstarter_driver_local.files import LocalFiles
from jumpstarter_driver_local.node import LocalNodeDriver, LocalProcess, spawn_failed
from jumpstarter_protocol import TaskSpec
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

log = logging.getLogger(__name__)

PREFIX = "jmp-sandbox-"
MIB = 1024 * 1024

# Runs in the child as ``python -I -S -c LAUNCHER FD LIMITS -- COMMAND...``: set each
# limit (RLIMIT_X=soft:hard, comma-separated), never raising a hard limit the node
# already has, then exec. FD is closed by a successful exec; on failure it carries
# "errno<NUL>text" back to the node.
LAUNCHER = """\
import os, resource, sys
fd, limits, command = int(sys.argv[1]), sys.argv[2], sys.argv[4:]
try:
    for item in filter(None, limits.split(",")):
        name, _, values = item.partition("=")
        which = getattr(resource, name)
        soft, hard = (int(v) for v in values.split(":"))
        current = resource.getrlimit(which)[1]
        if current != resource.RLIM_INFINITY:
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(which, (soft, hard))
    os.set_inheritable(fd, False)
    os.execvp(command[0], command)
except BaseException as exc:
    os.write(fd, b"%d\\0%s" % (getattr(exc, "errno", None) or 0, str(exc).encode()))
    os._exit(127)
"""


class SandboxOptions(BaseModel):
    """The node's ``options`` table in the config, e.g.
    ``options = { workspace = "~/src/app", max_memory_mb = 512 }``."""

    model_config = ConfigDict(extra="forbid")

    workspace: Path | None = Field(None, description="directory copied into each sandbox")
    ignore: list[str] = Field(default_factory=list, description="glob patterns not copied")
    root: Path | None = Field(None, description="where sandboxes are made; default: the temp dir")
    keep: bool = Field(False, description="leave each sandbox in place after its task")
    max_memory_mb: PositiveInt | None = Field(None, description="address space (RLIMIT_AS)")
    max_cpu_seconds: PositiveInt | None = Field(None, description="CPU time (RLIMIT_CPU)")
    max_file_size_mb: PositiveInt | None = Field(
        None, description="largest file written (RLIMIT_FSIZE)"
    )

    def limits(self) -> dict[str, tuple[int, int]]:
        """``RLIMIT_*`` name → (soft, hard) for the launcher."""
        limits = {}
        if self.max_memory_mb:
            limits["RLIMIT_AS"] = (self.max_memory_mb * MIB,) * 2
        if self.max_cpu_seconds:
            # One second between SIGXCPU and SIGKILL: time for the task to say why it dies.
            limits["RLIMIT_CPU"] = (self.max_cpu_seconds, self.max_cpu_seconds + 1)
        if self.max_file_size_mb:
            limits["RLIMIT_FSIZE"] = (self.max_file_size_mb * MIB,) * 2
        return limits


def sandbox_options(node: NodeConfig) -> SandboxOptions:
    """The validated options of ``node``; :class:`ConfigError` naming the node and key."""
    try:
        options = SandboxOptions.model_validate(node.options)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"node {node.name!r}: options.{key}: {error['msg']}") from None
    if options.workspace is not None:
        options.workspace = options.workspace.expanduser().resolve()
        if not options.workspace.is_dir():
            raise ConfigError(
                f"node {node.name!r}: options.workspace: not a directory: {options.workspace}"
            )
    options.root = (
        options.root.expanduser() if options.root else Path(tempfile.gettempdir())
    ).resolve()
    return options


class SandboxNodeDriver(LocalNodeDriver):
    """Runs each task like the local node does, but in a sandbox of its own.

    The task starts in the sandbox (a relative ``cwd`` is taken inside it; an
    absolute one is refused) with ``JMP_SANDBOX`` set to the sandbox's path.

    Files put on the node go into the workspace (so every later sandbox has them)
    and are fetched from it: the workspace is the node's files root, and a node
    without a workspace has no ``files`` capability."""

    # Its tasks run under a launcher with stdin from /dev/null: no input, no terminal.
    capabilities = [
        *(c for c in LocalNodeDriver.capabilities if c not in ("stdin", "pty")),
        "sandbox",
        "limits",
    ]

    def __init__(self, node: NodeConfig) -> None:
        super().__init__(node)
        self.options = sandbox_options(node)
        workspace = self.options.workspace
        if workspace is None:
            self.files = None
        else:
            self.files = WorkspaceFiles(workspace)
            # The node server confines transfers to its files root and resolves
            # relative paths there: the workspace, unless the node names another in it.
            if node.files_root is None or not node.files_root.resolve().is_relative_to(workspace):
                node.files_root = workspace

    async def spawn(self, spec: TaskSpec, output: OutputWriter) -> RunningProcess:
        if spec.cwd is not None and os.path.isabs(spec.cwd):
            raise BadRequest(f"the sandbox node takes a cwd inside the sandbox, not {spec.cwd}")
        directory = await anyio.to_thread.run_sync(self.make_sandbox)
        try:
            cwd = directory / (spec.cwd or "")
            if not cwd.is_dir():
                raise BadRequest(f"working directory does not exist in the sandbox: {spec.cwd}")
            env = {**spec.env, "JMP_SANDBOX": str(directory)}
            process = await self._launch(spec.command, output, cwd, env)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_sandbox, directory)
            raise
        return SandboxProcess(process, directory, output, keep=self.options.keep)

    def make_sandbox(self) -> Path:
        """A new, private (mode 0700) directory holding a copy of the workspace."""
        root = self.options.root
        assert root is not None
        try:
            root.mkdir(parents=True, exist_ok=True)
            directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        except OSError as exc:
            raise InternalError(f"cannot make a sandbox in {root}: {exc.strerror}") from None
        workspace = self.options.workspace
        if workspace is not None:
            ignore = shutil.ignore_patterns(*self.options.ignore) if self.options.ignore else None
            try:
                shutil.copytree(
                    workspace, directory, symlinks=True, ignore=ignore, dirs_exist_ok=True
                )
            except (OSError, shutil.Error) as exc:
                remove_sandbox(directory)
                raise InternalError(f"cannot copy the workspace {workspace}: {_why(exc)}") from None
        return directory

    async def _launch(
        self, command: Sequence[str], output: OutputWriter, cwd: Path, env: Mapping[str, str]
    ) -> LocalProcess:
        limits = ",".join(
            f"{name}={soft}:{hard}" for name, (soft, hard) in self.options.limits().items()
        )
        report_read, report_write = os.pipe()
        try:
            launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(report_write), limits, "--"]
            process = await self.start_process(
                [*launcher, *command], output, cwd=cwd, env=env, pass_fds=(report_write,)
            )
        except BaseException:
            os.close(report_read)
            raise
        finally:
            os.close(report_write)
        try:
            report = await _read_to_end(report_read)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await process.terminate(0)
                await process.wait()
            raise
        finally:
            os.close(report_read)
        if report:
            await process.wait()  # the launcher has exited; reap it, close its pipes
            code, _, text = report.partition(b"\0")
            if int(code):
                raise spawn_failed(command[0], OSError(int(code), os.strerror(int(code))))
            raise SpawnFailed(
                f"cannot start {command[0]} in the sandbox: {text.decode(errors='replace')}"
            )
        return process


class SandboxProcess(RunningProcess):
    """A task in its sandbox: the local process, plus the directory to remove."""

    def __init__(
        self, process: LocalProcess, directory: Path, output: OutputWriter, *, keep: bool
    ) -> None:
        self.process = process
        self.pid = process.pid
        self.directory = directory
        self._output = output
        self._keep = keep

    async def wait(self) -> int:
        try:
            return await self.process.wait()
        finally:
            with anyio.CancelScope(shield=True):
                if self._keep:
                    self._output.write("stderr", f"jmp-sandbox: kept {self.directory}\n".encode())
                else:
                    await anyio.to_thread.run_sync(remove_sandbox, self.directory)

    async def terminate(self, grace: float) -> None:
        await self.process.terminate(grace)


def remove_sandbox(directory: Path) -> bool:
    """Remove ``directory``, also where a task took away its own write permission.
    False (and a warning in the log) if something could not be removed."""
    shutil.rmtree(directory, ignore_errors=True)
    if not directory.exists():
        return True
    # Give back write permission, top down, so each directory can be listed before
    # os.walk enters it. Never through a symlink: it may point out of the sandbox.
    _chmod_dir(str(directory))
    for dirpath, dirnames, _ in os.walk(directory):
        for name in dirnames:
            _chmod_dir(os.path.join(dirpath, name))
    shutil.rmtree(directory, ignore_errors=True)
    if directory.exists():
        log.warning("cannot remove sandbox %s; `jmp sandbox clean` will try again", directory)
        return False
    return True


def _chmod_dir(path: str) -> None:
    if not os.path.islink(path):
        with contextlib.suppress(OSError):
            os.chmod(path, 0o700)


def owner_pid(directory: Path) -> int | None:
    """The node process that made sandbox ``directory``, from its name."""
    pid, _, _ = directory.name.removeprefix(PREFIX).partition("-")
    return int(pid) if directory.name.startswith(PREFIX) and pid.isdigit() else None


async def _read_to_end(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not chunk:
            return data
        data += chunk


def _why(exc: OSError | shutil.Error) -> str:
    if isinstance(exc, shutil.Error):
        first = exc.args[0][0] if exc.args and exc.args[0] else None
        return f"{first[2]} ({first[0]})" if first else str(exc)
    return f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror or exc)


class WorkspaceFiles(LocalFiles):
    """The local node's files, refusing any path outside the workspace (the node
    server refuses them first, with a clearer message; this is the driver's own
    guarantee)."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace

    def _inside(self, path: str) -> str:
        real = os.path.realpath(path)
        if not Path(real).is_relative_to(self.workspace):
            raise PermissionError(errno.EACCES, f"outside the sandbox workspace {self.workspace}", path)
        return path

    async def stat(self, path: str):  # type: ignore[no-untyped-def]
        return await super().stat(self._inside(path))

    async def list_dir(self, path: str) -> list[str]:
        return await super().list_dir(self._inside(path))

    def read(self, path: str, offset: int = 0):  # type: ignore[no-untyped-def]
        return super().read(self._inside(path), offset)

    async def write(self, path, chunks, *, offset: int = 0) -> int:  # type: ignore[no-untyped-def]
        return await super().write(self._inside(path), chunks, offset=offset)

    async def rename(self, source: str, target: str) -> None:
        await super().rename(self._inside(source), self._inside(target))

    async def remove(self, path: str) -> None:
        await super().remove(self._inside(path))

    async def make_dir(self, path: str, mode: int = 0o755) -> None:
        await super().make_dir(self._inside(path), mode)

    async def chmod(self, path: str, mode: int) -> None:
        await super().chmod(self._inside(path), mode)
