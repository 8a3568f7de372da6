"""log.py: console and JSON output, and journal entries (fields, priorities, auto-detection).

The journal path is checked three ways: with ``send`` replaced by a recorder
(the fields structlog events become), against a stand-in journald in a
private mount namespace (the bytes systemd-python really sends), and
against the real journald where there is one.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import systemd.journal

from fdsupervisor.log import (
    LOG_FORMATS,
    journal_field_name,
    journal_stream_matches,
    make_logger,
)

ROOT = Path(__file__).resolve().parents[2]


class Journal:
    """Stands in for ``systemd.journal.send``: keeps each entry's fields."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    def __call__(self, **fields: Any) -> None:
        self.entries.append(fields)


def stderr_stream_value() -> str:
    status = os.fstat(2)
    return f"{status.st_dev}:{status.st_ino}"


# --------------------------------------------------------------------------- console and json


def test_formats() -> None:
    assert LOG_FORMATS == ("auto", "console", "json", "journal")


def test_json_lines_unchanged() -> None:
    stream = io.StringIO()
    make_logger("json", stream).info("worker_exited", unit="web", pid=123)
    entry = json.loads(stream.getvalue())
    assert entry["event"] == "worker_exited"
    assert entry["unit"] == "web"
    assert entry["pid"] == 123
    assert entry["level"] == "info"
    assert entry["timestamp"].endswith("Z")


def test_console_unchanged() -> None:
    stream = io.StringIO()
    make_logger("console", stream).warning("stop_timeout", unit="web", pid=7)
    line = stream.getvalue()
    assert "stop_timeout" in line and "unit=web" in line and "pid=7" in line
    assert "warning" in line
    assert "\x1b[" not in line  # no colours off a terminal


# --------------------------------------------------------------------------- auto


def test_auto_picks_journal_when_stderr_is_the_journal_stream() -> None:
    journal = Journal()
    environ = {"JOURNAL_STREAM": stderr_stream_value()}
    make_logger("auto", io.StringIO(), environ=environ, send=journal).info("ready")
    assert [e["EVENT"] for e in journal.entries] == ["ready"]


@pytest.mark.parametrize("value", [None, "", "1:2", "x:y", "12", f"{2**40}:{2**40}"])
def test_auto_picks_console_otherwise(value: str | None) -> None:
    journal = Journal()
    stream = io.StringIO()
    environ = {} if value is None else {"JOURNAL_STREAM": value}
    make_logger("auto", stream, environ=environ, send=journal).info("ready")
    assert journal.entries == []
    assert "ready" in stream.getvalue()


def test_journal_stream_matches_only_its_own_fd(tmp_path: Path) -> None:
    with open(tmp_path / "err", "w") as other:
        status = os.fstat(other.fileno())
        value = f"{status.st_dev}:{status.st_ino}"
        # JOURNAL_STREAM is inherited by processes whose stderr went elsewhere.
        assert journal_stream_matches({"JOURNAL_STREAM": value}, other.fileno())
        assert not journal_stream_matches({"JOURNAL_STREAM": value}, 2)
        assert not journal_stream_matches({"JOURNAL_STREAM": value}, 987)  # not open


def test_auto_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal()
    monkeypatch.setenv("JOURNAL_STREAM", stderr_stream_value())
    make_logger("auto", io.StringIO(), send=journal).info("ready")
    assert len(journal.entries) == 1
    monkeypatch.delenv("JOURNAL_STREAM")
    make_logger("auto", io.StringIO(), send=journal).info("ready")
    assert len(journal.entries) == 1


# --------------------------------------------------------------------------- journal fields


def log_one(**fields: Any) -> dict[str, Any]:
    journal = Journal()
    make_logger("journal", io.StringIO(), send=journal).info("worker_exited", **fields)
    (entry,) = journal.entries
    return entry


def test_journal_entry_fields() -> None:
    entry = log_one(unit="web", pid=123, status="signal SIGTERM", restart_in=0.2)
    assert (
        entry["MESSAGE"] == 'worker_exited unit=web pid=123 status="signal SIGTERM" restart_in=0.2'
    )
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "fdsupervisor"
    assert entry["EVENT"] == "worker_exited"
    assert entry["UNIT"] == "web"
    assert entry["PID"] == "123"
    assert entry["STATUS"] == "signal SIGTERM"
    assert entry["RESTART_IN"] == "0.2"
    assert "TIMESTAMP" not in entry and "LEVEL" not in entry


def test_journal_entry_names_the_code_that_logged() -> None:
    journal = Journal()
    logger = make_logger("journal", io.StringIO(), send=journal)
    logger.info("here")
    line = sys._getframe().f_lineno - 1
    (entry,) = journal.entries
    assert entry["CODE_FILE"] == __file__
    assert entry["CODE_LINE"] == line
    assert entry["CODE_FUNC"] == "test_journal_entry_names_the_code_that_logged"


def test_values_as_text() -> None:
    entry = log_one(pids=[1, 2], last_exit={"code": 1}, note=None, ok=True, raw="a=b c")
    assert entry["PIDS"] == "[1, 2]"
    assert entry["LAST_EXIT"] == '{"code": 1}'
    assert entry["NOTE"] == "None"
    assert entry["OK"] == "True"
    assert entry["RAW"] == "a=b c"
    assert 'raw="a=b c"' in entry["MESSAGE"]


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("unit", "UNIT"),
        ("restart-in", "RESTART_IN"),
        ("fd.name", "FD_NAME"),
        ("_private", "PRIVATE"),  # a leading _ is journald's (trusted fields)
        ("__", None),
        ("1st", "F_1ST"),  # no leading digit
        ("message", "EVENT_MESSAGE"),  # ours
        ("priority", "EVENT_PRIORITY"),
        ("code_line", "EVENT_CODE_LINE"),
        ("syslog_identifier", "EVENT_SYSLOG_IDENTIFIER"),
        ("x" * 80, "X" * 64),
        ("Ünit", "NIT"),
    ],
)
def test_field_names_as_journald_accepts_them(key: str, field: str | None) -> None:
    assert journal_field_name(key) == field


