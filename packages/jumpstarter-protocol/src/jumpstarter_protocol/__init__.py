"""Jumpstarter's wire protocol: every message, the codec, the version and the schema.

Depends on pydantic only; knows nothing of the core or of any transport."""

from ._codec import MAX_MESSAGE_SIZE, decode, encode
from ._errors import JumpstarterError, ProtocolError
from ._messages import (
    Attempt,
    MAX_SECONDS,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    REPLY_TYPES,
    REQUEST_TYPES,
    AddResult,
    CloseTask,
    ConfigData,
    ConnectionEstablished,
    ConnectionInfo,
    ConnectNode,
    ConsoleData,
    ConsoleWritten,
    Error,
    ErrorCode,
    FetchConfig,
    GetTaskStatus,
    HistoryData,
    InitializeConnection,
    ListSessions,
    ListTasks,
    Message,
    Metric,
    NewTask,
    NodeInfo,
    NodeReleased,
    OpenTask,
    Outcome,
    OutputChunk,
    OutputEnd,
    Ping,
    Pong,
    Power,
    PowerAction,
    PowerState,
    QueryHistory,
    QueryResults,
    ReadConsole,
    ReadOutput,
    ReleaseNode,
    Reply,
    Request,
    Result,
    ResultAdded,
    ResultsData,
    ResultSpec,
    ResultSummary,
    SessionInfo,
    SessionList,
    StartRequest,
    StopTask,
    TaskCreated,
    TaskInfo,
    TaskList,
    TaskSpec,
    TaskStarted,
    TaskState,
    TaskStatus,
    TaskStopped,
    TerminalSize,
    WaitTask,
    # files
    AddArtifacts,
    ArtifactInfo,
    ArtifactList,
    FileChunk,
    FileEnd,
    FileInfo,
    FileList,
    FileStat,
    FileWritten,
    GetFile,
    ListArtifacts,
    ListFiles,
    MakeDir,
    OpenUpload,
    PutFile,
    StatFile,
    UploadReady,
    WriteInput,
    CloseInput,
    ResizeTerminal,
    InputWritten,
    TerminalResized,
    PruneOutput,
    OutputPruned,
    WriteConsole,
)
from ._schema import json_schema


def negotiate_version(min_version: int, max_version: int) -> int:
    """The highest version both sides speak. Raises :class:`ProtocolError` with code
    ``version_mismatch`` when the ranges do not overlap."""
    best = min(max_version, PROTOCOL_VERSION)
    if best < max(min_version, MIN_PROTOCOL_VERSION):
        raise ProtocolError(
            f"protocol version mismatch: the client speaks {min_version}..{max_version}, "
            f"this side {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}",
            code="version_mismatch",
        )
    return best


__all__ = [name for name in dir() if not name.startswith("_")]
