"""Each worker in a cgroup of its own, stopped as a whole: systemd's ``KillMode=control-group``.

A process group does not hold a worker: any process may call ``setsid()``
or ``setpgid()`` and double-fork, and a daemon made so keeps the unit's
listening socket after its worker was stopped (half the connections then go
to it). A cgroup does hold it: only a process with write access to another
cgroup's ``cgroup.procs`` (and to that of the common ancestor) can leave,
and a worker that is not root has neither.

Where a writable cgroup v2 hierarchy exists (``/sys/fs/cgroup`` on unified
systems, ``/sys/fs/cgroup/unified`` on hybrid ones; found in
``/proc/self/mountinfo``), :class:`WorkerCgroups` keeps this tree below the
supervisor's own cgroup::

    <the supervisor's cgroup>/fdsupervisor-<pid>.<pid-namespace inode>/   no processes
        <unit>.<instance>.<seq>/                                          one worker each

The supervisor stays where it is; the parent holds no process, so cgroup
v2's "no internal processes" rule is never in the way (no controller is
enabled anywhere: only the core files ``cgroup.procs``, ``cgroup.kill`` and
``cgroup.events`` are used). The spawn gets the worker's cgroup as a directory
fd (:meth:`WorkerCgroups.prepare`, closed once the worker started): the child is
created in it (``clone3(CLONE_INTO_CGROUP)``, _spawn.c on x86-64), or else joins
it between fork and exec, first thing and while still root (a write of "0" to
its ``cgroup.procs``), so the worker never runs outside it. When the worker's main process exits,
or its stop times out, ``cgroup.kill`` ends every process left in it, as
systemd kills the rest of a service's cgroup once its main process is gone
(``service_sigchld_event()`` → ``unit_kill_context()``); the cgroup is
removed once ``cgroup.events`` says ``populated 0``.

The names need no state of their own across an upgrade: the parent's is
derived from the pid (which an upgrade keeps) and the pid namespace (so that
two PID 1s of containers sharing a hierarchy never meet), and a restored
worker's cgroup is read from ``/proc/PID/cgroup``. Whatever the parent holds
that no worker claims (a cgroup being emptied when the old program exec'd,
or one left by a dead supervisor of the same pid) is killed and removed.

A supervisor killed with SIGKILL cannot remove its tree; the next one to
start below the same cgroup does (:func:`remove_stale_parents`): every
``fdsupervisor-PID.NS`` of its own pid namespace whose PID no longer runs
and that holds no process, with the empty cgroups below it. A live
supervisor's tree, a populated one, and one of another pid namespace (whose
pids mean nothing here) are left alone.

Elsewhere (cgroup v1 only, a read-only ``/sys/fs/cgroup``, no privileges,
or ``--no-cgroups``) :func:`socket_holders` is the fallback: after a worker
is gone, the supervisor looks for processes that still hold the unit's
sockets and names them (``escaped_process``), but cannot stop them.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A cgroup's name is a directory name (NAME_MAX 255); unit names may be 255
# characters long, so the unit part is cut to leave room for ".<instance>.<seq>".
UNIT_PART_MAX = 200
# Shutdown: how long the supervisor waits for killed cgroups to empty before
# it gives up removing them (SIGKILL is delivered at once; a process in an
# uninterruptible sleep may take longer, and its cgroup then stays, logged).
EMPTY_TIMEOUT = 2.0


# -- where the hierarchy is (pure) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cgroup2Mount:
    """One cgroup2 mount from ``/proc/self/mountinfo``."""

    mount_point: str
    root: str  # the cgroup at the mount point, as the cgroup namespace sees it
    read_only: bool


def _unescape(field: str) -> str:
    r"""mountinfo writes space, tab, newline and backslash as ``\040`` etc. (proc(5))."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mounts(mountinfo: str) -> list[Cgroup2Mount]:
    """Every cgroup2 mount of a ``/proc/PID/mountinfo`` text, in its order.

    A line is ``ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE
    SOURCE SUPER_OPTIONS`` (proc(5)); the optional fields end at the lone ``-``.
    """
    mounts = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        separator = fields.index("-")
        if separator < 6 or len(fields) <= separator + 1 or fields[separator + 1] != "cgroup2":
            continue
        options = fields[5].split(",")
        mounts.append(Cgroup2Mount(_unescape(fields[4]), _unescape(fields[3]), "ro" in options))
    return mounts


