"""The serial node driver: tasks run on a board's shell, over its console.

Before a task the driver brings the console to a shell it knows: it wakes the board
(a carriage return, again each second of silence, since bytes typed while the board
boots are lost), answers ``login:`` and ``Password:`` prompts, and, at a shell
prompt, turns echo off, sets a prompt of its own with a random token in it, so
nothing the board prints can pass for it, and defines two functions that print a
task's markers. Each task is then one line::

    __jmp_s TOKEN && { COMMAND
    }; __jmp_e TOKEN $?

which prints ``__JMP_S_TOKEN__`` before the output and ``__JMP_E_TOKEN_CODE__``
after it, with the exit code. The functions' format strings hold ``%s`` where the
token goes, so even an echoed line never contains a marker. A shell that is not the
one set up (rebooted, logged in anew, replaced by an ``exec`` behind the driver's
back) has no ``__jmp_s``: it says so ("__jmp_s: not found"), the ``&&`` keeps the
command from running, and the driver sets that shell up and types the line again.

A console is slow (115200 baud: 87 µs a byte), so a task's line carries only what
the shell does not have yet: the variables that stay the same from task to task
(``JMP_NODE``, ``JMP_SESSION``... see :data:`SHELL_EXPORTS`) are exported in the
board's shell once, at the head of the first line that needs them, and again only
when they change; the task's line sets only its own (``JMP_TASK_ID``, its env).
What the shell holds is forgotten, so that the next line sends everything again,
whenever the driver sets up a shell (a new one, after a boot, a login, a person's
use of the console) and when a line with exports was cut off before its start
marker showed that they ran. A console is one stream: stdout and stderr
arrive merged, as ``stdout``, with the terminal's CR LF turned back into LF.

A task's input is typed on the console too, so what the task did not read would
stay in the board's terminal and go to the shell after it: lines it would run, and
the Ctrl-D that closes the input, which ends the shell. A task started with stdin
therefore ends in two steps: the shell prints a drain marker and reads lines until
the driver, which types no more input once it sees that marker, types a line with
the task's token; then the end marker::

    __jmp_s TOKEN && { COMMAND
    }; __jmp_rc=$?; printf '\\n__JMP_D_%s__\\n' TOKEN;
    while :; do read -r __jmp_in || continue; [ "$__jmp_in" = TOKEN ] && break; done;
    __jmp_e TOKEN $__jmp_rc

Stop (and a timeout) types Ctrl-C; if the shell prompt does not come back within the
grace period, the board is power cycled (when it has a power driver) and the next
task waits for it to boot. Every byte the board prints, between tasks and during
them, goes to the node's transcript (``jmp console --log``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shlex
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import anyio
from jumpstarter import NodeDriver, RunningProcess
from jumpstarter.errors import ConfigError, Conflict, NodeError, SpawnFailed, Unavailable
from jumpstarter.plugins import NodeConsole, OutputWriter, PowerDriver
from jumpstarter_protocol import TaskSpec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .console import Console, PortConsole

log = logging.getLogger(__name__)

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
INBOX_KEEP = 64 * 1024
"""Bytes kept from the console while no task or prompt search reads them."""
CONSOLE_LOG_SIZE = 8 * 1024 * 1024
"""Default bytes of ``console.log`` before it is rotated to ``console.log.1``."""


class ShellOptions(BaseModel):
    """How to reach a shell on the console (the ``options`` table of the node)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(default=r"[#$>] ?$", description="regex matching the end of the shell prompt")
    login: str | None = None
    password: str | None = None
    password_file: Path | None = None
    login_prompt: str = r"login: ?$"
    password_prompt: str = r"[Pp]assword: ?$"
    boot_timeout: float = Field(default=120.0, gt=0, description="seconds to wait for a shell prompt")
    console_log_size: int = Field(
        default=CONSOLE_LOG_SIZE,
        gt=0,
        description="bytes of console.log before it is rotated to console.log.1 (8M, 512K, or a number)",
    )

    @field_validator("console_log_size", mode="before")
    @classmethod
    def _a_size(cls, value: Any) -> Any:
        # "8M" reads better in a config than 8388608.
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", value, re.IGNORECASE)
            if match is None:
                raise ValueError(f"expected bytes such as 8M, 512K or 1048576, got {value!r}")
            return int(match.group(1)) * 1024 ** " KMG".index(match.group(2).upper() or " ")
        return value


