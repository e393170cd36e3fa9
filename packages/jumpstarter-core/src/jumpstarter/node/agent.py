"""Detached tasks: one small agent process per task, so a task outlives the ``jmp``
command (or the Python program) that started it.

A ``StartRequest`` with ``detach`` to a node served inside the client's process
(the local node) creates the task (state ``pending``) and spawns::

    python -m jumpstarter.node.agent --node NAME --task TASK_ID --report-fd N [--cwd DIR]

detached: a new session, stdio on ``/dev/null``, working directory ``/``, and forked
once more at once, so the agent is no one's child and never gets a terminal. The
agent builds the node's :class:`~jumpstarter.node.server.NodeServer` through
:func:`~jumpstarter.node.server.build_node_server` (so it works for
any node driver), starts the pending task, reports on the pipe ``N`` that the task
runs (or the error that kept it from starting), serves until the task has finished,
then exits. Output goes to the usual output files and state to the usual store, so
every other process reads them as it reads any task's.

The starter hands the agent its effective configuration (paths made absolute) as
JSON in ``$JMP_AGENT_CONFIG``; the agent removes it from its environment before it
runs anything (a task inherits the rest of the starter's environment, as it would
if it were not detached). ``--cwd`` is the starter's working directory: a task
without a ``cwd`` runs there, and a relative ``cwd`` is taken from there.

**Stopping** a detached task from any process on the same machine: the process
writes the grace period (seconds, as text) to ``<data dir>/agents/<task>.stop``, then
sends SIGTERM to the agent, which stops the task with that grace (SIGTERM to the
task's process group, SIGKILL after the grace) and records ``stopped``. Only an agent
that registered itself in ``<data dir>/agents/<task>.agent`` (its ``host:pid``, the
same as the store's agent of the task) is ever signalled. The agent removes both
files when it exits. Should the agent itself die (killed), a node server that waits
for or follows the task marks it ``lost`` rather than wait forever, and kills the
task's processes (see :func:`kill_left_behind`), so nothing runs on that nobody
can stop.

The agent loads plugins as ``jmp`` does (the ``jmp.plugins`` entry points, under the
same ``JMP_PLUGINS`` switches), so plugin objects registered by hand in the starting
process are not seen there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jumpstarter.plugins.containment import kill_lost, start_ticks, ticks_to_epoch

if TYPE_CHECKING:
    from jumpstarter.config import Config
    from jumpstarter.node.server import NodeServer

CONFIG_ENV = "JMP_AGENT_CONFIG"
"""The environment variable that carries the starter's configuration to the agent."""
DEFAULT_GRACE = 5.0
"""The grace of a stop when no ``.stop`` file says otherwise (a plain ``kill``)."""


def agents_dir(data_dir: Path) -> Path:
    return data_dir / "agents"


# --- the starter's side ------------------------------------------------------------------


async def start_detached(config: Config, node: str, task_id: str, *, cwd: str | None = None) -> None:
    """Spawn the agent for the pending task ``task_id`` of ``node`` and return once it
    reports the task running. Raises the :class:`~jumpstarter.errors.NodeError` the
    agent reported (say, :class:`~jumpstarter.errors.SpawnFailed`), or
    :class:`~jumpstarter.errors.InternalError` if it exited without a word; the store
    is then as the agent found it (the task still pending)."""
    import anyio
    import anyio.to_thread
    from jumpstarter_protocol import Error

    from jumpstarter.config import resolve_paths
    from jumpstarter.errors import InternalError, NodeError

    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "jumpstarter.node.agent", "--node", node, "--task", task_id]
    argv += ["--report-fd", str(write_fd), "--cwd", cwd or os.getcwd()]
    env = {**os.environ, CONFIG_ENV: resolve_paths(config).model_dump_json()}
    try:
        try:
            first = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env=env,
                start_new_session=True,
                pass_fds=(write_fd,),
            )
        except OSError as exc:
            raise InternalError(f"cannot start the node agent ({sys.executable}): {exc.strerror}") from None
        finally:
            os.close(write_fd)
        # It forks the agent and exits at once; waiting for it leaves no zombie.
        await anyio.to_thread.run_sync(first.wait)
        report = await _read_all(read_fd)
    finally:
        os.close(read_fd)
    if not report:
        raise InternalError(f"the node agent for task {task_id} exited before it started the task")
    message = json.loads(report)
    if message.get("type") == "error":
        raise NodeError.from_reply(Error.model_validate(message))


async def _read_all(fd: int) -> bytes:
    """Everything written to the pipe ``fd`` until its last writer closes it."""
    import anyio

    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await anyio.wait_readable(fd)
            continue
        if not chunk:
            return data
        data += chunk


# --- another process's side: asking for a stop -------------------------------------------


