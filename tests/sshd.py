"""A real OpenSSH server for the tests (and the bench): Debian's ``sshd`` on 127.0.0.1
and a free port, with a host key, a client key and a config of its own in a temporary
directory. Nothing of this machine's SSH setup is read or changed (``/run/sshd``, the
empty directory sshd insists on for privilege separation, is made if missing)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path) -> Path:
    """A new ed25519 key pair at ``path`` (and ``path.pub``), no passphrase."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "jmp-test", "-f", str(path)],
        check=True,
    )
    return path


class Sshd:
    """One sshd, started by :meth:`start` and stopped by :meth:`stop`."""

    def __init__(self, directory: Path, max_sessions: int = 100) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host_key = keygen(self.dir / "host_ed25519")
        self.client_key = keygen(self.dir / "client_ed25519")
        self.other_key = keygen(self.dir / "other_ed25519")  # never authorized
        shutil.copy(self.dir / "client_ed25519.pub", self.dir / "authorized_keys")
        self.known_hosts = self.dir / "known_hosts"
        public = (self.dir / "host_ed25519.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {public[0]} {public[1]}\n")
        self.config = self.dir / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    "UsePAM no",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "Subsystem sftp internal-sftp",
                    f"MaxSessions {max_sessions}",
                    "MaxStartups 100:30:200",
                    "PrintMotd no",
                    # bash, run by sshd, reads ~/.bashrc unless it is a nested shell:
                    # this machine's root .bashrc starts pyenv (100 processes, 0.2 s
                    # a command). A board's shell does nothing of the kind.
                    "SetEnv SHLVL=1",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.user = os.environ.get("USER") or __import__("getpass").getuser()

    def options(self, **extra: object) -> dict[str, object]:
        """The ssh driver's node options for this server."""
        return {
            "host": "127.0.0.1",
            "port": self.port,
            "user": self.user,
            "key_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "agent": False,
            **extra,
        }

    def start(self) -> None:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.dir / "sshd.log", "ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not listen")

    def kill(self) -> None:
        """Kill sshd and every sshd process serving a connection, as when the host goes
        away; what the sessions run is left to the test."""
        if self.process is None:
            return
        for pid in sorted(self.descendants(self.process.pid), reverse=True):
            if _command(pid).startswith("sshd"):
                _kill(pid)
        _kill(self.process.pid)
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        everything = self.descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        self.process.wait()
        self.process = None
        for pid in everything:
            _kill(pid)

    @staticmethod
    def descendants(pid: int) -> set[int]:
        """Every process under ``pid``, from /proc."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
        found: set[int] = set()
        todo = [pid]
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
