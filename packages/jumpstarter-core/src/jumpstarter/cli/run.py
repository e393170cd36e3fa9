"""``jmp run``: run one command on a node, stream its output, exit with its code."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import click

from ._base import handle_errors, make_spec, parse_pairs, task_exit_code
from ._complete import complete_node, complete_session
from ._params import Seconds

EXIT_PIPE = 128 + signal.SIGPIPE
"""``jmp run``'s exit code when its output's reader went away."""
WAIT_FOREVER = 10 * 365 * 86400.0
"""What ``--wait`` without SECONDS means."""


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("--node", shell_complete=complete_node, help="Node to run on (default: the config's default_node, 'local').")
@click.option("-s", "--session", default="run", shell_complete=complete_session, show_default=True, help="Session name.")
@click.option("--endpoint", metavar="URL",
              help="Reach the node at grpc://HOST:PORT (or grpcs:// for TLS) instead of through the config.")
@click.option("--token-file", type=click.Path(dir_okay=False), help="File holding the node's token (with --endpoint).")
@click.option("--tls-ca", type=click.Path(dir_okay=False),
              help="CA certificate the node's is signed by (with --endpoint; default: the system's).")
@click.option("--select", metavar="K=V[,K=V...]",
              help="Lease any free node with these labels from the shared registry (a postgresql:// store).")
@click.option("--duration", type=Seconds(), metavar="SECONDS", help="End the lease after SECONDS.")
@click.option("--wait", type=Seconds(), is_flag=False, flag_value=WAIT_FOREVER, metavar="[SECONDS]",
              help="When another session holds the node, wait in line for it (up to SECONDS) instead of failing.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop after SECONDS; exit 124.")
@click.option("-n", "--no-stdin", is_flag=True, help="Give the task /dev/null as stdin instead of jmp's own.")
@click.option("-i", "--interactive", is_flag=True,
              help="Forward jmp's stdin to the task (the default; so that -it reads as with ssh and docker).")
@click.option("-t", "--tty", is_flag=True,
              help="Run the task on a terminal (a PTY) on the node, with jmp's terminal in raw mode.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable (repeatable).")
@click.option("--cwd", help="Working directory of the task, on the node.")
@click.option("--name", help="A name for the task.")
@click.option("-l", "--label", multiple=True, metavar="K=V", help="Label the task (repeatable).")
@click.option("--shell", is_flag=True, help="Run CMD as one string through /bin/sh -c.")
@click.option("--grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when stopping (Ctrl-C or --timeout).")
@click.option("--put", "puts", multiple=True, metavar="LOCAL[:REMOTE]",
              help="Put a local file (or directory) on the node before the task; REMOTE is relative to the "
              "task's --cwd (default: the file's name there). Repeatable.")
@click.option("--get", "gets", multiple=True, metavar="PATTERN",
              help="After the task, whatever its outcome, fetch the node's files matching PATTERN (a glob, "
              "relative to the task's --cwd) into ./artifacts/TASK_ID/ and record them as its artifacts. "
              "Repeatable.")
@click.option("--get-to", type=click.Path(file_okay=False), metavar="DIR",
              help="Put what --get and --junit fetch in DIR instead of ./artifacts/TASK_ID/.")
@click.option("--junit", metavar="PATH",
              help="After the task, fetch the JUnit XML file PATH from the node and import it as the task's results.")
@click.option("--id-file", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Write the task's id to FILE as soon as the task exists.")
@click.option("-q", "--quiet", is_flag=True, help="Do not say which task ran (on a terminal's stderr).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
@handle_errors
def run(state, node, session, endpoint, token_file, tls_ca, select, duration, wait, timeout, no_stdin, interactive,
        tty, env, cwd, name, label, shell, grace, puts, gets, get_to, junit, id_file, quiet, command) -> None:
    """Run COMMAND on a node and stream its output.

    stdout and stderr of the task go to jmp's stdout and stderr as they come. jmp
    exits with the task's exit code (124 on timeout, 127 if the command does not
    exist). Ctrl-C, SIGTERM or SIGHUP (the terminal or ssh connection closed) stops
    the task (SIGTERM to its process group, SIGKILL after --grace seconds); a second
    one kills it at once.

    On a terminal, jmp says on stderr which task it ran ('jmp: task ID on node N';
    -q: not); elsewhere stderr carries the task's own, untouched. --id-file FILE
    gets the id as soon as the task exists, for 'jmp task logs|stop ID' or
    'jmp result import --task ID'.

    jmp's stdin goes to the task, and its end reaches the task as EOF, as with ssh;
    -n gives the task /dev/null instead.

    -t runs the task on a terminal of the node (for shells, editors, python3): jmp's
    terminal is put in raw mode and restored when jmp exits, its size follows
    yours, and every key goes to the program, Ctrl-C included (it interrupts what
    runs there, as on any terminal, instead of making jmp stop the task); Ctrl-D
    or `exit` ends a shell. Output arrives as one stream.

    \b
    Examples:
      jmp run -- pytest -q
      tar c src | jmp run --node lab1 -- tar x -C /tmp
      jmp run -it --node lab1 -- python3
      jmp run --timeout 60 --env BOARD=rpi4 -- ./flash.sh image.bin
      jmp run --shell -- 'make -j2 && ./run-tests'
      jmp run --endpoint grpcs://lab1.example:7100 --token-file lab1.token -- ./flash.sh
      jmp run --select board=rpi4,site=lab2 --wait 600 -- ./flash.sh
      jmp run --node lab1 --put fw.bin --get 'logs/*.txt' --junit junit.xml -- ./flash-and-test.sh

    Files: --put copies before the task starts (a missing local file fails before
    anything runs); --get and --junit fetch after it ends, also when it failed, into
    ./artifacts/TASK_ID/ (or --get-to DIR). 'jmp task artifacts TASK_ID' lists them
    later and 'jmp task get TASK_ID PATH' fetches one again.
    """
    selector = None
    if select is not None:
        if node is not None or endpoint is not None:
            raise click.UsageError("--select picks the node: give it without --node and --endpoint")
        selector = parse_pairs(tuple(part for part in select.split(",") if part), "--select")
        if not selector:
            raise click.BadParameter("expected K=V[,K=V...]", param_hint="--select")
    if endpoint is not None:
        node = endpoint_node(state.protocol, endpoint, node, token_file, tls_ca)
    elif token_file is not None or tls_ca is not None:
        raise click.UsageError("--token-file and --tls-ca go with --endpoint (a configured node has them in its config)")
    if tty and no_stdin:
        raise click.UsageError("-t reads the terminal on stdin: give it without -n")
    if tty and not os.isatty(0):
        raise click.UsageError("-t needs a terminal, and stdin is not one (leave -t out to pipe input)")
    argv, spec = make_spec(command, env, cwd, timeout, name, label, shell, grace)
    files = TaskFiles.from_options(puts, gets, get_to, junit, cwd)
    import anyio

    connect = {"wait": wait, "duration": duration, "select": selector}
    announce = _announcer(id_file, quiet)
    code = anyio.run(
        _run, state.protocol, node, session, argv, spec, grace, connect, files, announce, not no_stdin, tty
    )
    sys.exit(code)


def _announcer(id_file: str | None, quiet: bool):
    """What to do once the task exists: write its id to ``id_file`` (made now, so a
    path that cannot be written fails before anything runs), and say which task it
    is on a terminal's stderr."""
    import os

    if id_file is not None:
        try:
            with open(id_file, "w"):
                pass
        except OSError as exc:
            raise click.BadParameter(f"cannot write {id_file}: {exc.strerror}", param_hint="--id-file") from None
    say = not quiet and sys.stderr.isatty()

    def announce(task_id: str, node: str) -> None:
        if id_file is not None:
            scratch = f"{id_file}.{os.getpid()}"
            with open(scratch, "w") as f:
                f.write(task_id + "\n")
            os.replace(scratch, id_file)  # a reader never sees half an id
        if say:
            click.echo(f"jmp: task {task_id} on node {node}", err=True)

    return announce


