"""``jmp run``: run one command on a node, stream its output, exit with its code."""

from __future__ import annotations

import signal
import sys

import click

from ._base import handle_errors, make_spec, parse_pairs, task_exit_code
from ._params import Seconds

WAIT_FOREVER = 10 * 365 * 86400.0
"""What ``--wait`` without SECONDS means."""


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("-n", "--node", help="Node to run on (default: the config's default_node, 'local').")
@click.option("-s", "--session", default="run", show_default=True, help="Session name.")
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
@click.option("-t", "--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop after SECONDS; exit 124.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable (repeatable).")
@click.option("--cwd", help="Working directory of the task, on the node.")
@click.option("--name", help="A name for the task.")
@click.option("-l", "--label", multiple=True, metavar="K=V", help="Label the task (repeatable).")
@click.option("--shell", is_flag=True, help="Run CMD as one string through /bin/sh -c.")
@click.option("--grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when stopping.")
@click.option("--id-file", type=click.Path(dir_okay=False, writable=True), metavar="FILE",
              help="Write the task's id to FILE as soon as the task exists.")
@click.option("-q", "--quiet", is_flag=True, help="Do not say which task ran (on a terminal's stderr).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
@handle_errors
def run(state, node, session, endpoint, token_file, tls_ca, select, duration, wait, timeout, env, cwd, name, label,
        shell, grace, id_file, quiet, command) -> None:
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

    \b
    Examples:
      jmp run -- pytest -q
      jmp run --timeout 60 --env BOARD=rpi4 -- ./flash.sh image.bin
      jmp run --shell -- 'make -j2 && ./run-tests'
      jmp run --endpoint grpcs://lab1.example:7100 --token-file lab1.token -- ./flash.sh
      jmp run --select board=rpi4,site=lab2 --wait 600 -- ./flash.sh
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
    argv, spec = make_spec(command, env, cwd, timeout, name, label, shell)
    import anyio

    connect = {"wait": wait, "duration": duration, "select": selector}
    announce = _announcer(id_file, quiet)
    code = anyio.run(_run, state.protocol, node, session, argv, spec, grace, connect, announce)
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


async def _run(protocol, node_name, session_name, argv, spec, grace, connect, announce) -> int:
    import anyio

    async with protocol.create_async_session(session_name) as session:
        node = await session.connect(node_name, **connect)
        task = await node.start(argv, **spec)
        interrupted = 0
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
            announce(task.id, node.name)
            streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
            async for chunk in task.output():
                stream = streams[chunk.stream]
                stream.write(chunk.data)
                stream.flush()
            tg.cancel_scope.cancel()
        end = task.end
        assert end is not None
        if interrupted:
            return 128 + interrupted
        if end.state.value == "timed_out":
            timeout = spec.get("timeout")
            click.echo(f"jmp: task {task.id} timed out after {timeout:g}s and was stopped", err=True)
        return task_exit_code(end.state.value, end.exit_code)
