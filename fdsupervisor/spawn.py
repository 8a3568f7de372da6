"""The spawn plan and the exec itself.

Fifth step of the flow, in the three stages of CPython's ``subprocess``,
which decides all of the child's work before the fork:

1. resolve (:func:`prepare_worker`, :func:`resolve_worker`): what the plan
   needs from outside the unit. The user and groups through the user and
   group databases (``pwd``, ``grp``), the program in the worker's ``PATH``,
   the ``stdout:`` / ``stderr:`` targets the supervisor opens (``null``,
   ``journal``), and the spawn path (``FDSUPERVISOR_SPAWN``). ``file:`` and
   ``append:`` are not opened here: they travel as paths, for the child to
   open as the worker (:class:`OutputFile`).
2. plan (:func:`plan_worker`): pure. From the unit, the fds its worker gets
   (:func:`worker_fds`, SPEC 4's order), the supervisor's environment and
   what was resolved it computes argv, environment and fd layout (sockets at
   3, 4, ... in declaration order, ``LISTEN_FDS`` / ``LISTEN_FDNAMES``,
   ``{fd:NAME}`` and ``{instance}`` substituted): a whole :class:`SpawnPlan`.
3. exec (:func:`start_worker`): one step that starts the plan and closes
   its output fds; the worker's exit is learnt from SIGCHLD (reaper.py), so
   no fd is kept per worker.

Neither ``subprocess`` nor ``os.posix_spawn`` fits the exec: ``LISTEN_PID`` (and
``WATCHDOG_PID``) must hold the worker's own pid, which is known only in the
child, between fork and ``execve()`` (systemd sets it there too, in
``build_environment()``), and the passed fds must be renumbered to 3, 4, ...
Two implementations do the same steps in the child (own session and so own
process group, default signals, own cgroup, fds in place, working directory,
credentials, stdout and stderr, pid variables, exec):

- ``fdsupervisor._spawn``, a C extension: ``clone(CLONE_VM | CLONE_VFORK)``
  as glibc's ``posix_spawn()`` does, no copy of the supervisor's memory and
  no Python in the child; an exec failure reaches the parent through the
  memory they share. Used whenever it was built, for every unit. On x86-64
  a worker with a cgroup is created in it (``clone3(CLONE_INTO_CGROUP)``),
  so it never migrates (a migration may wait ~10 ms for the kernel after an
  idle spell, docs/performance.md); elsewhere, or with
  ``FDSUPERVISOR_SPAWN=migrate``, the child joins by writing ``cgroup.procs``.
- the pure-Python fallback: ``os.fork()``, the steps in Python, an exec
  failure reported through a close-on-exec pipe as CPython's
  ``_posixsubprocess`` does. Used where no C compiler was at install time,
  or where the supervisor's environment says ``FDSUPERVISOR_SPAWN=fork``
  (docs/workers.md): the tests of the child's work run both paths.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import os
import pwd
import resource
import shutil
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from systemd import journal

from .errors import ConfigError, ConfigErrors, Location, SpawnError
from .fdpassing import LISTEN_FDS_START, scrub_environment
from .fdstore import FdStore, service_owner, unit_owner
from .spawn_slots import SpawnSlots
from .units import (
    LIMIT_UNITS,
    RLIM_INFINITY,
    ResourceLimit,
    Unit,
    expand_placeholders,
    load_units,
)

try:
    from . import _spawn as _native
except ImportError:  # built without a C compiler: the os.fork() path
    _native = None  # type: ignore[assignment]

SPAWN_PATH_ENV: Final = "FDSUPERVISOR_SPAWN"
"""The supervisor's own switch of spawn path: ``native`` (the default), ``migrate`` or ``fork``.

``migrate`` is the native spawn with the child joining its cgroup by a write to
``cgroup.procs`` (what kernels without ``clone3(CLONE_INTO_CGROUP)`` get), to
test and compare that path where the kernel has the better one.

