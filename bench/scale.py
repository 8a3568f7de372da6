"""Scale: 1,000 units, each one TCP socket and one ``sleep 3600`` worker, against circus.

Both peers get the same N loopback ports (picked free at the start, below
the ephemeral range) and run ``/usr/bin/sleep 3600`` as each socket's
worker:
- ``fdsupervisor``: a directory of N unit files (``listen: 127.0.0.1:PORT``,
  ``exec: [/usr/bin/sleep, "3600"]``), ``--log-format json --no-monitor``;
- ``circus``: one ``circus.ini`` with N ``[socket:sK]`` and N ``[watcher:wK]``
  sections (``use_sockets = True``, ``numprocesses = 1``, ``warmup_delay = 0``),
  everything else at circus's defaults (``check_delay`` 5 s).

Measured for each run, each peer started fresh:
- ready: from the spawn of the peer until all N ports are listening (read from
  /proc/net/tcp, no connection made) and N ``sleep`` processes are its direct
  children, observed by the same poll (every 10 ms) for both peers; for
  fdsupervisor also the ``ready`` event of its JSON log, which it writes once
  every socket is bound and every eager worker has exec'd;
- RSS: the supervisor process's VmRSS right after ready (workers excluded);
- idle CPU: user + system CPU-seconds of the supervisor process (all its
  threads) over ``--idle`` seconds (default 20) with nothing happening.

Targets (issue 6): ready in at most half circus's time, RSS at most circus's,
0.00 CPU-seconds idle. RLIMIT_NOFILE is raised to its hard limit for this
process and so for both peers. Every peer is stopped by pid (SIGTERM, then
SIGKILL to it and its process group) and every ``sleep`` it started is
checked gone, through a pidfd taken while it ran (circus puts each worker in
a session of its own, out of reach of the group kill).
Usage: ``python bench/scale.py [--units N] [--runs R] [--idle S] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from common import (
    Peer,
    PeerExited,
    bench_env,
    children_of,
    cpu_seconds,
    fdsupervisor_command,
    is_event,
    parse_json_line,
    spread,
    write_json,
)

OURS, CIRCUS = "fdsupervisor", "circus"
SLEEP = "/usr/bin/sleep"
POLL = 0.01  # seconds between two looks at /proc while a peer starts
READY_TIMEOUT = 600.0
FIRST_PORT = 20000  # below net.ipv4.ip_local_port_range (32768 by default)
TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10


@dataclass
class RunResult:
    ready_s: float  # by the external poll, the same for both peers
    ready_event_s: float | None  # fdsupervisor's own ``ready`` log event
    rss_kib: int
    idle_cpu_s: float
    workers: int


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports that nothing listens on or uses now, from FIRST_PORT up."""
    ports: list[int] = []
    port = FIRST_PORT
    while len(ports) < count:
        if port > 32767:
            raise RuntimeError(f"fewer than {count} free ports in {FIRST_PORT}-32767")
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
                ports.append(port)
            except OSError:
                pass
        port += 1
    return ports


def listening_ports() -> set[int]:
    """Every TCP port some socket on 127.0.0.1 (or any address) listens on, from /proc."""
    ports = set()
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == TCP_LISTEN and address in ("0100007F", "00000000"):
                ports.add(int(port, 16))
    return ports


def comm_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except FileNotFoundError:
        return ""


def sleep_children(pid: int) -> list[int]:
    return [child for child in children_of(pid) if comm_of(child) == "sleep"]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# -- the peers --------------------------------------------------------------------------------


def start_ours(directory: Path, ports: list[int]) -> Peer:
    units = directory / "units"
    units.mkdir()
    for index, port in enumerate(ports):
        (units / f"u{index:04d}.yaml").write_text(
            f'sockets:\n  s:\n    listen: "127.0.0.1:{port}"\nservice:\n  exec: [{SLEEP}, "3600"]\n'
        )
    command = [*fdsupervisor_command(), "run", "--no-monitor", "--log-format", "json", str(units)]
    return Peer(OURS, command, directory / f"{OURS}.log", env=bench_env(), cwd=directory)


