"""One unit at run time: its workers, their timers, and what their notifications mean.

The last step of the flow, from a spawn plan to running workers. The
supervisor makes one :class:`UnitRunner` per unit and gives it a
:class:`RunnerContext`: the shared loop and fd store, and callbacks up (an
event for the monitor, "is the supervisor shutting down", "this unit has no
workers any more"), so that nothing here imports the supervisor.

A runner starts its unit's workers (:mod:`fdsupervisor.spawn`), each in a
cgroup of its own when there are cgroups (:mod:`fdsupervisor.cgroups`);
has the supervisor's :class:`~fdsupervisor.reaper.ChildReaper` tell it when one
exits (no fd per worker: reaped on SIGCHLD, and signalled by pid, which the
kernel holds until then); handles each exit in one place
(:meth:`UnitRunner.child_reaped`);
asks its :class:`~fdsupervisor.service.Service` what an exit means (restart
when, or fail) and keeps the timers that follow (restart delays, stop
timeouts, the start timeout, the watchdog). Its sockets bring work in
through its :class:`~fdsupervisor.activation.Intake` (first traffic, or one
worker per connection). It also gives sd_notify messages their meaning for
the unit: ``READY=1``, ``STATUS=``, ``WATCHDOG=1``, and ``FDSTORE=1``, whose
fds its :class:`~fdsupervisor.worker_store.WorkerFdStore` keeps for the unit's
next workers.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .activation import Intake, IntakeCounters, StartOutcome, counted, no_counts
from .addresses import USEC_INFINITY, timer_seconds
from .cgroups import WorkerCgroups, socket_holders
from .errors import SpawnError
from .fdstore import Entry, FdStore, unit_owner
from .loop import EventLoop, Timer
from .notify import NotifyMessage, Sender
from .reaper import ChildReaper
from .rolling import RollingRestart
from .service import ExitStatus, Failed, ReplacementFailed, Restart, Service, ServiceState, Worker
from .spawn import PassedFd, prepare_worker, start_worker, worker_fds
from .spawn_slots import SpawnSlots
from .units import Activation, FdStorePreserve, Unit
from .upgrade import WorkerItem
from .worker_store import WorkerFdStore


@dataclass(frozen=True, slots=True)
class RunnerContext:
    """What every runner gets from the supervisor: the shared parts, and callbacks up."""

    loop: EventLoop
    store: FdStore
    environ: Mapping[str, str]  # the supervisor's own, which workers start from
    log: Any  # the supervisor's logger; each runner binds its unit= once
    emit: Callable[[str, dict[str, Any]], None]  # an event for the monitor's clients
    notify_address: Callable[[], str | None]  # the notify socket, once it is open
    cgroups: Callable[[], WorkerCgroups | None]  # made at start; None: process groups only
    children: ChildReaper  # reaps every child on SIGCHLD, tells the runner of its worker's exit
    shutting_down: Callable[[], bool]
    # The unit has no workers any more; True: the supervisor took it over (a
    # reload was waiting for it to stop), and the runner does nothing more.
    on_idle: Callable[[UnitRunner], bool]
    spawn_slots: SpawnSlots | None = None  # low fds for the native spawn; None: copy the table
    # Limits a worker gets unless its unit sets them (spawn.worker_default_limits).
    default_limits: tuple[tuple[int, int, int], ...] = ()


class Timers:
    """One kind of timer of one unit, at most one per key (a pid, or an instance)."""

    __slots__ = ("_loop", "_timers")

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        # Made at the first timer: four kinds per unit, mostly never used (64 bytes
        # each per unit otherwise; docs/performance.md, RSS at 10,000 units).
        self._timers: dict[int, Timer] | None = None

    def __contains__(self, key: int) -> bool:
        return self._timers is not None and key in self._timers

    def call_at(self, key: int, when: float, callback: Callable[[], None]) -> None:
        self.cancel(key)
        if self._timers is None:
            self._timers = {}
        self._timers[key] = self._loop.call_at(when, callback)

    def call_later(self, key: int, delay: float, callback: Callable[[], None]) -> None:
        self.call_at(key, self._loop.time() + delay, callback)

    def time(self) -> float:
        return self._loop.time()

    def extend(self, key: int, when: float) -> bool:
        """Push ``key``'s pending timer out to ``when``, never earlier; whether it moved.

        systemd's ``service_extend_event_source_timeout()``: "Current timeout
        is already longer, ignore this."
        """
        timer = self._timers.get(key) if self._timers is not None else None
        if timer is None or timer.when >= when:
            return False
        self.call_at(key, when, timer.callback)
        return True

    def fired(self, key: int) -> None:
        """Called by the timer's own callback: it is no longer pending."""
        if self._timers is not None:
            self._timers.pop(key, None)

    def cancel(self, key: int) -> None:
        timer = self._timers.pop(key, None) if self._timers is not None else None
        if timer is not None:
            timer.cancel()

    def cancel_all(self) -> None:
        if self._timers is None:
            return
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


