"""``jmp sandbox``: the sandboxes on this machine, and removing those left behind.

Added to ``jmp`` through the ``jmp_register_commands`` hook (see plugin.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click
from jumpstarter.cli._base import fail, handle_errors

from .node import owner_pid, remove_sandbox


@click.group()
def sandbox() -> None:
    """Sandboxes of the sandbox node driver: list them, remove left-over ones.

    A sandbox is left over when its task ran with `keep = true`, or when the node
    process that made it died before it could clean up. One whose node process
    still runs is in use and never removed.
    """


@sandbox.command("list")
@click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Look here (repeatable); default: the temp dir and each sandbox node's root.",
)
@click.pass_obj
@handle_errors
def list_sandboxes(state, roots: tuple[Path, ...]) -> None:
    """List sandboxes: path, then `in use` or `left over`."""
    for directory, in_use in _find(state, roots):
        click.echo(f"{directory}\t{'in use' if in_use else 'left over'}")


@sandbox.command("clean")
@click.option(
    "--root",
    "roots",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Look here (repeatable); default: the temp dir and each sandbox node's root.",
)
@click.option("-n", "--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@click.pass_obj
@handle_errors
def clean(state, roots: tuple[Path, ...], dry_run: bool) -> None:
    """Remove left-over sandboxes, one line per sandbox removed."""
    failed = []
    for directory, in_use in _find(state, roots):
        if in_use:
            continue
        if dry_run:
            click.echo(f"would remove {directory}")
        elif remove_sandbox(directory):
            click.echo(f"removed {directory}")
        else:
            failed.append(directory)
    if failed:
        fail(f"cannot remove {len(failed)} sandbox(es): {', '.join(map(str, failed))}")


def _find(state, roots: tuple[Path, ...]) -> list[tuple[Path, bool]]:
    found = []
    for root in roots or _configured_roots(state):
        try:
            entries = sorted(root.iterdir())
        except FileNotFoundError:
            continue
        for directory in entries:
            pid = owner_pid(directory)
            if pid is not None and directory.is_dir() and not directory.is_symlink():
                found.append((directory, _alive(pid)))
    return found


def _configured_roots(state) -> list[Path]:
    """The root of every node whose driver is ``sandbox``, and the default root."""
    config = state.protocol.config
    roots = [Path(tempfile.gettempdir())]
    for node in config.nodes.values():
        if node.driver == "sandbox" and node.options.get("root"):
            roots.append(Path(str(node.options["root"])).expanduser())
    return list(dict.fromkeys(root.resolve() for root in roots))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, and not ours to judge
    return True
