"""``fdsupervisor ctl events``: a real supervisor's events, one line each, until Ctrl-C or its end."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import pytest

from fdsupervisor.ctl import event_text
from tests.conftest import fdsupervisor_command
from tests.integration.test_reload import free_port, unit_text
from tests.monitor_client import RawClient


def follow(sup: Any, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        fdsupervisor_command("ctl", "--monitor", str(sup.monitor_path), "events", *extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    # It says so once it is subscribed: events after this line reach it.
    assert "following events" in proc.stderr.readline()
    return proc


def restart(sup: Any) -> None:
    with RawClient(sup.monitor_path).negotiate() as client:
        assert client.command("service-restart", unit="web") == {"return": {}}


@pytest.mark.timeout(60)
def test_events_as_lines_until_ctrl_c(supervisor) -> None:
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{free_port()}"')})
    old = sup.wait_for("worker_started")["pid"]
    proc = follow(sup)
    try:
        restart(sup)
        assert proc.stdout is not None
        lines: list[str] = []
        wanted = (" SERVICE_STARTED ", " SERVICE_EXITED ")
        while not all(any(w in line for line in lines) for w in wanted):
            lines.append(proc.stdout.readline())
        started = next(line for line in lines if " SERVICE_STARTED " in line)
        stamp, event, unit, *rest = started.split()
        assert stamp.endswith("Z") and stamp[4] == "-" and event == "SERVICE_STARTED"
        assert unit == "unit=web" and any(r.startswith("pid=") for r in rest)
        assert f"pid={old}" in next(line for line in lines if "SERVICE_EXITED" in line)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0


@pytest.mark.timeout(60)
def test_raw_json_and_exit_0_when_the_supervisor_goes(supervisor) -> None:
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{free_port()}"')})
    sup.wait_for("worker_started")
    proc = follow(sup, "--json")
    restart(sup)
    assert proc.stdout is not None
    event = json.loads(proc.stdout.readline())
    assert event["event"].startswith("SERVICE_") and event["data"]["unit"] == "web"
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    sup.stop()
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    assert "no more events" in err
    for line in out.splitlines():
        json.loads(line)


def test_event_text_shape() -> None:
    line = event_text(
        {
            "event": "SERVICE_FAILED",
            "data": {"reason": "start limit hit", "unit": "web", "n": 3},
            "timestamp": {"seconds": 0, "microseconds": 5},
        }
    )
    assert (
        line == '1970-01-01T00:00:00.000005Z SERVICE_FAILED unit=web reason="start limit hit" n=3'
    )
