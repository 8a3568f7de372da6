"""The FD store as a state machine, with real fds, against a model dict.

Every resource the test makes is one end of a pipe or a socketpair; the test
keeps the other end (the *witness*) and asks the kernel, never the store,
whether the resource is still open: a pipe's write end reports POLLERR once
every read end is closed, a socket reports POLLHUP once its peer is closed.
That answer does not depend on fd numbers, which the kernel reuses at once.

Invariant after every step: each resource is in exactly one of three places,
stored (then the model has it under the same owner and name, and the store
hands back that very object), taken by the test, or closed; ``os.fstat``
agrees (an open resource's fd is still its inode; a closed one's fd is
either not open or, reused by the kernel, another inode); ``len`` and
``counted`` match the model; ``on_change`` heard exactly one ``FD_STORED``
per add and one ``FD_CLOSED`` per take or close of a non-unit entry. After each example every fd it created, the
witnesses included, is closed. (The whole process's fd table is not compared:
other tests' objects may be collected, and their fds closed, at any moment.)
"""

from __future__ import annotations

import os
import select
import socket
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from fdsupervisor.fdstore import Entry, FdStore, RawFd, StoreError

OWNERS = st.sampled_from(["unit:web", "unit:api", "monitor", "service:web"])
NAMES = st.sampled_from(["http", "a", "b", "c"])
FLAVOURS = st.sampled_from(["pipe", "socketpair"])


@dataclass(eq=False)
class Tracked:
    """One resource the test made: the resource, its witness, and where it is."""

    resource: RawFd | socket.socket
    witness: int | socket.socket
    place: str  # "new", "stored", "taken" or "closed"
    fd: int = -1
    inode: tuple[int, int] = (0, 0)
    witness_fd: int = -1
    witness_inode: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        self.fd = self.resource.fileno()
        self.inode = _inode(self.fd)
        self.witness_fd = self.witness if isinstance(self.witness, int) else self.witness.fileno()
        self.witness_inode = _inode(self.witness_fd)

    def is_open(self) -> bool:
        """Ask the kernel, through the witness, whether the resource end is open."""
        fd = self.witness if isinstance(self.witness, int) else self.witness.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT if isinstance(self.witness, int) else select.POLLIN)
        events = dict(poller.poll(0)).get(fd, 0)
        return not events & (select.POLLERR | select.POLLHUP)

    def close_witness(self) -> None:
        if isinstance(self.witness, int):
            os.close(self.witness)
        else:
            self.witness.close()


