"""export.py: units → systemd files, pure; keys systemd cannot express fail at their place."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fdsupervisor.errors import ConfigError, ConfigErrors
from fdsupervisor.export import export_unit, export_units, write_files
from fdsupervisor.units import LIMIT_UNITS, load_unit_text

EVERY_KEY = """
sockets:
  web:
    listen: "127.0.0.1:8080"
    backlog: 64
    reuse-port: true
    keep-alive: true
    no-delay: true
    free-bind: true
    receive-buffer: 65536
    send-buffer: 65536
service:
  exec: [/usr/bin/worker, "--fd={fd:web}", "50%", "a b"]
  environment: {MODE: "fast lane"}
  working-directory: /srv
  user: nobody
  group: nogroup
  restart: always
  restart-delay: 250ms
  start-limit: {burst: 3, interval: 20s}
  stop-signal: SIGINT
  stop-timeout: 3s
  notify: true
  start-timeout: 7s
  watchdog: 2s
  fd-store-max: 8
  umask: "0027"
  no-new-privileges: true
  limits:
    cpu: infinity
    fsize: 1G
    data: infinity
    stack: 8M
    core: "0"
    rss: infinity
    nproc: "4096"
    nofile: "1024:4096"
    memlock: 64K
    as: infinity
    locks: "100"
    sigpending: "1000"
    msgqueue: 800K
    nice: "-5"
    rtprio: "0"
    rttime: "1000"
