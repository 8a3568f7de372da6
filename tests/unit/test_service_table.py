"""The service's transition table: every (state, event) pair, and random runs with a fake clock.

Plain numbers only: no process, socket or sleep. ``FakeSupervisor`` calls a
:class:`Service` the way supervisor.py does (start, stop, restart, fail, reap,
restart timers, on-demand watch, accept, notify, upgrade), so the property tests
walk the sequences the supervisor can produce and check what must hold after
every step.
"""

from __future__ import annotations

import ast
import errno
import inspect
import itertools
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdsupervisor import service as service_module
from fdsupervisor.rolling import RollingRestart
from fdsupervisor.service import (
    SAVED,
    STAY,
    TRANSITIONS,
    ExitStatus,
    Failed,
    ReplacementFailed,
    Restart,
    Service,
    ServiceEvent,
    ServiceState,
    ServiceStateError,
    Target,
)
from fdsupervisor.units import Activation, RestartPolicy, ServiceSpec

E, S = ServiceEvent, ServiceState
UP = (S.LISTENING, S.STARTING, S.RUNNING)


def make(**overrides: object) -> Service:
    spec = ServiceSpec(exec=("worker",), **overrides)  # type: ignore[arg-type]
    return Service("web", spec)


# -- the table as the module docstring draws it -------------------------------------------------


def label(target: Target | None) -> str:
    """A table cell as the docstring writes it."""
    if target is None:
        return "!"
    if target is STAY:
        return "="
    if target is SAVED:
        return "saved"
    if isinstance(target, ServiceState):
        return target.value
    return {"_activated": "activated", "_by_workers": "workers"}.get(
        target.__name__, target.__name__
    )


def docstring_grid() -> dict[tuple[ServiceState, ServiceEvent], str]:
    """The grid of the module docstring: listening, starting and running share a column."""
    doc = service_module.__doc__
    assert doc is not None
    lines = doc.splitlines()
    first = next(i for i, line in enumerate(lines) if line.split()[:2] == ["event", "inactive"])
    grid = {}
    for line in lines[first + 3 :]:
        if not line.strip():
            break
        name, inactive, up, stopping, failed = line.split()
        event = ServiceEvent[name]
        grid[S.INACTIVE, event] = inactive
        for state in UP:
            grid[state, event] = up
        grid[S.STOPPING, event] = stopping
        grid[S.FAILED, event] = failed
    return grid


def test_every_state_and_event_has_a_defined_outcome() -> None:
    assert set(TRANSITIONS) == set(ServiceState)
    for state, row in TRANSITIONS.items():
        assert set(row) <= set(ServiceEvent), state
    grid = docstring_grid()
    assert set(grid) == set(itertools.product(ServiceState, ServiceEvent))
    table = {(s, e): label(TRANSITIONS[s].get(e)) for s, e in grid}
    assert table == grid  # the docstring draws the table that runs


def test_what_cannot_happen_is_exactly_what_the_public_api_never_fires() -> None:
    impossible = {pair for pair, cell in docstring_grid().items() if cell == "!"}
    after_an_exit = {
        E.CONNECTION_ENDED,
        E.WORKER_EXITED,
        E.WORKER_FAILED,
        E.RESTART_SCHEDULED,
        E.START_LIMIT_HIT,
        E.REPLACEMENT_FAILED,
    }
    assert impossible == (
        {(s, E.RESTORED) for s in ServiceState if s is not S.INACTIVE}
        | {(s, e) for s in (S.INACTIVE, S.STOPPING, S.FAILED) for e in after_an_exit}
        | {(S.STOPPING, E.SPAWN_RETRY)}
    )


# -- each cell does what its label says ---------------------------------------------------------

# (accept, notify, workers as their ready flags): no worker, one not ready, all ready, mixed
CONFIGURATIONS = [
    (accept, notify, ready)
    for accept in (False, True)
    for notify in (False, True)
    for ready in ((), (False,), (True, True), (True, False))
    if notify or all(ready)  # without notify every worker is ready
]


