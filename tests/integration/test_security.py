"""The security model under test: who may talk, what leaks, what a unit may touch, limits, EMFILE.

What test_monitor.py and test_binding.py already cover is not repeated here
(the 65th client's message, a full store's message, symlinks refused by
bind_socket itself). This file covers the rest of docs/security.md: a refused
client's command and fds, an uid let in by --monitor-allow-uid, the monitor's
modes whatever the umask, symlinks as the
supervisor meets them at start-up and at reload, fds handed in never reaching
a worker or another client, the exact limits, and running out of fds.

Out of fds, four bugs showed up here and were fixed in src/ meanwhile: a
busy loop on a monitor connection waiting in the backlog, a crash on
``fd-retrieve``, a service failed for good by one start that met EMFILE, and
0755/0777 parents of the monitor socket; their tests stay as regression tests.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import resource
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

from tests.conftest import PYTHON, REPORT_WORKER, SupervisorProcess, open_fds, report_from
from tests.monitor_client import RawClient

WEB = f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, {REPORT_WORKER}]
      restart: always
      restart-delay: 0
    """

# One instance per connection, the connection as stdin and stdout: cat echoes
# and exits at EOF, so the worker lives exactly as long as the test's connection.
ACCEPT_CAT = """
    sockets:
      conn: {listen: "127.0.0.1:0"}
    service:
      exec: [/bin/cat]
      accept: true
      inetd: true
    """

LAZY = f"""
    sockets:
      lazy: {{listen: "unix:lazy.sock"}}
    service:
      exec: [{PYTHON}, {REPORT_WORKER}]
      activation: on-demand
    """

MIB = 1 << 20
SCM_MAX_FD = 253  # include/net/scm.h


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def settle(probe: RawClient) -> None:
    """Two round trips: whatever the supervisor had to read before the first is done."""
    probe.command("query-version")
    probe.command("query-version")


