"""The PostgreSQL store: one database shared by every node agent and client of a lab.

Same interface and semantics as :class:`~jumpstarter.store.SQLiteStore`; psycopg 3,
async, with a connection pool. The schema is versioned; migrations run on open under
an advisory lock, so two agents starting at once do not race.

Install with ``pip install 'jumpstarter-core[postgres]'`` and point ``store`` at
``postgresql://user@host:5432/dbname``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

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
    _TASK_COLUMNS,
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
    STARTING_TASKS,
    TASK_PID,
    Dialect,
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

try:
    import psycopg
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError(
        "a postgresql:// store needs psycopg: pip install 'jumpstarter-core[postgres]'"
    ) from exc

PAGE_FETCH = 50
"""Rows of a query's page fetched from the server at once."""
CONNECT_TIMEOUT = 5
"""Seconds to wait for the server to answer when the store is opened."""


def _first_line(exc: Exception) -> str:
    # libpq's message: "connection failed: connection to server at …: Connection
    # refused\n\tIs the server running…": the first line says it.
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class PostgresStore(Store):
    """A store in a PostgreSQL database, shared by many machines."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4) -> None:
        self.url = url
        self._pool = AsyncConnectionPool(
            url, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True}
        )

    def cannot_commit(self, exc: Exception) -> NodeError | None:
        if isinstance(exc, psycopg.errors.DiskFull | psycopg.errors.ReadOnlySqlTransaction | psycopg.OperationalError):
            return Unavailable(f"the store {_safe(self.url)} cannot commit: {exc}".strip(), details={"store": _safe(self.url)})
        return None

    async def open(self) -> None:
        # One connection first: a server that cannot be reached (or refuses us) is
        # one line at once, not the pool's retries logged for its whole timeout.
        try:
            probe = await psycopg.AsyncConnection.connect(self.url, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot open the store {_safe(self.url)}: {_first_line(exc)}") from None
        await probe.close()
        try:
            await self._pool.open(wait=True, timeout=10)
        except Exception as exc:
            raise ConfigError(f"cannot open the store {_safe(self.url)}: {exc}") from None
        async with self._pool.connection() as db, db.transaction():
            # One migrator at a time, across every machine sharing the database.
            await db.execute("SELECT pg_advisory_xact_lock(7413520921)")
            await db.execute(
                "CREATE TABLE IF NOT EXISTS jmp_schema (version INTEGER NOT NULL)"
            )
            row = await (await db.execute("SELECT max(version) FROM jmp_schema")).fetchone()
            version = row[0] or 0
            if version > schema.VERSION:
                raise ConfigError(
                    f"the store {_safe(self.url)} has schema version {version}; this "
                    f"Jumpstarter knows up to {schema.VERSION}: upgrade Jumpstarter"
                )
            for number, statements in enumerate(schema.migrations(schema.POSTGRES_TYPES), start=1):
                if number > version:
                    for statement in statements:
                        await db.execute(statement)
                    await db.execute("INSERT INTO jmp_schema (version) VALUES (%s)", (number,))

    async def aclose(self) -> None:
        await self._pool.close()

    async def _fetchone(self, sql: str, params: Sequence[Any] = ()) -> Any:
        async with self._pool.connection() as db:
            return await (await db.execute(sql, params)).fetchone()

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._pool.connection() as db:
            return await (await db.execute(sql, params)).fetchall()

    # --- sessions and tasks ---------------------------------------------------------

    async def add_session(self, session_id: str, name: str, client: str) -> None:
        async with self._pool.connection() as db:
            await db.execute(POSTGRES.sql(INSERT_SESSION), (session_id, name, client, time.time()))

    async def create_task(self, task: TaskInfo, agent: str | None = None) -> None:
        async with self._pool.connection() as db:
            await db.execute(POSTGRES.sql(INSERT_TASK), task_params(task, agent))

    async def delete_pending_task(self, task_id: str) -> None:
        async with self._pool.connection() as db:
            await db.execute(POSTGRES.sql(DELETE_PENDING_TASK), (task_id,))

    async def delete_session_if_empty(self, session_id: str) -> bool:
        async with self._pool.connection() as db:
            cursor = await db.execute(POSTGRES.sql(DELETE_EMPTY_SESSION), (session_id, session_id))
            return cursor.rowcount > 0

    async def task_pid(self, task_id: str) -> int | None:
        row = await self._fetchone(POSTGRES.sql(TASK_PID), (task_id,))
        return row[0] if row else None

    async def mark_running(self, task_id: str, pid: int | None, agent: str) -> TaskInfo:
        row = await self._fetchone(
            POSTGRES.sql(f"{MARK_RUNNING} RETURNING {_TASK_COLUMNS}"), (time.time(), pid, agent, task_id)
        )
        return _task(row) if row else await self.get_task(task_id)

    async def finish_task(
        self, task_id: str, state: TaskState, exit_code: int | None, message: str | None = None
    ) -> TaskInfo:
        row = await self._fetchone(
            POSTGRES.sql(f"{FINISH_TASK} RETURNING {_TASK_COLUMNS}"),
            finish_params(task_id, state, exit_code, message),
        )
        return _task(row) if row else await self.get_task(task_id)

    async def get_task(self, task_id: str) -> TaskInfo:
        row = await self._fetchone(POSTGRES.sql(GET_TASK), (task_id,))
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
        page = TaskPage(max_bytes)
        async with self._snapshot() as db:
            if session is not None and not await (await db.execute(*session_check(POSTGRES, session))).fetchone():
                raise no_session(session)
            await self._fill(db, page, tasks_query(POSTGRES, node, session, states, limit))
        return page

    async def _require_session(self, session: str, *, glob: bool = False) -> None:
        if not await self._fetchone(*session_check(POSTGRES, session, glob=glob)):
            raise no_session(session)

    async def running_tasks(self, node: str) -> list[tuple[TaskInfo, str | None]]:
        rows = await self._fetchall(POSTGRES.sql(RUNNING_TASKS), (node,))
        return [(_task(row), row[-1]) for row in rows]

    async def starting_tasks(self, node: str) -> list[tuple[TaskInfo, str]]:
        rows = await self._fetchall(POSTGRES.sql(STARTING_TASKS), (node,))
        return [(_task(row), row[-1]) for row in rows]

    # --- results ----------------------------------------------------------------------

    async def add_results(
        self, task: TaskInfo, results: Sequence[ResultSpec], batch_id: str | None = None
    ) -> list[Result]:
        now = time.time()
        rows = result_rows(task, results, now)
        async with self._pool.connection() as db, db.transaction():
            if not await (await db.execute("SELECT 1 FROM tasks WHERE id = %s", (task.id,))).fetchone():
                raise no_task(task.id)
            if batch_id is not None:
                # Claimed first: the same batch sent again while this one commits
                # waits here for it, then finds it stored.
                claimed = await (
                    await db.execute(
                        POSTGRES.sql(INSERT_BATCH + " ON CONFLICT (id) DO NOTHING RETURNING id"),
                        (batch_id, task.id, "[]", now),
                    )
                ).fetchone()
                if not claimed:
                    row = await (await db.execute(POSTGRES.sql(GET_BATCH), (batch_id,))).fetchone()
                    raise repeated_batch(batch_id, task.id, row)
            async with db.cursor() as cur:
                await cur.executemany(POSTGRES.sql(f"{INSERT_RESULT} RETURNING id"), rows, returning=True)
                ids = []
                while True:
                    ids.append((await cur.fetchone())[0])
                    if not cur.nextset():
                        break
            if batch_id is not None:
                await db.execute(
                    "UPDATE result_batches SET ids = %s WHERE id = %s", (id_runs(ids), batch_id)
                )
        return stored_results(task, results, ids, now)

    async def query_results(self, query: QueryResults, max_bytes: int | None = None) -> ResultsData:
        if query.task_id is not None:
            await self.get_task(query.task_id)
        if query.session is not None:
            await self._require_session(query.session)
        statement, summary = results_queries(POSTGRES, query)
        page = Page(query.limit, max_bytes)
        async with self._snapshot() as db:  # one for the page and its summary
            counts = await (await db.execute(*summary)).fetchall()
            await self._fill(db, page, statement)
        return page.reply(counts)

    # --- sessions and history -------------------------------------------------------------

    async def list_sessions(
        self, *, name: str | None = None, with_results: bool = True, limit: int = 20
    ) -> list[SessionInfo]:
        async with self._snapshot() as db:
            rows = await (await db.execute(*sessions_query(POSTGRES, name, with_results, limit))).fetchall()
            counts: list[Any] = []
            for statement in session_counts(POSTGRES, [row[0] for row in rows]):
                counts += await (await db.execute(*statement)).fetchall()
        return sessions_with_summaries(rows, counts)

    async def history(
        self, name: str, *, session: str | None = None, limit: int = 50, max_bytes: int | None = None
    ) -> HistoryData:
        page = Page(limit, max_bytes)
        async with self._snapshot() as db:
            if session is not None and not await (
                await db.execute(*session_check(POSTGRES, session, glob=True))
            ).fetchone():
                raise no_session(session)
            await self._fill(db, page, history_query(POSTGRES, name, session, limit))
            names: list[Any] = []
            if (statement := session_names(POSTGRES, page.results)) is not None:
                names = await (await db.execute(*statement)).fetchall()
        return page.history(name, names)

    @staticmethod
    async def _fill(db: psycopg.AsyncConnection[Any], page: Page | TaskPage, statement: tuple[str, list[Any]]) -> None:
        """Feed ``page`` the rows of ``statement`` until it is full, from a server-side
        cursor: rows come a few at a time, so large results are never all held here."""
        async with db.cursor(name="jmp_page") as cur:
            await cur.execute(*statement)
            full = False
            while not full and (rows := await cur.fetchmany(PAGE_FETCH)):
                full = not all(page.add(row) for row in rows)

    # --- files: artifacts -------------------------------------------------------------

    async def add_artifacts(self, task_id: str, artifacts: Sequence[ArtifactInfo]) -> None:
        async with self._pool.connection() as db, db.transaction():
            async with db.cursor() as cursor:
                await cursor.executemany(POSTGRES.sql(ADD_ARTIFACT), artifact_rows(task_id, artifacts, time.time()))

    async def list_artifacts(self, task_id: str) -> list[ArtifactInfo]:
        return stored_artifacts(await self._fetchall(POSTGRES.sql(LIST_ARTIFACTS), (task_id,)))

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection in a transaction whose reads all see one snapshot."""
        async with self._pool.connection() as db, db.transaction():
            await db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield db


def glob_to_regex(pattern: str) -> str:
    """A glob (``*``, ``?``, ``[...]``, as SQLite's GLOB) as an anchored POSIX regex."""
    out = ["^"]
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            # A class, as in GLOB: [abc], [a-z], [^abc], []] — same syntax in a regex,
            # but for the backslash, which a regex reads as an escape.
            out.append(pattern[i : end + 1].replace("\\", "\\\\"))
            i = end
        else:
            out.append(_REGEX_SPECIAL.get(c, c))
        i += 1
    out.append("$")
    return "".join(out)


_REGEX_SPECIAL = {c: "\\" + c for c in ".^$+{}()|[]\\"}

POSTGRES = Dialect(
    mark="%s",
    arrays=True,
    glob="~",
    glob_param=glob_to_regex,
    label="labels ->> ?",
    label_param=str,
    tiebreak="id",
)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    host, db = info.get("host", ""), info.get("dbname", "")
    return f"postgresql://{info.get('user', '')}@{host}:{info.get('port', '5432')}/{db}"