def expected(
    cell: str, before: ServiceState, accept: bool, ready: tuple[bool, ...]
) -> ServiceState:
    """What a cell means, as the module docstring's legend says it in words."""
    if cell == "=":
        return before
    if cell == "saved":
        return S.RUNNING  # what the tests hand over
    if cell == "activated":
        return S.LISTENING if accept else S.STARTING
    if cell == "workers":
        if accept:
            return S.RUNNING if ready else S.LISTENING
        if not ready:
            return before
        return S.RUNNING if all(ready) else S.STARTING
    if cell.startswith("last:"):
        return before if ready else ServiceState(cell.removeprefix("last:"))
    return ServiceState(cell)


def in_state(
    state: ServiceState, *, accept: bool, notify: bool, ready: tuple[bool, ...]
) -> Service:
    service = make(accept=accept, notify=notify)
    service.restore(
        state, restarts=0, last_exit=None, status=None, failure="as saved", connections=0
    )
    for instance, is_ready in enumerate(ready):
        service.adopt_worker(instance, 100 + instance, 0.0, ready=is_ready, failure=None)
    assert service.state is state
    return service


@pytest.mark.parametrize("state", list(ServiceState))
@pytest.mark.parametrize("event", list(ServiceEvent))
def test_each_transition_does_what_the_table_says(state: ServiceState, event: ServiceEvent) -> None:
    cell = docstring_grid()[state, event]
    for accept, notify, ready in CONFIGURATIONS:
        service = in_state(state, accept=accept, notify=notify, ready=ready)
        if cell == "!":
            with pytest.raises(ServiceStateError, match=f"{event.name} cannot happen"):
                service._apply(event, failure="why", saved=S.RUNNING)
            assert service.state is state  # nothing changed
            continue
        after = service._apply(event, failure="why", saved=S.RUNNING)
        assert after is service.state is expected(cell, state, accept, ready), (
            accept,
            notify,
            ready,
        )
        # a reason is recorded exactly when the service lands in failed
        landed_failed = after is S.FAILED and cell != "="
        assert service.failure == ("why" if landed_failed else "as saved")


def test_restored_needs_the_saved_state() -> None:
    with pytest.raises(ServiceStateError, match="without a state"):
        make()._apply(E.RESTORED)


def test_only_apply_changes_the_state() -> None:
    """The one place: every other method goes through the table."""
    tree = ast.parse(inspect.getsource(service_module))
    assigning = set()
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr in ("_state", "state"):
                    assigning.add(function.name)
    assert assigning == {"__init__", "_apply"}


# -- the new methods ------------------------------------------------------------------------------


def test_mark_listening_and_mark_failed() -> None:
    service = make(activation=Activation.ON_DEMAND)
    service.mark_listening()
    assert service.state is S.LISTENING
    service.mark_failed("a socket could not be bound")
    assert service.state is S.FAILED and service.failure == "a socket could not be bound"
    assert service.request_start(1.0, manual=True)
    assert service.state is S.STARTING and service.failure is None


def test_restore_carries_on_where_the_old_program_was() -> None:
    service = make()
    service.restore(
        S.RUNNING,
        restarts=3,
        last_exit=ExitStatus(code=1),
        status="serving",
        failure=None,
        connections=7,
    )
    service.adopt_worker(0, 42, 5.0, ready=True, failure=None)
    assert service.describe() == {
        "unit": "web",
        "state": "running",
        "pids": [42],
        "started": 1,
        "restarts": 3,
        "last-exit": {"code": 1},
        "status": "serving",
    }
    assert service.connections == 7
    with pytest.raises(ServiceStateError, match="RESTORED cannot happen while running"):
        service.restore(
            S.RUNNING, restarts=0, last_exit=None, status=None, failure=None, connections=0
        )


def test_set_status() -> None:
    service = make()
    service.set_status("loading")
    assert service.describe()["status"] == "loading"
    service.set_status(None)
    assert service.status is None


