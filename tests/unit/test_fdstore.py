"""The named-FD store: ownership, replacement, limits; real fds, no leaks."""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path

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


# -- the hang-up watch (FDPOLL), with real socketpairs -------------------------------------


def stored_pair(store: FdStore, owner: str, name: str) -> socket.socket:
    """Store one end of a socketpair; the other end (returned) hangs it up when closed."""
    ours, theirs = socket.socketpair()
    store.add(owner, name, RawFd(ours.detach()))
    return theirs


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_watched_entry_that_hangs_up_is_reported_once() -> None:
    store = FdStore()
    peer = stored_pair(store, "service:web", "conn")
    quiet = stored_pair(store, "service:web", "quiet")
    assert store.watch_hangup("service:web", "conn")
    assert store.watch_hangup("service:web", "quiet")
    assert store.watches_hangup("service:web", "conn")
    assert not readable(store.hangup_fileno()) and store.hung_up() == []
    peer.send(b"data")  # input is no hang-up: nothing asked for EPOLLIN
    assert not readable(store.hangup_fileno()) and store.hung_up() == []
    peer.close()
    assert readable(store.hangup_fileno())
    assert [(e.owner, e.name) for e in store.hung_up()] == [("service:web", "conn")]
    # unwatched, not closed: the caller closes it, and it is never reported again
    assert ("service:web", "conn") in store and not store.watches_hangup("service:web", "conn")
    assert not readable(store.hangup_fileno()) and store.hung_up() == []
    assert store.watches_hangup("service:web", "quiet")
    quiet.close()
    store.close_all()


@pytest.mark.parametrize("how", ["close", "take", "replace", "close_owner"])
def test_the_watch_ends_with_the_entry(how: str) -> None:
    store = FdStore()
    peer = stored_pair(store, "service:web", "conn")
    store.watch_hangup("service:web", "conn")
    if how == "close":
        store.close("service:web", "conn")
    elif how == "take":
        store.take("service:web", "conn").close()
    elif how == "replace":
        store.add("service:web", "conn", new_fd(), replace=True)
    else:
        store.close_owner("service:web")
    assert not store.watches_hangup("service:web", "conn")
    peer.close()
    assert not readable(store.hangup_fileno()) and store.hung_up() == []
    store.close_all()


def test_a_taken_entry_hanging_up_later_is_not_reported() -> None:
    """Taken out, the fd lives on elsewhere; the store no longer speaks for it."""
    store = FdStore()
    peer = stored_pair(store, "service:web", "conn")
    store.watch_hangup("service:web", "conn")
    taken = store.take("service:web", "conn")
    peer.close()
    assert store.hung_up() == []
    taken.close()
    store.close_all()


def test_a_regular_file_cannot_be_watched_and_stays_stored(tmp_path: Path) -> None:
    store = FdStore()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    store.add("service:web", "file", RawFd(fd))
    assert not store.watch_hangup("service:web", "file")
    assert not store.watches_hangup("service:web", "file")
    assert ("service:web", "file") in store
    store.close_all()


def test_watching_an_unknown_entry_is_an_error() -> None:
    with pytest.raises(StoreError, match="not found"):
        FdStore().watch_hangup("service:web", "nothing")


def test_close_all_closes_the_hang_up_watch() -> None:
    store = FdStore()
    peer = stored_pair(store, "service:web", "conn")
    store.watch_hangup("service:web", "conn")
    epoll_fd = store.hangup_fileno()
    store.close_all()
    assert not is_open(epoll_fd)  # nothing opened an fd since
    assert store.hung_up() == []
    peer.close()


def test_a_store_that_watches_nothing_holds_no_epoll() -> None:
    before = set(os.listdir("/proc/self/fd"))
    store = FdStore()
    store.add(MONITOR_OWNER, "a", new_fd())
    assert store.hung_up() == []
    store.close_all()
    assert set(os.listdir("/proc/self/fd")) <= before
