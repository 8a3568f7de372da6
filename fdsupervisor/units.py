"""Unit files: YAML in, frozen validated :class:`Unit` out.

Second step of the flow. A unit declares its listening sockets (ordered:
the order is the fd order 3, 4, ... in its workers) and one service. Every
error names FILE:LINE:COL and the key path; a whole set of files is
validated before anything is bound, and every error found is reported
(:class:`~fdsupervisor.errors.ConfigErrors`, also for a single file).

The YAML is read with ``yaml.compose()`` (SafeLoader) into nodes, never
constructed into Python objects, so that each value keeps its position and
its source text. Choices made here, where SPEC.md is silent:

- Where a string is expected, the scalar's text is taken as written:
  ``exec: [app, yes, 1.10]`` passes ``yes`` and ``1.10``, not ``True`` and
  ``1.1``. An unquoted ``~`` or empty value (null) is an error there.
- YAML 1.1 reads an unquoted ``no``/``off``/``false`` as false, so
  ``restart:`` accepts false as ``no``; every other key wants its own type
  (booleans only YAML booleans, integers only YAML integers, no
  sexagesimal ``1:30``).
- ``mode`` and ``directory-mode`` are always octal (``0660``, ``660`` and
  ``"0660"`` are the same), as systemd's ``SocketMode=``.
- ``receive-buffer`` / ``send-buffer`` take bytes or a K/M/G suffix (base
  1024), as systemd's ``ReceiveBuffer=``.
- Relative unix socket paths and working directories are resolved against
  the unit file's directory at load time, so a :class:`Unit` holds only
  absolute paths.
- ``restart-delay-max`` defaults to 30s, or to ``restart-delay`` if that is
  longer; ``start-limit.interval: 0`` disables the start limit, as
  systemd's ``StartLimitIntervalSec=0``.
- In accept mode a worker gets only its connection, at fd 3 named
  ``connection`` (SPEC section 4), so ``{fd:connection}`` is the one fd
  placeholder allowed there.
- Only regular files of at most :data:`MAX_UNIT_FILE_SIZE` are read: a FIFO
  would block the reader (and the supervisor's loop at reload) forever, a
  device such as ``/dev/zero`` never ends, a huge file takes minutes and
  gigabytes to parse. systemd likewise reads a unit file only if it is a
  regular file (``unit_file_load()`` refuses others with ``-EBADMSG``) and
  caps what it reads (``READ_FULL_BYTES_MAX``).
- Durations are at most a year (``MAX_DURATION``); ``infinity`` where a key
  allows it means never.
"""

from __future__ import annotations

import enum
import functools
import math
import os
import re
import shlex
import signal
import stat
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from .addresses import (
    MAX_DURATION,
    Context,
    FdAddress,
    FifoAddress,
    InetAddress,
    SocketAddress,
    UnixAddress,
    VsockAddress,
    check_name,
    check_unix_path,
    describe,
    format_address,
    parse_address,
    parse_duration,
    unknown_key_message,
)
from .errors import ConfigError, ConfigErrors, Location, ValueProblem
from .matching import AddressKey, address_key

OUTPUT_TARGETS: Final = ("inherit", "null", "journal")


class SocketKind(enum.StrEnum):
    STREAM = "stream"
    DATAGRAM = "datagram"
    SEQPACKET = "seqpacket"
    FIFO = "fifo"  # not a socket: a named pipe the supervisor creates (ListenFIFO=)


class Activation(enum.StrEnum):
    EAGER = "eager"
    ON_DEMAND = "on-demand"


class RestartPolicy(enum.StrEnum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


@dataclass(frozen=True, slots=True)
class SocketSpec:
    """One listening socket of a unit; ``name`` is its FD name (LISTEN_FDNAMES)."""

    name: str
    address: SocketAddress
    kind: SocketKind = SocketKind.STREAM
    backlog: int = 128
    reuse_port: bool = False
    mode: int | None = None  # unix path sockets and FIFOs: file mode of the file
    user: str | None = None  # unix path sockets and FIFOs: owner of the file
    group: str | None = None
    directory_mode: int = 0o755  # parent directories the supervisor creates
    keep_alive: bool = False  # SO_KEEPALIVE (systemd.socket KeepAlive=)
    no_delay: bool = False  # TCP_NODELAY (NoDelay=)
    free_bind: bool = False  # IP_FREEBIND (FreeBind=)
    receive_buffer: int | None = None  # SO_RCVBUF (ReceiveBuffer=)
    send_buffer: int | None = None  # SO_SNDBUF (SendBuffer=)
    # accept mode: connections at once from one peer IP (inet), uid (unix),
    # CID (vsock); more are closed at once (MaxConnectionsPerSource=)
    max_connections_per_source: int | None = None
    # more than burst activations or accepts within interval: the socket is
    # not watched for the rest of it (systemd's PollLimitIntervalSec= /
    # PollLimitBurst=); None: no limit
    trigger_limit: TriggerLimit | None = None
    # Where the socket was declared (its `listen:` value), for errors found
    # later (binding, conflicts); not part of the socket's identity.
    location: Location | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TriggerLimit:
    """A socket's ``trigger-limit``: at most ``burst`` activations or accepts per ``interval``."""

    interval: float
    burst: int


class FdStorePreserve(enum.StrEnum):
    """``fd-store-preserve``: when a service's stored fds are released (systemd's
    ``FileDescriptorStorePreserve=``, systemd.service(5))."""

    NO = "no"  # whenever the service stops, even before an automatic restart
    RESTART = "restart"  # when it stops for good: kept across restarts and crashes
    YES = "yes"  # only when its unit goes (a reload that removes it)


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """The one service of a unit: what to run and how to supervise it."""

    exec: tuple[str, ...]
    environment: tuple[tuple[str, str], ...] = ()
    clear_environment: bool = False
    working_directory: str | None = None
    user: str | None = None
    group: str | None = None
    activation: Activation = Activation.EAGER
    accept: bool = False
    inetd: bool = False
    max_connections: int = 64
    instances: int = 1
    restart: RestartPolicy = RestartPolicy.ON_FAILURE
    restart_delay: float = 0.1
    restart_delay_max: float = 30.0
    start_limit_burst: int = 5
    start_limit_interval: float = 10.0
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 10.0
    notify: bool = False
    start_timeout: float = 90.0
    # A restart or a reload starts each new worker before it stops an old one
    # (SPEC 8); False: stop them all, then start (systemd's only way).
    overlap: bool = True
    watchdog: float = 0.0
    fd_store_max: int = 0
    fd_store_preserve: FdStorePreserve = FdStorePreserve.RESTART
    # Where the worker's stdout and stderr go, as systemd's StandardOutput= /
    # StandardError=: "inherit" (the supervisor's own), "null", "journal",
    # "file:/abs/path" (written from the start) or "append:/abs/path".
    stdout: str = "inherit"
    stderr: str = "inherit"
    # Hardening applied in the child before exec (SPEC section 10, systemd's
    # LimitXXX=, UMask=, NoNewPrivileges=, SupplementaryGroups=).
    limits: tuple[ResourceLimit, ...] = ()
    umask: int | None = None  # None: the supervisor's own
    no_new_privileges: bool = False
    supplementary_groups: tuple[str, ...] | None = None  # None: the user's own groups
    # Where user:, group: and supplementary-groups: were written, for errors
    # found when they are resolved (fdsupervisor check, start); not identity.
    account_locations: tuple[tuple[str, Location], ...] = field(
        default=(), compare=False, repr=False
    )

    def account_location(self, key: str) -> Location | None:
        """Where the account key ``key`` (``user``, ``group``, ``supplementary-groups.N``) is."""
        return dict(self.account_locations).get(key)


RLIM_INFINITY: Final = -1
"""``infinity`` in a :class:`ResourceLimit` (``resource.RLIM_INFINITY`` on Linux)."""


@dataclass(frozen=True, slots=True)
class ResourceLimit:
    """One ``limits:`` entry: systemd's ``LimitNAME=`` lower-case, soft and hard (-1: infinity)."""

    name: str  # nofile, nproc, ... (resolved to RLIMIT_* by spawn.py)
    soft: int
    hard: int
    # where the value was written, for errors found against this host (spawn.limit_errors)
    location: Location | None = field(default=None, compare=False, repr=False)


# systemd's Limit*= names (systemd.exec(5), "Process Properties"), lower-case,
# with the unit of each value: bytes take K/M/G/T/P/E (base 1024) as systemd's
# parse_size(); cpu is seconds, rttime microseconds, nice a nice level or the
# raw rlimit (rlimit_parse_one() in systemd's src/basic/rlimit-util.c).
LIMIT_UNITS: Final = {
    "cpu": "seconds",
    "fsize": "bytes",
    "data": "bytes",
    "stack": "bytes",
    "core": "bytes",
    "rss": "bytes",
    "nproc": "count",
    "nofile": "count",
    "memlock": "bytes",
    "as": "bytes",
    "locks": "count",
    "sigpending": "count",
    "msgqueue": "bytes",
    "nice": "nice",
    "rtprio": "count",
    "rttime": "microseconds",
}


@dataclass(frozen=True, slots=True)
class Unit:
    name: str
    source: Path  # the unit file, or a pseudo path for a command-line unit
    base_dir: Path  # relative unix socket paths and working directories resolve here
    sockets: tuple[SocketSpec, ...]
    service: ServiceSpec
    socket_names: tuple[str, ...] = field(init=False)
    # The unit file's text as it was loaded: an upgrade hands it over so that the
    # new program can go back to exactly this unit (upgrade.RunConfig).
    text: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "socket_names", tuple(s.name for s in self.sockets))


