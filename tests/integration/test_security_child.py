"""The child's part of the security model, attacked for real: output files and escaped daemons.

Both defences live between fork and exec, so every test runs the supervisor
with each spawn path: the C extension (``NATIVE_SPAWN``) and the os.fork()
fallback (``FORK_SPAWN``), chosen by ``FDSUPERVISOR_SPAWN`` in its environment;
the escaped daemon also with the native spawn's migration into the cgroup
(``MIGRATE_SPAWN``), the way of kernels without ``clone3(CLONE_INTO_CGROUP)``.

- A worker's ``stdout: append:PATH`` is opened by the child once it is the
  worker's user: a worker that swaps its log file for a symlink to a
  root-only file gets "stdout: Permission denied" at its restart, and the
  root-only file stays as it was.
- A worker that calls setsid() and double-forks a daemon holding the
  listening socket: with cgroups the daemon is killed with its worker, and
  after a restart every connection reaches the new worker; without
  (``--no-cgroups``) the daemon is named in an ``escaped_process`` warning.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fdsupervisor.cgroups import cgroup2_mounts, cgroup_directory, own_cgroup
from tests.conftest import CGROUP_SPAWN_PATHS, SPAWN_PATHS, SupervisorProcess
from tests.monitor_client import RawClient

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, needs nothing of ours

AS_ROOT_AND_NOBODY = pytest.mark.skipif(
    os.getuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to run a worker as nobody) and /usr/bin/python3",
)


def writable_cgroup2() -> bool:
    """Whether this process's cgroup v2 directory exists and root may create cgroups in it."""
    try:
        path = own_cgroup(Path("/proc/self/cgroup").read_text())
        mounts = cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
    except OSError:
        return False
    directory = cgroup_directory(mounts, path) if path is not None else None
    return directory is not None and os.access(directory, os.W_OK)


@contextmanager
def world_traversable_dir() -> Iterator[Path]:
    """A directory nobody may enter (tmp_path is 0700 root); removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="fdsup-child-"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- 3. a worker's output file is opened as the worker -----------------------------------------

# The worker, as nobody: write a line to its log, then swap the log for a symlink
# to the root-only file and exit, so that the restart opens the link.
SWAP_LOG_FOR_SYMLINK = """
import os, sys
log, target = sys.argv[1], sys.argv[2]
print("written by the worker", flush=True)
os.unlink(log)
os.symlink(target, log)
sys.exit(1)
"""


@AS_ROOT_AND_NOBODY
@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
@pytest.mark.parametrize("kind", ["append", "file"])
def test_a_worker_cannot_make_root_open_a_file_as_its_output(
    supervisor, spawn_env: dict[str, str], kind: str
) -> None:
    nobody = pwd.getpwnam("nobody")
    with world_traversable_dir() as directory:
        logs = directory / "logs"
        logs.mkdir()
        os.chown(logs, nobody.pw_uid, nobody.pw_gid)  # the worker's own directory
        log = logs / "out.log"
        precious = directory / "shadow"
        precious.write_text("root:only\n")
        precious.chmod(0o600)
        unit = f"""
            sockets:
              http: {{listen: "127.0.0.1:0"}}
            service:
              exec: [{SYSTEM_PYTHON}, -c, {json.dumps(SWAP_LOG_FOR_SYMLINK)}, {log}, {precious}]
              user: nobody
              stdout: "{kind}:{log}"
              restart: always
              restart-delay: 0
            """
        sup = supervisor({"web": unit}, env=spawn_env)
        first = sup.wait_for("worker_exited")
        assert first["status"] == "code 1"
        assert log.is_symlink(), "the worker did not swap its log: no attack was mounted"
        # Failed either way: at once by the fix, else by the start limit of the looping attack.
        failed = sup.wait_for("service_failed", unit="web")
        assert precious.read_text() == "root:only\n", "root opened the link for the worker"
        assert precious.stat().st_mode & 0o777 == 0o600
        assert failed["reason"].endswith("stdout: Permission denied")  # not transient: no retry
        assert sup.count("worker_started") == 1


@AS_ROOT_AND_NOBODY
@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_output_files_are_created_by_the_worker_and_shared_by_stdout_and_stderr(
    supervisor, spawn_env: dict[str, str]
) -> None:
    nobody = pwd.getpwnam("nobody")
    worker = "import sys; print('out', flush=True); print('err', file=sys.stderr, flush=True)"
    with world_traversable_dir() as directory:
        logs = directory / "logs"
        logs.mkdir()
        os.chown(logs, nobody.pw_uid, nobody.pw_gid)
        log = logs / "both.log"
        unit = f"""
            sockets:
              http: {{listen: "127.0.0.1:0"}}
            service:
              exec: [{SYSTEM_PYTHON}, -c, {json.dumps(worker)}]
              user: nobody
              stdout: "file:{log}"
              stderr: "file:{log}"
            """
        sup = supervisor({"web": unit}, env=spawn_env)
        assert sup.wait_for("worker_exited")["status"] == "code 0"
        assert log.stat().st_uid == nobody.pw_uid, "created by root, not by the worker"
        # One open file for both (as systemd does): two would each write at offset 0.
        assert log.read_text() == "out\nerr\n"


# -- 13. escaped processes ------------------------------------------------------------------------

# The worker: the first one of the unit double-forks a daemon that calls
# setsid(), ignores SIGTERM and serves the listening socket (fd 3) as the
# worker does; the daemon's pid is printed once it is set up. Every reply
# names who answered.
ESCAPING_WORKER = """
import os, signal, socket, sys
marker = sys.argv[1]
listener = socket.socket(fileno=3)

