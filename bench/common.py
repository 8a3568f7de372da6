"""Shared helpers for the benchmarks: peers, readiness, statistics, reports.

Benchmarks are not tests: they measure, print medians, min-max and ratios
against the real peers on this machine, in one run. Loopback and Unix
sockets only; every loop is bounded in count.
"""

from __future__ import annotations

import errno
import json
import math
import os
import select
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


def fdsupervisor_command() -> list[str]:
    return [sys.executable, "-m", "fdsupervisor"]


def bench_env() -> dict[str, str]:
    return dict(os.environ)


def wait_for_unix_socket(
    path: Path, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until something accepts connections at ``path`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        time.sleep(0.01)  # polling a peer we do not control; not a test
    raise TimeoutError(f"nothing listens on {path} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Series:
    name: str
    values: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def row(self, digits: int = 1) -> str:
        return (
            f"{self.name:<44} {self.median:>10.{digits}f} {self.unit:<10} "
            f"(min {min(self.values):.{digits}f}, max {max(self.values):.{digits}f}, "
            f"n={len(self.values)})"
        )


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def version_of(command: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


# -- helpers for the activation, accept-rate and restart-gap benchmarks ------------------

RESULTS = ROOT / "bench" / "results"
WORKERS = ROOT / "bench" / "workers"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def compile_worker(name: str) -> Path:
    """``bench/workers/NAME.c`` compiled with ``gcc -O2`` under bench/results/build/."""
    source = WORKERS / f"{name}.c"
    build = RESULTS / "build"
    build.mkdir(parents=True, exist_ok=True)
    binary = build / name
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) found: install gcc to build the C workers")
    subprocess.run([compiler, "-O2", "-Wall", "-o", str(binary), str(source)], check=True)
    return binary


def parse_json_line(line: str) -> dict[str, Any] | None:
    """A JSON log event, or None for any other line (workers share the stream)."""
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def is_event(name: str) -> Callable[[str], bool]:
    """A predicate: the line is fdsupervisor's JSON log event ``name``."""

    def check(line: str) -> bool:
        event = parse_json_line(line)
        return event is not None and event.get("event") == name

    return check


class Peer:
    """A peer process in its own session (process group), stdout+stderr in a file.

    The log goes to a file rather than a pipe, so that a chatty peer never
    blocks on a full pipe and no reader thread competes with the client for
    the benchmark's CPU; :meth:`new_lines` reads what was added since the
    last call. :meth:`stop` ends the peer and then the rest of its process
    group, while the peer is still an unreaped zombie (so that the group id
    cannot have been reused); processes that left the group (setsid) are
    the caller's to end, by pid.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        self._reader = open(log_path, "rb")  # noqa: SIM115 - closed in stop()
        self._partial = b""
        self.lines: list[str] = []

    def new_lines(self) -> list[str]:
        """Complete lines written since the last call (also kept in ``self.lines``)."""
        data = self._partial + self._reader.read()
        *complete, self._partial = data.split(b"\n")
        lines = [raw.decode(errors="replace") for raw in complete]
        self.lines.extend(lines)
        return lines

    def wait_for_line(self, predicate: Callable[[str], bool], timeout: float = 30.0) -> str:
        """The first new line for which ``predicate`` holds (bounded wait)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.new_lines():
                if predicate(line):
                    return line
            if self.proc.poll() is not None:
                self.new_lines()
                raise PeerExited(self.name, self.proc.returncode, self.lines)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name}: no expected log line after {timeout}s")
            time.sleep(0.002)  # a log file is polled; this wait is not measured

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the peer, SIGKILL after ``timeout``, then SIGKILL its process group."""
        proc = self.proc
        if proc.returncode is None:
            pidfd = os.pidfd_open(proc.pid)
            try:
                _signal(proc.pid, signal.SIGTERM)
                if not readable(pidfd, timeout):
                    _signal(proc.pid, signal.SIGKILL)
                    readable(pidfd, timeout)
                # Exited but not reaped yet: the group id is still ours.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            finally:
                os.close(pidfd)
            proc.wait(timeout)
        self.new_lines()
        self._reader.close()
        return proc.returncode


def readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` s (poll: fds above 1023 too)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000))


class PeerExited(RuntimeError):
    def __init__(self, name: str, code: int | None, lines: list[str]) -> None:
        tail = "\n    ".join(lines[-5:])
        super().__init__(f"{name} exited with {code}; its last lines:\n    {tail}")
        self.code = code
        self.lines = lines


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used so far (utime + stime of /proc/PID/stat, all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc), [] if it is gone."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except FileNotFoundError:
        return []


