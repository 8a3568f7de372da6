"""Rolling replacement (SPEC 8): service-restart and reload replace workers one at a time.

Real workers (tests/workers/rolling.py) serve a one-line request/response
protocol on one shared TCP listening socket, take 300 ms to say READY=1,
and a client loop runs throughout; ``query-services`` is sampled on a second
monitor connection while the first waits for the restart's reply.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import PYTHON, ROOT, SupervisorProcess
from tests.monitor_client import RawClient

WORKER = str(ROOT / "tests" / "workers" / "rolling.py")


def unit(mode_file: Path, *extra: str, tag: str = "v1") -> str:
    lines = [
        "sockets:",
        '  http: {listen: "127.0.0.1:0", backlog: 512}',
        "service:",
        f"  exec: [{PYTHON}, {WORKER}]",
        f"  environment: {{MODE_FILE: {str(mode_file)!r}, TAG: {tag}, INSTANCE: '{{instance}}'}}",
        "  instances: 3",
        "  notify: true",
        "  stop-timeout: 5s",
        *(f"  {line}" for line in extra),
    ]
    return "\n".join(lines) + "\n"


def request(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"ping\n")
        chunks = []
        while chunk := conn.recv(256):
            chunks.append(chunk)
    return b"".join(chunks).decode()


@dataclass
class Load:
    """A bounded client loop: one request after another until stopped."""

    port: int
    answers: list[str] = field(default_factory=list)
    refused: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 30  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                answer = request(self.port)
            except ConnectionRefusedError:
                self.refused += 1
                continue
            except OSError as exc:
                self.failed.append(repr(exc))
                continue
            if not answer.endswith("\n"):
                self.failed.append(f"answer {answer!r}")
            else:
                self.answers.append(answer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)


def service(client: RawClient) -> dict[str, Any]:
    (row,) = client.command("query-services")["return"]
    return dict(row)


def start(supervisor: Any, tmp_path: Path, *extra: str, mode: str = "0.3") -> SupervisorProcess:
    mode_file = tmp_path / "mode"
    mode_file.write_text(mode)
    sup: SupervisorProcess = supervisor({"web": unit(mode_file, *extra)})
    sup.wait_count("service_ready", 1, unit="web")
    return sup


def all_started(client: RawClient) -> dict[str, Any]:
    """query-services once 3 workers count as started (READY=1 arrives 300 ms after spawn)."""
    deadline = time.monotonic() + 10
    while True:
        row = service(client)
        if row["started"] == 3 or time.monotonic() > deadline:
            return row
        # each query is a round trip to the supervisor: a bounded wait on it, no sleep


def restart_sampling(sup: SupervisorProcess) -> tuple[dict[str, Any], list[int], list[int]]:
    """service-restart on one connection, query-services sampled on another until it answers.

    Returns the reply, the ``started`` counts seen, and the pids once it answered.
    """
    waiting, sampler = RawClient(sup.monitor_path).negotiate(), RawClient(sup.monitor_path)
    sampler.negotiate()
    waiting.send(json.dumps({"execute": "service-restart", "arguments": {"unit": "web"}}).encode())
    samples: list[int] = []
    deadline = time.monotonic() + 20
    reply: dict[str, Any] | None = None
    while reply is None and time.monotonic() < deadline:
        samples.append(service(sampler)["started"])
        readable, _, _ = select.select([waiting.sock], [], [], 0.01)
        if readable or b"\r\n" in waiting.buffer:
            message = waiting.read()  # events (SERVICE_*) reach this client too: not the reply
            if "event" not in message:
                reply = message
    if reply is None:
        reply = waiting.reply()
    # after the reply too, until every new worker is started (overlap: false answers at once)
    while time.monotonic() < deadline:
        row = service(sampler)
        samples.append(row["started"])
        if row["started"] == 3 and len(row["pids"]) == 3:
            break
    return reply, samples, service(sampler)["pids"]


def test_a_rolling_restart_under_load_loses_nothing(supervisor: Any, tmp_path: Path) -> None:
    sup = start(supervisor, tmp_path)
    monitor = RawClient(sup.monitor_path).negotiate()
    before = all_started(monitor)
    assert before["started"] == 3
    load = Load(sup.port("http"))
    try:
        reply, samples, after = restart_sampling(sup)
    finally:
        load.stop()
    assert reply == {"return": {}}
    assert min(samples) >= 3, samples
    assert len(samples) > 10, "sampled throughout the restart (3 workers x 300 ms)"
    assert not set(after) & set(before["pids"]) and len(after) == 3
    assert load.refused == 0 and load.failed == []
    served = {int(answer.split()[0]) for answer in load.answers}
    assert served & set(before["pids"]) and served & set(after), "both generations served"
    assert sup.count("worker_stopping", unit="web", reason="replaced") == 3
    # the new workers are the same instances, with the same {instance} in their environment
    started = {e["pid"]: e["instance"] for e in sup.events if e.get("event") == "worker_started"}
    assert sorted(started[pid] for pid in after) == [0, 1, 2]
    for answer in load.answers:
        pid, _tag, instance = answer.split()
        assert int(instance) == started[int(pid)]


def test_overlap_false_stops_first_and_shows_the_gap(supervisor: Any, tmp_path: Path) -> None:
    sup = start(supervisor, tmp_path, "overlap: false")
    monitor = RawClient(sup.monitor_path).negotiate()
    before = all_started(monitor)
    load = Load(sup.port("http"))
    try:
        reply, samples, after = restart_sampling(sup)
    finally:
        load.stop()
    assert reply == {"return": {}}
    assert min(samples) < 3, "stop-then-start: fewer workers started for a while"
    assert not set(after) & set(before["pids"]) and len(after) == 3
    assert load.refused == 0, "the socket stays bound: connections wait in the backlog"


def test_a_new_worker_that_never_gets_ready_fails_the_restart(
    supervisor: Any, tmp_path: Path
) -> None:
    sup = start(supervisor, tmp_path, "start-timeout: 500ms")
    monitor = RawClient(sup.monitor_path).negotiate()
    before = all_started(monitor)
    (tmp_path / "mode").write_text("never")  # the next workers' behaviour
    reply = monitor.command("service-restart", unit="web")
    assert reply["error"]["class"] == "GenericError"
    assert "start timeout: no READY=1" in reply["error"]["desc"]
    assert "new worker" in reply["error"]["desc"]
    failed = sup.wait_for("service_restart_failed", unit="web")
    assert "the old workers keep running" in failed["note"]
    row = service(monitor)
    assert sorted(row["pids"]) == sorted(before["pids"]) and row["started"] == 3
    assert row["state"] == "running"
    answer = request(sup.port("http"))
    assert int(answer.split()[0]) in before["pids"], "an old worker answers"


def test_a_new_worker_that_exits_fails_the_restart(supervisor: Any, tmp_path: Path) -> None:
    sup = start(supervisor, tmp_path)
    monitor = RawClient(sup.monitor_path).negotiate()
    before = all_started(monitor)
    (tmp_path / "mode").write_text("exit")
    reply = monitor.command("service-restart", unit="web")
    assert reply["error"]["desc"].endswith("exited with code 3")
    row = service(monitor)
    assert sorted(row["pids"]) == sorted(before["pids"]) and row["started"] == 3
    assert sup.count("worker_started", unit="web") == 4, "one new worker, then it stopped"
    assert int(request(sup.port("http")).split()[0]) in before["pids"]


def test_a_second_restart_while_one_runs_is_refused(supervisor: Any, tmp_path: Path) -> None:
    sup = start(supervisor, tmp_path)
    first, second = RawClient(sup.monitor_path).negotiate(), RawClient(sup.monitor_path)
    second.negotiate()
    all_started(second)
    # a command sent behind it in the same write waits: replies keep the commands' order
    first.send(
        json.dumps({"execute": "service-restart", "arguments": {"unit": "web"}, "id": 1}).encode()
        + json.dumps({"execute": "query-services", "id": 2}).encode()
    )
    sup.wait_for("service_restarting", unit="web")
    refused = second.command("service-restart", unit="web")
    assert "is being restarted already" in refused["error"]["desc"]
    assert first.reply() == {"return": {}, "id": 1}
    queried = first.reply()
    assert queried["id"] == 2 and queried["return"][0]["started"] == 3


def test_a_reload_that_changes_the_service_rolls_too(supervisor: Any, tmp_path: Path) -> None:
    sup = start(supervisor, tmp_path)
    monitor = RawClient(sup.monitor_path).negotiate()
    before = set(all_started(monitor)["pids"])
    (tmp_path / "units" / "web.yaml").write_text(unit(tmp_path / "mode", tag="v2"))
    load = Load(sup.port("http"))
    samples = []
    try:
        reply = monitor.command("reload")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            row = service(monitor)
            samples.append(row["started"])
            if row["started"] == 3 and not set(row["pids"]) & before:
                break
    finally:
        load.stop()
    assert reply["return"]["waiting-for"] == [], "nothing stopped first"
    assert min(samples) >= 3, samples
    assert sup.count("worker_stopping", unit="web", reason="replaced") == 3
    sup.wait_for("reload_rolled", unit="web")
    assert load.refused == 0 and load.failed == []
    assert request(sup.port("http")).split()[1] == "v2"
    tags = {answer.split()[1] for answer in load.answers}
    assert tags <= {"v1", "v2"} and "v1" in tags
