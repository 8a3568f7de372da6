"""The service state machine, driven with plain numbers for time."""

from __future__ import annotations

import signal

import pytest

from fdsupervisor.service import (
    STABLE_UPTIME,
    ExitStatus,
    Failed,
    Restart,
    Service,
    ServiceState,
    StartLimit,
    wants_restart,
)
from fdsupervisor.units import RestartPolicy, ServiceSpec


def make(**overrides: object) -> Service:
    spec = ServiceSpec(exec=("worker",), **overrides)  # type: ignore[arg-type]
    return Service("web", spec)


KILLED = ExitStatus(signal=signal.SIGKILL)
TERMINATED = ExitStatus(signal=signal.SIGTERM)
OK = ExitStatus(code=0)
FAILED = ExitStatus(code=3)


@pytest.mark.parametrize(
    ("policy", "status", "expected"),
    [
        (RestartPolicy.NO, KILLED, False),
        (RestartPolicy.NO, FAILED, False),
        (RestartPolicy.ON_FAILURE, KILLED, True),
        (RestartPolicy.ON_FAILURE, FAILED, True),
        (RestartPolicy.ON_FAILURE, OK, False),
        (RestartPolicy.ON_FAILURE, TERMINATED, False),  # a clean signal, as in systemd
        (RestartPolicy.ON_FAILURE, ExitStatus(signal=signal.SIGPIPE), False),
        (RestartPolicy.ON_FAILURE, ExitStatus(signal=signal.SIGSEGV), True),
        (RestartPolicy.ALWAYS, OK, True),
        (RestartPolicy.ALWAYS, TERMINATED, True),
    ],
)
def test_restart_policy(policy: RestartPolicy, status: ExitStatus, expected: bool) -> None:
    assert wants_restart(policy, status) is expected


def test_exit_status_from_wait_status() -> None:
    assert ExitStatus.from_wait_status(3 << 8) == ExitStatus(code=3)
    assert ExitStatus.from_wait_status(signal.SIGKILL) == KILLED
    assert KILLED.as_dict() == {"signal": 9}
    assert FAILED.as_dict() == {"code": 3}
    assert str(KILLED) == "signal SIGKILL"


def test_start_makes_every_instance_and_running() -> None:
    service = make(instances=3)
    assert service.request_start(0.0, manual=False)
    assert service.state is ServiceState.STARTING
    assert service.instances_to_start() == [0, 1, 2]
    for i in range(3):
        service.worker_started(i, 100 + i, 0.0)
    assert service.state is ServiceState.RUNNING
    assert service.pids == [100, 101, 102]
    assert service.instances_to_start() == []


def test_backoff_doubles_for_quick_failures_and_caps() -> None:
    service = make(restart_delay=0.1, restart_delay_max=0.5, start_limit_burst=100)
    service.request_start(0.0, manual=False)
    now, delays = 0.0, []
    for pid in range(1, 7):
        service.worker_started(0, pid, now)
        decision = service.worker_exited(pid, KILLED, now + 0.01)
        assert isinstance(decision, Restart)
        delays.append(decision.delay)
        now = decision.at
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert service.restarts == 6


def test_backoff_resets_after_a_stable_run() -> None:
    service = make(restart_delay=0.1, start_limit_burst=100)
    service.request_start(0.0, manual=False)
    service.worker_started(0, 1, 0.0)
    first = service.worker_exited(1, KILLED, 0.01)
    assert isinstance(first, Restart)
    service.worker_started(0, 2, 0.2)
    second = service.worker_exited(2, KILLED, 0.21)
    assert isinstance(second, Restart) and second.delay == pytest.approx(0.2)
    service.worker_started(0, 3, 1.0)
    third = service.worker_exited(3, KILLED, 1.0 + STABLE_UPTIME)
    assert isinstance(third, Restart) and third.delay == pytest.approx(0.1)


def test_start_limit_fails_the_service() -> None:
    service = make(start_limit_burst=3, start_limit_interval=10.0, restart_delay=0.0)
    assert service.request_start(0.0, manual=False)  # start 1
    decisions = []
    for pid in range(1, 4):
        service.worker_started(0, pid, float(pid))
        decisions.append(service.worker_exited(pid, FAILED, float(pid) + 0.5))
    # three starts are allowed in the window: the first and two restarts
    assert [type(d) for d in decisions] == [Restart, Restart, Failed]
    assert service.state is ServiceState.FAILED
    assert service.failure is not None and "start limit" in service.failure


def test_start_limit_window_slides() -> None:
    limit = StartLimit(burst=2, interval=10.0)
    assert limit.allow(0.0)
    assert limit.allow(1.0)
    assert not limit.allow(5.0)
    assert limit.allow(10.0)  # the start at 0.0 left the window
    assert not limit.allow(10.5)


def test_manual_start_clears_failure_and_limit() -> None:
    service = make(start_limit_burst=1, restart_delay=0.0)
    service.request_start(0.0, manual=False)
    service.worker_started(0, 1, 0.0)
    assert isinstance(service.worker_exited(1, FAILED, 0.1), Failed)
    assert service.state is ServiceState.FAILED
    assert service.request_start(0.2, manual=True)
    assert service.state is ServiceState.STARTING and service.failure is None


def test_restart_no_leaves_failed_or_inactive() -> None:
    service = make(restart=RestartPolicy.NO)
    service.request_start(0.0, manual=False)
    service.worker_started(0, 1, 0.0)
    assert service.worker_exited(1, FAILED, 1.0) is None
    assert service.state is ServiceState.FAILED
    service.request_start(2.0, manual=True)
    service.worker_started(0, 2, 2.0)
    assert service.worker_exited(2, OK, 3.0) is None
    assert service.state is ServiceState.INACTIVE
    assert service.last_exit == OK


def test_stop_never_restarts() -> None:
    service = make(restart=RestartPolicy.ALWAYS, instances=2)
    service.request_start(0.0, manual=False)
    service.worker_started(0, 1, 0.0)
    service.worker_started(1, 2, 0.0)
    assert service.request_stop() == [1, 2]
    assert service.state is ServiceState.STOPPING
    assert service.worker_exited(1, TERMINATED, 1.0) is None
    assert service.state is ServiceState.STOPPING
    assert service.worker_exited(2, KILLED, 1.0) is None
    assert service.state is ServiceState.INACTIVE


def test_unknown_pid_is_ignored() -> None:
    service = make()
    assert service.worker_exited(999, KILLED, 0.0) is None


def test_describe_has_the_spec_shape() -> None:
    service = make()
    service.request_start(0.0, manual=False)
    service.worker_started(0, 42, 0.0)
    service.worker_exited(42, KILLED, 0.5)
    assert service.describe() == {
        "unit": "web",
        "state": "starting",
        "pids": [],
        "restarts": 1,
        "last-exit": {"signal": 9},
        "status": None,
    }
