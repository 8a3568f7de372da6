"""SPEC 8: the whole store across a restart of the supervisor, with the test playing systemd.

:class:`ManagerStore` is systemd's side of the fd store: it applies each
``FDSTORE=1`` / ``FDSTOREREMOVE=1`` datagram the supervisor sends to the
notify socket the test owns, keeps one copy of an fd it holds already (as
``service_add_fd_store()`` does with ``same_fd()``) and closes a
``BARRIER=1`` fd. A restart passes what it holds to the next supervisor as
systemd does: at fds 3, 4, ... with ``LISTEN_FDS`` / ``LISTEN_FDNAMES`` /
``LISTEN_PID``. The supervisor holds a unit socket, two runtime sockets
(``socket-add``: TCP and unix), two fds its worker stored under one name and
an fd handed in with ``getfd``; after a crash (SIGKILL) and after a clean
stop (SIGTERM) the next supervisor shows the same entries with the same
inodes, the worker gets all of them back, and a client that connects all
along is never refused.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.fdpassing import same_file
from tests.conftest import PYTHON, SupervisorProcess, open_fds
from tests.integration.test_systemd_protocol import ENV, EXEC_AS_SYSTEMD, NotifySocket
from tests.monitor_client import RawClient

WORKER = textwrap.dedent(
    """
    import json, os, selectors, signal, socket, sys
    from systemd import daemon

    fds = daemon.listen_fds_with_names()
    names = os.environ.get("LISTEN_FDNAMES", "")
    kept = []
    if "pair" not in names.split(":"):
        # two fds under one name, in one message (systemd assigns the name to both)
        kept = list(socket.socketpair())
        daemon.notify("FDSTORE=1\\nFDNAME=pair", fds=[s.fileno() for s in kept])
    info = {
        "pid": os.getpid(),
        "names": names,
        "inodes": [[name, os.fstat(fd).st_ino] for fd, name in sorted(fds.items())],
    }
    sys.stdout.write("worker " + json.dumps(info) + "\\n")
    sys.stdout.flush()
    selector = selectors.DefaultSelector()
    for fd, name in fds.items():
        sock = socket.socket(fileno=fd)
        if sock.type == socket.SOCK_STREAM and sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            selector.register(sock, selectors.EVENT_READ, name)
    while True:
        for key, _ in selector.select():
            # A connection taken is answered: the stop's SIGTERM waits until then (the
            # clients count every connection that got no answer).
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            conn, _ = key.fileobj.accept()
            with conn:
                conn.sendall(f"{key.data} {os.getpid()}\\n".encode())
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    """
)

UNIT = """
sockets:
  http: {{listen: "127.0.0.1:0"}}
service:
  exec: [{python}, {worker}]
  fd-store-max: 4
"""


class ManagerStore:
    """systemd's fd store for the supervisor, fed by its notify datagrams."""

    def __init__(self, notify: NotifySocket) -> None:
        self.notify = notify
        self.entries: list[tuple[str, int]] = []  # (FDNAME, fd) in the order stored
        self.ready_pids: list[int] = []

    def pump(self, until: Callable[[], bool], timeout: float = 20.0) -> None:
        """Apply datagrams until ``until()`` holds (checked after each one)."""
        while not until():
            message = self.notify.receive(timeout=timeout)
            fields = dict(line.split("=", 1) for line in message.text.split("\n") if "=" in line)
            if fields.get("READY") == "1":
                self.ready_pids.append(message.pid)
            if fields.get("BARRIER") == "1":
                self._close(message.fds)
            elif fields.get("FDSTOREREMOVE") == "1":
                gone = [fd for name, fd in self.entries if name == fields["FDNAME"]]
                self.entries = [(n, fd) for n, fd in self.entries if n != fields["FDNAME"]]
                self._close(gone)
            elif fields.get("FDSTORE") == "1":
                for fd in message.fds:
                    if any(same_file(fd, held) for _, held in self.entries):
                        self._close([fd])  # service_add_fd_store(): a duplicate is suppressed
                    else:
                        self.entries.append((fields["FDNAME"], fd))

    def drain(self) -> None:
        """Apply every datagram already queued."""
        self.pump(lambda: not self._pending(), timeout=1)

    def _pending(self) -> bool:
        return bool(select.select([self.notify.sock], [], [], 0)[0])

    def _close(self, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
            self.notify.received.remove(fd)

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.entries)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ManagerStore]:
    notify = NotifySocket(tmp_path / "notify")
    yield ManagerStore(notify)
    notify.close()


