"""Logging: structlog events, readable on a terminal or JSON lines.

Events are a snake_case verb and key-value fields
(``worker_exited unit=web pid=123 status=1 restart_in=0.2``). The
configuration is returned as a logger, never stored in a module global.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import structlog

LOG_FORMATS = ("console", "json")


def make_logger(log_format: str = "console", stream: TextIO | None = None) -> Any:
    """A bound structlog logger writing to ``stream`` (stderr by default)."""
    stream = stream or sys.stderr
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
        structlog.PrintLogger(stream),
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(0),
        cache_logger_on_first_use=False,
    )


def _identity(_logger: Any, _name: str, event: Any) -> Any:
    return event
