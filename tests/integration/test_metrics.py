"""``--metrics ADDRESS`` (SPEC 11): a real supervisor scraped over loopback.

The values are checked against ``query-services`` on the monitor; the
scrapers that misbehave (half a header, a hundred idle connections, a bad
request line) are real sockets, and the supervisor's own answers (a second
scrape, the monitor) show that they harm nothing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fdsupervisor.log import LOG_RATE_BURST
from fdsupervisor.metrics import CONNECTION_TIMEOUT, MAX_CONNECTIONS
from tests.conftest import (
    PYTHON,
    REPORT_WORKER,
    SupervisorProcess,
    open_fds,
    read_until_eof,
    report_from,
)
from tests.integration.test_upgrade import settled_fd_count, web_with_extra
from tests.monitor_client import RawClient

WEB = f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, {REPORT_WORKER}]
      restart: always
      restart-delay: 0
    """
LAZY = f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, {REPORT_WORKER}]
      activation: on-demand
    """


@pytest.fixture
def metered(
    supervisor: Callable[..., SupervisorProcess], tmp_path: Any
) -> tuple[SupervisorProcess, int]:
    (tmp_path / "units").mkdir(exist_ok=True)
    sup = supervisor(
        {"web": WEB, "lazy": LAZY}, args=["--metrics", "127.0.0.1:0", str(tmp_path / "units")]
    )
    address = sup.wait_for("metrics_listening")["address"]
    return sup, int(str(address).rsplit(":", 1)[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_values_match_query_services(metered: tuple[SupervisorProcess, int]) -> None:
    """Every unit's workers, state (one 1, the rest 0) and restarts, the store and the monitor."""
    sup, port = metered
    sup.wait_for("worker_started", unit="web")
    with RawClient(sup.monitor_path).negotiate() as client:
        services = client.command("query-services")["return"]
        samples = scrape(port)
    for service in services:
        unit = service["unit"]
        assert samples[("fdsupervisor_workers", (("unit", unit),))] == len(service["pids"])
        assert samples[("fdsupervisor_restarts_total", (("unit", unit),))] == service["restarts"]
        states = {
            dict(labels)["state"]: value
            for (name, labels), value in samples.items()
            if name == "fdsupervisor_service_state" and dict(labels)["unit"] == unit
        }
        assert states[service["state"]] == 1
        assert sum(states.values()) == 1 and len(states) == 6
    assert {s["unit"] for s in services} == {"web", "lazy"}
    assert samples[("fdsupervisor_stored_fds", (("owner_kind", "unit"),))] == 2
    assert samples[("fdsupervisor_stored_fds", (("owner_kind", "monitor"),))] == 0
    assert samples[("fdsupervisor_monitor_clients", ())] == 1  # the RawClient above


def test_slowloris_does_not_stop_a_second_scrape(metered: tuple[SupervisorProcess, int]) -> None:
    sup, port = metered
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        samples = scrape(port)  # answered while the first waits for the rest of its header
        assert ("fdsupervisor_monitor_clients", ()) in samples
        # The silent client is closed by its timer, not left open for good.
        slow.settimeout(CONNECTION_TIMEOUT + 10)
        assert slow.recv(100) == b""
    sup.wait_for("metrics_client_timeout")


def test_idle_connections_are_bounded_and_closed(metered: tuple[SupervisorProcess, int]) -> None:
    """100 idle connections: all but MAX_CONNECTIONS closed at once, those after the timeout."""
    sup, port = metered
    before = len(open_fds(sup.pid))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    try:
        with RawClient(sup.monitor_path).negotiate() as client:
            assert {s["unit"] for s in client.command("query-services")["return"]} == {
                "web",
                "lazy",
            }
        # the 68 past the limit are refused at once; their warnings are rate-limited
        assert sup.wait_count("metrics_client_refused", LOG_RATE_BURST) == LOG_RATE_BURST
        deadline = time.monotonic() + CONNECTION_TIMEOUT + 15
        for conn in idle:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            assert conn.recv(100) == b""  # closed by the supervisor
        assert sup.wait_count("metrics_client_timeout", MAX_CONNECTIONS) == MAX_CONNECTIONS
        assert sup.count("metrics_client_refused") == LOG_RATE_BURST, "68 refusals, 10 lines"
        assert len(open_fds(sup.pid)) <= before
    finally:
        for conn in idle:
            conn.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"NOT A REQUEST LINE\r\n\r\n", 400),
        (b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_bad_requests(
    metered: tuple[SupervisorProcess, int], request_bytes: bytes, status: int
) -> None:
    _sup, port = metered
    answer = raw_request(port, request_bytes)
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:100]
    assert b"Connection: close" in answer
    scrape(port)  # and the endpoint still answers


def test_bad_address_is_refused(
    supervisor: Callable[..., SupervisorProcess], tmp_path: Any
) -> None:
    (tmp_path / "units").mkdir(exist_ok=True)
    sup = supervisor(
        {"web": WEB},
        args=["--metrics", "127.0.0.1:notaport:x", str(tmp_path / "units")],
        wait_ready=False,
    )
    assert sup.proc.wait(20) == 1
    assert "--metrics" in "\n".join(sup.output)


def test_worker_starts_and_exits_are_counted(metered: tuple[SupervisorProcess, int]) -> None:
    """service-restart: one more start, one exit counted as stopped; lazy has none yet."""
    sup, port = metered
    sup.wait_for("worker_started", unit="web")
    before = scrape(port)
    assert before[("fdsupervisor_worker_starts_total", (("unit", "web"),))] == 1
    assert before[("fdsupervisor_worker_starts_total", (("unit", "lazy"),))] == 0
    mark = sup.mark()
    with RawClient(sup.monitor_path).negotiate() as client:
        assert "error" not in client.command("service-restart", unit="web")
    sup.wait_for("worker_started", unit="web", after=mark)
    sup.wait_for("worker_exited", unit="web", after=mark)  # rolling: the old one stops after
    after = scrape(port)
    assert after[("fdsupervisor_worker_starts_total", (("unit", "web"),))] == 2
    stopped = (("reason", "stopped"), ("unit", "web"))
    assert after[("fdsupervisor_worker_exits_total", stopped)] == 1


