"""``--metrics ADDRESS``: Prometheus' text format at ``GET /metrics`` (SPEC 11).

The endpoint is served from the supervisor's own event loop (no thread): a
listening socket bound like any unit socket (:mod:`fdsupervisor.binding`),
non-blocking connections parsed with ``h11``, and a reply rendered by
``prometheus_client`` from a custom collector that reads the supervisor's
state at scrape time (nothing is counted twice, nothing goes stale).

A scraper is untrusted: whatever it does costs a bounded amount and harms
nothing else. At most :data:`MAX_CONNECTIONS` connections at once (more are
closed on accept), at most :data:`MAX_REQUEST_BYTES` of request head (then
431), :data:`CONNECTION_TIMEOUT` seconds for the whole exchange (a loop
timer, so a silent or slowloris client is closed without polling), writes
that never block (the reply is buffered per connection), and one request per
connection (``Connection: close``), as the Prometheus server expects.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import h11
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from .activation import IntakeCounters
from .binding import BoundSocket
from .fdstore import owner_kind
from .log import RateLimitedLog
from .loop import ACCEPT_RETRY_DELAY, EventLoop, Timer
from .runner import UnitRunner, WorkerCounters
from .service import ServiceState

# Scrape connections at once: Prometheus keeps one per target, and a handful
# of scrapers is plenty; each costs an fd and a buffer.
MAX_CONNECTIONS = 32
# The request line and headers together (h11's max_incomplete_event_size);
# more is answered 431, as h11 hints.
MAX_REQUEST_BYTES = 16 * 1024
# The whole exchange, from accept to the last byte of the reply. Prometheus'
# default scrape_timeout is 10 s; a local scrape takes milliseconds.
CONNECTION_TIMEOUT = 10.0
RECV_SIZE = 4096
# After an error reply, at most this much more of the request is read and dropped.
LINGER_BYTES = 4 * MAX_REQUEST_BYTES
OWNER_KINDS = ("unit", "service", "monitor")


class UnitIntake(NamedTuple):
    """One unit's intake as the collector reads it: its sockets now and what was counted."""

    unit: str
    sockets: Sequence[str]  # the unit's socket names now (each gets a sample, 0 at first)
    accept: bool  # accept mode: connections_accepted_total applies
    counters: IntakeCounters


def unit_intakes(runners: Mapping[str, UnitRunner]) -> list[UnitIntake]:
    """Each runner's intake, for :attr:`MetricsSource.intakes`."""
    return [
        UnitIntake(
            name,
            [spec.name for spec in runner.unit.sockets],
            runner.unit.service.accept,
            runner.intake_counters,
        )
        for name, runner in runners.items()
    ]


@dataclass(frozen=True, slots=True)
class MetricsSource:
    """What the collector reads at scrape time, as plain callables (no supervisor import)."""

    services: Callable[[], Iterable[Mapping[str, Any]]]  # query-services' objects
    stored_owners: Callable[[], Iterable[str]]  # the owner of every stored fd
    monitor_clients: Callable[[], int]
    counters: Callable[[], Iterable[tuple[str, WorkerCounters]]]  # (unit, its counters)
    intakes: Callable[[], Iterable[UnitIntake]]


