"""``jmp node list`` and ``jmp lease list|release``: the shared registry of a lab.

They need a ``postgresql://`` store (``store`` in the config, or ``JMP_STORE``)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import click

from ._base import JmpGroup, State, fail, handle_errors
from ._output import print_table


def with_registry(state: State, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``await fn(registry)`` against the configured store's registry."""
    import anyio

    from jumpstarter.store.base import open_store
    from jumpstarter.store.registry import NodeRegistry

    url = state.protocol.config.store_url
    if not url.startswith(("postgresql://", "postgres://")):
        fail(f"the node registry needs a postgresql:// store; the store is {url}")

    async def main() -> Any:
        store = open_store(url)
        await store.open()
        try:
            return await fn(NodeRegistry(store))
        finally:
            await store.aclose()

    return anyio.run(main)


def _when(epoch: float | None) -> str:
    return "-" if not epoch else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


FORMAT = click.option("-o", "--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)


@click.command("list")
@FORMAT
@click.pass_obj
@handle_errors
def node_list(state: State, fmt: str) -> None:
    """Every registered node: free, leased (by whom, since when), draining (its lease
    ended, its tasks or after_lease hook still run), unhealthy (a lease hook failed:
    PROBLEM says how; 'jmp node clear NAME' once fixed) or offline."""

    async def nodes(registry: Any) -> Any:
        return await registry.nodes()

    records = with_registry(state, nodes)
    if fmt == "json":
        click.echo(json.dumps([
            {
                "name": n.name, "status": n.status, "labels": n.labels, "endpoint": n.endpoint,
                "transport": n.transport, "driver": n.driver, "last_seen": n.last_seen,
                "unhealthy": n.unhealthy,
                "lease": None if n.lease is None else {
                    "id": n.lease.id, "session_id": n.lease.session_id,
                    "session_name": n.lease.session_name, "since": n.lease.since,
                },
            }
            for n in records
        ], indent=2))
        return
    rows = [
        [
            n.name,
            n.status,
            ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())),
            f"{n.lease.session_name} since {_when(n.lease.since)}" if n.lease else "-",
            n.endpoint or "-",
            n.unhealthy or "-",
        ]
        for n in records
    ]
    print_table(["NODE", "STATUS", "LABELS", "LEASED BY", "ENDPOINT", "PROBLEM"], rows)


@click.command("clear")
@click.argument("name")
@click.pass_obj
@handle_errors
def node_clear(state: State, name: str) -> None:
    """Mark node NAME healthy again, once what made its lease hook fail is fixed."""

    async def clear(registry: Any) -> str | None:
        was = (await registry.node(name)).unhealthy
        await registry.set_health(name, None)
        return was

    was = with_registry(state, clear)
    click.echo(f"node {name} cleared" + (f" (it was unhealthy: {was})" if was else " (it was healthy)"))


@click.command("remove")
@click.argument("name")
@click.pass_obj
@handle_errors
def node_remove(state: State, name: str) -> None:
    """Forget node NAME, which is offline and will not come back. Its tasks and
    results stay in the store; an agent that serves it again registers it anew."""

    async def remove(registry: Any) -> None:
        await registry.remove(name)

    with_registry(state, remove)
    click.echo(f"node {name} removed")


@click.group(cls=JmpGroup, commands={
    "list": ("jumpstarter.cli.registry:lease_list", "Live leases, and the requests waiting in line."),
    "release": ("jumpstarter.cli.registry:lease_release", "End a lease by id or node name."),
})
def lease() -> None:
    """Leases in the shared registry (a postgresql:// store)."""


@click.command("list")
@FORMAT
@click.pass_obj
@handle_errors
def lease_list(state: State, fmt: str) -> None:
    """Live leases (node, session, since, expiry), then the requests waiting in line
    for a node by label, in the order they will be served."""

    async def leases(registry: Any) -> Any:
        return await registry.leases()

    async def both(registry: Any) -> Any:
        return await registry.leases(), await registry.waiting()

    records, waiting = with_registry(state, both)
    if fmt == "json":
        click.echo(json.dumps({"leases": [r.__dict__ for r in records], "waiting": waiting}, indent=2))
        return
    from jumpstarter.store.registry import format_selector

    rows = [[str(r.id), r.node, f"{r.session_name} ({r.session_id})", _when(r.since), _when(r.expires_at)]
            for r in records]
    # Requests in line, in the order they will be served: no node yet, the labels they asked for.
    rows += [[f"waiting #{n}", format_selector(w["selector"]), f"{w['session_name']} ({w['session_id']})",
              _when(w["since"]), "-"] for n, w in enumerate(waiting, 1)]
    print_table(["LEASE", "NODE", "SESSION", "SINCE", "EXPIRES"], rows)


@click.command("release")
@click.option("--stop", is_flag=True,
              help="Also stop the lease's tasks still running on the node (else they run to their end).")
@click.argument("lease")
@click.pass_obj
@handle_errors
def lease_release(state: State, stop: bool, lease: str) -> None:
    """End LEASE (a lease id, or the name of the node it holds).

    The node goes to the next session once the lease's tasks have ended; meanwhile
    'jmp node list' shows it draining. With --stop, the node's agent stops them
    (SIGTERM, then SIGKILL), also on a node whose lease has ended already.
    """
    from jumpstarter.errors import NotFound
    from jumpstarter.store.registry import RELEASED_STOP

    async def release(registry: Any) -> str:
        if lease.isdigit():
            lease_id = int(lease)
        else:
            live = await registry.live_lease(lease)
            if live is None:
                if stop and (await registry.node(lease)).status == "draining":
                    ended = await registry.stop_tasks_of_last_lease(lease)
                    return f"stopping the tasks of lease {ended} on node {lease}"
                raise NotFound(f"no live lease on node {lease!r}")
            lease_id = live.id
        reason = RELEASED_STOP if stop else "released by jmp lease release"
        if not await registry.release(lease_id, reason):
            raise NotFound(f"no live lease with id {lease_id}")
        return f"released lease {lease_id}" + (" and stopping its tasks" if stop else "")

    click.echo(with_registry(state, release))
