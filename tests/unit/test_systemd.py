"""The pure parts of systemd.py: messages, watchdog, LISTEN_* parsing, fd store names.

The notifier is given a ``send`` that records what would go to
``systemd.daemon.notify``; tests/integration/test_systemd_protocol.py
sends the same messages over a real socket.
"""

from __future__ import annotations

import os
import string
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.addresses import NAME_RE
from fdsupervisor.fdpassing import (
    FDNAME_MAX,
    SCM_MAX_FD,
    SUPERVISOR_ONLY_ENV,
    fdname_is_valid,
    scrub_environment,
)
from fdsupervisor.systemd import (
    SystemdNotifier,
    SystemdSockets,
    adoptable,
    fd_store_name,
    notify_message,
    parse_fd_store_name,
)

NOTIFY_ENV = {"NOTIFY_SOCKET": "/run/systemd/notify"}


class Recorder:
    """Stands in for ``systemd.daemon.notify(status, unset_environment, pid, fds)``."""

    def __init__(self, result: object = True, error: OSError | None = None) -> None:
        self.sent: list[tuple[str, list[int]]] = []
        self.result = result
        self.error = error

    def __call__(self, message: str, *args: Any) -> object:
        if self.error is not None:
            raise self.error
        fds = list(args[2]) if len(args) >= 3 and args[2] else []
        assert not args or args[:2] == (False, 0)
        self.sent.append((message, fds))
        return self.result


def notifier(
    environ: dict[str, str] | None = None, **kwargs: Any
) -> tuple[SystemdNotifier, Recorder]:
    recorder = Recorder()
    return SystemdNotifier(
        NOTIFY_ENV if environ is None else environ, send=recorder, **kwargs
    ), recorder


# --------------------------------------------------------------------------- messages


def test_message_is_key_value_lines_in_order() -> None:
    assert notify_message([("READY", "1"), ("STATUS", "2 units")]) == "READY=1\nSTATUS=2 units"


@pytest.mark.parametrize(
    ("key", "value"),
    [("ready", "1"), ("", "1"), ("A-B", "1"), ("STATUS", "a\nREADY=1"), ("STATUS", "a\0b")],
)
def test_message_refuses_what_would_change_its_fields(key: str, value: str) -> None:
    with pytest.raises(ValueError):
        notify_message([(key, value)])


def test_readiness_messages() -> None:
    n, sent = notifier()
    assert n.ready("3 units, 4 sockets")
    assert n.status("serving")
    assert n.stopping()
    assert [m for m, _ in sent.sent] == [
        "READY=1\nSTATUS=3 units, 4 sockets",
        "STATUS=serving",
        "STOPPING=1\nSTATUS=stopping",
    ]


def test_status_text_cannot_inject_fields() -> None:
    n, sent = notifier()
    n.status("bad unit\nREADY=1\0x")
    n.ready("line one\r\nline two")
    assert sent.sent[0][0] == "STATUS=bad unit READY=1 x"
    assert sent.sent[1][0] == "READY=1\nSTATUS=line one line two"


def test_reloading_carries_the_monotonic_clock_in_microseconds() -> None:
    n, sent = notifier()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = sent.sent[0][0].split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].removeprefix("MONOTONIC_USEC=")) <= after
    assert lines[2] == "STATUS=reloading"


def test_ping() -> None:
    n, sent = notifier()
    n.ping()
    assert sent.sent == [("WATCHDOG=1", [])]


def test_nothing_is_sent_without_notify_socket() -> None:
    n, sent = notifier({})
    assert not n.enabled
    assert not n.ready("x")
    assert not n.ping()
    assert not n.store_fds([("web/http", 3)])
    assert not n.remove_fds("web/http")
    assert sent.sent == []
    assert notifier({"NOTIFY_SOCKET": ""})[0].enabled is False


def test_a_failed_send_is_reported_not_raised() -> None:
    error = ConnectionRefusedError(111, "Connection refused")
    n = SystemdNotifier(NOTIFY_ENV, send=Recorder(error=error))
    assert n.ready("x") is False
    assert n.last_error is error


def test_false_from_send_means_not_sent() -> None:
    n = SystemdNotifier(NOTIFY_ENV, send=Recorder(result=False))
    assert n.ping() is False


