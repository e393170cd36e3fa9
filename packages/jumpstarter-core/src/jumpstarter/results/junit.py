"""JUnit XML, both ways: :func:`parse_junit` reads what test tools write into results,
:func:`export_junit` writes results back as JUnit XML.

How a test case maps onto a result:

- the name is ``classname/name`` (just ``name`` when there is no classname); the
  classname and the innermost ``<testsuite>`` name are kept as the labels
  ``junit.classname`` and ``junit.suite``, so an export writes the same case back;
- ``<failure>`` → ``failed``; else ``<error>`` → ``error``; else ``<skipped>`` →
  ``skipped`` (``xfail`` when its type is ``pytest.xfail``, as pytest writes it); else
  ``passed``. A ``jmp.outcome`` property overrides this (an export writes one for
  ``xpass``, which JUnit cannot say);
- ``time`` → duration; the element's ``message`` and its text → message (trimmed);
- the test case's ``<properties>`` → labels, except ``jmp.metric.NAME`` = ``"VALUE
  [UNIT]"`` → a metric, and ``jmp.name``, the result's name when the JUnit names
  cannot say it (an export writes one for a pytest node id). Properties of a whole ``<testsuite>`` (often the entire
  environment of the machine) and ``<system-out>``/``<system-err>`` are not kept.

JUnit files come from anywhere, so they are parsed with defusedxml: entity
declarations and external references are refused, and the input has a size cap.
A file is taken whole or not at all: any problem raises one
:class:`~jumpstarter.errors.BadRequest` naming it.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from typing import Any

from jumpstarter_protocol import Outcome, Result, ResultSpec
from pydantic import ValidationError

from jumpstarter.errors import BadRequest

MAX_SIZE = 64 * 1024 * 1024
"""The default cap on a JUnit file, in bytes."""
MAX_MESSAGE = 8000
"""Longest message kept from one test case, in characters (see :func:`trim_message`)."""

OUTCOME_PROPERTY = "jmp.outcome"
NAME_PROPERTY = "jmp.name"
METRIC_PREFIX = "jmp.metric."
SUITE_LABEL = "junit.suite"
CLASSNAME_LABEL = "junit.classname"


# --- reading -----------------------------------------------------------------------------


def parse_junit(
    data: bytes, *, source: str = "JUnit XML", max_size: int = MAX_SIZE
) -> list[ResultSpec]:
    """The test cases of a JUnit XML document, as results in document order.

    Accepts ``<testsuites>`` (suites may nest) or a lone ``<testsuite>``. ``source``
    names the input in error messages (a file name). Raises
    :class:`~jumpstarter.errors.BadRequest` for input over ``max_size`` bytes, XML
    that is not well-formed, entity declarations or external references, a root that
    is not JUnit, or a test case that is not a valid result; nothing is returned then.
    """
    import defusedxml
    import defusedxml.ElementTree

    if len(data) > max_size:
        raise BadRequest(f"{source}: {len(data)} bytes is more than the limit of {max_size} bytes")
    try:
        root = defusedxml.ElementTree.fromstring(data)
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
    tag = _tag(root)
    if tag not in ("testsuites", "testsuite"):
        raise BadRequest(
            f"{source}: not JUnit XML: the root element is <{tag}>, "
            "expected <testsuites> or <testsuite>"
        )
    results = []
    for index, (suite, case) in enumerate(_cases(root, None), start=1):
        results.append(_result(case, suite, source, index))
    return results


def _tag(element: Any) -> str:
    # Some tools put their elements in a namespace; the local name is what counts.
    return str(element.tag).rpartition("}")[2]


def _cases(element: Any, suite: str | None) -> Iterator[tuple[str | None, Any]]:
    """(innermost suite name, testcase element) for every test case below ``element``."""
    if _tag(element) == "testsuite":
        suite = element.get("name") or suite
    for child in element:
        tag = _tag(child)
        if tag == "testcase":
            yield suite, child
        elif tag == "testsuite":
            yield from _cases(child, suite)


def _result(case: Any, suite: str | None, source: str, index: int) -> ResultSpec:
    name = case.get("name")
    if not name:
        raise BadRequest(f"{source}: test case {index} has no name")
    classname = case.get("classname") or case.get("class")
    full_name = f"{classname}/{name}" if classname else name

    outcome, message = Outcome.PASSED, None
    children = {_tag(child): child for child in reversed(case)}  # the first of each kind
    for tag, found in (
        ("failure", Outcome.FAILED),
        ("error", Outcome.ERROR),
        ("skipped", Outcome.SKIPPED),
    ):
        element = children.get(tag)
        if element is not None:
            outcome = found
            if tag == "skipped" and element.get("type") == "pytest.xfail":
                outcome = Outcome.XFAIL
            message = _message(element)
            break

    labels: dict[str, str] = {}
    metrics: dict[str, dict[str, Any]] = {}
    properties = children.get("properties")
    for prop in properties if properties is not None else ():
        if _tag(prop) != "property" or not prop.get("name"):
            continue
        key = prop.get("name")
        value = prop.get("value")
        if value is None:
            value = prop.text or ""
        if key == OUTCOME_PROPERTY and value in _OUTCOMES:
            outcome = Outcome(value)
        elif key == NAME_PROPERTY and value:
            full_name = value
        elif key.startswith(METRIC_PREFIX) and (metric := _metric(value)) is not None:
            metrics[key.removeprefix(METRIC_PREFIX)] = metric
        else:
            labels[key] = value
    if suite:
        labels[SUITE_LABEL] = suite
    if classname:
        labels[CLASSNAME_LABEL] = classname

    try:
        return ResultSpec(
            name=full_name,
            outcome=outcome,
            duration=_seconds(case.get("time")),
            message=message,
            metrics=metrics,  # type: ignore[arg-type]
            labels=labels,
        )
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        shown = full_name if len(full_name) <= 80 else full_name[:79] + "…"
        raise BadRequest(f"{source}: test case {shown!r}: {where}: {error['msg']}") from None


def _message(element: Any) -> str | None:
    attribute = (element.get("message") or "").strip()
    text = (element.text or "").strip()
    if text and attribute and text != attribute:
        # pytest writes the one-line reason as the attribute, the traceback as text.
        text = text if text.startswith(attribute) else f"{attribute}\n{text}"
    return trim_message(text or attribute) or None


def _seconds(value: str | None) -> float | None:
    # Lenient on purpose: a bad time in one case should not cost the whole file.
    if not value:
        return None
    try:
        seconds = float(value.replace(",", "").strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


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
    per ``junit.suite`` label (``jumpstarter`` for results without one), cases in
    the order given. :func:`parse_junit` reads it back to the same names and
    outcomes."""
    suites: dict[str, list[Result]] = {}
    for result in results:
        suites.setdefault(result.labels.get(SUITE_LABEL) or "jumpstarter", []).append(result)
    root = ET.Element("testsuites", {"name": "jumpstarter", **_counts(results)})
    for suite_name, members in suites.items():
        suite = ET.SubElement(
            root, "testsuite", {"name": _xml_text(suite_name), **_counts(members)}
        )
        first = min(r.created_at for r in members)
        suite.set("timestamp", first.isoformat())
        for result in members:
            _case(suite, result)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _counts(results: Sequence[Result]) -> dict[str, str]:
    outcomes = [r.outcome for r in results]
    return {
        "tests": str(len(outcomes)),
        "failures": str(outcomes.count(Outcome.FAILED)),
        "errors": str(outcomes.count(Outcome.ERROR)),
        "skipped": str(outcomes.count(Outcome.SKIPPED) + outcomes.count(Outcome.XFAIL)),
        "time": _time(sum(r.duration or 0.0 for r in results)),
    }


