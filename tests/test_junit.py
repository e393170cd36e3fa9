"""JUnit XML both ways: the shapes real tools write, round trips, and every bad input
refused whole with one clear message (through the API, click's runner and real ``jmp``)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_jmp
from jumpstarter.cli import cli
from jumpstarter.errors import BadRequest
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter.results.junit import export_junit, parse_junit, split_name, trim_message
from jumpstarter_protocol import Result, ResultSpec

# --- the shapes, as the tools write them -------------------------------------------------

PYTEST = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="2" failures="2" skipped="2" tests="8" time="0.052" timestamp="2024-05-02T02:00:13.967558+00:00" hostname="ci"><testcase classname="tests.test_calc" name="test_ok" time="0.001" /><testcase classname="tests.test_calc" name="test_fail" time="0.012"><failure message="AssertionError: nope&#10;assert 1 == 2">&gt;   def test_fail(): assert 1 == 2, "nope"
E   AssertionError: nope

tests/test_calc.py:7: AssertionError</failure></testcase><testcase classname="tests.test_calc" name="test_skip" time="0.000"><skipped type="pytest.skip" message="needs a board">tests/test_calc.py:8: needs a board</skipped></testcase><testcase classname="tests.test_calc" name="test_xf" time="0.000"><skipped type="pytest.xfail" message="known bug" /></testcase><testcase classname="tests.test_calc" name="test_xps" time="0.000"><failure message="[XPASS(strict)] fixed?">[XPASS(strict)] fixed?</failure></testcase><testcase classname="tests.test_calc" name="test_td" time="0.002"><error message="failed on teardown with &quot;RuntimeError: td boom&quot;">E       RuntimeError: td boom</error></testcase><testcase classname="tests.test_calc.TestGroup" name="test_param[a/b-1]" time="0.003"><properties><property name="board" value="rpi4" /></properties><system-out>some output</system-out><system-err>some errors</system-err></testcase><testcase classname="tests.test_calc" name="test_su" time="0.000"><error message="failed on setup with &quot;RuntimeError: su boom&quot;">E   RuntimeError: su boom</error></testcase></testsuite></testsuites>"""

SUREFIRE = """<?xml version="1.0" encoding="UTF-8"?>
<testsuite xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:noNamespaceSchemaLocation="https://maven.apache.org/surefire/maven-surefire-plugin/xsd/surefire-test-report-3.0.xsd" version="3.0" name="com.example.CalcTest" time="0.052" tests="5" errors="1" skipped="1" failures="1">
  <properties>
    <property name="java.version" value="17.0.9"/>
    <property name="os.name" value="Linux"/>
  </properties>
  <testcase name="adds" classname="com.example.CalcTest" time="0.001"/>
  <testcase name="divides" classname="com.example.CalcTest" time="0.004">
    <failure message="expected: &lt;2&gt; but was: &lt;3&gt;" type="org.opentest4j.AssertionFailedError"><![CDATA[org.opentest4j.AssertionFailedError: expected: <2> but was: <3>
	at com.example.CalcTest.divides(CalcTest.java:21)
]]></failure>
    <system-out><![CDATA[dividing 6 by 2
]]></system-out>
  </testcase>
  <testcase name="parses" classname="com.example.CalcTest" time="0.002">
    <error message="boom" type="java.lang.IllegalStateException">java.lang.IllegalStateException: boom</error>
  </testcase>
  <testcase name="rounds" classname="com.example.CalcTest" time="0">
    <skipped message="@Disabled: flaky on CI"/>
  </testcase>
  <testcase name="retries" classname="com.example.CalcTest" time="0.010">
    <flakyFailure message="timeout" type="java.util.concurrent.TimeoutException">first run timed out</flakyFailure>
  </testcase>
</testsuite>
"""

JEST = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="jest tests" tests="3" failures="1" errors="0" time="1.2">
  <testsuite name="Calculator" errors="0" failures="1" skipped="1" timestamp="2024-05-02T02:00:13" time="0.5" tests="3">
    <testcase classname="Calculator adds" name="Calculator adds" time="0.002">
    </testcase>
    <testcase classname="Calculator divides by zero" name="Calculator divides by zero" time="0.001">
      <failure>Error: expect(received).toThrow()

Received function did not throw
    at Object.toThrow (calc.test.js:9:28)</failure>
    </testcase>
    <testcase classname="Calculator rounds" name="Calculator rounds" time="0">
      <skipped/>
    </testcase>
  </testsuite>
