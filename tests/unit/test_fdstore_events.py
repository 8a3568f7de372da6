"""The store's owners and its change events: the one owner of FD_STORED / FD_CLOSED."""

from __future__ import annotations

import os

import pytest

from fdsupervisor.fdstore import (
    MONITOR_OWNER,
    Entry,
    FdStore,
    RawFd,
    StoreError,
    owner_kind,
    owner_unit,
    service_owner,
    unit_owner,
)


def new_fd() -> RawFd:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return RawFd(read_end)


class Heard:
    """An ``on_change`` that records (event, owner, name, whether the fd was still open)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.open_at_event: list[bool] = []

    def __call__(self, event: str, entry: Entry) -> None:
        self.events.append((event, entry.owner, entry.name))
        raw = entry.resource
        self.open_at_event.append(isinstance(raw, RawFd) and raw._fd >= 0)

    def take(self) -> list[tuple[str, str, str]]:
        events, self.events = self.events, []
        return events


def test_owner_helpers_are_the_one_parser_of_the_prefixes() -> None:
    assert owner_unit(unit_owner("web")) == "web"
    assert owner_unit(unit_owner("unit:x")) == "unit:x"  # only the first prefix is the owner's
    assert owner_unit(service_owner("web")) is None
    assert owner_unit(MONITOR_OWNER) is None
    assert owner_kind(unit_owner("web")) == "unit"
    assert owner_kind(service_owner("web")) == "service"
    assert owner_kind(MONITOR_OWNER) == "monitor"
    with pytest.raises(StoreError, match="unknown fd owner 'elsewhere'"):
        owner_kind("elsewhere")


def test_an_unknown_owner_is_refused_and_its_fd_closed() -> None:
    store = FdStore()
    fd = new_fd()
    with pytest.raises(StoreError):
        store.add("elsewhere", "a", fd)
    assert fd._fd == -1 and len(store) == 0


def test_monitor_and_service_entries_are_heard_unit_entries_are_not() -> None:
    heard = Heard()
    store = FdStore(on_change=heard)
    store.add(unit_owner("web"), "http", new_fd())
    store.add(MONITOR_OWNER, "a", new_fd())
    store.add(service_owner("web"), "state", new_fd())
    assert heard.take() == [
        ("FD_STORED", "monitor", "a"),
        ("FD_STORED", "service:web", "state"),
    ]
    store.take(unit_owner("web"), "http").close()
    store.take(MONITOR_OWNER, "a").close()
    store.close(service_owner("web"), "state")
    assert heard.take() == [("FD_CLOSED", "monitor", "a"), ("FD_CLOSED", "service:web", "state")]
    # a close is heard once the fd is closed, a take while the taker still has it
    assert heard.open_at_event[-2:] == [True, False]


def test_a_replacement_is_one_fd_stored() -> None:
    heard = Heard()
    store = FdStore(on_change=heard)
    store.add(MONITOR_OWNER, "a", new_fd())
    store.add(MONITOR_OWNER, "a", new_fd(), replace=True)
    assert heard.take() == [("FD_STORED", "monitor", "a")] * 2
    store.close_all()


def test_refusals_are_not_heard() -> None:
    heard = Heard()
    store = FdStore(limit=1, on_change=heard)
    store.add(MONITOR_OWNER, "a", new_fd())
    heard.take()
    with pytest.raises(StoreError):
        store.add(MONITOR_OWNER, "a", new_fd())  # exists
    with pytest.raises(StoreError):
        store.add(MONITOR_OWNER, "b", new_fd())  # full
    with pytest.raises(StoreError):
        store.close(MONITOR_OWNER, "nope")
    assert heard.take() == []
    store.close_all()


def test_close_owner_is_heard_per_entry_and_close_all_not_at_all() -> None:
    heard = Heard()
    store = FdStore(on_change=heard)
    for name in ("a", "b"):
        store.add(service_owner("web"), name, new_fd())
    store.add(MONITOR_OWNER, "kept", new_fd())
    heard.take()
    assert store.close_owner(service_owner("web")) == 2
    assert heard.take() == [("FD_CLOSED", "service:web", "a"), ("FD_CLOSED", "service:web", "b")]
    store.close_all()  # the supervisor is going away: nobody to tell
    assert heard.take() == [] and len(store) == 0
