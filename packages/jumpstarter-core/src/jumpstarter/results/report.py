"""What results say across sessions: comparisons, flakiness, pass rates, and the HTML
report of ``jmp result report``.

The report is one self-contained file: inline CSS, charts as inline SVG, no scripts,
no fonts or images fetched from anywhere, so it can be mailed, archived as a CI
artifact and opened offline years later. Numbers a program may want to read back
carry ``data-*`` attributes (``data-count``, ``data-rate``, ``data-name``...).
Its HTML is in Jinja2 templates (``templates/``, autoescaped); this module only
works out what they show.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jumpstarter_protocol import Outcome, Result, ResultSummary, SessionInfo, TaskInfo

FAILING = frozenset({Outcome.FAILED, Outcome.ERROR})
"""Outcomes that count as a failure: in diffs, pass rates and flakiness."""

OUTCOME_ORDER = [
    Outcome.PASSED,
    Outcome.FAILED,
    Outcome.ERROR,
    Outcome.SKIPPED,
    Outcome.XFAIL,
    Outcome.XPASS,
]
COLOURS = {
    Outcome.PASSED: "#2e7d32",
    Outcome.FAILED: "#c62828",
    Outcome.ERROR: "#e65100",
    Outcome.SKIPPED: "#78909c",
    Outcome.XFAIL: "#7b1fa2",
    Outcome.XPASS: "#00838f",
}


# --- comparisons -------------------------------------------------------------------------


@dataclass
class Change:
    """One test name in a comparison: its result before and after (None: absent)."""

    name: str
    before: Result | None
    after: Result | None


@dataclass
class SessionDiff:
    """How session B's results differ from session A's, by test name."""

    newly_failing: list[Change] = field(default_factory=list)
    fixed: list[Change] = field(default_factory=list)
    still_failing: list[Change] = field(default_factory=list)
    new: list[Change] = field(default_factory=list)
    missing: list[Change] = field(default_factory=list)
    unchanged: int = 0

    @property
    def regressions(self) -> list[Change]:
        """What makes ``jmp result diff`` exit 1: newly failing tests, and new tests
        that fail."""
        return self.newly_failing + [c for c in self.new if c.after and c.after.outcome in FAILING]


def latest_by_name(results: Iterable[Result]) -> dict[str, Result]:
    """The last result (highest id) of each name."""
    latest: dict[str, Result] = {}
    for result in sorted(results, key=lambda r: r.id):
        latest[result.name] = result
    return latest


def diff_results(before: Iterable[Result], after: Iterable[Result]) -> SessionDiff:
    """Compare two sessions' results name by name; a name recorded more than once
    in a session counts with its last result. Each list is sorted by name."""
    a, b = latest_by_name(before), latest_by_name(after)
    diff = SessionDiff()
    for name in sorted(a.keys() | b.keys()):
        old, new = a.get(name), b.get(name)
        change = Change(name, old, new)
        if old is None:
            diff.new.append(change)
        elif new is None:
            diff.missing.append(change)
        else:
            was, now = old.outcome in FAILING, new.outcome in FAILING
            if now and not was:
                diff.newly_failing.append(change)
            elif was and not now:
                diff.fixed.append(change)
            elif was and now:
                diff.still_failing.append(change)
            else:
                diff.unchanged += 1
    return diff


def is_flaky(outcomes: Sequence[Outcome]) -> bool:
    """Flaky: among these runs of one test, it failed in some and passed in others."""
    return any(o in FAILING for o in outcomes) and any(o is Outcome.PASSED for o in outcomes)


def outcome_changes(outcomes: Sequence[Outcome]) -> int:
    """How many times the outcome went from failing to not failing or back."""
    failing = [o in FAILING for o in outcomes]
    return sum(1 for x, y in zip(failing, failing[1:], strict=False) if x != y)


def pass_rate(summary: ResultSummary) -> float | None:
    """Results that did not fail ÷ results that ran (skipped ones did not run); None
    when nothing ran."""
    ran = summary.total - summary.outcomes.get(Outcome.SKIPPED, 0)
    if ran <= 0:
        return None
    failing = sum(summary.outcomes.get(o, 0) for o in FAILING)
    return (ran - failing) / ran


def ran_and_failing(summary: ResultSummary) -> tuple[int, int]:
    """(results that ran, results that failed or errored) of ``summary``."""
    ran = summary.total - summary.outcomes.get(Outcome.SKIPPED, 0)
    return ran, sum(summary.outcomes.get(o, 0) for o in FAILING)


def summarize(results: Iterable[Result]) -> ResultSummary:
    summary = ResultSummary()
    for result in results:
        summary.total += 1
        summary.outcomes[result.outcome] = summary.outcomes.get(result.outcome, 0) + 1
        summary.duration += result.duration or 0.0
    return summary


def format_duration(seconds: float | None) -> str:
    """``0.012 s``, ``4.2 s``, ``3 min 12 s``, ``2 h 5 min``."""
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.3g} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def format_rate(rate: float | None) -> str:
    return "–" if rate is None else f"{rate * 100:.1f}%"


# --- the HTML report ---------------------------------------------------------------------


@dataclass
class ReportData:
    """Everything a report shows. ``sessions`` are the reported ones, ``results``
    theirs, ``tasks`` their tasks (the run's context); ``trend`` the recent sessions
    of the same name drawn in the charts, oldest first; ``earlier`` the sessions of
    that name before the reported one, newest first, each with the names of its
    failing results (what marks a failure new, still failing or flaky)."""

    title: str
    sessions: list[SessionInfo]
    results: list[Result]
    trend: list[SessionInfo]
    tasks: list[TaskInfo] = field(default_factory=list)
    earlier: list[tuple[SessionInfo, set[str]]] = field(default_factory=list)
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    version: str = ""
    slowest: int = 15


@dataclass
class Failure:
    """A failing result as the report shows it, with how it compares to the sessions
    before: ``mark`` is ``new``, ``still`` (failing since ``since``) or ``flaky``."""

    result: Result
    mark: str
    since: SessionInfo | None = None
    failed_before: int = 0


def mark_failures(
    failures: Sequence[Result], earlier: Sequence[tuple[SessionInfo, set[str]]]
) -> list[Failure]:
    """Each failure marked against the sessions before it (newest first): ``flaky``
    when its own runs disagreed or it passed in some of those sessions and failed in
    others, ``still`` when it failed in the one just before (``since``: the first of
    the unbroken run of sessions it failed in), else ``new``."""
    marked = []
    for result in failures:
        streak = 0
        for _session, failing in earlier:
            if result.name not in failing:
                break
            streak += 1
        failed_before = sum(1 for _session, failing in earlier if result.name in failing)
        if result.flaky or (failed_before > streak and streak < len(earlier)):
            marked.append(Failure(result, "flaky", failed_before=failed_before))
        elif streak:
            marked.append(
                Failure(result, "still", since=earlier[streak - 1][0], failed_before=failed_before)
            )
        else:
            marked.append(Failure(result, "new"))
    return marked


def first_line(text: str | None) -> str:
    """The first line of a message that says something (a traceback's first line is
    often blank or a separator)."""
    for line in (text or "").splitlines():
        line = line.strip()
        if line and not re.fullmatch(r"[-=_~*#]+", line):
            return line if len(line) <= 200 else line[:199] + "…"
    return "(no message)"


def suite_of(result: Result) -> str:
    """The suite a result belongs to: its JUnit suite, the file of a pytest node id,
    or what comes before the last ``/`` of its name."""
    suite = result.labels.get("junit.suite")
    if suite and suite != "pytest":
        return suite
    if "::" in result.name:
        return result.name.split("::", 1)[0]
    head, slash, _ = result.name.rpartition("/")
    return head if slash else "(no suite)"


@dataclass
class Axis:
    """A chart's value axis: its range and the ticks to label."""

    low: float
    high: float
    ticks: list[tuple[float, str]]


def rate_axis(rates: Sequence[float]) -> Axis:
    """The pass-rate axis, zoomed to the data: from a round step below the lowest rate
    up to 100 % (96 % and 100 % look apart)."""
    low = min(rates, default=0.0)
    if low >= 1.0:
        low = 0.9
    step = _nice_step((1.0 - low) * 1.25)
    bottom = max(0.0, math.floor(low / step - 0.25) * step)
    ticks = []
    count = round((1.0 - bottom) / step)
    for k in range(count + 1):
        value = round(bottom + k * step, 9)
        ticks.append((value, f"{value * 100:.{_decimals(step * 100)}f}%"))
    return Axis(bottom, 1.0, ticks)


def duration_axis(durations: Sequence[float]) -> Axis:
    """The duration axis: from 0 to a round value above the longest, in s, min or h."""
    top = max(durations, default=0.0) or 1.0
    unit, unit_name = _duration_unit(top)
    step = _nice_step(top / unit)
    high = step * math.ceil(top / unit / step) * unit
    ticks = []
    value = 0.0
    while value <= high * 1.0001:
        ticks.append((value, f"{value / unit:,g} {unit_name}"))
        value += step * unit
    return Axis(0.0, high, ticks)


def _decimals(step_percent: float) -> int:
    return (
        0
        if step_percent >= 1 or step_percent == 0
        else min(3, -math.floor(math.log10(step_percent)))
    )


def _nice_step(span: float, ticks: int = 4) -> float:
    raw = max(span, 1e-9) / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        if raw <= step * magnitude:
            return step * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def _duration_unit(top: float) -> tuple[float, str]:
    if top >= 2 * 3600:
        return 3600.0, "h"
    if top >= 120:
        return 60.0, "min"
    return 1.0, "s"


_CHAR = 6.6  # px per character of an 11 px label: what margins are made of
_SLANT = math.radians(35)


@dataclass
class Chart:
    """One SVG chart, laid out: every label fits inside the drawing."""

    width: int
    height: int
    left: float
    right: float
    top: float
    bottom: float
    axis: Axis
    xs: list[float]
    labels: list[tuple[float, str]]

    def y(self, value: float) -> float:
        span = (self.axis.high - self.axis.low) or 1.0
        return self.bottom - (value - self.axis.low) / span * (self.bottom - self.top)


def layout(
    sessions: Sequence[SessionInfo], axis: Axis, width: int = 520, height: int = 240
) -> Chart:
    """A chart's geometry: the left margin holds the longest tick label, the bottom
    margin and the left edge the slanted session labels (never clipped)."""
    every = max(1, math.ceil(len(sessions) / 10))  # at most ten labels fit
    by_date = len({s.name for s in sessions}) == 1  # else the names tell them apart
    labels = []
    for i, session in enumerate(sessions):
        if i % every and i != len(sessions) - 1:
            continue
        text = (
            session.created_at.astimezone(UTC).strftime("%m-%d %H:%M") if by_date else session.name
        )
        labels.append((i, text if len(text) <= 16 else text[:15] + "…"))
    longest_tick = max((len(t) for _, t in axis.ticks), default=1)
    longest_label = max((len(t) for _, t in labels), default=1)
    reach = longest_label * _CHAR * math.cos(_SLANT)  # a slanted label's width
    left = max(12 + longest_tick * _CHAR, reach - 10)
    bottom = height - (18 + longest_label * _CHAR * math.sin(_SLANT))
    right = width - 14
    slot = (right - left) / max(len(sessions), 1)
    xs = [left + slot * (i + 0.5) for i in range(len(sessions))]
    return Chart(width, height, left, right, 14, bottom, axis, xs, [(xs[i], t) for i, t in labels])


def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("jumpstarter.results", "templates"),
        autoescape=True,  # every name and message is the producer's text, never markup
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        extensions=["jinja2.ext.do"],
    )
    env.filters["duration"] = format_duration
    env.filters["rate"] = format_rate
    env.filters["when"] = _when
    env.filters["thousands"] = lambda n: f"{n:,}"
    env.globals.update(
        colours={o.value: c for o, c in COLOURS.items()},
        pass_rate=pass_rate,
        ran_and_failing=ran_and_failing,
    )
    return env


