"""getfd + closefd pairs per second: our monitor against QEMU's own QMP monitor.

Two clients, each against both servers in the same run:
- ``lean``: a raw socket client that sends the fd on the command's own
  ``sendmsg`` and waits for each reply (what a C or Go client does);
- ``qemu.qmp``: the QMPClient of the ``qemu.qmp`` package, which sends the
  fd with one space byte, then the command (``send_fd_scm`` + ``execute``).

Each run is ``--pairs`` pairs (5,000: 10,000 commands) of one client against
one server, the servers interleaved run by run. Besides pairs per second, each
run reads the server's CPU time (utime + stime in ``/proc/PID/stat``, all its
threads) before and after and divides the difference by the commands sent:
the server's CPU per command, which the other load on the machine disturbs far
less than the wall-clock rate does.

Usage: ``python bench/getfd.py [--pairs N] [--runs R]``. Prints medians,
min-max and our ratio to QEMU for each client, and each server's µs of CPU
per command.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    Series,
    bench_env,
    cpu_seconds,
    fdsupervisor_command,
    qemu_binary,
    stop,
    version_of,
    wait_for_unix_socket,
)


def lean_pairs(path: Path, pairs: int, fd: int) -> float:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(path))
    buffer = b""

    def reply() -> bytes:
        nonlocal buffer
        while b"\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        if line.startswith(b'{"event"'):
            return reply()  # events (ours emits FD_STORED / FD_CLOSED) are not replies
        return line

    reply()
    sock.sendall(b'{"execute": "qmp_capabilities"}')
    reply()
    getfd = b'{"execute": "getfd", "arguments": {"fdname": "bench"}}'
    closefd = b'{"execute": "closefd", "arguments": {"fdname": "bench"}}'
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    start = time.perf_counter()
    for _ in range(pairs):
        sock.sendmsg([getfd], rights)
        line = reply()
        if b"return" not in line:
            raise RuntimeError(f"getfd failed on {path.name}: {line!r}")
        sock.sendall(closefd)
        if b"return" not in reply():
            raise RuntimeError("closefd failed")
    elapsed = time.perf_counter() - start
    sock.close()
    return pairs / elapsed


def qmp_pairs(path: Path, pairs: int, fd: int) -> float:
    from qemu.qmp import QMPClient

    async def run() -> float:
        client = QMPClient("bench")
        await client.connect(str(path))
        start = time.perf_counter()
        for _ in range(pairs):
            client.send_fd_scm(fd)
            await client.execute("getfd", {"fdname": "bench"})
            await client.execute("closefd", {"fdname": "bench"})
        elapsed = time.perf_counter() - start
        await client.disconnect()
        return pairs / elapsed

    return asyncio.run(run())


def start_ours(directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    path = directory / "ours.sock"
    proc = subprocess.Popen(
        [
            *fdsupervisor_command(),
            "run",
            "--monitor",
            str(path),
            "--log-format",
            "json",
            "--listen",
            "idle=127.0.0.1:0",
            "--on-demand",
            "--",
            "true",
        ],
        env=bench_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_unix_socket(path, proc=proc)
    return proc, path


def start_qemu(directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    binary = qemu_binary()
    assert binary is not None
    path = directory / "qemu.sock"
    proc = subprocess.Popen(
        [
            binary,
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            f"unix:{path},server=on,wait=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_unix_socket(path, proc=proc)
    return proc, path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if qemu_binary() is None:
        print("qemu-system-x86_64 not found: install qemu-system-x86 to compare", file=sys.stderr)
        return 2
    carrier, _peer = socket.socketpair()
    results: dict[str, Series] = {}
    cpu: dict[str, Series] = {}
    with tempfile.TemporaryDirectory(prefix="fdsup-bench-") as tmp:
        servers = {"fdsupervisor": start_ours(Path(tmp)), "qemu": start_qemu(Path(tmp))}
        try:
            for client_name, client in (("lean", lean_pairs), ("qemu.qmp", qmp_pairs)):
                for _proc, path in servers.values():
                    client(path, min(200, args.pairs), carrier.fileno())  # warm-up
                for _ in range(args.runs):
                    # interleave the servers so that drift hits both alike
                    for server_name, (proc, path) in servers.items():
                        key = f"{client_name} -> {server_name}"
                        before = cpu_seconds(proc.pid)
                        rate = client(path, args.pairs, carrier.fileno())
                        per_command = (cpu_seconds(proc.pid) - before) / (2 * args.pairs) * 1e6
                        results.setdefault(key, Series(key, [], "pairs/s")).values.append(rate)
                        cpu.setdefault(key, Series(key, [], "us/command")).values.append(
                            per_command
                        )
        finally:
            for proc, _path in servers.values():
                stop(proc)
    print(
        f"getfd+closefd pairs/s, {args.pairs} pairs per run, {args.runs} runs; "
        f"{version_of([qemu_binary() or 'qemu-system-x86_64', '--version'])}"
    )
    for series in results.values():
        print("  " + series.row())
    print(
        f"server CPU per command (utime+stime from /proc/PID/stat over {2 * args.pairs} commands):"
    )
    for series in cpu.values():
        print("  " + series.row())
    ratios = {}
    for client_name in ("lean", "qemu.qmp"):
        ours = results[f"{client_name} -> fdsupervisor"].median
        theirs = results[f"{client_name} -> qemu"].median
        ratios[client_name] = ours / theirs
        print(f"  ratio fdsupervisor/qemu with the {client_name} client: {ours / theirs:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "series": {k: v.values for k, v in results.items()},
                    "cpu_us_per_command": {k: v.values for k, v in cpu.items()},
                    "ratios": ratios,
                    "pairs": args.pairs,
                    "runs": args.runs,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
