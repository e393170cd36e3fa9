"""The PostgreSQL store: one database shared by every node agent and client of a lab.

Same interface and semantics as :class:`~jumpstarter.store.SQLiteStore`; psycopg 3,
async, with a connection pool. The schema is versioned; migrations run on open under
an advisory lock, so two agents starting at once do not race.

Install with ``pip install 'jumpstarter-core[postgres]'`` and point ``store`` at
``postgresql://user@host:5432/dbname``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from jumpstarter_protocol import (
    HistoryData,
    Outcome,
    QueryResults,
    Result,
    ResultSpec,
    ResultsData,
    ResultSummary,
    SessionInfo,
    TaskInfo,
    TaskState,
)

from .errors import BadRequest, ConfigError, NotFound
from .store import (
    _RESULT_COLUMNS,
    _TASK_COLUMNS,
    Store,
    _result,
    _task,
    sessions_with_summaries,
    to_datetime,
    to_epoch,
)

try:
    import psycopg
    from psycopg_pool import AsyncConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ConfigError(
        "a postgresql:// store needs psycopg: pip install 'jumpstarter-core[postgres]'"
    ) from exc

_UNFINISHED = (TaskState.PENDING.value, TaskState.RUNNING.value)

# Migration N is applied when the stored version is below N. Append; never edit.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        client TEXT,
        created_at DOUBLE PRECISION NOT NULL
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
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        pid INTEGER,
        agent TEXT
    );
    CREATE INDEX tasks_session ON tasks (session_id, created_at);
    CREATE INDEX tasks_node_state ON tasks (node, state);
    CREATE INDEX tasks_created ON tasks (created_at);

    CREATE TABLE results (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks (id),
        session_id TEXT,
        node TEXT,
        name TEXT NOT NULL,
        outcome TEXT NOT NULL,
        duration DOUBLE PRECISION,
        message TEXT,
        metrics TEXT,
        labels JSONB,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX results_task ON results (task_id, outcome);
    CREATE INDEX results_session ON results (session_id, outcome);
    CREATE INDEX results_name ON results (name text_pattern_ops, created_at);
    CREATE INDEX results_created ON results (created_at);
    """,
    # 2: the node registry and leases by selector.
    """
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        labels JSONB NOT NULL DEFAULT '{}',
        endpoint TEXT,
        transport TEXT NOT NULL,
        driver TEXT NOT NULL,
        agent TEXT,
        registered_at DOUBLE PRECISION NOT NULL,
        last_seen DOUBLE PRECISION NOT NULL
    );

    CREATE TABLE leases (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        node TEXT NOT NULL REFERENCES nodes (name),
        session_id TEXT NOT NULL,
        session_name TEXT NOT NULL,
        holder TEXT,
        since DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        keepalive_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION,
        end_reason TEXT,
        request_id BIGINT
    );
    -- The schema itself forbids two live leases on one node.
    CREATE UNIQUE INDEX leases_one_live_per_node ON leases (node) WHERE ended_at IS NULL;
    CREATE INDEX leases_session ON leases (session_id) WHERE ended_at IS NULL;

    CREATE TABLE lease_requests (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        selector JSONB NOT NULL,
        session_id TEXT NOT NULL,
        session_name TEXT NOT NULL,
        holder TEXT,
        duration DOUBLE PRECISION,
        requested_at DOUBLE PRECISION NOT NULL,
        keepalive_at DOUBLE PRECISION NOT NULL,
        lease_id BIGINT REFERENCES leases (id)
    );
    """,
]


