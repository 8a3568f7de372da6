"""The handover state: what crosses an upgrade's exec, and the copies the new program tries on."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.upgrade import (
    HANDOVER_ENV,
    STATE_VERSION,
    CommandLineUnit,
    HandoverState,
    RunConfig,
    ServiceItem,
    StoredItem,
    UnitFile,
    UpgradeError,
    WorkerItem,
    close_copies,
    close_originals,
    copy_fds,
    take_state,
    write_state,
)
from tests.conftest import open_fds


def state(
    fds: tuple[int, ...] = (10, 11), monitor_fd: int | None = 12, metrics_fd: int | None = None
) -> HandoverState:
    return HandoverState(
        argv=("run", "units"),
        store=tuple(StoredItem("unit:web", f"s{fd}", fd, True) for fd in fds),
        services={
            "web": ServiceItem("running", 0, None, None, None, 0, (WorkerItem(0, 7, 1.0, True),))
        },
        monitor_fd=monitor_fd,
        config=RunConfig(
            log_format="json",
            unit_paths=("units",),
            unit_files=(UnitFile("units/web.yaml", "sockets: {}\n"),),
            monitor_path="/run/m.sock",
            monitor_allowed_uids=(0, 1000),
            metrics_address="127.0.0.1:9469",
            worker_nofile_soft=1024,
        ),
        monitor_inode=4242,
        metrics=StoredItem("metrics", "metrics", metrics_fd, True) if metrics_fd else None,
    )


def test_the_old_configuration_crosses_the_exec() -> None:
    original = state()
    assert HandoverState.from_json(original.to_json()) == original
    metered = state(metrics_fd=13)
    assert HandoverState.from_json(metered.to_json()) == metered
    assert metered.fds == (10, 11, 13, 12)
    line = RunConfig(command_line=CommandLineUnit((("http", "127.0.0.1:0"),), ("app", "-v"), True))
    with_line = HandoverState(argv=("run",), store=(), services={}, config=line)
    assert HandoverState.from_json(with_line.to_json()) == with_line


def test_a_state_from_a_program_without_the_fallback_still_reads() -> None:
    data = json.loads(state(metrics_fd=13).to_json())
    del data["config"], data["monitor_inode"], data["metrics"]
    old = HandoverState.from_json(json.dumps(data).encode())
    assert old.config is None and old.monitor_inode is None and old.fds == (10, 11, 12)
    assert old.metrics is None


def test_an_unreadable_state_is_an_upgrade_error() -> None:
    data = json.loads(state().to_json())
    data["config"]["unit_files"] = [{"path": "x"}]
    with pytest.raises(UpgradeError, match="unreadable handover state"):
        HandoverState.from_json(json.dumps(data).encode())


def test_copies_are_other_numbers_for_the_same_files_and_close_alone() -> None:
    pairs = [socket.socketpair() for _ in range(4)]
    originals = state(
        tuple(a.fileno() for a, _ in pairs[:2]), pairs[2][0].fileno(), pairs[3][0].fileno()
    )
    copies = copy_fds(originals)
    assert len(copies.fds) == 4 and not set(copies.fds) & set(originals.fds)
    assert copies.metrics is not None and copies.metrics.fd in copies.fds
    for copy, original in zip(copies.fds, originals.fds, strict=True):
        assert os.fstat(copy).st_ino == os.fstat(original).st_ino
        assert not os.get_inheritable(copy)
    # One copy closed by a failed take-over and its number reused by another file:
    # that file stays open; the other copies close; the originals stay.
    os.close(copies.fds[0])
    reused = os.open(os.devnull, os.O_RDONLY)
    try:
        close_copies(copies, originals)
        os.fstat(reused)
        for copy in copies.fds[1:]:
            if copy != reused:
                with pytest.raises(OSError):
                    os.fstat(copy)
        for original in originals.fds:
            os.fstat(original)
    finally:
        os.close(reused)
    close_originals(originals)
    for a, b in pairs:
        a.detach()
        b.close()


def test_the_notify_fd_is_handed_over_and_read_back() -> None:
    state = HandoverState(
        ("run", "units"), (StoredItem("unit:web", "http", 5, True),), {}, 6, notify_fd=7
    )
    assert state.fds == (5, 6, 7)  # all made inheritable for the exec, none taken as inherited
    again = HandoverState.from_json(state.to_json())
    assert again == state and again.notify_fd == 7


def test_a_state_without_the_notify_fd_still_reads() -> None:
    """An older program's state: the new one binds a fresh notify socket."""
    raw = json.loads(HandoverState(("run",), (), {}, None, notify_fd=3).to_json())
    del raw["notify_fd"]
    state = HandoverState.from_json(json.dumps(raw).encode())
    assert state.notify_fd is None and state.fds == ()


