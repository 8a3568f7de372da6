"""Upgrade in place: re-execute the supervisor as the same process, handing everything over.

SIGUSR2 (or the monitor's ``upgrade``) makes the supervisor ``execve()`` its
own program again, possibly a newer version, keeping its pid. What must
survive crosses the exec in two ways:

- every fd of the store (sockets, stored fds), the monitor's listening
  socket and the notify socket stay open across the exec: their close-on-exec
  flag is cleared just before ``execve()`` and set again by the new program
  as it adopts them (the notify socket is never closed, so no one else can
  bind its name meanwhile, and the workers' ``NOTIFY_SOCKET`` stays valid);
- a description of them and of the workers (:class:`HandoverState`, JSON)
  travels in a memfd whose number is in ``FDSUPERVISOR_HANDOVER_FD``.

The workers are the supervisor's children before and after the exec (the pid
does not change), so the new program reopens a pidfd for each and goes on
reaping them; a worker that exits meanwhile stays a zombie until then.

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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import FdSupervisorError

HANDOVER_ENV = "FDSUPERVISOR_HANDOVER_FD"
STATE_VERSION = 1


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
    fds: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        numbers = [item.fd for item in self.store]
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
