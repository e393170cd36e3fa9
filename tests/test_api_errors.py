"""The Python API refuses a bad argument with one ``BadRequest`` line naming the field,
never pydantic's ``ValidationError``, through the sync and the async API alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from jumpstarter.errors import BadRequest
from jumpstarter.protocol import JumpStarterProtocol

OUTCOMES = "Input should be 'passed', 'failed', 'skipped', 'error', 'xfail' or 'xpass'"

# (session, node, task) -> the call; the sync and the async API have the same names,
# so one table serves both (the async calls return a coroutine to await).
Call = Callable[[Any, Any, Any], Any]
CASES: list[tuple[str, Call, str]] = [
    ("query outcomes", lambda s, n, t: s.query_results(outcomes=["bogus"]), f"invalid outcomes.0: {OUTCOMES}"),
    (
        "query since",
        lambda s, n, t: s.query_results(since="1h"),
        "invalid since: Input should be a valid datetime or date, input is too short",
    ),
    ("query unknown filter", lambda s, n, t: s.query_results(bogus=1), "unknown field 'bogus'"),
    ("start empty argv", lambda s, n, t: n.start([]), "argv must not be empty"),
    (
        "start negative timeout",
        lambda s, n, t: n.start(["x"], timeout=-1),
        "invalid timeout: Input should be greater than 0",
    ),
    (
        "add_result outcome",
        lambda s, n, t: s.add_result(t.id, name="a", outcome="nope"),
        f"invalid outcome: {OUTCOMES}",
    ),
    (
        "add_results outcome",
        lambda s, n, t: s.add_results(t.id, [{"name": "a", "outcome": "passed"}, {"name": "b", "outcome": "no"}]),
        f"invalid outcome: {OUTCOMES}",
    ),
    (
        "new_task env value",
        lambda s, n, t: n.new_task(["x"], env={"A": 1}),
        "invalid env.A: Input should be a valid string",
    ),
    ("new_task unknown field", lambda s, n, t: n.new_task(["x"], colour="red"), "unknown field 'colour'"),
    (
        "list_tasks state",
        lambda s, n, t: n.list_tasks(states=["done"]),
        "invalid states.0: Input should be 'pending', 'running', 'succeeded', 'failed', 'stopped', "
        "'timed_out' or 'lost'",
    ),
    (
        "stop grace",
        lambda s, n, t: t.stop(grace=-1),
        "invalid grace: Input should be greater than or equal to 0",
    ),
    (
        "wait timeout",
        lambda s, n, t: t.wait(float("inf")),
        "invalid timeout: Input should be a finite number",
    ),
]
IDS = [name for name, _, _ in CASES]


def check(caught: pytest.ExceptionInfo[BadRequest], expected: str) -> None:
    assert str(caught.value) == expected
    assert caught.value.code.value == "bad_request"
    # Nothing of pydantic's multi-line report hangs off it.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize(("call", "expected"), [case[1:] for case in CASES], ids=IDS)
def test_the_sync_api_raises_bad_request(protocol: JumpStarterProtocol, call: Call, expected: str) -> None:
    with protocol.create_session("api-errors") as session:
        node = session.connect("local")
        task = node.new_task(["true"])  # pending: nothing runs
        with pytest.raises(BadRequest) as caught:
            call(session, node, task)
        check(caught, expected)
        assert [info.id for info in node.list_tasks(session=session.name)] == [task.id]  # nothing more


@pytest.mark.anyio
@pytest.mark.parametrize(("call", "expected"), [case[1:] for case in CASES], ids=IDS)
async def test_the_async_api_raises_bad_request(protocol: JumpStarterProtocol, call: Call, expected: str) -> None:
    async with protocol.create_async_session("api-errors") as session:
        node = await session.connect("local")
        task = await node.new_task(["true"])
        with pytest.raises(BadRequest) as caught:
            await call(session, node, task)
        check(caught, expected)
        assert [info.id for info in await node.list_tasks(session=session.name)] == [task.id]


def test_a_bad_lease_duration_leaves_no_connection_behind(protocol: JumpStarterProtocol) -> None:
    with protocol.create_session("api-errors") as session:
        with pytest.raises(BadRequest) as caught:
            session.connect("local", duration=-1)
        check(caught, "invalid duration: Input should be greater than 0")
        assert session.aio.nodes == []
        session.connect("local")  # the node was not leased by the failed attempt
