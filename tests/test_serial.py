"""The serial node driver against a simulated board: a PTY pair whose far end runs a
real ``sh`` behind a login prompt (tests/sim_board.py), and the power back ends
against a recording script and a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from jumpstarter.config import Config, NodeConfig
from jumpstarter.errors import ConfigError, Conflict, PowerFailed
from jumpstarter.node.server import build_node_server
from jumpstarter.plugins import get_plugin_manager
from jumpstarter.protocol import JumpStarterProtocol

sys.path.insert(0, str(Path(__file__).parent))
from conftest import JMP, run_jmp  # noqa: E402
from serial_boards import sim_board_command  # noqa: E402
from stores import postgres_url  # noqa: E402, F401  (fixture)
from test_many_machines import lab  # noqa: E402, F401  (fixture)

pytestmark = pytest.mark.anyio


class Board:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(sim_board_command(*args), stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = self.process.stdout.readline().strip()
        self.pid = self.process.pid

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def board() -> Iterator[Board]:
    """A board that boots for 0.6 s (what is typed meanwhile is lost), then asks for
    a login and a password."""
    b = Board("--boot", "0.6", "--login", "root", "--password", "s3cret")
    yield b
    b.close()


def node_config(board: Board, tmp_path: Path, **extra: object) -> NodeConfig:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    options = {"port": board.port, "login": "root", "password_file": str(secret), "boot_timeout": 20}
    return NodeConfig(name="board", driver="serial", options=options, **extra)


def protocol_for(node: NodeConfig, data_dir: Path) -> JumpStarterProtocol:
    return JumpStarterProtocol(Config(data_dir=data_dir, nodes={node.name: node}))


@asynccontextmanager
async def served(node: NodeConfig, data_dir: Path) -> AsyncIterator[object]:
    config = Config(data_dir=data_dir, nodes={node.name: node})
    server = build_node_server(config, get_plugin_manager(), node)
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        try:
            yield server
        finally:
            server.close()


@asynccontextmanager
async def served_over_grpc(node: NodeConfig, data_dir: Path) -> AsyncIterator[str]:
    """``node`` served by this process over gRPC on 127.0.0.1: its URL."""
    from jumpstarter_driver_grpc._server import serve

    async with served(node, data_dir) as server, anyio.create_task_group() as tg:
        urls: list[str] = []
        ready = anyio.Event()
        options = {"listen": "127.0.0.1:0", "ready": lambda url: (urls.append(url), ready.set())}
        tg.start_soon(serve, server, options)
        await ready.wait()
        yield urls[0]
        tg.cancel_scope.cancel()


def grpc_client(url: str, data_dir: Path) -> JumpStarterProtocol:
    """A client whose node ``board`` is at ``url``, with a one-second deadline per call."""
    node = NodeConfig(name="board", transport="grpc", endpoint=url, options={"deadline": 1})
    return JumpStarterProtocol(Config(data_dir=data_dir, nodes={"board": node}))


async def output_of(task: object) -> bytes:
    return b"".join([chunk.data async for chunk in task.output()])  # type: ignore[attr-defined]


async def test_tasks_run_on_the_board_shell(board: Board, tmp_path: Path, data_dir: Path) -> None:
    protocol = protocol_for(node_config(board, tmp_path), data_dir)
    async with protocol.create_async_session("t") as session:
        node = await session.connect("board")
        task = await node.start(["printf", "a\\nb\\n"])
        # The terminal sends CR LF; the task's output has the LF it printed.
        assert await output_of(task) == b"a\nb\n"
        assert (await task.wait()).exit_code == 0
        # A builtin with variables runs without a subshell; they stay its own.
        task = await node.start(["echo", "in", "place"], env={"LEAK": "1"})
        assert await output_of(task) == b"in place\n"
        task = await node.start(shell='echo "${LEAK-none}"')
        assert await output_of(task) == b"none\n"
        task = await node.start(shell="echo to-stderr >&2; printf no-newline; exit 3")
        assert await output_of(task) == b"to-stderr\nno-newline"  # one stream: merged
        info = await task.wait()
        assert (info.state.value, info.exit_code) == ("failed", 3)
        task = await node.start(["sh", "-c", 'echo "$GREETING from $(pwd)"'], env={"GREETING": "hi"}, cwd="/usr")
        assert await output_of(task) == b"hi from /usr\n"
        task = await node.start(["no-such-command-here"])
        assert (await task.wait()).exit_code == 127
        transcript = (await node.read_console(0)).data
    # The board booted (and lost the wake-up typed meanwhile), asked for a login.
    assert b"simboard: booting" in transcript
    assert b"simboard login: root" in transcript
    assert b"s3cret" not in transcript  # a password is not echoed
    assert (data_dir / "nodes" / "board" / "console.log").read_bytes() == transcript


async def test_a_timeout_is_ctrl_c_and_the_board_stays_ready(board: Board, tmp_path: Path, data_dir: Path) -> None:
    protocol = protocol_for(node_config(board, tmp_path), data_dir)
    async with protocol.create_async_session("t") as session:
        node = await session.connect("board")
        task = await node.start(shell="echo started; sleep 30", timeout=1)
        info = await task.wait()
        assert info.state.value == "timed_out"
        assert await output_of(task) == b"started\n"
        task = await node.start(["sleep", "30"])
        await anyio.sleep(0.3)
        assert (await task.stop(grace=3)).state.value == "stopped"
        task = await node.start(["echo", "again"])
        assert await output_of(task) == b"again\n"


async def test_one_task_at_a_time_and_the_console_is_read_only_meanwhile(
    board: Board, tmp_path: Path, data_dir: Path
) -> None:
    protocol = protocol_for(node_config(board, tmp_path), data_dir)
    async with protocol.create_async_session("t") as session:
        node = await session.connect("board")
        task = await node.start(shell="echo busy; sleep 2; echo done")
        with pytest.raises(Conflict, match=r"^the console of node 'board' is busy with a task; one task at a time runs on a console$"):
            await node.start(["true"])
        with pytest.raises(Conflict, match=r"^a task runs on the console of node 'board'; it is read-only until that ends$"):
            await node.write_console(b"reboot\r")
        seen = await node.read_console(0)
        assert seen.busy == "a task"
        assert (await task.wait()).exit_code == 0
        # A person types on it between tasks; the next task finds its shell again.
        await node.write_console(b"echo typed-by-hand\r")
        await anyio.sleep(0.5)
        assert b"typed-by-hand" in (await node.read_console(seen.offset)).data
        task = await node.start(["echo", "next"])
        assert await output_of(task) == b"next\n"


async def test_input_a_task_did_not_read_ends_with_it(
    board: Board, tmp_path: Path, data_dir: Path
) -> None:
    # Typed on the console, a task's input waits in the board's terminal until read:
    # what the task left there must not reach the shell after it, neither lines it
    # would run nor the Ctrl-D that closes the input (which ends a shell: `jmp run`
    # closes the input of every task, and a person's `jmp console` after it then
    # found a new shell, and the next task no prompt).
    protocol = protocol_for(node_config(board, tmp_path), data_dir)
    async with protocol.create_async_session("t") as session:
        node = await session.connect("board")
        task = await node.start(shell="echo $$")
        shell = await output_of(task)
        # Then more than the few bytes the driver holds back while it looks for a marker.
        line = b"reading-one-line\n" + b"." * 60 + b"\n"
        script = "echo reading-one-line; printf '%060d\\n' 0 | tr 0 .; read line; echo got-$line"
        task = await node.start(shell=script, stdin=True)
        seen = b""
        with anyio.fail_after(20):
            async for chunk in task.output(follow=True):
                seen += chunk.data
                if seen.startswith(b"reading-one-line\n"):
                    break
        await task.write_input(b"one\necho unread-$((6*7))\npartial")
        await task.close_input()
        info = await task.wait()
        assert (info.state.value, await output_of(task)) == ("succeeded", line + b"got-one\n")
        task = await node.start(["sleep", "0.5"], stdin=True)
        await task.close_input()  # as `jmp run` does when its stdin ends: a lone Ctrl-D
        assert (await task.wait()).exit_code == 0
        task = await node.start(shell="echo $$")
        assert await output_of(task) == shell  # the same shell
        # A person's keys reach that shell, and the next task finds it again.
        await node.write_console(b"echo typed-$((6*7))\r")
        task = await node.start(["echo", "after-console"])
        assert await output_of(task) == b"after-console\n"
        transcript = (await node.read_console(0)).data
    assert b"typed-42" in transcript
    assert b"unread-42" not in transcript and transcript.count(b"login:") == 1


SHOW_ENV = 'echo "${JMP_NODE-unset} ${JMP_SESSION-unset} ${JMP_SESSION_ID-unset} ${JMP_TASK_ID-unset}"'


async def test_each_task_of_two_sessions_sees_its_own_jmp_variables(
    board: Board, tmp_path: Path, data_dir: Path
) -> None:
    # The session's variables are exported in the board's shell, not typed on every
    # task's line: the tasks of one session and then another's (its own node server,
    # which finds the shell the other left, exports and all) each see their own,
    # whether run as a shell string or an argv; a builtin without a subshell still runs.
    protocol = protocol_for(node_config(board, tmp_path), data_dir)
    for name in ("first", "second", "first"):
        async with protocol.create_async_session(name) as session:
            node = await session.connect("board")
            for how in ({"shell": SHOW_ENV}, {"argv": ["sh", "-c", SHOW_ENV]}, {"shell": SHOW_ENV}):
                task = await node.start(**how)
                assert (await task.wait()).exit_code == 0
                seen = await output_of(task)
                assert seen == f"board {name} {session.id} {task.id}\n".encode()
            task = await node.start(["printf", "%s\n", "builtin"])
            assert await output_of(task) == b"builtin\n"
            transcript = (await node.read_console(0)).data
    assert transcript.count(b"login:") == 1  # one shell all along


class Typed:
    """A driver's console writes, recorded."""

    def __init__(self, driver: object) -> None:
        self.lines: list[bytes] = []
        type_ = driver.type  # type: ignore[attr-defined]

        async def typed(data: bytes) -> None:
            self.lines.append(data)
            await type_(data)

        driver.type = typed  # type: ignore[attr-defined]


