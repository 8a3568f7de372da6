"""A worker's start copies no fd table, however many sockets the supervisor holds.

The kernel copied the supervisor's whole fd table into each new worker (at
clone(), and again at exec), so a start cost grew with the number of units
(issue 15). Through the spawn slots (spawn_slots.py) the worker's table holds
only what lies below them: its size (``FDSize:`` in /proc/PID/status) stays
small with 600 sockets open, and after an upgrade too, where the new program
reserves its own slots in the numbers the old one's left free.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.integration.test_spawn_paths import fd_table_size

BALLAST = 600  # sockets of an on-demand unit, bound before the worker's own


def units() -> dict[str, str]:
    sockets = "\n".join(
        f"  s{i}: {{listen: {{type: unix, path: run/s{i}.sock}}}}" for i in range(BALLAST)
    )
    return {
        "a-ballast": f"sockets:\n{sockets}\nservice:\n  exec: [sleep, '600']\n"
        "  activation: on-demand\n",
        "web": "sockets:\n  http: {listen: {type: unix, path: run/web.sock}}\n"
        "service:\n  exec: [sleep, '600']\n  restart: always\n",
    }


def test_a_worker_gets_a_small_fd_table_before_and_after_an_upgrade(
    supervisor, tmp_path: Path
) -> None:
    (tmp_path / "units" / "run").mkdir(parents=True)
    sup = supervisor(units())
    pid = sup.wait_for("worker_started", unit="web")["pid"]
    held = len(os.listdir(f"/proc/{sup.pid}/fd"))
    assert held > BALLAST
    assert fd_table_size(pid) <= 128, "the supervisor's table was copied into the worker"

    mark = sup.mark()
    os.kill(sup.pid, signal.SIGUSR2)
    sup.wait_for("upgraded", after=mark, timeout=30)
    os.kill(pid, signal.SIGKILL)
    again = sup.wait_for("worker_started", unit="web", after=mark)["pid"]
    assert fd_table_size(again) <= 128, "after the upgrade, the table was copied again"
    assert sup.stop() == 0
