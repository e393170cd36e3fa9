"""Exactly-once result batches: a real ``jmp node serve`` killed between the commit of
a batch and its reply, then the batch sent again, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jumpstarter.config import Config, NodeConfig
from jumpstarter.errors import TransportError
from jumpstarter.protocol import JumpStarterProtocol
from jumpstarter_protocol import OpenTask, ResultSpec, TaskSpec
from jumpstarter_testing._recorder import Sender
from stores import postgres_url, store_url  # noqa: F401  (fixture)

# ``jmp node serve`` itself, with one change: when the file named by
# JMP_TEST_DIE_AFTER_COMMIT exists, the node removes it and SIGKILLs itself right after
# a result batch committed, before it can answer.
_DIE_AFTER_COMMIT = """
import os, signal, sys
from jumpstarter.store.postgres import PostgresStore
from jumpstarter.store.sqlite import SQLiteStore

def dying(add):
    async def add_result_ids(self, *args, **kwargs):
        ids = await add(self, *args, **kwargs)
        marker = os.environ["JMP_TEST_DIE_AFTER_COMMIT"]
        if os.path.exists(marker):
            os.unlink(marker)
            os.kill(os.getpid(), signal.SIGKILL)
        return ids
    return add_result_ids

for cls in (SQLiteStore, PostgresStore):
    cls.add_result_ids = dying(cls.add_result_ids)