async def test_the_shell_exports_are_sent_again_after_a_person_used_the_console(
    board: Board, tmp_path: Path, data_dir: Path
) -> None:
    from jumpstarter_driver_serial.node import _Collect
    from jumpstarter_protocol import TaskSpec

    async with served(node_config(board, tmp_path), data_dir) as server:
        driver = server.driver  # type: ignore[attr-defined]
        typed = Typed(driver)

        async def show(env: dict[str, str]) -> bytes:
            collected = _Collect()
            process = await driver.spawn(TaskSpec(shell=SHOW_ENV, env=env), collected)
            assert await process.wait() == 0
            return bytes(collected.data)

        session = {"JMP_NODE": "board", "JMP_SESSION": "s", "JMP_SESSION_ID": "1"}
        assert await show({**session, "JMP_TASK_ID": "t1"}) == b"board s 1 t1\n"
        assert b"export JMP_NODE=board JMP_SESSION=s JMP_SESSION_ID=1; " in typed.lines[-1]
        assert await show({**session, "JMP_TASK_ID": "t2"}) == b"board s 1 t2\n"
        assert typed.lines[-1].startswith(b"__jmp_s ")  # no exports: the shell has them
        # A person unsets one and changes another: the next task's line sends all again.
        await driver.console.write(b"unset JMP_SESSION; export JMP_NODE=changed\r")
        assert await show({**session, "JMP_TASK_ID": "t3"}) == b"board s 1 t3\n"
        assert b"export JMP_NODE=board JMP_SESSION=s JMP_SESSION_ID=1; " in typed.lines[-1]
        # A task without the session's variables does not see the last task's.
        assert await show({"JMP_NODE": "board", "JMP_TASK_ID": "t4"}) == b"board unset unset t4\n"
        assert b"unset JMP_SESSION JMP_SESSION_ID; " in typed.lines[-1]
        # A task cut off by Ctrl-C before it began: what ran of its line is not known.
        collected = _Collect()
        process = await driver.spawn(TaskSpec(shell="sleep 30", env={**session, "JMP_TASK_ID": "t5"}), collected)
        await process.terminate(3.0)
        await process.wait()
        assert await show({"JMP_NODE": "other", "JMP_TASK_ID": "t6"}) == b"other unset unset t6\n"
        assert await show({**session, "JMP_TASK_ID": "t7"}) == b"board s 1 t7\n"


