"""A unit's runner with real workers, in this process's own loop (no supervisor around it).

Each test builds a :class:`UnitRunner` with a real :class:`EventLoop` and fd
store, starts real worker processes and runs the loop until the event it
waits for, with a deadline (no sleeps). Children are reaped as the
supervisor reaps them: a :class:`ChildReaper` woken by SIGCHLD. What the runner tells the
supervisor (events, "this unit is idle") is recorded.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.binding import InheritedFds, bind_socket
from fdsupervisor.fdstore import FdStore
from fdsupervisor.loop import EventLoop
from fdsupervisor.notify import NotifyMessage, Sender
from fdsupervisor.reaper import ChildReaper
from fdsupervisor.runner import RunnerContext, UnitRunner, find_sender
from fdsupervisor.service import ServiceState
from fdsupervisor.signals import SignalWakeup
from fdsupervisor.units import load_unit_text
from fdsupervisor.upgrade import WorkerItem
from tests.recording_log import RecordingLog

PYTHON = sys.executable


@dataclass
class Harness:
    """One runner, the loop it lives in, and what it said upwards."""

    loop: EventLoop
    store: FdStore
    log: RecordingLog
    children: ChildReaper
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    idle: list[UnitRunner] = field(default_factory=list)
    take_over_idle: bool = False
    runners: list[UnitRunner] = field(default_factory=list)

    def runner(self, service: str, *, bind: bool = False) -> UnitRunner:
        lines = ['sockets: {http: {listen: "127.0.0.1:0"}}', "service:"]
        lines += [f"  {line}" for line in service.splitlines()]
        unit = load_unit_text("\n".join(lines) + "\n", Path("/units/web.yaml"), Path("/"))
        ctx = RunnerContext(
            loop=self.loop,
            store=self.store,
            environ={"PATH": os.environ.get("PATH", os.defpath)},
            log=self.log,
            emit=lambda event, data: self.events.append((event, data)),
            notify_address=lambda: None,
            cgroups=lambda: None,
            children=self.children,
            shutting_down=lambda: False,
            on_idle=self._on_idle,
        )
        runner = UnitRunner(unit, ctx)
        if bind:
            spec = unit.sockets[0]
            bound = bind_socket(spec, base_dir=unit.base_dir, inherited=InheritedFds(frozenset()))
            self.store.add(runner.owner, spec.name, bound)
        self.runners.append(runner)
        return runner

    def _on_idle(self, runner: UnitRunner) -> bool:
        self.idle.append(runner)
        return self.take_over_idle

    def run_until(self, done: Callable[[], bool], timeout: float = 15.0) -> None:
        deadline = self.loop.time() + timeout
        guard = self.loop.call_at(deadline, lambda: None)  # no wait outlasts the deadline
        try:
            while not done():
                assert self.loop.time() < deadline, "the runner did not get there in time"
                self.loop.run_once()
        finally:
            guard.cancel()

    def named(self, event: str) -> list[dict[str, Any]]:
        return [data for name, data in self.events if name == event]


@pytest.fixture
def harness() -> Iterator[Harness]:
    log = RecordingLog()
    h = Harness(EventLoop(), FdStore(), log, ChildReaper(log=log))
    wakeup = SignalWakeup([signal.SIGCHLD])
    h.loop.add_reader(wakeup.install(), lambda: (wakeup.drain(), h.children.reap()))
    yield h
    for runner in h.runners:  # whatever a failed test left running
        for pid in runner.service.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    h.take_over_idle = True
    h.run_until(lambda: not any(r.live_workers() for r in h.runners))
    for runner in h.runners:
        runner.close()
    wakeup.close()
    h.store.close_all()
    h.loop.close()


def exec_python(code: str) -> str:
    return f"exec: [{PYTHON}, -c, {code!r}]"


def test_a_worker_is_started_reaped_and_its_idle_unit_reported(harness: Harness) -> None:
    runner = harness.runner(exec_python("pass") + "\nrestart: no")
    runner.start()
    (started,) = harness.named("SERVICE_STARTED")
    assert runner.live_workers() == 1 and runner.service.pids == [started["pid"]]
    harness.run_until(lambda: bool(harness.named("SERVICE_EXITED")))
    assert harness.named("SERVICE_EXITED") == [{"unit": "web", "pid": started["pid"], "code": 0}]
    assert runner.live_workers() == 0 and runner.service.state is ServiceState.INACTIVE
    assert harness.idle == [runner]
    (exited,) = harness.log.events("worker_exited")
    assert exited["unit"] == "web" and exited["status"] == "code 0"


def test_restart_starts_the_new_worker_before_the_old_one_stops(harness: Harness) -> None:
    runner = harness.runner(exec_python("import time; time.sleep(60)"))
    runner.start()
    (old,) = runner.service.pids
    outcome: list[str | None] = []
    runner.restart(outcome.append)
    (_, started) = harness.named("SERVICE_STARTED")
    assert outcome == [None], "without notify a new worker counts as started at its spawn"
    assert runner.service.pids == sorted([old, started["pid"]]) and runner.service.started == 1
    assert harness.named("SERVICE_EXITED") == []
    harness.run_until(lambda: bool(harness.named("SERVICE_EXITED")))
    (exited,) = harness.named("SERVICE_EXITED")
    assert exited["pid"] == old and runner.service.pids == [started["pid"]]
    assert runner.service.state is ServiceState.RUNNING and harness.idle == []
    runner.stop()
    harness.run_until(lambda: runner.live_workers() == 0)


def test_restart_starts_again_once_the_old_worker_is_gone(harness: Harness) -> None:
    runner = harness.runner(exec_python("import time; time.sleep(60)") + "\noverlap: false")
    runner.start()
    (old,) = runner.service.pids
    runner.restart()
    harness.run_until(lambda: len(harness.named("SERVICE_STARTED")) == 2)
    (new,) = runner.service.pids
    assert new != old and runner.service.state is ServiceState.RUNNING
    assert harness.idle == [], "a pending restart is the runner's own: nobody takes it over"
    runner.stop()
    harness.run_until(lambda: runner.live_workers() == 0)
    assert runner.service.state is ServiceState.INACTIVE and harness.idle == [runner]


def test_a_worker_that_ignores_its_stop_signal_is_killed_after_stop_timeout(
    harness: Harness,
) -> None:
    # SIGWINCH's default action is to ignore it: the worker outlives its stop signal
    runner = harness.runner(
        exec_python("import time; time.sleep(60)") + "\nstop-signal: SIGWINCH\nstop-timeout: 200ms"
    )
    runner.start()
    (pid,) = runner.service.pids
    runner.stop()
    harness.run_until(lambda: runner.live_workers() == 0)
    assert harness.log.events("stop_timeout") == [{"unit": "web", "pid": pid, "signal": "SIGKILL"}]
    assert harness.named("SERVICE_EXITED") == [
        {"unit": "web", "pid": pid, "signal": signal.SIGKILL}
    ]


@pytest.mark.parametrize("taken_over", [False, True])
def test_an_idle_on_demand_unit_watches_again_unless_taken_over(
    harness: Harness, taken_over: bool
) -> None:
    harness.take_over_idle = taken_over
    runner = harness.runner(
        exec_python("import time; time.sleep(60)") + "\nactivation: on-demand", bind=True
    )
    (entry,) = harness.store.owned_by(runner.owner)
    runner.activate()
    assert runner.service.state is ServiceState.LISTENING and harness.loop.has_reader(entry.fd)
    runner.start()  # as service-start would
    assert not harness.loop.has_reader(entry.fd), "the worker takes the socket over"
    runner.stop()
    harness.run_until(lambda: runner.live_workers() == 0)
    assert harness.idle == [runner]
    if taken_over:  # a reload waited for it: what comes next is the reload's business
        assert runner.service.state is ServiceState.INACTIVE
        assert not harness.loop.has_reader(entry.fd)
    else:
        assert runner.service.state is ServiceState.LISTENING
        assert harness.loop.has_reader(entry.fd)


def test_ready_makes_the_service_running_and_ends_the_start_timeout(harness: Harness) -> None:
    runner = harness.runner(
        exec_python("import time; time.sleep(60)") + "\nnotify: true\nstart-timeout: 300ms"
    )
    runner.start()
    (pid,) = runner.service.pids
    assert runner.service.state is ServiceState.STARTING
    worker = runner.service.worker_by_pid(pid)
    assert worker is not None
    runner.notified(worker, NotifyMessage(ready=True, status="serving"), [])
    assert runner.service.state is ServiceState.RUNNING and runner.service.status == "serving"
    assert harness.named("SERVICE_READY") == [{"unit": "web", "pid": pid}]
    # past the start timeout, and still running: the deadline went with READY=1
    marker = harness.loop.call_later(0.6, lambda: None)
    harness.run_until(lambda: marker.when <= harness.loop.time())
    assert runner.service.pids == [pid] and harness.log.events("worker_killed") == []


def test_no_ready_by_the_start_timeout_fails_the_start(harness: Harness) -> None:
    runner = harness.runner(
        exec_python("import time; time.sleep(60)")
        + "\nnotify: true\nstart-timeout: 200ms\nrestart: no"
    )
    runner.start()
    (pid,) = runner.service.pids
    harness.run_until(lambda: runner.live_workers() == 0)
    assert harness.log.events("worker_killed") == [
        {"unit": "web", "pid": pid, "reason": "start timeout: no READY=1"}
    ]
    assert runner.service.state is ServiceState.FAILED


def test_a_child_in_the_workers_process_group_speaks_for_it(harness: Harness) -> None:
    """Sender attribution against the kernel's own process groups."""
    runner = harness.runner(exec_python("pass"))
    # A "worker" leading a session of its own, as spawn.py starts workers, with a child
    leader = subprocess.Popen(
        ["sh", "-c", "sleep 60 & echo $!; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
        text=True,
    )
    try:
        assert leader.stdout is not None
        child = int(leader.stdout.readline())
        runner.service.worker_started(0, leader.pid, harness.loop.time())
        found = find_sender(Sender(child), [runner])
        assert found is not None and found[0] is runner and found[1].pid == leader.pid
        assert find_sender(Sender(os.getpid()), [runner]) is None, "not of the worker's group"
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()
        runner.service.workers.clear()


def test_a_manual_start_while_a_restart_is_pending_starts_one_worker(
    harness: Harness, tmp_path: Path
) -> None:
    """The first worker crashes and its restart waits 300 ms; service-start meanwhile starts
    the instance at once, and the pending restart must not start a second worker for it."""
    marker = tmp_path / "crashed-once"
    code = (
        f"import os, sys, time; p = {str(marker)!r}\n"
        "if not os.path.exists(p): open(p, 'w').close(); sys.exit(1)\n"
        "time.sleep(60)"
    )
    runner = harness.runner(exec_python(code) + "\nrestart-delay: 300ms")
    runner.start()
    harness.run_until(lambda: bool(harness.named("SERVICE_EXITED")))
    assert runner.service.state is ServiceState.STARTING  # the restart waits its delay
    runner.start(manual=True)
    assert len(harness.named("SERVICE_STARTED")) == 2
    past_due = harness.loop.time() + 0.6  # the restart's due time, and some
    harness.run_until(lambda: harness.loop.time() >= past_due)
    assert len(harness.named("SERVICE_STARTED")) == 2, "one worker for the instance"
    assert runner.live_workers() == 1 and len(runner.service.pids) == 1
    runner.stop()
    harness.run_until(lambda: runner.live_workers() == 0)


def test_an_adopted_worker_that_exited_meanwhile_is_reported_by_its_runner(
    harness: Harness,
) -> None:
    """After an upgrade's exec the old workers are still our children: a zombie's exit
    status waits for its runner, which reports it as its worker's, not as an orphan's."""
    runner = harness.runner(exec_python("pass") + "\nrestart: no")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the "worker" the old program started
        os._exit(5)
    pidfd = os.pidfd_open(pid)
    try:
        assert select.select([pidfd], [], [], 10)[0], "the worker did not exit"
    finally:
        os.close(pidfd)
    assert runner.adopt_worker(WorkerItem(0, pid, harness.loop.time(), True))
    assert runner.service.pids == [pid]
    assert harness.children.reap() == [], "not an orphan's reap"
    assert runner.live_workers() == 0
    (exited,) = harness.log.events("worker_exited")
    assert exited["pid"] == pid and exited["status"] == "code 5"
    assert harness.log.events("orphan_reaped") == []


def test_a_process_that_is_not_our_child_is_not_adopted(harness: Harness) -> None:
    """Only a child's pid is held until we reap it: anything else is no worker of ours."""
    runner = harness.runner(exec_python("pass"))
    assert not runner.adopt_worker(WorkerItem(0, os.getppid(), harness.loop.time(), True))
    assert runner.service.pids == [] and runner.live_workers() == 0
