"""A small event loop: readable fds, monotonic timers, and nothing else.

The supervisor's whole life is "an fd became readable" (a pidfd, a socket,
the signal wake-up pipe) or "a deadline passed" (a restart delay, a stop
timeout). With nothing to do, :meth:`EventLoop.run_once` sleeps in
``epoll_wait`` with no timeout: an idle supervisor never wakes up.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Callback = Callable[[], None]


@dataclass(order=True, slots=True)
class Timer:
    when: float
    seq: int
    callback: Callback = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.time = clock
        self._selector = selectors.DefaultSelector()
        self._timers: list[Timer] = []
        self._seq = itertools.count()

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._set(fd, selectors.EVENT_READ, callback)

    def remove_reader(self, fd: int) -> None:
        self._set(fd, selectors.EVENT_READ, None)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set(fd, selectors.EVENT_WRITE, callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, selectors.EVENT_WRITE, None)

    def has_reader(self, fd: int) -> bool:
        return self._callbacks(fd)[0] is not None

    def _callbacks(self, fd: int) -> tuple[Callback | None, Callback | None]:
        try:
            key = self._selector.get_key(fd)
        except (KeyError, ValueError):
            return (None, None)
        callbacks: tuple[Callback | None, Callback | None] = key.data
        return callbacks

    def _set(self, fd: int, event: int, callback: Callback | None) -> None:
        reader, writer = self._callbacks(fd)
        if event == selectors.EVENT_READ:
            reader = callback
        else:
            writer = callback
        mask = (selectors.EVENT_READ if reader else 0) | (selectors.EVENT_WRITE if writer else 0)
        registered = self._callbacks(fd) != (None, None)
        if not mask:
            if registered:
                self._selector.unregister(fd)
        elif registered:
            self._selector.modify(fd, mask, (reader, writer))
        else:
            self._selector.register(fd, mask, (reader, writer))

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.time() + delay, callback)

    def run_once(self) -> None:
        """Wait for the next event or deadline, then run what is due."""
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        timeout = None
        if self._timers:
            timeout = max(0.0, self._timers[0].when - self.time())
        for key, events in self._selector.select(timeout):
            # Look the callbacks up again: an earlier callback in this batch
            # may have removed or replaced them (a client closed, say).
            if events & selectors.EVENT_READ:
                reader = self._callbacks(key.fd)[0]
                if reader is not None:
                    reader()
            if events & selectors.EVENT_WRITE:
                writer = self._callbacks(key.fd)[1]
                if writer is not None:
                    writer()
        now = self.time()
        while self._timers and (self._timers[0].cancelled or self._timers[0].when <= now):
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    def close(self) -> None:
        self._selector.close()
