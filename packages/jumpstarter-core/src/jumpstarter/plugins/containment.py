"""Containment: finding and killing every process of a task, whatever it does.

A node driver that runs tasks as processes of this machine (the local node) hands
each task's first process to :meth:`Containment.contain` and gets a
:class:`TaskProcesses` back, which signals, kills and waits for all of the task's
processes, not only its process group. Which mechanism is used
(:attr:`Containment.mechanism`):

``cgroup``
    Each task gets a cgroup v2 of its own, ``<the node's cgroup>/jumpstarter/<node pid>.<n>``,
    labelled with its first process's pid and start time (:data:`LEADER_XATTR`), so a
    node that restarts after a crash finds the cgroup of a lost task from the pid in
    the store.
    The node steps into the new cgroup for the fork and back out, so the task is born
    in it. No controller is enabled. Stop is ``cgroup.kill``; the task's processes are
    gone when ``cgroup.events`` says ``populated 0``; the cgroup is removed afterwards.
    Catches everything the task starts, ``setsid`` and double forks included; not what
    is moved out of the cgroup by someone with the right to (root, or the owner of
    the cgroup tree).
``subreaper``
    Where no cgroup can be made (no cgroup2 mount, no write access): the node process
    is a child subreaper (``PR_SET_CHILD_SUBREAPER``), so a process whose parent dies
    is reparented to the node instead of init, and the task's process tree is walked
    (``/proc/<pid>/task/*/children``) while it runs. Stop signals the process group and
    every process seen in the tree. It cannot catch a process that leaves the tree and
    the process group between two walks (a double fork with ``setsid`` faster than
    :data:`TRACK_INTERVAL`): that one is reparented to the node and reaped when it
    exits, but not killed.
``process-group``
    Without ``/proc`` (not Linux): the task's process group only.

The node process is made a child subreaper in every mechanism where the system has
one, and reaps the zombies of the task processes that were reparented to it.
``JMP_CONTAINMENT`` (``auto``, ``cgroup``, ``subreaper``, ``process-group``) picks
one by hand; ``auto`` (the default) takes the first that works here.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import anyio

MECHANISMS = ("cgroup", "subreaper", "process-group")
ENV = "JMP_CONTAINMENT"
TRACK_INTERVAL = 0.1
"""How often the subreaper mechanism walks a running task's process tree (seconds)."""
KILL_WAIT = 2.0
"""Longest wait for SIGKILLed processes to be gone (a process in uninterruptible
sleep dies only when its I/O returns)."""
START_SLACK = 1.0
"""Seconds a process may seem to have started after its task did and still count as
the task's: boot time in ``/proc/stat`` is whole seconds and the wall clock may be
slewed, so the two times are compared with this much room."""
_PR_SET_CHILD_SUBREAPER = 36


class _HasPid(Protocol):
    pid: int


P = TypeVar("P", bound=_HasPid)


class Containment:
    """The containment of one node's tasks; see the module docstring. ``mechanism``
    overrides ``$JMP_CONTAINMENT``."""

    def __init__(self, mechanism: str | None = None) -> None:
        wanted = mechanism or os.environ.get(ENV) or "auto"
        if wanted not in ("auto", *MECHANISMS):
            from jumpstarter.errors import ConfigError

            raise ConfigError(f"{ENV} must be auto, cgroup, subreaper or process-group; got {wanted!r}")
        self.base: Path | None = None
        """The directory under which task cgroups are made (mechanism ``cgroup``)."""
        subreaper = make_subreaper()
        if wanted in ("auto", "cgroup"):
            self.base = cgroup_base()
        if self.base is not None:
            self.mechanism = "cgroup"
        elif wanted in ("auto", "subreaper") and subreaper and _has_proc():
            self.mechanism = "subreaper"
        else:
            self.mechanism = "process-group"
        self.subreaper = subreaper
        self._made = 0
        if self.base is not None:
            sweep_cgroups(self.base)

    def spawn(self, start: Callable[[], P]) -> tuple[P, TaskProcesses]:
        """Call ``start()``, which starts a task's first process (a
        :class:`subprocess.Popen`, in a new process group) and returns it, so that the
        process and everything it will start are contained: with cgroups, this
        process steps into the task's new cgroup for the fork and back out, so the
        child is born in it (no moment outside it, no hook run in the child)."""
        cgroup = self._enter_new_cgroup()
        try:
            process = start()
        except BaseException:
            if cgroup is not None:
                self._leave()
                _rmdir(cgroup)
            raise
        if cgroup is not None:
            self._leave()
            _label(cgroup, process.pid)
        return process, TaskProcesses(process.pid, cgroup=cgroup, track=self.mechanism == "subreaper")

    def _enter_new_cgroup(self) -> Path | None:
        if self.base is None:
            return None
        self._made += 1
        cgroup = self.base / f"{os.getpid()}.{self._made}"
        try:
            cgroup.mkdir()
            (cgroup / "cgroup.procs").write_text("0")
        except OSError:
            _rmdir(cgroup)  # the task is still contained by its group and the subreaper
            return None
        return cgroup

    def _leave(self) -> None:
        assert self.base is not None
        (self.base.parent / "cgroup.procs").write_text("0")