</testsuites>
"""

PHPUNIT = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites>
  <testsuite name="" tests="3" assertions="3" errors="0" failures="1" skipped="0" time="0.01">
    <testsuite name="App\\Tests\\CalcTest" file="/app/tests/CalcTest.php" tests="3" failures="1" time="0.01">
      <testsuite name="App\\Tests\\CalcTest::testAdd" tests="2" time="0.004">
        <testcase name="testAdd with data set #0" class="App\\Tests\\CalcTest" classname="App.Tests.CalcTest" file="/app/tests/CalcTest.php" line="12" assertions="1" time="0.001"/>
        <testcase name="testAdd with data set #1" class="App\\Tests\\CalcTest" classname="App.Tests.CalcTest" file="/app/tests/CalcTest.php" line="12" assertions="1" time="0.003">
          <failure type="PHPUnit\\Framework\\ExpectationFailedException">App\\Tests\\CalcTest::testAdd with data set #1
Failed asserting that 3 matches expected 4.</failure>
        </testcase>
      </testsuite>
      <testcase name="testSub" class="App\\Tests\\CalcTest" classname="App.Tests.CalcTest" file="/app/tests/CalcTest.php" line="20" assertions="1" time="0.006"/>
    </testsuite>
  </testsuite>
</testsuites>
"""

GO = """<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="3" failures="1">
\t<testsuite name="example.com/pkg" tests="3" failures="1" errors="0" id="0" hostname="ci" time="0.003" timestamp="2024-05-02T02:00:13Z">
\t\t<properties>
\t\t\t<property name="go.version" value="go1.22.1"></property>
\t\t</properties>
\t\t<testcase name="TestA" classname="example.com/pkg" time="0.000"></testcase>
\t\t<testcase name="TestB" classname="example.com/pkg" time="0.001">
\t\t\t<failure message="Failed"><![CDATA[    b_test.go:10: want 1, got 2]]></failure>
\t\t</testcase>
\t\t<testcase name="TestC" classname="example.com/pkg" time="0.000">
\t\t\t<skipped message="Skipped"><![CDATA[    c_test.go:5: not on linux]]></skipped>
\t\t</testcase>
\t</testsuite>
</testsuites>
"""

NAMESPACED = """<ns:testsuites xmlns:ns="urn:example:junit"><ns:testsuite name="s"><ns:testcase name="t1" time="1,234.5"><ns:error/></ns:testcase></ns:testsuite><ns:testsuite name="empty" tests="0"/></ns:testsuites>"""

SHAPES = {
    "pytest": PYTEST,
    "surefire": SUREFIRE,
    "jest": JEST,
    "phpunit": PHPUNIT,
    "go": GO,
    "namespaced": NAMESPACED,
}


def cases(results: list[ResultSpec]) -> list[tuple[str, str]]:
    return [(r.name, r.outcome.value) for r in results]


def test_pytest_shape() -> None:
    results = parse_junit(PYTEST.encode())
    assert cases(results) == [
        # pytest's cases are named by their node ids, as the pytest plugin names them
        ("tests/test_calc.py::test_ok", "passed"),
        ("tests/test_calc.py::test_fail", "failed"),
        ("tests/test_calc.py::test_skip", "skipped"),
        ("tests/test_calc.py::test_xf", "xfail"),
        ("tests/test_calc.py::test_xps", "failed"),
        ("tests/test_calc.py::test_td", "error"),
        ("tests/test_calc.py::TestGroup::test_param[a/b-1]", "passed"),
        ("tests/test_calc.py::test_su", "error"),
    ]
    fail = results[1]
    assert fail.duration == 0.012
    assert fail.message == (
        "AssertionError: nope\nassert 1 == 2\n"
        '>   def test_fail(): assert 1 == 2, "nope"\nE   AssertionError: nope\n\n'
        "tests/test_calc.py:7: AssertionError"
    )
    assert results[2].message == "needs a board\ntests/test_calc.py:8: needs a board"
    assert results[3].message == "known bug"
    # test-case properties become labels; output is not kept; suite, classname and
    # hostname are; the suite's timestamp plus the times before a case date it
    assert results[6].labels == {
        "board": "rpi4",
        "junit.suite": "pytest",
        "junit.classname": "tests.test_calc.TestGroup",
        "junit.hostname": "ci",
    }
    start = datetime(2024, 5, 2, 2, 0, 13, 967558, tzinfo=UTC)
    assert results[0].started_at == start
    assert results[2].started_at == start + timedelta(seconds=0.013)
    assert results[6].message is None


