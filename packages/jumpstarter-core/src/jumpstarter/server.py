"""The node server: one dispatcher from protocol requests to a node driver and the store.

Every transport serves this same object. A transport opens one
:class:`NodeConnection` per client connection and hands it requests
(:meth:`NodeConnection.handle`) or raw frames (:meth:`NodeConnection.handle_bytes`);
output streams come from :meth:`NodeConnection.read_output`. A request never raises
out of the dispatcher: every failure becomes an ``Error`` reply and the server keeps
serving.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.abc import TaskStatus as StartedStatus  # not the protocol's TaskStatus
from jumpstarter_protocol import (
    MAX_MESSAGE_SIZE,
    AddResult,
    CloseTask,
    ConfigData,
    ConnectionEstablished,
    ConnectionInfo,
    ConnectNode,
    Error,
    ErrorCode,
    FetchConfig,
    GetTaskStatus,
    InitializeConnection,
    ListSessions,
    ListTasks,
    NewTask,
    NodeInfo,
    NodeReleased,
    OpenTask,
    OutputChunk,
    OutputEnd,
    Ping,
    Pong,
    ProtocolError,
    QueryHistory,
    QueryResults,
    ReadOutput,
    ReleaseNode,
    ResultAdded,
    SessionList,
    StartRequest,
    StopTask,
    TaskCreated,
    TaskInfo,
    TaskList,
    TaskSpec,
    TaskStarted,
    TaskState,
    TaskStatus,
    TaskStopped,
    WaitTask,
    decode,
    encode,
    negotiate_version,
)

from ._version import __version__
from .agent import alive as agent_alive
from .agent import kill_left_behind, request_stop
from .config import NodeConfig
from .driver import NodeDriver, RunningProcess
from .errors import BadRequest, Conflict, NodeError, NotFound, Unauthorized
from .output import OutputLog, give_back_reserved
from .store import Store

log = logging.getLogger(__name__)

OUTPUT_CHUNK = 1024 * 1024
"""Most bytes sent in one output chunk."""
POLL_INTERVAL = 0.05
"""How often a task run by another process is looked at (its output, its state)."""
STOP_GRACE_ON_SHUTDOWN = 2.0
TIMEOUT_GRACE = 5.0


def _now() -> datetime:
    return datetime.now(UTC)


_LIVE: set[str] = set()
"""Ids of the tasks that node servers in this process run or hold open. Every node
server of a process has the same agent (host:pid), so this, not the agent, tells a
new server which running tasks of its own process are not lost."""


@dataclass
class _Running:
    """A task this server runs."""

    task: TaskInfo
    process: RunningProcess
    output: OutputLog
    done: anyio.Event = field(default_factory=anyio.Event)
    stop_requested: bool = False
    timed_out: bool = False


@dataclass
class Lease:
    id: str
    session_id: str
    session_name: str
    since: float
    expires_at: float | None


@dataclass
class _LeaseWaiter:
    """A session in the queue for the node's lease (``ConnectNode`` with ``wait``)."""

    session_id: str
    session_name: str
    duration: float | None
    granted: anyio.Event = field(default_factory=anyio.Event)
    lease: Lease | None = None


