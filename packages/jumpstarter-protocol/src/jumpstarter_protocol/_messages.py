"""Every message of the protocol, as pydantic models.

Each model has a ``type`` literal; :data:`Request`, :data:`Reply` and :data:`Message`
are discriminated unions over them, so any transport carries the same bytes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1
"""The version this package speaks. A node and a client agree on one version in the
handshake; :func:`negotiate_version` refuses ranges that do not overlap."""

MIN_PROTOCOL_VERSION = 1
"""The oldest version this package still understands."""

Labels = dict[str, str]
Name = Annotated[str, Field(min_length=1, max_length=512)]
Id = Annotated[str, Field(min_length=1, max_length=128)]
ResultName = Annotated[str, Field(min_length=1)]
"""A result's name has no length limit: a pytest parameter id can be long, and a cut
name would merge two tests into one (the message size limit still applies)."""


def _to_utc(value: datetime) -> datetime:
    # JSON carries UTC offsets in whole minutes only, so an offset like a zone's
    # historical +00:19:32 would silently move the instant on the wire; UTC is exact.
    if value.tzinfo is None:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("datetime is out of range once converted to UTC") from None


MAX_SECONDS = 1e9
"""The longest duration, timeout or wait a message may ask for (some 31 years): any
longer is a mistake, and would overflow the clocks it is added to."""

Seconds = Annotated[float, Field(gt=0, le=MAX_SECONDS)]


def _check_text(value: str, what: str) -> None:
    """Refuse what no process can be given: NUL, or text that is not Unicode (a lone
    surrogate, which is how Python holds a byte like 0xff of a non-UTF-8 argv)."""
    if "\0" in value:
        raise ValueError(f"{what} holds a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid UTF-8 text: {value!r}") from None


Timestamp = Annotated[datetime, AfterValidator(_to_utc)]
"""A point in time; aware datetimes are held (and travel) in UTC."""


class _Model(BaseModel):
    # JSON has no inf or NaN: pydantic would write them as null, and a timeout of inf
    # would arrive as "no timeout", so they are refused when a message is built.
    model_config = ConfigDict(
        extra="forbid", frozen=False, ser_json_bytes="base64", allow_inf_nan=False
    )


# --- values carried by several messages ---------------------------------------------


class TaskState(StrEnum):
    """Where a task is in its life. State only moves forward."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    TIMED_OUT = "timed_out"
    LOST = "lost"

    @property
    def finished(self) -> bool:
        return self not in (TaskState.PENDING, TaskState.RUNNING)


class Outcome(StrEnum):
    """The outcome of one result (one test case, one measurement)."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    ERROR = "error"
    XFAIL = "xfail"
    XPASS = "xpass"


class ErrorCode(StrEnum):
    """Stable codes of the :class:`Error` reply; clients switch on these, not on text."""

    BAD_REQUEST = "bad_request"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    UNAUTHORIZED = "unauthorized"
    VERSION_MISMATCH = "version_mismatch"
    TOO_LARGE = "too_large"
    SPAWN_FAILED = "spawn_failed"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class TerminalSize(_Model):
    """A terminal's size in characters."""

    rows: int = Field(default=24, ge=1, le=10_000)
    cols: int = Field(default=80, ge=1, le=10_000)


class TaskSpec(_Model):
    """What to run. Exactly one of ``argv`` and ``shell`` is given: a shell string is
    never split or guessed at, it is passed to ``/bin/sh -c`` because the user asked."""

    argv: list[str] | None = None
    shell: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout: Seconds | None = None
    grace: float = Field(default=5.0, ge=0, le=3600)
    """Seconds between SIGTERM and SIGKILL when ``timeout`` stops the task."""
    labels: Labels = Field(default_factory=dict)
    name: str | None = None
    stdin: bool = False
    """The task reads an input stream the client writes to (``WriteInput``); without
    it, stdin is ``/dev/null``."""
    pty: TerminalSize | None = None
    """Run the task on a terminal of this size: its stdin, stdout and stderr are the
    terminal (output arrives as one stream, ``stdout``); input as with ``stdin``."""

    @model_validator(mode="after")
    def _one_command(self) -> TaskSpec:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("give exactly one of argv and shell")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")
        for i, arg in enumerate(self.argv or ()):
            _check_text(arg, f"argv[{i}]")
        if self.shell is not None:
            _check_text(self.shell, "shell")
        for key, value in self.env.items():
            if not key or "=" in key:
                raise ValueError(f"env name {key!r} must be non-empty and hold no '='")
            _check_text(key, f"env name {key!r}")
            _check_text(value, f"env {key}")
        for what, text in (("cwd", self.cwd), ("name", self.name)):
            if text is not None:
                _check_text(text, what)
        for key, value in self.labels.items():
            _check_text(key, "label name")
            _check_text(value, f"label {key}")
        return self

    @property
    def command(self) -> list[str]:
        """The argv to execute."""
        return self.argv if self.argv is not None else ["/bin/sh", "-c", self.shell or ""]