def fd_targets(pid: int) -> dict[int, str]:
    """Every fd of ``pid`` and what it is (``socket:[INODE]``, ``pipe:[INODE]``, a path)."""
    result = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            result[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
    return result


def kernel_name(fd: int) -> str:
    """What /proc shows for our ``fd``, the same in any process that holds it."""
    return os.readlink(f"/proc/self/fd/{fd}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def is_closed_by_peer(sock: socket.socket, timeout: float = 10.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def is_open_at_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True


def end_orphans(sup: SupervisorProcess, cwd: Path) -> None:
    """If the supervisor died, end the workers it left behind (ours only, by pidfd)."""
    for event in list(sup.events):
        if event.get("event") != "worker_started":
            continue
        try:
            pidfd = os.pidfd_open(event["pid"])
        except ProcessLookupError:
            continue
        try:
            # checked after pidfd_open: the pidfd is that very process, never a reused pid
            if Path(f"/proc/{event['pid']}/cwd").resolve() == cwd.resolve():
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
        finally:
            os.close(pidfd)


# -- who may use the monitor ----------------------------------------------------------------

AS_NOBODY = """
import array, json, os, socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
sock.connect(sys.argv[1])
read_end, write_end = os.pipe()
send_error = None
try:
    sock.sendmsg(
        [b'{"execute": "qmp_capabilities"}{"execute": "getfd", "arguments": {"fdname": "x"}}'],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [read_end]))],
    )
except OSError as exc:
    send_error = exc.errno
received, fds = b"", 0
while True:
    try:
        data, ancillary, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(64))
    except ConnectionResetError:
        break
    fds += len(ancillary)
    if not data:
        break
    received += data
print(json.dumps({"received": received.decode("latin-1"), "fds": fds, "send_error": send_error}))
"""

GREETING_AS_NOBODY = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(10)
sock.connect(sys.argv[1])
print(sock.recv(4096).decode("latin-1"))
"""


def as_nobody(script: str, path: Path) -> str:
    result = subprocess.run(
        ["/usr/bin/python3", "-c", script, str(path)],
        user="nobody",
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(
    os.getuid() != 0 or not os.path.exists("/usr/bin/python3"),
    reason="needs root (to run a client as nobody) and /usr/bin/python3",
)
def test_another_uid_is_refused_learns_nothing_and_is_logged(supervisor, tmp_path: Path) -> None:
    """SPEC 5: only root and the supervisor's uid get in, others by --monitor-allow-uid only."""
    nobody = pwd.getpwnam("nobody").pw_uid
    directory = Path(tempfile.mkdtemp(prefix="fdsup-sec-"))
    try:
        directory.chmod(0o755)
        path, allowed = directory / "monitor.sock", directory / "allowed.sock"
        units = str(tmp_path / "units")
        sup = supervisor({"web": WEB}, args=["--monitor", str(path), units])
        supervisor(args=["--monitor", str(allowed), "--monitor-allow-uid", str(nobody), units])
        path.chmod(0o666)  # only SO_PEERCRED stands in the way now
        allowed.chmod(0o666)
        assert '"QMP"' in as_nobody(GREETING_AS_NOBODY, allowed)
        with RawClient(path).negotiate() as probe:
            settle(probe)
            baseline = open_fds(sup.pid)
            seen = json.loads(as_nobody(AS_NOBODY, path))
            assert seen["received"] == "" and seen["fds"] == 0, seen  # no greeting, no reply
            refused = sup.wait_for("monitor_client_refused", uid=nobody)
            assert refused["level"] == "warning"
            settle(probe)
            assert open_fds(sup.pid) == baseline, "the refused connection left an fd behind"
            stored = probe.command("query-fds")["return"]
            assert [f for f in stored if f["owner"] == "monitor"] == []
    finally:
        for item in directory.iterdir():
            item.unlink()
        directory.rmdir()


def test_monitor_modes_do_not_depend_on_the_umask(supervisor, tmp_path: Path) -> None:
    """SPEC 5: created 0600 in a 0700 directory, even under the most permissive umask."""
    path = tmp_path / "fresh" / "deeper" / "monitor.sock"
    old_umask = os.umask(0)  # the child inherits it: the most permissive umask there is
    try:
        supervisor({"web": WEB}, args=["--monitor", str(path), str(tmp_path / "units")])
    finally:
        os.umask(old_umask)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    # every directory it had to create, not only the last (Path.mkdir(parents=True) would
    # give the others 0o777 & ~umask: here world-writable)
    assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(path.parent.parent.stat().st_mode & 0o777) == "0o700"


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "regular file", "live socket"])
def test_the_monitor_path_is_never_followed_or_replaced(
    supervisor, tmp_path: Path, kind: str
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious"
    precious.write_text("keep me")
    path = tmp_path / "monitor.sock"
    live = socket.socket(socket.AF_UNIX)
    if kind == "symlink":
        path.symlink_to(precious)
    elif kind == "dangling symlink":
        path.symlink_to(outside / "missing.sock")
    elif kind == "regular file":
        path.write_text("keep me too")
    else:
        live.bind(str(path))
        live.listen()
    units = tmp_path / "units"
    units.mkdir()
    (units / "side.yaml").write_text(textwrap.dedent(LAZY))
    try:
        sup = supervisor(args=["--monitor", str(path), str(units)], wait_ready=False)
        assert sup.proc.wait(30) == 1
        failed = sup.wait_for("startup_failed")
        if kind == "live socket":
            assert "is in use by a listening socket" in failed["error"]
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(path))  # still the test's own listener
        else:
            assert ", not a socket; it is left alone" in failed["error"]
    finally:
        live.close()
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    if kind == "regular file":
        assert path.read_text() == "keep me too"
    elif kind != "live socket":
        assert path.is_symlink()
    assert not (units / "lazy.sock").exists(), "a unit socket bound before the failure stayed"


# -- what a unit file can make the supervisor do to the file system ------------------------


