"""The named-FD store: ownership, replacement, limits; real fds, no leaks."""

from __future__ import annotations

import os

import pytest

from fdsupervisor.fdstore import MONITOR_OWNER, FdStore, RawFd, StoreError, unit_owner


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def new_fd() -> RawFd:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return RawFd(read_end)


def test_add_get_take_close() -> None:
    store = FdStore()
    fd = new_fd()
    number = fd.fileno()
    store.add(MONITOR_OWNER, "a", fd)
    entry = store.get(MONITOR_OWNER, "a")
    assert entry is not None and entry.fd == number
    taken = store.take(MONITOR_OWNER, "a")
    assert taken is fd and is_open(number) and len(store) == 0
    store.add(MONITOR_OWNER, "a", taken)
    store.close(MONITOR_OWNER, "a")
    assert not is_open(number)


def test_names_are_per_owner() -> None:
    store = FdStore()
    store.add(unit_owner("web"), "http", new_fd())
    store.add(unit_owner("api"), "http", new_fd())
    store.add(MONITOR_OWNER, "http", new_fd())
    assert len(store) == 3
    store.close_all()


def test_duplicate_refused_and_closed() -> None:
    store = FdStore()
    store.add(MONITOR_OWNER, "a", new_fd())
    second = new_fd()
    number = second.fileno()
    with pytest.raises(StoreError, match="already exists"):
        store.add(MONITOR_OWNER, "a", second)
    assert not is_open(number)
    store.close_all()


def test_replace_closes_the_old_fd() -> None:
    store = FdStore()
    first, second = new_fd(), new_fd()
    old = first.fileno()
    store.add(MONITOR_OWNER, "a", first)
    store.add(MONITOR_OWNER, "a", second, replace=True)
    assert not is_open(old)
    entry = store.get(MONITOR_OWNER, "a")
    assert entry is not None and entry.resource is second
    store.close_all()


def test_limit_counts_clients_not_units() -> None:
    store = FdStore(limit=1)
    store.add(unit_owner("web"), "http", new_fd())
    store.add(MONITOR_OWNER, "a", new_fd())
    extra = new_fd()
    number = extra.fileno()
    with pytest.raises(StoreError, match="full"):
        store.add(MONITOR_OWNER, "b", extra)
    assert not is_open(number)
    store.add(unit_owner("web"), "more", new_fd())
    store.close_all()


def test_missing_name_has_qemu_text() -> None:
    with pytest.raises(StoreError, match="File descriptor named 'x' not found"):
        FdStore().close(MONITOR_OWNER, "x")


def test_close_owner() -> None:
    store = FdStore()
    fds = [new_fd() for _ in range(3)]
    numbers = [f.fileno() for f in fds]
    for i, fd in enumerate(fds):
        store.add(unit_owner("web"), f"s{i}", fd)
    keep = new_fd()
    kept = keep.fileno()
    store.add(MONITOR_OWNER, "keep", keep)
    assert store.close_owner(unit_owner("web")) == 3
    assert not any(is_open(n) for n in numbers)
    assert is_open(kept)
    store.close_all()
    assert not is_open(kept)
