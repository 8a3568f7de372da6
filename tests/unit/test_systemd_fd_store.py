"""systemd.SystemdFdStore: systemd's fd store kept in step with the supervisor's own.

The notifier is a plain recorder of what would be sent (it is ours, not the
kernel's); the sockets are real, bound by binding.py as the supervisor binds
them. tests/integration/test_systemd_protocol.py runs the same flow through a
real supervisor and a test standing in for systemd.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.addresses import NAME_RE
from fdsupervisor.binding import BoundSocket, InheritedFds, bind_socket
from fdsupervisor.errors import BindError
from fdsupervisor.fdpassing import fdname_is_valid
from fdsupervisor.fdstore import FdStore, RawFd, unit_owner
from fdsupervisor.systemd import KeptKind, KeptName, SystemdFdStore, SystemdSockets, kept_name
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
        self.sent.append(("store-replacing" if replace else "store", [name for name, _ in named]))
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
    assert messages.sent == [("remove", "web/admin")], "web/http is kept as it was"
    assert systemd_store.kept == {"web/http"}
    messages.sent.clear()
    systemd_store.sync([])  # the unit removed by a reload
    assert messages.sent == [("remove", "web/http")] and systemd_store.kept == frozenset()


def test_inherited_sockets_are_not_kept_runtime_sockets_are(store: FdStore, tmp_path: Path) -> None:
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
    assert messages.sent == [("store", ["fromfd/+added"])]
    assert systemd_store.kept == {"fromfd/+added"}


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
    assert messages.sent == [] and log.names() == ["fd_not_kept"]
    systemd_store.sync([long_unit])
    assert log.names() == ["fd_not_kept"], "warned about once"


def test_sync_warns_past_file_descriptor_store_max_and_on_failure(
    store: FdStore, tmp_path: Path
) -> None:
    web = unit(WEB, tmp_path)
    bind_all(store, web)
    systemd_store, log = make(store, Messages(fd_store_max=1, fails=True))
    systemd_store.sync([web])
    assert log.events == [
        ("fd_store_full", {"fds": 2, "file_descriptor_store_max": 1}),
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


# --------------------------------------------------------------------------- the whole store


@pytest.mark.parametrize(
    ("kept", "fdname"),
    [
        (KeptName("declared", "web", "http"), "web/http"),
        (KeptName("runtime", "web.v2", "extra"), "web.v2/+extra"),
        (KeptName("stored", "web", "state", watch=True), "web/=state"),
        (KeptName("stored", "web", "state"), "web/~state"),
        (KeptName("monitor-socket", None, "sock"), "/+sock"),
        (KeptName("monitor-fd", None, "vm0"), "/=vm0"),
    ],
)
def test_each_kind_of_entry_has_a_name_read_back_one_way(kept: KeptName, fdname: str) -> None:
    assert kept.fdname == fdname and kept_name(fdname) == kept
    assert fdname_is_valid(fdname)


@given(
    kind=st.sampled_from(["declared", "runtime", "stored", "monitor-socket", "monitor-fd"]),
    unit=st.from_regex(NAME_RE, fullmatch=True),
    name=st.from_regex(NAME_RE, fullmatch=True),
    watch=st.booleans(),
)
def test_kept_names_round_trip(kind: KeptKind, unit: str, name: str, watch: bool) -> None:
    monitor = kind.startswith("monitor")
    kept = KeptName(kind, None if monitor else unit, name, watch=watch and kind == "stored")
    assert kept_name(kept.fdname) == kept


@pytest.mark.parametrize(
    "fdname", ["web", "web/+", "/http", "/~x", "we b/x", "web/+=x", "web-http"]
)
def test_names_not_of_the_scheme_are_not_read(fdname: str) -> None:
    assert kept_name(fdname) is None


def test_sync_sends_only_what_changed(store: FdStore, tmp_path: Path) -> None:
    """A second fd of a name is stored beside the first; losing one restores the rest."""
    web = unit(WEB, tmp_path)
    bind_all(store, web)
    messages = Messages()
    systemd_store, _ = make(store, messages)
    systemd_store.sync([web])
    messages.sent.clear()
    a, b = socket.socketpair()
    store.on_change = lambda event, entry: systemd_store.changed([web], entry)
    store.add("service:web", "pair", RawFd(a.detach()), watch=True)
    store.add("service:web", "pair", RawFd(b.detach()), watch=True)
    assert messages.sent == [("store", ["web/=pair"]), ("store", ["web/=pair"])]
    first = store.named("service:web", "pair")[0]
    messages.sent.clear()
    store.close_entry(first)  # a hang-up: just that fd
    assert messages.sent == [("store-replacing", ["web/=pair"])]
    messages.sent.clear()
    store.close("service:web", "pair")
    assert messages.sent == [("remove", "web/=pair")]
    assert systemd_store.kept == {"web/admin", "web/http"}


def test_a_change_looks_only_at_its_own_name(
    store: FdStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An FDSTORE=1 or getfd fstat()s its own fds, not every socket of every unit."""
    from fdsupervisor import systemd

    units = [
        unit(WEB.replace("run/admin.sock", f"run/admin{i}.sock"), tmp_path, name=f"web{i}")
        for i in range(20)
    ]
    bind_all(store, *units)
    messages = Messages()
    systemd_store, _ = make(store, messages)
    systemd_store.sync(units)
    looked: list[int] = []
    identity = systemd._identity
    monkeypatch.setattr(systemd, "_identity", lambda fd: looked.append(fd) or identity(fd))
    store.on_change = lambda event, entry: systemd_store.changed(units, entry)
    a, b = socket.socketpair()
    b.close()
    store.add("service:web3", "pair", RawFd(a.detach()), watch=True)
    assert len(looked) == 1
    assert messages.sent[-1] == ("store", ["web3/=pair"])
    assert len(systemd_store.kept) == 2 * 20 + 1


