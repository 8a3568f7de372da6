"""Crash, restart, stop and shut down: the supervisor keeps the sockets through it all."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

from tests.conftest import PYTHON, REPORT_WORKER, open_fds, report_from, run_fdsupervisor

IGNORE_TERM_WORKER = (
    "import signal, os, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "child = os.fork()\n"
    "if child == 0:\n    signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)\n"
    "print('ignoring-term ready', os.getpid(), child, flush=True); time.sleep(3600)"
)


def pid_exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


def zombie_children(parent: int) -> list[int]:
    zombies = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] == "Z" and int(fields[1]) == parent:
            zombies.append(int(name))
    return zombies


def test_sigkilled_worker_restarts_with_backoff_and_no_connection_is_refused(supervisor) -> None:
    sup = supervisor(
        {
            "web": f"""
        sockets:
          http: {{listen: "127.0.0.1:0", backlog: 256}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          restart: always
          restart-delay: 50ms
          start-limit: {{burst: 100, interval: 10s}}
        """
        }
    )
    port = sup.port("http")
    stop = threading.Event()
    outcomes: dict[str, int] = {"ok": 0, "refused": 0, "other": 0}
    errors: list[str] = []

    def client() -> None:
        deadline = time.monotonic() + 30  # bounded whatever happens
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                report_from("127.0.0.1", port)
                outcomes["ok"] += 1
            except ConnectionRefusedError:
                outcomes["refused"] += 1
            except (OSError, ValueError) as exc:
                outcomes["other"] += 1
                errors.append(repr(exc))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        pids = []
        mark = 0
        for _ in range(4):
            started = sup.wait_for("worker_started", after=mark)
            pids.append(started["pid"])
            mark = sup.mark()
            os.kill(started["pid"], signal.SIGKILL)
            exited = sup.wait_for("worker_exited", pid=started["pid"])
            assert exited["status"] == "signal SIGKILL"
        sup.wait_for("worker_started", after=mark)
    finally:
        stop.set()
        thread.join(35)
    assert outcomes["refused"] == 0
    assert outcomes["other"] == 0, errors[:5]
    assert outcomes["ok"] > 0
    delays = [e["restart_in"] for e in sup.events if e.get("event") == "worker_exited"]
    assert delays == [0.05, 0.1, 0.2, 0.4], "quick crashes double the delay"
    assert len(set(pids)) == 4
    assert zombie_children(sup.pid) == []


def test_start_limit_fails_the_service_and_keeps_its_socket(supervisor) -> None:
    sup = supervisor(
        {
            "crashy": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, "raise SystemExit(3)"]
          restart: on-failure
          restart-delay: 0
          start-limit: {{burst: 3, interval: 1min}}
        """
        }
    )
    failed = sup.wait_for("service_failed", unit="crashy")
    assert "start limit" in failed["reason"]
    assert sup.count("worker_started") == 3
    exits = [e for e in sup.events if e.get("event") == "worker_exited"]
    assert exits and all(e["status"] == "code 3" for e in exits)
    with socket.create_connection(("127.0.0.1", sup.port("http")), timeout=5):
        pass  # still bound and listening: the connection waits in the backlog


def test_restart_no_is_not_yaml_false(supervisor) -> None:
    sup = supervisor(
        {
            "once": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, "raise SystemExit(1)"]
          restart: no
        """
        }
    )
    exited = sup.wait_for("worker_exited", status="code 1")
    assert exited["restart_in"] is None


def test_sigterm_stops_workers_closes_sockets_and_removes_files(supervisor, tmp_path: Path) -> None:
    sup = supervisor(
        {
            "web": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
          local: {{listen: "unix:run/web.sock"}}
        service:
          exec: [{PYTHON}, {REPORT_WORKER}]
          instances: 2
        """
        }
    )
    port = sup.port("http")
    pids = [sup.wait_for("worker_started", instance=i)["pid"] for i in range(2)]
    path = tmp_path / "units" / "run" / "web.sock"
    assert path.exists()
    assert sup.stop() == 0
    assert not path.exists()
    assert not any(pid_exists(pid) for pid in pids)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        refused = False
    except ConnectionRefusedError:
        refused = True
    assert refused


