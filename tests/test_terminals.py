"""A task's input and terminal: stdin written through the API and piped through the
real ``jmp run``, locally and over gRPC to a real ``jmp node serve``; a real PTY
driven under pexpect (``jmp run -t``, ``jmp shell``)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pexpect
import pytest
from conftest import JMP, run_jmp
from jumpstarter.errors import BadRequest, Conflict, SpawnFailed
from jumpstarter.config import Config
from jumpstarter.plugins.manager import get_plugin_manager
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import CloseInput, WriteInput
from test_example_driver import sandbox_plugin  # noqa: F401 - a fixture
from test_grpc import Proxy, agents, client  # noqa: F401 - agents is a fixture

ANSWER = [sys.executable, "-c", "print('you said', input())"]
COUNT = [sys.executable, "-c", "import sys; data = sys.stdin.buffer.read(); print(len(data), 'then EOF')"]


# --- the API ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_input_answers_a_prompt_and_eof_reaches_the_task(protocol: JumpStarterProtocol) -> None:
    async with protocol.create_async_session("input") as session:
        node = await session.connect("local")
        task = await node.start(ANSWER, stdin=True)
        await task.write_input(b"hello\n")
        assert b"".join([c.data async for c in task.output()]) == b"you said hello\n"
        assert task.end is not None and task.end.exit_code == 0

        task = await node.start(COUNT, stdin=True)
        await task.write_input(b"x" * 3_000_000)  # more than one write and a pipe's buffer
        await task.close_input()
        await task.close_input()  # twice is not an error
        assert b"".join([c.data async for c in task.output()]) == b"3000000 then EOF\n"

        task = await node.start(COUNT)  # no stdin: /dev/null, and writing is refused
        with pytest.raises(BadRequest, match=rf"^task {task.id} takes no input \(start it with stdin\)$"):
            await task.write_input(b"lost")
        assert b"".join([c.data async for c in task.output()]) == b"0 then EOF\n"
        with pytest.raises(Conflict, match=rf"^task {task.id} is not running on node 'local'; it takes no input$"):
            await task.write_input(b"late")


@pytest.mark.anyio
async def test_a_write_sent_again_is_not_doubled_and_a_gap_is_refused(protocol: JumpStarterProtocol) -> None:
    async with protocol.create_async_session("resend") as session:
        node = await session.connect("local")
        task = await node.start(["cat"], stdin=True)
        first = await node.request(WriteInput(task_id=task.id, offset=0, data=b"abc"))
        again = await node.request(WriteInput(task_id=task.id, offset=0, data=b"abcdef"))  # resent, and more
        assert (first.offset, again.offset) == (3, 6)
        with pytest.raises(BadRequest, match=rf"^input of task {task.id} written up to byte 6, not 9: send from there$"):
            await node.request(WriteInput(task_id=task.id, offset=9, data=b"xyz"))
        with pytest.raises(BadRequest, match="write the rest before closing"):
            await node.request(CloseInput(task_id=task.id, offset=7))
        closed = await node.request(CloseInput(task_id=task.id, offset=6))
        assert (closed.offset, closed.closed) == (6, True)
        assert b"".join([c.data async for c in task.output()]) == b"abcdef"


@pytest.mark.anyio
async def test_only_the_session_holding_the_lease_writes(agents, data_dir: Path) -> None:  # noqa: F811
    agent = agents()
    protocol = client(data_dir, agent.url)
    async with protocol.create_async_session("holder") as holder, protocol.create_async_session("other") as other:
        node = await holder.connect("lab1")
        task = await node.start(["cat"], stdin=True)
        onlooker = await other.connect("lab1", lease=False)
        with pytest.raises(Conflict, match="^this session does not hold node 'lab1'; connect first$"):
            await onlooker.request(WriteInput(task_id=task.id, offset=0, data=b"not mine"))
        await task.write_input(b"mine")
        await task.close_input()
        assert b"".join([c.data async for c in task.output()]) == b"mine"


@pytest.mark.anyio
async def test_a_terminal_is_the_tasks_controlling_tty_and_follows_resizes(protocol: JumpStarterProtocol) -> None:
    script = "tty; stty size; read line; stty size; echo \"got $line\"; exit 3"
    async with protocol.create_async_session("pty") as session:
        node = await session.connect("local")
        task = await node.start(shell=script, pty=(30, 100))
        output = ""
        async for chunk in task.output():
            output += chunk.data.decode()
            if output.endswith("30 100\r\n"):  # it waits for a line now
                await task.resize(40, 120)
                await task.write_input(b"typed\n")
        assert re.fullmatch(r"/dev/pts/\d+\r\n30 100\r\ntyped\r\n40 120\r\ngot typed\r\n", output), output
        assert task.end is not None and (task.end.state, task.end.exit_code) == ("failed", 3)
        with pytest.raises(SpawnFailed, match="^command not found: no-such-command-here$"):
            await node.start(["no-such-command-here"], pty=(24, 80))
        plain = await node.start(["true"])
        with pytest.raises(BadRequest, match=rf"^task {plain.id} has no terminal \(start it with pty\)$"):
            await plain.resize(10, 10)


def test_a_node_without_the_capability_says_which(
    data_dir: Path, sandbox_plugin: ModuleType, tmp_path: Path  # noqa: F811
) -> None:
    config = Config.model_validate(
        {"data_dir": str(data_dir), "nodes": {"box": {"driver": "sandbox", "options": {"root": str(tmp_path / "s")}}}}
    )
    protocol = JumpStarterProtocol(config, plugins=get_plugin_manager(env={}, extra=[sandbox_plugin]))
    with protocol.create_session("caps") as session:
        node = session.connect("box")
        for spec, capability in (({"stdin": True}, "stdin"), ({"pty": (24, 80)}, "pty")):
            with pytest.raises(BadRequest, match=rf"^node 'box' has no '{capability}' capability$"):
                node.start(["cat"], **spec)
        assert node.list_tasks() == []  # nothing was stored for the refused starts


# --- jmp run: stdin ---------------------------------------------------------------------------


def _pipe_through(args: list[str], data: bytes, **kwargs) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([JMP, *args], input=data, capture_output=True, timeout=120, **kwargs)


def test_jmp_run_pipes_50_mb_through_cat_and_answers_input(data_dir: Path) -> None:
    data = os.urandom(50 * 1024 * 1024)
    done = _pipe_through(["run", "--", "cat"], data)
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(data).digest()
    done = _pipe_through(["run", "--", *ANSWER], b"forty-two\n")
    assert (done.returncode, done.stdout) == (0, b"you said forty-two\n")
    done = _pipe_through(["run", "--", *COUNT], b"12345")  # EOF passes through
    assert done.stdout == b"5 then EOF\n"
    done = _pipe_through(["run", "-n", "--", *COUNT], b"not for the task")
    assert done.stdout == b"0 then EOF\n"
    with open(os.devnull, "rb") as devnull:  # a file, not a pipe: read as it is
        done = subprocess.run([JMP, "run", "--", *COUNT], stdin=devnull, capture_output=True, timeout=60)
    assert done.stdout == b"0 then EOF\n"


def test_jmp_run_over_grpc_forwards_stdin(agents, data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    agent = agents()
    data = os.urandom(50 * 1024 * 1024)
    done = _pipe_through(["run", "--endpoint", agent.url, "--", "cat"], data)
    assert done.returncode == 0, done.stderr
    assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(data).digest()
    done = _pipe_through(["run", "--endpoint", agent.url, "--", *ANSWER], b"over grpc\n")
    assert (done.returncode, done.stdout) == (0, b"you said over grpc\n")
    done = _pipe_through(["run", "--endpoint", agent.url, "--", *COUNT], b"1234567")
    assert done.stdout == b"7 then EOF\n"


@pytest.mark.anyio
async def test_input_survives_a_cut_connection_without_loss_or_doubling(agents, data_dir: Path) -> None:  # noqa: F811
    agent = agents()
    pieces = [os.urandom(200_000) for _ in range(30)]
    async with Proxy(agent.port) as proxy:
        protocol = client(data_dir, f"grpc://127.0.0.1:{proxy.port}")
        async with protocol.create_async_session("flaky-input") as session:
            node = await session.connect("lab1")
            task = await node.start(["sha256sum"], stdin=True)
            for i, piece in enumerate(pieces):
                await task.write_input(piece)
                if i % 10 == 5:
                    proxy.cut()
            await task.close_input()
            output = b"".join([c.data async for c in task.output()])
    assert output.split()[0].decode() == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert proxy.connections >= 3


def test_t_without_a_terminal_is_one_line(data_dir: Path) -> None:
    done = run_jmp("run", "-t", "--", "bash", input="")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "jmp: error: -t needs a terminal, and stdin is not one (leave -t out to pipe input) (try 'jmp run --help')\n"
    )
    done = run_jmp("shell", input="")
    assert (done.returncode, done.stderr) == (
        2,
        "jmp: error: a shell needs a terminal, and stdin is not one (pipe commands to 'jmp run' instead) "
        "(try 'jmp shell --help')\n",
    )


# --- jmp run -t and jmp shell under pexpect ------------------------------------------------------

PROMPT = "PTY-TEST> "


def _terminal(command: str, data_dir: Path) -> pexpect.spawn:
    """``command`` in bash on a terminal pexpect drives; bash prints ``stty -a``
    before and after, so the test sees what jmp left the terminal as."""
    env = {**os.environ, "JMP_DATA_DIR": str(data_dir), "TERM": "xterm"}
    wrapper = f"stty -a; echo BEFORE-END; {command}; echo EXIT=$?; stty -a; echo AFTER-END"
    child = pexpect.spawn("bash", ["--norc", "--noprofile", "-c", wrapper], env=env, dimensions=(30, 100), timeout=30)
    return child


def _stty(child: pexpect.spawn, end: str) -> str:
    """The settings ``stty -a`` printed before the marker ``end`` (one line: how
    stty wraps them depends on the width)."""
    child.expect(end + "\r\n")
    return " ".join(child.before.decode().split())


def test_jmp_run_t_runs_an_interactive_shell_on_a_pty(data_dir: Path) -> None:
    # PS1 by --env: the bash -c around jmp drops it, as a non-interactive bash does.
    child = _terminal(f"{JMP} run -it --env 'PS1={PROMPT}' -- bash --norc --noprofile", data_dir)
    try:
        before = _stty(child, "BEFORE-END")
        child.expect_exact(PROMPT)
        child.sendline("tty")
        child.expect(r"/dev/pts/\d+\r\n")
        child.expect_exact(PROMPT)
        child.sendline("stty size")
        child.expect_exact("30 100\r\n")
        child.expect_exact(PROMPT)
        child.setwinsize(40, 120)  # SIGWINCH to jmp, which resizes the task's terminal
        for _ in range(50):  # the resize travels while bash waits; look until it arrived
            child.sendline("stty size")
            index = child.expect([r"40 120\r\n", r"30 100\r\n"])
            child.expect_exact(PROMPT)
            if index == 0:
                break
        else:
            raise AssertionError("the task's terminal never got the new size")
        # Markers the shell computes, so that the echo of what was typed never matches.
        child.sendline("echo sleeping-$((1 + 1)); sleep 100")
        child.expect_exact("sleeping-2\r\n")
        child.sendcontrol("c")  # goes to the program: sleep ends, the shell lives on
        child.expect_exact(PROMPT)
        child.sendline("echo still-$((40 + 2))")
        child.expect_exact("still-42\r\n")
        child.expect_exact(PROMPT)
        child.sendline("exit 3")
        child.expect_exact("EXIT=3\r\n")
        after = _stty(child, "AFTER-END")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    # Raw mode undone; only the size differs (the test resized the window).
    assert "rows 30; columns 100" in before and "rows 40; columns 120" in after
    assert before.replace("rows 30; columns 100", "") == after.replace("rows 40; columns 120", "")
    assert "icanon" in after.split() and "echo" in after.split()


def test_jmp_shell_is_the_login_shell_and_restores_the_terminal(data_dir: Path) -> None:
    child = _terminal(f"{JMP} shell", data_dir)
    try:
        before = _stty(child, "BEFORE-END")
        child.sendline("echo shell=$0 on $(tty)")
        child.expect(r"shell=-?\S+ on /dev/pts/\d+\r\n")
        child.sendline("shopt -q login_shell 2>/dev/null && echo LOGIN || echo LOGIN")
        child.expect_exact("LOGIN\r\n")
        child.sendline("exit 7")
        child.expect_exact("EXIT=7\r\n")
        after = _stty(child, "AFTER-END")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert before == after


def test_a_terminal_task_killed_from_outside_still_restores_the_terminal(data_dir: Path) -> None:
    child = _terminal(f"{JMP} run -t -- sh -c 'echo READY; exec sleep 100'", data_dir)
    try:
        before = _stty(child, "BEFORE-END")
        child.expect_exact("READY")
        jmp_pid = Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()  # bash's child
        assert len(jmp_pid) == 1
        os.kill(int(jmp_pid[0]), signal.SIGTERM)  # the task is stopped, the terminal put back
        child.expect(r"EXIT=(\d+)\r\n")
        code = int(child.match.group(1))
        after = _stty(child, "AFTER-END")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert code == 128 + signal.SIGTERM
    assert before == after

