"""A logger for tests of parts that take one: what was logged, with the bound context."""

from __future__ import annotations

from typing import Any


class RecordingLog:
    """A structlog-shaped logger that keeps (level, event, fields), context included."""

    def __init__(self, lines: list[tuple[str, str, dict[str, Any]]] | None = None, **context: Any):
        self.lines = [] if lines is None else lines
        self.context = context

    def bind(self, **context: Any) -> RecordingLog:
        return RecordingLog(self.lines, **self.context, **context)

    def _record(self, level: str, event: str, fields: dict[str, Any]) -> None:
        self.lines.append((level, event, {**self.context, **fields}))

    def debug(self, event: str, **fields: Any) -> None:
        self._record("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._record("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._record("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._record("error", event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._record("error", event, fields)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for _level, event, fields in self.lines if event == name]
