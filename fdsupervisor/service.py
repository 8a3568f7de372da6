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
"""

from __future__ import annotations

import enum
import os
import signal
from collections import deque
from dataclasses import dataclass, field

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


@dataclass(frozen=True, slots=True)
class Restart:
    """Start ``instance`` again at monotonic time ``at``."""

    instance: int
    at: float
    delay: float


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str


Decision = Restart | Failed | None


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
    _starts: deque[float] = field(default_factory=deque)

    def allow(self, now: float) -> bool:
        """Record a start at ``now`` unless ``burst`` starts already fell in the interval."""
        while self._starts and now - self._starts[0] >= self.interval:
            self._starts.popleft()
        if len(self._starts) >= self.burst:
            return False
        self._starts.append(now)
        return True

    def reset(self) -> None:
        self._starts.clear()


class Service:
    """The state of one unit's service; fed events, answers decisions."""

    def __init__(self, name: str, spec: ServiceSpec) -> None:
        self.name = name
        self.spec = spec
        self.state = ServiceState.INACTIVE
        self.workers: dict[int, Worker] = {}
        self.restarts = 0
        self.last_exit: ExitStatus | None = None
        self.status: str | None = None
        self.failure: str | None = None
        self._limit = StartLimit(spec.start_limit_burst, spec.start_limit_interval)
        self._failed_starts: dict[int, int] = {}
        self._resource_failures: dict[int, int] = {}  # instance → spawns failed in a row
        self.connections = 0

    @property
    def pids(self) -> list[int]:
        return sorted(w.pid for w in self.workers.values())

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
            self._failed_starts.clear()
            self._resource_failures.clear()
            self.failure = None
        elif not self._limit.allow(now):
            return False
        if manual:
            self._limit.allow(now)
        self.state = ServiceState.LISTENING if self.spec.accept else ServiceState.STARTING
        return True

    def mark_listening(self) -> None:
        """On-demand: the sockets are watched, the service waits for its first traffic."""
        self.state = ServiceState.LISTENING

    def mark_failed(self, reason: str) -> None:
        """The supervisor failed the service (start limit, spawn error, reload bind)."""
        self.state = ServiceState.FAILED
        self.failure = reason

    def set_status(self, text: str | None) -> None:
        """``STATUS=`` from a worker (``""`` clears it)."""
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
        """After an upgrade: the service as the old program left it (workers come apart)."""
        self.state = item_state
        self.restarts = restarts
        self.last_exit = last_exit
        self.status = status
        self.failure = failure
        self.connections = connections

    def worker_started(self, instance: int, pid: int, now: float) -> Worker:
        worker = Worker(instance, pid, now, ready=not self.spec.notify)
        self.workers[instance] = worker
        self._resource_failures.pop(instance, None)
        self.refresh_state()
        return worker

    def worker_ready(self, pid: int) -> bool:
        """READY=1 from a worker; True when that made the service running."""
        worker = self.worker_by_pid(pid)
        if worker is None or worker.ready:
            return False
        worker.ready = True
        before = self.state
        self.refresh_state()
        return before is not ServiceState.RUNNING and self.state is ServiceState.RUNNING

    def worker_by_pid(self, pid: int) -> Worker | None:
        return next((w for w in self.workers.values() if w.pid == pid), None)

    def next_instance(self) -> int:
        """Accept mode: each connection's instance gets the next number."""
        self.connections += 1
        return self.connections - 1

    def refresh_state(self) -> None:
        if self.state in (ServiceState.STOPPING, ServiceState.FAILED):
            return
        if self.spec.accept:
            self.state = ServiceState.RUNNING if self.workers else ServiceState.LISTENING
        elif self.workers and all(w.ready for w in self.workers.values()):
            self.state = ServiceState.RUNNING
        elif self.workers:
            self.state = ServiceState.STARTING

    def start_failed(self, reason: str) -> None:
        """The exec itself failed: no worker exists; the service is failed."""
        self.state = ServiceState.FAILED
        self.failure = reason

    def worker_exited(self, pid: int, status: ExitStatus, now: float) -> Decision:
        worker = self.worker_by_pid(pid)
        if worker is None:
            return None
        del self.workers[worker.instance]
        self.last_exit = status
        if worker.stopping or self.state in (ServiceState.STOPPING, ServiceState.INACTIVE):
            if not self.workers and self.state is ServiceState.STOPPING:
                self.state = ServiceState.INACTIVE
            return None
        if self.spec.accept:
            # One instance per connection: its connection is gone, nothing to restart.
            self.refresh_state()
            return None
        forced = worker.failure is not None
        if not wants_restart(self.spec.restart, status, forced):
            if not self.workers:
                clean = status.clean and not forced
                self.state = ServiceState.INACTIVE if clean else ServiceState.FAILED
            return None
        if not self._limit.allow(now):
            self.failure = (
                f"start limit hit: more than {self.spec.start_limit_burst} starts "
                f"within {self.spec.start_limit_interval:g}s"
            )
            self.state = ServiceState.FAILED
            return Failed(self.failure)
        delay = self._next_delay(worker, now)
        self.restarts += 1
        if not self.workers:
            self.state = ServiceState.STARTING
        return Restart(worker.instance, now + delay, delay)

    def spawn_failed(self, instance: int, now: float) -> Decision:
        """No worker could even be created (out of fds, processes or memory).

        Retried as ``restart:`` allows, with the resource backoff and outside
        the start limit (see the module docstring); ``restart: no`` makes the
        service failed.
        """
        if self.spec.restart is RestartPolicy.NO or self.state is ServiceState.STOPPING:
            self.state = ServiceState.FAILED
            return Failed("the worker could not be started")
        failures = self._resource_failures.get(instance, 0) + 1
        self._resource_failures[instance] = failures
        delay = self._resource_delay(failures)
        self.restarts += 1
        return Restart(instance, now + delay, delay)

    def _resource_delay(self, failures: int) -> float:
        # at least RESOURCE_RETRY_DELAY: with restart-delay 0 an immediate retry
        # while out of fds would spin; at most the smaller of the two maxima
        first = max(self.spec.restart_delay, RESOURCE_RETRY_DELAY)
        longest = max(first, min(self.spec.restart_delay_max, RESOURCE_RETRY_DELAY_MAX))
        return min(first * 2.0 ** min(failures - 1, _MAX_DOUBLINGS), longest)

    def _next_delay(self, worker: Worker, now: float) -> float:
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
        for worker in self.workers.values():
            worker.stopping = True
        self.state = ServiceState.STOPPING if self.workers else ServiceState.INACTIVE
        return self.pids

    def describe(self) -> dict[str, object]:
        """The service as ``query-services`` shows it (SPEC 5)."""
        return {
            "unit": self.name,
            "state": self.state.value,
            "pids": self.pids,
            "restarts": self.restarts,
            "last-exit": self.last_exit.as_dict() if self.last_exit else None,
            "status": self.status,
        }
