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
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
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
class HandoverState:
    argv: tuple[str, ...]
    store: tuple[StoredItem, ...]
    services: Mapping[str, ServiceItem]
    monitor_fd: int | None = None
    # Optional: without it (an older program's state) the new program binds a fresh name.
    notify_fd: int | None = None
    version: int = STATE_VERSION
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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise UpgradeError(f"unreadable handover state: {exc}") from None


def _stored_item(item: dict[str, Any]) -> StoredItem:
    inode = item.get("created_inode")
    return StoredItem(**{**item, "created_inode": tuple(inode) if inode else None})


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