def serve(who):
    while True:
        conn, _ = listener.accept()
        conn.sendall(f"{who} {os.getpid()}".encode())
        conn.close()

if not os.path.exists(marker):
    open(marker, "w").close()
    read_end, write_end = os.pipe()
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if os.fork() == 0:
            os.close(read_end)
            os.write(write_end, str(os.getpid()).encode())
            os.close(write_end)
            serve("daemon")
        os._exit(0)
    os.close(write_end)
    daemon = os.read(read_end, 32).decode()
    print(f"daemon-started {daemon}", flush=True)
serve("worker")
"""


def escaping_unit(directory: Path) -> str:
    return f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{SYSTEM_PYTHON}, -c, {json.dumps(ESCAPING_WORKER)}, {directory / "marker"}]
          stop-timeout: 5s
        """


def ask(port: int) -> tuple[str, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.settimeout(10)
        who, pid = conn.recv(100).decode().split()
    return who, int(pid)


@contextmanager
def watched_daemon(sup: SupervisorProcess) -> Iterator[tuple[int, int]]:
    """The escaped daemon's pid and a pidfd on it; killed (through the pidfd) at the end."""
    daemon = int(sup.wait_output("daemon-started").split()[1])
    pidfd = os.pidfd_open(daemon)
    try:
        yield daemon, pidfd
    finally:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(pidfd)


def is_gone(pidfd: int, timeout: float) -> bool:
    """Whether the process behind ``pidfd`` exits within ``timeout`` (a pidfd polls readable)."""
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)


def restart(sup: SupervisorProcess) -> int:
    """service-restart web; the new worker's pid."""
    mark = sup.mark()
    with RawClient(sup.monitor_path).negotiate() as client:
        assert client.command("service-restart", unit="web") == {"return": {}}
    return int(sup.wait_for("worker_started", after=mark)["pid"])


def see_the_daemon_answer(port: int, daemon: int) -> None:
    """The attack works: some connections reach the daemon while its worker runs."""
    for _ in range(200):
        if ask(port) == ("daemon", daemon):
            return
    raise AssertionError("the daemon never answered: no attack was mounted")


@pytest.mark.skipif(not writable_cgroup2(), reason="needs a writable cgroup v2 hierarchy")
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs /usr/bin/python3")
@pytest.mark.parametrize("spawn_env", CGROUP_SPAWN_PATHS)
def test_an_escaped_daemon_is_stopped_with_its_worker(
    supervisor, tmp_path: Path, spawn_env: dict[str, str]
) -> None:
    sup = supervisor({"web": escaping_unit(tmp_path)}, env=spawn_env)
    with watched_daemon(sup) as (daemon, pidfd):  # first: killed even if the test fails
        enabled = sup.wait_for("cgroups_enabled")
        port = sup.port("http")
        first = int(sup.wait_for("worker_started")["pid"])
        see_the_daemon_answer(port, daemon)
        assert os.getsid(daemon) != os.getsid(first), "the daemon did not leave the session"
        assert os.getpgid(daemon) != first
        new = restart(sup)
        assert is_gone(pidfd, 10), "the escaped daemon survived its worker's restart"
        killed = sup.wait_for("escaped_process", pid=daemon)
        assert killed["level"] == "warning" and killed["worker"] == first
        assert {ask(port) for _ in range(30)} == {("worker", new)}
    assert sup.stop() == 0
    assert not Path(enabled["path"]).exists(), "the supervisor's cgroup stayed after shutdown"


@pytest.mark.skipif(not writable_cgroup2(), reason="needs a writable cgroup v2 hierarchy")
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs /usr/bin/python3")
def test_cgroups_are_found_again_after_an_upgrade(supervisor, tmp_path: Path) -> None:
    sup = supervisor({"web": escaping_unit(tmp_path)})
    with watched_daemon(sup) as (daemon, pidfd):
        enabled = sup.wait_for("cgroups_enabled")
        first = int(sup.wait_for("worker_started")["pid"])
        mark = sup.mark()
        os.kill(sup.pid, signal.SIGUSR2)
        sup.wait_for("upgraded", after=mark, timeout=30)
        again = sup.wait_for("cgroups_enabled", after=mark)
        assert again["path"] == enabled["path"]
        assert sup.count("cgroup_cleaned") == 0, "a live worker's cgroup was taken for a stale one"
        assert not is_gone(pidfd, 0)
        restart(sup)
        assert is_gone(pidfd, 10), "after the upgrade, the worker's cgroup was lost"
        assert sup.wait_for("escaped_process", pid=daemon)["worker"] == first
    assert sup.stop() == 0
    assert not Path(enabled["path"]).exists()


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs /usr/bin/python3")
@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_without_cgroups_an_escaped_daemon_is_named(
    supervisor, tmp_path: Path, spawn_env: dict[str, str]
) -> None:
    sup = supervisor(
        {"web": escaping_unit(tmp_path)},
        args=["--no-cgroups", str(tmp_path / "units")],
        env=spawn_env,
    )
    with watched_daemon(sup) as (daemon, pidfd):
        sup.wait_for("cgroups_disabled")
        port = sup.port("http")
        first = int(sup.wait_for("worker_started")["pid"])
        see_the_daemon_answer(port, daemon)
        restart(sup)
        named = sup.wait_for("escaped_process", pid=daemon)
        assert named["level"] == "warning"
        assert named["worker"] == first and named["sockets"] == ["http"]
        assert "left running" in named["action"]
        assert not is_gone(pidfd, 0), "the limit documented: without cgroups it runs on"