# --------------------------------------------------------------------------- placeholders

ACCEPT_FD_NAME: Final = "connection"
"""The FD name of the connection in accept mode (``LISTEN_FDNAMES=connection``)."""

_PLACEHOLDER_RE: Final = re.compile(r"\{(?:fd:([^{}]*)|instance)\}")


def placeholder_names(text: str) -> list[str]:
    """The NAMEs of every ``{fd:NAME}`` in ``text``, in order."""
    return [m.group(1) for m in _PLACEHOLDER_RE.finditer(text) if m.group(1) is not None]


def expand_placeholders(text: str, fd_numbers: Mapping[str, int], instance: int) -> str:
    """``{fd:NAME}`` → its fd number, ``{instance}`` → ``instance``; other braces stay.

    Raises :class:`ValueProblem` for a NAME missing from ``fd_numbers``
    (a loaded unit never has one: :func:`check_placeholders` ran).
    """

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return str(instance)
        if name not in fd_numbers:
            raise ValueProblem(f"no fd named {name!r} for {{fd:{name}}}")
        return str(fd_numbers[name])

    return _PLACEHOLDER_RE.sub(substitute, text)


def check_placeholders(text: str, socket_names: Sequence[str], accept: bool) -> None:
    """Raise :class:`ValueProblem` if a ``{fd:NAME}`` in ``text`` names no fd a worker gets."""
    allowed = (ACCEPT_FD_NAME,) if accept else tuple(socket_names)
    for name in placeholder_names(text):
        if name in allowed:
            continue
        start = f"unknown socket {name!r} in {{fd:{name}}}"
        if accept:
            raise ValueProblem(
                f"{start}; with accept: true a worker gets only its connection: "
                f"use {{fd:{ACCEPT_FD_NAME}}}"
            )
        if not socket_names:
            raise ValueProblem(f"{start}; this unit has no sockets")
        raise ValueProblem(f"{start}; this unit's sockets are: {', '.join(socket_names)}")


# --------------------------------------------------------------------------- YAML scalars

_YAML_TAG: Final = "tag:yaml.org,2002:"
# libyaml's loader where PyYAML was built with it (the wheels are), else None.
_CSafeLoader: Final[type[yaml.CSafeLoader] | None] = getattr(yaml, "CSafeLoader", None)
_NULL: Final = _YAML_TAG + "null"
_BOOL: Final = _YAML_TAG + "bool"
_INT: Final = _YAML_TAG + "int"
_FLOAT: Final = _YAML_TAG + "float"
_STR: Final = _YAML_TAG + "str"
_MERGE: Final = _YAML_TAG + "merge"

KeyPath = tuple[str, ...]
T = TypeVar("T")


def _yaml_int(text: str) -> int | None:
    """A YAML 1.1 int scalar (``0o``-less octal ``0660``, ``0x1F``, ``1_000``); no sexagesimal."""
    digits = text.replace("_", "")
    sign = -1 if digits.startswith("-") else 1
    digits = digits[1:] if digits[:1] in ("-", "+") else digits
    if ":" in digits:
        return None  # "1:30" is 90 in YAML 1.1: too surprising to accept
    base = 10
    if digits.startswith(("0b", "0x")):
        base, digits = (2 if digits[1] == "b" else 16), digits[2:]
    elif digits.startswith("0") and len(digits) > 1:
        base = 8
    try:
        return sign * int(digits, base)
    except ValueError:  # also Python's limit on very long digit strings
        return None


def _yaml_float(text: str) -> float | None:
    lowered = text.replace("_", "").lower()
    if ":" in lowered:
        return None
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    if lowered in special:
        return special[lowered]
    try:
        return float(lowered)
    except ValueError:
        return None


def _plain_value(node: Node) -> object:
    """A node as the Python value a QAPI member would carry; collections stay opaque."""
    if isinstance(node, MappingNode):
        return {}
    if isinstance(node, SequenceNode):
        return []
    text: str = node.value
    if node.tag == _NULL:
        return None
    if node.tag == _BOOL:
        return text.lower() in ("yes", "true", "on")
    if node.tag == _INT:
        number = _yaml_int(text)
        return text if number is None else number
    if node.tag == _FLOAT:
        real = _yaml_float(text)
        return text if real is None else real
    return text


