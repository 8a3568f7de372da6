"""One service's state machine: states, restart policy, backoff, start limit.

Sixth step of the flow. This module is pure: the supervisor tells a
:class:`Service` what happened (a worker started, a worker exited, a stop
was asked) with the time it happened, and the service answers what to do
next (restart instance 2 at t=13.4, or nothing, or the service failed). It
never forks, signals or sleeps, so every rule here is tested with plain
numbers.

Rules taken from systemd (systemd.service(5)) and supervisord:
- ``restart: on-failure`` restarts on a non-zero exit code or a signal,
  except the "clean" signals SIGHUP, SIGINT, SIGTERM and SIGPIPE, as
  systemd does; ``always`` restarts on any exit; ``no`` never does.
- start limit: more than ``burst`` starts within ``interval`` seconds puts
  the service in ``failed`` (systemd's StartLimitBurst= /
  StartLimitIntervalSec=). Its sockets stay bound; ``service-start`` resets it.
- backoff: a worker that exits within ``STABLE_UPTIME`` of its start is a
  failed start and doubles the next delay up to ``restart-delay-max``; one
  that ran longer starts the sequence again at ``restart-delay``
  (supervisord's ``startsecs=1`` draws the same line).
- a start that could not even create a worker (out of fds, processes or
  memory) says nothing about the service: it is retried with a backoff of
  its own (from ``RESOURCE_RETRY_DELAY`` doubling up to
  ``RESOURCE_RETRY_DELAY_MAX``) and never counts toward the start limit, as
  s6-supervise's ``trystart()`` retries a failed spawn later ("waiting 60
  seconds") outside its restart accounting. systemd would count it
  (SERVICE_FAILURE_RESOURCES goes through Restart= and the start limit);
  that fails a service for good after a short EMFILE spell.

The states, and the systemd state each one is (``systemctl show -p
ActiveState,SubState``):

=========  ========================================================================
inactive   inactive (dead): no worker, nothing pending
listening  the socket unit's active (listening) with its service inactive: an
           on-demand service waits for traffic; accept mode waits for connections
starting   activating (start), or activating (auto-restart) while a restart waits
running    active (running); with ``notify: true`` only once every worker said
           READY=1, as Type=notify leaves "activating" only on READY=1
stopping   deactivating (stop-sigterm, stop-sigkill)
failed     failed; ``service-start`` (systemctl's reset-failed + start) clears it
=========  ========================================================================

Every change of state is one row of :data:`TRANSITIONS`, applied by
``Service._apply`` and nowhere else (h11's ``_state.py`` keeps its
``EVENT_TRIGGERED_TRANSITIONS`` the same way). ``listening``, ``starting`` and
``running`` see every event the same way, so they share a column::

    event               inactive     listening     stopping     failed
                                     starting
                                     running
    START_REQUESTED     activated    activated     activated    activated
    WATCH               listening    listening     listening    listening
    RESTORED            saved        !             !            !
    WORKER_STARTED      workers      workers       =            =
    WORKER_READY        workers      workers       =            =
    REFRESH             workers      workers       =            =
    WORKER_STOPPED      =            =             =            =
    ALL_STOPPED         =            =             inactive     =
    CONNECTION_ENDED    !            workers       !            !
    WORKER_EXITED       !            last:inactive !            !
    WORKER_FAILED       !            last:failed   !            !
    RESTART_SCHEDULED   !            last:starting !            !
    START_LIMIT_HIT     !            failed        !            !
    SPAWN_RETRY         =            =             !            =
    REPLACEMENT_FAILED  !            workers       !            !
    STOP_REQUESTED      stopping     stopping      stopping     stopping
    FAILED              failed       failed        failed       failed

- ``=`` stays: a no-op by rule (a late READY=1 does not make a stopping or
  failed service running, as systemd acts on READY=1 only while activating).
- ``!`` cannot happen: :class:`ServiceStateError`, a bug. ``worker_exited``
  routes every exit while stopping, inactive or failed to WORKER_STOPPED (a
  failed service restarts nothing, even a worker an upgrade handed over), and
  ``spawn_failed`` fails a stopping service instead of retrying; RESTORED
  comes only to a fresh service.
- ``activated``: listening with ``accept: true`` (systemd's Accept=yes socket
  stays listening; each connection has its own instance), else starting.
- ``workers``: in accept mode running while a connection's worker lives, else
  listening; otherwise running when every worker is ready, starting while
  one is not, and as it was while there is no worker.
- ``last:X``: X once no worker is left, as it was while some still run
  (another instance keeps the service up; systemd has one main process).
  WORKER_EXITED is a clean exit that ``restart:`` does not restart (systemd's
  Result=success: inactive), WORKER_FAILED one that failed (Result=exit-code,
  signal, timeout or watchdog: failed).
- ``saved``: the state the old program handed over (an upgrade).
- STOP_REQUESTED goes to stopping, and on to inactive at once (ALL_STOPPED)
  when there is no worker to wait for. A start while stopping is queued
  behind the stop, as systemd queues a start job: each instance whose worker
  is still stopping is started once that worker is gone (a :class:`Restart`
  with no delay from its WORKER_STOPPED).
- A rolling restart (rolling.py) moves an instance's old worker to
  ``outgoing`` while its new one starts (``begin_replacement``); the new one
  carries ``replaces`` until it counts as started (``replacement_started``
  stops the old one). If it exits first, REPLACEMENT_FAILED puts the old one
  back as the instance's worker and the decision is a
  :class:`ReplacementFailed`, never a restart; an outgoing worker's own exit
  is WORKER_STOPPED, as its replacement is on its way.
- Every way into failed records why in ``failure``; a worker that ``restart:
  no`` leaves failed gives its exit (``exited with code 3 (restart: no)``).
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from .errors import FdSupervisorError
from .units import RestartPolicy, ServiceSpec

STABLE_UPTIME = 1.0
RESOURCE_RETRY_DELAY = 0.1
# A few seconds: short enough that a service is back soon after fds are free,
# long enough that a long shortage costs a log line every few seconds only.
RESOURCE_RETRY_DELAY_MAX = 5.0
# Backoff exponents stop growing here: 2.0 ** 1024 raises OverflowError, and a
# crash loop with no start limit (interval: 0) would get there in time.
_MAX_DOUBLINGS = 64

CLEAN_SIGNALS = frozenset({signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE})


class ServiceState(enum.StrEnum):
    """What ``query-services`` shows (SPEC 5); the module docstring maps each to systemd's."""

    INACTIVE = "inactive"
    LISTENING = "listening"  # on-demand: waiting for traffic
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        value = os.waitstatus_to_exitcode(status)
        return cls(code=value) if value >= 0 else cls(signal=-value)

    @property
    def clean(self) -> bool:
        if self.signal is not None:
            return self.signal in CLEAN_SIGNALS
        return self.code == 0

    def as_dict(self) -> dict[str, int]:
        return {"signal": self.signal} if self.signal is not None else {"code": self.code or 0}

    def __str__(self) -> str:
        if self.signal is not None:
            try:
                return f"signal {signal.Signals(self.signal).name}"
            except ValueError:
                return f"signal {self.signal}"
        return f"code {self.code}"


