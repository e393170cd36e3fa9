"""``jmp session list``: the sessions a store knows, with their nodes, tasks and results."""

from __future__ import annotations

from typing import Any

import click

from ._base import call_node, handle_errors
from ._output import format_option, print_json, print_table, when
from ._params import OUTCOMES


@click.group()
def session() -> None:
    """Sessions: what ran together, and what came of it."""


@session.command(name="list")
@click.option("--name", metavar="GLOB", help="Only sessions whose name matches GLOB (* ? [...]), or this id.")
@click.option("-n", "--node", help="Node whose store to ask (default: the default node; a shared store knows all).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True, help="At most this many.")
@format_option("table", "json", help="table for people; json: {\"sessions\": [...]}.")
@click.pass_obj
@handle_errors
def list_(state: Any, name: str | None, node: str | None, limit: int, fmt: str) -> None:
    """List sessions, newest first: id, name, when created, the nodes its tasks ran
    on, how many tasks, and its results by outcome."""
    from jumpstarter_protocol import ListSessions

    async def sessions(n: Any) -> list[tuple[Any, list[Any]]]:
        found = (await n.request(ListSessions(name=name, with_results=False, limit=limit))).sessions
        return [(s, await n.list_tasks(session=s.id, limit=10_000)) for s in found]

    rows = call_node(state, sessions, node=node)
    if fmt == "json":
        print_json({"sessions": [
            {
                "id": s.id, "name": s.name, "created_at": s.created_at.isoformat(),
                "nodes": sorted({t.node for t in tasks}), "tasks": len(tasks),
                "results": {o.value: c for o, c in (s.summary.outcomes.items() if s.summary else [])},
            }
            for s, tasks in rows
        ]})
        return
    table = []
    for s, tasks in rows:
        outcomes = s.summary.outcomes if s.summary else {}
        counts = {o.value: c for o, c in outcomes.items()}
        results = ", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts.get(o)) or "-"
        nodes = ",".join(sorted({t.node for t in tasks})) or "-"
        table.append([s.id, s.name, when(s.created_at), nodes, str(len(tasks)), results])
    if table:
        print_table(["ID", "NAME", "CREATED", "NODES", "TASKS", "RESULTS"], table)
