"""The HTML report in a real browser: headless Chromium loads a report of 50,000
results with 2,000 failures, takes a screenshot, and its DOM holds every failure."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from jumpstarter.results.report import ReportData, render_report
from jumpstarter_protocol import Result, ResultSummary, SessionInfo

CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium here (.ci/run installs the Debian package 'chromium')"
)


def big_report() -> tuple[ReportData, list[str]]:
    start = datetime(2024, 5, 2, 2, 0, tzinfo=UTC)
    results, failing = [], []
    for i in range(50_000):
        name = f"tests/test_mod{i % 250}.py::test_case_{i}"
        fails = i % 25 == 0
        if fails:
            failing.append(name)
        results.append(
            Result(
                id=i + 1,
                task_id="t1",
                session_id="s-now",
                node="local",
                created_at=start,
                name=name,
                outcome="failed" if fails else "passed",
                duration=0.01 * (i % 100),
                message=(
                    f"AssertionError: value {i % 7} was wrong\n"
                    + "  frame\n" * 30
                    + f"E   end of {i}"
                )
                if fails
                else None,
            )
        )
    trend = [
        SessionInfo(
            id=f"s{k}",
            name="nightly",
            created_at=start - timedelta(days=9 - k),
            summary=ResultSummary(
                total=50_000,
                outcomes={"passed": 48_000 + 100 * k, "failed": 2_000 - 100 * k},
                duration=25_000.0,
            ),
        )
        for k in range(9)
    ]
    now = SessionInfo(
        id="s-now",
        name="nightly",
        created_at=start,
        summary=ResultSummary(
            total=50_000, outcomes={"passed": 48_000, "failed": 2_000}, duration=25_000.0
        ),
    )
    earlier = [(s, set(failing[:1000])) for s in reversed(trend)]
    data = ReportData(
        title="Test report: nightly",
        sessions=[now],
        results=results,
        trend=[*trend, now],
        earlier=earlier,
        version="test",
    )
    return data, failing


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--user-data-dir=" + args[0],
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_a_50000_result_report_in_headless_chromium(tmp_path: Path) -> None:
    data, failing = big_report()
    page = tmp_path / "report.html"
    page.write_text(render_report(data), encoding="utf-8")
    profile = str(tmp_path / "profile")
    shot = tmp_path / "report.png"
    done = chromium(profile, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri())
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", done.stderr
    assert shot.stat().st_size > 20_000  # a page was drawn, not a blank one
    done = chromium(profile, "--dump-dom", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    shown = re.findall(r'<article class="failure failed" data-name="([^"]+)"', dom)
    assert sorted(shown) == sorted(failing) and len(shown) == 2_000
    listed = set(re.findall(r"<li>([^<]+)</li>", dom))
    assert listed == set(failing)  # every name in its group's list, too
    assert dom.count('data-mark="still"') == 1_000 and dom.count('data-mark="new"') == 1_000
    assert "<script" not in dom