def test_sigterm_after_sigterm_still_ends_in_a_clean_exit(supervisor) -> None:
    """A kill loop (an impatient operator, a script) goes on sending SIGTERM through the
    whole shutdown, to the last moment: the exit is still 0, never a death by SIGTERM."""
    sup = supervisor(
        {
            "web": f'sockets:\n  http: {{listen: "127.0.0.1:0"}}\nservice:\n  exec: [{PYTHON}, {REPORT_WORKER}]\n'
        }
    )
    sup.wait_for("worker_started")
    sent, deadline = 0, time.monotonic() + 20
    while sup.proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sup.pid, signal.SIGTERM)
        sent += 1
        time.sleep(0.0005)  # the pace of the sender, not a synchronisation
    assert sent > 1
    assert sup.proc.wait(10) == 0, f"killed by signal {-sup.proc.returncode}"


def test_stop_timeout_kills_the_whole_group(supervisor) -> None:
    sup = supervisor(
        {
            "stubborn": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, {json.dumps(IGNORE_TERM_WORKER)}]
          stop-timeout: 300ms
        """
        }
    )
    started = sup.wait_for("worker_started")
    line = sup.wait_output("ignoring-term ready")
    worker, child = (int(x) for x in line.split()[2:4])
    assert worker == started["pid"]
    assert sup.stop(timeout=10) == 0
    assert sup.count("stop_timeout") == 1
    assert not pid_exists(worker) and not pid_exists(child)


def test_bad_unit_means_exit_1_and_nothing_bound(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "good.yaml").write_text(
        "sockets:\n  s: {listen: 'unix:good.sock'}\nservice:\n  exec: [true]\n"
    )
    (units / "bad.yaml").write_text(
        "sockets:\n  s:\n    listen: '127.0.0.1:99999'\nservice:\n  exec: [true]\n"
    )
    result = run_fdsupervisor("run", str(units))
    assert result.returncode == 1
    assert f"{units / 'bad.yaml'}:3:13: sockets.s.listen" in result.stderr
    assert not (units / "good.sock").exists()


def test_bind_failure_unbinds_everything(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (units / "a.yaml").write_text(
            "sockets:\n  s: {listen: 'unix:a.sock'}\nservice:\n  exec: [true]\n"
        )
        (units / "b.yaml").write_text(
            f"sockets:\n  s: {{listen: '127.0.0.1:{port}'}}\nservice:\n  exec: [true]\n"
        )
        result = run_fdsupervisor("run", str(units))
    assert result.returncode == 1
    assert "Address already in use" in result.stderr + result.stdout
    assert not (units / "a.sock").exists()


COUNTING_WORKER = (
    "import os, sys, time\n"
    "n = len(os.listdir('starts'))\n"
    "open(f'starts/{n}', 'w').close()\n"
    "if n in (0, 21):\n"
    "    print('steady', n, flush=True); time.sleep(3600)\n"
    "sys.exit(1)"
)


def test_supervisor_fd_count_is_stable_across_restarts(supervisor, tmp_path: Path) -> None:
    (tmp_path / "starts").mkdir()
    sup = supervisor(
        {
            "web": f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, -c, {json.dumps(COUNTING_WORKER)}]
          working-directory: {tmp_path}
          restart: always
          restart-delay: 0
          start-limit: {{burst: 1000, interval: 1s}}
        """
        }
    )
    sup.wait_output("steady 0")
    baseline = open_fds(sup.pid)
    os.kill(sup.wait_for("worker_started")["pid"], signal.SIGKILL)
    sup.wait_output("steady 21")  # 20 crashes later, one worker runs again
    assert sup.count("worker_exited") == 21
    assert open_fds(sup.pid) == baseline
    assert zombie_children(sup.pid) == []
