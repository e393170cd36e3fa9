"""The store: sessions, tasks and results.

:class:`Store` is the interface; :class:`SQLiteStore` the embedded default. SQLite runs
in WAL mode with ``synchronous=NORMAL``: a commit survives the process being killed
at any point (the WAL is written before ``commit`` returns); only a power cut can
lose the last commits. A batch of results is one transaction: all or nothing.

All SQLite calls run on one worker thread, so a slow disk or a lock held by another
process never blocks the event loop.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from jumpstarter_protocol import (
    Outcome,
    QueryResults,
    Result,
    ResultSpec,
    ResultsData,
    ResultSummary,
    TaskInfo,
    TaskSpec,
    TaskState,
)

from .errors import BadRequest, ConfigError, NotFound

T = TypeVar("T")

_UNFINISHED = (TaskState.PENDING.value, TaskState.RUNNING.value)


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
        """Newest first."""

    @abstractmethod
    async def running_tasks(self, node: str) -> list[tuple[TaskInfo, str | None]]:
        """Tasks of ``node`` in state running, each with the agent that runs it."""

    @abstractmethod
    async def add_results(
        self, task: TaskInfo, results: Sequence[ResultSpec]
    ) -> list[Result]:
        """Commit ``results`` for ``task`` in one transaction."""

    @abstractmethod
    async def query_results(self, query: QueryResults) -> ResultsData: ...


class SQLiteStore(Store):
    """The embedded store: one SQLite file, shared safely by every process on this
    machine that opens it."""

    SCHEMA_VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._lock = threading.Lock()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(self._locked, fn, args, limiter=self._limiter)

    def _locked(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        with self._lock:
            return fn(*args)

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
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

    async def aclose(self) -> None:
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
        assert self._db is not None, "store is not open"
        return SQLiteStore._Tx(self._db, immediate)

    @property
    def db(self) -> sqlite3.Connection:
        assert self._db is not None, "store is not open"
        return self._db

    # --- sessions and tasks ---------------------------------------------------------

    async def add_session(self, session_id: str, name: str, client: str) -> None:
        await self._run(
            self.db.execute,
            "INSERT OR IGNORE INTO sessions (id, name, client, created_at) VALUES (?, ?, ?, ?)",
            (session_id, name, client, time.time()),
        )

    async def create_task(self, task: TaskInfo, agent: str | None = None) -> None:
        await self._run(
            self.db.execute,
            "INSERT INTO tasks (id, node, session_id, name, spec, state, labels, created_at, agent)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                task.id,
                task.node,
                task.session_id,
                task.name,
                task.spec.model_dump_json(),
                task.state.value,
                json.dumps(task.spec.labels),
                to_epoch(task.created_at),
                agent,
            ),
        )

    async def delete_pending_task(self, task_id: str) -> None:
        await self._run(
            self.db.execute, "DELETE FROM tasks WHERE id = ? AND state = 'pending'", (task_id,)
        )

    async def mark_running(self, task_id: str, pid: int | None, agent: str) -> TaskInfo:
        return await self._run(self._mark_running, task_id, pid, agent)

    def _mark_running(self, task_id: str, pid: int | None, agent: str) -> TaskInfo:
        with self._transaction() as db:
            db.execute(
                "UPDATE tasks SET state = 'running', started_at = ?, pid = ?, agent = ?"
                " WHERE id = ? AND state = 'pending'",
                (time.time(), pid, agent, task_id),
            )
            return self._get_task(task_id)

    async def finish_task(
        self, task_id: str, state: TaskState, exit_code: int | None, message: str | None = None
    ) -> TaskInfo:
        return await self._run(self._finish_task, task_id, state, exit_code, message)

    def _finish_task(
        self, task_id: str, state: TaskState, exit_code: int | None, message: str | None
    ) -> TaskInfo:
        with self._transaction() as db:
            db.execute(
                "UPDATE tasks SET state = ?, exit_code = ?, message = ?, finished_at = ?"
                " WHERE id = ? AND state IN (?, ?)",
                (state.value, exit_code, message, time.time(), task_id, *_UNFINISHED),
            )
            return self._get_task(task_id)

    async def get_task(self, task_id: str) -> TaskInfo:
        return await self._run(self._get_task, task_id)

    def _get_task(self, task_id: str) -> TaskInfo:
        row = self.db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None:
            raise NotFound(f"no task with id {task_id!r}", details={"task_id": task_id})
        return _task(row)

    async def list_tasks(
        self,
        *,
        node: str | None = None,
        session: str | None = None,
        states: Sequence[TaskState] | None = None,
        limit: int = 100,
    ) -> list[TaskInfo]:
        where, params = [], []
        if node is not None:
            where.append("node = ?")
            params.append(node)
        if session is not None:
            where.append("session_id IN (SELECT id FROM sessions WHERE id = ? OR name = ?)")
            params += [session, session]
        if states:
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += [TaskState(s).value for s in states]
        sql = f"SELECT {_TASK_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        rows = await self._run(self._fetchall, sql, (*params, limit))
        return [_task(row) for row in rows]

    async def running_tasks(self, node: str) -> list[tuple[TaskInfo, str | None]]:
        rows = await self._run(
            self._fetchall,
            f"SELECT {_TASK_COLUMNS}, agent FROM tasks WHERE node = ? AND state = 'running'",
            (node,),
        )
        return [(_task(row), row[-1]) for row in rows]

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self.db.execute(sql, params).fetchall()

    # --- results ----------------------------------------------------------------------

    async def add_results(self, task: TaskInfo, results: Sequence[ResultSpec]) -> list[Result]:
        return await self._run(self._add_results, task, results)

    def _add_results(self, task: TaskInfo, results: Sequence[ResultSpec]) -> list[Result]:
        now = time.time()
        rows = [
            (
                task.id,
                task.session_id,
                task.node,
                r.name,
                r.outcome.value,
                r.duration,
                r.message,
                json.dumps({k: m.model_dump(exclude_none=True) for k, m in r.metrics.items()})
                if r.metrics
                else None,
                json.dumps(r.labels) if r.labels else None,
                to_epoch(r.started_at),
                to_epoch(r.finished_at),
                now,
            )
            for r in results
        ]
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM tasks WHERE id = ?", (task.id,)).fetchone() is None:
                raise NotFound(f"no task with id {task.id!r}", details={"task_id": task.id})
            first = db.execute("SELECT coalesce(max(id), 0) + 1 FROM results").fetchone()[0]
            db.executemany(
                "INSERT INTO results (task_id, session_id, node, name, outcome, duration,"
                " message, metrics, labels, started_at, finished_at, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        created = to_datetime(now)
        return [
            Result.model_construct(
                **r.__dict__,
                id=first + i,
                task_id=task.id,
                session_id=task.session_id,
                node=task.node,
                created_at=created,
            )
            for i, r in enumerate(results)
        ]

    async def query_results(self, query: QueryResults) -> ResultsData:
        return await self._run(self._query_results, query)

    def _query_results(self, query: QueryResults) -> ResultsData:
        if query.task_id is not None:
            self._get_task(query.task_id)  # NotFound for an unknown id
        if query.session is not None and not self.db.execute(
            "SELECT 1 FROM sessions WHERE id = ? OR name = ? LIMIT 1", (query.session, query.session)
        ).fetchone():
            raise NotFound(f"no session named {query.session!r}", details={"session": query.session})
        where, params = _result_filters(query)
        sql_where = (" WHERE " + " AND ".join(where)) if where else ""
        page_where = list(where)
        page_params = list(params)
        if query.cursor is not None:
            try:
                after = int(query.cursor)
            except ValueError:
                raise BadRequest(f"invalid cursor {query.cursor!r}") from None
            page_where.append("id > ?")
            page_params.append(after)
        page_sql = f"SELECT {_RESULT_COLUMNS} FROM results"
        if page_where:
            page_sql += " WHERE " + " AND ".join(page_where)
        page_sql += " ORDER BY id LIMIT ?"
        with self._transaction(immediate=False) as db:  # one snapshot for page and summary
            rows = db.execute(page_sql, (*page_params, query.limit + 1)).fetchall()
            counts = db.execute(
                f"SELECT outcome, count(*), total(duration) FROM results{sql_where} GROUP BY outcome",
                params,
            ).fetchall()
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        summary = ResultSummary(
            total=sum(c for _, c, _ in counts),
            outcomes={Outcome(o): c for o, c, _ in counts},
            duration=sum(d for _, _, d in counts),
        )
        return ResultsData(
            results=[_result(row) for row in rows],
            summary=summary,
            next_cursor=str(rows[-1][0]) if more and rows else None,
        )


def _result_filters(query: QueryResults) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if query.task_id is not None:
        where.append("task_id = ?")
        params.append(query.task_id)
    if query.session is not None:
        where.append("session_id IN (SELECT id FROM sessions WHERE id = ? OR name = ?)")
        params += [query.session, query.session]
    if query.node is not None:
        where.append("node = ?")
        params.append(query.node)
    if query.outcomes:
        where.append(f"outcome IN ({', '.join('?' * len(query.outcomes))})")
        params += [Outcome(o).value for o in query.outcomes]
    if query.name is not None:
        where.append("name GLOB ?")
        params.append(query.name)
    if query.since is not None:
        where.append("created_at >= ?")
        params.append(to_epoch(query.since))
    if query.until is not None:
        where.append("created_at < ?")
        params.append(to_epoch(query.until))
    for key, value in query.labels.items():
        where.append("json_extract(labels, ?) = ?")
        params += [f'$."{key}"', value]
    return where, params


_TASK_COLUMNS = (
    "id, node, session_id, name, spec, state, exit_code, message, created_at, started_at, finished_at"
)
_RESULT_COLUMNS = (
    "id, task_id, session_id, node, name, outcome, duration, message, metrics, labels,"
    " started_at, finished_at, created_at"
)


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
        metrics=json.loads(row[8]) if row[8] else {},
        labels=json.loads(row[9]) if row[9] else {},
        started_at=to_datetime(row[10]),
        finished_at=to_datetime(row[11]),
        created_at=to_datetime(row[12]),
    )


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