class SupervisorCollector(Collector):
    """The SPEC 11 families that the supervisor's state already holds."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        workers = GaugeMetricFamily(
            "fdsupervisor_workers", "Workers of the unit not yet reaped.", labels=["unit"]
        )
        state = GaugeMetricFamily(
            "fdsupervisor_service_state",
            "1 for the service's current state, 0 for the others.",
            labels=["unit", "state"],
        )
        # Kept by the service (query-services' "restarts"): read, not counted here.
        restarts = CounterMetricFamily(
            "fdsupervisor_restarts",
            "Automatic restarts of the service since it was loaded.",
            labels=["unit"],
        )
        for service in self.source.services():
            unit = str(service["unit"])
            workers.add_metric([unit], len(service["pids"]))
            restarts.add_metric([unit], service["restarts"])
            for value in ServiceState:
                state.add_metric([unit, value.value], 1 if service["state"] == value.value else 0)
        starts = CounterMetricFamily(
            "fdsupervisor_worker_starts", "Workers started for the unit.", labels=["unit"]
        )
        exits = CounterMetricFamily(
            "fdsupervisor_worker_exits",
            "Workers of the unit that exited, by why: stopped, success, failure, signal.",
            labels=["unit", "reason"],
        )
        for unit, counters in self.source.counters():
            starts.add_metric([unit], counters.starts)
            for reason, count in sorted(counters.exits.items()):
                exits.add_metric([unit, reason], count)
        activations, accepted, paused = self._intake_families()
        stored = GaugeMetricFamily(
            "fdsupervisor_stored_fds", "Fds in the supervisor's store.", labels=["owner_kind"]
        )
        counts = dict.fromkeys(OWNER_KINDS, 0)
        for owner in self.source.stored_owners():
            counts[owner_kind(owner)] += 1
        for kind, count in counts.items():
            stored.add_metric([kind], count)
        clients = GaugeMetricFamily(
            "fdsupervisor_monitor_clients", "Clients connected to the QMP monitor."
        )
        clients.add_metric([], self.source.monitor_clients())
        yield from (workers, state, restarts, starts, exits, activations, accepted, paused)
        yield from (stored, clients)

    def _intake_families(self) -> tuple[Metric, Metric, Metric]:
        activations = CounterMetricFamily(
            "fdsupervisor_activations",
            "Times traffic on an on-demand unit's sockets had its service started.",
            labels=["unit"],
        )
        accepted = CounterMetricFamily(
            "fdsupervisor_connections_accepted",
            "Connections accepted and handed to a worker (accept mode).",
            labels=["unit", "socket"],
        )
        paused = CounterMetricFamily(
            "fdsupervisor_socket_paused",
            "Times the socket was paused by its trigger-limit.",
            labels=["unit", "socket"],
        )
        for intake in self.source.intakes():
            counted = intake.counters
            activations.add_metric([intake.unit], counted.activations)
            # a socket counted and then removed by a reload keeps its count
            names = sorted({*intake.sockets, *counted.accepted, *counted.paused})
            for name in names:
                if intake.accept or name in counted.accepted:
                    accepted.add_metric([intake.unit, name], counted.accepted.get(name, 0))
                paused.add_metric([intake.unit, name], counted.paused.get(name, 0))
        return activations, accepted, paused


def render(source: MetricsSource) -> bytes:
    """The text exposition of the supervisor's state now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupervisorCollector(source))
    return generate_latest(registry)


def http_response(status: int, reason: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
}


def error_response(status: int) -> bytes:
    reason = _REASONS.get(status, "Bad Request")
    return http_response(status, reason, f"{reason}\n".encode(), "text/plain; charset=utf-8")


