"""Export to systemd: a validated :class:`~fdsupervisor.units.Unit` → systemd unit files.

A side branch of the flow (after units.py, instead of binding): the same unit
files run on a fleet's machines under their own systemd. Pure: :func:`export_unit`
turns a unit into file names and texts, and raises :class:`ConfigError` at the
key that systemd cannot express (``cannot be exported to systemd: WHY``);
:func:`write_files` then replaces each file whole (temporary name + rename).
The mapping is docs/systemd.md's table; each key cites its systemd.socket(5) or
systemd.service(5) / systemd.unit(5) name.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from .addresses import FdAddress, FifoAddress, InetAddress, UnixAddress, VsockAddress
from .errors import ConfigError, ConfigErrors, Location, ValueProblem
from .fdpassing import LISTEN_FDS_START
from .units import (
    RLIM_INFINITY,
    Activation,
    FdStorePreserve,
    ResourceLimit,
    RestartPolicy,
    ServiceSpec,
    SocketKind,
    SocketSpec,
    Unit,
    expand_placeholders,
)

_LISTEN: dict[SocketKind, str] = {
    SocketKind.STREAM: "ListenStream",
    SocketKind.DATAGRAM: "ListenDatagram",
    SocketKind.SEQPACKET: "ListenSequentialPacket",
    SocketKind.FIFO: "ListenFIFO",
}
# systemd passes its fds to the service and nothing else: our stdout/stderr values
# that systemd has an equal for (systemd.exec(5) StandardOutput=).
_OUTPUTS: dict[str, str] = {"inherit": "journal", "journal": "journal", "null": "null"}


@dataclass(frozen=True, slots=True)
class ExportedFile:
    name: str
    text: str


class _Marks:
    """Where each key of the unit's text is (the loader keeps the text, not the marks)."""

    def __init__(self, unit: Unit) -> None:
        self.unit = unit
        self.root: Node | None = None
        if unit.text is not None:
            with contextlib.suppress(yaml.YAMLError):
                self.root = yaml.compose(unit.text)

    def node(self, path: Sequence[str]) -> Node | None:
        node = self.root
        for key in path:
            if not isinstance(node, MappingNode):
                return None
            found = [v for k, v in node.value if isinstance(k, ScalarNode) and k.value == key]
            if not found:
                return None
            node = found[0]
        return node

    def given(self, *path: str) -> bool:
        return self.node(path) is not None

    def error(self, path: Sequence[str], why: str) -> ConfigError:
        node = self.node(path)
        if node is None:  # not written out (a default): the unit's own place
            location = Location(str(self.unit.source), 1 if self.root is not None else 0, 1)
        else:
            mark = node.start_mark
            location = Location(str(self.unit.source), mark.line + 1, mark.column + 1)
        return ConfigError(location, path, f"cannot be exported to systemd: {why}")


def _quote(word: str) -> str:
    """One ExecStart= word: systemd.service(5) "Command lines" quoting, % and $ escaped."""
    escaped = word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    escaped = escaped.replace("$", "$$")
    if escaped and all(c not in escaped for c in " \t\n'\";"):
        return escaped
    return f'"{escaped}"'


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _listen_value(spec: SocketSpec, unit: Unit, marks: _Marks) -> str:
    address, path = spec.address, ("sockets", spec.name, "listen")
    if isinstance(address, InetAddress):
        if address.to is not None:
            raise marks.error(
                (*path, "to"), "systemd binds one port, not the first free of a range"
            )
        if not address.port.isdecimal():
            raise marks.error((*path, "port"), "systemd takes a port number, not a service name")
        if address.ipv4 is not None or address.ipv6 is not None:
            raise marks.error(
                path, "ipv4/ipv6 have no per-address equal (BindIPv6Only= is per unit)"
            )
        if address.keep_alive is not None:
            raise marks.error((*path, "keep-alive"), "use the socket's keep-alive (KeepAlive=)")
        host = address.host
        if host in ("", "0.0.0.0"):
            return address.port if host == "" else f"0.0.0.0:{address.port}"
        return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"
    if isinstance(address, UnixAddress):
        if address.abstract:
            if not address.tight:
                raise marks.error((*path, "tight"), "systemd binds abstract names tight only")
            return "@" + address.path
        return str(unit.base_dir / address.path)
    if isinstance(address, VsockAddress):
        return f"vsock:{address.cid}:{address.port}"
    if isinstance(address, FifoAddress):
        return str(unit.base_dir / address.path)
    assert isinstance(address, FdAddress)
    raise marks.error(path, "systemd binds its own sockets and cannot take an inherited fd")


