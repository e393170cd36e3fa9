"""Who holds a node: its lease, and the sessions waiting in line for it.

A node served on its own keeps its lease here, in memory: one holder at a time, a
queue served first come, first served. A node whose store is shared (``jmp node serve
--store postgresql://…``) keeps it in the registry instead, where clients that select
nodes by label take leases too: one live lease per node, whoever asks.

Either way a node is never handed on while a task of another session runs on it.
When a lease ends the node is ``draining`` until the tasks of its session have ended:
a lease whose duration ran out stops them (SIGTERM, then SIGKILL after a grace; each
ends ``stopped`` saying why); a released or abandoned one (its client stopped sending
keep-alives) lets them finish.
"""

from __future__ import annotations

import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup
from jumpstarter_protocol import ConnectNode

from jumpstarter.errors import Conflict
from jumpstarter.node.hooks import LeaseHooks


@dataclass
class Lease:
    id: str
    session_id: str
    session_name: str
    since: float
    expires_at: float | None
    kept_here: bool = True
    """This node keeps the lease alive. A lease a client took in the registry (by
    selector) is kept alive by that client alone, so it ends within the heartbeat
    timeout once the client dies, whatever its connection to the node still seems."""
    ready: bool = True  # False once its before_lease hook failed: nothing to clean up after


@dataclass
class _LeaseWaiter:
    """A session in the queue for the node's lease (``ConnectNode`` with ``wait``)."""

    session_id: str
    session_name: str
    duration: float | None
    granted: anyio.Event = field(default_factory=anyio.Event)
    lease: Lease | None = None


