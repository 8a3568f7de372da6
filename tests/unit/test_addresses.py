"""SocketAddress parsing (QAPI mappings and QEMU shorthand), names, durations."""

from __future__ import annotations

import math
import os
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.addresses import (
    MAX_DURATION,
    NAME_RE,
    Context,
    FdAddress,
    InetAddress,
    SocketAddress,
    UnixAddress,
    VsockAddress,
    check_fd_context,
    check_name,
    check_unix_path,
    describe,
    format_address,
    parse_address,
    parse_duration,
    timer_seconds,
    unknown_key_message,
)
from fdsupervisor.errors import ValueProblem

STARTUP = Context.STARTUP
MONITOR = Context.MONITOR


def problem(value: object, context: Context = STARTUP) -> ValueProblem:
    with pytest.raises(ValueProblem) as info:
        parse_address(value, context)
    return info.value


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["a", "web", "_x", ".hidden", "-dash", "a1", "A.b-c_d", "x" * 255])
def test_valid_names(name: str) -> None:
    check_name(name, "socket")
    assert NAME_RE.fullmatch(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "it is empty"),
        ("x" * 256, "it is 256 characters long"),
        ("3web", "it starts with a digit"),
        ("a b", "it contains ' '"),
        ("a:b", "it contains ':'"),
        ("caf\u00e9", "it contains '\u00e9'"),
        ("\u0663", "it contains '\u0663'"),  # an Arabic-Indic digit is no ASCII digit
    ],
)
def test_invalid_names(name: str, reason: str) -> None:
    with pytest.raises(ValueProblem) as info:
        check_name(name, "socket")
    assert reason in info.value.message
    assert info.value.message.startswith("invalid socket name ")
    assert info.value.message.endswith(
        "a name is 1 to 255 characters of A-Z a-z 0-9 _ . - and does not start with a digit"
    )
    assert info.value.path == ()


def test_long_invalid_name_is_shortened_in_message() -> None:
    with pytest.raises(ValueProblem) as info:
        check_name("x" * 300, "unit")
    assert "invalid unit name 'xxx" in info.value.message
    assert "...'" in info.value.message


# --------------------------------------------------------------------------- inet shorthand


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", InetAddress("127.0.0.1", "8080")),
        ("localhost:http", InetAddress("localhost", "http")),
        (":8080", InetAddress("", "8080")),
        ("[::1]:80", InetAddress("::1", "80")),
        ("[::]:80", InetAddress("::", "80")),
        ("[fe80::1%eth0]:80", InetAddress("fe80::1%eth0", "80")),
        ("[]:80", InetAddress("", "80")),
        ("tcp:localhost:80", InetAddress("localhost", "80")),
        ("tcp:unix:80", InetAddress("unix", "80")),
        ("host:0080", InetAddress("host", "80")),
        ("host:0", InetAddress("host", "0")),
        ("host:65535", InetAddress("host", "65535")),
        ("h:80,to=90", InetAddress("h", "80", to=90)),
        ("h:80,to=80", InetAddress("h", "80", to=80)),
        ("h:http,to=90", InetAddress("h", "http", to=90)),
        ("h:80,ipv4", InetAddress("h", "80", ipv4=True)),
        ("h:80,ipv4=on", InetAddress("h", "80", ipv4=True)),
        ("h:80,ipv4=off", InetAddress("h", "80", ipv4=False)),
        ("h:80,ipv6=off,ipv4=on", InetAddress("h", "80", ipv4=True, ipv6=False)),
        ("h:80,keep-alive", InetAddress("h", "80", keep_alive=True)),
        ("h:80,keep-alive=off", InetAddress("h", "80", keep_alive=False)),
        ("1.2.3.4:80,numeric", InetAddress("1.2.3.4", "80", numeric=True)),
        ("1.2.3.4:80,numeric=off", InetAddress("1.2.3.4", "80", numeric=False)),
        (":80,numeric=on", InetAddress("", "80", numeric=True)),
        ("a,b:80", None),  # QEMU reads the host up to ':' (commas and all); ours refuses ','
    ],
)
def test_inet_shorthand(text: str, expected: InetAddress | None) -> None:
    if expected is None:
        assert "invalid host" in problem(text).message
    else:
        assert parse_address(text, STARTUP) == expected
        assert parse_address(text, MONITOR) == expected


