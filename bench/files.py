"""File transfer figures (issue 13): 200 MiB put on and fetched from a node served by
``jmp node serve`` over loopback, beside raw grpc.aio moving the same bytes between
the same kinds of processes into a file, and a local-node put beside
``shutil.copyfile``; each baseline measured in the same run, runs alternating.

The raw server is a process of its own, as the node is: client streaming writes each
message to a file; server streaming reads a file in 4 MiB pieces and sends each.
Ours adds what a transfer must have: sha256 on both sides, a temporary name renamed
into place, fsync on the node, the protocol's frames.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anyio
from jumpstarter.config import Config
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_driver_grpc._wire import grpc

from ._figure import Figure, figure
from .grpc import _process, _remote, _served_node

MB = 1_000_000
SIZE = 200 * 1024 * 1024
CHUNK = 4 * 1024 * 1024

RAW_FILE_SERVER = """
import asyncio, grpc, os, sys
async def upload(frames, context):  # the bytes into a file, as they come
    path = None
    async for data in frames:
        if path is None:
            path = data.decode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            continue
        os.write(fd, data)
    os.close(fd)
    return b"ok"
async def download(request, context):  # a file, in 4 MiB messages
    with open(request.decode(), "rb") as f:
        while data := f.read(4 * 1024 * 1024):
            yield data
async def main():
    options = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Files", {
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on grpc://127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()
asyncio.run(main())
"""


def _make_source(directory: Path, size: int) -> Path:
    path = directory / "source.bin"
    with open(path, "wb") as f:
        block = os.urandom(CHUNK)
        for start in range(0, size, CHUNK):
            f.write(block[: size - start])
    return path


async def _raw_upload(url: str, source: Path, target: Path) -> None:
    async with grpc.aio.insecure_channel(
        url.removeprefix("grpc://"), options=[("grpc.max_send_message_length", 16 << 20)]
    ) as channel:

        async def frames():
            yield str(target).encode()
            with open(source, "rb") as f:
                while data := await anyio.to_thread.run_sync(f.read, CHUNK):
                    yield data

        assert await channel.stream_unary("/bench.Files/Upload")(frames()) == b"ok"


async def _raw_download(url: str, source: Path, target: Path) -> None:
    async with grpc.aio.insecure_channel(
        url.removeprefix("grpc://"), options=[("grpc.max_receive_message_length", 16 << 20)]
    ) as channel:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            async for data in channel.unary_stream("/bench.Files/Download")(str(source).encode()):
                await anyio.to_thread.run_sync(os.write, fd, data)
        finally:
            os.close(fd)


def _rate(size: int, seconds: float) -> float:
    return size / MB / seconds


@figure
def transfer_grpc(quick: bool) -> list[Figure]:
    """put and get 200 MiB on a gRPC node on loopback vs raw grpc.aio streaming into a file"""
    size = SIZE // 4 if quick else SIZE
    repeats = 2 if quick else 4
    up, raw_up, down, raw_down = [], [], [], []

    async def main(node_url: str, raw_url: str, tmp: Path) -> None:
        source = _make_source(tmp, size)
        on_node, back = tmp / "on-node.bin", tmp / "back.bin"
        async with _remote(node_url) as node:
            for i in range(repeats + 1):  # the first round warms both up, untimed
                t0 = time.perf_counter()
                await node.put(source, str(on_node))
                t1 = time.perf_counter()
                await _raw_upload(raw_url, source, tmp / "raw.bin")
                t2 = time.perf_counter()
                await node.get(str(on_node), back)
                t3 = time.perf_counter()
                await _raw_download(raw_url, on_node, tmp / "raw-back.bin")
                t4 = time.perf_counter()
                assert back.stat().st_size == size == (tmp / "raw-back.bin").stat().st_size
                for path in (on_node, back, tmp / "raw.bin", tmp / "raw-back.bin"):
                    path.unlink()  # the next round writes fresh files, as this one did
                if i:
                    up.append(_rate(size, t1 - t0))
                    raw_up.append(_rate(size, t2 - t1))
                    down.append(_rate(size, t3 - t2))
                    raw_down.append(_rate(size, t4 - t3))

    with (
        tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp,
        _served_node(Path(tmp)) as node_url,
        _process([sys.executable, "-c", RAW_FILE_SERVER]) as raw_url,
    ):
        anyio.run(main, node_url, raw_url, Path(tmp))
    mib = size // (1024 * 1024)
    return [
        Figure(
            f"upload {mib} MiB to a gRPC node on loopback (node.put)",
            max(up),
            max(raw_up),
            "MB/s",
            ">= 0.6x",
            "raw grpc.aio client-streaming the same bytes into a file",
        ),
        Figure(
            f"download {mib} MiB from a gRPC node on loopback (node.get)",
            max(down),
            max(raw_down),
            "MB/s",
            ">= 0.6x",
            "raw grpc.aio server-streaming the file",
        ),
    ]


@figure
def put_local(quick: bool) -> list[Figure]:
    """put 200 MiB on the local node vs shutil.copyfile"""
    size = SIZE // 4 if quick else SIZE
    repeats = 2 if quick else 4
    ours, base = [], []

    async def main(tmp: Path) -> None:
        source = _make_source(tmp, size)
        protocol = JumpStarterProtocol(Config(data_dir=tmp / "data"))
        async with protocol.create_async_session("bench") as session:
            node = await session.connect("local")
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                await node.put(source, str(tmp / "put.bin"))
                t1 = time.perf_counter()
                await anyio.to_thread.run_sync(shutil.copyfile, source, tmp / "copy.bin")
                t2 = time.perf_counter()
                (tmp / "put.bin").unlink()
                (tmp / "copy.bin").unlink()
                if i:
                    ours.append(_rate(size, t1 - t0))
                    base.append(_rate(size, t2 - t1))

    with tempfile.TemporaryDirectory(prefix="jmp-bench-") as tmp:
        anyio.run(main, Path(tmp))
    return [
        Figure(
            f"put {size // (1024 * 1024)} MiB on the local node (node.put)",
            max(ours),
            max(base),
            "MB/s",
            ">= 0.5x",
            "shutil.copyfile of the same file",
        )
    ]
