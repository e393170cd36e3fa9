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

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
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

from jumpstarter.errors import ConfigError, NodeError, Unavailable
from jumpstarter.store import schema
from jumpstarter.store.base import Store
from jumpstarter.store.sql import (
    ADD_ARTIFACT,
    DELETE_EMPTY_SESSION,
    DELETE_PENDING_TASK,
    FINISH_TASK,
    GET_BATCH,
    GET_TASK,
    INSERT_BATCH,
    INSERT_RESULT,
    INSERT_SESSION,
    INSERT_TASK,
    LIST_ARTIFACTS,
    MARK_RUNNING,
    RUNNING_TASKS,
    SQLITE,
    STARTING_TASKS,
    TASK_PID,
    Page,
    TaskPage,
    _task,
    artifact_rows,
    finish_params,
    history_query,
    id_runs,
    no_session,
    no_task,
    repeated_batch,
    result_rows,
    results_queries,
    session_check,
    session_counts,
    session_names,
    sessions_query,
    sessions_with_summaries,
    stored_artifacts,
    stored_results,
    task_params,
    tasks_query,
)

T = TypeVar("T")


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

    def cannot_commit(self, exc: Exception) -> NodeError | None:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if isinstance(exc, sqlite3.Error) and code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY):
            return Unavailable(f"the store {self.path} cannot commit: {exc}", details={"store": str(self.path)})
        return None

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            # Before anything is written (even the switch to WAL, which changes the
            # file's header): a database of another application is left as it was.
            # One read transaction: another process migrating a new store meanwhile is
            # seen whole (its tables with their version) or not at all.
            with self._Tx(db, immediate=False):
                unversioned = db.execute("PRAGMA user_version").fetchone()[0] == 0
                foreign = self._foreign_tables(db) if unversioned else []
            if not foreign:
                _enter_wal(db)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the store {self.path}: {exc}") from None
        if foreign:
            db.close()
            raise ConfigError(
                f"the store {self.path} is not a Jumpstarter store: it holds another "
                f"application's tables ({', '.join(foreign)})"
            )
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        self._db = db
        with self._transaction(immediate=True) as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > schema.VERSION:
                raise ConfigError(
                    f"the store {self.path} has schema version {version}; this Jumpstarter "
                    f"knows up to {schema.VERSION}: upgrade Jumpstarter"
                )
            for number, statements in enumerate(schema.migrations(schema.SQLITE_TYPES), start=1):
                if number > version:
                    # Statement by statement: executescript() would commit our transaction.
                    for statement in statements:
                        db.execute(statement)
                    db.execute(f"PRAGMA user_version={number}")
        self._open_inline()

    @staticmethod
    def _foreign_tables(db: sqlite3.Connection, shown: int = 3) -> list[str]:
        names = [
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                " ORDER BY name LIMIT ?",
                (shown + 1,),
            )
        ]
        return names if len(names) <= shown else [*names[:shown], "…"]

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
            self._execute, INSERT_SESSION, (session_id, name, client, time.time())
        )

    async def create_task(self, task: TaskInfo, agent: str | None = None) -> None:
        await self._quick(self._execute, INSERT_TASK, task_params(task, agent))

    async def delete_pending_task(self, task_id: str) -> None:
        await self._quick(self._execute, DELETE_PENDING_TASK, (task_id,))

    async def delete_session_if_empty(self, session_id: str) -> bool:
        return await self._quick(self._delete_session_if_empty, session_id)

    def _delete_session_if_empty(self, session_id: str) -> bool:
        return self.db.execute(DELETE_EMPTY_SESSION, (session_id, session_id)).rowcount > 0

    async def task_pid(self, task_id: str) -> int | None:
        rows = await self._quick(self._fetchall, TASK_PID, (task_id,))
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
        max_bytes: int | None = None,
    ) -> TaskPage:
        sql, params = tasks_query(SQLITE, node, session, states, limit)
        return await self._run(self._list_tasks, session, sql, params, TaskPage(max_bytes))

    def _list_tasks(self, session: str | None, sql: str, params: Sequence[Any], page: TaskPage) -> TaskPage:
        with self._transaction(immediate=False) as db:  # one snapshot for check and list
            if session is not None:
                self._require_session(session)
            for row in db.execute(sql, params):  # read lazily: stop once the page is full
                if not page.add(row):
                    break
        return page

    def _require_session(self, session: str, *, glob: bool = False) -> None:
        if not self.db.execute(*session_check(SQLITE, session, glob=glob)).fetchone():
            raise no_session(session)

    async def running_tasks(self, node: str) -> list[tuple[TaskInfo, str | None]]:
        rows = await self._run(self._fetchall, RUNNING_TASKS, (node,))
        return [(_task(row), row[-1]) for row in rows]

    async def starting_tasks(self, node: str) -> list[tuple[TaskInfo, str]]:
        rows = await self._run(self._fetchall, STARTING_TASKS, (node,))
        return [(_task(row), row[-1]) for row in rows]

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self.db.execute(sql, params).fetchall()

    # --- results ----------------------------------------------------------------------

    async def add_results(
        self, task: TaskInfo, results: Sequence[ResultSpec], batch_id: str | None = None
    ) -> list[Result]:
        return await self._run(self._add_results, task, results, batch_id)

    def _add_results(self, task: TaskInfo, results: Sequence[ResultSpec], batch_id: str | None) -> list[Result]:
        first, now = self._insert_results(task, results, batch_id)
        return stored_results(task, results, range(first, first + len(results)), now)

    async def add_result_ids(
        self, task: TaskInfo, results: Sequence[ResultSpec], batch_id: str | None = None
    ) -> list[int]:
        first, _ = await self._run(self._insert_results, task, results, batch_id)
        return list(range(first, first + len(results)))

    def _insert_results(
        self, task: TaskInfo, results: Sequence[ResultSpec], batch_id: str | None
    ) -> tuple[int, float]:
        """Insert ``results`` (and their batch) in one transaction; the first new id
        (the others follow it: no one else inserts while we hold the write lock) and
        the time."""
        now = time.time()
        rows = result_rows(task, results, now)
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM tasks WHERE id = ?", (task.id,)).fetchone() is None:
                raise no_task(task.id)
            if batch_id is not None and (row := db.execute(GET_BATCH, (batch_id,)).fetchone()):
                raise repeated_batch(batch_id, task.id, row)
            first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM results").fetchone()[0]
            db.executemany(INSERT_RESULT, rows)
            if batch_id is not None:
                ids = id_runs(range(first, first + len(rows)))
                db.execute(INSERT_BATCH, (batch_id, task.id, ids, now))
        return first, now

    async def query_results(self, query: QueryResults, max_bytes: int | None = None) -> ResultsData:
        return await self._run(self._query_results, query, max_bytes)

    def _query_results(self, query: QueryResults, max_bytes: int | None) -> ResultsData:
        if query.task_id is not None:
            self._get_task(query.task_id)  # NotFound for an unknown id
        if query.session is not None:
            self._require_session(query.session)
        statement, summary = results_queries(SQLITE, query)
        page = Page(query.limit, max_bytes)
        with self._transaction(immediate=False) as db:  # one snapshot for page and summary
            counts = db.execute(*summary).fetchall()
            for row in db.execute(*statement):  # row by row: a full page stops reading
                if not page.add(row):
                    break
        return page.reply(counts)

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

    async def history(
        self, name: str, *, session: str | None = None, limit: int = 50, max_bytes: int | None = None
    ) -> HistoryData:
        return await self._run(self._history, name, session, limit, max_bytes)

    def _history(self, name: str, session: str | None, limit: int, max_bytes: int | None) -> HistoryData:
        page = Page(limit, max_bytes)
        with self._transaction(immediate=False) as db:
            if session is not None:
                self._require_session(session, glob=True)
            for row in db.execute(*history_query(SQLITE, name, session, limit)):
                if not page.add(row):
                    break
            names: list[Any] = []
            if (statement := session_names(SQLITE, page.results)) is not None:
                names = db.execute(*statement).fetchall()
        return page.history(name, names)

    # --- files: artifacts -------------------------------------------------------------

    async def add_artifacts(self, task_id: str, artifacts: Sequence[ArtifactInfo]) -> None:
        await self._run(self._add_artifacts, task_id, artifacts)

    def _add_artifacts(self, task_id: str, artifacts: Sequence[ArtifactInfo]) -> None:
        with self._transaction() as db:
            db.executemany(ADD_ARTIFACT, artifact_rows(task_id, artifacts, time.time()))

    async def list_artifacts(self, task_id: str) -> list[ArtifactInfo]:
        return stored_artifacts(await self._run(self._fetchall, LIST_ARTIFACTS, (task_id,)))


class _CurrentConnection(threading.local):
    """Per thread: the connection :meth:`SQLiteStore._quick` lent to the running call."""

    db: sqlite3.Connection | None = None
