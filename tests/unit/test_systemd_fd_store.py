"""systemd.SystemdFdStore: systemd's fd store kept in step with the supervisor's own.

The notifier is a plain recorder of what would be sent (it is ours, not the
kernel's); the sockets are real, bound by binding.py as the supervisor binds
them. tests/integration/test_systemd_protocol.py runs the same flow through a
real supervisor and a test standing in for systemd.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.binding import BoundSocket, InheritedFds, bind_socket
from fdsupervisor.errors import BindError
from fdsupervisor.fdstore import FdStore, unit_owner
from fdsupervisor.systemd import SystemdFdStore, SystemdSockets
from fdsupervisor.units import Unit, load_unit_text


class Messages:
    """Records what SystemdFdStore asks the notifier to send."""

    def __init__(
        self, *, enabled: bool = True, fd_store_max: int | None = None, fails: bool = False
    ) -> None:
        self.enabled = enabled
        self.fd_store_max = fd_store_max
        self.last_error: OSError | None = OSError("manager gone") if fails else None
        self.fails = fails
        self.sent: list[tuple[str, Any]] = []

    def store_fds(self, named: Sequence[tuple[str, int]], *, replace: bool = True) -> bool:
        self.sent.append(("store", [name for name, _ in named]))
        self.stored = dict(named)
        return not self.fails

    def remove_fds(self, name: str) -> bool:
        self.sent.append(("remove", name))
        return True

    def barrier(self, timeout: float = 5.0) -> bool:
        self.sent.append(("barrier", None))
        return True


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    warning = info

    def names(self) -> list[str]:
        return [event for event, _ in self.events]


def unit(text: str, base_dir: Path, name: str = "web") -> Unit:
    return load_unit_text(text, base_dir / f"{name}.yaml", base_dir)


def fd_unit_text(number: int) -> str:
    return f'sockets:\n  sd: {{listen: {{type: fd, str: "{number}"}}}}\nservice:\n  exec: [/bin/true]\n'


WEB = """
sockets:
  http: {listen: "127.0.0.1:0"}
  admin: {listen: {type: unix, path: run/admin.sock}}
service:
  exec: [/bin/true]
