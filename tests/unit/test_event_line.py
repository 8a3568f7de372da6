"""The monitor's event line: SPEC 5's event, framed by qmp.py, stamped by a fake clock."""

from __future__ import annotations

import json
import math
import time

from hypothesis import given
from hypothesis import strategies as st
from qemu.qmp.message import Message

from fdsupervisor.errors import CommandError
from fdsupervisor.monitor import event_line
from fdsupervisor.qmp import error_line, event


def test_the_line_is_qmp_event_framing_with_the_clock_split() -> None:
    line = event_line("FD_STORED", {"fdname": "vm0", "owner": "monitor"}, now=lambda: 1700000000.25)
    assert line == event("FD_STORED", {"fdname": "vm0", "owner": "monitor"}, 1700000000, 250000)
    assert line == (
        b'{"event": "FD_STORED", "data": {"fdname": "vm0", "owner": "monitor"}, '
        b'"timestamp": {"seconds": 1700000000, "microseconds": 250000}}\r\n'
    )
    notice = Message(line)  # what the qemu.qmp client makes of it
    assert notice["event"] == "FD_STORED"
    assert notice["timestamp"] == {"seconds": 1700000000, "microseconds": 250000}


@given(st.floats(min_value=0, max_value=2**40, allow_nan=False, allow_infinity=False))
def test_any_time_gives_the_spec_shape(now: float) -> None:
    line = event_line("SERVICE_EXITED", {"unit": "web", "code": 1}, now=lambda: now)
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    message = json.loads(line)
    assert list(message) == ["event", "data", "timestamp"]
    stamp = message["timestamp"]
    assert list(stamp) == ["seconds", "microseconds"]
    assert stamp["seconds"] == math.floor(now)
    assert 0 <= stamp["microseconds"] < 1_000_000


def test_the_default_clock_is_wall_clock_time() -> None:
    before = int(time.time())
    stamp = json.loads(event_line("X", {}))["timestamp"]
    assert before <= stamp["seconds"] <= int(time.time())


def test_an_error_that_answers_no_request_has_no_id() -> None:
    line = error_line(CommandError("too many monitor clients (64); try again later"))
    assert json.loads(line) == {
        "error": {"class": "GenericError", "desc": "too many monitor clients (64); try again later"}
    }
    assert line.endswith(b"\r\n")
