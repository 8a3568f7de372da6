"""The runner's pure parts: sender attribution, timers, and a unit's intake.

No process is started here: workers are plain numbers registered with the
service, the clock is a fake one, and the intake's host is a recording fake
(the intake knows its runner only as an ``IntakeHost``). Sockets are real
(bound on 127.0.0.1 by the kernel's choice of port). Runners with real
workers are in tests/integration/test_runner.py.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import tracemalloc
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.activation import Intake, StartOutcome
from fdsupervisor.binding import BoundSocket, InheritedFds, bind_socket
from fdsupervisor.fdstore import FdStore, unit_owner
from fdsupervisor.loop import ACCEPT_RETRY_DELAY, EventLoop
from fdsupervisor.notify import NotifyMessage, Sender
from fdsupervisor.reaper import ChildReaper
from fdsupervisor.runner import RunnerContext, Timers, UnitRunner, find_sender
from fdsupervisor.service import Service, ServiceState
from fdsupervisor.spawn import PassedFd
from fdsupervisor.units import Unit, load_unit_text
from tests.recording_log import RecordingLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_unit(name: str, service: str, listen: str = "127.0.0.1:0") -> Unit:
    lines = [f'sockets: {{http: {{listen: "{listen}"}}}}', "service:"]
    lines += [f"  {line}" for line in service.splitlines()]
    return load_unit_text("\n".join(lines) + "\n", Path(f"/units/{name}.yaml"), Path("/units"))


def make_context(loop: EventLoop | None = None, log: RecordingLog | None = None) -> RunnerContext:
    return RunnerContext(
        loop=loop or EventLoop(),
        store=FdStore(),
        environ={},
        log=log or RecordingLog(),
        emit=lambda event, data: None,
        notify_address=lambda: None,
        cgroups=lambda: None,
        children=ChildReaper(log=RecordingLog()),
        shutting_down=lambda: False,
        on_idle=lambda runner: False,
    )


def make_runner(
    name: str, loop: EventLoop | None = None, log: RecordingLog | None = None
) -> UnitRunner:
    return UnitRunner(make_unit(name, "exec: [worker]"), make_context(loop, log))


# -- sender attribution: the pid itself, then its process group --------------------------


def groups(table: Mapping[int, int]) -> Any:
    def getpgid(pid: int) -> int:
        try:
            return table[pid]
        except KeyError:
            raise ProcessLookupError(pid) from None

    return getpgid


def test_a_worker_speaks_for_itself() -> None:
    web, api = make_runner("web"), make_runner("api")
    web.service.worker_started(0, 1000, 0.0)
    api.service.worker_started(0, 2000, 0.0)
    found = find_sender(Sender(2000), [web, api], groups({}))
    assert found is not None and found[0] is api and found[1].pid == 2000


def test_a_process_of_the_workers_group_speaks_for_the_worker() -> None:
    web, api = make_runner("web"), make_runner("api")
    web.service.worker_started(0, 1000, 0.0)
    api.service.worker_started(3, 2000, 0.0)
    found = find_sender(Sender(2345), [web, api], groups({2345: 2000}))
    assert found is not None and found[0] is api
    assert (found[1].pid, found[1].instance) == (2000, 3)


def test_the_pid_itself_wins_over_its_group() -> None:
    """A worker that is also in another worker's group speaks for itself."""
    web, api = make_runner("web"), make_runner("api")
    web.service.worker_started(0, 1000, 0.0)
    api.service.worker_started(0, 2000, 0.0)
    found = find_sender(Sender(2000), [web, api], groups({2000: 1000}))
    assert found is not None and found[0] is api


@pytest.mark.parametrize(
    "pid, table",
    [
        (3000, {3000: 3000}),  # a process of its own group: nobody's
        (3000, {3000: 1}),  # a group no worker leads
        (3000, {}),  # gone before we asked (ESRCH)
    ],
)
def test_anyone_else_speaks_for_nobody(pid: int, table: dict[int, int]) -> None:
    web = make_runner("web")
    web.service.worker_started(0, 1000, 0.0)
    assert find_sender(Sender(pid), [web], groups(table)) is None


def test_no_runners_no_sender() -> None:
    assert find_sender(Sender(1000), [], groups({1000: 1000})) is None


# -- with the sender's pidfd (notify.Sender, pinned) -------------------------------------------


def cgroups(table: Mapping[int, int]) -> Any:
    return table.get


