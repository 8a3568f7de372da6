"""Monitor commands: what each QMP command does to the supervisor.

Each handler takes the client (for the fds it sent) and the checked
arguments and returns the ``return`` value, or raises
:class:`~fdsupervisor.errors.CommandError`. Texts follow QEMU 7.2 where QEMU
has the command (``getfd``, ``closefd``, ``query-version``); the seed rule
for ``fd`` addresses is applied by :func:`fdsupervisor.addresses.parse_address`
with ``Context.MONITOR``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import __version__
from .addresses import Context, FdAddress, check_name, format_address, parse_address
from .binding import BoundSocket, InheritedFds, adopt_socket, bind_socket, describe_socket
from .errors import BindError, CommandError, FdSupervisorError, ValueProblem
from .fdstore import MONITOR_OWNER, RawFd, unit_owner
from .qmp import Arg, Execute, check_arguments, command_not_found, error_reply, reply
from .units import SocketKind, SocketSpec

if TYPE_CHECKING:
    from .monitor import MonitorClient
    from .supervisor import Supervisor

Handler = Callable[["MonitorClient", dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class Command:
    handler: Handler
    schema: tuple[Arg, ...] = ()


class Commands:
    """The command table, bound to one supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
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

    def execute(self, client: MonitorClient, request: Execute) -> tuple[bytes, list[int]]:
        """Run one command; the reply line and any fds that must ride on it."""
        command = self.table.get(request.command)
        reply_fds: list[int] = []
        try:
            if command is None:
                raise command_not_found(request.command)
            arguments = check_arguments(request.arguments, command.schema)
            result = command.handler(client, arguments)
            if isinstance(result, FdReply):
                reply_fds, result = [result.fd], result.value
        except CommandError as exc:
            return error_reply(request, exc), []
        except FdSupervisorError as exc:  # ValueProblem, StoreError, BindError, ...
            return error_reply(request, CommandError(str(exc))), []
        except OSError as exc:  # out of fds or memory (EMFILE on a dup, say): say so, live on
            return error_reply(request, CommandError(f"{request.command}: {exc}")), []
        return reply(request, result), reply_fds

    # -- the commands ---------------------------------------------------------------

    def query_version(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        return {
            "qemu": {"major": 0, "minor": 0, "micro": 0},
            "package": f"fdsupervisor {__version__}",
        }

    def query_commands(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        return [{"name": name} for name in ("qmp_capabilities", *self.table)]

    def getfd(self, client: MonitorClient, args: dict[str, Any]) -> Any:
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
        self.supervisor.store.add(MONITOR_OWNER, name, RawFd(fd), replace=True)
        self.supervisor.emit("FD_STORED", {"fdname": name, "owner": MONITOR_OWNER})
        return {}

    def closefd(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        name = args["fdname"]
        self.supervisor.store.close(MONITOR_OWNER, name)
        self.supervisor.emit("FD_CLOSED", {"fdname": name, "owner": MONITOR_OWNER})
        return {}

    def query_fds(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        result = []
        for entry in self.supervisor.store:
            info = describe_socket(entry.fd)
            result.append(
                {
                    "fdname": entry.name,
                    "owner": entry.owner,
                    "family": info.family,
                    "kind": info.kind,
                    "listening": info.listening,
                    "address": info.address,
                }
            )
        return result

    def fd_retrieve(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        name, owner = args["fdname"], args["owner"]
        entry = self.supervisor.store.get(owner, name)
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
            self.supervisor.store.close(owner, name)
            self.supervisor.emit("FD_CLOSED", {"fdname": name, "owner": owner})
        return FdReply(duplicate, {})

    def socket_add(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        sock_id = args["id"]
        check_name(sock_id, "socket id")
        try:
            kind = SocketKind(args["kind"])
        except ValueError:
            raise CommandError(
                "Parameter 'kind' expects one of stream, datagram, seqpacket"
            ) from None
        backlog = args["backlog"]
        unit_name = args.get("unit")
        runtime = self.supervisor.runtime(unit_name) if unit_name is not None else None
        owner = unit_owner(unit_name) if unit_name is not None else MONITOR_OWNER
        if self.supervisor.store.get(owner, sock_id) is not None:
            raise CommandError(f"socket '{sock_id}' already exists for {owner}")
        address = parse_address(args["addr"], Context.MONITOR)
        spec = SocketSpec(name=sock_id, address=address, kind=kind, backlog=backlog)
        bound = self._bind_or_adopt(
            spec, address, runtime.unit.base_dir if runtime else self.supervisor.base_dir
        )
        self.supervisor.add_socket(owner, bound)
        return {}

    def _bind_or_adopt(self, spec: SocketSpec, address: Any, base_dir: Any) -> BoundSocket:
        store = self.supervisor.store
        if isinstance(address, FdAddress):
            # The named fd leaves the store: the socket owns it now, as
            # QEMU's monitor_get_fd() removes it from the monitor's list.
            resource = store.take(MONITOR_OWNER, address.value)
            fd = resource.fileno()
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                store.add(MONITOR_OWNER, address.value, resource)
                raise CommandError(f"File descriptor '{address.value}' is not a socket") from None
            try:
                bound = adopt_socket(sock, spec, fd_label=address.value)
            except BindError:
                sock.detach()
                store.add(MONITOR_OWNER, address.value, resource)
                raise
            if isinstance(resource, RawFd):
                resource.detach()
            self.supervisor.emit("FD_CLOSED", {"fdname": address.value, "owner": MONITOR_OWNER})
            return bound
        return bind_socket(spec, base_dir=base_dir, inherited=InheritedFds(frozenset()))

    def socket_del(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        self.supervisor.remove_socket(args["id"], args.get("unit"))
        return {}

    def query_sockets(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        result = []
        for entry in self.supervisor.store:
            if not isinstance(entry.resource, BoundSocket):
                continue
            unit = entry.owner.removeprefix("unit:") if entry.owner.startswith("unit:") else None
            spec = entry.resource.spec
            result.append(
                {
                    "id": entry.name,
                    "unit": unit,
                    "address": describe_socket(entry.fd).address or format_address(spec.address),
                    "kind": spec.kind.value,
                    "fd": entry.fd,
                }
            )
        return result

    def query_services(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        return [rt.service.describe() for rt in self.supervisor.units.values()]

    def service_start(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        self.supervisor.start_service(args["unit"], manual=True)
        return {}

    def service_stop(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        self.supervisor.stop_service(args["unit"])
        return {}

    def service_restart(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        self.supervisor.restart_service(args["unit"])
        return {}

    def reload(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        return self.supervisor.reload()

    def upgrade(self, client: MonitorClient, args: dict[str, Any]) -> Any:
        """Re-exec in place; a reply comes only if it did not happen (the error)."""
        return self.supervisor.upgrade()


@dataclass(frozen=True, slots=True)
class FdReply:
    """A result whose reply carries ``fd`` (ours to close once sent)."""

    fd: int
    value: Any
