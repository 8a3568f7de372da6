"""Monitor commands against a small :class:`~fdsupervisor.commands.Control` made here.

No supervisor: the commands see only what ``Control`` lists, a real
:class:`~fdsupervisor.fdstore.FdStore` whose ``on_change`` records the events,
and real fds and sockets.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.binding import BoundSocket
from fdsupervisor.commands import Commands, Control, fd_event_data
from fdsupervisor.errors import FdSupervisorError
from fdsupervisor.fdstore import MONITOR_OWNER, Entry, FdStore, RawFd, unit_owner
from fdsupervisor.monitor import DeferredReply
from fdsupervisor.qmp import Execute
from fdsupervisor.units import ServiceSpec, Unit


class FakeControl:
    """Exactly :class:`Control`, recording what the commands asked of it."""

    def __init__(self, base_dir: Path) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._store = FdStore(limit=8, on_change=self._changed)
        self._base_dir = base_dir
        self.units = {"web": Unit("web", base_dir / "web.yaml", base_dir, (), ServiceSpec(("x",)))}
        self.calls: list[tuple[str, Any]] = []
        self.restarts: list[Callable[[str | None], None]] = []

    def _changed(self, event: str, entry: Entry) -> None:
        self.events.append((event, dict(fd_event_data(entry))))

    @property
    def store(self) -> FdStore:
        return self._store

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def unit(self, name: str, /) -> Unit:
        if name not in self.units:
            raise FdSupervisorError(f"unit '{name}' not found")
        return self.units[name]

    def describe_services(self) -> Sequence[Mapping[str, Any]]:
        return [
            {
                "unit": "web",
                "state": "running",
                "pids": [42],
                "started": 1,
                "restarts": 1,
                "last-exit": {"signal": 9},
                "status": None,
            }
        ]

    def start_service(self, name: str, /, *, manual: bool = True) -> None:
        self.calls.append(("start", (name, manual)))

    def stop_service(self, name: str, /) -> None:
        self.calls.append(("stop", name))

    def restart_service(self, name: str, done: Callable[[str | None], None], /) -> None:
        if name not in self.units:
            raise FdSupervisorError(f"unit '{name}' not found")
        self.restarts.append(done)

    def reload(self) -> Mapping[str, Any]:
        return {"summary": "1 unit unchanged", "waiting-for": []}

    def upgrade(self) -> Mapping[str, Any]:
        raise FdSupervisorError("upgrade refused")

    def add_socket(self, owner: str, bound: BoundSocket, /) -> None:
        self.store.add(owner, bound.name, bound)
        self.calls.append(("add_socket", (owner, bound.name)))

    def remove_socket(self, socket_id: str, unit: str | None, /) -> None:
        self.calls.append(("remove_socket", (socket_id, unit)))


class FakeClient:
    """What the commands use of a monitor client: the fds it sent."""

    def __init__(self) -> None:
        self.held: list[int] = []
        self.lost_fds: str | None = None

    def take_fd(self) -> int | None:
        return self.held.pop(0) if self.held else None

    def fd_limit_problem(self, more: int) -> str | None:
        return None

    def fds_refused(self, problem: str | None, **fields: object) -> None:
        pass


@pytest.fixture
def control(tmp_path: Path) -> Iterator[FakeControl]:
    fake = FakeControl(tmp_path)
    yield fake
    fake.store.close_all()


def run(
    commands: Commands, client: FakeClient, command: str, **arguments: Any
) -> tuple[dict[str, Any], list[int]]:
    result = commands.execute(client, Execute(command, arguments))  # type: ignore[arg-type]
    assert not isinstance(result, DeferredReply)
    line, fds = result
    assert line.endswith(b"\r\n")
    return json.loads(line), fds


def test_the_fake_is_a_control(control: FakeControl) -> None:
    typed: Control = control
    assert Commands(typed).control is control  # taken as it is: no adapter in between


def test_getfd_and_closefd_events_come_from_the_store(control: FakeControl) -> None:
    commands, client = Commands(control), FakeClient()
    read_end, write_end = os.pipe()
    os.close(write_end)
    client.held = [read_end]
    assert run(commands, client, "getfd", fdname="vm0") == ({"return": {}}, [])
    assert run(commands, client, "closefd", fdname="vm0") == ({"return": {}}, [])
    assert control.events == [
        ("FD_STORED", {"fdname": "vm0", "owner": "monitor"}),
        ("FD_CLOSED", {"fdname": "vm0", "owner": "monitor"}),
    ]
    reply, _ = run(commands, client, "closefd", fdname="vm0")
    assert reply == {
        "error": {"class": "GenericError", "desc": "File descriptor named 'vm0' not found"}
    }


def test_fd_retrieve_with_remove_closes_through_the_store(control: FakeControl) -> None:
    commands, client = Commands(control), FakeClient()
    read_end, write_end = os.pipe()
    control.store.add(MONITOR_OWNER, "p", RawFd(read_end))
    control.events.clear()
    reply, fds = run(commands, client, "fd-retrieve", fdname="p", remove=True)
    try:
        assert reply == {"return": {}} and len(fds) == 1
        os.write(write_end, b"x")
        assert os.read(fds[0], 1) == b"x"  # the duplicate is the same pipe
    finally:
        for fd in (*fds, write_end):
            os.close(fd)
    assert control.events == [("FD_CLOSED", {"fdname": "p", "owner": "monitor"})]


def test_socket_add_takes_a_named_fd_only_once_it_is_adopted(control: FakeControl) -> None:
    commands, client = Commands(control), FakeClient()
    listener = socket.create_server(("127.0.0.1", 0))
    client.held = [listener.detach()]
    run(commands, client, "getfd", fdname="handed")
    read_end, write_end = os.pipe()
    os.close(write_end)
    client.held = [read_end]
    run(commands, client, "getfd", fdname="pipe")
    control.events.clear()

    wrong_kind = {"type": "fd", "str": "handed"}
    reply, _ = run(commands, client, "socket-add", id="d", addr=wrong_kind, kind="datagram")
    assert reply["error"]["class"] == "GenericError"
    reply, _ = run(commands, client, "socket-add", id="p", addr={"type": "fd", "str": "pipe"})
    assert reply["error"]["desc"] == "File descriptor 'pipe' is not a socket"
    # refused: both stay stored, and nothing was heard
    assert control.store.get(MONITOR_OWNER, "handed") is not None
    assert control.store.get(MONITOR_OWNER, "pipe") is not None
    assert control.events == []

    reply, _ = run(
        commands, client, "socket-add", id="http", addr={"type": "fd", "str": "handed"}, unit="web"
    )
    assert reply == {"return": {}}
    assert control.calls == [("add_socket", (unit_owner("web"), "http"))]
    assert control.events == [("FD_CLOSED", {"fdname": "handed", "owner": "monitor"})]
    reply, _ = run(commands, client, "query-sockets")
    [row] = reply["return"]
    assert row["id"] == "http" and row["unit"] == "web" and row["kind"] == "stream"
    assert row["address"].startswith("127.0.0.1:")


def test_socket_add_to_an_unknown_unit_says_so(control: FakeControl) -> None:
    reply, _ = run(
        Commands(control),
        FakeClient(),
        "socket-add",
        id="s",
        addr={"type": "inet", "host": "127.0.0.1", "port": "0"},
        unit="nope",
    )
    assert reply == {"error": {"class": "GenericError", "desc": "unit 'nope' not found"}}


def test_a_socket_added_without_a_unit_is_the_monitors(control: FakeControl) -> None:
    commands, client = Commands(control), FakeClient()
    assert run(
        commands,
        client,
        "socket-add",
        id="s",
        addr={"type": "inet", "host": "127.0.0.1", "port": "0"},
    )[0] == {"return": {}}
    reply, _ = run(commands, client, "query-sockets")
    assert [row["unit"] for row in reply["return"]] == [None]
    # it owns its fd: another socket-add cannot take it as a named fd
    reply, _ = run(commands, client, "socket-add", id="t", addr={"type": "fd", "str": "s"})
    assert "not an fd from getfd" in reply["error"]["desc"]


def test_typed_results(control: FakeControl) -> None:
    commands, client = Commands(control), FakeClient()
    assert run(commands, client, "query-services")[0] == {
        "return": [
            {
                "unit": "web",
                "state": "running",
                "pids": [42],
                "started": 1,
                "restarts": 1,
                "last-exit": {"signal": 9},
                "status": None,
            }
        ]
    }
    assert run(commands, client, "reload")[0] == {
        "return": {"summary": "1 unit unchanged", "waiting-for": []}
    }
    version = run(commands, client, "query-version")[0]["return"]
    assert version["qemu"] == {"major": 0, "minor": 0, "micro": 0}
    names = [c["name"] for c in run(commands, client, "query-commands")[0]["return"]]
    assert names[0] == "qmp_capabilities" and "socket-add" in names


def test_service_commands_and_the_one_error_mapping(control: FakeControl) -> None:
    commands, client = Commands(control), FakeClient()
    assert run(commands, client, "service-start", unit="web")[0] == {"return": {}}
    assert run(commands, client, "service-stop", unit="web")[0] == {"return": {}}
    assert control.calls == [("start", ("web", True)), ("stop", "web")]
    assert run(commands, client, "service-restart", unit="x")[0] == {
        "error": {"class": "GenericError", "desc": "unit 'x' not found"}
    }
    assert run(commands, client, "upgrade")[0]["error"]["desc"] == "upgrade refused"
    assert run(commands, client, "nope")[0] == {
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}
    }


def test_service_restart_answers_once_the_restart_is_over(control: FakeControl) -> None:
    """A rolling restart takes as long as its new workers' start: the reply waits for it."""
    commands, client = Commands(control), FakeClient()
    replies: list[dict[str, Any]] = []
    for request_id in (1, 2):
        deferred = commands.execute(
            client,  # type: ignore[arg-type]
            Execute("service-restart", {"unit": "web"}, id=request_id, has_id=True),
        )
        assert isinstance(deferred, DeferredReply)
        deferred.on_resolved(lambda line: replies.append(json.loads(line)))
    assert replies == [] and len(control.restarts) == 2
    control.restarts[0](None)
    control.restarts[1]("new worker 7 start timeout: no READY=1")
    control.restarts[1](None)  # told once: the first outcome stands
    assert replies == [
        {"return": {}, "id": 1},
        {
            "error": {"class": "GenericError", "desc": "new worker 7 start timeout: no READY=1"},
            "id": 2,
        },
    ]
