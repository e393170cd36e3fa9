"""The ``jmp`` command line.

Subcommands live in their own modules and are imported only when asked for, so
``jmp --version`` and ``jmp --help`` stay fast. Plugins add commands through the
``jmp_register_commands`` hook.

Exit codes (also in ``jmp --help``)::

    0    success
    1    error (configuration, plugin, anything not listed below)
    2    usage error (a bad option or argument)
    3    not found (unknown task, node or session)
    4    conflict (the node is leased by another session, a task that cannot start)
    5    node error (unreachable, refused, version mismatch, failure on the node)
    124  the task timed out (run, wait)
    126  the task's command could not be executed
    127  the task's command was not found
    128+N the task was killed by signal N; 130 after Ctrl-C
    else  the task's own exit code (run, wait)
"""

from __future__ import annotations

import click

from jumpstarter._version import __version__

from ._base import JmpGroup

EPILOG = """\b
Exit codes: 0 ok, 1 error, 2 usage, 3 not found, 4 conflict, 5 node error;
run and wait exit with the task's own code (124 timeout, 126/127 cannot
execute / not found, 128+N killed by signal N, 130 after Ctrl-C).
"""


@click.group(
    name="jmp",
    cls=JmpGroup,
    commands={
        "run": ("jumpstarter.cli.run:run", "Run a command on a node and stream its output."),
        "cp": ("jumpstarter.cli.cp:cp", "Copy files to and from a node (NODE:PATH)."),
        "shell": ("jumpstarter.cli.shell:shell", "Open a login shell on a node, on a terminal."),
        "task": ("jumpstarter.cli.task:task", "Create, start, stop, wait for, follow and list tasks."),
        "result": ("jumpstarter.cli.result:result", "Add, query, import, compare and report results."),
        "session": ("jumpstarter.cli.session:session", "List sessions: their nodes, tasks and results."),
        "node": ("jumpstarter.cli.node:node", "Describe a node, or serve this machine as one."),
        "lease": ("jumpstarter.cli.registry:lease", "List or release leases in a shared store."),
        "power": ("jumpstarter.cli.power:power", "Switch a node's board on, off, or power cycle it."),
        "console": ("jumpstarter.cli.console:console", "Attach to a node's console, or print its transcript."),
        "drivers": ("jumpstarter.cli.drivers:drivers", "List installed plugins and what they register."),
        "config": ("jumpstarter.cli.config:config", "Show, locate or create the configuration."),
        "protocol": ("jumpstarter.cli.protocol:protocol", "The wire protocol: export its JSON Schema."),
        "completion": ("jumpstarter.cli.completion:completion", "Print a shell completion script."),
    },
    epilog=EPILOG,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, "-V", "--version", prog_name="jmp", message="%(prog)s %(version)s")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="JMP_CONFIG",
    help="Config file (default: ./jumpstarter.toml, then the user config dir).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """Jumpstarter: run work on nodes and keep what came of it.

    \b
    Quick start:
      jmp run -- echo hello          run a command on the local node
      jmp run --node lab1 -- make    ...or on a configured node
    """
    from ._base import State

    ctx.obj = State(config_path)


def main() -> None:
    cli(prog_name="jmp")
