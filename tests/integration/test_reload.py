"""Reload (SIGHUP and the monitor's reload) under live traffic: keep every fd that can be kept."""

from __future__ import annotations

import os
import signal
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPORT_WORKER, open_fds, report_from
from tests.monitor_client import RawClient


def unit_text(port_line: str, env: str = "1", extra: str = "") -> str:
    return textwrap.dedent(f"""
        sockets:
          http: {{{port_line}}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          environment: {{APP_VERSION: "{env}"}}
          restart: always
        {extra}
        """)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def steady_clients(ports: list[int], seconds: float = 30.0) -> Iterator[dict[str, int]]:
    """Connect to each port in a loop (bounded) until the block ends; count outcomes."""
    outcome = {"ok": 0, "refused": 0, "other": 0}
    stop = threading.Event()

    def loop(port: int) -> None:
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                report_from("127.0.0.1", port)
                outcome["ok"] += 1
            except ConnectionRefusedError:
                outcome["refused"] += 1
            except (OSError, ValueError):
                outcome["other"] += 1

    threads = [threading.Thread(target=loop, args=(p,)) for p in ports]
    for thread in threads:
        thread.start()
    try:
        yield outcome
    finally:
        stop.set()
        for thread in threads:
            thread.join(seconds + 5)


def test_sighup_applies_the_difference_and_refuses_nothing(supervisor, tmp_path: Path) -> None:
    units = tmp_path / "units"
    changed, same = free_port(), free_port()
    sup = supervisor(
        {
            "changed": unit_text(f'listen: "127.0.0.1:{changed}"'),
            "same": unit_text(f'listen: "127.0.0.1:{same}"'),
            "removed": unit_text('listen: "unix:removed.sock"'),
        }
    )
    old = {u: sup.wait_for("worker_started", unit=u)["pid"] for u in ("changed", "same")}
    with steady_clients([changed, same]) as outcome:
        (units / "changed.yaml").write_text(unit_text(f'listen: "127.0.0.1:{changed}"', env="2"))
        (units / "same.yaml").write_text(unit_text(f'listen: "127.0.0.1:{same}"'))
        (units / "removed.yaml").unlink()
        (units / "added.yaml").write_text(unit_text('listen: "unix:added.sock"'))
        mark = sup.mark()
        os.kill(sup.pid, signal.SIGHUP)
        sup.wait_for("reloaded", after=mark, timeout=30)
        after = report_from("127.0.0.1", changed)
    assert outcome["refused"] == 0 and outcome["other"] == 0, outcome
    assert outcome["ok"] > 0
    assert report_from("127.0.0.1", same)["pid"] == old["same"], "unchanged: same worker"
    assert after["pid"] != old["changed"] and after["env"]["APP_VERSION"] == "2"
    assert not (units / "removed.sock").exists()
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(units / "added.sock"))
        assert b'"pid"' in client.recv(65536)


def test_a_bad_unit_changes_nothing(supervisor, tmp_path: Path) -> None:
    units = tmp_path / "units"
    port = free_port()
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{port}"')})
    pid = sup.wait_for("worker_started")["pid"]
    (units / "web.yaml").write_text(unit_text(f'listen: "127.0.0.1:{port}"', env="2"))
    (units / "broken.yaml").write_text("sockets:\n  s:\n    listen: 'nope'\nservice: {exec: [x]}\n")
    with RawClient(sup.monitor_path).negotiate() as client:
        reply = client.command("reload")
    desc = reply["error"]["desc"]
    assert desc.startswith("reload refused, nothing was changed")
    assert "broken.yaml:3:13: sockets.s.listen" in desc
    assert report_from("127.0.0.1", port)["pid"] == pid
    assert sup.count("reload_failed") == 1


def test_a_unit_whose_user_does_not_exist_is_refused_by_reload(supervisor, tmp_path: Path) -> None:
    """SIGHUP with a unit whose user: is not in the user database (and an edit beside it):
    refused with the unit file's FILE:LINE:COL, nothing changed, the running unit serves on."""
    units = tmp_path / "units"
    port = free_port()
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{port}"')})
    pid = sup.wait_for("worker_started")["pid"]
    (units / "web.yaml").write_text(unit_text(f'listen: "127.0.0.1:{port}"', env="2"))
    (units / "other.yaml").write_text(
        f"service:\n  exec: [{PYTHON}, {REPORT_WORKER}]\n  user: nosuchuser\n"
    )
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGHUP)
    failed = sup.wait_for("reload_failed", after=mark)
    assert (
        f"{units / 'other.yaml'}:3:9: service.user: unknown user 'nosuchuser'" in (failed["error"])
    )
    assert sup.count("reloading") == 0
    served = report_from("127.0.0.1", port)
    assert (served["pid"], served["env"]["APP_VERSION"]) == (pid, "1")
    with RawClient(sup.monitor_path).negotiate() as client:
        assert [s["unit"] for s in client.command("query-services")["return"]] == ["web"]


