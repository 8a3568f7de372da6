"""What a service's workers keep with ``FDSTORE=1``: systemd's per-service fd store.

The fds live in the one :class:`~fdsupervisor.fdstore.FdStore`, under the
owner ``service:NAME``, so that query-fds, systemd's fd store (SPEC 8) and
the next workers' ``LISTEN_FDS`` see them as any other entry. This module
keeps the rules systemd's service.c applies to them: what may be stored
(``service_add_fd_store()``), when they are released
(``FileDescriptorStorePreserve=``), and what ``FDSTOREREMOVE=1`` drops.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

from .addresses import check_name
from .errors import FdSupervisorError, ValueProblem
from .fdpassing import same_file
from .fdstore import FdStore, RawFd, service_owner
from .notify import NotifyMessage
from .units import FdStorePreserve, ServiceSpec


class WorkerFdStoreHost(Protocol):
    """What a store needs of its unit's runner: the unit's name and its bound logger."""

    @property
    def unit_name(self) -> str: ...

    @property
    def log(self) -> Any: ...


class WorkerFdStore:
    """The fds one unit's workers stored, kept by the rules of systemd's service.c."""

    __slots__ = ("_host", "_shutting_down", "_store")

    def __init__(
        self, store: FdStore, host: WorkerFdStoreHost, shutting_down: Callable[[], bool]
    ) -> None:
        self._store = store
        # The host's logger and owner name when needed, not copies: one of each per
        # unit, most never used (docs/performance.md, RSS at 10,000 units).
        self._host = host
        self._shutting_down = shutting_down

    @property
    def owner(self) -> str:
        return service_owner(self._host.unit_name)

    @property
    def _log(self) -> Any:
        return self._host.log

    def keep(self, spec: ServiceSpec, message: NotifyMessage, fds: list[int]) -> None:
        """FDSTORE=1: keep the fds under the service, up to fd-store-max.

        As systemd keeps them (``service_add_fd_store()``): every fd of the
        message under its ``FDNAME``, beside any stored under that name
        before; an fd the store holds already (the same open file, under any
        name: a worker storing again what it was handed) is not kept twice.
        ``fd-store-max`` counts fds, as ``FileDescriptorStoreMax=`` does.
        The fds are ours: each is kept or closed.
        """
        name = message.fd_name or "stored"
        try:
            # stored fds reach the next worker in LISTEN_FDNAMES: the SPEC's name rule
            check_name(name, "FDNAME")
        except ValueProblem as exc:
            for fd in fds:
                os.close(fd)
            self._log.warning("fd_store_refused", fdname=name, error=exc.message)
            return
        limit = spec.fd_store_max
        for index, fd in enumerate(fds):
            stored = self._store.owned_by(self.owner)
            if any(same_file(fd, entry.fd) for entry in stored):
                os.close(fd)
                self._log.debug("fd_store_duplicate", fdname=name)
                continue
            if len(stored) >= limit:
                for rest in fds[index:]:
                    os.close(rest)
                self._log.warning(
                    "fd_store_full", fdname=name, fd_store_max=limit, closed=len(fds) - index
                )
                return
            try:
                # FDPOLL: watched for hang-ups (a file cannot be: kept until removed)
                self._store.add(self.owner, name, RawFd(fd), watch=message.fd_poll)
            except FdSupervisorError as exc:  # add() closed it
                for rest in fds[index + 1 :]:
                    os.close(rest)
                self._log.warning("fd_store_refused", fdname=name, error=str(exc))
                return
            self._log.info("fd_stored", fdname=name, fd=fd)

    def release(self, spec: ServiceSpec, *, restarting: bool) -> None:
        """The service has no worker left: release its stored fds if ``fd-store-preserve`` says so.

        systemd's FileDescriptorStorePreserve= (service.c): ``no`` releases
        them whenever the service goes dead (``service_enter_dead()``), an
        automatic restart or a restart job included; ``restart`` (the
        default) once it is inactive or failed with no restart to come
        (``service_release_resources()``); ``yes`` keeps them as long as the
        unit exists. A supervisor shutting down keeps them all: they go to
        systemd's fd store for its next run (SPEC 8).
        """
        preserve = spec.fd_store_preserve
        if self._shutting_down() or preserve is FdStorePreserve.YES:
            return
        if restarting and preserve is FdStorePreserve.RESTART:
            return
        count = self._store.close_owner(self.owner)
        if count:
            self._log.info(
                "fd_store_released", owner=self.owner, fds=count, fd_store_preserve=preserve.value
            )

    def drop(self, name: str, reason: str) -> None:
        """Close every fd the workers stored as ``name``, if there is one."""
        count = len(self._store.named(self.owner, name))
        if not count:
            return
        self._store.close(self.owner, name)
        self._log.info("fd_store_removed", owner=self.owner, fdname=name, reason=reason, fds=count)
