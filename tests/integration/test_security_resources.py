"""Issue 9's resource attacks, mounted for real: timers, fd budgets, EMFILE, the unit directory.

Each test starts a real supervisor, lets a real process (a worker running as
``nobody``, a monitor client, a unit file in the directory) try to break it,
and then checks that the supervisor still answers, still stops on SIGTERM
and harmed nobody else. See docs/security.md for each attack and defence.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    PYTHON,
    REPORT_WORKER,
    SupervisorProcess,
    open_fds,
    report_from,
    run_fdsupervisor,
)
from tests.integration.test_security import free_fds, out_of_fds, settle
from tests.monitor_client import RawClient

SYSTEM_PYTHON = "/usr/bin/python3"
needs_root = pytest.mark.skipif(
    os.getuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to run a worker as nobody) and /usr/bin/python3",
)


def answers(sup: SupervisorProcess, timeout: float = 5.0) -> list[dict[str, object]]:
    """The supervisor still serves its monitor: two round trips, each within ``timeout``."""
    with RawClient(sup.monitor_path, timeout=timeout).negotiate() as client:
        client.command("query-version")
        services: list[dict[str, object]] = client.command("query-services")["return"]
        return services


def stops_cleanly(sup: SupervisorProcess) -> None:
    assert sup.stop(timeout=10) == 0
    assert sup.count("internal_error") == 0, "a callback failed in the loop"


# -- timers: any value a unit or a worker gives (item 2) ------------------------------------

# Runs as nobody: sends one notify datagram, says so, and waits to be stopped.
NOTIFY_ONCE = """
import os, signal, socket, sys
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\\0" + address[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.sendto(sys.argv[1].encode(), address)
print("sent as", os.getuid(), flush=True)
signal.pause()
"""


@needs_root
def test_a_huge_watchdog_usec_from_a_worker_running_as_nobody_is_clamped(supervisor) -> None:
    """WATCHDOG_USEC=10000000000000000 (317 years) used to make every epoll_wait raise
    OverflowError: a busy loop, no monitor reply, SIGTERM ignored."""
    unit = f"""
        service:
          exec: [{SYSTEM_PYTHON}, -c, {json.dumps(NOTIFY_ONCE)}, "WATCHDOG_USEC=10000000000000000"]
          user: nobody
          working-directory: /
        """
    sup = supervisor({"evil": unit})
    sup.wait_output("sent as 65534")
    clamped = sup.wait_for("notify_clamped", key="WATCHDOG_USEC")
    assert clamped["seconds"] == 31_557_600  # one year: as good as never
    services = answers(sup)
    assert services[0]["state"] == "running"
    stops_cleanly(sup)


def test_stop_timeout_infinity_waits_for_a_slow_worker_and_the_loop_lives_on(supervisor) -> None:
    """stop-timeout: infinity (documented) then a stop whose worker needs 1.5 s to exit."""
    slow = (
        "import signal, sys, time\n"
        "def stop(*_):\n"
        "    print('stopping slowly', flush=True)\n"
        "    time.sleep(1.5)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('slow worker: handler installed', flush=True)\n"
        "while True:\n"
        "    signal.pause()\n"
    )
    unit = f"""
        service:
          exec: [{PYTHON}, -c, {json.dumps(slow)}]
          stop-timeout: infinity
        """
    sup = supervisor({"slow": unit})
    sup.wait_output("slow worker: handler installed")  # not just "up": "cgroup" has that
    mark = sup.mark()
    with RawClient(sup.monitor_path, timeout=5).negotiate() as client:
        assert client.command("service-stop", unit="slow") == {"return": {}}
        sup.wait_output("stopping slowly")
        # while the worker takes its time, the monitor answers
        assert client.command("query-services")["return"][0]["state"] == "stopping"
        sup.wait_for("worker_exited", unit="slow", after=mark, timeout=10)
        assert client.command("query-services")["return"][0]["state"] == "inactive"
    assert sup.count("stop_timeout") == 0, "infinity means no SIGKILL, ever"
    stops_cleanly(sup)


def test_the_longest_restart_delay_there_is_leaves_the_loop_answering(supervisor) -> None:
    """restart-delay: 1y is allowed (the maximum): a restart a year away must not
    become one epoll_wait timeout (at most 24.8 days)."""
    unit = f"""
        service:
          exec: [{PYTHON}, -c, "raise SystemExit(3)"]
          restart-delay: 1y
        """
    sup = supervisor({"later": unit})
    exited = sup.wait_for("worker_exited", unit="later")
    assert exited["restart_in"] == 31_557_600
    assert answers(sup)[0]["state"] == "starting"
    stops_cleanly(sup)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "restart-delay: 400000y",
            "service.restart-delay: the duration '400000y' is too long: at most 1y "
            "(31557600 seconds)",
        ),
        (
            "stop-timeout: 10000000000",
            "service.stop-timeout: the duration '10000000000' is too long: at most 1y "
            "(31557600 seconds); for 'never' write infinity",
        ),
    ],
)
def test_check_and_run_refuse_an_absurd_duration_naming_key_and_maximum(
    supervisor, tmp_path: Path, line: str, message: str
) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "web.yaml").write_text(
        textwrap.dedent(
            f"""\
            sockets:
              http: {{listen: "127.0.0.1:0"}}
            service:
              exec: [{PYTHON}, -c, "pass"]
              {line}
            """
        )
    )
    column = len("  ") + line.index(":") + 3
    expected = f"{units / 'web.yaml'}:5:{column}: {message}"
    checked = run_fdsupervisor("check", str(units))
    assert checked.returncode == 1
    assert checked.stderr == f"fdsupervisor: {expected}\n"
    sup = supervisor(wait_ready=False)
    assert sup.proc.wait(30) == 1
    sup.wait_output(expected)
    assert sup.count("socket_bound") == 0


# -- a short EMFILE spell (item 9) ----------------------------------------------------------

# Two sockets: a new worker needs two free fds, reaping the old one frees only its pidfd
# (see test_security.TWO_SOCKETS); a start limit of 2 that the shortage outlasts.
TWO_SOCKETS_TIGHT_LIMIT = f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
      second: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, {REPORT_WORKER}]
      restart: always
      restart-delay: 100ms
      start-limit: {{burst: 2, interval: 60s}}
    """


