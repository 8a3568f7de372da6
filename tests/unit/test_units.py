"""Unit files: YAML → validated Unit, every error with file:line:col and key path."""

from __future__ import annotations

import math
import os
import signal
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdsupervisor.addresses import FdAddress, InetAddress, UnixAddress, VsockAddress
from fdsupervisor.errors import ConfigError, ConfigErrors, Location
from fdsupervisor.units import (
    MAX_UNIT_FILE_SIZE,
    Activation,
    FdStorePreserve,
    RestartPolicy,
    ServiceSpec,
    SocketKind,
    SocketSpec,
    Unit,
    check_placeholders,
    expand_placeholders,
    load_unit_file,
    load_unit_text,
    load_units,
    placeholder_names,
    unit_from_command_line,
)

BASE = Path("/srv/units")
SOURCE = BASE / "web.yaml"

MINIMAL = """\
sockets:
  http:
    listen: "127.0.0.1:8080"
service:
  exec: [app, "--fd={fd:http}"]
"""
WITH_SOCKET = MINIMAL.replace('  exec: [app, "--fd={fd:http}"]\n', "")


def load(text: str) -> Unit:
    return load_unit_text(textwrap.dedent(text), SOURCE, BASE)


def errors(text: str) -> list[str]:
    """Every error of a unit text, rendered."""
    with pytest.raises(ConfigErrors) as info:
        load(text)
    assert info.value.errors, "ConfigErrors without errors"
    return [str(error) for error in info.value.errors]


def error(text: str) -> str:
    """The one error of a unit text, rendered."""
    found = errors(text)
    assert len(found) == 1, found
    return found[0]


def _service_text(lines: str) -> str:
    """A unit with one socket ``http`` and these service lines, which start on line 6.

    ``exec: [app]`` (line 5) is added unless the lines give ``exec``.
    """
    lines = textwrap.indent(textwrap.dedent(lines), "  ")
    if "exec:" in lines:
        return WITH_SOCKET + lines
    return WITH_SOCKET + "  exec: [app]\n" + lines


def service_error(lines: str) -> str:
    """The one error of a unit with one socket and these service lines."""
    return error(_service_text(lines))


def service(lines: str) -> ServiceSpec:
    return load(_service_text(lines)).service


def socket(lines: str) -> SocketSpec:
    text = "service: {exec: [app]}\nsockets:\n  s:\n" + textwrap.indent(
        textwrap.dedent(lines), "    "
    )
    return load(text).sockets[0]


def socket_error(lines: str) -> str:
    text = "service: {exec: [app]}\nsockets:\n  s:\n" + textwrap.indent(
        textwrap.dedent(lines), "    "
    )
    return error(text)


# --------------------------------------------------------------------------- a full unit


def test_full_unit() -> None:
    unit = load(
        """\
        sockets:
          http:
            listen: "127.0.0.1:8080"
            kind: stream
            backlog: 256
            reuse-port: true
            keep-alive: yes
            no-delay: on
            free-bind: true
            receive-buffer: 1M
            send-buffer: 65536
          v6:
            listen: {type: inet, host: "::", port: "8080", ipv4: false}
          admin:
            listen: {type: unix, path: run/admin.sock}
            mode: "0660"
            user: www-data
            group: "1000"
            directory-mode: 0750
          abstract:
            listen: {type: unix, path: web, abstract: true}
          vm:
            listen: {type: vsock, cid: "4294967295", port: "1234"}
            kind: seqpacket
          inherited:
            listen: {type: fd, str: "3"}
          logs:
            listen: "@logs"
            kind: datagram
        service:
          exec: [python3, -m, app, "--listen-fd={fd:http}", yes, 1.10, "{instance}", "{x}"]
          environment: {APP_ENV: prod, N: 1.10, ADMIN: "{fd:admin}", FLAG: no}
          clear-environment: true
          working-directory: app
          user: app
          group: app
          activation: eager
          instances: 4
          restart: always
          restart-delay: 100ms
          restart-delay-max: 1min
          start-limit: {burst: 3, interval: 20s}
          stop-signal: SIGINT
          stop-timeout: infinity
          notify: true
          start-timeout: 1min 30s
          watchdog: 30s
          fd-store-max: 16
        """
    )
    assert unit.name == "web"
    assert unit.source == SOURCE
    assert unit.base_dir == BASE
    assert unit.socket_names == ("http", "v6", "admin", "abstract", "vm", "inherited", "logs")
    http, v6, admin, abstract, vm, inherited, logs = unit.sockets
    assert http == SocketSpec(
        name="http",
        address=InetAddress("127.0.0.1", "8080"),
        backlog=256,
        reuse_port=True,
        keep_alive=True,
        no_delay=True,
        free_bind=True,
        receive_buffer=1024 * 1024,
        send_buffer=65536,
    )
    assert http.location == Location(str(SOURCE), 3, 13)
    assert v6.address == InetAddress("::", "8080", ipv4=False)
    assert admin.address == UnixAddress("/srv/units/run/admin.sock")
    assert (admin.mode, admin.user, admin.group, admin.directory_mode) == (
        0o660,
        "www-data",
        "1000",
        0o750,
    )
    assert abstract.address == UnixAddress("web", abstract=True)
    assert vm.address == VsockAddress("4294967295", "1234")
    assert vm.kind is SocketKind.SEQPACKET
    assert inherited.address == FdAddress("3")
    assert logs.kind is SocketKind.DATAGRAM
    assert unit.service == ServiceSpec(
        exec=("python3", "-m", "app", "--listen-fd={fd:http}", "yes", "1.10", "{instance}", "{x}"),
        environment=(("APP_ENV", "prod"), ("N", "1.10"), ("ADMIN", "{fd:admin}"), ("FLAG", "no")),
        clear_environment=True,
        working_directory="/srv/units/app",
        user="app",
        group="app",
        activation=Activation.EAGER,
        instances=4,
        restart=RestartPolicy.ALWAYS,
        restart_delay=0.1,
        restart_delay_max=60.0,
        start_limit_burst=3,
        start_limit_interval=20.0,
        stop_signal=signal.SIGINT,
        stop_timeout=math.inf,
        notify=True,
        start_timeout=90.0,
        watchdog=30.0,
        fd_store_max=16,
    )


def test_defaults() -> None:
    unit = load(MINIMAL)
    assert unit.sockets == (SocketSpec("http", InetAddress("127.0.0.1", "8080")),)
    assert unit.service == ServiceSpec(exec=("app", "--fd={fd:http}"))


def test_unit_without_sockets_is_eager() -> None:
    unit = load("service: {exec: [app]}")
    assert unit.sockets == ()
    unit = load("sockets: {}\nservice: {exec: [app]}")
    assert unit.sockets == ()


def test_name_key_overrides_file_stem() -> None:
    assert load("name: other\nservice: {exec: [app]}").name == "other"


