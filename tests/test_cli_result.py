"""``jmp result add`` and ``jmp result query``: every format, the summary, the export
hook, and bad input, through click's runner and through the real ``jmp``."""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import invoke_jmp, run_jmp
from jumpstarter import hookimpl
from jumpstarter.cli import cli
from jumpstarter.cli._params import parse_metrics, parse_when
from jumpstarter.protocol import JumpStarterProtocol
from test_cli_task import store_rows


@pytest.fixture
def task_id(protocol: JumpStarterProtocol) -> str:
    """A finished task of session 'nightly' on the local node."""
    with protocol.create_session("nightly") as session:
        task = session.connect().start(["true"])
        task.wait()
        return task.id


def jmp(*args: str) -> click.testing.Result:
    return CliRunner().invoke(cli, list(args))


def test_add_then_query_every_format(task_id: str) -> None:
    added = jmp("result", "add", task_id, "--name", "suite/boot", "--outcome", "passed", "--duration", "1.5",
                "--metric", "boot=812ms", "--metric", "temp=41.5C", "--metric", "ratio=0.93", "--label", "board=rpi4")
    assert (added.exit_code, added.stdout, added.stderr) == (0, "1\n", "")
    second = jmp("result", "add", task_id, "--name", "suite/flash", "--outcome", "FAILED", "--message",
                 "bad checksum", "--duration", "0.5", "--format", "json")
    assert json.loads(second.stdout) == {"id": 2}
    jmp("result", "add", task_id, "--name", "other", "--outcome", "skipped")

    table = jmp("result", "query", "--task", task_id).stdout.splitlines()
    assert table[0].split() == ["ID", "NAME", "OUTCOME", "DURATION", "METRICS", "TASK", "ADDED", "MESSAGE"]
    assert table[1].split()[:7] == ["1", "suite/boot", "passed", "1.5s", "boot=812ms", "temp=41.5C", "ratio=0.93"]
    assert table[2].split()[:4] == ["2", "suite/flash", "failed", "0.5s"] and table[2].endswith("bad checksum")
    assert table[-1] == "3 results: 1 passed, 1 failed, 1 skipped; 2s in total"

    doc = json.loads(jmp("result", "query", "--session", "nightly", "--format", "json").stdout)
    assert set(doc) == {"results", "summary", "next_cursor"}
    assert doc["summary"] == {"total": 3, "outcomes": {"passed": 1, "failed": 1, "skipped": 1}, "duration": 2.0}
    boot = doc["results"][0]
    assert boot["metrics"] == {
        "boot": {"value": 812.0, "unit": "ms"}, "temp": {"value": 41.5, "unit": "C"}, "ratio": {"value": 0.93, "unit": None}
    }
    assert (boot["labels"], boot["task_id"], boot["node"]) == ({"board": "rpi4"}, task_id, "local")

    rows = list(csv.DictReader(io.StringIO(jmp("result", "query", "--outcome", "failed", "--format", "csv").stdout)))
    assert [(r["id"], r["name"], r["outcome"], r["duration"], r["message"]) for r in rows] == [
        ("2", "suite/flash", "failed", "0.5", "bad checksum")
    ]
    boot_row = next(csv.DictReader(io.StringIO(jmp("result", "query", "--name", "*/boot", "--format", "csv").stdout)))
    assert json.loads(boot_row["metrics"])["boot"] == {"value": 812.0, "unit": "ms"}

    from jumpstarter.junit import parse_junit

    xml = jmp("result", "query", "--task", task_id, "--format", "junit").stdout
    assert [(r.name, r.outcome.value) for r in parse_junit(xml.encode())] == [
        ("suite/boot", "passed"), ("suite/flash", "failed"), ("other", "skipped")
    ]


