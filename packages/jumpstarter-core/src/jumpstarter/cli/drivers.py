"""``jmp drivers``: every installed plugin and what it registers.

Built from the plugin manager itself: each plugin's registration hooks are called on
their own, so every transport, node driver and command is credited to the plugin
that registered it, and a plugin that is broken is shown with why, beside the rest.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

import click

from ._base import handle_errors

REGISTRATION_HOOKS = {
    "jmp_register_transports": "transports",
    "jmp_register_node_drivers": "node_drivers",
    "jmp_register_power_drivers": "power_drivers",
}


@click.command()
@click.option(
    "-o",
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table: for people (a rich table on a terminal); json: for scripts.",
)
@handle_errors
def drivers(fmt: str) -> None:
    """List installed plugins and what each registers.

    For each entry point of the jmp.plugins group: its distribution and version,
    the transports, node drivers and power drivers it registers, the commands it adds to jmp, the
    other hooks it implements, and, if it failed to load, why. JMP_PLUGINS and
    JMP_DISABLE_PLUGINS apply (plugins they leave out are listed as disabled);
    JMP_TRACE_PLUGINS=1 prints each hook call on stderr.

    \b
    --format json prints one object:
      {"plugins": [{"name", "module", "distribution", "version",
                    "status": "loaded" | "failed" | "disabled",
                    "error": why it failed or was disabled, or null,
                    "transports": [{"name", "class"}], "node_drivers": [{"name", "class"}],
                    "power_drivers": [{"name", "class"}],
                    "commands": [names], "hooks": [every hook it implements]}],
       "problems": [a line for each name more than one plugin registers]}

    Plugins are sorted by name. The exit code is 0 even when a plugin failed:
    look at "status".
    """
    report = describe_plugins()
    if fmt == "json":
        click.echo(json.dumps(report, indent=2))
    elif sys.stdout.isatty():
        _print_rich(report)
    else:
        _print_plain(report)


def describe_plugins(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What ``jmp drivers --format json`` prints, as a dict."""
    from jumpstarter.plugins.manager import ENTRY_POINT_GROUP, get_plugin_manager

    env = os.environ if env is None else env
    plugins = get_plugin_manager(env)
    manager = plugins.manager
    rows: list[dict[str, Any]] = []
    for info in plugins.entry_points:
        row = _row(info.name, info.value, info.distribution, info.version)
        rows.append(row)
        if info.error:
            row.update(status="failed", error=info.error)
            continue
        plugin = manager.get_plugin(info.name)
        if plugin is None:
            continue  # a second entry point of the same name: the first one was loaded
        row["hooks"] = sorted(caller.name for caller in manager.get_hookcallers(plugin) or [])
        _registrations(manager, plugin, row)
    loaded = {info.name for info in plugins.entry_points}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in loaded:
            row = _row(
                ep.name,
                ep.value,
                ep.dist.name if ep.dist else None,
                ep.dist.version if ep.dist else None,
            )
            row.update(status="disabled", error=_why_disabled(ep.name, env))
            rows.append(row)
    rows.sort(key=lambda row: row["name"])
    return {"plugins": rows, "problems": _conflicts(rows)}


def _row(name: str, value: str, distribution: str | None, version: str | None) -> dict[str, Any]:
    return {
        "name": name,
        "module": value,
        "distribution": distribution,
        "version": version,
        "status": "loaded",
        "error": None,
        "transports": [],
        "node_drivers": [],
        "power_drivers": [],
        "commands": [],
        "hooks": [],
    }


def _registrations(manager: Any, plugin: object, row: dict[str, Any]) -> None:
    """Call ``plugin``'s registration hooks alone and record what they register.
    Through pluggy's hook caller, so JMP_TRACE_PLUGINS shows the calls. A hook that
    raises marks the plugin failed, with why; the other plugins are still listed."""
    others = [p for p in manager.get_plugins() if p is not plugin]
    calls: list[tuple[str, dict[str, Any]]] = []
    for hook, key in REGISTRATION_HOOKS.items():

        def register(name: str, target: object, *, _key: str = key) -> None:
            row[_key].append({"name": name, "class": _qualified(target)})

        calls.append((hook, {"register": register}))
    scratch = click.Group("jmp")
    calls.append(("jmp_register_commands", {"cli": scratch}))
    for hook, kwargs in calls:
        if hook not in row["hooks"]:
            continue
        try:
            manager.subset_hook_caller(hook, remove_plugins=others)(**kwargs)
        except Exception as exc:  # a bug in the plugin's hook: show it, list the others
            row.update(status="failed", error=f"{hook} raised {type(exc).__name__}: {exc}")
            return
    row["commands"] = sorted(scratch.commands)