def test_absolute_paths_stay() -> None:
    sock = socket("listen: unix:/run/x.sock\n")
    assert sock.address == UnixAddress("/run/x.sock")
    assert service("working-directory: /srv/app\n").working_directory == "/srv/app"


def test_relative_base_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    unit = load_unit_text(
        "sockets: {s: {listen: 'unix:x.sock'}}\nservice: {exec: [a]}", Path("u.yaml"), Path(".")
    )
    assert unit.sockets[0].address == UnixAddress(str(tmp_path / "x.sock"))


# --------------------------------------------------------------------------- the rendering contract


def test_error_renders_file_line_column_and_key_path() -> None:
    text = """\
    service:
      exec: [app]
    sockets:
      http:
        kind: stream
        listen:
          port: 99999
          type: inet
          host: "::"
    """
    assert (
        error(text)
        == "/srv/units/web.yaml:7:13: sockets.http.listen.port: port 99999 is out of range 0..65535"
    )


def test_error_in_shorthand_points_at_the_string_with_the_member_path() -> None:
    text = """\
    sockets:
      http:
        listen: "127.0.0.1:99999"
    service: {exec: [app]}
    """
    assert error(text) == (
        "/srv/units/web.yaml:3:13: sockets.http.listen.port: port 99999 is out of range 0..65535"
    )


def test_address_error_without_member_path_points_at_listen() -> None:
    assert socket_error("listen: localhost\n").startswith(
        "/srv/units/web.yaml:4:13: sockets.s.listen: invalid address 'localhost': expected HOST:PORT"
    )


def test_missing_address_member_points_at_the_mapping() -> None:
    assert socket_error("listen: {type: inet, port: 80}\n") == (
        "/srv/units/web.yaml:4:13: sockets.s.listen.host: missing required key 'host'"
    )


# --------------------------------------------------------------------------- YAML level


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "service: [\n",
            "/srv/units/web.yaml:2:1: invalid YAML: expected the node content, but found '<stream end>' (while parsing a flow node)",
        ),
        ("a: b: c\n", "/srv/units/web.yaml:1:5: invalid YAML: mapping values are not allowed here"),
        (
            "service: {exec: [a]}\n---\nservice: {}\n",
            "/srv/units/web.yaml:2:1: invalid YAML: but found another document (expected a single document in the stream)",
        ),
        (
            "service: *nope\n",
            "/srv/units/web.yaml:1:10: invalid YAML: found undefined alias 'nope'",
        ),
        (
            "service: {exec: [a]}\n\x07\n",
            "/srv/units/web.yaml:2:1: invalid YAML: character '\\x07' is not allowed: special characters are not allowed",
        ),
        (
            "",
            "/srv/units/web.yaml:1:1: the unit file is empty; a unit needs at least 'service' with 'exec'",
        ),
        (
            "# only a comment\n",
            "/srv/units/web.yaml:1:1: the unit file is empty; a unit needs at least 'service' with 'exec'",
        ),
        ("[1, 2]\n", "/srv/units/web.yaml:1:1: expected a mapping, got a list"),
        ("just text\n", "/srv/units/web.yaml:1:1: expected a mapping, got 'just text'"),
        ("~\n", "/srv/units/web.yaml:1:1: expected a mapping, got null"),
    ],
)
def test_yaml_errors(text: str, expected: str) -> None:
    assert error(text) == expected


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    assert "invalid YAML" in error("service: " + "[" * 5000 + "]" * 5000)


def test_duplicate_keys() -> None:
    assert errors("service: {exec: [a]}\nservice: {exec: [b]}\n") == [
        "/srv/units/web.yaml:2:1: service: duplicate key 'service' (first on line 1)"
    ]
    text = """\
    sockets:
      a: {listen: ":1"}
      a: {listen: ":2"}
    service: {exec: [app], user: x, user: y}
    """
    assert errors(text) == [
        "/srv/units/web.yaml:3:3: sockets.a: duplicate key 'a' (first on line 2)",
        "/srv/units/web.yaml:4:33: service.user: duplicate key 'user' (first on line 4)",
    ]


def test_unknown_keys_with_suggestions() -> None:
    assert errors("servce: {exec: [a]}\n") == [
        "/srv/units/web.yaml:1:1: unknown key 'servce'; did you mean 'service'?",
        "/srv/units/web.yaml:1:1: missing required key 'service'",
    ]
    assert service_error("notfy: true\n") == (
        "/srv/units/web.yaml:6:3: service: unknown key 'notfy'; did you mean 'notify'?"
    )
    assert socket_error("listen: ':1'\nbaklog: 3\n") == (
        "/srv/units/web.yaml:5:5: sockets.s: unknown key 'baklog'; did you mean 'backlog'?"
    )
    assert error("service: {exec: [a]}\nzzz: 1\n") == (
        "/srv/units/web.yaml:2:1: unknown key 'zzz'; valid keys: name, sockets, service"
    )
    assert error("service: {exec: [a], start-limit: {burts: 3}}\n").endswith(
        "service.start-limit: unknown key 'burts'; did you mean 'burst'?"
    )
    assert socket_error("listen: {type: inet, host: h, port: 1, keep_alive: true}\n") == (
        "/srv/units/web.yaml:4:56: sockets.s.listen.keep_alive: "
        "unknown key 'keep_alive'; did you mean 'keep-alive'?"
    )


def test_keys_must_be_strings_and_merge_keys_are_refused() -> None:
    assert error("? [a]\n: 1\nservice: {exec: [a]}\n") == (
        "/srv/units/web.yaml:1:3: a key must be a string, got a list"
    )
    text = """\
    base: &base {exec: [a]}
    service:
      <<: *base
    """
    assert errors(text) == [
        "/srv/units/web.yaml:1:1: unknown key 'base'; valid keys: name, sockets, service",
        "/srv/units/web.yaml:3:3: service: YAML merge keys ('<<') are not supported; write the keys out",
        "/srv/units/web.yaml:3:3: service: missing required key 'exec'",
    ]


def test_unsupported_tag() -> None:
    assert service_error("user: !custom x\n") == (
        "/srv/units/web.yaml:6:9: service.user: unsupported YAML tag '!custom'"
    )


def test_recursive_alias_does_not_loop() -> None:
    assert error("service: &s {exec: [a], environment: *s}\n") == (
        "/srv/units/web.yaml:1:20: service.environment.exec: expected a string, got a list"
    )


def test_aliases_work() -> None:
    text = """\
    sockets:
      a: {listen: &addr ":1"}
    service: {exec: [app, *addr]}
    """
    assert load(text).service.exec == ("app", ":1")


