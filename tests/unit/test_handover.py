"""handover.Handover against a recording host: what the new program takes over, and when.

The host is a plain class keeping units by name and recording each request;
the store and the handed-over sockets are real. tests/integration/test_upgrade.py
runs whole upgrades (and their fallbacks) through a real supervisor.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.binding import BoundSocket, InheritedFds
from fdsupervisor.cgroups import WorkerCgroups
from fdsupervisor.fdstore import FdStore
from fdsupervisor.handover import Handover
from fdsupervisor.loop import EventLoop
from fdsupervisor.reaper import ChildReaper
from fdsupervisor.service import Service, ServiceState
from fdsupervisor.units import Unit, load_unit_text
from fdsupervisor.upgrade import HandoverState, ServiceItem, StoredItem, WorkerItem


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    warning = info


class Host:
    """A HandoverHost: units by name, each request recorded."""

    def __init__(self, units: list[Unit]) -> None:
        self.store = FdStore()
        self.inherited = InheritedFds(frozenset())
        self.loop = EventLoop()
        self.cgroups: WorkerCgroups | None = None
        self.children = ChildReaper(log=Log())
        self.units = {u.name: u for u in units}
        self.services = {u.name: Service(u.name, u.service) for u in units}
        self.calls: list[tuple[Any, ...]] = []
        self.pids: list[int] = []

    def unit_names(self) -> list[str]:
        return list(self.units)

    def unit(self, name: str) -> Unit:
        return self.units[name]

    def service(self, name: str) -> Service:
        return self.services[name]

    def sync_systemd_store(self) -> None:
        self.calls.append(("sync",))

    def signal_group(self, pid: int, signum: int) -> None:
        self.calls.append(("signal", pid, signum))
        os.kill(pid, signum)

    def adopt_worker(self, name: str, saved: WorkerItem) -> bool:
        self.calls.append(("adopt_worker", name, saved.pid))
        return True

    def resume(self, name: str) -> None:
        self.calls.append(("resume", name))

    def worker_pids(self) -> list[int]:
        return list(self.pids)

    def release_workers(self) -> None:
        self.calls.append(("release_workers",))


WEB = textwrap.dedent("""
    sockets:
      http: {listen: "127.0.0.1:0"}
      admin: {listen: {type: unix, path: admin.sock}}
    service:
      exec: [/bin/true]
    """)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    running = Host([load_unit_text(WEB, tmp_path / "web.yaml", tmp_path)])
    yield running
    running.store.close_all()
    running.loop.close()


@pytest.fixture
def old_sockets(tmp_path: Path) -> Iterator[dict[str, socket.socket]]:
    """What the old program held: web's http, a gone unit's unix socket, a stored pipe."""
    http = socket.create_server(("127.0.0.1", 0))
    gone = socket.socket(socket.AF_UNIX)
    gone.bind(str(tmp_path / "gone.sock"))
    gone.listen()
    sockets = {"http": http, "gone": gone}
    yield sockets
    for sock in sockets.values():
        sock.close()


def state_of(sockets: dict[str, socket.socket], tmp_path: Path, stored: int) -> HandoverState:
    inode = os.stat(tmp_path / "gone.sock")
    return HandoverState(
        ("run", str(tmp_path)),
        (
            StoredItem("unit:web", "http", os.dup(sockets["http"].fileno()), True),
            StoredItem(
                "unit:gone",
                "s",
                os.dup(sockets["gone"].fileno()),
                True,
                created_path=str(tmp_path / "gone.sock"),
                created_inode=(inode.st_dev, inode.st_ino),
            ),
            StoredItem("service:web", "state", stored, False, watch_hangup=True),
        ),
        {
            "web": ServiceItem("running", 2, {"code": 1}, "serving", None, 0, (worker(41),)),
            "gone": ServiceItem("running", 0, None, None, None, 0, (worker(42),)),
        },
    )


@pytest.fixture
def child() -> Iterator[int]:
    """A child process that waits for a signal; killed and reaped at the end if still there."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        signal.pause()
        os._exit(0)
    yield pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def worker(pid: int) -> WorkerItem:
    return WorkerItem(0, pid, 1.0, True)


