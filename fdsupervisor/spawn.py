"""The spawn plan and the exec itself.

Fifth step of the flow. :func:`plan_worker` is pure: from a unit, the fds
its worker gets and the supervisor's environment it computes the argv, the
environment and the fd layout (sockets at 3, 4, ... in declaration order,
``LISTEN_FDS`` / ``LISTEN_FDNAMES``, ``{fd:NAME}`` and ``{instance}``
substituted). :func:`spawn` starts a process that execs that plan.

Neither ``subprocess`` nor ``os.posix_spawn`` fits: ``LISTEN_PID`` (and
``WATCHDOG_PID``) must hold the worker's own pid, which is known only in the
child, between fork and ``execve()`` (systemd sets it there too, in
``build_environment()``), and the passed fds must be renumbered to 3, 4, ...
Two implementations do the same steps in the child (own session and so own
process group, default signals, own cgroup, fds in place, working directory,
credentials, stdout and stderr files, pid variables, exec):

- ``fdsupervisor._spawn``, a C extension: ``clone(CLONE_VM | CLONE_VFORK)``
  as glibc's ``posix_spawn()`` does, no copy of the supervisor's memory and
  no Python in the child; an exec failure reaches the parent through the
  memory they share. Used whenever it was built.
- the pure-Python fallback: ``os.fork()``, the steps in Python, an exec
  failure reported through a close-on-exec pipe as CPython's
  ``_posixsubprocess`` does. Used where no C compiler was at install time.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import SpawnError
from .units import Unit, expand_placeholders

try:
    from . import _spawn as _native
except ImportError:  # built without a C compiler: the os.fork() path
    _native = None  # type: ignore[assignment]

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START

# The supervisor's own protocol variables never reach a worker: they
# describe the supervisor's parent, not the worker's (systemd unsets them
# in sd_listen_fds(unset_environment=1) for the same reason).
SUPERVISOR_ONLY_ENV = (
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)

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
class SpawnPlan:
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


def worker_fd_numbers(names: Sequence[str]) -> dict[str, int]:
    """FD name → the number the worker sees it at."""
    return {name: LISTEN_FDS_START + i for i, name in enumerate(names)}


def base_environment(environ: Mapping[str, str], clear: bool) -> dict[str, str]:
    if clear:
        return {}
    return {k: v for k, v in environ.items() if k not in SUPERVISOR_ONLY_ENV}


def plan_worker(
    unit: Unit,
    passed: Sequence[PassedFd],
    instance: int,
    environ: Mapping[str, str],
    extra_env: Mapping[str, str] | None = None,
    stdio_fd: int | None = None,
    notify_socket: str | None = None,
) -> SpawnPlan:
    """The whole spawn plan of one worker; raises SpawnError for a bad user or program.

    With ``notify_socket``, the worker gets ``NOTIFY_SOCKET`` pointing at the
    supervisor, and with a watchdog ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.
    """
    service = unit.service
    numbers = worker_fd_numbers([p.name for p in passed])
    argv = tuple(expand_placeholders(arg, numbers, instance) for arg in service.exec)
    env = base_environment(environ, service.clear_environment)
    for key, value in service.environment:
        env[key] = expand_placeholders(value, numbers, instance)
    if extra_env:
        env.update(extra_env)
    env["LISTEN_FDS"] = str(len(passed))
    env["LISTEN_FDNAMES"] = ":".join(p.name for p in passed)
    pid_variables: tuple[str, ...] = ("LISTEN_PID",)
    if notify_socket is not None:
        env["NOTIFY_SOCKET"] = notify_socket
        if service.watchdog and service.watchdog != float("inf"):
            env["WATCHDOG_USEC"] = str(round(service.watchdog * 1_000_000))
            pid_variables += ("WATCHDOG_PID",)
    uid, gid, groups = _resolve_credentials(service.user, service.group)
    if service.user is not None and not service.clear_environment:
        entry = pwd.getpwuid(uid) if uid is not None else None
        if entry is not None:
            env.update(USER=entry.pw_name, LOGNAME=entry.pw_name, HOME=entry.pw_dir)
    executable = _resolve_executable(
        argv[0], env.get("PATH", os.defpath), service.working_directory
    )
    return SpawnPlan(
        executable=executable,
        argv=argv,
        environment=tuple(env.items()),
        fds=tuple(p.fd for p in passed),
        working_directory=service.working_directory,
        uid=uid,
        gid=gid,
        groups=groups,
        stdio_fd=stdio_fd,
        stdout_file=output_file(service.stdout),
        stderr_file=output_file(service.stderr),
        pid_variables=pid_variables,
    )


def _resolve_executable(program: str, search_path: str, cwd: str | None) -> str:
    if "/" in program:
        path = program if os.path.isabs(program) or cwd is None else os.path.join(cwd, program)
        if not os.access(path, os.X_OK):
            raise SpawnError(f"cannot execute {program!r}: not an executable file")
        return path
    found = shutil.which(program, path=search_path)
    if found is None:
        raise SpawnError(f"cannot execute {program!r}: not found in PATH={search_path}")
    return found


def _resolve_credentials(
    user: str | None, group: str | None
) -> tuple[int | None, int | None, tuple[int, ...] | None]:
    uid = gid = None
    groups: tuple[int, ...] | None = None
    if user is not None:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdecimal() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise SpawnError(f"unknown user {user!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    if group is not None:
        try:
            gid = (
                grp.getgrgid(int(group)).gr_gid if group.isdecimal() else grp.getgrnam(group).gr_gid
            )
        except (KeyError, OverflowError):
            raise SpawnError(f"unknown group {group!r}") from None
        if groups is None:
            groups = (gid,)
    return uid, gid, groups


def spawn(plan: SpawnPlan) -> int:
    """Start ``plan``; returns the pid once the exec has succeeded.

    Raises :class:`SpawnError` when the child failed before or at the exec
    (the message names the step and the reason); the child is reaped then.
    """
    if _native is not None:
        return _spawn_native(plan)
    return _spawn_python(plan)


def native_spawn_available() -> bool:
    """Whether the C extension was built, so that :func:`spawn` avoids ``os.fork()``."""
    return _native is not None


def _spawn_native(plan: SpawnPlan) -> int:
    """:func:`spawn` with ``clone(CLONE_VM | CLONE_VFORK)`` in ``fdsupervisor._spawn``."""
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
            # before anything the worker could fork from, and while still root
            stage = "cgroup"
            procs = os.open("cgroup.procs", os.O_WRONLY | os.O_CLOEXEC, dir_fd=plan.cgroup_fd)
            os.write(procs, b"0")
            os.close(procs)
        stage = "fds"
        _place_fds(plan.fds, plan.stdio_fd, report_fd, plan.stdout_fd, plan.stderr_fd)
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
