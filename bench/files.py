"""File transfer figures (issue 13): 200 MiB put on and fetched from a node served by
``jmp node serve`` over loopback, beside raw grpc.aio moving the same bytes between
the same kinds of processes into a file, and a local-node put beside
``shutil.copyfile``; each baseline measured in the same run, runs alternating.

The raw server is a process of its own, as the node is: client streaming writes each
message to a file; server streaming reads a file in 4 MiB pieces and sends each.
Ours adds what a transfer must have: sha256 on both sides, a temporary name renamed
into place, fsync on the node, the protocol's frames.

Each transfer is also measured beside the least a checked transfer costs, raw: the
same raw grpc.aio processes, plus sha256 of every byte on both sides (on a thread,
beside the stream, as ours does) and fsync of what was written; the local put beside
a raw read, sha256, write and fsync of the same file. On 2 cores the two hashes alone
(about 0.11 s of a core each per 200 MiB here) take what the bare transfer runs in,
so the rows against the bare baselines cannot all reach their targets however little
the rest costs; the rows against the checked floors show what ours adds.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
import hashlib
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
from concurrent.futures import ThreadPoolExecutor
HASHER, WRITER = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
async def upload_checked(frames, context):  # and hashed and written on threads, and fsynced
    loop = asyncio.get_running_loop()
    path, digest, pending = None, hashlib.sha256(), []
    async for data in frames:
        if path is None:
            path = data.decode()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            continue
        for future in pending:  # one chunk in flight on each thread
            await future
        pending = [loop.run_in_executor(HASHER, digest.update, data), loop.run_in_executor(WRITER, os.write, fd, data)]
    for future in pending:
        await future
    await loop.run_in_executor(WRITER, os.fsync, fd)
    os.close(fd)
    return digest.digest()
async def download_checked(request, context):
    loop = asyncio.get_running_loop()
    digest, hashing = hashlib.sha256(), None
    with open(request.decode(), "rb") as f:
        while data := await loop.run_in_executor(WRITER, f.read, 4 * 1024 * 1024):
            if hashing is not None:
                await hashing
            hashing = loop.run_in_executor(HASHER, digest.update, data)
            yield data
    if hashing is not None:
        await hashing
    yield digest.digest()
async def main():
    options = [("grpc.max_send_message_length", 16 << 20), ("grpc.max_receive_message_length", 16 << 20)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Files", {
        "Upload": grpc.stream_unary_rpc_method_handler(upload),
        "Download": grpc.unary_stream_rpc_method_handler(download),
        "UploadChecked": grpc.stream_unary_rpc_method_handler(upload_checked),
        "DownloadChecked": grpc.unary_stream_rpc_method_handler(download_checked),
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


async def _raw_upload_checked(url: str, source: Path, target: Path) -> None:
    """The raw upload, plus what a checked one cannot do without: sha256 on both
    sides, on threads beside the stream (one chunk in flight), and fsync on the server."""
    digest = hashlib.sha256()
    async with grpc.aio.insecure_channel(
        url.removeprefix("grpc://"), options=[("grpc.max_send_message_length", 16 << 20)]
    ) as channel, _Pipeline() as pipeline:

        async def frames():
            yield str(target).encode()
            with open(source, "rb") as f:
                while data := await pipeline.read(f):
                    await pipeline.hash(digest, data)
                    yield data

        reply = await channel.stream_unary("/bench.Files/UploadChecked")(frames())
        await pipeline.hash(digest, b"")
        assert reply == digest.digest()


async def _raw_download_checked(url: str, source: Path, target: Path) -> None:
    digest = hashlib.sha256()
    async with grpc.aio.insecure_channel(
        url.removeprefix("grpc://"), options=[("grpc.max_receive_message_length", 16 << 20)]
    ) as channel, _Pipeline() as pipeline:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            messages = channel.unary_stream("/bench.Files/DownloadChecked")(str(source).encode())
            previous = None
            async for data in messages:  # the last message is the server's sha256
                if previous is not None:
                    await pipeline.hash(digest, previous)
                    await pipeline.write(fd, previous)
                previous = data
            await pipeline.hash(digest, b"")
            await pipeline.write(fd, b"")
            assert previous == digest.digest()
            await anyio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)


class _Pipeline:
    """A hashing thread and a file thread, each with one piece of work in flight: a
    call waits for that thread's previous piece, then hands it the next."""

    async def __aenter__(self) -> _Pipeline:
        self._pools = {"hash": ThreadPoolExecutor(1), "file": ThreadPoolExecutor(1)}
        self._pending: dict[str, Any] = {}
        return self

    async def __aexit__(self, *exc: object) -> None:
        for pool in self._pools.values():
            pool.shutdown()

    async def _submit(self, lane: str, fn: Any, *args: Any) -> None:
        if (previous := self._pending.pop(lane, None)) is not None:
            await previous
        self._pending[lane] = asyncio.wrap_future(self._pools[lane].submit(fn, *args))

    async def hash(self, digest: Any, data: bytes) -> None:
        await self._submit("hash", digest.update, data)
        if not data:  # the end: wait for the last piece
            await self._pending.pop("hash")

    async def write(self, fd: int, data: bytes) -> None:
        await self._submit("file", os.write, fd, data)
        if not data:
            await self._pending.pop("file")

    async def read(self, file: Any) -> bytes:
        return await asyncio.wrap_future(self._pools["file"].submit(file.read, CHUNK))


