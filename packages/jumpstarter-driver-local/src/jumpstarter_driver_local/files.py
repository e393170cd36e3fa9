"""The local node's files: plain operations on this machine's paths.

Reads and writes run in worker threads, so a large file never holds up the node's
event loop. Checksums, temporary names, resuming and the files root are the node
server's (:mod:`jumpstarter.node.files`): this only moves bytes.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import anyio
from jumpstarter.plugins import FileStat, NodeFiles, ThreadWorker, read_ahead

READ_SIZE = 4 * 1024 * 1024
"""Bytes per chunk read: large, since each chunk costs a message on the wire."""


class LocalFiles(NodeFiles):
    """This machine's files, with the node user's permissions."""

    async def stat(self, path: str) -> FileStat | None:
        try:
            st = await anyio.to_thread.run_sync(os.lstat, path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        return _stat(st)

    async def real_path(self, path: str) -> str:
        return await anyio.to_thread.run_sync(os.path.realpath, path)

    async def list_dir(self, path: str) -> list[str]:
        return sorted(await anyio.to_thread.run_sync(os.listdir, path))

    async def read(self, path: str, offset: int = 0) -> AsyncIterator[bytes]:  # type: ignore[override]
        fd = await anyio.to_thread.run_sync(os.open, path, os.O_RDONLY)
        try:
            if offset:
                os.lseek(fd, offset, os.SEEK_SET)
            # Closed before the file is: its thread must stop reading first.
            async with aclosing(read_ahead(fd, chunk=READ_SIZE)) as reads:
                async for data in reads:
                    yield data
        finally:
            os.close(fd)

    async def write(self, path: str, chunks: AsyncIterator[bytes], *, offset: int = 0) -> int:
        fd = await anyio.to_thread.run_sync(lambda: os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        start_writeback = _sync_file_range()
        written = offset

        def write(data: bytes) -> None:
            nonlocal written
            _write_all(fd, data)
            if start_writeback is not None:
                # The disk starts on each chunk as it is written, so the fsync at the
                # end waits for the last few only (it was a fifth of a 200 MiB upload).
                start_writeback(fd, written, len(data))
            written += len(data)

        # Written on a thread of its own while the next chunk arrives.
        writer = ThreadWorker(write, name="jmp-write")
        try:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
            async for data in chunks:
                await writer.put(data)
                offset += len(data)
            await writer.finish()
            await anyio.to_thread.run_sync(os.fsync, fd)
        finally:
            await writer.aclose()
            os.close(fd)
        return offset

    async def rename(self, source: str, target: str) -> None:
        await anyio.to_thread.run_sync(os.replace, source, target)

    async def remove(self, path: str) -> None:
        try:
            await anyio.to_thread.run_sync(os.unlink, path)
        except FileNotFoundError:
            pass

    async def make_dir(self, path: str, mode: int = 0o755) -> None:
        await anyio.to_thread.run_sync(lambda: os.makedirs(path, mode, exist_ok=True))

    async def chmod(self, path: str, mode: int) -> None:
        await anyio.to_thread.run_sync(os.chmod, path, mode)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@functools.cache
def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(2)`` with ``SYNC_FILE_RANGE_WRITE``: start writing a
    range to disk without waiting for it (the os module lacks it); None elsewhere.
    Only a head start for the fsync that follows, so its failures are ignored."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range  # libc, already loaded
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    write = 2  # SYNC_FILE_RANGE_WRITE

    def sync_file_range(fd: int, offset: int, length: int) -> None:
        function(fd, offset, length, write)

    return sync_file_range


def _stat(st: os.stat_result) -> FileStat:
    if stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat.S_ISLNK(st.st_mode):
        kind = "link"
    else:
        kind = "other"
    return FileStat(kind=kind, size=st.st_size, mode=stat.S_IMODE(st.st_mode), mtime=st.st_mtime)  # type: ignore[arg-type]
