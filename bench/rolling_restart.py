"""Rolling restart: requests at a steady rate while the service's workers are all replaced.

The client makes ``--rate`` requests per second for ``--duration`` seconds on
a fixed schedule (open loop), each one connection, one line sent and read
back, a ``--timeout`` of 2 s. Meanwhile the service (``--instances`` 3
workers sharing one listening socket) is restarted every ``--restart-every``
seconds. Both peers run the same worker, ``bench/workers/slow_start.py``:
it takes ``--startup`` (300 ms) before it accepts anything, then says
READY=1 if it has a ``NOTIFY_SOCKET``, and on SIGTERM finishes the connection
it has and exits. Peers:
- ``fdsupervisor``: a unit with ``instances: 3``, ``notify: true``, restarted
  with the monitor's ``service-restart`` (a rolling restart: one new worker,
  its READY=1, then one old worker stopped);
- ``circus``: ``[socket:web]`` and ``[watcher:web]`` (``numprocesses = 3``,
  ``use_sockets``), restarted with circus's ``reload`` (graceful: it spawns
  the new processes, then stops the old ones; circus has no readiness, so it
  cannot wait for the new ones to be able to serve).

Both hold the socket, so nothing is refused; what differs is whether some
worker serves while the new ones start. Every peer is started fresh for each
run; the order rotates run by run. Reports per peer the requests that failed
(goal: 0), the p50 / p99 / max latency of the successful ones and the stall
(the longest time without a successful reply), medians (min - max) over the
runs, and the ratio. Usage: ``python bench/rolling_restart.py [--runs N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    WORKERS,
    Outcome,
    Peer,
    PeerExited,
    bench_env,
    cmdline_of,
    fdsupervisor_command,
    free_port,
    interleaved_runs,
    percentile,
    run_connections,
    spread,
    wait_for_unix_socket,
    write_json,
)
from restart_gap import LINE, without_missing_circus

WORKER = WORKERS / "slow_start.py"
OURS, CIRCUS = "fdsupervisor", "circus"


@dataclass
class Running:
    peer: Peer
    port: int
    restart: Callable[[], None]  # one whole restart of the service, returns when it is over


def worker_command(run: Path, startup: float, fd: str | None = None) -> list[str]:
    command = [sys.executable, str(WORKER), "--startup", str(startup), "--run", str(run)]
    return command if fd is None else [*command, "--fd", fd]


def start_ours(directory: Path, port: int, args: argparse.Namespace) -> Running:
    monitor = directory / "monitor.sock"
    argv = ", ".join(json.dumps(a) for a in worker_command(directory, args.startup))
    unit = directory / "web.yaml"
    unit.write_text(
        "sockets:\n"
        f'  http: {{listen: "127.0.0.1:{port}", backlog: 1024}}\n'
        "service:\n"
        f"  exec: [{argv}]\n"
        f"  instances: {args.instances}\n"
        "  notify: true\n"
        "  start-timeout: 10s\n"
        "  stop-timeout: 5s\n"
    )
    command = [*fdsupervisor_command(), "run", "--monitor", str(monitor), str(unit)]
    peer = Peer(OURS, command, directory / f"{OURS}.log", env=bench_env())
    wait_for_unix_socket(monitor, proc=peer.proc)

    def restart() -> None:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(30)
            conn.connect(str(monitor))
            reader = conn.makefile("rb")
            reader.readline()  # greeting
            for command in ("qmp_capabilities", "service-restart"):
                message: dict[str, Any] = {"execute": command}
                if command == "service-restart":
                    message["arguments"] = {"unit": "web"}
                conn.sendall(json.dumps(message).encode())
                while True:  # events may come first
                    reply = json.loads(reader.readline())
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise RuntimeError(f"service-restart failed: {reply['error']['desc']}")

    return Running(peer, port, restart)


def start_circus(directory: Path, port: int, args: argparse.Namespace) -> Running:
    endpoint = f"ipc://{directory}/circus-control.sock"
    cmd = " ".join(worker_command(directory, args.startup, "$(circus.sockets.web)"))
    config = directory / "circus.ini"
    config.write_text(
        "[circus]\n"
        "check_delay = 0.1\n"
        f"endpoint = {endpoint}\n"
        f"pubsub_endpoint = ipc://{directory}/circus-pubsub.sock\n"
        "multicast_endpoint =\n"
        "statsd = False\n"
        "\n"
        "[socket:web]\n"
        "host = 127.0.0.1\n"
        f"port = {port}\n"
        "backlog = 1024\n"
        "\n"
        "[watcher:web]\n"
        f"cmd = {cmd}\n"
        "use_sockets = True\n"
        f"numprocesses = {args.instances}\n"
        "warmup_delay = 0\n"
        "graceful_timeout = 5\n"
        "copy_env = True\n"
    )
    command = [sys.executable, "-m", "circus.circusd", str(config)]
    peer = Peer(CIRCUS, command, directory / f"{CIRCUS}.log", env=bench_env(), cwd=directory)

    def restart() -> None:
        from circus.client import CircusClient

        client = CircusClient(endpoint=endpoint, timeout=30)
        try:
            answer = client.send_message("reload", name="web", graceful=True, waiting=True)
        finally:
            client.stop()
        if answer.get("status") != "ok":
            raise RuntimeError(f"circus reload failed: {answer}")

    return Running(peer, port, restart)


def wait_until_serving(running: Running, timeout: float = 30.0) -> None:
    """Until one request gets its line back (bounded); the peer must stay up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running.peer.proc.poll() is not None:
            running.peer.new_lines()
            raise PeerExited(running.peer.name, running.peer.proc.returncode, running.peer.lines)
        (outcome,) = run_connections(
            ("127.0.0.1", running.port), 1, send=LINE, expect=LINE, until_eof=False,
            concurrency=1, timeout=1.0,
        )  # fmt: skip
        if outcome.kind == "ok":
            return
        time.sleep(0.02)  # not measured: waiting for the peer to come up
    raise TimeoutError(f"{running.peer.name} serves nothing after {timeout}s")


