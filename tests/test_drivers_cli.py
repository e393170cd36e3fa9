"""``jmp drivers``, plugin commands (``jmp_register_commands``) and the plugin switches
(JMP_PLUGINS, JMP_DISABLE_PLUGINS, JMP_TRACE_PLUGINS), against plugins that are really
installed: a distribution's metadata and module in a directory on the path, found
through the ``jmp.plugins`` entry points like any other."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import JMP, run_jmp
from jumpstarter.cli import cli

DEMO = '''\
import click
from jumpstarter import hookimpl


class PigeonTransport:
    """Registered only: jmp drivers lists it, nothing connects through it."""


class AbacusDriver:
    """Registered only, like PigeonTransport."""


@hookimpl
def jmp_register_transports(register):
    register("pigeon", PigeonTransport)


@hookimpl
def jmp_register_node_drivers(register):
    register("abacus", AbacusDriver)


@hookimpl
def jmp_register_commands(cli):
    @click.command()
    @click.argument("who", default="world")
    def hello(who):
        """Say hello (from a plugin)."""
        click.echo(f"hello, {who}")

    cli.add_command(hello)


@hookimpl
def jmp_task_finished(task):
    print(f"demo: task finished: {task.state.value}")
'''

RAISING = """\
from jumpstarter import hookimpl


@hookimpl
def jmp_register_transports(register):
    raise RuntimeError("no pigeons today")
"""

TWICE = """\
from jumpstarter import hookimpl


@hookimpl
def jmp_register_transports(register):
    register("local", object)