"""


@pytest.fixture
def store() -> Iterator[FdStore]:
    fds = FdStore()
    yield fds
    fds.close_all()


def bind_all(store: FdStore, *units: Unit) -> None:
    for each in units:
        for spec in each.sockets:
            bound = bind_socket(spec, base_dir=each.base_dir, inherited=InheritedFds(frozenset()))
            store.add(unit_owner(each.name), spec.name, bound)


def make(
    store: FdStore, messages: Messages, handed: SystemdSockets | None = None
) -> tuple[SystemdFdStore, Log]:
    log = Log()
    return SystemdFdStore(messages, handed or SystemdSockets(), store, log=log), log


# --------------------------------------------------------------------------- sync


def test_sync_stores_every_unit_file_socket_under_its_name(store: FdStore, tmp_path: Path) -> None:
    web = unit(WEB, tmp_path)
    bind_all(store, web)
    messages = Messages()
    systemd_store, _ = make(store, messages)
    systemd_store.sync([web])
    assert messages.sent == [("store", ["web/admin", "web/http"])]
    for name in ("admin", "http"):
        entry = store.get("unit:web", name)
        assert entry is not None and messages.stored[f"web/{name}"] == entry.fd
    assert systemd_store.kept == {"web/admin", "web/http"}


def test_sync_removes_what_the_supervisor_no_longer_holds(store: FdStore, tmp_path: Path) -> None:
    web = unit(WEB, tmp_path)
    bind_all(store, web)
    messages = Messages()
    systemd_store, _ = make(store, messages)
    systemd_store.sync([web])
    store.close("unit:web", "admin")  # socket-del, or a reload that closed it
    messages.sent.clear()
    systemd_store.sync([web])
    assert messages.sent == [("remove", "web/admin"), ("store", ["web/http"])]
    assert systemd_store.kept == {"web/http"}
    messages.sent.clear()
    systemd_store.sync([])  # the unit removed by a reload
    assert messages.sent == [("remove", "web/http")] and systemd_store.kept == frozenset()


def test_inherited_and_runtime_sockets_are_not_kept(store: FdStore, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as passed:
        number = os.dup(passed.fileno())
    inherited = InheritedFds(frozenset({number}))
    fd_unit = unit(
        fd_unit_text(number),
        tmp_path,
        "fromfd",
    )
    spec = fd_unit.sockets[0]
    store.add("unit:fromfd", "sd", bind_socket(spec, base_dir=tmp_path, inherited=inherited))
    extra = unit(
        'sockets:\n  x: {listen: "127.0.0.1:0"}\nservice:\n  exec: [/bin/true]\n', tmp_path
    )
    bind_all(store, extra)
    store.add("unit:fromfd", "added", store.take("unit:web", "x"))  # socket-add at run time
    messages = Messages()
    systemd_store, _ = make(store, messages)
    systemd_store.sync([fd_unit])
    assert messages.sent == [] and systemd_store.kept == frozenset()


def test_a_name_too_long_for_the_store_is_bound_anew_next_time(
    store: FdStore, tmp_path: Path
) -> None:
    name = "u" * 200
    long_unit = unit(
        f'sockets:\n  {"s" * 60}: {{listen: "127.0.0.1:0"}}\nservice:\n  exec: [/bin/true]\n',
        tmp_path,
        name,
    )
    bind_all(store, long_unit)
    messages = Messages()
    systemd_store, log = make(store, messages)
    systemd_store.sync([long_unit])
    assert messages.sent == [] and log.names() == ["socket_not_kept"]


def test_sync_warns_past_file_descriptor_store_max_and_on_failure(
    store: FdStore, tmp_path: Path
) -> None:
    web = unit(WEB, tmp_path)
    bind_all(store, web)
    systemd_store, log = make(store, Messages(fd_store_max=1, fails=True))
    systemd_store.sync([web])
    assert log.events == [
        ("fd_store_full", {"sockets": 2, "file_descriptor_store_max": 1}),
        ("fd_store_failed", {"error": "manager gone"}),
    ]


def test_without_a_manager_nothing_is_sent_or_kept(store: FdStore, tmp_path: Path) -> None:
    web = unit(WEB, tmp_path)
    bind_all(store, web)
    messages = Messages(enabled=False)
    systemd_store, _ = make(store, messages)
    systemd_store.sync([web])
    systemd_store.keep_socket_files()
    assert messages.sent == [] and systemd_store.kept == frozenset()
    store.close_all()
    assert not (tmp_path / "run" / "admin.sock").exists(), "removed at shutdown as usual"


# --------------------------------------------------------------------------- shutdown


def test_kept_sockets_keep_their_files_at_shutdown(store: FdStore, tmp_path: Path) -> None:
    web = unit(WEB, tmp_path)
    other = unit(
        "sockets:\n  s: {listen: {type: unix, path: run/other.sock}}\n"
        "service:\n  exec: [/bin/true]\n",
        tmp_path,
        "other",
    )
    bind_all(store, web, other)
    systemd_store, _ = make(store, Messages())
    systemd_store.sync([web])  # other's socket is not kept (as if not in the unit files)
    systemd_store.keep_socket_files()
    store.close_all()
    assert (tmp_path / "run" / "admin.sock").exists(), "systemd still holds that socket"
    assert not (tmp_path / "run" / "other.sock").exists()


# --------------------------------------------------------------------------- taking back


def handed_back(*named: tuple[str, socket.socket]) -> tuple[SystemdSockets, InheritedFds]:
    """What LISTEN_FDS hands a restarted supervisor: duplicates, as systemd's copies are."""
    numbers = [os.dup(sock.fileno()) for _, sock in named]
    return SystemdSockets(numbers, [name for name, _ in named]), InheritedFds(frozenset(numbers))


