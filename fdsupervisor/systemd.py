"""Everything that talks to systemd about the supervisor itself, through systemd-python.

The supervisor is a service of its own service manager (``contrib/systemd/``);
this module is its side of that relation, in four parts:

- :class:`SystemdNotifier` sends sd_notify messages: ``READY=1``,
  ``RELOADING=1``, ``STOPPING=1``, ``STATUS=``, ``WATCHDOG=1``, and
  ``FDSTORE=1`` / ``FDSTOREREMOVE=1`` for systemd's fd store, ``BARRIER=1``
  to wait until the manager has handled them. Each is a no-op
  when the supervisor does not run under systemd (no ``NOTIFY_SOCKET``).
- :class:`SystemdSockets` parses what systemd handed over at start
  (``LISTEN_FDS`` / ``LISTEN_PID`` / ``LISTEN_FDNAMES``): the sockets of a
  ``.socket`` unit, and whatever an earlier run of the supervisor kept in
  the fd store.
- The fd store naming scheme: every entry of the supervisor's store is
  kept in systemd's under an ``FDNAME`` that says what it is
  (:class:`KeptName`: ``web/http`` a unit-file socket, ``web/+extra`` a
  socket added at run time, ``web/=state`` a worker's stored fd, ``/=vm0`` a
  ``getfd`` fd); :func:`kept_name` reads one back, :func:`adoptable` finds
  the unit-file sockets again after a restart and
  :func:`stored_socket_mismatch` says whether one still fits its unit.
- :class:`SystemdFdStore` keeps that store in step with the supervisor's
  own (:class:`~fdsupervisor.fdstore.FdStore`): it takes every entry back
  at start, sends each change as it happens, and keeps the socket files of
  kept sockets at shutdown (systemd holds the sockets for the next run).

The protocol's facts (the first passed fd, valid fd names, the variables that
never reach a worker) are fdpassing.py's.

Everything here but the sending, :func:`stored_socket_mismatch` and
:class:`SystemdFdStore` is pure.
The worker side of sd_notify (workers notifying *us*) is notify.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import select
import socket
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from systemd import daemon

from .addresses import (
    NAME_RE,
    FdAddress,
    FifoAddress,
    InetAddress,
    UnixAddress,
    VsockAddress,
)
from .binding import BoundSocket, InheritedFds, adopt_socket
from .errors import BindError
from .fdpassing import FDNAME_MAX, LISTEN_FDS_START, SCM_MAX_FD, fdname_is_valid
from .fdstore import (
    MONITOR_OWNER,
    Entry,
    FdStore,
    RawFd,
    StoreError,
    owner_kind,
    owner_service,
    owner_unit,
    service_owner,
    unit_owner,
)
from .matching import bound_unix_name, port_range, resolved_address, unix_name, vsock_matches
from .units import SocketKind, SocketSpec, Unit

UNKNOWN_FD_NAME: Final = "unknown"
"""The name ``sd_listen_fds_with_names()`` gives every fd when ``LISTEN_FDNAMES`` is unset."""

FD_STORE_SEPARATOR: Final = "/"
"""Between unit and socket in an fd store name: ``web/http``.

Unit and socket names are ``A-Za-z0-9_.-`` (``addresses.NAME_RE``), so
both may contain dots but neither a ``/``: one ``/`` splits a name
unambiguously. ``fdname_is_valid()`` accepts it (printable ASCII but
``:``), and systemd's own names for ``.socket`` fds (``FileDescriptorName=``
defaults to the socket unit's name, which cannot contain ``/``) never
look like ours.
"""

# time-util.h: timestamp_is_set() is false for 0 and for USEC_INFINITY.
_USEC_INFINITY: Final = 2**64 - 1
_AF_VSOCK: Final = getattr(socket, "AF_VSOCK", -1)

NotifySend = Callable[..., object]
"""How a message goes out: ``systemd.daemon.notify(status, unset_environment=False, pid=0, fds=None)``."""


def _decimal(text: str | None) -> int | None:
    """A decimal number as systemd's ``safe_atou64()`` reads it, strictly; None if not one."""
    if text is None or not (text.isascii() and text.isdecimal()):
        return None
    return int(text)


def _pid(text: str | None) -> int | None:
    """systemd's ``parse_pid()``: a decimal number > 0."""
    number = _decimal(text)
    return number if number is not None and number > 0 else None


def _one_line(text: str) -> str:
    """A value safe inside one ``KEY=value`` line of an sd_notify message.

    A newline would start a new field (a status reading ``x\\nREADY=1``
    would declare readiness), and a NUL cannot cross the C string that
    ``sd_pid_notify_with_fds()`` takes. sd_notify(3): ``STATUS=`` is "a
    single-line UTF-8 status string".
    """
    return " ".join(text.replace("\0", " ").splitlines())


