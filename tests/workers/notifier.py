"""A test worker that speaks sd_notify through systemd-python, in one of several modes.

It prints ``notifier {json}`` (pid, fd names, inodes, watchdog variables) at
start, does what its mode says, then answers each connection on its first
stream socket with that same JSON.
"""

import json
import os
import socket
import sys
import time

from systemd import daemon

MODE = sys.argv[1]
fds = daemon.listen_fds_with_names()
info = {
    "pid": os.getpid(),
    "names": os.environ.get("LISTEN_FDNAMES"),
    "inodes": {name: os.fstat(fd).st_ino for fd, name in fds.items()},
    "named_inodes": [[name, os.fstat(fd).st_ino] for fd, name in sorted(fds.items())],
    "watchdog_usec": os.environ.get("WATCHDOG_USEC"),
    "watchdog_pid": os.environ.get("WATCHDOG_PID"),
    "notify_socket": os.environ.get("NOTIFY_SOCKET"),
}
kept = []
if MODE == "ready":
    daemon.notify("READY=1\nSTATUS=serving requests")
elif MODE == "extend-then-ready":
    # asks for more time than its start-timeout (1 s), and uses it
    daemon.notify("EXTEND_TIMEOUT_USEC=10000000")
    time.sleep(1.5)  # a worker's own pacing: a slow start, past its start-timeout
    daemon.notify("READY=1\nSTATUS=ready after an extension")
elif MODE == "ping-three-times":
    daemon.notify("READY=1")
    for _ in range(3):
        daemon.notify("WATCHDOG=1")
        time.sleep(0.05)  # a worker's own pacing, not test synchronisation
elif MODE == "store":
    if "keep" not in info["names"].split(":"):
        spare = socket.socket()
        spare.bind(("127.0.0.1", 0))
        spare.listen()
        daemon.notify("FDSTORE=1\nFDNAME=keep", fds=[spare.fileno()])
        info["stored_inode"] = os.fstat(spare.fileno()).st_ino
        kept.append(spare)
elif MODE == "store-then-remove":
    pair = socket.socketpair()
    daemon.notify("FDSTORE=1\nFDNAME=gone", fds=[pair[0].fileno()])
    daemon.notify("FDSTOREREMOVE=1\nFDNAME=gone")
    kept.extend(pair)
elif MODE in ("store-two", "store-two-then-remove"):
    if "pair" not in info["names"].split(":"):
        # two fds under one name, in two messages, and the first again (kept once)
        first, second = socket.socketpair()
        daemon.notify("FDSTORE=1\nFDNAME=pair", fds=[first.fileno()])
        daemon.notify("FDSTORE=1\nFDNAME=pair", fds=[second.fileno(), first.fileno()])
        info["stored_inodes"] = [os.fstat(s.fileno()).st_ino for s in (first, second)]
        kept.extend((first, second))
    if MODE == "store-two-then-remove":
        daemon.notify("FDSTOREREMOVE=1\nFDNAME=pair")
elif MODE == "store-hangup":
    ours, theirs = socket.socketpair()
    daemon.notify("FDSTORE=1\nFDNAME=pair", fds=[ours.fileno()])
    ours.close()
    theirs.close()  # the stored end now sees POLLHUP
print("notifier", json.dumps(info), flush=True)
listener = next((socket.socket(fileno=fd) for fd, name in fds.items() if name == "http"), None)
if listener is None:
    time.sleep(3600)
line = json.dumps(info).encode()
while True:
    conn, _ = listener.accept()
    with conn:
        conn.sendall(line)
