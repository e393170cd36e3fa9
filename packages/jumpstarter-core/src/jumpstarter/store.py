"""The store: sessions, tasks and results.

:class:`Store` is the interface; :class:`SQLiteStore` the embedded default. SQLite runs
in WAL mode with ``synchronous=NORMAL``: a commit survives the process being killed
at any point (the WAL is written before ``commit`` returns); only a power cut can
lose the last commits. A batch of results is one transaction: all or nothing.

Calls that may take long (batches of results, queries) run on one worker thread.
The point operations of a task's life (create it, change its state, read it by id)
take microseconds, less than the hop to a thread, so they run on the event loop's
own connection: one that never waits for a lock (busy timeout 0) and never
checkpoints the WAL; when another connection holds the write lock, the call goes
to the worker thread instead. Either way, a lock held by another process never
blocks the event loop, and a commit is durable before the call returns.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from jumpstarter_protocol import (
    HistoryData,
    Outcome,
    QueryResults,
    Result,
    ResultsData,
    ResultSpec,
    ResultSummary,
    SessionInfo,
    TaskInfo,
    TaskSpec,
    TaskState,
)

from .errors import BadRequest, ConfigError, NotFound

T = TypeVar("T")

_UNFINISHED = (TaskState.PENDING.value, TaskState.RUNNING.value)
_OUTCOME_TEXT = {o: o.value for o in Outcome}  # a dict lookup beats Enum.value per row


def to_datetime(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def to_epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


class Store(ABC):
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
    ) -> list[TaskInfo]:
        """Newest first. ``session`` is a session id or name; :class:`NotFound` when
        it names no session."""

    @abstractmethod
    async def running_tasks(self, node: str) -> list[tuple[TaskInfo, str | None]]:
        """Tasks of ``node`` in state running, each with the agent that runs it."""

    @abstractmethod
    async def add_results(
        self, task: TaskInfo, results: Sequence[ResultSpec]
    ) -> list[Result]:
        """Commit ``results`` for ``task`` in one transaction."""

    async def add_result_ids(self, task: TaskInfo, results: Sequence[ResultSpec]) -> list[int]:
        """As :meth:`add_results`, but return only the new ids, in order. The node
        server calls this when no plugin wants the stored results: building a
        ``Result`` per row costs more than inserting it, so a store may skip that."""
        return [r.id for r in await self.add_results(task, results)]

    @abstractmethod
    async def query_results(self, query: QueryResults) -> ResultsData: ...

    @abstractmethod
    async def list_sessions(
        self, *, name: str | None = None, with_results: bool = True, limit: int = 20
    ) -> list[SessionInfo]:
        """Sessions, newest first, each with the summary of its results. ``name`` is a
        session id or a glob over session names; ``with_results`` keeps only the
        sessions that have results."""

    @abstractmethod
    async def history(self, name: str, *, session: str | None = None, limit: int = 50) -> HistoryData:
        """The ``limit`` newest results named exactly ``name``, newest first, with the
        names of their sessions; ``session`` (an id, or a glob over names) narrows
        them. :class:`NotFound` when ``session`` matches no session."""


def _enter_wal(db: sqlite3.Connection, patience: float = 30.0) -> None:
    """Switch ``db`` to WAL mode. Several processes opening a new store at once race
    for that switch, and SQLite answers the losers "database is locked" at once,
    without its busy timeout: they try again for up to ``patience`` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class SQLiteStore(Store):
    """The embedded store: one SQLite file, shared safely by every process on this
    machine that opens it."""

    SCHEMA_VERSION = 1

    INLINE_CHECKPOINT_CHANGES = 200
    """Rows changed through the event loop's connection between two WAL checkpoints
    (run on the worker thread; that connection never checkpoints by itself). A task's
    state change writes some five pages, so this keeps the WAL near SQLite's own
    default of a checkpoint every 1000 pages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._inline: sqlite3.Connection | None = None  # the event loop's, see _quick
        self._inline_checkpointed = 0
        self._current = _CurrentConnection()
        self._inline_lock = threading.Lock()
        self._limiter = anyio.CapacityLimiter(1)
        self._lock = threading.Lock()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(self._locked, fn, args, limiter=self._limiter)

    def _locked(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._lock:
            return fn(*args)

    async def _quick(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` (a point operation, all or nothing) on the event loop's own
        connection; on the worker thread if that would wait for a lock.

        Hopping to a thread costs more than such a call (measured: ~150 us against
        ~50-100 us for a state change and its commit), and a task's start and end
        pay for several."""
        inline = self._inline
        # The lock only guards against a store shared by two threads' event loops;
        # whoever finds it taken goes to the worker thread.
        if inline is None or not self._inline_lock.acquire(blocking=False):
            return await self._run(fn, *args)
        self._current.db = inline
        try:
            return_value = fn(*args)
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF != sqlite3.SQLITE_BUSY:
                raise
            if inline.in_transaction:
                inline.execute("ROLLBACK")
            busy = True  # nothing of ``fn`` was applied
        else:
            busy = False
        finally:
            self._current.db = None
            self._inline_lock.release()
        if busy:
            # Another connection (the worker, another process) holds the write lock:
            # wait for it on the worker thread, not here.
            return await self._run(fn, *args)
        if inline.total_changes - self._inline_checkpointed >= self.INLINE_CHECKPOINT_CHANGES:
            self._inline_checkpointed = inline.total_changes
            await self._run(self._checkpoint)
        return return_value

    def _checkpoint(self) -> None:
        # PASSIVE: copies what it can without waiting for readers or writers.
        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            _enter_wal(db)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the store {self.path}: {exc}") from None
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        self._db = db
        with self._transaction(immediate=True) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > self.SCHEMA_VERSION:
                raise ConfigError(
                    f"the store {self.path} has schema version {version}; this Jumpstarter "
                    f"knows up to {self.SCHEMA_VERSION}: upgrade Jumpstarter"
                )
            if version < 1:
                # Statement by statement: executescript() would commit our transaction.
                for statement in _SCHEMA_V1.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={self.SCHEMA_VERSION}")
        self._open_inline()

    def _open_inline(self) -> None:
        # Used only from the event loop's thread once open; never waits for a lock
        # (timeout=0: SQLITE_BUSY at once) and never checkpoints (that may fsync).
        inline = sqlite3.connect(
            self.path, timeout=0, isolation_level=None, check_same_thread=False
        )
        for pragma in ("synchronous=NORMAL", "foreign_keys=ON", "wal_autocheckpoint=0"):
            inline.execute(f"PRAGMA {pragma}")
        self._inline = inline
        self._inline_checkpointed = inline.total_changes

    async def aclose(self) -> None:
        if self._inline is not None:
            inline, self._inline = self._inline, None
            inline.close()
        if self._db is not None:
            db, self._db = self._db, None
            await self._run(db.close)

    class _Tx:
        def __init__(self, db: sqlite3.Connection, immediate: bool) -> None:
            self.db = db
            self.immediate = immediate

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
            return self.db

        def __exit__(self, exc_type: object, *_: object) -> None:
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _transaction(self, immediate: bool = True) -> SQLiteStore._Tx:
        return SQLiteStore._Tx(self.db, immediate)

    @property
    def db(self) -> sqlite3.Connection:
        """The connection of the running call: the event loop's own inside
        :meth:`_quick`, the worker thread's otherwise."""
        db = self._current.db or self._db
        assert db is not None, "store is not open"
        return db

    def _execute(self, sql: str, params: Sequence[Any]) -> None:
        self.db.execute(sql, params)

    # --- sessions and tasks ---------------------------------------------------------

    async def add_session(self, session_id: str, name: str, client: str) -> None:
        await self._quick(
            self._execute,
            "INSERT OR IGNORE INTO sessions (id, name, client, created_at) VALUES (?, ?, ?, ?)",
            (session_id, name, client, time.time()),
        )

    async def create_task(self, task: TaskInfo, agent: str | None = None) -> None:
        await self._quick(self._execute, INSERT_TASK, task_params(task, agent))

    async def delete_pending_task(self, task_id: str) -> None:
        await self._quick(
            self._execute, "DELETE FROM tasks WHERE id = ? AND state = 'pending'", (task_id,)
        )

    async def delete_session_if_empty(self, session_id: str) -> bool:
        return await self._quick(self._delete_session_if_empty, session_id)

    def _delete_session_if_empty(self, session_id: str) -> bool:
        # One statement, so a task filed meanwhile keeps its session.
        cursor = self.db.execute(
            "DELETE FROM sessions WHERE id = ? AND NOT EXISTS (SELECT 1 FROM tasks WHERE session_id = ?)",
            (session_id, session_id),
        )
        return cursor.rowcount > 0

    async def task_pid(self, task_id: str) -> int | None:
        rows = await self._quick(self._fetchall, "SELECT pid FROM tasks WHERE id = ?", (task_id,))
        return rows[0][0] if rows else None

    async def mark_running(self, task_id: str, pid: int | None, agent: str) -> TaskInfo:
        return await self._quick(self._mark_running, task_id, pid, agent)

    def _mark_running(self, task_id: str, pid: int | None, agent: str) -> TaskInfo:
        with self._transaction() as db:
            db.execute(MARK_RUNNING, (time.time(), pid, agent, task_id))
            return self._get_task(task_id)

    async def finish_task(
        self, task_id: str, state: TaskState, exit_code: int | None, message: str | None = None
    ) -> TaskInfo:
        return await self._quick(self._finish_task, task_id, state, exit_code, message)

    def _finish_task(
        self, task_id: str, state: TaskState, exit_code: int | None, message: str | None
    ) -> TaskInfo:
        with self._transaction() as db:
            db.execute(FINISH_TASK, finish_params(task_id, state, exit_code, message))
            return self._get_task(task_id)

    async def get_task(self, task_id: str) -> TaskInfo:
        return await self._quick(self._get_task, task_id)

    def _get_task(self, task_id: str) -> TaskInfo:
        row = self.db.execute(GET_TASK, (task_id,)).fetchone()
        if row is None:
            raise no_task(task_id)
        return _task(row)

    async def list_tasks(
        self,
        *,
        node: str | None = None,
        session: str | None = None,
        states: Sequence[TaskState] | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        sql, params = tasks_query(SQLITE, node, session, states, limit)
        return [_task(row) for row in await self._run(self._list_tasks, session, sql, params)]

    def _list_tasks(self, session: str | None, sql: str, params: Sequence[Any]) -> list[Any]:
        with self._transaction(immediate=False) as db:  # one snapshot for check and list
            if session is not None:
                self._require_session(session)
            return db.execute(sql, params).fetchall()

    def _require_session(self, session: str, *, glob: bool = False) -> None:
        if not self.db.execute(*session_check(SQLITE, session, glob=glob)).fetchone():
            raise no_session(session)

    async def running_tasks(self, node: str) -> list[tuple[TaskInfo, str | None]]:
        rows = await self._run(self._fetchall, RUNNING_TASKS, (node,))
        return [(_task(row), row[-1]) for row in rows]

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self.db.execute(sql, params).fetchall()

    # --- results ----------------------------------------------------------------------

    async def add_results(self, task: TaskInfo, results: Sequence[ResultSpec]) -> list[Result]:
        return await self._run(self._add_results, task, results)

    def _add_results(self, task: TaskInfo, results: Sequence[ResultSpec]) -> list[Result]:
        first, now = self._insert_results(task, results)
        return stored_results(task, results, range(first, first + len(results)), now)

    async def add_result_ids(self, task: TaskInfo, results: Sequence[ResultSpec]) -> list[int]:
        first, _ = await self._run(self._insert_results, task, results)
        return list(range(first, first + len(results)))

    def _insert_results(self, task: TaskInfo, results: Sequence[ResultSpec]) -> tuple[int, float]:
        """Insert ``results`` in one transaction; the first new id (the others
        follow it: no one else inserts while we hold the write lock) and the time."""
        now = time.time()
        rows = result_rows(task, results, now)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM tasks WHERE id = ?", (task.id,)).fetchone() is None:
                raise no_task(task.id)
            first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM results").fetchone()[0]
            db.executemany(INSERT_RESULT, rows)
        return first, now

    async def query_results(self, query: QueryResults) -> ResultsData:
        return await self._run(self._query_results, query)

    def _query_results(self, query: QueryResults) -> ResultsData:
        if query.task_id is not None:
            self._get_task(query.task_id)  # NotFound for an unknown id
        if query.session is not None:
            self._require_session(query.session)
        page, summary = results_queries(SQLITE, query)
        with self._transaction(immediate=False) as db:  # one snapshot for page and summary
            rows = db.execute(*page).fetchall()
            counts = db.execute(*summary).fetchall()
        return results_page(rows, counts, query.limit)

    # --- sessions and history -------------------------------------------------------------

    async def list_sessions(
        self, *, name: str | None = None, with_results: bool = True, limit: int = 20
    ) -> list[SessionInfo]:
        return await self._run(self._list_sessions, name, with_results, limit)

    def _list_sessions(self, name: str | None, with_results: bool, limit: int) -> list[SessionInfo]:
        with self._transaction(immediate=False) as db:  # one snapshot for sessions and counts
            rows = db.execute(*sessions_query(SQLITE, name, with_results, limit)).fetchall()
            counts: list[Any] = []
            for statement in session_counts(SQLITE, [row[0] for row in rows]):
                counts += db.execute(*statement).fetchall()
        return sessions_with_summaries(rows, counts)

    async def history(self, name: str, *, session: str | None = None, limit: int = 50) -> HistoryData:
        return await self._run(self._history, name, session, limit)

    def _history(self, name: str, session: str | None, limit: int) -> HistoryData:
        with self._transaction(immediate=False) as db:
            if session is not None:
                self._require_session(session, glob=True)
            rows = db.execute(*history_query(SQLITE, name, session, limit)).fetchall()
            names: list[Any] = []
            if (statement := session_names(SQLITE, rows)) is not None:
                names = db.execute(*statement).fetchall()
        return HistoryData(name=name, results=[_result(row) for row in rows], session_names=dict(names))


def sessions_with_summaries(rows: Sequence[Any], counts: Sequence[Any]) -> list[SessionInfo]:
    """Sessions from ``(id, name, client, created_at)`` rows, with summaries from
    ``(session_id, outcome, count, duration)`` rows."""
    summaries = {row[0]: ResultSummary() for row in rows}
    for session_id, outcome, count, duration in counts:
        summary = summaries[session_id]
        summary.outcomes[Outcome(outcome)] = count
        summary.total += count
        summary.duration += float(duration or 0.0)
    return [
        SessionInfo(
            id=row[0], name=row[1], client=row[2], created_at=to_datetime(row[3]), summary=summaries[row[0]]
        )
        for row in rows
    ]


class _CurrentConnection(threading.local):
    """Per thread: the connection :meth:`SQLiteStore._quick` lent to the running call."""

    db: sqlite3.Connection | None = None


_TASK_COLUMNS = (
    "id, node, session_id, name, spec, state, exit_code, message, created_at, started_at, finished_at"
)
_RESULT_COLUMNS = (
    "id, task_id, session_id, node, name, outcome, duration, message, metrics, labels,"
    " started_at, finished_at, created_at"
)


# --- the SQL both stores share ---------------------------------------------------------
#
# Written once, with ``?`` parameters; a Dialect says how a backend spells the rest.


@dataclass(frozen=True)
class Dialect:
    """How a backend spells what the SQL shared by the stores leaves open."""

    mark: str
    """One parameter: ``?`` (sqlite3) or ``%s`` (psycopg)."""
    arrays: bool
    """A list of values is one array parameter (``= ANY(%s)``), not one parameter each."""
    glob: str
    """The operator matching a column against :attr:`glob_param`: ``GLOB`` or ``~``."""
    glob_param: Callable[[str], str]
    """A glob (``*``, ``?``, ``[...]``) as the right side of :attr:`glob`."""
    label: str
    """The value of the label whose key is the parameter: ``json_extract(labels, ?)``."""
    label_param: Callable[[str], str]
    """A label key as that parameter."""
    tiebreak: str
    """The column that orders rows created at the same moment, newest first."""

    def sql(self, text: str) -> str:
        """``text``, written with ``?`` parameters, with this backend's."""
        return text if self.mark == "?" else text.replace("?", self.mark)

    def one_of(self, column: str, values: list[Any]) -> tuple[str, list[Any]]:
        """The condition ``column`` is one of ``values`` (not empty), and its parameters."""
        if self.arrays:
            return f"{column} = ANY(?)", [values]
        return f"{column} IN ({', '.join('?' * len(values))})", values


SQLITE = Dialect(
    mark="?",
    arrays=False,
    glob="GLOB",
    glob_param=str,
    label="json_extract(labels, ?)",
    label_param=lambda key: f'$."{key}"',
    tiebreak="rowid",  # tasks and sessions have text keys; rowid is the order of insertion
)


def _statement(dialect: Dialect, head: str, where: Sequence[str], tail: str) -> str:
    return dialect.sql(head + (" WHERE " + " AND ".join(where) if where else "") + tail)


_IN_SESSION = "session_id IN (SELECT id FROM sessions WHERE id = ? OR name = ?)"


def session_check(dialect: Dialect, session: str, *, glob: bool = False) -> tuple[str, list[Any]]:
    """The statement that finds a row when ``session`` names a session: its id, its
    name, or with ``glob`` a glob over names. :func:`no_session` when it finds none."""
    if glob:
        sql = f"SELECT 1 FROM sessions WHERE id = ? OR name {dialect.glob} ? LIMIT 1"
        return dialect.sql(sql), [session, dialect.glob_param(session)]
    return dialect.sql("SELECT 1 FROM sessions WHERE id = ? OR name = ? LIMIT 1"), [session, session]


def no_session(session: str) -> NotFound:
    return NotFound(f"no session named {session!r}", details={"session": session})


def no_task(task_id: str) -> NotFound:
    return NotFound(f"no task with id {task_id!r}", details={"task_id": task_id})


INSERT_TASK = (
    "INSERT INTO tasks (id, node, session_id, name, spec, state, labels, created_at, agent)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def task_params(task: TaskInfo, agent: str | None) -> tuple[Any, ...]:
    """The parameters of :data:`INSERT_TASK`."""
    return (
        task.id,
        task.node,
        task.session_id,
        task.name,
        task.spec.model_dump_json(),
        task.state.value,
        json.dumps(task.spec.labels),
        to_epoch(task.created_at),
        agent,
    )


MARK_RUNNING = (
    "UPDATE tasks SET state = 'running', started_at = ?, pid = ?, agent = ?"
    " WHERE id = ? AND state = 'pending'"
)
FINISH_TASK = (
    "UPDATE tasks SET state = ?, exit_code = ?, message = ?, finished_at = ?"
    " WHERE id = ? AND state IN (?, ?)"
)


def finish_params(
    task_id: str, state: TaskState, exit_code: int | None, message: str | None
) -> tuple[Any, ...]:
    """The parameters of :data:`FINISH_TASK`."""
    return (state.value, exit_code, message, time.time(), task_id, *_UNFINISHED)


GET_TASK = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?"
RUNNING_TASKS = f"SELECT {_TASK_COLUMNS}, agent FROM tasks WHERE node = ? AND state = 'running'"


def tasks_query(
    dialect: Dialect,
    node: str | None,
    session: str | None,
    states: Sequence[TaskState] | None,
    limit: int,
) -> tuple[str, list[Any]]:
    """The statement of :meth:`Store.list_tasks`: newest first."""
    where, params = [], []
    if node is not None:
        where.append("node = ?")
        params.append(node)
    if session is not None:
        where.append(_IN_SESSION)
        params += [session, session]
    if states:
        term, values = dialect.one_of("state", [TaskState(s).value for s in states])
        where.append(term)
        params += values
    tail = f" ORDER BY created_at DESC, {dialect.tiebreak} DESC LIMIT ?"
    return _statement(dialect, f"SELECT {_TASK_COLUMNS} FROM tasks", where, tail), [*params, limit]


INSERT_RESULT = (
    "INSERT INTO results (task_id, session_id, node, name, outcome, duration,"
    " message, metrics, labels, started_at, finished_at, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def result_rows(task: TaskInfo, results: Sequence[ResultSpec], now: float) -> list[tuple[Any, ...]]:
    """The parameters of :data:`INSERT_RESULT`, a tuple per result."""
    task_id, session_id, node = task.id, task.session_id, task.node
    # The hot loop of a big batch: plain tuples, no per-row helper calls where the
    # common case (no metrics, labels or timestamps) needs none.
    return [
        (
            task_id,
            session_id,
            node,
            r.name,
            _OUTCOME_TEXT[r.outcome],
            r.duration,
            r.message,
            json.dumps({k: m.model_dump(exclude_none=True) for k, m in r.metrics.items()})
            if r.metrics
            else None,
            json.dumps(r.labels) if r.labels else None,
            None if r.started_at is None else to_epoch(r.started_at),
            None if r.finished_at is None else to_epoch(r.finished_at),
            now,
        )
        for r in results
    ]


def stored_results(
    task: TaskInfo, results: Sequence[ResultSpec], ids: Sequence[int], now: float
) -> list[Result]:
    """``results`` as stored for ``task`` at ``now`` with ``ids``, without reading them back."""
    created = to_datetime(now)
    return [
        Result.model_construct(
            **r.__dict__,
            id=result_id,
            task_id=task.id,
            session_id=task.session_id,
            node=task.node,
            created_at=created,
        )
        for result_id, r in zip(ids, results, strict=True)
    ]


def _result_filters(dialect: Dialect, query: QueryResults) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if query.task_id is not None:
        where.append("task_id = ?")
        params.append(query.task_id)
    if query.session is not None:
        where.append(_IN_SESSION)
        params += [query.session, query.session]
    if query.node is not None:
        where.append("node = ?")
        params.append(query.node)
    if query.outcomes:
        term, values = dialect.one_of("outcome", [Outcome(o).value for o in query.outcomes])
        where.append(term)
        params += values
    if query.name is not None:
        where.append(f"name {dialect.glob} ?")
        params.append(dialect.glob_param(query.name))
    if query.since is not None:
        where.append("created_at >= ?")
        params.append(to_epoch(query.since))
    if query.until is not None:
        where.append("created_at < ?")
        params.append(to_epoch(query.until))
    for key, value in query.labels.items():
        where.append(f"{dialect.label} = ?")
        params += [dialect.label_param(key), value]
    return where, params


Statement = tuple[str, list[Any]]


def results_queries(dialect: Dialect, query: QueryResults) -> tuple[Statement, Statement]:
    """The statements of :meth:`Store.query_results`: its page (one row more than
    asked, to tell whether another follows) and the summary of every match, by
    outcome. Run both in one snapshot and hand the rows to :func:`results_page`."""
    where, params = _result_filters(dialect, query)
    page_where, page_params = list(where), list(params)
    if query.cursor is not None:
        try:
            after = int(query.cursor)
        except ValueError:
            raise BadRequest(f"invalid cursor {query.cursor!r}") from None
        page_where.append("id > ?")
        page_params.append(after)
    page = _statement(dialect, f"SELECT {_RESULT_COLUMNS} FROM results", page_where, " ORDER BY id LIMIT ?")
    summary = _statement(
        dialect, "SELECT outcome, count(*), coalesce(sum(duration), 0) FROM results", where, " GROUP BY outcome"
    )
    return (page, [*page_params, query.limit + 1]), (summary, params)


def results_page(rows: Sequence[Any], counts: Sequence[Any], limit: int) -> ResultsData:
    """The answer to a query from the rows of :func:`results_queries`."""
    more = len(rows) > limit
    rows = rows[:limit]
    return ResultsData(
        results=[_result(row) for row in rows],
        summary=ResultSummary(
            total=sum(c for _, c, _ in counts),
            outcomes={Outcome(o): c for o, c, _ in counts},
            duration=float(sum(d for _, _, d in counts)),
        ),
        next_cursor=str(rows[-1][0]) if more and rows else None,
    )


def sessions_query(
    dialect: Dialect, name: str | None, with_results: bool, limit: int
) -> Statement:
    """The statement of :meth:`Store.list_sessions`; :func:`session_counts` the
    statements of their summaries."""
    where, params = [], []
    if name is not None:
        where.append(f"(id = ? OR name {dialect.glob} ?)")
        params += [name, dialect.glob_param(name)]
    if with_results:
        where.append("EXISTS (SELECT 1 FROM results WHERE results.session_id = sessions.id)")
    tail = f" ORDER BY created_at DESC, {dialect.tiebreak} DESC LIMIT ?"
    return _statement(dialect, "SELECT id, name, client, created_at FROM sessions", where, tail), [*params, limit]


def session_counts(dialect: Dialect, ids: list[str]) -> list[Statement]:
    """The statements that count the results of sessions ``ids`` by outcome, 500
    sessions a statement (SQLite allows so many parameters and no more)."""
    statements = []
    for start in range(0, len(ids), 500):
        term, params = dialect.one_of("session_id", ids[start : start + 500])
        sql = (
            "SELECT session_id, outcome, count(*), coalesce(sum(duration), 0) FROM results"
            f" WHERE {term} GROUP BY session_id, outcome"
        )
        statements.append((dialect.sql(sql), params))
    return statements


def history_query(dialect: Dialect, name: str, session: str | None, limit: int) -> Statement:
    """The statement of :meth:`Store.history`; check ``session`` first with
    :func:`session_check` (``glob=True``)."""
    sql = f"SELECT {_RESULT_COLUMNS} FROM results WHERE name = ?"
    params: list[Any] = [name]
    if session is not None:
        sql += f" AND session_id IN (SELECT id FROM sessions WHERE id = ? OR name {dialect.glob} ?)"
        params += [session, dialect.glob_param(session)]
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    return dialect.sql(sql), [*params, limit]


def session_names(dialect: Dialect, rows: Sequence[Any]) -> Statement | None:
    """The statement that names the sessions of history ``rows``; None for none."""
    ids = sorted({row[2] for row in rows if row[2] is not None})
    if not ids:
        return None
    term, params = dialect.one_of("id", ids)
    return dialect.sql(f"SELECT id, name FROM sessions WHERE {term}"), params


def _task(row: Sequence[Any]) -> TaskInfo:
    return TaskInfo(
        id=row[0],
        node=row[1],
        session_id=row[2],
        name=row[3],
        spec=TaskSpec.model_validate_json(row[4]),
        state=TaskState(row[5]),
        exit_code=row[6],
        message=row[7],
        created_at=to_datetime(row[8]),
        started_at=to_datetime(row[9]),
        finished_at=to_datetime(row[10]),
    )


def _result(row: Sequence[Any]) -> Result:
    return Result(
        id=row[0],
        task_id=row[1],
        session_id=row[2],
        node=row[3],
        name=row[4],
        outcome=Outcome(row[5]),
        duration=row[6],
        message=row[7],
        metrics=_json_object(row[8]),
        labels=_json_object(row[9]),
        started_at=to_datetime(row[10]),
        finished_at=to_datetime(row[11]),
        created_at=to_datetime(row[12]),
    )


def _json_object(value: Any) -> dict[str, Any]:
    """A JSON column: text from SQLite, already parsed from a PostgreSQL JSONB."""
    if not value:
        return {}
    return json.loads(value) if isinstance(value, str) else value


_SCHEMA_V1 = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    client TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX sessions_name ON sessions (name);

CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    session_id TEXT REFERENCES sessions (id),
    name TEXT,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    message TEXT,
    labels TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    pid INTEGER,
    agent TEXT
);
CREATE INDEX tasks_session ON tasks (session_id, created_at);
CREATE INDEX tasks_node_state ON tasks (node, state);
CREATE INDEX tasks_created ON tasks (created_at);

CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL REFERENCES tasks (id),
    session_id TEXT,
    node TEXT,
    name TEXT NOT NULL,
    outcome TEXT NOT NULL,
    duration REAL,
    message TEXT,
    metrics TEXT,
    labels TEXT,
    started_at REAL,
    finished_at REAL,
    created_at REAL NOT NULL
);
CREATE INDEX results_task ON results (task_id, outcome);
CREATE INDEX results_session ON results (session_id, outcome);
CREATE INDEX results_name ON results (name, created_at);
CREATE INDEX results_created ON results (created_at);
"""


def open_store(url: str) -> Store:
    """The store for ``url`` (not yet opened): ``sqlite:///relative/path``,
    ``sqlite:////absolute/path`` or a plain file path."""
    if url.startswith("sqlite:///"):
        return SQLiteStore(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        from .store_postgres import PostgresStore

        return PostgresStore(url)
    if "://" in url:
        scheme = url.split("://", 1)[0]
        raise ConfigError(f"unsupported store URL scheme {scheme!r} in {url!r}; use sqlite:///PATH or postgresql://…")
    return SQLiteStore(Path(url))
