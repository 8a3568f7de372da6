"""Command line: ``run``, ``check``; exit codes 0 (fine) and 1 (bad config or failure).

``run`` scans the fds it inherited before it opens anything itself: those,
and only those, are what a unit may reference as ``{type: fd, str: "N"}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, ctl
from .addresses import format_address
from .binding import InheritedFds
from .errors import BindError, ConfigErrors, FdSupervisorError
from .log import LOG_FORMATS, make_logger
from .monitor import default_monitor_path
from .supervisor import Supervisor
from .systemd import SystemdNotifier, SystemdSockets
from .units import Unit, load_units, unit_from_command_line
from .upgrade import HandoverState, take_state


def _ensure_stdio() -> None:
    """Open /dev/null on any of fds 0-2 that is closed, so no socket lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdsupervisor",
        description="Socket-activation supervisor: binds the sockets, runs the workers.",
    )
    parser.add_argument("--version", action="version", version=f"fdsupervisor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="run the supervisor",
        usage="fdsupervisor run [options] UNIT_DIR_OR_FILE ...\n"
        "       fdsupervisor run [options] --listen NAME=ADDRESS ... -- COMMAND [ARGS...]",
    )
    run.add_argument("units", nargs="*", type=Path, metavar="UNIT_DIR_OR_FILE")
    run.add_argument(
        "--listen",
        "-l",
        action="append",
        default=[],
        metavar="NAME=ADDRESS",
        help="a socket of a one-off unit running COMMAND (after --)",
    )
    run.add_argument(
        "--accept", "-a", action="store_true", help="with --listen: one instance per connection"
    )
    run.add_argument(
        "--inetd",
        action="store_true",
        help="with --accept: the connection is also stdin and stdout",
    )
    run.add_argument(
        "--on-demand", action="store_true", help="with --listen: start COMMAND on the first traffic"
    )
    run.add_argument("--log-format", choices=LOG_FORMATS, default="auto")
    run.add_argument("--max-stored-fds", type=int, default=1024, metavar="N")
    run.add_argument(
        "--monitor",
        type=Path,
        metavar="PATH",
        help="the QMP monitor socket (default: $RUNTIME_DIRECTORY/monitor.sock, "
        "/run/fdsupervisor/monitor.sock for root, else "
        "$XDG_RUNTIME_DIR/fdsupervisor/monitor.sock)",
    )
    run.add_argument("--no-monitor", action="store_true", help="run without a monitor socket")
    run.add_argument(
        "--no-cgroups",
        action="store_true",
        help="do not put each worker in a cgroup of its own (processes that escape a "
        "worker's process group are then only logged, not stopped)",
    )
    run.add_argument(
        "--monitor-allow-uid",
        type=int,
        action="append",
        default=[],
        metavar="UID",
        help="also let this uid use the monitor (root and the supervisor's own uid always may)",
    )

    check = commands.add_parser("check", help="validate unit files")
    check.add_argument("units", nargs="+", type=Path, metavar="UNIT_DIR_OR_FILE")

    ctl.build_parser(commands.add_parser("ctl", help="talk to a running supervisor"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _ensure_stdio()
    # An upgrade's handover first: its fds are ours already, not inherited ones.
    handover = take_state(dict(os.environ))
    scanned = InheritedFds.scan()
    inherited = InheritedFds(scanned.numbers - set(handover.fds)) if handover else scanned
    args_list = list(sys.argv[1:] if argv is None else argv)
    exec_argv = tuple(args_list)
    command: list[str] = []
    if "--" in args_list:
        split = args_list.index("--")
        args_list, command = args_list[:split], args_list[split + 1 :]
    args = build_parser().parse_args(args_list)
    if args.command == "check":
        return check(args.units)
    if args.command == "ctl":
        return ctl.run(args)
    systemd_sockets = (
        SystemdSockets() if handover else SystemdSockets.from_environment(os.environ, os.getpid())
    )
    return run(args, command, inherited, exec_argv, handover, systemd_sockets)


def _load(args: argparse.Namespace, command: list[str]) -> list[Unit]:
    if args.listen or command:
        if args.units:
            raise FdSupervisorError("give either unit files or --listen ... -- COMMAND, not both")
        if not args.listen or not command:
            raise FdSupervisorError("--listen NAME=ADDRESS needs a command after --")
        listens = []
        for item in args.listen:
            name, sep, address = item.partition("=")
            if not sep:
                raise FdSupervisorError(f"--listen {item!r}: expected NAME=ADDRESS")
            listens.append((name, address))
        return [
            unit_from_command_line(
                listens, command, accept=args.accept, on_demand=args.on_demand, inetd=args.inetd
            )
        ]
    if not args.units:
        raise FdSupervisorError(
            "no units given: name unit files or directories, "
            "or use --listen NAME=ADDRESS -- COMMAND"
        )
    return load_units(args.units)


def run(
    args: argparse.Namespace,
    command: list[str],
    inherited: InheritedFds,
    exec_argv: Sequence[str] = (),
    handover: HandoverState | None = None,
    systemd_sockets: SystemdSockets | None = None,
) -> int:
    log = make_logger(args.log_format)
    if systemd_sockets is not None and systemd_sockets.problem:
        log.warning("listen_fds_ignored", problem=systemd_sockets.problem)
    try:
        units = _load(args, command)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"fdsupervisor: {error}", file=sys.stderr)
        return 1
    except FdSupervisorError as exc:
        print(f"fdsupervisor: {exc}", file=sys.stderr)
        return 1
    supervisor = Supervisor(
        units,
        log=log,
        inherited=inherited,
        environ=os.environ,
        max_stored_fds=args.max_stored_fds,
        unit_paths=args.units if not (args.listen or command) else (),
        notifier=SystemdNotifier(os.environ),
        exec_argv=exec_argv,
        systemd_sockets=systemd_sockets,
        use_cgroups=not args.no_cgroups,
    )
    try:
        if handover is None:
            supervisor.bind_all()
        else:
            supervisor.adopt_handover(handover)
    except (BindError, FdSupervisorError) as exc:
        log.error("startup_failed", error=str(exc), note="nothing was bound")
        return 1
    if not args.no_monitor:
        path = args.monitor or default_monitor_path(os.environ, os.getuid())
        allowed = frozenset({0, os.getuid(), *args.monitor_allow_uid})
        try:
            supervisor.attach_monitor(
                path, allowed, existing_fd=handover.monitor_fd if handover else None
            )
        except (OSError, BindError) as exc:
            supervisor.store.close_all()
            reason = exc.message if isinstance(exc, BindError) else f"{path}: {exc}"
            log.error("startup_failed", error=f"monitor: {reason}", note="nothing was bound")
            return 1
    supervisor.start(handover)
    if handover is not None:
        log.info(
            "upgraded",
            pid=os.getpid(),
            workers=sum(len(s.workers) for s in handover.services.values()),
        )
    return supervisor.run()


def check(paths: Sequence[Path]) -> int:
    try:
        units = load_units(paths)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"fdsupervisor: {error}", file=sys.stderr)
        return 1
    for unit in units:
        print(_describe_unit(unit))
        for index, spec in enumerate(unit.sockets):
            print(
                f"  socket {spec.name}: {format_address(spec.address)} {spec.kind.value}"
                f" (fd {3 + index} in workers)"
            )
    return 0


def _describe_unit(unit: Unit) -> str:
    service = unit.service
    parts: list[Any] = [f"unit {unit.name} ({unit.source}):", service.activation.value]
    if service.accept:
        parts.append("accept")
    if service.instances > 1:
        parts.append(f"instances={service.instances}")
    parts.append(f"restart={service.restart.value}")
    parts.append("exec=" + " ".join(service.exec))
    return " ".join(str(p) for p in parts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