def notify_message(fields: Iterable[tuple[str, str]]) -> str:
    """``KEY=value`` lines joined by newlines, in order (sd_notify(3)'s message format).

    Raises :class:`ValueError` for a key that is not ``A-Z0-9_`` or a value
    with a newline or NUL: callers pass values through :func:`_one_line`
    where they are free text.
    """
    lines = []
    for key, value in fields:
        if not key or not all(
            c.isascii() and (c.isupper() or c.isdigit() or c == "_") for c in key
        ):
            raise ValueError(f"invalid sd_notify field name {key!r}")
        if "\n" in value or "\0" in value:
            raise ValueError(f"sd_notify field {key} has a newline or NUL in its value")
        lines.append(f"{key}={value}")
    return "\n".join(lines)


def monotonic_usec() -> int:
    """``now(CLOCK_MONOTONIC)`` in microseconds, as ``MONOTONIC_USEC=`` wants it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class SystemdNotifier:
    """The supervisor's own sd_notify messages to its service manager.

    ``environ`` is read once, at construction: ``NOTIFY_SOCKET`` decides
    whether anything is sent, ``WATCHDOG_USEC`` / ``WATCHDOG_PID`` the
    watchdog and ``FDSTORE`` the fd store's size. The message itself goes
    out through systemd-python's ``daemon.notify()``, which (like C's
    ``sd_notify()``) reads ``NOTIFY_SOCKET`` from the *process*
    environment: keep it there (scrub copies for workers, with
    ``fdpassing.scrub_environment()``, never ``os.environ`` itself).

    No method raises: a failed send (the manager went away, a full socket
    buffer) returns False and keeps the error in :attr:`last_error`, as
    gunicorn's ``sd_notify()`` and systemd's own daemons log and go on.
    """

    def __init__(
        self,
        environ: Mapping[str, str],
        *,
        pid: int | None = None,
        send: NotifySend | None = None,
    ) -> None:
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        self.pid = os.getpid() if pid is None else pid
        self._watchdog_usec = environ.get("WATCHDOG_USEC")
        self._watchdog_pid = environ.get("WATCHDOG_PID")
        self._fd_store = environ.get("FDSTORE")
        self._send = send if send is not None else daemon.notify
        self.last_error: OSError | None = None

    # -- sending ----------------------------------------------------------------

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` fields in one message; True if it went out."""
        return self._notify(fields.items())

    def _notify(self, fields: Iterable[tuple[str, str]], fds: Sequence[int] = ()) -> bool:
        if not self.enabled:
            return False
        message = notify_message(fields)
        try:
            if fds:
                sent = self._send(message, False, 0, list(fds))
            else:
                sent = self._send(message)
        except OSError as error:
            self.last_error = error
            return False
        return bool(sent)

    def ready(self, status: str) -> bool:
        """``READY=1``: start-up (or a reload) is complete (sd_notify(3))."""
        return self._notify([("READY", "1"), ("STATUS", _one_line(status))])

    def reloading(self, status: str = "reloading") -> bool:
        """``RELOADING=1`` + ``MONOTONIC_USEC=``: a reload began; :meth:`ready` ends it.

        systemd.service(5), ``Type=notify-reload``: the service "must send a
        RELOADING=1 notification message together with MONOTONIC_USEC= set
        to the current monotonic time (i.e. CLOCK_MONOTONIC in µs, formatted
        as decimal string)" and READY=1 when done; the manager uses the
        timestamp to match the two. The same fields as systemd's own
        ``notify_reloading_full()`` (src/shared/daemon-util.c).
        """
        return self._notify(
            [
                ("RELOADING", "1"),
                ("MONOTONIC_USEC", str(monotonic_usec())),
                ("STATUS", _one_line(status)),
            ]
        )

    def stopping(self) -> bool:
        """``STOPPING=1``: shutdown began."""
        return self._notify([("STOPPING", "1"), ("STATUS", "stopping")])

    def status(self, status: str) -> bool:
        """``STATUS=``: one line shown by ``systemctl status``."""
        return self._notify([("STATUS", _one_line(status))])

    # -- watchdog ----------------------------------------------------------------

    def watchdog_interval(self) -> float | None:
        """Seconds between two :meth:`ping` calls, or None when there is no watchdog.

        ``sd_watchdog_enabled()`` (src/libsystemd/sd-daemon/sd-daemon.c): the
        watchdog is on when ``WATCHDOG_USEC`` is a set timestamp (a decimal
        number, neither 0 nor ``USEC_INFINITY``) and ``WATCHDOG_PID`` is
        unset or our pid. sd_watchdog_enabled(3): "it is recommended that a
        daemon sends a keep-alive notification message to the service
        manager every half of the time returned here". A malformed value
        disables it, as the -EINVAL of ``sd_watchdog_enabled()`` does for
        its callers.
        """
        usec = _decimal(self._watchdog_usec)
        if usec is None or usec == 0 or usec >= _USEC_INFINITY:
            return None
        if self._watchdog_pid is not None and _pid(self._watchdog_pid) != self.pid:
            return None
        return usec / 2 / 1_000_000

    def ping(self) -> bool:
        """``WATCHDOG=1``: the keep-alive ping, every :meth:`watchdog_interval` seconds."""
        return self._notify([("WATCHDOG", "1")])

    # -- fd store ----------------------------------------------------------------

    @property
    def fd_store_max(self) -> int | None:
        """The service's ``FileDescriptorStoreMax=`` from ``$FDSTORE``, or None if unknown.

        systemd >= 254 sets ``FDSTORE`` when the store is enabled (its own
        ``fdstore_detected()`` reads it); older ones say nothing, and then
        the only way to know is to try.
        """
        return _decimal(self._fd_store)

    def store_fds(self, named: Sequence[tuple[str, int]], *, replace: bool = True) -> bool:
        """Keep duplicates of these fds in systemd's fd store, under their names.

        One ``FDSTORE=1`` + ``FDNAME=`` message per name, carrying every fd
        of that name (at most ``SCM_MAX_FD`` per message: above it
        ``sd_pid_notify_with_fds()`` fails with ``E2BIG``): sd_notify(3),
        "if multiple file descriptors are submitted at once, the specified
        name will be assigned to all of them. In order to assign different
        names to submitted file descriptors, submit them in separate
        invocations". With ``replace`` each name is first emptied with
        ``FDSTOREREMOVE=1``, as systemd's own ``notify_push_fd()``
        (src/shared/daemon-util.c) does, so that a name stands for what was
        stored last and nothing older. The manager removes duplicates of
        the same open file itself (``service_add_fd_store()``, ``same_fd()``).

        No ``FDPOLL=0``: the manager drops an fd on ``EPOLLHUP`` /
        ``EPOLLERR``, which a listening or unconnected socket never reports.

        Raises :class:`ValueError` for a name ``fdname_is_valid()``
        refuses (see :func:`fd_store_name`); we check before sending, since
        systemd ignores an invalid name (sd_notify(3)). Returns True if every message
        went out.
        """
        by_name: dict[str, list[int]] = {}
        for name, fd in named:
            if not fdname_is_valid(name):
                raise ValueError(f"invalid fd store name {name!r}")
            by_name.setdefault(name, []).append(fd)
        if not self.enabled:
            return False
        ok = True
        for name, fds in by_name.items():
            if replace:
                ok = self.remove_fds(name) and ok
            for start in range(0, len(fds), SCM_MAX_FD):
                chunk = fds[start : start + SCM_MAX_FD]
                ok = self._notify([("FDSTORE", "1"), ("FDNAME", name)], chunk) and ok
        return ok

    def barrier(self, timeout: float = 5.0) -> bool:
        """``BARRIER=1``: wait until the manager has handled every message sent before.

        ``sd_notify_barrier()`` (sd-daemon.c, systemd >= 246): the message
        carries the write end of a pipe, which the manager closes once it
        has processed everything before it; the read end then reports
        POLLHUP. Use it between ``FDSTOREREMOVE=1`` for a stale socket and
        binding its address anew, so that systemd's copy is closed first.
        False when disabled, when the send fails, or after ``timeout``
        seconds (an older manager keeps the fd until it stores or drops it).
        """
        if not self.enabled:
            return False
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                sent = self._notify([("BARRIER", "1")], [write_end])
            finally:
                os.close(write_end)
            if not sent:
                return False
            poller = select.poll()
            poller.register(read_end, 0)  # POLLHUP is always reported
            return bool(poller.poll(max(timeout, 0.0) * 1000))
        finally:
            os.close(read_end)

    def remove_fds(self, name: str) -> bool:
        """``FDSTOREREMOVE=1`` + ``FDNAME=``: close every fd of that name in the store.

        FILE_DESCRIPTOR_STORE.md: "it's a good idea to send such messages to
        the service manager during initialization of the service whenever
        an unrecognized fd is received".
        """
        if not fdname_is_valid(name):
            raise ValueError(f"invalid fd store name {name!r}")
        return self._notify([("FDSTOREREMOVE", "1"), ("FDNAME", name)])


