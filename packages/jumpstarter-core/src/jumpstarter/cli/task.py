"""``jmp task``: create, start, stop, wait for, follow and list tasks.

``jmp task start`` detaches: it returns as soon as the task runs, and ``logs``,
``status``, ``wait`` and ``stop`` reach the task by id from any shell (see
:mod:`jumpstarter.node.agent` for how the local node keeps it running).
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ._base import EXIT_TIMEOUT, call_node, call_task_node, handle_errors, make_spec, task_exit_code
from ._complete import complete_node, complete_session, complete_task
from ._output import (
    IdleSpinner,
    command_line,
    describe,
    dump,
    exit_text,
    format_option,
    print_fields,
    print_json,
    print_table,
    progress,
    seconds,
    state_cell,
    when,
)
from ._params import TASK_STATES, Seconds

F = TypeVar("F", bound=Callable[..., Any])

node_option = click.option("-n", "--node", shell_complete=complete_node, help="Node (default: the config's default_node, 'local').")
task_node_option = click.option(
    "-n", "--node", shell_complete=complete_node,
    help="Node that has the task (default: the node the store says ran it, else default_node).",
)
session_option = click.option("-s", "--session", default="cli", shell_complete=complete_session, show_default=True, help="Session name.")
task_id_argument = click.argument("task_id", metavar="TASK_ID", shell_complete=complete_task)


def spec_options(fn: F) -> F:
    """What a new task is: the options ``jmp run`` has too."""
    for option in reversed(
        [
            click.option("-t", "--timeout", type=Seconds(min_open=True), help="Stop after SECONDS (state timed_out)."),
            click.option("--grace", type=Seconds(max=3600), metavar="SECONDS",
                         help="When --timeout stops it: SIGKILL this long after SIGTERM (default 5)."),
            click.option("-e", "--env", multiple=True, metavar="K=V", help="Set an environment variable (repeatable)."),
            click.option("--cwd", help="Working directory of the task (default: the current one, on the local node)."),
            click.option("--name", help="A name for the task."),
            click.option("-l", "--label", multiple=True, metavar="K=V", help="Label the task (repeatable)."),
            click.option("--shell", is_flag=True, help="Run COMMAND as one string through /bin/sh -c."),
        ]
    ):
        fn = option(fn)
    return fn


def print_task(info: Any, fmt: str, text: str | None = None) -> None:
    if fmt == "json":
        print_json(dump(info))
    else:
        click.echo(text if text is not None else describe(info))


@click.group()
def task() -> None:
    """Tasks: create, start (detached), stop, wait for, follow and list them.

    \b
    Examples:
      id=$(jmp task start -- make test)   start; returns at once with the id
      jmp task logs --follow $id          its output, live, from any shell
      jmp task wait $id                   exits with the task's exit code
      jmp task stop $id                   SIGTERM, then SIGKILL after --grace
      jmp task list --state running
    """


@task.command(short_help="Create a task without starting it.", context_settings={"allow_interspersed_args": False})
@node_option
@session_option
@spec_options
@format_option("text", "json", help="text: the task id; json: the task (see README).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
@handle_errors
def new(state, node, session, fmt, command, **spec_args) -> None:
    """Create a task for COMMAND without starting it (state pending); print its id.

    Start it later with 'jmp task start TASK_ID'.
    """
    argv, spec = make_spec(command, **spec_args)

    async def create(n: Any) -> Any:
        return (await n.new_task(argv, **spec)).info

    info = call_node(state, create, node=node, session=session, lease=True)
    print_task(info, fmt, text=info.id)


class _StartCommand(click.Command):
    """Notes whether ``--`` was given, which tells a command from a task id."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["jmp.dashdash"] = "--" in args
        return super().parse_args(ctx, args)


