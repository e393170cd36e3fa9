"""The node registry and leases by selector, against the real PostgreSQL server."""

from __future__ import annotations

import time

import anyio
import psycopg
import pytest
from jumpstarter.errors import Conflict, NotFound
from jumpstarter.store import open_store
from jumpstarter.store.registry import NodeRegistry
from stores import postgres_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio


async def _registry(url: str, **kwargs) -> NodeRegistry:
    store = open_store(url)
    await store.open()
    return NodeRegistry(store, **kwargs)


async def _register_three(registry: NodeRegistry) -> None:
    for name, labels in {
        "rpi-a": {"board": "rpi4", "site": "lab1"},
        "rpi-b": {"board": "rpi4", "site": "lab2"},
        "x86-a": {"board": "x86", "site": "lab1"},
    }.items():
        await registry.register(name, labels=labels, endpoint=f"grpc://127.0.0.1/{name}",
                                transport="grpc", driver="local", agent="test")


async def test_select_lease_release(postgres_url: str) -> None:
    registry = await _registry(postgres_url)
    try:
        await _register_three(registry)
        lease, node = await registry.acquire({"board": "rpi4", "site": "lab2"}, session_id="s1", session_name="one")
        assert node.name == "rpi-b" and node.status == "leased"
        with pytest.raises(Conflict, match=r"^no free node matches board=rpi4,site=lab2: rpi-b \(leased\)$"):
            await registry.acquire({"board": "rpi4", "site": "lab2"}, session_id="s2", session_name="two")
        with pytest.raises(NotFound, match="^no node matches board=riscv$"):
            await registry.acquire({"board": "riscv"}, session_id="s2", session_name="two")
        with pytest.raises(Conflict, match=r"^node 'rpi-b' is leased by session 'one' \(s1\) since "):
            await registry.lease_node("rpi-b", session_id="s2", session_name="two")
        assert [(n.name, n.status) for n in await registry.nodes()] == [
            ("rpi-a", "free"), ("rpi-b", "leased"), ("x86-a", "free"),
        ]
        assert await registry.release(lease.id)
        assert not await registry.release(lease.id)
        assert [l.node for l in await registry.leases()] == []
    finally:
        await registry.store.aclose()


async def test_the_schema_forbids_two_live_leases_on_one_node(postgres_url: str) -> None:
    registry = await _registry(postgres_url)
    try:
        await _register_three(registry)
        await registry.lease_node("rpi-a", session_id="s1", session_name="one")
        async with registry.pool.connection() as db:
            with pytest.raises(psycopg.errors.UniqueViolation):
                await db.execute(
                    "INSERT INTO leases (node, session_id, session_name, since, keepalive_at)"
                    " VALUES ('rpi-a', 's2', 'two', 0, 0)"
                )
    finally:
        await registry.store.aclose()


async def test_expiry_keepalive_and_offline(postgres_url: str) -> None:
    registry = await _registry(postgres_url, heartbeat_timeout=0.5)
    try:
        await _register_three(registry)
        short = await registry.lease_node("rpi-a", session_id="s1", session_name="one", duration=0.2)
        kept = await registry.lease_node("x86-a", session_id="s2", session_name="two")
        for _ in range(6):
            await anyio.sleep(0.15)
            assert await registry.keepalive(kept.id)
            for name in ("rpi-a", "x86-a"):
                await registry.heartbeat(name)
        leases = {l.node for l in await registry.leases()}
        assert leases == {"x86-a"}  # rpi-a's ran out; x86-a kept alive; rpi-b went offline
        statuses = {n.name: n.status for n in await registry.nodes()}
        assert statuses == {"rpi-a": "free", "rpi-b": "offline", "x86-a": "leased"}
        await anyio.sleep(0.6)  # no keep-alive, no heartbeat: everything ends
        assert await registry.leases() == []
        assert not await registry.keepalive(kept.id)
        del short
    finally:
        await registry.store.aclose()


async def test_twenty_clients_three_nodes_fifo_and_never_twice(postgres_url: str) -> None:
    setup = await _registry(postgres_url)
    await _register_three(setup)
    await setup.store.aclose()
    holding: dict[str, str] = {}
    overlaps: list[str] = []
    granted: list[int] = []

    async def client(i: int) -> None:
        registry = await _registry(postgres_url)  # its own connections, as another machine
        try:
            await anyio.sleep(i * 0.03)  # arrive in order
            lease, node = await registry.acquire({}, session_id=f"s{i}", session_name=f"c{i}", wait=60)
            granted.append(i)
            if node.name in holding:
                overlaps.append(f"{node.name}: {holding[node.name]} and c{i}")
            holding[node.name] = f"c{i}"
            await anyio.sleep(0.1)
            del holding[node.name]
            assert await registry.release(lease.id)
        finally:
            await registry.store.aclose()

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(client, i)
    assert overlaps == []
    assert sorted(granted) == list(range(20))  # every client served
    # First come, first served: leases were granted in the order requests arrived.
    async with await psycopg.AsyncConnection.connect(postgres_url) as db:
        order = [r[0] for r in await (await db.execute("SELECT request_id FROM leases ORDER BY id")).fetchall()]
    assert len(order) == 20 and order == sorted(order)
    assert time.monotonic() - started < 60
