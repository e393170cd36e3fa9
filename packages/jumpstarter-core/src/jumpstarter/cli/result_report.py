"""``jmp result import|diff|history|report``: JUnit XML in, two sessions compared, one
test across sessions, and an HTML report.

A SESSION argument is a session id or a session name. Many sessions may share a
name (a nightly run opens a new session named ``nightly`` every night): the name
means the newest of them, and ``NAME~N`` the one N before it (``nightly~1`` is last
night's).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._base import EXIT_ERROR, call_node, handle_errors
from ._complete import complete_node, complete_session, complete_task
from ._output import format_option, iso, print_json, print_table, seconds, state_cell, when

if TYPE_CHECKING:
    from jumpstarter_protocol import Result, SessionInfo

    from jumpstarter.results.report import Change, SessionDiff

node_option = click.option(
    "-n", "--node", shell_complete=complete_node, help="Node whose store to read (default: the config's default_node)."
)

PAGE = 1000
"""Results asked for per request when a command reads a whole session."""
EXIT_REGRESSIONS = 1


# --- reading sessions through a node --------------------------------------------------------


def glob_escape(text: str) -> str:
    """``text`` as a glob that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", text)


async def resolve_session(node: Any, ref: str) -> SessionInfo:
    """The session ``ref`` names: an id, a name (the newest session of that name), or
    ``NAME~N`` (the one N before the newest). :class:`NotFound` if there is none."""
    from jumpstarter_protocol import ListSessions

    from jumpstarter.errors import NotFound

    found = await node.request(ListSessions(name=glob_escape(ref), with_results=False, limit=1))
    if found.sessions:
        return found.sessions[0]
    back = re.fullmatch(r"(.+)~(\d+)", ref)
    if back is not None:
        name, steps = back[1], int(back[2])
        if steps < 10_000:
            found = await node.request(
                ListSessions(name=glob_escape(name), with_results=False, limit=steps + 1)
            )
            if len(found.sessions) > steps:
                return found.sessions[steps]
            if found.sessions:
                count = len(found.sessions)
                raise NotFound(
                    f"no session {ref!r}: only {count} session{'s are' if count > 1 else ' is'} named {name!r}",
                    details={"session": ref},
                )
    raise NotFound(f"no session named {ref!r}", details={"session": ref})


async def session_results(node: Any, session: SessionInfo) -> list[Result]:
    """Every result of ``session``, oldest first, read page by page."""
    results: list[Result] = []
    cursor = None
    while True:
        page = await node.query_results(session=session.id, limit=PAGE, cursor=cursor)
        results += page.results
        if page.next_cursor is None:
            return results
        cursor = page.next_cursor


def _session_json(session: SessionInfo) -> dict[str, Any]:
    return {"id": session.id, "name": session.name, "created_at": iso(session.created_at)}


def _session_text(session: SessionInfo) -> str:
    return f"{session.name!r} ({session.id}, {when(session.created_at)})"


def _first_line(text: str | None, width: int = 100) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"


# --- import -------------------------------------------------------------------------------------


@click.command("import")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True)
@click.option(
    "-t", "--task", "task_id", required=True, metavar="TASK", shell_complete=complete_task, help="The task the results belong to."
)
@click.option(
    "--max-size",
    type=click.IntRange(min=1),
    metavar="BYTES",
    default=None,
    help="Refuse larger files (default: 64 MiB each).",
)
@node_option
@click.pass_obj
@handle_errors
def import_(state, paths, task_id, max_size, node) -> None:
    """Import the test cases of JUnit XML files as results of TASK.

    A PATH is a file, a directory (every *.xml file below it, as Surefire and
    Gradle write one file per class), a glob ('build/**/TEST-*.xml', quoted so
    the shell leaves it alone) or '-' for stdin. Every file is read before any
    result is stored, and all of them are stored in one transaction: a file that
    is not JUnit XML (not well-formed, entity declarations, external references,
    over --max-size) is refused with one line naming it and nothing is imported
    (exit 2).

    Every <testcase> becomes one result: named CLASSNAME/NAME (a pytest case by
    its node id, tests/test_x.py::test_y), its outcome from its <failure>,
    <error> or <skipped> element or a not-run status (passed without one), its
    reruns as attempts, its duration, timestamps, file and line; a suite that
    reports an error without test cases becomes one error result. The README's
    "JUnit XML" section has the whole mapping.

    \b
    Examples:
      pytest --junitxml=junit.xml; jmp result import junit.xml --task 3f2a9c1b0d4e
      jmp result import target/surefire-reports --task $id
      jmp result import 'build/test-results/**/TEST-*.xml' --task $id
    """
    from jumpstarter.results.junit import MAX_SIZE, parse_junit

    limit = max_size or MAX_SIZE
    files = _junit_files(paths)

    def warn(message: str) -> None:
        click.echo(f"jmp: warning: {message}", err=True)

    specs = []
    for file in files:
        specs += _parse_file(file, limit, parse_junit, warn)
    shown = files[0] if len(files) == 1 else f"{len(files)} files"
    if not specs:
        click.echo(f"{shown}: no test cases; nothing imported")
        return

    async def add(n: Any) -> list[int]:
        return await n.add_results(task_id, specs)

    ids = call_node(state, add, node=node, writes=True)
    counts: dict[str, int] = {}
    for spec in specs:
        counts[spec.outcome.value] = counts.get(spec.outcome.value, 0) + 1
    detail = ", ".join(f"{n} {o}" for o, n in counts.items())
    origin = f" from {len(files)} files" if len(files) > 1 else ""
    click.echo(
        f"imported {len(ids)} result{'' if len(ids) == 1 else 's'}{origin} into task {task_id} ({detail})"
    )


