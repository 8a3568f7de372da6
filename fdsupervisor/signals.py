"""Signals as events of the loop: the handled ones arrive as bytes on a socket.

Signal handlers do nothing but wake the loop (``signal.set_wakeup_fd``), as
gunicorn's arbiter and asyncio do: the C-level handler writes the signal's
number to the wake-up socket, the loop reads it and the supervisor acts on it
there, never inside a handler. :class:`SignalWakeup` owns that socket pair
and the handlers it replaced, and puts both back when closed.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Sequence
from typing import Any


class SignalWakeup:
    """The wake-up socket of ``signals``: :meth:`install`, then :meth:`drain` when readable."""

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = tuple(signals)
        self._pair: tuple[socket.socket, socket.socket] | None = None
        self._old_handlers: dict[int, Any] = {}

    def install(self) -> int:
        """Route the signals to the wake-up socket; the fd for the loop to watch."""
        receive, send = socket.socketpair()
        receive.setblocking(False)
        send.setblocking(False)
        self._pair = (receive, send)
        signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        for signum in self.signals:
            self._old_handlers[signum] = signal.signal(signum, _wake_only)
        return receive.fileno()

    def drain(self) -> bytes:
        """The numbers of the signals that arrived and were not read yet, one byte each."""
        data = b""
        while self._pair is not None:
            try:
                chunk = self._pair[0].recv(512)
            except (BlockingIOError, InterruptedError):
                break
            if not chunk:
                break
            data += chunk
        return data

    def close(self, *, exiting: bool = False) -> None:
        """Put the old handlers back and close the socket pair (idempotent).

        ``exiting``: the process ends next, and the signals are ignored from now
        on instead. Not a Python handler that does nothing: the interpreter's
        finalisation puts the default action back for those (CPython's
        ``_PySignal_Fini``), and SIGTERM's default is death.
        """
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, signal.SIG_IGN if exiting else handler)
        self._old_handlers.clear()
        if self._pair is not None:
            signal.set_wakeup_fd(-1)
            for sock in self._pair:
                sock.close()
            self._pair = None


def _wake_only(signum: int, frame: object) -> None:
    """Signal handler: the wake-up fd already carries the signal number."""
