"""The docs say what the code does: the unit reference lists exactly the accepted keys."""

from __future__ import annotations

import re
from pathlib import Path

from fdsupervisor import units
from tests.monitor_client import MONITOR_COMMANDS

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


def test_trigger_limit_keys() -> None:
    assert documented_keys("`sockets.NAME.trigger-limit`") == set(units._TRIGGER_LIMIT_KEYS)


def test_limit_keys() -> None:
    assert documented_keys("`service.limits`") == set(units.LIMIT_UNITS)


def test_start_limit_keys() -> None:
    assert documented_keys("`service.start-limit`") == set(units._START_LIMIT_KEYS)


def documented_commands() -> list[str]:
    """The command names in the first column of the first table under docs/monitor.md's
    "Commands" (the table of error texts after it names commands too)."""
    text = (DOCS / "monitor.md").read_text()
    section = text.split("\n## Commands\n", 1)[1].lstrip("\n")
    table = section.split("\n\n", 1)[0]
    names = []
    for line in table.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([a-z_-]+)`", line.split(" | ")[0])
    return names


def test_monitor_reference_lists_every_command() -> None:
    """Exactly the commands the monitor answers (test_monitor checks a live query-commands)."""
    documented = documented_commands()
    assert len(documented) == len(set(documented)), f"a command documented twice: {documented}"
    assert sorted(documented) == sorted(MONITOR_COMMANDS)


ROOT = DOCS.parent
PACKAGE = ROOT / "fdsupervisor"


def tabled_modules(path: Path, heading: str) -> list[str]:
    """The file names in the first column of the table under ``heading`` in ``path``."""
    section = path.read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first = line.split(" | ")[0]
            names += re.findall(r"`([a-z_]+\.(?:py|c))`", first)
    return names


def package_modules() -> list[str]:
    """Every module of the package (and the C exec step), without the package's own two."""
    names = [path.name for path in PACKAGE.glob("*.py") if not path.name.startswith("__")]
    return sorted([*names, *(path.name for path in PACKAGE.glob("*.c"))])


def test_the_readme_layout_names_every_module_once() -> None:
    tabled = tabled_modules(ROOT / "README.md", "Layout")
    assert len(tabled) == len(set(tabled)), f"a module listed twice: {tabled}"
    assert sorted(tabled) == package_modules()


def test_the_architecture_names_every_module_once() -> None:
    tabled = tabled_modules(DOCS / "architecture.md", "One line per module")
    assert len(tabled) == len(set(tabled)), f"a module listed twice: {tabled}"
    assert sorted(tabled) == package_modules()


def test_the_export_table_says_what_becomes_of_every_key() -> None:
    """docs/systemd.md's export table has a row for each key: mapped, refused or dropped."""
    text = (DOCS / "systemd.md").read_text()
    section = text.split("\n## Export to systemd (fleets)\n", 1)[1].split("\n## ", 1)[0]
    named = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            words = re.findall(r"`([^`]+)`", line.split(" | ")[0])
            named |= {re.split(r"[ :]", word, maxsplit=1)[0] for word in words}
    keys = set(units._SOCKET_KEYS) | set(units._SERVICE_KEYS)
    assert keys - named == set()
