"""JUnit files written by real tools: produced here where the tool runs on this machine
(pytest with pytest-rerunfailures and pytest-xdist, CTest, Maven Surefire offline),
otherwise written by hand in the shape a named tool and version writes
(tests/data/junit/, each file says which).

For each: the results, outcomes and attempts equal a count made without the parser
(pytest's own summary line, what the test asked CTest to run, the fixture's cases
counted by hand); the export validates against the JUnit schema of Jenkins' xUnit
plugin; import → export → import gives the same results.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import tracemalloc
from datetime import UTC, datetime
from pathlib import Path

import pytest
import xmlschema
from click.testing import CliRunner
from conftest import run_jmp
from jumpstarter.cli import cli
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter.results.junit import export_junit, parse_junit
from jumpstarter_protocol import Result, ResultSpec

DATA = Path(__file__).parent / "data"
SCHEMA = xmlschema.XMLSchema(DATA / "junit-xunit.xsd")
LONG_ID = "p" * 600


def stored(specs: list[ResultSpec]) -> list[Result]:
    now = datetime(2024, 5, 2, 2, 0, tzinfo=UTC)
    return [
        Result(**s.model_dump(), id=i, task_id="t1", created_at=now) for i, s in enumerate(specs, 1)
    ]


def summary(results: list[ResultSpec]) -> list[tuple[str, str, bool, list[str]]]:
    return [
        (r.name, r.outcome.value, r.flaky, [a.outcome.value for a in r.attempts]) for r in results
    ]


def same_results(a: list[ResultSpec], b: list[ResultSpec]) -> None:
    """The same results: times derived from a suite's start agree to the millisecond."""

    def ms(when: datetime | None) -> int | None:
        return None if when is None else round(when.timestamp() * 1000)

    def key(r: ResultSpec) -> tuple:
        return (
            r.name,
            r.outcome,
            r.flaky,
            r.message,
            r.labels,
            r.file,
            r.line,
            ms(r.started_at),
            [(x.outcome, x.message, x.duration) for x in r.attempts],
            round(r.duration or 0.0, 6),
            {k: m.value for k, m in r.metrics.items()},
        )

    assert [key(r) for r in a] == [key(r) for r in b]


def check_round_trip(results: list[ResultSpec]) -> None:
    exported = export_junit(stored(results))
    SCHEMA.validate(exported)  # raises naming the element and the rule
    same_results(parse_junit(exported.encode()), results)


# --- written by hand, in the shape of a named tool ---------------------------------------

EXPECTED = {
    "surefire.xml": [
        ("com.example.BoardTest/boots", "passed", False, []),
        ("com.example.BoardTest/flashes", "passed", True, ["failed", "passed"]),
        ("com.example.BoardTest/reads sensor", "failed", False, ["failed", "failed", "failed"]),
        ("com.example.BoardTest/talks i2c", "error", False, ["error", "error"]),
        ("com.example.BoardTest/sleeps", "skipped", False, []),
    ],
    "googletest.xml": [
        ("UartTest/Echo", "passed", False, []),
        ("UartTest/Baud", "failed", False, []),
        ("UartTest/DISABLED_Parity", "skipped", False, []),
        ("UartTest/Flow", "skipped", False, []),
    ],
    "gotestsum.xml": [
        ("example.com/fw/ok/TestOK", "passed", False, []),
        ("example.com/fw/broken", "error", False, []),
    ],
    "jest-junit.xml": [
        ("gpio toggles/gpio toggles", "passed", False, []),
        ("gpio /(unnamed case 2)", "passed", False, []),
        ("(unnamed case 3)", "passed", False, []),
    ],
    "nextest.xml": [
        ("fw::unit/crc::matches", "passed", True, ["failed", "passed"]),
        ("fw::unit/crc::rejects", "failed", False, ["failed", "failed", "failed"]),
    ],
    "tap-junit.xml": [("smoke.t", "error", False, [])],
    "phpunit.xml": [
        ("App.Tests.LedTest/testOn", "passed", False, []),
        ("App.Tests.LedTest/testOff", "passed", False, []),
    ],
    "ctest-disabled.xml": [
        ("unit/unit", "passed", False, []),
        ("slow/slow", "skipped", False, []),
        ("missing/missing", "skipped", False, []),
    ],
    "gradle": [
        ("com.example.DiskTest/writes()", "passed", False, []),
        ("com.example.DiskTest/trims()", "skipped", False, []),
        ("com.example.NetTest/connects()", "passed", False, []),
        ("com.example.NetTest/reconnects()", "passed", True, ["failed", "passed"]),
        ("com.example.NetTest/closes()", "passed", False, []),
    ],
}


