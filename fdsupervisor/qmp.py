"""The QMP protocol core: bytes in, events out; it never touches a socket.

Built like h11: :meth:`QmpConnection.receive_data` takes whatever bytes the
monitor read from a client (``b""`` meaning end of file) and returns the
events they complete. The core frames the byte stream into JSON messages the
way QEMU's ``qobject/json-streamer.c`` does, checks each message's shape as
``qapi/qmp-dispatch.c`` does, runs capabilities negotiation itself, and hands
every well-formed command to the server as an :class:`Execute` event. Replies
the core makes on its own (negotiation, bad JSON, bad shape) come out as
:class:`Send` events, in order with the :class:`Execute` events. The server
(``monitor.py``) reads, writes, passes fds and dispatches; it answers an
:class:`Execute` with :func:`reply` or :func:`error_reply` and validates
arguments with :func:`check_arguments`, which speaks QEMU's QAPI input
visitor's error texts.

Every error text here is QEMU's (from its 7.x sources) unless a docstring or
comment says otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias

from fdsupervisor.errors import CommandError

__all__ = [
    "QMP_MAX_MESSAGE_SIZE",
    "QMP_MAX_NESTING",
    "Arg",
    "Closed",
    "Event",
    "Execute",
    "QmpConnection",
    "Send",
    "check_arguments",
    "command_not_found",
    "error_line",
    "error_reply",
    "event",
    "reply",
]

# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

#: The largest message :meth:`QmpConnection.receive_data` accepts, counted
#: from the first byte of a JSON value to its last. SPEC section 5 fixes it
#: at 1 MiB. Precedents: QEMU's json-streamer.c stops a message at
#: ``MAX_TOKEN_SIZE`` (64 MiB of token text) or ``MAX_TOKEN_COUNT`` (2 Mi
#: tokens), sized for a hypervisor's block-graph commands; the qemu.qmp
#: client reads lines of at most 10 MiB ("like libvirt default"). Our largest
#: legitimate command (``socket-add`` with a unix path) is well under 1 KiB,
#: so 1 MiB leaves three orders of magnitude of headroom while bounding what
#: one client can make the supervisor buffer.
QMP_MAX_MESSAGE_SIZE: Final = 1 << 20

#: The deepest nesting of arrays and objects in one message. QEMU's
#: json-streamer.c allows ``MAX_NESTING`` = 1024 (it counts ``{`` and ``[``
#: together, as we do). We take 256: CPython's json decoder recurses in C
#: and counts against ``sys.getrecursionlimit()`` (1000 by default, less the
#: frames already on the stack), so 1024 levels could not be decoded at all.
#: No QMP command nests deeper than a handful of levels.
QMP_MAX_NESTING: Final = 256

# ---------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Execute:
    """A well-formed command for the server to dispatch.

    Only commands the core does not answer itself become events:
    ``qmp_capabilities`` never does, and nothing does before negotiation
    succeeded. ``arguments`` is ``{}`` when the request had none. ``id`` is
    the request's ``id`` member, any JSON value (``None`` for JSON ``null``);
    ``has_id`` tells a ``null`` id from no id at all, as a reply must echo the
    first and must not invent the second.
    """

    command: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = None
    has_id: bool = False


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes the core wants sent to the client: one reply line, ``\\r\\n``-ended."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Closed:
    """The client sent end of file; nothing more will come out of this connection."""


Event: TypeAlias = Execute | Send | Closed

# ---------------------------------------------------------------------------
# Reply builders
# ---------------------------------------------------------------------------

# QEMU's qobject_to_json() writes ", " and ": " and escapes everything outside
# printable ASCII as \uXXXX, as the json module does by default. NaN and
# infinities have no JSON spelling, so they are refused rather than written.
_ENCODER: Final = json.JSONEncoder(allow_nan=False)


def _make_encode() -> Callable[[Any], str]:
    """``_ENCODER.encode``, without what it redoes on every call.

    ``JSONEncoder.encode()`` builds a new C encoder (``c_make_encoder``) for
    each message; a reply or an event costs that much again as encoding it.
    This builds it once, with the same separators, escaping, ``default`` and
    NaN refusal, so the bytes are the same. It keeps no ``markers`` (the
    circular-reference check): a reply is built afresh from plain data and
    cannot contain itself, and a marker left behind by a failed encoding could
    make a later one fail. Without the C module, the plain ``encode``.
    """
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _ENCODER.encode
    encoder = make(
        None,  # markers
        _ENCODER.default,
        json.encoder.encode_basestring_ascii,
        None,  # indent
        _ENCODER.key_separator,
        _ENCODER.item_separator,
        False,  # sort_keys
        False,  # skipkeys
        False,  # allow_nan
    )
    join = "".join

    def encode(value: Any) -> str:
        return join(encoder(value, 0))

    return encode


_encode: Final = _make_encode()

_NEGOTIATION_REQUIRED: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"
_ALREADY_NEGOTIATED: Final = "Capabilities negotiation is already complete, command ignored"


def _line(message: dict[str, Any]) -> bytes:
    # QEMU's monitor writes "\r\n" after every JSON value (monitor_puts()
    # turns the "\n" that qmp_send_response() appends into "\r\n").
    return _encode(message).encode("ascii") + b"\r\n"


# The reply of every command that returns nothing (getfd, closefd, ...) to a
# request without an id: made once.
_EMPTY_RETURN: Final = b'{"return": {}}\r\n'


def _response(body_key: str, body: Any, id_: Any, has_id: bool) -> bytes:
    if has_id:
        return _line({body_key: body, "id": id_})
    if body_key == "return" and type(body) is dict and not body:
        return _EMPTY_RETURN
    return _line({body_key: body})


def _error_line(desc: str, error_class: str, id_: Any = None, has_id: bool = False) -> bytes:
    return _response("error", {"class": error_class, "desc": desc}, id_, has_id)


def reply(execute: Execute, result: Any) -> bytes:
    """The success reply to ``execute``: ``{"return": result, "id": ...}`` and ``\\r\\n``.

    The ``id`` member is there exactly when the request had one. A command
    with nothing to return answers ``{}``, as QEMU's qmp_dispatch() does when
    a command's schema has no ``returns``; pass ``{}`` for that.
    """
    return _response("return", result, execute.id, execute.has_id)


def error_reply(execute: Execute, err: CommandError) -> bytes:
    """The error reply to ``execute``: ``{"error": {"class", "desc"}, "id": ...}`` and ``\\r\\n``."""
    return _response(
        "error", {"class": err.error_class, "desc": err.desc}, execute.id, execute.has_id
    )


def error_line(err: CommandError) -> bytes:
    """An error that answers no request (so no ``id``): to a client refused as it connects."""
    return _error_line(err.desc, err.error_class)


def event(name: str, data: Mapping[str, Any], seconds: int, microseconds: int) -> bytes:
    """An asynchronous event line, as QEMU's qmp_event_build_dict() makes them.

    ``{"event": name, "data": data, "timestamp": {"seconds", "microseconds"}}``
    and ``\\r\\n``; the time is wall-clock time since the Unix epoch (QEMU's
    ``g_get_real_time()``), which the caller supplies so this stays pure.
    """
    return _line(
        {
            "event": name,
            "data": dict(data),
            "timestamp": {"seconds": seconds, "microseconds": microseconds},
        }
    )


def command_not_found(name: str) -> CommandError:
    """QEMU's error for an unknown command (qapi/qmp-dispatch.c)."""
    return CommandError(f"The command {name} has not been found", CommandError.COMMAND_NOT_FOUND)


