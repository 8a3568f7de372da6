"""``kind: fifo`` (SPEC 10, systemd's ``ListenFIFO=``): a FIFO the supervisor creates and holds.

Real processes: the writer is another process (as ``nobody`` where the mode
allows it, as another group where it does not), and the worker reads the
FIFO at fd 3 and tells what it read on a unix socket of its own unit.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PYTHON, SupervisorProcess, run_fdsupervisor

# Each line read from the FIFO (fd 3) is sent to the next client of `out` (fd 4).
RELAY = (
    "import os, socket\n"
    "fifo = os.fdopen(3, 'rb', buffering=0)\n"
    "out = socket.socket(fileno=4)\n"
    "buffered = b''\n"
    "while True:\n"
    "    while b'\\n' not in buffered:\n"
    "        buffered += fifo.read(4096)\n"
    "    line, _, buffered = buffered.partition(b'\\n')\n"
    "    conn, _ = out.accept()\n"
    "    conn.sendall(line + b'\\n')\n"
    "    conn.close()\n"
)


def relay_unit(path: Path, extra: str = "", activation: str = "eager") -> str:
    return f"""
    sockets:
      in:
        listen: {{type: fifo, path: {json.dumps(str(path))}}}
        mode: "0620"
        group: nogroup
        {extra}
      out: {{listen: {json.dumps(f"unix:{path.parent / 'out.sock'}")}}}
    service:
      exec: [{PYTHON}, -c, {json.dumps(RELAY)}]
      activation: {activation}
    """


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (tmp_path is root's, 0700)."""
    top = Path(tempfile.mkdtemp(prefix="fdsup-fifo-"))
    try:
        top.chmod(0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def write_as(path: Path, text: str, uid: int, gid: int) -> subprocess.CompletedProcess[str]:
    """Another process, as uid:gid with no other groups, opens the FIFO for writing."""
    writer = "import sys\nwith open(sys.argv[1], 'w') as f:\n    f.write(sys.argv[2])\n"
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
         PYTHON, "-c", writer, str(path), text],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def relayed(directory: Path) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(15)
        conn.connect(str(directory / "out.sock"))
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        return data


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="writers as others need root"
)


@needs_root
@pytest.mark.parametrize("activation", ["eager", "on-demand"])
def test_a_client_writes_the_fifo_and_the_worker_reads_it(
    supervisor, shared_dir: Path, activation: str
) -> None:
    path = shared_dir / "in.fifo"
    sup: SupervisorProcess = supervisor({"relay": relay_unit(path, activation=activation)})
    bound = sup.wait_for("socket_bound", socket="in")
    assert (bound["kind"], bound["address"]) == ("fifo", f"fifo:{path}")
    info = os.lstat(path)
    assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o620
    nobody = pwd.getpwnam("nobody")
    assert (info.st_uid, info.st_gid) == (0, nobody.pw_gid)  # group nogroup, as the unit says
    if activation == "on-demand":
        assert sup.count("worker_started", unit="relay") == 0
    # nobody (group nogroup) may write: 0620; the writer closing is no EOF for the worker
    for text in ("first line\n", "second line\n"):
        written = write_as(path, text, nobody.pw_uid, nobody.pw_gid)
        assert written.returncode == 0, written.stderr
        assert relayed(shared_dir) == text.encode()
    # another group may not (no bit for others): refused by the kernel, not by us
    refused = write_as(path, "intruder\n", nobody.pw_uid, 1)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert sup.count("worker_started", unit="relay") == 1
    assert sup.stop() == 0
    assert not path.exists(), "removed at stop, as unix socket files are"


@needs_root
def test_the_fifo_is_kept_by_reload_and_handed_over_by_upgrade(
    supervisor, shared_dir: Path, tmp_path: Path
) -> None:
    path = shared_dir / "in.fifo"
    sup = supervisor({"relay": relay_unit(path)})
    pid = sup.wait_for("worker_started", unit="relay")["pid"]
    inode = os.lstat(path).st_ino
    nobody = pwd.getpwnam("nobody")
    other = json.dumps(f"unix:{shared_dir / 'o.sock'}")
    (tmp_path / "units" / "other.yaml").write_text(
        f"sockets:\n  s: {{listen: {other}}}\n"
        f"service:\n  exec: [{PYTHON}, -c, 'import time; time.sleep(1000)']\n"
    )
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGHUP)
    sup.wait_for("reloaded", after=mark)
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGUSR2)
    sup.wait_for("upgraded", after=mark, timeout=30)
    assert write_as(path, "after both\n", nobody.pw_uid, nobody.pw_gid).returncode == 0
    assert relayed(shared_dir) == b"after both\n"
    assert os.lstat(path).st_ino == inode, "the same FIFO, never made again"
    assert sup.count("worker_started", unit="relay") == 1
    assert sup.wait_for("worker_started", unit="relay")["pid"] == pid
    assert sup.stop() == 0
    assert not path.exists()


