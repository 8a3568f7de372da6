"""Logging: structlog events, readable on a terminal, JSON lines, or native journal entries.

Events are a snake_case verb and key-value fields
(``worker_exited unit=web pid=123 status=1 restart_in=0.2``). The
configuration is returned as a logger, never stored in a module global.

Formats: ``console`` (readable, colours on a terminal), ``json`` (one
object per line), ``journal`` (one journal entry per event through
systemd-python's ``journal.send()``, every key a field of its own) and
``auto``: ``journal`` when stderr is connected to the journal
(``JOURNAL_STREAM``, below), else ``console``.

Warnings that anyone on the machine can cause (a datagram to the notify
socket) go through a :class:`RateLimitedLog`, so that a flood of them costs a
few lines, not one line each.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import structlog
from systemd import journal

LOG_FORMATS: Final = ("auto", "console", "json", "journal")

#: journald's native protocol socket (sd-journal's journal-send.c).
JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"

SYSLOG_IDENTIFIER: Final = "fdsupervisor"

# syslog(3) priorities for structlog's level names (``add_log_level`` maps
# ``warn`` to ``warning`` and ``exception`` to ``error``).
PRIORITIES: Final = {
    "critical": 2,
    "error": 3,
    "warning": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}

# Fields the journal entry gets from us; an event key that would land on
# one of them is prefixed with EVENT_ instead (``message=`` → EVENT_MESSAGE).
_OWN_FIELDS: Final = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "EVENT",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "SYSLOG_IDENTIFIER",
        "SYSLOG_FACILITY",
        "SYSLOG_PID",
        "SYSLOG_TIMESTAMP",
    }
)
# journald's journal_field_valid(): 1-64 characters of A-Z 0-9 _, not
# starting with a digit; a leading _ marks trusted fields that only journald
# itself may set. An entry with an invalid field name loses that field.
_FIELD_NAME_MAX: Final = 64
_NOT_FIELD_CHAR: Final = re.compile(r"[^A-Z0-9_]")
_PLAIN_VALUE: Final = re.compile(r"[^\s\"'=]+")

JournalSend = Callable[..., object]
"""``systemd.journal.send(MESSAGE, MESSAGE_ID=None, CODE_FILE=None, CODE_LINE=None, CODE_FUNC=None, **fields)``."""


def make_logger(
    log_format: str = "console",
    stream: TextIO | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    send: JournalSend | None = None,
    journal_socket: str = JOURNAL_SOCKET,
) -> Any:
    """A bound structlog logger in ``log_format`` (one of :data:`LOG_FORMATS`).

    ``stream`` (stderr by default) is where ``console`` and ``json`` write,
    and where ``journal`` writes a plain line when the journal cannot be
    reached. ``environ`` (``os.environ`` by default) is read for ``auto``;
    ``send`` replaces ``systemd.journal.send``.
    """
    stream = stream or sys.stderr
    if log_format == "auto":
        environ = os.environ if environ is None else environ
        log_format = "journal" if journal_stream_matches(environ) else "console"
    if log_format == "journal":
        if send is not None or Path(journal_socket).exists():
            return _journal_logger(send or journal.send, stream)
        # sd_journal_send() drops entries silently when journald's socket is
        # missing (journal-send.c: ENOENT is "no journal"): every line would be
        # lost. Console instead, and say so, as ``stdout: journal`` does.
        fallback = make_logger("console", stream)
        fallback.warning("journal_unavailable", socket=journal_socket, note="logging to stderr")
        return fallback
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info if log_format == "json" else _identity,
        renderer,
    ]
    return structlog.wrap_logger(
        structlog.WriteLogger(stream),  # one write() per line: atomic on a pipe shared with workers
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event


# --------------------------------------------------------------------------- journal


def journal_stream_matches(environ: Mapping[str, str], fd: int = 2) -> bool:
    """Whether ``fd`` (stderr) is the journal stream systemd connected us to.

    systemd.exec(5), ``$JOURNAL_STREAM``: "contains the device and inode
    numbers of the file descriptor, formatted in decimal, separated by a
    colon ... Applications may use it to determine whether their output
    is going to the journal", comparing them "with the values returned by
    fstat() on their standard error"; the variable alone is not enough,
    as it is inherited by processes whose stderr was redirected elsewhere.
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, separator, inode = value.partition(":")
    if not separator or not (device.isdecimal() and inode.isdecimal()):
        return False
    try:
        status = os.fstat(fd)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def journal_field_name(key: str) -> str | None:
    """An event key as a journal field name: ``restart-in`` → ``RESTART_IN``.

    Upper case, every character outside ``A-Z 0-9 _`` an ``_``, leading
    ``_`` dropped (trusted fields are journald's), ``F_`` before a leading
    digit, at most 64 characters; ``EVENT_`` before a name that
    :data:`_OWN_FIELDS` holds. None if nothing is left.
    """
    name = _NOT_FIELD_CHAR.sub("_", key.upper()).lstrip("_")
    if not name:
        return None
    if name[0].isdigit():
        name = "F_" + name
    if name in _OWN_FIELDS:
        name = "EVENT_" + name
    return name[:_FIELD_NAME_MAX]


