"""How a unit's sockets bring work in: first traffic (on-demand) or each connection (accept).

Part of the last step of the flow, used by the unit's runner
(:class:`~fdsupervisor.runner.UnitRunner`), which it knows only as an
:class:`IntakeHost`. With ``activation: on-demand`` the :class:`Intake`
watches the unit's sockets until the first traffic and then has the runner
start the service, which takes the sockets over. With ``accept: true`` it
accepts connections itself, up to ``max-connections`` at once, and has the
runner start one worker per connection: the connection at fd 3
(``LISTEN_FDNAMES=connection``), the peer in ``REMOTE_ADDR`` / ``REMOTE_PORT``,
and with ``inetd: true`` the connection as stdin and stdout too (SPEC 4).

Nothing is ever refused: while the intake is paused (at ``max-connections``,
out of fds, or stopped), connections wait in the kernel's backlog.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol

from .binding import BoundSocket
from .fdstore import FdStore, unit_owner
from .loop import ACCEPT_RETRY_DELAY, EventLoop, Timer
from .service import Service
from .spawn import PassedFd
from .units import ACCEPT_FD_NAME, Activation, Unit

# At most this many connections per wake-up, so that one busy socket cannot
# starve the loop (the monitor and the other units' sockets wait meanwhile).
ACCEPT_BATCH = 64


class IntakeHost(Protocol):
    """What an intake needs of its unit's runner."""

    unit: Unit
    service: Service
    log: Any

    def start(self, *, manual: bool = True) -> None: ...

    def start_worker(
        self,
        instance: int,
        passed: Sequence[PassedFd],
        *,
        extra_env: Mapping[str, str] | None = None,
        stdio_fd: int | None = None,
    ) -> bool: ...


class Intake:
    """One unit's sockets, watched for traffic or accepted on, as its activation says."""

    def __init__(
        self,
        host: IntakeHost,
        loop: EventLoop,
        store: FdStore,
        shutting_down: Callable[[], bool],
    ) -> None:
        self._host = host
        self._loop = loop
        self._store = store
        self._shutting_down = shutting_down
        self.watching = False  # on-demand: waiting for the first traffic
        self.accepting = False  # accept mode: the service takes connections
        self._paused = False  # accept mode: at max-connections, or out of fds
        self._retry: Timer | None = None  # accept mode: out of fds, try again then

    def _sockets(self) -> list[BoundSocket]:
        owner = unit_owner(self._host.unit.name)
        return [
            e.resource for e in self._store.owned_by(owner) if isinstance(e.resource, BoundSocket)
        ]

    def _fds(self) -> list[int]:
        return [e.fd for e in self._store.owned_by(unit_owner(self._host.unit.name))]

    def suspend(self) -> None:
        """Neither watch nor accept (a stop, or a reload moving the unit's sockets)."""
        self.unwatch()
        self.stop_accepting()

    def socket_added(self, fd: int) -> None:
        """A socket added to the unit at run time: watched too, if the unit waits for traffic."""
        if self.watching:
            self._loop.add_reader(fd, self._traffic)

    def socket_removed(self, fd: int) -> None:
        self._loop.remove_reader(fd)

    # -- on-demand activation -----------------------------------------------------------

    def watch(self) -> None:
        """On-demand: start the service at the first traffic on any of its sockets."""
        if self.watching or self._host.unit.service.activation is not Activation.ON_DEMAND:
            return
        for fd in self._fds():
            self._loop.add_reader(fd, self._traffic)
        self.watching = True
        self._host.service.mark_listening()

    def unwatch(self) -> None:
        if not self.watching:
            return
        for fd in self._fds():
            self._loop.remove_reader(fd)
        self.watching = False

    def _traffic(self) -> None:
        self._host.start(manual=False)  # first: the log can wait
        self._host.log.info("traffic", action="started service")

    # -- accept mode: one instance per connection --------------------------------------

    def start_accepting(self) -> None:
        if self.accepting:
            return
        self.accepting = True
        self._paused = True
        for bound in self._sockets():
            # Never handed to a worker in accept mode, so non-blocking is ours alone.
            bound.sock.setblocking(False)
        self._resume()

    def stop_accepting(self) -> None:
        if self.accepting:
            self._pause()
            self.accepting = False
        if self._retry is not None:
            self._retry.cancel()  # a stopped service must not start accepting again
            self._retry = None

    def worker_exited(self) -> None:
        """One connection's worker is gone: below max-connections again, maybe."""
        if self._paused and self.accepting:
            self._resume()

    def _pause(self) -> None:
        """Leave new connections in the kernel's backlog: waiting, never refused."""
        if not self._paused:
            for fd in self._fds():
                self._loop.remove_reader(fd)
            self._paused = True

    def _resume(self) -> None:
        if not self._paused or self._shutting_down():
            return
        if len(self._host.service.workers) >= self._host.unit.service.max_connections:
            return
        for bound in self._sockets():
            self._loop.add_reader(bound.fileno(), partial(self._accept, bound))
        self._paused = False

    def _retry_due(self) -> None:
        self._retry = None
        self._resume()

    def _accept(self, bound: BoundSocket) -> None:
        limit = self._host.unit.service.max_connections
        for _ in range(ACCEPT_BATCH):
            if len(self._host.service.workers) >= limit:
                self._pause()
                return
            try:
                conn, peer = bound.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # Out of fds or memory: leave connections in the backlog and try
                # again a little later instead of spinning (libuv does the same).
                self._host.log.warning("accept_failed", error=str(exc))
                self._pause()
                if self._retry is None:
                    self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._retry_due)
                return
            with conn:
                self._connection(conn, peer)

    def _connection(self, conn: socket.socket, peer: Any) -> None:
        """Start the worker of one connection; if it cannot start, the connection is lost."""
        instance = self._host.service.next_instance()
        extra_env = {}
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # systemd sets these for inet peers only (service.c, REMOTE_ADDR/REMOTE_PORT)
            extra_env = {"REMOTE_ADDR": str(peer[0]), "REMOTE_PORT": str(peer[1])}
        self._host.start_worker(
            instance,
            [PassedFd(ACCEPT_FD_NAME, conn.fileno())],
            extra_env=extra_env,
            stdio_fd=conn.fileno() if self._host.unit.service.inetd else None,
        )
