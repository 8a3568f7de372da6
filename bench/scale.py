"""Scale: 1,000 to 10,000 units, each one TCP socket and one ``sleep 3600`` worker, and circus.

Both peers get the same N loopback ports (picked free at the start, outside
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
Then the scale series (issue 15), one run of each size: fdsupervisor with
``--sizes`` units (default 1,000, 3,000, 5,000 and 10,000) and circus with
``--circus-sizes`` (default 1,000 and 2,000), the same workload and the same
ready poll. For each size of ours:
- the time per thousand worker starts, from the ``worker_started``
  timestamps of the supervisor's own JSON log (the first thousand counted
  from the log line before the first start), printed as a table with the
  last thousand against the first (target <= 1.3x at 10,000);
- at the largest size whose workers all started: a reload of the unchanged
  units (SIGHUP, to the ``reloaded`` event of the log), with the log between
  the two read for any worker started or stopped or socket bound, closed or
  moved (there must be none: the bench says which it saw).
A size whose workers do not all start (``worker_start_failed`` in the log,
``Too many open files`` while each worker costs a pidfd and the hard
``RLIMIT_NOFILE`` cannot be raised) is reported with how many started; the
hard limit is raised to what the largest size needs where this process may
(``CAP_SYS_RESOURCE``, up to ``fs.nr_open``).
At ``--large`` units (default 10,000), ``activation: on-demand`` and no
worker: ``fdsupervisor check`` (wall time of the command), ``run`` ready (the
``ready`` event), its RSS, and a reload of the unchanged units as above.
Targets: ready of 10,000 within 3x circus's time for 1,000; check <= 2 s;
on-demand ready <= 3 s; RSS at 10,000 <= 80 MiB; reload <= 1 s.
``--chart PATH`` draws start time per thousand and ready time against units
(matplotlib, from the ``bench`` extra); ``make bench`` writes docs/scale.png.
Usage: ``python bench/scale.py [--units N] [--runs R] [--idle S] [--sizes N,N]
[--circus-sizes N,N] [--large N] [--chart PATH] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
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
    readable,
    spread,
    write_json,
)

OURS, CIRCUS = "fdsupervisor", "circus"
SLEEP = "/usr/bin/sleep"
POLL = 0.01  # seconds between two looks at /proc while a peer starts
READY_TIMEOUT = 300.0  # every wait is bounded: a size that cannot start fails
FIRST_PORT = 20000  # below net.ipv4.ip_local_port_range (32768 by default)
TCP_LISTEN = "0A"  # include/net/tcp_states.h: TCP_LISTEN = 10


@dataclass
class RunResult:
    ready_s: float  # by the external poll, the same for both peers
    ready_event_s: float | None  # fdsupervisor's own ``ready`` log event
    rss_kib: int
    idle_cpu_s: float
    workers: int


def raise_fd_limit(wanted: int = 0) -> int:
    """Soft limit to the hard one, and the hard one up to ``wanted`` where we may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted > hard:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            target = min(wanted, nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (OSError, ValueError):  # no CAP_SYS_RESOURCE (a container's root): keep it
            pass
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_ports(count: int) -> list[int]:
    """``count`` loopback ports that nothing listens on or uses now, outside the ephemeral range.

    From FIRST_PORT up to the range (32767 by default), then above it (61000
    up): 10,000 units need more ports than there are below it.
    """
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    ports: list[int] = []
    port = FIRST_PORT
    while len(ports) < count:
        if low <= port <= high:
            port = high + 1
        if port > 65535:
            raise RuntimeError(f"fewer than {count} free ports outside {low}-{high}")
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


def write_units(directory: Path, ports: list[int], *, on_demand: bool = False) -> Path:
    """One unit file per port, in ``directory/units``: a TCP socket and a ``sleep`` worker."""
    units = directory / "units"
    units.mkdir()
    activation = "  activation: on-demand\n" if on_demand else ""
    for index, port in enumerate(ports):
        (units / f"u{index:05d}.yaml").write_text(
            f'sockets:\n  s:\n    listen: "127.0.0.1:{port}"\n'
            f'service:\n  exec: [{SLEEP}, "3600"]\n{activation}'
        )
    return units


def start_ours(directory: Path, ports: list[int]) -> Peer:
    units = write_units(directory, ports)
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


class StartsFailed(RuntimeError):
    """Some workers could not start (the fd limit, mostly): the size does not fit here."""


def machine_threads() -> int:
    """Every thread on the machine: the fourth field of /proc/loadavg, one small read."""
    with open("/proc/loadavg") as loadavg:
        return int(loadavg.read().split()[3].split("/")[1])


def wait_until_ready(
    peer: Peer,
    ports: list[int],
    begin: float,
    baseline: int,
    give_up: Callable[[], str | None] | None = None,
) -> float:
    """Seconds from ``begin`` until all ports listen and one sleep per port runs (bounded).

    ``baseline`` is :func:`machine_threads` before the peer started: until the
    machine has one more thread per port, the peer cannot be ready, and that
    look costs the same at any size. The full look (the peer's children, each
    one's name, /proc/net/tcp) is O(units): made at every poll from the start,
    as before, it took a growing share of the 2 cores from the peer it measured
    (at 10,000 units the last thousand starts took 1.45x the first under it,
    1.05x with the ready event alone). ``give_up`` is asked at each look; a
    reason from it ends the wait (StartsFailed).
    """
    wanted = set(ports)
    deadline = begin + READY_TIMEOUT
    while True:
        looked = time.perf_counter()
        if peer.proc.poll() is not None:
            peer.new_lines()
            raise PeerExited(peer.name, peer.proc.returncode, peer.lines)
        reason = give_up() if give_up is not None else None
        if reason is not None:
            raise StartsFailed(reason)
        # cheap tests first (one small read, then one /proc read); the full one only
        # once it can succeed
        if (
            machine_threads() >= baseline + len(ports)
            and len(children_of(peer.proc.pid)) >= len(ports)
            and len(sleep_children(peer.proc.pid)) >= len(ports)
            and wanted <= listening_ports()
        ):
            return looked - begin
        if looked > deadline:
            raise TimeoutError(f"{peer.name} not ready after {READY_TIMEOUT:g} s")
        time.sleep(POLL)  # polling a peer's /proc entries; this loop is what is measured


def one_run(name: str, directory: Path, ports: list[int], idle: float) -> RunResult:
    baseline = machine_threads()
    wall_begin, begin = time.time(), time.perf_counter()
    peer = STARTERS[name](directory, ports)
    pidfds: list[int] = []
    try:
        ready = wait_until_ready(peer, ports, begin, baseline)
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
        if not readable(pidfd, deadline - time.monotonic()):
            left += 1
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)
    if left:
        print(f"  {name}: {left} sleep processes outlived their supervisor; killed", flush=True)