def test_activations_accepts_and_pauses_are_counted(
    supervisor: Callable[..., SupervisorProcess], tmp_path: Any
) -> None:
    """7 connections at a trigger-limit of 3 per second: 7 accepted, paused twice; one
    connection to an on-demand unit: one activation; an eager unit has none of either."""
    reply = "import socket\nsocket.socket(fileno=3).sendall(b'served\\n')\n"
    burst, total = 3, 7
    accepting = f"""
    sockets:
      conn:
        listen: "127.0.0.1:0"
        trigger-limit: {{interval: 1s, burst: {burst}}}
    service:
      accept: true
      exec: [{PYTHON}, -c, {json.dumps(reply)}]
    """
    (tmp_path / "units").mkdir(exist_ok=True)
    sup = supervisor(
        {"acc": accepting, "lazy": LAZY, "web": WEB},
        args=["--metrics", "127.0.0.1:0", str(tmp_path / "units")],
    )
    port = int(str(sup.wait_for("metrics_listening")["address"]).rsplit(":", 1)[1])
    accepted = ("fdsupervisor_connections_accepted_total", (("socket", "conn"), ("unit", "acc")))
    paused = ("fdsupervisor_socket_paused_total", (("socket", "conn"), ("unit", "acc")))
    before = scrape(port)
    assert (before[accepted], before[paused]) == (0, 0)
    assert before[("fdsupervisor_activations_total", (("unit", "lazy"),))] == 0

    conns = [
        socket.create_connection(("127.0.0.1", sup.port("conn", "acc")), timeout=15)
        for _ in range(total)
    ]
    try:
        assert [read_until_eof(conn) for conn in conns] == [b"served\n"] * total
    finally:
        for conn in conns:
            conn.close()
    sup.wait_count("socket_paused", 2, unit="acc")
    report_from("127.0.0.1", sup.port("http", "lazy"))  # the first traffic starts lazy
    after = scrape(port)
    assert (after[accepted], after[paused]) == (total, 2)
    assert after[("fdsupervisor_activations_total", (("unit", "lazy"),))] == 1
    assert after[("fdsupervisor_activations_total", (("unit", "web"),))] == 0
    assert after[("fdsupervisor_activations_total", (("unit", "acc"),))] == 0
    assert after[("fdsupervisor_socket_paused_total", (("socket", "http"), ("unit", "web")))] == 0
    # accept-mode sockets only: web's and lazy's workers take their connections themselves
    assert not [
        labels
        for (name, labels), _ in after.items()
        if name == "fdsupervisor_connections_accepted_total" and dict(labels)["unit"] != "acc"
    ]


def test_the_endpoint_survives_an_upgrade(metered: tuple[SupervisorProcess, int]) -> None:
    """Its listening socket crosses the exec: the same port (it was :0), no scrape refused."""
    sup, port = metered
    sup.wait_for("worker_started", unit="web")
    assert scrape(port)[("fdsupervisor_worker_starts_total", (("unit", "web"),))] == 1
    outcome = {"ok": 0, "refused": 0, "other": 0}
    stop = threading.Event()

    def scrape_in_a_loop() -> None:
        deadline = time.monotonic() + 30  # bounded
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                scrape(port)
                outcome["ok"] += 1
            except ConnectionRefusedError:
                outcome["refused"] += 1
            except OSError:
                outcome["other"] += 1  # a scrape the exec cut short

    scraper = threading.Thread(target=scrape_in_a_loop)
    scraper.start()
    try:
        mark = sup.mark()
        os.kill(sup.pid, signal.SIGUSR2)
        sup.wait_for("upgraded", after=mark, timeout=30)
        listening = sup.wait_for("metrics_listening", after=mark)
    finally:
        stop.set()
        scraper.join(35)
    assert listening["address"] == f"127.0.0.1:{port}"
    assert outcome["refused"] == 0 and outcome["ok"] > 0, outcome
    after = scrape(port)
    # the new program's counters start again; the services' own state crossed
    assert after[("fdsupervisor_worker_starts_total", (("unit", "web"),))] == 0
    assert after[("fdsupervisor_workers", (("unit", "web"),))] == 1
    assert sup.count("metrics_unavailable") == 0


def test_the_endpoint_survives_an_upgrade_that_falls_back(
    metered: tuple[SupervisorProcess, int], tmp_path: Any
) -> None:
    """A new program that fails (a new socket on a port in use) gives the old units back, and
    the handed-over metrics socket with them."""
    sup, port = metered
    web_port = sup.port("http", "web")
    fds_before = settled_fd_count(sup)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        (tmp_path / "units" / "web.yaml").write_text(web_with_extra(web_port, f"127.0.0.1:{busy}"))
        mark = sup.mark()
        os.kill(sup.pid, signal.SIGUSR2)
        sup.wait_for("upgrade_rolled_back", after=mark, timeout=30)
    assert sup.wait_for("metrics_listening", after=mark)["address"] == f"127.0.0.1:{port}"
    assert scrape(port)[("fdsupervisor_workers", (("unit", "web"),))] == 1
    assert sup.count("metrics_unavailable") == 0
    assert settled_fd_count(sup) == fds_before, "the copies are closed, the originals serve"
