"""upgrade.Upgrader against a recording host: when it refuses, and the state it hands over.

The exec itself, the check of the new program and the signals across it run
in tests/integration/test_upgrade.py through a real supervisor.
"""

from __future__ import annotations

import os
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.binding import InheritedFds, bind_socket
from fdsupervisor.errors import FdSupervisorError
from fdsupervisor.fdstore import FdStore, RawFd, unit_owner
from fdsupervisor.metrics import MetricsServer
from fdsupervisor.monitor import MonitorServer
from fdsupervisor.notify import NotifySocket
from fdsupervisor.service import Service, ServiceState
from fdsupervisor.systemd import SystemdNotifier
from fdsupervisor.units import Unit, load_unit_text
from fdsupervisor.upgrade import (
    CommandLineUnit,
    HandoverState,
    RunConfig,
    StoredItem,
    UnitFile,
    Upgrader,
    WorkerItem,
)


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    error = info


class Host:
    """An UpgradeHost: one unit, its service, a store; no monitor, metrics or notify socket."""

    def __init__(self, unit: Unit) -> None:
        self.store = FdStore()
        self.notifier = SystemdNotifier({})
        self.monitor: MonitorServer | None = None
        self.metrics: MetricsServer | None = None
        self.notify_socket: NotifySocket | None = None
        self.base_dir = unit.base_dir
        self.shutting_down = False
        self.reload_in_progress = False
        self.units = {unit.name: unit}
        self.services = {unit.name: Service(unit.name, unit.service)}

    def unit_names(self) -> list[str]:
        return list(self.units)

    def unit(self, name: str) -> Unit:
        return self.units[name]

    def service(self, name: str) -> Service:
        return self.services[name]

    def flush_notify_log(self) -> None:
        pass

    def pending_signals(self) -> bytes:
        return b""


WEB = textwrap.dedent("""
    sockets:
      http: {listen: "127.0.0.1:0"}
      admin: {listen: {type: unix, path: admin.sock}}
    service:
      exec: [/bin/true]
    """)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    unit = load_unit_text(WEB, tmp_path / "web.yaml", tmp_path)
    running = Host(unit)
    for spec in unit.sockets:
        bound = bind_socket(spec, base_dir=tmp_path, inherited=InheritedFds(frozenset()))
        running.store.add(unit_owner("web"), spec.name, bound)
    yield running
    running.store.close_all()


def upgrader(host: Host, config: RunConfig | None = None, argv: tuple[str, ...] = ("run",)) -> Any:
    log = Log()
    return Upgrader(
        host, exec_argv=argv, unit_paths=(), run_config=config, signals=(), log=log
    ), log


@pytest.mark.parametrize("busy", ["shutting_down", "reload_in_progress"])
def test_no_upgrade_during_a_reload_or_a_shutdown(host: Host, busy: str) -> None:
    setattr(host, busy, True)
    upgrade, log = upgrader(host)
    with pytest.raises(FdSupervisorError, match="upgrade refused, still running"):
        upgrade.upgrade()
    assert log.events[0][0] == "upgrade_failed"


def test_no_upgrade_during_a_rolling_restart(host: Host) -> None:
    service = host.service("web")
    service.request_start(0.0, manual=True)
    old = service.worker_started(0, 41, 0.0)
    service.begin_replacement(0)
    service.worker_started(0, 42, 0.1, replaces=old.pid)
    upgrade, _ = upgrader(host)
    with pytest.raises(FdSupervisorError, match=r"a rolling restart is in progress \(web\)"):
        upgrade.upgrade()


def test_no_upgrade_without_its_own_command_line(host: Host) -> None:
    upgrade, _ = upgrader(host, argv=())
    with pytest.raises(FdSupervisorError, match="does not know its own command line"):
        upgrade.upgrade()


def test_the_state_names_every_fd_and_worker(host: Host, tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(write_end)
    host.store.add("service:web", "state", RawFd(read_end), watch=True)
    quiet, quiet_peer = socket.socketpair()  # a second fd of the name, stored with FDPOLL=0
    host.store.add("service:web", "state", RawFd(quiet.detach()))
    service = host.service("web")
    service.worker_started(0, 4242, 10.0)
    service.refresh_state()
    config = RunConfig(log_format="json", unit_paths=(str(tmp_path),))
    upgrade, _ = upgrader(host, config, ("run", str(tmp_path)))
    state = upgrade.handover_state()
    http, admin, stored, second = state.store
    assert http == StoredItem("unit:web", "http", http.fd, True, kind="stream", backlog=128)
    assert admin.socket and admin.created_path == str(tmp_path / "admin.sock")
    assert admin.created_inode == (
        os.stat(tmp_path / "admin.sock").st_dev,
        os.stat(tmp_path / "admin.sock").st_ino,
    )
    assert stored == StoredItem("service:web", "state", read_end, False, watch_hangup=True)
    assert second == StoredItem("service:web", "state", second.fd, False), "its own FDPOLL"
    quiet_peer.close()
    item = state.services["web"]
    assert item.state == service.state.value != ServiceState.INACTIVE.value
    assert item.workers == (WorkerItem(0, 4242, 10.0, True),)  # no notify: ready at once
    assert state.argv == ("run", str(tmp_path)) and state.monitor_fd is state.notify_fd is None
    # the exact unit text, for a fallback that reads no file
    assert state.config is not None
    assert state.config.unit_files == (UnitFile(str(tmp_path / "web.yaml"), WEB),)
    assert HandoverState.from_json(state.to_json()) == state


def test_no_fallback_config_for_a_unit_without_its_text(host: Host) -> None:
    unit = host.units["web"]
    host.units["web"] = Unit(unit.name, unit.source, unit.base_dir, unit.sockets, unit.service)
    upgrade, _ = upgrader(host, RunConfig())
    assert upgrade.handover_state().config is None


def test_a_command_line_unit_comes_from_the_command_line_again(host: Host) -> None:
    line = RunConfig(command_line=CommandLineUnit((("http", "127.0.0.1:0"),), ("app",)))
    upgrade, _ = upgrader(host, line)
    assert upgrade.handover_state().config == line


def test_the_monitor_and_notify_sockets_cross_too(host: Host, tmp_path: Path) -> None:
    notify = NotifySocket.bind_unpredictable("fdsupervisor-test/")
    try:
        host.notify_socket = notify
        upgrade, _ = upgrader(host)
        state = upgrade.handover_state()
        assert state.notify_fd == notify.fileno() and state.fds[-1] == notify.fileno()
    finally:
        notify.close()