def test_all_errors_of_a_file_are_reported() -> None:
    text = """\
    sockets:
      3bad: {listen: ":80"}
      good: {listen: ":99999", backlog: 0}
    service:
      exec: []
      restart: maybe
      stop-signal: SIGNOPE
    """
    assert errors(text) == [
        "/srv/units/web.yaml:2:3: sockets.3bad: invalid socket name '3bad': it starts with a digit; "
        "a name is 1 to 255 characters of A-Z a-z 0-9 _ . - and does not start with a digit",
        "/srv/units/web.yaml:3:18: sockets.good.listen.port: port 99999 is out of range 0..65535",
        "/srv/units/web.yaml:3:37: sockets.good.backlog: expected an integer from 1 to 65535, got 0",
        "/srv/units/web.yaml:5:9: service.exec: must not be empty: give the program and its arguments",
        "/srv/units/web.yaml:6:12: service.restart: expected one of no, on-failure, always, got 'maybe'",
        "/srv/units/web.yaml:7:16: service.stop-signal: expected a signal name such as SIGTERM or "
        "TERM, or its number, got 'SIGNOPE'",
    ]


# --------------------------------------------------------------------------- names


def test_name_errors() -> None:
    assert error("name: 3x\nservice: {exec: [a]}\n") == (
        "/srv/units/web.yaml:1:7: name: invalid unit name '3x': it starts with a digit; "
        "a name is 1 to 255 characters of A-Z a-z 0-9 _ . - and does not start with a digit"
    )
    assert error("name: [x]\nservice: {exec: [a]}\n") == (
        "/srv/units/web.yaml:1:7: name: expected a string, got a list"
    )
    with pytest.raises(ConfigErrors) as info:
        load_unit_text("service: {exec: [a]}", Path("/u/my web.yaml"), Path("/u"))
    assert str(info.value) == (
        "/u/my web.yaml: name: the file name gives no valid unit name: invalid unit name "
        "'my web': it contains ' '; a name is 1 to 255 characters of A-Z a-z 0-9 _ . - and "
        "does not start with a digit; rename the file or set 'name:'"
    )
    # name: makes any file name usable
    assert (
        load_unit_text("name: ok\nservice: {exec: [a]}", Path("/u/my web.yaml"), Path("/u")).name
        == "ok"
    )


def test_socket_name_errors() -> None:
    assert error("sockets: {'a b': {listen: ':1'}}\nservice: {exec: [a]}\n").startswith(
        "/srv/units/web.yaml:1:11: sockets.a b: invalid socket name 'a b': it contains ' '"
    )
    assert error("sockets: {~: {listen: ':1'}}\nservice: {exec: [a]}\n").startswith(
        "/srv/units/web.yaml:1:11: sockets.~: expected a string, got null"
    )


# --------------------------------------------------------------------------- sockets


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("kind: datagram\n", "/srv/units/web.yaml:4:5: sockets.s: missing required key 'listen'"),
        (
            "listen: ~\n",
            "/srv/units/web.yaml:4:13: sockets.s.listen: expected an address string or mapping, got null",
        ),
        (
            "listen: [a]\n",
            "/srv/units/web.yaml:4:13: sockets.s.listen: expected an address string or mapping, got a list",
        ),
        (
            "listen: ':1'\nkind: strem\n",
            "/srv/units/web.yaml:5:11: sockets.s.kind: expected one of stream, datagram, seqpacket, fifo, got 'strem'",
        ),
        (
            "listen: ':1'\nbacklog: 0\n",
            "/srv/units/web.yaml:5:14: sockets.s.backlog: expected an integer from 1 to 65535, got 0",
        ),
        (
            "listen: ':1'\nbacklog: 65536\n",
            "/srv/units/web.yaml:5:14: sockets.s.backlog: expected an integer from 1 to 65535, got 65536",
        ),
        (
            "listen: ':1'\nbacklog: abc\n",
            "/srv/units/web.yaml:5:14: sockets.s.backlog: expected an integer, got 'abc'",
        ),
        (
            "listen: ':1'\nbacklog: '128'\n",
            "/srv/units/web.yaml:5:14: sockets.s.backlog: expected an integer, got '128'",
        ),
        (
            "listen: ':1'\nbacklog: 1:30\n",
            "/srv/units/web.yaml:5:14: sockets.s.backlog: expected an integer, got '1:30'",
        ),
        (
            "listen: ':1'\nbacklog: 1.5\n",
            "/srv/units/web.yaml:5:14: sockets.s.backlog: expected an integer, got '1.5'",
        ),
        (
            "listen: ':1'\nbacklog:\n",
            "/srv/units/web.yaml:5:13: sockets.s.backlog: expected an integer, got null",
        ),
        (
            "listen: ':1'\nreuse-port: 'true'\n",
            "/srv/units/web.yaml:5:17: sockets.s.reuse-port: expected a boolean (true or false), got 'true'",
        ),
        (
            "listen: ':1'\nreuse-port: 1\n",
            "/srv/units/web.yaml:5:17: sockets.s.reuse-port: expected a boolean (true or false), got '1'",
        ),
        (
            "listen: ':1'\nreceive-buffer: 0\n",
            "/srv/units/web.yaml:5:21: sockets.s.receive-buffer: the size must be from 1 to 2147483647 bytes, got 0",
        ),
        (
            "listen: ':1'\nreceive-buffer: 2G\n",
            "/srv/units/web.yaml:5:21: sockets.s.receive-buffer: the size must be from 1 to 2147483647 bytes, got 2147483648",
        ),
        (
            "listen: ':1'\nsend-buffer: 1T\n",
            "/srv/units/web.yaml:5:18: sockets.s.send-buffer: expected a size in bytes, optionally with K, M or G, got '1T'",
        ),
        (
            "listen: ':1'\nsend-buffer: true\n",
            "/srv/units/web.yaml:5:18: sockets.s.send-buffer: expected a size in bytes, optionally with K, M or G, got 'true'",
        ),
        (
            "listen: unix:/x\nmode: '0668'\n",
            "/srv/units/web.yaml:5:11: sockets.s.mode: expected an octal file mode from 0 to 7777 such as '0660', got '0668'",
        ),
        (
            "listen: unix:/x\nmode: 17777\n",
            "/srv/units/web.yaml:5:11: sockets.s.mode: expected an octal file mode from 0 to 7777 such as '0660', got '17777'",
        ),
        (
            "listen: unix:/x\nmode: rw\n",
            "/srv/units/web.yaml:5:11: sockets.s.mode: expected an octal file mode from 0 to 7777 such as '0660', got 'rw'",
        ),
        (
            "listen: unix:/x\nuser: ''\n",
            "/srv/units/web.yaml:5:11: sockets.s.user: must not be empty",
        ),
        (
            'listen: unix:/x\ngroup: "a\\0b"\n',
            "/srv/units/web.yaml:5:12: sockets.s.group: must not contain a NUL character",
        ),
    ],
)
def test_socket_value_errors(lines: str, expected: str) -> None:
    assert socket_error(lines) == expected


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("0660", 0o660),
        ("660", 0o660),
        ("'0660'", 0o660),
        ("0o660", 0o660),
        ("7777", 0o7777),
        ("0", 0),
    ],
)
def test_modes_are_always_octal(text: str, mode: int) -> None:
    assert socket(f"listen: unix:/x\nmode: {text}\n").mode == mode
    assert socket(f"listen: unix:/x\ndirectory-mode: {text}\n").directory_mode == mode