def request_stop(data_dir: Path, task_id: str, agent: str, grace: float) -> int | None:
    """Ask the detached agent ``agent`` (``host:pid``) running ``task_id`` to stop it
    with ``grace``. Returns the agent's pid, or None when ``agent`` is not a detached
    agent on this machine (then nothing was done)."""
    directory = agents_dir(data_dir)
    host, _, pid = agent.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        if (directory / f"{task_id}.agent").read_text() != agent:
            return None
    except OSError:
        return None
    # Write then rename, so the agent never reads half a number.
    scratch = directory / f"{task_id}.stop.{os.getpid()}"
    scratch.write_text(repr(float(grace)))
    os.replace(scratch, directory / f"{task_id}.stop")
    try:
        os.kill(int(pid), signal.SIGTERM)
    except ProcessLookupError:
        pass  # it has just exited: the caller sees the final state (or that it is gone)
    return int(pid)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, which an init that never reaps may keep
    around, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc here: trust kill()


def start_time(pid: int) -> float | None:
    """When ``pid`` started, in seconds since the epoch (from ``/proc``); None if it
    does not exist or there is no ``/proc`` to tell."""
    return ticks_to_epoch(start_ticks(pid))


def kill_left_behind(pid: int, started_at: float) -> bool:
    """Kill every process left of a task whose agent on this machine died: ``pid``
    is the task's stored pid, ``started_at`` when the task started (epoch seconds).
    True if anything was killed. Its cgroup is found by the pid and start time, then
    its process group, with or without a live leader; a pid reused since is left
    alone (see :func:`jumpstarter.plugins.containment.kill_lost`)."""
    return kill_lost(pid, started_at)


# --- the agent ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m jumpstarter.node.agent",
        description="Run one detached task of a node until it has finished (see jumpstarter.node.agent).",
    )
    parser.add_argument("--node", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--cwd")
    args = parser.parse_args(argv)
    config_json = os.environ.pop(CONFIG_ENV, None)
    if os.fork():
        os._exit(0)
    os.set_inheritable(args.report_fd, False)  # the task must not hold the starter's pipe
    reporter = _Reporter(args.report_fd)
    try:
        import anyio

        from jumpstarter.config import Config, load_config
        from jumpstarter.node.server import build_node_server
        from jumpstarter.plugins.manager import get_plugin_manager

        config = Config.model_validate_json(config_json) if config_json else load_config()
        node = config.node(args.node)
        server = build_node_server(config, get_plugin_manager(), node)
        code = anyio.run(_serve, server, config.data_path, args.task, args.cwd, reporter)
    except BaseException as exc:
        reporter.error(exc)
        raise
    finally:
        reporter.close()
    sys.exit(code)


class _Reporter:
    """The pipe to the starter: one JSON message, then closed."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, message: dict[str, Any]) -> None:
        if self.fd is None:
            return
        data = json.dumps(message).encode()
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            pass  # the starter went away; the task runs on all the same
        self.close()

    def started(self, task_id: str) -> None:
        self.send({"type": "started", "task_id": task_id})

    def error(self, exc: BaseException) -> None:
        from jumpstarter_protocol import Error, ErrorCode

        from jumpstarter.errors import NodeError

        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, NodeError):
            reply = exc.to_reply()
        else:
            reply = Error(code=ErrorCode.INTERNAL, message=str(exc) or type(exc).__name__)
        self.send(reply.model_dump(mode="json"))

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


async def _serve(server: NodeServer, data_dir: Path, task_id: str, cwd: str | None, reporter: _Reporter) -> int:
    import anyio

    from jumpstarter.errors import NotFound

    node = server.node
    directory = agents_dir(data_dir)
    marker = directory / f"{task_id}.agent"
    stop_file = directory / f"{task_id}.stop"
    async with anyio.create_task_group() as tg:
        await tg.start(server.run)
        try:
            # Listen before the task starts, so a stop sent right after is not lost.
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                task = await server.store.get_task(task_id)
                if task.node != node.name:
                    raise NotFound(f"no task with id {task_id!r} on node {node.name!r}")
                if cwd is not None and not os.path.isabs(task.spec.cwd or ""):
                    # As if the task ran in the starter's process: relative to its cwd.
                    here = os.path.normpath(os.path.join(cwd, task.spec.cwd or "."))
                    task = task.model_copy(update={"spec": task.spec.model_copy(update={"cwd": here})})
                directory.mkdir(parents=True, exist_ok=True)
                marker.write_text(server.agent)
                # Where it runs, as for any task (no token: nothing serves the node to it).
                found = await server.store.list_sessions(name=task.session_id, with_results=False, limit=1)
                env = server.task_env(task, found[0].name if task.session_id and found else "")
                await server.tasks.start_task(task, created_here=False, env=env)
                reporter.started(task_id)
                async with anyio.create_task_group() as stops:

                    async def stop_on_signals() -> None:
                        async for _ in signals:
                            stops.start_soon(server.tasks.stop_task, task_id, _read_grace(stop_file))

                    stops.start_soon(stop_on_signals)
                    await server.tasks.wait_task(task_id, None)
                    stops.cancel_scope.cancel()
        finally:
            marker.unlink(missing_ok=True)
            stop_file.unlink(missing_ok=True)
            server.close()  # server.run returns, stopping anything still running
    return 0


def _read_grace(path: Path) -> float:
    try:
        grace = float(path.read_text())
    except (OSError, ValueError):
        return DEFAULT_GRACE
    return grace if 0 <= grace <= 3600 else DEFAULT_GRACE


if __name__ == "__main__":
    main()
