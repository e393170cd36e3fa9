"""Files put on and fetched from a node: what the node server adds to a driver's
:class:`~jumpstarter.plugins.interfaces.NodeFiles`.

- **Where.** A relative path resolves against the task's working directory (a request
  naming ``task_id``), else the files root, else the node server's own directory. With
  a files root (``jmp node serve --files-root DIR``, node config ``files_root``) every
  path is resolved through its symlinks and ``..`` and refused when it leaves the root;
  without one the node user's permissions are the only limit.
- **How much.** One transfer is at most ``max_transfer`` bytes.
- **Whole or nothing.** An upload is written to a temporary name beside its target
  (``.NAME.UPLOAD_ID.jmp-part``), its sha256 checked against the one the client sent
  at the end, then renamed into place: nothing half-written is ever visible under the
  final name, and a failed checksum leaves nothing. A connection that drops leaves the
  temporary file for the same upload to resume from (``OpenUpload`` says its offset);
  any other failure removes it, and one nobody resumed for an hour goes with the next
  upload to that name.
- **Checked both ways.** A download ends with the sha256 of the whole file, which the
  client checks against what it got.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import posixpath
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
from jumpstarter_protocol import (
    FileChunk,
    FileEnd,
    FileInfo,
    FileList,
    FileStat,
    FileWritten,
    GetFile,
    ListFiles,
    MakeDir,
    OpenUpload,
    PutFile,
    StatFile,
    UploadReady,
)

from jumpstarter.errors import BadRequest, Conflict, NodeError, NotFound, TooLarge, Unavailable
from jumpstarter.plugins.interfaces import FileStat as DriverStat
from jumpstarter.plugins.interfaces import NodeFiles
from jumpstarter.plugins.threads import ThreadWorker

if TYPE_CHECKING:
    from jumpstarter.store.base import Store

DEFAULT_MAX_TRANSFER = 16 * 1024**3
"""Bytes one transfer may carry unless the node says otherwise (``max_transfer``)."""
PART_SUFFIX = ".jmp-part"
STALE_PART = 3600.0
"""Seconds after which the temporary file of an upload nobody resumed is removed (by
the next upload to the same name)."""


class Files:
    """The files of one node, as the node server serves them."""

    def __init__(
        self,
        node_name: str,
        files: NodeFiles | None,
        store: Store,
        *,
        root: str | None = None,
        max_transfer: int = DEFAULT_MAX_TRANSFER,
    ) -> None:
        self.node_name = node_name
        self._files = files
        self.store = store
        self.root = posixpath.normpath(root) if root else None
        self.max_transfer = max_transfer
        self._real_root: str | None = None
        # One writer per upload: a resume waits until the stream its client lost has
        # let go of the temporary file, so the offset it is told is final.
        self._uploads: dict[str, anyio.Lock] = {}

    @property
    def files(self) -> NodeFiles:
        if self._files is None:
            raise BadRequest(f"node {self.node_name!r} has no 'files' capability: it cannot put or fetch files")
        return self._files

    # --- where -------------------------------------------------------------------------

    async def resolve(self, path: str, task_id: str | None = None) -> str:
        """``path`` as an absolute path of the node, confined to the files root."""
        files = self.files
        if "\0" in path:
            raise BadRequest(f"invalid path {path!r}: it holds a NUL byte")
        base = self.root or os.getcwd()
        if task_id is not None:
            task = await self.store.get_task(task_id)
            if task.spec.cwd:
                base = posixpath.join(base, task.spec.cwd)
        full = posixpath.normpath(posixpath.join(base, path))
        if self.root is None:
            return full
        if self._real_root is None:
            self._real_root = await self._os(files.real_path(self.root), self.root)
        real = await self._os(files.real_path(full), path)
        if real != self._real_root and not real.startswith(self._real_root.rstrip("/") + "/"):
            raise BadRequest(f"{path}: outside the files root {self.root} of node {self.node_name!r}")
        return real

    # --- requests ----------------------------------------------------------------------

    async def stat(self, request: StatFile) -> FileStat:
        path = await self.resolve(request.path, request.task_id)
        return FileStat(file=await self._info(path, request.path))

    async def list(self, request: ListFiles) -> FileList:
        if request.pattern is not None:
            return FileList(files=await self._glob(request.pattern, request.task_id))
        assert request.path is not None
        path = await self.resolve(request.path, request.task_id)
        info = await self._info(path, request.path)
        if info.kind != "dir":
            raise BadRequest(f"{request.path}: not a directory on node {self.node_name!r}")
        names = await self._os(self.files.list_dir(path), request.path)
        found = []
        for name in names:
            stat = await self._os(self.files.stat(posixpath.join(path, name)), request.path)
            if stat is not None:
                found.append(_file_info(posixpath.join(path, name), stat))
        return FileList(files=found)

    async def make_dir(self, request: MakeDir) -> FileStat:
        path = await self.resolve(request.path, request.task_id)
        existing = await self._os(self.files.stat(path), request.path)
        if existing is not None and existing.kind != "dir":
            raise BadRequest(f"{request.path}: exists on node {self.node_name!r} and is not a directory")
        await self._os(self.files.make_dir(path, request.mode), request.path)
        await self._os(self.files.chmod(path, request.mode), request.path)
        return FileStat(file=await self._info(path, request.path))

    async def open_upload(self, request: OpenUpload) -> UploadReady:
        path, part = await self._upload_target(request)
        async with self._upload_lock(part):
            held = await self._os(self.files.stat(part), request.path)
        if held is None:
            await self._forget_stale_parts(path, part)
        return UploadReady(path=path, offset=held.size if held is not None else 0)

    async def _forget_stale_parts(self, path: str, part: str) -> None:
        """Remove what uploads to ``path`` left that no client came back for (a client
        resumes within its reconnect timeout, a minute; these are older than an hour)."""
        parent, name = posixpath.split(path)
        prefix = f".{name}."
        try:
            names = await self.files.list_dir(parent)
            for other in names:
                here = posixpath.join(parent, other)
                if not (other.startswith(prefix) and other.endswith(PART_SUFFIX)) or here == part:
                    continue
                stat = await self.files.stat(here)
                if stat is not None and stat.kind == "file" and time.time() - stat.mtime > STALE_PART:
                    await self.files.remove(here)
        except OSError:
            pass  # tidying up is no reason to refuse the upload

    async def upload(
        self, header: PutFile, messages: AsyncIterator[Any], *, in_process: bool = False
    ) -> FileWritten:
        """Take the chunks after ``header`` and, once the ``FileEnd`` matched, put the
        file in place. A stream that stops short (the connection dropped) keeps what
        arrived for a resume; every other failure leaves nothing.

        ``in_process``: the chunks are the client's own bytes objects, handed over in
        this process, not copies that crossed a wire, and the client vouches that the
        ``FileEnd``'s sha256 is of exactly these objects (it hashed them as it read its
        file). Hashing the same immutable objects again could only agree, and would
        cost a put on the local node as much as the copy itself, so the node takes that
        sha256. Offsets and size are still checked. A caller that does not vouch (a
        ``FileEnd`` of its own making) is checked as over a wire."""
        path, part = await self._upload_target(header)
        async with self._upload_lock(part):
            return await self._upload(header, messages, path, part, in_process)

    @asynccontextmanager
    async def _upload_lock(self, part: str) -> AsyncIterator[None]:
        lock = self._uploads.setdefault(part, anyio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._uploads.pop(part, None)

    async def _upload(
        self, header: PutFile, messages: AsyncIterator[Any], path: str, part: str, in_process: bool
    ) -> FileWritten:
        files = self.files
        held = await self._os(files.stat(part), header.path)
        have = held.size if held is not None else 0
        if header.offset != have:
            raise Conflict(
                f"{header.path}: node {self.node_name!r} holds {have} bytes of this upload, "
                f"not {header.offset}: ask again where to resume (open_upload)"
            )
        digest = hashlib.sha256()
        if have and not in_process:
            try:
                async for data in files.read(part):
                    await anyio.to_thread.run_sync(digest.update, data)
            except OSError as exc:
                raise self._os_error(exc, header.path) from None
        end: list[FileEnd] = []
        size = [have]
        # Hashed on a thread of its own while the driver writes the chunk before.
        hasher = None if in_process else ThreadWorker(digest.update, name="jmp-sha256")

        async def data_of() -> AsyncIterator[bytes]:
            async for message in messages:
                if isinstance(message, FileEnd):
                    end.append(message)
                    return
                if not isinstance(message, FileChunk):
                    raise BadRequest(f"{message.type} inside an upload: expected file_chunk or file_end")
                if message.offset != size[0]:
                    raise BadRequest(f"file chunk at offset {message.offset}, expected {size[0]}")
                size[0] += len(message.data)
                if size[0] > header.size:
                    raise BadRequest(f"{header.path}: more than the {header.size} bytes announced")
                if hasher is not None:
                    await hasher.put(message.data)
                yield message.data

        try:
            await files.write(part, data_of(), offset=have)
            if hasher is not None:
                await hasher.finish()
        except OSError as exc:
            await self._discard(part)
            raise self._os_error(exc, header.path) from None
        except NodeError:
            await self._discard(part)
            raise
        finally:
            if hasher is not None:
                await hasher.aclose()
        if not end:
            # The stream stopped short: keep what came for the same upload to resume.
            raise BadRequest(f"{header.path}: the upload ended at byte {size[0]} of {header.size}")
        sha256 = end[0].sha256 if in_process else digest.hexdigest()
        problem = None
        if end[0].size != size[0] or size[0] != header.size:
            problem = f"size mismatch: {size[0]} bytes arrived, {header.size} announced"
        elif end[0].sha256 != sha256:
            problem = f"checksum mismatch: sha256 {sha256} arrived, {end[0].sha256} was sent"
        if problem is not None:
            await self._discard(part)
            raise BadRequest(f"{header.path}: {problem}; nothing was written")
        try:
            await files.chmod(part, header.mode)
            await files.rename(part, path)
        except OSError as exc:
            await self._discard(part)
            raise self._os_error(exc, header.path) from None
        return FileWritten(file=await self._info(path, header.path), sha256=sha256)

    async def download(self, request: GetFile) -> AsyncGenerator[FileChunk | FileEnd, None]:
        """``FileChunk`` messages from ``request.offset``, then the ``FileEnd`` with
        the sha256 of the whole file (the bytes before the offset are read and hashed,
        not sent)."""
        path = await self.resolve(request.path, request.task_id)
        info = await self._info(path, request.path)
        if info.kind == "dir":
            raise BadRequest(f"{request.path}: is a directory on node {self.node_name!r} (copy it with -r)")
        if info.kind != "file":
            raise BadRequest(f"{request.path}: not a regular file on node {self.node_name!r}")
        if info.size > self.max_transfer:
            raise self._too_large(request.path, info.size)
        digest = hashlib.sha256()
        hasher = ThreadWorker(digest.update, name="jmp-sha256")
        offset = 0
        chunks = self.files.read(path)
        try:
            while True:
                try:
                    data = await chunks.__anext__()
                except StopAsyncIteration:
                    break
                except OSError as exc:
                    raise self._os_error(exc, request.path) from None
                await hasher.put(data)
                start, offset = offset, offset + len(data)
                if offset > self.max_transfer:
                    raise self._too_large(request.path, offset)
                if offset <= request.offset:
                    continue
                if start < request.offset:
                    data, start = data[request.offset - start :], request.offset
                yield FileChunk(offset=start, data=data)
            await hasher.finish()
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
            await hasher.aclose()
        yield FileEnd(size=offset, sha256=digest.hexdigest())

    # --- helpers ----------------------------------------------------------------------

    async def _upload_target(self, request: OpenUpload) -> tuple[str, str]:
        if request.size > self.max_transfer:
            raise self._too_large(request.path, request.size)
        path = await self.resolve(request.path, request.task_id)
        target = await self._os(self.files.stat(path), request.path)
        if target is not None and target.kind == "dir":
            raise BadRequest(f"{request.path}: is a directory on node {self.node_name!r}")
        parent, name = posixpath.split(path)
        where = await self._os(self.files.stat(parent), request.path)
        if where is None or where.kind != "dir":
            raise NotFound(f"{request.path}: no directory {parent} on node {self.node_name!r}")
        return path, posixpath.join(parent, f".{name}.{request.upload_id}{PART_SUFFIX}")

    async def _glob(self, pattern: str, task_id: str | None) -> list[FileInfo]:
        files = self.files
        absolute = pattern.startswith("/")
        base = "/" if absolute else await self.resolve(".", task_id)
        paths = [base]
        for part in [p for p in pattern.split("/") if p and p != "."]:
            found = []
            for here in paths:
                if not any(c in part for c in "*?["):
                    found.append(posixpath.join(here, part))
                    continue
                stat = await self._os(files.stat(here), pattern)
                if stat is None or stat.kind != "dir":
                    continue
                names = await self._os(files.list_dir(here), pattern)
                found += [posixpath.join(here, n) for n in names if fnmatch.fnmatchcase(n, part)
                          and (not n.startswith(".") or part.startswith("."))]
            paths = found
        infos = []
        for path in paths:
            try:
                real = await self.resolve(path)
            except BadRequest:
                continue  # a match outside the files root (a symlink out) is not offered
            stat = await self._os(files.stat(real), pattern)
            if stat is not None:
                infos.append(_file_info(posixpath.normpath(path), stat))
        return infos

    async def _info(self, path: str, shown: str) -> FileInfo:
        stat = await self._os(self.files.stat(path), shown)
        if stat is None:
            raise NotFound(f"{shown}: no such file on node {self.node_name!r}")
        return _file_info(path, stat)

    async def _discard(self, part: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self.files.remove(part)
            except OSError:
                pass  # the failure being reported matters more

    async def _os(self, awaitable: Any, shown: str) -> Any:
        try:
            return await awaitable
        except OSError as exc:
            raise self._os_error(exc, shown) from None

    def _os_error(self, exc: OSError, shown: str) -> NodeError:
        reason = exc.strerror or str(exc)
        text = f"{shown}: {reason.lower() if reason else 'error'} on node {self.node_name!r}"
        code = errno.errorcode.get(exc.errno or 0, "EIO")
        if exc.errno == errno.ENOENT:
            return NotFound(text, details={"errno": code})
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return Unavailable(text, details={"errno": code})
        return BadRequest(text, details={"errno": code})

    def _too_large(self, shown: str, size: int) -> TooLarge:
        return TooLarge(
            f"{shown}: {size} bytes is over the limit of {self.max_transfer} bytes per transfer "
            f"of node {self.node_name!r}"
        )


def _file_info(path: str, stat: DriverStat) -> FileInfo:
    return FileInfo(path=path, kind=stat.kind, size=stat.size, mode=stat.mode, mtime=stat.mtime)
