"""Attacks on the notify socket by other users, mounted for real (docs/security.md).

- Its name cannot be taken: not before start-up (the old name was
  ``@fdsupervisor/<pid>/notify``: anyone could bind it first and the supervisor
  exited), not during an upgrade's exec (the old socket used to close there, and
  whoever bound the name then received the workers' ``FDSTORE=1`` fds).
- A child of one unit's worker cannot speak for another unit's worker by joining
  its process group: each worker leads its own session, on both spawn paths.
- A stranger's flood of datagrams costs a bounded number of log lines.

Attackers run as ``nobody`` with the system's ``/usr/bin/python3`` (only the
standard library), from a world-readable directory.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import tests.conftest
from fdsupervisor.log import LOG_RATE_BURST, LOG_RATE_INTERVAL
from tests.conftest import PYTHON, ROOT, SPAWN_PATHS, SupervisorProcess, open_fds
from tests.monitor_client import RawClient

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to run attackers as nobody) and /usr/bin/python3",
)

NOTIFY_ADDRESS = re.compile(r"@fdsupervisor/notify/[0-9a-f]{32}")


def as_nobody(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [SYSTEM_PYTHON, "-c", script, *args],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def finish(attacker: subprocess.Popen[str]) -> dict[str, Any]:
    """Tell the attacker to stop (its stdin ends) and read its one-line JSON report."""
    assert attacker.stdin is not None and attacker.stdout is not None
    try:
        attacker.stdin.close()
        report = attacker.stdout.readline()
        attacker.wait(10)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait(10)
    return dict(json.loads(report))


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory nobody can read (tmp_path is 0700 root)."""
    directory = Path(tempfile.mkdtemp(prefix="fdsup-notify-"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def services(sup: SupervisorProcess) -> dict[str, dict[str, Any]]:
    with RawClient(sup.monitor_path).negotiate() as client:
        return {s["unit"]: s for s in client.command("query-services")["return"]}


def stored(sup: SupervisorProcess) -> list[tuple[str, str]]:
    with RawClient(sup.monitor_path).negotiate() as client:
        return sorted(
            (f["owner"], f["fdname"])
            for f in client.command("query-fds")["return"]
            if f["owner"].startswith("service:")
        )


# -- 1. the name of the notify socket ------------------------------------------------------

# A worker that, for each connection, stores a fresh socketpair end under the
# name the client sends (FDSTORE=1) and answers with its NOTIFY_SOCKET: the
# supervisor's "fd_stored" event says the datagram arrived.
STORING_WORKER = """
import json, os, socket
from systemd import daemon

listener = socket.socket(fileno=3)
kept = []
while True:
    conn, _ = listener.accept()
    with conn:
        name = conn.makefile().readline().strip()
        pair = socket.socketpair()
        kept.extend(pair)
        daemon.notify(f"FDSTORE=1\\nFDNAME={name}", fds=[pair[0].fileno()])
        reply = {"pid": os.getpid(), "notify_socket": os.environ["NOTIFY_SOCKET"]}
        conn.sendall(json.dumps(reply).encode() + b"\\n")
"""


def storing_unit(tmp_path: Path) -> str:
    script = tmp_path / "storing_worker.py"
    script.write_text(STORING_WORKER)
    return f"""
        sockets:
          ctl: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, {script}]
          fd-store-max: 8
        """


def store_through_worker(sup: SupervisorProcess, port: int, name: str) -> dict[str, Any]:
    """Have the worker store an fd named ``name``; returns its answer once it is stored."""
    mark = sup.mark()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(name.encode() + b"\n")
        reply = json.loads(conn.makefile().readline())
    sup.wait_for("fd_stored", after=mark, fdname=name)
    return dict(reply)


# Holds an abstract name (argv[1]) until its stdin ends; reports what it received.
HOLD_NAME = """
import json, os, select, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind(b"\\0" + sys.argv[1].encode())
print(json.dumps({"bound": True}), flush=True)
received = fds = 0
while True:
    ready = select.select([sock, sys.stdin], [], [])[0]
    if sock in ready:
        _data, got, _flags, _address = socket.recv_fds(sock, 4096, 253)
        received, fds = received + 1, fds + len(got)
        for fd in got:
            os.close(fd)
    if sys.stdin in ready:
        break
print(json.dumps({"received": received, "fds": fds}), flush=True)
"""

# Stands in for `python3`: waits for one byte on $TEST_GO_FD, then becomes the
# real interpreter, so the test knows the supervisor's pid before it starts.
WAIT_THEN_EXEC = """#!{python}
import os, sys
go = int(os.environ.pop("TEST_GO_FD"))
os.read(go, 1)
os.close(go)
os.execv({python!r}, [{python!r}, *sys.argv[1:]])
"""


def test_a_stranger_cannot_take_the_notify_socket_before_start(
    supervisor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack on the old name: nobody binds @fdsupervisor/<pid>/notify first."""
    wrapper = tmp_path / "python-after-go"
    wrapper.write_text(WAIT_THEN_EXEC.format(python=PYTHON))
    wrapper.chmod(0o755)
    monkeypatch.setattr(tests.conftest, "PYTHON", str(wrapper))
    go_read, go_write = os.pipe()
    try:
        sup = supervisor(
            {"web": storing_unit(tmp_path)},
            wait_ready=False,
            pass_fds=(go_read,),
            env={"TEST_GO_FD": str(go_read)},
        )
        os.close(go_read)
        go_read = -1
        squatter = as_nobody(HOLD_NAME, f"fdsupervisor/{sup.pid}/notify")
        try:
            assert squatter.stdout is not None
            assert json.loads(squatter.stdout.readline()) == {"bound": True}
            os.write(go_write, b"x")  # now the supervisor may start
            sup.wait_for("ready")
            reply = store_through_worker(sup, sup.port("ctl"), "kept")
        finally:
            report = finish(squatter)
    finally:
        os.close(go_write)
        if go_read >= 0:
            os.close(go_read)
    assert NOTIFY_ADDRESS.fullmatch(reply["notify_socket"]), reply
    assert report == {"received": 0, "fds": 0}
    assert stored(sup) == [("service:web", "kept")]


# Binds the name (argv[1]) in a loop until its stdin ends, as one would around
# an upgrade's exec; if it wins, it holds the name and counts what arrives.
SNATCH_NAME = """
import errno, json, os, select, socket, sys
name = b"\\0" + sys.argv[1].encode()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
tries, won = 0, False
print(json.dumps({"trying": True}), flush=True)
while not won:
    if select.select([sys.stdin], [], [], 0)[0]:
        break
    tries += 1
    try:
        sock.bind(name)
        won = True
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
received = fds = 0
while won:
    ready = select.select([sock, sys.stdin], [], [])[0]
    if sock in ready:
        _data, got, _flags, _address = socket.recv_fds(sock, 4096, 253)
        received, fds = received + 1, fds + len(got)
        for fd in got:
            os.close(fd)
    if sys.stdin in ready:
        break
print(json.dumps({"won": won, "tries": tries, "received": received, "fds": fds}), flush=True)
"""


def test_the_notify_socket_is_never_free_during_an_upgrade(supervisor, tmp_path: Path) -> None:
    sup = supervisor({"web": storing_unit(tmp_path)})
    port = sup.port("ctl")
    before = store_through_worker(sup, port, "before")
    address = before["notify_socket"]
    # The name is no secret once bound (/proc/net/unix lists it): only holding it counts.
    assert address in Path("/proc/net/unix").read_text()
    snatcher = as_nobody(SNATCH_NAME, address[1:])
    try:
        assert snatcher.stdout is not None
        assert json.loads(snatcher.stdout.readline()) == {"trying": True}
        mark = sup.mark()
        os.kill(sup.pid, signal.SIGUSR2)
        sup.wait_for("upgraded", after=mark, timeout=30)
        after = store_through_worker(sup, port, "after")
    finally:
        report = finish(snatcher)
    assert report["won"] is False and report["received"] == 0, report
    assert after == before, "the same worker, and its NOTIFY_SOCKET still reaches the supervisor"
    assert NOTIFY_ADDRESS.fullmatch(address), address
    assert stored(sup) == [("service:web", "after"), ("service:web", "before")]
    assert sup.stop() == 0


# -- 4. a worker's child cannot speak for another unit's worker ----------------------------

# Unit a's worker, run as nobody: for each connection a line "attack PID" or
# "legit". For an attack, a child moves into the process group PID (unit b's
# worker) and sends STATUS=, WATCHDOG_USEC=1 and FDSTORE=1 with a listening
# socket of its own in one datagram; for "legit", a grandchild in a's own group
# sends STATUS= and MAINPID=. The sender answers on the connection first, and
# lives until the test closes it: the supervisor looks up a sender's group when
# it reads the datagram, and a process that is gone by then has none.
A_WORKER = """
import array, json, os, resource, socket, sys

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a watchdog kill is SIGABRT


def notify(text, fds=()):
    address = os.environ["NOTIFY_SOCKET"]
    if address.startswith("@"):
        address = "\\0" + address[1:]
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendmsg([text.encode()], ancillary, 0, address)


listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    words = conn.makefile().readline().split()
    child = os.fork()
    if child == 0:
        if words[0] == "attack":
            try:
                os.setpgid(0, int(words[1]))
                error = None
            except OSError as exc:
                error = exc.errno
            spare = socket.socket()
            spare.bind(("127.0.0.1", 0))
            spare.listen()
            answer = {"setpgid_errno": error, "pgid": os.getpgid(0), "pid": os.getpid()}
            conn.sendall(json.dumps(answer).encode() + b"\\n")
            notify(
                "STATUS=forged\\nWATCHDOG_USEC=1\\nFDSTORE=1\\nFDNAME=http", [spare.fileno()]
            )
            conn.recv(1)
        else:
            grandchild = os.fork()
            if grandchild == 0:
                answer = {"pid": os.getpid(), "pgid": os.getpgid(0)}
                conn.sendall(json.dumps(answer).encode() + b"\\n")
                notify(f"STATUS=from a grandchild\\nMAINPID={os.getpid()}")
                conn.recv(1)
                os._exit(0)
            os.waitpid(grandchild, 0)
        os._exit(0)
    conn.close()
    os.waitpid(child, 0)
"""


def two_units(public_dir: Path) -> dict[str, str]:
    script = public_dir / "a_worker.py"
    script.write_text(A_WORKER)
    script.chmod(0o644)
    notifier = ROOT / "tests" / "workers" / "notifier.py"
    a = textwrap.dedent(f"""
        sockets:
          ctl: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{SYSTEM_PYTHON}, {script}]
          user: nobody
          working-directory: /
          restart: no
        """)
    b = textwrap.dedent(f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, {notifier}, ready]
          notify: true
          fd-store-max: 4
        """)
    return {"a": a, "b": b}


@contextmanager
def asking_a(sup: SupervisorProcess, line: str) -> Iterator[dict[str, Any]]:
    """Unit a's answer to ``line``; its sender lives until the block ends."""
    with socket.create_connection(("127.0.0.1", sup.port("ctl", unit="a")), timeout=10) as conn:
        conn.sendall(line.encode() + b"\n")
        yield dict(json.loads(conn.makefile().readline()))


def started(sup: SupervisorProcess) -> tuple[int, int]:
    a = sup.wait_for("worker_started", unit="a")["pid"]
    sup.wait_for("service_ready", unit="b")
    b = sup.wait_for("worker_started", unit="b")["pid"]
    return a, b


@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_a_child_of_one_worker_cannot_speak_for_another(
    supervisor, public_dir: Path, spawn_env: dict[str, str]
) -> None:
    sup = supervisor(two_units(public_dir), env=spawn_env)
    a_pid, b_pid = started(sup)
    mark = sup.mark()
    with asking_a(sup, f"attack {b_pid}") as answer:
        # the datagram counts for a, whose child sent it: a's watchdog, set to 1 µs, fires
        killed = sup.wait_for("worker_killed", after=mark)
    assert (killed["unit"], killed["pid"]) == ("a", a_pid), killed
    now = services(sup)
    assert now["b"]["status"] == "serving requests", now["b"]
    assert stored(sup) == [], "a socket of the attacker's in b's fd store"
    assert now["b"]["pids"] == [b_pid] and sup.count("worker_killed", unit="b") == 0
    assert answer["setpgid_errno"] == errno.EPERM and answer["pgid"] == a_pid, answer
    assert now["a"]["status"] == "forged"
    assert sup.wait_for("fd_store_full", after=mark)["unit"] == "a"  # a's fd-store-max: 0


@pytest.mark.parametrize("spawn_env", SPAWN_PATHS)
def test_a_grandchild_in_the_workers_own_group_speaks_for_it(
    supervisor, public_dir: Path, spawn_env: dict[str, str]
) -> None:
    sup = supervisor(two_units(public_dir), env=spawn_env)
    a_pid, _b_pid = started(sup)
    mark = sup.mark()
    with asking_a(sup, "legit") as answer:
        logged = sup.wait_for("worker_main_pid", after=mark, main_pid=answer["pid"])
    assert answer["pgid"] == a_pid and answer["pid"] != a_pid
    assert (logged["unit"], logged["pid"]) == ("a", a_pid)
    now = services(sup)
    assert now["a"]["status"] == "from a grandchild"
    assert now["b"]["status"] == "serving requests"


# -- a sender gone before its datagram is read (attribution by pidfd) ------------------------

# For each connection "TEXT COUNT": a child sends TEXT ("\\n" for a newline, "#" for the
# datagram's number) COUNT times to NOTIFY_SOCKET and exits at once; the worker reaps it,
# then answers. Once the answer is read, the sender is reaped: its pid and group are gone.
EXITING_CHILD_WORKER = r"""
import json, os, socket

address = os.environ["NOTIFY_SOCKET"]
target = "\0" + address[1:] if address.startswith("@") else address
listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    with conn:
        text, count = conn.makefile().readline().split()
        text = text.replace("\\n", "\n")
        child = os.fork()
        if child == 0:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                for n in range(int(count)):
                    sock.sendto(text.replace("#", str(n)).encode(), target)
            os._exit(0)
        os.waitpid(child, 0)
        answer = {"child": child, "notify_socket": address}
        conn.sendall(json.dumps(answer).encode() + b"\n")
"""

# argv: the notify socket (@name), a text ("\\n" for a newline), how many times; then exits.
SEND_AND_EXIT = r"""
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[3])):
    sock.sendto(sys.argv[2].replace("\\n", "\n").encode(), "\0" + sys.argv[1][1:])
"""


def exiting_child_units(public_dir: Path) -> dict[str, str]:
    script = public_dir / "exiting_child_worker.py"
    script.write_text(EXITING_CHILD_WORKER)
    script.chmod(0o644)
    a = f"""
        sockets:
          ctl: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{SYSTEM_PYTHON}, {script}]
          user: nobody
          working-directory: /
          notify: true
        """
    # b waits for a READY=1 it never sends itself
    b = f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, "import time; time.sleep(600)"]
          notify: true
        """
    return {"a": a, "b": b}


def child_of_a_sends(sup: SupervisorProcess, text: str, count: int = 1) -> dict[str, Any]:
    """Unit a's worker's child sends ``text`` ``count`` times and is reaped: the answer."""
    with socket.create_connection(("127.0.0.1", sup.port("ctl", unit="a")), timeout=10) as conn:
        conn.sendall(f"{text} {count}\n".encode())
        return dict(json.loads(conn.makefile().readline()))


def stranger_sends(address: str, text: str, count: int = 1) -> None:
    """``nobody`` sends ``text`` ``count`` times and exits; it is reaped on return."""
    subprocess.run(
        [SYSTEM_PYTHON, "-c", SEND_AND_EXIT, address, text, str(count)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        timeout=30,
        check=True,
    )


@contextmanager
def supervisor_stopped(sup: SupervisorProcess) -> Iterator[None]:
    """SIGSTOP the supervisor for the block: what is sent meanwhile waits in its queue."""
    os.kill(sup.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(sup.pid, signal.SIGCONT)


def started_exiting_child_units(sup: SupervisorProcess) -> int:
    sup.wait_for("cgroups_enabled")
    sup.wait_for("worker_started", unit="b")
    return int(sup.wait_for("worker_started", unit="a")["pid"])


def test_a_child_that_exits_before_its_message_is_read_is_credited_to_its_unit(
    supervisor, public_dir: Path
) -> None:
    sup = supervisor(exiting_child_units(public_dir), wait_ready=False)
    a_pid = started_exiting_child_units(sup)
    mark = sup.mark()
    with supervisor_stopped(sup):
        # read only once its sender is reaped: its pid and its group are no one's
        answer = child_of_a_sends(sup, "READY=1\\nSTATUS=from-an-exited-child")
    ready = sup.wait_for("service_ready", after=mark, unit="a")
    assert ready["pid"] == a_pid and answer["child"] != a_pid
    now = services(sup)
    assert now["a"]["status"] == "from-an-exited-child"
    assert (now["b"]["state"], now["b"]["status"]) == ("starting", None), now["b"]
    assert sup.count("notify_ignored") == 0


def test_a_stranger_that_exits_before_its_message_is_read_is_still_nobodys(
    supervisor, public_dir: Path
) -> None:
    sup = supervisor(exiting_child_units(public_dir), wait_ready=False)
    started_exiting_child_units(sup)
    address = child_of_a_sends(sup, "STATUS=a-speaks")["notify_socket"]
    mark = sup.mark()
    with supervisor_stopped(sup):
        stranger_sends(address, "READY=1\\nSTATUS=forged")
    ignored = sup.wait_for("notify_ignored", after=mark)
    assert ignored["uid"] == NOBODY, ignored
    now = services(sup)
    assert now["a"]["status"] == "a-speaks" and now["b"]["status"] is None, now
    assert sup.count("service_ready") == 0


def test_thousands_of_datagrams_leave_the_supervisors_fd_count_as_it_was(
    supervisor, public_dir: Path
) -> None:
    """Each datagram brings a pidfd: every one is closed as soon as it is read."""
    sup = supervisor(exiting_child_units(public_dir), wait_ready=False)
    started_exiting_child_units(sup)
    address = child_of_a_sends(sup, "STATUS=first")["notify_socket"]
    before = open_fds(sup.pid)
    stranger_sends(address, "STATUS=stranger", 2000)
    child_of_a_sends(sup, "STATUS=#", 2000)
    mark = sup.mark()
    child_of_a_sends(sup, "last-of-all")  # a line without "=": notify_invalid, in order
    sup.wait_for("notify_invalid", after=mark, unit="a")
    after = open_fds(sup.pid)
    assert services(sup)["a"]["status"] == "1999"
    assert after == before, [
        os.readlink(f"/proc/{sup.pid}/fd/{fd}") for fd in set(after) - set(before)
    ]


# -- 12. a flood of datagrams from a stranger -----------------------------------------------

FLOOD = 5000
OVERSIZE = 200  # longer than NOTIFY_BUFFER_MAX: "notify_datagram_dropped"

# Sends argv[2] datagrams of STATUS= and argv[3] oversize ones to argv[1], blocking
# (a full queue makes the sender wait: none is lost), then reports.
FLOOD_SENDER = """
import json, socket, sys
address = "\\0" + sys.argv[1][1:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[2])):
    sock.sendto(b"STATUS=flood", address)