@pytest.mark.parametrize(
    ("text", "size"), [("1", 1), ("4K", 4096), ("8M", 8 << 20), ("1G", 1 << 30), ("'512'", 512)]
)
def test_buffer_sizes(text: str, size: int) -> None:
    assert socket(f"listen: ':1'\nreceive-buffer: {text}\n").receive_buffer == size


def test_sockets_must_be_a_mapping_of_mappings() -> None:
    assert error("sockets: [a]\nservice: {exec: [a]}\n") == (
        "/srv/units/web.yaml:1:10: sockets: expected a mapping, got a list"
    )
    assert error("sockets: {a: ':80'}\nservice: {exec: [a]}\n") == (
        "/srv/units/web.yaml:1:14: sockets.a: expected a mapping, got ':80'"
    )


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            "listen: ':1'\nmode: '0600'\n",
            "/srv/units/web.yaml:5:5: sockets.s.mode: 'mode' applies to unix sockets with a path and to FIFOs only",
        ),
        (
            "listen: '@a'\nuser: x\n",
            "/srv/units/web.yaml:5:5: sockets.s.user: 'user' applies to unix sockets with a path and to FIFOs only",
        ),
        (
            "listen: fd:3\ngroup: x\n",
            "/srv/units/web.yaml:5:5: sockets.s.group: 'group' applies to unix sockets with a path and to FIFOs only",
        ),
        (
            "listen: vsock:1:2\ndirectory-mode: 700\n",
            "/srv/units/web.yaml:5:5: sockets.s.directory-mode: 'directory-mode' applies to unix sockets with a path and to FIFOs only",
        ),
        (
            "listen: unix:/x\nreuse-port: true\n",
            "/srv/units/web.yaml:5:5: sockets.s.reuse-port: 'reuse-port' applies to inet sockets only",
        ),
        (
            "listen: fd:3\nfree-bind: true\n",
            "/srv/units/web.yaml:5:5: sockets.s.free-bind: 'free-bind' applies to inet sockets only",
        ),
        (
            "listen: unix:/x\nkeep-alive: true\n",
            "/srv/units/web.yaml:5:5: sockets.s.keep-alive: 'keep-alive' applies to inet stream (TCP) sockets only",
        ),
        (
            "listen: ':1'\nkind: datagram\nno-delay: true\n",
            "/srv/units/web.yaml:6:5: sockets.s.no-delay: 'no-delay' applies to inet stream (TCP) sockets only",
        ),
        (
            "listen: ':1'\nkind: datagram\nbacklog: 5\n",
            "/srv/units/web.yaml:6:5: sockets.s.backlog: 'backlog' applies to stream and seqpacket sockets that fdsupervisor binds, not to datagram sockets, FIFOs or inherited fds (already listening)",
        ),
        (
            "listen: fd:3\nbacklog: 5\n",
            "/srv/units/web.yaml:5:5: sockets.s.backlog: 'backlog' applies to stream and seqpacket sockets that fdsupervisor binds, not to datagram sockets, FIFOs or inherited fds (already listening)",
        ),
        (
            "listen: ':1'\nkind: seqpacket\n",
            "/srv/units/web.yaml:5:11: sockets.s.kind: seqpacket needs a unix or vsock address (inet has no seqpacket sockets without SCTP)",
        ),
        (
            "listen: vsock:1:2\nkind: datagram\n",
            "/srv/units/web.yaml:5:11: sockets.s.kind: vsock sockets are stream or seqpacket",
        ),
    ],
)
def test_socket_keys_that_do_not_apply(lines: str, expected: str) -> None:
    assert socket_error(lines) == expected


def test_socket_keys_that_do_apply() -> None:
    assert socket("listen: fd:3\nkeep-alive: true\nno-delay: true\nsend-buffer: 1K\n").keep_alive
    assert socket("listen: unix:/x\nkind: seqpacket\nbacklog: 5\n").backlog == 5
    assert socket("listen: '@x'\nkind: datagram\n").kind is SocketKind.DATAGRAM


def test_seed_rule_in_unit_files() -> None:
    message = socket_error('listen: {type: fd, str: "vm0-mon"}\n')
    assert message == (
        "/srv/units/web.yaml:4:29: sockets.s.listen.str: fd 'vm0-mon': named file descriptors "
        "are only permitted in monitor commands; here give the number of an fd the supervisor "
        "inherited, such as '3'"
    )
    assert "named file descriptors are only permitted in monitor commands" in socket_error(
        "listen: fd:name\n"
    )
    assert socket("listen: {type: fd, str: 3}\n").address == FdAddress("3")


def test_address_mapping_values_are_typed_as_yaml_reads_them() -> None:
    assert socket("listen: {type: inet, host: h, port: 80, to: 90, ipv6: off}\n").address == (
        InetAddress("h", "80", to=90, ipv6=False)
    )
    assert socket("listen: {type: vsock, cid: 3, port: 0x10}\n").address == VsockAddress("3", "16")
    assert "sockets.s.listen.port: invalid port '1:30'" in socket_error(
        "listen: {type: inet, host: h, port: 1:30}\n"
    )
    assert socket_error("listen: {type: unix, path: 123}\n") == (
        "/srv/units/web.yaml:4:32: sockets.s.listen.path: expected a string, got 123"
    )
    assert socket_error("listen: {type: unix, path: /x, abstract: [1]}\n").endswith(
        "sockets.s.listen.abstract: expected a boolean (true or false), got a list"
    )
    assert socket_error("listen: {type: inet, host: h, port: 1, to: 0.5}\n").endswith(
        "sockets.s.listen.to: expected a port number, got 0.5"
    )
    assert socket_error("listen: {type: inet, host: h, port: 1, ipv4: ~}\n").endswith(
        "sockets.s.listen.ipv4: expected a boolean (true or false), got null"
    )
    assert socket_error("listen: {type: inet, host: h, port: {}}\n").endswith(
        "sockets.s.listen.port: expected a string, got a mapping"
    )


def test_shorthand_is_read_as_written() -> None:
    # YAML 1.1 would read an unquoted 8:80 as the sexagesimal int 520.
    assert socket("listen: 8:80\n").address == InetAddress("8", "80")


def test_relative_unix_path_too_long_once_resolved() -> None:
    path = "x" * 100
    assert socket_error(f"listen: unix:{path}\n") == (
        "/srv/units/web.yaml:4:13: sockets.s.listen.path: the unix socket path is 111 bytes long; "
        "at most 107 fit in sun_path (resolved against /srv/units)"
    )