class PostgresStore(Store):
    """A store in a PostgreSQL database, shared by many machines."""

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 4) -> None:
        self.url = url
        self._pool = AsyncConnectionPool(
            url, min_size=min_size, max_size=max_size, open=False, kwargs={"autocommit": True}
        )

    async def open(self) -> None:
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
            if version > len(_MIGRATIONS):
                raise ConfigError(
                    f"the store {_safe(self.url)} has schema version {version}; this "
                    f"Jumpstarter knows up to {len(_MIGRATIONS)}: upgrade Jumpstarter"
                )
            for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
                await db.execute(script)
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
        await self._fetchall(
            "INSERT INTO sessions (id, name, client, created_at) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            (session_id, name, client, time.time()),
        )

    async def create_task(self, task: TaskInfo, agent: str | None = None) -> None:
        async with self._pool.connection() as db:
            await db.execute(
                "INSERT INTO tasks (id, node, session_id, name, spec, state, labels, created_at, agent)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
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
        async with self._pool.connection() as db:
            await db.execute("DELETE FROM tasks WHERE id = %s AND state = 'pending'", (task_id,))

    async def mark_running(self, task_id: str, pid: int | None, agent: str) -> TaskInfo:
        row = await self._fetchone(
            "UPDATE tasks SET state = 'running', started_at = %s, pid = %s, agent = %s"
            f" WHERE id = %s AND state = 'pending' RETURNING {_TASK_COLUMNS}",
            (time.time(), pid, agent, task_id),
        )
        return _task(row) if row else await self.get_task(task_id)

    async def finish_task(
        self, task_id: str, state: TaskState, exit_code: int | None, message: str | None = None
    ) -> TaskInfo:
        row = await self._fetchone(
            "UPDATE tasks SET state = %s, exit_code = %s, message = %s, finished_at = %s"
            f" WHERE id = %s AND state IN (%s, %s) RETURNING {_TASK_COLUMNS}",
            (state.value, exit_code, message, time.time(), task_id, *_UNFINISHED),
        )
        return _task(row) if row else await self.get_task(task_id)

    async def get_task(self, task_id: str) -> TaskInfo:
        row = await self._fetchone(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = %s", (task_id,))
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
            where.append("node = %s")
            params.append(node)
        if session is not None:
            where.append("session_id IN (SELECT id FROM sessions WHERE id = %s OR name = %s)")
            params += [session, session]
        if states:
            where.append("state = ANY(%s)")
            params.append([TaskState(s).value for s in states])
        sql = f"SELECT {_TASK_COLUMNS} FROM tasks"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
        return [_task(row) for row in await self._fetchall(sql, (*params, limit))]

    async def running_tasks(self, node: str) -> list[tuple[TaskInfo, str | None]]:
        rows = await self._fetchall(
            f"SELECT {_TASK_COLUMNS}, agent FROM tasks WHERE node = %s AND state = 'running'",
            (node,),
        )
        return [(_task(row), row[-1]) for row in rows]

    # --- results ----------------------------------------------------------------------

    async def add_results(self, task: TaskInfo, results: Sequence[ResultSpec]) -> list[Result]:
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
        async with self._pool.connection() as db, db.transaction():
            if not await (await db.execute("SELECT 1 FROM tasks WHERE id = %s", (task.id,))).fetchone():
                raise NotFound(f"no task with id {task.id!r}", details={"task_id": task.id})
            async with db.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO results (task_id, session_id, node, name, outcome, duration,"
                    " message, metrics, labels, started_at, finished_at, created_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                    rows,
                    returning=True,
                )
                ids = []
                while True:
                    ids.append((await cur.fetchone())[0])
                    if not cur.nextset():
                        break
        created = to_datetime(now)
        return [
            Result.model_construct(
                **r.__dict__,
                id=ids[i],
                task_id=task.id,
                session_id=task.session_id,
                node=task.node,
                created_at=created,
            )
            for i, r in enumerate(results)
        ]

    async def query_results(self, query: QueryResults) -> ResultsData:
        if query.task_id is not None:
            await self.get_task(query.task_id)
        if query.session is not None and not await self._fetchone(
            "SELECT 1 FROM sessions WHERE id = %s OR name = %s LIMIT 1", (query.session, query.session)
        ):
            raise NotFound(f"no session named {query.session!r}", details={"session": query.session})
        where, params = _filters(query)
        page_where, page_params = list(where), list(params)
        if query.cursor is not None:
            try:
                page_params.append(int(query.cursor))
            except ValueError:
                raise BadRequest(f"invalid cursor {query.cursor!r}") from None
            page_where.append("id > %s")
        page_sql = f"SELECT {_RESULT_COLUMNS} FROM results"
        if page_where:
            page_sql += " WHERE " + " AND ".join(page_where)
        page_sql += " ORDER BY id LIMIT %s"
        summary_sql = "SELECT outcome, count(*), coalesce(sum(duration), 0) FROM results"
        if where:
            summary_sql += " WHERE " + " AND ".join(where)
        summary_sql += " GROUP BY outcome"
        async with self._pool.connection() as db, db.transaction():
            # One snapshot for the page and its summary.
            await db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = await (await db.execute(page_sql, (*page_params, query.limit + 1))).fetchall()
            counts = await (await db.execute(summary_sql, params)).fetchall()
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        return ResultsData(
            results=[_result(_jsonb_as_text(row)) for row in rows],
            summary=ResultSummary(
                total=sum(c for _, c, _ in counts),
                outcomes={Outcome(o): c for o, c, _ in counts},
                duration=float(sum(d for _, _, d in counts)),
            ),
            next_cursor=str(rows[-1][0]) if more and rows else None,
        )

    # --- sessions and history -------------------------------------------------------------

    async def list_sessions(
        self, *, name: str | None = None, with_results: bool = True, limit: int = 20
    ) -> list[SessionInfo]:
        where, params = [], []
        if name is not None:
            where.append("(id = %s OR name ~ %s)")
            params += [name, glob_to_regex(name)]
        if with_results:
            where.append("EXISTS (SELECT 1 FROM results WHERE results.session_id = sessions.id)")
        sql = "SELECT id, name, client, created_at FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
        async with self._pool.connection() as db, db.transaction():
            await db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = await (await db.execute(sql, (*params, limit))).fetchall()
            counts = await (
                await db.execute(
                    "SELECT session_id, outcome, count(*), coalesce(sum(duration), 0) FROM results"
                    " WHERE session_id = ANY(%s) GROUP BY session_id, outcome",
                    ([row[0] for row in rows],),
                )
            ).fetchall()
        return sessions_with_summaries(rows, counts)

    async def history(self, name: str, *, session: str | None = None, limit: int = 50) -> HistoryData:
        sql = f"SELECT {_RESULT_COLUMNS} FROM results WHERE name = %s"
        params: list[Any] = [name]
        if session is not None:
            sql += " AND session_id IN (SELECT id FROM sessions WHERE id = %s OR name ~ %s)"
            params += [session, glob_to_regex(session)]
        sql += " ORDER BY created_at DESC, id DESC LIMIT %s"
        async with self._pool.connection() as db, db.transaction():
            await db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            if session is not None and not await (
                await db.execute(
                    "SELECT 1 FROM sessions WHERE id = %s OR name ~ %s LIMIT 1",
                    (session, glob_to_regex(session)),
                )
            ).fetchone():
                raise NotFound(f"no session named {session!r}", details={"session": session})
            rows = await (await db.execute(sql, (*params, limit))).fetchall()
            ids = sorted({row[2] for row in rows if row[2] is not None})
            names = await (
                await db.execute("SELECT id, name FROM sessions WHERE id = ANY(%s)", (ids,))
            ).fetchall()
        return HistoryData(
            name=name,
            results=[_result(_jsonb_as_text(row)) for row in rows],
            session_names=dict(names),
        )


def _jsonb_as_text(row: Sequence[Any]) -> list[Any]:
    """psycopg hands JSONB back parsed; the shared row reader expects text."""
    row = list(row)
    if row[9] is not None and not isinstance(row[9], str):
        row[9] = json.dumps(row[9])
    return row


def _filters(query: QueryResults) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if query.task_id is not None:
        where.append("task_id = %s")
        params.append(query.task_id)
    if query.session is not None:
        where.append("session_id IN (SELECT id FROM sessions WHERE id = %s OR name = %s)")
        params += [query.session, query.session]
    if query.node is not None:
        where.append("node = %s")
        params.append(query.node)
    if query.outcomes:
        where.append("outcome = ANY(%s)")
        params.append([Outcome(o).value for o in query.outcomes])
    if query.name is not None:
        where.append("name ~ %s")
        params.append(glob_to_regex(query.name))
    if query.since is not None:
        where.append("created_at >= %s")
        params.append(to_epoch(query.since))
    if query.until is not None:
        where.append("created_at < %s")
        params.append(to_epoch(query.until))
    for key, value in query.labels.items():
        where.append("labels ->> %s = %s")
        params += [key, value]
    return where, params


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


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    host, db = info.get("host", ""), info.get("dbname", "")
    return f"postgresql://{info.get('user', '')}@{host}:{info.get('port', '5432')}/{db}"
