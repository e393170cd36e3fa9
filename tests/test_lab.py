"""The lab as one system (issue 12): every node and task reached by name or id alone,
wherever it is described. Real ``jmp node serve`` agents on the real PostgreSQL
server, real ``jmp`` clients with data dirs of their own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import JMP, run_jmp
from jumpstarter.cli import cli
from stores import postgres_url  # noqa: F401  (fixture)
from test_grpc import agents  # noqa: F401  (fixture)
from test_many_machines import FAST, _wait_registered, lab  # noqa: F401  (fixture)


def _ci(tmp_path: Path, postgres_url: str, extra: str = "") -> dict[str, str]:
    """The environment of a CI machine: the shared store, a data dir and a config of
    its own (a node that vanishes is given up on after a second)."""
    home = tmp_path / "ci"
    home.mkdir(exist_ok=True)
    config = home / "jumpstarter.toml"
    config.write_text(f"[registry]\noptions = {{ reconnect_timeout = 1 }}\n{extra}")
    return {**os.environ, **FAST, "JMP_STORE": postgres_url, "JMP_DATA_DIR": str(home), "JMP_CONFIG": str(config)}


def _until(check, what: str, patience: float = 30) -> None:
    deadline = time.monotonic() + patience
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_a_token_only_entry_without_a_registry_is_refused_naming_file_and_key(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "jumpstarter.toml").write_text('[nodes.rpi-c]\ntoken_file = "c.token"\n')
    result = CliRunner().invoke(cli, ["run", "--node", "rpi-c", "--", "touch", str(tmp_path / "ran-here")])
    assert result.exit_code == 1
    assert result.stderr == (
        "jmp: error: jumpstarter.toml: nodes.rpi-c: no transport, endpoint or driver of its own, and the store is "
        "not a shared postgresql:// store whose registry could say where it is\n"
    )
    assert not (tmp_path / "ran-here").exists()  # never run locally
    assert not (data_dir / "jumpstarter.db").exists()  # nothing recorded


def test_a_token_only_entry_is_completed_from_the_registry(lab, postgres_url: str, tmp_path: Path) -> None:
    token = tmp_path / "c.token"
    token.write_text("rpi-c-secret\n")
    token.chmod(0o600)
    lab("rpi-c", "site=lab2", args=("--token-file", str(token)))
    _wait_registered(postgres_url, {"rpi-c"})
    env = _ci(tmp_path, postgres_url, f'[nodes.rpi-c]\ntoken_file = "{token}"\n')
    done = run_jmp("run", "--node", "rpi-c", "--", "sh", "-c", 'echo "$JMP_DATA_DIR"; pwd', env=env, cwd=tmp_path / "ci")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'rpi-c'}\n{tmp_path / 'rpi-c'}\n"  # the agent's host, not the CI's
    # The registry's credentials are the [registry] section's; without the entry's token: refused.
    plain = _ci(tmp_path, postgres_url)
    refused = run_jmp("run", "--node", "rpi-c", "--", "true", env=plain, cwd=tmp_path / "ci")
    assert refused.returncode == 5 and "token" in refused.stderr, refused.stderr
    unknown = run_jmp("run", "--node", "rpi-z", "--", "true", env=plain, cwd=tmp_path / "ci")
    assert (unknown.returncode, unknown.stderr) == (
        3, f"jmp: error: unknown node 'rpi-z' in {tmp_path / 'ci' / 'jumpstarter.toml'}; known nodes: local\n"
    )


def test_any_task_by_id_from_a_third_machine(lab, postgres_url: str, tmp_path: Path) -> None:
    lab("rpi-a", "board=rpi4")
    agent = lab("rpi-b", "board=rpi4")
    _wait_registered(postgres_url, {"rpi-a", "rpi-b"})
    env = _ci(tmp_path, postgres_url)
    ci = {"env": env, "cwd": tmp_path / "ci"}
    started = run_jmp("task", "start", "--node", "rpi-b", "--", "sh", "-c", "echo hello from rpi-b; sleep 30", **ci)
    assert started.returncode == 0, started.stderr
    task_id = started.stdout.strip()
    _until(lambda: run_jmp("task", "logs", task_id, **ci).stdout == "hello from rpi-b\n", "logs")
    by_name = run_jmp("task", "logs", "--node", "rpi-b", task_id, **ci)
    assert (by_name.returncode, by_name.stdout) == (0, "hello from rpi-b\n"), by_name.stderr
    status = run_jmp("task", "status", task_id, **ci)
    assert status.returncode == 0, status.stderr
    assert "state     running" in status.stdout and "node      rpi-b" in status.stdout, status.stdout
    stopped = run_jmp("task", "stop", task_id, **ci)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    waited = run_jmp("task", "wait", "--node", "rpi-b", task_id, **ci)
    assert waited.returncode == 128 + signal.SIGTERM, waited.stderr
    # The node goes away: the output is there, and the client says so.
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    _until(lambda: "rpi-b  offline" in run_jmp("node", "list", env=env).stdout, "offline")
    gone = run_jmp("task", "logs", task_id, **ci)
    assert gone.returncode == 5
    assert gone.stderr.startswith(f"jmp: error: the output of task {task_id} is on node 'rpi-b', offline since 20")
    assert gone.stdout == ""
    status = run_jmp("task", "status", task_id, **ci)
    assert status.returncode == 5 and status.stderr.startswith(f"jmp: error: task {task_id} is on node 'rpi-b', offline since")


# --- a board is never handed on under a running task of another session ----------------------

# Each task takes the board by creating MARK with O_EXCL (the shell's noclobber); the
# first lets go of it only as it ends. Had the second started while the first ran,
# it would find MARK there and say OVERLAP.
FIRST = 'set -C; : > "$MARK" || exit 99; trap \'rm -f "$MARK"; exit 143\' TERM; {hold}; rm -f "$MARK"'
HOLD_LONG = "sleep 30 & wait $!"
HOLD_UNTIL_GO = 'until [ -e "$MARK.go" ]; do sleep 0.1; done'  # the test says when it may end
SECOND = 'set -C; : > "$MARK" || {{ echo OVERLAP; exit 99; }}; rm -f "$MARK"; echo second'


def _task(script: str, env: dict[str, str], **values: object) -> str:
    # The task runs on the node, with the node's environment: the path goes in the script.
    return f'MARK="{env["MARK"]}"; ' + script.format(**values)


@pytest.fixture(params=["memory", "registry"])
def board(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """One node, ``lab1``, served by a ``jmp node serve`` agent whose clients lose
    their lease a second after they vanish; the lease kept in the agent's memory
    (its own SQLite store) or in the registry (the PostgreSQL store). Returns the
    CI machine's environment, how to pick the node, and how to read its tasks."""
    if request.param == "memory":
        agent = request.getfixturevalue("agents")("--keepalive", "1")
        home = tmp_path / "ci"
        home.mkdir()
        (home / "jumpstarter.toml").write_text(f'[nodes.lab1]\ntransport = "grpc"\nendpoint = "{agent.url}"\n')
        env = {**os.environ, "JMP_DATA_DIR": str(home), "JMP_CONFIG": str(home / "jumpstarter.toml")}
        env.pop("JMP_STORE", None)
        store = f"sqlite:///{request.getfixturevalue('data_dir') / 'jumpstarter.db'}"
        pick = ["--node", "lab1"]
    else:
        store = request.getfixturevalue("postgres_url")
        request.getfixturevalue("lab")("lab1", "pool=p", args=("--keepalive", "1"))
        _wait_registered(store, {"lab1"})
        env = _ci(tmp_path, store)
        pick = ["--select", "pool=p"]
    env["MARK"] = str(tmp_path / "board-in-use")

    def tasks() -> list[tuple[str, str | None, float, float | None]]:
        """(state, message, started, finished) of every task of lab1, oldest first."""
        sql = "SELECT state, message, started_at, finished_at FROM tasks ORDER BY created_at"
        if store.startswith("sqlite"):
            import sqlite3

            with sqlite3.connect(store.removeprefix("sqlite:///")) as db:
                return db.execute(sql).fetchall()
        import psycopg

        with psycopg.connect(store) as db:
            return db.execute(sql).fetchall()

    return request.param, env, pick, tasks