# -- the scale series (issue 15) --------------------------------------------------------------

# What a reload of unchanged units must not do: start, stop or (re)bind anything.
RELOAD_CHANGES = frozenset(
    {
        "worker_started",
        "worker_stopping",
        "worker_exited",
        "service_stopping",
        "socket_bound",
        "socket_closed",
        "socket_adopted",
        "reload_rolled",
    }
)
# "N units unchanged, 0 restarted, 0 added, 0 removed; sockets: N kept, 0 relistened, ..."
PLAN_COUNT = re.compile(
    r"(\d+) (relistened|moved|rebound|bound|closed|close-first|adopted|restarted|added|removed)"
)


@dataclass
class SizeResult:
    peer: str
    units: int
    ready_s: float | None  # the external poll's; None when not every worker started
    started: int  # workers started (from the log for ours, /proc for circus)
    per_thousand_s: list[float]  # ours: seconds per thousand starts, full thousands only
    rss_kib: int | None
    reload_s: float | None = None
    reload_changes: list[str] | None = None  # what the reload did that it must not have
    failure: str | None = None


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def log_events(lines: list[str]) -> list[dict[str, Any]]:
    return [e for e in map(parse_json_line, lines) if e is not None and "timestamp" in e]


def per_thousand(events: list[dict[str, Any]]) -> list[float]:
    """Seconds each thousand ``worker_started`` events took, by the log's own timestamps.

    The first thousand is counted from the line before the first start (the
    last socket bound, or the cgroup tree made), so that it pays its first spawn.
    """
    firsts = [i for i, e in enumerate(events) if e.get("event") == "worker_started"]
    if not firsts:
        return []
    previous = stamp(events[firsts[0] - 1] if firsts[0] > 0 else events[firsts[0]])
    times = [stamp(events[i]) for i in firsts]
    result = []
    for end in range(1000, len(times) + 1, 1000):
        result.append(times[end - 1] - previous)
        previous = times[end - 1]
    return result


