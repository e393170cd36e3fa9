"""What results say across sessions: comparisons, flakiness, pass rates, and the HTML
report of ``jmp result report``.

The report is one self-contained file: inline CSS, charts as inline SVG, no scripts,
no fonts or images fetched from anywhere, so it can be mailed, archived as a CI
artifact and opened offline years later. Numbers a program may want to read back
carry ``data-*`` attributes (``data-count``, ``data-rate``, ``data-name``...).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from jumpstarter_protocol import Outcome, Result, ResultSummary, SessionInfo

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
    theirs; ``trend`` the recent sessions drawn in the charts, oldest first."""

    title: str
    sessions: list[SessionInfo]
    results: list[Result]
    trend: list[SessionInfo]
    generated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    version: str = ""
    max_failures: int = 200
    slowest: int = 15


def render_report(data: ReportData) -> str:
    """The report as one HTML document."""
    summary = summarize(data.results)
    failures = [r for r in data.results if r.outcome in FAILING]
    failures.sort(key=lambda r: (r.outcome is not Outcome.FAILED, r.name))
    timed = sorted(
        (r for r in data.results if r.duration is not None), key=lambda r: -(r.duration or 0)
    )
    reported = {s.id for s in data.sessions}
    parts = [
        _head(data.title),
        "<body>",
        _header(data),
        _summary_section(summary),
        _trend_section(data.trend, reported),
        _failures_section(failures, data.max_failures),
        _slowest_section(timed[: data.slowest]),
        f"<footer>Generated by Jumpstarter {_e(data.version)} at "
        f"{_e(_when(data.generated_at))}.</footer>",
        "</body>\n</html>\n",
    ]
    return "\n".join(parts)


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "–"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


_CSS = """
:root { --fg: #1c2530; --muted: #5f6b7a; --line: #dde3ea; --bg: #ffffff; --panel: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 24px 28px 48px; color: var(--fg);
       background: var(--bg); font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
       "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 15px; margin: 0; font-weight: 600; word-break: break-all; }
.meta { color: var(--muted); margin: 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: var(--panel); border-radius: 8px; padding: 10px 16px; min-width: 110px;
        border-top: 4px solid var(--line); }
.card .n { display: block; font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .l { color: var(--muted); font-size: 13px; }
.bar { display: flex; height: 14px; border-radius: 7px; overflow: hidden; margin: 16px 0 4px;
       background: var(--line); }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr)); gap: 20px; }
figure { margin: 0; background: var(--panel); border-radius: 8px; padding: 12px 12px 4px; }
figcaption { font-weight: 600; margin: 0 0 6px 4px; }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
.failure { border-left: 4px solid #c62828; background: var(--panel); border-radius: 0 8px 8px 0;
           padding: 10px 14px; margin: 0 0 12px; }
.failure.error { border-left-color: #e65100; }
.failure .o { font-size: 12px; font-weight: 600; text-transform: uppercase; letter-spacing: .04em; }
pre { margin: 8px 0 0; padding: 10px; background: #fff; border: 1px solid var(--line);
      border-radius: 6px; overflow-x: auto; font: 12.5px/1.4 ui-monospace, SFMono-Regular, Menlo,
      Consolas, monospace; white-space: pre-wrap; word-break: break-word; max-height: 360px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 13px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { word-break: break-all; }
.slowest th:nth-child(1) { width: 7em; text-align: right; }
.slowest th:nth-child(2) { width: 6.5em; }
.pill { display: inline-block; padding: 0 8px; border-radius: 9px; color: #fff; font-size: 12px;
        font-weight: 600; }
.none { color: var(--muted); }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; }
"""


def _head(title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>"
    )


def _header(data: ReportData) -> str:
    names = ", ".join(
        f'<b>{_e(s.name)}</b> <span class="none">({_e(s.id)})</span>' for s in data.sessions
    )
    started = min((s.created_at for s in data.sessions), default=None)
    label = "Session" if len(data.sessions) == 1 else "Sessions"
    return (
        f"<header><h1>{_e(data.title)}</h1>"
        f'<p class="meta">{label} {names} · started {_e(_when(started))}</p></header>'
    )


def _pill(outcome: Outcome) -> str:
    return f'<span class="pill" style="background:{COLOURS[outcome]}">{_e(outcome.value)}</span>'