def render_report(data: ReportData) -> str:
    """The report as one HTML document."""
    summary = summarize(data.results)
    failures = [r for r in data.results if r.outcome in FAILING]
    failures.sort(key=lambda r: (r.outcome is not Outcome.FAILED, r.name))
    marked = mark_failures(failures, data.earlier)
    groups: dict[str, list[Failure]] = {}
    for failure in marked:
        groups.setdefault(first_line(failure.result.message), []).append(failure)
    timed = sorted(
        (r for r in data.results if r.duration is not None), key=lambda r: -(r.duration or 0)
    )
    suites: dict[str, ResultSummary] = {}
    for result in data.results:
        suite = suites.setdefault(suite_of(result), ResultSummary())
        suite.total += 1
        suite.outcomes[result.outcome] = suite.outcomes.get(result.outcome, 0) + 1
        suite.duration += result.duration or 0.0
    rates = [r for s in data.trend if (r := pass_rate(s.summary or ResultSummary())) is not None]
    durations = [(s.summary or ResultSummary()).duration for s in data.trend]
    labels: dict[str, str] = {}
    for task in data.tasks:
        labels.update(task.spec.labels)
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            data=data,
            summary=summary,
            rate=pass_rate(summary),
            outcomes=[
                o
                for o in OUTCOME_ORDER
                if summary.outcomes.get(o) or o in (Outcome.PASSED, Outcome.FAILED)
            ],
            groups=sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])),
            failures=marked,
            marks={m: sum(1 for f in marked if f.mark == m) for m in ("new", "still", "flaky")},
            slowest=timed[: data.slowest],
            suites=sorted(suites.items()),
            reported={s.id for s in data.sessions},
            rate_chart=layout(data.trend, rate_axis(rates)) if data.trend else None,
            duration_chart=layout(data.trend, duration_axis(durations)) if data.trend else None,
            nodes=sorted({t.node for t in data.tasks}),
            labels=labels,
            started=min((s.created_at for s in data.sessions), default=None),
            previous=data.earlier[0][0] if data.earlier else None,
            tail=tail,
        )
    )


def tail(text: str, lines: int = 40) -> tuple[str, str]:
    """(hidden head, shown end) of a message: a traceback names its error at the end."""
    parts = text.splitlines()
    if len(parts) <= lines:
        return "", text
    return "\n".join(parts[:-lines]), "\n".join(parts[-lines:])


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "–"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
