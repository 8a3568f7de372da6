"""The supervisor's side of systemd, with real sockets: the test plays systemd.

- sd_notify: a datagram socket stands in for systemd's notify socket; a
  child process sends through :class:`SystemdNotifier` (systemd-python's
  ``daemon.notify``); every datagram, its sender's credentials and the fds
  it carries (SCM_RIGHTS) are checked.
- ``LISTEN_FDS``: systemd's own ``systemd-socket-activate`` hands sockets
  to a child, under fd store names.
- The fd store: stored sockets outlive the process that stored them (a
  restart refuses no connection), and are recognised or refused by
  :func:`stored_socket_mismatch` in the next one.
- contrib/systemd: ``systemd-analyze verify`` on the unit files, and the
  example unit served through a socket passed the way
  ``fdsupervisor.socket`` passes it.
- A restart of the supervisor itself: its sockets go to the fd store and
  come back, while clients connect throughout: none refused.
"""

from __future__ import annotations

import array
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.addresses import FdAddress, InetAddress, SocketAddress, UnixAddress
from fdsupervisor.fdpassing import scrub_environment
from fdsupervisor.systemd import SystemdSockets, adoptable, stored_socket_mismatch
from fdsupervisor.units import SocketKind, SocketSpec
from tests.conftest import PYTHON, ROOT, fdsupervisor_command

CONTRIB = ROOT / "contrib" / "systemd"
# Whatever systemd gave the test run itself is not for the children here.
ENV = scrub_environment(os.environ)


@dataclass
class Datagram:
    text: str
    fds: list[int]
    pid: int


