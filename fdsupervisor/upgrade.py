"""Upgrade in place: re-execute the supervisor as the same process, handing everything over.

SIGUSR2 (or the monitor's ``upgrade``) makes the supervisor ``execve()`` its
own program again, possibly a newer version, keeping its pid. What must
survive crosses the exec in two ways:

- every fd of the store (sockets, stored fds), the monitor's and the
  metrics endpoint's listening sockets and the notify socket stay open across the exec: their close-on-exec
  flag is cleared just before ``execve()`` and set again by the new program
  as it adopts them (the notify socket is never closed, so no one else can
  bind its name meanwhile, and the workers' ``NOTIFY_SOCKET`` stays valid);
- a description of them and of the workers (:class:`HandoverState`, JSON)
  travels in a memfd whose number is in ``FDSUPERVISOR_HANDOVER_FD``.

The workers are the supervisor's children before and after the exec (the pid
does not change), so the new program goes on reaping them on SIGCHLD
(reaper.py); a worker that exits meanwhile stays a zombie until then, and its
exit goes to its runner.

Precedents: gunicorn's re-exec on SIGUSR2 (``Arbiter.reexec``) passes its
listening sockets by number in ``GUNICORN_FD``; nginx's binary upgrade
passes them in ``NGINX``; systemd's own ``daemon-reexec`` serializes its
state to a file and its fds into an fd set that survives the exec. Before
exec'ing, the old process runs the new program's ``check`` on the same unit
files: a new version that cannot even load them is not exec'd, and the old
supervisor keeps running. An ``execve()`` that fails leaves it running too.

Once exec'd there is no old process to go back to, so the state also says
how the old program ran (:class:`RunConfig`: each unit file's path and the
exact text it loaded, the command line's unit, the monitor and log
settings). The new program takes over on copies of the handed-over fds
(:func:`copy_fds`); if anything fails before it is ready (a new socket that
cannot be bound, its own code), it closes what it opened, copies included,
and starts again from the originals with the old units, binding nothing
new. systemd's ``do_reexecute()`` (src/core/main.c) has a way out only
for an ``execve()`` that fails (it tries ``/sbin/init``, then ``/bin/sh``);
in s6 every service has its own ``s6-supervise`` process, so a scanner
that fails loses no service's supervision. One process supervises all
workers here, so the new program must be able to go back to the old units.

The signals the supervisor handles are blocked across the exec (the mask
and pending signals survive ``execve()``, signal(7)); the new program
unblocks them only once its handlers are installed and it is ready, so a
SIGHUP or SIGTERM in between is delivered then instead of killing it.

This module is the state that crosses (:class:`HandoverState`, pure data
and JSON) and the old program's side, :class:`Upgrader`: the check, the
state, the exec. The new program's side (adopt, restore, finish, abandon)
is handover.py. Both work against a Protocol of what they need of the
supervisor and never import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from .binding import BoundSocket
from .errors import FdSupervisorError
from .fdpassing import scrub_environment
from .fdstore import FdStore
from .monitor import MonitorServer
from .notify import NotifySocket
from .service import Service
from .systemd import SystemdNotifier
from .units import Unit

HANDOVER_ENV = "FDSUPERVISOR_HANDOVER_FD"
STATE_VERSION = 1
# The new program's check before an upgrade blocks the loop; keep it well
# under half of a typical WatchdogSec= (30 s in contrib/), pinged before and after.
PREFLIGHT_TIMEOUT = 10.0


class UpgradeError(FdSupervisorError):
    pass


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One store entry as the new program adopts it."""

    owner: str
    name: str
    fd: int
    socket: bool  # a bound socket (BoundSocket), or a bare stored fd (RawFd)
    kind: str = "stream"
    backlog: int = 128
    created_path: str | None = None
    created_inode: tuple[int, int] | None = None
    watch_hangup: bool = False  # a worker's stored fd polled for POLLHUP


@dataclass(frozen=True, slots=True)
class WorkerItem:
    instance: int
    pid: int
    started_at: float  # CLOCK_MONOTONIC is system-wide: still valid after the exec
    ready: bool
    failure: str | None = None


@dataclass(frozen=True, slots=True)
class ServiceItem:
    state: str
    restarts: int
    last_exit: dict[str, int] | None
    status: str | None
    failure: str | None
    connections: int
    workers: tuple[WorkerItem, ...] = ()


@dataclass(frozen=True, slots=True)
class UnitFile:
    """A unit file as the old program loaded it: its path and its exact text."""

    path: str
    text: str


@dataclass(frozen=True, slots=True)
class CommandLineUnit:
    """The inputs of ``run --listen NAME=ADDRESS ... -- COMMAND`` (``unit_from_command_line``)."""

    listens: tuple[tuple[str, str], ...]
    command: tuple[str, ...]
    accept: bool = False
    on_demand: bool = False
    inetd: bool = False