# ---------------------------------------------------------------------------
# Argument validation (QEMU's qapi/qobject-input-visitor.c)
# ---------------------------------------------------------------------------

_NONE_TYPE: Final = type(None)
_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1

# The names QEMU's input visitor puts after "expected: ".
_TYPE_NAMES: Final[dict[type, str]] = {
    str: "string",
    int: "integer",
    bool: "boolean",
    float: "number",
    dict: "object",
    list: "array",
    _NONE_TYPE: "null",
    object: "any",
}


# ``type`` is also a field name of Arg; annotations there use this alias.
_Type: TypeAlias = type


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a command's schema, for :func:`check_arguments`.

    ``type`` is one of ``str`` (QAPI ``str``), ``int`` (``int``: a JSON
    integer in the signed 64-bit range; ``true`` is not an integer),
    ``bool``, ``float`` (``number``: any JSON number), ``dict`` (a nested
    object, handed over unchecked for the command to validate, e.g. a
    SocketAddress), ``list`` (an array; with ``items``, each element is
    checked too), ``type(None)`` (JSON ``null``) or ``object`` (anything);
    or a tuple of these for a value that may take either form, like a QAPI
    alternate. An optional argument that is absent takes ``default``; one
    that is present must have the right type (``null`` is no way to omit
    it, as in QEMU).
    """

    name: str
    type: _Type | tuple[_Type, ...]
    required: bool = True
    default: Any = None
    items: _Type | None = None

    def __post_init__(self) -> None:
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        for t in (*types, *((self.items,) if self.items is not None else ())):
            if t not in _TYPE_NAMES:
                raise ValueError(f"Arg {self.name!r}: unsupported type {t!r}")


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_TYPE_NAMES[x] for x in t)
    return _TYPE_NAMES[t]


def _is_instance(value: Any, t: type) -> bool:
    vt = type(value)
    if t is int:
        return vt is int and _INT64_MIN <= value <= _INT64_MAX
    if t is float:
        return vt is float or vt is int
    if t is object:
        return True
    return vt is t


def _matches(value: Any, t: type | tuple[type, ...]) -> bool:
    if isinstance(t, tuple):
        return any(_is_instance(value, x) for x in t)
    return _is_instance(value, t)


def _invalid_type(name: str, t: type | tuple[type, ...]) -> CommandError:
    return CommandError(f"Invalid parameter type for '{name}', expected: {_type_name(t)}")


def check_arguments(arguments: Mapping[str, Any], schema: Sequence[Arg]) -> dict[str, Any]:
    """Validate a command's ``arguments`` against ``schema``, QEMU's way.

    Returns a new dict with every schema argument (absent optional ones set
    to their default) and nothing else. Raises :class:`CommandError` of
    class ``GenericError`` with the texts of QEMU's QAPI input visitor, in
    the order its generated marshallers check: the schema's arguments in
    their declared order first, then unknown ones:

    - ``Parameter 'NAME' is missing``
    - ``Invalid parameter type for 'NAME', expected: TYPE`` (``string``,
      ``integer``, ``boolean``, ``number``, ``object``, ``array``; a list
      element is named ``NAME[INDEX]``)
    - ``Parameter 'NAME' is unexpected``
    """
    checked: dict[str, Any] = {}
    present = 0
    for arg in schema:
        name = arg.name
        if name not in arguments:
            if arg.required:
                raise CommandError(f"Parameter '{name}' is missing")
            checked[name] = arg.default
            continue
        value = arguments[name]
        if not _matches(value, arg.type):
            raise _invalid_type(name, arg.type)
        if arg.items is not None and type(value) is list:
            for index, item in enumerate(value):
                if not _is_instance(item, arg.items):
                    raise _invalid_type(f"{name}[{index}]", arg.items)
        checked[name] = value
        present += 1
    if present != len(arguments):
        for name in arguments:
            if name not in checked:
                raise CommandError(f"Parameter '{name}' is unexpected")
    return checked


# qmp_capabilities' own schema (qapi/control.json): 'enable' is an optional
# list of QMPCapability, an enum whose only member is 'oob'.
_CAPABILITIES_SCHEMA: Final = (Arg("enable", list, required=False, default=(), items=str),)
_KNOWN_CAPABILITIES: Final = frozenset({"oob"})
# Capabilities this server offers in its greeting: none. QEMU offers 'oob'
# only on monitors with their own I/O thread; ours never runs commands out of
# band, so 'exec-oob' is refused like any unknown member (see QmpConnection).
_OFFERED_CAPABILITIES: Final[frozenset[str]] = frozenset()

# ---------------------------------------------------------------------------
# Framing: the byte-level scanner (QEMU's json-lexer.c + json-streamer.c)
# ---------------------------------------------------------------------------

_LBRACE, _RBRACE, _LBRACKET, _RBRACKET = b"{}[]"
_DQUOTE, _SQUOTE, _BACKSLASH, _MINUS = b"\"'\\-"

# Inside a message but outside strings: skip runs of bytes that change
# nothing and whole well-formed double-quoted strings in one C-level match,
# stopping at a bracket, a quote that starts an unfinished (or broken)
# string, an apostrophe (QEMU's single-quoted strings), a byte that is a
# lexical error anywhere (ASCII control characters other than \t \r \n, and
# 0xFE/0xFF, which are never UTF-8), or the end of the buffer. Possessive
# quantifiers keep it linear on any input.
_SKIP_IN_MESSAGE: Final = re.compile(
    rb'(?:[^{}\[\]"\'\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]++'
    rb'|"(?:[^"\\\x00-\x1f\xfe\xff]++|\\[\x20-\xfd])*+")*+'
)
# A whole message and nothing else in one chunk, the usual case (a client sends
# one command and waits for its reply): an object made of what _SKIP_IN_MESSAGE
# skips (plain bytes and well-formed double-quoted strings) and of objects or
# arrays of the same nested one level deep, with only whitespace around it.
# The scanner would frame exactly this as one message, so it is handed to the
# decoder without being scanned byte by byte; anything else is scanned.
_PLAIN: Final = rb'[^{}\[\]"\'\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]++'
_DQ_STRING: Final = rb'"(?:[^"\\\x00-\x1f\xfe\xff]++|\\[\x20-\xfd])*+"'
_FLAT: Final = rb"(?:" + _PLAIN + rb"|" + _DQ_STRING + rb")*+"
_WHOLE_MESSAGE: Final = re.compile(
    rb"[ \t\r\n]*+(\{(?:"
    + _PLAIN
    + rb"|"
    + _DQ_STRING
    + rb"|\{"
    + _FLAT
    + rb"\}|\["
    + _FLAT
    + rb"\])*+\})[ \t\r\n]*+"
)
# The body of a string (QEMU: any byte 0x20-0xFD, or a backslash followed by
# one; which escapes are valid is left to the decoder). Resumable: it stops
# before a lone trailing backslash.
_DQ_BODY: Final = re.compile(rb'(?:[^"\\\x00-\x1f\xfe\xff]++|\\[\x20-\xfd])*+')
_SQ_BODY: Final = re.compile(rb"(?:[^'\\\x00-\x1f\xfe\xff]++|\\[\x20-\xfd])*+")
_WHITESPACE: Final = re.compile(rb"[ \t\r\n]*+")
# Error recovery skips to a byte that can start a message or marks a fresh
# start: '{', '[', an ASCII control character other than \t (line endings
# included), or 0xFE/0xFF.
_RECOVERY_SKIP: Final = re.compile(rb"[^{\[\x00-\x08\x0a-\x1f\xfe\xff]*+")
# A top-level number: everything that may still grow into one, then the
# strict RFC 8259 form.
_NUMBER_PREFIX: Final = re.compile(rb"-?[0-9]*+(?:\.[0-9]*+)?+(?:[eE][-+]?+[0-9]*+)?+")
_NUMBER: Final = re.compile(rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+")
_NUMBER_TAIL: Final = re.compile(rb"[-+.0-9eE]*+")
_KEYWORD: Final = re.compile(rb"[a-z]*+")

# The texts of errors in the byte stream itself. QEMU's own are "JSON parse
# error, ..." (json-parser.c, json-streamer.c); so are ours.
_PREMATURE_END: Final = "JSON parse error, premature end of input"
_EXPECTING_VALUE: Final = "JSON parse error, expecting value"
_NOT_AN_OBJECT: Final = "QMP input must be a JSON object"
# QEMU: "JSON nesting depth limit exceeded" (json-streamer.c); we add the limit.
_NESTING_ERROR: Final = (
    "JSON nesting depth limit exceeded: "
    f"at most {QMP_MAX_NESTING} nested arrays and objects per message"
)


def _generic(desc: str) -> Send:
    """A GenericError reply without id: for input that was never a request."""
    return Send(_error_line(desc, CommandError.GENERIC))


def _keyword_error(word: bytes | bytearray) -> str:
    if word in (b"true", b"false", b"null"):
        return _NOT_AN_OBJECT
    return f"JSON parse error, invalid keyword '{word.decode('ascii')}'"


_STRAY_ESCAPES: Final = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def _stray(token: bytes | bytearray) -> str:
    # QEMU reports a lexical error as "JSON parse error, stray '%s'" with the
    # raw bytes; we spell bytes outside printable ASCII as \xNN so that the
    # reply stays readable.
    text = "".join(
        chr(b) if 0x20 <= b < 0x7F else _STRAY_ESCAPES.get(b, f"\\x{b:02x}") for b in token
    )
    return f"JSON parse error, stray '{text}'"


# ---------------------------------------------------------------------------
# Decoding one framed message
# ---------------------------------------------------------------------------


class _ParseError(Exception):
    """A framed message is not valid JSON; ``desc`` is the reply's text."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _ParseError("JSON parse error, duplicate key")
    return result