# --------------------------------------------------------------------------- passed fds


@dataclass(frozen=True, slots=True)
class SystemdSockets:
    """The fds systemd passed at start: ``LISTEN_FDS`` fds from 3 on, with their names.

    ``numbers[i]`` is named ``names[i]``. Empty when the variables are not
    for us. ``problem`` says why something was ignored (for a warning).
    """

    numbers: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    problem: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], pid: int) -> SystemdSockets:
        """Read ``LISTEN_PID`` / ``LISTEN_FDS`` / ``LISTEN_FDNAMES`` as sd_listen_fds(3) does.

        ``sd_listen_fds()``: nothing unless ``LISTEN_PID`` is ``pid`` ("Is
        this for us?"); ``LISTEN_FDS`` fds from ``SD_LISTEN_FDS_START`` (3) on.
        ``sd_listen_fds_with_names()``: names split at ``:`` without
        coalescing empty ones; all ``unknown`` when ``LISTEN_FDNAMES`` is
        unset. Where systemd answers -EINVAL (a malformed count, or a name
        count that differs from the fd count) the fds are still open in
        this process: they are kept, named ``unknown`` so that nothing is
        adopted by a name that may be wrong, and ``problem`` says why.
        ``LISTEN_PIDFDID`` (systemd >= 257) is not checked: telling a pidfs
        inode from an anonymous one needs statfs(), which Python lacks;
        ``LISTEN_PID`` alone is what every systemd before 257 relies on.
        Pure: no fd is looked at.
        """
        listen_pid = environ.get("LISTEN_PID")
        if listen_pid is None or _pid(listen_pid) != pid:
            return cls()
        count_text = environ.get("LISTEN_FDS")
        if count_text is None:
            return cls()
        count = _decimal(count_text)
        if count is None or count == 0 or count > 2**31 - 1 - LISTEN_FDS_START:
            return cls(problem=f"LISTEN_FDS={count_text!r} is not a positive number; ignored")
        numbers = list(range(LISTEN_FDS_START, LISTEN_FDS_START + count))
        names_text = environ.get("LISTEN_FDNAMES")
        if names_text is None:
            return cls(numbers, [UNKNOWN_FD_NAME] * count)
        names = names_text.split(":")
        if len(names) != count:
            return cls(
                numbers,
                [UNKNOWN_FD_NAME] * count,
                problem=f"LISTEN_FDNAMES has {len(names)} names for {count} fds; names ignored",
            )
        return cls(numbers, names)

    def moved(self, inherited: InheritedFds) -> SystemdSockets:
        """The same fds and names, numbered as they are open now (InheritedFds.moved_up)."""
        moved = [inherited.fd_of(number) for number in self.numbers]
        return dataclasses.replace(
            self,
            numbers=[
                old if new is None else new for new, old in zip(moved, self.numbers, strict=True)
            ],
        )

    @property
    def by_name(self) -> dict[str, list[int]]:
        """Every name with its fd numbers (names need not be unique)."""
        result: dict[str, list[int]] = {}
        for number, name in zip(self.numbers, self.names, strict=True):
            result.setdefault(name, []).append(number)
        return result

    def names_of(self, numbers: Iterable[int]) -> list[str]:
        """The distinct names of these fd numbers, in fd order; numbers not passed are skipped.

        After :meth:`~fdsupervisor.binding.InheritedFds.close_unclaimed`,
        the names to send ``FDSTOREREMOVE=1`` for, so that systemd closes
        its copies of what no unit wants any more.
        """
        wanted = set(numbers)
        seen: dict[str, None] = {}
        for number, name in zip(self.numbers, self.names, strict=True):
            if number in wanted:
                seen.setdefault(name, None)
        return list(seen)