"""


def install(
    site: Path, dist: str, version: str, entry_point: str, module: str, source: str | None
) -> None:
    """Install a distribution the way an installer leaves it: a module, a dist-info."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[jmp.plugins]\n{entry_point} = {module}\n")
    if source is not None:
        (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> Iterator[Path]:
    """A site dir on sys.path (and on PYTHONPATH, for real ``jmp`` subprocesses) with
    the plugin ``demo`` of distribution ``jmp-demo-plugin`` installed; tests add more.

    ``jmp``'s group remembers the commands plugins added; each test starts afresh."""
    path = tmp_path / "site"
    path.mkdir()
    install(path, "jmp-demo-plugin", "2.5", "demo", "jmp_demo_plugin", DEMO)
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.setenv("PYTHONPATH", str(path))
    for name in ("JMP_PLUGINS", "JMP_DISABLE_PLUGINS", "JMP_TRACE_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cli, "commands", dict(cli.commands))
    monkeypatch.setattr(cli, "_plugins_loaded", False)
    yield path
    for module in ("jmp_demo_plugin", "jmp_raising_plugin", "jmp_twice_plugin"):
        sys.modules.pop(module, None)


def lines(text: str) -> list[str]:
    """Output lines with runs of blanks made one: column widths depend on what else
    is installed."""
    return [" ".join(line.split()) for line in text.splitlines()]


def plugin(report: dict, name: str) -> dict:
    (found,) = [p for p in report["plugins"] if p["name"] == name]
    return found


HEADER = "PLUGIN STATUS DISTRIBUTION VERSION TRANSPORTS NODE DRIVERS POWER DRIVERS COMMANDS OTHER HOOKS"
DEMO_ROW = "demo loaded jmp-demo-plugin 2.5 pigeon abacus - hello jmp_task_finished"
LOCAL_ROW = "local loaded jumpstarter-driver-local 0.1.0 local local - - -"


# --- jmp drivers --------------------------------------------------------------------------


def test_drivers_lists_each_plugin_and_what_it_registers(site: Path) -> None:
    result = CliRunner().invoke(cli, ["drivers"])
    assert result.exit_code == 0, result.output
    out = lines(result.stdout)
    assert out[0] == HEADER
    assert DEMO_ROW in out and LOCAL_ROW in out
    assert out[1:] == sorted(out[1:])  # one row per plugin, by name
    assert result.stderr == ""


def test_drivers_on_a_terminal_is_a_rich_table(site: Path) -> None:
    primary, secondary = os.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm"}
    process = subprocess.Popen([JMP, "drivers"], stdout=secondary, stderr=subprocess.PIPE, env=env)
    os.close(secondary)
    output = b""
    try:
        while chunk := os.read(primary, 65536):
            output += chunk
    except OSError:  # EIO: the terminal's other end is closed, jmp is done
        pass
    finally:
        os.close(primary)
    assert process.wait(timeout=60) == 0
    assert process.stderr is not None and process.stderr.read() == b""
    process.stderr.close()
    text = output.decode()
    assert "\x1b[" in text  # colour and bold: a terminal gets rich's table
    out = lines(re.sub(r"\x1b\[[0-9;]*m", "", text))
    assert out[0] == HEADER and DEMO_ROW in out and LOCAL_ROW in out


def test_drivers_json_is_stable(site: Path) -> None:
    result = CliRunner().invoke(cli, ["drivers", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert plugin(report, "demo") == {
        "name": "demo",
        "module": "jmp_demo_plugin",
        "distribution": "jmp-demo-plugin",
        "version": "2.5",
        "status": "loaded",
        "error": None,
        "transports": [{"name": "pigeon", "class": "jmp_demo_plugin:PigeonTransport"}],
        "node_drivers": [{"name": "abacus", "class": "jmp_demo_plugin:AbacusDriver"}],
        "power_drivers": [],
        "commands": ["hello"],
        "hooks": [
            "jmp_register_commands",
            "jmp_register_node_drivers",
            "jmp_register_transports",
            "jmp_task_finished",
        ],
    }
    local = plugin(report, "local")
    assert local["node_drivers"] == [
        {"name": "local", "class": "jumpstarter_driver_local.node:LocalNodeDriver"}
    ]
    assert local["transports"] == [
        {"name": "local", "class": "jumpstarter_driver_local.transport:LocalTransport"}
    ]
    serial = plugin(report, "serial")
    assert serial["power_drivers"] == [
        {"name": "command", "class": "jumpstarter_driver_serial.power:CommandPower"},
        {"name": "http", "class": "jumpstarter_driver_serial.power:HttpPower"},
    ]
    assert report["problems"] == []


def test_a_plugin_that_fails_is_listed_with_why_beside_the_others(site: Path) -> None:
    install(site, "jmp-broken-plugin", "1.0", "broken", "no_such_module_for_jmp", None)
    install(site, "jmp-raising-plugin", "0.3", "raising", "jmp_raising_plugin", RAISING)
    result = CliRunner().invoke(cli, ["drivers"])
    assert result.exit_code == 0, result.output
    out = lines(result.stdout)
    assert "broken failed jmp-broken-plugin 1.0 - - - - -" in out
    assert "raising failed jmp-raising-plugin 0.3 - - - - -" in out
    assert DEMO_ROW in out  # the others are still there, whole
    assert out[-2:] == [
        "broken: failed to load: ModuleNotFoundError: No module named 'no_such_module_for_jmp'",
        "raising: failed to load: jmp_register_transports raised RuntimeError: no pigeons today",
    ]
    report = json.loads(CliRunner().invoke(cli, ["drivers", "--format", "json"]).stdout)
    assert plugin(report, "raising")["status"] == "failed"
    assert (
        plugin(report, "broken")["error"]
        == "ModuleNotFoundError: No module named 'no_such_module_for_jmp'"
    )


def test_a_name_registered_twice_is_a_problem_jmp_drivers_names(site: Path) -> None:
    install(site, "jmp-twice-plugin", "1.0", "twice", "jmp_twice_plugin", TWICE)
    result = CliRunner().invoke(cli, ["drivers"])
    assert result.exit_code == 0, result.output
    problem = "transport 'local' is registered twice: by plugin 'local' and by plugin 'twice'"
    assert lines(result.stdout)[-1] == problem
    report = json.loads(CliRunner().invoke(cli, ["drivers", "--format", "json"]).stdout)
    assert report["problems"] == [problem]


def test_drivers_bad_format_is_a_usage_error(site: Path) -> None:
    result = CliRunner().invoke(cli, ["drivers", "--format", "yaml"])
    assert result.exit_code == 2
    assert result.stderr == (
        "jmp: error: Invalid value for '-o' / '--format': 'yaml' is not one of 'table', 'json'."
        " (try 'jmp drivers --help')\n"
    )


# --- jmp_register_commands -------------------------------------------------------------------


def test_a_plugin_adds_a_subcommand(site: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["hello", "you"])
    assert (result.exit_code, result.stdout) == (0, "hello, you\n")
    help_text = runner.invoke(cli, ["--help"]).stdout
    assert "  hello       Say hello (from a plugin)." in help_text
    assert "  drivers     List installed plugins and what they register." in help_text
    unknown = runner.invoke(cli, ["goodbye"])
    assert unknown.exit_code == 2
    assert unknown.stderr == "jmp: error: No such command 'goodbye'. (try 'jmp --help')\n"


def test_a_plugin_subcommand_through_the_real_jmp(site: Path) -> None:
    done = run_jmp("hello", "from a subprocess")
    assert (done.returncode, done.stdout, done.stderr) == (0, "hello, from a subprocess\n", "")


# --- the switches, through the real jmp ---------------------------------------------------------


def test_jmp_plugins_loads_only_those(site: Path) -> None:
    env = {**os.environ, "JMP_PLUGINS": "demo"}
    report = json.loads(run_jmp("drivers", "--format", "json", env=env).stdout)
    assert plugin(report, "demo")["status"] == "loaded"
    assert (plugin(report, "local")["status"], plugin(report, "local")["error"]) == (
        "disabled",
        "not named in JMP_PLUGINS",
    )
    done = run_jmp("run", "--", "echo", "no", env=env)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        "jmp: error: unknown transport 'local'; installed: pigeon (JMP_PLUGINS is set: only 'demo' may load)\n"
    )
    assert run_jmp("hello", env=env).stdout == "hello, world\n"


def test_empty_jmp_plugins_turns_autoload_off(site: Path) -> None:
    env = {**os.environ, "JMP_PLUGINS": ""}
    report = json.loads(run_jmp("drivers", "--format", "json", env=env).stdout)
    assert {p["status"] for p in report["plugins"]} == {"disabled"}
    done = run_jmp("run", "--", "echo", "no", env=env)
    assert (done.returncode, done.stderr) == (
        1,
        "jmp: error: unknown transport 'local'; installed: none "
        "(JMP_PLUGINS is set but empty: no plugin may load)\n",
    )
    done = run_jmp("hello", env=env)
    assert done.returncode == 2
    assert done.stderr == "jmp: error: No such command 'hello'. (try 'jmp --help')\n"


def test_jmp_disable_plugins_leaves_those_out(site: Path) -> None:
    env = {**os.environ, "JMP_DISABLE_PLUGINS": "demo"}
    out = lines(run_jmp("drivers", env=env).stdout)
    assert "demo disabled jmp-demo-plugin 2.5 - - - - -" in out
    assert out[-1] == "demo: disabled by JMP_DISABLE_PLUGINS"
    done = run_jmp("run", "--", "echo", "still works", env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "still works\n", "")
    assert run_jmp("hello", env=env).returncode == 2


def test_jmp_trace_plugins_prints_each_hook_call(site: Path) -> None:
    env = {**os.environ, "JMP_TRACE_PLUGINS": "1", "JMP_PLUGINS": "local,demo"}
    done = run_jmp("run", "--", "true", env=env)
    assert done.returncode == 0, done.stderr
    trace = done.stderr.splitlines()
    assert "jmp: hook jmp_register_node_drivers(register) -> [local]" in trace
    assert "jmp: hook jmp_task_finished(task) -> [demo]" in trace
    assert (
        trace[trace.index("jmp: hook jmp_task_finished(task) -> [demo]") + 1]
        == "jmp: hook jmp_task_finished done"
    )
    assert done.stdout == "demo: task finished: succeeded\n"
    # jmp drivers calls each plugin's registration hooks alone: the trace shows whose.
    trace = run_jmp("drivers", env=env).stderr.splitlines()
    assert "jmp: hook jmp_register_commands(cli) -> [demo]" in trace
    assert "jmp: hook jmp_register_transports(register) -> [local]" in trace
    assert "jmp: hook jmp_register_transports(register) -> [demo]" in trace
