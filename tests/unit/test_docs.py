"""The docs say what the code does: the unit reference lists exactly the accepted keys."""

from __future__ import annotations

import re
from pathlib import Path

from fdsupervisor import units

DOCS = Path(__file__).resolve().parents[2] / "docs"


def documented_keys(heading: str) -> set[str]:
    """The first column of the table under ``heading`` in docs/units.md."""
    text = (DOCS / "units.md").read_text()
    section = (
        text.split(f"\n## {heading}\n", 1)[1]
        if f"\n## {heading}\n" in text
        else (text.split(f"\n### {heading}\n", 1)[1])
    )
    keys = set()
    for line in section.splitlines():
        if line.startswith("## ") or line.startswith("### "):
            break
        match = re.match(r"\| `([a-z-]+)` \|", line)
        if match:
            keys.add(match.group(1))
    return keys


def test_top_level_keys() -> None:
    assert documented_keys("Top level") == set(units._TOP_KEYS)


def test_socket_keys() -> None:
    assert documented_keys("`sockets.NAME`") == set(units._SOCKET_KEYS)


def test_service_keys() -> None:
    assert documented_keys("`service`") == set(units._SERVICE_KEYS)


def test_start_limit_keys() -> None:
    assert documented_keys("`service.start-limit`") == set(units._START_LIMIT_KEYS)


def test_monitor_reference_lists_every_command() -> None:
    from fdsupervisor.commands import Commands

    text = (DOCS / "monitor.md").read_text()
    commands = Commands(None).table  # type: ignore[arg-type]
    assert "getfd" in commands
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for name in ("qmp_capabilities", *commands):
        assert any(f"`{name}`" in row.split(" | ")[0] for row in rows), f"no row for {name}"
