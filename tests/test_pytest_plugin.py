"""The pytest plugin (jumpstarter-testing), run on small suites in real pytest
subprocesses: what it records equals pytest's own JUnit XML of the same run, a run
killed halfway keeps what it recorded, and without --jmp-session it is inert."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter.results.junit import parse_junit

SUITE = """
import pytest

@pytest.fixture
def broken_setup():
    raise RuntimeError("setup boom")

@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("teardown boom")

def test_pass():
    pass

def test_fail():
    assert 1 == 2, "one is not two"

@pytest.mark.skip(reason="needs a board")
def test_skip():
    pass

def test_skip_inside():
    pytest.skip("not today")

@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert 0

@pytest.mark.xfail(reason="maybe fixed")
def test_xpass():
    pass

@pytest.mark.xfail(reason="must fail", strict=True)
def test_xpass_strict():
    pass

def test_setup_error(broken_setup):
    pass

def test_teardown_error(broken_teardown):
    pass

def test_fail_and_teardown_error(broken_teardown):
    assert 0

@pytest.mark.parametrize("x", ["a/b", "c::d"])
def test_param(x):
    assert x

class TestGroup:
    def test_method(self):
        pass

def test_long_message():
    assert False, "x" * 20000

def test_node(jmp_node):
    task = jmp_node.start(["echo", "from the node"])
    assert task.wait().exit_code == 0

def test_session(jmp_session):
    assert jmp_session.name == "plugin-run"
