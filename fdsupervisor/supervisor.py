"""The supervisor: the event loop that wires the flow together.

It binds every unit's sockets into the :class:`~fdsupervisor.fdstore.FdStore`
(all of them, or none: a bind failure closes what was bound), starts the
eager services, watches the sockets of on-demand ones, and then lives on
events: a worker's pidfd becomes readable (it exited: reap, decide, maybe
schedule a restart), a timer fires (a restart is due, a stop timed out), a
signal arrives through the wake-up socket (SIGTERM/SIGINT: shut down).

Signal handlers do nothing but wake the loop (``signal.set_wakeup_fd``),
as gunicorn's arbiter and asyncio do; all work happens in the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from systemd import journal

from . import __version__
from .addresses import check_name, timer_seconds
from .binding import BoundSocket, InheritedFds, bind_socket, describe_socket
from .cgroups import WorkerCgroups, socket_holders
from .errors import BindError, FdSupervisorError, SpawnError, ValueProblem
from .fdstore import FdStore, RawFd, service_owner, unit_owner
from .handover import Handover
from .log import RateLimitedLog
from .loop import EventLoop, Timer
from .monitor import MonitorServer
from .notify import NotifyMessage, NotifySocket
from .qmp import event as qmp_event
from .reloader import PendingReload, Reloader
from .service import ExitStatus, Failed, Restart, Service, ServiceState, Worker
from .spawn import PassedFd, SpawnPlan, plan_worker, spawn
from .systemd import SystemdFdStore, SystemdNotifier, SystemdSockets
from .units import ACCEPT_FD_NAME, Activation, Unit
from .upgrade import HandoverState, RunConfig, Upgrader, WorkerItem

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
# The notify socket's abstract name, before its random part (NotifySocket.bind_unpredictable).
NOTIFY_NAME_PREFIX = "fdsupervisor/notify/"
# Accept mode: at most this many connections per wake-up, so that one busy
# socket cannot starve the loop; and a pause after EMFILE before trying again.
ACCEPT_BATCH = 64
ACCEPT_RETRY_DELAY = 0.1


@dataclass(slots=True)
class UnitRuntime:
    """What the supervisor tracks for one unit besides its :class:`Service`."""

    unit: Unit
    service: Service
    pidfds: dict[int, int] = field(default_factory=dict)  # pid → pidfd
    restart_timers: dict[int, Timer] = field(default_factory=dict)  # instance → timer
    kill_timers: dict[int, Timer] = field(default_factory=dict)  # pid → timer
    start_timers: dict[int, Timer] = field(default_factory=dict)  # pid → READY=1 deadline
    watchdog_timers: dict[int, Timer] = field(default_factory=dict)  # pid → next ping deadline
    watching: bool = False  # on-demand: waiting for the first traffic
    accepting: bool = False  # accept mode: the service takes connections
    accept_paused: bool = False  # accept mode: at max-connections, or out of fds
    restart_pending: bool = False


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
        self.store = FdStore(limit=max_stored_fds)
        self.notifier = notifier or SystemdNotifier({})
        self.systemd_store = SystemdFdStore(
            self.notifier, systemd_sockets or SystemdSockets(), self.store, log=log
        )
        self._watchdog: Timer | None = None
        self.units: dict[str, UnitRuntime] = {
            u.name: UnitRuntime(u, Service(u.name, u.service)) for u in units
        }
        self.shutting_down = False
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
        self.base_dir = Path.cwd()
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.notify_socket: NotifySocket | None = None
        # Anyone on the machine can send to the notify socket: what they cause is
        # logged through a rate limit (a flood from nobody costs a few lines).
        self._notify_log = RateLimitedLog(log, clock=self.loop.time)
        self._notify_log_timer: Timer | None = None
        # Stored worker fds are watched for hang-ups only (FDPOLL): an inner epoll
        # with no events requested reports just EPOLLHUP / EPOLLERR, as systemd's
        # fd store does with its event sources.
        self._hangups = select.epoll()
        self._hangup_keys: dict[int, tuple[str, str]] = {}
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
        from .commands import Commands

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
        self.listeners.append(lambda name, data: server.broadcast(_event_line(name, data)))
        self.on_shutdown.append(server.close)
        return server

    def bind_all(self) -> None:
        """Bind every socket of every unit, or none of them."""
        try:
            for runtime in self.units.values():
                for spec in runtime.unit.sockets:
                    bound = self.systemd_store.take_back(runtime.unit, spec, self.inherited)
                    if bound is None:
                        bound = bind_socket(
                            spec, base_dir=runtime.unit.base_dir, inherited=self.inherited
                        )
                    self.store.add(unit_owner(runtime.unit.name), spec.name, bound)
                    self.log.info(
                        "socket_bound",
                        unit=runtime.unit.name,
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
        self.systemd_store.drop_unclaimed(closed)
        self.sync_systemd_store()

    def sync_systemd_store(self) -> None:
        """Make systemd's fd store hold exactly the unit-file sockets the supervisor holds."""
        self.systemd_store.sync(rt.unit for rt in self.units.values())

    # Shutdown (_close) calls this until it calls systemd_store.keep_socket_files() itself.
    def _keep_socket_files(self) -> None:
        self.systemd_store.keep_socket_files()

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
        self.loop.add_reader(self._hangups.fileno(), self._on_hangups)
        if self.use_cgroups:
            self.cgroups = WorkerCgroups.open(self.log)
        else:
            self.log.info("cgroups_disabled", reason="--no-cgroups", note="escapes are only logged")
        if self.cgroups is not None:
            self.loop.add_reader(self.cgroups.fileno(), self.cgroups.process_events)
        if handover is None:
            for runtime in self.units.values():
                self._activate(runtime)
        else:
            self.handover.restore_services(handover)
        if self.cgroups is not None:
            self.cgroups.release_unclaimed()
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            self._ping_watchdog(interval)
        summary = f"{len(self.units)} units, {len(self.store)} sockets"
        self.log.info("ready", units=len(self.units), sockets=len(self.store), pid=os.getpid())
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

    def _activate(self, runtime: UnitRuntime) -> None:
        """Start a unit as its activation says: now, on traffic, or per connection."""
        if (
            runtime.unit.service.activation is Activation.ON_DEMAND
            and not runtime.unit.service.accept
        ):
            self._watch(runtime)
        else:
            self.start_service(runtime.unit.name, manual=False)

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

    def runtime(self, unit_name: str) -> UnitRuntime:
        try:
            return self.units[unit_name]
        except KeyError:
            raise FdSupervisorError(f"unit '{unit_name}' not found") from None

    def start_service(self, unit_name: str, *, manual: bool = True) -> None:
        runtime = self.runtime(unit_name)
        service = runtime.service
        if runtime.unit.service.accept:
            service.request_start(self.loop.time(), manual=True)
            service.refresh_state()
            self._start_accepting(runtime)
            return
        if service.state in (ServiceState.RUNNING, ServiceState.STARTING) and service.workers:
            return
        if not service.request_start(self.loop.time(), manual=manual):
            self._fail(runtime, "start limit hit")
            return
        self._unwatch(runtime)
        for instance in service.instances_to_start():
            self._spawn_worker(runtime, instance)

    def stop_service(self, unit_name: str) -> None:
        runtime = self.runtime(unit_name)
        self._cancel_restarts(runtime)
        self._unwatch(runtime)
        self._stop_accepting(runtime)
        spec = runtime.unit.service
        for pid in runtime.service.request_stop():
            if pid in runtime.kill_timers:
                continue
            self._signal_group(pid, spec.stop_signal)
            runtime.kill_timers[pid] = self.loop.call_later(
                spec.stop_timeout, partial(self._kill_timeout, runtime, pid)
            )
        self.log.info("service_stopping", unit=unit_name, pids=runtime.service.pids)

    def restart_service(self, unit_name: str) -> None:
        """Stop the workers, then start new ones; the sockets stay bound throughout."""
        runtime = self.runtime(unit_name)
        if not runtime.service.workers:
            self.start_service(unit_name, manual=True)
            return
        runtime.restart_pending = True
        self.stop_service(unit_name)

    # -- reload: apply changed unit files, keeping every fd that can be kept --------------

    def reload(self) -> dict[str, Any]:
        """Re-read the unit files and apply them (reloader.py); nothing changes on a refusal."""
        return self.reloader.reload()

    # The per-unit code (_reap) reads these two until it calls reloader.waits_for(name)
    # and reloader.unit_idle(name) itself.
    @property
    def _reload(self) -> PendingReload | None:
        return self.reloader.pending

    def _finish_reload(self) -> None:
        self.reloader.finish()

    # -- upgrade in place: re-exec, handing every fd and worker over ---------------------

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
        if self.notify_socket is not None:
            self.notify_socket.close()
            self.notify_socket = None
        self._hangups.close()
        if self._wakeup is not None:
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
            self._wakeup = None
        self.loop.close()

    # -- what the reloader, the upgrade and the handover ask of the supervisor -----------
    # (reloader.ReloadHost, upgrade.UpgradeHost, handover.HandoverHost): units by name.
    # Each is, or becomes with the unit runners, one call on a unit's runner.

    def unit_names(self) -> list[str]:
        return list(self.units)

    def unit(self, name: str) -> Unit:
        return self.runtime(name).unit

    def service(self, name: str) -> Service:
        return self.runtime(name).service

    def has_workers(self, name: str) -> bool:
        return bool(self.units[name].service.workers)

    def suspend_intake(self, name: str) -> None:
        self._unwatch(self.units[name])
        self._stop_accepting(self.units[name])

    def activate(self, name: str) -> None:
        self._activate(self.units[name])

    def fail(self, name: str, reason: str) -> None:
        self._fail(self.units[name], reason)

    def replace_unit(self, unit: Unit, service: Service | None) -> None:
        runtime = self.units[unit.name]
        runtime.unit = unit
        if service is not None:
            runtime.service = service

    def add_unit(self, unit: Unit) -> None:
        self.units[unit.name] = UnitRuntime(unit, Service(unit.name, unit.service))

    def remove_unit(self, name: str) -> None:
        self._cancel_restarts(self.units.pop(name))

    def drop_stored(self, owner: str, name: str, reason: str) -> None:
        self._drop_stored(owner, name, reason)

    @property
    def reload_in_progress(self) -> bool:
        return self.reloader.in_progress

    def watches_hangup(self, owner: str, name: str) -> bool:
        entry = self.store.get(owner, name)
        return entry is not None and self._hangup_keys.get(entry.fd) == (owner, name)

    def watch_hangup(self, owner: str, name: str) -> None:
        entry = self.store.get(owner, name)
        if entry is not None:
            self._hangups.register(entry.fd, 0)
            self._hangup_keys[entry.fd] = (owner, name)

    def flush_notify_log(self) -> None:
        self._notify_log.flush(everything=True)

    def pending_signals(self) -> bytes:
        """Drain the wake-up socket: the numbers of the signals not handled yet."""
        data = b""
        while self._wakeup is not None:
            try:
                chunk = self._wakeup[0].recv(512)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            data += chunk
        return data

    def signal_group(self, pid: int, signum: int) -> None:
        self._signal_group(pid, signum)

    def adopt_worker(self, name: str, saved: WorkerItem) -> bool:
        runtime = self.units[name]
        try:
            pidfd = os.pidfd_open(saved.pid)
        except ProcessLookupError:
            return False
        runtime.service.workers[saved.instance] = Worker(
            saved.instance, saved.pid, saved.started_at, ready=saved.ready, failure=saved.failure
        )
        runtime.pidfds[saved.pid] = pidfd
        if self.cgroups is not None:
            self.cgroups.adopt(saved.pid)
        self.loop.add_reader(pidfd, partial(self._reap, runtime, saved.pid))
        if runtime.unit.service.watchdog and math.isfinite(runtime.unit.service.watchdog):
            self._arm_watchdog(runtime, saved.pid, runtime.unit.service.watchdog)
        return True

    def resume(self, name: str) -> None:
        runtime = self.units[name]
        state, spec = runtime.service.state, runtime.unit.service
        if spec.accept:
            if state is not ServiceState.INACTIVE and state is not ServiceState.FAILED:
                runtime.service.refresh_state()
                self._start_accepting(runtime)
        elif state is ServiceState.LISTENING:
            self._watch(runtime)
        elif state in (ServiceState.RUNNING, ServiceState.STARTING):
            for instance in runtime.service.instances_to_start():
                self._spawn_worker(runtime, instance)  # restarts that were pending

    def worker_pids(self) -> list[int]:
        return [pid for runtime in self.units.values() for pid in runtime.pidfds]

    def release_workers(self) -> None:
        for runtime in self.units.values():
            for pidfd in runtime.pidfds.values():
                os.close(pidfd)
            runtime.pidfds.clear()

    # -- sockets added and removed at run time (the monitor) ---------------------------

    def add_socket(self, owner: str, bound: BoundSocket) -> None:
        """Store a socket bound at run time; a unit's next workers get it."""
        self.store.add(owner, bound.name, bound)
        unit = owner.removeprefix("unit:") if owner.startswith("unit:") else None
        address = describe_socket(bound.fileno()).address
        self.log.info(
            "socket_bound",
            unit=unit,
            socket=bound.name,
            address=address,
            kind=bound.spec.kind.value,
            fd=bound.fileno(),
        )
        if unit is not None and self.units[unit].watching:
            self.loop.add_reader(bound.fileno(), partial(self._traffic, self.units[unit]))
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
        unit = entry.owner.removeprefix("unit:") if entry.owner.startswith("unit:") else None
        if unit is not None:
            runtime = self.units[unit]
            if runtime.service.workers:
                pids = ", ".join(str(p) for p in runtime.service.pids)
                raise FdSupervisorError(
                    f"socket '{socket_id}' is in use by unit '{unit}' (running pids {pids}); "
                    "stop the service first"
                )
            self.loop.remove_reader(entry.fd)
        self.store.close(entry.owner, entry.name)
        self.log.info("socket_removed", unit=unit, socket=socket_id)
        self.sync_systemd_store()
        self.emit("SOCKET_REMOVED", {"id": socket_id, "unit": unit})

    def _passed_fds(self, runtime: UnitRuntime) -> list[PassedFd]:
        """The unit's sockets in declaration order, then sockets added at run time, then
        the fds its workers stored (SPEC 4)."""
        name = runtime.unit.name
        sockets = {e.name: e for e in self.store.owned_by(unit_owner(name))}
        ordered = [sockets.pop(n) for n in runtime.unit.socket_names if n in sockets]
        ordered += sockets.values()
        ordered += self.store.owned_by(service_owner(name))
        return [PassedFd(e.name, e.fd) for e in ordered]

    def _spawn_worker(self, runtime: UnitRuntime, instance: int) -> None:
        unit, service = runtime.unit, runtime.service
        try:
            plan = plan_worker(
                unit,
                self._passed_fds(runtime),
                instance,
                self.environ,
                notify_socket=self._notify_address(),
            )
            pid, pidfd = self._spawn_watched(unit, plan, instance)
        except SpawnError as exc:
            if not exc.transient:  # the program, user or directory is wrong: no retry helps
                self.log.error(
                    "worker_start_failed", unit=unit.name, instance=instance, error=str(exc)
                )
                service.start_failed(str(exc))
                self._fail(runtime, str(exc))
                return
            self._retry_spawn(runtime, instance, exc)
            return
        except OSError as exc:  # out of fds, processes or memory: may pass, so retry
            self._retry_spawn(runtime, instance, exc)
            return
        self._track(runtime, instance, pid, pidfd, len(plan.fds))

    def _retry_spawn(self, runtime: UnitRuntime, instance: int, exc: Exception) -> None:
        """A start failed for lack of resources: retried as ``restart:`` says."""
        decision = runtime.service.spawn_failed(instance, self.loop.time())
        self.log.error(
            "worker_start_failed",
            unit=runtime.unit.name,
            instance=instance,
            error=str(exc),
            restart_in=decision.delay if isinstance(decision, Restart) else None,
        )
        if isinstance(decision, Restart):
            runtime.restart_timers[instance] = self.loop.call_at(
                decision.at, partial(self._restart_due, runtime, instance)
            )
        elif isinstance(decision, Failed):
            self._fail(runtime, f"{decision.reason}: {exc}")

    def _spawn_watched(self, unit: Unit, plan: SpawnPlan, instance: int) -> tuple[int, int]:
        """Spawn, and open the pidfd that watches the worker; both or neither.

        The unit's stdout: and stderr: null or journal targets are opened for
        this worker and closed here once it has its own copies (files are
        opened by the child itself, as the worker's user: see spawn.py). The
        worker's cgroup (not in accept mode) is made before and joined by the
        child. Out of fds, a
        worker we could not watch is killed and reaped at once, and the start
        counts as failed (then retried) instead of escaping the loop.
        """
        outputs: list[int] = []
        cgroup = None
        try:
            stdout_fd = self._open_output(unit, unit.service.stdout, outputs)
            stderr_fd = self._open_output(unit, unit.service.stderr, outputs)
            if outputs:
                plan = dataclasses.replace(plan, stdout_fd=stdout_fd, stderr_fd=stderr_fd)
            # Not per connection in accept mode: a connection worker never holds
            # the listening sockets, and a fresh cgroup holds the loop some 0.4 ms
            # per start, half the accept rate (docs/security.md).
            if self.cgroups is not None and not unit.service.accept:
                try:
                    cgroup = self.cgroups.prepare(unit.name, instance)
                except OSError as exc:  # as systemd's EXIT_CGROUP: the start fails
                    raise SpawnError(
                        f"cannot start {plan.argv[0]!r}: cgroup: {exc.strerror}", exc.errno
                    ) from None
                plan = dataclasses.replace(plan, cgroup_fd=cgroup.fd)
            pid = spawn(plan)
        except BaseException:
            if cgroup is not None and self.cgroups is not None:
                self.cgroups.discard(cgroup)
            raise
        finally:
            for fd in outputs:
                os.close(fd)
        if cgroup is not None and self.cgroups is not None:
            self.cgroups.started(pid, cgroup)
        try:
            return pid, os.pidfd_open(pid)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            if self.cgroups is not None:
                self.cgroups.release(pid)
            raise

    def _open_output(self, unit: Unit, target: str, opened: list[int]) -> int | None:
        """An fd for a worker's stdout or stderr: null or journal (None: not ours to open).

        ``file:`` and ``append:`` are not opened here, as root, but by the
        child after it became the worker's user (spawn.OutputFile): a worker
        could otherwise point its file at any file of root's with a symlink.
        """
        if target == "inherit" or target.startswith(("file:", "append:")):
            return None
        if target == "journal":
            try:
                stream = journal.stream(unit.name)
            except OSError as exc:  # no journald here: the supervisor's own output instead
                self.log.warning("journal_unavailable", unit=unit.name, error=str(exc))
                return None
            fd = os.dup(stream.fileno())
            stream.close()
        else:
            fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        opened.append(fd)
        return fd

    def _track(self, runtime: UnitRuntime, instance: int, pid: int, pidfd: int, fds: int) -> None:
        """A worker exists: watch its pidfd and tell everyone."""
        runtime.pidfds[pid] = pidfd
        self.loop.add_reader(pidfd, partial(self._reap, runtime, pid))
        runtime.service.worker_started(instance, pid, self.loop.time())
        spec = runtime.unit.service
        if spec.notify and math.isfinite(spec.start_timeout) and spec.start_timeout > 0:
            runtime.start_timers[pid] = self.loop.call_later(
                spec.start_timeout, partial(self._start_timed_out, runtime, pid)
            )
        if spec.watchdog and math.isfinite(spec.watchdog):
            self._arm_watchdog(runtime, pid, spec.watchdog)
        self.log.info("worker_started", unit=runtime.unit.name, instance=instance, pid=pid, fds=fds)
        self.emit("SERVICE_STARTED", {"unit": runtime.unit.name, "instance": instance, "pid": pid})

    def _reap(self, runtime: UnitRuntime, pid: int) -> None:
        pidfd = runtime.pidfds.pop(pid)
        self.loop.remove_reader(pidfd)
        os.close(pidfd)
        self._left_behind(runtime, pid)  # first: who left the group is told by its group id
        # The leader is a zombie until waitpid, so its pid (= the group id)
        # cannot be reused yet: kill what is left of its group now, as
        # systemd kills the rest of a service's cgroup when its main process exits.
        self._signal_group(pid, signal.SIGKILL, leader_too=False)
        _, wait_status = os.waitpid(pid, 0)
        status = ExitStatus.from_wait_status(wait_status)
        for timers in (runtime.kill_timers, runtime.start_timers, runtime.watchdog_timers):
            timer = timers.pop(pid, None)
            if timer is not None:
                timer.cancel()
        decision = runtime.service.worker_exited(pid, status, self.loop.time())
        self.log.info(
            "worker_exited",
            unit=runtime.unit.name,
            pid=pid,
            status=str(status),
            restart_in=decision.delay if isinstance(decision, Restart) else None,
        )
        self.emit("SERVICE_EXITED", {"unit": runtime.unit.name, "pid": pid, **status.as_dict()})
        if runtime.restart_pending and not runtime.service.workers:
            runtime.restart_pending = False
            if not self.shutting_down:
                self.start_service(runtime.unit.name, manual=True)
            return
        if isinstance(decision, Restart):
            runtime.restart_timers[decision.instance] = self.loop.call_at(
                decision.at, lambda: self._restart_due(runtime, decision.instance)
            )
        elif isinstance(decision, Failed):
            self._fail(runtime, decision.reason)
        elif (
            runtime.service.state is ServiceState.INACTIVE
            and not self.shutting_down
            and not (self._reload and runtime.unit.name in self._reload.waiting_units)
        ):
            self._watch(runtime)
        if self._reload is not None and not runtime.service.workers:
            self._reload.waiting_units.discard(runtime.unit.name)
            if not self._reload.waiting_units:
                self._finish_reload()
        if runtime.accept_paused and runtime.accepting:
            self._resume_accepting(runtime)

    def _left_behind(self, runtime: UnitRuntime, pid: int) -> None:
        """Worker ``pid`` is gone: end what it left in its cgroup, or at least name it.

        With cgroups, the rest of the worker's cgroup is killed (systemd's
        KillMode=control-group). Without, a process that left the worker's
        process group (setsid() and a double fork) cannot be told from any
        other; the one sign is that it still holds one of the unit's sockets.
        """
        unit = runtime.unit.name
        if self.cgroups is not None:
            for escaped in self.cgroups.release(pid):
                self.log.warning(
                    "escaped_process",
                    unit=unit,
                    pid=escaped,
                    worker=pid,
                    action="killed with the worker's cgroup",
                )
            return
        if runtime.unit.service.accept:
            return  # connection workers never get the listening sockets
        inodes = {}
        for entry in self.store.owned_by(unit_owner(unit)):
            with contextlib.suppress(OSError):
                inodes[os.fstat(entry.fd).st_ino] = entry.name
        live = set(runtime.service.pids)
        for holder, sockets in socket_holders(inodes, skip=(os.getpid(), *live)).items():
            with contextlib.suppress(OSError):
                group = os.getpgid(holder)
                # the exited worker's group (killed next) and live workers' groups did not escape
                if group == pid or group in live:
                    continue
            self.log.warning(
                "escaped_process",
                unit=unit,
                pid=holder,
                worker=pid,
                sockets=sockets,
                action="left running: no cgroup to stop it with (docs/security.md)",
            )

    def _restart_due(self, runtime: UnitRuntime, instance: int) -> None:
        runtime.restart_timers.pop(instance, None)
        if self.shutting_down or runtime.service.state in (
            ServiceState.STOPPING,
            ServiceState.FAILED,
        ):
            return
        self._spawn_worker(runtime, instance)

    def _fail(self, runtime: UnitRuntime, reason: str) -> None:
        self._cancel_restarts(runtime)
        for pid in runtime.service.request_stop():
            self._signal_group(pid, runtime.unit.service.stop_signal)
        runtime.service.state = ServiceState.FAILED
        runtime.service.failure = reason
        self.log.error(
            "service_failed",
            unit=runtime.unit.name,
            reason=reason,
            note="its sockets stay bound; service-start clears the failure",
        )
        self.emit("SERVICE_FAILED", {"unit": runtime.unit.name, "reason": reason})

    def _kill_timeout(self, runtime: UnitRuntime, pid: int) -> None:
        runtime.kill_timers.pop(pid, None)
        if pid in runtime.pidfds:
            self.log.warning("stop_timeout", unit=runtime.unit.name, pid=pid, signal="SIGKILL")
            self._signal_group(pid, signal.SIGKILL)

    def _cancel_restarts(self, runtime: UnitRuntime) -> None:
        for timer in runtime.restart_timers.values():
            timer.cancel()
        runtime.restart_timers.clear()

    def _signal_group(self, pid: int, signum: int, *, leader_too: bool = True) -> None:
        if self.cgroups is not None:
            self.cgroups.signal(pid, signum)  # what of its cgroup left the group
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            if leader_too:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
        except PermissionError as exc:
            self.log.warning("signal_failed", pid=pid, signal=signum, error=str(exc))

    # -- on-demand activation -----------------------------------------------------------

    def _watch(self, runtime: UnitRuntime) -> None:
        if runtime.watching or runtime.unit.service.activation is not Activation.ON_DEMAND:
            return
        for entry in self.store.owned_by(unit_owner(runtime.unit.name)):
            self.loop.add_reader(entry.fd, partial(self._traffic, runtime))
        runtime.watching = True
        runtime.service.state = ServiceState.LISTENING

    def _unwatch(self, runtime: UnitRuntime) -> None:
        if not runtime.watching:
            return
        for entry in self.store.owned_by(unit_owner(runtime.unit.name)):
            self.loop.remove_reader(entry.fd)
        runtime.watching = False

    def _traffic(self, runtime: UnitRuntime) -> None:
        self.start_service(runtime.unit.name, manual=False)  # first: the log can wait
        self.log.info("traffic", unit=runtime.unit.name, action="started service")

    # -- accept mode: one instance per connection --------------------------------------

    def _start_accepting(self, runtime: UnitRuntime) -> None:
        if runtime.accepting:
            return
        runtime.accepting = True
        runtime.accept_paused = True
        for entry in self.store.owned_by(unit_owner(runtime.unit.name)):
            if isinstance(entry.resource, BoundSocket):
                # Never handed to a worker in accept mode, so non-blocking is ours alone.
                entry.resource.sock.setblocking(False)
        self._resume_accepting(runtime)

    def _stop_accepting(self, runtime: UnitRuntime) -> None:
        if runtime.accepting:
            self._pause_accepting(runtime)
            runtime.accepting = False

    def _pause_accepting(self, runtime: UnitRuntime) -> None:
        """Leave new connections in the kernel's backlog: waiting, never refused."""
        if not runtime.accept_paused:
            for entry in self.store.owned_by(unit_owner(runtime.unit.name)):
                self.loop.remove_reader(entry.fd)
            runtime.accept_paused = True

    def _resume_accepting(self, runtime: UnitRuntime) -> None:
        if not runtime.accept_paused or self.shutting_down:
            return
        if len(runtime.service.workers) >= runtime.unit.service.max_connections:
            return
        for entry in self.store.owned_by(unit_owner(runtime.unit.name)):
            if isinstance(entry.resource, BoundSocket):
                self.loop.add_reader(entry.fd, partial(self._accept, runtime, entry.resource))
        runtime.accept_paused = False

    def _accept(self, runtime: UnitRuntime, bound: BoundSocket) -> None:
        limit = runtime.unit.service.max_connections
        for _ in range(ACCEPT_BATCH):
            if len(runtime.service.workers) >= limit:
                self._pause_accepting(runtime)
                return
            try:
                conn, peer = bound.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                # Out of fds or memory: leave connections in the backlog and try
                # again a little later instead of spinning (libuv does the same).
                self.log.warning("accept_failed", unit=runtime.unit.name, error=str(exc))
                self._pause_accepting(runtime)
                self.loop.call_later(ACCEPT_RETRY_DELAY, partial(self._resume_accepting, runtime))
                return
            with conn:
                self._spawn_connection(runtime, conn, peer)

    def _spawn_connection(self, runtime: UnitRuntime, conn: socket.socket, peer: Any) -> None:
        unit = runtime.unit
        instance = runtime.service.next_instance()
        extra_env = {}
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # systemd sets these for inet peers only (service.c, REMOTE_ADDR/REMOTE_PORT)
            extra_env = {"REMOTE_ADDR": str(peer[0]), "REMOTE_PORT": str(peer[1])}
        try:
            plan = plan_worker(
                unit,
                [PassedFd(ACCEPT_FD_NAME, conn.fileno())],
                instance,
                self.environ,
                extra_env=extra_env,
                stdio_fd=conn.fileno() if unit.service.inetd else None,
                notify_socket=self._notify_address(),
            )
            pid, pidfd = self._spawn_watched(unit, plan, instance)
        except (SpawnError, OSError) as exc:
            # this connection is lost; the next ones are tried as they come
            self.log.error("worker_start_failed", unit=unit.name, instance=instance, error=str(exc))
            return
        self._track(runtime, instance, pid, pidfd, 1)

    # -- the notify protocol (sd_notify) from workers -------------------------------------

    def _notify_address(self) -> str | None:
        return self.notify_socket.address if self.notify_socket is not None else None

    def _sender(self, pid: int) -> tuple[UnitRuntime, Worker] | None:
        """The worker a notification comes from: the worker itself or its process group.

        Like systemd's NotifyAccess=all restricted to the service's own
        processes: a process of the worker's group (its children) may speak for it.
        The group cannot be forged: each worker leads a session of its own
        (spawn.py), and setpgid() joins only groups of the caller's session, so a
        process in a worker's group descends from that worker.
        """
        for runtime in self.units.values():
            worker = runtime.service.worker_by_pid(pid)
            if worker is not None:
                return runtime, worker
        try:
            group = os.getpgid(pid)
        except OSError:
            return None
        for runtime in self.units.values():
            worker = runtime.service.worker_by_pid(group)
            if worker is not None:
                return runtime, worker
        return None

    def _on_notify(self) -> None:
        assert self.notify_socket is not None
        for datagram in self.notify_socket.receive():
            sender = self._sender(datagram.pid)
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
            self._notified(*sender, datagram.message, datagram.fds)
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

    def _notified(
        self, runtime: UnitRuntime, worker: Worker, message: NotifyMessage, fds: list[int]
    ) -> None:
        unit, service = runtime.unit.name, runtime.service
        for problem in message.problems:
            self.log.warning("notify_invalid", unit=unit, pid=worker.pid, problem=problem)
        if message.status is not None:
            service.status = message.status
        if message.ready:
            timer = runtime.start_timers.pop(worker.pid, None)
            if timer is not None:
                timer.cancel()
            if service.worker_ready(worker.pid):
                self.log.info("service_ready", unit=unit, pid=worker.pid)
                self.emit("SERVICE_READY", {"unit": unit, "pid": worker.pid})
        if message.stopping:
            self.log.info("worker_stopping", unit=unit, pid=worker.pid)
        if message.reloading:
            self.log.info("worker_reloading", unit=unit, pid=worker.pid)
        if message.main_pid is not None:
            self.log.info("worker_main_pid", unit=unit, pid=worker.pid, main_pid=message.main_pid)
        if message.watchdog_usec is not None and message.watchdog_usec > 0:
            # clamped where it enters: any number a worker sends must make a timer
            seconds = timer_seconds(message.watchdog_usec)
            if seconds < message.watchdog_usec / 1_000_000:
                self.log.warning(
                    "notify_clamped",
                    unit=unit,
                    pid=worker.pid,
                    key="WATCHDOG_USEC",
                    value=message.watchdog_usec,
                    seconds=seconds,
                )
            self._arm_watchdog(runtime, worker.pid, seconds)
        elif message.watchdog and worker.pid in runtime.watchdog_timers:
            self._arm_watchdog(runtime, worker.pid, runtime.unit.service.watchdog)
        if message.watchdog_trigger:
            self._watchdog_expired(runtime, worker.pid)
        if message.fd_store_remove and message.fd_name is not None:
            self._drop_stored(service_owner(unit), message.fd_name, "FDSTOREREMOVE=1")
        if fds:
            self._store_worker_fds(runtime, message, fds)

    def _store_worker_fds(
        self, runtime: UnitRuntime, message: NotifyMessage, fds: list[int]
    ) -> None:
        """FDSTORE=1: keep the fds under the service, up to fd-store-max.

        One fd per name: a second FDSTORE=1 with the same FDNAME replaces the
        first (as getfd does), where systemd would keep both.
        """
        unit, owner = runtime.unit.name, service_owner(runtime.unit.name)
        name = message.fd_name or "stored"
        try:
            # stored fds reach the next worker in LISTEN_FDNAMES: the SPEC's name rule
            check_name(name, "FDNAME")
        except ValueProblem as exc:
            for fd in fds:
                os.close(fd)
            self.log.warning("fd_store_refused", unit=unit, fdname=name, error=exc.message)
            return
        first, extra = fds[0], fds[1:]
        for fd in extra:
            os.close(fd)
        if extra:
            self.log.warning("fd_store_extra_closed", unit=unit, fdname=name, count=len(extra))
        limit = runtime.unit.service.fd_store_max
        replacing = self.store.get(owner, name) is not None
        if not replacing and len(self.store.owned_by(owner)) >= limit:
            os.close(first)
            self.log.warning("fd_store_full", unit=unit, fdname=name, fd_store_max=limit)
            return
        if replacing:
            self._drop_stored(owner, name, "replaced")
        try:
            self.store.add(owner, name, RawFd(first))
        except FdSupervisorError as exc:
            self.log.warning("fd_store_refused", unit=unit, fdname=name, error=str(exc))
            return
        if message.fd_poll:
            try:
                self._hangups.register(first, 0)
                self._hangup_keys[first] = (owner, name)
            except OSError:
                pass  # not pollable (a regular file): kept until removed
        self.log.info("fd_stored", unit=unit, fdname=name, fd=first)
        self.emit("FD_STORED", {"fdname": name, "owner": owner})

    def _drop_stored(self, owner: str, name: str, reason: str) -> None:
        entry = self.store.get(owner, name)
        if entry is None:
            return
        if self._hangup_keys.pop(entry.fd, None) is not None:
            with contextlib.suppress(OSError):
                self._hangups.unregister(entry.fd)
        self.store.close(owner, name)
        self.log.info("fd_store_removed", owner=owner, fdname=name, reason=reason)
        self.emit("FD_CLOSED", {"fdname": name, "owner": owner})

    def _on_hangups(self) -> None:
        for fd, _events in self._hangups.poll(0):
            key = self._hangup_keys.get(fd)
            if key is not None:
                self._drop_stored(*key, reason="hung up (FDPOLL)")

    def _start_timed_out(self, runtime: UnitRuntime, pid: int) -> None:
        runtime.start_timers.pop(pid, None)
        self._kill_for(runtime, pid, "start timeout: no READY=1", runtime.unit.service.stop_signal)

    def _arm_watchdog(self, runtime: UnitRuntime, pid: int, seconds: float) -> None:
        timer = runtime.watchdog_timers.pop(pid, None)
        if timer is not None:
            timer.cancel()
        runtime.watchdog_timers[pid] = self.loop.call_later(
            seconds, partial(self._watchdog_expired, runtime, pid)
        )

    def _watchdog_expired(self, runtime: UnitRuntime, pid: int) -> None:
        timer = runtime.watchdog_timers.pop(pid, None)
        if timer is not None:
            timer.cancel()
        # systemd's WatchdogSignal= default: SIGABRT, so the worker may dump core
        self._kill_for(runtime, pid, "watchdog timeout: no WATCHDOG=1", signal.SIGABRT)

    def _kill_for(self, runtime: UnitRuntime, pid: int, reason: str, signum: int) -> None:
        """Stop one worker because it failed us; its exit then counts as a failure."""
        worker = runtime.service.worker_by_pid(pid)
        if worker is None or worker.failure is not None:
            return
        worker.failure = reason
        self.log.warning("worker_killed", unit=runtime.unit.name, pid=pid, reason=reason)
        self._signal_group(pid, signum)
        runtime.kill_timers[pid] = self.loop.call_later(
            runtime.unit.service.stop_timeout, partial(self._kill_timeout, runtime, pid)
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
        for name in self.units:
            self.stop_service(name)

    def _live_workers(self) -> int:
        return sum(len(rt.pidfds) for rt in self.units.values())

    def _close(self) -> None:
        for callback in self.on_shutdown:
            callback()
        for runtime in self.units.values():
            self._cancel_restarts(runtime)
            for pidfd in runtime.pidfds.values():
                os.close(pidfd)
            runtime.pidfds.clear()
        if self.cgroups is not None:
            self.cgroups.close()
        self._keep_socket_files()
        self.store.close_all()
        if self.notify_socket is not None:
            self.notify_socket.close()
        self._notify_log.flush(everything=True)
        self._hangups.close()
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        if self._wakeup is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._wakeup:
                sock.close()
        self.loop.close()


def _event_line(name: str, data: dict[str, Any]) -> bytes:
    seconds, fraction = divmod(time.time(), 1.0)
    return qmp_event(name, data, int(seconds), int(fraction * 1_000_000))


def _wake_only(signum: int, frame: object) -> None:
    """Signal handler: the wake-up fd already carries the signal number."""


__all__ = ["BindError", "BoundSocket", "Supervisor"]