def test_a_reaped_sender_is_credited_by_the_cgroup_it_left() -> None:
    """Its pid and group are gone: the cgroup id its pidfd kept names the worker."""
    web, api = make_runner("web"), make_runner("api")
    web.service.worker_started(0, 1000, 0.0)
    api.service.worker_started(0, 2000, 0.0)
    gone = Sender(2345, pinned=True, running=False, cgroup_id=77)
    found = find_sender(gone, [web, api], groups({}), cgroups({77: 2000, 78: 1000}))
    assert found is not None and found[0] is api and found[1].pid == 2000


def test_a_reaped_sender_is_never_matched_by_its_pid_or_group() -> None:
    """Its pid may be a worker's by now (recycled): without its cgroup it is nobody's."""
    web = make_runner("web")
    web.service.worker_started(0, 1000, 0.0)
    recycled = Sender(1000, pinned=True, running=False, cgroup_id=None)
    assert find_sender(recycled, [web], groups({1000: 1000}), cgroups({})) is None
    elsewhere = Sender(1000, pinned=True, running=False, cgroup_id=5)
    assert find_sender(elsewhere, [web], groups({1000: 1000}), cgroups({77: 1000})) is None


def test_a_running_sender_uses_the_group_read_while_its_pidfd_pinned_it() -> None:
    """No lookup of the pid's group afterwards: by then the pid may be another's."""
    web = make_runner("web")
    web.service.worker_started(0, 1000, 0.0)
    pinned = Sender(2345, pinned=True, running=True, group=1000)
    found = find_sender(pinned, [web], groups({2345: 9}), cgroups({}))
    assert found is not None and found[1].pid == 1000
    unknown = Sender(2345, pinned=True, running=True, group=None)
    assert find_sender(unknown, [web], groups({2345: 1000}), cgroups({})) is None


def test_a_running_sender_of_the_workers_cgroup_speaks_for_it() -> None:
    """A child that left the worker's group (setsid) but not its cgroup."""
    web = make_runner("web")
    web.service.worker_started(0, 1000, 0.0)
    escaped = Sender(2345, pinned=True, running=True, group=2345, cgroup_id=77)
    found = find_sender(escaped, [web], groups({}), cgroups({77: 1000}))
    assert found is not None and found[1].pid == 1000


def test_the_runners_log_carries_its_unit() -> None:
    log = RecordingLog()
    runner = make_runner("web", log=log)
    runner.log.info("something", pid=1)
    assert log.lines == [("info", "something", {"unit": "web", "pid": 1})]


def test_a_unit_waiting_for_traffic_costs_its_runner_under_2_kb() -> None:
    """Issue 15, RSS at 10,000 units: what a runner keeps before its unit does anything.

    Measured with tracemalloc (the bytes Python keeps allocated, not time):
    3,661 bytes per runner before the cuts of docs/performance.md (a deque
    for the start limit, empty sets and dicts, a bound logger, per unit),
    1,457 after.
    """
    units = [make_unit(f"u{i}", "exec: [worker]\nactivation: on-demand") for i in range(200)]
    ctx = make_context()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        runners = [UnitRunner(unit, ctx) for unit in units]
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(runners) == len(units)
    assert kept / len(units) < 2000


# -- timers of one kind, one per key, on a fake clock -------------------------------------


def fired_after(loop: EventLoop, clock: FakeClock, seconds: float) -> None:
    """Move the fake clock on, and run the timers that are due by then (only those)."""
    clock.now += seconds
    if loop.poll_timeout() == 0.0:
        loop.run_once()


def step(loop: EventLoop) -> None:
    """One pass of the loop for what is readable now, waiting for it 5 s at most."""
    guard = loop.call_later(5.0, lambda: None)  # the fake clock never reaches it
    loop.run_once()
    guard.cancel()


def test_timers_one_per_key_and_a_new_one_replaces_the_old() -> None:
    clock = FakeClock()
    loop = EventLoop(clock)
    timers = Timers(loop)
    fired: list[str] = []
    timers.call_later(7, 1.0, lambda: fired.append("first"))
    timers.call_later(7, 2.0, lambda: fired.append("second"))
    timers.call_later(8, 1.5, lambda: (timers.fired(8), fired.append("other")))
    assert 7 in timers and 8 in timers
    fired_after(loop, clock, 1.6)
    assert fired == ["other"] and 8 not in timers
    fired_after(loop, clock, 1.0)
    assert fired == ["other", "second"]
    loop.close()


