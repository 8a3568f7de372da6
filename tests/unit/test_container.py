"""contrib/container/: the Containerfile and the podman example, checked without a container runtime.

No podman or buildah runs here: the test reads the Containerfile's syntax
(instructions, continuations, the JSON entrypoint), checks that every path
it copies exists in the build context (the repository's root), that the
example unit loads and takes its socket as ``{type: fd, str: "3"}``, and
that the paths the unit and the entrypoint name are the ones the image makes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from fdsupervisor.addresses import FdAddress
from fdsupervisor.units import load_units

ROOT = Path(__file__).resolve().parents[2]
CONTAINER = ROOT / "contrib" / "container"
INSTRUCTIONS = {"FROM", "RUN", "COPY", "ENV", "WORKDIR", "ENTRYPOINT", "CMD", "STOPSIGNAL", "ARG"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in (CONTAINER / "Containerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if line.endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        result.append((word, rest))
        pending = ""
    assert not pending, "a continuation runs off the end"
    return result


def test_syntax() -> None:
    found = instructions()
    assert {word for word, _ in found} <= INSTRUCTIONS
    assert found[0][0] == "FROM" and "debian" in found[0][1]
    assert [w for w, _ in found].count("ENTRYPOINT") == 1


def test_entrypoint_runs_the_installed_command_on_the_units_directory() -> None:
    entrypoint = json.loads(next(rest for word, rest in instructions() if word == "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    run_lines = [rest for word, rest in instructions() if word == "RUN"]
    venv = next(
        rest.split("-m venv ")[1].split()[0] for rest in run_lines if "-m venv /opt" in rest
    )
    assert entrypoint == [f"{venv}/bin/{next(iter(scripts))}", "run", "/etc/fdsupervisor/units"]


def test_copied_paths_exist_and_the_unit_paths_are_in_the_image() -> None:
    copies: dict[str, str] = {}
    for word, rest in instructions():
        if word != "COPY" or rest.startswith("--from="):
            continue
        *sources, target = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            copies[source] = target
    assert copies["contrib/container/units"] == "/etc/fdsupervisor/units"
    [unit] = load_units([CONTAINER / "units"])
    assert unit.sockets[0].address == FdAddress("3")
    program, script = unit.service.exec
    assert program == "/opt/fdsupervisor/bin/python"
    assert copies["contrib/workers/echo.py"] == script


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_podman_socket_activation_units_verify(tmp_path: Path) -> None:
    """systemd accepts both files; only the missing podman binary may be reported."""
    names = ["fdsupervisor-container.socket", "fdsupervisor-container.service"]
    for name in names:
        shutil.copy(CONTAINER / name, tmp_path / name)
    result = subprocess.run(
        ["systemd-analyze", "verify", *(str(tmp_path / n) for n in names)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = [
        line
        for line in result.stderr.splitlines()
        if "/usr/bin/podman is not executable" not in line
    ]
    assert problems == []
    socket_text = (CONTAINER / names[0]).read_text()
    assert "ListenStream=127.0.0.1:8472" in socket_text
    assert "localhost/fdsupervisor" in (CONTAINER / names[1]).read_text()
