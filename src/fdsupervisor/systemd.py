"""Everything that talks to systemd, through systemd-python.

Only the supervisor's own readiness is here so far: ``READY=1`` once every
socket is bound, ``STOPPING=1`` at shutdown and ``STATUS=`` lines. Each is a
no-op when the supervisor does not run under systemd (no ``NOTIFY_SOCKET``).
"""

from __future__ import annotations

from collections.abc import Mapping

from systemd import daemon


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))

    def notify(self, **fields: str) -> None:
        if not self.enabled:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        daemon.notify(message)

    def ready(self, status: str) -> None:
        self.notify(READY="1", STATUS=status)

    def reloading(self) -> None:
        import time

        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING="1", MONOTONIC_USEC=str(usec))

    def stopping(self) -> None:
        self.notify(STOPPING="1", STATUS="stopping")

    def status(self, status: str) -> None:
        self.notify(STATUS=status)