def test_timers_cancel_and_cancel_all() -> None:
    clock = FakeClock()
    loop = EventLoop(clock)
    timers = Timers(loop)
    fired: list[int] = []
    for key in (1, 2, 3):
        timers.call_at(key, clock.now + key, lambda key=key: fired.append(key))
    timers.cancel(2)
    timers.cancel(2)  # twice: nothing
    assert 2 not in timers
    fired_after(loop, clock, 1.5)
    timers.cancel_all()
    fired_after(loop, clock, 10)
    assert fired == [1] and 3 not in timers
    loop.close()


def test_timers_extend_only_ever_later() -> None:
    clock = FakeClock()
    loop = EventLoop(clock)
    timers = Timers(loop)
    fired: list[int] = []
    timers.call_later(1, 1.0, lambda: (timers.fired(1), fired.append(1)))
    assert not timers.extend(1, clock.now + 0.5), "an earlier deadline is ignored"
    assert not timers.extend(2, clock.now + 5), "no timer, nothing to extend"
    assert timers.extend(1, clock.now + 3)
    fired_after(loop, clock, 2)
    assert fired == [] and 1 in timers
    fired_after(loop, clock, 1.5)
    assert fired == [1], "the same callback, later"
    assert 2 not in timers
    loop.close()


# -- EXTEND_TIMEOUT_USEC=, on a fake clock ------------------------------------------------

# Above the kernel's PID_MAX_LIMIT (4194304): a stop signal to it reaches no process.
NO_SUCH_PID = 4_194_304 + 17


@dataclass
class Timed:
    runner: UnitRunner
    loop: EventLoop
    clock: FakeClock
    log: RecordingLog

    def notify(self, **fields: Any) -> None:
        worker = self.runner.service.worker_by_pid(NO_SUCH_PID)
        assert worker is not None
        self.runner.notified(worker, NotifyMessage(**fields), [])

    def after(self, seconds: float) -> None:
        fired_after(self.loop, self.clock, seconds)


@pytest.fixture
def timed() -> Iterator[Timed]:
    """A notify unit (start-timeout 10s, stop-timeout 5s) whose worker started at t=0."""
    clock = FakeClock()
    loop = EventLoop(clock)
    log = RecordingLog()
    ctx = make_context(loop, log)
    unit = make_unit("web", "exec: [worker]\nnotify: true\nstart-timeout: 10s\nstop-timeout: 5s")
    runner = UnitRunner(unit, ctx)
    runner._track(0, NO_SUCH_PID, [])
    yield Timed(runner, loop, clock, log)
    loop.close()


def killed(timed: Timed) -> list[str]:
    return [e["reason"] for e in timed.log.events("worker_killed")]


def test_extend_timeout_pushes_the_start_timeout_out_from_now(timed: Timed) -> None:
    timed.after(5)
    timed.notify(extend_timeout_usec=20_000_000)  # until t=25, not 10
    assert timed.log.events("timeout_extended")[-1]["timeouts"] == ["start"]
    timed.after(6)  # t=11: past the unit's start-timeout
    assert killed(timed) == []
    timed.notify(extend_timeout_usec=1_000_000)  # t=12 is earlier than 25: ignored
    assert len(timed.log.events("timeout_extended")) == 1
    timed.after(13.5)  # t=24.5
    assert killed(timed) == []
    timed.after(1)  # t=25.5: the message that should have come did not
    assert killed(timed) == ["start timeout: no READY=1"]


def test_extend_timeout_then_ready_is_started(timed: Timed) -> None:
    timed.notify(extend_timeout_usec=30_000_000)
    timed.after(20)
    timed.notify(ready=True)
    timed.after(60)
    assert killed(timed) == [] and timed.log.events("service_ready")


def test_extend_timeout_while_stopping_pushes_the_stop_timeout(timed: Timed) -> None:
    timed.notify(ready=True)
    timed.runner.stop_worker(NO_SUCH_PID)
    timed.after(2)
    timed.notify(extend_timeout_usec=10_000_000)  # SIGKILL at t=12, not t=5
    assert timed.log.events("timeout_extended")[-1]["timeouts"] == ["stop"]
    timed.after(9)
    assert timed.log.events("stop_timeout") == []
    timed.after(1.5)
    assert [e["pid"] for e in timed.log.events("stop_timeout")] == [NO_SUCH_PID]