# --------------------------------------------------------------------------- service


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("restart: no\n", RestartPolicy.NO),
        ("restart: 'no'\n", RestartPolicy.NO),
        ("restart: off\n", RestartPolicy.NO),
        ("restart: false\n", RestartPolicy.NO),
        ("restart: always\n", RestartPolicy.ALWAYS),
        ("restart: on-failure\n", RestartPolicy.ON_FAILURE),
    ],
)
def test_restart(lines: str, expected: RestartPolicy) -> None:
    assert service(lines).restart is expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("restart: yes\n", "service.restart: expected one of no, on-failure, always, got 'yes'"),
        ("restart: 'off'\n", "service.restart: expected one of no, on-failure, always, got 'off'"),
        ("restart: [no]\n", "service.restart: expected one of no, on-failure, always, got a list"),
    ],
)
def test_restart_errors(lines: str, expected: str) -> None:
    assert service_error(lines).endswith(expected)


@pytest.mark.parametrize(
    ("lines", "signal_"),
    [
        ("stop-signal: SIGTERM\n", signal.SIGTERM),
        ("stop-signal: TERM\n", signal.SIGTERM),
        ("stop-signal: SIGKILL\n", signal.SIGKILL),
        ("stop-signal: 2\n", signal.SIGINT),
        ("stop-signal: '15'\n", signal.SIGTERM),
        ("stop-signal: RTMIN\n", signal.SIGRTMIN),
    ],
)
def test_stop_signal(lines: str, signal_: signal.Signals) -> None:
    assert service(lines).stop_signal is signal_


@pytest.mark.parametrize("value", ["sigterm", "SIGFOO", "0", "999", "-1", "''", "1.5"])
def test_stop_signal_errors(value: str) -> None:
    assert (
        "service.stop-signal: expected a signal name such as SIGTERM or TERM, or its number, got"
        in (service_error(f"stop-signal: {value}\n"))
    )


@pytest.mark.parametrize(
    ("lines", "attribute", "value"),
    [
        ("restart-delay: 250ms\n", "restart_delay", 0.25),
        ("restart-delay: 0.5\n", "restart_delay", 0.5),
        ("restart-delay: 2\n", "restart_delay", 2.0),
        ("restart-delay: '2'\n", "restart_delay", 2.0),
        ("restart-delay: 1min\n", "restart_delay_max", 60.0),  # max follows a longer delay
        ("restart-delay: 1s\nrestart-delay-max: 1s\n", "restart_delay_max", 1.0),
        ("stop-timeout: infinity\n", "stop_timeout", math.inf),
        ("start-timeout: .inf\n", "start_timeout", math.inf),
        ("watchdog: 0\n", "watchdog", 0.0),
        ("watchdog: 1min 30s\n", "watchdog", 90.0),
        ("restart-delay: 1y\n", "restart_delay", 31_557_600.0),  # the longest there is
        ("stop-timeout: 365d 6h\n", "stop_timeout", 31_557_600.0),
        ("start-limit: {interval: 0}\n", "start_limit_interval", 0.0),
        ("start-limit: {burst: 1}\n", "start_limit_burst", 1),
        ("fd-store-max: 0\n", "fd_store_max", 0),
        ("fd-store-preserve: no\n", "fd_store_preserve", FdStorePreserve.NO),
        ("fd-store-preserve: restart\n", "fd_store_preserve", FdStorePreserve.RESTART),
        ("fd-store-preserve: yes\n", "fd_store_preserve", FdStorePreserve.YES),
        ("fd-store-preserve: false\n", "fd_store_preserve", FdStorePreserve.NO),
        ("exec: [app]\n", "fd_store_preserve", FdStorePreserve.RESTART),  # systemd's default
        ("max-connections: 1\naccept: true\n", "max_connections", 1),
        ("instances: 3\n", "instances", 3),
        ("activation: on-demand\n", "activation", Activation.ON_DEMAND),
        ("clear-environment: yes\n", "clear_environment", True),
        ("notify: on\n", "notify", True),
        ("notify: on\n", "overlap", True),  # the default: rolling restarts
        ("overlap: false\n", "overlap", False),
        ("working-directory: ../app\n", "working_directory", "/srv/units/../app"),
        (
            "exec: app --flag 'two words' \"{fd:http}\"\n",
            "exec",
            ("app", "--flag", "two words", "{fd:http}"),
        ),
        ("exec: [app, 0x10, ~x]\n", "exec", ("app", "0x10", "~x")),
        (
            "environment: {A: 1, B: '', C: 0660}\n",
            "environment",
            (("A", "1"), ("B", ""), ("C", "0660")),
        ),
    ],
)
def test_service_values(lines: str, attribute: str, value: object) -> None:
    assert getattr(service(lines), attribute) == value


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            "restart-delay: -1s\n",
            "service.restart-delay: a duration must not be negative, got '-1s'",
        ),
        (
            "restart-delay: 10x\n",
            "service.restart-delay: invalid duration '10x': expected a number of seconds or a time span such as 250ms, 10s, 2min, 1h or '1min 30s'",
        ),
        (
            "restart-delay: 1:30\n",
            "service.restart-delay: invalid duration '1:30': expected a number of seconds or a time span such as 250ms, 10s, 2min, 1h or '1min 30s'",
        ),
        (
            "restart-delay: yes\n",
            "service.restart-delay: expected a number of seconds or a time span such as 250ms, 10s, 2min, 1h or '1min 30s', got true",
        ),
        ("restart-delay: [1]\n", "service.restart-delay: expected a duration, got a list"),
        ("restart-delay: .nan\n", "service.restart-delay: a duration must be a number, got NaN"),
        (
            "restart-delay: infinity\n",
            "service.restart-delay: must be a finite duration, not infinity",
        ),
        ("watchdog: infinity\n", "service.watchdog: must be a finite duration, not infinity"),
        (
            "restart-delay: 400000y\n",
            "service.restart-delay: the duration '400000y' is too long: at most 1y (31557600 seconds)",
        ),
        (
            "watchdog: 10000000000\n",
            "service.watchdog: the duration '10000000000' is too long: at most 1y (31557600 seconds)",
        ),
        (
            "stop-timeout: 1y 1s\n",
            "service.stop-timeout: the duration '1y 1s' is too long: at most 1y (31557600 seconds); for 'never' write infinity",
        ),
        (
            "start-limit: {interval: 5000y}\n",
            "service.start-limit.interval: the duration '5000y' is too long: at most 1y (31557600 seconds)",
        ),
        (
            "restart-delay: 2s\nrestart-delay-max: 1s\n",
            "service.restart-delay-max: restart-delay-max must not be shorter than restart-delay",
        ),
        (
            "start-limit: {burst: 0}\n",
            "service.start-limit.burst: expected an integer of at least 1, got 0",
        ),
        ("start-limit: 5\n", "service.start-limit: expected a mapping, got '5'"),
        (
            "start-limit: {interval: infinity}\n",
            "service.start-limit.interval: must be a finite duration, not infinity",
        ),
        ("fd-store-max: -1\n", "service.fd-store-max: expected an integer of at least 0, got -1"),
        (
            "fd-store-preserve: always\n",
            "service.fd-store-preserve: expected one of no, restart, yes, got 'always'",
        ),
        ("instances: 0\n", "service.instances: expected an integer of at least 1, got 0"),
        (
            "max-connections: 0\naccept: true\n",
            "service.max-connections: expected an integer of at least 1, got 0",
        ),
        ("activation: lazy\n", "service.activation: expected one of eager, on-demand, got 'lazy'"),
        ("notify: 'yes'\n", "service.notify: expected a boolean (true or false), got 'yes'"),
        ("overlap: 2\n", "service.overlap: expected a boolean (true or false), got '2'"),
        ("user: ''\n", "service.user: must not be empty"),
        ("group: ~\n", "service.group: expected a string, got null"),
        ("working-directory: ''\n", "service.working-directory: must not be empty"),
        ("environment: [A=1]\n", "service.environment: expected a mapping, got a list"),
        ("environment: {A: ~}\n", "service.environment.A: expected a string, got null"),
        ("environment: {A: [1]}\n", "service.environment.A: expected a string, got a list"),
        (
            "environment: {'A=B': x}\n",
            "service.environment.A=B: invalid environment variable name 'A=B'",
        ),
        ("environment: {'': x}\n", "service.environment.: invalid environment variable name ''"),
        (
            "environment: {A: '{fd:nope}'}\n",
            "service.environment.A: unknown socket 'nope' in {fd:nope}; this unit's sockets are: http",
        ),
        ("inetd: true\n", "service.inetd: inetd: true needs accept: true"),
        (
            "max-connections: 5\n",
            "service.max-connections: max-connections applies only with accept: true",
        ),
        (
            "accept: true\ninstances: 2\n",
            "service.instances: instances must be 1 with accept: true; limit connections with max-connections",
        ),
        (
            "environment: {A: x}\nenvironment: {B: y}\n",
            "service.environment: duplicate key 'environment' (first on line 6)",
        ),
    ],
)
def test_service_errors(lines: str, expected: str) -> None:
    assert service_error(lines).endswith(": " + expected)


