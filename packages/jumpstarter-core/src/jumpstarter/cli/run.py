"""``jmp run``: run one command on a node, stream its output, exit with its code."""

from __future__ import annotations

import signal
import sys

import click

from ._base import handle_errors, parse_pairs, task_exit_code


@click.command(context_settings={"allow_interspersed_args": False})
@click.option("-n", "--node", help="Node to run on (default: the config's default_node, 'local').")
@click.option("-s", "--session", default="run", show_default=True, help="Session name.")
@click.option("-t", "--timeout", type=click.FloatRange(min=0, min_open=True), help="Stop after SECONDS; exit 124.")
@click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable (repeatable).")
@click.option("--cwd", help="Working directory of the task, on the node.")
@click.option("--name", help="A name for the task.")
@click.option("-l", "--label", multiple=True, metavar="K=V", help="Label the task (repeatable).")
@click.option("--shell", is_flag=True, help="Run CMD as one string through /bin/sh -c.")
@click.option("--grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when stopping.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
@handle_errors
def run(state, node, session, timeout, env, cwd, name, label, shell, grace, command) -> None:
    """Run COMMAND on a node and stream its output.

    stdout and stderr of the task go to jmp's stdout and stderr as they come. jmp
    exits with the task's exit code (124 on timeout, 127 if the command does not
    exist). Ctrl-C stops the task (SIGTERM to its process group, SIGKILL after
    --grace seconds); a second Ctrl-C kills it at once.

    \b
    Examples:
      jmp run -- pytest -q
      jmp run --timeout 60 --env BOARD=rpi4 -- ./flash.sh image.bin
      jmp run --shell -- 'make -j2 && ./run-tests'
    """
    spec = {
        "env": parse_pairs(env, "--env"),
        "labels": parse_pairs(label, "--label"),
        "cwd": cwd,
        "timeout": timeout,
        "name": name,
    }
    if shell:
        spec["shell"] = " ".join(command)
        argv = None
    else:
        argv = list(command)
    import anyio

    code = anyio.run(_run, state.protocol, node, session, argv, spec, grace)
    sys.exit(code)


async def _run(protocol, node_name, session_name, argv, spec, grace) -> int:
    import anyio

    async with protocol.create_async_session(session_name) as session:
        node = await session.connect(node_name)
        task = await node.start(argv, **spec)
        interrupted = 0
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                nonlocal interrupted
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for signum in signals:
                        first = not interrupted
                        interrupted = interrupted or signum
                        # First signal: a polite stop. Any later one: kill now.
                        tg.start_soon(task.stop, grace if first else 0)

            tg.start_soon(on_signals)
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
        return task_exit_code(end.state.value, end.exit_code)
