"""Where a board's console comes from: a byte stream both ways, nothing more.

:class:`PortConsole` opens a UART (``/dev/ttyUSB0``, a PTY's ``/dev/pts/N``) or any
pyserial URL (``socket://host:port``, ``rfc2217://host:port``…); :class:`UnixConsole`
connects to a Unix socket (a QEMU VM's serial). The serial node driver reads and
writes one of these and knows nothing of where it leads.
"""

from __future__ import annotations

import errno
import os
import termios
from abc import ABC, abstractmethod

import anyio
import serial

READ_SIZE = 256 * 1024


class Console(ABC):
    """A board's console: bytes the board prints, bytes typed to it."""

    @abstractmethod
    async def read(self) -> bytes:
        """The next bytes the board printed; ``b""`` once the console is gone (the
        board powered off, the cable was pulled)."""

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Type ``data``, all of it, in order."""

    @abstractmethod
    async def aclose(self) -> None:
        """Let go of the console."""


class PortConsole(Console):
    """A serial port opened with pyserial: a device path or any pyserial URL.

    Ports with a file descriptor (UARTs, PTYs, ``socket://``) are read and written
    without blocking under the event loop; the others (``rfc2217://``…) through
    pyserial's own calls in a worker thread."""

    def __init__(self, url: str, baud: int = 115200) -> None:
        try:
            self.port = serial.serial_for_url(
                url, baudrate=baud, timeout=0.2, write_timeout=None, do_not_open=True
            )
            _open_keeping_input(self.port)
        except (serial.SerialException, ValueError, OSError) as exc:
            raise OSError(errno.EIO, f"cannot open {url}: {exc}") from None
        self.url = url
        try:
            self.fd: int | None = self.port.fileno()
        except Exception:  # pyserial raises several kinds for "no fd here"
            self.fd = None
        if self.fd is not None:
            os.set_blocking(self.fd, False)
            if os.isatty(self.fd):
                # pyserial leaves VMIN at 0, so a read of a quiet port returns b"" as if
                # the port had closed; with VMIN 1 it says "nothing yet" (EAGAIN).
                attrs = termios.tcgetattr(self.fd)
                attrs[6][termios.VMIN] = 1
                attrs[6][termios.VTIME] = 0
                termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    async def read(self) -> bytes:
        if self.fd is None:
            while True:
                data = await anyio.to_thread.run_sync(self._read_blocking)
                if data is None:
                    return b""
                if data:
                    return data
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                await anyio.wait_readable(self.fd)
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # a PTY whose other end closed, a device gone
                    return b""
                raise
            # A terminal hands out at most a few KiB a read: what is there already
            # goes in one piece, so a fast board does not cost a wake-up per 4 KiB.
            parts = [data]
            size = len(data)
            while data and size < READ_SIZE:
                try:
                    data = os.read(self.fd, READ_SIZE - size)
                except OSError:
                    break
                parts.append(data)
                size += len(data)
            return b"".join(parts)

    def _read_blocking(self) -> bytes | None:
        try:
            return self.port.read(max(1, self.port.in_waiting))
        except (serial.SerialException, OSError):
            return None

    async def write(self, data: bytes) -> None:
        if self.fd is None:
            await anyio.to_thread.run_sync(self.port.write, data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await anyio.wait_writable(self.fd)

    async def aclose(self) -> None:
        self.port.close()


def _open_keeping_input(port: serial.SerialBase) -> None:
    """Open ``port`` without the input flush pyserial's ``open()`` does: what the
    board printed before the node opened its console (a boot log waiting in a PTY's
    or a USB adapter's buffer, a socket's backlog) belongs in the transcript."""
    # pyserial flushes through _reset_input_buffer (posix ports) or
    # reset_input_buffer (socket://, rfc2217://), with no option to skip it.
    names = ("_reset_input_buffer", "reset_input_buffer")
    for name in names:
        setattr(port, name, _keep)
    try:
        port.open()
    finally:
        for name in names:
            delattr(port, name)


def _keep() -> None:
    pass


class UnixConsole(Console):
    """A console behind a Unix socket (QEMU's ``-chardev socket,path=…``)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream

    @classmethod
    async def connect(cls, path: str) -> UnixConsole:
        return cls(await anyio.connect_unix(path))

    async def read(self) -> bytes:
        try:
            return await self.stream.receive(READ_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return b""

    async def write(self, data: bytes) -> None:
        try:
            await self.stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise OSError(errno.EPIPE, "the console closed") from exc

    async def aclose(self) -> None:
        await self.stream.aclose()
