"""Nodes on other machines: ``jmp node serve`` as a real process, reached over gRPC on
127.0.0.1 (ephemeral ports) through the Python API and the real ``jmp``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import trustme
from click.testing import CliRunner
from conftest import JMP, pid_alive, run_jmp
from jumpstarter.cli import cli
from jumpstarter.config import Config, NodeConfig
from jumpstarter.errors import Conflict, TransportError
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_driver_grpc._wire import (
    CONNECTION_KEY,
    READ_OUTPUT_PATH,
    REQUEST_PATH,
    TOKEN_KEY,
    grpc,
)
from jumpstarter_protocol import FetchConfig, ListTasks, ReadOutput, decode, encode

TOKEN = "t0ken-for-tests"


# --- a node agent as a real process ------------------------------------------------------


@dataclass
class Agent:
    """A ``jmp node serve`` process."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def agents(data_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Start ``jmp node serve`` processes (node ``lab1``, this test's data dir);
    every one is stopped at the end."""
    started: list[Agent] = []
    workdir = tmp_path / "agent"  # not the test's cwd: the agent reads no client config
    workdir.mkdir()

    def start(*args: str, listen: str = "127.0.0.1:0", name: str = "lab1") -> Agent:
        log = tmp_path / f"agent-{len(started)}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [JMP, "node", "serve", "--listen", listen, "--name", name, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        agent = Agent(process, "", log)
        started.append(agent)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            match = re.search(r"listening on (\S+)\n", log.read_text())
            if match:
                agent.url = match.group(1)
                return agent
            if process.poll() is not None:
                raise AssertionError(
                    f"jmp node serve exited {process.returncode}: {log.read_text()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"jmp node serve did not say where it listens: {log.read_text()}")

    try:
        yield start
    finally:
        for agent in started:
            agent.stop()


def client(data_dir: Path, url: str, **node: object) -> JumpStarterProtocol:
    """A client whose config names node ``lab1`` at ``url``."""
    nodes = {"lab1": NodeConfig(transport="grpc", endpoint=url, **node)}
    return JumpStarterProtocol(Config(data_dir=data_dir / "client", nodes=nodes))


def write_config(
    path: Path, url: str, token_file: Path | None = None, tls_ca: Path | None = None
) -> None:
    lines = ["[nodes.lab1]", 'transport = "grpc"', f'endpoint = "{url}"']
    if token_file:
        lines.append(f'token_file = "{token_file}"')
    if tls_ca:
        lines.append(f'tls_ca = "{tls_ca}"')
    path.write_text("\n".join(lines) + "\n")


def line_output(n: int) -> bytes:
    """What ``GENERATOR`` prints for ``n`` lines."""
    return b"".join(hashlib.sha256(b"%d" % i).hexdigest().encode() * 4 + b"\n" for i in range(n))


# 257 bytes a line, written in bursts with short pauses, so that readers catch it
# while it runs.
GENERATOR = """
import hashlib, sys, time
out = sys.stdout.buffer
for i in range({n}):
    out.write(hashlib.sha256(b"%d" % i).hexdigest().encode() * 4 + b"\\n")
    if i % 1000 == 999:
        out.flush()
        time.sleep({pause})