def test_an_emfile_spell_longer_than_the_start_limit_still_ends_in_a_running_service(
    supervisor,
) -> None:
    """Out of fds for four retries, twice the start limit: the service must not be failed
    for good (docs/security.md: a start that fails for lack of fds "succeeds once fds are
    free"), and the retries back off."""
    sup = supervisor({"web": TWO_SOCKETS_TIGHT_LIMIT})
    first = sup.wait_for("worker_started")["pid"]
    with RawClient(sup.monitor_path).negotiate() as client:
        with out_of_fds(sup, client) as names:
            mark = sup.mark()
            os.kill(first, signal.SIGKILL)
            retries = []
            for _ in range(4):
                failed = sup.wait_for("worker_start_failed", after=mark, timeout=10)
                assert "Too many open files" in failed["error"]
                retries.append(failed["restart_in"])
                mark = sup.events.index(failed) + 1
            free_fds(client, names)
        assert retries == [0.1, 0.2, 0.4, 0.8]
        second = sup.wait_for("worker_started", after=mark, timeout=10)["pid"]
        assert report_from("127.0.0.1", sup.port("http"))["pid"] == second
        services = client.command("query-services")["return"]
    assert services[0]["state"] == "running" and services[0]["pids"] == [second]
    assert sup.count("service_failed") == 0


# -- stored fds of a unit a reload removes (item 10) ----------------------------------------

# Stores one end of a socketpair under FDNAME=kept (FDPOLL=0: kept even when the other
# end, its own, goes with it), says so, and waits to be stopped.
STORE_ONE_FD = """
import array, os, signal, socket
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\\0" + address[1:]
mine, kept = socket.socketpair()
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [kept.fileno()]))]
    sock.sendmsg([b"FDSTORE=1\\nFDNAME=kept\\nFDPOLL=0"], rights, 0, address)
kept.close()
print("stored", flush=True)
signal.pause()
"""


def test_a_reload_that_removes_a_unit_closes_what_its_workers_stored(
    supervisor, tmp_path: Path
) -> None:
    keeper = f"""
        service:
          exec: [{PYTHON}, -c, {json.dumps(STORE_ONE_FD)}]
          fd-store-max: 4
        """
    stays = f"""
        service:
          exec: [{PYTHON}, -c, "import signal; signal.pause()"]
        """
    sup = supervisor({"keeper": keeper, "stays": stays})
    stored = sup.wait_for("fd_stored", unit="keeper", fdname="kept")
    target = fd_target(sup.pid, stored["fd"])
    with RawClient(sup.monitor_path).negotiate() as client:
        owners = [(f["owner"], f["fdname"]) for f in client.command("query-fds")["return"]]
        assert ("service:keeper", "kept") in owners
        (tmp_path / "units" / "keeper.yaml").unlink()
        mark = sup.mark()
        assert "return" in client.command("reload")
        sup.wait_for("reloaded", after=mark)
        closed = sup.wait_for("fd_store_removed", after=mark, owner="service:keeper")
        assert closed["fdname"] == "kept" and closed["reason"] == "its unit was removed by reload"
        event = next_event(client, "FD_CLOSED")
        assert event["data"] == {"fdname": "kept", "owner": "service:keeper"}
        owners = [(f["owner"], f["fdname"]) for f in client.command("query-fds")["return"]]
        assert not [o for o in owners if o[0] == "service:keeper"], owners
        services = [s["unit"] for s in client.command("query-services")["return"]]
        assert services == ["stays"]
    assert target not in fd_targets(sup.pid).values(), "the stored fd is still open"
    stops_cleanly(sup)


