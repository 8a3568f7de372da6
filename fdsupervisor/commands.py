"""Monitor commands: what each QMP command does, through the supervisor's :class:`Control`.

The monitor (``monitor.py``) hands every well-formed command to
:meth:`Commands.execute`. Each handler takes the client (for the fds it
sent) and the checked arguments and returns its typed ``return`` value (the
TypedDicts below are SPEC 5's shapes), or raises. ``execute`` is the one
place where an exception becomes a QMP error: its class and its text.

Handlers see the supervisor only through :class:`Control`, the few
operations listed there, so this module does not know the supervisor. They
change the fd store only through its methods; the store reports each change
(``FD_STORED`` / ``FD_CLOSED``) itself, so no handler emits an event.

Texts follow QEMU 7.2 where QEMU has the command (``getfd``, ``closefd``,
``query-version``); the seed rule for ``fd`` addresses is applied by
:func:`fdsupervisor.addresses.parse_address` with ``Context.MONITOR``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol, TypeAlias, TypedDict

from . import __version__
from .addresses import (
    Context,
    FdAddress,
    check_name,
    format_address,
    parse_address,
)
from .binding import (
    BoundSocket,
    Family,
    InheritedFds,
    Kind,
    adopt_socket,
    bind_socket,
    describe_socket,
)
from .errors import BindError, CommandError, FdSupervisorError, ValueProblem
from .fdstore import (
    MONITOR_OWNER,
    Entry,
    FdStore,
    RawFd,
    owner_unit,
    unit_owner,
)
from .monitor import DeferredReply, MonitorClient
from .qmp import Arg, Execute, check_arguments, command_not_found, error_reply, reply
from .units import SocketKind, SocketSpec, Unit


class Control(Protocol):
    """What the commands use of the supervisor, and nothing more.

    ``unit`` raises :class:`~fdsupervisor.errors.FdSupervisorError`
    (``unit 'X' not found``) for a unit it does not run; the service
    operations and ``remove_socket`` raise it for what they refuse.
    """

    @property
    def store(self) -> FdStore: ...

    @property
    def base_dir(self) -> Path: ...

    def unit(self, name: str, /) -> Unit: ...

    def describe_services(self) -> Sequence[Mapping[str, Any]]: ...

    def start_service(self, name: str, /, *, manual: bool = True) -> None: ...

    def stop_service(self, name: str, /) -> None: ...

    def restart_service(self, name: str, done: Callable[[str | None], None], /) -> None:
        """Restart the unit's workers; ``done`` gets None once it is over, or why it failed."""

    def reload(self) -> Mapping[str, Any]: ...

    def upgrade(self) -> Mapping[str, Any]: ...

    def add_socket(self, owner: str, bound: BoundSocket, /) -> None: ...

    def remove_socket(self, socket_id: str, unit: str | None, /) -> None: ...


# -- the results (SPEC 5, docs/monitor.md) ----------------------------------------------


class Empty(TypedDict):
    """``{}``: what a command with nothing to return answers (QEMU's qmp_dispatch())."""


class QemuVersion(TypedDict):
    major: int
    minor: int
    micro: int


class VersionInfo(TypedDict):
    qemu: QemuVersion
    package: str


class CommandInfo(TypedDict):
    name: str


class FdRow(TypedDict):
    """One row of ``query-fds``; ``owner`` is ``unit:NAME``, ``service:NAME`` or ``monitor``.

    ``inode``: the fd's inode number, which tells the same socket or file
    apart from a new one (after a restart, say). A name may have several
    rows in a service's store (several fds stored under one ``FDNAME``).
    """

    fdname: str
    owner: str
    family: Family
    kind: Kind
    listening: bool
    address: str
    inode: int


class SocketRow(TypedDict):
    """One row of ``query-sockets``; ``fd`` is its number in the supervisor."""

    id: str
    unit: str | None
    address: str
    kind: str
    fd: int


class ExitRow(TypedDict, total=False):
    """``{"code": N}`` or ``{"signal": N}``."""

    code: int
    signal: int


ServiceStateName = Literal["inactive", "listening", "starting", "running", "stopping", "failed"]

