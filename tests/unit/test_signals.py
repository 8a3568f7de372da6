"""SignalWakeup: handled signals become bytes on a socket, and everything is put back."""

from __future__ import annotations

import os
import select
import signal

from fdsupervisor.signals import SignalWakeup


def test_a_handled_signal_arrives_as_its_number_and_close_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    wakeup = SignalWakeup([signal.SIGUSR1])
    fd = wakeup.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled: the process lives on
        readable, _, _ = select.select([fd], [], [], 5.0)
        assert readable == [fd]
        assert wakeup.drain() == bytes([signal.SIGUSR1])
        assert wakeup.drain() == b""  # read once
    finally:
        wakeup.close()
    assert signal.getsignal(signal.SIGUSR1) is before
    assert signal.set_wakeup_fd(-1) == -1  # no wake-up fd left behind
    wakeup.close()  # twice is fine


def test_signals_that_came_together_are_all_read() -> None:
    wakeup = SignalWakeup([signal.SIGUSR1, signal.SIGUSR2])
    fd = wakeup.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        select.select([fd], [], [], 5.0)
        assert sorted(wakeup.drain()) == sorted([signal.SIGUSR1, signal.SIGUSR2])
    finally:
        wakeup.close()
