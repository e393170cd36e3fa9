"""The tasks of one node: started, supervised to their end, stopped, waited for,
and their output followed.

A task runs here (:class:`Tasks` supervises it until it ends), under a detached agent
on this machine (:mod:`jumpstarter.node.agent`: asked to stop through its files,
marked ``lost`` if it dies), or outside the node (``OpenTask``: recorded, not run).
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup
from jumpstarter_protocol import (
    CloseTask,
    OutputChunk,
    OutputEnd,
    ReadOutput,
    TaskInfo,
    TaskSpec,
    TaskStarted,
    TaskState,
)

from jumpstarter.config import NodeConfig
from jumpstarter.errors import BadRequest, Conflict, NodeError, NotFound
from jumpstarter.node.agent import alive as agent_alive
from jumpstarter.node.agent import kill_left_behind, request_stop
from jumpstarter.node.output import OutputLog, give_back_reserved
from jumpstarter.plugins.interfaces import NodeDriver, ProcessLost, RunningProcess
from jumpstarter.store.base import Store

log = logging.getLogger(__name__)

OUTPUT_CHUNK = 1024 * 1024
"""Most bytes sent in one output chunk."""
POLL_INTERVAL = 0.05
"""How often a task run by another process is looked at (its output, its state)."""
STOP_GRACE_ON_SHUTDOWN = 2.0
STORE_RETRY = 1.0
"""Seconds between two tries to record a task's end in a store that cannot commit."""
SPARE_RECENT_OUTPUT = 10.0
"""Seconds a finished task's output is safe from the node's own retention settings."""

Detacher = Callable[[str, str], Awaitable[None]]
"""Starts the pending task ``task_id`` of node ``node`` under an agent process of its
own and returns once it runs: ``await detach(node, task_id)``."""


def _now() -> datetime:
    return datetime.now(UTC)


_LIVE: set[str] = set()
"""Ids of the tasks that node servers in this process run or hold open. Every node
server of a process has the same agent (host:pid), so this, not the agent, tells a
new server which running tasks of its own process are not lost."""


@dataclass
class _Running:
    """A task this node runs."""

    task: TaskInfo
    process: RunningProcess
    output: OutputLog
    done: anyio.Event = field(default_factory=anyio.Event)
    stop_requested: bool = False
    stop_reason: str | None = None  # why it was stopped, when not asked by a client
    timed_out: bool = False
    input_offset: int = 0
    """Bytes of input written to the process so far."""
    input_closed: bool = False
    input_lock: anyio.Lock = field(default_factory=anyio.Lock)


