"""The asyncssh classes the ssh node driver subclasses, apart from ``node.py`` so that
registering the driver does not import asyncssh (see ``node._LazyAsyncssh``)."""

from __future__ import annotations

import anyio
import asyncssh
from jumpstarter.plugins import OutputWriter


class _TaskSession(asyncssh.SSHClientSession[bytes]):
    """One task's channel: output straight to the task's writer, once the wrapper's
    report (the line with the marker) has been taken out of it."""

    def __init__(self, output: OutputWriter, marker: str, from_stream: str) -> None:
        self.output = output
        self.marker = marker.encode()
        self.from_stream = from_stream
        self.head = b""
        self.started = anyio.Event()
        self.closed = anyio.Event()
        self.writable = anyio.Event()
        self.writable.set()
        self.group: int | None = None
        self.failure: str | None = None
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.error: Exception | None = None
        self.channel: asyncssh.SSHClientChannel[bytes]

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:  # type: ignore[override]
        self.channel = chan

    def data_received(self, data: bytes, datatype: int | None) -> None:
        stream = "stderr" if datatype == asyncssh.EXTENDED_DATA_STDERR else "stdout"
        if not self.started.is_set() and stream == self.from_stream:
            data = self._take_report(data)
            if not data:
                return
        self.output.write(stream, data)  # type: ignore[arg-type]

    def _take_report(self, data: bytes) -> bytes:
        """Keep bytes until the report line is complete; give back what follows it."""
        self.head += data
        at = self.head.find(self.marker + b":")
        if at < 0 or b"\n" not in self.head[at:]:
            return b""
        end = self.head.index(b"\n", at)
        before, report, rest = self.head[:at], self.head[at:end], self.head[end + 1 :]
        self.head = b""
        value = report.split(b":", 1)[1].strip()
        if value.isdigit():
            self.group = int(value)
        else:
            self.failure = value.decode()
        self.started.set()
        return before + rest

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = signal

    def pause_writing(self) -> None:
        self.writable = anyio.Event()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        if self.head and not self.started.is_set():
            self.output.write(self.from_stream, self.head)  # type: ignore[arg-type]
        self.started.set()
        self.writable.set()
        self.closed.set()

    def lost_reason(self) -> str:
        if self.error is not None:
            from .node import _reason  # imported already: it imports this module

            return _reason(self.error)
        return "the SSH server closed the channel without an exit status"


class _HostKeyWitness(asyncssh.SSHClient):
    """Remembers the host key the server offered, for the message when it is refused."""

    offered: asyncssh.SSHKey | None = None

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self.offered = key
        return False
