"""Nothing a task starts escapes: every shape of runaway process is gone after stop,
Ctrl-C of ``jmp run``, a timeout, a node killed and restarted, an agent killed.

Real ``jmp`` processes, real detached agents, a real ``jmp node serve``. Every
process of a task carries a marker in its environment (``--env``), so the test
counts what is left of it in ``/proc`` however it left its process group. Every
wait is bounded by the grace plus a margin; no time is asserted."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import anyio
import pytest
from conftest import JMP, pid_alive, run_jmp
from jumpstarter.plugins.containment import Containment, cgroup_base
from test_lost_and_cleanup import serve, task_pid, wait_until  # noqa: F401 (serve is a fixture)

GRACE = 0.5
MARGIN = 15.0
"""Room on top of the grace for a loaded machine: a bound against a hang, not a timing."""

# Each shape prints "ready" once its runaway exists, and keeps its leader running
# (except the one whose point is a leader that has gone).
SHAPES = {
    # A double fork and setsid: the grandchild leaves the process group and is no
    # one's child; it keeps the task's stdout open.
    "setsid escapee with the task's stdout": "(setsid sleep 300 &); echo ready; sleep 300",
    "setsid escapee without the task's stdout":
        "(setsid sleep 300 </dev/null >/dev/null 2>&1 &); echo ready; sleep 300",
    # The leader backgrounds a child that holds the output and exits at once.
    "leader that backgrounds a child and exits": "sleep 300 & echo ready",
    # A setsid writer keeps writing into the task's stdout while its leader dies of
    # SIGPIPE (as a writer to a closed pipe does).
    "pipe writer whose leader dies of SIGPIPE":
        "(setsid sh -c 'while :; do echo tick; sleep 0.05; done' &); echo ready; "
        "sleep 0.2; kill -PIPE $$; sleep 300",
}


def marked(mark: str) -> list[int]:
    """The live processes whose environment holds ``JMP_TEST_MARK=mark``."""
    needle = f"JMP_TEST_MARK={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
        except OSError:
            continue
        if pid_alive(int(entry)):
            found.append(int(entry))
    return found


@pytest.fixture
def mark() -> Iterator[str]:
    """A marker for one test's task processes; whatever carries it is killed at the end."""
    value = secrets.token_hex(8)
    yield value
    for pid in marked(value):
        with suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def shape_args(mark: str, shape: str) -> list[str]:
    return ["--env", f"JMP_TEST_MARK={mark}", "--shell", "--", SHAPES[shape]]


READERS: dict[int, threading.Thread] = {}


