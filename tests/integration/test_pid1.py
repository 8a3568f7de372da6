"""The supervisor as a container's PID 1 and as a child subreaper (SPEC 9, reaper.py).

Real pid namespaces: ``unshare --pid --fork --mount-proc fdsupervisor run``,
the way podman runs an entrypoint. The namespace's init is the child of
``unshare``; the test signals it by its pid on the host and reads the host's
/proc for zombies among its children.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fdsupervisor.reaper import zombie_children
from tests.monitor_client import RawClient

from ..conftest import SupervisorProcess

UNSHARE = ("unshare", "--pid", "--fork", "--mount-proc")
# A worker whose child double-forks a daemon and exits: the daemon, an orphan,
# goes to the nearest subreaper (or the namespace's init), and exits after a while.
DOUBLE_FORK = """
service:
  exec: [sh, -c, "sh -c '(sleep 0.3; exit 7) &' ; echo forked; exec sleep 1000"]
"""
# A daemon that stays in the worker's process group (no setsid), re-parented to
# the supervisor when the middle shell exits; it prints its pid.
DAEMON_IN_THE_GROUP = """
service:
  exec: [sh, -c, "sh -c 'sleep 1000 & echo daemon $!' ; exec sleep 1000"]
"""
# One that leaves its process group: setsid, so a stop of the worker's group misses it.
LEFT_THE_GROUP = """
service:
  exec: [sh, -c, "sh -c 'setsid sh -c \\"echo detached; exec sleep 1000\\" &' ; exec sleep 1000"]
"""

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="pid namespaces need root"
)


def namespace_init(proc: SupervisorProcess) -> int:
    """The host pid of the namespace's PID 1: the child of unshare."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for name in os.listdir("/proc"):
            if not name.isdecimal():
                continue
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes().rpartition(b")")[2].split()
            except OSError:
                continue
            if int(stat[1]) == proc.pid:
                return int(name)
        time.sleep(0.01)  # unshare forks at once; bounded all the same
    raise AssertionError("unshare has no child")


def in_namespace(supervisor: Callable[..., SupervisorProcess], unit: str) -> SupervisorProcess:
    proc = supervisor({"daemon": unit}, prefix=UNSHARE)
    assert proc.wait_for("ready")["pid"] == 1
    return proc


def test_orphan_of_a_double_fork_is_reaped_as_pid1(
    supervisor: Callable[..., SupervisorProcess],
) -> None:
    proc = in_namespace(supervisor, DOUBLE_FORK)
    init = namespace_init(proc)
    proc.wait_for("worker_started")
    reaped = proc.wait_for("orphan_reaped", status=7)
    assert reaped["pid"] > 1
    assert zombie_children(init) == []
    assert proc.count("worker_exited") == 0  # the worker itself runs on, its runner's
    os.kill(init, signal.SIGTERM)
    assert proc.stop() == 0


def test_orphan_is_reaped_as_subreaper(supervisor: Callable[..., SupervisorProcess]) -> None:
    """Outside a namespace the orphan would go to the host's init: PR_SET_CHILD_SUBREAPER."""
    proc = supervisor({"daemon": DOUBLE_FORK})
    proc.wait_for("orphan_reaped", status=7)
    assert zombie_children(proc.pid) == []


def wake_ups(pid: int) -> tuple[int, int]:
    """``pid``'s context switches and CPU ticks so far (proc(5): status, stat)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    switches = sum(int(line.split()[1]) for line in status if "ctxt_switches" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return switches, int(stat[11]) + int(stat[12])


def test_an_idle_supervisor_that_reaps_orphans_is_never_woken(
    supervisor: Callable[..., SupervisorProcess],
) -> None:
    """Reaping is driven by SIGCHLD alone: no timer, no poll (SPEC 9, issue 12)."""
    proc = supervisor({"daemon": DOUBLE_FORK})
    proc.wait_for("orphan_reaped", status=7)
    # the event is logged before the loop goes back to sleep: wait until it has
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/wchan").read_text() != "do_epoll_wait":
        assert time.monotonic() < deadline, "the supervisor never waits in epoll_wait"
        time.sleep(0.01)  # /proc polling: no event says "asleep"
    before = wake_ups(proc.pid)
    time.sleep(1.5)  # a measuring window, not a synchronisation
    after = wake_ups(proc.pid)
    assert after == before, f"woken while idle: (switches, ticks) {before} -> {after}"


def test_stopping_the_service_stops_a_daemon_in_the_workers_group(
    supervisor: Callable[..., SupervisorProcess], tmp_path: Path
) -> None:
    """Without cgroups it is the group signal alone that reaches the re-parented daemon."""
    proc = supervisor(
        {"daemon": DAEMON_IN_THE_GROUP}, args=["--no-cgroups", str(tmp_path / "units")]
    )
    daemon = int(proc.wait_output("daemon ").split()[1])
    try:
        worker = proc.wait_for("worker_started")["pid"]
        assert os.getpgid(daemon) == worker
        with RawClient(proc.monitor_path).negotiate() as client:
            assert client.command("service-stop", unit="daemon") == {"return": {}}
        reaped = proc.wait_for("orphan_reaped", pid=daemon, timeout=10)
        proc.wait_for("worker_exited", pid=worker)  # both gone before the zombies are counted
    finally:
        if proc.count("orphan_reaped", pid=daemon) == 0:  # the test failed: end its daemon
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGKILL)
    assert reaped["status"] == -signal.SIGTERM
    assert zombie_children(proc.pid) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_as_pid1(
    supervisor: Callable[..., SupervisorProcess], signum: signal.Signals
) -> None:
    """A PID 1 has no default actions (signal(7)): each works because it is handled."""
    proc = in_namespace(supervisor, DOUBLE_FORK)
    os.kill(namespace_init(proc), signum)
    proc.wait_for("shutting_down", reason=signum.name)
    assert proc.stop() == 0


def test_sighup_reloads_and_sigusr2_upgrades_as_pid1(
    supervisor: Callable[..., SupervisorProcess],
) -> None:
    proc = in_namespace(supervisor, DOUBLE_FORK)
    init = namespace_init(proc)
    os.kill(init, signal.SIGHUP)
    proc.wait_for("reloaded")
    os.kill(init, signal.SIGUSR2)
    assert proc.wait_for("upgraded")["pid"] == 1
    os.kill(init, signal.SIGTERM)
    assert proc.stop() == 0


def test_shutdown_as_pid1_stops_a_daemon_that_left_the_group(
    supervisor: Callable[..., SupervisorProcess], tmp_path: Path
) -> None:
    """Without cgroups (which kill it with the worker's), the group stop misses the daemon."""
    args = ["--no-cgroups", str(tmp_path / "units")]
    proc = supervisor({"daemon": LEFT_THE_GROUP}, args=args, prefix=UNSHARE)
    init = namespace_init(proc)
    proc.wait_for("worker_started")
    proc.wait_output("detached")  # after setsid: out of the worker's group
    os.kill(init, signal.SIGTERM)
    assert proc.stop() == 0
    assert proc.wait_for("namespace_stopping", signal="SIGTERM")
    assert proc.count("namespace_killed") == 0  # sleep dies of SIGTERM, no SIGKILL needed