def test_filters_time_labels_and_pages(task_id: str) -> None:
    for i in range(3):
        jmp("result", "add", task_id, "--name", f"case/{i}", "--outcome", "passed", "--label", f"n={i}")
    assert json.loads(jmp("result", "query", "--since", "1h", "--format", "json").stdout)["summary"]["total"] == 3
    assert jmp("result", "query", "--until", "1h").stdout == "0 results\n"
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert jmp("result", "query", "--since", tomorrow).stdout == "0 results\n"
    assert jmp("result", "query", "--until", tomorrow + "T00:00:00Z").stdout.endswith("3 results: 3 passed; 0s in total\n")
    only = json.loads(jmp("result", "query", "--label", "n=1", "--format", "json").stdout)["results"]
    assert [r["name"] for r in only] == ["case/1"]
    page = jmp("result", "query", "--limit", "2")
    assert page.stdout.splitlines()[-1] == "3 results: 3 passed; 0s in total; 2 shown, more with --cursor 2"
    rest = json.loads(jmp("result", "query", "--limit", "2", "--cursor", "2", "--format", "json").stdout)
    assert [r["name"] for r in rest["results"]] == ["case/2"] and rest["next_cursor"] is None


def test_the_export_hook_is_called_for_every_format(task_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import jumpstarter.protocol
    from jumpstarter.plugins import get_plugin_manager

    calls: list[tuple[list[str], str]] = []

    class Exporter:
        @hookimpl
        def jmp_results_exported(self, results, format) -> None:
            calls.append(([r.name for r in results], format))

    monkeypatch.setattr(
        jumpstarter.protocol, "get_plugin_manager", lambda env=None: get_plugin_manager(env, extra=[Exporter()])
    )
    jmp("result", "add", task_id, "--name", "a", "--outcome", "passed")
    for fmt in ("table", "json", "csv", "junit"):
        assert jmp("result", "query", "--format", fmt).exit_code == 0
    assert calls == [(["a"], "table"), (["a"], "json"), (["a"], "csv"), (["a"], "junit")]


def test_the_export_hook_through_the_real_jmp(task_id: str) -> None:
    done = run_jmp("result", "query", "--format", "json", env={**os.environ, "JMP_TRACE_PLUGINS": "1"})
    assert done.returncode == 0
    assert "jmp: hook jmp_results_exported(results, format) -> []\n" in done.stderr


# --- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "metric"),
    [
        ("boot=812ms", {"value": 812.0, "unit": "ms"}),
        ("temp=41.5C", {"value": 41.5, "unit": "C"}),
        ("ratio=0.93", {"value": 0.93}),
        ("gain=-3dB", {"value": -3.0, "unit": "dB"}),
        ("ops=1e3", {"value": 1000.0}),
        ("load=.5%", {"value": 0.5, "unit": "%"}),
        ("rate=12MB/s", {"value": 12.0, "unit": "MB/s"}),
    ],
)
def test_metric_syntax(text: str, metric: dict) -> None:
    assert parse_metrics((text,)) == {text.split("=")[0]: metric}


def test_when_is_iso_8601_or_an_age() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_when("2h", now) == now - timedelta(hours=2)
    assert parse_when("3d", now) == now - timedelta(days=3)
    assert parse_when("90s", now) == now - timedelta(seconds=90)
    assert parse_when("2024-05-01T10:00:00Z") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_when("2024-05-01T10:00+02:00") == datetime(2024, 5, 1, 8, tzinfo=UTC)
    assert parse_when("2024-05-01") == datetime(2024, 5, 1).astimezone()  # local midnight
    for bad in ("yesterday", "2024-13-01", "3x", "h", ""):
        with pytest.raises(ValueError):
            parse_when(bad)


# --- bad input -------------------------------------------------------------------------------





METRIC_HELP = "is not NAME=VALUE[UNIT] (like boot=812ms, temp=41.5C or ratio=0.93)\n"
WHEN_HELP = (
    "is neither a date nor an age; use ISO 8601 (2024-05-01, 2024-05-01T14:30, 2024-05-01T14:30:00Z) "
    "or an age (45s, 30m, 2h, 3d, 1w)\n"
)
ADD = ["result", "add", "TASK", "--name", "n", "--outcome", "passed"]


