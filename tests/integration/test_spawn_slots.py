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
import socket
from pathlib import Path

from tests.conftest import PYTHON
from tests.integration.test_spawn_paths import fd_table_size
from tests.integration.test_systemd_protocol import EXEC_AS_SYSTEMD
from tests.monitor_client import RawClient

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


def test_fds_inherited_by_number_move_up_and_leave_the_low_numbers_to_the_slots(
    supervisor, tmp_path: Path
) -> None:
    """After ``systemctl restart`` systemd passes the whole store back from fd 3 on; a
    unit may name inherited fds by number. They are moved above the highest, each still
    known by the number it came as, and the slots take the numbers they left."""
    listeners = []
    for i in range(BALLAST):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(tmp_path / f"i{i}.sock"))
        listener.listen()
        listeners.append(listener)
    numbers = [listener.fileno() for listener in listeners]
    # As systemd passes them: at 3, 4, ..., so that no low number is free.
    as_systemd = (PYTHON, "-c", EXEC_AS_SYSTEMD, ",".join(map(str, numbers)))
    sockets = "\n".join(f'  s{i}: {{listen: {{type: fd, str: "{3 + i}"}}}}' for i in range(BALLAST))
    ballast = f"sockets:\n{sockets}\nservice:\n  exec: [sleep, '600']\n  activation: on-demand\n"
    units_ = {"a-ballast": ballast, "web": units()["web"]}
    (tmp_path / "units" / "run").mkdir(parents=True)
    try:
        sup = supervisor(units_, pass_fds=numbers, prefix=as_systemd)
    finally:
        for listener in listeners:
            listener.close()  # the supervisor has its own copies
    pid = sup.wait_for("worker_started", unit="web")["pid"]
    assert fd_table_size(pid) <= 128, "the inherited fds sat below the slots"
    with RawClient(sup.monitor_path).negotiate() as client:
        fds = client.command("query-fds")["return"]
    by_name = {(e["owner"], e["fdname"]): e for e in fds}
    for i in (0, BALLAST // 2, BALLAST - 1):  # each socket is the one named by its number
        entry = by_name[("unit:a-ballast", f"s{i}")]
        assert entry["address"] == f"unix:{tmp_path / f'i{i}.sock'}", entry
    assert sup.stop() == 0