async def test_a_shell_replaced_behind_the_drivers_back_is_set_up_again(
    board: Board, tmp_path: Path, data_dir: Path
) -> None:
    # A new shell (here by exec; on a board, a reboot or a new login the driver did
    # not see) has neither the marker functions nor all the exports: the task's line
    # is refused there, not run, and typed again once the new shell is set up.
    from jumpstarter_driver_serial.node import _Collect
    from jumpstarter_protocol import TaskSpec

    async with served(node_config(board, tmp_path), data_dir) as server:
        driver = server.driver  # type: ignore[attr-defined]
        ran = tmp_path / "ran"
        session = {"JMP_NODE": "board", "JMP_SESSION": "s", "JMP_SESSION_ID": "1"}
        for task_id in ("t1", "t2"):
            collected = _Collect()
            spec = TaskSpec(shell=f"echo x >> {ran}; {SHOW_ENV}", env={**session, "JMP_TASK_ID": task_id})
            process = await driver.spawn(spec, collected)
            assert await process.wait() == 0
            assert bytes(collected.data) == f"board s 1 {task_id}\n".encode()
            await driver.type(b"exec env -u JMP_SESSION PS1='new$ ' sh -i\r")  # not through the console
        assert ran.read_text() == "x\nx\n"  # each ran once
        transcript = (await driver.console.read(0, 1 << 20, 0))[1]
    assert transcript.count(b"__jmp_s: ") == 1 and transcript.count(b"login:") == 1


async def test_a_person_at_a_shell_the_driver_did_not_set_up_keeps_its_prompt(
    board: Board, tmp_path: Path, data_dir: Path
) -> None:
    # The shell was replaced behind the driver's back (here by exec; on a board, a
    # shell that exited and was respawned): a person's first key gives back the
    # prompt of the shell that is there, not an empty one that no task finds.
    async with served(node_config(board, tmp_path), data_dir) as server:
        driver = server.driver  # type: ignore[attr-defined]
        assert await driver.capture("true", timeout=20) == (0, b"")
        await driver.type(b"exec env PS1='other# ' sh -i\r")
        await driver.console.write(b"echo typed\r")
        assert await driver.capture("echo after", timeout=20) == (0, b"after\n")
        assert b"other# " in (await driver.console.read(0, 1 << 20, 0))[1]


async def test_a_hung_shell_is_power_cycled(board: Board, tmp_path: Path, data_dir: Path) -> None:
    record = tmp_path / "power.log"
    power = {
        "driver": "command",
        "off": ["sh", "-c", f"echo off >> {record}"],
        "on": ["sh", "-c", f"echo on >> {record}; kill -USR1 {board.pid}"],
        "pause": 0,
    }
    protocol = protocol_for(node_config(board, tmp_path, power=power), data_dir)
    async with protocol.create_async_session("t") as session:
        node = await session.connect("board")
        # Ctrl-C kills each sleep, the loop ignores it: only the power brings it back.
        task = await node.start(["sh", "-c", "trap '' INT; echo hung; while :; do sleep 0.1; done"])
        await anyio.sleep(0.5)
        info = await task.stop(grace=1)
        assert info.state.value == "stopped"
        assert info.message == "the shell did not answer Ctrl-C within 1s: the board was power cycled"
        assert record.read_text() == "off\non\n"
        task = await node.start(["echo", "rebooted"])
        assert await output_of(task) == b"rebooted\n"
        transcript = (await node.read_console(0)).data
    assert transcript.index(b"hung") < transcript.rindex(b"simboard: power on")  # it booted again


async def test_a_task_right_after_a_power_cycle_waits_for_the_new_shell(
    board: Board, tmp_path: Path, data_dir: Path
) -> None:
    # The console stays open across the cycle (as a USB serial adapter's does): only
    # the power action tells the driver that the shell it set up is gone.
    power = {"driver": "command", "off": ["true"], "on": ["kill", "-USR1", str(board.pid)], "pause": 0}
    protocol = protocol_for(node_config(board, tmp_path, power=power), data_dir)
    async with protocol.create_async_session("t") as session:
        node = await session.connect("board")
        task = await node.start(["echo", "before"])
        assert await output_of(task) == b"before\n"
        assert await node.power("cycle") == "on"
        task = await node.start(["echo", "after", "the", "cycle"], timeout=30)
        assert await output_of(task) == b"after the cycle\n"
        assert (await task.wait()).state.value == "succeeded"
        transcript = (await node.read_console(0)).data
    assert transcript.index(b"before") < transcript.rindex(b"simboard: power on") < transcript.rindex(b"after the")


