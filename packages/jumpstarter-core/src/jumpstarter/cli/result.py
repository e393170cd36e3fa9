"""``jmp result``: add, query, import, compare and report results."""

from __future__ import annotations

import click

from ._base import JmpGroup


@click.group(
    cls=JmpGroup,
    commands={
        "add": ("jumpstarter.cli.result_query:add", "Attach a result to a task."),
        "query": ("jumpstarter.cli.result_query:query", "Find results by task, session, node, outcome, name, time, label."),
        "import": ("jumpstarter.cli.result_report:import_", "Import a JUnit XML file as a task's results."),
        "diff": ("jumpstarter.cli.result_report:diff", "Compare two sessions: newly failing, fixed, new, missing."),
        "history": ("jumpstarter.cli.result_report:history", "One test's outcomes and durations across sessions."),
        "report": ("jumpstarter.cli.result_report:report", "Write a self-contained HTML report."),
    },
)
def result() -> None:
    """Results: add them, query them, import JUnit XML, compare sessions, report."""