@pytest.mark.parametrize("usec", [0, (1 << 64) - 1])
def test_extend_timeout_of_zero_or_infinity_means_nothing(timed: Timed, usec: int) -> None:
    """systemd's service_extend_timeout(): timestamp_is_set() is false for both."""
    timed.notify(extend_timeout_usec=usec)
    assert timed.log.events("timeout_extended") == []
    timed.after(10.5)
    assert killed(timed) == ["start timeout: no READY=1"]


def test_an_extension_past_a_year_is_clamped_and_the_loop_lives(timed: Timed) -> None:
    timed.notify(extend_timeout_usec=(1 << 64) - 2)
    clamped = timed.log.events("notify_clamped")
    assert clamped and clamped[0]["key"] == "EXTEND_TIMEOUT_USEC"
    assert timed.loop.poll_timeout() is not None
    timed.after(10 * 365 * 86400)
    assert killed(timed) == ["start timeout: no READY=1"]


# -- the intake, with a recording host -----------------------------------------------------


@dataclass
class FakeHost:
    """An IntakeHost: records what the intake asks of its runner."""

    unit: Unit
    service: Service
    log: RecordingLog = field(default_factory=RecordingLog)
    starts: list[bool] = field(default_factory=list)
    workers: list[tuple[int, list[PassedFd], dict[str, str], int | None]] = field(
        default_factory=list
    )
    next_pid: int = 5000

    def start(self, *, manual: bool = True) -> None:
        self.starts.append(manual)

    def start_worker(
        self,
        instance: int,
        passed: Sequence[PassedFd],
        *,
        extra_env: Mapping[str, str] | None = None,
        stdio_fd: int | None = None,
    ) -> StartOutcome:
        self.workers.append((instance, list(passed), dict(extra_env or {}), stdio_fd))
        self.service.worker_started(instance, self.next_pid, 0.0)
        self.next_pid += 1
        return "started"


@dataclass
class Setup:
    host: FakeHost
    intake: Intake
    loop: EventLoop
    clock: FakeClock
    store: FdStore
    bound: BoundSocket

    @property
    def port(self) -> int:
        port: int = self.bound.sock.getsockname()[1]
        return port


def setup_intake(service: str, sock_class: type[socket.socket] | None = None) -> Setup:
    unit = make_unit("web", service)
    clock = FakeClock()
    loop = EventLoop(clock)
    store = FdStore()
    bound = bind_socket(
        unit.sockets[0], base_dir=unit.base_dir, inherited=InheritedFds(frozenset())
    )
    if sock_class is not None:
        bound = dataclasses.replace(bound, sock=sock_class(fileno=bound.sock.detach()))
    store.add(unit_owner(unit.name), "http", bound)
    host = FakeHost(unit, Service(unit.name, unit.service))
    return Setup(host, Intake(host, loop, store, lambda: False), loop, clock, store, bound)


@pytest.fixture
def cleanup() -> Iterator[list[Setup]]:
    setups: list[Setup] = []
    yield setups
    for setup in setups:
        setup.store.close_all()
        setup.loop.close()


def test_on_demand_waits_for_traffic_then_has_the_service_started(cleanup: list[Setup]) -> None:
    s = setup_intake("exec: [worker]\nactivation: on-demand")
    cleanup.append(s)
    s.intake.watch()
    assert s.intake.watching and s.host.service.state is ServiceState.LISTENING
    assert s.loop.has_reader(s.bound.fileno())
    with socket.create_connection(("127.0.0.1", s.port)):
        step(s.loop)
    assert s.host.starts == [False]  # an automatic start: the start limit counts it
    assert s.host.log.events("traffic") == [{"action": "started service"}]
    s.intake.unwatch()  # the service takes the sockets over
    assert not s.intake.watching and not s.loop.has_reader(s.bound.fileno())


def test_an_eager_unit_is_never_watched(cleanup: list[Setup]) -> None:
    s = setup_intake("exec: [worker]")
    cleanup.append(s)
    s.intake.watch()
    assert not s.intake.watching and not s.loop.has_reader(s.bound.fileno())
    assert s.host.service.state is ServiceState.INACTIVE


def test_a_socket_added_while_watching_is_watched_too(cleanup: list[Setup]) -> None:
    s = setup_intake("exec: [worker]\nactivation: on-demand")
    cleanup.append(s)
    a, b = socket.socketpair()
    with a, b:
        s.intake.socket_added(a.fileno())  # not watching yet: nothing
        assert not s.loop.has_reader(a.fileno())
        s.intake.watch()
        s.intake.socket_added(a.fileno())
        assert s.loop.has_reader(a.fileno())
        s.intake.socket_removed(a.fileno())
        assert not s.loop.has_reader(a.fileno())


