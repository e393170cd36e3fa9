"""The store's interface, and the one way to open a store from its URL.

:class:`Store` is what the node server (and the CLI's read-only commands) use; the
back ends are :class:`~jumpstarter.store.sqlite.SQLiteStore`, embedded, and
:class:`~jumpstarter.store.postgres.PostgresStore`, shared by many machines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

from jumpstarter_protocol import (
    ArtifactInfo,
    HistoryData,
    QueryResults,
    Result,
    ResultsData,
    ResultSpec,
    SessionInfo,
    TaskInfo,
    TaskState,
)

from jumpstarter.errors import ConfigError, NodeError


class RepeatedBatch(Exception):
    """A result batch whose id the store already holds: it was stored before (its
    reply was lost and the client sent it again). ``ids`` are the ids it got then."""

    def __init__(self, batch_id: str, ids: list[int]) -> None:
        super().__init__(f"result batch {batch_id!r} was stored before")
        self.batch_id = batch_id
        self.ids = ids


class Store(ABC):
    def cannot_commit(self, exc: Exception) -> NodeError | None:
        """What to tell a client when ``exc``, raised by this store, says the store
        cannot write (its disk is full, it is read-only): an
        :class:`~jumpstarter.errors.Unavailable` naming the store and the cause, so
        the node answers one clear line and keeps serving; None for anything else."""
        return None

    """Where sessions, tasks and results are kept. Every method may raise
    :class:`~jumpstarter.errors.NotFound` for an unknown task id."""

    @abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    @abstractmethod
    async def aclose(self) -> None: ...

    @abstractmethod
    async def add_session(self, session_id: str, name: str, client: str) -> None:
        """Record a session; a second call with the same id changes nothing."""

    @abstractmethod
    async def create_task(self, task: TaskInfo, agent: str | None = None) -> None: ...

    @abstractmethod
    async def delete_pending_task(self, task_id: str) -> None:
        """Remove a task that never ran (its command could not start)."""

    @abstractmethod
    async def delete_session_if_empty(self, session_id: str) -> bool:
        """Remove the session ``session_id`` if no task is filed under it (its only
        task could not start), so bad input leaves no trace; True if removed."""

    @abstractmethod
    async def task_pid(self, task_id: str) -> int | None:
        """The pid :meth:`mark_running` stored for the task (None if none)."""

    @abstractmethod
    async def mark_running(self, task_id: str, pid: int | None, agent: str) -> TaskInfo:
        """``pending → running``; :class:`Conflict` if the task is not pending."""

    @abstractmethod
    async def finish_task(
        self, task_id: str, state: TaskState, exit_code: int | None, message: str | None = None
    ) -> TaskInfo:
        """Move an unfinished task to its final ``state``. A task already finished
        keeps its state; the stored task is returned either way."""

    @abstractmethod
    async def get_task(self, task_id: str) -> TaskInfo: ...

    @abstractmethod
    async def list_tasks(
        self,
        *,
        node: str | None = None,
        session: str | None = None,
        states: Sequence[TaskState] | None = None,
        limit: int = 100,
        max_bytes: int | None = None,
    ) -> list[TaskInfo]:
        """Newest first. ``session`` is a session id or name; :class:`NotFound` when
        it names no session. With ``max_bytes`` (a reply's budget) the rows are read
        one by one and those that would not fit are left out: the list returned is a
        :class:`~jumpstarter.store.sql.TaskPage` whose ``truncated`` says so."""

    @abstractmethod
    async def running_tasks(self, node: str) -> list[tuple[TaskInfo, str | None]]:
        """Tasks of ``node`` in state running, each with the agent that runs it."""

    @abstractmethod
    async def starting_tasks(self, node: str) -> list[tuple[TaskInfo, str]]:
        """Tasks of ``node`` still pending that a start created (not ``NewTask``), each
        with the agent that was starting it: a start that died leaves them so."""

    @abstractmethod
    async def add_results(
        self, task: TaskInfo, results: Sequence[ResultSpec], batch_id: str | None = None
    ) -> list[Result]:
        """Commit ``results`` for ``task`` in one transaction, with ``batch_id`` (the
        client's id for the batch) when given. A batch id stored before raises
        :class:`RepeatedBatch` with the ids it got, and nothing is written; one stored
        for another task raises :class:`~jumpstarter.errors.Conflict`."""

    async def add_result_ids(
        self, task: TaskInfo, results: Sequence[ResultSpec], batch_id: str | None = None
    ) -> list[int]:
        """As :meth:`add_results`, but return only the new ids, in order. The node
        server calls this when no plugin wants the stored results: building a
        ``Result`` per row costs more than inserting it, so a store may skip that."""
        return [r.id for r in await self.add_results(task, results, batch_id)]

    @abstractmethod
    async def query_results(self, query: QueryResults, max_bytes: int | None = None) -> ResultsData:
        """A page of the results matching ``query``, with the summary of them all. With
        ``max_bytes`` the page's results take at most that many bytes of JSON: rows are
        read one by one and the page ends (with a cursor) before it would pass; a single
        result larger than that is :class:`~jumpstarter.errors.TooLarge`."""

    @abstractmethod
    async def list_sessions(
        self, *, name: str | None = None, with_results: bool = True, limit: int = 20
    ) -> list[SessionInfo]:
        """Sessions, newest first, each with the summary of its results. ``name`` is a
        session id or a glob over session names; ``with_results`` keeps only the
        sessions that have results."""

    @abstractmethod
    async def history(
        self, name: str, *, session: str | None = None, limit: int = 50, max_bytes: int | None = None
    ) -> HistoryData:
        """The ``limit`` newest results named exactly ``name``, newest first, with the
        names of their sessions; ``session`` (an id, or a glob over names) narrows
        them. :class:`NotFound` when ``session`` matches no session. With
        ``max_bytes``, as :meth:`query_results`: older runs that would not fit are left
        out and the reply says ``truncated``."""

    # --- files

    @abstractmethod
    async def add_artifacts(self, task_id: str, artifacts: Sequence[ArtifactInfo]) -> None:
        """Record files fetched after task ``task_id`` as its artifacts."""

    @abstractmethod
    async def list_artifacts(self, task_id: str) -> list[ArtifactInfo]:
        """The artifacts of task ``task_id``, in the order they were recorded."""


def open_store(url: str) -> Store:
    """The store for ``url`` (not yet opened): ``sqlite:///relative/path``,
    ``sqlite:////absolute/path`` or a plain file path."""
    if url.startswith("sqlite:///"):
        return _sqlite(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from jumpstarter.store.postgres import PostgresStore

        return PostgresStore(url)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ConfigError(f"unsupported store URL scheme {scheme!r} in {url!r}; use sqlite:///PATH or postgresql://…")
    return _sqlite(Path(url))


def _sqlite(path: Path) -> Store:
    from jumpstarter.store.sqlite import SQLiteStore

    return SQLiteStore(path)