class TaskInfo(_Model):
    """A task as the node knows it."""

    id: Id
    node: str
    session_id: str | None = None
    name: str | None = None
    spec: TaskSpec
    state: TaskState
    exit_code: int | None = None
    message: str | None = None
    created_at: Timestamp
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None


class Metric(_Model):
    value: float
    unit: str | None = None


class Attempt(_Model):
    """One run of a test that ran more than once (a rerun, a retry)."""

    outcome: Outcome
    duration: float | None = Field(default=None, ge=0)
    message: str | None = None
    started_at: Timestamp | None = None


class ResultSpec(_Model):
    """One result as a client submits it."""

    name: ResultName
    outcome: Outcome
    duration: float | None = Field(default=None, ge=0)
    message: str | None = None
    metrics: dict[str, Metric] = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    """Every run of the test in order, when it ran more than once; ``outcome`` is the
    final one."""
    flaky: bool = False
    """The attempts disagreed (it failed, then passed): the outcome is not to be trusted."""
    file: str | None = None
    """The source file of the test, as the producer named it."""
    line: int | None = Field(default=None, ge=0, le=2**31 - 1)


class Result(ResultSpec):
    """A stored result: the submitted fields plus what the store adds."""

    id: int
    task_id: Id
    session_id: str | None = None
    node: str | None = None
    created_at: Timestamp


class ResultSummary(_Model):
    """Counts per outcome and total duration over *all* results matching a query,
    not only the page returned."""

    total: int = 0
    outcomes: dict[Outcome, int] = Field(default_factory=dict)
    duration: float = 0.0


class SessionInfo(_Model):
    """A session as the store knows it. ``summary`` covers all its results; it is
    ``None`` where the reply does not compute it."""

    id: Id
    name: str
    client: str | None = None
    created_at: Timestamp
    summary: ResultSummary | None = None


class NodeInfo(_Model):
    name: str
    labels: Labels = Field(default_factory=dict)
    driver: str
    capabilities: list[str] = Field(default_factory=list)
    limits: dict[str, int] = Field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION
    jumpstarter_version: str | None = None
    start_timeout: float = Field(default=0.0, ge=0, le=86400)
    """Seconds a ``StartRequest`` may take on this node before its reply comes, beyond
    what any request takes: a board booting to its shell, an SSH login. A client that
    gives each request a deadline adds this much to a start's."""
    lease_timeout: float = Field(default=0.0, ge=0, le=86400)
    """Seconds a ``ConnectNode`` that gets the lease may take before its reply, beyond
    its own ``wait``: the node's ``before_lease`` hook (its ``hook_timeout``)."""


# --- requests ----------------------------------------------------------------------


class FetchConfig(_Model):
    """Step 1: ask a node to describe itself."""

    type: Literal["fetch_config"] = "fetch_config"


class InitializeConnection(_Model):
    """Step 2: the handshake. The node refuses versions outside its range."""

    type: Literal["initialize_connection"] = "initialize_connection"
    client: str = "jumpstarter"
    session_id: Id
    session_name: Name
    min_version: int = MIN_PROTOCOL_VERSION
    max_version: int = PROTOCOL_VERSION
    token: str | None = Field(default=None, repr=False)


class ConnectNode(_Model):
    """Step 3: the session takes the node (a lease), optionally for a limited time."""

    type: Literal["connect_node"] = "connect_node"
    duration: Seconds | None = None
    wait: float | None = Field(default=None, ge=0, le=MAX_SECONDS)


class StartRequest(_Model):
    """Step 4: start a pending task by id, or create and start one from a spec."""

    type: Literal["start_request"] = "start_request"
    task_id: Id | None = None
    spec: TaskSpec | None = None
    detach: bool = False
    """The task must outlive the client's connection and process. A node served in
    a process of its own keeps its tasks anyway; one served inside the client's
    process (the local node) runs the task under an agent process of its own."""

    @model_validator(mode="after")
    def _one_target(self) -> StartRequest:
        if (self.task_id is None) == (self.spec is None):
            raise ValueError("give exactly one of task_id and spec")
        return self