# --------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "1"}, 0.0000005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # another process's
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "0"}, None),  # parse_pid(): > 0
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),  # timestamp_is_set(): not 0 ...
        ({"WATCHDOG_USEC": str(2**64 - 1)}, None),  # ... and not USEC_INFINITY
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "-1"}, None),
        ({"WATCHDOG_USEC": "+5"}, None),
        ({"WATCHDOG_USEC": " 5"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_PID": "4242"}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_when_it_is_ours(
    environ: dict[str, str], expected: float | None
) -> None:
    n = SystemdNotifier(environ, pid=4242, send=Recorder())
    assert n.watchdog_interval() == expected


def test_watchdog_does_not_need_notify_socket_to_be_read() -> None:
    # The interval is a fact about the environment; ping() alone checks NOTIFY_SOCKET.
    n = SystemdNotifier({"WATCHDOG_USEC": "2000000"}, pid=1, send=Recorder())
    assert n.watchdog_interval() == 1.0
    assert n.ping() is False


@pytest.mark.parametrize(("value", "expected"), [("512", 512), (None, None), ("x", None)])
def test_fd_store_max_from_fdstore_variable(value: str | None, expected: int | None) -> None:
    environ = dict(NOTIFY_ENV) if value is None else {**NOTIFY_ENV, "FDSTORE": value}
    assert SystemdNotifier(environ, send=Recorder()).fd_store_max == expected


# --------------------------------------------------------------------------- fd store messages


def test_store_fds_replaces_each_name_then_stores_its_fds() -> None:
    n, sent = notifier()
    assert n.store_fds([("web/http", 7), ("web/admin", 8), ("web/http", 9)])
    assert sent.sent == [
        ("FDSTOREREMOVE=1\nFDNAME=web/http", []),
        ("FDSTORE=1\nFDNAME=web/http", [7, 9]),
        ("FDSTOREREMOVE=1\nFDNAME=web/admin", []),
        ("FDSTORE=1\nFDNAME=web/admin", [8]),
    ]


def test_store_fds_without_replace() -> None:
    n, sent = notifier()
    n.store_fds([("web/http", 7)], replace=False)
    assert sent.sent == [("FDSTORE=1\nFDNAME=web/http", [7])]


def test_store_fds_splits_at_scm_max_fd() -> None:
    n, sent = notifier()
    fds = list(range(10, 10 + SCM_MAX_FD + 47))
    n.store_fds([("many", fd) for fd in fds])
    assert [m for m, _ in sent.sent] == [
        "FDSTOREREMOVE=1\nFDNAME=many",
        "FDSTORE=1\nFDNAME=many",
        "FDSTORE=1\nFDNAME=many",
    ]
    assert sent.sent[1][1] + sent.sent[2][1] == fds
    assert len(sent.sent[1][1]) == SCM_MAX_FD


def test_barrier_returns_once_the_manager_closed_its_end() -> None:
    n, sent = notifier()
    assert n.barrier(timeout=5)  # the recorder keeps no copy: "processed" at once
    assert sent.sent[0][0] == "BARRIER=1"
    assert len(sent.sent[0][1]) == 1
    with pytest.raises(OSError):
        os.fstat(sent.sent[0][1][0])  # our copy of the write end is closed


def test_barrier_times_out_while_the_manager_holds_the_pipe() -> None:
    held: list[int] = []

    def hold(message: str, *args: Any) -> bool:
        held.extend(os.dup(fd) for fd in args[2])
        return True

    n = SystemdNotifier(NOTIFY_ENV, send=hold)
    start = time.monotonic()
    assert n.barrier(timeout=0.2) is False
    assert time.monotonic() - start >= 0.2
    for fd in held:
        os.close(fd)


def test_barrier_disabled_or_failed() -> None:
    assert notifier({})[0].barrier() is False
    failing = SystemdNotifier(NOTIFY_ENV, send=Recorder(error=BrokenPipeError(32, "x")))
    assert failing.barrier() is False


def test_remove_fds() -> None:
    n, sent = notifier()
    n.remove_fds("old/gone")
    assert sent.sent == [("FDSTOREREMOVE=1\nFDNAME=old/gone", [])]


@pytest.mark.parametrize("name", ["a:b", "tab\there", "x" * 256, "new\nline", "é"])
def test_invalid_fd_names_are_refused_even_when_disabled(name: str) -> None:
    for environ in (NOTIFY_ENV, {}):
        n, _ = notifier(environ)
        with pytest.raises(ValueError):
            n.store_fds([(name, 3)])
        with pytest.raises(ValueError):
            n.remove_fds(name)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("", True),
        ("web/http", True),
        ("a b~!", True),
        ("x" * FDNAME_MAX, True),
        ("x" * (FDNAME_MAX + 1), False),
        ("a:b", False),
        ("\x1f", False),
        ("\x7f", False),
        ("ü", False),
    ],
)
def test_fdname_is_valid_as_systemd(name: str, valid: bool) -> None:
    assert fdname_is_valid(name) is valid


# --------------------------------------------------------------------------- LISTEN_*


def listen_env(pid: int = 100, fds: str | None = "2", names: str | None = "a:b") -> dict[str, str]:
    environ = {"LISTEN_PID": str(pid)}
    if fds is not None:
        environ["LISTEN_FDS"] = fds
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    return environ


def test_listen_fds_for_us() -> None:
    sockets = SystemdSockets.from_environment(listen_env(), 100)
    assert sockets.numbers == [3, 4]
    assert sockets.names == ["a", "b"]
    assert sockets.by_name == {"a": [3], "b": [4]}
    assert sockets.problem is None


def test_listen_fds_for_another_process_are_ignored() -> None:
    assert SystemdSockets.from_environment(listen_env(pid=101), 100) == SystemdSockets()
    assert SystemdSockets.from_environment({"LISTEN_FDS": "2"}, 100) == SystemdSockets()
    assert SystemdSockets.from_environment(listen_env(fds=None), 100) == SystemdSockets()
    assert SystemdSockets.from_environment({**listen_env(), "LISTEN_PID": "x"}, 100).numbers == []