ServiceRow = TypedDict(
    "ServiceRow",
    {
        "unit": str,
        "state": ServiceStateName,
        "pids": list[int],
        "started": int,
        "restarts": int,
        "last-exit": ExitRow | None,
        "status": str | None,
    },
)
"""One row of ``query-services``."""

ReloadResult = TypedDict("ReloadResult", {"summary": str, "waiting-for": list[str]})
"""What ``reload`` answers: the plan's summary, and the units whose workers it waits for."""


class FdEventData(TypedDict):
    """The data of ``FD_STORED`` and ``FD_CLOSED``."""

    fdname: str
    owner: str


def fd_event_data(entry: Entry) -> FdEventData:
    """The event data for a store change (the supervisor's ``FdStore(on_change=...)``)."""
    return {"fdname": entry.name, "owner": entry.owner}


class Pending:
    """A result that comes later: ``settle`` with None (``{}``) or the failure's text.

    ``execute`` turns it into the monitor's :class:`~fdsupervisor.monitor.DeferredReply`.
    """

    __slots__ = ("_outcome", "_then")

    def __init__(self) -> None:
        self._outcome: tuple[str | None] | None = None
        self._then: Callable[[str | None], None] | None = None

    def settle(self, error: str | None) -> None:
        if self._outcome is not None:
            return
        self._outcome = (error,)
        if self._then is not None:
            self._then(error)

    def then(self, callback: Callable[[str | None], None]) -> None:
        self._then = callback
        if self._outcome is not None:
            callback(self._outcome[0])


@dataclass(frozen=True, slots=True)
class FdReply:
    """A result whose reply carries ``fd`` (ours to close once sent)."""

    fd: int
    value: Empty


Result: TypeAlias = (
    VersionInfo
    | list[CommandInfo]
    | Empty
    | list[FdRow]
    | list[SocketRow]
    | list[ServiceRow]
    | ReloadResult
    | Mapping[str, Any]
    | FdReply
    | Pending
)
Handler = Callable[[MonitorClient, dict[str, Any]], Result]


@dataclass(frozen=True, slots=True)
class Command:
    handler: Handler
    schema: tuple[Arg, ...] = ()


def command_error(command: str, exc: FdSupervisorError | OSError) -> CommandError:
    """The QMP error for an exception a command raised: the one mapping.

    Our own errors (ValueProblem, StoreError, BindError, ...) say what is
    wrong in their text and are ``GenericError``, as nearly everything is in
    QEMU; an OSError (out of fds or memory: EMFILE on a dup, say) is named
    with the command, and the connection lives on.
    """
    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, FdSupervisorError):
        return CommandError(str(exc))
    return CommandError(f"{command}: {exc}")


def _settled(request: Execute, deferred: DeferredReply, error: str | None) -> None:
    empty: Empty = {}
    deferred.resolve(
        reply(request, empty) if error is None else error_reply(request, CommandError(error))
    )


