"""`jmp result diff` and `jmp result history` on hand-made sessions; the store's
sessions and history on both backends; the query plans that keep them fast."""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from conftest import run_jmp
from jumpstarter.cli import cli
from jumpstarter.errors import NotFound
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter.results.report import diff_results, is_flaky, outcome_changes, pass_rate
from jumpstarter.store import SQLiteStore, Store, open_store
from jumpstarter_protocol import (
    CloseTask,
    OpenTask,
    Outcome,
    QueryResults,
    ResultSpec,
    ResultSummary,
    TaskInfo,
    TaskSpec,
    TaskState,
)
from stores import postgres_url, store_url  # noqa: F401  (fixture)


def record(
    protocol: JumpStarterProtocol, session_name: str, outcomes: dict[str, str], **extra
) -> str:
    """A session named ``session_name`` whose one task recorded ``outcomes`` (name →
    outcome); its id."""
    with protocol.create_session(session_name) as session:
        node = session.connect("local", lease=False)
        task = node.request(OpenTask(spec=TaskSpec(argv=["pytest"], name="pytest"))).task
        node.add_results(
            task.id,
            [
                {
                    "name": name,
                    "outcome": outcome,
                    "duration": extra.get("duration", 1.0),
                    "message": None if outcome == "passed" else f"{name} went wrong\nsecond line",
                }
                for name, outcome in outcomes.items()
            ],
        )
        node.request(CloseTask(task_id=task.id, state="succeeded", exit_code=0))
        return session.id


def result_count(protocol: JumpStarterProtocol) -> int:
    with protocol.create_session("count") as session:
        return session.connect("local", lease=False).query_results(limit=1).summary.total


BEFORE = {
    "a": "passed",
    "b": "passed",
    "c": "failed",
    "d": "error",
    "gone": "passed",
    "x": "skipped",
}
AFTER = {
    "a": "passed",
    "b": "failed",
    "c": "passed",
    "d": "failed",
    "new_ok": "passed",
    "new_bad": "error",
    "x": "xfail",
}


@pytest.fixture
def nightly(protocol: JumpStarterProtocol) -> tuple[str, str]:
    first = record(protocol, "nightly", BEFORE)
    second = record(protocol, "nightly", AFTER)
    return first, second


# --- diff ------------------------------------------------------------------------------------


def test_diff_groups_by_what_changed() -> None:
    def results(outcomes: dict[str, str]):
        from jumpstarter_protocol import Result

        now = datetime.now(UTC)
        return [
            Result(id=i, task_id="t", name=n, outcome=o, created_at=now)
            for i, (n, o) in enumerate(outcomes.items())
        ]

    diff = diff_results(results(BEFORE), results(AFTER))
    names = {
        k: [c.name for c in getattr(diff, k)]
        for k in ("newly_failing", "fixed", "still_failing", "new", "missing")
    }
    assert names == {
        "newly_failing": ["b"],
        "fixed": ["c"],
        "still_failing": ["d"],
        "new": ["new_bad", "new_ok"],
        "missing": ["gone"],
    }
    assert diff.unchanged == 2  # a (passed), x (skipped → xfail: neither fails)
    assert [c.name for c in diff.regressions] == ["b", "new_bad"]
    # a name recorded twice in a session counts with its last result
    twice = results({"a": "failed"}) + [results({"a": "passed"})[0].model_copy(update={"id": 9})]
    assert diff_results(twice, results({"a": "passed"})).unchanged == 1