class NotifySocket:
    """systemd's side of sd_notify: an AF_UNIX datagram socket with SO_PASSCRED."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        # systemd reads the sender's pid from SCM_CREDENTIALS (NotifyAccess=main).
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[int] = []

    def receive(self, timeout: float = 10.0) -> Datagram:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        assert ready, "no datagram on the notify socket"
        fd_space = socket.CMSG_SPACE(253 * array.array("i").itemsize)
        cred_space = socket.CMSG_SPACE(12)
        data, ancillary, flags, _ = self.sock.recvmsg(4096, fd_space + cred_space)
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        fds: list[int] = []
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                numbers = array.array("i")
                numbers.frombytes(payload[: len(payload) - len(payload) % numbers.itemsize])
                fds += list(numbers)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(payload[:4], sys.byteorder)
        self.received += fds
        return Datagram(data.decode(), fds, pid)

    def close(self) -> None:
        for fd in self.received:
            try:
                os.close(fd)
            except OSError:
                pass
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify")
    yield sock
    sock.close()


# --------------------------------------------------------------------------- sd_notify

NOTIFYING_CHILD = textwrap.dedent(
    """
    import json, os, socket, sys, time
    from fdsupervisor.systemd import SystemdNotifier

    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(sys.argv[1])
    unix.listen()
    notifier = SystemdNotifier(os.environ)
    results = {"watchdog": notifier.watchdog_interval(), "fd_store_max": notifier.fd_store_max}
    results["before"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sent = [
        notifier.ready("2 units, 3 sockets"),
        notifier.status("unit web failed:\\nREADY=1"),
        notifier.reloading(),
        notifier.ready("reloaded"),
        notifier.ping(),
        notifier.store_fds([("web/http", tcp.fileno()), ("web.v2/admin", unix.fileno())]),
        notifier.remove_fds("old/gone"),
        notifier.stopping(),
    ]
    results["after"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    results["sent"] = sent
    results["port"] = tcp.getsockname()[1]
    results["inodes"] = [
        [os.fstat(s.fileno()).st_dev, os.fstat(s.fileno()).st_ino] for s in (tcp, unix)
    ]
    print(json.dumps(results), flush=True)
    """
)


def run_child(script: str, tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, Any]:
    path = tmp_path / "child.py"
    path.write_text(script)
    proc = subprocess.Popen(
        [PYTHON, str(path), *args], stdout=subprocess.PIPE, env={**ENV, **env}, text=True
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return proc.pid, json.loads(out)


def test_notifier_datagrams_fds_and_credentials(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    pid, results = run_child(
        NOTIFYING_CHILD,
        tmp_path,
        {"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "4000000", "FDSTORE": "512"},
        str(tmp_path / "admin.sock"),
    )
    assert results["sent"] == [True] * 8
    assert results["watchdog"] == 2.0
    assert results["fd_store_max"] == 512
    messages = [notify_socket.receive() for _ in range(11)]
    assert all(m.pid == pid for m in messages)  # what NotifyAccess=main checks
    texts = [m.text for m in messages]
    assert texts[0] == "READY=1\nSTATUS=2 units, 3 sockets"
    assert texts[1] == "STATUS=unit web failed: READY=1"
    reloading = texts[2].split("\n")
    assert reloading[0] == "RELOADING=1"
    usec = int(reloading[1].removeprefix("MONOTONIC_USEC="))
    assert results["before"] <= usec <= results["after"]  # one CLOCK_MONOTONIC for all
    assert reloading[2] == "STATUS=reloading"
    assert texts[3:] == [
        "READY=1\nSTATUS=reloaded",
        "WATCHDOG=1",
        "FDSTOREREMOVE=1\nFDNAME=web/http",
        "FDSTORE=1\nFDNAME=web/http",
        "FDSTOREREMOVE=1\nFDNAME=web.v2/admin",
        "FDSTORE=1\nFDNAME=web.v2/admin",
        "FDSTOREREMOVE=1\nFDNAME=old/gone",
        "STOPPING=1\nSTATUS=stopping",
    ]
    assert [len(m.fds) for m in messages] == [0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0]
    assert not select.select([notify_socket.sock], [], [], 0.2)[0]  # nothing more
    # The fds that arrived are the very sockets the child sent.
    received = [messages[6].fds[0], messages[8].fds[0]]
    inodes = [[os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in received]
    assert inodes == results["inodes"]

    # The child is gone; the store (this test) holds its listening socket, so
    # a client is queued, not refused, until the next instance accepts.
    stored = socket.socket(fileno=os.dup(received[0]))
    with stored, socket.create_connection(("127.0.0.1", results["port"]), timeout=5) as client:
        client.sendall(b"ping")
        conn, _ = stored.accept()
        with conn:
            assert conn.recv(4) == b"ping"


def test_notifier_sends_nothing_without_notify_socket(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    _, results = run_child(NOTIFYING_CHILD, tmp_path, {}, str(tmp_path / "admin.sock"))
    assert results["sent"] == [False] * 8
    assert results["watchdog"] is None
    assert not select.select([notify_socket.sock], [], [], 0.2)[0]


BARRIER_CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from fdsupervisor.systemd import SystemdNotifier
    notifier = SystemdNotifier(os.environ)
    notifier.remove_fds("web/http")
    start = time.monotonic()
    done = notifier.barrier(timeout=float(sys.argv[1]))
    print(json.dumps([done, time.monotonic() - start]), flush=True)
    """
)


@pytest.mark.parametrize("manager_answers", [True, False])
def test_barrier_waits_for_the_manager(
    tmp_path: Path, notify_socket: NotifySocket, manager_answers: bool
) -> None:
    script = tmp_path / "child.py"
    script.write_text(BARRIER_CHILD)
    env = {**ENV, "NOTIFY_SOCKET": str(notify_socket.path)}
    timeout = "10" if manager_answers else "0.3"
    proc = subprocess.Popen(
        [PYTHON, str(script), timeout], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert notify_socket.receive().text == "FDSTOREREMOVE=1\nFDNAME=web/http"
        barrier = notify_socket.receive()
        assert barrier.text == "BARRIER=1"
        assert len(barrier.fds) == 1
        if manager_answers:
            # the child says nothing while the manager holds the barrier's fd
            assert proc.stdout is not None
            assert not select.select([proc.stdout], [], [], 0.3)[0], "it did not wait"
            os.close(barrier.fds[0])  # systemd closes it once it handled what came before
            notify_socket.received.remove(barrier.fds[0])
        done, waited = json.loads(proc.communicate(timeout=30)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert done is manager_answers
    assert waited >= 0.25


def test_notifier_survives_a_manager_that_went_away(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json, os
        from fdsupervisor.systemd import SystemdNotifier
        n = SystemdNotifier(os.environ)
        print(json.dumps([n.ready("x"), n.ping(), type(n.last_error).__name__]))
        """
    )
    _, results = run_child(script, tmp_path, {"NOTIFY_SOCKET": str(tmp_path / "nobody")})
    assert results == [False, False, "FileNotFoundError"]


# --------------------------------------------------------------------------- LISTEN_FDS

RECEIVING_CHILD = textwrap.dedent(
    """
    import json, os, sys
    from fdsupervisor.systemd import SystemdSockets, adoptable, stored_socket_mismatch
    from fdsupervisor.addresses import UnixAddress
    from fdsupervisor.units import SocketSpec
    from pathlib import Path

    mine = SystemdSockets.from_environment(os.environ, os.getpid())
    not_mine = SystemdSockets.from_environment(os.environ, os.getppid())
    found = {f"{u}/{s}": fd for (u, s), fd in adoptable(mine).items()}
    spec = SocketSpec("http", UnixAddress(sys.argv[1]))
    print(json.dumps({
        "numbers": mine.numbers,
        "by_name": mine.by_name,
        "not_mine": not_mine.numbers,
        "adoptable": found,
        "mismatch": stored_socket_mismatch(found["web/http"], spec, Path("/")),
        "wrong_path": stored_socket_mismatch(
            found["web/http"], SocketSpec("http", UnixAddress(sys.argv[1] + "x")), Path("/")
        ),
    }), flush=True)
    """
)


def test_listen_fds_from_systemd_socket_activate(tmp_path: Path) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed")
    script = tmp_path / "child.py"
    script.write_text(RECEIVING_CHILD)
    path = tmp_path / "http.sock"
    child = [str(script), str(path)]
    proc = subprocess.Popen(
        [activate, "-l", str(path), "--fdname=web/http", PYTHON, *child],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    try:
        # It says where it listens once bound, and execs the child on the first
        # connection, as a .socket unit starts its service.
        assert proc.stderr is not None
        listening = proc.stderr.readline()
        assert listening.startswith(f"Listening on {path} as 3"), listening
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    client.close()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["numbers"] == [3]
    assert result["by_name"] == {"web/http": [3]}
    assert result["not_mine"] == []  # LISTEN_PID is the child's, not its parent's
    assert result["adoptable"] == {"web/http": 3}
    assert result["mismatch"] is None
    assert "bound to" in result["wrong_path"]


# --------------------------------------------------------------------------- stored sockets


def spec(address: SocketAddress, kind: SocketKind = SocketKind.STREAM) -> SocketSpec:
    return SocketSpec("s", address, kind)


def test_stored_inet_socket_fits_its_unit_or_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        fd, port = sock.fileno(), sock.getsockname()[1]
        base = Path("/")
        assert stored_socket_mismatch(fd, spec(InetAddress("127.0.0.1", str(port))), base) is None
        assert stored_socket_mismatch(fd, spec(InetAddress("localhost", str(port))), base) is None
        assert stored_socket_mismatch(fd, spec(InetAddress("127.0.0.1", "0")), base) is None
        ranged = InetAddress("127.0.0.1", str(port - 1), to=port + 1)
        assert stored_socket_mismatch(fd, spec(ranged), base) is None
        other_port = stored_socket_mismatch(fd, spec(InetAddress("127.0.0.1", str(port + 1))), base)
        assert (
            other_port == f"it is bound to 127.0.0.1:{port}, the unit declares 127.0.0.1:{port + 1}"
        )
        other_host = stored_socket_mismatch(fd, spec(InetAddress("127.0.0.2", str(port))), base)
        assert other_host is not None
        assert stored_socket_mismatch(fd, spec(InetAddress("::1", str(port))), base) is not None
        datagram = stored_socket_mismatch(
            fd, spec(InetAddress("127.0.0.1", str(port)), SocketKind.DATAGRAM), base
        )
        assert datagram == "it is a stream socket, the unit declares datagram"
        assert "inherited fd" in str(stored_socket_mismatch(fd, spec(FdAddress("3")), base))


def test_stored_socket_must_be_listening() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        mismatch = stored_socket_mismatch(
            sock.fileno(), spec(InetAddress("127.0.0.1", str(port))), Path("/")
        )
        assert mismatch == "it is not listening"


def test_stored_udp() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        address = InetAddress("127.0.0.1", str(port))
        assert (
            stored_socket_mismatch(udp.fileno(), spec(address, SocketKind.DATAGRAM), Path("/"))
            is None
        )


def test_stored_dual_stack() -> None:
    if not socket.has_ipv6:
        pytest.skip("this Python has no IPv6 support (socket.has_ipv6 is false)")
    try:
        any6 = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    except OSError as exc:
        pytest.skip(f"cannot bind a dual-stack socket on [::] here: {exc}")
    with any6:
        port = any6.getsockname()[1]
        assert (
            stored_socket_mismatch(any6.fileno(), spec(InetAddress("", str(port))), Path("/"))
            is None
        )


def test_stored_unix_sockets(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        path = tmp_path / "run" / "web.sock"
        path.parent.mkdir()
        sock.bind(str(path))
        sock.listen()
        fd = sock.fileno()
        assert stored_socket_mismatch(fd, spec(UnixAddress("run/web.sock")), tmp_path) is None
        assert stored_socket_mismatch(fd, spec(UnixAddress(str(path))), Path("/elsewhere")) is None
        assert "bound to" in str(
            stored_socket_mismatch(fd, spec(UnixAddress("web.sock")), tmp_path)
        )
        path.unlink()  # a client could no longer find it: bind anew
        gone = stored_socket_mismatch(fd, spec(UnixAddress("run/web.sock")), tmp_path)
        assert gone == f"its socket file {path} is gone"
        path.write_text("not a socket")
        assert "gone" in str(stored_socket_mismatch(fd, spec(UnixAddress(str(path))), tmp_path))


def test_stored_abstract_sockets() -> None:
    name = f"fdsupervisor-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as tight:
        tight.bind(b"\0" + name.encode())
        tight.listen()
        address = UnixAddress(name, abstract=True)
        assert (
            stored_socket_mismatch(tight.fileno(), spec(address, SocketKind.SEQPACKET), Path("/"))
            is None
        )
        loose = UnixAddress(name, abstract=True, tight=False)
        assert stored_socket_mismatch(tight.fileno(), spec(loose, SocketKind.SEQPACKET), Path("/"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as padded:
        padded.bind((b"\0" + name.encode()).ljust(108, b"\0"))
        loose = UnixAddress(name, abstract=True, tight=False)
        assert (
            stored_socket_mismatch(padded.fileno(), spec(loose, SocketKind.DATAGRAM), Path("/"))
            is None
        )


def test_not_a_socket(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as file:
        mismatch = stored_socket_mismatch(file.fileno(), spec(InetAddress("", "1")), tmp_path)
    assert mismatch is not None and "not a socket" in mismatch


def test_stored_sockets_never_report_hangup_or_error(tmp_path: Path) -> None:
    """Why store_fds() sends no FDPOLL=0.

    systemd watches each stored fd with epoll for no events at all
    (``sd_event_add_io(..., fd, 0, ...)`` in ``service_add_fd_store()``), so
    only EPOLLHUP and EPOLLERR, and drops the fd when one comes. No kind of
    socket the supervisor binds ever reports either, even with a client
    queued that nobody accepts.
    """
    sockets = [
        socket.create_server(("127.0.0.1", 0)),
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
        socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET),
    ]
    sockets[1].bind(("127.0.0.1", 0))
    for index, sock in enumerate(sockets[2:]):
        sock.bind(str(tmp_path / f"s{index}"))
        if sock.type != socket.SOCK_DGRAM:
            sock.listen()
    client = socket.create_connection(sockets[0].getsockname())
    epoll = select.epoll()
    try:
        for sock in sockets:
            epoll.register(sock.fileno(), 0)
        assert epoll.poll(0.2) == []
    finally:
        epoll.close()
        client.close()
        for sock in sockets:
            sock.close()


def test_adoptable_names_from_a_real_listen_fds_environment() -> None:
    environ = {
        "LISTEN_PID": "42",
        "LISTEN_FDS": "3",
        "LISTEN_FDNAMES": "web-http:web/http:api/admin",
    }
    sockets = SystemdSockets.from_environment(environ, 42)
    assert adoptable(sockets) == {("web", "http"): 4, ("api", "admin"): 5}


# --------------------------------------------------------------------------- contrib/systemd


UNIT_FILES = ("fdsupervisor.socket", "fdsupervisor.service")


def verify(directory: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    return subprocess.run(
        [analyze, "verify", "--man=no", *(str(directory / f) for f in UNIT_FILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def installed_copy(tmp_path: Path, extra: str = "") -> Path:
    """The unit files with ExecStart= pointing at this venv's fdsupervisor.

    ``systemd-analyze verify`` fails a unit whose command is missing, and
    /usr/local/bin/fdsupervisor is where docs/systemd.md installs it, not
    where the tests run.
    """
    executable = Path(PYTHON).parent / "fdsupervisor"
    if not executable.exists():
        pytest.skip(f"{executable} is missing (pip install -e . first)")
    directory = tmp_path / "system"
    directory.mkdir()
    service = (CONTRIB / "fdsupervisor.service").read_text()
    assert "ExecStart=/usr/local/bin/fdsupervisor " in service
    service = service.replace("ExecStart=/usr/local/bin/fdsupervisor ", f"ExecStart={executable} ")
    (directory / "fdsupervisor.service").write_text(
        service.replace("[Install]", extra + "[Install]")
    )
    shutil.copy(CONTRIB / "fdsupervisor.socket", directory)
    return directory


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """Every complaint about our files: verify exits 0 on unknown keys and bad values."""
    output = (result.stdout + result.stderr).splitlines()
    return [line for line in output if "fdsupervisor." in line]


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    result = verify(installed_copy(tmp_path))
    assert result.returncode == 0, result.stderr
    assert problems(result) == [], result.stderr


@pytest.mark.parametrize(
    "broken", ["Bogus=1\n", "KillMode=sometimes\n", "WatchdogSec=soon\n", "Type=notify-ish\n"]
)
def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path, broken: str) -> None:
    result = verify(installed_copy(tmp_path, extra="[Service]\n" + broken))
    assert result.returncode != 0 or problems(result), "the check would miss a broken unit"


def test_service_file_settings() -> None:
    service = (CONTRIB / "fdsupervisor.service").read_text()
    settings = dict(
        line.split("=", 1) for line in service.splitlines() if re.match(r"^[A-Za-z]+=", line)
    )
    assert settings["Type"] == "notify"
    assert settings["NotifyAccess"] == "main"
    assert settings["WatchdogSec"] == "30s"
    assert settings["FileDescriptorStoreMax"] == "512"
    assert settings["ExecStart"] == "/usr/local/bin/fdsupervisor run /etc/fdsupervisor/units"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["KillMode"] == "mixed"
    assert settings["RuntimeDirectory"] == "fdsupervisor"
    assert settings["RuntimeDirectoryMode"] == "0700"
    assert settings["Restart"] == "on-failure"
    socket_unit = (CONTRIB / "fdsupervisor.socket").read_text()
    assert "ListenStream=127.0.0.1:8080" in socket_unit


# systemd's exec step: the passed fds (numbers in argv[1], comma-separated) at
# 3, 4, ... in order and nothing else of them left open; LISTEN_PID the pid that execs.
EXEC_AS_SYSTEMD = """
import fcntl, os, sys
passed = [int(n) for n in sys.argv[1].split(",")]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in passed]
for fd in passed:
    os.close(fd)
for index, fd in enumerate(high):
    os.dup2(fd, 3 + index)  # inheritable
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


def exec_as_systemd(fds: list[int], command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start ``command`` with ``fds`` at 3, 4, ... as systemd's ``exec_spawn()`` passes them."""
    return subprocess.Popen(
        [PYTHON, "-c", EXEC_AS_SYSTEMD, ",".join(map(str, fds)), *command],
        pass_fds=fds,
        **kwargs,
    )


def test_example_unit_served_through_a_socket_passed_as_systemd_does(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """contrib/systemd/units/web.yaml behind a socket handed over as fdsupervisor.socket would.

    The test binds 127.0.0.1 on a port the kernel picks and starts the
    supervisor with it at fd 3, ``LISTEN_FDS=1``, ``LISTEN_FDNAMES=web-http``
    and ``LISTEN_PID`` set to the supervisor's own pid in the exec'd
    process, as systemd's ``build_environment()`` does (the previous test
    has systemd's own code do it, but ``systemd-socket-activate`` wants a
    fixed port). The unit takes the socket as ``{type: fd, str: "3"}``; the
    supervisor tells the stand-in notify socket READY=1 and, at SIGTERM,
    STOPPING=1.
    """
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("the example runs /usr/bin/python3")
    unit = (CONTRIB / "units" / "web.yaml").read_text()
    if os.geteuid() != 0:  # user:/group: need root
        unit = re.sub(r"(?m)^  (user|group): .*\n", "", unit)
    units = tmp_path / "units"
    units.mkdir()
    (units / "web.yaml").write_text(unit)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    env = {
        **ENV,
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "web-http",
        "NOTIFY_SOCKET": str(notify_socket.path),
    }
    command = fdsupervisor_command("run", "--no-monitor", "--log-format", "json")
    log = tmp_path / "supervisor.log"
    with listener, open(log, "w") as log_file:
        proc = exec_as_systemd(
            [listener.fileno()],
            [*command, str(units)],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env=env,
            cwd="/",
        )
    try:
        # The supervisor may still be starting: the client waits in the backlog.
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            response = client.recv(1024)
        assert response.startswith(b"HTTP/1.0 "), log.read_text()
        ready = notify_socket.receive(timeout=20)
        assert ready.text == "READY=1\nSTATUS=1 units, 1 sockets"
        assert ready.pid == proc.pid  # exec'd in place: systemd's main pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert notify_socket.receive().text.startswith("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [
        json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")
    ]
    assert "worker_started" in events and "inherited_fd_closed" not in events


# --------------------------------------------------------------------------- a restart


RESTART_UNIT = """
sockets:
  http: {{listen: "127.0.0.1:0"}}
  admin: {{listen: {{type: unix, path: run/admin.sock}}}}
service:
  exec: [{python}, {echo}]
"""


def until_ready(notify: NotifySocket, process: subprocess.Popen[bytes]) -> list[Datagram]:
    """This process's messages up to its READY=1 (a stopped one may still be pinging)."""
    messages: list[Datagram] = []
    while not messages or not messages[-1].text.startswith("READY=1"):
        message = notify.receive(timeout=20)
        if message.pid == process.pid:
            messages.append(message)
    return messages


def test_a_restarted_supervisor_takes_its_sockets_back_from_the_fd_store(
    tmp_path: Path, notify_socket: NotifySocket
) -> None:
    """What ``systemctl restart fdsupervisor`` does, with the test as systemd.

    The first supervisor stores its sockets (``FDSTORE=1``, ``FDNAME=web/http``,
    ``web/admin``) and pings the watchdog; it stops. While no supervisor runs
    clients connect, to both sockets, and are not refused. The second one gets
    the stored fds back through ``LISTEN_FDS``, with one that no unit knows
    any more (``old/gone``): it takes the two sockets back, the very same ones,
    binds nothing, drops ``old/gone`` from the store, and its workers serve the
    waiting clients.
    """
    units = tmp_path / "units"
    units.mkdir()
    echo = ROOT / "contrib" / "workers" / "echo.py"
    (units / "web.yaml").write_text(RESTART_UNIT.format(python=PYTHON, echo=echo))
    env = {**ENV, "NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"}
    command = fdsupervisor_command("run", "--no-monitor", "--log-format", "json")
    command.append(str(units))

    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=tmp_path)
    try:
        messages = until_ready(notify_socket, first)
        stored = {m.text.split("FDNAME=")[1]: m.fds[0] for m in messages if m.fds}
        assert sorted(stored) == ["web/admin", "web/http"]
        assert any(m.text == "WATCHDOG=1" for m in [*messages, notify_socket.receive(2)])
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    socket_file = units / "run" / "admin.sock"
    assert socket_file.exists()  # systemd keeps the socket: its file stays (RemoveOnStop=no)

    http = socket.socket(fileno=os.dup(stored["web/http"]))
    port = http.getsockname()[1]
    http.close()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as tcp_client,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix_client,
        socket.create_server(("127.0.0.1", 0)) as gone,
    ):
        unix_client.settimeout(20)
        unix_client.connect(str(socket_file))
        tcp_client.sendall(b"over tcp\n")
        unix_client.sendall(b"over unix\n")
        passed = [("web/http", stored["web/http"]), ("old/gone", gone.fileno())]
        passed.append(("web/admin", stored["web/admin"]))
        env2 = {
            **env,
            "LISTEN_FDS": str(len(passed)),
            "LISTEN_FDNAMES": ":".join(name for name, _ in passed),
        }
        with open(tmp_path / "second.log", "w") as log:
            second = exec_as_systemd(
                [fd for _, fd in passed], command, env=env2, stdout=log, stderr=log, cwd=tmp_path
            )
        try:
            messages = until_ready(notify_socket, second)
            texts = [m.text for m in messages]
            assert "FDSTOREREMOVE=1\nFDNAME=old/gone" in texts
            again = {
                m.text.split("FDNAME=")[1]: m.fds[0]
                for m in messages
                if m.fds and "FDNAME=" in m.text  # not BARRIER=1's fd
            }
            for name in ("web/http", "web/admin"):  # the same sockets, not new ones
                before, after = os.fstat(stored[name]), os.fstat(again[name])
                assert (before.st_dev, before.st_ino) == (after.st_dev, after.st_ino)
            assert tcp_client.recv(100).endswith(b" over tcp\n")
            assert unix_client.recv(100).endswith(b" over unix\n")
            second.send_signal(signal.SIGTERM)
            assert second.wait(30) == 0
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
