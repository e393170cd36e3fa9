"""Results at scale (issue 5): one test's history among a million results, and results
ingested as encoded protocol frames, each beside a baseline measured in the same run.

Each figure runs in its own temporary data dir with the real plugins, the real local
node server and the real SQLite store.
"""

from __future__ import annotations

import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from jumpstarter.config import Config
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter.store.schema import SQLITE_TYPES, migrations
from jumpstarter_protocol import AddResult, QueryHistory, ResultAdded, ResultSpec, decode, encode

from ._common import RAW_INSERT, raw_store
from ._figure import Figure, figure

# --- history -----------------------------------------------------------------------------


def _build_history_store(data_dir: Path, rows: int, names: int) -> None:
    """A real store holding ``rows`` results: ``names`` tests, each run once in each of
    ``rows // names`` sessions (one task per session, 5% failed, the flaky way).

    Written straight into the store's own schema, indexes built after the rows (one
    sort instead of a million index inserts) and no journal while building; the node
    server then opens it like any store."""
    data_dir.mkdir(parents=True)
    sessions = rows // names
    statements = migrations(SQLITE_TYPES)[0]
    db = sqlite3.connect(data_dir / "jumpstarter.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    for statement in statements:
        if "CREATE TABLE" in statement:
            db.execute(statement)
    db.execute("PRAGMA user_version=1")  # migration 1 applied; the store adds the rest
    db.executemany(
        "INSERT INTO sessions (id, name, client, created_at) VALUES (?, 'nightly', 'bench', ?)",
        ((f"s{s:05d}", float(s)) for s in range(sessions)),
    )
    db.executemany(
        "INSERT INTO tasks (id, node, session_id, spec, state, exit_code, created_at)"
        " VALUES (?, 'local', ?, '{\"argv\": [\"pytest\"]}', 'failed', 1, ?)",
        ((f"t{s:05d}", f"s{s:05d}", float(s)) for s in range(sessions)),
    )
    db.executemany(
        "INSERT INTO results (task_id, session_id, node, name, outcome, duration, message,"
        " created_at) VALUES (?, ?, 'local', ?, ?, 0.01, ?, ?)",
        (
            (
                f"t{i // names:05d}",
                f"s{i // names:05d}",
                f"tests/test_mod{i % names // 50}.py::test_case[{i % names}]",
                "failed" if (i * 7919) % 20 == 0 else "passed",
                "assertion failed" if (i * 7919) % 20 == 0 else None,
                float(i // names),
            )
            for i in range(rows)
        ),
    )
    for statement in statements:
        if "CREATE TABLE" not in statement:
            db.execute(statement)
    db.execute("COMMIT")
    db.close()


@figure
def history(quick: bool) -> list[Figure]:
    """history of one test name among 1,000,000 results (absolute)"""
    rows, names = (100_000, 100) if quick else (1_000_000, 1000)
    n = 20 if quick else 100
    name = f"tests/test_mod{(names // 2) // 50}.py::test_case[{names // 2}]"

    async def main(data_dir: Path) -> list[float]:
        protocol = JumpStarterProtocol(Config(data_dir=data_dir))
        async with protocol.create_async_session("bench") as session:
            node = await session.connect("local", lease=False)

            async def query() -> None:
                data = await node.request(QueryHistory(name=name, limit=50))
                assert len(data.results) == 50 and data.session_names, data

            await query()  # warm the page cache
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                await query()
                samples.append(time.perf_counter() - t0)
            return samples

    with tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        _build_history_store(data_dir, rows, names)
        samples = anyio.run(main, data_dir)
    return [
        Figure(
            f"history of one test (50 newest runs) among {rows:,} results",
            statistics.median(samples) * 1000,
            None,
            "ms",
            "<= 50 ms",
            "(absolute)",
        )
    ]


# --- ingest through the protocol ------------------------------------------------------------

BATCH = 1000


def _batches(count: int) -> list[list[ResultSpec]]:
    """``count`` results of a plausible pytest run: node ids, durations, 5% failed
    with a message."""
    results = [
        ResultSpec(
            name=f"tests/test_mod{i // 500}.py::test_case[{i % 500}]",
            outcome="failed" if i % 20 == 7 else "passed",
            duration=0.001 * (i % 97),
            message=f"AssertionError: assert {i} == 0" if i % 20 == 7 else None,
        )
        for i in range(count)
    ]
    return [results[i : i + BATCH] for i in range(0, count, BATCH)]


@figure
def ingest(quick: bool) -> list[Figure]:
    """ingest 100,000 results as encoded AddResult frames vs raw sqlite3.executemany"""
    count = 20_000 if quick else 100_000
    batches = _batches(count)
    passes = 1 if quick else 3

    async def times(data_dir: Path, raw: sqlite3.Connection) -> tuple[list[float], list[float]]:
        protocol = JumpStarterProtocol(Config(data_dir=data_dir))
        async with protocol.create_async_session("bench") as session:
            node = await session.connect("local", lease=True)
            task = await node.new_task(["pytest"])
            # The node server's own connection, fed bytes as a network transport feeds
            # it: decode, dispatch, store, encode the reply.
            server_connection: Any = node.transport.connection  # the local transport's
            ours, base = [], []
            for batch in batches:
                now = time.time()
                raw_rows = [
                    (
                        "t",
                        "s",
                        "n",
                        r.name,
                        r.outcome.value,
                        r.duration,
                        r.message,
                        None,
                        None,
                        None,
                        None,
                        now,
                    )
                    for r in batch
                ]
                t0 = time.perf_counter()
                frame = encode(AddResult(task_id=task.id, results=batch))  # the client's side
                reply = decode(await server_connection.handle_bytes(frame))
                t1 = time.perf_counter()
                raw.execute("BEGIN IMMEDIATE")
                raw.executemany(RAW_INSERT, raw_rows)
                raw.execute("COMMIT")
                t2 = time.perf_counter()
                assert isinstance(reply, ResultAdded) and len(reply.ids) == len(batch), reply
                ours.append(t1 - t0)
                base.append(t2 - t1)
            total = (await node.query_results(task_id=task.id, limit=1)).summary.total
            assert total == count, total
            return ours, base

    ours, base = [], []
    for _ in range(passes):
        with tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp:
            raw = raw_store(Path(tmp) / "raw.db")
            try:
                a, b = anyio.run(times, Path(tmp) / "data", raw)
            finally:
                raw.close()
        ours += a
        base += b
    # The median batch of each: on a busy machine a thread hop now and then waits
    # milliseconds to be scheduled, which says nothing about either path.
    return [
        Figure(
            f"ingest {count:,} results as encoded AddResult frames of {BATCH}",
            BATCH / statistics.median(ours),
            BATCH / statistics.median(base),
            "results/s",
            ">= 0.5x",
            "sqlite3 executemany, same schema, same batches",
        )
    ]