def test_restore_puts_every_entry_back_and_drops_what_cannot_be(
    store: FdStore, tmp_path: Path
) -> None:
    web = unit(WEB.replace("exec: [/bin/true]", "exec: [/bin/true]\n  fd-store-max: 3"), tmp_path)
    with (
        socket.create_server(("127.0.0.1", 0)) as extra,
        socket.create_server(("127.0.0.1", 0)) as lone,
        socket.create_server(("127.0.0.1", 0)) as gone,
        socket.create_server(("127.0.0.1", 0)) as admin_clash,
    ):
        pair = socket.socketpair()
        read_end, write_end = os.pipe()
        with open(write_end, "wb"), socket.socket() as plain:
            handed, inherited = handed_back(
                ("web/+extra", extra),
                ("web/=pair", pair[0]),
                ("web/~pair", pair[1]),
                ("/+lone", lone),
                ("/=vm0", plain),
                ("old/+gone", gone),
                ("web/+admin", admin_clash),
                ("web/=state", plain),
                ("web/=over", lone),
            )
            messages = Messages()
            systemd_store, log = make(store, messages, handed)
            systemd_store.restore([web], inherited)
        for sock in pair:
            sock.close()
        os.close(read_end)
    try:
        assert sorted((e.owner, e.name) for e in store) == [
            ("monitor", "lone"),
            ("monitor", "vm0"),
            ("service:web", "pair"),
            ("service:web", "pair"),
            ("service:web", "state"),
            ("unit:web", "extra"),
        ]
        assert isinstance(store.get("unit:web", "extra").resource, BoundSocket)  # type: ignore[union-attr]
        assert isinstance(store.get("monitor", "lone").resource, BoundSocket)  # type: ignore[union-attr]
        assert isinstance(store.get("monitor", "vm0").resource, RawFd)  # type: ignore[union-attr]
        watched = [store.watches(e) for e in store.named("service:web", "pair")]
        assert watched == [True, False], "each fd with its own FDPOLL"
        dropped = [fields for event, fields in log.events if event == "stored_entry_dropped"]
        assert [(d["fdname"], d["reason"]) for d in dropped] == [
            ("old/+gone", "its unit old is gone"),
            ("web/+admin", "unit web now declares a socket admin itself"),
            ("web/=over", "the unit's fd-store-max is 3"),
        ]
        assert messages.sent == [
            ("remove", "old/+gone"),
            ("remove", "web/+admin"),
            ("remove", "web/=over"),
            ("barrier", None),
        ]
        closed = [handed.numbers[5], handed.numbers[6], handed.numbers[8]]
        for number in closed:
            with pytest.raises(OSError):
                os.fstat(number)
        assert inherited.unclaimed() == [], "every handed fd was claimed or closed"
    finally:
        store.close_all()


