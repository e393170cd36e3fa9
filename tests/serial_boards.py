"""Boards for the serial driver's tests and bench: a simulated board on a PTY pair
(a real ``sh`` behind a login prompt) and a QEMU board (Debian's kernel, a busybox
initramfs built here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("JMP_TEST_CACHE", Path.home() / ".cache" / "jumpstarter-test"))
SIM_BOARD = Path(__file__).with_name("sim_board.py")

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
echo "board: init done"
"""

INITTAB = """::sysinit:/etc/init.d/rcS
ttyS0::respawn:-/bin/sh
::shutdown:/bin/umount -a -r
"""


def cpio_newc(entries: list[tuple[str, int, bytes]], devices: dict[str, tuple[int, int]] | None = None) -> bytes:
    """A cpio archive (newc, as the kernel reads an initramfs) of ``(name, mode,
    data)``; a symlink's data is its target, a device's numbers are in ``devices``."""
    out = bytearray()
    devices = devices or {}
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        major, minor = devices.get(name, (0, 0))
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, major, minor, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def busybox_initramfs(path: Path) -> Path:
    """Write a busybox initramfs to ``path``: busybox init on ttyS0, a shell there."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox").read_bytes()
    d, f, link = 0o040755, 0o100755, 0o120777
    applets = subprocess.run(["busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    entries = [(name, d, b"") for name in ("bin", "sbin", "etc", "etc/init.d", "proc", "sys", "dev", "tmp", "root")]
    entries += [("bin/busybox", f, busybox)]
    entries += [(f"bin/{a}", link, b"busybox") for a in applets if a not in ("busybox",)]
    entries += [("sbin/init", link, b"../bin/busybox"), ("init", link, b"bin/busybox")]
    entries += [("etc/inittab", 0o100644, INITTAB.encode()), ("etc/init.d/rcS", f, INIT.encode())]
    entries += [("dev/console", 0o020600, b"")]
    path.write_bytes(cpio_newc(entries, {"dev/console": (5, 1)}))
    return path


def debian_kernel() -> Path | None:
    """Debian's x86-64 kernel, fetched once with ``apt-get download`` into the cache;
    None when it cannot be had here."""
    found = sorted(CACHE.glob("kernel/boot/vmlinuz-*"))
    if found:
        return found[-1]
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    depends = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
    ).stdout
    names = [line.split()[-1] for line in depends.splitlines() if "Depends: linux-image-" in line]
    if not names:
        return None
    subprocess.run(["apt-get", "download", names[0]], cwd=CACHE, capture_output=True)
    for deb in CACHE.glob(f"{names[0]}_*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(CACHE / "kernel")], check=True)
    found = sorted(CACHE.glob("kernel/boot/vmlinuz-*"))
    return found[-1] if found else None


def qemu_options(tmp: Path) -> dict[str, object] | None:
    """Driver options for a QEMU board, or None when QEMU or a kernel is missing."""
    if not shutil.which("qemu-system-x86_64") or not shutil.which("busybox"):
        return None
    kernel = debian_kernel()
    if kernel is None:
        return None
    initrd = busybox_initramfs(tmp / "initramfs.cpio")
    # panic=-1: a panicking kernel reboots at once, and QEMU (-no-reboot) exits.
    return {"kernel": str(kernel), "initrd": str(initrd), "memory": 256, "append": "console=ttyS0 panic=-1"}


def sim_board_command(*args: str) -> list[str]:
    return [sys.executable, str(SIM_BOARD), *args]