def test_service_error_positions() -> None:
    assert service_error("restart-delay: 10x\n").startswith("/srv/units/web.yaml:6:18: ")
    assert service_error("inetd: true\n").startswith("/srv/units/web.yaml:6:10: ")


@pytest.mark.parametrize(
    ("exec_", "expected"),
    [
        (
            "exec: []",
            "/srv/units/web.yaml:1:17: service.exec: must not be empty: give the program and its arguments",
        ),
        (
            "exec: ''",
            "/srv/units/web.yaml:1:17: service.exec: must not be empty: give the program and its arguments",
        ),
        (
            "exec: ['', x]",
            "/srv/units/web.yaml:1:18: service.exec.0: the program name must not be empty",
        ),
        ("exec: [a, ~]", "/srv/units/web.yaml:1:21: service.exec.1: expected a string, got null"),
        (
            "exec: [a, [b]]",
            "/srv/units/web.yaml:1:21: service.exec.1: expected a string, got a list",
        ),
        (
            "exec: {a: b}",
            "/srv/units/web.yaml:1:17: service.exec: expected a string, got a mapping",
        ),
        (
            'exec: "a \'b"',
            "/srv/units/web.yaml:1:17: service.exec: cannot split the command line: No closing quotation",
        ),
        (
            'exec: [a, "{fd:x}"]',
            "/srv/units/web.yaml:1:21: service.exec.1: unknown socket 'x' in {fd:x}; this unit has no sockets",
        ),
        (
            'exec: "a {fd:x}"',
            "/srv/units/web.yaml:1:17: service.exec: unknown socket 'x' in {fd:x}; this unit has no sockets",
        ),
        ("user: x", "/srv/units/web.yaml:1:10: service: missing required key 'exec'"),
    ],
)
def test_exec_errors(exec_: str, expected: str) -> None:
    assert error(f"service: {{{exec_}}}\n") == expected


def test_missing_service() -> None:
    assert error("sockets: {}\n") == "/srv/units/web.yaml:1:1: missing required key 'service'"
    assert (
        error("service: ~\n") == "/srv/units/web.yaml:1:10: service: expected a mapping, got null"
    )


# --------------------------------------------------------------------------- placeholders


def test_unknown_socket_placeholder_lists_the_sockets() -> None:
    text = """\
    sockets:
      a: {listen: ":1"}
      b: {listen: ":2"}
    service:
      exec: [app, "--x={fd:x}"]
    """
    assert error(text) == (
        "/srv/units/web.yaml:5:15: service.exec.1: unknown socket 'x' in {fd:x}; "
        "this unit's sockets are: a, b"
    )


def test_placeholders_in_accept_mode() -> None:
    text = """\
    sockets:
      http: {listen: ":1"}
    service:
      accept: true
      exec: [app, "{fd:connection}"]
      environment: {FD: "{fd:http}"}
    """
    assert error(text) == (
        "/srv/units/web.yaml:6:21: service.environment.FD: unknown socket 'http' in {fd:http}; "
        "with accept: true a worker gets only its connection: use {fd:connection}"
    )


def test_placeholder_helpers() -> None:
    text = "a={fd:a} b={fd:b} {instance} {other} {fd:} {{fd:a}}"
    assert placeholder_names(text) == ["a", "b", "", "a"]
    assert expand_placeholders(
        "--a={fd:a} --b={fd:b} -i {instance} {x} {fd}", {"a": 3, "b": 4}, 2
    ) == ("--a=3 --b=4 -i 2 {x} {fd}")
    assert expand_placeholders("{{fd:a}}", {"a": 3}, 0) == "{3}"
    with pytest.raises(Exception, match=r"no fd named 'zz' for \{fd:zz\}"):
        expand_placeholders("{fd:zz}", {"a": 3}, 0)
    check_placeholders("{fd:a}{instance}{x}", ["a"], accept=False)
    check_placeholders("{fd:connection}", ["a"], accept=True)


# --------------------------------------------------------------------------- sockets and service together


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "service: {exec: [a], accept: true}\n",
            "/srv/units/web.yaml:1:30: service.accept: accept: true needs at least one socket",
        ),
        (
            "service: {exec: [a], activation: on-demand}\n",
            "/srv/units/web.yaml:1:34: service.activation: activation: on-demand needs at least one socket to watch",
        ),
        (
            "sockets: {d: {listen: '@d', kind: datagram}, s: {listen: '@s'}}\nservice: {exec: [a], accept: true}\n",
            "/srv/units/web.yaml:2:30: service.accept: accept: true works with stream and seqpacket sockets only; datagram: d",
        ),
    ],
)
def test_service_needs_fitting_sockets(text: str, expected: str) -> None:
    assert error(text) == expected


def test_accept_with_seqpacket_and_on_demand() -> None:
    unit = load(
        "sockets: {s: {listen: '@s', kind: seqpacket}}\n"
        "service: {exec: [a], accept: true, inetd: true, activation: on-demand, max-connections: 3}\n"
    )
    assert unit.service.accept and unit.service.inetd
    assert unit.service.max_connections == 3


