"""JUnit XML, both ways: :func:`parse_junit` reads what test tools write into results,
:func:`export_junit` writes results back as JUnit XML.

How a test case maps onto a result (the same rules for every producer):

- **name**: ``classname/name`` (just ``name`` when there is no classname). A case of
  pytest (its suite is named ``pytest``, or its ``file`` ends in ``.py``) is named by
  its pytest node id instead, ``tests/test_mod.py::TestClass::test_x[param]``, as the
  pytest plugin records it, so a team that switches between the two keeps its
  history: the dotted classname is the module path, except its trailing parts that
  start with a capital (the test classes). Names of any length are kept whole. A
  case with no name or an empty one is named ``(unnamed case N)`` (N: its position in
  the file) with a warning. The classname and the innermost ``<testsuite>`` name are
  kept as the labels ``junit.classname`` and ``junit.suite``, the suite's
  ``hostname`` as ``junit.hostname``;
- **outcome**: ``<failure>`` → ``failed``; else ``<error>`` → ``error``; else
  ``<skipped>`` → ``skipped`` (``xfail`` when its type is ``pytest.xfail``); else a
  "did not run" marker → ``skipped``, the marker kept as the label ``junit.status``
  or ``junit.result`` (GoogleTest and CTest ``status="notrun"|"disabled"``,
  GoogleTest ``result="skipped"|"suppressed"``); else ``passed``. A ``jmp.outcome``
  property overrides this (an export writes one for ``xpass``);
- **reruns**: a case written again in the same suite (pytest-rerunfailures, also
  under xdist, where runs of other tests come between; Gradle's test-retry) is one
  result whose runs are its ``attempts`` (an empty case
  of pytest before a rerun was a failed run); the final run is its outcome, its
  duration is the time of all runs, and it is ``flaky`` when a run failed and the
  final one did not. Surefire and cargo-nextest: ``<flakyFailure>``/``<flakyError>`` are
  failed runs of a test that then passed: they become ``attempts``, followed by the
  passing one, and the result is ``flaky``. ``<rerunFailure>``/``<rerunError>`` are
  reruns of a test that failed every time: the first run (the ``<failure>``) and
  each rerun become attempts, the result is ``failed`` and not flaky;
- **time** → duration (a negative one, or one over :data:`MAX_DURATION`, refuses
  the file naming the case); the case's own ``timestamp``, else its suite's
  ``timestamp`` plus the times of the cases before it → ``started_at`` (a timestamp
  without an offset is taken as UTC); ``file`` and ``line`` are kept;
- the element's ``message`` and its text → message (trimmed);
- the case's ``<properties>`` → labels; a name given more than once keeps every
  value: the first as ``NAME``, the next as ``NAME[2]``, ``NAME[3]``… Except
  ``jmp.metric.NAME`` = ``"VALUE [UNIT]"`` → a metric, and ``jmp.*`` properties an
  export writes (below). Properties of a whole ``<testsuite>`` (often the machine's
  entire environment) and ``<system-out>``/``<system-err>`` are not kept;
- a ``<testsuite>`` (or ``<testsuites>``) that reports an error but holds no test
  case (a Go package that does not build, a TAP suite's ``<error>``) becomes one
  ``error`` result named after the suite, with its message, so the failure is seen.

JUnit files come from anywhere, so they are parsed with defusedxml, incrementally
(each test case is freed once read, so memory follows the largest case, not the
file): entity declarations and external references are refused, the input has a size
cap, and suites may nest to any depth. A file is taken whole or not at all: any
problem raises one :class:`~jumpstarter.errors.BadRequest` naming it.

An export validates against the JUnit schema of Jenkins' xUnit plugin, which allows
no ``<properties>`` in a ``<testcase>``: what JUnit cannot say of a case (labels,
metrics, attempts, file, line, timestamps, an outcome or name JUnit cannot spell) is
written in its suite's ``<properties>`` as ``jmp.case.N.KEY`` (N: the case's position
in its suite), which :func:`parse_junit` reads back onto the case.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from jumpstarter_protocol import Attempt, Outcome, Result, ResultSpec
from pydantic import ValidationError

from jumpstarter.errors import BadRequest

MAX_SIZE = 64 * 1024 * 1024
"""The default cap on a JUnit file, in bytes."""
MAX_MESSAGE = 8000
"""Longest message kept from one test case, in characters (see :func:`trim_message`)."""
MAX_DURATION = 31 * 24 * 3600.0
"""Longest believable duration of one test case, in seconds (31 days)."""

OUTCOME_PROPERTY = "jmp.outcome"
NAME_PROPERTY = "jmp.name"
METRIC_PREFIX = "jmp.metric."
CASE_PREFIX = "jmp.case."
SUITE_LABEL = "junit.suite"
CLASSNAME_LABEL = "junit.classname"
HOSTNAME_LABEL = "junit.hostname"
STATUS_LABEL = "junit.status"
RESULT_LABEL = "junit.result"
PYTEST_SUITE = "pytest"

# What GoogleTest and CTest write on a case that never ran.
_NOT_RUN_STATUS = frozenset({"notrun", "disabled", "skipped"})
_NOT_RUN_RESULT = frozenset({"skipped", "suppressed"})
_FAILED_TAGS = {"failure": Outcome.FAILED, "error": Outcome.ERROR}
_RERUN_TAGS = {"rerunFailure": Outcome.FAILED, "rerunError": Outcome.ERROR}
_FLAKY_TAGS = {"flakyFailure": Outcome.FAILED, "flakyError": Outcome.ERROR}
_SUITE_TAGS = ("testsuite", "testsuites")

Warn = Callable[[str], None]


# --- reading -----------------------------------------------------------------------------


@dataclass
class _Suite:
    """An open ``<testsuite>`` or ``<testsuites>`` while the file is read."""

    name: str | None
    hostname: str | None
    start: datetime | None
    errors: int
    offset: float = 0.0  # seconds of the cases read so far: the next one starts here
    position: int = 0  # cases read directly in this suite
    cases: int = 0  # cases read in this suite and the suites inside it
    extras: dict[int, dict[str, str]] = field(default_factory=dict)  # jmp.case.N.KEY
    problem: Any = None  # a suite-level <error> or <failure>
    seen: dict[str, int] = field(default_factory=dict)  # name → index of its result


class _Capped:
    """A binary file that refuses to be read past ``limit`` bytes."""

    def __init__(self, raw: IO[bytes], limit: int, source: str) -> None:
        self.raw, self.limit, self.source, self.count = raw, limit, source, 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.count += len(data)
        if self.count > self.limit:
            raise BadRequest(f"{self.source}: more than the limit of {self.limit} bytes")
        return data


def parse_junit(
    data: bytes | IO[bytes],
    *,
    source: str = "JUnit XML",
    max_size: int = MAX_SIZE,
    warn: Warn | None = None,
) -> list[ResultSpec]:
    """The test cases of a JUnit XML document, as results in document order.

    ``data`` is the document's bytes or a binary file, read a piece at a time.
    Accepts ``<testsuites>`` or a lone ``<testsuite>``; suites may nest to any depth.
    ``source`` names the input in messages (a file name); ``warn`` is called with a
    one-line message for each case taken with a change (a nameless case).
    Raises :class:`~jumpstarter.errors.BadRequest` for input over ``max_size`` bytes,
    XML that is not well-formed, entity declarations or external references, a root
    that is not JUnit, or a test case that is not a valid result; nothing is
    returned then.
    """
    import io

    if isinstance(data, bytes | bytearray):
        if len(data) > max_size:
            raise BadRequest(
                f"{source}: {len(data)} bytes is more than the limit of {max_size} bytes"
            )
        data = io.BytesIO(data)
    reader = _Reader(source, warn or (lambda _message: None))
    _parse(_Capped(data, max_size, source), source, reader)
    return reader.results


def _parse(stream: _Capped, source: str, reader: _Reader) -> None:
    import defusedxml
    import defusedxml.ElementTree

    try:
        for event, element in defusedxml.ElementTree.iterparse(stream, events=("start", "end")):
            if event == "start":
                reader.start(element)
            else:
                reader.end(element)
    except ET.ParseError as exc:
        raise BadRequest(f"{source}: not well-formed XML: {exc}") from None
    except defusedxml.EntitiesForbidden as exc:
        raise BadRequest(
            f"{source}: refused: the XML declares the entity {exc.name!r}; "
            "entities are not allowed in JUnit files"
        ) from None
    except defusedxml.ExternalReferenceForbidden as exc:
        raise BadRequest(
            f"{source}: refused: the XML refers to the external resource {exc.sysid!r}; "
            "external references are not allowed in JUnit files"
        ) from None
    except defusedxml.DefusedXmlException as exc:
        raise BadRequest(f"{source}: refused: {exc}") from None


class _Reader:
    """Turns iterparse's events into results, freeing each element once it is used."""

    def __init__(self, source: str, warn: Warn) -> None:
        self.source, self.warn = source, warn
        self.results: list[ResultSpec] = []
        self.open: list[Any] = []  # every element from the root to the current one
        self.suites: list[_Suite] = []
        self.case: Any = None  # the <testcase> being read, kept whole until its end
        self.count = 0  # cases in the file so far

    def start(self, element: Any) -> None:
        tag = _tag(element)
        if not self.open and tag not in _SUITE_TAGS:
            raise BadRequest(
                f"{self.source}: not JUnit XML: the root element is <{tag}>, "
                "expected <testsuites> or <testsuite>"
            )
        self.open.append(element)
        if self.case is not None:
            return
        if tag in _SUITE_TAGS:
            outer = self.suites[-1] if self.suites else None
            name = element.get("name") or (outer.name if outer else None)
            self.suites.append(
                _Suite(
                    name=name if tag == "testsuite" or outer is None else outer.name,
                    hostname=element.get("hostname") or (outer.hostname if outer else None),
                    start=_timestamp(element.get("timestamp")) or (outer.start if outer else None),
                    errors=_count(element.get("errors")) + _count(element.get("failures")),
                )
            )
        elif tag == "testcase" and self.suites:
            self.case = element

    def end(self, element: Any) -> None:
        self.open.pop()
        tag = _tag(element)
        suite = self.suites[-1] if self.suites else None
        if element is self.case:
            self.case = None
            assert suite is not None
            self._add_case(element, suite)
        elif self.case is not None:
            return  # a child of the case: read with it
        elif suite is not None and tag in _SUITE_TAGS:
            self.suites.pop()
            self._end_suite(element, suite)
            if self.suites:
                self.suites[-1].cases += suite.cases
        elif suite is not None and tag == "properties" and self._parent_is_suite():
            for prop in element:
                key = prop.get("name") or ""
                if _tag(prop) == "property" and key.startswith(CASE_PREFIX):
                    number, _, rest = key.removeprefix(CASE_PREFIX).partition(".")
                    if number.isdigit() and rest:
                        suite.extras.setdefault(int(number), {})[rest] = _value(prop)
        elif suite is not None and tag in _FAILED_TAGS and self._parent_is_suite():
            if suite.problem is None:
                suite.problem = element
            return  # kept until the suite ends
        elif self.open and _tag(self.open[-1]) == "properties":
            return  # a suite's property: read when its <properties> ends
        # Done with it: free it, and drop it from its parent so nothing holds it.
        element.clear()
        if self.open and len(self.open[-1]) and self.open[-1][-1] is element:
            del self.open[-1][-1]

    def _parent_is_suite(self) -> bool:
        return bool(self.open) and _tag(self.open[-1]) in _SUITE_TAGS

    def _add_case(self, case: Any, suite: _Suite) -> None:
        self.count += 1
        suite.position += 1
        suite.cases += 1
        result = _case_result(case, suite, self, suite.extras.pop(suite.position, {}))
        suite.offset += result.duration or 0.0
        earlier = suite.seen.get(result.name)
        if earlier is not None and _teardown_error(result, suite):
            # pytest writes a test that failed and then errored in teardown twice: one
            # test, failed, as the pytest plugin records it.
            before = self.results[earlier]
            message = "\n\n".join(m for m in (before.message, result.message) if m)
            self.results[earlier] = before.model_copy(update={"message": trim_message(message)})
        elif earlier is not None and not result.attempts:
            before = self.results[earlier]
            self.results[earlier] = _rerun(before, result, pytest=suite.name == PYTEST_SUITE)
        else:
            suite.seen[result.name] = len(self.results)
            self.results.append(result)
        case.clear()
        if self.open and len(self.open[-1]) and self.open[-1][-1] is case:
            del self.open[-1][-1]

    def _end_suite(self, element: Any, suite: _Suite) -> None:
        problem = suite.problem
        if problem is None and (suite.cases or not suite.errors):
            return
        if problem is not None:
            message = _message(problem)
        else:
            message = (
                f"the suite reports {suite.errors} error{'s' if suite.errors != 1 else ''} "
                "but holds no test case"
            )
        suite.cases += 1  # the outer suites' errors are this one's
        labels = {SUITE_LABEL: suite.name} if suite.name else {}
        if suite.hostname:
            labels[HOSTNAME_LABEL] = suite.hostname
        self.results.append(
            ResultSpec(
                name=suite.name or self.source,
                outcome=Outcome.ERROR,
                message=message or "error in the suite",
                labels=labels,
                started_at=suite.start,
            )
        )
        element.clear()