@pytest.mark.parametrize(
    ("text", "message", "path"),
    [
        (
            "localhost",
            "invalid address 'localhost': expected HOST:PORT, [IPV6]:PORT, :PORT",
            (),
        ),
        ("/run/x.sock", "did you mean 'unix:/run/x.sock'?", ()),
        ("8080", "did you mean ':8080'?", ()),
        ("", "invalid address ''", ()),
        ("[::1]", "invalid IPv6 address '[::1]': expected [V6ADDR]:PORT", ()),
        ("[::1:80", "invalid IPv6 address '[::1:80': expected [V6ADDR]:PORT", ()),
        ("[::1]80", "invalid IPv6 address '[::1]80'", ()),
        (
            "::1:80",
            "invalid port ':1:80': expected a number 0..65535 or a service name; "
            "IPv6 addresses go in brackets: [::1]:80",
            ("port",),
        ),
        (
            "host:",
            "invalid port '': expected a number 0..65535 or a service name; "
            "use 0 to let the kernel choose a port",
            ("port",),
        ),
        ("host:65536", "port 65536 is out of range 0..65535", ("port",)),
        ("host:-1", "invalid port '-1'", ("port",)),
        ("host:8o", "invalid port '8o'", ("port",)),
        ("host:" + "a" * 33, "invalid port", ("port",)),
        ("host:" + "9" * 30, f"port {'9' * 30} is out of range 0..65535", ("port",)),
        (
            "ho st:80",
            "invalid host 'ho st': expected a host name, an IP address or '' for any",
            ("host",),
        ),
        ("h" * 254 + ":80", "invalid host", ("host",)),
        ("h:80,", "empty option in '': remove the extra comma", ()),
        ("h:80,ipv4,,ipv6", "empty option in 'ipv4,,ipv6': remove the extra comma", ()),
        ("h:80,ipv4,ipv4=off", "option 'ipv4' is given twice", ("ipv4",)),
        ("h:80,ipv4=yes", "expected ipv4=on or ipv4=off, got 'yes'", ("ipv4",)),
        ("h:80,to", "expected to=PORT, got 'to'", ("to",)),
        ("h:80,to=x", "expected to=PORT, got 'to=x'", ("to",)),
        ("h:80,to=79", "to 79 is less than port 80", ("to",)),
        ("h:80,to=65536", "to 65536 is out of range 0..65535", ("to",)),
        ("h:80,mptcp", "mptcp is not supported by fdsupervisor", ("mptcp",)),
        (
            "h:80,foo=1",
            "unknown option 'foo=1'; expected to=PORT, ipv4, ipv6, keep-alive or numeric "
            "(each =on or =off)",
            ("foo",),
        ),
        ("h:80,=1", "unknown option '=1'", ()),
        ("h:80,ipv4=off,ipv6=off", "Cannot disable IPv4 and IPv6 at same time", ("ipv6",)),
        ("localhost:80,numeric", "numeric: true needs an IP address, got 'localhost'", ("host",)),
        ("1.2.3.4:http,numeric", "numeric: true needs a port number, got 'http'", ("port",)),
    ],
)
def test_inet_shorthand_errors(text: str, message: str, path: tuple[str, ...]) -> None:
    error = problem(text)
    assert message in error.message
    assert error.path == path


def test_every_unrecognised_form_names_the_accepted_forms() -> None:
    message = problem("nonsense").message
    for form in (
        "HOST:PORT",
        "[IPV6]:PORT",
        ":PORT",
        "unix:PATH",
        "@NAME",
        "vsock:CID:PORT",
        "fd:STR",
    ):
        assert form in message


# --------------------------------------------------------------------------- unix


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:/run/web.sock", UnixAddress("/run/web.sock")),
        ("unix:relative.sock", UnixAddress("relative.sock")),
        # socket_parse() takes everything after "unix:" as the path: no options.
        ("unix:/x,abstract=on", UnixAddress("/x,abstract=on")),
        ("unix:@x", UnixAddress("@x")),
        ("@name", UnixAddress("name", abstract=True)),
        ("@with space:and,comma", UnixAddress("with space:and,comma", abstract=True)),
    ],
)
def test_unix_shorthand(text: str, expected: UnixAddress) -> None:
    assert parse_address(text, STARTUP) == expected


def test_unix_mapping() -> None:
    assert parse_address({"type": "unix", "path": "/x"}, STARTUP) == UnixAddress("/x")
    assert parse_address(
        {"type": "unix", "path": "n", "abstract": True, "tight": False}, MONITOR
    ) == UnixAddress("n", abstract=True, tight=False)