async def test_files_over_the_console(board: Board, tmp_path: Path, data_dir: Path) -> None:
    payload = os.urandom(300_000)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 65536):
            yield payload[start : start + 65536]

    async with served(node_config(board, tmp_path), data_dir) as server:
        files = server.driver.files
        target = str(tmp_path / "on-board.bin")
        assert await files.write(target, chunks()) == len(payload)
        assert Path(target).read_bytes() == payload
        # Three commands (the first creates the file, the last checks it), a resume
        # from an offset, and an empty file (one command that creates and checks).
        big, other = os.urandom(1_200_000), str(tmp_path / "big.bin")

        async def pieces(data: bytes) -> AsyncIterator[bytes]:
            yield data[:100]
            yield data[100:]

        assert await files.write(other, pieces(big)) == len(big)
        assert await files.write(other, pieces(big[500_000:]), offset=500_000) == len(big)
        assert Path(other).read_bytes() == big
        assert await files.write(other, pieces(b"")) == 0 and Path(other).read_bytes() == b""
        assert b"".join([c async for c in files.read(target)]) == payload
        assert b"".join([c async for c in files.read(target, 299_990)]) == payload[299_990:]
        stat = await files.stat(target)
        assert (stat.kind, stat.size, stat.mode) == ("file", len(payload), 0o600)
        assert await files.stat(str(tmp_path / "missing")) is None
        await files.make_dir(str(tmp_path / "d" / "e"), 0o750)
        await files.rename(target, str(tmp_path / "d" / "moved"))
        assert await files.list_dir(str(tmp_path / "d")) == ["e", "moved"]
        with pytest.raises(FileNotFoundError):
            await files.list_dir(str(tmp_path / "nope"))
        await files.chmod(str(tmp_path / "d" / "moved"), 0o644)
        assert (tmp_path / "d" / "moved").stat().st_mode & 0o777 == 0o644
        await files.remove(str(tmp_path / "d" / "moved"))
        assert not (tmp_path / "d" / "moved").exists()


async def test_a_start_over_grpc_waits_for_a_board_slower_than_the_deadline(
    tmp_path: Path, data_dir: Path
) -> None:
    """A start waits for the board's shell (boot, login) up to its boot_timeout, which
    the node announces; a client with a one-second deadline per call waits that long."""
    slow = Board("--boot", "2", "--login", "root", "--password", "s3cret")
    try:
        async with served_over_grpc(node_config(slow, tmp_path), data_dir) as url:
            async with grpc_client(url, tmp_path / "client").create_async_session("t") as session:
                node = await session.connect("board")
                assert node.info is not None and node.info.start_timeout == 20  # boot_timeout
                os.kill(slow.pid, signal.SIGUSR1)  # a power cycle: 2 s of boot from now
                task = await node.start(["echo", "after-the-boot"])
                assert await output_of(task) == b"after-the-boot\n"
                assert (await task.wait()).exit_code == 0
                transcript = (await node.read_console(0)).data
        assert transcript.count(b"simboard: power on") == 2  # the start waited for a boot
    finally:
        slow.close()
    # A board that never gets to a prompt: the driver's message, not a lost connection.
    mute = Board("--boot", "1000")
    try:
        node = node_config(mute, tmp_path)
        node.options["boot_timeout"] = 1.5
        async with served_over_grpc(node, data_dir) as url:
            config = tmp_path / "jumpstarter.toml"
            config.write_text(
                f'[nodes.board]\ntransport = "grpc"\nendpoint = "{url}"\n'
                "options = { deadline = 1 }\n"
            )
            env = {**os.environ, "JMP_CONFIG": str(config), "JMP_DATA_DIR": str(tmp_path / "c")}
            done = await anyio.run_process(
                [JMP, "run", "--node", "board", "--", "true"], env=env, check=False
            )
    finally:
        mute.close()
    stderr = done.stderr.decode()
    assert re.fullmatch(
        r"jmp: error: no shell prompt on the console of node 'board' within 1.5s "
        r"\(last printed: '[^\n]*simboard: booting, step \d+'\)\n",
        stderr,
    ), stderr
    assert done.returncode != 0 and done.stdout == b""


async def test_a_lease_over_grpc_waits_for_a_before_lease_hook_slower_than_the_deadline(
    tmp_path: Path, data_dir: Path
) -> None:
    """A lease's before_lease hook (a board's power cycle and boot, say) runs up to
    hook_timeout, which the node announces; a one-second deadline waits that long."""
    node = NodeConfig(name="board", before_lease="sleep 2")
    async with served_over_grpc(node, data_dir) as url:
        async with grpc_client(url, tmp_path / "client").create_async_session("t") as session:
            board = await session.connect("board")
            assert board.info is not None and board.info.lease_timeout == 300  # hook_timeout
            task = await board.start(["echo", "leased"])
            assert await output_of(task) == b"leased\n"


async def test_a_login_the_config_cannot_answer(board: Board, tmp_path: Path, data_dir: Path) -> None:
    node = NodeConfig(name="board", driver="serial", options={"port": board.port, "boot_timeout": 10})
    protocol = protocol_for(node, data_dir)
    async with protocol.create_async_session("t") as session:
        n = await session.connect("board")
        with pytest.raises(Exception, match=r"^the console of node 'board' asks for a login; set options.login$"):
            await n.start(["true"])