@dataclass(slots=True)
class Worker:
    instance: int
    pid: int
    started_at: float
    stopping: bool = False
    ready: bool = False  # notify: said READY=1
    failure: str | None = None  # killed by us for a reason (start timeout, watchdog)
    replaces: int | None = None  # a rolling restart's new worker: the old one's pid, until started


@dataclass(frozen=True, slots=True)
class Restart:
    """Start ``instance`` again at monotonic time ``at``."""

    instance: int
    at: float
    delay: float


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


@dataclass(frozen=True, slots=True)
class ReplacementFailed:
    """A rolling restart's new worker exited before it counted as started; the old one stays."""

    instance: int
    reason: str


Decision = Restart | Failed | ReplacementFailed | None


def wants_restart(policy: RestartPolicy, status: ExitStatus, forced_failure: bool = False) -> bool:
    """systemd's Restart=: a worker we killed for a timeout or the watchdog failed, whatever its status."""
    if policy is RestartPolicy.ALWAYS:
        return True
    if policy is RestartPolicy.ON_FAILURE:
        return forced_failure or not status.clean
    return False


@dataclass(slots=True)
class StartLimit:
    burst: int
    interval: float
    # A list, not a deque: it holds at most ``burst`` starts (5 by default), and an
    # empty deque costs 600 bytes, once per unit (docs/performance.md, RSS at 10,000).
    _starts: list[float] = field(default_factory=list)

    def allow(self, now: float) -> bool:
        """Record a start at ``now`` unless ``burst`` starts already fell in the interval."""
        starts = self._starts
        gone = 0
        while gone < len(starts) and now - starts[gone] >= self.interval:
            gone += 1
        del starts[:gone]
        if len(starts) >= self.burst:
            return False
        starts.append(now)
        return True

    def reset(self) -> None:
        self._starts.clear()


