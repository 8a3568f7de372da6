"""The supervisor's end of NOTIFY_SOCKET: one socket for every worker, each message to its runner.

notify.py knows the protocol (the pure parser, the datagram socket with
credentials and fds); runner.py knows what a message means for its unit.
:class:`WorkerNotifications` sits between them: it opens the socket under a
name nobody can guess, or takes over the one an upgrade handed across the
exec, reads it when the loop says so, and hands each datagram to the runner
of the worker that sent it (:func:`~fdsupervisor.runner.find_sender`: by
the sender's pid, process group, or the cgroup its pidfd names).

Anyone on the machine can send to an abstract socket: what a stranger causes
(a datagram from no worker, one too big, fds sent without FDSTORE=1) is
logged through a rate limit (docs/security.md), whose counts are written
once each window is over, by a timer, so that an idle supervisor still never
wakes without a reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from .cgroups import WorkerCgroups
from .errors import BindError
from .log import RateLimitedLog
from .loop import EventLoop, Timer
from .notify import NotifySocket
from .runner import UnitRunner, find_sender

#: The notify socket's abstract name, before its random part (NotifySocket.bind_unpredictable).
NOTIFY_NAME_PREFIX = "fdsupervisor/notify/"


class WorkerNotifications:
    """Reads NOTIFY_SOCKET and dispatches each message to the runner of its worker."""

    def __init__(
        self,
        loop: EventLoop,
        log: Any,
        runners: Callable[[], Iterable[UnitRunner]],
        cgroups: Callable[[], WorkerCgroups | None] = lambda: None,
    ) -> None:
        self._loop = loop
        self._log = log
        self._runners = runners
        self._cgroups = cgroups
        self.strangers = RateLimitedLog(log, clock=loop.time)
        self._flush_timer: Timer | None = None
        self.socket: NotifySocket | None = None

    @property
    def address(self) -> str | None:
        """What workers get as ``NOTIFY_SOCKET`` (None until :meth:`open`)."""
        return self.socket.address if self.socket is not None else None

    def open(self, handed_over_fd: int | None) -> None:
        """The old program's notify socket after an upgrade, else one bound anew.

        A name nobody can guess (any user may bind a free abstract name), kept
        bound across an upgrade's exec so that it is never free for someone
        else to take (docs/security.md).
        """
        if handed_over_fd is not None:
            try:
                self.socket = NotifySocket.adopt(handed_over_fd, log=self.strangers)
            except BindError as exc:
                self._log.warning(
                    "notify_socket_rebound",
                    error=exc.message,
                    note="running workers' NOTIFY_SOCKET no longer reaches the supervisor",
                )
        if self.socket is None:
            self.socket = NotifySocket.bind_unpredictable(NOTIFY_NAME_PREFIX, log=self.strangers)
        self._loop.add_reader(self.socket.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        assert self.socket is not None
        cgroups = self._cgroups()
        by_cgroup = cgroups.worker_of if cgroups is not None else lambda cgroup_id: None
        for datagram in self.socket.receive():
            sender = find_sender(datagram.sender, self._runners(), worker_of_cgroup=by_cgroup)
            if sender is None:
                for fd in datagram.fds:
                    os.close(fd)
                self.strangers.warning(
                    "notify_ignored",
                    pid=datagram.pid,
                    uid=datagram.uid,
                    reason="not a worker's process"
                    if datagram.sender.running
                    else "gone before it was read, and of no worker's cgroup",
                )
                continue
            runner, worker = sender
            runner.notified(worker, datagram.message, datagram.fds)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Have the count of suppressed warnings written once its window is over."""
        due = self.strangers.due()
        if due is None or self._flush_timer is not None:
            return

        def flush() -> None:
            self._flush_timer = None
            self.strangers.flush()
            self._schedule_flush()

        self._flush_timer = self._loop.call_at(due, flush)

    def flush(self) -> None:
        """Write every count of suppressed warnings now (at shutdown, before an upgrade)."""
        self.strangers.flush(everything=True)

    def close(self) -> None:
        """Close the socket (not at an upgrade's exec: it crosses it)."""
        if self.socket is not None:
            self.socket.close()
            self.socket = None
