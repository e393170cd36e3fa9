"""The fast paths of issue 6 keep their guarantees: the store's point operations run
on the event loop's own connection but never wait there for a lock, inline writes
still get checkpointed, output logs appear only with the first byte, and a batch of
results gets the ids the store gave it."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter.store import SQLiteStore
from jumpstarter_protocol import TaskInfo, TaskSpec, TaskState


def _task(task_id: str) -> TaskInfo:
    return TaskInfo(
        id=task_id,
        node="local",
        spec=TaskSpec(argv=["true"]),
        state=TaskState.PENDING,
        created_at=datetime.now(UTC),
    )


@pytest.mark.anyio
async def test_a_write_lock_held_elsewhere_is_waited_for_off_the_event_loop(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "store.db")
    await store.open()
    other = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    try:
        await store.create_task(_task("t1"))
        other.execute("BEGIN IMMEDIATE")  # another process, say, holds the write lock

        async def release_soon() -> None:
            await anyio.sleep(0.2)
            other.execute("COMMIT")

        # Only this event loop releases the lock: had the store waited for it here,
        # on the loop, this would never finish (the guard turns that into a failure).
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(release_soon)
                running = await store.mark_running("t1", 1234, "host:1")
        assert running.state is TaskState.RUNNING and not other.in_transaction

        other.execute("BEGIN IMMEDIATE")
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(release_soon)
                finished = await store.finish_task("t1", TaskState.SUCCEEDED, 0)
        assert (finished.state, finished.exit_code) == (TaskState.SUCCEEDED, 0)
        assert (await store.get_task("t1")).state is TaskState.SUCCEEDED
    finally:
        other.close()
        await store.aclose()


@pytest.mark.anyio
async def test_inline_writes_keep_the_wal_checkpointed(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    store = SQLiteStore(path)
    store.INLINE_CHECKPOINT_CHANGES = 20
    await store.open()
    try:
        for i in range(1000):
            await store.create_task(_task(f"t{i}"))
        assert (await store.get_task("t999")).state is TaskState.PENDING
        # Unchecked, 1000 commits of a row and its index entries leave a WAL of
        # some 20 MB; checkpointed every 20 rows the WAL is reused from the start.
        wal = Path(f"{path}-wal").stat().st_size
        assert wal < 3_000_000, wal
    finally:
        await store.aclose()
    # Everything is in the database file once the store is closed.
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM tasks").fetchone()[0] == 1000


def test_a_task_without_output_has_no_log_files(
    protocol: JumpStarterProtocol, data_dir: Path
) -> None:
    with protocol.create_session("quiet") as session:
        node = session.connect("local")
        quiet = node.start(["true"])
        assert list(quiet.output()) == []
        assert quiet.end is not None and (quiet.end.offset, quiet.end.exit_code) == (0, 0)
        assert list((data_dir / "output").glob(f"{quiet.id}.*")) == []

        loud = node.start(["sh", "-c", "echo out; echo err >&2"])
        chunks = list(loud.output())
        assert b"".join(c.data for c in chunks) in (b"out\nerr\n", b"err\nout\n")
        assert sorted(p.name for p in (data_dir / "output").glob(f"{loud.id}.*")) == [
            f"{loud.id}.idx",
            f"{loud.id}.out",
        ]
        # A reader that comes later reads the same bytes from the files.
        again = list(node.task(loud.id).output(follow=False))
        assert b"".join(c.data for c in again) == b"".join(c.data for c in chunks)


def test_batch_ids_are_the_stored_ids(protocol: JumpStarterProtocol) -> None:
    with protocol.create_session("ids") as session:
        node = session.connect("local")
        task = node.start(["true"])
        task.wait()
        first = session.add_results(
            task.id, [{"name": f"a/{i}", "outcome": "passed"} for i in range(5)]
        )
        second = session.add_results(task.id, [{"name": "b", "outcome": "failed", "message": "no"}])
        stored = session.query_results(task_id=task.id)
        assert first + second == [r.id for r in stored.results]
        assert [r.name for r in stored.results] == [*(f"a/{i}" for i in range(5)), "b"]
        assert stored.results[-1].message == "no"


def test_a_task_inherits_the_environment_with_or_without_env(
    protocol: JumpStarterProtocol, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JMP_TEST_INHERITED", "from the node")
    command = ["sh", "-c", 'echo "$JMP_TEST_INHERITED/$JMP_TEST_ADDED"']
    with protocol.create_session("env") as session:
        node = session.connect("local")
        plain = node.start(command)
        assert b"".join(c.data for c in plain.output()) == b"from the node/\n"
        added = node.start(command, env={"JMP_TEST_ADDED": "from the task"})
        assert b"".join(c.data for c in added.output()) == b"from the node/from the task\n"
