"""upgrade.HandoverState: the notify socket's fd crosses the exec with the others."""

from __future__ import annotations

import json

from fdsupervisor.upgrade import HandoverState, StoredItem


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