class MetricsConnection:
    """One scrape: read one request head, answer it, close."""

    def __init__(self, server: MetricsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        self.outgoing = b""
        self.writing = False
        self.received = 0  # request bytes so far; one request per connection
        self.closed = False
        self.timer: Timer = server.loop.call_later(CONNECTION_TIMEOUT, self._timed_out)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self.received += len(data)
        if self.received > MAX_REQUEST_BYTES:
            # h11 only checks its limit while a head is incomplete: a whole head
            # that came in one read past the limit would still be parsed.
            self._reply(error_response(431))
            return
        self.http.receive_data(data)
        try:
            event = self.http.next_event()
        except h11.RemoteProtocolError as exc:
            self.server.log.info("metrics_bad_request", error=str(exc))
            self._reply(error_response(exc.error_status_hint))
            return
        if isinstance(event, h11.Request):
            self._reply(self._answer(event))
        elif isinstance(event, h11.ConnectionClosed) or not data:
            self.close()  # gone before a whole request head

    def _answer(self, request: h11.Request) -> bytes:
        path = request.target.split(b"?", 1)[0]
        if path != b"/metrics":
            return error_response(404)
        if request.method != b"GET":
            return error_response(405)
        return http_response(200, "OK", render(self.server.source), CONTENT_TYPE_LATEST)

    def _reply(self, data: bytes) -> None:
        # One request per connection: stop reading, write what we can now, the rest when writable.
        self.server.loop.remove_reader(self.fd)
        self.outgoing = data
        self._write()

    def _write(self) -> None:
        try:
            sent = self.sock.send(self.outgoing)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        self.outgoing = self.outgoing[sent:]
        if not self.outgoing:
            self._finish()
        elif not self.writing:
            self.writing = True
            self.server.loop.add_writer(self.fd, self._write)

    def _finish(self) -> None:
        """The reply is out: close, after the rest of the request if it is still coming.

        Closing with unread bytes sends a RST, which can make the client lose
        the reply (a 431 or 400 sent mid-request): as nginx's lingering close,
        shut our side and read what is left, bounded in bytes and by the timer.
        """
        if self.writing:
            self.server.loop.remove_writer(self.fd)
            self.writing = False
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.server.loop.add_reader(self.fd, self._drain)

    def _drain(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.received += len(data)
        if not data or self.received > LINGER_BYTES:
            self.close()

    def _timed_out(self) -> None:
        self.server.log.info("metrics_client_timeout", timeout=CONNECTION_TIMEOUT)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        self.server.loop.remove_reader(self.fd)
        self.server.loop.remove_writer(self.fd)
        self.sock.close()
        self.server.forget(self)


class MetricsServer:
    """The listening metrics socket and its scrape connections."""

    def __init__(
        self, bound: BoundSocket, *, loop: EventLoop, log: Any, source: MetricsSource
    ) -> None:
        self.bound = bound
        self.loop = loop
        self.log = log
        self.source = source
        self.connections: list[MetricsConnection] = []
        self._open = False
        # Whoever can reach the port decides how often a connection is refused:
        # those warnings go through the same rate limit as a stranger's notify noise.
        self._refusals = RateLimitedLog(log, clock=loop.time)

    def open(self) -> None:
        self.bound.sock.setblocking(False)
        self.loop.add_reader(self.bound.fileno(), self._accept)
        self._open = True

    def _accept(self) -> None:
        listener = self.bound.sock
        assert isinstance(listener, socket.socket)  # bound from --metrics, never a FIFO
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Level-triggered epoll would wake us at once for the same
                # connection: pause accepting, as the monitor does (loop.py).
                self.log.warning(
                    "metrics_accept_failed", error=str(exc), retry_in=ACCEPT_RETRY_DELAY
                )
                self.loop.remove_reader(self.bound.fileno())
                self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                return
            raise
        if len(self.connections) >= MAX_CONNECTIONS:
            self._refusals.warning(
                "metrics_client_refused", reason=f"{MAX_CONNECTIONS} connections open"
            )
            conn.close()
            return
        conn.setblocking(False)
        connection = MetricsConnection(self, conn)
        self.connections.append(connection)
        self.loop.add_reader(connection.fd, connection.on_readable)

    def _resume_accepting(self) -> None:
        if self._open:
            self.loop.add_reader(self.bound.fileno(), self._accept)

    def forget(self, connection: MetricsConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)

    def close_connections(self) -> None:
        """Close every scrape connection (an upgrade: they do not cross the exec)."""
        for connection in list(self.connections):
            connection.close()

    def close(self) -> None:
        self._refusals.flush(everything=True)  # how many refusals were not written
        self._stop_listening()
        self.bound.close()

    def abandon(self) -> None:
        """Close, but leave a handed-over socket's file: the original fd still serves it."""
        self._stop_listening()
        self.bound.sock.close()

    def _stop_listening(self) -> None:
        self.close_connections()
        if self._open:
            self._open = False
            self.loop.remove_reader(self.bound.fileno())