def unix_unit(path: str) -> str:
    return f"""
        sockets:
          s: {{listen: "unix:{path}"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
        """


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "regular file"])
def test_a_unit_cannot_bind_over_a_symlink_or_a_file(supervisor, tmp_path: Path, kind: str) -> None:
    """Start-up: exit 1 with a clear message, the path and its target untouched, nothing bound."""
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious"
    precious.write_text("keep me")
    units = tmp_path / "units"
    units.mkdir()
    path = units / "web.sock"
    if kind == "symlink":
        path.symlink_to(precious)
    elif kind == "dangling symlink":
        path.symlink_to(outside / "created-by-nobody.sock")
    else:
        path.write_text("keep me too")
    # "side" sorts first: bound, then closed again when "web" fails
    (units / "side.yaml").write_text(textwrap.dedent(unix_unit("side.sock")))
    (units / "web.yaml").write_text(textwrap.dedent(unix_unit("web.sock")))
    sup = supervisor(wait_ready=False)
    assert sup.proc.wait(30) == 1
    error = sup.wait_for("startup_failed")["error"]
    described = "a regular file" if kind == "regular file" else "a symbolic link"
    assert f"socket s: cannot bind unix:{path}: {path} exists and is {described}" in error
    assert "it is left alone: remove it or choose another path" in error
    assert precious.read_text() == "keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["precious"]
    if kind == "regular file":
        assert path.read_text() == "keep me too"
    else:
        assert path.is_symlink()
    assert not (units / "side.sock").exists(), "nothing stays bound after a failed start"
    assert sup.count("worker_started") == 0


def test_a_reload_cannot_bind_over_a_symlink(supervisor, tmp_path: Path) -> None:
    sup = supervisor({"side": unix_unit("side.sock")})
    pid = sup.wait_for("worker_started")["pid"]
    units = tmp_path / "units"
    precious = tmp_path / "precious"
    precious.write_text("keep me")
    (units / "web.sock").symlink_to(precious)
    (units / "web.yaml").write_text(textwrap.dedent(unix_unit("web.sock")))
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGHUP)
    failed = sup.wait_for("reload_failed", after=mark)
    assert "is a symbolic link, not a socket; it is left alone" in failed["error"]
    assert precious.read_text() == "keep me" and (units / "web.sock").is_symlink()
    with RawClient(sup.monitor_path).negotiate() as client:
        services = client.command("query-services")["return"]
    assert [(s["unit"], s["pids"]) for s in services] == [("side", [pid])], "nothing changed"


