"""The naive peer of bench/restart_gap.py: restart a worker that binds its own port.

``naive_supervisor.py [--max-restarts N] -- COMMAND ARGS...`` runs COMMAND,
and whenever it exits runs it again at once, at most N times (default
10000). Nothing holds the listening socket between two workers, so
connections that arrive meanwhile are refused: that is what it shows.
Writes ``started pid=N`` to stderr for each worker. SIGTERM or SIGINT:
kills the current worker, waits for it, exits 0.
"""

import signal
import subprocess
import sys

stopping = False
current: subprocess.Popen[bytes] | None = None


def on_signal(_signum: int, _frame: object) -> None:
    global stopping
    stopping = True
    if current is not None and current.returncode is None:
        current.kill()  # the blocking wait() below then returns


def main() -> int:
    global current
    argv = sys.argv[1:]
    max_restarts = 10000
    if argv[:1] == ["--max-restarts"]:
        max_restarts, argv = int(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.exit("usage: naive_supervisor.py [--max-restarts N] -- COMMAND ARGS...")
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in range(max_restarts + 1):
        if stopping:
            break
        current = subprocess.Popen(argv)
        print(f"started pid={current.pid}", file=sys.stderr, flush=True)
        if stopping:  # the signal came between the check above and Popen
            current.kill()
        current.wait()  # blocks in waitpid: restarts the moment the worker exits
    return 0


if __name__ == "__main__":
    sys.exit(main())
