"""The sd_notify parser, with plain byte strings: every key, every way to get one wrong."""

from __future__ import annotations

import errno
from dataclasses import fields

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.fdpassing import FDNAME_MAX, fdname_is_valid
from fdsupervisor.notify import ERRNO_MAX, NotifyMessage, parse_notify

DEFAULT = NotifyMessage()


def changed(message: NotifyMessage) -> dict[str, object]:
    """The fields that differ from an empty message."""
    return {
        f.name: getattr(message, f.name)
        for f in fields(NotifyMessage)
        if getattr(message, f.name) != getattr(DEFAULT, f.name)
    }


# -- framing ---------------------------------------------------------------------


def test_empty_message_is_empty() -> None:
    assert parse_notify(b"") == DEFAULT


@pytest.mark.parametrize(
    "data",
    [
        b"READY=1",
        b"READY=1\n",
        b"READY=1\r\n",
        b"\n\nREADY=1\n\n",
        b"\rREADY=1\r",
        b"READY=1\0",  # one trailing NUL is allowed
    ],
)
def test_line_endings_and_blank_lines_do_not_matter(data: bytes) -> None:
    assert changed(parse_notify(data)) == {"ready": True}


def test_several_assignments() -> None:
    message = parse_notify(b"READY=1\nSTATUS=Serving 3 clients\nMAINPID=4242\n")
    assert changed(message) == {"ready": True, "status": "Serving 3 clients", "main_pid": 4242}


def test_carriage_return_separates_lines_too() -> None:
    assert parse_notify(b"STATUS=a\rb=c").status == "a"


def test_a_lone_trailing_nul_is_an_empty_message() -> None:
    assert parse_notify(b"\0") == DEFAULT


@pytest.mark.parametrize("data", [b"\0\0", b"READY=1\0\n", b"READY=1\0STATUS=x", b"\0READY=1"])
def test_nul_anywhere_but_the_end_ignores_the_whole_message(data: bytes) -> None:
    message = parse_notify(data)
    assert changed(message) == {
        "problems": ("message contains a NUL byte; the whole message is ignored",)
    }


def test_no_trimming_and_keys_are_case_sensitive() -> None:
    message = parse_notify(b" READY=1\nREADY =1\nready=1\nSTATUS= padded ")
    assert not message.ready
    assert message.status == " padded "
    assert message.unknown == (" READY", "READY ", "ready")


def test_lines_without_equals_are_ignored() -> None:
    message = parse_notify(b"READY\nhello world\nREADY=1")
    assert message.ready
    assert message.unknown == ()
    assert message.problems == (
        "line without '=' ignored: 'READY'",
        "line without '=' ignored: 'hello world'",
    )


def test_assignment_without_a_name() -> None:
    message = parse_notify(b"=1\nREADY=1")
    assert message.ready
    assert message.problems == ("assignment without a name ignored: '=1'",)


def test_value_may_contain_equals() -> None:
    assert parse_notify(b"STATUS=a=b=c").status == "a=b=c"


# -- backslashes, as extract_first_word() with no flags reads them ---------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"STATUS=C:\\\\dir", "C:\\dir"),  # an escaped backslash is one backslash
        (b"STATUS=a\\b", "ab"),  # any other escaped byte is itself
        (b"STATUS=two\\\nlines", "two\nlines"),  # an escaped newline stays in the value
        (b"STATUS=x\\\ry", "x\ry"),
        (b"STATUS=\\x41", "x41"),  # no C escapes
    ],
)
def test_backslash_takes_the_next_byte_literally(data: bytes, status: str) -> None:
    assert parse_notify(data).status == status


def test_escaped_separator_joins_lines() -> None:
    message = parse_notify(b"STATUS=a\\\nREADY=1")
    assert message.status == "a\nREADY=1"
    assert not message.ready


@pytest.mark.parametrize("data", [b"\\", b"READY=1\nSTATUS=a\\", b"STATUS=a\\\\\\"])
def test_lone_trailing_backslash_ignores_the_whole_message(data: bytes) -> None:
    message = parse_notify(data)
    assert changed(message) == {"problems": message.problems}
    assert "backslash" in message.problems[0]


def test_escaped_trailing_backslash_is_fine() -> None:
    assert parse_notify(b"READY=1\nSTATUS=a\\\\").status == "a\\"


