"""A test worker for rolling restarts: a tiny request/response server on the shared socket.

It reads its mode from the file named by ``$MODE_FILE`` at start (so that the
next workers of the same unit may behave otherwise): a number of seconds to
take before ``READY=1`` (its own start-up time, not test synchronisation),
``never`` (it never gets ready and serves nothing) or ``exit`` (it exits 3 at
once). Then it answers each connection on fd 3 with ``PID TAG INSTANCE\\n``
(both from the unit's environment), one connection at a time, and on SIGTERM
finishes the one it has and exits 0; the connections still queued are the
other workers' to take (one listening socket, one accept queue).
"""

import os
import selectors
import signal
import socket
import time
from pathlib import Path

from systemd import daemon

mode = Path(os.environ["MODE_FILE"]).read_text().strip()
wake_read, wake_write = os.pipe()
os.set_blocking(wake_write, False)
signal.set_wakeup_fd(wake_write)
signal.signal(signal.SIGTERM, lambda signum, frame: None)
if mode == "exit":
    raise SystemExit(3)  # a start that fails at once (a bad configuration, say)
if mode == "never":
    os.read(wake_read, 1)  # until SIGTERM
    raise SystemExit(0)
time.sleep(float(mode))
daemon.notify("READY=1")
listener = socket.socket(fileno=3)
listener.setblocking(False)
answer = f"{os.getpid()} {os.environ.get('TAG', '')} {os.environ.get('INSTANCE', '')}\n".encode()
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
selector.register(wake_read, selectors.EVENT_READ)
while True:
    ready = {key.fileobj for key, _ in selector.select()}
    if wake_read in ready:
        break
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        continue  # another worker took it
    with conn:
        conn.setblocking(True)
        conn.settimeout(5)
        conn.recv(64)
        conn.sendall(answer)