@pytest.mark.parametrize("how", ["runner", "process"])
@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["result", "add", "nope", "--name", "n", "--outcome", "passed"], 3, "jmp: error: no task with id 'nope'\n"),
        ([*ADD, "--node", "nowhere"], 3, "jmp: error: unknown node 'nowhere'; known nodes: local\n"),
        ([*ADD, "--metric", "boot=fast"], 2, f"Error: Invalid value for --metric: 'boot=fast' {METRIC_HELP}"),
        ([*ADD, "--metric", "boot"], 2, f"Error: Invalid value for --metric: 'boot' {METRIC_HELP}"),
        ([*ADD, "--metric", "=5ms"], 2, f"Error: Invalid value for --metric: '=5ms' {METRIC_HELP}"),
        ([*ADD, "--metric", "v=1.2.3"], 2, f"Error: Invalid value for --metric: 'v=1.2.3' {METRIC_HELP}"),
        ([*ADD, "--metric", "v=1e999"], 2, f"Error: Invalid value for --metric: 'v=1e999' {METRIC_HELP}"),
        ([*ADD, "--metric", "v=12 ms"], 2, f"Error: Invalid value for --metric: 'v=12 ms' {METRIC_HELP}"),
        ([*ADD, "--metric", "v=1", "--metric", "v=2"], 2, "Error: Invalid value for --metric: metric 'v' is given twice\n"),
        ([*ADD, "--outcome", "great"], 2, None),
        ([*ADD, "--duration", "-1"], 2, None),
        ([*ADD, "--duration", "nan"], 2, None),
        ([*ADD, "--label", "nolabel"], 2, "Error: Invalid value for --label: expected K=V, got 'nolabel'\n"),
        ([*ADD[:4], "", *ADD[5:]], 2, "Error: Invalid value for '--name': a result name must not be empty\n"),
        (["result", "query", "--since", "2024-13-01"], 2, f"Error: Invalid value for '--since': '2024-13-01' {WHEN_HELP}"),
        (["result", "query", "--until", "soon"], 2, f"Error: Invalid value for '--until': 'soon' {WHEN_HELP}"),
        (["result", "query", "--since", "1h", "--until", "2h"], 2, "Error: --since must be before --until\n"),
        (["result", "query", "--format", "xml"], 2,
         "Error: Invalid value for '-o' / '--format': 'xml' is not one of 'table', 'json', 'csv', 'junit'.\n"),
        (["result", "query", "--task", "nope"], 3, "jmp: error: no task with id 'nope'\n"),
        (["result", "query", "--session", "nope"], 3, "jmp: error: no session named 'nope'\n"),
        (["result", "query", "--node", "nowhere"], 3, "jmp: error: unknown node 'nowhere'; known nodes: local\n"),
        (["result", "query", "--cursor", "x"], 2, "jmp: error: invalid cursor 'x': use the next_cursor of a page\n"),
    ],
)
def test_bad_input(task_id: str, data_dir: Path, how: str, args: list[str], code: int, message: str | None) -> None:
    args = [task_id if a == "TASK" else a for a in args]
    before = store_rows(data_dir)
    got_code, stdout, stderr = invoke_jmp(how, args)
    assert (got_code, stdout) == (code, "")
    if message is None or message.startswith("Error: "):  # a usage error: one line
        hint = f" (try 'jmp result {args[1]} --help')\n"
        assert stderr.startswith("jmp: error: ") and stderr.endswith(hint) and stderr.count("\n") == 1
        if message is not None:
            assert stderr == "jmp: error: " + message.removeprefix("Error: ").removesuffix("\n") + hint
    else:
        assert stderr == message
    assert store_rows(data_dir) == before
