"""A raw QMP client for tests that need bytes and fds exactly as they are sent."""

from __future__ import annotations

import array
import json
import socket
from pathlib import Path
from typing import Any

# Every command the monitor answers, in the order query-commands lists them:
# SPEC 5's table, then upgrade (docs/monitor.md; SIGUSR2's twin).
MONITOR_COMMANDS = (
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "getfd",
    "closefd",
    "query-fds",
    "fd-retrieve",
    "socket-add",
    "socket-del",
    "query-sockets",
    "query-services",
    "service-start",
    "service-stop",
    "service-restart",
    "reload",
    "upgrade",
)


class RawClient:
    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buffer = b""
        self.fds: list[int] = []
        self.greeting = self.read()

    def negotiate(self) -> RawClient:
        assert self.command("qmp_capabilities") == {"return": {}}
        return self

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
        else:
            self.sock.sendall(data)

    def command(self, name: str, fds: list[int] | None = None, **arguments: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"execute": name}
        if arguments:
            message["arguments"] = arguments
        self.send(json.dumps(message).encode(), fds)
        return self.reply()

    def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            message = self.read()
            if "event" not in message:
                return message

    def read(self) -> dict[str, Any]:
        while b"\r\n" not in self.buffer:
            data, ancillary, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % 4])
                    self.fds.extend(received)
            if not data:
                raise EOFError("monitor closed the connection")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return dict(json.loads(line))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
