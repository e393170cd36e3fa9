"""The local node end to end, through the public Python API (sync and async)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jumpstarter.errors import BadRequest, Conflict, NotFound, SpawnFailed
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import Outcome, TaskState

from conftest import pid_alive


def test_the_eight_operations_in_order(protocol: JumpStarterProtocol) -> None:
    with protocol.create_session("nightly") as session:
        node = session.connect("local")  # InitializeConnection + ConnectNode
        assert node.info is not None and node.info.name == "local"
        assert node.lease_id
        info = node.fetch_config()  # FetchConfig
        assert info.driver == "local" and "process-group" in info.capabilities
        pending = node.new_task(["sh", "-c", "echo hello; echo oops >&2; exit 3"])  # NewTask
        assert pending.info is not None and pending.info.state is TaskState.PENDING
        task = node.start(pending)  # StartRequest by id
        chunks = list(task.output())
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"hello\n"
        assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"oops\n"
        final = task.wait()
        assert (final.state, final.exit_code) == (TaskState.FAILED, 3)
        sleeper = node.start(["sleep", "60"])  # StartRequest with a spec
        stopped = sleeper.stop(grace=1)  # StopTask
        assert stopped.state is TaskState.STOPPED
        ids = session.add_results(  # AddResult, a batch
            task.id,
            [
                {"name": "suite/boot", "outcome": "passed", "duration": 1.5},
                {"name": "suite/flash", "outcome": "failed", "message": "checksum", "duration": 0.5},
            ],
        )
        one = session.add_result(
            task.id, name="perf/latency", outcome="passed", metrics={"p99": {"value": 3.2, "unit": "ms"}}
        )
        assert len(ids) == 2 and one > max(ids)
        data = session.query_results(task_id=task.id)  # QueryResults
        assert [r.name for r in data.results] == ["suite/boot", "suite/flash", "perf/latency"]
        assert data.summary.total == 3
        assert data.summary.outcomes == {Outcome.PASSED: 2, Outcome.FAILED: 1}
        assert data.summary.duration == pytest.approx(2.0)
        assert data.results[2].metrics["p99"].unit == "ms"
        failed = session.query_results(task_id=task.id, outcomes=["failed"])
        assert [r.message for r in failed.results] == ["checksum"]
        assert session.query_results(session="nightly", name="suite/*").summary.total == 2


@pytest.mark.anyio
async def test_async_twin(protocol: JumpStarterProtocol) -> None:
    async with protocol.create_async_session("async") as session:
        node = await session.connect()
        task = await node.start(["echo", "async"])
        out = b"".join([chunk.data async for chunk in task.output()])
        assert out == b"async\n"
        assert (await task.wait()).state is TaskState.SUCCEEDED
        await session.add_result(task.id, name="a", outcome="xfail")
        assert (await session.query_results(task_id=task.id)).summary.outcomes == {Outcome.XFAIL: 1}


def test_fifty_megabytes_streamed_whole_and_from_an_offset(protocol: JumpStarterProtocol) -> None:
    script = (
        "import os, sys\n"
        "block = bytes(range(256)) * 4096\n"  # 1 MiB, not compressible to a pattern of zeros
        "for i in range(50):\n"
        "    sys.stdout.buffer.write(block[i:] + block[:i])\n"
        "sys.stdout.flush()\n"
        "sys.stderr.write('done\\n')\n"
    )
    expected = hashlib.sha256()
    block = bytes(range(256)) * 4096
    for i in range(50):
        expected.update(block[i:] + block[:i])
    with protocol.create_session("big") as session:
        node = session.connect()
        task = node.start([sys.executable, "-c", script])
        got = hashlib.sha256()
        size = 0
        stderr = b""
        log = bytearray()  # both streams as the node ordered them
        offsets_ok = True
        for chunk in task.output():
            offsets_ok &= chunk.offset == size + len(stderr)
            log += chunk.data
            if chunk.stream == "stdout":
                got.update(chunk.data)
                size += len(chunk.data)
            else:
                stderr += chunk.data
        assert offsets_ok
        assert size == 50 * 1024 * 1024
        assert got.hexdigest() == expected.hexdigest()
        assert stderr == b"done\n"
        assert task.end is not None and task.end.offset == size + len(stderr)
        assert task.wait().state is TaskState.SUCCEEDED
        # Read again from an offset: exactly the tail. (Two pipes carry no order
        # between them: "done" may come before the last of stdout in the log.)
        offset = 50 * 1024 * 1024 - 12345
        tail = b"".join(c.data for c in task.output(offset))
        assert tail == bytes(log[offset:])


def test_output_interleaves_streams_in_order(protocol: JumpStarterProtocol) -> None:
    # Two pipes carry no order between them; with a pause between writes the node
    # reads each before the next comes, and keeps that order in the one log.
    script = (
        "import sys, time\n"
        "for i in range(5):\n"
        "    print(i, flush=True); time.sleep(0.05)\n"
        "    print(f'-{i}', file=sys.stderr, flush=True); time.sleep(0.05)\n"
    )
    with protocol.create_session("s") as session:
        task = session.connect().start([sys.executable, "-c", script])
        pieces: list[tuple[str, bytes]] = []
        for c in task.output():  # a print may be two writes: join runs of one stream
            if pieces and pieces[-1][0] == c.stream:
                pieces[-1] = (c.stream, pieces[-1][1] + c.data)
            else:
                pieces.append((c.stream, c.data))
    assert pieces == [
        (stream, f"{sign}{i}\n".encode()) for i in range(5) for stream, sign in (("stdout", ""), ("stderr", "-"))
    ]


def test_stop_kills_the_whole_process_group(protocol: JumpStarterProtocol, tmp_path: Path) -> None:
    # The child ignores SIGTERM (an ignored signal stays ignored across exec); it
    # prints its pid only once it does, so the stop cannot come first.
    script = "(trap '' TERM; exec sh -c 'echo $$; exec sleep 300') & wait"
    with protocol.create_session("s") as session:
        task = session.connect().start(["sh", "-c", script])
        first = next(iter(task.output()))
        child = int(first.data.split()[0])
        assert pid_alive(child)
        started = time.monotonic()
        info = task.stop(grace=0.5)
        assert info.state is TaskState.STOPPED
        assert time.monotonic() - started >= 0.5  # it waited for the grace period
        deadline = time.monotonic() + 5
        while pid_alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pid_alive(child)


def test_stop_on_a_finished_task_answers_its_final_state(protocol: JumpStarterProtocol) -> None:
    with protocol.create_session("s") as session:
        node = session.connect()
        task = node.start(["true"])
        assert task.wait().state is TaskState.SUCCEEDED
        assert task.stop().state is TaskState.SUCCEEDED
        pending = node.new_task(["true"])
        assert pending.stop().state is TaskState.STOPPED
        with pytest.raises(Conflict, match="is stopped, not pending"):
            pending.start()


def test_timeout_env_and_cwd(protocol: JumpStarterProtocol, tmp_path: Path) -> None:
    with protocol.create_session("s") as session:
        node = session.connect()
        slow = node.start(["sleep", "30"], timeout=0.3)
        info = slow.wait()
        assert info.state is TaskState.TIMED_OUT
        assert info.message == "timed out after 0.3s"
        task = node.start(["sh", "-c", 'echo "$GREETING"; pwd'], env={"GREETING": "hi there"}, cwd=str(tmp_path))
        out = b"".join(c.data for c in task.output())
        assert out == f"hi there\n{tmp_path}\n".encode()


def test_shell_string_is_explicit(protocol: JumpStarterProtocol) -> None:
    with protocol.create_session("s") as session:
        node = session.connect()
        task = node.start(shell="echo $((6 * 7)) | tr 4 X")
        assert b"".join(c.data for c in task.output()) == b"X2\n"
        with pytest.raises(TypeError, match="pass argv as a list"):
            node.start("echo hi")  # type: ignore[arg-type]


def _tasks_in_store(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "jumpstarter.db") as db:
        return db.execute("SELECT count(*) FROM tasks").fetchone()[0]


def test_bad_requests_change_nothing(protocol: JumpStarterProtocol, data_dir: Path, tmp_path: Path) -> None:
    with protocol.create_session("s") as session:
        node = session.connect()
        node.start(["true"]).wait()
        before = _tasks_in_store(data_dir)
        with pytest.raises(SpawnFailed, match="^command not found: no-such-command$") as caught:
            node.start(["no-such-command"])
        assert caught.value.details["errno"] == "ENOENT"
        with pytest.raises(BadRequest, match="^working directory does not exist: /no/such/dir$"):
            node.start(["true"], cwd="/no/such/dir")
        with pytest.raises(NotFound, match="^no task with id 'nope'$"):
            node.task("nope").wait()
        with pytest.raises(NotFound, match="^no task with id 'nope'$"):
            node.task("nope").stop()
        with pytest.raises(NotFound, match="^no task with id 'nope'$"):
            node.task("nope").status()
        with pytest.raises(NotFound, match="^no task with id 'nope'$"):
            list(node.task("nope").output())
        with pytest.raises(NotFound, match="^no task with id 'nope'$"):
            session.query_results(task_id="nope")
        with pytest.raises(NotFound, match="^no session named 'nope'$"):
            session.query_results(session="nope")
        with pytest.raises(NotFound, match="^no task with id 'nope'$"):
            session.add_result("nope", name="x", outcome="passed")
        assert _tasks_in_store(data_dir) == before
        assert session.query_results(session="s").summary.total == 0


def test_a_second_session_cannot_take_a_leased_node(protocol: JumpStarterProtocol) -> None:
    with protocol.create_session("first") as first:
        node = first.connect()
        server = node.aio.transport.connection.server
        # A second connection to the same node server, as another client would make.
        import anyio
        from jumpstarter_protocol import ConnectNode, InitializeConnection

        async def intrude() -> object:
            conn = server.connect()
            await conn.handle(InitializeConnection(session_id="other", session_name="second"))
            return await conn.handle(ConnectNode())

        reply = first._portal.call(intrude)
        assert reply.type == "error" and reply.code == "conflict"
        assert reply.message.startswith("node 'local' is leased by session 'first'")
        node.release()
        reply = first._portal.call(intrude)
        assert reply.type == "connection_established"
        del anyio


def test_results_added_in_one_process_are_found_from_another(protocol: JumpStarterProtocol, data_dir: Path) -> None:
    script = f"""
