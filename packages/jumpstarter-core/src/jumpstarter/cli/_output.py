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


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
    """A table: rich on a terminal, columns aligned by spaces otherwise."""
    if on_terminal():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(box=None, header_style="bold", pad_edge=False)
        for header in headers:
            # Ids are copied into the next command: never wrap or cut them.
            table.add_column(header, no_wrap=header in _ID_COLUMNS, min_width=12 if header in _ID_COLUMNS else None)
        for row in rows:
            table.add_row(*(Text(c[0], style=c[1]) if isinstance(c, tuple) else Text(c) for c in row))
        Console(highlight=False).print(table)
        return
    texts = [[c[0] if isinstance(c, tuple) else c for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in texts)]) for i, h in enumerate(headers)]
    for row in [list(headers), *texts]:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Cell]]) -> None:
    """``key  value`` lines, keys aligned (a record, where a table has rows)."""
    width = max(len(key) for key, _ in pairs)
    if on_terminal():
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False)
        for key, value in pairs:
            text, style = value if isinstance(value, tuple) else (value, "")
            console.print(Text(key.ljust(width), style="bold"), Text(text, style=style))
        return
    for key, value in pairs:
        click.echo(f"{key.ljust(width)}  {value[0] if isinstance(value, tuple) else value}".rstrip())


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
