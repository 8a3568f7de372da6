"""Rolling replacement: one unit's workers replaced one at a time (SPEC 8).

Part of a unit's run time, beside runner.py: ``service-restart`` and a reload
that changes a service hand their unit's runner a :class:`RollingRestart`
instead of stopping every worker first. For each instance it starts a new
worker (same instance number, so the same ``{instance}`` and cgroup name),
and once that one counts as started (``READY=1`` with ``notify: true``, at
spawn otherwise) the old worker of that instance gets its stop signal; then
the next instance. At no moment are fewer workers started than before. A new
worker that exits or misses ``start-timeout`` before it counts as started ends
the restart: its old worker serves on (service.py puts it back), so do those
not replaced yet, and the restart reports why.

einhorn's "smooth upgrade" does the same (spawn the new, wait for its ACK,
then stop the old), as does HAProxy's seamless reload; systemd has no such
thing: ``systemctl restart`` is always stop-then-start, what ``overlap:
false`` keeps here for programs that cannot run twice.

Pure of the kernel: it drives its :class:`RollingHost` (the runner), which
spawns and signals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .errors import FdSupervisorError
from .service import Service


class RollingHost(Protocol):
    """What a rolling restart needs of its unit's runner."""

    @property
    def service(self) -> Service: ...

    @property
    def unit_name(self) -> str: ...

    def spawn_replacement(self, instance: int, replaces: int) -> int:
        """Start a new worker for ``instance``; its pid. Raises FdSupervisorError or OSError."""

    def stop_worker(self, pid: int) -> None:
        """Send one worker its stop signal (SIGKILL after stop-timeout)."""

    def spawn_missing(self) -> None:
        """Start the instances that have no worker (more instances than before)."""


class RollingRestart:
    """One rolling restart; ``done`` gets None at the end, or why it failed (logged and
    emitted as ``SERVICE_RESTART_FAILED`` here)."""

    def __init__(
        self,
        host: RollingHost,
        done: Callable[[str | None], None],
        *,
        log: Any,
        emit: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self._host = host
        self._notify = host.service.spec.notify
        self._done: Callable[[str | None], None] | None = done
        self._log, self._emit = log, emit
        self._queue = sorted(host.service.workers)
        self.candidate: int | None = None  # the new worker that does not count as started yet
        log.info("service_restarting", pids=host.service.pids, rolling=True)

    @property
    def finished(self) -> bool:
        return self._done is None

    def busy(self) -> FdSupervisorError:
        """The error for a second restart while this one runs."""
        return FdSupervisorError(
            f"unit '{self._host.unit_name}' is being restarted already "
            f"(new worker {self.candidate} is not ready yet)"
        )

    def advance(self) -> None:
        """Replace the next instance, or finish; without notify, all at once in turn."""
        service = self._host.service
        while self.candidate is None:
            if not self._queue:
                self._host.spawn_missing()
                self._finish(None)
                return
            instance = self._queue.pop(0)
            old = service.workers.get(instance)
            if old is None or old.stopping:
                continue  # gone meanwhile: its restart, if any, starts the new definition
            if instance >= service.spec.instances:  # a reload lowered instances
                old.stopping = True
                self._host.stop_worker(old.pid)
                continue
            service.begin_replacement(instance)
            try:
                pid = self._host.spawn_replacement(instance, old.pid)
            except (FdSupervisorError, OSError) as exc:
                self._abort(instance, f"the new worker could not be started: {exc}")
                return
            if self._notify:
                self.candidate = pid
            else:
                self._replaced(pid)

    def worker_ready(self, pid: int) -> None:
        """READY=1 from ``pid``: if it is the new worker, its old one stops and the next begins."""
        if pid == self.candidate:
            self.candidate = None
            self._replaced(pid)
            self.advance()

    def failed(self, reason: str) -> None:
        """The new worker exited before it counted as started (service.py restored the old)."""
        self.candidate = None
        self._finish(reason)

    def cancel(self, reason: str) -> None:
        """The service is being stopped or failed: this restart is over."""
        self.candidate = None
        self._queue.clear()
        self._finish(reason)

    def _replaced(self, pid: int) -> None:
        old = self._host.service.replacement_started(pid)
        if old is not None:
            self._host.stop_worker(old.pid)

    def _abort(self, instance: int, reason: str) -> None:
        self._host.service.abort_replacement(instance)
        self._finish(reason)

    def _finish(self, error: str | None) -> None:
        done, self._done = self._done, None
        if done is None:
            return  # told once
        if error is None:
            self._log.info("service_restarted", pids=self._host.service.pids)
        else:
            self._log.error(
                "service_restart_failed", reason=error, note="the old workers keep running"
            )
            self._emit("SERVICE_RESTART_FAILED", {"unit": self._host.unit_name, "reason": error})
        done(error)
