"""``jmp task``: detached tasks reached from other processes, and every subcommand's
output and bad input, through click's runner and through the real ``jmp``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from contextlib import closing, suppress
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import JMP, invoke_jmp, pid_alive, run_jmp
from jumpstarter.cli import cli
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import TaskState


def store_rows(data_dir: Path) -> dict[str, list[tuple]]:
    """Every task and result in the store (none if there is no store yet)."""
    path = data_dir / "jumpstarter.db"
    if not path.exists():
        return {"tasks": [], "results": []}
    with closing(sqlite3.connect(path)) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall() for table in ("tasks", "results")
        }


def agent_pid(data_dir: Path, task_id: str) -> int:
    """The pid of the agent running a detached task, as it registered itself."""
    return int((data_dir / "agents" / f"{task_id}.agent").read_text().rpartition(":")[2])


def task_pid(data_dir: Path, task_id: str) -> int | None:
    with closing(sqlite3.connect(data_dir / "jumpstarter.db")) as db:
        return db.execute("SELECT pid FROM tasks WHERE id = ?", (task_id,)).fetchone()[0]


def wait_until(condition, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def cleanup(data_dir: Path):
    """Kill whatever a detached task left behind (agent, task group), even when a
    test fails halfway."""
    task_ids: list[str] = []
    yield task_ids
    for task_id in task_ids:
        with suppress(OSError, ValueError, TypeError, sqlite3.Error):
            pid = task_pid(data_dir, task_id)
            if pid and pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)
        with suppress(OSError, ValueError):
            os.kill(agent_pid(data_dir, task_id), signal.SIGKILL)


# --- detached tasks ------------------------------------------------------------------------


STOPPABLE = 'trap "echo got TERM; exit 0" TERM; echo ready; echo to-stderr >&2; sleep 60 & wait'


def test_start_follow_and_stop_from_three_processes(data_dir: Path, cleanup: list[str]) -> None:
    started = run_jmp("task", "start", "--name", "soak", "--", "sh", "-c", STOPPABLE)
    assert (started.returncode, started.stderr) == (0, "")
    task_id = started.stdout.strip()
    assert started.stdout == f"{task_id}\n"
    cleanup.append(task_id)
    agent = agent_pid(data_dir, task_id)
    assert pid_alive(agent)

    follower = subprocess.Popen(
        [JMP, "task", "logs", "--follow", task_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert follower.stdout.readline() == b"ready\n"  # it follows, live
        status = run_jmp("task", "status", "--format", "json", task_id)
        assert json.loads(status.stdout)["state"] == "running"
        stopped = run_jmp("task", "stop", "--grace", "5", task_id)
        assert (stopped.returncode, stopped.stdout, stopped.stderr) == (0, f"{task_id} stopped (exit 0)\n", "")
        rest, errors = follower.communicate(timeout=30)
    finally:
        follower.kill()
        follower.wait()
        follower.stdout.close()
        follower.stderr.close()
    assert follower.returncode == 0
    assert rest == b"got TERM\n" and errors == b"to-stderr\n"
    again = run_jmp("task", "logs", task_id)  # the whole output, once more, from a fourth process
    assert (again.stdout, again.stderr) == ("ready\ngot TERM\n", "to-stderr\n")
    info = json.loads(run_jmp("task", "status", "--format", "json", task_id).stdout)
    assert (info["state"], info["exit_code"], info["name"]) == ("stopped", 0, "soak")
    assert wait_until(lambda: not pid_alive(agent))
    assert list((data_dir / "agents").iterdir()) == []


def test_wait_from_another_process_exits_with_the_task_code(data_dir: Path, cleanup: list[str]) -> None:
    runner = CliRunner()
    task_id = runner.invoke(cli, ["task", "start", "--shell", "--", "sleep 0.3; echo out; exit 7"]).stdout.strip()
    cleanup.append(task_id)
    waited = run_jmp("task", "wait", task_id)
    assert (waited.returncode, waited.stdout, waited.stderr) == (7, f"{task_id} failed (exit 7)\n", "")
    assert runner.invoke(cli, ["task", "logs", task_id]).stdout == "out\n"


def test_a_task_runs_in_the_starters_directory(data_dir: Path, tmp_path: Path, cleanup: list[str]) -> None:
    (tmp_path / "sub").mkdir()
    runner = CliRunner()
    here = runner.invoke(cli, ["task", "start", "--", "pwd"]).stdout.strip()
    below = runner.invoke(cli, ["task", "start", "--cwd", "sub", "--", "pwd"]).stdout.strip()
    cleanup += [here, below]
    for task_id, directory in ((here, tmp_path), (below, tmp_path / "sub")):
        assert runner.invoke(cli, ["task", "wait", task_id]).exit_code == 0
        assert runner.invoke(cli, ["task", "logs", task_id]).stdout == f"{directory}\n"


def test_new_then_start_a_pending_task(data_dir: Path, cleanup: list[str]) -> None:
    runner = CliRunner()
    created = runner.invoke(cli, ["task", "new", "--env", "WHO=there", "--", "sh", "-c", "echo hi $WHO"])
    task_id = created.stdout.strip()
    cleanup.append(task_id)
    assert (created.exit_code, created.stdout) == (0, f"{task_id}\n")
    status = runner.invoke(cli, ["task", "status", task_id])
    assert [line.split() for line in status.stdout.splitlines()[:3]] == [["task", task_id], ["state", "pending"], ["exit", "-"]]
    started = runner.invoke(cli, ["task", "start", task_id])
    assert (started.exit_code, started.stdout) == (0, f"{task_id}\n")
    waited = runner.invoke(cli, ["task", "wait", task_id])
    assert (waited.exit_code, waited.stdout) == (0, f"{task_id} succeeded (exit 0)\n")
    assert runner.invoke(cli, ["task", "logs", task_id]).stdout == "hi there\n"
    again = runner.invoke(cli, ["task", "start", task_id])
    assert (again.exit_code, again.stderr) == (
        4, f"jmp: error: task {task_id} is succeeded, not pending; it cannot start again\n"
    )


def test_a_command_that_does_not_exist_leaves_the_store_as_it_was(data_dir: Path) -> None:
    pending = run_jmp("task", "new", "--", "no-such-command").stdout.strip()
    before = store_rows(data_dir)
    for args in (["--", "no-such-command"], [pending]):
        done = run_jmp("task", "start", *args)
        assert (done.returncode, done.stdout, done.stderr) == (127, "", "jmp: error: command not found: no-such-command\n")
        assert store_rows(data_dir) == before  # the pending task is still pending, no new one
    assert list((data_dir / "agents").iterdir()) == []


def test_detach_in_python_outlives_the_session(protocol: JumpStarterProtocol, data_dir: Path, cleanup: list[str]) -> None:
    with protocol.create_session("starter") as session:
        node = session.connect()
        task = node.start(["sh", "-c", STOPPABLE], detach=True)
        cleanup.append(task.id)
        pending = node.new_task(["echo", "later"])
        cleanup.append(pending.id)
        assert pending.start(detach=True) is pending
    # The session has closed; the detached task runs on, and another session stops it.
    with protocol.create_session("stopper") as session:
        node = session.connect()
        assert node.task(task.id).status().state is TaskState.RUNNING
        final = node.task(task.id).stop(grace=5)
        assert (final.state, final.exit_code) == (TaskState.STOPPED, 0)
        chunks = list(node.task(task.id).output())
        assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"ready\ngot TERM\n"
        assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"to-stderr\n"
        assert node.task(pending.id).wait(timeout=30).state is TaskState.SUCCEEDED


def test_a_stop_with_no_grace_kills_a_task_that_ignores_sigterm(data_dir: Path, cleanup: list[str]) -> None:
    runner = CliRunner()
    script = "trap '' TERM; echo ready; while :; do sleep 0.05; done"
    task_id = runner.invoke(cli, ["task", "start", "--shell", "--", script]).stdout.strip()
    cleanup.append(task_id)
    assert wait_until(lambda: runner.invoke(cli, ["task", "logs", task_id]).stdout == "ready\n")
    stopped = runner.invoke(cli, ["task", "stop", "--grace", "0", "--format", "json", task_id])
    info = json.loads(stopped.stdout)
    assert (info["state"], info["exit_code"]) == ("stopped", -9)


def test_a_killed_agent_leaves_a_lost_task_not_a_wait_forever(data_dir: Path, cleanup: list[str]) -> None:
    runner = CliRunner()
    task_id = runner.invoke(cli, ["task", "start", "--shell", "--", "echo ready; exec sleep 60"]).stdout.strip()
    cleanup.append(task_id)
    follower = subprocess.Popen([JMP, "task", "logs", "--follow", task_id], stdout=subprocess.PIPE)
    try:
        assert follower.stdout.readline() == b"ready\n"  # following, in its polling loop
        os.kill(agent_pid(data_dir, task_id), signal.SIGKILL)
        assert follower.wait(timeout=30) == 0
    finally:
        follower.kill()
        follower.wait()
        follower.stdout.close()
    waited = runner.invoke(cli, ["task", "wait", task_id])
    assert (waited.exit_code, waited.stdout) == (1, f"{task_id} lost\n")
    info = json.loads(runner.invoke(cli, ["task", "status", "--format", "json", task_id]).stdout)
    assert (info["state"], info["message"]) == ("lost", "the node agent went away")


# --- listing and output shapes ---------------------------------------------------------------


def test_list_filters_and_json(data_dir: Path, cleanup: list[str]) -> None:
    runner = CliRunner()
    first = runner.invoke(cli, ["task", "new", "--session", "alpha", "--name", "one", "--", "true"]).stdout.strip()
    second = runner.invoke(cli, ["task", "new", "--session", "beta", "--", "echo", "two words"]).stdout.strip()
    cleanup += [first, second]
    runner.invoke(cli, ["task", "stop", first])
    listed = runner.invoke(cli, ["task", "list"])
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "NODE", "STATE", "EXIT", "CREATED", "NAME", "COMMAND"]
    assert lines[1].startswith(f"{second}  local  pending  ") and lines[1].endswith("echo 'two words'")
    assert lines[2].startswith(f"{first}  local  stopped  ") and lines[2].endswith("one   true")
    doc = json.loads(runner.invoke(cli, ["task", "list", "--session", "alpha", "--format", "json"]).stdout)
    assert [t["id"] for t in doc["tasks"]] == [first]
    assert set(doc["tasks"][0]) == {
        "id", "node", "session_id", "name", "spec", "state", "exit_code", "message",
        "created_at", "started_at", "finished_at",
    }
    pending = runner.invoke(cli, ["task", "list", "--state", "pending", "--format", "json"]).stdout
    assert [t["id"] for t in json.loads(pending)["tasks"]] == [second]
    assert runner.invoke(cli, ["task", "list", "--session", "nobody"]).stdout == ""


def test_logs_as_json_lines_resume_from_an_offset(data_dir: Path, cleanup: list[str]) -> None:
    import base64

    runner = CliRunner()
    task_id = runner.invoke(cli, ["task", "start", "--shell", "--", "printf abc; printf DE >&2; printf f"]).stdout.strip()
    cleanup.append(task_id)
    runner.invoke(cli, ["task", "wait", task_id])
    out = runner.invoke(cli, ["task", "logs", "--format", "json", task_id]).stdout
    *chunks, end = [json.loads(line) for line in out.splitlines()]
    assert {c["type"] for c in chunks} == {"output_chunk"}
    assert (end["type"], end["offset"], end["state"], end["exit_code"]) == ("output_end", 6, "succeeded", 0)
    data = [(c["offset"], c["stream"], base64.b64decode(c["data"])) for c in chunks]
    assert [offset for offset, _, _ in data] == [0, *(o + len(d) for o, _, d in data[:-1])]  # contiguous
    assert b"".join(d for _, s, d in data if s == "stdout") == b"abcf"
    assert b"".join(d for _, s, d in data if s == "stderr") == b"DE"
    # Resuming at offset 4 gives exactly the bytes from there, each on its stream.
    rest = [(s, d[max(0, 4 - o):]) for o, s, d in data if o + len(d) > 4]
    resumed = runner.invoke(cli, ["task", "logs", "--from-offset", "4", task_id])
    assert resumed.stdout == b"".join(d for s, d in rest if s == "stdout").decode()
    assert resumed.stderr == b"".join(d for s, d in rest if s == "stderr").decode()


# --- bad input -------------------------------------------------------------------------------





NOT_FOUND = "jmp: error: no task with id 'nope'\n"
NO_NODE = "jmp: error: unknown node 'nowhere'; known nodes: local\n"


@pytest.mark.parametrize("how", ["runner", "process"])
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["task", "status", "nope"], 3, NOT_FOUND),
        (["task", "wait", "nope"], 3, NOT_FOUND),
        (["task", "logs", "--follow", "nope"], 3, NOT_FOUND),
        (["task", "stop", "nope"], 3, NOT_FOUND),
        (["task", "start", "nope"], 3, NOT_FOUND),
        (["task", "status", "--node", "nowhere", "x"], 3, NO_NODE),
        (["task", "start", "--node", "nowhere", "--", "true"], 3, NO_NODE),
        (["task", "list", "--node", "nowhere"], 3, NO_NODE),
        (["task", "start", "--cwd", "/no/such", "--", "true"], 2, "jmp: error: working directory does not exist: /no/such\n"),
        (["task", "list", "--format", "xml"], 2, "Error: Invalid value for '-o' / '--format': 'xml' is not one of 'table', 'json'.\n"),
        (["task", "list", "--state", "done"], 2, None),
        (["task", "start", "--timeout", "inf", "--", "true"], 2, "Error: Invalid value for '-t' / '--timeout': 'inf' is not a number of seconds above 0\n"),
        (["task", "start", "--env", "X", "--", "true"], 2, "Error: Invalid value for --env: expected K=V, got 'X'\n"),
        (["task", "start", "--name", "x", "abc"], 2, "Error: a pending task has its spec already; the task options go with '-- COMMAND...'\n"),
        (["task", "stop", "--grace", "-1", "x"], 2, None),
        (["task", "new"], 2, "Error: Missing argument 'COMMAND...'.\n"),
    ],
)
def test_bad_input(data_dir: Path, how: str, args: list[str], code: int, message: str | None) -> None:
    before = store_rows(data_dir)
    got_code, stdout, stderr = invoke_jmp(how, args)
    assert (got_code, stdout) == (code, "")
    if message is None or message.startswith("Error: "):  # a usage error: one line
        hint = f" (try 'jmp task {args[1]} --help')\n"
        assert stderr.startswith("jmp: error: ") and stderr.endswith(hint) and stderr.count("\n") == 1
        if message is not None:
            assert stderr == "jmp: error: " + message.removeprefix("Error: ").removesuffix("\n") + hint
    else:
        assert stderr == message
    assert store_rows(data_dir) == before


def test_an_unreadable_config_is_one_line(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "jumpstarter.toml").write_text("[nodes\n")
    for how in ("runner", "process"):
        code, stdout, stderr = invoke_jmp(how, ["task", "list"])
        assert (code, stdout) == (1, "")
        assert stderr.startswith("jmp: error: jumpstarter.toml: invalid TOML: ") and stderr.count("\n") == 1
    assert not (data_dir / "jumpstarter.db").exists()


def test_logs_as_json_are_standard_base64_of_any_bytes(data_dir: Path, cleanup: list[str]) -> None:
    # Random bytes hold every value, so URL-safe base64 ('-' and '_' for '+' and '/')
    # would be misread by a standard, validating decoder.
    import base64
    import binascii
    import random

    payload = random.Random(17).randbytes(3000)
    (data_dir.parent / "blob").write_bytes(payload)
    runner = CliRunner()
    task_id = runner.invoke(cli, ["task", "start", "--", "cat", str(data_dir.parent / "blob")]).stdout.strip()
    cleanup.append(task_id)
    runner.invoke(cli, ["task", "wait", task_id])
    out = run_jmp("task", "logs", "--format", "json", task_id).stdout
    *chunks, end = [json.loads(line) for line in out.splitlines()]
    try:
        got = b"".join(base64.b64decode(c["data"], validate=True) for c in chunks)
    except binascii.Error as exc:
        raise AssertionError(f"not standard base64: {exc}") from None
    assert got == payload and end["offset"] == len(payload)
    assert any(ch in c["data"] for c in chunks for ch in "+/")
