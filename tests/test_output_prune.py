"""Output log retention: ``jmp task prune`` by age and by size, a node's own
``keep_output_for`` / ``keep_output_bytes``, running tasks untouched. Real tasks,
real output logs, real ``jmp`` (click's runner and processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_jmp
from jumpstarter.cli import cli
from jumpstarter.config import Config, NodeConfig
from jumpstarter.protocol import JumpStarterProtocol


def _run_tasks(protocol: JumpStarterProtocol, sizes: list[int]) -> list[str]:
    ids = []
    with protocol.create_session("prune") as session:
        node = session.connect("local")
        for size in sizes:
            task = node.start(["head", "-c", str(size), "/dev/zero"])
            task.wait()
            ids.append(task.id)
    return ids


def _age(data_dir: Path, task_id: str, seconds: float) -> None:
    """Make a task's log look last written ``seconds`` ago."""
    when = time.time() - seconds
    for suffix in (".out", ".idx"):
        os.utime(data_dir / "output" / f"{task_id}{suffix}", (when, when))


def _logs(task_id: str) -> bytes:
    return run_jmp("task", "logs", task_id).stdout.encode()


def test_prune_by_age_and_by_size_keeps_states_and_running_tasks(protocol, data_dir: Path) -> None:
    old, older, recent = _run_tasks(protocol, [1000, 2000, 3000])
    _age(data_dir, old, 3 * 86400)
    _age(data_dir, older, 10 * 86400)
    running = run_jmp("task", "start", "--", "sh", "-c", "echo still writing; exec sleep 60").stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while not (data_dir / "output" / f"{running}.out").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        _age(data_dir, running, 30 * 86400)
        runner = CliRunner()
        dry = runner.invoke(cli, ["task", "prune", "--older-than", "2d", "--dry-run"])
        assert (dry.exit_code, dry.stdout) == (0, f"{older}\n{old}\n")
        assert "would free" in dry.stderr and _logs(old) == b"\0" * 1000  # nothing deleted
        done = runner.invoke(cli, ["task", "prune", "--older-than", "2d"])
        assert (done.exit_code, done.stdout) == (0, f"{older}\n{old}\n")
        assert done.stderr.startswith("freed ") and done.stderr.endswith(" bytes of output of 2 tasks\n")
        assert _logs(old) == b"" and _logs(recent) == b"\0" * 3000
        status = run_jmp("task", "status", "--format", "json", old).stdout
        assert '"state": "succeeded"' in status and '"exit_code": 0' in status
        assert b"still writing" in _logs(running)  # it runs: its log stays however old

        newer = _run_tasks(protocol, [5000])[0]
        done = runner.invoke(cli, ["task", "prune", "--max-bytes", "6K"])  # keep 6144 bytes
        assert (done.exit_code, done.stdout) == (0, f"{recent}\n")
        assert _logs(newer) == b"\0" * 5000
    finally:
        run_jmp("task", "stop", "--grace", "0", running)


def test_a_node_applies_its_own_retention_settings(data_dir: Path) -> None:
    config = Config(data_dir=data_dir, nodes={"local": NodeConfig(keep_output_for=3600)})
    protocol = JumpStarterProtocol(config)
    first = _run_tasks(protocol, [100])[0]
    _age(data_dir, first, 7200)
    second = _run_tasks(protocol, [200])[0]  # as it finishes, the node prunes
    assert not (data_dir / "output" / f"{first}.out").exists()
    assert (data_dir / "output" / f"{second}.out").stat().st_size == 200
    # Nothing of what just finished is pruned, even over the size limit.
    tight = JumpStarterProtocol(Config(data_dir=data_dir, nodes={"local": NodeConfig(keep_output_bytes=0)}))
    third = _run_tasks(tight, [300])[0]
    assert (data_dir / "output" / f"{third}.out").stat().st_size == 300
    (data_dir / "jumpstarter.toml").write_text("[nodes.local]\nkeep_output_bytes = 400\n")
    done = run_jmp("--config", str(data_dir / "jumpstarter.toml"), "task", "prune")
    assert (done.returncode, done.stdout) == (0, f"{second}\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-bytes", "lots"], "jmp: error: Invalid value for '--max-bytes': expected a size like 500000, "
                                  "200K, 100M or 10G, got 'lots' (try 'jmp task prune --help')\n"),
        (["--older-than", "a while"], "jmp: error: Invalid value for --older-than: expected an age (12h, 7d) "
                                      "or a date (2024-05-01), got 'a while' (try 'jmp task prune --help')\n"),
    ],
)
def test_prune_bad_input_is_one_line(data_dir: Path, args: list[str], message: str) -> None:
    done = run_jmp("task", "prune", *args)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", message)