def cmdline_of(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [arg.decode(errors="replace") for arg in cmdline.read().split(b"\0") if arg]
    except FileNotFoundError:
        return []


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (``fraction`` in 0..1) of ``values``; nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def spread(values: Sequence[float], digits: int = 1) -> str:
    """``median (min - max)`` of ``values``, or ``n/a``."""
    if not values:
        return "n/a"
    return (
        f"{statistics.median(values):.{digits}f} "
        f"({min(values):.{digits}f} - {max(values):.{digits}f})"
    )


R = TypeVar("R")


def interleaved_runs(
    peers: Sequence[str], runs: int, one_run: Callable[[str, Path], R]
) -> dict[str, list[R]] | None:
    """``runs`` rounds of every peer, each run in a fresh directory, the order rotated
    round by round so that drift hits every peer alike. None: a peer failed (said why)."""
    results: dict[str, list[R]] = {}
    with tempfile.TemporaryDirectory(prefix="fdsup-bench-") as tmp:
        for run in range(runs):
            shift = run % len(peers)
            for name in [*peers[shift:], *peers[:shift]]:
                directory = Path(tmp) / f"{name}-{run}"
                directory.mkdir()
                try:
                    results.setdefault(name, []).append(one_run(name, directory))
                except (TimeoutError, RuntimeError) as exc:  # PeerExited is a RuntimeError
                    print(f"a peer failed: {exc}", file=sys.stderr)
                    return None
    return results


def write_json(path: Path | None, payload: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


# -- a client of many short connections ----------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """One connection: when connect() was called, when it ended, and how.

    ``kind`` is ``ok``, ``refused``, ``reset``, ``timeout``, ``closed`` (EOF
    before a full reply), ``bad-reply`` or ``error:ERRNO``.
    """

    start: float
    end: float
    kind: str

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class _Conn:
    index: int
    sock: socket.socket
    start: float
    deadline: float
    connected: bool = False
    received: bytes = b""


def run_connections(
    address: tuple[str, int],
    count: int,
    *,
    send: bytes = b"",
    expect: bytes,
    until_eof: bool,
    concurrency: int | None = None,
    rate: float | None = None,
    timeout: float = 2.0,
    begin: float | None = None,
) -> list[Outcome]:
    """Make ``count`` connections to ``address`` from one selector loop.

    Each connection connects, sends ``send`` (if any) and reads: until EOF
    (``until_eof``, the reply must then equal ``expect``) or until it has
    ``expect``. Either at most ``concurrency`` connections at once, each new
    one started as soon as one ends (closed loop), or one every ``1/rate``
    seconds on a fixed schedule whatever the server does (open loop). Every
    connection ends within ``timeout`` seconds of its connect(), so the
    whole call is bounded. ``begin`` (a ``time.perf_counter()`` value, by
    default now) is when the open-loop schedule starts. Returns the outcomes
    in start order.
    """
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    selector = selectors.DefaultSelector()
    outcomes: list[Outcome | None] = [None] * count
    active: dict[int, _Conn] = {}
    launched = done = 0
    if begin is None:
        begin = time.perf_counter()

    def finish(conn: _Conn, kind: str) -> None:
        nonlocal done
        outcomes[conn.index] = Outcome(conn.start, time.perf_counter(), kind)
        if conn.sock.fileno() in active:
            del active[conn.sock.fileno()]
            try:
                selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
        done += 1

    def launch(index: int) -> None:
        nonlocal done
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        start = time.perf_counter()
        conn = _Conn(index, sock, start, start + timeout)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            outcomes[index] = Outcome(start, time.perf_counter(), _kind(code))
            sock.close()
            done += 1
            return
        active[sock.fileno()] = conn
        selector.register(sock, selectors.EVENT_WRITE, conn)
        if code == 0:
            on_writable(conn)

    def _send(conn: _Conn) -> None:
        if send:
            conn.sock.send(send)  # a short line always fits an empty send buffer

    def on_writable(conn: _Conn) -> None:
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            finish(conn, _kind(code))
            return
        conn.connected = True
        try:
            _send(conn)
        except OSError as exc:
            finish(conn, _kind(exc.errno or 0))
            return
        selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def on_readable(conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(65536)
        except OSError as exc:
            finish(conn, _kind(exc.errno or 0))
            return
        conn.received += chunk
        if not chunk:
            if not conn.received:
                finish(conn, "closed")
            else:
                finish(conn, "ok" if conn.received == expect else "bad-reply")
        elif not until_eof and len(conn.received) >= len(expect):
            finish(conn, "ok" if conn.received == expect else "bad-reply")

    try:
        while done < count:
            now = time.perf_counter()
            if rate is not None:
                while launched < count and begin + launched / rate <= now:
                    launch(launched)
                    launched += 1
            else:
                assert concurrency is not None
                while launched < count and len(active) < concurrency:
                    launch(launched)
                    launched += 1
            if done >= count:
                break
            wakeups = [conn.deadline for conn in active.values()]
            if rate is not None and launched < count:
                wakeups.append(begin + launched / rate)
            wait = max(0.0, min(wakeups) - time.perf_counter()) if wakeups else 0.0
            for key, events in selector.select(wait):
                conn = key.data
                if events & selectors.EVENT_WRITE and not conn.connected:
                    on_writable(conn)
                elif events & selectors.EVENT_READ:
                    on_readable(conn)
            now = time.perf_counter()
            for conn in [c for c in active.values() if c.deadline <= now]:
                finish(conn, "timeout")
    finally:
        for conn in list(active.values()):
            conn.sock.close()
        selector.close()
    return [outcome for outcome in outcomes if outcome is not None]


def _kind(code: int) -> str:
    if code == errno.ECONNREFUSED:
        return "refused"
    if code in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if code == errno.ETIMEDOUT:
        return "timeout"
    return f"error:{errno.errorcode.get(code, code)}"