def _tag(element: Any) -> str:
    # Some tools put their elements in a namespace; the local name is what counts.
    return str(element.tag).rpartition("}")[2]


def _value(prop: Any) -> str:
    value = prop.get("value")
    return value if value is not None else (prop.text or "")


def _count(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


def _case_result(case: Any, suite: _Suite, reader: _Reader, extras: dict[str, str]) -> ResultSpec:
    source = reader.source
    name = case.get("name") or ""
    classname = case.get("classname") or case.get("class") or None
    file = case.get("file") or None
    if not name.strip():
        placeholder = f"(unnamed case {reader.count})"
        reader.warn(f"{source}: test case {reader.count} has no name; stored as {placeholder!r}")
        name = placeholder
    if suite.name == PYTEST_SUITE or (file or "").endswith(".py"):
        full_name = pytest_node_id(classname, name, file)
    else:
        full_name = f"{classname}/{name}" if classname else name
    shown = full_name if len(full_name) <= 80 else full_name[:79] + "…"

    labels: dict[str, str] = {}
    metrics: dict[str, dict[str, Any]] = {}
    outcome, message = Outcome.PASSED, None
    first: dict[str, Any] = {}
    reruns: list[Attempt] = []
    flaky_runs: list[Attempt] = []
    properties: list[tuple[str, str]] = []
    for child in case:
        tag = _tag(child)
        first.setdefault(tag, child)
        if tag in _RERUN_TAGS:
            reruns.append(_attempt(child, _RERUN_TAGS[tag]))
        elif tag in _FLAKY_TAGS:
            flaky_runs.append(_attempt(child, _FLAKY_TAGS[tag]))
        elif tag == "properties":
            properties += [
                (p.get("name"), _value(p)) for p in child if _tag(p) == "property" and p.get("name")
            ]
    for tag, found in (
        ("failure", Outcome.FAILED),
        ("error", Outcome.ERROR),
        ("skipped", Outcome.SKIPPED),
    ):
        element = first.get(tag)
        if element is not None:
            outcome = found
            if tag == "skipped" and element.get("type") == "pytest.xfail":
                outcome = Outcome.XFAIL
            message = _message(element)
            break
    status, verdict = (case.get("status") or "").lower(), (case.get("result") or "").lower()
    not_run = status in _NOT_RUN_STATUS or verdict in _NOT_RUN_RESULT
    if not_run and outcome in (Outcome.PASSED, Outcome.SKIPPED):
        outcome = Outcome.SKIPPED
        if status in _NOT_RUN_STATUS:
            labels[STATUS_LABEL] = status
        if verdict in _NOT_RUN_RESULT:
            labels[RESULT_LABEL] = verdict
        marker = f"status={status}" if status in _NOT_RUN_STATUS else f"result={verdict}"
        message = message or f"not run ({marker})"

    duration = _seconds(case.get("time"))
    if duration is not None and not (0 <= duration <= MAX_DURATION):
        raise BadRequest(
            f"{source}: test case {shown!r}: time {case.get('time')} is not a believable "
            f"duration (0 to {MAX_DURATION:.0f} seconds)"
        )
    started = _timestamp(case.get("timestamp"))
    if started is None and suite.start is not None:
        started = suite.start + timedelta(seconds=suite.offset)

    attempts: list[Attempt] = []
    flaky = False
    if flaky_runs:
        attempts = [*flaky_runs, Attempt(outcome=outcome, duration=duration)]
        flaky = outcome in (Outcome.PASSED, Outcome.XPASS)
    elif reruns and outcome in (Outcome.FAILED, Outcome.ERROR):
        attempts = [Attempt(outcome=outcome, message=message), *reruns]

    for key, value in [*properties, *extras.items()]:
        if key == OUTCOME_PROPERTY and value in _OUTCOMES:
            outcome = Outcome(value)
        elif key == NAME_PROPERTY and value:
            full_name = value
        elif key.startswith(METRIC_PREFIX) and (metric := _metric(value)) is not None:
            metrics[key.removeprefix(METRIC_PREFIX)] = metric
        elif key in _EXTRA_KEYS:
            continue
        else:
            label, number = key, 1
            while label in labels:
                number += 1
                label = f"{key}[{number}]"
            labels[label] = value
    if suite.name:
        labels[SUITE_LABEL] = suite.name
    if classname:
        labels[CLASSNAME_LABEL] = classname
    if suite.hostname:
        labels[HOSTNAME_LABEL] = suite.hostname

    line = case.get("line")
    fields: dict[str, Any] = {
        "file": file,
        "line": int(line) if line and line.isdigit() else None,
        "started_at": started,
        "finished_at": started + timedelta(seconds=duration) if started and duration else None,
    }
    for key in ("file", "line", "started_at", "finished_at"):
        if f"jmp.{key}" in extras:
            fields[key] = extras[f"jmp.{key}"]
    fields["attempts"] = (
        _json_list(extras["jmp.attempts"]) if "jmp.attempts" in extras else attempts
    )
    fields["flaky"] = extras["jmp.flaky"] == "true" if "jmp.flaky" in extras else flaky
    try:
        return ResultSpec(
            name=full_name,
            outcome=outcome,
            duration=duration,
            message=message,
            metrics=metrics,  # type: ignore[arg-type]
            labels=labels,
            **fields,
        )
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            error = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in error["loc"])
            text = f"{where}: {error['msg']}"
        else:
            text = str(exc)
        raise BadRequest(f"{source}: test case {shown!r}: {text}") from None


