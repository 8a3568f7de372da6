"""The monitor: a Unix stream socket speaking QMP, with fds passed by SCM_RIGHTS.

This is the thin shell around :mod:`fdsupervisor.qmp`: it accepts clients,
checks who they are (``SO_PEERCRED``), reads bytes and fds, feeds the bytes
to the protocol core, hands commands to :mod:`fdsupervisor.commands`, and
writes replies (with fds, for ``fd-retrieve``) and events (:func:`event_line`,
broadcast to every negotiated client). It never parses JSON.

fd passing follows QEMU 7.2's socket chardev (``tcp_chr_recv`` /
``tcp_get_msgfds``): a client holds only the fds of its latest ``sendmsg``
that carried any, so a newer batch closes the unconsumed older one; held fds
wait across commands that take none; ``getfd`` takes the first held fd and
closes the rest of its batch; whatever is held is closed when the client goes.

Every fd a client makes the supervisor hold is counted: the unclaimed ones
it sent and the duplicates waiting in replies it has not read yet. Each
client may hold :data:`MAX_FDS_PER_CLIENT`, all of them together the
server's ``fd_budget`` (:func:`monitor_fd_budget`); past either, a new
batch is closed at once (a warning, and the ``getfd`` that wanted it is
told why) and ``fd-retrieve`` answers an error, so that no client can use
up the fd table that the units, their workers and the other clients need.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import stat
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .binding import remove_stale_socket_file
from .errors import BindError, CommandError
from .fdpassing import SCM_MAX_FD, fds_from_ancillary, rights, rights_space
from .loop import ACCEPT_RETRY_DELAY, EventLoop
from .qmp import Closed, Event, Execute, QmpConnection, Send, error_line, event
from .units import SocketKind

# At most 64 clients at once (SPEC 5): each costs an fd and a buffer, and a
# local monitor has a handful of clients; QEMU allows one per chardev.
MAX_CLIENTS = 64
# No sendmsg carries more fds than the kernel's SCM_MAX_FD.
MAX_FDS_PER_MESSAGE = SCM_MAX_FD
# The fds one client may make the supervisor hold at once (unclaimed ones it
# sent, duplicates waiting in unread fd-retrieve replies): one sendmsg's worth
# (SCM_MAX_FD), what a client that claims its fds and reads its replies
# never comes near.
MAX_FDS_PER_CLIENT = MAX_FDS_PER_MESSAGE
# All clients together may hold this share of RLIMIT_NOFILE: the other three
# quarters stay for unit sockets, the store, clients and spawning.
MONITOR_FD_SHARE = 4
RECV_SIZE = 65536
# A client that does not read its replies stops being read once this much
# output waits for it, as QEMU stops reading a client whose request queue is
# full (QMP_REQ_QUEUE_LEN_MAX): backpressure instead of unbounded memory.
MAX_PENDING_OUTPUT = 1 << 20
# A client that lets this much output (events, mostly) pile up unread is
# disconnected: it would otherwise cost unbounded memory (QEMU's monitor has
# the same problem with its output buffer; we choose to cut the client off).
MAX_QUEUED_OUTPUT = 8 << 20
# Replies are coalesced into one send() up to this size.
MAX_WRITE = 64 << 10

_CRED = struct.Struct("3i")
# Plain ints, made once: the socket module's flags are IntFlag members, and
# ``flags & socket.MSG_CTRUNC`` would go through enum's Python __and__ on every read.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_RIGHTS_SPACE = rights_space(MAX_FDS_PER_MESSAGE)


def event_line(name: str, data: Mapping[str, Any], now: Callable[[], float] = time.time) -> bytes:
    """The line that tells clients ``name`` happened: SPEC 5's event, stamped ``now``.

    Wall-clock time, as QEMU stamps its events (``g_get_real_time()``): the
    only clock here that a client can compare with its own. Split into
    whole seconds and microseconds as :func:`fdsupervisor.qmp.event` frames it.
    """
    seconds, fraction = divmod(now(), 1.0)
    return event(name, data, int(seconds), int(fraction * 1_000_000))


def monitor_fd_budget(nofile: int) -> int:
    """The fds all monitor clients may hold together, from the soft RLIMIT_NOFILE."""
    return max(MAX_FDS_PER_CLIENT, nofile // MONITOR_FD_SHARE)


def default_monitor_path(environ: Mapping[str, str], uid: int) -> Path:
    """SPEC 5: $RUNTIME_DIRECTORY, else /run/fdsupervisor for root, else $XDG_RUNTIME_DIR."""
    if environ.get("RUNTIME_DIRECTORY"):
        # systemd may list several directories separated by colons
        return Path(environ["RUNTIME_DIRECTORY"].split(":")[0]) / "monitor.sock"
    if uid == 0:
        return Path("/run/fdsupervisor/monitor.sock")
    runtime = environ.get("XDG_RUNTIME_DIR") or f"/run/user/{uid}"
    return Path(runtime) / "fdsupervisor" / "monitor.sock"


def peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = _CRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    )
    return int(uid)


class DeferredReply:
    """A reply that comes later (``service-restart`` waits for its new workers).

    The client reads and runs nothing more until it is resolved; a client gone
    by then is simply not answered.
    """

    __slots__ = ("_callback", "_data")

    def __init__(self) -> None:
        self._callback: Callable[[bytes], None] | None = None
        self._data: bytes | None = None

    def resolve(self, data: bytes) -> None:
        """The reply line; only the first call counts."""
        if self._data is not None:
            return
        self._data = data
        if self._callback is not None:
            self._callback(data)

    def on_resolved(self, callback: Callable[[bytes], None]) -> None:
        self._callback = callback
        if self._data is not None:
            callback(self._data)


class MonitorClient:
    """One connected client: its protocol state, held fds and pending output."""

    def __init__(self, server: MonitorServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.qmp = QmpConnection(package=server.package)
        self.held: list[int] = []
        self.output: deque[tuple[bytes, list[int]]] = deque()
        self.pending = 0
        self.queued_fds = 0  # our duplicates in self.output, not sent yet
        self.closed = False
        self._batching = False
        # Why the fds of its latest batch are gone (the kernel dropped them at
        # EMFILE, or a limit closed them), for the getfd that wanted them.
        self.lost_fds: str | None = None
        self._refusing = False  # warned about a refused batch; quiet until one is accepted
        self._writing = False
        self._reading = True  # the server registers the reader on accept
        self._backlog: deque[Event] = deque()  # read, not handled yet (a reply is deferred)
        self._waiting: DeferredReply | None = None

    # -- fds --------------------------------------------------------------------

    def take_fd(self) -> int | None:
        """The first held fd (now the caller's); the rest of its batch is closed."""
        if not self.held:
            return None
        first, rest = self.held[0], self.held[1:]
        self.held = []
        for fd in rest:
            os.close(fd)
        return first

    def _hold(self, fds: list[int]) -> None:
        for fd in self.held:
            os.close(fd)
        self.held = fds

    @property
    def fds_held(self) -> int:
        """The fds this client makes the supervisor hold: unclaimed, and in unsent replies."""
        return len(self.held) + self.queued_fds

    def fd_limit_problem(self, more: int) -> str | None:
        """Why this client may not make the supervisor hold ``more`` fds, or None."""
        if self.fds_held + more > MAX_FDS_PER_CLIENT and self.queued_fds:
            self._flush()  # replies made in this batch may leave now
        if self.fds_held + more > MAX_FDS_PER_CLIENT:
            return (
                f"this client would hold {self.fds_held + more} file descriptors "
                f"(at most {MAX_FDS_PER_CLIENT}): claim them with getfd or read the "
                "fd-retrieve replies first"
            )
        total = self.server.fds_held() + more
        if total > self.server.fd_budget:
            return (
                f"the monitor's clients would hold {total} file descriptors together "
                f"(at most {self.server.fd_budget}); try again later"
            )
        return None

    def _receive_fds(self, fds: list[int]) -> None:
        """A new batch: it replaces the held one (QEMU), unless a limit refuses it."""
        self._hold([])
        problem = self.fd_limit_problem(len(fds))
        if self.closed:  # the flush above found the peer gone
            for fd in fds:
                os.close(fd)
            return
        if problem is None:
            self.held = fds
            self.fds_refused(None)
            return
        for fd in fds:
            os.close(fd)
        self.lost_fds = problem
        self.fds_refused(problem, received=len(fds))

    def fds_refused(self, problem: str | None, **fields: object) -> None:
        """Note a refusal (None: an acceptance); the first of a row is logged, once."""
        if problem is None:
            self._refusing = False
        elif not self._refusing:
            self._refusing = True
            self.server.log.warning("monitor_fds_refused", reason=problem, **fields)

    # -- I/O ----------------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(RECV_SIZE, _RIGHTS_SPACE, _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary, flags = b"", [], 0
        if ancillary:
            fds = fds_from_ancillary(ancillary)
            if fds:
                self.lost_fds = None
                self._receive_fds(fds)
        if flags & _MSG_CTRUNC:
            # The kernel dropped fds it could not install (we are out of fds).
            self.lost_fds = "the supervisor is out of file descriptors"
        self._backlog.extend(self.qmp.receive_data(data))
        self._dispatch()

    def _dispatch(self) -> None:
        """Handle the events read so far, in order, up to a command whose reply comes later.

        As QEMU suspends a monitor while a coroutine command runs
        (``monitor_suspend()``), nothing more is read or run until that reply
        is sent: replies stay in the order of the commands.
        """
        # Replies and events made while handling one read leave in one write.
        self._batching = True
        ended = False
        try:
            while self._backlog and self._waiting is None and not self.closed:
                event = self._backlog.popleft()
                if isinstance(event, Send):
                    self.send(event.data)
                elif isinstance(event, Execute):
                    result = self.server.execute(self, event)
                    if isinstance(result, DeferredReply):
                        self._waiting = result
                        result.on_resolved(self._resolved)
                    else:
                        self.send(*result)
                elif isinstance(event, Closed):
                    ended = True
                    break
        finally:
            self._batching = False
        if self.closed:
            return
        self._flush()  # a last error reply still goes out before we hang up
        if ended:
            self.close()

    def _resolved(self, data: bytes) -> None:
        """The reply a command deferred: sent, then the commands read meanwhile run."""
        if self.closed:
            return
        self._waiting = None
        self.send(data)
        if not self._batching:  # else the dispatch that deferred it goes on by itself
            self._dispatch()

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if self.closed:
            for fd in fds or ():
                os.close(fd)
            return
        self.output.append((data, fds or []))
        self.pending += len(data)
        self.queued_fds += len(fds or ())
        if self.pending > MAX_QUEUED_OUTPUT:
            self.server.log.warning(
                "monitor_client_dropped",
                reason="it does not read its replies and events",
                queued=self.pending,
            )
            self.close()
            return
        if not self._batching:
            self._flush()

    def _flush(self) -> None:
        while self.output:
            data, fds = self.output.popleft()
            if not fds:
                parts, size = [data], len(data)
                while self.output and not self.output[0][1] and size < MAX_WRITE:
                    size += len(self.output[0][0])
                    parts.append(self.output.popleft()[0])
                if len(parts) > 1:
                    data = b"".join(parts)
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [rights(fds)])
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                self.output.appendleft((data, fds))
                break
            except OSError:
                self.output.appendleft((data, fds))
                self.close()
                return
            for fd in fds:  # our duplicates: the client has its own now
                os.close(fd)
            self.queued_fds -= len(fds)
            self.pending -= sent
            if sent < len(data):
                self.output.appendleft((data[sent:], []))
                break
        self._update_interest()

    def _update_interest(self) -> None:
        """Watch for writability while output waits; stop reading while too much does.

        The loop is told only of a change: a reply that leaves in one send()
        costs no epoll_ctl() at all.
        """
        writing = bool(self.output)
        reading = self.pending <= MAX_PENDING_OUTPUT and self._waiting is None
        if writing == self._writing and reading == self._reading:
            return
        loop, fd = self.server.loop, self.sock.fileno()
        if writing != self._writing:
            self._writing = writing
            if writing:
                loop.add_writer(fd, self._flush)
            else:
                loop.remove_writer(fd)
        if reading != self._reading:
            self._reading = reading
            if reading:
                loop.add_reader(fd, self.on_readable)
            else:
                loop.remove_reader(fd)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.loop.remove_reader(self.sock.fileno())
        self.server.loop.remove_writer(self.sock.fileno())
        self._hold([])
        for _data, fds in self.output:
            for fd in fds:
                os.close(fd)
        self.output.clear()
        self.queued_fds = 0
        self.sock.close()
        self.server.forget(self)