def start(tmp_path: Path, manager: ManagerStore, count: int, *, passed: bool) -> SupervisorProcess:
    """A supervisor on tmp_path/units, started as systemd would (with its store, if ``passed``)."""
    env = {**ENV, "NOTIFY_SOCKET": str(manager.notify.path)}
    prefix: tuple[str, ...] = ()
    fds: tuple[int, ...] = ()
    if passed:
        fds = tuple(fd for _, fd in manager.entries)
        env |= {
            "LISTEN_FDS": str(len(fds)),
            "LISTEN_FDNAMES": ":".join(name for name, _ in manager.entries),
        }
        prefix = (PYTHON, "-c", EXEC_AS_SYSTEMD, ",".join(map(str, fds)))
    proc = SupervisorProcess(
        ["--monitor", str(tmp_path / f"monitor-{count}.sock"), str(tmp_path / "units")],
        cwd=tmp_path,
        pass_fds=fds,
        env=env,
        prefix=prefix,
    )
    proc.monitor_path = tmp_path / f"monitor-{count}.sock"
    return proc


def worker_info(sup: SupervisorProcess, after: int = 0) -> dict[str, Any]:
    line = sup.wait_output("worker {", after=after)
    return dict(json.loads(line.split("worker ", 1)[1]))


def stored(sup: SupervisorProcess) -> dict[tuple[str, str], list[int]]:
    """``query-fds`` as (owner, fdname) → the inodes of its fds."""
    with RawClient(sup.monitor_path).negotiate() as client:
        rows = client.command("query-fds")["return"]
    result: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        result.setdefault((row["owner"], row["fdname"]), []).append(row["inode"])
    return {key: sorted(inodes) for key, inodes in result.items()}


def fd_count(sup: SupervisorProcess) -> int:
    """The supervisor's open fds, with one monitor client (this one) connected.

    Its answer comes after the loop has seen every earlier client's end.
    """
    with RawClient(sup.monitor_path).negotiate() as client:
        assert "return" in client.command("query-version")
        return len(open_fds(sup.pid))


