"""The worker of bench/restart_gap.py: one line in, the same line back, close.

Where its listening socket comes from, one of:
- ``--fd N``: an inherited listening socket (circus's ``$(circus.sockets.web)``);
- ``--bind HOST:PORT``: it binds one itself, with ``SO_REUSEADDR`` (the naive
  supervisor's worker: nothing holds the port while it restarts);
- neither: ``LISTEN_FDS`` (fdsupervisor, systemd), the socket at fd 3.

Prints ``ready pid=N`` on stdout once it listens. Serves one connection at a
time until it is killed. Imports only what it needs: its start-up time is
part of every restart gap measured.
"""

import os
import select
import socket
import sys

CONNECTION_TIMEOUT = 5.0  # a client that never sends its line cannot wedge the worker


def listener_from_args(argv: list[str]) -> socket.socket:
    if len(argv) == 2 and argv[0] == "--fd":
        return socket.socket(fileno=int(argv[1]))
    if len(argv) == 2 and argv[0] == "--bind":
        host, _, port = argv[1].rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
        sock.listen(128)
        return sock
    if not argv and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        if os.environ.get("LISTEN_PID", str(os.getpid())) != str(os.getpid()):
            sys.exit("echo_server.py: LISTEN_PID is not this process")
        return socket.socket(fileno=3)
    sys.exit("usage: echo_server.py [--fd N | --bind HOST:PORT]  (or LISTEN_FDS)")


def serve(listener: socket.socket) -> None:
    # The socket may be non-blocking (its holder may watch it too): poll first.
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    while True:
        poller.poll()
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue
        with conn:
            echo_line(conn)


def echo_line(conn: socket.socket) -> None:
    """Read one line (at most 4 KiB) and send it back; a client that gives up is no error."""
    conn.settimeout(CONNECTION_TIMEOUT)
    try:
        line = b""
        while not line.endswith(b"\n") and len(line) < 4096:
            chunk = conn.recv(4096)
            if not chunk:
                break
            line += chunk
        conn.sendall(line)
    except OSError:
        pass  # the client gave up or reset: next connection


def main() -> None:
    listener = listener_from_args(sys.argv[1:])
    print(f"ready pid={os.getpid()}", flush=True)
    serve(listener)


if __name__ == "__main__":
    main()