"""


def run_pytest(cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


# pytest's JUnit XML knows four kinds; each outcome of ours is one of them.
KIND = {
    "passed": "passed",
    "xpass": "passed",
    "failed": "failed",
    "error": "error",
    "skipped": "skipped",
    "xfail": "skipped",
}


def stored_results(data_dir: Path, session: str) -> list[tuple]:
    if not (data_dir / "jumpstarter.db").exists():
        return []
    db = sqlite3.connect(f"file:{data_dir / 'jumpstarter.db'}?mode=ro", uri=True)
    try:
        return db.execute(
            "SELECT r.name, r.outcome, r.duration, r.message, r.task_id FROM results r"
            " JOIN sessions s ON s.id = r.session_id WHERE s.name = ? ORDER BY r.id",
            (session,),
        ).fetchall()
    except sqlite3.OperationalError:  # no store (yet)
        return []
    finally:
        db.close()


def test_recorded_results_equal_pytests_own_junit_report(data_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_suite.py").write_text(SUITE)
    (suite / "test_broken.py").write_text("import not_a_module_anywhere\n")
    done = run_pytest(
        suite,
        "--jmp-session",
        "plugin-run",
        "--junitxml=junit.xml",
        "--continue-on-collection-errors",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "jumpstarter: recording in session 'plugin-run' on node 'local' as task " in done.stdout
    assert "17 results recorded in session 'plugin-run' on node 'local'" in done.stdout

    rows = stored_results(data_dir, "plugin-run")
    outcomes = {name: outcome for name, outcome, *_ in rows}
    assert outcomes == {
        "test_broken.py": "error",
        "test_suite.py::test_pass": "passed",
        "test_suite.py::test_fail": "failed",
        "test_suite.py::test_skip": "skipped",
        "test_suite.py::test_skip_inside": "skipped",
        "test_suite.py::test_xfail": "xfail",
        "test_suite.py::test_xpass": "xpass",
        "test_suite.py::test_xpass_strict": "failed",
        "test_suite.py::test_setup_error": "error",
        "test_suite.py::test_teardown_error": "error",
        "test_suite.py::test_fail_and_teardown_error": "failed",
        "test_suite.py::test_param[a/b]": "passed",
        "test_suite.py::test_param[c::d]": "passed",
        "test_suite.py::TestGroup::test_method": "passed",
        "test_suite.py::test_long_message": "failed",
        "test_suite.py::test_node": "passed",
        "test_suite.py::test_session": "passed",
    }
    assert len(rows) == 17  # 16 tests and the module that failed to collect

    # pytest's own report of the same run, imported: the same names (node ids) and
    # outcomes. pytest reports a test that failed and then failed in teardown twice
    # (a failure, then an error); the import makes it one result, failed, as here.
    report = (suite / "junit.xml").read_bytes()
    theirs = {case.name: KIND[case.outcome.value] for case in parse_junit(report)}
    assert {name: KIND[outcome] for name, outcome in outcomes.items()} == theirs
    attributes = ET.fromstring(report).find("testsuite").attrib
    doubles = sum(
        1
        for _, outcome, _, message, _ in rows
        if outcome == "failed" and "error in teardown" in message
    )
    kinds = Counter(KIND[outcome] for outcome in outcomes.values())
    assert doubles == 1
    assert {k: int(attributes[k]) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": len(rows) + doubles,
        "failures": kinds["failed"],
        "errors": kinds["error"] + doubles,
        "skipped": kinds["skipped"],
    }

    by_name = {name: (duration, message) for name, _, duration, message, _ in rows}
    assert by_name.pop("test_broken.py")[1].startswith("error in collection: ")  # no duration
    assert all(duration is not None and duration >= 0 for duration, _ in by_name.values())
    assert by_name["test_suite.py::test_fail"][1].startswith(
        "AssertionError: one is not two\nassert 1 == 2\n\n"
    )
    assert by_name["test_suite.py::test_skip"][1] == "needs a board"
    assert by_name["test_suite.py::test_skip_inside"][1] == "not today"
    assert by_name["test_suite.py::test_xfail"][1] == "known bug"
    assert by_name["test_suite.py::test_xpass"][1] == "maybe fixed"
    assert by_name["test_suite.py::test_xpass_strict"][1] == "[XPASS(strict)] must fail"
    assert by_name["test_suite.py::test_setup_error"][1].startswith(
        "error in setup: RuntimeError: setup boom\n"
    )
    assert by_name["test_suite.py::test_teardown_error"][1].startswith(
        "error in teardown: RuntimeError: teardown boom\n"
    )
    long = by_name["test_suite.py::test_long_message"][1]
    assert len(long) <= 4000 and "characters cut" in long and long.endswith("AssertionError")

    # one task stands for the run; the jmp_node fixture's task ran in the same session
    with JumpStarterProtocol().create_session("check") as session:
        node = session.connect("local", lease=False)
        tasks = {t.name or t.spec.argv[0]: t for t in node.list_tasks(session="plugin-run")}
    assert set(tasks) == {"pytest", "echo"}
    run = tasks["pytest"]
    assert (run.state.value, run.exit_code, run.message) == ("failed", 1, "pytest: tests failed")
    assert run.spec.argv[:4] == ["pytest", "-p", "no:cacheprovider", "--jmp-session"]
    assert run.spec.cwd == str(suite)
    assert {task_id for *_, task_id in rows} == {run.id}
    assert tasks["echo"].state.value == "succeeded"


def test_a_run_killed_halfway_keeps_what_it_recorded(data_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    flag = tmp_path / "hanging"
    (suite / "test_hang.py").write_text(
        "import time\nfrom pathlib import Path\n\n"
        "def test_one():\n    pass\n\n"
        "def test_two():\n    assert 0\n\n"
        f"def test_hang():\n    Path({str(flag)!r}).write_text('now')\n    time.sleep(600)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--jmp-session", "killed"],
        cwd=suite,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            flag.exists() and len(stored_results(data_dir, "killed")) == 2
        ):
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    rows = stored_results(data_dir, "killed")
    assert [(name, outcome) for name, outcome, *_ in rows] == [
        ("test_hang.py::test_one", "passed"),
        ("test_hang.py::test_two", "failed"),
    ]
    with JumpStarterProtocol().create_session("check") as session:
        # the next node server for this store finds the run's task lost
        node = session.connect("local", lease=False)
        (task,) = node.list_tasks(session="killed")
        assert (task.name, task.state.value, task.message) == (
            "pytest",
            "lost",
            "the node agent went away",
        )
        assert node.query_results(session="killed").summary.total == 2


def test_inert_without_jmp_session(data_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(
        "import sys\n\n"
        "def pytest_unconfigure(config):\n"
        "    loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jumpstarter', 'jumpstarter_protocol',"
        " 'jumpstarter_testing', 'pydantic'))\n"
        "    open('loaded.txt', 'w').write(' '.join(loaded))\n"
    )
    (suite / "test_a.py").write_text("def test_a():\n    pass\n")
    done = run_pytest(suite, "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "jumpstarter" not in done.stdout
    # only the plugin module itself: no core, no protocol, no pydantic, no store
    assert (suite / "loaded.txt").read_text() == "jumpstarter_testing jumpstarter_testing.plugin"
    assert not data_dir.exists()
    helped = run_pytest(suite, "--help")
    assert "--jmp-session=NAME" in helped.stdout and "--jmp-node=NODE" in helped.stdout


def test_fixtures_work_without_recording(data_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_n.py").write_text(
        "def test_node(jmp_node, jmp_session):\n"
        "    assert jmp_session.name == 'pytest'\n"
        "    assert jmp_node.start(['true']).wait().exit_code == 0\n"
    )
    done = run_pytest(suite, "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert stored_results(data_dir, "pytest") == []


def test_an_unknown_node_stops_pytest_as_a_usage_error(data_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_a.py").write_text("def test_a():\n    pass\n")
    done = run_pytest(suite, "--jmp-session", "s", "--jmp-node", "nope")
    assert (done.returncode, done.stderr) == (
        4,
        "ERROR: jumpstarter: unknown node 'nope'; known nodes: local\n\n",
    )
    assert not (data_dir / "jumpstarter.db").exists()


def test_a_run_that_passes_ends_its_task_succeeded(data_dir: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_a.py").write_text("def test_a():\n    pass\n")
    done = run_pytest(suite, "--jmp-session", "green", "--collect-only", "-q")
    assert done.returncode == 0 and "jumpstarter" not in done.stdout  # nothing to record
    done = run_pytest(suite, "--jmp-session", "green", "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 result recorded in session 'green'" in done.stdout
    with JumpStarterProtocol().create_session("check") as session:
        (task,) = session.connect("local", lease=False).list_tasks(session="green")
    assert (task.state.value, task.exit_code, task.message) == ("succeeded", 0, "pytest: ok")


@pytest.mark.parametrize("interrupt", [signal.SIGINT])
def test_ctrl_c_ends_the_task_stopped(
    data_dir: Path, tmp_path: Path, interrupt: signal.Signals
) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    flag = tmp_path / "hanging"
    (suite / "test_i.py").write_text(
        "import time\nfrom pathlib import Path\n\n"
        "def test_one():\n    pass\n\n"
        f"def test_wait():\n    Path({str(flag)!r}).write_text('now')\n    time.sleep(600)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--jmp-session", "interrupted"],
        cwd=suite,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not flag.exists():
            time.sleep(0.05)
        process.send_signal(interrupt)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2, out
    with JumpStarterProtocol().create_session("check") as session:
        node = session.connect("local", lease=False)
        (task,) = node.list_tasks(session="interrupted")
        names = [r.name for r in node.query_results(session="interrupted").results]
    assert (task.state.value, task.exit_code, task.message) == ("stopped", 2, "pytest: interrupted")
    assert names == ["test_i.py::test_one"]


RERUN_SUITE = '''
import json
import os
import pytest

FLAG = os.path.join(os.environ["FLAG_DIR"], os.environ.get("PYTEST_XDIST_WORKER", "main"))

def test_always_fails():
    assert 1 == 2, "never"

def test_fails_once():
    if not os.path.exists(FLAG):
        open(FLAG, "w").close()
        assert False, "first run"

def test_props(record_property):
    record_property("board", "rpi4")
    record_property("boot_ms", 812)
    record_property("board", "rpi5")

@pytest.mark.parametrize("value", ["%s", "a/b"], ids=lambda v: v)
class TestParams:
    def test_value(self, value):
        assert value

def double(n):
    """
    >>> double(2)
    4
    """
    return 2 * n
''' % ("p" * 600)


def summary_of(results) -> dict[str, tuple]:
    return {r.name: (r.outcome.value, r.flaky, [a.outcome.value for a in r.attempts]) for r in results}


@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
def test_reruns_properties_and_long_ids_and_the_junit_import_of_the_same_run(
    data_dir: Path, tmp_path: Path, xdist: bool
) -> None:
    from click.testing import CliRunner
    from jumpstarter.cli import cli

    suite = tmp_path / "suite"
    (suite / "pkg").mkdir(parents=True)
    (suite / "pkg" / "__init__.py").write_text("")
    (suite / "pkg" / "test_board.py").write_text(RERUN_SUITE)
    (suite / "pkg" / "test_broken.py").write_text("import not_a_module_anywhere\n")
    (tmp_path / "flags").mkdir()
    extra = ["-n", "2"] if xdist else []
    done = run_pytest(
        suite, "--jmp-session", "reruns", "--reruns", "2", "--junitxml=junit.xml",
        "--continue-on-collection-errors", "--doctest-modules", *extra,
        env={**os.environ, "FLAG_DIR": str(tmp_path / "flags")},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    long_id = "pkg/test_board.py::TestParams::test_value[" + "p" * 600 + "]"
    with JumpStarterProtocol().create_session("check") as session:
        node = session.connect("local", lease=False)
        recorded = node.query_results(session="reruns").results
    assert summary_of(recorded) == {
        "pkg/test_broken.py": ("error", False, []),  # once, under --doctest-modules and -n 2
        "pkg/test_board.py::test_always_fails": ("failed", False, ["failed"] * 3),
        "pkg/test_board.py::test_fails_once": ("passed", True, ["failed", "passed"]),
        "pkg/test_board.py::test_props": ("passed", False, []),
        long_id: ("passed", False, []),  # whole
        "pkg/test_board.py::TestParams::test_value[a/b]": ("passed", False, []),
        "pkg/test_board.py::pkg.test_board.double": ("passed", False, []),
    }
    assert len(recorded) == 7
    by_name = {r.name: r for r in recorded}
    props = by_name["pkg/test_board.py::test_props"]
    assert props.labels == {"board": "rpi4", "board[2]": "rpi5"}
    assert {k: m.value for k, m in props.metrics.items()} == {"boot_ms": 812.0}
    once = by_name["pkg/test_board.py::test_fails_once"].attempts
    assert once[0].message.startswith("AssertionError: first run")

    # pytest's own JUnit report of the same run, imported into another session
    with JumpStarterProtocol().create_session("reruns-junit") as session:
        task = session.connect("local").new_task(["true"], name="import").id
    imported = CliRunner().invoke(cli, ["result", "import", str(suite / "junit.xml"), "-t", task])
    assert imported.exit_code == 0, imported.output
    with JumpStarterProtocol().create_session("check") as session:
        node = session.connect("local", lease=False)
        from_junit = node.query_results(session="reruns-junit").results
    assert summary_of(from_junit) == summary_of(recorded)
    diff = CliRunner().invoke(cli, ["result", "diff", "reruns", "reruns-junit", "-o", "json"])
    assert diff.exit_code == 0, diff.output
    data = json.loads(diff.stdout)
    assert [len(data[k]) for k in ("newly_failing", "fixed", "new", "missing")] == [0, 0, 0, 0]
    assert (data["unchanged"], len(data["still_failing"])) == (5, 2)