class SerialOptions(ShellOptions):
    port: str = Field(description="a device (/dev/ttyUSB0) or a pyserial URL (socket://host:port)")
    baud: int = Field(default=115200, gt=0)


def parse_options(model: type[BaseModel], node: Any) -> Any:
    """``node.options`` validated by ``model``; :class:`ConfigError` naming the key."""
    try:
        return model.model_validate(node.options)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        key = ".".join(str(part) for part in error["loc"])
        raise ConfigError(f"node {node.name!r}: options.{key}: {error['msg']}") from None


class SerialNodeDriver(NodeDriver):
    """Runs tasks on the shell of a board behind a serial console."""

    capabilities = ["shell", "env", "cwd", "timeout", "stdin", "console", "files"]
    options_model: type[ShellOptions] = SerialOptions

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.options = parse_options(self.options_model, node)
        # A start waits for the shell (a boot, a login) up to boot_timeout: clients
        # with a deadline per request are told to wait that long for its reply.
        self.start_timeout = self.options.boot_timeout
        self._password = self.options.password
        if self._password is None and self.options.password_file is not None:
            try:
                self._password = self.options.password_file.expanduser().read_text().strip()
            except OSError as exc:
                raise ConfigError(
                    f"node {node.name!r}: options.password_file: cannot read "
                    f"{self.options.password_file}: {exc.strerror}"
                ) from None
        try:
            self._prompts = [
                (kind, re.compile(pattern.encode()))
                for kind, pattern in (
                    ("login", self.options.login_prompt),
                    ("password", self.options.password_prompt),
                    ("shell", self.options.prompt),
                    # The prompt an earlier node server (another token) left the shell at.
                    ("shell", r"__JMP_P_[0-9a-f]+__ ?$"),
                )
            ]
        except re.error as exc:
            raise ConfigError(f"node {node.name!r}: a prompt is not a valid regex: {exc}") from None
        self.console: NodeConsole | None = _Transcript(self)
        self._power: PowerDriver | None = None
        self._want_on = True
        self._want_on_changed = anyio.Event()
        self._board: Console | None = None
        self._connected = anyio.Event()
        self._inbox = bytearray()
        self._got = anyio.Event()
        self._token = secrets.token_hex(6)
        self._ready = False  # the shell sits at our own prompt, echo off
        # The SHELL_EXPORTS the board's shell has exported, by the driver's lines;
        # None: not known (a shell not set up by us, or one a person has used).
        self._exported: dict[str, str] | None = None
        self._busy: str | None = None
        self._free = anyio.Event()
        self._free.set()
        self._process: SerialProcess | None = None
        from .files import ConsoleFiles

        self.files = ConsoleFiles(self)

    # --- power: the node server sets it; we watch it to tell a wanted off from a crash

    @property  # type: ignore[override]
    def power(self) -> PowerDriver | None:
        return self._power

    @power.setter
    def power(self, power: PowerDriver | None) -> None:
        self._power = None if power is None else _WatchedPower(power, self)

    def _wanted(self, on: bool) -> None:
        # Switching the power resets the board, and a console that stays open (a USB
        # serial adapter, a PTY) does not show it: the shell there is no longer the
        # one set up, and a line typed while the board boots would be lost.
        self._ready = False
        self._exported = None
        self._want_on = on
        self._want_on_changed.set()
        self._want_on_changed = anyio.Event()

    # --- the console's reader, for as long as the node server runs ----------------------

    async def open_console(self) -> Console:
        """Open the board's console (here: the port of ``options.port``)."""
        options: SerialOptions = self.options  # type: ignore[assignment]
        return await anyio.to_thread.run_sync(PortConsole, options.port, options.baud)

    async def serve(self, state_dir: Path) -> None:
        self.console.open(state_dir / "console.log", self.options.console_log_size)  # type: ignore[union-attr]
        failures = 0
        try:
            while True:
                if not self._want_on:
                    await self._want_on_changed.wait()
                    continue
                try:
                    board = await self.open_console()
                except (OSError, NodeError) as exc:
                    # Said once, not once a second while the cable stays out.
                    (log.debug if failures else log.warning)(
                        "node %s: cannot open the console: %s", self.node.name, exc
                    )
                    failures += 1
                    await anyio.sleep(1)
                    continue
                failures = 0
                self._board = board
                self._connected.set()
                try:
                    while data := await board.read():
                        self._feed(data)
                except OSError as exc:
                    log.warning("node %s: console read failed: %s", self.node.name, exc)
                finally:
                    self._board = None
                    self._connected = anyio.Event()
                    self._ready = False
                    with anyio.CancelScope(shield=True):
                        await board.aclose()
                self._board_gone()
                await self._power_back_on()
        finally:
            self.console.close()  # type: ignore[union-attr]

    async def _power_back_on(self) -> None:
        """The console closed while the board should be on (it powered off, crashed
        or rebooted out of its VM): switch it on again."""
        if self._power is None or not self._want_on:
            await anyio.sleep(0.2)  # a port that closes again and again: not in a spin
            return
        try:
            if await self._power.status() != "on":
                log.warning("node %s: the board went off; powering it on", self.node.name)
                await self._power.on()
        except NodeError as exc:
            log.warning("node %s: %s", self.node.name, exc)
            await anyio.sleep(1)

    def _feed(self, data: bytes) -> None:
        self.console.append(data)  # type: ignore[union-attr]
        self._inbox += data
        if self._busy is None and len(self._inbox) > 4 * INBOX_KEEP:
            del self._inbox[:-INBOX_KEEP]
        self.notify()

    def _board_gone(self) -> None:
        if self._process is not None:
            self._process.board_gone()
        self.notify()

    def notify(self) -> None:
        """Wake everyone waiting in :meth:`_more` (bytes came, or the board went)."""
        self._got.set()
        self._got = anyio.Event()

    async def _more(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for bytes (or news); False if none came."""
        got = self._got
        with anyio.move_on_after(timeout):
            await got.wait()
            return True
        return False

    async def type(self, data: bytes) -> None:
        board = self._board
        if board is None:
            raise Unavailable(f"the console of node {self.node.name!r} is not connected")
        try:
            await board.write(data)
        except OSError as exc:
            raise Unavailable(f"cannot write to the console of node {self.node.name!r}: {exc}") from None

    # --- one user of the console at a time ------------------------------------------------

    async def acquire(self, what: str, *, wait: bool) -> None:
        while self._busy is not None:
            if not wait:
                raise Conflict(
                    f"the console of node {self.node.name!r} is busy with {self._busy}; "
                    "one task at a time runs on a console"
                )
            await self._free.wait()
        self._busy = what
        self._free = anyio.Event()

    def release(self) -> None:
        self._busy = None
        self._process = None
        self._free.set()

    # --- bringing the console to our shell ------------------------------------------------

    @property
    def ready_prompt(self) -> bytes:
        return f"__JMP_P_{self._token}__ ".encode()

    async def sync(self) -> None:
        """Bring the console to our shell prompt; :class:`SpawnFailed` when no shell
        answers within ``boot_timeout``."""
        if self._ready and self._board is not None:
            return
        timeout = self.options.boot_timeout
        with anyio.move_on_after(timeout):
            await self._connected.wait()
            await self._find_shell()
            return
        tail = _ANSI.sub(b"", bytes(self._inbox[-120:])).decode(errors="replace")
        raise SpawnFailed(
            f"no shell prompt on the console of node {self.node.name!r} within {timeout:g}s "
            f"(last printed: {tail.strip()[-80:]!r})",
            details={"errno": "EIO"},
        )

    async def _find_shell(self) -> None:
        self._inbox.clear()
        await self.type(b"\r")
        silent = 0
        while True:
            got = await self._more(1.0)
            if not got:
                silent += 1
                # Still nothing: the board may be booting (and losing what we type).
                await self.type(b"\x03\r" if silent % 3 == 0 else b"\r")
                continue
            while await self._more(0.1):  # let the burst end: a prompt is what stays
                pass
            silent = 0
            kind = self._prompt_at_end()
            if kind == "login":
                if not self.options.login:
                    raise SpawnFailed(
                        f"the console of node {self.node.name!r} asks for a login; set options.login",
                        details={"errno": "EACCES"},
                    )
                self._inbox.clear()
                await self.type(self.options.login.encode() + b"\r")
            elif kind == "password":
                if self._password is None:
                    raise SpawnFailed(
                        f"the console of node {self.node.name!r} asks for a password; "
                        "set options.password_file",
                        details={"errno": "EACCES"},
                    )
                self._inbox.clear()
                await self.type(self._password.encode() + b"\r")
            elif kind == "shell" or self._inbox.endswith(self.ready_prompt):
                if await self._set_up_shell():
                    return

    def _prompt_at_end(self) -> str | None:
        text = _ANSI.sub(b"", bytes(self._inbox[-256:])).replace(b"\r", b"")
        for kind, pattern in self._prompts:
            if pattern.search(text):
                return kind
        return None

    async def _set_up_shell(self) -> bool:
        """Echo off, our prompt, no continuation prompt, the marker functions; True
        once our prompt shows."""
        self._inbox.clear()
        self._exported = None  # a shell we did not set up: its variables are not known
        # The '' splits the token from its prefix: an echo of this line is no prompt.
        await self.type(
            b"stty -echo 2>/dev/null; case $PS1 in __JMP_P*) ;; *) __jmp_ps1=$PS1;; esac; "
            b"__jmp_s() { printf '__JMP_S_%s__\\n' \"$1\"; }; "
            b"__jmp_e() { printf '\\n__JMP_E_%s_%d__\\n' \"$1\" \"$2\"; }; "
            b"PS1='__JMP_P''_" + self._token.encode() + b"__ '; PS2=''\r"
        )
        if await self.wait_for(lambda: self._inbox.endswith(self.ready_prompt), 3.0):
            self._ready = True
            self._inbox.clear()
            return True
        return False

    async def wait_for(self, done: Callable[[], bool], timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            while not done():
                if self._board is None:
                    return False
                await self._more(timeout)
            return True
        return False

    async def hand_to_person(self) -> None:
        """Someone types on the console: give the shell its echo and prompt back."""
        # A person may change or unset anything in the shell: the next task's line
        # sets the shell up again and exports everything.
        self._exported = None
        if self._ready:
            self._ready = False
            # ${x-default}: a shell that is not the one set up (it was replaced behind
            # the driver's back) keeps its own prompt rather than an empty one.
            await self.type(b"stty echo 2>/dev/null; PS1=${__jmp_ps1-$PS1}\r")

    # --- tasks ------------------------------------------------------------------------------

    async def spawn(self, spec: TaskSpec, output: OutputWriter) -> RunningProcess:
        await self.acquire("a task", wait=False)
        try:
            process = SerialProcess(self, output)
            self._process = process

            async def begin() -> None:
                await self.sync()
                before, exported = self._exports(spec.env or {})
                command = shell_command(spec, kept=exported)
                await process.start(command, drain=spec.stdin, before=before, exported=exported)

            await begin()
            process.again = begin
        except BaseException:
            self.release()
            raise
        return process

    def _exports(self, env: dict[str, str]) -> tuple[str, dict[str, str]]:
        """What a task's line starts with so that the shell's exported
        :data:`SHELL_EXPORTS` are those of ``env``, and what they are after it."""
        want = {name: env[name] for name in SHELL_EXPORTS if name in env}
        have = self._exported
        changed = [name for name in want if have is None or have.get(name) != want[name]]
        gone = [name for name in SHELL_EXPORTS if name not in want and (have is None or name in have)]
        before = ""
        if changed:
            before += "export " + " ".join(f"{name}={shlex.quote(want[name])}" for name in changed) + "; "
        if gone:
            before += "unset " + " ".join(gone) + "; "
        return before, want

    async def capture(self, command: str, timeout: float = 60.0) -> tuple[int, bytes]:
        """Run ``command`` on the board's shell as a task runs, waiting for the console
        if it is busy: its exit code and output (for file access)."""
        await self.acquire("a file transfer", wait=True)
        try:
            collected = _Collect()
            process = SerialProcess(self, collected, owns_console=False)
            self._process = process

            async def begin() -> None:
                await self.sync()
                await process.start(command)

            await begin()
            process.again = begin
            with anyio.move_on_after(timeout) as scope:
                code = await process.wait()
            if scope.cancelled_caught:
                await process.terminate(2.0)
                raise OSError(5, f"{command.split()[0]} on node {self.node.name!r} took over {timeout:g}s")
            if process.message:
                raise OSError(5, process.message)
            return code, bytes(collected.data)
        finally:
            self.release()

    async def aclose(self) -> None:
        if self._power is not None:
            await self._power.aclose()


_STATELESS_BUILTINS = frozenset({"true", "false", "echo", "printf", "test", "["})
"""Builtins of every board shell (ash, hush, dash, bash, mksh) that change nothing of
the shell: with variables given before them they need no subshell, which costs the
board a fork (most of a `true`'s time through a node, whose tasks always get the
JMP_* variables)."""


SHELL_EXPORTS = ("JMP_NODE", "JMP_NODE_URL", "JMP_NODE_TRANSPORT", "JMP_SESSION", "JMP_SESSION_ID")
"""The task variables that are the same for every task of a node, or of a session:
exported in the board's shell when they change, not typed on every task's line."""


def shell_command(spec: TaskSpec, kept: Collection[str] = ()) -> str:
    """The shell text that runs ``spec`` on the board's shell; the variables named in
    ``kept`` are left out of it (the shell has them exported already)."""
    command = spec.shell if spec.shell is not None else shlex.join(spec.argv or [])
    if spec.shell is not None and not spec.env and spec.cwd is None:
        # A shell string runs in a subshell: its cd, exit or trap stay its own (with
        # env or cwd, the subshell below is that one).
        command = f"( {command}\n)"
    env = {k: v for k, v in (spec.env or {}).items() if k not in kept}
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    if spec.env and spec.cwd is None and spec.argv and spec.argv[0] in _STATELESS_BUILTINS:
        # Assignments before a regular builtin are for that command alone (POSIX).
        return f"{assignments} {command}" if assignments else command
    if assignments:
        command = f"export {assignments}; {command}"
    if spec.cwd is not None:
        command = f"cd {shlex.quote(spec.cwd)} || exit 1; {command}"
    if spec.env or spec.cwd is not None:
        # env and cwd for this task only; and a task with env (every task of a node)
        # never runs in the shell itself, whose exports the driver keeps track of.
        command = f"( {command}\n)"
    return command


class _Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, stream: str, data: bytes) -> None:
        self.data += data


class SerialProcess(RunningProcess):
    """One task on the board's shell, from its start marker to its end marker."""

    def __init__(self, driver: SerialNodeDriver, output: Any, *, owns_console: bool = True) -> None:
        self.driver = driver
        self.output = output
        self.owns_console = owns_console
        # 32 random bits: a task's output never holds its own markers by chance, and
        # each byte of a token costs the line four times (typed twice, printed twice).
        self.token = secrets.token_hex(4)
        self.start_marker = f"__JMP_S_{self.token}__".encode()
        self.end_marker = f"__JMP_E_{self.token}_".encode()
        self.drain_marker = f"__JMP_D_{self.token}__".encode()
        self.message: str | None = None
        self._exit: int | None = None
        self._stopping = False
        self._input_closed = False
        self._drain = False  # the task has input: its line ends with a drain
        self._output_done = False  # the drain marker came: what follows is not output
        self._input_ended = False  # the drain's last line was typed: no more input
        self._input_lock = anyio.Lock()  # input, then that line, in that order
        self._exported: dict[str, str] | None = None  # the shell's exports once the line runs
        # Sets the shell up and types the line again, once: for a shell that turns
        # out not to be the one set up (see wait).
        self.again: Callable[[], Awaitable[None]] | None = None

    async def start(
        self, command: str, *, drain: bool = False, before: str = "", exported: dict[str, str] | None = None
    ) -> None:
        """Type the task's line. Not waiting for its start marker here lets the node
        server record the start while the board runs it; :meth:`wait` finds it.

        ``drain``: the task gets input typed on the console; its line ends by
        reading and dropping what the task left unread (see the module's doc).

        ``before``: shell text run ahead of the start marker, in the shell itself (the
        exports of :data:`SHELL_EXPORTS`), after which they are ``exported``."""
        driver = self.driver
        driver._inbox.clear()
        if before:
            # Not known until the start marker shows that ``before`` ran (a Ctrl-C
            # may cut the line off ahead of it).
            driver._exported = None
            self._exported = exported
        self._drain = drain
        code, discard = "$?", ""
        if drain:
            # `|| continue`: a Ctrl-D the task left is an EOF for this read, not the end.
            code, discard = "$__jmp_rc", (
                f"__jmp_rc=$?; printf '\\n__JMP_D_%s__\\n' {self.token}; "
                "while :; do read -r __jmp_in || continue; "
                f'[ "$__jmp_in" = {self.token} ] && break; done; '
            )
        # `&&`: in a shell without the marker functions the command does not run.
        line = f"{before}__jmp_s {self.token} && {{ {command}\n}}; {discard}__jmp_e {self.token} {code}\r"
        await driver.type(line.encode())

    def board_gone(self) -> None:
        if self._exit is None:
            self._exit = -1
            self.message = self.message or (
                "the board's console closed while the task ran (it powered off or rebooted)"
            )

    async def wait(self) -> int:
        driver = self.driver
        inbox = driver._inbox
        started = False  # what comes before the start marker's line end is not output
        hold = len(self.end_marker) + 24
        try:
            while self._exit is None:
                if not started:
                    at = inbox.find(self.start_marker)
                    newline = inbox.find(b"\n", at) if at >= 0 else -1
                    if newline >= 0:
                        del inbox[: newline + 1]
                        started = True
                        if self._exported is not None:
                            driver._exported = self._exported
                    elif at < 0 and driver.ready_prompt in inbox:  # Ctrl-C before it began
                        self._exit = 130
                    elif at < 0 and _NO_MARKER_FUNCTION in inbox:
                        await self._set_up_again()
                        continue
                if started and inbox:
                    self._take_output(inbox, hold)
                if self._output_done and not self._input_ended and self._exit is None:
                    await self._end_input()
                if self._exit is None:
                    await driver._more(3600)
            if self._exit is not None and self.message is None and started:
                # Back at our prompt: the console is ready for the next task.
                await driver.wait_for(lambda: inbox.endswith(driver.ready_prompt), 5.0)
                driver._ready = inbox.endswith(driver.ready_prompt)
                inbox.clear()
            return self._exit
        finally:
            if self.owns_console:
                driver.release()

    async def _set_up_again(self) -> None:
        """The shell has no ``__jmp_s`` (every shell's "not found" names it): it is
        not the one the driver set up (the board rebooted, a new login, an ``exec``
        behind the driver's back), and the command did not run. Set the new one up
        and type the line again, once."""
        driver = self.driver
        driver._ready = False
        driver._exported = None
        again, self.again = self.again, None
        if again is not None:
            try:
                await again()
                return
            except NodeError as exc:
                self.message = str(exc)
        self.message = self.message or (
            f"the shell on the console of node {driver.node.name!r} was not the one set up "
            "(did the board reboot?); the task did not run"
        )
        self._exit = -1

    async def _end_input(self) -> None:
        """The task ended and the shell drains: type the drain's last line, after
        any input on its way (a CR first ends a line the task left half read)."""
        async with self._input_lock:
            self._input_ended = True
            with contextlib.suppress(NodeError):  # the console went: board_gone ends the task
                await self.driver.type(b"\r" + self.token.encode() + b"\r")

    def _take_output(self, inbox: bytearray, hold: int) -> None:
        if self._drain and not self._output_done:
            at = inbox.find(self.drain_marker)
            if at >= 0:  # the output ends here, as at an end marker
                self._emit(_without_newline(bytes(inbox[:at])))
                del inbox[: at + len(self.drain_marker)]
                self._output_done = True
                return
        end = inbox.find(self.end_marker)
        if end >= 0:
            tail = inbox[end + len(self.end_marker) :]
            match = re.match(rb"(\d+)__", tail)
            if match is None:
                return  # the code is still on its way
            if not self._output_done:
                self._emit(_without_newline(bytes(inbox[:end])))
            del inbox[: end + len(self.end_marker) + match.end()]
            self._exit = int(match.group(1))
            return
        prompt = inbox.find(self.driver.ready_prompt)
        if prompt >= 0:  # Ctrl-C ended the whole line: no end marker comes
            body = bytes(inbox[:prompt])
            # The shell starts a new line after ^C: its newline, not the task's.
            if not self._output_done:
                self._emit(body[:-2] if body.endswith(b"\r\n") else body)
            del inbox[:prompt]
            self._exit = 130
            return
        if self._output_done:
            return  # the drain prints nothing: only the end marker is awaited
        cut = len(inbox) - hold
        if cut > 0:
            if inbox[cut - 1] == 0x0D:  # keep a CR whose LF may come next
                cut -= 1
            self._emit(bytes(inbox[:cut]))
            del inbox[:cut]

    def _emit(self, data: bytes) -> None:
        if data:
            self.output.write("stdout", data.replace(b"\r\n", b"\n"))

    async def terminate(self, grace: float) -> None:
        """Ctrl-C; a power cycle if the shell prompt is not back within ``grace``."""
        driver = self.driver
        if self._exit is not None or self._stopping:
            return
        self._stopping = True
        try:
            await driver.type(b"\x03")
        except NodeError:
            pass
        if await driver.wait_for(lambda: self._exit is not None or self._back_at_prompt(), grace):
            return
        if self._exit is not None:
            return
        driver._ready = False
        power = driver.power
        if power is None:
            self.message = (
                f"the shell did not answer Ctrl-C within {grace:g}s and node "
                f"{driver.node.name!r} has no power control to reset the board"
            )
        else:
            self.message = f"the shell did not answer Ctrl-C within {grace:g}s: the board was power cycled"
            try:
                await power.cycle()
            except NodeError as exc:
                self.message += f" (the power cycle failed: {exc})"
        self._exit = -9
        driver.notify()

    def _back_at_prompt(self) -> bool:
        return self.driver.ready_prompt in self.driver._inbox

    async def write_input(self, data: bytes) -> None:
        async with self._input_lock:
            if self._exit is not None or self._input_ended:
                raise Conflict("the task has ended")
            if self._input_closed:
                from jumpstarter.errors import BadRequest

                raise BadRequest("the task's input was closed")
            await self.driver.type(data)

    async def close_input(self) -> None:
        async with self._input_lock:
            if not self._input_closed and self._exit is None and not self._input_ended:
                self._input_closed = True
                await self.driver.type(b"\x04")


_NO_MARKER_FUNCTION = b"__jmp_s: "
"""What a shell without the driver's functions prints for the line's ``__jmp_s``
("sh: __jmp_s: not found", "bash: __jmp_s: command not found"); an echo of the line
has ``__jmp_s`` and a space."""


def _without_newline(body: bytes) -> bytes:
    """``body`` less the newline a marker's printf starts with."""
    if body.endswith(b"\r\n"):
        return body[:-2]
    return body[:-1] if body.endswith(b"\n") else body


class _WatchedPower(PowerDriver):
    """The node's power driver, telling the console's reader whether the board is
    meant to be on (so a board switched off stays off, one that died comes back)."""

    def __init__(self, inner: PowerDriver, driver: SerialNodeDriver) -> None:
        self.inner = inner
        self.driver = driver
        self.pause = inner.pause
        self.options = inner.options

    async def on(self) -> None:
        await self.inner.on()
        self.driver._wanted(True)

    async def off(self) -> None:
        self.driver._wanted(False)
        await self.inner.off()

    async def cycle(self) -> None:
        self.driver._wanted(False)
        try:
            await self.inner.cycle()
        finally:
            self.driver._wanted(True)

    async def status(self) -> Any:
        return await self.inner.status()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Transcript(NodeConsole):
    """Every byte the board printed, in files on the node, read by offset; typing
    goes to the board.

    ``console.log`` in the node's state directory grows to ``options.console_log_size``
    bytes, then becomes ``console.log.1`` (the one before is dropped) and a new
    ``console.log`` begins: the node keeps between one and two limits' worth, the
    older file first. Offsets count every byte printed since the node server started
    (plus what the files held then), so they stay valid across a rotation; an offset
    whose bytes were dropped reads from the oldest byte kept."""

    def __init__(self, driver: SerialNodeDriver) -> None:
        self.driver = driver
        self.fd: int | None = None  # console.log
        self.old_fd: int | None = None  # console.log.1
        self.path: Path | None = None
        self.max_size = CONSOLE_LOG_SIZE
        self.start = 0  # the offset of the oldest byte kept
        self.old_size = 0  # bytes in console.log.1
        self.size = 0  # the offset after the newest byte
        self._stuck = False  # the last rotation failed
        self._grew = anyio.Event()

    def open(self, path: Path, max_size: int = CONSOLE_LOG_SIZE) -> None:
        self.path, self.max_size = path, max_size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.old_fd = os.open(self._older(), os.O_RDONLY)
            self.old_size = os.fstat(self.old_fd).st_size
        except FileNotFoundError:
            self.old_fd, self.old_size = None, 0
        self.start = 0
        self.size = self.old_size + os.fstat(self.fd).st_size

    def _older(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".1")

    def close(self) -> None:
        for fd in (self.fd, self.old_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.old_fd = None

    def append(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = self.max_size - (self.size - self.start - self.old_size)
            if self.fd is not None and room <= 0 and not self._rotate():
                self._write(view)  # cannot rotate: the rest goes to the one file
                break
            # A read can bring more than the file's room: split it at the limit, so
            # each console.log.1 holds exactly max_size bytes.
            part = view[: max(room, 0) or self.max_size] if self.fd is not None else view
            self._write(part)
            view = view[len(part) :]
        self._grew.set()
        self._grew = anyio.Event()

    def _write(self, data: memoryview) -> None:
        if self.fd is not None:
            os.write(self.fd, data)
        self.size += len(data)

    def _rotate(self) -> bool:
        assert self.path is not None and self.fd is not None
        try:
            os.replace(self.path, self._older())
            fresh = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o600)
        except OSError as exc:  # a full disk: keep appending to the one file
            if not self._stuck:  # said once, not once a read
                log.warning("node %s: cannot rotate %s: %s", self.driver.node.name, self.path, exc.strerror)
            self._stuck = True
            return False
        self._stuck = False
        if self.old_fd is not None:
            os.close(self.old_fd)
        self.start += self.old_size
        self.old_fd, self.fd = self.fd, fresh  # the fd still reads the renamed file
        self.old_size = self.size - self.start
        return True

    async def read(self, offset: int | None, limit: int, wait: float) -> tuple[int, bytes, int]:
        if offset is None or offset > self.size:
            offset = self.size
        if offset == self.size and wait > 0:
            with anyio.move_on_after(wait):
                await self._grew.wait()
        offset = max(offset, self.start)  # dropped by a rotation (maybe while we waited)
        if self.fd is None or offset >= self.size:
            return offset, b"", self.size
        at = offset - self.start
        if at < self.old_size:
            assert self.old_fd is not None
            data = os.pread(self.old_fd, min(limit, self.old_size - at), at)
        else:
            data = os.pread(self.fd, min(limit, self.size - offset), at - self.old_size)
        return offset, data, self.size

    async def write(self, data: bytes) -> None:
        driver = self.driver
        if driver._busy is not None:
            raise Conflict(
                f"{driver._busy} runs on the console of node {driver.node.name!r}; "
                "it is read-only until that ends"
            )
        await driver.hand_to_person()
        await driver.type(data)

    @property
    def busy(self) -> str | None:
        return self.driver._busy