def test_unix_path_length_limits() -> None:
    parse_address("unix:/" + "x" * 106, STARTUP)  # 107 bytes + NUL = 108
    error = problem("unix:/" + "x" * 107)
    assert error.message == "the unix socket path is 108 bytes long; at most 107 fit in sun_path"
    assert error.path == ("path",)
    parse_address("@" + "x" * 107, STARTUP)
    error = problem("@" + "x" * 108)
    assert (
        error.message == "the abstract socket name is 108 bytes long; at most 107 fit in sun_path"
    )
    # bytes, not characters
    assert "is 108 bytes long" in problem("unix:/" + "\u00e9" * 53 + "x").message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("unix:", "the unix socket path must not be empty"),
        ("@", "the abstract socket name must not be empty"),
        ({"type": "unix", "path": "/a\0b"}, "must not contain a NUL character"),
        ("unix:/a\0b", "the unix socket path must not contain a NUL character"),
        ("@a\0b", "the abstract socket name must not contain a NUL character"),
        ("unix:/\ud800", "the unix socket path cannot be encoded for the file system"),
        ({"type": "unix", "path": 3}, "expected a string, got 3"),
        (
            {"type": "unix", "path": "/x", "abstract": "yes"},
            "expected a boolean (true or false), got 'yes'",
        ),
        ({"type": "unix"}, "missing required key 'path'"),
    ],
)
def test_unix_errors(value: object, message: str) -> None:
    error = problem(value)
    assert message in error.message
    assert error.path in (("path",), ("abstract",))


def test_check_unix_path_is_public_for_resolved_paths() -> None:
    check_unix_path("/run/x", abstract=False)
    with pytest.raises(ValueProblem, match="at most 107"):
        check_unix_path("/" + "x" * 200, abstract=False)


# --------------------------------------------------------------------------- vsock


def test_vsock() -> None:
    assert parse_address("vsock:3:1234", STARTUP) == VsockAddress("3", "1234")
    assert parse_address("vsock:4294967295:0", STARTUP) == VsockAddress("4294967295", "0")
    assert parse_address({"type": "vsock", "cid": 2, "port": "01"}, STARTUP) == VsockAddress(
        "2", "1"
    )


@pytest.mark.parametrize(
    ("value", "message", "path"),
    [
        ("vsock:3", "invalid vsock address '3': expected vsock:CID:PORT", ()),
        ("vsock:", "invalid vsock address '': expected vsock:CID:PORT", ()),
        ("vsock:x:1", "expected cid (a decimal number), got 'x'", ("cid",)),
        ("vsock:3:1,x", "expected port (a decimal number), got '1,x'", ("port",)),
        ("vsock:4294967296:1", "cid 4294967296 is out of range 0..4294967295", ("cid",)),
        ({"type": "vsock", "cid": -1, "port": 1}, "cid -1 is out of range 0..4294967295", ("cid",)),
        (
            {"type": "vsock", "cid": True, "port": 1},
            "expected cid (a decimal number), got true",
            ("cid",),
        ),
        ({"type": "vsock", "cid": 3}, "missing required key 'port'", ("port",)),
    ],
)
def test_vsock_errors(value: object, message: str, path: tuple[str, ...]) -> None:
    error = problem(value)
    assert error.message == message
    assert error.path == path


# --------------------------------------------------------------------------- fd and the seed rule


def test_fd_numbers_at_startup() -> None:
    assert parse_address("fd:3", STARTUP) == FdAddress("3")
    assert parse_address("fd:03", STARTUP) == FdAddress("3")
    assert parse_address({"type": "fd", "str": "3"}, STARTUP) == FdAddress("3")
    assert parse_address({"type": "fd", "str": 4}, STARTUP) == FdAddress("4")
    assert FdAddress("3").is_number
    assert not FdAddress("\u0663").is_number


def test_fd_names_in_monitor_commands() -> None:
    assert parse_address("fd:vm0-mon", MONITOR) == FdAddress("vm0-mon")
    assert parse_address({"type": "fd", "str": "x"}, MONITOR) == FdAddress("x")


def test_seed_rule_names_refused_at_startup() -> None:
    error = problem({"type": "fd", "str": "vm0-mon"}, STARTUP)
    assert "named file descriptors are only permitted in monitor commands" in error.message
    assert error.message == (
        "fd 'vm0-mon': named file descriptors are only permitted in monitor commands; "
        "here give the number of an fd the supervisor inherited, such as '3'"
    )
    assert error.path == ("str",)
    assert (
        "named file descriptors are only permitted in monitor commands" in problem("fd:x").message
    )


def test_seed_rule_numbers_refused_in_monitor_commands() -> None:
    error = problem("fd:3", MONITOR)
    assert "FD numbers are not permitted in monitor commands" in error.message
    assert error.message == (
        "fd '3': FD numbers are not permitted in monitor commands; "
        "pass the fd with getfd and use the name you gave it"
    )
    assert error.path == ("str",)
    assert "FD numbers are not permitted" in problem({"type": "fd", "str": 3}, MONITOR).message