"""


# --- every operation -----------------------------------------------------------------------


def test_every_operation_through_a_served_node(agents, data_dir: Path, token_file: Path) -> None:
    agent = agents("--token-file", str(token_file), "--label", "board=rpi4", "--label", "site=lab2")
    assert agent.url.startswith("grpc://127.0.0.1:")
    protocol = client(data_dir, agent.url, token_file=token_file)
    with protocol.create_session("nightly") as session:
        node = session.connect("lab1")  # InitializeConnection + ConnectNode
        assert node.info is not None and node.info.name == "lab1"
        assert node.info.labels == {"board": "rpi4", "site": "lab2"} and node.lease_id
        info = node.fetch_config()  # FetchConfig
        assert (info.name, info.driver) == ("lab1", "local")
        node.ping()

        task = node.start(
            ["sh", "-c", "echo out; echo err >&2; exit 3"], env={"X": "1"}
        )  # StartRequest
        chunks = list(task.output())
        # Two pipes: the order between the streams is the kernel's, not ours.
        by_stream = {s: b"".join(c.data for c in chunks if c.stream == s) for s in ("stdout", "stderr")}
        assert by_stream == {"stdout": b"out\n", "stderr": b"err\n"}
        assert task.end is not None and (task.end.state, task.end.exit_code, task.end.offset) == (
            "failed",
            3,
            8,
        )
        assert [c.data for c in task.output(offset=4)] == [b"err\n"]
        assert task.wait().exit_code == 3

        pending = node.new_task(
            ["sh", "-c", "echo $GREETING"], env={"GREETING": "hi"}, name="greet"
        )  # NewTask
        assert pending.status().state == "pending"
        pending.start()
        assert pending.wait().state == "succeeded"
        assert b"".join(c.data for c in pending.output()) == b"hi\n"

        sleeper = node.start(["sleep", "60"])
        stopped = sleeper.stop(grace=1)  # StopTask
        assert stopped.state == "stopped"
        assert sleeper.stop().state == "stopped"  # stopping a finished task answers its state

        ids = session.add_results(
            task.id,
            [  # AddResult (a batch)
                {"name": "boot/uart", "outcome": "passed", "duration": 1.5},
                {
                    "name": "boot/net",
                    "outcome": "failed",
                    "metrics": {"t": {"value": 3, "unit": "s"}},
                },
            ],
        )
        assert len(ids) == 2
        session.add_result(pending.id, name="greet/ok", outcome="passed")
        data = session.query_results(session="nightly", name="boot/*")  # QueryResults
        assert [r.name for r in data.results] == ["boot/uart", "boot/net"]
        assert data.summary.total == 2 and data.results[1].metrics["t"].unit == "s"
        assert data.results[0].node == "lab1"

        tasks = node.list_tasks(session="nightly")
        assert {t.id for t in tasks} == {task.id, pending.id, sleeper.id}
        assert [t.id for t in node.list_tasks(states=["stopped"])] == [sleeper.id]
        node.release()
        assert node.lease_id is None


def test_jmp_run_on_a_configured_node_and_by_endpoint(
    agents, data_dir: Path, tmp_path: Path, token_file: Path
) -> None:
    agent = agents("--token-file", str(token_file))
    write_config(tmp_path / "jumpstarter.toml", agent.url, token_file=token_file)
    done = run_jmp("run", "--node", "lab1", "--", "sh", "-c", "echo hello; echo oops >&2; exit 7")
    assert (done.returncode, done.stdout, done.stderr) == (7, "hello\n", "oops\n")

    (tmp_path / "jumpstarter.toml").unlink()
    done = run_jmp(
        "run",
        "--endpoint",
        agent.url,
        "--token-file",
        str(token_file),
        "--timeout",
        "0.5",
        "--",
        "sleep",
        "30",
    )
    assert done.returncode == 124
    assert re.fullmatch(r"jmp: task [0-9a-f]+ timed out after 0\.5s and was stopped\n", done.stderr)
    done = run_jmp(
        "run", "--endpoint", agent.url, "--token-file", str(token_file), "--", "no-such-command"
    )
    assert (done.returncode, done.stderr) == (
        127,
        "jmp: error: command not found: no-such-command\n",
    )


def test_jmp_run_fails_on_a_held_node_or_waits_for_it(agents, data_dir: Path) -> None:
    agent = agents()
    with client(data_dir, agent.url).create_session("holder") as holder:
        node = holder.connect("lab1")
        done = run_jmp("run", "--endpoint", agent.url, "--", "true")
        assert done.returncode == 4
        assert re.fullmatch(
            r"jmp: error: node 'lab1' is leased by session 'holder' \(\w+\) since \S+\n",
            done.stderr,
        )
        done = run_jmp("run", "--endpoint", agent.url, "--wait", "0.2", "--", "true")
        assert done.returncode == 4 and "is leased by session 'holder'" in done.stderr
        with subprocess.Popen(
            [JMP, "run", "--endpoint", agent.url, "--wait", "--", "echo", "my turn"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as waiting:
            try:
                time.sleep(1)
                assert waiting.poll() is None  # in line
                node.release()
                out, err = waiting.communicate(timeout=60)
            finally:
                waiting.kill()
    assert (waiting.returncode, out, err) == (0, "my turn\n", "")


# --- security -------------------------------------------------------------------------------


def test_wrong_or_missing_token_is_one_clear_line(
    agents, data_dir: Path, tmp_path: Path, token_file: Path
) -> None:
    agent = agents("--token-file", str(token_file))
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    done = run_jmp("run", "--endpoint", agent.url, "--token-file", str(wrong), "--", "true")
    assert (done.returncode, done.stdout, done.stderr) == (
        5,
        "",
        f"jmp: error: the node at {agent.url} refused the token in {wrong}\n",
    )
    write_config(tmp_path / "jumpstarter.toml", agent.url)
    done = run_jmp("run", "--node", "lab1", "--", "true")
    assert (done.returncode, done.stdout, done.stderr) == (
        5,
        "",
        f"jmp: error: node 'lab1' at {agent.url} requires a token: give its token file (token_file, --token-file)\n",
    )


@pytest.mark.anyio
async def test_without_the_token_the_node_answers_nothing_else(
    agents, data_dir: Path, token_file: Path
) -> None:
    agent = agents("--token-file", str(token_file))
    target = agent.url.removeprefix("grpc://")
    async with grpc.aio.insecure_channel(target) as channel:
        request, read = channel.unary_unary(REQUEST_PATH), channel.unary_stream(READ_OUTPUT_PATH)
        for metadata in (
            (),
            ((TOKEN_KEY, "Bearer nope"),),
            ((TOKEN_KEY, TOKEN),),
            ((CONNECTION_KEY, "abc"),),
        ):
            for message in (FetchConfig(), ListTasks()):
                reply = decode(await request(encode(message), metadata=metadata, timeout=10))
                assert (reply.type, reply.code, reply.message) == (
                    "error",
                    "unauthorized",
                    "invalid or missing token",
                )
            frames = [
                decode(f)
                async for f in read(encode(ReadOutput(task_id="x")), metadata=metadata, timeout=10)
            ]
            assert [(f.type, f.code) for f in frames] == [("error", "unauthorized")]
        # With the token, a call before the handshake is refused by the protocol itself.
        reply = decode(
            await request(
                encode(ListTasks()), metadata=((TOKEN_KEY, f"Bearer {TOKEN}"),), timeout=10
            )
        )
        assert (reply.code, reply.message) == ("unauthorized", "send initialize_connection first")
    assert TOKEN not in agent.log.read_text()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    where = tmp_path_factory.mktemp("tls")
    files = {"ca": where / "ca.pem", "cert": where / "cert.pem", "key": where / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    return files


def test_tls_with_a_certificate_the_test_makes(
    agents, data_dir: Path, tmp_path: Path, token_file: Path, certs
) -> None:
    agent = agents(
        "--token-file",
        str(token_file),
        "--tls-cert",
        str(certs["cert"]),
        "--tls-key",
        str(certs["key"]),
    )
    assert agent.url.startswith("grpcs://127.0.0.1:")
    protocol = client(data_dir, agent.url, token_file=token_file, tls_ca=certs["ca"])
    with protocol.create_session("tls") as session:
        task = session.connect("lab1").start(["echo", "secret"])
        assert b"".join(c.data for c in task.output()) == b"secret\n"

    write_config(tmp_path / "jumpstarter.toml", agent.url, token_file=token_file)  # no tls_ca
    done = run_jmp("run", "--node", "lab1", "--", "true")
    assert (done.returncode, done.stdout, done.stderr) == (
        5,
        "",
        f"jmp: error: cannot reach node 'lab1' at {agent.url}: certificate verify failed (unable to get local "
        "issuer certificate): give the CA that signed the node's certificate as tls_ca (--tls-ca)\n",
    )
    plain = agent.url.replace("grpcs://", "grpc://")
    done = run_jmp("run", "--endpoint", plain, "--token-file", str(token_file), "--", "true")
    assert (done.returncode, done.stdout, done.stderr) == (
        5,
        "",
        f"jmp: error: cannot reach the node at {plain}: the node closed the connection (if it serves TLS, use grpcs://)\n",
    )
    done = run_jmp(
        "run",
        "--endpoint",
        agent.url,
        "--token-file",
        str(token_file),
        "--tls-ca",
        str(certs["ca"]),
        "--",
        "echo",
        "ok",
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_tls_to_a_plaintext_node_and_unreachable_nodes(agents, data_dir: Path, certs) -> None:
    agent = agents()
    tls = agent.url.replace("grpc://", "grpcs://")
    done = run_jmp("run", "--endpoint", tls, "--tls-ca", str(certs["ca"]), "--", "true")
    assert (done.returncode, done.stderr) == (
        5,
        f"jmp: error: cannot reach the node at {tls}: TLS handshake failed: the node does not speak TLS "
        "(use grpc:// for a plaintext node)\n",
    )
    agent.stop()
    done = run_jmp("run", "--endpoint", agent.url, "--", "true")
    assert (done.returncode, done.stderr) == (
        5,
        f"jmp: error: cannot reach the node at {agent.url}: connection refused\n",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--listen", "0.0.0.0:0"],
            "refusing to listen on 0.0.0.0:0 without TLS and a token: give --tls-cert/--tls-key "
            "and --token-file, or --insecure to accept the risk",
        ),
        (
            ["--listen", "[::]:0", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
            "refusing to listen on [::]:0 without "
            "a token: give --tls-cert/--tls-key and --token-file, or --insecure to accept the risk",
        ),
        (["--tls-cert", "c.pem"], "TLS needs both --tls-cert and --tls-key"),
        (["--transport", "local"], "transport 'local' cannot serve a node (it only reaches them)"),
    ],
)
def test_serve_refuses_to_listen_unprotected(data_dir: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["node", "serve", *args])
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"jmp: error: {message}\n")


def test_serve_insecure_warns_and_bind_errors_are_clear(agents, data_dir: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: nothing is ever bound.
    result = CliRunner().invoke(cli, ["node", "serve", "--listen", "192.0.2.1:7100", "--insecure"])
    assert result.exit_code == 1
    assert result.stderr == (
        "jmp: warning: listening on 192.0.2.1:7100 without TLS and a token (--insecure): anyone who can reach "
        "this port can run commands on this machine\n"
        "jmp: error: cannot listen on 192.0.2.1:7100: Cannot assign requested address\n"
    )
    agent = agents()
    result = CliRunner().invoke(cli, ["node", "serve", "--listen", f"127.0.0.1:{agent.port}"])
    assert (result.exit_code, result.stderr) == (
        1,
        f"jmp: error: cannot listen on 127.0.0.1:{agent.port}: the address is in use (is another node serving there?)\n",
    )
    result = CliRunner().invoke(cli, ["node", "serve", "--listen", "nowhere"])
    assert (
        result.exit_code == 2
        and "Invalid value for --listen: expected HOST:PORT, got 'nowhere'" in result.stderr
    )


def test_serve_stops_cleanly_on_sigterm_and_sigint(agents, data_dir: Path) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        agent = agents()
        agent.process.send_signal(signum)
        assert agent.process.wait(15) == 0
        assert agent.log.read_text() == f"node 'lab1' (driver local) listening on {agent.url}\n"


# --- leases ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_held_node_is_a_conflict_and_waiting_is_first_come_first_served(
    agents, data_dir: Path
) -> None:
    agent = agents()
    protocol = client(data_dir, agent.url)
    got: list[str] = []

    async def take(name: str, hold: anyio.Event) -> None:
        async with protocol.create_async_session(name) as session:
            node = await session.connect("lab1", wait=60)
            got.append(name)
            await hold.wait()
            await node.release()

    async with protocol.create_async_session("first") as first:
        await first.connect("lab1")
        async with protocol.create_async_session("second") as second:
            with pytest.raises(
                Conflict,
                match=r"^node 'lab1' is leased by session 'first' \(\w+\) since \d{4}-\d\d-\d\dT",
            ):
                await second.connect("lab1")
            with pytest.raises(Conflict, match=r"^node 'lab1' is leased by session 'first'"):
                await second.connect("lab1", wait=0.3)
        release = {name: anyio.Event() for name in ("b", "c", "d")}
        async with protocol.create_async_session("probe") as probe, anyio.create_task_group() as tg:

            async def waiting() -> int:
                with pytest.raises(Conflict) as conflict:
                    await probe.connect("lab1")
                return conflict.value.details["waiting"]

            for n, name in enumerate(("b", "c", "d"), 1):  # queue up in this order
                tg.start_soon(take, name, release[name])
                while await waiting() < n:
                    await anyio.sleep(0.02)
            assert got == []
            await first.nodes[0].release()
            for name in ("b", "c", "d"):
                while name not in got:
                    await anyio.sleep(0.02)
                assert got[-1] == name
                release[name].set()
    assert got == ["b", "c", "d"]


@pytest.mark.anyio
async def test_ten_sessions_racing_for_one_node_hold_it_one_at_a_time(
    agents, data_dir: Path
) -> None:
    agent = agents()
    protocol = client(data_dir, agent.url)
    held: list[tuple[float, float, str]] = []

    async def race(i: int) -> None:
        async with protocol.create_async_session(f"racer{i}") as session:
            node = await session.connect("lab1", wait=120)
            start = time.monotonic()
            task = await node.start(["true"])  # only the holder may start tasks
            await task.wait()
            end = time.monotonic()  # before the release is sent
            held.append((start, end, node.lease_id or ""))
            await node.release()

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(race, i)
    held.sort()
    assert len(held) == 10 and len({lease for _, _, lease in held}) == 10
    for (_, end, _), (start, _, _) in zip(held, held[1:], strict=False):
        assert end < start  # one lease ended before the next began


def test_a_vanished_client_loses_its_lease_and_its_task_runs_on(
    agents, data_dir: Path, tmp_path: Path
) -> None:
    agent = agents("--keepalive", "1")
    script = f"""
