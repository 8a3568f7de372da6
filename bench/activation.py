"""Cold on-demand activation: connect() to the first byte of a fresh worker's reply.

Peers, each started fresh for every run and left idle until the timed
connection is its first:
- ``systemd-socket-activate -l 127.0.0.1:PORT WORKER`` (waits for the first
  connection, then execs WORKER in its own process with the socket at fd 3);
- ``fdsupervisor run --listen w=127.0.0.1:PORT --on-demand -- WORKER`` (watches
  the socket, forks and execs WORKER on the first traffic).

Two workers, both given the listening socket at fd 3 (``LISTEN_FDS=1``):
``bench/workers/reply.c`` (compiled here with ``gcc -O2``) and
``bench/workers/reply.py``; each accepts and writes ``hi\\n``.

A run: start the peer, wait for its readiness line on stderr (never by
connecting, which would itself activate the worker), let it settle, time one
connect() -> first byte, stop the peer. The peers alternate which goes first
from run to run. ``--no-cgroups`` runs fdsupervisor without a cgroup per worker
(``FDSUPERVISOR_SPAWN`` in the environment reaches it too: ``migrate`` times the
child's move into its cgroup instead of ``clone3(CLONE_INTO_CGROUP)``).
Usage: ``python bench/activation.py [--runs N] [--no-cgroups] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from common import (
    WORKERS,
    Peer,
    PeerExited,
    Series,
    bench_env,
    cmdline_of,
    compile_worker,
    fdsupervisor_command,
    free_port,
    is_event,
    parse_json_line,
    pid_alive,
    version_of,
    write_json,
)

SYSTEMD = "systemd-socket-activate"
OURS = "fdsupervisor"
SPAWN_ENV = "FDSUPERVISOR_SPAWN"  # the spawn path, read by fdsupervisor from its environment
TARGET = 1.1  # issue 4: ours / systemd-socket-activate with the C worker, at most


def start_systemd(worker: list[str], port: int, log: Path) -> Peer:
    binary = shutil.which(SYSTEMD) or f"/usr/bin/{SYSTEMD}"
    env = dict(bench_env(), SYSTEMD_LOG_TARGET="console")
    peer = Peer(SYSTEMD, [binary, "-l", f"127.0.0.1:{port}", *worker], log, env=env)
    peer.wait_for_line(lambda line: "Listening on" in line)
    return peer


def start_ours(worker: list[str], port: int, log: Path, options: tuple[str, ...] = ()) -> Peer:
    command = [
        *fdsupervisor_command(),
        "run",
        *options,
        "--no-monitor",
        "--log-format",
        "json",
        "--listen",
        f"w=127.0.0.1:{port}",
        "--on-demand",
        "--",
        *worker,
    ]
    peer = Peer(OURS, command, log, env=bench_env())
    peer.wait_for_line(is_event("ready"))
    return peer


def first_byte_ms(port: int) -> float:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(10.0)
        start = time.perf_counter()
        sock.connect(("127.0.0.1", port))
        data = sock.recv(16)
        elapsed = time.perf_counter() - start
    if not data.startswith(b"h"):
        raise RuntimeError(f"unexpected first bytes {data!r}")
    return elapsed * 1000.0


def one_run(
    peer_name: str, worker: list[str], directory: Path, settle: float, options: tuple[str, ...]
) -> float:
    """Start ``peer_name`` fresh (``options`` for fdsupervisor), time its first connection, stop it."""
    port = free_port()
    log = directory / f"{peer_name}.log"
    if peer_name == OURS:
        peer = start_ours(worker, port, log, options)
    else:
        peer = start_systemd(worker, port, log)
    try:
        time.sleep(settle)  # both idle in their poll before the timed connection
        elapsed = first_byte_ms(port)
    finally:
        peer.stop()
    if peer_name == OURS:
        check_worker_gone(peer, worker)
    return elapsed


def check_worker_gone(peer: Peer, worker: list[str]) -> None:
    """After the supervisor's clean exit, no worker it started may be left running."""
    for line in peer.lines:
        event = parse_json_line(line)
        if event and event.get("event") == "worker_started":
            pid = int(event["pid"])
            if pid_alive(pid) and worker[-1] in cmdline_of(pid):
                os.kill(pid, signal.SIGKILL)
                print(
                    f"  warning: worker {pid} outlived fdsupervisor's SIGTERM exit (killed it)",
                    file=sys.stderr,
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument(
        "--settle",
        type=float,
        default=0.2,
        help="seconds between readiness and the timed connection (default 0.2)",
    )
    parser.add_argument(
        "--no-cgroups", action="store_true", help="fdsupervisor without a cgroup per worker"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    options = ("--no-cgroups",) if args.no_cgroups else ()
    if shutil.which(SYSTEMD) is None and not Path(f"/usr/bin/{SYSTEMD}").exists():
        print(f"{SYSTEMD} not found: install systemd to compare", file=sys.stderr)
        return 2
    workers = {
        "C": [str(compile_worker("reply"))],
        "python": [sys.executable, str(WORKERS / "reply.py")],
    }
    peers = [SYSTEMD, OURS]
    results: dict[str, Series] = {}
    with tempfile.TemporaryDirectory(prefix="fdsup-bench-") as tmp:
        directory = Path(tmp)
        try:
            for worker in workers.values():  # warm-up: page cache, first imports
                for peer_name in peers:
                    one_run(peer_name, worker, directory, args.settle, options)
            for run in range(args.runs):
                for worker_name, worker in workers.items():
                    for peer_name in peers if run % 2 == 0 else reversed(peers):
                        key = f"{worker_name} worker -> {peer_name}"
                        elapsed = one_run(peer_name, worker, directory, args.settle, options)
                        results.setdefault(key, Series(key, [], "ms")).values.append(elapsed)
        except PeerExited as exc:
            print(f"a peer failed: {exc}", file=sys.stderr)
            return 1
    print(
        f"cold activation, connect() -> first byte of a fresh worker, {args.runs} runs, "
        f"a fresh peer each; {version_of([SYSTEMD, '--version'])}"
        + ("; fdsupervisor --no-cgroups" if args.no_cgroups else "")
        + (f"; {SPAWN_ENV}={os.environ[SPAWN_ENV]}" if os.environ.get(SPAWN_ENV) else "")
    )
    for series in results.values():
        print("  " + series.row(digits=2))
    ratios = {}
    for worker_name in workers:
        ours = results[f"{worker_name} worker -> {OURS}"].median
        theirs = results[f"{worker_name} worker -> {SYSTEMD}"].median
        ratios[worker_name] = ours / theirs
        target = f" (target <= {TARGET})" if worker_name == "C" else ""
        print(
            f"  ratio {OURS}/{SYSTEMD} with the {worker_name} worker: {ours / theirs:.2f}x{target}"
        )
    write_json(
        args.json,
        {
            "series": {k: v.values for k, v in results.items()},
            "unit": "ms",
            "ratios": ratios,
            "runs": args.runs,
            "settle": args.settle,
            "cgroups": not args.no_cgroups,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
