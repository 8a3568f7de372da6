"""SocketAddress: QEMU's QAPI union (qapi/sockets.json) and its shorthand strings.

First step of the flow: a value from a unit file, the command line or a
monitor command becomes one of the frozen address types below. The seed
rule for ``fd`` addresses (decimal numbers outside monitor commands, names
inside them) is enforced here, in :func:`check_fd_context`, and nowhere else.

Also here, because every layer above needs them and they are as pure:
:func:`check_name` (units, sockets and stored fds share one naming rule) and
:func:`parse_duration` (systemd's ``parse_sec()``).

This module is pure: it never opens a socket and never resolves a name.
Every problem is raised as :class:`~fdsupervisor.errors.ValueProblem` whose
``path`` is the key inside the address (``("port",)``), also for shorthand
strings, so that a caller can point at the offending member.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .errors import ValueProblem


class Context(enum.Enum):
    """Where an address comes from; decides which ``fd`` form is allowed."""

    STARTUP = "startup"  # unit files, --listen, internal code: fd numbers only
    MONITOR = "monitor"  # a monitor command: fd names only


@dataclass(frozen=True, slots=True)
class InetAddress:
    """``{type: inet}``: QEMU's InetSocketAddress, with QEMU's meaning."""

    host: str
    port: str  # a number or a service name, as QEMU keeps it
    numeric: bool = False
    to: int | None = None  # last port of a range: the first free port up to it
    ipv4: bool | None = None
    ipv6: bool | None = None
    keep_alive: bool | None = None


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """``{type: unix}``: a path, or with ``abstract`` a name in the abstract namespace."""

    path: str
    abstract: bool = False
    tight: bool = True  # abstract only: the address length covers just the name


@dataclass(frozen=True, slots=True)
class VsockAddress:
    """``{type: vsock}``: a VMCI/vsock context id and port, both strings as in QAPI."""

    cid: str
    port: str


@dataclass(frozen=True, slots=True)
class FdAddress:
    """``{type: fd, str: ...}``: a decimal fd number or the name of a stored fd."""

    value: str

    @property
    def is_number(self) -> bool:
        # ASCII digits only: str.isdecimal() is also true for '٣', which int()
        # would read as 3 although the user wrote a name.
        return self.value.isascii() and self.value.isdecimal()


@dataclass(frozen=True, slots=True)
class FifoAddress:
    """``{type: fifo, path: ...}``: a FIFO the supervisor creates (systemd's ``ListenFIFO=``).

    Not a QAPI type: QEMU has none, and a FIFO is not a socket. Unit files and
    ``--listen`` only (a ``kind: fifo`` socket), never a monitor command.
    """

    path: str


SocketAddress = InetAddress | UnixAddress | VsockAddress | FdAddress | FifoAddress

# --------------------------------------------------------------------------- names

NAME_MAX: Final = 255
NAME_RE: Final = re.compile(r"[A-Za-z_.-][A-Za-z0-9_.-]{0,254}")
"""Names of units, sockets and stored fds (match with ``fullmatch``).

No leading digit, so that a name can never be mistaken for an fd number
(the seed rule); the character set is a subset of what systemd accepts in
``LISTEN_FDNAMES`` (``fdname_is_valid()``: printable ASCII except ``:``).
"""

_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_NAME_RULE: Final = (
    "a name is 1 to 255 characters of A-Z a-z 0-9 _ . - and does not start with a digit"
)


def check_name(name: str, what: str) -> None:
    """Raise :class:`ValueProblem` unless ``name`` is a valid ``what`` name.

    ``what`` says what is being named (``"unit"``, ``"socket"``, ``"fd"``).
    """
    if NAME_RE.fullmatch(name):
        return
    if not name:
        reason = "it is empty"
    elif len(name) > NAME_MAX:
        reason = f"it is {len(name)} characters long"
    elif name[0] in "0123456789":
        reason = "it starts with a digit"
    else:
        bad = next(c for c in name if c not in _NAME_CHARS)
        reason = f"it contains {bad!r}"
    raise ValueProblem(f"invalid {what} name {_shorten(name)!r}: {reason}; {_NAME_RULE}")


# --------------------------------------------------------------------------- helpers

ADDRESS_FORMS: Final = (
    "HOST:PORT, [IPV6]:PORT, :PORT (optionally with ,to=PORT ,ipv4=on|off ,ipv6=on|off "
    ",keep-alive=on|off ,numeric=on), unix:PATH, @NAME (abstract unix socket), "
    "vsock:CID:PORT, fd:STR, fifo:PATH, or a mapping with a 'type' of inet, unix, vsock, fd "
    "or fifo"
)

# sun_path is 108 bytes on Linux (<sys/un.h>). A path socket needs its
# terminating NUL inside it; an abstract name gives up the leading NUL byte
# (QEMU's unix_listen_saddr(): "Path must be less than 107 bytes" for abstract).
SUN_PATH_SIZE: Final = 108
UNIX_PATH_MAX: Final = SUN_PATH_SIZE - 1
UNIX_ABSTRACT_MAX: Final = SUN_PATH_SIZE - 1

_PORT_MAX: Final = 65535
# vsock cids and ports are 32-bit (QEMU's vsock_parse_vaddr_to_sockaddr():
# parse_uint_full(..., 10) and "val > UINT32_MAX" is an error).
_VSOCK_MAX: Final = 0xFFFFFFFF
_FD_MAX: Final = 0x7FFFFFFF  # an int, as QEMU's qemu_strtoi() reads it
# QEMU reads a shorthand port with "%32[^,]"; a service name longer than that
# would be cut off there, so it is refused here everywhere.
_SERVICE_NAME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9._+-]{0,31}")
# Host names and IP literals (with an IPv6 zone such as %eth0); 253 is the
# longest DNS name (RFC 1035 section 2.3.4 minus the root label).
_HOST_RE: Final = re.compile(r"[A-Za-z0-9._:%-]{0,253}")
_DIGITS_RE: Final = re.compile(r"[0-9]+")


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: object) -> str:
    """How a wrong value is shown in an error: ``'abc'``, ``true``, ``a list``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(_shorten(value))
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def unknown_key_message(key: str, allowed: tuple[str, ...]) -> str:
    """``unknown key 'x'``, with the nearest valid key if one is close."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(allowed)}"
    return f"unknown key {_shorten(key)!r}{hint}"


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueProblem(f"expected a boolean (true or false), got {describe(value)}", (key,))
    return value


def _text(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ValueProblem(f"expected a string, got {describe(value)}", (key,))
    return value


def _decimal(value: object, key: str, maximum: int, what: str) -> str:
    """A decimal string or int in 0..maximum, normalized (no leading zeros)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DIGITS_RE.fullmatch(value):
        # int() of a huge digit string is slow (and refused past 4300 digits).
        number = int(value) if len(value) <= 20 else maximum + 1
    else:
        raise ValueProblem(f"expected {what} (a decimal number), got {describe(value)}", (key,))
    if not 0 <= number <= maximum:
        raise ValueProblem(f"{what} {_shorten(str(value))} is out of range 0..{maximum}", (key,))
    return str(number)


# --------------------------------------------------------------------------- object form


def _inet(members: Mapping[str, object]) -> InetAddress:
    # one copy of a host many units listen on (docs/performance.md, RSS at 10,000 units)
    host = sys.intern(_host(_required(members, "host")))
    port = _port(_required(members, "port"))
    numeric = _bool(members.get("numeric", False), "numeric")
    to = _to(members["to"], port) if "to" in members else None
    flags = {
        key: _bool(members[key], key) for key in ("ipv4", "ipv6", "keep-alive") if key in members
    }
    if flags.get("ipv4") is False and flags.get("ipv6") is False:
        # QEMU's inet_ai_family_from_address() refuses this with the same words.
        raise ValueProblem("Cannot disable IPv4 and IPv6 at same time", ("ipv6",))
    if numeric:
        _check_numeric(host, port)
    return InetAddress(
        host=host,
        port=port,
        numeric=numeric,
        to=to,
        ipv4=flags.get("ipv4"),
        ipv6=flags.get("ipv6"),
        keep_alive=flags.get("keep-alive"),
    )


def _host(value: object) -> str:
    host = _text(value, "host")
    if host.startswith("[") and host.endswith("]"):
        raise ValueProblem(f"write the IPv6 address without brackets: {host[1:-1]!r}", ("host",))
    if not _HOST_RE.fullmatch(host):
        raise ValueProblem(
            f"invalid host {describe(host)}: expected a host name, an IP address or '' for any",
            ("host",),
        )
    return host


def _port(value: object) -> str:
    """QEMU keeps ports as strings: a number or a service name for getaddrinfo()."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _decimal(value, "port", _PORT_MAX, "port")
    text = _text(value, "port")
    if _DIGITS_RE.fullmatch(text):
        return _decimal(text, "port", _PORT_MAX, "port")
    if _SERVICE_NAME_RE.fullmatch(text):
        return text
    hint = "; IPv6 addresses go in brackets: [::1]:80" if ":" in text else ""
    if not text:
        hint = "; use 0 to let the kernel choose a port"
    raise ValueProblem(
        f"invalid port {describe(text)}: expected a number 0..{_PORT_MAX} or a service name{hint}",
        ("port",),
    )


def _to(value: object, port: str) -> int:
    # QAPI types 'to' as uint16, so only an integer is accepted.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueProblem(f"expected a port number, got {describe(value)}", ("to",))
    if not 0 <= value <= _PORT_MAX:
        raise ValueProblem(f"to {value} is out of range 0..{_PORT_MAX}", ("to",))
    if port.isdigit() and value < int(port):
        raise ValueProblem(f"to {value} is less than port {port}", ("to",))
    return value


def _check_numeric(host: str, port: str) -> None:
    # QEMU passes AI_NUMERICHOST | AI_NUMERICSERV: names would fail to resolve.
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueProblem(
                f"numeric: true needs an IP address, got {describe(host)}", ("host",)
            ) from None
    if not port.isdigit():
        raise ValueProblem(f"numeric: true needs a port number, got {describe(port)}", ("port",))


def _unix(members: Mapping[str, object]) -> UnixAddress:
    path = _text(_required(members, "path"), "path")
    abstract = _bool(members.get("abstract", False), "abstract")
    tight = _bool(members.get("tight", True), "tight")
    check_unix_path(path, abstract)
    return UnixAddress(path=path, abstract=abstract, tight=tight)


def _fifo(members: Mapping[str, object], context: Context) -> FifoAddress:
    if context is Context.MONITOR:
        raise ValueProblem(
            "a FIFO is declared in a unit file (kind: fifo), not added by a monitor command",
            ("type",),
        )
    path = _text(_required(members, "path"), "path")
    if not path:
        raise ValueProblem("the FIFO path must not be empty", ("path",))
    if "\0" in path:
        raise ValueProblem("the FIFO path must not contain a NUL character", ("path",))
    return FifoAddress(path)


def check_unix_path(path: str, abstract: bool) -> None:
    """Raise unless ``path`` fits ``sun_path`` (see :data:`SUN_PATH_SIZE`).

    Public because a relative path is checked again once resolved.
    """
    what = "abstract socket name" if abstract else "unix socket path"
    if not path:
        # QEMU would invent a temporary path for an empty one; a supervisor
        # whose workers must find the socket has no use for that.
        raise ValueProblem(f"the {what} must not be empty", ("path",))
    if "\0" in path:
        raise ValueProblem(f"the {what} must not contain a NUL character", ("path",))
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        raise ValueProblem(f"the {what} cannot be encoded for the file system", ("path",)) from None
    limit = UNIX_ABSTRACT_MAX if abstract else UNIX_PATH_MAX
    if size > limit:
        raise ValueProblem(
            f"the {what} is {size} bytes long; at most {limit} fit in sun_path", ("path",)
        )


def _vsock(members: Mapping[str, object]) -> VsockAddress:
    cid = _decimal(_required(members, "cid"), "cid", _VSOCK_MAX, "cid")
    port = _decimal(_required(members, "port"), "port", _VSOCK_MAX, "port")
    return VsockAddress(cid=cid, port=port)


def _fd(members: Mapping[str, object], context: Context) -> FdAddress:
    value = _required(members, "str")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    text = _text(value, "str")
    if not text:
        raise ValueProblem("expected an fd number or an fd name, got ''", ("str",))
    address = FdAddress(text)
    if address.is_number:
        address = FdAddress(_decimal(text, "str", _FD_MAX, "fd number"))
    else:
        try:
            check_name(text, "fd")
        except ValueProblem as problem:
            raise ValueProblem(problem.message, ("str",)) from None
    check_fd_context(address, context)
    return address


def check_fd_context(address: FdAddress, context: Context) -> None:
    """The seed rule (SPEC section 2), after QEMU's ``socket_get_fd()``.

    QEMU reads ``str`` as an fd name when a monitor command is being
    handled (``monitor_get_fd()``) and as a number otherwise
    (``qemu_strtoi()``); qapi/sockets.json: "Named file descriptors are
    permitted in monitor commands ... Decimal file descriptors are permitted
    at startup or other contexts where no monitor context is active."
    """
    if context is Context.STARTUP and not address.is_number:
        raise ValueProblem(
            f"fd {address.value!r}: named file descriptors are only permitted in monitor "
            "commands; here give the number of an fd the supervisor inherited, such as '3'",
            ("str",),
        )
    if context is Context.MONITOR and address.is_number:
        raise ValueProblem(
            f"fd {address.value!r}: FD numbers are not permitted in monitor commands; "
            "pass the fd with getfd and use the name you gave it",
            ("str",),
        )


_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "inet": ("type", "host", "port", "numeric", "to", "ipv4", "ipv6", "keep-alive"),
    "unix": ("type", "path", "abstract", "tight"),
    "vsock": ("type", "cid", "port"),
    "fd": ("type", "str"),
    "fifo": ("type", "path"),
}


def _required(members: Mapping[str, object], key: str) -> object:
    if key not in members:
        raise ValueProblem(f"missing required key '{key}'", (key,))
    return members[key]


def _string_keys(value: Mapping[object, object]) -> dict[str, object]:
    members: dict[str, object] = {}
    for key, member in value.items():
        if not isinstance(key, str):
            raise ValueProblem(f"keys must be strings, got {describe(key)}")
        members[key] = member
    return members


def _parse_members(members: Mapping[str, object], context: Context) -> SocketAddress:
    kind = _required(members, "type")
    if not isinstance(kind, str) or kind not in _KEYS:
        raise ValueProblem(
            f"unknown address type {describe(kind)}; expected inet, unix, vsock, fd or fifo",
            ("type",),
        )
    for key in members:
        if key not in _KEYS[kind]:
            if kind == "inet" and key == "mptcp":
                raise ValueProblem("mptcp is not supported by fdsupervisor", (key,))
            raise ValueProblem(unknown_key_message(key, _KEYS[kind]), (key,))
    if kind == "inet":
        return _inet(members)
    if kind == "unix":
        return _unix(members)
    if kind == "vsock":
        return _vsock(members)
    if kind == "fifo":
        return _fifo(members, context)
    return _fd(members, context)


# --------------------------------------------------------------------------- shorthand


def _shorthand(text: str) -> dict[str, object]:
    """A shorthand string as the QAPI members it stands for, as ``socket_parse()`` reads it.

    QEMU (util/qemu-sockets.c, ``socket_parse()``): ``unix:`` then the
    whole rest is the path, ``fd:`` the whole rest is ``str``, ``vsock:``
    then ``CID:PORT`` and nothing after, ``tcp:`` or no prefix at all is
    ``inet_parse()``. ``@NAME`` is our own, for an abstract unix socket.
    """
    if text.startswith("@"):
        return {"type": "unix", "path": text[1:], "abstract": True}
    if text.startswith("unix:"):
        return {"type": "unix", "path": text[5:]}
    if text.startswith("fd:"):
        return {"type": "fd", "str": text[3:]}
    if text.startswith("fifo:"):
        return {"type": "fifo", "path": text[5:]}
    if text.startswith("vsock:"):
        return _vsock_shorthand(text[6:])
    if text.startswith("tcp:"):
        return _inet_shorthand(text[4:])
    return _inet_shorthand(text)


def _vsock_shorthand(rest: str) -> dict[str, object]:
    cid, colon, port = rest.partition(":")
    if not colon:
        raise ValueProblem(f"invalid vsock address {describe(rest)}: expected vsock:CID:PORT")
    return {"type": "vsock", "cid": cid, "port": port}


def _inet_shorthand(text: str) -> dict[str, object]:
    """QEMU's ``inet_parse()``: ``:PORT``, ``[V6ADDR]:PORT`` or ``HOST:PORT``, then options.

    QEMU finds options with ``strstr()`` and ignores anything else after
    the port; here every option must be one it knows (plus ``numeric``,
    which QEMU's shorthand lacks, so that :func:`format_address` loses
    nothing), each at most once.
    """
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueProblem(f"invalid IPv6 address {describe(text)}: expected [V6ADDR]:PORT")
        rest = rest[1:]
    else:
        host, colon, rest = text.partition(":")
        if not colon:
            raise ValueProblem(_no_port_message(text))
    port, comma, options = rest.partition(",")
    members: dict[str, object] = {"type": "inet", "host": host, "port": port}
    if comma:
        members.update(_inet_options(options))
    return members


def _no_port_message(text: str) -> str:
    hint = ""
    if text.startswith("/"):
        hint = f"; did you mean 'unix:{_shorten(text)}'?"
    elif _DIGITS_RE.fullmatch(text):
        hint = f"; did you mean ':{_shorten(text)}'?"
    return f"invalid address {describe(text)}: expected {ADDRESS_FORMS}{hint}"


_INET_FLAGS: Final = ("ipv4", "ipv6", "keep-alive", "numeric")


def _inet_options(options: str) -> dict[str, object]:
    members: dict[str, object] = {}
    for option in options.split(","):
        key, equals, value = option.partition("=")
        if not option:
            # QEMU's inet_parse_flag() rejects "ipv6=on,,foo" too.
            raise ValueProblem(f"empty option in {describe(options)}: remove the extra comma")
        if key in members:
            raise ValueProblem(f"option '{key}' is given twice", (key,))
        if key == "to":
            if not _DIGITS_RE.fullmatch(value):
                raise ValueProblem(f"expected to=PORT, got {describe(option)}", ("to",))
            members["to"] = int(value)
        elif key in _INET_FLAGS:
            members[key] = _flag(key, value if equals else None)
        elif key == "mptcp":
            raise ValueProblem("mptcp is not supported by fdsupervisor", (key,))
        else:
            raise ValueProblem(
                f"unknown option {describe(option)}; expected to=PORT, ipv4, ipv6, keep-alive "
                "or numeric (each =on or =off)",
                (key,) if key else (),
            )
    return members


def _flag(key: str, value: str | None) -> bool:
    # QEMU's inet_parse_flag(): a bare flag or "=on" is true, "=off" false.
    if value is None or value == "on":
        return True
    if value == "off":
        return False
    raise ValueProblem(f"expected {key}=on or {key}=off, got {describe(value)}", (key,))


# --------------------------------------------------------------------------- public


def parse_address(value: object, context: Context) -> SocketAddress:
    """A shorthand string or a QAPI SocketAddress mapping → a validated address.

    Raises :class:`ValueProblem` (only that) with the member's key path.
    Names are not resolved and fds not looked at: that is binding's job.
    """
    if isinstance(value, str):
        return _parse_members(_shorthand(value), context)
    if isinstance(value, Mapping):
        return _parse_members(_string_keys(value), context)
    raise ValueProblem(f"expected an address, got {describe(value)}; an address is {ADDRESS_FORMS}")


# Shorthand prefixes that socket_parse() tests before falling back to inet.
_PREFIXES: Final = ("unix:", "fd:", "vsock:", "tcp:", "fifo:")


def format_address(address: SocketAddress) -> str:
    """The canonical shorthand of ``address``, which :func:`parse_address` reads back.

    One case has no shorthand and loses a member: an abstract socket with
    ``tight: false`` is shown as ``@NAME`` like a tight one.
    """
    if isinstance(address, InetAddress):
        return _format_inet(address)
    if isinstance(address, UnixAddress):
        return f"@{address.path}" if address.abstract else f"unix:{address.path}"
    if isinstance(address, VsockAddress):
        return f"vsock:{address.cid}:{address.port}"
    if isinstance(address, FifoAddress):
        return f"fifo:{address.path}"
    return f"fd:{address.value}"


def _format_inet(address: InetAddress) -> str:
    host = f"[{address.host}]" if ":" in address.host else address.host
    text = f"{host}:{address.port}"
    if text.startswith(_PREFIXES) or text.startswith("@"):
        text = "tcp:" + text  # a host named "unix" must not read as unix:PATH
    options = [f"to={address.to}"] if address.to is not None else []
    for key, flag in (
        ("ipv4", address.ipv4),
        ("ipv6", address.ipv6),
        ("keep-alive", address.keep_alive),
    ):
        if flag is not None:
            options.append(f"{key}={'on' if flag else 'off'}")
    if address.numeric:
        options.append("numeric=on")
    return ",".join([text, *options])


# --------------------------------------------------------------------------- durations

USEC_PER_SEC: Final = 1_000_000
# systemd's extract_multiplier() table (src/basic/time-util.c), in its
# order: the first suffix that is a prefix of the text wins, so "ms" must
# come before "m" and "min" before "m".
_UNITS: Final[tuple[tuple[str, int], ...]] = (
    ("seconds", USEC_PER_SEC),
    ("second", USEC_PER_SEC),
    ("sec", USEC_PER_SEC),
    ("s", USEC_PER_SEC),
    ("minutes", 60 * USEC_PER_SEC),
    ("minute", 60 * USEC_PER_SEC),
    ("min", 60 * USEC_PER_SEC),
    ("months", 2_629_800 * USEC_PER_SEC),
    ("month", 2_629_800 * USEC_PER_SEC),
    ("M", 2_629_800 * USEC_PER_SEC),
    ("msec", 1000),
    ("ms", 1000),
    ("m", 60 * USEC_PER_SEC),
    ("hours", 3600 * USEC_PER_SEC),
    ("hour", 3600 * USEC_PER_SEC),
    ("hr", 3600 * USEC_PER_SEC),
    ("h", 3600 * USEC_PER_SEC),
    ("days", 86400 * USEC_PER_SEC),
    ("day", 86400 * USEC_PER_SEC),
    ("d", 86400 * USEC_PER_SEC),
    ("weeks", 604800 * USEC_PER_SEC),
    ("week", 604800 * USEC_PER_SEC),
    ("w", 604800 * USEC_PER_SEC),
    ("years", 31_557_600 * USEC_PER_SEC),
    ("year", 31_557_600 * USEC_PER_SEC),
    ("y", 31_557_600 * USEC_PER_SEC),
    ("usec", 1),
    ("us", 1),
    ("\u03bcs", 1),  # GREEK SMALL LETTER MU
    ("\u00b5s", 1),  # MICRO SIGN
)
USEC_INFINITY: Final = 2**64 - 1  # systemd's; a worker's timeout of it means "none"
_USEC_INFINITY: Final = USEC_INFINITY  # values reaching it are ERANGE
# The longest finite duration a unit file may give, and the longest timer a
# worker's WATCHDOG_USEC= may set: one year (systemd's "1y", 365.25 days).
# systemd takes anything below USEC_INFINITY (584,542 years) and saturates
# sums at it (usec_add()); no delay or timeout that long means anything but
# "never", which is `infinity` where a key allows it, and a longer one is a
# typo ("400000y") or an attack on the event loop's arithmetic.
MAX_DURATION: Final = 31_557_600.0
_WHITESPACE: Final = " \t\n\r"  # systemd's WHITESPACE
_COMPONENT_RE: Final = re.compile(r"(\+?[0-9]+)?(\.[0-9]*)?")
_DURATION_HELP: Final = (
    "expected a number of seconds or a time span such as 250ms, 10s, 2min, 1h or '1min 30s'"
)


def parse_duration(value: object) -> float:
    """A duration in seconds: a number >= 0, or a string as systemd's ``parse_sec()`` reads it.

    ``infinity`` (or a float infinity) is :data:`math.inf`. Raises
    :class:`ValueProblem` only.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueProblem(f"{_DURATION_HELP}, got {describe(value)}")
    if isinstance(value, str):
        return _parse_sec(value)
    if isinstance(value, float) and math.isnan(value):
        raise ValueProblem("a duration must be a number, got NaN")
    if value < 0:
        raise ValueProblem(f"a duration must not be negative, got {value!r}")
    if value == math.inf:
        return math.inf
    if value * USEC_PER_SEC >= _USEC_INFINITY:
        raise ValueProblem(f"the duration {value!r} is too large")
    return float(value)


def timer_seconds(usec: int) -> float:
    """A timeout in microseconds from a worker (``WATCHDOG_USEC=``) as seconds for a timer.

    Clamped to :data:`MAX_DURATION`, as systemd's ``usec_add()`` saturates a
    deadline instead of letting it overflow; ``USEC_INFINITY`` is clamped
    too (systemd reads it as "no watchdog": a year is as good as never).
    """
    return min(usec / USEC_PER_SEC, MAX_DURATION)


def _parse_sec(text: str) -> float:
    """systemd's ``parse_time(t, &usec, USEC_PER_SEC)``, step by step, in microseconds."""
    rest = text.lstrip(_WHITESPACE)
    if rest.startswith("infinity"):
        if rest[len("infinity") :].strip(_WHITESPACE):
            raise ValueProblem(f"invalid duration {describe(text)}: {_DURATION_HELP}")
        return math.inf
    usec = 0
    something = False
    while True:
        rest = rest.lstrip(_WHITESPACE)
        if not rest:
            break
        added, rest = _sec_component(text, rest)
        usec += added
        if usec >= _USEC_INFINITY:
            raise ValueProblem(f"the duration {describe(text)} is too large")
        something = True
    if not something:
        raise ValueProblem(f"invalid duration {describe(text)}: {_DURATION_HELP}")
    return usec / USEC_PER_SEC


def _sec_component(text: str, rest: str) -> tuple[int, str]:
    """One ``NUMBER[.FRACTION][ ]UNIT`` of ``parse_time()``; returns (usec, what follows)."""
    invalid = ValueProblem(f"invalid duration {describe(text)}: {_DURATION_HELP}")
    if rest.startswith("-"):
        raise ValueProblem(f"a duration must not be negative, got {describe(text)}")
    match = _COMPONENT_RE.match(rest)
    assert match is not None  # every group is optional
    whole, fraction = match.group(1), match.group(2)
    if whole is None and fraction is None:
        raise invalid
    if whole is not None and len(whole) > 24:  # far past USEC_INFINITY whatever the unit
        raise ValueProblem(f"the duration {describe(text)} is too large")
    after = rest[match.end() :]
    unit_text = after.lstrip(_WHITESPACE)
    multiplier, unit = _multiplier(unit_text)
    remaining = unit_text[len(unit) :]
    # "Don't allow '12.34.56', but accept '12.34 .56' or '12.34s.56'"
    if not unit and remaining and len(remaining) == len(after):
        raise invalid
    usec = int(whole or "0") * multiplier
    if fraction is not None:
        # "Don't allow "0.-0", "3.+1", "3. 1", "3.sec" or "3.hoge""
        if len(fraction) == 1:
            raise invalid
        usec += _fraction_usec(fraction[1:], multiplier)
    return usec, remaining


def _multiplier(text: str) -> tuple[int, str]:
    for suffix, usec in _UNITS:
        if text.startswith(suffix):
            return usec, suffix
    return USEC_PER_SEC, ""


def _fraction_usec(digits: str, multiplier: int) -> int:
    # Digit by digit with integer division, as systemd does: digits past the
    # microsecond are dropped, not rounded.
    total = 0
    scale = multiplier // 10
    for digit in digits:
        if not scale:
            break
        total += int(digit) * scale
        scale //= 10
    return total