Executor = Callable[[MonitorClient, Execute], "tuple[bytes, list[int]] | DeferredReply"]


class MonitorServer:
    """The listening monitor socket and its clients."""

    def __init__(
        self,
        path: Path,
        *,
        loop: EventLoop,
        log: Any,
        package: str,
        allowed_uids: frozenset[int],
        execute: Executor,
        max_clients: int = MAX_CLIENTS,
        fd_budget: int | None = None,
    ) -> None:
        self.path = path
        self.loop = loop
        self.log = log
        self.package = package
        self.allowed_uids = allowed_uids
        self.max_clients = max_clients
        self._fd_budget = fd_budget
        self.clients: list[MonitorClient] = []
        self.execute = execute
        self._sock: socket.socket | None = None
        self._inode: int | None = None  # of the socket file at path, while it is ours
        self._created = False  # this program bound the socket (not handed over)

    @property
    def inode(self) -> int | None:
        """The socket file's inode, or None when the file at ``path`` is not ours."""
        return self._inode

    def open(self, existing: socket.socket | None = None, inode: int | None = None) -> None:
        """Bind the monitor socket, or take over ``existing`` (an upgrade's handover).

        ``inode`` is the old program's socket file. If that file is gone or
        another one is at ``path``, no client can reach ``existing``: a new
        socket is bound at ``path`` if it is free, else ``existing`` is kept
        with a warning. Neither is a reason to give up the supervisor.
        """
        if existing is None:
            self._listen(self._bind())
            return
        problem = self._path_problem(inode)
        if problem is None:
            self._listen(existing)
            return
        try:
            fresh = self._bind()
        except (OSError, BindError) as exc:
            self.log.warning(
                "monitor_unreachable",
                path=str(self.path),
                problem=problem,
                error=str(exc),
                note="serving the handed-over monitor socket, which no client can reach; "
                "free the path and upgrade again",
            )
            self._listen(existing, owns_path=False)
            return
        existing.close()
        self.log.warning("monitor_recreated", path=str(self.path), problem=problem)
        self._listen(fresh)

    def _path_problem(self, inode: int | None) -> str | None:
        """Why the file at ``path`` is not the handed-over socket's, or None if it is."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return "the monitor socket file is gone"
        except OSError as exc:
            return f"cannot inspect the monitor socket file: {exc}"
        if not stat.S_ISSOCK(info.st_mode):
            return "the monitor socket file was replaced by something that is not a socket"
        if inode is not None and info.st_ino != inode:
            return "the monitor socket file was replaced by another socket file"
        return None

    def _bind(self) -> socket.socket:
        _make_private_directories(self.path.parent)
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket file is born 0600, no window
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        sock.listen(64)
        self._created = True
        return sock

    def _listen(self, sock: socket.socket, *, owns_path: bool = True) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._inode = os.lstat(self.path).st_ino if owns_path else None
        self.loop.add_reader(sock.fileno(), self._accept)
        self.log.info("monitor_listening", path=str(self.path))

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            # EMFILE and friends: log and leave the connection in the backlog
            # for a later try, instead of spinning (libuv and QEMU do the same).
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # The connection stays in the backlog and epoll is level-triggered:
                # stop watching for a moment instead of spinning on it.
                self.log.warning(
                    "monitor_accept_failed", error=str(exc), retry_in=ACCEPT_RETRY_DELAY
                )
                self.loop.remove_reader(self._sock.fileno())
                self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting)
                return
            raise
        uid = peer_uid(conn)
        if uid not in self.allowed_uids:
            self.log.warning("monitor_client_refused", uid=uid, reason="uid not allowed")
            conn.close()
            return
        if len(self.clients) >= self.max_clients:
            refusal = f"too many monitor clients ({self.max_clients}); try again later"
            conn.sendall(error_line(CommandError(refusal)))
            conn.close()
            return
        conn.setblocking(False)
        client = MonitorClient(self, conn)
        self.clients.append(client)
        self.loop.add_reader(conn.fileno(), client.on_readable)
        client.send(client.qmp.greeting())

    def _resume_accepting(self) -> None:
        if self._sock is not None:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    def fileno(self) -> int | None:
        return self._sock.fileno() if self._sock is not None else None

    def close_clients(self) -> None:
        for client in list(self.clients):
            client.close()

    def fds_held(self) -> int:
        return sum(client.fds_held for client in self.clients)

    @property
    def fd_budget(self) -> int:
        """What all clients may hold: given, or from the soft RLIMIT_NOFILE as it is now
        (an operator's prlimit takes effect at once)."""
        if self._fd_budget is not None:
            return self._fd_budget
        return monitor_fd_budget(resource.getrlimit(resource.RLIMIT_NOFILE)[0])

    def forget(self, client: MonitorClient) -> None:
        if client in self.clients:
            self.clients.remove(client)

    def broadcast(self, data: bytes) -> None:
        for client in list(self.clients):
            if client.qmp.negotiated:
                client.send(data)

    def broadcast_event(self, name: str, data: Mapping[str, Any]) -> None:
        """``name`` happened: its :func:`event_line` to every negotiated client.

        The line is made once for all of them, and not at all when no client
        would receive it: a getfd from a client that did not negotiate, with
        no other client listening, costs no JSON encoding.
        """
        receivers = [client for client in self.clients if client.qmp.negotiated]
        if receivers:
            line = event_line(name, data)
            for client in receivers:
                client.send(line)

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()
            except FileNotFoundError:
                pass

    def abandon(self) -> None:
        """Close, but leave a handed-over socket's file: the original fd still serves it."""
        if not self._created:
            self._inode = None
        self.close()


def _make_private_directories(directory: Path) -> None:
    """Create ``directory`` and any missing parent, each 0700 whatever the umask.

    An existing directory is left as it is (it may be systemd's
    RuntimeDirectory=, with the mode the operator chose).
    """
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        path.chmod(0o700)  # mkdir's mode is masked by the umask


def _remove_stale_socket(path: Path) -> None:
    """Make room at ``path`` (binding.remove_stale_socket_file: the one implementation)."""
    remove_stale_socket_file(path, SocketKind.STREAM, "monitor")