def test_surefire_shape_a_lone_testsuite() -> None:
    results = parse_junit(SUREFIRE.encode())
    assert cases(results) == [
        ("com.example.CalcTest/adds", "passed"),
        ("com.example.CalcTest/divides", "failed"),
        ("com.example.CalcTest/parses", "error"),
        ("com.example.CalcTest/rounds", "skipped"),
        ("com.example.CalcTest/retries", "passed"),  # passed on a rerun
    ]
    retried = results[4]
    assert retried.flaky and [(a.outcome.value, a.message) for a in retried.attempts] == [
        ("failed", "timeout\nfirst run timed out"),
        ("passed", None),
    ]
    assert not any(r.flaky or r.attempts for r in results[:4])
    assert results[1].message == (
        "expected: <2> but was: <3>\norg.opentest4j.AssertionFailedError: expected: <2> but was: <3>\n"
        "\tat com.example.CalcTest.divides(CalcTest.java:21)"
    )
    assert results[2].message == "boom\njava.lang.IllegalStateException: boom"
    assert results[3].message == "@Disabled: flaky on CI"
    # a suite's own properties (here the whole JVM environment) are not copied to each case
    assert results[0].labels == {
        "junit.suite": "com.example.CalcTest",
        "junit.classname": "com.example.CalcTest",
    }
    assert [r.duration for r in results] == [0.001, 0.004, 0.002, 0.0, 0.010]


def test_jest_shape_messages_only_as_text_and_empty_skips() -> None:
    results = parse_junit(JEST.encode())
    assert cases(results) == [
        ("Calculator adds/Calculator adds", "passed"),
        ("Calculator divides by zero/Calculator divides by zero", "failed"),
        ("Calculator rounds/Calculator rounds", "skipped"),
    ]
    assert results[1].message.startswith("Error: expect(received).toThrow()\n\nReceived function")
    assert results[2].message is None


def test_phpunit_shape_nested_suites() -> None:
    results = parse_junit(PHPUNIT.encode())
    assert cases(results) == [
        ("App.Tests.CalcTest/testAdd with data set #0", "passed"),
        ("App.Tests.CalcTest/testAdd with data set #1", "failed"),
        ("App.Tests.CalcTest/testSub", "passed"),
    ]
    # the innermost suite a case is in names it
    assert results[0].labels["junit.suite"] == "App\\Tests\\CalcTest::testAdd"
    assert results[2].labels["junit.suite"] == "App\\Tests\\CalcTest"
    assert results[1].message.endswith("Failed asserting that 3 matches expected 4.")


def test_go_shape() -> None:
    results = parse_junit(GO.encode())
    assert cases(results) == [
        ("example.com/pkg/TestA", "passed"),
        ("example.com/pkg/TestB", "failed"),
        ("example.com/pkg/TestC", "skipped"),
    ]
    assert results[1].message == "Failed\nb_test.go:10: want 1, got 2"
    assert results[2].message == "Skipped\nc_test.go:5: not on linux"


def test_namespaces_lenient_times_and_empty_suites() -> None:
    results = parse_junit(NAMESPACED.encode())
    assert cases(results) == [("t1", "error")]
    assert results[0].duration == 1234.5
    assert results[0].labels == {"junit.suite": "s"}
    assert parse_junit(b'<testsuite name="none" tests="0"/>') == []
    bad_times = parse_junit(b'<testsuite><testcase name="a" time="abc"/></testsuite>')
    assert [r.duration for r in bad_times] == [None]


# --- round trips -------------------------------------------------------------------------


def stored(specs: list[ResultSpec]) -> list[Result]:
    now = datetime(2024, 5, 2, 2, 0, tzinfo=UTC)
    return [
        Result(**s.model_dump(), id=i, task_id="t1", created_at=now) for i, s in enumerate(specs, 1)
    ]


def xml_cases(text: str) -> list[tuple[str | None, str, str]]:
    """(classname, name, outcome element) of every test case in a JUnit document."""
    out = []
    for case in ET.fromstring(text).iter():
        if case.tag.rpartition("}")[2] != "testcase":
            continue
        kinds = [c.tag.rpartition("}")[2] for c in case]
        kind = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        if (
            kind == "skipped"
            and case.find("skipped") is not None
            and case.find("skipped").get("type") == "pytest.xfail"
        ):
            kind = "xfail"
        out.append((case.get("classname"), case.get("name"), kind))
    return out


@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "namespaced"])
def test_import_then_export_gives_back_the_same_cases_and_outcomes(shape: str) -> None:
    original = SHAPES[shape]
    imported = parse_junit(original.encode())
    exported = export_junit(stored(imported))
    assert xml_cases(exported) == xml_cases(original)
    again = parse_junit(exported.encode())
    assert cases(again) == cases(imported)
    assert [r.labels for r in again] == [r.labels for r in imported]
    assert export_junit(stored(again)) == exported  # stable