def _inode(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def still_has(fd: int, inode: tuple[int, int]) -> bool:
    """Whether ``fd`` is open on ``inode`` (a closed number may be reused for another)."""
    try:
        return _inode(fd) == inode
    except OSError:
        return False


def make(flavour: str) -> Tracked:
    if flavour == "pipe":
        read_end, write_end = os.pipe()
        return Tracked(RawFd(read_end), write_end, "new")
    mine, witness = socket.socketpair()
    return Tracked(mine, witness, "new")


class FdStoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.limit = 4
        self.store = FdStore(limit=self.limit, on_change=self._heard)
        # (owner, name) → its fds in the order stored: several only in a service's store
        self.model: dict[tuple[str, str], list[Tracked]] = {}
        self.tracked: list[Tracked] = []
        self.heard: list[tuple[str, str, str]] = []
        self.expected: list[tuple[str, str, str]] = []

    def _heard(self, event: str, entry: Entry) -> None:
        self.heard.append((event, entry.owner, entry.name))

    def _expect(self, event: str, owner: str, name: str) -> None:
        if not owner.startswith("unit:"):
            self.expected.append((event, owner, name))

    def _new(self, flavour: str) -> Tracked:
        item = make(flavour)
        self.tracked.append(item)
        return item

    def _counted(self) -> int:
        return sum(len(v) for (owner, _), v in self.model.items() if not owner.startswith("unit:"))

    # -- rules --------------------------------------------------------------------------

    @rule(owner=OWNERS, name=NAMES, flavour=FLAVOURS, replace=st.booleans())
    def add(self, owner: str, name: str, flavour: str, replace: bool) -> None:
        item = self._new(flavour)
        key = (owner, name)
        olds = self.model.get(key, [])
        beside = owner.startswith("service:") and not replace
        grows = beside or not olds
        refused = (bool(olds) and not replace and not beside) or (
            grows and not owner.startswith("unit:") and self._counted() >= self.limit
        )
        if refused:
            with pytest.raises(StoreError):
                self.store.add(owner, name, item.resource, replace=replace)
            item.place = "closed"  # a refused resource is closed, never leaked
            return
        self.store.add(owner, name, item.resource, replace=replace)
        if beside:
            self.model[key] = [*olds, item]
        else:
            for old in olds:
                old.place = "closed"  # replaced: the old fds are closed
            self.model[key] = [item]
        item.place = "stored"
        self._expect("FD_STORED", owner, name)

    @rule(owner=OWNERS, name=NAMES)
    def take(self, owner: str, name: str) -> None:
        items = self.model.get((owner, name))
        if not items:
            with pytest.raises(StoreError, match=f"File descriptor named '{name}' not found"):
                self.store.take(owner, name)
            return
        item = items.pop(0)
        if not items:
            del self.model[(owner, name)]
        assert self.store.take(owner, name) is item.resource
        item.place = "taken"
        self._expect("FD_CLOSED", owner, name)

    @rule(owner=OWNERS, name=NAMES)
    def close(self, owner: str, name: str) -> None:
        items = self.model.pop((owner, name), None)
        if items is None:
            with pytest.raises(StoreError):
                self.store.close(owner, name)
            return
        self.store.close(owner, name)  # every fd of the name
        for item in items:
            item.place = "closed"
            self._expect("FD_CLOSED", owner, name)

    @rule(owner=OWNERS)
    def close_owner(self, owner: str) -> None:
        gone = [key for key in self.model if key[0] == owner]
        assert self.store.close_owner(owner) == sum(len(self.model[key]) for key in gone)
        # The store closes in the order stored, which interleaves names (a, http,
        # a again); the model keeps fds by name: the same events, in its order.
        expected_from = len(self.expected)
        for key in gone:
            for item in self.model.pop(key):
                item.place = "closed"
                self._expect("FD_CLOSED", *key)
        batch = self.expected[expected_from:]
        heard = self.heard[len(self.heard) - len(batch) :] if batch else []
        assert sorted(heard) == sorted(batch)
        self.expected[expected_from:] = heard

    @rule(limit=st.integers(min_value=0, max_value=6))
    def set_limit(self, limit: int) -> None:
        # Lowering the limit below what is stored evicts nothing; it only refuses growth.
        self.limit = self.store.limit = limit

    @precondition(lambda self: any(t.place == "taken" for t in self.tracked))
    @rule(data=st.data())
    def release_taken(self, data: st.DataObject) -> None:
        taken = [t for t in self.tracked if t.place == "taken"]
        item = data.draw(st.sampled_from(taken))
        item.resource.close()
        item.place = "closed"

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def every_change_was_heard_once(self) -> None:
        assert self.heard == self.expected

    @invariant()
    def sizes_match_the_model(self) -> None:
        assert len(self.store) == sum(len(items) for items in self.model.values())
        assert self.store.counted() == self._counted()
        assert {(e.owner, e.name) for e in self.store} == set(self.model)

    @invariant()
    def stored_entries_are_the_very_resources(self) -> None:
        for (owner, name), items in self.model.items():
            entry = self.store.get(owner, name)
            assert entry is not None and entry.resource is items[0].resource
            assert [e.resource for e in self.store.named(owner, name)] == [
                item.resource for item in items
            ]
            assert (owner, name) in self.store
            os.fstat(entry.fd)  # a live fd
        for owner in ("unit:web", "unit:api", "monitor", "service:web"):
            expected = {n for o, n in self.model if o == owner}
            assert {e.name for e in self.store.owned_by(owner)} == expected

    @invariant()
    def every_fd_is_stored_taken_or_closed(self) -> None:
        for item in self.tracked:
            assert item.place in ("stored", "taken", "closed")
            assert item.is_open() == (item.place != "closed"), item
            assert still_has(item.fd, item.inode) == (item.place != "closed"), item

    def teardown(self) -> None:
        self.store.close_all()
        assert len(self.store) == 0
        for item in self.tracked:
            if item.place == "taken":
                item.resource.close()
            item.place = "closed"
        for item in self.tracked:
            assert not item.is_open(), f"close_all left {item} open"
            item.close_witness()
        for item in self.tracked:
            assert not still_has(item.fd, item.inode), f"{item} leaked"
            assert not still_has(item.witness_fd, item.witness_inode), f"{item}'s witness leaked"


FdStoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_fd_store_state_machine = FdStoreMachine.TestCase
