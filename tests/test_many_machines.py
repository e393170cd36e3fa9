"""Many machines (issue 7): node agents registered in one PostgreSQL store, clients
leasing any free node by label, results from every node in one place. Real
``jmp node serve`` processes, real gRPC on 127.0.0.1, the real PostgreSQL server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from conftest import JMP, run_jmp
from jumpstarter.config import Config
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import QueryResults, TaskState
from stores import postgres_url  # noqa: F401  (fixture)

# Quick heartbeats, so a vanished agent is noticed within a test's patience.
FAST = {"JMP_HEARTBEAT_INTERVAL": "0.3", "JMP_HEARTBEAT_TIMEOUT": "2"}


@pytest.fixture
def lab(postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start node agents sharing the store; each is stopped at the end."""
    for key, value in FAST.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("jumpstarter.store.registry.HEARTBEAT_INTERVAL", 0.3)
    monkeypatch.setattr("jumpstarter.store.registry.HEARTBEAT_TIMEOUT", 2.0)
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *labels: str, args: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{name}.log"
        home = tmp_path / name
        home.mkdir()
        env = {**os.environ, **FAST, "JMP_STORE": postgres_url, "JMP_DATA_DIR": str(home)}
        argv = [JMP, "node", "serve", "--listen", "127.0.0.1:0", "--name", name, *args]
        for label in labels:
            argv += ["--label", label]
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=home, env=env)
        started.append(process)
        deadline = time.monotonic() + 60
        while not re.search(r"listening on \S+\n", log.read_text()):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _client(postgres_url: str, tmp_path: Path) -> JumpStarterProtocol:
    # A node that vanishes is given up on after a second, not the default minute.
    registry = {"options": {"reconnect_timeout": 1}}
    return JumpStarterProtocol(Config.model_validate(
        {"store": postgres_url, "data_dir": str(tmp_path / "client"), "registry": registry}
    ))


def _wait_registered(postgres_url: str, names: set[str]) -> None:
    deadline = time.monotonic() + 30
    while True:
        with psycopg.connect(postgres_url) as db:
            seen = {row[0] for row in db.execute("SELECT name FROM nodes WHERE last_seen > 0")}
        if names <= seen:
            return
        assert time.monotonic() < deadline, f"registered: {seen}"
        time.sleep(0.05)