@task.command(cls=_StartCommand, context_settings={"allow_interspersed_args": False})
@node_option
@session_option
@spec_options
@format_option("text", "json", help="text: the task id; json: the task (see README).")
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED, metavar="TASK_ID | -- COMMAND...")
@click.pass_context
@handle_errors
def start(ctx, node, session, fmt, args, **spec_args) -> None:
    """Start a task and return at once, printing its id.

    Either a pending task made by 'jmp task new' (TASK_ID), or a new one from
    COMMAND, given after '--'. The task keeps running after jmp exits; follow,
    wait for or stop it from any shell with 'jmp task logs|wait|stop TASK_ID'.
    jmp exits 127 if the command does not exist, 126 if it cannot be run.

    \b
    Examples:
      jmp task start -- ./flash.sh image.bin
      jmp task start --timeout 600 --env BOARD=rpi4 -- pytest -q
      jmp task start 3f2a9c1b0d4e
    """
    if len(args) == 1 and not ctx.meta["jmp.dashdash"]:
        task_id, argv, spec = args[0], None, {}
        if any(spec_args.values()):
            raise click.UsageError("a pending task has its spec already; the task options go with '-- COMMAND...'")
    else:
        task_id = None
        argv, spec = make_spec(args, **spec_args)

    async def begin(n: Any) -> Any:
        if task_id is not None:
            started = await n.start(n.task(task_id), detach=True)
        else:
            started = await n.start(argv, detach=True, **spec)
        return await started.status()

    info = call_node(ctx.obj, begin, node=node, session=session, lease=True)
    print_task(info, fmt, text=info.id)


