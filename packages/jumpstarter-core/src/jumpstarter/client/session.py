"""The async client: sessions, nodes and tasks. This is the real API; the sync one in
:mod:`jumpstarter.client.sync` is a thin facade over it.

::

    async with protocol.create_async_session("nightly") as session:
        node = await session.connect("local")
        task = await node.start(["pytest", "-q"], timeout=600)
        async for chunk in task.output():
            ...
        await task.wait()
        await session.add_result(task.id, name="boot", outcome="passed")
"""

from __future__ import annotations

import os
import secrets
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AsyncExitStack, aclosing, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio
from jumpstarter_protocol import (
    AddResult,
    CloseInput,
    ConnectionEstablished,
    ConnectNode,
    Error,
    FetchConfig,
    GetTaskStatus,
    InitializeConnection,
    ListTasks,
    NewTask,
    NodeInfo,
    Outcome,
    OutputChunk,
    OutputEnd,
    Ping,
    Power,
    QueryResults,
    ReadConsole,
    ReadOutput,
    ReleaseNode,
    ResizeTerminal,
    ResultsData,
    ResultSpec,
    StartRequest,
    StopTask,
    TaskInfo,
    TaskSpec,
    TaskState,
    TerminalSize,
    WaitTask,
    # files
    AddArtifacts,
    ArtifactInfo,
    FileInfo,
    ListArtifacts,
    ListFiles,
    StatFile,
    WriteInput,
    WriteConsole,
)
from pydantic import ValidationError

from jumpstarter.config import NodeConfig
from jumpstarter.errors import BadRequest, NodeError, NotFound, TransportError
from jumpstarter.plugins.interfaces import Transport

if TYPE_CHECKING:
    from jumpstarter.client.files import Transferred
    from jumpstarter.node.server import NodeServer
    from jumpstarter.protocol import JumpStarterProtocol

INPUT_CHUNK = 4 * 1024 * 1024
"""Most bytes of input sent in one ``WriteInput``."""


