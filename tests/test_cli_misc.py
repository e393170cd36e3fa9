"""``jmp node info``, ``jmp config``, ``jmp protocol schema``, ``jmp completion``, what
``jmp --help`` imports, and output on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import JMP, invoke_jmp, run_jmp
from jumpstarter.cli import cli
from jumpstarter.config import TEMPLATE, Config, load_config, resolve_paths


@pytest.fixture
def runner(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # The user config dir, in the test's own directory (never the real one).
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return CliRunner()


def test_node_info(runner: CliRunner) -> None:
    from jumpstarter import __version__

    text = runner.invoke(cli, ["node", "info"]).stdout.splitlines()
    assert [line.split(maxsplit=1) for line in text] == [
        ["node", "local"],
        ["driver", "local"],
        ["labels", "-"],
        ["capabilities", "exec shell env cwd timeout process-group files stdin pty"],
        ["limits", "max_message_size=16777216 output_chunk=1048576 max_transfer=17179869184"],
        ["protocol", "1"],
        ["jumpstarter", __version__],
    ]
    info = json.loads(runner.invoke(cli, ["node", "info", "--format", "json"]).stdout)
    assert (info["name"], info["driver"], info["protocol_version"]) == ("local", "local", 1)
    for result in (runner.invoke(cli, ["node", "info", "--node", "nowhere"]), run_jmp("node", "info", "--node", "nowhere")):
        code = getattr(result, "exit_code", getattr(result, "returncode", None))
        assert (code, result.stdout, result.stderr) == (3, "", "jmp: error: unknown node 'nowhere'; known nodes: local\n")


CONFIG = """
default_node = "lab"
data_dir = "state"

