#!/usr/bin/env python3
"""An echo worker for fdsupervisor (or systemd): serves every socket it inherits.

It reads its sockets the standard way, with systemd-python's
``listen_fds_with_names()``, so it runs unchanged under systemd, under
``systemd-socket-activate`` and under fdsupervisor. Stream sockets echo
each line back prefixed with the worker's pid; datagram sockets echo each
datagram. Startup prints one line to stderr: ``echo: ready pid=N fds=...``.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

from systemd import daemon


def main() -> int:
    fds = daemon.listen_fds_with_names(unset_environment=True)
    if not fds:
        print("echo: no sockets passed (LISTEN_FDS is not set for this process)", file=sys.stderr)
        return 1
    selector = selectors.DefaultSelector()
    for fd, name in fds.items():
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, ("listen", name))
    names = ",".join(f"{name}={fd}" for fd, name in fds.items())
    # one write() for the whole line: the supervisor may log to the same pipe
    sys.stderr.write(f"echo: ready pid={os.getpid()} fds={names}\n")
    sys.stderr.flush()
    prefix = f"{os.getpid()} ".encode()
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            role = key.data[0]
            if role == "listen" and sock.type == socket.SOCK_DGRAM:
                try:
                    data, peer = sock.recvfrom(65536)
                except BlockingIOError:
                    continue
                if peer:
                    sock.sendto(prefix + data, peer)
            elif role == "listen":
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    continue  # another instance took it
                conn.setblocking(False)
                selector.register(conn, selectors.EVENT_READ, ("conn", b""))
            else:
                _serve(selector, sock, key.data[1], prefix)


def _serve(
    selector: selectors.BaseSelector, conn: socket.socket, pending: bytes, prefix: bytes
) -> None:
    try:
        data = conn.recv(65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if not data:
        selector.unregister(conn)
        conn.close()
        return
    pending += data
    *lines, rest = pending.split(b"\n")
    try:
        for line in lines:
            conn.sendall(prefix + line + b"\n")
    except BlockingIOError:
        pass
    except OSError:
        selector.unregister(conn)
        conn.close()
        return
    selector.modify(conn, selectors.EVENT_READ, ("conn", rest))


if __name__ == "__main__":
    sys.exit(main())
