"""The benchmarks run end to end (``python -m bench --quick --json``) and report every
figure of issue 6 with numbers. No timing is asserted: the figures are measured, not
judged, here.

Only the modules whose rows are checked by name run (``local`` and ``ssh``, about 25 s
of the minute a whole quick run takes: the suite has a time budget); every other
module must still load and register its figures (``--list``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# The rows of issue 6's table, as ``--quick`` names them, and whether each has a
# baseline measured beside it (the query has an absolute target).
ISSUE_6_FIGURES = {
    "run `true` on the local node, create -> exit code (median of 200)": True,
    "a no-op request (ping) through the local transport": True,
    "stream 200 MB of task output to the client, local transport": True,
    "add 100,000 results in batches of 1000": True,
    "query one task's failures + summary among 1,000,000 results": False,
    "jmp --version": True,
    # issue 14, the ssh node (bench/ssh.py)
    "run `true` on the ssh node, connection open (median of 40)": True,
    "run `true` on the ssh node vs a fresh ssh each time": True,
    "stream 200 MB of task output from the ssh node to the client": True,
    "put 200 MB on the ssh node over SFTP": True,
}


def _bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_quick_run_reports_every_figure_with_numbers(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = _bench("--quick", "--json", str(out), "--only", "local.", "--only", "ssh.")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["errors"] == []
    figures = report["figures"]
    for name, has_baseline in ISSUE_6_FIGURES.items():
        matching = [f for f in figures if f["name"] == name]
        assert len(matching) == 1, (name, [f["name"] for f in figures])
        figure = matching[0]
        assert (
            isinstance(figure["ours"], float)
            and math.isfinite(figure["ours"])
            and figure["ours"] > 0
        )
        assert figure["unit"]
        if figure["target"]:
            assert figure["target"][:2] in ("<=", ">=") and isinstance(figure["met"], bool)
        else:  # a row shown as information: measured, not judged
            assert figure["met"] is None
        if has_baseline:
            assert figure["baseline"] > 0 and figure["baseline_name"]
            assert figure["ratio"] == pytest.approx(figure["ours"] / figure["baseline"])
        else:
            assert figure["baseline"] is None and figure["ratio"] is None
        # The printed table has the same row.
        assert figure["name"] in done.stdout
    header = done.stdout.splitlines()[0].split()
    assert header == ["figure", "ours", "baseline", "ratio", "target", "met"]


def test_only_that_matches_nothing_is_a_usage_error() -> None:
    done = _bench("--only", "no-such-figure", timeout=120)
    assert done.returncode == 2
    assert "error: no figure matches 'no-such-figure'" in done.stderr


def test_every_module_loads_and_lists_its_figures() -> None:
    done = _bench("--list", timeout=120)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.splitlines()
    modules = {p.stem for p in (ROOT / "bench").glob("*.py") if not p.stem.startswith("_")}
    assert {name.partition(".")[0] for name in listed} == modules
    assert "serial_console.qemu_first_task" in listed and len(listed) == len(set(listed))
    only = _bench("--list", "--only", "local.ping", "--only", "ssh.sftp", timeout=120)
    assert only.stdout.splitlines() == ["local.ping", "ssh.sftp_put"]