class NodeServer:
    """Serves one node: its driver, its store, its leases and its running tasks.

    Run it with ``await task_group.start(server.run)``; :meth:`close` stops it,
    stopping the tasks it still runs.
    """

    def __init__(
        self,
        node: NodeConfig,
        driver: NodeDriver,
        store: Store,
        hook: Any,
        *,
        data_dir: Path,
        driver_name: str | None = None,
        token: str | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
    ) -> None:
        self.node = node
        self.driver = driver
        self.store = store
        self.hook = hook
        self.data_dir = data_dir
        self._agents_checked: dict[str, float] = {}  # task id -> when its agent was last looked at
        self.output_dir = data_dir / "output"
        self.token = token
        self.max_message_size = max_message_size
        self.info = NodeInfo(
            name=node.name,
            labels=node.labels,
            driver=driver_name or node.driver,
            capabilities=list(driver.capabilities),
            limits={"max_message_size": max_message_size, "output_chunk": OUTPUT_CHUNK},
            jumpstarter_version=__version__,
        )
        self.agent = f"{socket.gethostname()}:{os.getpid()}"
        self._running: dict[str, _Running] = {}
        self._open: dict[str, str | None] = {}  # tasks opened with OpenTask → their session
        self._lease: Lease | None = None
        self._lease_changed = anyio.Event()
        self._lease_queue: deque[_LeaseWaiter] = deque()
        self._closed = anyio.Event()
        self._tg: TaskGroup | None = None
        self._connections: weakref.WeakSet[NodeConnection] = weakref.WeakSet()
        self.registry: Any = None  # a NodeRegistry when the store is shared (serve --store)

    # --- life ---------------------------------------------------------------------------

    async def run(self, *, task_status: StartedStatus[NodeServer] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open the store, mark tasks a dead agent left running as ``lost``, serve
        until :meth:`close`, then stop what still runs."""
        await self.store.open()
        try:
            await self._mark_lost()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started(self)
                await self._closed.wait()
                with anyio.CancelScope(shield=True):
                    await self._stop_all()
                    await self._lose_open_tasks()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.driver.aclose()
                await self.store.aclose()

    def close(self) -> None:
        self._closed.set()

    async def _stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for running in list(self._running.values()):
                tg.start_soon(self._stop, running, STOP_GRACE_ON_SHUTDOWN)

    async def _lose_open_tasks(self) -> None:
        for task_id in list(self._open):
            del self._open[task_id]
            _LIVE.discard(task_id)
            task = await self.store.finish_task(
                task_id, TaskState.LOST, None, "the node server stopped before the task was closed"
            )
            self.hook.jmp_task_finished(task=task)

    async def _mark_lost(self) -> None:
        host = socket.gethostname()
        for task, agent in await self.store.running_tasks(self.node.name):
            agent_host, _, pid = (agent or "").rpartition(":")
            if task.id in _LIVE:
                continue  # another node server in this process runs it
            here = agent_host == host and pid.isdigit()
            if here and agent_alive(int(pid)) and agent != self.agent:
                continue  # another agent on this machine runs it
            if here:
                await self._lose(task)
            else:  # its agent is on another machine: so is whatever it left running
                await self.store.finish_task(task.id, TaskState.LOST, None, "the node agent went away")

    async def _lose(self, task: TaskInfo) -> TaskInfo:
        """Mark ``task`` lost because the agent on this machine that ran it died, and
        kill the process group it left behind, which nobody could stop otherwise."""
        pid = await self.store.task_pid(task.id)
        lost = await self.store.finish_task(task.id, TaskState.LOST, None, "the node agent went away")
        # A task that finished just as its agent went keeps its state: nothing to kill.
        if lost.state is TaskState.LOST and pid is not None and task.started_at is not None:
            kill_left_behind(pid, task.started_at.timestamp())
        give_back_reserved(self.output_dir, task.id)
        return lost

    def connect(self) -> NodeConnection:
        """A new client connection."""
        connection = NodeConnection(self)
        self._connections.add(connection)
        return connection

    # --- leases ---------------------------------------------------------------------------

    def _lease_holder(self) -> Lease | None:
        lease = self._lease
        if lease and lease.expires_at is not None and lease.expires_at <= time.time():
            self._set_lease(None)
            return self._lease  # handed to the next session in the queue, if any
        return lease

    def _set_lease(self, lease: Lease | None) -> None:
        # A lease let go of goes straight to the session that has waited longest, so
        # waiting is first come, first served, and no one can slip in between.
        if lease is None and self._lease_queue:
            waiter = self._lease_queue.popleft()
            lease = waiter.lease = self._new_lease(waiter.session_id, waiter.session_name, waiter.duration)
            waiter.granted.set()
        self._lease = lease
        self._lease_changed.set()
        self._lease_changed = anyio.Event()

    @staticmethod
    def _new_lease(session_id: str, session_name: str, duration: float | None) -> Lease:
        now = time.time()
        return Lease(secrets.token_hex(8), session_id, session_name, now, now + duration if duration else None)

    def _conflict(self, holder: Lease) -> Conflict:
        since = datetime.fromtimestamp(holder.since, UTC).isoformat(timespec="seconds")
        return Conflict(
            f"node {self.node.name!r} is leased by session {holder.session_name!r} "
            f"({holder.session_id}) since {since}",
            details={
                "session_id": holder.session_id,
                "since": since,
                "waiting": len(self._lease_queue),
            },
        )

    async def acquire(self, conn: NodeConnection, request: ConnectNode) -> Lease:
        """Take the lease for ``conn``'s session, or renew it. When another session
        holds it: :class:`Conflict` at once, or with ``request.wait`` a place in the
        queue (first come, first served) for up to that many seconds."""
        if self.registry is not None:
            return await self._acquire_in_registry(conn, request)
        session_id, session_name = conn.session_id or "", conn.session_name or ""
        holder = self._lease_holder()
        if holder is not None and holder.session_id == session_id:
            expires = time.time() + request.duration if request.duration else None
            lease = Lease(holder.id, session_id, session_name, holder.since, expires)
            self._set_lease(lease)
            return lease
        if holder is None:  # free; the queue is empty then, a released lease goes to it
            lease = self._new_lease(session_id, session_name, request.duration)
            self._set_lease(lease)
            return lease
        if not request.wait:
            raise self._conflict(holder)
        waiter = _LeaseWaiter(session_id, session_name, request.duration)
        self._lease_queue.append(waiter)
        taken = False
        try:
            with anyio.move_on_after(request.wait):
                while not waiter.granted.is_set():
                    # Look at least once a second: a lease whose duration ran out ends
                    # only when someone looks.
                    with anyio.move_on_after(1.0):
                        await waiter.granted.wait()
                    self._lease_holder()
            if waiter.lease is not None:
                taken = True
                return waiter.lease
        finally:
            if waiter in self._lease_queue:
                self._lease_queue.remove(waiter)
            elif not taken and self._lease is waiter.lease:
                self._set_lease(None)  # granted as this call was cancelled: pass it on
        holder = self._lease_holder()
        if holder is None:
            lease = self._new_lease(session_id, session_name, request.duration)
            self._set_lease(lease)
            return lease
        raise self._conflict(holder)

    def release(self, conn: NodeConnection) -> None:
        holder = self._lease
        if holder is not None and holder.session_id == conn.session_id:
            if self.registry is not None and self._tg is not None:
                self._lease = None
                self._tg.start_soon(self.registry.release, int(holder.id))
                return
            self._set_lease(None)

    async def _acquire_in_registry(self, conn: NodeConnection, request: ConnectNode) -> Lease:
        """With a shared store the lease lives in the registry, where clients that
        select nodes by label take it too: one live lease per node, whoever asks.
        (Waiting in order is what selecting by label does; here ``wait`` retries.)"""
        from .errors import Conflict as _Conflict

        deadline = time.monotonic() + (request.wait or 0)
        while True:
            try:
                record = await self.registry.lease_node(
                    self.node.name,
                    session_id=conn.session_id or "",
                    session_name=conn.session_name or "",
                    holder=self.agent,
                    duration=request.duration,
                )
                break
            except _Conflict:
                if time.monotonic() >= deadline:
                    raise
                await anyio.sleep(0.2)
        self._lease = Lease(str(record.id), record.session_id, record.session_name, record.since, record.expires_at)
        return self._lease

    async def keep_registered(self, *, endpoint: str, transport: str, interval: float) -> None:
        """Register this node in the shared registry, then send a heartbeat (and keep
        the current lease alive) every ``interval`` seconds until cancelled; the node
        goes offline at once when this ends."""
        registry = self.registry
        await registry.register(
            self.node.name,
            labels=self.node.labels,
            endpoint=endpoint,
            transport=transport,
            driver=self.info.driver,
            agent=self.agent,
        )
        try:
            while True:
                await anyio.sleep(interval)
                await registry.heartbeat(self.node.name)
                # Every agent also ends what ran out, so a node that died is marked
                # offline (its tasks lost) within the timeout even when no one looks.
                await registry.sweep()
                lease = self._lease
                if lease is not None and not await registry.keepalive(int(lease.id)):
                    if self._lease is lease:  # ended elsewhere (expired, jmp lease release)
                        self._lease = None
        finally:
            with anyio.CancelScope(shield=True):
                await registry.go_offline(self.node.name)

    def holds_lease(self, conn: NodeConnection) -> bool:
        holder = self._lease_holder()
        return holder is not None and holder.session_id == conn.session_id and conn.leased

    # --- tasks ----------------------------------------------------------------------------

    @staticmethod
    def check_spec(spec: TaskSpec) -> None:
        """:class:`BadRequest` for a spec no task can run with (a missing working
        directory); checked before anything is stored for it."""
        if spec.cwd is not None and not Path(spec.cwd).is_dir():
            raise BadRequest(f"working directory does not exist: {spec.cwd}")

    async def new_task(self, spec: TaskSpec, session_id: str | None) -> TaskInfo:
        self.check_spec(spec)
        return await self._create_task(spec, session_id)

    async def _create_task(self, spec: TaskSpec, session_id: str | None) -> TaskInfo:
        """Store a new pending task for ``spec`` and tell the plugins."""
        task = TaskInfo(
            id=secrets.token_hex(6),
            node=self.node.name,
            session_id=session_id,
            name=spec.name,
            spec=spec,
            state=TaskState.PENDING,
            created_at=_now(),
        )
        await self.store.create_task(task, self.agent)
        self.hook.jmp_task_created(task=task)
        return task

    async def start_task(self, task: TaskInfo, *, created_here: bool) -> TaskStarted:
        if task.state is not TaskState.PENDING:
            raise Conflict(f"task {task.id} is {task.state.value}, not pending; it cannot start again")
        self.check_spec(task.spec)  # again: the directory may have gone since it was created
        assert self._tg is not None, "the node server is not running"
        output = OutputLog.create(self.output_dir, task.id)
        try:
            process = await self.driver.spawn(task.spec, output)
        except BaseException:
            output.remove()
            if created_here:
                with anyio.CancelScope(shield=True):
                    await self.discard_task(task)
            raise
        running = _Running(task, process, output)
        self._running[task.id] = running
        _LIVE.add(task.id)
        running.task = await self.store.mark_running(task.id, process.pid, self.agent)
        self.hook.jmp_task_started(task=running.task)
        self._tg.start_soon(self._supervise, running)
        return TaskStarted(task_id=task.id, started_at=running.task.started_at or _now(), pid=process.pid)

    async def discard_task(self, task: TaskInfo) -> None:
        """Remove the pending ``task`` created for a start whose command could not
        start, and its session if that has no other task: bad input leaves the store
        as it was. Connections of that session record it again with their next task."""
        await self.store.delete_pending_task(task.id)
        if task.session_id is not None and await self.store.delete_session_if_empty(task.session_id):
            for connection in list(self._connections):
                if connection.session_id == task.session_id:
                    connection._session_recorded = False

    async def open_task(self, spec: TaskSpec, session_id: str | None) -> TaskInfo:
        """Record work that runs outside the node as a task in state running."""
        task = await self._create_task(spec, session_id)
        # The agent is this server: if it goes away unclosed, the task is lost.
        task = await self.store.mark_running(task.id, None, self.agent)
        self._open[task.id] = session_id
        _LIVE.add(task.id)
        self.hook.jmp_task_started(task=task)
        return task

    async def close_task(self, request: CloseTask, session_id: str | None) -> TaskInfo:
        """Finish a task opened with :meth:`open_task` by the same session."""
        if request.task_id not in self._open:
            task = await self.store.get_task(request.task_id)  # NotFound for an unknown id
            if task.state.finished:
                return task  # as with stop: the answer is its final state
            raise Conflict(
                f"task {request.task_id} was not opened with open_task on this node server; "
                "only the session that opened a task can close it"
            )
        if self._open[request.task_id] != session_id:
            raise Conflict(
                f"task {request.task_id} was opened by another session; "
                "only the session that opened a task can close it"
            )
        del self._open[request.task_id]
        _LIVE.discard(request.task_id)
        task = await self.store.finish_task(
            request.task_id, request.state, request.exit_code, request.message
        )
        self.hook.jmp_task_finished(task=task)
        return task

    async def _supervise(self, running: _Running) -> None:
        exit_code: int | None = None
        exited = anyio.Event()

        async def wait_for_exit() -> None:
            nonlocal exit_code
            exit_code = await running.process.wait()
            exited.set()

        message = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_exit)
                with anyio.move_on_after(running.task.spec.timeout):
                    await exited.wait()
                if not exited.is_set():
                    running.timed_out = True
                    message = f"timed out after {running.task.spec.timeout:g}s"
                    await running.process.terminate(TIMEOUT_GRACE)
        except Exception as exc:  # a broken driver must not take the node down
            log.exception("node driver failed while task %s ran", running.task.id)
            message = f"node driver failed: {exc}"
        if running.stop_requested:
            state = TaskState.STOPPED
        elif running.timed_out:
            state = TaskState.TIMED_OUT
        elif exit_code == 0:
            state = TaskState.SUCCEEDED
        else:
            state = TaskState.FAILED
        with anyio.CancelScope(shield=True):
            running.task = await self.store.finish_task(running.task.id, state, exit_code, message)
            del self._running[running.task.id]  # readers go to the files from now on
            running.output.close()
            _LIVE.discard(running.task.id)
            running.done.set()
            running.output.wake()
            self.hook.jmp_task_finished(task=running.task)

    async def _stop(self, running: _Running, grace: float) -> TaskInfo:
        if not running.done.is_set():
            running.stop_requested = True
            await running.process.terminate(grace)
            await running.done.wait()
        return running.task

    async def stop_task(self, task_id: str, grace: float) -> TaskInfo:
        running = self._running.get(task_id)
        if running is not None:
            return await self._stop(running, grace)
        task = await self.store.get_task(task_id)
        if task.state is TaskState.PENDING:
            return await self.store.finish_task(task_id, TaskState.STOPPED, None, "stopped before it started")
        if task.state is TaskState.RUNNING:
            pid = await self._ask_agent_to_stop(task_id, grace)
            if pid is None:
                raise Conflict(f"task {task_id} runs under another node process; stop it there")
            return await self._wait_for_agent(task_id, pid)
        return task  # finished: the answer is its final state

    async def _ask_agent_to_stop(self, task_id: str, grace: float) -> int | None:
        """A detached task's agent on this machine is asked to stop it (see
        :mod:`jumpstarter.agent`); its pid, or None if the task runs elsewhere."""
        for task, agent in await self.store.running_tasks(self.node.name):
            if task.id == task_id and agent:
                return request_stop(self.data_dir, task_id, agent, grace)
        return None

    async def _wait_for_agent(self, task_id: str, pid: int) -> TaskInfo:
        """The final state of a task another process on this machine runs."""
        while True:
            task = await self.store.get_task(task_id)
            if task.state.finished:
                return task
            if not agent_alive(pid):
                task = await self.store.get_task(task_id)  # it may have finished as it went
                if task.state.finished:
                    return task
                return await self._lose(task)
            await anyio.sleep(POLL_INTERVAL)

    async def wait_task(self, task_id: str, timeout: float | None) -> TaskInfo:
        with anyio.move_on_after(timeout):
            while True:
                running = self._running.get(task_id)
                if running is not None:
                    await running.done.wait()
                    return running.task
                task = await self.store.get_task(task_id)
                if task.state.finished:
                    return task
                await anyio.sleep(POLL_INTERVAL)
                await self._lose_if_its_agent_died(task_id)
        return await self.store.get_task(task_id)

    async def _lose_if_its_agent_died(self, task_id: str) -> None:
        """Mark ``task_id`` lost if the process on this machine that runs it has died
        (say, killed), so that nobody waits for it or follows it forever. Looks at
        most once a second."""
        now = time.monotonic()
        if now - self._agents_checked.get(task_id, now - 2) < 1:
            return
        self._agents_checked[task_id] = now
        for task, agent in await self.store.running_tasks(self.node.name):
            agent_host, _, pid = (agent or "").rpartition(":")
            if task.id != task_id or task.id in _LIVE or agent == self.agent:
                continue
            if agent_host == socket.gethostname() and pid.isdigit() and not agent_alive(int(pid)):
                await self._lose(task)
        if len(self._agents_checked) > 1000:  # forget the tasks nobody asks about any more
            self._agents_checked.clear()

    async def read_output(
        self, request: ReadOutput
    ) -> AsyncGenerator[OutputChunk | OutputEnd, None]:
        task_id, offset = request.task_id, request.offset
        await self.store.get_task(task_id)  # NotFound for an unknown id
        reader: OutputLog | None = None
        try:
            while True:
                running = self._running.get(task_id)
                if running is not None:  # its newest output is in memory here
                    chunks = running.output.read(offset, OUTPUT_CHUNK)
                else:
                    reader = reader or OutputLog.open(self.output_dir, task_id)  # None before it starts
                    chunks = reader.read(offset, OUTPUT_CHUNK) if reader else []
                for start, stream, data in chunks:
                    yield OutputChunk(task_id=task_id, offset=start, stream=stream, data=data)
                    offset = start + len(data)
                if chunks:
                    continue
                task = running.task if running else await self.store.get_task(task_id)
                if task.state.finished or not request.follow:
                    # Bytes written by another process just before it finished the task
                    # (its log may even have appeared only then: logs are created with
                    # the first byte written).
                    if task.state.finished:
                        reader = reader or OutputLog.open(self.output_dir, task_id)
                        if reader and reader.read(offset, 1):
                            continue
                    yield OutputEnd(
                        task_id=task_id, offset=offset, state=task.state, exit_code=task.exit_code
                    )
                    return
                if running is not None:
                    await running.output.wait_beyond(offset)
                else:
                    await anyio.sleep(POLL_INTERVAL)
                    await self._lose_if_its_agent_died(task_id)
        finally:
            if reader is not None:
                reader.close()


class NodeConnection:
    """One client's connection to a node server: its handshake and its lease."""

    def __init__(self, server: NodeServer) -> None:
        self.server = server
        self.id = secrets.token_hex(8)
        self.session_id: str | None = None
        self.session_name: str | None = None
        self.initialized = False
        self.leased = False
        self.client = "jumpstarter"
        self._session_recorded = False
        self._handlers: dict[type, Callable[[Any], Any]] = {
            FetchConfig: self._fetch_config,
            InitializeConnection: self._initialize,
            ConnectNode: self._connect_node,
            StartRequest: self._start,
            StopTask: self._stop,
            NewTask: self._new_task,
            AddResult: self._add_result,
            QueryResults: self._query_results,
            GetTaskStatus: self._status,
            WaitTask: self._wait,
            ListTasks: self._list,
            Ping: self._ping,
            ReleaseNode: self._release,
            OpenTask: self._open_task,
            CloseTask: self._close_task,
            ListSessions: self._list_sessions,
            QueryHistory: self._history,
        }

    async def handle(self, request: Any) -> Any:
        """Answer one request. Never raises: failures become ``Error`` replies."""
        try:
            handler = self._handlers.get(type(request))
            if handler is None:
                raise BadRequest(f"{getattr(request, 'type', type(request).__name__)} is not a request")
            return await handler(request)
        except NodeError as exc:
            return exc.to_reply()
        except ProtocolError as exc:
            return Error(code=ErrorCode(exc.code), message=str(exc))
        except Exception as exc:
            log.exception("request %r failed", request)
            return Error(code=ErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}: {exc}")

    async def handle_bytes(self, data: bytes) -> bytes:
        """Decode a frame, answer it, encode the reply. Malformed input gets an
        ``Error`` reply; nothing was done."""
        try:
            request = decode(data, max_size=self.server.max_message_size)
        except ProtocolError as exc:
            return encode(Error(code=ErrorCode(exc.code), message=str(exc)))
        reply = await self.handle(request)
        try:
            return encode(reply, max_size=self.server.max_message_size)
        except ProtocolError as exc:  # a reply too large to send (say, a huge page)
            return encode(Error(code=ErrorCode(exc.code), message=f"the reply cannot be sent: {exc}"))

    async def read_output(self, request: ReadOutput) -> AsyncGenerator[Any, None]:
        """The output stream answering ``request``; an ``Error`` ends it early."""
        try:
            self._require_init()
            # Closed with this one: a stream its reader left lets go of the log at once.
            async with aclosing(self.server.read_output(request)) as messages:
                async for message in messages:
                    yield message
        except NodeError as exc:
            yield exc.to_reply()

    def close(self) -> None:
        """The client went away: its lease ends, its tasks run on."""
        if self.leased:
            self.server.release(self)
            self.leased = False

    # --- handlers --------------------------------------------------------------------------

    def _require_init(self) -> None:
        if not self.initialized:
            raise Unauthorized("send initialize_connection first")

    def _require_lease(self) -> None:
        self._require_init()
        if not self.server.holds_lease(self):
            raise Conflict(f"this session does not hold node {self.server.node.name!r}; connect first")

    async def _fetch_config(self, request: FetchConfig) -> ConfigData:
        if self.server.token is not None:
            self._require_init()
        return ConfigData(node=self.server.info)

    async def _initialize(self, request: InitializeConnection) -> ConnectionInfo:
        expected = self.server.token
        if expected is not None and not hmac.compare_digest(
            (request.token or "").encode(), expected.encode()
        ):
            raise Unauthorized("invalid or missing token")
        try:
            version = negotiate_version(request.min_version, request.max_version)
        except ProtocolError as exc:
            raise NodeError.from_reply(Error(code=ErrorCode.VERSION_MISMATCH, message=str(exc))) from None
        self.session_id = request.session_id
        self.session_name = request.session_name
        self.client = request.client
        self.initialized = True
        return ConnectionInfo(connection_id=self.id, protocol_version=version)

    async def _connect_node(self, request: ConnectNode) -> ConnectionEstablished:
        self._require_init()
        lease = await self.server.acquire(self, request)
        self.leased = True
        expires = datetime.fromtimestamp(lease.expires_at, UTC) if lease.expires_at else None
        return ConnectionEstablished(node=self.server.info, lease_id=lease.id, expires_at=expires)

    async def _release(self, request: ReleaseNode) -> NodeReleased:
        self._require_init()
        self.close()
        return NodeReleased()

    async def _session_for_task(self) -> str | None:
        """The session id to file a new task under, recorded in the store the first
        time (not at the handshake: a session that only reads leaves no trace)."""
        if not self._session_recorded:
            await self.server.store.add_session(self.session_id or "", self.session_name or "", self.client)
            self._session_recorded = True
        return self.session_id

    async def _new_task(self, request: NewTask) -> TaskCreated:
        self._require_lease()
        self.server.check_spec(request.spec)  # before the session is recorded
        return TaskCreated(task=await self.server.new_task(request.spec, await self._session_for_task()))

    async def _start(self, request: StartRequest) -> TaskStarted:
        self._require_lease()
        if request.spec is not None:
            self.server.check_spec(request.spec)  # before the session is recorded
            task = await self.server.new_task(request.spec, await self._session_for_task())
            return await self.server.start_task(task, created_here=True)
        assert request.task_id is not None
        task = await self._own_task(request.task_id)
        return await self.server.start_task(task, created_here=False)

    async def _own_task(self, task_id: str) -> TaskInfo:
        task = await self.server.store.get_task(task_id)
        if task.node != self.server.node.name:
            raise NotFound(f"no task with id {task_id!r} on node {self.server.node.name!r}")
        return task

    async def _stop(self, request: StopTask) -> TaskStopped:
        self._require_lease()
        await self._own_task(request.task_id)
        return TaskStopped(task=await self.server.stop_task(request.task_id, request.grace))

    async def _add_result(self, request: AddResult) -> ResultAdded:
        self._require_init()
        task = await self.server.store.get_task(request.task_id)
        if self.server.hook.jmp_result_added.get_hookimpls():
            results = await self.server.store.add_results(task, request.results)
            self.server.hook.jmp_result_added(task=task, results=results)
            return ResultAdded(ids=[r.id for r in results])
        # No plugin wants the stored results: skip building them (most of the cost of
        # a big batch after the insert itself).
        return ResultAdded(ids=await self.server.store.add_result_ids(task, request.results))

    async def _query_results(self, request: QueryResults) -> Any:
        self._require_init()
        return await self.server.store.query_results(request)

    async def _open_task(self, request: OpenTask) -> TaskCreated:
        self._require_init()  # no lease: the node runs nothing for it
        return TaskCreated(task=await self.server.open_task(request.spec, await self._session_for_task()))

    async def _close_task(self, request: CloseTask) -> TaskStatus:
        self._require_init()
        return TaskStatus(task=await self.server.close_task(request, self.session_id))

    async def _list_sessions(self, request: ListSessions) -> SessionList:
        self._require_init()
        sessions = await self.server.store.list_sessions(
            name=request.name, with_results=request.with_results, limit=request.limit
        )
        return SessionList(sessions=sessions)

    async def _history(self, request: QueryHistory) -> Any:
        self._require_init()
        return await self.server.store.history(request.name, session=request.session, limit=request.limit)

    async def _status(self, request: GetTaskStatus) -> TaskStatus:
        self._require_init()
        running = self.server._running.get(request.task_id)
        task = running.task if running else await self.server.store.get_task(request.task_id)
        return TaskStatus(task=task)

    async def _wait(self, request: WaitTask) -> TaskStatus:
        self._require_init()
        return TaskStatus(task=await self.server.wait_task(request.task_id, request.timeout))

    async def _list(self, request: ListTasks) -> TaskList:
        self._require_init()
        tasks = await self.server.store.list_tasks(
            session=request.session, states=request.states, limit=request.limit
        )
        return TaskList(tasks=tasks)

    async def _ping(self, request: Ping) -> Pong:
        return Pong()
