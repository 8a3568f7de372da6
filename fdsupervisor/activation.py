"""How a unit's sockets bring work in: first traffic (on-demand) or each connection (accept).

Part of the last step of the flow, used by the unit's runner
(:class:`~fdsupervisor.runner.UnitRunner`), which it knows only as an
:class:`IntakeHost`. With ``activation: on-demand`` the :class:`Intake`
watches the unit's sockets until the first traffic and then has the runner
start the service, which takes the sockets over. With ``accept: true`` it
accepts connections itself, up to ``max-connections`` at once, and has the
runner start one worker per connection: the connection at fd 3
(``LISTEN_FDNAMES=connection``), the peer in ``REMOTE_ADDR`` / ``REMOTE_PORT``
(inet) or ``REMOTE_PID`` / ``REMOTE_UID`` / ``REMOTE_GID`` (unix, from
``SO_PEERCRED``), and with ``inetd: true`` the connection as stdin and stdout
too (SPEC 4, 10).

Nothing is refused for load: while the intake is paused (at
``max-connections``, out of fds, or stopped), connections wait in the
kernel's backlog. Only a source past its socket's
``max-connections-per-source`` is closed at once (SPEC 10), as systemd's
``MaxConnectionsPerSource=`` does, and counted. A socket's ``trigger-limit``
(more than ``burst`` activations or accepts within ``interval``) pauses that
socket for the rest of the interval: not watched (a timer ends the pause, no
polling), its connections wait in the backlog, a warning and
``SOCKET_PAUSED`` / ``SOCKET_RESUMED`` events (systemd's ``PollLimit*=``).
"""

from __future__ import annotations

import errno
import math
import socket
import struct
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from typing import Any, Final, Literal, Protocol

from .binding import BoundSocket
from .fdstore import FdStore, unit_owner
from .log import RateLimitedLog
from .loop import ACCEPT_RETRY_DELAY, EventLoop, Timer
from .service import Service
from .spawn import PassedFd
from .units import ACCEPT_FD_NAME, Activation, TriggerLimit, Unit

# At most this many connections per wake-up, so that one busy socket cannot
# starve the loop (the monitor and the other units' sockets wait meanwhile).
ACCEPT_BATCH = 64

_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid (SO_PEERCRED)

Source = tuple[str, str]
"""A connection's source for ``max-connections-per-source``: (socket name, peer)."""


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of a unix peer, as the kernel recorded them at ``connect()``."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_of(conn: socket.socket, peer: Any) -> tuple[str | None, dict[str, str]]:
    """A connection's source (its IP, uid or CID; None if it has none) and its REMOTE_* variables.

    systemd sets ``REMOTE_ADDR`` / ``REMOTE_PORT`` for inet peers
    (service.c); for a unix peer, ``REMOTE_PID`` / ``REMOTE_UID`` /
    ``REMOTE_GID`` from ``SO_PEERCRED`` (SPEC 10). A source is what systemd's
    ``MaxConnectionsPerSource=`` counts by: the peer's IP address, the uid of
    a unix peer (the kernel's record, not a name the peer chose), the CID of
    a vsock peer.
    """
    if conn.family in (socket.AF_INET, socket.AF_INET6):
        return str(peer[0]), {"REMOTE_ADDR": str(peer[0]), "REMOTE_PORT": str(peer[1])}
    if conn.family == socket.AF_UNIX:
        pid, uid, gid = peer_credentials(conn)
        env = {"REMOTE_PID": str(pid), "REMOTE_UID": str(uid), "REMOTE_GID": str(gid)}
        return f"uid:{uid}", env
    if conn.family == getattr(socket, "AF_VSOCK", -1):
        return f"cid:{peer[0]}", {}
    return None, {}


# What starting a connection's worker came to: it runs; it could not start for
# want of fds, processes or memory (the connection is kept and tried again a
# little later); it could not start at all (the connection is lost).
StartOutcome = Literal["started", "later", "lost"]