Read from the supervisor's environment as it was at start (the copy the
supervisor keeps), never from a unit's ``environment:``. ``native`` where the
extension was not built is the fork path, as without the variable.
"""
SPAWN_PATHS: Final = ("native", "migrate", "fork")

# Signals the supervisor catches or ignores; a worker starts with them at
# their defaults, as a fresh process from a shell would.
RESET_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGCHLD,
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGALRM,
)


@dataclass(frozen=True, slots=True)
class PassedFd:
    """One fd handed to a worker: its FD name and its number in the supervisor."""

    name: str
    fd: int


@dataclass(frozen=True, slots=True)
class OutputFile:
    """A ``file:`` or ``append:`` target of stdout or stderr, opened by the child.

    The child opens it after the switch to the worker's user and groups, so
    that the kernel checks the worker's own right to the path (and to what a
    symbolic link there points to): a worker writes only what its user could
    write (docs/security.md, "A worker's output files").
    """

    path: bytes
    append: bool  # O_APPEND (append:), else written from the start (file:)

    @property
    def flags(self) -> int:
        return os.O_WRONLY | os.O_CREAT | os.O_NOCTTY | (os.O_APPEND if self.append else 0)


OUTPUT_FILE_MODE = 0o644  # then less the umask, for a file the worker creates


def output_file(target: str) -> OutputFile | None:
    """The file of a unit's ``stdout:`` / ``stderr:`` value, if it names one."""
    kind, _, path = target.partition(":")
    if kind not in ("file", "append") or not path:
        return None
    return OutputFile(os.fsencode(path), kind == "append")


@dataclass(frozen=True, slots=True)
class Account:
    """A worker's ``user:`` and ``group:``, resolved: ids for the child, names for its environment.

    None for an id keeps the supervisor's own.
    """

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    user_name: str | None = None  # USER, LOGNAME: the name the unit gave (as systemd keeps it)
    home: str | None = None  # HOME


SUPERVISORS_ACCOUNT: Final = Account()


@dataclass(frozen=True, slots=True)
class Resolved:
    """What a plan needs from outside its unit, found before the plan is made.

    Made by :func:`resolve_worker`; the plan made with it owns its output fds.
    """

    executable: str  # the program, found in the worker's PATH
    account: Account = SUPERVISORS_ACCOUNT
    stdout_fd: int | None = None  # the unit's stdout: / stderr: null or journal
    stderr_fd: int | None = None
    fork: bool = False  # FDSUPERVISOR_SPAWN=fork
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard), -1 infinity
    migrate: bool = False  # FDSUPERVISOR_SPAWN=migrate


@dataclass(frozen=True, slots=True)
class SpawnPlan:
    """Everything the exec step does for one worker, decided before it starts.

    A plan from :func:`prepare_worker` owns its ``stdout_fd`` and ``stderr_fd``:
    it is started once, with :func:`start_worker`, which closes them (or
    :meth:`close` for a plan that is never started).
    """

    executable: str
    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]  # the *_PID variables are added in the child
    fds: tuple[int, ...]  # supervisor fds, placed at 3, 4, ... in this order
    working_directory: str | None
    uid: int | None
    gid: int | None
    groups: tuple[int, ...] | None
    stdio_fd: int | None = None  # inetd: also stdin and stdout
    stdout_fd: int | None = None  # the unit's stdout: / stderr: null or journal, when given
    stderr_fd: int | None = None
    stdout_file: OutputFile | None = None  # the unit's stdout: / stderr: file: or append:
    stderr_file: OutputFile | None = None
    cgroup_fd: int | None = None  # the worker's cgroup (its directory): the child starts in it
    # Variables that must hold the worker's own pid, known only after fork():
    # LISTEN_PID always, WATCHDOG_PID with a watchdog (as systemd sets both).
    pid_variables: tuple[str, ...] = ("LISTEN_PID",)
    fork: bool = False  # the os.fork() path even where the C extension is built
    migrate: bool = False  # native, but into the cgroup by a write to cgroup.procs
    # Hardening (SPEC section 10), in the order the child applies it: the
    # umask first (the output files are created with it), the rlimits while
    # still root (raising a hard limit needs CAP_SYS_RESOURCE), the groups
    # before setresgid()/setresuid(), PR_SET_NO_NEW_PRIVS last before execve().
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard); -1: infinity
    umask: int | None = None  # None: the supervisor's own
    no_new_privileges: bool = False

    def close(self) -> None:
        """Close the output fds this plan holds: for a plan that will not be started."""
        _close_outputs(self)


# --------------------------------------------------------------------------- fds


def worker_fds(store: FdStore, unit: Unit) -> list[PassedFd]:
    """The fds a worker of ``unit`` gets, in SPEC 4's order.

    The unit's declared sockets in declaration order, then the sockets added
    to it at run time (``socket-add``), then the fds its workers stored
    (``FDSTORE=1``). Accept mode passes the connection instead.
    """
    sockets = {entry.name: entry for entry in store.owned_by(unit_owner(unit.name))}
    ordered = [sockets.pop(name) for name in unit.socket_names if name in sockets]
    ordered += sockets.values()
    ordered += store.owned_by(service_owner(unit.name))
    return [PassedFd(entry.name, entry.fd) for entry in ordered]


def worker_fd_numbers(names: Sequence[str]) -> dict[str, int]:
    """FD name → the number the worker sees it at."""
    numbers: dict[str, int] = {}
    for i, name in enumerate(names):
        numbers.setdefault(name, LISTEN_FDS_START + i)  # of several fds of one name: the first
    return numbers


