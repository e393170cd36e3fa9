"""What every ``jmp`` command shares: the lazy group, the state, error handling."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from importlib import import_module
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from jumpstarter.protocol import JumpStarterProtocol

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_NODE = 5
EXIT_TIMEOUT = 124
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND_COMMAND = 127


class JmpGroup(click.Group):
    """A group whose built-in commands are imported on first use and whose plugin
    commands come from the ``jmp_register_commands`` hook.

    ``commands`` maps a name to ``("module:attribute", "short help")``: the short help
    is what ``--help`` lists, so listing imports nothing."""

    def __init__(self, *args: Any, commands: dict[str, tuple[str, str]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = {name: target for name, (target, _) in (commands or {}).items()}
        # Not ``short_help``: click reads that attribute as this group's own help line.
        self.lazy_help = {name: text for name, (_, text) in (commands or {}).items()}
        self._plugins_loaded = False

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """As click's, but a usage error is one line, like every other error:
        ``jmp: error: <what is wrong> (try 'jmp run --help')``, exit code 2."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        argv = kwargs.get("args", args[0] if args else None)
        for arg in sys.argv[1:] if argv is None else argv:
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                # A byte that is not UTF-8 (os.fsdecode made it a lone surrogate): JSON
                # and the store cannot carry it, so it is refused before anything is done.
                shown = _shown_bytes(arg)
                click.echo(f"jmp: error: argument '{shown}' is not valid UTF-8 text", err=True)
                sys.exit(EXIT_USAGE)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:  # `jmp task`: the help
            click.echo(exc.format_message())
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "jmp"
            message = one_line(" ".join(exc.format_message().split()))  # click may wrap a choice list
            click.echo(f"jmp: error: {message} (try '{where} --help')", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            # (A closed pipe, `jmp run … | head`, click already ends quietly.)
            if exc.errno is None:
                raise
            click.echo(f"jmp: error: cannot write output: {exc.strerror}", err=True)
            sys.exit(EXIT_ERROR)
        except click.ClickException as exc:
            click.echo(f"jmp: error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("jmp: aborted", err=True)
            sys.exit(EXIT_ERROR)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        """As click's, but a reader that went away (``jmp … | head``) ends the command
        quietly with exit 0, as ``cat`` under ``pipefail`` would want: the output was
        wanted only up to there."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            from ._output import quiet_stdout

            quiet_stdout()
            raise click.exceptions.Exit(0) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.commands:
                command = self.commands[name]
                if command.hidden:
                    continue
                rows.append((name, command.get_short_help_str(formatter.width - 6 - len(name))))
            else:
                rows.append((name, self.lazy_help[name]))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands(ctx)
        return sorted({*self.lazy, *self.commands})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        if name in self.lazy:
            module, _, attr = self.lazy[name].partition(":")
            command = getattr(import_module(module), attr)
            self.add_command(command, name)
            return command
        self._load_plugin_commands(ctx)
        return self.commands.get(name)

    def _load_plugin_commands(self, ctx: click.Context) -> None:
        if self._plugins_loaded or ctx.parent is not None:  # plugins add top-level commands only
            return
        self._plugins_loaded = True
        try:
            from jumpstarter.plugins.manager import get_plugin_manager

            plugins = get_plugin_manager()
        except Exception as exc:  # jmp --help must work with a broken plugin installed
            click.echo(f"jmp: warning: plugins not loaded: {exc}", err=True)
            return
        plugins.hook.jmp_register_commands(cli=self)


def _shown_bytes(arg: str) -> str:
    """``arg`` with what is not UTF-8 shown as escapes: ``bad\\xff``."""
    try:
        raw = arg.encode("utf-8", "surrogateescape")  # the bytes the user typed
    except UnicodeEncodeError:
        return arg.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return ascii(raw)[2:-1]


class State:
    """Shared by the commands of one ``jmp`` call."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._protocol: JumpStarterProtocol | None = None

    @property
    def protocol(self) -> JumpStarterProtocol:
        if self._protocol is None:
            from jumpstarter.protocol import JumpStarterProtocol

            self._protocol = JumpStarterProtocol(config_path=self.config_path)
            for info in self._protocol.plugins.failed:
                click.echo(f"jmp: warning: plugin {info.name!r} failed to load: {info.error}", err=True)
            for line in self._protocol.plugins.warnings:
                click.echo(f"jmp: warning: {line}", err=True)
        return self._protocol


def exit_code_for(exc: BaseException) -> int:
    from jumpstarter import errors
    from jumpstarter.config import UnknownNode

    if isinstance(exc, errors.SpawnFailed):
        return EXIT_NOT_FOUND_COMMAND if exc.details.get("errno") == "ENOENT" else EXIT_CANNOT_EXECUTE
    if isinstance(exc, errors.NotFound | UnknownNode):
        return EXIT_NOT_FOUND
    if isinstance(exc, errors.Conflict):
        return EXIT_CONFLICT
    if isinstance(exc, errors.BadRequest):
        return EXIT_USAGE
    if isinstance(exc, errors.NodeError | errors.TransportError | errors.ProtocolError):
        return EXIT_NODE
    return EXIT_ERROR


def fail(message: str, code: int = EXIT_ERROR) -> None:
    click.echo(f"jmp: error: {one_line(message)}", err=True)
    sys.exit(code)


def one_line(message: str) -> str:
    """``message`` as one line a terminal shows as it is: control characters (a
    newline, an escape sequence from a name the user gave) escaped."""
    from ._output import printable

    return printable(message)


def require_named_store(state: State, node: str | None) -> None:
    """Raise :class:`NotFound` when the local node's SQLite store was named (config
    file or ``JMP_STORE``) and is not there: a command that only reads would create
    it empty and answer from it, and a mistyped path would pass for "no results"."""
    from pathlib import Path

    from jumpstarter.errors import NotFound

    config = state.protocol.config
    store = config.store
    name = node or config.default_node
    entry = config.nodes.get(name)
    on_this_machine = name == "local" if entry is None else config.is_complete(entry) and entry.transport == "local"
    if store is None or not on_this_machine:
        return  # the default store, which no run has made yet, or another machine's
    if "://" in store and not store.startswith("sqlite:///"):
        return  # PostgreSQL: the server says what it has
    path = Path(store.removeprefix("sqlite:///"))
    if not path.exists():
        raise NotFound(f"no store at {path} (named by JMP_STORE or the config file): nothing was recorded there")


def handle_errors(fn: F) -> F:
    """Turn Jumpstarter errors into one line on stderr and a documented exit code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from jumpstarter.errors import JumpstarterError

        try:
            return fn(*args, **kwargs)
        except JumpstarterError as exc:
            fail(str(exc), exit_code_for(exc))
        except BaseExceptionGroup as group:
            # An error raised inside a task group (say, the node went away while
            # output streamed) arrives wrapped; one error reads as itself.
            from jumpstarter.errors import sole_error

            exc = sole_error(group)
            if isinstance(exc, JumpstarterError):
                fail(str(exc), exit_code_for(exc))
            if exc is group:
                raise
            raise exc from None

    return wrapper  # type: ignore[return-value]


def parse_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """``K=V`` options to a dict; a usage error names the bad one."""
    pairs = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected K=V, got {value!r}", param_hint=option)
        pairs[key] = val
    return pairs


def make_spec(command: tuple[str, ...], env: tuple[str, ...], cwd: str | None, timeout: float | None,
              name: str | None, label: tuple[str, ...], shell: bool,
              grace: float | None = None) -> tuple[list[str] | None, dict[str, Any]]:
    """The argv and task spec fields from the options ``run`` and ``task`` share."""
    spec: dict[str, Any] = {
        "env": parse_pairs(env, "--env"),
        "labels": parse_pairs(label, "--label"),
        "cwd": cwd,
        "timeout": timeout,
        "name": name,
    }
    if grace is not None:  # the timeout stops the task with it (SIGTERM, then SIGKILL)
        spec["grace"] = grace
    if shell:
        spec["shell"] = " ".join(command)
        return None, spec
    return list(command), spec


def task_exit_code(state: str, exit_code: int | None) -> int:
    """The exit code of ``jmp run``/``wait`` for a finished task."""
    if state == "timed_out":
        return EXIT_TIMEOUT
    if exit_code is None:
        return EXIT_ERROR
    if exit_code < 0:
        return 128 - exit_code
    return exit_code


def node_of_task(state: State, task_id: str) -> str | None:
    """The node that ran ``task_id``, as this machine's store of record knows it (a
    shared store knows every node's tasks); None when the store has no such task or
    there is no store yet."""
    from pathlib import Path

    import anyio

    from jumpstarter.errors import NotFound
    from jumpstarter.store.base import open_store

    config = state.protocol.config
    url = config.store_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None  # nothing ran here yet; opening it would make it

    async def main() -> str | None:
        store = open_store(url)
        await store.open()
        try:
            return (await store.get_task(task_id)).node
        except NotFound:
            return None
        finally:
            await store.aclose()

    return anyio.run(main)


def call_task_node(
    state: State,
    task_id: str,
    fn: Callable[[Any], Any],
    *,
    node: str | None,
    what: str = "task {id}",
    session: str = "cli",
    lease: bool = False,
) -> Any:
    """:func:`call_node` on the node that has task ``task_id``: ``node`` when given,
    else the node the store says ran it, else the default node. A node that is
    offline or cannot be reached is one error naming the task and the node
    (``what``: what is there, e.g. ``the output of task {id}``)."""
    from jumpstarter.config import UnknownNode
    from jumpstarter.errors import NodeOffline, NotFound, TransportError

    ran_on = node_of_task(state, task_id) if node is None else None
    target = node or ran_on
    subject = what.format(id=task_id)
    try:
        return call_node(state, fn, node=target, session=session, lease=lease)
    except NodeOffline as exc:
        raise TransportError(f"{subject} is on node {exc.node!r}, {exc.offline}") from None
    except UnknownNode:
        if ran_on is None:
            raise
        raise NotFound(
            f"task {task_id} ran on node {ran_on!r}, which neither the config nor the shared registry describes"
        ) from None
    except TransportError as exc:
        if target is None:
            raise
        raise TransportError(f"{subject} is on node {target!r}, which cannot be reached: {exc}") from None


def call_node(
    state: State,
    fn: Callable[[Any], Any],
    *,
    node: str | None = None,
    session: str = "cli",
    lease: bool = False,
    writes: bool = False,
) -> Any:
    """Connect to ``node`` in a session named ``session`` and return ``await fn(node)``.

    ``lease=False`` is enough to read status, output and results; commands that start
    or stop tasks take the lease. A command that neither leases nor ``writes`` (adds
    results) refuses a store named in the config or ``JMP_STORE`` that does not exist."""
    import anyio

    if not (lease or writes):
        require_named_store(state, node)

    async def main() -> Any:
        async with state.protocol.create_async_session(session) as s:
            return await fn(await s.connect(node, lease=lease))

    return anyio.run(main)
