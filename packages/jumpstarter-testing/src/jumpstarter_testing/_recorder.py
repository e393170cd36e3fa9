"""The recorder behind ``pytest --jmp-session``: imported only when asked for."""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from jumpstarter.errors import JumpstarterError
from jumpstarter.results.junit import trim_message
from jumpstarter_protocol import (
    Attempt,
    CloseTask,
    OpenTask,
    Outcome,
    ResultSpec,
    TaskSpec,
    TaskState,
)

MAX_MESSAGE = 4000
"""Longest failure message kept, in characters: the start and the end of a traceback."""
BATCH = 200
"""Results sent at once at most; a full batch goes out at once."""
INTERVAL = 1.0
"""Seconds a result waits at most before it is sent."""


class Recorder:
    """Records a pytest run as a task and its tests as results of that task."""

    def __init__(self, config: pytest.Config, session_name: str, node_name: str | None) -> None:
        self.config = config
        self.session_name = session_name
        self.node_name = node_name
        self.session: Any = None
        self.node: Any = None
        self.task_id: str | None = None
        self.sender: Sender | None = None
        self.close_error: Exception | None = None
        self.enclosing_task: str | None = None  # the jmp task this pytest runs as, if any
        self._reports: dict[str, list[pytest.TestReport]] = {}
        self._attempts: dict[str, list[Attempt]] = {}  # failed runs before a rerun
        self._collected: set[str] = set()  # collection errors and skips recorded
        self._rerun_teardown: dict[str, bool] = {}  # a rerun's teardown report is due

    # --- life ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the session, connect to the node, open the task; a Jumpstarter error
        becomes a :class:`pytest.UsageError`."""
        from jumpstarter.protocol import JumpStarterProtocol

        params = self.config.invocation_params
        spec = TaskSpec(argv=["pytest", *params.args], cwd=str(params.dir), name="pytest")
        try:
            protocol = JumpStarterProtocol()
            enclosing = protocol.enclosing
            if enclosing is not None and enclosing.session == self.session_name and self.node_name in (
                None,
                enclosing.node,
            ):
                # Run as a task of that session (jmp run --session S -- pytest --jmp-session S):
                # record into that task, through the node that runs it.
                self.enclosing_task = enclosing.task_id
                self.node_name = enclosing.node
            session = protocol.create_session(self.session_name)
            session.__enter__()
            try:
                self.node = session.connect(self.node_name, lease=False)  # recording needs no lease
                if self.enclosing_task is not None:
                    self.task_id = self.enclosing_task
                else:
                    self.task_id = self.node.request(OpenTask(spec=spec)).task.id
            except BaseException:
                session.__exit__(None, None, None)
                raise
        except JumpstarterError as exc:
            raise pytest.UsageError(f"jumpstarter: {exc}") from None
        self.session = session
        assert self.task_id is not None
        task_id = self.task_id
        self.sender = Sender(
            lambda batch, batch_id: self.node.add_results(task_id, batch, batch_id=batch_id)
        )
        self.sender.start()

    def close(self) -> None:
        """Leave the session (at pytest's very end): releases what the fixtures hold."""
        if self.sender is not None and self.sender.is_alive():
            self.sender.close()  # pytest never reached sessionfinish
        if self.session is not None:
            session, self.session = self.session, None
            session.__exit__(None, None, None)

    # --- pytest hooks -------------------------------------------------------------------

    def pytest_report_header(self) -> str:
        return (
            f"jumpstarter: recording in session {self.session_name!r} on node "
            f"{self.node.name!r} as task {self.task_id}"
        )

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid
        if self._rerun_teardown.pop(nodeid, False) and report.when == "teardown":
            return  # the teardown of a run that failed and runs again: part of it
        reports = self._reports.setdefault(nodeid, [])
        reports.append(report)
        if report.outcome == "rerun":
            # pytest-rerunfailures: this run failed and the test runs again; the
            # run's reports end at the one it failed in (its teardown may follow).
            self._attempts.setdefault(nodeid, []).append(attempt_of(reports))
            self._reports[nodeid] = []
            self._rerun_teardown[nodeid] = report.when != "teardown"
        elif report.when == "teardown":  # always the last phase of a test
            del self._reports[nodeid]
            assert self.sender is not None
            attempts = self._attempts.pop(nodeid, [])
            self.sender.add(result_of(nodeid, reports, attempts))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        # As pytest's own JUnit report: a module that cannot be collected is an error,
        # one skipped as a whole a skip; once, however many collectors report it
        # (--doctest-modules collects a module twice, each xdist worker once more).
        if (report.failed or report.skipped) and report.nodeid not in self._collected:
            self._collected.add(report.nodeid)
            outcome = Outcome.ERROR if report.failed else Outcome.SKIPPED
            text = (
                _skip_reason(report)
                if report.skipped
                else "error in collection: " + report.longreprtext
            )
            assert self.sender is not None
            self.sender.add(
                ResultSpec(
                    name=report.nodeid or "<collection>",
                    outcome=outcome,
                    message=trim_message(text, MAX_MESSAGE) or None,
                )
            )

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        assert self.sender is not None and self.task_id is not None
        self.sender.close()
        code = int(exitstatus)
        state = {0: TaskState.SUCCEEDED, 2: TaskState.STOPPED}.get(code, TaskState.FAILED)
        try:
            name = pytest.ExitCode(code).name.lower().replace("_", " ")
        except ValueError:
            name = f"exit status {code}"
        try:
            if self.enclosing_task is None:  # an enclosing task ends when pytest exits
                self.node.request(
                    CloseTask(
                        task_id=self.task_id, state=state, exit_code=code, message=f"pytest: {name}"
                    )
                )
        except JumpstarterError as exc:
            self.close_error = exc
        if self.sender.pending or self.close_error is not None:
            # The run asked for its results to be kept and some were not: CI must see it.
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        assert self.sender is not None
        tr = terminalreporter
        tr.write_sep("-", "jumpstarter")
        count = self.sender.sent
        tr.write_line(
            f"{count} result{'' if count == 1 else 's'} recorded in session {self.session_name!r} "
            f"on node {self.node.name!r} (task {self.task_id})"
        )
        if self.sender.pending:
            tr.write_line(
                f"jumpstarter: {self.sender.pending} results could not be recorded: {self.sender.error}",
                red=True,
            )
        if self.close_error is not None:
            tr.write_line(
                f"jumpstarter: the task could not be closed: {self.close_error}", red=True
            )


class Sender(threading.Thread):
    """Sends results in batches: when ``BATCH`` are waiting, or ``INTERVAL`` seconds
    after the first of them, from a thread of its own, so a test that hangs does not
    hold back the results before it. A failed batch is kept and tried again with the
    id it was first sent with: if it was stored and only the reply was lost, the store
    answers with the ids it gave it, and nothing is stored twice."""

    def __init__(self, send: Callable[[list[ResultSpec], str], object]) -> None:
        super().__init__(name="jumpstarter-results", daemon=True)
        self._send = send
        self._waiting: list[ResultSpec] = []
        self._failed: tuple[list[ResultSpec], str] | None = None  # sent, not acknowledged
        self._lock = threading.Lock()  # guards _waiting
        self._sending = threading.Lock()  # one batch at a time, in order
        self._wake = threading.Event()
        self._closing = False
        self.sent = 0
        self.error: Exception | None = None

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._waiting) + (len(self._failed[0]) if self._failed else 0)

    def add(self, result: ResultSpec) -> None:
        with self._lock:
            self._waiting.append(result)
            full = len(self._waiting) >= BATCH
        if full:
            self._wake.set()

    def run(self) -> None:
        while not self._closing:
            self._wake.wait(INTERVAL)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        with self._sending:
            while True:
                with self._lock:
                    if self._failed is not None:
                        (batch, batch_id), self._failed = self._failed, None
                    else:
                        batch, self._waiting = self._waiting[:BATCH], self._waiting[BATCH:]
                        batch_id = secrets.token_hex(16)
                if not batch:
                    return
                try:
                    self._send(batch, batch_id)
                except Exception as exc:  # the node went away: keep them, try again later
                    with self._lock:
                        self._failed = (batch, batch_id)
                    self.error = exc
                    return
                self.sent += len(batch)
                self.error = None

    def close(self) -> None:
        """Stop the thread and send what waits."""
        self._closing = True
        self._wake.set()
        if self.is_alive():
            self.join()
        self.flush()