def start_run(args: list[str], lines: list[bytes] | None = None) -> tuple[subprocess.Popen[bytes], threading.Event]:
    """``jmp run ARGS``; the event is set once it printed ``ready``; what it prints
    goes to ``lines``."""
    process = subprocess.Popen([JMP, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ready = threading.Event()
    seen = lines if lines is not None else []

    def read() -> None:
        for line in process.stdout:
            seen.append(line)
            if line == b"ready\n":
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    READERS[process.pid] = reader
    return process, ready


def finish(process: subprocess.Popen[bytes], grace: float = GRACE) -> int:
    try:
        return process.wait(timeout=grace + MARGIN)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
        READERS.pop(process.pid).join(MARGIN)
        process.stdout.close()


# --- stop, Ctrl-C, timeout ----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_task_stop_leaves_nothing(data_dir: Path, mark: str, shape: str) -> None:
    started = run_jmp("task", "start", *shape_args(mark, shape))
    assert (started.returncode, started.stderr) == (0, "")
    task_id = started.stdout.strip()
    assert wait_until(lambda: marked(mark), timeout=MARGIN)
    stopped = run_jmp("task", "stop", "--grace", str(GRACE), task_id, timeout=GRACE + MARGIN)
    assert (stopped.returncode, stopped.stderr) == (0, "")
    assert stopped.stdout.split()[1] in ("stopped", "failed", "succeeded")
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


@pytest.mark.parametrize("shape", SHAPES)
def test_ctrl_c_of_jmp_run_leaves_nothing(data_dir: Path, mark: str, shape: str) -> None:
    process, ready = start_run(["--grace", str(GRACE), *shape_args(mark, shape)])
    assert ready.wait(MARGIN)
    process.send_signal(signal.SIGINT)
    assert finish(process) == 128 + signal.SIGINT
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_timeout_leaves_nothing(data_dir: Path, mark: str, shape: str) -> None:
    process, ready = start_run(["--timeout", "2", "--grace", str(GRACE), *shape_args(mark, shape)])
    assert ready.wait(MARGIN)
    assert finish(process) == 124
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


def test_what_a_finished_task_left_running_is_killed(data_dir: Path, mark: str) -> None:
    """A child that let go of the output outlives its leader only until the task ends."""
    script = "sleep 300 </dev/null >/dev/null 2>&1 & (setsid sleep 300 >/dev/null 2>&1 &); echo done"
    done = run_jmp("run", "--env", f"JMP_TEST_MARK={mark}", "--shell", "--", script, timeout=MARGIN)
    assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


def test_the_timeout_honours_grace(data_dir: Path, mark: str) -> None:
    """A cleanup on SIGTERM that takes longer than the old fixed 5 s completes when
    --grace gives it the time: the timeout stops with the task's own grace."""
    script = "trap 'sleep 5.5; echo cleaned up; exit 3' TERM; echo ready; while :; do sleep 0.05; done"
    lines: list[bytes] = []
    process, ready = start_run(["--timeout", "1", "--grace", "30", "--env", f"JMP_TEST_MARK={mark}",
                                "--shell", "--", script], lines)
    assert finish(process, grace=30) == 124
    assert b"cleaned up\n" in lines
    assert marked(mark) == []


# --- crashes ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_an_agent_killed_leaves_nothing(data_dir: Path, mark: str, shape: str) -> None:
    started = run_jmp("task", "start", *shape_args(mark, shape))
    assert (started.returncode, started.stderr) == (0, "")
    task_id = started.stdout.strip()
    agent_file = data_dir / "agents" / f"{task_id}.agent"
    assert wait_until(lambda: marked(mark), timeout=MARGIN)
    if not agent_file.exists():  # the task has ended already (its leader went)
        assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)
        return
    agent = int(agent_file.read_text().rpartition(":")[2])
    os.kill(agent, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(agent), timeout=MARGIN)
    stopped = run_jmp("task", "stop", "--grace", str(GRACE), task_id, timeout=GRACE + MARGIN)
    assert (stopped.returncode, stopped.stdout, stopped.stderr) == (0, f"{task_id} lost\n", "")
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


@pytest.mark.parametrize("shape", SHAPES)
def test_a_node_killed_and_restarted_leaves_nothing(
    data_dir: Path, tmp_path: Path, serve, mark: str, shape: str  # noqa: F811
) -> None:
    process, url = serve()
    (tmp_path / "jumpstarter.toml").write_text(f'[nodes.lab1]\ntransport = "grpc"\nendpoint = "{url}"\n')
    started = run_jmp("task", "start", "--node", "lab1", *shape_args(mark, shape))
    assert (started.returncode, started.stderr) == (0, "")
    assert wait_until(lambda: marked(mark), timeout=MARGIN)
    time.sleep(0.3)  # let the shape's runaway leave its group
    process.kill()
    process.wait()
    serve(listen=url.rpartition("/")[2])
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


def test_sigterm_to_the_node_does_not_wait_for_an_escapee(
    data_dir: Path, tmp_path: Path, serve, mark: str  # noqa: F811
) -> None:
    process, url = serve()
    (tmp_path / "jumpstarter.toml").write_text(f'[nodes.lab1]\ntransport = "grpc"\nendpoint = "{url}"\n')
    started = run_jmp("task", "start", "--node", "lab1", *shape_args(mark, "setsid escapee with the task's stdout"))
    assert (started.returncode, started.stderr) == (0, "")
    assert wait_until(lambda: len(marked(mark)) >= 2, timeout=MARGIN)
    process.terminate()
    assert process.wait(timeout=MARGIN) is not None
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


# --- the mechanisms -----------------------------------------------------------------------


def test_this_machine_gives_each_task_a_cgroup(data_dir: Path) -> None:
    if cgroup_base() is None:
        pytest.skip("no writable cgroup2 mount here: the subreaper mechanism is tested below")
    assert Containment().mechanism == "cgroup"
    # No task cgroup is left behind by the tests above (each is removed at its end).
    assert [p.name for p in cgroup_base().iterdir() if p.is_dir() and p.name.startswith(f"{os.getpid()}.")] == []


@pytest.mark.parametrize("shape", ["leader that backgrounds a child and exits", "setsid escapee without the task's stdout"])
def test_without_cgroups_the_subreaper_catches_the_tree(
    data_dir: Path, mark: str, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JMP_CONTAINMENT", "subreaper")
    # Slow enough for the tree walk to see the child before it leaves the tree:
    # faster than that, it is the limit the README states.
    script = SHAPES[shape].replace("&)", "& sleep 0.5)")
    process, ready = start_run(["--grace", str(GRACE), "--env", f"JMP_TEST_MARK={mark}", "--shell", "--", script])
    assert ready.wait(MARGIN)
    time.sleep(1.0)  # the runaway has left the group
    process.send_signal(signal.SIGINT)
    assert finish(process) == 128 + signal.SIGINT
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


def test_a_bad_containment_setting_is_one_line(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JMP_CONTAINMENT", "jail")
    done = run_jmp("run", "--", "true", timeout=MARGIN)
    assert done.returncode != 0
    assert done.stderr == "jmp: error: JMP_CONTAINMENT must be auto, cgroup, subreaper or process-group; got 'jail'\n"


# --- threads and resources ----------------------------------------------------------------


@pytest.mark.anyio
async def test_threads_do_not_grow_with_tasks(data_dir: Path) -> None:
    """200 sleeping tasks at once: their exits are waited for through pidfds, not a
    watcher thread each."""
    from jumpstarter.protocol import JumpStarterProtocol

    async with JumpStarterProtocol().create_async_session("threads") as session:
        node = await session.connect("local")
        first = await node.start(["true"])
        await first.wait()
        before = threading.active_count()
        tasks = [await node.start(["sleep", "30"]) for _ in range(200)]
        during = threading.active_count()
        for task in tasks:
            await task.stop(0)
    assert during - before < 10, (before, during)


def test_a_file_size_limit_fails_the_task_not_the_node(data_dir: Path) -> None:
    """``ulimit -f`` on the node: the output log cannot grow, so the task fails with
    that cause, its processes are stopped, and the node goes on serving."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * 1024 * 1024, 4 * 1024 * 1024))

    script = "head -c 10000000 /dev/zero; sleep 300"
    done = subprocess.run([JMP, "run", "--shell", "--", script], capture_output=True, timeout=MARGIN,
                          preexec_fn=limit)
    assert done.returncode == 128 + signal.SIGTERM  # the node stopped it: SIGTERM
    assert done.stderr.decode().endswith(" failed: file too large writing the output log\n")
    assert done.stderr.decode().count("\n") == 1
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(data_dir / "jumpstarter.db")) as db:
        rows = db.execute("SELECT state, message FROM tasks").fetchall()
    assert rows == [("failed", "file too large writing the output log")]
    again = run_jmp("run", "--", "echo", "still serving", timeout=MARGIN)
    assert (again.returncode, again.stdout) == (0, "still serving\n")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator:
    """``mount(directory, size)``: a tmpfs of ``size`` at ``directory`` (made if
    missing), unmounted at the end; skips the test where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(directory: Path, size: str) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {done.stderr.strip()}")
        mounted.append(directory)
        return directory

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.mark.anyio
async def test_a_full_output_filesystem_fails_the_task_and_the_node_serves_on(data_dir: Path, small_fs) -> None:
    from jumpstarter.protocol import JumpStarterProtocol

    small_fs(data_dir / "output", "1m")
    async with JumpStarterProtocol().create_async_session("full") as session:
        node = await session.connect("local")
        quiet = await node.start(["sh", "-c", "sleep 1"])  # prints nothing: needs no space
        loud = await node.start(["sh", "-c", "head -c 5000000 /dev/zero; echo ready >&2; sleep 300"])
        info = await loud.wait(GRACE + MARGIN)
        assert (info.state.value, info.message) == ("failed", "no space left on device writing the output log")
        assert info.exit_code == -signal.SIGTERM  # its processes were stopped
        assert (await quiet.wait(MARGIN)).state.value == "succeeded"
        again = await node.start(["true"])
        assert (await again.wait(MARGIN)).state.value == "succeeded"


def test_out_of_file_handles_a_start_is_one_line_and_the_node_serves_on(data_dir: Path) -> None:
    """``ulimit -n`` on the node (the client's process, for the local node): a task
    that cannot get its pipes is refused with the cause, the store as it was."""
    script = (
        "import os, resource, sys\n"
        "from jumpstarter.protocol import JumpStarterProtocol\n"
        "from jumpstarter.errors import JumpstarterError\n"
        "with JumpStarterProtocol().create_session('fds') as session:\n"
        "    node = session.connect('local')\n"
        "    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "    held = []\n"
        "    try:\n"
        "        while True: held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "    except OSError: pass\n"
        "    try:\n"
        "        node.start(['true'])\n"
        "    except JumpstarterError as exc:\n"
        "        print(type(exc).__name__, exc)\n"
        "    for fd in held: os.close(fd)\n"
        "    print(node.start(['true']).wait().state.value)\n"
    )
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=MARGIN)
    assert done.stdout.splitlines() == ["SpawnFailed cannot start true: Too many open files", "succeeded"], done.stderr


@pytest.mark.anyio
async def test_a_store_that_cannot_commit_gets_the_final_state_once_space_is_back(
    data_dir: Path, tmp_path: Path, small_fs, caplog: pytest.LogCaptureFixture
) -> None:
    from jumpstarter.config import Config
    from jumpstarter.protocol import JumpStarterProtocol

    full = small_fs(tmp_path / "store", "1m")
    protocol = JumpStarterProtocol(Config(data_dir=data_dir, store=str(full / "jumpstarter.db")))
    async with protocol.create_async_session("full-store") as session:
        node = await session.connect("local")
        task = await node.start(["sh", "-c", "sleep 0.5"])
        filler = fill_up(full)
        with anyio.move_on_after(MARGIN):
            while "the store cannot record" not in caplog.text:
                await anyio.sleep(0.05)
        assert "database or disk is full; trying again" in caplog.text
        assert (await task.status()).state.value == "running"  # ended, but not yet recorded
        filler.unlink()
        assert (await task.wait(MARGIN)).state.value == "succeeded"
        again = await node.start(["true"])
        assert (await again.wait(MARGIN)).state.value == "succeeded"
    assert marked_none_left(task.id)


@pytest.mark.anyio
async def test_a_task_started_on_a_full_store_is_one_clear_error_and_the_node_serves_on(
    data_dir: Path, tmp_path: Path, small_fs, caplog: pytest.LogCaptureFixture
) -> None:
    from jumpstarter.config import Config
    from jumpstarter.errors import Unavailable
    from jumpstarter.protocol import JumpStarterProtocol

    full = small_fs(tmp_path / "store", "1m")
    protocol = JumpStarterProtocol(Config(data_dir=data_dir, store=str(full / "jumpstarter.db")))
    async with protocol.create_async_session("full-store") as session:
        node = await session.connect("local")
        await (await node.start(["true"])).wait(MARGIN)
        filler = fill_up(full)
        with pytest.raises(Unavailable, match=rf"^the store {re.escape(str(full))}/jumpstarter.db cannot commit: .*full"):
            for _ in range(50):  # until the store's own pages are used up too
                await (await node.start(["true"])).wait(MARGIN)
        assert "Traceback" not in caplog.text
        filler.unlink()
        again = await node.start(["true"])
        assert (await again.wait(MARGIN)).state.value == "succeeded"


def fill_up(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem is full; the file."""
    filler = directory / "filler"
    with open(filler, "wb") as f, suppress(OSError):
        while True:
            f.write(bytes(65536))
            f.flush()
    return filler


def marked_none_left(task_id: str) -> bool:
    """No cgroup of ours is left for a finished task (the sweep of a dead node's aside)."""
    base = cgroup_base()
    return base is None or not [p for p in base.iterdir() if p.is_dir() and p.name.startswith(f"{os.getpid()}.")]


# --- a start that died --------------------------------------------------------------------


DIES_MID_START = """
import os
import jumpstarter_driver_local.node as local
from jumpstarter.protocol import JumpStarterProtocol

async def die(self, spec, output):
    print("created", flush=True)
    os._exit(9)  # the process dies between creating the task and running it

local.LocalNodeDriver.spawn = die
with JumpStarterProtocol().create_session("doomed") as session:
    session.connect("local").start(["true"])
"""


def test_a_task_whose_start_died_is_reaped_not_pending_forever(data_dir: Path) -> None:
    import json
    import sys

    died = subprocess.run([sys.executable, "-c", DIES_MID_START], capture_output=True, text=True, timeout=MARGIN)
    assert (died.returncode, died.stdout) == (9, "created\n")
    new = run_jmp("task", "new", "--", "true")  # pending by intent: it stays so
    assert new.returncode == 0, new.stderr
    listed = run_jmp("task", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    tasks = {task["id"]: task for task in json.loads(listed.stdout)["tasks"]}
    states = sorted((task["state"], task.get("message")) for task in tasks.values())
    assert states == [
        ("lost", "the process starting the task went away before it ran"),
        ("pending", None),
    ]


LATE_PRINTERS = """
import resource, sys
from jumpstarter.errors import SpawnFailed
from jumpstarter.protocol import JumpStarterProtocol

print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
with JumpStarterProtocol().create_session("late") as session:
    node = session.connect("local")
    tasks, refused = [], set()
    for _ in range(60):
        try:
            tasks.append(node.start(["sh", "-c", "sleep 0.5; echo late"]))
        except SpawnFailed as exc:
            refused.add(str(exc))
    ends = {(info.state.value, info.message) for info in (task.wait() for task in tasks)}
    print(sorted(refused), sorted(ends, key=str), flush=True)
    print(node.start(["true"]).wait().state.value)
"""


def test_a_low_file_handle_limit_fails_tasks_with_the_cause_never_the_node(data_dir: Path) -> None:
    """``ulimit -n 64`` on the node: tasks that find no file handle for their pipes are
    refused, those that find none for their output log fail with that cause; every
    other ends as it should, nothing prints a traceback, and the node serves on."""
    import resource
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    done = subprocess.run([sys.executable, "-c", LATE_PRINTERS], capture_output=True, text=True,
                          timeout=MARGIN * 2, preexec_fn=limit)
    assert "Traceback" not in done.stderr, done.stderr
    limit_seen, outcome, last = done.stdout.splitlines()
    assert limit_seen == "64"
    assert last == "succeeded"
    allowed = {
        "[('failed', 'too many open files writing the output log'), ('succeeded', None)]",
        "[('succeeded', None)]",
        "[('failed', 'too many open files writing the output log')]",
    }
    refused, _, ends = outcome.partition("] ")
    assert refused in ("[]", "['cannot start sh: Too many open files'"), outcome
    assert ends in allowed, outcome
    assert outcome != "[] [('succeeded', None)]"  # the limit was reached at all


@pytest.mark.parametrize("shape", ["setsid escapee with the task's stdout", "leader that backgrounds a child and exits"])
def test_jmp_run_killed_leaves_nothing_once_a_node_looks(data_dir: Path, mark: str, shape: str) -> None:
    """``jmp run`` serves the local node in its own process: killed with SIGKILL, its
    task is lost and its processes are killed by the next ``jmp`` that opens the node."""
    process, ready = start_run(["--grace", str(GRACE), *shape_args(mark, shape)])
    assert ready.wait(MARGIN)
    process.kill()
    finish(process)
    assert marked(mark) != []  # the task outlived its node
    listed = run_jmp("task", "list", timeout=MARGIN)
    assert (listed.returncode, listed.stderr) == (0, "")
    assert "lost" in listed.stdout.split()
    assert wait_until(lambda: marked(mark) == [], timeout=MARGIN)


@pytest.mark.anyio
async def test_a_node_closing_with_a_full_store_does_not_hang(
    data_dir: Path, tmp_path: Path, small_fs, caplog: pytest.LogCaptureFixture
) -> None:
    """The end of a task the full store cannot take is not waited for for ever when
    the node server stops: the next node server marks the task lost."""
    from jumpstarter.config import Config
    from jumpstarter.protocol import JumpStarterProtocol

    full = small_fs(tmp_path / "store", "1m")
    protocol = JumpStarterProtocol(Config(data_dir=data_dir, store=str(full / "jumpstarter.db")))
    filler = full / "filler"
    with anyio.fail_after(MARGIN):
        async with protocol.create_async_session("full-store") as session:
            node = await session.connect("local")
            task = await node.start(["sh", "-c", "sleep 0.3"])
            with open(filler, "wb") as f, suppress(OSError):
                while True:
                    f.write(bytes(65536))
                    f.flush()
            while "the store cannot record" not in caplog.text:
                await anyio.sleep(0.05)
        # The session closed, its node server with it, while the store was still full.
    assert "giving up, the next node server marks it lost" in caplog.text
    filler.unlink()
    async with protocol.create_async_session("after") as session:
        node = await session.connect("local")
        assert (await node.task(task.id).status()).state.value == "lost"