# --------------------------------------------------------------------------- fd store names


def fd_store_name(unit: str, socket_name: str) -> str | None:
    """``<unit>/<socket>``: the ``FDNAME=`` of a unit's socket in systemd's fd store.

    None when the two names together exceed ``FDNAME_MAX`` (each may be 255
    characters on its own): such a socket cannot be kept in the store and
    is bound anew at each start. See :data:`FD_STORE_SEPARATOR` for why
    ``/``.
    """
    name = f"{unit}{FD_STORE_SEPARATOR}{socket_name}"
    return name if len(name) <= FDNAME_MAX else None


def parse_fd_store_name(name: str) -> tuple[str, str] | None:
    """``web/http`` → ``("web", "http")``; None for any name not made by :func:`fd_store_name`."""
    unit, separator, socket_name = name.partition(FD_STORE_SEPARATOR)
    if not separator or not NAME_RE.fullmatch(unit) or not NAME_RE.fullmatch(socket_name):
        return None
    return unit, socket_name


def adoptable(sockets: SystemdSockets) -> dict[tuple[str, str], int]:
    """``(unit, socket)`` → fd number, for every fd the fd store handed back under our scheme.

    Should a name come back more than once (an older copy the manager did
    not recognise as the same file), the first fd wins; the others stay
    unclaimed, are closed, and :meth:`SystemdNotifier.store_fds` (which
    empties each name before storing) leaves one copy in the store.
    """
    result: dict[tuple[str, str], int] = {}
    for number, name in zip(sockets.numbers, sockets.names, strict=True):
        key = parse_fd_store_name(name)
        if key is not None:
            result.setdefault(key, number)
    return result