def test_a_failed_worker_that_is_not_restarted_gives_the_reason() -> None:
    service = make(restart=RestartPolicy.NO)
    service.request_start(0.0, manual=False)
    worker = service.worker_started(0, 1, 0.0)
    worker.failure = "watchdog timeout: no WATCHDOG=1"
    assert service.worker_exited(1, ExitStatus(signal=signal.SIGABRT), 1.0) is None
    assert service.state is S.FAILED
    assert service.failure == "watchdog timeout: no WATCHDOG=1 (restart: no)"
    service.request_start(2.0, manual=True)
    service.worker_started(0, 2, 2.0)
    service.worker_exited(2, ExitStatus(code=3), 3.0)
    assert service.failure == "exited with code 3 (restart: no)"


# -- random runs: the supervisor's use, with a fake clock ---------------------------------------

STATUSES = [
    ExitStatus(code=0),
    ExitStatus(code=1),
    ExitStatus(signal=signal.SIGTERM),
    ExitStatus(signal=signal.SIGKILL),
]


class _Quiet:
    def info(self, event: str, **fields: object) -> None:
        pass

    error = info


@dataclass
class FakeSupervisor:
    """Calls a Service as supervisor.py does; each method is one of its callbacks."""

    service: Service
    draw: Callable[[st.SearchStrategy[str]], str]
    now: float = 0.0
    pids: Iterator[int] = field(default_factory=lambda: itertools.count(100))
    due: dict[int, float] = field(default_factory=dict)  # restart timers
    watching: bool = False
    accepting: bool = False
    restart_pending: bool = False
    rolling: RollingRestart | None = None
    outcomes: list[str | None] = field(default_factory=list)

    @property
    def spec(self) -> ServiceSpec:
        return self.service.spec

    def activate(self) -> None:
        if self.spec.activation is Activation.ON_DEMAND and not self.spec.accept:
            self.watch()
        else:
            self.start(manual=False)

    def start(self, *, manual: bool) -> None:
        service = self.service
        if self.spec.accept:
            service.request_start(self.now, manual=True)
            service.refresh_state()
            self.accepting = True
            return
        if service.state in (S.RUNNING, S.STARTING) and service.workers:
            return
        if not service.request_start(self.now, manual=manual):
            self.fail("start limit hit")
            return
        self.watching = False
        for instance in service.instances_to_start():
            self.spawn(instance)

    def spawn(self, instance: int) -> None:
        outcome = self.draw(st.sampled_from(["ok", "ok", "ok", "out of fds", "no such file"]))
        if outcome == "ok":
            self.service.worker_started(instance, next(self.pids), self.now)
        elif outcome == "no such file":
            self.service.start_failed(outcome)
            self.fail(outcome)
        else:
            decision = self.service.spawn_failed(instance, self.now)
            if isinstance(decision, Restart):
                self.due[instance] = decision.at
            elif isinstance(decision, Failed):
                self.fail(decision.reason)

    def stop(self) -> None:
        if self.rolling is not None:
            self.rolling.cancel("stopped")
        self.due.clear()
        self.watching = self.accepting = False
        self.service.request_stop()

    def restart(self) -> None:
        if self.rolling is not None:
            return  # refused: one is under way
        if not self.service.workers:
            self.start(manual=True)
            return
        up = self.service.state in (S.RUNNING, S.STARTING)
        if not self.spec.overlap or self.spec.accept or not up:
            self.restart_pending = True
            self.stop()
            return
        self.due.clear()
        self.rolling = RollingRestart(self, self._rolled, log=_Quiet(), emit=lambda e, d: None)
        self.rolling.advance()

    def _rolled(self, error: str | None) -> None:
        self.rolling = None
        self.outcomes.append(error)

    # rolling.RollingHost
    unit_name = "web"

    def spawn_replacement(self, instance: int, replaces: int) -> int:
        if self.draw(st.sampled_from(["ok", "ok", "out of fds"])) != "ok":
            raise OSError(errno.EMFILE, "Too many open files")
        pid = next(self.pids)
        self.service.worker_started(instance, pid, self.now, replaces=replaces)
        return pid

    def stop_worker(self, pid: int) -> None:
        worker = self.service.worker_by_pid(pid)
        assert worker is not None and worker.stopping, "only a worker marked stopping is signalled"

    def spawn_missing(self) -> None:
        for instance in self.service.instances_to_start():
            if instance not in self.due:
                self.spawn(instance)

    def fail(self, reason: str) -> None:
        if self.rolling is not None:
            self.rolling.cancel("failed")
        self.due.clear()
        self.service.request_stop()
        self.service.mark_failed(reason)

    def watch(self) -> None:
        if self.watching or self.spec.activation is not Activation.ON_DEMAND:
            return
        self.watching = True
        self.service.mark_listening()

    def traffic(self) -> None:
        if self.watching:
            self.start(manual=False)

    def accept(self) -> None:
        if self.accepting and len(self.service.workers) < self.spec.max_connections:
            instance = self.service.next_instance()
            if self.draw(st.sampled_from(["ok", "ok", "lost"])) == "ok":
                self.service.worker_started(instance, next(self.pids), self.now)

    def ready(self, index: int) -> None:
        waiting = [w for w in self.service.workers.values() if not w.ready]
        if waiting:
            before = self.service.state
            pid = waiting[index % len(waiting)].pid
            became_running = self.service.worker_ready(pid)
            assert became_running == (before is not S.RUNNING and self.service.state is S.RUNNING)
            if self.rolling is not None:
                self.rolling.worker_ready(pid)

    def kill_for(self, index: int) -> None:
        """A start timeout or the watchdog: the worker is killed; its exit is a failure."""
        workers = sorted(self.service.workers.values(), key=lambda w: w.pid)
        if workers:
            workers[index % len(workers)].failure = "watchdog timeout: no WATCHDOG=1"

    def reap(self, index: int, status: ExitStatus, after: float) -> None:
        pids = self.service.pids
        if not pids:
            return
        self.now += after
        decision = self.service.worker_exited(pids[index % len(pids)], status, self.now)
        if isinstance(decision, ReplacementFailed):
            assert self.rolling is not None, "only a rolling restart's new worker fails so"
            self.rolling.failed(decision.reason)
        if self.restart_pending and not self.service.pids:
            self.restart_pending = False
            self.start(manual=True)
            return
        if isinstance(decision, Restart):
            assert decision.at >= self.now
            self.due[decision.instance] = decision.at
        elif isinstance(decision, Failed):
            self.fail(decision.reason)
        elif self.service.state is S.INACTIVE:
            self.watch()

    def timer(self) -> None:
        if not self.due:
            return
        instance = min(self.due, key=self.due.__getitem__)
        self.now = max(self.now, self.due.pop(instance))
        if self.service.state in (S.STOPPING, S.FAILED):
            return
        self.spawn(instance)

    def upgrade(self) -> None:
        """The new program restores the state, adopts the workers and carries on."""
        old = self.service
        if old.replacing:
            return  # refused, as Upgrader.upgrade() refuses one while a worker is replaced
        new = Service(old.name, old.spec)
        new.restore(
            old.state,
            restarts=old.restarts,
            last_exit=old.last_exit,
            status=old.status,
            failure=old.failure,
            connections=old.connections,
        )
        for w in old.workers.values():
            new.adopt_worker(w.instance, w.pid, w.started_at, ready=w.ready, failure=w.failure)
        self.service = new
        self.due.clear()
        self.watching = self.accepting = self.restart_pending = False
        self.rolling = None
        state = new.state
        if self.spec.accept:
            if state not in (S.INACTIVE, S.FAILED):
                new.refresh_state()
                self.accepting = True
        elif state is S.LISTENING:
            self.watch()
        elif state in (S.RUNNING, S.STARTING):
            for instance in new.instances_to_start():
                self.spawn(instance)