# -- the transition table --------------------------------------------------------------------


class ServiceEvent(enum.Enum):
    """What a service can see happen: each is a column of :data:`TRANSITIONS`."""

    START_REQUESTED = "start-requested"
    """A start was allowed (``request_start``): by hand, on traffic, or as activation says."""
    WATCH = "watch"
    """On-demand: the supervisor watches the sockets for traffic (``mark_listening``)."""
    RESTORED = "restored"
    """After an upgrade: the state the old program handed over (``restore``)."""
    WORKER_STARTED = "worker-started"
    """A worker process exists (``worker_started``)."""
    WORKER_READY = "worker-ready"
    """A worker said READY=1 for the first time (``worker_ready``)."""
    REFRESH = "refresh"
    """Follow the workers again (``refresh_state``): accept mode after a start or an upgrade."""
    WORKER_STOPPED = "worker-stopped"
    """A worker exited that was asked to stop, or while the service stops or is inactive."""
    ALL_STOPPED = "all-stopped"
    """The last worker of a stop is gone, or a stop found none."""
    CONNECTION_ENDED = "connection-ended"
    """Accept mode: a connection's worker exited; nothing is restarted."""
    WORKER_EXITED = "worker-exited"
    """A worker exited cleanly and ``restart:`` does not restart it."""
    WORKER_FAILED = "worker-failed"
    """A worker failed (or was killed for a timeout) and ``restart:`` does not restart it."""
    RESTART_SCHEDULED = "restart-scheduled"
    """A worker exited and will be started again: the decision is a :class:`Restart`."""
    START_LIMIT_HIT = "start-limit-hit"
    """A worker exited and starting it again would exceed the start limit."""
    SPAWN_RETRY = "spawn-retry"
    """No worker could be created (out of fds, processes, memory): tried again later."""
    REPLACEMENT_FAILED = "replacement-failed"
    """A rolling restart's new worker exited before it counted as started: the old one is back."""
    STOP_REQUESTED = "stop-requested"
    """A stop was asked (``request_stop``)."""
    FAILED = "failed"
    """The service failed: its exec failed, a spawn is not retried, or the supervisor says so."""


class ServiceStateError(FdSupervisorError):
    """An event that :data:`TRANSITIONS` says cannot happen in the current state: a bug."""


class Rule(enum.Enum):
    """A target that is neither a state nor a guard."""

    STAY = "="
    """No-op by rule: the event is expected here and changes nothing."""
    SAVED = "saved"
    """The state the event carries: RESTORED's, the one the old program saved."""


STAY: Final = Rule.STAY
SAVED: Final = Rule.SAVED

Guard = Callable[["Service"], ServiceState]
"""The target of an event whose outcome depends on the workers; it only reads the service."""

Target = ServiceState | Rule | Guard


def _activated(service: Service) -> ServiceState:
    """A start: accept mode listens for connections, otherwise the workers are starting."""
    return ServiceState.LISTENING if service.spec.accept else ServiceState.STARTING


def _by_workers(service: Service) -> ServiceState:
    """What the workers make of the service: running once every one is ready."""
    workers = [*service.workers.values(), *service.outgoing.values()]
    if service.spec.accept:
        return ServiceState.RUNNING if workers else ServiceState.LISTENING
    if not workers:
        return service.state
    return ServiceState.RUNNING if all(w.ready for w in workers) else ServiceState.STARTING


def _when_last(state: ServiceState) -> Guard:
    """``state`` once no worker is left; unchanged while another instance still runs."""

    def guard(service: Service) -> ServiceState:
        return service.state if service.workers or service.outgoing else state

    guard.__name__ = guard.__qualname__ = f"last:{state.value}"
    return guard


