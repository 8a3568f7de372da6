"""Binding: a validated :class:`~fdsupervisor.units.SocketSpec` becomes a listening socket.

Third step of the flow (unit file → validated model → **bound sockets** → fd
store → spawn plan). :func:`bind_socket` creates, configures and binds one
socket the way QEMU's ``socket_listen()`` (util/qemu-sockets.c) does for the
address and the way systemd's ``socket_address_listen()`` does for the
``systemd.socket`` options; or, for a decimal ``fd`` address, adopts a socket
the supervisor inherited (:class:`InheritedFds`, the seed rule of SPEC §2).
:func:`adopt_socket` does the same checks for a socket a monitor client
handed in, and :func:`describe_socket` reads back what any fd is.

Every socket is non-inheritable (only the spawn step makes chosen fds
inheritable, in the child) and blocking: the open file description is shared
with the workers, who expect blocking sockets as systemd hands them. No error
path leaks an fd: whatever was opened is closed before :class:`BindError`
is raised.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, assert_never

from .addresses import FdAddress, FifoAddress, InetAddress, UnixAddress, VsockAddress
from .errors import BindError
from .units import SocketKind, SocketSpec

Family = Literal["inet", "inet6", "unix", "vsock", "other"]
Kind = Literal["stream", "datagram", "seqpacket", "other"]

_SOCKET_TYPES: dict[SocketKind, int] = {
    SocketKind.STREAM: socket.SOCK_STREAM,
    SocketKind.DATAGRAM: socket.SOCK_DGRAM,
    SocketKind.SEQPACKET: socket.SOCK_SEQPACKET,
}
_KIND_NAMES: dict[int, Kind] = {
    socket.SOCK_STREAM: "stream",
    socket.SOCK_DGRAM: "datagram",
    socket.SOCK_SEQPACKET: "seqpacket",
}
_FAMILY_NAMES: dict[int, Family] = {
    socket.AF_INET: "inet",
    socket.AF_INET6: "inet6",
    socket.AF_UNIX: "unix",
}
_AF_VSOCK: int | None = getattr(socket, "AF_VSOCK", None)
if _AF_VSOCK is not None:
    _FAMILY_NAMES[_AF_VSOCK] = "vsock"

# <linux/in.h>; the socket module does not export it. systemd's
# socket_set_freebind() uses it for IPv4; Linux honours it on IPv6 sockets too.
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)

# sizeof(struct sockaddr_un.sun_path) on Linux.
_SUN_PATH_MAX = 108

# systemd.socket(5): "SocketMode= ... Defaults to 0666." A unit that gives no
# mode gets a socket file anyone may connect to, whatever the supervisor's umask.
DEFAULT_SOCKET_MODE = 0o666

_MAX_PORT = 65535
# listen(2): a backlog above net.core.somaxconn is silently truncated; clamp
# what a C int cannot hold the same way instead of failing on it.
_MAX_BACKLOG = 2**31 - 1
# uid_t and gid_t are 32 bits; all ones means "unchanged" to chown(2).
_MAX_ID = 2**32 - 2


@dataclass(frozen=True, slots=True)
class SocketInfo:
    """What an fd is, read from the fd itself (``query-fds`` reports these fields)."""

    family: Family
    kind: Kind
    listening: bool
    address: str  # "127.0.0.1:8080", "[::1]:8080", "unix:/path", "@name", "vsock:CID:PORT" or ""


def _is_socket(number: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(number).st_mode)
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class InheritedFds:
    """The fds the supervisor had open at start-up, other than 0, 1 and 2.

    These are the only numbers a decimal ``fd`` address may name (SPEC §2):
    sockets handed over by systemd (``LISTEN_FDS``) or by any parent that
    deliberately leaked them. Each backs at most one socket; whatever no unit
    claims is closed with :meth:`close_unclaimed`, as systemd's
    ``sd_listen_fds()`` users are expected to close what they do not use.
    """

    numbers: frozenset[int]  # the fds as they are open now (after :meth:`moved_up`)
    # fd now -> the number it was inherited as, for the fds :meth:`moved_up` moved:
    # the number a unit file names and every message says.
    given: dict[int, int] = field(default_factory=dict, compare=False)
    _claims: dict[int, str] = field(default_factory=dict, init=False, repr=False, compare=False)
    _closed: set[int] = field(default_factory=set, init=False, repr=False, compare=False)
    _moved_to: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._moved_to.update((number, fd) for fd, number in self.given.items())

    @classmethod
    def scan(cls) -> InheritedFds:
        """Read ``/proc/self/fd``; call this before the supervisor opens anything."""
        listed = {int(entry) for entry in os.listdir("/proc/self/fd")}
        # Listing the directory opened an fd of its own, closed again by now:
        # keep only the numbers that are still open.
        return cls(frozenset(fd for fd in listed if fd > 2 and _fd_is_open(fd)))

    def moved_up(self) -> InheritedFds:
        """The same fds moved above the highest of them, so that the numbers they held are free.

        The spawn slots (spawn_slots.py) must be low in the table for a start to
        copy none of it, and after ``systemctl restart`` systemd passes the whole
        store back from fd 3 on: 10,000 fds at 10,000 units. Each fd keeps the
        number it was inherited as in :attr:`given` (:meth:`fd_of` finds it by
        that number). Where no fd is left to move one into, the rest stay where
        they are: only slower starts.
        """
        if not self.numbers:
            return self
        above = max(self.numbers) + 1
        moved: dict[int, int] = {}
        for number in sorted(self.numbers):
            try:
                # F_DUPFD: not close-on-exec, as the fd was inherited; adoption sets it.
                moved[fcntl.fcntl(number, fcntl.F_DUPFD, above)] = number
            except OSError:
                break
            os.close(number)
        kept = self.numbers - set(moved.values())
        return InheritedFds(frozenset(kept | moved.keys()), {**moved})

    def fd_of(self, given: int) -> int | None:
        """The fd now open for the number ``given`` was inherited as; None: not inherited."""
        if given in self._moved_to:
            return self._moved_to[given]
        return given if given in self.numbers and given not in self.given else None

    def number_of(self, fd: int) -> int:
        """The number ``fd`` was inherited as (what a unit file names, what messages say)."""
        return self.given.get(fd, fd)

    def claim(self, number: int, socket_name: str) -> int:
        """Mark ``number`` as backing ``socket_name``; :class:`BindError` if it cannot."""
        self.check_claim(number, socket_name)
        self._claims[number] = socket_name
        return number

    def unclaimed(self) -> list[int]:
        """The inherited fds that no socket has claimed and that are still open."""
        return sorted(self.numbers - self._claims.keys() - self._closed)

    def close_unclaimed(self, sockets: set[int] | None = None) -> list[int]:
        """Close every unclaimed fd; returns their numbers so the caller can warn.

        ``sockets``, when given, gets the numbers of those that were sockets
        (looked at just before the close): the ones that look deliberately
        passed, worth a warning, where a shell's stray fd is not.
        """
        closed = self.unclaimed()
        for number in closed:
            if sockets is not None and _is_socket(number):
                sockets.add(number)
            with contextlib.suppress(OSError):
                os.close(number)
            self._closed.add(number)
        return closed

    def check_claim(self, number: int, socket_name: str) -> None:
        """Raise the :class:`BindError` that :meth:`claim` would raise, claiming nothing.

        ``number`` is the fd as it is open now; messages name it as inherited.
        """
        label = self.number_of(number)
        if number not in self.numbers:
            raise BindError(
                socket_name,
                f"File descriptor '{label}' was not inherited by the supervisor "
                "(only fds open when it started may be named by number)",
            )
        if number in self._closed:
            raise BindError(socket_name, f"File descriptor '{label}' was already closed as unused")
        owner = self._claims.get(number)
        if owner is not None:
            raise BindError(
                socket_name,
                f"File descriptor '{label}' already backs socket '{owner}' "
                "(each inherited fd backs at most one socket)",
            )


class FifoFile:
    """The open end of a ``kind: fifo`` (a named pipe, not a socket): what a BoundSocket holds.

    Only what the supervisor does with any listening fd: watch it, pass it on,
    close it. Code that accepts or listens asks ``isinstance(sock, socket.socket)``.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def setblocking(self, flag: bool) -> None:
        os.set_blocking(self._fd, flag)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def wrap_listening_fd(fd: int, kind: SocketKind | str) -> socket.socket | FifoFile:
    """A handed-over fd (an upgrade's) as its owner: a socket, or the FIFO of a ``kind: fifo``."""
    return FifoFile(fd) if kind == SocketKind.FIFO else socket.socket(fileno=fd)