# --------------------------------------------------------------------------- resolve


def prepare_worker(
    unit: Unit,
    passed: Sequence[PassedFd],
    instance: int,
    environ: Mapping[str, str],
    *,
    notify_socket: str | None,
    extra_env: Mapping[str, str] | None = None,
    stdio_fd: int | None = None,
    cgroup_fd: int | None = None,
    default_limits: Sequence[tuple[int, int, int]] = (),
    log: Any = None,
) -> SpawnPlan:
    """The whole spawn plan of one worker: resolved first, then planned.

    ``environ`` is the supervisor's environment (as it was at start);
    ``extra_env`` adds variables of this worker's own (accept mode's
    ``REMOTE_ADDR``); ``stdio_fd`` is inetd's connection; ``cgroup_fd`` the
    worker's cgroup, which the child joins first; ``default_limits`` the
    limits a worker gets unless its unit sets them (:func:`worker_default_limits`). ``log`` warns when the
    journal is not there (the worker then writes to the supervisor's own
    output). Raises :class:`SpawnError` for an unknown user or group, a
    program that cannot be found or executed, or a bad ``FDSUPERVISOR_SPAWN``;
    ``OSError`` when an output cannot be opened (out of fds: may pass). On a
    raise nothing is left open.
    """
    resolved = resolve_worker(
        unit, passed, instance, environ, extra_env=extra_env, default_limits=default_limits, log=log
    )
    try:
        return plan_worker(
            unit,
            passed,
            instance,
            environ,
            extra_env=extra_env,
            stdio_fd=stdio_fd,
            notify_socket=notify_socket,
            resolved=resolved,
            cgroup_fd=cgroup_fd,
        )
    except BaseException:
        _close_outputs(resolved)
        raise


def resolve_worker(
    unit: Unit,
    passed: Sequence[PassedFd],
    instance: int,
    environ: Mapping[str, str],
    *,
    extra_env: Mapping[str, str] | None = None,
    default_limits: Sequence[tuple[int, int, int]] = (),
    log: Any = None,
) -> Resolved:
    """Everything a worker's plan needs from the system; SpawnError for a bad user or program.

    The output fds are opened last, so that a failure before leaves nothing
    to close.
    """
    service = unit.service
    account = resolve_account(service.user, service.group, service.supplementary_groups)
    rlimits = resolve_limits(service.limits, default_limits)
    path = requested_spawn_path(environ)
    program = worker_argv(unit, passed, instance)[0]
    search_path = ""
    if "/" not in program:
        # Looked up in the worker's own PATH, which its unit may set, as a
        # shell looks a command up in the environment it was given.
        environment, _ = worker_environment(
            unit, passed, instance, environ, account=account, extra_env=extra_env
        )
        search_path = environment.get("PATH", os.defpath)
    executable = resolve_executable(program, search_path, service.working_directory)
    stdout_fd = open_output(unit, service.stdout, log)
    try:
        stderr_fd = open_output(unit, service.stderr, log)
    except BaseException:
        if stdout_fd is not None:
            os.close(stdout_fd)
        raise
    return Resolved(
        executable,
        account,
        stdout_fd,
        stderr_fd,
        fork=path == "fork",
        rlimits=rlimits,
        migrate=path == "migrate",
    )


def requested_spawn_path(environ: Mapping[str, str]) -> str:
    """The spawn path the supervisor's environment asks for (``FDSUPERVISOR_SPAWN``)."""
    value = environ.get(SPAWN_PATH_ENV) or "native"
    if value not in SPAWN_PATHS:
        raise SpawnError(
            f"{SPAWN_PATH_ENV}={value!r} in the supervisor's environment: "
            f"expected {', '.join(SPAWN_PATHS[:-1])} or {SPAWN_PATHS[-1]}"
        )
    return value


def resolve_account(
    user: str | None, group: str | None, supplementary_groups: Sequence[str] | None = None
) -> Account:
    """``user:``, ``group:`` and ``supplementary-groups:`` (names or numbers) → ids.

    From the user and group databases. Without ``supplementary-groups:`` the
    user's own groups (``getgrouplist()``, what ``initgroups()`` sets) are the
    worker's supplementary groups, never the supervisor's; ``group:`` replaces
    the primary group. ``supplementary-groups:`` (SPEC section 10) replaces
    the list, with or without a user. Raises :class:`SpawnError` naming the
    unknown entry.
    """
    account = SUPERVISORS_ACCOUNT
    if user is not None:
        entry = lookup_user(user)
        account = Account(
            entry.pw_uid,
            entry.pw_gid,
            tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)),
            entry.pw_name,
            entry.pw_dir,
        )
    if group is not None:
        gid = lookup_group(group)
        groups = account.groups if account.groups is not None else (gid,)
        account = Account(account.uid, gid, groups, account.user_name, account.home)
    if supplementary_groups is not None:
        listed = tuple(dict.fromkeys(lookup_group(name) for name in supplementary_groups))
        account = Account(account.uid, account.gid, listed, account.user_name, account.home)
    return account