# --------------------------------------------------------------------------- files and directories


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def test_load_unit_file_uses_its_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path, "web.yaml", "sockets: {s: {listen: 'unix:web.sock'}}\nservice: {exec: [a]}\n"
    )
    unit = load_unit_file(path)
    assert unit.name == "web"
    assert unit.base_dir == tmp_path
    assert unit.sockets[0].address == UnixAddress(str(tmp_path / "web.sock"))


def test_load_unit_file_read_errors(tmp_path: Path) -> None:
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "missing")
    with pytest.raises(ConfigErrors) as info:
        load_unit_file(tmp_path / "gone.yaml")
    assert str(info.value) == f"{tmp_path}/gone.yaml: cannot read: No such file or directory"
    (tmp_path / "bin.yaml").write_bytes(b"service:\n  exec: [\xff]\n")
    with pytest.raises(ConfigErrors) as info:
        load_unit_file(tmp_path / "bin.yaml")
    assert (
        str(info.value) == f"{tmp_path}/bin.yaml:2:1: not valid UTF-8 (byte 18: invalid start byte)"
    )


def test_a_unit_file_may_be_exactly_1_mib_and_not_one_byte_more(tmp_path: Path) -> None:
    head = b"service:\n  exec: [app]\n#"
    path = tmp_path / "big.yaml"
    path.write_bytes(head + b"x" * (MAX_UNIT_FILE_SIZE - len(head) - 1) + b"\n")
    assert load_unit_file(path).service.exec == ("app",)
    with path.open("ab") as file:
        file.write(b"#")
    with pytest.raises(ConfigErrors) as info:
        load_unit_file(path)
    assert str(info.value) == (
        f"{path}: too large (1048577 bytes): a unit file may be at most 1 MiB (1048576 bytes)"
    )


def test_only_regular_files_are_read_and_a_fifo_does_not_block(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.yaml")  # no writer: a blocking open() would wait forever
    with pytest.raises(ConfigErrors) as info:
        load_unit_file(tmp_path / "fifo.yaml")
    assert str(info.value) == (
        f"{tmp_path}/fifo.yaml: is a FIFO, not a regular file: only regular files are read as units"
    )
    with pytest.raises(ConfigErrors) as info:
        load_unit_file(Path("/dev/null"))
    assert "/dev/null: is a character device, not a regular file" in str(info.value)


def test_load_units_expands_directories(tmp_path: Path) -> None:
    units_dir = tmp_path / "units"
    units_dir.mkdir()
    write(units_dir, "b.yml", "service: {exec: [b]}\n")
    write(units_dir, "a.yaml", "service: {exec: [a]}\n")
    write(units_dir, "README.md", "not a unit")
    write(units_dir, ".#a.yaml", "editor lock file")
    (units_dir / "sub.yaml").mkdir()
    write(units_dir / "sub.yaml", "c.yaml", "service: {exec: [c]}\n")
    extra = write(tmp_path, "extra.conf", "name: extra\nservice: {exec: [e]}\n")
    units = load_units([units_dir, extra, units_dir / "a.yaml"])
    assert [u.name for u in units] == ["a", "b", "extra"]


def test_load_units_empty_list() -> None:
    assert load_units([]) == []


def test_load_units_collects_every_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    good = tmp_path / "good"
    good.mkdir()
    write(good, "web.yaml", "service: {exec: [a]}\n")
    write(good, "other.yaml", "name: web\nservice: {exec: [a]}\n")
    write(good, "bad.yaml", "service: {exec: [a], restart: sometimes}\n")
    with pytest.raises(ConfigErrors) as info:
        load_units([empty, tmp_path / "missing", good])
    assert [str(e) for e in info.value.errors] == [
        f"{empty}: no unit files (*.yaml, *.yml) in this directory",
        f"{tmp_path}/missing: no such file or directory",
        f"{good}/bad.yaml:1:31: service.restart: expected one of no, on-failure, always, got 'sometimes'",
        f"{good}/web.yaml: name: unit name 'web' is already used by {good}/other.yaml",
    ]


def test_load_units_finds_address_conflicts(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        """\
        sockets:
          http: {listen: ":8080"}
          sock: {listen: "unix:/run/x.sock"}
          fd: {listen: "fd:3"}
          any: {listen: ":0"}
          shared: {listen: ":9000", reuse-port: true}
          dns: {listen: ":53", kind: datagram}
        service: {exec: [a]}
        """,
    )
    write(
        tmp_path,
        "b.yaml",
        """\
        sockets:
          web: {listen: ":8080"}
          s: {listen: {type: unix, path: /run/x.sock}}
          inherited: {listen: {type: fd, str: "03"}}
          any: {listen: ":0"}
          shared: {listen: ":9000", reuse-port: true}
          dns: {listen: ":53"}
        service: {exec: [b]}
        """,
    )
    with pytest.raises(ConfigErrors) as info:
        load_units([tmp_path])
    assert [str(e) for e in info.value.errors] == [
        f"{tmp_path}/b.yaml:2:17: sockets.web.listen: :8080 is already used by socket 'http' of unit 'a'",
        f"{tmp_path}/b.yaml:3:15: sockets.s.listen: unix:/run/x.sock is already used by socket 'sock' of unit 'a'",
        f"{tmp_path}/b.yaml:4:23: sockets.inherited.listen: fd 3 is already used by socket 'fd' of unit 'a': an inherited fd backs one socket",
    ]


def test_load_units_conflicts_within_one_unit(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        "sockets: {x: {listen: 'vsock:3:1'}, y: {listen: 'vsock:3:1'}}\nservice: {exec: [a]}\n",
    )
    with pytest.raises(ConfigErrors, match="vsock:3:1 is already used by socket 'x' of unit 'a'"):
        load_units([tmp_path / "a.yaml"])


# --------------------------------------------------------------------------- command line


def test_unit_from_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    unit = unit_from_command_line(
        [("http", "127.0.0.1:8080"), ("sock", "unix:x.sock")],
        ["/usr/bin/app", "--fd={fd:http}"],
        accept=False,
        on_demand=True,
        inetd=False,
    )
    assert unit.name == "app"
    assert unit.base_dir == tmp_path
    assert unit.sockets == (
        SocketSpec("http", InetAddress("127.0.0.1", "8080")),
        SocketSpec("sock", UnixAddress(str(tmp_path / "x.sock"))),
    )
    assert unit.sockets[0].location == Location("--listen")
    assert unit.service == ServiceSpec(
        exec=("/usr/bin/app", "--fd={fd:http}"), activation=Activation.ON_DEMAND
    )
    unit = unit_from_command_line([("c", ":1")], ["my app", "{fd:connection}"], True, False, True)
    assert unit.name == "command"
    assert unit.service.accept and unit.service.inetd


@pytest.mark.parametrize(
    ("listens", "command", "flags", "expected"),
    [
        (
            [("3x", ":1")],
            ["a"],
            (False, False, False),
            [
                "--listen: 3x: invalid socket name '3x': it starts with a digit; a name is 1 to 255 characters of A-Z a-z 0-9 _ . - and does not start with a digit"
            ],
        ),
        (
            [("a", ":1"), ("a", ":2")],
            ["a"],
            (False, False, False),
            ["--listen: a: socket name 'a' is given twice"],
        ),
        (
            [("a", "h:99999")],
            ["a"],
            (False, False, False),
            ["--listen: a.port: port 99999 is out of range 0..65535"],
        ),
        (
            [("a", "fd:name")],
            ["a"],
            (False, False, False),
            [
                "--listen: a.str: fd 'name': named file descriptors are only permitted in monitor commands; here give the number of an fd the supervisor inherited, such as '3'"
            ],
        ),
        (
            [("a", "unix:" + "x" * 200)],
            ["a"],
            (False, False, False),
            ["--listen: a.path: the unix socket path is "],
        ),
        ([], [], (False, False, False), ["command line: no command given: put it after --"]),
        ([], [""], (False, False, False), ["command line: no command given: put it after --"]),
        (
            [("a", ":1")],
            ["cmd", "{fd:b}"],
            (False, False, False),
            ["command line: unknown socket 'b' in {fd:b}; this unit's sockets are: a"],
        ),
        (
            [("a", ":1")],
            ["cmd", "x\0"],
            (False, False, False),
            ["command line: an argument must not contain a NUL character"],
        ),
        ([("a", ":1")], ["cmd"], (False, False, True), ["--inetd: --inetd needs --accept"]),
        ([], ["cmd"], (True, False, False), ["--listen: --accept needs at least one socket"]),
        (
            [],
            ["cmd"],
            (False, True, False),
            ["--listen: --on-demand needs at least one socket to watch"],
        ),
        (
            [("a", ":1"), ("b", ":1")],
            ["cmd"],
            (False, False, False),
            ["--listen: b: :1 is already used by socket 'a' of unit 'cmd'"],
        ),
    ],
)
def test_unit_from_command_line_errors(
    listens: list[tuple[str, str]],
    command: list[str],
    flags: tuple[bool, bool, bool],
    expected: list[str],
) -> None:
    accept, on_demand, inetd = flags
    with pytest.raises(ConfigErrors) as info:
        unit_from_command_line(listens, command, accept, on_demand, inetd)
    rendered = [str(e) for e in info.value.errors]
    assert len(rendered) == len(expected), rendered
    for got, want in zip(rendered, expected, strict=True):
        assert got.startswith(want)


# --------------------------------------------------------------------------- properties

VALID_UNIT = """\
name: web
sockets:
  http:
    listen: "127.0.0.1:8080"
    backlog: 128
  admin:
    listen: {type: unix, path: run/admin.sock}
    mode: "0660"
service:
  exec: [python3, -m, app, "--listen-fd={fd:http}"]
  environment: {APP_ENV: prod}
  restart: no
  restart-delay: 100ms
  start-limit: {burst: 5, interval: 10s}
  stop-signal: SIGTERM
"""


def _load_never_crashes(text: str) -> None:
    try:
        load_unit_text(text, SOURCE, BASE)
    except ConfigErrors as failure:
        assert failure.errors
        assert all(isinstance(e, ConfigError) for e in failure.errors)


def test_valid_unit_for_mutation_is_valid() -> None:
    load_unit_text(VALID_UNIT, SOURCE, BASE)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text_raises_only_config_errors(text: str) -> None:
    _load_never_crashes(text)


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=len(VALID_UNIT)),
            st.integers(min_value=0, max_value=6),
            st.text(alphabet=" :-{}[],'\"\n\t#&*!|>?%@`~0123456789abcnoyes", max_size=6),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_unit_raises_only_config_errors(mutations: list[tuple[int, int, str]]) -> None:
    text = VALID_UNIT
    for position, length, insert in mutations:
        text = text[:position] + insert + text[position + length :]
    _load_never_crashes(text)


