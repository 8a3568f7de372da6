"""Upgrade in place (SIGUSR2, the monitor's upgrade): same pid, same workers, same fds."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import open_fds, report_from
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