class ConnectLoop:
    """One client after another against ``port``, each waiting for its answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered = 0
        self.refused = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as conn:
                    if conn.recv(100).startswith(b"http "):
                        with self._cond:
                            self.answered += 1
                            self._cond.notify_all()
                    else:
                        self.failed.append("no answer")
            except ConnectionRefusedError:
                self.refused += 1
            except OSError as error:
                self.failed.append(str(error))

    def wait_answered(self, count: int, timeout: float = 20.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.answered >= count, timeout), self.failed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(40)


def query_listening(path: Path) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(20)
        client.connect(str(path))
        return client.recv(100)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_the_whole_store_survives_a_restart_of_the_supervisor(
    tmp_path: Path, manager: ManagerStore, how: str
) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    (units / "web.yaml").write_text(UNIT.format(python=PYTHON, worker=tmp_path / "worker.py"))
    (tmp_path / "run").mkdir()
    ctl_path = tmp_path / "run" / "ctl.sock"
    handed_in = socket.socket()  # the getfd fd: a plain socket of the test's
    first = start(tmp_path, manager, 0, passed=False)
    try:
        first.wait_for("ready")
        before_info = worker_info(first)
        port = first.port("http")
        with RawClient(first.monitor_path).negotiate() as client:
            for sock_id, addr in (
                ("extra", {"type": "inet", "host": "127.0.0.1", "port": "0"}),
                ("ctl", {"type": "unix", "path": str(ctl_path)}),
            ):
                reply = client.command("socket-add", id=sock_id, addr=addr, unit="web")
                assert reply == {"return": {}}, reply
            assert client.command("getfd", [handed_in.fileno()], fdname="vm0") == {"return": {}}
        extra_port = first.port("extra")
        expected = ["/=vm0", "web/+ctl", "web/+extra", "web/=pair", "web/=pair", "web/http"]
        manager.pump(lambda: manager.names() == expected)
        entries = stored(first)
        assert len(entries[("service:web", "pair")]) == 2
        assert entries[("monitor", "vm0")] == [os.fstat(handed_in.fileno()).st_ino]
        first_fds = fd_count(first)
        loop = ConnectLoop(port)
        if how == "SIGKILL":
            first.kill()  # a crash; systemd then kills what is left of its cgroup
            os.kill(int(before_info["pid"]), signal.SIGKILL)
        else:
            assert first.stop() == 0  # systemctl restart: workers stop, kept files stay
            assert ctl_path.exists(), "systemd keeps the socket: its file stays"
        manager.drain()
        assert manager.names() == expected, "nothing left systemd's store"

        second = start(tmp_path, manager, 1, passed=True)
        try:
            second.wait_for("ready")
            after_info = worker_info(second)
            assert stored(second) == entries, "the same entries, the same inodes"
            assert sorted(after_info["names"].split(":")) == [
                "ctl",
                "extra",
                "http",
                "pair",
                "pair",
            ]
            pair_inodes = sorted(inode for name, inode in after_info["inodes"] if name == "pair")
            assert pair_inodes == entries[("service:web", "pair")], "both stored fds, named"
            assert query_listening(ctl_path).startswith(b"ctl ")
            with socket.create_connection(("127.0.0.1", extra_port), timeout=20) as conn:
                assert conn.recv(100) == f"extra {after_info['pid']}\n".encode()
            loop.wait_answered(loop.answered + 2)  # served by the new worker too
            manager.drain()
            assert manager.names() == expected, "systemd's store is as it was"
            assert not second.count("stored_entry_dropped")
            assert fd_count(second) == first_fds, "no fd more, no fd less"
        finally:
            loop.stop()
            second.stop()
    finally:
        first.kill()
        handed_in.close()
    assert loop.refused == 0 and loop.failed == [], (loop.refused, loop.failed)
    assert loop.answered > 0


def test_entries_that_cannot_be_restored_are_closed_with_a_warning_naming_them(
    tmp_path: Path, manager: ManagerStore
) -> None:
    """A unit gone from the unit files, a socket no longer declared: closed here and in systemd."""
    units = tmp_path / "units"
    units.mkdir()
    (tmp_path / "worker.py").write_text(WORKER)
    web = UNIT.format(python=PYTHON, worker=tmp_path / "worker.py")
    (units / "web.yaml").write_text(
        web.replace("sockets:\n", 'sockets:\n  admin: {listen: "127.0.0.1:0"}\n')
    )
    (units / "old.yaml").write_text(web)
    first = start(tmp_path, manager, 0, passed=False)
    try:
        first.wait_for("ready")
        with RawClient(first.monitor_path).negotiate() as client:
            addr = {"type": "inet", "host": "127.0.0.1", "port": "0"}
            assert client.command("socket-add", id="more", addr=addr, unit="old") == {"return": {}}
        gone = ["old/+more", "old/=pair", "old/=pair", "old/http", "web/admin"]
        manager.pump(lambda: set(gone) <= set(manager.names()) and "web/=pair" in manager.names())
        assert first.stop() == 0
    finally:
        first.kill()
    manager.drain()
    (units / "old.yaml").unlink()
    (units / "web.yaml").write_text(web)
    second = start(tmp_path, manager, 1, passed=True)
    try:
        second.wait_for("ready")
        dropped = {
            (e["fdname"], e["reason"])
            for e in second.events
            if e.get("event") == "stored_entry_dropped"
        }
        assert dropped == {
            ("old/+more", "its unit old is gone"),
            ("old/=pair", "its unit old is gone"),
            ("old/http", "its unit old is gone"),
            ("web/admin", "unit web no longer declares socket admin"),
        }
        manager.drain()
        assert not set(gone) & set(manager.names()), "removed from systemd's store too"
        assert sorted(stored(second)) == [("service:web", "pair"), ("unit:web", "http")]
        assert not second.count("inherited_fd_closed"), "one warning each, the one naming it"
    finally:
        second.stop()