_YAML_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["stream", "no", ":80", "unix:/x", "fd:3", "fd:x", "{fd:http}", "1s", "0660"]),
)
_KEYS = st.sampled_from(
    [
        "name",
        "sockets",
        "service",
        "listen",
        "kind",
        "backlog",
        "mode",
        "exec",
        "environment",
        "accept",
        "inetd",
        "restart",
        "start-limit",
        "burst",
        "interval",
        "http",
        "type",
        "host",
        "port",
        "path",
        "str",
        "stop-signal",
        "instances",
        "activation",
        "watchdog",
    ]
)
_YAML_VALUES = st.recursive(
    _YAML_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=5)
    ),
    max_leaves=25,
)


@given(st.dictionaries(_KEYS, _YAML_VALUES, max_size=5))
def test_random_yaml_structures_raise_only_config_errors(document: dict[str, object]) -> None:
    _load_never_crashes(yaml.safe_dump(document))


def test_load_units_gives_back_the_known_unit_of_an_unchanged_file(tmp_path: Path) -> None:
    # A reload of 10,000 unchanged units parses none of them again (docs/performance.md).
    write(tmp_path, "a.yaml", "service: {exec: [a]}\n")
    write(tmp_path, "b.yaml", "service: {exec: [b]}\n")
    before = load_units([tmp_path])
    write(tmp_path, "b.yaml", "service: {exec: [b, changed]}\n")
    after = load_units([tmp_path], known=before)
    assert after[0] is before[0]
    assert after[1] is not before[1] and after[1].service.exec == ("b", "changed")


def test_load_units_checks_conflicts_across_known_units_too(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "sockets: {s: {listen: '127.0.0.1:8080'}}\nservice: {exec: [a]}\n")
    write(tmp_path, "b.yaml", "sockets: {s: {listen: '127.0.0.1:8081'}}\nservice: {exec: [b]}\n")
    before = load_units([tmp_path])
    write(tmp_path, "b.yaml", "sockets: {s: {listen: '127.0.0.1:8080'}}\nservice: {exec: [b]}\n")
    with pytest.raises(ConfigErrors, match="8080"):
        load_units([tmp_path], known=before)


def test_libyaml_and_pure_yaml_give_the_same_positions() -> None:
    # units.py composes with libyaml where PyYAML has it; an error's FILE:LINE:COL
    # must be the one the pure parser gives (the messages come from the pure one).
    from fdsupervisor import units

    assert units._CSafeLoader is yaml.CSafeLoader

    def marks(node: yaml.Node) -> list[tuple[int, int]]:
        found = [(node.start_mark.line, node.start_mark.column)]
        if isinstance(node.value, list):
            for item in node.value:
                for part in item if isinstance(item, tuple) else (item,):
                    found += marks(part)
        return found

    text = MINIMAL + "# é, ü: not ASCII\n"
    fast = yaml.compose(text, Loader=yaml.CSafeLoader)
    pure = yaml.compose(text, Loader=yaml.SafeLoader)
    assert marks(fast) == marks(pure)
    assert error("service: [unclosed\n") == (
        f"{SOURCE}:2:1: invalid YAML: expected ',' or ']', but got '<stream end>'"
        " (while parsing a flow sequence opened at 1:10)"
    )
