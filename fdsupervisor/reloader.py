"""The reload executor: a :class:`~fdsupervisor.reload.ReloadPlan` carried out, fd by fd.

SIGHUP or the monitor's ``reload`` re-reads the unit files, their users and
groups looked up (:func:`~fdsupervisor.spawn.load_units_resolved`),
:func:`~fdsupervisor.reload.plan_reload` compares them with the units running now (pure), and :class:`Reloader`
applies the plan in the order reload.py's docstring sets out: bind what
can be bound at once (a failure there changes nothing), relisten and move
kept sockets, stop the units whose workers must go; once those workers
have exited, close the old sockets, bind the ones that had to wait for
that, and start the new and changed units.

The Reloader never looks inside a unit's supervision: it asks its host (the
supervisor, through :class:`ReloadHost`) to stop, activate, fail, replace,
add or remove a unit, and the host tells it when a unit it waits for has
no workers left (:meth:`Reloader.unit_idle`).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from .binding import BoundSocket, InheritedFds, bind_socket, describe_socket
from .errors import BindError, ConfigErrors, FdSupervisorError
from .fdstore import FdStore, service_owner, unit_owner
from .loop import EventLoop
from .reload import ReloadPlan, SocketKey, plan_reload
from .service import Service
from .spawn import load_units_resolved
from .systemd import SystemdNotifier
from .units import SocketSpec, Unit


class ReloadHost(Protocol):
    """What a reload needs of the supervisor: its store, and each unit by name."""

    @property
    def store(self) -> FdStore: ...

    @property
    def notifier(self) -> SystemdNotifier: ...

    @property
    def loop(self) -> EventLoop: ...

    def unit_names(self) -> list[str]:
        """The units running now, in their order."""

    def unit(self, name: str) -> Unit: ...

    def has_workers(self, name: str) -> bool:
        """Whether any worker of the unit is still alive (stopping or not)."""

    def stop_service(self, name: str) -> None: ...

    def roll_service(self, unit: Unit, done: Callable[[str | None], None]) -> bool:
        """Replace the running unit's workers one at a time with ``unit``'s (rolling.py);
        ``done`` gets None or why it failed. False: it does not run, nothing was done."""

    def suspend_intake(self, name: str) -> None:
        """Stop watching the unit's sockets for traffic and accepting on them (moves)."""

    def activate(self, name: str) -> None:
        """Start the unit as its activation says: now, on traffic, or per connection."""

    def fail(self, name: str, reason: str) -> None: ...

    def replace_unit(self, unit: Unit, service: Service | None) -> None:
        """The running unit of that name becomes ``unit``; with ``service``, a fresh one."""

    def add_unit(self, unit: Unit) -> None:
        """Supervise a unit new to the supervisor (not started yet)."""

    def remove_unit(self, name: str) -> None:
        """Forget a unit whose workers are gone (its pending restarts too)."""

    def drop_stored(self, owner: str, name: str, reason: str) -> None:
        """Close a worker's stored fd (FDSTORE=1), as FDSTOREREMOVE=1 would."""

    def sync_systemd_store(self) -> None: ...


@dataclass(slots=True)
class PendingReload:
    """A reload waiting for the workers of changed and removed units to exit."""

    plan: ReloadPlan
    units: Mapping[str, Unit]
    fresh: dict[SocketKey, BoundSocket]
    waiting_units: set[str]
    rolled: set[str]  # restarted units whose workers are being replaced one at a time


