"""Both ways of starting a worker, with real processes: what the worker gets, and nothing more.

Every test runs three times: with the C extension (``clone(CLONE_VM | CLONE_VFORK)``,
``_spawn_native``; a child with a cgroup made in it by ``clone3(CLONE_INTO_CGROUP)``),
with the same forced to join the cgroup by a write to ``cgroup.procs``, as where
``clone3`` is not there (``native-migrate``, ``FDSUPERVISOR_SPAWN=migrate``), and with
the ``os.fork()`` fallback (``_spawn_python``).
Most workers are ``sleep``: it changes no signal and opens no fd, so what
``/proc/PID`` shows once ``spawn`` returned (the exec has happened by then)
is exactly what the spawn step gave it.

``python -m tests.integration.test_spawn_paths [BALLAST_MB]`` prints the time one spawn
takes on each path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import grp
import os
import platform
import pwd
import shutil
import signal
import socket
import struct
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from systemd import journal

from fdsupervisor import spawn as spawn_module
from fdsupervisor.cgroups import cgroup2_mounts, cgroup_directory, own_cgroup
from fdsupervisor.errors import SpawnError
from fdsupervisor.spawn import (
    RESET_SIGNALS,
    SPAWN_PATH_ENV,
    OutputFile,
    PassedFd,
    SpawnPlan,
    _spawn_native,
    _spawn_python,
    native_spawn_available,
    prepare_worker,
    spawn,
    start_worker,
)
from fdsupervisor.spawn_slots import SpawnSlots
from fdsupervisor.units import Unit, load_unit_text
from tests.conftest import open_fds

Spawn = Callable[[SpawnPlan], int]

SLEEP = shutil.which("sleep") or "/bin/sleep"
TRUE = shutil.which("true") or "/bin/true"
SH = shutil.which("sh") or "/bin/sh"


def _spawn_native_migrating(plan: SpawnPlan) -> int:
    """The native spawn as where ``clone3(CLONE_INTO_CGROUP)`` is not: the child migrates."""
    return _spawn_native(dataclasses.replace(plan, migrate=True))


def _spawn_native_slotted(plan: SpawnPlan) -> int:
    """The native spawn as the supervisor runs it: on the parent's fd table, through slots."""
    slots = SpawnSlots.reserve()
    try:
        return _spawn_native(plan, slots)
    finally:
        slots.close()


def _spawn_native_slotted_migrating(plan: SpawnPlan) -> int:
    return _spawn_native_slotted(dataclasses.replace(plan, migrate=True))


NOT_BUILT = pytest.mark.skipif(
    not native_spawn_available(),
    reason="fdsupervisor._spawn is not built (no C compiler when installed?)",
)
PATHS = [
    pytest.param(_spawn_native, id="native", marks=NOT_BUILT),
    pytest.param(_spawn_native_migrating, id="native-migrate", marks=NOT_BUILT),
    pytest.param(_spawn_native_slotted, id="native-slots", marks=NOT_BUILT),
    pytest.param(_spawn_native_slotted_migrating, id="native-slots-migrate", marks=NOT_BUILT),
    pytest.param(_spawn_python, id="python"),
]


@pytest.fixture(params=PATHS)
def spawn_with(request: pytest.FixtureRequest) -> Spawn:
    path: Spawn = request.param
    return path


def plan_for(argv: list[str], **changes: object) -> SpawnPlan:
    fields: dict[str, object] = {
        "executable": argv[0],
        "argv": tuple(argv),
        "environment": (("PATH", os.defpath), ("APP_SETTING", "kept")),
        "fds": (),
        "working_directory": None,
        "uid": None,
        "gid": None,
        "groups": None,
    }
    fields.update(changes)
    return SpawnPlan(**fields)  # type: ignore[arg-type]


