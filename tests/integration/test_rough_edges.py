"""Issue 14's rough edges, each with the real supervisor, monitor and fds."""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PYTHON, fdsupervisor_command, run_fdsupervisor
from tests.integration.test_reload import free_port, unit_text
from tests.monitor_client import RawClient


def test_a_command_without_listen_says_listen_is_missing() -> None:
    for extra in ([], ["--on-demand"], ["--accept"]):
        result = run_fdsupervisor("run", "--no-monitor", *extra, "--", "true")
        assert result.returncode == 1
        assert "needs at least one --listen NAME=ADDRESS" in result.stderr, result.stderr


def test_a_one_off_that_cannot_be_executed_exits_non_zero(tmp_path: Path) -> None:
    result = run_fdsupervisor(
        "run", "--no-monitor", "--log-format", "json",
        "--listen", "a=127.0.0.1:0", "--", str(tmp_path / "nonexistent"),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert '"service_failed"' in result.stderr


def test_check_refuses_addresses_that_cannot_resolve(tmp_path: Path) -> None:
    unit = tmp_path / "r.yaml"
    unit.write_text(
        'sockets:\n  a:\n    listen: "localhost:nosuchservice"\n'
        '  b:\n    listen: "999.1.1.1:80"\nservice:\n  exec: [true]\n'
    )
    result = run_fdsupervisor("check", str(unit))
    assert result.returncode == 1
    assert f"{unit}:3:13: sockets.a.listen: address resolution failed" in result.stderr
    assert f"{unit}:5:13: sockets.b.listen: address resolution failed" in result.stderr


def test_check_names_overlap_false_and_refuses_a_bad_one(tmp_path: Path) -> None:
    unit = tmp_path / "r.yaml"
    unit.write_text(
        'sockets:\n  a: {listen: "127.0.0.1:0"}\nservice:\n  exec: [true]\n  overlap: false\n'
    )
    result = run_fdsupervisor("check", str(unit))
    assert result.returncode == 0 and " overlap=false " in result.stdout
    unit.write_text(unit.read_text().replace("overlap: false", "overlap: sometimes"))
    result = run_fdsupervisor("check", str(unit))
    assert result.returncode == 1
    assert f"{unit}:5:12: service.overlap: expected a boolean" in result.stderr


def test_a_start_up_bind_error_names_unit_file_and_key(tmp_path: Path) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    unit = tmp_path / "web.yaml"
    unit.write_text(
        f'sockets:\n  http:\n    listen: "127.0.0.1:{port}"\nservice:\n  exec: [true]\n'
    )
    try:
        result = run_fdsupervisor("run", "--no-monitor", "--log-format", "json", str(unit))
    finally:
        taken.close()
    assert result.returncode == 1
    assert f"unit web, {unit}:3:13: sockets.http.listen" in result.stderr, result.stderr


def test_ctl_into_a_closed_pipe_exits_quietly(supervisor) -> None:
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{free_port()}"')})
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` that has already gone
    try:
        result = subprocess.run(
            fdsupervisor_command("ctl", "--monitor", str(sup.monitor_path), "status"),
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_ctl_getfd_of_a_closed_fd_names_it(supervisor) -> None:
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{free_port()}"')})
    result = run_fdsupervisor("ctl", "--monitor", str(sup.monitor_path), "getfd", "x", "--fd", "9")
    assert result.returncode == 1
    assert "--fd 9: this process has no fd 9 open" in result.stderr, result.stderr


def test_inherited_fds_warn_only_when_they_look_passed(supervisor, tmp_path: Path) -> None:
    stray = os.open(tmp_path / "stray", os.O_RDWR | os.O_CREAT)
    passed = socket.create_server(("127.0.0.1", 0))
    passed_fd = passed.fileno()
    try:
        sup = supervisor(
            {"web": unit_text(f'listen: "127.0.0.1:{free_port()}"')},
            pass_fds=(stray, passed_fd),
        )
    finally:
        os.close(stray)
        passed.close()
    closed = {e["fd"]: e["level"] for e in sup.events if e["event"] == "inherited_fd_closed"}
    assert closed[stray] == "debug"
    assert closed[passed_fd] == "warning"


def test_a_failing_worker_exit_is_a_warning(supervisor, tmp_path: Path) -> None:
    sup = supervisor(
        {
            "web": textwrap.dedent(f"""
            sockets:
              http:
                listen: "127.0.0.1:{free_port()}"
            service:
              exec: [{PYTHON}, -c, "raise SystemExit(3)"]
              restart: "no"
            """)
        }
    )
    exited = sup.wait_for("worker_exited")
    assert exited["level"] == "warning" and exited["status"] == "code 3"


def test_ready_after_an_upgrade_counts_sockets_only(supervisor) -> None:
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{free_port()}"')})
    assert sup.wait_for("ready")["sockets"] == 1
    with open(os.devnull) as spare, RawClient(sup.monitor_path).negotiate() as client:
        assert client.command("getfd", fds=[spare.fileno()], fdname="spare") == {"return": {}}
        mark = sup.mark()
        client.send(b'{"execute": "upgrade"}')
        with pytest.raises((EOFError, ConnectionResetError)):
            client.reply()
    sup.wait_for("upgraded", after=mark)
    assert sup.wait_for("ready", after=mark)["sockets"] == 1


def test_ctl_query_fds_shows_each_fds_inode(supervisor) -> None:
    """The inode tells the same socket from a new one, after a restart say (docs/systemd.md)."""
    sup = supervisor({"web": unit_text(f'listen: "127.0.0.1:{free_port()}"')})
    with RawClient(sup.monitor_path).negotiate() as client:
        [row] = client.command("query-fds")["return"]
    result = run_fdsupervisor("ctl", "--monitor", str(sup.monitor_path), "query-fds")
    assert result.returncode == 0, result.stderr
    header, line = result.stdout.splitlines()
    assert header.split()[-1] == "INODE" and line.split()[-1] == str(row["inode"])