def journal_fields(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """The last processor for ``journal``: the event as keyword arguments of ``journal.send``.

    ``MESSAGE`` is the event as the console shows it (``worker_exited
    unit=web pid=123``, the traceback on the following lines),
    ``PRIORITY`` the syslog priority of its level, ``EVENT`` its name,
    ``CODE_FILE`` / ``CODE_LINE`` / ``CODE_FUNC`` the place that logged it
    (systemd-python's own ``JournalHandler`` sends the same), and every
    other key a field of its own (:func:`journal_field_name`), so that
    ``journalctl EVENT=worker_exited UNIT=web`` finds it.
    """
    event = dict(event_dict)
    name = str(event.pop("event", ""))
    level = str(event.pop("level", "info"))
    event.pop("timestamp", None)  # the journal stamps each entry itself
    code_file = event.pop("pathname", None)
    code_line = event.pop("lineno", None)
    code_func = event.pop("func_name", None)
    exception = event.pop("exception", None)
    message = " ".join([name, *(f"{key}={_message_value(v)}" for key, v in event.items())])
    if exception:
        message += "\n" + str(exception)
    fields: dict[str, Any] = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "EVENT": name,
        # journal.send() looks up the caller's frame unless one of the three
        # is given, and that frame would be this module's: CODE_FILE always.
        "CODE_FILE": str(code_file) if code_file is not None else "",
    }
    if isinstance(code_line, int):
        fields["CODE_LINE"] = code_line
    if code_func is not None:
        fields["CODE_FUNC"] = str(code_func)
    if exception:
        fields["EXCEPTION"] = str(exception)
    for key, value in event.items():
        field_name = journal_field_name(str(key))
        if field_name is not None and field_name not in fields:
            fields[field_name] = _field_value(value)
    return fields


def _message_value(value: Any) -> str:
    if isinstance(value, str):
        return value if _PLAIN_VALUE.fullmatch(value) else json.dumps(value)
    return _field_value(value)


def _field_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


class JournalLogger:
    """The logger at the end of the ``journal`` chain: each event is one ``send(**fields)``.

    When the journal cannot be reached (``send`` raises :class:`OSError`,
    e.g. journald is restarting), the entry's ``MESSAGE`` goes to
    ``fallback`` as a plain line instead: under systemd that is the stream
    journald reads stdout and stderr from, so nothing is lost.
    """

    def __init__(self, send: JournalSend, fallback: TextIO) -> None:
        self._send = send
        self._fallback = fallback

    def msg(self, **fields: Any) -> None:
        try:
            self._send(**fields)
        except OSError:
            print(fields.get("MESSAGE", ""), file=self._fallback, flush=True)

    log = debug = info = warn = warning = msg
    err = error = critical = exception = fatal = failure = msg


def _journal_logger(send: JournalSend, fallback: TextIO) -> Any:
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.CallsiteParameterAdder(
            [
                structlog.processors.CallsiteParameter.PATHNAME,
                structlog.processors.CallsiteParameter.LINENO,
                structlog.processors.CallsiteParameter.FUNC_NAME,
            ]
        ),
        structlog.processors.format_exc_info,
        journal_fields,
    ]
    return structlog.wrap_logger(
        JournalLogger(send, fallback),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )


# --------------------------------------------------------------------------- rate limit

#: A :class:`RateLimitedLog` writes at most this many lines of one event ...
LOG_RATE_BURST: Final = 10
#: ... in this many seconds, and one ``warnings_suppressed`` line for the rest.
#: Our own figures: 10 lines show the first few senders of a burst, and a
#: flood costs at most 11 lines per event in 10 s (journald's default,
#: ``RateLimitBurst=10000`` in ``RateLimitIntervalSec=30s``, is meant for a
#: whole service's output, not one warning).
LOG_RATE_INTERVAL: Final = 10.0


@dataclass(slots=True)
class _Window:
    begin: float
    logged: int = 0
    suppressed: int = 0
    last: dict[str, Any] = field(default_factory=dict)


class RateLimitedLog:
    """A logger's ``warning()`` that writes at most ``burst`` lines of each event per ``interval``.

    The rule of systemd's ``ratelimit_below()`` (``src/basic/ratelimit.c``)
    as journald applies it ("Suppressed N messages from ..."), per event
    name: the first warning of an event opens a window of ``interval``
    seconds on ``clock``; the first ``burst`` warnings in it are written, the
    others are counted. Once the window is over, one ``warnings_suppressed``
    line says how many lines of which event were left out (``suppressed``)
    and the fields of the last one (``last``); the next warning opens a new
    window. The summary is written by the first warning after the window, or
    by :meth:`flush`, which the owner calls at :meth:`due` (and with
    ``everything=True`` at the end), so that a count never waits for the
    next flood.

    Only warnings are limited: ``info()`` and the rest of ``log`` are
    untouched, as :class:`~fdsupervisor.notify.NotifySocket` and the
    supervisor's notify handler only warn.
    """

    def __init__(
        self,
        log: Any,
        *,
        interval: float = LOG_RATE_INTERVAL,
        burst: int = LOG_RATE_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._interval = interval
        self._burst = burst
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def warning(self, event: str, **fields: Any) -> None:
        now = self._clock()
        window = self._windows.get(event)
        if window is not None and now - window.begin >= self._interval:
            self._summarise(event, window)
            window = None
        if window is None:
            window = self._windows[event] = _Window(now)
        if window.logged < self._burst:
            window.logged += 1
            self._log.warning(event, **fields)
        else:
            window.suppressed += 1
            window.last = fields

    def due(self) -> float | None:
        """The clock time at which a summary is owed, or ``None`` if nothing was left out."""
        ends = [w.begin + self._interval for w in self._windows.values() if w.suppressed]
        return min(ends, default=None)

    def flush(self, *, everything: bool = False) -> None:
        """Write the summary of every window that is over (``everything``: of every window)."""
        now = self._clock()
        for event, window in list(self._windows.items()):
            if everything or now - window.begin >= self._interval:
                self._summarise(event, window)
                del self._windows[event]

    def _summarise(self, event: str, window: _Window) -> None:
        if window.suppressed:
            self._log.warning(
                "warnings_suppressed",
                warning=event,
                suppressed=window.suppressed,
                interval=self._interval,
                last=window.last,
            )