_LAST_INACTIVE: Final = _when_last(ServiceState.INACTIVE)
_LAST_FAILED: Final = _when_last(ServiceState.FAILED)
_LAST_STARTING: Final = _when_last(ServiceState.STARTING)

_E = ServiceEvent
_S = ServiceState

# listening, starting and running: the service is wanted up, and each of the three meets
# every event the same way; only what the guards compute differs.
_UP: Final[Mapping[ServiceEvent, Target]] = MappingProxyType(
    {
        _E.START_REQUESTED: _activated,
        _E.WATCH: _S.LISTENING,
        _E.WORKER_STARTED: _by_workers,
        _E.WORKER_READY: _by_workers,
        _E.REFRESH: _by_workers,
        _E.WORKER_STOPPED: STAY,
        _E.ALL_STOPPED: STAY,
        _E.CONNECTION_ENDED: _by_workers,
        _E.WORKER_EXITED: _LAST_INACTIVE,
        _E.WORKER_FAILED: _LAST_FAILED,
        _E.RESTART_SCHEDULED: _LAST_STARTING,
        _E.START_LIMIT_HIT: _S.FAILED,
        _E.SPAWN_RETRY: STAY,
        _E.REPLACEMENT_FAILED: _by_workers,
        _E.STOP_REQUESTED: _S.STOPPING,
        _E.FAILED: _S.FAILED,
    }
)

TRANSITIONS: Final[Mapping[ServiceState, Mapping[ServiceEvent, Target]]] = MappingProxyType(
    {
        _S.INACTIVE: MappingProxyType(
            {
                _E.START_REQUESTED: _activated,
                _E.WATCH: _S.LISTENING,
                _E.RESTORED: SAVED,
                _E.WORKER_STARTED: _by_workers,
                _E.WORKER_READY: _by_workers,
                _E.REFRESH: _by_workers,
                _E.WORKER_STOPPED: STAY,
                _E.ALL_STOPPED: STAY,
                _E.SPAWN_RETRY: STAY,
                _E.STOP_REQUESTED: _S.STOPPING,
                _E.FAILED: _S.FAILED,
            }
        ),
        _S.LISTENING: _UP,
        _S.STARTING: _UP,
        _S.RUNNING: _UP,
        _S.STOPPING: MappingProxyType(
            {
                # as systemd queues a start behind the stop: the instances still
                # stopping start once their worker is gone (Service._start_after_stop)
                _E.START_REQUESTED: _activated,
                _E.WATCH: _S.LISTENING,
                _E.WORKER_STARTED: STAY,
                _E.WORKER_READY: STAY,
                _E.REFRESH: STAY,
                _E.WORKER_STOPPED: STAY,
                _E.ALL_STOPPED: _S.INACTIVE,
                _E.STOP_REQUESTED: _S.STOPPING,
                _E.FAILED: _S.FAILED,
            }
        ),
        _S.FAILED: MappingProxyType(
            {
                _E.START_REQUESTED: _activated,
                _E.WATCH: _S.LISTENING,
                _E.WORKER_STARTED: STAY,
                _E.WORKER_READY: STAY,
                _E.REFRESH: STAY,
                _E.WORKER_STOPPED: STAY,
                _E.ALL_STOPPED: STAY,
                # every exit while failed is WORKER_STOPPED (worker_exited): a worker the
                # failure did not stop (one an upgrade handed over) is not restarted
                _E.SPAWN_RETRY: STAY,
                _E.STOP_REQUESTED: _S.STOPPING,
                _E.FAILED: _S.FAILED,
            }
        ),
    }
)
"""Every transition: state → {event: target}. An event missing from a state's row cannot
happen there (:class:`ServiceStateError`); STAY marks one that changes nothing by rule."""

del _E, _S


_NO_INSTANCES: Final[frozenset[int]] = frozenset()