@dataclass(frozen=True, slots=True)
class BoundSocket:
    """Owns exactly one socket (or FIFO), and the file the supervisor created for it."""

    name: str
    spec: SocketSpec
    sock: socket.socket | FifoFile
    created_path: Path | None = None
    adopted: bool = False
    # (st_dev, st_ino) of created_path right after bind(): close() removes
    # the file only while it still is that file.
    created_inode: tuple[int, int] | None = field(default=None, repr=False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Close the socket and remove the socket file it created, if still there.

        The file goes first: no client finds a path that refuses it, and
        while the socket is open it pins its inode, so no other file can have
        the same (st_dev, st_ino) when the two are compared.
        A file someone else has put at the path since is left alone (systemd's
        ``RemoveOnStop=`` and QEMU's ``socket_listen_cleanup()`` unlink blindly).
        """
        if self.created_path is not None and self.created_inode is not None:
            unlink_if_same(self.created_path, self.created_inode)
        self.sock.close()


def bind_socket(spec: SocketSpec, *, base_dir: Path, inherited: InheritedFds) -> BoundSocket:
    """Bind ``spec`` (or adopt the inherited fd it names) and return its owner.

    Raises :class:`BindError` naming the socket, the address and the OS error;
    nothing opened on the way stays open, no file created on the way stays.
    """
    address = spec.address
    match address:
        case InetAddress():
            return _bind_inet(spec, address)
        case UnixAddress(abstract=True):
            return _bind_unix_abstract(spec, address)
        case UnixAddress():
            return _bind_unix_path(spec, address, base_dir)
        case VsockAddress():
            return _bind_vsock(spec, address)
        case FdAddress():
            return _adopt_inherited(spec, address, inherited)
        case FifoAddress():
            return _make_fifo(spec, address, base_dir)
        case _:
            assert_never(address)


def adopt_socket(
    sock: socket.socket, spec: SocketSpec, *, fd_label: str | None = None
) -> BoundSocket:
    """Adopt a socket a monitor client handed in (a named ``fd`` in ``socket-add``).

    The same kind and listening checks as for an inherited fd, with messages
    naming the fd by ``fd_label``: by default the name in ``spec.address``.
    On success the returned :class:`BoundSocket` owns ``sock``; on
    :class:`BindError` the caller still does.
    """
    label = fd_label
    if label is None:
        label = spec.address.value if isinstance(spec.address, FdAddress) else str(sock.fileno())
    _check_adoptable(sock, spec, label)
    sock.set_inheritable(False)
    return BoundSocket(spec.name, spec, sock, adopted=True)


def describe_socket(fd: int) -> SocketInfo:
    """Family, kind, listening state and local address of ``fd``, without owning it."""
    try:
        # socket(fileno=) reads SO_DOMAIN and SO_TYPE itself; detach() below
        # hands the fd back untouched.
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError):
        return SocketInfo("other", "other", listening=False, address=_fifo_address(fd))
    try:
        family = _FAMILY_NAMES.get(sock.family, "other")
        return SocketInfo(
            family=family,
            kind=_KIND_NAMES.get(sock.type, "other"),
            listening=_is_listening(sock),
            address=_local_address(sock, family),
        )
    finally:
        sock.detach()


# --- inet ------------------------------------------------------------------


def check_resolvable(spec: SocketSpec) -> None:
    """Raise the :class:`BindError` that binding an inet ``spec`` would raise at resolution.

    For ``check``: whether the host and port resolve (``localhost:nosuchservice``,
    ``999.1.1.1:80`` do not) is known without binding anything.
    """
    address = spec.address
    if isinstance(address, InetAddress):
        _resolve_inet(spec, address, _inet_family(spec, address))


def _bind_inet(spec: SocketSpec, address: InetAddress) -> BoundSocket:
    """QEMU's inet_listen_saddr(): every getaddrinfo() result, every port up to ``to``."""
    family = _inet_family(spec, address)
    if address.to is not None and address.to > _MAX_PORT:
        raise BindError(
            spec.name, f"port range {address.port}-{address.to} goes beyond {_MAX_PORT}"
        )
    results = _resolve_inet(spec, address, family)
    last_error: OSError | None = None
    last_label = _inet_label(address.host, address.port)
    for ai_family, ai_type, ai_proto, _, ai_addr in results:
        for port in _port_range(int(ai_addr[1]), address.to):
            target = (ai_addr[0], port, *ai_addr[2:])
            last_label = _inet_sockaddr_label(ai_family, target)
            try:
                sock = socket.socket(ai_family, ai_type, ai_proto)
            except OSError as error:
                # QEMU skips a result whose socket cannot be created at all
                # (AF_INET6 without IPv6 in the kernel) and tries the next one.
                last_error = error
                break
            in_use = _listen_inet_port(sock, spec, address, target, last_label)
            if in_use is None:
                return BoundSocket(spec.name, spec, sock)
            last_error = in_use  # QEMU: this port is in use, try the next one
    raise BindError(spec.name, _inet_failure(address, last_label, last_error))


def _listen_inet_port(
    sock: socket.socket,
    spec: SocketSpec,
    address: InetAddress,
    target: tuple[Any, ...],
    label: str,
) -> OSError | None:
    """Configure, bind and listen; None when done, the error when the port is in use.

    On any failure ``sock`` is closed (a socket that failed listen() stays
    bound, so QEMU, too, takes a new one for the next port).
    """
    try:
        _configure_inet(sock, spec, address, label)
        _bind_inet_sockaddr(sock, address, target)
        _listen(sock, spec)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            return error
        raise BindError(spec.name, f"cannot bind {label}: {error}") from error
    except BaseException:
        sock.close()
        raise
    return None


def _inet_family(spec: SocketSpec, address: InetAddress) -> int:
    """QEMU's inet_ai_family_from_address(): which results to ask getaddrinfo() for.

    ipv4 ipv6 → family: -,- any; -,f inet; -,t inet6; f,- inet6; f,f error;
    f,t inet6; t,- inet; t,f inet; t,t inet6 for an empty host, else any.
    """
    ipv4, ipv6 = address.ipv4, address.ipv6
    if ipv4 is False and ipv6 is False:
        raise BindError(spec.name, "Cannot disable IPv4 and IPv6 at same time")
    if ipv4 and ipv6:
        return socket.AF_INET6 if not address.host else socket.AF_UNSPEC
    if ipv6 or ipv4 is False:
        return socket.AF_INET6
    if ipv4 or ipv6 is False:
        return socket.AF_INET
    return socket.AF_UNSPEC


def _inet_v6only(address: InetAddress) -> bool:
    """QEMU's try_bind(): dual-stack only with neither flag given, or with both true."""
    neither = address.ipv4 is None and address.ipv6 is None
    both = bool(address.ipv4) and bool(address.ipv6)
    return not (neither or both)


def _resolve_inet(spec: SocketSpec, address: InetAddress, family: int) -> list[tuple[Any, ...]]:
    # QEMU: AI_PASSIVE so that an empty host means every address;
    # numeric=true adds AI_NUMERICHOST | AI_NUMERICSERV (no DNS, no services).
    flags = socket.AI_PASSIVE
    if address.numeric:
        flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    try:
        return list(
            socket.getaddrinfo(
                address.host or None,
                address.port or None,
                family,
                _SOCKET_TYPES[spec.kind],
                0,
                flags,
            )
        )
    except (socket.gaierror, UnicodeError) as error:
        reason = error.strerror if isinstance(error, socket.gaierror) else str(error)
        raise BindError(
            spec.name,
            f"address resolution failed for {_inet_label(address.host, address.port)}: {reason}",
        ) from error


def _port_range(first: int, to: int | None) -> range:
    return range(first, (to if to is not None else first) + 1)


def _configure_inet(
    sock: socket.socket, spec: SocketSpec, address: InetAddress, label: str
) -> None:
    _configure_common(sock, spec, label)
    if spec.kind is SocketKind.STREAM:
        # QEMU's socket_set_fast_reuse() and systemd: a restarted supervisor
        # binds again while old connections sit in TIME_WAIT. Not for
        # datagrams: there Linux would let two sockets share a port silently.
        _set_option(sock, spec, label, socket.SOL_SOCKET, socket.SO_REUSEADDR, "SO_REUSEADDR")
    if spec.reuse_port:  # systemd.socket ReusePort=
        _set_option(sock, spec, label, socket.SOL_SOCKET, socket.SO_REUSEPORT, "SO_REUSEPORT")
    if spec.free_bind:  # systemd.socket FreeBind=
        _set_option(sock, spec, label, socket.IPPROTO_IP, _IP_FREEBIND, "IP_FREEBIND")
    if spec.no_delay and spec.kind is SocketKind.STREAM:  # systemd.socket NoDelay=
        _set_option(sock, spec, label, socket.IPPROTO_TCP, socket.TCP_NODELAY, "TCP_NODELAY")
    if address.keep_alive and not spec.keep_alive:  # QEMU's keep-alive member
        _set_option(sock, spec, label, socket.SOL_SOCKET, socket.SO_KEEPALIVE, "SO_KEEPALIVE")
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(_inet_v6only(address)))


def _bind_inet_sockaddr(sock: socket.socket, address: InetAddress, target: tuple[Any, ...]) -> None:
    try:
        sock.bind(target)
    except OSError as error:
        # QEMU's try_bind(): a dual-stack bind that finds the IPv4 port taken
        # retries IPv6-only on the same port.
        dual_stack = sock.family == socket.AF_INET6 and not _inet_v6only(address)
        if not (dual_stack and error.errno == errno.EADDRINUSE):
            raise
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(target)


def _inet_failure(address: InetAddress, label: str, error: OSError | None) -> str:
    if error is None:
        return (
            f"cannot bind {_inet_label(address.host, address.port)}: "
            "no address or port to try (is 'to' below the port?)"
        )
    if error.errno != errno.EADDRINUSE:
        return f"cannot create a socket for {label}: {error}"
    if address.to is not None:
        return f"cannot bind {label}: no free port up to {address.to}: {error}"
    return f"cannot bind {label}: {error}"


def _inet_label(host: str, port: str | int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _inet_sockaddr_label(family: int, sockaddr: tuple[Any, ...]) -> str:
    host, port = str(sockaddr[0]), int(sockaddr[1])
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


# --- unix ------------------------------------------------------------------


def _bind_unix_path(spec: SocketSpec, address: UnixAddress, base_dir: Path) -> BoundSocket:
    path = base_dir.absolute() / address.path  # an absolute address.path wins
    label = f"unix:{path}"
    owner = _resolve_owner(spec)
    _make_parents(spec, path.parent)
    _remove_stale_socket_file(spec, path, label)
    sock = _new_socket(spec, socket.AF_UNIX, label)
    try:
        _configure_common(sock, spec, label)
        _bind(sock, spec, os.fsencode(path), label)
        bound = BoundSocket(
            spec.name, spec, sock, created_path=path, created_inode=_inode(spec, path, label)
        )
    except BaseException:
        sock.close()
        raise
    try:
        _apply_file_attributes(spec, path, owner, label, bound.created_inode)
        _listen_or_fail(sock, spec, label)
    except BaseException:
        bound.close()
        raise
    return bound


def _bind_unix_abstract(spec: SocketSpec, address: UnixAddress) -> BoundSocket:
    name = os.fsencode(address.path)
    label = f"@{address.path}"
    sockaddr = b"\0" + name
    if len(sockaddr) > _SUN_PATH_MAX:
        raise BindError(
            spec.name, f"cannot bind {label}: the name is longer than {_SUN_PATH_MAX - 1} bytes"
        )
    if not address.tight:
        # QEMU's unix_listen_saddr(): without ``tight`` the address length is
        # the whole sun_path, the name padded with NULs (how other programs,
        # e.g. socat's unix-tightsocklen=0, spell the same name).
        sockaddr = sockaddr.ljust(_SUN_PATH_MAX, b"\0")
    sock = _new_socket(spec, socket.AF_UNIX, label)
    try:
        _configure_common(sock, spec, label)
        _bind(sock, spec, sockaddr, label)
        _listen_or_fail(sock, spec, label)
    except BaseException:
        sock.close()
        raise
    return BoundSocket(spec.name, spec, sock)


def _resolve_owner(spec: SocketSpec) -> tuple[int, int]:
    """``user``/``group`` as ids (-1: leave as is); names through pwd/grp, numbers as given."""
    uid = gid = -1
    if spec.user is not None:
        uid = _lookup_id(spec, "user", spec.user, lambda name: pwd.getpwnam(name).pw_uid)
    if spec.group is not None:
        gid = _lookup_id(spec, "group", spec.group, lambda name: grp.getgrnam(name).gr_gid)
    return uid, gid


def _lookup_id(spec: SocketSpec, what: str, value: str, lookup: Callable[[str], int]) -> int:
    if value.isdecimal():
        if int(value) > _MAX_ID:
            raise BindError(spec.name, f"{what} id {value} is out of range (at most {_MAX_ID})")
        return int(value)
    try:
        return lookup(value)
    except KeyError:
        raise BindError(
            spec.name, f"unknown {what} '{value}' for the socket file (no such {what} here)"
        ) from None


def _make_parents(spec: SocketSpec, directory: Path) -> None:
    """Create missing parents with exactly ``directory_mode`` (systemd's mkdir_parents_label)."""
    missing: list[Path] = []
    while not os.path.lexists(directory) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for new_directory in reversed(missing):
        try:
            os.mkdir(new_directory, spec.directory_mode)
            # mkdir() masked the mode with the umask; the unit's mode is what counts,
            # set on the directory we made, never through a symlink put there since.
            _chmod_exactly(new_directory, spec.directory_mode, stat.S_ISDIR)
        except FileExistsError:
            continue  # created meanwhile by someone else: not ours to chmod
        except OSError as error:
            raise BindError(
                spec.name, f"cannot create directory {new_directory}: {error}"
            ) from error


def _remove_stale_socket_file(spec: SocketSpec, path: Path, label: str) -> None:
    remove_stale_socket_file(path, spec.kind, spec.name, f"cannot bind {label}: ")


def remove_stale_socket_file(path: Path, kind: SocketKind, owner: str, prefix: str = "") -> None:
    """Make room at ``path``: remove a socket file nobody listens on, refuse anything else.

    The one implementation, for unit sockets, the monitor and the notify
    socket; errors are :class:`BindError` for ``owner``, each text after ``prefix``.
    QEMU unlinks whatever is at the path and systemd unlinks on EADDRINUSE;
    both can delete a live socket or a file that is not theirs. Here only a
    socket that refuses connections (ECONNREFUSED: its listener is gone) goes.
    The final component is never followed (lstat), so a symlink is refused.
    """
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as error:
        raise BindError(owner, f"{prefix}cannot inspect {path}: {error}") from error
    if not stat.S_ISSOCK(before.st_mode):
        raise BindError(
            owner,
            f"{prefix}{path} exists and is {_file_kind(before.st_mode)}, "
            "not a socket; it is left alone: remove it or choose another path",
        )
    if _socket_file_is_live(path, kind, owner, prefix):
        raise BindError(
            owner,
            f"{prefix}{path} is in use by a listening socket "
            "(is another supervisor or service running?)",
        )
    if not unlink_if_same(path, (before.st_dev, before.st_ino)):
        raise BindError(owner, f"{prefix}{path} changed while it was checked")


def _socket_file_is_live(path: Path, kind: SocketKind, owner: str, prefix: str) -> bool:
    # Non-blocking, so a listener with a full backlog answers EAGAIN at once.
    # A live stream listener sees one connection that closes immediately.
    with socket.socket(socket.AF_UNIX, _SOCKET_TYPES[kind]) as probe:
        probe.setblocking(False)
        try:
            probe.connect(os.fsencode(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:
            return True
        except OSError as error:
            if error.errno == errno.EPROTOTYPE:  # bound, by a socket of another kind
                return True
            raise BindError(
                owner, f"{prefix}cannot tell whether {path} is in use: {error}"
            ) from error
        return True


def _apply_file_attributes(
    spec: SocketSpec,
    path: Path,
    owner: tuple[int, int],
    label: str,
    inode: tuple[int, int] | None,
) -> None:
    # The mode is set after bind() so that it does not depend on the umask
    # (systemd instead binds under umask ~SocketMode=, which is process-wide),
    # and through an O_PATH fd of the very socket file bind() created: whoever
    # can write the directory cannot swap in a symlink for chmod to follow.
    # fchmod() on the socket itself would change the sockfs inode instead.
    mode = spec.mode if spec.mode is not None else DEFAULT_SOCKET_MODE
    try:
        _chmod_exactly(path, mode, stat.S_ISSOCK, inode)
        if owner != (-1, -1):
            os.chown(path, owner[0], owner[1], follow_symlinks=False)
    except OSError as error:
        raise BindError(spec.name, f"cannot set mode or owner of {label}: {error}") from error


def _chmod_exactly(
    path: Path, mode: int, is_kind: Callable[[int], bool], inode: tuple[int, int] | None = None
) -> None:
    """chmod ``path`` only if it still is what we made (never through a symlink)."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not is_kind(info.st_mode) or (inode is not None and (info.st_dev, info.st_ino) != inode):
            raise OSError(errno.ELOOP, f"{path} was replaced while it was set up")
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def unlink_if_same(path: Path, inode: tuple[int, int]) -> bool:
    """Unlink ``path`` if it still is the socket file ``inode``; True if it is gone."""
    try:
        current = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    is_ours = stat.S_ISSOCK(current.st_mode) or stat.S_ISFIFO(current.st_mode)  # kind: fifo
    if not is_ours or (current.st_dev, current.st_ino) != inode:
        return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _inode(spec: SocketSpec, path: Path, label: str) -> tuple[int, int]:
    try:
        status = os.lstat(path)
    except OSError as error:
        raise BindError(spec.name, f"cannot bind {label}: {path} vanished: {error}") from error
    return status.st_dev, status.st_ino


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "an unknown kind of file")


# --- fifo (kind: fifo) -------------------------------------------------------


def _make_fifo(spec: SocketSpec, address: FifoAddress, base_dir: Path) -> BoundSocket:
    """systemd's ``fifo_address_create()`` (ListenFIFO=): mkfifo, or reuse one that is ours.

    An existing path is reused only if it is a FIFO (never followed: a symlink
    is refused, as systemd's O_NOFOLLOW does) with the mode and owner this unit
    gives it, as systemd checks (a FIFO left by an earlier run); anything else
    is left alone. Opened O_RDWR|O_NONBLOCK, as systemd does: the open never
    waits for a writer, and the FIFO never reports EOF (we are a writer too),
    so a worker's read blocks until data comes instead of ending when one
    client closes. Then blocking again, as the workers get every socket.
    """
    path = base_dir.absolute() / address.path
    label = f"fifo:{path}"
    uid, gid = _resolve_owner(spec)
    mode = spec.mode if spec.mode is not None else DEFAULT_SOCKET_MODE
    _make_parents(spec, path.parent)
    created = True
    try:
        os.mkfifo(path, 0o600)  # the unit's mode is set below, on the open fd
    except FileExistsError:
        created = False
    except OSError as error:
        raise BindError(spec.name, f"cannot create {label}: {error}") from error
    try:
        before = os.lstat(path)
    except OSError as error:
        raise BindError(spec.name, f"cannot create {label}: {error}") from error
    if not stat.S_ISFIFO(before.st_mode):
        raise BindError(
            spec.name,
            f"cannot create {label}: {path} exists and is {_file_kind(before.st_mode)}, "
            "not a FIFO; it is left alone: remove it or choose another path",
        )
    owner = (os.geteuid() if uid == -1 else uid, os.getegid() if gid == -1 else gid)
    if not created and (
        stat.S_IMODE(before.st_mode) != mode or (before.st_uid, before.st_gid) != owner
    ):
        raise BindError(
            spec.name,
            f"cannot create {label}: a FIFO with mode {stat.S_IMODE(before.st_mode):04o} and "
            f"owner {before.st_uid}:{before.st_gid} is there, not {mode:04o} "
            f"{owner[0]}:{owner[1]}; it is left alone (someone else's?)",
        )
    flags = os.O_RDWR | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if created:
            unlink_if_same(path, (before.st_dev, before.st_ino))
        raise BindError(spec.name, f"cannot open {label}: {error}") from error
    fifo = FifoFile(fd)
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (before.st_dev, before.st_ino):
            raise BindError(spec.name, f"cannot open {label}: {path} changed while it was opened")
        if created:
            os.fchmod(fd, mode)  # a FIFO's fd is its inode: no path to swap meanwhile
            if (uid, gid) != (-1, -1):
                os.fchown(fd, uid, gid)
        fifo.setblocking(True)
    except OSError as error:
        fifo.close()
        if created:
            unlink_if_same(path, (before.st_dev, before.st_ino))
        raise BindError(spec.name, f"cannot set mode or owner of {label}: {error}") from error
    except BaseException:
        fifo.close()
        raise
    return BoundSocket(
        spec.name, spec, fifo, created_path=path, created_inode=(before.st_dev, before.st_ino)
    )


def _fifo_address(fd: int) -> str:
    """``fifo:PATH`` for an fd that is a named FIFO, else "" (what describe_socket reports)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return ""
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    return f"fifo:{target}" if target.startswith("/") else ""


# --- vsock -----------------------------------------------------------------


def _bind_vsock(spec: SocketSpec, address: VsockAddress) -> BoundSocket:
    cid = _parse_u32(spec, "cid", address.cid)
    port = _parse_u32(spec, "port", address.port)
    label = f"vsock:{cid}:{port}"
    if _AF_VSOCK is None:
        raise BindError(spec.name, f"cannot bind {label}: this Python has no AF_VSOCK")
    try:
        sock = socket.socket(_AF_VSOCK, _SOCKET_TYPES[spec.kind])
    except OSError as error:
        raise BindError(
            spec.name,
            f"cannot create a vsock socket for {label}: {error} "
            "(is a vsock transport loaded: vsock_loopback, vhost_vsock, "
            "vmw_vsock_virtio_transport?)",
        ) from error
    try:
        _configure_common(sock, spec, label)
        _bind(sock, spec, (cid, port), label)
        _listen_or_fail(sock, spec, label)
    except BaseException:
        sock.close()
        raise
    return BoundSocket(spec.name, spec, sock)


def _parse_u32(spec: SocketSpec, what: str, value: str) -> int:
    # QEMU's vsock_parse_vaddr_to_sockaddr(): decimal, at most UINT32_MAX.
    if not value.isdecimal() or int(value) > 0xFFFFFFFF:
        raise BindError(spec.name, f"Failed to parse {what} '{value}'")
    return int(value)


# --- fd (the seed rule) ----------------------------------------------------


def _adopt_inherited(spec: SocketSpec, address: FdAddress, inherited: InheritedFds) -> BoundSocket:
    if not address.is_number:
        raise BindError(
            spec.name,
            f"fd '{address.value}': named file descriptors are only permitted in monitor commands",
        )
    label = address.value
    number = inherited.fd_of(int(address.value))
    if number is None:
        # Not looked at: a number the supervisor did not inherit may be one of
        # its own fds, which is none of this unit's business.
        raise BindError(
            spec.name,
            f"File descriptor '{label}' was not inherited by the supervisor "
            "(only fds open when it started may be named by number)",
        )
    inherited.check_claim(number, spec.name)
    try:
        sock = socket.socket(fileno=number)
    except OSError as error:
        reason = "is not a socket" if error.errno == errno.ENOTSOCK else f"cannot be used: {error}"
        raise BindError(spec.name, f"File descriptor '{label}' {reason}") from error
    try:
        _check_adoptable(sock, spec, label)
    except BaseException:
        sock.detach()  # still inherited and unclaimed: close_unclaimed() closes it
        raise
    inherited.claim(number, spec.name)
    sock.set_inheritable(False)  # FD_CLOEXEC: only the spawn step passes fds on
    return BoundSocket(spec.name, spec, sock, adopted=True)


def _check_adoptable(sock: socket.socket, spec: SocketSpec, label: str) -> None:
    """SPEC §2: the declared kind, and listening for stream and seqpacket."""
    actual = _KIND_NAMES.get(sock.type, f"type {int(sock.type)}")
    if actual != spec.kind.value:
        raise BindError(
            spec.name,
            f"File descriptor '{label}' is a {actual} socket, "
            f"but socket '{spec.name}' is declared as {spec.kind.value}",
        )
    if spec.kind is not SocketKind.DATAGRAM and not _is_listening(sock):
        raise BindError(spec.name, f"File descriptor '{label}' is not listening")


# --- shared helpers --------------------------------------------------------


def _new_socket(spec: SocketSpec, family: int, label: str) -> socket.socket:
    try:
        return socket.socket(family, _SOCKET_TYPES[spec.kind])
    except OSError as error:
        raise BindError(spec.name, f"cannot create a socket for {label}: {error}") from error


def _configure_common(sock: socket.socket, spec: SocketSpec, label: str) -> None:
    """Options every family takes: blocking mode, keep-alive, buffer sizes.

    The TCP/IP ones (reuse-port, free-bind, no-delay) are set for inet
    sockets only and ignored elsewhere, as systemd's socket_address_listen()
    and socket_apply_socket_options() do.
    """
    # Blocking even if someone called socket.setdefaulttimeout(): workers
    # share the open file description and expect what systemd hands out.
    sock.setblocking(True)
    if spec.keep_alive:  # systemd.socket KeepAlive=
        _set_option(sock, spec, label, socket.SOL_SOCKET, socket.SO_KEEPALIVE, "SO_KEEPALIVE")
    if spec.receive_buffer is not None:  # ReceiveBuffer=; Linux doubles it
        _set_option(
            sock, spec, label, socket.SOL_SOCKET, socket.SO_RCVBUF, "SO_RCVBUF", spec.receive_buffer
        )
    if spec.send_buffer is not None:  # SendBuffer=
        _set_option(
            sock, spec, label, socket.SOL_SOCKET, socket.SO_SNDBUF, "SO_SNDBUF", spec.send_buffer
        )


def _set_option(
    sock: socket.socket,
    spec: SocketSpec,
    label: str,
    level: int,
    option: int,
    option_name: str,
    value: int = 1,
) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as error:
        raise BindError(spec.name, f"cannot set {option_name} on {label}: {error}") from error


def _bind(sock: socket.socket, spec: SocketSpec, sockaddr: Any, label: str) -> None:
    try:
        sock.bind(sockaddr)
    except (OSError, OverflowError, ValueError) as error:
        raise BindError(spec.name, f"cannot bind {label}: {error}") from error


def _listen(sock: socket.socket, spec: SocketSpec) -> None:
    # Only connection-oriented kinds listen (systemd's socket_address_can_accept()).
    if spec.kind is not SocketKind.DATAGRAM:
        sock.listen(min(spec.backlog, _MAX_BACKLOG))


def _listen_or_fail(sock: socket.socket, spec: SocketSpec, label: str) -> None:
    try:
        _listen(sock, spec)
    except OSError as error:
        raise BindError(spec.name, f"cannot listen on {label}: {error}") from error


def _is_listening(sock: socket.socket) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


def _local_address(sock: socket.socket, family: Family) -> str:
    try:
        sockaddr: Any = sock.getsockname()
    except OSError:
        return ""
    return _format_sockaddr(family, sockaddr)


def _format_sockaddr(family: Family, sockaddr: Any) -> str:
    if family == "inet":
        return f"{sockaddr[0]}:{sockaddr[1]}"
    if family == "inet6":
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    if family == "vsock":
        return f"vsock:{sockaddr[0]}:{sockaddr[1]}"
    if family == "unix":
        return _format_unix_sockaddr(sockaddr)
    return ""


def _format_unix_sockaddr(sockaddr: str | bytes) -> str:
    if isinstance(sockaddr, bytes):  # abstract: Python returns it with its NUL
        if not sockaddr.startswith(b"\0"):
            return f"unix:{os.fsdecode(sockaddr)}" if sockaddr else ""
        name = sockaddr[1:]
        if len(sockaddr) == _SUN_PATH_MAX:  # not tight: padded with NULs
            name = name.rstrip(b"\0")
        return "@" + name.decode("utf-8", "backslashreplace")
    return f"unix:{sockaddr}" if sockaddr else ""  # "" : unbound or unnamed


def _fd_is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True
