"""The ssh node's figures (issue 14), each beside OpenSSH's own client doing the same
against the same sshd in the same run.

One real sshd on 127.0.0.1 (the tests' ``tests/sshd.py``) serves both sides. Ours is
the ssh node driver behind a real node server and the local transport; the
baselines are the ``ssh`` and ``scp`` commands with their default settings, reading no
config of this machine (``-F /dev/null``).
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
from jumpstarter.client import AsyncNode
from jumpstarter.config import Config, NodeConfig
from jumpstarter.protocol import JumpStarterProtocol

from ._common import alternate, raw_pipe_rate, timed_stream
from ._figure import Figure, figure

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from sshd import Sshd  # noqa: E402

MB = 1_000_000
SIZE = 200 * 1024 * 1024


@contextmanager
def sshd() -> Iterator[Sshd]:
    with tempfile.TemporaryDirectory(prefix="jmp-bench-sshd-") as tmp:
        server = Sshd(Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def ssh_command(server: Sshd, *extra: str) -> list[str]:
    """``ssh`` to ``server`` as a script would call it (our key, our known_hosts)."""
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-p",
        str(server.port),
        "-i",
        str(server.client_key),
        "-o",
        f"UserKnownHostsFile={server.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        *extra,
        f"{server.user}@127.0.0.1",
    ]


@asynccontextmanager
async def ssh_node(server: Sshd, data_dir: Path) -> AsyncIterator[AsyncNode]:
    config = Config(
        data_dir=data_dir, nodes={"pi": NodeConfig(driver="ssh", options=server.options())}
    )
    async with JumpStarterProtocol(config).create_async_session("bench") as session:
        node = await session.connect("pi")
        yield node


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


@figure
def run_true(quick: bool) -> list[Figure]:
    """run `true` on the ssh node (connection open) vs ssh over a ControlMaster, and vs a fresh ssh"""
    n = 30 if quick else 100
    fresh_n = 10 if quick else 30

    async def main(server: Sshd, data_dir: Path, control: Path) -> tuple[list[float], ...]:
        async with ssh_node(server, data_dir) as node:

            async def ours() -> None:
                info = await (await node.start(["true"])).wait()
                assert info.exit_code == 0, info

            multiplexed = ssh_command(server, "-o", f"ControlPath={control}")

            async def over_master() -> None:
                done = await anyio.run_process([*multiplexed, "true"])
                assert done.returncode == 0

            fresh_command = ssh_command(server, "-o", "ControlPath=none")

            async def fresh() -> None:
                done = await anyio.run_process([*fresh_command, "true"])
                assert done.returncode == 0

            await alternate(5, ours, over_master)  # warm up: the connection is open
            a, b = await alternate(n, ours, over_master)
            c, d = await alternate(fresh_n, ours, fresh)
            return a + c, b, d

    with sshd() as server, tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp:
        control = Path(tmp) / "master.sock"
        master = subprocess.Popen(
            ssh_command(server, "-M", "-N", "-o", f"ControlPath={control}"),
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while not control.exists():
                assert master.poll() is None and time.monotonic() < deadline, "no ssh master"
                time.sleep(0.02)
            ours, base, fresh = anyio.run(main, server, Path(tmp), control)
        finally:
            master.terminate()
            master.wait()
    return [
        Figure(
            f"run `true` on the ssh node, connection open (median of {len(ours)})",
            _median_ms(ours),
            _median_ms(base),
            "ms",
            "<= 1.5x",
            "ssh -o ControlPath=... host true, over an open master",
        ),
        Figure(
            "run `true` on the ssh node vs a fresh ssh each time",
            _median_ms(ours),
            _median_ms(fresh),
            "ms",
            "<= 0.2x",
            "ssh host true, a new connection each time",
        ),
    ]


@figure
def stream_output(quick: bool) -> list[Figure]:
    """stream 200 MB of task output from the ssh node vs ssh host 'head -c 200M /dev/zero' > /dev/null"""
    repeats = 1 if quick else 4
    command = ["head", "-c", str(SIZE), "/dev/zero"]

    async def ours_rate(server: Sshd, data_dir: Path) -> float:
        async with ssh_node(server, data_dir) as node:
            warm_up, _ = await timed_stream(node, command, SIZE)  # see bench/local.py
            for path in (data_dir / "output").glob(f"{warm_up}.*"):
                path.unlink()
            return (await timed_stream(node, command, SIZE))[1]

    ours, base = [], []
    with sshd() as server:
        for _ in range(repeats):
            base.append(raw_pipe_rate([*ssh_command(server), " ".join(command)], SIZE))
            with tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp:
                ours.append(anyio.run(ours_rate, server, Path(tmp)))
    return [
        Figure(
            "stream 200 MB of task output from the ssh node to the client",
            max(ours),
            max(base),
            "MB/s",
            ">= 0.5x",
            "ssh host 'head -c 200M /dev/zero', stdout read through a pipe",
        )
    ]


@figure
def sftp_put(quick: bool) -> list[Figure]:
    """put 200 MB on the ssh node over SFTP (the driver's files) vs scp of the same file"""
    repeats = 1 if quick else 4
    from jumpstarter_driver_ssh.node import SshNodeDriver

    async def ours_rate(server: Sshd, source: Path, target: Path) -> float:
        driver = SshNodeDriver(NodeConfig(name="pi", driver="ssh", options=server.options()))
        assert driver.files is not None
        try:
            await driver.connection()

            async def chunks() -> AsyncIterator[bytes]:
                with open(source, "rb") as f:
                    while piece := f.read(1024 * 1024):
                        yield piece

            t0 = time.perf_counter()
            size = await driver.files.write(str(target), chunks())
            elapsed = time.perf_counter() - t0
        finally:
            await driver.aclose()
        assert size == SIZE
        return SIZE / MB / elapsed

    ours, base = [], []
    with sshd() as server, tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp:
        source = Path(tmp) / "fw.bin"
        source.write_bytes(os.urandom(SIZE))
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        scp = [
            "scp",
            "-q",
            "-F",
            "/dev/null",
            "-P",
            str(server.port),
            "-i",
            str(server.client_key),
            "-o",
            f"UserKnownHostsFile={server.known_hosts}",
            "-o",
            "BatchMode=yes",
        ]
        for _ in range(repeats):
            target = Path(tmp) / "by-scp.bin"
            t0 = time.perf_counter()
            subprocess.run([*scp, str(source), f"{server.user}@127.0.0.1:{target}"], check=True)
            base.append(SIZE / MB / (time.perf_counter() - t0))
            target.unlink()
            target = Path(tmp) / "by-sftp.bin"
            ours.append(anyio.run(ours_rate, server, source, target))
            assert hashlib.sha256(target.read_bytes()).hexdigest() == digest
            target.unlink()
    return [
        Figure(
            "put 200 MB on the ssh node over SFTP",
            max(ours),
            max(base),
            "MB/s",
            ">= 0.5x",
            "scp of the same file to the same sshd",
        )
    ]