class Restarter(threading.Thread):
    """Restarts the service every ``every`` seconds from ``begin``; records each restart's span."""

    def __init__(self, running: Running, begin: float, every: float, duration: float) -> None:
        super().__init__(daemon=True)
        self.running, self.begin, self.every, self.duration = running, begin, every, duration
        self.stop_event = threading.Event()
        self.spans: list[tuple[float, float]] = []
        self.error: str | None = None

    def run(self) -> None:
        for k in range(max(1, int(self.duration / self.every) - 1)):
            due = self.begin + self.every * (k + 0.5)
            if self.stop_event.wait(max(0.0, due - time.perf_counter())):
                return
            before = time.perf_counter()
            try:
                self.running.restart()
            except (OSError, RuntimeError, ValueError) as exc:
                self.error = str(exc)
                return
            self.spans.append((before, time.perf_counter()))


@dataclass
class RunResult:
    requests: int
    failures: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    stall_ms: float
    restarts: int
    restart_s: float  # median time a restart took, as the command saw it

    @property
    def ok(self) -> int:
        return self.requests - sum(self.failures.values())


def summarize(outcomes: list[Outcome], begin: float, end: float, spans: list[Any]) -> RunResult:
    ok = [o for o in outcomes if o.kind == "ok"]
    latencies = [o.latency * 1000.0 for o in ok]
    marks = [begin, *sorted(o.end for o in ok), end]
    stall = max(b - a for a, b in itertools.pairwise(marks)) * 1000.0
    return RunResult(
        requests=len(outcomes),
        failures=dict(Counter(o.kind for o in outcomes if o.kind != "ok")),
        p50_ms=percentile(latencies, 0.50),
        p99_ms=percentile(latencies, 0.99),
        max_ms=max(latencies, default=float("nan")),
        stall_ms=stall,
        restarts=len(spans),
        restart_s=statistics.median(b - a for a, b in spans) if spans else float("nan"),
    )


def one_run(name: str, directory: Path, args: argparse.Namespace) -> RunResult:
    port = free_port()
    start = start_ours if name == OURS else start_circus
    running = start(directory, port, args)
    try:
        wait_until_serving(running)
        time.sleep(args.startup + args.settle)  # every worker up, not only the first
        count = round(args.rate * args.duration)
        begin = time.perf_counter() + 0.01
        restarter = Restarter(running, begin, args.restart_every, args.duration)
        restarter.start()
        try:
            outcomes = run_connections(
                ("127.0.0.1", port), count, send=LINE, expect=LINE, until_eof=False,
                rate=args.rate, timeout=args.timeout, begin=begin,
            )  # fmt: skip
        finally:
            restarter.stop_event.set()
            restarter.join(30.0)
        end = time.perf_counter()
        if restarter.error is not None:
            raise RuntimeError(f"{name}: {restarter.error}")
    finally:
        running.peer.stop()
        end_leftovers(name, directory)
    return summarize(outcomes, begin, end, restarter.spans)