LEADER_XATTR = "user.jumpstarter.leader"
"""On a task's cgroup: ``<pid>.<start ticks>`` of its first process, by which a node
restarted after a crash finds the cgroup from the pid in the store (cgroup v2 does
not rename directories)."""


def _label(cgroup: Path, pid: int) -> None:
    ticks = start_ticks(pid)  # a zombie still has its start time
    if ticks is not None:
        with contextlib.suppress(OSError):
            os.setxattr(cgroup, LEADER_XATTR, f"{pid}.{ticks}".encode())


def _leader(cgroup: Path) -> tuple[int, int] | None:
    try:
        pid, _, ticks = os.getxattr(cgroup, LEADER_XATTR).decode().partition(".")
        return int(pid), int(ticks)
    except (OSError, ValueError, UnicodeDecodeError):
        return None


_LEADERS: set[int] = set()
"""The leaders of this process's tasks not yet reaped: only their own
:meth:`TaskProcesses.release` reaps them."""


class TaskProcesses:
    """All the processes of one task: its leader ``pid`` (a child of this process),
    the leader's process group, and its cgroup or the process tree seen so far."""

    def __init__(self, pid: int, *, cgroup: Path | None, track: bool) -> None:
        self.pid = pid
        self.cgroup = cgroup
        self._track = track
        self._seen: dict[int, int] = {}  # pid -> start ticks, of every process seen in the tree
        self._last_walk = 0.0
        self.exit_code: int | None = None
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfd = None  # older kernel or not Linux: the exit is polled
        self._leader_exited = anyio.Event()
        _LEADERS.add(pid)
        self._released = False

    # --- the leader ---------------------------------------------------------------------

    async def wait_leader(self) -> int:
        """Wait for the leader to exit and return its exit code (``-N`` when signal N
        killed it). Through a pidfd where the system has one (no thread, no
        polling); polled otherwise. The leader is reaped only by :meth:`release`:
        until then its pid, and so its process group id, cannot be reused by another
        process, and signalling the group never reaches a stranger."""
        flags = os.WEXITED | os.WNOWAIT
        if self._pidfd is not None:
            await anyio.wait_readable(self._pidfd)
            exited = os.waitid(os.P_PID, self.pid, flags)
        else:
            delay = 0.001
            while (exited := os.waitid(os.P_PID, self.pid, flags | os.WNOHANG)) is None:
                self.walk()
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
        assert exited is not None
        if exited.si_code == os.CLD_EXITED:
            self.exit_code = exited.si_status
        else:  # killed, or killed with a core dump
            self.exit_code = -exited.si_status
        self._leader_exited.set()
        return self.exit_code

    # --- every process ------------------------------------------------------------------

    def walk(self) -> None:
        """Note every process now in the leader's tree (subreaper mechanism), at most
        once per :data:`TRACK_INTERVAL`."""
        if not self._track:
            return
        now = time.monotonic()
        if now - self._last_walk < TRACK_INTERVAL:
            return
        self._last_walk = now
        todo = [self.pid, *self._seen]
        while todo:
            pid = todo.pop()
            for child in _children(pid):
                if child not in self._seen:
                    ticks = start_ticks(child)
                    if ticks is not None:
                        self._seen[child] = ticks
                        todo.append(child)

    async def track(self) -> None:
        """Walk the tree every :data:`TRACK_INTERVAL` until cancelled (subreaper
        mechanism; returns at once otherwise)."""
        while self._track:
            self.walk()
            await anyio.sleep(TRACK_INTERVAL)

    def pids(self) -> list[int]:
        """The task's processes alive now (zombies not counted), leader included."""
        found: set[int] = set()
        if self.cgroup is not None:
            found.update(_cgroup_pids(self.cgroup))
        for pid, ticks in self._seen.items():
            if start_ticks(pid) == ticks and not _zombie(pid):
                found.add(pid)
        if not self._leader_exited.is_set() and not _zombie(self.pid):
            found.add(self.pid)
        return sorted(found)

    def alive(self) -> bool:
        """True while any process of the task runs."""
        if self._released:
            return False
        if self.cgroup is not None:
            return _populated(self.cgroup)  # the task was born in it: everything is there
        if _group_alive(self.pid):
            return True
        return bool(self.pids())

    def signal(self, signum: int) -> None:
        """Send ``signum`` to every process of the task; nothing once it is released
        (its pid may belong to another process by then)."""
        if self._released:
            return
        self.walk()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    async def kill(self) -> None:
        """SIGKILL every process of the task and wait (at most :data:`KILL_WAIT`) for
        them to be gone."""
        self._last_walk = 0.0
        self.walk()
        deadline = time.monotonic() + KILL_WAIT
        while True:
            if self.cgroup is not None:
                _cgroup_kill(self.cgroup)
            self.signal(signal.SIGKILL)
            if not self.alive() or time.monotonic() > deadline:
                return
            await anyio.sleep(0.005)

    async def stop(self, grace: float) -> None:
        """SIGTERM to every process of the task, SIGKILL to whatever is left after
        ``grace`` seconds."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.alive():
            self.walk()
            await anyio.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
        if self.alive():
            await self.kill()

    async def release(self) -> None:
        """Once the task has ended: kill what is left (by now that is leftovers
        only), reap the leader and the zombies reparented to this process, remove
        the cgroup, close the pidfd. Safe to call more than once."""
        if self.cgroup is not None:
            if _populated(self.cgroup):
                await self.kill()
        else:
            # While the leader is an unreaped zombie its group id is still the
            # task's: one SIGKILL to the group and the processes seen, no wait.
            self._last_walk = 0.0
            self.signal(signal.SIGKILL)
        if self.pid in _LEADERS:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)  # it has exited, or was killed just now
            _LEADERS.discard(self.pid)
        self._released = True
        reap_orphans(set(self._seen))
        if self.cgroup is not None and _rmdir(self.cgroup):
            self.cgroup = None
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None


# --- after a crash ----------------------------------------------------------------------


def kill_lost(pid: int, started_at: float) -> bool:
    """Kill every process left of a task whose node or agent died: ``pid`` is the
    task's stored pid (its first process, the leader of its process group),
    ``started_at`` when the task started (epoch seconds). True if anything was killed.

    Finds the task's cgroup by the pid and a start time just before ``started_at``;
    then the process group ``pid``: if its leader lives it must have started no later
    than the task did (a process that reused the pid started after that), if the
    leader is gone every process still in that group is the task's (Linux does not
    reuse a pid while a process group holds it)."""
    killed = False
    base = cgroup_base()
    if base is not None:
        for cgroup in _task_cgroups(base):
            leader = _leader(cgroup)
            if leader is None or leader[0] != pid:
                continue
            began = ticks_to_epoch(leader[1])
            if began is not None and started_at - 60 <= began <= started_at + START_SLACK:
                killed = _cgroup_kill(cgroup) or killed
                deadline = time.monotonic() + KILL_WAIT
                while _populated(cgroup) and time.monotonic() < deadline:
                    time.sleep(0.005)
                _rmdir(cgroup)
    leader = start_ticks(pid)
    if leader is not None:
        began = ticks_to_epoch(leader)
        try:
            leads = os.getpgid(pid) == pid
        except OSError:
            leads = False
        if not leads or began is None or began > started_at + START_SLACK:
            return killed
    members = [p for p in _all_pids() if _pgid(p) == pid] if _has_proc() else []
    if leader is None and not members:
        return killed
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        killed = True
    return killed


# --- the system -------------------------------------------------------------------------


@functools.cache
def make_subreaper() -> bool:
    """Make this process a child subreaper (Linux); True if it is one."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def cgroup_base() -> Path | None:
    """``<this process's cgroup v2>/jumpstarter``, made if missing; None where there
    is no cgroup2 mount or it cannot be written."""
    mount = _cgroup2_mount()
    if mount is None:
        return None
    try:
        with open("/proc/self/cgroup") as f:
            own = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration, IndexError):
        return None
    base = mount / own.lstrip("/") / "jumpstarter"
    try:
        base.mkdir(exist_ok=True)
        probe = base / f"probe.{os.getpid()}"
        probe.mkdir(exist_ok=True)
        writable = os.access(probe / "cgroup.procs", os.W_OK)
        _rmdir(probe)
    except OSError:
        return None
    return base if writable else None