# -- flags -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "attribute"),
    [
        ("READY", "ready"),
        ("RELOADING", "reloading"),
        ("STOPPING", "stopping"),
        ("FDSTORE", "fd_store"),
    ],
)
def test_flags(key: str, attribute: str) -> None:
    assert changed(parse_notify(f"{key}=1".encode())) == {attribute: True}


@pytest.mark.parametrize("key", ["READY", "RELOADING", "STOPPING", "FDSTORE", "FDSTOREREMOVE"])
@pytest.mark.parametrize("value", [b"0", b"", b"yes", b"true", b" 1", b"1 ", b"01"])
def test_flags_mean_something_only_as_1(key: str, value: bytes) -> None:
    message = parse_notify(key.encode() + b"=" + value)
    assert changed(message) == {"problems": message.problems}
    assert message.problems[0].startswith(f"{key}=")
    assert f"only {key}=1 means anything" in message.problems[0]


def test_any_line_with_the_flag_counts() -> None:
    # strv_contains(): READY=0 before READY=1 does not hide it
    message = parse_notify(b"READY=0\nREADY=1\nREADY=1")
    assert message.ready
    assert len(message.problems) == 1


def test_state_flags_are_reported_together() -> None:
    # precedence (STOPPING wins, READY+RELOADING = reloaded) is service.py's
    message = parse_notify(b"RELOADING=1\nREADY=1\nSTOPPING=1\nMONOTONIC_USEC=123456")
    assert changed(message) == {
        "ready": True,
        "reloading": True,
        "stopping": True,
        "monotonic_usec": 123456,
    }


# -- STATUS ----------------------------------------------------------------------


def test_status() -> None:
    assert parse_notify(b"STATUS=Processing requests...").status == "Processing requests..."


def test_empty_status_clears_it() -> None:
    message = parse_notify(b"STATUS=")
    assert message.status == ""
    assert message.problems == ()


def test_status_utf8() -> None:
    assert parse_notify("STATUS=prêt ✓".encode()).status == "prêt ✓"


@pytest.mark.parametrize("raw", [b"\xff", b"caf\xe9", b"\xc3", b"\xed\xa0\x80"])
def test_status_not_utf8_clears_it(raw: bytes) -> None:
    message = parse_notify(b"READY=1\nSTATUS=" + raw)
    assert message.ready  # the rest of the message still counts
    assert message.status == ""
    assert message.problems == ("STATUS= is not valid UTF-8; the status is cleared",)


def test_invalid_utf8_elsewhere_costs_only_its_line() -> None:
    message = parse_notify(b"READY=1\nX_\xff=\xfe\nFDNAME=\xe9t\xe9\nSTATUS=ok")
    assert message.ready
    assert message.status == "ok"
    assert message.fd_name is None
    assert message.unknown == ("X_\\xff",)
    assert len(message.problems) == 1
    assert message.problems[0].startswith("FDNAME=")


def test_first_status_counts() -> None:
    message = parse_notify(b"STATUS=first\nSTATUS=second")
    assert message.status == "first"
    assert message.problems == ("STATUS= given more than once; only the first one counts",)


# -- ERRNO -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"0", 0),
        (b"2", 2),
        (b"4095", ERRNO_MAX),
        (b"ENOENT", errno.ENOENT),
        (b"EADDRINUSE", errno.EADDRINUSE),
        (b"E2BIG", errno.E2BIG),
        (b" 13", 13),
        (b"0x10", 16),
        (b"+5", 5),
    ],
)
def test_errno(value: bytes, expected: int) -> None:
    assert changed(parse_notify(b"ERRNO=" + value)) == {"errno": expected}


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"-1",
        b"4096",
        b"99999999999",
        b"abc",
        b"ENOSUCHTHING",
        b"enoent",
        b"2 ",
        b"1.5",
        b"errorcode",
    ],
)
def test_errno_invalid(value: bytes) -> None:
    message = parse_notify(b"ERRNO=" + value)
    assert message.errno is None
    assert len(message.problems) == 1
    assert message.problems[0].endswith("ignored: not an errno")


