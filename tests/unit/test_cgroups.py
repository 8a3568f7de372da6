"""Where the cgroup v2 hierarchy is and what its files say: the pure part of cgroups.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.cgroups import (
    UNIT_PART_MAX,
    Cgroup2Mount,
    cgroup2_mounts,
    cgroup_directory,
    dead_supervisors_parent,
    own_cgroup,
    parent_name,
    populated,
    worker_name,
)

# A hybrid system (the 2-core test machines): v1 controllers and a v2 hierarchy at .../unified.
HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# A unified system under systemd, with optional fields before the separator.
UNIFIED = """\
25 20 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate
"""
# A container that sees its host's cgroup read-only.
READ_ONLY = """\
700 690 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup ro
"""


def test_the_v2_mount_of_a_hybrid_system() -> None:
    assert cgroup2_mounts(HYBRID) == [Cgroup2Mount("/sys/fs/cgroup/unified", "/", False)]


def test_optional_fields_and_read_only_mounts() -> None:
    assert cgroup2_mounts(UNIFIED) == [Cgroup2Mount("/sys/fs/cgroup", "/", False)]
    assert cgroup2_mounts(READ_ONLY) == [Cgroup2Mount("/sys/fs/cgroup", "/", True)]
    assert cgroup2_mounts("") == []
    assert cgroup2_mounts("garbage\n1 2 3\n") == []


def test_octal_escapes_in_mount_points() -> None:
    line = r"41 31 0:38 / /mnt/my\040cgroups\134x rw - cgroup2 cgroup2 rw"
    assert cgroup2_mounts(line)[0].mount_point == "/mnt/my cgroups\\x"


def test_own_cgroup_is_the_v2_line() -> None:
    text = "9:name=systemd:/\n4:memory:/process_api/b0b\n0::/system.slice/fdsupervisor.service\n"
    assert own_cgroup(text) == "/system.slice/fdsupervisor.service"
    assert own_cgroup("0::/\n") == "/"
    assert own_cgroup("4:memory:/x\n") is None  # cgroup v1 only


@pytest.mark.parametrize(
    ("mounts", "path", "expected"),
    [
        ([Cgroup2Mount("/sys/fs/cgroup/unified", "/", False)], "/", "/sys/fs/cgroup/unified"),
        (
            [Cgroup2Mount("/sys/fs/cgroup", "/", False)],
            "/system.slice/fdsupervisor.service",
            "/sys/fs/cgroup/system.slice/fdsupervisor.service",
        ),
        # a mount of a subtree: the path below its root
        ([Cgroup2Mount("/mnt/cg", "/system.slice", False)], "/system.slice/x", "/mnt/cg/x"),
        ([Cgroup2Mount("/mnt/cg", "/system.slice", False)], "/system.slice", "/mnt/cg"),
        # not below the mounted subtree, or read-only: not usable
        ([Cgroup2Mount("/mnt/cg", "/system.slice", False)], "/user.slice/x", None),
        ([Cgroup2Mount("/mnt/cg", "/system.slice", False)], "/system.slicer", None),
        ([Cgroup2Mount("/sys/fs/cgroup", "/", True)], "/", None),
        ([], "/", None),
    ],
)
def test_cgroup_directory(mounts: list[Cgroup2Mount], path: str, expected: str | None) -> None:
    found = cgroup_directory(mounts, path)
    assert (str(found) if found is not None else None) == expected


def test_the_first_writable_mount_wins() -> None:
    mounts = [Cgroup2Mount("/ro", "/", True), Cgroup2Mount("/rw", "/", False)]
    assert cgroup_directory(mounts, "/a") == Path("/rw/a")


def test_names() -> None:
    # the same before and after an upgrade, which keeps the pid
    assert parent_name(4242, 4026531836) == "fdsupervisor-4242.4026531836"
    assert worker_name("web", 0, 7) == "web.0.7"


@given(st.text(alphabet="abcxyz_.-0123456789", min_size=1, max_size=255), st.integers(0, 10**6))
def test_worker_names_fit_a_directory_name(unit: str, seq: int) -> None:
    name = worker_name(unit, 12345, seq)
    assert len(name) <= 255 and "/" not in name
    assert name.startswith(unit[:UNIT_PART_MAX])


def test_populated() -> None:
    assert populated("populated 1\nfrozen 0\n")
    assert not populated("populated 0\nfrozen 0\n")
    assert not populated("")


@pytest.mark.parametrize(
    "name, stale",
    [
        ("fdsupervisor-100.4026531836", True),  # this namespace, pid 100 gone
        ("fdsupervisor-200.4026531836", False),  # pid 200 runs: maybe a live supervisor
        ("fdsupervisor-100.4026532000", False),  # another pid namespace: its pids mean nothing here
        ("fdsupervisor-100", False),  # not a name a supervisor gives
        ("fdsupervisor-100.4026531836.x", False),
        ("web.0.1", False),  # a worker's
        ("system.slice", False),
    ],
)
def test_only_a_gone_supervisors_parent_of_this_namespace_is_stale(name: str, stale: bool) -> None:
    def alive(pid: int) -> bool:
        return pid == 200

    assert dead_supervisors_parent(name, 4026531836, alive) is stale
    assert dead_supervisors_parent(parent_name(100, 4026531836), 4026531836, alive)
