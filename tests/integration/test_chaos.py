"""Chaos: services under load while workers die, units reload and monitor clients misbehave.

For ``FDSUP_CHAOS_SECONDS`` seconds (8 by default; ``make chaos`` sets 120),
all at once, on loopback and a unix socket only:

- load: threads make requests in closed loops, each one answered in full or
  counted as a failure, against ``web`` (TCP, two instances), ``local`` (a
  unix socket, one instance) and ``acc`` (TCP, accept mode: one ``echo`` per
  connection);
- kills: a random worker of ``web`` or ``local``, its pid taken from
  ``query-services``, is SIGKILLed every 0.15-0.45 s;
- reloads: every 0.6-1.4 s the environment of ``web`` or ``local`` changes in
  its unit file and the supervisor gets SIGHUP, which restarts that unit;
- monitor clients come and go (negotiated or not, with getfd/closefd, with
  fds and half a command and then gone);
- one monitor client sends garbage: random bytes, bad JSON, 1.5 MiB messages,
  fds it never uses, each time followed by a command that must be answered.

What must hold: no connection refused, every request answered, except the
ones a SIGKILL took with it (below); the supervisor alive; after the storm
its fd count exactly as before and its RSS within a small margin; every fd a
client gave it closed. The same code runs a short warm-up storm first, whose
high-water marks the baseline then includes.

Which failures are allowed, exactly: a connection that a worker had already
accepted belongs to that worker process alone, and dies with it; the
supervisor never sees it and nothing can save it. Connections still in the
listening socket's backlog are safe, because the supervisor holds that
socket. So only requests in flight on a worker at the moment we SIGKILLed it
may fail (reset, or closed without a reply). The worker below writes its pid
as the first line of every connection, so a request lost after that line
names the worker that dropped it, and it counts as "lost at a kill" only if
that is a worker we SIGKILLed while the request was open. A request lost
before that line (the worker died between ``accept()`` and its first write)
names nobody: it counts as "lost at a kill" only if a worker of the same
unit was SIGKILLed while it was open. Reload restarts lose nothing, since the
worker finishes the connection in hand before it obeys SIGTERM; accept-mode
workers are never killed, so ``acc`` must lose nothing at all.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import textwrap
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import PYTHON, SupervisorProcess, open_fds
from tests.monitor_client import RawClient

CHAOS_SECONDS = float(os.environ.get("FDSUP_CHAOS_SECONDS", "8"))
WARMUP_SECONDS = 2.0
REQUEST_TIMEOUT = 10.0
MIB = 1 << 20
# RSS may end above the warmed-up baseline by at most this much. The monitor
# may hold up to 1 MiB of one client's message and 1 MiB of its pending
# output, and glibc's malloc keeps freed memory mapped below its trim
# threshold, which grows to twice the largest block freed (~3 MiB after a
# 1.5 MiB message): with pymalloc arenas on top, 8 MiB covers what a
# supervisor that leaks nothing can still hold. A leak of ~100 bytes per
# request or per monitor client outgrows it in the long form.
RSS_MARGIN_KIB = 8 * 1024

WORKER = '''\
"""A chaos-test worker: its pid first, then one request answered; SIGTERM is graceful."""
import os
import selectors
import signal
import socket
import sys


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("LISTEN_PID is not this process")
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(wake_read, selectors.EVENT_READ)
    for fd in range(3, 3 + int(os.environ["LISTEN_FDS"])):
        listener = socket.socket(fileno=fd)
        listener.setblocking(False)  # instances share the socket: the other may win
        selector.register(listener, selectors.EVENT_READ)
    prefix = str(os.getpid()).encode()
    while True:
        for key, _ in selector.select():
            if key.fileobj == wake_read:
                return  # SIGTERM, with no connection in hand
            try:
                conn, _ = key.fileobj.accept()
            except BlockingIOError:
                continue
            with conn:
                serve(conn, prefix)


def serve(conn, prefix):
    conn.settimeout(10)
    try:
        conn.sendall(prefix + b"\\n")
        request = b""
        while not request.endswith(b"\\n"):
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        conn.sendall(prefix + b" " + request)
    except OSError:
        pass


main()
'''

BAD_JSON = [
    b"{nope}",
    b'{"execute": }',
    b"[1, 2",
    b'"unterminated',
    b"}}}]]],:",
    b'{"execute": 5}',
    b'{"execute": "query-version", "id": ',
    b"\x00\x01\x02\x1b[0m",
    b"{" * 300 + b"}" * 300,
    b'{"execute": "getfd", "arguments": {"fdname": 7}}',
    b'{"execute": "getfd", "arguments": {"fdname": "3digits"}}',
    b'{"execute": "closefd", "arguments": {"fdname": "never-stored"}}',
    b'{"execute": "socket-add", "arguments": {"id": "x", "addr": {"type": "fd", "str": "3"}}}',
    b'{"execute": "service-start", "arguments": {"unit": "no-such-unit"}}',
    b'{"execute": "query-fds", "bogus": true}',
    b"'single' 'quoted'",
    b"\xc3\x28 not utf-8",
    b"123456789" * 10,
]
HUGE = b'{"execute": "query-version", "arguments": {"pad": "' + b"y" * (MIB + MIB // 2) + b'"}}'


def unit_text(worker: Path, listen: str, version: int, instances: int) -> str:
    return textwrap.dedent(f"""
        sockets:
          main: {{listen: "{listen}", backlog: 512}}
        service:
          exec: [{PYTHON}, {worker}]
          instances: {instances}
          environment: {{APP_VERSION: "{version}"}}
          restart: always
          restart-delay: 0
          start-limit: {{interval: 0}}
        """)


def accept_unit(echo: str) -> str:
    return textwrap.dedent(f"""
        sockets:
          conn: {{listen: "127.0.0.1:0", backlog: 512}}
        service:
          exec: [{echo}, accepted]
          accept: true
          inetd: true
          max-connections: 16
        """)


@dataclass(slots=True)
class Outcome:
    target: str
    start: float
    end: float
    kind: str  # ok, refused, lost-before-pid, lost-after-pid, timeout, bad, error:...
    pid: int | None = None


@dataclass(slots=True)
class Kill:
    unit: str
    pid: int
    before: float
    after: float


LOST = ("lost-before-pid", "lost-after-pid")


def lost_at_a_kill(outcome: Outcome, kills: list[Kill]) -> bool:
    """See the module docstring: the one failure a socket-holding supervisor cannot prevent."""
    if outcome.target == "acc" or outcome.kind not in LOST:
        return False
    for kill in kills:
        during = outcome.start <= kill.after and kill.before <= outcome.end
        if not during:
            continue
        if outcome.kind == "lost-after-pid" and kill.pid == outcome.pid:
            return True
        if outcome.kind == "lost-before-pid" and kill.unit == outcome.target:
            return True
    return False


def converse(conn: socket.socket, request: bytes) -> tuple[str, int | None]:
    """The worker's protocol: its pid line, our request line, its answer, EOF."""
    pid = None
    buffer = b""
    try:
        while b"\n" not in buffer:
            chunk = conn.recv(4096)
            if not chunk:
                return "lost-before-pid", None
            buffer += chunk
        head, _, reply = buffer.partition(b"\n")
        pid = int(head)
        expected = head + b" " + request
        conn.sendall(request)
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
    except (ConnectionResetError, BrokenPipeError):
        return ("lost-after-pid" if pid else "lost-before-pid"), pid
    except TimeoutError:
        return "timeout", pid
    if reply == expected:
        return "ok", pid
    if expected.startswith(reply):  # closed before (all of) its answer
        return "lost-after-pid", pid
    return "bad", pid


def connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError | BlockingIOError):
        return "refused"  # FileNotFoundError: no socket file; EAGAIN: a full unix backlog
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"error:{exc.errno}"


def pace(event: threading.Event, rng: random.Random, low: float, high: float) -> bool:
    """A random pause that paces a loop (not a synchronisation); True: time to stop."""
    return event.wait(rng.uniform(low, high))


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


def is_closed(peer: socket.socket, timeout: float) -> bool:
    peer.settimeout(timeout)
    try:
        return peer.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@dataclass
class Storm:
    """One chaos run against a running supervisor; the same code for warm-up and the real one."""

    sup: SupervisorProcess
    units: Path
    worker: Path
    web_port: int
    acc_port: int
    local_path: Path
    seed: int
    versions: dict[str, int]
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    reloads: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    peers: list[socket.socket] = field(default_factory=list)  # ends of fds we handed over
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, seconds: float) -> None:
        limit = int(seconds * 50_000) + 100  # far beyond what any loop below can reach
        jobs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
            (self.load, ("web", 0, limit)),
            (self.load, ("web", 1, limit)),
            (self.load, ("local", 2, limit)),
            (self.load, ("acc", 3, limit)),
            (self.killer, (limit,)),
            (self.reloader, (limit,)),
            (self.monitor_churn, (limit,)),
            (self.garbage, (limit,)),
        ]
        threads = [
            threading.Thread(target=self._guard, args=(job, args), daemon=True)
            for job, args in jobs
        ]
        for thread in threads:
            thread.start()
        self.stop.wait(seconds)  # the storm's length, not a synchronisation
        self.stop.set()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT + 40)
            assert not thread.is_alive(), "a chaos thread did not stop"
        assert not self.errors, "\n".join(self.errors)

    def _guard(self, job: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            job(*args)
        except BaseException:
            self.errors.append(traceback.format_exc())
            self.stop.set()

    # -- load --------------------------------------------------------------------------

    def load(self, target: str, index: int, limit: int) -> None:
        mine: list[Outcome] = []
        for n in range(limit):
            if self.stop.is_set():
                break
            request = f"request {index}.{n}\n".encode()
            start = time.monotonic()
            kind, pid = self.request(target, request)
            mine.append(Outcome(target, start, time.monotonic(), kind, pid))
        with self.lock:
            self.outcomes.extend(mine)

    def request(self, target: str, request: bytes) -> tuple[str, int | None]:
        if target == "local":
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(REQUEST_TIMEOUT)
            try:
                conn.connect(str(self.local_path))
            except OSError as exc:
                conn.close()
                return connect_error(exc), None
        else:
            port = self.web_port if target == "web" else self.acc_port
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT)
            except OSError as exc:
                return connect_error(exc), None
        with conn:
            if target != "acc":
                return converse(conn, request)
            try:
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
            except (ConnectionResetError, BrokenPipeError):
                return "lost-before-pid", None
            except TimeoutError:
                return "timeout", None
            if reply == b"accepted\n":
                return "ok", None
            return ("lost-before-pid" if not reply else "bad"), None

    # -- kills -------------------------------------------------------------------------

    def killer(self, limit: int) -> None:
        rng = random.Random(self.seed)
        with RawClient(self.sup.monitor_path).negotiate() as client:
            for _ in range(limit):
                if pace(self.stop, rng, 0.15, 0.45):
                    return
                services = client.command("query-services")["return"]
                running = [
                    (s["unit"], pid)
                    for s in services
                    if s["unit"] in ("web", "local") and s["state"] == "running"
                    for pid in s["pids"]
                ]
                if not running:
                    continue
                unit, pid = rng.choice(running)
                kill = self.kill(unit, pid)
                if kill is not None:
                    self.kills.append(kill)

    def kill(self, unit: str, pid: int) -> Kill | None:
        """SIGKILL ``pid`` through a pidfd, only if it is one of this test's workers."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        try:
            # checked after pidfd_open: the pidfd is that very process, not a reused pid
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if parent != self.sup.pid or os.fsencode(self.worker) not in argv:
                return None
            before = time.monotonic()
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return Kill(unit, pid, before, time.monotonic())
        except (FileNotFoundError, ProcessLookupError):
            return None
        finally:
            os.close(pidfd)

    # -- reloads -----------------------------------------------------------------------

    def reloader(self, limit: int) -> None:
        rng = random.Random(self.seed + 1)
        for _ in range(limit):
            if pace(self.stop, rng, 0.6, 1.4):
                return
            unit = rng.choice(["web", "local"])
            self.versions[unit] += 1
            listen = "127.0.0.1:0" if unit == "web" else "unix:chaos.sock"
            text = unit_text(self.worker, listen, self.versions[unit], 2 if unit == "web" else 1)
            (self.units / f"{unit}.yaml").write_text(text)
            mark = self.sup.mark()
            os.kill(self.sup.pid, signal.SIGHUP)
            self.sup.wait_for("reloaded", after=mark, timeout=30)
            self.reloads.append(unit)

    # -- monitor clients ---------------------------------------------------------------

    def monitor_churn(self, limit: int) -> None:
        rng = random.Random(self.seed + 2)
        path = self.sup.monitor_path
        for n in range(limit):
            if pace(self.stop, rng, 0.005, 0.03):
                return
            action = rng.randrange(5)
            with RawClient(path) as client:
                if action == 0:
                    client.negotiate()
                    assert "return" in client.command("query-services")
                    assert "return" in client.command("query-fds")
                elif action == 1:
                    client.negotiate()
                    mine, peer = socket.socketpair()
                    self.peers.append(peer)
                    name = f"churn{n}"
                    assert client.command("getfd", fds=[mine.fileno()], fdname=name) == {
                        "return": {}
                    }
                    mine.close()
                    assert client.command("closefd", fdname=name) == {"return": {}}
                elif action == 2:
                    pass  # gone before negotiating
                elif action == 3:
                    mine, peer = socket.socketpair()
                    self.peers.append(peer)
                    client.send(b" ", [mine.fileno()])
                    mine.close()
                    client.send(b'{"execute": "getf')  # and gone: the held fd must close
                else:
                    client.negotiate()
                    client.send(b'{"execute": "query-services", "argu')
            self.counts["monitor clients"] += 1
            self.prune_peers()

    def garbage(self, limit: int) -> None:
        rng = random.Random(self.seed + 3)
        with RawClient(self.sup.monitor_path).negotiate() as client:
            for n in range(limit):
                if pace(self.stop, rng, 0.0, 0.02):
                    return
                kind = rng.choices(["random", "json", "huge", "fds"], weights=[40, 40, 3, 17])[0]
                if kind == "random":
                    client.send(rng.randbytes(rng.randint(1, 4096)))
                elif kind == "json":
                    client.send(rng.choice(BAD_JSON))
                elif kind == "huge":
                    client.send(HUGE)
                else:
                    pairs = [socket.socketpair() for _ in range(rng.randint(1, 3))]
                    carrier = rng.choice([b" ", b"{", b'{"execute": "nope"}', rng.randbytes(8)])
                    client.send(carrier, [mine.fileno() for mine, _ in pairs])
                    for mine, peer in pairs:
                        mine.close()
                        self.peers.append(peer)
                self.counts[f"garbage {kind}"] += 1
                # 0xFF puts the parser back into a known state (QEMU's qmp-spec); then
                # a command that must be answered: the connection lives on.
                client.send(b"\xff" + json.dumps({"execute": "query-version", "id": n}).encode())
                for _ in range(100_000):
                    message = client.read()
                    if message.get("id") == n:
                        assert message["return"]["package"].startswith("fdsupervisor"), message
                        break
                    assert "event" in message or "error" in message, message
                else:
                    raise AssertionError("no answer to the command after the garbage")
                self.prune_peers()

    def prune_peers(self) -> None:
        with self.lock:
            self.peers = [peer for peer in self.peers if not _closed_now(peer)]

    def unclosed_peers(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        left = 0
        for peer in self.peers:
            if not is_closed(peer, max(0.0, deadline - time.monotonic())):
                left += 1
            peer.close()
        self.peers = []
        return left

    # -- verdict ---------------------------------------------------------------------------

    def check(self, label: str) -> str:
        by_kind = Counter((o.target, o.kind) for o in self.outcomes)
        failed = [o for o in self.outcomes if o.kind != "ok"]
        at_kill = [o for o in failed if lost_at_a_kill(o, self.kills)]
        other = [o for o in failed if not lost_at_a_kill(o, self.kills)]
        summary = (
            f"{label}: {len(self.outcomes)} requests {dict(sorted(by_kind.items()))}; "
            f"{len(at_kill)} lost at one of {len(self.kills)} SIGKILLs; "
            f"{len(self.reloads)} reloads; {dict(sorted(self.counts.items()))}"
        )
        refused = sum(1 for o in failed if o.kind == "refused")
        assert refused == 0, f"{refused} connections refused; {summary}"
        assert not other, f"failures not explained by a kill: {other[:10]}; {summary}"
        for target in ("web", "local", "acc"):
            assert by_kind[(target, "ok")] > 0, f"no request to {target} succeeded; {summary}"
        assert self.counts["monitor clients"] > 0 and self.counts.total() > 0, summary
        return summary


def _closed_now(peer: socket.socket) -> bool:
    peer.setblocking(False)
    try:
        closed = peer.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        closed = True
    if closed:
        peer.close()
    return closed


def steady_fds_and_rss(sup: SupervisorProcess) -> tuple[int, int]:
    """Once every service is back at its instances and idle: fd count and RSS.

    A fresh probe client waits on the monitor's own events between two looks
    at query-services (no polling), then makes two round trips so that every
    client that left before was handled; it stays connected while we count,
    at both ends of the comparison alike.
    """
    wanted = {"web": 2, "local": 1, "acc": 0}
    with RawClient(sup.monitor_path).negotiate() as probe:
        deadline = time.monotonic() + 60
        while True:
            services = {s["unit"]: s for s in probe.command("query-services")["return"]}
            if all(
                len(services[unit]["pids"]) == count
                and (count == 0 or services[unit]["state"] == "running")
                for unit, count in wanted.items()
            ):
                break
            assert time.monotonic() < deadline, f"services never settled: {services}"
            try:
                probe.read()  # the next event (a worker started or exited), then look again
            except TimeoutError:
                raise AssertionError(f"no event for 10 s, services unsettled: {services}") from None
        probe.command("query-version")
        probe.command("query-version")
        stored = probe.command("query-fds")["return"]
        assert all(f["owner"].startswith("unit:") for f in stored), stored
        return len(open_fds(sup.pid)), rss_kib(sup.pid)


def test_chaos_refuses_nothing_and_leaks_nothing(supervisor, tmp_path: Path) -> None:
    worker = tmp_path / "chaos_worker.py"
    worker.write_text(WORKER)
    echo = shutil.which("echo") or "/bin/echo"
    versions = {"web": 0, "local": 0}
    sup = supervisor(
        {
            "web": unit_text(worker, "127.0.0.1:0", 0, instances=2),
            "local": unit_text(worker, "unix:chaos.sock", 0, instances=1),
            "acc": accept_unit(echo),
        }
    )
    units = tmp_path / "units"
    common = {
        "sup": sup,
        "units": units,
        "worker": worker,
        "web_port": sup.port("main", unit="web"),
        "acc_port": sup.port("conn", unit="acc"),
        "local_path": units / "chaos.sock",
        "versions": versions,
    }
    warm_up = Storm(seed=1, **common)
    warm_up.run(WARMUP_SECONDS)
    warm_up.check("warm-up")
    assert warm_up.unclosed_peers() == 0
    fds_before, rss_before = steady_fds_and_rss(sup)

    storm = Storm(seed=2, **common)
    storm.run(CHAOS_SECONDS)
    summary = storm.check(f"{CHAOS_SECONDS:g} s")
    assert storm.kills and storm.reloads, summary
    assert storm.unclosed_peers() == 0, "an fd a monitor client handed over was never closed"
    fds_after, rss_after = steady_fds_and_rss(sup)

    assert sup.proc.poll() is None, "the supervisor died"
    assert sup.count("reload_failed") == 0
    assert fds_after == fds_before, f"supervisor fds: {fds_before} before, {fds_after} after"
    assert rss_after - rss_before <= RSS_MARGIN_KIB, (
        f"supervisor RSS grew from {rss_before} to {rss_after} KiB; {summary}"
    )
    print(f"\n{summary}\nfds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB")
