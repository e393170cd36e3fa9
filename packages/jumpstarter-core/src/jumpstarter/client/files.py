"""Putting files on a node and fetching them, for :meth:`AsyncNode.put` and
:meth:`AsyncNode.get`.

Both ways the bytes go in chunks with their offsets and end with the sha256 of the
whole file, which the receiving side checks. A fetched file is written under a
temporary name beside its target and renamed into place once its checksum matched;
an upload is the node's to keep whole or not at all (see :mod:`jumpstarter.node.files`).
An upload whose connection drops asks the node how much it holds and goes on from
there; a download resumes inside the transport, as an output stream does.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import secrets
import stat
from contextlib import aclosing
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import anyio
from jumpstarter_protocol import (
    Error,
    ErrorCode,
    FileChunk,
    FileEnd,
    FileInfo,
    GetFile,
    ListFiles,
    MakeDir,
    OpenUpload,
    PutFile,
    StatFile,
)

from jumpstarter.errors import LocalFileError, NodeError, NotFound, TransportError
from jumpstarter.plugins.threads import ThreadWorker, read_ahead

if TYPE_CHECKING:
    from jumpstarter.client.session import AsyncNode

CHUNK = 4 * 1024 * 1024
"""Bytes per chunk sent: large, since each costs a message on the wire."""
RESUMES = 20
"""Times one upload is resumed after a dropped connection before giving up."""


@dataclass(frozen=True)
class Transferred:
    """One file copied: where from, where to (the node's path, or a local one), its
    size and sha256."""

    source: str
    target: str
    size: int
    sha256: str


# --- put ---------------------------------------------------------------------------------


async def put(node: AsyncNode, local: str | os.PathLike[str], remote: str, *, recursive: bool = False,
              task_id: str | None = None) -> list[Transferred]:
    source = Path(local)
    try:
        st = source.stat()
    except OSError as exc:
        raise LocalFileError(f"{local}: {_reason(exc)}") from None
    target = await _remote_target(node, remote, source.name, task_id)
    if stat.S_ISDIR(st.st_mode):
        if not recursive:
            raise LocalFileError(f"{local}: is a directory (copy it with -r)")
        return await _put_tree(node, source, target, task_id)
    return [await put_file(node, source, target, mode=stat.S_IMODE(st.st_mode), task_id=task_id)]


async def _remote_target(node: AsyncNode, remote: str, name: str, task_id: str | None) -> str:
    """``remote``, or ``remote/name`` when it is a directory on the node (or ends in /)."""
    if remote.endswith("/") or remote in ("", "."):
        return posixpath.join(remote or ".", name)
    try:
        info = (await node.request(StatFile(path=remote, task_id=task_id))).file
    except NotFound:
        return remote
    return posixpath.join(remote, name) if info.kind == "dir" else remote


async def _put_tree(node: AsyncNode, source: Path, target: str, task_id: str | None) -> list[Transferred]:
    done: list[Transferred] = []
    await node.request(MakeDir(path=target, mode=stat.S_IMODE(source.stat().st_mode), task_id=task_id))
    for entry in sorted(source.iterdir()):
        remote = posixpath.join(target, entry.name)
        try:
            st = entry.stat()
        except OSError:
            continue  # a dangling symlink: nothing to send
        if stat.S_ISDIR(st.st_mode):
            done += await _put_tree(node, entry, remote, task_id)
        elif stat.S_ISREG(st.st_mode):
            done.append(await put_file(node, entry, remote, mode=stat.S_IMODE(st.st_mode), task_id=task_id))
    return done


async def put_file(node: AsyncNode, source: Path, remote: str, *, mode: int = 0o644,
                   task_id: str | None = None) -> Transferred:
    """Upload one local file to ``remote``, resuming after dropped connections."""
    try:
        file = open(source, "rb")  # noqa: SIM115 - closed below, across awaits
    except OSError as exc:
        raise LocalFileError(f"{source}: {_reason(exc)}") from None
    with file:
        size = os.fstat(file.fileno()).st_size
        opening = OpenUpload(path=remote, size=size, mode=mode, upload_id=secrets.token_hex(12), task_id=task_id)
        ready = await node.request(opening)
        for attempt in range(RESUMES + 1):
            digest = hashlib.sha256()
            if ready.offset:
                await anyio.to_thread.run_sync(_hash_prefix, file, ready.offset, digest)
            header = PutFile(**opening.model_dump(exclude={"type"}), offset=ready.offset)
            chunks = _chunks(file, ready.offset, size, digest)
            try:
                # ``_chunks`` hashes the very objects it yields: a node in this
                # process may take its sha256 rather than hash them again.
                reply = await node.transport.put_file(header, chunks, hashed=True)
            except TransportError:
                await chunks.aclose()  # its reader must let go of the file before the next
                if attempt == RESUMES:
                    raise
                ready = await node.request(opening)  # how much the node kept
                continue
            await chunks.aclose()
            if isinstance(reply, Error):
                if reply.code == ErrorCode.CONFLICT and "open_upload" in reply.message and attempt < RESUMES:
                    ready = await node.request(opening)  # the node moved on meanwhile: ask again
                    continue
                raise NodeError.from_reply(reply)
            return Transferred(str(source), reply.file.path, reply.file.size, reply.sha256)
    raise AssertionError("unreachable")  # pragma: no cover


def _hash_prefix(file: BinaryIO, size: int, digest: Any) -> None:
    file.seek(0)
    while size > 0:
        data = file.read(min(CHUNK, size))
        if not data:
            break
        digest.update(data)
        size -= len(data)


async def _chunks(file: BinaryIO, offset: int, size: int, digest: Any) -> AsyncIterator[FileChunk | FileEnd]:
    # Read ahead and hashed on threads of their own, while the transport sends.
    file.seek(offset)
    hasher = ThreadWorker(digest.update, name="jmp-sha256")
    try:
        position = offset
        # Closed here, not when collected: its thread must stop reading the file first.
        async with aclosing(read_ahead(file.fileno(), chunk=CHUNK)) as reads:
            async for data in reads:
                await hasher.put(data)
                yield FileChunk(offset=position, data=data)
                position += len(data)
        await hasher.finish()
    finally:
        await hasher.aclose()
    yield FileEnd(size=position, sha256=digest.hexdigest())


# --- get ---------------------------------------------------------------------------------


async def get(node: AsyncNode, remote: str, local: str | os.PathLike[str], *, recursive: bool = False,
              task_id: str | None = None) -> list[Transferred]:
    info: FileInfo = (await node.request(StatFile(path=remote, task_id=task_id))).file
    name = posixpath.basename(info.path.rstrip("/")) or "root"
    target = Path(local)
    if target.is_dir():
        target = target / name
    if info.kind == "dir":
        if not recursive:
            raise LocalFileError(f"{remote}: is a directory on node {node.name!r} (copy it with -r)")
        return await _get_tree(node, info, target)
    return [await get_file(node, info, target)]


async def _get_tree(node: AsyncNode, info: FileInfo, target: Path) -> list[Transferred]:
    try:
        target.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise LocalFileError(f"{target}: {_reason(exc)}") from None
    done: list[Transferred] = []
    for entry in (await node.request(ListFiles(path=info.path))).files:
        here = target / posixpath.basename(entry.path)
        if entry.kind == "dir":
            done += await _get_tree(node, entry, here)
        elif entry.kind == "file":
            done.append(await get_file(node, entry, here))
    target.chmod(info.mode)
    return done


async def get_file(node: AsyncNode, info: FileInfo, target: Path, *, expect_sha256: str | None = None) -> Transferred:
    """Download the node's file ``info`` to ``target``: under a temporary name until
    its sha256 matched (and, with ``expect_sha256``, matched that too)."""
    part = target.with_name(f".{target.name}.{secrets.token_hex(4)}.jmp-part")
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise LocalFileError(f"{target}: {_reason(exc)}") from None
    digest = hashlib.sha256()
    hasher = ThreadWorker(digest.update, name="jmp-sha256")
    writer = ThreadWorker(lambda data: _write_all(fd, data), name="jmp-write")
    try:
        size = 0
        end: FileEnd | None = None
        async for message in node.transport.get_file(GetFile(path=info.path)):
            if isinstance(message, FileChunk):
                if message.offset != size:
                    raise TransportError(f"node {node.name!r} sent bytes at {message.offset}, expected {size}")
                await hasher.put(message.data)
                try:
                    await writer.put(message.data)
                except OSError as exc:  # raised by the write of an earlier chunk
                    raise LocalFileError(f"{target}: {_reason(exc)}") from None
                size += len(message.data)
            elif isinstance(message, FileEnd):
                end = message
                break
            elif isinstance(message, Error):
                raise NodeError.from_reply(message)
        if end is None:
            raise TransportError(f"node {node.name!r} ended the download of {info.path} early")
        await hasher.finish()
        try:
            await writer.finish()
        except OSError as exc:
            raise LocalFileError(f"{target}: {_reason(exc)}") from None
        got = digest.hexdigest()
        if end.size != size or end.sha256 != got:
            raise TransportError(
                f"{info.path}: checksum mismatch: got {size} bytes with sha256 {got}, "
                f"node {node.name!r} sent {end.size} with {end.sha256}; nothing was written"
            )
        if expect_sha256 is not None and got != expect_sha256:
            raise LocalFileError(
                f"{info.path}: changed on node {node.name!r} since it was recorded "
                f"(sha256 {got}, recorded {expect_sha256}); nothing was written"
            )
        os.fchmod(fd, info.mode)
        os.close(fd)
        fd = -1
        try:
            os.replace(part, target)
        except OSError as exc:
            raise LocalFileError(f"{target}: {_reason(exc)}") from None
        return Transferred(info.path, str(target), size, got)
    except BaseException:
        await hasher.aclose()
        await writer.aclose()
        if fd >= 0:
            os.close(fd)
        part.unlink(missing_ok=True)
        raise
    finally:
        await hasher.aclose()
        await writer.aclose()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()