class IntakeHost(Protocol):
    """What an intake needs of its unit's runner."""

    unit: Unit
    service: Service

    @property
    def log(self) -> Any: ...

    def start(self, *, manual: bool = True) -> None: ...

    def start_worker(
        self,
        instance: int,
        passed: Sequence[PassedFd],
        *,
        extra_env: Mapping[str, str] | None = None,
        stdio_fd: int | None = None,
    ) -> StartOutcome: ...


# A count of nothing yet, shared: most units never accept, pause or see a worker
# exit, and an empty dict per unit and count is 64 bytes (docs/performance.md, RSS
# at 10,000 units). ``counted`` makes the dict at the first count.
NO_COUNTS: Final[Mapping[str, int]] = MappingProxyType({})


def no_counts() -> Mapping[str, int]:
    return NO_COUNTS


def counted(counts: Mapping[str, int], key: str) -> dict[str, int]:
    """``counts`` with one more ``key``: the same dict, or a new one instead of NO_COUNTS."""
    new = counts if isinstance(counts, dict) else dict(counts)
    new[key] = new.get(key, 0) + 1
    return new


@dataclass(slots=True)
class IntakeCounters:
    """What ``--metrics`` counts of a unit's intake (SPEC 11), where it happens.

    Kept by the unit's runner, so across reloads; reset by an upgrade. Per
    socket, by name: systemd's ``NAccepted`` / ``NRefused`` are per socket unit too.
    """

    activations: int = 0  # on-demand: traffic that had the service started
    accepted: Mapping[str, int] = field(default_factory=no_counts)  # given to a worker
    paused: Mapping[str, int] = field(default_factory=no_counts)  # trigger-limit pauses
    refused: int = 0  # past max-connections-per-source (logged as refused_total)


class TriggerWindow:
    """One socket's ``trigger-limit`` count: pure, of the times it is given.

    A window opens at the first trigger and lasts ``interval``; the
    ``burst``-th trigger in it exhausts it, and the socket is paused until
    the window ends (as systemd's ``ratelimit_below()`` counts
    ``PollLimitBurst=`` per ``PollLimitIntervalSec=``).
    """

    __slots__ = ("count", "limit", "opened")

    def __init__(self, limit: TriggerLimit) -> None:
        self.limit = limit
        self.opened = -math.inf
        self.count = 0

    def trigger(self, now: float) -> float | None:
        """Count one trigger at ``now``; the time the pause ends if the burst is spent now."""
        if now >= self.opened + self.limit.interval:
            self.opened, self.count = now, 0
        self.count += 1
        if self.count >= self.limit.burst:
            return self.opened + self.limit.interval
        return None