@st.composite
def specs(draw: st.DrawFn) -> ServiceSpec:
    accept = draw(st.booleans())
    return ServiceSpec(
        exec=("worker",),
        accept=accept,
        activation=draw(st.sampled_from(Activation)),
        instances=1 if accept else draw(st.integers(1, 3)),
        max_connections=draw(st.integers(1, 3)),
        notify=draw(st.booleans()),
        overlap=draw(st.booleans()),
        restart=draw(st.sampled_from(RestartPolicy)),
        restart_delay=draw(st.sampled_from([0.0, 0.1, 2.0])),
        restart_delay_max=draw(st.sampled_from([0.5, 30.0])),
        start_limit_burst=draw(st.integers(1, 5)),
        start_limit_interval=draw(st.sampled_from([0.0, 1.0, 10.0])),
    )


ACTIONS = [
    "start",
    "manual-start",
    "stop",
    "restart",
    "fail",
    "traffic",
    "accept",
    "ready",
    "kill-for",
    "reap",
    "timer",
    "upgrade",
    "status",
]


def check(fake: FakeSupervisor, restarts: int, connections: int) -> None:
    """What must hold after every step of the supervisor's use."""
    service, spec = fake.service, fake.spec
    state = service.state
    workers = [*service.workers.values(), *service.outgoing.values()]
    if state is S.FAILED:
        assert service.failure, "a failed service says why"
    if state is S.INACTIVE:
        assert not workers, "inactive has no workers"
    if state is S.STOPPING:
        assert workers, "stopping waits for workers"
    if state is S.RUNNING and not spec.accept:
        # not "and workers": a start while stopping is running again only once started
        assert all(w.ready for w in workers), "running: every worker is ready"
    if state is S.LISTENING and not spec.accept:
        assert not workers, "waiting for traffic: no worker yet"
    if spec.accept:
        assert state is not S.STARTING
    if not spec.notify:
        assert all(w.ready for w in workers)
    current = service.workers.values()
    assert len(current) <= (spec.max_connections if spec.accept else spec.instances)
    assert all(w.instance == i for i, w in service.workers.items())
    replacing = [w for w in service.outgoing.values() if not w.stopping]
    assert len(replacing) <= 1, "one instance at a time is being replaced"
    if fake.rolling is None:
        assert all(w.replaces is None for w in current), "no new worker waits without a restart"
    assert service.started == sum(1 for w in workers if w.ready and not w.stopping)
    assert service.restarts >= restarts and service.connections >= connections
    assert service.describe()["state"] == state.value
    assert service.pids == sorted(w.pid for w in workers)