def endpoint_node(protocol, endpoint: str, name: str | None, token_file: str | None, tls_ca: str | None) -> str:
    """Add the node at ``endpoint`` to ``protocol``'s config (as ``name``, keeping what
    the config says of it, or named by the endpoint) and return its name."""
    from pathlib import Path

    from jumpstarter.config import NodeConfig

    transport = {"grpc": "grpc", "grpcs": "grpc"}.get(endpoint.partition("://")[0])
    if transport is None:
        raise click.BadParameter(f"expected grpc://HOST:PORT or grpcs://HOST:PORT, got {endpoint!r}",
                                 param_hint="--endpoint")
    name = name or endpoint
    known = protocol.config.nodes.get(name) or NodeConfig(name=name)
    update = {"transport": transport, "endpoint": endpoint}
    update |= {"token_file": Path(token_file)} if token_file is not None else {}
    update |= {"tls_ca": Path(tls_ca)} if tls_ca is not None else {}
    protocol.config.nodes[name] = known.model_copy(update=update)
    return name


async def _run(
    protocol, node_name, session_name, argv, spec, grace, connect, files, announce=None, stdin=False, tty=False
) -> int:
    import anyio

    from jumpstarter.errors import BadRequest

    from . import _terminal

    async with protocol.create_async_session(session_name) as session:
        node = await session.connect(node_name, **connect)
        await files.put(node)
        if tty:
            spec = {**spec, "pty": _terminal.terminal_size(0)}
            if "TERM" in os.environ:  # as ssh does: the program knows what it draws on
                spec["env"] = {"TERM": os.environ["TERM"], **spec["env"]}
        elif stdin and "stdin" not in (node.info.capabilities if node.info else ["stdin"]):
            if _terminal.carries_data(0):
                raise BadRequest(
                    f"node {node.name!r} has no 'stdin' capability: its tasks cannot read jmp's input "
                    "(give -n to run without it)"
                )
            stdin = False  # a terminal or /dev/null: nothing is lost
        task = await node.start(argv, stdin=stdin and not tty, **spec)
        interrupted = 0
        with _terminal.raw_terminal(0) if tty else contextlib.nullcontext():
            async with anyio.create_task_group() as tg:

                async def on_signals(*, task_status=anyio.TASK_STATUS_IGNORED) -> None:
                    nonlocal interrupted
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
                        task_status.started()
                        async for signum in signals:
                            first = not interrupted
                            interrupted = interrupted or signum
                            # First signal: a polite stop. Any later one: kill now.
                            tg.start_soon(task.stop, grace if first else 0)

                await tg.start(on_signals)
                # Only now: whoever reads the id may signal us, and a signal stops the task.
                if announce is not None:
                    announce(task.id, node.name)
                if tty:
                    tg.start_soon(_terminal.forward_input, task, 0, False)
                    tg.start_soon(_terminal.follow_window_size, task, 0)
                elif stdin:
                    tg.start_soon(_terminal.forward_input, task, 0)
                streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
                try:
                    async for chunk in task.output():
                        stream = streams[chunk.stream]
                        stream.write(chunk.data)
                        stream.flush()
                except BrokenPipeError:
                    # The reader went away (`jmp run … | head`): as a command in a
                    # pipeline would, the task stops and jmp exits 141 (128 + SIGPIPE).
                    from ._output import quiet_stdout

                    quiet_stdout()
                    with anyio.CancelScope(shield=True):
                        await task.stop(grace)
                    tg.cancel_scope.cancel()
                    return EXIT_PIPE
                tg.cancel_scope.cancel()
        end = task.end
        assert end is not None
        # Fetched whatever the outcome: a failed run's logs matter most.
        fetched = await files.fetch(task)
        if interrupted:
            return 128 + interrupted
        if end.state.value == "timed_out":
            timeout = spec.get("timeout")
            click.echo(f"jmp: task {task.id} timed out after {timeout:g}s and was stopped", err=True)
        elif end.state.value == "failed":
            # A task the node had to stop (its output could not be kept, say) says why;
            # one that exited non-zero has no message and prints nothing more.
            info = await task.status()
            if info.message:
                click.echo(f"jmp: task {task.id} failed: {info.message}", err=True)
        code = task_exit_code(end.state.value, end.exit_code)
        return code if fetched or code else 1