def test_a_stored_socket_that_fits_is_taken_back(store: FdStore, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as old:
        port = old.getsockname()[1]
        web = unit(
            f'sockets:\n  http: {{listen: "127.0.0.1:{port}"}}\nservice:\n  exec: [/bin/true]\n',
            tmp_path,
        )
        handed, inherited = handed_back(("web/http", old))
        messages = Messages()
        systemd_store, log = make(store, messages, handed)
        bound = systemd_store.take_back(web, web.sockets[0], inherited)
    assert isinstance(bound, BoundSocket)
    with bound.sock:
        assert bound.fileno() == handed.numbers[0] and bound.sock.getsockname()[1] == port
        assert inherited.unclaimed() == [] and messages.sent == []
        assert log.names() == ["socket_taken_back"]
        # taken once: the fd is the supervisor's now, not systemd's to hand out again
        assert systemd_store.take_back(web, web.sockets[0], inherited) is None


def test_a_stale_stored_socket_is_closed_here_and_in_systemd(
    store: FdStore, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as old:
        web = unit(WEB, tmp_path)  # port 0 fits any port, but admin is not a TCP socket
        handed, inherited = handed_back(("web/admin", old))
        messages = Messages()
        systemd_store, log = make(store, messages, handed)
        spec = next(s for s in web.sockets if s.name == "admin")
        assert systemd_store.take_back(web, spec, inherited) is None
    with pytest.raises(OSError):
        os.fstat(handed.numbers[0])
    assert messages.sent == [("remove", "web/admin"), ("barrier", None)], "closed before binding"
    assert log.names() == ["stored_socket_dropped"]
    assert "unit declares" in log.events[0][1]["reason"]


def test_a_stored_socket_that_is_not_listening_is_dropped(store: FdStore, tmp_path: Path) -> None:
    with socket.socket() as unbound:
        unbound.bind(("127.0.0.1", 0))
        web = unit(WEB, tmp_path)
        handed, inherited = handed_back(("web/http", unbound))
        messages = Messages()
        systemd_store, log = make(store, messages, handed)
        assert systemd_store.take_back(web, web.sockets[0], inherited) is None
    assert log.events[0][1]["reason"] == "it is not listening"
    assert messages.sent == [("remove", "web/http"), ("barrier", None)]


def test_nothing_is_taken_for_fd_sockets_or_names_not_handed_back(
    store: FdStore, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as old:
        handed, inherited = handed_back(("web/sd", old), ("web/other", old))
    fd_unit = unit(
        fd_unit_text(handed.numbers[0]),
        tmp_path,
    )
    web = unit(WEB, tmp_path)
    messages = Messages()
    systemd_store, log = make(store, messages, handed)
    try:
        assert systemd_store.take_back(fd_unit, fd_unit.sockets[0], inherited) is None
        assert systemd_store.take_back(web, web.sockets[0], inherited) is None
        assert messages.sent == [] and log.events == []
        assert inherited.unclaimed() == sorted(handed.numbers), "closed with the unclaimed"
    finally:
        inherited.close_unclaimed()


def test_a_taken_back_fd_that_is_claimed_twice_is_a_bind_error(
    store: FdStore, tmp_path: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as old:
        handed, inherited = handed_back(("web/http", old))
    inherited.claim(handed.numbers[0], "sd")  # a unit's {type: fd} got there first
    web = unit(WEB, tmp_path)
    systemd_store, _ = make(store, Messages(), handed)
    try:
        with pytest.raises(BindError, match="already backs socket 'sd'"):
            systemd_store.take_back(web, web.sockets[0], inherited)
    finally:
        os.close(handed.numbers[0])


def test_unclaimed_handed_fds_are_removed_from_systemd_by_name(store: FdStore) -> None:
    handed = SystemdSockets([3, 4, 5], ["old/gone", "old/gone", "web/http"])
    messages = Messages()
    systemd_store, _ = make(store, messages, handed)
    systemd_store.drop_unclaimed([3, 4])
    assert messages.sent == [("remove", "old/gone")]
