"""The supervisor: the event loop that wires the flow together.

It binds every unit's sockets into the :class:`~fdsupervisor.fdstore.FdStore`
(all of them, or none: a bind failure closes what was bound), makes one
:class:`~fdsupervisor.runner.UnitRunner` per unit and has each activate its
unit, and then lives on events. What happens to one unit (a worker's pidfd
becomes readable, a restart or stop timer fires, traffic arrives, a worker
notifies) is its runner's business; the supervisor reads the notify socket
and hands each message to the runner of the worker that sent it, answers
the monitor's commands, and handles signals (SIGTERM/SIGINT: shut down,
SIGHUP: reload, SIGUSR2: upgrade).

Signal handlers do nothing but wake the loop (``signal.set_wakeup_fd``),
as gunicorn's arbiter and asyncio do; all work happens in the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from . import __version__
from .addresses import FdAddress
from .binding import BoundSocket, InheritedFds, adopt_socket, bind_socket, describe_socket
from .cgroups import WorkerCgroups
from .commands import Commands, fd_event_data
from .errors import BindError, ConfigErrors, FdSupervisorError
from .fdpassing import scrub_environment
from .fdstore import FdStore, RawFd, owner_unit, service_owner, unit_owner
from .log import RateLimitedLog
from .loop import EventLoop, Timer
from .monitor import MonitorServer, event_line
from .notify import NotifySocket
from .reload import ReloadPlan, SocketKey, plan_reload
from .runner import RunnerContext, UnitRunner, find_sender, signal_group
from .service import ExitStatus, Service, ServiceState
from .systemd import (
    SystemdNotifier,
    SystemdSockets,
    adoptable,
    fd_store_name,
    stored_socket_mismatch,
)
from .units import SocketKind, SocketSpec, Unit, load_units
from .upgrade import (
    HANDOVER_ENV,
    HandoverState,
    RunConfig,
    ServiceItem,
    StoredItem,
    UnitFile,
    WorkerItem,
    set_inheritable,
    write_state,
)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
# The notify socket's abstract name, before its random part (NotifySocket.bind_unpredictable).
NOTIFY_NAME_PREFIX = "fdsupervisor/notify/"
# The new program's check before an upgrade blocks the loop; keep it well
# under half of a typical WatchdogSec= (30 s in contrib/), pinged before and after.
PREFLIGHT_TIMEOUT = 10.0


@dataclass(slots=True)
class PendingReload:
    """A reload waiting for the workers of changed and removed units to exit."""

    plan: ReloadPlan
    units: Mapping[str, Unit]
    fresh: dict[SocketKey, BoundSocket]
    waiting_units: set[str]


class Supervisor:
    def __init__(
        self,
        units: Sequence[Unit],
        *,
        log: Any,
        inherited: InheritedFds,
        environ: Mapping[str, str],
        max_stored_fds: int = 1024,
        notifier: SystemdNotifier | None = None,
        unit_paths: Sequence[Path] = (),
        exec_argv: Sequence[str] = (),
        systemd_sockets: SystemdSockets | None = None,
        run_config: RunConfig | None = None,
        use_cgroups: bool = True,
    ) -> None:
        self.log = log
        # Each worker in a cgroup of its own (cgroups.py), made at start(); None:
        # process groups only, and processes that escaped them are logged after a stop.
        self.use_cgroups = use_cgroups
        self.cgroups: WorkerCgroups | None = None
        self.environ = dict(environ)
        self.inherited = inherited
        self.loop = EventLoop()
        # The store reports its own changes (FD_STORED / FD_CLOSED) to the listeners.
        self.store = FdStore(
            limit=max_stored_fds,
            on_change=lambda event, entry: self.emit(event, dict(fd_event_data(entry))),
        )
        self.notifier = notifier or SystemdNotifier({})
        self.systemd_sockets = systemd_sockets or SystemdSockets()
        self._from_systemd_store = adoptable(self.systemd_sockets)  # (unit, socket) → fd
        self._kept_in_systemd: set[str] = set()  # FDNAMEs in systemd's fd store
        self._watchdog: Timer | None = None
        self.shutting_down = False
        # What every unit's runner shares; the getters are read when used
        # (the notify socket and the cgroups are made at start()).
        self._runner_context = RunnerContext(
            loop=self.loop,
            store=self.store,
            environ=self.environ,
            log=log,
            emit=self.emit,
            notify_address=self._notify_address,
            cgroups=lambda: self.cgroups,
            shutting_down=lambda: self.shutting_down,
            on_idle=self._unit_idle,
        )
        self.runners: dict[str, UnitRunner] = {u.name: self._new_runner(u) for u in units}
        self.unit_paths = tuple(unit_paths)
        self.exec_argv = tuple(exec_argv)  # how to run this supervisor again (upgrade)
        self.run_config = run_config  # how it runs, for an upgrade's fallback
        # An upgrade's take-over closes these only once it is ready (finish_handover):
        # sockets of units gone from the unit files, workers of such units.
        self._handover_leftovers: list[tuple[str, BoundSocket]] = []
        self._handover_orphans: list[int] = []
        self.monitor: MonitorServer | None = None
        self._reload: PendingReload | None = None
        self.base_dir = Path.cwd()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.notify_socket: NotifySocket | None = None
        # Anyone on the machine can send to the notify socket: what they cause is
        # logged through a rate limit (a flood from nobody costs a few lines).
        self._notify_log = RateLimitedLog(log, clock=self.loop.time)
        self._notify_log_timer: Timer | None = None
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self._old_handlers: dict[int, Any] = {}
        self.on_shutdown: list[Callable[[], None]] = []

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Tell every listener (the monitor's clients) that ``event`` happened."""
        for listener in self.listeners:
            listener(event, data)

    # -- start-up -----------------------------------------------------------

    def attach_monitor(
        self,
        path: Path,
        allowed_uids: frozenset[int],
        existing_fd: int | None = None,
        existing_inode: int | None = None,
    ) -> MonitorServer:
        """Open the QMP monitor on ``path`` (or adopt its handed-over socket and file inode)."""
        server = MonitorServer(
            path,
            loop=self.loop,
            log=self.log,
            package=f"fdsupervisor {__version__}",
            allowed_uids=allowed_uids,
            execute=Commands(self).execute,
        )
        existing = None
        if existing_fd is not None:
            os.set_inheritable(existing_fd, False)
            existing = socket.socket(fileno=existing_fd)
        server.open(existing, existing_inode)
        self.monitor = server
        self.listeners.append(lambda name, data: server.broadcast(event_line(name, data)))
        self.on_shutdown.append(server.close)
        return server

    def bind_all(self) -> None:
        """Bind every socket of every unit, or none of them."""
        try:
            for runner in self.runners.values():
                for spec in runner.unit.sockets:
                    bound = self._take_from_systemd_store(runner.unit, spec)
                    if bound is None:
                        bound = bind_socket(
                            spec, base_dir=runner.unit.base_dir, inherited=self.inherited
                        )
                    self.store.add(runner.owner, spec.name, bound)
                    self.log.info(
                        "socket_bound",
                        unit=runner.unit.name,
                        socket=spec.name,
                        address=describe_socket(bound.fileno()).address,
                        kind=spec.kind.value,
                        fd=bound.fileno(),
                    )
        except BaseException:
            self.store.close_all()
            raise
        closed = self.inherited.close_unclaimed()
        for number in closed:
            self.log.warning("inherited_fd_closed", fd=number, reason="no unit references it")
        for name in self.systemd_sockets.names_of(closed):
            self.notifier.remove_fds(name)  # systemd closes its copy too
        self.sync_systemd_store()

    def _take_from_systemd_store(self, unit: Unit, spec: SocketSpec) -> BoundSocket | None:
        """The socket systemd's fd store handed back for this unit socket, if it still fits."""
        if isinstance(spec.address, FdAddress):
            return None
        fd = self._from_systemd_store.get((unit.name, spec.name))
        if fd is None:
            return None
        name = fd_store_name(unit.name, spec.name)
        self.inherited.claim(fd, spec.name)
        reason = stored_socket_mismatch(fd, spec, unit.base_dir)
        if reason is None:
            sock = socket.socket(fileno=fd)
            try:
                bound = adopt_socket(sock, spec, fd_label=name)
            except BindError as exc:
                sock.detach()
                reason = str(exc)
            else:
                self.log.info("socket_taken_back", unit=unit.name, socket=spec.name, fd=fd)
                return bound
        self.log.warning("stored_socket_dropped", unit=unit.name, socket=spec.name, reason=reason)
        os.close(fd)
        if name is not None:
            self.notifier.remove_fds(name)
            self.notifier.barrier()  # systemd's copy is closed before we bind the address
        return None

    def sync_systemd_store(self) -> None:
        """Make systemd's fd store hold exactly the unit-file sockets the supervisor holds."""
        if not self.notifier.enabled:
            return  # not under systemd: nothing is kept, socket files go at shutdown
        current: dict[str, int] = {}
        for runtime in self.units.values():
            for spec in runtime.unit.sockets:
                if isinstance(spec.address, FdAddress):
                    continue  # passed again by whoever passed it (a .socket unit)
                entry = self.store.get(unit_owner(runtime.unit.name), spec.name)
                if entry is None:
                    continue
                name = fd_store_name(runtime.unit.name, spec.name)
                if name is None:
                    self.log.warning(
                        "socket_not_kept",
                        unit=runtime.unit.name,
                        socket=spec.name,
                        reason="unit and socket name exceed 255 characters together",
                    )
                    continue
                current[name] = entry.fd
        for name in sorted(self._kept_in_systemd - current.keys()):
            self.notifier.remove_fds(name)
        limit = self.notifier.fd_store_max
        if limit is not None and len(current) > limit:
            self.log.warning("fd_store_full", sockets=len(current), file_descriptor_store_max=limit)
        if current and not self.notifier.store_fds(sorted(current.items())):
            self.log.warning("fd_store_failed", error=str(self.notifier.last_error))
        self._kept_in_systemd = set(current)

    def _keep_socket_files(self) -> None:
        """Sockets systemd keeps for the next start keep their files (RemoveOnStop=no)."""
        for runtime in self.units.values():
            for entry in self.store.owned_by(unit_owner(runtime.unit.name)):
                name = fd_store_name(runtime.unit.name, entry.name)
                if name in self._kept_in_systemd and isinstance(entry.resource, BoundSocket):
                    entry.resource = dataclasses.replace(
                        entry.resource, created_path=None, created_inode=None
                    )

    def _ping_watchdog(self, interval: float) -> None:
        self.notifier.ping()
        self._watchdog = self.loop.call_later(interval, partial(self._ping_watchdog, interval))

    def start(self, handover: HandoverState | None = None) -> None:
        """Start eager services, watch on-demand ones; then the supervisor is ready.

        After an upgrade (``handover``), the services carry on where the old
        program left them instead: running workers are supervised again.
        """
        self._install_signals()
        self.notify_socket = self._open_notify_socket(handover)
        self.loop.add_reader(self.notify_socket.fileno(), self._on_notify)
        self.loop.add_reader(self.store.hangup_fileno(), self._on_hangups)
        if self.use_cgroups:
            self.cgroups = WorkerCgroups.open(self.log)
        else:
            self.log.info("cgroups_disabled", reason="--no-cgroups", note="escapes are only logged")
        if self.cgroups is not None:
            self.loop.add_reader(self.cgroups.fileno(), self.cgroups.process_events)
        if handover is None:
            for runner in self.runners.values():
                runner.activate()
        else:
            self._restore_services(handover)
        if self.cgroups is not None:
            self.cgroups.release_unclaimed()
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            self._ping_watchdog(interval)
        summary = f"{len(self.runners)} units, {len(self.store)} sockets"
        self.log.info("ready", units=len(self.runners), sockets=len(self.store), pid=os.getpid())
        self.notifier.ready(summary)

    def _open_notify_socket(self, handover: HandoverState | None) -> NotifySocket:
        """The old program's notify socket after an upgrade, else one bound anew.

        A name nobody can guess (any user may bind a free abstract name), kept
        bound across an upgrade's exec so that it is never free for someone
        else to take (docs/security.md).
        """
        if handover is not None and handover.notify_fd is not None:
            try:
                return NotifySocket.adopt(handover.notify_fd, log=self._notify_log)
            except BindError as exc:
                self.log.warning(
                    "notify_socket_rebound",
                    error=exc.message,
                    note="running workers' NOTIFY_SOCKET no longer reaches the supervisor",
                )
        return NotifySocket.bind_unpredictable(NOTIFY_NAME_PREFIX, log=self._notify_log)

    def run(self) -> int:
        """Run until shut down and every worker is gone; returns the exit code."""
        try:
            while not (self.shutting_down and not self._live_workers()):
                try:
                    self.loop.run_once()
                except Exception:
                    # A bug in one callback must not take every worker's supervisor
                    # down with it: log it with its traceback and go on.
                    self.log.exception("internal_error", note="please report this")
        finally:
            self._close()
        self.log.info("stopped")
        return 0

    # -- services -------------------------------------------------------------

    def _new_runner(self, unit: Unit) -> UnitRunner:
        return UnitRunner(unit, self._runner_context)

    def runner(self, unit_name: str) -> UnitRunner:
        """The runner of a unit; FdSupervisorError if there is no such unit."""
        try:
            return self.runners[unit_name]
        except KeyError:
            raise FdSupervisorError(f"unit '{unit_name}' not found") from None

    @property
    def units(self) -> dict[str, UnitRunner]:
        """The runners by unit name, under their old name (reload, upgrade)."""
        return self.runners

    def unit_names(self) -> list[str]:
        return list(self.runners)

    def unit(self, unit_name: str) -> Unit:
        """The unit as loaded (or reloaded) last; FdSupervisorError if there is none."""
        return self.runner(unit_name).unit

    def describe_services(self) -> list[dict[str, Any]]:
        """Every service as ``query-services`` shows it."""
        return [runner.service.describe() for runner in self.runners.values()]

    def start_service(self, unit_name: str, *, manual: bool = True) -> None:
        self.runner(unit_name).start(manual=manual)

    def stop_service(self, unit_name: str) -> None:
        self.runner(unit_name).stop()

    def restart_service(self, unit_name: str) -> None:
        """Stop the workers, then start new ones; the sockets stay bound throughout."""
        self.runner(unit_name).restart()

    def _unit_idle(self, runner: UnitRunner) -> bool:
        """A unit has no workers any more: a reload that waited for it may go on."""
        name = runner.unit.name
        if self._reload is None or name not in self._reload.waiting_units:
            return False
        self._reload.waiting_units.discard(name)
        if not self._reload.waiting_units:
            self._finish_reload()
        return True

    # -- reload: apply changed unit files, keeping every fd that can be kept --------------

    def reload(self) -> dict[str, Any]:
        """Re-read the unit files; nothing changes unless all of them are valid.

        Every new socket that can be bound at once is bound before anything
        else happens, so a failure there also changes nothing. Then kept
        sockets are relistened or moved, and the units whose service or fd
        layout changed are stopped; once their workers are gone, their old
        sockets are closed, the sockets that had to wait for that are bound,
        and the new and changed units start.
        """
        if self._reload is not None:
            raise self._reload_refused(
                "a reload is still in progress (waiting for workers to stop)"
            )
        if not self.unit_paths:
            raise self._reload_refused(
                "this supervisor runs a command-line unit: nothing to reload"
            )
        try:
            new_units = load_units(self.unit_paths)
        except ConfigErrors as exc:
            raise self._reload_refused(str(exc)) from None
        plan = plan_reload(
            [rt.unit for rt in self.units.values()], new_units, self._added_sockets()
        )
        if plan.problems:
            raise self._reload_refused("\n".join(plan.problems))
        new_by_name = {unit.name: unit for unit in new_units}
        waiting = set(plan.bind_after_close)
        fresh: dict[SocketKey, BoundSocket] = {}
        try:
            for key in (*plan.bind_sockets, *plan.rebind_sockets):
                if key not in waiting:
                    fresh[key] = self._bind_key(new_by_name, key)
        except BindError as exc:
            for bound in fresh.values():
                bound.close()
            raise self._reload_refused(str(exc)) from None
        self.notifier.reloading()
        self.log.info("reloading", plan=plan.summary())
        self._apply_now(plan, new_by_name)
        stopping = {*plan.stop_units, *plan.restart_units}
        for name in stopping:
            self.stop_service(name)
        self._reload = PendingReload(
            plan, new_by_name, fresh, {n for n in stopping if self.units[n].service.workers}
        )
        if not self._reload.waiting_units:
            self._finish_reload()
        return {"summary": plan.summary(), "waiting-for": sorted(stopping)}

    def _added_sockets(self) -> dict[SocketKey, SocketSpec]:
        """Sockets added to units at run time (socket-add), which no unit file declares."""
        added = {}
        for name, runtime in self.units.items():
            for entry in self.store.owned_by(unit_owner(name)):
                if entry.name not in runtime.unit.socket_names and isinstance(
                    entry.resource, BoundSocket
                ):
                    added[(name, entry.name)] = entry.resource.spec
        return added

    def _reload_refused(self, reason: str) -> FdSupervisorError:
        self.log.error("reload_failed", error=reason, note="nothing was changed")
        self.notifier.status(f"reload failed, nothing changed: {reason.splitlines()[0]}")
        return FdSupervisorError(f"reload refused, nothing was changed: {reason}")

    def _bind_key(self, units: Mapping[str, Unit], key: SocketKey) -> BoundSocket:
        unit = units[key[0]]
        spec = next(s for s in unit.sockets if s.name == key[1])
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

    def _new_spec(self, units: Mapping[str, Unit], key: SocketKey) -> SocketSpec:
        return next(s for s in units[key[0]].sockets if s.name == key[1])

    def _apply_now(self, plan: ReloadPlan, units: Mapping[str, Unit]) -> None:
        """The part of a reload that needs no worker to stop: adoptions, backlogs and moves."""
        for key in plan.adopt_sockets:  # a runtime socket, now declared: the same fd
            entry = self.store.get(unit_owner(key[0]), key[1])
            if entry is not None and isinstance(entry.resource, BoundSocket):
                entry.resource = dataclasses.replace(
                    entry.resource, spec=self._new_spec(units, key)
                )
                self.log.info("socket_adopted", unit=key[0], socket=key[1], fd=entry.fd)
        for key in plan.relisten_sockets:
            entry = self.store.get(unit_owner(key[0]), key[1])
            if entry is not None and isinstance(entry.resource, BoundSocket):
                spec = self._new_spec(units, key)
                entry.resource.sock.listen(spec.backlog)
                entry.resource = dataclasses.replace(entry.resource, spec=spec)
        involved = {old[0] for old, _new in plan.move_sockets}
        for name in involved & set(self.units):
            self.units[name].suspend_intake()
        moved = [
            (new, self.store.take(unit_owner(old[0]), old[1])) for old, new in plan.move_sockets
        ]
        for new, resource in moved:
            spec = self._new_spec(units, new)
            if isinstance(resource, BoundSocket):
                resource = dataclasses.replace(resource, name=new[1], spec=spec)
            self.store.add(unit_owner(new[0]), new[1], resource)
            if new in plan.relisten_moved and isinstance(resource, BoundSocket):
                resource.sock.listen(spec.backlog)
        for name in plan.unchanged_units:
            self.units[name].replace_unit(units[name])
        for name in involved & set(plan.unchanged_units):
            self.units[name].activate()

    def _finish_reload(self) -> None:
        pending, self._reload = self._reload, None
        assert pending is not None
        plan, units = pending.plan, pending.units
        for key in (*plan.close_sockets, *plan.rebind_sockets):
            entry = self.store.get(unit_owner(key[0]), key[1])
            if entry is not None:
                self.loop.remove_reader(entry.fd)
                self.store.close(entry.owner, entry.name)
                self.log.info("socket_closed", unit=key[0], socket=key[1], reason="reload")
        failed: set[str] = set()
        for key in plan.bind_after_close:
            try:
                pending.fresh[key] = self._bind_key(units, key)
            except BindError as exc:
                failed.add(key[0])
                self.log.error("reload_bind_failed", unit=key[0], socket=key[1], error=str(exc))
        for key, bound in pending.fresh.items():
            self.store.add(unit_owner(key[0]), key[1], bound)
        for name in plan.stop_units:
            runtime = self.units.pop(name)
            runtime.cancel_restarts()
            self.store.close_owner(unit_owner(name))
            # What its workers stored (FDSTORE=1) would otherwise stay for good, out of
            # reach of every command and counted against --max-stored-fds. systemd
            # likewise empties a service's fd store once it has stopped for good
            # (FileDescriptorStorePreserve=no, its default).
            for entry in self.store.owned_by(service_owner(name)):
                runtime.drop_stored(entry.name, "its unit was removed by reload")
        for name in (*plan.restart_units, *plan.start_units):
            service = Service(name, units[name].service)
            existing = self.units.get(name)
            if existing is None:
                runtime = self.units[name] = self._new_runner(units[name])
            else:
                runtime = existing
                runtime.replace_unit(units[name], service)
            if name in failed:
                runtime.fail("a socket could not be bound at reload")
            else:
                runtime.activate()
        summary = f"{len(self.units)} units, {len(self.store)} fds; reloaded: {plan.summary()}"
        self.log.info("reloaded", plan=plan.summary())
        self.sync_systemd_store()
        self.notifier.ready(summary)

    # -- upgrade in place: re-exec, handing every fd and worker over ---------------------

    def upgrade(self) -> dict[str, Any]:
        """Re-execute this supervisor's program as the same process (see upgrade.py).

        Returns only if the upgrade did not happen; the old supervisor then
        runs on as before.
        """
        if self._reload is not None or self.shutting_down:
            raise self._upgrade_refused("a reload or a shutdown is in progress")
        if not self.exec_argv:
            raise self._upgrade_refused("this supervisor does not know its own command line")
        self.notifier.ping()  # the check below blocks the loop: a watchdog deadline must not pass
        self._preflight()
        self.notifier.ping()
        state = self._handover_state()
        state_fd = write_state(state)
        self._notify_log.flush(everything=True)  # counts of suppressed warnings do not cross
        # From here until the new program is ready, a handled signal must neither
        # kill it (after execve() its disposition is the default until the new
        # program installs handlers; SIGHUP's default is to terminate) nor be lost:
        # blocked, it stays pending across execve() (signal(7)) and the new program
        # unblocks it once ready. Blocked only now, so the check above ran unblocked.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            self._repost_signals()
            self.log.info("upgrading", pid=os.getpid(), fds=len(state.fds))
            self.notifier.reloading()
            if self.monitor is not None:
                self.monitor.close_clients()  # connections do not cross; clients reconnect
            set_inheritable(state.fds, True)
            environ = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
            environ[HANDOVER_ENV] = str(state_fd)
            argv = [sys.executable, "-m", "fdsupervisor", *self.exec_argv]
            try:
                os.execve(sys.executable, argv, environ)
            except OSError as exc:
                set_inheritable(state.fds, False)
                os.close(state_fd)
                self.notifier.ready("upgrade failed; still running the old program")
                raise self._upgrade_refused(f"execve {sys.executable}: {exc}") from None
        finally:
            # Only reached when the exec did not happen: what was pending arrives now.
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise AssertionError("unreachable")  # pragma: no cover

    def _repost_signals(self) -> None:
        """Signals that arrived while the upgrade was prepared: pending again, for the new program.

        Their numbers wait in the wake-up socket, which does not survive the
        exec; with the signals blocked, raising them again leaves them pending
        across it. A SIGUSR2 among them asked for this very upgrade.
        """
        if self._wakeup is None:
            return
        while True:
            try:
                data = self._wakeup[0].recv(512)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                break
            for signum in set(data) - {signal.SIGUSR2}:
                if signum in HANDLED_SIGNALS:
                    os.kill(os.getpid(), signum)

    def _upgrade_refused(self, reason: str) -> FdSupervisorError:
        self.log.error("upgrade_failed", error=reason, note="the running supervisor carries on")
        return FdSupervisorError(f"upgrade refused, still running: {reason}")

    def _preflight(self) -> None:
        """The new program must at least load: run its ``check`` on our unit files."""
        command = [sys.executable, "-m", "fdsupervisor"]
        command += ["check", *map(str, self.unit_paths)] if self.unit_paths else ["--version"]
        environ = scrub_environment(os.environ)
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=PREFLIGHT_TIMEOUT,
                env=environ,
                stdin=subprocess.DEVNULL,
                cwd=self.base_dir,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise self._upgrade_refused(f"the new program did not run: {exc}") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise self._upgrade_refused(
                "the new program's check failed: " + (detail[-1] if detail else "no output")
            )

    def _handover_state(self) -> HandoverState:
        items = []
        for entry in self.store:
            resource = entry.resource
            if isinstance(resource, BoundSocket):
                items.append(
                    StoredItem(
                        entry.owner,
                        entry.name,
                        entry.fd,
                        True,
                        kind=resource.spec.kind.value,
                        backlog=resource.spec.backlog,
                        created_path=str(resource.created_path) if resource.created_path else None,
                        created_inode=resource.created_inode,
                    )
                )
            else:
                items.append(
                    StoredItem(
                        entry.owner,
                        entry.name,
                        entry.fd,
                        False,
                        watch_hangup=self.store.watches_hangup(entry.owner, entry.name),
                    )
                )
        services = {}
        for name, runtime in self.units.items():
            service = runtime.service
            services[name] = ServiceItem(
                state=service.state.value,
                restarts=service.restarts,
                last_exit=service.last_exit.as_dict() if service.last_exit else None,
                status=service.status,
                failure=service.failure,
                connections=service.connections,
                workers=tuple(
                    WorkerItem(w.instance, w.pid, w.started_at, w.ready, w.failure)
                    for w in service.workers.values()
                ),
            )
        monitor_fd = self.monitor.fileno() if self.monitor is not None else None
        notify_fd = self.notify_socket.fileno() if self.notify_socket is not None else None
        return HandoverState(
            self.exec_argv,
            tuple(items),
            services,
            monitor_fd,
            notify_fd=notify_fd,
            config=self._current_config(),
            monitor_inode=self.monitor.inode if self.monitor is not None else None,
        )

    def _current_config(self) -> RunConfig | None:
        """How to run exactly the units running now (None: the new program cannot fall back)."""
        if self.run_config is None or self.run_config.command_line is not None:
            return self.run_config  # a command-line unit comes from the command line again
        files = []
        for runtime in self.units.values():
            if runtime.unit.text is None:
                return None
            files.append(UnitFile(str(runtime.unit.source), runtime.unit.text))
        return dataclasses.replace(self.run_config, unit_files=tuple(files))

    def adopt_handover(self, state: HandoverState, *, bind_new: bool = True) -> None:
        """In the new program: take over the old one's fds, then bind what is new.

        Sockets of units that are gone from the unit files are closed once the
        new program is ready (:meth:`finish_handover`), not before: a take-over
        that fails until then falls back to them. Sockets the unit files have
        and the old program had not are bound, unless ``bind_new`` is false (the
        fallback: only what was handed over). (A change of configuration is a
        reload's business; this only keeps both in step.)
        """
        wanted = {(u.name, s.name): s for u in self._unit_list() for s in u.sockets}
        for item in state.store:
            os.set_inheritable(item.fd, False)
            unit = item.owner.removeprefix("unit:") if item.owner.startswith("unit:") else None
            if not item.socket:
                self.store.add(item.owner, item.name, RawFd(item.fd))
                if item.watch_hangup:
                    self.store.watch_hangup(item.owner, item.name)
                continue
            sock = socket.socket(fileno=item.fd)
            spec = wanted.pop((unit, item.name), None) if unit is not None else None
            if unit is not None and unit not in self.units:
                leftover = BoundSocket(
                    item.name,
                    self._runtime_spec(item),
                    sock,
                    Path(item.created_path) if item.created_path else None,
                    created_inode=item.created_inode,
                )
                self._handover_leftovers.append((unit, leftover))
                continue
            bound = BoundSocket(
                item.name,
                spec or self._runtime_spec(item),
                sock,
                Path(item.created_path) if item.created_path else None,
                adopted=True,
                created_inode=item.created_inode,
            )
            self.store.add(item.owner, item.name, bound)
        for (unit_name, _socket_name), spec in wanted.items():
            if not bind_new:
                # The old program did not hold it either (socket-del, or a bind
                # that failed at a reload): the fallback changes nothing.
                self.log.warning(
                    "socket_not_bound", unit=unit_name, socket=spec.name, reason="not handed over"
                )
                continue
            runtime = self.units[unit_name]
            bound = bind_socket(spec, base_dir=runtime.unit.base_dir, inherited=self.inherited)
            self.store.add(unit_owner(unit_name), spec.name, bound)
        self.log.info("handover_adopted", fds=len(state.fds), services=len(state.services))
        self.sync_systemd_store()

    def finish_handover(self) -> None:
        """Once the new program is ready: close and stop what the unit files no longer have."""
        leftovers, self._handover_leftovers = self._handover_leftovers, []
        for unit, bound in leftovers:
            self.log.warning(
                "socket_closed",
                unit=unit,
                socket=bound.name,
                reason="its unit is gone from the unit files",
            )
            bound.close()
        orphans, self._handover_orphans = self._handover_orphans, []
        for pid in orphans:
            self._orphan(pid)

    def abandon(self, state: HandoverState) -> None:
        """Undo a take-over that failed before it was ready: close what this program opened.

        ``state`` is what it was given (:func:`~fdsupervisor.upgrade.copy_fds`:
        copies of the handed-over fds); the copies are closed too, but not the
        socket files they share with the originals, which still serve them.
        Workers this program started are killed and reaped; the handed-over
        ones are left alone. The handled signals stay blocked: the fallback
        installs its handlers before they are unblocked.
        """
        handed_fds = set(state.fds)
        handed_pids = {w.pid for item in state.services.values() for w in item.workers}
        for runtime in self.units.values():
            runtime.abandon(handed_pids)
        if self.monitor is not None:
            self.monitor.abandon()
            self.monitor = None
        for entry in self.store:
            fd, resource = entry.fd, self.store.take(entry.owner, entry.name)
            if fd in handed_fds and isinstance(resource, BoundSocket):
                resource.sock.close()  # the original still serves its file
            else:
                resource.close()
        for _unit, bound in self._handover_leftovers:
            bound.sock.close()
        self._handover_leftovers.clear()
        self._handover_orphans.clear()
        if self.notify_socket is not None:
            self.notify_socket.close()
            self.notify_socket = None
        self.store.close_all()  # empty by now: its hang-up watch
        if self._wakeup is not None:
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
        self.loop.close()

    def _unit_list(self) -> list[Unit]:
        return [runtime.unit for runtime in self.units.values()]

    @staticmethod
    def _runtime_spec(item: StoredItem) -> SocketSpec:
        """A spec for a socket added at run time, which no unit file describes."""
        return SocketSpec(
            name=item.name,
            address=FdAddress(str(item.fd)),
            kind=SocketKind(item.kind),
            backlog=item.backlog,
        )

    def _restore_services(self, state: HandoverState) -> None:
        for name, item in state.services.items():
            runtime = self.units.get(name)
            if runtime is None:
                # stopped by finish_handover(), once this program is ready
                self._handover_orphans.extend(worker.pid for worker in item.workers)
                continue
            runtime.service.restore(
                ServiceState(item.state),
                restarts=item.restarts,
                last_exit=ExitStatus(**item.last_exit) if item.last_exit else None,
                status=item.status,
                failure=item.failure,
                connections=item.connections,
            )
            for saved in item.workers:
                runtime.adopt_worker(saved)
            runtime.resume()

    def _orphan(self, pid: int) -> None:
        """A worker of a unit that no longer exists: stop it, and still reap it."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        if self.cgroups is not None:
            self.cgroups.adopt(pid)
        signal_group(pid, signal.SIGTERM, self.cgroups, self.log)

        def reap() -> None:
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            os.waitpid(pid, 0)
            if self.cgroups is not None:
                self.cgroups.release(pid)

        self.loop.add_reader(pidfd, reap)

    # -- sockets added and removed at run time (the monitor) ---------------------------

    def add_socket(self, owner: str, bound: BoundSocket) -> None:
        """Store a socket bound at run time; a unit's next workers get it."""
        self.store.add(owner, bound.name, bound)
        unit = owner_unit(owner)
        address = describe_socket(bound.fileno()).address
        self.log.info(
            "socket_bound",
            unit=unit,
            socket=bound.name,
            address=address,
            kind=bound.spec.kind.value,
            fd=bound.fileno(),
        )
        entry = self.store.get(owner, bound.name)
        if unit is not None and entry is not None:
            self.runners[unit].on_socket_added(entry)
        self.emit("SOCKET_ADDED", {"id": bound.name, "unit": unit, "address": address})

    def remove_socket(self, socket_id: str, unit_name: str | None) -> None:
        """Close a socket no running worker needs, or say who uses it."""
        candidates = [
            e
            for e in self.store
            if e.name == socket_id
            and isinstance(e.resource, BoundSocket)
            and (unit_name is None or e.owner == unit_owner(unit_name))
        ]
        if not candidates:
            raise FdSupervisorError(f"socket '{socket_id}' not found")
        if len(candidates) > 1:
            owners = ", ".join(e.owner for e in candidates)
            raise FdSupervisorError(f"socket '{socket_id}' is ambiguous ({owners}); give 'unit'")
        entry = candidates[0]
        unit = owner_unit(entry.owner)
        if unit is not None:
            runner = self.runners[unit]
            if runner.service.workers:
                pids = ", ".join(str(p) for p in runner.service.pids)
                raise FdSupervisorError(
                    f"socket '{socket_id}' is in use by unit '{unit}' (running pids {pids}); "
                    "stop the service first"
                )
            runner.on_socket_removed(entry)
        self.store.close(entry.owner, entry.name)
        self.log.info("socket_removed", unit=unit, socket=socket_id)
        self.sync_systemd_store()
        self.emit("SOCKET_REMOVED", {"id": socket_id, "unit": unit})

    # -- the notify protocol (sd_notify) from workers -------------------------------------

    def _notify_address(self) -> str | None:
        return self.notify_socket.address if self.notify_socket is not None else None

    def _on_notify(self) -> None:
        assert self.notify_socket is not None
        for datagram in self.notify_socket.receive():
            sender = find_sender(datagram.pid, self.runners.values())
            if sender is None:
                for fd in datagram.fds:
                    os.close(fd)
                self._notify_log.warning(
                    "notify_ignored",
                    pid=datagram.pid,
                    uid=datagram.uid,
                    reason="not a worker's process",
                )
                continue
            runner, worker = sender
            runner.notified(worker, datagram.message, datagram.fds)
        self._schedule_notify_log_flush()

    def _schedule_notify_log_flush(self) -> None:
        """Have the count of suppressed warnings written once its window is over."""
        due = self._notify_log.due()
        if due is None or self._notify_log_timer is not None:
            return

        def flush() -> None:
            self._notify_log_timer = None
            self._notify_log.flush()
            self._schedule_notify_log_flush()

        self._notify_log_timer = self.loop.call_at(due, flush)

    def _on_hangups(self) -> None:
        """Stored fds that hung up (FDPOLL) are dropped, as systemd drops them."""
        by_owner = {service_owner(name): runner for name, runner in self.runners.items()}
        for owner, name in self.store.hung_up():
            runner = by_owner.get(owner)
            if runner is not None:
                runner.drop_stored(name, "hung up (FDPOLL)")
            else:  # of a unit gone before an upgrade handed it over: closed all the same
                self.store.close(owner, name)
                self.log.info(
                    "fd_store_removed", owner=owner, fdname=name, reason="hung up (FDPOLL)"
                )

    # -- signals and shutdown ---------------------------------------------------------

    def _install_signals(self) -> None:
        receive, send = socket.socketpair()
        receive.setblocking(False)
        send.setblocking(False)
        self._wakeup = (receive, send)
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, _wake_only)
        self.loop.add_reader(receive.fileno(), self._on_signals)

    def _on_signals(self) -> None:
        assert self._wakeup is not None
        try:
            data = self._wakeup[0].recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.shutdown(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                with contextlib.suppress(FdSupervisorError):  # logged by reload()
                    self.reload()
        # An upgrade last: the signals that came with it are handled first, not
        # lost with this program (a shutdown or a reload then refuses it).
        if signal.SIGUSR2 in data:
            with contextlib.suppress(FdSupervisorError):  # logged by upgrade()
                self.upgrade()

    def shutdown(self, reason: str) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        self.log.info("shutting_down", reason=reason)
        self.notifier.stopping()
        for runner in self.runners.values():
            runner.stop()

    def _live_workers(self) -> int:
        return sum(runner.live_workers() for runner in self.runners.values())

    def _close(self) -> None:
        for callback in self.on_shutdown:
            callback()
        for runner in self.runners.values():
            runner.close()
        if self.cgroups is not None:
            self.cgroups.close()
        self._keep_socket_files()
        self.store.close_all()
        if self.notify_socket is not None:
            self.notify_socket.close()
        self._notify_log.flush(everything=True)
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
        self.loop.close()


def _wake_only(signum: int, frame: object) -> None:
    """Signal handler: the wake-up fd already carries the signal number."""


__all__ = ["BindError", "BoundSocket", "Supervisor"]
