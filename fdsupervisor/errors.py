"""The one error hierarchy of fdsupervisor.

Every error says what is wrong and where. Configuration errors carry a
location (file, line, column, key path) that renders as
``FILE:LINE:COL: key.path: message``; monitor errors carry the QMP error
class they map to (the mapping lives here and nowhere else).
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass


class FdSupervisorError(Exception):
    """Base of every error fdsupervisor raises on purpose."""


@dataclass(frozen=True, slots=True)
class Location:
    """Where in a unit file (or on the command line) a value came from.

    ``line`` and ``column`` are 1-based, as editors and compilers print them;
    both are 0 when the value has no position (command-line arguments).
    """

    source: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if self.line:
            return f"{self.source}:{self.line}:{self.column}"
        return self.source


class ValueProblem(FdSupervisorError):
    """A value is wrong; ``path`` is the key path inside the value, if any.

    Raised by the pure parsers (addresses, durations) that do not know where
    their input came from; ``units.py`` turns it into a :class:`ConfigError`.
    """

    def __init__(self, message: str, path: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.path = tuple(path)


class ConfigError(FdSupervisorError):
    """A unit file (or a command-line unit) is invalid."""

    def __init__(self, location: Location, key_path: Sequence[str], message: str) -> None:
        self.location = location
        self.key_path = tuple(key_path)
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        key = ".".join(self.key_path)
        return (
            f"{self.location}: {key}: {self.message}" if key else f"{self.location}: {self.message}"
        )


class ConfigErrors(FdSupervisorError):
    """Every error found while validating a set of units (nothing was applied)."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = tuple(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class BindError(FdSupervisorError):
    """A socket could not be bound, or an inherited fd could not be adopted."""

    def __init__(self, socket_name: str, message: str) -> None:
        self.socket_name = socket_name
        self.message = message
        super().__init__(f"socket {socket_name}: {message}")


class SpawnError(FdSupervisorError):
    """A worker could not be started (exec failed, user unknown, ...).

    ``transient`` is true when the cause was a lack of resources (out of fds,
    processes or memory): a later try may succeed, so the restart policy
    applies, as systemd applies Restart= to such a start.
    """

    RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})

    def __init__(self, message: str, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value
        self.transient = errno_value in self.RESOURCE_ERRNOS


class CommandError(FdSupervisorError):
    """A monitor command failed; ``error_class`` is the QMP error class.

    QEMU uses ``GenericError`` for almost everything and ``CommandNotFound``
    for unknown commands and for commands sent before ``qmp_capabilities``.
    """

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"

    def __init__(self, desc: str, error_class: str = GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