# -- MAINPID ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"1", 1),
        (b"4242", 4242),
        (b"2147483647", 2147483647),
        (b"\t77", 77),
        (b"0x10", 16),
        (b"0X10", 16),
        (b"0b101", 5),
        (b"0o17", 15),
        (b"010", 8),  # strtoul() base 0: a leading zero is octal, in systemd too
    ],
)
def test_main_pid(value: bytes, expected: int) -> None:
    assert changed(parse_notify(b"MAINPID=" + value)) == {"main_pid": expected}


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"0",
        b"-1",
        b"abc",
        b"12abc",
        b"2147483648",
        b"99999999999999999999999",
        b"1_000",
        b"08",
        b"0x",
        b"0b2",
        b"12 ",
        b"\xd9\xa3",  # ARABIC-INDIC DIGIT THREE is no digit to strtoul()
    ],
)
def test_main_pid_invalid(value: bytes) -> None:
    message = parse_notify(b"MAINPID=" + value + b"\nREADY=1")
    assert message.main_pid is None
    assert message.ready
    assert len(message.problems) == 1
    assert message.problems[0].startswith("MAINPID=")
    assert message.problems[0].endswith("ignored: not a valid PID")


# -- WATCHDOG --------------------------------------------------------------------


def test_watchdog_keepalive() -> None:
    assert changed(parse_notify(b"WATCHDOG=1")) == {"watchdog": True}


def test_watchdog_trigger() -> None:
    assert changed(parse_notify(b"WATCHDOG=trigger")) == {"watchdog_trigger": True}


@pytest.mark.parametrize("value", [b"0", b"", b"2", b"TRIGGER", b"trigger "])
def test_watchdog_invalid(value: bytes) -> None:
    message = parse_notify(b"WATCHDOG=" + value)
    assert not message.watchdog
    assert not message.watchdog_trigger
    assert message.problems[0].endswith("WATCHDOG=1 or WATCHDOG=trigger expected")


def test_first_watchdog_counts() -> None:
    message = parse_notify(b"WATCHDOG=trigger\nWATCHDOG=1")
    assert message.watchdog_trigger
    assert not message.watchdog


# -- microseconds ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "attribute"),
    [
        ("WATCHDOG_USEC", "watchdog_usec"),
        ("EXTEND_TIMEOUT_USEC", "extend_timeout_usec"),
        ("MONOTONIC_USEC", "monotonic_usec"),
    ],
)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"0", 0),
        (b"30000000", 30_000_000),
        (b"18446744073709551615", (1 << 64) - 1),
        (b"-0", 0),
        (b" \n5", 5),  # WHITESPACE is skipped, newline included (it can only come escaped)
    ],
)
def test_usec(key: str, attribute: str, value: bytes, expected: int) -> None:
    raw = key.encode() + b"=" + value.replace(b"\n", b"\\\n")
    assert changed(parse_notify(raw)) == {attribute: expected}


@pytest.mark.parametrize("key", ["WATCHDOG_USEC", "EXTEND_TIMEOUT_USEC", "MONOTONIC_USEC"])
@pytest.mark.parametrize(
    "value", [b"", b"-1", b"18446744073709551616", b"10s", b"1e6", b"1.5", b"0x", b"abc"]
)
def test_usec_invalid(key: str, value: bytes) -> None:
    message = parse_notify(key.encode() + b"=" + value)
    assert changed(message) == {"problems": message.problems}
    assert message.problems[0].endswith("ignored: not a number of µs")


def test_strtoul_wraps_a_minus_systemd_does_not_see() -> None:
    # safe_atou64() only looks for "-" after skipping " \t\n\r"; strtoul()
    # also skips "\v" and then negates, as C does.
    assert parse_notify(b"WATCHDOG_USEC=\v-1").watchdog_usec == (1 << 64) - 1


# -- fd store --------------------------------------------------------------------


def test_fd_store_with_name() -> None:
    message = parse_notify(b"FDSTORE=1\nFDNAME=http-conn")
    assert changed(message) == {"fd_store": True, "fd_name": "http-conn"}


def test_fd_store_without_name() -> None:
    assert changed(parse_notify(b"FDSTORE=1")) == {"fd_store": True}


def test_fd_store_with_invalid_name_keeps_the_fds_unnamed() -> None:
    message = parse_notify(b"FDSTORE=1\nFDNAME=a:b")
    assert message.fd_store
    assert message.fd_name is None
    assert message.problems[0].startswith("FDNAME='a:b' ignored")


def test_fd_poll() -> None:
    assert changed(parse_notify(b"FDSTORE=1\nFDPOLL=0")) == {"fd_store": True, "fd_poll": False}
    assert changed(parse_notify(b"FDSTORE=1\nFDPOLL=1")) == {"fd_store": True}