def test_check_fd_context_directly() -> None:
    check_fd_context(FdAddress("3"), STARTUP)
    check_fd_context(FdAddress("x"), MONITOR)
    with pytest.raises(ValueProblem, match="named file descriptors are only permitted"):
        check_fd_context(FdAddress("x"), STARTUP)
    with pytest.raises(ValueProblem, match="FD numbers are not permitted"):
        check_fd_context(FdAddress("3"), MONITOR)


@pytest.mark.parametrize(
    ("value", "context", "message"),
    [
        ("fd:", STARTUP, "expected an fd number or an fd name, got ''"),
        ({"type": "fd", "str": ""}, MONITOR, "expected an fd number or an fd name, got ''"),
        ("fd:2147483648", STARTUP, "fd number 2147483648 is out of range 0..2147483647"),
        ("fd:" + "1" * 21, STARTUP, f"fd number {'1' * 21} is out of range 0..2147483647"),
        ("fd:a b", MONITOR, "invalid fd name 'a b': it contains ' '"),
        ("fd:3x", MONITOR, "invalid fd name '3x': it starts with a digit"),
        ("fd:\u0663", MONITOR, "invalid fd name"),
        ({"type": "fd", "str": None}, MONITOR, "expected a string, got null"),
        ({"type": "fd", "str": True}, MONITOR, "expected a string, got true"),
        ({"type": "fd"}, MONITOR, "missing required key 'str'"),
    ],
)
def test_fd_errors(value: object, context: Context, message: str) -> None:
    error = problem(value, context)
    assert message in error.message
    assert error.path == ("str",)


# --------------------------------------------------------------------------- mappings


def test_inet_mapping() -> None:
    value = {
        "type": "inet",
        "host": "::",
        "port": 8080,
        "to": 8090,
        "ipv4": False,
        "ipv6": True,
        "keep-alive": True,
        "numeric": True,
    }
    assert parse_address(value, STARTUP) == InetAddress(
        "::", "8080", numeric=True, to=8090, ipv4=False, ipv6=True, keep_alive=True
    )
    assert parse_address({"type": "inet", "host": "", "port": "http"}, STARTUP) == InetAddress(
        "", "http"
    )


@pytest.mark.parametrize(
    ("value", "message", "path"),
    [
        ({}, "missing required key 'type'", ("type",)),
        (
            {"type": "tcp"},
            "unknown address type 'tcp'; expected inet, unix, vsock, fd or fifo",
            ("type",),
        ),
        ({"type": 1}, "unknown address type 1; expected inet, unix, vsock, fd or fifo", ("type",)),
        ({1: "x", "type": "inet"}, "keys must be strings, got 1", ()),
        ({"type": "inet", "port": 80}, "missing required key 'host'", ("host",)),
        ({"type": "inet", "host": "h"}, "missing required key 'port'", ("port",)),
        (
            {"type": "inet", "host": "h", "port": 1, "keep_alive": True},
            "unknown key 'keep_alive'; did you mean 'keep-alive'?",
            ("keep_alive",),
        ),
        (
            {"type": "inet", "host": "h", "port": 1, "zzz": True},
            "unknown key 'zzz'; valid keys: type, host, port, numeric, to, ipv4, ipv6, keep-alive",
            ("zzz",),
        ),
        ({"type": "unix", "path": "/x", "host": "h"}, "unknown key 'host'", ("host",)),
        (
            {"type": "inet", "host": "h", "port": 1, "mptcp": True},
            "mptcp is not supported by fdsupervisor",
            ("mptcp",),
        ),
        ({"type": "inet", "host": 1, "port": 1}, "expected a string, got 1", ("host",)),
        (
            {"type": "inet", "host": "[::1]", "port": 1},
            "write the IPv6 address without brackets: '::1'",
            ("host",),
        ),
        ({"type": "inet", "host": "h", "port": True}, "expected a string, got true", ("port",)),
        ({"type": "inet", "host": "h", "port": 1.5}, "expected a string, got 1.5", ("port",)),
        (
            {"type": "inet", "host": "h", "port": 70000},
            "port 70000 is out of range 0..65535",
            ("port",),
        ),
        ({"type": "inet", "host": "h", "port": -1}, "port -1 is out of range 0..65535", ("port",)),
        (
            {"type": "inet", "host": "h", "port": 1, "to": "9"},
            "expected a port number, got '9'",
            ("to",),
        ),
        (
            {"type": "inet", "host": "h", "port": 1, "to": True},
            "expected a port number, got true",
            ("to",),
        ),
        (
            {"type": "inet", "host": "h", "port": 1, "to": -2},
            "to -2 is out of range 0..65535",
            ("to",),
        ),
        ({"type": "inet", "host": "h", "port": 10, "to": 9}, "to 9 is less than port 10", ("to",)),
        (
            {"type": "inet", "host": "h", "port": 1, "ipv6": "on"},
            "expected a boolean (true or false), got 'on'",
            ("ipv6",),
        ),
        (
            {"type": "inet", "host": "h", "port": 1, "numeric": 1},
            "expected a boolean (true or false), got 1",
            ("numeric",),
        ),
        (
            {"type": "inet", "host": "h", "port": 1, "ipv4": [1]},
            "expected a boolean (true or false), got a list",
            ("ipv4",),
        ),
        ({"type": "inet", "host": "h", "port": {}}, "expected a string, got a mapping", ("port",)),
    ],
)
def test_mapping_errors(value: dict[object, object], message: str, path: tuple[str, ...]) -> None:
    error = problem(value)
    assert error.message == message or message in error.message
    assert error.path == path