class Service:
    """The state of one unit's service; fed events, answers decisions.

    ``state`` changes only through :data:`TRANSITIONS` (``_apply``); ``failure``
    and ``status`` only through the methods here, never from outside.
    """

    __slots__ = (
        "_failed_starts",
        "_limit",
        "_resource_failures",
        "_start_after_stop",
        "_state",
        "connections",
        "failure",
        "last_exit",
        "name",
        "outgoing",
        "restarts",
        "spec",
        "status",
        "workers",
    )

    def __init__(self, name: str, spec: ServiceSpec) -> None:
        self.name = name
        self.spec = spec
        self._state = ServiceState.INACTIVE
        self.workers: dict[int, Worker] = {}  # instance → its worker
        # pid → an old worker a rolling restart is replacing: it serves until its
        # replacement counts as started, then gets its stop signal
        self.outgoing: dict[int, Worker] = {}
        self.restarts = 0
        self.last_exit: ExitStatus | None = None
        self.status: str | None = None
        self.failure: str | None = None
        self._limit = StartLimit(spec.start_limit_burst, spec.start_limit_interval)
        # instance → quick exits / spawns failed in a row; made at the first (an empty
        # dict is 64 bytes per unit: docs/performance.md, RSS at 10,000 units)
        self._failed_starts: dict[int, int] | None = None
        self._resource_failures: dict[int, int] | None = None
        # instances whose worker still stops while a start was asked: started once it is
        # gone (mostly none: the shared empty one, not an empty set of 216 bytes per unit)
        self._start_after_stop: frozenset[int] = _NO_INSTANCES
        self.connections = 0

    @property
    def state(self) -> ServiceState:
        return self._state

    def respec(self, spec: ServiceSpec) -> None:
        """A reload changed the service and rolls its workers: the next ones follow ``spec``."""
        self.spec = spec
        self._limit = StartLimit(spec.start_limit_burst, spec.start_limit_interval)

    def _apply(
        self,
        event: ServiceEvent,
        *,
        failure: str | None = None,
        saved: ServiceState | None = None,
    ) -> ServiceState:
        """Take the transition of ``event`` in :data:`TRANSITIONS`: the one place the state changes.

        ``failure`` is the reason recorded if the service lands in failed;
        ``saved`` is RESTORED's state.
        """
        target = TRANSITIONS[self._state].get(event)
        if target is None:
            raise ServiceStateError(
                f"service '{self.name}': {event.name} cannot happen while {self._state.value}"
            )
        if target is STAY:
            return self._state
        if target is SAVED:
            if saved is None:
                raise ServiceStateError(f"service '{self.name}': {event.name} without a state")
            new = saved
        elif isinstance(target, ServiceState):
            new = target
        else:
            new = target(self)
        if new is ServiceState.FAILED and failure is not None:
            self.failure = failure
        self._state = new
        return new

    @property
    def pids(self) -> list[int]:
        return sorted(w.pid for w in (*self.workers.values(), *self.outgoing.values()))

    @property
    def started(self) -> int:
        """Workers that count as started (READY=1 with notify) and were not asked to stop."""
        live = (*self.workers.values(), *self.outgoing.values())
        return sum(1 for w in live if w.ready and not w.stopping)

    @property
    def replacing(self) -> bool:
        """Whether a rolling restart has an old worker or a new one not started yet."""
        return bool(self.outgoing) or any(w.replaces is not None for w in self.workers.values())

    def begin_replacement(self, instance: int) -> Worker | None:
        """A rolling restart replaces ``instance``: its worker serves on as an outgoing one."""
        old = self.workers.pop(instance, None)
        if old is not None:
            self.outgoing[old.pid] = old
        return old

    def abort_replacement(self, instance: int) -> None:
        """No new worker could be made for ``instance``: its old one is its worker again.

        The one being replaced, not an earlier restart's old worker of the same
        instance that is still stopping.
        """
        old = next(
            (w for w in self.outgoing.values() if w.instance == instance and not w.stopping), None
        )
        if old is not None and instance not in self.workers:
            del self.outgoing[old.pid]
            self.workers[instance] = old

    def replacement_started(self, pid: int) -> Worker | None:
        """The new worker ``pid`` counts as started: the old one it replaces, now stopping."""
        worker = self.worker_by_pid(pid)
        if worker is None or worker.replaces is None:
            return None
        old = self.outgoing.get(worker.replaces)
        worker.replaces = None
        if old is not None:
            old.stopping = True
        return old

    def instances_to_start(self) -> list[int]:
        """The instances a (re)start of the whole service must spawn."""
        if self.spec.accept:
            return []
        return [i for i in range(self.spec.instances) if i not in self.workers]

    def request_start(self, now: float, *, manual: bool) -> bool:
        """Ask to start (all instances); False if the start limit forbids it.

        A manual start (operator, monitor) clears a failed state and the
        start limit, as ``systemctl reset-failed`` + ``start`` would.
        """
        if manual:
            self._limit.reset()
            self._failed_starts = self._resource_failures = None
            self.failure = None
        elif not self._limit.allow(now):
            return False
        if manual:
            self._limit.allow(now)
        if not self.spec.accept:
            stopping = frozenset(i for i, w in self.workers.items() if w.stopping)
            self._start_after_stop = stopping or _NO_INSTANCES
        self._apply(ServiceEvent.START_REQUESTED)
        return True

    def mark_listening(self) -> None:
        """On-demand: the sockets are watched; the service waits for traffic."""
        self._apply(ServiceEvent.WATCH)

    def mark_failed(self, reason: str) -> None:
        """The supervisor failed the service (its workers were told to stop first)."""
        self._apply(ServiceEvent.FAILED, failure=reason)

    def set_status(self, text: str | None) -> None:
        """A worker's STATUS=, shown by ``query-services``."""
        self.status = text

    def restore(
        self,
        item_state: ServiceState,
        *,
        restarts: int,
        last_exit: ExitStatus | None,
        status: str | None,
        failure: str | None,
        connections: int,
    ) -> None:
        """After an upgrade: carry on where the old program was; only on a fresh service."""
        self._apply(ServiceEvent.RESTORED, saved=item_state)
        self.restarts = restarts
        self.last_exit = last_exit
        self.status = status
        self.failure = failure
        self.connections = connections

    def adopt_worker(
        self, instance: int, pid: int, started_at: float, *, ready: bool, failure: str | None
    ) -> Worker:
        """After an upgrade: a worker the old program started; the restored state stands."""
        worker = Worker(instance, pid, started_at, ready=ready, failure=failure)
        self.workers[instance] = worker
        return worker

    def worker_started(
        self, instance: int, pid: int, now: float, *, replaces: int | None = None
    ) -> Worker:
        worker = Worker(instance, pid, now, ready=not self.spec.notify, replaces=replaces)
        self.workers[instance] = worker
        if self._resource_failures is not None:
            self._resource_failures.pop(instance, None)
        self._apply(ServiceEvent.WORKER_STARTED)
        return worker

    def worker_ready(self, pid: int) -> bool:
        """READY=1 from a worker; True when that made the service running."""
        worker = self.worker_by_pid(pid)
        if worker is None or worker.ready:
            return False
        worker.ready = True
        before = self._state
        after = self._apply(ServiceEvent.WORKER_READY)
        return before is not ServiceState.RUNNING and after is ServiceState.RUNNING

    def worker_by_pid(self, pid: int) -> Worker | None:
        found = self.outgoing.get(pid)
        if found is not None:
            return found
        return next((w for w in self.workers.values() if w.pid == pid), None)

    def next_instance(self) -> int:
        """Accept mode: each connection's instance gets the next number."""
        self.connections += 1
        return self.connections - 1

    def refresh_state(self) -> None:
        """Make the state follow the workers again (accept mode after a start, an upgrade)."""
        self._apply(ServiceEvent.REFRESH)

    def start_failed(self, reason: str) -> None:
        """The exec itself failed: no worker exists; the service is failed."""
        self._apply(ServiceEvent.FAILED, failure=reason)

    def worker_exited(self, pid: int, status: ExitStatus, now: float) -> Decision:
        worker = self.worker_by_pid(pid)
        if worker is None:
            return None
        self.last_exit = status
        if self.outgoing.pop(pid, None) is None:
            del self.workers[worker.instance]
        elif not worker.stopping:
            # An old worker that died while being replaced: its replacement is on its
            # way, so it is not restarted (and the restart stands or fails by it).
            worker.stopping = True
        quiet = (ServiceState.STOPPING, ServiceState.INACTIVE, ServiceState.FAILED)
        if worker.stopping or self._state in quiet:
            self._apply(ServiceEvent.WORKER_STOPPED)
            if not self.workers and not self.outgoing:
                self._apply(ServiceEvent.ALL_STOPPED)
            if worker.instance in self._start_after_stop and self._state not in quiet:
                self._start_after_stop = (
                    self._start_after_stop - {worker.instance}
                ) or _NO_INSTANCES
                return Restart(worker.instance, now, 0.0)  # the start queued behind the stop
            return None
        if worker.replaces is not None:
            old = self.outgoing.pop(worker.replaces, None)
            if old is not None and not old.stopping:
                self.workers[worker.instance] = old
            self._apply(ServiceEvent.REPLACEMENT_FAILED)
            cause = worker.failure or f"exited with {status}"
            return ReplacementFailed(worker.instance, f"new worker {pid} {cause}")
        if self.spec.accept:
            # One instance per connection: its connection is gone, nothing to restart.
            self._apply(ServiceEvent.CONNECTION_ENDED)
            return None
        forced = worker.failure is not None
        if not wants_restart(self.spec.restart, status, forced):
            if status.clean and not forced:
                self._apply(ServiceEvent.WORKER_EXITED)
            else:
                cause = worker.failure or f"exited with {status}"
                self._apply(ServiceEvent.WORKER_FAILED, failure=f"{cause} (restart: no)")
            return None
        if not self._limit.allow(now):
            reason = (
                f"start limit hit: more than {self.spec.start_limit_burst} starts "
                f"within {self.spec.start_limit_interval:g}s"
            )
            self._apply(ServiceEvent.START_LIMIT_HIT, failure=reason)
            return Failed(reason)
        delay = self._next_delay(worker, now)
        self.restarts += 1
        self._apply(ServiceEvent.RESTART_SCHEDULED)
        return Restart(worker.instance, now + delay, delay)

    def spawn_failed(self, instance: int, now: float) -> Decision:
        """No worker could even be created (out of fds, processes or memory).

        Retried as ``restart:`` allows, with the resource backoff and outside
        the start limit (see the module docstring); ``restart: no`` makes the
        service failed, and so does a stop (nothing is started while stopping).
        """
        if self.spec.restart is RestartPolicy.NO or self._state is ServiceState.STOPPING:
            reason = "the worker could not be started"
            self._apply(ServiceEvent.FAILED, failure=reason)
            return Failed(reason)
        if self._resource_failures is None:
            self._resource_failures = {}
        failures = self._resource_failures.get(instance, 0) + 1
        self._resource_failures[instance] = failures
        delay = self._resource_delay(failures)
        self.restarts += 1
        self._apply(ServiceEvent.SPAWN_RETRY)
        return Restart(instance, now + delay, delay)

    def _resource_delay(self, failures: int) -> float:
        # at least RESOURCE_RETRY_DELAY: with restart-delay 0 an immediate retry
        # while out of fds would spin; at most the smaller of the two maxima
        first = max(self.spec.restart_delay, RESOURCE_RETRY_DELAY)
        longest = max(first, min(self.spec.restart_delay_max, RESOURCE_RETRY_DELAY_MAX))
        return min(first * 2.0 ** min(failures - 1, _MAX_DOUBLINGS), longest)

    def _next_delay(self, worker: Worker, now: float) -> float:
        if self._failed_starts is None:
            self._failed_starts = {}
        if now - worker.started_at >= STABLE_UPTIME:
            failures = 0
        else:
            failures = self._failed_starts.get(worker.instance, 0) + 1
        self._failed_starts[worker.instance] = failures
        if failures <= 1:
            return self.spec.restart_delay
        delay = self.spec.restart_delay * 2.0 ** min(failures - 1, _MAX_DOUBLINGS)
        return min(delay, self.spec.restart_delay_max)

    def request_stop(self) -> list[int]:
        """Mark every worker as stopping; returns the pids to signal."""
        self._start_after_stop = (
            _NO_INSTANCES  # a stop cancels a start queued behind an earlier one
        )
        for worker in (*self.workers.values(), *self.outgoing.values()):
            worker.stopping = True
            worker.replaces = None  # a stop ends a rolling restart: nothing is replaced
        self._apply(ServiceEvent.STOP_REQUESTED)
        if not self.workers and not self.outgoing:
            self._apply(ServiceEvent.ALL_STOPPED)
        return self.pids

    def describe(self) -> dict[str, object]:
        """The service as ``query-services`` shows it (SPEC 5)."""
        return {
            "unit": self.name,
            "state": self._state.value,
            "pids": self.pids,
            "started": self.started,
            "restarts": self.restarts,
            "last-exit": self.last_exit.as_dict() if self.last_exit else None,
            "status": self.status,
        }