def parse_path(path: Path, warn=None) -> list[ResultSpec]:
    files = sorted(path.glob("*.xml")) if path.is_dir() else [path]
    return [r for f in files for r in parse_junit(f.read_bytes(), source=f.name, warn=warn)]


@pytest.mark.parametrize("fixture", list(EXPECTED))
def test_hand_written_corpus(fixture: str) -> None:
    results = parse_path(DATA / "junit" / fixture)
    assert summary(results) == EXPECTED[fixture]
    check_round_trip(results)


def test_what_each_producer_says_beyond_the_outcome() -> None:
    surefire = parse_path(DATA / "junit" / "surefire.xml")
    assert surefire[1].attempts[0].message == (
        "timed out after 500 ms\njava.util.concurrent.TimeoutException: timed out after 500 ms\n"
        "\tat com.example.BoardTest.flashes(BoardTest.java:31)"
    )
    assert [a.message.splitlines()[0] for a in surefire[2].attempts] == [
        "expected: <41> but was: <0>",
        "expected: <41> but was: <1>",
        "expected: <41> but was: <2>",
    ]
    gtest = parse_path(DATA / "junit" / "googletest.xml")
    assert (gtest[1].file, gtest[1].line) == ("tests/uart_test.cc", 20)
    assert gtest[1].started_at == datetime(2024, 5, 2, 2, 0, 13, 105000, tzinfo=UTC)
    assert gtest[2].message == "not run (status=notrun)"
    assert (gtest[2].labels["junit.status"], gtest[2].labels["junit.result"]) == (
        "notrun",
        "suppressed",
    )
    assert gtest[3].message == "tests/uart_test.cc:36\nno RTS line"
    ctest = parse_path(DATA / "junit" / "ctest-disabled.xml")
    assert [r.labels.get("junit.status") for r in ctest] == [None, "disabled", "notrun"]
    assert ctest[0].labels["junit.hostname"] == "ci-7"
    go = parse_path(DATA / "junit" / "gotestsum.xml")
    assert go[1].message == "the suite reports 1 error but holds no test case"
    tap = parse_path(DATA / "junit" / "tap-junit.xml")
    assert tap[0].message == "Bad plan: planned 3 tests, ran 0\nno TAP output"
    nextest = parse_path(DATA / "junit" / "nextest.xml")
    assert [a.duration for a in nextest[0].attempts] == [0.2, 0.5]
    assert nextest[1].attempts[1].started_at == datetime(2024, 5, 2, 2, 0, 14, 300000, tzinfo=UTC)
    php = parse_path(DATA / "junit" / "phpunit.xml")
    assert (php[0].labels["ticket"], php[0].labels["ticket[2]"]) == ("LED-1", "LED-7")
    assert (php[0].file, php[0].line) == ("/app/tests/LedTest.php", 12)
    gradle = parse_path(DATA / "junit" / "gradle")
    assert gradle[3].duration == pytest.approx(0.55)  # both runs
    assert gradle[2].started_at == datetime(2024, 5, 2, 2, 0, 13, tzinfo=UTC)
    assert gradle[3].started_at == datetime(2024, 5, 2, 2, 0, 13, 200000, tzinfo=UTC)
    warnings: list[str] = []
    parse_path(DATA / "junit" / "jest-junit.xml", warn=warnings.append)
    assert warnings == [
        "jest-junit.xml: test case 2 has no name; stored as '(unnamed case 2)'",
        "jest-junit.xml: test case 3 has no name; stored as '(unnamed case 3)'",
    ]


def test_a_name_with_a_slash_and_no_classname_comes_back_whole() -> None:
    xml = (
        b'<testsuite name="s"><testcase name="boot/flash [a::b]"/><testcase name="'
        + (b"x" * 3000)
        + b'" classname="c"/></testsuite>'
    )
    results = parse_junit(xml)
    assert [r.name for r in results] == ["boot/flash [a::b]", "c/" + "x" * 3000]
    exported = export_junit(stored(results))
    assert '<testcase name="boot/flash [a::b]"' in exported
    check_round_trip(results)


def test_nesting_to_any_depth() -> None:
    depth = 2000
    xml = "<testsuites>" + "<testsuite name='s'>" * depth + "<testcase name='deep'/>"
    xml += "</testsuite>" * depth + "</testsuites>"
    assert summary(parse_junit(xml.encode())) == [("deep", "passed", False, [])]