def _junit_files(paths: tuple[str, ...]) -> list[str]:
    """The files ``paths`` name, in order, each once: directories walked for *.xml,
    globs expanded. A path that names nothing is a usage error."""
    import glob

    files: list[str] = []
    for path in paths:
        if path == "-" or Path(path).is_file():
            found = [path]
        elif Path(path).is_dir():
            found = sorted(str(p) for p in Path(path).rglob("*.xml") if p.is_file())
            if not found:
                raise click.UsageError(f"{path}: a directory without *.xml files")
        elif glob.has_magic(path):
            found = sorted(p for p in glob.glob(path, recursive=True) if Path(p).is_file())
            if not found:
                raise click.UsageError(f"{path}: no file matches")
        else:
            raise click.UsageError(f"{path}: no such file or directory")
        files += [f for f in found if f not in files]
    return files


def _parse_file(file: str, limit: int, parse: Any, warn: Any) -> list[Any]:
    """The results of one JUnit file, read a piece at a time (never whole)."""
    if file == "-":
        return parse(sys.stdin.buffer, source="-", max_size=limit, warn=warn)
    try:
        with open(file, "rb") as f:
            size = Path(file).stat().st_size
            if size > limit:
                from jumpstarter.errors import BadRequest

                raise BadRequest(f"{file}: {size} bytes is more than the limit of {limit} bytes")
            return parse(f, source=file, max_size=limit, warn=warn)
    except OSError as exc:
        click.echo(f"jmp: error: cannot read {file}: {exc.strerror}", err=True)
        sys.exit(EXIT_ERROR)


async def _failing_names(node: Any, session: SessionInfo) -> set[str]:
    names: set[str] = set()
    cursor = None
    while True:
        page = await node.query_results(
            session=session.id, outcomes=["failed", "error"], limit=PAGE, cursor=cursor
        )
        names.update(r.name for r in page.results)
        if page.next_cursor is None:
            return names
        cursor = page.next_cursor


# --- diff ---------------------------------------------------------------------------------------


@click.command()
@click.argument("session_a", metavar="SESSION_A", shell_complete=complete_session)
@click.argument("session_b", metavar="SESSION_B", shell_complete=complete_session)
@click.option(
    "--fail-on-missing", is_flag=True, help="Also exit 1 when a test of A has no result in B."
)
@node_option
@format_option("table", "json")
@click.pass_obj
@handle_errors
def diff(state, session_a, session_b, fail_on_missing, node, fmt) -> None:
    """Compare the results of SESSION_B with those of SESSION_A, test by test.

    \b
    newly failing  failed or errored in B, did not in A
    fixed          failed or errored in A, not in B
    still failing  failed or errored in both
    new            in B only
    missing        in A only

    A session is an id or a name (the newest session of that name); NAME~N is the
    one N before it, so 'nightly~1 nightly' compares last night with tonight.

    \b
    Exit codes, for CI to gate on:
      0  no regressions
      1  regressions: a newly failing test, or a new test that fails (with
         --fail-on-missing also a test of A missing from B)
      3  a session was not found
    (and, as every command: 2 usage error, 5 node error, 1 other errors)
    """
    from jumpstarter.results.report import diff_results

    async def compare(n: Any) -> tuple[Any, Any, list[Result], list[Result]]:
        a = await resolve_session(n, session_a)
        b = await resolve_session(n, session_b)
        return a, b, await session_results(n, a), await session_results(n, b)

    a, b, before, after = call_node(state, compare, node=node)
    result = diff_results(before, after)
    failing = bool(result.regressions) or (fail_on_missing and bool(result.missing))
    if fmt == "json":
        print_json(_diff_json(a, b, result, failing))
    else:
        _print_diff(a, b, result)
    sys.exit(EXIT_REGRESSIONS if failing else 0)


