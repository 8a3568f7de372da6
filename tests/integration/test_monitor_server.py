"""monitor.MonitorServer in this process: a real Unix socket, a real client, our own loop.

The server runs on an :class:`~fdsupervisor.loop.EventLoop` that the test
turns itself (``pump_until``), so each step is synchronised on the condition
it waits for: the loop sleeps in ``epoll_wait`` until the client's bytes
arrive, and a guard timer bounds every wait. Commands go to a small executor
of the test's own, so what is checked is the shell around the protocol core:
accepting, SO_PEERCRED, bytes in and replies out, fds held, passed on and
closed. The commands themselves are test_monitor.py's, on a whole supervisor.
"""

from __future__ import annotations

import array
import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.errors import CommandError
from fdsupervisor.loop import EventLoop
from fdsupervisor.monitor import MonitorClient, MonitorServer
from fdsupervisor.qmp import Execute, QmpConnection, command_not_found, error_reply, reply
from tests.conftest import open_fds
from tests.recording_log import RecordingLog

PACKAGE = "fdsupervisor-test 0.0"


class Executor:
    """Three commands of the test's own, answered the way commands.py answers."""

    def __init__(self) -> None:
        self.taken: list[int] = []
        self.to_give: int | None = None

    def __call__(self, client: MonitorClient, request: Execute) -> tuple[bytes, list[int]]:
        if request.command == "take-fd":  # as getfd takes its fd
            fd = client.take_fd()
            if fd is None:
                error = CommandError("No file descriptor supplied via SCM_RIGHTS")
                return error_reply(request, error), []
            self.taken.append(fd)
            return reply(request, {}), []
        if request.command == "give-fd" and self.to_give is not None:  # as fd-retrieve
            return reply(request, {}), [os.dup(self.to_give)]
        if request.command == "echo":
            return reply(request, request.arguments), []
        return error_reply(request, command_not_found(request.command)), []

    def close(self) -> None:
        for fd in self.taken:
            os.close(fd)


def pump_until(loop: EventLoop, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Turn the loop until ``condition()`` holds; each turn sleeps until an fd is ready."""
    deadline = time.monotonic() + timeout
    guard = loop.call_later(timeout, lambda: None)  # no turn sleeps past the deadline
    try:
        while not condition():
            if time.monotonic() >= deadline:
                raise AssertionError(f"not within {timeout}s: {condition}")
            loop.run_once()
    finally:
        guard.cancel()


class Client:
    """A raw client on a non-blocking socket: reads only what the loop's turns have sent."""

    def __init__(self, path: Path, loop: EventLoop) -> None:
        self.loop = loop
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))  # completes at once: the connection waits in the backlog
        self.sock.setblocking(False)
        self.buffer = b""
        self.fds: list[int] = []
        self.eof = False

    def _read_available(self) -> None:
        while not self.eof and select.select([self.sock], [], [], 0)[0]:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            except ConnectionResetError:
                data, ancillary = b"", []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % 4])
                    self.fds.extend(received)
            if not data:
                self.eof = True
            self.buffer += data

    def _has_line(self) -> bool:
        self._read_available()
        return b"\r\n" in self.buffer or self.eof

    def read(self) -> dict[str, Any]:
        pump_until(self.loop, self._has_line)
        assert b"\r\n" in self.buffer, f"the monitor hung up; it sent {self.buffer!r}"
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return dict(json.loads(line))

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        assert self.sock.sendmsg([data], ancillary) == len(data)

    def command(self, name: str, fds: list[int] | None = None, **arguments: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.send(json.dumps(message).encode(), fds)
        return self.read()

    def negotiate(self) -> Client:
        self.read()  # the greeting
        assert self.command("qmp_capabilities") == {"return": {}}
        return self

    def wait_hangup(self) -> None:
        def hung_up() -> bool:
            self._read_available()
            return self.eof

        pump_until(self.loop, hung_up)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()


class Monitor:
    def __init__(self, path: Path, allowed_uids: frozenset[int]) -> None:
        self.loop = EventLoop()
        self.log = RecordingLog()
        self.executor = Executor()
        self.server = MonitorServer(
            path,
            loop=self.loop,
            log=self.log,
            package=PACKAGE,
            allowed_uids=allowed_uids,
            execute=self.executor,
        )
        self.server.open()
        self.clients: list[Client] = []

    def connect(self) -> Client:
        client = Client(self.server.path, self.loop)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.server.close()
        self.executor.close()
        self.loop.close()


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Monitor]:
    baseline = open_fds()
    server = Monitor(tmp_path / "monitor.sock", frozenset({os.getuid()}))
    yield server
    server.close()
    assert open_fds() == baseline, "the monitor or the test left an fd open"


def peer_of_a_socketpair() -> tuple[int, socket.socket]:
    """One end as a bare fd to send away, and the end that sees EOF once every copy is closed."""
    ours, kept = socket.socketpair()
    return ours.detach(), kept


def closed_everywhere(kept: socket.socket) -> bool:
    """Whether every copy of the other end is closed: the kernel says EOF at once."""
    kept.setblocking(False)
    try:
        return kept.recv(1) == b""
    except BlockingIOError:
        return False