def load_units_resolved(paths: Sequence[Path], known: Iterable[Unit] = ()) -> list[Unit]:
    """:func:`load_units`, then every user and group looked up: one unknown means none load.

    ``check`` and ``run`` refuse a unit whose ``user:`` (or group) is not on
    this host, with the unit file's FILE:LINE:COL, instead of passing it and
    failing at its start. ``known``: a reload's running units (:func:`load_units`);
    their users and groups are looked up again, the host may have changed.
    """
    units = load_units(paths, known)
    errors = [error for unit in units for error in (*account_errors(unit), *limit_errors(unit))]
    if errors:
        raise ConfigErrors(errors)
    return units


NR_OPEN_PATH = Path("/proc/sys/fs/nr_open")


def limit_errors(unit: Unit, nr_open_path: Path = NR_OPEN_PATH) -> list[ConfigError]:
    """The unit's ``limits:`` that this host's kernel refuses to set, as unit-file errors.

    A ``nofile`` above ``fs.nr_open`` (or ``infinity``) is refused by
    ``setrlimit()`` with EPERM even to root (the kernel's ``do_prlimit()``):
    known at check time, not only when the worker starts. systemd instead
    lowers ``LimitNOFILE=infinity`` to the closest value it can set
    (``setrlimit_closest()``); a unit file here says what it gets or fails.
    """
    found: list[ConfigError] = []
    for limit in unit.service.limits:
        if limit.name != "nofile":
            continue
        try:
            nr_open = int(nr_open_path.read_text())
        except (OSError, ValueError):
            return found  # no /proc: the start says it, if it fails
        over = [v for v in (limit.soft, limit.hard) if v == RLIM_INFINITY or v > nr_open]
        if over:
            value = "infinity" if over[-1] == RLIM_INFINITY else str(over[-1])
            found.append(
                ConfigError(
                    limit.location or Location(str(unit.source)),
                    ("service", "limits", "nofile"),
                    f"{value} is above this host's fs.nr_open ({nr_open}): the kernel refuses "
                    f"a higher nofile limit, even to root; give at most {nr_open}, or raise "
                    "fs.nr_open (sysctl)",
                )
            )
    return found


def account_errors(unit: Unit) -> list[ConfigError]:
    """The unit's users and groups that are not in the databases here, as unit-file errors.

    For ``fdsupervisor check`` and the load at start: an unknown ``user:``
    would otherwise pass the check and fail only when the worker starts (the
    socket's ``user:`` / ``group:``, when it is bound). Names and numbers of
    ``service.user``, ``service.group`` and ``service.supplementary-groups``
    must be in the user and group databases, as ``resolve_account`` looks
    them up; a socket file's owner is looked up only by name (a number is
    taken as it is, see binding.py).
    """
    service = unit.service
    found: list[ConfigError] = []

    def problem(key: str, lookup: Callable[[str], object], value: str) -> None:
        try:
            lookup(value)
        except SpawnError as exc:
            where = service.account_location(key) or Location(str(unit.source))
            found.append(ConfigError(where, ("service", *key.split(".")), str(exc)))

    if service.user is not None:
        problem("user", lookup_user, service.user)
    if service.group is not None:
        problem("group", lookup_group, service.group)
    for index, name in enumerate(service.supplementary_groups or ()):
        problem(f"supplementary-groups.{index}", lookup_group, name)
    for spec in unit.sockets:
        for key, value, lookup in (
            ("user", spec.user, lookup_user),
            ("group", spec.group, lookup_group),
        ):
            if value is None or value.isdecimal():
                continue
            try:
                lookup(value)
            except SpawnError as exc:
                where = spec.location or Location(str(unit.source))
                message = f"{exc} (the owner of the socket file)"
                found.append(ConfigError(where, ("sockets", spec.name, key), message))
    return found


def lookup_user(user: str) -> pwd.struct_passwd:
    """A ``user:`` value (a name, or a number) in the user database; SpawnError if unknown."""
    try:
        return pwd.getpwuid(int(user)) if user.isdecimal() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise SpawnError(f"unknown user {user!r}: not in the user database") from None


