"""The event loop with real fds and an injected clock."""

from __future__ import annotations

import os

from fdsupervisor.loop import EventLoop


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
