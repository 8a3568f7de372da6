"""The service state machine, driven with plain numbers for time."""

from __future__ import annotations

import signal

import pytest

from fdsupervisor.service import (
    RESOURCE_RETRY_DELAY_MAX,
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
        "started": 0,
        "restarts": 1,
        "last-exit": {"signal": 9},
        "status": None,
    }


# -- starts that could not create a worker (out of fds): issue 9, item 9 ---------------------


def spawn_failures(service: Service, count: int, start: float = 0.0) -> list[Restart]:
    """``count`` spawns of instance 0 in a row that fail, each retried when it is due."""
    decisions, now = [], start
    for _ in range(count):
        decision = service.spawn_failed(0, now)
        assert isinstance(decision, Restart), decision
        decisions.append(decision)
        now = decision.at
    return decisions


def test_resource_failures_do_not_count_toward_the_start_limit() -> None:
    """A second without fds used to burn burst 5 in 0.8 s and fail the service for good."""
    # the window spans the whole shortage: had the retries counted, the 5th would fail it
    service = make(restart_delay=0.1, start_limit_burst=5, start_limit_interval=1000.0)
    assert service.request_start(0.0, manual=False)  # 1 start of 5
    decisions = spawn_failures(service, 50)
    assert decisions[-1].at < 1000.0
    assert service.state is ServiceState.STARTING and service.failure is None
    # once fds are free, the retry that is due creates the worker
    service.worker_started(0, 100, decisions[-1].at)
    assert service.state is ServiceState.RUNNING
    # and the start limit is as it was before the shortage: 4 more starts are allowed
    now = decisions[-1].at
    for pid in range(101, 105):
        decision = service.worker_exited(pid - 1, KILLED, now + 0.01)
        assert isinstance(decision, Restart)
        now = decision.at
        service.worker_started(0, pid, now)
    assert isinstance(service.worker_exited(104, KILLED, now + 0.01), Failed)


def test_resource_failures_back_off_exponentially_up_to_a_few_seconds() -> None:
    service = make(restart_delay=0.1)
    service.request_start(0.0, manual=False)
    delays = [d.delay for d in spawn_failures(service, 9)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert RESOURCE_RETRY_DELAY_MAX == 5.0


@pytest.mark.parametrize(
    ("restart_delay", "restart_delay_max", "expected"),
    [
        (0.0, 30.0, [0.1, 0.2, 0.4, 0.8]),  # restart-delay 0 must not spin while out of fds
        (0.1, 0.3, [0.1, 0.2, 0.3, 0.3]),  # a smaller restart-delay-max caps it
        (2.0, 30.0, [2.0, 4.0, 5.0, 5.0]),
        (8.0, 30.0, [8.0, 8.0, 8.0, 8.0]),  # never shorter than restart-delay
    ],
)
def test_the_resource_backoff_follows_the_units_delays(
    restart_delay: float, restart_delay_max: float, expected: list[float]
) -> None:
    service = make(restart_delay=restart_delay, restart_delay_max=restart_delay_max)
    service.request_start(0.0, manual=False)
    assert [d.delay for d in spawn_failures(service, 4)] == pytest.approx(expected)


def test_a_worker_that_starts_resets_the_resource_backoff() -> None:
    service = make(restart_delay=0.1)
    service.request_start(0.0, manual=False)
    last = spawn_failures(service, 5)[-1]
    service.worker_started(0, 100, last.at)
    service.worker_exited(100, KILLED, last.at + 5.0)  # a stable run, then a crash
    assert [d.delay for d in spawn_failures(service, 2, last.at + 5.1)] == [0.1, 0.2]


def test_a_shortage_of_a_thousand_retries_never_overflows() -> None:
    """2.0 ** 1024 raises OverflowError: the exponent must stop growing."""
    service = make(restart_delay=0.1, start_limit_interval=0.0)
    service.request_start(0.0, manual=False)
    assert spawn_failures(service, 1100)[-1].delay == RESOURCE_RETRY_DELAY_MAX
    now = 0.0
    for pid in range(1, 1100):  # a crash loop with no start limit
        service.worker_started(0, pid, now)
        decision = service.worker_exited(pid, KILLED, now + 0.01)
        assert isinstance(decision, Restart)
        now = decision.at
    assert decision.delay == service.spec.restart_delay_max


def test_restart_no_or_a_stop_makes_a_resource_failure_final() -> None:
    service = make(restart=RestartPolicy.NO)
    service.request_start(0.0, manual=False)
    assert isinstance(service.spawn_failed(0, 0.0), Failed)
    assert service.state is ServiceState.FAILED
    stopping = make()
    stopping.request_start(0.0, manual=False)
    stopping.worker_started(1, 7, 0.0)
    stopping.request_stop()
    assert isinstance(stopping.spawn_failed(0, 0.0), Failed)
