"""Every child of the supervisor reaped in one place, on SIGCHLD: workers and orphans.

The supervisor's children are its workers, and the orphans re-parented to
it: a worker's daemon that double-forks goes to the nearest child subreaper
(``PR_SET_CHILD_SUBREAPER``, prctl(2)), or to PID 1 of its pid namespace;
the supervisor is one always, and in a container it is PID 1 too.
:class:`ChildReaper` reaps them all with ``waitid(P_ALL, WEXITED | WNOHANG)``
when SIGCHLD arrives on the loop's wake-up socket (no timer, no fd per child:
an idle supervisor is never woken, and 10,000 workers cost no fds), and hands
each exit to the owner that watches its pid (a unit's runner, the handover),
or logs an orphan's.

Signalling a worker by pid is safe while it is not reaped: the kernel keeps a
pid (and the process group of the same id) from reuse until its parent
waits for it, and only this module waits. That is why systemd, too, signals
its own children by pid. Each exit is looked at with ``WNOWAIT`` first, so its
owner acts while the pid is still held (it kills what is left of the
worker's group), and reaped after.

At shutdown, a PID 1 stops every process left in its namespace, as
tini and systemd's final stage do: SIGTERM to all, SIGKILL after a bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import select
import signal
import time
from typing import Any, Protocol

# <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
# How long the processes left in a PID 1's namespace get between SIGTERM and
# SIGKILL: half of the 10 s that `podman stop` / `docker stop` wait before
# they SIGKILL the container's init itself, so that the SIGKILL is ours.
NAMESPACE_STOP_TIMEOUT = 5.0


def set_child_subreaper() -> bool:
    """Become the child subreaper of every descendant (prctl(2)); False where refused."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def zombie_children(parent: int) -> list[int]:
    """The pids of ``parent``'s children that exited and are not reaped yet, from /proc.

    /proc/PID/task/TID/children would be shorter, but it needs
    CONFIG_PROC_CHILDREN, which not every kernel has.
    """
    found = []
    for name in os.listdir("/proc"):
        if not name.isdecimal():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue  # gone meanwhile
        # proc(5): after the command in parentheses, state then ppid.
        if len(fields) > 1 and fields[0] == b"Z" and int(fields[1]) == parent:
            found.append(int(name))
    return found


class ChildOwner(Protocol):
    """Who watches a child: told while it is a zombie, then once it is reaped."""

    def child_exiting(self, pid: int) -> None:
        """``pid`` exited and is not reaped yet: its pid and process group id are still held."""

    def child_reaped(self, pid: int, wait_status: int) -> None:
        """``pid`` is reaped; ``wait_status`` as ``os.waitpid`` gives it."""


class ChildReaper:
    """The one place that waits for children: pid → its owner; the others are orphans."""

    def __init__(self, *, log: Any) -> None:
        self.log = log
        self._owners: dict[int, ChildOwner] = {}

    def watch(self, pid: int, owner: ChildOwner) -> None:
        """``owner`` is told when child ``pid`` exits."""
        self._owners[pid] = owner

    def forget(self, pid: int) -> None:
        """No longer tell anyone about ``pid`` (the process is left alone)."""
        self._owners.pop(pid, None)

    def __contains__(self, pid: int) -> bool:
        return pid in self._owners

    def pids(self) -> list[int]:
        """Every child that has an owner."""
        return list(self._owners)

    def reap(self) -> list[int]:
        """Reap every child that exited, telling each owner; the orphans' pids reaped."""
        orphans: list[int] = []
        while True:
            try:
                # WNOWAIT: look first, so that the owner acts while the pid is held.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return orphans  # no children at all
            if info is None:
                return orphans  # none exited
            pid = info.si_pid
            owner = self._owners.pop(pid, None)
            try:
                if owner is not None:
                    owner.child_exiting(pid)
                _, status = os.waitpid(pid, 0)  # a zombie: returns at once
                if owner is not None:
                    owner.child_reaped(pid, status)
                else:
                    orphans.append(pid)
                    self.log.info(
                        "orphan_reaped", pid=pid, status=os.waitstatus_to_exitcode(status)
                    )
            except ChildProcessError:
                continue  # reaped meanwhile by whoever started it (a failed spawn)
            except Exception:
                # One owner's bug must not leave the other zombies unreaped until
                # the next SIGCHLD, which may never come.
                self.log.exception("internal_error", pid=pid, note="please report this")


def stop_namespace(wakeup_fd: int, *, log: Any, timeout: float = NAMESPACE_STOP_TIMEOUT) -> None:
    """As PID 1 at shutdown: stop every process left in the namespace, and reap them.

    ``kill(-1, ...)`` reaches every process of the namespace but the caller
    (kill(2)); they are all the caller's children once their parents are
    gone. ``wakeup_fd`` is readable when SIGCHLD arrived, so the wait sleeps
    on events, bounded by ``timeout`` before the SIGKILL.
    """
    if not _reap_all():
        return  # nothing left: all gone with their services
    log.info("namespace_stopping", signal="SIGTERM", timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(-1, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    killed = False
    while _reap_all():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if killed:
                return  # SIGKILL cannot be refused: only an unkillable D-state sleeper is left
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            log.warning("namespace_killed", signal="SIGKILL", after=timeout)
            killed, deadline = True, time.monotonic() + timeout
            continue
        readable, _, _ = select.select([wakeup_fd], [], [], remaining)
        if readable:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                os.read(wakeup_fd, 512)


def _reap_all() -> bool:
    """Reap whatever exited; whether children are left."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True