# --- what a test's reports say ------------------------------------------------------------


def attempt_of(reports: Sequence[pytest.TestReport]) -> Attempt:
    """One failed run of a test that runs again, from its reports up to the failing
    one (pytest-rerunfailures marks that one ``rerun``)."""
    failing = reports[-1]
    outcome = Outcome.FAILED if failing.when == "call" else Outcome.ERROR
    return Attempt(
        outcome=outcome,
        duration=sum(r.duration for r in reports),
        message=trim_message(_failure(failing), MAX_MESSAGE) or None,
        started_at=_time(getattr(reports[0], "start", None)),
    )


def result_of(
    nodeid: str, reports: Sequence[pytest.TestReport], attempts: Sequence[Attempt] = ()
) -> ResultSpec:
    """One result from the reports of a test's phases (setup, call, teardown) and the
    failed runs before them, if it was rerun."""
    phases = {r.when: r for r in reports}
    setup, call, teardown = phases.get("setup"), phases.get("call"), phases.get("teardown")
    outcome, message = Outcome.PASSED, None
    if setup is not None and setup.failed:
        outcome, message = Outcome.ERROR, "error in setup: " + _failure(setup)
    elif setup is not None and setup.skipped:
        if hasattr(setup, "wasxfail"):  # xfail(run=False)
            outcome, message = Outcome.XFAIL, setup.wasxfail or None
        else:
            outcome, message = Outcome.SKIPPED, _skip_reason(setup)
    elif call is not None:
        if hasattr(call, "wasxfail"):
            outcome = Outcome.XFAIL if call.skipped else Outcome.XPASS
            message = call.wasxfail or None
        elif call.failed:  # a strict xpass fails too: "[XPASS(strict)] reason"
            outcome, message = Outcome.FAILED, _failure(call)
        elif call.skipped:
            outcome, message = Outcome.SKIPPED, _skip_reason(call)
    if teardown is not None and teardown.failed:
        text = "error in teardown: " + _failure(teardown)
        if outcome is Outcome.FAILED:
            message = f"{message}\n\n{text}"
        else:
            outcome, message = Outcome.ERROR, text
    first, last = reports[0], reports[-1]
    message = trim_message(message, MAX_MESSAGE) or None
    duration = sum(r.duration for r in reports)
    runs: list[Attempt] = []
    if attempts:
        final = Attempt(
            outcome=outcome,
            duration=duration,
            message=message,
            started_at=_time(getattr(first, "start", None)),
        )
        runs = [*attempts, final]
    failing = (Outcome.FAILED, Outcome.ERROR)
    labels, metrics = _properties(getattr(last, "user_properties", ()))
    return ResultSpec(
        name=nodeid,  # whole, however long: a cut id would merge two tests into one
        outcome=outcome,
        duration=sum(a.duration or 0.0 for a in runs) if runs else duration,
        message=message,
        labels=labels,
        metrics=metrics,  # type: ignore[arg-type]
        started_at=runs[0].started_at if runs else _time(getattr(first, "start", None)),
        finished_at=_time(getattr(last, "stop", None)),
        attempts=runs,
        flaky=outcome not in failing and any(a.outcome in failing for a in attempts),
    )


def _properties(pairs: Sequence[tuple[str, object]]) -> tuple[dict[str, str], dict[str, Any]]:
    """``record_property`` values: numbers become metrics, the rest labels; a name
    recorded again keeps each value (``NAME``, ``NAME[2]``…, as a JUnit import)."""
    labels: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    for name, value in pairs:
        name = str(name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(value) and name not in metrics:  # type: ignore[arg-type]
            metrics[name] = {"value": float(value)}  # type: ignore[arg-type]
            continue
        key, count = name, 1
        while key in labels:
            count += 1
            key = f"{name}[{count}]"
        labels[key] = str(value)
    return labels, metrics


def _failure(report: Any) -> str:
    """The one-line reason (as pytest's JUnit ``message``), then the traceback."""
    crash = getattr(getattr(report.longrepr, "reprcrash", None), "message", None)
    text = report.longreprtext.strip()
    if crash and text and not text.startswith(crash):
        return f"{crash}\n\n{text}"
    return crash or text


def _skip_reason(report: Any) -> str | None:
    longrepr = report.longrepr
    reason = (
        longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    )
    return reason.removeprefix("Skipped: ") or None


def _time(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)