def test_bad_serial_config_is_one_line(tmp_path: Path, data_dir: Path) -> None:
    def jmp_with(config: str, *args: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "jumpstarter.toml").write_text(config)
        return run_jmp(*args)

    done = jmp_with('[nodes.b]\ndriver = "serial"\noptions = { baud = 9600 }\n', "run", "--node", "b", "--", "true")
    assert (done.returncode, done.stderr) == (1, "jmp: error: node 'b': options.port: Field required\n")
    serial = '[nodes.b]\ndriver = "serial"\noptions = { port = "/dev/null" }\n'
    done = jmp_with(serial + 'power = { on = ["x"] }\n', "power", "status", "--node", "b")
    assert done.stderr == (
        'jmp: error: jumpstarter.toml: nodes.b.power: name the power driver: power = {driver = "command", ...}\n'
    )
    done = jmp_with(serial + 'power = { driver = "nosuch" }\n', "power", "status", "--node", "b")
    assert done.stderr == "jmp: error: unknown power driver 'nosuch'; installed: command, http\n"
    done = jmp_with(serial + 'power = { driver = "command", on = ["x"] }\n', "power", "on", "--node", "b")
    assert done.stderr == "jmp: error: power.off: the command power driver needs one\n"
    # Lease hooks with power steps (in-process: these are refused before anything runs).
    def cli_with(config: str, *args: str) -> tuple[int, str]:
        from click.testing import CliRunner
        from jumpstarter.cli import cli

        (tmp_path / "jumpstarter.toml").write_text(config)
        result = CliRunner().invoke(cli, list(args))
        return result.exit_code, result.stderr

    assert cli_with(serial + 'after_lease = ["echo bye", "power off"]\n', "run", "--node", "b", "--", "true") == (1, (
        "jmp: error: node 'b': after_lease: 'power off' needs power control; give the node one in the config: "
        'power = {driver = "command", on = [...], off = [...]}\n'
    ))
    assert cli_with(serial + 'before_lease = ["power reboot"]\n', "run", "--node", "b", "--", "true") == (1, (
        "jmp: error: jumpstarter.toml: nodes.b.before_lease: step 1: 'power reboot' is no power step; "
        "use 'power on', 'power off' or 'power cycle'\n"
    ))
    assert cli_with(serial + "after_lease = 3\n", "run", "--node", "b", "--", "true") == (1, (
        'jmp: error: jumpstarter.toml: nodes.b.after_lease: expected a shell command or a list of steps such as '
        '["power off"], got 3\n'
    ))
    assert not list(data_dir.glob("*.db"))  # nothing was recorded


def test_jmp_cp_over_the_console_both_ways(board: Board, tmp_path: Path, data_dir: Path) -> None:
    import hashlib

    (tmp_path / "jumpstarter.toml").write_text(
        f'[nodes.board]\ndriver = "serial"\noptions = {{ port = "{board.port}", login = "root", password = "s3cret" }}\n'
    )
    payload = os.urandom(100_000)
    (tmp_path / "fw.bin").write_bytes(payload)
    on_board = tmp_path / "board-tmp"  # the simulated board's shell runs on this machine
    on_board.mkdir()
    done = run_jmp("cp", "fw.bin", f"board:{on_board}/fw.bin")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    done = run_jmp("run", "-n", "--node", "board", "--", "sha256sum", f"{on_board}/fw.bin")
    assert done.stdout.split()[0] == hashlib.sha256(payload).hexdigest()  # the board's own sha256sum
    done = run_jmp("cp", f"board:{on_board}/fw.bin", "back.bin")
    assert (done.returncode, done.stderr) == (0, "")
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).digest() == hashlib.sha256(payload).digest()
    # Bad input: one line each, nothing left behind.
    done = run_jmp("cp", f"board:{on_board}/no-such.bin", "missing.bin")
    assert (done.returncode, done.stderr) == (3, f"jmp: error: {on_board}/no-such.bin: no such file on node 'board'\n")
    done = run_jmp("cp", "fw.bin", f"board:{on_board}/no-dir/fw.bin")
    assert (done.returncode, done.stderr) == (
        3, f"jmp: error: {on_board}/no-dir/fw.bin: no directory {on_board}/no-dir on node 'board'\n"
    )
    assert not (tmp_path / "missing.bin").exists() and sorted(os.listdir(on_board)) == ["fw.bin"]
    # Something on the board writes to the file while it arrives: the board's sha256
    # differs from what was sent, and nothing is left under either name. (Two chunks:
    # the first command creates the file, the meddling lands while the second is typed.)
    from jumpstarter_driver_serial.files import CHUNK

    (tmp_path / "big.bin").write_bytes(os.urandom(CHUNK + 300_000))
    def meddle() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for name in os.listdir(on_board):
                if name.endswith(".jmp-part"):
                    with open(on_board / name, "ab") as part:
                        part.write(b"written on the board meanwhile")
                    return
            time.sleep(0.002)

    meddler = threading.Thread(target=meddle)
    meddler.start()
    done = run_jmp("cp", "big.bin", f"board:{on_board}/again.bin")
    meddler.join()
    assert (done.returncode, done.stderr) == (
        2, f"jmp: error: {on_board}/again.bin: checksum mismatch after writing over the console on node 'board'\n"
    )
    assert sorted(os.listdir(on_board)) == ["fw.bin"]


# --- power back ends ---------------------------------------------------------------------


def recorder(tmp_path: Path) -> tuple[Path, Path]:
    """A script that appends its arguments to a file (and says 'on' for status)."""
    log = tmp_path / "asked.log"
    script = tmp_path / "relay.sh"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = status ] && echo "port 2: on"\n[ "$1" != fail ]\n')
    script.chmod(0o755)
    return script, log


async def test_command_power(tmp_path: Path) -> None:
    from jumpstarter_driver_serial import CommandPower

    script, log = recorder(tmp_path)
    power = CommandPower({"on": [str(script), "on", "2"], "off": [str(script), "off", "2"], "pause": 0.1})
    assert await power.status() == "unknown"
    await power.cycle()  # no cycle of its own: off, pause, on
    assert await power.status() == "on"
    await power.off()
    assert await power.status() == "off"
    with_status = CommandPower({"on": [str(script), "on"], "off": [str(script), "off"], "status": [str(script), "status"],
                                "cycle": [str(script), "cycle"]})
    assert await with_status.status() == "on"
    await with_status.cycle()
    assert log.read_text() == "off 2\non 2\noff 2\nstatus\ncycle\n"
    failing = CommandPower({"on": [str(script), "fail", "now"], "off": ["/no/such/relay"]})
    with pytest.raises(PowerFailed, match=rf"^power on: {script} exited with 1$"):
        await failing.on()
    with pytest.raises(PowerFailed, match=r"^power off: command not found: /no/such/relay$"):
        await failing.off()
    with pytest.raises(ConfigError, match=r"^power.off: the command power driver needs one$"):
        CommandPower({"on": ["true"]})
    with pytest.raises(ConfigError, match=r"^power.on: expected a command as a list of strings, got 'uhubctl -a on'$"):
        CommandPower({"on": "uhubctl -a on", "off": ["true"]})


