"""The PostgreSQL figures (issue 7): leases per second with 20 concurrent clients, and
result ingestion into the PostgreSQL store, each beside raw SQL of the same shape.

They need a server: ``JMP_TEST_POSTGRES_URL`` (default postgresql://postgres@127.0.0.1:5432/test).
Each figure works in a schema of its own, dropped afterwards. Without a server the
figures are left out with a line on stderr.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from urllib.parse import quote

import anyio

from ._figure import Figure, figure

URL = os.environ.get("JMP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CLIENTS = 20


@asynccontextmanager
async def _schema() -> AsyncIterator[str]:
    import psycopg

    name = f"jmp_bench_{secrets.token_hex(4)}"
    async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as db:
        await db.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{URL}{'&' if '?' in URL else '?'}options={quote(f'-csearch_path={name}')}"
    finally:
        async with await psycopg.AsyncConnection.connect(URL, autocommit=True) as db:
            await db.execute(f"DROP SCHEMA {name} CASCADE")


def _reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(URL, connect_timeout=3):
            return True
    except Exception as exc:
        print(f"bench: postgres figures left out: {URL} not reachable ({exc})", file=sys.stderr)
        return False


async def _leases(quick: bool) -> list[Figure]:
    from jumpstarter.store import open_store
    from jumpstarter.store.registry import NodeRegistry

    seconds = 2.0 if quick else 5.0
    async with _schema() as url:
        setup = open_store(url)
        await setup.open()
        registry = NodeRegistry(setup)
        for i in range(3):
            await registry.register(f"node{i}", labels={"board": "x"}, endpoint=None,
                                    transport="grpc", driver="local", agent="bench")

        async def ours(i: int, deadline: float, counts: list[int]) -> None:
            store = open_store(url)
            await store.open()
            mine = NodeRegistry(store)
            try:
                while time.monotonic() < deadline:
                    lease, _ = await mine.acquire({"board": "x"}, session_id=f"s{i}", session_name="bench", wait=30)
                    await mine.release(lease.id)
                    counts[0] += 1
            finally:
                await store.aclose()

        async def raw(i: int, deadline: float, counts: list[int]) -> None:
            # The least a lease can be: claim a free node in one statement (the same
            # unique index keeps it to one holder), end it in another.
            import psycopg

            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
                while time.monotonic() < deadline:
                    row = await (await db.execute(
                        "INSERT INTO leases (node, session_id, session_name, since, keepalive_at)"
                        " SELECT name, %s, 'raw', 0, 0 FROM nodes WHERE name NOT IN"
                        " (SELECT node FROM leases WHERE ended_at IS NULL) ORDER BY random() LIMIT 1"
                        " ON CONFLICT DO NOTHING RETURNING id", (f"r{i}",))).fetchone()
                    if row is None:
                        await anyio.sleep(0.001)
                        continue
                    await db.execute("UPDATE leases SET ended_at = 1 WHERE id = %s", (row[0],))
                    counts[0] += 1

        rates = []
        for fn in (ours, raw):
            counts = [0]
            start = time.monotonic()
            deadline = start + seconds
            async with anyio.create_task_group() as tg:
                for i in range(CLIENTS):
                    tg.start_soon(fn, i, deadline, counts)
            rates.append(counts[0] / (time.monotonic() - start))
        await setup.aclose()
    return [Figure(f"leases acquired+released/s, {CLIENTS} clients, 3 nodes (postgres)", rates[0], rates[1],
                   "leases/s", ">= 0.1x", "raw INSERT/UPDATE of a lease row")]


async def _ingest(quick: bool) -> list[Figure]:
    import psycopg
    from jumpstarter.store import open_store
    from jumpstarter_protocol import Outcome, ResultSpec, TaskInfo, TaskSpec, TaskState

    total, batch = (20_000, 1000) if quick else (100_000, 1000)
    specs = [ResultSpec(name=f"suite/case{i}", outcome=Outcome.PASSED, duration=0.01) for i in range(batch)]
    async with _schema() as url:
        store = open_store(url)
        await store.open()
        await store.add_session("s", "bench", "bench")
        task = TaskInfo(id="t", node="n", session_id="s", spec=TaskSpec(argv=["true"]),
                        state=TaskState.PENDING, created_at=datetime.now(UTC))
        await store.create_task(task)
        t0 = time.perf_counter()
        for _ in range(total // batch):
            await store.add_results(task, specs)
        ours = total / (time.perf_counter() - t0)
        await store.aclose()

        rows = [("t", "s", "n", f"suite/case{i}", "passed", 0.01, None, None, None, None, None, time.time())
                for i in range(batch)]
        async with await psycopg.AsyncConnection.connect(url) as db:
            await db.execute("CREATE TABLE raw_results (LIKE results INCLUDING ALL)")
            await db.commit()
            t0 = time.perf_counter()
            for _ in range(total // batch):
                async with db.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO raw_results (task_id, session_id, node, name, outcome, duration,"
                        " message, metrics, labels, started_at, finished_at, created_at)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", rows)
                await db.commit()
            raw = total / (time.perf_counter() - t0)
    return [Figure(f"add {total:,} results in batches of {batch} (postgres store)", ours, raw,
                   "results/s", ">= 0.5x", "raw executemany, one commit per batch")]


@figure
def postgres_leases(quick: bool) -> list[Figure]:
    """leases per second with 20 concurrent clients (postgres)"""
    return anyio.run(_leases, quick) if _reachable() else []


@figure
def postgres_ingest(quick: bool) -> list[Figure]:
    """result ingestion into the postgres store"""
    return anyio.run(_ingest, quick) if _reachable() else []