def _cgroup2_mount() -> Path | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                # ... mount point is field 5; the filesystem type follows the " - ".
                dash = fields.index("-")
                if fields[dash + 1] == "cgroup2":
                    return Path(fields[4])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _task_cgroups(base: Path) -> list[Path]:
    try:
        return [entry for entry in base.iterdir() if entry.is_dir()]
    except OSError:
        return []


def sweep_cgroups(base: Path) -> None:
    """Remove the empty task cgroups under ``base`` that a node which died could not
    remove itself, leaving those of live nodes alone."""
    for cgroup in _task_cgroups(base):
        node = cgroup.name.partition(".")[0]
        if not node.isdigit() or _alive(int(node)) or _populated(cgroup):
            continue
        _rmdir(cgroup)


def _alive(pid: int) -> bool:
    return start_ticks(pid) is not None and not _zombie(pid)


def reap_orphans(known: set[int]) -> None:
    """Reap the zombie children of this process that were task processes reparented
    to it (this process is their subreaper): those in ``known`` or whose cgroup was a
    task cgroup. Children this process started itself are left to whoever waits for
    them."""
    try:
        peek = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except (ChildProcessError, AttributeError, OSError):
        return
    if peek is None:
        return  # no zombie child at all: the common case costs one system call
    base = cgroup_base()
    for child in _children(os.getpid()):
        if not _zombie(child):
            continue
        if child in _LEADERS:
            continue  # another task's leader, reaped when that task ends
        if child in known or (base is not None and _in_cgroup_under(child, base)):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, os.WNOHANG)


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if it does not exist (or
    there is no ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # Field 22, counted after the command name, which may hold spaces and ")".
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def ticks_to_epoch(ticks: int | None) -> float | None:
    if ticks is None:
        return None
    boot = _boot_time()
    return None if boot is None else boot + ticks / os.sysconf("SC_CLK_TCK")


@functools.cache
def _boot_time() -> int | None:
    try:
        with open("/proc/stat") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, StopIteration):
        return None