def start_circus(directory: Path, ports: list[int]) -> Peer:
    sections = [
        "[circus]\n"
        f"endpoint = ipc://{directory}/circus-control.sock\n"
        f"pubsub_endpoint = ipc://{directory}/circus-pubsub.sock\n"
        "multicast_endpoint =\n"  # empty: no UDP multicast discovery socket
        "statsd = False\n"
    ]
    for index, port in enumerate(ports):
        sections.append(f"[socket:s{index}]\nhost = 127.0.0.1\nport = {port}\n")
        sections.append(
            f"[watcher:w{index}]\ncmd = {SLEEP} 3600\nuse_sockets = True\n"
            "numprocesses = 1\nwarmup_delay = 0\n"
        )
    config = directory / "circus.ini"
    config.write_text("\n".join(sections))
    command = [sys.executable, "-m", "circus.circusd", str(config)]
    return Peer(CIRCUS, command, directory / f"{CIRCUS}.log", env=bench_env(), cwd=directory)


STARTERS: dict[str, Callable[[Path, list[int]], Peer]] = {OURS: start_ours, CIRCUS: start_circus}


def wait_until_ready(peer: Peer, ports: list[int], begin: float) -> float:
    """Seconds from ``begin`` until all ports listen and one sleep per port runs (bounded)."""
    wanted = set(ports)
    deadline = begin + READY_TIMEOUT
    while True:
        looked = time.perf_counter()
        if peer.proc.poll() is not None:
            peer.new_lines()
            raise PeerExited(peer.name, peer.proc.returncode, peer.lines)
        # cheap test first (one /proc read); the full one only once it can succeed
        if (
            len(children_of(peer.proc.pid)) >= len(ports)
            and len(sleep_children(peer.proc.pid)) >= len(ports)
            and wanted <= listening_ports()
        ):
            return looked - begin
        if looked > deadline:
            raise TimeoutError(f"{peer.name} not ready after {READY_TIMEOUT:g} s")
        time.sleep(POLL)  # polling a peer's /proc entries; this loop is what is measured


def one_run(name: str, directory: Path, ports: list[int], idle: float) -> RunResult:
    wall_begin, begin = time.time(), time.perf_counter()
    peer = STARTERS[name](directory, ports)
    pidfds: list[int] = []
    try:
        ready = wait_until_ready(peer, ports, begin)
        ready_event = None
        if name == OURS:
            line = peer.wait_for_line(is_event("ready"), timeout=READY_TIMEOUT)
            event = parse_json_line(line) or {}
            # written before we read it: the time it carries, not when we saw it
            stamp = datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00"))
            ready_event = stamp.timestamp() - wall_begin
        workers = sleep_children(peer.proc.pid)
        for pid in workers:
            try:
                pidfds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                pass
        rss = rss_kib(peer.proc.pid)
        before = cpu_seconds(peer.proc.pid)
        time.sleep(idle)  # the idle period whose CPU use is measured
        idle_cpu = cpu_seconds(peer.proc.pid) - before
        if len(sleep_children(peer.proc.pid)) != len(ports):
            raise RuntimeError(f"{name}: workers died while idle")
    finally:
        peer.stop(timeout=120.0)
        _end_survivors(name, pidfds)
    return RunResult(ready, ready_event, rss, idle_cpu, len(workers))


def _end_survivors(name: str, pidfds: list[int]) -> None:
    """Every sleep the peer started must be gone; any left over is killed, by pidfd."""
    left = 0
    deadline = time.monotonic() + 30
    for pidfd in pidfds:
        if not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            left += 1
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
    if left:
        print(f"  {name}: {left} sleep processes outlived their supervisor; killed", flush=True)


# -- report -----------------------------------------------------------------------------------


