"""Real supervisors, real workers: what a worker inherits, and nothing more."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPORT_WORKER, connect_and_read, report_from


def two_socket_unit(tmp_path: Path) -> str:
    return f"""
        sockets:
          http:
            listen: "127.0.0.1:0"
          admin:
            listen: {{type: unix, path: run/admin.sock}}
            mode: "0600"
        service:
          exec: [{PYTHON}, {REPORT_WORKER}, "--listen-fd={{fd:http}}", "{{instance}}", "{{other}}"]
          environment:
            APP_ADMIN_FD: "{{fd:admin}}"
            APP_PLAIN: "plain value"
          working-directory: {tmp_path}
        """


def test_worker_gets_its_sockets_names_and_own_pid(supervisor, tmp_path: Path) -> None:
    sup = supervisor(
        {"web": two_socket_unit(tmp_path)},
        env={
            "LISTEN_FDNAMES": "supervisors-own",
            "WATCHDOG_USEC": "1",
            "APP_FROM_SUPERVISOR": "inherited",
        },
    )
    started = sup.wait_for("worker_started", unit="web")
    report = report_from("127.0.0.1", sup.port("http"))
    assert report["pid"] == started["pid"]
    assert report["listen_pid"] == str(report["pid"])
    assert report["listen_fds"] == "2"
    assert report["listen_fdnames"] == "http:admin"
    assert report["names"] == {"3": "http", "4": "admin"}
    assert report["argv"] == ["--listen-fd=3", "0", "{other}"]
    assert report["env"]["APP_ADMIN_FD"] == "4"
    assert report["env"]["APP_PLAIN"] == "plain value"
    assert report["env"]["APP_FROM_SUPERVISOR"] == "inherited"
    assert "WATCHDOG_USEC" not in report["env"]
    assert report["cwd"] == str(tmp_path)
    assert report["pgid"] == report["pid"], "each worker leads its own process group"
    admin = tmp_path / "units" / "run" / "admin.sock"
    assert oct(admin.stat().st_mode & 0o777) == "0o600"
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(str(admin))
        assert b'"pid"' in conn.recv(65536)


def test_only_stdio_and_the_sockets_reach_a_worker(supervisor, tmp_path: Path) -> None:
    sup = supervisor({"web": two_socket_unit(tmp_path)})
    report = report_from("127.0.0.1", sup.port("http"))
    assert report["open_fds"] == [0, 1, 2, 3, 4]
    # and /proc agrees from the outside, while the worker runs: 3 and 4 are its
    # sockets, and anything above is the worker's own (its selector's epoll fd)
    pid = report["pid"]
    targets = {int(n): os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
    assert targets[3].startswith("socket:") and targets[4].startswith("socket:")
    assert {n: t for n, t in targets.items() if n > 4} == {5: "anon_inode:[eventpoll]"}
    assert len(os.listdir(f"/proc/{sup.pid}/fd")) > 5, "the supervisor holds more than it passes"


def test_clear_environment(supervisor, tmp_path: Path) -> None:
    sup = supervisor(
        {
            "web": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          clear-environment: true
          environment: {{APP_ONLY: "1"}}
        """
        },
        env={"APP_FROM_SUPERVISOR": "x"},
    )
    report = report_from("127.0.0.1", sup.port("http"))
    notify_socket = report["env"].pop("NOTIFY_SOCKET")
    assert re.fullmatch(r"@fdsupervisor/notify/[0-9a-f]{32}", notify_socket), notify_socket
    assert report["env"] == {
        "APP_ONLY": "1",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "http",
        "LISTEN_PID": str(report["pid"]),
    }


def test_instances_share_the_sockets(supervisor) -> None:
    sup = supervisor(
        {
            "web": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}, "{{instance}}"]
          instances: 3
        """
        }
    )
    pids = {sup.wait_for("worker_started", instance=i)["pid"] for i in range(3)}
    assert len(pids) == 3
    port = sup.port("http")
    seen: set[int] = set()
    for _ in range(200):
        seen.add(report_from("127.0.0.1", port)["pid"])
        if seen == pids:
            break
    assert seen <= pids and seen


UID_WORKER = (
    "import os, socket; s = socket.socket(fileno=3)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(f'{os.getuid()} {os.getgid()} {os.getgroups()}'.encode()); c.close()"
)


@pytest.mark.skipif(
    os.getuid() != 0 or not os.path.exists("/usr/bin/python3"),
    reason="switching user needs root, and a python that nobody may run",
)
def test_user_and_group(supervisor) -> None:
    import grp
    import json
    import pwd

    sup = supervisor(
        {
            "web": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [/usr/bin/python3, -c, {json.dumps(UID_WORKER)}]
          user: nobody
          group: nogroup
          working-directory: /
        """
        }
    )
    uid, gid, groups = connect_and_read("127.0.0.1", sup.port("http")).decode().split(" ", 2)
    assert int(uid) == pwd.getpwnam("nobody").pw_uid
    assert int(gid) == grp.getgrnam("nogroup").gr_gid
    assert "0" not in groups.strip("[]").split(", "), "root's groups were dropped"


