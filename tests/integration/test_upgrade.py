"""Upgrade in place (SIGUSR2, the monitor's upgrade): same pid, same workers, same fds.

A new program that fails before it is ready falls back to the handed-over units
(issue 9, item 5); the handled signals are blocked across the exec (item 6).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PYTHON, REPORT_WORKER, SPAWN_PATHS, open_fds, report_from
from tests.integration.test_reload import free_port, steady_clients, unit_text
from tests.monitor_client import RawClient


def settled_fd_count(sup) -> int:
    """The supervisor's fd count with one probe client, once earlier clients are gone.

    Two round trips: whatever was ready before the first reply (another
    client's EOF) was handled before the second.
    """
    with RawClient(sup.monitor_path).negotiate() as probe:
        probe.command("query-version")
        probe.command("query-version")
        return len(open_fds(sup.pid))


def test_sigusr2_hands_everything_over_under_load(supervisor, tmp_path: Path) -> None:
    port = free_port()
    sup = supervisor(
        {
            "web": unit_text(f'listen: "127.0.0.1:{port}"', extra="  instances: 2"),
            "local": unit_text('listen: "unix:local.sock"'),
        }
    )
    workers = sorted(sup.wait_for("worker_started", unit="web", instance=i)["pid"] for i in (0, 1))
    local_pid = sup.wait_for("worker_started", unit="local")["pid"]
    kept, kept_peer = socket.socketpair()
    with RawClient(sup.monitor_path).negotiate() as client:
        assert client.command("getfd", fds=[kept.fileno()], fdname="kept") == {"return": {}}
    kept.close()
    inode = os.fstat(kept_peer.fileno()).st_ino
    fds_before = settled_fd_count(sup)
    with steady_clients([port]) as outcome:
        mark = sup.mark()
        os.kill(sup.pid, signal.SIGUSR2)
        upgraded = sup.wait_for("upgraded", after=mark, timeout=30)
        served = report_from("127.0.0.1", port)
    assert outcome["refused"] == 0 and outcome["other"] == 0, outcome
    assert upgraded["pid"] == sup.pid and sup.proc.poll() is None
    assert served["pid"] in workers, "the same workers serve on"
    with RawClient(sup.monitor_path).negotiate() as client:
        services = {s["unit"]: s for s in client.command("query-services")["return"]}
        assert sorted(services["web"]["pids"]) == workers
        assert services["local"]["pids"] == [local_pid]
        assert client.command("fd-retrieve", fdname="kept") == {"return": {}}
        assert os.fstat(client.fds[0]).st_ino != inode  # our end vs. the stored end ...
        kept_peer.sendall(b"x")
        assert socket.socket(fileno=client.fds[0]).recv(1) == b"x"  # ... of the same pair
    assert settled_fd_count(sup) == fds_before
    # still supervised by the new program: a killed worker is reaped and replaced
    mark = sup.mark()
    os.kill(workers[0], signal.SIGKILL)
    exited = sup.wait_for("worker_exited", pid=workers[0], after=mark)
    assert exited["status"] == "signal SIGKILL"
    assert sup.wait_for("worker_started", after=mark)["pid"] not in workers
    assert (tmp_path / "units" / "local.sock").exists()
    kept_peer.close()
    assert sup.stop() == 0
    assert not (tmp_path / "units" / "local.sock").exists(), "files still removed at the end"


def test_monitor_upgrade_command(supervisor) -> None:
    port = free_port()
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{port}"')})
    pid = sup.wait_for("worker_started")["pid"]
    mark = sup.mark()
    with RawClient(sup.monitor_path).negotiate() as client:
        client.send(b'{"execute": "upgrade"}')
        with pytest.raises((EOFError, ConnectionResetError)):
            client.reply()  # the process was replaced: the connection ends, no reply
    sup.wait_for("upgraded", after=mark)
    with RawClient(sup.monitor_path).negotiate() as client:
        assert client.command("query-services")["return"][0]["pids"] == [pid]


def test_failed_upgrade_leaves_the_old_supervisor_running(supervisor, tmp_path: Path) -> None:
    port = free_port()
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{port}"')})
    pid = sup.wait_for("worker_started")["pid"]
    (tmp_path / "units" / "broken.yaml").write_text("sockets: [this is not a mapping]\n")
    with RawClient(sup.monitor_path).negotiate() as client:
        reply = client.command("upgrade")
    assert reply["error"]["desc"].startswith("upgrade refused, still running")
    assert "broken.yaml" in reply["error"]["desc"]
    assert sup.count("upgraded") == 0
    assert report_from("127.0.0.1", port)["pid"] == pid


# --------------------------------------------------------------------------- a failed new program


def web_with_extra(port: int, extra: str) -> str:
    """web on its port plus a new socket ``extra`` (listen: ``extra``), as an edit adds it."""
    return textwrap.dedent(f"""
        sockets:
          http: {{listen: "127.0.0.1:{port}"}}
          extra: {{listen: "{extra}"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          restart: always
        """)


def observed(sup) -> dict[str, Any]:
    """What a failed upgrade must not change: the store, the workers, the fd count."""
    with RawClient(sup.monitor_path).negotiate() as client:
        fds = sorted(client.command("query-fds")["return"], key=lambda f: (f["owner"], f["fdname"]))
        services = {
            s["unit"]: sorted(s["pids"]) for s in client.command("query-services")["return"]
        }
    return {"fds": fds, "pids": services, "fd_count": settled_fd_count(sup)}


def two_units(sup_factory, **kwargs: Any) -> tuple[Any, int, dict[str, Any]]:
    port = free_port()
    sup = sup_factory(
        {
            "web": unit_text(f'listen: "127.0.0.1:{port}"', extra="  instances: 2"),
            "local": unit_text('listen: "unix:local.sock"'),
        },
        **kwargs,
    )
    for unit, instance in (("web", 0), ("web", 1), ("local", 0)):
        sup.wait_for("worker_started", unit=unit, instance=instance)
    return sup, port, observed(sup)


def upgrade_falls_back(sup) -> dict[str, Any]:
    """SIGUSR2; the new program fails and runs the handed-over units: its upgrade_failed."""
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGUSR2)
    sup.wait_for("upgrade_rolled_back", after=mark, timeout=30)
    failed = sup.wait_for("upgrade_failed", after=mark)
    assert failed["note"] == "carrying on with the handed-over units"
    assert sup.count("upgraded") == 0 and sup.proc.poll() is None
    assert not [line for line in sup.output if "nothing was bound" in line]
    return failed


def still_supervised(sup, port: int, before: dict[str, Any]) -> None:
    """Same workers serving, same store, same fd count; and a worker's death is still handled."""
    assert observed(sup) == before
    assert report_from("127.0.0.1", port)["pid"] in before["pids"]["web"]
    victim = before["pids"]["web"][0]
    mark = sup.mark()
    os.kill(victim, signal.SIGKILL)
    sup.wait_for("worker_exited", pid=victim, after=mark)
    assert (
        sup.wait_for("worker_started", unit="web", after=mark)["pid"] not in before["pids"]["web"]
    )


def test_a_new_socket_on_a_port_in_use_falls_back(supervisor, tmp_path: Path) -> None:
    sup, port, before = two_units(supervisor)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        (tmp_path / "units" / "web.yaml").write_text(web_with_extra(port, f"127.0.0.1:{busy}"))
        failed = upgrade_falls_back(sup)
    assert "socket extra" in failed["error"] and "Address already in use" in failed["error"]
    still_supervised(sup, port, before)


def test_a_symlink_at_a_new_unix_path_falls_back(supervisor, tmp_path: Path) -> None:
    sup, port, before = two_units(supervisor)
    target = tmp_path / "precious"
    target.write_text("root's file\n")
    (tmp_path / "units" / "extra.sock").symlink_to(target)
    (tmp_path / "units" / "web.yaml").write_text(web_with_extra(port, "unix:extra.sock"))
    failed = upgrade_falls_back(sup)
    assert "socket extra" in failed["error"] and "symbolic link" in failed["error"]
    assert (tmp_path / "units" / "extra.sock").is_symlink()
    assert target.read_text() == "root's file\n"
    still_supervised(sup, port, before)


def test_a_deleted_monitor_socket_file_is_bound_again(supervisor) -> None:
    sup, port, before = two_units(supervisor)
    sup.monitor_path.unlink()
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGUSR2)
    recreated = sup.wait_for("monitor_recreated", after=mark, timeout=30)
    assert recreated["problem"] == "the monitor socket file is gone"
    sup.wait_for("upgraded", after=mark)
    assert stat.S_IMODE(os.stat(sup.monitor_path).st_mode) == 0o600
    assert observed(sup) == before, "the monitor answers again; nothing else changed"
    assert report_from("127.0.0.1", port)["pid"] in before["pids"]["web"]
    assert sup.stop() == 0
    assert not sup.monitor_path.exists()


NEW_CODE_FAILS = """
import os

if os.environ.get("FDSUPERVISOR_HANDOVER_FD"):
    from fdsupervisor import handover

    restore = handover.Handover.restore_services
    calls = []

    def fails(self, state):
        # the real work first (pidfds opened, signals and notify socket set up), then a bug
        restore(self, state)
        calls.append(1)
        if len(calls) <= {failures}:
            raise RuntimeError("new code fails as it runs")

    handover.Handover.restore_services = fails
"""


def test_new_code_that_fails_as_it_runs_falls_back(supervisor, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    sup, port, before = two_units(supervisor, env={"PYTHONPATH": str(site)})
    (site / "sitecustomize.py").write_text(NEW_CODE_FAILS.format(failures=1))
    failed = upgrade_falls_back(sup)
    assert failed["error"] == "RuntimeError: new code fails as it runs"
    assert "new code fails as it runs" in failed["exception"], "with its traceback"
    still_supervised(sup, port, before)
    (site / "sitecustomize.py").unlink()
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGUSR2)
    sup.wait_for("upgraded", after=mark, timeout=30)  # once fixed, the upgrade goes through


def test_when_the_fallback_fails_too_it_says_so_and_exits_1(supervisor, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    sup, port, before = two_units(supervisor, env={"PYTHONPATH": str(site)})
    (site / "sitecustomize.py").write_text(NEW_CODE_FAILS.format(failures=2))
    os.kill(sup.pid, signal.SIGUSR2)
    gave_up = sup.wait_for("upgrade_fallback_failed", timeout=30)
    try:
        assert sup.proc.wait(15) == 1
        assert "no supervisor is left" in gave_up["note"]
        # orphaned, not killed: they hold their sockets and serve on
        assert report_from("127.0.0.1", port)["pid"] in before["pids"]["web"]
    finally:
        for pids in before["pids"].values():
            for pid in pids:  # started (through the supervisor) by this test
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- signals across the exec


def events_after(sup, mark: int, name: str) -> list[int]:
    with sup._cond:
        return [i for i, e in enumerate(sup.events) if i >= mark and e.get("event") == name]


def signal_through_the_upgrade(sup, signum: int) -> tuple[int, int]:
    """SIGUSR2, then ``signum`` every 3 ms from ``upgrading`` until ``upgraded`` (bounded).

    Returns the event index where the upgrade started and how many signals were sent.
    """
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGUSR2)
    sup.wait_for("upgrading", after=mark, timeout=30)
    sent, deadline = 0, time.monotonic() + 20
    while (
        not events_after(sup, mark, "upgraded")
        and sup.proc.poll() is None
        and time.monotonic() < deadline
    ):
        os.kill(sup.pid, signum)
        sent += 1
        time.sleep(0.003)  # the pace of the sender, not a synchronisation
    return mark, sent


def test_sighup_right_after_the_exec_is_a_reload_not_a_death(supervisor) -> None:
    port = free_port()
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{port}"')})
    pid = sup.wait_for("worker_started")["pid"]
    mark, sent = signal_through_the_upgrade(sup, signal.SIGHUP)
    assert sup.proc.poll() is None, f"killed by SIGHUP: {sup.proc.returncode}"
    assert sent > 3, "signals were sent while the new program started"
    (upgraded,) = events_after(sup, mark, "upgraded")
    sup.wait_for("reloaded", after=upgraded)  # the pending SIGHUP took effect
    assert report_from("127.0.0.1", port)["pid"] == pid


def test_sigterm_right_after_the_exec_stops_cleanly(supervisor, tmp_path: Path) -> None:
    sup = supervisor({"local": unit_text('listen: "unix:local.sock"')})
    sup.wait_for("worker_started")
    mark, sent = signal_through_the_upgrade(sup, signal.SIGTERM)
    assert sent > 0
    assert sup.proc.wait(20) == 0, "stopped cleanly, not killed by SIGTERM"
    assert events_after(sup, mark, "upgraded") and events_after(sup, mark, "stopped")
    assert sup.wait_for("shutting_down", after=mark)["reason"] == "SIGTERM"
    assert not (tmp_path / "units" / "local.sock").exists()


def pending_restart_unit(port: int, stdout: str) -> str:
    return textwrap.dedent(f"""
        sockets:
          http: {{listen: "127.0.0.1:{port}"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          restart: always
          restart-delay: 60s
          stdout: {stdout}
        """)


def blocked_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("SigBlk:"):
                return int(line.split()[1], 16)
    raise AssertionError("no SigBlk")


@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_workers_started_while_signals_are_blocked_get_an_empty_mask(
    supervisor, spawn_env: dict[str, str]
) -> None:
    # each spawn path empties the mask in the child: the C one (clone) and os.fork()'s
    units = {"inherits": pending_restart_unit(free_port(), "inherit")}
    units["quiet"] = pending_restart_unit(free_port(), "null")
    sup = supervisor(units, env=spawn_env)
    for name in units:
        pid = sup.wait_for("worker_started", unit=name)["pid"]
        os.kill(pid, signal.SIGKILL)
        assert sup.wait_for("worker_exited", pid=pid)["restart_in"] == 60
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGUSR2)
    # the restarts were due: the new program starts them before it unblocks signals
    started = [sup.wait_for("worker_started", unit=name, after=mark) for name in units]
    first_upgraded = sup.wait_for("upgraded", after=mark)
    assert all(sup.events.index(e) < sup.events.index(first_upgraded) for e in started)
    for event in started:
        assert blocked_signals(event["pid"]) == 0, event["unit"]
    # "upgraded" is logged just before the new program unblocks its signals: a SIGHUP
    # handled (a reload) shows the unblocking is done, then the whole mask must be empty.
    reload_mark = sup.mark()
    os.kill(sup.pid, signal.SIGHUP)
    sup.wait_for("reloaded", after=reload_mark)
    assert blocked_signals(sup.pid) == 0, "the supervisor unblocked them once ready"


def test_sigusr2_during_the_upgrade_asks_for_that_upgrade(supervisor) -> None:
    port = free_port()
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{port}"')})
    pid = sup.wait_for("worker_started")["pid"]
    mark, sent = signal_through_the_upgrade(sup, signal.SIGUSR2)
    assert sup.proc.poll() is None, f"killed by SIGUSR2: {sup.proc.returncode}"
    assert sent > 3
    first_done = events_after(sup, mark, "upgraded")[0]
    with RawClient(sup.monitor_path).negotiate() as client:
        # two round trips: whatever was pending at the unblock has been handled
        client.command("query-version")
        upgrading = events_after(sup, mark, "upgrading")
        # Every SIGUSR2 sent while the upgrade ran asked for that upgrade. The
        # sender stops once it reads `upgraded`, so one may still land after the
        # new program unblocked signals: a new request, for one upgrade more.
        assert upgrading[0] < first_done
        assert len(upgrading) <= 2 and all(i > first_done for i in upgrading[1:]), upgrading
        if len(upgrading) == 2:
            sup.wait_for("upgraded", after=upgrading[1], timeout=30)
        assert client.command("query-services")["return"][0]["pids"] == [pid]
