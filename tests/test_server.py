"""The node server's dispatcher: malformed input gets an Error reply, never a crash."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from jumpstarter.config import Config, NodeConfig
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import (
    ConnectNode,
    InitializeConnection,
    NewTask,
    Ping,
    TaskSpec,
    decode,
    encode,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def server(data_dir: Path):
    protocol = JumpStarterProtocol(Config(data_dir=data_dir))
    node_server = protocol.make_node_server(NodeConfig(name="local"))
    async with anyio.create_task_group() as tg:
        await tg.start(node_server.run)
        yield node_server
        node_server.close()


async def test_malformed_frames_get_an_error_and_the_server_keeps_serving(server) -> None:
    conn = server.connect()
    cases = {
        b"": ("bad_request", "truncated message"),
        b"\x00\x00\x00\x10{}": ("bad_request", "truncated message"),
        b"\x00\x00\x00\x02{}": ("bad_request", "invalid message"),
        b'\x00\x00\x00\x0f{"type":"nope"}': ("bad_request", None),
        b"\x00" * (17 * 1024 * 1024): ("too_large", "message of 17825792 bytes exceeds the limit of 16777216 bytes"),
    }
    for frame, (code, message) in cases.items():
        reply = decode(await conn.handle_bytes(frame))
        assert reply.type == "error" and reply.code == code
        if message is not None:
            assert reply.message.startswith(message)  # exact texts: test_protocol.py
    assert decode(await conn.handle_bytes(encode(Ping()))).type == "pong"


async def test_requests_before_the_handshake_are_refused(server) -> None:
    conn = server.connect()
    reply = await conn.handle(NewTask(spec=TaskSpec(argv=["true"])))
    assert (reply.type, reply.code, reply.message) == ("error", "unauthorized", "send initialize_connection first")
    await conn.handle(InitializeConnection(session_id="s1", session_name="s"))
    reply = await conn.handle(NewTask(spec=TaskSpec(argv=["true"])))
    assert (reply.code, reply.message) == ("conflict", "this session does not hold node 'local'; connect first")


async def test_a_version_outside_the_range_is_refused(server) -> None:
    conn = server.connect()
    reply = await conn.handle(InitializeConnection(session_id="s1", session_name="s", min_version=7, max_version=9))
    assert reply.code == "version_mismatch"
    assert reply.message == "protocol version mismatch: the client speaks 7..9, this side 1..1"


async def test_a_reply_is_not_a_request(server) -> None:
    from jumpstarter_protocol import Pong

    reply = await server.connect().handle(Pong())
    assert (reply.code, reply.message) == ("bad_request", "pong is not a request")


def _frame(message: dict) -> bytes:
    import json
    import struct

    header = json.dumps(message).encode()
    return struct.pack(">I", len(header)) + header


async def test_bad_wire_values_are_bad_request_with_nothing_applied(server) -> None:
    conn = server.connect()
    await conn.handle(InitializeConnection(session_id="s1", session_name="wire"))
    spec = {"argv": ["true"]}
    cases = [
        ({"type": "connect_node", "duration": 1e308},
         "invalid connect_node message: duration: Input should be less than or equal to 1000000000"),
        ({"type": "query_results", "cursor": str(10**23)},
         "invalid cursor '100000000000000000000000': use the next_cursor of a page"),
        ({"type": "new_task", "spec": {"argv": ["echo", "a\0b"]}},
         "invalid new_task message: spec: Value error, argv[1] holds a NUL character"),
        ({"type": "new_task", "spec": {**spec, "env": {"A": "x\0y"}}},
         "invalid new_task message: spec: Value error, env A holds a NUL character"),
        ({"type": "new_task", "spec": {**spec, "env": {"A=B": "x"}}},
         "invalid new_task message: spec: Value error, env name 'A=B' must be non-empty and hold no '='"),
        ({"type": "start_request", "spec": {**spec, "timeout": 1e308}},
         "invalid start_request message: spec.timeout: Input should be less than or equal to 1000000000"),
    ]
    for message, text in cases:
        reply = decode(await conn.handle_bytes(_frame(message)))
        assert (reply.type, reply.code, reply.message) == ("error", "bad_request", text)
    assert server.leases.current() is None  # the huge duration took no lease
    assert await server.store.list_tasks() == []
    assert await server.store.list_sessions(with_results=False) == []
    # The node still leases and runs what is valid.
    reply = decode(await conn.handle_bytes(_frame({"type": "connect_node", "duration": 60})))
    assert reply.type == "connection_established"
    for message, _ in cases[2:]:
        reply = decode(await conn.handle_bytes(_frame(message)))
        assert reply.code == "bad_request"
    assert await server.store.list_tasks() == []


def _peak_rss_kib() -> int:
    import re

    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read())[1])


async def test_a_query_over_large_results_pages_within_the_message_limit(server) -> None:
    from jumpstarter_protocol import MAX_MESSAGE_SIZE, QueryResults, ResultSpec

    conn = server.connect()
    await conn.handle(InitializeConnection(session_id="s1", session_name="big"))
    await conn.handle(ConnectNode())
    task = (await conn.handle(NewTask(spec=TaskSpec(argv=["true"])))).task
    message = "m" * (5 * 1024 * 1024)
    for i in range(16):  # 80 MB of results, five times the message limit
        await server.store.add_results(task, [ResultSpec(name=f"big/{i}", outcome="failed", message=message)])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS starts again from here
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS here: {exc}")
    before = _peak_rss_kib()
    names, cursor = [], None
    while True:
        frame = await conn.handle_bytes(encode(QueryResults(task_id=task.id, cursor=cursor)))
        assert len(frame) <= MAX_MESSAGE_SIZE
        page = decode(frame)
        assert page.type == "results_data", page
        names += [r.name for r in page.results]
        del frame, page.results
        if (cursor := page.next_cursor) is None:
            break
    growth_mib = (_peak_rss_kib() - before) / 1024
    assert names == [f"big/{i}" for i in range(16)]
    # A few copies of one page (rows, models, JSON, the frame) at most, never all
    # 80 MB at once (measured: some 90 MiB; building the whole reply of 120 MB took 377 MiB).
    assert growth_mib < 150, f"peak RSS grew by {growth_mib:.0f} MiB"


EXTREMES = [10**30, 2**63, -(2**63) - 1, 1e308, -1, "\0", "x" * 100_000]


async def test_extreme_wire_values_are_never_an_internal_error(server) -> None:
    # Every numeric or text field a client controls, at the edges of what JSON can say.
    from jumpstarter_protocol import OpenTask

    conn = server.connect()
    await conn.handle(InitializeConnection(session_id="s1", session_name="edges"))
    await conn.handle(ConnectNode())
    task = (await conn.handle(NewTask(spec=TaskSpec(argv=["true"])))).task.id
    opened = (await conn.handle(OpenTask(spec=TaskSpec(argv=["pytest"])))).task.id

    def result(**fields: object) -> dict:
        return {"type": "add_result", "task_id": task, "results": [{"name": "a", "outcome": "passed", **fields}]}

    for v in EXTREMES:
        for message in (
            {"type": "wait_task", "task_id": task, "timeout": v},
            {"type": "stop_task", "task_id": task, "grace": v},
            {"type": "list_tasks", "limit": v},
            {"type": "list_sessions", "limit": v},
            {"type": "query_history", "name": "a", "limit": v},
            {"type": "query_results", "limit": v},
            {"type": "query_results", "since": v},
            {"type": "query_results", "name": v},
            {"type": "query_results", "labels": {"k": v}},
            {"type": "query_results", "cursor": v},
            result(duration=v), result(line=v), result(started_at=v), result(message=v),
            result(metrics={"m": {"value": v}}),
            {**result(), "batch_id": v},
            {"type": "close_task", "task_id": opened, "state": "failed", "exit_code": v},
            {"type": "new_task", "spec": {"argv": ["true"], "pty": {"rows": v, "cols": v}}},
            {"type": "new_task", "spec": {"argv": ["true"], "timeout": v}},
            {"type": "new_task", "spec": {"argv": ["true"], "cwd": v}},
            {"type": "new_task", "spec": {"shell": v}},
            {"type": "connect_node", "wait": v},
            {"type": "connect_node", "duration": v},
            {"type": "get_task_status", "task_id": v},
        ):
            reply = decode(await conn.handle_bytes(_frame(message)))
            assert reply.type != "error" or reply.code != "internal", (str(message)[:200], reply.message)