def stored_socket_mismatch(fd: int, spec: SocketSpec, base_dir: Path) -> str | None:
    """Why the stored socket ``fd`` no longer fits ``spec``, or None if it does.

    The unit file may have changed between the run that stored the socket
    and this one: a different kind, address or port means the stored
    socket is stale (close it, ``FDSTOREREMOVE`` it, bind anew). Compared:
    the kind, listening (for stream and seqpacket), and the address as
    the unit would bind it: inet host through ``getaddrinfo()`` as
    binding does (``AI_PASSIVE``), any port of ``port``..``to``, any port
    at all for port 0; unix paths against ``base_dir``, which must still
    hold a socket file there; abstract names with their ``tight`` length;
    vsock ports. Options that leave the address alone (backlog, buffer
    sizes, keep-alive, ...) are not compared: the stored socket keeps
    those it was bound with. A ``{type: fd}`` socket is never taken from
    the store (systemd passes it again through its ``.socket`` unit).
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        return f"fd {fd} is not a socket ({error.strerror})"
    try:
        return _mismatch(sock, spec, base_dir)
    finally:
        sock.detach()


_KINDS: Final = {
    socket.SOCK_STREAM: SocketKind.STREAM,
    socket.SOCK_DGRAM: SocketKind.DATAGRAM,
    socket.SOCK_SEQPACKET: SocketKind.SEQPACKET,
}


def _mismatch(sock: socket.socket, spec: SocketSpec, base_dir: Path) -> str | None:
    kind = _KINDS.get(sock.type)
    if kind is not spec.kind:
        actual = kind.value if kind is not None else f"type {int(sock.type)}"
        return f"it is a {actual} socket, the unit declares {spec.kind.value}"
    if spec.kind is not SocketKind.DATAGRAM and not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        return "it is not listening"
    try:
        local = sock.getsockname()
    except OSError as error:
        return f"its address cannot be read ({error.strerror})"
    address = spec.address
    match address:
        case FdAddress():
            return "the unit takes this socket from an inherited fd, not from the fd store"
        case InetAddress():
            return _inet_mismatch(sock, local, address, spec.kind)
        case UnixAddress(abstract=True):
            expected = unix_name(address)
            if sock.family != socket.AF_UNIX or bound_unix_name(local) != expected:
                return f"it is bound to {local!r}, the unit declares {expected!r}"
            return None
        case UnixAddress():
            path = base_dir.absolute() / address.path
            name = unix_name(resolved_address(address, base_dir))
            if sock.family != socket.AF_UNIX or bound_unix_name(local) != name:
                return f"it is bound to {local!r}, the unit declares {str(path)!r}"
            try:
                is_socket_file = stat.S_ISSOCK(os.stat(path).st_mode)
            except OSError:
                is_socket_file = False
            return None if is_socket_file else f"its socket file {path} is gone"
        case VsockAddress():
            if sock.family != _AF_VSOCK or not isinstance(local, tuple):
                return f"it is bound to {local!r}, not to a vsock address"
            if not vsock_matches(address, local[0], local[1]):
                return f"it is bound to vsock:{local[0]}:{local[1]}"
            return None
    return "unknown address type"  # pragma: no cover - the match is exhaustive


def _inet_mismatch(
    sock: socket.socket, local: object, address: InetAddress, kind: SocketKind
) -> str | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(local, tuple):
        return f"it is bound to {local!r}, not to an IP address"
    host, port = str(local[0]), int(local[1])
    flags = socket.AI_PASSIVE
    if address.numeric:
        flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    # The address is all that matters here: 0 (any type) for seqpacket,
    # which getaddrinfo() does not know for IP.
    socktype = {SocketKind.STREAM: socket.SOCK_STREAM, SocketKind.DATAGRAM: socket.SOCK_DGRAM}
    try:
        results = socket.getaddrinfo(
            address.host or None, address.port or None, 0, socktype.get(kind, 0), 0, flags
        )
    except (socket.gaierror, UnicodeError) as error:
        return f"{address.host or '*'}:{address.port} does not resolve ({error})"
    for family, _, _, _, sockaddr in results:
        if family != sock.family or not _same_ip(str(sockaddr[0]), host):
            continue
        first, last = port_range(address, int(sockaddr[1]))
        if first == 0 or first <= port <= last:
            return None
    return f"it is bound to {_label(host, port)}, the unit declares {address.host or '*'}:{address.port}"


def _same_ip(a: str, b: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(a.split("%")[0]) == ipaddress.ip_address(b.split("%")[0])
    return a == b


def _label(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- the whole store's names

RUNTIME_MARK: Final = "+"
"""Before a socket's name: a socket added at run time (``socket-add``), not one a unit file declares."""
STORED_MARK: Final = "="
"""Before a stored fd's name: a worker's ``FDSTORE=1`` fd (watched for hang-ups), or a ``getfd`` fd."""
UNPOLLED_MARK: Final = "~"
"""Before a worker's stored fd's name: stored with ``FDPOLL=0``, not watched for hang-ups."""

KeptKind = Literal["declared", "runtime", "stored", "monitor-socket", "monitor-fd"]


@dataclass(frozen=True, slots=True)
class KeptName:
    """What one ``FDNAME`` in systemd's fd store stands for (:func:`kept_name`).

    ``unit`` is None for the monitor's own entries; ``watch``: a worker's
    stored fd that is watched for hang-ups.
    """

    kind: KeptKind
    unit: str | None
    name: str
    watch: bool = False

    @property
    def owner(self) -> str:
        if self.unit is None:
            return MONITOR_OWNER
        return service_owner(self.unit) if self.kind == "stored" else unit_owner(self.unit)

    @property
    def fdname(self) -> str:
        """The ``FDNAME=``: ``UNIT/NAME`` with the kind's mark before the name (docs/systemd.md)."""
        mark = {
            "declared": "",
            "runtime": RUNTIME_MARK,
            "stored": STORED_MARK if self.watch else UNPOLLED_MARK,
            "monitor-socket": RUNTIME_MARK,
            "monitor-fd": STORED_MARK,
        }[self.kind]
        return f"{self.unit or ''}{FD_STORE_SEPARATOR}{mark}{self.name}"

    def describe(self) -> str:
        """For a log line: ``socket web/admin added at run time``."""
        what = {
            "declared": "socket",
            "runtime": "socket added at run time",
            "stored": "fd stored by the workers of",
            "monitor-socket": "socket added at run time",
            "monitor-fd": "fd handed in with getfd",
        }[self.kind]
        return f"{what} {self.unit or 'monitor'}: {self.name}"