def _case(suite: ET.Element, result: Result) -> None:
    classname, name = split_name(result.name, result.labels.get(CLASSNAME_LABEL))
    attributes = {"name": _xml_text(name)}
    if classname:
        attributes["classname"] = _xml_text(classname)
    if result.duration is not None:
        attributes["time"] = _time(result.duration)
    case = ET.SubElement(suite, "testcase", attributes)

    properties = {k: v for k, v in result.labels.items() if k not in (SUITE_LABEL, CLASSNAME_LABEL)}
    for key, metric in result.metrics.items():
        unit = f" {metric.unit}" if metric.unit else ""
        properties[METRIC_PREFIX + key] = f"{metric.value!r}{unit}"
    if result.outcome is Outcome.XPASS:
        properties[OUTCOME_PROPERTY] = Outcome.XPASS.value
    if (f"{classname}/{name}" if classname else name) != result.name:
        properties[NAME_PROPERTY] = result.name  # a pytest node id, say: keep it whole
    if properties:
        element = ET.SubElement(case, "properties")
        for key, value in properties.items():
            ET.SubElement(element, "property", {"name": _xml_text(key), "value": _xml_text(value)})

    tag = {
        Outcome.FAILED: "failure",
        Outcome.ERROR: "error",
        Outcome.SKIPPED: "skipped",
        Outcome.XFAIL: "skipped",
    }.get(result.outcome)
    if tag is None:
        return
    message = _xml_text(result.message or "")
    element = ET.SubElement(case, tag, {"message": message.split("\n", 1)[0]})
    if result.outcome is Outcome.XFAIL:
        element.set("type", "pytest.xfail")
    if "\n" in message:
        element.text = message


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
