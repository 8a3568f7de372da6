"""The supervisor: the event loop that wires the flow together.

It binds every unit's sockets into the :class:`~fdsupervisor.fdstore.FdStore`
(all of them, or none: a bind failure closes what was bound), makes one
:class:`~fdsupervisor.runner.UnitRunner` per unit and has each activate its
unit, and then lives on events. What happens to one unit (a worker
exits, a restart or stop timer fires, traffic arrives, a worker
notifies) is its runner's business; the supervisor reads the notify socket
and hands each message to the runner of the worker that sent it, answers
the monitor's commands, and handles signals (SIGTERM/SIGINT: shut down,
SIGHUP: reload, SIGUSR2: upgrade, SIGCHLD: reap every child, reaper.py).

Signal handlers do nothing but wake the loop (``signal.set_wakeup_fd``),
as gunicorn's arbiter and asyncio do; all work happens in the loop.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .addresses import SocketAddress
from .binding import BoundSocket, InheritedFds, bind_socket, describe_socket
from .cgroups import WorkerCgroups
from .commands import Commands, fd_event_data
from .errors import BindError, FdSupervisorError, Location
from .fdstore import Entry, FdStore, StoreEvent, owner_service
from .handover import Handover, handed_socket
from .loop import EventLoop, Timer
from .monitor import MonitorServer
from .notifications import WorkerNotifications
from .notify import NotifySocket
from .reaper import ChildReaper, set_child_subreaper, stop_namespace
from .reloader import Reloader
from .runner import RunnerContext, UnitRunner, signal_group
from .runtime_sockets import RuntimeSockets
from .service import Service
from .signals import SignalWakeup
from .spawn import worker_default_limits
from .spawn_slots import SpawnSlots
from .systemd import SystemdFdStore, SystemdNotifier, SystemdSockets
from .units import SocketSpec, Unit
from .upgrade import HandoverState, RunConfig, StoredItem, Upgrader, WorkerItem

if TYPE_CHECKING:
    from .metrics import MetricsServer

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
# SIGCHLD too wakes the loop, to reap every child (reaper.py); it is not one of the
# signals an upgrade carries across its exec: the new program reaps once at start.
WAKEUP_SIGNALS = (*HANDLED_SIGNALS, signal.SIGCHLD)


def located_bind_error(unit: Unit, spec: SocketSpec, exc: BindError) -> BindError:
    """``exc`` naming the unit, the file:line:col and the key of the socket that failed."""
    where = spec.location or Location(str(unit.source))
    return BindError(
        spec.name,
        f"{exc.message} (unit {unit.name}, {where}: sockets.{spec.name}.listen)",
    )


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
        spawn_slots: SpawnSlots | None = None,
    ) -> None:
        self.log = log
        # Each worker in a cgroup of its own (cgroups.py), made at start(); None:
        # process groups only, and processes that escaped them are logged after a stop.
        self.use_cgroups = use_cgroups
        self.cgroups: WorkerCgroups | None = None
        self.environ = dict(environ)
        self.inherited = inherited
        self.loop = EventLoop()
        # The store reports its own changes (FD_STORED / FD_CLOSED) to the listeners,
        # and to systemd's fd store, which keeps every entry (SPEC 8).
        self.store = FdStore(limit=max_stored_fds, on_change=self._store_changed)
        self.notifier = notifier or SystemdNotifier({})
        self._systemd_sockets = systemd_sockets or SystemdSockets()
        self.systemd_store = SystemdFdStore(
            self.notifier, self._systemd_sockets, self.store, log=log
        )
        self._watchdog: Timer | None = None
        self.shutting_down = False
        # Every child (workers, and orphans re-parented to us: we are a child
        # subreaper, or PID 1) reaped on SIGCHLD, each exit to its runner (or the handover).
        self.children = ChildReaper(log=log)
        # What every unit's runner shares; the getters are read when used
        # (the notify socket and the cgroups are made at start()).
        self._runner_context = RunnerContext(
            loop=self.loop,
            store=self.store,
            environ=self.environ,
            log=log,
            emit=self.emit,
            notify_address=lambda: self.notifications.address,
            cgroups=lambda: self.cgroups,
            children=self.children,
            shutting_down=lambda: self.shutting_down,
            on_idle=self._unit_idle,
            spawn_slots=spawn_slots,
            default_limits=worker_default_limits(
                run_config.worker_nofile_soft if run_config is not None else None
            ),
        )
        self.runners: dict[str, UnitRunner] = {u.name: self._new_runner(u) for u in units}
        self.runtime_sockets = RuntimeSockets(
            self.store, self.runners, log, self.emit, self.sync_systemd_store
        )
        self.reloader = Reloader(self, unit_paths, log=log)
        self.upgrader = Upgrader(
            self,
            exec_argv=exec_argv,  # how to run this supervisor again
            unit_paths=unit_paths,
            run_config=run_config,  # how it runs, for the new program's fallback
            signals=HANDLED_SIGNALS,
            log=log,
        )
        self.handover = Handover(self, log=log)  # the new program's side of an upgrade
        self.monitor: MonitorServer | None = None
        self.metrics: MetricsServer | None = None
        self.base_dir = Path.cwd()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.notifications: WorkerNotifications = WorkerNotifications(
            self.loop, log, lambda: self.runners.values(), lambda: self.cgroups
        )
        self._signals = SignalWakeup(WAKEUP_SIGNALS)  # installed at start()
        self._wakeup_fd: int | None = None
        self.on_shutdown: list[Callable[[], None]] = []
        # A command-line unit (run --listen ... -- COMMAND) is the whole job.
        self._one_off = run_config is not None and run_config.command_line is not None
        self.exit_code = 0

    def _store_changed(self, event: StoreEvent, entry: Entry) -> None:
        self.emit(event, dict(fd_event_data(entry)))
        self.systemd_store.changed((runner.unit for runner in self.runners.values()), entry)

    def socket_count(self) -> int:
        """Bound sockets in the store (not fds from getfd or FDSTORE=1)."""
        return sum(1 for entry in self.store if isinstance(entry.resource, BoundSocket))

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Tell every listener (the monitor's clients) that ``event`` happened."""
        for listener in self.listeners:
            listener(event, data)
        if event == "SERVICE_FAILED" and self._one_off and not self.shutting_down:
            # As systemd-socket-activate, whose exit is its one program's: a
            # one-off unit failed for good ends the supervisor, non-zero. Later
            # in the loop, not inside the runner that is failing.
            self.exit_code = 1
            self.loop.call_later(0, partial(self.shutdown, "the one-off unit failed"))

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
        self.listeners.append(server.broadcast_event)
        self.on_shutdown.append(server.close)
        return server

    def attach_metrics(
        self, address: SocketAddress, handed: StoredItem | None = None
    ) -> MetricsServer:
        """Serve ``GET /metrics`` on ``address``, bound like a unit socket (SPEC 11),
        or on the socket an upgrade ``handed`` over (the same address: the same argv)."""
        # Imported here: prometheus_client and h11 cost 4.5 MiB of RSS to every
        # supervisor run without --metrics (docs/performance.md, RSS at 10,000 units).
        from .metrics import MetricsServer, MetricsSource, unit_intakes

        spec = SocketSpec(name="metrics", address=address)
        if handed is not None:
            bound = handed_socket(handed, spec)
        else:
            bound = bind_socket(spec, base_dir=self.base_dir, inherited=self.inherited)
        source = MetricsSource(
            services=self.describe_services,
            stored_owners=lambda: [entry.owner for entry in self.store],
            monitor_clients=lambda: len(self.monitor.clients) if self.monitor is not None else 0,
            counters=lambda: [(name, runner.counters) for name, runner in self.runners.items()],
            intakes=lambda: unit_intakes(self.runners),
        )
        server = MetricsServer(bound, loop=self.loop, log=self.log, source=source)
        server.open()
        self.metrics = server
        self.on_shutdown.append(server.close)
        self.log.info("metrics_listening", address=describe_socket(bound.fileno()).address)
        return server

    def bind_all(self) -> None:
        """Bind every socket of every unit, or none of them."""
        try:
            # first what is not a unit-file socket: a dropped one frees its address
            units = [runner.unit for runner in self.runners.values()]
            self.systemd_store.restore(units, self.inherited)
            for runner in self.runners.values():
                for spec in runner.unit.sockets:
                    bound = self.systemd_store.take_back(runner.unit, spec, self.inherited)
                    if bound is None:
                        try:
                            bound = bind_socket(
                                spec, base_dir=runner.unit.base_dir, inherited=self.inherited
                            )
                        except BindError as exc:
                            raise located_bind_error(runner.unit, spec, exc) from None
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
        sockets: set[int] = set()
        closed = self.inherited.close_unclaimed(sockets)
        passed = set(self._systemd_sockets.numbers)
        for number in closed:
            # Only a socket, or an fd systemd passed in LISTEN_FDS, looks
            # deliberately handed over; a shell's stray fds are not worth a warning.
            deliberate = number in sockets or number in passed
            (self.log.warning if deliberate else self.log.debug)(
                "inherited_fd_closed",
                fd=self.inherited.number_of(number),
                reason="no unit references it",
            )
        self.systemd_store.drop_unclaimed(closed)  # systemd closes its copies too
        self.sync_systemd_store()

    def sync_systemd_store(self) -> None:
        """Make systemd's fd store hold exactly what the supervisor's store holds."""
        self.systemd_store.sync(runner.unit for runner in self.runners.values())

    def _ping_watchdog(self, interval: float) -> None:
        self.notifier.ping()
        self._watchdog = self.loop.call_later(interval, partial(self._ping_watchdog, interval))

    def start(self, handover: HandoverState | None = None) -> None:
        """Start eager services, watch on-demand ones; then the supervisor is ready.

        After an upgrade (``handover``), the services carry on where the old
        program left them instead: running workers are supervised again.
        """
        if not set_child_subreaper():
            self.log.warning("subreaper_refused", note="orphans go to the namespace's init")
        self._wakeup_fd = self._signals.install()
        self.loop.add_reader(self._wakeup_fd, self._on_signals)
        self.notifications.open(handover.notify_fd if handover is not None else None)
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
            self.handover.restore_services(handover)
        # What exited before (orphans, or handed-over workers during the exec):
        # after the restore, so that a worker's exit goes to its runner.
        self.children.reap()
        if self.cgroups is not None:
            self.cgroups.release_unclaimed()
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            self._ping_watchdog(interval)
        # Sockets only: after an upgrade the store also holds getfd and FDSTORE=1 fds.
        sockets = self.socket_count()
        summary = f"{len(self.runners)} units, {sockets} sockets"
        self.log.info("ready", units=len(self.runners), sockets=sockets, pid=os.getpid())
        self.notifier.ready(summary)

    def run(self, *, exiting: bool = False) -> int:
        """Run until shut down and every worker is gone; returns the exit code.

        ``exiting``: the process ends right after (the command line's ``run``).
        The handled signals are then ignored once the loop is closed, instead
        of getting their default actions back: a SIGTERM in the last moments of
        a shutdown (a ``kill`` loop, an impatient operator) must not turn the
        clean exit into a death by signal.
        """
        try:
            while not (self.shutting_down and not self._live_workers()):
                try:
                    self.loop.run_once()
                except Exception:
                    # A bug in one callback must not take every worker's supervisor
                    # down with it: log it with its traceback and go on.
                    self.log.exception("internal_error", note="please report this")
        finally:
            self._close(exiting=exiting)
        self.log.info("stopped", exit_code=self.exit_code)
        return self.exit_code

    # -- services -------------------------------------------------------------

    def _new_runner(self, unit: Unit) -> UnitRunner:
        return UnitRunner(unit, self._runner_context)

    def runner(self, unit_name: str) -> UnitRunner:
        """The runner of a unit; FdSupervisorError if there is no such unit."""
        try:
            return self.runners[unit_name]
        except KeyError:
            raise FdSupervisorError(f"unit '{unit_name}' not found") from None

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

    def restart_service(self, unit_name: str, done: Callable[[str | None], None]) -> None:
        """Replace the workers (one at a time unless ``overlap: false``); sockets stay bound."""
        self.runner(unit_name).restart(done)

    def _unit_idle(self, runner: UnitRunner) -> bool:
        """A unit has no workers any more: a reload that waited for it may go on."""
        name = runner.unit.name
        if not self.reloader.waits_for(name):
            return False
        self.reloader.unit_idle(name)
        return True

    # -- reload and upgrade in place (reloader.py, upgrade.py, handover.py) -------------

    def reload(self) -> dict[str, Any]:
        """Re-read the unit files and apply them (reloader.py); nothing changes on a refusal."""
        return self.reloader.reload()

    def upgrade(self) -> dict[str, Any]:
        """Re-execute this supervisor's program as the same process (upgrade.py).

        Returns only if the upgrade did not happen; the old supervisor then
        runs on as before.
        """
        return self.upgrader.upgrade()

    def adopt_handover(self, state: HandoverState, *, bind_new: bool = True) -> None:
        """In the new program: take over the old one's fds, then bind what is new (handover.py)."""
        self.handover.adopt(state, bind_new=bind_new)

    def finish_handover(self) -> None:
        """Once the new program is ready: close and stop what the unit files no longer have."""
        self.handover.finish()

    def abandon(self, state: HandoverState) -> None:
        """Undo a take-over that failed before it was ready: close what this program opened.

        The handled signals stay blocked: the fallback installs its handlers
        before they are unblocked.
        """
        self.handover.abandon(state)
        if self.monitor is not None:
            self.monitor.abandon()
            self.monitor = None
        if self.metrics is not None:
            self.metrics.abandon()
            self.metrics = None
        self.notifications.close()
        self.store.close_all()  # empty by now: its hang-up watch
        self._signals.close()
        self.loop.close()

    # -- what the reloader, the upgrade and the handover ask of the supervisor -----------
    # (reloader.ReloadHost, upgrade.UpgradeHost, handover.HandoverHost): units by name,
    # each one call on the unit's runner.

    def service(self, name: str) -> Service:
        return self.runner(name).service

    def has_workers(self, name: str) -> bool:
        return bool(self.runner(name).service.pids)

    def roll_service(self, unit: Unit, done: Callable[[str | None], None]) -> bool:
        return self.runner(unit.name).roll(unit, done)

    def suspend_intake(self, name: str) -> None:
        self.runner(name).suspend_intake()

    def activate(self, name: str) -> None:
        self.runner(name).activate()

    def fail(self, name: str, reason: str) -> None:
        self.runner(name).fail(reason)

    def replace_unit(self, unit: Unit, service: Service | None) -> None:
        self.runner(unit.name).replace_unit(unit, service)

    def add_unit(self, unit: Unit) -> None:
        self.runners[unit.name] = self._new_runner(unit)

    def remove_unit(self, name: str) -> None:
        self.runners.pop(name).cancel_restarts()

    def drop_stored(self, owner: str, name: str, reason: str) -> None:
        """Close a worker's stored fd; of a unit gone (after an upgrade) all the same."""
        unit = owner_service(owner)
        runner = self.runners.get(unit) if unit is not None else None
        if runner is not None:
            runner.drop_stored(name, reason)
        elif self.store.get(owner, name) is not None:
            self.store.close(owner, name)
            self.log.info("fd_store_removed", owner=owner, fdname=name, reason=reason)

    @property
    def reload_in_progress(self) -> bool:
        return self.reloader.in_progress

    @property
    def notify_socket(self) -> NotifySocket | None:
        return self.notifications.socket

    def flush_notify_log(self) -> None:
        self.notifications.flush()

    def pending_signals(self) -> bytes:
        """Drain the wake-up socket: the numbers of the signals not handled yet."""
        return self._signals.drain()

    def signal_group(self, pid: int, signum: int) -> None:
        signal_group(pid, signum, self.cgroups, self.log)

    def adopt_worker(self, name: str, saved: WorkerItem) -> bool:
        return self.runner(name).adopt_worker(saved)

    def resume(self, name: str) -> None:
        self.runner(name).resume()

    def worker_pids(self) -> list[int]:
        return [pid for runner in self.runners.values() for pid in runner.watched_pids()]

    def release_workers(self) -> None:
        for runner in self.runners.values():
            runner.close()

    # -- sockets added and removed at run time (the monitor) ---------------------------

    def add_socket(self, owner: str, bound: BoundSocket) -> None:
        self.runtime_sockets.add(owner, bound)

    def remove_socket(self, socket_id: str, unit_name: str | None) -> None:
        self.runtime_sockets.remove(socket_id, unit_name)

    def _on_hangups(self) -> None:
        """Stored fds that hung up (FDPOLL) are dropped, as systemd drops them."""
        for entry in self.store.hung_up():
            if entry in self.store.named(entry.owner, entry.name):
                # just that fd: others of its name stay (systemd's on_fd_store_io())
                self.store.close_entry(entry)
                self.log.info(
                    "fd_store_removed",
                    owner=entry.owner,
                    fdname=entry.name,
                    reason="hung up (FDPOLL)",
                )

    # -- signals and shutdown ---------------------------------------------------------

    def _on_signals(self) -> None:
        data = self._signals.drain()
        if signal.SIGCHLD in data:
            self.children.reap()
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

    def _close(self, *, exiting: bool = False) -> None:
        if os.getpid() == 1 and self._wakeup_fd is not None:
            # A container's init: nothing may outlive it unstopped (a daemon that left its
            # worker's process group, say); the kernel would SIGKILL them all at our exit.
            stop_namespace(self._wakeup_fd, log=self.log)
        for callback in self.on_shutdown:
            callback()
        for runner in self.runners.values():
            runner.close()
        if self.cgroups is not None:
            self.cgroups.close()
        self.systemd_store.keep_socket_files()
        self.store.close_all()
        self.notifications.close()
        self.notifications.flush()
        self._signals.close(exiting=exiting)
        self.loop.close()


__all__ = ["BindError", "BoundSocket", "Supervisor"]