class StopTask(_Model):
    """Step 5: stop a task: SIGTERM to its process group, SIGKILL after ``grace``."""

    type: Literal["stop_task"] = "stop_task"
    task_id: Id
    grace: float = Field(default=5.0, ge=0, le=3600)


class NewTask(_Model):
    """Step 6: create a task without starting it."""

    type: Literal["new_task"] = "new_task"
    spec: TaskSpec


class AddResult(_Model):
    """Step 7: attach one result, or a batch, to a task. All or nothing."""

    type: Literal["add_result"] = "add_result"
    task_id: Id
    results: list[ResultSpec] = Field(min_length=1)
    batch_id: Id | None = None
    """Chosen by the client, unique per batch. The store keeps it with the results, in
    the same transaction, and answers the batch sent again (its reply was lost) with
    the ids it stored the first time: sent twice, stored once."""


class QueryResults(_Model):
    """Step 8: results matching every given filter, oldest first, paged by cursor."""

    type: Literal["query_results"] = "query_results"
    task_id: Id | None = None
    session: str | None = None
    node: str | None = None
    outcomes: list[Outcome] | None = None
    name: str | None = Field(default=None, description="a glob: * ? [...]")
    since: Timestamp | None = None
    until: Timestamp | None = None
    labels: Labels = Field(default_factory=dict)
    limit: int = Field(default=1000, ge=1, le=100_000)
    cursor: str | None = Field(default=None, max_length=64, description="next_cursor of the page before")


class GetTaskStatus(_Model):
    type: Literal["get_task_status"] = "get_task_status"
    task_id: Id


class WaitTask(_Model):
    """Wait until the task has finished, or ``timeout`` seconds have passed."""

    type: Literal["wait_task"] = "wait_task"
    task_id: Id
    timeout: float | None = Field(default=None, ge=0, le=MAX_SECONDS)


class ListTasks(_Model):
    type: Literal["list_tasks"] = "list_tasks"
    session: str | None = None
    states: list[TaskState] | None = None
    limit: int = Field(default=100, ge=1, le=10_000)


class ReadOutput(_Model):
    """Subscribe to a task's output from byte ``offset``. With ``follow`` the stream
    stays open until the task has finished and all its output was sent."""

    type: Literal["read_output"] = "read_output"
    task_id: Id
    offset: int = Field(default=0, ge=0)
    follow: bool = True


class Ping(_Model):
    type: Literal["ping"] = "ping"


class ReleaseNode(_Model):
    """Give the lease back. Running tasks go on running."""

    type: Literal["release_node"] = "release_node"


class OpenTask(_Model):
    """Record work that runs outside the node (a pytest run, a CI job) as a task in
    state ``running``, so results can be attached to it as they come. The node runs
    nothing, so no lease is needed. The session that opened it finishes it with
    :class:`CloseTask`; a task never closed ends ``lost`` when its node server stops."""

    type: Literal["open_task"] = "open_task"
    spec: TaskSpec


class CloseTask(_Model):
    """Finish a task opened with :class:`OpenTask`: its final state and exit code."""

    type: Literal["close_task"] = "close_task"
    task_id: Id
    state: TaskState
    exit_code: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)
    message: str | None = None

    @model_validator(mode="after")
    def _finished(self) -> CloseTask:
        if not self.state.finished:
            raise ValueError(f"state must be a final state, not {self.state.value}")
        return self


class ListSessions(_Model):
    """Sessions, newest first, each with a summary of its results."""

    type: Literal["list_sessions"] = "list_sessions"
    name: str | None = Field(default=None, description="a session id, or a glob over session names")
    with_results: bool = Field(default=True, description="only sessions that have results")
    limit: int = Field(default=20, ge=1, le=10_000)


class QueryHistory(_Model):
    """The results named exactly ``name``, newest first: one test across sessions."""

    type: Literal["query_history"] = "query_history"
    name: ResultName
    session: str | None = Field(default=None, description="a session id, or a glob over session names")
    limit: int = Field(default=50, ge=1, le=10_000)


# --- files: requests ---------------------------------------------------------------
# A path is the node's: absolute, or relative to the task's working directory
# (``task_id``) or else the node's. A node with a files root refuses any path that
# leaves it.

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Mode = Annotated[int, Field(ge=0, le=0o7777)]
FilePath = Annotated[str, Field(min_length=1, max_length=4096)]


