"""Task output on disk: one byte log per task, stdout and stderr interleaved in the
order they were produced, plus an index of which stream each run of bytes came from.

Offsets are positions in the combined log, so "everything from offset N" is one
``pread`` however the streams interleave, a client that reconnects resumes exactly
where it stopped, and a reader in another process sees the same bytes.

Files, in the node's ``<data dir>/output/``: ``<task id>.out`` (the bytes) and
``<task id>.idx`` (9-byte records: offset where a run starts, stream 1 or 2). They are
created with the first byte a task writes, so a task with no output has no files.

Two things keep a fast task's output at close to pipe speed (see ``bench/``): the
process writing the log keeps its newest bytes in memory, so a live reader gets the
very bytes objects the task wrote instead of reading them back; and once a log is
large, disk space is reserved for it well ahead (``fallocate``), which halves what
each write costs the filesystem.
"""

from __future__ import annotations

import bisect
import functools
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import anyio

from jumpstarter.plugins.interfaces import Stream

_RECORD = struct.Struct("<QB")
_STREAMS: dict[Stream, int] = {"stdout": 1, "stderr": 2}
_NAMES: dict[int, Stream] = {1: "stdout", 2: "stderr"}

KEEP_IN_MEMORY = 1024 * 1024
"""About how many of the newest bytes the writer keeps for live readers."""
JOIN_BELOW = 64 * 1024
"""Pieces smaller than this are joined into one chunk for a reader."""
RESERVE_FROM = 1024 * 1024
"""A log this large gets disk space reserved ahead of its writes; a small one never."""
RESERVE_AHEAD = 16 * 1024 * 1024


