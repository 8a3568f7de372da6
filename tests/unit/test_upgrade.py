"""The handover state: what crosses an upgrade's exec, and the copies the new program tries on."""

from __future__ import annotations

import json
import os
import socket

import pytest

from fdsupervisor.upgrade import (
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
)


def state(fds: tuple[int, ...] = (10, 11), monitor_fd: int | None = 12) -> HandoverState:
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
        ),
        monitor_inode=4242,
    )


def test_the_old_configuration_crosses_the_exec() -> None:
    original = state()
    assert HandoverState.from_json(original.to_json()) == original
    line = RunConfig(command_line=CommandLineUnit((("http", "127.0.0.1:0"),), ("app", "-v"), True))
    with_line = HandoverState(argv=("run",), store=(), services={}, config=line)
    assert HandoverState.from_json(with_line.to_json()) == with_line


def test_a_state_from_a_program_without_the_fallback_still_reads() -> None:
    data = json.loads(state().to_json())
    del data["config"], data["monitor_inode"]
    old = HandoverState.from_json(json.dumps(data).encode())
    assert old.config is None and old.monitor_inode is None and old.fds == (10, 11, 12)


def test_an_unreadable_state_is_an_upgrade_error() -> None:
    data = json.loads(state().to_json())
    data["config"]["unit_files"] = [{"path": "x"}]
    with pytest.raises(UpgradeError, match="unreadable handover state"):
        HandoverState.from_json(json.dumps(data).encode())


def test_copies_are_other_numbers_for_the_same_files_and_close_alone() -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    originals = state(tuple(a.fileno() for a, _ in pairs[:2]), pairs[2][0].fileno())
    copies = copy_fds(originals)
    assert not set(copies.fds) & set(originals.fds)
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
