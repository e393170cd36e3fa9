"""The ssh node: each task is a command on a host reached over SSH.

One connection per node, opened at the first task and reused by every task and file
transfer (each is a channel of its own); when it drops it is opened again at the next
use. Every task runs under a small POSIX ``sh`` wrapper that first reports the task's
process group (the shell sshd starts for a channel leads a session of its own, so its
pid is the group id), then ``exec``s the command. Stop signals that group with
``kill`` over a second channel, so it works whatever the SSH server does with
signal requests.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import shlex
import signal
import sys
from typing import TYPE_CHECKING, Any

import anyio
from jumpstarter import NodeDriver, RunningProcess
from jumpstarter.errors import BadRequest, Conflict, SpawnFailed, Unavailable
from jumpstarter.plugins import OutputWriter, ProcessLost
from jumpstarter_protocol import TaskSpec

from .options import SshOptions

if TYPE_CHECKING:
    import asyncssh
    from jumpstarter import NodeConfig

    from ._channels import _TaskSession
else:

    class _LazyAsyncssh:
        """``asyncssh``, imported on first use: every jmp command collects the node
        drivers, so this module is imported by ``jmp run`` on the local node too, and
        asyncssh costs about 0.4 s to import; only an ssh node needs it."""

        def __getattr__(self, name: str) -> Any:
            import asyncssh as module

            return getattr(module, name)

    asyncssh = _LazyAsyncssh()

log = logging.getLogger(__name__)

WINDOW = 8 * 1024 * 1024
"""Bytes a channel may send before we acknowledge: large, so a fast task is never
held up waiting for a round trip."""
PACKET = 128 * 1024
"""Largest piece of a channel's data we accept at once (SSH's usual is 32 KiB): fewer,
larger pieces cost less to decrypt and pass on in Python."""
CIPHERS = [
    # AES-GCM runs in hardware on nearly every CPU: the fastest first.
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
]
POLL = 0.05
"""Seconds between looks at a stopping process group, on the host."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SshNodeDriver(NodeDriver):
    """Runs each task on the SSH host named by the node's options (see
    :class:`~jumpstarter_driver_ssh.options.SshOptions` and ``docs/driver-ssh.md``)."""

    capabilities = [
        "exec",
        "shell",
        "env",
        "cwd",
        "timeout",
        "process-group",
        "stdin",
        "pty",
        "files",
    ]

    def __init__(self, node: NodeConfig) -> None:
        super().__init__(node)
        self.options = SshOptions.parse(node.name, node.options)
        # A start may connect (connect_timeout), then wait for the command to start
        # (three times that): what clients with a deadline per request must allow.
        self.start_timeout = 4 * self.options.connect_timeout
        self.where = f"{self.options.user}@{self.options.host}:{self.options.port}"
        if not self.options.verify_host_key:
            # Said once, where the person who turned it off will see it.
            print(
                f"jmp: warning: node {node.name!r}: host key verification is off "
                f"(verify_host_key = false): anyone between here and {self.options.host} "
                "can pose as it and see everything the node runs",
                file=sys.stderr,
            )
        self._connection: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = anyio.Lock()
        self._left_behind: set[int] = set()
        """Process groups of tasks lost with a connection: killed once it is back."""
        from .files import SshFiles

        self.files = SshFiles(self)

    # --- the connection -------------------------------------------------------------------

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The node's open connection, opened (again) if there is none. Raises
        :class:`Unavailable` with one line saying why the host cannot be used."""
        async with self._lock:
            if self._connection is not None and not _is_closed(self._connection):
                return self._connection
            self._connection = None
            self._sftp = None
            self._connection = await self._connect()
            if self._left_behind:
                await self._kill_left_behind(self._connection)
            return self._connection

    async def sftp(self) -> asyncssh.SFTPClient:
        connection = await self.connection()
        async with self._lock:
            if self._sftp is None:
                try:
                    self._sftp = await connection.start_sftp_client()
                except (asyncssh.Error, OSError) as exc:
                    raise Unavailable(
                        f"ssh: {self.where}: cannot start SFTP: {_reason(exc)}"
                    ) from None
            return self._sftp

    async def open_connection(self) -> asyncssh.SSHClientConnection:
        """A new connection of its own (not the node's), for the caller to close."""
        return await self._connect()

    async def _connect(self) -> asyncssh.SSHClientConnection:
        options = self.options
        from ._channels import _HostKeyWitness

        client = _HostKeyWitness()
        known_hosts: Any = None
        if options.verify_host_key:
            # No file: trust no key (an empty value would mean asyncssh's default file).
            known_hosts = (
                str(options.known_hosts) if options.known_hosts.is_file() else ([], [], [])
            )
        password = _read_password(options) if options.password_file else None
        try:
            with anyio.fail_after(options.connect_timeout):
                connection, _ = await asyncssh.create_connection(
                    lambda: client,
                    options.host,
                    options.port,
                    username=options.user,
                    known_hosts=known_hosts,
                    client_keys=[str(path) for path in options.key_file] or (),
                    agent_path=() if options.agent else None,
                    password=password,
                    # No ~/.ssh/config: the node's options are the whole story.
                    config=None,
                    preferred_auth=_auth_methods(options),
                    encryption_algs=CIPHERS,
                    compression_algs=None,
                    keepalive_interval=options.keepalive,
                    keepalive_count_max=3,
                )
        except TimeoutError:
            raise Unavailable(
                f"ssh: cannot reach {self.where}: no answer within {options.connect_timeout:g}s"
            ) from None
        except asyncssh.HostKeyNotVerifiable:
            raise Unavailable(self._host_key_refused(client.offered)) from None
        except asyncssh.PermissionDenied:
            raise Unavailable(
                f"ssh: {self.where} refused authentication (tried: {_tried(options)})"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise Unavailable(f"ssh: cannot reach {self.where}: {_reason(exc)}") from None
        log.info("ssh: connected to %s", self.where)
        return connection

    def _host_key_refused(self, offered: asyncssh.SSHKey | None) -> str:
        options = self.options
        shown = (
            f"{offered.get_algorithm()} {offered.get_fingerprint('sha256')}"
            if offered
            else "unknown"
        )
        file = options.known_hosts
        port = None if options.port == 22 else options.port
        known: list[Any] = []
        if file.is_file():
            try:
                known = list(
                    asyncssh.match_known_hosts(str(file), options.host, options.host, port)[0]
                )
            except (ValueError, OSError):
                known = []
        if known:
            return (
                f"ssh: host key of {options.host}:{options.port} has CHANGED: it is now "
                f"{shown}, {file} has another; refusing to connect (someone may be posing "
                f"as the host; if it was reinstalled, replace its line in {file})"
            )
        return (
            f"ssh: host key of {options.host}:{options.port} is unknown: {shown} is not "
            f"in {file}; check that fingerprint with the host's owner, then add the key "
            f"(ssh-keyscan -p {options.port} {options.host} >> {file})"
        )

    async def _kill_left_behind(self, connection: asyncssh.SSHClientConnection) -> None:
        groups, self._left_behind = self._left_behind, set()
        script = "; ".join(f"kill -s KILL -- -{group} 2>/dev/null" for group in sorted(groups))
        try:
            await connection.run(script + "; true", check=False)
        except (asyncssh.Error, OSError):
            self._left_behind |= groups

    def lost(self, group: int) -> None:
        """Remember the process group of a task lost with the connection."""
        self._left_behind.add(group)

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            await self._connection.wait_closed()
            self._connection = None

    # --- tasks ----------------------------------------------------------------------------

    def check_spec(self, spec: TaskSpec) -> None:
        """The cwd is the host's: it is checked there, when the task starts."""
        for name in spec.env:
            if not ENV_NAME.match(name):
                raise BadRequest(f"environment variable name not valid for a POSIX shell: {name!r}")

    async def spawn(self, spec: TaskSpec, output: OutputWriter) -> RunningProcess:
        self.check_spec(spec)
        connection = await self.connection()
        marker = "jmp-" + secrets.token_hex(8)
        from ._channels import _TaskSession

        session = _TaskSession(output, marker, from_stream="stdout" if spec.pty else "stderr")
        try:
            _, session = await connection.create_session(
                lambda: session,
                _wrapper(spec, marker),
                encoding=None,
                term_type="xterm-256color" if spec.pty else None,
                term_size=(spec.pty.cols, spec.pty.rows) if spec.pty else None,
                window=WINDOW,
                max_pktsize=PACKET,
            )
        except asyncssh.ChannelOpenError as exc:
            raise Unavailable(
                f"ssh: {self.where} refused a new channel ({_reason(exc)}): it allows only so "
                "many tasks at once on one connection (OpenSSH: MaxSessions in sshd_config, "
                "10 by default)"
            ) from None
        except (asyncssh.Error, OSError) as exc:
            raise Unavailable(f"ssh: {self.where}: cannot open a channel: {_reason(exc)}") from None
        with anyio.move_on_after(self.options.connect_timeout * 3):
            await session.started.wait()
        if not session.started.is_set():
            session.channel.close()
            raise Unavailable(
                f"ssh: {self.where}: the host did not start the command within "
                f"{self.options.connect_timeout * 3:g}s"
            )
        if session.failure == "cwd":
            raise BadRequest(f"working directory does not exist on {self.options.host}: {spec.cwd}")
        if session.failure == "notfound":
            raise SpawnFailed(
                f"command not found on {self.options.host}: {spec.command[0]}",
                details={"errno": "ENOENT", "command": spec.command[0]},
            )
        if session.group is None:
            raise Unavailable(
                f"ssh: {self.where}: the command ended before it started: {session.lost_reason()}"
            )
        if not (spec.stdin or spec.pty) and not session.closed.is_set():
            session.channel.write_eof()
        return SshProcess(self, session, spec)


def _wrapper(spec: TaskSpec, marker: str) -> str:
    """The command line sent to the host: a POSIX ``sh`` script that checks the cwd and
    the command, reports the process group, then becomes the task's command. The
    argv is quoted word by word, so nothing in it is interpreted by a shell."""
    argv = spec.command
    steps = []
    if spec.cwd is not None:
        steps.append(
            f"cd -- {shlex.quote(spec.cwd)} 2>/dev/null || {{ echo {marker}:cwd >&2; exit 1; }}"
        )
    steps.append(
        f"command -v -- {shlex.quote(argv[0])} >/dev/null 2>&1 || "
        f"{{ echo {marker}:notfound >&2; exit 127; }}"
    )
    steps.extend(f"export {name}={shlex.quote(value)}" for name, value in spec.env.items())
    steps.append(f'echo "{marker}:$$" >&2')
    steps.append(f"exec {shlex.join(argv)}" + ("" if spec.stdin or spec.pty else " </dev/null"))
    # The user's login shell runs this line; /bin/sh then runs the script in the same
    # process, whatever that login shell is.
    return "exec /bin/sh -c " + shlex.quote("\n".join(steps))


class SshProcess(RunningProcess):
    """A task running on the host; ``pid`` stays None: the group id is the host's, and
    means nothing on the machine the node server runs on."""

    def __init__(self, driver: SshNodeDriver, session: _TaskSession, spec: TaskSpec) -> None:
        self.driver = driver
        self.session = session
        self.group = session.group
        self.has_input = spec.stdin or spec.pty is not None
        self.pty = spec.pty is not None
        self.input_closed = False

    async def wait(self) -> int:
        session = self.session
        await session.closed.wait()
        if session.exit_signal is not None:
            number = getattr(signal, "SIG" + session.exit_signal, None)
            return -int(number) if number is not None else -1
        if session.exit_status is not None:
            return session.exit_status
        if self.group is not None:
            self.driver.lost(self.group)
        raise ProcessLost(
            f"the connection to {self.driver.where} was lost: {session.lost_reason()}"
        )

    async def terminate(self, grace: float) -> None:
        """SIGTERM to the task's process group on the host, SIGKILL to what is left
        after ``grace`` seconds: one ``sh`` script on a channel of its own."""
        if self.session.closed.is_set() or self.group is None:
            return
        group = self.group
        steps = max(math.ceil(grace / POLL), 1)
        script = (
            f"kill -s TERM -- -{group} 2>/dev/null || exit 0\n"
            "n=0\n"
            f"while kill -s 0 -- -{group} 2>/dev/null; do\n"
            f"  if [ $n -eq {steps} ]; then kill -s KILL -- -{group} 2>/dev/null; fi\n"
            # A killed process takes a moment to go: wait a little for that too.
            f"  if [ $n -ge {steps + 40} ]; then exit 0; fi\n"
            f"  sleep {POLL}; n=$((n+1))\n"
            "done\n"
        )
        command = "exec /bin/sh -c " + shlex.quote(script)
        try:
            connection = await self.driver.connection()
            try:
                await connection.run(command, check=False)
            except asyncssh.ChannelOpenError:
                # The host allows no more channels on this connection (every one runs a
                # task): stop over a connection of its own.
                async with await self.driver.open_connection() as spare:
                    await spare.run(command, check=False)
        except (asyncssh.Error, OSError, Unavailable) as exc:
            log.warning(
                "ssh: cannot stop process group %d on %s: %s", group, self.driver.where, exc
            )

    async def write_input(self, data: bytes) -> None:
        if not self.has_input:
            raise BadRequest("this task has no input: start it with stdin or a terminal")
        if self.session.closed.is_set():
            raise Conflict("the task has exited; it reads no more input")
        if self.input_closed:
            raise BadRequest("the task's input is closed")
        try:
            self.session.channel.write(data)
        except (BrokenPipeError, asyncssh.Error, OSError):
            raise Conflict("the task has exited; it reads no more input") from None
        await self.session.writable.wait()

    async def close_input(self) -> None:
        if not self.has_input or self.input_closed or self.session.closed.is_set():
            self.input_closed = True
            return
        self.input_closed = True
        if self.pty:
            self.session.channel.write(b"\x04")  # the terminal's end-of-file character
        else:
            self.session.channel.write_eof()

    async def resize(self, rows: int, cols: int) -> None:
        if not self.pty:
            raise BadRequest("this task has no terminal to resize")
        if not self.session.closed.is_set():
            self.session.channel.change_terminal_size(cols, rows)


def _is_closed(connection: asyncssh.SSHClientConnection) -> bool:
    return connection.is_closed()


def _auth_methods(options: SshOptions) -> list[str]:
    methods = ["publickey"]
    if options.password_file is not None:
        methods += ["keyboard-interactive", "password"]
    return methods


def _tried(options: SshOptions) -> str:
    keys = ", ".join(str(path) for path in options.key_file) or "the default keys in ~/.ssh"
    tried = [f"publickey with {keys}"]
    if options.agent:
        tried.append("the SSH agent's keys")
    if options.password_file is not None:
        tried.append(f"password from {options.password_file}")
    return "; ".join(tried)


def _read_password(options: SshOptions) -> str:
    path = options.password_file
    assert path is not None
    try:
        return path.read_text().splitlines()[0]
    except (OSError, IndexError) as exc:
        reason = "it is empty" if isinstance(exc, IndexError) else exc.strerror
        raise Unavailable(f"ssh: cannot read the password file {path}: {reason}") from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, asyncssh.Error):
        return exc.reason or type(exc).__name__
    return str(exc) or type(exc).__name__