"""


def unit(text: str, name: str = "web") -> object:
    return load_unit_text(
        textwrap.dedent(text), Path(f"/etc/units/{name}.yaml"), Path("/etc/units")
    )


def files(text: str) -> dict[str, str]:
    return {f.name: f.text for f in export_unit(unit(text))}  # type: ignore[arg-type]


def test_every_exportable_key() -> None:
    out = files(EVERY_KEY)
    assert set(out) == {"web.socket", "web.service"}
    socket_lines = out["web.socket"].splitlines()
    for line in [
        "ListenStream=127.0.0.1:8080", "FileDescriptorName=web", "Backlog=64", "ReusePort=yes",
        "KeepAlive=yes", "NoDelay=yes", "FreeBind=yes", "ReceiveBuffer=65536",
        "SendBuffer=65536", "Service=web.service",
    ]:  # fmt: skip
        assert line in socket_lines
    service_lines = out["web.service"].splitlines()
    for line in [
        'ExecStart=/usr/bin/worker --fd=3 50%% "a b"', "Type=notify", "Restart=always",
        "RestartSec=250ms", "StartLimitBurst=3", "StartLimitIntervalSec=20000ms",
        "KillSignal=SIGINT", "TimeoutStopSec=3000ms", "TimeoutStartSec=7000ms",
        "WatchdogSec=2000ms", "FileDescriptorStoreMax=8", "User=nobody", "Group=nogroup",
        "WorkingDirectory=/srv", 'Environment="MODE=fast lane"', "WantedBy=multi-user.target",
        "UMask=0027", "NoNewPrivileges=yes", "LimitNOFILE=1024:4096", "LimitCORE=0",
        "LimitCPU=infinity", "LimitNICE=25", "LimitRTTIME=1000", "LimitMEMLOCK=65536",
        "LimitFSIZE=1073741824", "LimitMSGQUEUE=819200",
    ]:  # fmt: skip
        assert line in service_lines
    written = {line.split("=", 1)[0] for line in service_lines if line.startswith("Limit")}
    assert written == {f"Limit{name.upper()}" for name in LIMIT_UNITS}


def test_accept_mode_writes_a_template() -> None:
    out = files("""
        sockets:
          conn:
            listen: {type: unix, path: run/c.sock}
            mode: "0660"
            user: root
            group: root
            max-connections-per-source: 2
        service: {exec: [/bin/cat], accept: true, inetd: true, max-connections: 9}
        """)
    assert set(out) == {"web.socket", "web@.service"}
    lines = out["web.socket"].splitlines()
    for line in ["ListenStream=/etc/units/run/c.sock", "Accept=yes", "MaxConnections=9",
                 "SocketMode=0660", "SocketUser=root", "SocketGroup=root",
                 "MaxConnectionsPerSource=2"]:  # fmt: skip
        assert line in lines
    assert "StandardInput=socket" in out["web@.service"].splitlines()


@pytest.mark.parametrize(
    ("kind", "key"),
    [("datagram", "ListenDatagram"), ("seqpacket", "ListenSequentialPacket")],
)
def test_listen_kinds(kind: str, key: str) -> None:
    out = files(f"""
        sockets:
          s: {{listen: {{type: unix, path: /run/s.sock}}, kind: {kind}}}
        service: {{exec: [/bin/true]}}
        """)
    assert f"{key}=/run/s.sock" in out["web.socket"].splitlines()


def test_abstract_and_vsock_and_ipv6() -> None:
    out = files("""
        sockets:
          a: {listen: {type: unix, path: name, abstract: true}}
        service: {exec: [/bin/true]}
        """)
    assert "ListenStream=@name" in out["web.socket"]
    out = files("""
        sockets:
          v: {listen: {type: vsock, cid: "2", port: "1024"}}
        service: {exec: [/bin/true]}
        """)
    assert "ListenStream=vsock:2:1024" in out["web.socket"]
    out = files("""
        sockets:
          six: {listen: "[::1]:81"}
        service: {exec: [/bin/true]}
        """)
    assert "ListenStream=[::1]:81" in out["web.socket"]


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("sockets:\n  s: {listen: {type: fd, str: '3'}}\nservice: {exec: [/bin/true]}\n",
         "/etc/units/web.yaml:2:15: sockets.s.listen: cannot be exported to systemd: "),
        ("sockets:\n  s: {listen: '127.0.0.1:80'}\nservice:\n  exec: [/bin/true]\n"
         "  instances: 2\n",
         "/etc/units/web.yaml:5:14: service.instances: cannot be exported to systemd: "),
        ("sockets:\n  s: {listen: '127.0.0.1:80'}\nservice:\n  exec: [/bin/true]\n"
         "  restart-delay-max: 5s\n",
         "/etc/units/web.yaml:5:22: service.restart-delay-max: cannot be exported to systemd: "),
        ("sockets:\n  s:\n    listen: '127.0.0.1:80'\n    trigger-limit: {interval: 2s, burst: 5}\n"
         "service: {exec: [/bin/true]}\n",
         "/etc/units/web.yaml:4:20: sockets.s.trigger-limit: cannot be exported to systemd: "),
        ("sockets:\n  s: {listen: '127.0.0.1:80'}\nservice:\n  exec: [/bin/true]\n"
         "  supplementary-groups: [root]\n",
         "/etc/units/web.yaml:5:25: service.supplementary-groups: cannot be exported to systemd: "),
    ],
)  # fmt: skip
def test_refused_keys_name_their_place(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        export_unit(unit(text))  # type: ignore[arg-type]
    assert str(info.value).startswith(where)


def test_one_refusal_writes_nothing(tmp_path: Path) -> None:
    good = unit(EVERY_KEY)
    bad = unit(
        "sockets:\n  s: {listen: {type: fd, str: '3'}}\nservice: {exec: [/bin/true]}\n", "bad"
    )
    with pytest.raises(ConfigErrors):
        export_units([good, bad])  # type: ignore[list-item]


def test_files_are_replaced_whole(tmp_path: Path) -> None:
    (tmp_path / "web.socket").write_text("old")
    before = (tmp_path / "web.socket").stat().st_ino
    write_files(tmp_path, export_unit(unit(EVERY_KEY)))  # type: ignore[arg-type]
    assert (tmp_path / "web.socket").stat().st_ino != before  # a rename, not a rewrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["web.service", "web.socket"]


@pytest.mark.parametrize(
    ("preserve", "line"),
    [
        ("no", "FileDescriptorStorePreserve=no"),
        ("yes", "FileDescriptorStorePreserve=yes"),
        ("restart", None),  # systemd's default: written as nothing
    ],
)
def test_fd_store_preserve_is_file_descriptor_store_preserve(
    preserve: str, line: str | None
) -> None:
    text = EVERY_KEY.replace("fd-store-max: 8", f"fd-store-max: 8\n  fd-store-preserve: {preserve}")
    service = files(text)["web.service"].splitlines()
    written = [x for x in service if x.startswith("FileDescriptorStorePreserve=")]
    assert written == ([line] if line else [])
