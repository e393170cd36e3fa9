"""A simulated board on a PTY pair, for the serial driver's tests and bench.

    python sim_board.py [--boot SECONDS] [--login USER --password PW]

Prints the path of its console (the slave end of a PTY, which the driver opens as
it would a UART) on stdout, then behaves like a board: boot messages for --boot
seconds, during which everything typed is lost; a ``login:`` prompt (echoing the
name, not the password) when --login is given; then a real ``sh`` on a terminal
of its own (echo on, LF sent as CR LF), its bytes relayed to and from the console.
When the shell exits, the login prompt comes back, as a getty's would. SIGUSR1 is
its power cycle: the shell is killed and the board boots again. After each boot it
prints ``booted`` on stdout.
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


def run_shell(console: int) -> None:
    """A real sh on a terminal of its own, relayed to ``console`` until it exits."""
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
    try:
        while shell.poll() is None:
            ready, _, _ = select.select([console, master], [], [], 0.5)
            for fd in ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    if fd == master:
                        return
                    continue
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
                run_shell(console)
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