def lookup_group(group: str) -> int:
    """A group name or number → its gid, from the group database; SpawnError if unknown."""
    try:
        return grp.getgrgid(int(group)).gr_gid if group.isdecimal() else grp.getgrnam(group).gr_gid
    except (KeyError, OverflowError):
        raise SpawnError(f"unknown group {group!r}: not in the group database") from None


# Python's resource module has no RLIMIT_LOCKS; it is 10 on every Linux
# architecture (asm-generic/resource.h, and the mips, sparc, alpha headers).
_RLIMIT_LOCKS: Final = 10


def rlimit_number(name: str) -> int:
    """The ``RLIMIT_*`` number of a ``limits:`` key (``nofile`` → ``RLIMIT_NOFILE``)."""
    return int(getattr(resource, f"RLIMIT_{name.upper()}", _RLIMIT_LOCKS))


RLIMIT_NAMES: Final = {rlimit_number(name): name for name in LIMIT_UNITS}
"""``RLIMIT_*`` → the ``limits:`` key that names it, for the failed stage of a start."""


def resolve_limits(
    limits: Sequence[ResourceLimit], defaults: Sequence[tuple[int, int, int]] = ()
) -> tuple[tuple[int, int, int], ...]:
    """``limits:`` → (``RLIMIT_*``, soft, hard) for ``setrlimit()``; -1 is RLIM_INFINITY.

    ``defaults`` (:func:`worker_default_limits`) follow for each resource the
    unit does not set, as systemd's ``DefaultLimit*=`` apply unless a unit
    says ``Limit*=``.
    """
    resolved = tuple((rlimit_number(limit.name), limit.soft, limit.hard) for limit in limits)
    given = {number for number, _soft, _hard in resolved}
    return resolved + tuple(limit for limit in defaults if limit[0] not in given)


def worker_default_limits(nofile_soft: int | None) -> tuple[tuple[int, int, int], ...]:
    """What a worker gets unless its unit sets the limit: the soft ``RLIMIT_NOFILE`` the
    supervisor was started with (``nofile_soft``; None: unknown), under its hard limit.

    The supervisor raises its own soft limit to the hard one (cli.py), and
    workers would inherit that; systemd passes the original soft limit to
    its services instead (``DefaultLimitNOFILE=1024:524288``: ``select()``
    cannot watch an fd above 1023, systemd.exec(5) "LimitNOFILE="), and a
    program that can use more raises its own. Nothing to set when the soft
    limit was not raised.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if nofile_soft is None or nofile_soft == soft or nofile_soft < 0:
        return ()
    if hard != resource.RLIM_INFINITY and nofile_soft > hard:
        return ()  # lowered since (by hand, with prlimit): a soft limit must fit the hard one
    return (
        (
            resource.RLIMIT_NOFILE,
            nofile_soft,
            RLIM_INFINITY if hard == resource.RLIM_INFINITY else hard,
        ),
    )


def resolve_executable(program: str, search_path: str, cwd: str | None) -> str:
    """The file to exec for ``program``: itself when it holds a ``/``, else from ``search_path``.

    A relative path with a ``/`` is taken from ``cwd``, the worker's working directory.
    """
    if "/" in program:
        path = program if os.path.isabs(program) or cwd is None else os.path.join(cwd, program)
        if not os.access(path, os.X_OK):
            raise SpawnError(f"cannot execute {program!r}: not an executable file")
        return path
    found = shutil.which(program, path=search_path)
    if found is None:
        raise SpawnError(f"cannot execute {program!r}: not found in PATH={search_path}")
    return found


def open_output(unit: Unit, target: str, log: Any = None) -> int | None:
    """An fd for a worker's stdout or stderr: ``null`` or ``journal`` (None: not ours to open).

    ``file:`` and ``append:`` are not opened here, as root, but by the child
    after it became the worker's user (:class:`OutputFile`): a worker could
    otherwise point its file at any file of root's with a symlink. Where no
    journald runs, ``journal`` is the supervisor's own output, with a warning.
    """
    if target == "inherit" or target.startswith(("file:", "append:")):
        return None
    if target == "journal":
        try:
            stream = journal.stream(unit.name)
        except OSError as exc:  # no journald here: the supervisor's own output instead
            if log is not None:
                log.warning("journal_unavailable", unit=unit.name, error=str(exc))
            return None
        try:
            return os.dup(stream.fileno())
        finally:
            stream.close()
    return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)


def _close_outputs(holder: Resolved | SpawnPlan) -> None:
    for fd in (holder.stdout_fd, holder.stderr_fd):
        if fd is not None:
            os.close(fd)


# --------------------------------------------------------------------------- plan


def base_environment(environ: Mapping[str, str], clear: bool) -> dict[str, str]:
    """What a worker inherits of the supervisor's environment: all but its protocol variables."""
    if clear:
        return {}
    return scrub_environment(environ)