@dataclass(slots=True)
class WorkerCounters:
    """What ``--metrics`` counts for a unit (SPEC 11); kept across reloads, reset by an upgrade."""

    starts: int = 0
    # why workers exited: stopped (we asked), success (code 0), failure (a non-zero
    # code), signal (killed by one we did not send)
    exits: Mapping[str, int] = field(default_factory=no_counts)

    def exited(self, reason: str) -> None:
        self.exits = counted(self.exits, reason)


class UnitRunner:
    """One unit's service at run time: its workers, their timers, its sockets' intake."""

    def __init__(self, unit: Unit, ctx: RunnerContext) -> None:
        self.unit = unit
        self.service = Service(unit.name, unit.service)
        self._log: Any = None  # bound at the first use: see log
        self._ctx = ctx
        self._loop = ctx.loop
        self._store = ctx.store
        self._pids: set[int] = set()  # every live worker, until reaped
        self._held = HeldFds()
        self._restart_timers = Timers(ctx.loop)  # instance → its restart is due
        self._kill_timers = Timers(ctx.loop)  # pid → SIGKILL once stop-timeout passed
        self._start_timers = Timers(ctx.loop)  # pid → READY=1 deadline
        self._watchdog_timers = Timers(ctx.loop)  # pid → next WATCHDOG=1 deadline
        self._restart_pending = False  # restart(): start again once every worker is gone
        self._rolling: RollingRestart | None = None  # restart(): one worker at a time
        self.counters = WorkerCounters()
        self._intake = Intake(self, ctx.loop, ctx.store, ctx.shutting_down, ctx.emit)
        self.stored = WorkerFdStore(ctx.store, self, ctx.shutting_down)

    @property
    def log(self) -> Any:
        """The supervisor's logger with ``unit=`` bound: once per unit, at the first use."""
        if self._log is None:  # most of 10,000 units waiting for traffic never log
            self._log = self._ctx.log.bind(unit=self.unit.name)
        return self._log

    @property
    def unit_name(self) -> str:
        return self.unit.name

    @property
    def intake_counters(self) -> IntakeCounters:
        """What the unit's intake counted (``--metrics``)."""
        return self._intake.counters

    @property
    def owner(self) -> str:
        """The store owner of the unit's sockets."""
        return unit_owner(self.unit.name)

    # -- what the supervisor asks of a unit ----------------------------------------

    def activate(self) -> None:
        """Start as the unit's activation says: now, on first traffic, or per connection."""
        spec = self.unit.service
        if spec.activation is Activation.ON_DEMAND and not spec.accept:
            self._intake.watch()
        else:
            self.start(manual=False)

    def start(self, *, manual: bool = True) -> None:
        """Start the service's workers (accept mode: take connections); manual clears a failure."""
        service = self.service
        if self.unit.service.accept:
            service.request_start(self._loop.time(), manual=True)
            service.refresh_state()
            self._intake.start_accepting()
            return
        if service.state in (ServiceState.RUNNING, ServiceState.STARTING) and service.workers:
            return
        if not service.request_start(self._loop.time(), manual=manual):
            self.fail("start limit hit")
            return
        self._intake.unwatch()
        for instance in service.instances_to_start():
            self._restart_timers.cancel(instance)  # started now: its pending restart is moot
            self._spawn_instance(instance)

    def stop(self) -> None:
        """Stop every worker: its stop signal, then SIGKILL after stop-timeout."""
        self._cancel_rolling("the service was stopped")
        self.cancel_restarts()
        self.suspend_intake()
        for pid in self.service.request_stop():
            self._stop_pid(pid)
        self.log.info("service_stopping", pids=self.service.pids)
        if not self.service.pids:  # stopped already: nothing to reap
            self.stored.release(self.unit.service, restarting=False)

    def restart(self, done: Callable[[str | None], None] | None = None) -> None:
        """One worker at a time (rolling.py), or with ``overlap: false`` stop all, then start;
        the sockets stay bound. ``done``: None once over (stop-then-start: at once), or why not."""
        report = done or _no_report
        spec, service = self.unit.service, self.service
        if self._rolling is not None and not self._rolling.finished:
            raise self._rolling.busy()
        if not service.workers:
            self.start(manual=True)
            report(None)
            return
        up = service.state in (ServiceState.RUNNING, ServiceState.STARTING)
        if not spec.overlap or spec.accept or not up:
            self._restart_pending = True
            self.stop()
            report(None)
            return
        self.cancel_restarts()  # due ones start as new workers when their turn comes
        self._rolling = RollingRestart(self, report, log=self.log, emit=self._ctx.emit)
        self._rolling.advance()

    def roll(self, unit: Unit, done: Callable[[str | None], None]) -> bool:
        """A reload's new definition (same fd layout: reload.py's ``roll_units``), the workers
        replaced one at a time by the same state machine; False: not running, nothing done."""
        service = self.service
        up = service.state in (ServiceState.RUNNING, ServiceState.STARTING)
        busy = self._rolling is not None and not self._rolling.finished
        if busy or not service.workers or not up:
            return False
        self.replace_unit(unit)
        service.respec(unit.service)
        self.restart(done)
        return True

    def _cancel_rolling(self, reason: str) -> None:
        if self._rolling is not None and not self._rolling.finished:
            self._rolling.cancel(reason)

    # -- what a rolling restart asks of the runner (rolling.RollingHost) --------------

    def spawn_replacement(self, instance: int, replaces: int) -> int:
        """Start a new worker for ``instance`` beside worker ``replaces``; its pid."""
        passed = worker_fds(self._store, self.unit)
        pid = self._start_process(instance, passed)
        self._track(instance, pid, passed, replaces=replaces)
        return pid

    def stop_worker(self, pid: int) -> None:
        self._stop_pid(pid)
        self.log.info("worker_stopping", pid=pid, reason="replaced")

    def spawn_missing(self) -> None:
        for instance in self.service.instances_to_start():
            if instance not in self._restart_timers:
                self._spawn_instance(instance)

    def _stop_pid(self, pid: int) -> None:
        """One worker's stop signal, then SIGKILL after stop-timeout (an earlier one stands)."""
        if pid not in self._kill_timers:
            spec = self.unit.service
            self._signal(pid, spec.stop_signal)
            self._kill_timers.call_later(pid, spec.stop_timeout, partial(self._kill_timeout, pid))

    def fail(self, reason: str) -> None:
        """Fail the service: its workers get their stop signal, its sockets stay bound."""
        self._cancel_rolling(f"the service failed: {reason}")
        self.cancel_restarts()
        for pid in self.service.request_stop():
            self._signal(pid, self.unit.service.stop_signal)
        self.service.mark_failed(reason)
        self.log.error(
            "service_failed",
            reason=reason,
            note="its sockets stay bound; service-start clears the failure",
        )
        self._ctx.emit("SERVICE_FAILED", {"unit": self.unit.name, "reason": reason})
        if not self.service.workers:
            self.stored.release(self.unit.service, restarting=False)

    def cancel_restarts(self) -> None:
        """Forget every restart that is due later."""
        self._restart_timers.cancel_all()

    def suspend_intake(self) -> None:
        """Stop watching the sockets for traffic and stop accepting on them."""
        self._intake.suspend()

    def resume(self) -> None:
        """Carry a restored service on (after an upgrade): start what was due, watch what was."""
        state, spec = self.service.state, self.unit.service
        if spec.accept:
            if state is not ServiceState.INACTIVE and state is not ServiceState.FAILED:
                self.service.refresh_state()
                self._intake.start_accepting()
        elif state is ServiceState.LISTENING:
            self._intake.watch()
        elif state in (ServiceState.RUNNING, ServiceState.STARTING):
            for instance in self.service.instances_to_start():
                self._spawn_instance(instance)  # restarts that were pending

    def replace_unit(self, unit: Unit, service: Service | None = None) -> None:
        """A reload's new definition of this unit; with ``service``, its new state machine."""
        assert unit.name == self.unit.name, "a runner is its unit's for good"
        self.unit = unit
        if service is not None:
            self.service = service

    def on_socket_added(self, entry: Entry) -> None:
        """A socket added to the unit at run time: watched too, if the unit waits for traffic."""
        self._intake.socket_added(entry.fd)

    def on_socket_removed(self, entry: Entry) -> None:
        """One of the unit's sockets is about to be closed: no longer watched."""
        self._intake.socket_removed(entry.fd)

    def holders(self, entry: Entry) -> list[int]:
        """The live workers that were given ``entry``'s fd (SPEC 5's socket-del)."""
        return self._held.holders(entry.fd, self.service.pids)

    def live_workers(self) -> int:
        """How many workers are still to be reaped."""
        return len(self._pids)

    def adopt_worker(self, saved: WorkerItem) -> bool:
        """After an upgrade: supervise a worker the old program started; False: it is gone.

        The exec kept the supervisor's pid, so the old program's workers are
        still its children, reaped by the same :class:`ChildReaper` (one that
        exited meanwhile is a zombie, its status kept for us). One that is no
        child of ours is not a worker any more: its pid was reaped.
        """
        try:
            os.waitid(os.P_PID, saved.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        self.service.adopt_worker(
            saved.instance, saved.pid, saved.started_at, ready=saved.ready, failure=saved.failure
        )
        self._pids.add(saved.pid)
        cgroups = self._ctx.cgroups()
        if cgroups is not None:
            cgroups.adopt(saved.pid)
        self._ctx.children.watch(saved.pid, self)
        watchdog = self.unit.service.watchdog
        if watchdog and math.isfinite(watchdog):
            self._arm_watchdog(saved.pid, watchdog)
        return True

    def watched_pids(self) -> list[int]:
        """The workers whose exit this runner still waits for."""
        return list(self._pids)

    def close(self) -> None:
        """At shutdown (the workers are gone by then), or when a failed take-over
        hands them back: cancel restarts, stop watching them, leave them alone."""
        self.cancel_restarts()
        for pid in self._pids:
            self._ctx.children.forget(pid)
        self._pids.clear()

    # -- starting workers ------------------------------------------------------------

    def _spawn_instance(self, instance: int) -> None:
        passed = worker_fds(self._store, self.unit)
        try:
            pid = self._start_process(instance, passed)
        except SpawnError as exc:
            if not exc.transient:  # the program, user or directory is wrong: no retry helps
                self.log.error("worker_start_failed", instance=instance, error=str(exc))
                self.service.start_failed(str(exc))
                self.fail(str(exc))
                return
            self._retry_spawn(instance, exc)
            return
        except OSError as exc:  # out of fds, processes or memory: may pass, so retry
            self._retry_spawn(instance, exc)
            return
        self._track(instance, pid, passed)

    def start_worker(
        self,
        instance: int,
        passed: Sequence[PassedFd],
        *,
        extra_env: Mapping[str, str] | None = None,
        stdio_fd: int | None = None,
    ) -> StartOutcome:
        """Start one worker with exactly ``passed`` (a connection's).

        "later": it could not start for want of fds, processes or memory, and
        the caller may try again (the intake holds the connection meanwhile);
        "lost": it cannot start at all (exec failed, say), logged.
        """
        try:
            pid = self._start_process(instance, passed, extra_env=extra_env, stdio_fd=stdio_fd)
        except (SpawnError, OSError) as exc:
            transient = (
                exc.transient
                if isinstance(exc, SpawnError)
                else exc.errno in SpawnError.RESOURCE_ERRNOS
            )
            if transient:
                self.log.warning("worker_start_deferred", instance=instance, error=str(exc))
                return "later"
            self.log.error("worker_start_failed", instance=instance, error=str(exc))
            return "lost"
        self._track(instance, pid, passed)
        return "started"

    def _retry_spawn(self, instance: int, exc: Exception) -> None:
        """A start failed for lack of resources: retried as ``restart:`` says."""
        decision = self.service.spawn_failed(instance, self._loop.time())
        self.log.error(
            "worker_start_failed",
            instance=instance,
            error=str(exc),
            restart_in=decision.delay if isinstance(decision, Restart) else None,
        )
        if isinstance(decision, Restart):
            self._restart_timers.call_at(
                instance, decision.at, partial(self._restart_due, instance)
            )
        elif isinstance(decision, Failed):
            self.fail(f"{decision.reason}: {exc}")

    def _start_process(
        self,
        instance: int,
        passed: Sequence[PassedFd],
        *,
        extra_env: Mapping[str, str] | None = None,
        stdio_fd: int | None = None,
    ) -> int:
        return start_process(
            self.unit, instance, passed, self._ctx, self.log, extra_env=extra_env, stdio_fd=stdio_fd
        )

    def _track(
        self,
        instance: int,
        pid: int,
        passed: Sequence[PassedFd],
        *,
        replaces: int | None = None,
    ) -> None:
        """A worker exists: have its exit reported and tell everyone."""
        self._pids.add(pid)
        self._held.record(pid, passed)
        self._ctx.children.watch(pid, self)
        self.service.worker_started(instance, pid, self._loop.time(), replaces=replaces)
        spec = self.unit.service
        if spec.notify and math.isfinite(spec.start_timeout) and spec.start_timeout > 0:
            self._start_timers.call_later(
                pid, spec.start_timeout, partial(self._start_timed_out, pid)
            )
        if spec.watchdog and math.isfinite(spec.watchdog):
            self._arm_watchdog(pid, spec.watchdog)
        self.counters.starts += 1
        self.log.info("worker_started", instance=instance, pid=pid, fds=len(passed))
        self._ctx.emit(
            "SERVICE_STARTED", {"unit": self.unit.name, "instance": instance, "pid": pid}
        )

    # -- a worker exited -------------------------------------------------------------

    def child_exiting(self, pid: int) -> None:
        """Worker ``pid`` exited, not reaped yet (reaper.ChildOwner): end what it left."""
        # first: who left the group is told by its group id
        end_left_behind(
            pid, self.unit, self._store, self._ctx.cgroups(), self.service.pids, self.log
        )
        # The leader is a zombie until reaped, so its pid (= the group id)
        # cannot be reused yet: kill what is left of its group now, as
        # systemd kills the rest of a service's cgroup when its main process exits.
        self._signal(pid, signal.SIGKILL, leader_too=False)

    def child_reaped(self, pid: int, wait_status: int) -> None:
        """Worker ``pid`` is reaped (reaper.ChildOwner): what its exit means for the service."""
        self._pids.discard(pid)
        self._held.forget(pid)
        status = ExitStatus.from_wait_status(wait_status)
        stopped = pid in self._kill_timers  # we asked it to stop: its status is no news
        for timers in (self._kill_timers, self._start_timers, self._watchdog_timers):
            timers.cancel(pid)
        decision = self.service.worker_exited(pid, status, self._loop.time())
        failed = not stopped and (status.code not in (None, 0) or status.signal is not None)
        if stopped:
            self.counters.exited("stopped")
        elif status.signal is not None:
            self.counters.exited("signal")
        else:
            self.counters.exited("success" if status.code == 0 else "failure")
        (self.log.warning if failed else self.log.info)(
            "worker_exited",
            pid=pid,
            status=str(status),
            restart_in=decision.delay if isinstance(decision, Restart) else None,
        )
        self._ctx.emit("SERVICE_EXITED", {"unit": self.unit.name, "pid": pid, **status.as_dict()})
        if isinstance(decision, ReplacementFailed) and self._rolling is not None:
            self._rolling.failed(decision.reason)
        idle = not self.service.pids
        if idle and self.unit.service.fd_store_preserve is FdStorePreserve.NO:
            self.stored.release(self.unit.service, restarting=True)  # whatever comes next
        if self._restart_pending and idle:
            self._restart_pending = False
            if not self._ctx.shutting_down():
                self.start(manual=True)
            return
        if idle and self._ctx.on_idle(self):
            return  # a reload restarts the unit (its fds kept) or removes it (and them)
        if idle:
            self.stored.release(self.unit.service, restarting=isinstance(decision, Restart))
        if isinstance(decision, Restart):
            self._restart_timers.call_at(
                decision.instance, decision.at, partial(self._restart_due, decision.instance)
            )
        elif isinstance(decision, Failed):
            self.fail(decision.reason)
        elif self.service.state is ServiceState.INACTIVE and not self._ctx.shutting_down():
            self._intake.watch()
        self._intake.worker_exited()

    def _restart_due(self, instance: int) -> None:
        self._restart_timers.fired(instance)
        if self._ctx.shutting_down() or self.service.state in (
            ServiceState.STOPPING,
            ServiceState.FAILED,
        ):
            return
        if instance in self.service.workers:
            return  # started meanwhile (a manual start): one worker per instance
        self._spawn_instance(instance)

    def _kill_timeout(self, pid: int) -> None:
        self._kill_timers.fired(pid)
        if pid in self._pids:
            self.log.warning("stop_timeout", pid=pid, signal="SIGKILL")
            self._signal(pid, signal.SIGKILL)

    def _signal(self, pid: int, signum: int, *, leader_too: bool = True) -> None:
        signal_group(pid, signum, self._ctx.cgroups(), self.log, leader_too=leader_too)

    # -- sd_notify: what a worker's message means --------------------------------------

    def notified(self, worker: Worker, message: NotifyMessage, fds: list[int]) -> None:
        """Act on one notification from ``worker`` (or its group); ``fds`` are ours to keep or close."""
        pid, service = worker.pid, self.service
        for problem in message.problems:
            self.log.warning("notify_invalid", pid=pid, problem=problem)
        if message.status is not None:
            service.set_status(message.status)
        if message.ready:
            self._start_timers.cancel(pid)
            if service.worker_ready(pid):
                self.log.info("service_ready", pid=pid)
                self._ctx.emit("SERVICE_READY", {"unit": self.unit.name, "pid": pid})
            if self._rolling is not None and not self._rolling.finished:
                self._rolling.worker_ready(pid)
        if message.stopping:
            self.log.info("worker_stopping", pid=pid)
        if message.reloading:
            self.log.info("worker_reloading", pid=pid)
        if message.main_pid is not None:
            self.log.info("worker_main_pid", pid=pid, main_pid=message.main_pid)
        if message.watchdog_usec is not None and message.watchdog_usec > 0:
            self._arm_watchdog(pid, worker_seconds(self.log, pid, message.watchdog_usec))
        elif message.watchdog and pid in self._watchdog_timers:
            self._arm_watchdog(pid, self.unit.service.watchdog)
        usec = message.extend_timeout_usec
        if usec is not None and usec not in (0, USEC_INFINITY):
            seconds = worker_seconds(self.log, pid, usec, extend=True)
            pending = {"start": self._start_timers, "stop": self._kill_timers}
            extend_timeouts(self.log, pid, seconds, {**pending, "watchdog": self._watchdog_timers})
        if message.watchdog_trigger:
            self._watchdog_expired(pid)
        if message.fd_store_remove and message.fd_name is not None:
            self.drop_stored(message.fd_name, "FDSTOREREMOVE=1")
        if fds:
            self.stored.keep(self.unit.service, message, fds)

    def drop_stored(self, name: str, reason: str) -> None:
        """Close every fd the unit's workers stored as ``name``, if there is one."""
        self.stored.drop(name, reason)

    def _start_timed_out(self, pid: int) -> None:
        self._start_timers.fired(pid)
        self._kill_for(pid, "start timeout: no READY=1", self.unit.service.stop_signal)

    def _arm_watchdog(self, pid: int, seconds: float) -> None:
        self._watchdog_timers.call_later(pid, seconds, partial(self._watchdog_expired, pid))

    def _watchdog_expired(self, pid: int) -> None:
        self._watchdog_timers.cancel(pid)
        # systemd's WatchdogSignal= default: SIGABRT, so the worker may dump core
        self._kill_for(pid, "watchdog timeout: no WATCHDOG=1", signal.SIGABRT)

    def _kill_for(self, pid: int, reason: str, signum: int) -> None:
        """Stop one worker because it failed us; its exit then counts as a failure."""
        worker = self.service.worker_by_pid(pid)
        if worker is None or worker.failure is not None:
            return
        worker.failure = reason
        self.log.warning("worker_killed", pid=pid, reason=reason)
        self._signal(pid, signum)
        if pid not in self._kill_timers:  # a stop's earlier deadline stands
            self._kill_timers.call_later(
                pid, self.unit.service.stop_timeout, partial(self._kill_timeout, pid)
            )


def worker_seconds(log: Any, pid: int, usec: int, *, extend: bool = False) -> float:
    """A worker's ``WATCHDOG_USEC=`` (or ``EXTEND_TIMEOUT_USEC=``) in seconds, clamped where
    it enters: any number a worker sends must make a timer (docs/security.md)."""
    seconds = timer_seconds(usec)
    if seconds < usec / 1_000_000:
        key = "EXTEND_TIMEOUT_USEC" if extend else "WATCHDOG_USEC"
        log.warning("notify_clamped", pid=pid, key=key, value=usec, seconds=seconds)
    return seconds


def extend_timeouts(log: Any, pid: int, seconds: float, pending: Mapping[str, Timers]) -> None:
    """``EXTEND_TIMEOUT_USEC=``: worker ``pid``'s pending timeouts last at least ``seconds`` more.

    systemd's ``service_extend_timeout()``: the timeout of the current phase
    (here: the start timeout while it waits for ``READY=1``, the stop timeout
    once it was told to stop) and the watchdog's are pushed out to now +
    ``seconds``, never brought forward; 0 and ``USEC_INFINITY`` mean nothing
    (the caller's check). sd_notify(3): the service must send a new message
    within that time, or the timeout fires. With no timeout pending nothing
    changes.
    """
    timers = list(pending.values())
    if not timers:
        return
    until = timers[0].time() + seconds
    extended = [name for name, kind in pending.items() if kind.extend(pid, until)]
    if extended:
        log.info("timeout_extended", pid=pid, timeouts=extended, seconds=seconds)


def _held_key(fd: int) -> tuple[int, int]:
    """An fd of the store as a worker's spawn saw it: the number alone may be reused."""
    return fd, os.fstat(fd).st_ino


class HeldFds:
    """Which store fds each live worker was given at its spawn, for SPEC 5's socket-del.

    Kept as (fd, inode): an fd number alone may be a socket added after the
    first one was closed. A worker adopted at an upgrade has no record and
    counts as holding every fd, as it may.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        # A tuple per worker, not a frozenset: a worker holds a few fds (one, mostly), and
        # an empty frozenset is 216 bytes (docs/performance.md, RSS at 10,000 units).
        self._held: dict[int, tuple[tuple[int, int], ...]] = {}

    def record(self, pid: int, passed: Sequence[PassedFd]) -> None:
        self._held[pid] = tuple(_held_key(p.fd) for p in passed)

    def forget(self, pid: int) -> None:
        self._held.pop(pid, None)

    def holders(self, fd: int, pids: Sequence[int]) -> list[int]:
        key = _held_key(fd)
        return [pid for pid in pids if pid not in self._held or key in self._held[pid]]


def start_process(
    unit: Unit,
    instance: int,
    passed: Sequence[PassedFd],
    ctx: RunnerContext,
    log: Any,
    *,
    extra_env: Mapping[str, str] | None = None,
    stdio_fd: int | None = None,
) -> int:
    """Plan and start one worker in its cgroup: its pid. Raises SpawnError or OSError.

    Its exit is learnt from SIGCHLD (reaper.py): no fd per worker (the
    exec's failure is the spawn's own report).

    Not per connection in accept mode: a connection worker never holds the
    listening sockets, and a fresh cgroup holds the loop some 0.4 ms per
    start, half the accept rate (docs/security.md).
    """
    cgroups = ctx.cgroups()
    cgroup = None
    if cgroups is not None and not unit.service.accept:
        try:
            cgroup = cgroups.prepare(unit.name, instance)
        except OSError as exc:  # as systemd's EXIT_CGROUP: the start fails
            program = unit.service.exec[0]
            raise SpawnError(
                f"cannot start {program!r}: cgroup: {exc.strerror}", exc.errno
            ) from None
    try:
        plan = prepare_worker(
            unit,
            passed,
            instance,
            ctx.environ,
            notify_socket=ctx.notify_address(),
            extra_env=extra_env,
            stdio_fd=stdio_fd,
            cgroup_fd=cgroup.fd if cgroup is not None else None,
            default_limits=ctx.default_limits,
            log=log,
        )
        pid = start_worker(plan, ctx.spawn_slots)
    except BaseException:
        if cgroup is not None and cgroups is not None:
            cgroups.discard(cgroup)
        raise
    if cgroup is not None and cgroups is not None:
        cgroups.started(pid, cgroup)
    return pid


def end_left_behind(
    pid: int,
    unit: Unit,
    store: FdStore,
    cgroups: WorkerCgroups | None,
    live_pids: Sequence[int],
    log: Any,
) -> None:
    """Worker ``pid`` is gone: end what it left in its cgroup, or at least name it.

    With cgroups, the rest of the worker's cgroup is killed (systemd's
    KillMode=control-group). Without, a process that left the worker's
    process group (setsid() and a double fork) cannot be told from any
    other; the one sign is that it still holds one of the unit's sockets.
    """
    if cgroups is not None:
        for escaped in cgroups.release(pid):
            log.warning(
                "escaped_process",
                pid=escaped,
                worker=pid,
                action="killed with the worker's cgroup",
            )
        return
    if unit.service.accept:
        return  # connection workers never get the listening sockets
    inodes = {}
    for entry in store.owned_by(unit_owner(unit.name)):
        with contextlib.suppress(OSError):
            inodes[os.fstat(entry.fd).st_ino] = entry.name
    live = set(live_pids)
    for holder, sockets in socket_holders(inodes, skip=(os.getpid(), *live)).items():
        with contextlib.suppress(OSError):
            group = os.getpgid(holder)
            # the exited worker's group (killed next) and live workers' groups did not escape
            if group == pid or group in live:
                continue
        log.warning(
            "escaped_process",
            pid=holder,
            worker=pid,
            sockets=sockets,
            action="left running: no cgroup to stop it with (docs/security.md)",
        )


def _no_report(error: str | None) -> None:
    """``restart()`` with no one to tell: the runner logs the outcome itself."""


def signal_group(
    pid: int, signum: int, cgroups: WorkerCgroups | None, log: Any, *, leader_too: bool = True
) -> None:
    """Signal worker ``pid``'s process group, and what of its cgroup left the group.

    Without ``leader_too``, a group that is already empty is left alone.
    """
    if cgroups is not None:
        cgroups.signal(pid, signum)
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        if leader_too:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
    except PermissionError as exc:
        log.warning("signal_failed", pid=pid, signal=signum, error=str(exc))


def find_sender(
    sender: Sender,
    runners: Iterable[UnitRunner],
    getpgid: Callable[[int], int] = os.getpgid,
    worker_of_cgroup: Callable[[int], int | None] = lambda cgroup_id: None,
) -> tuple[UnitRunner, Worker] | None:
    """The worker a notification from ``sender`` speaks for: itself, its group's, its cgroup's.

    Like systemd's NotifyAccess=all restricted to the service's own
    processes: a process of the worker's group (its children) may speak for it.
    The group cannot be forged: each worker leads a session of its own
    (spawn.py), and setpgid() joins only groups of the caller's session, so a
    process in a worker's group descends from that worker. So does a process
    of the worker's cgroup (cgroups.py; only root may move a process between
    cgroups): systemd finds a notification's unit by the cgroup of its pidfd
    (``manager_dispatch_notify_fd()``), which is how a sender that exited
    before its datagram was read (and is already reaped) is still credited,
    by the cgroup it left (:class:`~fdsupervisor.notify.Sender`). A sender
    the pidfd says is gone is never matched by its pid or group: its pid may
    be another process's by now. Without a pidfd the group is looked up
    here, by pid, as it is now (``getpgid``).
    """
    runners = list(runners)

    def worker_with(pid: int) -> tuple[UnitRunner, Worker] | None:
        for runner in runners:
            worker = runner.service.worker_by_pid(pid)
            if worker is not None:
                return runner, worker
        return None

    if sender.running:
        found = worker_with(sender.pid)
        if found is not None:
            return found
        group = sender.group
        if not sender.pinned:
            try:
                group = getpgid(sender.pid)
            except OSError:
                group = None
        found = worker_with(group) if group is not None else None
        if found is not None:
            return found
    if sender.cgroup_id is not None:
        owner = worker_of_cgroup(sender.cgroup_id)
        if owner is not None:
            return worker_with(owner)
    return None
