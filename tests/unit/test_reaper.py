"""The one place that reaps children (reaper.py), with real child processes.

Each child is forked here and exits at once; a pidfd of the test's own says
when it has exited, so ``reap()`` runs once the zombies are there (no sleep).
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fdsupervisor.reaper import ChildReaper
from tests.recording_log import RecordingLog


class Owner:
    """A ChildOwner that records what it was told, and the child's state while exiting."""

    def __init__(self, *, fail: bool = False) -> None:
        self.told: list[tuple[str, int, int | None]] = []
        self.state_while_exiting: str | None = None
        self.fail = fail

    def child_exiting(self, pid: int) -> None:
        stat = Path(f"/proc/{pid}/stat").read_text()
        self.state_while_exiting = stat.rpartition(")")[2].split()[0]
        self.told.append(("exiting", pid, None))
        if self.fail:
            raise RuntimeError("an owner's bug")

    def child_reaped(self, pid: int, wait_status: int) -> None:
        self.told.append(("reaped", pid, os.waitstatus_to_exitcode(wait_status)))


@pytest.fixture
def exited() -> Iterator[Callable[[int], int]]:
    """Fork children that exit with a given code; each is a zombie once returned."""
    pids: list[int] = []

    def fork_exiting(code: int) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(code)
        pidfd = os.pidfd_open(pid)
        try:
            assert select.select([pidfd], [], [], 10)[0], "the child did not exit"
        finally:
            os.close(pidfd)
        pids.append(pid)
        return pid

    yield fork_exiting
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_a_watched_childs_exit_goes_to_its_owner_and_the_rest_are_orphans(
    exited: Callable[[int], int],
) -> None:
    log = RecordingLog()
    reaper = ChildReaper(log=log)
    owner = Owner()
    worker = exited(3)
    orphan = exited(7)
    reaper.watch(worker, owner)
    assert reaper.reap() == [orphan]
    assert owner.told == [("exiting", worker, None), ("reaped", worker, 3)]
    assert owner.state_while_exiting == "Z", "told while its pid is still held"
    assert log.events("orphan_reaped") == [{"pid": orphan, "status": 7}]
    assert worker not in reaper and reaper.pids() == []
    for pid in (worker, orphan):
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_an_owners_bug_leaves_no_other_zombie(exited: Callable[[int], int]) -> None:
    log = RecordingLog()
    reaper = ChildReaper(log=log)
    broken, fine = Owner(fail=True), Owner()
    first, second = exited(1), exited(2)
    reaper.watch(first, broken)
    reaper.watch(second, fine)
    reaper.reap()
    assert fine.told[-1] == ("reaped", second, 2)
    assert [e["pid"] for e in log.events("internal_error")] == [first]
    for pid in (first, second):
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_a_forgotten_child_is_left_to_whoever_reaps_it(exited: Callable[[int], int]) -> None:
    reaper = ChildReaper(log=RecordingLog())
    owner = Owner()
    pid = exited(0)
    reaper.watch(pid, owner)
    reaper.forget(pid)
    assert reaper.reap() == [pid], "no owner any more: an orphan's reap"
    assert owner.told == []