# --- files ---------------------------------------------------------------------------


class TaskFiles:
    """What ``--put``, ``--get`` and ``--junit`` ask for."""

    def __init__(self, puts, gets, get_to, junit, cwd) -> None:
        self.puts, self.gets, self.get_to, self.junit, self.cwd = puts, gets, get_to, junit, cwd

    @classmethod
    def none(cls) -> TaskFiles:
        """No files asked for (``jmp shell``)."""
        return cls([], [], None, None, None)

    @classmethod
    def from_options(cls, puts, gets, get_to, junit, cwd) -> TaskFiles:
        """The options checked before anything runs: every local file to put exists."""
        import os
        import posixpath

        pairs = []
        for value in puts:
            local, sep, remote = value.partition(":")
            if not local:
                raise click.BadParameter(f"expected LOCAL[:REMOTE], got {value!r}", param_hint="--put")
            if not os.path.exists(local):
                raise click.BadParameter(f"{local}: no such file or directory", param_hint="--put")
            remote = remote or os.path.basename(os.path.normpath(local))
            if cwd and not posixpath.isabs(remote):
                remote = posixpath.join(cwd, remote)  # as the task sees it
            pairs.append((local, remote))
        if get_to is not None and not (gets or junit):
            raise click.UsageError("--get-to goes with --get or --junit")
        return cls(pairs, gets, get_to, junit, cwd)

    async def put(self, node) -> None:
        import os

        for local, remote in self.puts:
            await node.put(local, remote, recursive=os.path.isdir(local))

    async def fetch(self, task) -> bool:
        """Fetch and record the task's files; False when --junit found no results."""
        from pathlib import Path

        from jumpstarter.errors import JumpstarterError

        if not (self.gets or self.junit):
            return True
        where = Path(self.get_to) if self.get_to else Path("artifacts") / task.id
        node = task.node
        base = (await node.stat(".", task_id=task.id)).path
        done = []
        for pattern in [*self.gets, *([self.junit] if self.junit else [])]:
            matches = await node.glob(pattern, task_id=task.id)
            if not matches:
                click.echo(f"jmp: warning: {pattern!r} matched no file on node {node.name!r}", err=True)
            for info in matches:
                if info.kind != "file":
                    continue
                local = where / _relative(info.path, base)
                local.parent.mkdir(parents=True, exist_ok=True)
                done.append((pattern, await _get_one(node, info, local)))
        if done:
            await task.add_artifacts([item for _, item in done])
            click.echo(f"jmp: {len(done)} artifact(s) of task {task.id} in {where}", err=True)
        if not self.junit:
            return True
        reports = [item for pattern, item in done if pattern == self.junit]
        if not reports:
            return False
        from jumpstarter.results.junit import parse_junit

        results = []
        try:
            for item in reports:
                results += parse_junit(Path(item.target).read_bytes(), source=item.target)
        except JumpstarterError as exc:
            click.echo(f"jmp: error: {exc}", err=True)
            return False
        if results:
            await task.node.add_results(task.id, results)
        click.echo(f"jmp: {len(results)} result(s) imported from {self.junit}", err=True)
        return True


async def _get_one(node, info, local):
    from jumpstarter.client.files import get_file

    return await get_file(node, info, local)


def _relative(path: str, base: str) -> str:
    """Where a fetched file goes under the artifacts directory: its path below the
    task's directory, or its name when it is elsewhere."""
    import posixpath

    if path.startswith(base.rstrip("/") + "/"):
        return posixpath.relpath(path, base)
    return posixpath.basename(path)
