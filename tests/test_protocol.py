"""The wire protocol: every message survives the codec, malformed bytes only ever raise
ProtocolError, output travels raw, versions negotiate, the schema covers everything."""

from __future__ import annotations

import enum
import json
import re
import struct
import types
import typing
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Literal

import annotated_types
import jumpstarter_protocol
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jumpstarter_protocol import (
    MAX_MESSAGE_SIZE,
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
    Error,
    ErrorCode,
    FetchConfig,
    GetTaskStatus,
    HistoryData,
    InitializeConnection,
    JumpstarterError,
    ListSessions,
    ListTasks,
    Metric,
    NewTask,
    NodeInfo,
    NodeReleased,
    OpenTask,
    OutputChunk,
    Power,
    PowerState,
    ReadConsole,
    WriteConsole,
    ConsoleData,
    ConsoleWritten,
    OutputEnd,
    Ping,
    Pong,
    ProtocolError,
    QueryHistory,
    QueryResults,
    ReadOutput,
    ReleaseNode,
    Result,
    ResultAdded,
    ResultsData,
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
    WaitTask,
    decode,
    encode,
    json_schema,
    # --- input and terminals
    CloseInput,
    InputWritten,
    ResizeTerminal,
    TerminalResized,
    WriteInput,
    # --- output retention
    OutputPruned,
    PruneOutput,
    negotiate_version,
    # files
    AddArtifacts,
    ArtifactInfo,
    ArtifactList,
    FileChunk,
    FileEnd,
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
)
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

MESSAGE_TYPES: tuple[type[BaseModel], ...] = REQUEST_TYPES + REPLY_TYPES
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def tag(cls: type[BaseModel]) -> str:
    """The ``type`` literal of a message class."""
    (value,) = typing.get_args(cls.model_fields["type"].annotation)
    return value


def frame(header: bytes | str, payload: bytes = b"") -> bytes:
    """A frame around any header bytes, valid JSON or not."""
    if isinstance(header, str):
        header = header.encode()
    return struct.pack(">I", len(header)) + header + payload


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A frame's header, parsed, and its payload."""
    (size,) = struct.unpack_from(">I", data)
    return json.loads(data[4 : 4 + size]), data[4 + size :]


def exactly(text: str) -> str:
    """A ``match=`` pattern for the whole message and nothing else."""
    return f"^{re.escape(text)}$"


# --- strategies derived from the models ------------------------------------------------
#
# Every field's strategy is derived from its annotation and constraints, so a new field
# is covered without touching this file; a field of a kind this code does not know fails
# loudly (TypeError) instead of being skipped. Models whose validators tie fields
# together get a hand-written strategy in MODEL_OVERRIDES.

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=8,
)

_DAY = timedelta(hours=23, minutes=59, seconds=59)
fixed_offsets = st.builds(timezone, st.timedeltas(min_value=-_DAY, max_value=_DAY))
# Aware datetimes in named zones (historical ones have offsets in seconds) and fixed
# offsets, plus naive ones; a year of margin keeps UTC conversion in range.
datetimes = st.datetimes(
    min_value=datetime(2, 1, 1),
    max_value=datetime(9998, 12, 31),
    timezones=st.timezones() | fixed_offsets | st.just(UTC) | st.none(),
)


