"""The fd-passing protocol's facts: SCM_RIGHTS data in and out, and the numbers stated once."""

from __future__ import annotations

import array
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor import fdpassing
from fdsupervisor.fdpassing import (
    FD_SIZE,
    LISTEN_FDS_START,
    SCM_MAX_FD,
    SUPERVISOR_ONLY_ENV,
    fds_from_ancillary,
    rights,
    rights_space,
    scrub_environment,
)
from fdsupervisor.spawn import native_spawn_available
from tests.conftest import open_fds

RIGHTS = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
CREDENTIALS = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)


def ints(*numbers: int) -> bytes:
    return array.array("i", numbers).tobytes()


def test_fds_of_every_rights_message_in_order() -> None:
    ancillary = [(*RIGHTS, ints(7, 8)), (*CREDENTIALS, ints(1, 0, 0)), (*RIGHTS, ints(9))]
    assert fds_from_ancillary(ancillary) == [7, 8, 9]


def test_other_levels_and_kinds_are_not_fds() -> None:
    ancillary = [(*CREDENTIALS, ints(5, 0, 0)), (socket.IPPROTO_IP, socket.SCM_RIGHTS, ints(4))]
    assert fds_from_ancillary(ancillary) == []
    assert fds_from_ancillary([]) == []


def test_a_partial_int_at_the_end_is_ignored() -> None:
    """A control buffer cut short: CPython's socket.recv_fds() drops the partial int too."""
    assert fds_from_ancillary([(*RIGHTS, ints(11, 12) + b"\x01\x02")]) == [11, 12]
    assert fds_from_ancillary([(*RIGHTS, b"\x01")]) == []


@given(st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=SCM_MAX_FD), max_size=4))
def test_parsing_what_rights_sends(batches: list[list[int]]) -> None:
    ancillary = [rights(batch) for batch in batches]
    assert fds_from_ancillary(ancillary) == [fd for batch in batches for fd in batch]


def test_rights_round_trip_through_a_real_socket() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    with a, b:
        try:
            before = open_fds()
            a.sendmsg([b" "], [rights([r, w])])
            _data, ancillary, flags, _ = b.recvmsg(1, rights_space(SCM_MAX_FD))
            assert not flags & socket.MSG_CTRUNC
            received = fds_from_ancillary(ancillary)
            try:
                assert len(received) == 2
                assert [os.fstat(fd).st_ino for fd in received] == [
                    os.fstat(r).st_ino,
                    os.fstat(w).st_ino,
                ]
            finally:
                for fd in received:
                    os.close(fd)
            assert open_fds() == before
        finally:
            os.close(r)
            os.close(w)


def test_rights_space_holds_that_many_fds() -> None:
    assert rights_space(1) == socket.CMSG_SPACE(FD_SIZE)
    assert rights_space(SCM_MAX_FD) >= socket.CMSG_LEN(SCM_MAX_FD * FD_SIZE)


def test_the_supervisors_own_variables() -> None:
    assert set(SUPERVISOR_ONLY_ENV) == {
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "LISTEN_PIDFDID",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "FDSTORE",
    }
    environ = {name: "theirs" for name in SUPERVISOR_ONLY_ENV} | {"PATH": "/bin", "LANG": "C"}
    assert scrub_environment(environ) == {"PATH": "/bin", "LANG": "C"}


@pytest.mark.skipif(not native_spawn_available(), reason="fdsupervisor._spawn is not built")
def test_the_c_extension_places_fds_from_the_same_number() -> None:
    from fdsupervisor import _spawn

    assert _spawn.LISTEN_FDS_START == LISTEN_FDS_START == 3


def test_one_parser_and_one_name_rule() -> None:
    """The modules that speak the protocol use these, they do not restate them."""
    from fdsupervisor import ctl, monitor, notify, systemd

    for module in (ctl, monitor, notify):
        assert module.fds_from_ancillary is fds_from_ancillary  # type: ignore[attr-defined]
    for module in (notify, systemd):
        assert module.fdname_is_valid is fdpassing.fdname_is_valid  # type: ignore[attr-defined]


def test_same_file_tells_a_duplicate_from_another_open(tmp_path: Path) -> None:
    """systemd's same_fd(): one open file description, not merely one inode."""
    path = tmp_path / "f"
    path.write_text("x")
    first = os.open(path, os.O_RDONLY)
    again = os.open(path, os.O_RDONLY)  # same inode, another description
    duplicate = os.dup(first)
    a, b = socket.socketpair()
    try:
        assert fdpassing.same_file(first, duplicate) and fdpassing.same_file(duplicate, first)
        assert not fdpassing.same_file(first, again)
        assert os.get_blocking(first) and os.get_blocking(again), "the flip is undone"
        assert fdpassing.same_file(a.fileno(), a.fileno()) and not fdpassing.same_file(
            a.fileno(), b.fileno()
        )
        assert not fdpassing.same_file(first, a.fileno())
    finally:
        for fd in (first, again, duplicate):
            os.close(fd)
        a.close()
        b.close()
