"""``jmp run`` and ``jmp --version``: through click's runner and through the real ``jmp``."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from jumpstarter.cli import cli

from conftest import JMP, pid_alive, run_jmp


@pytest.fixture
def runner(data_dir: Path) -> CliRunner:
    return CliRunner()


def test_version(runner: CliRunner) -> None:
    from jumpstarter import __version__

    result = runner.invoke(cli, ["--version"])
    assert (result.exit_code, result.output) == (0, f"jmp {__version__}\n")


def test_run_echo_in_process(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["run", "--", "echo", "hello"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "hello\n", "")


def test_run_passes_options_after_the_command_to_it(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["run", "sh", "-c", "echo $0 $1", "--timeout", "x"])
    assert (result.exit_code, result.stdout) == (0, "--timeout x\n")


def test_run_streams_to_the_right_streams_and_exits_with_the_task_code(data_dir: Path) -> None:
    done = run_jmp("run", "--env", "WHO=world", "--", "sh", "-c", 'echo "hello $WHO"; echo oops >&2; exit 7')
    assert (done.returncode, done.stdout, done.stderr) == (7, "hello world\n", "oops\n")


def test_run_shell_cwd_and_timeout(data_dir: Path, tmp_path: Path) -> None:
    done = run_jmp("run", "--cwd", str(tmp_path), "--shell", "--", "pwd && echo", "$((1+1))")
    assert (done.returncode, done.stdout) == (0, f"{tmp_path}\n2\n")
    done = run_jmp("run", "--timeout", "0.2", "--", "sleep", "30")
    assert done.returncode == 124
    assert re.fullmatch(r"jmp: task [0-9a-f]+ timed out after 0\.2s and was stopped\n", done.stderr)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["run", "--", "no-such-command"], 127, "jmp: error: command not found: no-such-command\n"),
        (["run", "--node", "nowhere", "--", "true"], 3, "jmp: error: unknown node 'nowhere'; known nodes: local\n"),
        (["run", "--cwd", "/no/such", "--", "true"], 2, "jmp: error: working directory does not exist: /no/such\n"),
        (["run", "--env", "NOEQUALS", "--", "true"], 2, None),
        (["run", "--timeout", "-1", "--", "true"], 2, None),
        (["run"], 2, None),
    ],
)
def test_run_bad_input(runner: CliRunner, data_dir: Path, args: list[str], code: int, message: str | None) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code == code
    if message is not None:
        assert result.stderr == message
    else:
        assert result.stderr.startswith("jmp: error: ")
        assert result.stderr.endswith(" (try 'jmp run --help')\n") and result.stderr.count("\n") == 1
    assert not (data_dir / "jumpstarter.db").exists() or _task_count(data_dir) == 0


def _task_count(data_dir: Path) -> int:
    import sqlite3

    with sqlite3.connect(data_dir / "jumpstarter.db") as db:
        return db.execute("SELECT count(*) FROM tasks").fetchone()[0]


def test_run_with_a_malformed_config(tmp_path: Path, data_dir: Path) -> None:
    bad = tmp_path / "jumpstarter.toml"
    bad.write_text("[nodes\n")
    done = run_jmp("run", "--", "true")
    assert done.returncode == 1
    assert done.stderr.startswith(f"jmp: error: {bad.name}: invalid TOML: ")
    assert done.stderr.count("\n") == 1


def test_ctrl_c_stops_the_task_cleanly(data_dir: Path) -> None:
    process = subprocess.Popen(
        [JMP, "run", "--grace", "1", "--", "sh", "-c", "echo $$; exec sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        task_pid = int(process.stdout.readline())
        assert pid_alive(task_pid)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert time.monotonic() - started < 30
        deadline = time.monotonic() + 5
        while pid_alive(task_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pid_alive(task_pid)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()
    assert os.path.exists(data_dir / "jumpstarter.db")


def test_a_node_that_dies_mid_run_is_one_line_and_exit_5(data_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen([JMP, "node", "serve", "--listen", "127.0.0.1:0", "--name", "frail"],
                                 stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (match := re.search(r"listening on (\S+)\n", log.read_text())):
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        config = tmp_path / "jumpstarter.toml"
        config.write_text(
            f'[nodes.frail]\ntransport = "grpc"\nendpoint = "{match.group(1)}"\n'
            "options = { reconnect_timeout = 1 }\n"
        )
        client = subprocess.Popen([JMP, "run", "--node", "frail", "--", "sh", "-c", "echo $$; exec sleep 60"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        task_group = int(client.stdout.readline())
        agent.kill()
        agent.wait()
        _, stderr = client.communicate(timeout=60)
        assert client.returncode == 5
        assert stderr.startswith("jmp: error: ") and stderr.count("\n") == 1, stderr
    finally:
        agent.kill()
        agent.wait()
        with contextlib.suppress(NameError, ProcessLookupError):
            os.killpg(task_group, signal.SIGKILL)  # its agent died: the task is ours to end