def failed_starts(peer: Peer) -> str | None:
    """The first ``worker_start_failed`` error in the log so far, if any."""
    peer.new_lines()
    for line in peer.lines:
        if '"worker_start_failed"' in line:
            event = parse_json_line(line) or {}
            return str(event.get("error", "worker_start_failed"))
    return None


def wait_for_event(peer: Peer, names: set[str], since: int) -> dict[str, Any]:
    """The first event named in ``names`` after line ``since`` of the log (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        peer.new_lines()
        for event in log_events(peer.lines[since:]):
            if event.get("event") in names:
                return event
        if peer.proc.poll() is not None:
            raise PeerExited(peer.name, peer.proc.returncode, peer.lines)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{peer.name}: none of {sorted(names)} after {READY_TIMEOUT:g} s")
        time.sleep(POLL)  # the log file is polled; the time measured is the event's own


def reload_unchanged(peer: Peer) -> tuple[float, list[str]]:
    """SIGHUP with no unit file changed: seconds to ``reloaded``, and what it changed."""
    peer.new_lines()
    since = len(peer.lines)
    sent = time.time()
    os.kill(peer.proc.pid, signal.SIGHUP)
    done = wait_for_event(peer, {"reloaded", "reload_failed"}, since)
    if done["event"] != "reloaded":
        raise RuntimeError(f"reload failed: {done.get('error')}")
    changes = [
        f"{e['event']} {e.get('unit', '')}".strip()
        for e in log_events(peer.lines[since:])
        if e.get("event") in RELOAD_CHANGES
    ]
    changes += [
        f"plan: {count} {what}"
        for count, what in PLAN_COUNT.findall(str(done.get("plan", "")))
        if count != "0"
    ]
    return stamp(done) - sent, changes


def sized_run(name: str, directory: Path, ports: list[int], *, reload: bool) -> SizeResult:
    """One start of ``len(ports)`` units with sleep workers; ours: its log's start times."""
    baseline = machine_threads()
    begin = time.perf_counter()
    peer = STARTERS[name](directory, ports)
    pidfds: list[int] = []
    result = SizeResult(name, len(ports), None, 0, [], None)
    try:
        give_up = (lambda: failed_starts(peer)) if name == OURS else None
        try:
            result.ready_s = wait_until_ready(peer, ports, begin, baseline, give_up)
            result.rss_kib = rss_kib(peer.proc.pid)
        except StartsFailed as exc:
            time.sleep(2.0)  # the starts still under way end (the retries wait seconds)
            result.failure = str(exc)
        workers = sleep_children(peer.proc.pid)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                pidfds.append(os.pidfd_open(pid))
        result.started = len(workers)
        if name == OURS:
            peer.new_lines()
            events = log_events(peer.lines)
            result.per_thousand_s = per_thousand(events)
            result.started = sum(1 for e in events if e.get("event") == "worker_started")
            if reload and result.failure is None:
                result.reload_s, result.reload_changes = reload_unchanged(peer)
    finally:
        peer.stop(timeout=120.0)
        _end_survivors(name, pidfds)
    return result


@dataclass
class OnDemandResult:
    units: int
    check_s: float
    ready_s: float  # from the spawn to the ``ready`` event's timestamp
    rss_kib: int
    reload_s: float
    reload_changes: list[str]


def on_demand_run(directory: Path, ports: list[int]) -> OnDemandResult:
    """``check``, then ``run`` of ``len(ports)`` on-demand units (no worker) and a reload."""
    units = write_units(directory, ports, on_demand=True)
    begin = time.perf_counter()
    checked = subprocess.run(
        [*fdsupervisor_command(), "check", str(units)],
        capture_output=True,
        env=bench_env(),
        timeout=READY_TIMEOUT,
        check=False,
    )
    check_s = time.perf_counter() - begin
    if checked.returncode != 0:
        raise RuntimeError(f"check failed: {checked.stderr.decode()[-500:]}")
    command = [*fdsupervisor_command(), "run", "--no-monitor", "--log-format", "json", str(units)]
    wall_begin = time.time()
    peer = Peer(OURS, command, directory / "on-demand.log", env=bench_env(), cwd=directory)
    try:
        ready = stamp(wait_for_event(peer, {"ready"}, 0)) - wall_begin
        rss = rss_kib(peer.proc.pid)
        reload_s, changes = reload_unchanged(peer)
    finally:
        peer.stop(timeout=120.0)
    return OnDemandResult(len(ports), check_s, ready, rss, reload_s, changes)