class AsyncSession:
    """A named session: the nodes it holds, the tasks it starts, the results it adds.

    Use it as an async context manager; leaving it releases every node, and tasks
    on in-process nodes are stopped (they cannot outlive the process that runs them).
    """

    def __init__(self, protocol: JumpStarterProtocol, name: str) -> None:
        self.protocol = protocol
        self.name = _checked("session name", name, MAX_NAME)
        self.id = secrets.token_hex(8)
        self.nodes: list[AsyncNode] = []
        self._task_nodes: dict[str, AsyncNode] = {}
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> AsyncSession:
        stack = AsyncExitStack()
        self._tg = await stack.enter_async_context(anyio.create_task_group())
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            with anyio.CancelScope(shield=True):
                for node in reversed(self.nodes):
                    await node.aclose()
        finally:
            stack, self._stack = self._stack, None
            if stack is not None:
                # Close the in-process node servers and their task group without
                # handing them the body's exception, so it propagates as it was
                # raised, not wrapped in an exception group.
                await stack.aclose()

    # --- what transports need -------------------------------------------------------------

    async def start_node_server(self, node: NodeConfig) -> NodeServer:
        """Run a node server for ``node`` in this process until the session closes."""
        if self._tg is None:
            raise RuntimeError("use the session in 'async with' before connecting")
        server = self.protocol.make_node_server(node, in_client_process=True)
        await self._tg.start(server.run)
        assert self._stack is not None
        self._stack.callback(server.close)
        return server

    # --- nodes ----------------------------------------------------------------------------

    async def connect(
        self,
        node: str | None = None,
        *,
        lease: bool = True,
        duration: float | None = None,
        wait: float | None = None,
        select: Mapping[str, str] | None = None,
    ) -> AsyncNode:
        """Connect to ``node`` (default: the config's ``default_node``): handshake,
        then take the node's lease unless ``lease=False`` (enough to read status,
        output and results). ``wait`` seconds to wait for a leased node.

        ``select={"board": "rpi4"}`` instead leases any free node with those labels
        from the shared registry (a ``postgresql://`` store), waiting up to ``wait``
        seconds in FIFO order; the lease is kept alive until the session closes."""
        release_registry_lease = None
        if select is not None:
            config, release_registry_lease = await self.protocol.lease_by_labels(
                self, dict(select), duration=duration, wait=wait
            )
        else:
            config = await self.protocol.resolve_node(node)
        try:
            transport_cls = self.protocol.plugins.transport(config.transport)
            transport = await transport_cls.connect(config, self)
        except BaseException:
            if release_registry_lease is not None:
                with anyio.CancelScope(shield=True):
                    await release_registry_lease()
            raise
        handle = AsyncNode(self, config.name, transport)
        handle._on_close = release_registry_lease
        try:
            await handle.request(
                InitializeConnection(
                    session_id=self.id,
                    session_name=self.name,
                    token=self.protocol.token_for(config),
                )
            )
            if lease:
                with _valid_request():
                    connect = ConnectNode(duration=duration, wait=wait)
                established: ConnectionEstablished = await handle.request(connect)
                handle.info = established.node
                handle.lease_id = established.lease_id
        except BaseException:
            with anyio.CancelScope(shield=True):
                await transport.aclose()
                if release_registry_lease is not None:
                    await release_registry_lease()
            raise
        self.nodes.append(handle)
        self.protocol.plugins.hook.jmp_session_connected(session=self, node=handle)
        return handle

    def _node_for(self, task_id: str | None) -> AsyncNode:
        if task_id is not None and task_id in self._task_nodes:
            return self._task_nodes[task_id]
        if not self.nodes:
            raise RuntimeError("connect to a node first")
        return self.nodes[0]

    # --- results ---------------------------------------------------------------------------

    async def add_result(
        self,
        task_id: str,
        *,
        name: str,
        outcome: Outcome | str,
        duration: float | None = None,
        message: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
    ) -> int:
        """Attach one result to a task; returns its id. ``metrics`` maps a name to a
        number or to ``{"value": …, "unit": …}``. A value the protocol refuses raises
        :class:`~jumpstarter.errors.BadRequest` naming the field."""
        with _valid_request():
            spec = ResultSpec(
                name=name,
                outcome=outcome,  # type: ignore[arg-type]
                duration=duration,
                message=message,
                metrics={k: v if isinstance(v, Mapping) else {"value": v} for k, v in (metrics or {}).items()},  # type: ignore[misc]
                labels=dict(labels or {}),
                started_at=started_at,
                finished_at=finished_at,
            )
        return (await self.add_results(task_id, [spec]))[0]

    async def add_results(
        self, task_id: str, results: Iterable[ResultSpec | Mapping[str, Any]], *, batch_id: str | None = None
    ) -> list[int]:
        """Attach a batch of results to a task in one transaction; their ids.

        The batch is stored exactly once: it carries ``batch_id`` (a fresh random id
        when not given), and a transport that loses the reply sends it again with the
        same id, which the store answers with the ids it already gave. To retry a
        batch after a :class:`~jumpstarter.errors.TransportError` yourself, pass the
        same ``batch_id`` again; never resend it without one."""
        return await self._node_for(task_id).add_results(task_id, results, batch_id=batch_id)

    async def query_results(self, **filters: Any) -> ResultsData:
        """Results matching ``filters`` (the fields of ``QueryResults``: task_id,
        session, node, outcomes, name, since, until, labels, limit, cursor).

        A task's results come from its node. Anything else is asked of every node
        this session is connected to (each may keep its own store; results two
        nodes share a store for are counted once), so a session run on several
        nodes is found whole; a node that cannot be reached raises
        :class:`~jumpstarter.errors.TransportError` naming it, never a silently
        partial answer. ``cursor`` pages through one node's results: give ``node``."""
        if filters.get("task_id") is not None or len(self.nodes) <= 1:
            return await self._node_for(filters.get("task_id")).query_results(**filters)
        nodes = [n for n in self.nodes if filters.get("node") in (None, n.name)] or self.nodes[:1]
        if len(nodes) == 1:
            return await nodes[0].query_results(**filters)
        if filters.get("cursor") is not None:
            raise BadRequest("a cursor pages through one node's results: give node=… with it")
        answers: list[ResultsData] = []
        unreachable: list[str] = []
        unknown: NotFound | None = None
        for node in nodes:
            try:
                answers.append(await node.query_results(**filters))
            except TransportError as exc:
                unreachable.append(f"{node.name} ({exc})")
            except NotFound as exc:  # say, a session that never ran there
                unknown = exc
        if unreachable:
            raise TransportError(f"results from node {', '.join(unreachable)} could not be read")
        if not answers and unknown is not None:
            raise unknown
        return merge_results(answers, limit=filters.get("limit") or 1000)


