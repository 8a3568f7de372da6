"""``fdsupervisor export --systemd``: systemd accepts the files, and they serve the same answer.

``systemd-analyze verify`` reads every exported file; the round trip runs the
exported ``.socket``'s address under the real ``systemd-socket-activate`` with
the exported ``ExecStart=``, and a client gets what ``fdsupervisor run`` on
the original unit answers.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import PYTHON, ROOT, SupervisorProcess, run_fdsupervisor
from .test_export_data import ANSWER_WORKER

EXAMPLES = ["echo-unix.yaml", "qemu-monitor.yaml"]  # echo.yaml has instances: 2 (refused)
needs = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or shutil.which("systemd-socket-activate") is None,
    reason="systemd's tools are not installed",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"hello\n")
        return client.makefile("rb").readline()


@needs
def test_systemd_analyze_verifies_the_examples(tmp_path: Path) -> None:
    paths = [str(ROOT / "units" / name) for name in EXAMPLES]
    result = run_fdsupervisor("export", "--systemd", str(tmp_path), *paths)
    assert result.returncode == 0, result.stderr
    written = sorted(tmp_path.iterdir())
    assert [p.name for p in written] == [
        "echo-unix-datagram.socket", "echo-unix-stream.socket", "echo-unix.service",
        "qemu-monitor.service", "qemu-monitor.socket",
    ]  # fmt: skip
    verify = subprocess.run(
        ["systemd-analyze", "verify", *map(str, written)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr


@needs
def test_a_refused_key_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_fdsupervisor("export", "--systemd", str(out), str(ROOT / "units"))
    assert result.returncode == 1
    assert "echo.yaml:10:14: service.instances: cannot be exported to systemd:" in result.stderr
    assert not out.exists()


@needs
def test_round_trip_gives_the_same_answer(
    tmp_path: Path, supervisor: Callable[..., SupervisorProcess]
) -> None:
    port = free_port()
    worker = tmp_path / "answer.py"
    worker.write_text(ANSWER_WORKER)
    text = textwrap.dedent(f"""
        sockets:
          web: {{listen: "127.0.0.1:{port}"}}
        service:
          exec: [{PYTHON}, {worker}, "{{fd:web}}"]
          notify: false
        """)
    proc = supervisor({"web": text})
    original = ask(port)
    assert proc.stop() == 0
    assert original.startswith(b"fd=3 names=web")

    result = run_fdsupervisor("export", "--systemd", str(tmp_path / "out"), str(tmp_path / "units"))
    assert result.returncode == 0, result.stderr
    socket_unit = (tmp_path / "out" / "web.socket").read_text().splitlines()
    service_unit = (tmp_path / "out" / "web.service").read_text().splitlines()
    listen = next(
        line.partition("=")[2] for line in socket_unit if line.startswith("ListenStream=")
    )
    name = next(
        line.partition("=")[2] for line in socket_unit if line.startswith("FileDescriptorName=")
    )
    exec_start = next(
        line.partition("=")[2] for line in service_unit if line.startswith("ExecStart=")
    )
    activate = subprocess.Popen(
        ["systemd-socket-activate", "-l", listen, f"--fdname={name}", *shlex.split(exec_start)],
        stderr=subprocess.PIPE,
    )
    try:
        assert activate.stderr is not None
        assert b"Listening on" in activate.stderr.readline()  # bound: connect now
        assert ask(port) == original
    finally:
        activate.terminate()
        activate.wait(10)
        assert activate.stderr is not None
        activate.stderr.close()  # not left for the garbage collector, in a later test's fd count


@needs
def test_systemd_analyze_verifies_every_exportable_key(tmp_path: Path) -> None:
    from ..unit.test_export import EVERY_KEY

    units = tmp_path / "units"
    units.mkdir()
    (units / "every.yaml").write_text(EVERY_KEY.replace("/usr/bin/worker", "/bin/cat"))
    (units / "conn.yaml").write_text(
        "sockets:\n  conn: {listen: {type: unix, path: run/c.sock}, mode: '0660',"
        " max-connections-per-source: 2}\n"
        "service: {exec: [/bin/cat], accept: true, inetd: true, max-connections: 9}\n"
    )
    (units / "pipe.yaml").write_text(
        "sockets:\n  jobs: {listen: {type: fifo, path: run/jobs.fifo}, mode: '0620'}\n"
        "service: {exec: [/bin/cat]}\n"
    )
    result = run_fdsupervisor("export", "--systemd", str(tmp_path / "out"), str(units))
    assert result.returncode == 0, result.stderr
    written = sorted(map(str, (tmp_path / "out").iterdir()))
    assert len(written) == 6
    pipe = (tmp_path / "out" / "pipe.socket").read_text()
    assert f"ListenFIFO={units / 'run' / 'jobs.fifo'}\n" in pipe and "Backlog=" not in pipe
    verify = subprocess.run(
        ["systemd-analyze", "verify", *written],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
