"""A socket-activated Python worker for bench/activation.py.

Takes the listening socket at fd 3 (``LISTEN_FDS``), and for each
connection writes ``hi\\n`` and closes it; serves until it is signalled.
The socket may be non-blocking (a supervisor that watches it for traffic
may have made it so): wait for it to be readable before ``accept()``.
"""

import os
import select
import socket
import sys

if int(os.environ.get("LISTEN_FDS", "0")) < 1:
    sys.exit("reply.py: no LISTEN_FDS")
listener = socket.socket(fileno=3)
poller = select.poll()
poller.register(3, select.POLLIN)
while True:
    poller.poll()
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
        continue
    conn.sendall(b"hi\n")
    conn.close()