def _constraints(metadata: list[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in metadata:
        if isinstance(item, FieldInfo):
            found.update(_constraints(item.metadata))
        elif isinstance(item, annotated_types.MinLen):
            found["min_size"] = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            found["max_size"] = item.max_length
        elif isinstance(item, annotated_types.Gt):
            found["gt"] = item.gt
        elif isinstance(item, annotated_types.Ge):
            found["ge"] = item.ge
        elif isinstance(item, annotated_types.Lt):
            found["lt"] = item.lt
        elif isinstance(item, annotated_types.Le):
            found["le"] = item.le
        # validators (the UTC normaliser) change values, not what is valid
    return found


def for_annotation(tp: Any, constraints: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """A strategy for every valid value of the annotation ``tp``."""
    c = dict(constraints or {})
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Annotated:
        return for_annotation(args[0], {**c, **_constraints(list(args[1:]))})
    if tp is type(None):
        return st.none()
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(for_annotation(arg, c) for arg in args))
    if origin is Literal:
        return st.sampled_from(args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return st.deferred(lambda: models_of(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        low = c.get("ge", c["gt"] + 1 if "gt" in c else None)
        high = c.get("le", c["lt"] - 1 if "lt" in c else None)
        return st.integers(min_value=low, max_value=high)
    if tp is float:
        return st.floats(
            min_value=c.get("ge", c.get("gt")),
            max_value=c.get("le", c.get("lt")),
            exclude_min="gt" in c,
            exclude_max="lt" in c,
            allow_nan=False,
            allow_infinity=False,
        )
    if tp is str:
        return st.text(min_size=c.get("min_size", 0), max_size=min(c.get("max_size", 40), 40))
    if tp is bytes:
        return st.binary(max_size=256)
    if tp is datetime:
        return datetimes
    if tp is object:
        return json_values
    if origin is list:
        (item,) = args
        return st.lists(for_annotation(item), min_size=c.get("min_size", 0), max_size=3)
    if origin is dict:
        key, value = args
        return st.dictionaries(for_annotation(key), for_annotation(value), max_size=3)
    raise TypeError(f"no strategy for {tp!r}: teach for_annotation() about it")


def derived(model: type[BaseModel], **fixed: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Instances of ``model`` from its fields; fields with a default are sometimes left
    out, so defaults travel too. ``fixed`` gives the strategy of named fields, which
    are then always passed."""
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in model.model_fields.items():
        if name in fixed:
            required[name] = fixed[name]
        else:
            strategy = for_annotation(field.annotation, _constraints(field.metadata))
            (required if field.is_required() else optional)[name] = strategy
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: model(**kw))


# What a process can be given: no NUL, no lone surrogate, no '=' in an env name.
process_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=40)
_spec_text = {
    "env": st.dictionaries(process_text.filter(lambda k: k and "=" not in k), process_text, max_size=3),
    "labels": st.dictionaries(process_text, process_text, max_size=3),
    "cwd": st.none() | process_text,
    "name": st.none() | process_text,
}
task_specs = st.one_of(
    derived(TaskSpec, argv=st.lists(process_text, min_size=1, max_size=4), shell=st.none(), **_spec_text),
    derived(TaskSpec, argv=st.none(), shell=process_text, **_spec_text),
)
start_requests = st.one_of(
    derived(StartRequest, task_id=st.text(min_size=1, max_size=40), spec=st.none()),
    derived(StartRequest, task_id=st.none(), spec=task_specs),
)
# --- files: fields with a pattern get strategies of their own
sha256s = st.from_regex(r"[0-9a-f]{64}", fullmatch=True)
upload_ids = st.from_regex(r"[0-9A-Za-z_-]{8,64}", fullmatch=True)
artifacts = derived(ArtifactInfo, sha256=sha256s)
MODEL_OVERRIDES: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    TaskSpec: task_specs,
    StartRequest: start_requests,
    ArtifactInfo: artifacts,
}


def models_of(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    return MODEL_OVERRIDES[model] if model in MODEL_OVERRIDES else derived(model)


# One entry per message type, written out: a type added to the unions fails
# test_every_message_type_has_a_strategy until it is listed here.
MESSAGE_STRATEGIES: dict[type[BaseModel], st.SearchStrategy[Any]] = {
    # requests
    FetchConfig: derived(FetchConfig),
    InitializeConnection: derived(InitializeConnection),
    ConnectNode: derived(ConnectNode),
    StartRequest: start_requests,
    StopTask: derived(StopTask),
    NewTask: derived(NewTask),
    AddResult: derived(AddResult),
    QueryResults: derived(QueryResults),
    GetTaskStatus: derived(GetTaskStatus),
    WaitTask: derived(WaitTask),
    ListTasks: derived(ListTasks),
    ReadOutput: derived(ReadOutput),
    Ping: derived(Ping),
    ReleaseNode: derived(ReleaseNode),
    OpenTask: derived(OpenTask),
    CloseTask: derived(CloseTask, state=st.sampled_from([s for s in TaskState if s.finished])),
    ListSessions: derived(ListSessions),
    QueryHistory: derived(QueryHistory),
    # files
    StatFile: derived(StatFile),
    ListFiles: st.one_of(
        derived(ListFiles, path=st.text(min_size=1, max_size=40), pattern=st.none()),
        derived(ListFiles, path=st.none(), pattern=st.text(min_size=1, max_size=40)),
    ),
    MakeDir: derived(MakeDir),
    OpenUpload: derived(OpenUpload, upload_id=upload_ids),
    PutFile: derived(PutFile, upload_id=upload_ids),
    FileChunk: derived(FileChunk),
    FileEnd: derived(FileEnd, sha256=sha256s),
    GetFile: derived(GetFile),
    AddArtifacts: derived(AddArtifacts),
    ListArtifacts: derived(ListArtifacts),
    # console and power
    ReadConsole: derived(ReadConsole),
    WriteConsole: derived(WriteConsole),
    Power: derived(Power),
    # replies
    ConfigData: derived(ConfigData),
    ConnectionInfo: derived(ConnectionInfo),
    ConnectionEstablished: derived(ConnectionEstablished),
    TaskStarted: derived(TaskStarted),
    TaskStopped: derived(TaskStopped),
    TaskCreated: derived(TaskCreated),
    ResultAdded: derived(ResultAdded),
    ResultsData: derived(ResultsData),
    TaskStatus: derived(TaskStatus),
    TaskList: derived(TaskList),
    OutputChunk: derived(OutputChunk),
    OutputEnd: derived(OutputEnd),
    Pong: derived(Pong),
    NodeReleased: derived(NodeReleased),
    SessionList: derived(SessionList),
    HistoryData: derived(HistoryData),
    # files
    FileStat: derived(FileStat),
    FileList: derived(FileList),
    UploadReady: derived(UploadReady),
    FileWritten: derived(FileWritten, sha256=sha256s),
    ArtifactList: derived(ArtifactList),
    # console and power
    ConsoleData: derived(ConsoleData),
    ConsoleWritten: derived(ConsoleWritten),
    PowerState: derived(PowerState),
    Error: derived(Error),
    # --- input and terminals
    WriteInput: derived(WriteInput),
    CloseInput: derived(CloseInput),
    ResizeTerminal: derived(ResizeTerminal),
    InputWritten: derived(InputWritten),
    TerminalResized: derived(TerminalResized),
    # --- output retention
    PruneOutput: derived(PruneOutput),
    OutputPruned: derived(OutputPruned),
}
any_message = st.one_of(*MESSAGE_STRATEGIES.values())
by_name = pytest.mark.parametrize("cls", list(MESSAGE_STRATEGIES), ids=lambda cls: cls.__name__)


# --- the set of messages ---------------------------------------------------------------


def test_every_message_type_has_a_strategy() -> None:
    # 35, + 15 for files, + 5 for input and terminals, + 2 for output retention, + 6 for console and power
    assert len(MESSAGE_TYPES) == len(set(MESSAGE_TYPES)) == 35 + 15 + 5 + 2 + 6
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES)


def test_type_literals_are_unique_and_requests_are_not_replies() -> None:
    assert not set(REQUEST_TYPES) & set(REPLY_TYPES)
    tags = [tag(cls) for cls in MESSAGE_TYPES]
    assert len(tags) == len(set(tags))
    for cls in MESSAGE_TYPES:
        assert cls.model_fields["type"].default == tag(cls)


# --- 1. round trips --------------------------------------------------------------------


@by_name
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip(cls: type[BaseModel], data: st.DataObject) -> None:
    message = data.draw(MESSAGE_STRATEGIES[cls], label=cls.__name__)
    assert type(message) is cls
    encoded = encode(message)
    decoded = decode(encoded)
    assert type(decoded) is cls
    assert decoded == message
    assert encode(decoded) == encoded  # one message, one byte string
    header, _ = split(encoded)
    assert header["type"] == tag(cls)


def test_round_trip_covers_nested_values_and_timezones() -> None:
    """A hand-made worst case next to the generated ones: every nested model, a zone
    whose historical offset has seconds, non-ASCII text, empty and binary payloads."""
    from zoneinfo import ZoneInfo

    lmt = datetime(1900, 1, 1, 12, 0, 0, 1, tzinfo=ZoneInfo("Europe/Amsterdam"))  # +00:19:32
    spec = TaskSpec(argv=["pytest", "-k", "ünïcødé ✓"], env={"A": "b"}, timeout=1.5)
    task = TaskInfo(id="t1", node="n", spec=spec, state="running", created_at=lmt)
    result = Result(
        id=1, task_id="t1", name="suite/case", outcome="xpass", created_at=lmt,
        metrics={"boot": Metric(value=1.25, unit="s")}, started_at=lmt, finished_at=lmt,
    )
    node = NodeInfo(name="n", driver="local", limits={"tasks": 4})
    for message in (
        TaskCreated(task=task),
        ResultsData(results=[result], summary={"total": 1, "outcomes": {"xpass": 1}}),
        ConnectionEstablished(node=node, lease_id="l", expires_at=lmt),
        OutputChunk(task_id="t1", offset=0, stream="stderr", data=bytes(range(256))),
        OutputChunk(task_id="t1", offset=7, stream="stdout"),
    ):
        assert decode(encode(message)) == message
    assert decode(encode(TaskStarted(task_id="t", started_at=lmt))).started_at == lmt


def test_a_node_says_how_long_a_start_may_take_there() -> None:
    """``start_timeout``, ``lease_timeout``: what a client with a deadline per call
    adds for a start, a lease."""
    assert NodeInfo(name="n", driver="local").start_timeout == 0
    node = NodeInfo(name="n", driver="serial", start_timeout=120, lease_timeout=300)
    back = decode(encode(ConfigData(node=node))).node
    assert (back.start_timeout, back.lease_timeout) == (120, 300)
    for field in ("start_timeout", "lease_timeout"):
        assert json_schema()["$defs"]["NodeInfo"]["properties"][field]["minimum"] == 0
        for bad in (-1, float("inf")):
            with pytest.raises(ValidationError):
                NodeInfo(name="n", driver="serial", **{field: bad})


def test_decode_accepts_any_bytes_like() -> None:
    encoded = encode(OutputChunk(task_id="t", offset=0, stream="stdout", data=b"abc"))
    for data in (encoded, bytearray(encoded), memoryview(encoded)):
        assert decode(data) == OutputChunk(task_id="t", offset=0, stream="stdout", data=b"abc")


# --- 2. malformed input: ProtocolError and nothing else --------------------------------


def rejects_or_decodes(data: bytes, **kwargs: Any) -> Any:
    """Decode ``data``; only ProtocolError may escape, and a success is a message."""
    try:
        message = decode(data, **kwargs)
    except ProtocolError as exc:
        assert exc.code in set(ErrorCode)
        assert "\n" not in str(exc) and str(exc)
        return None
    assert type(message) in MESSAGE_TYPES
    return message


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message)
def test_every_prefix_of_a_frame_is_refused(message: BaseModel) -> None:
    encoded = encode(message)
    (size,) = struct.unpack_from(">I", encoded)
    end = 4 + size
    for cut in range(end):
        with pytest.raises(ProtocolError, match="^truncated message: "):
            decode(encoded[:cut])
    if isinstance(message, OutputChunk | FileChunk | WriteInput | ConsoleData | WriteConsole):
        # The frame has no payload length: a transport must keep frames whole. A cut
        # inside the payload is indistinguishable from a shorter chunk.
        for cut in range(end, len(encoded)):
            assert decode(encoded[:cut]).data == message.data[: cut - end]
    else:
        assert len(encoded) == end


@FAST
@given(st.binary(max_size=64))
def test_random_bytes(data: bytes) -> None:
    rejects_or_decodes(data)


@FAST
@given(st.binary(max_size=64), st.binary(max_size=16))
def test_random_header_bytes(header: bytes, payload: bytes) -> None:
    rejects_or_decodes(frame(header, payload))


@FAST
@given(json_values)
def test_json_that_is_not_a_message(value: Any) -> None:
    rejects_or_decodes(frame(json.dumps(value)))


@FAST
@given(
    st.sampled_from([tag(cls) for cls in MESSAGE_TYPES]),
    st.dictionaries(
        st.sampled_from(sorted({name for cls in MESSAGE_TYPES for name in cls.model_fields}))
        | st.text(max_size=5),
        json_values,
        max_size=4,
    ),
    st.binary(max_size=8),
)
def test_random_fields_under_a_known_type(type_: str, fields: dict[str, Any], payload: bytes):
    rejects_or_decodes(frame(json.dumps({"type": type_, **fields}), payload))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message, st.data())
def test_mutated_messages(message: BaseModel, data: st.DataObject) -> None:
    """A valid header with one field replaced by any JSON value, deleted, or joined by
    an unknown one."""
    header, payload = split(encode(message))
    names = sorted(header)
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        header[data.draw(st.sampled_from(names))] = data.draw(json_values)
    elif action == "delete":
        del header[data.draw(st.sampled_from(names))]
    else:
        name = data.draw(st.text(min_size=1).filter(lambda k: k not in header))
        header[name] = data.draw(json_values)
    decoded = rejects_or_decodes(frame(json.dumps(header), payload))
    if action == "add":
        assert decoded is None  # extra fields are never accepted


DEEP = 100_000
MALFORMED: dict[str, tuple[bytes, str]] = {
    "empty input": (b"", "^truncated message: 0 bytes"),
    "short length prefix": (b"\x00\x00\x01", "^truncated message: 3 bytes"),
    "length beyond the data": (
        b"\xff\xff\xff\xff{}",
        "^truncated message: the header is 4294967295 bytes",
    ),
    "empty header": (frame(b""), "^invalid message: Invalid JSON"),
    "not JSON": (frame(b"hello, node"), "^invalid message: Invalid JSON"),
    "not UTF-8": (frame(b'{"type": "\xff\xfe"}'), "^invalid message: Invalid JSON"),
    "lone surrogate escape": (frame('{"type": "ping", "x": "\\ud800"}'), "^invalid"),
    "trailing garbage": (frame('{"type": "ping"} {}'), "^invalid message: Invalid JSON"),
    "JSON array": (frame("[1, 2]"), "^invalid message: "),
    "JSON string": (frame('"ping"'), "^invalid message: "),
    "JSON null": (frame("null"), "^invalid message: "),
    "JSON number": (frame("4"), "^invalid message: "),
    "no type": (frame('{"task_id": "t"}'), exactly("invalid message: it has no 'type'")),
    "unknown type": (frame('{"type": "reboot"}'), exactly("unknown message type 'reboot'")),
    "type not a string": (frame('{"type": ["ping"]}'), "^(unknown message type|invalid message)"),
    "wrong-typed field": (
        frame('{"type": "stop_task", "task_id": "t", "grace": "soon"}'),
        "^invalid stop_task message: grace: ",
    ),
    "out-of-range field": (
        frame('{"type": "stop_task", "task_id": "t", "grace": -1}'),
        "^invalid stop_task message: grace: ",
    ),
    "missing required field": (
        frame('{"type": "stop_task"}'),
        exactly("invalid stop_task message: task_id: Field required"),
    ),
    "extra field": (
        frame('{"type": "ping", "reply_to": 1}'),
        exactly("invalid ping message: reply_to: Extra inputs are not permitted"),
    ),
    "extra field in a nested model": (
        frame('{"type": "new_task", "spec": {"argv": ["x"], "sudo": true}}'),
        exactly("invalid new_task message: spec.sudo: Extra inputs are not permitted"),
    ),
    "both argv and shell": (
        frame('{"type": "new_task", "spec": {"argv": ["x"], "shell": "x"}}'),
        "^invalid new_task message: spec: .*give exactly one of argv and shell$",
    ),
    "neither task_id nor spec": (
        frame('{"type": "start_request"}'),
        "^invalid start_request message: .*give exactly one of task_id and spec$",
    ),
    "Infinity": (frame('{"type": "connect_node", "duration": Infinity}'), "^invalid"),
    "NaN": (frame('{"type": "connect_node", "duration": NaN}'), "^invalid"),
    "a float too large for a double": (
        frame('{"type": "connect_node", "duration": 1e400}'),
        "^invalid connect_node message: duration: ",
    ),
    "payload on a message without one": (
        frame('{"type": "ping"}', b"\x00\x01"),
        exactly(
            "invalid ping message: 2 bytes follow the header, but it carries no binary payload"
        ),
    ),
    "payload inside the output_chunk header": (
        frame(
            '{"type": "output_chunk", "task_id": "t", "offset": 0, "stream": "stdout", '
            '"data": "aGk="}'
        ),
        exactly("invalid output_chunk message: data must follow the header raw, not be inside it"),
    ),
    "deep arrays in a free-form field": (
        frame(
            '{"type": "error", "code": "internal", "message": "m", "details": {"x": '
            + "[" * DEEP
            + "]" * DEEP
            + "}}"
        ),
        "^invalid message: Invalid JSON: recursion limit exceeded",
    ),
    "deep arrays in a string field": (
        frame('{"type": "get_task_status", "task_id": ' + "[" * DEEP + "]" * DEEP + "}"),
        "^invalid message: Invalid JSON: recursion limit exceeded",
    ),
    "deep arrays, unclosed": (frame("[" * DEEP), "^invalid message: Invalid JSON"),
    "deep objects": (frame('{"a": ' * DEEP + "1" + "}" * DEEP), "^invalid message: Invalid JSON"),
}


@pytest.mark.parametrize(("data", "pattern"), list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed(data: bytes, pattern: str) -> None:
    with pytest.raises(ProtocolError, match=pattern) as caught:
        decode(data)
    assert caught.value.code == "bad_request"
    assert isinstance(caught.value, JumpstarterError)
    assert "\n" not in str(caught.value)
    assert len(str(caught.value)) < 300


# --- 3. the messages a user reads ------------------------------------------------------


def test_truncated_messages_say_how_much_is_missing() -> None:
    short = "truncated message: 2 bytes, shorter than the 4-byte header length"
    with pytest.raises(ProtocolError, match=exactly(short)):
        decode(b"\x00\x00")
    encoded = encode(Ping())
    cut = "truncated message: the header is 15 bytes but only 14 follow"
    with pytest.raises(ProtocolError, match=exactly(cut)):
        decode(encoded[:-1])


def test_unknown_type_is_named_on_one_line() -> None:
    with pytest.raises(ProtocolError, match=exactly("unknown message type 'reboot'")):
        decode(frame('{"type": "reboot", "now": true}'))
    # a type chosen to break a log line is shown escaped, and a long one cut short
    with pytest.raises(ProtocolError, match=exactly(r"unknown message type 'a\nb'")):
        decode(frame('{"type": "a\\nb"}'))
    with pytest.raises(ProtocolError) as caught:
        decode(frame(json.dumps({"type": "x" * 10_000})))
    assert str(caught.value).startswith("unknown message type 'xxx")
    assert len(str(caught.value)) < 120


def test_field_errors_name_the_message_and_the_field() -> None:
    bad_result = {"name": "n", "outcome": "great", "duration": -1}
    pattern = r"^invalid add_result message: results\.0\.outcome: .* \(and 1 more\)$"
    with pytest.raises(ProtocolError, match=pattern):
        decode(frame(json.dumps({"type": "add_result", "task_id": "t", "results": [bad_result]})))
    extra = r"invalid ping message: a\nb: Extra inputs are not permitted"
    with pytest.raises(ProtocolError, match=exactly(extra)):
        decode(frame('{"type": "ping", "a\\nb": 1}'))


# --- size limit ------------------------------------------------------------------------


def test_too_large_on_encode() -> None:
    chunk = OutputChunk(task_id="t", offset=0, stream="stdout", data=b"x" * 100)
    size = len(encode(chunk))
    assert encode(chunk, max_size=size) == encode(chunk)
    too_large = f"message of {size} bytes exceeds the limit of 64 bytes"
    with pytest.raises(ProtocolError, match=exactly(too_large)) as caught:
        encode(chunk, max_size=64)
    assert caught.value.code == "too_large"
    with pytest.raises(ProtocolError) as caught:
        encode(Error(code="internal", message="m" * 100), max_size=64)
    assert caught.value.code == "too_large"


def test_too_large_on_decode() -> None:
    encoded = encode(OutputChunk(task_id="t", offset=0, stream="stdout", data=b"x" * 100))
    assert decode(encoded, max_size=len(encoded)).data == b"x" * 100
    too_large = f"message of {len(encoded)} bytes exceeds the limit of 64 bytes"
    with pytest.raises(ProtocolError, match=exactly(too_large)) as caught:
        decode(encoded, max_size=64)
    assert caught.value.code == "too_large"
    # the limit is checked first, before anything is parsed
    with pytest.raises(ProtocolError) as caught:
        decode(b"\xff" * 65, max_size=64)
    assert caught.value.code == "too_large"


def test_default_limit() -> None:
    assert MAX_MESSAGE_SIZE == 16 * 1024 * 1024
    with pytest.raises(ProtocolError) as caught:
        encode(OutputChunk(task_id="t", offset=0, stream="stdout", data=bytes(MAX_MESSAGE_SIZE)))
    assert caught.value.code == "too_large"


@FAST
@given(any_message, st.integers(min_value=0, max_value=400))
def test_any_limit_either_fits_or_is_too_large(message: BaseModel, limit: int) -> None:
    full = encode(message)
    try:
        encoded = encode(message, max_size=limit)
    except ProtocolError as exc:
        assert exc.code == "too_large" and len(full) > limit
    else:
        assert encoded == full and len(full) <= limit
    rejects_or_decodes(full, max_size=limit)


# --- values that JSON cannot carry -----------------------------------------------------


def test_values_that_cannot_be_encoded_raise_protocol_error() -> None:
    # os.fsdecode() of a non-UTF-8 file name gives lone surrogates
    surrogates = "^cannot encode error message: .*surrogates not allowed"
    with pytest.raises(ProtocolError, match=surrogates):
        encode(Error(code="internal", message="caf\udce9.txt"))
    # A task spec refuses one as it is built: no process could be given it.
    with pytest.raises(ValidationError, match=r"argv\[1\] is not valid UTF-8 text: 'caf\\udce9.txt'"):
        TaskSpec(argv=["cat", "caf\udce9.txt"])
    with pytest.raises(ProtocolError, match="^cannot encode error message: "):
        encode(Error(code="internal", message="m", details={"obj": object()}))
    deep: list[Any] = []
    inner = deep
    for _ in range(DEEP):
        inner.append([])
        inner = inner[0]
    with pytest.raises(ProtocolError, match="^cannot encode error message: "):
        encode(Error(code="internal", message="m", details={"deep": deep}))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_floats_are_refused_when_built(value: float) -> None:
    """JSON has no inf or NaN; pydantic would write null and a timeout of inf would
    arrive as "no timeout". So such a message cannot be built at all."""
    with pytest.raises(ValidationError, match="finite number"):
        ConnectNode(duration=value)
    with pytest.raises(ValidationError, match="finite number"):
        Metric(value=value)


def test_timestamps_travel_in_utc() -> None:
    local = datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    started = TaskStarted(task_id="t", started_at=local)
    assert started.started_at == local and started.started_at.utcoffset() == timedelta(0)
    header, _ = split(encode(started))
    assert header["started_at"] == "2024-05-01T12:30:00Z"
    with pytest.raises(ValidationError, match="out of range"):
        TaskStarted(task_id="t", started_at=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))))
    early = "0001-01-01T00:00:00+01:00"
    with pytest.raises(ProtocolError, match="^invalid task_started message: started_at: "):
        decode(frame(json.dumps({"type": "task_started", "task_id": "t", "started_at": early})))


# --- 4. output travels raw -------------------------------------------------------------


def test_input_data_travels_raw_beside_the_header() -> None:
    data = bytes(range(256)) * 4
    frame = encode(WriteInput(task_id="t", offset=5, data=data))
    assert frame.endswith(data) and b'"data"' not in frame
    assert decode(frame) == WriteInput(task_id="t", offset=5, data=data)
    header = b'{"type":"write_input","task_id":"t","offset":0,"data":"aGk="}'
    with pytest.raises(ProtocolError, match="^invalid write_input message: data must follow the header raw"):
        decode(struct.pack(">I", len(header)) + header)


def test_output_chunk_data_travels_raw() -> None:
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value, not valid UTF-8
    chunk = OutputChunk(task_id="t" * 128, offset=2**40, stream="stderr", data=data)
    encoded = encode(chunk)
    assert len(encoded) < len(data) + 512  # base64 would add a third
    header, payload = split(encoded)
    assert "data" not in header
    assert header == {
        "type": "output_chunk",
        "task_id": "t" * 128,
        "offset": 2**40,
        "stream": "stderr",
    }
    assert payload == data
    assert decode(encoded) == chunk


# --- 5. versions -----------------------------------------------------------------------


def test_negotiate_version_with_this_package() -> None:
    assert MIN_PROTOCOL_VERSION <= PROTOCOL_VERSION
    hello = InitializeConnection(session_id="s", session_name="nightly")
    assert negotiate_version(hello.min_version, hello.max_version) == PROTOCOL_VERSION
    assert negotiate_version(0, PROTOCOL_VERSION + 10) == PROTOCOL_VERSION
    assert negotiate_version(MIN_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION) == MIN_PROTOCOL_VERSION
    newer = (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 5)
    message = (
        f"protocol version mismatch: the client speaks {newer[0]}..{newer[1]}, "
        f"this side {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}"
    )
    with pytest.raises(ProtocolError, match=exactly(message)) as caught:
        negotiate_version(*newer)
    assert caught.value.code == "version_mismatch"
    assert ErrorCode(caught.value.code) is ErrorCode.VERSION_MISMATCH


@settings(max_examples=200, deadline=None)
@given(
    ours=st.tuples(st.integers(1, 12), st.integers(0, 6)),
    theirs=st.tuples(st.integers(0, 20), st.integers(-2, 8)),
)
def test_negotiate_version_picks_the_highest_common(
    ours: tuple[int, int], theirs: tuple[int, int]
) -> None:
    low, high = ours[0], ours[0] + ours[1]
    their_low, their_high = theirs[0], theirs[0] + theirs[1]  # sometimes an empty range
    common = set(range(low, high + 1)) & set(range(their_low, their_high + 1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jumpstarter_protocol, "MIN_PROTOCOL_VERSION", low)
        mp.setattr(jumpstarter_protocol, "PROTOCOL_VERSION", high)
        if common:
            assert negotiate_version(their_low, their_high) == max(common)
        else:
            with pytest.raises(ProtocolError) as caught:
                negotiate_version(their_low, their_high)
            assert caught.value.code == "version_mismatch"
            assert f"{their_low}..{their_high}" in str(caught.value)
            assert f"{low}..{high}" in str(caught.value)


# --- 6. schema and cross-field rules ---------------------------------------------------


def test_json_schema_covers_every_message() -> None:
    schema = json_schema()
    assert json.loads(json.dumps(schema)) == schema
    assert str(PROTOCOL_VERSION) in schema["description"]
    mapping = schema["discriminator"]["mapping"]
    assert schema["discriminator"]["propertyName"] == "type"
    assert set(mapping) == {tag(cls) for cls in MESSAGE_TYPES}
    assert sorted(ref["$ref"] for ref in schema["oneOf"]) == sorted(mapping.values())
    for type_, ref in mapping.items():
        definition = schema["$defs"][ref.removeprefix("#/$defs/")]
        assert definition["properties"]["type"]["const"] == type_
        assert definition["additionalProperties"] is False
    # the payload is not part of the JSON header, so not part of its schema
    assert "data" not in schema["$defs"]["OutputChunk"]["properties"]
    assert "data" not in schema["$defs"]["FileChunk"]["properties"]
    assert "data" not in schema["$defs"]["WriteInput"]["properties"]
    assert json_schema() == schema  # a fresh copy each time, not a shared dict


SCHEMA = json_schema()


@FAST
@given(any_message)
def test_headers_use_only_schema_properties(message: BaseModel) -> None:
    """A poor man's validation against the schema: every key of a header is declared
    for its type, and every required property is present."""
    schema = SCHEMA
    header, _ = split(encode(message))
    ref = schema["discriminator"]["mapping"][header["type"]]
    definition = schema["$defs"][ref.removeprefix("#/$defs/")]
    assert set(header) <= set(definition["properties"])
    assert set(definition.get("required", [])) <= set(header)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"argv": ["x"], "shell": "x"}, {"argv": []}, {"argv": None, "shell": None}],
    ids=["neither", "both", "empty argv", "both None"],
)
def test_task_spec_needs_exactly_one_of_argv_and_shell(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="argv"):
        TaskSpec(**kwargs)


def test_task_spec_command() -> None:
    assert TaskSpec(argv=["ls", "-l"]).command == ["ls", "-l"]
    assert TaskSpec(shell="ls | wc -l").command == ["/bin/sh", "-c", "ls | wc -l"]
    assert TaskSpec(shell="").command == ["/bin/sh", "-c", ""]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"task_id": "t", "spec": {"argv": ["x"]}}, {"task_id": None, "spec": None}],
    ids=["neither", "both", "both None"],
)
def test_start_request_needs_exactly_one_of_task_id_and_spec(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="give exactly one of task_id and spec"):
        StartRequest(**kwargs)


def test_start_request_by_id_or_by_spec() -> None:
    assert StartRequest(task_id="t").spec is None
    assert StartRequest(spec=TaskSpec(shell="true")).task_id is None


# --- 7. task states --------------------------------------------------------------------


FINISHED = {
    TaskState.PENDING: False,
    TaskState.RUNNING: False,
    TaskState.SUCCEEDED: True,
    TaskState.FAILED: True,
    TaskState.STOPPED: True,
    TaskState.TIMED_OUT: True,
    TaskState.LOST: True,
}


@pytest.mark.parametrize("state", list(TaskState), ids=str)
def test_task_state_finished(state: TaskState) -> None:
    assert set(FINISHED) == set(TaskState)
    assert state.finished is FINISHED[state]