@dataclass(frozen=True, slots=True)
class RunConfig:
    """How the old program ran: all the new program needs to fall back, without argv or disk.

    The unit files travel as text, not as serialized models: the unit file
    format is the documented contract every version reads, the models are
    internals a new version may change.
    """

    log_format: str = "auto"
    max_stored_fds: int = 1024
    unit_paths: tuple[str, ...] = ()  # what a reload reads again
    unit_files: tuple[UnitFile, ...] = ()
    command_line: CommandLineUnit | None = None
    monitor_path: str | None = None  # None: run without a monitor
    monitor_allowed_uids: tuple[int, ...] = ()
    use_cgroups: bool = True
    metrics_address: str | None = None  # --metrics, as given; None: no metrics endpoint
    # The soft RLIMIT_NOFILE the first program was started with, before it raised
    # its own: what workers get (spawn.worker_default_limits). None: not known.
    worker_nofile_soft: int | None = None


@dataclass(frozen=True, slots=True)
class HandoverState:
    argv: tuple[str, ...]
    store: tuple[StoredItem, ...]
    services: Mapping[str, ServiceItem]
    monitor_fd: int | None = None
    # Optional: without it (an older program's state) the new program binds a fresh name.
    notify_fd: int | None = None
    version: int = STATE_VERSION
    # The old program's configuration (None from a program without the fallback)
    # and its monitor socket file's inode (to tell it from a file put there since).
    config: RunConfig | None = None
    monitor_inode: int | None = None
    # The metrics endpoint's listening socket: kept, not bound again, so a
    # scraper is never refused across the exec and a port 0 stays the same port.
    metrics: StoredItem | None = None
    fds: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        numbers = [item.fd for item in self.store]
        if self.metrics is not None:
            numbers.append(self.metrics.fd)
        if self.monitor_fd is not None:
            numbers.append(self.monitor_fd)
        if self.notify_fd is not None:
            numbers.append(self.notify_fd)
        object.__setattr__(self, "fds", tuple(numbers))

    def to_json(self) -> bytes:
        data = asdict(self)
        del data["fds"]
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> HandoverState:
        try:
            data = json.loads(raw)
            if data.get("version") != STATE_VERSION:
                raise UpgradeError(
                    f"handover state version {data.get('version')!r} is not "
                    f"{STATE_VERSION}: the old and new versions cannot hand over"
                )
            store = tuple(_stored_item(item) for item in data["store"])
            services = {
                name: ServiceItem(
                    **{**item, "workers": tuple(WorkerItem(**w) for w in item["workers"])}
                )
                for name, item in data["services"].items()
            }
            return cls(
                argv=tuple(data["argv"]),
                store=store,
                services=services,
                monitor_fd=data["monitor_fd"],
                notify_fd=data.get("notify_fd"),
                config=_run_config(data.get("config")),
                monitor_inode=data.get("monitor_inode"),
                metrics=_stored_item(data["metrics"]) if data.get("metrics") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UpgradeError(f"unreadable handover state: {exc}") from None


def _stored_item(item: dict[str, Any]) -> StoredItem:
    inode = item.get("created_inode")
    return StoredItem(**{**item, "created_inode": tuple(inode) if inode else None})


def _run_config(data: dict[str, Any] | None) -> RunConfig | None:
    if data is None:
        return None
    command_line = data.get("command_line")
    return RunConfig(
        log_format=data["log_format"],
        max_stored_fds=data["max_stored_fds"],
        unit_paths=tuple(data["unit_paths"]),
        unit_files=tuple(UnitFile(**item) for item in data["unit_files"]),
        command_line=CommandLineUnit(
            listens=tuple((name, address) for name, address in command_line["listens"]),
            command=tuple(command_line["command"]),
            accept=command_line["accept"],
            on_demand=command_line["on_demand"],
            inetd=command_line["inetd"],
        )
        if command_line is not None
        else None,
        monitor_path=data["monitor_path"],
        monitor_allowed_uids=tuple(data["monitor_allowed_uids"]),
        use_cgroups=data.get("use_cgroups", True),
        metrics_address=data.get("metrics_address"),
        worker_nofile_soft=data.get("worker_nofile_soft"),
    )


def write_state(state: HandoverState) -> int:
    """The state in a memfd that survives the exec (no close-on-exec); its fd."""
    fd = os.memfd_create("fdsupervisor-handover", 0)
    try:
        os.write(fd, state.to_json())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_state(environ: dict[str, str]) -> HandoverState | None:
    """In the new program: the state handed over, if this start is an upgrade.

    Removes the variable (a worker must never see it) and closes the memfd.
    """
    value = environ.pop(HANDOVER_ENV, None)
    os.environ.pop(HANDOVER_ENV, None)
    if value is None:
        return None
    if not value.isdecimal():
        raise UpgradeError(f"{HANDOVER_ENV}={value!r} is not an fd number")
    fd = int(value)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError as exc:
        raise UpgradeError(f"cannot read the handover state from fd {fd}: {exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return HandoverState.from_json(b"".join(chunks))


def set_inheritable(fds: tuple[int, ...], inheritable: bool) -> None:
    for fd in fds:
        os.set_inheritable(fd, inheritable)


def copy_fds(state: HandoverState) -> HandoverState:
    """The same state naming close-on-exec duplicates of its fds: what the new program tries.

    Whatever the new program does wrong with its copies (closes one, lets
    a socket object that wraps one be collected) cannot touch the originals,
    which the fallback then takes. Raises :class:`UpgradeError` (nothing
    left open) when the fds cannot be duplicated, out of fds for instance.
    """
    copies: dict[int, int] = {}
    try:
        for fd in state.fds:
            copies[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError as exc:
        for copy in copies.values():
            os.close(copy)
        raise UpgradeError(f"cannot duplicate the handed-over fds: {exc}") from None
    return replace(
        state,
        store=tuple(replace(item, fd=copies[item.fd]) for item in state.store),
        monitor_fd=copies[state.monitor_fd] if state.monitor_fd is not None else None,
        notify_fd=copies[state.notify_fd] if state.notify_fd is not None else None,
        metrics=replace(state.metrics, fd=copies[state.metrics.fd]) if state.metrics else None,
    )


def close_copies(copies: HandoverState, originals: HandoverState) -> None:
    """Close each copy that is still open and still the same file as its original.

    After a failed take-over some copies may be closed already and their
    numbers reused; comparing the file (device and inode) closes only copies.
    """
    for copy, original in zip(copies.fds, originals.fds, strict=True):
        try:
            same = _identity(copy) == _identity(original)
        except OSError:
            continue  # closed already
        if same:
            os.close(copy)


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def close_originals(state: HandoverState) -> None:
    """After a take-over on copies: the originals are no longer anyone's."""
    for fd in state.fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --------------------------------------------------------------------------- the old program's side


class HandedEndpoint(Protocol):
    """The metrics endpoint as an upgrade sees it (metrics.MetricsServer, which reads the
    runners, which import this module: a Protocol, not an import)."""

    @property
    def bound(self) -> BoundSocket: ...

    def close_connections(self) -> None: ...


class UpgradeHost(Protocol):
    """What an upgrade needs of the running supervisor: what it hands over, and its signals."""

    @property
    def store(self) -> FdStore: ...

    @property
    def notifier(self) -> SystemdNotifier: ...

    @property
    def monitor(self) -> MonitorServer | None: ...

    @property
    def metrics(self) -> HandedEndpoint | None: ...

    @property
    def notify_socket(self) -> NotifySocket | None: ...

    @property
    def base_dir(self) -> Path: ...

    @property
    def shutting_down(self) -> bool: ...

    @property
    def reload_in_progress(self) -> bool: ...

    def unit_names(self) -> list[str]: ...

    def unit(self, name: str) -> Unit: ...

    def service(self, name: str) -> Service: ...

    def flush_notify_log(self) -> None:
        """Write the counts of rate-limited warnings now: they do not cross the exec."""

    def pending_signals(self) -> bytes:
        """The numbers of handled signals that arrived and are not handled yet (drained)."""


class Upgrader:
    """The old program's side of an upgrade: check the new program, hand over, exec.

    ``exec_argv`` is how to run this supervisor again, ``unit_paths`` what
    the new program's check reads, ``run_config`` how it runs (for the new
    program's fallback) and ``signals`` the signals the supervisor handles,
    blocked across the exec.
    """

    def __init__(
        self,
        host: UpgradeHost,
        *,
        exec_argv: Sequence[str],
        unit_paths: Sequence[Path],
        run_config: RunConfig | None,
        signals: Sequence[int],
        log: Any,
    ) -> None:
        self.host = host
        self.exec_argv = tuple(exec_argv)
        self.unit_paths = tuple(unit_paths)
        self.run_config = run_config
        self.signals = tuple(signals)
        self.log = log

    def upgrade(self) -> dict[str, Any]:
        """Re-execute this supervisor's program as the same process.

        Returns only if the upgrade did not happen (raising
        :class:`~fdsupervisor.errors.FdSupervisorError`); the old supervisor
        then runs on as before.
        """
        host = self.host
        if host.reload_in_progress or host.shutting_down:
            raise self._refused("a reload or a shutdown is in progress")
        rolling = [name for name in host.unit_names() if host.service(name).replacing]
        if rolling:
            # two workers of one instance cannot cross: the handover keeps one per instance
            raise self._refused(f"a rolling restart is in progress ({', '.join(rolling)})")
        if not self.exec_argv:
            raise self._refused("this supervisor does not know its own command line")
        host.notifier.ping()  # the check below blocks the loop: a watchdog deadline must not pass
        self._preflight()
        host.notifier.ping()
        state = self.handover_state()
        state_fd = write_state(state)
        host.flush_notify_log()  # counts of suppressed warnings do not cross
        # From here until the new program is ready, a handled signal must neither
        # kill it (after execve() its disposition is the default until the new
        # program installs handlers; SIGHUP's default is to terminate) nor be lost:
        # blocked, it stays pending across execve() (signal(7)) and the new program
        # unblocks it once ready. Blocked only now, so the check above ran unblocked.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            self._repost_signals()
            self.log.info("upgrading", pid=os.getpid(), fds=len(state.fds))
            host.notifier.reloading()
            if host.monitor is not None:
                host.monitor.close_clients()  # connections do not cross; clients reconnect
            if host.metrics is not None:
                host.metrics.close_connections()  # a scrape in progress is retried
            set_inheritable(state.fds, True)
            environ = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
            environ[HANDOVER_ENV] = str(state_fd)
            argv = [sys.executable, "-m", "fdsupervisor", *self.exec_argv]
            try:
                os.execve(sys.executable, argv, environ)
            except OSError as exc:
                set_inheritable(state.fds, False)
                os.close(state_fd)
                host.notifier.ready("upgrade failed; still running the old program")
                raise self._refused(f"execve {sys.executable}: {exc}") from None
        finally:
            # Only reached when the exec did not happen: what was pending arrives now.
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise AssertionError("unreachable")  # pragma: no cover

    def _repost_signals(self) -> None:
        """Signals that arrived while the upgrade was prepared: pending again, for the new program.

        Their numbers wait in the supervisor's wake-up socket, which does not
        survive the exec; with the signals blocked, raising them again leaves
        them pending across it. A SIGUSR2 among them asked for this very upgrade.
        """
        for signum in set(self.host.pending_signals()) - {signal.SIGUSR2}:
            if signum in self.signals:
                os.kill(os.getpid(), signum)

    def _refused(self, reason: str) -> FdSupervisorError:
        self.log.error("upgrade_failed", error=reason, note="the running supervisor carries on")
        return FdSupervisorError(f"upgrade refused, still running: {reason}")

    def _preflight(self) -> None:
        """The new program must at least load: run its ``check`` on our unit files."""
        command = [sys.executable, "-m", "fdsupervisor"]
        command += ["check", *map(str, self.unit_paths)] if self.unit_paths else ["--version"]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=PREFLIGHT_TIMEOUT,
                env=scrub_environment(os.environ),
                stdin=subprocess.DEVNULL,
                cwd=self.host.base_dir,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise self._refused(f"the new program did not run: {exc}") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise self._refused(
                "the new program's check failed: " + (detail[-1] if detail else "no output")
            )

    def handover_state(self) -> HandoverState:
        """Everything the new program takes over: the store, the services, the sockets."""
        host = self.host
        items = []
        for entry in host.store:
            resource = entry.resource
            if isinstance(resource, BoundSocket):
                items.append(_socket_item(entry.owner, resource))
            else:
                items.append(
                    StoredItem(
                        entry.owner,
                        entry.name,
                        entry.fd,
                        False,
                        # each fd's own FDPOLL: one name may have fds of both
                        watch_hangup=host.store.watches(entry),
                    )
                )
        services = {name: _service_item(host.service(name)) for name in host.unit_names()}
        monitor, notify_socket, metrics = host.monitor, host.notify_socket, host.metrics
        return HandoverState(
            self.exec_argv,
            tuple(items),
            services,
            monitor.fileno() if monitor is not None else None,
            notify_fd=notify_socket.fileno() if notify_socket is not None else None,
            config=self._current_config(),
            monitor_inode=monitor.inode if monitor is not None else None,
            metrics=_socket_item("metrics", metrics.bound) if metrics is not None else None,
        )

    def _current_config(self) -> RunConfig | None:
        """How to run exactly the units running now (None: the new program cannot fall back)."""
        if self.run_config is None or self.run_config.command_line is not None:
            return self.run_config  # a command-line unit comes from the command line again
        files = []
        for name in self.host.unit_names():
            unit = self.host.unit(name)
            if unit.text is None:
                return None
            files.append(UnitFile(str(unit.source), unit.text))
        return dataclasses.replace(self.run_config, unit_files=tuple(files))


def _socket_item(owner: str, bound: BoundSocket) -> StoredItem:
    return StoredItem(
        owner,
        bound.name,
        bound.fileno(),
        True,
        kind=bound.spec.kind.value,
        backlog=bound.spec.backlog,
        created_path=str(bound.created_path) if bound.created_path else None,
        created_inode=bound.created_inode,
    )


def _service_item(service: Service) -> ServiceItem:
    return ServiceItem(
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