for _ in range(int(sys.argv[3])):
    sock.sendto(b"STATUS=" + b"x" * 5000, address)
print(json.dumps({"sent": True}), flush=True)
sys.stdin.read()
"""


def test_a_flood_from_a_stranger_costs_a_bounded_number_of_lines(
    supervisor, tmp_path: Path
) -> None:
    sup = supervisor({"web": storing_unit(tmp_path)})
    port = sup.port("ctl")
    address = store_through_worker(sup, port, "first")["notify_socket"]
    mark, begun = sup.mark(), time.monotonic()
    sender = as_nobody(FLOOD_SENDER, address, str(FLOOD), str(OVERSIZE))
    try:
        with RawClient(sup.monitor_path).negotiate() as client:
            assert "return" in client.command("query-version")  # answers during the flood
        assert sender.stdout is not None
        assert json.loads(sender.stdout.readline()) == {"sent": True}
        # the worker's datagram queues behind every one of the flood: once it is
        # stored, the supervisor has read them all
        store_through_worker(sup, port, "after-flood")
    finally:
        assert sender.stdin is not None
        sender.stdin.close()
        sender.wait(10)
    with RawClient(sup.monitor_path).negotiate() as client:
        assert "return" in client.command("query-version")
    assert sup.stop() == 0  # writes the summaries of the windows still open
    elapsed = time.monotonic() - begun
    windows = 1 + int(elapsed // LOG_RATE_INTERVAL)
    events = sup.events[mark:]
    ignored = [e for e in events if e["event"] == "notify_ignored"]
    dropped = [e for e in events if e["event"] == "notify_datagram_dropped"]
    summaries = [e for e in events if e["event"] == "warnings_suppressed"]
    assert 1 <= len(ignored) <= LOG_RATE_BURST * windows, len(ignored)
    assert ignored[0]["uid"] == NOBODY and ignored[0]["level"] == "warning"
    assert 1 <= len(dropped) <= LOG_RATE_BURST * windows, "NotifySocket's own warnings are logged"
    assert len(summaries) <= 2 * windows
    counted = {"notify_ignored": len(ignored), "notify_datagram_dropped": len(dropped)}
    for summary in summaries:
        counted[summary["warning"]] += summary["suppressed"]
    assert counted == {"notify_ignored": FLOOD, "notify_datagram_dropped": OVERSIZE}
