"""The supervisor started by real systemd code: systemd-socket-activate passes fd 3."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PYTHON, REPORT_WORKER, fdsupervisor_command, read_until_eof
from tests.integration.test_reload import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (package systemd)",
)


def test_supervisor_under_systemd_socket_activate(tmp_path: Path) -> None:
    port = free_port()
    units = tmp_path / "units"
    units.mkdir()
    (units / "web.yaml").write_text(
        textwrap.dedent(f"""
        sockets:
          http:
            listen: {{type: fd, str: "3"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
        """)
    )
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            *fdsupervisor_command(
                "run",
                "--log-format",
                "json",
                "--monitor",
                str(tmp_path / "monitor.sock"),
                str(units),
            ),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        # systemd-socket-activate says it listens; the first connection starts us
        for line in proc.stdout:
            if b"Listening on" in line:
                break
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            report = read_until_eof(conn)
        assert b'"listen_fdnames": "http"' in report
        assert b'"names": {"3": "http"}' in report
        # the supervisor's own LISTEN_PID (systemd-socket-activate's) is not the worker's
        assert f'"listen_pid": "{proc.pid}"'.encode() not in report
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
