"""The new program's side of an upgrade: take over the old program's fds and workers.

After the old program's ``execve()`` (upgrade.py), ``cli.run_upgraded``
builds a supervisor for the units the new program reads, and
:class:`Handover` takes over in three steps, each called by the supervisor:

1. :meth:`Handover.adopt`, before the start: every store entry the state
   names (a socket, or a worker's stored fd, watched for hang-ups again as
   it was), and the sockets the unit files have that the old program had not;
2. :meth:`Handover.restore_services`, during the start: each service's
   state and its running workers, supervised again (still this process's
   children: the exec kept its pid), and carried on where the old program left it;
3. :meth:`Handover.finish`, once the new program is ready: what the unit
   files no longer have goes (its sockets closed, its workers stopped).
   Not before: a take-over that fails until ready falls back to them.

If anything fails before ready, :meth:`Handover.abandon` closes what the
attempt opened and kills the workers it started, and the fallback takes
over the originals. The handled signals, blocked by the old program across
the exec, are unblocked by :func:`unblock_signals` once a program is ready.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from .addresses import FdAddress
from .binding import BoundSocket, InheritedFds, bind_socket, wrap_listening_fd
from .cgroups import WorkerCgroups
from .fdstore import FdStore, RawFd, owner_unit, unit_owner
from .reaper import ChildReaper
from .service import ExitStatus, Service, ServiceState
from .units import SocketKind, SocketSpec, Unit
from .upgrade import HandoverState, ServiceItem, StoredItem, WorkerItem


class HandoverHost(Protocol):
    """What a take-over needs of the new supervisor: its store, its reaper, each unit by name."""

    @property
    def store(self) -> FdStore: ...

    @property
    def inherited(self) -> InheritedFds: ...

    @property
    def cgroups(self) -> WorkerCgroups | None: ...

    @property
    def children(self) -> ChildReaper: ...

    def unit_names(self) -> list[str]: ...

    def unit(self, name: str) -> Unit: ...

    def service(self, name: str) -> Service: ...

    def sync_systemd_store(self) -> None: ...

    def signal_group(self, pid: int, signum: int) -> None:
        """Signal a worker's process group (and its cgroup)."""

    def adopt_worker(self, name: str, saved: WorkerItem) -> bool:
        """Supervise a handed-over worker of the unit again; False if it is gone."""

    def resume(self, name: str) -> None:
        """Carry a restored service on: start what was due, watch what was watched."""

    def worker_pids(self) -> list[int]:
        """Every worker this program supervises (handed over or started by it)."""

    def release_workers(self) -> None:
        """Stop supervising every worker: leave the processes alone, unreaped."""