class Reloader:
    """Carries out one reload at a time for ``host``; ``unit_paths`` are read again each time."""

    def __init__(self, host: ReloadHost, unit_paths: Sequence[Path], *, log: Any) -> None:
        self.host = host
        self.unit_paths = tuple(unit_paths)
        self.log = log
        self._pending: PendingReload | None = None

    @property
    def pending(self) -> PendingReload | None:
        """The reload under way, waiting for workers to exit; None when there is none."""
        return self._pending

    @property
    def in_progress(self) -> bool:
        return self._pending is not None

    def waits_for(self, name: str) -> bool:
        """Whether a reload waits for this unit's workers to exit (then it is not re-watched)."""
        return self._pending is not None and name in self._pending.waiting_units

    def unit_idle(self, name: str) -> None:
        """The unit ``name`` has no workers left: the reload goes on once none is awaited."""
        if self._pending is None:
            return
        self._pending.waiting_units.discard(name)
        if not self._pending.waiting_units:
            self.finish()

    def reload(self) -> dict[str, Any]:
        """Re-read the unit files; nothing changes unless all of them are valid.

        Every new socket that can be bound at once is bound before anything
        else happens, so a failure there also changes nothing. Then kept
        sockets are relistened or moved, and the units whose service or fd
        layout changed are stopped; once their workers are gone, their old
        sockets are closed, the sockets that had to wait for that are bound,
        and the new and changed units start.
        """
        host = self.host
        if self._pending is not None:
            raise self._refused("a reload is still in progress (waiting for workers to stop)")
        if not self.unit_paths:
            raise self._refused("this supervisor runs a command-line unit: nothing to reload")
        old_units = [host.unit(name) for name in host.unit_names()]
        try:
            new_units = load_units_resolved(self.unit_paths, old_units)
        except ConfigErrors as exc:
            raise self._refused(str(exc)) from None
        plan = plan_reload(old_units, new_units, self._added_sockets())
        if plan.problems:
            raise self._refused("\n".join(plan.problems))
        new_by_name = {unit.name: unit for unit in new_units}
        waiting = set(plan.bind_after_close)
        fresh: dict[SocketKey, BoundSocket] = {}
        try:
            for key in (*plan.bind_sockets, *plan.rebind_sockets):
                if key not in waiting:
                    fresh[key] = self._bind(new_by_name, key)
        except BindError as exc:
            for bound in fresh.values():
                bound.close()
            raise self._refused(str(exc)) from None
        host.notifier.reloading()
        self.log.info("reloading", plan=plan.summary())
        self._apply_now(plan, new_by_name)
        rolled = {
            name
            for name in plan.roll_units
            if host.roll_service(new_by_name[name], partial(self._rolled, name))
        }
        stopping = {*plan.stop_units, *plan.restart_units} - rolled
        for name in stopping:
            host.stop_service(name)
        self._pending = PendingReload(
            plan, new_by_name, fresh, {n for n in stopping if host.has_workers(n)}, rolled
        )
        if not self._pending.waiting_units:
            self.finish()
        return {"summary": plan.summary(), "waiting-for": sorted(stopping)}

    def _rolled(self, name: str, error: str | None) -> None:
        """A unit's rolling replacement is over: a failure is reported as a reload's."""
        if error is None:
            self.log.info("reload_rolled", unit=name)
            return
        self.log.error(
            "reload_failed",
            unit=name,
            error=error,
            note="its old workers keep running; its new definition applies at its next start",
        )
        self.host.notifier.status(f"reload failed: unit {name}: {error}")

    def _added_sockets(self) -> dict[SocketKey, SocketSpec]:
        """Sockets added to units at run time (socket-add), which no unit file declares."""
        added = {}
        for name in self.host.unit_names():
            declared = self.host.unit(name).socket_names
            for entry in self.host.store.owned_by(unit_owner(name)):
                if entry.name not in declared and isinstance(entry.resource, BoundSocket):
                    added[(name, entry.name)] = entry.resource.spec
        return added

    def _refused(self, reason: str) -> FdSupervisorError:
        self.log.error("reload_failed", error=reason, note="nothing was changed")
        self.host.notifier.status(f"reload failed, nothing changed: {reason.splitlines()[0]}")
        return FdSupervisorError(f"reload refused, nothing was changed: {reason}")

    def _bind(self, units: Mapping[str, Unit], key: SocketKey) -> BoundSocket:
        unit = units[key[0]]
        spec = _spec(units, key)
        # No inherited fd is claimed again: those are adopted at start-up only (reload.py).
        bound = bind_socket(spec, base_dir=unit.base_dir, inherited=InheritedFds(frozenset()))
        self.log.info(
            "socket_bound",
            unit=key[0],
            socket=key[1],
            address=describe_socket(bound.fileno()).address,
            kind=spec.kind.value,
            fd=bound.fileno(),
        )
        return bound

    def _apply_now(self, plan: ReloadPlan, units: Mapping[str, Unit]) -> None:
        """The part of a reload that needs no worker to stop: adoptions, backlogs and moves."""
        host, store = self.host, self.host.store
        for key in plan.adopt_sockets:  # a runtime socket, now declared: the same fd
            entry = store.get(unit_owner(key[0]), key[1])
            if entry is not None and isinstance(entry.resource, BoundSocket):
                entry.resource = dataclasses.replace(entry.resource, spec=_spec(units, key))
                self.log.info("socket_adopted", unit=key[0], socket=key[1], fd=entry.fd)
        for key in plan.relisten_sockets:
            entry = store.get(unit_owner(key[0]), key[1])
            if entry is not None and isinstance(entry.resource, BoundSocket):
                spec = _spec(units, key)
                if isinstance(entry.resource.sock, socket.socket):  # never a FIFO (reload._listens)
                    entry.resource.sock.listen(spec.backlog)
                entry.resource = dataclasses.replace(entry.resource, spec=spec)
        # The units a moved socket leaves stop using it first; unchanged ones resume below.
        involved = {old[0] for old, _new in plan.move_sockets} & set(host.unit_names())
        for name in involved:
            host.suspend_intake(name)
        moved = [(new, store.take(unit_owner(old[0]), old[1])) for old, new in plan.move_sockets]
        for new, resource in moved:
            spec = _spec(units, new)
            if isinstance(resource, BoundSocket):
                resource = dataclasses.replace(resource, name=new[1], spec=spec)
            store.add(unit_owner(new[0]), new[1], resource)
            if (
                new in plan.relisten_moved
                and isinstance(resource, BoundSocket)
                and isinstance(resource.sock, socket.socket)
            ):
                resource.sock.listen(spec.backlog)
        for name in plan.unchanged_units:
            host.replace_unit(units[name], None)
        for name in involved & set(plan.unchanged_units):
            host.activate(name)

    def finish(self) -> None:
        """The rest of the reload, once no worker it waits for is left (:meth:`unit_idle`)."""
        pending, self._pending = self._pending, None
        assert pending is not None
        host, store = self.host, self.host.store
        plan, units = pending.plan, pending.units
        for key in (*plan.close_sockets, *plan.rebind_sockets):
            entry = store.get(unit_owner(key[0]), key[1])
            if entry is not None:
                host.loop.remove_reader(entry.fd)
                store.close(entry.owner, entry.name)
                self.log.info("socket_closed", unit=key[0], socket=key[1], reason="reload")
        failed: set[str] = set()
        for key in plan.bind_after_close:
            try:
                pending.fresh[key] = self._bind(units, key)
            except BindError as exc:
                failed.add(key[0])
                self.log.error("reload_bind_failed", unit=key[0], socket=key[1], error=str(exc))
        for key, bound in pending.fresh.items():
            store.add(unit_owner(key[0]), key[1], bound)
        for name in plan.stop_units:
            host.remove_unit(name)
            store.close_owner(unit_owner(name))
            # What its workers stored (FDSTORE=1) would otherwise stay for good, out of
            # reach of every command and counted against --max-stored-fds. systemd
            # likewise empties a service's fd store once its unit is unloaded, whatever
            # its FileDescriptorStorePreserve= (fd-store-preserve) says.
            for entry in store.owned_by(service_owner(name)):
                host.drop_stored(entry.owner, entry.name, "its unit was removed by reload")
        running = set(host.unit_names())
        for name in (*plan.restart_units, *plan.start_units):
            if name in pending.rolled:
                continue  # its runner has the new unit already, and its workers are rolling
            unit = units[name]
            if name in running:
                host.replace_unit(unit, Service(name, unit.service))
            else:
                host.add_unit(unit)
            if name in failed:
                host.fail(name, "a socket could not be bound at reload")
            else:
                host.activate(name)
        summary = f"{len(host.unit_names())} units, {len(store)} fds; reloaded: {plan.summary()}"
        self.log.info("reloaded", plan=plan.summary())
        host.sync_systemd_store()
        host.notifier.ready(summary)


def _spec(units: Mapping[str, Unit], key: SocketKey) -> SocketSpec:
    """The new unit's spec of the socket ``key``."""
    return next(s for s in units[key[0]].sockets if s.name == key[1])