def _change_json(change: Change) -> dict[str, Any]:
    def side(r: Result | None) -> dict[str, Any] | None:
        if r is None:
            return None
        return {
            "id": r.id,
            "outcome": r.outcome.value,
            "duration": r.duration,
            "message": r.message,
        }

    return {"name": change.name, "a": side(change.before), "b": side(change.after)}


def _diff_json(
    a: SessionInfo, b: SessionInfo, result: SessionDiff, failing: bool
) -> dict[str, Any]:
    groups = ("newly_failing", "fixed", "still_failing", "new", "missing")
    return {
        "a": _session_json(a),
        "b": _session_json(b),
        **{g: [_change_json(c) for c in getattr(result, g)] for g in groups},
        "unchanged": result.unchanged,
        "regressions": len(result.regressions),
        "exit_code": EXIT_REGRESSIONS if failing else 0,
    }


def _print_diff(a: SessionInfo, b: SessionInfo, result: SessionDiff) -> None:
    click.echo(f"A: {_session_text(a)}")
    click.echo(f"B: {_session_text(b)}")
    sections = [
        ("Newly failing", result.newly_failing, "red"),
        ("Fixed", result.fixed, "green"),
        ("Still failing", result.still_failing, "yellow"),
        ("New", result.new, ""),
        ("Missing", result.missing, ""),
    ]
    for title, changes, colour in sections:
        if not changes:
            continue
        click.echo()
        click.secho(f"{title} ({len(changes)}):", fg=colour or None, bold=True)
        rows = []
        for change in changes:
            old, new = change.before, change.after
            shown = new or old
            assert shown is not None
            rows.append(
                [
                    old.outcome.value if old else "-",
                    state_cell(new.outcome.value) if new else "-",
                    change.name,
                    _first_line(new.message if new else None, 80),
                ]
            )
        print_table(["A", "B", "NAME", "MESSAGE"], rows)
    new_failing = sum(1 for c in result.new if c in result.regressions)
    click.echo()
    click.echo(
        f"{len(result.newly_failing)} newly failing, {len(result.fixed)} fixed, "
        f"{len(result.still_failing)} still failing, {len(result.new)} new"
        f"{f' ({new_failing} failing)' if new_failing else ''}, {len(result.missing)} missing, "
        f"{result.unchanged} unchanged"
    )


# --- history ------------------------------------------------------------------------------------


def _result_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value:
        raise click.BadParameter("a result name must not be empty")
    return value


@click.command()
@click.argument("name", callback=_result_name)
@click.option(
    "-s",
    "--session",
    metavar="SESSION",
    shell_complete=complete_session,
    help="Only sessions with this id or name (a glob: 'nightly*').",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="Newest runs to show.",
)
@node_option
@format_option("table", "json")
@click.pass_obj
@handle_errors
def history(state, name, session, limit, node, fmt) -> None:
    """One test's outcomes and durations across sessions, newest first.

    NAME is the exact result name (a pytest node id, suite/case...). A test that
    failed in some of the runs shown and passed in others is marked flaky.
    Exit 3 if no result has that name.

    \b
    Examples:
      jmp result history 'tests/test_net.py::test_reconnect'
      jmp result history boot --session 'nightly*' --limit 50
    """
    from jumpstarter_protocol import QueryHistory

    from jumpstarter.errors import NotFound
    from jumpstarter.results.report import is_flaky, outcome_changes

    data = call_node(
        state, lambda n: n.request(QueryHistory(name=name, session=session, limit=limit)), node=node
    )
    if not data.results:
        where = f" in sessions matching {session!r}" if session else ""
        raise NotFound(f"no results named {name!r}{where}", details={"name": name})
    outcomes = [r.outcome for r in reversed(data.results)]  # oldest first
    flaky = is_flaky(outcomes)
    if fmt == "json":
        print_json(
            {
                "name": name,
                "flaky": flaky,
                "changes": outcome_changes(outcomes),
                "runs": [
                    {
                        "session": {
                            "id": r.session_id,
                            "name": data.session_names.get(r.session_id or ""),
                        },
                        "task_id": r.task_id,
                        "created_at": iso(r.created_at),
                        "outcome": r.outcome.value,
                        "duration": r.duration,
                        "message": r.message,
                    }
                    for r in data.results
                ],
            }
        )
        return
    rows = [
        [
            when(r.created_at),
            data.session_names.get(r.session_id or "", "-"),
            state_cell(r.outcome.value),
            seconds(r.duration),
            _first_line(r.message, 70),
        ]
        for r in data.results
    ]
    print_table(["WHEN", "SESSION", "OUTCOME", "DURATION", "MESSAGE"], rows)
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome.value] = counts.get(outcome.value, 0) + 1
    durations = [r.duration for r in data.results if r.duration is not None]
    line = f"{len(outcomes)} run{'' if len(outcomes) == 1 else 's'}: " + ", ".join(
        f"{n} {o}" for o, n in sorted(counts.items(), key=lambda item: -item[1])
    )
    if durations:
        line += f"; duration {seconds(min(durations))} to {seconds(max(durations))}"
    if data.truncated:
        line += " (older runs left out: all of them would not fit in one reply)"
    click.echo(line)
    if flaky:
        changes = outcome_changes(outcomes)
        click.secho(
            f"flaky: it failed in some of these runs and passed in others "
            f"(the outcome changed {changes} time{'' if changes == 1 else 's'})",
            fg="yellow",
            bold=True,
        )