def worker_argv(unit: Unit, passed: Sequence[PassedFd], instance: int) -> tuple[str, ...]:
    """The unit's ``exec:``, with ``{fd:NAME}`` and ``{instance}`` substituted. Pure."""
    numbers = worker_fd_numbers([p.name for p in passed])
    return tuple(expand_placeholders(arg, numbers, instance) for arg in unit.service.exec)


def worker_environment(
    unit: Unit,
    passed: Sequence[PassedFd],
    instance: int,
    environ: Mapping[str, str],
    *,
    account: Account = SUPERVISORS_ACCOUNT,
    extra_env: Mapping[str, str] | None = None,
    notify_socket: str | None = None,
) -> tuple[dict[str, str], tuple[str, ...]]:
    """A worker's environment, and the variables the child sets to its own pid. Pure.

    The supervisor's environment less its protocol variables (or nothing,
    with ``clear-environment``), the unit's ``environment:``, ``extra_env``,
    then ``LISTEN_FDS`` / ``LISTEN_FDNAMES``. With ``notify_socket``, the worker
    gets ``NOTIFY_SOCKET`` pointing at the supervisor, and with a watchdog
    ``WATCHDOG_USEC`` and ``WATCHDOG_PID``. With a ``user:``, ``USER``,
    ``LOGNAME`` and ``HOME`` are the user's (not in a cleared environment).
    """
    service = unit.service
    numbers = worker_fd_numbers([p.name for p in passed])
    env = base_environment(environ, service.clear_environment)
    for key, value in service.environment:
        env[key] = expand_placeholders(value, numbers, instance)
    if extra_env:
        env.update(extra_env)
    pid_variables: tuple[str, ...] = ()
    if passed:  # as systemd's exec_context: LISTEN_* only when at least one fd is passed
        env["LISTEN_FDS"] = str(len(passed))
        env["LISTEN_FDNAMES"] = ":".join(p.name for p in passed)
        pid_variables = ("LISTEN_PID",)
    if notify_socket is not None:
        env["NOTIFY_SOCKET"] = notify_socket
        if service.watchdog and service.watchdog != float("inf"):
            env["WATCHDOG_USEC"] = str(round(service.watchdog * 1_000_000))
            pid_variables += ("WATCHDOG_PID",)
    if account.user_name is not None and not service.clear_environment:
        env.update(USER=account.user_name, LOGNAME=account.user_name, HOME=account.home or "")
    return env, pid_variables


def plan_worker(
    unit: Unit,
    passed: Sequence[PassedFd],
    instance: int,
    environ: Mapping[str, str],
    extra_env: Mapping[str, str] | None = None,
    stdio_fd: int | None = None,
    notify_socket: str | None = None,
    *,
    resolved: Resolved,
    cgroup_fd: int | None = None,
) -> SpawnPlan:
    """The whole spawn plan of one worker, from its unit and what was resolved for it. Pure.

    :func:`worker_environment` says what the environment holds; the fds go
    to 3, 4, ... in the order of ``passed``; ``file:`` / ``append:`` outputs
    travel as paths. The plan owns ``resolved``'s output fds.
    """
    service = unit.service
    account = resolved.account
    env, pid_variables = worker_environment(
        unit,
        passed,
        instance,
        environ,
        account=account,
        extra_env=extra_env,
        notify_socket=notify_socket,
    )
    return SpawnPlan(
        executable=resolved.executable,
        argv=worker_argv(unit, passed, instance),
        environment=tuple(env.items()),
        fds=tuple(p.fd for p in passed),
        working_directory=service.working_directory,
        uid=account.uid,
        gid=account.gid,
        groups=account.groups,
        stdio_fd=stdio_fd,
        stdout_fd=resolved.stdout_fd,
        stderr_fd=resolved.stderr_fd,
        stdout_file=output_file(service.stdout),
        stderr_file=output_file(service.stderr),
        cgroup_fd=cgroup_fd,
        pid_variables=pid_variables,
        fork=resolved.fork,
        migrate=resolved.migrate,
        rlimits=resolved.rlimits,
        umask=service.umask,
        no_new_privileges=service.no_new_privileges,
    )


# --------------------------------------------------------------------------- exec


def start_worker(plan: SpawnPlan, slots: SpawnSlots | None = None) -> int:
    """Start ``plan``: the worker's pid, once its exec has succeeded.

    The plan's output fds are closed whatever happens (the worker has its
    own copies). Raises :class:`SpawnError` as :func:`spawn` does. No pidfd
    is opened: the worker is our child, reaped on SIGCHLD (reaper.py), and
    its pid cannot be reused before that.
    """
    try:
        return spawn(plan, slots)
    finally:
        plan.close()


