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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from jumpstarter_protocol import (
    # files
    AddArtifacts,
    AddResult,
    ArtifactList,
    CloseInput,
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
    GetFile,
    GetTaskStatus,
    InitializeConnection,
    InputWritten,
    ListArtifacts,
    ListFiles,
    ListSessions,
    ListTasks,
    MakeDir,
    NewTask,
    NodeReleased,
    OpenTask,
    OpenUpload,
    OutputPruned,
    Ping,
    Pong,
    Power,
    PowerState,
    ProtocolError,
    PruneOutput,
    PutFile,
    QueryHistory,
    QueryResults,
    ReadConsole,
    ReadOutput,
    ReleaseNode,
    ResizeTerminal,
    ResultAdded,
    SessionList,
    StartRequest,
    StatFile,
    StopTask,
    TaskCreated,
    TaskInfo,
    TaskList,
    TaskStarted,
    TaskStatus,
    TaskStopped,
    TerminalResized,
    WaitTask,
    WriteConsole,
    WriteInput,
    decode,
    encode,
    negotiate_version,
)

from jumpstarter.errors import BadRequest, Conflict, NodeError, NotFound, Unauthorized, Unavailable
from jumpstarter.node.power import switch_power
from jumpstarter.store.base import RepeatedBatch

if TYPE_CHECKING:
    from jumpstarter.node.server import NodeServer

log = logging.getLogger(__name__)