class Handover:
    """The take-over of one handed-over state by ``host``."""

    def __init__(self, host: HandoverHost, *, log: Any) -> None:
        self.host = host
        self.log = log
        # Closed only once the new program is ready (finish): sockets of units gone
        # from the unit files, and workers of such units.
        self._leftovers: list[tuple[str, BoundSocket]] = []
        self._orphans: list[int] = []

    def adopt(self, state: HandoverState, *, bind_new: bool = True) -> None:
        """Take over the old program's fds, then bind what is new.

        Sockets of units that are gone from the unit files are closed once the
        new program is ready (:meth:`finish`), not before: a take-over
        that fails until then falls back to them. Sockets the unit files have
        and the old program had not are bound, unless ``bind_new`` is false (the
        fallback: only what was handed over). (A change of configuration is a
        reload's business; this only keeps both in step.)
        """
        host, store = self.host, self.host.store
        running = host.unit_names()
        wanted = {(name, s.name): s for name in running for s in host.unit(name).sockets}
        for item in state.store:
            os.set_inheritable(item.fd, False)
            unit = owner_unit(item.owner)
            if not item.socket:
                # polled for POLLHUP (FDPOLL) if the old program polled it
                store.add(item.owner, item.name, RawFd(item.fd), watch=item.watch_hangup)
                continue
            spec = wanted.pop((unit, item.name), None) if unit is not None else None
            if unit is not None and unit not in running:
                leftover = BoundSocket(
                    item.name,
                    _runtime_spec(item),
                    wrap_listening_fd(item.fd, item.kind),
                    Path(item.created_path) if item.created_path else None,
                    created_inode=item.created_inode,
                )
                self._leftovers.append((unit, leftover))
                continue
            store.add(item.owner, item.name, handed_socket(item, spec or _runtime_spec(item)))
        for (unit_name, _socket_name), spec in wanted.items():
            if not bind_new:
                # The old program did not hold it either (socket-del, or a bind
                # that failed at a reload): the fallback changes nothing.
                self.log.warning(
                    "socket_not_bound", unit=unit_name, socket=spec.name, reason="not handed over"
                )
                continue
            base_dir = host.unit(unit_name).base_dir
            bound = bind_socket(spec, base_dir=base_dir, inherited=host.inherited)
            store.add(unit_owner(unit_name), spec.name, bound)
        self.log.info("handover_adopted", fds=len(state.fds), services=len(state.services))
        host.sync_systemd_store()

    def restore_services(self, state: HandoverState) -> None:
        """Each service as the old program left it, its running workers supervised again."""
        host = self.host
        running = set(host.unit_names())
        for name, item in state.services.items():
            if name not in running:
                # stopped by finish(), once this program is ready
                self._orphans.extend(worker.pid for worker in item.workers)
                continue
            _restore(host.service(name), item)
            for saved in item.workers:
                host.adopt_worker(name, saved)
            host.resume(name)

    def finish(self) -> None:
        """Once the new program is ready: close and stop what the unit files no longer have."""
        leftovers, self._leftovers = self._leftovers, []
        for unit, bound in leftovers:
            self.log.warning(
                "socket_closed",
                unit=unit,
                socket=bound.name,
                reason="its unit is gone from the unit files",
            )
            bound.close()
        orphans, self._orphans = self._orphans, []
        for pid in orphans:
            self._orphan(pid)

    def abandon(self, state: HandoverState) -> None:
        """Undo a take-over that failed before it was ready: close what this program opened.

        ``state`` is what it was given (:func:`~fdsupervisor.upgrade.copy_fds`:
        copies of the handed-over fds); the copies are closed too, but not the
        socket files they share with the originals, which still serve them.
        Workers this program started are killed and reaped; the handed-over
        ones are left alone. What the supervisor opened for itself (its loop,
        its monitor, its notify and wake-up sockets) is its own to close.
        """
        host, store = self.host, self.host.store
        handed_fds = set(state.fds)
        handed_pids = {w.pid for item in state.services.values() for w in item.workers}
        for pid in host.worker_pids():
            if pid not in handed_pids:
                host.signal_group(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        host.release_workers()
        for entry in store:
            fd, resource = entry.fd, store.take_entry(entry)
            if fd in handed_fds and isinstance(resource, BoundSocket):
                resource.sock.close()  # the original still serves its file
            else:
                resource.close()
        for _unit, bound in self._leftovers:
            bound.sock.close()
        self._leftovers.clear()
        self._orphans.clear()

    def _orphan(self, pid: int) -> None:
        """A worker of a unit that no longer exists: stop it, and still reap it."""
        try:  # still our child (the exec kept our pid), unless it was reaped
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        cgroups = self.host.cgroups
        if cgroups is not None:
            cgroups.adopt(pid)
        self.host.children.watch(pid, _RemovedWorker(cgroups))
        self.host.signal_group(pid, signal.SIGTERM)


class _RemovedWorker:
    """The owner of a worker whose unit is gone (reaper.ChildOwner): its cgroup goes with it."""

    __slots__ = ("_cgroups",)

    def __init__(self, cgroups: WorkerCgroups | None) -> None:
        self._cgroups = cgroups

    def child_exiting(self, pid: int) -> None:
        """Nothing to do before the reap: no runner counts on this worker."""

    def child_reaped(self, pid: int, wait_status: int) -> None:
        if self._cgroups is not None:
            self._cgroups.release(pid)


def _restore(service: Service, item: ServiceItem) -> None:
    service.restore(
        ServiceState(item.state),
        restarts=item.restarts,
        last_exit=ExitStatus(**item.last_exit) if item.last_exit else None,
        status=item.status,
        failure=item.failure,
        connections=item.connections,
    )


def handed_socket(item: StoredItem, spec: SocketSpec) -> BoundSocket:
    """The handed-over socket ``item`` as the new program's own (close-on-exec again).

    Its socket file, if the old program created one, is still removed at the end.
    """
    os.set_inheritable(item.fd, False)
    return BoundSocket(
        item.name,
        spec,
        wrap_listening_fd(item.fd, item.kind),
        Path(item.created_path) if item.created_path else None,
        adopted=True,
        created_inode=item.created_inode,
    )


def _runtime_spec(item: StoredItem) -> SocketSpec:
    """A spec for a socket added at run time, which no unit file describes."""
    return SocketSpec(
        name=item.name,
        address=FdAddress(str(item.fd)),
        kind=SocketKind(item.kind),
        backlog=item.backlog,
    )


def unblock_signals(signals: Sequence[int]) -> None:
    """The handled signals, blocked by the old program since before its exec, arrive now.

    Call once the supervisor's handlers are installed (``Supervisor.start``).
    A SIGUSR2 that came meanwhile asked for the upgrade that has just happened
    (or failed): dropped, as the old program drops one that comes while it
    prepares the upgrade.
    """
    if signal.SIGUSR2 in signal.sigpending():
        signal.sigtimedwait([signal.SIGUSR2], 0)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
