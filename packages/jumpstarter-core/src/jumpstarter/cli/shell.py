"""``jmp shell``: a login shell on a node, on a terminal of its own."""

from __future__ import annotations

import os
import sys

import click

from ._base import handle_errors

LOGIN_SHELL = 'shell=$(getent passwd "$(id -u)" | cut -d: -f7); exec "${shell:-/bin/sh}" -l'
"""Run on the node: the login shell its user has in the password database."""


@click.command()
@click.option("--node", help="Node to open the shell on (default: the config's default_node, 'local').")
@click.option("-s", "--session", default="shell", show_default=True, help="Session name.")
@click.option("--grace", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when jmp itself is stopped.")
@click.pass_obj
@handle_errors
def shell(state, node, session, grace) -> None:
    """Open the node user's login shell on a terminal (a PTY) of the node.

    Your terminal is in raw mode until the shell exits (and put back then): every
    key goes to the shell, Ctrl-C included, and its size follows yours. jmp exits
    with the shell's exit code. The same as `jmp run -t --shell -- 'exec $SHELL -l'`
    with the node user's shell from the password database.

    \b
    Examples:
      jmp shell
      jmp shell --node lab1
    """
    if not os.isatty(0):
        raise click.UsageError("a shell needs a terminal, and stdin is not one (pipe commands to 'jmp run' instead)")
    import anyio

    from .run import TaskFiles, _run

    spec = {"shell": LOGIN_SHELL, "env": {}, "name": "shell"}
    connect = {"wait": None, "duration": None, "select": None}
    sys.exit(anyio.run(_run, state.protocol, node, session, None, spec, grace, connect, TaskFiles.none(), None, True, True))
