"""Files on a board, over its console: each operation is one shell command, file
contents travel as base64 (heredocs of lines shorter than a terminal's line limit),
and every write is checked against its sha256 on the board.

The board's shell needs ``base64``, ``sha256sum``, ``stat``, ``tail``, ``truncate``
(busybox has them all).
"""

from __future__ import annotations

import base64
import errno
import os
import hashlib
import shlex
import stat as stat_module
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from jumpstarter.plugins import FileStat, NodeFiles

if TYPE_CHECKING:
    from .node import SerialNodeDriver

CHUNK = 512 * 1024
"""Bytes per command: one heredoc of base64 lines (a terminal line holds 4095 chars).
Each command costs the board a fork or two: fewer, larger ones go faster."""
LINE = 1024
_ERRNO = {2: errno.ENOENT, 13: errno.EACCES, 20: errno.ENOTDIR, 21: errno.EISDIR, 28: errno.ENOSPC}


class ConsoleFiles(NodeFiles):
    def __init__(self, driver: SerialNodeDriver) -> None:
        self.driver = driver

    async def _run(self, script: str, path: str, timeout: float = 60.0) -> bytes:
        """Run ``script`` in a subshell (so ``exit N`` names an errno); its output,
        or :class:`OSError` for a non-zero exit."""
        code, out = await self.driver.capture(f"( {script}\n)", timeout)
        if code != 0:
            number = _ERRNO.get(code, errno.EIO)
            text = out.decode(errors="replace").strip().splitlines()
            raise OSError(number, text[-1] if text and number == errno.EIO else os.strerror(number), path)
        return out

    async def stat(self, path: str) -> FileStat | None:
        q = shlex.quote(path)
        out = await self._run(f"if [ -e {q} ] || [ -L {q} ]; then stat -c '%f %s %Y' {q}; else echo none; fi", path)
        words = out.split()
        if words == [b"none"]:
            return None
        mode, size, mtime = int(words[0], 16), int(words[1]), float(words[2])
        kind = (
            "link" if stat_module.S_ISLNK(mode)
            else "dir" if stat_module.S_ISDIR(mode)
            else "file" if stat_module.S_ISREG(mode)
            else "other"
        )
        return FileStat(kind=kind, size=size, mode=stat_module.S_IMODE(mode), mtime=mtime)

    async def real_path(self, path: str) -> str:
        q = shlex.quote(path)
        out = await self._run(
            f"readlink -f {q} 2>/dev/null || {{ d=$(cd \"$(dirname {q})\" 2>/dev/null && pwd -P) "
            f"&& echo \"$d/$(basename {q})\"; }} || echo {q}",
            path,
        )
        return out.decode().strip() or path

    async def list_dir(self, path: str) -> list[str]:
        q = shlex.quote(path)
        out = await self._run(f"[ -e {q} ] || exit 2; [ -d {q} ] || exit 20; ls -1A {q}", path)
        return sorted(name for name in out.decode(errors="surrogateescape").split("\n") if name)

    async def read(self, path: str, offset: int = 0) -> AsyncIterator[bytes]:
        q = shlex.quote(path)
        out = await self._run(
            f"[ -e {q} ] || exit 2; [ -d {q} ] && exit 21; tail -c +{offset + 1} {q} | base64", path, 600
        )
        data = base64.b64decode(b"".join(out.split()))
        for start in range(0, len(data), 1024 * 1024):
            yield data[start : start + 1024 * 1024]

    async def write(self, path: str, chunks: AsyncIterator[bytes], *, offset: int = 0) -> int:
        q = shlex.quote(path)
        # Each command costs the board forks and a round trip: the file is created (or
        # cut to ``offset``) by the command carrying the first chunk, and checked by the
        # one carrying the last, so a file of one chunk is one command.
        if offset:
            start = f"[ -d {q} ] && exit 21; truncate -s {offset} {q} && "
        else:
            start = f"[ -d {q} ] && exit 21; umask 077; : > {q} && "
        # From the start, the file itself (one process less than through tail).
        check = f"tail -c +{offset + 1} {q} | sha256sum" if offset else f"sha256sum < {q}"
        digest = hashlib.sha256()
        size = offset
        pending = b""
        async for chunk in chunks:
            pending += chunk
            # More than a chunk held: the last one goes with the check, below.
            while len(pending) > CHUNK:
                await self._run(start + self._append(q, pending[:CHUNK]), path)
                start = ""
                digest.update(pending[:CHUNK])
                size += CHUNK
                pending = pending[CHUNK:]
        digest.update(pending)
        size += len(pending)
        last = self._append(q, pending, then=check) if pending else check
        out = await self._run(start + last, path)
        if out.split()[:1] != [digest.hexdigest().encode()]:
            # Said without the path: the node names the file the user gave, not ours.
            raise OSError(errno.EIO, "checksum mismatch after writing over the console", path)
        return size

    @staticmethod
    def _append(q: str, data: bytes, then: str | None = None) -> str:
        """The command appending ``data`` to file ``q`` (then running ``then`` if that
        worked: its line comes before the heredoc's lines, as the shell reads it)."""
        encoded = base64.b64encode(data).decode()
        lines = "\n".join(encoded[i : i + LINE] for i in range(0, len(encoded), LINE))
        after = f" && {then}" if then else ""
        return f"base64 -d >> {q} <<'__JMP_EOF'{after}\n{lines}\n__JMP_EOF"

    async def rename(self, source: str, target: str) -> None:
        await self._run(f"mv -f {shlex.quote(source)} {shlex.quote(target)}", source)

    async def remove(self, path: str) -> None:
        q = shlex.quote(path)
        await self._run(f"[ -d {q} ] && [ ! -L {q} ] && exit 21; rm -f {q}", path)

    async def make_dir(self, path: str, mode: int = 0o755) -> None:
        await self._run(f"mkdir -p -m {mode:o} {shlex.quote(path)}", path)

    async def chmod(self, path: str, mode: int) -> None:
        await self._run(f"chmod {mode:o} {shlex.quote(path)}", path)
