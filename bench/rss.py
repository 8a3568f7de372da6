"""RSS at scale: the supervisor's VmRSS after ``ready`` with N units, and where the bytes are.

The units are bench/scale.py's (one TCP socket on loopback and a ``sleep``
worker each, or ``activation: on-demand`` and no worker). For each run the
supervisor is started fresh, the bench waits for its ``ready`` log event and
reads VmRSS from /proc/PID/status (workers excluded), then stops it.

``--trace`` runs the supervisor once more inside a tracemalloc'd child and
prints the top owners of what is allocated after ``ready`` (by file, by
line, and by the innermost frame in the package: the owner), with the
traced total per unit: what to cut next (tracemalloc makes the workers'
starts slow: 1,000 units take minutes).
Usage: ``python bench/rss.py [--units N] [--runs R] [--on-demand] [--trace]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from common import Peer, bench_env, fdsupervisor_command, is_event
from scale import free_ports, raise_fd_limit, rss_kib, sleep_children, write_units

READY_TIMEOUT = 300.0


def one_run(units: int, on_demand: bool, trace: bool) -> tuple[float, str]:
    """VmRSS in MiB after ready, and the trace report (empty without ``trace``)."""
    with tempfile.TemporaryDirectory(prefix="fds-rss-") as tmp:
        directory = Path(tmp)
        unit_dir = write_units(directory, free_ports(units), on_demand=on_demand)
        report = directory / "trace.txt"
        if trace:
            command = [sys.executable, __file__, "--trace-child", str(report), str(unit_dir)]
        else:
            command = [*fdsupervisor_command(), "run", "--no-monitor", "--log-format", "json"]
            command.append(str(unit_dir))
        peer = Peer("fdsupervisor", command, directory / "log", env=bench_env(), cwd=directory)
        try:
            peer.wait_for_line(is_event("ready"), READY_TIMEOUT)
            if trace:
                peer.wait_for_line(is_event("stopped"), READY_TIMEOUT)
                return 0.0, report.read_text()
            if not on_demand:  # ready says every worker exec'd: seen from /proc too
                deadline = time.monotonic() + READY_TIMEOUT
                while len(sleep_children(peer.proc.pid)) < units:
                    if time.monotonic() > deadline:
                        raise TimeoutError("workers did not all start")
                    time.sleep(0.05)  # polling /proc; not measured
            return rss_kib(peer.proc.pid) / 1024, ""
        finally:
            peer.stop(30)  # SIGTERM: the supervisor stops its workers


def trace_child(report: Path, unit_dir: str) -> None:
    """Run the supervisor with tracemalloc on; after ready, write the report and exit."""
    import tracemalloc

    tracemalloc.start(25)
    from fdsupervisor import cli
    from fdsupervisor.supervisor import Supervisor

    started = Supervisor.start
    units = len(list(Path(unit_dir).glob("*.yaml")))

    def start_then_report(self: Supervisor, handover: object = None) -> None:
        started(self, handover)  # type: ignore[arg-type]
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        total = sum(stat.size for stat in snapshot.statistics("filename"))
        lines = [f"traced {total / 2**20:.1f} MiB, {total / units:.0f} B per unit"]
        for key in ("filename", "lineno"):
            lines.append(f"-- by {key}")
            for stat in snapshot.statistics(key)[:40]:
                frame = stat.traceback[0]
                where = frame.filename.rsplit("/", 2)[-2:]
                lines.append(
                    f"{stat.size / units:8.0f} B/unit {stat.count / units:6.2f} blocks/unit "
                    f"{'/'.join(where)}:{frame.lineno if key == 'lineno' else ''}"
                )
        lines.append("-- by the innermost frame in fdsupervisor/ (the owner)")
        owners: dict[str, list[int]] = {}
        for trace in snapshot.traces:
            owner = next(
                (
                    f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
                    for frame in reversed(trace.traceback)  # innermost first
                    if "/fdsupervisor/" in frame.filename
                ),
                f"(outside) {trace.traceback[-1].filename.rsplit('/', 1)[-1]}",
            )
            sizes = owners.setdefault(owner, [0, 0])
            sizes[0] += trace.size
            sizes[1] += 1
        for owner, (size, count) in sorted(owners.items(), key=lambda item: -item[1][0])[:90]:
            lines.append(f"{size / units:8.0f} B/unit {count / units:6.2f} blocks/unit {owner}")
        report.write_text("\n".join(lines) + "\n")
        tracemalloc.stop()
        os.kill(os.getpid(), signal.SIGTERM)  # a shutdown as any: the workers are stopped

    Supervisor.start = start_then_report  # type: ignore[method-assign]
    cli.main(["run", "--no-monitor", "--log-format", "json", unit_dir])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--on-demand", action="store_true")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--trace-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trace_child:
        trace_child(Path(args.trace_child[0]), args.trace_child[1])
        return
    raise_fd_limit(args.units * 2 + 100)
    kind = "on-demand" if args.on_demand else "with workers"
    for run in range(args.runs):
        rss, _ = one_run(args.units, args.on_demand, trace=False)
        print(f"run {run + 1}: RSS after ready, {args.units} units {kind}: {rss:.1f} MiB")
    if args.trace:
        print(one_run(args.units, args.on_demand, trace=True)[1])


if __name__ == "__main__":
    main()
