"""The seed rule at start-up: a unit adopts a socket the supervisor inherited, by number."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from tests.conftest import PYTHON, REPORT_WORKER, report_from, run_fdsupervisor


def listening_socket(kind: int = socket.SOCK_STREAM, listen: bool = True) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if listen:
        sock.listen()
    return sock


def socket_inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def held_sockets(pid: int) -> set[int]:
    """The inodes of the sockets process PID holds, from /proc/PID/fd."""
    inodes = set()
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(entry)
        except FileNotFoundError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def test_inherited_socket_is_served_and_unreferenced_ones_closed(supervisor) -> None:
    with listening_socket() as inherited, listening_socket() as unused:
        number, spare = inherited.fileno(), unused.fileno()
        sup = supervisor(
            {
                "adopt": f"""
            sockets:
              http:
                listen: {{type: fd, str: "{number}"}}
            service:
              exec: [{PYTHON}, {REPORT_WORKER}]
            """
            },
            pass_fds=(number, spare),
        )
        port = inherited.getsockname()[1]
        warning = sup.wait_for("inherited_fd_closed")
        assert warning["fd"] == spare
        # by inode, not by number: the supervisor may reuse the number for a new fd
        held = held_sockets(sup.pid)
        assert socket_inode(inherited) in held
        assert socket_inode(unused) not in held
    # the test closed its copies: only the supervisor holds the socket now
    report = report_from("127.0.0.1", port)
    assert report["names"] == {"3": "http"}


def test_shorthand_fd_form(supervisor) -> None:
    with listening_socket() as inherited:
        sup = supervisor(
            args=["--listen", f"http=fd:{inherited.fileno()}", "--", PYTHON, REPORT_WORKER],
            pass_fds=(inherited.fileno(),),
        )
        port = inherited.getsockname()[1]
    assert report_from("127.0.0.1", port)["listen_fdnames"] == "http"
    sup.stop()


def run_with(
    tmp_path: Path, unit: str, pass_fds: tuple[int, ...]
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "u.yaml").write_text(unit)
    return run_fdsupervisor("run", str(tmp_path / "u.yaml"), pass_fds=pass_fds)


def test_inherited_fd_must_be_a_socket(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        result = run_with(
            tmp_path,
            f"sockets:\n  s: {{listen: 'fd:{read_end}'}}\nservice: {{exec: [true]}}\n",
            (read_end,),
        )
    finally:
        os.close(read_end)
        os.close(write_end)
    assert result.returncode == 1
    assert f"File descriptor '{read_end}' is not a socket" in result.stderr


def test_inherited_fd_must_listen_and_match_the_kind(tmp_path: Path) -> None:
    with (
        listening_socket(listen=False) as idle,
        listening_socket(socket.SOCK_DGRAM, False) as dgram,
    ):
        result = run_with(
            tmp_path,
            f"sockets:\n  s: {{listen: 'fd:{idle.fileno()}'}}\nservice: {{exec: [true]}}\n",
            (idle.fileno(),),
        )
        assert result.returncode == 1
        assert f"File descriptor '{idle.fileno()}' is not listening" in result.stderr
        result = run_with(
            tmp_path,
            f"sockets:\n  s: {{listen: 'fd:{dgram.fileno()}'}}\nservice: {{exec: [true]}}\n",
            (dgram.fileno(),),
        )
        assert result.returncode == 1
        assert f"File descriptor '{dgram.fileno()}' is a datagram socket" in result.stderr


def test_fd_not_inherited_is_refused(tmp_path: Path) -> None:
    result = run_with(tmp_path, "sockets:\n  s: {listen: 'fd:57'}\nservice: {exec: [true]}\n", ())
    assert result.returncode == 1
    assert "57" in result.stderr and "inherit" in result.stderr


def test_named_fd_in_a_unit_file_is_refused(tmp_path: Path) -> None:
    result = run_with(
        tmp_path, "sockets:\n  s: {listen: {type: fd, str: vm0-mon}}\nservice: {exec: [true]}\n", ()
    )
    assert result.returncode == 1
    assert "named file descriptors are only permitted in monitor commands" in result.stderr
    assert "u.yaml:2:" in result.stderr