def test_jmp_result_diff_json(protocol: JumpStarterProtocol, nightly: tuple[str, str]) -> None:
    first, second = nightly
    result = CliRunner().invoke(cli, ["result", "diff", "nightly~1", "nightly", "--format", "json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert (data["a"]["id"], data["a"]["name"], data["b"]["id"]) == (first, "nightly", second)
    assert {
        k: [c["name"] for c in data[k]]
        for k in ("newly_failing", "fixed", "still_failing", "new", "missing")
    } == {
        "newly_failing": ["b"],
        "fixed": ["c"],
        "still_failing": ["d"],
        "new": ["new_bad", "new_ok"],
        "missing": ["gone"],
    }
    change = data["newly_failing"][0]
    assert change["a"]["outcome"] == "passed"
    assert (change["b"]["outcome"], change["b"]["message"], change["b"]["duration"]) == (
        "failed",
        "b went wrong\nsecond line",
        1.0,
    )
    assert data["missing"][0]["b"] is None and data["new"][0]["a"] is None
    assert (data["unchanged"], data["regressions"], data["exit_code"]) == (2, 2, 1)


def test_jmp_result_diff_table_and_exit_codes(
    protocol: JumpStarterProtocol, nightly: tuple[str, str]
) -> None:
    first, second = nightly
    done = run_jmp("result", "diff", first, second)
    assert (done.returncode, done.stderr) == (1, "")
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"A: 'nightly' ({first}, ") and lines[1].startswith(
        f"B: 'nightly' ({second}, "
    )
    text = re.sub(r" +", " ", done.stdout)
    assert "\nNewly failing (1):\nA B NAME MESSAGE\npassed failed b b went wrong\n" in text
    assert "\nFixed (1):\nA B NAME MESSAGE\nfailed passed c\n" in text
    assert "\nStill failing (1):\nA B NAME MESSAGE\nerror failed d d went wrong\n" in text
    assert (
        "\nNew (2):\nA B NAME MESSAGE\n- error new_bad new_bad went wrong\n- passed new_ok\n"
        in text
    )
    assert "\nMissing (1):\nA B NAME MESSAGE\npassed - gone\n" in text
    assert (
        lines[-1]
        == "1 newly failing, 1 fixed, 1 still failing, 2 new (1 failing), 1 missing, 2 unchanged"
    )

    # B against itself: no regressions, exit 0; A missing tests fail only when asked
    same = run_jmp("result", "diff", second, second)
    assert (same.returncode, same.stdout.splitlines()[-1]) == (
        0,
        "0 newly failing, 0 fixed, 3 still failing, 0 new, 0 missing, 4 unchanged",
    )
    third = record(protocol, "nightly", {k: v for k, v in AFTER.items() if k != "a"})
    assert run_jmp("result", "diff", second, third).returncode == 0
    missing = CliRunner().invoke(cli, ["result", "diff", second, third, "--fail-on-missing"])
    assert missing.exit_code == 1
    assert missing.output.splitlines()[-1].endswith("0 new, 1 missing, 3 unchanged")


def test_jmp_result_diff_bad_input(protocol: JumpStarterProtocol, nightly: tuple[str, str]) -> None:
    before = result_count(protocol)
    cases = [
        (["nope", "nightly"], 3, "jmp: error: no session named 'nope'\n"),
        (["nightly", "nope"], 3, "jmp: error: no session named 'nope'\n"),
        (
            ["nightly~2", "nightly"],
            3,
            "jmp: error: no session 'nightly~2': only 2 sessions are named 'nightly'\n",
        ),
        (["nope~1", "nightly"], 3, "jmp: error: no session named 'nope~1'\n"),
    ]
    for args, code, message in cases:
        runner = CliRunner().invoke(cli, ["result", "diff", *args])
        assert (runner.exit_code, runner.output) == (code, message)
        done = run_jmp("result", "diff", *args)
        assert (done.returncode, done.stdout, done.stderr) == (code, "", message)
    usage = run_jmp("result", "diff", "nightly")
    assert usage.returncode == 2 and "Missing argument 'SESSION_B'" in usage.stderr
    fmt = run_jmp("result", "diff", "nightly", "nightly", "--format", "xml")
    assert fmt.returncode == 2 and "'xml' is not one of 'table', 'json'" in fmt.stderr
    assert result_count(protocol) == before


# --- history ---------------------------------------------------------------------------------


def test_jmp_result_history(protocol: JumpStarterProtocol) -> None:
    ids = [
        record(protocol, name, {"t": outcome, "steady": "passed"})
        for name, outcome in [
            ("nightly", "passed"),
            ("nightly", "failed"),
            ("weekly", "passed"),
            ("nightly", "passed"),
        ]
    ]
    result = CliRunner().invoke(cli, ["result", "history", "t", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert (data["name"], data["flaky"], data["changes"]) == ("t", True, 2)
    assert [(r["session"]["id"], r["session"]["name"], r["outcome"]) for r in data["runs"]] == [
        (ids[3], "nightly", "passed"),
        (ids[2], "weekly", "passed"),
        (ids[1], "nightly", "failed"),
        (ids[0], "nightly", "passed"),
    ]
    assert data["runs"][2]["message"] == "t went wrong\nsecond line"

    done = run_jmp("result", "history", "t")
    assert done.returncode == 0
    lines = [re.sub(r" +", " ", line) for line in done.stdout.splitlines()]
    assert lines[0] == "WHEN SESSION OUTCOME DURATION MESSAGE"
    assert [line.split(" ")[2:5] for line in lines[1:5]] == [
        ["nightly", "passed", "1s"],
        ["weekly", "passed", "1s"],
        ["nightly", "failed", "1s"],
        ["nightly", "passed", "1s"],
    ]
    assert lines[3].endswith("t went wrong")
    assert lines[5:] == [
        "4 runs: 3 passed, 1 failed; duration 1s to 1s",
        "flaky: it failed in some of these runs and passed in others (the outcome changed 2 times)",
    ]
    steady = run_jmp("result", "history", "steady", "--session", "night*", "--limit", "2")
    assert steady.returncode == 0
    assert steady.stdout.splitlines()[-1] == "2 runs: 2 passed; duration 1s to 1s"
    assert "flaky" not in steady.stdout


def test_jmp_result_history_bad_input(protocol: JumpStarterProtocol) -> None:
    record(protocol, "nightly", {"t": "passed"})
    before = result_count(protocol)
    cases = [
        (["nope"], 3, "jmp: error: no results named 'nope'\n"),
        (["t", "--session", "weekly"], 3, "jmp: error: no session named 'weekly'\n"),
        (["t", "--session", "night"], 3, "jmp: error: no session named 'night'\n"),
        (
            ["nope", "--session", "nightly"],
            3,
            "jmp: error: no results named 'nope' in sessions matching 'nightly'\n",
        ),
    ]
    for args, code, message in cases:
        runner = CliRunner().invoke(cli, ["result", "history", *args])
        assert (runner.exit_code, runner.output) == (code, message)
        done = run_jmp("result", "history", *args)
        assert (done.returncode, done.stdout, done.stderr) == (code, "", message)
    bad_limit = run_jmp("result", "history", "t", "--limit", "0")
    assert bad_limit.returncode == 2 and "0 is not in the range 1<=x<=10000" in bad_limit.stderr
    long = run_jmp("result", "history", "n" * 5000)  # names have no length limit
    assert (long.returncode, long.stderr) == (3, f"jmp: error: no results named {'n' * 5000!r}\n")
    empty = run_jmp("result", "history", "")
    assert empty.returncode == 2
    assert "Invalid value for 'NAME': a result name must not be empty" in empty.stderr
    assert result_count(protocol) == before


def test_flaky_and_pass_rate() -> None:
    P, F, E, S = Outcome.PASSED, Outcome.FAILED, Outcome.ERROR, Outcome.SKIPPED
    assert (
        is_flaky([P, F]) and is_flaky([E, P]) and not is_flaky([P, P, S]) and not is_flaky([F, E])
    )
    assert outcome_changes([P, F, E, P, P, F]) == 3
    assert pass_rate(ResultSummary(total=10, outcomes={P: 6, F: 1, E: 1, S: 2})) == 0.75
    assert pass_rate(ResultSummary(total=2, outcomes={S: 2})) is None


# --- the store, on both backends -------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    s = open_store(store_url(request.param, tmp_path, request))
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def _session(store: Store, session_id: str, name: str, outcomes: list[str]) -> None:
    await store.add_session(session_id, name, "test")
    task = TaskInfo(
        id=f"t-{session_id}",
        node="n1",
        session_id=session_id,
        spec=TaskSpec(argv=["x"]),
        state=TaskState.PENDING,
        created_at=datetime.now(UTC),
    )
    await store.create_task(task)
    if outcomes:
        await store.add_results(
            task, [ResultSpec(name="case", outcome=o, duration=2.0) for o in outcomes]
        )
    await anyio.sleep(0.002)  # distinct creation times


@pytest.mark.anyio
async def test_store_sessions_and_history(store: Store) -> None:
    await _session(store, "s1", "nightly", ["passed"])
    await _session(store, "s2", "nightly", ["failed", "passed"])
    await _session(store, "s3", "nightly", [])
    await _session(store, "s4", "weekly[1]", ["error"])

    listed = await store.list_sessions()
    assert [s.id for s in listed] == ["s4", "s2", "s1"]  # newest first, with results only
    assert listed[1].summary == ResultSummary(
        total=2, outcomes={"failed": 1, "passed": 1}, duration=4.0
    )
    assert [s.id for s in await store.list_sessions(with_results=False)] == ["s4", "s3", "s2", "s1"]
    assert [
        s.id for s in await store.list_sessions(name="nightly", with_results=False, limit=2)
    ] == ["s3", "s2"]
    assert [s.id for s in await store.list_sessions(name="s1")] == ["s1"]
    assert [s.id for s in await store.list_sessions(name="*ly")] == ["s2", "s1"]
    assert [s.id for s in await store.list_sessions(name="weekly[[]1]")] == ["s4"]
    assert await store.list_sessions(name="nope") == []
    assert (await store.list_sessions(name="nightly", with_results=False))[
        0
    ].summary == ResultSummary()

    history = await store.history("case")
    assert [(r.session_id, r.outcome.value) for r in history.results] == [
        ("s4", "error"),
        ("s2", "passed"),
        ("s2", "failed"),
        ("s1", "passed"),
    ]
    assert history.session_names == {"s1": "nightly", "s2": "nightly", "s4": "weekly[1]"}
    limited = await store.history("case", session="night*", limit=2)
    assert [r.session_id for r in limited.results] == ["s2", "s2"]
    assert (await store.history("nope")).results == []
    with pytest.raises(NotFound, match=r"^no session named 'monthly'$"):
        await store.history("case", session="monthly")


# --- query plans: no full scan of results --------------------------------------------------------


@pytest.mark.anyio
async def test_result_names_of_any_length_on_both_backends(store: Store) -> None:
    """A 20,000-character name (random, so a compressed index entry cannot hold it)
    is stored whole and found again by its exact name."""
    import secrets

    long = "tests/test_x.py::test_p[" + secrets.token_hex(10_000) + "]"
    await store.add_session("s1", "nightly", "test")
    task = TaskInfo(id="t1", node="n1", session_id="s1", spec=TaskSpec(argv=["x"]),
                    state=TaskState.PENDING, created_at=datetime.now(UTC))
    await store.create_task(task)
    await store.add_results(task, [ResultSpec(name=long, outcome="failed"),
                                   ResultSpec(name=long[:-1] + "!", outcome="passed")])
    history = await store.history(long, limit=10)
    assert [(r.name, r.outcome.value) for r in history.results] == [(long, "failed")]


@pytest.mark.anyio
async def test_the_failures_of_a_task_and_a_history_use_indexes(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "plans.db")
    await store.open()
    try:
        for n in range(20):
            await _session(store, f"s{n}", "nightly", [])
            task = await store.get_task(f"t-s{n}")
            await store.add_results(
                task,
                [
                    ResultSpec(name=f"case{i}", outcome="failed" if i % 7 == 0 else "passed")
                    for i in range(300)
                ],
            )
        store.db.execute("ANALYZE")  # plans as a store that has lived a while would choose them
        statements: list[str] = []
        store.db.set_trace_callback(statements.append)
        data = await store.query_results(QueryResults(task_id="t-s3", outcomes=["failed"]))
        history = await store.history("case7", limit=5)
        await store.history("case7", session="night*", limit=5)
        store.db.set_trace_callback(None)
        assert (data.summary.total, len(history.results)) == (43, 5)
        plans = {}
        for sql in statements:
            if "FROM results" in sql:
                plans[sql] = [row[3] for row in store.db.execute("EXPLAIN QUERY PLAN " + sql)]
        assert len(plans) == 4  # the page, its summary, and two histories
        for sql, plan in plans.items():
            on_results = [step for step in plan if re.search(r"\bresults\b", step)]
            assert on_results and all("USING" in step and "INDEX" in step for step in on_results), (
                sql,
                plan,
            )
            assert not any(step.startswith("SCAN results") for step in plan), (sql, plan)
            assert "USE TEMP B-TREE" not in " ".join(plan), (sql, plan)  # already in order
    finally:
        await store.aclose()


def test_unknown_sessions_leave_the_store_as_it_was(
    protocol: JumpStarterProtocol, data_dir: Path
) -> None:
    record(protocol, "nightly", {"t": "passed"})
    db = data_dir / "jumpstarter.db"

    def snapshot() -> list:
        with sqlite3.connect(db) as conn:
            return [
                conn.execute(f"SELECT count(*) FROM {t}").fetchone() for t in ("results", "tasks")
            ]

    before = snapshot()
    assert run_jmp("result", "diff", "nope", "nightly").returncode == 3
    assert run_jmp("result", "history", "nope").returncode == 3
    assert snapshot() == before


def test_a_session_name_means_the_same_in_query_and_diff(protocol: JumpStarterProtocol) -> None:
    older = record(protocol, "S", {"boot": "passed", "old-only": "passed"})
    newer = record(protocol, "S", {"boot": "failed"})
    runner = CliRunner()

    def names(*args: str) -> list[tuple[str, str]]:
        done = runner.invoke(cli, ["result", "query", *args, "-o", "json"])
        assert done.exit_code == 0, done.output
        return [(r["session_id"], r["name"]) for r in json.loads(done.stdout)["results"]]

    assert names("--session", "S") == [(newer, "boot")]  # the newest, not both
    assert names("--session", "S~1") == [(older, "boot"), (older, "old-only")]
    assert names("--session", older) == names("--session", "S~1")
    assert sorted(names("--session", "S", "--all")) == sorted(
        [(older, "boot"), (older, "old-only"), (newer, "boot")]
    )
    diff = json.loads(runner.invoke(cli, ["result", "diff", "S~1", "S", "-o", "json"]).stdout)
    assert (diff["a"]["id"], diff["b"]["id"]) == (older, newer)
    done = run_jmp("result", "query", "--session", "S~2")
    assert (done.returncode, done.stderr) == (
        3, "jmp: error: no session 'S~2': only 2 sessions are named 'S'\n"
    )
    done = run_jmp("result", "query", "--all")
    assert (done.returncode, done.stderr) == (
        2, "jmp: error: --all needs --session NAME (try 'jmp result query --help')\n"
    )