@pytest.fixture
def pdu() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 playing a smart PDU: it records each request."""
    asked: list[str] = []
    state = {"power": "off"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            asked.append(f"{self.command} {self.path}")
            if self.path == "/broken":
                self.send_error(500, "relay stuck")
                return
            if self.path.endswith(("/on", "/off")):
                state["power"] = self.path.rsplit("/", 1)[1]
            body = f'{{"outlet": 3, "state": "{state["power"]}"}}'.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", asked
    server.shutdown()
    server.server_close()
    thread.join()


async def test_http_power(pdu: tuple[str, list[str]]) -> None:
    from jumpstarter_driver_serial import HttpPower

    url, asked = pdu
    power = HttpPower({"on": f"{url}/outlet/3/on", "off": f"{url}/outlet/3/off", "status": f"{url}/outlet/3", "pause": 0})
    await power.on()
    assert await power.status() == "on"
    await power.cycle()
    assert await power.status() == "on"
    assert asked == ["POST /outlet/3/on", "GET /outlet/3", "POST /outlet/3/off", "POST /outlet/3/on", "GET /outlet/3"]
    broken = HttpPower({"on": f"{url}/broken", "off": "http://127.0.0.1:9/off"})
    with pytest.raises(PowerFailed, match=rf"^power on: POST {url}/broken answered 500 relay stuck$"):
        await broken.on()
    with pytest.raises(PowerFailed, match=r"^power off: POST http://127.0.0.1:9/off: "):
        await broken.off()


def test_jmp_power_through_the_cli(board: Board, tmp_path: Path, data_dir: Path) -> None:
    script, log = recorder(tmp_path)
    (tmp_path / "jumpstarter.toml").write_text(
        f"[nodes.b]\ndriver = \"serial\"\noptions = {{ port = \"{board.port}\" }}\n"
        f'power = {{ driver = "command", on = ["{script}", "on"], off = ["{script}", "off"], pause = 0 }}\n'
        f"[nodes.broken]\ndriver = \"serial\"\noptions = {{ port = \"{board.port}\" }}\n"
        f'power = {{ driver = "command", on = ["{script}", "fail"], off = ["{script}", "off"] }}\n'
    )
    done = run_jmp("power", "cycle", "--node", "b")
    assert (done.returncode, done.stdout, done.stderr) == (0, "b: on\n", "")
    done = run_jmp("power", "off", "--node", "b")
    assert done.stdout == "b: off\n"
    assert log.read_text() == "off\non\noff\n"
    done = run_jmp("power", "on", "--node", "broken")
    assert (done.returncode, done.stderr) == (5, f"jmp: error: power on: {script} exited with 1\n")
    done = run_jmp("power", "status")
    assert (done.returncode, done.stderr) == (
        2,
        "jmp: error: node 'local' has no power control; give it one in the config: "
        'power = {driver = "command", on = [...], off = [...]}\n',
    )
    done = run_jmp("console", "--log")
    assert (done.returncode, done.stderr) == (2, "jmp: error: node 'local' has no console (driver 'local')\n")


# --- power from lease hooks -----------------------------------------------------------


def test_lease_hooks_power_the_board_and_a_failing_power_off_makes_it_unhealthy(
    board: Board, lab, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg
    from test_lab import _ci, _row, _until
    from test_many_machines import _wait_registered

    def problem() -> str | None:
        with psycopg.connect(postgres_url) as db:
            return db.execute("SELECT unhealthy FROM nodes WHERE name = 'b1'").fetchone()[0]

    log, stuck = tmp_path / "relay.log", tmp_path / "relay-stuck"
    relay = tmp_path / "relay.sh"
    relay.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n'
        f'if [ "$1" = off ] && [ -e {stuck} ]; then echo "relay 2 stuck" >&2; exit 1; fi\n'
    )
    relay.chmod(0o755)
    agent_config = tmp_path / "agent.toml"
    agent_config.write_text(
        f'[nodes.b1]\ndriver = "serial"\noptions = {{ port = "{board.port}", login = "root", password = "s3cret" }}\n'
        f'power = {{ driver = "command", on = ["{relay}", "on"], off = ["{relay}", "off"], pause = 0 }}\n'
        f'before_lease = ["power on", "echo before $JMP_SESSION >> {log}"]\n'
        'after_lease = ["power off"]\n'
    )
    monkeypatch.setenv("JMP_CONFIG", str(agent_config))
    lab("b1", "pool=boards")
    env = _ci(tmp_path, postgres_url)
    _wait_registered(postgres_url, {"b1"})
    done = run_jmp("run", "--node", "b1", "--session", "first", "--", "echo", "on-the-board", env=env)
    assert (done.returncode, done.stdout) == (0, "on-the-board\n"), done.stderr
    _until(lambda: log.read_text().endswith("off\n"), "after_lease powered the board off")
    assert log.read_text() == "on\nbefore first\noff\n"
    # The relay sticks: the lease ends, its power off fails, the node goes to no one.
    stuck.touch()
    done = run_jmp("run", "--node", "b1", "--session", "second", "--", "true", env=env)
    assert done.returncode == 0, done.stderr
    error = f"after_lease failed: power off: {relay} exited with 1: relay 2 stuck"
    _until(lambda: problem() is not None, "b1 unhealthy")
    row = _row(env, "b1")
    assert (row[1], row[-1]) == ("unhealthy", error)
    by_label = run_jmp("run", "--select", "pool=boards", "--", "true", env=env)
    assert (by_label.returncode, by_label.stderr) == (4, "jmp: error: no free node matches pool=boards: b1 (unhealthy)\n")
    assert log.read_text() == "on\nbefore first\noff\non\nbefore second\noff\n"


async def test_a_power_step_that_fails_before_a_lease_is_one_line(board: Board, tmp_path: Path, data_dir: Path) -> None:
    from jumpstarter.errors import Unavailable

    script, log = recorder(tmp_path)
    power = {"driver": "command", "on": [str(script), "fail"], "off": [str(script), "off"], "pause": 0}
    protocol = protocol_for(node_config(board, tmp_path, power=power, before_lease=["power cycle", "touch ran"]), data_dir)
    async with protocol.create_async_session("t") as session:
        error = f"before_lease failed: power on: {script} exited with 1"  # the on within the cycle
        with pytest.raises(Unavailable, match=rf"^node 'board' is unhealthy: {error} \(it is leased again"):
            await session.connect("board")
    assert log.read_text() == "off\nfail\n"  # off, then the on that failed; the next step never ran
    assert not (tmp_path / "ran").exists()


def test_the_blocking_api_powers_the_board_and_reads_its_console(board: Board, tmp_path: Path, data_dir: Path) -> None:
    from jumpstarter.errors import BadRequest, Unavailable

    script, log = recorder(tmp_path)
    power = {"driver": "command", "on": [str(script), "on"], "off": [str(script), "fail"],
             "status": [str(script), "status"], "pause": 0}
    with protocol_for(node_config(board, tmp_path, power=power), data_dir).create_session("sync") as session:
        node = session.connect("board")
        assert node.power("on") == "on"  # the state after it, from the status command
        with pytest.raises(Unavailable, match=rf"^power off: {script} exited with 1$"):
            node.power("off")
        with pytest.raises(BadRequest, match=r"^invalid action: Input should be 'on', 'off', 'cycle' or 'status'$"):
            node.power("reboot")
        assert log.read_text() == "on\nstatus\nfail\n"
        assert node.start(["echo", "from-a-task"]).wait().exit_code == 0
        seen = node.read_console(0)
        assert b"simboard login: root" in seen.data and seen.busy is None
        node.write_console(b"echo typed-through-$((6*7))\r")
        typed = b""
        while b"typed-through-42" not in typed:
            chunk = node.read_console(seen.end, wait=5)
            assert chunk.data, typed  # no echo within 5 s
            typed += chunk.data
            seen = chunk


def test_jmp_console_log(board: Board, tmp_path: Path, data_dir: Path) -> None:
    node = node_config(board, tmp_path)
    (tmp_path / "jumpstarter.toml").write_text(
        f'[nodes.board]\ndriver = "serial"\noptions = {{ port = "{board.port}", login = "root", password = "s3cret" }}\n'
    )
    done = run_jmp("run", "--node", "board", "--", "echo", "from-the-board")
    assert (done.returncode, done.stdout) == (0, "from-the-board\n")
    done = run_jmp("console", "--node", "board", "--log")
    assert done.returncode == 0
    assert "simboard login: root" in done.stdout and "from-the-board" in done.stdout
    assert node.name == "board"


def test_the_transcript_rotates_at_its_size_limit_and_jmp_console_log_shows_what_is_kept(
    board: Board, tmp_path: Path, data_dir: Path
) -> None:
    (tmp_path / "jumpstarter.toml").write_text(
        f'[nodes.board]\ndriver = "serial"\noptions = {{ port = "{board.port}", login = "root", password = "s3cret", '
        'console_log_size = "4K" }\n'
    )
    done = run_jmp("run", "-n", "--node", "board", "--", "seq", "1", "3000")  # 13893 bytes, CR LF on the console
    assert (done.returncode, done.stdout) == (0, "".join(f"{i}\n" for i in range(1, 3001)))
    logs = data_dir / "nodes" / "board"
    newer, older = (logs / "console.log").read_bytes(), (logs / "console.log.1").read_bytes()
    assert sorted(p.name for p in logs.iterdir()) == ["console.log", "console.log.1"]  # one old file kept
    assert len(older) == 4096 and 0 < len(newer) <= 4096  # rotated at the limit
    assert b"simboard: booting" not in older + newer  # the oldest bytes are gone
    shown = subprocess.run([JMP, "console", "--node", "board", "--log"], capture_output=True, timeout=60)
    assert (shown.returncode, shown.stderr) == (0, b"")
    assert shown.stdout == older + newer
    # In order: the retained numbers (after the line the rotation cut) are one unbroken run up to 3000.
    numbers = [int(line) for line in shown.stdout.split(b"\r\n")[1:] if line.isdigit()]
    assert numbers == list(range(numbers[0], 3001)) and numbers[0] > 1
    # A node server of its own again: it finds the shell the last one left at its prompt.
    done = run_jmp("run", "-n", "--node", "board", "--", "echo", "after-a-restart")
    assert done.returncode == 0, done.stderr
    assert b"after-a-restart" in (logs / "console.log").read_bytes() + (logs / "console.log.1").read_bytes()
    bad = tmp_path / "jumpstarter.toml"
    bad.write_text(bad.read_text().replace('"4K"', '"lots"'))
    done = run_jmp("console", "--node", "board", "--log")
    assert (done.returncode, done.stderr) == (1, (
        "jmp: error: node 'board': options.console_log_size: "
        "Value error, expected bytes such as 8M, 512K or 1048576, got 'lots'\n"
    ))


async def test_a_transcript_offset_stays_valid_across_a_rotation(board: Board, tmp_path: Path, data_dir: Path) -> None:
    node = node_config(board, tmp_path)
    node.options["console_log_size"] = 2048
    async with protocol_for(node, data_dir).create_async_session("t") as session:
        n = await session.connect("board")
        mark = (await n.read_console(None)).end
        task = await n.start(shell="seq 1 2000")  # 8893 bytes: rotated more than once
        assert (await task.wait()).exit_code == 0
        seen = await n.read_console(0)
        assert seen.offset > mark  # what 0 named was dropped: it reads from the oldest byte kept
        kept = b""
        offset = seen.offset
        while offset < seen.end:
            chunk = await n.read_console(offset)
            assert chunk.offset == offset
            kept += chunk.data
            offset += len(chunk.data)
        assert b"1999\r\n2000\r\n" in kept


def test_the_sim_board_loses_what_is_typed_while_it_boots(tmp_path: Path) -> None:
    """The simulated board itself: bytes typed before its shell is ready are gone."""
    import termios
    import tty

    b = Board("--boot", "0.5")
    try:
        fd = os.open(b.port, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        os.write(fd, b"echo early\r")
        seen = b""
        while b"# " not in seen:
            seen += os.read(fd, 4096)
        os.write(fd, b"echo late\r")
        while b"late\r\nroot" not in seen:
            seen += os.read(fd, 4096)
        assert b"early" not in seen
        assert b"echo late\r\n" in seen  # the shell's terminal echoes, with CR LF
        termios.tcflush(fd, termios.TCIOFLUSH)
        os.close(fd)
    finally:
        b.close()
    assert signal.SIGUSR1  # the board's power cycle (see test_a_hung_shell_is_power_cycled)


async def test_the_driver_works_over_a_board_paced_as_a_9600_baud_uart(tmp_path: Path, data_dir: Path) -> None:
    # Pieces of the shell's relay arrive a byte at a time at 9600 baud: the driver
    # finds the shell, a task's line with its JMP_* variables gets through whole.
    b = Board("--baud", "9600")
    try:
        node = NodeConfig(name="board", driver="serial", options={"port": b.port, "boot_timeout": 20})
        async with protocol_for(node, data_dir).create_async_session("t") as session:
            task = await (await session.connect("board")).start(shell='echo "paced $JMP_NODE"')
            assert await output_of(task) == b"paced board\n"
            assert (await task.wait()).exit_code == 0
    finally:
        b.close()


async def test_what_the_board_printed_before_the_port_opened_is_kept() -> None:
    """A node that opens the console after the board booted (a loaded machine, a
    restart) still gets the boot log waiting in the terminal's buffer: pyserial's
    open() would flush it."""
    from jumpstarter_driver_serial.console import PortConsole

    b = Board("--boot", "0.2", "--login", "root")
    try:
        assert b.process.stdout is not None
        assert b.process.stdout.readline() == "booted\n"  # all of it printed, unread
        console = PortConsole(b.port)
        try:
            seen = b""
            with anyio.move_on_after(10):  # a flushed buffer: nothing more comes
                while b"login: " not in seen:
                    seen += await console.read()
        finally:
            await console.aclose()
    finally:
        b.close()
    assert seen.startswith(b"simboard: power on\r\n")
    assert b"simboard: booting, step 0" in seen


class Switch:
    """An inline plugin's power driver: it keeps the state in memory."""

    presses: list[str] = []


