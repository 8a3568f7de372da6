"""Socket activation proper: on-demand start and one instance per connection."""

from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import PYTHON, REPORT_WORKER, connect_and_read, report_from

ACCEPT_WORKER = (
    "import os, socket, json\n"
    "conn = socket.socket(fileno=3)\n"
    "conn.sendall(json.dumps({'pid': os.getpid(), 'fds': os.environ['LISTEN_FDS'],"
    " 'names': os.environ['LISTEN_FDNAMES'], 'listen_pid': os.environ['LISTEN_PID'],"
    " 'remote': [os.environ.get('REMOTE_ADDR'), os.environ.get('REMOTE_PORT')],"
    " 'instance': os.environ.get('APP_INSTANCE'), 'peer': list(conn.getpeername())}).encode())\n"
)
INETD_WORKER = (
    "import os, sys\nline = sys.stdin.readline()\nsys.stdout.write(f'{os.getpid()} got {line}')\n"
)
HOLD_WORKER = "import socket; c = socket.socket(fileno=3); c.sendall(b'hello'); c.recv(1)"


def test_accept_mode_one_process_per_connection(supervisor) -> None:
    sup = supervisor(
        {
            "perconn": f"""
        sockets:
          http: {{listen: "127.0.0.1:0", backlog: 256}}
        service:
          exec: [{PYTHON}, -c, {json.dumps(ACCEPT_WORKER)}]
          environment: {{APP_INSTANCE: "{{instance}}"}}
          accept: true
          max-connections: 8
        """
        }
    )
    port = sup.port("http")
    assert sup.count("worker_started") == 0

    def one(_: int) -> dict[str, object]:
        return dict(json.loads(connect_and_read("127.0.0.1", port)))

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(200)))
    pids = {r["pid"] for r in replies}
    assert len(pids) == 200, "each connection had its own process"
    assert all(r["fds"] == "1" and r["names"] == "connection" for r in replies)
    assert all(r["listen_pid"] == str(r["pid"]) for r in replies)
    instances = sorted(int(str(r["instance"])) for r in replies)
    assert instances == list(range(200))


def test_accept_sets_remote_addr_and_port(supervisor) -> None:
    sup = supervisor(
        {
            "perconn": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, {json.dumps(ACCEPT_WORKER)}]
          accept: true
        """
        }
    )
    with socket.create_connection(("127.0.0.1", sup.port("http")), timeout=10) as conn:
        local_port = conn.getsockname()[1]
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    reply = json.loads(data)
    assert reply["remote"] == ["127.0.0.1", str(local_port)]


def test_inetd_mode_uses_stdin_and_stdout(supervisor) -> None:
    sup = supervisor(
        args=[
            "--listen",
            "line=127.0.0.1:0",
            "--accept",
            "--inetd",
            "--",
            PYTHON,
            "-c",
            INETD_WORKER,
        ]
    )
    port = sup.port("line")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"ping\n")
            conn.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        pid, rest = data.decode().split(" ", 1)
        assert rest == "got ping\n"
        assert int(pid) > 0


def test_over_max_connections_waits_in_the_backlog(supervisor) -> None:
    sup = supervisor(
        {
            "limited": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, {json.dumps(HOLD_WORKER)}]
          accept: true
          max-connections: 2
        """
        }
    )
    port = sup.port("http")
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    for conn in held:
        assert conn.recv(5) == b"hello"
    waiting = socket.create_connection(("127.0.0.1", port), timeout=10)  # not refused
    waiting.settimeout(0.5)
    try:
        waiting.recv(5)
        raise AssertionError("a third instance ran despite max-connections: 2")
    except TimeoutError:
        pass
    mark = sup.mark()
    held[0].close()  # its instance reads EOF and exits ...
    sup.wait_for("worker_exited", after=mark)
    waiting.settimeout(10)
    assert waiting.recv(5) == b"hello"  # ... and the waiting connection gets one
    for conn in [*held[1:], waiting]:
        conn.close()


def test_fifty_concurrent_first_connections_are_all_served(supervisor) -> None:
    sup = supervisor(
        {
            "lazy": f"""
        sockets:
          http: {{listen: "127.0.0.1:0", backlog: 128}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          activation: on-demand
        """
        }
    )
    port = sup.port("http")
    assert sup.count("worker_started") == 0
    assert sup.wait_for("ready")["event"] == "ready"
    barrier = threading.Barrier(50)

    def first(_: int) -> int:
        barrier.wait(10)
        return int(report_from("127.0.0.1", port)["pid"])

    with ThreadPoolExecutor(50) as pool:
        pids = list(pool.map(first, range(50)))
    assert len(set(pids)) == 1, "one worker started and served them all"
    assert sup.count("worker_started") == 1


def test_on_demand_datagram_and_seqpacket(supervisor, tmp_path: Path) -> None:
    sup = supervisor(
        {
            "dgram": f"""
        sockets:
          d: {{listen: "127.0.0.1:0", kind: datagram}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          activation: on-demand
        """,
            "seq": f"""
        sockets:
          s: {{listen: "unix:seq.sock", kind: seqpacket}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          activation: on-demand
        """,
        }
    )
    assert sup.count("worker_started") == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(10)
        client.sendto(b"wake", ("127.0.0.1", sup.port("d")))
        assert b'"listen_fdnames": "d"' in client.recvfrom(65536)[0]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
        client.settimeout(10)
        client.connect(str(tmp_path / "units" / "seq.sock"))
        assert b'"listen_fdnames": "s"' in client.recv(65536)
    assert sup.count("worker_started") == 2


def test_on_demand_watches_again_after_the_worker_exits(supervisor) -> None:
    once = (
        "import socket, os\n"
        "s = socket.socket(fileno=3)\n"
        "c, _ = s.accept(); c.sendall(str(os.getpid()).encode()); c.close()\n"
    )
    sup = supervisor(
        {
            "lazy": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, {json.dumps(once)}]
          activation: on-demand
          restart: on-failure
        """
        }
    )
    port = sup.port("http")
    first = int(connect_and_read("127.0.0.1", port))
    sup.wait_for("worker_exited", pid=first)
    second = int(connect_and_read("127.0.0.1", port))
    assert second != first
    assert sup.count("worker_started") == 2