def _summary_section(summary: ResultSummary) -> str:
    cards = [
        f'<div class="card"><span class="n" data-count="total">{summary.total}</span>'
        '<span class="l">results</span></div>'
    ]
    for outcome in OUTCOME_ORDER:
        count = summary.outcomes.get(outcome, 0)
        if count or outcome in (Outcome.PASSED, Outcome.FAILED):
            cards.append(
                f'<div class="card" style="border-top-color:{COLOURS[outcome]}">'
                f'<span class="n" data-count="{outcome.value}">{count}</span>'
                f'<span class="l">{_e(outcome.value)}</span></div>'
            )
    rate = pass_rate(summary)
    cards.append(
        f'<div class="card"><span class="n" data-rate="{"" if rate is None else f"{rate:.6f}"}">'
        f'{format_rate(rate)}</span><span class="l">pass rate</span></div>'
    )
    cards.append(
        f'<div class="card"><span class="n" data-duration="{summary.duration:.6f}">'
        f'{_e(format_duration(summary.duration))}</span><span class="l">total duration</span></div>'
    )
    segments = "".join(
        f'<div title="{_e(o.value)}: {summary.outcomes[o]}" '
        f'style="width:{100 * summary.outcomes[o] / summary.total:.3f}%;background:{COLOURS[o]}"></div>'
        for o in OUTCOME_ORDER
        if summary.total and summary.outcomes.get(o)
    )
    return (
        '<section id="summary"><h2>Summary</h2>'
        f'<div class="cards">{"".join(cards)}</div>'
        f'<div class="bar" role="img" aria-label="results by outcome">{segments}</div>'
        '<p class="meta">Pass rate: results that did not fail or error, out of those that ran '
        "(skipped ones did not run).</p></section>"
    )


# --- charts ---------------------------------------------------------------------------------

_W, _H = 520, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 46, 12, 14, 52


def _nice_step(top: float, ticks: int = 4) -> float:
    raw = top / ticks
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


def _x_positions(count: int) -> list[float]:
    width = _W - _LEFT - _RIGHT
    slot = width / max(count, 1)
    return [_LEFT + slot * (i + 0.5) for i in range(count)]


def _x_labels(sessions: Sequence[SessionInfo], xs: Sequence[float]) -> str:
    every = max(1, math.ceil(len(sessions) / 10))  # at most ten labels fit
    by_date = len({s.name for s in sessions}) == 1  # else the names tell them apart
    labels = []
    for i, (session, x) in enumerate(zip(sessions, xs, strict=True)):
        if i % every and i != len(sessions) - 1:
            continue
        text = (
            session.created_at.astimezone(UTC).strftime("%m-%d %H:%M") if by_date else session.name
        )
        if len(text) > 16:
            text = text[:15] + "…"
        labels.append(
            f'<text x="{x:.1f}" y="{_H - _BOTTOM + 14}" text-anchor="end" '
            f'transform="rotate(-35 {x:.1f} {_H - _BOTTOM + 14})">{_e(text)}</text>'
        )
    return "".join(labels)


def _y_grid(ticks: Sequence[tuple[float, str]], to_y) -> str:  # noqa: ANN001 - a small local helper
    out = []
    for value, label in ticks:
        y = to_y(value)
        out.append(
            f'<line x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#dde3ea"/>'
            f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(label)}</text>'
        )
    return "".join(out)


def _tooltip(session: SessionInfo, detail: str) -> str:
    return f"<title>{_e(session.name)} ({_e(session.id)}) · {_e(_when(session.created_at))} · {_e(detail)}</title>"


def _pass_rate_chart(sessions: Sequence[SessionInfo], reported: set[str]) -> str:
    xs = _x_positions(len(sessions))
    bottom = _H - _BOTTOM

    def to_y(rate: float) -> float:
        return bottom - rate * (bottom - _TOP)

    points, dots = [], []
    for session, x in zip(sessions, xs, strict=True):
        summary = session.summary or ResultSummary()
        rate = pass_rate(summary)
        if rate is None:
            continue
        y = to_y(rate)
        points.append(f"{x:.1f},{y:.1f}")
        ran = summary.total - summary.outcomes.get(Outcome.SKIPPED, 0)
        failing = sum(summary.outcomes.get(o, 0) for o in FAILING)
        colour = "#1565c0" if session.id in reported else "#90a4ae"
        dots.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if session.id in reported else 3.5}" '
            f'fill="{colour}" data-session="{_e(session.id)}" data-rate="{rate:.6f}">'
            f"{_tooltip(session, f'{format_rate(rate)} ({ran - failing} of {ran})')}</circle>"
        )
    grid = _y_grid([(v, f"{v * 100:.0f}%") for v in (0, 0.25, 0.5, 0.75, 1)], to_y)
    line = (
        f'<polyline points="{" ".join(points)}" fill="none" stroke="#1565c0" stroke-width="2"/>'
        if len(points) > 1
        else ""
    )
    return (
        "<figure><figcaption>Pass rate</figcaption>"
        f'<svg id="chart-pass-rate" viewBox="0 0 {_W} {_H}" width="100%" role="img" '
        'aria-label="pass rate per session" xmlns="http://www.w3.org/2000/svg">'
        f"{grid}{line}{''.join(dots)}{_x_labels(sessions, xs)}</svg></figure>"
    )