def fd_target(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def fd_targets(pid: int) -> dict[int, str]:
    result = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            result[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
    return result


def next_event(client: RawClient, name: str) -> dict[str, Any]:
    """The next event called ``name`` the client receives (within its socket timeout)."""
    while True:
        message = client.read()
        if message.get("event") == name:
            return message


# -- what the unit directory may hold (item 11) ---------------------------------------------

MIB = 1 << 20


def plant(kind: str, path: Path) -> str:
    """Put an attacker's ``*.yaml`` at ``path``; returns the error expected for it."""
    if kind == "fifo":
        os.mkfifo(path)
        return f"{path}: is a FIFO, not a regular file: only regular files are read as units"
    if kind == "/dev/zero":
        path.symlink_to("/dev/zero")
        return (
            f"{path}: is a character device (through a symbolic link), not a regular file: "
            "only regular files are read as units"
        )
    with path.open("wb") as file:  # a valid start, then comments past the limit
        file.write(b"service:\n  exec: [/bin/true]\n")
        file.write(b"#" * (MIB + 1 - file.tell() - 1) + b"\n")
    return f"{path}: too large ({MIB + 1} bytes): a unit file may be at most 1 MiB ({MIB} bytes)"


KINDS = ["fifo", "/dev/zero", "1 MiB + 1"]
QUICK = f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, -c, "import signal; signal.pause()"]
    """


@pytest.mark.parametrize("kind", KINDS)
def test_check_refuses_what_is_not_a_small_regular_file_at_once(tmp_path: Path, kind: str) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "good.yaml").write_text(textwrap.dedent(QUICK))
    expected = plant(kind, units / "bad.yaml")
    # it used to hang (FIFO), grow without bound (/dev/zero) or take minutes
    checked = run_fdsupervisor("check", str(units), timeout=10)
    assert checked.returncode == 1
    assert checked.stderr == f"fdsupervisor: {expected}\n"


@pytest.mark.parametrize("kind", KINDS)
def test_start_refuses_it_with_nothing_bound(supervisor, tmp_path: Path, kind: str) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "good.yaml").write_text(textwrap.dedent(QUICK))
    expected = plant(kind, units / "bad.yaml")
    sup = supervisor(wait_ready=False)
    assert sup.proc.wait(10) == 1
    sup.wait_output(expected)
    assert sup.count("socket_bound") == 0 and sup.count("worker_started") == 0


@pytest.mark.parametrize("kind", KINDS)
def test_reload_refuses_it_and_running_services_are_untouched(
    supervisor, tmp_path: Path, kind: str
) -> None:
    sup = supervisor({"good": QUICK})
    pid = sup.wait_for("worker_started", unit="good")["pid"]
    expected = plant(kind, tmp_path / "units" / "bad.yaml")
    with RawClient(sup.monitor_path, timeout=5).negotiate() as client:
        refused = client.command("reload")["error"]["desc"]
        assert refused == f"reload refused, nothing was changed: {expected}"
        mark = sup.mark()
        os.kill(sup.pid, signal.SIGHUP)
        assert sup.wait_for("reload_failed", after=mark)["error"] == expected
        services = client.command("query-services")["return"]
    assert [(s["unit"], s["state"], s["pids"]) for s in services] == [("good", "running", [pid])]
    stops_cleanly(sup)


# -- fds a monitor client makes the supervisor hold (item 8) --------------------------------

SCM_MAX_FD = 253
BUDGET_AT_1024 = 256  # a quarter of RLIMIT_NOFILE 1024


def nofile(sup: SupervisorProcess, limit: int) -> None:
    """The supervisor at RLIMIT_NOFILE ``limit`` (soft and hard: no way back up), the
    figure of the issue's attacks."""
    resource.prlimit(sup.pid, resource.RLIMIT_NOFILE, (limit, limit))


def test_four_clients_holding_253_fds_each_leave_room_for_the_next_client(supervisor) -> None:
    sup = supervisor({"good": QUICK})
    read_end, write_end = os.pipe()
    with RawClient(sup.monitor_path).negotiate() as probe:
        settle(probe)
        baseline = len(open_fds(sup.pid))
    nofile(sup, 1024)
    holders = [RawClient(sup.monitor_path).negotiate() for _ in range(4)]
    try:
        for holder in holders:
            holder.send(b" ", [read_end] * SCM_MAX_FD)  # 253 fds, never claimed
            settle(holder)
        with RawClient(sup.monitor_path, timeout=5) as fifth:  # it used to get no greeting
            assert fifth.greeting["QMP"]["capabilities"] == []
            fifth.negotiate()
            assert fifth.command("query-services")["return"][0]["state"] == "running"
            clients = len(holders) + 1 - 1  # the holders and the fifth; the probe has gone
            held = len(open_fds(sup.pid)) - baseline - clients
            assert held == SCM_MAX_FD, "only the first batch fits the budget of 256"
        for holder in holders[1:]:
            refused = holder.command("getfd", fdname="mine")["error"]["desc"]
            assert refused == (
                "A file descriptor was sent but could not be received: the monitor's "
                f"clients would hold {2 * SCM_MAX_FD} file descriptors together "
                f"(at most {BUDGET_AT_1024}); try again later"
            )
        assert sup.wait_count("monitor_fds_refused", 3) == 3, "one warning per client"
        assert holders[0].command("getfd", fdname="mine") == {"return": {}}
        assert holders[0].command("closefd", fdname="mine") == {"return": {}}
    finally:
        for holder in holders:
            holder.close()
    with RawClient(sup.monitor_path).negotiate() as probe:
        settle(probe)
        assert len(open_fds(sup.pid)) == baseline
    os.close(read_end)
    os.close(write_end)
    stops_cleanly(sup)


def test_3000_unread_fd_retrieve_replies_hold_at_most_253_fds(supervisor) -> None:
    """The unread-output limit counts bytes, 16 per reply: 3,000 replies held 3,000 fds."""
    sup = supervisor({"good": QUICK})
    read_end, write_end = os.pipe()
    with RawClient(sup.monitor_path).negotiate() as probe:
        settle(probe)
        baseline = len(open_fds(sup.pid))
    nofile(sup, 1024)
    with RawClient(sup.monitor_path).negotiate() as attacker:
        assert attacker.command("getfd", fds=[read_end], fdname="x") == {"return": {}}
        command = json.dumps({"execute": "fd-retrieve", "arguments": {"fdname": "x"}})
        attacker.send(command.encode() * 3000)  # and not one reply read
        warned = sup.wait_for("monitor_fds_refused", command="fd-retrieve", timeout=10)
        assert "this client would hold 254 file descriptors (at most 253)" in warned["reason"]
        with RawClient(sup.monitor_path, timeout=5).negotiate() as bystander:
            settle(bystander)
            # less the probe that has gone, plus the stored fd and the two clients
            held = len(open_fds(sup.pid)) - (baseline - 1) - 3
            assert held <= SCM_MAX_FD, f"{held} fds held for the attacker"
            # the budget of 256 leaves the bystander room for its own retrieve
            assert bystander.command("fd-retrieve", fdname="x") == {"return": {}}
            assert len(bystander.fds) == 1
            os.close(bystander.fds.pop())
        replies = [attacker.reply() for _ in range(3000)]
        successes = [r for r in replies if "return" in r]
        errors = {r["error"]["desc"] for r in replies if "error" in r}
        assert len(successes) >= SCM_MAX_FD and len(attacker.fds) == len(successes)
        assert errors == {
            "fd-retrieve refused: this client would hold 254 file descriptors (at most 253): "
            "claim them with getfd or read the fd-retrieve replies first"
        }
        for fd in attacker.fds:
            os.close(fd)
        assert attacker.command("closefd", fdname="x") == {"return": {}}
    with RawClient(sup.monitor_path).negotiate() as probe:
        settle(probe)
        assert len(open_fds(sup.pid)) == baseline
    os.close(read_end)
    os.close(write_end)
    stops_cleanly(sup)


def test_the_soft_fd_limit_is_raised_to_the_hard_limit_at_start(supervisor) -> None:
    """As systemd raises its own (main.c, bump_rlimit_nofile()); logged with the figure."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= 1024 and hard != resource.RLIM_INFINITY:
        pytest.skip("the hard RLIMIT_NOFILE leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # what the child inherits
    try:
        sup = supervisor({"good": QUICK})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    raised = sup.wait_for("fd_limit")
    assert raised["raised_from"] == 1024
    now = resource.prlimit(sup.pid, resource.RLIMIT_NOFILE)
    assert raised["soft"] == now[0] == (hard if hard != resource.RLIM_INFINITY else now[1])
    assert now[0] > 1024
    stops_cleanly(sup)
