"""The supervisor's end of the sd_notify protocol: what workers send to ``NOTIFY_SOCKET``.

Two layers, built like :mod:`fdsupervisor.qmp`:

* :func:`parse_notify` is the pure core. It turns one datagram's payload into
  a :class:`NotifyMessage` the way systemd's service manager reads it
  (``manager_dispatch_notify_fd()`` in ``src/core/manager.c``,
  ``notify_recv_with_fds()`` in ``src/shared/notify-recv.c`` and
  ``service_notify_message()`` in ``src/core/service.c``). It never raises;
  what systemd would log and ignore ends up in ``problems``.
* :class:`NotifySocket` is the thin shell: one ``AF_UNIX`` ``SOCK_DGRAM``
  socket with ``SO_PASSCRED`` and, where the kernel has it, ``SO_PASSPIDFD``,
  whose :meth:`~NotifySocket.receive` reads the pending datagrams with their
  credentials and fds and hands back :class:`Datagram` records. The sender's
  pidfd is read into a :class:`Sender` (still running? its process group, its
  cgroup) and closed at once. Which worker a datagram belongs to and what it
  means for the service is ``runner.py``'s business; the fds a datagram
  carries for the fd store belong to the caller from then on.

Workers reach the socket through ``NOTIFY_SOCKET`` (SPEC section 4), with
libsystemd's ``sd_notify()``, systemd-python's ``systemd.daemon.notify()``
or any of the self-contained implementations of the protocol.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import os
import secrets
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from fdsupervisor.binding import remove_stale_socket_file, unlink_if_same
from fdsupervisor.errors import BindError
from fdsupervisor.fdpassing import FDNAME_MAX, fdname_is_valid, fds_from_ancillary, rights_space
from fdsupervisor.units import SocketKind

__all__ = [
    "ERRNO_MAX",
    "NOTIFY_BIND_ATTEMPTS",
    "NOTIFY_BUFFER_MAX",
    "NOTIFY_FD_MAX",
    "NOTIFY_NAME_BITS",
    "NOTIFY_RECEIVE_BATCH",
    "NOTIFY_SOCKET_MODE",
    "SCM_PIDFD",
    "SO_PASSPIDFD",
    "Datagram",
    "NotifyMessage",
    "NotifySocket",
    "Sender",
    "identify",
    "parse_notify",
    "pidfd_state",
]

# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

#: The largest datagram accepted, in bytes. systemd's ``NOTIFY_BUFFER_MAX``
#: is ``PIPE_BUF`` (4096 on Linux; ``src/basic/constants.h``): both
#: ``manager_dispatch_notify_fd()`` (which receives with ``MSG_TRUNC`` into a
#: 4096-byte iovec and drops ``n >= 4097``) and the newer
#: ``notify_recv_with_fds()`` (which drops on ``MSG_TRUNC``) accept 4096
#: bytes and drop 4097. libsystemd's ``sd_notify()`` does not split, so a
#: bigger message is lost under systemd as well.
NOTIFY_BUFFER_MAX: Final = 4096

#: How many fds one datagram may carry and still be read whole: systemd's
#: ``NOTIFY_FD_MAX``, which sizes its control buffer. The kernel lets no
#: ``sendmsg()`` carry more than ``SCM_MAX_FD`` (253), so in practice this is
#: never the limit; it is here so the buffer is systemd's.
NOTIFY_FD_MAX: Final = 768

#: At most this many datagrams are read by one :meth:`NotifySocket.receive`.
#: systemd reads one datagram per sd-event dispatch and so returns to its
#: loop after each; reading a batch saves a poll per datagram while still
#: bounding how long one chatty worker holds the loop. The kernel bounds the
#: queue itself: ``net.unix.max_dgram_qlen`` datagrams (10 by default;
#: systemd raises it to 512 at boot), after which senders wait.
NOTIFY_RECEIVE_BATCH: Final = 64

#: The socket file's mode. Workers may run as another user than the
#: supervisor, and ``sendto()`` on a path socket needs write permission on
#: the file: systemd's ``/run/systemd/notify`` is world-writable for the same
#: reason (``srwxrwxrwx``: PID 1 runs with umask 0). Being able to send
#: grants nothing by itself: every datagram carries kernel-checked
#: credentials, and the supervisor only listens to the pids of its own
#: workers. Restrict access with the permissions of the directory instead.
NOTIFY_SOCKET_MODE: Final = 0o666

#: How many random bits :meth:`NotifySocket.bind_unpredictable` puts in the
#: abstract name. Any local user may bind any free abstract name, so a name
#: someone can guess before the supervisor binds it can be taken first; 128
#: bits from :mod:`secrets` (the size of a UUID4's randomness, the strength
#: of a 128-bit key) cannot be guessed, only read once it is bound (from
#: ``/proc/net/unix``), when it is no longer free.
NOTIFY_NAME_BITS: Final = 128

#: How often :meth:`NotifySocket.bind_unpredictable` draws a new name when
#: the one drawn is taken. With 128 random bits that takes a collision nobody
#: can arrange; the retry is there so that even then the supervisor starts.
NOTIFY_BIND_ATTEMPTS: Final = 8

#: The largest errno ``ERRNO=`` may carry (systemd's ``ERRNO_MAX``).
ERRNO_MAX: Final = 4095

# struct ucred: pid_t pid; uid_t uid; gid_t gid.
_UCRED: Final = struct.Struct("iII")

# SO_PASSPIDFD / SCM_PIDFD (Linux 6.5; asm-generic/socket.h, the values of
# x86-64 and arm64): each datagram then carries a pidfd of its sender,
# made by the kernel when it is read (and, since Linux 6.16, also for a
# sender that has exited and been reaped). Python 3.11 has no names for them.
SO_PASSPIDFD: Final = int(getattr(socket, "SO_PASSPIDFD", 76))
SCM_PIDFD: Final = int(getattr(socket, "SCM_PIDFD", 0x04))

# The control buffer systemd's notify_recv_with_fds() uses: credentials,
# the SCM_PIDFD slot, and NOTIFY_FD_MAX fds.
_ANCILLARY_SIZE: Final = (
    socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(4) + rights_space(NOTIFY_FD_MAX)
)

# PIDFD_GET_INFO (Linux 6.13, linux/pidfd.h): _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11,
# struct pidfd_info), its first published size (PIDFD_INFO_SIZE_VER0, 64 bytes):
# mask u64, cgroupid u64, pid u32, ... The PID bit comes back only while the
# process exists (a zombie too); a reaped one's cgroup is its cgroup at exit,
# given with PIDFD_INFO_EXIT (Linux 6.15).
_PIDFD_INFO: Final = struct.Struct("=QQI")
_PIDFD_INFO_SIZE: Final = 64
_PIDFD_GET_INFO: Final = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11
_PIDFD_INFO_PID: Final = 1 << 0
_PIDFD_INFO_CGROUPID: Final = 1 << 2
_PIDFD_INFO_EXIT: Final = 1 << 3

_U64_MAX: Final = (1 << 64) - 1
_INT_MIN: Final = -(1 << 31)
_INT_MAX: Final = (1 << 31) - 1
_PID_MAX: Final = _INT_MAX  # pid_t is a 32-bit int; parse_pid() refuses what does not fit

# ---------------------------------------------------------------------------
# The message
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotifyMessage:
    """One notification as systemd's service manager would act on it.

    The flags are true when the message has the line ``KEY=1`` (systemd
    tests ``strv_contains(tags, "READY=1")``). Precedence among ``READY``,
    ``RELOADING`` and ``STOPPING`` is left to the service state machine, as
    in systemd's ``service_notify_message_process_state()``: ``STOPPING=1``
    wins, and ``READY=1`` together with ``RELOADING=1`` means "reloaded
    already"; ``monotonic_usec`` (``MONOTONIC_USEC=``) dates a
    ``RELOADING=1``.

    ``status`` is ``None`` without a ``STATUS=`` line and ``""`` for
    ``STATUS=`` with no text, which clears the status, as does a status that
    is not valid UTF-8 (both as in systemd). ``errno`` is ``ERRNO=`` (0 to
    :data:`ERRNO_MAX`, or a name such as ``ENOENT``); ``main_pid`` is
    ``MAINPID=``. ``watchdog`` is ``WATCHDOG=1`` (a keep-alive),
    ``watchdog_trigger`` is ``WATCHDOG=trigger`` (act as if the watchdog
    fired); ``watchdog_usec`` changes the watchdog timeout at run time;
    ``extend_timeout_usec`` asks for that much more time, counted from now,
    in the current start, run or stop phase.

    The fd store fields are already resolved the way systemd resolves them:
    ``fd_store_remove`` (``FDSTOREREMOVE=1``) is true only with a valid
    ``fd_name``, and when ``FDSTOREREMOVE=1`` is given ``fd_store``
    (``FDSTORE=1``) is false whatever else the message says. ``fd_name`` is
    ``FDNAME=`` when :func:`fdname_is_valid`; with ``FDSTORE=1`` and no name
    systemd names the fds ``stored``. ``fd_poll`` is false for ``FDPOLL=0``
    (do not drop the stored fd when it reports ``EPOLLHUP``/``EPOLLERR``).
    ``barrier`` is ``BARRIER=1``: the datagram's one fd is closed once
    everything before it was read, and nothing else in the message counts.

    When a key that takes a value appears twice, the first line counts
    (systemd reads values with ``strv_find_startswith()``). ``unknown``
    lists the names of keys this supervisor does not act on (including
    systemd's ``NOTIFYACCESS=``, ``BUSERROR=``, ``MAINPIDFD=`` and the like),
    each once, in order. ``problems`` says, one sentence each, what was
    dropped and why, for the supervisor to log.
    """

    ready: bool = False
    reloading: bool = False
    stopping: bool = False
    status: str | None = None
    errno: int | None = None
    main_pid: int | None = None
    watchdog: bool = False
    watchdog_trigger: bool = False
    watchdog_usec: int | None = None
    extend_timeout_usec: int | None = None
    fd_store: bool = False
    fd_store_remove: bool = False
    fd_name: str | None = None
    fd_poll: bool = True
    barrier: bool = False
    monotonic_usec: int | None = None
    unknown: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()


# Keys that mean something only as KEY=1; any other value is ignored.
_FLAG_KEYS: Final = frozenset({"READY", "RELOADING", "STOPPING", "FDSTORE", "FDSTOREREMOVE"})
# Keys whose first occurrence carries a value.
_VALUE_KEYS: Final = frozenset(
    {
        "STATUS",
        "ERRNO",
        "MAINPID",
        "WATCHDOG",
        "WATCHDOG_USEC",
        "EXTEND_TIMEOUT_USEC",
        "FDNAME",
        "MONOTONIC_USEC",
    }
)
# systemd splits on NEWLINE, which is "\n\r".
_SEPARATORS: Final = b"\n\r"
_BACKSLASH: Final = ord("\\")


def parse_notify(data: bytes) -> NotifyMessage:
    """Read one notification datagram's payload; never raises.

    The payload is split into lines as systemd's ``strv_split_newlines()``
    does (current systemd: ``extract_first_word()`` with no flags):

    * lines end at ``\\n`` or ``\\r``; empty lines vanish, so a trailing
      newline, ``\\r\\n`` and blank lines change nothing;
    * a backslash takes the next byte literally (``\\\\`` is one backslash,
      a backslash before a newline keeps the newline in the value) and is
      itself dropped; a lone backslash at the very end makes systemd's split
      fail and the whole message is ignored;
    * nothing else is special: no quotes, no trimming of spaces, key names
      are case-sensitive.

    A payload with a NUL byte anywhere but at the very end is ignored as a
    whole ("Got notification message with embedded NUL"); one trailing NUL
    is allowed. systemd does not require the payload to be UTF-8: only
    ``STATUS=`` is checked (see :class:`NotifyMessage`), and every other
    value is validated on its own, so one bad line costs only itself.

    A line without ``=`` is ignored, as systemd ignores it (it matches no
    key); numbers are read as systemd's ``safe_atou64()`` /
    ``parse_pid()`` / ``parse_errno()`` read them, including their quirks
    (leading whitespace, ``0x``/``0o``/``0b`` prefixes, C octal for a
    leading ``0``).
    """
    if b"\0" in data[:-1]:
        return NotifyMessage(
            problems=("message contains a NUL byte; the whole message is ignored",)
        )
    if data.endswith(b"\0"):
        data = data[:-1]
    lines = _split_lines(data)
    if lines is None:
        return NotifyMessage(
            problems=(
                "message ends in a lone backslash; the whole message is ignored "
                "(systemd cannot split it either)",
            )
        )
    # manager_process_barrier_fd(): "nothing else must be sent when using
    # BARRIER=1"; the message is dropped after its fd is closed.
    if b"BARRIER=1" in lines:
        if len(lines) == 1:
            return NotifyMessage(barrier=True)
        return NotifyMessage(
            barrier=True,
            problems=("BARRIER=1 sent with other assignments; everything else is ignored",),
        )
    return _interpret(lines)


def _split_lines(data: bytes) -> list[bytes] | None:
    # extract_first_word(&p, &word, NEWLINE, 0), repeated: separators are
    # coalesced, so no line is empty; backslash escapes the next byte.
    if b"\\" not in data:
        return [line for line in data.replace(b"\r", b"\n").split(b"\n") if line]
    lines: list[bytes] = []
    line = bytearray()
    in_line = False
    escaped = False
    for byte in data:
        if escaped:
            line.append(byte)
            escaped = False
        elif byte == _BACKSLASH:
            escaped = True
            in_line = True
        elif byte in _SEPARATORS:
            if in_line:
                lines.append(bytes(line))
                line.clear()
                in_line = False
        else:
            line.append(byte)
            in_line = True
    if escaped:
        return None
    if in_line:
        lines.append(bytes(line))
    return lines


def _interpret(lines: list[bytes]) -> NotifyMessage:
    problems: list[str] = []
    unknown: list[str] = []
    flags: set[str] = set()
    values: dict[str, bytes] = {}
    fd_poll = True
    for line in lines:
        raw_key, equals, value = line.partition(b"=")
        if not equals:
            problems.append(f"line without '=' ignored: {_shown(line)}")
            continue
        key = raw_key.decode("utf-8", "backslashreplace")
        if key in _FLAG_KEYS:
            if value == b"1":
                flags.add(key)
            else:
                problems.append(f"{key}={_shown(value)} ignored: only {key}=1 means anything")
        elif key == "FDPOLL":
            if value == b"0":
                fd_poll = False
            elif value != b"1":
                problems.append(f"FDPOLL={_shown(value)} ignored: FDPOLL=0 or FDPOLL=1 expected")
        elif key == "BARRIER":
            problems.append(f"BARRIER={_shown(value)} ignored: only BARRIER=1 means anything")
        elif key in _VALUE_KEYS:
            if key in values:
                problems.append(f"{key}= given more than once; only the first one counts")
            else:
                values[key] = value
        elif not key:
            problems.append(f"assignment without a name ignored: {_shown(line)}")
        elif key not in unknown:
            unknown.append(key)

    status: str | None = None
    if "STATUS" in values:
        try:
            status = values["STATUS"].decode("utf-8")
        except UnicodeDecodeError:
            # service_notify_message(): "Status message in notification
            # message is not UTF-8 clean", and the status becomes unset.
            status = ""
            problems.append("STATUS= is not valid UTF-8; the status is cleared")

    errno_value = _number(values, "ERRNO", _parse_errno, "an errno", problems)
    main_pid = _number(values, "MAINPID", _parse_pid, "a valid PID", problems)
    watchdog_usec = _number(values, "WATCHDOG_USEC", _parse_u64, "a number of µs", problems)
    extend_timeout_usec = _number(
        values, "EXTEND_TIMEOUT_USEC", _parse_u64, "a number of µs", problems
    )
    monotonic_usec = _number(values, "MONOTONIC_USEC", _parse_u64, "a number of µs", problems)

    watchdog = watchdog_trigger = False
    if "WATCHDOG" in values:
        if values["WATCHDOG"] == b"1":
            watchdog = True
        elif values["WATCHDOG"] == b"trigger":
            watchdog_trigger = True
        else:
            problems.append(
                f"WATCHDOG={_shown(values['WATCHDOG'])} ignored: "
                "WATCHDOG=1 or WATCHDOG=trigger expected"
            )

    fd_name: str | None = None
    if "FDNAME" in values:
        if fdname_is_valid(values["FDNAME"]):
            fd_name = values["FDNAME"].decode("ascii")
        else:
            problems.append(
                f"FDNAME={_shown(values['FDNAME'])} ignored: a name is up to "
                f"{FDNAME_MAX} printable ASCII characters other than ':'"
            )

    # service_notify_message(): FDSTOREREMOVE=1 is handled instead of
    # FDSTORE=1, and only with a valid FDNAME=.
    fd_store = "FDSTORE" in flags
    fd_store_remove = "FDSTOREREMOVE" in flags
    if fd_store_remove:
        if fd_store:
            problems.append("FDSTORE=1 ignored: FDSTOREREMOVE=1 in the same message wins")
            fd_store = False
        if fd_name is None:
            problems.append("FDSTOREREMOVE=1 ignored: it needs a valid FDNAME=")
            fd_store_remove = False

    return NotifyMessage(
        ready="READY" in flags,
        reloading="RELOADING" in flags,
        stopping="STOPPING" in flags,
        status=status,
        errno=errno_value,
        main_pid=main_pid,
        watchdog=watchdog,
        watchdog_trigger=watchdog_trigger,
        watchdog_usec=watchdog_usec,
        extend_timeout_usec=extend_timeout_usec,
        fd_store=fd_store,
        fd_store_remove=fd_store_remove,
        fd_name=fd_name,
        fd_poll=fd_poll,
        monotonic_usec=monotonic_usec,
        unknown=tuple(unknown),
        problems=tuple(problems),
    )


def _number(
    values: dict[str, bytes],
    key: str,
    parse: Callable[[bytes], int | None],
    expected: str,
    problems: list[str],
) -> int | None:
    if key not in values:
        return None
    result = parse(values[key])
    if result is None:
        problems.append(f"{key}={_shown(values[key])} ignored: not {expected}")
    return result


def _shown(value: bytes, limit: int = 64) -> str:
    """A value for a log line: quoted, escaped, cut to ``limit`` bytes."""
    text = repr(value[:limit].decode("utf-8", "backslashreplace"))
    return text + "..." if len(value) > limit else text


# -- numbers, as systemd's parse-util.c reads them ---------------------------

# safe_ato*() skip WHITESPACE (" \t\n\r"); strtoul() then skips isspace(),
# which also has \v and \f.
_SYSTEMD_WHITESPACE: Final = " \t\n\r"
_C_SPACE: Final = " \t\n\v\f\r"
_DIGITS: Final = "0123456789abcdefghijklmnopqrstuvwxyz"


def _mangle_base(text: str) -> tuple[str, int]:
    # parse-util.c mangle_base(): Python-style 0b and 0o prefixes; 0x and a
    # C octal leading 0 are left to strtoul()'s base 0.
    if text[:2] in ("0b", "0B"):
        return text[2:], 2
    if text[:2] in ("0o", "0O"):
        return text[2:], 8
    return text, 0


def _strtoul(text: str, base: int) -> tuple[int, bool] | None:
    """C's strtoul()/strtol() on all of ``text``: (magnitude, negative), or None.

    None when there are no digits or something follows them (systemd's
    ``x == s || *x != 0``).
    """
    rest = text.lstrip(_C_SPACE)
    negative = rest[:1] == "-"
    if rest[:1] in ("+", "-"):
        rest = rest[1:]
    hex_digit = rest[2:3].lower()
    if base in (0, 16) and rest[:2] in ("0x", "0X") and hex_digit and hex_digit in _DIGITS[:16]:
        rest, base = rest[2:], 16
    elif base == 0:
        base = 8 if rest[:1] == "0" else 10
    if not rest or any(c.lower() not in _DIGITS[:base] for c in rest):
        return None
    return int(rest, base), negative


def _parse_u64(raw: bytes) -> int | None:
    """systemd's ``safe_atou64()`` (and ``safe_atolu()`` on 64-bit Linux)."""
    if not raw.isascii():
        return None
    text, base = _mangle_base(raw.decode("ascii").lstrip(_SYSTEMD_WHITESPACE))
    parsed = _strtoul(text, base)
    if parsed is None:
        return None
    magnitude, negative = parsed
    if magnitude > _U64_MAX:  # strtoul() sets ERANGE
        return None
    if negative and magnitude != 0:
        if text.startswith("-"):  # "-1" is refused, not wrapped around
            return None
        return (1 << 64) - magnitude  # "\v-1": strtoul() wraps, systemd does not look
    return magnitude


def _parse_pid(raw: bytes) -> int | None:
    """systemd's ``parse_pid()``: ``safe_atolu()`` that fits a ``pid_t`` and is > 0."""
    value = _parse_u64(raw)
    if value is None or not 0 < value <= _PID_MAX:
        return None
    return value


def _parse_errno(raw: bytes) -> int | None:
    """systemd's ``parse_errno()``: a name such as ``EPERM``, or 0 to :data:`ERRNO_MAX`."""
    if not raw.isascii():
        return None
    text = raw.decode("ascii")
    if text.startswith("E") and text.isupper() and text.isidentifier():
        named = getattr(_errno, text, None)
        if isinstance(named, int) and named > 0:
            return named
    # safe_atoi(): strtol() with base 0 after mangle_base(), into an int.
    stripped, base = _mangle_base(text.lstrip(_SYSTEMD_WHITESPACE))
    parsed = _strtoul(stripped, base)
    if parsed is None:
        return None
    magnitude, negative = parsed
    value = -magnitude if negative else magnitude
    if not _INT_MIN <= value <= _INT_MAX or not 0 <= value <= ERRNO_MAX:
        return None
    return value


# ---------------------------------------------------------------------------
# The socket
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sender:
    """What the kernel could still say about a datagram's sender when it was read.

    ``pid`` is the sender's pid as it sent (``SCM_CREDENTIALS``). Without a
    pidfd (``pinned`` false: a kernel before 6.5, or one that could not make
    it) that is all: whether the pid is still the sender's is unknown, and
    the caller looks its process group up itself, as before.

    With the sender's pidfd (``SCM_PIDFD``), which names that very process
    whatever becomes of its pid: ``running`` says whether it still existed
    (a zombie counts) once ``group`` had been read, so ``group`` is surely
    its own (a pid is not reused while its process exists); a sender that
    has been reaped has ``running`` false and no ``group``, and its ``pid``
    may be someone else's by now. ``cgroup_id`` is its cgroup v2 id (the
    inode of the cgroup's directory), or that at its exit once reaped
    (Linux 6.15), or None where the kernel does not say.
    """

    pid: int
    pinned: bool = False
    running: bool = True
    group: int | None = None
    cgroup_id: int | None = None


@dataclass(frozen=True, slots=True)
class Datagram:
    """One notification as received: who sent it, what it says, what it carries.

    ``pid``, ``uid`` and ``gid`` are the sender's credentials as the kernel
    attached them (``SCM_CREDENTIALS``), in the supervisor's pid namespace;
    ``sender`` is what its pidfd said (:class:`Sender`; the pidfd itself is
    closed already). ``fds`` are the fds the datagram carried when the message
    asked for them to be stored (``message.fd_store``); they are close-on-exec
    and now belong to the caller, who stores them or calls :meth:`close_fds`.
    Any other datagram's fds were closed on arrival, and ``fds`` is empty.
    """

    pid: int
    uid: int
    gid: int
    message: NotifyMessage
    sender: Sender
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        """Close every fd still in ``fds`` (for fds the caller will not store)."""
        while self.fds:
            os.close(self.fds.pop())


class _SilentLog:
    """Stands in for a structlog logger when :class:`NotifySocket` gets none."""

    def warning(self, event: str, **fields: Any) -> None:
        pass


class NotifySocket:
    """The datagram socket workers send sd_notify messages to.

    One ``AF_UNIX`` ``SOCK_DGRAM`` socket, non-blocking and close-on-exec,
    with ``SO_PASSCRED`` set before it is bound, so that every datagram
    arrives with its sender's credentials whether or not the sender attached
    them, and ``SO_PASSPIDFD`` where the kernel has it, so that it also
    arrives with a pidfd of its sender (systemd's ``manager_setup_notify()`` /
    ``notify_socket_prepare()``). Make one with :meth:`bind` (a path) or
    :meth:`bind_abstract`; put :attr:`address` in the workers'
    ``NOTIFY_SOCKET``; call :meth:`receive` when :meth:`fileno` is readable;
    :meth:`close` at the end. Datagrams that are dropped, and fds that are
    closed because nobody asked to store them, are logged through ``log`` (a
    structlog logger) as ``notify_datagram_dropped`` and
    ``notify_fds_closed``.
    """

    def __init__(
        self,
        sock: socket.socket,
        address: str,
        *,
        path: Path | None = None,
        inode: tuple[int, int] | None = None,
        log: Any = None,
    ) -> None:
        self._sock = sock
        self._address = address
        self._path = path
        self._inode = inode
        self._log = log if log is not None else _SilentLog()

    @classmethod
    def bind(cls, path: Path, *, mode: int = NOTIFY_SOCKET_MODE, log: Any = None) -> NotifySocket:
        """Bind a socket file at ``path`` (made absolute) with ``mode``.

        A socket file left behind at ``path`` by a process that is gone
        (connecting to it is refused) is removed first. Anything else there
        is left alone and :class:`BindError` is raised: a file that is not a
        socket, and a socket someone is still bound to (systemd unlinks
        whatever is at ``/run/systemd/notify``; it owns that path, we may not
        own ours). The directory must exist.
        """
        path = Path(os.path.abspath(path))
        _remove_stale_socket_file(path)
        sock = _new_socket()
        try:
            sock.bind(os.fsencode(path))
        except OSError as error:
            sock.close()
            raise BindError("NOTIFY_SOCKET", f"cannot bind {path}: {error}") from error
        try:
            status = os.lstat(path)
            # chmod() through the path: the result does not depend on the
            # process umask, and the file is never more open than ``mode``.
            os.chmod(path, mode)
        except OSError as error:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise BindError("NOTIFY_SOCKET", f"cannot set the mode of {path}: {error}") from error
        return cls(sock, str(path), path=path, inode=(status.st_dev, status.st_ino), log=log)

    @classmethod
    def bind_abstract(cls, name: str, *, log: Any = None) -> NotifySocket:
        """Bind ``name`` in the abstract namespace; :attr:`address` is ``@name``.

        An abstract socket has no file and no permissions: any process in the
        supervisor's network namespace can send to it, and it vanishes with
        the socket (systemd's ``notify_socket_prepare()`` autobinds its
        helpers' notify sockets in the abstract namespace). ``sd_notify()``
        reads a leading ``@`` in ``NOTIFY_SOCKET`` as the abstract namespace.
        """
        raw = os.fsencode(name)
        if not raw or b"\0" in raw:
            raise BindError("NOTIFY_SOCKET", f"invalid abstract socket name {name!r}")
        sock = _new_socket()
        try:
            sock.bind(b"\0" + raw)
        except OSError as error:
            sock.close()
            raise BindError("NOTIFY_SOCKET", f"cannot bind @{name}: {error}") from error
        return cls(sock, "@" + name, log=log)

    @classmethod
    def bind_unpredictable(
        cls, prefix: str, *, log: Any = None, attempts: int = NOTIFY_BIND_ATTEMPTS
    ) -> NotifySocket:
        """Bind ``prefix`` plus :data:`NOTIFY_NAME_BITS` random bits (hex) as an abstract name.

        The supervisor's notify socket: a predictable name (it used to be
        ``fdsupervisor/<pid>/notify``) can be bound by any local user before
        the supervisor binds it, which stopped the supervisor at start-up and,
        in an upgrade's exec, let that user receive the workers' ``FDSTORE=1``
        fds. A name that is taken all the same is drawn again, up to
        ``attempts`` times in all; then :class:`BindError` is raised.
        """
        error: BindError | None = None
        for _ in range(attempts):
            name = prefix + secrets.token_hex(NOTIFY_NAME_BITS // 8)
            try:
                return cls.bind_abstract(name, log=log)
            except BindError as exc:
                cause = exc.__cause__
                if not isinstance(cause, OSError) or cause.errno != _errno.EADDRINUSE:
                    raise
                error = exc
        raise BindError(
            "NOTIFY_SOCKET", f"no free abstract name in {attempts} random tries: {error}"
        )

    @classmethod
    def adopt(cls, fd: int, *, log: Any = None) -> NotifySocket:
        """Take over an abstract notify socket handed across an upgrade's exec.

        The socket stays bound the whole time, so its name is never free for
        someone else to bind and the workers' ``NOTIFY_SOCKET`` stays valid
        (systemd keeps its own notify socket across ``daemon-reexec`` the same
        way: ``manager_serialize()`` passes ``notify-fd`` in its fd set). The
        fd becomes close-on-exec and non-blocking again, with ``SO_PASSCRED``.
        Anything but a bound abstract ``AF_UNIX`` datagram socket is refused
        with :class:`BindError`, and ``fd`` is closed.
        """
        try:
            sock = socket.socket(fileno=fd)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise BindError("NOTIFY_SOCKET", f"cannot adopt fd {fd}: {error}") from error
        try:
            name = sock.getsockname() if sock.family == socket.AF_UNIX else None
            if sock.type != socket.SOCK_DGRAM or not isinstance(name, bytes) or name[:1] != b"\0":
                raise BindError(
                    "NOTIFY_SOCKET", f"fd {fd} is not a bound abstract unix datagram socket"
                )
            sock.set_inheritable(False)
            sock.setblocking(False)
            _pass_credentials(sock)
        except BaseException as error:
            sock.close()
            if isinstance(error, OSError):
                raise BindError("NOTIFY_SOCKET", f"cannot adopt fd {fd}: {error}") from error
            raise
        return cls(sock, "@" + os.fsdecode(name[1:]), log=log)

    @property
    def address(self) -> str:
        """The value for ``NOTIFY_SOCKET``: an absolute path, or ``@name``."""
        return self._address

    @property
    def path(self) -> Path | None:
        """The socket file, or ``None`` for an abstract socket."""
        return self._path

    def fileno(self) -> int:
        """The socket's fd, for the event loop (``-1`` once closed)."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket and remove its file if that is still the file it bound.

        A file someone else has put at the path since is left alone. Closing
        twice does nothing.
        """
        if self._path is not None and self._inode is not None:
            unlink_if_same(self._path, self._inode)
            self._inode = None
        self._sock.close()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def receive(self, max_datagrams: int = NOTIFY_RECEIVE_BATCH) -> list[Datagram]:
        """Read the pending datagrams, at most ``max_datagrams`` of them.

        Reads until the socket has nothing more (``EAGAIN``) or
        ``max_datagrams`` datagrams were read, valid or not; call again when
        the socket is still readable. Dropped, as systemd drops them, with
        their fds closed: a datagram longer than :data:`NOTIFY_BUFFER_MAX`
        (``MSG_TRUNC``), one whose fds did not all fit (``MSG_CTRUNC``), and
        one without credentials or with pid 0 (a sender whose pid this pid
        namespace cannot see). A barrier's fd is closed here, after every
        datagram before it was read. Any other error than ``EAGAIN`` is
        raised, and what this call had read is dropped with its fds: no fd
        ever leaks, whatever arrives.
        """
        received: list[Datagram] = []
        try:
            for _ in range(max_datagrams):
                try:
                    data, ancillary, msg_flags, _address = self._sock.recvmsg(
                        NOTIFY_BUFFER_MAX, _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                    )
                except BlockingIOError:
                    break
                datagram = self._accept(data, ancillary, msg_flags)
                if datagram is not None:
                    received.append(datagram)
        except BaseException:
            for datagram in received:
                _close_all(datagram.fds)
            raise
        return received

    def _accept(
        self, data: bytes, ancillary: list[tuple[int, int, bytes]], msg_flags: int
    ) -> Datagram | None:
        fds = fds_from_ancillary(ancillary)
        pidfd = -1
        credentials: tuple[int, int, int] | None = None
        try:
            for level, kind, payload in ancillary:
                if level != socket.SOL_SOCKET:
                    continue
                if kind == socket.SCM_CREDENTIALS and len(payload) == _UCRED.size:
                    sender_pid, uid, gid = _UCRED.unpack(payload)
                    credentials = (sender_pid, uid, gid)
                elif kind == SCM_PIDFD and len(payload) == 4:
                    # A negative value is the kernel's error making the pidfd
                    # (scm_pidfd_recv(): EMFILE, or a sender gone on a kernel
                    # before 6.16): no pidfd, the credentials alone.
                    pidfd = max(struct.unpack("i", payload)[0], -1)
            pid = credentials[0] if credentials is not None else None
            reason = None
            # The order of notify_recv_with_fds(): truncation, then credentials.
            if msg_flags & socket.MSG_CTRUNC:
                reason = "truncated control data (too many fds sent?)"
            elif msg_flags & socket.MSG_TRUNC:
                reason = f"message longer than {NOTIFY_BUFFER_MAX} bytes"
            elif credentials is None or credentials[0] <= 0:
                reason = "no valid sender credentials"
            if reason is not None:
                self._log.warning(
                    "notify_datagram_dropped", reason=reason, pid=pid, fds_closed=len(fds)
                )
                _close_all(fds)
                return None
            assert credentials is not None
            sender = identify(credentials[0], pidfd)
            message = parse_notify(data)
            if message.fd_store:
                kept, fds = fds, []
                return Datagram(*credentials, message, sender, kept)
            if message.barrier:
                if len(fds) != 1:
                    self._log.warning(
                        "notify_fds_closed",
                        pid=pid,
                        count=len(fds),
                        reason="BARRIER=1 takes exactly one fd",
                    )
            elif fds:
                # manager_dispatch_notify_fd(): "Got extra auxiliary fds
                # with notification message, closing them."
                self._log.warning(
                    "notify_fds_closed", pid=pid, count=len(fds), reason="sent without FDSTORE=1"
                )
            return Datagram(*credentials, message, sender)
        finally:
            _close_all(fds)
            if pidfd >= 0:
                _close_all([pidfd])  # every pidfd at once: none outlives its datagram


def _new_socket() -> socket.socket:
    # Python creates sockets close-on-exec (PEP 446).
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        _pass_credentials(sock)
    except OSError:
        sock.close()
        raise
    return sock


def _pass_credentials(sock: socket.socket) -> None:
    """``SO_PASSCRED``, and ``SO_PASSPIDFD`` where the kernel has it (Linux 6.5).

    As systemd's ``notify_socket_prepare()``: a kernel without
    ``SO_PASSPIDFD`` (``ENOPROTOOPT``) leaves the credentials alone.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_PASSPIDFD, 1)
    except OSError as error:
        if error.errno not in (_errno.ENOPROTOOPT, _errno.EINVAL):
            raise


def identify(pid: int, pidfd: int) -> Sender:
    """What pidfd ``pidfd`` (-1: none) says about the sender ``pid`` of a datagram.

    The process group is read first and the pidfd asked afterwards: a process
    that still exists then existed all along, and its pid was not reused in
    between, so the group read is its own. This is systemd's
    ``pidref_verify()`` after reading a ``/proc`` file of a pid.
    """
    if pidfd < 0:
        return Sender(pid)
    try:
        group: int | None = os.getpgid(pid)
    except OSError:
        group = None
    state = pidfd_state(pidfd)
    if state is None:
        return Sender(pid)
    running, cgroup_id = state
    if not running:
        return Sender(pid, pinned=True, running=False, cgroup_id=cgroup_id)
    return Sender(pid, pinned=True, group=group, cgroup_id=cgroup_id)


def pidfd_state(pidfd: int) -> tuple[bool, int | None] | None:
    """(whether the pidfd's process still exists, its cgroup id), or None when unknown.

    ``PIDFD_GET_INFO`` (Linux 6.13) says both in one call, and gives a reaped
    process's cgroup at its exit with ``PIDFD_INFO_EXIT`` (Linux 6.15);
    before 6.13, the ``Pid:`` of ``/proc/self/fdinfo/FD`` (-1 once reaped)
    says whether it exists, and nothing of its cgroup.
    """
    buffer = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("=Q", buffer, 0, _PIDFD_INFO_CGROUPID | _PIDFD_INFO_EXIT)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buffer)
    except OSError as error:
        if error.errno == _errno.ESRCH:  # reaped, and no exit information kept
            return False, None
        return _fdinfo_state(pidfd)
    mask, cgroup_id, _pid = _PIDFD_INFO.unpack_from(buffer)
    return bool(mask & _PIDFD_INFO_PID), cgroup_id if mask & _PIDFD_INFO_CGROUPID else None


def _fdinfo_state(pidfd: int) -> tuple[bool, int | None] | None:
    try:
        with open(f"/proc/self/fdinfo/{pidfd}", "rb") as fdinfo:
            text = fdinfo.read()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(b":")
        if key == b"Pid":
            try:
                return int(value) > 0, None
            except ValueError:
                return None
    return None


def _close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass  # fresh from the kernel: EINTR/EIO on close still release the fd


def _remove_stale_socket_file(path: Path) -> None:
    """Make room at ``path`` (binding.remove_stale_socket_file: the one implementation)."""
    remove_stale_socket_file(path, SocketKind.DATAGRAM, "NOTIFY_SOCKET")