def _duration_chart(sessions: Sequence[SessionInfo], reported: set[str]) -> str:
    xs = _x_positions(len(sessions))
    bottom = _H - _BOTTOM
    durations = [(s.summary or ResultSummary()).duration for s in sessions]
    top = max(durations, default=0.0) or 1.0
    unit, unit_name = _duration_unit(top)
    step = _nice_step(top / unit)
    axis_top = step * math.ceil(top / unit / step) * unit

    def to_y(seconds: float) -> float:
        return bottom - seconds / axis_top * (bottom - _TOP)

    ticks = []
    value = 0.0
    while value <= axis_top * 1.0001:
        ticks.append((value, f"{value / unit:g} {unit_name}"))
        value += step * unit
    slot = (_W - _LEFT - _RIGHT) / max(len(sessions), 1)
    width = max(2.0, min(36.0, slot * 0.7))
    bars = []
    for session, x, seconds in zip(sessions, xs, durations, strict=True):
        y = to_y(seconds)
        colour = "#1565c0" if session.id in reported else "#90a4ae"
        bars.append(
            f'<rect x="{x - width / 2:.1f}" y="{y:.1f}" width="{width:.1f}" height="{bottom - y:.1f}" '
            f'fill="{colour}" data-session="{_e(session.id)}" data-duration="{seconds:.6f}">'
            f"{_tooltip(session, format_duration(seconds))}</rect>"
        )
    return (
        "<figure><figcaption>Total duration</figcaption>"
        f'<svg id="chart-duration" viewBox="0 0 {_W} {_H}" width="100%" role="img" '
        'aria-label="total duration per session" xmlns="http://www.w3.org/2000/svg">'
        f"{_y_grid(ticks, to_y)}{''.join(bars)}{_x_labels(sessions, xs)}</svg></figure>"
    )


def _trend_section(trend: Sequence[SessionInfo], reported: set[str]) -> str:
    if not trend:
        return ""
    names = sorted({s.name for s in trend})
    which = "session" if len(trend) == 1 else f"{len(trend)} sessions"
    if len(names) == 1:
        named = f"named {_e(names[0])}"
    else:
        named = "(" + ", ".join(_e(n) for n in names[:5]) + (", …" if len(names) > 5 else "") + ")"
    return (
        f'<section id="trend"><h2>Recent sessions</h2>'
        f'<p class="meta">The last {which} {named}, oldest first; '
        "the reported session is highlighted.</p>"
        f'<div class="charts">{_pass_rate_chart(trend, reported)}{_duration_chart(trend, reported)}</div>'
        "</section>"
    )


# --- lists ------------------------------------------------------------------------------------


def _failures_section(failures: Sequence[Result], limit: int) -> str:
    if not failures:
        return '<section id="failures"><h2>Failures</h2><p class="none">No failures.</p></section>'
    items = []
    for result in failures[:limit]:
        css = "failure error" if result.outcome is Outcome.ERROR else "failure"
        message = f"<pre>{_e(result.message)}</pre>" if result.message else ""
        items.append(
            f'<article class="{css}" data-name="{_e(result.name)}" data-outcome="{result.outcome.value}">'
            f'<span class="o" style="color:{COLOURS[result.outcome]}">{_e(result.outcome.value)}</span>'
            f"<h3>{_e(result.name)}</h3>{message}</article>"
        )
    more = len(failures) - limit
    if more > 0:
        items.append(
            f'<p class="none">… and {more} more (see <code>jmp result query --outcome failed</code>).</p>'
        )
    return f'<section id="failures"><h2>Failures ({len(failures)})</h2>{"".join(items)}</section>'


def _slowest_section(slowest: Sequence[Result]) -> str:
    if not slowest:
        return '<section id="slowest"><h2>Slowest tests</h2><p class="none">No durations recorded.</p></section>'
    rows = "".join(
        f'<tr data-name="{_e(r.name)}" data-duration="{r.duration:.6f}">'
        f'<td class="num">{_e(format_duration(r.duration))}</td><td>{_pill(r.outcome)}</td>'
        f'<td class="name">{_e(r.name)}</td></tr>'
        for r in slowest
        if r.duration is not None
    )
    return (
        f'<section id="slowest"><h2>Slowest tests</h2><table class="slowest"><thead><tr><th>duration</th>'
        f"<th>outcome</th><th>test</th></tr></thead><tbody>{rows}</tbody></table></section>"
    )
