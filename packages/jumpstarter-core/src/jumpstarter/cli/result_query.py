"""``jmp result add`` and ``jmp result query``."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import click

from ._base import EXIT_NODE, call_node, fail, handle_errors, parse_pairs
from ._complete import complete_node, complete_session, complete_task
from ._output import dump, format_option, print_json, print_table, seconds, state_cell, when
from ._params import OUTCOMES, Seconds, When, parse_metrics

node_option = click.option("-n", "--node", shell_complete=complete_node,
                            help="Node to go through (default: the config's default_node).")


def _name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value:
        raise click.BadParameter("a result name must not be empty")
    return value


@click.command()
@click.argument("task_id", metavar="[TASK]", required=False, shell_complete=complete_task)
@click.option("--name", required=True, callback=_name, help="Result name, like suite/case.")
@click.option("--outcome", required=True, type=click.Choice(OUTCOMES, case_sensitive=False))
@click.option("--duration", type=Seconds(), help="Seconds it took.")
@click.option("--message", help="A message (say, why it failed).")
@click.option("-m", "--metric", "metrics", multiple=True, metavar="NAME=VALUE[UNIT]",
              help="A measurement, like boot=812ms, temp=41.5C or ratio=0.93 (repeatable).")
@click.option("-l", "--label", "labels", multiple=True, metavar="K=V", help="Label the result (repeatable).")
@node_option
@format_option("text", "json", help="text: the new result's id; json: {\"id\": N} (see README).")
@click.pass_obj
@handle_errors
def add(state, task_id, name, outcome, duration, message, metrics, labels, node, fmt) -> None:
    """Attach a result to TASK; print its id.

    Inside a task (a command run by 'jmp run' or 'jmp task start'), TASK is that
    task by default, and the result goes through the node that runs it, into its
    session and its node's store of record.

    \b
    Examples:
      jmp result add 3f2a9c1b0d4e --name boot --outcome passed --metric boot=812ms
      jmp result add $id --name suite/flash --outcome failed --message "bad checksum"
    """
    if task_id is None:
        enclosing = state.protocol.enclosing
        if enclosing is None:
            raise click.UsageError(
                "missing TASK (it is the enclosing task's only inside one: JMP_TASK_ID is not set)"
            )
        task_id, node = enclosing.task_id, node or enclosing.node
    result = {
        "name": name,
        "outcome": outcome.lower(),
        "duration": duration,
        "message": message,
        "metrics": parse_metrics(metrics),
        "labels": parse_pairs(labels, "--label"),
    }
    result_id = call_node(state, lambda n: n.session.add_result(task_id, **result), node=node, writes=True)
    if fmt == "json":
        print_json({"id": result_id})
    else:
        click.echo(result_id)


@click.command()
@click.option("--task", "task_id", metavar="TASK", shell_complete=complete_task, help="Only results of this task.")
@click.option("--session", metavar="SESSION", shell_complete=complete_session,
              help="Only results of this session: an id, a name (the newest session of that name) "
                   "or NAME~N (the one N before it), as in every result command.")
@click.option("--all", "all_sessions", is_flag=True,
              help="With --session NAME: every session of that name, merged.")
@click.option("-n", "--node", shell_complete=complete_node, help="Only results from this node (and ask it; default: the default node).")
@click.option("--outcome", "outcomes", multiple=True, type=click.Choice(OUTCOMES, case_sensitive=False),
              help="Only this outcome (repeatable).")
@click.option("--name", metavar="GLOB", help="Only names matching GLOB (* ? [...]), like 'suite/*'.")
@click.option("--since", type=When(), help="Only results added since: ISO 8601 (2024-05-01T14:30) or an age (2h, 3d).")
@click.option("--until", type=When(), help="Only results added before: ISO 8601 or an age.")
@click.option("-l", "--label", "labels", multiple=True, metavar="K=V", help="Only results with this label (repeatable).")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="At most this many (the summary counts all).")
@click.option("--cursor", help="Continue after the last page (its summary line names the cursor).")
@format_option("table", "json", "csv", "junit", help="table for people; json, csv or JUnit XML for tools (see README).")
@click.pass_obj
@handle_errors
def query(state, task_id, session, all_sessions, node, outcomes, name, since, until, labels, limit, cursor, fmt) -> None:
    """Find results. Every filter given must match; oldest first.

    The table ends with a summary of everything that matched: counts per outcome
    and the total duration.

    \b
    Examples:
      jmp result query --session nightly --outcome failed   # tonight's
      jmp result query --session nightly~1 -o json           # last night's
      jmp result query --session nightly --all --name 'boot/*'  # every night's
      jmp result query --name 'boot/*' --since 3d --format csv > boot.csv
      jmp result query --task 3f2a9c1b0d4e --format junit > junit.xml
    """
    if since is not None and until is not None and since >= until:
        raise click.UsageError("--since must be before --until")
    filters: dict[str, Any] = {
        "task_id": task_id,
        "session": session,
        "node": node,
        "outcomes": [o.lower() for o in outcomes] or None,
        "name": name,
        "since": since,
        "until": until,
        "labels": parse_pairs(labels, "--label"),
        "limit": limit,
        "cursor": cursor,
    }
    config = state.protocol.config
    if node is not None and not config.shared_store:
        config.node(node)  # an unknown node is an error, not an empty answer
    if all_sessions and session is None:
        raise click.UsageError("--all needs --session NAME")
    unreachable: list[str] = []
    if session is not None and node is None and task_id is None and not config.shared_store:
        # Without a shared store each node keeps its own results; the session id is
        # the same on every node the session used.
        data = _query_every_node(state, filters, unreachable, newest=not all_sessions)
    else:

        async def find(n: Any) -> Any:
            if session is not None and not all_sessions:
                from .result_report import resolve_session

                filters["session"] = (await resolve_session(n, session)).id
            return await n.query_results(**filters)

        data = call_node(state, find, node=node)
    if fmt == "json":
        print_json(dump(data))
    elif fmt == "csv":
        _write_csv(data.results)
    elif fmt == "junit":
        from jumpstarter.results.junit import export_junit

        click.echo(export_junit(data.results), nl=False)
    else:
        _write_table(data)
    state.protocol.plugins.hook.jmp_results_exported(results=data.results, format=fmt)
    if unreachable:
        fail(f"results of session {session!r} from node {', '.join(unreachable)} are missing: "
             "it could not be reached", EXIT_NODE)


def _query_every_node(state: Any, filters: dict[str, Any], unreachable: list[str], *, newest: bool) -> Any:
    """Without a shared store each node keeps its own results: a session's are asked
    of the default node and of every node the config names; the ones that cannot be
    reached are added to ``unreachable``."""
    import anyio

    from jumpstarter.errors import NotFound, TransportError

    config = state.protocol.config
    others = [n for n, c in config.nodes.items() if n != config.default_node and config.is_complete(c)]
    names = [config.default_node, *others]

    async def main() -> Any:
        async with state.protocol.create_async_session("cli") as s:
            for name in names:
                try:
                    await s.connect(name, lease=False)
                except TransportError:
                    unreachable.append(name)
            try:
                if newest:  # NAME (or NAME~N) means one session: its id, from a node that has it
                    from .result_report import resolve_session

                    missing: NotFound | None = None
                    for connected in s.nodes:
                        try:
                            filters["session"] = (await resolve_session(connected, filters["session"])).id
                            missing = None
                            break
                        except NotFound as exc:
                            missing = missing or exc
                    if missing is not None and not unreachable:
                        raise missing
                return await s.query_results(**filters)
            except NotFound:
                if not unreachable:
                    raise
                # Not on the nodes that answered: maybe on those that did not.
                from jumpstarter_protocol import ResultsData, ResultSummary

                return ResultsData(results=[], summary=ResultSummary())

    return anyio.run(main)


CSV_COLUMNS = [
    "id", "task_id", "session_id", "node", "name", "outcome", "duration", "message",
    "metrics", "labels", "started_at", "finished_at", "created_at",
]


def _write_csv(results: list[Any]) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in results:
        row = dump(result)
        for key in ("metrics", "labels"):  # nested: one JSON cell each
            row[key] = json.dumps(row[key], ensure_ascii=False, sort_keys=True) if row[key] else ""
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    click.echo(out.getvalue(), nl=False)


def _metric_text(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={m.value:g}{m.unit or ''}" for k, m in metrics.items())


def _write_table(data: Any) -> None:
    rows = [
        [
            str(r.id),
            r.name,
            state_cell(r.outcome.value),
            seconds(r.duration),
            _metric_text(r.metrics),
            r.task_id,
            when(r.created_at),
            (r.message or "").splitlines()[0][:60] if r.message else "",
        ]
        for r in data.results
    ]
    if rows:
        print_table(["ID", "NAME", "OUTCOME", "DURATION", "METRICS", "TASK", "ADDED", "MESSAGE"], rows)
    click.echo(summary_line(data))


def summary_line(data: Any) -> str:
    """``12 results: 10 passed, 2 failed; 3.50s in total`` (of all that matched)."""
    summary = data.summary
    counts = ", ".join(f"{summary.outcomes[o]} {o}" for o in OUTCOMES if summary.outcomes.get(o))
    line = f"{summary.total} result{'' if summary.total == 1 else 's'}"
    if counts:
        line += f": {counts}; {seconds(summary.duration)} in total"
    if data.next_cursor is not None:
        line += f"; {len(data.results)} shown, more with --cursor {data.next_cursor}"
    return line