def wait_until_asleep(pid: int, timeout: float = 10.0) -> None:
    """Until ``pid`` sleeps in its program.

    ``spawn`` returns once the exec has begun: the parent wakes when the
    child's new memory is in place (vfork's wake-up, or the close-on-exec
    pipe closing), a moment before the kernel closes the close-on-exec fds
    and writes the new environment's bounds. A worker asleep is past that.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "S":
            return
        time.sleep(0.001)
    raise AssertionError(f"worker {pid} never went to sleep")


@contextmanager
def running(spawn: Spawn, plan: SpawnPlan) -> Iterator[int]:
    """The pid of a started worker, asleep in its program; killed and reaped afterwards."""
    pid = spawn(plan)
    try:
        wait_until_asleep(pid)
        yield pid
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def sleeper(**changes: object) -> SpawnPlan:
    return plan_for([SLEEP, "60"], **changes)


def status_fields(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def environ_of(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")[:-1]


def same_file(pid: int, target: int, fd: int) -> bool:
    """Whether fd ``target`` of ``pid`` is the open file of our ``fd``."""
    theirs = os.stat(f"/proc/{pid}/fd/{target}")
    ours = os.fstat(fd)
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def signal_bits(signums: Iterable[int]) -> int:
    return sum(1 << (signum - 1) for signum in signums)


def zombies_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdecimal():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state == "Z":
            found.append(int(entry))
    return found


@contextmanager
def socket_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@contextmanager
def fds_at(placed: dict[int, int]) -> Iterator[None]:
    """Temporarily put each source fd at a chosen number (whatever sat there comes back)."""
    saved: dict[int, tuple[int, bool] | None] = {}
    for number in placed:
        try:
            saved[number] = (os.dup(number), os.get_inheritable(number))
        except OSError:
            saved[number] = None
    try:
        for number, source in placed.items():
            os.dup2(source, number, inheritable=False)
        yield
    finally:
        for number, previous in saved.items():
            if previous is None:
                os.close(number)
            else:
                fd, inheritable = previous
                os.dup2(fd, number, inheritable=inheritable)
                os.close(fd)


# --------------------------------------------------------------------------- fds


def test_worker_gets_exactly_stdio_and_its_fds(spawn_with: Spawn) -> None:
    with socket_pair() as (a, b), socket.socket():  # one more fd not to pass
        r, w = os.pipe()  # non-inheritable, as every fd of the supervisor
        try:
            plan = sleeper(fds=(a.fileno(), r, b.fileno()))
            with running(spawn_with, plan) as pid:
                stdio = [fd for fd in open_fds() if fd < 3]
                assert open_fds(pid) == [*stdio, 3, 4, 5]
                assert same_file(pid, 3, a.fileno())
                assert same_file(pid, 4, r)
                assert same_file(pid, 5, b.fileno())
        finally:
            os.close(r)
            os.close(w)


def test_fds_sitting_on_target_numbers_are_renumbered(spawn_with: Spawn) -> None:
    r, w = os.pipe()
    with socket_pair() as (a, _):
        try:
            # The first fd to pass sits at 4, the second at 3: a naive dup2
            # loop would overwrite 3 before moving it.
            with fds_at({4: r, 3: a.fileno()}):
                with running(spawn_with, sleeper(fds=(4, 3))) as pid:
                    assert same_file(pid, 3, r)
                    assert same_file(pid, 4, a.fileno())
                    assert [fd for fd in open_fds(pid) if fd >= 3] == [3, 4]
                # A source already at its target and close-on-exec: a dup2()
                # onto itself would not clear the flag.
                with running(spawn_with, sleeper(fds=(3, 4))) as pid:
                    assert same_file(pid, 3, a.fileno())
                    assert same_file(pid, 4, r)
        finally:
            os.close(r)
            os.close(w)


def fd_table_size(pid: int) -> int:
    """The size of ``pid``'s fd table (``FDSize:``): what the kernel copied into it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("FDSize:"):
            return int(line.split()[1])
    raise AssertionError(f"no FDSize for {pid}")


@NOT_BUILT
@pytest.mark.parametrize("slotted", [False, True], ids=["copied", "slots"])
def test_a_worker_started_through_slots_gets_a_table_of_its_own_fds_only(slotted: bool) -> None:
    """The kernel's copy of the whole table, at clone() and again at execve(), is what
    made a start cost more with more sockets; through the slots, only what lies below
    them is copied, however many fds the supervisor holds (spawn_slots.py)."""
    slots = SpawnSlots.reserve()
    ballast = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(600)]
    try:
        with socket_pair() as (a, b), socket.socket() as high:  # both above the ballast
            plan = sleeper(fds=(high.fileno(), a.fileno()), stdout_fd=b.fileno())
            with running(lambda p: _spawn_native(p, slots if slotted else None), plan) as pid:
                size = fd_table_size(pid)
                stdio = [fd for fd in open_fds() if fd < 3]
                assert open_fds(pid) == sorted({*stdio, 1, 3, 4})
                assert same_file(pid, 1, b.fileno())
                assert same_file(pid, 3, high.fileno())
                assert same_file(pid, 4, a.fileno())
            # Every slot holds its placeholder again, and nothing else was left open.
            anchor = os.fstat(slots.anchor)
            for number in slots.numbers:
                assert os.path.sameopenfile(number, slots.anchor), number
                assert os.fstat(number).st_ino == anchor.st_ino
    finally:
        for fd in ballast:
            os.close(fd)
        slots.close()
    if slotted:
        assert size <= 128, size
    else:
        assert size >= 512, size