@pytest.mark.parametrize("value", [b"", b"no", b"false", b"2"])
def test_fd_poll_invalid(value: bytes) -> None:
    message = parse_notify(b"FDPOLL=" + value)
    assert message.fd_poll
    assert message.problems[0].endswith("FDPOLL=0 or FDPOLL=1 expected")


def test_fd_store_remove() -> None:
    message = parse_notify(b"FDSTOREREMOVE=1\nFDNAME=old")
    assert changed(message) == {"fd_store_remove": True, "fd_name": "old"}


def test_fd_store_remove_with_empty_name() -> None:
    # fdname_is_valid("") is true
    message = parse_notify(b"FDSTOREREMOVE=1\nFDNAME=")
    assert changed(message) == {"fd_store_remove": True, "fd_name": ""}


@pytest.mark.parametrize("name_line", [b"", b"\nFDNAME=bad:name"])
def test_fd_store_remove_needs_a_valid_name(name_line: bytes) -> None:
    message = parse_notify(b"FDSTOREREMOVE=1" + name_line)
    assert not message.fd_store_remove
    assert message.problems[-1] == "FDSTOREREMOVE=1 ignored: it needs a valid FDNAME="


def test_fd_store_remove_wins_over_fd_store() -> None:
    message = parse_notify(b"FDSTORE=1\nFDSTOREREMOVE=1\nFDNAME=x")
    assert changed(message) == {
        "fd_store_remove": True,
        "fd_name": "x",
        "problems": ("FDSTORE=1 ignored: FDSTOREREMOVE=1 in the same message wins",),
    }


def test_fd_store_remove_wins_even_when_it_is_refused() -> None:
    # service_notify_message(): if (FDSTOREREMOVE=1) {...} else if (FDSTORE=1)
    message = parse_notify(b"FDSTORE=1\nFDSTOREREMOVE=1")
    assert not message.fd_store
    assert not message.fd_store_remove


def test_fd_name_alone_is_reported() -> None:
    assert changed(parse_notify(b"FDNAME=web")) == {"fd_name": "web"}


@pytest.mark.parametrize(
    "name",
    [b"", b"a", b"web.http-8080_x", b"with space", b"~!@#$%^&*()[]{}", b"x" * FDNAME_MAX],
)
def test_fdname_valid(name: bytes) -> None:
    assert fdname_is_valid(name)
    assert fdname_is_valid(name.decode())
    assert parse_notify(b"FDNAME=" + name).fd_name == name.decode()


@pytest.mark.parametrize(
    "name",
    [b"a:b", b":", b"tab\there", b"\x7f", b"\x1b[0m", b"caf\xc3\xa9", b"x" * (FDNAME_MAX + 1)],
)
def test_fdname_invalid(name: bytes) -> None:
    assert not fdname_is_valid(name)
    message = parse_notify(b"FDNAME=" + name)
    assert message.fd_name is None
    assert "printable ASCII characters other than ':'" in message.problems[0]


# -- BARRIER ---------------------------------------------------------------------


def test_barrier() -> None:
    assert changed(parse_notify(b"BARRIER=1\n")) == {"barrier": True}


def test_barrier_with_anything_else_drops_the_rest() -> None:
    message = parse_notify(b"READY=1\nBARRIER=1\nFDSTORE=1")
    assert changed(message) == {
        "barrier": True,
        "problems": ("BARRIER=1 sent with other assignments; everything else is ignored",),
    }


def test_barrier_other_values() -> None:
    message = parse_notify(b"BARRIER=0\nREADY=1")
    assert changed(message) == {
        "ready": True,
        "problems": ("BARRIER='0' ignored: only BARRIER=1 means anything",),
    }


# -- unknown keys ----------------------------------------------------------------


def test_unknown_keys_are_listed_once_in_order() -> None:
    message = parse_notify(
        b"NOTIFYACCESS=all\nX_MYAPP=1\nBUSERROR=org.x.Y\nX_MYAPP=2\nMAINPIDFD=1\nREADY=1"
    )
    assert message.ready
    assert message.unknown == ("NOTIFYACCESS", "X_MYAPP", "BUSERROR", "MAINPIDFD")
    assert message.problems == ()