@pytest.mark.parametrize("value", [None, 3, 1.5, ["127.0.0.1:80"], b"unix:/x", True])
def test_not_an_address(value: object) -> None:
    error = problem(value)
    assert error.message.startswith(f"expected an address, got {describe(value)}; an address is ")


def test_describe() -> None:
    assert describe(None) == "null"
    assert describe(True) == "true"
    assert describe(False) == "false"
    assert describe("abc") == "'abc'"
    assert describe(3) == "3"
    assert describe({}) == "a mapping"
    assert describe((1,)) == "a list"
    assert describe(b"x") == "a bytes"
    assert describe("x" * 100).endswith("...'")


def test_unknown_key_message() -> None:
    assert (
        unknown_key_message("lisen", ("listen", "kind"))
        == "unknown key 'lisen'; did you mean 'listen'?"
    )
    assert (
        unknown_key_message("zz", ("listen", "kind"))
        == "unknown key 'zz'; valid keys: listen, kind"
    )


# --------------------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (InetAddress("127.0.0.1", "8080"), "127.0.0.1:8080"),
        (InetAddress("::1", "80"), "[::1]:80"),
        (InetAddress("", "80"), ":80"),
        (InetAddress("h", "http", to=None, ipv4=True), "h:http,ipv4=on"),
        (
            InetAddress("1.2.3.4", "80", True, to=90, ipv4=False, ipv6=True, keep_alive=False),
            "1.2.3.4:80,to=90,ipv4=off,ipv6=on,keep-alive=off,numeric=on",
        ),
        (InetAddress("unix", "80"), "tcp:unix:80"),
        (InetAddress("fd", "80"), "tcp:fd:80"),
        (InetAddress("vsock", "80"), "tcp:vsock:80"),
        (InetAddress("tcp", "80"), "tcp:tcp:80"),
        (UnixAddress("/run/x.sock"), "unix:/run/x.sock"),
        (UnixAddress("name", abstract=True), "@name"),
        (VsockAddress("3", "1234"), "vsock:3:1234"),
        (FdAddress("3"), "fd:3"),
        (FdAddress("name"), "fd:name"),
    ],
)
def test_format_address(address: SocketAddress, text: str) -> None:
    assert format_address(address) == text
    context = MONITOR if isinstance(address, FdAddress) and not address.is_number else STARTUP
    assert parse_address(text, context) == address


