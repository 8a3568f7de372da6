"""The QMP protocol core, fed plain byte strings (no sockets)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp.message import Message
from qemu.qmp.models import ErrorResponse, Greeting

from fdsupervisor.errors import CommandError
from fdsupervisor.qmp import (
    QMP_MAX_MESSAGE_SIZE,
    QMP_MAX_NESTING,
    Arg,
    Closed,
    Event,
    Execute,
    QmpConnection,
    Send,
    check_arguments,
    command_not_found,
    error_reply,
    event,
    reply,
)

PACKAGE = "fdsupervisor 1.2.3"
CAPABILITIES = b'{"execute": "qmp_capabilities"}'
NEGOTIATION_REQUIRED = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED = "Capabilities negotiation is already complete, command ignored"


# -- helpers -----------------------------------------------------------------


def connect(**kwargs: Any) -> QmpConnection:
    return QmpConnection(PACKAGE, **kwargs)


def negotiated(**kwargs: Any) -> QmpConnection:
    conn = connect(**kwargs)
    assert conn.receive_data(CAPABILITIES) == [Send(b'{"return": {}}\r\n')]
    assert conn.negotiated
    return conn


def line(data: bytes) -> dict[str, Any]:
    """Parse one reply line, checking that it is exactly one line."""
    assert data.endswith(b"\r\n")
    assert b"\n" not in data[:-2] and b"\r" not in data[:-2]
    value = json.loads(data)
    assert isinstance(value, dict)
    return value


def replies(events: list[Event]) -> list[dict[str, Any]]:
    assert all(isinstance(e, Send) for e in events), events
    return [line(e.data) for e in events if isinstance(e, Send)]


def one_reply(events: list[Event]) -> dict[str, Any]:
    [message] = replies(events)
    return message


def error(desc: str, error_class: str = "GenericError", **id_: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    message.update(id_)
    return message


def executes(events: list[Event]) -> list[Execute]:
    return [e for e in events if isinstance(e, Execute)]


def feed_chunks(conn: QmpConnection, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += conn.receive_data(chunk)
    return events


# -- greeting ----------------------------------------------------------------


def test_greeting_is_qemus_shape_with_our_package() -> None:
    data = connect().greeting()
    assert data == (
        b'{"QMP": {"version": {"qemu": {"major": 0, "minor": 0, "micro": 0}, '
        b'"package": "fdsupervisor 1.2.3"}, "capabilities": []}}\r\n'
    )
    assert line(data) == {
        "QMP": {
            "version": {"qemu": {"major": 0, "minor": 0, "micro": 0}, "package": PACKAGE},
            "capabilities": [],
        }
    }


def test_greeting_and_replies_are_accepted_by_qemu_qmp() -> None:
    conn = connect()
    # qemu.qmp reads a line (readline(), "\r\n" included) and hands it to Message.
    greeting = Greeting(Message(conn.greeting()))
    assert greeting.QMP.capabilities == []
    assert greeting.QMP.version["package"] == PACKAGE

    [negotiation] = conn.receive_data(b'{"execute": "qmp_capabilities", "id": "__qmp#00000"}')
    assert isinstance(negotiation, Send)
    assert dict(Message(negotiation.data)) == {"return": {}, "id": "__qmp#00000"}

    [execute] = conn.receive_data(b'{"execute": "query-fds", "id": "__qmp#00001"}')
    assert isinstance(execute, Execute)
    ok = Message(reply(execute, [{"fdname": "x", "listening": True}]))
    assert ok["return"] == [{"fdname": "x", "listening": True}]
    assert ok["id"] == "__qmp#00001"
    failed = Message(error_reply(execute, command_not_found("query-fds")))
    assert ErrorResponse(failed).error.class_ == "CommandNotFound"
    assert failed["id"] == "__qmp#00001"
    notice = Message(event("SOCKET_ADDED", {"id": "web"}, 1700000000, 5))
    assert notice["event"] == "SOCKET_ADDED"


# -- framing -----------------------------------------------------------------

STREAM = (
    b'{"execute": "qmp_capabilities", "id": 1}'
    b'{"execute": "query-fds"}\r\n'
    b'  \t{"execute": "getfd", "arguments": {"fdname": "a{b}[c]\\"d\\\\"}, "id": "x"}'
    b'\n\n{"execute":"socket-add","arguments":{"id":"s","addr":{"type":"unix",'
    b'"path":"/run/\\u00e9\xc3\xa9]}"}},"id":[1,{"2":[3]}]}'
    b"{'execute': 'service-start', 'arguments': {'unit': 'it\\'s \"}\"'}}"
)
STREAM_EXECUTES = [
    Execute("query-fds", {}, None, False),
    Execute("getfd", {"fdname": 'a{b}[c]"d\\'}, "x", True),
    Execute(
        "socket-add",
        {"id": "s", "addr": {"type": "unix", "path": "/run/\u00e9\u00e9]}"}},
        [1, {"2": [3]}],
        True,
    ),
    Execute("service-start", {"unit": 'it\'s "}"'}, None, False),
]


def test_stream_of_commands_in_one_chunk() -> None:
    events = connect().receive_data(STREAM)
    assert events[0] == Send(b'{"return": {}, "id": 1}\r\n')
    assert events[1:] == STREAM_EXECUTES


@pytest.mark.parametrize("offset", range(1, len(STREAM)))
def test_stream_split_at_every_offset(offset: int) -> None:
    events = feed_chunks(connect(), [STREAM[:offset], STREAM[offset:]])
    assert events[1:] == STREAM_EXECUTES


def test_stream_byte_by_byte() -> None:
    events = feed_chunks(connect(), [bytes([b]) for b in STREAM])
    assert events[1:] == STREAM_EXECUTES


def test_no_newline_needed_and_nothing_before_the_last_byte() -> None:
    conn = negotiated()
    command = b'{"execute": "query-sockets", "arguments": {"a": [1, {"b": "}"}]}}'
    assert conn.receive_data(command[:-1]) == []
    assert conn.receive_data(command[-1:]) == [
        Execute("query-sockets", {"a": [1, {"b": "}"}]}, None, False)
    ]


@pytest.mark.parametrize(
    ("string", "value"),
    [
        (b'"}"', "}"),
        (b'"]"', "]"),
        (b'"{["', "{["),
        (b'"\\""', '"'),
        (b'"\\\\"', "\\"),
        (b'"\\\\\\""', '\\"'),
        (b'"\\/"', "/"),
        (b'"\\u007d"', "}"),
        (b"'}'", "}"),
        (b"'\\''", "'"),
        (b"'\"'", '"'),
        (b"'\\\\'", "\\"),
        (b'"\\\'"', "'"),
        (b'"\'{"', "'{"),
    ],
)
def test_brackets_and_quotes_inside_strings_do_not_end_a_message(string: bytes, value: str) -> None:
    conn = negotiated()
    events = conn.receive_data(b'{"execute": "x", "arguments": {"s": ' + string + b"}}")
    assert events == [Execute("x", {"s": value}, None, False)]


def test_single_quoted_strings_as_in_qemu() -> None:
    conn = negotiated()
    [execute] = conn.receive_data(
        b"{'execute': 'getfd', 'arguments': {'fdname': 'a\"b\\'c\\\\'}, 'id': 'q'}"
    )
    assert execute == Execute("getfd", {"fdname": "a\"b'c\\"}, "q", True)


def test_whitespace_between_and_around_messages_is_ignored() -> None:
    conn = negotiated()
    events = conn.receive_data(b' \t\r\n{"execute": "a"}\r\n\r\n \t{ "execute" : "b" }\n')
    assert events == [Execute("a", {}, None, False), Execute("b", {}, None, False)]
    assert conn.receive_data(b"\r\n   \t\n") == []


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b"1 ", "QMP input must be a JSON object"),
        (b"-12.5e3 ", "QMP input must be a JSON object"),
        (b'"text"', "QMP input must be a JSON object"),
        (b"'text'", "QMP input must be a JSON object"),
        (b"true ", "QMP input must be a JSON object"),
        (b"false ", "QMP input must be a JSON object"),
        (b"null ", "QMP input must be a JSON object"),
        (b"[]", "QMP input must be a JSON object"),
        (b'[{"execute": "x"}]', "QMP input must be a JSON object"),
        (b"foo ", "JSON parse error, invalid keyword 'foo'"),
        (b"}", "JSON parse error, expecting value"),
        (b"]", "JSON parse error, expecting value"),
        (b",", "JSON parse error, expecting value"),
        (b":", "JSON parse error, expecting value"),
    ],
)
def test_top_level_values_are_messages_of_their_own(data: bytes, desc: str) -> None:
    conn = negotiated()
    assert one_reply(conn.receive_data(data)) == error(desc)
    assert conn.receive_data(b'{"execute": "next"}') == [Execute("next", {}, None, False)]


def test_top_level_number_waits_for_the_byte_that_ends_it() -> None:
    conn = negotiated()
    assert conn.receive_data(b"12") == []
    assert conn.receive_data(b"3") == []
    assert one_reply(conn.receive_data(b"4\n")) == error("QMP input must be a JSON object")
    assert conn.receive_data(b"tr") == []
    assert one_reply(conn.receive_data(b"ue{")) == error("QMP input must be a JSON object")


def test_mismatched_brackets_end_the_message_as_qemu_does() -> None:
    # json-streamer.c emits as soon as either count goes negative.
    conn = negotiated()
    [bad] = replies(conn.receive_data(b"{]"))
    assert bad["error"]["class"] == "GenericError"
    assert bad["error"]["desc"].startswith("JSON parse error, ")
    assert conn.receive_data(b'{"execute": "x"}') == [Execute("x", {}, None, False)]


# -- negotiation ---------------------------------------------------------------


def test_commands_before_negotiation_are_not_found() -> None:
    conn = connect()
    assert one_reply(conn.receive_data(b'{"execute": "query-fds", "id": 7}')) == error(
        NEGOTIATION_REQUIRED, "CommandNotFound", id=7
    )
    assert one_reply(conn.receive_data(b'{"execute": "no-such-command"}')) == error(
        NEGOTIATION_REQUIRED, "CommandNotFound"
    )
    assert not conn.negotiated


def test_shape_errors_before_negotiation_stay_generic() -> None:
    conn = connect()
    assert one_reply(conn.receive_data(b'{"id": 1}')) == error(
        "QMP input lacks member 'execute'", id=1
    )


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (b'{"execute": "qmp_capabilities"}', {"return": {}}),
        (b'{"execute": "qmp_capabilities", "id": "a"}', {"return": {}, "id": "a"}),
        (b'{"execute": "qmp_capabilities", "arguments": {}}', {"return": {}}),
        (b'{"execute": "qmp_capabilities", "arguments": {"enable": []}}', {"return": {}}),
    ],
)
def test_qmp_capabilities_succeeds(request_: bytes, expected: dict[str, Any]) -> None:
    conn = connect()
    assert one_reply(conn.receive_data(request_)) == expected
    assert conn.negotiated
    assert conn.receive_data(b'{"execute": "query-fds"}') == [Execute("query-fds", {}, None, False)]


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        (b'{"enable": ["oob"]}', "Capability oob not available"),
        (b'{"enable": ["oob", "oob"]}', "Capability oob, oob not available"),
        (b'{"enable": ["foo"]}', "Parameter 'null' does not accept value 'foo'"),
        (b'{"enable": "oob"}', "Invalid parameter type for 'enable', expected: array"),
        (b'{"enable": null}', "Invalid parameter type for 'enable', expected: array"),
        (b'{"enable": [1]}', "Invalid parameter type for 'enable[0]', expected: string"),
        (b'{"enable": [], "foo": 1}', "Parameter 'foo' is unexpected"),
    ],
)
def test_qmp_capabilities_refuses_bad_arguments(arguments: bytes, desc: str) -> None:
    conn = connect()
    request_ = b'{"execute": "qmp_capabilities", "id": 3, "arguments": ' + arguments + b"}"
    assert one_reply(conn.receive_data(request_)) == error(desc, id=3)
    assert not conn.negotiated


def test_qmp_capabilities_twice() -> None:
    conn = negotiated()
    assert one_reply(conn.receive_data(b'{"execute": "qmp_capabilities", "id": 9}')) == error(
        ALREADY_NEGOTIATED, "CommandNotFound", id=9
    )
    # As in QEMU, the arguments are checked before the negotiation state.
    assert one_reply(
        conn.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}')
    ) == error("Parameter 'x' is unexpected")
    assert conn.negotiated


def test_negotiation_and_commands_in_one_chunk_keep_their_order() -> None:
    conn = connect()
    events = conn.receive_data(b'{"execute": "a"}{"execute": "qmp_capabilities"}{"execute": "b"}')
    assert replies(events[:2]) == [error(NEGOTIATION_REQUIRED, "CommandNotFound"), {"return": {}}]
    assert events[2] == Execute("b", {}, None, False)


# -- shape (qmp-dispatch.c) ------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b"{}", "QMP input lacks member 'execute'"),
        (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}', "QMP input member 'execute' must be a string"),
        (b'{"execute": null}', "QMP input member 'execute' must be a string"),
        (b'{"execute": ["x"]}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "x", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "x", "arguments": null}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "x", "arguments": "a"}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "x", "foo": 1}', "QMP input member 'foo' is unexpected"),
        (b'{"exec-oob": "x"}', "QMP input member 'exec-oob' is unexpected"),
        (b'{"execute": "x", "exec-oob": "x"}', "QMP input member 'exec-oob' is unexpected"),
        (b'{"execute": "x", "control": {}}', "QMP input member 'control' is unexpected"),
        # Members are checked in the order they came.
        (b'{"foo": 1, "execute": 2}', "QMP input member 'foo' is unexpected"),
        (b'{"execute": 2, "foo": 1}', "QMP input member 'execute' must be a string"),
    ],
)
@pytest.mark.parametrize("negotiate", [False, True])
def test_shape_errors(data: bytes, desc: str, negotiate: bool) -> None:
    conn = negotiated() if negotiate else connect()
    assert one_reply(conn.receive_data(data)) == error(desc)
    with_id = data[:-1] + (b', "id": "z"}' if data != b"{}" else b'"id": "z"}')
    assert one_reply(conn.receive_data(with_id)) == error(desc, id="z")


def test_not_an_object_has_no_id() -> None:
    conn = negotiated()
    assert one_reply(conn.receive_data(b'[{"id": 1}]')) == error("QMP input must be a JSON object")


# -- id echo -------------------------------------------------------------------

IDS = [
    0,
    1,
    -5,
    2**63,
    1.5,
    "",
    "abc",
    "\u00e9\u2603\U0001f600",
    None,
    True,
    False,
    [],
    [1, "a", None],
    {},
    {"a": {"b": [1, {"c": None}]}},
]


@pytest.mark.parametrize("id_", IDS, ids=repr)
def test_id_is_echoed_in_every_kind_of_reply(id_: Any) -> None:
    encoded = json.dumps(id_).encode()
    conn = connect()
    before = conn.receive_data(b'{"execute": "x", "id": ' + encoded + b"}")
    assert one_reply(before) == error(NEGOTIATION_REQUIRED, "CommandNotFound", id=id_)
    negotiation = conn.receive_data(b'{"execute": "qmp_capabilities", "id": ' + encoded + b"}")
    assert one_reply(negotiation) == {"return": {}, "id": id_}
    shape = conn.receive_data(b'{"id": ' + encoded + b', "execute": 5}')
    assert one_reply(shape)["id"] == id_
    again = conn.receive_data(b'{"execute": "qmp_capabilities", "id": ' + encoded + b"}")
    assert one_reply(again)["id"] == id_

    [execute] = conn.receive_data(b'{"id": ' + encoded + b', "execute": "query-fds"}')
    assert execute == Execute("query-fds", {}, id_, True)
    assert line(reply(execute, {"ok": 1})) == {"return": {"ok": 1}, "id": id_}
    assert line(error_reply(execute, CommandError("bad"))) == error("bad", id=id_)


def test_no_id_no_id_member() -> None:
    conn = negotiated()
    [execute] = conn.receive_data(b'{"execute": "query-fds"}')
    assert isinstance(execute, Execute)
    assert not execute.has_id
    assert reply(execute, {}) == b'{"return": {}}\r\n'
    assert error_reply(execute, command_not_found("query-fds")) == (
        b'{"error": {"class": "CommandNotFound", "desc": "The command query-fds has not been found"}}\r\n'
    )


def test_null_id_is_echoed() -> None:
    conn = negotiated()
    [execute] = conn.receive_data(b'{"execute": "x", "id": null}')
    assert execute == Execute("x", {}, None, True)
    assert reply(execute, {}) == b'{"return": {}, "id": null}\r\n'


# -- JSON errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"execute": NaN}', "JSON parse error, stray 'NaN'"),
        (b'{"execute": Infinity}', "JSON parse error, stray 'Infinity'"),
        (b'{"execute": -Infinity}', "JSON parse error, stray '-Infinity'"),
        (b'{"execute": "x", "execute": "y"}', "JSON parse error, duplicate key"),
        (b'{"execute": "x", "arguments": {"a": 1, "a": 1}}', "JSON parse error, duplicate key"),
        (b'{"execute": "\xff"}', "JSON parse error, stray '\\xff'"),
        (b'{"execute": "\xc3"}', "JSON parse error, invalid UTF-8 sequence"),
        (b'{"execute": "\xed\xa0\x80"}', "JSON parse error, invalid UTF-8 sequence"),
        (b'{"execute": \xc3}', "JSON parse error, invalid UTF-8 sequence"),
        (b'{"execute": \xc3\xa9}', "JSON parse error, expecting value"),
        (b'{"execute": "\\ud800"}', "JSON parse error, \\uD800 is not a valid Unicode character"),
        (
            b'{"execute": "x", "id": ["\\udc00"]}',
            "JSON parse error, \\uDC00 is not a valid Unicode character",
        ),
        (b'{"execute": "x", "id": 1e400}', "JSON parse error, number '1e400' is out of range"),
        (b'{"execute": "x", "id": ' + b"9" * 5000 + b"}", "JSON parse error, number is too long"),
        (
            b'{"execute": "x",}',
            "JSON parse error, expecting property name enclosed in double quotes",
        ),
        (b'{"execute" "x"}', "JSON parse error, expecting ':' delimiter"),
        (b'{"execute": "\\x"}', "JSON parse error, invalid \\escape"),
    ],
)
def test_json_errors_answer_and_the_connection_lives_on(data: bytes, desc: str) -> None:
    conn = negotiated()
    assert one_reply(conn.receive_data(data)) == error(desc)
    assert conn.receive_data(b'{"execute": "next", "id": 1}') == [Execute("next", {}, 1, True)]


def test_valid_unicode_is_accepted() -> None:
    conn = negotiated()
    [execute] = conn.receive_data(
        '{"execute": "x", "id": "\u00e9\U0001f600 \\ud83d\\ude00 \\u0000"}'.encode()
    )
    assert isinstance(execute, Execute)
    assert execute.id == "\u00e9\U0001f600 \U0001f600 \x00"
    assert line(reply(execute, {}))["id"] == execute.id


@pytest.mark.parametrize("byte", [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0xFE, 0xFF])
def test_lexical_error_bytes_abort_the_message_and_reset(byte: int) -> None:
    # QEMU's qmp-spec: a client forces the parser into a known-good state by
    # sending an ASCII control character other than \t \r \n, or 0xFF.
    conn = negotiated()
    stray = error(f"JSON parse error, stray '\\x{byte:02x}'")
    for partial in (b'{"execute": "x", "argu', b'{"execute": "x", "arguments": {"a": "b'):
        events = conn.receive_data(partial + bytes([byte]) + b'{"execute": "y"}')
        assert replies(events[:1]) == [stray]
        assert events[1:] == [Execute("y", {}, None, False)]


@pytest.mark.parametrize("byte", [0x00, 0x1B, 0xFF])
def test_reset_byte_between_messages_is_a_stray(byte: int) -> None:
    conn = negotiated()
    events = conn.receive_data(bytes([byte]) + b'{"execute": "y"}')
    assert replies(events[:1]) == [error(f"JSON parse error, stray '\\x{byte:02x}'")]
    assert events[1:] == [Execute("y", {}, None, False)]


def test_control_characters_inside_strings_are_lexical_errors() -> None:
    conn = negotiated()
    events = conn.receive_data(b'{"execute": "x\n", "id": 1}\n{"execute": "y"}')
    assert replies(events[:1]) == [error("JSON parse error, stray '\\n'")]
    assert events[1:] == [Execute("y", {}, None, False)]
    events = conn.receive_data(b'{"execute": "x\\\t", "id": 1}\n{"execute": "z"}')
    assert replies(events[:1]) == [error("JSON parse error, stray '\\t'")]
    assert events[1:] == [Execute("z", {}, None, False)]


def test_recovery_skips_to_the_next_message() -> None:
    # One reply for the garbage; then, as in json-lexer.c's IN_RECOVERY,
    # input is skipped up to a '{' or '[', a line ending or a control byte.
    conn = negotiated()
    events = conn.receive_data(b'Xgarbage "}" ], : 12 \t{"execute": "a"}')
    assert replies(events[:1]) == [error("JSON parse error, stray 'X'")]
    assert events[1:] == [Execute("a", {}, None, False)]
    events = conn.receive_data(b'@@@\n{"execute": "b"}')
    assert replies(events[:1]) == [error("JSON parse error, stray '@'")]
    assert events[1:] == [Execute("b", {}, None, False)]
    # A reset byte while recovering ends recovery silently.
    events = conn.receive_data(b'#junk\xff"abc"')
    assert replies(events) == [
        error("JSON parse error, stray '#'"),
        error("QMP input must be a JSON object"),
    ]


def test_recovery_continues_across_chunks() -> None:
    conn = negotiated()
    assert one_reply(conn.receive_data(b"Xabc")) == error("JSON parse error, stray 'X'")
    assert conn.receive_data(b'def "x" 1 2') == []
    assert conn.receive_data(b'{"execute": "a"}') == [Execute("a", {}, None, False)]


# -- limits ----------------------------------------------------------------------


def size_error(limit: int) -> dict[str, Any]:
    return error(f"JSON message size limit exceeded: a message may be at most {limit} bytes")


NESTING_ERROR = error(
    f"JSON nesting depth limit exceeded: at most {QMP_MAX_NESTING} nested arrays and objects per message"
)


def test_default_limit_is_one_mebibyte() -> None:
    assert QMP_MAX_MESSAGE_SIZE == 1 << 20
    assert connect().max_message_size == 1 << 20


def test_message_at_the_limit_is_accepted() -> None:
    command = b'{"execute": "x", "arguments": {"s": "' + b"a" * 50 + b'"}}'
    conn = negotiated(max_message_size=len(command))
    assert conn.receive_data(command) == [Execute("x", {"s": "a" * 50}, None, False)]


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_oversize_message_is_answered_once_and_skipped(chunk_size: int) -> None:
    limit = 100
    conn = negotiated(max_message_size=limit)
    oversize = (
        b'{"execute": "x", "id": 1, "arguments": {"s": "'
        + b'}]{["\\"\\\\' * 60
        + b'", "n": [[{}], {"a": "]"}]}}'
    )
    following = b' {"execute": "after", "id": 2}'
    data = oversize + following
    events = feed_chunks(conn, [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)])
    assert replies(events[:1]) == [size_error(limit)]
    assert events[1:] == [Execute("after", {}, 2, True)]


def test_oversize_buffer_stays_bounded() -> None:
    limit = 1000
    conn = negotiated(max_message_size=limit)
    events = conn.receive_data(b'{"execute": "x", "arguments": {"s": "')
    for _ in range(1000):
        events += conn.receive_data(b"a" * 997 + b"\\\\\\")
        assert len(conn._buffer) <= limit + 1000  # white-box: nothing piles up
    # Each chunk ends inside an escape, so the next one's first byte is escaped.
    events += conn.receive_data(b'x"}}{"execute": "after"}')
    assert replies(events[:1]) == [size_error(limit)]
    assert events[1:] == [Execute("after", {}, None, False)]


@pytest.mark.parametrize("data", [b'"' + b"a" * 200 + b'"', b"1" * 200 + b" ", b"a" * 200 + b" "])
def test_oversize_top_level_scalars(data: bytes) -> None:
    conn = negotiated(max_message_size=100)
    events = feed_chunks(conn, [data[:150], data[150:], b'{"execute": "after"}'])
    assert replies(events[:1]) == [size_error(100)]
    assert events[1:] == [Execute("after", {}, None, False)]


def test_nesting_at_the_limit_is_accepted() -> None:
    depth = QMP_MAX_NESTING - 2  # the request object and its arguments count too
    value = b"[" * depth + b"]" * depth
    conn = negotiated()
    [execute] = conn.receive_data(b'{"execute": "x", "arguments": {"v": ' + value + b"}}")
    assert isinstance(execute, Execute)


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_too_deep_nesting_is_answered_once_and_skipped(opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    depth = QMP_MAX_NESTING * 3
    conn = negotiated()
    data = b'{"execute": "x", "arguments": {"v": ' + opener * depth + b"1" + closer * depth + b"}}"
    events = conn.receive_data(data + b'{"execute": "after"}')
    assert replies(events[:1]) == [NESTING_ERROR]
    assert events[1:] == [Execute("after", {}, None, False)]


def test_reset_byte_ends_discarding() -> None:
    conn = negotiated(max_message_size=50)
    events = conn.receive_data(b'{"execute": "x", "arguments": {"s": "' + b"a" * 100)
    events += conn.receive_data(b'\x00{"execute": "after"}')
    assert replies(events[:1]) == [size_error(50)]
    assert events[1:] == [Execute("after", {}, None, False)]


# -- end of file -----------------------------------------------------------------


def test_eof_closes() -> None:
    conn = negotiated()
    assert conn.receive_data(b"") == [Closed()]
    assert conn.closed
    assert conn.receive_data(b"") == []
    with pytest.raises(RuntimeError):
        conn.receive_data(b"{}")


def test_eof_mid_message_answers_premature_end() -> None:
    conn = negotiated()
    assert conn.receive_data(b'{"execute": "query-fds", "id": 1') == []
    events = conn.receive_data(b"")
    assert replies(events[:1]) == [error("JSON parse error, premature end of input")]
    assert events[1:] == [Closed()]


def test_eof_mid_string_answers_premature_end() -> None:
    conn = negotiated()
    assert conn.receive_data(b'{"execute": "query-fds\\') == []
    events = conn.receive_data(b"")
    assert replies(events[:1]) == [error("JSON parse error, premature end of input")]
    assert events[1:] == [Closed()]


def test_eof_completes_a_pending_top_level_token() -> None:
    conn = negotiated()
    assert conn.receive_data(b"42") == []
    events = conn.receive_data(b"")
    assert replies(events[:1]) == [error("QMP input must be a JSON object")]
    assert events[1:] == [Closed()]


@pytest.mark.parametrize("data", [b"Xjunk", b'{"execute": "' + b"a" * 100])
def test_eof_while_skipping_is_silent(data: bytes) -> None:
    conn = negotiated(max_message_size=50)
    assert len(conn.receive_data(data)) == 1
    assert conn.receive_data(b"") == [Closed()]


def test_complete_commands_before_eof_are_dispatched() -> None:
    conn = connect()
    events = conn.receive_data(CAPABILITIES + b'{"execute": "reload"}')
    events += conn.receive_data(b"")
    assert events[1:] == [Execute("reload", {}, None, False), Closed()]


# -- reply builders ----------------------------------------------------------------


def test_event_line() -> None:
    data = event("SERVICE_EXITED", {"unit": "web", "pid": 12}, 1700000000, 123456)
    assert data == (
        b'{"event": "SERVICE_EXITED", "data": {"unit": "web", "pid": 12}, '
        b'"timestamp": {"seconds": 1700000000, "microseconds": 123456}}\r\n'
    )


def test_lines_never_contain_a_newline_and_are_ascii() -> None:
    execute = Execute("x", {}, "a\nb\r\u2028\u00e9", True)
    for data in (
        reply(execute, {"text": "line 1\nline 2\r\n\u00e9"}),
        error_reply(execute, CommandError("multi\nline")),
        event("E", {"s": "\n"}, 0, 0),
    ):
        assert line(data)
        assert data.isascii()


def test_results_that_are_not_json_are_refused() -> None:
    with pytest.raises(ValueError):
        reply(Execute("x"), float("nan"))


def test_reply_builders_are_also_connection_methods() -> None:
    conn = negotiated()
    [execute] = conn.receive_data(b'{"execute": "x", "id": 1}')
    assert isinstance(execute, Execute)
    assert conn.reply(execute, {}) == reply(execute, {})
    assert conn.error_reply(execute, CommandError("e")) == error_reply(execute, CommandError("e"))


def test_events_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Execute("x").command = "y"  # type: ignore[misc]


def test_max_message_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        QmpConnection(PACKAGE, max_message_size=0)


def test_command_not_found() -> None:
    err = command_not_found("frobnicate")
    assert err.desc == "The command frobnicate has not been found"
    assert err.error_class == "CommandNotFound"


# -- argument validation (qobject-input-visitor.c) ---------------------------------

SCHEMA = (
    Arg("fdname", str),
    Arg("remove", bool, required=False, default=False),
    Arg("backlog", int, required=False),
    Arg("addr", dict, required=False),
)


def test_check_arguments_fills_defaults_and_returns_a_new_dict() -> None:
    arguments = {"fdname": "x", "addr": {"type": "unix", "path": "/p", "extra": [1]}}
    checked = check_arguments(arguments, SCHEMA)
    assert checked == {
        "fdname": "x",
        "remove": False,
        "backlog": None,
        "addr": {"type": "unix", "path": "/p", "extra": [1]},
    }
    assert checked is not arguments


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({}, "Parameter 'fdname' is missing"),
        ({"remove": True}, "Parameter 'fdname' is missing"),
        ({"fdname": 1}, "Invalid parameter type for 'fdname', expected: string"),
        ({"fdname": None}, "Invalid parameter type for 'fdname', expected: string"),
        ({"fdname": "x", "remove": 1}, "Invalid parameter type for 'remove', expected: boolean"),
        ({"fdname": "x", "remove": None}, "Invalid parameter type for 'remove', expected: boolean"),
        (
            {"fdname": "x", "backlog": True},
            "Invalid parameter type for 'backlog', expected: integer",
        ),
        (
            {"fdname": "x", "backlog": 1.0},
            "Invalid parameter type for 'backlog', expected: integer",
        ),
        (
            {"fdname": "x", "backlog": "1"},
            "Invalid parameter type for 'backlog', expected: integer",
        ),
        (
            {"fdname": "x", "backlog": 2**63},
            "Invalid parameter type for 'backlog', expected: integer",
        ),
        ({"fdname": "x", "addr": []}, "Invalid parameter type for 'addr', expected: object"),
        ({"fdname": "x", "foo": 1}, "Parameter 'foo' is unexpected"),
        # Declared arguments are checked before unknown ones, in order.
        ({"foo": 1, "fdname": 2}, "Invalid parameter type for 'fdname', expected: string"),
        ({"foo": 1, "bar": 2, "fdname": "x"}, "Parameter 'foo' is unexpected"),
    ],
)
def test_check_arguments_errors(arguments: dict[str, Any], desc: str) -> None:
    with pytest.raises(CommandError) as info:
        check_arguments(arguments, SCHEMA)
    assert info.value.desc == desc
    assert info.value.error_class == "GenericError"


def test_check_arguments_other_types() -> None:
    schema = (
        Arg("n", float),
        Arg("l", list, items=int),
        Arg("o", (str, type(None))),
        Arg("a", object),
    )
    assert check_arguments({"n": 1, "l": [1, -(2**63)], "o": None, "a": [{}]}, schema) == {
        "n": 1,
        "l": [1, -(2**63)],
        "o": None,
        "a": [{}],
    }
    assert check_arguments({"n": 0.5, "l": [], "o": "s", "a": None}, schema)["o"] == "s"
    for arguments, desc in [
        ({"n": True, "l": [], "o": "", "a": 1}, "Invalid parameter type for 'n', expected: number"),
        ({"n": 1, "l": {}, "o": "", "a": 1}, "Invalid parameter type for 'l', expected: array"),
        (
            {"n": 1, "l": [1, "2"], "o": "", "a": 1},
            "Invalid parameter type for 'l[1]', expected: integer",
        ),
        (
            {"n": 1, "l": [], "o": 1, "a": 1},
            "Invalid parameter type for 'o', expected: string or null",
        ),
        ({"n": 1, "l": [], "o": ""}, "Parameter 'a' is missing"),
    ]:
        with pytest.raises(CommandError) as info:
            check_arguments(arguments, schema)
        assert info.value.desc == desc


def test_arg_refuses_unsupported_types() -> None:
    with pytest.raises(ValueError):
        Arg("x", bytes)
    with pytest.raises(ValueError):
        Arg("x", list, items=set)


# -- properties --------------------------------------------------------------------


def check_events(events: list[Event]) -> None:
    """Only events come out; every Send is one JSON reply line."""
    for e in events:
        assert isinstance(e, Execute | Send | Closed)
        if isinstance(e, Send):
            message = line(e.data)
            assert set(message) <= {"return", "error", "id"}
        if isinstance(e, Execute):
            assert isinstance(e.command, str)
            assert isinstance(e.arguments, dict)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    return [c for c in chunks if c]


json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
commands = st.builds(
    lambda name, arguments, id_, has_id: (name, arguments, id_, has_id),
    st.text(min_size=1, max_size=12).filter(lambda s: s != "qmp_capabilities"),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    json_values,
    st.booleans(),
)


def encode_command(command: tuple[str, dict[str, Any], Any, bool], style: int) -> bytes:
    name, arguments, id_, has_id = command
    message: dict[str, Any] = {"execute": name}
    if arguments or style % 2:
        message["arguments"] = arguments
    if has_id:
        message["id"] = id_
    separators = (",", ":") if style % 3 == 0 else (", ", ": ")
    text = json.dumps(message, separators=separators, ensure_ascii=bool(style % 5))
    return text.encode() + [b"", b"\n", b"\r\n", b" \t "][style % 4]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(commands, st.integers(0, 59)), max_size=6), st.lists(st.integers(0, 10**6))
)
def test_split_anywhere_gives_the_same_executes(
    items: list[tuple[tuple[str, dict[str, Any], Any, bool], int]], cuts: list[int]
) -> None:
    data = CAPABILITIES + b"".join(encode_command(c, style) for c, style in items)
    whole = connect().receive_data(data)
    expected = [
        Execute(name, arguments, id_ if has_id else None, has_id)
        for (name, arguments, id_, has_id), _ in items
    ]
    assert executes(whole) == expected
    assert feed_chunks(connect(), split(data, cuts)) == whole


@settings(max_examples=500)
@given(st.binary(max_size=300), st.lists(st.integers(0, 10**6), max_size=8))
def test_random_bytes_only_make_events(data: bytes, cuts: list[int]) -> None:
    conn = negotiated(max_message_size=64)
    events = feed_chunks(conn, split(data, cuts))
    events += conn.receive_data(b"")
    check_events(events)
    assert events[-1] == Closed()
    assert Closed() not in events[:-1]


# Bytes that matter to the framing, and some that do not.
interesting_bytes = st.lists(
    st.sampled_from(
        [
            b"{",
            b"}",
            b"[",
            b"]",
            b'"',
            b"'",
            b"\\",
            b":",
            b",",
            b" ",
            b"\n",
            b"\t",
            b"\x00",
            b"\xff",
            b"\xc3\xa9",
            b"a",
            b"1",
            b"-",
            b".",
            b"e",
            b"true",
            b"X",
            b'"execute"',
            CAPABILITIES,
            b'{"execute": "x"}',
        ]
    ),
    max_size=60,
).map(b"".join)


@settings(max_examples=500)
@given(interesting_bytes | st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=8))
def test_events_do_not_depend_on_how_the_input_is_split(data: bytes, cuts: list[int]) -> None:
    whole = connect(max_message_size=24)
    expected = whole.receive_data(data) + whole.receive_data(b"")
    check_events(expected)
    chunked = connect(max_message_size=24)
    assert feed_chunks(chunked, [*split(data, cuts), b""]) == expected


@st.composite
def mutated_commands(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_command(draw(commands), draw(st.integers(0, 59))))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 3))
        at = draw(st.integers(0, len(data)))
        if kind == 0:
            del data[at : at + draw(st.integers(1, 5))]
        elif kind == 1:
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif kind == 2:
            data[at:at] = draw(
                st.sampled_from([b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b"\x00", b"\xff"])
            )
        else:
            data = data[:at]
    return bytes(data)


@settings(max_examples=500)
@given(
    st.lists(mutated_commands(), min_size=1, max_size=4),
    st.lists(st.integers(0, 10**6), max_size=6),
)
def test_truncated_and_mutated_commands_only_make_events(
    parts: list[bytes], cuts: list[int]
) -> None:
    conn = connect(max_message_size=200)
    events = feed_chunks(conn, split(CAPABILITIES + b"".join(parts), cuts))
    events += conn.receive_data(b"")
    check_events(events)
    assert events[-1] == Closed()


@settings(max_examples=300)
@given(st.binary(max_size=200), st.sampled_from([b"\x00", b"\x1b", b"\xff"]))
def test_a_reset_byte_always_resynchronises(garbage: bytes, reset: bytes) -> None:
    conn = negotiated(max_message_size=64)
    events = conn.receive_data(garbage + reset + b'{"execute": "after", "id": "sync"}')
    check_events(events)
    assert events[-1] == Execute("after", {}, "sync", True)


whole_commands = (
    st.builds(encode_command, commands, st.integers(0, 59))
    | mutated_commands()
    | st.sampled_from(
        [
            b'{"a": {]}',
            b'{"a": [}}',
            b'{"a": {"b": 1}]}',
            b'{"a": [1, {"b": 2}]}',
            b'{"execute": "x"}}',
            b'{"execute": "x"}]',
            b"{}",
            b' \t{"execute": "x"} \r\n',
            b"{'execute': 'x'}",
            b'{"execute": "it\'s", "arguments": {"a": "\\u00e9\\""}}',
            b'{"a": "\x01"}',
            b'{"a": "\\\x01"}',
            b'{"a": 1e999}',
            b'{"a": 1, "a": 2}',
            b'{"a": "\\ud800"}',
            b'{"a": "\xff"}',
            b'{"a": NaN}',
            b"{'{'}}",
            b"{'}'}",
            b'{"a": "}"}',
            b'{"a": 1\x10}',
            b'{"a":\x00 1}',
            b'{"a": 1\xfe}',
        ]
    )
)


@settings(max_examples=600)
@given(
    st.lists(interesting_bytes | whole_commands, max_size=2).map(b"".join),
    whole_commands,
    st.integers(31, 400),
)
def test_a_message_read_whole_gives_what_scanning_it_byte_by_byte_gives(
    before: bytes, message: bytes, limit: int
) -> None:
    # receive_data() hands a chunk that is exactly one message to the decoder
    # without scanning it; whatever came before, the events and the state left
    # behind (seen by the message after it) must be those of the byte scanner.
    after = b'{"execute": "after", "id": 1}'
    chunked = negotiated(max_message_size=limit)
    events = feed_chunks(chunked, [c for c in (before, message, after) if c] + [b""])
    bytewise = negotiated(max_message_size=limit)
    data = before + message + after
    expected = feed_chunks(bytewise, [data[i : i + 1] for i in range(len(data))] + [b""])
    check_events(expected)
    assert events == expected


json_replies = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300)
@given(json_replies, json_values, st.booleans())
def test_replies_are_what_the_json_module_writes(value: Any, id_: Any, has_id: bool) -> None:
    # The encoder is built once (not per reply); its bytes must stay those of
    # json.dumps with QEMU's separators and \uXXXX escapes.
    request = Execute("x", {}, id_, has_id)
    message = {"return": value, "id": id_} if has_id else {"return": value}
    assert reply(request, value) == json.dumps(message, allow_nan=False).encode() + b"\r\n"
    error = CommandError("d\u00e9j\u00e0 vu \U0001f600", "GenericError")
    body = {"class": "GenericError", "desc": error.desc}
    message = {"error": body, "id": id_} if has_id else {"error": body}
    assert error_reply(request, error) == json.dumps(message).encode() + b"\r\n"


def test_a_reply_that_json_cannot_spell_is_refused() -> None:
    request = Execute("x", {})
    for bad in (float("nan"), float("inf"), {"a": [float("-inf")]}):
        with pytest.raises(ValueError):
            reply(request, bad)
    with pytest.raises(TypeError):
        reply(request, {"a": object()})
