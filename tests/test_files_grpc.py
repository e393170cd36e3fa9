"""Files over gRPC: `jmp node serve` as a real process with a token, reached by real
`jmp` processes, directly and through the connection-cutting TCP proxy of
tests/test_grpc.py (uploads resume from the node's offset, downloads from the
client's: no byte lost or doubled)."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import anyio
import pytest
from conftest import JMP, run_jmp
from test_grpc import TOKEN, Proxy, agents, token_file, write_config  # noqa: F401 - fixtures

BIG = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """200 MiB of random bytes (made once) and their sha256."""
    path = tmp_path_factory.mktemp("big") / "big.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG // (4 * 1024 * 1024)):
            block = os.urandom(4 * 1024 * 1024)
            digest.update(block)
            f.write(block)
    return path, digest.hexdigest()


def sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def test_200_mb_round_trip_through_jmp_cp_with_a_token(agents, data_dir, tmp_path, token_file, big_file) -> None:
    source, digest = big_file
    agent = agents("--token-file", str(token_file))
    write_config(tmp_path / "jumpstarter.toml", agent.url, token_file)
    done = run_jmp("cp", "-v", str(source), "lab1:big.bin", timeout=120)  # relative: the node's directory
    on_node = tmp_path / "agent" / "big.bin"
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"{source} -> {on_node} {BIG} bytes sha256 {digest}\n"
    assert sha(on_node) == digest
    done = run_jmp("cp", f"lab1:{on_node}", "back.bin", timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert sha(tmp_path / "back.bin") == digest
    on_node.unlink()
    # Without the token, nothing moves.
    write_config(tmp_path / "jumpstarter.toml", agent.url)
    done = run_jmp("cp", str(source), "lab1:big.bin")
    assert (done.returncode, done.stderr) == (
        5, f"jmp: error: node 'lab1' at {agent.url} requires a token: give its token file (token_file, --token-file)\n")
    assert not on_node.exists()


async def _cut_twice_while_growing(proxy: Proxy, process: anyio.abc.Process, parts: Path, pattern: str) -> list[int]:
    """Cut every connection through ``proxy`` twice, at a quarter and at a half of
    the file's bytes through it (the proxy counts them, so a fast transfer cannot
    slip past a cut), and watch the temporary file matching ``pattern`` in ``parts``
    meanwhile: the sizes seen, in order."""
    proxy.forwarded, proxy.cut_at = 0, [BIG // 4, BIG // 2]
    seen: list[int] = []
    while process.returncode is None:
        for part in parts.glob(pattern):
            try:
                seen.append(part.stat().st_size)
            except FileNotFoundError:
                continue
        with anyio.move_on_after(0.02):
            await process.wait()
    return seen


@pytest.mark.anyio
async def test_200_mb_through_a_connection_that_is_cut_twice_each_way(
    agents, data_dir, tmp_path, token_file, big_file
) -> None:
    source, digest = big_file
    agent = agents("--token-file", str(token_file))
    node_dir = tmp_path / "agent"
    async with Proxy(agent.port) as proxy:
        write_config(tmp_path / "jumpstarter.toml", f"grpc://127.0.0.1:{proxy.port}", token_file)
        env = {**os.environ, "JMP_DATA_DIR": str(data_dir)}

        async with await anyio.open_process([JMP, "cp", str(source), "lab1:big.bin"], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
            seen = await _cut_twice_while_growing(proxy, process, node_dir, ".big.bin.*.jmp-part")
            err = await process.stderr.receive() if process.returncode else b""
        assert process.returncode == 0, err
        assert not proxy.cut_at, f"the upload ended before both cuts: {proxy.forwarded} bytes through the proxy"
        # Resumed, not restarted: what the node held only ever grew.
        assert seen == sorted(seen) and proxy.connections >= 3
        assert sha(node_dir / "big.bin") == digest
        assert sorted(os.listdir(node_dir)) == ["big.bin"]

        connections = proxy.connections
        async with await anyio.open_process([JMP, "cp", "lab1:big.bin", "back.bin"], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
            seen = await _cut_twice_while_growing(proxy, process, tmp_path, ".back.bin.*.jmp-part")
            err = await process.stderr.receive() if process.returncode else b""
        assert process.returncode == 0, err
        assert not proxy.cut_at, f"the download ended before both cuts: {proxy.forwarded} bytes through the proxy"
        assert seen == sorted(seen) and proxy.connections >= connections + 3
        assert sha(tmp_path / "back.bin") == digest
        assert not list(tmp_path.glob("*.jmp-part"))


JUNIT = """<testsuites><testsuite name="hw"><testcase name="boot"/>
<testcase name="flash"><failure message="bad block"/></testcase></testsuite></testsuites>"""


def test_run_on_a_remote_node_puts_gets_and_imports_junit_when_the_command_fails(
    agents, data_dir, tmp_path, token_file
) -> None:
    agent = agents("--token-file", str(token_file))
    write_config(tmp_path / "jumpstarter.toml", agent.url, token_file)
    work = tmp_path / "agent" / "work"
    work.mkdir()
    (tmp_path / "fw.bin").write_bytes(os.urandom(300_000))
    script = f"cmp fw.bin {tmp_path}/fw.bin && echo flashed > flash.log && printf '%s' '{JUNIT}' > junit.xml; exit 7"
    done = run_jmp("run", "--node", "lab1", "--cwd", "work", "--put", "fw.bin", "--get", "*.log",
                   "--junit", "junit.xml", "--get-to", "out", "--shell", "--", script)
    assert done.returncode == 7, done.stderr
    tasks = run_jmp("task", "list", "--node", "lab1", "--format", "json")
    import json

    (task,) = json.loads(tasks.stdout)["tasks"]
    assert (task["state"], task["exit_code"]) == ("failed", 7)
    assert done.stderr.splitlines() == [
        f"jmp: 2 artifact(s) of task {task['id']} in out",
        "jmp: 2 result(s) imported from junit.xml",
    ]
    assert (tmp_path / "out" / "flash.log").read_text() == "flashed\n"
    listed = run_jmp("task", "artifacts", "--node", "lab1", task["id"], "--format", "json")
    artifacts = json.loads(listed.stdout)["artifacts"]
    assert [(a["path"], a["size"]) for a in artifacts] == [
        (str(work / "flash.log"), 8), (str(work / "junit.xml"), len(JUNIT))]
    assert artifacts[0]["sha256"] == hashlib.sha256(b"flashed\n").hexdigest()
    results = run_jmp("result", "query", "--node", "lab1", "--task", task["id"], "--format", "json")
    outcomes = sorted((r["name"], r["outcome"]) for r in json.loads(results.stdout)["results"])
    assert outcomes == [("hw/boot", "passed"), ("hw/flash", "failed")] or outcomes == [
        ("boot", "passed"), ("flash", "failed")]


def test_a_node_that_dies_mid_upload_fails_it_cleanly(agents, data_dir, tmp_path, big_file) -> None:
    import time

    source, _ = big_file
    agent = agents()
    (tmp_path / "jumpstarter.toml").write_text(
        f'[nodes.lab1]\ntransport = "grpc"\nendpoint = "{agent.url}"\noptions = {{ reconnect_timeout = 1 }}\n')
    node_dir = tmp_path / "agent"
    process = subprocess.Popen([JMP, "cp", str(source), "lab1:big.bin"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > BIG // 4 for p in node_dir.glob(".big.bin.*.jmp-part")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        agent.process.kill()
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, out) == (5, "")
    assert err.startswith(f"jmp: error: lost connection to node 'lab1' at {agent.url}: ") and err.count("\n") == 1
    assert err.endswith("(gave up after 1s)\n")
    assert not (node_dir / "big.bin").exists()  # never a truncated file under the final name