def _qualified(target: object) -> str:
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None)
    return f"{module}:{name}" if module and name else repr(target)


def _why_disabled(name: str, env: Mapping[str, str]) -> str:
    disabled = {n.strip() for n in env.get("JMP_DISABLE_PLUGINS", "").split(",")}
    if name in disabled:
        return "disabled by JMP_DISABLE_PLUGINS"
    return "not named in JMP_PLUGINS"


def _conflicts(rows: list[dict[str, Any]]) -> list[str]:
    problems = []
    for key, kind in (
        ("transports", "transport"),
        ("node_drivers", "node driver"),
        ("power_drivers", "power driver"),
    ):
        owners: dict[str, list[str]] = {}
        for row in rows:
            for entry in row[key]:
                owners.setdefault(entry["name"], []).append(row["name"])
        for name, plugins in sorted(owners.items()):
            if len(plugins) > 1:
                by = " and by ".join(f"plugin {p!r}" for p in plugins)
                problems.append(f"{kind} {name!r} is registered twice: by {by}")
    return problems


COLUMNS = (
    "PLUGIN",
    "STATUS",
    "DISTRIBUTION",
    "VERSION",
    "TRANSPORTS",
    "NODE DRIVERS",
    "POWER DRIVERS",
    "COMMANDS",
    "OTHER HOOKS",
)


def _cells(row: dict[str, Any]) -> list[str]:
    own = {*REGISTRATION_HOOKS, "jmp_register_commands"}
    return [
        row["name"],
        row["status"],
        row["distribution"] or "-",
        row["version"] or "-",
        ", ".join(entry["name"] for entry in row["transports"]) or "-",
        ", ".join(entry["name"] for entry in row["node_drivers"]) or "-",
        ", ".join(entry["name"] for entry in row["power_drivers"]) or "-",
        ", ".join(row["commands"]) or "-",
        ", ".join(hook for hook in row["hooks"] if hook not in own) or "-",
    ]


def _notes(report: dict[str, Any]) -> list[str]:
    """One line per plugin that did not load, and per conflict."""
    lines = []
    for row in report["plugins"]:
        if row["status"] == "failed":
            lines.append(f"{row['name']}: failed to load: {row['error']}")
        elif row["status"] == "disabled":
            lines.append(f"{row['name']}: {row['error']}")
    return lines + report["problems"]


def _print_plain(report: dict[str, Any]) -> None:
    if not report["plugins"]:
        click.echo("no plugins installed (none in the jmp.plugins entry-point group)")
        return
    table = [list(COLUMNS), *(_cells(row) for row in report["plugins"])]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        click.echo("  ".join([*cells, line[-1]]))
    for note in _notes(report):
        click.echo(note)


def _print_rich(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    if not report["plugins"]:
        console.print("no plugins installed (none in the jmp.plugins entry-point group)")
        return
    rows = [_cells(row) for row in report["plugins"]]
    # A terminal is narrow: leave out the list columns no plugin fills.
    shown = [i for i in range(len(COLUMNS)) if i < 4 or any(cells[i] != "-" for cells in rows)]
    table = Table(box=None, header_style="bold")
    for i in shown:
        # Names and versions stay whole; the lists wrap between their items.
        table.add_column(COLUMNS[i], no_wrap=i < 4, overflow="fold")
    styles = {"loaded": "green", "failed": "red", "disabled": "yellow"}
    for row, cells in zip(report["plugins"], rows, strict=True):
        texts = [Text(cells[i]) for i in shown]
        texts[1].stylize(styles[row["status"]])
        table.add_row(*texts)
    console.print(table)
    for note in _notes(report):
        console.print(
            note, style="red" if "failed" in note or "twice" in note else "yellow", markup=False
        )
