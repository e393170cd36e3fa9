"""What ``jmp run`` and ``jmp shell`` do with jmp's own stdin and terminal: forward
the input to a task, and lend the terminal to a task's PTY (raw mode, restored on
every way out; the window size follows)."""

from __future__ import annotations

import os
import select
import signal
import stat
import termios
import tty
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import anyio.lowlevel

INPUT_CHUNK = 4 * 1024 * 1024
"""Most bytes of input read (and sent) at once."""


def waits_for_input(fd: int) -> bool:
    """True when ``fd`` is a pipe, socket or terminal: reads wait for a writer, so
    they are polled; a regular file or /dev/null is read straight away."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


def carries_data(fd: int) -> bool:
    """True when input on ``fd`` would be lost if the task got none: a pipe, a
    socket or a file (not a terminal, not /dev/null)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode)


async def read_some(fd: int, polled: bool) -> bytes:
    """The next bytes of ``fd`` (``b""`` at its end): what is there at once, up to
    :data:`INPUT_CHUNK`, so fast input goes in few large writes."""
    if polled:
        await anyio.wait_readable(fd)
    else:
        await anyio.lowlevel.checkpoint()
    data = os.read(fd, INPUT_CHUNK)
    if not polled or not data:
        return data
    parts, size = [data], len(data)
    while size < INPUT_CHUNK and select.select([fd], [], [], 0)[0]:
        more = os.read(fd, INPUT_CHUNK - size)
        if not more:
            break  # the end: the next call reads b"" again
        parts.append(more)
        size += len(more)
    return b"".join(parts)


async def forward_input(task: Any, fd: int, close: bool = True) -> None:
    """Copy ``fd`` to ``task``'s input until its end, then close the input (EOF
    passes through, as with ssh). A task that stops reading ends the copy quietly."""
    from jumpstarter.errors import Conflict

    polled = waits_for_input(fd)
    try:
        while data := await read_some(fd, polled):
            await task.write_input(data)
        if close:
            await task.close_input()
    except Conflict:
        pass  # the task exited or closed its stdin: the rest has nowhere to go


def terminal_size(fd: int) -> tuple[int, int]:
    size = os.get_terminal_size(fd)
    return size.lines, size.columns


@contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """The terminal ``fd`` in raw mode (every key, Ctrl-C included, goes to the
    task), put back as it was however the block ends."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def follow_window_size(task: Any, fd: int) -> None:
    """Resize ``task``'s terminal whenever this one is resized (SIGWINCH)."""
    with anyio.open_signal_receiver(signal.SIGWINCH) as signals:
        async for _ in signals:
            await task.resize(*terminal_size(fd))