# --- produced here by the real tools ------------------------------------------------------

PROJECT = {
    "tests/__init__.py": "",
    "tests/test_board.py": f'''
        import os
        import pytest

        def test_boot(record_property):
            record_property("board", "rpi4")
            record_property("boot_ms", 812)
            record_property("board", "rpi5")

        def test_always_fails():
            assert 1 == 2, "never"

        def test_fails_once():
            flag = os.path.join(os.environ["FLAG_DIR"], os.environ.get("PYTEST_XDIST_WORKER", "w"))
            if not os.path.exists(flag):
                open(flag, "w").close()
                assert False, "first run"

        @pytest.mark.xfail(reason="known")
        def test_known():
            assert False

        @pytest.mark.parametrize("value", ["{LONG_ID}", "a/b", "c::d"], ids=lambda v: v)
        class TestParams:
            def test_value(self, value):
                assert value


        def double(n):
            """
            >>> double(2)
            4
            """
            return 2 * n
    ''',
    "tests/test_broken.py": "import no_such_module_here\n",
    "tests/test_skipped.py": """
        import pytest
        pytest.skip("not on this board", allow_module_level=True)
    """,
}


def write_project(root: Path) -> None:
    for name, text in PROJECT.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def run_pytest(root: Path, *args: str) -> tuple[str, Path]:
    """pytest's summary counts and its JUnit file for one run of the project."""
    flags = root / f"flags{len(list(root.glob('flags*')))}"
    flags.mkdir()
    junit = flags / "junit.xml"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:jumpstarter",
            "--continue-on-collection-errors",
            "--reruns",
            "2",
            f"--junitxml={junit}",
            *args,
            "tests",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "FLAG_DIR": str(flags), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 1, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1], junit


def counted(line: str) -> dict[str, int]:
    """``{"failed": 1, "passed": 5, ...}`` from pytest's last line."""
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", line.strip("= "))}


@pytest.fixture(scope="module")
def pytest_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    root = tmp_path_factory.mktemp("project")
    write_project(root)
    return {
        "plain": run_pytest(root),
        "xdist+doctest": run_pytest(root, "-n", "2", "--doctest-modules"),
    }


@pytest.mark.parametrize("run", ["plain", "xdist+doctest"])
def test_real_pytest_runs(pytest_runs: dict[str, tuple[str, Path]], run: str) -> None:
    line, junit = pytest_runs[run]
    results = parse_junit(junit.read_bytes())
    counts = counted(line)
    outcomes = [r.outcome.value for r in results]
    # pytest counts a collection error once per module: so do the results
    assert outcomes.count("failed") == counts["failed"] == 1
    assert outcomes.count("error") == counts["error"] == 1
    assert outcomes.count("xfail") == counts["xfailed"] == 1
    assert outcomes.count("skipped") == counts["skipped"] == 1
    doctests = 1 if run == "xdist+doctest" else 0
    assert outcomes.count("passed") == counts["passed"] == 5 + doctests
    reruns = sum(len(r.attempts) - 1 for r in results if r.attempts)
    assert reruns == counts["rerun"] == 3
    by_name = {r.name: r for r in results}
    assert summary([by_name["tests/test_board.py::test_always_fails"]]) == [
        ("tests/test_board.py::test_always_fails", "failed", False, ["failed"] * 3)
    ]
    assert summary([by_name["tests/test_board.py::test_fails_once"]]) == [
        ("tests/test_board.py::test_fails_once", "passed", True, ["failed", "passed"])
    ]
    assert f"tests/test_board.py::TestParams::test_value[{LONG_ID}]" in by_name
    assert "tests/test_board.py::TestParams::test_value[a/b]" in by_name
    assert "tests/test_broken.py" in by_name and "tests/test_skipped.py" in by_name
    boot = by_name["tests/test_board.py::test_boot"]
    assert (boot.labels["board"], boot.labels["board[2]"], boot.labels["boot_ms"]) == (
        "rpi4",
        "rpi5",
        "812",
    )
    check_round_trip(results)