def test_names_default_to_unknown() -> None:
    sockets = SystemdSockets.from_environment(listen_env(fds="3", names=None), 100)
    assert sockets.by_name == {"unknown": [3, 4, 5]}
    assert sockets.problem is None


def test_names_are_not_coalesced_and_need_not_be_unique() -> None:
    sockets = SystemdSockets.from_environment(listen_env(fds="4", names="a::a:"), 100)
    assert sockets.names == ["a", "", "a", ""]
    assert sockets.by_name == {"a": [3, 5], "": [4, 6]}


def test_a_wrong_name_count_keeps_the_fds_but_not_the_names() -> None:
    sockets = SystemdSockets.from_environment(listen_env(fds="2", names="web/http"), 100)
    assert sockets.numbers == [3, 4]
    assert sockets.names == ["unknown", "unknown"]
    assert sockets.problem is not None and "1 names for 2 fds" in sockets.problem
    assert adoptable(sockets) == {}


@pytest.mark.parametrize("count", ["0", "-1", "x", "", " 2", str(2**31)])
def test_a_bad_count_is_a_problem_and_no_fds(count: str) -> None:
    sockets = SystemdSockets.from_environment(listen_env(fds=count), 100)
    assert sockets.numbers == []
    assert sockets.problem is not None


@given(
    pid=st.integers(1, 2**22),
    claimed=st.integers(-5, 2**22),
    count=st.text(max_size=6),
    names=st.none() | st.text(max_size=30),
)
def test_from_environment_never_raises_and_is_consistent(
    pid: int, claimed: int, count: str, names: str | None
) -> None:
    environ = {"LISTEN_PID": str(claimed), "LISTEN_FDS": count}
    if names is not None:
        environ["LISTEN_FDNAMES"] = names
    sockets = SystemdSockets.from_environment(environ, pid)
    assert len(sockets.numbers) == len(sockets.names)
    assert sockets.numbers == list(range(3, 3 + len(sockets.numbers)))
    if claimed != pid:
        assert sockets.numbers == []


fdnames = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters=":"),
    max_size=20,
)


@given(names=st.lists(fdnames, min_size=1, max_size=20))
def test_names_round_trip(names: list[str]) -> None:
    environ = {"LISTEN_PID": "7", "LISTEN_FDS": str(len(names)), "LISTEN_FDNAMES": ":".join(names)}
    assert SystemdSockets.from_environment(environ, 7).names == names


def test_names_of() -> None:
    sockets = SystemdSockets([3, 4, 5, 6], ["web/http", "x", "web/http", "y"])
    assert sockets.names_of([6, 5, 3, 99]) == ["web/http", "y"]
    assert sockets.names_of([]) == []


def test_scrub_environment() -> None:
    environ = {name: "1" for name in SUPERVISOR_ONLY_ENV}
    environ.update(PATH="/bin", JOURNAL_STREAM="8:9", INVOCATION_ID="x")
    assert scrub_environment(environ) == {
        "PATH": "/bin",
        "JOURNAL_STREAM": "8:9",
        "INVOCATION_ID": "x",
    }
    assert {"LISTEN_PIDFDID", "FDSTORE", "WATCHDOG_PID"} <= set(SUPERVISOR_ONLY_ENV)


# --------------------------------------------------------------------------- fd store names

name_chars = string.ascii_letters + string.digits + "_.-"
names = st.text(alphabet=name_chars, min_size=1, max_size=255).filter(
    lambda n: NAME_RE.fullmatch(n) is not None
)


@given(unit=names, socket_name=names)
def test_store_names_round_trip_or_are_too_long(unit: str, socket_name: str) -> None:
    name = fd_store_name(unit, socket_name)
    if len(unit) + 1 + len(socket_name) > FDNAME_MAX:
        assert name is None
    else:
        assert name is not None and fdname_is_valid(name)
        assert parse_fd_store_name(name) == (unit, socket_name)


def test_dotted_names_are_unambiguous() -> None:
    assert fd_store_name("web.v2", "http.alt") == "web.v2/http.alt"
    assert parse_fd_store_name("web.v2/http.alt") == ("web.v2", "http.alt")


@pytest.mark.parametrize(
    "name",
    [
        "fdsupervisor.socket",  # systemd's default name for a .socket fd
        "web-http",
        "stored",  # systemd's name for FDSTORE=1 without FDNAME=
        "unknown",
        "a/b/c",
        "/http",
        "web/",
        "3web/http",
        "web/3http",
        "web/ht tp",
    ],
)
def test_other_names_are_not_ours(name: str) -> None:
    assert parse_fd_store_name(name) is None


def test_adoptable_maps_our_names_and_the_first_copy_wins() -> None:
    sockets = SystemdSockets(
        [3, 4, 5, 6, 7], ["fdsupervisor.socket", "web/http", "api.v2/admin", "web/http", "stored"]
    )
    assert adoptable(sockets) == {("web", "http"): 4, ("api.v2", "admin"): 5}
    assert adoptable(SystemdSockets()) == {}
