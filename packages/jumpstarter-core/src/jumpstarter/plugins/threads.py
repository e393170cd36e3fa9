"""Moving bytes on threads while the event loop goes on: what the file transfers of
a node server, a client and a node driver use, so that reading, hashing and writing a
large file overlap instead of taking turns.

- :class:`ThreadWorker` calls a function on each item given, in order, on a thread of
  its own, a few items behind the caller (``digest.update``, ``os.write``);
- :func:`read_ahead` reads a file on a thread of its own, a few chunks ahead of the
  reader.

Both work under any anyio back end; ``hashlib`` and file I/O release the GIL, so on
two cores they really run beside the event loop.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

_STOP = object()


class ThreadWorker:
    """Call ``fn(item)`` for every item :meth:`put`, in order, on a thread of its own,
    at most ``ahead`` items behind. An exception ``fn`` raises is raised again by the
    next :meth:`put` or by :meth:`finish`; the items after it are skipped."""

    def __init__(self, fn: Callable[[Any], object], *, ahead: int = 2, name: str = "jmp-worker") -> None:
        self._fn = fn
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._room = threading.Semaphore(ahead)
        self._error: BaseException | None = None
        self._abandoned = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._items.get()) is not _STOP:
            try:
                if self._error is None and not self._abandoned:
                    self._fn(item)
            except BaseException as exc:  # handed to the caller
                self._error = exc
            finally:
                self._room.release()

    async def put(self, item: Any) -> None:
        """Hand ``item`` over; waits (off the event loop) while ``ahead`` are pending."""
        self._raise()
        if not self._room.acquire(blocking=False):
            await anyio.to_thread.run_sync(self._room.acquire)
        self._items.put(item)

    async def finish(self) -> None:
        """Wait until every item was handled; raise what ``fn`` raised, if anything."""
        await self._join()
        self._raise()

    async def aclose(self) -> None:
        """Skip the items still pending and wait for the thread to end (so what
        ``fn`` uses, say a file descriptor, may be closed next). Never raises."""
        self._abandoned = True
        with anyio.CancelScope(shield=True):
            await self._join()

    async def _join(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._items.put(_STOP)
        await anyio.to_thread.run_sync(self._thread.join)

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


async def read_ahead(fd: int, *, chunk: int, ahead: int = 2) -> AsyncIterator[bytes]:
    """The bytes of open file ``fd`` from its current position to its end, in chunks
    of ``chunk`` bytes read on a thread of its own, up to ``ahead`` chunks before they
    are asked for. ``OSError`` from a read is raised where that chunk would be."""
    chunks: queue.Queue[Any] = queue.Queue(ahead)
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                data: Any = os.read(fd, chunk)
            except OSError as exc:
                data = exc
            while not stop.is_set():
                try:
                    chunks.put(data, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(data, bytes) or not data:
                return

    thread = threading.Thread(target=read, name="jmp-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            try:
                data = chunks.get_nowait()
            except queue.Empty:
                data = await anyio.to_thread.run_sync(chunks.get)
            if isinstance(data, OSError):
                raise data
            if not data:
                return
            yield data
    finally:
        stop.set()
        # The caller may close ``fd`` next: the thread must be done with it first.
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(thread.join)