def test_rebind_backlog_and_monitor_reload(supervisor, tmp_path: Path) -> None:
    units = tmp_path / "units"
    port = free_port()
    sup = supervisor(
        {
            "moving": unit_text('listen: "unix:one.sock"'),
            "backlog": unit_text(f'listen: "127.0.0.1:{port}", backlog: 16'),
        }
    )
    backlog_pid = sup.wait_for("worker_started", unit="backlog")["pid"]
    (units / "moving.yaml").write_text(unit_text('listen: "unix:two.sock"'))
    (units / "backlog.yaml").write_text(unit_text(f'listen: "127.0.0.1:{port}", backlog: 64'))
    mark = sup.mark()
    with RawClient(sup.monitor_path).negotiate() as client:
        reply = client.command("reload")
    assert "1 relistened" in reply["return"]["summary"]
    assert "1 rebound" in reply["return"]["summary"]
    sup.wait_for("reloaded", after=mark)
    assert not (units / "one.sock").exists() and (units / "two.sock").exists()
    assert report_from("127.0.0.1", port)["pid"] == backlog_pid


def test_fd_count_is_stable_over_20_reloads(supervisor, tmp_path: Path) -> None:
    units = tmp_path / "units"
    port = free_port()
    sup = supervisor(
        {
            "web": unit_text(f'listen: "127.0.0.1:{port}"'),
            "side": unit_text('listen: "unix:side.sock"'),
        }
    )
    sup.wait_for("worker_started", unit="web")
    sup.wait_for("worker_started", unit="side")
    baseline = open_fds(sup.pid)
    for i in range(20):
        (units / "web.yaml").write_text(unit_text(f'listen: "127.0.0.1:{port}"', env=str(i)))
        mark = sup.mark()
        os.kill(sup.pid, signal.SIGHUP)
        sup.wait_for("reloaded", after=mark)
        # a changed service rolls: its old worker stops once the new one started
        sup.wait_for("worker_exited", unit="web", after=mark)
    assert report_from("127.0.0.1", port)["env"]["APP_VERSION"] == "19"
    assert open_fds(sup.pid) == baseline


def two_socket_unit(http_port: int, admin_port: int) -> str:
    return textwrap.dedent(f"""
        sockets:
          http: {{listen: "127.0.0.1:{http_port}"}}
          admin: {{listen: "127.0.0.1:{admin_port}"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          restart: always
        """)


def admin_inode(client: RawClient) -> int:
    """The inode of web's socket 'admin', through a duplicate the monitor sends back."""
    reply = client.command("fd-retrieve", fdname="admin", owner="unit:web")
    assert reply == {"return": {}}, reply
    fd = client.fds.pop()
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def add_admin_socket(sup, port: int) -> int:
    """socket-add id=admin unit=web on 127.0.0.1:port; returns the socket's inode."""
    with RawClient(sup.monitor_path).negotiate() as client:
        addr = {"type": "inet", "host": "127.0.0.1", "port": str(port)}
        reply = client.command("socket-add", id="admin", unit="web", addr=addr)
        assert reply == {"return": {}}, reply
        return admin_inode(client)


def reload_and_wait(sup) -> dict:
    mark = sup.mark()
    with RawClient(sup.monitor_path).negotiate() as client:
        reply = client.command("reload")
    assert "return" in reply, reply
    sup.wait_for("reloaded", after=mark)
    return reply["return"]


def test_a_runtime_socket_made_permanent_is_adopted(supervisor, tmp_path: Path) -> None:
    http, admin = free_port(), free_port()
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{http}"')})
    old_pid = sup.wait_for("worker_started", unit="web")["pid"]
    inode = add_admin_socket(sup, admin)
    (tmp_path / "units" / "web.yaml").write_text(two_socket_unit(http, admin))
    mark = sup.mark()
    summary = reload_and_wait(sup)["summary"]
    assert "1 adopted" in summary and "0 bound" in summary, summary
    new_pid = sup.wait_for("worker_started", unit="web", after=mark)["pid"]
    assert new_pid != old_pid, "the fd layout changed: a new worker"
    served = report_from("127.0.0.1", admin)
    assert served["pid"] == new_pid and served["listen_fdnames"] == "http:admin"
    assert report_from("127.0.0.1", http)["pid"] == new_pid
    with RawClient(sup.monitor_path).negotiate() as client:
        assert admin_inode(client) == inode, "the same socket serves: nothing rebound"
        (web,) = client.command("query-services")["return"]
        assert web["state"] == "running" and web["pids"] == [new_pid]
    assert sup.count("internal_error") == 0


def test_a_runtime_socket_declared_elsewhere_is_replaced(supervisor, tmp_path: Path) -> None:
    http, added, declared = free_port(), free_port(), free_port()
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{http}"')})
    sup.wait_for("worker_started", unit="web")
    inode = add_admin_socket(sup, added)
    (tmp_path / "units" / "web.yaml").write_text(two_socket_unit(http, declared))
    mark = sup.mark()
    summary = reload_and_wait(sup)["summary"]
    assert "1 rebound" in summary and "adopted" not in summary, summary
    new_pid = sup.wait_for("worker_started", unit="web", after=mark)["pid"]
    served = report_from("127.0.0.1", declared)
    assert served["pid"] == new_pid and served["listen_fdnames"] == "http:admin"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", added), timeout=5).close()
    with RawClient(sup.monitor_path).negotiate() as client:
        assert admin_inode(client) != inode
        (web,) = client.command("query-services")["return"]
        assert web["state"] == "running" and web["pids"] == [new_pid]
    assert sup.count("internal_error") == 0