def _checked_copy(source: Path, target: Path) -> None:
    """The least a checked, durable local put costs: read, sha256 (on a thread of its
    own, beside the write), write, fsync."""
    digest = hashlib.sha256()
    with open(source, "rb") as f, open(target, "wb") as out, ThreadPoolExecutor(1) as hasher:
        hashing = None
        while data := f.read(CHUNK):
            if hashing is not None:
                hashing.result()
            hashing = hasher.submit(digest.update, data)
            out.write(data)
        if hashing is not None:
            hashing.result()
        out.flush()
        os.fsync(out.fileno())


def _rate(size: int, seconds: float) -> float:
    return size / MB / seconds


@figure
def transfer_grpc(quick: bool) -> list[Figure]:
    """put and get 200 MiB on a gRPC node on loopback vs raw grpc.aio streaming into a file"""
    size = SIZE // 4 if quick else SIZE
    repeats = 2 if quick else 4
    up, raw_up, down, raw_down = [], [], [], []
    floor_up, floor_down = [], []

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
                await _raw_upload_checked(raw_url, source, tmp / "floor.bin")
                t5 = time.perf_counter()
                await _raw_download_checked(raw_url, on_node, tmp / "floor-back.bin")
                t6 = time.perf_counter()
                assert back.stat().st_size == size == (tmp / "raw-back.bin").stat().st_size
                assert (tmp / "floor.bin").stat().st_size == size == (tmp / "floor-back.bin").stat().st_size
                for name in ("raw.bin", "raw-back.bin", "floor.bin", "floor-back.bin"):
                    (tmp / name).unlink()  # the next round writes fresh files, as this one did
                on_node.unlink()
                back.unlink()
                if i:
                    up.append(_rate(size, t1 - t0))
                    raw_up.append(_rate(size, t2 - t1))
                    down.append(_rate(size, t3 - t2))
                    raw_down.append(_rate(size, t4 - t3))
                    floor_up.append(_rate(size, t5 - t4))
                    floor_down.append(_rate(size, t6 - t5))

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
        Figure(
            f"upload {mib} MiB to a gRPC node, against the checked raw floor",
            max(up),
            max(floor_up),
            "MB/s",
            ">= 0.8x",
            "raw grpc.aio client-streaming with sha256 on both sides and fsync",
        ),
        Figure(
            f"download {mib} MiB from a gRPC node, against the checked raw floor",
            max(down),
            max(floor_down),
            "MB/s",
            ">= 0.8x",
            "raw grpc.aio server-streaming with sha256 on both sides and fsync",
        ),
    ]


@figure
def put_local(quick: bool) -> list[Figure]:
    """put 200 MiB on the local node vs shutil.copyfile"""
    size = SIZE // 4 if quick else SIZE
    repeats = 2 if quick else 4
    ours, base, floor = [], [], []

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
                await anyio.to_thread.run_sync(_checked_copy, source, tmp / "checked.bin")
                t3 = time.perf_counter()
                for name in ("put.bin", "copy.bin", "checked.bin"):
                    (tmp / name).unlink()
                if i:
                    ours.append(_rate(size, t1 - t0))
                    base.append(_rate(size, t2 - t1))
                    floor.append(_rate(size, t3 - t2))

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
        ),
        Figure(
            f"put {size // (1024 * 1024)} MiB on the local node, against the checked raw floor",
            max(ours),
            max(floor),
            "MB/s",
            ">= 0.8x",
            "a raw read, sha256, write and fsync of the same file",
        ),
    ]