# Case properties an export writes for what JUnit cannot say; they are fields, not labels.
_EXTRA_KEYS = (
    "jmp.file",
    "jmp.line",
    "jmp.started_at",
    "jmp.finished_at",
    "jmp.attempts",
    "jmp.flaky",
)


def _teardown_error(result: ResultSpec, suite: _Suite) -> bool:
    return (
        suite.name == PYTEST_SUITE
        and result.outcome is Outcome.ERROR
        and (result.message or "").startswith("failed on teardown")
    )


def _rerun(before: ResultSpec, again: ResultSpec, *, pytest: bool) -> ResultSpec:
    """``again``, the next run of the test of ``before`` (the same name in the same
    suite), as one result with both as attempts."""
    attempts = before.attempts or [_as_attempt(before)]
    if pytest and attempts[-1].outcome is Outcome.PASSED:
        # pytest-rerunfailures runs a test again only after it failed; pytest's JUnit
        # report writes that run as an empty case.
        attempts[-1] = attempts[-1].model_copy(update={"outcome": Outcome.FAILED})
    attempts = [*attempts, _as_attempt(again)]
    failed = {Outcome.FAILED, Outcome.ERROR}
    return again.model_copy(
        update={
            "attempts": attempts,
            "flaky": again.outcome not in failed and any(a.outcome in failed for a in attempts),
            "duration": sum(a.duration or 0.0 for a in attempts)
            if again.duration is not None
            else None,
            "started_at": before.started_at or again.started_at,
        }
    )


