"""A QEMU virtual board: a VM started on the node, its serial console wired to the
serial node driver and its power to the ``qemu`` power back end.

    [nodes.vboard]
    driver = "qemu"
    options = { kernel = "vmlinuz", initrd = "initrd.gz", append = "console=ttyS0", memory = 256 }

The console is a Unix socket in the node's state directory; QEMU waits for the
driver to connect before the VM runs, so the transcript holds the boot log from its
first byte. ``-no-reboot``: a reboot, a ``poweroff`` or a kernel panic ends the VM,
which the driver notices and powers on again (unless it was switched off).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import anyio
from jumpstarter.errors import ConfigError, PowerFailed
from jumpstarter.plugins import PowerDriver
from pydantic import Field

from .console import Console, UnixConsole
from .node import SerialNodeDriver, ShellOptions


class QemuOptions(ShellOptions):
    kernel: Path
    initrd: Path | None = None
    append: str = "console=ttyS0"
    memory: int = Field(default=256, gt=0, description="MiB")
    cpus: int = Field(default=1, gt=0)
    qemu: str = "qemu-system-x86_64"
    accel: str = Field(default="tcg", description='"kvm" where /dev/kvm works (much faster)')
    args: list[str] = Field(default_factory=list, description="more QEMU arguments")


class QemuVM:
    """One QEMU process at a time, started and stopped on demand."""

    def __init__(self, options: QemuOptions, name: str) -> None:
        self.options = options
        self.name = name
        for key in ("kernel", "initrd"):
            path = getattr(options, key)
            if path is not None and not path.expanduser().is_file():
                raise ConfigError(f"node {name!r}: options.{key}: no such file: {path}")
        if shutil.which(options.qemu) is None:
            raise ConfigError(f"node {name!r}: options.qemu: command not found: {options.qemu}")
        self.process: subprocess.Popen[bytes] | None = None
        self.state_dir: Path | None = None
        self.socket: Path | None = None
        self.connected = False  # the console of the running VM was taken
        self.starts = 0

    def argv(self, socket: Path) -> list[str]:
        o = self.options
        argv = [o.qemu, "-accel", o.accel, "-m", str(o.memory), "-smp", str(o.cpus)]
        argv += ["-display", "none", "-nodefaults", "-no-reboot", "-monitor", "none"]
        argv += ["-kernel", str(o.kernel.expanduser()), "-append", o.append]
        if o.initrd is not None:
            argv += ["-initrd", str(o.initrd.expanduser())]
        argv += ["-chardev", f"socket,id=console,path={socket},server=on,wait=on", "-serial", "chardev:console"]
        return argv + o.args

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def start(self) -> None:
        if self.running:
            return
        base = self.state_dir or Path(tempfile.gettempdir())
        self.starts += 1
        self.connected = False
        socket = base / f"qemu-{os.getpid()}-{self.starts}.sock"
        socket.unlink(missing_ok=True)
        log = open(base / "qemu.log", "wb")  # noqa: SIM115 - handed to the process
        try:
            self.process = subprocess.Popen(
                self.argv(socket), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        except OSError as exc:
            raise PowerFailed(f"power on: cannot start {self.options.qemu}: {exc.strerror}") from None
        finally:
            log.close()
        with anyio.move_on_after(10):
            while not socket.exists():
                if self.process.poll() is not None:
                    lines = (base / "qemu.log").read_text(errors="replace").strip().splitlines()
                    why = lines[-1] if lines else f"exit code {self.process.returncode}"
                    raise PowerFailed(f"power on: qemu exited at once: {why}")
                await anyio.sleep(0.01)
        self.socket = socket

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(5):
                while process.poll() is None:
                    await anyio.sleep(0.02)
            if process.poll() is None:
                process.kill()
        await anyio.to_thread.run_sync(process.wait)
        if self.socket is not None:
            self.socket.unlink(missing_ok=True)


class QemuPower(PowerDriver):
    """Power for a :class:`QemuVM`: on starts it, off stops it."""

    def __init__(self, vm: QemuVM, options: dict[str, Any] | None = None) -> None:
        super().__init__(options or {})
        self.vm = vm
        self.pause = 0.0

    async def on(self) -> None:
        await self.vm.start()

    async def off(self) -> None:
        await self.vm.stop()

    async def status(self) -> Any:
        return "on" if self.vm.running else "off"

    async def aclose(self) -> None:
        await self.vm.stop()  # a VM dies with its node: nothing else would ever stop it


class QemuNodeDriver(SerialNodeDriver):
    """The serial node driver over a QEMU VM's serial console."""

    options_model = QemuOptions

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.vm = QemuVM(self.options, node.name)
        self.power = QemuPower(self.vm)

    async def serve(self, state_dir: Path) -> None:
        self.vm.state_dir = state_dir
        await super().serve(state_dir)

    async def open_console(self) -> Console:
        vm = self.vm
        if vm.running and vm.connected:
            # Our console closed but QEMU still runs: it is on its way out (a poweroff,
            # a panic); a VM gives its console once, so wait for it to go, or make it.
            with anyio.move_on_after(10):
                while vm.running:
                    await anyio.sleep(0.05)
            await vm.stop()
        if not vm.running:
            await vm.start()
        assert vm.socket is not None
        console = await UnixConsole.connect(str(vm.socket))
        vm.connected = True
        return console