async def test_a_plugin_registers_a_power_driver(data_dir: Path) -> None:
    from jumpstarter import hookimpl
    from jumpstarter.errors import PluginError
    from jumpstarter.plugins import PowerDriver

    class MemorySwitch(PowerDriver):
        def __init__(self, options: dict[str, object]) -> None:
            super().__init__(options)
            self.state = "off"
            self.outlet = self.options["outlet"]

        async def on(self) -> None:
            Switch.presses.append(f"on {self.outlet}")
            self.state = "on"

        async def off(self) -> None:
            Switch.presses.append(f"off {self.outlet}")
            self.state = "off"

        async def status(self) -> str:  # type: ignore[override]
            return self.state

    class Plugin:
        @hookimpl
        def jmp_register_power_drivers(self, register):  # type: ignore[no-untyped-def]
            register("memory", MemorySwitch)

    plugins = get_plugin_manager({"JMP_PLUGINS": "local"}, extra=[Plugin()])
    assert plugins.power_driver("memory") is MemorySwitch
    # Any node driver gets the power of its config: here the local node.
    node = NodeConfig(name="desk", power={"driver": "memory", "outlet": 4, "pause": 0})
    protocol = JumpStarterProtocol(Config(data_dir=data_dir, nodes={"desk": node}), plugins=plugins)
    async with protocol.create_async_session("t") as session:
        n = await session.connect("desk")
        assert await n.power("status") == "off"
        assert await n.power("cycle") == "on"  # off, pause, on: the default cycle
        assert await n.power("off") == "off"
    assert Switch.presses == ["off 4", "on 4", "off 4"]
    twice = get_plugin_manager({"JMP_PLUGINS": "serial"}, extra=[Plugin(), Plugin()])
    with pytest.raises(PluginError, match=r"^power driver 'memory' is registered twice: by plugin "):
        twice.power_drivers  # noqa: B018
    with pytest.raises(PluginError, match=r"^unknown power driver 'nosuch'; installed: command, http \(JMP_PLUGINS is set: only 'serial' may load\)$"):
        get_plugin_manager({"JMP_PLUGINS": "serial"}).power_driver("nosuch")


def test_the_console_escape_keys() -> None:
    from jumpstarter.cli.console import Keys

    keys = Keys()
    assert keys.feed(b"ls\r") == (b"ls\r", False)
    # The terminal answers the shell's cursor query as if typed: still a line's start.
    assert keys.feed(b"\x1b[12;5R") == (b"\x1b[12;5R", False)
    assert keys.feed(b"~.") == (b"", True)
    keys = Keys()
    assert keys.feed(b"a~.b\r~~x\r~q\r~") == (b"a~.b\r~x\r~q\r", False)
    assert keys.feed(b".") == (b"", True)
    assert Keys(read_only=True).feed(b"ab\x03") == (b"ab", True)