def kept_name(fdname: str) -> KeptName | None:
    """``FDNAME=`` → what it stands for; None for a name not made by :attr:`KeptName.fdname`.

    Unit, socket and fd names match ``NAME_RE``, which allows none of the
    marks first, so a name has one reading only: ``web/http`` (declared),
    ``web/+extra`` (runtime), ``web/=state`` / ``web/~state`` (a worker's),
    ``/+sock`` and ``/=fd`` (the monitor's).
    """
    unit, separator, rest = fdname.partition(FD_STORE_SEPARATOR)
    if not separator or (unit and not NAME_RE.fullmatch(unit)):
        return None
    mark, name = (
        (rest[:1], rest[1:])
        if rest[:1] in (RUNTIME_MARK, STORED_MARK, UNPOLLED_MARK)
        else ("", rest)
    )
    if not NAME_RE.fullmatch(name):
        return None
    if not unit:
        kinds: dict[str, KeptKind] = {RUNTIME_MARK: "monitor-socket", STORED_MARK: "monitor-fd"}
        return KeptName(kinds[mark], None, name) if mark in kinds else None
    if mark == "":
        return KeptName("declared", unit, name)
    if mark == RUNTIME_MARK:
        return KeptName("runtime", unit, name)
    return KeptName("stored", unit, name, watch=mark == STORED_MARK)


# --------------------------------------------------------------------------- keeping the store


class FdStoreMessages(Protocol):
    """What :class:`SystemdFdStore` sends its messages through: a :class:`SystemdNotifier`."""

    @property
    def enabled(self) -> bool: ...

    @property
    def fd_store_max(self) -> int | None: ...

    @property
    def last_error(self) -> OSError | None: ...

    def store_fds(self, named: Sequence[tuple[str, int]], *, replace: bool = True) -> bool: ...

    def remove_fds(self, name: str) -> bool: ...

    def barrier(self, timeout: float = 5.0) -> bool: ...


