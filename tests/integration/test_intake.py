"""Intake control in accept mode (SPEC section 10): per-source limits, unix peer credentials.

Real sockets and real workers: each connection's worker sends its REMOTE_*
variables as JSON and holds the connection until the client closes it, so
connections are concurrent for as long as the test keeps them open.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.conftest import PYTHON
from tests.integration.test_monitor import qmp_session

# Tells the client its REMOTE_* variables, then waits for the client's end.
HOLD = (
    "import json, os, socket\n"
    "c = socket.socket(fileno=3)\n"
    "env = {k: v for k, v in os.environ.items() if k.startswith('REMOTE_')}\n"
    "c.sendall((json.dumps(env) + '\\n').encode())\n"
    "while c.recv(1024): pass\n"
)


def unit(listen: str, per_source: int, extra: str = "") -> str:
    return f"""
    sockets:
      conn:
        listen: {listen}
        max-connections-per-source: {per_source}
        {extra}
    service:
      accept: true
      exec: [{PYTHON}, -c, {json.dumps(HOLD)}]
    """


def first_line(conn: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def served(conn: socket.socket) -> dict[str, Any]:
    line = first_line(conn)
    assert line, "the connection was closed without a reply"
    return dict(json.loads(line))


def test_past_the_limit_a_source_is_closed_at_once_and_the_others_served(supervisor) -> None:
    limit = 2
    sup = supervisor({"web": unit('"127.0.0.1:0"', limit)})
    port = sup.port("conn")
    held = []
    try:
        for _ in range(limit):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            held.append(conn)
            assert served(conn)["REMOTE_ADDR"] == "127.0.0.1"
        # the N+1st from the same IP: closed at once, counted
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(extra)
        refused = sup.wait_for("connection_refused", unit="web")
        assert (refused["source"], refused["limit"], refused["refused_total"]) == (
            "127.0.0.1",
            limit,
            1,
        )
        try:
            assert first_line(extra) == b""
        except ConnectionResetError:
            pass
        # another source is served meanwhile
        other = socket.socket()
        held.append(other)
        other.settimeout(10)
        other.bind(("127.0.0.2", 0))
        other.connect(("127.0.0.1", port))
        assert served(other)["REMOTE_ADDR"] == "127.0.0.2"
        # one of the first source's connections ends: that source is served again
        mark = sup.mark()
        held[0].close()
        sup.wait_for("worker_exited", unit="web", after=mark)
        again = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.append(again)
        assert served(again)["REMOTE_ADDR"] == "127.0.0.1"
        assert sup.count("connection_refused", unit="web") == 1
    finally:
        for conn in held:
            conn.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (tmp_path is root's, 0700)."""
    top = Path(tempfile.mkdtemp(prefix="fdsup-intake-"))
    try:
        top.chmod(0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def connect_as_nobody(path: Path) -> dict[str, Any]:
    """What the worker tells a client that runs as nobody, with its own pid."""
    client = (
        "import os, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "line = s.makefile().readline()\n"
        "print(os.getpid(), line, end='')\n"
    )
    nobody = pwd.getpwnam("nobody")
    result = subprocess.run(
        ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
         PYTHON, "-c", client, str(path)],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    pid, _, line = result.stdout.partition(" ")
    return {"client_pid": pid, **json.loads(line)}


@pytest.mark.skipif(os.geteuid() != 0, reason="a client as nobody needs root")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")
def test_a_unix_peers_credentials_and_its_uid_as_the_source(supervisor, shared_dir: Path) -> None:
    path = shared_dir / "web.sock"
    sup = supervisor({"web": unit(json.dumps(f"unix:{path}"), 1, 'mode: "0666"')})
    sup.wait_for("socket_bound", unit="web")
    nobody = pwd.getpwnam("nobody")
    held = socket.socket(socket.AF_UNIX)
    try:
        held.settimeout(10)
        held.connect(str(path))
        mine = served(held)
        assert mine == {
            "REMOTE_PID": str(os.getpid()),
            "REMOTE_UID": "0",
            "REMOTE_GID": str(os.getgid()),
        }
        # root is at its limit of 1: its next connection is closed at once ...
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(10)
        with extra:
            extra.connect(str(path))
            refused = sup.wait_for("connection_refused", unit="web")
            assert refused["source"] == "uid:0"
        # ... while nobody, another uid, is served, with its own credentials
        theirs = connect_as_nobody(path)
        assert theirs["REMOTE_UID"] == str(nobody.pw_uid)
        assert theirs["REMOTE_GID"] == str(nobody.pw_gid)
        assert theirs["REMOTE_PID"] == theirs["client_pid"]
    finally:
        held.close()


REPLY = "import socket\nsocket.socket(fileno=3).sendall(b'served\\n')\n"


def test_a_burst_past_the_trigger_limit_is_served_in_full_with_a_pause(supervisor) -> None:
    burst, total = 3, 7
    sup = supervisor(
        {
            "web": f"""
            sockets:
              conn:
                listen: "127.0.0.1:0"
                trigger-limit: {{interval: 1s, burst: {burst}}}
            service:
              accept: true
              exec: [{PYTHON}, -c, {json.dumps(REPLY)}]
            """
        }
    )
    port = sup.port("conn")

    def burst_of_connections() -> list[bytes]:
        # all at once: they wait in the backlog while the socket is paused
        conns = [socket.create_connection(("127.0.0.1", port), timeout=15) for _ in range(total)]
        try:
            return [first_line(conn) for conn in conns]
        finally:
            for conn in conns:
                conn.close()

    async def steps(client: QMPClient) -> tuple[list[bytes], list[Any]]:
        seen: list[Any] = []
        with client.listener() as listener:
            replies = await asyncio.to_thread(burst_of_connections)
            async for event in listener:
                if event["event"].startswith("SOCKET_"):
                    seen.append(event)
                if event["event"] == "SOCKET_RESUMED" and len(seen) >= 4:
                    break
        return replies, seen

    replies, events = asyncio.run(asyncio.wait_for(qmp_session(sup.monitor_path, steps), 20))
    assert replies == [b"served\n"] * total  # nothing refused
    assert [(e["event"], e["data"]) for e in events] == [
        (name, {"unit": "web", "socket": "conn"})
        for name in ("SOCKET_PAUSED", "SOCKET_RESUMED") * 2
    ]
    paused = sup.wait_for("socket_paused", unit="web", socket="conn")
    assert (paused["burst"], paused["interval"]) == (burst, 1.0)
    sup.wait_for("socket_resumed", unit="web", socket="conn")
    # 7 accepts at 3 per window: paused twice (after the 3rd and the 6th)
    assert sup.wait_count("socket_paused", 2, unit="web") == 2
    assert sup.count("connection_refused") == 0


def test_on_demand_activations_past_the_trigger_limit_pause_the_socket(supervisor) -> None:
    """A worker that never takes its connection: each exit re-activates at once, but not faster
    than the trigger-limit allows (the connection waits in the backlog meanwhile)."""
    sup = supervisor(
        {
            "web": f"""
            sockets:
              conn:
                listen: "127.0.0.1:0"
                trigger-limit: {{interval: 1s, burst: 2}}
            service:
              activation: on-demand
              restart: "no"
              exec: [{shutil.which("true") or "/bin/true"}]
            """
        }
    )
    port = sup.port("conn")
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        paused = sup.wait_for("socket_paused", unit="web", socket="conn")
        assert sup.count("worker_started", unit="web") == 2
        resumed = sup.wait_for("socket_resumed", unit="web", socket="conn")
        assert resumed["timestamp"] > paused["timestamp"]
        sup.wait_count("worker_started", 3, unit="web")
        assert sup.count("worker_started", unit="web") >= 3


def test_a_flood_past_the_limit_writes_a_bounded_log(supervisor) -> None:
    """The peer decides how often it is refused: the warnings are rate limited (journald's rule)."""
    from fdsupervisor.log import LOG_RATE_BURST

    sup = supervisor({"web": unit('"127.0.0.1:0"', 1)})
    port = sup.port("conn")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
        served(held)
        for _ in range(LOG_RATE_BURST + 5):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:
                try:
                    assert first_line(extra) == b""
                except ConnectionResetError:
                    pass
        # another source, after the flood on the same socket: served, so the flood was handled
        with socket.socket() as other:
            other.settimeout(10)
            other.bind(("127.0.0.2", 0))
            other.connect(("127.0.0.1", port))
            assert served(other)["REMOTE_ADDR"] == "127.0.0.2"
        # its worker_started comes after the refusals on the same log pipe
        assert sup.wait_count("worker_started", 2, unit="web") == 2
        assert sup.count("connection_refused", unit="web") == LOG_RATE_BURST
        last = [e for e in sup.events if e.get("event") == "connection_refused"][-1]
        assert last["refused_total"] == LOG_RATE_BURST
