"""What results mean beyond the store: JUnit XML both ways, comparisons of sessions
and histories of tests, and the HTML report.

Pure functions over protocol models: no I/O but what a caller hands in, and nothing
of the client, the node or the store, so the CLI, a node and a plugin can all use it.

- :mod:`jumpstarter.results.junit` — :func:`parse_junit`, :func:`export_junit`;
- :mod:`jumpstarter.results.report` — diffs, flakiness and the HTML report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jumpstarter._lazy import lazy_exports

_EXPORTS = {
    "parse_junit": "jumpstarter.results.junit",
    "export_junit": "jumpstarter.results.junit",
    "diff_results": "jumpstarter.results.report",
    "render_report": "jumpstarter.results.report",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from jumpstarter.results.junit import export_junit, parse_junit
    from jumpstarter.results.report import diff_results, render_report
