"""The QEMU board end to end: Debian's kernel and a busybox initramfs in
qemu-system-x86_64 under TCG, its serial console behind the serial node driver, its
power the VM itself. One board, booted once, serves every test here: a node server
on its own event loop (a thread), reached over gRPC on 127.0.0.1 by the tests and by
real ``jmp`` processes."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from jumpstarter.config import Config, NodeConfig
from jumpstarter.protocol import JumpStarterProtocol

sys.path.insert(0, str(Path(__file__).parent))
from conftest import JMP, run_jmp  # noqa: E402
from serial_boards import qemu_options  # noqa: E402

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@dataclass
class QemuBoard:
    portal: BlockingPortal
    server: Any
    url: str
    data_dir: Path
    config_file: Path

    def protocol(self, data_dir: Path) -> JumpStarterProtocol:
        node = NodeConfig(name="vboard", transport="grpc", endpoint=self.url)
        return JumpStarterProtocol(Config(data_dir=data_dir, nodes={"vboard": node}))

    def transcript(self) -> bytes:
        return (self.data_dir / "nodes" / "vboard" / "console.log").read_bytes()


@pytest.fixture(scope="session")
def qemu_board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QemuBoard]:
    tmp = tmp_path_factory.mktemp("qemu")
    options = qemu_options(tmp)
    if options is None:
        pytest.skip("needs qemu-system-x86_64, busybox and Debian's kernel (see .ci/run)")
    node = NodeConfig(name="vboard", driver="qemu", options={**options, "boot_timeout": 180})
    data_dir = tmp / "data"
    config = Config(data_dir=data_dir, nodes={"vboard": node})
    with start_blocking_portal() as portal:
        protocol = JumpStarterProtocol(config)
        server = protocol.make_node_server(node)
        transport = protocol.plugins.transport("grpc")
        listening: list[str] = []

        async def serve(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(server.run)
                ready = anyio.Event()

                def on_ready(url: str) -> None:
                    listening.append(url)
                    ready.set()

                tg.start_soon(transport.serve, server, {"listen": "127.0.0.1:0", "ready": on_ready})
                await ready.wait()
                task_status.started()
                await anyio.sleep_forever()

        future, _ = portal.start_task(serve)
        config_file = tmp / "client.toml"
        config_file.write_text(f'[nodes.vboard]\ntransport = "grpc"\nendpoint = "{listening[0]}"\n')
        try:
            yield QemuBoard(portal, server, listening[0], data_dir, config_file)
        finally:
            server.close()
            future.cancel()
    assert not server.driver.vm.running


KERNEL_LINE = re.compile(rb"^\[ *\d+\.\d+\] .*\n", re.MULTILINE)


def without_kernel(output: bytes) -> bytes:
    """A task's output without the kernel's own lines: the kernel prints on the
    console too (a clock source switched, late in the boot), and a console is one
    stream."""
    return KERNEL_LINE.sub(b"", output)


async def run(board: QemuBoard, tmp_path: Path, **start: Any) -> tuple[Any, bytes]:
    async with board.protocol(tmp_path / "client").create_async_session("qemu") as session:
        node = await session.connect("vboard", wait=60)
        task = await node.start(**start)
        output = b"".join([chunk.data async for chunk in task.output()])
        return await task.wait(), without_kernel(output)


async def test_run_exit_codes_and_a_timeout(qemu_board: QemuBoard, tmp_path: Path) -> None:
    info, output = await run(qemu_board, tmp_path, argv=["uname", "-sr"])
    assert (info.state.value, output) == ("succeeded", b"Linux " + output[6:])
    assert output.startswith(b"Linux 6.") and output.endswith(b"-amd64\n")
    info, output = await run(qemu_board, tmp_path, shell="echo oops >&2; exit 7")
    assert (info.state.value, info.exit_code, output) == ("failed", 7, b"oops\n")
    info, output = await run(qemu_board, tmp_path, shell="echo waiting; sleep 60", timeout=2)
    assert (info.state.value, output) == ("timed_out", b"waiting\n")
    info, output = await run(qemu_board, tmp_path, argv=["cat", "/proc/cmdline"])
    assert output == b"console=ttyS0 panic=-1\n"


async def test_stop_of_a_hung_command_power_cycles_the_board(qemu_board: QemuBoard, tmp_path: Path) -> None:
    async with qemu_board.protocol(tmp_path / "client").create_async_session("qemu") as session:
        node = await session.connect("vboard", wait=60)
        # A Ctrl-C that is answered: the prompt comes back, no power cycle.
        task = await node.start(["sleep", "60"])
        await anyio.sleep(0.5)
        info = await task.stop(grace=5)
        assert (info.state.value, info.message) == ("stopped", None)
        starts = qemu_board.server.driver.vm.starts
        task = await node.start(shell="trap '' INT; echo hung; while :; do sleep 0.2; done")
        await anyio.sleep(0.5)
        info = await task.stop(grace=2)
        assert info.state.value == "stopped"
        assert info.message == "the shell did not answer Ctrl-C within 2s: the board was power cycled"
        assert qemu_board.server.driver.vm.starts == starts + 1
        task = await node.start(["echo", "back"])
        assert without_kernel(b"".join([c.data async for c in task.output()])) == b"back\n"


async def test_poweroff_inside_a_task_and_the_node_powers_it_on(qemu_board: QemuBoard, tmp_path: Path) -> None:
    starts = qemu_board.server.driver.vm.starts
    # TERM ignored: busybox's shutdown has to SIGKILL the shell, so no end marker comes.
    info, _ = await run(qemu_board, tmp_path, shell="trap '' TERM; poweroff; sleep 60")
    assert info.state.value == "failed"
    assert info.message == "the board's console closed while the task ran (it powered off or rebooted)"
    info, output = await run(qemu_board, tmp_path, argv=["echo", "powered", "on", "again"])
    assert output == b"powered on again\n"
    assert qemu_board.server.driver.vm.starts == starts + 1
    assert b"reboot: Power down" in qemu_board.transcript()


def test_jmp_cp_round_trip_with_checksum(qemu_board: QemuBoard, tmp_path: Path) -> None:
    # Through real jmp processes over gRPC; busybox's base64 and sha256sum on the board.
    env = {**os.environ, "JMP_CONFIG": str(qemu_board.config_file)}
    payload = os.urandom(64 * 1024)
    (tmp_path / "fw.bin").write_bytes(payload)
    done = run_jmp("cp", str(tmp_path / "fw.bin"), "vboard:/tmp/fw.bin", env=env, timeout=240)
    assert (done.returncode, done.stderr) == (0, "")
    done = run_jmp("run", "-n", "--node", "vboard", "--", "sha256sum", "/tmp/fw.bin", env=env, timeout=240)
    assert done.stdout.split()[:2] == [hashlib.sha256(payload).hexdigest(), "/tmp/fw.bin"]
    done = run_jmp("cp", "vboard:/tmp/fw.bin", str(tmp_path / "back.bin"), env=env, timeout=240)
    assert (done.returncode, done.stderr) == (0, "")
    assert (tmp_path / "back.bin").read_bytes() == payload


def test_jmp_power_cycle_then_the_boot_log_in_the_transcript(qemu_board: QemuBoard) -> None:
    env = {**os.environ, "JMP_CONFIG": str(qemu_board.config_file)}
    before = qemu_board.transcript().count(b"Linux version")
    done = run_jmp("power", "cycle", "--node", "vboard", env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "vboard: on\n", "")
    done = run_jmp("run", "--node", "vboard", "--", "echo", "booted", env=env, timeout=240)
    assert (done.returncode, done.stdout) == (0, "booted\n")
    done = run_jmp("console", "--node", "vboard", "--log", env=env)
    assert done.returncode == 0
    assert done.stdout.count("Linux version") == before + 1
    assert "Run /init as init process" in done.stdout.rsplit("Linux version", 1)[1]
    done = run_jmp("power", "status", "--node", "vboard", env=env)
    assert done.stdout == "vboard: on\n"


def test_a_kernel_panic_is_in_the_transcript(qemu_board: QemuBoard) -> None:
    env = {**os.environ, "JMP_CONFIG": str(qemu_board.config_file)}
    done = run_jmp("run", "--node", "vboard", "--shell", "--", "echo c > /proc/sysrq-trigger; sleep 60", env=env,
                   timeout=240)
    assert done.returncode == 129  # -1: the console hung up
    done = run_jmp("console", "--node", "vboard", "--log", env=env)
    assert "Kernel panic - not syncing: sysrq triggered crash" in done.stdout
    done = run_jmp("run", "--node", "vboard", "--", "echo", "alive", env=env, timeout=240)
    assert (done.returncode, done.stdout) == (0, "alive\n")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_jmp_console_under_tmux(qemu_board: QemuBoard, tmp_path: Path) -> None:
    name = f"jmp-console-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "JMP_CONFIG": str(qemu_board.config_file)}

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", *args], capture_output=True, text=True, env=env, check=True).stdout

    def screen_shows(text: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = tmux("capture-pane", "-p", "-S", "-100", "-t", name)
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not on the screen:\n{screen}")

    done = run_jmp("run", "--node", "vboard", "--", "true", env=env, timeout=240)  # booted
    assert done.returncode == 0
    tmux("new-session", "-d", "-s", name, "-x", "120", "-y", "40", "sh")
    try:
        tmux("send-keys", "-t", name, f"JMP_CONFIG={qemu_board.config_file} {JMP} console --node vboard", "Enter")
        screen_shows("~. leaves")
        tmux("send-keys", "-t", name, "echo from-tmux-$((6*7))", "Enter")
        screen_shows("from-tmux-42")
        tmux("send-keys", "-t", name, "~.")
        screen_shows("jmp: left the console")
        # The terminal is as it was: canonical mode and echo back on.
        tmux("send-keys", "-t", name, "stty -a | tr ' ' '\\n' | grep -x -e icanon -e echo | tr '\\n' +", "Enter")
        screen_shows("icanon+echo+")
    finally:
        tmux("kill-session", "-t", name)


def test_a_task_after_a_person_used_the_console_finds_its_shell(qemu_board: QemuBoard) -> None:
    env = {**os.environ, "JMP_CONFIG": str(qemu_board.config_file)}
    assert run_jmp("run", "--node", "vboard", "--", "true", env=env, timeout=240).returncode == 0
    typed = subprocess.run(  # a person's keys, then ~. to leave, as under tmux above
        [JMP, "console", "--node", "vboard"], input="echo typed-$((6*7))\r~.", capture_output=True,
        text=True, env=env, timeout=60,
    )
    assert typed.returncode == 0, typed.stderr
    done = run_jmp("run", "--node", "vboard", "--", "echo", "after-console", env=env, timeout=240)
    assert (done.returncode, done.stdout) == (0, "after-console\n"), done.stderr


def test_jmp_run_pipes_its_input_to_a_task_on_the_board(qemu_board: QemuBoard) -> None:
    env = {**os.environ, "JMP_CONFIG": str(qemu_board.config_file)}
    piped = "first $((6*7))\nsecond\n"  # typed on the console: cat gets it, the shell never
    done = run_jmp("run", "--node", "vboard", "--", "cat", input=piped, env=env, timeout=240)
    assert (done.returncode, done.stdout) == (0, piped), done.stderr
    done = run_jmp("run", "--node", "vboard", "--", "head", "-n1", input=piped, env=env, timeout=240)
    assert (done.returncode, done.stdout) == (0, "first $((6*7))\n"), done.stderr
    done = run_jmp("run", "--node", "vboard", "--", "echo", "then", env=env, timeout=240)
    assert (done.returncode, done.stdout) == (0, "then\n"), done.stderr
    # The line head left unread did not run on the shell (its echo is off: only its
    # error would show), nor did its Ctrl-D end it.
    after = qemu_board.transcript().rsplit(b"first $((6*7))", 1)[1]
    assert b"second: not found" not in after and b"BusyBox v" not in after