class SystemdFdStore:
    """systemd's fd store kept in step with the supervisor's: every entry, by name (SPEC 8).

    A restart of the supervisor (``systemctl restart``, a crash) then keeps
    the whole store: systemd hands it back in ``LISTEN_FDS``
    (FILE_DESCRIPTOR_STORE.md); :meth:`take_back` adopts each unit-file
    socket that still fits its unit, :meth:`restore` everything else (sockets
    added at run time, the fds workers stored, the monitor's), and no
    connection is refused while the supervisor is gone. Each entry's
    ``FDNAME`` says what it is (:class:`KeptName`, docs/systemd.md), so that
    every message leaves systemd's store readable on its own: a crash
    between two of them loses nothing but, at most, the one name being
    changed. A ``{type: fd}`` socket is not kept: whoever passed it passes
    it again. Without a manager (``NOTIFY_SOCKET`` unset) nothing is sent
    and nothing is kept.

    ``handed`` is what systemd passed at start; ``store`` the supervisor's
    own store, which this class fills at :meth:`restore` and otherwise only
    reads but for the socket files at shutdown (:meth:`keep_socket_files`).
    """

    def __init__(
        self, messages: FdStoreMessages, handed: SystemdSockets, store: FdStore, *, log: Any
    ) -> None:
        self._messages = messages
        self._handed = handed
        self._handed_back = adoptable(handed)  # (unit, socket) → fd
        self._store = store
        self._log = log
        # FDNAME → the (st_dev, st_ino) of each fd systemd's store holds under it (as far
        # as the last sync knows); empty until the first sync, which stores everything
        self._kept: dict[str, list[tuple[int, int]]] = {}
        self._synced = False
        self._units: dict[str, Unit] = {}  # as the last sync saw them
        self._not_kept: set[str] = set()  # names too long, warned about once

    @property
    def kept(self) -> frozenset[str]:
        """The names systemd's fd store holds now (as far as its last sync knows)."""
        return frozenset(self._kept)

    def take_back(
        self, unit: Unit, spec: SocketSpec, inherited: InheritedFds
    ) -> BoundSocket | None:
        """The socket systemd's fd store handed back for this unit socket, if it still fits.

        A socket that no longer fits (the unit file changed its address or
        kind meanwhile) is closed, and systemd's copy with it, before the
        caller binds the address anew: ``BARRIER=1`` waits until the manager
        has closed its copy, which would otherwise hold the address.
        """
        if isinstance(spec.address, FdAddress | FifoAddress):  # a FIFO is not kept (sync)
            return None
        fd = self._handed_back.pop((unit.name, spec.name), None)
        if fd is None:
            return None
        name = fd_store_name(unit.name, spec.name)
        inherited.claim(fd, spec.name)
        reason = stored_socket_mismatch(fd, spec, unit.base_dir)
        if reason is None:
            sock = socket.socket(fileno=fd)
            try:
                bound = adopt_socket(sock, spec, fd_label=name)
            except BindError as exc:
                sock.detach()
                reason = str(exc)
            else:
                self._log.info("socket_taken_back", unit=unit.name, socket=spec.name, fd=fd)
                return bound
        self._log.warning("stored_socket_dropped", unit=unit.name, socket=spec.name, reason=reason)
        os.close(fd)
        if name is not None:
            self._messages.remove_fds(name)
            self._messages.barrier()  # systemd's copy is closed before we bind the address
        return None

    def restore(self, units: Iterable[Unit], inherited: InheritedFds) -> None:
        """Take back every handed entry that is not a unit-file socket; drop what cannot be.

        Before the unit sockets are bound: sockets added at run time go back
        to their unit (its next workers get them), fds its workers stored go
        back to its service (watched for hang-ups again if they were), the
        monitor's entries to the monitor. An entry of a unit that is gone, a
        socket the unit file no longer declares, or a runtime socket whose
        name the unit file now declares itself, is closed with a warning
        naming it, and removed from systemd's store (then ``BARRIER=1``:
        systemd's copy of a socket no longer holds its address when the
        unit's sockets are bound).
        """
        by_name = {unit.name: unit for unit in units}
        dropped: dict[str, None] = {}
        for number, fdname in zip(self._handed.numbers, self._handed.names, strict=True):
            kept = kept_name(fdname)
            if kept is None:
                continue  # not ours: a .socket unit's, claimed or closed as inherited
            unit = by_name.get(kept.unit) if kept.unit is not None else None
            if kept.unit is not None and unit is None:
                reason: str | None = f"its unit {kept.unit} is gone"
            elif kept.kind == "declared":
                assert unit is not None
                if kept.name in unit.socket_names:
                    continue  # take_back()'s, as the unit binds its sockets
                reason = f"unit {kept.unit} no longer declares socket {kept.name}"
            elif kept.kind == "runtime" and unit is not None and kept.name in unit.socket_names:
                reason = f"unit {kept.unit} now declares a socket {kept.name} itself"
            else:
                inherited.claim(number, kept.name)
                reason = self._restore_one(kept, number, unit)
                if reason is None:
                    continue
                number = -1  # closed already
            if number >= 0:
                inherited.claim(number, kept.name)
                os.close(number)
            self._log.warning(
                "stored_entry_dropped",
                fdname=fdname,
                owner=kept.owner,
                name=kept.name,
                what=kept.describe(),
                reason=reason,
            )
            dropped[fdname] = None
        for fdname in dropped:
            self._messages.remove_fds(fdname)
        if dropped:
            self._messages.barrier()

    def _restore_one(self, kept: KeptName, number: int, unit: Unit | None) -> str | None:
        """Store one handed entry again; why not (the fd closed by then), or None."""
        resource: BoundSocket | RawFd
        if kept.kind in ("runtime", "monitor-socket"):
            try:
                sock = socket.socket(fileno=number)
            except OSError as error:
                os.close(number)
                return f"it is not a socket ({error.strerror})"
            kind = _KINDS.get(sock.type)
            if kind is None:
                sock.close()
                return f"it is a socket of type {int(sock.type)}"
            spec = SocketSpec(name=kept.name, address=FdAddress(str(number)), kind=kind)
            try:
                resource = adopt_socket(sock, spec, fd_label=kept.fdname)
            except BindError as exc:
                sock.close()
                return exc.message
        else:
            resource = RawFd(number)
            if unit is not None and kept.kind == "stored":
                limit = unit.service.fd_store_max
                if len(self._store.owned_by(kept.owner)) >= limit:
                    resource.close()
                    return f"the unit's fd-store-max is {limit}"
        try:
            self._store.add(kept.owner, kept.name, resource, watch=kept.watch)
        except StoreError as exc:  # add() closed it
            return str(exc)
        self._log.info(
            "stored_entry_restored", owner=kept.owner, name=kept.name, fdname=kept.fdname, fd=number
        )
        return None

    def drop_unclaimed(self, closed: Iterable[int]) -> None:
        """Inherited fds no unit claimed were closed: systemd closes its copies too."""
        for name in self._handed.names_of(closed):
            self._messages.remove_fds(name)

    def _kept_name_of(self, entry: Entry) -> KeptName | None:
        """How ``entry`` is kept in systemd's store; None: it is not (a ``{type: fd}`` socket)."""
        kind = owner_kind(entry.owner)
        if kind == "monitor":
            socket_kind: KeptKind = "monitor-socket"
            return KeptName(
                socket_kind if isinstance(entry.resource, BoundSocket) else "monitor-fd",
                None,
                entry.name,
            )
        if kind == "service":  # each fd with its own FDPOLL: a name may have both marks
            watched = self._store.watches(entry)
            return KeptName("stored", owner_service(entry.owner), entry.name, watch=watched)
        unit_name = owner_unit(entry.owner)
        assert unit_name is not None
        unit = self._units.get(unit_name)
        if unit is None:
            return None  # a unit on its way out (a reload): its sockets go with it
        spec = next((s for s in unit.sockets if s.name == entry.name), None)
        if spec is None:
            return KeptName("runtime", unit_name, entry.name)
        if isinstance(spec.address, FdAddress | FifoAddress):
            # passed again by whoever passed it (a .socket unit); a FIFO is made again
            return None
        return KeptName("declared", unit_name, entry.name)

    def changed(self, units: Iterable[Unit], entry: Entry | None = None) -> None:
        """The store changed (``FD_STORED`` / ``FD_CLOSED``): sync, once syncing has begun.

        Not before the first :meth:`sync` (the end of start-up, or of an
        upgrade's take-over): what is restored then is in systemd's store already.
        With ``entry`` (the one stored or closed), only its name is synced: a sync
        of the whole store fstat()s every fd in it, 10,000 of them at 10,000 units,
        for each getfd or FDSTORE=1 (docs/performance.md).
        """
        if not self._synced:
            return
        if entry is None:
            self.sync(units)
            return
        if not self._messages.enabled:
            return
        # A stored fd's name carries its FDPOLL mark, which a closed entry (its fd
        # gone) no longer tells: both marks are synced.
        if owner_kind(entry.owner) == "service":
            kept: KeptName | None = KeptName("stored", owner_service(entry.owner), entry.name)
        else:
            kept = self._kept_name_of(entry)
        if kept is None:
            return
        names = {kept.fdname, dataclasses.replace(kept, watch=not kept.watch).fdname}
        wanted = self._wanted(self._store.owned_by(entry.owner))
        self._send({name: fds for name, fds in wanted.items() if name in names}, names)

    def sync(self, units: Iterable[Unit]) -> None:
        """Make systemd's fd store hold exactly what the supervisor's store holds.

        Only what changed since the last sync is sent: a new name is stored,
        fds added to a name are stored beside the others (systemd keeps them
        all), and a name that lost an fd is removed and stored again (systemd
        removes only whole names). The first sync stores everything without
        removing first: systemd keeps one copy of an fd it holds already
        (``same_fd()``), so a restart leaves nothing missing for a moment.
        """
        if not self._messages.enabled:
            return  # not under systemd: nothing is kept, socket files go at shutdown
        self._units = {unit.name: unit for unit in units}
        self._send(self._wanted(self._store), None)

    def _wanted(self, entries: Iterable[Entry]) -> dict[str, list[int]]:
        """FD_STORE name → the fds of ``entries`` kept under it, in store order."""
        wanted: dict[str, list[int]] = {}
        for entry in entries:
            kept = self._kept_name_of(entry)
            if kept is None:
                continue
            name = kept.fdname
            if len(name) > FDNAME_MAX:
                if name not in self._not_kept:
                    self._not_kept.add(name)
                    self._log.warning(
                        "fd_not_kept",
                        owner=entry.owner,
                        name=entry.name,
                        reason="its fd store name would exceed 255 characters",
                    )
                continue
            wanted.setdefault(name, []).append(entry.fd)
        return wanted

    def _send(self, wanted: dict[str, list[int]], names: set[str] | None) -> None:
        """Tell systemd what changed among ``names`` (None: every name) to hold ``wanted``."""
        now = {name: [_identity(fd) for fd in fds] for name, fds in wanted.items()}
        before_names = self._kept.keys() if names is None else self._kept.keys() & names
        for name in sorted(before_names - wanted.keys()):
            self._messages.remove_fds(name)
        limit = self._messages.fd_store_max
        total = sum(len(fds) for fds in wanted.values())
        if names is not None:
            total += sum(len(fds) for name, fds in self._kept.items() if name not in names)
        if limit is not None and total > limit:
            self._log.warning("fd_store_full", fds=total, file_descriptor_store_max=limit)
        added: list[tuple[str, int]] = []  # beside what systemd holds under the name
        replaced: list[tuple[str, int]] = []  # the name emptied first
        for name in sorted(wanted):
            before, fds = self._kept.get(name), wanted[name]
            if before == now[name]:
                continue
            if before is None or set(before) <= set(now[name]):
                new = zip(fds, now[name], strict=True)
                added += [(name, fd) for fd, identity in new if identity not in (before or ())]
            else:
                replaced += [(name, fd) for fd in fds]
        ok = True
        if added:
            ok = self._messages.store_fds(added, replace=False)
        if replaced:
            ok = self._messages.store_fds(replaced, replace=True) and ok
        if not ok:
            self._log.warning("fd_store_failed", error=str(self._messages.last_error))
        if names is None:
            self._kept = now
        else:
            for name in names:
                self._kept.pop(name, None)
            self._kept.update(now)
        self._synced = True

    def keep_socket_files(self) -> None:
        """Sockets systemd keeps for the next start keep their files (RemoveOnStop=no).

        Called at shutdown, before the store is closed: a socket file
        removed now would leave systemd holding a socket nobody can reach.
        """
        for entry in self._store:
            if not isinstance(entry.resource, BoundSocket):
                continue
            kept = self._kept_name_of(entry)
            if kept is not None and kept.fdname in self._kept:
                entry.resource = dataclasses.replace(
                    entry.resource, created_path=None, created_inode=None
                )


def _identity(fd: int) -> tuple[int, int]:
    """Which open file an fd is, as far as the store's bookkeeping needs: its device and inode."""
    info = os.fstat(fd)
    return info.st_dev, info.st_ino
