"""The event loop with real fds and an injected clock."""

from __future__ import annotations

import math
import os

import pytest

from fdsupervisor.loop import MAX_POLL_TIMEOUT, MIN_TIMERS_TO_COMPACT, EventLoop


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_timers_run_in_deadline_order_and_cancel() -> None:
    clock = FakeClock()
    loop = EventLoop(clock)
    ran: list[str] = []
    loop.call_later(2.0, lambda: ran.append("b"))
    loop.call_later(1.0, lambda: ran.append("a"))
    cancelled = loop.call_later(1.5, lambda: ran.append("never"))
    cancelled.cancel()
    clock.now = 103.0
    loop.run_once()
    assert ran == ["a", "b"]
    loop.close()


def test_readers_and_writers_on_one_fd() -> None:
    loop = EventLoop()
    read_end, write_end = os.pipe()
    events: list[str] = []
    loop.add_writer(write_end, lambda: (events.append("writable"), loop.remove_writer(write_end)))
    loop.run_once()
    assert events == ["writable"]
    loop.add_reader(read_end, lambda: events.append(os.read(read_end, 10).decode()))
    os.write(write_end, b"hi")
    loop.run_once()
    assert events == ["writable", "hi"]
    assert loop.has_reader(read_end)
    loop.remove_reader(read_end)
    assert not loop.has_reader(read_end)
    loop.remove_reader(read_end)  # removing twice is harmless
    os.close(read_end)
    os.close(write_end)
    loop.close()


def test_a_callback_may_remove_another_ready_fd() -> None:
    loop = EventLoop()
    first, second = os.pipe(), os.pipe()
    calls: list[int] = []

    def on_first() -> None:
        calls.append(1)
        loop.remove_reader(second[0])
        loop.remove_reader(first[0])

    def on_second() -> None:
        calls.append(2)
        loop.remove_reader(first[0])
        loop.remove_reader(second[0])

    loop.add_reader(first[0], on_first)
    loop.add_reader(second[0], on_second)
    os.write(first[1], b"x")
    os.write(second[1], b"x")
    loop.run_once()
    assert calls in ([1], [2])
    for fd in (*first, *second):
        os.close(fd)
    loop.close()


# -- any deadline is safe (issue 9, item 2) -------------------------------------------------


def ready_pipe() -> tuple[int, int]:
    """A pipe whose read end is readable: run_once returns at once, whatever the timeout."""
    read_end, write_end = os.pipe()
    os.write(write_end, b"x")
    return read_end, write_end


@pytest.mark.parametrize("when", [math.inf, math.nan])
def test_an_infinite_deadline_is_never_due_and_never_a_poll_timeout(when: float) -> None:
    clock = FakeClock()
    loop = EventLoop(clock)
    ran: list[str] = []
    loop.call_at(when, lambda: ran.append("never"))
    assert loop.poll_timeout() is None, "an idle loop with only a 'never' deadline sleeps"
    read_end, write_end = ready_pipe()
    loop.add_reader(read_end, lambda: None)
    clock.now = 1e300
    loop.run_once()
    assert ran == []
    loop.call_later(math.inf, lambda: ran.append("never either")).cancel()
    loop.run_once()
    assert ran == []
    os.close(read_end)
    os.close(write_end)
    loop.close()


@pytest.mark.parametrize("delay", [2_147_483.648, 1e10, 10_000_000_000.0, 1e300, 2.0**64])
def test_a_huge_deadline_is_capped_and_still_runs_when_due(delay: float) -> None:
    clock = FakeClock()
    loop = EventLoop(clock)
    ran: list[str] = []
    loop.call_later(delay, lambda: ran.append("due"))
    assert loop.poll_timeout() == MAX_POLL_TIMEOUT
    read_end, write_end = ready_pipe()
    loop.add_reader(read_end, lambda: None)
    loop.run_once()  # epoll_wait must not see the huge timeout (OverflowError)
    assert ran == []
    clock.now += delay / 2
    assert loop.poll_timeout() == MAX_POLL_TIMEOUT
    clock.now = 100.0 + delay
    assert loop.poll_timeout() == 0.0
    loop.run_once()
    assert ran == ["due"]
    assert loop.poll_timeout() is None
    os.close(read_end)
    os.close(write_end)
    loop.close()


def test_the_poll_timeout_follows_the_earliest_live_deadline() -> None:
    clock = FakeClock()
    loop = EventLoop(clock)
    early = loop.call_later(1.5, lambda: None)
    loop.call_later(math.inf, lambda: None)
    loop.call_later(7.0, lambda: None)
    loop.call_later(-math.inf, lambda: None)  # long overdue: at once
    assert loop.poll_timeout() == 0.0
    read_end, write_end = ready_pipe()
    loop.add_reader(read_end, lambda: None)
    loop.run_once()
    assert loop.poll_timeout() == 1.5
    early.cancel()
    assert loop.poll_timeout() == 7.0
    clock.now += 10.0
    assert loop.poll_timeout() == 0.0
    os.close(read_end)
    os.close(write_end)
    loop.close()


def test_cancelled_far_timers_do_not_pile_up() -> None:
    """A worker that re-arms a year-long watchdog in a tight loop: each new timer
    cancels the last; the heap must not keep them all for a year."""
    loop = EventLoop(FakeClock())
    timer = loop.call_later(365 * 86400.0, lambda: None)
    for _ in range(10_000):
        timer.cancel()
        timer = loop.call_later(365 * 86400.0, lambda: None)
    assert len(loop._timers) <= 2 * MIN_TIMERS_TO_COMPACT + 2
    timer.cancel()
    assert loop.poll_timeout() is None
    loop.close()


def test_an_error_wakes_the_reader_and_the_writer_of_the_fd() -> None:
    # The monitor waits to write to a client that stopped reading; when that
    # client goes, its writer must run too (to see the error and close), as
    # selectors reported EPOLLERR / EPOLLHUP to both. A full pipe whose reader
    # is gone is in error and still not writable: EPOLLERR alone.
    loop = EventLoop()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    while True:
        try:
            os.write(write_end, b"x" * 65536)
        except BlockingIOError:
            break
    calls: list[str] = []
    loop.add_reader(write_end, lambda: calls.append("reader"))
    loop.add_writer(write_end, lambda: calls.append("writer"))
    os.close(read_end)
    loop.run_once()
    assert calls == ["reader", "writer"]
    loop.remove_reader(write_end)
    loop.remove_writer(write_end)
    os.close(write_end)
    loop.close()


def test_registering_a_closed_fd_fails_and_leaves_nothing_behind() -> None:
    loop = EventLoop()
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(OSError):
        loop.add_reader(read_end, lambda: None)
    assert not loop.has_reader(read_end)
    with pytest.raises(ValueError):
        loop.add_reader(-1, lambda: None)
    loop.close()