def spawn(plan: SpawnPlan, slots: SpawnSlots | None = None) -> int:
    """Start ``plan``; returns the pid once the exec has succeeded.

    With ``slots`` the native spawn copies no fd table (spawn_slots.py).
    Raises :class:`SpawnError` when the child failed before or at the exec
    (the message names the step and the reason); the child is reaped then.
    """
    if _native is not None and not plan.fork:
        return _spawn_native(plan, slots)
    return _spawn_python(plan)


def native_spawn_available() -> bool:
    """Whether the C extension was built, so that :func:`spawn` can avoid ``os.fork()``."""
    return _native is not None


def _spawn_native(plan: SpawnPlan, slots: SpawnSlots | None = None) -> int:
    """:func:`spawn` with ``clone(CLONE_VM | CLONE_VFORK)`` in ``fdsupervisor._spawn``.

    A worker with a cgroup is made in it with ``clone3(CLONE_INTO_CGROUP)``
    where the kernel can (x86-64, Linux 5.7), unless ``plan.migrate``.
    """
    if _native is None:
        raise SpawnError("the native spawn (fdsupervisor._spawn) was not built")
    pid_variables = plan.pid_variables
    try:
        return _native.spawn(
            os.fsencode(plan.executable),
            [os.fsencode(arg) for arg in plan.argv],
            [
                os.fsencode(f"{key}={value}")
                for key, value in plan.environment
                if key not in pid_variables
            ],
            plan.fds,
            -1 if plan.stdio_fd is None else plan.stdio_fd,
            None if plan.working_directory is None else os.fsencode(plan.working_directory),
            -1 if plan.uid is None else plan.uid,
            -1 if plan.gid is None else plan.gid,
            plan.groups,
            [os.fsencode(name) for name in pid_variables],
            RESET_SIGNALS,
            -1 if plan.stdout_fd is None else plan.stdout_fd,
            -1 if plan.stderr_fd is None else plan.stderr_fd,
            None if plan.stdout_file is None else plan.stdout_file.path,
            plan.stdout_file is not None and plan.stdout_file.append,
            None if plan.stderr_file is None else plan.stderr_file.path,
            plan.stderr_file is not None and plan.stderr_file.append,
            -1 if plan.cgroup_fd is None else plan.cgroup_fd,
            plan.rlimits,
            -1 if plan.umask is None else plan.umask,
            plan.no_new_privileges,
            plan.migrate,
            -1 if slots is None else slots.anchor,
            () if slots is None else slots.numbers,
        )
    except OSError as exc:  # "STAGE: reason", or from clone() itself
        raise SpawnError(f"cannot start {plan.argv[0]!r}: {exc.strerror}", exc.errno) from None
    except ValueError as exc:  # a NUL byte: os.execve() would refuse it too
        raise SpawnError(f"cannot start {plan.argv[0]!r}: {exc}") from None