def end_leftovers(name: str, directory: Path) -> None:
    """SIGKILL any worker of this run that outlived its peer's clean stop, and say so."""
    mark = str(directory)
    leftovers = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = cmdline_of(int(entry))
            if str(WORKER) in argv and mark in argv:
                leftovers.append(int(entry))
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    if leftovers:
        print(f"  warning: {name} left workers {leftovers} running (killed them)", file=sys.stderr)


def report(
    results: dict[str, list[RunResult]], unavailable: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    print(
        f"rolling restart: {args.rate:g} requests/s for {args.duration:g} s, {args.instances} "
        f"workers taking {args.startup:g} s to start, all replaced every {args.restart_every:g} s, "
        f"timeout {args.timeout:g} s, {args.runs} runs, a fresh peer each"
    )
    print(
        f"  {'peer':<14} {'ok/requests':>13}  {'failed (all runs)':<20} {'p50 ms':<18} "
        f"{'p99 ms':<22} {'max ms':<22} {'stall ms':<22} restart s"
    )
    summary: dict[str, Any] = {}
    for name in (OURS, CIRCUS):
        if name in unavailable:
            print(f"  {name:<14} unavailable: {unavailable[name]}")
            continue
        runs = results[name]
        ok, total = sum(r.ok for r in runs), sum(r.requests for r in runs)
        failed: Counter[str] = Counter()
        for r in runs:
            failed.update(r.failures)
        failed_text = ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "none"
        print(
            f"  {name:<14} {f'{ok}/{total}':>13}  {failed_text:<20} "
            f"{spread([r.p50_ms for r in runs]):<18} {spread([r.p99_ms for r in runs]):<22} "
            f"{spread([r.max_ms for r in runs]):<22} {spread([r.stall_ms for r in runs]):<22} "
            f"{spread([r.restart_s for r in runs], 2)} ({sum(r.restarts for r in runs)} restarts)"
        )
        summary[name] = {
            "ok": ok,
            "requests": total,
            "failed": dict(failed),
            "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "max_ms": statistics.median(r.max_ms for r in runs),
            "stall_ms": statistics.median(r.stall_ms for r in runs),
            "restart_s": statistics.median(r.restart_s for r in runs),
            "runs": [vars(r) for r in runs],
        }
    ours, theirs = summary.get(OURS), summary.get(CIRCUS)
    ratios: dict[str, float] = {}
    if ours is not None and theirs is not None:
        ratios = {
            f"p99 {OURS}/{CIRCUS}": ours["p99_ms"] / theirs["p99_ms"],
            f"stall {OURS}/{CIRCUS}": ours["stall_ms"] / theirs["stall_ms"],
        }
        print(
            f"  ratio {OURS}/{CIRCUS}: p99 {ratios[f'p99 {OURS}/{CIRCUS}']:.3f}x, "
            f"stall {ratios[f'stall {OURS}/{CIRCUS}']:.3f}x, failed "
            f"{sum(ours['failed'].values())} vs {sum(theirs['failed'].values())}"
        )
    if ours is not None:
        failed_count = sum(ours["failed"].values())
        print(
            f"  target {OURS}: 0 failed during rolling restarts: "
            f"{'met' if not failed_count else 'NOT met'} ({failed_count} failed)"
        )
    return {"peers": summary, "ratios": ratios, "unavailable": unavailable}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s (default 200)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds (default 8)")
    parser.add_argument("--restart-every", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--startup", type=float, default=0.3, help="worker start-up, s")
    parser.add_argument("--timeout", type=float, default=2.0, help="per request (default 2)")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after first reply")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    peers, unavailable, circus_version = without_missing_circus([OURS, CIRCUS])
    results = interleaved_runs(peers, args.runs, lambda name, d: one_run(name, d, args))
    if results is None:
        return 1
    summary = report(results, unavailable, args)
    if circus_version is not None:
        print(f"  (circus {circus_version})")
    write_json(
        args.json,
        {
            **summary,
            "circus_version": circus_version,
            **{k: v for k, v in vars(args).items() if k != "json"},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
