"""One client's connection to a node: its handshake, its lease, and the dispatch of
its requests to the node's leases, tasks and store.

A transport opens one :class:`NodeConnection` per client connection and hands it
requests (:meth:`NodeConnection.handle`) or raw frames
(:meth:`NodeConnection.handle_bytes`); output streams come from
:meth:`NodeConnection.read_output`. A request never raises out of here: every failure
becomes an ``Error`` reply and the node keeps serving.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from jumpstarter_protocol import (
    AddResult,
    CloseTask,
    ConfigData,
    ConnectionEstablished,
    ConnectionInfo,
    ConnectNode,
    ConsoleData,
    ConsoleWritten,
    Error,
    ErrorCode,
    FetchConfig,
    GetTaskStatus,
    InitializeConnection,
    ListSessions,
    ListTasks,
    NewTask,
    NodeReleased,
    OpenTask,
    Ping,
    Pong,
    Power,
    PowerAction,
    PowerState,
    ProtocolError,
    QueryHistory,
    QueryResults,
    ReadConsole,
    ReadOutput,
    ReleaseNode,
    ResultAdded,
    SessionList,
    StartRequest,
    StopTask,
    TaskCreated,
    TaskInfo,
    TaskList,
    TaskStarted,
    TaskStatus,
    TaskStopped,
    WaitTask,
    WriteConsole,
    decode,
    encode,
    negotiate_version,
)

from jumpstarter.errors import BadRequest, Conflict, NodeError, NotFound, Unauthorized

if TYPE_CHECKING:
    from jumpstarter.node.server import NodeServer

log = logging.getLogger(__name__)


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
            ReadConsole: self._read_console,
            WriteConsole: self._write_console,
            Power: self._power,
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
            async with aclosing(self.server.tasks.read_output(request)) as messages:
                async for message in messages:
                    yield message
        except NodeError as exc:
            yield exc.to_reply()

    def forget_session_record(self) -> None:
        """The session's row went from the store (its only task was discarded): it
        is recorded again with the next task."""
        self._session_recorded = False

    def close(self) -> None:
        """The client went away: its lease ends, its tasks run on."""
        if self.leased:
            self.server.leases.release(self.session_id)
            self.leased = False

    # --- handlers --------------------------------------------------------------------------

    def _require_init(self) -> None:
        if not self.initialized:
            raise Unauthorized("send initialize_connection first")

    def _require_lease(self) -> None:
        self._require_init()
        if not (self.leased and self.server.leases.held_by(self.session_id)):
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
        lease = await self.server.leases.acquire(self.session_id or "", self.session_name or "", request)
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
        self.server.tasks.check_spec(request.spec)  # before the session is recorded
        return TaskCreated(task=await self.server.tasks.new_task(request.spec, await self._session_for_task()))

    async def _start(self, request: StartRequest) -> TaskStarted:
        self._require_lease()
        tasks = self.server.tasks
        created_here = request.spec is not None
        if request.spec is not None:
            tasks.check_spec(request.spec)  # before the session is recorded
            task = await tasks.new_task(request.spec, await self._session_for_task())
        else:
            assert request.task_id is not None
            task = await self._own_task(request.task_id)
        if request.detach:
            await tasks.start_detached(task, created_here=created_here)
            started = await self.server.store.get_task(task.id)
            return TaskStarted(task_id=task.id, started_at=started.started_at or started.created_at, pid=None)
        return await tasks.start_task(task, created_here=created_here)

    async def _own_task(self, task_id: str) -> TaskInfo:
        task = await self.server.store.get_task(task_id)
        if task.node != self.server.node.name:
            raise NotFound(f"no task with id {task_id!r} on node {self.server.node.name!r}")
        return task

    async def _stop(self, request: StopTask) -> TaskStopped:
        self._require_lease()
        await self._own_task(request.task_id)
        return TaskStopped(task=await self.server.tasks.stop_task(request.task_id, request.grace))

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
        return TaskCreated(task=await self.server.tasks.open_task(request.spec, await self._session_for_task()))

    async def _close_task(self, request: CloseTask) -> TaskStatus:
        self._require_init()
        return TaskStatus(task=await self.server.tasks.close_task(request, self.session_id))

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
        task = self.server.tasks.current(request.task_id) or await self.server.store.get_task(request.task_id)
        return TaskStatus(task=task)

    async def _wait(self, request: WaitTask) -> TaskStatus:
        self._require_init()
        return TaskStatus(task=await self.server.tasks.wait_task(request.task_id, request.timeout))

    async def _list(self, request: ListTasks) -> TaskList:
        self._require_init()
        tasks = await self.server.store.list_tasks(
            session=request.session, states=request.states, limit=request.limit
        )
        return TaskList(tasks=tasks)

    async def _ping(self, request: Ping) -> Pong:
        return Pong()

    # --- console and power ---------------------------------------------------------------

    def _console(self) -> Any:
        console = self.server.driver.console
        if console is None:
            raise BadRequest(f"node {self.server.node.name!r} has no console (driver {self.server.info.driver!r})")
        return console

    async def _read_console(self, request: ReadConsole) -> ConsoleData:
        self._require_init()  # no lease: anyone may watch
        console = self._console()
        offset, data, end = await console.read(request.offset, request.limit, request.wait)
        return ConsoleData(offset=offset, end=end, busy=console.busy, data=data)

    async def _write_console(self, request: WriteConsole) -> ConsoleWritten:
        self._require_lease()
        await self._console().write(request.data)
        return ConsoleWritten()

    async def _power(self, request: Power) -> PowerState:
        self._require_lease()
        power = self.server.driver.power
        if power is None:
            raise BadRequest(
                f"node {self.server.node.name!r} has no power control; "
                'give it one in the config: power = {driver = "command", on = [...], off = [...]}'
            )
        if request.action is PowerAction.ON:
            await power.on()
        elif request.action is PowerAction.OFF:
            await power.off()
        elif request.action is PowerAction.CYCLE:
            await power.cycle()
        return PowerState(state=await power.status())
