"""Shared helpers for the benchmarks: peers, readiness, statistics, reports.

Benchmarks are not tests: they measure, print medians, min-max and ratios
against the real peers on this machine, in one run. Loopback and Unix
sockets only; every loop is bounded in count.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


def fdsupervisor_command() -> list[str]:
    return [sys.executable, "-m", "fdsupervisor"]


def bench_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def wait_for_unix_socket(
    path: Path, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Until something accepts connections at ``path`` (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(path))
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        time.sleep(0.01)  # polling a peer we do not control; not a test
    raise TimeoutError(f"nothing listens on {path} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@dataclass
class Series:
    name: str
    values: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def row(self) -> str:
        return (
            f"{self.name:<44} {self.median:>10.1f} {self.unit:<10} "
            f"(min {min(self.values):.1f}, max {max(self.values):.1f}, n={len(self.values)})"
        )


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def version_of(command: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(command), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"
