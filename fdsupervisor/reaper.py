"""Orphans: the supervisor as child subreaper, and as a container's PID 1.

A worker's daemon that double-forks is re-parented to the nearest child
subreaper (``PR_SET_CHILD_SUBREAPER``, prctl(2)), or to PID 1 of its pid
namespace; the supervisor is one always, and in a container it is PID 1 too.
Either way those orphans become its children, and each must be reaped or it
stays a zombie. Tracked workers are reaped by their runner through the
pidfd; this module reaps only the others, and never steals a worker's exit
status. It runs when SIGCHLD arrives on the loop's wake-up socket (no timer:
an idle supervisor is never woken).

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
from collections.abc import Callable, Collection
from typing import Any

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


class OrphanReaper:
    """Reaps the children no runner tracks; ``tracked()`` names the ones it must leave."""

    def __init__(self, tracked: Callable[[], Collection[int]], *, log: Any) -> None:
        self._tracked = tracked
        self.log = log

    def reap(self) -> list[int]:
        """Reap every exited child that is not tracked; the pids reaped."""
        reaped: list[int] = []
        while True:
            try:
                # WNOWAIT: look first, so that a tracked worker's status stays for its runner.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return reaped  # no children at all
            if info is None:
                return reaped  # none exited
            if info.si_pid in self._tracked():
                # It hides the zombies behind it from P_ALL: find those by name.
                for pid in zombie_children(os.getpid()):
                    if pid not in self._tracked():
                        self._reap_one(pid, reaped)
                return reaped
            self._reap_one(info.si_pid, reaped)

    def _reap_one(self, pid: int, reaped: list[int]) -> None:
        try:
            _, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            reaped.append(pid)
            self.log.info("orphan_reaped", pid=pid, status=os.waitstatus_to_exitcode(status))


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
