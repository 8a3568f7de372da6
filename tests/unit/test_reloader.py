"""reloader.Reloader against a recording host: what a reload asks of the units, in order.

The host is a plain class that keeps units by name and records each request
(tests/integration/test_reload.py runs reloads through a real supervisor
under traffic); the store, its sockets and the unit files are real.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.binding import InheritedFds, bind_socket
from fdsupervisor.errors import FdSupervisorError
from fdsupervisor.fdstore import FdStore, RawFd, unit_owner
from fdsupervisor.loop import EventLoop
from fdsupervisor.reloader import Reloader
from fdsupervisor.service import Service
from fdsupervisor.systemd import SystemdNotifier
from fdsupervisor.units import Unit, load_units


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(event)

    warning = error = info


class Host:
    """A ReloadHost: units by name, workers alive where the test says so."""

    def __init__(self, units: list[Unit]) -> None:
        self.store = FdStore()
        self.sent: list[str] = []
        self.notifier = SystemdNotifier({"NOTIFY_SOCKET": "/run/test"}, send=self._send)
        self.loop = EventLoop()
        self.units = {u.name: u for u in units}
        self.with_workers: set[str] = set()
        self.running: set[str] = set()  # roll_service finds these running
        self.rolls: dict[str, Callable[[str | None], None]] = {}
        self.calls: list[tuple[Any, ...]] = []
        for unit in units:
            for spec in unit.sockets:
                bound = bind_socket(
                    spec, base_dir=unit.base_dir, inherited=InheritedFds(frozenset())
                )
                self.store.add(unit_owner(unit.name), spec.name, bound)

    def _send(self, message: str, *args: Any) -> bool:
        self.sent.append(message.splitlines()[0])
        return True

    def unit_names(self) -> list[str]:
        return list(self.units)

    def unit(self, name: str) -> Unit:
        return self.units[name]

    def has_workers(self, name: str) -> bool:
        return name in self.with_workers

    def stop_service(self, name: str) -> None:
        self.calls.append(("stop", name))

    def roll_service(self, unit: Unit, done: Callable[[str | None], None]) -> bool:
        if unit.name not in self.running:
            return False
        self.units[unit.name] = unit
        self.rolls[unit.name] = done
        self.calls.append(("roll", unit.name))
        return True

    def suspend_intake(self, name: str) -> None:
        self.calls.append(("suspend", name))

    def activate(self, name: str) -> None:
        self.calls.append(("activate", name))

    def fail(self, name: str, reason: str) -> None:
        self.calls.append(("fail", name, reason))

    def replace_unit(self, unit: Unit, service: Service | None) -> None:
        self.units[unit.name] = unit
        self.calls.append(("replace", unit.name, "fresh service" if service else "same service"))

    def add_unit(self, unit: Unit) -> None:
        self.units[unit.name] = unit
        self.calls.append(("add", unit.name))

    def remove_unit(self, name: str) -> None:
        del self.units[name]
        self.calls.append(("remove", name))

    def drop_stored(self, owner: str, name: str, reason: str) -> None:
        self.store.close(owner, name)
        self.calls.append(("drop", owner, name))

    def sync_systemd_store(self) -> None:
        self.calls.append(("sync",))

    def fd(self, unit: str, socket_name: str) -> int | None:
        entry = self.store.get(unit_owner(unit), socket_name)
        return entry.fd if entry is not None else None


def unit_text(port: str = "0", env: str = "1") -> str:
    return textwrap.dedent(f"""
        sockets:
          http: {{listen: "127.0.0.1:{port}"}}
        service:
          exec: [/bin/true]
          environment: {{V: "{env}"}}
        """)


@pytest.fixture
def units_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "units"
    directory.mkdir()
    (directory / "web.yaml").write_text(unit_text())
    return directory


@pytest.fixture
def host(units_dir: Path) -> Iterator[Host]:
    running = Host(load_units([units_dir]))
    yield running
    running.store.close_all()
    running.loop.close()


def reloader(host: Host, units_dir: Path) -> tuple[Reloader, Log]:
    log = Log()
    return Reloader(host, [units_dir], log=log), log


def test_a_changed_service_waits_for_its_workers_then_starts_afresh(
    host: Host, units_dir: Path
) -> None:
    before = host.fd("web", "http")
    (units_dir / "web.yaml").write_text(unit_text(env="2"))
    host.with_workers.add("web")
    reload, log = reloader(host, units_dir)
    answer = reload.reload()
    assert answer["waiting-for"] == ["web"]
    assert host.calls == [("stop", "web")]
    assert reload.in_progress and reload.waits_for("web") and not reload.waits_for("api")
    assert host.sent == ["RELOADING=1"]
    with pytest.raises(FdSupervisorError, match="a reload is still in progress"):
        reload.reload()
    host.calls.clear()
    reload.unit_idle("web")
    assert host.calls == [("replace", "web", "fresh service"), ("activate", "web"), ("sync",)]
    assert dict(host.unit("web").service.environment)["V"] == "2"
    assert host.fd("web", "http") == before, "the socket was kept: same fd"
    assert not reload.in_progress and host.sent[-1] == "READY=1"
    assert log.events[-1] == "reloaded"


def test_a_changed_service_that_runs_is_rolled_not_stopped(host: Host, units_dir: Path) -> None:
    before = host.fd("web", "http")
    (units_dir / "web.yaml").write_text(unit_text(env="2"))
    host.with_workers.add("web")
    host.running.add("web")
    reload, log = reloader(host, units_dir)
    answer = reload.reload()
    assert answer["waiting-for"] == [] and not reload.in_progress
    assert host.calls == [("roll", "web"), ("sync",)], "no stop, no fresh service"
    assert dict(host.unit("web").service.environment)["V"] == "2"
    assert host.fd("web", "http") == before and host.sent == ["RELOADING=1", "READY=1"]
    host.rolls["web"]("new worker 7 start timeout: no READY=1")
    assert log.events[-1] == "reload_failed"
    assert host.sent[-1] == "STATUS=reload failed: unit web: new worker 7 start timeout: no READY=1"


def test_an_invalid_unit_file_changes_nothing(host: Host, units_dir: Path) -> None:
    before = host.fd("web", "http")
    (units_dir / "web.yaml").write_text("sockets: [\n")
    reload, log = reloader(host, units_dir)
    with pytest.raises(FdSupervisorError, match="reload refused, nothing was changed"):
        reload.reload()
    assert host.calls == [] and host.fd("web", "http") == before
    assert log.events == ["reload_failed"]
    assert len(host.sent) == 1 and host.sent[0].startswith("STATUS=reload failed, nothing changed")
    assert not reload.in_progress


def test_a_renamed_unit_takes_its_socket_along(host: Host, units_dir: Path) -> None:
    before = host.fd("web", "http")
    host.store.add("service:web", "state", RawFd(_pipe_fd()))  # what a worker stored
    (units_dir / "web.yaml").rename(units_dir / "site.yaml")
    reload, _ = reloader(host, units_dir)
    reload.reload()  # no worker to wait for: done at once
    assert host.calls == [
        ("suspend", "web"),
        ("stop", "web"),
        ("remove", "web"),
        ("drop", "service:web", "state"),
        ("add", "site"),
        ("activate", "site"),
        ("sync",),
    ]
    assert host.fd("site", "http") == before and host.fd("web", "http") is None
    assert host.unit_names() == ["site"]


def test_a_new_socket_is_bound_before_anything_changes(host: Host, units_dir: Path) -> None:
    (units_dir / "web.yaml").write_text(
        textwrap.dedent("""
            sockets:
              http: {listen: "127.0.0.1:0"}
              admin: {listen: "127.0.0.1:0"}
            service:
              exec: [/bin/true]
              environment: {V: "1"}
            """)
    )
    host.with_workers.add("web")
    reload, log = reloader(host, units_dir)
    reload.reload()
    assert log.events[0] == "socket_bound", "bound first"
    assert host.fd("web", "admin") is None, "in the store once the old workers are gone"
    reload.unit_idle("web")
    assert host.fd("web", "admin") is not None
    assert ("replace", "web", "fresh service") in host.calls  # a new fd layout: restarted


def test_a_command_line_unit_has_nothing_to_reload(host: Host) -> None:
    reload = Reloader(host, [], log=Log())
    with pytest.raises(FdSupervisorError, match="command-line unit"):
        reload.reload()


def test_unit_idle_without_a_reload_does_nothing(host: Host, units_dir: Path) -> None:
    reload, _ = reloader(host, units_dir)
    reload.unit_idle("web")
    assert host.calls == [] and not reload.waits_for("web")


def _pipe_fd() -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end
