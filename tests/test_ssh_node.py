"""The ssh node driver against a real OpenSSH server on 127.0.0.1 (tests/sshd.py):
directly through the driver, through ``jmp run``, and served by ``jmp node serve
--driver ssh`` to a client over gRPC."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from conftest import JMP, pid_alive, run_jmp
from jumpstarter.config import Config, NodeConfig
from jumpstarter.errors import BadRequest, ConfigError, SpawnFailed, Unavailable
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_driver_ssh.node import SshNodeDriver
from jumpstarter_protocol import TaskSpec, TaskState
from sshd import Sshd

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """One sshd for the whole run (the tests that kill sshd start their own)."""
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.fail("sshd is missing: apt-get install -y openssh-server (.ci/run does)")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    yield server
    server.stop()


class Output:
    """An OutputWriter that keeps every byte, by stream."""

    def __init__(self) -> None:
        self.data = {"stdout": bytearray(), "stderr": bytearray()}

    def write(self, stream: str, data: bytes) -> None:
        self.data[stream] += data

    @property
    def stdout(self) -> bytes:
        return bytes(self.data["stdout"])

    @property
    def stderr(self) -> bytes:
        return bytes(self.data["stderr"])


def make_driver(sshd: Sshd, **options: object) -> SshNodeDriver:
    return SshNodeDriver(NodeConfig(name="pi", driver="ssh", options=sshd.options(**options)))


async def run(driver: SshNodeDriver, **spec: object) -> tuple[int, Output]:
    output = Output()
    process = await driver.spawn(TaskSpec(**spec), output)
    return await process.wait(), output


# --- tasks -------------------------------------------------------------------------------


async def test_output_streams_exit_codes_and_signals(sshd: Sshd) -> None:
    driver = make_driver(sshd)
    try:
        code, out = await run(driver, argv=["sh", "-c", "echo out; echo err >&2; exit 3"])
        assert (code, out.stdout, out.stderr) == (3, b"out\n", b"err\n")
        code, out = await run(driver, argv=["sh", "-c", "kill -s USR1 $$"])
        assert code == -signal.SIGUSR1
        code, out = await run(driver, shell="echo $((6 * 7)) | tr 4 x")
        assert (code, out.stdout) == (0, b"x2\n")
    finally:
        await driver.aclose()


async def test_argv_is_never_interpreted_by_a_shell_and_env_and_cwd_arrive(
    sshd: Sshd, tmp_path: Path
) -> None:
    driver = make_driver(sshd)
    try:
        words = ["a b", "$(touch pwned)", "; echo no", "'q'", '"d"', "*", "\\", ""]
        code, out = await run(driver, argv=["printf", "[%s]", *words], cwd=str(tmp_path))
        assert code == 0
        assert out.stdout == b"".join(b"[" + word.encode() + b"]" for word in words)
        assert not (tmp_path / "pwned").exists()
        value = 'it\'s $HOME `x` "y"\nline two'
        code, out = await run(
            driver,
            argv=["sh", "-c", 'printf "%s|%s" "$JMP_X" "$PWD"'],
            env={"JMP_X": value},
            cwd=str(tmp_path),
        )
        assert out.stdout == f"{value}|{tmp_path}".encode()
        with pytest.raises(
            BadRequest, match=r"^environment variable name not valid for a POSIX shell: 'A-B'$"
        ):
            await driver.spawn(TaskSpec(argv=["true"], env={"A-B": "1"}), Output())
    finally:
        await driver.aclose()


async def test_command_not_found_and_missing_cwd_are_one_line(sshd: Sshd) -> None:
    driver = make_driver(sshd)
    try:
        with pytest.raises(
            SpawnFailed, match=r"^command not found on 127\.0\.0\.1: no-such-command$"
        ) as caught:
            await driver.spawn(TaskSpec(argv=["no-such-command", "x"]), Output())
        assert caught.value.details["errno"] == "ENOENT"
        with pytest.raises(
            BadRequest, match=r"^working directory does not exist on 127\.0\.0\.1: /no/such/dir$"
        ):
            await driver.spawn(TaskSpec(argv=["true"], cwd="/no/such/dir"), Output())
    finally:
        await driver.aclose()


async def test_one_connection_serves_every_task_and_tasks_run_at_once(sshd: Sshd) -> None:
    driver = make_driver(sshd)
    try:
        await run(driver, argv=["true"])
        connection = driver._connection
        results: list[int] = []

        async def one(i: int) -> None:
            code, out = await run(driver, argv=["sh", "-c", f"sleep 0.2; exit {i}"])
            results.append(code)

        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
        assert sorted(results) == list(range(8))
        assert driver._connection is connection
    finally:
        await driver.aclose()


async def test_stop_leaves_no_process_of_a_tree_that_ignores_sigterm(sshd: Sshd) -> None:
    driver = make_driver(sshd)
    try:
        output = Output()
        tree = (
            'trap "" TERM; '
            "for i in 1 2 3; do sh -c 'trap \"\" TERM; echo $$; exec sleep 300' & done; "
            "echo $$; wait"
        )
        process = await driver.spawn(TaskSpec(argv=["sh", "-c", tree]), output)
        with anyio.fail_after(20):
            while output.stdout.count(b"\n") < 4:
                await anyio.sleep(0.02)
        pids = [int(line) for line in output.stdout.split()]
        assert all(pid_alive(pid) for pid in pids)
        await process.terminate(0.3)
        with anyio.fail_after(20):
            code = await process.wait()
        assert code == -signal.SIGKILL
        with anyio.move_on_after(10):
            while any(pid_alive(pid) for pid in pids):
                await anyio.sleep(0.02)
        assert [pid for pid in pids if pid_alive(pid)] == []
        await process.terminate(0.3)  # again, after the end: nothing to do, no error
    finally:
        await driver.aclose()


async def test_a_polite_task_ends_on_sigterm(sshd: Sshd) -> None:
    driver = make_driver(sshd)
    try:
        output = Output()
        process = await driver.spawn(TaskSpec(argv=["sleep", "300"]), output)
        await process.terminate(10)
        with anyio.fail_after(20):
            assert await process.wait() == -signal.SIGTERM
    finally:
        await driver.aclose()


async def test_200_mb_of_output_arrive_whole(sshd: Sshd) -> None:
    driver = make_driver(sshd)
    try:
        size = 200 * 1024 * 1024
        digest = hashlib.sha256()
        seen = {"stdout": 0, "stderr": 0}

        class Hasher:
            def write(self, stream: str, data: bytes) -> None:
                seen[stream] += len(data)
                if stream == "stdout":
                    digest.update(data)

        # Not zeros: bytes that differ, so a lost or repeated piece changes the sum.
        command = (
            f"yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ | head -c {size}"
        )
        process = await driver.spawn(TaskSpec(shell=command), Hasher())
        assert await process.wait() == 0
        line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
        expected = hashlib.sha256()
        whole, rest = divmod(size, len(line))
        block = line * 16384
        for _ in range(whole // 16384):
            expected.update(block)
        expected.update(line * (whole % 16384) + line[:rest])
        assert seen == {"stdout": size, "stderr": 0}
        assert digest.hexdigest() == expected.hexdigest()
    finally:
        await driver.aclose()


# --- input and terminals -----------------------------------------------------------------


async def test_stdin_reaches_the_task_and_eof_ends_it(sshd: Sshd) -> None:
    driver = make_driver(sshd)
    try:
        output = Output()
        process = await driver.spawn(TaskSpec(argv=["sha256sum"], stdin=True), output)
        data = os.urandom(3 * 1024 * 1024)
        await process.write_input(data[:1000])
        await process.write_input(data[1000:])
        await process.close_input()
        await process.close_input()  # twice is not an error
        assert await process.wait() == 0
        assert output.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
        with pytest.raises(Exception, match=r"^the task has exited; it reads no more input$"):
            await process.write_input(b"late")
        code, out = await run(driver, argv=["cat"])  # no stdin asked for: /dev/null
        assert (code, out.stdout) == (0, b"")
        process = await driver.spawn(TaskSpec(argv=["true"]), Output())
        with pytest.raises(
            BadRequest, match=r"^this task has no input: start it with stdin or a terminal$"
        ):
            await process.write_input(b"x")
        await process.wait()
    finally:
        await driver.aclose()


async def test_a_terminal_has_its_size_gets_resized_and_reads_input(sshd: Sshd) -> None:
    driver = make_driver(sshd)
    try:
        output = Output()
        # A read that SIGWINCH interrupts returns empty: read again.
        script = (
            "trap 'echo winch' WINCH; stty size; read line; "
            'while [ -z "$line" ]; do read line; done; stty size; echo got:$line; '
            "tty -s && echo on-a-tty"
        )
        process = await driver.spawn(
            TaskSpec(argv=["sh", "-c", script], pty={"rows": 33, "cols": 101}), output
        )
        with anyio.fail_after(20):
            while b"33 101" not in output.stdout:
                await anyio.sleep(0.02)
        await process.resize(40, 120)
        with anyio.fail_after(20):
            while b"winch" not in output.stdout:
                await anyio.sleep(0.02)
        await process.write_input(b"hello\n")
        with anyio.fail_after(20):
            assert await process.wait() == 0
        text = output.stdout.replace(b"\r\n", b"\n")
        assert text.endswith(b"40 120\ngot:hello\non-a-tty\n"), text
        assert output.stderr == b""  # a terminal has one stream
    finally:
        await driver.aclose()


# --- files -------------------------------------------------------------------------------


async def test_sftp_put_and_get_with_checksum(sshd: Sshd, tmp_path: Path) -> None:
    driver = make_driver(sshd)
    files = driver.files
    assert files is not None
    try:
        data = os.urandom(9 * 1024 * 1024 + 17)
        target = str(tmp_path / "up" / "fw.bin")

        async def chunks(blob: bytes, size: int = 1024 * 1024):
            for at in range(0, len(blob), size):
                yield blob[at : at + size]

        await files.make_dir(str(tmp_path / "up"))
        await files.make_dir(str(tmp_path / "up"))  # exists: not an error
        assert await files.write(target + ".part", chunks(data)) == len(data)
        await files.rename(target + ".part", target)
        assert (
            hashlib.sha256(Path(target).read_bytes()).hexdigest()
            == hashlib.sha256(data).hexdigest()
        )
        got = b"".join([piece async for piece in files.read(target)])
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        tail = b"".join([piece async for piece in files.read(target, offset=len(data) - 100)])
        assert tail == data[-100:]
        # a resumed write: cut to the offset, then the rest
        assert await files.write(target, chunks(b"XYZ"), offset=5) == 8
        assert Path(target).read_bytes() == data[:5] + b"XYZ"

        info = await files.stat(target)
        assert info is not None and (info.kind, info.size, info.mode) == ("file", 8, 0o600)
        await files.chmod(target, 0o640)
        assert (await files.stat(target)).mode == 0o640  # type: ignore[union-attr]
        assert (await files.stat(str(tmp_path / "up"))).kind == "dir"  # type: ignore[union-attr]
        os.symlink(target, tmp_path / "link")
        assert (await files.stat(str(tmp_path / "link"))).kind == "link"  # type: ignore[union-attr]
        assert await files.real_path(str(tmp_path / "link")) == target
        assert await files.real_path(str(tmp_path / "up" / ".." / "up" / "not" / "yet")) == str(
            tmp_path / "up" / "not" / "yet"
        )
        assert await files.stat(str(tmp_path / "nothing")) is None
        assert await files.list_dir(str(tmp_path / "up")) == ["fw.bin"]
        await files.remove(target)
        await files.remove(target)  # gone already: not an error
        assert await files.list_dir(str(tmp_path / "up")) == []
        with pytest.raises(FileNotFoundError):
            await files.list_dir(str(tmp_path / "nothing"))
        with pytest.raises(FileNotFoundError):
            [piece async for piece in files.read(str(tmp_path / "nothing"))]
        with pytest.raises(FileNotFoundError):
            await files.write(str(tmp_path / "no" / "dir" / "f"), chunks(b"x"))
    finally:
        await driver.aclose()


# --- security and errors -----------------------------------------------------------------


async def test_an_unknown_host_key_is_refused_with_its_fingerprint(
    sshd: Sshd, tmp_path: Path
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(sshd.host_key) + ".pub"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[1]
    for known_hosts in (empty, tmp_path / "missing"):
        driver = make_driver(sshd, known_hosts=str(known_hosts))
        with pytest.raises(Unavailable) as caught:
            await driver.spawn(TaskSpec(argv=["true"]), Output())
        assert str(caught.value) == (
            f"ssh: host key of 127.0.0.1:{sshd.port} is unknown: ssh-ed25519 {fingerprint} is "
            f"not in {known_hosts}; check that fingerprint with the host's owner, then add the "
            f"key (ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known_hosts})"
        )


async def test_a_changed_host_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    other = (sshd.dir / "other_ed25519.pub").read_text().split()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    driver = make_driver(sshd, known_hosts=str(known_hosts))
    with pytest.raises(
        Unavailable,
        match=r"^ssh: host key of 127\.0\.0\.1:\d+ has CHANGED: it is now ssh-ed25519 SHA256:\S+, .* refusing to connect",
    ):
        await driver.spawn(TaskSpec(argv=["true"]), Output())


async def test_verification_off_is_explicit_and_warns(
    sshd: Sshd, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    driver = make_driver(sshd, known_hosts=str(tmp_path / "missing"), verify_host_key="false")
    assert capsys.readouterr().err == (
        "jmp: warning: node 'pi': host key verification is off (verify_host_key = false): "
        "anyone between here and 127.0.0.1 can pose as it and see everything the node runs\n"
    )
    try:
        assert (await run(driver, argv=["true"]))[0] == 0
    finally:
        await driver.aclose()


async def test_a_wrong_key_is_refused_naming_what_was_tried(sshd: Sshd, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("not-it\n")
    driver = make_driver(sshd, key_file=str(sshd.other_key), password_file=str(password))
    with pytest.raises(Unavailable) as caught:
        await driver.spawn(TaskSpec(argv=["true"]), Output())
    assert str(caught.value) == (
        f"ssh: {sshd.user}@127.0.0.1:{sshd.port} refused authentication (tried: publickey "
        f"with {sshd.other_key}; password from {password})"
    )
    assert "not-it" not in str(caught.value)


async def test_an_unreachable_host_is_one_line(sshd: Sshd) -> None:
    from sshd import free_port

    port = free_port()
    driver = SshNodeDriver(NodeConfig(name="pi", options={**sshd.options(), "port": port}))
    with pytest.raises(
        Unavailable,
        match=rf"^ssh: cannot reach {sshd.user}@127\.0\.0\.1:{port}: connection refused$",
    ):
        await driver.spawn(TaskSpec(argv=["true"]), Output())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "node 'pi': option 'host' is required by the ssh driver"),
        (
            {"host": "h", "password": "hunter2"},
            "node 'pi': option 'password' is not accepted: secrets stay out of the config; put the password in a file and give password_file, or use key_file or the SSH agent",
        ),
        (
            {"host": "h", "colour": "red"},
            "node 'pi': unknown option 'colour' for the ssh driver (known: host, port, user, key_file, agent, password_file, known_hosts, verify_host_key, connect_timeout, keepalive)",
        ),
        (
            {"host": "h", "port": "http"},
            "node 'pi': option 'port': Input should be a valid integer, unable to parse string as an integer",
        ),
    ],
)
def test_bad_options_are_one_line_naming_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SshNodeDriver(NodeConfig(name="pi", driver="ssh", options=options))
    assert str(caught.value) == message


# --- the host goes away ------------------------------------------------------------------


async def test_a_task_running_when_sshd_dies_is_lost_and_the_node_serves_again(
    tmp_path: Path,
) -> None:
    server = Sshd(tmp_path / "sshd")
    server.start()
    config = Config(
        data_dir=tmp_path / "data",
        nodes={"pi": NodeConfig(driver="ssh", options=server.options(connect_timeout=5))},
    )
    try:
        protocol = JumpStarterProtocol(config)
        async with protocol.create_async_session("lost") as session:
            node = await session.connect("pi")
            task = await node.start(["sh", "-c", "echo $$; exec sleep 300"])
            with anyio.fail_after(20):
                while not (pid_text := await _read_all(task)):
                    await anyio.sleep(0.05)
            pid = int(pid_text)
            server.kill()
            with anyio.fail_after(20):
                info = await task.wait()
            assert info.state is TaskState.LOST
            assert re.fullmatch(
                rf"the connection to {server.user}@127\.0\.0\.1:{server.port} was lost: .+",
                info.message or "",
            )
            with pytest.raises(Unavailable, match=r"^ssh: cannot reach .*: connection refused$"):
                await node.start(["true"])
            server.start()
            again = await node.start(["echo", "back"])
            info = await again.wait()
            assert (info.state, info.exit_code) == (TaskState.SUCCEEDED, 0)
            # the lost task's process group, left on the host, was killed on reconnect
            with anyio.fail_after(10):
                while pid_alive(pid):
                    await anyio.sleep(0.05)
    finally:
        server.stop()


async def _read_all(task) -> bytes:  # type: ignore[no-untyped-def]
    data = b""
    async for chunk in task.output(follow=False):
        data += chunk.data
    return data.strip()


# --- through jmp -------------------------------------------------------------------------


def write_config(path: Path, sshd: Sshd, **extra: object) -> None:
    options = ", ".join(f"{key} = {_toml(value)}" for key, value in sshd.options(**extra).items())
    path.write_text(f'default_node = "pi"\n[nodes.pi]\ndriver = "ssh"\noptions = {{ {options} }}\n')


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_jmp_run_on_an_ssh_node(sshd: Sshd, data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "jumpstarter.toml"
    write_config(config, sshd)
    done = run_jmp("run", "--node", "pi", "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (done.returncode, done.stdout, done.stderr) == (4, "out\n", "err\n")
    done = run_jmp("run", "--node", "pi", "--timeout", "0.5", "--", "sleep", "30")
    assert done.returncode == 124
    assert re.fullmatch(r"jmp: task [0-9a-f]+ timed out after 0\.5s and was stopped\n", done.stderr)
    done = run_jmp("run", "--node", "pi", "--", "no-such-command")
    assert (done.returncode, done.stderr) == (
        127,
        "jmp: error: command not found on 127.0.0.1: no-such-command\n",
    )
    done = run_jmp("run", "--node", "pi", "--cwd", "/no/such/dir", "--", "true")
    assert done.returncode != 0
    assert (
        done.stderr == "jmp: error: working directory does not exist on 127.0.0.1: /no/such/dir\n"
    )
    shown = run_jmp("config", "show")
    assert shown.returncode == 0 and "driver" in shown.stdout


def test_jmp_run_says_why_the_host_key_is_refused(
    sshd: Sshd, data_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty").write_text("")
    write_config(tmp_path / "jumpstarter.toml", sshd, known_hosts=str(tmp_path / "empty"))
    done = run_jmp("run", "--node", "pi", "--", "true")
    assert done.returncode != 0
    assert re.fullmatch(
        rf"jmp: error: ssh: host key of 127\.0\.0\.1:{sshd.port} is unknown: ssh-ed25519 SHA256:\S+ is not in .*\n",
        done.stderr,
    ), done.stderr
    assert "Traceback" not in done.stderr


def test_jmp_stop_on_an_ssh_node_stops_the_remote_tree(
    sshd: Sshd, data_dir: Path, tmp_path: Path
) -> None:
    write_config(tmp_path / "jumpstarter.toml", sshd)
    run = subprocess.Popen(
        [
            JMP,
            "run",
            "--node",
            "pi",
            "--",
            "sh",
            "-c",
            'trap "" TERM; echo $$; sleep 300 & echo $!; wait',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert run.stdout is not None
        pids = [int(run.stdout.readline()), int(run.stdout.readline())]
        run.send_signal(signal.SIGINT)  # Ctrl-C: jmp stops the task
        run.wait(60)
        deadline = time.monotonic() + 30
        while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [pid for pid in pids if pid_alive(pid)] == []
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        run.stdout.close()  # type: ignore[union-attr]


def test_jmp_node_serve_driver_ssh_reached_over_grpc(
    sshd: Sshd, data_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "agent.log"
    workdir = tmp_path / "agent"
    workdir.mkdir()
    options = [
        arg for key, value in sshd.options().items() for arg in ("--option", f"{key}={value}")
    ]
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [
                JMP,
                "node",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--name",
                "pi",
                "--driver",
                "ssh",
                *options,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        deadline = time.monotonic() + 60
        while not (match := re.search(r"listening on (\S+)\n", log.read_text())):
            assert agent.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "node 'pi' (driver ssh)" in log.read_text()
        (tmp_path / "jumpstarter.toml").write_text(
            f'[nodes.pi]\ntransport = "grpc"\nendpoint = "{match.group(1)}"\n'
        )
        done = run_jmp("run", "--node", "pi", "--", "sh", "-c", "echo on $(hostname); exit 5")
        assert (done.returncode, done.stderr) == (5, "")
        assert done.stdout.startswith("on ")
        info = run_jmp("node", "info", "--node", "pi", "--format", "json")
        assert info.returncode == 0, info.stderr
        described = json.loads(info.stdout)
        assert described["driver"] == "ssh"
        assert {"stdin", "pty", "files"} <= set(described["capabilities"])
    finally:
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def test_the_ssh_driver_is_found_through_its_entry_point(data_dir: Path) -> None:
    done = run_jmp("drivers", "--format", "json")
    assert done.returncode == 0
    assert '"jumpstarter-driver-ssh"' in done.stdout and '"ssh"' in done.stdout
    assert sys.modules.get("jumpstarter_driver_ssh.node") is not None  # this test module's import


def test_no_secret_in_jmp_config_show(sshd: Sshd, data_dir: Path, tmp_path: Path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret-pass\n")
    password.chmod(0o600)
    write_config(tmp_path / "jumpstarter.toml", sshd, password_file=str(password))
    shown = run_jmp("config", "show")
    assert shown.returncode == 0, shown.stderr
    assert 'driver = "ssh"' in shown.stdout and "s3cret-pass" not in shown.stdout
    (tmp_path / "jumpstarter.toml").write_text(
        '[nodes.pi]\ndriver = "ssh"\noptions = { host = "h", password = "s3cret-pass" }\n'
    )
    done = run_jmp("run", "--node", "pi", "--", "true")
    assert done.returncode != 0
    assert done.stderr.startswith("jmp: error: node 'pi': option 'password' is not accepted: ")
    assert done.stderr.count("\n") == 1 and "s3cret-pass" not in done.stderr


def test_jmp_node_serve_with_bad_ssh_options_is_one_line(data_dir: Path) -> None:
    done = run_jmp(
        "node",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--name",
        "pi",
        "--driver",
        "ssh",
        "--option",
        "user=ci",
    )
    assert (done.returncode != 0, done.stderr) == (
        True,
        "jmp: error: node 'pi': option 'host' is required by the ssh driver\n",
    )


async def test_the_ssh_agent_logs_in_when_the_key_files_do_not(
    sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert time.monotonic() < deadline and agent.poll() is None, "ssh-agent did not start"
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket_path)}
        subprocess.run(
            ["ssh-add", "-q", str(sshd.client_key)], env=env, check=True, capture_output=True
        )
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        driver = make_driver(sshd, key_file=str(sshd.other_key), agent=True)
        try:
            assert (await run(driver, argv=["true"]))[0] == 0
        finally:
            await driver.aclose()
        without = make_driver(sshd, key_file=str(sshd.other_key), agent=False)
        with pytest.raises(
            Unavailable, match=r"refused authentication \(tried: publickey with \S+other_ed25519\)$"
        ):
            await without.spawn(TaskSpec(argv=["true"]), Output())
    finally:
        agent.terminate()
        agent.wait()


async def test_a_host_that_never_answers_is_one_line(sshd: Sshd) -> None:
    import socket

    with socket.socket() as silent:  # accepts connections, says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        driver = make_driver(sshd, port=port, connect_timeout=0.5)
        with pytest.raises(
            Unavailable,
            match=rf"^ssh: cannot reach {sshd.user}@127\.0\.0\.1:{port}: no answer within 0\.5s$",
        ):
            await driver.spawn(TaskSpec(argv=["true"]), Output())


async def test_a_host_out_of_channels_refuses_a_task_in_one_line_and_stop_still_works(
    tmp_path: Path,
) -> None:
    server = Sshd(tmp_path / "sshd", max_sessions=2)
    server.start()
    driver = SshNodeDriver(NodeConfig(name="pi", driver="ssh", options=server.options()))
    try:
        first = await driver.spawn(TaskSpec(argv=["sleep", "300"]), Output())
        second = await driver.spawn(TaskSpec(argv=["sleep", "300"]), Output())
        with pytest.raises(Unavailable) as caught:
            await driver.spawn(TaskSpec(argv=["true"]), Output())
        assert str(caught.value).startswith(
            f"ssh: {server.user}@127.0.0.1:{server.port} refused a new channel ("
        )
        assert str(caught.value).endswith(
            "): it allows only so many tasks at once on one connection "
            "(OpenSSH: MaxSessions in sshd_config, 10 by default)"
        )
        for process in (first, second):  # no channel left for the stop: it finds one
            await process.terminate(5)
            with anyio.fail_after(20):
                assert await process.wait() == -signal.SIGTERM
    finally:
        await driver.aclose()
        server.stop()


# --- files, input and terminals through jmp, on an ssh node -----------------------------


def test_jmp_cp_both_ways_on_an_ssh_node(sshd: Sshd, data_dir: Path, tmp_path: Path) -> None:
    write_config(tmp_path / "jumpstarter.toml", sshd)
    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    firmware.chmod(0o750)
    remote = str(tmp_path / "on-the-host" / "fw.bin")  # the host is this machine
    done = run_jmp("run", "--node", "pi", "-n", "--", "mkdir", "-p", str(Path(remote).parent))
    assert done.returncode == 0, done.stderr
    put = run_jmp("cp", str(firmware), f"pi:{remote}")
    assert put.returncode == 0, put.stderr
    # On the host: the same bytes and mode under the final name, no temporary file left.
    host_side = run_jmp("run", "--node", "pi", "-n", "--", "sh", "-c", f"sha256sum {remote}; stat -c %a {remote}; ls -a {Path(remote).parent}")
    lines = host_side.stdout.splitlines()
    assert lines[0].split()[0] == hashlib.sha256(firmware.read_bytes()).hexdigest()
    assert lines[1] == "750"
    assert [n for n in lines[2:] if n not in (".", "..")] == ["fw.bin"]
    back = tmp_path / "back.bin"
    got = run_jmp("cp", f"pi:{remote}", str(back))
    assert got.returncode == 0, got.stderr
    assert back.read_bytes() == firmware.read_bytes()
    missing = run_jmp("cp", "pi:/no/such/file", str(tmp_path / "x"))
    assert missing.returncode != 0 and len(missing.stderr.splitlines()) == 1 and "/no/such/file" in missing.stderr
    assert not (tmp_path / "x").exists()


def test_stdin_through_jmp_run_on_an_ssh_node(sshd: Sshd, data_dir: Path, tmp_path: Path) -> None:
    write_config(tmp_path / "jumpstarter.toml", sshd)
    data = os.urandom(5 * 1024 * 1024)
    done = subprocess.run([JMP, "run", "--node", "pi", "--", "sha256sum"], input=data, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    answered = run_jmp("run", "--node", "pi", "--", "python3", "-c", "print(input()[::-1])", input="olleh\n")
    assert (answered.returncode, answered.stdout) == (0, "hello\n"), answered.stderr


def test_a_terminal_through_jmp_run_on_an_ssh_node(sshd: Sshd, data_dir: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    write_config(tmp_path / "jumpstarter.toml", sshd)
    child = pexpect.spawn(
        JMP, ["run", "-t", "--node", "pi", "--", "sh"], cwd=str(tmp_path), env=os.environ, timeout=60,
        dimensions=(30, 100),
    )
    try:
        child.sendline("tty; stty size")
        child.expect(r"/dev/pts/\d+\r\n30 100\r\n")
        child.setwinsize(40, 120)
        child.sendline("stty size")
        child.expect(r"40 120\r\n")
        child.sendline("exit 3")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3


def test_jmp_shell_on_an_ssh_node(sshd: Sshd, data_dir: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    write_config(tmp_path / "jumpstarter.toml", sshd)
    child = pexpect.spawn(JMP, ["shell", "--node", "pi"], cwd=str(tmp_path), env=os.environ, timeout=60)
    try:
        child.sendline("echo on-$(tty | cut -c1-8)")
        child.expect(r"on-/dev/pts")
        child.sendline("exit 7")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 7
