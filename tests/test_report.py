"""`jmp result report`: the HTML report, parsed back for its numbers; it fetches
nothing from anywhere; bad input is one clear error."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import run_jmp
from jumpstarter.cli import cli
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import CloseTask, ListSessions, OpenTask, TaskSpec


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None]) -> None:
        self.tag, self.attrs, self.children, self.parts = tag, attrs, [], []

    @property
    def text(self) -> str:
        return "".join(self.parts + [c.text for c in self.children])

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str | bool):
        for node in self.iter():
            if tag is not None and node.tag != tag:
                continue
            if all(
                (k in node.attrs) if v is True else node.attrs.get(k) == v for k, v in attrs.items()
            ):
                yield node


VOID = {"meta", "br", "img", "input", "link", "hr", "line", "polyline", "circle", "rect"}


class Tree(HTMLParser):
    """Just enough of a DOM to read the report back."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.root = Node("root", {})
        self.stack = [self.root]
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        while self.stack[-1].tag != tag:  # be forgiving, as a browser is
            self.stack.pop()
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].parts.append(data)


def record(protocol: JumpStarterProtocol, name: str, results: list[dict]) -> str:
    with protocol.create_session(name) as session:
        node = session.connect("local", lease=False)
        task = node.request(OpenTask(spec=TaskSpec(argv=["pytest"], name="pytest"))).task
        node.add_results(task.id, results)
        node.request(CloseTask(task_id=task.id, state="failed", exit_code=1))
        return session.id


NIGHT = [
    {"name": "suite/boot", "outcome": "passed", "duration": 12.5},
    {
        "name": "suite/flash",
        "outcome": "failed",
        "duration": 30.0,
        "message": "bad checksum: 0x1f != 0x2e\nat flash.py:12",
    },
    {
        "name": "suite/net<script>alert(1)</script>",
        "outcome": "error",
        "duration": 0.5,
        "message": "fixture & <boom>",
    },
    {"name": "suite/usb", "outcome": "skipped", "duration": 0.0, "message": "no board"},
    {"name": "suite/known", "outcome": "xfail", "duration": 1.0},
    {"name": "suite/lucky", "outcome": "xpass", "duration": 2.0},
    {"name": "suite/untimed", "outcome": "passed"},
    {"name": "suite/fast", "outcome": "passed", "duration": 0.25},
]


@pytest.fixture
def sessions(protocol: JumpStarterProtocol) -> list[str]:
    older = [
        record(
            protocol,
            "nightly",
            [
                {"name": "suite/boot", "outcome": "passed", "duration": 10.0},
                {"name": "suite/flash", "outcome": "passed", "duration": 20.0},
            ],
        ),
        record(protocol, "ci-1", [{"name": "x", "outcome": "failed", "duration": 5.0}]),
        record(
            protocol,
            "nightly",
            [
                {"name": "suite/boot", "outcome": "failed", "duration": 11.0},
                {"name": "suite/flash", "outcome": "passed", "duration": 22.0},
                {"name": "suite/usb", "outcome": "skipped"},
            ],
        ),
    ]
    return [*older, record(protocol, "nightly", NIGHT)]


def numbers(tree: Tree) -> dict[str, object]:
    counts = {
        n.attrs["data-count"]: int(n.text.replace(",", ""))
        for n in tree.root.find_all(**{"data-count": True})
    }
    (rate,) = tree.root.find_all(**{"data-rate": True, "class": "n"})
    (duration,) = tree.root.find_all(**{"data-duration": True, "class": "n"})
    return {
        "counts": counts,
        "rate": rate.attrs["data-rate"],
        "rate_text": rate.text,
        "duration": float(duration.attrs["data-duration"]),
        "duration_text": duration.text,
    }