import os, signal, sys
from jumpstarter.config import Config, NodeConfig
from jumpstarter.protocol import JumpStarterProtocol
nodes = {{"lab1": NodeConfig(transport="grpc", endpoint={agent.url!r})}}
with JumpStarterProtocol(Config(nodes=nodes)).create_session("vanishing") as session:
    task = session.connect("lab1").start(["sh", "-c", "sleep 2; echo done"])
    print(task.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    task_id = done.stdout.strip()
    protocol = client(data_dir, agent.url)
    with protocol.create_session("next") as session:
        with pytest.raises(Conflict, match="^node 'lab1' is leased by session 'vanishing'"):
            session.connect("lab1")
        # Granted once the keep-alive has run out and the vanished client's task has
        # ended: a node is never handed on under another session's running task.
        node = session.connect("lab1", wait=30)
        task = node.task(task_id)
        assert task.status().state == "succeeded"
        assert b"".join(c.data for c in task.output()) == b"done\n"
        time.sleep(2.5)  # idle past the keep-alive: the transport's pings keep the lease
        assert node.start(["true"]).wait().state == "succeeded"


# --- reconnect and restart --------------------------------------------------------------------


def test_a_new_client_resumes_output_where_a_killed_one_stopped(
    agents, data_dir: Path, tmp_path: Path
) -> None:
    agent = agents()
    lines = 32_000  # 8 MB
    received = tmp_path / "received"
    script = f"""
import os, sys
from jumpstarter.config import Config, NodeConfig
from jumpstarter.protocol import JumpStarterProtocol
nodes = {{"lab1": NodeConfig(transport="grpc", endpoint={agent.url!r})}}
fd = os.open({str(received)!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
with JumpStarterProtocol(Config(nodes=nodes)).create_session("reader") as session:
    task = session.connect("lab1").start([sys.executable, "-c", {GENERATOR.format(n=lines, pause=0.05)!r}])
    print(task.id, flush=True)
    for chunk in task.output():
        os.write(fd, chunk.data)
"""
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as reader:
        try:
            assert reader.stdout is not None
            task_id = reader.stdout.readline().strip()
            deadline = time.monotonic() + 60
            while not received.exists() or received.stat().st_size < 1_000_000:
                assert time.monotonic() < deadline and reader.poll() is None
                time.sleep(0.01)
        finally:
            reader.kill()  # mid-stream
    got = received.read_bytes()
    expected = line_output(lines)
    assert 1_000_000 <= len(got) < len(expected)
    with client(data_dir, agent.url).create_session("resumer") as session:
        task = session.connect("lab1", lease=False).task(task_id)
        rest = list(task.output(offset=len(got)))
        assert rest[0].offset == len(got)
    whole = got + b"".join(c.data for c in rest)
    assert hashlib.sha256(whole).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert task.end is not None and (task.end.state, task.end.offset) == (
        "succeeded",
        len(expected),
    )


class Proxy:
    """A TCP forwarder on 127.0.0.1 whose connections the test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.forwarded = 0  # bytes, both ways, over every connection
        self.cut_at: list[int] = []  # cut every connection once this many bytes went by

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self._forward, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        self.cut()
        await self.server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    self.forwarded += len(data)
                    if self.cut_at and self.forwarded >= self.cut_at[0]:
                        self.cut_at.pop(0)
                        self.cut()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Reset every connection through the proxy (it keeps accepting new ones)."""
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()


@pytest.mark.anyio
async def test_a_cut_connection_is_reconnected_and_the_stream_resumes(
    agents, data_dir: Path
) -> None:
    agent = agents()
    lines = 32_000
    async with Proxy(agent.port) as proxy:
        protocol = client(data_dir, f"grpc://127.0.0.1:{proxy.port}")
        async with protocol.create_async_session("flaky") as session:
            node = await session.connect("lab1")
            task = await node.start([sys.executable, "-c", GENERATOR.format(n=lines, pause=0.02)])
            got = bytearray()
            cuts = 0
            async for chunk in task.output():
                assert chunk.offset == len(got)  # nothing lost, nothing doubled
                got += chunk.data
                if len(got) > (cuts + 1) * 2_000_000 and cuts < 2:
                    cuts += 1
                    proxy.cut()
            assert cuts == 2 and proxy.connections >= 3
            assert hashlib.sha256(got).digest() == hashlib.sha256(line_output(lines)).digest()
            proxy.cut()
            assert (await task.wait()).state == "succeeded"  # a unary call after a cut
            assert task.end is not None and task.end.offset == len(got)


@pytest.mark.anyio
async def test_an_agent_killed_mid_task_restarts_with_the_task_lost_and_results_kept(
    agents, data_dir: Path, tmp_path: Path
) -> None:
    agent = agents()
    pidfile = tmp_path / "task.pid"
    protocol = client(data_dir, agent.url, options={"reconnect_timeout": 60})
    try:
        async with protocol.create_async_session("restart") as session:
            node = await session.connect("lab1")
            done = await node.start(["echo", "finished"])
            await done.wait()
            ids = await session.add_results(
                done.id, [{"name": f"case/{i}", "outcome": "passed"} for i in range(50)]
            )
            task = await node.start(
                ["sh", "-c", f"echo $$ > {pidfile}; echo started; exec sleep 60"]
            )
            stream = task.output()
            first = await stream.__anext__()
            assert first.data == b"started\n"

            agent.process.send_signal(signal.SIGKILL)
            agent.process.wait()
            restarted = agents(listen=f"127.0.0.1:{agent.port}")
            # The follower was cut off; it reconnects to the new agent, shakes hands
            # again and the output ends where it was: the task is lost.
            rest = [chunk async for chunk in stream]
            assert rest == [] and task.end is not None
            assert (task.end.state, task.end.offset) == ("lost", len(b"started\n"))
            info = await task.status()
            assert (info.state, info.message) == ("lost", "the node agent went away")
            assert (await done.status()).state == "succeeded"
            data = await session.query_results(task_id=done.id)
            assert [r.id for r in data.results] == ids and data.summary.total == 50
            again = await node.start(["echo", "serving again"])  # the lease was retaken
            assert b"".join([c.data async for c in again.output()]) == b"serving again\n"
        assert restarted.process.poll() is None
    finally:
        if pidfile.exists():  # the task outlived its agent; it is ours to end
            pid = int(pidfile.read_text())
            if pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.anyio
async def test_a_follower_gives_up_when_the_node_does_not_come_back(
    agents, data_dir: Path, tmp_path: Path
) -> None:
    agent = agents()
    pidfile = tmp_path / "task.pid"
    protocol = client(data_dir, agent.url, options={"reconnect_timeout": 1})
    try:
        # Leaving the session does not wait for the dead node either.
        with anyio.fail_after(20):
            async with protocol.create_async_session("patient") as session:
                node = await session.connect("lab1")
                command = f"echo $$ > {pidfile}; echo started; exec sleep 30"
                task = await node.start(["sh", "-c", command])
                stream = task.output()
                assert (await stream.__anext__()).data == b"started\n"
                agent.process.send_signal(signal.SIGKILL)
                agent.process.wait()
                with pytest.raises(TransportError) as error:
                    await stream.__anext__()
                await stream.aclose()
        message = str(error.value)
        assert re.fullmatch(
            rf"lost connection to node 'lab1' at {agent.url}: .+ \(gave up after 1s\)", message
        )
    finally:
        if pidfile.exists() and pid_alive(int(pidfile.read_text())):
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)


@pytest.mark.anyio
async def test_an_unreachable_node_fails_at_once_and_a_bad_endpoint_is_a_config_error(
    data_dir: Path,
) -> None:
    protocol = client(data_dir, "grpc://127.0.0.1:1")
    async with protocol.create_async_session("s") as session:
        with pytest.raises(
            TransportError,
            match=r"^cannot reach node 'lab1' at grpc://127.0.0.1:1: connection refused$",
        ):
            await session.connect("lab1")
    protocol = client(data_dir, "http://127.0.0.1:1")
    async with protocol.create_async_session("s") as session:
        with pytest.raises(
            Exception,
            match=r"^node 'lab1': invalid endpoint 'http://127.0.0.1:1'; expected grpc://",
        ):
            await session.connect("lab1")