def test_a_symlink_or_another_file_at_the_path_is_left_alone(supervisor, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("root's file\n")
    for name, make in (("link.fifo", lambda p: p.symlink_to(target)),
                       ("file.fifo", lambda p: p.write_text("data\n"))):  # fmt: skip
        path = tmp_path / name
        make(path)
        sup = supervisor({"relay": relay_unit(path)}, wait_ready=False)
        assert sup.proc.wait(20) == 1
        failed = sup.wait_for("startup_failed")
        kind = "a symbolic link" if name == "link.fifo" else "a regular file"
        assert f"{path} exists and is {kind}, not a FIFO" in failed["error"]
        assert f"(unit relay, {tmp_path / 'units' / 'relay.yaml'}:4:" in failed["error"]
        assert failed["error"].endswith("sockets.in.listen)")
    assert target.read_text() == "root's file\n"
    assert (tmp_path / "file.fifo").read_text() == "data\n"


def test_someone_elses_fifo_is_not_reused(supervisor, tmp_path: Path) -> None:
    path = tmp_path / "in.fifo"
    os.mkfifo(path, 0o600)
    os.chmod(path, 0o666)  # not the unit's 0620
    sup = supervisor({"relay": relay_unit(path)}, wait_ready=False)
    assert sup.proc.wait(20) == 1
    assert "a FIFO with mode 0666" in sup.wait_for("startup_failed")["error"]
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666


def test_bad_fifo_sockets_are_errors_at_their_place(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    cases = [
        ("listen: {type: fifo, path: a}\n    kind: stream", "4:11: sockets.s.kind: a FIFO"),
        ('listen: "unix:a.sock"\n    kind: fifo', "4:11: sockets.s.kind: kind: fifo needs"),
        ("listen: {type: fifo}", "3:13: sockets.s.listen.path: missing required key 'path'"),
        ("listen: {type: fifo, path: a}\n    backlog: 5", "4:5: sockets.s.backlog: 'backlog'"),
        ("listen: {type: fifo, path: a, host: x}", "sockets.s.listen.host: unknown key"),
    ]
    for text, problem in cases:
        (units / "web.yaml").write_text(f"sockets:\n  s:\n    {text}\nservice:\n  exec: [cat]\n")
        checked = run_fdsupervisor("check", str(units))
        assert checked.returncode == 1
        assert f"{units / 'web.yaml'}:{problem}" in checked.stderr or (
            problem.startswith("sockets") and problem in checked.stderr
        ), checked.stderr
    (units / "web.yaml").write_text(
        "sockets:\n  s: {listen: {type: fifo, path: a}}\nservice:\n  exec: [cat]\n  accept: true\n"
    )
    checked = run_fdsupervisor("check", str(units))
    assert f"{units / 'web.yaml'}:5:11: service.accept: accept: true cannot serve a FIFO: s" in (
        checked.stderr
    )


def test_socket_add_refuses_a_fifo(supervisor, tmp_path: Path) -> None:
    """A FIFO is a unit file's; the monitor answers an error and the supervisor carries on."""
    from tests.monitor_client import RawClient

    sup = supervisor({"relay": relay_unit(tmp_path / "in.fifo")})
    with RawClient(sup.monitor_path).negotiate() as client:
        path = str(tmp_path / "x.fifo")
        reply = client.command("socket-add", id="x", addr={"type": "fifo", "path": path})
        assert "a FIFO is declared in a unit file" in reply["error"]["desc"]
        inet = {"type": "inet", "host": "127.0.0.1", "port": "0"}
        reply = client.command("socket-add", id="x", addr=inet, kind="fifo")
        assert (
            "Parameter 'kind' expects one of stream, datagram, seqpacket"
            in (reply["error"]["desc"])
        )
        assert client.command("query-version")["return"]
    assert not Path(path).exists()


def test_a_reload_that_changes_the_mode_makes_the_fifo_again(supervisor, tmp_path: Path) -> None:
    """The same path: the old FIFO is closed and removed first, then made with the new mode."""
    path = tmp_path / "in.fifo"
    sup = supervisor({"relay": relay_unit(path)})
    sup.wait_for("worker_started", unit="relay")
    (tmp_path / "units" / "relay.yaml").write_text(relay_unit(path).replace('"0620"', '"0600"'))
    mark = sup.mark()
    os.kill(sup.pid, signal.SIGHUP)
    assert "1 close-first" in sup.wait_for("reloaded", after=mark)["plan"]
    assert sup.count("reload_failed") == 0
    info = os.lstat(path)
    assert stat.S_ISFIFO(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    sup.wait_for("worker_started", unit="relay", after=mark)
    with open(path, "w") as writer:  # as root: the new worker reads the new FIFO
        writer.write("after the reload\n")
    assert relayed(tmp_path) == b"after the reload\n"