def _node_text(node: Node) -> str:
    """How a node is shown in an error: ``'abc'``, ``null``, ``a mapping``."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _NULL:
        return "null"
    return describe(str(node.value))


def _descend(node: Node, path: Sequence[str]) -> Node:
    """The deepest node along ``path`` inside ``node`` (mapping keys only)."""
    for key in path:
        if not isinstance(node, MappingNode):
            break
        found = [v for k, v in node.value if isinstance(k, ScalarNode) and k.value == key]
        if not found:
            break
        node = found[0]
    return node


# --------------------------------------------------------------------------- keys

_TOP_KEYS: Final = ("name", "sockets", "service")
_SOCKET_KEYS: Final = (
    "listen",
    "kind",
    "backlog",
    "reuse-port",
    "mode",
    "user",
    "group",
    "directory-mode",
    "keep-alive",
    "no-delay",
    "free-bind",
    "receive-buffer",
    "send-buffer",
    "max-connections-per-source",
    "trigger-limit",
)
_SERVICE_KEYS: Final = (
    "exec",
    "environment",
    "clear-environment",
    "working-directory",
    "user",
    "group",
    "activation",
    "accept",
    "inetd",
    "max-connections",
    "instances",
    "restart",
    "restart-delay",
    "restart-delay-max",
    "start-limit",
    "stop-signal",
    "stop-timeout",
    "notify",
    "start-timeout",
    "overlap",
    "watchdog",
    "fd-store-max",
    "fd-store-preserve",
    "stdout",
    "stderr",
    "limits",
    "umask",
    "no-new-privileges",
    "supplementary-groups",
)
_START_LIMIT_KEYS: Final = ("burst", "interval")
_TRIGGER_LIMIT_KEYS: Final = ("interval", "burst")

_PORT_MAX: Final = 65535
_INT_MAX: Final = 2**31 - 1  # SO_RCVBUF / SO_SNDBUF take a C int
_DEFAULT_RESTART_DELAY_MAX: Final = 30.0  # ServiceSpec.restart_delay_max
_OCTAL_MODE_RE: Final = re.compile(r"(?:0o)?0*([0-7]{1,4})")
_SIZE_RE: Final = re.compile(r"([0-9]{1,12})([KMG]?)")
_SIZE_FACTORS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_LIMIT_RE: Final = re.compile(r"([0-9]{1,20})([KMGTPE]?)")
_LIMIT_FACTORS: Final[dict[str, int]] = {"": 1} | {
    c: 1 << (10 * (i + 1)) for i, c in enumerate("KMGTPE")
}
_RLIM_MAX: Final = 2**63 - 1  # rlim_t is 64-bit; all ones is RLIM_INFINITY
_NICE_RE: Final = re.compile(r"([+-])([0-9]{1,2})")
_GROUPS_MAX: Final = 65536  # NGROUPS_MAX of the kernel


@dataclass(frozen=True, slots=True)
class _Entry:
    key: Node
    value: Node


# --------------------------------------------------------------------------- reader


class _UnitReader:
    """Reads one unit's node tree, collecting every error instead of stopping at the first.

    Converters take ``(node, key_path)`` and return a value or raise
    :class:`ConfigError`; :meth:`_field` records the error and substitutes
    the default, so that one bad value does not hide the next one.
    Checks across fields run only when the fields involved were valid, so
    that one mistake is reported once.
    """

    def __init__(self, source: Path, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir.absolute()
        self.errors: list[ConfigError] = []

    # ---- error plumbing

    def location(self, node: Node) -> Location:
        mark = node.start_mark
        return Location(str(self.source), mark.line + 1, mark.column + 1)

    def error(self, node: Node, path: Sequence[str], message: str) -> ConfigError:
        return ConfigError(self.location(node), path, message)

    def _attempt(
        self, convert: Callable[[Node, KeyPath], T], node: Node, path: KeyPath, default: T
    ) -> T:
        try:
            return convert(node, path)
        except ConfigError as error:
            self.errors.append(error)
            return default

    def _field(
        self,
        entries: Mapping[str, _Entry],
        key: str,
        path: KeyPath,
        convert: Callable[[Node, KeyPath], T],
        default: T,
    ) -> T:
        entry = entries.get(key)
        if entry is None:
            return default
        return self._attempt(convert, entry.value, (*path, key), default)

    def _required(self, entries: Mapping[str, _Entry], key: str, node: Node, path: KeyPath) -> Node:
        entry = entries.get(key)
        if entry is None:
            raise self.error(node, path, f"missing required key '{key}'")
        return entry.value

    # ---- document and mappings

    def compose(self, text: str) -> Node | None:
        # libyaml's parser (CSafeLoader) composes the same nodes with the same
        # line:col marks some 5x faster, which is most of loading 10,000 units
        # (docs/performance.md). Its error messages are not PyYAML's, so a text
        # it refuses is read again by the pure parser, whose message is reported.
        if _CSafeLoader is not None:
            try:
                return yaml.compose(text, Loader=_CSafeLoader)
            except (yaml.YAMLError, RecursionError):
                pass
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as error:
            self.errors.append(self._yaml_error(error))
        except ReaderError as error:
            self.errors.append(self._reader_error(text, error))
        except yaml.YAMLError as error:  # no position known
            self.errors.append(
                ConfigError(Location(str(self.source)), (), f"invalid YAML: {error}")
            )
        except RecursionError:
            self.errors.append(
                ConfigError(Location(str(self.source)), (), "invalid YAML: nested too deeply")
            )
        return None

    def _yaml_error(self, error: yaml.MarkedYAMLError) -> ConfigError:
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "syntax error"
        if error.context and error.problem:
            context = error.context
            opened = error.context_mark
            unterminated = context.startswith("while ")  # "while scanning a quoted scalar"
            if unterminated and opened is not None and mark and opened.line != mark.line:
                # An unterminated quote or bracket: where it was opened is what helps.
                context += f" opened at {opened.line + 1}:{opened.column + 1}"
            problem = f"{problem} ({context})"
        if mark is None:
            return ConfigError(Location(str(self.source)), (), f"invalid YAML: {problem}")
        location = Location(str(self.source), mark.line + 1, mark.column + 1)
        return ConfigError(location, (), f"invalid YAML: {problem}")

    def _reader_error(self, text: str, error: ReaderError) -> ConfigError:
        position = int(error.position)
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        character = error.character  # an int (the code point) for str input
        shown = repr(chr(character)) if isinstance(character, int) else repr(character)
        message = f"invalid YAML: character {shown} is not allowed: {error.reason}"
        return ConfigError(Location(str(self.source), line, column), (), message)

    def mapping(
        self, node: Node, path: KeyPath, allowed: Sequence[str] | None
    ) -> dict[str, _Entry]:
        """A mapping's entries by key; duplicate and (with ``allowed``) unknown keys are errors."""
        if not isinstance(node, MappingNode):
            raise self.error(node, path, f"expected a mapping, got {_node_text(node)}")
        entries: dict[str, _Entry] = {}
        first_seen: dict[str, Node] = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, path)
            if key is None:
                continue
            if key in first_seen:
                line = first_seen[key].start_mark.line + 1
                self.errors.append(
                    self.error(
                        key_node, (*path, key), f"duplicate key '{key}' (first on line {line})"
                    )
                )
                continue
            first_seen[key] = key_node
            if allowed is not None and key not in allowed:
                message = unknown_key_message(key, tuple(allowed))
                self.errors.append(self.error(key_node, path, message))
                continue
            entries[key] = _Entry(key_node, value_node)
        return entries

    def _key(self, node: Node, path: KeyPath) -> str | None:
        if not isinstance(node, ScalarNode):
            self.errors.append(
                self.error(node, path, f"a key must be a string, got {_node_text(node)}")
            )
            return None
        if node.tag == _MERGE:
            message = "YAML merge keys ('<<') are not supported; write the keys out"
            self.errors.append(self.error(node, path, message))
            return None
        return sys.intern(str(node.value))  # a socket's name: see string()

    # ---- scalars

    def scalar(self, node: Node, path: KeyPath, expected: str) -> ScalarNode:
        if not isinstance(node, ScalarNode) or node.tag == _NULL:
            raise self.error(node, path, f"expected {expected}, got {_node_text(node)}")
        if not node.tag.startswith(_YAML_TAG):
            raise self.error(node, path, f"unsupported YAML tag {node.tag!r}")
        return node

    def string(self, node: Node, path: KeyPath) -> str:
        text = str(self.scalar(node, path, "a string").value)
        if "\0" in text:
            raise self.error(node, path, "must not contain a NUL character")
        # One copy of what many units repeat (a program, its arguments, an address),
        # not one per unit (docs/performance.md, RSS at 10,000 units).
        return sys.intern(text)

    def nonempty_string(self, node: Node, path: KeyPath) -> str:
        text = self.string(node, path)
        if not text:
            raise self.error(node, path, "must not be empty")
        return text

    def boolean(self, node: Node, path: KeyPath) -> bool:
        scalar = self.scalar(node, path, "a boolean (true or false)")
        if scalar.tag != _BOOL:
            raise self.error(
                node, path, f"expected a boolean (true or false), got {_node_text(node)}"
            )
        return str(scalar.value).lower() in ("yes", "true", "on")

    def integer(
        self, node: Node, path: KeyPath, minimum: int = 0, maximum: int | None = None
    ) -> int:
        scalar = self.scalar(node, path, "an integer")
        number = _yaml_int(str(scalar.value)) if scalar.tag == _INT else None
        if number is None:
            raise self.error(node, path, f"expected an integer, got {_node_text(node)}")
        if maximum is not None and not minimum <= number <= maximum:
            raise self.error(
                node, path, f"expected an integer from {minimum} to {maximum}, got {number}"
            )
        if number < minimum:
            raise self.error(node, path, f"expected an integer of at least {minimum}, got {number}")
        return number

    def duration(self, node: Node, path: KeyPath, allow_infinity: bool = False) -> float:
        scalar = self.scalar(node, path, "a duration")
        text = str(scalar.value)
        value: object = text  # parse_duration says what is wrong with it
        if scalar.tag == _BOOL:
            value = _plain_value(scalar)
        elif scalar.tag == _INT:
            value = _yaml_int(text)
        elif scalar.tag == _FLOAT:
            value = _yaml_float(text)
        if value is None:  # sexagesimal "1:30"
            value = text
        try:
            seconds = parse_duration(value)
        except ValueProblem as problem:
            raise self.error(node, path, problem.message) from None
        if seconds == math.inf and not allow_infinity:
            raise self.error(node, path, "must be a finite duration, not infinity")
        if math.isfinite(seconds) and seconds > MAX_DURATION:
            never = "; for 'never' write infinity" if allow_infinity else ""
            raise self.error(
                node,
                path,
                f"the duration {_node_text(node)} is too long: at most 1y "
                f"({MAX_DURATION:.0f} seconds){never}",
            )
        return seconds

    def choice(self, node: Node, path: KeyPath, choices: type[enum.StrEnum]) -> str:
        names = [member.value for member in choices]
        text = str(self.scalar(node, path, f"one of {', '.join(names)}").value)
        if text not in names:
            raise self.error(
                node, path, f"expected one of {', '.join(names)}, got {describe(text)}"
            )
        return text

    def octal_mode(self, node: Node, path: KeyPath) -> int:
        # Always octal, as systemd's SocketMode= / DirectoryMode=: YAML would read
        # an unquoted 0660 as octal but 660 as decimal.
        text = str(self.scalar(node, path, "an octal file mode such as '0660'").value)
        match = _OCTAL_MODE_RE.fullmatch(text)
        if match is None:
            raise self.error(
                node,
                path,
                f"expected an octal file mode from 0 to 7777 such as '0660', got {describe(text)}",
            )
        return int(match.group(1), 8)

    def size(self, node: Node, path: KeyPath) -> int:
        scalar = self.scalar(node, path, "a size in bytes")
        text = str(scalar.value)
        match = _SIZE_RE.fullmatch(text) if scalar.tag in (_INT, _STR) else None
        if match is None:
            raise self.error(
                node,
                path,
                f"expected a size in bytes, optionally with K, M or G, got {describe(text)}",
            )
        size = int(match.group(1)) * _SIZE_FACTORS[match.group(2)]
        if not 1 <= size <= _INT_MAX:
            raise self.error(node, path, f"the size must be from 1 to {_INT_MAX} bytes, got {size}")
        return size

    def stop_signal(self, node: Node, path: KeyPath) -> signal.Signals:
        # systemd's signal_from_string(): "SIGTERM", "TERM" or a number.
        text = str(self.scalar(node, path, "a signal such as SIGTERM").value)
        try:
            if text.isascii() and text.isdigit():
                return signal.Signals(int(text))
            return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
        except (KeyError, ValueError):
            pass
        raise self.error(
            node,
            path,
            f"expected a signal name such as SIGTERM or TERM, or its number, got {describe(text)}",
        )

    def name(self, node: Node, path: KeyPath, what: str) -> str:
        text = self.string(node, path)
        try:
            check_name(text, what)
        except ValueProblem as problem:
            raise self.error(node, path, problem.message) from None
        return text

    def path_string(self, node: Node, path: KeyPath) -> str:
        """A file system path; a relative one is resolved against the unit's directory."""
        return os.path.join(self.base_dir, self.nonempty_string(node, path))