def _constant(name: str) -> Any:
    # NaN, Infinity, -Infinity: Python's json extensions. RFC 8259 and QEMU's
    # lexer have no such tokens (QEMU stops at the first letter).
    raise _ParseError(f"JSON parse error, stray '{name}'")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        # QEMU's strtod() would make it an infinity, which no reply could
        # then carry back as JSON.
        raise _ParseError(f"JSON parse error, number '{text}' is out of range")
    return value


_decoder: Final = json.JSONDecoder(
    object_pairs_hook=_object, parse_constant=_constant, parse_float=_finite
)
# The C scanner that decode() calls (typeshed does not declare the attribute).
_scan_once: Final[Callable[[str, int], tuple[Any, int]]] = _decoder.scan_once  # type: ignore[attr-defined]

# QEMU's lexer extension: strings may be quoted with apostrophes, and \' is
# an escape in either kind. Python's json knows neither, so a message that
# contains an apostrophe anywhere is rewritten to plain JSON first.
_STRING: Final = re.compile(rb"\"(?:[^\"\\]++|\\.)*+\"|'(?:[^'\\]++|\\.)*+'", re.DOTALL)
_ESCAPE_OR_DQUOTE: Final = re.compile(rb'\\(.)|"', re.DOTALL)


def _requote_piece(match: re.Match[bytes]) -> bytes:
    escaped = match.group(1)
    if escaped is None:
        return b'\\"'  # an unescaped '"' inside an apostrophe-quoted string
    if escaped == b"'":
        return b"'"
    return match.group(0)