def test_command_line_unit(supervisor) -> None:
    sup = supervisor(
        args=["--listen", "http=127.0.0.1:0", "--", PYTHON, REPORT_WORKER, "--fd={fd:http}"]
    )
    report = report_from("127.0.0.1", sup.port("http"))
    assert report["argv"] == ["--fd=3"]
    assert report["listen_fdnames"] == "http"


def test_on_demand_starts_on_first_connection(supervisor) -> None:
    sup = supervisor(
        {
            "lazy": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          activation: on-demand
        """
        }
    )
    port = sup.port("http")
    assert sup.count("worker_started") == 0
    report = report_from("127.0.0.1", port)
    assert sup.wait_for("worker_started")["pid"] == report["pid"]


def test_missing_program_fails_the_service_but_not_the_others(supervisor) -> None:
    sup = supervisor(
        {
            "broken": """
            sockets:
              http: {listen: "127.0.0.1:0"}
            service:
              exec: [/nonexistent/program]
            """,
            "fine": f"""
            sockets:
              http: {{listen: "127.0.0.1:0"}}
            service:
              exec: [{PYTHON}, {REPORT_WORKER}]
            """,
        }
    )
    failed = sup.wait_for("worker_start_failed", unit="broken")
    assert "/nonexistent/program" in failed["error"]
    assert report_from("127.0.0.1", sup.port("http", unit="fine"))["listen_fds"] == "1"
    # the broken unit's socket stays bound: a connection is queued, not refused
    with socket.create_connection(("127.0.0.1", sup.port("http", unit="broken")), timeout=5):
        pass


def test_datagram_and_seqpacket_sockets(supervisor, tmp_path: Path) -> None:
    sup = supervisor(
        {
            "multi": f"""
        sockets:
          dgram:
            listen: "127.0.0.1:0"
            kind: datagram
          seq:
            listen: {{type: unix, path: seq.sock}}
            kind: seqpacket
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          working-directory: {tmp_path}
        """
        }
    )
    port = sup.port("dgram")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(b"hi", ("127.0.0.1", port))
        data, _ = client.recvfrom(65536)
    assert b'"listen_fdnames": "dgram:seq"' in data
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
        client.settimeout(10)
        client.connect(str(tmp_path / "units" / "seq.sock"))
        assert b'"listen_fds": "2"' in client.recv(65536)


def test_echo_example_worker(supervisor, tmp_path: Path) -> None:
    from tests.conftest import ECHO_WORKER

    sup = supervisor(
        {
            "echo": f"""
        sockets:
          echo: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, {ECHO_WORKER}]
        """
        }
    )
    started = sup.wait_for("worker_started")
    with socket.create_connection(("127.0.0.1", sup.port("echo")), timeout=10) as conn:
        conn.sendall(b"hello\n")
        assert conn.recv(100) == f"{started['pid']} hello\n".encode()


OUTPUT_WORKER = (
    "import socket, sys\n"
    "print('to stdout', flush=True)\n"
    "print('to stderr', file=sys.stderr, flush=True)\n"
    "s = socket.socket(fileno=3)\n"
    "while True:\n"
    "    c, _ = s.accept(); c.sendall(b'done'); c.close()\n"
)


def test_stdout_and_stderr_go_where_the_unit_says(supervisor, tmp_path: Path) -> None:
    import json

    log = tmp_path / "units" / "logs" / "out.log"
    log.parent.mkdir(parents=True)
    log.write_text("earlier line\n")
    sup = supervisor(
        {
            "quiet": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, {json.dumps(OUTPUT_WORKER)}]
          stdout: append:logs/out.log
          stderr: null
        """
        }
    )
    with socket.create_connection(("127.0.0.1", sup.port("http")), timeout=10) as conn:
        assert conn.recv(4) == b"done"  # the worker printed before it accepted
    assert log.read_text() == "earlier line\nto stdout\n"
    assert not any("to stderr" in line or "to stdout" in line for line in sup.output)
