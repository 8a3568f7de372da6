"""The worker examples of docs/workers.md, run under a real supervisor."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, connect_and_read

WORKERS = ROOT / "contrib" / "workers"


def test_c_worker_with_libsystemd(supervisor, tmp_path: Path) -> None:
    if (
        shutil.which("cc") is None
        or subprocess.run(["pkg-config", "--exists", "libsystemd"], check=False).returncode
    ):
        pytest.skip("needs a C compiler and libsystemd-dev")
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "libsystemd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    binary = tmp_path / "hello"
    subprocess.run(
        ["cc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(WORKERS / "hello.c"), *flags],
        check=True,
        timeout=120,
    )
    sup = supervisor(
        {
            "hello": f"""
        sockets:
          first: {{listen: "127.0.0.1:0"}}
          second: {{listen: "unix:second.sock"}}
        service:
          exec: [{binary}]
        """
        }
    )
    pid = sup.wait_for("worker_started")["pid"]
    assert (
        connect_and_read("127.0.0.1", sup.port("first")) == f"hello from {pid} on first\n".encode()
    )
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(tmp_path / "units" / "second.sock"))
        assert conn.recv(100) == f"hello from {pid} on second\n".encode()


def test_shell_worker_in_inetd_mode(supervisor) -> None:
    sup = supervisor(
        {
            "greet": f"""
        sockets:
          tcp: {{listen: "127.0.0.1:0"}}
        service:
          exec: [/bin/sh, {WORKERS / "hello.sh"}]
          accept: true
          inetd: true
        """
        }
    )
    with socket.create_connection(("127.0.0.1", sup.port("tcp")), timeout=10) as conn:
        conn.sendall(b"operator\n")
        port = conn.getsockname()[1]
        data = b""
        while chunk := conn.recv(100):
            data += chunk
    text = data.decode()
    assert text.startswith(f"hello operator, from 127.0.0.1:{port}, pid ")
    assert int(text.rsplit(" ", 1)[1]) != os.getpid()