def _second_waits_its_turn(env: dict[str, str], pick: list[str], tasks, *, let_first_end: bool = False) -> None:
    """A second session asks for the board and waits in line; it runs only after the
    first task has ended (told to, with ``let_first_end``, once the second waits)."""
    second = subprocess.Popen(
        [JMP, "run", *pick, "--wait", "60", "--session", "second", "--", "sh", "-c", _task(SECOND, env)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        if let_first_end:
            _until(lambda: _waiting(env, pick), "the second session waits in line")
            assert second.poll() is None  # the first still runs: the second cannot have
            Path(env["MARK"] + ".go").touch()
        out, err = second.communicate(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
            second.communicate()
    assert (second.returncode, out) == (0, "second\n"), err
    (_, _, _, first_end), (state, _, second_start, _) = tasks()
    assert state == "succeeded" and first_end is not None and first_end <= second_start


def _waiting(env: dict[str, str], pick: list[str]) -> bool:
    """True once the second session is in line: a request in the registry's queue
    (or, for a node's own lease, once it had time to ask: there is nothing to see)."""
    if pick[0] == "--select":
        return "waiting #1" in run_jmp("lease", "list", env=env).stdout
    time.sleep(1)
    return True


def test_a_lease_that_runs_out_stops_its_task_before_the_next_session(board, tmp_path: Path) -> None:
    kind, env, pick, tasks = board
    first = subprocess.Popen(
        [JMP, "run", *pick, "--duration", "2", "--session", "first", "--", "sh", "-c", _task(FIRST, env, hold=HOLD_LONG)],
        env=env,
    )
    try:
        _until(lambda: Path(env["MARK"]).exists(), "the first task took the board")
        _second_waits_its_turn(env, pick, tasks)
        assert first.wait(30) == 143
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    state, message, *_ = tasks()[0]
    assert (state, message) == ("stopped", "the lease of session 'first' ran out")


def test_a_released_lease_lets_its_task_finish_and_the_node_drains(board, tmp_path: Path) -> None:
    kind, env, pick, tasks = board
    node = ["--node", "lab1"]
    started = run_jmp("task", "start", *node, "--session", "first", "--", "sh", "-c", _task(FIRST, env, hold=HOLD_UNTIL_GO), env=env)
    assert started.returncode == 0, started.stderr  # jmp exits: the lease is released
    if kind == "registry":
        listing = run_jmp("node", "list", env=env)
        assert listing.stdout.splitlines()[1].split()[:2] == ["lab1", "draining"], listing.stdout
    busy = run_jmp("run", *pick, "--", "true", env=env)
    expected = {
        "memory": r"jmp: error: node 'lab1' is draining: tasks of session 'first' \(\w+\) still run on it\n",
        "registry": r"jmp: error: no free node matches pool=p: lab1 \(draining\)\n",
    }
    assert busy.returncode == 4 and re.fullmatch(expected[kind], busy.stderr), busy.stderr
    _second_waits_its_turn(env, pick, tasks, let_first_end=True)


def test_a_vanished_client_s_task_finishes_before_the_next_session(board, tmp_path: Path) -> None:
    kind, env, pick, tasks = board
    first = subprocess.Popen([JMP, "run", *pick, "--session", "first", "--", "sh", "-c", _task(FIRST, env, hold=HOLD_UNTIL_GO)], env=env)
    _until(lambda: Path(env["MARK"]).exists(), "the first task took the board")
    first.send_signal(signal.SIGKILL)
    first.wait()
    _second_waits_its_turn(env, pick, tasks, let_first_end=True)


def test_lease_release_stop_stops_a_draining_node_s_tasks(lab, postgres_url: str, tmp_path: Path) -> None:
    lab("lab1", "pool=p")
    _wait_registered(postgres_url, {"lab1"})
    env = _ci(tmp_path, postgres_url)
    started = run_jmp("task", "start", "--node", "lab1", "--session", "first", "--", "sleep", "30", env=env)
    assert started.returncode == 0, started.stderr
    task_id = started.stdout.strip()
    released = run_jmp("lease", "release", "--stop", "lab1", env=env)
    assert released.returncode == 0, released.stderr
    assert re.fullmatch(r"stopping the tasks of lease \d+ on node lab1\n", released.stdout)
    waited = run_jmp("task", "wait", task_id, env=env)
    assert waited.returncode == 128 + signal.SIGTERM
    status = run_jmp("task", "status", task_id, env=env)
    assert "message   the lease of session 'first' was released with --stop" in status.stdout, status.stdout
    _until(lambda: run_jmp("node", "list", env=env).stdout.splitlines()[1].split()[:2] == ["lab1", "free"], "free")


# --- jmp run: which task, and SIGHUP --------------------------------------------------------


def test_sighup_stops_the_remote_task_and_the_id_file_names_it(agents, data_dir: Path, tmp_path: Path) -> None:
    agent = agents()
    config = tmp_path / "client.toml"
    config.write_text(f'[nodes.lab1]\ntransport = "grpc"\nendpoint = "{agent.url}"\n')
    env = {**os.environ, "JMP_CONFIG": str(config), "JMP_DATA_DIR": str(tmp_path / "ci")}
    id_file = tmp_path / "task.id"
    run = subprocess.Popen([JMP, "run", "--node", "lab1", "--id-file", str(id_file), "--", "sleep", "30"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _until(lambda: id_file.exists() and id_file.read_text().endswith("\n"), "the id is written")
    task_id = id_file.read_text().strip()
    run.send_signal(signal.SIGHUP)  # the terminal (or ssh connection) closed
    out, err = run.communicate(timeout=30)
    assert (run.returncode, out, err) == (128 + signal.SIGHUP, b"", b"")  # not a terminal: nothing said
    status = run_jmp("task", "status", "--node", "lab1", "--format", "json", task_id, env=env)
    assert '"state": "stopped"' in status.stdout, status.stdout


def test_jmp_run_names_its_task_on_a_terminal_and_refuses_an_id_file_it_cannot_write(
    data_dir: Path, tmp_path: Path
) -> None:
    import pty

    primary, secondary = pty.openpty()
    try:
        done = subprocess.run([JMP, "run", "--", "echo", "hi"], stdout=subprocess.PIPE, stderr=secondary, timeout=60)
        os.close(secondary)
        said = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                break
            if not chunk:
                break
            said += chunk
    finally:
        os.close(primary)
    assert (done.returncode, done.stdout) == (0, b"hi\n")
    assert re.fullmatch(rb"jmp: task [0-9a-f]{12} on node local\r\n", said), said
    quiet = run_jmp("run", "-q", "--", "true")
    assert (quiet.returncode, quiet.stderr) == (0, "")
    bad = run_jmp("run", "--id-file", str(tmp_path / "no" / "such" / "dir" / "id"), "--", "touch", "ran")
    assert bad.returncode == 2
    assert bad.stderr.startswith("jmp: error: Invalid value for --id-file: cannot write ")
    assert not (tmp_path / "ran").exists()
    assert len(run_jmp("task", "list").stdout.splitlines()) == 1 + 2  # the header, echo and true: nothing new


# --- lease hooks; node remove; requests in line -------------------------------------------------


def _row(env: dict[str, str], node: str) -> list[str]:
    """The line of ``jmp node list`` for ``node``, split on runs of two spaces or more."""
    listing = run_jmp("node", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if line.startswith(node + " "))
    return re.split(r"\s{2,}", line.strip())


def test_a_failing_lease_hook_makes_the_node_unhealthy_until_it_succeeds_or_is_cleared(
    lab, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready, after = tmp_path / "board-ready", tmp_path / "after.log"
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text(
        f'[nodes.lab1]\nbefore_lease = "cat {ready}"\nafter_lease = "echo $JMP_SESSION >> {after}"\n'
    )
    monkeypatch.setenv("JMP_CONFIG", str(agent_config))
    lab("lab1", "pool=p")
    _wait_registered(postgres_url, {"lab1"})
    env = _ci(tmp_path, postgres_url)
    failed = run_jmp("run", "--node", "lab1", "--", "touch", str(tmp_path / "ran"), env=env)
    error = f"before_lease failed (exit 1): cat: {ready}: No such file or directory"
    assert (failed.returncode, failed.stderr) == (5, (
        f"jmp: error: node 'lab1' is unhealthy: {error} (it is leased again once its before_lease hook "
        "succeeds, or after 'jmp node clear lab1')\n"
    ))
    assert not (tmp_path / "ran").exists() and not after.exists()
    row = _row(env, "lab1")
    assert (row[1], row[-1]) == ("unhealthy", error)
    by_label = run_jmp("run", "--select", "pool=p", "--", "true", env=env)
    assert (by_label.returncode, by_label.stderr) == (4, "jmp: error: no free node matches pool=p: lab1 (unhealthy)\n")
    # Fixed: the next session that asks for it by name gets it.
    ready.write_text("ok\n")
    done = run_jmp("run", "--node", "lab1", "--session", "fixed", "--", "echo", "leased", env=env)
    assert (done.returncode, done.stdout) == (0, "leased\n"), done.stderr
    _until(lambda: after.exists() and after.read_text() == "fixed\n", "after_lease ran")
    _until(lambda: _row(env, "lab1")[1] == "free", "free")
    by_label = run_jmp("run", "--select", "pool=p", "--", "true", env=env)
    assert by_label.returncode == 0, by_label.stderr
    # Broken again; an operator clears it.
    ready.unlink()
    assert run_jmp("run", "--node", "lab1", "--", "true", env=env).returncode == 5
    cleared = run_jmp("node", "clear", "lab1", env=env)
    assert (cleared.returncode, cleared.stdout) == (0, f"node lab1 cleared (it was unhealthy: {error})\n")
    assert _row(env, "lab1")[1] == "free"


def test_requests_in_line_and_removing_a_node_that_will_not_come_back(lab, postgres_url: str, tmp_path: Path) -> None:
    agent = lab("lab1", "pool=p")
    _wait_registered(postgres_url, {"lab1"})
    env = _ci(tmp_path, postgres_url)
    holder = subprocess.Popen([JMP, "run", "--select", "pool=p", "--session", "holder", "--", "sleep", "30"], env=env)
    waiter = None
    try:
        _until(lambda: _row(env, "lab1")[1] == "leased", "leased")
        waiter = subprocess.Popen(
            [JMP, "run", "--select", "pool=p", "--wait", "60", "--session", "patient", "--", "true"], env=env
        )
        _until(lambda: "waiting #1" in run_jmp("lease", "list", env=env).stdout, "in line")
        listing = run_jmp("lease", "list", env=env).stdout.splitlines()
        assert re.split(r"\s{2,}", listing[1])[1:3][0] == "lab1" and "holder (" in listing[1]
        assert re.split(r"\s{2,}", listing[2])[:3][:2] == ["waiting #1", "pool=p"] and "patient (" in listing[2]
        online = run_jmp("node", "remove", "lab1", env=env)
        assert (online.returncode, online.stderr) == (
            4, "jmp: error: node 'lab1' is leased: only an offline node can be removed\n"
        )
    finally:
        for process in (holder, waiter):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.wait(30)
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    _until(lambda: _row(env, "lab1")[1] == "offline", "offline")
    removed = run_jmp("node", "remove", "lab1", env=env)
    assert (removed.returncode, removed.stdout) == (0, "node lab1 removed\n"), removed.stderr
    assert run_jmp("node", "list", env=env).stdout.count("lab1") == 0
    gone = run_jmp("node", "remove", "lab1", env=env)
    assert (gone.returncode, gone.stderr) == (3, "jmp: error: no node named 'lab1' in the registry\n")


# --- one session per run, results where the session is -----------------------------------------

SUITE = """
def test_boots():
    pass

def test_flashes():
    assert False, "bad checksum"
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared-store", "own-stores"])
def test_pytest_inside_jmp_run_records_into_the_run_s_session_under_the_agent_s_name(
    shared: bool, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import sys

    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_board.py").write_text(SUITE)
    if shared:
        store = request.getfixturevalue("postgres_url")
        request.getfixturevalue("lab")("rpi-b", "pool=p")
        _wait_registered(store, {"rpi-b"})
        env = _ci(tmp_path, store)
    else:
        agent = request.getfixturevalue("agents")(name="rpi-b")
        home = tmp_path / "ci"
        home.mkdir()
        (home / "jumpstarter.toml").write_text(f'[nodes.rpi-b]\ntransport = "grpc"\nendpoint = "{agent.url}"\n')
        env = {**os.environ, "JMP_DATA_DIR": str(home), "JMP_CONFIG": str(home / "jumpstarter.toml")}
        env.pop("JMP_STORE", None)
    script = (
        f"{sys.executable} -m pytest -q -p no:cacheprovider --jmp-session nightly {suite};"
        " jmp result add --name suite/extra --outcome passed"
    )
    done = run_jmp("run", "--node", "rpi-b", "--session", "nightly", "--shell", "--", script, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr  # the last command's exit code
    assert "recorded in session 'nightly' on node 'rpi-b'" in done.stdout, done.stdout
    query = run_jmp("result", "query", "--session", "nightly", "--format", "json", env=env, cwd=tmp_path)
    assert query.returncode == 0, query.stderr
    import json

    results = json.loads(query.stdout)["results"]
    assert sorted((r["name"], r["outcome"], r["node"]) for r in results) == [
        ("suite/extra", "passed", "rpi-b"),
        ("suite/test_board.py::test_boots", "passed", "rpi-b"),
        ("suite/test_board.py::test_flashes", "failed", "rpi-b"),
    ]
    # One session, one task: the run's own, not one pytest opened beside it.
    assert len({r["session_id"] for r in results}) == 1 and len({r["task_id"] for r in results}) == 1
    if not shared:  # the node that has them goes away: the answer says it is incomplete
        agent.stop()
        gone = run_jmp("result", "query", "--session", "nightly", env=env, cwd=tmp_path)
        assert gone.returncode == 5
        assert gone.stderr.endswith(
            "jmp: error: results of session 'nightly' from node rpi-b are missing: it could not be reached\n"
        ), gone.stderr


def test_session_list_shows_nodes_tasks_and_results(protocol) -> None:
    for name, outcome in (("nightly-1", "passed"), ("nightly-2", "failed"), ("other", "passed")):
        with protocol.create_session(name) as session:
            task = session.connect("local").start(["true"])
            task.wait()
            session.add_result(task.id, name="boot", outcome=outcome)
    runner = CliRunner()
    listed = runner.invoke(cli, ["session", "list", "--name", "nightly-*"])
    assert listed.exit_code == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["ID", "NAME", "CREATED", "NODES", "TASKS", "RESULTS"]
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]
    assert [(r[1], r[3], r[4], r[5]) for r in rows] == [
        ("nightly-2", "local", "1", "1 failed"), ("nightly-1", "local", "1", "1 passed"),
    ]
    import json

    data = json.loads(runner.invoke(cli, ["session", "list", "--format", "json"]).stdout)
    assert [s["name"] for s in data["sessions"]] == ["other", "nightly-2", "nightly-1"]
    assert data["sessions"][0]["results"] == {"passed": 1} and data["sessions"][0]["nodes"] == ["local"]


def test_lease_hooks_of_a_node_served_in_this_process(data_dir: Path, tmp_path: Path) -> None:
    from jumpstarter.config import Config
    from jumpstarter.errors import Unavailable
    from jumpstarter.protocol import JumpStarterProtocol

    log = tmp_path / "hooks.log"
    hooks = {
        "before_lease": f'echo "before $JMP_SESSION" >> {log}; [ "$JMP_SESSION" != broken ] || {{ echo no board >&2; exit 3; }}',
        "after_lease": f'echo "after $JMP_SESSION" >> {log}',
    }
    protocol = JumpStarterProtocol(Config.model_validate({"data_dir": str(data_dir), "nodes": {"local": hooks}}))
    with protocol.create_session("broken") as session:
        with pytest.raises(Unavailable, match=r"^node 'local' is unhealthy: before_lease failed \(exit 3\): no board \("):
            session.connect("local")
    with protocol.create_session("fine") as session:
        assert session.connect("local").start(["true"]).wait().state == "succeeded"
    _until(lambda: log.read_text().endswith("after fine\n"), "after_lease ran")
    assert log.read_text() == "before broken\nbefore fine\nafter fine\n"  # none after a lease never given


def test_a_task_knows_where_it_runs(data_dir: Path) -> None:
    show = 'echo "$JMP_NODE $JMP_SESSION $JMP_TASK_ID ${JMP_TASK_TOKEN:-no-token}"'
    ran = run_jmp("run", "--session", "nightly", "--id-file", "id", "--shell", "--", show)
    assert ran.stdout == f"local nightly {Path('id').read_text().strip()} no-token\n", ran.stderr
    started = run_jmp("task", "start", "--session", "detached", "--shell", "--", show)  # under an agent of its own
    task_id = started.stdout.strip()
    assert run_jmp("task", "wait", task_id).returncode == 0
    assert run_jmp("task", "logs", task_id).stdout == f"local detached {task_id} no-token\n"