def test_the_report_of_the_newest_session(
    protocol: JumpStarterProtocol, sessions: list[str], tmp_path: Path
) -> None:
    result = CliRunner().invoke(cli, ["result", "report", "-o", "report.html"])
    assert result.exit_code == 0, result.output
    assert result.output == "wrote report.html: 8 results of 'nightly', 2 failing\n"
    text = (tmp_path / "report.html").read_text()
    tree = Tree(text)

    assert next(tree.root.find_all("title")).text == "Test report: nightly"
    assert numbers(tree) == {
        "counts": {
            "total": 8,
            "passed": 3,
            "failed": 1,
            "error": 1,
            "skipped": 1,
            "xfail": 1,
            "xpass": 1,
        },
        "rate": f"{5 / 7:.6f}",  # 7 ran (one skipped), 2 of them failed
        "rate_text": "71.4%",
        "duration": 46.25,
        "duration_text": "46.2 s",
    }

    failures = [
        (
            n.attrs["data-name"],
            n.attrs["data-outcome"],
            next(c for c in n.iter() if c.tag == "pre").text,
        )
        for n in tree.root.find_all(tag="article")
    ]
    assert failures == [
        ("suite/flash", "failed", "bad checksum: 0x1f != 0x2e\nat flash.py:12"),
        ("suite/net<script>alert(1)</script>", "error", "fixture & <boom>"),
    ]
    slowest = [
        (n.attrs["data-name"], float(n.attrs["data-duration"]))
        for n in tree.root.find_all(tag="tr")
        if "data-name" in n.attrs
    ]
    assert slowest == [
        ("suite/flash", 30.0),
        ("suite/boot", 12.5),
        ("suite/lucky", 2.0),
        ("suite/known", 1.0),
        ("suite/net<script>alert(1)</script>", 0.5),
        ("suite/fast", 0.25),
        ("suite/usb", 0.0),
    ]

    # the charts: the three nightly sessions (the name the reported one has), oldest first
    nightly = [sessions[0], sessions[2], sessions[3]]
    dots = [
        (n.attrs["data-session"], float(n.attrs["data-rate"]))
        for n in tree.root.find_all(tag="circle")
    ]
    assert dots == [
        (nightly[0], 1.0),
        (nightly[1], 0.5),
        (nightly[2], pytest.approx(5 / 7, abs=1e-6)),
    ]
    bars = [
        (n.attrs["data-session"], float(n.attrs["data-duration"]))
        for n in tree.root.find_all(tag="rect")
    ]
    assert bars == [(nightly[0], 30.0), (nightly[1], 33.0), (nightly[2], 46.25)]
    assert len(list(tree.root.find_all(tag="svg"))) == 2

    # escaped, never markup; self-contained: nothing fetched, nothing run
    assert "<script" not in text.lower() and "&lt;script&gt;" in text
    assert not re.search(r"\b(src|href)\s*=", text) and "<link" not in text and "url(" not in text
    assert "@import" not in text
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) == {
        "http://www.w3.org/2000/svg"
    }  # a namespace name


