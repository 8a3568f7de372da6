"""A test worker: tells every client what it inherited, as JSON on one line.

It snapshots its open fds before doing anything else, reads its sockets
with systemd-python's ``listen_fds_with_names()`` as a real worker would,
prints ``report-worker ready pid=N`` to stderr, then answers each stream
connection (and each datagram) with the report and the client's first line.
SIGTERM ends it as the default action does (killed by SIGTERM), but only once
the connection in hand is answered, as a real worker finishes its request.
"""

import json
import os
import selectors
import signal
import socket
import sys

OPEN_AT_START = sorted(int(n) for n in os.listdir("/proc/self/fd"))
ENV_AT_START = dict(os.environ)

from systemd import daemon  # noqa: E402 - after the snapshot on purpose


def fd_snapshot():
    listing_fd_excluded = []
    for name in OPEN_AT_START:
        try:
            os.fstat(name)
        except OSError:
            continue  # the fd os.listdir used for the listing itself
        listing_fd_excluded.append(name)
    return listing_fd_excluded


class Stop:
    """SIGTERM: die by it at once, or after the connection in hand (then ``serving``)."""

    serving = False
    asked = False

    @classmethod
    def on_sigterm(cls, signum, frame):
        cls.asked = True
        if not cls.serving:
            cls.die()

    @staticmethod
    def die():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def main():
    signal.signal(signal.SIGTERM, Stop.on_sigterm)
    fds = daemon.listen_fds_with_names()
    report = {
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "ppid": os.getppid(),
        "listen_pid": ENV_AT_START.get("LISTEN_PID"),
        "listen_fds": ENV_AT_START.get("LISTEN_FDS"),
        "listen_fdnames": ENV_AT_START.get("LISTEN_FDNAMES"),
        "names": {str(fd): name for fd, name in fds.items()},
        "open_fds": fd_snapshot(),
        "argv": sys.argv[1:],
        "env": {
            k: v
            for k, v in ENV_AT_START.items()
            if k.startswith(("APP_", "LISTEN_", "NOTIFY_", "WATCHDOG_", "TEST_"))
        },
        "cwd": os.getcwd(),
        "uid": os.getuid(),
    }
    line = json.dumps(report).encode() + b"\n"
    selector = selectors.DefaultSelector()
    for fd in fds:
        sock = socket.socket(fileno=fd)
        selector.register(sock, selectors.EVENT_READ)
    # One write(): the supervisor logs to the same pipe, and print() would write
    # the text and its newline apart, letting a log line land between them.
    sys.stderr.write(f"report-worker ready pid={os.getpid()}\n")
    sys.stderr.flush()
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if sock.type == socket.SOCK_DGRAM:
                _data, peer = sock.recvfrom(65536)
                if peer:
                    sock.sendto(line, peer)
                continue
            Stop.serving = True
            try:
                conn, _ = sock.accept()
                with conn:
                    conn.sendall(line)
            except OSError:
                pass
            finally:
                Stop.serving = False
            if Stop.asked:
                Stop.die()


if __name__ == "__main__":
    main()
