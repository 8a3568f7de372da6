"""The supervisor's fd budget: one fd per socket plus a constant, none per worker (issue 15).

Workers are reaped on SIGCHLD (reaper.py), not watched through a pidfd
each, so 50 running workers cost the supervisor no fd at all; and a unit set
that cannot fit ``RLIMIT_NOFILE`` is refused at start, before anything is bound.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import textwrap
from pathlib import Path
from typing import Any

from fdsupervisor.cli import SUPERVISOR_FDS
from fdsupervisor.monitor import monitor_fd_budget
from tests.conftest import SupervisorProcess, fdsupervisor_command, open_fds

UNITS = 50


def sleep_unit(activation: str) -> str:
    return f"""
        sockets: {{http: {{listen: "127.0.0.1:0"}}}}
        service:
          exec: [/usr/bin/sleep, "3600"]
          activation: {activation}
        """


def test_running_workers_cost_the_supervisor_no_fd(supervisor: Any) -> None:
    """The same 50 units, once without workers (on demand) and once with one each."""
    idle: SupervisorProcess = supervisor({f"u{i}": sleep_unit("on-demand") for i in range(UNITS)})
    without_workers = len(open_fds(idle.pid))
    assert idle.count("worker_started") == 0
    idle.stop()

    busy: SupervisorProcess = supervisor({f"u{i}": sleep_unit("eager") for i in range(UNITS)})
    busy.wait_count("worker_started", UNITS)
    with_workers = len(open_fds(busy.pid))
    assert with_workers <= without_workers, (
        f"{with_workers - without_workers} fds more with {UNITS} workers than with none"
    )
    # and each is still reaped: killed, reported with its signal, started again
    pid = busy.wait_for("worker_started", unit="u7")["pid"]
    mark = busy.mark()
    os.kill(pid, signal.SIGKILL)
    exited = busy.wait_for("worker_exited", pid=pid)
    assert exited["status"] == "signal SIGKILL"
    busy.wait_for("worker_started", unit="u7", after=mark)


def run_limited(
    tmp_path: Path, limit: int, units: int, *extra: str, activation: str = "on-demand"
) -> subprocess.Popen[str]:
    """``fdsupervisor run`` at ``RLIMIT_NOFILE`` ``limit`` (soft and hard), ``units`` unix sockets."""
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    for i in range(units):
        (unit_dir / f"u{i}.yaml").write_text(
            textwrap.dedent(f"""
                sockets: {{s: {{listen: {{type: unix, path: {tmp_path}/u{i}.sock}}}}}}
                service:
                  exec: [/usr/bin/sleep, "3600"]
                  activation: {activation}
                """)
        )

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    return subprocess.Popen(
        fdsupervisor_command("run", "--log-format", "json", *extra, str(unit_dir)),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lower_limit,
    )


def stderr_at_exit(proc: subprocess.Popen[str]) -> str:
    """What the supervisor logged until it exited (bounded: killed, by pid, if it runs on)."""
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the supervisor ran on instead of refusing to start") from None


def events_of(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_units_that_cannot_fit_the_fd_limit_fail_before_binding(tmp_path: Path) -> None:
    proc = run_limited(tmp_path, 128, 80, "--monitor", str(tmp_path / "monitor.sock"))
    stderr = stderr_at_exit(proc)
    assert proc.returncode == 1
    events = events_of(stderr)
    (failed,) = [e for e in events if e["event"] == "startup_failed"]
    reserved = monitor_fd_budget(128)
    needed = 80 + SUPERVISOR_FDS + reserved
    assert failed["error"] == (
        f"the units cannot fit the fd limit: 80 sockets + {SUPERVISOR_FDS} for the supervisor"
        f" + {reserved} for the monitor's clients = {needed} file descriptors, but"
        " RLIMIT_NOFILE is 128 (hard limit 128); raise the hard limit (LimitNOFILE= in the"
        " supervisor's systemd unit, ulimit -Hn) or run fewer sockets"
    )
    assert failed["note"] == "nothing was bound"
    assert not [e for e in events if e["event"] == "socket_bound"]
    assert not list(tmp_path.glob("*.sock")), "nothing bound, not even the monitor"


def test_without_a_monitor_nothing_is_reserved_for_it(tmp_path: Path) -> None:
    proc = run_limited(tmp_path, 128, 80, "--no-monitor")
    stderr = stderr_at_exit(proc)
    assert proc.returncode == 1
    (failed,) = [e for e in events_of(stderr) if e["event"] == "startup_failed"]
    assert failed["error"].startswith(
        f"the units cannot fit the fd limit: 80 sockets + {SUPERVISOR_FDS} for the supervisor"
        f" = {80 + SUPERVISOR_FDS} file descriptors, but RLIMIT_NOFILE is 128"
    )
    assert not list(tmp_path.glob("*.sock"))


def test_units_that_fit_the_fd_limit_run_within_it(tmp_path: Path) -> None:
    """At the edge of the budget, a worker each: every socket bound, every worker started."""
    units = 128 - SUPERVISOR_FDS
    proc = run_limited(tmp_path, 128, units, "--no-monitor", activation="eager")
    seen: list[dict[str, Any]] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.extend(events_of(line))
            if seen and seen[-1]["event"] == "ready":
                break
        else:
            raise AssertionError("the supervisor ended before ready")
        assert len(list(tmp_path.glob("*.sock"))) == units
        names = [e["event"] for e in seen]
        assert "worker_start_failed" not in names, [e for e in seen if e["level"] == "error"]
        assert names.count("worker_started") == units
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest = proc.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            rest = proc.communicate()[1]
    assert proc.returncode == 0, rest
