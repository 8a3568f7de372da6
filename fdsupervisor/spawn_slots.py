"""Spawn slots: fd numbers low in the supervisor's table, kept free for the native spawn.

A child made by ``clone()`` copies the parent's whole fd table, and its
``execve()`` then closes all of it but the worker's fds: with one socket per
unit, a start at 10,000 units cost about three times one at 1,000
(docs/performance.md). With slots, the native spawn (``_spawn.c``) makes the
child on the parent's own table (``CLONE_FILES``); the child copies the fds the
worker needs into the slots and takes a table of its own that holds only the
fds below the last slot (``close_range(CLOSE_RANGE_UNSHARE)``). A start then
costs the same at any number of units.

The slots are reserved once, before any unit's socket is bound, so that they
are low: each holds a copy of one placeholder (``/dev/null``, close-on-exec),
which the spawn puts back after every start. Nothing else ever uses their
numbers. After an upgrade the new program reserves its own: the old one's
slots were close-on-exec, so the lowest free numbers are theirs again. Fds
that came before them (a large ``LISTEN_FDS`` from systemd's fd store) stay
below the slots and are copied at each start.
"""

from __future__ import annotations

import fcntl
import os
from typing import Final

# The fds one worker can take through the slots: its sockets and stored fds,
# stdin (inetd), stdout, stderr and its cgroup. A worker with more is started
# as before (the whole table copied): correct, only slower. 32 fds are
# counted in the supervisor's fd budget (cli.SUPERVISOR_FDS).
SPAWN_SLOTS: Final = 32


class SpawnSlots:
    """The reserved slots and their placeholder; one owner, one :meth:`close`."""

    __slots__ = ("anchor", "numbers")

    def __init__(self, anchor: int, numbers: tuple[int, ...]) -> None:
        self.anchor = anchor  # the placeholder every slot holds a copy of at rest
        self.numbers = numbers  # ascending

    @classmethod
    def reserve(cls, count: int = SPAWN_SLOTS) -> SpawnSlots:
        """``count`` slots at the lowest free fd numbers (raises OSError: none reserved)."""
        anchor = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        numbers: list[int] = []
        try:
            for _ in range(count):
                numbers.append(fcntl.fcntl(anchor, fcntl.F_DUPFD_CLOEXEC, 3))
        except OSError:
            for number in numbers:
                os.close(number)
            os.close(anchor)
            raise
        numbers.sort()
        return cls(anchor, tuple(numbers))

    def close(self) -> None:
        for number in self.numbers:
            os.close(number)
        os.close(self.anchor)
        self.numbers = ()
        self.anchor = -1