def report_series(
    sized: list[SizeResult], large: OnDemandResult | None, limit: int
) -> dict[str, Any]:
    ours = [r for r in sized if r.peer == OURS]
    print("\nScale series: one run of each size, one TCP socket and one sleep worker per unit")
    print("  time per thousand worker starts (s; = ms per start), from worker_started timestamps")
    print("  " + f"{'starts':<14}" + "".join(f"{r.units:>9}" for r in ours))
    rows = max((len(r.per_thousand_s) for r in ours), default=0)
    for index in range(rows):
        label = f"{index * 1000 + 1}-{(index + 1) * 1000}"
        cells = [
            f"{r.per_thousand_s[index]:>9.2f}" if index < len(r.per_thousand_s) else f"{'':>9}"
            for r in ours
        ]
        print("  " + f"{label:<14}" + "".join(cells))
    ratios = {
        r.units: r.per_thousand_s[-1] / r.per_thousand_s[0]
        for r in ours
        if len(r.per_thousand_s) >= 2 and r.per_thousand_s[0] > 0
    }
    print(
        "  "
        + f"{'last/first':<14}"
        + "".join(f"{ratios[r.units]:>8.2f}x" if r.units in ratios else f"{'':>9}" for r in ours)
    )
    print(f"  {'units':>8} {'peer':<14} {'ready (s)':>10} {'ms/unit':>8} {'RSS (MiB)':>10}")
    for r in sized:
        if r.ready_s is None:
            print(f"  {r.units:>8} {r.peer:<14} {'n/a':>10}  {r.started} started: {r.failure}")
            continue
        rss = f"{r.rss_kib / 1024:.1f}" if r.rss_kib is not None else "n/a"
        ms = 1000 * r.ready_s / r.units
        print(f"  {r.units:>8} {r.peer:<14} {r.ready_s:>10.2f} {ms:>8.2f} {rss:>10}")
    for r in ours:
        if r.reload_s is not None:
            did = ", ".join(r.reload_changes or []) or "nothing started, stopped or rebound"
            print(
                f"  reload (SIGHUP) of {r.units} unchanged units with workers: {r.reload_s:.2f} s; {did}"
            )
    if large is not None:
        did = ", ".join(large.reload_changes) or "nothing started, stopped or rebound"
        print(f"  {large.units} on-demand units (no worker):")
        print(
            f"    check {large.check_s:.2f} s; run ready {large.ready_s:.2f} s; RSS {large.rss_kib / 1024:.1f} MiB"
        )
        print(f"    reload (SIGHUP) of the unchanged units: {large.reload_s:.2f} s; {did}")
    circus_1000 = next((r.ready_s for r in sized if r.peer == CIRCUS and r.units == 1000), None)
    biggest = max((r for r in ours if r.ready_s is not None), key=lambda r: r.units, default=None)
    targets: dict[str, bool] = {}
    if biggest is not None and len(biggest.per_thousand_s) >= 2:
        targets[f"last/first thousand <= 1.3x ({biggest.units} units)"] = (
            ratios[biggest.units] <= 1.3
        )
    if biggest is not None and biggest.ready_s is not None and circus_1000 is not None:
        targets[f"ready ({biggest.units} units) <= 3x circus (1000)"] = (
            biggest.ready_s <= 3 * circus_1000
        )
    if biggest is not None and biggest.rss_kib is not None:
        targets[f"RSS ({biggest.units} units) <= 80 MiB"] = biggest.rss_kib <= 80 * 1024
    if large is not None:
        targets[f"check ({large.units}) <= 2 s"] = large.check_s <= 2.0
        targets[f"on-demand ready ({large.units}) <= 3 s"] = large.ready_s <= 3.0
        targets[f"on-demand RSS ({large.units}) <= 80 MiB"] = large.rss_kib <= 80 * 1024
        targets[f"reload ({large.units}) <= 1 s, nothing changed"] = (
            large.reload_s <= 1.0 and not large.reload_changes
        )
    print(
        "  targets: "
        + "; ".join(f"{name}: {'met' if met else 'NOT met'}" for name, met in targets.items())
    )
    missing = [r for r in ours if r.ready_s is None]
    if missing:
        print(
            f"  (RLIMIT_NOFILE hard limit {limit}: "
            + "; ".join(f"{r.units} units: {r.started} workers started" for r in missing)
            + ")"
        )
    return {"per_thousand_ratio": ratios, "targets": targets}


