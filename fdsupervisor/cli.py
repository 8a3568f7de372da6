"""Command line: ``run``, ``check``; exit codes 0 (fine) and 1 (bad config or failure).

``run`` scans the fds it inherited before it opens anything itself: those,
and only those, are what a unit may reference as ``{type: fd, str: "N"}``.

After an upgrade's exec (:mod:`fdsupervisor.upgrade`), :func:`run_upgraded`
takes over instead, and falls back to the old program's units if anything
fails before the new program is ready: the workers never lose their
supervisor to a failed upgrade.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import resource
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from . import __version__, ctl
from .addresses import Context, SocketAddress, format_address, parse_address
from .binding import InheritedFds, check_resolvable
from .errors import BindError, ConfigError, ConfigErrors, FdSupervisorError, Location, ValueProblem
from .export import export_units, write_files
from .fdpassing import LISTEN_FDS_START
from .handover import unblock_signals
from .log import LOG_FORMATS, make_logger
from .monitor import default_monitor_path, monitor_fd_budget
from .spawn import load_units_resolved
from .spawn_slots import SPAWN_SLOTS, SpawnSlots
from .supervisor import HANDLED_SIGNALS, Supervisor
from .systemd import SystemdNotifier, SystemdSockets
from .units import FdStorePreserve, Unit, load_unit_text, load_units, unit_from_command_line
from .upgrade import (
    CommandLineUnit,
    HandoverState,
    RunConfig,
    UpgradeError,
    close_copies,
    close_originals,
    copy_fds,
    take_state,
)


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


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; (before, now, hard).

    systemd does the same for itself at start (main.c, bump_rlimit_nofile()):
    the soft limit of 1024 exists for programs that still use select(), and
    the supervisor uses epoll. An infinite hard limit means the kernel's
    fs.nr_open, the most setrlimit() accepts.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            target = soft
    return soft, max(soft, target), hard


# The fds the supervisor holds besides its units' sockets and its monitor's
# clients: at rest stdio, the loop's, the store's and the cgroups' epolls, the
# wake-up pair and the notify, monitor and metrics sockets (11); for a moment
# what a spawn (output files, the cgroup, the fork path's report pipe), an
# accepted connection or a /proc read opens. None per worker: they are reaped on
# SIGCHLD (reaper.py), not watched through a pidfd each. And the spawn slots
# with their placeholder (spawn_slots.py).
SUPERVISOR_FDS = 32 + SPAWN_SLOTS + 1


def fd_budget_problem(sockets: int, soft: int, hard: int, *, monitor: bool) -> str | None:
    """Why ``sockets`` unit sockets cannot fit ``RLIMIT_NOFILE`` (``soft``, raised already),
    or None: each socket is one fd, plus :data:`SUPERVISOR_FDS`, plus the share of the
    limit the monitor's clients may hold (:func:`~fdsupervisor.monitor.monitor_fd_budget`)."""
    if soft == resource.RLIM_INFINITY:
        return None
    reserved = monitor_fd_budget(soft) if monitor else 0
    needed = sockets + SUPERVISOR_FDS + reserved
    if needed <= soft:
        return None
    limit = "infinity" if hard == resource.RLIM_INFINITY else str(hard)
    monitor_part = f" + {reserved} for the monitor's clients" if monitor else ""
    return (
        f"the units cannot fit the fd limit: {sockets} sockets + {SUPERVISOR_FDS} for the "
        f"supervisor{monitor_part} = {needed} file descriptors, but RLIMIT_NOFILE is {soft} "
        f"(hard limit {limit}); raise the hard limit (LimitNOFILE= in the supervisor's "
        f"systemd unit, ulimit -Hn) or run fewer sockets"
    )


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
        "--metrics",
        metavar="ADDRESS",
        help="serve Prometheus metrics at GET /metrics on ADDRESS "
        "(a socket address shorthand: 127.0.0.1:9469, unix:PATH)",
    )
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

    export = commands.add_parser("export", help="write unit files for another engine")
    export.add_argument("--systemd", required=True, type=Path, metavar="OUTDIR")
    export.add_argument("units", nargs="+", type=Path, metavar="UNIT_DIR_OR_FILE")

    ctl.build_parser(commands.add_parser("ctl", help="talk to a running supervisor"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _ensure_stdio()
    # An upgrade's handover first: its fds are ours already, not inherited ones.
    try:
        handover = take_state(dict(os.environ))
    except UpgradeError as exc:
        # Without the state there is nothing to fall back to.
        print(
            f"fdsupervisor: upgrade failed: {exc}; no supervisor is left, "
            "the workers run on unsupervised: start fdsupervisor again",
            file=sys.stderr,
        )
        return 1
    scanned = InheritedFds.scan()
    inherited = InheritedFds(scanned.numbers - set(handover.fds)) if handover else scanned
    args_list = list(sys.argv[1:] if argv is None else argv)
    exec_argv = tuple(args_list)
    command: list[str] = []
    if "--" in args_list:
        split = args_list.index("--")
        args_list, command = args_list[:split], args_list[split + 1 :]
    if handover is not None:
        with _spawn_slots() as slots:
            return run_upgraded(args_list, command, inherited, handover, slots)
    args = build_parser().parse_args(args_list)
    if args.command == "check":
        return check(args.units)
    if args.command == "export":
        return export_systemd(args.systemd, args.units)
    if args.command == "ctl":
        return ctl.run(args)
    # The fds systemd or a parent passed free the numbers from 3 on, before
    # anything else is opened: for the spawn slots (spawn_slots.py).
    inherited = inherited.moved_up()
    systemd_sockets = SystemdSockets.from_environment(os.environ, os.getpid()).moved(inherited)
    with _spawn_slots() as slots:
        return run(args, command, inherited, exec_argv, systemd_sockets, slots)


@contextlib.contextmanager
def _spawn_slots() -> Iterator[SpawnSlots | None]:
    """The spawn slots (spawn_slots.py), reserved before any socket is bound or
    handed-over fd copied, so that they are low; None where no fd is left."""
    try:
        slots: SpawnSlots | None = SpawnSlots.reserve()
    except OSError:  # the fd budget check says it plainly
        slots = None
    try:
        yield slots
    finally:
        if slots is not None:
            slots.close()


def _command_line_unit(args: argparse.Namespace, command: list[str]) -> CommandLineUnit | None:
    """What ``--listen ... -- COMMAND`` asks for, or None when unit files are given."""
    if not (args.listen or command):
        return None
    if args.units:
        raise FdSupervisorError("give either unit files or --listen ... -- COMMAND, not both")
    if not args.listen:
        raise FdSupervisorError(
            "a command after -- needs at least one --listen NAME=ADDRESS (the sockets it gets)"
        )
    if not command:
        raise FdSupervisorError("--listen NAME=ADDRESS needs a command after --")
    listens = []
    for item in args.listen:
        name, sep, address = item.partition("=")
        if not sep:
            raise FdSupervisorError(f"--listen {item!r}: expected NAME=ADDRESS")
        listens.append((name, address))
    return CommandLineUnit(tuple(listens), tuple(command), args.accept, args.on_demand, args.inetd)


def _unit_of_command_line(line: CommandLineUnit) -> Unit:
    return unit_from_command_line(
        line.listens, line.command, accept=line.accept, on_demand=line.on_demand, inetd=line.inetd
    )


def _load(args: argparse.Namespace, command: list[str]) -> list[Unit]:
    line = _command_line_unit(args, command)
    if line is not None:
        return [_unit_of_command_line(line)]
    if not args.units:
        raise FdSupervisorError(
            "no units given: name unit files or directories, "
            "or use --listen NAME=ADDRESS -- COMMAND"
        )
    return load_units_resolved(args.units)


def run(
    args: argparse.Namespace,
    command: list[str],
    inherited: InheritedFds,
    exec_argv: Sequence[str] = (),
    systemd_sockets: SystemdSockets | None = None,
    slots: SpawnSlots | None = None,
) -> int:
    log = make_logger(args.log_format)
    before, soft, hard = raise_fd_limit()
    log.info(
        "fd_limit",
        soft=soft,
        hard="infinity" if hard == resource.RLIM_INFINITY else hard,
        raised_from=before if before != soft else None,
        workers=before,  # the soft limit workers get (spawn.worker_default_limits)
    )
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
    try:
        metrics = _metrics_address(args.metrics)
    except FdSupervisorError as exc:
        print(f"fdsupervisor: {exc}", file=sys.stderr)
        return 1
    config = _run_config(args, command, worker_nofile_soft=before)
    sockets = sum(len(unit.sockets) for unit in units)
    problem = fd_budget_problem(sockets, soft, hard, monitor=config.monitor_path is not None)
    if problem is not None:
        log.error("startup_failed", error=problem, note="nothing was bound")
        return 1
    supervisor = _supervisor(units, log, inherited, config, exec_argv, systemd_sockets, slots)
    try:
        supervisor.bind_all()
    except (BindError, FdSupervisorError) as exc:
        log.error("startup_failed", error=str(exc), note="nothing was bound")
        return 1
    if config.monitor_path is not None:
        path = Path(config.monitor_path)
        try:
            supervisor.attach_monitor(path, frozenset(config.monitor_allowed_uids))
        except (OSError, BindError) as exc:
            supervisor.store.close_all()
            reason = exc.message if isinstance(exc, BindError) else f"{path}: {exc}"
            log.error("startup_failed", error=f"monitor: {reason}", note="nothing was bound")
            return 1
    if metrics is not None:
        try:
            supervisor.attach_metrics(metrics)
        except BindError as exc:
            for close in supervisor.on_shutdown:
                close()  # the monitor
            supervisor.store.close_all()
            log.error("startup_failed", error=f"metrics: {exc.message}", note="nothing was bound")
            return 1
    supervisor.start()
    return supervisor.run(exiting=True)


def _metrics_address(text: str | None) -> SocketAddress | None:
    """``--metrics ADDRESS`` read as a unit's ``listen:`` is (None: no endpoint)."""
    if text is None:
        return None
    try:
        return parse_address(text, Context.STARTUP)
    except ValueProblem as exc:
        raise FdSupervisorError(f"--metrics {text!r}: {exc}") from None


def _run_config(
    args: argparse.Namespace, command: list[str], *, worker_nofile_soft: int | None
) -> RunConfig:
    """How this program runs, for an upgrade's fallback (unit texts are added at the upgrade).

    ``worker_nofile_soft``: the soft ``RLIMIT_NOFILE`` the supervisor was first
    started with, for its workers; it travels across upgrades in the state.
    """
    monitor = None
    if not args.no_monitor:
        monitor = str(args.monitor or default_monitor_path(os.environ, os.getuid()))
    line = _command_line_unit(args, command)
    return RunConfig(
        log_format=args.log_format,
        max_stored_fds=args.max_stored_fds,
        unit_paths=tuple(map(str, args.units)) if line is None else (),
        command_line=line,
        monitor_path=monitor,
        monitor_allowed_uids=tuple(sorted({0, os.getuid(), *args.monitor_allow_uid})),
        use_cgroups=not args.no_cgroups,
        metrics_address=args.metrics,
        worker_nofile_soft=worker_nofile_soft,
    )


def _supervisor(
    units: Sequence[Unit],
    log: Any,
    inherited: InheritedFds,
    config: RunConfig,
    exec_argv: Sequence[str],
    systemd_sockets: SystemdSockets | None,
    slots: SpawnSlots | None = None,
) -> Supervisor:
    return Supervisor(
        units,
        log=log,
        inherited=inherited,
        environ=os.environ,
        max_stored_fds=config.max_stored_fds,
        unit_paths=[Path(p) for p in config.unit_paths],
        notifier=SystemdNotifier(os.environ),
        exec_argv=exec_argv,
        systemd_sockets=systemd_sockets,
        run_config=config,
        use_cgroups=config.use_cgroups,
        spawn_slots=slots,
    )


def run_upgraded(
    args_list: list[str],
    command: list[str],
    inherited: InheritedFds,
    handover: HandoverState,
    slots: SpawnSlots | None = None,
) -> int:
    """The new program of an upgrade: take over, or go back to the old units; exit only if neither.

    Everything from reading the state to ``ready`` is guarded: whatever
    fails (the command line, the unit files, a bind, the monitor, this
    program's own code), what the attempt opened is closed and the old
    program's units run on the original fds, binding nothing new.
    """
    config = handover.config
    log = make_logger(config.log_format if config is not None else "auto")
    copies: HandoverState | None = None
    attempt: Supervisor | None = None
    try:
        args = build_parser().parse_args(args_list)
        if args.command != "run":
            raise UpgradeError(f"the handed-over command line is not 'run': {args.command!r}")
        log = make_logger(args.log_format)
        units = _load(args, command)
        # the limit the first program was started with, not this one's (raised)
        nofile = config.worker_nofile_soft if config is not None else None
        new_config = _run_config(args, command, worker_nofile_soft=nofile)
        copies = copy_fds(handover)
        attempt = _supervisor(
            units, log, inherited, new_config, handover.argv, SystemdSockets(), slots
        )
        attempt.adopt_handover(copies)
        if new_config.monitor_path is not None:
            attempt.attach_monitor(
                Path(new_config.monitor_path),
                frozenset(new_config.monitor_allowed_uids),
                existing_fd=copies.monitor_fd,
                existing_inode=handover.monitor_inode,
            )
        metrics = _metrics_address(new_config.metrics_address)
        if metrics is not None:
            attempt.attach_metrics(metrics, copies.metrics)
        attempt.start(copies)
    except (Exception, SystemExit) as exc:  # SystemExit: argparse refused the command line
        expected = isinstance(exc, (FdSupervisorError, OSError, SystemExit))
        log.error(
            "upgrade_failed",
            error=_failure(exc),
            note="carrying on with the handed-over units",
            exc_info=not expected,
        )
        if attempt is not None and copies is not None:
            try:
                attempt.abandon(copies)
            except Exception:  # this program's own code again: the copies are closed below
                log.exception("upgrade_abandon_failed")
    else:
        # The copies serve now; the originals and what is gone go.
        close_originals(handover)
        if copies.monitor_fd is not None and attempt.monitor is None:
            os.close(copies.monitor_fd)
        if copies.metrics is not None and attempt.metrics is None:
            os.close(copies.metrics.fd)
        try:
            attempt.finish_handover()
        except Exception:  # past ready, nothing to go back to: supervise on
            log.exception("internal_error", note="please report this")
        # Before the event that says the upgrade is done: whoever acts on
        # "upgraded" (a signal, a look at the mask) finds the signals open.
        unblock_signals(HANDLED_SIGNALS)
        log.info("upgraded", pid=os.getpid(), workers=_workers(handover))
        return attempt.run(exiting=True)
    attempt = None
    # Objects of the failed attempt that still wrap a copy close it now, before
    # the fallback opens anything whose number a late close could hit.
    gc.collect()
    if copies is not None:
        close_copies(copies, handover)
    try:
        supervisor = _fall_back(handover, inherited, log, slots)
    except Exception as exc:
        log.error(
            "upgrade_fallback_failed",
            error=_failure(exc),
            note="no supervisor is left: the workers run on unsupervised, holding their "
            "sockets; start fdsupervisor again",
            exc_info=not isinstance(exc, FdSupervisorError),
        )
        return 1
    unblock_signals(HANDLED_SIGNALS)
    log.warning(
        "upgrade_rolled_back",
        pid=os.getpid(),
        workers=_workers(handover),
        note="the old units run on the handed-over fds; fix the cause and upgrade again",
    )
    supervisor.notifier.status("upgrade failed: running the units handed over")
    return supervisor.run(exiting=True)


def _fall_back(
    handover: HandoverState, inherited: InheritedFds, log: Any, slots: SpawnSlots | None = None
) -> Supervisor:
    """The old program's units on the original fds, from the state alone: nothing new."""
    config = handover.config
    if config is None:
        raise UpgradeError("the old program handed over no configuration to go back to")
    if config.command_line is not None:
        units = [_unit_of_command_line(config.command_line)]
    else:
        units = [
            load_unit_text(f.text, Path(f.path), Path(f.path).parent) for f in config.unit_files
        ]
    supervisor = _supervisor(units, log, inherited, config, handover.argv, SystemdSockets(), slots)
    supervisor.adopt_handover(handover, bind_new=False)
    if config.monitor_path is not None:
        try:
            supervisor.attach_monitor(
                Path(config.monitor_path),
                frozenset(config.monitor_allowed_uids),
                existing_fd=handover.monitor_fd,
                existing_inode=handover.monitor_inode,
            )
        except Exception as exc:  # the workers matter more than the monitor
            log.error(
                "monitor_unavailable",
                error=_failure(exc),
                note="running without a monitor; the workers are supervised",
            )
    try:
        metrics = _metrics_address(config.metrics_address)
        if metrics is not None:
            supervisor.attach_metrics(metrics, handover.metrics)
    except Exception as exc:  # and more than the metrics
        log.error(
            "metrics_unavailable",
            error=_failure(exc),
            note="running without a metrics endpoint; the workers are supervised",
        )
    supervisor.start(handover)
    return supervisor


def _failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"the new program does not accept the command line (exit status {exc.code})"
    if isinstance(exc, FdSupervisorError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _workers(state: HandoverState) -> int:
    return sum(len(item.workers) for item in state.services.values())


def export_systemd(directory: Path, paths: Sequence[Path]) -> int:
    """``export --systemd``: every file, or (an error in any unit) none."""
    try:
        # Users and groups are the target machines' business: not resolved here.
        files = export_units(load_units(paths))
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"fdsupervisor: {error}", file=sys.stderr)
        return 1
    try:
        written = write_files(directory, files)
    except OSError as exc:
        print(f"fdsupervisor: {directory}: {exc.strerror}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


def check(paths: Sequence[Path]) -> int:
    try:
        units = load_units_resolved(paths)
    except ConfigErrors as exc:
        for error in exc.errors:
            print(f"fdsupervisor: {error}", file=sys.stderr)
        return 1
    # What can be known without binding: whether each inet address resolves.
    unresolved = []
    for unit in units:
        for spec in unit.sockets:
            try:
                check_resolvable(spec)
            except BindError as exc:
                unresolved.append(
                    ConfigError(
                        spec.location or Location(str(unit.source)),
                        ("sockets", spec.name, "listen"),
                        exc.message,
                    )
                )
    if unresolved:
        for error in unresolved:
            print(f"fdsupervisor: {error}", file=sys.stderr)
        return 1
    for unit in units:
        print(_describe_unit(unit))
        for index, spec in enumerate(unit.sockets):
            print(
                f"  socket {spec.name}: {format_address(spec.address)} {spec.kind.value}"
                f" (fd {LISTEN_FDS_START + index} in workers)"
            )
    return 0


def _describe_unit(unit: Unit) -> str:
    service = unit.service
    parts: list[Any] = [f"unit {unit.name} ({unit.source}):", service.activation.value]
    if service.accept:
        parts.append("accept")
    if service.instances > 1:
        parts.append(f"instances={service.instances}")
    if not service.overlap:
        parts.append("overlap=false")  # restarts stop first (SPEC 8)
    parts.append(f"restart={service.restart.value}")
    if service.fd_store_max or service.fd_store_preserve is not FdStorePreserve.RESTART:
        parts.append(f"fd-store-max={service.fd_store_max}")
        parts.append(f"fd-store-preserve={service.fd_store_preserve.value}")
    parts.append("exec=" + " ".join(service.exec))
    return " ".join(str(p) for p in parts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
