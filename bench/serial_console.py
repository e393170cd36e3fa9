"""The serial driver's figures (issue 15), each beside the same work done raw.

The simulated board is tests/sim_board.py (a PTY pair, a real ``sh`` behind it). A
driver holds its port, so the raw baseline runs on a second board started the same
way, with the same shell set up the same way (echo off, a prompt of its own). The
QEMU figure boots tests/serial_boards.py's board (skipped where QEMU or the kernel is
missing).
"""

from __future__ import annotations

import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tty
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from jumpstarter.config import Config, NodeConfig
from jumpstarter.protocol import JumpStarterProtocol

from ._common import alternate
from ._figure import Figure, figure

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
from serial_boards import qemu_options, sim_board_command  # noqa: E402

RAW_PROMPT = b"RAW-PROMPT> "


class SimBoard:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(sim_board_command(*args), stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.port = self.process.stdout.readline().strip()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


class RawShell:
    """The baseline: the board's PTY opened, the shell set up as the driver sets it
    up, then commands written and the output read up to the prompt, nothing more."""

    def __init__(self, port: str) -> None:
        self.fd = os.open(port, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.buffer = bytearray(1024 * 1024)
        self.written = 0  # bytes written to the console by run()
        os.write(self.fd, b"\r")
        self.read_to(b"# ")
        os.write(self.fd, b"stty -echo; PS1='RAW-''PROMPT> '; PS2=''\r")
        self.read_to(RAW_PROMPT)

    def read_to(self, end: bytes) -> int:
        got = 0
        tail = b""
        view = memoryview(self.buffer)
        while not tail.endswith(end):
            n = os.readv(self.fd, [self.buffer])
            got += n
            tail = (tail + bytes(view[: min(n, 64)] if n <= 64 else view[n - 64 : n]))[-64:]
        return got

    def run(self, line: bytes) -> int:
        self.written += os.write(self.fd, line + b"\r")
        return self.read_to(RAW_PROMPT)

    def close(self) -> None:
        os.close(self.fd)


@asynccontextmanager
async def serial_node(port: str, data_dir: Path) -> AsyncIterator[Any]:
    node = NodeConfig(name="board", driver="serial", options={"port": port})
    protocol = JumpStarterProtocol(Config(data_dir=data_dir, nodes={"board": node}))
    async with protocol.create_async_session("bench") as session:
        yield await session.connect("board")


def _on_two_boards(main: Callable[[str, RawShell, Path], Awaitable[Any]], *board_args: str) -> Any:
    """``anyio.run(main, port, raw, data_dir)``: ours on the port of one simulated
    board, the raw baseline's :class:`RawShell` on a second one started the same way
    (``board_args``), a scratch directory; both boards closed after."""
    ours_board = SimBoard(*board_args)
    try:
        raw_board = SimBoard(*board_args)
        try:
            raw = RawShell(raw_board.port)
            try:
                with tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp:
                    return anyio.run(main, ours_board.port, raw, Path(tmp))
            finally:
                raw.close()
        finally:
            raw_board.close()
    finally:
        ours_board.close()


@figure
def run_true(quick: bool) -> list[Figure]:
    """run `true` on the simulated board vs the command written and read to the prompt, raw"""
    n = 50 if quick else 200

    async def main(port: str, raw: RawShell, data_dir: Path) -> tuple[list[float], list[float]]:
        async with serial_node(port, data_dir) as node:

            async def ours() -> None:
                task = await node.start(["true"])
                assert (await task.wait()).exit_code == 0

            async def baseline() -> None:
                raw.run(b"true")

            await alternate(5, ours, baseline)
            return await alternate(n, ours, baseline)

    ours, base = _on_two_boards(main)
    return [
        Figure(
            f"run `true` on the simulated board (median of {n})",
            statistics.median(ours) * 1000,
            statistics.median(base) * 1000,
            "ms",
            "<= 2x",
            "the command written and read to the prompt, raw, on a PTY board",
        )
    ]


@figure
def run_true_driver(quick: bool) -> list[Figure]:
    """run `true` through the serial driver alone (spawn -> exit code) vs raw on the PTY"""
    from jumpstarter.node.server import build_node_server
    from jumpstarter.plugins import get_plugin_manager
    from jumpstarter_protocol import TaskSpec

    n = 50 if quick else 200

    class Discard:
        def write(self, stream: str, data: bytes) -> None:
            pass

    async def main(port: str, raw: RawShell, data_dir: Path) -> tuple[list[float], list[float]]:
        node = NodeConfig(name="board", driver="serial", options={"port": port})
        server = build_node_server(Config(data_dir=data_dir), get_plugin_manager(), node)
        spec = TaskSpec(argv=["true"])
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)

            async def ours() -> None:
                process = await server.driver.spawn(spec, Discard())
                assert await process.wait() == 0

            async def baseline() -> None:
                raw.run(b"true")

            await alternate(5, ours, baseline)
            result = await alternate(n, ours, baseline)
            server.close()
        return result

    ours, base = _on_two_boards(main)
    return [
        Figure(
            f"run `true` through the serial driver alone, no store (median of {n})",
            statistics.median(ours) * 1000,
            statistics.median(base) * 1000,
            "ms",
            "<= 2x",
            "the command written and read to the prompt, raw, on a PTY board",
        )
    ]


BAUD = 115200


@figure
def run_true_at_115200(quick: bool) -> list[Figure]:
    """run `true` on a simulated 115200-baud board vs the raw round trip on the same pacing"""
    from jumpstarter_driver_serial.node import SerialNodeDriver

    n = 20 if quick else 100
    written = [0, 0]  # by ours, by the raw baseline
    type_ = SerialNodeDriver.type

    async def counted(self: SerialNodeDriver, data: bytes) -> None:
        written[0] += len(data)
        await type_(self, data)

    async def main(port: str, raw: RawShell, data_dir: Path) -> tuple[list[float], list[float]]:
        async with serial_node(port, data_dir) as node:

            async def ours() -> None:
                task = await node.start(["true"])
                assert (await task.wait()).exit_code == 0

            async def baseline() -> None:
                raw.run(b"true")

            await alternate(3, ours, baseline)
            written[0] = raw.written = 0
            times = await alternate(n, ours, baseline)
            written[1] = raw.written
            return times

    SerialNodeDriver.type = counted  # type: ignore[method-assign]  # the bytes the driver types
    try:
        ours, base = _on_two_boards(main, "--baud", str(BAUD))
    finally:
        SerialNodeDriver.type = type_  # type: ignore[method-assign]
    return [
        Figure(
            f"run `true` on a simulated {BAUD}-baud board (median of {n})",
            statistics.median(ours) * 1000,
            statistics.median(base) * 1000,
            "ms",
            "<= 2x",
            "`true` written and read to the prompt, raw, on a board with the same pacing",
        ),
        Figure(
            "bytes typed on the console per `run true`",
            written[0] / n,
            written[1] / n,
            "B",
            "",
            "`true\\r`, raw",
        ),
    ]


SIZE = 10_000_000
BIG = f"head -c {SIZE} /dev/zero | tr '\\0' x"


@figure
def stream_output(quick: bool) -> list[Figure]:
    """10 MB of a board command's output through the PTY vs a raw read of it"""
    rounds = 1 if quick else 3

    async def main(port: str, raw: RawShell, data_dir: Path) -> tuple[float, float]:
        best_ours = best_raw = 0.0
        async with serial_node(port, data_dir) as node:
            for _ in range(rounds):
                await (await node.start(["true"])).wait()  # the first task finds the shell: not timed
                t0 = time.perf_counter()
                task = await node.start(shell=BIG)
                got = sum([len(chunk.data) async for chunk in task.output()])
                elapsed = time.perf_counter() - t0
                assert got == SIZE, got
                best_ours = max(best_ours, SIZE / elapsed / 1e6)
                t0 = time.perf_counter()
                got = raw.run(BIG.encode())
                best_raw = max(best_raw, SIZE / (time.perf_counter() - t0) / 1e6)
                assert got >= SIZE
        return best_ours, best_raw

    ours, base = _on_two_boards(main)
    return [
        Figure(
            "stream 10 MB of a board command's output through the PTY",
            ours,
            base,
            "MB/s",
            ">= 0.5x",
            "a raw read of the same output from a PTY board",
        )
    ]


@figure
def put_file(quick: bool) -> list[Figure]:
    """put 1 MB over the console (base64, sha256 checked) vs raw base64 lines to the shell"""
    from jumpstarter.node.server import build_node_server
    from jumpstarter.plugins import get_plugin_manager

    payload = os.urandom(1_000_000)
    rounds = 1 if quick else 3
    encoded = base64.b64encode(payload)
    lines = b"\n".join(encoded[i : i + 1024] for i in range(0, len(encoded), 1024))

    async def main(port: str, raw: RawShell, data_dir: Path) -> tuple[float, float]:
        node = NodeConfig(name="board", driver="serial", options={"port": port})
        server = build_node_server(Config(data_dir=data_dir), get_plugin_manager(), node)
        best_ours = best_raw = 0.0
        async with anyio.create_task_group() as tg:
            await tg.start(server.run)

            async def chunks() -> AsyncIterator[bytes]:
                yield payload

            await server.driver.files.stat(str(data_dir))  # the first use finds the shell: not timed
            for _ in range(rounds):
                target = data_dir / "put.bin"
                t0 = time.perf_counter()
                await server.driver.files.write(str(target), chunks())
                best_ours = max(best_ours, len(payload) / (time.perf_counter() - t0) / 1e6)
                assert target.read_bytes() == payload
                t0 = time.perf_counter()
                raw.run(b"base64 -d > " + str(data_dir / "raw.bin").encode() + b" <<'EOF'\n" + lines + b"\nEOF")
                best_raw = max(best_raw, len(payload) / (time.perf_counter() - t0) / 1e6)
                assert (data_dir / "raw.bin").read_bytes() == payload
            server.close()
        return best_ours, best_raw

    ours, base = _on_two_boards(main)
    return [
        Figure(
            "put a 1 MB file over the console (base64 chunks, sha256 checked)",
            ours,
            base,
            "MB/s",
            ">= 0.5x",
            "raw base64 lines written to the same kind of shell",
        )
    ]


@figure
def qemu_first_task(quick: bool) -> list[Figure]:
    """QEMU board: power on -> first task can start vs the time to the first prompt, raw"""
    with tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp:
        options = qemu_options(Path(tmp))
        if options is None:
            return []
        rounds = 1 if quick else 3

        async def ours() -> float:
            node = NodeConfig(name="vboard", driver="qemu", options=options)
            protocol = JumpStarterProtocol(Config(data_dir=Path(tmp) / "data", nodes={"vboard": node}))
            t0 = time.perf_counter()
            async with protocol.create_async_session("bench") as session:
                n = await session.connect("vboard")
                task = await n.start(["true"])  # the VM is powered on with the node
                elapsed = time.perf_counter() - t0
                await task.wait()
            return elapsed

        def raw() -> float:
            argv = ["qemu-system-x86_64", "-accel", "tcg", "-m", str(options["memory"]), "-display", "none",
                    "-nodefaults", "-no-reboot", "-monitor", "none", "-serial", "stdio",
                    "-kernel", str(options["kernel"]), "-initrd", str(options["initrd"]), "-append", str(options["append"])]
            t0 = time.perf_counter()
            process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert process.stdout is not None
            seen = b""
            # busybox asks where the cursor is right after its prompt: "/ # " then ESC [6n.
            while b"/ # " not in seen and time.perf_counter() - t0 < 600:
                data = os.read(process.stdout.fileno(), 65536)
                if not data:
                    raise RuntimeError("QEMU exited before its first prompt")
                seen = (seen + data)[-256:]
            elapsed = time.perf_counter() - t0
            process.kill()
            process.wait()
            return elapsed

        ours_times, raw_times = [], []
        for _ in range(rounds):
            raw_times.append(raw())
            ours_times.append(anyio.run(ours))
    return [
        Figure(
            "QEMU board: power on -> first task can start",
            min(ours_times),
            min(raw_times),
            "s",
            "<= 1.5x",
            "QEMU started raw, read to its first shell prompt",
        )
    ]
