"""`make bench`: every benchmark in bench/, in one run; writes docs/benchmarks.md.

Each benchmark prints its own table (medians, min-max, peers' versions, ratios) and saves
JSON under bench/results/. This script runs them one after the other, shows their output as
it comes, and writes docs/benchmarks.md from what they printed: the workload (each script's
docstring), the command and the table, verbatim, with the machine and the git revision. The
analysis of the figures lives in docs/performance.md, which this never touches.
``run_all.py getfd.py`` re-runs only the benchmarks named and replaces only their sections.
"""

from __future__ import annotations

import ast
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCHMARKS = [
    "getfd.py",
    "activation.py",
    "accept_rate.py",
    "restart_gap.py",
    "rolling_restart.py",
    "scale.py",
]

# Benchmarks that draw a chart (matplotlib, the bench extra) for docs/performance.md.
CHARTS = {"scale.py": ["--chart", str(ROOT / "docs" / "scale.png")]}


def run(name: str) -> tuple[int, str]:
    """Run one benchmark, echoing its output; returns (exit status, output)."""
    command = [
        sys.executable,
        str(HERE / name),
        "--json",
        str(HERE / "results" / f"{name[:-3]}.json"),
        *CHARTS.get(name, []),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    return process.wait(), "".join(lines)


def workload(name: str) -> str:
    docstring = ast.get_docstring(ast.parse((HERE / name).read_text())) or ""
    return docstring.strip()


def machine() -> str:
    revision = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        or "unknown"
    )
    return (
        f"{platform.node()}: {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, fdsupervisor at "
        f"{revision}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC"
    )


def heading(name: str) -> str:
    return f"## `bench/{name}`\n"


def replace_sections(report: str, sections: dict[str, str]) -> str:
    """``report`` with the sections of ``sections`` replaced (or appended), the rest kept."""
    for name, section in sections.items():
        start = report.find(heading(name))
        if start < 0:
            report = report.rstrip("\n") + "\n\n" + section
            continue
        end = report.find("\n## ", start + 1)
        end = len(report) if end < 0 else end + 1
        report = report[:start] + section + ("\n" if end < len(report) else "") + report[end:]
    return report


def main() -> int:
    """All benchmarks: a new report. Some named (``run_all.py getfd.py``): their sections of
    the existing report are replaced, each saying when and at which revision it ran."""
    named = sys.argv[1:]
    names = named or [n for n in BENCHMARKS if (HERE / n).exists()]
    sections, failures = {}, 0
    for name in names:
        print(f"== {name}", flush=True)
        status, output = run(name)
        failures += status != 0
        verdict = "" if status == 0 else f"\n(exited with status {status}: see the output)\n"
        alone = f"Run alone: {machine()}.\n\n" if named else ""
        sections[name] = (
            f"{heading(name)}\n{workload(name)}\n\n{alone}Command: "
            f"`.venv/bin/python bench/{name}`\n\n```\n{output.rstrip()}\n```\n{verdict}"
        )
    report = ROOT / "docs" / "benchmarks.md"
    if named and report.exists():
        report.write_text(replace_sections(report.read_text(), sections))
    else:
        report.write_text(
            "# Benchmarks\n\n"
            "Written by `make bench` (bench/run_all.py) from what each benchmark printed; do not "
            "edit by hand. Every benchmark runs against its real peer on the same machine in the "
            "same run and reports medians with min-max and ratios; they are measurements, not "
            "tests. What the figures mean and where the time goes: "
            "[performance.md](performance.md).\n\n"
            f"Machine: {machine()}.\n\n" + "\n".join(sections.values())
        )
    print(f"wrote {report}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