@task.command(short_help="Stop a task: SIGTERM, then SIGKILL after --grace.")
@task_node_option
@session_option
@click.option("--grace", type=Seconds(max=3600), default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
@format_option("text", "json", help="text: one line; json: the task (see README).")
@task_id_argument
@click.pass_obj
@handle_errors
def stop(state, node, session, grace, fmt, task_id) -> None:
    """Stop a task: SIGTERM to its process group, SIGKILL after --grace seconds.

    Waits until it has stopped and prints its final state. A task that has finished
    already is left alone; a pending one is marked stopped.
    """
    # No lease asked for: the node lets a stop through unless another session holds it.
    info = call_task_node(state, task_id, lambda n: n.task(task_id).stop(grace), node=node, session=session)
    print_task(info, fmt)


@task.command()
@task_node_option
@format_option("text", "json", help="text: one field a line; json: the task (see README).")
@task_id_argument
@click.pass_obj
@handle_errors
def status(state, node, fmt, task_id) -> None:
    """Show a task: its state, command, exit code and times."""
    info = call_task_node(state, task_id, lambda n: n.task(task_id).status(), node=node)
    if fmt == "json":
        print_json(dump(info))
        return
    spec = info.spec
    ran = (info.finished_at - info.started_at).total_seconds() if info.finished_at and info.started_at else None
    fields: list[tuple[str, Any]] = [
        ("task", info.id),
        ("state", state_cell(info.state.value)),
        ("exit", exit_text(info)),
        ("command", command_line(spec)),
        ("node", info.node),
    ]
    optional = [
        ("name", info.name),
        ("message", info.message),
        ("cwd", spec.cwd),
        ("env", " ".join(f"{k}={v}" for k, v in spec.env.items())),
        ("labels", " ".join(f"{k}={v}" for k, v in spec.labels.items())),
        ("timeout", seconds(spec.timeout) if spec.timeout else None),
    ]
    fields += [(key, value) for key, value in optional if value]
    fields += [
        ("created", when(info.created_at)),
        ("started", when(info.started_at)),
        ("finished", when(info.finished_at)),
        ("ran for", seconds(ran)),
        ("session", info.session_id or "-"),
    ]
    print_fields(fields)


@task.command()
@task_node_option
@click.option("-t", "--timeout", type=Seconds(), help="Give up after SECONDS (exit 124; the task goes on).")
@format_option("text", "json", help="text: one line; json: the task (see README).")
@task_id_argument
@click.pass_obj
@handle_errors
def wait(state, node, timeout, fmt, task_id) -> None:
    """Wait until a task has finished; exit with its exit code.

    Exit codes as for 'jmp run': the task's own, 124 if it timed out (or if
    --timeout passed first), 128+N if signal N killed it.
    """
    with progress(f"Waiting for task {task_id}…"):
        info = call_task_node(state, task_id, lambda n: n.task(task_id).wait(timeout), node=node)
    print_task(info, fmt)
    if not info.state.finished:
        click.echo(f"jmp: task {task_id} is still {info.state.value} after {timeout:g}s", err=True)
        sys.exit(EXIT_TIMEOUT)
    sys.exit(task_exit_code(info.state.value, info.exit_code))


def chunk_json(chunk: Any) -> str:
    """One output chunk as a JSON line, its bytes in standard base64 (RFC 4648 §4:
    ``+`` and ``/``, padded), which every decoder reads; pydantic would write the
    URL-safe alphabet, which a standard decoder silently misreads."""
    doc = chunk.model_dump(mode="json", exclude={"data"})
    doc["data"] = base64.b64encode(chunk.data).decode("ascii")
    return json.dumps(doc)


@task.command(short_help="Print a task's output (--follow: as it comes).")
@task_node_option
@click.option("-f", "--follow", is_flag=True, help="Keep reading until the task has finished.")
@click.option("--from-offset", "offset", type=click.IntRange(min=0), default=0, show_default=True,
              help="Start at this byte of the output.")
@format_option("raw", "json", help="raw: the bytes, stdout and stderr to ours; json: one line per chunk (see README).")
@task_id_argument
@click.pass_obj
@handle_errors
def logs(state, node, follow, offset, fmt, task_id) -> None:
    """Print a task's output: stdout to stdout, stderr to stderr, in the order made.

    With --follow, keep printing as it comes until the task has finished. Offsets
    count bytes of the combined output; --format json shows each chunk's offset,
    so a reader can resume exactly where it stopped with --from-offset.
    """
    async def read(n: Any) -> None:
        task_ = n.task(task_id)
        streams = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        with IdleSpinner(f"Waiting for output of task {task_id}…") as spinner:
            async for chunk in task_.output(offset, follow=follow):
                spinner.output()
                if fmt == "json":
                    click.echo(chunk_json(chunk))
                else:
                    stream = streams[chunk.stream]
                    stream.write(chunk.data)
                    stream.flush()
        if fmt == "json" and task_.end is not None:
            click.echo(task_.end.model_dump_json())

    call_task_node(state, task_id, read, node=node, what="the output of task {id}")


@task.command(name="list")
@node_option
@click.option("--session", help="Only tasks of this session (name or id).")
@click.option("--state", "states", multiple=True, type=click.Choice(TASK_STATES),
              help="Only tasks in this state (repeatable).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True, help="At most this many.")
@format_option("table", "json", help="table for people; json: {\"tasks\": [...]} (see README).")
@click.pass_obj
@handle_errors
def list_(state, node, session, states, limit, fmt) -> None:
    """List tasks, newest first."""
    from jumpstarter_protocol import ListTasks
    from pydantic import ValidationError

    try:
        request = ListTasks(session=session, states=list(states) or None, limit=limit)
    except ValidationError as exc:
        raise click.BadParameter(exc.errors()[0]["msg"], param_hint="--session") from None
    reply = call_node(state, lambda n: n.request(request), node=node)
    tasks = reply.tasks
    if reply.truncated:
        click.echo(
            f"jmp: warning: only the newest {len(tasks)} tasks fit in one reply; narrow the list with "
            "--session, --state or --limit", err=True,
        )
    if fmt == "json":
        print_json({"tasks": [dump(t) for t in tasks]})
        return
    rows = [
        [t.id, t.node, state_cell(t.state.value), exit_text(t), when(t.created_at), t.name or "", command_line(t.spec)]
        for t in tasks
    ]
    if rows:  # nothing at all when there are no tasks, as ls prints nothing for an empty directory
        print_table(["ID", "NODE", "STATE", "EXIT", "CREATED", "NAME", "COMMAND"], rows)


# --- files ---------------------------------------------------------------------------


@task.command(short_help="List the files a task recorded as its artifacts.")
@node_option
@format_option("table", "json", help="table for people; json: {\"artifacts\": [...]}.")
@task_id_argument
@click.pass_obj
@handle_errors
def artifacts(state, node, fmt, task_id) -> None:
    """List the artifacts of a task: the files 'jmp run --get/--junit' fetched after
    it, each with its path on the node, size and sha256."""
    items = call_node(state, lambda n: n.task(task_id).artifacts(), node=node)
    if fmt == "json":
        print_json({"task_id": task_id, "artifacts": [dump(a) for a in items]})
        return
    if items:
        print_table(["PATH", "SIZE", "SHA256", "RECORDED"], [[a.path, str(a.size), a.sha256, when(a.created_at)]
                                                             for a in items])


@task.command(name="get", short_help="Fetch one of a task's artifacts again.")
@node_option
@click.option("--to", "target", default=".", show_default=True, type=click.Path(),
              help="Local file or directory to write it to.")
@task_id_argument
@click.argument("path")
@click.pass_obj
@handle_errors
def get_(state, node, target, task_id, path) -> None:
    """Fetch artifact PATH of a task from its node again (PATH as 'jmp task artifacts'
    lists it, or its name). It must still be what the task recorded: a file that
    changed since (another sha256) is refused and nothing is written."""
    from pathlib import Path

    from jumpstarter.errors import NotFound

    async def fetch(n: Any) -> Any:
        from jumpstarter.client.files import get_file

        items = await n.task(task_id).artifacts()
        found = [a for a in items if a.path == path] or [a for a in items if a.path.rsplit("/", 1)[-1] == path]
        if not found:
            raise NotFound(f"task {task_id} has no artifact {path!r} (see 'jmp task artifacts {task_id}')")
        artifact = found[-1]
        info = await n.stat(artifact.path)
        local = Path(target)
        if local.is_dir():
            local = local / artifact.path.rsplit("/", 1)[-1]
        return await get_file(n, info, local, expect_sha256=artifact.sha256)

    done = call_node(state, fetch, node=node)
    click.echo(done.target)
class Size(click.ParamType):
    """A number of bytes: ``500000``, ``200K``, ``100M``, ``10G`` (powers of 1024)."""

    name = "size"
    _UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        text = str(value).strip().upper().removesuffix("B")
        number, unit = (text[:-1], text[-1]) if text[-1:] in self._UNITS else (text, "")
        try:
            size = float(number) * self._UNITS[unit]
        except ValueError:
            self.fail(f"expected a size like 500000, 200K, 100M or 10G, got {value!r}", param, ctx)
        if size < 0:
            self.fail(f"a size cannot be negative: {value!r}", param, ctx)
        return int(size)


@task.command(short_help="Delete the output of finished tasks (by age or total size).")
@node_option
@session_option
@click.option("--older-than", metavar="AGE|WHEN",
              help="Output last written before this: an age (12h, 7d, 4w) or a date (2024-05-01).")
@click.option("--max-bytes", type=Size(), metavar="SIZE",
              help="Keep at most SIZE of output (100M, 10G); the oldest goes first.")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted; delete nothing.")
@click.pass_obj
@handle_errors
def prune(state, node, session, older_than, max_bytes, dry_run) -> None:
    """Delete the output logs of finished tasks on a node.

    Without --older-than and --max-bytes the node's own settings apply
    (keep_output_for, in seconds, and keep_output_bytes in its [nodes.NAME] config;
    a node applies them itself whenever a task finishes). Running tasks keep their
    output; a pruned task keeps its state, exit code and results, and its logs are
    empty. Prints each pruned task's id, then what was freed.

    \b
    Examples:
      jmp task prune --older-than 7d
      jmp task prune --max-bytes 10G --dry-run
    """
    from datetime import UTC, datetime

    from jumpstarter_protocol import PruneOutput

    from ._params import parse_when

    age = None
    if older_than is not None:
        try:
            age = max((datetime.now(UTC) - parse_when(older_than)).total_seconds(), 0.0)
        except ValueError:
            raise click.BadParameter(
                f"expected an age (12h, 7d) or a date (2024-05-01), got {older_than!r}", param_hint="--older-than"
            ) from None
    request = PruneOutput(older_than=age, max_bytes=max_bytes, dry_run=dry_run)
    reply = call_node(state, lambda n: n.request(request), node=node, session=session, lease=True)
    for task_id in reply.task_ids:
        click.echo(task_id)
    verb = "would free" if dry_run else "freed"
    count = len(reply.task_ids)
    click.echo(f"{verb} {reply.bytes:,} bytes of output of {count} task{'s' if count != 1 else ''}", err=True)
