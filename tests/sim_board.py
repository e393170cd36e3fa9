"""A simulated board on a PTY pair, for the serial driver's tests and bench.

    python sim_board.py [--boot SECONDS] [--login USER --password PW] [--baud N]

Prints the path of its console (the slave end of a PTY, which the driver opens as
it would a UART) on stdout, then behaves like a board: boot messages for --boot
seconds, during which everything typed is lost; a ``login:`` prompt (echoing the
name, not the password) when --login is given; then a real ``sh`` on a terminal
of its own (echo on, LF sent as CR LF), its bytes relayed to and from the console.
When the shell exits, the login prompt comes back, as a getty's would. SIGUSR1 is
its power cycle: the shell is killed and the board boots again. After each boot it
prints ``booted`` on stdout.

``--baud N`` paces the shell's relay both ways as a UART at N baud would (8N1: ten
bits a byte, N/10 bytes a second): each byte reaches the far side when its last bit
would have, so a command's round trip costs what its bytes cost on a real line.
Without it the relay is unpaced, as fast as the PTYs go.
"""

from __future__ import annotations

import argparse
import signal
import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time
import tty


def read_line(fd: int, echo: bool) -> bytes:
    line = b""
    while True:
        byte = os.read(fd, 1)
        if byte in (b"\r", b"\n"):
            os.write(fd, b"\r\n")
            return line
        if byte == b"\x03":
            return b""
        line += byte
        if echo:
            os.write(fd, byte)


def login(fd: int, user: str, password: str) -> None:
    while True:
        os.write(fd, b"\r\nsimboard login: ")
        name = read_line(fd, echo=True)
        if not name:
            continue
        os.write(fd, b"Password: ")
        given = read_line(fd, echo=False)
        if name.decode() == user and given.decode() == password:
            os.write(fd, b"Welcome to simboard\r\n")
            return
        time.sleep(0.2)
        os.write(fd, b"\r\nLogin incorrect\r\n")


SHELL: list[subprocess.Popen[bytes]] = []


class Reboot(Exception):
    pass


def power_cycle(signum: int, frame: object) -> None:
    for shell in SHELL:
        shell.kill()
    raise Reboot


class Line:
    """One direction of a paced wire: bytes queue, and leave in small pieces, each
    when its last byte would have arrived at ``rate`` bytes a second."""

    def __init__(self, to: int, rate: float) -> None:
        self.to, self.rate = to, rate
        self.queue = bytearray()
        self.piece = b""  # on the wire now, delivered at ``due``
        self.due = 0.0
        # About 2 ms of bytes a piece: a UART's byte-by-byte arrival, without a
        # system call a byte.
        self.size = max(1, int(rate / 500))

    def put(self, data: bytes) -> None:
        self.queue += data
        if not self.piece:  # the line was idle: the first bit leaves now
            self._next(max(self.due, time.monotonic()))

    def _next(self, start: float) -> None:
        if self.queue:
            self.piece = bytes(self.queue[: self.size])
            del self.queue[: self.size]
            self.due = start + len(self.piece) / self.rate

    def wait(self) -> float | None:
        """Seconds until the piece on the wire arrives; None when the line is idle."""
        return max(self.due - time.monotonic(), 0.0) if self.piece else None

    def deliver(self) -> None:
        while self.piece and time.monotonic() >= self.due:
            os.write(self.to, self.piece)
            self.piece = b""
            self._next(self.due)  # back to back: the line did not idle


def run_shell(console: int, baud: int | None = None) -> None:
    """A real sh on a terminal of its own, relayed to ``console`` until it exits
    (paced as a UART at ``baud`` when given)."""
    master, slave = pty.openpty()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", "PS1": "root@simboard:~# ", "TERM": "vt100"}

    def controlling_tty() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    shell = subprocess.Popen(
        ["/bin/sh", "-i"], stdin=slave, stdout=slave, stderr=slave, env=env,
        start_new_session=True, preexec_fn=controlling_tty, cwd="/tmp",
    )
    os.close(slave)
    SHELL[:] = [shell]
    lines = {console: Line(master, baud / 10), master: Line(console, baud / 10)} if baud else {}
    try:
        while shell.poll() is None:
            waits = [w for w in (line.wait() for line in lines.values()) if w is not None]
            ready, _, _ = select.select([console, master], [], [], min([0.5, *waits]))
            for line in lines.values():
                line.deliver()
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    if fd == master:
                        return
                    continue
                if lines:
                    lines[fd].put(data)
                else:
                    os.write(master if fd == console else console, data)
    finally:
        os.close(master)
        if shell.poll() is None:
            shell.kill()
        shell.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--boot", type=float, default=0.0)
    parser.add_argument("--login")
    parser.add_argument("--password", default="")
    parser.add_argument("--baud", type=int, default=None, help="pace the shell's relay as a UART at this rate")
    args = parser.parse_args()
    console, far_end = pty.openpty()
    tty.setraw(far_end)  # a wire: no echo, no line editing (the driver sets it so too)
    print(os.ttyname(far_end), flush=True)
    # far_end stays open here too, so the console survives the driver closing it.
    signal.signal(signal.SIGUSR1, power_cycle)
    while True:
        try:
            boot(console, args.boot)
            print("booted", flush=True)  # for a test that must open the port only now
            while True:
                if args.login:
                    login(console, args.login, args.password)
                run_shell(console, args.baud)
        except Reboot:
            continue


def boot(console: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    lines = 0
    os.write(console, b"simboard: power on\r\n")
    while time.monotonic() < deadline:
        os.write(console, b"[%6.3f] simboard: booting, step %d\r\n" % (time.monotonic() % 1000, lines))
        lines += 1
        time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        while select.select([console], [], [], 0)[0]:  # typed while booting: lost
            os.read(console, 65536)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
