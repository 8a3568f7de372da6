"""Worker hardening (SPEC section 10), read back from ``/proc/PID`` of real workers.

``limits:``, ``umask:``, ``no-new-privileges:`` and ``supplementary-groups:``
are applied by the child before exec on both spawn paths (the C clone and
the ``os.fork()`` fallback, chosen with ``FDSUPERVISOR_SPAWN``); the worker
is ``sleep``, which changes none of them, so what ``/proc`` shows is what the
spawn step set.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import SPAWN_PATHS, run_fdsupervisor

SLEEP = shutil.which("sleep") or "/bin/sleep"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def proc_status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def proc_limits(pid: int) -> dict[str, tuple[str, str]]:
    """``/proc/PID/limits``: its row name ("Max open files") → (soft, hard) as printed."""
    rows = {}
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines()[1:]:
        # "Max open files            4096                 8192                 files"
        name, soft, hard = line[:26].strip(), line[26:47].strip(), line[47:68].strip()
        rows[name] = (soft, hard)
    return rows


def worker_pid(supervisor, unit_text: str, env: dict[str, str]) -> int:
    sup = supervisor({"hard": unit_text}, env=env)
    return int(sup.wait_for("worker_started", unit="hard")["pid"])


@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_limits_umask_and_no_new_privileges_reach_the_worker(
    supervisor, spawn_env: dict[str, str]
) -> None:
    pid = worker_pid(
        supervisor,
        f"""
        service:
          exec: [{SLEEP}, "1000"]
          limits:
            nofile: "1024:2048"
            core: 0
            nproc: "100:200"
            fsize: 1M
            nice: 0
            cpu: "100:infinity"
          umask: "0027"
          no-new-privileges: true
        """,
        spawn_env,
    )
    limits = proc_limits(pid)
    assert limits["Max open files"] == ("1024", "2048")
    assert limits["Max core file size"] == ("0", "0")
    assert limits["Max processes"] == ("100", "200")
    assert limits["Max file size"] == (str(1 << 20), str(1 << 20))
    assert limits["Max nice priority"] == ("0", "0")
    assert limits["Max cpu time"] == ("100", "unlimited")
    status = proc_status(pid)
    assert status["Umask"] == "0027"
    assert status["NoNewPrivs"] == "1"


@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_a_limit_the_supervisor_may_not_raise_fails_the_start_by_name(
    supervisor, spawn_env: dict[str, str]
) -> None:
    hard = proc_limits(os.getpid())["Max open files"][1]
    if hard == "unlimited" or _has_sys_resource():
        pytest.skip("the supervisor may raise any limit here (CAP_SYS_RESOURCE)")
    if int(hard) + 1 > int(Path("/proc/sys/fs/nr_open").read_text()):
        pytest.skip("above fs.nr_open: refused at load (test_nofile_above_nr_open_...)")
    sup = supervisor(
        {"hard": f"service: {{exec: [{SLEEP}, '1000'], limits: {{nofile: {int(hard) + 1}}}}}\n"},
        env=spawn_env,
    )
    failed = sup.wait_for("worker_start_failed", unit="hard")
    assert "limits.nofile: Operation not permitted" in failed["error"]


def _has_sys_resource() -> bool:
    CAP_SYS_RESOURCE = 24  # <linux/capability.h>
    effective = int(proc_status(os.getpid())["CapEff"], 16)
    return bool(effective >> CAP_SYS_RESOURCE & 1)


@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_without_the_keys_the_worker_keeps_the_supervisors_settings(
    supervisor, spawn_env: dict[str, str]
) -> None:
    pid = worker_pid(supervisor, f"service: {{exec: [{SLEEP}, '1000']}}\n", spawn_env)
    status = proc_status(pid)
    assert status["NoNewPrivs"] == "0"
    assert proc_limits(pid)["Max open files"] == proc_limits(os.getpid())["Max open files"]


@needs_root
@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_a_user_gets_its_own_groups_never_the_supervisors(
    supervisor, spawn_env: dict[str, str]
) -> None:
    """``user:`` alone: the user's groups from the group database (initgroups()), not root's."""
    member = next(
        (
            (entry.gr_name, user)
            for entry in grp.getgrall()
            for user in entry.gr_mem
            if entry.gr_gid != 0 and _known_user(user)
        ),
        None,
    )
    name = member[1] if member else "nobody"
    user = pwd.getpwnam(name)
    pid = worker_pid(supervisor, f"service: {{exec: [{SLEEP}, '1000'], user: {name}}}\n", spawn_env)
    groups = sorted(int(g) for g in proc_status(pid)["Groups"].split())
    assert groups == sorted(set(os.getgrouplist(name, user.pw_gid)))
    if member:
        assert grp.getgrnam(member[0]).gr_gid in groups
    assert 0 not in groups


@needs_root
@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_supplementary_groups_replace_the_users_groups(
    supervisor, spawn_env: dict[str, str]
) -> None:
    nobody = pwd.getpwnam("nobody")
    listed = [g for g in grp.getgrall() if g.gr_gid not in (0, nobody.pw_gid)][:2]
    names = ", ".join(g.gr_name for g in listed)
    pid = worker_pid(
        supervisor,
        f"service: {{exec: [{SLEEP}, '1000'], user: nobody, supplementary-groups: [{names}]}}\n",
        spawn_env,
    )
    status = proc_status(pid)
    assert sorted(int(g) for g in status["Groups"].split()) == sorted(g.gr_gid for g in listed)
    assert status["Gid"].split()[0] == str(nobody.pw_gid)
    assert status["Uid"].split()[0] == str(nobody.pw_uid)


def _known_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_nofile_above_nr_open_is_refused_by_check_naming_where(tmp_path: Path) -> None:
    """setrlimit(RLIMIT_NOFILE) above fs.nr_open is EPERM even for root: known before start."""
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    units = tmp_path / "units"
    units.mkdir()
    web = units / "web.yaml"
    for value, problem in ((nr_open + 1, str(nr_open + 1)), ("infinity", "infinity")):
        web.write_text(f"service:\n  exec: [{SLEEP}, '1000']\n  limits:\n    nofile: {value}\n")
        checked = run_fdsupervisor("check", str(units))
        assert checked.returncode == 1, checked.stdout
        assert (
            f"{web}:4:13: service.limits.nofile: {problem} is above this host's fs.nr_open "
            f"({nr_open})"
        ) in checked.stderr
    web.write_text(f"service:\n  exec: [{SLEEP}, '1000']\n  limits: {{nofile: '1024:{nr_open}'}}\n")
    assert run_fdsupervisor("check", str(units)).returncode == 0


def test_check_and_run_refuse_an_unknown_user_naming_where(tmp_path: Path) -> None:
    """Before, ``check`` passed ``user: nosuchuser`` and only the start failed."""
    units = tmp_path / "units"
    units.mkdir()
    (units / "web.yaml").write_text(
        f"service:\n  exec: [{SLEEP}, '1000']\n  user: nosuchuser\n"
        "  supplementary-groups: [nosuchgroup]\n"
    )
    checked = run_fdsupervisor("check", str(units))
    assert checked.returncode == 1
    assert f"{units / 'web.yaml'}:3:9: service.user: unknown user 'nosuchuser'" in checked.stderr
    assert f"{units / 'web.yaml'}:4:26: service.supplementary-groups.0: unknown group" in (
        checked.stderr
    )
    started = run_fdsupervisor("run", "--monitor", str(tmp_path / "m.sock"), str(units))
    assert started.returncode == 1
    assert "service.user: unknown user 'nosuchuser'" in started.stderr


@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_workers_get_the_soft_fd_limit_the_supervisor_was_started_with(
    supervisor, spawn_env: dict[str, str]
) -> None:
    """Not the one it raised for itself, also after an upgrade (systemd's DefaultLimitNOFILE=)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 2048:
        pytest.skip("the hard RLIMIT_NOFILE leaves nothing to raise")
    plain = f"""
        service:
          exec: [{SLEEP}, "1000"]
          restart: always
        """
    own = f"""
        service:
          exec: [{SLEEP}, "1000"]
          limits:
            nofile: 2048
        """
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the supervisor starts with
    try:
        sup = supervisor({"plain": plain, "own": own}, env=spawn_env)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    started = sup.wait_for("fd_limit")
    assert started["raised_from"] == 1024 and started["workers"] == 1024
    assert resource.prlimit(sup.pid, resource.RLIMIT_NOFILE)[0] > 1024
    hard_shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    pid = sup.wait_for("worker_started", unit="plain")["pid"]
    assert proc_limits(pid)["Max open files"] == ("1024", hard_shown)
    own_pid = sup.wait_for("worker_started", unit="own")["pid"]
    assert proc_limits(own_pid)["Max open files"] == ("2048", "2048"), "the unit's own wins"
    # the new program runs with the raised limit it inherited: the state says the first one
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGUSR2)
    sup.wait_for("upgraded", after=mark)
    os.kill(pid, signal.SIGKILL)
    again = sup.wait_for("worker_started", unit="plain", after=mark)["pid"]
    assert proc_limits(again)["Max open files"] == ("1024", hard_shown)