# --- report -------------------------------------------------------------------------------------


@click.command()
@click.option(
    "-s",
    "--session",
    "sessions",
    multiple=True,
    metavar="SESSION",
    shell_complete=complete_session,
    help="Session to report (repeatable; default: the newest session with results).",
)
@click.option(
    "-o",
    "--output",
    default="report.html",
    show_default=True,
    metavar="FILE",
    help="Where to write the report ('-': stdout).",
)
@click.option(
    "--last",
    type=click.IntRange(1, 1000),
    default=20,
    show_default=True,
    help="Sessions drawn in the charts.",
)
@click.option(
    "--trend",
    metavar="GLOB",
    help="Names of the sessions drawn in the charts (default: the reported session's name).",
)
@click.option("--title", help="Title of the report (default: 'Test report: SESSION').")
@node_option
@click.pass_obj
@handle_errors
def report(state, sessions, output, last, trend, title, node) -> None:
    """Write a self-contained HTML report: one file, no network fetches.

    It shows the run (node, command, labels), the counts per outcome and the pass
    rate, the pass rate and total duration of the recent sessions as charts, every
    failure grouped by the first line of its message (each marked new, still
    failing since a date, or flaky, against the earlier sessions of the same name;
    tracebacks open at their end), a breakdown per suite, the slowest tests and
    the list of all tests (folded). The charts show the --last sessions with
    results whose name matches --trend (default: the reported session's name, so a
    trend never mixes unrelated sessions).

    \b
    Examples:
      jmp result report -o report.html                 # the newest session
      jmp result report --session nightly --last 30 -o nightly.html
    """
    from jumpstarter_protocol import ListSessions

    from jumpstarter._version import __version__
    from jumpstarter.errors import NotFound
    from jumpstarter.results.report import ReportData, render_report

    async def gather(n: Any) -> ReportData:
        if sessions:
            chosen = [await resolve_session(n, ref) for ref in sessions]
        else:
            newest = await n.request(ListSessions(with_results=True, limit=1))
            if not newest.sessions:
                raise NotFound("no session has results yet; nothing to report")
            chosen = newest.sessions
        results: list[Result] = []
        tasks = []
        for session in chosen:
            results += await session_results(n, session)
            tasks += await n.list_tasks(session=session.id, limit=1000)
        pattern = trend if trend is not None else glob_escape(chosen[-1].name)
        recent = (
            await n.request(ListSessions(name=pattern, with_results=True, limit=last))
        ).sessions
        # The sessions of the same name before the reported one, for marking each
        # failure new, still failing or flaky: only their failing names are read.
        same_name = (
            await n.request(
                ListSessions(name=glob_escape(chosen[-1].name), with_results=True, limit=last + 1)
            )
        ).sessions
        before = [s for s in same_name if s.created_at < chosen[-1].created_at][:last]
        earlier = [(s, await _failing_names(n, s)) for s in before]
        names = ", ".join(s.name for s in chosen)
        return ReportData(
            title=title or f"Test report: {names}",
            sessions=chosen,
            results=results,
            trend=list(reversed(recent)),
            tasks=tasks,
            earlier=earlier,
            version=__version__,
        )

    data = call_node(state, gather, node=node)
    page = render_report(data)
    if output == "-":
        click.echo(page, nl=False)
    else:
        try:
            Path(output).write_text(page, encoding="utf-8")
        except OSError as exc:
            click.echo(f"jmp: error: cannot write {output}: {exc.strerror}", err=True)
            sys.exit(EXIT_ERROR)
    state.protocol.plugins.hook.jmp_results_exported(results=data.results, format="html")
    if output != "-":
        failing = sum(1 for r in data.results if r.outcome.value in ("failed", "error"))
        click.echo(
            f"wrote {output}: {len(data.results)} result{'' if len(data.results) == 1 else 's'} "
            f"of {', '.join(repr(s.name) for s in data.sessions)}, {failing} failing",
            err=True,
        )