@settings(max_examples=500, deadline=None)
@given(specs(), st.data())
def test_the_supervisors_use_keeps_every_invariant(spec: ServiceSpec, data: st.DataObject) -> None:
    fake = FakeSupervisor(Service("web", spec), data.draw)
    fake.activate()
    check(fake, 0, 0)
    for _ in range(data.draw(st.integers(0, 60))):
        restarts, connections = fake.service.restarts, fake.service.connections
        action = data.draw(st.sampled_from(ACTIONS))
        index = data.draw(st.integers(0, 2))
        if action in ("start", "manual-start"):
            fake.start(manual=action == "manual-start")
        elif action == "stop":
            fake.stop()
        elif action == "restart":
            fake.restart()
        elif action == "fail":
            fake.fail("a socket could not be bound at reload")
        elif action == "traffic":
            fake.traffic()
        elif action == "accept":
            fake.accept()
        elif action == "ready":
            fake.ready(index)
        elif action == "kill-for":
            fake.kill_for(index)
        elif action == "reap":
            status = data.draw(st.sampled_from(STATUSES))
            after = data.draw(st.sampled_from([0.0, 0.01, 0.5, 1.0, 20.0]))
            fake.reap(index, status, after)
        elif action == "timer":
            fake.timer()
        elif action == "upgrade":
            fake.upgrade()
        else:
            fake.service.set_status(f"step {index}")
        check(fake, restarts, connections)


# -- random runs: any order of calls at all -------------------------------------------------------


CALLS = [
    "request_start",
    "request_stop",
    "mark_listening",
    "mark_failed",
    "refresh_state",
    "worker_started",
    "worker_ready",
    "worker_exited",
    "spawn_failed",
    "start_failed",
    "next_instance",
    "restore",
]


