"""The worker of bench/rolling_restart.py: takes its time to start, then echoes lines.

``slow_start.py [--fd N] --startup SECONDS --run DIR``: the listening socket is
``--fd N`` (circus's ``$(circus.sockets.web)``) or fd 3 (``LISTEN_FDS``:
fdsupervisor, systemd). It waits ``SECONDS`` before it accepts anything (a
program loading its code and data: the start-up every restart pays), then
says ``READY=1`` when ``NOTIFY_SOCKET`` is set (fdsupervisor's ``notify:
true``; circus has no readiness and ignores it), and serves one line in,
the same line back, one connection at a time. On SIGTERM it finishes the
connection it has and exits 0: what it has not accepted stays in the shared
accept queue for the other workers. ``--run DIR`` only marks the process as
this run's, so that the benchmark can find any that outlived its peer.
"""

import argparse
import os
import select
import signal
import socket
import time

from echo_server import echo_line  # the same echo: this script's directory is on sys.path


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", address)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, default=3)
    parser.add_argument("--startup", type=float, required=True)
    parser.add_argument("--run", required=True)
    args = parser.parse_args()
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    listener = socket.socket(fileno=args.fd)
    listener.setblocking(False)
    time.sleep(args.startup)  # the worker's own start-up time
    notify_ready()
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(wake_read, select.POLLIN)
    while True:
        if any(fd == wake_read for fd, _ in poller.poll()):
            return  # SIGTERM: nothing is half done
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue
        with conn:
            echo_line(conn)  # settimeout() makes it blocking with a timeout


if __name__ == "__main__":
    main()