class Commands:
    """The command table, bound to one supervisor."""

    def __init__(self, control: Control) -> None:
        self.control = control
        self.table: dict[str, Command] = {
            "query-version": Command(self.query_version),
            "query-commands": Command(self.query_commands),
            "getfd": Command(self.getfd, (Arg("fdname", str),)),
            "closefd": Command(self.closefd, (Arg("fdname", str),)),
            "query-fds": Command(self.query_fds),
            "fd-retrieve": Command(
                self.fd_retrieve,
                (
                    Arg("fdname", str),
                    Arg("remove", bool, required=False, default=False),
                    Arg("owner", str, required=False, default=MONITOR_OWNER),
                ),
            ),
            "socket-add": Command(
                self.socket_add,
                (
                    Arg("id", str),
                    Arg("addr", dict),
                    Arg("kind", str, required=False, default="stream"),
                    Arg("backlog", int, required=False, default=128),
                    Arg("unit", str, required=False),
                ),
            ),
            "socket-del": Command(
                self.socket_del, (Arg("id", str), Arg("unit", str, required=False))
            ),
            "query-sockets": Command(self.query_sockets),
            "query-services": Command(self.query_services),
            "service-start": Command(self.service_start, (Arg("unit", str),)),
            "service-stop": Command(self.service_stop, (Arg("unit", str),)),
            "service-restart": Command(self.service_restart, (Arg("unit", str),)),
            "reload": Command(self.reload),
            "upgrade": Command(self.upgrade),
        }

    def execute(
        self, client: MonitorClient, request: Execute
    ) -> tuple[bytes, list[int]] | DeferredReply:
        """Run one command; the reply line and any fds that must ride on it, or a later reply."""
        command = self.table.get(request.command)
        reply_fds: list[int] = []
        try:
            if command is None:
                raise command_not_found(request.command)
            arguments = check_arguments(request.arguments, command.schema)
            result = command.handler(client, arguments)
        except (FdSupervisorError, OSError) as exc:
            return error_reply(request, command_error(request.command, exc)), []
        if isinstance(result, Pending):
            deferred = DeferredReply()
            result.then(partial(_settled, request, deferred))
            return deferred
        if isinstance(result, FdReply):
            reply_fds, result = [result.fd], result.value
        return reply(request, result), reply_fds

    # -- the commands ---------------------------------------------------------------

    def query_version(self, client: MonitorClient, args: dict[str, Any]) -> VersionInfo:
        return {
            "qemu": {"major": 0, "minor": 0, "micro": 0},
            "package": f"fdsupervisor {__version__}",
        }

    def query_commands(self, client: MonitorClient, args: dict[str, Any]) -> list[CommandInfo]:
        return [{"name": name} for name in ("qmp_capabilities", *self.table)]

    def getfd(self, client: MonitorClient, args: dict[str, Any]) -> Empty:
        name = args["fdname"]
        if name[:1].isdigit():
            # QEMU 7.2 monitor/misc.c: names and numbers must never be confused
            raise CommandError("Parameter 'fdname' expects a name not starting with a digit")
        try:
            check_name(name, "fd name")
        except ValueProblem as exc:
            raise CommandError(f"Parameter 'fdname' {exc.message}") from None
        fd = client.take_fd()
        if fd is None and client.lost_fds:
            reason, client.lost_fds = client.lost_fds, None
            raise CommandError(f"A file descriptor was sent but could not be received: {reason}")
        if fd is None:
            raise CommandError("No file descriptor supplied via SCM_RIGHTS")
        self.control.store.add(MONITOR_OWNER, name, RawFd(fd), replace=True)
        return {}

    def closefd(self, client: MonitorClient, args: dict[str, Any]) -> Empty:
        self.control.store.close(MONITOR_OWNER, args["fdname"])
        return {}

    def query_fds(self, client: MonitorClient, args: dict[str, Any]) -> list[FdRow]:
        result: list[FdRow] = []
        for entry in self.control.store:
            info = describe_socket(entry.fd)
            result.append(
                {
                    "fdname": entry.name,
                    "owner": entry.owner,
                    "family": info.family,
                    "kind": info.kind,
                    "listening": info.listening,
                    "address": info.address,
                    "inode": os.fstat(entry.fd).st_ino,
                }
            )
        return result

    def fd_retrieve(self, client: MonitorClient, args: dict[str, Any]) -> FdReply:
        name, owner = args["fdname"], args["owner"]
        store = self.control.store
        entry = store.get(owner, name)
        if entry is None:
            raise CommandError(f"File descriptor named '{name}' not found")
        if args.get("remove") and owner != MONITOR_OWNER:
            raise CommandError(
                f"'{name}' belongs to {owner}: only fds stored with getfd "
                "can be removed; use socket-del for sockets"
            )
        problem = client.fd_limit_problem(1)
        client.fds_refused(problem, command="fd-retrieve")
        if problem is not None:
            raise CommandError(f"fd-retrieve refused: {problem}")
        duplicate = os.dup(entry.fd)  # close-on-exec, as every dup in Python
        if args.get("remove"):
            store.close(owner, name)
        return FdReply(duplicate, {})

    def socket_add(self, client: MonitorClient, args: dict[str, Any]) -> Empty:
        sock_id = args["id"]
        check_name(sock_id, "socket id")
        try:
            kind = SocketKind(args["kind"])
            if kind is SocketKind.FIFO:  # declared in a unit file only (addresses.FifoAddress)
                raise ValueError(kind)
        except ValueError:
            raise CommandError(
                "Parameter 'kind' expects one of stream, datagram, seqpacket"
            ) from None
        unit_name = args.get("unit")
        unit = self.control.unit(unit_name) if unit_name is not None else None
        owner = unit_owner(unit_name) if unit_name is not None else MONITOR_OWNER
        if self.control.store.get(owner, sock_id) is not None:
            raise CommandError(f"socket '{sock_id}' already exists for {owner}")
        address = parse_address(args["addr"], Context.MONITOR)
        spec = SocketSpec(name=sock_id, address=address, kind=kind, backlog=args["backlog"])
        if isinstance(address, FdAddress):
            bound = self._adopt_named_fd(spec, address.value)
        else:
            base_dir = unit.base_dir if unit is not None else self.control.base_dir
            bound = bind_socket(spec, base_dir=base_dir, inherited=InheritedFds(frozenset()))
        self.control.add_socket(owner, bound)
        return {}

    def _adopt_named_fd(self, spec: SocketSpec, name: str) -> BoundSocket:
        """The socket a client stored with ``getfd``, now ``spec``'s; it leaves the store.

        As QEMU's monitor_get_fd() removes the fd from the monitor's list. It
        leaves only once adopted: a refusal leaves the store as it was.
        """
        store = self.control.store
        entry = store.get(MONITOR_OWNER, name)
        if entry is None:
            raise CommandError(f"File descriptor named '{name}' not found")
        if not isinstance(entry.resource, RawFd):
            # a socket added with socket-add (no unit) owns its fd already
            raise CommandError(f"'{name}' is a socket added with socket-add, not an fd from getfd")
        try:
            sock = socket.socket(fileno=entry.fd)
        except OSError:
            raise CommandError(f"File descriptor '{name}' is not a socket") from None
        try:
            bound = adopt_socket(sock, spec, fd_label=name)
        except BindError:
            sock.detach()
            raise
        resource = store.take(MONITOR_OWNER, name)
        assert isinstance(resource, RawFd)
        resource.detach()  # the bound socket owns the fd now
        return bound

    def socket_del(self, client: MonitorClient, args: dict[str, Any]) -> Empty:
        self.control.remove_socket(args["id"], args.get("unit"))
        return {}

    def query_sockets(self, client: MonitorClient, args: dict[str, Any]) -> list[SocketRow]:
        result: list[SocketRow] = []
        for entry in self.control.store:
            if not isinstance(entry.resource, BoundSocket):
                continue
            spec = entry.resource.spec
            result.append(
                {
                    "id": entry.name,
                    "unit": owner_unit(entry.owner),
                    "address": describe_socket(entry.fd).address or format_address(spec.address),
                    "kind": spec.kind.value,
                    "fd": entry.fd,
                }
            )
        return result

    def query_services(self, client: MonitorClient, args: dict[str, Any]) -> list[ServiceRow]:
        return [
            {
                "unit": row["unit"],
                "state": row["state"],
                "pids": row["pids"],
                "started": row["started"],
                "restarts": row["restarts"],
                "last-exit": row["last-exit"],
                "status": row["status"],
            }
            for row in self.control.describe_services()
        ]

    def service_start(self, client: MonitorClient, args: dict[str, Any]) -> Empty:
        self.control.start_service(args["unit"], manual=True)
        return {}

    def service_stop(self, client: MonitorClient, args: dict[str, Any]) -> Empty:
        self.control.stop_service(args["unit"])
        return {}

    def service_restart(self, client: MonitorClient, args: dict[str, Any]) -> Pending:
        """Answered once the new workers count as started, or with why they could not."""
        pending = Pending()
        self.control.restart_service(args["unit"], pending.settle)
        return pending

    def reload(self, client: MonitorClient, args: dict[str, Any]) -> ReloadResult:
        result = self.control.reload()
        return {"summary": result["summary"], "waiting-for": result["waiting-for"]}

    def upgrade(self, client: MonitorClient, args: dict[str, Any]) -> Mapping[str, Any]:
        """Re-exec in place; a reply comes only if it did not happen (the error)."""
        return self.control.upgrade()
