"""Sockets added and removed at run time (the monitor's ``socket-add`` / ``socket-del``).

A runtime socket is an entry of the one store like a unit's own sockets,
owned by ``unit:NAME`` (that unit's next workers get it) or by the monitor.
``socket-del`` closes it only when no running worker holds it: a worker
started before the socket was added does not (SPEC 5), which each runner
knows from the fds its workers' spawns were given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .binding import BoundSocket, describe_socket
from .errors import FdSupervisorError
from .fdstore import Entry, FdStore, owner_unit, unit_owner
from .runner import UnitRunner


class RuntimeSockets:
    """The store's runtime sockets, kept in step with the runners and systemd's fd store."""

    def __init__(
        self,
        store: FdStore,
        runners: Mapping[str, UnitRunner],
        log: Any,
        emit: Callable[[str, dict[str, Any]], None],
        sync_systemd_store: Callable[[], None],
    ) -> None:
        self._store = store
        self._runners = runners
        self._log = log
        self._emit = emit
        self._sync = sync_systemd_store

    def add(self, owner: str, bound: BoundSocket) -> None:
        """Store a socket bound at run time; a unit's next workers get it."""
        self._store.add(owner, bound.name, bound)
        unit = owner_unit(owner)
        address = describe_socket(bound.fileno()).address
        self._log.info(
            "socket_bound",
            unit=unit,
            socket=bound.name,
            address=address,
            kind=bound.spec.kind.value,
            fd=bound.fileno(),
        )
        entry = self._store.get(owner, bound.name)
        if unit is not None and entry is not None:
            self._runners[unit].on_socket_added(entry)
        self._sync()
        self._emit("SOCKET_ADDED", {"id": bound.name, "unit": unit, "address": address})

    def remove(self, socket_id: str, unit_name: str | None) -> None:
        """Close a socket no running worker holds, or say which workers hold it."""
        entry = self._find(socket_id, unit_name)
        unit = owner_unit(entry.owner)
        if unit is not None:
            runner = self._runners[unit]
            holders = runner.holders(entry)  # a worker started before socket-add does not
            if holders:
                pids = ", ".join(str(p) for p in holders)
                raise FdSupervisorError(
                    f"socket '{socket_id}' is in use by unit '{unit}' (held by running pids {pids}); "
                    "stop the service first"
                )
            runner.on_socket_removed(entry)
        self._store.close(entry.owner, entry.name)
        self._log.info("socket_removed", unit=unit, socket=socket_id)
        self._sync()
        self._emit("SOCKET_REMOVED", {"id": socket_id, "unit": unit})

    def _find(self, socket_id: str, unit_name: str | None) -> Entry:
        candidates = [
            e
            for e in self._store
            if e.name == socket_id
            and isinstance(e.resource, BoundSocket)
            and (unit_name is None or e.owner == unit_owner(unit_name))
        ]
        if not candidates:
            raise FdSupervisorError(f"socket '{socket_id}' not found")
        if len(candidates) > 1:
            owners = ", ".join(e.owner for e in candidates)
            raise FdSupervisorError(f"socket '{socket_id}' is ambiguous ({owners}); give 'unit'")
        return candidates[0]
