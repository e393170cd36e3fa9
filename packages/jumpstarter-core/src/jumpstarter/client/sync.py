"""The blocking API: a thin facade over :mod:`jumpstarter.client`.

Each call runs the async method on an event loop in a helper thread (an anyio
blocking portal) and waits for it, so the two APIs cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from functools import partial
from typing import Any

from anyio.from_thread import BlockingPortal, start_blocking_portal
from jumpstarter_protocol import NodeInfo, OutputChunk, OutputEnd, ResultsData, ResultSpec, TaskInfo

from jumpstarter.client.session import AsyncNode, AsyncSession, AsyncTask


class Session:
    """A session for use in ``with``; see :class:`~jumpstarter.client.AsyncSession`."""

    def __init__(self, session: AsyncSession) -> None:
        self.aio = session
        self._portal: BlockingPortal | None = None
        self._stack = ExitStack()

    @property
    def name(self) -> str:
        return self.aio.name

    @property
    def id(self) -> str:
        return self.aio.id

    def __enter__(self) -> Session:
        with ExitStack() as stack:
            self._portal = stack.enter_context(start_blocking_portal())
            stack.enter_context(self._portal.wrap_async_context_manager(self.aio))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        stack, self._stack = self._stack, ExitStack()
        try:
            stack.__exit__(*exc_info)
        finally:
            self._portal = None

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._portal is None:
            raise RuntimeError("use the session in 'with' first")
        return self._portal.call(partial(fn, *args, **kwargs))

    def connect(self, node: str | None = None, **kwargs: Any) -> Node:
        """Connect to ``node`` and take its lease; see ``AsyncSession.connect``."""
        return Node(self, self._call(self.aio.connect, node, **kwargs))

    def add_result(self, task_id: str, **result: Any) -> int:
        """Attach one result to a task; see ``AsyncSession.add_result``."""
        return self._call(self.aio.add_result, task_id, **result)

    def add_results(
        self, task_id: str, results: Iterable[ResultSpec | Mapping[str, Any]], *, batch_id: str | None = None
    ) -> list[int]:
        """Attach a batch of results; see ``AsyncSession.add_results``."""
        return self._call(self.aio.add_results, task_id, list(results), batch_id=batch_id)

    def query_results(self, **filters: Any) -> ResultsData:
        return self._call(self.aio.query_results, **filters)


class Node:
    """A connected node; see :class:`~jumpstarter.client.AsyncNode`."""

    def __init__(self, session: Session, node: AsyncNode) -> None:
        self.session = session
        self.aio = node

    @property
    def name(self) -> str:
        return self.aio.name

    @property
    def info(self) -> NodeInfo | None:
        return self.aio.info

    @property
    def lease_id(self) -> str | None:
        return self.aio.lease_id

    def fetch_config(self) -> NodeInfo:
        return self.session._call(self.aio.fetch_config)

    def ping(self) -> None:
        self.session._call(self.aio.ping)

    def new_task(self, argv: Sequence[str] | None = None, **spec: Any) -> Task:
        return Task(self, self.session._call(self.aio.new_task, argv, **spec))

    def start(self, argv: Sequence[str] | Task | None = None, *, detach: bool = False, **spec: Any) -> Task:
        """Start a task; see ``AsyncNode.start`` (``detach=True``: it outlives this
        process)."""
        if isinstance(argv, Task):
            return argv.start(detach=detach)
        return Task(self, self.session._call(self.aio.start, argv, detach=detach, **spec))

    def task(self, task_id: str) -> Task:
        return Task(self, self.aio.task(task_id))

    def list_tasks(self, **filters: Any) -> list[TaskInfo]:
        return self.session._call(self.aio.list_tasks, **filters)

    def add_results(
        self, task_id: str, results: Iterable[ResultSpec | Mapping[str, Any]], *, batch_id: str | None = None
    ) -> list[int]:
        return self.session._call(self.aio.add_results, task_id, list(results), batch_id=batch_id)

    def query_results(self, **filters: Any) -> ResultsData:
        return self.session._call(self.aio.query_results, **filters)

    def request(self, message: Any) -> Any:
        """Send one protocol request; see ``AsyncNode.request``."""
        return self.session._call(self.aio.request, message)

    def put(self, local: Any, remote: str, **kwargs: Any) -> list[Any]:
        """Put a local file on the node; see ``AsyncNode.put``."""
        return self.session._call(self.aio.put, local, remote, **kwargs)

    def get(self, remote: str, local: Any = ".", **kwargs: Any) -> list[Any]:
        """Fetch a file from the node; see ``AsyncNode.get``."""
        return self.session._call(self.aio.get, remote, local, **kwargs)

    def stat(self, path: str, **kwargs: Any) -> Any:
        return self.session._call(self.aio.stat, path, **kwargs)

    def glob(self, pattern: str, **kwargs: Any) -> list[Any]:
        return self.session._call(self.aio.glob, pattern, **kwargs)

    def power(self, action: str) -> str:
        """Switch the node's board ``on``, ``off``, ``cycle`` it, or ask its
        ``status``; returns the power state after it (``on``, ``off``, ``unknown``).
        Needs the lease. Raises :class:`~jumpstarter.errors.BadRequest` when the
        node has no power control, :class:`~jumpstarter.errors.Unavailable` when its
        back end failed (the message says how)."""
        return self.session._call(self.aio.power, action)

    def read_console(self, offset: int | None = None, *, wait: float = 0.0) -> Any:
        """Bytes of the node's console transcript from ``offset`` (None: from its
        end), waiting up to ``wait`` seconds for some; see ``AsyncNode.read_console``."""
        return self.session._call(self.aio.read_console, offset, wait=wait)

    def write_console(self, data: bytes) -> None:
        """Type ``data`` on the node's console (needs the lease; refused while a task
        runs there)."""
        self.session._call(self.aio.write_console, data)

    def release(self) -> None:
        self.session._call(self.aio.release)


class Task:
    """A task on a node; see :class:`~jumpstarter.client.AsyncTask`."""

    def __init__(self, node: Node, task: AsyncTask) -> None:
        self.node = node
        self.aio = task

    def __repr__(self) -> str:
        return f"<Task {self.id} on {self.node.name}>"

    @property
    def id(self) -> str:
        return self.aio.id

    @property
    def info(self) -> TaskInfo | None:
        return self.aio.info

    @property
    def end(self) -> OutputEnd | None:
        return self.aio.end

    def start(self, *, detach: bool = False) -> Task:
        self.node.session._call(self.aio.start, detach=detach)
        return self

    def status(self) -> TaskInfo:
        return self.node.session._call(self.aio.status)

    def wait(self, timeout: float | None = None) -> TaskInfo:
        return self.node.session._call(self.aio.wait, timeout)

    def stop(self, grace: float = 5.0) -> TaskInfo:
        return self.node.session._call(self.aio.stop, grace)

    def output(self, offset: int = 0, *, follow: bool = True) -> Iterator[OutputChunk]:
        """The task's output from ``offset``; see ``AsyncTask.output``."""
        call = self.node.session._call
        chunks = self.aio.output(offset, follow=follow)
        try:
            while True:
                try:
                    yield call(chunks.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            call(chunks.aclose)

    def add_result(self, **result: Any) -> int:
        return self.node.session.add_result(self.id, **result)

    def add_artifacts(self, artifacts: Iterable[Any]) -> list[Any]:
        return self.node.session._call(self.aio.add_artifacts, list(artifacts))

    def artifacts(self) -> list[Any]:
        return self.node.session._call(self.aio.artifacts)
    def write_input(self, data: bytes) -> None:
        """Write to the task's input; see ``AsyncTask.write_input``."""
        self.node.session._call(self.aio.write_input, data)

    def close_input(self) -> None:
        self.node.session._call(self.aio.close_input)

    def resize(self, rows: int, cols: int) -> None:
        self.node.session._call(self.aio.resize, rows, cols)