def test_export_counts_and_what_junit_cannot_say() -> None:
    specs = [
        ResultSpec(name="tests/test_a.py::TestX::test_p[a/b::c]", outcome="passed", duration=0.25),
        ResultSpec(
            name="tests/test_a.py::test_f", outcome="failed", message="assert 1 == 2\ndetails"
        ),
        ResultSpec(
            name="boot",
            outcome="xpass",
            metrics={"boot_time": {"value": 812, "unit": "ms"}},
            labels={"board": "rpi4"},
        ),
        ResultSpec(name="suite/flash", outcome="xfail", message="known"),
        ResultSpec(name="suite/skip", outcome="skipped"),
        ResultSpec(name="suite/err", outcome="error", message="\x1b[31mred\x1b[0m"),
    ]
    text = export_junit(stored(specs))
    root = ET.fromstring(text)
    assert root.attrib == {
        "name": "jumpstarter",
        "tests": "6",
        "failures": "1",
        "errors": "1",
        "time": "0.250",
    }
    assert xml_cases(text) == [
        ("tests.test_a.TestX", "test_p[a/b::c]", "passed"),  # as pytest's own report names it
        ("tests.test_a", "test_f", "failure"),
        (None, "boot", "passed"),
        ("suite", "flash", "xfail"),
        ("suite", "skip", "skipped"),
        ("suite", "err", "error"),
    ]
    failure = root.find("testsuite/testcase[@name='test_f']/failure")
    assert (failure.get("message"), failure.text) == ("assert 1 == 2", "assert 1 == 2\ndetails")
    assert (
        root.find("testsuite/testcase[@name='err']/error").get("message") == "\\x1b[31mred\\x1b[0m"
    )
    back = parse_junit(text.encode())
    # names (the node id kept whole), outcomes (xpass too), metrics and labels come back
    assert cases(back) == [(s.name, s.outcome.value) for s in specs]
    assert back[2].metrics["boot_time"].model_dump() == {"value": 812.0, "unit": "ms"}
    assert back[2].labels == {"board": "rpi4", "junit.suite": "jumpstarter"}
    assert back[0].labels == {"junit.suite": "pytest", "junit.classname": "tests.test_a.TestX"}
    assert export_junit([]).startswith(
        '<?xml version="1.0" encoding="utf-8"?>\n<testsuites name="jumpstarter" tests="0"'
    )


def test_split_name() -> None:
    assert split_name("a/b/c") == ("a/b", "c")
    assert split_name("example.com/pkg/TestA", "example.com/pkg") == ("example.com/pkg", "TestA")
    assert split_name("tests/x.py::test[1/2]") == ("tests.x", "test[1/2]")
    assert split_name("plain") == (None, "plain")


def test_trim_message_keeps_start_and_end() -> None:
    text = "start\n" + "x" * 20_000 + "\nE   assert 1 == 2"
    trimmed = trim_message(text, 1000)
    assert (
        len(trimmed) <= 1000
        and trimmed.startswith("start\n")
        and trimmed.endswith("E   assert 1 == 2")
    )
    assert "characters cut" in trimmed
    assert trim_message("short", 1000) == "short"


# --- bad input: one clear error, nothing imported ------------------------------------------

BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<testsuite><testcase name="&lol2;"/></testsuite>"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE t [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<testsuite><testcase name="a"><failure message="&secret;"/></testcase></testsuite>"""

