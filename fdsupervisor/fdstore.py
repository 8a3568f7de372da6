"""The named-FD store: the only owner of the supervisor's long-lived fds.

Fourth step of the flow. Every listening socket of a unit, every fd a
monitor client hands in with ``getfd`` and every fd a worker keeps with
``FDSTORE=1`` lives here under an owner and a name. Names are unique per
owner: ``unit:web`` may have ``http`` while ``unit:api`` has one too, and
the monitor's own names (``getfd``) are the owner ``monitor``. The one
exception is a service's store (``service:NAME``): there, as in systemd's
fd store, several fds may share one ``FDNAME`` (each is an entry of its
own, in the order stored), and removing the name removes all of them
(``FDSTOREREMOVE=1``, sd_notify(3)).

An entry holds a *resource*: anything with ``fileno()`` and ``close()``
(a bound socket, or a :class:`RawFd`). Whoever takes a resource out of the
store (:meth:`FdStore.take`) owns it from then on.

The store is the one owner of store changes and of their events: every fd
that a monitor client or a worker adds (``FD_STORED``) or that leaves the
store (``FD_CLOSED``) is reported to ``on_change``, which the supervisor
wires to the monitor's events. Unit sockets come from configuration and
have their own events (``SOCKET_ADDED`` / ``SOCKET_REMOVED``).

The store also watches the entries it is asked to for hang-ups (``FDPOLL``,
the default for fds a worker stores): an inner epoll with no events
requested reports only ``EPOLLHUP`` / ``EPOLLERR``, as systemd's fd store
does with its event sources. The supervisor's loop watches that one epoll fd
(:meth:`FdStore.hangup_fileno`) and asks :meth:`FdStore.hung_up` which
entries to drop.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal, Protocol

from .errors import FdSupervisorError

# The owners (SPEC 5, query-fds): "unit:NAME" (its sockets), "service:NAME"
# (what its workers stored with FDSTORE=1) and "monitor" (getfd). These
# functions are the only place that builds or reads the prefixes.
MONITOR_OWNER: Final = "monitor"
_UNIT_PREFIX: Final = "unit:"
_SERVICE_PREFIX: Final = "service:"

OwnerKind = Literal["unit", "service", "monitor"]


def unit_owner(unit_name: str) -> str:
    return f"{_UNIT_PREFIX}{unit_name}"


def service_owner(unit_name: str) -> str:
    return f"{_SERVICE_PREFIX}{unit_name}"


def owner_unit(owner: str) -> str | None:
    """The unit whose socket this owner is (``unit:web`` → ``web``), else None."""
    return owner.removeprefix(_UNIT_PREFIX) if owner.startswith(_UNIT_PREFIX) else None


def owner_service(owner: str) -> str | None:
    """The unit whose workers stored fds under this owner (``service:web`` → ``web``), else None."""
    return owner.removeprefix(_SERVICE_PREFIX) if owner.startswith(_SERVICE_PREFIX) else None


def owner_kind(owner: str) -> OwnerKind:
    """Which of the three kinds of owner ``owner`` is; anything else is a StoreError."""
    if owner.startswith(_UNIT_PREFIX):
        return "unit"
    if owner.startswith(_SERVICE_PREFIX):
        return "service"
    if owner == MONITOR_OWNER:
        return "monitor"
    raise StoreError(f"unknown fd owner {owner!r}")


class Resource(Protocol):
    def fileno(self) -> int: ...

    def close(self) -> None: ...


class RawFd:
    """An fd received from outside (SCM_RIGHTS) that nothing else wraps."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        if self._fd < 0:
            raise ValueError("fd is closed")
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership: the caller now owns the returned fd."""
        fd, self._fd = self._fd, -1
        return fd

    def __repr__(self) -> str:
        return f"RawFd({self._fd})"


class StoreError(FdSupervisorError):
    pass


@dataclass(slots=True, eq=False)
class Entry:
    """One stored fd: ``resource`` may be replaced in place (a reload's new spec).

    ``slot`` tells apart the fds of one name in a service's store (0 elsewhere).
    """

    owner: str
    name: str
    resource: Resource
    slot: int = 0

    @property
    def fd(self) -> int:
        return self.resource.fileno()


FD_STORED: Final = "FD_STORED"
FD_CLOSED: Final = "FD_CLOSED"
StoreEvent = Literal["FD_STORED", "FD_CLOSED"]
OnChange = Callable[[StoreEvent, Entry], None]


class FdStore:
    """Owner-and-name → fd. ``limit`` bounds the entries that clients add.

    Unit sockets come from configuration and are not counted against the
    limit; fds handed in by monitor clients and by workers are, so that no
    client can exhaust the supervisor's fd table.

    ``on_change(event, entry)`` hears of every change to those counted
    entries: ``FD_STORED`` after each :meth:`add` (a replacement is one
    ``FD_STORED``: the name is still stored), ``FD_CLOSED`` after each
    :meth:`take`, :meth:`close` and :meth:`close_owner` of one. Unit entries
    make no event, nor does :meth:`close_all` (the supervisor is going away).
    """

    def __init__(self, limit: int = 1024, on_change: OnChange | None = None) -> None:
        self.limit = limit
        self.on_change = on_change
        self._entries: dict[tuple[str, str, int], Entry] = {}  # (owner, name, slot) → entry
        # The same entries by owner, and how many are counted: a worker's start
        # asks for its unit's fds, and a walk of every entry there made each
        # start cost O(units) (docs/performance.md, "Scale"). A list per owner, in the
        # order stored: an owner keeps a few fds (a unit's sockets), and a dict of one
        # entry cost 300 bytes per unit (docs/performance.md, RSS at 10,000 units).
        self._by_owner: dict[str, list[Entry]] = {}
        self._counted = 0
        # Made on first use and closed by close_all(): a store that watches
        # nothing holds no epoll fd.
        self._hangups: select.epoll | None = None
        self._watched: dict[int, Entry] = {}  # fd → its entry

    def _changed(self, event: StoreEvent, entry: Entry) -> None:
        if self.on_change is not None and owner_kind(entry.owner) != "unit":
            self.on_change(event, entry)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def __contains__(self, key: tuple[str, str]) -> bool:
        return self.get(*key) is not None

    def counted(self) -> int:
        return self._counted

    def get(self, owner: str, name: str) -> Entry | None:
        """The entry ``owner`` keeps as ``name`` (of several in a service's store: the first)."""
        entry = self._entries.get((owner, name, 0))
        if entry is not None or owner_kind(owner) != "service":
            return entry
        return next(iter(self.named(owner, name)), None)

    def named(self, owner: str, name: str) -> list[Entry]:
        """Every entry ``owner`` keeps as ``name``, in the order stored."""
        return [e for e in self._by_owner.get(owner, ()) if e.name == name]

    def owned_by(self, owner: str) -> list[Entry]:
        return list(self._by_owner.get(owner, ()))

    def _put(self, entry: Entry) -> None:
        key = (entry.owner, entry.name, entry.slot)
        old = self._entries.get(key)
        if old is None and owner_kind(entry.owner) != "unit":
            self._counted += 1
        self._entries[key] = entry
        owned = self._by_owner.setdefault(entry.owner, [])
        if old is None:
            owned.append(entry)
        else:  # in its place
            owned[next(i for i, e in enumerate(owned) if e is old)] = entry

    def _delete(self, entry: Entry) -> None:
        del self._entries[(entry.owner, entry.name, entry.slot)]
        if owner_kind(entry.owner) != "unit":
            self._counted -= 1
        owned = self._by_owner[entry.owner]
        owned.remove(entry)  # Entry compares by identity (eq=False)
        if not owned:
            del self._by_owner[entry.owner]

    def add(
        self,
        owner: str,
        name: str,
        resource: Resource,
        *,
        replace: bool = False,
        watch: bool = False,
    ) -> None:
        """Store ``resource``; on any refusal the resource is closed, never leaked.

        With ``replace``, an existing entry of the same owner and name is
        closed and replaced (``getfd`` semantics, as in QEMU's monitor; in a
        service's store every fd of the name). Without it, in a service's
        store, the fd is added beside those of the same name, as systemd
        keeps them. ``watch``: watched for hang-ups (:meth:`watch_hangup`) from
        before ``FD_STORED`` is heard.
        """
        try:
            kind = owner_kind(owner)
            beside = kind == "service" and not replace
            olds = [] if beside else self.named(owner, name)
            if olds and not replace:
                raise StoreError(f"an fd named '{name}' already exists for {owner}")
            if not olds and kind != "unit" and self.counted() >= self.limit:
                raise StoreError(f"the fd store is full ({self.limit} fds); close some first")
        except StoreError:
            resource.close()
            raise
        slot = 1 + max((e.slot for e in self.named(owner, name)), default=-1) if beside else 0
        for old in olds:
            if old.slot != slot:  # slot 0 is replaced in place: the entry keeps its position
                self._delete(old)
        entry = Entry(owner, name, resource, slot)
        self._put(entry)
        for old in olds:
            self._unwatch(old)
            old.resource.close()
        if watch:
            self._watch(entry)
        self._changed(FD_STORED, entry)

    def _pop(self, entry: Entry) -> Entry:
        self._delete(entry)
        self._unwatch(entry)
        return entry

    def _found(self, owner: str, name: str) -> Entry:
        entry = self.get(owner, name)
        if entry is None:
            raise StoreError(f"File descriptor named '{name}' not found")
        return entry

    def take(self, owner: str, name: str) -> Resource:
        """Remove an entry without closing it; the caller owns the resource."""
        return self.take_entry(self._found(owner, name))

    def take_entry(self, entry: Entry) -> Resource:
        """Remove this very entry without closing it; the caller owns the resource."""
        self._pop(entry)
        self._changed(FD_CLOSED, entry)
        return entry.resource

    def close(self, owner: str, name: str) -> None:
        """Close the entry ``name`` of ``owner`` (in a service's store: every fd of the name)."""
        for entry in self.named(owner, name) or [self._found(owner, name)]:
            self.close_entry(entry)

    def close_entry(self, entry: Entry) -> None:
        """Close this very entry (one fd of a name that has several)."""
        self._pop(entry)
        entry.resource.close()
        self._changed(FD_CLOSED, entry)

    def close_owner(self, owner: str) -> int:
        entries = self.owned_by(owner)
        for entry in entries:
            self.close_entry(entry)
        return len(entries)

    def close_all(self) -> None:
        """Close every entry and the hang-up watch."""
        entries, self._entries = list(self._entries.values()), {}
        self._by_owner.clear()
        self._counted = 0
        self._watched.clear()
        if self._hangups is not None:
            self._hangups.close()
            self._hangups = None
        for entry in entries:
            entry.resource.close()

    # -- the hang-up watch (FDPOLL) ------------------------------------------------------

    def hangup_fileno(self) -> int:
        """The epoll fd that becomes readable when a watched entry hangs up."""
        if self._hangups is None:
            self._hangups = select.epoll()
        return self._hangups.fileno()

    def watch_hangup(self, owner: str, name: str) -> bool:
        """Report the entry from :meth:`hung_up` once it hangs up; False: not pollable.

        A regular file cannot be polled (``EPERM``): it stays stored, unwatched,
        until it is removed. The watch ends when the entry is closed or taken.
        Of a name with several fds, each is watched (and dropped) on its own.
        """
        entries = self.named(owner, name)
        if not entries:
            raise StoreError(f"File descriptor named '{name}' not found")
        pollable = True
        for entry in entries:
            pollable = self._watch(entry) and pollable
        return pollable

    def _watch(self, entry: Entry) -> bool:
        fd = entry.fd
        if fd in self._watched:
            return True
        self.hangup_fileno()
        assert self._hangups is not None
        try:
            self._hangups.register(fd, 0)
        except OSError:
            return False
        self._watched[fd] = entry
        return True

    def watches_hangup(self, owner: str, name: str) -> bool:
        entries = self.named(owner, name)
        return bool(entries) and all(self._watched.get(e.fd) is e for e in entries)

    def watches(self, entry: Entry) -> bool:
        """Whether this very entry is watched for hang-ups."""
        return self._watched.get(entry.fd) is entry

    def hung_up(self) -> list[Entry]:
        """Every watched entry that hung up, no longer watched.

        Level-triggered: an entry reported here would be reported again at
        every poll until closed, so it is unwatched now; closing it is the
        caller's choice (and its log line's).
        """
        if self._hangups is None:
            return []
        entries = []
        for fd, _events in self._hangups.poll(0):
            entry = self._watched.pop(fd, None)
            with contextlib.suppress(OSError):
                self._hangups.unregister(fd)
            if entry is not None:
                entries.append(entry)
        return entries

    def _unwatch(self, entry: Entry) -> None:
        # Before the fd is closed: epoll would keep watching the open file
        # description for as long as a duplicate of it (a worker's) lives.
        fd = entry.resource.fileno()
        if self._watched.get(fd) is entry:
            del self._watched[fd]
            assert self._hangups is not None
            with contextlib.suppress(OSError):
                self._hangups.unregister(fd)
