"""The files of an ssh node, over SFTP on the node's one connection.

SFTP answers each request after a round trip, so reads and writes move large pieces
(asyncssh splits each into many requests in flight at once)."""

from __future__ import annotations

import errno
import posixpath
import stat as stat_module
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal, NoReturn

import asyncssh
from jumpstarter.plugins import FileStat, NodeFiles

if TYPE_CHECKING:
    from .node import SshNodeDriver

PIECE = 4 * 1024 * 1024
"""Bytes read or written per SFTP call."""

_ERRNO: dict[type[asyncssh.SFTPError], int] = {
    asyncssh.SFTPNoSuchFile: errno.ENOENT,
    asyncssh.SFTPNoSuchPath: errno.ENOENT,
    asyncssh.SFTPPermissionDenied: errno.EACCES,
    asyncssh.SFTPWriteProtect: errno.EROFS,
    asyncssh.SFTPFileAlreadyExists: errno.EEXIST,
    asyncssh.SFTPNoSpaceOnFilesystem: errno.ENOSPC,
    asyncssh.SFTPQuotaExceeded: errno.EDQUOT,
    asyncssh.SFTPDirNotEmpty: errno.ENOTEMPTY,
    asyncssh.SFTPNotADirectory: errno.ENOTDIR,
    asyncssh.SFTPFileIsADirectory: errno.EISDIR,
    asyncssh.SFTPInvalidFilename: errno.EINVAL,
    asyncssh.SFTPLinkLoop: errno.ELOOP,
}


def _os_error(exc: asyncssh.SFTPError, path: str) -> NoReturn:
    code = next((code for cls, code in _ERRNO.items() if isinstance(exc, cls)), errno.EIO)
    raise OSError(code, exc.reason or type(exc).__name__, path) from None


def _kind(mode: int) -> Literal["file", "dir", "link", "other"]:
    if stat_module.S_ISREG(mode):
        return "file"
    if stat_module.S_ISDIR(mode):
        return "dir"
    if stat_module.S_ISLNK(mode):
        return "link"
    return "other"


class SshFiles(NodeFiles):
    """:class:`NodeFiles` on the SSH host, through SFTP."""

    def __init__(self, driver: SshNodeDriver) -> None:
        self.driver = driver

    async def stat(self, path: str) -> FileStat | None:
        sftp = await self.driver.sftp()
        try:
            attrs = await sftp.lstat(path)
        except asyncssh.SFTPNoSuchFile:
            return None
        except asyncssh.SFTPError as exc:
            _os_error(exc, path)
        mode = attrs.permissions or 0
        return FileStat(
            kind=_kind(mode),
            size=attrs.size or 0,
            mode=stat_module.S_IMODE(mode),
            mtime=float(attrs.mtime or 0),
        )

    async def real_path(self, path: str) -> str:
        sftp = await self.driver.sftp()
        missing: list[str] = []
        head = posixpath.normpath(path)
        while True:
            try:
                resolved = await sftp.realpath(head)
                break
            except asyncssh.SFTPNoSuchFile:
                head, tail = posixpath.split(head)
                if not tail:
                    raise OSError(errno.ENOENT, "no such path", path) from None
                missing.insert(0, tail)
            except asyncssh.SFTPError as exc:
                _os_error(exc, path)
        return posixpath.join(resolved, *missing) if missing else resolved

    async def list_dir(self, path: str) -> list[str]:
        sftp = await self.driver.sftp()
        try:
            names = await sftp.listdir(path)
        except asyncssh.SFTPError as exc:
            _os_error(exc, path)
        return sorted(name for name in names if name not in (".", ".."))

    async def read(self, path: str, offset: int = 0) -> AsyncIterator[bytes]:
        sftp = await self.driver.sftp()
        try:
            async with sftp.open(path, "rb", encoding=None) as file:
                while True:
                    data = await file.read(PIECE, offset)
                    if not data:
                        return
                    offset += len(data)
                    yield data
        except asyncssh.SFTPError as exc:
            _os_error(exc, path)

    async def write(self, path: str, chunks: AsyncIterator[bytes], *, offset: int = 0) -> int:
        sftp = await self.driver.sftp()
        flags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | (asyncssh.FXF_TRUNC if offset == 0 else 0)
        try:
            async with sftp.open(
                path, flags, attrs=asyncssh.SFTPAttrs(permissions=0o600), encoding=None
            ) as file:
                if offset:
                    await file.truncate(offset)
                pending = bytearray()
                async for chunk in chunks:
                    pending += chunk
                    if len(pending) >= PIECE:
                        offset += await _write(file, pending, offset)
                        pending.clear()
                if pending:
                    offset += await _write(file, pending, offset)
                await file.fsync()
        except asyncssh.SFTPError as exc:
            _os_error(exc, path)
        return offset

    async def rename(self, source: str, target: str) -> None:
        sftp = await self.driver.sftp()
        try:
            await sftp.posix_rename(source, target)
        except asyncssh.SFTPOpUnsupported:
            try:  # a server without the OpenSSH extension: remove, then rename
                await self.remove(target)
                await sftp.rename(source, target)
            except asyncssh.SFTPError as exc:
                _os_error(exc, source)
        except asyncssh.SFTPError as exc:
            _os_error(exc, source)

    async def remove(self, path: str) -> None:
        sftp = await self.driver.sftp()
        try:
            await sftp.remove(path)
        except asyncssh.SFTPNoSuchFile:
            pass
        except asyncssh.SFTPError as exc:
            _os_error(exc, path)

    async def make_dir(self, path: str, mode: int = 0o755) -> None:
        sftp = await self.driver.sftp()
        try:
            await sftp.makedirs(path, asyncssh.SFTPAttrs(permissions=mode), exist_ok=True)
        except asyncssh.SFTPError as exc:
            _os_error(exc, path)

    async def chmod(self, path: str, mode: int) -> None:
        sftp = await self.driver.sftp()
        try:
            await sftp.chmod(path, mode)
        except asyncssh.SFTPError as exc:
            _os_error(exc, path)


async def _write(file: asyncssh.SFTPClientFile, data: bytearray, offset: int) -> int:
    await file.write(bytes(data), offset)
    return len(data)
