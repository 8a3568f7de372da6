"""A small event loop: readable fds, monotonic timers, and nothing else.

The supervisor's whole life is "an fd became readable" (a socket, the
signal wake-up socket, on which SIGCHLD arrives too) or "a deadline passed"
(a restart delay, a stop timeout). With nothing to do,
:meth:`EventLoop.run_once` sleeps in ``epoll_wait`` with no timeout: an idle
supervisor never wakes up.

Any deadline is safe here, however it was computed: an infinite one (a
``stop-timeout: infinity``) is never due and never becomes a poll timeout,
a NaN counts as infinite, and a huge finite one only makes the loop wake
up once a day to look again (``epoll_wait`` takes at most ``INT_MAX`` ms,
and Python raises ``OverflowError`` beyond it: a loop that passed such a
timeout on would fail on every pass, forever).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

Callback = Callable[[], None]

_READ = select.EPOLLIN
_WRITE = select.EPOLLOUT
_NO_CALLBACKS: tuple[None, None] = (None, None)

# The longest single wait, as asyncio's MAXIMUM_SELECT_TIMEOUT (base_events.py):
# a day, well under epoll_wait's INT_MAX milliseconds (24.8 days). A deadline
# further away is simply looked at again after it.
MAX_POLL_TIMEOUT = 24 * 3600.0
# Cancelled timers are dropped from the heap when they reach its top; when
# more than half of at least this many are cancelled, the heap is rebuilt
# without them at once (asyncio's _MIN_SCHEDULED_TIMER_HANDLES and
# _MIN_CANCELLED_TIMER_HANDLES_FRACTION), so that a worker re-arming a long
# watchdog a thousand times a second cannot grow the heap for as long as that.
MIN_TIMERS_TO_COMPACT = 100
# A listening socket whose accept() failed for want of fds or memory (EMFILE,
# ENFILE, ENOBUFS, ENOMEM) is left alone this long: epoll is level-triggered,
# and the connection waiting in the backlog would wake the loop at once,
# forever. libuv pauses its accept the same way. Both accepting sockets use it:
# the monitor's and the units' in accept mode.
ACCEPT_RETRY_DELAY = 0.1


@dataclass(order=True, slots=True)
class Timer:
    when: float
    seq: int
    callback: Callback = field(compare=False)
    cancelled: bool = field(default=False, compare=False)
    on_cancel: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel()


class EventLoop:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.time = clock
        # epoll itself, not the selectors module: its select() and get_key()
        # cost a dozen Python calls per ready fd, as much as a monitor command's
        # own work. fd → (reader, writer), as registered.
        self._epoll = select.epoll()
        self._handlers: dict[int, tuple[Callback | None, Callback | None]] = {}
        self._timers: list[Timer] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._seq = itertools.count()

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._set(fd, callback, self._callbacks(fd)[1])

    def remove_reader(self, fd: int) -> None:
        self._set(fd, None, self._callbacks(fd)[1])

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._set(fd, self._callbacks(fd)[0], callback)

    def remove_writer(self, fd: int) -> None:
        self._set(fd, self._callbacks(fd)[0], None)

    def has_reader(self, fd: int) -> bool:
        return self._callbacks(fd)[0] is not None

    def _callbacks(self, fd: int) -> tuple[Callback | None, Callback | None]:
        return self._handlers.get(fd, _NO_CALLBACKS)

    def _set(self, fd: int, reader: Callback | None, writer: Callback | None) -> None:
        if fd < 0:
            raise ValueError(f"Invalid file descriptor: {fd}")
        mask = (_READ if reader else 0) | (_WRITE if writer else 0)
        registered = fd in self._handlers
        if not mask:
            if registered:
                del self._handlers[fd]
                # The fd may be closed already: the kernel dropped it from the
                # epoll set then (as selectors' unregister() ignores this too).
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)
            return
        if not registered:
            self._epoll.register(fd, mask)
        else:
            try:
                self._epoll.modify(fd, mask)
            except OSError:
                del self._handlers[fd]  # as selectors' modify(): forgotten, and raised
                raise
        self._handlers[fd] = (reader, writer)

    def call_at(self, when: float, callback: Callback) -> Timer:
        """Run ``callback`` at monotonic time ``when``; ``inf`` (or NaN) means never."""
        if math.isnan(when):
            when = math.inf  # NaN compares false with everything: it would break the heap
        timer = Timer(when, next(self._seq), callback)
        if when != math.inf:  # never due: not kept at all (its cancel() still works)
            timer.on_cancel = self._timer_cancelled
            heapq.heappush(self._timers, timer)
        return timer

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(self.time() + delay, callback)

    def _timer_cancelled(self) -> None:
        self._cancelled += 1
        if len(self._timers) > MIN_TIMERS_TO_COMPACT and self._cancelled > len(self._timers) // 2:
            for timer in self._timers:
                if timer.cancelled:
                    timer.on_cancel = None
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
            self._cancelled = 0

    def poll_timeout(self) -> float | None:
        """How long the next wait may last: None (no deadline), else 0 to MAX_POLL_TIMEOUT."""
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers).on_cancel = None
            self._cancelled -= 1
        if not self._timers:
            return None
        return min(max(0.0, self._timers[0].when - self.time()), MAX_POLL_TIMEOUT)

    def run_once(self) -> None:
        """Wait for the next event or deadline, then run what is due."""
        timeout = self.poll_timeout()
        # Rounded up to whole milliseconds, epoll_wait's unit, so that a timer
        # is never woken for a moment too early (as selectors does).
        wait = -1.0 if timeout is None else math.ceil(timeout * 1e3) * 1e-3
        handlers = self._handlers
        for fd, events in self._epoll.poll(wait, max(len(handlers), 1)):
            # Look the callbacks up again: an earlier callback in this batch
            # may have removed or replaced them (a client closed, say). A
            # hang-up or an error wakes both, as selectors reports them.
            if events & ~_WRITE:
                reader = handlers.get(fd, _NO_CALLBACKS)[0]
                if reader is not None:
                    reader()
            if events & ~_READ:
                writer = handlers.get(fd, _NO_CALLBACKS)[1]
                if writer is not None:
                    writer()
        now = self.time()
        while self._timers and (self._timers[0].cancelled or self._timers[0].when <= now):
            timer = heapq.heappop(self._timers)
            timer.on_cancel = None  # out of the heap: a late cancel() counts nothing
            if timer.cancelled:
                self._cancelled -= 1
            else:
                timer.callback()

    def close(self) -> None:
        self._epoll.close()