# A process under a seccomp filter that refuses close_range() with EPERM (as
# older container runtimes' profiles do) starts workers through the slots:
# the first child gives up before it changed anything but the slots, and
# that start and every later one copy the table instead.
REFUSED_CLOSE_RANGE = r"""
import ctypes, os, socket, struct, sys
from fdsupervisor.spawn_slots import SpawnSlots
from fdsupervisor import _spawn
libc = ctypes.CDLL(None, use_errno=True)
NR_CLOSE_RANGE, EPERM = 436, 1  # x86-64
code = b"".join(struct.pack("HBBI", *op) for op in [
    (0x20, 0, 0, 0),  # ld [nr]
    (0x15, 0, 1, NR_CLOSE_RANGE),  # jeq close_range
    (0x06, 0, 0, 0x00050000 | EPERM),  # ret ERRNO(EPERM)
    (0x06, 0, 0, 0x7FFF0000),  # ret ALLOW
])
program = ctypes.create_string_buffer(code)
fprog = struct.pack("HxxxxxxP", 4, ctypes.addressof(program))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
assert libc.syscall(NR_CLOSE_RANGE, 100, 101, 0) == -1 and ctypes.get_errno() == EPERM
slots = SpawnSlots.reserve()
a, b = socket.socketpair()
for _ in range(2):
    args = [b"/bin/sleep", [b"sleep", b"30"], [], (a.fileno(),), -1, None, -1, -1, None, (),
            (), -1, -1, None, False, None, False, -1, (), -1, False, False,
            slots.anchor, slots.numbers]
    pid = _spawn.spawn(*args)
    theirs, ours = os.stat(f"/proc/{pid}/fd/3"), os.fstat(a.fileno())
    assert (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
    assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2, 3]
    os.kill(pid, 9)
    os.waitpid(pid, 0)
assert all(os.path.sameopenfile(n, slots.anchor) for n in slots.numbers)
try:
    os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
    raise AssertionError("a child left unreaped")
except ChildProcessError:  # none at all: the child that gave up was reaped
    pass
print("ok")
"""


@NOT_BUILT
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter names x86-64's syscall")
def test_where_close_range_is_refused_the_slots_give_way_to_a_copied_table() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", REFUSED_CLOSE_RANGE], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n"


def test_inetd_connection_is_stdin_and_stdout(spawn_with: Spawn) -> None:
    with socket_pair() as (ours, theirs):
        plan = plan_for(
            [SH, "-c", 'read line; echo "got $line"'],
            fds=(theirs.fileno(),),
            stdio_fd=theirs.fileno(),
        )
        pid = spawn_with(plan)
        wait_until_asleep(pid)  # in read
        assert same_file(pid, 0, theirs.fileno())
        assert same_file(pid, 1, theirs.fileno())
        assert same_file(pid, 3, theirs.fileno())
        theirs.close()
        ours.sendall(b"hello\n")
        ours.settimeout(10)
        reply = b""
        while chunk := ours.recv(100):
            reply += chunk
        assert os.waitpid(pid, 0)[1] == 0
        assert reply == b"got hello\n"


# --------------------------------------------------------------------------- process


def test_pid_variables_hold_the_workers_own_pid(spawn_with: Spawn) -> None:
    environment = (
        ("PATH", os.defpath),
        ("LISTEN_PID", "the supervisor's"),  # replaced, not doubled
        ("LISTEN_FDS", "0"),
    )
    plan = sleeper(environment=environment, pid_variables=("LISTEN_PID", "WATCHDOG_PID"))
    with running(spawn_with, plan) as pid:
        env = environ_of(pid)
        assert sorted(env) == sorted(
            [f"PATH={os.defpath}", "LISTEN_FDS=0", f"LISTEN_PID={pid}", f"WATCHDOG_PID={pid}"]
        )


def test_worker_leads_its_own_session_and_process_group(spawn_with: Spawn) -> None:
    with running(spawn_with, sleeper()) as pid:
        assert os.getpgid(pid) == pid
        assert os.getsid(pid) == pid


