"""supervisor.Supervisor in this process, through the public start-up steps only.

Units loaded from a temp dir (``units.load_units``), ``bind_all``, the
store's entries, then the store closed: the part of the Supervisor that the
split into runners keeps as it is. Everything after start-up (workers,
signals, the monitor) is the ``supervisor`` fixture's, on a real process.
"""

from __future__ import annotations

import gc
import io
import json
import socket
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.binding import InheritedFds, describe_socket
from fdsupervisor.log import make_logger
from fdsupervisor.supervisor import Supervisor
from fdsupervisor.units import load_units
from tests.conftest import open_fds

WEB = """
    sockets:
      http: {listen: "127.0.0.1:0"}
      admin: {listen: "unix:admin.sock"}
    service:
      exec: [/bin/true]
    """
EVENTS = """
    sockets:
      events: {listen: "127.0.0.1:0", kind: datagram}
    service:
      exec: [/bin/true]
    """


def write_units(directory: Path, units: dict[str, str]) -> Path:
    directory.mkdir()
    for name, text in units.items():
        (directory / f"{name}.yaml").write_text(textwrap.dedent(text))
    return directory


def logged(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def supervisor_for(directory: Path, stream: io.StringIO) -> Supervisor:
    return Supervisor(
        load_units([directory]),
        log=make_logger("json", stream),
        inherited=InheritedFds(frozenset()),
        environ={},
    )


def test_bind_all_puts_every_unit_socket_in_the_store_and_closing_it_frees_them(
    tmp_path: Path,
) -> None:
    gc.collect()  # sockets earlier tests left to the collector: closed now, not mid-test
    baseline = open_fds()
    units = write_units(tmp_path / "units", {"web": WEB, "events": EVENTS})
    stream = io.StringIO()
    supervisor = supervisor_for(units, stream)
    supervisor.bind_all()

    entries = {(entry.owner, entry.name): entry for entry in supervisor.store}
    assert sorted(entries) == [
        ("unit:events", "events"),
        ("unit:web", "admin"),
        ("unit:web", "http"),
    ]
    http = describe_socket(entries["unit:web", "http"].fd)
    assert (http.family, http.kind, http.listening) == ("inet", "stream", True)
    admin = describe_socket(entries["unit:web", "admin"].fd)
    assert (admin.family, admin.kind, admin.listening) == ("unix", "stream", True)
    assert (units / "admin.sock").is_socket()
    events = describe_socket(entries["unit:events", "events"].fd)
    assert (events.family, events.kind) == ("inet", "datagram")
    # what the log says is bound is what the store holds (the fixture waits on these events)
    bound = {(e["unit"], e["socket"]): e for e in logged(stream) if e["event"] == "socket_bound"}
    assert sorted(bound) == [("events", "events"), ("web", "admin"), ("web", "http")]
    assert bound["web", "http"]["address"] == http.address
    assert bound["web", "http"]["fd"] == entries["unit:web", "http"].fd
    host, port = http.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10):
        pass  # listening: the kernel completes the handshake, the backlog holds it

    supervisor.store.close_all()
    assert len(supervisor.store) == 0
    assert not (units / "admin.sock").exists(), "the socket file it created is removed"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=10)
    del supervisor
    gc.collect()
    assert open_fds() == baseline, "a socket or the loop stayed open"
