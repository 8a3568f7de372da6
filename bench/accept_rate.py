"""Connections per second with one worker process per connection (inetd style).

Peers, both started once and then measured run by run, alternating which
goes first:
- ``systemd-socket-activate --accept --inetd -l 127.0.0.1:PORT WORKER``;
- ``fdsupervisor run --listen w=127.0.0.1:PORT --accept --inetd -- WORKER``.

The worker, ``bench/workers/inetd.c`` (compiled here with ``gcc -O2``), writes
``hi\\n`` to stdout (the connection) and exits. The client makes N
connections per run, at most C at once from one selector loop, each reading
until EOF; a connection counts when it read exactly ``hi\\n``.

If fdsupervisor refuses ``--accept`` (accept mode not implemented yet), it is
reported as unavailable and systemd-socket-activate is still measured.
Usage: ``python bench/accept_rate.py [--connections N] [--concurrency C]
[--runs R] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from common import (
    Peer,
    PeerExited,
    Series,
    bench_env,
    compile_worker,
    fdsupervisor_command,
    free_port,
    is_event,
    parse_json_line,
    run_connections,
    version_of,
    write_json,
)

SYSTEMD = "systemd-socket-activate"
OURS = "fdsupervisor"
TARGET = 1.0  # issue 4: ours / systemd-socket-activate, at least


def start_systemd(worker: str, port: int, log: Path) -> Peer:
    binary = shutil.which(SYSTEMD) or f"/usr/bin/{SYSTEMD}"
    env = dict(bench_env(), SYSTEMD_LOG_TARGET="console")
    command = [binary, "--accept", "--inetd", "-l", f"127.0.0.1:{port}", worker]
    peer = Peer(SYSTEMD, command, log, env=env)
    peer.wait_for_line(lambda line: "Listening on" in line)
    return peer


def start_ours(worker: str, port: int, log: Path) -> Peer:
    command = [
        *fdsupervisor_command(),
        "run",
        "--no-monitor",
        "--log-format",
        "json",
        "--listen",
        f"w=127.0.0.1:{port}",
        "--accept",
        "--inetd",
        "--",
        worker,
    ]
    peer = Peer(OURS, command, log, env=bench_env())
    peer.wait_for_line(is_event("ready"))
    return peer


def refusal(exc: PeerExited) -> str | None:
    """The supervisor's own words if it exited because accept mode is missing."""
    for line in exc.lines:
        event = parse_json_line(line)
        text = json.dumps(event) if event else line
        if "not implemented" in text:
            return str(event.get("error", line)) if event else line
    return None


def measure(
    port: int, connections: int, concurrency: int, timeout: float
) -> tuple[float, Counter[str]]:
    """Connections per second (that read ``hi\\n``) and the outcome counts."""
    start = time.perf_counter()
    outcomes = run_connections(
        ("127.0.0.1", port),
        connections,
        expect=b"hi\n",
        until_eof=True,
        concurrency=concurrency,
        timeout=timeout,
    )
    elapsed = time.perf_counter() - start
    kinds = Counter(outcome.kind for outcome in outcomes)
    return kinds["ok"] / elapsed, kinds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000, help="per run (default 1000)")
    parser.add_argument("--concurrency", type=int, default=16, help="at once (default 16)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=5.0, help="per connection, seconds")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which(SYSTEMD) is None and not Path(f"/usr/bin/{SYSTEMD}").exists():
        print(f"{SYSTEMD} not found: install systemd to compare", file=sys.stderr)
        return 2
    worker = str(compile_worker("inetd"))
    results: dict[str, Series] = {}
    failures: dict[str, Counter[str]] = {}
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fdsup-bench-") as tmp:
        directory = Path(tmp)
        peers: dict[str, tuple[Peer, int]] = {}
        try:
            for name, start in ((SYSTEMD, start_systemd), (OURS, start_ours)):
                port = free_port()
                try:
                    peers[name] = (start(worker, port, directory / f"{name}.log"), port)
                except PeerExited as exc:
                    unavailable[name] = refusal(exc) or str(exc)
            for _peer, port in peers.values():  # warm-up
                measure(port, min(100, args.connections), args.concurrency, args.timeout)
            names = list(peers)
            for run in range(args.runs):
                for name in names if run % 2 == 0 else reversed(names):
                    rate, kinds = measure(
                        peers[name][1], args.connections, args.concurrency, args.timeout
                    )
                    results.setdefault(name, Series(name, [], "conn/s")).values.append(rate)
                    failed = failures.setdefault(name, Counter())
                    failed.update({k: v for k, v in kinds.items() if k != "ok"})
        finally:
            for peer, _port in peers.values():
                peer.stop()
    print(
        f"inetd-style accept, one process per connection: {args.connections} connections "
        f"per run, {args.concurrency} at once, {args.runs} runs; "
        f"{version_of([SYSTEMD, '--version'])}"
    )
    for name in (SYSTEMD, OURS):
        if name in unavailable:
            print(f"  {name:<44} unavailable: {unavailable[name]}")
            continue
        failed = failures.get(name) or Counter()
        note = ", ".join(f"{k} {v}" for k, v in sorted(failed.items())) or "none failed"
        print(f"  {results[name].row(digits=0)}; {note}")
    ratio = None
    if OURS in results and SYSTEMD in results:
        ratio = results[OURS].median / results[SYSTEMD].median
        print(f"  ratio {OURS}/{SYSTEMD}: {ratio:.2f}x (target >= {TARGET})")
    else:
        print(f"  ratio {OURS}/{SYSTEMD}: not measured ({OURS} unavailable)")
    write_json(
        args.json,
        {
            "series": {k: v.values for k, v in results.items()},
            "unit": "connections/s",
            "failures": {k: dict(v) for k, v in failures.items()},
            "unavailable": unavailable,
            "ratio": ratio,
            "connections": args.connections,
            "concurrency": args.concurrency,
            "runs": args.runs,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