class Intake:
    """One unit's sockets, watched for traffic or accepted on, as its activation says."""

    __slots__ = (
        "_emit",
        "_held",
        "_host",
        "_loop",
        "_paused",
        "_refusals_flush",
        "_refusals_log",
        "_retry",
        "_shutting_down",
        "_sources",
        "_store",
        "_throttled",
        "_windows",
        "accepting",
        "counters",
        "watching",
    )

    def __init__(
        self,
        host: IntakeHost,
        loop: EventLoop,
        store: FdStore,
        shutting_down: Callable[[], bool],
        emit: Callable[[str, dict[str, Any]], None] = lambda event, data: None,
    ) -> None:
        self._host = host
        self._loop = loop
        self._store = store
        self._shutting_down = shutting_down
        self._emit = emit
        # trigger-limit: each limited socket's window, and the paused ones' timers. This
        # dict and _sources are made at their first use: most units never need them, and
        # each empty dict is 64 bytes per unit (docs/performance.md, RSS at 10,000 units).
        self._windows: dict[str, TriggerWindow] | None = None
        self._throttled: dict[str, Timer] | None = None
        self.watching = False  # on-demand: waiting for the first traffic
        self.accepting = False  # accept mode: the service takes connections
        self._paused = False  # accept mode: at max-connections, or out of fds
        self._retry: Timer | None = None  # accept mode: out of fds, try again then
        # accept mode: a connection whose worker could not start for want of fds, kept for then
        self._held: tuple[BoundSocket, socket.socket, Any] | None = None
        # accept mode: each connection worker's source (max-connections-per-source)
        self._sources: dict[int, Source] | None = None
        self.counters = IntakeCounters()
        # a peer past its limit chooses how often we would warn: limited, as journald does
        self._refusals_log: RateLimitedLog | None = None
        self._refusals_flush: Timer | None = None

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
            self._loop.add_reader(fd, partial(self._traffic, self._name_of(fd)))

    def _name_of(self, fd: int) -> str | None:
        return next((b.name for b in self._sockets() if b.fileno() == fd), None)

    def socket_removed(self, fd: int) -> None:
        self._loop.remove_reader(fd)

    # -- on-demand activation -----------------------------------------------------------

    def watch(self) -> None:
        """On-demand: start the service at the first traffic on any of its sockets."""
        if self.watching or self._host.unit.service.activation is not Activation.ON_DEMAND:
            return
        for bound in self._sockets():
            if not self._paused_by_limit(bound.name):
                self._loop.add_reader(bound.fileno(), partial(self._traffic, bound.name))
        self.watching = True
        self._host.service.mark_listening()

    def unwatch(self) -> None:
        if not self.watching:
            return
        for fd in self._fds():
            self._loop.remove_reader(fd)
        self.watching = False

    def _traffic(self, name: str | None = None) -> None:
        self._host.start(manual=False)  # first: the log can wait
        self.counters.activations += 1
        self._host.log.info("traffic", action="started service")
        bound = self._bound(name)
        if bound is not None:
            self._triggered(bound)

    def _bound(self, name: str | None) -> BoundSocket | None:
        return next((b for b in self._sockets() if b.name == name), None)

    # -- trigger-limit ---------------------------------------------------------------

    def _triggered(self, bound: BoundSocket) -> bool:
        """Count one activation or accept on ``bound``; True: it is paused now."""
        limit = bound.spec.trigger_limit
        if limit is None:
            return False
        if self._windows is None:
            self._windows = {}
        window = self._windows.get(bound.name)
        if window is None or window.limit != limit:
            window = self._windows[bound.name] = TriggerWindow(limit)
        until = window.trigger(self._loop.time())
        if until is None:
            return False
        self._loop.remove_reader(bound.fileno())
        if self._throttled is None:
            self._throttled = {}
        self._throttled[bound.name] = self._loop.call_at(
            until, partial(self._throttle_over, bound.name)
        )
        self.counters.paused = counted(self.counters.paused, bound.name)
        # once per pause, as systemd logs "Trigger limit hit, refusing further activation"
        self._host.log.warning(
            "socket_paused",
            socket=bound.name,
            burst=limit.burst,
            interval=limit.interval,
            resume_in=round(until - self._loop.time(), 3),
        )
        self._emit("SOCKET_PAUSED", {"unit": self._host.unit.name, "socket": bound.name})
        return True

    def _paused_by_limit(self, name: str) -> bool:
        return self._throttled is not None and name in self._throttled

    def _throttle_over(self, name: str) -> None:
        if self._throttled is not None:
            self._throttled.pop(name, None)
        self._host.log.info("socket_resumed", socket=name)
        self._emit("SOCKET_RESUMED", {"unit": self._host.unit.name, "socket": name})
        bound = self._bound(name)
        if bound is None:
            return
        if self.watching:
            self._loop.add_reader(bound.fileno(), partial(self._traffic, name))
        elif self.accepting and not self._paused:
            self._loop.add_reader(bound.fileno(), partial(self._accept, bound))

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
        if self._held is not None:
            self._held[1].close()  # a stopped service serves nobody: the peer sees it closed
            self._held = None

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
            if not self._paused_by_limit(bound.name):
                self._loop.add_reader(bound.fileno(), partial(self._accept, bound))
        self._paused = False

    def _retry_due(self) -> None:
        self._retry = None
        held, self._held = self._held, None
        if held is not None and not self._hand_on(*held):
            return  # still short of fds: held again, and tried again later
        self._resume()

    def _retry_later(self) -> None:
        """Out of fds or memory: leave connections in the backlog, look again a little later."""
        self._pause()
        if self._retry is None:
            self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._retry_due)

    def _hand_on(self, bound: BoundSocket, conn: socket.socket, peer: Any) -> bool:
        """Start the connection's worker; False: it is held until fds are free (and closed
        here otherwise: the worker has its own copy, or the connection is lost)."""
        if self._connection(bound, conn, peer) == "later":
            self._held = (bound, conn, peer)
            self._retry_later()
            return False
        conn.close()
        return True

    def _accept(self, bound: BoundSocket) -> None:
        limit = self._host.unit.service.max_connections
        listener = bound.sock
        if not isinstance(listener, socket.socket):
            return  # a FIFO has no connections (accept: true refuses one at load)
        for _ in range(ACCEPT_BATCH):
            if len(self._host.service.workers) >= limit:
                self._pause()
                return
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # Out of fds or memory: leave connections in the backlog and try
                # again a little later instead of spinning (libuv does the same).
                self._host.log.warning("accept_failed", error=str(exc))
                self._retry_later()
                return
            if not self._hand_on(bound, conn, peer):
                return
            if self._triggered(bound):
                return

    def _connection(self, bound: BoundSocket, conn: socket.socket, peer: Any) -> StartOutcome:
        """Start the worker of one connection: "later" if it may start once fds are free."""
        try:
            source, extra_env = peer_of(conn, peer)
        except OSError as exc:  # the peer is gone already (SO_PEERCRED on a dead socket)
            self._host.log.info("connection_lost", socket=bound.name, error=str(exc))
            return "lost"
        limit = bound.spec.max_connections_per_source
        key = (bound.name, source) if source is not None else None
        if limit is not None and key is not None and self._source_count(key) >= limit:
            # Closed at once, as systemd's MaxConnectionsPerSource= does
            # (socket_enter_running(): "Too many incoming connections")
            self.counters.refused += 1
            self._refused(
                socket=bound.name,
                source=source,
                reason="max-connections-per-source",
                limit=limit,
                refused_total=self.counters.refused,
            )
            return "lost"
        instance = self._host.service.next_instance()
        outcome = self._host.start_worker(
            instance,
            [PassedFd(ACCEPT_FD_NAME, conn.fileno())],
            extra_env=extra_env,
            stdio_fd=conn.fileno() if self._host.unit.service.inetd else None,
        )
        if outcome == "started":
            # as systemd's NAccepted: every connection not refused, handed on to a worker
            self.counters.accepted = counted(self.counters.accepted, bound.name)
            if key is not None and limit is not None:
                if self._sources is None:
                    self._sources = {}
                self._sources[instance] = key
        return outcome

    def _refused(self, **fields: Any) -> None:
        """``connection_refused``, at most LOG_RATE_BURST lines per interval, then a summary."""
        if self._refusals_log is None:
            self._refusals_log = RateLimitedLog(self._host.log, clock=self._loop.time)
        self._refusals_log.warning("connection_refused", **fields)
        due = self._refusals_log.due()
        if due is not None and self._refusals_flush is None:
            self._refusals_flush = self._loop.call_at(due, self._flush_refusals)

    def _flush_refusals(self) -> None:
        self._refusals_flush = None
        if self._refusals_log is not None:
            self._refusals_log.flush()

    def _source_count(self, key: Source) -> int:
        """How many live connection workers came from ``key``; forgets the ones that are gone."""
        if self._sources is None:
            return 0
        live = self._host.service.workers
        for instance in [i for i in self._sources if i not in live]:
            del self._sources[instance]
        return Counter(self._sources.values())[key]