def test_format_address_non_tight_abstract_is_the_one_lossy_case() -> None:
    address = UnixAddress("name", abstract=True, tight=False)
    assert format_address(address) == "@name"
    assert parse_address("@name", STARTUP) == UnixAddress("name", abstract=True, tight=True)


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("10", 10.0),
        ("10s", 10.0),
        ("250ms", 0.25),
        ("2min", 120.0),
        ("1h", 3600.0),
        ("1hr", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("1min 30s", 90.0),
        ("1min30s", 90.0),
        ("1h30m", 5400.0),
        ("5 s", 5.0),
        ("  7sec  ", 7.0),
        ("2 seconds", 2.0),
        ("2minutes", 120.0),
        ("500us", 0.0005),
        ("500usec", 0.0005),
        ("500\u00b5s", 0.0005),
        ("500\u03bcs", 0.0005),
        ("3msec", 0.003),
        ("1w", 604800.0),
        ("1M", 2629800.0),
        ("1y", 31557600.0),
        (".5", 0.5),
        ("+5", 5.0),
        ("1 2", 3.0),  # systemd adds up components; the unit defaults to seconds
        ("12.34s.56", 12.9),  # "accept '12.34 .56' or '12.34s.56'"
        ("0.0000001s", 0.0),  # digits past the microsecond are dropped, as in systemd
        ("infinity", math.inf),
        (" infinity ", math.inf),
    ],
)
def test_parse_duration_strings(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "  ",
        "s",
        "abc",
        "5mins",
        "3.",
        "3.sec",
        "3. 1",
        "12.34.56",
        "1.5.5s",
        "+",
        "+.5",
        "infinityx",
        "infinity 5",
        "1x",
        "0x10",
        "1e3",
        "5 5 x",
    ],
)
def test_parse_duration_invalid(text: str) -> None:
    with pytest.raises(ValueProblem) as info:
        parse_duration(text)
    assert info.value.message == (
        f"invalid duration {describe(text)}: expected a number of seconds or a time span such as "
        "250ms, 10s, 2min, 1h or '1min 30s'"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "a duration must not be negative, got '-1'"),
        ("1s -1s", "a duration must not be negative, got '1s -1s'"),
        (-1, "a duration must not be negative, got -1"),
        (-0.5, "a duration must not be negative, got -0.5"),
        (math.nan, "a duration must be a number, got NaN"),
        (10**20, "the duration 100000000000000000000 is too large"),
        ("600000y", "the duration '600000y' is too large"),
        ("9" * 30, f"the duration '{'9' * 30}' is too large"),
        (
            True,
            "expected a number of seconds or a time span such as 250ms, 10s, 2min, 1h or "
            "'1min 30s', got true",
        ),
        (None, "got null"),
        ([1], "got a list"),
    ],
)
def test_parse_duration_errors(value: object, message: str) -> None:
    with pytest.raises(ValueProblem) as info:
        parse_duration(value)
    assert message in info.value.message


def test_parse_duration_numbers() -> None:
    assert parse_duration(0) == 0.0
    assert parse_duration(3) == 3.0
    assert isinstance(parse_duration(3), float)
    assert parse_duration(0.1) == 0.1
    assert parse_duration(math.inf) == math.inf


# --------------------------------------------------------------------------- properties
#
# Whatever the input, parse_address either returns an address that formats to
# a shorthand reading back as the same address, or raises a ValueProblem that
# points at what is wrong: the key (its path) or, where no key is to blame, a
# piece of the very text it was given. And the seed rule holds for every fd.

