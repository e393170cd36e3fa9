"""The plugin author's path, walked for real.

1. The sandbox node driver (examples/jumpstarter-driver-sandbox) in this process:
   each task in a fresh copy of the workspace, under limits, cleaned up.
2. The same package installed into a FRESH environment (``uv venv`` + ``uv pip
   install`` of the core packages and the example), driven through that
   environment's own ``jmp``: ``jmp drivers``, ``jmp run``, ``jmp sandbox``.
3. The two tutorials in docs/, typed in as a reader would: every file they show is
   written out, every console command they show is run in that fresh environment and
   its output compared with what the tutorial says it prints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from types import ModuleType

import pytest
from conftest import ROOT
from jumpstarter.config import Config, NodeConfig
from jumpstarter.errors import BadRequest, ConfigError, SpawnFailed
from jumpstarter.plugins import get_plugin_manager
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import TaskSpec

EXAMPLE = ROOT / "examples" / "jumpstarter-driver-sandbox"
DOCS = ROOT / "docs"
MIB = 1024 * 1024


# --- 1. the driver, in this process -------------------------------------------------------


@pytest.fixture
def sandbox_plugin(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example's plugin module, imported from its source tree (the fresh
    environment below checks the installed package and its entry point)."""
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    return import_module("jumpstarter_driver_sandbox.plugin")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    (path / "sub").mkdir(parents=True)
    (path / ".git").mkdir()
    (path / "file.txt").write_text("original\n")
    (path / "sub" / "deep.txt").write_text("deep\n")
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return path


def sandbox_protocol(data_dir: Path, plugin: ModuleType, **options: object) -> JumpStarterProtocol:
    config = Config.model_validate(
        {"data_dir": str(data_dir), "nodes": {"box": {"driver": "sandbox", "options": options}}}
    )
    return JumpStarterProtocol(config, plugins=get_plugin_manager(env={}, extra=[plugin]))


def run_task(protocol: JumpStarterProtocol, argv: list[str]) -> tuple[int | None, str]:
    with protocol.create_session("sandbox") as session:
        task = session.connect("box").start(argv)
        output = b"".join(chunk.data for chunk in task.output())
        return task.wait().exit_code, output.decode()


SHOW = 'pwd; echo "$JMP_SANDBOX"; ls -A; cat file.txt; echo changed > file.txt; touch made'


def test_each_task_gets_a_fresh_copy_of_the_workspace(
    data_dir: Path, tmp_path: Path, sandbox_plugin: ModuleType, workspace: Path
) -> None:
    root = tmp_path / "sandboxes"
    protocol = sandbox_protocol(
        data_dir, sandbox_plugin, workspace=str(workspace), ignore=[".git"], root=str(root)
    )
    seen = []
    for _ in range(2):
        code, output = run_task(protocol, ["sh", "-c", SHOW])
        assert code == 0, output
        cwd, sandbox_env, *listing = output.splitlines()
        assert cwd == sandbox_env and Path(cwd).parent == root
        assert Path(cwd).name.startswith(f"jmp-sandbox-{os.getpid()}-")
        assert listing == ["file.txt", "sub", "original"]  # .git ignored; the original file
        seen.append(cwd)
    assert seen[0] != seen[1]
    assert list(root.iterdir()) == []  # both removed
    assert (workspace / "file.txt").read_text() == "original\n"
    assert not (workspace / "made").exists()


