"""No class in the package grows past 500 lines (issue 10: one job per class, readable whole)."""

from __future__ import annotations

import ast
from pathlib import Path

import fdsupervisor

PACKAGE = Path(fdsupervisor.__file__).parent
MAX_CLASS_LINES = 500


def class_sizes() -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                sizes[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return sizes


def test_no_class_is_longer_than_the_budget() -> None:
    sizes = class_sizes()
    assert "runner.py:UnitRunner" in sizes  # the walk found the package's classes
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_CLASS_LINES}
    assert too_long == {}


def test_the_supervisor_is_under_the_budget() -> None:
    """Issue 10: the class that only wires the parts stays *under* 500 lines."""
    assert class_sizes()["supervisor.py:Supervisor"] < MAX_CLASS_LINES