class Tasks:
    """Runs and keeps track of the tasks of ``node`` through its ``driver``, with
    their state in ``store`` and their output under ``data_dir/output``.

    ``agent`` names this process (``host:pid``) in the store. ``detach``, where the
    node is served inside a client's process, starts a task under an agent of its
    own; ``on_session_deleted`` is told when discarding a task removed its session."""

    def __init__(
        self,
        node: NodeConfig,
        driver: NodeDriver,
        store: Store,
        hook: Any,
        *,
        data_dir: Path,
        agent: str,
        detach: Detacher | None = None,
        on_session_deleted: Callable[[str], None] = lambda session_id: None,
        on_task_finished: Callable[[], None] = lambda: None,
    ) -> None:
        self.node = node
        self.driver = driver
        self.store = store
        self.hook = hook
        self.data_dir = data_dir
        self.output_dir = data_dir / "output"
        self.agent = agent
        self.detach = detach
        self.on_session_deleted = on_session_deleted
        self.on_task_finished = on_task_finished
        self._running: dict[str, _Running] = {}
        self._open: dict[str, str | None] = {}  # tasks opened with OpenTask → their session
        self._agents_checked: dict[str, float] = {}  # task id -> when its agent was last looked at
        self._tg: TaskGroup | None = None
        self._shutting_down = False

    def serve_in(self, tg: TaskGroup) -> None:
        """Where supervisors of started tasks run."""
        self._tg = tg

    def current(self, task_id: str) -> TaskInfo | None:
        """The state of a task running here, as its supervisor knows it."""
        running = self._running.get(task_id)
        return running.task if running else None

    def sessions_running(self) -> set[str | None]:
        """The sessions that have a task running here."""
        return {running.task.session_id for running in self._running.values()}

    def stop_session(self, session_id: str | None, reason: str) -> int:
        """Stop every task of ``session_id`` running here (SIGTERM, SIGKILL after the
        task's own grace), without waiting; each ends ``stopped`` with ``reason`` as
        its message. How many were asked to stop."""
        assert self._tg is not None, "the node server is not running"
        count = 0
        for running in list(self._running.values()):
            if running.task.session_id == session_id and not running.stop_requested:
                running.stop_reason = reason
                running.stop_requested = True
                self._tg.start_soon(self._stop, running, running.task.spec.grace)
                count += 1
        return count

    # --- life ---------------------------------------------------------------------------

    async def shut_down(self) -> None:
        """Stop what runs here and lose what was opened and never closed."""
        self._shutting_down = True
        await self._stop_all()
        await self._lose_open_tasks()

    async def _stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for running in list(self._running.values()):
                tg.start_soon(self._stop, running, STOP_GRACE_ON_SHUTDOWN)

    async def _lose_open_tasks(self) -> None:
        for task_id in list(self._open):
            del self._open[task_id]
            _LIVE.discard(task_id)
            task = await self.store.finish_task(
                task_id, TaskState.LOST, None, "the node server stopped before the task was closed"
            )
            self.hook.jmp_task_finished(task=task)

    async def mark_lost(self) -> None:
        host = socket.gethostname()
        for task, agent in await self.store.running_tasks(self.node.name):
            agent_host, _, pid = (agent or "").rpartition(":")
            if task.id in _LIVE:
                continue  # another node server in this process runs it
            here = agent_host == host and pid.isdigit()
            if here and agent_alive(int(pid)) and agent != self.agent:
                continue  # another agent on this machine runs it
            if here:
                await self._lose(task)
            else:  # its agent is on another machine: so is whatever it left running
                await self.store.finish_task(task.id, TaskState.LOST, None, "the node agent went away")
        await self._reap_dead_starts()

    async def _reap_dead_starts(self) -> None:
        """A start that died between creating its task and running it (its process
        killed) left the task pending for ever: it is lost, never ran."""
        host = socket.gethostname()
        for task, agent in await self.store.starting_tasks(self.node.name):
            agent_host, _, pid = agent.rpartition(":")
            if agent_host != host or not pid.isdigit() or agent == self.agent:
                continue  # another machine's start, or one of this process, still going
            if task.id in _LIVE or agent_alive(int(pid)):
                continue
            await self.store.finish_task(
                task.id, TaskState.LOST, None, "the process starting the task went away before it ran"
            )

    async def _lose(self, task: TaskInfo) -> TaskInfo:
        """Mark ``task`` lost because the agent on this machine that ran it died, and
        kill the process group it left behind, which nobody could stop otherwise."""
        pid = await self.store.task_pid(task.id)
        lost = await self.store.finish_task(task.id, TaskState.LOST, None, "the node agent went away")
        # A task that finished just as its agent went keeps its state: nothing to kill.
        if lost.state is TaskState.LOST and pid is not None and task.started_at is not None:
            kill_left_behind(pid, task.started_at.timestamp())
        give_back_reserved(self.output_dir, task.id)
        return lost

    # --- tasks ----------------------------------------------------------------------------

    def check_spec(self, spec: TaskSpec) -> None:
        """:class:`BadRequest` for a spec no task can run with (a missing working
        directory, input or a terminal the node driver cannot give); checked before
        anything is stored for it, the directory by the node driver (it is the one of
        the machine its tasks run on)."""
        self.driver.check_spec(spec)
        for wanted, capability in ((spec.stdin, "stdin"), (spec.pty is not None, "pty")):
            if wanted and capability not in self.driver.capabilities:
                raise BadRequest(
                    f"node {self.node.name!r} has no {capability!r} capability",
                    details={"capability": capability},
                )

    async def new_task(self, spec: TaskSpec, session_id: str | None, *, starting: bool = False) -> TaskInfo:
        """A new pending task. ``starting``: created by a start that goes on to run it,
        so this process is recorded as its agent, and a start that dies before the
        task runs leaves it to be reaped (see :meth:`mark_lost`); a task created to be
        started later (``NewTask``) has no agent until it runs."""
        self.check_spec(spec)
        return await self._create_task(spec, session_id, agent=self.agent if starting else None)

    async def _create_task(self, spec: TaskSpec, session_id: str | None, *, agent: str | None) -> TaskInfo:
        """Store a new pending task for ``spec`` and tell the plugins."""
        task = TaskInfo(
            id=secrets.token_hex(6),
            node=self.node.name,
            session_id=session_id,
            name=spec.name,
            spec=spec,
            state=TaskState.PENDING,
            created_at=_now(),
        )
        await self.store.create_task(task, agent)
        self.hook.jmp_task_created(task=task)
        return task

    async def start_task(
        self, task: TaskInfo, *, created_here: bool, env: dict[str, str] | None = None
    ) -> TaskStarted:
        """Start the pending ``task``; ``env`` is added to its environment as it
        starts (where it runs: :mod:`jumpstarter.enclosing`), not stored with it."""
        if task.state is not TaskState.PENDING:
            raise Conflict(f"task {task.id} is {task.state.value}, not pending; it cannot start again")
        self.check_spec(task.spec)  # again: the directory may have gone since it was created
        assert self._tg is not None, "the node server is not running"
        output = OutputLog.create(self.output_dir, task.id)
        spec = task.spec.model_copy(update={"env": {**(env or {}), **task.spec.env}}) if env else task.spec
        try:
            process = await self.driver.spawn(spec, output)
        except BaseException:
            output.remove()
            if created_here:
                with anyio.CancelScope(shield=True):
                    await self.discard_task(task)
            raise
        running = _Running(task, process, output)
        self._running[task.id] = running
        _LIVE.add(task.id)
        try:
            running.task = await self.store.mark_running(task.id, process.pid, self.agent)
        except BaseException:
            # Not recorded as running (the store cannot commit, or the start was
            # cancelled): nobody could stop it, so it must not run on.
            with anyio.CancelScope(shield=True):
                del self._running[task.id]
                _LIVE.discard(task.id)
                await process.terminate(0)
                await process.wait()
                output.remove()
            raise
        self.hook.jmp_task_started(task=running.task)
        self._tg.start_soon(self._supervise, running)
        return TaskStarted(task_id=task.id, started_at=running.task.started_at or _now(), pid=process.pid)

    async def start_detached(
        self, task: TaskInfo, *, created_here: bool, env: dict[str, str] | None = None
    ) -> None:
        """Start the pending ``task`` so that it outlives the client that asks: under
        an agent of its own where this node is served inside the client's process,
        here otherwise (this process outlives its clients)."""
        if self.detach is None:
            await self.start_task(task, created_here=created_here, env=env)
            return
        if task.state is not TaskState.PENDING:
            raise Conflict(f"task {task.id} is {task.state.value}, not pending; it cannot start again")
        self.check_spec(task.spec)
        if task.spec.stdin or task.spec.pty is not None:
            # The agent runs it in a process of its own that no connection reaches.
            raise BadRequest(
                f"a detached task on node {self.node.name!r} takes no input here: "
                "start it attached, or on a node served by 'jmp node serve'"
            )
        try:
            await self.detach(self.node.name, task.id)
        except BaseException:
            if created_here:  # leave the store as it was: the task never ran
                with anyio.CancelScope(shield=True):
                    await self.discard_task(task)
            raise


    async def discard_task(self, task: TaskInfo) -> None:
        """Remove the pending ``task`` created for a start whose command could not
        start, and its session if that has no other task: bad input leaves the store
        as it was. Connections of that session record it again with their next task."""
        await self.store.delete_pending_task(task.id)
        if task.session_id is not None and await self.store.delete_session_if_empty(task.session_id):
            self.on_session_deleted(task.session_id)

    async def open_task(self, spec: TaskSpec, session_id: str | None) -> TaskInfo:
        """Record work that runs outside the node as a task in state running."""
        task = await self._create_task(spec, session_id, agent=self.agent)
        # The agent is this server: if it goes away unclosed, the task is lost.
        task = await self.store.mark_running(task.id, None, self.agent)
        self._open[task.id] = session_id
        _LIVE.add(task.id)
        self.hook.jmp_task_started(task=task)
        return task

    async def close_task(self, request: CloseTask, session_id: str | None) -> TaskInfo:
        """Finish a task opened with :meth:`open_task` by the same session."""
        if request.task_id not in self._open:
            task = await self.store.get_task(request.task_id)  # NotFound for an unknown id
            if task.state.finished:
                return task  # as with stop: the answer is its final state
            raise Conflict(
                f"task {request.task_id} was not opened with open_task on this node server; "
                "only the session that opened a task can close it"
            )
        if self._open[request.task_id] != session_id:
            raise Conflict(
                f"task {request.task_id} was opened by another session; "
                "only the session that opened a task can close it"
            )
        del self._open[request.task_id]
        _LIVE.discard(request.task_id)
        task = await self.store.finish_task(
            request.task_id, request.state, request.exit_code, request.message
        )
        self.hook.jmp_task_finished(task=task)
        return task

    async def _supervise(self, running: _Running) -> None:
        exit_code: int | None = None
        exited = anyio.Event()
        # Set when it exited or its output can no longer be kept: one event to wait on
        # (a task per event cost every task a few turns of the loop at its end).
        settled = anyio.Event()
        output = running.output
        output.set_on_failure(settled)

        message = None
        lost = False

        async def wait_for_exit() -> None:
            nonlocal exit_code, lost, message
            try:
                exit_code = await running.process.wait()
            except ProcessLost as exc:
                lost, message = True, str(exc)
            exited.set()
            settled.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_exit)
                with anyio.move_on_after(running.task.spec.timeout):
                    await settled.wait()
                if not exited.is_set() and not output.failed.is_set():
                    running.timed_out = True
                    message = f"timed out after {running.task.spec.timeout:g}s"
                    await running.process.terminate(running.task.spec.grace)
                elif not exited.is_set():
                    # Its output can no longer be kept: the task cannot go on.
                    await running.process.terminate(running.task.spec.grace)
        except Exception as exc:  # a broken driver must not take the node down
            log.exception("node driver failed while task %s ran", running.task.id)
            message = f"node driver failed: {exc}"
        message = message or running.process.message
        if output.failure is not None:
            state, message = TaskState.FAILED, output.failure
        elif lost:
            state = TaskState.LOST
        elif running.stop_requested:
            state = TaskState.STOPPED
            message = running.stop_reason or message
        elif running.timed_out:
            state = TaskState.TIMED_OUT
        elif exit_code == 0:
            state = TaskState.SUCCEEDED
        else:
            state = TaskState.FAILED
        with anyio.CancelScope(shield=True):
            running.task = await self._finish(running.task, state, exit_code, message)
            del self._running[running.task.id]  # readers go to the files from now on
            running.output.close()
            _LIVE.discard(running.task.id)
            running.done.set()
            running.output.wake()
            self.hook.jmp_task_finished(task=running.task)
            self.on_task_finished()
            await self._keep_output_within_limits()

    async def _finish(
        self, task: TaskInfo, state: TaskState, exit_code: int | None, message: str | None
    ) -> TaskInfo:
        """Store the final state of ``task``. A store that cannot commit (its disk is
        full) is tried again every :data:`STORE_RETRY` seconds until it can: the
        final state is written once space is back, and the node serves on meanwhile;
        a node server that is shutting down gives up instead (see below)."""
        complained = False
        while True:
            try:
                return await self.store.finish_task(task.id, state, exit_code, message)
            except (OSError, NodeError):
                raise
            except Exception as exc:  # sqlite3 / psycopg errors: "database or disk is full"
                if self._shutting_down:
                    # Not for ever: the row stays running under this agent, and the
                    # next node server here marks it lost.
                    log.error("the store cannot record that task %s is %s: %s; giving up, "
                              "the next node server marks it lost", task.id, state.value, exc)
                    return task.model_copy(update={"state": state, "exit_code": exit_code, "message": message})
                if not complained:
                    log.error("the store cannot record that task %s is %s: %s; trying again",
                              task.id, state.value, exc)
                    complained = True
                await anyio.sleep(STORE_RETRY)

    async def _stop(self, running: _Running, grace: float) -> TaskInfo:
        if not running.done.is_set():
            running.stop_requested = True
            await running.process.terminate(grace)
            await running.done.wait()
        return running.task

    async def stop_task(self, task_id: str, grace: float) -> TaskInfo:
        running = self._running.get(task_id)
        if running is not None:
            return await self._stop(running, grace)
        task = await self.store.get_task(task_id)
        if task.state is TaskState.PENDING:
            return await self.store.finish_task(task_id, TaskState.STOPPED, None, "stopped before it started")
        if task.state is TaskState.RUNNING:
            pid = await self._ask_agent_to_stop(task_id, grace)
            if pid is None:
                raise Conflict(f"task {task_id} runs under another node process; stop it there")
            return await self._wait_for_agent(task_id, pid)
        return task  # finished: the answer is its final state

    async def _ask_agent_to_stop(self, task_id: str, grace: float) -> int | None:
        """A detached task's agent on this machine is asked to stop it (see
        :mod:`jumpstarter.node.agent`); its pid, or None if the task runs elsewhere."""
        for task, agent in await self.store.running_tasks(self.node.name):
            if task.id == task_id and agent:
                return request_stop(self.data_dir, task_id, agent, grace)
        return None

    async def _wait_for_agent(self, task_id: str, pid: int) -> TaskInfo:
        """The final state of a task another process on this machine runs."""
        while True:
            task = await self.store.get_task(task_id)
            if task.state.finished:
                return task
            if not agent_alive(pid):
                task = await self.store.get_task(task_id)  # it may have finished as it went
                if task.state.finished:
                    return task
                return await self._lose(task)
            await anyio.sleep(POLL_INTERVAL)

    # --- output retention ----------------------------------------------------------------

    async def prune_output(
        self,
        older_than: float | None = None,
        max_bytes: int | None = None,
        *,
        dry_run: bool = False,
        spare_recent: float = 0.0,
    ) -> tuple[list[str], int]:
        """Delete the output logs of finished tasks older than ``older_than`` seconds
        (by their last write), then the oldest until at most ``max_bytes`` are kept;
        without either, the node's ``keep_output_for`` and ``keep_output_bytes``.
        Logs written within ``spare_recent`` seconds are kept whatever the limits.
        The ids of the tasks pruned, oldest first, and the bytes freed."""
        if older_than is None and max_bytes is None:
            older_than, max_bytes = self.node.keep_output_for, self.node.keep_output_bytes
        if older_than is None and max_bytes is None:
            return [], 0
        logs = []  # (last write, task id, bytes) of each finished task's log
        for path in self.output_dir.glob("*.out"):
            task_id = path.stem
            try:
                stat = path.stat()
                index = path.with_suffix(".idx")
                size = stat.st_size + (index.stat().st_size if index.exists() else 0)
            except FileNotFoundError:
                continue  # pruned meanwhile
            logs.append((stat.st_mtime, task_id, size))
        logs.sort()
        # Only finished tasks: one that runs (here or under an agent) is writing its log.
        finished = []
        for mtime, task_id, size in logs:
            if task_id in _LIVE:
                continue
            try:
                task = await self.store.get_task(task_id)
            except NotFound:
                task = None  # a log whose task is gone from the store: nobody can read it
            if task is None or task.state.finished:
                finished.append((mtime, task_id, size))
        now = time.time()
        kept = sum(size for _, _, size in finished)
        pruned: list[str] = []
        freed = 0
        for mtime, task_id, size in finished:
            too_old = older_than is not None and now - mtime > older_than
            too_much = max_bytes is not None and kept > max_bytes
            if not (too_old or too_much) or now - mtime < spare_recent:
                continue
            pruned.append(task_id)
            freed += size
            kept -= size
            if not dry_run:
                for suffix in (".out", ".idx"):
                    (self.output_dir / f"{task_id}{suffix}").unlink(missing_ok=True)
        return pruned, freed

    async def _keep_output_within_limits(self) -> None:
        """The node's retention settings, applied as each task finishes."""
        if self.node.keep_output_for is None and self.node.keep_output_bytes is None:
            return
        try:
            # Not what finished a moment ago: its followers may still be reading it.
            await self.prune_output(spare_recent=SPARE_RECENT_OUTPUT)
        except OSError as exc:  # a full or read-only disk must not take the node down
            log.warning("cannot prune task output in %s: %s", self.output_dir, exc)

    # --- input and terminals ------------------------------------------------------------

    def _with_input(self, task_id: str, *, terminal: bool = False) -> _Running:
        """The running task ``task_id`` if it takes input (a terminal with
        ``terminal``); :class:`Conflict` once it has finished."""
        running = self._running.get(task_id)
        if running is None:
            raise Conflict(f"task {task_id} is not running on node {self.node.name!r}; it takes no input")
        spec = running.task.spec
        if terminal and spec.pty is None:
            raise BadRequest(f"task {task_id} has no terminal (start it with pty)")
        if not (spec.stdin or spec.pty is not None):
            raise BadRequest(f"task {task_id} takes no input (start it with stdin)")
        return running

    async def write_input(self, task_id: str, offset: int, data: bytes) -> tuple[int, bool]:
        """Write ``data``, which starts at ``offset`` of the task's input, skipping
        what was written already; the input's offset afterwards and whether it is
        closed."""
        running = self._with_input(task_id)
        async with running.input_lock:  # writes go in order, each once
            if offset > running.input_offset:
                raise BadRequest(
                    f"input of task {task_id} written up to byte {running.input_offset}, "
                    f"not {offset}: send from there"
                )
            fresh = data[running.input_offset - offset :]
            if fresh:
                if running.input_closed:
                    raise BadRequest(f"input of task {task_id} is closed")
                await running.process.write_input(fresh)
                running.input_offset += len(fresh)
            return running.input_offset, running.input_closed

    async def close_input(self, task_id: str, offset: int) -> tuple[int, bool]:
        """EOF on the task's input once it holds ``offset`` bytes (a close sent
        before a write it follows is refused, not applied early)."""
        running = self._with_input(task_id)
        async with running.input_lock:
            if offset != running.input_offset and not running.input_closed:
                raise BadRequest(
                    f"input of task {task_id} written up to byte {running.input_offset}, "
                    f"not {offset}: write the rest before closing"
                )
            if not running.input_closed:
                await running.process.close_input()
                running.input_closed = True
            return running.input_offset, True

    async def resize(self, task_id: str, rows: int, cols: int) -> None:
        running = self._with_input(task_id, terminal=True)
        await running.process.resize(rows, cols)

    def has_terminal(self, task_id: str) -> bool:
        """True for a task running here on a terminal: its output is for a person,
        so a transport sends it at once rather than gathering more."""
        running = self._running.get(task_id)
        return running is not None and running.task.spec.pty is not None

    async def wait_task(self, task_id: str, timeout: float | None) -> TaskInfo:
        with anyio.move_on_after(timeout):
            while True:
                running = self._running.get(task_id)
                if running is not None:
                    await running.done.wait()
                    return running.task
                task = await self.store.get_task(task_id)
                if task.state.finished:
                    return task
                await anyio.sleep(POLL_INTERVAL)
                await self._lose_if_its_agent_died(task_id)
        return await self.store.get_task(task_id)

    async def _lose_if_its_agent_died(self, task_id: str) -> None:
        """Mark ``task_id`` lost if the process on this machine that runs it has died
        (say, killed), so that nobody waits for it or follows it forever. Looks at
        most once a second."""
        now = time.monotonic()
        if now - self._agents_checked.get(task_id, now - 2) < 1:
            return
        self._agents_checked[task_id] = now
        for task, agent in await self.store.running_tasks(self.node.name):
            agent_host, _, pid = (agent or "").rpartition(":")
            if task.id != task_id or task.id in _LIVE or agent == self.agent:
                continue
            if agent_host == socket.gethostname() and pid.isdigit() and not agent_alive(int(pid)):
                await self._lose(task)
        if len(self._agents_checked) > 1000:  # forget the tasks nobody asks about any more
            self._agents_checked.clear()

    async def read_output(
        self, request: ReadOutput
    ) -> AsyncGenerator[OutputChunk | OutputEnd, None]:
        task_id, offset = request.task_id, request.offset
        await self.store.get_task(task_id)  # NotFound for an unknown id
        reader: OutputLog | None = None
        try:
            while True:
                running = self._running.get(task_id)
                if running is not None:  # its newest output is in memory here
                    chunks = running.output.read(offset, OUTPUT_CHUNK)
                else:
                    reader = reader or OutputLog.open(self.output_dir, task_id)  # None before it starts
                    chunks = reader.read(offset, OUTPUT_CHUNK) if reader else []
                for start, stream, data in chunks:
                    yield OutputChunk(task_id=task_id, offset=start, stream=stream, data=data)
                    offset = start + len(data)
                if chunks:
                    continue
                task = running.task if running else await self.store.get_task(task_id)
                if task.state.finished or not request.follow:
                    # Bytes written by another process just before it finished the task
                    # (its log may even have appeared only then: logs are created with
                    # the first byte written).
                    if task.state.finished:
                        reader = reader or OutputLog.open(self.output_dir, task_id)
                        if reader and reader.read(offset, 1):
                            continue
                    yield OutputEnd(
                        task_id=task_id, offset=offset, state=task.state, exit_code=task.exit_code
                    )
                    return
                if running is not None:
                    await running.output.wait_beyond(offset)
                else:
                    await anyio.sleep(POLL_INTERVAL)
                    await self._lose_if_its_agent_died(task_id)
        finally:
            if reader is not None:
                reader.close()
