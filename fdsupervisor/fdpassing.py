"""The fd-passing protocol's facts, shared by every module that hands fds on or takes them in.

Three parties speak it with the supervisor: the workers it starts (fds at 3,
4, ... with ``LISTEN_FDS`` / ``LISTEN_FDNAMES``, spawn.py), systemd, which
starts the supervisor the same way and keeps fds for it (systemd.py), and
the processes that send fds over Unix sockets with ``SCM_RIGHTS``: workers'
``FDSTORE=1`` (notify.py), monitor clients (monitor.py) and our own client
(ctl.py). Each fact of that protocol is stated here once, with where it comes
from; nothing here touches a socket (:func:`same_file` only looks at two fds).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import stat
from collections.abc import Iterable, Mapping
from typing import Final

LISTEN_FDS_START: Final = 3
"""The first passed fd: ``SD_LISTEN_FDS_START`` of ``<systemd/sd-daemon.h>``.

``_spawn.c`` keeps a C ``#define`` of the same value (it cannot import this
module); ``fdsupervisor._spawn.LISTEN_FDS_START`` exposes it, and the tests
check that the two agree.
"""

# The supervisor's own protocol variables (systemd.exec(5), "Environment
# Variables Set or Propagated by the Service Manager"). They describe what
# the supervisor's parent gave *this* process; a worker that saw them would
# act on fds and sockets that are not its own (sd_listen_fds(unset_environment=1)
# and sd_notify(unset_environment=1) drop them for the same reason). The
# spawn plan sets a worker's own LISTEN_*, NOTIFY_SOCKET and WATCHDOG_* afresh.
SUPERVISOR_ONLY_ENV: Final = (
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_PIDFDID",  # systemd >= 257: the pidfd inode id that goes with LISTEN_PID
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "FDSTORE",  # systemd >= 254: FileDescriptorStoreMax= of the service
)


def scrub_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``environ`` without :data:`SUPERVISOR_ONLY_ENV`: what a worker may inherit."""
    return {key: value for key, value in environ.items() if key not in SUPERVISOR_ONLY_ENV}


FDNAME_MAX: Final = 255
"""systemd's ``FDNAME_MAX``: :func:`fdname_is_valid` refuses longer names."""

SCM_MAX_FD: Final = 253
"""Linux's ``SCM_MAX_FD`` (include/net/scm.h): at most this many fds in one ``sendmsg()``.

The kernel refuses more with ``EINVAL``; ``sd_pid_notify_with_fds()`` fails
with ``E2BIG`` above it.
"""

FD_SIZE: Final = array.array("i").itemsize
"""An fd in ``SCM_RIGHTS`` data is a C ``int``."""


def fdname_is_valid(name: bytes | str) -> bool:
    """systemd's ``fdname_is_valid()`` (src/basic/fd-util.c).

    "We basically allow everything ASCII that's not a control character.
    Also, as special exception the ':' character is not allowed, as we use
    that as field separator in $LISTEN_FDNAMES." At most :data:`FDNAME_MAX`
    characters; the empty name is valid. sd_notify(3) on ``FDNAME=``: "If a
    submitted name does not follow these restrictions, it is ignored".
    """
    codes = name if isinstance(name, bytes) else [ord(c) for c in name]
    return len(codes) <= FDNAME_MAX and all(0x20 <= c < 0x7F and c != 0x3A for c in codes)


def rights_space(max_fds: int) -> int:
    """The ``recvmsg()`` control buffer size that holds ``max_fds`` fds of ``SCM_RIGHTS``."""
    return socket.CMSG_SPACE(max_fds * FD_SIZE)


def rights(fds: Iterable[int]) -> tuple[int, int, bytes]:
    """The ``sendmsg()`` ancillary item that passes ``fds``."""
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


def fds_from_ancillary(ancillary: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """Every fd that ``recvmsg()``'s ancillary data carries in ``SCM_RIGHTS``, in order.

    The kernel installed each of them in our fd table already: the caller
    owns them all, and must close what it does not keep, whatever else the
    message holds. A trailing partial int (a control buffer cut short) is
    ignored, as CPython's own ``socket.recv_fds()`` does; other levels and
    kinds (``SCM_CREDENTIALS``) are left to the caller.
    """
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % FD_SIZE])
            fds.extend(received)
    return fds


def same_file(a: int, b: int) -> bool:
    """Whether fds ``a`` and ``b`` are one open file description (a duplicate of each other).

    systemd's fd store keeps one copy of each: ``service_add_fd_store()``
    suppresses a duplicate with ``same_fd()`` (src/basic/fd-util.c), whose
    last resort this is: the same inode, the same flags, and a flip of
    ``O_NONBLOCK`` on one that the other sees. A socket needs no flip: its
    inode cannot be opened again (``open()`` of ``/proc/self/fd/N`` fails with
    ``ENXIO``), so one socket inode is one description.
    """
    first, second = os.fstat(a), os.fstat(b)
    if (first.st_dev, first.st_ino) != (second.st_dev, second.st_ino):
        return False
    if stat.S_ISSOCK(first.st_mode):
        return True
    flags = fcntl.fcntl(a, fcntl.F_GETFL)
    if flags != fcntl.fcntl(b, fcntl.F_GETFL):
        return False
    fcntl.fcntl(a, fcntl.F_SETFL, flags ^ os.O_NONBLOCK)
    try:
        return fcntl.fcntl(b, fcntl.F_GETFL) != flags
    finally:
        fcntl.fcntl(a, fcntl.F_SETFL, flags)
