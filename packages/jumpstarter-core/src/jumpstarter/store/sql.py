"""The SQL both stores share, written once with ``?`` parameters; a :class:`Dialect`
says how a back end spells the rest. Also the conversions between rows and protocol
models."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jumpstarter_protocol import (
    ArtifactInfo,
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

from jumpstarter.errors import BadRequest, Conflict, NotFound, TooLarge
from jumpstarter.store.base import RepeatedBatch

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



_TASK_COLUMNS = (
    "id, node, session_id, name, spec, state, exit_code, message, created_at, started_at, finished_at"
)
_RESULT_COLUMNS = (
    "id, task_id, session_id, node, name, outcome, duration, message, metrics, labels,"
    " started_at, finished_at, created_at, flaky, attempts, file, line"
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


INSERT_SESSION = (
    "INSERT INTO sessions (id, name, client, created_at) VALUES (?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
DELETE_PENDING_TASK = "DELETE FROM tasks WHERE id = ? AND state = 'pending'"
DELETE_EMPTY_SESSION = (
    # One statement, so a task filed meanwhile keeps its session.
    "DELETE FROM sessions WHERE id = ? AND NOT EXISTS (SELECT 1 FROM tasks WHERE session_id = ?)"
)
TASK_PID = "SELECT pid FROM tasks WHERE id = ?"


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
STARTING_TASKS = (
    f"SELECT {_TASK_COLUMNS}, agent FROM tasks WHERE node = ? AND state = 'pending' AND agent IS NOT NULL"
)


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
    " message, metrics, labels, started_at, finished_at, created_at, flaky, attempts, file, line)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
            1 if r.flaky else None,
            json.dumps([a.model_dump(mode="json", exclude_none=True) for a in r.attempts])
            if r.attempts
            else None,
            r.file,
            r.line,
        )
        for r in results
    ]


INSERT_BATCH = "INSERT INTO result_batches (id, task_id, ids, created_at) VALUES (?, ?, ?, ?)"
GET_BATCH = "SELECT task_id, ids FROM result_batches WHERE id = ?"


def id_runs(ids: Sequence[int]) -> str:
    """``ids`` as the ``ids`` column of ``result_batches``: JSON ``[first, last]`` runs."""
    if isinstance(ids, range) and ids.step == 1:
        return json.dumps([[ids.start, ids.stop - 1]] if ids else [])
    runs: list[list[int]] = []
    for result_id in ids:
        if runs and runs[-1][1] + 1 == result_id:
            runs[-1][1] = result_id
        else:
            runs.append([result_id, result_id])
    return json.dumps(runs)


def repeated_batch(batch_id: str, task_id: str, row: Sequence[Any]) -> Exception:
    """What to raise for batch ``batch_id`` of ``task_id`` found stored as ``row``
    (:data:`GET_BATCH`): :class:`RepeatedBatch`, or :class:`Conflict` when the id
    was used for another task's results."""
    stored_task, runs = row
    if stored_task != task_id:
        return Conflict(
            f"result batch {batch_id!r} was stored for task {stored_task!r}, not {task_id!r}",
            details={"batch_id": batch_id},
        )
    return RepeatedBatch(batch_id, [i for first, last in json.loads(runs) for i in range(first, last + 1)])


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

_MAX_ID = 2**63 - 1  # both stores' ids are signed 64-bit


def parse_cursor(cursor: str) -> int:
    """The result id a cursor (a page's ``next_cursor``) stands for; a cursor no page
    gave (not a number, or past any id) is :class:`BadRequest`."""
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) > _MAX_ID:
        shown = cursor if len(cursor) <= 40 else cursor[:39] + "…"
        raise BadRequest(f"invalid cursor {shown!r}: use the next_cursor of a page")
    return int(cursor)



def results_queries(dialect: Dialect, query: QueryResults) -> tuple[Statement, Statement]:
    """The statements of :meth:`Store.query_results`: its page (one row more than
    asked, to tell whether another follows) and the summary of every match, by
    outcome. Run both in one snapshot and feed the page's rows to a :class:`Page`."""
    where, params = _result_filters(dialect, query)
    page_where, page_params = list(where), list(params)
    if query.cursor is not None:
        after = parse_cursor(query.cursor)
        page_where.append("id > ?")
        page_params.append(after)
    page = _statement(dialect, f"SELECT {_RESULT_COLUMNS} FROM results", page_where, " ORDER BY id LIMIT ?")
    summary = _statement(
        dialect, "SELECT outcome, count(*), coalesce(sum(duration), 0) FROM results", where, " GROUP BY outcome"
    )
    return (page, [*page_params, query.limit + 1]), (summary, params)


