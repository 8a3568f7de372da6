"""What a real worker inherits of the supervisor's environment, and what it never does.

The supervisor's own protocol variables (``fdpassing.SUPERVISOR_ONLY_ENV``)
describe what its parent gave it. Under systemd >= 257 that includes
``LISTEN_PIDFDID`` and, >= 254, ``FDSTORE``: a worker that inherited them would
believe it had systemd's fd store or fds of its own from systemd.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import FORK_SPAWN, PYTHON

PRINT_ENVIRONMENT = (
    "import json, os, socket\n"
    "print('worker-env ' + json.dumps(dict(os.environ)), flush=True)\n"
    "s = socket.socket(fileno=3)\n"
    "while True: s.accept()[0].close()\n"
)

UNIT = f"""
sockets:
  http: {{listen: "127.0.0.1:0"}}
service:
  exec: [{PYTHON}, -c, {json.dumps(PRINT_ENVIRONMENT)}]
  environment: {{APP_FROM_UNIT: "1"}}
"""

# What systemd would have set for the supervisor (systemd.exec(5)); LISTEN_PID
# is not the supervisor's pid, so none of it is taken as fds for the supervisor.
SYSTEMDS_VARIABLES = {
    "LISTEN_PID": "1",
    "LISTEN_FDS": "2",
    "LISTEN_FDNAMES": "a:b",
    "LISTEN_PIDFDID": "4242",
    "FDSTORE": "16",
    "WATCHDOG_USEC": "30000000",
    "WATCHDOG_PID": "1",
}


@pytest.mark.parametrize("spawn_env", [{}, FORK_SPAWN], ids=["default", "fork"])
def test_a_worker_never_inherits_the_supervisors_protocol_variables(
    supervisor, spawn_env: dict[str, str]
) -> None:
    sup = supervisor(
        {"web": UNIT},
        env={**SYSTEMDS_VARIABLES, "APP_FROM_SUPERVISOR": "kept", **spawn_env},
    )
    started = sup.wait_for("worker_started", unit="web")
    line = sup.wait_output("worker-env ")
    env = json.loads(line.split("worker-env ", 1)[1])
    assert "LISTEN_PIDFDID" not in env
    assert "FDSTORE" not in env
    assert "WATCHDOG_USEC" not in env and "WATCHDOG_PID" not in env
    # the worker's own protocol variables, not the supervisor's
    assert (env["LISTEN_PID"], env["LISTEN_FDS"], env["LISTEN_FDNAMES"]) == (
        str(started["pid"]),
        "1",
        "http",
    )
    assert env["APP_FROM_SUPERVISOR"] == "kept"
    assert env["APP_FROM_UNIT"] == "1"