@dataclass(frozen=True, slots=True)
class _SocketRules:
    """Which socket keys apply to which sockets (a key that does not apply is an error)."""

    key: str
    applies: Callable[[SocketAddress, SocketKind], bool]
    message: str


def _is_unix_path(address: SocketAddress, kind: SocketKind) -> bool:
    """A file the supervisor creates at a path: a unix socket's, or a FIFO."""
    return isinstance(address, FifoAddress) or (
        isinstance(address, UnixAddress) and not address.abstract
    )


def _is_socket(address: SocketAddress, kind: SocketKind) -> bool:
    return kind is not SocketKind.FIFO


def _is_inet(address: SocketAddress, kind: SocketKind) -> bool:
    return isinstance(address, InetAddress)


def _maybe_tcp(address: SocketAddress, kind: SocketKind) -> bool:
    # An inherited fd may be TCP: binding checks it once the fd is adopted.
    return isinstance(address, InetAddress | FdAddress) and kind is SocketKind.STREAM


def _binds_listener(address: SocketAddress, kind: SocketKind) -> bool:
    return not isinstance(address, FdAddress) and kind in (SocketKind.STREAM, SocketKind.SEQPACKET)


_UNIX_PATH_ONLY: Final = "applies to unix sockets with a path and to FIFOs only"
_SOCKET_RULES: Final = (
    _SocketRules("mode", _is_unix_path, _UNIX_PATH_ONLY),
    _SocketRules("user", _is_unix_path, _UNIX_PATH_ONLY),
    _SocketRules("group", _is_unix_path, _UNIX_PATH_ONLY),
    _SocketRules("directory-mode", _is_unix_path, _UNIX_PATH_ONLY),
    _SocketRules("reuse-port", _is_inet, "applies to inet sockets only"),
    _SocketRules("free-bind", _is_inet, "applies to inet sockets only"),
    _SocketRules("keep-alive", _maybe_tcp, "applies to inet stream (TCP) sockets only"),
    _SocketRules("no-delay", _maybe_tcp, "applies to inet stream (TCP) sockets only"),
    _SocketRules(
        "max-connections-per-source",
        lambda address, kind: kind in (SocketKind.STREAM, SocketKind.SEQPACKET),
        "applies to stream and seqpacket sockets (accept mode) only",
    ),
    _SocketRules(
        "backlog",
        _binds_listener,
        "applies to stream and seqpacket sockets that fdsupervisor binds, "
        "not to datagram sockets, FIFOs or inherited fds (already listening)",
    ),
    _SocketRules("receive-buffer", _is_socket, "applies to sockets, not to FIFOs"),
    _SocketRules("send-buffer", _is_socket, "applies to sockets, not to FIFOs"),
)


def _kind_problem(address: SocketAddress, kind: SocketKind) -> str | None:
    if isinstance(address, InetAddress) and kind is SocketKind.SEQPACKET:
        return (
            "seqpacket needs a unix or vsock address (inet has no seqpacket sockets without SCTP)"
        )
    if isinstance(address, VsockAddress) and kind is SocketKind.DATAGRAM:
        return "vsock sockets are stream or seqpacket"
    if kind is SocketKind.FIFO and not isinstance(address, FifoAddress):
        return "kind: fifo needs listen: {type: fifo, path: PATH}"
    if isinstance(address, FifoAddress) and kind is not SocketKind.FIFO:
        return f"a FIFO (listen: {{type: fifo}}) is kind: fifo, not {kind.value}"
    return None