def _as_attempt(result: ResultSpec) -> Attempt:
    return Attempt(
        outcome=result.outcome,
        duration=result.duration,
        message=result.message,
        started_at=result.started_at,
    )


def _json_list(text: str) -> list[Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _attempt(element: Any, outcome: Outcome) -> Attempt:
    trace = next((c for c in element if _tag(c) == "stackTrace"), None)
    text = (trace.text if trace is not None else element.text) or ""
    attribute = (element.get("message") or "").strip()
    text = text.strip()
    message = text if text.startswith(attribute) else f"{attribute}\n{text}".strip()
    return Attempt(
        outcome=outcome,
        duration=_seconds(element.get("time")),
        message=trim_message(message) or None,
        started_at=_timestamp(element.get("timestamp")),
    )


def pytest_node_id(classname: str | None, name: str, file: str | None = None) -> str:
    """The pytest node id of the JUnit case pytest wrote as (``classname``, ``name``):
    ``("a.b.test_mod.TestX", "test_y[1]")`` → ``a/b/test_mod.py::TestX::test_y[1]``.

    pytest dots the module path and the class names together; the trailing parts
    that start with a capital are taken as the classes (pytest collects classes named
    ``Test*``). ``file`` (pytest's ``xunit1`` family writes it) settles the path. A
    case with no classname (a module that could not be collected) names the module."""
    parts = classname.split(".") if classname else []
    if not parts:
        bare = name.partition("[")[0]
        if re.fullmatch(r"[\w.]+", bare) and not file:
            return name.replace(".", "/") + ".py" if bare == name else name
        return f"{file}::{name}" if file else name
    if file:
        module = file.removesuffix(".py").replace("/", ".").split(".")
        classes = parts[len(module) :] if parts[: len(module)] == module else []
        return "::".join([file, *classes, name])
    split = len(parts)
    while split > 1 and parts[split - 1][:1].isupper():
        split -= 1
    return "::".join(["/".join(parts[:split]) + ".py", *parts[split:], name])


def _message(element: Any) -> str | None:
    attribute = (element.get("message") or "").strip()
    text = (element.text or "").strip()
    if text and attribute and text != attribute:
        # pytest writes the one-line reason as the attribute, the traceback as text.
        text = text if text.startswith(attribute) else f"{attribute}\n{text}"
    return trim_message(text or attribute) or None


def _seconds(value: str | None) -> float | None:
    # Lenient on purpose: a time that is not a number at all costs the case its
    # duration, not the whole file its import.
    if not value:
        return None
    try:
        seconds = float(value.replace(",", "").strip())
    except ValueError:
        return None
    return seconds if not math.isnan(seconds) else None


def _timestamp(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


_OUTCOMES = frozenset(o.value for o in Outcome)
_METRIC = re.compile(r"\s*([-+0-9.eE]+)\s*(\S*)\s*")


def _metric(value: str) -> dict[str, Any] | None:
    match = _METRIC.fullmatch(value)
    if match is None:
        return None
    try:
        number = float(match.group(1))
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return {"value": number, "unit": match.group(2) or None}


def trim_message(text: str | None, limit: int = MAX_MESSAGE) -> str | None:
    """``text`` cut to at most ``limit`` characters, keeping its start and, mostly,
    its end (where a traceback names the error)."""
    if text is None or len(text) <= limit:
        return text
    head = limit // 4
    tail = limit - head - 40
    cut = len(text) - head - tail
    return f"{text[:head]}\n… ({cut} characters cut) …\n{text[-tail:]}"


# --- writing -----------------------------------------------------------------------------


def export_junit(results: list[Result]) -> str:
    """``results`` as one JUnit XML document (``<testsuites>``), one ``<testsuite>``
    per ``junit.suite`` label (``pytest`` for pytest node ids, ``jumpstarter`` for
    other results without one), cases in the order given. It validates against the
    JUnit schema of Jenkins' xUnit plugin, and :func:`parse_junit` reads it back to
    the same results (durations to the microsecond)."""
    suites: dict[str, list[Result]] = {}
    for result in results:
        suite = result.labels.get(SUITE_LABEL) or (
            PYTEST_SUITE if "::" in result.name else "jumpstarter"
        )
        suites.setdefault(suite, []).append(result)
    counts = _counts(results)
    del counts["skipped"]  # the schema has no skipped= on <testsuites>
    root = ET.Element("testsuites", {"name": "jumpstarter", **counts})
    for suite_name, members in suites.items():
        suite = ET.SubElement(
            root, "testsuite", {"name": _xml_text(suite_name), **_counts(members)}
        )
        # The suite starts with its first case; results that never said when they
        # ran get no time on the way back either.
        started = [r.started_at for r in members if r.started_at is not None]
        first = min(started) if started else None
        if first is not None:
            suite.set("timestamp", first.isoformat())
        hostname = members[0].labels.get(HOSTNAME_LABEL)
        if hostname:
            suite.set("hostname", _xml_text(hostname))
        extras = ET.SubElement(suite, "properties")
        offset = 0.0
        for position, result in enumerate(members, start=1):
            # A case's times go along only where the suite's start plus the times
            # before it would not give them back.
            expected = first + timedelta(seconds=offset) if first else None
            offset += result.duration or 0.0
            for key, value in _case(suite, result, suite_name, expected).items():
                ET.SubElement(
                    extras,
                    "property",
                    {
                        "name": f"{CASE_PREFIX}{position}.{_xml_text(key)}",
                        "value": _xml_text(value),
                    },
                )
        if not len(extras):
            suite.remove(extras)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _counts(results: Sequence[Result]) -> dict[str, str]:
    outcomes = [r.outcome for r in results]
    return {
        "tests": str(len(outcomes)),
        "failures": str(outcomes.count(Outcome.FAILED)),
        "errors": str(outcomes.count(Outcome.ERROR)),
        "skipped": str(outcomes.count(Outcome.SKIPPED) + outcomes.count(Outcome.XFAIL)),
        # The schema allows at most three decimals on a suite's time.
        "time": f"{sum(r.duration or 0.0 for r in results):.3f}",
    }


_OWN_LABELS = (SUITE_LABEL, CLASSNAME_LABEL, HOSTNAME_LABEL)
_TAGS = {
    Outcome.FAILED: "failure",
    Outcome.ERROR: "error",
    Outcome.SKIPPED: "skipped",
    Outcome.XFAIL: "skipped",
}


def _case(
    suite: ET.Element, result: Result, suite_name: str, expected: datetime | None
) -> dict[str, str]:
    """Write ``result`` as a ``<testcase>`` of ``suite``; return what JUnit cannot
    say of it, as properties for the suite."""
    if SUITE_LABEL in result.labels:  # it came from JUnit: its classname as it was
        classname = result.labels.get(CLASSNAME_LABEL)
        if classname and result.name.startswith(classname + "/"):
            name = result.name[len(classname) + 1 :]
        elif classname is None and suite_name != PYTEST_SUITE:
            name = result.name  # it had no classname: a "/" in its name is its own
        else:
            classname, name = split_name(result.name, classname)
    else:
        classname, name = split_name(result.name)
    attributes = {"name": _xml_text(name)}
    if classname:
        attributes["classname"] = _xml_text(classname)
    if result.duration is not None:
        attributes["time"] = _time(result.duration)
    case = ET.SubElement(suite, "testcase", attributes)

    extras = {k: v for k, v in result.labels.items() if k not in _OWN_LABELS}
    for key, metric in result.metrics.items():
        unit = f" {metric.unit}" if metric.unit else ""
        extras[METRIC_PREFIX + key] = f"{metric.value!r}{unit}"
    if result.outcome is Outcome.XPASS:
        extras[OUTCOME_PROPERTY] = Outcome.XPASS.value
    if suite_name == PYTEST_SUITE:
        read_back = pytest_node_id(classname, name)
    else:
        read_back = f"{classname}/{name}" if classname else name
    if read_back != result.name:
        extras[NAME_PROPERTY] = result.name
    if result.file is not None:
        extras["jmp.file"] = result.file
    if result.line is not None:
        extras["jmp.line"] = str(result.line)
    started, finished = result.started_at, result.finished_at
    if started is not None and (expected is None or not _close(started, expected)):
        extras["jmp.started_at"] = started.isoformat()
    if started is None or result.duration is None:
        expected_end = None
    else:
        expected_end = started + timedelta(seconds=result.duration)
    if finished is not None and (expected_end is None or not _close(finished, expected_end)):
        extras["jmp.finished_at"] = finished.isoformat()
    if result.attempts:
        extras["jmp.attempts"] = json.dumps(
            [a.model_dump(mode="json", exclude_none=True) for a in result.attempts],
            ensure_ascii=False,
        )
    if result.flaky:
        extras["jmp.flaky"] = "true"

    # Reruns as Surefire writes them, for the tools that show them.
    rerun_tag = "flakyFailure" if result.flaky else "rerunFailure"
    for attempt in result.attempts[:-1] if result.attempts else ():
        if attempt.outcome in (Outcome.FAILED, Outcome.ERROR):
            tag = (
                rerun_tag
                if attempt.outcome is Outcome.FAILED
                else rerun_tag.replace("Failure", "Error")
            )
            message = _xml_text(attempt.message or "")
            rerun = ET.SubElement(
                case, tag, {"type": attempt.outcome.value, "message": message.split("\n", 1)[0]}
            )
            if "\n" in message:
                rerun.text = message

    tag = _TAGS.get(result.outcome)
    if tag is not None:
        message = _xml_text(result.message or "")
        element = ET.SubElement(case, tag, {"message": message.split("\n", 1)[0]})
        if result.outcome is Outcome.XFAIL:
            element.set("type", "pytest.xfail")
        if "\n" in message:
            element.text = message
    return extras


def _close(a: datetime, b: datetime) -> bool:
    return abs((a - b).total_seconds()) < 0.001  # times are written to the microsecond


def split_name(name: str, classname: str | None = None) -> tuple[str | None, str]:
    """A result name as JUnit's (classname, name).

    The ``junit.classname`` label wins when the name starts with it (a case that came
    from JUnit goes back as it was); a pytest node id ``dir/test_x.py::Class::test``
    becomes ``("dir.test_x.Class", "test")`` as pytest's own JUnit report has it;
    otherwise the name is split at its last ``/``."""
    if classname and name.startswith(classname + "/"):
        return classname, name[len(classname) + 1 :]
    bare, bracket, params = name.partition("[")  # parameters may hold anything
    if "::" in bare:
        path, *parts = bare.split("::")
        module = path.removesuffix(".py").replace("/", ".")
        return ".".join([module, *parts[:-1]]), parts[-1] + bracket + params
    if bare.endswith(".py") and "/" not in bracket + params:
        return None, bare.removesuffix(".py").replace("/", ".")  # a module: pytest's way
    if "/" in bare:
        head, _, last = bare.rpartition("/")
        return head, last + bracket + params
    return None, name


def _time(seconds: float) -> str:
    return f"{seconds:.6f}".rstrip("0").rstrip(".") or "0"


# XML 1.0 cannot carry these characters at all, not even escaped; ANSI colour codes in
# failure messages are the usual source.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_text(text: str) -> str:
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