JOIN_GROUP = """
import os, sys
try:
    os.setpgid(0, int(sys.argv[1]))
except PermissionError:
    sys.exit(3)
sys.exit(0 if os.getpgid(0) == int(sys.argv[1]) else 4)
"""


def test_a_worker_cannot_join_another_workers_group(spawn_with: Spawn) -> None:
    """setpgid() joins only groups of the caller's session: the other worker's is not."""
    with running(spawn_with, sleeper()) as other:
        joiner = spawn_with(plan_for([sys.executable, "-c", JOIN_GROUP, str(other)]))
        _, status = os.waitpid(joiner, 0)
        assert os.waitstatus_to_exitcode(status) == 3, "setpgid() into another worker's group"
        assert os.getpgid(other) == other


def test_working_directory(spawn_with: Spawn, tmp_path: Path) -> None:
    with running(spawn_with, sleeper(working_directory=str(tmp_path))) as pid:
        assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)


def _handler(signum: int, frame: FrameType | None) -> None:
    pass


def test_signals_start_at_their_defaults(spawn_with: Spawn) -> None:
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_IGN),
        signal.SIGHUP: signal.signal(signal.SIGHUP, _handler),
        signal.SIGUSR1: signal.signal(signal.SIGUSR1, _handler),
        signal.SIGTTOU: signal.signal(signal.SIGTTOU, signal.SIG_IGN),
    }
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2, signal.SIGALRM})
    try:
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # Python's own
        with running(spawn_with, sleeper()) as pid:
            status = status_fields(pid)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert int(status["SigBlk"], 16) == 0
    assert int(status["SigCgt"], 16) == 0
    # The signals the supervisor ignores are back at their defaults; one it
    # inherited ignored (as from nohup) and never touches stays ignored.
    assert int(status["SigIgn"], 16) & signal_bits(RESET_SIGNALS) == 0
    assert int(status["SigIgn"], 16) & signal_bits([signal.SIGTTOU])


