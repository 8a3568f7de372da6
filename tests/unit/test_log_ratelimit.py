"""log.RateLimitedLog: the first lines of each event pass, the rest are counted and summarised.

Plain numbers on an injected clock: no sleeping, no real time.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.log import LOG_RATE_BURST, LOG_RATE_INTERVAL, RateLimitedLog


class Recorder:
    """Stands in for a structlog logger: keeps each warning as (event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(interval: float = 10.0, burst: int = 3) -> tuple[RateLimitedLog, Recorder, Clock]:
    recorder, clock = Recorder(), Clock()
    return RateLimitedLog(recorder, interval=interval, burst=burst, clock=clock), recorder, clock


def test_the_defaults() -> None:
    assert (LOG_RATE_BURST, LOG_RATE_INTERVAL) == (10, 10.0)


def test_below_the_burst_every_line_passes_and_nothing_is_owed() -> None:
    log, recorder, clock = limited()
    for pid in (1, 2, 3):
        log.warning("notify_ignored", pid=pid)
    assert recorder.lines == [("notify_ignored", {"pid": pid}) for pid in (1, 2, 3)]
    assert log.due() is None
    clock.now += 60
    log.flush()
    log.flush(everything=True)
    assert len(recorder.lines) == 3, "no summary when nothing was left out"


def test_a_flood_costs_the_burst_and_one_summary_per_window() -> None:
    log, recorder, clock = limited(interval=10.0, burst=3)
    for pid in range(1000):
        log.warning("notify_ignored", pid=pid)
        clock.now += 0.001  # 1,000 in one second
    assert recorder.lines == [("notify_ignored", {"pid": pid}) for pid in (0, 1, 2)]
    assert log.due() == 1010.0  # the window opened by the first line, at 1000.0
    clock.now = 1009.999
    log.flush()
    assert len(recorder.lines) == 3, "not before the window is over"
    clock.now = 1010.0
    log.flush()
    assert recorder.lines[3:] == [
        (
            "warnings_suppressed",
            {
                "warning": "notify_ignored",
                "suppressed": 997,
                "interval": 10.0,
                "last": {"pid": 999},
            },
        )
    ]
    assert log.due() is None
    log.flush()
    assert len(recorder.lines) == 4, "each count is written once"


def test_the_next_line_after_a_window_writes_the_summary_first() -> None:
    log, recorder, clock = limited(interval=10.0, burst=1)
    log.warning("notify_ignored", pid=1)
    log.warning("notify_ignored", pid=2)
    log.warning("notify_ignored", pid=3)
    clock.now += 10.0
    log.warning("notify_ignored", pid=4)  # opens a new window: passes
    log.warning("notify_ignored", pid=5)
    assert [
        (event, fields.get("pid"), fields.get("suppressed")) for event, fields in recorder.lines
    ] == [
        ("notify_ignored", 1, None),
        ("warnings_suppressed", None, 2),
        ("notify_ignored", 4, None),
    ]
    assert log.due() == clock.now + 10.0


def test_events_are_limited_each_on_its_own() -> None:
    log, recorder, _clock = limited(burst=2)
    for _ in range(5):
        log.warning("notify_ignored", pid=7)
        log.warning("notify_datagram_dropped", pid=7)
    assert [event for event, _ in recorder.lines] == [
        "notify_ignored",
        "notify_datagram_dropped",
    ] * 2
    log.flush(everything=True)  # at shutdown: the windows still open are summarised too
    assert sorted((f["warning"], f["suppressed"]) for e, f in recorder.lines[4:]) == [
        ("notify_datagram_dropped", 3),
        ("notify_ignored", 3),
    ]


def test_a_window_opens_at_the_first_line_not_at_a_fixed_tick() -> None:
    log, recorder, clock = limited(interval=10.0, burst=1)
    log.warning("e")
    clock.now += 9.0
    log.warning("e")  # still the first window: counted
    clock.now += 1.0
    log.warning("e")  # the first window is over: its summary, then this line
    assert [e for e, _ in recorder.lines] == ["e", "warnings_suppressed", "e"]


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=1, max_size=300),
    burst=st.integers(min_value=1, max_value=5),
)
def test_nothing_is_lost_and_the_lines_are_bounded(gaps: list[float], burst: int) -> None:
    interval = 10.0
    log, recorder, clock = limited(interval=interval, burst=burst)
    first = clock.now + gaps[0]
    for gap in gaps:
        clock.now += gap
        log.warning("e")
    log.flush(everything=True)
    passed = sum(1 for event, _ in recorder.lines if event == "e")
    summaries = [f["suppressed"] for event, f in recorder.lines if event == "warnings_suppressed"]
    assert passed + sum(summaries) == len(gaps), "every warning is written or counted"
    assert all(count > 0 for count in summaries)
    # a window opens at least ``interval`` after the one before: so many fit in the span
    windows = 1 + int((clock.now - first + 1e-9) // interval)
    assert passed <= burst * windows and len(summaries) <= windows
