"""``fdsupervisor ctl``: a monitor client for people and shell scripts.

A small synchronous QMP client: connect, read the greeting, negotiate, run
one command, print the answer (tables for ``status`` and ``query-fds``,
JSON for ``execute``), or follow the event stream (``events``). fds travel on the command's own ``sendmsg``. Exit
codes: 0 done, 1 the command failed, 2 no supervisor to talk to.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .fdpassing import fds_from_ancillary, rights, rights_space
from .monitor import default_monitor_path


class CtlError(Exception):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class MonitorConnection:
    """One QMP session over a Unix socket, in negotiated (command) mode."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buffer = b""
        self.received_fds: list[int] = []
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise CtlError(
                f"cannot connect to the monitor at {path}: {exc.strerror or exc}; "
                "is the supervisor running? (--monitor PATH)",
                2,
            ) from None
        greeting = self._read_message()
        if "QMP" not in greeting:
            self.sock.close()
            raise CtlError(f"{path} does not speak QMP: {greeting}", 2)
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self.sock.close()
        for fd in self.received_fds:
            os.close(fd)

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, fd: int | None = None
    ) -> Any:
        message: dict[str, Any] = {"execute": command, "id": 1}
        if arguments:
            message["arguments"] = arguments
        data = json.dumps(message).encode() + b"\r\n"
        if fd is None:
            self.sock.sendall(data)
        else:
            self.sock.sendmsg([data], [rights([fd])])
        while True:
            reply = self._read_message()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                error = reply["error"]
                raise CtlError(f"{error.get('class')}: {error.get('desc')}")

    def next_message(self) -> dict[str, Any]:
        """The next reply or event; :class:`CtlError` (exit 2) once the supervisor is gone."""
        try:
            return self._read_message()
        except (ConnectionResetError, json.JSONDecodeError) as exc:
            raise CtlError(f"the monitor connection ended: {exc}", 2) from None

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                65536, rights_space(16), socket.MSG_CMSG_CLOEXEC
            )
            self.received_fds.extend(fds_from_ancillary(ancillary))
            if not data:
                raise CtlError("the supervisor closed the monitor connection", 2)
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--monitor",
        type=Path,
        metavar="PATH",
        help="the supervisor's monitor socket (default as for `run`)",
    )
    sub = parser.add_subparsers(dest="ctl_command", required=True)
    sub.add_parser("status", help="services and sockets, as tables")
    getfd = sub.add_parser("getfd", help="hand one of this process's fds to the store")
    getfd.add_argument("fdname")
    getfd.add_argument(
        "--fd",
        type=int,
        required=True,
        help="the fd number to pass, e.g. 3 with `3<>file` in the shell",
    )
    closefd = sub.add_parser("closefd", help="close a stored fd")
    closefd.add_argument("fdname")
    sub.add_parser("query-fds", help="every stored fd")
    for name in ("service-start", "service-stop", "service-restart"):
        sub.add_parser(name, help=f"{name.split('-')[1]} a unit's service").add_argument("unit")
    sub.add_parser("reload", help="re-read the unit files")
    events = sub.add_parser("events", help="print the monitor's events as they come, until Ctrl-C")
    events.add_argument("--json", action="store_true", help="the raw QMP event objects")
    execute = sub.add_parser("execute", help="any QMP command; prints its JSON result")
    execute.add_argument("qmp_command")
    execute.add_argument("arguments", nargs="?", default=None, help="a JSON object")


def run(args: argparse.Namespace) -> int:
    path = args.monitor or default_monitor_path(os.environ, os.getuid())
    try:
        connection = MonitorConnection(path)
    except CtlError as exc:
        print(f"fdsupervisor ctl: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        if args.ctl_command == "events":
            return follow_events(connection, json_lines=args.json)
        code = _run_command(connection, args)
        sys.stdout.flush()  # here, where an EPIPE is caught, not at the interpreter's exit
        return code
    except BrokenPipeError:
        # The reader went away (`ctl status | head -1`): exit quietly, as other
        # tools do on EPIPE; stdout is pointed at /dev/null so that the
        # interpreter's own flush at exit does not complain again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except CtlError as exc:
        print(f"fdsupervisor ctl: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"fdsupervisor ctl: {exc}", file=sys.stderr)
        return 2
    finally:
        connection.close()


def follow_events(connection: MonitorConnection, *, json_lines: bool) -> int:
    """Print each event as it comes, until Ctrl-C or the supervisor's end (both exit 0)."""
    connection.sock.settimeout(None)  # an idle supervisor sends nothing for hours
    print("fdsupervisor ctl: following events (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            try:
                message = connection.next_message()
            except CtlError as exc:
                # The supervisor stopped (or upgraded itself): the stream is over.
                print(f"fdsupervisor ctl: {exc}; no more events", file=sys.stderr)
                return 0
            if "event" not in message:
                continue
            print(json.dumps(message) if json_lines else event_text(message), flush=True)
    except KeyboardInterrupt:
        return 0


def event_text(message: dict[str, Any]) -> str:
    """One readable line: ``TIMESTAMP EVENT unit=U key=value ...`` (UTC, microseconds)."""
    stamp = message.get("timestamp") or {}
    seconds = int(stamp.get("seconds", 0)) + int(stamp.get("microseconds", 0)) / 1e6
    when = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    data = dict(message.get("data") or {})
    parts = [when, str(message.get("event"))]
    if "unit" in data:
        parts.append(f"unit={data.pop('unit')}")
    for key, value in data.items():
        text = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"{key}={json.dumps(text) if ' ' in text or not text else text}")
    return " ".join(parts)


def _run_command(connection: MonitorConnection, args: argparse.Namespace) -> int:
    command = args.ctl_command
    if command == "status":
        print(
            table(
                connection.execute("query-services"),
                ["unit", "state", "pids", "started", "restarts", "last-exit", "status"],
            )
        )
        print()
        print(table(connection.execute("query-sockets"), ["unit", "id", "address", "kind", "fd"]))
    elif command == "query-fds":
        print(
            table(
                connection.execute("query-fds"),
                ["owner", "fdname", "family", "kind", "listening", "address", "inode"],
            )
        )
    elif command == "getfd":
        try:
            os.fstat(args.fd)
        except OSError as exc:
            raise CtlError(
                f"--fd {args.fd}: this process has no fd {args.fd} open ({exc.strerror}); "
                f"open one in the shell, e.g. `{args.fd}<>FILE`"
            ) from None
        connection.execute("getfd", {"fdname": args.fdname}, fd=args.fd)
    elif command == "closefd":
        connection.execute("closefd", {"fdname": args.fdname})
    elif command.startswith("service-"):
        if command == "service-restart":
            # answered once every new worker is started: each start is bounded by the
            # unit's start-timeout, which may be longer than the usual wait
            connection.sock.settimeout(None)
        connection.execute(command, {"unit": args.unit})
    elif command == "reload":
        print(json.dumps(connection.execute("reload")))
    else:
        try:
            arguments = json.loads(args.arguments) if args.arguments else None
        except json.JSONDecodeError as exc:
            raise CtlError(f"arguments are not JSON: {exc}") from None
        if arguments is not None and not isinstance(arguments, dict):
            raise CtlError("arguments must be a JSON object")
        print(json.dumps(connection.execute(args.qmp_command, arguments), indent=2))
    return 0


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a plain aligned table (``-`` for null, lists joined by commas)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, list):
            return ",".join(str(v) for v in value) or "-"
        if isinstance(value, dict):
            return " ".join(f"{k}={v}" for k, v in value.items())
        return str(value)

    cells = [[c.upper() for c in columns]] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )
