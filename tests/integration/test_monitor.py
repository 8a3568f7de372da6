"""The QMP monitor through real clients: qemu.qmp (async and legacy) and raw bytes with fds."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from tests.conftest import PYTHON, REPORT_WORKER, open_fds, report_from
from tests.monitor_client import MONITOR_COMMANDS, RawClient

WEB = f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, {REPORT_WORKER}]
      restart: always
      restart-delay: 0
    """


def listening(kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


async def qmp_session(path: Path, steps: Any) -> Any:
    client = QMPClient("test")
    await asyncio.wait_for(client.connect(str(path)), 10)
    try:
        return await asyncio.wait_for(steps(client), 30)
    finally:
        await client.disconnect()


def test_greeting_and_query_version_with_qemu_qmp(supervisor) -> None:
    sup = supervisor({"web": WEB})

    async def steps(client: QMPClient) -> Any:
        assert client.greeting is not None
        greeting = client.greeting._asdict()["QMP"]
        assert greeting["version"]["qemu"] == {"major": 0, "minor": 0, "micro": 0}
        assert greeting["version"]["package"].startswith("fdsupervisor ")
        assert greeting["capabilities"] == []
        return await client.execute("query-version")

    version = asyncio.run(qmp_session(sup.monitor_path, steps))
    assert version["package"].startswith("fdsupervisor ")


def test_query_commands_lists_exactly_the_commands_it_answers(supervisor) -> None:
    """query-commands from a live supervisor is SPEC 5's list, and each one is dispatched.

    Each listed command (but qmp_capabilities, refused once negotiated) is sent
    with an argument it does not take: the schema check answers before any
    handler runs, so nothing is reloaded or upgraded, and a name the table
    lacks would answer CommandNotFound instead.
    """
    sup = supervisor({"web": WEB})
    with RawClient(sup.monitor_path).negotiate() as client:
        listed = [item["name"] for item in client.command("query-commands")["return"]]
        assert sorted(listed) == sorted(MONITOR_COMMANDS)
        assert len(listed) == len(set(listed))
        for name in listed:
            if name == "qmp_capabilities":
                continue
            error = client.command(name, **{"no-such-argument": 1})["error"]
            assert error["class"] == "GenericError", (name, error)
            assert error["desc"].startswith("Parameter '"), (name, error)
        unknown = client.command("query-no-such-thing")["error"]
        assert unknown == {
            "class": "CommandNotFound",
            "desc": "The command query-no-such-thing has not been found",
        }


def test_getfd_query_fds_closefd_round_trip(supervisor) -> None:
    sup = supervisor({"web": WEB})
    sock = listening()
    port = sock.getsockname()[1]
    inode = os.fstat(sock.fileno()).st_ino

    async def steps(client: QMPClient) -> Any:
        client.send_fd_scm(sock.fileno())
        await client.execute("getfd", {"fdname": "extra"})
        fds = await client.execute("query-fds")
        await client.execute("closefd", {"fdname": "extra"})
        after = await client.execute("query-fds")
        with pytest.raises(ExecuteError) as missing:
            await client.execute("closefd", {"fdname": "extra"})
        return fds, after, missing.value

    fds, after, missing = asyncio.run(qmp_session(sup.monitor_path, steps))
    sock.close()
    mine = [f for f in fds if f["owner"] == "monitor"]
    assert mine[0].pop("inode") == inode
    assert mine == [
        {
            "fdname": "extra",
            "owner": "monitor",
            "family": "inet",
            "kind": "stream",
            "listening": True,
            "address": f"127.0.0.1:{port}",
        }
    ]
    assert any(f["owner"] == "unit:web" and f["fdname"] == "http" for f in fds)
    assert not [f for f in after if f["owner"] == "monitor"]
    assert missing.error_class == "GenericError"
    assert missing.error.error.desc == "File descriptor named 'extra' not found"


def test_qemu_texts_for_bad_getfd_and_unknown_commands(supervisor) -> None:
    sup = supervisor({"web": WEB})
    sock = listening()

    async def steps(client: QMPClient) -> Any:
        errors = {}
        client.send_fd_scm(sock.fileno())
        for name, args in [
            ("getfd", {"fdname": "3abc"}),
            ("nope", None),
            ("getfd", {"fdname": "no-fd"}),
        ]:
            try:
                await client.execute(name, args)
            except ExecuteError as exc:
                errors[(name, str(args))] = (exc.error_class, exc.error.error.desc)
        return errors

    errors = asyncio.run(qmp_session(sup.monitor_path, steps))
    sock.close()
    assert errors[("getfd", "{'fdname': '3abc'}")] == (
        "GenericError",
        "Parameter 'fdname' expects a name not starting with a digit",
    )
    assert errors[("nope", "None")] == ("CommandNotFound", "The command nope has not been found")
    # the fd sent before the refused getfd is still held... then consumed? QEMU 7.2 checks
    # the name before it takes the fd, so the held fd waits for the next getfd:
    assert ("getfd", "{'fdname': 'no-fd'}") not in errors


def test_getfd_without_an_fd(supervisor) -> None:
    sup = supervisor({"web": WEB})
    with RawClient(sup.monitor_path).negotiate() as client:
        reply = client.command("getfd", fdname="x")
    assert reply["error"] == {
        "class": "GenericError",
        "desc": "No file descriptor supplied via SCM_RIGHTS",
    }


def test_legacy_sync_client(supervisor) -> None:
    sup = supervisor({"web": WEB})
    sock = listening()
    qmp = QEMUMonitorProtocol(str(sup.monitor_path))
    try:
        qmp.connect()
        qmp.send_fd_scm(sock.fileno())
        assert qmp.cmd_obj({"execute": "getfd", "arguments": {"fdname": "legacy"}}) == {
            "return": {}
        }
        names = [f["fdname"] for f in qmp.cmd_obj({"execute": "query-fds"})["return"]]
        assert "legacy" in names
        services = qmp.cmd_obj({"execute": "query-services"})["return"]
    finally:
        qmp.close()
        sock.close()
    assert services[0]["unit"] == "web"
    assert services[0]["state"] == "running"
    assert set(services[0]) == {
        "unit",
        "state",
        "pids",
        "started",
        "restarts",
        "last-exit",
        "status",
    }


def test_fd_retrieve_returns_the_same_socket(supervisor) -> None:
    sup = supervisor({"web": WEB})
    sock = listening()
    inode = os.fstat(sock.fileno()).st_ino
    with RawClient(sup.monitor_path).negotiate() as client:
        assert client.command("getfd", fds=[sock.fileno()], fdname="back") == {"return": {}}
        sock.close()
        assert client.command("fd-retrieve", fdname="back") == {"return": {}}
        assert len(client.fds) == 1
        assert os.fstat(client.fds[0]).st_ino == inode
        assert client.command("fd-retrieve", fdname="back", remove=True) == {"return": {}}
        assert "error" in client.command("fd-retrieve", fdname="back")
        # a unit's socket can be retrieved (not removed) by naming its owner
        assert client.command("fd-retrieve", fdname="http", owner="unit:web") == {"return": {}}
        for fd in client.fds:
            os.close(fd)


def test_socket_added_with_a_named_fd_reaches_the_next_worker(supervisor) -> None:
    sup = supervisor({"web": WEB})
    first = sup.wait_for("worker_started")
    sock = listening()
    port = sock.getsockname()[1]

    async def steps(client: QMPClient) -> Any:
        client.send_fd_scm(sock.fileno())
        await client.execute("getfd", {"fdname": "extra"})
        await client.execute(
            "socket-add", {"id": "extra", "unit": "web", "addr": {"type": "fd", "str": "extra"}}
        )
        fds = await client.execute("query-fds")
        sockets = await client.execute("query-sockets")
        await client.execute("service-restart", {"unit": "web"})
        return fds, sockets

    mark = sup.mark()
    fds, sockets = asyncio.run(qmp_session(sup.monitor_path, steps))
    sock.close()
    assert not [f for f in fds if f["owner"] == "monitor"], "the named fd left the monitor"
    assert {
        "id": "extra",
        "unit": "web",
        "address": f"127.0.0.1:{port}",
        "kind": "stream",
    }.items() <= next(s for s in sockets if s["id"] == "extra").items()
    second = sup.wait_for("worker_started", after=mark)
    assert second["pid"] != first["pid"]
    report = report_from("127.0.0.1", port)
    assert report["names"] == {"3": "http", "4": "extra"}
    assert report["pid"] == second["pid"]


def test_seed_rule_in_monitor_commands(supervisor) -> None:
    sup = supervisor({"web": WEB})
    with RawClient(sup.monitor_path).negotiate() as client:
        reply = client.command("socket-add", id="x", addr={"type": "fd", "str": "3"})
        assert "FD numbers are not permitted in monitor commands" in reply["error"]["desc"]
        reply = client.command("socket-add", id="x", addr={"type": "fd", "str": "missing"})
        assert reply["error"]["desc"] == "File descriptor named 'missing' not found"
        # a named fd that is not listening is refused and stays in the store
        idle = socket.socket()
        idle.bind(("127.0.0.1", 0))
        client.command("getfd", fds=[idle.fileno()], fdname="idle")
        idle.close()
        reply = client.command("socket-add", id="x", addr={"type": "fd", "str": "idle"})
        assert "not listening" in reply["error"]["desc"]
        names = [f["fdname"] for f in client.command("query-fds")["return"]]
        assert "idle" in names


def test_socket_add_bind_and_del(supervisor) -> None:
    sup = supervisor({"web": WEB})
    with RawClient(sup.monitor_path).negotiate() as client:
        assert client.command(
            "socket-add", id="spare", addr={"type": "inet", "host": "127.0.0.1", "port": "0"}
        ) == {"return": {}}
        sockets = client.command("query-sockets")["return"]
        spare = next(s for s in sockets if s["id"] == "spare")
        assert spare["unit"] is None and spare["kind"] == "stream"
        assert isinstance(spare["fd"], int)
        in_use = client.command("socket-del", id="http")
        assert "in use by unit 'web'" in in_use["error"]["desc"]
        assert client.command("socket-del", id="spare") == {"return": {}}
        ids = [s["id"] for s in client.command("query-sockets")["return"]]
        assert ids == ["http"]


def test_socket_del_refuses_only_what_a_running_worker_holds(supervisor) -> None:
    """SPEC 5: a worker started before socket-add never got the socket, so it may go."""
    sup = supervisor({"web": WEB})
    first = sup.wait_for("worker_started", unit="web")["pid"]
    inet = {"type": "inet", "host": "127.0.0.1", "port": "0"}
    with RawClient(sup.monitor_path).negotiate() as client:
        assert client.command("socket-add", id="late", addr=inet, unit="web") == {"return": {}}
        assert client.command("socket-del", id="late") == {"return": {}}
        assert client.command("socket-add", id="late", addr=inet, unit="web") == {"return": {}}
        mark = sup.mark()
        assert client.command("service-restart", unit="web") == {"return": {}}
        second = sup.wait_for("worker_started", after=mark, unit="web")["pid"]
        sup.wait_for("worker_exited", pid=first)
        refused = client.command("socket-del", id="late")["error"]["desc"]
        assert refused == (
            f"socket 'late' is in use by unit 'web' (held by running pids {second}); "
            "stop the service first"
        )
        assert "late" in [s["id"] for s in client.command("query-sockets")["return"]]


def test_service_commands_and_events(supervisor) -> None:
    sup = supervisor({"web": WEB})
    first = sup.wait_for("worker_started")

    async def steps(client: QMPClient) -> Any:
        seen: list[Any] = []
        with client.listener() as listener:
            await client.execute("service-stop", {"unit": "web"})
            async for event in listener:
                seen.append(event)
                if event["event"] == "SERVICE_EXITED":
                    break
            stopped = await client.execute("query-services")
            await client.execute("service-start", {"unit": "web"})
            async for event in listener:
                seen.append(event)
                if event["event"] == "SERVICE_STARTED":
                    break
        running = await client.execute("query-services")
        with pytest.raises(ExecuteError) as unknown:
            await client.execute("service-start", {"unit": "nope"})
        return seen, stopped, running, unknown.value

    seen, stopped, running, unknown = asyncio.run(qmp_session(sup.monitor_path, steps))
    exited = next(e for e in seen if e["event"] == "SERVICE_EXITED")
    assert exited["data"]["pid"] == first["pid"]
    assert exited["data"]["signal"] == 15
    assert set(exited["timestamp"]) == {"seconds", "microseconds"}
    assert stopped[0]["state"] == "inactive" and stopped[0]["pids"] == []
    assert running[0]["state"] == "running" and len(running[0]["pids"]) == 1
    assert "unit 'nope' not found" in unknown.error.error.desc


def test_bad_input_gets_errors_and_harms_nothing(supervisor) -> None:
    sup = supervisor({"web": WEB})
    worker = sup.wait_for("worker_started")["pid"]
    with RawClient(sup.monitor_path) as early, RawClient(sup.monitor_path).negotiate() as bystander:
        reply = early.command("query-fds")
        assert reply["error"]["class"] == "CommandNotFound"
        early.negotiate()
        kept = listening()
        bystander.command("getfd", fds=[kept.fileno()], fdname="kept")
        kept.close()
        for garbage in [
            b"{nope}",
            b"[1, 2]",
            b'"text"',
            b'{"execute": 5}',
            b'{"execute": "getfd", "arguments": {"fdname": 7}}',
            b'{"execute": "getfd"}',
            b'{"execute": "query-fds", "bogus": 1}',
            b'{"execute": "socket-add", "arguments": {"id": "x", "addr": "nope"}}',
        ]:
            early.send(garbage)
            reply = early.reply()
            assert reply["error"]["class"] == "GenericError", (garbage, reply)
        early.send(
            b'{"execute": "query-version", "id": "big", "arguments": {"pad": "'
            + b"x" * (2 << 20)
            + b'"}}'
        )
        reply = early.reply()
        assert reply["error"]["class"] == "GenericError"
        assert early.command("query-version")["return"]["package"].startswith("fdsupervisor")
        assert "kept" in [f["fdname"] for f in bystander.command("query-fds")["return"]]
    assert report_from("127.0.0.1", sup.port("http"))["pid"] == worker


def test_fds_of_an_older_batch_and_of_a_dropped_client_are_closed(supervisor) -> None:
    sup = supervisor({"web": WEB})
    older, older_peer = socket.socketpair()
    newer, newer_peer = socket.socketpair()
    dropped, dropped_peer = socket.socketpair()
    with RawClient(sup.monitor_path).negotiate() as client:
        client.send(b" ", [older.fileno()])
        client.send(b" ", [newer.fileno()])
        older.close()
        newer.close()
        older_peer.settimeout(10)
        assert older_peer.recv(1) == b"", "the unconsumed older batch was closed"
        assert client.command("getfd", fdname="newest") == {"return": {}}
    with RawClient(sup.monitor_path).negotiate() as client:
        client.send(b" ", [dropped.fileno()])
        dropped.close()
        client.command("query-version")
    dropped_peer.settimeout(10)
    assert dropped_peer.recv(1) == b"", "held fds are closed when the client goes"
    newer_peer.close()
    older_peer.close()
    dropped_peer.close()


def test_fd_count_is_stable_over_1000_rounds(supervisor) -> None:
    sup = supervisor({"web": WEB})
    sup.wait_for("worker_started")
    probe = RawClient(sup.monitor_path).negotiate()

    def settle() -> list[int]:
        # Two round trips on a client that stays: whatever was ready before the
        # first reply (a dropped client's EOF) was handled before the second.
        probe.command("query-version")
        probe.command("query-version")
        return open_fds(sup.pid)

    with RawClient(sup.monitor_path).negotiate() as warm:
        warm.command("query-fds")
    baseline = settle()
    sock = listening()
    with RawClient(sup.monitor_path).negotiate() as client:
        for i in range(1000):
            client.command("getfd", fds=[sock.fileno()], fdname=f"fd{i % 7}")
            client.command("closefd", fdname=f"fd{i % 7}")
            if i % 10 == 0:
                client.send(b'{"execute": ')
                client.send(b"42}")
                client.reply()
                client.send(b" ", [sock.fileno(), sock.fileno()])
            if i % 50 == 0:
                dropped = RawClient(sup.monitor_path)
                dropped.send(b" ", [sock.fileno()])
                dropped.send(b'{"execute": "qmp_capab')
                dropped.close()
    sock.close()
    assert settle() == baseline
    probe.close()


def test_limits_on_clients_and_stored_fds(supervisor, tmp_path: Path) -> None:
    sup = supervisor({"web": WEB}, args=["--max-stored-fds", "3", str(tmp_path / "units")])
    sock = listening()
    clients = [RawClient(sup.monitor_path) for _ in range(64)]
    try:
        with pytest.raises(EOFError):
            extra = RawClient(sup.monitor_path)  # the 65th: told why, then closed
            extra.read()
        refused = socket.socket(socket.AF_UNIX)
        refused.settimeout(10)
        refused.connect(str(sup.monitor_path))
        assert b"too many monitor clients (64)" in refused.recv(4096)
        refused.close()
        client = clients[0].negotiate()
        for i in range(3):
            assert client.command("getfd", fds=[sock.fileno()], fdname=f"f{i}") == {"return": {}}
        full = client.command("getfd", fds=[sock.fileno()], fdname="f3")
        assert "the fd store is full (3 fds)" in full["error"]["desc"]
        # replacing an existing name is not growth, and the unit's socket never counted
        assert client.command("getfd", fds=[sock.fileno()], fdname="f0") == {"return": {}}
    finally:
        for c in clients:
            c.close()
        sock.close()
    with RawClient(sup.monitor_path).negotiate() as client:
        assert len(client.command("query-fds")["return"]) == 4


def test_a_flooding_client_is_throttled_and_others_are_served(supervisor) -> None:
    sup = supervisor({"web": WEB})
    flood = socket.socket(socket.AF_UNIX)
    flood.connect(str(sup.monitor_path))
    flood.setblocking(False)
    command = b'{"execute": "qmp_capabilities"}' + b'{"execute": "query-commands"}' * 2000
    sent = 0
    for _ in range(200):  # bounded: we never read a reply, so the server must stop reading
        try:
            sent += flood.send(command)
        except BlockingIOError:
            break
    else:
        raise AssertionError("the supervisor kept reading from a client that never reads")
    with RawClient(sup.monitor_path).negotiate() as other:
        assert other.command("query-version")["return"]["package"].startswith("fdsupervisor")
    status = Path(f"/proc/{sup.pid}/status").read_text()
    rss_kib = int(
        next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    )
    assert rss_kib < 200_000, f"supervisor RSS {rss_kib} KiB while a client floods"
    flood.close()
    with RawClient(sup.monitor_path).negotiate() as other:
        assert "return" in other.command("query-fds")


SLOW_TO_STOP = """
    sockets:
      http: {listen: "127.0.0.1:0"}
    service:
      # the worker's own behaviour: it takes half a second to exit on SIGTERM
      exec: [/bin/sh, -c, 'trap "sleep 0.5; exit 0" TERM; sleep 100 & wait']
    """


def test_a_start_while_the_service_stops_starts_it_once_the_old_worker_is_gone(
    supervisor,
) -> None:
    """service-stop, then service-start before the worker is gone: as systemd queues a start
    job behind a stop job, the new worker starts once the old one has exited."""
    sup = supervisor({"web": SLOW_TO_STOP})
    first = sup.wait_for("worker_started")["pid"]
    with RawClient(sup.monitor_path).negotiate() as client:
        mark = sup.mark()
        assert client.command("service-stop", unit="web") == {"return": {}}
        assert client.command("service-start", unit="web") == {"return": {}}
        assert client.command("query-services")["return"][0]["pids"] == [first]  # still stopping
        exited = sup.wait_for("worker_exited", pid=first, after=mark)
        second = sup.wait_for("worker_started", after=mark)["pid"]
        assert second != first and sup.events.index(exited) < sup.events.index(
            sup.wait_for("worker_started", pid=second)
        )
        services = client.command("query-services")["return"][0]
    assert services["state"] == "running" and services["pids"] == [second]