def pipe_end() -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def test_adopt_takes_over_what_the_units_have_and_binds_what_is_new(
    host: Host, old_sockets: dict[str, socket.socket], tmp_path: Path
) -> None:
    state = state_of(old_sockets, tmp_path, pipe_end())
    log = Log()
    takeover = Handover(host, log=log)
    takeover.adopt(state)
    http = host.store.get("unit:web", "http")
    assert http is not None and http.fd == state.store[0].fd, "the handed-over fd itself"
    assert isinstance(http.resource, BoundSocket) and http.resource.adopted
    assert http.resource.spec == host.unit("web").sockets[0], "its spec from the unit file"
    assert host.store.get("unit:web", "admin") is not None, "new in the unit files: bound"
    assert (tmp_path / "admin.sock").exists()
    assert host.store.get("unit:gone", "s") is None, "closed only once ready"
    state_entry = host.store.get("service:web", "state")
    assert state_entry is not None and host.store.watches(state_entry), "polled again"
    assert host.calls == [("sync",)]
    assert log.events[-1] == ("handover_adopted", {"fds": 3, "services": 2})
    assert all(not os.get_inheritable(fd) for fd in state.fds)
    takeover.finish()
    assert log.events[-1][0] == "socket_closed" and log.events[-1][1]["unit"] == "gone"
    assert not (tmp_path / "gone.sock").exists(), "its unit is gone: so is its file"


def test_the_fallback_binds_nothing_new(
    host: Host, old_sockets: dict[str, socket.socket], tmp_path: Path
) -> None:
    log = Log()
    Handover(host, log=log).adopt(state_of(old_sockets, tmp_path, pipe_end()), bind_new=False)
    assert host.store.get("unit:web", "admin") is None
    assert (
        "socket_not_bound",
        {"unit": "web", "socket": "admin", "reason": "not handed over"},
    ) in (log.events)


def test_services_carry_on_and_workers_of_gone_units_wait_for_ready(
    host: Host, old_sockets: dict[str, socket.socket], tmp_path: Path
) -> None:
    state = state_of(old_sockets, tmp_path, pipe_end())
    takeover = Handover(host, log=Log())
    takeover.adopt(state)
    host.calls.clear()
    takeover.restore_services(state)
    service = host.service("web")
    assert service.state is ServiceState.RUNNING and service.restarts == 2
    assert service.status == "serving" and service.last_exit is not None
    assert host.calls == [("adopt_worker", "web", 41), ("resume", "web")]
    assert ("adopt_worker", "gone", 42) not in host.calls, "not a unit any more"


def test_an_orphan_is_stopped_once_ready_and_still_reaped(host: Host, child: int) -> None:
    pid = child
    state = HandoverState(
        ("run",), (), {"gone": ServiceItem("running", 0, None, None, None, 0, (worker(pid),))}
    )
    takeover = Handover(host, log=Log())
    takeover.restore_services(state)
    assert host.calls == []
    takeover.finish()
    assert host.calls == [("signal", pid, signal.SIGTERM)]
    assert pid in host.children, "its exit goes to the handover, not to the orphans' log"
    pidfd = os.pidfd_open(pid)
    try:
        assert select.select([pidfd], [], [], 10)[0], "the orphan did not exit"
    finally:
        os.close(pidfd)
    assert host.children.reap() == [], "reaped as the handover's, not as an orphan"
    assert pid not in host.children
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped by the handover


def test_abandon_closes_the_copies_but_not_the_files_the_originals_serve(
    host: Host, old_sockets: dict[str, socket.socket], tmp_path: Path
) -> None:
    stored = pipe_end()
    state = state_of(old_sockets, tmp_path, stored)
    takeover = Handover(host, log=Log())
    takeover.adopt(state)
    takeover.abandon(state)
    assert len(host.store) == 0 and host.calls[-1] == ("release_workers",)
    for fd in state.fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    assert (tmp_path / "gone.sock").exists(), "the original still serves it"
    assert not (tmp_path / "admin.sock").exists(), "bound by this attempt: removed"


def test_abandon_kills_only_the_workers_it_started(host: Host, child: int) -> None:
    started = child
    host.pids = [41, started]
    state = HandoverState(
        ("run",), (), {"web": ServiceItem("running", 0, None, None, None, 0, (worker(41),))}
    )
    Handover(host, log=Log()).abandon(state)
    assert host.calls == [("signal", started, signal.SIGKILL), ("release_workers",)]
    with pytest.raises(ChildProcessError):
        os.waitpid(started, os.WNOHANG)  # reaped by abandon
