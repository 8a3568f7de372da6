"""A supervisor killed with SIGKILL leaves its cgroup tree; the next one to start removes it.

Real cgroups below this process's own, real supervisors: the first is killed
with its worker still running in its cgroup (kept, populated), then the
worker is killed (the tree is empty, and removed by the next start). Trees
of live supervisors and of other pid namespaces are never touched.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdsupervisor.cgroups import cgroup2_mounts, cgroup_directory, own_cgroup, parent_name
from tests.conftest import PYTHON

UNIT = f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, -c, "import time; time.sleep(600)"]
    """


def hierarchy() -> tuple[Path, int]:
    """Where a supervisor this test starts puts its tree, and this pid namespace's inode."""
    mounts = cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
    path = own_cgroup(Path("/proc/self/cgroup").read_text())
    base = cgroup_directory(mounts, path) if path is not None else None
    if base is None or os.geteuid() != 0 or not os.access(base, os.W_OK):
        pytest.skip("no writable cgroup2 hierarchy holds this process")
    return base, os.stat("/proc/self/ns/pid").st_ino


def gone_pid() -> int:
    """A pid no process has now (a child, reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def kill_and_wait(pid: int) -> None:
    """SIGKILL a process that is not our child, and wait for it to be gone (its pidfd)."""
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGKILL)
        assert select.select([pidfd], [], [], 10)[0], f"{pid} did not exit"
    finally:
        os.close(pidfd)


@pytest.fixture
def fake_trees() -> Iterator[dict[str, Path]]:
    """Empty trees named as supervisors name them: a gone one's, a live one's, a foreign one's."""
    base, namespace = hierarchy()
    trees = {
        "gone": base / parent_name(gone_pid(), namespace),
        "live": base / parent_name(os.getpid(), namespace),  # this test: a live pid
        "foreign": base / parent_name(gone_pid(), namespace + 1),  # another pid namespace
    }
    for tree in trees.values():
        (tree / "web.0.1").mkdir(parents=True)
    yield trees
    for tree in trees.values():
        for directory in (tree / "web.0.1", tree):
            if directory.exists():
                directory.rmdir()


def test_a_killed_supervisors_empty_tree_is_removed_at_the_next_start(
    supervisor, fake_trees: dict[str, Path]
) -> None:
    first = supervisor({"web": UNIT})
    tree = Path(first.wait_for("cgroups_enabled")["path"])
    worker = first.wait_for("worker_started", unit="web")["pid"]
    first.kill()  # SIGKILL: no supervisor removes the tree; the worker runs on in it
    assert (tree / "cgroup.procs").exists()
    second = supervisor({"web": UNIT})
    kept = second.wait_for("stale_cgroup_kept", cgroup=str(tree))
    assert kept["level"] == "warning" and (tree / "cgroup.procs").exists(), "populated: kept"
    assert not fake_trees["gone"].exists(), "the gone supervisor's empty tree is removed"
    assert fake_trees["live"].is_dir() and fake_trees["foreign"].is_dir()
    kill_and_wait(worker)  # now the killed supervisor's tree is empty too
    third = supervisor({"web": UNIT})
    third.wait_for("cgroups_enabled")  # after the clean-up
    assert not tree.exists(), "the killed supervisor's tree and its worker's cgroup are gone"
    assert fake_trees["live"].is_dir() and fake_trees["foreign"].is_dir()
    assert Path(third.wait_for("cgroups_enabled")["path"]).is_dir()
    assert second.proc.poll() is None and third.proc.poll() is None