def test_greeting_then_negotiation_then_commands(monitor: Monitor) -> None:
    client = monitor.connect()
    assert client.read() == json.loads(QmpConnection(package=PACKAGE).greeting())
    before = client.command("echo", x=1)
    assert before["error"]["class"] == "CommandNotFound"  # QEMU: nothing before qmp_capabilities
    assert client.command("qmp_capabilities") == {"return": {}}
    assert client.command("echo", x=1) == {"return": {"x": 1}}
    # the id comes back, and several commands in one write get their replies in order
    client.send(
        b'{"execute": "echo", "arguments": {"n": 1}, "id": "a"}{"execute": "echo", "id": 2}'
    )
    assert client.read() == {"return": {"n": 1}, "id": "a"}
    assert client.read() == {"return": {}, "id": 2}
    assert len(monitor.server.clients) == 1
    assert monitor.log.events("monitor_listening") == [{"path": str(monitor.server.path)}]


@pytest.mark.parametrize(
    "garbage",
    [b"{nope}", b'{"execute": 1}', b"[1, 2]", b'{"execute": "echo", "arguments": 3}'],
)
def test_a_bad_message_gets_a_generic_error_and_the_connection_lives_on(
    monitor: Monitor, garbage: bytes
) -> None:
    client = monitor.connect().negotiate()
    client.send(garbage)
    error = client.read()["error"]
    assert error["class"] == "GenericError" and error["desc"]
    assert client.command("echo", still="here") == {"return": {"still": "here"}}
    assert len(monitor.server.clients) == 1


def test_held_fds_are_closed_when_the_client_goes(monitor: Monitor) -> None:
    client = monitor.connect().negotiate()
    sent, kept = peer_of_a_socketpair()
    with kept:
        # a command that takes no fd: the fd stays held for a later one
        client.send(b'{"execute": "echo"}', [sent])
        os.close(sent)
        assert client.read() == {"return": {}}
        assert monitor.server.fds_held() == 1
        assert not closed_everywhere(kept), "the monitor holds its copy"
        client.close()
        monitor.clients.remove(client)
        pump_until(monitor.loop, lambda: not monitor.server.clients)
        assert monitor.server.fds_held() == 0
        assert closed_everywhere(kept), "the held fd was closed with its client"


def test_a_newer_batch_closes_the_older_and_take_fd_gets_the_newer(monitor: Monitor) -> None:
    client = monitor.connect().negotiate()
    older, older_kept = peer_of_a_socketpair()
    newer, newer_kept = peer_of_a_socketpair()
    with older_kept, newer_kept:
        client.send(b" ", [older])  # qemu.qmp's way: one space byte carries the fd
        client.send(b'{"execute": "echo"}', [newer])
        os.close(older)
        os.close(newer)
        assert client.read() == {"return": {}}
        assert closed_everywhere(older_kept), "QEMU keeps only the latest batch"
        assert client.command("take-fd") == {"return": {}}
        (taken,) = monitor.executor.taken
        os.write(taken, b"n")  # the newer pair's other end: its partner hears it
        newer_kept.settimeout(10)
        assert newer_kept.recv(1) == b"n"
        assert client.command("take-fd")["error"]["desc"] == (
            "No file descriptor supplied via SCM_RIGHTS"
        )


def test_an_fd_on_a_reply_reaches_the_client_and_the_servers_copy_is_closed(
    monitor: Monitor,
) -> None:
    client = monitor.connect().negotiate()
    given, kept = peer_of_a_socketpair()
    with kept:
        monitor.executor.to_give = given
        assert client.command("give-fd") == {"return": {}}
        (received,) = client.fds
        assert os.fstat(received).st_ino == os.fstat(given).st_ino
        monitor.executor.to_give = None
        os.close(given)
        assert monitor.server.fds_held() == 0, "the duplicate it sent is no longer held"
        client.close()  # our received copy: now no copy is left anywhere
        monitor.clients.remove(client)
        assert closed_everywhere(kept)


def test_a_client_of_another_uid_is_closed_without_a_word(tmp_path: Path) -> None:
    baseline = open_fds()
    refusing = Monitor(tmp_path / "refusing.sock", frozenset())  # not even our own uid
    try:
        client = refusing.connect()
        client.wait_hangup()
        assert client.buffer == b"" and client.fds == []
        assert refusing.log.events("monitor_client_refused") == [
            {"uid": os.getuid(), "reason": "uid not allowed"}
        ]
        assert refusing.server.clients == []
    finally:
        refusing.close()
    assert open_fds() == baseline


def test_closing_the_server_hangs_up_on_clients_and_removes_its_socket_file(
    tmp_path: Path,
) -> None:
    server = Monitor(tmp_path / "monitor.sock", frozenset({os.getuid()}))
    try:
        client = server.connect().negotiate()
        server.server.close()
        client.wait_hangup()
        assert not (tmp_path / "monitor.sock").exists()
    finally:
        server.close()