def _requote(match: re.Match[bytes]) -> bytes:
    token = match.group(0)
    if token[0] == _DQUOTE and b"\\'" not in token:
        return token
    return b'"' + _ESCAPE_OR_DQUOTE.sub(_requote_piece, token[1:-1]) + b'"'


def _surrogate(value: Any) -> int | None:
    """The first lone surrogate in any string of ``value``, if there is one."""
    if type(value) is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return ord(value[err.start])
        return None
    if type(value) is dict:
        for key, item in value.items():
            found = _surrogate(key)
            if found is None:
                found = _surrogate(item)
            if found is not None:
                return found
    elif type(value) is list:
        for item in value:
            found = _surrogate(item)
            if found is not None:
                return found
    return None


def _decode(raw: bytes | bytearray) -> Any:
    """One framed message → its Python value, or :class:`_ParseError`."""
    if b"'" in raw:
        raw = _STRING.sub(_requote, bytes(raw))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # QEMU: "invalid UTF-8 sequence in string", or a stray byte outside
        # strings; one text for both.
        raise _ParseError("JSON parse error, invalid UTF-8 sequence") from None
    try:
        # decode() is scan_once() behind two Python frames and two whitespace
        # matches; a framed message has no whitespace around it, so the C
        # scanner alone decodes it. Anything else (no value, extra data) goes
        # through decode() for its error text.
        try:
            value, end = _scan_once(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            value = _decoder.decode(text)
    except json.JSONDecodeError as err:
        msg = err.msg
        raise _ParseError(f"JSON parse error, {msg[:1].lower()}{msg[1:]}") from None
    except RecursionError:
        raise _ParseError(_NESTING_ERROR) from None
    except ValueError:
        # int() refuses more than sys.get_int_max_str_digits() digits.
        raise _ParseError("JSON parse error, number is too long") from None
    if b"\\u" in raw:
        # json.loads() lets a lone \uD800-\uDFFF through; QEMU's parser
        # rejects it, and Python could not encode the string again.
        code = _surrogate(value)
        if code is not None:
            raise _ParseError(f"JSON parse error, \\u{code:04X} is not a valid Unicode character")
    return value


# ---------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------


class QmpConnection:
    """The protocol state of one monitor client, from greeting to end of file.

    Send :meth:`greeting` first, then feed every chunk read from the client
    to :meth:`receive_data` and act on the events, in order. The core keeps
    what it needs between chunks (an unfinished message, the negotiation
    state) and nothing else.

    Framing follows QEMU's JSON streamer, which reads a stream of JSON
    values, not lines:

    - A message is one JSON value. An object or array ends when its
      brackets balance again, counting ``{}`` and ``[]`` outside strings,
      with backslash escapes; a scalar at top level (a number, string,
      ``true``, ...) is a message of its own. A stray ``}``, ``]``, ``,``
      or ``:`` at top level is one too (and an error). So no newline is
      needed after a command (qemu.qmp sends none), several commands may
      arrive in one chunk, one command may be split over many, and
      whitespace between them is ignored.
    - Strings may also be single-quoted, and ``\\'`` is an escape, as in
      QEMU's lexer.
    - A byte that is a lexical error in any state of QEMU's lexer (an
      ASCII control character other than ``\\t``, ``\\r``, ``\\n`` outside
      strings, any control character inside one, and 0xFE or 0xFF), or at
      top level a byte that cannot start a JSON value, makes a GenericError
      reply ``JSON parse error, stray '...'`` and throws away the message
      it interrupted. Then, like QEMU's lexer (state IN_RECOVERY), the core
      skips input up to a byte that can start a message (``{`` or ``[``), a
      line ending, another control character, or 0xFE/0xFF; the last two
      are consumed silently. This is how a client forces the parser back to
      a known-good state (QEMU's qmp-spec, "Forcing the JSON parser into
      known-good state"): send a control character such as ``\\x00``, or
      0xFF. Unlike QEMU, recovery also skips stray ``}`` ``]`` ``,`` ``:``
      instead of answering each with an error, and a reset byte met while
      recovering gets no second reply.
    - Other syntax errors inside an object or array are found when the
      value is complete, and make one GenericError reply with a ``JSON
      parse error, ...`` text (QEMU's lexer would have stopped at the first
      bad byte and answered the rest of the line piecemeal).
    - Limits: a message longer than ``max_message_size`` bytes or nested
      deeper than :data:`QMP_MAX_NESTING` gets one GenericError reply at
      its first byte past the limit (``JSON message size limit exceeded:
      ...``, ``JSON nesting depth limit exceeded: ...``); the core then
      keeps following the message's brackets and strings without storing
      them, and resumes after its end (a reset byte ends this too,
      silently). QEMU instead restarts its parser in the middle of the
      value and answers the rest piecemeal. An over-long top-level number
      or keyword is skipped the same way. The buffer never holds more than
      the limit plus one chunk, whatever the client sends.
    - Events depend only on the bytes, never on how they were split into
      chunks.
    - Decoding is strict JSON plus QEMU's apostrophes: UTF-8 only, no
      ``NaN`` or ``Infinity``, no duplicate keys, no lone surrogate escapes
      (all as in QEMU); and, unlike QEMU, no number beyond a float's range
      and no integer longer than Python's ``int()`` accepts (4300 digits).
    - ``b""`` means end of file: a pending top-level number or keyword is
      completed, an unfinished message gets ``JSON parse error, premature
      end of input`` (for a client that only shut down its writing side),
      and :class:`Closed` comes last. QEMU sends nothing then; the server
      may drop that reply if the socket is gone.

    Each message then goes through QEMU's qmp-dispatch checks, all
    GenericError replies:

    - not an object: ``QMP input must be a JSON object``;
    - members other than ``execute``, ``arguments`` and ``id``: ``QMP input
      member 'X' is unexpected``. This covers ``exec-oob``: QEMU accepts it
      only once the ``oob`` capability is enabled, which this server never
      offers, and answers exactly this;
    - ``execute`` not a string: ``QMP input member 'execute' must be a
      string``; ``arguments`` not an object: ``QMP input member 'arguments'
      must be an object``; no ``execute``: ``QMP input lacks member
      'execute'``. Members are checked in the order they came.

    Every reply to a message that had an ``id`` carries that id back,
    errors included; JSON errors have none (the message was not read).

    Negotiation, from QEMU's monitor/qmp.c and qmp-cmds-control.c:

    - Until ``qmp_capabilities`` succeeds, every other command gets class
      CommandNotFound, ``Expecting capabilities negotiation with
      'qmp_capabilities'``.
    - ``qmp_capabilities`` takes an optional ``enable`` list of capability
      names; it is checked like any QAPI argument (an unknown name is
      ``Parameter 'null' does not accept value 'X'``, QEMU's text for an
      enum inside a list), and asking for one not offered, i.e. ``oob``, is
      ``Capability oob not available``. Success is ``{"return": {}}``.
    - Afterwards ``qmp_capabilities`` gets class CommandNotFound,
      ``Capabilities negotiation is already complete, command ignored``,
      and every other command is an :class:`Execute` event.
    """

    def __init__(self, package: str, max_message_size: int = QMP_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        self.package = package
        self.max_message_size = max_message_size
        self._negotiated = False
        self._closed = False
        self._buffer = bytearray()
        self._pos = 0  # where scanning resumes
        self._start = -1  # where the message being framed starts; -1: none
        self._braces = 0
        self._brackets = 0
        self._quote = 0  # the quote byte while inside a string, else 0
        self._discarding = False  # following an over-limit message, unstored
        self._recovering = False  # skipping after a lexical error
        self._token_tail: re.Pattern[bytes] | None = None  # skipping an over-limit token

    # -- state ------------------------------------------------------------

    @property
    def negotiated(self) -> bool:
        """Whether ``qmp_capabilities`` has succeeded (commands are now dispatched)."""
        return self._negotiated

    @property
    def closed(self) -> bool:
        """Whether end of file was received."""
        return self._closed

    # -- output -----------------------------------------------------------

    def greeting(self) -> bytes:
        """The greeting to send as soon as the client is connected.

        QEMU's shape, from monitor/qmp.c qmp_greeting(), with version 0.0.0
        (we are not QEMU; clients that check the version must not mistake
        us for one) and our own name in ``package``. No capabilities are
        offered.
        """
        return _line(
            {
                "QMP": {
                    "version": {
                        "qemu": {"major": 0, "minor": 0, "micro": 0},
                        "package": self.package,
                    },
                    "capabilities": sorted(_OFFERED_CAPABILITIES),
                }
            }
        )

    reply = staticmethod(reply)
    error_reply = staticmethod(error_reply)

    # -- input ------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes read from the client; ``b""`` means end of file.

        Returns the events the bytes complete, in order: :class:`Execute`
        for commands to dispatch, :class:`Send` for replies the core made
        itself, :class:`Closed` after end of file. Bad input of any kind
        gives :class:`Send` events, never an exception; feeding data after
        end of file is a programming error (``RuntimeError``).
        """
        if self._closed:
            if data:
                raise RuntimeError("received data after end of file")
            return []
        events: list[Event] = []
        if data:
            # The scanner between messages, in its initial state (nothing
            # pending, skipped or discarded), and a chunk that is one message
            # within the size limit: decoded without scanning (_WHOLE_MESSAGE).
            if (
                not self._buffer
                and self._start < 0
                and not self._discarding
                and not self._recovering
                and self._token_tail is None
                and len(data) <= self.max_message_size
            ):
                whole = _WHOLE_MESSAGE.fullmatch(data)
                if whole is not None:
                    self._complete(events, 0, 0, whole.group(1))
                    return events
            self._buffer += data
            self._scan(events, eof=False)
        else:
            self._scan(events, eof=True)
            if self._start >= 0 and not self._discarding:
                events.append(_generic(_PREMATURE_END))
            self._closed = True
            self._buffer = bytearray()
            self._start = -1
            events.append(Closed())
        return events

    def _scan(self, events: list[Event], eof: bool) -> None:
        """Frame what the buffer holds; at ``eof``, complete a pending top-level token.

        The state lives in locals while scanning (this is the per-byte path)
        and goes back into the object at the end. ``start`` is where the
        message being framed begins (-1 between messages); ``braces``,
        ``brackets`` and ``quote`` are json-streamer.c's counts and the
        lexer's in-string state. The compiled patterns always match (maybe
        the empty string), hence the ``type: ignore`` on their ``.end()``.

        Every event is tied to a byte of input, never to where a chunk
        happens to end, so the events do not depend on how the input was
        split (the property tests check this). In particular a message is
        too large at its first byte past the limit, wherever that byte is
        first seen.
        """
        buf = self._buffer
        n = len(buf)
        pos = self._pos
        start = self._start
        braces = self._braces
        brackets = self._brackets
        quote = self._quote
        limit = self.max_message_size

        while pos < n:
            if start < 0:
                # -- between messages ----------------------------------------
                if self._recovering:
                    pos = _RECOVERY_SKIP.match(buf, pos).end()  # type: ignore[union-attr]
                    if pos == n:
                        break
                    self._recovering = False
                    if buf[pos] not in b"{[\r\n":
                        pos += 1  # a control character or 0xFE/0xFF: the reset
                    continue
                if self._token_tail is not None:
                    pos = self._token_tail.match(buf, pos).end()  # type: ignore[union-attr]
                    if pos == n:
                        break
                    self._token_tail = None
                pos = _WHITESPACE.match(buf, pos).end()  # type: ignore[union-attr]
                if pos == n:
                    break
                c = buf[pos]
                if c == _LBRACE or c == _LBRACKET:
                    start = pos
                    pos += 1
                    if c == _LBRACE:
                        braces = 1
                    else:
                        brackets = 1
                elif c == _DQUOTE or c == _SQUOTE:
                    start = pos
                    pos += 1
                    quote = c  # a top-level string: a message of its own
                elif c == _MINUS or 0x30 <= c <= 0x39 or 0x61 <= c <= 0x7A:
                    # A top-level number or keyword: a message of its own,
                    # which ends at the first byte that cannot extend it.
                    is_keyword = c >= 0x61
                    pattern = _KEYWORD if is_keyword else _NUMBER_PREFIX
                    end = pattern.match(buf, pos).end()  # type: ignore[union-attr]
                    if end - pos > limit:
                        events.append(_generic(self._size_error()))
                        self._token_tail = _KEYWORD if is_keyword else _NUMBER_TAIL
                        pos = end
                        continue
                    if end == n and not eof:
                        break  # the token may still grow: wait for more
                    number = None if is_keyword else _NUMBER.match(buf, pos)
                    if is_keyword:
                        events.append(_generic(_keyword_error(buf[pos:end])))
                        pos = end
                    elif number is not None:
                        events.append(_generic(_NOT_AN_OBJECT))
                        pos = number.end()
                    else:
                        end = max(end, pos + 1)
                        events.append(_generic(_stray(buf[pos:end])))
                        pos = end
                        self._recovering = True
                    continue
                else:
                    pos += 1
                    if c in b"}],:":
                        events.append(_generic(_EXPECTING_VALUE))
                    else:
                        events.append(_generic(_stray(buf[pos - 1 : pos])))
                        self._recovering = True
                    continue

            # -- inside a message ------------------------------------------------
            if not quote:
                pattern = _SKIP_IN_MESSAGE
            else:
                pattern = _DQ_BODY if quote == _DQUOTE else _SQ_BODY
            pos = pattern.match(buf, pos).end()  # type: ignore[union-attr]
            if pos == n:
                break
            if pos - start >= limit and not self._discarding:
                events.append(_generic(self._size_error()))
                self._discarding = True
            c = buf[pos]
            pos += 1
            if quote:
                if c == quote:
                    quote = 0
                    if braces == brackets == 0:
                        start, braces, brackets = self._complete(events, start, pos)
                    continue
                if c == _BACKSLASH:
                    if pos == n:
                        pos -= 1  # the escaped byte has not arrived yet
                        break
                    pos += 1  # the escaped byte is a control character or 0xFE/0xFF
            elif c == _LBRACE or c == _LBRACKET:
                if c == _LBRACE:
                    braces += 1
                else:
                    brackets += 1
                if braces + brackets > QMP_MAX_NESTING and not self._discarding:
                    events.append(_generic(_NESTING_ERROR))
                    self._discarding = True
                continue
            elif c == _RBRACE or c == _RBRACKET:
                if c == _RBRACE:
                    braces -= 1
                else:
                    brackets -= 1
                # json-streamer.c: a message ends when both counts are back
                # to zero, or as soon as either goes negative.
                if braces < 0 or brackets < 0 or braces == brackets == 0:
                    start, braces, brackets = self._complete(events, start, pos)
                continue
            elif c == _DQUOTE or c == _SQUOTE:
                quote = c  # a string _SKIP_IN_MESSAGE could not take whole
                continue
            # A lexical error at pos - 1: the message is lost (answered once),
            # then recovery as in json-lexer.c.
            if not self._discarding:
                events.append(_generic(_stray(buf[pos - 1 : pos])))
            start = -1
            braces = brackets = quote = 0
            self._discarding = False
            self._recovering = True

        # -- between chunks: keep only an unfinished message -----------------
        if start >= 0 and not self._discarding and n - start > limit:
            events.append(_generic(self._size_error()))
            self._discarding = True
        keep = start if start >= 0 and not self._discarding else pos
        if keep:
            del buf[:keep]
            pos -= keep
            start = max(start - keep, 0) if start >= 0 else -1
        self._pos = pos
        self._start = start
        self._braces = braces
        self._brackets = brackets
        self._quote = quote

    def _complete(
        self, events: list[Event], start: int, end: int, message: bytes | None = None
    ) -> tuple[int, int, int]:
        """A message spans ``buf[start:end]`` (or is ``message``): answer or dispatch
        it; reset framing."""
        if self._discarding:
            self._discarding = False
        else:
            try:
                value = _decode(self._buffer[start:end] if message is None else message)
            except _ParseError as err:
                events.append(_generic(err.desc))
            else:
                events.append(self._request(value))
        return -1, 0, 0

    def _size_error(self) -> str:
        return (
            "JSON message size limit exceeded: "
            f"a message may be at most {self.max_message_size} bytes"
        )

    # -- dispatch ---------------------------------------------------------

    def _request(self, value: Any) -> Event:
        """qmp-dispatch.c's checks on one decoded message, then negotiation."""
        if type(value) is not dict:
            return _generic(_NOT_AN_OBJECT)
        has_id = "id" in value
        id_ = value.get("id")
        command: str | None = None
        for key, member in value.items():
            if key == "execute":
                if type(member) is not str:
                    return self._error("QMP input member 'execute' must be a string", id_, has_id)
                command = member
            elif key == "arguments":
                if type(member) is not dict:
                    return self._error(
                        "QMP input member 'arguments' must be an object", id_, has_id
                    )
            elif key != "id":
                return self._error(f"QMP input member '{key}' is unexpected", id_, has_id)
        if command is None:
            return self._error("QMP input lacks member 'execute'", id_, has_id)
        arguments: dict[str, Any] = value.get("arguments", {})
        if command == "qmp_capabilities":
            return self._qmp_capabilities(arguments, id_, has_id)
        if not self._negotiated:
            return self._error(_NEGOTIATION_REQUIRED, id_, has_id, CommandError.COMMAND_NOT_FOUND)
        return Execute(command, arguments, id_, has_id)

    def _qmp_capabilities(self, arguments: dict[str, Any], id_: Any, has_id: bool) -> Send:
        # The marshaller checks the arguments before the handler looks at
        # the negotiation state, so bad arguments win over "already complete".
        try:
            enable = check_arguments(arguments, _CAPABILITIES_SCHEMA)["enable"]
        except CommandError as err:
            return self._error(err.desc, id_, has_id)
        for name in enable:
            if name not in _KNOWN_CAPABILITIES:
                # qapi-visit-core.c input_type_enum(): a list element has no
                # name, and QEMU prints a missing name as 'null'.
                return self._error(f"Parameter 'null' does not accept value '{name}'", id_, has_id)
        if self._negotiated:
            return self._error(_ALREADY_NEGOTIATED, id_, has_id, CommandError.COMMAND_NOT_FOUND)
        unavailable = [name for name in enable if name not in _OFFERED_CAPABILITIES]
        if unavailable:
            return self._error(f"Capability {', '.join(unavailable)} not available", id_, has_id)
        self._negotiated = True
        return Send(_response("return", {}, id_, has_id))

    @staticmethod
    def _error(desc: str, id_: Any, has_id: bool, error_class: str = CommandError.GENERIC) -> Send:
        return Send(_error_line(desc, error_class, id_, has_id))