def test_every_field_at_once() -> None:
    message = parse_notify(
        b"READY=1\nRELOADING=1\nSTOPPING=1\nSTATUS=s\nERRNO=5\nMAINPID=7\nWATCHDOG=1\n"
        b"WATCHDOG_USEC=8\nEXTEND_TIMEOUT_USEC=9\nFDSTORE=1\nFDNAME=n\nFDPOLL=0\n"
        b"MONOTONIC_USEC=10\nOTHER=1\n"
    )
    assert message == NotifyMessage(
        ready=True,
        reloading=True,
        stopping=True,
        status="s",
        errno=5,
        main_pid=7,
        watchdog=True,
        watchdog_usec=8,
        extend_timeout_usec=9,
        fd_store=True,
        fd_name="n",
        fd_poll=False,
        monotonic_usec=10,
        unknown=("OTHER",),
    )


def test_problems_are_cut_short() -> None:
    message = parse_notify(b"MAINPID=" + b"9" * 1000)
    assert len(message.problems[0]) < 120
    assert "..." in message.problems[0]


def test_message_is_frozen() -> None:
    with pytest.raises(AttributeError):
        parse_notify(b"READY=1").ready = False  # type: ignore[misc]


# -- properties ------------------------------------------------------------------

KEYS = [
    "READY",
    "RELOADING",
    "STOPPING",
    "STATUS",
    "ERRNO",
    "MAINPID",
    "WATCHDOG",
    "WATCHDOG_USEC",
    "EXTEND_TIMEOUT_USEC",
    "FDSTORE",
    "FDSTOREREMOVE",
    "FDNAME",
    "FDPOLL",
    "BARRIER",
    "MONOTONIC_USEC",
    "NOTIFYACCESS",
    "X",
]
assignments = st.tuples(
    st.sampled_from(KEYS).map(str.encode),
    st.one_of(
        st.sampled_from([b"1", b"0", b"trigger", b"", b"0x1f", b"-1", b"ENOENT"]),
        st.binary(max_size=24),
    ),
).map(lambda kv: kv[0] + b"=" + kv[1])
messages = st.lists(st.one_of(assignments, st.binary(max_size=16)), max_size=12).flatmap(
    lambda lines: st.sampled_from([b"\n", b"\r\n", b"\\\n"]).map(lambda sep: sep.join(lines))
)


def check_invariants(message: NotifyMessage) -> None:
    assert isinstance(message, NotifyMessage)
    assert all(isinstance(p, str) for p in message.problems)
    assert all(isinstance(k, str) for k in message.unknown)
    assert len(set(message.unknown)) == len(message.unknown)
    assert not (message.fd_store and message.fd_store_remove)
    if message.fd_store_remove:
        assert message.fd_name is not None
    if message.fd_name is not None:
        assert fdname_is_valid(message.fd_name)
    if message.main_pid is not None:
        assert 0 < message.main_pid < 1 << 31
    if message.errno is not None:
        assert 0 <= message.errno <= ERRNO_MAX
    for usec in (message.watchdog_usec, message.extend_timeout_usec, message.monotonic_usec):
        assert usec is None or 0 <= usec < 1 << 64
    assert not (message.watchdog and message.watchdog_trigger)
    if message.barrier:
        assert changed(message).keys() <= {"barrier", "problems"}


@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(data: bytes) -> None:
    check_invariants(parse_notify(data))


@given(messages)
def test_random_messages_never_raise(data: bytes) -> None:
    check_invariants(parse_notify(data))


printable_status = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\0\n\r\\"), max_size=200
)


@given(printable_status, st.booleans(), st.integers(1, (1 << 31) - 1))
def test_what_sd_notify_sends_comes_back(status: str, ready: bool, pid: int) -> None:
    lines = [f"STATUS={status}", f"MAINPID={pid}"] + (["READY=1"] if ready else [])
    message = parse_notify("\n".join(lines).encode())
    assert message.status == status
    assert message.main_pid == pid
    assert message.ready is ready
    assert message.problems == ()


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_fdname_is_valid_never_raises(name: str | bytes) -> None:
    raw = name.encode("utf-8", "surrogatepass") if isinstance(name, str) else name
    printable_ascii = all(0x20 <= b < 0x7F for b in raw)
    expected = len(raw) <= FDNAME_MAX and printable_ascii and b":" not in raw
    assert fdname_is_valid(name) == expected