class OutputLog:
    """A task's output log. Open it with :meth:`create` to write or :meth:`open` to
    read. In the writing process, :meth:`wait_beyond` wakes on each write."""

    def __init__(self, directory: Path, task_id: str, *, write: bool) -> None:
        self.path = directory / f"{task_id}.out"
        self._index_path = directory / f"{task_id}.idx"
        # A writer opens (creates) its files on the first write: creating a file can
        # cost as much as starting the task's process, and many tasks print nothing.
        self._fd = self._index_fd = -1
        if not write:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._index_fd = os.open(self._index_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                os.close(self._fd)
                raise
        self._starts: list[int] = []
        self._streams: list[int] = []
        self._index_size = 0
        self.size = 0
        self._writable = write
        self._changed = anyio.Event()
        # The writer's newest bytes, as written: ``_recent[i]`` starts at offset
        # ``_recent_offsets[i]``; the first ``_recent_dropped`` entries are gone.
        self._recent: list[bytes] = []
        self._recent_offsets: list[int] = []
        self._recent_dropped = 0
        self._reserved = 0  # disk space reserved up to here (beyond the size)
        self.error: OSError | None = None
        """The error that stopped the writes, if one did."""
        self.failed = anyio.Event()
        """Set when a write failed."""
        self._also_failed: list[anyio.Event] = []
        if not write:
            self._refresh()

    @classmethod
    def create(cls, directory: Path, task_id: str) -> OutputLog:
        """A log to write; its files appear with the first byte written."""
        return cls(directory, task_id, write=True)

    @classmethod
    def open(cls, directory: Path, task_id: str) -> OutputLog | None:
        """Open for reading; None while the task has no log (it has not started, or
        has written nothing yet)."""
        try:
            return cls(directory, task_id, write=False)
        except FileNotFoundError:
            return None

    def write(self, stream: Stream, data: bytes) -> None:
        """Append ``data``. Never raises: a write the filesystem refuses (no space,
        quota, file size limit, no file handle left) is kept in :attr:`error`, sets
        :attr:`failed`, and every later write is dropped; the node server then stops
        the task with that cause (see :attr:`failure`)."""
        if not data or self.error is not None:
            return
        try:
            self._write(stream, data)
        except OSError as exc:
            self.error = exc
            self.failed.set()
            for event in self._also_failed:
                event.set()

    def set_on_failure(self, event: anyio.Event) -> None:
        """Set ``event`` as well when a write fails (at once if one did): one event
        for a supervisor to wait on, instead of a task per event."""
        self._also_failed.append(event)
        if self.failed.is_set():
            event.set()

    @property
    def failure(self) -> str | None:
        """Why the log could not be written, for the task's message; None if it could."""
        if self.error is None:
            return None
        reason = os.strerror(self.error.errno) if self.error.errno else str(self.error)
        return f"{reason[:1].lower()}{reason[1:]} writing the output log"

    def _write(self, stream: Stream, data: bytes) -> None:
        if self._fd < 0:
            self._open_files()
        code = _STREAMS[stream]
        if not self._streams or self._streams[-1] != code:
            os.write(self._index_fd, _RECORD.pack(self.size, code))
            self._starts.append(self.size)
            self._streams.append(code)
        if self.size + len(data) > self._reserved >= 0 and self.size >= RESERVE_FROM:
            self._reserve(self.size + len(data) + RESERVE_AHEAD)
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        finally:
            if written:  # what reached the file is counted, even when the rest did not
                piece = data if written == len(data) else data[:written]
                self._remember(self.size, piece)
                self.size += written
                self._changed.set()
                self._changed = anyio.Event()

    def _remember(self, offset: int, data: bytes) -> None:
        self._recent.append(data)
        self._recent_offsets.append(offset)
        # Once twice KEEP_IN_MEMORY is remembered, forget all but the newest
        # KEEP_IN_MEMORY, and cut the lists only when half of them is forgotten: each
        # write then costs the same however small it is.
        end, first = offset + len(data), self._recent_dropped
        if end - self._recent_offsets[first] > 2 * KEEP_IN_MEMORY:
            keep = bisect.bisect_right(self._recent_offsets, end - KEEP_IN_MEMORY, lo=first) - 1
            self._recent_dropped = keep
        if self._recent_dropped > len(self._recent) // 2:
            del self._recent[: self._recent_dropped], self._recent_offsets[: self._recent_dropped]
            self._recent_dropped = 0

    def _reserve(self, end: int) -> None:
        """Reserve disk space up to ``end`` without changing the file's size, so a
        reader in another process still sees only what was written. Filesystems that
        cannot are simply written to as they are."""
        fallocate = _fallocate()
        if fallocate is None:
            self._reserved = -1
            return
        try:
            fallocate(self._fd, self.size, end - self.size)
        except OSError:
            self._reserved = -1  # no room, or no support: the writes tell if it matters
        else:
            self._reserved = end

    def _open_files(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        # The index first: a reader that finds the bytes file finds its index too.
        self._index_fd = os.open(self._index_path, flags, 0o644)
        try:
            self._fd = os.open(self.path, flags, 0o644)
        except OSError:
            os.close(self._index_fd)
            self._index_fd = -1
            raise

    def read(self, offset: int, max_bytes: int) -> list[tuple[int, Stream, bytes]]:
        """Up to ``max_bytes`` from ``offset``, split where the stream changes."""
        if not self._writable:
            self._refresh()
        elif self._recent and offset >= self._recent_offsets[self._recent_dropped]:
            return self._read_recent(offset, max_bytes)
        size = min(self.size - offset, max_bytes)
        if size <= 0:
            return []
        data = os.pread(self._fd, size, offset)
        chunks = []
        i = bisect.bisect_right(self._starts, offset) - 1
        pos = offset
        end = offset + len(data)
        while pos < end:
            stop = self._starts[i + 1] if i + 1 < len(self._starts) else end
            stop = min(stop, end)
            chunks.append((pos, _NAMES[self._streams[i]], data[pos - offset : stop - offset]))
            pos = stop
            i += 1
        return chunks

    def _read_recent(self, offset: int, max_bytes: int) -> list[tuple[int, Stream, bytes]]:
        """From the writer's memory, one stream's bytes: a large piece as it was
        written (no copy), small ones joined into one chunk (one copy, cheaper than
        a chunk each)."""
        if offset >= self.size:
            return []
        run = bisect.bisect_right(self._starts, offset) - 1
        run_end = self._starts[run + 1] if run + 1 < len(self._starts) else self.size
        end = min(run_end, offset + max_bytes)
        i = bisect.bisect_right(self._recent_offsets, offset) - 1
        start, data = self._recent_offsets[i], self._recent[i]
        first = data if offset == start and start + len(data) <= end else data[offset - start : end - start]
        pieces, pos = [first], offset + len(first)
        if len(first) < JOIN_BELOW:
            while pos < end and len(self._recent[i + 1]) < JOIN_BELOW:
                i += 1
                data = self._recent[i]
                pieces.append(data if pos + len(data) <= end else data[: end - pos])
                pos += len(pieces[-1])
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        return [(offset, _NAMES[self._streams[run]], data)]

    async def wait_beyond(self, offset: int) -> None:
        """In the writing process: return once the log has grown past ``offset`` or
        :meth:`wake` was called."""
        if self.size <= offset:
            await self._changed.wait()

    def close(self) -> None:
        if self._reserved > self.size:
            try:
                os.ftruncate(self._fd, self.size)  # give back the space reserved unused
            except OSError:
                pass
        self._reserved = 0
        self._recent.clear()
        self._recent_offsets.clear()
        self._recent_dropped = 0
        for fd in (self._fd, self._index_fd):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self._fd = self._index_fd = -1

    def remove(self) -> None:
        self.close()
        for path in (self.path, self._index_path):
            path.unlink(missing_ok=True)

    def wake(self) -> None:
        """Wake every waiter (the task has finished)."""
        self._changed.set()
        self._changed = anyio.Event()

    def _refresh(self) -> None:
        """Catch up with what another process wrote since we last looked."""
        index_size = os.fstat(self._index_fd).st_size
        if index_size > self._index_size:
            whole = index_size - index_size % _RECORD.size
            raw = os.pread(self._index_fd, whole - self._index_size, self._index_size)
            for start, code in _RECORD.iter_unpack(raw):
                self._starts.append(start)
                self._streams.append(code)
            self._index_size = whole
        # A run's index record is written before its bytes, so every byte seen is indexed.
        self.size = os.fstat(self._fd).st_size if self._starts else 0


def give_back_reserved(directory: Path, task_id: str) -> None:
    """Free the disk space a writer reserved for ``task_id``'s log and could not
    give back itself (its process died): cutting a file to its own size does it."""
    path = directory / f"{task_id}.out"
    try:
        os.truncate(path, os.stat(path).st_size)
    except OSError:
        pass  # no log (no output), or already gone


@functools.cache
def _fallocate() -> Callable[[int, int, int], None] | None:
    """Linux's ``fallocate(2)`` with ``FALLOC_FL_KEEP_SIZE`` (the os module has only
    ``posix_fallocate``, which grows the file); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).fallocate  # libc, already loaded
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    keep_size = 1

    def fallocate(fd: int, offset: int, length: int) -> None:
        if function(fd, keep_size, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))

    return fallocate
