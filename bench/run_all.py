"""`make bench`: every benchmark in bench/, in one run, results under bench/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["getfd.py", "activation.py", "accept_rate.py", "restart_gap.py"]


def main() -> int:
    failures = 0
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        result = subprocess.run(
            [
                sys.executable,
                str(HERE / name),
                "--json",
                str(HERE / "results" / name.replace(".py", ".json")),
            ]
        )
        failures += result.returncode != 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
