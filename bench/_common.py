"""What several benchmark modules share."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from pathlib import Path

from jumpstarter.client import AsyncNode
from jumpstarter.store.schema import SQLITE_TYPES, migrations


async def alternate(
    n: int, ours: Callable[[], Awaitable[object]], baseline: Callable[[], Awaitable[object]]
) -> tuple[list[float], list[float]]:
    """Time ``n`` calls of each, alternating, so load from elsewhere hits both alike."""
    a, b = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        await ours()
        t1 = time.perf_counter()
        await baseline()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return a, b


def raw_pipe_rate(command: list[str], size: int, keep_in: Path | None = None) -> float:
    """MB/s reading ``command``'s stdout through a plain pipe into one reused 1 MiB
    buffer: what the machine itself does. (Reading into a new bytes object each time
    instead runs at 1 GB/s or 6 GB/s on the same machine, by whether the allocator
    happens to hand out fresh pages: no baseline to measure against.)

    With ``keep_in``, each read is also written to a file in that directory, disk
    space reserved ahead as the node's output log has it: the least any tool that
    keeps the output must do."""
    from jumpstarter.node.output import _fallocate

    fallocate = _fallocate() if keep_in is not None else None
    buffer = bytearray(1024 * 1024)
    view = memoryview(buffer)
    with tempfile.TemporaryFile(dir=keep_in) if keep_in is not None else nullcontext() as file:
        t0 = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE)
        assert process.stdout is not None
        fd = process.stdout.fileno()
        got = reserved = 0
        while n := os.readv(fd, [buffer]):
            if file is not None:
                if fallocate is not None and got + n > reserved:
                    reserved = got + n + 16 * 1024 * 1024
                    fallocate(file.fileno(), got, reserved - got)
                os.write(file.fileno(), view[:n])
            got += n
        process.wait()
        elapsed = time.perf_counter() - t0
        process.stdout.close()
    assert got == size, (got, size)
    return size / 1_000_000 / elapsed


async def timed_stream(node: AsyncNode, command: list[str], size: int) -> tuple[str, float]:
    """Start ``command`` on ``node`` and read all its output: the task's id, and MB/s
    from start to ``OutputEnd``. Checks the output came complete and in order."""
    t0 = time.perf_counter()
    task = await node.start(command)
    got = 0
    async for chunk in task.output():
        assert chunk.offset == got, (chunk.offset, got)  # complete and ordered
        got += len(chunk.data)
    elapsed = time.perf_counter() - t0
    assert got == size and task.end is not None and task.end.exit_code == 0
    return task.id, size / 1_000_000 / elapsed


RAW_INSERT = (
    "INSERT INTO results (task_id, session_id, node, name, outcome, duration,"
    " message, metrics, labels, started_at, finished_at, created_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def raw_store(path: Path) -> sqlite3.Connection:
    """A plain SQLite file with the store's own schema (same table, same indexes),
    WAL and synchronous=NORMAL as the store has them, and one task to add to."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    for statement in migrations(SQLITE_TYPES)[0]:
        db.execute(statement)
    db.execute(
        "INSERT INTO tasks (id, node, spec, state, created_at)"
        " VALUES ('t', 'n', '{}', 'running', 0)"
    )
    return db