def _socket_text(unit: Unit, spec: SocketSpec, marks: _Marks) -> str:
    service = unit.service
    lines = ["[Unit]", f"Description=fdsupervisor unit {unit.name}: socket {spec.name}", ""]
    lines += ["[Socket]", f"{_LISTEN[spec.kind]}={_listen_value(spec, unit, marks)}"]
    lines.append(f"FileDescriptorName={spec.name}")
    if spec.kind is not SocketKind.FIFO:  # a FIFO has no backlog
        lines.append(f"Backlog={spec.backlog}")
    options = [
        ("ReusePort", spec.reuse_port),
        ("KeepAlive", spec.keep_alive),
        ("NoDelay", spec.no_delay),
        ("FreeBind", spec.free_bind),
    ]
    lines += [f"{key}=yes" for key, value in options if value]
    if spec.receive_buffer is not None:
        lines.append(f"ReceiveBuffer={spec.receive_buffer}")
    if spec.send_buffer is not None:
        lines.append(f"SendBuffer={spec.send_buffer}")
    if spec.mode is not None:
        lines.append(f"SocketMode={spec.mode:04o}")
    if spec.user is not None:
        lines.append(f"SocketUser={spec.user}")
    if spec.group is not None:
        lines.append(f"SocketGroup={spec.group}")
    lines.append(f"DirectoryMode={spec.directory_mode:04o}")
    if service.accept:
        lines += ["Accept=yes", f"MaxConnections={service.max_connections}"]
    if spec.max_connections_per_source is not None:  # the loader allows it with accept only
        lines.append(f"MaxConnectionsPerSource={spec.max_connections_per_source}")
    lines += [f"Service={unit.name}.service"] if not service.accept else []
    lines += ["", "[Install]", "WantedBy=sockets.target", ""]
    return "\n".join(lines)


def _service_text(unit: Unit, marks: _Marks, sockets: Sequence[str]) -> str:
    service = unit.service
    _refuse_service_keys(service, marks)
    fd_numbers = {name: LISTEN_FDS_START for name in unit.socket_names}
    try:
        words = [expand_placeholders(word, fd_numbers, 0) for word in service.exec]
    except ValueProblem as exc:  # pragma: no cover - a loaded unit's placeholders are checked
        raise marks.error(("service", "exec"), str(exc)) from None
    lines = ["[Unit]", f"Description=fdsupervisor unit {unit.name}"]
    lines.append(f"StartLimitBurst={service.start_limit_burst}")
    lines.append(f"StartLimitIntervalSec={_duration(service.start_limit_interval)}")
    lines += ["", "[Service]", "Type=notify" if service.notify else "Type=simple"]
    lines.append("ExecStart=" + " ".join(_quote(word) for word in words))
    if len(sockets) > 1:
        lines.append("Sockets=" + " ".join(sockets))
    lines.append(f"Restart={service.restart.value}")
    lines.append(f"RestartSec={_duration(service.restart_delay)}")
    lines.append(f"KillSignal={signal.Signals(service.stop_signal).name}")
    lines.append(f"TimeoutStopSec={_duration(service.stop_timeout)}")
    lines.append(f"TimeoutStartSec={_duration(service.start_timeout)}")
    if service.watchdog:
        lines.append(f"WatchdogSec={_duration(service.watchdog)}")
    if service.fd_store_max:
        lines.append(f"FileDescriptorStoreMax={service.fd_store_max}")
    if service.fd_store_preserve is not FdStorePreserve.RESTART:  # systemd's default otherwise
        lines.append(f"FileDescriptorStorePreserve={service.fd_store_preserve.value}")
    if service.user is not None:
        lines.append(f"User={service.user}")
    if service.group is not None:
        lines.append(f"Group={service.group}")
    if service.working_directory is not None:
        lines.append(f"WorkingDirectory={unit.base_dir / service.working_directory}")
    if service.umask is not None:
        lines.append(f"UMask={service.umask:04o}")
    if service.no_new_privileges:
        lines.append("NoNewPrivileges=yes")
    for limit in service.limits:
        lines.append(f"Limit{limit.name.upper()}={_limit_value(limit)}")
    for key, value in service.environment:
        lines.append("Environment=" + _quote(f"{key}={value}"))
    if service.accept and service.inetd:
        lines += ["StandardInput=socket"]
    lines.append(f"StandardOutput={_OUTPUTS[service.stdout]}")
    lines.append(f"StandardError={_OUTPUTS[service.stderr]}")
    if service.activation is Activation.EAGER and not service.accept:
        lines += ["", "[Install]", "WantedBy=multi-user.target"]
    lines.append("")
    return "\n".join(lines)


