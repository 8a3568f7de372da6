"""The notify socket with real sockets and real processes: credentials, fds, drops, files.

Every test waits for the datagram to arrive (poll with a deadline), never sleeps.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor import notify
from fdsupervisor.cgroups import cgroup2_mounts, cgroup_directory, own_cgroup
from fdsupervisor.errors import BindError
from fdsupervisor.notify import NOTIFY_BUFFER_MAX, Datagram, NotifySocket
from tests.conftest import PYTHON, open_fds

DEADLINE = 10.0


class RecordingLog:
    """A stand-in for the structlog logger: keeps (event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


@pytest.fixture
def log() -> RecordingLog:
    return RecordingLog()


@pytest.fixture
def notify_socket(tmp_path: Path, log: RecordingLog) -> Iterator[NotifySocket]:
    sock = NotifySocket.bind(tmp_path / "notify.sock", log=log)
    yield sock
    sock.close()


@pytest.fixture
def sender() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        yield sock


def wait_readable(sock: NotifySocket) -> None:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    assert poller.poll(DEADLINE * 1000), "no datagram arrived"


def receive_one(sock: NotifySocket) -> Datagram:
    wait_readable(sock)
    datagrams = sock.receive()
    assert len(datagrams) == 1
    return datagrams[0]


def receive_nothing(sock: NotifySocket) -> None:
    wait_readable(sock)
    assert sock.receive() == []
    assert sock.receive() == []  # and the socket is empty again


def raw_address(sock: NotifySocket) -> bytes:
    if sock.address.startswith("@"):
        return b"\0" + sock.address[1:].encode()
    return os.fsencode(sock.address)


def send(sender: socket.socket, sock: NotifySocket, data: bytes, fds: list[int] = []) -> None:  # noqa: B006
    # socket.send_fds() with SCM_RIGHTS, to an address (send_fds() takes none before 3.12)
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sender.sendmsg([data], ancillary, 0, raw_address(sock))


def run_child(sock: NotifySocket, code: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    child = subprocess.run(
        [PYTHON, "-c", code],
        env=dict(os.environ, NOTIFY_SOCKET=sock.address),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
        **kwargs,
    )
    assert child.returncode == 0, child.stderr
    return child


def identity(fd: int) -> tuple[int, int]:
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


# -- what workers send arrives, with who sent it ---------------------------------------

SD_NOTIFY_READY = """
import os, systemd.daemon
assert systemd.daemon.notify("READY=1\\nSTATUS=hi", {pid})
"""


@pytest.mark.parametrize("pid", ["pid=os.getpid()", "pid=0"])
def test_sd_notify_from_a_child_arrives_with_its_pid(notify_socket: NotifySocket, pid: str) -> None:
    child = subprocess.Popen(
        [PYTHON, "-c", SD_NOTIFY_READY.format(pid=pid)],
        env=dict(os.environ, NOTIFY_SOCKET=notify_socket.address),
    )
    try:
        datagram = receive_one(notify_socket)
    finally:
        assert child.wait(DEADLINE) == 0
    assert (datagram.pid, datagram.uid, datagram.gid) == (child.pid, os.getuid(), os.getgid())
    assert datagram.message.ready
    assert datagram.message.status == "hi"
    assert datagram.message.problems == ()
    assert datagram.fds == []


def own_cgroup_id() -> int:
    """The cgroup v2 id of this process's cgroup: its directory's inode."""
    mounts = cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
    path = own_cgroup(Path("/proc/self/cgroup").read_text())
    directory = cgroup_directory([replace(m, read_only=False) for m in mounts], path or "")
    if directory is None:
        pytest.skip("no cgroup2 hierarchy shows this process")
    return os.stat(directory).st_ino


def pidfds_passed(sock: NotifySocket) -> bool:
    return bool(sock._sock.getsockopt(socket.SOL_SOCKET, notify.SO_PASSPIDFD))


def test_a_sender_reaped_before_its_datagram_is_read_is_known_gone_with_its_cgroup(
    notify_socket: NotifySocket,
) -> None:
    """The pidfd the kernel hands with the datagram names the sender, even reaped (6.16)."""
    if not pidfds_passed(notify_socket):
        pytest.skip("the kernel has no SO_PASSPIDFD (Linux 6.5)")
    run_child(notify_socket, SD_NOTIFY_READY.format(pid="pid=os.getpid()"))  # exited, reaped
    datagram = receive_one(notify_socket)
    assert datagram.message.ready
    sender = datagram.sender
    assert sender.pinned and not sender.running and sender.group is None, sender
    if sender.cgroup_id is None:
        pytest.skip("the kernel keeps no cgroup of a reaped process (PIDFD_INFO_EXIT, 6.15)")
    assert sender.cgroup_id == own_cgroup_id()


def test_a_running_sender_comes_with_its_group_and_cgroup(
    notify_socket: NotifySocket, sender: socket.socket
) -> None:
    if not pidfds_passed(notify_socket):
        pytest.skip("the kernel has no SO_PASSPIDFD (Linux 6.5)")
    send(sender, notify_socket, b"STATUS=alive")
    datagram = receive_one(notify_socket)
    assert datagram.sender.pinned and datagram.sender.running
    assert datagram.sender.group == os.getpgid(0)
    assert datagram.sender.cgroup_id in (None, own_cgroup_id())


def test_no_pidfd_outlives_its_datagram(notify_socket: NotifySocket, sender: socket.socket) -> None:
    before = open_fds()
    for round_ in range(250):  # 2,000 datagrams, 8 at a time (the queue holds 10)
        for n in range(8):
            send(sender, notify_socket, f"STATUS={round_}.{n}".encode())
        received = 0
        while received < 8:
            wait_readable(notify_socket)
            received += len(notify_socket.receive())
    assert open_fds() == before


def test_without_a_pidfd_the_sender_is_its_pid_alone(notify_socket: NotifySocket) -> None:
    """A kernel without SO_PASSPIDFD: the credentials, as before."""
    notify_socket._sock.setsockopt(socket.SOL_SOCKET, notify.SO_PASSPIDFD, 0)
    run_child(notify_socket, SD_NOTIFY_READY.format(pid="pid=os.getpid()"))
    datagram = receive_one(notify_socket)
    assert datagram.sender == notify.Sender(datagram.pid)


def test_abstract_socket(log: RecordingLog) -> None:
    name = f"fdsupervisor-test-{uuid.uuid4().hex}"
    with NotifySocket.bind_abstract(name, log=log) as notify_socket:
        assert notify_socket.address == "@" + name
        assert notify_socket.path is None
        child = subprocess.Popen(
            [PYTHON, "-c", SD_NOTIFY_READY.format(pid="pid=os.getpid()")],
            env=dict(os.environ, NOTIFY_SOCKET=notify_socket.address),
        )
        try:
            datagram = receive_one(notify_socket)
        finally:
            assert child.wait(DEADLINE) == 0
        assert datagram.pid == child.pid
        assert datagram.message.ready
        # the name is taken while the socket lives ...
        with pytest.raises(BindError, match="cannot bind @"):
            NotifySocket.bind_abstract(name)
    # ... and free again once it is closed
    NotifySocket.bind_abstract(name).close()


def test_several_datagrams_in_order(notify_socket: NotifySocket, sender: socket.socket) -> None:
    for text in (b"STATUS=one", b"STATUS=two", b"READY=1"):
        send(sender, notify_socket, text)
    wait_readable(notify_socket)
    datagrams = notify_socket.receive()
    assert [d.message.status for d in datagrams] == ["one", "two", None]
    assert datagrams[2].message.ready
    assert {d.pid for d in datagrams} == {os.getpid()}


def test_receive_reads_at_most_max_datagrams(
    notify_socket: NotifySocket, sender: socket.socket
) -> None:
    for n in range(5):
        send(sender, notify_socket, f"STATUS={n}".encode())
    wait_readable(notify_socket)
    batches = [notify_socket.receive(max_datagrams=2) for _ in range(4)]
    assert [[d.message.status for d in batch] for batch in batches] == [
        ["0", "1"],
        ["2", "3"],
        ["4"],
        [],
    ]


def test_receive_on_an_empty_socket(notify_socket: NotifySocket) -> None:
    assert notify_socket.receive() == []


def test_largest_datagram_is_accepted(notify_socket: NotifySocket, sender: socket.socket) -> None:
    data = b"STATUS=" + b"x" * (NOTIFY_BUFFER_MAX - len(b"STATUS="))
    assert len(data) == NOTIFY_BUFFER_MAX
    send(sender, notify_socket, data)
    assert receive_one(notify_socket).message.status == "x" * (NOTIFY_BUFFER_MAX - 7)


# -- fds ---------------------------------------------------------------------------


def test_fd_store_fds_arrive_and_are_real(
    notify_socket: NotifySocket, sender: socket.socket, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe()
    with open(tmp_path / "data", "wb") as file:
        originals = [file.fileno(), read_end]
        send(sender, notify_socket, b"FDSTORE=1\nFDNAME=keep", originals)
        datagram = receive_one(notify_socket)
        try:
            assert datagram.message.fd_store
            assert datagram.message.fd_name == "keep"
            assert len(datagram.fds) == 2
            assert set(datagram.fds).isdisjoint(originals)
            assert [identity(fd) for fd in datagram.fds] == [identity(fd) for fd in originals]
            assert not any(os.get_inheritable(fd) for fd in datagram.fds)  # MSG_CMSG_CLOEXEC
            os.write(write_end, b"through the stored fd")
            assert os.read(datagram.fds[1], 100) == b"through the stored fd"
        finally:
            datagram.close_fds()
        assert datagram.fds == []
    os.close(read_end)
    os.close(write_end)


def test_fd_store_from_sd_notify_in_a_child(notify_socket: NotifySocket, tmp_path: Path) -> None:
    with open(tmp_path / "state", "wb") as file:
        code = (
            "import systemd.daemon\n"
            f"assert systemd.daemon.notify('FDSTORE=1\\nFDNAME=state', fds=[{file.fileno()}])\n"
        )
        child = run_child(notify_socket, code, pass_fds=[file.fileno()])
        del child
        datagram = receive_one(notify_socket)
        try:
            assert datagram.message.fd_name == "state"
            assert [identity(fd) for fd in datagram.fds] == [identity(file.fileno())]
        finally:
            datagram.close_fds()


def test_fds_without_fd_store_are_closed(
    notify_socket: NotifySocket, sender: socket.socket, log: RecordingLog
) -> None:
    read_end, write_end = os.pipe()
    baseline = open_fds()
    send(sender, notify_socket, b"READY=1\nFDNAME=x", [read_end, write_end, read_end])
    datagram = receive_one(notify_socket)
    assert datagram.message.ready
    assert datagram.fds == []
    assert open_fds() == baseline
    assert log.events == [
        ("notify_fds_closed", {"pid": os.getpid(), "count": 3, "reason": "sent without FDSTORE=1"})
    ]
    # the copies are gone: closing our write end is the last one, the read end sees EOF
    os.close(write_end)
    assert os.read(read_end, 1) == b""
    os.close(read_end)


def test_fd_store_remove_brings_no_fds(notify_socket: NotifySocket, sender: socket.socket) -> None:
    read_end, write_end = os.pipe()
    baseline = open_fds()
    send(sender, notify_socket, b"FDSTORE=1\nFDSTOREREMOVE=1\nFDNAME=x", [read_end])
    datagram = receive_one(notify_socket)
    assert datagram.message.fd_store_remove
    assert datagram.fds == []
    assert open_fds() == baseline
    os.close(read_end)
    os.close(write_end)


def test_barrier_fd_is_closed(notify_socket: NotifySocket, sender: socket.socket) -> None:
    # sd_notify_barrier(): send the write end of a pipe, wait for EOF on the read end
    read_end, write_end = os.pipe()
    send(sender, notify_socket, b"BARRIER=1", [write_end])
    os.close(write_end)
    datagram = receive_one(notify_socket)
    assert datagram.message.barrier
    assert datagram.fds == []
    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    assert poller.poll(DEADLINE * 1000)
    assert os.read(read_end, 1) == b""
    os.close(read_end)


# -- what is dropped, and that nothing leaks -------------------------------------------


def test_oversize_datagram_is_dropped_with_its_fds(
    notify_socket: NotifySocket, sender: socket.socket, log: RecordingLog
) -> None:
    read_end, write_end = os.pipe()
    baseline = open_fds()
    send(sender, notify_socket, b"FDSTORE=1\nSTATUS=" + b"x" * NOTIFY_BUFFER_MAX, [read_end])
    receive_nothing(notify_socket)
    assert open_fds() == baseline
    assert log.events == [
        (
            "notify_datagram_dropped",
            {"reason": "message longer than 4096 bytes", "pid": os.getpid(), "fds_closed": 1},
        )
    ]
    # one byte over the limit is enough, and the socket keeps working after it
    send(sender, notify_socket, b"S" * (NOTIFY_BUFFER_MAX + 1))
    send(sender, notify_socket, b"READY=1")
    wait_readable(notify_socket)
    assert [d.message.ready for d in notify_socket.receive()] == [True]
    os.close(read_end)
    os.close(write_end)


def test_truncated_control_data_is_dropped_without_leaks(
    notify_socket: NotifySocket,
    sender: socket.socket,
    log: RecordingLog,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # room for the credentials and two fds: the kernel installs two of six
    itemsize = array.array("i").itemsize
    monkeypatch.setattr(
        notify,
        "_ANCILLARY_SIZE",
        socket.CMSG_SPACE(notify._UCRED.size) + socket.CMSG_SPACE(2 * itemsize),
    )
    read_end, write_end = os.pipe()
    baseline = open_fds()
    send(sender, notify_socket, b"FDSTORE=1", [read_end] * 6)
    receive_nothing(notify_socket)
    assert open_fds() == baseline
    [(event, fields)] = log.events
    assert event == "notify_datagram_dropped"
    assert fields["reason"] == "truncated control data (too many fds sent?)"
    assert fields["fds_closed"] == 2
    os.close(read_end)
    os.close(write_end)


def test_datagram_without_credentials_is_dropped(
    notify_socket: NotifySocket, sender: socket.socket, log: RecordingLog
) -> None:
    # With SO_PASSCRED off on both ends the kernel attaches no SCM_CREDENTIALS.
    with socket.socket(fileno=os.dup(notify_socket.fileno())) as same_socket:
        same_socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
    read_end, write_end = os.pipe()
    baseline = open_fds()
    send(sender, notify_socket, b"FDSTORE=1", [read_end, write_end])
    receive_nothing(notify_socket)
    assert open_fds() == baseline
    assert log.events == [
        (
            "notify_datagram_dropped",
            {"reason": "no valid sender credentials", "pid": None, "fds_closed": 2},
        )
    ]
    os.close(read_end)
    os.close(write_end)


def test_receive_error_closes_what_it_had_read(
    notify_socket: NotifySocket, sender: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_end, write_end = os.pipe()
    baseline = open_fds()
    send(sender, notify_socket, b"FDSTORE=1", [read_end])
    send(sender, notify_socket, b"FDSTORE=1", [write_end])
    wait_readable(notify_socket)
    real_parse = notify.parse_notify
    calls = []

    def parse_then_fail(data: bytes) -> notify.NotifyMessage:
        calls.append(data)
        if len(calls) == 2:
            raise MemoryError
        return real_parse(data)

    monkeypatch.setattr(notify, "parse_notify", parse_then_fail)
    with pytest.raises(MemoryError):
        notify_socket.receive()
    assert open_fds() == baseline
    os.close(read_end)
    os.close(write_end)


# -- the socket itself -----------------------------------------------------------------


def test_socket_is_nonblocking_cloexec_dgram_with_passcred(notify_socket: NotifySocket) -> None:
    fd = notify_socket.fileno()
    assert not os.get_inheritable(fd)
    assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    with socket.socket(fileno=os.dup(fd)) as same_socket:
        assert same_socket.type == socket.SOCK_DGRAM
        assert same_socket.family == socket.AF_UNIX
        assert same_socket.getsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED) == 1


def test_socket_file(notify_socket: NotifySocket, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    assert notify_socket.address == str(path)
    assert notify_socket.path == path
    status = os.lstat(path)
    assert stat.S_ISSOCK(status.st_mode)
    assert stat.S_IMODE(status.st_mode) == 0o666


def test_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with NotifySocket.bind(Path("relative.sock")) as notify_socket:
        assert notify_socket.address == str(tmp_path / "relative.sock")


def test_mode_may_be_chosen(tmp_path: Path) -> None:
    with NotifySocket.bind(tmp_path / "n.sock", mode=0o600):
        assert stat.S_IMODE(os.lstat(tmp_path / "n.sock").st_mode) == 0o600


def test_close_removes_the_file_and_may_be_repeated(tmp_path: Path) -> None:
    baseline = open_fds()
    notify_socket = NotifySocket.bind(tmp_path / "n.sock")
    notify_socket.close()
    assert not (tmp_path / "n.sock").exists()
    assert notify_socket.fileno() == -1
    notify_socket.close()
    assert open_fds() == baseline


def test_close_leaves_a_file_someone_else_put_there(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    notify_socket = NotifySocket.bind(path)
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as other:
        other.bind(str(path))
        notify_socket.close()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_bind_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as gone:
        gone.bind(str(path))
    assert path.exists()
    with (
        NotifySocket.bind(path) as notify_socket,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender,
    ):
        send(sender, notify_socket, b"READY=1")
        assert receive_one(notify_socket).message.ready


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_bind_refuses_a_live_socket(tmp_path: Path, kind: int) -> None:
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, kind) as live:
        live.bind(str(path))
        if kind == socket.SOCK_STREAM:
            live.listen()
        baseline = open_fds()
        with pytest.raises(BindError, match="in use"):
            NotifySocket.bind(path)
        assert open_fds() == baseline
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_bind_refuses_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    path.write_text("precious")
    baseline = open_fds()
    with pytest.raises(BindError, match="not a socket; it is left alone"):
        NotifySocket.bind(path)
    assert path.read_text() == "precious"
    assert open_fds() == baseline


def test_bind_in_a_missing_directory(tmp_path: Path) -> None:
    baseline = open_fds()
    with pytest.raises(BindError, match="cannot bind"):
        NotifySocket.bind(tmp_path / "missing" / "n.sock")
    assert open_fds() == baseline


def test_bind_path_too_long(tmp_path: Path) -> None:
    baseline = open_fds()
    with pytest.raises(BindError):
        NotifySocket.bind(tmp_path / ("x" * 120))
    assert open_fds() == baseline


@pytest.mark.parametrize("name", ["", "a\0b"])
def test_bind_abstract_refuses_bad_names(name: str) -> None:
    with pytest.raises(BindError, match="invalid abstract socket name"):
        NotifySocket.bind_abstract(name)


# -- the supervisor's own notify socket: a name nobody can guess, adopted after an upgrade --


def test_bind_unpredictable_draws_128_random_bits(log: RecordingLog) -> None:
    prefix = f"fdsupervisor-test-{os.getpid()}/"
    with (
        NotifySocket.bind_unpredictable(prefix, log=log) as first,
        NotifySocket.bind_unpredictable(prefix) as second,
    ):
        for sock in (first, second):
            assert sock.address.startswith("@" + prefix)
            random_part = sock.address.removeprefix("@" + prefix)
            assert len(random_part) == notify.NOTIFY_NAME_BITS // 4
            int(random_part, 16)
        assert first.address != second.address
        run_child(first, SD_NOTIFY_READY.format(pid="pid=os.getpid()"))
        assert receive_one(first).message.ready


def test_bind_unpredictable_draws_again_when_a_name_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = f"fdsupervisor-test-{uuid.uuid4().hex}/"
    drawn = iter(["taken", "taken", "free"])
    monkeypatch.setattr(notify.secrets, "token_hex", lambda nbytes: next(drawn))
    with NotifySocket.bind_abstract(prefix + "taken"):
        with NotifySocket.bind_unpredictable(prefix) as sock:
            assert sock.address == "@" + prefix + "free"
        baseline = open_fds()
        monkeypatch.setattr(notify.secrets, "token_hex", lambda nbytes: "taken")
        with pytest.raises(BindError, match="no free abstract name in 3 random tries"):
            NotifySocket.bind_unpredictable(prefix, attempts=3)
        assert open_fds() == baseline


def test_adopt_takes_over_the_same_socket(log: RecordingLog, sender: socket.socket) -> None:
    with NotifySocket.bind_unpredictable("fdsupervisor-test/", log=log) as original:
        fd = os.dup(original.fileno())  # as the exec leaves it: inheritable, blocking
        os.set_blocking(fd, True)
        adopted = NotifySocket.adopt(fd, log=log)
        with adopted:
            assert adopted.address == original.address and adopted.path is None
            assert adopted.fileno() == fd
            assert not os.get_inheritable(fd)
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
            send(sender, adopted, b"STATUS=still here")
            assert receive_one(adopted).message.status == "still here"


@pytest.mark.parametrize("kind", ["stream", "path", "unbound", "pipe", "closed"])
def test_adopt_refuses_anything_else_and_closes_it(tmp_path: Path, kind: str) -> None:
    baseline = open_fds()
    if kind == "stream":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(f"\0fdsupervisor-test-{uuid.uuid4().hex}")
        fd = sock.detach()
    elif kind == "path":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(tmp_path / "n.sock"))
        fd = sock.detach()
    elif kind == "unbound":
        fd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach()
    elif kind == "pipe":
        fd, write_end = os.pipe()
        os.close(write_end)
    else:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)
    with pytest.raises(BindError, match=f"cannot adopt fd {fd}|fd {fd} is not a bound abstract"):
        NotifySocket.adopt(fd)
    assert open_fds() == baseline