REPLY_ROOM = 64 * 1024
"""Bytes of a reply kept for what is not its results (the summary, the cursor)."""


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
        self.task_scope: str | None = None  # a task's own token: only that task's results
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
            # files
            StatFile: self._stat_file,
            ListFiles: self._list_files,
            MakeDir: self._make_dir,
            OpenUpload: self._open_upload,
            AddArtifacts: self._add_artifacts,
            ListArtifacts: self._list_artifacts,
            # --- input and terminals
            WriteInput: self._write_input,
            CloseInput: self._close_input,
            ResizeTerminal: self._resize,
            # --- output retention
            PruneOutput: self._prune_output,
            ReadConsole: self._read_console,
            WriteConsole: self._write_console,
            Power: self._power,
        }

    async def handle(self, request: Any) -> Any:
        """Answer one request. Never raises: failures become ``Error`` replies."""
        handler = self._handlers.get(type(request))
        if handler is None:
            kind = getattr(request, "type", type(request).__name__)
            return BadRequest(f"{kind} is not a request").to_reply()
        return await self._answer(handler, request)

    async def _answer(self, handler: Callable[[Any], Any], request: Any) -> Any:
        try:
            if self.task_scope is not None:
                self._check_scope(request)
            return await handler(request)
        except NodeError as exc:
            return exc.to_reply()
        except ProtocolError as exc:
            return Error(code=ErrorCode(exc.code), message=str(exc))
        except Exception as exc:
            full = self.server.store.cannot_commit(exc)
            if full is not None:  # the disk under the store, not a bug: one line, no traceback
                log.error("%s", full)
                return full.to_reply()
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

    # --- files: the two streams ---------------------------------------------------------

    async def put_file(
        self, header: Any, messages: AsyncIterator[Any], *, in_process: bool = False
    ) -> Any:
        """Answer one upload stream: ``header`` (a ``PutFile``), then the chunks and
        ``FileEnd`` in ``messages``. Never raises: failures become ``Error`` replies.

        ``in_process``: the chunks are the very bytes objects the client hashed for
        the ``FileEnd``, handed over in this process (the local transport, for the
        client's own put), so the node takes that sha256 instead of hashing them a
        second time (see :meth:`jumpstarter.node.files.Files.upload`)."""
        if not isinstance(header, PutFile):
            kind = getattr(header, "type", type(header).__name__)
            return Error(code=ErrorCode.BAD_REQUEST, message=f"an upload starts with put_file, not {kind}")

        async def upload(request: PutFile) -> Any:
            self._require_lease()
            return await self.server.files.upload(request, messages, in_process=in_process)

        return await self._answer(upload, header)

    async def get_file(self, request: GetFile) -> AsyncGenerator[Any, None]:
        """The download stream answering ``request``; an ``Error`` ends it early."""
        try:
            self._require_init()
            async with aclosing(self.server.files.download(request)) as messages:
                async for message in messages:
                    yield message
        except NodeError as exc:
            yield exc.to_reply()
        except Exception as exc:
            log.exception("download %r failed", request)
            yield Error(code=ErrorCode.INTERNAL, message=f"internal error: {type(exc).__name__}: {exc}")

    def forget_session_record(self) -> None:
        """The session's row went from the store (its only task was discarded): it
        is recorded again with the next task."""
        self._session_recorded = False

    def close(self) -> None:
        """The client went away: its lease ends, its tasks run on."""
        if self.leased:
            self.server.leases.release(self.session_id)
            self.leased = False

    _IN_SCOPE = (FetchConfig, InitializeConnection, Ping, QueryResults, ListSessions, QueryHistory)

    def _check_scope(self, request: Any) -> None:
        """A connection made with a task's token (``JMP_TASK_TOKEN``) reads results
        and adds them to that task, and does nothing else."""
        task_id = getattr(request, "task_id", None)
        if isinstance(request, self._IN_SCOPE) or (
            isinstance(request, AddResult | GetTaskStatus) and task_id == self.task_scope
        ):
            return
        raise Unauthorized(f"a task's token only records results of task {self.task_scope}")

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
        scope = self.server.task_of_token(request.token)
        if scope is None and expected is not None and not hmac.compare_digest(
            (request.token or "").encode(), expected.encode()
        ):
            raise Unauthorized("invalid or missing token")
        self.task_scope = scope
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
        leases = self.server.leases
        renewing = leases.held_by(self.session_id)
        lease = await leases.acquire(self.session_id or "", self.session_name or "", request)
        if not renewing:
            error = await leases.before(lease)
            if error is not None:
                self.leased = True
                self.close()  # gives the lease back: the node is no one's while unhealthy
                name = self.server.node.name
                raise Unavailable(
                    f"node {name!r} is unhealthy: {error} (it is leased again once its before_lease hook "
                    f"succeeds, or after 'jmp node clear {name}')",
                    details={"unhealthy": error},
                )
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
            task = await tasks.new_task(request.spec, await self._session_for_task(), starting=True)
        else:
            assert request.task_id is not None
            task = await self._own_task(request.task_id)
        env = self.server.task_env(task, self.session_name or "")
        if request.detach:
            await tasks.start_detached(task, created_here=created_here, env=env)
            started = await self.server.store.get_task(task.id)
            return TaskStarted(task_id=task.id, started_at=started.started_at or started.created_at, pid=None)
        return await tasks.start_task(task, created_here=created_here, env=env)

    async def _own_task(self, task_id: str) -> TaskInfo:
        task = await self.server.store.get_task(task_id)
        if task.node != self.server.node.name:
            raise NotFound(f"no task with id {task_id!r} on node {self.server.node.name!r}")
        return task

    async def _stop(self, request: StopTask) -> TaskStopped:
        # The holder of the lease may stop any task; anyone may when no other
        # session holds the node (a task that keeps a drained lease's node busy).
        self._require_init()
        if not (self.leased and self.server.leases.held_by(self.session_id)):
            holder = await self.server.leases.live()
            if holder is not None and holder.session_id != self.session_id:
                raise self.server.leases.conflict(holder)
        await self._own_task(request.task_id)
        return TaskStopped(task=await self.server.tasks.stop_task(request.task_id, request.grace))

    async def _add_result(self, request: AddResult) -> ResultAdded:
        self._require_init()
        task = await self.server.store.get_task(request.task_id)
        store, batch = self.server.store, request.batch_id
        try:
            if self.server.hook.jmp_result_added.get_hookimpls():
                results = await store.add_results(task, request.results, batch)
                self.server.hook.jmp_result_added(task=task, results=results)
                return ResultAdded(ids=[r.id for r in results])
            # No plugin wants the stored results: skip building them (most of the cost
            # of a big batch after the insert itself).
            return ResultAdded(ids=await store.add_result_ids(task, request.results, batch))
        except RepeatedBatch as repeated:
            # Sent again because the reply was lost: stored once, answered alike, and
            # the plugins heard of it the first time.
            return ResultAdded(ids=repeated.ids)

    async def _query_results(self, request: QueryResults) -> Any:
        self._require_init()
        # The page ends (with a cursor) before its results pass the message limit,
        # less room for the rest of the reply: it is never built too large to send.
        return await self.server.store.query_results(request, max_bytes=self._reply_budget())

    def _reply_budget(self) -> int:
        return max(self.server.max_message_size - REPLY_ROOM, REPLY_ROOM)

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
        return await self.server.store.history(
            request.name, session=request.session, limit=request.limit, max_bytes=self._reply_budget()
        )

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
            session=request.session, states=request.states, limit=request.limit, max_bytes=self._reply_budget()
        )
        return TaskList(tasks=tasks, truncated=getattr(tasks, "truncated", False))

    async def _ping(self, request: Ping) -> Pong:
        return Pong()

    # --- files ----------------------------------------------------------------------------

    async def _stat_file(self, request: StatFile) -> Any:
        self._require_init()
        return await self.server.files.stat(request)

    async def _list_files(self, request: ListFiles) -> Any:
        self._require_init()
        return await self.server.files.list(request)

    async def _make_dir(self, request: MakeDir) -> Any:
        self._require_lease()
        return await self.server.files.make_dir(request)

    async def _open_upload(self, request: OpenUpload) -> Any:
        self._require_lease()
        return await self.server.files.open_upload(request)

    async def _add_artifacts(self, request: AddArtifacts) -> ArtifactList:
        self._require_init()
        await self._own_task(request.task_id)
        await self.server.store.add_artifacts(request.task_id, request.artifacts)
        return ArtifactList(task_id=request.task_id, artifacts=await self.server.store.list_artifacts(request.task_id))

    async def _list_artifacts(self, request: ListArtifacts) -> ArtifactList:
        self._require_init()
        await self.server.store.get_task(request.task_id)
        return ArtifactList(task_id=request.task_id, artifacts=await self.server.store.list_artifacts(request.task_id))
    # --- input and terminals ----------------------------------------------------------------
    # Only the session holding the lease types into the node's tasks.

    async def _write_input(self, request: WriteInput) -> InputWritten:
        self._require_lease()
        offset, closed = await self.server.tasks.write_input(request.task_id, request.offset, request.data)
        return InputWritten(task_id=request.task_id, offset=offset, closed=closed)

    async def _close_input(self, request: CloseInput) -> InputWritten:
        self._require_lease()
        offset, closed = await self.server.tasks.close_input(request.task_id, request.offset)
        return InputWritten(task_id=request.task_id, offset=offset, closed=closed)

    async def _resize(self, request: ResizeTerminal) -> TerminalResized:
        self._require_lease()
        await self.server.tasks.resize(request.task_id, request.size.rows, request.size.cols)
        return TerminalResized(task_id=request.task_id, size=request.size)

    # --- output retention -----------------------------------------------------------------

    async def _prune_output(self, request: PruneOutput) -> OutputPruned:
        self._require_lease()  # it deletes: the node's holder decides
        task_ids, freed = await self.server.tasks.prune_output(
            request.older_than, request.max_bytes, dry_run=request.dry_run
        )
        return OutputPruned(task_ids=task_ids, bytes=freed, dry_run=request.dry_run)
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
        return PowerState(state=await switch_power(power, request.action.value))