def test_a_symlinked_directory_is_followed_as_systemd_does(supervisor, tmp_path: Path) -> None:
    """The directory part is the unit author's to choose, symlinks included (systemd
    follows them too); only the final component is never followed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o750)
    elsewhere.chmod(0o750)
    units = tmp_path / "units"
    units.mkdir()
    (units / "link").symlink_to(elsewhere, target_is_directory=True)
    sup = supervisor({"web": unix_unit("link/web.sock")})
    sup.wait_for("worker_started")
    real = elsewhere / "web.sock"
    assert real.is_socket() and not real.is_symlink()
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(units / "link" / "web.sock"))
        assert b'"pid"' in client.recv(65536)
    assert oct(elsewhere.stat().st_mode & 0o777) == "0o750", "an existing directory is left as is"
    assert sup.stop() == 0
    assert not real.exists(), "the socket file it created is removed at stop"
    assert (units / "link").is_symlink() and elsewhere.is_dir()


# -- fds handed in never reach a worker or another client ----------------------------------


def test_monitor_fds_reach_no_worker_and_no_other_client(supervisor) -> None:
    sup = supervisor({"web": WEB, "acc": ACCEPT_CAT, "lazy": LAZY})
    sup.wait_for("worker_started", unit="web")
    acc_port = sup.port("conn")
    stored_sock, stored_peer = socket.socketpair()
    stored_pipe_read, stored_pipe_write = os.pipe()
    held_sock, held_peer = socket.socketpair()  # sent, never claimed by a getfd
    extra = listening()
    names = {
        "stored socket": kernel_name(stored_sock.fileno()),
        "stored pipe": kernel_name(stored_pipe_read),
        "held": kernel_name(held_sock.fileno()),
        "extra": kernel_name(extra.fileno()),
    }
    with (
        RawClient(sup.monitor_path).negotiate() as owner,
        RawClient(sup.monitor_path).negotiate() as bystander,
    ):
        assert owner.command("getfd", fds=[stored_sock.fileno()], fdname="secret") == {"return": {}}
        assert owner.command("getfd", fds=[stored_pipe_read], fdname="pipe") == {"return": {}}
        assert owner.command("getfd", fds=[extra.fileno()], fdname="extra") == {"return": {}}
        owner.send(b" ", [held_sock.fileno()])
        for mine in (stored_sock, held_sock, extra):
            mine.close()
        os.close(stored_pipe_read)

        def new_workers(expect_extra_in_web: bool) -> None:
            mark = sup.mark()
            assert owner.command("service-restart", unit="web") == {"return": {}}
            assert owner.command("service-restart", unit="lazy") == {"return": {}}
            web = sup.wait_for("worker_started", unit="web", after=mark)["pid"]
            lazy = sup.wait_for("worker_started", unit="lazy", after=mark)["pid"]
            with socket.create_connection(("127.0.0.1", acc_port), timeout=10) as conn:
                acc = sup.wait_for("worker_started", unit="acc", after=mark)["pid"]
                seen = {pid: set(fd_targets(pid).values()) for pid in (web, lazy, acc)}
                conn.sendall(b"still the connection\n")
                assert conn.recv(100) == b"still the connection\n"
            for label, name in names.items():
                for pid, targets in seen.items():
                    wanted = label == "extra" and pid == web and expect_extra_in_web
                    assert (name in targets) == wanted, (label, pid, sorted(targets))
            report = report_from("127.0.0.1", sup.port("http"))
            assert report["pid"] == web
            assert report["open_fds"] == ([0, 1, 2, 3, 4] if expect_extra_in_web else [0, 1, 2, 3])

        new_workers(expect_extra_in_web=False)
        extra_id = {"type": "fd", "str": "extra"}
        assert owner.command("socket-add", id="extra", unit="web", addr=extra_id) == {"return": {}}
        new_workers(expect_extra_in_web=True)
        # the owner asked for one fd back, and gets it; the bystander never gets any
        assert owner.command("fd-retrieve", fdname="secret") == {"return": {}}
        assert len(owner.fds) == 1 and kernel_name(owner.fds[0]) == names["stored socket"]
        settle(bystander)
        assert bystander.fds == [], "SCM_RIGHTS data reached a client that did not ask"
        os.close(owner.fds.pop())
    assert is_closed_by_peer(held_peer), "the unclaimed batch is closed with its client"
    assert is_open_at_peer(stored_peer), "a stored fd outlives the client that stored it"
    for item in (stored_peer, held_peer):
        item.close()
    os.close(stored_pipe_write)


# -- limits ---------------------------------------------------------------------------------


def message_of(size: int) -> bytes:
    head, tail = b'{"execute": "query-version", "id": "', b'"}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def test_a_message_may_be_exactly_1_mib_and_not_one_byte_more(supervisor) -> None:
    sup = supervisor({"web": WEB})
    with RawClient(sup.monitor_path).negotiate() as client:
        client.send(message_of(MIB))
        reply = client.reply()
        assert reply["return"]["package"].startswith("fdsupervisor ")
        assert len(reply["id"]) == MIB - len(message_of(0))
        client.send(message_of(MIB + 1))
        assert client.reply() == {
            "error": {
                "class": "GenericError",
                "desc": f"JSON message size limit exceeded: a message may be at most {MIB} bytes",
            }
        }
        assert "return" in client.command("query-version"), "the connection lives on"


def test_253_fds_in_one_sendmsg_one_kept_by_getfd_the_rest_closed(supervisor) -> None:
    sup = supervisor({"web": WEB})
    pairs = [socket.socketpair() for _ in range(SCM_MAX_FD)]
    with RawClient(sup.monitor_path).negotiate() as client:
        settle(client)
        baseline = len(open_fds(sup.pid))
        client.send(b" ", [mine.fileno() for mine, _peer in pairs])
        for mine, _peer in pairs:
            mine.close()
        assert client.command("getfd", fdname="first") == {"return": {}}
        closed = [is_closed_by_peer(peer) for _mine, peer in pairs[1:]]
        assert all(closed), f"{closed.count(False)} of the other 252 fds are still open"
        assert is_open_at_peer(pairs[0][1]), "getfd keeps the first fd of the batch"
        settle(client)
        assert len(open_fds(sup.pid)) == baseline + 1
        # the kernel itself refuses a 254th fd in one message (SCM_MAX_FD)
        with pytest.raises(OSError) as too_many:
            client.send(b" ", [pairs[0][1].fileno()] * (SCM_MAX_FD + 1))
        assert too_many.value.errno == errno.EINVAL
        assert client.command("closefd", fdname="first") == {"return": {}}
        assert is_closed_by_peer(pairs[0][1])
        settle(client)
        assert len(open_fds(sup.pid)) == baseline
    for _mine, peer in pairs:
        peer.close()


def test_a_refused_store_closes_the_fd_and_closefd_frees_a_slot(supervisor, tmp_path: Path) -> None:
    sup = supervisor({"web": WEB}, args=["--max-stored-fds", "2", str(tmp_path / "units")])
    pairs = [socket.socketpair() for _ in range(4)]
    with RawClient(sup.monitor_path).negotiate() as client:
        settle(client)
        baseline = len(open_fds(sup.pid))
        for i in range(2):
            assert client.command("getfd", fds=[pairs[i][0].fileno()], fdname=f"f{i}") == {
                "return": {}
            }
        full = client.command("getfd", fds=[pairs[2][0].fileno()], fdname="f2")
        assert full["error"]["desc"] == "the fd store is full (2 fds); close some first"
        for mine, _peer in pairs[:3]:
            mine.close()
        assert is_closed_by_peer(pairs[2][1]), "the refused fd was closed, not kept"
        settle(client)
        assert len(open_fds(sup.pid)) == baseline + 2
        assert client.command("closefd", fdname="f0") == {"return": {}}
        assert is_closed_by_peer(pairs[0][1])
        assert client.command("getfd", fds=[pairs[3][0].fileno()], fdname="f3") == {"return": {}}
        assert is_open_at_peer(pairs[1][1]) and is_open_at_peer(pairs[3][1])
    for mine, peer in pairs:
        mine.close()
        peer.close()


def test_a_freed_client_slot_admits_the_next_client_and_no_fd_stays(supervisor) -> None:
    sup = supervisor({"web": WEB})
    with RawClient(sup.monitor_path).negotiate() as probe:
        settle(probe)
        baseline = len(open_fds(sup.pid))
    clients = [RawClient(sup.monitor_path) for _ in range(64)]
    try:
        refused = socket.socket(socket.AF_UNIX)
        refused.settimeout(10)
        refused.connect(str(sup.monitor_path))
        assert b"too many monitor clients (64)" in refused.recv(4096)
        refused.close()
        clients.pop().close()
        settle(clients[0].negotiate())  # the closed client's EOF was read: its slot is free
        clients.append(RawClient(sup.monitor_path))
        assert '"QMP"' in json.dumps(clients[-1].greeting)
        again = socket.socket(socket.AF_UNIX)
        again.settimeout(10)
        again.connect(str(sup.monitor_path))
        assert b"too many monitor clients (64)" in again.recv(4096), "the limit still holds"
        again.close()
    finally:
        # all but one first, then that one after it has seen the others go: a client
        # that connects in the same instant as others leave may find no slot yet
        for client in clients[1:]:
            client.close()
        settle(clients[0])  # negotiated or not, each command gets a reply: a round trip
        clients[0].close()
    with RawClient(sup.monitor_path).negotiate() as probe:
        settle(probe)
        assert len(open_fds(sup.pid)) == baseline


# -- out of fds (EMFILE) ------------------------------------------------------------------------

HEADROOM = 6


@contextmanager
def out_of_fds(sup: SupervisorProcess, client: RawClient) -> Iterator[list[str]]:
    """Lower the supervisor's RLIMIT_NOFILE and fill its fd table through getfd.

    Yields the names stored; the supervisor then has no free fd at all. The
    getfd that finds the table full is told so: the kernel could not install
    the fd in the receiver and dropped it (MSG_CTRUNC), and the supervisor says
    it lost an fd rather than "No file descriptor supplied".
    """
    settle(client)
    before = len(open_fds(sup.pid))
    limit = before + HEADROOM
    resource.prlimit(sup.pid, resource.RLIMIT_NOFILE, (limit, limit))
    spare = listening()
    names = []
    try:
        for i in range(HEADROOM + 1):
            reply = client.command("getfd", fds=[spare.fileno()], fdname=f"fill{i}")
            if "error" in reply:
                assert reply["error"]["desc"] == (
                    "A file descriptor was sent but could not be received: "
                    "the supervisor is out of file descriptors"
                )
                break
            names.append(f"fill{i}")
    finally:
        spare.close()
    assert len(names) == HEADROOM
    assert len(open_fds(sup.pid)) == limit
    yield names


def free_fds(client: RawClient, names: list[str]) -> None:
    for name in names:
        assert client.command("closefd", fdname=name) == {"return": {}}


def test_out_of_fds_the_supervisor_answers_errors_then_recovers(supervisor) -> None:
    sup = supervisor({"web": WEB})
    first = sup.wait_for("worker_started")["pid"]
    port = sup.port("http")
    with RawClient(sup.monitor_path).negotiate() as client:
        settle(client)
        baseline = len(open_fds(sup.pid))
        with out_of_fds(sup, client) as names:
            services = client.command("query-services")["return"]
            assert services[0]["state"] == "running" and services[0]["pids"] == [first]
            added = client.command(
                "socket-add", id="more", addr={"type": "inet", "host": "127.0.0.1", "port": "0"}
            )
            assert "Too many open files" in added["error"]["desc"]
            reloaded = client.command("reload")["error"]["desc"]
            assert reloaded.startswith("reload refused, nothing was changed")
            assert "Too many open files" in reloaded
            mark = sup.mark()
            os.kill(sup.pid, signal.SIGHUP)
            assert "Too many open files" in sup.wait_for("reload_failed", after=mark)["error"]
            # the running worker serves on: the supervisor is not on the data path
            assert report_from("127.0.0.1", port)["pid"] == first
            assert sup.proc.poll() is None
            free_fds(client, names)
        settle(client)
        assert len(open_fds(sup.pid)) == baseline
        with RawClient(sup.monitor_path).negotiate() as fresh:
            assert fresh.command("query-version")["return"]["package"].startswith("fdsupervisor")
        mark = sup.mark()
        os.kill(first, signal.SIGKILL)
        second = sup.wait_for("worker_started", after=mark)["pid"]
        assert report_from("127.0.0.1", port)["pid"] == second
        settle(client)
        assert len(open_fds(sup.pid)) == baseline


def test_fd_retrieve_out_of_fds_answers_an_error(supervisor, tmp_path: Path) -> None:
    """os.dup() fails with EMFILE: an error reply, never an exception out of the loop
    (which would end the supervisor and leave its workers unsupervised)."""
    sup = supervisor({"web": WEB})
    sup.wait_for("worker_started")
    try:
        with RawClient(sup.monitor_path).negotiate() as client, out_of_fds(sup, client) as names:
            try:
                reply: dict[str, Any] | None = client.command("fd-retrieve", fdname=names[0])
            except (EOFError, OSError):
                reply = None
            alive = sup.proc.poll() is None and reply is not None
            if alive:
                free_fds(client, names)
    finally:
        end_orphans(sup, tmp_path)
    if not alive:
        sup.stop()  # reaped, and every line it wrote is read
    assert alive, "the supervisor died:\n" + "\n".join(sup.output[-4:])
    assert reply is not None and "Too many open files" in reply["error"]["desc"]


def test_a_client_waiting_while_out_of_fds_costs_no_cpu(supervisor) -> None:
    """The accepted-later client waits in the backlog; the supervisor must not spin on it
    (epoll is level-triggered: the listening socket stays readable until accept succeeds)."""
    sup = supervisor({"web": WEB})
    sup.wait_for("worker_started")
    with RawClient(sup.monitor_path).negotiate() as client:
        with out_of_fds(sup, client) as names:
            waiting = socket.socket(socket.AF_UNIX)
            waiting.settimeout(10)
            waiting.connect(str(sup.monitor_path))  # completes: it waits in the backlog
            sup.wait_for("monitor_accept_failed")
            cpu, warnings = cpu_seconds(sup.pid), sup.count("monitor_accept_failed")
            time.sleep(1.0)  # a measuring window, not a synchronisation
            burnt = cpu_seconds(sup.pid) - cpu
            logged = sup.count("monitor_accept_failed") - warnings
            free_fds(client, names)
        greeting = waiting.recv(4096)
        waiting.close()
    assert b'"QMP"' in greeting, "the waiting client is served once fds are free"
    assert burnt < 0.2, f"{burnt:.2f} CPU-seconds in 1 s while one client waits"
    assert logged < 50, f"{logged} monitor_accept_failed warnings in 1 s"


def test_an_accept_unit_out_of_fds_lets_connections_wait_then_serves_them(supervisor) -> None:
    sup = supervisor({"web": WEB, "acc": ACCEPT_CAT})
    sup.wait_for("worker_started", unit="web")
    port = sup.port("conn")
    with RawClient(sup.monitor_path).negotiate() as client:
        with out_of_fds(sup, client) as names:
            # the kernel completes the handshake; the connection waits in the backlog
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            sup.wait_for("accept_failed", unit="acc")
            cpu = cpu_seconds(sup.pid)
            time.sleep(1.0)  # a measuring window, not a synchronisation
            burnt = cpu_seconds(sup.pid) - cpu
            assert sup.count("worker_started", unit="acc") == 0
            free_fds(client, names)
        with conn:
            conn.sendall(b"served at last\n")
            assert conn.recv(100) == b"served at last\n"
    assert burnt < 0.2, f"{burnt:.2f} CPU-seconds in 1 s while a connection waits"
    sup.wait_for("worker_exited", unit="acc")


def test_an_accept_unit_with_one_fd_free_holds_the_connection_until_its_worker_can_start(
    supervisor,
) -> None:
    """One free fd takes the connection, but its worker needs more (the /dev/null of its
    stderr, opened by the supervisor): the connection is held and its worker started
    once fds are free, not dropped."""
    sup = supervisor({"web": WEB, "acc": ACCEPT_CAT + "  stderr: null\n"})
    sup.wait_for("worker_started", unit="web")
    port = sup.port("conn")
    with RawClient(sup.monitor_path).negotiate() as client:
        with out_of_fds(sup, client) as names:
            free_fds(client, names[:1])  # room for accept(), none for the worker's stderr
            mark = sup.mark()
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            deferred = sup.wait_for("worker_start_deferred", unit="acc", after=mark)
            assert "Too many open files" in deferred["error"]
            free_fds(client, names[1:])
        with conn:
            conn.sendall(b"held, then served\n")
            assert conn.recv(100) == b"held, then served\n"
    sup.wait_for("worker_exited", unit="acc")


# The new worker's start needs fds of the supervisor's own (its cgroup's
# directory and cgroup.events), and reaping the old worker frees none.
TWO_SOCKETS = f"""
    sockets:
      http: {{listen: "127.0.0.1:0"}}
      second: {{listen: "127.0.0.1:0"}}
    service:
      exec: [{PYTHON}, {REPORT_WORKER}]
      restart: always
      restart-delay: 100ms
    """


def test_a_restart_that_meets_emfile_is_retried_once_fds_are_free(supervisor) -> None:
    """A start that fails for lack of fds is a transient failure: retried as restart: says
    (systemd applies Restart= to a start that failed for lack of resources), not a failed
    service that only a manual service-start would bring back."""
    sup = supervisor({"web": TWO_SOCKETS})
    first = sup.wait_for("worker_started")["pid"]
    with RawClient(sup.monitor_path).negotiate() as client:
        with out_of_fds(sup, client) as names:
            mark = sup.mark()
            os.kill(first, signal.SIGKILL)
            failed = sup.wait_for("worker_start_failed", after=mark)
            assert "Too many open files" in failed["error"]
            free_fds(client, names)
        second = sup.wait_for("worker_started", after=mark, timeout=10)["pid"]
        assert report_from("127.0.0.1", sup.port("http"))["pid"] == second
        services = client.command("query-services")["return"]
    assert services[0]["state"] == "running" and services[0]["pids"] == [second]