class Manager:
    """systemd's fd store as a model: FDNAME → the files it holds, one copy of each file."""

    enabled = True
    fd_store_max = None
    last_error = None

    def __init__(self) -> None:
        self.held: list[tuple[str, tuple[int, int]]] = []

    def store_fds(self, named: Sequence[tuple[str, int]], *, replace: bool = True) -> bool:
        if replace:
            for name in {name for name, _ in named}:
                self.remove_fds(name)
        for name, fd in named:
            identity = (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            if all(held != identity for _, held in self.held):  # same_fd(): kept once
                self.held.append((name, identity))
        return True

    def remove_fds(self, name: str) -> bool:
        self.held = [(n, identity) for n, identity in self.held if n != name]
        return True

    def barrier(self, timeout: float = 5.0) -> bool:
        return True


OPS = st.lists(
    st.tuples(
        st.sampled_from(["store", "store-unpolled", "getfd", "close-one", "close-name", "closefd"]),
        st.sampled_from(["a", "b"]),
    ),
    max_size=12,
)


@given(ops=OPS)
def test_after_every_change_systemd_holds_exactly_the_store(ops: list[tuple[str, str]]) -> None:
    """Whatever the order of changes, each message leaves systemd's store as ours is.

    So a crash between two changes restores exactly what was stored.
    """
    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        web = unit(WEB.replace("exec: [/bin/true]", "exec: [/bin/true]\n  fd-store-max: 9"), base)
        store = FdStore()
        bind_all(store, web)
        manager = Manager()
        systemd_store = SystemdFdStore(manager, SystemdSockets(), store, log=Log())
        store.on_change = lambda event, entry: systemd_store.changed([web], entry)
        systemd_store.sync([web])
        peers = []
        try:
            for op, name in ops:
                if op in ("store", "store-unpolled", "getfd"):
                    mine, peer = socket.socketpair()
                    peers.append(peer)
                    owner = "monitor" if op == "getfd" else "service:web"
                    store.add(
                        owner,
                        name,
                        RawFd(mine.detach()),
                        replace=op == "getfd",
                        watch=op == "store",
                    )
                elif op == "close-one" and store.named("service:web", name):
                    store.close_entry(store.named("service:web", name)[0])
                elif op == "close-name" and store.named("service:web", name):
                    store.close("service:web", name)
                elif op == "closefd" and store.get("monitor", name) is not None:
                    store.close("monitor", name)
                expected = []
                for entry in store:
                    info = os.fstat(entry.fd)
                    if entry.owner == "monitor":
                        fdname = f"/={entry.name}"
                    elif entry.owner == "service:web":
                        fdname = f"web/{'=' if store.watches(entry) else '~'}{entry.name}"
                    else:
                        fdname = f"web/{entry.name}"
                    expected.append((fdname, (info.st_dev, info.st_ino)))
                assert sorted(manager.held) == sorted(expected)
        finally:
            store.close_all()
            for peer in peers:
                peer.close()
