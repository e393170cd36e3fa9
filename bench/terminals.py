"""Input and terminals (issue 13): bytes piped through a task's stdin to ``cat`` and
back as output, locally and over gRPC, beside a raw pipe through ``cat``; and a
keystroke's round trip on a PTY over gRPC beside one raw grpc.aio unary call."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
from jumpstarter.client import AsyncNode
from jumpstarter.config import Config
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import Ping, encode

from ._common import alternate
from ._figure import Figure, figure
from .grpc import RAW_ECHO_SERVER, _process, _raw_echo, _remote, _served_node

MB = 1_000_000
PIPED_BYTES = 50 * 1024 * 1024


def _raw_cat_rate(data: bytes) -> float:
    """MB/s of ``data`` written to ``cat``'s stdin and read back from its stdout."""
    t0 = time.perf_counter()
    done = subprocess.run(["cat"], input=data, stdout=subprocess.PIPE, check=True)
    elapsed = time.perf_counter() - t0
    assert len(done.stdout) == len(data)
    return len(data) / MB / elapsed


async def _piped_rate(node: AsyncNode, data: bytes) -> float:
    """MB/s of ``data`` through ``cat`` on ``node``: start, input written and closed,
    output read to its end (checked complete and in order)."""
    t0 = time.perf_counter()
    task = await node.start(["cat"], stdin=True)
    got = 0

    async def write() -> None:
        await task.write_input(data)
        await task.close_input()

    async with anyio.create_task_group() as tg:
        tg.start_soon(write)
        async for chunk in task.output():
            assert chunk.offset == got
            got += len(chunk.data)
    elapsed = time.perf_counter() - t0
    assert got == len(data) and task.end is not None and task.end.exit_code == 0
    return len(data) / MB / elapsed


@figure
def stdin_through_cat(quick: bool) -> list[Figure]:
    """50 MB through a task's stdin to cat and back as output, local and gRPC, vs a raw pipe through cat"""
    repeats = 2 if quick else 5
    data = os.urandom(PIPED_BYTES)
    local, remote, raw = [], [], []
    with tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp, _served_node(Path(tmp) / "node") as url:

        async def ours_local() -> float:
            protocol = JumpStarterProtocol(Config(data_dir=Path(tmp) / "local"))
            async with protocol.create_async_session("bench") as session:
                return await _piped_rate(await session.connect("local"), data)

        async def ours_remote() -> float:
            async with _remote(url) as node:
                return await _piped_rate(node, data)

        anyio.run(ours_local)  # untimed runs first
        anyio.run(ours_remote)
        for _ in range(repeats):  # alternate, so load from elsewhere hits all alike
            raw.append(_raw_cat_rate(data))
            local.append(anyio.run(ours_local))
            remote.append(anyio.run(ours_remote))
    baseline = "the same bytes written to cat's stdin and read from its stdout, a raw pipe each way"
    return [
        Figure("50 MB through stdin -> cat -> output, local transport", max(local), max(raw), "MB/s",
               ">= 0.3x", baseline),
        Figure("50 MB through stdin -> cat -> output, gRPC on loopback", max(remote), max(raw), "MB/s",
               ">= 0.3x", baseline),
    ]


@figure
def keystroke(quick: bool) -> list[Figure]:
    """keystroke round trip on a PTY over gRPC (one byte in, echoed out) vs a raw grpcio unary round trip"""
    n = 100 if quick else 500
    frame = encode(Ping())

    async def main(node_url: str, echo_url: str) -> tuple[list[float], list[float]]:
        async with _remote(node_url) as node, _raw_echo(echo_url) as echo:
            # The program echoes each byte itself, as a shell's line editor does.
            task = await node.start(shell="stty raw -echo; echo ready; exec cat", pty=(24, 80))
            seen = anyio.Event()
            output = bytearray()

            async def read() -> None:
                nonlocal seen
                async for chunk in task.output():
                    output.extend(chunk.data)
                    seen.set()

            async def ours() -> None:
                nonlocal seen
                seen = anyio.Event()
                before = len(output)
                await task.write_input(b"k")
                while len(output) == before:
                    await seen.wait()
                    seen = anyio.Event()

            async def baseline() -> None:
                await echo(frame)

            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                while b"ready" not in output:
                    await anyio.sleep(0.01)
                await ours()  # warm up
                timings = await alternate(n, ours, baseline)
                await task.stop(0)
            return timings

    with (
        tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp,
        _served_node(Path(tmp)) as node_url,
        _process([sys.executable, "-c", RAW_ECHO_SERVER]) as echo_url,
    ):
        ours, base = anyio.run(main, node_url, echo_url)
    return [
        Figure(
            f"keystroke round trip on a PTY over gRPC, loopback (median of {n})",
            statistics.median(ours) * 1e6,
            statistics.median(base) * 1e6,
            "us",
            "<= 3x",
            "one raw grpcio unary round trip",
        )
    ]