@functools.cache
def _has_proc() -> bool:
    return os.path.exists("/proc/self/stat")


def _children(pid: int) -> list[int]:
    """The children of ``pid`` (of every thread of it)."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            continue
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _pgid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[2])
    except (OSError, ValueError, IndexError):
        return None


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group of zombies only (reparented to an init that has not reaped them yet)
    # runs nothing.
    if not _has_proc():
        return True
    return any(_pgid(p) == pgid and not _zombie(p) for p in _all_pids())


def _in_cgroup_under(pid: int, base: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
    except (OSError, StopIteration, IndexError):
        return False
    mount = _cgroup2_mount()
    return mount is not None and (mount / path.lstrip("/")).parent == base


def _cgroup_pids(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _populated(cgroup: Path) -> bool:
    try:
        with open(cgroup / "cgroup.events") as f:
            return any(line.strip() == "populated 1" for line in f)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell (out of file handles): not known to be empty


def _cgroup_kill(cgroup: Path) -> bool:
    """SIGKILL everything in ``cgroup`` (``cgroup.kill``, Linux 5.14; one process at a
    time before that). True if the cgroup was there to kill."""
    try:
        (cgroup / "cgroup.kill").write_text("1")
        return True
    except FileNotFoundError:
        if not cgroup.exists():
            return False
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EPERM, errno.EACCES):
            return False
    for pid in _cgroup_pids(cgroup):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return True


def _rmdir(cgroup: Path) -> bool:
    try:
        os.rmdir(cgroup)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