@settings(max_examples=500, deadline=None)
@given(specs(), st.data())
def test_no_call_order_reaches_what_cannot_happen(spec: ServiceSpec, data: st.DataObject) -> None:
    """Only restore() on a service that is not fresh raises; everything else has a row."""
    service = Service("web", spec)
    pids = itertools.count(100)
    now = 0.0
    for _ in range(data.draw(st.integers(0, 60))):
        now += data.draw(st.sampled_from([0.0, 0.05, 1.5]))
        known = [*service.pids, 99]  # 99: a pid the service never had
        pid = data.draw(st.sampled_from(known))
        instance = data.draw(st.integers(0, 2))
        call = data.draw(st.sampled_from(CALLS))
        if call == "request_start":
            service.request_start(now, manual=data.draw(st.booleans()))
        elif call == "request_stop":
            service.request_stop()
        elif call == "mark_listening":
            service.mark_listening()
        elif call == "mark_failed":
            service.mark_failed("by hand")
        elif call == "refresh_state":
            service.refresh_state()
        elif call == "worker_started":
            service.worker_started(instance, next(pids), now)
        elif call == "worker_ready":
            service.worker_ready(pid)
        elif call == "worker_exited":
            service.worker_exited(pid, data.draw(st.sampled_from(STATUSES)), now)
        elif call == "spawn_failed":
            service.spawn_failed(instance, now)
        elif call == "start_failed":
            service.start_failed("no such file")
        elif call == "next_instance":
            service.next_instance()
        else:
            before = service.state
            saved = data.draw(st.sampled_from(ServiceState))
            try:
                service.restore(
                    saved, restarts=0, last_exit=None, status=None, failure="old", connections=0
                )
            except ServiceStateError:
                assert before is not S.INACTIVE
            else:
                assert before is S.INACTIVE and service.state is saved
        workers = list(service.workers.values())
        if service.state is S.FAILED:
            assert service.failure
        if service.state is S.INACTIVE:
            assert not workers
        if service.state is S.RUNNING and not spec.accept:
            assert all(w.ready for w in workers)


# -- what the table shows that today's rules get wrong (kept as they are: no change of behaviour)


def test_a_start_while_stopping_starts_the_instances_once_stopped() -> None:
    """service-start before the old worker is gone: systemd queues the start behind the stop.

    The start finds instance 0 still stopping and starts nothing yet; the old
    worker's exit then starts it, at once.
    """
    service = make()
    service.request_start(0.0, manual=False)
    service.worker_started(0, 1, 0.0)
    service.request_stop()
    assert service.request_start(0.5, manual=True)
    assert service.instances_to_start() == []  # instance 0 is still stopping
    decision = service.worker_exited(1, ExitStatus(signal=signal.SIGTERM), 1.0)
    assert isinstance(decision, Restart) and decision.instance == 0


def test_a_failed_service_restarts_nothing() -> None:
    """A worker the stop did not mark (handed over by an upgrade, which drops ``stopping``)
    crashes: the failed service stays failed and restarts nothing."""
    service = make()
    service.restore(
        S.FAILED, restarts=0, last_exit=None, status=None, failure="start limit hit", connections=0
    )
    service.adopt_worker(0, 42, 0.0, ready=True, failure=None)
    assert service.worker_exited(42, ExitStatus(signal=signal.SIGKILL), 1.0) is None
    assert service.state is S.FAILED


def test_a_replacement_that_cannot_start_gives_back_the_worker_it_was_to_replace() -> None:
    """Found by the invariant test above: a second rolling restart whose new worker cannot
    be started (out of fds) while the first restart's old worker of that instance is still
    stopping. The serving worker comes back as the instance's, not the stopping one."""
    service = make(instances=1)
    service.request_start(0.0, manual=False)
    service.worker_started(0, 100, 0.0)
    service.begin_replacement(0)  # the first restart: 101 replaces 100
    service.worker_started(0, 101, 0.0, replaces=100)
    stopping = service.replacement_started(101)
    assert stopping is not None and stopping.pid == 100 and stopping.stopping
    service.begin_replacement(0)  # the second, before 100 is gone: 101 is outgoing
    service.abort_replacement(0)  # its new worker could not be started
    assert service.workers[0].pid == 101, "the serving worker is the instance's again"
    assert [w.pid for w in service.outgoing.values()] == [100]
    assert service.outgoing[100].stopping