def draw_chart(path: Path, sized: list[SizeResult]) -> None:
    """Start time per thousand (ours, each size) and ready time against units (both peers)."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no display
    from matplotlib import pyplot
    from matplotlib.ticker import MaxNLocator

    figure, (starts, ready) = pyplot.subplots(1, 2, figsize=(11, 4.2))
    for r in (r for r in sized if r.peer == OURS and r.per_thousand_s):
        thousands = range(1, len(r.per_thousand_s) + 1)
        label = f"{r.units} units" + ("" if r.ready_s is not None else " (not all started)")
        starts.plot(thousands, r.per_thousand_s, marker="o", label=label)  # s/1000 = ms
    starts.set_xlabel("thousand of worker starts")
    starts.set_ylabel("ms per start (worker_started log)")
    starts.set_title("fdsupervisor: time per worker start")
    starts.set_ylim(bottom=0)
    starts.xaxis.set_major_locator(MaxNLocator(integer=True))
    starts.legend()
    for name, style in ((OURS, "o-"), (CIRCUS, "s--")):
        points = sorted((r.units, r.ready_s) for r in sized if r.peer == name and r.ready_s)
        if points:
            ready.plot(*zip(*points, strict=True), style, label=name)
    ready.set_xlabel("units (one TCP socket, one sleep worker each)")
    ready.set_ylabel("ready (s)")
    ready.set_title("ready time against units")
    ready.set_ylim(bottom=0)
    ready.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    print(f"  chart: {path}")


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


def sizes(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def scale_series(
    tmp: Path, args: argparse.Namespace, peers: list[str]
) -> tuple[list[SizeResult], OnDemandResult | None]:
    """One run of each size, circus's and ours interleaved (smallest first); then on-demand."""
    runs = [(OURS, n) for n in args.sizes]
    if CIRCUS in peers:
        runs += [(CIRCUS, n) for n in args.circus_sizes]
    runs.sort(key=lambda run: (run[1], run[0] != CIRCUS))
    sized: list[SizeResult] = []
    for name, count in runs:
        directory = tmp / f"{name}-{count}"
        directory.mkdir()
        # Picked again for each run: other programs on the machine take ports meanwhile.
        # The reload with workers: at every size of ours (where all started).
        result = sized_run(name, directory, free_ports(count), reload=name == OURS)
        sized.append(result)
        ready = f"ready {result.ready_s:.2f} s" if result.ready_s is not None else "not ready"
        print(
            f"  {name} {count} units: {ready}, {result.started} workers started"
            + (f" ({result.failure})" if result.failure else ""),
            flush=True,
        )
    large = None
    if args.large:
        directory = tmp / "on-demand"
        directory.mkdir()
        large = on_demand_run(directory, free_ports(args.large))
        print(f"  on-demand {args.large} units: ready {large.ready_s:.2f} s", flush=True)
    return sized, large


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle", type=float, default=20.0, help="idle seconds (default 20)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--sizes", type=sizes, default=[1000, 3000, 5000, 10000], help="ours: units per run"
    )
    parser.add_argument("--circus-sizes", type=sizes, default=[1000, 2000])
    parser.add_argument("--large", type=int, default=10000, help="on-demand units (0: none)")
    parser.add_argument("--chart", type=Path, help="draw the chart here (PNG, matplotlib)")
    args = parser.parse_args()
    # ours: a socket per unit and a constant; circus: a socket and its pipes per watcher
    limit = raise_fd_limit(2 * max([args.units, *args.sizes, args.large]) + 256)
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
        sized, large = scale_series(Path(tmp), args, peers)
    summary = report(results, args.units, args.idle)
    summary["series"] = report_series(sized, large, limit)
    if args.chart is not None:
        draw_chart(args.chart, sized)
    if circus_version is not None:
        print(f"  (circus {circus_version}; RLIMIT_NOFILE {limit})")
    write_json(
        args.json,
        {
            **summary,
            "runs": {name: [vars(r) for r in rs] for name, rs in results.items()},
            "sizes": [vars(r) for r in sized],
            "on_demand": vars(large) if large is not None else None,
            "units": args.units,
            "idle_seconds": args.idle,
            "circus_version": circus_version,
            "unavailable": unavailable,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
