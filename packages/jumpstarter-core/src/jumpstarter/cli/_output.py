"""How ``jmp`` commands print: rich tables and colour when stdout is a terminal, plain
aligned text otherwise, and ``--format json`` for scripts (its shapes are documented
in the README, "Output for scripts"). rich is imported only when a terminal needs it.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from jumpstarter_protocol import TaskInfo, TaskSpec

F = TypeVar("F", bound=Callable[..., Any])

STATE_STYLES = {
    "pending": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "stopped": "magenta",
    "timed_out": "red",
    "lost": "red",
    "passed": "green",
    "skipped": "yellow",
    "error": "red",
    "xfail": "yellow",
    "xpass": "magenta",
}

Cell = str | tuple[str, str]
"""A table cell: text, or (text, rich style) coloured on a terminal."""


def format_option(*choices: str, help: str | None = None) -> Callable[[F], F]:
    """``-o``/``--format`` with ``choices``; the first is the default (``-o`` as
    kubectl spells it)."""
    return click.option(
        "-o",
        "--format",
        "fmt",
        type=click.Choice(choices),
        default=choices[0],
        show_default=True,
        help=help or f"Output: {choices[0]} for people, json for scripts.",
    )


def quiet_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that what is still
    buffered (and Python's flush at exit) fails nowhere."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # not a real file (click's test runner): nothing to flush at exit
    finally:
        os.close(devnull)


def on_terminal() -> bool:
    return sys.stdout.isatty()


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def iso(when: Any) -> str:
    """A UTC datetime as every JSON document of jmp writes it: ``…Z``."""
    return when.isoformat().replace("+00:00", "Z")


def dump(model: Any) -> Any:
    """A protocol model as JSON-ready data, without the message ``type``."""
    return model.model_dump(mode="json", exclude={"type"} if "type" in type(model).model_fields else None)


_ID_COLUMNS = {"ID", "TASK", "TASK ID", "SESSION", "LEASE"}
_NAME_COLUMNS = {"NAME"}
# Shrunk first when a table is wider than the terminal: the columns a person reads
# last. Then any other column, right to left; names and ids last of all.
_SHRINK_FIRST = ("MESSAGE", "COMMAND", "METRICS", "LABELS", "ADDED", "CREATED", "WHEN")
_GAP = 2


def fit_widths(headers: Sequence[str], natural: Sequence[int], width: int) -> list[int]:
    """Column widths for a table of ``natural`` widths on a terminal ``width`` wide:
    as they are when they fit; otherwise the least important columns shrink first
    (:data:`_SHRINK_FIRST`, then the others right to left), each down to its header,
    then are left out (width 0) in the same order; a result name is cut only when
    nothing else is left to give, an id never."""
    widths = list(natural)
    excess = sum(widths) + _GAP * (len(widths) - 1) - width
    protected = _ID_COLUMNS | _NAME_COLUMNS
    order = [headers.index(h) for h in _SHRINK_FIRST if h in headers]
    order += [i for i in reversed(range(len(headers))) if i not in order and headers[i] not in protected]
    for i in order:
        if excess <= 0:
            break
        floor = min(widths[i], max(len(headers[i]), 4) if headers[i] not in protected else 12)
        cut = min(excess, widths[i] - floor)
        widths[i] -= cut
        excess -= cut
    # Still too wide: leave out whole columns, least important first (an id other
    # than the row's own before the outcome it explains), before cutting a name.
    first = [i for i in order if headers[i] in _SHRINK_FIRST]
    ids = [i for i, h in enumerate(headers) if h in _ID_COLUMNS and h != "ID"]
    for i in [*first, *ids, *(i for i in order if i not in first)]:
        if excess <= 0 or not widths[i]:
            continue
        excess -= widths[i] + _GAP
        widths[i] = 0
    names = [i for i, h in enumerate(headers) if h in _NAME_COLUMNS]
    for i in names:
        if excess > 0:
            cut = min(excess, widths[i] - 12)
            widths[i] -= max(cut, 0)
            excess -= max(cut, 0)
    return widths


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: control characters (an escape sequence
    that retitles the window or clears the screen, a newline inside a name) shown
    escaped, ``\\x1b]0;…\\x07``. Only what is printed changes; the store keeps them."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _cell(cell: Cell) -> tuple[str, str]:
    text, style = cell if isinstance(cell, tuple) else (cell, "")
    return printable(text), style


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    """A table: rich on a terminal (fitted with :func:`fit_widths`), columns aligned
    by spaces otherwise (never cut: a tool reads it)."""
    texts = [[_cell(c)[0] for c in row] for row in rows]
    natural = [max([len(h), *(len(r[i]) for r in texts)]) for i, h in enumerate(headers)]
    if on_terminal():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        console = Console(highlight=False)
        widths = fit_widths(list(headers), natural, console.width)
        table = Table(box=None, header_style="bold", pad_edge=False)
        shown = [i for i, w in enumerate(widths) if w]
        for i in shown:
            table.add_column(headers[i], no_wrap=True, overflow="ellipsis", width=widths[i])
        for row in rows:
            cells = [_cell(row[i]) for i in shown]
            table.add_row(*(Text(text, style=style) for text, style in cells))
        console.print(table)
        return
    for row in [list(headers), *texts]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, natural, strict=True)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Cell]]) -> None:
    """``key  value`` lines, keys aligned (a record, where a table has rows)."""
    width = max(len(key) for key, _ in pairs)
    if on_terminal():
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False)
        for key, value in pairs:
            console.print(Text(key.ljust(width), style="bold"), Text(*_cell(value)))
        return
    for key, value in pairs:
        click.echo(f"{key.ljust(width)}  {_cell(value)[0]}".rstrip())


@contextmanager
def progress(text: str) -> Iterator[Callable[[str], None]]:
    """A spinner with ``text`` on stderr while the block runs, on a terminal only.
    Yields a function that changes the text."""
    if not sys.stderr.isatty():
        yield lambda _text: None
        return
    from rich.console import Console

    with Console(stderr=True).status(text) as status:
        yield lambda new: status.update(new)


class IdleSpinner:
    """A spinner on stderr (on a terminal only) that shows after ``after`` seconds
    without output and hides as soon as output comes: for ``logs --follow``. Use it
    in ``with``; call :meth:`output` before writing each piece of output."""

    def __init__(self, text: str, after: float = 2.0) -> None:
        self.text = text
        self.after = after
        self.enabled = sys.stderr.isatty()
        self._last = time.monotonic()
        self._status: Any = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="jmp-spinner", daemon=True)

    def __enter__(self) -> IdleSpinner:
        if self.enabled:
            self._watcher.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed.set()
        self.output()
        if self._watcher.is_alive():
            self._watcher.join()

    def output(self) -> None:
        with self._lock:
            self._last = time.monotonic()
            if self._status is not None:
                self._status.stop()
                self._status = None

    def _watch(self) -> None:
        while not self._closed.wait(0.25):
            with self._lock:
                if self._status is None and time.monotonic() - self._last >= self.after:
                    from rich.console import Console

                    self._status = Console(stderr=True).status(self.text)
                    self._status.start()


# --- words for values --------------------------------------------------------------------


def when(value: datetime | None) -> str:
    """A timestamp in local time, to the second."""
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 60:
        return f"{value:.3g}s" if value < 10 else f"{value:.1f}s"
    minutes, secs = divmod(value, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}h{minutes:02d}m{secs:02.0f}s" if hours else f"{minutes}m{secs:02.0f}s"


def command_line(spec: TaskSpec) -> str:
    return spec.shell if spec.shell is not None else shlex.join(spec.argv or [])


def exit_text(info: TaskInfo) -> str:
    """How a task ended, in words: ``exit 3``, ``killed by SIGTERM``…"""
    import signal

    code = info.exit_code
    if code is None:
        return "-"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def describe(info: TaskInfo) -> str:
    """One line: ``<id> <state> (<how it ended>)``."""
    state = info.state.value
    if info.state.finished and info.exit_code is not None:
        return f"{info.id} {state} ({exit_text(info)})"
    return f"{info.id} {state}"


def state_cell(value: str) -> Cell:
    return (value, STATE_STYLES.get(value, ""))