def test_twenty_clients_three_agents_by_label(lab, postgres_url: str, tmp_path: Path) -> None:
    lab("rpi-a", "board=rpi4", "site=lab1")
    lab("rpi-b", "board=rpi4", "site=lab2")
    lab("x86-a", "board=x86", "site=lab1")
    _wait_registered(postgres_url, {"rpi-a", "rpi-b", "x86-a"})
    protocol = _client(postgres_url, tmp_path)
    ran_on: dict[int, str] = {}

    async def one_client(i: int) -> None:
        await anyio.sleep(i * 0.02)
        selector = {"board": "rpi4"} if i % 2 else {"site": "lab1"}
        async with protocol.create_async_session(f"client{i}") as session:
            node = await session.connect(select=selector, wait=120)
            task = await node.start(["sh", "-c", "echo ran; sleep 0.1"])
            info = await task.wait()
            assert info.state is TaskState.SUCCEEDED
            await session.add_result(task.id, name=f"client/{i}", outcome="passed")
            ran_on[i] = node.name

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one_client, i)

    anyio.run(main)
    assert sorted(ran_on) == list(range(20))  # every client served
    assert all(ran_on[i] in ("rpi-a", "rpi-b") for i in range(1, 20, 2))
    assert all(ran_on[i] in ("rpi-a", "x86-a") for i in range(0, 20, 2))
    with psycopg.connect(postgres_url) as db:
        leases = db.execute(
            "SELECT node, since, ended_at, request_id, session_name FROM leases"
            " WHERE session_name LIKE 'client%%' ORDER BY id"
        ).fetchall()
        # The schema refuses a second live lease on a node...
        index = db.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'leases_one_live_per_node'").fetchone()
    assert index is not None and "UNIQUE" in index[0] and "WHERE (ended_at IS NULL)" in index[0]
    # ...and no node was ever held by two sessions at once.
    for node in ("rpi-a", "rpi-b", "x86-a"):
        spans = sorted((since, ended) for name, since, ended, *_ in leases if name == node)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end is not None and end <= start
    # First come, first served: among clients asking for the same labels, leases went
    # out in the order the requests came (a request another node can serve may pass).
    assert len(leases) == 20
    for parity in (0, 1):
        requests = [r for *_, r, session in leases if int(session.removeprefix("client")) % 2 == parity]
        assert requests == sorted(requests)
    # Results from every node are in the one store; a query from anywhere sees them.
    done = run_jmp("result", "query", "--name", "client/*", "--format", "json",
                   env={**os.environ, "JMP_STORE": postgres_url, "JMP_DATA_DIR": str(tmp_path / "elsewhere")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('"name": "client/') == 20
    listing = run_jmp("node", "list", env={**os.environ, "JMP_STORE": postgres_url})
    assert listing.returncode == 0, listing.stderr
    assert [line.split()[:2] for line in listing.stdout.splitlines()[1:]] == [
        ["rpi-a", "free"], ["rpi-b", "free"], ["x86-a", "free"],
    ]


def test_jmp_run_select_and_busy_nodes(lab, postgres_url: str, tmp_path: Path) -> None:
    lab("only", "board=rpi4")
    _wait_registered(postgres_url, {"only"})
    env = {**os.environ, **FAST, "JMP_STORE": postgres_url, "JMP_DATA_DIR": str(tmp_path / "cli")}
    done = run_jmp("run", "--select", "board=rpi4", "--", "echo", "hello from only", env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello from only\n", "")
    holder = subprocess.Popen([JMP, "run", "--select", "board=rpi4", "--", "sleep", "30"], env=env)
    try:
        deadline = time.monotonic() + 30
        while "leased" not in run_jmp("node", "list", env=env).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        busy = run_jmp("run", "--select", "board=rpi4", "--", "true", env=env)
        assert busy.returncode == 4
        assert busy.stderr == "jmp: error: no free node matches board=rpi4: only (leased)\n"
        none = run_jmp("run", "--select", "board=riscv", "--", "true", env=env)
        assert (none.returncode, none.stderr) == (3, "jmp: error: no node matches board=riscv\n")
        leases = run_jmp("lease", "list", env=env)
        assert "only" in leases.stdout and "run (" in leases.stdout
        released = run_jmp("lease", "release", "only", env=env)
        assert released.returncode == 0 and released.stdout.startswith("released lease ")
    finally:
        holder.send_signal(signal.SIGINT)
        holder.wait(30)
    bad = run_jmp("run", "--select", "board", "--", "true", env=env)
    assert (bad.returncode, bad.stderr) == (2, "jmp: error: Invalid value for --select: expected K=V, got 'board' (try 'jmp run --help')\n")


def test_a_killed_agent_goes_offline_its_lease_ends_its_tasks_are_lost(lab, postgres_url: str, tmp_path: Path) -> None:
    agent = lab("doomed", "board=rpi4")
    _wait_registered(postgres_url, {"doomed"})
    protocol = _client(postgres_url, tmp_path)

    async def main() -> None:
        async with protocol.create_async_session("victim") as session:
            node = await session.connect(select={"board": "rpi4"})
            task = await node.start(["sleep", "60"])
            await session.add_result(task.id, name="before/kill", outcome="passed")
            agent.send_signal(signal.SIGKILL)
            agent.wait()
            killed = time.monotonic()
            from jumpstarter.store import open_store
            from jumpstarter.store.registry import NodeRegistry

            store = open_store(postgres_url)
            await store.open()
            try:
                registry = NodeRegistry(store)
                while (await registry.node("doomed")).status != "offline":
                    await anyio.sleep(0.1)
                    assert time.monotonic() - killed < 30
                assert await registry.leases() == []
                lost = await store.get_task(task.id)
                data = await store.query_results(QueryResults(task_id=task.id))
            finally:
                await store.aclose()
            assert lost.state is TaskState.LOST and lost.message == "the node went offline"
            assert [r.name for r in data.results] == ["before/kill"]

    anyio.run(main)


def test_a_killed_select_client_loses_its_lease_within_the_heartbeat_timeout(
    lab, postgres_url: str, tmp_path: Path
) -> None:
    # The node's connection to the killed client lives on until its gRPC keep-alive
    # (30 s) runs out; the lease must not: the client alone keeps it alive.
    lab("kept", "board=rpi4")
    _wait_registered(postgres_url, {"kept"})
    env = {**os.environ, **FAST, "JMP_STORE": postgres_url, "JMP_DATA_DIR": str(tmp_path / "cli")}
    holder = subprocess.Popen(
        [JMP, "run", "--select", "board=rpi4", "--", "sleep", "60"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with psycopg.connect(postgres_url, autocommit=True) as db:
            def live() -> list[tuple[int, str]]:
                return db.execute("SELECT id, end_reason FROM leases WHERE ended_at IS NULL").fetchall()

            deadline = time.monotonic() + 30
            while not (live() and db.execute("SELECT 1 FROM tasks WHERE state = 'running'").fetchone()):
                assert holder.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            (lease_id, _), = live()
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            # A bound far below the node's 30 s keep-alive, not a timing claim.
            deadline = time.monotonic() + 15
            while live():
                assert time.monotonic() < deadline, "the lease outlived its client's heartbeats"
                time.sleep(0.1)
            reason = db.execute("SELECT end_reason FROM leases WHERE id = %s", (lease_id,)).fetchone()[0]
        assert reason is not None and reason != "released"
        # The lease is gone, but its task runs on: the board is handed to no one
        # until that task has ended (the lab rule), and says why.
        again = run_jmp("run", "--select", "board=rpi4", "--", "echo", "free again", env=env)
        assert (again.returncode, again.stderr) == (
            4, "jmp: error: no free node matches board=rpi4: kept (draining)\n"
        )
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
