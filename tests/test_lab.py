"""The lab as one system (issue 12): every node and task reached by name or id alone,
wherever it is described. Real ``jmp node serve`` agents on the real PostgreSQL
server, real ``jmp`` clients with data dirs of their own."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_jmp
from jumpstarter.cli import cli
from stores import postgres_url  # noqa: F401  (fixture)
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
    for node in ([], ["--node", "rpi-b"]):
        _until(lambda: run_jmp("task", "logs", *node, task_id, **ci).stdout == "hello from rpi-b\n", "logs")  # noqa: B023
        status = run_jmp("task", "status", *node, task_id, **ci)
        assert status.returncode == 0, status.stderr
        assert "state     running" in status.stdout and "node      rpi-b" in status.stdout, status.stdout
    stopped = run_jmp("task", "stop", task_id, **ci)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    for node in ([], ["--node", "rpi-b"]):
        waited = run_jmp("task", "wait", *node, task_id, **ci)
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