from jumpstarter.cli import main
sys.argv = ["jmp", *sys.argv[1:]]
main()
"""


class Node:
    """A ``jmp node serve`` that may die after a commit, and be started again on its port."""

    def __init__(self, tmp_path: Path, store: str) -> None:
        self.tmp_path, self.store = tmp_path, store
        self.marker = tmp_path / "die-after-commit"
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0

    def start(self, listen: str = "127.0.0.1:0") -> None:
        log = self.tmp_path / f"node-{self.starts}.log"
        self.starts += 1
        env = {**os.environ, "JMP_TEST_DIE_AFTER_COMMIT": str(self.marker)}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _DIE_AFTER_COMMIT, "node", "serve", "--listen", listen,
                 "--name", "lab1", "--store", self.store],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.tmp_path,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if match := re.search(r"listening on (\S+)\n", log.read_text()):
                self.url = match.group(1)
                return
            assert self.process.poll() is None, log.read_text()
            time.sleep(0.05)
        raise AssertionError(f"the node did not say where it listens: {log.read_text()}")

    def restart(self) -> None:
        assert self.process is not None
        self.process.wait(30)
        assert self.process.returncode == -9, "the node should have killed itself"
        self.start(self.url.removeprefix("grpc://"))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(params=["sqlite", "postgres"])
def node(request: pytest.FixtureRequest, tmp_path: Path, data_dir: Path) -> Iterator[Node]:
    """The node on each store."""
    yield from _served(request, tmp_path, request.param)


@pytest.fixture
def sqlite_node(request: pytest.FixtureRequest, tmp_path: Path, data_dir: Path) -> Iterator[Node]:
    """The node on SQLite: the retries of the client's side, the store's part once."""
    yield from _served(request, tmp_path, "sqlite")


def _served(request: pytest.FixtureRequest, tmp_path: Path, kind: str) -> Iterator[Node]:
    served = Node(tmp_path, store_url(kind, tmp_path, request))
    served.start()
    try:
        yield served
    finally:
        served.stop()


def _client(data_dir: Path, url: str, reconnect_timeout: float) -> JumpStarterProtocol:
    nodes = {"lab1": NodeConfig(transport="grpc", endpoint=url, options={"reconnect_timeout": reconnect_timeout})}
    return JumpStarterProtocol(Config(data_dir=data_dir / "client", nodes=nodes))


def _batch(tag: str, size: int = 50) -> list[ResultSpec]:
    return [ResultSpec(name=f"{tag}/{i}", outcome="passed") for i in range(size)]


def test_a_batch_whose_reply_was_lost_is_stored_once_when_sent_again(node: Node, data_dir: Path) -> None:
    protocol = _client(data_dir, node.url, reconnect_timeout=0.3)
    with protocol.create_session("exactly-once") as session:
        lab = session.connect("lab1", lease=False)
        task_id = lab.request(OpenTask(spec=TaskSpec(argv=["pytest"]))).task.id
        before = session.add_results(task_id, _batch("before"))
        node.marker.touch()
        with pytest.raises(TransportError):  # committed, then the node died: no reply
            session.add_results(task_id, _batch("lost"), batch_id="batch-lost")
        assert not node.marker.exists()
        node.restart()
        _until_reachable(lab)
        again = session.add_results(task_id, _batch("lost"), batch_id="batch-lost")
        after = session.add_results(task_id, _batch("after"))
        page = session.query_results(task_id=task_id, limit=1000)
    names = [r.name for r in page.results]
    assert len(names) == len(set(names)) == 150
    assert [r.id for r in page.results if r.name.startswith("lost/")] == again
    assert again[0] > before[-1] and after[0] > again[-1]


def test_the_transport_sends_a_lost_batch_again_with_its_id(sqlite_node: Node, data_dir: Path) -> None:
    node = sqlite_node
    # The transport itself retries a batch carrying its id while the node comes back.
    protocol = _client(data_dir, node.url, reconnect_timeout=60)
    with protocol.create_session("exactly-once") as session:
        lab = session.connect("lab1", lease=False)
        task_id = lab.request(OpenTask(spec=TaskSpec(argv=["pytest"]))).task.id
        node.marker.touch()
        # The recorder's sender: it keeps a failed batch with its id.
        sender = Sender(lambda batch, batch_id: session.add_results(task_id, batch, batch_id=batch_id))
        for result in _batch("case", 120):
            sender.add(result)
        restarter = _in_thread(node.restart)
        sender.flush()
        restarter.join()
        assert (sender.sent, sender.pending, sender.error) == (120, 0, None)
        page = session.query_results(task_id=task_id, limit=1000)
    assert sorted(r.name for r in page.results) == sorted(f"case/{i}" for i in range(120))


def test_the_recorder_sends_a_failed_batch_again_with_the_same_id(sqlite_node: Node, data_dir: Path) -> None:
    node = sqlite_node
    protocol = _client(data_dir, node.url, reconnect_timeout=0.3)
    with protocol.create_session("exactly-once") as session:
        lab = session.connect("lab1", lease=False)
        task_id = lab.request(OpenTask(spec=TaskSpec(argv=["pytest"]))).task.id
        ids_sent: list[str] = []

        def send(batch: list[ResultSpec], batch_id: str) -> object:
            ids_sent.append(batch_id)
            return session.add_results(task_id, batch, batch_id=batch_id)

        sender = Sender(send)
        for result in _batch("case", 80):
            sender.add(result)
        node.marker.touch()
        sender.flush()  # committed, reply lost, given up: kept with its id
        assert (sender.sent, sender.pending) == (0, 80)
        node.restart()
        _until_reachable(lab)
        sender.flush()
        assert (sender.sent, sender.pending, sender.error) == (80, 0, None)
        page = session.query_results(task_id=task_id, limit=1000)
    assert len(ids_sent) == 2 and ids_sent[0] == ids_sent[1]
    assert sorted(r.name for r in page.results) == sorted(f"case/{i}" for i in range(80))


def _until_reachable(lab) -> None:  # type: ignore[no-untyped-def]
    """Wait until the client's channel reaches the restarted node (gRPC backs off
    between connection attempts; the short reconnect_timeout may end first)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            lab.ping()
            return
        except TransportError:
            assert time.monotonic() < deadline, "the restarted node cannot be reached"
            time.sleep(0.1)


def _in_thread(fn):  # type: ignore[no-untyped-def]
    import threading

    thread = threading.Thread(target=fn)
    thread.start()
    return thread
