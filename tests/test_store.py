"""The store contract, run against every backend (SQLite, PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest
from click.testing import CliRunner
from jumpstarter.cli import cli
from jumpstarter.errors import BadRequest, Conflict, NotFound, TooLarge
from jumpstarter.store import RepeatedBatch, Store, open_store
from jumpstarter_protocol import Outcome, QueryResults, ResultSpec, TaskInfo, TaskSpec, TaskState

from stores import postgres_url, store_url  # noqa: F401  (fixture)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    s = open_store(store_url(request.param, tmp_path, request))
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


def _task(task_id: str, session: str = "s1", node: str = "n1") -> TaskInfo:
    return TaskInfo(
        id=task_id,
        node=node,
        session_id=session,
        spec=TaskSpec(argv=["true"]),
        state=TaskState.PENDING,
        created_at=datetime.now(UTC),
    )


async def test_task_states_only_move_forward(store: Store) -> None:
    await store.add_session("s1", "nightly", "test")
    await store.add_session("s1", "renamed?", "test")  # same id: nothing changes
    await store.create_task(_task("t1"))
    running = await store.mark_running("t1", 123, "host:1")
    assert running.state is TaskState.RUNNING and running.started_at is not None
    done = await store.finish_task("t1", TaskState.SUCCEEDED, 0)
    assert (done.state, done.exit_code) == (TaskState.SUCCEEDED, 0)
    again = await store.finish_task("t1", TaskState.LOST, None, "late")
    assert (again.state, again.message) == (TaskState.SUCCEEDED, None)
    assert (await store.mark_running("t1", 1, "x")).state is TaskState.SUCCEEDED
    with pytest.raises(NotFound, match="^no task with id 'nope'$"):
        await store.get_task("nope")
    assert [t.id for t in await store.list_tasks(session="nightly")] == ["t1"]
    assert await store.list_tasks(session="nightly", states=[TaskState.RUNNING]) == []


async def test_running_tasks_and_pending_delete(store: Store) -> None:
    await store.add_session("s1", "x", "test")
    for task_id in ("a", "b"):
        await store.create_task(_task(task_id))
    await store.mark_running("a", 1, "host:42")
    assert [(t.id, agent) for t, agent in await store.running_tasks("n1")] == [("a", "host:42")]
    await store.delete_pending_task("a")  # running: stays
    await store.delete_pending_task("b")
    assert sorted(t.id for t in await store.list_tasks()) == ["a"]


async def test_starting_tasks_are_the_pending_ones_a_start_created(store: Store) -> None:
    await store.add_session("s1", "x", "test")
    await store.create_task(_task("made"))  # NewTask: no agent
    await store.create_task(_task("starting"), "host:7")
    await store.create_task(_task("started"), "host:8")
    await store.mark_running("started", 99, "host:8")
    await store.create_task(_task("elsewhere", node="n2"), "host:9")
    assert [(t.id, agent) for t, agent in await store.starting_tasks("n1")] == [("starting", "host:7")]


async def test_results_batches_query_filters_and_paging(store: Store) -> None:
    await store.add_session("s1", "nightly", "test")
    await store.add_session("s2", "weekly", "test")
    t1, t2 = _task("t1"), _task("t2", session="s2", node="n2")
    await store.create_task(t1)
    await store.create_task(t2)
    specs = [
        ResultSpec(name=f"suite/case{i}", outcome=Outcome.FAILED if i % 3 == 0 else Outcome.PASSED,
                   duration=0.5, labels={"board": "rpi4" if i % 2 else "x86"})
        for i in range(10)
    ]
    stored = await store.add_results(t1, specs)
    assert [r.id for r in stored] == sorted(r.id for r in stored)
    await store.add_results(t2, [ResultSpec(name="other/one", outcome=Outcome.SKIPPED, metrics={"t": {"value": 1, "unit": "s"}})])

    everything = await store.query_results(QueryResults())
    assert everything.summary.total == 11
    failed = await store.query_results(QueryResults(task_id="t1", outcomes=[Outcome.FAILED]))
    assert [r.name for r in failed.results] == ["suite/case0", "suite/case3", "suite/case6", "suite/case9"]
    assert failed.summary.outcomes == {Outcome.FAILED: 4} and failed.summary.duration == pytest.approx(2.0)
    assert (await store.query_results(QueryResults(session="weekly"))).results[0].metrics["t"].unit == "s"
    assert (await store.query_results(QueryResults(node="n2"))).summary.total == 1
    assert (await store.query_results(QueryResults(name="suite/case[12]"))).summary.total == 2
    assert (await store.query_results(QueryResults(name="*one"))).summary.total == 1
    assert (await store.query_results(QueryResults(name="suite/case?"))).summary.total == 10
    assert (await store.query_results(QueryResults(labels={"board": "rpi4"}))).summary.total == 5
    future = datetime.now(UTC) + timedelta(hours=1)
    assert (await store.query_results(QueryResults(since=future))).summary.total == 0
    assert (await store.query_results(QueryResults(until=future))).summary.total == 11

    names, cursor = [], None
    while True:
        page = await store.query_results(QueryResults(task_id="t1", limit=3, cursor=cursor))
        assert page.summary.total == 10  # the summary covers every match, not the page
        names += [r.name for r in page.results]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert names == [f"suite/case{i}" for i in range(10)]
    for bad in ("10" * 15, "-1"):  # past any id (10^30 once overflowed SQLite), negative
        with pytest.raises(BadRequest, match=f"^invalid cursor '{bad}': use the next_cursor of a page$"):
            await store.query_results(QueryResults(cursor=bad))
    with pytest.raises(BadRequest, match="^invalid cursor 'x': use the next_cursor of a page$"):
        await store.query_results(QueryResults(cursor="x"))
    with pytest.raises(NotFound, match="^no session named 'monthly'$"):
        await store.query_results(QueryResults(session="monthly"))


async def test_an_unknown_session_is_not_found_not_empty(store: Store) -> None:
    await store.add_session("s1", "nightly", "test")
    await store.add_session("s2", "idle", "test")
    await store.create_task(_task("t1"))
    for call in (
        lambda: store.list_tasks(session="nosuch"),
        lambda: store.list_tasks(session="nosuch", states=[TaskState.PENDING], node="n1"),
        lambda: store.query_results(QueryResults(session="nosuch")),
    ):
        with pytest.raises(NotFound, match="^no session named 'nosuch'$"):
            await call()
    assert await store.list_tasks(session="idle") == []  # known, without tasks: empty
    assert [t.id for t in await store.list_tasks(session="s1")] == ["t1"]  # by id too


def test_task_list_of_an_unknown_session_exits_3(data_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["task", "list", "--session", "nosuch"])
    assert (result.exit_code, result.stdout, result.stderr) == (
        3,
        "",
        "jmp: error: no session named 'nosuch'\n",
    )


async def test_a_failed_batch_adds_nothing(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.add_results(_task("ghost"), [ResultSpec(name="a", outcome=Outcome.PASSED)])
    assert (await store.query_results(QueryResults())).summary.total == 0


async def test_two_stores_opening_at_once_migrate_once(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    for kind in ("sqlite", "postgres"):
        url = store_url(kind, tmp_path, request)
        stores = [open_store(url) for _ in range(4)]
        async with anyio.create_task_group() as tg:
            for s in stores:
                tg.start_soon(s.open)
        await stores[0].add_session("s", "n", "c")
        for s in stores:
            await s.aclose()


@pytest.mark.anyio
async def test_a_new_sqlite_store_opened_by_many_at_once_opens_for_all(tmp_path: Path) -> None:
    # Whoever loses the race to switch a new file to WAL mode is told "database is
    # locked" at once by SQLite, busy timeout or not; it must wait its turn instead.
    # (A round failed about one time in twelve before: forty rounds make that sure.)
    for round_ in range(40):
        stores = [open_store(str(tmp_path / f"{round_}.db")) for _ in range(4)]
        try:
            async with anyio.create_task_group() as tg:
                for s in stores:
                    tg.start_soon(s.open)
        finally:
            for s in stores:
                await s.aclose()


async def test_a_batch_sent_again_is_stored_once(store: Store) -> None:
    await store.add_session("s1", "nightly", "test")
    t1, t2 = _task("t1"), _task("t2")
    await store.create_task(t1)
    await store.create_task(t2)
    batch = [ResultSpec(name=f"case/{i}", outcome=Outcome.PASSED) for i in range(3)]
    first = await store.add_result_ids(t1, batch, "batch-1")
    await store.add_results(t2, batch[:1])  # between: ids of the next batch move on
    with pytest.raises(RepeatedBatch) as repeated:
        await store.add_result_ids(t1, batch, "batch-1")
    assert repeated.value.ids == first
    with pytest.raises(RepeatedBatch) as repeated:
        await store.add_results(t1, batch, "batch-1")
    assert repeated.value.ids == first
    with pytest.raises(Conflict, match="^result batch 'batch-1' was stored for task 't1', not 't2'$"):
        await store.add_results(t2, batch, "batch-1")
    other = await store.add_result_ids(t1, batch, "batch-2")
    assert len(set(first + other)) == 6
    assert (await store.query_results(QueryResults(task_id="t1"))).summary.total == 6


async def test_one_batch_sent_twice_at_once_is_stored_once(store: Store) -> None:
    await store.add_session("s1", "nightly", "test")
    await store.create_task(_task("t1"))
    batch = [ResultSpec(name=f"case/{i}", outcome=Outcome.PASSED) for i in range(500)]
    answers: list[list[int]] = []

    async def send() -> None:
        try:
            answers.append(await store.add_result_ids(_task("t1"), batch, "same"))
        except RepeatedBatch as repeated:
            answers.append(repeated.ids)

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(send)
    assert len(answers) == 4 and all(a == answers[0] for a in answers)
    assert (await store.query_results(QueryResults(task_id="t1"))).summary.total == 500


async def test_a_task_list_is_cut_to_what_fits_in_a_reply(store: Store) -> None:
    await store.add_session("s1", "nightly", "test")
    for i in range(10):  # tasks with big specs: some 60 kB of JSON each
        task = _task(f"t{i}")
        await store.create_task(task.model_copy(update={"spec": TaskSpec(argv=["echo", "x" * 10_000])}))
    listed = await store.list_tasks(max_bytes=200_000)
    assert 1 <= len(listed) < 10 and listed.truncated
    assert sum(len(t.model_dump_json()) for t in listed) <= 200_000
    assert [t.id for t in listed] == [t.id for t in await store.list_tasks()][: len(listed)]  # the newest
    everything = await store.list_tasks(max_bytes=10_000_000)
    assert len(everything) == 10 and not everything.truncated


async def test_a_page_is_cut_by_bytes_as_well_as_by_count(store: Store) -> None:
    await store.add_session("s1", "nightly", "test")
    task = _task("t1")
    await store.create_task(task)
    # 10 results of some 10 kB each (control characters count 6 bytes a character).
    await store.add_results(task, [
        ResultSpec(name=f"big/{i}", outcome=Outcome.FAILED, message=("x" * 9000) + "\x01" * 200)
        for i in range(10)
    ])
    names, cursor, pages = [], None, 0
    while True:
        page = await store.query_results(QueryResults(task_id="t1", cursor=cursor), max_bytes=40_000)
        assert sum(len(r.model_dump_json()) for r in page.results) <= 40_000
        assert page.summary.total == 10
        names += [r.name for r in page.results]
        pages += 1
        if (cursor := page.next_cursor) is None:
            break
    assert names == [f"big/{i}" for i in range(10)] and pages >= 3
    with pytest.raises(TooLarge, match=r"^result \d+ alone is larger than a reply may be \(5000 bytes\); "
                                       "query with a narrower filter$"):
        await store.query_results(QueryResults(task_id="t1"), max_bytes=5000)


async def test_history_leaves_out_older_runs_that_would_not_fit(store: Store) -> None:
    await store.add_session("s1", "nightly", "test")
    task = _task("t1")
    await store.create_task(task)
    for i in range(6):
        await store.add_results(task, [ResultSpec(name="boot", outcome=Outcome.PASSED, message=f"{i}" * 9000)])
    whole = await store.history("boot", limit=10, max_bytes=10**6)
    assert len(whole.results) == 6 and not whole.truncated
    assert whole.session_names == {"s1": "nightly"}
    cut = await store.history("boot", limit=10, max_bytes=30_000)
    assert cut.truncated and 1 <= len(cut.results) < 6
    assert [r.message[0] for r in cut.results] == ["5", "4", "3"][: len(cut.results)]  # the newest
    assert not (await store.history("boot", limit=2, max_bytes=10**6)).truncated
# --- files: artifacts ------------------------------------------------------------------


async def test_artifacts_are_kept_per_task_in_order(store: Store) -> None:
    from jumpstarter_protocol import ArtifactInfo

    await store.add_session("s1", "x", "test")
    await store.create_task(_task("t1"))
    await store.create_task(_task("t2"))
    assert await store.list_artifacts("t1") == []
    first = [ArtifactInfo(path="/w/junit.xml", size=3 * 1024**3, sha256="a" * 64),
             ArtifactInfo(path="/w/logs/a.txt", size=0, sha256="b" * 64)]
    await store.add_artifacts("t1", first)
    await store.add_artifacts("t2", [ArtifactInfo(path="/w/other", size=1, sha256="c" * 64)])
    await store.add_artifacts("t1", [ArtifactInfo(path="/w/late", size=2, sha256="d" * 64)])
    kept = await store.list_artifacts("t1")
    assert [(a.path, a.size, a.sha256) for a in kept] == [
        ("/w/junit.xml", 3 * 1024**3, "a" * 64), ("/w/logs/a.txt", 0, "b" * 64), ("/w/late", 2, "d" * 64)]
    assert all(a.created_at is not None for a in kept)