class StatFile(_Model):
    """What is at ``path`` (a ``FileStat`` reply; not found is an error)."""

    type: Literal["stat_file"] = "stat_file"
    path: FilePath
    task_id: Id | None = None


class ListFiles(_Model):
    """The entries of directory ``path``, or the files matching ``pattern`` (a glob
    of ``*``, ``?`` and ``[...]`` per path segment)."""

    type: Literal["list_files"] = "list_files"
    path: FilePath | None = None
    pattern: FilePath | None = None
    task_id: Id | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ListFiles:
        if (self.path is None) == (self.pattern is None):
            raise ValueError("give exactly one of path and pattern")
        return self


class MakeDir(_Model):
    """Create directory ``path`` (and its parents) with ``mode``."""

    type: Literal["make_dir"] = "make_dir"
    path: FilePath
    mode: Mode = 0o755
    task_id: Id | None = None


class OpenUpload(_Model):
    """Before an upload, and again to resume one: the node checks the path, the size
    against its limit, and answers ``UploadReady`` with the offset it already holds
    for ``upload_id`` (0 for a new upload)."""

    type: Literal["open_upload"] = "open_upload"
    path: FilePath
    size: int = Field(ge=0)
    mode: Mode = 0o644
    upload_id: Annotated[str, Field(pattern=r"^[0-9A-Za-z_-]{8,64}$")]
    task_id: Id | None = None


class PutFile(OpenUpload):
    """The first message of an upload stream: ``FileChunk`` messages follow from
    ``offset`` (the ``UploadReady`` offset), then one ``FileEnd``. Nothing is visible
    under ``path`` until the whole file arrived and its sha256 matched."""

    type: Literal["put_file"] = "put_file"  # type: ignore[assignment]
    offset: int = Field(default=0, ge=0)


class GetFile(_Model):
    """Download file ``path`` from byte ``offset``: ``FileChunk`` messages, then one
    ``FileEnd`` with the sha256 of the whole file."""

    type: Literal["get_file"] = "get_file"
    path: FilePath
    offset: int = Field(default=0, ge=0)
    task_id: Id | None = None


class ArtifactInfo(_Model):
    """A file a task left on its node, as the task recorded it."""

    path: str
    size: int = Field(ge=0)
    sha256: Sha256
    created_at: Timestamp | None = None


class AddArtifacts(_Model):
    """Record files fetched after a task as its artifacts."""

    type: Literal["add_artifacts"] = "add_artifacts"
    task_id: Id
    artifacts: list[ArtifactInfo] = Field(min_length=1)


class ListArtifacts(_Model):
    type: Literal["list_artifacts"] = "list_artifacts"
    task_id: Id
# --- input and terminals: requests ----------------------------------------------------


class WriteInput(_Model):
    """Write bytes to a running task's input (a task started with ``stdin`` or ``pty``).

    ``offset`` is where ``data`` starts in the task's whole input. The node skips what
    it already has, so a client that sends a write again after a broken connection
    doubles nothing; a write beyond what the node has (a gap) is refused. ``data``
    travels raw beside the JSON header, as output chunks do. Only the session holding
    the node's lease may write."""

    type: Literal["write_input"] = "write_input"
    task_id: Id
    offset: int = Field(ge=0)
    data: bytes = b""


class CloseInput(_Model):
    """End a task's input (EOF) once the node has ``offset`` bytes of it; closing
    twice is not an error."""

    type: Literal["close_input"] = "close_input"
    task_id: Id
    offset: int = Field(ge=0)


class ResizeTerminal(_Model):
    """Set the size of a task's terminal (a task started with ``pty``); the program
    gets SIGWINCH."""

    type: Literal["resize_terminal"] = "resize_terminal"
    task_id: Id
    size: TerminalSize


# --- output retention: request -------------------------------------------------------


class PruneOutput(_Model):
    """Delete the output of finished tasks: what is older than ``older_than``
    seconds, then the oldest until at most ``max_bytes`` of output are kept. Without
    either, the node's own retention settings apply. Running tasks keep theirs; a
    task's state, exit code and results stay."""

    type: Literal["prune_output"] = "prune_output"
    older_than: float | None = Field(default=None, ge=0)
    max_bytes: int | None = Field(default=None, ge=0)
    dry_run: bool = False
# --- console and power ---------------------------------------------------------------