def test_accept_mode_one_worker_per_connection_with_its_peer(cleanup: list[Setup]) -> None:
    s = setup_intake("exec: [worker]\naccept: true\nmax-connections: 2")
    cleanup.append(s)
    s.intake.start_accepting()
    assert s.intake.accepting and not s.bound.sock.getblocking()
    with socket.create_connection(("127.0.0.1", s.port)) as client:
        step(s.loop)
        ((instance, passed, env, stdio),) = s.host.workers
        assert instance == 0 and [p.name for p in passed] == ["connection"]
        assert env == {"REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": str(client.getsockname()[1])}
        assert stdio is None  # inetd: false
    assert s.host.service.connections == 1


def test_inetd_passes_the_connection_as_stdio(cleanup: list[Setup]) -> None:
    s = setup_intake("exec: [worker]\naccept: true\ninetd: true")
    cleanup.append(s)
    s.intake.start_accepting()
    with socket.create_connection(("127.0.0.1", s.port)):
        step(s.loop)
    ((_instance, passed, _env, stdio),) = s.host.workers
    assert stdio == passed[0].fd


def test_at_max_connections_the_rest_wait_in_the_backlog(cleanup: list[Setup]) -> None:
    s = setup_intake("exec: [worker]\naccept: true\nmax-connections: 1")
    cleanup.append(s)
    s.intake.start_accepting()
    first = socket.create_connection(("127.0.0.1", s.port))
    second = socket.create_connection(("127.0.0.1", s.port))
    with first, second:
        step(s.loop)
        assert len(s.host.workers) == 1
        assert not s.loop.has_reader(s.bound.fileno()), "paused: the second waits, not refused"
        s.intake.worker_exited()  # the one worker is still there: stays paused
        assert not s.loop.has_reader(s.bound.fileno())
        s.host.service.workers.clear()  # its worker exited
        s.intake.worker_exited()
        assert s.loop.has_reader(s.bound.fileno())
        step(s.loop)
        assert len(s.host.workers) == 2


class OutOfFds(socket.socket):
    """A listening socket whose accept() fails as a process out of fds does."""

    def accept(self) -> tuple[socket.socket, Any]:
        raise OSError(errno.EMFILE, "Too many open files")


def test_out_of_fds_pauses_and_tries_again_later(cleanup: list[Setup]) -> None:
    s = setup_intake("exec: [worker]\naccept: true", OutOfFds)
    cleanup.append(s)
    s.intake.start_accepting()
    with socket.create_connection(("127.0.0.1", s.port)):
        step(s.loop)
        assert [e["error"] for e in s.host.log.events("accept_failed")] == [
            "[Errno 24] Too many open files"
        ]
        assert not s.loop.has_reader(s.bound.fileno()), "no spinning on the backlog"
        fired_after(s.loop, s.clock, ACCEPT_RETRY_DELAY / 2)
        assert not s.loop.has_reader(s.bound.fileno())
        fired_after(s.loop, s.clock, ACCEPT_RETRY_DELAY)
        assert s.loop.has_reader(s.bound.fileno())


def test_a_stopped_service_does_not_accept_again_when_its_retry_falls_due(
    cleanup: list[Setup],
) -> None:
    s = setup_intake("exec: [worker]\naccept: true", OutOfFds)
    cleanup.append(s)
    s.intake.start_accepting()
    with socket.create_connection(("127.0.0.1", s.port)):
        step(s.loop)
        s.intake.suspend()  # service-stop, or a reload moving the socket
        assert not s.intake.accepting
        fired_after(s.loop, s.clock, ACCEPT_RETRY_DELAY * 2)
        assert not s.loop.has_reader(s.bound.fileno())
        assert s.host.workers == []


def test_stop_accepting_leaves_connections_waiting(cleanup: list[Setup]) -> None:
    s = setup_intake("exec: [worker]\naccept: true")
    cleanup.append(s)
    s.intake.start_accepting()
    s.intake.stop_accepting()
    assert not s.loop.has_reader(s.bound.fileno())
    with socket.create_connection(("127.0.0.1", s.port)):
        s.intake.start_accepting()
        step(s.loop)
    assert len(s.host.workers) == 1