BAD = {
    "malformed": (
        b"<testsuite><testcase name='a'></testsuite>",
        "bad.xml: not well-formed XML: mismatched tag: line 1, column 32",
    ),
    "truncated": (
        b"<testsuites><testsuite>",
        "bad.xml: not well-formed XML: no element found: line 1, column 23",
    ),
    "empty": (b"", "bad.xml: not well-formed XML: no element found: line 1, column 0"),
    "not xml": (
        b"PASS all tests\n",
        "bad.xml: not well-formed XML: syntax error: line 1, column 0",
    ),
    "entities": (
        BILLION_LAUGHS,
        "bad.xml: refused: the XML declares the entity 'lol'; entities are not allowed in JUnit files",
    ),
    "external entity": (
        XXE,
        "bad.xml: refused: the XML declares the entity 'secret'; entities are not allowed in JUnit files",
    ),
    "wrong root": (
        b"<html><body/></html>",
        "bad.xml: not JUnit XML: the root element is <html>, expected <testsuites> or <testsuite>",
    ),
    "negative time": (
        b"<testsuite><testcase name='a' time='-1'/></testsuite>",
        "bad.xml: test case 'a': time -1 is not a believable duration (0 to 2678400 seconds)",
    ),
    "absurd time": (
        b"<testsuite><testcase classname='c' name='" + b"n" * 600 + b"' time='999638317'/></testsuite>",
        "bad.xml: test case 'c/" + "n" * 77 + "…': time 999638317 is not a believable duration"
        " (0 to 2678400 seconds)",
    ),
    "infinite time": (
        b"<testsuite><testcase name='a' time='inf'/></testsuite>",
        "bad.xml: test case 'a': time inf is not a believable duration (0 to 2678400 seconds)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error(case: str) -> None:
    data, message = BAD[case]
    with pytest.raises(BadRequest) as info:
        parse_junit(data, source="bad.xml")
    assert str(info.value) == message


def test_the_size_cap() -> None:
    data = PYTEST.encode()
    assert len(parse_junit(data, max_size=len(data))) == 8
    with pytest.raises(BadRequest) as info:
        parse_junit(data, source="big.xml", max_size=len(data) - 1)
    assert (
        str(info.value)
        == f"big.xml: {len(data)} bytes is more than the limit of {len(data) - 1} bytes"
    )


# --- jmp result import ------------------------------------------------------------------------


@pytest.fixture
def task_id(protocol: JumpStarterProtocol) -> str:
    with protocol.create_session("ci") as session:
        return session.connect("local").new_task(["true"], name="ci job").id


def results_of(protocol: JumpStarterProtocol, task: str) -> list[tuple[str, str]]:
    with protocol.create_session("check") as session:
        node = session.connect("local", lease=False)
        return [(r.name, r.outcome.value) for r in node.query_results(task_id=task).results]


def test_jmp_result_import(protocol: JumpStarterProtocol, task_id: str, tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text(PYTEST)
    result = CliRunner().invoke(cli, ["result", "import", "junit.xml", "--task", task_id])
    assert (result.exit_code, result.output) == (
        0,
        f"imported 8 results into task {task_id} (2 passed, 2 failed, 1 skipped, 1 xfail, 2 error)\n",
    )
    assert results_of(protocol, task_id) == cases(parse_junit(PYTEST.encode()))
    # the same through a real jmp, from stdin
    done = run_jmp("result", "import", "-", "--task", task_id, input=GO)
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"imported 3 results into task {task_id} (1 passed, 1 failed, 1 skipped)\n",
        "",
    )
    assert len(results_of(protocol, task_id)) == 11
    empty = CliRunner().invoke(
        cli, ["result", "import", "-", "--task", task_id], input='<testsuite tests="0"/>'
    )
    assert (empty.exit_code, empty.output) == (0, "-: no test cases; nothing imported\n")


@pytest.mark.parametrize(
    "case", ["malformed", "entities", "external entity", "wrong root", "absurd time"]
)
def test_jmp_result_import_refuses_bad_files_whole(
    protocol: JumpStarterProtocol, task_id: str, tmp_path: Path, case: str
) -> None:
    data, message = BAD[case]
    # good cases before the bad part: still nothing may be imported
    (tmp_path / "bad.xml").write_bytes(data)
    result = CliRunner().invoke(cli, ["result", "import", "bad.xml", "--task", task_id])
    assert (result.exit_code, result.output) == (2, f"jmp: error: {message}\n")
    done = run_jmp("result", "import", "bad.xml", "--task", task_id)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"jmp: error: {message}\n")
    assert results_of(protocol, task_id) == []


def test_jmp_result_import_other_errors(
    protocol: JumpStarterProtocol, task_id: str, tmp_path: Path
) -> None:
    (tmp_path / "junit.xml").write_text(PYTEST)
    size = (tmp_path / "junit.xml").stat().st_size
    done = run_jmp("result", "import", "junit.xml", "--task", task_id, "--max-size", "100")
    assert (done.returncode, done.stderr) == (
        2,
        f"jmp: error: junit.xml: {size} bytes is more than the limit of 100 bytes\n",
    )
    done = run_jmp("result", "import", "junit.xml", "--task", "nope")
    assert (done.returncode, done.stderr) == (3, "jmp: error: no task with id 'nope'\n")
    done = run_jmp("result", "import", "missing.xml", "--task", task_id)
    assert (done.returncode, done.stderr) == (
        2,
        "jmp: error: missing.xml: no such file or directory (try 'jmp result import --help')\n",
    )
    done = run_jmp("result", "import", "junit.xml")
    assert done.returncode == 2 and "Missing option '-t' / '--task'" in done.stderr
    assert results_of(protocol, task_id) == []