class ReadConsole(_Model):
    """Read a node's console transcript (everything its board printed) from byte
    ``offset``; ``offset`` None means from its end (what is printed from now on).
    With ``wait``, the node waits up to that many seconds for bytes to come. Needs
    the handshake, not the lease: anyone may watch a console."""

    type: Literal["read_console"] = "read_console"
    offset: int | None = Field(default=None, ge=0)
    wait: float = Field(default=0.0, ge=0, le=30)
    limit: int = Field(default=1024 * 1024, ge=1, le=8 * 1024 * 1024)


class WriteConsole(_Model):
    """Type ``data`` on a node's console. Needs the lease; refused (``conflict``)
    while a task runs there. ``data`` travels raw beside the JSON header."""

    type: Literal["write_console"] = "write_console"
    data: bytes = b""


class PowerAction(StrEnum):
    ON = "on"
    OFF = "off"
    CYCLE = "cycle"
    STATUS = "status"


class Power(_Model):
    """Switch a node's board on, off, cycle it, or ask its state. Needs the lease."""

    type: Literal["power"] = "power"
    action: PowerAction


class ConsoleData(_Model):
    """Transcript bytes from ``offset``; ``end`` is where the transcript ends now, and
    ``busy`` says what runs on the console (a task, a file transfer), which is
    read-only meanwhile. ``data`` travels raw beside the JSON header."""

    type: Literal["console_data"] = "console_data"
    offset: int = Field(ge=0)
    end: int = Field(ge=0)
    busy: str | None = None
    data: bytes = b""


class ConsoleWritten(_Model):
    type: Literal["console_written"] = "console_written"


class PowerState(_Model):
    """The board's power after an action: ``on``, ``off`` or ``unknown``."""

    type: Literal["power_state"] = "power_state"
    state: Literal["on", "off", "unknown"]


# --- replies -----------------------------------------------------------------------


class ConfigData(_Model):
    type: Literal["config_data"] = "config_data"
    node: NodeInfo


class ConnectionInfo(_Model):
    type: Literal["connection_info"] = "connection_info"
    connection_id: Id
    protocol_version: int


class ConnectionEstablished(_Model):
    type: Literal["connection_established"] = "connection_established"
    node: NodeInfo
    lease_id: Id
    expires_at: Timestamp | None = None


class TaskStarted(_Model):
    type: Literal["task_started"] = "task_started"
    task_id: Id
    started_at: Timestamp
    pid: int | None = None


class TaskStopped(_Model):
    type: Literal["task_stopped"] = "task_stopped"
    task: TaskInfo


class TaskCreated(_Model):
    type: Literal["task_created"] = "task_created"
    task: TaskInfo


class ResultAdded(_Model):
    type: Literal["result_added"] = "result_added"
    ids: list[int]


class ResultsData(_Model):
    type: Literal["results_data"] = "results_data"
    results: list[Result]
    summary: ResultSummary
    next_cursor: str | None = None


class TaskStatus(_Model):
    type: Literal["task_status"] = "task_status"
    task: TaskInfo


class TaskList(_Model):
    type: Literal["task_list"] = "task_list"
    tasks: list[TaskInfo]
    truncated: bool = False
    """More tasks matched than fit in one reply: the newest are given; narrow the
    query (session, states, limit) for the rest."""


class OutputChunk(_Model):
    """Bytes of a task's output starting at ``offset`` of its combined output.
    ``data`` travels raw beside the JSON header, never inside it (see the codec)."""

    type: Literal["output_chunk"] = "output_chunk"
    task_id: Id
    offset: int = Field(ge=0)
    stream: Literal["stdout", "stderr"]
    data: bytes = b""


class OutputEnd(_Model):
    """The last message of an output stream: where the output ended and why."""

    type: Literal["output_end"] = "output_end"
    task_id: Id
    offset: int = Field(ge=0)
    state: TaskState
    exit_code: int | None = None


class Pong(_Model):
    type: Literal["pong"] = "pong"


class NodeReleased(_Model):
    type: Literal["node_released"] = "node_released"


class SessionList(_Model):
    type: Literal["session_list"] = "session_list"
    sessions: list[SessionInfo]


class HistoryData(_Model):
    """Results of one name, newest first, with the names of their sessions."""

    type: Literal["history_data"] = "history_data"
    name: str
    results: list[Result]
    session_names: dict[str, str] = Field(default_factory=dict)
    truncated: bool = False
    """Older runs within ``limit`` were left out: all of them would not fit in one
    reply (the message limit)."""


# --- files: replies and stream messages --------------------------------------------


class FileInfo(_Model):
    """One path on the node."""

    path: str
    kind: Literal["file", "dir", "link", "other"]
    size: int = Field(ge=0)
    mode: Mode
    mtime: float