# -- every state round-trips through its JSON -----------------------------------------------

_TEXT = st.text(max_size=12)
_FD = st.integers(3, 2**31 - 1)
_SMALL = st.integers(0, 2**32)
_STORED = st.builds(
    StoredItem,
    owner=_TEXT,
    name=_TEXT,
    fd=_FD,
    socket=st.booleans(),
    kind=st.sampled_from(["stream", "datagram", "seqpacket", "fifo"]),
    backlog=_SMALL,
    created_path=st.none() | _TEXT,
    created_inode=st.none() | st.tuples(_SMALL, _SMALL),
    watch_hangup=st.booleans(),
)
_WORKER = st.builds(
    WorkerItem,
    instance=_SMALL,
    pid=st.integers(1, 2**22),
    started_at=st.floats(0, 1e9, allow_nan=False),
    ready=st.booleans(),
    failure=st.none() | _TEXT,
)
_SERVICE = st.builds(
    ServiceItem,
    state=st.sampled_from(["inactive", "listening", "starting", "running", "stopping", "failed"]),
    restarts=_SMALL,
    last_exit=st.none()
    | st.dictionaries(st.sampled_from(["code", "signal"]), st.integers(0, 255), max_size=1),
    status=st.none() | _TEXT,
    failure=st.none() | _TEXT,
    connections=_SMALL,
    workers=st.lists(_WORKER, max_size=3).map(tuple),
)
_COMMAND_LINE = st.builds(
    CommandLineUnit,
    listens=st.lists(st.tuples(_TEXT, _TEXT), max_size=3).map(tuple),
    command=st.lists(_TEXT, min_size=1, max_size=3).map(tuple),
    accept=st.booleans(),
    on_demand=st.booleans(),
    inetd=st.booleans(),
)
_CONFIG = st.builds(
    RunConfig,
    log_format=st.sampled_from(["auto", "console", "json", "journal"]),
    max_stored_fds=_SMALL,
    unit_paths=st.lists(_TEXT, max_size=3).map(tuple),
    unit_files=st.lists(st.builds(UnitFile, path=_TEXT, text=st.text()), max_size=3).map(tuple),
    command_line=st.none() | _COMMAND_LINE,
    monitor_path=st.none() | _TEXT,
    monitor_allowed_uids=st.lists(_SMALL, max_size=3).map(tuple),
    use_cgroups=st.booleans(),
)
_STATES = st.builds(
    HandoverState,
    argv=st.lists(_TEXT, max_size=4).map(tuple),
    store=st.lists(_STORED, max_size=4).map(tuple),
    services=st.dictionaries(_TEXT, _SERVICE, max_size=3),
    monitor_fd=st.none() | _FD,
    notify_fd=st.none() | _FD,
    config=st.none() | _CONFIG,
    monitor_inode=st.none() | _SMALL,
)


@given(_STATES)
def test_every_state_reads_back_from_its_json_as_it_was(state: HandoverState) -> None:
    again = HandoverState.from_json(state.to_json())
    assert again == state
    assert again.fds == state.fds  # the store's fds, then the monitor's, then notify's
    assert again.to_json() == state.to_json()


def test_a_state_of_another_version_is_refused_by_name() -> None:
    data = json.loads(state().to_json())
    data["version"] = STATE_VERSION + 1
    with pytest.raises(UpgradeError, match=f"handover state version {STATE_VERSION + 1} is not"):
        HandoverState.from_json(json.dumps(data).encode())


def test_the_state_crosses_in_a_memfd_that_the_new_program_closes() -> None:
    """write_state in the old program, take_state in the new: nothing stays behind."""
    original = state()
    baseline = open_fds()
    fd = write_state(original)
    assert os.get_inheritable(fd), "it must survive the exec"
    environ = {HANDOVER_ENV: str(fd), "PATH": "/bin"}
    os.environ[HANDOVER_ENV] = str(fd)
    try:
        assert take_state(environ) == original
    finally:
        os.environ.pop(HANDOVER_ENV, None)
    assert HANDOVER_ENV not in environ and HANDOVER_ENV not in os.environ  # no worker sees it
    assert environ == {"PATH": "/bin"}
    assert open_fds() == baseline, "the memfd is closed once read"
    assert take_state({}) is None  # not an upgrade


@pytest.mark.parametrize(
    ("value", "message"),
    [("x", "is not an fd number"), ("999999", "cannot read the handover state from fd 999999")],
)
def test_a_bad_handover_variable_is_an_upgrade_error(value: str, message: str) -> None:
    with pytest.raises(UpgradeError, match=message):
        take_state({HANDOVER_ENV: value})