[nodes.lab]
transport = "local"
token_file = "secret.token"
labels = { board = "rpi4", "odd key" = "x\\"y" }
options = { api_token = "hunter2", depth = 3, nested = { password = "hunter3" } }
"""


def test_config_show_is_the_effective_config_and_never_a_token(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "jumpstarter.toml").write_text(CONFIG)
    (tmp_path / "secret.token").write_text("s3cr3t-token-value\n")
    shown = runner.invoke(cli, ["config", "show"], env={"JMP_DATA_DIR": None})
    assert shown.exit_code == 0, shown.stderr
    assert shown.stdout.startswith(f"# The configuration in effect ({tmp_path / 'jumpstarter.toml'}, with defaults")
    for secret in ("s3cr3t", "hunter2", "hunter3"):
        assert secret not in shown.stdout
    assert f'token_file = "{tmp_path / "secret.token"}"' in shown.stdout
    parsed = Config.model_validate(tomllib.loads(shown.stdout))
    expected = resolve_paths(load_config(tmp_path / "jumpstarter.toml", env={}))
    assert parsed.data_dir == tmp_path / "state" and parsed.store == f"sqlite:///{tmp_path / 'state' / 'jumpstarter.db'}"
    assert parsed.nodes["lab"].labels == expected.nodes["lab"].labels == {"board": "rpi4", "odd key": 'x"y'}
    assert parsed.nodes["lab"].options == {"api_token": "<hidden>", "depth": 3, "nested": {"password": "<hidden>"}}
    assert parsed.nodes["local"].transport == "local"  # the built-in node is listed too
    doc = json.loads(runner.invoke(cli, ["config", "show", "--format", "json"], env={"JMP_DATA_DIR": None}).stdout)
    assert doc["source"] == str(tmp_path / "jumpstarter.toml") and doc["default_node"] == "lab"
    with_env = runner.invoke(cli, ["config", "show", "--format", "json"], env={"JMP_DATA_DIR": str(tmp_path / "d")})
    assert json.loads(with_env.stdout)["data_dir"] == str(tmp_path / "d")


@pytest.mark.parametrize("how", ["runner", "process"])
def test_config_show_with_a_broken_file(runner: CliRunner, tmp_path: Path, how: str) -> None:
    (tmp_path / "jumpstarter.toml").write_text("[nodes.lab]\nlabels = 3\n")
    if how == "runner":
        result = runner.invoke(cli, ["config", "show"])
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
    else:
        done = run_jmp("config", "show", env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "xdg")})
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    assert (code, stdout) == (1, "")
    assert stderr == "jmp: error: jumpstarter.toml: nodes.lab.labels: Input should be a valid dictionary\n"


def test_config_path_and_init(runner: CliRunner, tmp_path: Path) -> None:
    user_file = tmp_path / "xdg" / "jumpstarter" / "config.toml"
    where = runner.invoke(cli, ["config", "path"])
    assert (where.stdout, where.stderr) == (
        f"{user_file}\n", "jmp: no config file: the defaults are in use ('jmp config init' writes one here)\n"
    )
    assert json.loads(runner.invoke(cli, ["config", "path", "--format", "json"]).stdout) == {
        "path": str(user_file), "exists": False
    }
    made = runner.invoke(cli, ["config", "init"])
    assert (made.exit_code, made.stdout) == (0, f"wrote {user_file}\n")
    assert user_file.read_text() == TEMPLATE
    assert load_config(user_file, env={}).model_dump() == Config().model_dump()  # all commented out: defaults
    assert runner.invoke(cli, ["config", "path"]).stdout == f"{user_file}\n"
    user_file.write_text("# mine\n")
    again = runner.invoke(cli, ["config", "init"])
    assert (again.exit_code, again.stderr) == (1, f"jmp: error: {user_file} exists already; --force replaces it\n")
    assert user_file.read_text() == "# mine\n"
    assert runner.invoke(cli, ["config", "init", "--force"]).exit_code == 0 and user_file.read_text() == TEMPLATE
    local = runner.invoke(cli, ["config", "init", "--path", "jumpstarter.toml"])
    assert (local.exit_code, local.stdout) == (0, "wrote jumpstarter.toml\n")
    assert runner.invoke(cli, ["config", "path"]).stdout == f"{tmp_path / 'jumpstarter.toml'}\n"


def test_protocol_schema(runner: CliRunner) -> None:
    from jumpstarter_protocol import json_schema

    done = run_jmp("protocol", "schema")
    assert done.returncode == 0 and json.loads(done.stdout) == json_schema()


def test_completion_scripts_and_completing(runner: CliRunner) -> None:
    for shell in ("bash", "zsh", "fish"):
        script = runner.invoke(cli, ["completion", shell])
        assert script.exit_code == 0 and "_JMP_COMPLETE" in script.stdout
    bad = runner.invoke(cli, ["completion", "tcsh"])
    assert bad.exit_code == 2 and bad.stderr == (
        "jmp: error: Invalid value for '{bash|zsh|fish}': 'tcsh' is not one of 'bash', 'zsh', 'fish'."
        " (try 'jmp completion --help')\n"
    )

    def complete(words: str) -> str:
        env = {**os.environ, "_JMP_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        return subprocess.run([JMP], env=env, capture_output=True, text=True, timeout=60).stdout

    assert complete("jmp ta") == "plain,task\n"
    assert complete("jmp task l") == "plain,list\nplain,logs\n"
    assert complete("jmp result query --format j") == "plain,json\nplain,junit\n"


HEAVY = ["pydantic", "rich", "anyio", "jumpstarter.store", "jumpstarter.node.server", "jumpstarter.node.agent"]
MINE = ["task", "result_query", "node_info", "config", "protocol", "completion", "_output", "_params"]


def test_version_and_help_import_nothing_heavy() -> None:
    script = (
        "import sys\n"
        "from jumpstarter.cli import cli\n"
        "try:\n"
        "    cli(sys.argv[1:], prog_name='jmp')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n"
    )
    version = subprocess.run([sys.executable, "-c", script, "--version"], capture_output=True, text=True, timeout=60)
    loaded = set(version.stderr.split())
    assert [m for m in HEAVY if m in loaded] == []
    help_ = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True, timeout=60)
    loaded = set(help_.stderr.split())
    assert [m for m in ["rich", "jumpstarter.store", "jumpstarter.node.server", "jumpstarter.node.agent"] if m in loaded] == []
    assert [m for m in MINE if f"jumpstarter.cli.{m}" in loaded] == []


def _on_a_terminal(*args: str) -> str:
    """Run ``jmp`` with stdout and stderr on a pseudo-terminal; what it drew."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([JMP, *args], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    data = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            data += chunk
    finally:
        process.wait(timeout=60)
        os.close(leader)
    return data.decode(errors="replace")


def test_on_a_terminal_tables_are_rich_and_waits_show_progress(data_dir: Path) -> None:
    task_id = run_jmp("task", "start", "--", "sleep", "1.5").stdout.strip()
    drawn = _on_a_terminal("task", "wait", task_id)
    assert "Waiting for task" in drawn and f"{task_id} succeeded (exit 0)" in drawn
    table = _on_a_terminal("task", "list")
    assert "\x1b[" in table and "succeeded" in table  # styled: bold header, coloured state
    plain = run_jmp("task", "list").stdout
    assert "\x1b[" not in plain and plain.split()[:3] == ["ID", "NODE", "STATE"]
    assert run_jmp("task", "wait", task_id).stderr == ""  # no progress when stderr is not a terminal


@pytest.mark.parametrize("how", ["runner", "process"])
@pytest.mark.parametrize(
    "args", [["result", "query"], ["task", "list"], ["result", "history", "suite/case"], ["node", "info"]]
)
def test_a_named_store_that_is_not_there_is_not_made(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, args: list[str]
) -> None:
    typo = tmp_path / "stroe" / "jumpstarter.db"  # a mistyped JMP_STORE
    monkeypatch.setenv("JMP_STORE", str(typo))
    code, stdout, stderr = invoke_jmp(how, args)
    assert (code, stdout) == (3, "")
    assert stderr == f"jmp: error: no store at {typo} (named by JMP_STORE or the config file): nothing was recorded there\n"
    assert not typo.parent.exists()  # nothing made where the typo points


def test_a_named_store_is_made_by_the_first_command_that_writes(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "new" / "jumpstarter.db"
    monkeypatch.setenv("JMP_STORE", f"sqlite:///{store}")
    assert run_jmp("run", "--", "true").returncode == 0
    assert store.exists()
    listing = run_jmp("task", "list")
    assert listing.returncode == 0 and "succeeded" in listing.stdout