_KEYS = [
    "type",
    "host",
    "port",
    "numeric",
    "to",
    "ipv4",
    "ipv6",
    "keep-alive",
    "path",
    "abstract",
    "tight",
    "cid",
    "str",
    "mptcp",
    "x",
]
# Every member of the QAPI object forms, plus the one refused by name.
_INET_MEMBERS = ("type", "host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp")
_MEMBERS = frozenset((*_INET_MEMBERS, "path", "abstract", "tight", "cid", "str"))
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["inet", "unix", "vsock", "fd", "3", "80", "::", "http", "name"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_MAPPINGS = st.dictionaries(
    st.one_of(st.sampled_from(_KEYS), st.text(max_size=5)), _VALUES, max_size=8
)


def _other(context: Context) -> Context:
    return MONITOR if context is STARTUP else STARTUP


def _expected_back(address: SocketAddress) -> SocketAddress:
    """What the shorthand of ``address`` reads back as: itself, but without ``tight: false``.

    No shorthand spells ``tight: false``: for an abstract name that is the
    documented lossy case; on a path socket the flag means nothing (QEMU and
    binding ignore it) but parse_address keeps it, so it is lost there too.
    """
    if isinstance(address, UnixAddress) and not address.tight:
        return UnixAddress(address.path, abstract=address.abstract)
    return address


def check_parsed(value: object, context: Context, address: SocketAddress) -> None:
    """The shorthand of a parsed address reads back as it and is a fixed point."""
    text = format_address(address)
    again = parse_address(text, context)
    assert again == _expected_back(address), (value, text)
    assert format_address(again) == text
    if isinstance(address, FdAddress):  # the seed rule, whatever the form
        assert address.is_number is (context is STARTUP)
        check_fd_context(address, context)
    else:  # the context decides only what an fd may be
        assert parse_address(value, _other(context)) == address


def _named_pieces(text: str) -> set[str]:
    """The parts of a shorthand that an error may quote: any suffix, any option."""
    pieces = {text[i:] for i in range(len(text))} | set(text.split(","))
    if not text or text.endswith((",", ":")):
        pieces.add("")  # nothing at all, or after a prefix or a comma: quoted as ''
    return pieces


def check_problem(value: object, error: ValueProblem) -> None:
    """The error says what is wrong and where: at a key, else quoting the input."""
    assert error.message and str(error) == error.message
    assert len(error.path) <= 1, error.path
    if isinstance(value, str):
        if error.path:
            (key,) = error.path
            assert key in _MEMBERS or key in value, (value, error.path)
        else:
            quoted = [piece for piece in _named_pieces(value) if describe(piece) in error.message]
            assert quoted, f"{error.message!r} quotes no part of {value!r}"
    else:
        assert isinstance(value, dict)
        assert error.path, f"{error.message!r}: no key named for {value!r}"
        (key,) = error.path
        assert key in value or error.message == f"missing required key '{key}'", (value, error)


def check_outcome(value: object, context: Context) -> SocketAddress | None:
    """One input's outcome, checked either way; the address, or None if refused."""
    try:
        address = parse_address(value, context)
    except ValueProblem as error:
        check_problem(value, error)
        return None
    check_parsed(value, context, address)
    return address


@given(st.text(max_size=80), st.sampled_from(Context))
def test_random_text_parses_and_reads_back_or_names_the_problem(
    text: str, context: Context
) -> None:
    check_outcome(text, context)


@given(
    st.one_of(
        st.sampled_from(["unix:", "fd:", "vsock:", "tcp:", "@", "[", ":", "h:80,"]), st.just("")
    ),
    st.text(alphabet=string.printable + "\u00e9\u0663\0", max_size=40),
    st.sampled_from(Context),
)
def test_prefixed_text_parses_and_reads_back_or_names_the_problem(
    prefix: str, rest: str, context: Context
) -> None:
    check_outcome(prefix + rest, context)


@given(_MAPPINGS, st.sampled_from(["inet", "unix", "vsock", "fd", None]), st.sampled_from(Context))
def test_random_mappings_parse_and_read_back_or_name_the_key(
    value: dict[str, object], kind: str | None, context: Context
) -> None:
    if kind is not None:
        value = {**value, "type": kind}
    check_outcome(value, context)


# Valid by construction: each of these must parse, and read back.
_IP_HOSTS = ["", "127.0.0.1", "::", "::1", "fe80::1%eth0", "10.1.2.3"]
_VALID_HOSTS = st.one_of(
    st.sampled_from([*_IP_HOSTS, "localhost", "unix", "fd", "tcp", "vsock", "a:b", "%"]),
    st.from_regex(r"[A-Za-z0-9._:%-]{0,30}", fullmatch=True),
)
_SERVICE_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9._+-]{0,31}", fullmatch=True)


@st.composite
def _valid_inet(draw: st.DrawFn) -> dict[str, object]:
    host = draw(_VALID_HOSTS)
    port: object = draw(st.one_of(st.integers(0, 65535), _SERVICE_NAMES))
    if isinstance(port, int) and draw(st.booleans()):
        port = str(port)
    members: dict[str, object] = {"type": "inet", "host": host, "port": port}
    digits = str(port).isdigit()
    if draw(st.booleans()):
        members["to"] = draw(st.integers(int(str(port)) if digits else 0, 65535))
    for key in ("ipv4", "ipv6", "keep-alive"):
        flag = draw(st.one_of(st.none(), st.booleans()))
        if flag is not None:
            members[key] = flag
    if members.get("ipv4") is False and members.get("ipv6") is False:
        del members["ipv6"]
    if digits and host in _IP_HOSTS:
        members["numeric"] = draw(st.booleans())
    return members


_PATHS = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=40
).filter(lambda path: len(os.fsencode(path)) <= 107)
_VALID_UNIX = st.fixed_dictionaries(
    {"type": st.just("unix"), "path": _PATHS},
    optional={"abstract": st.booleans(), "tight": st.booleans()},
)
_U32 = st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1).map(str))
_VALID_VSOCK = st.fixed_dictionaries({"type": st.just("vsock"), "cid": _U32, "port": _U32})


@st.composite
def _valid_fd(draw: st.DrawFn, context: Context) -> dict[str, object]:
    if context is MONITOR:
        return {"type": "fd", "str": draw(st.from_regex(NAME_RE, fullmatch=True))}
    number = draw(st.integers(0, 2**31 - 1))
    zeros = "0" * draw(st.integers(0, 3))
    return {"type": "fd", "str": draw(st.sampled_from([number, f"{zeros}{number}"]))}


def _number(value: object) -> str:
    """A decimal member as the address keeps it: a string, no leading zeros."""
    return str(int(str(value)))