def _limit_value(limit: ResourceLimit) -> str:
    """systemd's ``LimitNAME=SOFT[:HARD]`` (systemd.exec(5)): the loader's values are in the
    units a bare number has there (bytes, seconds for cpu, microseconds for rttime, the raw
    rlimit for nice), ``infinity`` as written."""
    soft, hard = (
        "infinity" if value == RLIM_INFINITY else str(value) for value in (limit.soft, limit.hard)
    )
    return soft if soft == hard else f"{soft}:{hard}"


def _refuse_socket_keys(unit: Unit, marks: _Marks) -> None:
    for spec in unit.sockets:
        if spec.trigger_limit is not None:
            raise marks.error(
                ("sockets", spec.name, "trigger-limit"),
                "PollLimitIntervalSec= / PollLimitBurst= need systemd 255; TriggerLimit*= "
                "would stop the socket unit where trigger-limit only pauses it",
            )


def _refuse_service_keys(service: ServiceSpec, marks: _Marks) -> None:
    if service.supplementary_groups is not None:
        raise marks.error(
            ("service", "supplementary-groups"),
            "SupplementaryGroups= adds to the user's own groups, where supplementary-groups "
            "replaces them",
        )
    if service.instances != 1:
        raise marks.error(("service", "instances"), "a systemd service has one main process")
    if service.inetd and not service.accept:
        raise marks.error(("service", "inetd"), "systemd's StandardInput=socket needs Accept=yes")
    if marks.given("service", "restart-delay-max"):
        raise marks.error(
            ("service", "restart-delay-max"),
            "RestartMaxDelaySec= needs systemd 254; RestartSec= is a fixed delay before it",
        )
    for key, value in (("stdout", service.stdout), ("stderr", service.stderr)):
        if value not in _OUTPUTS:
            raise marks.error(("service", key), "systemd has no output to a file of ours")
    if service.restart not in RestartPolicy:  # pragma: no cover - the loader's enum
        raise marks.error(("service", "restart"), service.restart)


def export_unit(unit: Unit) -> list[ExportedFile]:
    """The systemd files of ``unit``; ConfigError at the first key systemd cannot express."""
    marks = _Marks(unit)
    if len(unit.sockets) > 1 and any("{fd:" in word for word in unit.service.exec):
        raise marks.error(
            ("sockets",), "systemd passes several .socket units' fds in no fixed order"
        )
    if not unit.sockets:
        raise marks.error(("sockets",), "a unit without sockets is no socket activation")
    _refuse_socket_keys(unit, marks)
    if unit.service.accept and len(unit.sockets) > 1:  # pragma: no cover - the loader refuses
        raise marks.error(("sockets",), "Accept=yes takes one socket")
    files: list[ExportedFile] = []
    single = len(unit.sockets) == 1
    for spec in unit.sockets:
        name = f"{unit.name}.socket" if single else f"{unit.name}-{spec.name}.socket"
        files.append(ExportedFile(name, _socket_text(unit, spec, marks)))
    service_name = f"{unit.name}@.service" if unit.service.accept else f"{unit.name}.service"
    text = _service_text(unit, marks, [f.name for f in files])
    files.append(ExportedFile(service_name, text))
    return files


def export_units(units: Iterable[Unit]) -> list[ExportedFile]:
    """Every unit's files, or ConfigErrors with every key that cannot be exported."""
    files: list[ExportedFile] = []
    errors: list[ConfigError] = []
    for unit in units:
        try:
            files += export_unit(unit)
        except ConfigError as exc:
            errors.append(exc)
    if errors:
        raise ConfigErrors(errors)
    return files


def write_files(directory: Path, files: Sequence[ExportedFile]) -> list[Path]:
    """Write each file whole: a temporary name in ``directory``, then rename(2) over the old."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for item in files:
        target = directory / item.name
        temporary = directory / f".{item.name}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w", encoding="utf-8") as out:
                out.write(item.text)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temporary, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise
        written.append(target)
    return written