class _UnitParser(_UnitReader):
    """The unit schema (SPEC section 3) on top of :class:`_UnitReader`."""

    def __init__(self, source: Path, base_dir: Path) -> None:
        super().__init__(source, base_dir)
        # max-connections-per-source values, which need the service's accept: true
        self.per_source_nodes: list[tuple[Node, KeyPath]] = []

    def unit(self, text: str) -> Unit | None:
        root = self.compose(text)
        if root is None:
            if not self.errors:
                self.errors.append(
                    ConfigError(
                        Location(str(self.source), 1, 1),
                        (),
                        "the unit file is empty; a unit needs at least 'service' with 'exec'",
                    )
                )
            return None
        top = self._attempt(functools.partial(self.mapping, allowed=_TOP_KEYS), root, (), None)
        if top is None:
            return None
        name = self._field(top, "name", (), functools.partial(self.name, what="unit"), None)
        if name is None and "name" not in top:
            name = self._name_from_file()
        sockets, names = self._sockets(top)
        service = self._service_field(top, root, names, sockets)
        if service is not None and not service.accept:
            for node, path in self.per_source_nodes:
                message = "max-connections-per-source applies only with the service's accept: true"
                self.errors.append(self.error(node, path, message))
        if self.errors or name is None or sockets is None or service is None:
            return None
        return Unit(name, self.source, self.base_dir, tuple(sockets), service)

    def _name_from_file(self) -> str | None:
        stem = self.source.stem
        try:
            check_name(stem, "unit")
        except ValueProblem as problem:
            self.errors.append(
                ConfigError(
                    Location(str(self.source)),
                    ("name",),
                    f"the file name gives no valid unit name: {problem.message}; "
                    "rename the file or set 'name:'",
                )
            )
            return None
        return stem

    # ---- sockets

    def _sockets(self, top: Mapping[str, _Entry]) -> tuple[list[SocketSpec] | None, list[str]]:
        """The valid sockets (None if any is invalid) and every declared socket name."""
        entry = top.get("sockets")
        if entry is None:
            return [], []
        path: KeyPath = ("sockets",)
        before = len(self.errors)
        no_entries: dict[str, _Entry] = {}
        entries = self._attempt(
            functools.partial(self.mapping, allowed=None), entry.value, path, no_entries
        )
        specs = []
        for name, socket_entry in entries.items():
            socket_path = (*path, name)
            self._attempt(
                functools.partial(self.name, what="socket"), socket_entry.key, socket_path, ""
            )
            spec = self._attempt(
                functools.partial(self._socket, name), socket_entry.value, socket_path, None
            )
            if spec is not None:
                specs.append(spec)
        return (specs if len(self.errors) == before else None), list(entries)

    def _socket(self, name: str, node: Node, path: KeyPath) -> SocketSpec | None:
        entries = self.mapping(node, path, _SOCKET_KEYS)
        before = len(self.errors)
        listen = self._required(entries, "listen", node, path)
        address = self._attempt(self.address, listen, (*path, "listen"), None)
        # A FIFO address is kind: fifo unless the unit says otherwise (then an error below).
        default_kind = "fifo" if isinstance(address, FifoAddress) else "stream"
        spec = SocketSpec(
            name=name,
            address=address or FdAddress("0"),  # a stand-in, never returned
            kind=SocketKind(self._field(entries, "kind", path, self._socket_kind, default_kind)),
            backlog=self._field(entries, "backlog", path, self._backlog, 128),
            reuse_port=self._field(entries, "reuse-port", path, self.boolean, False),
            mode=self._field(entries, "mode", path, self.octal_mode, None),
            user=self._field(entries, "user", path, self.nonempty_string, None),
            group=self._field(entries, "group", path, self.nonempty_string, None),
            directory_mode=self._field(entries, "directory-mode", path, self.octal_mode, 0o755),
            keep_alive=self._field(entries, "keep-alive", path, self.boolean, False),
            no_delay=self._field(entries, "no-delay", path, self.boolean, False),
            free_bind=self._field(entries, "free-bind", path, self.boolean, False),
            receive_buffer=self._field(entries, "receive-buffer", path, self.size, None),
            send_buffer=self._field(entries, "send-buffer", path, self.size, None),
            max_connections_per_source=self._field(
                entries, "max-connections-per-source", path, self._per_source, None
            ),
            trigger_limit=self._field(entries, "trigger-limit", path, self._trigger_limit, None),
            location=self.location(listen),
        )
        if address is None or len(self.errors) > before:
            return None
        self._check_socket_keys(entries, path, spec)
        return spec if len(self.errors) == before else None

    def _per_source(self, node: Node, path: KeyPath) -> int:
        self.per_source_nodes.append((node, path))  # checked against accept: later
        return self.integer(node, path, 1, _INT_MAX)

    def _trigger_limit(self, node: Node, path: KeyPath) -> TriggerLimit:
        entries = self.mapping(node, path, _TRIGGER_LIMIT_KEYS)
        interval_node = self._required(entries, "interval", node, path)
        burst_node = self._required(entries, "burst", node, path)
        interval = self._attempt(self.duration, interval_node, (*path, "interval"), -1.0)
        burst = self._attempt(self._at_least_one, burst_node, (*path, "burst"), 1)
        if interval == 0:
            message = "must be a positive duration such as 2s"
            raise self.error(interval_node, (*path, "interval"), message)
        return TriggerLimit(interval, burst)

    def _socket_kind(self, node: Node, path: KeyPath) -> str:
        return self.choice(node, path, SocketKind)

    def _backlog(self, node: Node, path: KeyPath) -> int:
        return self.integer(node, path, 1, _PORT_MAX)

    def _check_socket_keys(
        self, entries: Mapping[str, _Entry], path: KeyPath, spec: SocketSpec
    ) -> None:
        for rule in _SOCKET_RULES:
            entry = entries.get(rule.key)
            if entry is not None and not rule.applies(spec.address, spec.kind):
                self.errors.append(
                    self.error(entry.key, (*path, rule.key), f"'{rule.key}' {rule.message}")
                )
        problem = _kind_problem(spec.address, spec.kind)
        if problem is not None:
            node = entries["kind"].value
            self.errors.append(self.error(node, (*path, "kind"), problem))

    def address(self, node: Node, path: KeyPath) -> SocketAddress:
        if isinstance(node, ScalarNode) and node.tag != _NULL:
            value: object = str(node.value)  # the text as written: "8:80" is not 520
        elif isinstance(node, MappingNode):
            value = {
                key: _plain_value(e.value) for key, e in self.mapping(node, path, None).items()
            }
        else:
            raise self.error(
                node, path, f"expected an address string or mapping, got {_node_text(node)}"
            )
        try:
            return self._resolve(parse_address(value, Context.STARTUP))
        except ValueProblem as problem:
            raise self.error(
                _descend(node, problem.path), (*path, *problem.path), problem.message
            ) from None

    def _resolve(self, address: SocketAddress) -> SocketAddress:
        if not isinstance(address, UnixAddress) or address.abstract or os.path.isabs(address.path):
            return address
        resolved = os.path.join(self.base_dir, address.path)
        try:
            check_unix_path(resolved, abstract=False)
        except ValueProblem as problem:
            raise ValueProblem(
                f"{problem.message} (resolved against {self.base_dir})", problem.path
            ) from None
        return replace(address, path=resolved)

    # ---- service

    def _service_field(
        self,
        top: Mapping[str, _Entry],
        root: Node,
        names: list[str],
        sockets: list[SocketSpec] | None,
    ) -> ServiceSpec | None:
        try:
            node = self._required(top, "service", root, ())
        except ConfigError as error:
            self.errors.append(error)
            return None
        convert = functools.partial(self._service, names=names, sockets=sockets)
        return self._attempt(convert, node, ("service",), None)

    def _service(
        self, node: Node, path: KeyPath, names: list[str], sockets: list[SocketSpec] | None
    ) -> ServiceSpec | None:
        entries = self.mapping(node, path, _SERVICE_KEYS)
        before = len(self.errors)
        accept = self._field(entries, "accept", path, self.boolean, False)
        placeholders = functools.partial(self._check_placeholders, names=names, accept=accept)
        no_argv: tuple[str, ...] = ()
        argv = self._field(
            entries, "exec", path, functools.partial(self._exec, check=placeholders), no_argv
        )
        if "exec" not in entries:
            self.errors.append(self.error(node, path, "missing required key 'exec'"))
        start_limit = self._field(entries, "start-limit", path, self._start_limit, (5, 10.0))
        restart_delay = self._field(entries, "restart-delay", path, self.duration, 0.1)
        spec = ServiceSpec(
            exec=argv,
            environment=self._field(
                entries,
                "environment",
                path,
                functools.partial(self._environment, check=placeholders),
                (),
            ),
            clear_environment=self._field(entries, "clear-environment", path, self.boolean, False),
            working_directory=self._field(
                entries, "working-directory", path, self.path_string, None
            ),
            user=self._field(entries, "user", path, self.nonempty_string, None),
            group=self._field(entries, "group", path, self.nonempty_string, None),
            activation=Activation(
                self._field(entries, "activation", path, self._activation, "eager")
            ),
            accept=accept,
            inetd=self._field(entries, "inetd", path, self.boolean, False),
            max_connections=self._field(entries, "max-connections", path, self._at_least_one, 64),
            instances=self._field(entries, "instances", path, self._at_least_one, 1),
            restart=self._field(entries, "restart", path, self._restart, RestartPolicy.ON_FAILURE),
            restart_delay=restart_delay,
            restart_delay_max=self._field(
                entries,
                "restart-delay-max",
                path,
                self.duration,
                max(_DEFAULT_RESTART_DELAY_MAX, restart_delay),
            ),
            start_limit_burst=start_limit[0],
            start_limit_interval=start_limit[1],
            stop_signal=self._field(entries, "stop-signal", path, self.stop_signal, signal.SIGTERM),
            stop_timeout=self._field(entries, "stop-timeout", path, self._long_duration, 10.0),
            notify=self._field(entries, "notify", path, self.boolean, False),
            start_timeout=self._field(entries, "start-timeout", path, self._long_duration, 90.0),
            overlap=self._field(entries, "overlap", path, self.boolean, True),
            watchdog=self._field(entries, "watchdog", path, self.duration, 0.0),
            fd_store_max=self._field(entries, "fd-store-max", path, self.integer, 0),
            fd_store_preserve=self._field(
                entries,
                "fd-store-preserve",
                path,
                self._fd_store_preserve,
                FdStorePreserve.RESTART,
            ),
            stdout=self._field(entries, "stdout", path, self._output, "inherit"),
            stderr=self._field(entries, "stderr", path, self._output, "inherit"),
            limits=self._field(entries, "limits", path, self._limits, ()),
            umask=self._field(entries, "umask", path, self._umask, None),
            no_new_privileges=self._field(entries, "no-new-privileges", path, self.boolean, False),
            supplementary_groups=self._field(
                entries, "supplementary-groups", path, self._groups, None
            ),
            account_locations=self._account_locations(entries),
        )
        if len(self.errors) > before:
            return None
        self._check_service(entries, path, spec, sockets)
        return spec if len(self.errors) == before else None

    def _activation(self, node: Node, path: KeyPath) -> str:
        return self.choice(node, path, Activation)

    def _fd_store_preserve(self, node: Node, path: KeyPath) -> FdStorePreserve:
        # systemd's exec_preserve_mode_from_string(): a boolean is no / yes.
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            return FdStorePreserve.YES if self.boolean(node, path) else FdStorePreserve.NO
        return FdStorePreserve(self.choice(node, path, FdStorePreserve))

    def _limits(self, node: Node, path: KeyPath) -> tuple[ResourceLimit, ...]:
        limits = []
        for name, entry in self.mapping(node, path, tuple(LIMIT_UNITS)).items():
            limit = self._attempt(
                functools.partial(self._limit, name), entry.value, (*path, name), None
            )
            if limit is not None:
                limits.append(limit)
        return tuple(limits)

    def _limit(self, name: str, node: Node, path: KeyPath) -> ResourceLimit:
        """``SOFT`` or ``SOFT:HARD`` as systemd's ``LimitNAME=``; one value sets both."""
        scalar = self.scalar(node, path, "a limit such as 1024 or 1024:4096 or infinity")
        # The text as written: YAML 1.1 would read an unquoted 10:20 as 620.
        text = str(scalar.value).strip()
        soft_text, sep, hard_text = text.partition(":")
        soft = self._limit_value(name, soft_text.strip(), node, path)
        hard = self._limit_value(name, hard_text.strip(), node, path) if sep else soft
        if hard != RLIM_INFINITY and (soft == RLIM_INFINITY or soft > hard):
            raise self.error(
                node, path, f"the soft limit must not be above the hard limit, got {text!r}"
            )
        return ResourceLimit(name, soft, hard, self.location(node))

    def _limit_value(self, name: str, text: str, node: Node, path: KeyPath) -> int:
        unit = LIMIT_UNITS[name]
        if text == "infinity":
            return RLIM_INFINITY
        if unit == "nice":
            signed = _NICE_RE.fullmatch(text)
            if signed is not None:  # a nice level: rlimit 20 - level (rlimit_parse_nice())
                level = int(signed.group(2)) * (-1 if signed.group(1) == "-" else 1)
                if -20 <= level <= 19:
                    return 20 - level
            elif text.isascii() and text.isdecimal() and int(text) <= 40:
                return int(text)
            raise self.error(
                node,
                path,
                "expected a nice level from -20 to +19 (with its sign), a raw limit "
                f"from 0 to 40, or infinity, got {describe(text)}",
            )
        match = _LIMIT_RE.fullmatch(text)
        if match is None or (match.group(2) and unit != "bytes"):
            what = "bytes (optionally with K, M, G, T, P or E)" if unit == "bytes" else unit
            raise self.error(
                node,
                path,
                f"expected a number of {what}, SOFT:HARD or infinity, got {describe(text)}",
            )
        value = int(match.group(1)) * _LIMIT_FACTORS[match.group(2)]
        if value > _RLIM_MAX:
            raise self.error(node, path, f"the limit {text} is too large; for none write infinity")
        return value

    def _umask(self, node: Node, path: KeyPath) -> int:
        mask = self.octal_mode(node, path)
        if mask > 0o777:
            raise self.error(node, path, f"a umask is from 0000 to 0777, got {oct(mask)[2:]}")
        return mask

    def _groups(self, node: Node, path: KeyPath) -> tuple[str, ...]:
        if not isinstance(node, SequenceNode):
            raise self.error(node, path, f"expected a list of group names, got {_node_text(node)}")
        if len(node.value) > _GROUPS_MAX:
            raise self.error(node, path, f"at most {_GROUPS_MAX} groups")
        return tuple(
            self.nonempty_string(item, (*path, str(index))) for index, item in enumerate(node.value)
        )

    def _account_locations(self, entries: Mapping[str, _Entry]) -> tuple[tuple[str, Location], ...]:
        found = [
            (key, self.location(entries[key].value)) for key in ("user", "group") if key in entries
        ]
        groups = entries.get("supplementary-groups")
        if groups is not None and isinstance(groups.value, SequenceNode):
            found += [
                (f"supplementary-groups.{index}", self.location(item))
                for index, item in enumerate(groups.value.value)
            ]
        return tuple(found)

    def _output(self, node: Node, path: KeyPath) -> str:
        """systemd's StandardOutput= in small; a relative file is the unit directory's."""
        if isinstance(node, ScalarNode) and node.tag == _NULL and node.value == "null":
            return "null"  # `stderr: null` unquoted: YAML's null, the operator's /dev/null
        text = self.nonempty_string(node, path)
        if text in OUTPUT_TARGETS:
            return text
        kind, sep, file = text.partition(":")
        if sep and kind in ("file", "append") and file:
            return f"{kind}:{os.path.join(self.base_dir, file)}"
        raise self.error(
            node, path, f"expected inherit, null, journal, file:PATH or append:PATH, got {text!r}"
        )

    def _at_least_one(self, node: Node, path: KeyPath) -> int:
        return self.integer(node, path, 1)

    def _long_duration(self, node: Node, path: KeyPath) -> float:
        return self.duration(node, path, allow_infinity=True)

    def _restart(self, node: Node, path: KeyPath) -> RestartPolicy:
        # SPEC: "YAML 1.1 reads an unquoted `no` as false: `restart: no` must still mean no".
        if isinstance(node, ScalarNode) and node.tag == _BOOL:
            if str(node.value).lower() in ("no", "false", "off"):
                return RestartPolicy.NO
            raise self.error(
                node, path, f"expected one of no, on-failure, always, got {_node_text(node)}"
            )
        return RestartPolicy(self.choice(node, path, RestartPolicy))

    def _start_limit(self, node: Node, path: KeyPath) -> tuple[int, float]:
        entries = self.mapping(node, path, _START_LIMIT_KEYS)
        burst = self._field(entries, "burst", path, self._at_least_one, 5)
        interval = self._field(entries, "interval", path, self.duration, 10.0)
        return burst, interval

    def _check_placeholders(
        self, text: str, node: Node, path: KeyPath, names: list[str], accept: bool
    ) -> None:
        try:
            check_placeholders(text, names, accept)
        except ValueProblem as problem:
            raise self.error(node, path, problem.message) from None

    def _exec(
        self, node: Node, path: KeyPath, check: Callable[[str, Node, KeyPath], None]
    ) -> tuple[str, ...]:
        if isinstance(node, SequenceNode):
            items = [
                (self.string(item, (*path, str(i))), item, (*path, str(i)))
                for i, item in enumerate(node.value)
            ]
        else:
            items = [(arg, node, path) for arg in self._split_command(node, path)]
        if not items:
            raise self.error(node, path, "must not be empty: give the program and its arguments")
        if not items[0][0]:
            raise self.error(items[0][1], items[0][2], "the program name must not be empty")
        for arg, item_node, item_path in items:
            check(arg, item_node, item_path)
        return tuple(arg for arg, _, _ in items)

    def _split_command(self, node: Node, path: KeyPath) -> list[str]:
        # A single string is split as a POSIX shell would, without expanding anything.
        text = self.string(node, path)
        try:
            return shlex.split(text)
        except ValueError as error:
            raise self.error(node, path, f"cannot split the command line: {error}") from None

    def _environment(
        self, node: Node, path: KeyPath, check: Callable[[str, Node, KeyPath], None]
    ) -> tuple[tuple[str, str], ...]:
        pairs = []
        for name, entry in self.mapping(node, path, None).items():
            if not name or "=" in name or "\0" in name:
                raise self.error(
                    entry.key, (*path, name), f"invalid environment variable name {describe(name)}"
                )
            value = self.string(entry.value, (*path, name))
            check(value, entry.value, (*path, name))
            pairs.append((name, value))
        return tuple(pairs)

    def _check_service(
        self,
        entries: Mapping[str, _Entry],
        path: KeyPath,
        spec: ServiceSpec,
        sockets: list[SocketSpec] | None,
    ) -> None:
        def fail(key: str, message: str) -> None:
            self.errors.append(self.error(entries[key].value, (*path, key), message))

        if spec.inetd and not spec.accept:
            fail("inetd", "inetd: true needs accept: true")
        if spec.inetd and "stdout" in entries:
            fail("stdout", "with inetd: true, stdout is the connection")
        if "max-connections" in entries and not spec.accept:
            fail("max-connections", "max-connections applies only with accept: true")
        if spec.accept and spec.instances > 1:
            fail(
                "instances",
                "instances must be 1 with accept: true; limit connections with max-connections",
            )
        if spec.restart_delay_max < spec.restart_delay:
            fail("restart-delay-max", "restart-delay-max must not be shorter than restart-delay")
        if sockets is not None:
            for key, message in _socket_problems(spec, sockets):
                fail(key, message)