def _spawn_python(plan: SpawnPlan) -> int:
    """:func:`spawn` with ``os.fork()`` and Python in the child, the fallback."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except BaseException:
        os.close(read_end)
        os.close(write_end)
        raise
    if pid == 0:  # pragma: no cover - runs in the child, which never returns
        os.close(read_end)
        _exec_child(plan, write_end)
    os.close(write_end)
    try:
        # Until the exec (which closes the pipe) or a failure report, so the
        # child's setsid() has happened when we return: a stop signal sent to
        # its group at once cannot miss it. No setpgid() from here, as job-control
        # shells do to close that race: it would make the child a group leader,
        # and a group leader's setsid() fails with EPERM.
        report = _read_all(read_end)
    finally:
        os.close(read_end)
    if report:
        os.waitpid(pid, 0)
        stage, _, code = report.decode("ascii", "replace").partition(":")
        reason = os.strerror(int(code)) if code.isdecimal() else code
        number = int(code) if code.isdecimal() else None
        raise SpawnError(f"cannot start {plan.argv[0]!r}: {stage}: {reason}", number)
    return pid


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 256)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _exec_child(plan: SpawnPlan, report_fd: int) -> None:  # pragma: no cover - child
    stage = "setsid"
    try:
        # A session of its own, as systemd starts every service (exec_child() in
        # execute.c, exec-invoke.c since v255, calls setsid(); EXIT_SETSID if it
        # fails): its own process group too, and no other worker's
        # setpgid() can join it, since setpgid() only joins groups of the
        # caller's own session. Attribution of notify messages by group relies on it.
        os.setsid()
        stage = "prepare"
        signal.set_wakeup_fd(-1)
        for signum in RESET_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if plan.cgroup_fd is not None:
            # before anything the worker could fork from, and while still root;
            # a migration, as os.fork() cannot create the child in its cgroup
            # (clone3(CLONE_INTO_CGROUP) would bypass CPython's fork handlers)
            stage = "cgroup"
            procs = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=plan.cgroup_fd)
            os.write(procs, b"0")
            os.close(procs)
        stage = "fds"
        _place_fds(plan.fds, plan.stdio_fd, report_fd, plan.stdout_fd, plan.stderr_fd)
        if plan.umask is not None:
            os.umask(plan.umask)
        for limit, soft, hard in plan.rlimits:
            # while still root: raising a hard limit needs CAP_SYS_RESOURCE
            stage = f"limits.{RLIMIT_NAMES.get(limit, limit)}"
            try:
                resource.setrlimit(limit, (_rlim(soft), _rlim(hard)))
            except ValueError:  # CPython's word for EPERM here: "not allowed to raise"
                raise OSError(errno.EPERM, "setrlimit") from None
        if plan.working_directory is not None:
            stage = "chdir"
            os.chdir(plan.working_directory)
        if plan.groups is not None:
            stage = "setgroups"
            os.setgroups(list(plan.groups))
        if plan.gid is not None:
            stage = "setgid"
            os.setresgid(plan.gid, plan.gid, plan.gid)
        if plan.uid is not None:
            stage = "setuid"
            os.setresuid(plan.uid, plan.uid, plan.uid)
        if plan.stdout_file is not None:
            stage = "stdout"
            _open_output(plan.stdout_file, 1)
        if plan.stderr_file is not None:
            stage = "stderr"
            if plan.stderr_file == plan.stdout_file:
                # one open file for both, as systemd's can_inherit_stderr_from_stdout():
                # two would each write from their own offset, over each other
                os.dup2(1, 2)
            else:
                _open_output(plan.stderr_file, 2)
        if plan.no_new_privileges:
            # last before the exec: nothing before needs a set-uid program
            stage = "no-new-privileges"
            _set_no_new_privileges()
        env = dict(plan.environment)
        own_pid = str(os.getpid())
        for name in plan.pid_variables:
            env[name] = own_pid
        stage = "exec"
        os.execve(plan.executable, plan.argv, env)
    except OSError as exc:
        _report(report_fd, stage, exc.errno or errno.EIO)
    except BaseException:
        _report(report_fd, stage, errno.EIO)
    finally:
        os._exit(127)


def _rlim(value: int) -> int:
    return resource.RLIM_INFINITY if value == RLIM_INFINITY else value


PR_SET_NO_NEW_PRIVS: Final = 38  # <linux/prctl.h>


def _set_no_new_privileges() -> None:  # pragma: no cover - child
    """``prctl(PR_SET_NO_NEW_PRIVS, 1)``: execve() grants no privileges from then on."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _place_fds(
    fds: tuple[int, ...],
    stdio_fd: int | None,
    report_fd: int,
    stdout_fd: int | None = None,
    stderr_fd: int | None = None,
) -> None:  # pragma: no cover
    """Put ``fds`` at 3, 4, ...; close every other fd but 0-2 and the report pipe.

    The sources may sit where targets go (fd 3 may be the second socket),
    so each is first duplicated above the whole target range, then moved.
    """
    import fcntl

    top = LISTEN_FDS_START + len(fds)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top) for fd in fds]
    if report_fd < top:
        report_fd_new = fcntl.fcntl(report_fd, fcntl.F_DUPFD_CLOEXEC, top)
        os.close(report_fd)
        report_fd = report_fd_new
    if stdio_fd is not None:
        os.dup2(stdio_fd, 0)
        os.dup2(stdio_fd, 1)
    if stdout_fd is not None:
        os.dup2(stdout_fd, 1)
    if stderr_fd is not None:
        os.dup2(stderr_fd, 2)
    for index, fd in enumerate(moved):
        os.dup2(fd, LISTEN_FDS_START + index)  # inheritable: the one place we want that
    os.closerange(top, report_fd)
    os.closerange(report_fd + 1, os.sysconf("SC_OPEN_MAX"))


def _open_output(output: OutputFile, target: int) -> None:  # pragma: no cover - child
    """Open ``output`` at fd ``target``, with the child's (the worker's) credentials."""
    fd = os.open(output.path, output.flags, OUTPUT_FILE_MODE)
    if fd == target:
        os.set_inheritable(fd, True)
    else:
        os.dup2(fd, target)
        os.close(fd)


def _report(fd: int, stage: str, code: int) -> None:  # pragma: no cover - child
    try:
        os.write(fd, f"{stage}:{code}".encode("ascii"))
    except OSError:
        pass
