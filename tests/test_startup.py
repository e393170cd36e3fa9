"""``jmp`` starts without importing what the command does not need: ``--version`` and
``--help`` load neither pydantic nor the protocol (whose codec alone takes a third of
a second) nor grpc, and a command on the local node loads neither grpc nor asyncssh
(which the ssh driver needs only for an ssh node: 0.4 s of every jmp command when it
was imported with the driver)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("pydantic", "jumpstarter_protocol", "grpc", "asyncssh")

# Runs the real CLI entry point, then says which heavy packages it imported.
PROBE = f"""
import sys
from jumpstarter.cli import main

sys.argv = ["jmp", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    code = exc.code
loaded = sorted({{name.partition(".")[0] for name in sys.modules}} & set({HEAVY!r}))
print(f"exit={{code}} loaded={{','.join(loaded) or 'none'}}", file=sys.stderr)
"""


def probe(*args: str) -> tuple[str, str]:
    """``jmp ARGS`` in a fresh interpreter: its stdout and the probe's line."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60, env=os.environ
    )
    *_, last = done.stderr.splitlines() or [""]
    return done.stdout, last


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["task", "--help"], ["node", "serve", "--help"]])
def test_version_and_help_import_no_pydantic_protocol_or_grpc(data_dir: Path, args: list[str]) -> None:
    stdout, line = probe(*args)
    assert line == "exit=0 loaded=none"
    assert stdout.startswith("jmp " if args == ["--version"] else "Usage: jmp")


def test_a_run_on_the_local_node_imports_no_grpc_and_no_asyncssh(data_dir: Path) -> None:
    stdout, line = probe("run", "--", "echo", "hi")
    assert stdout == "hi\n"
    assert line == "exit=0 loaded=jumpstarter_protocol,pydantic"


def test_listing_the_drivers_imports_no_grpc_and_no_asyncssh(data_dir: Path) -> None:
    stdout, line = probe("drivers", "--format", "json")
    assert line == "exit=0 loaded=jumpstarter_protocol,pydantic"
    # The class is still named where it lives, as before grpc was made lazy.
    assert '"class": "jumpstarter_driver_grpc.transport:GrpcTransport"' in stdout


def test_grpc_loads_on_first_use_with_its_log_level_set_only_then() -> None:
    code = (
        "import os, sys\n"
        "from jumpstarter_driver_grpc._wire import grpc\n"
        "assert 'grpc' not in sys.modules\n"
        "print(grpc.StatusCode.NOT_FOUND.name, grpc.aio.AioRpcError.__name__, 'grpc' in sys.modules, "
        "'GRPC_VERBOSITY' in os.environ)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "NOT_FOUND AioRpcError True False\n", "")