def _socket_problems(spec: ServiceSpec, sockets: Sequence[SocketSpec]) -> list[tuple[str, str]]:
    """Service settings that the unit's sockets cannot serve, as (service key, message)."""
    problems = []
    if spec.accept and not sockets:
        problems.append(("accept", "accept: true needs at least one socket"))
    elif spec.accept:
        datagram = [s.name for s in sockets if s.kind is SocketKind.DATAGRAM]
        if datagram:
            problems.append(
                (
                    "accept",
                    "accept: true works with stream and seqpacket sockets only; "
                    f"datagram: {', '.join(datagram)}",
                )
            )
    fifos = [s.name for s in sockets if s.kind is SocketKind.FIFO]
    if spec.accept and fifos:
        # A FIFO has no connections to accept (systemd: Accept=yes is for stream sockets).
        problems.append(("accept", f"accept: true cannot serve a FIFO: {', '.join(fifos)}"))
    if spec.activation is Activation.ON_DEMAND and not sockets:
        problems.append(("activation", "activation: on-demand needs at least one socket to watch"))
    return problems


# --------------------------------------------------------------------------- loading


def load_unit_text(text: str, source: Path, base_dir: Path) -> Unit:
    """Parse and validate one unit; raises :class:`ConfigErrors` with every error found."""
    parser = _UnitParser(source, base_dir)
    unit = parser.unit(text)
    if parser.errors or unit is None:
        # In line order, as a compiler lists them (the parser finds them key by key).
        raise ConfigErrors(
            sorted(parser.errors, key=lambda e: (e.location.line, e.location.column))
        )
    return replace(unit, text=text)


