"""Shared fixtures: every test gets its own data dir (store + output) and config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from jumpstarter.config import Config
from jumpstarter.protocol import JumpStarterProtocol

ROOT = Path(__file__).resolve().parent.parent
JMP = str(Path(sys.executable).with_name("jmp"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data dir, also set as JMP_DATA_DIR for subprocesses and the CLI."""
    path = tmp_path / "data"
    monkeypatch.setenv("JMP_DATA_DIR", str(path))
    monkeypatch.delenv("JMP_CONFIG", raising=False)
    monkeypatch.delenv("JMP_STORE", raising=False)
    monkeypatch.delenv("JMP_PLUGINS", raising=False)
    monkeypatch.chdir(tmp_path)
    return path


@pytest.fixture
def protocol(data_dir: Path) -> JumpStarterProtocol:
    return JumpStarterProtocol(Config(data_dir=data_dir))


def run_jmp(*args: str, input: str | None = None, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run the real ``jmp`` executable of this environment."""
    return subprocess.run(
        [JMP, *args], capture_output=True, text=True, timeout=timeout, input=input, env=kwargs.pop("env", os.environ), **kwargs
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def invoke_jmp(how: str, args: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``jmp ARGS``: through click's runner
    (``how="runner"``) or a real ``jmp`` process (``how="process"``)."""
    from click.testing import CliRunner
    from jumpstarter.cli import cli

    if how == "runner":
        result = CliRunner().invoke(cli, args)
        return result.exit_code, result.stdout, result.stderr
    done = run_jmp(*args)
    return done.returncode, done.stdout, done.stderr