def report(results: dict[str, list[RunResult]], units: int, idle: float) -> dict[str, Any]:
    def values(name: str, key: str) -> list[float]:
        return [getattr(r, key) for r in results.get(name, []) if getattr(r, key) is not None]

    def median(name: str, key: str) -> float | None:
        found = values(name, key)
        return statistics.median(found) if found else None

    rows = [
        ("ready: all listening, all running (s)", "ready_s", 2, 1.0),
        ("RSS after ready (MiB)", "rss_kib", 1, 1 / 1024),
        (f"CPU-seconds over {idle:g} s idle", "idle_cpu_s", 2, 1.0),
    ]
    print(f"{units} units, one TCP socket and one sleep each; medians (min - max) of the runs")
    header = f"  {'':<40} {'fdsupervisor':>22} {'circus':>22} {'ours/circus':>12}"
    print(header)
    ratios: dict[str, float] = {}
    for label, key, digits, scale in rows:
        cells = []
        for name in (OURS, CIRCUS):
            found = [v * scale for v in values(name, key)]
            cells.append(spread(found, digits) if found else "n/a")
        ours, theirs = median(OURS, key), median(CIRCUS, key)
        ratio = ""
        if ours is not None and theirs:
            ratios[key] = ours / theirs
            ratio = f"{ours / theirs:.2f}x"
        print(f"  {label:<40} {cells[0]:>22} {cells[1]:>22} {ratio:>12}")
    event = values(OURS, "ready_event_s")
    if event:
        print(f"  {'fdsupervisor ready event (s)':<40} {spread(event, 2):>22}")
    summary: dict[str, Any] = {"ratios": ratios}
    ours_ready, circus_ready = median(OURS, "ready_s"), median(CIRCUS, "ready_s")
    ours_rss, circus_rss = median(OURS, "rss_kib"), median(CIRCUS, "rss_kib")
    ours_idle = median(OURS, "idle_cpu_s")
    if None not in (ours_ready, circus_ready, ours_rss, circus_rss, ours_idle):
        assert ours_ready is not None and circus_ready is not None
        assert ours_rss is not None and circus_rss is not None and ours_idle is not None
        targets = {
            "ready <= circus / 2": ours_ready <= circus_ready / 2,
            "RSS <= circus": ours_rss <= circus_rss,
            "idle CPU 0.00": round(ours_idle, 2) == 0.0,
        }
        summary["targets"] = targets
        print(
            "  targets: "
            + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in targets.items())
        )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=20.0, help="idle seconds (default 20)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    limit = raise_fd_limit()
    if limit < 4 * args.units + 64:
        print(
            f"RLIMIT_NOFILE hard limit {limit} is too low for {args.units} units", file=sys.stderr
        )
        return 2
    peers = [OURS]
    unavailable = {}
    try:
        import circus

        circus_version: str | None = str(circus.__version__)
        peers.append(CIRCUS)
    except ImportError:
        circus_version = None
        unavailable[CIRCUS] = "circus is not installed (pip install circus)"
        print("circus is not installed (pip install circus): fdsupervisor alone", file=sys.stderr)
    ports = free_ports(args.units)
    results: dict[str, list[RunResult]] = {}
    with tempfile.TemporaryDirectory(prefix="fdsup-scale-") as tmp:
        for run in range(args.runs):
            shift = run % len(peers)
            for name in peers[shift:] + peers[:shift]:
                directory = Path(tmp) / f"{name}-{run}"
                directory.mkdir()
                try:
                    result = one_run(name, directory, ports, args.idle)
                except (PeerExited, TimeoutError, RuntimeError) as exc:
                    print(f"{name} failed: {exc}", file=sys.stderr)
                    return 1
                results.setdefault(name, []).append(result)
                print(
                    f"  run {run + 1} {name}: ready {result.ready_s:.2f} s, "
                    f"RSS {result.rss_kib / 1024:.1f} MiB, idle CPU {result.idle_cpu_s:.2f} s",
                    flush=True,
                )
    summary = report(results, args.units, args.idle)
    if circus_version is not None:
        print(f"  (circus {circus_version}; RLIMIT_NOFILE {limit})")
    write_json(
        args.json,
        {
            **summary,
            "runs": {name: [vars(r) for r in rs] for name, rs in results.items()},
            "units": args.units,
            "idle_seconds": args.idle,
            "circus_version": circus_version,
            "unavailable": unavailable,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