def own_cgroup(proc_cgroup: str) -> str | None:
    """The cgroup v2 path of a ``/proc/PID/cgroup`` text (its ``0::PATH`` line)."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and path.startswith("/"):
            return path
    return None


def cgroup_directory(mounts: Iterable[Cgroup2Mount], path: str) -> Path | None:
    """Where cgroup ``path`` is in the file system: below the first writable mount that shows it."""
    for mount in mounts:
        if mount.read_only:
            continue
        root = mount.root.rstrip("/")
        if path == mount.root or path.startswith(root + "/"):
            return Path(mount.mount_point, path[len(root) :].lstrip("/"))
    return None


def parent_name(pid: int, pid_namespace: int) -> str:
    """The supervisor's own cgroup, the same before and after an upgrade (same pid)."""
    return f"fdsupervisor-{pid}.{pid_namespace}"


_PARENT_NAME = re.compile(r"fdsupervisor-([0-9]+)\.([0-9]+)")


def dead_supervisors_parent(name: str, pid_namespace: int, alive: Callable[[int], bool]) -> bool:
    """Whether cgroup ``name`` is the parent of a supervisor of this pid namespace that is gone.

    :func:`parent_name` is the supervisor's pid and its pid namespace's
    inode: a pid of another namespace says nothing about a process here, and
    a pid that runs may be that supervisor (or a process that took its pid:
    left alone all the same, never a live supervisor's tree).
    """
    match = _PARENT_NAME.fullmatch(name)
    return match is not None and int(match[2]) == pid_namespace and not alive(int(match[1]))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie too) in this pid namespace."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_parents(
    base: Path, pid_namespace: int, log: Any, alive: Callable[[int], bool] = pid_alive
) -> None:
    """Remove what killed supervisors left in ``base``: their empty trees (docstring above).

    cgroup v2 refuses to remove a cgroup with a process or a child cgroup in
    it (``EBUSY``, ``ENOTEMPTY``), and a populated parent is not even walked:
    nothing a process is in is ever touched. Logs one ``stale_cgroups_removed``
    with the count, and ``stale_cgroup_kept`` for each tree that holds a process.
    """
    try:
        entries = [e for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    removed = 0
    for entry in entries:
        if not dead_supervisors_parent(entry.name, pid_namespace, alive):
            continue
        path = Path(entry.path)
        try:
            busy = populated((path / "cgroup.events").read_text())
        except OSError:
            continue  # removed meanwhile, or not a cgroup
        if busy or not _remove_tree(path):
            log.warning(
                "stale_cgroup_kept",
                cgroup=str(path),
                reason="processes of a killed supervisor are still in it",
            )
            continue
        removed += 1
    if removed:
        log.info("stale_cgroups_removed", count=removed, path=str(base))


def _remove_tree(path: Path) -> bool:
    """rmdir ``path`` and every cgroup below it, deepest first; False when one stays."""
    for directory, _children, _files in os.walk(path, topdown=False):
        if _remove(Path(directory)) is not None:
            return False
    return True


def worker_name(unit: str, instance: int, seq: int) -> str:
    return f"{unit[:UNIT_PART_MAX]}.{instance}.{seq}"


def populated(events: str) -> bool:
    """``populated 1`` in a ``cgroup.events`` text: some process is in the cgroup or below."""
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() == "1"
    return False


# -- the tree -------------------------------------------------------------------------------


# Keyword-only: the worker's own path, passed where ``parent`` goes, would type-check.
@dataclass(slots=True, kw_only=True)
class WorkerCgroup:
    """One worker's cgroup; ``fd`` (its directory, for the spawn) is open until the worker started."""

    name: str
    parent: Path  # the supervisor's cgroup, one Path for every worker's
    fd: int | None = None
    id: int = 0  # the kernel's cgroup id: its directory's inode (what a pidfd reports)

    @property
    def path(self) -> Path:
        # Made when needed (a kill, a removal), not kept: a Path per worker was 200
        # bytes each, 10,000 times (docs/performance.md, RSS at 10,000 units).
        return self.parent / self.name


class WorkerCgroups:
    """The supervisor's cgroup subtree: one parent, one cgroup per worker.

    The supervisor calls :meth:`prepare` before a spawn (the plan gets
    ``fd``), then :meth:`started` or :meth:`discard`; :meth:`signal`
    whenever it signals a worker's group; :meth:`release` once the worker's
    main process exited. Cgroups being emptied are watched through
    :meth:`fileno` (readable: call :meth:`process_events`). :meth:`close` at
    shutdown kills and removes everything left, the parent too.
    """

    def __init__(self, parent: Path, log: Any) -> None:
        self.parent = parent
        self.log = log
        self._by_pid: dict[int, WorkerCgroup] = {}
        self._by_id: dict[int, int] = {}  # cgroup id → the worker's pid (notify attribution)
        self._unclaimed: set[str] = set()  # found in the parent at start: not ours (yet)
        # Cgroups killed and waiting to be empty: cgroup.events signals a
        # change with POLLPRI (cgroup-v2.rst, "cgroup.events"), so an inner
        # epoll asks for EPOLLPRI only and the loop watches the inner one.
        self._epoll = select.epoll()
        self._emptying: dict[int, WorkerCgroup] = {}  # cgroup.events fd → cgroup
        self._seq = 0

    @classmethod
    def open(cls, log: Any) -> WorkerCgroups | None:
        """The tree below this process's own cgroup, or None (logged) where none can be made."""
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
            path = own_cgroup(Path("/proc/self/cgroup").read_text())
            pid_namespace = os.stat("/proc/self/ns/pid").st_ino
        except OSError as exc:
            log.info(
                "cgroups_unavailable", reason=str(exc), note="escaped processes are only logged"
            )
            return None
        base = cgroup_directory(cgroup2_mounts(mountinfo), path) if path is not None else None
        if base is None:
            log.info(
                "cgroups_unavailable",
                reason="no writable cgroup2 hierarchy holds this process",
                note="escaped processes are only logged",
            )
            return None
        remove_stale_parents(base, pid_namespace, log)
        parent = base / parent_name(os.getpid(), pid_namespace)
        try:
            os.mkdir(parent, 0o755)
        except FileExistsError:
            pass  # after an upgrade: ours already; else a dead namesake's, cleaned below
        except OSError as exc:  # read-only, not ours to write (no Delegate=yes), ...
            log.info(
                "cgroups_unavailable",
                reason=f"cannot create {parent}: {exc.strerror}",
                note="escaped processes are only logged",
            )
            return None
        tree = cls(parent, log)
        tree._unclaimed = {entry.name for entry in os.scandir(parent) if entry.is_dir()}
        log.info("cgroups_enabled", path=str(parent))
        return tree

    def fileno(self) -> int:
        return self._epoll.fileno()

    # -- a worker's life --------------------------------------------------------------

    def prepare(self, unit: str, instance: int) -> WorkerCgroup:
        """A new, empty cgroup for a worker about to start; raises OSError."""
        while True:
            self._seq += 1
            name = worker_name(unit, instance, self._seq)
            path = self.parent / name
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                continue  # a name the program before an upgrade used
            except FileNotFoundError:
                os.mkdir(self.parent, 0o755)  # removed behind our back: make it again
                continue
            break
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            _remove(path)
            raise
        try:
            cgroup_id = os.fstat(fd).st_ino
        except OSError:
            os.close(fd)
            _remove(path)
            raise
        return WorkerCgroup(name=name, parent=self.parent, fd=fd, id=cgroup_id)

    def started(self, pid: int, cgroup: WorkerCgroup) -> None:
        """The worker ``pid`` is in ``cgroup`` (made there, or joined it before exec)."""
        self._close_fd(cgroup)
        self._by_pid[pid] = cgroup
        self._by_id[cgroup.id] = pid

    def discard(self, cgroup: WorkerCgroup) -> None:
        """The spawn failed: the child (if any) is reaped, the cgroup goes.

        Killed first: a child that lived for a moment (its pidfd could not be
        opened) may have forked in that moment.
        """
        self._close_fd(cgroup)
        _kill(cgroup.path)
        self._empty_then_remove(cgroup)

    def adopt(self, pid: int) -> None:
        """After an upgrade: the restored worker ``pid`` keeps the cgroup it is in."""
        try:
            path = own_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
        except OSError:
            return
        name = path.rsplit("/", 1)[-1] if path is not None else ""
        if (
            name in self._unclaimed
            and path is not None
            and path.endswith(f"/{self.parent.name}/{name}")
        ):
            try:
                cgroup_id = os.stat(self.parent / name).st_ino
            except OSError:
                return
            self._unclaimed.discard(name)
            self.started(pid, WorkerCgroup(name=name, parent=self.parent, id=cgroup_id))

    def release_unclaimed(self) -> None:
        """Kill and remove the cgroups found at start that no restored worker claimed."""
        for name in sorted(self._unclaimed):
            self.log.info("cgroup_cleaned", cgroup=name, reason="no worker of ours is in it")
            cgroup = WorkerCgroup(name=name, parent=self.parent)
            _kill(cgroup.path)
            self._empty_then_remove(cgroup)
        self._unclaimed.clear()

    def worker_of(self, cgroup_id: int) -> int | None:
        """The pid of the worker whose cgroup has id ``cgroup_id`` (from a pidfd), or None.

        cgroup ids are 64-bit and never reused, so an id names one cgroup for
        good, even one a process left long ago.
        """
        return self._by_id.get(cgroup_id)

    def name_of(self, pid: int) -> str | None:
        cgroup = self._by_pid.get(pid)
        return cgroup.name if cgroup is not None else None

    def signal(self, pid: int, signum: int) -> list[int]:
        """Send ``signum`` to what of worker ``pid``'s cgroup its process group does not hold.

        The caller signals the process group itself; this reaches the rest,
        once each (systemd's KillMode=control-group signals the whole cgroup).
        SIGKILL goes through ``cgroup.kill``: atomic, no fork can outrun it.
        Returns the pids signalled apart from the group (none for SIGKILL).
        """
        cgroup = self._by_pid.get(pid)
        if cgroup is None:
            return []
        if signum == signal.SIGKILL:
            _kill(cgroup.path)
            return []
        reached = []
        for member in _members(cgroup.path):
            try:
                if os.getpgid(member) == pid:
                    continue  # the group's signal reached it
                os.kill(member, signum)
            except ProcessLookupError:
                continue
            reached.append(member)
        return reached

    def release(self, pid: int) -> list[int]:
        """Worker ``pid``'s main process exited: kill what is left, remove the cgroup once empty.

        Returns the processes killed that had left the worker's process group
        (which the caller's signal to the group could not reach).
        """
        cgroup = self._by_pid.pop(pid, None)
        if cgroup is None:
            return []
        self._by_id.pop(cgroup.id, None)
        escaped = []
        for member in _members(cgroup.path):
            with contextlib.suppress(ProcessLookupError):
                if member != pid and os.getpgid(member) != pid:
                    escaped.append(member)
        _kill(cgroup.path)
        self._empty_then_remove(cgroup)
        return escaped

    # -- emptying and removal ---------------------------------------------------------

    def _empty_then_remove(self, cgroup: WorkerCgroup) -> None:
        try:
            events_fd = os.open(cgroup.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            _remove(cgroup.path)
            return
        try:
            self._epoll.register(events_fd, select.EPOLLPRI)
        except OSError:
            os.close(events_fd)
            _remove(cgroup.path)
            return
        self._emptying[events_fd] = cgroup
        self._check_empty(events_fd)  # it may be empty already: no event would come

    def _check_empty(self, events_fd: int) -> bool:
        try:
            still = populated(os.pread(events_fd, 4096, 0).decode("ascii", "replace"))
        except OSError:
            still = False  # gone already
        if still:
            return False
        cgroup = self._emptying.pop(events_fd)
        self._epoll.unregister(events_fd)
        os.close(events_fd)
        error = _remove(cgroup.path)
        if error is not None:
            self.log.warning("cgroup_not_removed", cgroup=str(cgroup.path), error=error)
        return True

    def process_events(self) -> None:
        """The inner epoll is readable: remove the cgroups that became empty."""
        for events_fd, _mask in self._epoll.poll(0):
            if events_fd in self._emptying:
                self._check_empty(events_fd)

    def close(self, timeout: float = EMPTY_TIMEOUT) -> None:
        """Shutdown: kill every process left below the parent, remove it all, the parent last."""
        for cgroup in self._by_pid.values():
            self._close_fd(cgroup)
            _kill(cgroup.path)
            self._empty_then_remove(cgroup)
        self._by_pid.clear()
        self._by_id.clear()
        self.release_unclaimed()
        deadline = time.monotonic() + timeout
        while self._emptying:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for events_fd, _mask in self._epoll.poll(remaining):
                if events_fd in self._emptying:
                    self._check_empty(events_fd)
        for events_fd, cgroup in self._emptying.items():
            os.close(events_fd)
            self.log.warning("cgroup_not_removed", cgroup=str(cgroup.path), error="still populated")
        self._emptying.clear()
        self._epoll.close()
        error = _remove(self.parent)
        if error is not None:
            self.log.warning("cgroup_not_removed", cgroup=str(self.parent), error=error)

    @staticmethod
    def _close_fd(cgroup: WorkerCgroup) -> None:
        if cgroup.fd is not None:
            os.close(cgroup.fd)
            cgroup.fd = None


def _members(path: Path) -> list[int]:
    try:
        text = (path / "cgroup.procs").read_text()
    except OSError:
        return []
    return [int(line) for line in text.split()]


def _kill(path: Path) -> None:
    """SIGKILL to every process of the cgroup: ``cgroup.kill`` (Linux 5.14), else one by one."""
    try:
        fd = os.open(path / "cgroup.kill", os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # Older kernels: as systemd's cg_kill() loops, until a pass finds no
        # new process (a fork between the read and the kill shows up next pass).
        seen: set[int] = set()
        while fresh := set(_members(path)) - seen:
            for member in fresh:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
            seen |= fresh
        return
    except OSError:
        return
    try:
        os.write(fd, b"1")
    except OSError:
        pass  # gone already
    finally:
        os.close(fd)


def _remove(path: Path) -> str | None:
    """rmdir ``path``; the reason it failed, or None (also when it was gone already)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


# -- the fallback: who still holds a socket --------------------------------------------------


def socket_holders(inodes: Mapping[int, str], skip: Iterable[int] = ()) -> dict[int, list[str]]:
    """Every process (but ``skip``) with an fd on one of the sockets ``inodes`` (inode → name).

    Reads ``/proc/PID/fd``; a process that exits meanwhile, or that we may not
    look into, is passed over.
    """
    wanted = {f"socket:[{inode}]": name for inode, name in inodes.items()}
    skipped = set(skip)
    found: dict[int, list[str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdecimal() or int(entry.name) in skipped:
            continue
        pid = int(entry.name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        names: set[str] = set()
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            name = wanted.get(target)
            if name is not None:
                names.add(name)
        if names:
            found[pid] = sorted(names)
    return found


__all__ = [
    "Cgroup2Mount",
    "WorkerCgroup",
    "WorkerCgroups",
    "cgroup2_mounts",
    "cgroup_directory",
    "dead_supervisors_parent",
    "own_cgroup",
    "pid_alive",
    "remove_stale_parents",
    "socket_holders",
]