def _as_address(value: dict[str, object]) -> SocketAddress:
    """The address a valid mapping stands for, member by member."""
    kind = value["type"]
    if kind == "inet":
        port = str(value["port"])
        return InetAddress(
            host=str(value["host"]),
            port=_number(port) if port.isdigit() else port,
            numeric=value.get("numeric", False) is True,
            to=value.get("to"),
            ipv4=value.get("ipv4"),
            ipv6=value.get("ipv6"),
            keep_alive=value.get("keep-alive"),
        )
    if kind == "unix":
        return UnixAddress(
            str(value["path"]),
            abstract=value.get("abstract", False) is True,
            tight=value.get("tight", True) is True,
        )
    if kind == "vsock":
        return VsockAddress(_number(value["cid"]), _number(value["port"]))
    text = str(value["str"])
    return FdAddress(_number(text) if text.isdecimal() else text)


@given(st.data(), st.sampled_from(Context))
def test_every_valid_mapping_parses_to_its_members_and_its_shorthand_reads_back(
    data: st.DataObject, context: Context
) -> None:
    value = data.draw(st.one_of(_valid_inet(), _VALID_UNIX, _VALID_VSOCK, _valid_fd(context)))
    address = check_outcome(value, context)
    assert address is not None, f"a valid address was refused: {value!r}"
    assert address == _as_address(value)


_DECIMALS = st.builds(
    lambda zeros, number: "0" * zeros + str(number), st.integers(0, 3), st.integers(0, 2**31 - 1)
)
_NAMES = st.from_regex(NAME_RE, fullmatch=True)
_FD_FORMS = [
    lambda text: f"fd:{text}",
    lambda text: {"type": "fd", "str": text},
    lambda text: (
        {"type": "fd", "str": int(text)} if text.isdecimal() else {"type": "fd", "str": text}
    ),
]


@given(st.one_of(_DECIMALS, _NAMES), st.sampled_from(_FD_FORMS), st.sampled_from(Context))
def test_the_seed_rule_holds_for_every_decimal_and_name_in_each_context(
    text: str, form: Any, context: Context
) -> None:
    """SPEC 2: decimals only outside monitor commands, names only inside, in every form."""
    value = form(text)
    decimal = text.isdecimal()
    normalized = _number(text) if decimal else text
    assert FdAddress(normalized).is_number is decimal
    if decimal is (context is STARTUP):
        assert check_outcome(value, context) == FdAddress(normalized)
    else:
        error = problem(value, context)
        rule = (
            "FD numbers are not permitted in monitor commands"
            if decimal
            else "named file descriptors are only permitted in monitor commands"
        )
        assert error.message.startswith(f"fd {normalized!r}: {rule}; ")
        assert error.path == ("str",)
        check_problem(value, error)


@given(st.integers(2**31, 10**30), st.sampled_from(_FD_FORMS), st.sampled_from(Context))
def test_an_fd_number_past_int_is_out_of_range_in_each_context(
    number: int, form: Any, context: Context
) -> None:
    error = problem(form(str(number)), context)
    assert error.message == f"fd number {number} is out of range 0..2147483647"
    assert error.path == ("str",)


@pytest.mark.parametrize(
    ("usec", "seconds"),
    [
        (1, 1e-6),
        (30_000_000, 30.0),
        (31_557_600_000_000, 31_557_600.0),  # a year: the longest
        (31_557_600_000_001, 31_557_600.0),
        (10_000_000_000_000_000, 31_557_600.0),  # the 317 years
        (2**64 - 1, 31_557_600.0),  # USEC_INFINITY
    ],
)
def test_timer_seconds_clamps_a_workers_timeout_to_a_year(usec: int, seconds: float) -> None:
    assert timer_seconds(usec) == pytest.approx(seconds)
    assert timer_seconds(usec) <= MAX_DURATION


def test_fifo_addresses() -> None:
    """``{type: fifo}`` and ``fifo:PATH`` (kind: fifo); never in a monitor command."""
    from fdsupervisor.addresses import FifoAddress

    assert parse_address({"type": "fifo", "path": "in.fifo"}, STARTUP) == FifoAddress("in.fifo")
    assert parse_address("fifo:/run/a.fifo", STARTUP) == FifoAddress("/run/a.fifo")
    assert format_address(FifoAddress("/run/a.fifo")) == "fifo:/run/a.fifo"
    assert problem({"type": "fifo", "path": ""}).path == ("path",)
    assert problem({"type": "fifo", "path": "a\0b"}).path == ("path",)
    assert problem({"type": "fifo"}).message == "missing required key 'path'"
    refused = problem({"type": "fifo", "path": "a"}, Context.MONITOR)
    assert "declared in a unit file" in refused.message and refused.path == ("type",)
    # a host named fifo keeps its inet meaning through the tcp: prefix
    inet = parse_address("tcp:fifo:80", STARTUP)
    assert parse_address(format_address(inet), STARTUP) == inet