@pytest.mark.skipif(shutil.which("ctest") is None, reason="CTest (cmake) is not installed here")
def test_real_ctest(tmp_path: Path) -> None:
    (tmp_path / "CMakeLists.txt").write_text(
        textwrap.dedent(
            """
            cmake_minimum_required(VERSION 3.21)
            project(corpus NONE)
            enable_testing()
            add_test(NAME passes COMMAND true)
            add_test(NAME fails COMMAND false)
            add_test(NAME switched_off COMMAND true)
            set_tests_properties(switched_off PROPERTIES DISABLED TRUE)
            add_test(NAME skips COMMAND sh -c "exit 77")
            set_tests_properties(skips PROPERTIES SKIP_RETURN_CODE 77)
            """
        )
    )
    build = tmp_path / "build"
    subprocess.run(
        ["cmake", "-S", str(tmp_path), "-B", str(build)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    junit = tmp_path / "ctest.xml"
    subprocess.run(
        ["ctest", "--test-dir", str(build), "--output-junit", str(junit)],
        capture_output=True,
        timeout=120,
    )
    results = parse_junit(junit.read_bytes())
    # what we asked CTest to run, one by one
    assert sorted((r.name.rpartition("/")[2], r.outcome.value) for r in results) == [
        ("fails", "failed"),
        ("passes", "passed"),
        ("skips", "skipped"),
        ("switched_off", "skipped"),
    ]
    check_round_trip(results)


SUREFIRE_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>com.example</groupId><artifactId>corpus</artifactId><version>1</version>
  <properties><maven.compiler.release>17</maven.compiler.release>
    <project.build.sourceEncoding>UTF-8</project.build.sourceEncoding></properties>
  <dependencies><dependency><groupId>org.junit.jupiter</groupId><artifactId>junit-jupiter</artifactId>
    <version>5.10.2</version><scope>test</scope></dependency></dependencies>
  <build><plugins>
    <plugin><artifactId>maven-compiler-plugin</artifactId><version>3.13.0</version></plugin>
    <plugin><artifactId>maven-resources-plugin</artifactId><version>3.3.1</version></plugin>
    <plugin><artifactId>maven-surefire-plugin</artifactId><version>3.2.5</version></plugin>
  </plugins></build>
</project>
"""
SUREFIRE_TEST = """package com.example;
import org.junit.jupiter.api.*;
import java.nio.file.*;
import static org.junit.jupiter.api.Assertions.*;
class BoardTest {
    @Test void boots() {}
    @Test void alwaysFails() { assertEquals(41, 0); }
    @Test void failsOnce() throws Exception {
        Path flag = Paths.get(System.getProperty("flag"));
        if (!Files.exists(flag)) { Files.createFile(flag); fail("first run"); }
    }
    @Disabled("no board") @Test void sleeps() {}
}
"""


@pytest.mark.skipif(shutil.which("mvn") is None, reason="Maven is not installed here")
def test_real_surefire_offline_with_reruns(tmp_path: Path) -> None:
    (tmp_path / "src/test/java/com/example").mkdir(parents=True)
    (tmp_path / "pom.xml").write_text(SUREFIRE_POM)
    (tmp_path / "src/test/java/com/example/BoardTest.java").write_text(SUREFIRE_TEST)
    done = subprocess.run(
        [
            "mvn",
            "-o",
            "-B",
            "test",
            "-Dsurefire.rerunFailingTestsCount=2",
            f"-DargLine=-Dflag={tmp_path / 'flag'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = tmp_path / "target/surefire-reports/TEST-com.example.BoardTest.xml"
    if not report.exists():
        pytest.skip(
            f"Maven could not run offline here (plugins or JUnit not cached): {done.stdout[-300:]}"
        )
    # Surefire's own count, on its last "Tests run:" line
    line = [x for x in done.stdout.splitlines() if "Tests run:" in x][-1]
    counts = {k: int(v) for k, v in re.findall(r"(\w+): (\d+)", line)}
    results = parse_junit(report.read_bytes())
    outcomes = [r.outcome.value for r in results]
    assert (
        len(results),
        outcomes.count("failed"),
        outcomes.count("skipped"),
        sum(r.flaky for r in results),
    ) == (counts["run"], counts["Failures"], counts["Skipped"], counts["Flakes"])
    assert sorted(summary(results)) == [
        ("com.example.BoardTest/alwaysFails", "failed", False, ["failed"] * 3),
        ("com.example.BoardTest/boots", "passed", False, []),
        ("com.example.BoardTest/failsOnce", "passed", True, ["failed", "passed"]),
        ("com.example.BoardTest/sleeps", "skipped", False, []),
    ]
    check_round_trip(results)


# --- jmp result import: many files, one transaction ------------------------------------------


@pytest.fixture
def task_id(protocol: JumpStarterProtocol) -> str:
    with protocol.create_session("ci") as session:
        return session.connect("local").new_task(["true"], name="ci job").id


def names_of(protocol: JumpStarterProtocol, task: str) -> list[str]:
    with protocol.create_session("check") as session:
        node = session.connect("local", lease=False)
        return [r.name for r in node.query_results(task_id=task).results]


def test_import_directories_globs_and_files(
    protocol: JumpStarterProtocol, task_id: str, tmp_path: Path
) -> None:
    shutil.copytree(DATA / "junit" / "gradle", tmp_path / "gradle")
    shutil.copy(DATA / "junit" / "jest-junit.xml", tmp_path / "jest.xml")
    shutil.copy(DATA / "junit" / "tap-junit.xml", tmp_path / "tap.xml")
    result = CliRunner().invoke(
        cli,
        [
            "result",
            "import",
            str(tmp_path / "gradle"),
            str(tmp_path / "j*.xml"),
            str(tmp_path / "tap.xml"),
            "--task",
            task_id,
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"imported 9 results from 4 files into task {task_id} (7 passed, 1 skipped, 1 error)\n"
    )
    assert result.stderr == (
        f"jmp: warning: {tmp_path}/jest.xml: test case 2 has no name; stored as '(unnamed case 2)'\n"
        f"jmp: warning: {tmp_path}/jest.xml: test case 3 has no name; stored as '(unnamed case 3)'\n"
    )
    assert names_of(protocol, task_id) == [
        name
        for name, *_ in EXPECTED["gradle"] + EXPECTED["jest-junit.xml"] + EXPECTED["tap-junit.xml"]
    ]


def test_one_bad_file_imports_nothing(
    protocol: JumpStarterProtocol, task_id: str, tmp_path: Path
) -> None:
    shutil.copy(DATA / "junit" / "surefire.xml", tmp_path / "a.xml")
    (tmp_path / "b.xml").write_text("<testsuite><testcase name='x'>")
    done = run_jmp("result", "import", str(tmp_path), "--task", task_id)
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        f"jmp: error: {tmp_path}/b.xml: not well-formed XML: no element found: line 1, column 30\n",
    )
    assert names_of(protocol, task_id) == []
    done = run_jmp("result", "import", str(tmp_path / "none-*.xml"), "--task", task_id)
    assert (done.returncode, done.stderr) == (
        2,
        f"jmp: error: {tmp_path}/none-*.xml: no file matches (try 'jmp result import --help')\n",
    )


def test_deep_nesting_through_jmp_is_one_line(task_id: str, tmp_path: Path) -> None:
    depth = 2000
    xml = "<testsuites>" + "<testsuite name='s'>" * depth + "<testcase name='deep'/>"
    (tmp_path / "deep.xml").write_text(xml + "</testsuite>" * depth + "</testsuites>")
    done = run_jmp("result", "import", str(tmp_path / "deep.xml"), "--task", task_id)
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"imported 1 result into task {task_id} (1 passed)\n",
        "",
    )
    (tmp_path / "cut.xml").write_text(xml)  # never closed
    done = run_jmp("result", "import", str(tmp_path / "cut.xml"), "--task", task_id)
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(
        f"jmp: error: {tmp_path}/cut.xml: not well-formed XML: no element found"
    )


# --- memory -----------------------------------------------------------------------------------


def test_a_60_mb_file_is_read_in_memory_of_its_largest_case(tmp_path: Path) -> None:
    """Peak memory (of Python's allocator, expat's included) while importing 60 MB of
    JUnit stays a small multiple of the largest test case (here 2 MB of failure and
    output), far below the size of the file."""
    path = tmp_path / "big.xml"
    output = "x" * 1_000_000
    with path.open("w") as f:
        f.write("<testsuites><testsuite name='big'>")
        for i in range(20):
            f.write(
                f"<testcase name='t{i}' time='1'><failure message='m'>{output}</failure>"
                f"<system-out>{output}</system-out></testcase>"
            )
        for i in range(2_000):
            f.write(
                f"<testcase name='small {i}'><system-out>{'y' * 10_000}</system-out></testcase>"
            )
        f.write("</testsuite></testsuites>")
    assert path.stat().st_size > 60_000_000
    tracemalloc.start()
    try:
        with path.open("rb") as f:
            results = parse_junit(f, source="big.xml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(results) == 2_020
    assert peak < 20_000_000, f"peak {peak:,} bytes"
