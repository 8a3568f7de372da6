"""No import cycle in the package, not even one hidden behind ``TYPE_CHECKING`` (issue 10)."""

from __future__ import annotations

import ast
from pathlib import Path

import fdsupervisor

PACKAGE = Path(fdsupervisor.__file__).parent


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports anywhere: top level, functions, TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:
                names = [module] if module else [alias.name for alias in node.names]
            elif module.startswith("fdsupervisor."):
                names = [module.split(".")[1]]
            elif module == "fdsupervisor":
                names = [alias.name for alias in node.names]
            else:
                continue
            found.update(name.split(".")[0] for name in names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fdsupervisor."):
                    found.add(alias.name.split(".")[1])
    return {name for name in found if (PACKAGE / f"{name}.py").exists()} - {path.stem}


def test_the_package_has_no_import_cycle() -> None:
    graph = {path.stem: imports_of(path) for path in PACKAGE.glob("*.py")}
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append([*trail[trail.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*trail, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_commands_reach_the_supervisor_through_control_only() -> None:
    assert "supervisor" not in imports_of(PACKAGE / "commands.py")