class Leases:
    """The lease of one node (named ``node``), for the sessions that ask for it.

    ``registry`` is a :class:`~jumpstarter.store.registry.NodeRegistry` when the
    store is shared; ``holder`` names this node's agent in it."""

    def __init__(self, node: str, *, holder: str) -> None:
        self.node = node
        self.holder = holder
        self.registry: Any = None
        self._lease: Lease | None = None
        self._changed = anyio.Event()
        self._queue: deque[_LeaseWaiter] = deque()
        self._tg: TaskGroup | None = None
        self._names: dict[str, str] = {}  # session id -> name, of the sessions that held it
        self.hooks: LeaseHooks | None = None
        self.unhealthy: str | None = None  # the last failed hook's error
        self._to_clean: list[Lease] = []  # ended leases whose after_lease hook is due
        self._cleaning = False
        # What runs on the node, from its tasks (the node server sets both).
        self.sessions_running: Callable[[], set[str | None]] = set
        self.stop_session: Callable[[str | None, str], Any] = lambda session_id, reason: 0

    def serve_in(self, tg: TaskGroup) -> None:
        """Where work that outlives a call runs (a registry release, ending leases
        whose duration ran out)."""
        self._tg = tg
        tg.start_soon(self._watch)

    async def _watch(self) -> None:
        # A lease whose duration ran out ends (and stops its tasks) even when no one looks.
        while True:
            lease = self._lease
            patience = 1.0
            if lease is not None and lease.expires_at is not None:
                patience = min(patience, max(0.0, lease.expires_at - time.time()) + 0.01)
            with anyio.move_on_after(patience):
                await self._changed.wait()
            self.current()

    def current(self) -> Lease | None:
        """The live lease, if any; one whose duration ran out ends when looked at,
        and its session's tasks are stopped."""
        lease = self._lease
        if lease and lease.expires_at is not None and lease.expires_at <= time.time():
            self.stop_session(lease.session_id, f"the lease of session {lease.session_name!r} ran out")
            if self.registry is not None:
                self._lease = None  # the registry ends it and hands the node on
                self._ended(lease)
                return None
            self._set(None)
            return self._lease  # handed to the next session in the queue, once drained
        return lease

    async def live(self) -> Lease | None:
        """The live lease of the node, wherever it is kept."""
        if self.registry is None:
            return self.current()
        record = await self.registry.live_lease(self.node)
        if record is None:
            return None
        return Lease(str(record.id), record.session_id, record.session_name, record.since, record.expires_at)

    def conflict(self, holder: Lease | None) -> Conflict:
        """The error for a session that wants the node ``holder`` holds (None: the
        node is draining)."""
        return self._conflict(holder)

    def _busy_for(self, session_id: str | None) -> set[str | None]:
        """The other sessions whose tasks run on the node (and the after_lease hook,
        as one more, while it is due)."""
        busy = self.sessions_running() - {session_id}
        return busy | {"after_lease"} if self._to_clean else busy

    def task_ended(self) -> None:
        """A task of the node ended: a drained node goes to the next in line."""
        self._clean_soon()
        if self.registry is None and self._lease is None and self._queue:
            self._set(None)

    # --- hooks ----------------------------------------------------------------------

    async def before(self, lease: Lease) -> str | None:
        """Before ``lease`` (new to its session) is used: run the ``before_lease``
        hook. None if the node may be used; else why not (the hook's error, or the
        error that left the node unhealthy when it has no such hook)."""
        if self.hooks is None or not self.hooks.before_lease:
            return self.unhealthy
        error = await self.hooks.run("before_lease", session_name=lease.session_name, lease_id=lease.id)
        lease.ready = error is None
        await self.set_health(error)
        return error

    async def set_health(self, error: str | None) -> None:
        """Mark the node unhealthy with ``error``, or healthy (None)."""
        self.unhealthy = error
        if self.registry is not None:
            await self.registry.set_health(self.node, error)

    def release_all(self) -> None:
        """The node server stops: its lease, if any, ends (hooks due for it run)."""
        if self._lease is not None:
            self.release(self._lease.session_id)

    async def settle(self) -> None:
        """Wait for the after_lease hooks that are due (the node server stops: its
        tasks have been stopped, so each can run now)."""
        self._clean_soon()
        while self._to_clean:
            await anyio.sleep(0.05)
            self._clean_soon()

    def _ended(self, lease: Lease) -> None:
        """``lease`` has ended: its after_lease hook runs once its tasks have."""
        if self.hooks is not None and self.hooks.after_lease and lease.ready:
            self._to_clean.append(lease)
            self._clean_soon()

    def _clean_soon(self) -> None:
        if self._cleaning or not self._to_clean or self._tg is None:
            return
        lease = self._to_clean[0]
        if lease.session_id in self.sessions_running():
            return  # when its last task ends
        self._cleaning = True
        self._tg.start_soon(self._after, lease)

    async def _after(self, lease: Lease) -> None:
        assert self.hooks is not None
        if self.registry is not None:
            await self.registry.set_hook_running(self.node, True)
        try:
            error = await self.hooks.run("after_lease", session_name=lease.session_name, lease_id=lease.id)
            if error is not None:
                await self.set_health(error)
        finally:
            if self.registry is not None:
                with anyio.CancelScope(shield=True):
                    await self.registry.set_hook_running(self.node, False)
            self._to_clean.remove(lease)
            self._cleaning = False
        self._clean_soon()
        if self.registry is None and self._lease is None and self._queue:
            self._set(None)

    def held_by(self, session_id: str | None) -> bool:
        holder = self.current()
        return holder is not None and holder.session_id == session_id

    def _set(self, lease: Lease | None) -> None:
        # A lease let go of goes straight to the session that has waited longest, so
        # waiting is first come, first served, and no one can slip in between.
        previous = self._lease
        if previous is not None and (lease is None or lease.id != previous.id):
            self._ended(previous)
        if lease is None and self._queue and not self._busy_for(self._queue[0].session_id):
            waiter = self._queue.popleft()
            lease = waiter.lease = self._new(waiter.session_id, waiter.session_name, waiter.duration)
            waiter.granted.set()
        self._lease = lease
        self._changed.set()
        self._changed = anyio.Event()

    def _new(self, session_id: str, session_name: str, duration: float | None) -> Lease:
        if len(self._names) > 1000:
            self._names.clear()  # only the last few holders' tasks can still run
        self._names[session_id] = session_name
        now = time.time()
        return Lease(secrets.token_hex(8), session_id, session_name, now, now + duration if duration else None)

    def _conflict(self, holder: Lease | None) -> Conflict:
        if holder is None and self._to_clean and not self._busy_for(None) - {"after_lease"}:
            return Conflict(
                f"node {self.node!r} is draining: its after_lease hook runs",
                details={"draining": True, "waiting": len(self._queue)},
            )
        if holder is None:
            others = ", ".join(
                sorted(f"{self._names.get(s, '?')!r} ({s})" for s in self.sessions_running() if s is not None)
            )
            return Conflict(
                f"node {self.node!r} is draining: tasks of session {others} still run on it",
                details={"draining": True, "waiting": len(self._queue)},
            )
        since = datetime.fromtimestamp(holder.since, UTC).isoformat(timespec="seconds")
        return Conflict(
            f"node {self.node!r} is leased by session {holder.session_name!r} "
            f"({holder.session_id}) since {since}",
            details={"session_id": holder.session_id, "since": since, "waiting": len(self._queue)},
        )

    async def acquire(self, session_id: str, session_name: str, request: ConnectNode) -> Lease:
        """Take the lease for the session, or renew it. When another session holds
        it: :class:`Conflict` at once, or with ``request.wait`` a place in the queue
        (first come, first served) for up to that many seconds."""
        if self.registry is not None:
            return await self._acquire_in_registry(session_id, session_name, request)
        holder = self.current()
        if holder is not None and holder.session_id == session_id:
            expires = time.time() + request.duration if request.duration else None
            lease = Lease(holder.id, session_id, session_name, holder.since, expires)
            self._set(lease)
            return lease
        free = holder is None and not self._queue and not self._busy_for(session_id)
        if free:  # a lease let go of goes to the queue first
            lease = self._new(session_id, session_name, request.duration)
            self._set(lease)
            return lease
        if not request.wait:
            raise self._conflict(holder)
        waiter = _LeaseWaiter(session_id, session_name, request.duration)
        self._queue.append(waiter)
        taken = False
        try:
            with anyio.move_on_after(request.wait):
                while not waiter.granted.is_set():
                    # Look at least once a second: a lease whose duration ran out ends
                    # only when someone looks.
                    with anyio.move_on_after(1.0):
                        await waiter.granted.wait()
                    self.current()
            if waiter.lease is not None:
                taken = True
                return waiter.lease
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)
            elif not taken and self._lease is waiter.lease:
                self._set(None)  # granted as this call was cancelled: pass it on
        holder = self.current()
        if holder is None and not self._busy_for(session_id):
            lease = self._new(session_id, session_name, request.duration)
            self._set(lease)
            return lease
        raise self._conflict(holder)

    def release(self, session_id: str | None) -> None:
        """The session lets go of the lease, if it holds it."""
        holder = self._lease
        if holder is None or holder.session_id != session_id:
            return
        if self.registry is not None and self._tg is not None:
            self._lease = None
            self._tg.start_soon(self.registry.release, int(holder.id))
            self._ended(holder)
            return
        self._set(None)

    async def _acquire_in_registry(self, session_id: str, session_name: str, request: ConnectNode) -> Lease:
        # Waiting in order is what selecting by label does; here ``wait`` retries.
        deadline = time.monotonic() + (request.wait or 0)
        while True:
            try:
                record = await self.registry.lease_node(
                    self.node,
                    session_id=session_id,
                    session_name=session_name,
                    holder=self.holder,
                    duration=request.duration,
                )
                break
            except Conflict:
                if time.monotonic() >= deadline:
                    raise
                await anyio.sleep(0.2)
        self._lease = Lease(
            str(record.id),
            record.session_id,
            record.session_name,
            record.since,
            record.expires_at,
            kept_here=record.holder == self.holder,
        )
        return self._lease

    async def keep_alive_in_registry(self) -> None:
        """Renew the current lease in the registry if this node keeps it alive, and
        forget it if it ended there (expired, its client stopped keeping it alive, or
        ended by ``jmp lease release``)."""
        lease = self._lease
        if lease is None:
            return
        if lease.kept_here:
            live = await self.registry.keepalive(int(lease.id))
        else:
            live = await self.registry.lease_live(int(lease.id))
        if not live and self._lease is lease:
            self._lease = None
            self._ended(lease)
