"""A task whose agent died is lost AND stopped (its process group killed, never a
stranger's), and bad input leaves the store exactly as it was: no stray session.

Everything runs for real: ``jmp`` subprocesses, detached agents, ``jmp node serve``,
SQLite files in tmp dirs; every process a test starts is killed at its end."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path

import pytest
from conftest import JMP, pid_alive, run_jmp
from jumpstarter.errors import SpawnFailed
from jumpstarter.node.agent import kill_left_behind
from jumpstarter.protocol import JumpStarterProtocol


def store_rows(data_dir: Path) -> dict[str, list[tuple]]:
    """Every session, task and result in the store."""
    with closing(sqlite3.connect(data_dir / "jumpstarter.db")) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
            for table in ("sessions", "tasks", "results")
        }


def task_pid(data_dir: Path, task_id: str) -> int:
    with closing(sqlite3.connect(data_dir / "jumpstarter.db")) as db:
        return db.execute("SELECT pid FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def wait_until(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def groups() -> Iterator[list[int]]:
    """Process groups (and single processes) to kill at the end, even when a test
    fails halfway."""
    pgids: list[int] = []
    yield pgids
    for pgid in pgids:
        with suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
        with suppress(OSError):
            os.kill(pgid, signal.SIGKILL)


# --- 1. a lost task is killed ------------------------------------------------------------


# A group of three: the shell leads it, two sleeps follow.
GROUP = "sleep 15 & sleep 15 & echo ready; wait"


def test_a_detached_task_whose_agent_was_killed_is_lost_and_killed(data_dir: Path, groups: list[int]) -> None:
    started = run_jmp("task", "start", "--shell", "--", GROUP)
    assert (started.returncode, started.stderr) == (0, "")
    task_id = started.stdout.strip()
    pid = task_pid(data_dir, task_id)
    agent = int((data_dir / "agents" / f"{task_id}.agent").read_text().rpartition(":")[2])
    groups += [pid, agent]
    assert wait_until(lambda: len(group_members(pid)) == 3)

    os.kill(agent, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(agent))
    assert len(group_members(pid)) == 3  # nothing has noticed yet: the task runs on

    stopped = run_jmp("task", "stop", "--grace", "0", task_id)
    assert (stopped.returncode, stopped.stdout, stopped.stderr) == (0, f"{task_id} lost\n", "")
    assert wait_until(lambda: group_members(pid) == [])
    status = json.loads(run_jmp("task", "status", "--format", "json", task_id).stdout)
    assert (status["state"], status["message"]) == ("lost", "the node agent went away")


def test_a_follower_that_finds_the_agent_dead_kills_the_task_too(data_dir: Path, groups: list[int]) -> None:
    started = run_jmp("task", "start", "--shell", "--", GROUP)
    task_id = started.stdout.strip()
    pid = task_pid(data_dir, task_id)
    agent = int((data_dir / "agents" / f"{task_id}.agent").read_text().rpartition(":")[2])
    groups += [pid, agent]
    follower = subprocess.Popen([JMP, "task", "logs", "--follow", task_id], stdout=subprocess.PIPE)
    try:
        assert follower.stdout.readline() == b"ready\n"  # following, in its polling loop
        os.kill(agent, signal.SIGKILL)
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
        follower.wait()
        follower.stdout.close()
    assert wait_until(lambda: group_members(pid) == [])


@pytest.fixture
def serve(data_dir: Path, tmp_path: Path) -> Iterator:
    """Start ``jmp node serve`` (node ``lab1``) processes; all are killed at the end."""
    started: list[subprocess.Popen[bytes]] = []
    workdir = tmp_path / "agent"  # not the test's cwd: the agent reads no client config
    workdir.mkdir(exist_ok=True)

    def start(listen: str = "127.0.0.1:0") -> tuple[subprocess.Popen[bytes], str]:
        log = tmp_path / f"serve-{len(started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [JMP, "node", "serve", "--listen", listen, "--name", "lab1"],
                stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
            )
        started.append(process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = re.search(r"listening on (\S+)\n", log.read_text())
            if match:
                return process, match.group(1)
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"jmp node serve did not say where it listens: {log.read_text()}")

    try:
        yield start
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_a_node_serve_agent_killed_and_restarted_kills_the_lost_task(
    data_dir: Path, tmp_path: Path, serve, groups: list[int]
) -> None:
    process, url = serve()
    (tmp_path / "jumpstarter.toml").write_text(f'[nodes.lab1]\ntransport = "grpc"\nendpoint = "{url}"\n')
    started = run_jmp("task", "start", "--node", "lab1", "--shell", "--", GROUP)
    assert (started.returncode, started.stderr) == (0, "")
    task_id = started.stdout.strip()
    pid = task_pid(data_dir, task_id)
    groups.append(pid)
    assert wait_until(lambda: len(group_members(pid)) == 3)

    process.kill()
    process.wait()
    assert len(group_members(pid)) == 3  # the task outlived its agent
    serve(listen=url.rpartition("/")[2])  # the same port: the config still names it
    assert wait_until(lambda: group_members(pid) == [])
    stopped = run_jmp("task", "stop", "--node", "lab1", task_id)
    assert (stopped.returncode, stopped.stdout, stopped.stderr) == (0, f"{task_id} lost\n", "")


# --- 2. a zombie agent is a dead agent ----------------------------------------------------


ZOMBIE = """
import os
from jumpstarter.protocol import JumpStarterProtocol
session = JumpStarterProtocol().create_session("doomed").__enter__()
task = session.connect().start(["sh", "-c", "sleep 15 & wait"])
print(task.id, flush=True)
os._exit(0)  # dies without cleaning up; its parent (the test) does not reap it yet
"""


def test_a_zombie_agent_does_not_keep_its_task_running(data_dir: Path, groups: list[int]) -> None:
    agent = subprocess.Popen([sys.executable, "-c", ZOMBIE], stdout=subprocess.PIPE, text=True)
    try:
        task_id = agent.stdout.readline().strip()
        pid = task_pid(data_dir, task_id)
        groups.append(pid)
        # A zombie until reaped: it exists for kill(pid, 0), but runs nothing.
        assert wait_until(lambda: not pid_alive(agent.pid))
        assert os.path.exists(f"/proc/{agent.pid}")
        assert group_members(pid) != []
        status = run_jmp("task", "status", "--format", "json", task_id)
        assert json.loads(status.stdout)["state"] == "lost"
        assert wait_until(lambda: group_members(pid) == [])
    finally:
        agent.kill()
        agent.wait()
        agent.stdout.close()


# --- the pid-reuse guard ---------------------------------------------------------------


def test_only_a_group_leader_that_started_before_the_task_is_killed(groups: list[int]) -> None:
    before = time.time()
    leader = subprocess.Popen(["sleep", "15"], start_new_session=True)
    loner = subprocess.Popen(["sleep", "15"])  # in the test's own process group
    groups += [leader.pid, loner.pid]
    try:
        # Started well after the "task" did: a process that reused its pid.
        assert kill_left_behind(leader.pid, before - 60) is False
        assert kill_left_behind(loner.pid, time.time()) is False  # leads no group
        assert leader.poll() is None and loner.poll() is None
        assert kill_left_behind(leader.pid, time.time()) is True
        assert leader.wait(timeout=10) == -signal.SIGKILL
    finally:
        for process in (leader, loner):
            process.kill()
            process.wait()
    assert kill_left_behind(leader.pid, time.time()) is False  # gone


# --- 4. bad input leaves the store as it was ----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "args", "code", "message"),
    [
        ("task start", ["--", "nosuch-command"], 127, "command not found: nosuch-command"),
        ("task start", ["--cwd", "/nope", "--", "true"], 2, "working directory does not exist: /nope"),
        ("task new", ["--cwd", "/nope", "--", "true"], 2, "working directory does not exist: /nope"),
        ("run", ["--", "nosuch-command"], 127, "command not found: nosuch-command"),
        ("run", ["--cwd", "/nope", "--", "true"], 2, "working directory does not exist: /nope"),
    ],
)
def test_bad_input_leaves_no_session_task_or_result(
    data_dir: Path, command: str, args: list[str], code: int, message: str
) -> None:
    assert run_jmp("run", "--session", "kept", "--", "true").returncode == 0
    before = store_rows(data_dir)
    # A new session (named or not), and one that has a task already.
    for session in ([], ["--session", "fresh"], ["--session", "kept"]):
        done = run_jmp(*command.split(), *session, *args)
        assert (done.returncode, done.stdout, done.stderr) == (code, "", f"jmp: error: {message}\n")
        assert store_rows(data_dir) == before


@pytest.mark.anyio
@pytest.mark.parametrize("detach", [False, True])
async def test_a_failed_start_then_a_good_one_records_the_session_again(
    protocol: JumpStarterProtocol, data_dir: Path, detach: bool
) -> None:
    async with protocol.create_async_session("retry") as session:
        node = await session.connect()
        with pytest.raises(SpawnFailed):
            await node.start(["nosuch-command"], detach=detach)
        assert store_rows(data_dir)["sessions"] == []
        task = await node.start(["true"], detach=detach)
        assert (await task.wait()).state == "succeeded"
    rows = store_rows(data_dir)
    assert [(row[0], row[1]) for row in rows["sessions"]] == [(session.id, "retry")]
    assert [row[0] for row in rows["tasks"]] == [task.id]