def test_keys_that_would_override_ours_do_not() -> None:
    entry = log_one(message="hi", priority=0, syslog_identifier="evil")
    assert entry["MESSAGE"].startswith("worker_exited ")
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "fdsupervisor"
    assert entry["EVENT_MESSAGE"] == "hi"
    assert entry["EVENT_PRIORITY"] == "0"


@pytest.mark.parametrize(
    ("method", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_priorities(method: str, priority: str) -> None:
    journal = Journal()
    getattr(make_logger("journal", io.StringIO(), send=journal), method)("e")
    assert journal.entries[0]["PRIORITY"] == priority


def test_exception_goes_into_the_message_and_a_field() -> None:
    journal = Journal()
    logger = make_logger("journal", io.StringIO(), send=journal)
    try:
        raise RuntimeError("worker table corrupt")
    except RuntimeError:
        logger.exception("loop_failed", unit="web")
    (entry,) = journal.entries
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"].startswith("loop_failed unit=web\nTraceback")
    assert entry["MESSAGE"].endswith("RuntimeError: worker table corrupt")
    assert entry["EXCEPTION"].startswith("Traceback")


def test_journal_unreachable_falls_back_to_a_plain_line() -> None:
    def unreachable(**fields: Any) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    stream = io.StringIO()
    make_logger("journal", stream, send=unreachable).info("ready", units=2)
    assert stream.getvalue() == "ready units=2\n"


def test_journal_uses_systemd_journal_send_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal()
    monkeypatch.setattr(systemd.journal, "send", journal)
    # journald's socket: any path that exists (here none runs)
    make_logger("journal", io.StringIO(), journal_socket=__file__).info("ready")
    assert journal.entries[0]["EVENT"] == "ready"


# --------------------------------------------------------------------------- the real protocol

# Runs in a private mount namespace with a tmpfs on /run: binds
# /run/systemd/journal/socket, where sd_journal_sendv() sends, logs through
# make_logger("journal") and prints the entries received, decoded from
# journald's native protocol (systemd.journal-fields(7), "KEY=value\n", or
# "KEY\n" + 64-bit little-endian length + value + "\n" for values that
# contain a newline).
FAKE_JOURNALD = textwrap.dedent(
    """
    import io, json, os, socket, struct, sys
    from fdsupervisor.log import make_logger

    os.makedirs("/run/systemd/journal")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("/run/systemd/journal/socket")
    server.settimeout(5)
    log = make_logger("journal", io.StringIO())
    log.warning("socket_removed", unit="web", socket="http", fd_name="web/http")
    try:
        raise ValueError("multi\\nline")
    except ValueError:
        log.exception("loop_failed")

    def decode(data):
        fields, i = {}, 0
        while i < len(data):
            end = data.index(b"\\n", i)
            line = data[i:end]
            if b"=" in line:
                key, _, value = line.partition(b"=")
                i = end + 1
            else:
                key = line
                (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
                value = data[end + 9 : end + 9 + size]
                i = end + 9 + size + 1
            fields[key.decode()] = value.decode()
        return fields

    print(json.dumps([decode(server.recv(65536)) for _ in range(2)]))
    """
)


def test_entries_reach_a_journald_socket_in_the_native_protocol(tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private /run")
    script = tmp_path / "fake_journald.py"
    script.write_text(FAKE_JOURNALD)
    result = subprocess.run(
        [
            unshare,
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs /run && exec "$0" "$1"',
            sys.executable,
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if (
        result.returncode != 0
        and "mount" in result.stderr
        and "permission" in result.stderr.lower()
    ):
        pytest.skip(f"cannot mount a private /run here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["MESSAGE"] == "socket_removed unit=web socket=http fd_name=web/http"
    assert first["PRIORITY"] == "4"
    assert first["SYSLOG_IDENTIFIER"] == "fdsupervisor"
    assert first["EVENT"] == "socket_removed"
    assert first["UNIT"] == "web"
    assert first["SOCKET"] == "http"
    assert first["FD_NAME"] == "web/http"
    assert first["CODE_FILE"] == str(script)
    assert first["CODE_FUNC"] == "<module>"
    assert int(first["CODE_LINE"]) > 0
    assert second["EVENT"] == "loop_failed"
    assert second["PRIORITY"] == "3"
    assert second["EXCEPTION"].endswith("ValueError: multi\nline")
    assert second["MESSAGE"].startswith("loop_failed\nTraceback")


def test_entries_reach_the_real_journal() -> None:
    if not os.path.exists("/run/systemd/journal/socket"):
        pytest.skip("no journald here (/run/systemd/journal/socket is missing)")
    journalctl = shutil.which("journalctl")
    marker = uuid.uuid4().hex
    make_logger("journal", io.StringIO()).info("journal_test", marker=marker)
    if journalctl is None:
        pytest.skip("sent without an error, but there is no journalctl to read it back with")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        result = subprocess.run(
            [journalctl, "--no-pager", "-o", "json", f"MARKER={marker}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if lines:
            entry = json.loads(lines[0])
            assert entry["EVENT"] == "journal_test"
            assert entry["SYSLOG_IDENTIFIER"] == "fdsupervisor"
            return
        if result.returncode != 0 and "permission" in result.stderr.lower():
            pytest.skip(f"cannot read the journal: {result.stderr.strip()}")
        time.sleep(0.2)
    pytest.fail(f"entry MARKER={marker} did not show up in the journal")