def test_chosen_sessions_trend_and_stdout(
    protocol: JumpStarterProtocol, sessions: list[str]
) -> None:
    done = run_jmp(
        "result",
        "report",
        "--session",
        "nightly~1",
        "--session",
        "ci-1",
        "--trend",
        "*",
        "--last",
        "3",
        "--title",
        "Two of them",
        "-o",
        "-",
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    tree = Tree(done.stdout)
    assert next(n for n in tree.root.iter() if n.tag == "h1").text == "Two of them"
    assert numbers(tree)["counts"] == {"total": 4, "passed": 1, "failed": 2, "skipped": 1}
    # the last three sessions of any name; the reported ones are drawn larger
    dots = {n.attrs["data-session"]: n.attrs["r"] for n in tree.root.find_all(tag="circle")}
    assert dots == {sessions[1]: "5", sessions[2]: "5", sessions[3]: "3.5"}
    # a name used once: its trend is that one session, never unrelated ones
    once = Tree(run_jmp("result", "report", "--session", "ci-1", "-o", "-").stdout)
    assert [n.attrs["data-session"] for n in once.root.find_all(tag="rect")] == [sessions[1]]


def test_report_bad_input(protocol: JumpStarterProtocol, tmp_path: Path) -> None:
    empty = run_jmp("result", "report")
    assert (empty.returncode, empty.stderr) == (
        3,
        "jmp: error: no session has results yet; nothing to report\n",
    )
    record(protocol, "nightly", NIGHT)
    cases = [
        (["--session", "nope"], 3, "jmp: error: no session named 'nope'\n"),
        (["-o", str(tmp_path)], 1, f"jmp: error: cannot write {tmp_path}: Is a directory\n"),
        (
            ["-o", str(tmp_path / "no" / "such.html")],
            1,
            f"jmp: error: cannot write {tmp_path / 'no' / 'such.html'}: No such file or directory\n",
        ),
    ]
    for args, code, message in cases:
        runner = CliRunner().invoke(cli, ["result", "report", *args])
        assert (runner.exit_code, runner.output) == (code, message)
        done = run_jmp("result", "report", *args)
        assert (done.returncode, done.stdout, done.stderr) == (code, "", message)
    last = run_jmp("result", "report", "--last", "0")
    assert last.returncode == 2 and "0 is not in the range 1<=x<=1000" in last.stderr
    assert not (tmp_path / "report.html").exists()


def test_a_session_with_nothing_failed_or_timed(protocol: JumpStarterProtocol) -> None:
    record(
        protocol, "quiet", [{"name": "a", "outcome": "passed"}, {"name": "b", "outcome": "skipped"}]
    )
    tree = Tree(CliRunner().invoke(cli, ["result", "report", "-o", "-"]).output)
    assert numbers(tree)["counts"] == {"total": 2, "passed": 1, "failed": 0, "skipped": 1}
    texts = [n.text for n in tree.root.find_all(**{"class": "none"})]
    assert "No failures." in texts and "No durations recorded." in texts


def test_failures_marked_grouped_with_their_context(protocol: JumpStarterProtocol) -> None:
    def failed(name: str, first: str = "AssertionError: boom") -> dict:
        traceback = "\n".join(f"  frame {i}" for i in range(60))
        return {"name": name, "outcome": "failed", "message": f"{first}\n{traceback}\nE   the end of {name}"}

    passed = [{"name": f"suite/ok{i}", "outcome": "passed", "duration": 1.0} for i in range(1200)]
    first = record(protocol, "nightly", [failed("suite/a"), {"name": "suite/b", "outcome": "passed"},
                                          failed("suite/c", "KeyError: c"), *passed])
    second = record(protocol, "nightly", [failed("suite/a"), failed("suite/b"),
                                           {"name": "suite/c", "outcome": "passed"}, *passed])
    record(protocol, "other", [failed("suite/a")])  # another name: never compared, never drawn
    with protocol.create_session("nightly") as session:
        node = session.connect("local", lease=False)
        spec = TaskSpec(argv=["pytest", "-q", "tests/"], name="pytest", labels={"board": "rpi4"})
        task = node.request(OpenTask(spec=spec)).task
        node.add_results(task.id, [
            failed("suite/a"), failed("suite/b"), failed("suite/c", "KeyError: c"),
            failed("suite/d", "TimeoutError: 5 s"),
            {**failed("suite/e", "TimeoutError: 5 s"),
             "attempts": [{"outcome": "passed"}, {"outcome": "failed"}], "flaky": True},
            *passed,
        ])
        node.request(CloseTask(task_id=task.id, state="failed", exit_code=1))
        third = session.id
    tree = Tree(CliRunner().invoke(cli, ["result", "report", "-o", "-"]).output)
    marks = {n.attrs["data-name"]: n.attrs["data-mark"] for n in tree.root.find_all(tag="article")}
    assert marks == {
        "suite/a": "still", "suite/b": "still", "suite/c": "flaky", "suite/d": "new", "suite/e": "flaky",
    }
    text = {n.attrs["data-name"]: " ".join(n.text.split()) for n in tree.root.find_all(tag="article")}
    with protocol.create_session("check") as session:
        node = session.connect("local", lease=False)
        sessions = {s.id: s for s in node.request(ListSessions(limit=10)).sessions}
    since = sessions[first].created_at.strftime("%Y-%m-%d %H:%M UTC")
    assert f"still failing since {since}" in text["suite/a"]
    assert "still failing since " + sessions[second].created_at.strftime("%Y-%m-%d %H:%M UTC") in text["suite/b"]
    assert "flaky (failed in 1 of the last 2)" in text["suite/c"]
    assert "flaky: passed → failed" in text["suite/e"]
    # grouped by the first line (biggest group first), every name listed; the
    # traceback's end is shown
    groups = [(n.find_all(tag="code").__next__().text, [li.text for li in n.find_all(tag="li")])
              for n in tree.root.find_all(tag="details", **{"class": "group"})]
    assert groups == [
        ("AssertionError: boom", ["suite/a", "suite/b"]),
        ("TimeoutError: 5 s", ["suite/d", "suite/e"]),
        ("KeyError: c", ["suite/c"]),
    ]
    shown = [p.text for p in tree.root.find_all(tag="pre")]
    assert any(t.endswith("E   the end of suite/a") and "frame 59" in t and "frame 5\n" not in t for t in shown)
    # the run's context, a breakdown per suite, thousands separators, the whole list folded
    context = " ".join(next(tree.root.find_all(tag="section", id="context")).text.split())
    assert "pytest -q tests/" in context and "board=rpi4" in context and "local" in context
    (suite,) = tree.root.find_all(tag="tr", **{"data-suite": "suite"})
    assert [td.text for td in suite.find_all(tag="td")][:4] == ["suite", "1,205", "1,200", "5"]
    assert numbers(tree)["counts"]["total"] == 1205
    assert len(list(next(tree.root.find_all(tag="section", id="tests")).find_all(tag="tr"))) == 1205
    # the trend: only 'nightly', its pass-rate axis zoomed to the data (99.6 % to 100 %)
    dots = [n.attrs["data-session"] for n in tree.root.find_all(tag="circle")]
    assert dots == [first, second, third]
    rate_chart = next(tree.root.find_all(tag="svg", id="chart-pass-rate"))
    ticks = [t.text for t in rate_chart.find_all(tag="text") if t.text.endswith("%")]
    assert float(ticks[-1].rstrip("%")) == 100 and float(ticks[0].rstrip("%")) >= 99


def test_chart_labels_fit_inside_the_drawing() -> None:
    from datetime import UTC, datetime

    from jumpstarter.results.report import duration_axis, layout
    from jumpstarter_protocol import SessionInfo

    sessions = [SessionInfo(id=f"s{i}", name="a-rather-long-session-name-of-ci", created_at=datetime(2024, 5, i + 1, tzinfo=UTC))
                for i in range(3)]
    chart = layout(sessions, duration_axis([6000.0]))
    assert [label for _, label in chart.axis.ticks][-1] == "100 min"
    assert chart.left - 6 - len("100 min") * 6.6 >= 0  # the longest tick label fits
    for x, label in chart.labels:  # slanted session labels stay inside on the left and bottom
        assert x - len(label) * 6.6 * 0.82 >= -10
        assert chart.bottom + 14 + len(label) * 6.6 * 0.58 <= chart.height