# The largest unit file read: 1 MiB, as large as one monitor message. Real
# units are a few hundred bytes; a 1 MiB file still parses in seconds, where
# 100 MB took over a minute and 1.5 GB.
MAX_UNIT_FILE_SIZE: Final = 1 << 20

_FILE_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def read_unit_file(path: Path) -> bytes:
    """A unit file's bytes: a regular file of at most MAX_UNIT_FILE_SIZE, read without blocking.

    Opened ``O_NONBLOCK`` so that a FIFO does not wait for a writer, then
    checked on the open fd (no race with a swap of the path), then read
    with a bound whatever ``st_size`` said (a file may grow meanwhile).
    """

    def refused(message: str) -> ConfigErrors:
        return ConfigErrors([ConfigError(Location(str(path)), (), message)])

    limit = f"a unit file may be at most 1 MiB ({MAX_UNIT_FILE_SIZE} bytes)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as error:
        raise refused(f"cannot read: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a file")
            through = " (through a symbolic link)" if path.is_symlink() else ""
            raise refused(
                f"is {kind}{through}, not a regular file: only regular files are read as units"
            )
        if info.st_size > MAX_UNIT_FILE_SIZE:
            raise refused(f"too large ({info.st_size} bytes): {limit}")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_UNIT_FILE_SIZE:
            chunk = os.read(fd, MAX_UNIT_FILE_SIZE + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_UNIT_FILE_SIZE:
            raise refused(f"too large (more than {MAX_UNIT_FILE_SIZE} bytes): {limit}")
        return b"".join(chunks)
    except OSError as error:
        raise refused(f"cannot read: {error.strerror}") from None
    finally:
        os.close(fd)


def load_unit_file(path: Path, known: Unit | None = None, base_dir: Path | None = None) -> Unit:
    """Read and validate one unit file; relative paths in it resolve against its directory.

    ``known``: this file's unit as loaded before; if the text is the same, it
    is that unit (parsing is a function of the text and the path alone).
    ``base_dir``: the file's directory, if the caller has it already (one
    Path shared by the directory's units, not one each).
    """
    data = read_unit_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        message = f"not valid UTF-8 (byte {error.start}: {error.reason})"
        raise ConfigErrors([ConfigError(Location(str(path), line, 1), (), message)]) from None
    if known is not None and known.source == path and known.text == text:
        return known
    return load_unit_text(text, path, path.parent if base_dir is None else base_dir)


UNIT_SUFFIXES: Final = (".yaml", ".yml")


def _unit_files(paths: Sequence[Path], errors: list[ConfigError]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = _directory_units(path, errors)
            files.extend(found)
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            errors.append(ConfigError(Location(str(path)), (), "no such file or directory"))
    seen: set[Path] = set()
    unique = []
    for file in files:  # a file named twice (itself and through its directory) loads once
        if file.absolute() not in seen:
            seen.add(file.absolute())
            unique.append(file)
    return unique


def _directory_units(directory: Path, errors: list[ConfigError]) -> list[Path]:
    try:
        # Hidden files are skipped: editors leave lock files such as .#web.yaml there.
        found = sorted(
            p
            for p in directory.iterdir()
            if p.suffix in UNIT_SUFFIXES and not p.name.startswith(".") and not p.is_dir()
        )
    except OSError as error:
        errors.append(ConfigError(Location(str(directory)), (), f"cannot list: {error.strerror}"))
        return []
    if not found:
        errors.append(
            ConfigError(
                Location(str(directory)), (), "no unit files (*.yaml, *.yml) in this directory"
            )
        )
    return found


def load_units(paths: Sequence[Path], known: Iterable[Unit] = ()) -> list[Unit]:
    """Load unit files and directories (their ``*.yaml``/``*.yml``, sorted, not recursive).

    Everything is validated before anything is returned: one bad unit,
    two units of the same name or two sockets on one address raise
    :class:`ConfigErrors` with every error found. ``known`` are the units a
    reload runs now: a file whose text did not change gives its unit back
    without being parsed again, most of the time a reload of 10,000 units
    took (docs/performance.md); the checks across units are made all the same.
    """
    errors: list[ConfigError] = []
    units: list[Unit] = []
    by_name: dict[str, Unit] = {}
    by_source = {unit.source: unit for unit in known}
    directories: dict[Path, Path] = {}  # one base_dir per directory: 10,000 units, one Path
    for file in _unit_files(paths, errors):
        base_dir = directories.setdefault(file.parent, file.parent)
        try:
            unit = load_unit_file(file, by_source.get(file), base_dir)
        except ConfigErrors as failed:
            errors.extend(failed.errors)
            continue
        if unit.name in by_name:
            message = f"unit name '{unit.name}' is already used by {by_name[unit.name].source}"
            errors.append(ConfigError(Location(str(file)), ("name",), message))
            continue
        by_name[unit.name] = unit
        units.append(unit)
    for unit, spec, message in _conflicts(units):
        location = spec.location or Location(str(unit.source))
        errors.append(ConfigError(location, ("sockets", spec.name, "listen"), message))
    if errors:
        raise ConfigErrors(errors)
    return units


# --------------------------------------------------------------------------- conflicts


def _conflicts(units: Iterable[Unit]) -> list[tuple[Unit, SocketSpec, str]]:
    """Every socket whose address an earlier socket already has, with a message."""
    found = []
    owners: dict[AddressKey, tuple[Unit, SocketSpec]] = {}
    for unit in units:
        for spec in unit.sockets:
            key = address_key(spec, unit.base_dir)
            if key is None:
                continue
            if key in owners:
                found.append((unit, spec, _conflict_message(spec, *owners[key])))
            else:
                owners[key] = (unit, spec)
    return found


def _conflict_message(spec: SocketSpec, other_unit: Unit, other: SocketSpec) -> str:
    owner = f"socket '{other.name}' of unit '{other_unit.name}'"
    if isinstance(spec.address, FdAddress):
        return (
            f"fd {spec.address.value} is already used by {owner}: an inherited fd backs one socket"
        )
    return f"{format_address(spec.address)} is already used by {owner}"


# --------------------------------------------------------------------------- command line

COMMAND_LINE_SOURCE: Final = Path("<command line>")


def unit_from_command_line(
    listens: Sequence[tuple[str, str]],
    command: Sequence[str],
    accept: bool,
    on_demand: bool,
    inetd: bool,
) -> Unit:
    """The one-off unit of ``fdsupervisor run --listen NAME=ADDRESS ... -- COMMAND``.

    Like ``systemd-socket-activate``: stream sockets, relative unix paths
    against the current directory. The unit is named after the command's
    file name (``command`` if that is no valid name). Raises
    :class:`ConfigErrors` with every error found.
    """
    errors: list[ConfigError] = []
    sockets = _command_line_sockets(listens, errors)
    names = list(dict.fromkeys(name for name, _ in listens))
    argv = _command_line_exec(command, names, accept, errors)
    service = ServiceSpec(
        exec=argv,
        activation=Activation.ON_DEMAND if on_demand else Activation.EAGER,
        accept=accept,
        inetd=inetd,
    )
    if inetd and not accept:
        errors.append(ConfigError(Location("--inetd"), (), "--inetd needs --accept"))
    if not errors:
        for key, message in _socket_problems(service, sockets):
            errors.append(ConfigError(Location("--listen"), (), _flag_message(key, message)))
    unit = Unit(_command_name(command), COMMAND_LINE_SOURCE, Path.cwd(), tuple(sockets), service)
    for _, spec, message in _conflicts([unit]):
        errors.append(ConfigError(Location("--listen"), (spec.name,), message))
    if errors:
        raise ConfigErrors(errors)
    return unit


def _flag_message(key: str, message: str) -> str:
    # The unit-file wording, with the flags that stand for those keys.
    flags = {"accept: true": "--accept", "activation: on-demand": "--on-demand"}
    for words, flag in flags.items():
        message = message.replace(words, flag)
    return message


def _command_line_sockets(
    listens: Sequence[tuple[str, str]], errors: list[ConfigError]
) -> list[SocketSpec]:
    sockets = []
    seen: set[str] = set()
    location = Location("--listen")
    for name, text in listens:
        try:
            check_name(name, "socket")
            if name in seen:
                raise ValueProblem(f"socket name '{name}' is given twice")
            seen.add(name)
            address = parse_address(text, Context.STARTUP)
            if isinstance(address, UnixAddress) and not address.abstract:
                address = replace(address, path=os.path.abspath(address.path))
                check_unix_path(address.path, abstract=False)
        except ValueProblem as problem:
            errors.append(ConfigError(location, (name, *problem.path), problem.message))
            continue
        sockets.append(SocketSpec(name=name, address=address, location=location))
    return sockets


def _command_line_exec(
    command: Sequence[str], names: Sequence[str], accept: bool, errors: list[ConfigError]
) -> tuple[str, ...]:
    location = Location("command line")
    if not command or not command[0]:
        errors.append(ConfigError(location, (), "no command given: put it after --"))
        return ()
    for arg in command:
        try:
            if "\0" in arg:
                raise ValueProblem("an argument must not contain a NUL character")
            check_placeholders(arg, names, accept)
        except ValueProblem as problem:
            errors.append(ConfigError(location, (), problem.message))
    return tuple(command)


def _command_name(command: Sequence[str]) -> str:
    name = os.path.basename(command[0]) if command else ""
    try:
        check_name(name, "unit")
    except ValueProblem:
        return "command"
    return name