def test_credentials_switch(spawn_with: Spawn) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching uid and gid needs root")
    nobody = pwd.getpwnam("nobody")
    try:
        nogroup = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        nogroup = nobody.pw_gid
    libc = ctypes.CDLL(None, use_errno=True)
    PR_GET_DUMPABLE = 3  # <linux/prctl.h>
    dumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    plan = sleeper(uid=nobody.pw_uid, gid=nogroup, groups=(nogroup,))
    with running(spawn_with, plan) as pid:
        status = status_fields(pid)
    assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
    assert status["Gid"].split() == [str(nogroup)] * 4
    assert status["Groups"].split() == [str(nogroup)]
    # The child's uid change must not leave the shared memory (ours) undumpable.
    assert libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == dumpable


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"executable": "/nonexistent/program"}, "exec: No such file or directory"),
        ({"executable": "{tmp}/not-executable"}, "exec: Permission denied"),
        ({"working_directory": "/nonexistent"}, "chdir: No such file or directory"),
        ({"fds": (987_654,)}, "fds: Bad file descriptor"),
        ({"cgroup_fd": 987_654}, "cgroup: Bad file descriptor"),
        ({"stdout_file": "{tmp}/missing/out.log"}, "stdout: No such file or directory"),
    ],
    ids=["missing", "not-executable", "chdir", "bad-fd", "cgroup", "stdout"],
)
def test_failure_names_the_step_and_leaves_nothing_behind(
    spawn_with: Spawn, changes: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    (tmp_path / "not-executable").write_text("#!/bin/sh\n")
    if isinstance(changes.get("executable"), str):
        changes = {**changes, "executable": str(changes["executable"]).format(tmp=tmp_path)}
    if isinstance(changes.get("stdout_file"), str):
        path = str(changes["stdout_file"]).format(tmp=tmp_path)
        changes = {**changes, "stdout_file": OutputFile(os.fsencode(path), append=True)}
    fds_before = open_fds()
    with pytest.raises(SpawnError) as info:
        spawn_with(plan_for([TRUE], **changes))
    assert str(info.value) == f"cannot start {TRUE!r}: {expected}"
    assert zombies_of(os.getpid()) == []
    assert open_fds() == fds_before


def test_nul_byte_is_refused(spawn_with: Spawn) -> None:
    fds_before = open_fds()
    with pytest.raises(SpawnError, match=f"cannot start {TRUE!r}: "):
        spawn_with(plan_for([TRUE, "a\0b"]))
    assert zombies_of(os.getpid()) == []
    assert open_fds() == fds_before


@pytest.mark.skipif(not native_spawn_available(), reason="fdsupervisor._spawn is not built")
@pytest.mark.parametrize(
    ("index", "value", "error"),
    [
        (0, "/bin/true", TypeError),  # str, not bytes
        (1, [], ValueError),  # empty argv
        (1, [b"true", "x"], TypeError),
        (3, (-1,), ValueError),
        (4, -2, ValueError),
        (6, 2**32, ValueError),
        (8, (1, "x"), TypeError),
        (9, (b"A=B",), ValueError),
        (10, (0,), ValueError),
        (11, -2, ValueError),
        (13, "/tmp/out", TypeError),  # str, not bytes
        (15, b"/tmp/a\0b", ValueError),
        (17, -2, ValueError),
        (18, [(7, 1)], TypeError),  # (resource, soft, hard)
        (18, [(999, 1, 1)], ValueError),
        (18, [(7, -2, 1)], ValueError),
        (19, 0o1000, ValueError),  # umask
        (22, -2, ValueError),  # slot_anchor
        (23, 5, TypeError),  # slots: a sequence
        (23, (2,), ValueError),  # a slot over stdio
        (23, (9, 8), ValueError),  # not ascending
    ],
)
def test_extension_checks_its_arguments_before_starting_anything(
    index: int, value: object, error: type[Exception]
) -> None:
    from fdsupervisor import _spawn  # only where it was built

    args: list[Any] = [
        TRUE.encode(), [b"true"], [], (), -1, None, -1, -1, None, (b"LISTEN_PID",), (15,),
        -1, -1, None, False, None, False, -1, (), -1, False, False, 0, (),
    ]  # fmt: skip
    args[index] = value
    with pytest.raises(error):
        _spawn.spawn(*args)
    with pytest.raises(TypeError, match="exactly 24 arguments"):
        _spawn.spawn(*args[:-1])
    assert zombies_of(os.getpid()) == []


# --------------------------------------------------------------------------- outputs and cgroup


@contextmanager
def nobody_owned_dir() -> Iterator[Path]:
    """A directory of nobody's in a world-traversable one (tmp_path is 0700 root)."""
    top = Path(tempfile.mkdtemp(prefix="fdsup-spawn-"))
    try:
        top.chmod(0o755)
        mine = top / "nobody"
        mine.mkdir()
        nobody = pwd.getpwnam("nobody")
        os.chown(mine, nobody.pw_uid, nobody.pw_gid)
        yield mine
    finally:
        shutil.rmtree(top, ignore_errors=True)


def as_nobody() -> dict[str, object]:
    nobody = pwd.getpwnam("nobody")
    return {"uid": nobody.pw_uid, "gid": nobody.pw_gid, "groups": (nobody.pw_gid,)}


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_output_files_are_opened_as_the_worker(spawn_with: Spawn) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching uid needs root")
    nobody = pwd.getpwnam("nobody").pw_uid
    with nobody_owned_dir() as directory:
        out, err = directory / "out.log", directory / "err.log"
        out.write_text("earlier\n")
        os.chown(out, nobody, -1)
        plan = plan_for(
            [SH, "-c", "echo to-out; echo to-err >&2"],
            stdout_file=OutputFile(bytes(out), append=True),
            stderr_file=OutputFile(bytes(err), append=False),
            **as_nobody(),
        )
        fds_before = open_fds()
        pid = spawn_with(plan)
        assert os.waitpid(pid, 0)[1] == 0
        assert open_fds() == fds_before
        assert out.read_text() == "earlier\nto-out\n"
        assert err.read_text() == "to-err\n"
        assert err.stat().st_uid == nobody  # created by the worker, not by root
        assert err.stat().st_mode & 0o777 == 0o644 & ~current_umask()


def test_stderr_naming_stdouts_file_shares_its_open_file(spawn_with: Spawn, tmp_path: Path) -> None:
    log = tmp_path / "both.log"
    both = OutputFile(bytes(log), append=False)
    plan = plan_for(
        [SH, "-c", "echo one; echo two >&2; exec sleep 60"], stdout_file=both, stderr_file=both
    )
    with running(spawn_with, plan) as pid:
        assert os.readlink(f"/proc/{pid}/fd/1") == str(log)
        # one open file description, so one offset: two opens would overwrite each other
        assert log.read_text() == "one\ntwo\n"
        offsets = [Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split()[1] for fd in (1, 2)]
        assert offsets == ["8", "8"]


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_an_output_file_the_worker_may_not_open_fails_the_start(
    spawn_with: Spawn, stream: str, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching uid needs root")
    private = tmp_path / "root-only.log"  # in a 0700 directory of root's
    private.write_text("")
    fds_before = open_fds()
    output = OutputFile(bytes(private), append=True)
    with pytest.raises(SpawnError) as info:
        spawn_with(plan_for([TRUE], **{f"{stream}_file": output}, **as_nobody()))
    assert str(info.value) == f"cannot start {TRUE!r}: {stream}: Permission denied"
    assert not info.value.transient
    assert private.read_text() == ""
    assert zombies_of(os.getpid()) == []
    assert open_fds() == fds_before


def test_a_symlink_is_followed_with_the_workers_rights_only(spawn_with: Spawn) -> None:
    """The attack of docs/security.md: the worker's log is a link to a file of root's."""
    if os.geteuid() != 0:
        pytest.skip("switching uid needs root")
    with nobody_owned_dir() as directory:
        precious = directory.parent / "shadow"
        precious.write_text("root:only\n")
        precious.chmod(0o600)
        (directory / "out.log").symlink_to(precious)
        output = OutputFile(bytes(directory / "out.log"), append=True)
        plan = plan_for([SH, "-c", "echo owned"], stdout_file=output, **as_nobody())
        with pytest.raises(SpawnError, match="stdout: Permission denied"):
            spawn_with(plan)
        assert precious.read_text() == "root:only\n"


@contextmanager
def cgroup_of_our_own() -> Iterator[Path]:
    """A cgroup of the test's own below this process's cgroup; removed afterwards."""
    base = None
    try:
        path = own_cgroup(Path("/proc/self/cgroup").read_text())
        mounts = cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
        base = cgroup_directory(mounts, path) if path is not None else None
    except OSError:
        pass
    if base is None or not os.access(base, os.W_OK):
        pytest.skip("needs a writable cgroup v2 hierarchy")
    cgroup = base / f"fdsupervisor-test-{os.getpid()}"
    cgroup.mkdir()
    try:
        yield cgroup
    finally:
        cgroup.rmdir()


def test_the_child_joins_its_cgroup_before_exec(spawn_with: Spawn) -> None:
    with cgroup_of_our_own() as cgroup:
        directory = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with running(spawn_with, sleeper(cgroup_fd=directory)) as pid:
                assert (cgroup / "cgroup.procs").read_text().split() == [str(pid)]
                assert own_cgroup(Path(f"/proc/{pid}/cgroup").read_text()).endswith(
                    f"/{cgroup.name}"
                )
                assert [fd for fd in open_fds(pid) if fd > 2] == []  # the cgroup's fd did not leak
            assert str(os.getpid()) not in (cgroup / "cgroup.procs").read_text().split()
        finally:
            os.close(directory)


@contextmanager
def writes_to_cgroup_procs(cgroup: Path) -> Iterator[Callable[[], bool]]:
    """Whether anything wrote to ``cgroup``'s ``cgroup.procs`` (a migration into it), so far.

    inotify on the cgroup's directory: cgroupfs files get the VFS's
    IN_MODIFY and IN_CLOSE_WRITE like any file, from the writer's write()
    and close(), before the writer goes on; a clone3(CLONE_INTO_CGROUP)
    opens and writes nothing.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    in_modify, in_close_write = 0x2, 0x8  # <sys/inotify.h>
    inotify = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if inotify < 0:
        pytest.skip(f"inotify: {os.strerror(ctypes.get_errno())}")
    try:
        if libc.inotify_add_watch(inotify, bytes(cgroup), in_modify | in_close_write) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        names: list[bytes] = []

        def written() -> bool:
            try:
                data = os.read(inotify, 65536)
            except BlockingIOError:
                data = b""
            while data:
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", data)
                names.append(data[16 : 16 + length].rstrip(b"\0"))
                data = data[16 + length :]
            return b"cgroup.procs" in names

        yield written
    finally:
        os.close(inotify)


def test_the_worker_starts_in_its_cgroup_without_a_migration(
    spawn_with: Spawn, tmp_path: Path
) -> None:
    """Its first read of /proc/self/cgroup names its cgroup, and nothing wrote cgroup.procs.

    Natively on x86-64 the child is created there (clone3 with CLONE_INTO_CGROUP,
    no migration to wait for); the other paths write "0" to cgroup.procs.
    """
    report = tmp_path / "cgroup"
    with cgroup_of_our_own() as cgroup, writes_to_cgroup_procs(cgroup) as migrated:
        directory = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            plan = plan_for(
                [SH, "-c", "exec cat /proc/self/cgroup"],
                cgroup_fd=directory,
                stdout_file=OutputFile(bytes(report), append=False),
            )
            assert os.waitpid(spawn_with(plan), 0)[1] == 0
        finally:
            os.close(directory)
        assert own_cgroup(report.read_text()).endswith(f"/{cgroup.name}")  # type: ignore[union-attr]
        made_there = spawn_with in (_spawn_native, _spawn_native_slotted)
        if made_there and platform.machine() == "x86_64":
            assert not migrated(), "the native child was moved into its cgroup, not made there"
        else:
            assert migrated()


def test_failure_as_another_user_is_reported(spawn_with: Spawn, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching uid needs root")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    shutil.copy(TRUE, private / "true")
    plan = plan_for([str(private / "true")], uid=nobody.pw_uid, gid=nobody.pw_gid, groups=())
    with pytest.raises(SpawnError, match="exec: Permission denied"):
        spawn_with(plan)
    assert zombies_of(os.getpid()) == []


def test_many_spawns_leak_no_fd(spawn_with: Spawn) -> None:
    with socket_pair() as (a, b):
        plan = plan_for([TRUE], fds=(a.fileno(), b.fileno()))
        fds_before = open_fds()
        for _ in range(500):
            pid = spawn_with(plan)
            assert os.waitpid(pid, 0)[1] == 0
        assert open_fds() == fds_before


# --------------------------------------------------------------------------- choice


def _recording(calls: list[str], name: str, path: Spawn) -> Spawn:
    def record(plan: SpawnPlan, *args: object) -> int:
        calls.append(name)
        return path(plan, *args)  # type: ignore[call-arg]

    return record


@pytest.mark.skipif(not native_spawn_available(), reason="fdsupervisor._spawn is not built")
def test_spawn_uses_the_extension_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(spawn_module, "_spawn_native", _recording(calls, "native", _spawn_native))
    monkeypatch.setattr(spawn_module, "_spawn_python", _recording(calls, "python", _spawn_python))
    assert os.waitpid(spawn(plan_for([TRUE])), 0)[1] == 0
    assert calls == ["native"]


@pytest.mark.skipif(not native_spawn_available(), reason="fdsupervisor._spawn is not built")
def test_output_files_and_fds_take_the_extension_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """stdout: file: used to need the fork path (the supervisor opened it); no longer."""
    calls: list[str] = []
    monkeypatch.setattr(spawn_module, "_spawn_native", _recording(calls, "native", _spawn_native))
    monkeypatch.setattr(spawn_module, "_spawn_python", _recording(calls, "python", _spawn_python))
    null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        plan = plan_for(
            [SH, "-c", "echo out; echo err >&2"],
            stdout_file=OutputFile(bytes(tmp_path / "out.log"), append=False),
            stderr_fd=null,
        )
        assert os.waitpid(spawn(plan), 0)[1] == 0
    finally:
        os.close(null)
    assert calls == ["native"]
    assert (tmp_path / "out.log").read_text() == "out\n"


def recorded_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The spawn paths taken from now on, by name, in order."""
    calls: list[str] = []
    monkeypatch.setattr(spawn_module, "_spawn_native", _recording(calls, "native", _spawn_native))
    monkeypatch.setattr(spawn_module, "_spawn_python", _recording(calls, "python", _spawn_python))
    return calls


def unit_from(tmp_path: Path, service: str) -> Unit:
    text = f"""
sockets:
  http: {{listen: "127.0.0.1:0"}}
service:
{textwrap.indent(textwrap.dedent(service).strip(), "  ")}
"""
    return load_unit_text(text, tmp_path / "web.yaml", tmp_path)


def journald_runs() -> bool:
    try:
        journal.stream("fdsupervisor-test").close()
    except OSError:
        return False
    return True


WRITE_BOTH = "echo to-out; echo to-err >&2"


@pytest.mark.skipif(not native_spawn_available(), reason="fdsupervisor._spawn is not built")
@pytest.mark.parametrize(
    "outputs",
    [
        "stdout: null\nstderr: null",
        pytest.param(
            "stdout: journal\nstderr: journal",
            marks=pytest.mark.skipif(not journald_runs(), reason="no journald here"),
        ),
        "stdout: file:{tmp}/out.log\nstderr: append:{tmp}/err.log",
    ],
    ids=["null", "journal", "file"],
)
def test_a_unit_with_outputs_takes_the_native_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outputs: str
) -> None:
    """Every stdout: / stderr: target is redirected by the C extension: none needs os.fork()."""
    calls = recorded_paths(monkeypatch)
    unit = unit_from(
        tmp_path,
        f"exec: [{SH}, -c, {WRITE_BOTH!r}]\n" + outputs.format(tmp=tmp_path),
    )
    fds_before = open_fds()
    plan = prepare_worker(unit, [], 0, {"PATH": os.defpath}, notify_socket=None)
    pid = start_worker(plan)
    assert os.waitpid(pid, 0)[1] == 0
    assert calls == ["native"]
    assert open_fds() == fds_before, "the output fds of the plan were not closed"
    if "file:" in outputs:
        assert (tmp_path / "out.log").read_text() == "to-out\n"
        assert (tmp_path / "err.log").read_text() == "to-err\n"


def test_the_fork_path_on_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """FDSUPERVISOR_SPAWN=fork in the supervisor's environment: os.fork(), built or not."""
    calls = recorded_paths(monkeypatch)
    unit = unit_from(tmp_path, f"exec: [{SH}, -c, {WRITE_BOTH!r}]\nstdout: null")
    environ = {"PATH": os.defpath, SPAWN_PATH_ENV: "fork"}
    pid = start_worker(prepare_worker(unit, [], 0, environ, notify_socket=None))
    assert os.waitpid(pid, 0)[1] == 0
    assert calls == ["python"]


def test_a_started_worker_costs_the_supervisor_no_fd(spawn_with: Spawn, tmp_path: Path) -> None:
    """The worker has its fds and outputs; the supervisor keeps nothing of the spawn."""
    unit = unit_from(tmp_path, f"exec: [{SLEEP}, '60']\nstdout: null")
    environ = {"PATH": os.defpath}
    if spawn_with is _spawn_python:
        environ[SPAWN_PATH_ENV] = "fork"
    elif spawn_with is _spawn_native_migrating:
        environ[SPAWN_PATH_ENV] = "migrate"
    with socket_pair() as (a, _):
        fds_before = open_fds()
        plan = prepare_worker(unit, [PassedFd("http", a.fileno())], 0, environ, notify_socket=None)
        assert plan.stdout_fd is not None
        pid = start_worker(plan)
        try:
            wait_until_asleep(pid)
            assert os.readlink(f"/proc/{pid}/fd/1") == os.devnull
            assert same_file(pid, 3, a.fileno())
            # the output fd is closed (the worker has its own copy), and no pidfd is kept
            assert open_fds() == fds_before
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdecimal():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def test_spawn_falls_back_to_fork_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(spawn_module, "_native", None)
    monkeypatch.setattr(spawn_module, "_spawn_python", _recording(calls, "python", _spawn_python))
    assert not native_spawn_available()
    assert os.waitpid(spawn(plan_for([TRUE])), 0)[1] == 0
    assert calls == ["python"]
    with pytest.raises(SpawnError, match="not built"):
        _spawn_native(plan_for([TRUE]))


# --------------------------------------------------------------------------- timing


def time_per_spawn(spawn: Spawn, count: int = 300) -> tuple[float, float]:
    """Milliseconds the caller is blocked in ``spawn``, and per whole run of ``/bin/true``."""
    with socket_pair() as (a, b):
        plan = plan_for([TRUE], fds=(a.fileno(), b.fileno()), pid_variables=("LISTEN_PID",))
        blocked = 0.0
        started = time.perf_counter()
        for _ in range(count):
            before = time.perf_counter()
            pid = spawn(plan)
            blocked += time.perf_counter() - before
            os.waitpid(pid, 0)
        whole = time.perf_counter() - started
    return blocked / count * 1000, whole / count * 1000


if __name__ == "__main__":
    # Optional ballast in MB: fork() copies page tables, so its cost grows with the parent.
    ballast = bytearray(b"\1") * (int(sys.argv[1]) * 1_000_000 if len(sys.argv) > 1 else 0)
    for name, path in (("native", _spawn_native), ("python", _spawn_python)):
        if path is _spawn_native and not native_spawn_available():
            print(f"{name}: not built")
            continue
        time_per_spawn(path, 20)
        blocked, whole = time_per_spawn(path)
        print(
            f"{name}: {blocked:.3f} ms in spawn(), {whole:.3f} ms per spawn + /bin/true + waitpid"
        )
