"""The node registry and leases by selector, kept in a shared PostgreSQL store.

Every node agent (``jmp node serve --store postgresql://…``) registers its node and
sends a heartbeat; every client that wants "any free node with board=rpi4" asks the
registry for a lease. The database is the only coordinator:

- A lease is a row in ``leases``; a partial unique index allows one live lease per
  node, so no node is ever leased twice, whatever the clients do.
- Requests wait in ``lease_requests`` and are granted in the order they arrived
  (FIFO) by a scheduling pass that runs under a transaction-scoped advisory lock;
  any waiting client may run it.
- A lease ends on release, when its duration runs out, or when its holder stops
  sending keep-alives. A node whose heartbeat stops is offline: its lease ends and
  its running tasks are marked ``lost``.
- A node is never leased while a task of another session runs on it: after its
  lease ended it is ``draining`` until those tasks end. The agent serving it stops
  them when the lease ran out (:data:`STOP_REASONS`); a released or abandoned lease
  lets them finish unless ``jmp lease release --stop`` asks otherwise.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import psycopg

from jumpstarter.errors import Conflict, NotFound

HEARTBEAT_INTERVAL = float(os.environ.get("JMP_HEARTBEAT_INTERVAL", "2"))
"""Seconds between two heartbeats of a node agent, and two keep-alives of a client
(``JMP_HEARTBEAT_INTERVAL``)."""
HEARTBEAT_TIMEOUT = float(os.environ.get("JMP_HEARTBEAT_TIMEOUT", "10"))
"""A node not heard of for this long is offline; a lease or request not kept alive
for this long ends (``JMP_HEARTBEAT_TIMEOUT``)."""

EXPIRED = "expired"
RELEASED_STOP = "released, its tasks stopped"
STOP_REASONS = {
    EXPIRED: "the lease of session {session!r} ran out",
    RELEASED_STOP: "the lease of session {session!r} was released with --stop",
}
"""How a lease may end that stops its tasks, and the message those tasks then get."""
# Who runs what: a node with a running task of another session is leased to no one else.
_RUNNING = "SELECT DISTINCT node, session_id FROM tasks WHERE state = 'running'"

_SCHEDULE_LOCK = 7413520922
_CHANNEL = "jmp_leases"
_SWEEP_EVERY = 0.5
# Every time in the registry is the database's clock, so machines whose clocks
# disagree still agree on who holds what and since when.
_NOW = "extract(epoch from clock_timestamp())"


async def _db_now(db: Any) -> float:
    return float((await (await db.execute(f"SELECT {_NOW}")).fetchone())[0])


@dataclass
class LeaseRecord:
    id: int
    node: str
    session_id: str
    session_name: str
    holder: str | None
    since: float
    expires_at: float | None


@dataclass
class NodeRecord:
    name: str
    labels: dict[str, str]
    endpoint: str | None
    transport: str
    driver: str
    agent: str | None
    last_seen: float
    online: bool
    lease: LeaseRecord | None = None
    running: bool = False
    unhealthy: str | None = None  # the error of the lease hook that failed
    hook_running: bool = False
    status: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.online:
            self.status = "offline"
        elif self.lease:
            self.status = "leased"
        elif self.unhealthy:
            self.status = "unhealthy"
        elif self.hook_running:
            self.status = "draining"
        else:
            # No lease, but tasks of an ended one still run: no one gets it meanwhile.
            self.status = "draining" if self.running else "free"


def format_selector(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items())) or "(any)"


class NodeRegistry:
    """Nodes and leases in a :class:`~jumpstarter.store.postgres.PostgresStore`."""

    def __init__(self, store: Any, *, heartbeat_timeout: float = HEARTBEAT_TIMEOUT) -> None:
        self.store = store
        self.pool = store._pool
        self.heartbeat_timeout = heartbeat_timeout
        self._swept = 0.0

    # --- nodes ---------------------------------------------------------------------

    async def register(
        self,
        name: str,
        *,
        labels: dict[str, str],
        endpoint: str | None,
        transport: str,
        driver: str,
        agent: str,
    ) -> None:
        """Add or refresh the node ``name``; it is online from now on."""
        async with self.pool.connection() as db:
            await db.execute(
                "INSERT INTO nodes (name, labels, endpoint, transport, driver, agent, registered_at, last_seen)"
                f" VALUES (%s, %s, %s, %s, %s, %s, {_NOW}, {_NOW})"
                " ON CONFLICT (name) DO UPDATE SET labels = EXCLUDED.labels, endpoint = EXCLUDED.endpoint,"
                " transport = EXCLUDED.transport, driver = EXCLUDED.driver, agent = EXCLUDED.agent,"
                " last_seen = EXCLUDED.last_seen",
                (name, json.dumps(labels), endpoint, transport, driver, agent),
            )

    async def heartbeat(self, name: str) -> None:
        async with self.pool.connection() as db:
            await db.execute(f"UPDATE nodes SET last_seen = {_NOW} WHERE name = %s", (name,))

    async def go_offline(self, name: str) -> None:
        """The agent stops serving: the node is offline at once."""
        async with self.pool.connection() as db:
            await db.execute("UPDATE nodes SET last_seen = 0 WHERE name = %s", (name,))

    async def set_health(self, name: str, error: str | None) -> None:
        """Mark node ``name`` unhealthy with a lease hook's ``error`` (it is leased by
        label to no one), or healthy again (None: a hook succeeded, ``jmp node clear``)."""
        async with self.pool.connection() as db:
            await db.execute("UPDATE nodes SET unhealthy = %s WHERE name = %s", (error, name))

    async def set_hook_running(self, name: str, running: bool) -> None:
        """While node ``name`` runs its after_lease hook, it is leased to no one."""
        async with self.pool.connection() as db:
            await db.execute("UPDATE nodes SET hook_running = %s WHERE name = %s", (int(running), name))

    async def remove(self, name: str) -> None:
        """Forget node ``name`` (one that will not come back): :class:`Conflict` while
        it is online, or holds a lease; its tasks and results stay."""
        record = await self.node(name)
        if record.online or record.lease is not None:
            raise Conflict(f"node {name!r} is {record.status}: only an offline node can be removed")
        async with self.pool.connection() as db, db.transaction():
            await db.execute(
                "DELETE FROM lease_requests WHERE lease_id IN (SELECT id FROM leases WHERE node = %s)", (name,)
            )
            await db.execute("DELETE FROM leases WHERE node = %s", (name,))
            await db.execute("DELETE FROM nodes WHERE name = %s", (name,))

    async def waiting(self) -> list[dict[str, Any]]:
        """Requests waiting in line for a node, oldest first."""
        await self.sweep()
        async with self.pool.connection() as db:
            rows = await (
                await db.execute(
                    "SELECT id, selector, session_id, session_name, holder, requested_at FROM lease_requests"
                    " WHERE lease_id IS NULL ORDER BY id"
                )
            ).fetchall()
        return [
            {
                "request": r[0], "selector": r[1], "session_id": r[2],
                "session_name": r[3], "holder": r[4], "since": r[5],
            }
            for r in rows
        ]

    async def nodes(self) -> list[NodeRecord]:
        await self.sweep()
        async with self.pool.connection() as db:
            rows = await (
                await db.execute(
                    "SELECT n.name, n.labels, n.endpoint, n.transport, n.driver, n.agent, n.last_seen,"
                    " l.id, l.session_id, l.session_name, l.holder, l.since, l.expires_at,"
                    f" n.last_seen >= {_NOW} - %s,"
                    " EXISTS (SELECT 1 FROM tasks t WHERE t.node = n.name AND t.state = 'running'),"
                    " n.unhealthy, n.hook_running"
                    " FROM nodes n LEFT JOIN leases l ON l.node = n.name AND l.ended_at IS NULL"
                    " ORDER BY n.name",
                    (self.heartbeat_timeout,),
                )
            ).fetchall()
        return [
            NodeRecord(
                name=r[0],
                labels=r[1],
                endpoint=r[2],
                transport=r[3],
                driver=r[4],
                agent=r[5],
                last_seen=r[6],
                online=r[13],
                running=r[14],
                unhealthy=r[15],
                hook_running=bool(r[16]),
                lease=LeaseRecord(r[7], r[0], r[8], r[9], r[10], r[11], r[12]) if r[7] else None,
            )
            for r in rows
        ]

    async def _node(self, lease: LeaseRecord) -> NodeRecord:
        """The node ``lease`` holds (one query, no sweep: the lease is fresh)."""
        async with self.pool.connection() as db:
            r = await (
                await db.execute(
                    "SELECT name, labels, endpoint, transport, driver, agent, last_seen FROM nodes WHERE name = %s",
                    (lease.node,),
                )
            ).fetchone()
        return NodeRecord(*r, online=True, lease=lease)

    async def node(self, name: str) -> NodeRecord:
        for record in await self.nodes():
            if record.name == name:
                return record
        raise NotFound(f"no node named {name!r} in the registry")

    # --- leases ---------------------------------------------------------------------

    async def acquire(
        self,
        selector: dict[str, str],
        *,
        session_id: str,
        session_name: str,
        holder: str | None = None,
        duration: float | None = None,
        wait: float | None = None,
    ) -> tuple[LeaseRecord, NodeRecord]:
        """Lease any free online node whose labels include ``selector``; wait up to
        ``wait`` seconds, in FIFO order with other waiters. :class:`NotFound` when no
        node matches at all, :class:`Conflict` when all matching nodes stay busy."""
        async with self.pool.connection() as db:
            (request_id,) = await (
                await db.execute(
                    "INSERT INTO lease_requests (selector, session_id, session_name, holder, duration,"
                    f" requested_at, keepalive_at) VALUES (%s, %s, %s, %s, %s, {_NOW}, {_NOW}) RETURNING id",
                    (json.dumps(selector), session_id, session_name, holder, duration),
                )
            ).fetchone()
        deadline = time.monotonic() + (wait or 0)
        try:
            granted = await self._schedule(request_id)
            if granted is None:
                # Wait on a connection of our own: whoever frees a node runs the
                # scheduling pass and notifies the request it granted (LISTEN/NOTIFY);
                # the timeout makes us look again, for leases that ran out.
                async with await psycopg.AsyncConnection.connect(self.store.url, autocommit=True) as listener:
                    await listener.execute(f"LISTEN {_CHANNEL}_{request_id}")
                    granted = await self._granted(request_id)
                    while granted is None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise await self._unavailable(selector, wait)
                        heard = False
                        async for _ in listener.notifies(timeout=min(left, 1.0), stop_after=1):
                            heard = True
                        granted = await (self._granted(request_id) if heard else self._schedule(request_id))
            lease = await self._lease(granted)
            return lease, await self._node(lease)
        finally:
            with anyio.CancelScope(shield=True):
                async with self.pool.connection() as db:
                    await db.execute("DELETE FROM lease_requests WHERE id = %s", (request_id,))

    async def _granted(self, request_id: int) -> int | None:
        async with self.pool.connection() as db:
            row = await (
                await db.execute(
                    f"UPDATE lease_requests SET keepalive_at = {_NOW} WHERE id = %s RETURNING lease_id",
                    (request_id,),
                )
            ).fetchone()
        return row[0] if row else None

    async def _unavailable(self, selector: dict[str, str], wait: float | None) -> Exception:
        matching = [n for n in await self.nodes() if _matches(n.labels, selector)]
        if not matching:
            return NotFound(f"no node matches {format_selector(selector)}")
        busy = ", ".join(f"{n.name} ({n.status})" for n in matching)
        waited = f" after waiting {wait:g}s" if wait else ""
        return Conflict(f"no free node matches {format_selector(selector)}{waited}: {busy}")

    async def lease_node(
        self, node: str, *, session_id: str, session_name: str, holder: str | None = None,
        duration: float | None = None,
    ) -> LeaseRecord:
        """Lease the node named ``node`` for this session, now or :class:`Conflict`.
        A session that holds it already gets its lease back."""
        await self.sweep()
        async with self.pool.connection() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEDULE_LOCK,))
            live = await (
                await db.execute(
                    "SELECT id, session_id, session_name, since FROM leases WHERE node = %s AND ended_at IS NULL",
                    (node,),
                )
            ).fetchone()
            if live is not None:
                if live[1] == session_id:
                    return await self._lease(live[0], db)
                since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(live[3]))
                raise Conflict(
                    f"node {node!r} is leased by session {live[2]!r} ({live[1]}) since {since}",
                    details={"session_id": live[1], "since": since},
                )
            hook = await (await db.execute("SELECT hook_running FROM nodes WHERE name = %s", (node,))).fetchone()
            if hook and hook[0]:
                raise Conflict(f"node {node!r} is draining: its after_lease hook runs", details={"draining": True})
            others = await (
                await db.execute(
                    "SELECT DISTINCT t.session_id, s.name FROM tasks t LEFT JOIN sessions s ON s.id = t.session_id"
                    " WHERE t.node = %s AND t.state = 'running' AND t.session_id IS DISTINCT FROM %s",
                    (node, session_id),
                )
            ).fetchall()
            if others:
                sessions = ", ".join(f"{name!r} ({sid})" for sid, name in others)
                raise Conflict(
                    f"node {node!r} is draining: tasks of session {sessions} still run on it",
                    details={"draining": True},
                )
            (lease_id,) = await (
                await db.execute(
                    "INSERT INTO leases (node, session_id, session_name, holder, since, expires_at, keepalive_at)"
                    f" VALUES (%s, %s, %s, %s, {_NOW}, {_NOW} + %s, {_NOW}) RETURNING id",
                    (node, session_id, session_name, holder, duration),
                )
            ).fetchone()
            return await self._lease(lease_id, db)

    async def live_lease(self, node: str) -> LeaseRecord | None:
        """The live lease on ``node``, if any."""
        await self.sweep()
        async with self.pool.connection() as db:
            row = await (
                await db.execute("SELECT id FROM leases WHERE node = %s AND ended_at IS NULL", (node,))
            ).fetchone()
        return await self._lease(row[0]) if row else None

    async def keepalive(self, lease_id: int) -> bool:
        """Keep a lease alive; False if it has ended."""
        async with self.pool.connection() as db:
            row = await (
                await db.execute(
                    f"UPDATE leases SET keepalive_at = {_NOW} WHERE id = %s AND ended_at IS NULL RETURNING id",
                    (lease_id,),
                )
            ).fetchone()
        return row is not None

    async def lease_live(self, lease_id: int) -> bool:
        """True while the lease has not ended."""
        async with self.pool.connection() as db:
            row = await (
                await db.execute("SELECT 1 FROM leases WHERE id = %s AND ended_at IS NULL", (lease_id,))
            ).fetchone()
        return row is not None

    async def release(self, lease_id: int, reason: str = "released") -> bool:
        """End a lease; False if it had ended already."""
        async with self.pool.connection() as db:
            row = await (
                await db.execute(
                    f"UPDATE leases SET ended_at = {_NOW}, end_reason = %s WHERE id = %s AND ended_at IS NULL"
                    " RETURNING id",
                    (reason, lease_id),
                )
            ).fetchone()
        if row is not None:
            await self._schedule(None)  # hand the node to whoever waits for it
        return row is not None

    async def stop_tasks_of_last_lease(self, node: str) -> int | None:
        """``jmp lease release --stop`` on a node whose lease has ended already: the
        tasks of that lease are to be stopped (by the node's agent, within a
        heartbeat). The id of that lease, or None if the node never had one."""
        async with self.pool.connection() as db:
            row = await (
                await db.execute(
                    "UPDATE leases SET end_reason = %s WHERE id ="
                    " (SELECT id FROM leases WHERE node = %s AND ended_at IS NOT NULL ORDER BY id DESC LIMIT 1)"
                    " RETURNING id",
                    (RELEASED_STOP, node),
                )
            ).fetchone()
        return row[0] if row else None

    async def tasks_to_stop(self, node: str) -> list[tuple[str, str]]:
        """Sessions whose tasks still run on ``node`` although their lease there ended
        in a way that stops them (ran out, released with ``--stop``), and no newer
        lease of theirs holds it: ``(session id, why)`` for each."""
        async with self.pool.connection() as db:
            rows = await (
                await db.execute(
                    "SELECT DISTINCT l.session_id, l.session_name, l.end_reason FROM leases l"
                    " JOIN tasks t ON t.node = l.node AND t.session_id = l.session_id AND t.state = 'running'"
                    " WHERE l.node = %s AND l.end_reason = ANY(%s) AND NOT EXISTS"
                    " (SELECT 1 FROM leases m WHERE m.node = l.node AND m.session_id = l.session_id"
                    " AND m.ended_at IS NULL)",
                    (node, list(STOP_REASONS)),
                )
            ).fetchall()
        return [(sid, STOP_REASONS[reason].format(session=name)) for sid, name, reason in rows]

    async def leases(self) -> list[LeaseRecord]:
        await self.sweep()
        async with self.pool.connection() as db:
            rows = await (
                await db.execute(
                    "SELECT id, node, session_id, session_name, holder, since, expires_at FROM leases"
                    " WHERE ended_at IS NULL ORDER BY since"
                )
            ).fetchall()
        return [LeaseRecord(*row) for row in rows]

    async def _lease(self, lease_id: int, db: Any = None) -> LeaseRecord:
        sql = "SELECT id, node, session_id, session_name, holder, since, expires_at FROM leases WHERE id = %s"
        if db is None:
            async with self.pool.connection() as db:
                row = await (await db.execute(sql, (lease_id,))).fetchone()
        else:
            row = await (await db.execute(sql, (lease_id,))).fetchone()
        if row is None:
            raise NotFound(f"no lease with id {lease_id}")
        return LeaseRecord(*row)

    # --- housekeeping ------------------------------------------------------------------

    async def sweep(self) -> None:
        """End what has run out: leases past their duration or keep-alive, requests
        no longer kept alive, and nodes not heard of (their running tasks: ``lost``)."""
        self._swept = time.monotonic()
        async with self.pool.connection() as db, db.transaction():
            now = await _db_now(db)
            stale = now - self.heartbeat_timeout
            await db.execute(
                "UPDATE leases SET ended_at = %s, end_reason = %s"
                " WHERE ended_at IS NULL AND expires_at IS NOT NULL AND expires_at <= %s",
                (now, EXPIRED, now),
            )
            await db.execute(
                "UPDATE leases SET ended_at = %s, end_reason = 'holder gone'"
                " WHERE ended_at IS NULL AND keepalive_at < %s",
                (now, stale),
            )
            await db.execute(
                "UPDATE leases SET ended_at = %s, end_reason = 'node offline' WHERE ended_at IS NULL"
                " AND node IN (SELECT name FROM nodes WHERE last_seen < %s)",
                (now, stale),
            )
            await db.execute("DELETE FROM lease_requests WHERE lease_id IS NULL AND keepalive_at < %s", (stale,))
            await db.execute(
                "UPDATE tasks SET state = 'lost', message = 'the node went offline', finished_at = %s"
                " WHERE state = 'running' AND node IN (SELECT name FROM nodes WHERE last_seen < %s)",
                (now, stale),
            )

    async def _schedule(self, request_id: int | None) -> int | None:
        """Grant waiting requests in arrival order, each the first free matching node;
        the lease id granted to ``request_id``, if any."""
        if time.monotonic() - self._swept >= _SWEEP_EVERY:
            await self.sweep()
        async with self.pool.connection() as db, db.transaction():
            await db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEDULE_LOCK,))
            now = await _db_now(db)
            stale = now - self.heartbeat_timeout
            if request_id is not None:
                await db.execute("UPDATE lease_requests SET keepalive_at = %s WHERE id = %s", (now, request_id))
            waiting = await (
                await db.execute(
                    "SELECT id, selector, session_id, session_name, holder, duration, lease_id"
                    " FROM lease_requests WHERE lease_id IS NULL OR id = %s ORDER BY id",
                    (request_id,),
                )
            ).fetchall()
            free = await (
                await db.execute(
                    "SELECT name, labels FROM nodes WHERE last_seen >= %s AND unhealthy IS NULL"
                    " AND hook_running = 0 AND name NOT IN"
                    " (SELECT node FROM leases WHERE ended_at IS NULL) ORDER BY name",
                    (stale,),
                )
            ).fetchall()
            mine = None
            running = await (await db.execute(_RUNNING)).fetchall() if waiting else []
            for rid, selector, session_id, session_name, holder, duration, lease_id in waiting:
                if lease_id is None:
                    busy = {node for node, owner in running if owner != session_id}
                    pick = next((n for n in free if n[0] not in busy and _matches(n[1], selector)), None)
                    if pick is None:
                        continue
                    free.remove(pick)
                    (lease_id,) = await (
                        await db.execute(
                            # Dated by the clock as it inserts: after the release
                            # that freed the node committed, so spans never overlap.
                            "INSERT INTO leases (node, session_id, session_name, holder, since, expires_at,"
                            f" keepalive_at, request_id) VALUES (%s, %s, %s, %s, {_NOW}, {_NOW} + %s, {_NOW}, %s)"
                            " RETURNING id",
                            (pick[0], session_id, session_name, holder, duration, rid),
                        )
                    ).fetchone()
                    await db.execute("UPDATE lease_requests SET lease_id = %s WHERE id = %s", (lease_id, rid))
                    await db.execute(f"NOTIFY {_CHANNEL}_{rid}")  # its waiter may be elsewhere
                if rid == request_id:
                    mine = lease_id
            return mine


def _matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


async def lease_for_session(
    session: Any, selector: dict[str, str], *, duration: float | None, wait: float | None
) -> tuple[Any, Callable[[], Awaitable[None]]]:
    """Lease a node matching ``selector`` for ``session`` and keep the lease alive
    from the session's task group. Returns how to reach the node and how to end the
    lease. Tokens and CA for nodes found this way: ``[nodes.NAME]`` if the config
    names the node, else the ``[registry]`` section."""
    import os
    import socket

    from jumpstarter.errors import ConfigError
    from jumpstarter.store.base import open_store

    config = session.protocol.config
    url = config.store_url
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"selecting nodes by label needs a postgresql:// store; the store is {url}")
    store = open_store(url)
    await store.open()
    registry = NodeRegistry(store)
    try:
        lease, record = await registry.acquire(
            selector,
            session_id=session.id,
            session_name=session.name,
            holder=f"{socket.gethostname()}:{os.getpid()}",
            duration=duration,
            wait=wait,
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await store.aclose()
        raise
    keepalive = anyio.CancelScope()

    async def keep_alive() -> None:
        with keepalive:
            while await registry.keepalive(lease.id):
                await anyio.sleep(HEARTBEAT_INTERVAL)

    session._tg.start_soon(keep_alive)

    async def release() -> None:
        keepalive.cancel()
        with anyio.CancelScope(shield=True):
            try:
                await registry.release(lease.id)
            finally:
                await store.aclose()

    node = config.registered_node(
        record.name, transport=record.transport, endpoint=record.endpoint, driver=record.driver, labels=record.labels
    )
    return node, release
