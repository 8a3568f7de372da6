"""upgrade.HandoverState: what crosses an upgrade's exec, and reads back the same."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fdsupervisor.upgrade import (
    STATE_VERSION,
    CommandLineUnit,
    HandoverState,
    RunConfig,
    ServiceItem,
    StoredItem,
    UnitFile,
    UpgradeError,
    WorkerItem,
)


def test_the_notify_fd_is_handed_over_and_read_back() -> None:
    state = HandoverState(
        ("run", "units"), (StoredItem("unit:web", "http", 5, True),), {}, 6, notify_fd=7
    )
    assert state.fds == (5, 6, 7)  # all made inheritable for the exec, none taken as inherited
    again = HandoverState.from_json(state.to_json())
    assert again == state and again.notify_fd == 7


def test_a_state_without_it_still_reads() -> None:
    """An older program's state: the new one binds a fresh notify socket."""
    raw = json.loads(HandoverState(("run",), (), {}, None, notify_fd=3).to_json())
    del raw["notify_fd"]
    state = HandoverState.from_json(json.dumps(raw).encode())
    assert state.notify_fd is None and state.fds == ()


# --------------------------------------------------------------------------- round trip

texts = st.text(max_size=12)
optional_texts = st.none() | texts
counts = st.integers(min_value=0, max_value=2**31)
fds = st.integers(min_value=3, max_value=2**20)

stored_items = st.builds(
    StoredItem,
    owner=st.sampled_from(["unit:web", "service:web", "monitor"]) | texts,
    name=texts,
    fd=fds,
    socket=st.booleans(),
    kind=st.sampled_from(["stream", "datagram", "seqpacket"]),
    backlog=counts,
    created_path=optional_texts,
    created_inode=st.none() | st.tuples(counts, counts),
    watch_hangup=st.booleans(),
)
worker_items = st.builds(
    WorkerItem,
    instance=counts,
    pid=st.integers(min_value=1, max_value=2**22),
    started_at=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    ready=st.booleans(),
    failure=optional_texts,
)
service_items = st.builds(
    ServiceItem,
    state=st.sampled_from(["inactive", "listening", "starting", "running", "stopping", "failed"]),
    restarts=counts,
    last_exit=st.none() | st.dictionaries(st.sampled_from(["code", "signal"]), counts),
    status=optional_texts,
    failure=optional_texts,
    connections=counts,
    workers=st.lists(worker_items, max_size=3).map(tuple),
)
command_lines = st.builds(
    CommandLineUnit,
    listens=st.lists(st.tuples(texts, texts), max_size=3).map(tuple),
    command=st.lists(texts, min_size=1, max_size=3).map(tuple),
    accept=st.booleans(),
    on_demand=st.booleans(),
    inetd=st.booleans(),
)
run_configs = st.builds(
    RunConfig,
    log_format=st.sampled_from(["auto", "json", "console"]),
    max_stored_fds=counts,
    unit_paths=st.lists(texts, max_size=3).map(tuple),
    unit_files=st.lists(st.builds(UnitFile, path=texts, text=st.text()), max_size=3).map(tuple),
    command_line=st.none() | command_lines,
    monitor_path=optional_texts,
    monitor_allowed_uids=st.lists(counts, max_size=3).map(tuple),
    use_cgroups=st.booleans(),
)
states = st.builds(
    HandoverState,
    argv=st.lists(texts, max_size=4).map(tuple),
    store=st.lists(stored_items, max_size=4).map(tuple),
    services=st.dictionaries(texts, service_items, max_size=3),
    monitor_fd=st.none() | fds,
    notify_fd=st.none() | fds,
    config=st.none() | run_configs,
    monitor_inode=st.none() | counts,
)


@given(states)
def test_every_state_crosses_the_exec_unchanged(state: HandoverState) -> None:
    """HandoverState → JSON → HandoverState is the identity, whatever the text in it."""
    raw = state.to_json()
    again = HandoverState.from_json(raw)
    assert again == state
    assert again.fds == state.fds  # the fds made inheritable are the fds adopted
    assert again.to_json() == raw
    assert json.loads(raw)["version"] == STATE_VERSION


@given(states, st.integers() | st.none() | st.text(max_size=3))
def test_another_version_is_refused_whole(state: HandoverState, version: object) -> None:
    assume(version != STATE_VERSION)
    raw = json.loads(state.to_json())
    raw["version"] = version
    with pytest.raises(UpgradeError, match="cannot hand over"):
        HandoverState.from_json(json.dumps(raw).encode())