from jumpstarter.protocol import JumpStarterProtocol
with JumpStarterProtocol().create_session("writer") as session:
    node = session.connect()
    task = node.start(["true"])
    task.wait()
    session.add_results(task.id, [{{"name": f"case/{{i}}", "outcome": "passed"}} for i in range(100)])
    print(task.id)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JMP_DATA_DIR": str(data_dir)})
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    with protocol.create_session("reader") as session:
        session.connect(lease=False)
        data = session.query_results(task_id=task_id, limit=60)
        assert len(data.results) == 60 and data.summary.total == 100
        assert data.next_cursor is not None
        rest = session.query_results(task_id=task_id, cursor=data.next_cursor)
        assert [r.name for r in data.results + rest.results] == [f"case/{i}" for i in range(100)]
        assert rest.next_cursor is None
        assert session.query_results(session="writer").summary.total == 100


def test_closing_the_session_stops_what_still_runs(protocol: JumpStarterProtocol) -> None:
    with protocol.create_session("s") as session:
        task = session.connect().start(["sleep", "60"])
        pid_line = task.status()
        assert pid_line.state is TaskState.RUNNING
    with protocol.create_session("again") as session:
        info = session.connect(lease=False).task(task.id).status()
        assert info.state is TaskState.STOPPED


def test_a_task_left_running_by_a_dead_agent_is_lost(protocol: JumpStarterProtocol, data_dir: Path) -> None:
    script = """
import os, sys
from jumpstarter.protocol import JumpStarterProtocol
session = JumpStarterProtocol().create_session("doomed").__enter__()
task = session.connect().start(["sleep", "60"])
print(task.id, flush=True)
os._exit(0)  # the agent dies without cleaning up
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "JMP_DATA_DIR": str(data_dir)})
    task_id = done.stdout.strip()
    with protocol.create_session("next") as session:
        info = session.connect(lease=False).task(task_id).status()
        assert info.state is TaskState.LOST
        assert info.message == "the node agent went away"


def test_a_session_that_only_reads_leaves_no_trace(protocol: JumpStarterProtocol, data_dir: Path) -> None:
    with protocol.create_session("writer") as session:
        session.connect().start(["true"]).wait()
    with protocol.create_session("reader") as session:
        node = session.connect(lease=False)
        node.list_tasks()
        with pytest.raises(NotFound):
            node.task("nope").status()
    with sqlite3.connect(data_dir / "jumpstarter.db") as db:
        assert [row[0] for row in db.execute("SELECT name FROM sessions")] == ["writer"]