MAX_NAME = 512
"""Longest session name (the protocol's ``Name``)."""
MAX_ID = 128
"""Longest task id (the protocol's ``Id``)."""


def _checked(what: str, value: str, limit: int) -> str:
    """``value``, or :class:`BadRequest` of one line if the protocol cannot carry it."""
    shown = repr(value if len(value) <= 40 else value[:39] + "…")
    if not value:
        raise BadRequest(f"invalid {what}: it is empty")
    if len(value) > limit:
        raise BadRequest(f"invalid {what} {shown}: {len(value)} characters, at most {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"invalid {what} {shown}: not valid UTF-8 text") from None
    return value


def new_batch_id() -> str:
    """A fresh id for a result batch: random, so no two clients ever share one."""
    return secrets.token_hex(16)


class AsyncNode:
    """A node this session is connected to."""

    def __init__(self, session: AsyncSession, name: str, transport: Transport) -> None:
        self.session = session
        self.name = name
        self.transport = transport
        self.info: NodeInfo | None = None
        self.lease_id: str | None = None
        self._closed = False
        self._on_close: Callable[[], Awaitable[None]] | None = None  # a registry lease to end

    async def request(self, message: Any) -> Any:
        """Send one request; an ``Error`` reply is raised as the matching
        :class:`~jumpstarter.errors.NodeError`."""
        reply = await self.transport.request(message)
        if isinstance(reply, Error):
            raise NodeError.from_reply(reply)
        return reply

    async def fetch_config(self) -> NodeInfo:
        """What the node says of itself (``FetchConfig``)."""
        self.info = (await self.request(FetchConfig())).node
        return self.info

    async def ping(self) -> None:
        await self.request(Ping())

    async def new_task(self, argv: Sequence[str] | None = None, **spec: Any) -> AsyncTask:
        """Create a task without starting it (``NewTask``); see :meth:`start`."""
        with _valid_request():
            request = NewTask(spec=_spec(argv, spec))
        created = await self.request(request)
        return self._task(created.task.id, created.task)

    async def start(
        self, argv: Sequence[str] | AsyncTask | None = None, *, detach: bool = False, **spec: Any
    ) -> AsyncTask:
        """Start a task (``StartRequest``): a pending task handle, or a new task from
        ``argv`` (a list) or ``shell="…"``, with ``env``, ``cwd``, ``timeout``,
        ``labels`` and ``name``. Returns as soon as it runs. A spec the protocol
        refuses (``[]``, ``timeout=-1``) raises :class:`~jumpstarter.errors.BadRequest`.

        ``stdin=True``: the task reads what :meth:`AsyncTask.write_input` writes, up
        to :meth:`AsyncTask.close_input` (without it, stdin is ``/dev/null``).
        ``pty=(rows, cols)``: it runs on a terminal of that size on the node (stdin,
        stdout and stderr; its output is one stream, ``stdout``), written to the same
        way and resized with :meth:`AsyncTask.resize`. A node without the ``stdin``
        or ``pty`` capability refuses with an error naming the node and capability.

        ``detach=True``: the task outlives this session and this process, and any
        process can follow, wait for or stop it by id. On a node served in this
        process (the local node) it runs under an agent process of its own (see
        :mod:`jumpstarter.node.agent`); a node in a process of its own keeps its tasks
        anyway."""
        if isinstance(argv, AsyncTask):
            return await argv.start(detach=detach)
        with _valid_request():
            request = StartRequest(spec=_spec(argv, spec), detach=detach)
        started = await self.request(request)
        return self._task(started.task_id)

    def task(self, task_id: str) -> AsyncTask:
        """A handle on an existing task of this node; :class:`BadRequest` for an id
        no task can have."""
        return self._task(_checked("task id", task_id, MAX_ID))

    def _task(self, task_id: str, info: TaskInfo | None = None) -> AsyncTask:
        self.session._task_nodes[task_id] = self
        return AsyncTask(self, task_id, info)

    async def list_tasks(
        self, *, session: str | None = None, states: Sequence[TaskState | str] | None = None, limit: int = 100
    ) -> list[TaskInfo]:
        with _valid_request():
            request = ListTasks(session=session, states=states, limit=limit)  # type: ignore[arg-type]
        reply = await self.request(request)
        return reply.tasks

    async def add_results(
        self, task_id: str, results: Iterable[ResultSpec | Mapping[str, Any]], *, batch_id: str | None = None
    ) -> list[int]:
        """See :meth:`AsyncSession.add_results`."""
        batch = list(results)
        batch_id = batch_id or new_batch_id()
        try:
            # One call validates the whole batch (dicts and ResultSpec objects alike):
            # a quarter faster than a call per result, which matters at 100,000.
            request = AddResult(task_id=task_id, results=batch, batch_id=batch_id)
        except ValidationError:
            # Validate result by result, so the error names the field of the result
            # that is wrong ("outcome"), not its place in the request.
            with _valid_request():
                specs = [r if isinstance(r, ResultSpec) else ResultSpec.model_validate(r) for r in batch]
                request = AddResult(task_id=task_id, results=specs, batch_id=batch_id)
        return (await self.request(request)).ids

    async def query_results(self, **filters: Any) -> ResultsData:
        with _valid_request():
            request = QueryResults(**filters)
        return await self.request(request)

    # --- files ----------------------------------------------------------------------------

    async def put(self, local: str | os.PathLike[str], remote: str, *, recursive: bool = False,
                  task_id: str | None = None) -> list[Transferred]:
        """Put local file ``local`` on the node as ``remote`` (into it, when it is a
        directory there or ends in ``/``); ``recursive`` copies a directory, modes
        kept. A relative ``remote`` is relative to task ``task_id``'s working
        directory, else the node's. The sha256 is checked on the node; a dropped
        connection resumes from what the node holds. Raises
        :class:`~jumpstarter.errors.LocalFileError` for a missing local file, and the
        node's refusals (outside its files root, no space, over its limit, no
        ``files`` capability) as :class:`~jumpstarter.errors.NodeError`."""
        from jumpstarter.client import files

        return await files.put(self, local, remote, recursive=recursive, task_id=task_id)

    async def get(self, remote: str, local: str | os.PathLike[str] = ".", *, recursive: bool = False,
                  task_id: str | None = None) -> list[Transferred]:
        """Fetch the node's file ``remote`` to ``local`` (into it, when it is a
        directory); ``recursive`` copies a directory. Nothing appears under the local
        name until the whole file arrived with a matching sha256."""
        from jumpstarter.client import files

        return await files.get(self, remote, local, recursive=recursive, task_id=task_id)

    async def stat(self, path: str, *, task_id: str | None = None) -> FileInfo:
        """What is at ``path`` on the node (:class:`~jumpstarter.errors.NotFound` if nothing)."""
        return (await self.request(StatFile(path=path, task_id=task_id))).file

    async def glob(self, pattern: str, *, task_id: str | None = None) -> list[FileInfo]:
        """The node's files matching ``pattern`` (``*``, ``?``, ``[...]`` per segment)."""
        with _valid_request():
            request = ListFiles(pattern=pattern, task_id=task_id)
        return (await self.request(request)).files
    async def power(self, action: str) -> str:
        """Switch the node's board ``on``, ``off``, ``cycle`` it, or ask its
        ``status``; the board's power state after it (``on``, ``off``, ``unknown``).
        Needs the lease."""
        with _valid_request():
            request = Power(action=action)
        return (await self.request(request)).state

    async def read_console(self, offset: int | None = None, *, wait: float = 0.0) -> Any:
        """Bytes of the node's console transcript from ``offset`` (None: from its
        end), waiting up to ``wait`` seconds for some: a ``ConsoleData`` with
        ``offset``, ``data``, ``end`` and what keeps it ``busy``."""
        return await self.request(ReadConsole(offset=offset, wait=wait))

    async def write_console(self, data: bytes) -> None:
        """Type ``data`` on the node's console (needs the lease; refused while a
        task runs there)."""
        await self.request(WriteConsole(data=data))

    async def release(self) -> None:
        """Give the node's lease back; tasks go on running."""
        await self.request(ReleaseNode())
        self.lease_id = None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        hook = self.session.protocol.plugins.hook
        try:
            hook.jmp_session_disconnected(session=self.session, node=self)
            if self.lease_id is not None:
                try:
                    await self.release()
                except (NodeError, TransportError):
                    pass  # the node is gone or already let go; nothing to release
        finally:
            await self.transport.aclose()
            if self._on_close is not None:
                await self._on_close()


class AsyncTask:
    """A task on a node."""

    def __init__(self, node: AsyncNode, task_id: str, info: TaskInfo | None = None) -> None:
        self.node = node
        self.id = task_id
        self.info = info
        self.end: OutputEnd | None = None
        self.input_offset = 0
        """Bytes of input the node has taken so far."""
        self._input_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"<AsyncTask {self.id} on {self.node.name}>"

    async def start(self, *, detach: bool = False) -> AsyncTask:
        """Start this pending task; ``detach``: see :meth:`AsyncNode.start`."""
        await self.node.request(StartRequest(task_id=self.id, detach=detach))
        return self

    async def status(self) -> TaskInfo:
        self.info = (await self.node.request(GetTaskStatus(task_id=self.id))).task
        return self.info

    async def wait(self, timeout: float | None = None) -> TaskInfo:
        """Wait until the task has finished (or ``timeout`` seconds); its info."""
        with _valid_request():
            request = WaitTask(task_id=self.id, timeout=timeout)
        self.info = (await self.node.request(request)).task
        return self.info

    async def stop(self, grace: float = 5.0) -> TaskInfo:
        """Stop it: SIGTERM to its process group, SIGKILL after ``grace`` seconds. A
        finished task is left alone; either way its final info is returned."""
        with _valid_request():
            request = StopTask(task_id=self.id, grace=grace)
        self.info = (await self.node.request(request)).task
        return self.info

    async def output(self, offset: int = 0, *, follow: bool = True) -> AsyncIterator[OutputChunk]:
        """The task's output from byte ``offset``, chunk by chunk, stdout and stderr
        in the order produced (``chunk.stream`` says which). With ``follow`` it ends
        when the task has finished; ``self.end`` then says where and how."""
        with _valid_request():
            request = ReadOutput(task_id=self.id, offset=offset, follow=follow)
        # Closed as soon as it ends here, not when collected: the node then lets go
        # of the task's log at once.
        async with aclosing(self.node.transport.read_output(request)) as messages:
            async for message in messages:
                if isinstance(message, OutputChunk):
                    yield message
                elif isinstance(message, OutputEnd):
                    self.end = message
                    return
                elif isinstance(message, Error):
                    raise NodeError.from_reply(message)

    async def add_result(self, **result: Any) -> int:
        return await self.node.session.add_result(self.id, **result)

    async def add_artifacts(self, artifacts: Iterable[ArtifactInfo | Transferred]) -> list[ArtifactInfo]:
        """Record files fetched after the task as its artifacts (path, size, sha256);
        every artifact the task has."""
        items = [
            a if isinstance(a, ArtifactInfo) else ArtifactInfo(path=a.source, size=a.size, sha256=a.sha256)
            for a in artifacts
        ]
        return (await self.node.request(AddArtifacts(task_id=self.id, artifacts=items))).artifacts

    async def artifacts(self) -> list[ArtifactInfo]:
        """The files the task recorded as its artifacts, oldest first."""
        return (await self.node.request(ListArtifacts(task_id=self.id))).artifacts
    # --- input and terminals ------------------------------------------------------------

    async def write_input(self, data: bytes) -> None:
        """Write ``data`` to the task's input (a task started with ``stdin`` or
        ``pty``), in order; returns once the node has handed it to the task. Each
        write names its offset, so a transport that sends one again after a broken
        connection doubles nothing."""
        view = memoryview(data)
        async with self._input_lock:
            for start in range(0, len(view), INPUT_CHUNK):
                chunk = bytes(view[start : start + INPUT_CHUNK])
                reply = await self.node.request(WriteInput(task_id=self.id, offset=self.input_offset, data=chunk))
                self.input_offset = reply.offset

    async def close_input(self) -> None:
        """End the task's input: EOF on its stdin (on a terminal, the end-of-file
        character). Closing twice is not an error."""
        async with self._input_lock:
            await self.node.request(CloseInput(task_id=self.id, offset=self.input_offset))

    async def resize(self, rows: int, cols: int) -> None:
        """Set the size of the task's terminal (a task started with ``pty``)."""
        with _valid_request():
            request = ResizeTerminal(task_id=self.id, size=TerminalSize(rows=rows, cols=cols))
        await self.node.request(request)


def merge_results(answers: Sequence[ResultsData], *, limit: int) -> ResultsData:
    """One answer from several nodes' answers to one query: results oldest first,
    those seen twice (two nodes sharing a store) once, the summaries added up
    (from each node's own count where no result was seen twice)."""
    from jumpstarter_protocol import ResultSummary

    seen: dict[tuple[str | None, str, int], Any] = {}
    for answer in answers:
        for result in answer.results:
            seen.setdefault((result.node, result.task_id, result.id), result)
    results = sorted(seen.values(), key=lambda r: (r.created_at, r.id))
    total_seen = sum(len(a.results) for a in answers)
    if total_seen != len(seen):  # shared stores: every node counted the same results
        summary = answers[0].summary
    else:
        summary = ResultSummary()
        for answer in answers:
            summary.total += answer.summary.total
            summary.duration += answer.summary.duration
            for outcome, count in answer.summary.outcomes.items():
                summary.outcomes[outcome] = summary.outcomes.get(outcome, 0) + count
    return ResultsData(results=results[:limit], summary=summary)  # no cursor spans several nodes


@contextmanager
def _valid_request() -> Iterator[None]:
    """Turn pydantic's ``ValidationError``, raised while a request (or a spec or
    result inside one) is built from the caller's arguments, into a
    :class:`~jumpstarter.errors.BadRequest` of one line naming the field:
    ``invalid outcomes.0: Input should be 'passed', …``. Callers catch one
    hierarchy, and the CLI prints it as any other error."""
    try:
        yield
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        more = exc.error_count() - 1
        tail = f" (and {more} more)" if more else ""
        where = ".".join(str(part) for part in error["loc"])
        message = " ".join(str(error["msg"]).split())  # one line, whatever the value held
        if error["type"] == "extra_forbidden":
            message = f"unknown field {where!r}"
        elif error["type"] == "value_error":
            message = message.removeprefix("Value error, ")  # a check of ours: its own words
            if where:
                message = f"invalid {where}: {message}"
        else:
            message = f"invalid {where or 'value'}: {message}"
        raise BadRequest(message + tail) from None


def _spec(argv: Sequence[str] | str | None, spec: dict[str, Any]) -> TaskSpec:
    if isinstance(argv, str):
        raise TypeError("pass argv as a list, or a shell command as shell='…'")
    if argv is not None:
        spec["argv"] = list(argv)
    if isinstance(spec.get("pty"), tuple | list):
        rows, cols = spec["pty"]
        spec["pty"] = {"rows": rows, "cols": cols}
    return TaskSpec(**spec)
