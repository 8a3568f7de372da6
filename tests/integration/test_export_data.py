"""The worker of the export round trip: answers each client with its fd and fd names."""

ANSWER_WORKER = """\
import os, socket, sys
fd = int(sys.argv[1])
server = socket.socket(fileno=fd)
while True:
    conn, _ = server.accept()
    with conn:
        conn.makefile("rb").readline()
        conn.sendall(f"fd={fd} names={os.environ.get('LISTEN_FDNAMES')}\\n".encode())
"""