class TaskPage(list):
    """Tasks for a reply, added row by row within ``max_bytes`` of JSON (the reply's
    budget): a list of :class:`TaskInfo`, with ``truncated`` when rows were left out
    because they would not fit."""

    ROW_OVERHEAD = 512

    def __init__(self, max_bytes: int | None = None) -> None:
        super().__init__()
        self.max_bytes = max_bytes
        self.truncated = False
        self._size = 0

    def add(self, row: Sequence[Any]) -> bool:
        """Add the task of ``row`` if it fits; False once the page is full."""
        if self.max_bytes is not None:
            # JSON of text is at most 6 bytes a character (\u0000).
            size = 6 * sum(_text_length(value) for value in row) + self.ROW_OVERHEAD
            if self._size + size > self.max_bytes and self:
                self.truncated = True
                return False
            self._size += size
        self.append(_task(row))
        return True


class Page:
    """A page of results built row by row, within ``limit`` rows and ``max_bytes``
    bytes of JSON (the reply's budget), so a query over large results stops reading
    when the page is full instead of building a reply too large to send. Feed it
    rows of :func:`results_queries`'s page statement with :meth:`add` until it
    answers False, then take :meth:`reply`."""

    ROW_OVERHEAD = 1024
    """Bytes a result's JSON spends beyond its text: keys, numbers, timestamps."""

    def __init__(self, limit: int, max_bytes: int | None = None) -> None:
        self.limit, self.max_bytes = limit, max_bytes
        self.results: list[Result] = []
        self.more = False
        self._size = 0  # an upper bound of the JSON of self.results

    def add(self, row: Sequence[Any]) -> bool:
        """Add ``row`` if it fits; False when the page is full (then another follows)."""
        if len(self.results) >= self.limit:
            self.more = True
            return False
        result = _result(row)
        if self.max_bytes is not None:
            # Cheap first: JSON of text is at most 6 bytes a character (\u0000); only
            # near the budget is the result's JSON measured exactly.
            size = 6 * sum(_text_length(value) for value in row) + self.ROW_OVERHEAD
            if self._size + size > self.max_bytes:
                size = len(result.__pydantic_serializer__.to_json(result)) + 1
            if self._size + size > self.max_bytes:
                if not self.results:
                    raise TooLarge(
                        f"result {result.id} alone is larger than a reply may be "
                        f"({self.max_bytes} bytes); query with a narrower filter",
                        details={"result_id": result.id},
                    )
                self.more = True
                return False
            self._size += size
        self.results.append(result)
        return True

    def history(self, name: str, names: Sequence[Any]) -> HistoryData:
        """The answer to a history query, with the ``(id, name)`` rows of its sessions."""
        return HistoryData(name=name, results=self.results, session_names=dict(names), truncated=self.more)

    def reply(self, counts: Sequence[Any]) -> ResultsData:
        """The answer, with the summary from the summary statement's ``counts``."""
        return ResultsData(
            results=self.results,
            summary=ResultSummary(
                total=sum(c for _, c, _ in counts),
                outcomes={Outcome(o): c for o, c, _ in counts},
                duration=float(sum(d for _, _, d in counts)),
            ),
            next_cursor=str(self.results[-1].id) if self.more and self.results else None,
        )


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict | list):  # a PostgreSQL JSONB column, already parsed
        return len(json.dumps(value, ensure_ascii=False))
    return 0


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


def session_names(dialect: Dialect, results: Sequence[Result]) -> Statement | None:
    """The statement that names the sessions of history ``results``; None for none."""
    ids = sorted({r.session_id for r in results if r.session_id is not None})
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
        flaky=bool(row[13]),
        attempts=json.loads(row[14]) if row[14] else [],
        file=row[15],
        line=row[16],
    )


def _json_object(value: Any) -> dict[str, Any]:
    """A JSON column: text from SQLite, already parsed from a PostgreSQL JSONB."""
    if not value:
        return {}
    return json.loads(value) if isinstance(value, str) else value


# --- files: artifacts ---------------------------------------------------------------

ADD_ARTIFACT = "INSERT INTO artifacts (task_id, path, size, sha256, created_at) VALUES (?, ?, ?, ?, ?)"
LIST_ARTIFACTS = "SELECT path, size, sha256, created_at FROM artifacts WHERE task_id = ? ORDER BY id"


def artifact_rows(task_id: str, artifacts: Sequence[ArtifactInfo], now: float) -> list[tuple[Any, ...]]:
    return [(task_id, a.path, a.size, a.sha256, now) for a in artifacts]


def stored_artifacts(rows: Sequence[Any]) -> list[ArtifactInfo]:
    return [ArtifactInfo(path=r[0], size=r[1], sha256=r[2], created_at=to_datetime(r[3])) for r in rows]
