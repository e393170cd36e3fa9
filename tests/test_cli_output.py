"""What every command shares on output: ``-o`` for ``--format``, a closed stdout
(``| head``) ending quietly, tables fitted to the terminal, completion from the store."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import termios
from pathlib import Path

import pytest
from conftest import JMP, run_jmp
from jumpstarter.cli._output import fit_widths
from jumpstarter.protocol import JumpStarterProtocol


@pytest.fixture
def results(protocol: JumpStarterProtocol) -> tuple[str, str]:
    """A session 'nightly' with 300 results, one with a 90-character name; its task."""
    with protocol.create_session("nightly") as session:
        node = session.connect("local")
        task = node.start(["true"], name="suite")
        task.wait()
        long = "tests/test_board_bringup.py::TestUart::test_baud_rates[115200-8N1-no-flow-control]"
        node.session.add_results(
            task.id,
            [{"name": long, "outcome": "failed", "message": "x" * 200, "duration": 1.5}]
            + [{"name": f"case/{i}", "outcome": "passed"} for i in range(300)],
        )
        return task.id, long


def test_a_closed_stdout_ends_quietly_with_exit_0(results: tuple[str, str]) -> None:
    for command in ("jmp result query -o json", "jmp task list", "jmp result query -o csv"):
        done = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command.replace('jmp', JMP, 1)} | head -n 1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stderr, len(done.stdout.splitlines())) == (0, "", 1), command


def test_jmp_run_into_a_closed_pipe_stops_the_task_and_exits_141(
    protocol: JumpStarterProtocol,
) -> None:
    done = subprocess.run(
        [
            "bash",
            "-c",
            f"set -o pipefail; {JMP} run -s piped -- sh -c 'seq 1 1000000; sleep 60' | head -n 2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout, done.stderr) == (141, "1\n2\n", "")
    with protocol.create_session("check") as session:
        (task,) = session.connect("local", lease=False).list_tasks(session="piped")
    assert task.state.value == "stopped"


def test_fit_widths_shrinks_the_least_important_first() -> None:
    headers = ["ID", "NAME", "OUTCOME", "DURATION", "METRICS", "TASK", "ADDED", "MESSAGE"]
    natural = [4, 90, 7, 8, 20, 12, 19, 60]
    assert fit_widths(headers, natural, 300) == natural  # it fits: as it is
    # narrower: message, metrics and time shrink to their headers, then go, message
    # first; the task id goes before the outcome; the name stays whole
    assert fit_widths(headers, natural, 140) == [4, 90, 7, 8, 0, 12, 5, 0]
    assert fit_widths(headers, natural, 120) == [4, 90, 7, 8, 0, 0, 0, 0]
    # only when nothing else is left is a name cut
    assert fit_widths(headers, natural, 60) == [4, 54, 0, 0, 0, 0, 0, 0]


def on_a_terminal(columns: int, *args: str) -> str:
    """What ``jmp ARGS`` prints on a terminal ``columns`` wide (a real PTY)."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        [JMP, *args],
        stdout=terminal,
        stderr=terminal,
        stdin=subprocess.DEVNULL,
        env={**env, "TERM": "xterm"},
    )
    os.close(terminal)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: jmp is done
                break
            if not chunk:
                break
            out += chunk
    finally:
        process.wait(timeout=30)
        os.close(controller)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode()).replace("\r\n", "\n")


def test_a_table_at_120_columns_keeps_the_whole_name(results: tuple[str, str]) -> None:
    task_id, long = results
    text = on_a_terminal(120, "result", "query", "--task", task_id, "--limit", "3")
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "NAME", "OUTCOME", "DURATION", "TASK"]
    assert any(long in line for line in lines), text
    assert all(len(line) <= 120 for line in lines)


def complete(*words: str) -> list[str]:
    done = subprocess.run(
        [JMP],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "_JMP_COMPLETE": "bash_complete",
            "COMP_WORDS": " ".join(["jmp", *words]),
            "COMP_CWORD": str(len(words)),
        },
    )
    assert done.returncode == 0, done.stderr
    return [line.partition(",")[2] for line in done.stdout.splitlines()]


def test_completion_of_task_ids_sessions_and_nodes(
    results: tuple[str, str], data_dir: Path, tmp_path: Path
) -> None:
    task_id, _ = results
    assert complete("task", "status", task_id[:3]) == [task_id]
    assert complete("result", "query", "--task", "") == [task_id]
    assert complete("result", "diff", "nig") == ["nightly"]
    assert complete("run", "--node", "") == ["local"]
    config = tmp_path / "jumpstarter.toml"
    config.write_text('[nodes.lab1]\ntransport = "grpc"\nendpoint = "grpc://127.0.0.1:1"\n')
    assert complete("--config", str(config), "run", "--node", "") == ["lab1", "local"]
    # a store that does not exist is not created by a completion
    other = tmp_path / "other"
    done = subprocess.run(
        [JMP],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "JMP_DATA_DIR": str(other),
            "_JMP_COMPLETE": "bash_complete",
            "COMP_WORDS": "jmp task status ",
            "COMP_CWORD": "3",
        },
    )
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "", "")
    assert not other.exists()


def test_dash_o_is_format(results: tuple[str, str]) -> None:
    task_id, _ = results
    done = run_jmp("result", "query", "--task", task_id, "-o", "json", "--limit", "1")
    assert done.returncode == 0 and json.loads(done.stdout)["summary"]["total"] == 301