class FileStat(_Model):
    type: Literal["file_stat"] = "file_stat"
    file: FileInfo


class FileList(_Model):
    """Directory entries (or glob matches), sorted by path."""

    type: Literal["file_list"] = "file_list"
    files: list[FileInfo]


class UploadReady(_Model):
    """The node takes the upload to ``path`` (resolved) from byte ``offset``."""

    type: Literal["upload_ready"] = "upload_ready"
    path: str
    offset: int = Field(ge=0)


class FileChunk(_Model):
    """Bytes of a file from ``offset``, either way. ``data`` travels raw beside the
    JSON header, never inside it (see the codec)."""

    type: Literal["file_chunk"] = "file_chunk"
    offset: int = Field(ge=0)
    data: bytes = b""


class FileEnd(_Model):
    """The last message of a file stream: the file's size and sha256 (hex), checked
    by the receiving side against what it got."""

    type: Literal["file_end"] = "file_end"
    size: int = Field(ge=0)
    sha256: Sha256


class FileWritten(_Model):
    """An upload arrived whole and is in place under its final name."""

    type: Literal["file_written"] = "file_written"
    file: FileInfo
    sha256: Sha256


class ArtifactList(_Model):
    type: Literal["artifact_list"] = "artifact_list"
    task_id: Id
    artifacts: list[ArtifactInfo]


# --- input and terminals: replies ------------------------------------------------------


class InputWritten(_Model):
    """How much of the task's input the node has (the offset the next write starts
    at), and whether the input is closed. Answers ``WriteInput`` and ``CloseInput``."""

    type: Literal["input_written"] = "input_written"
    task_id: Id
    offset: int = Field(ge=0)
    closed: bool = False


class TerminalResized(_Model):
    type: Literal["terminal_resized"] = "terminal_resized"
    task_id: Id
    size: TerminalSize


# --- output retention: reply ----------------------------------------------------------


class OutputPruned(_Model):
    """The tasks whose output was deleted (or would be, with ``dry_run``), oldest
    first, and how many bytes that freed."""

    type: Literal["output_pruned"] = "output_pruned"
    task_ids: list[str]
    bytes: int = Field(ge=0)
    dry_run: bool = False


class Error(_Model):
    """The one error reply. ``code`` is stable; ``message`` is for a person."""

    type: Literal["error"] = "error"
    code: ErrorCode
    message: str
    details: dict[str, object] = Field(default_factory=dict)


Request = Annotated[
    Union[
        FetchConfig,
        InitializeConnection,
        ConnectNode,
        StartRequest,
        StopTask,
        NewTask,
        AddResult,
        QueryResults,
        GetTaskStatus,
        WaitTask,
        ListTasks,
        ReadOutput,
        Ping,
        ReleaseNode,
        OpenTask,
        CloseTask,
        ListSessions,
        QueryHistory,
        # files (FileChunk and FileEnd also end a download, node to client)
        StatFile,
        ListFiles,
        MakeDir,
        OpenUpload,
        PutFile,
        FileChunk,
        FileEnd,
        GetFile,
        AddArtifacts,
        ListArtifacts,
        WriteInput,
        CloseInput,
        ResizeTerminal,
        PruneOutput,
        ReadConsole,
        WriteConsole,
        Power,
    ],
    Field(discriminator="type"),
]
"""Every message a client sends."""

Reply = Annotated[
    Union[
        ConfigData,
        ConnectionInfo,
        ConnectionEstablished,
        TaskStarted,
        TaskStopped,
        TaskCreated,
        ResultAdded,
        ResultsData,
        TaskStatus,
        TaskList,
        OutputChunk,
        OutputEnd,
        Pong,
        NodeReleased,
        SessionList,
        HistoryData,
        # files
        FileStat,
        FileList,
        UploadReady,
        FileWritten,
        ArtifactList,
        InputWritten,
        TerminalResized,
        OutputPruned,
        ConsoleData,
        ConsoleWritten,
        PowerState,
        Error,
    ],
    Field(discriminator="type"),
]
"""Every message a node sends back."""

REQUEST_TYPES: tuple[type[BaseModel], ...] = Request.__origin__.__args__  # type: ignore[attr-defined]
REPLY_TYPES: tuple[type[BaseModel], ...] = Reply.__origin__.__args__  # type: ignore[attr-defined]

Message = Annotated[Union[REQUEST_TYPES + REPLY_TYPES], Field(discriminator="type")]  # type: ignore[valid-type]
"""Any message at all."""