def test_limits_apply_to_the_task(
    data_dir: Path, tmp_path: Path, sandbox_plugin: ModuleType
) -> None:
    protocol = sandbox_protocol(
        data_dir,
        sandbox_plugin,
        root=str(tmp_path / "r"),
        max_memory_mb=256,
        max_cpu_seconds=30,
        max_file_size_mb=2,
    )
    code, output = run_task(protocol, ["sh", "-c", "ulimit -v; ulimit -t; ulimit -f"])
    assert (code, output.split()) == (0, [str(256 * 1024), "30", str(2 * MIB // 512)])
    grab = f"bytearray({512 * MIB})"
    code, output = run_task(protocol, [sys.executable, "-c", grab])
    assert code == 1 and output.splitlines()[-1] == "MemoryError"
    code, output = run_task(
        protocol, [sys.executable, "-c", f"bytearray({64 * MIB}); print('fits')"]
    )
    assert (code, output) == (0, "fits\n")


def test_a_missing_command_is_reported_as_on_the_local_node(
    data_dir: Path, tmp_path: Path, sandbox_plugin: ModuleType
) -> None:
    root = tmp_path / "r"
    protocol = sandbox_protocol(data_dir, sandbox_plugin, root=str(root), max_memory_mb=256)
    with protocol.create_session("sandbox") as session, pytest.raises(SpawnFailed) as caught:
        session.connect("box").start(["no-such-command-for-jmp"])
    assert str(caught.value) == "command not found: no-such-command-for-jmp"
    assert caught.value.details["errno"] == "ENOENT"
    assert list(root.iterdir()) == []


def test_stop_ends_the_task_and_removes_its_sandbox(
    data_dir: Path, tmp_path: Path, sandbox_plugin: ModuleType
) -> None:
    root = tmp_path / "r"
    protocol = sandbox_protocol(data_dir, sandbox_plugin, root=str(root))
    with protocol.create_session("sandbox") as session:
        task = session.connect("box").start(["sh", "-c", "sleep 60 & sleep 60"])
        assert len(list(root.iterdir())) == 1
        assert task.stop(grace=1).state.value == "stopped"
    assert list(root.iterdir()) == []


def test_keep_leaves_the_sandbox_and_says_where(
    data_dir: Path, tmp_path: Path, sandbox_plugin: ModuleType
) -> None:
    root = tmp_path / "r"
    protocol = sandbox_protocol(data_dir, sandbox_plugin, root=str(root), keep=True)
    code, output = run_task(protocol, ["sh", "-c", "echo result > out.txt"])
    (kept,) = root.iterdir()
    assert (code, output) == (0, f"jmp-sandbox: kept {kept}\n")
    assert (kept / "out.txt").read_text() == "result\n"


@pytest.mark.anyio
async def test_cwd_is_taken_inside_the_sandbox(
    tmp_path: Path, sandbox_plugin: ModuleType, workspace: Path
) -> None:
    from jumpstarter_driver_sandbox.node import SandboxNodeDriver

    chunks: list[bytes] = []

    class Collect:
        def write(self, stream: str, data: bytes) -> None:
            chunks.append(data)

    node = NodeConfig(
        name="box",
        driver="sandbox",
        options={"workspace": str(workspace), "root": str(tmp_path / "r")},
    )
    driver = SandboxNodeDriver(node)
    process = await driver.spawn(
        TaskSpec(argv=["sh", "-c", "pwd; cat deep.txt"], cwd="sub"), Collect()
    )
    assert await process.wait() == 0
    cwd, deep = b"".join(chunks).decode().splitlines()
    assert (Path(cwd).name, Path(cwd).parent.parent, deep) == ("sub", tmp_path / "r", "deep")
    with pytest.raises(
        BadRequest, match="^the sandbox node takes a cwd inside the sandbox, not /etc$"
    ):
        await driver.spawn(TaskSpec(argv=["pwd"], cwd="/etc"), Collect())
    with pytest.raises(BadRequest, match="^working directory does not exist in the sandbox: nope$"):
        await driver.spawn(TaskSpec(argv=["pwd"], cwd="nope"), Collect())
    assert list((tmp_path / "r").iterdir()) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workspac": "/x"}, "node 'box': options.workspac: Extra inputs are not permitted"),
        ({"max_memory_mb": 0}, "node 'box': options.max_memory_mb: Input should be greater than 0"),
        (
            {"keep": "sometimes"},
            "node 'box': options.keep: Input should be a valid boolean, unable to interpret input",
        ),
        (
            {"workspace": "/no/such/workspace"},
            "node 'box': options.workspace: not a directory: /no/such/workspace",
        ),
    ],
)
def test_bad_options_name_the_node_and_key(
    data_dir: Path, sandbox_plugin: ModuleType, options: dict, message: str
) -> None:
    protocol = sandbox_protocol(data_dir, sandbox_plugin, **options)
    with protocol.create_session("s") as session, pytest.raises(ConfigError) as caught:
        session.connect("box")
    assert str(caught.value) == message


def test_a_sandbox_the_task_made_read_only_is_removed(
    tmp_path: Path, sandbox_plugin: ModuleType
) -> None:
    from jumpstarter_driver_sandbox.node import remove_sandbox

    sandbox = tmp_path / "jmp-sandbox-1-x"
    (sandbox / "locked").mkdir(parents=True)
    (sandbox / "locked" / "file").write_text("x")
    (sandbox / "escape").symlink_to(tmp_path)  # never followed
    (sandbox / "locked").chmod(0o500)
    sandbox.chmod(0o500)
    assert remove_sandbox(sandbox) is True
    assert not sandbox.exists() and tmp_path.exists()


# --- 2. installed into a fresh environment ----------------------------------------------------


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv with only the core packages and the example installed, from
    their source trees, by uv (the dependencies come from uv's cache or PyPI)."""
    uv = shutil.which("uv")
    assert uv is not None, "these tests need uv on PATH (the project is built with it)"
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    packages = ["jumpstarter-protocol", "jumpstarter-core", "jumpstarter-driver-local"]
    for command in (
        [uv, "venv", "-q", "--python", sys.executable, str(venv)],
        [
            uv,
            "pip",
            "install",
            "-q",
            "--python",
            str(venv / "bin" / "python"),
            *(str(ROOT / "packages" / name) for name in packages),
            str(EXAMPLE),
        ],
    ):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
    return venv


def venv_env(venv: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a shell in which ``venv`` is activated: nothing of ours."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("JMP_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", VIRTUAL_ENV=str(venv))
    env.update(JMP_DATA_DIR=str(data_dir), **extra)
    return env


def jmp(venv: Path, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "jmp"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture
def box(tmp_path: Path, workspace: Path, fresh_env: Path) -> tuple[Path, dict[str, str]]:
    """A directory with a config naming the sandbox node ``box`` (and ``keeper``,
    which keeps its sandboxes), and the environment to run the fresh ``jmp`` in."""
    root = tmp_path / "sandboxes"
    (tmp_path / "jumpstarter.toml").write_text(
        "[nodes.box]\n"
        'driver = "sandbox"\n'
        f'options = {{ workspace = "{workspace}", ignore = [".git"], root = "{root}", '
        "max_memory_mb = 256, max_cpu_seconds = 30 }\n"
        "[nodes.keeper]\n"
        'driver = "sandbox"\n'
        f'options = {{ root = "{root}", keep = true }}\n'
    )
    return tmp_path, venv_env(fresh_env, tmp_path / "data")


@pytest.mark.slow
def test_jmp_drivers_of_a_fresh_environment_lists_the_sandbox(
    fresh_env: Path, box: tuple[Path, dict[str, str]]
) -> None:
    cwd, env = box
    done = jmp(fresh_env, "drivers", env=env, cwd=cwd)
    assert (done.returncode, done.stderr) == (0, "")
    out = [" ".join(line.split()) for line in done.stdout.splitlines()]
    assert (
        out[0]
        == "PLUGIN STATUS DISTRIBUTION VERSION TRANSPORTS NODE DRIVERS POWER DRIVERS COMMANDS OTHER HOOKS"
    )
    assert "local loaded jumpstarter-driver-local 0.1.0 local local - - -" in out
    assert "sandbox loaded jumpstarter-driver-sandbox 0.1.0 - sandbox - sandbox -" in out
    report = json.loads(jmp(fresh_env, "drivers", "--format", "json", env=env, cwd=cwd).stdout)
    (sandbox,) = [p for p in report["plugins"] if p["name"] == "sandbox"]
    assert sandbox == {
        "name": "sandbox",
        "module": "jumpstarter_driver_sandbox.plugin",
        "distribution": "jumpstarter-driver-sandbox",
        "version": "0.1.0",
        "status": "loaded",
        "error": None,
        "transports": [],
        "node_drivers": [
            {"name": "sandbox", "class": "jumpstarter_driver_sandbox.node:SandboxNodeDriver"}
        ],
        "power_drivers": [],
        "commands": ["sandbox"],
        "hooks": ["jmp_register_commands", "jmp_register_node_drivers"],
    }


@pytest.mark.slow
def test_jmp_run_through_the_installed_sandbox(
    fresh_env: Path, box: tuple[Path, dict[str, str]], workspace: Path
) -> None:
    cwd, env = box
    script = f"{SHOW}; ulimit -v; ulimit -t"
    done = jmp(fresh_env, "run", "--node", "box", "--", "sh", "-c", script, env=env, cwd=cwd)
    assert (done.returncode, done.stderr) == (0, "")
    sandbox, sandbox_env, *rest = done.stdout.splitlines()
    assert sandbox == sandbox_env and Path(sandbox).parent == cwd / "sandboxes"
    assert rest == ["file.txt", "sub", "original", str(256 * 1024), "30"]
    assert list((cwd / "sandboxes").iterdir()) == []
    assert (workspace / "file.txt").read_text() == "original\n"
    python = str(fresh_env / "bin" / "python")
    done = jmp(
        fresh_env,
        "run",
        "--node",
        "box",
        "--",
        python,
        "-c",
        f"bytearray({512 * MIB})",
        env=env,
        cwd=cwd,
    )
    assert done.returncode == 1 and done.stderr.splitlines()[-1] == "MemoryError"
    done = jmp(fresh_env, "run", "--node", "box", "--", "no-such-command-for-jmp", env=env, cwd=cwd)
    assert (done.returncode, done.stderr) == (
        127,
        "jmp: error: command not found: no-such-command-for-jmp\n",
    )


@pytest.mark.slow
def test_the_installed_plugin_adds_jmp_sandbox(
    fresh_env: Path, box: tuple[Path, dict[str, str]]
) -> None:
    cwd, env = box
    root = cwd / "sandboxes"
    done = jmp(fresh_env, "run", "--node", "keeper", "--", "touch", "evidence", env=env, cwd=cwd)
    (kept,) = root.iterdir()
    assert (done.returncode, done.stderr) == (0, f"jmp-sandbox: kept {kept}\n")
    in_use = root / f"jmp-sandbox-{os.getpid()}-busy"  # this process is alive: in use
    in_use.mkdir()
    done = jmp(fresh_env, "sandbox", "list", "--root", str(root), env=env, cwd=cwd)
    assert (done.returncode, done.stdout) == (
        0,
        "".join(sorted([f"{kept}\tleft over\n", f"{in_use}\tin use\n"])),
    )
    done = jmp(
        fresh_env, "sandbox", "clean", "--dry-run", env=env, cwd=cwd
    )  # roots from the config
    assert f"would remove {kept}\n" in done.stdout and str(in_use) not in done.stdout
    done = jmp(fresh_env, "sandbox", "clean", "--root", str(root), env=env, cwd=cwd)
    assert (done.returncode, done.stdout) == (0, f"removed {kept}\n")
    assert list(root.iterdir()) == [in_use]


# --- 3. the tutorials, typed in -----------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)$")
FILE_HEADER = re.compile(r"^# ([\w.-]+(?:/[\w.-]+)*\.(?:toml|py))$")
NICENESS_NOTE = "<!-- output depends on the niceness of the shell -->"


def tutorial_steps(text: str) -> list[tuple[str, object]]:
    """The tutorial's code blocks in order: ``("file", (path, content))`` for a block
    whose first line is ``# path``, ``("console", [(command, expected lines,
    check)])`` for a console block."""
    lines = text.splitlines()
    steps: list[tuple[str, object]] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        body = lines[i + 1 : end]
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        if fence.group(1) == "console":
            check = before != NICENESS_NOTE or os.nice(0) == 0
            commands: list[tuple[str, list[str], bool]] = []
            for line in body:
                if line.startswith("$ "):
                    commands.append((line[2:], [], check))
                else:
                    commands[-1][1].append(line)
            steps.append(("console", commands))
        elif body and (header := FILE_HEADER.match(body[0])):
            steps.append(("file", (header.group(1), "\n".join(body[1:]) + "\n")))
        i = end + 1
    return steps


def shows(expected: list[str], actual: list[str]) -> bool:
    """True when ``expected`` lines appear in ``actual`` in order (other lines may come
    between: other plugins may be installed), blanks collapsed, ``...`` matching
    anything."""
    remaining = iter(" ".join(line.split()) for line in actual)
    for line in expected:
        parts = " ".join(line.split()).split("...")
        pattern = re.compile(".*".join(re.escape(part) for part in parts) + "$")
        if not any(pattern.match(got) for got in remaining):
            return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("tutorial", ["writing-a-node-driver.md", "writing-a-transport.md"])
def test_the_tutorial_works_as_written(fresh_env: Path, tmp_path: Path, tutorial: str) -> None:
    env = venv_env(fresh_env, tmp_path / "data")
    steps = tutorial_steps((DOCS / tutorial).read_text())
    assert [kind for kind, _ in steps].count("file") >= 5
    for kind, payload in steps:
        if kind == "file":
            path, content = payload
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_text(content)
            continue
        for command, expected, check in payload:
            done = subprocess.run(
                ["bash", "-c", command],
                cwd=tmp_path,
                env=env,
                text=True,
                timeout=120,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert done.returncode == 0, f"$ {command}\n{done.stdout}"
            if check:
                assert shows(expected, done.stdout.splitlines()), f"$ {command}\n{done.stdout}"


def test_the_tutorials_are_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/writing-a-node-driver.md)" in readme
    assert "(docs/writing-a-transport.md)" in readme


# --- files ---------------------------------------------------------------------------


def test_sandbox_files_go_into_the_workspace_and_stay_in_it(
    data_dir: Path, tmp_path: Path, sandbox_plugin: ModuleType, workspace: Path
) -> None:
    from jumpstarter.errors import BadRequest

    protocol = sandbox_protocol(data_dir, sandbox_plugin, workspace=str(workspace), root=str(tmp_path / "boxes"))
    (tmp_path / "fw.bin").write_bytes(b"firmware")
    with protocol.create_session("sandbox") as session:
        node = session.connect("box")
        assert "files" in node.info.capabilities
        (put,) = node.put(tmp_path / "fw.bin", "fw.bin")
        assert put.target == str(workspace / "fw.bin")
        task = node.start(["cat", "fw.bin"])  # a fresh sandbox, a copy of the workspace
        assert b"".join(c.data for c in task.output()) == b"firmware"
        node.get("sub/deep.txt", tmp_path / "deep.txt")
        assert (tmp_path / "deep.txt").read_text() == "deep\n"
        with pytest.raises(BadRequest, match=f"^../fw.bin: outside the files root {workspace} of node 'box'$"):
            node.get("../fw.bin", tmp_path / "x")
    bare = sandbox_protocol(data_dir, sandbox_plugin, root=str(tmp_path / "boxes"))
    with bare.create_session("sandbox") as session:
        node = session.connect("box")
        assert "files" not in node.info.capabilities
        with pytest.raises(BadRequest, match="^node 'box' has no 'files' capability"):
            node.put(tmp_path / "fw.bin", "fw.bin")
