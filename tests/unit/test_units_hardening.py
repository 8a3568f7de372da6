"""SPEC section 10 in unit files: service hardening (limits, umask, groups) and socket intake keys."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fdsupervisor.activation import TriggerWindow
from fdsupervisor.errors import ConfigErrors
from fdsupervisor.spawn import (
    account_errors,
    resolve_account,
    resolve_limits,
    worker_default_limits,
)
from fdsupervisor.units import (
    LIMIT_UNITS,
    RLIM_INFINITY,
    ResourceLimit,
    TriggerLimit,
    Unit,
    load_unit_text,
)

SOURCE = Path("/srv/units/web.yaml")


def load(service_lines: str) -> Unit:
    text = "service:\n  exec: [app]\n" + textwrap.indent(textwrap.dedent(service_lines), "  ")
    return load_unit_text(text, SOURCE, SOURCE.parent)


def error(service_lines: str) -> str:
    with pytest.raises(ConfigErrors) as info:
        load(service_lines)
    assert len(info.value.errors) == 1, info.value.errors
    return str(info.value.errors[0])


def test_limits_as_systemd_writes_them() -> None:
    service = load(
        """\
        limits:
          nofile: 4096
          nproc: "512:1024"
          core: 0
          as: infinity
          memlock: 64K
          stack: "8M:infinity"
          fsize: 10:20
          nice: "-5"
          rtprio: 0
          rttime: "1000"
        """
    ).service
    assert service.limits == (
        ResourceLimit("nofile", 4096, 4096),
        ResourceLimit("nproc", 512, 1024),
        ResourceLimit("core", 0, 0),
        ResourceLimit("as", RLIM_INFINITY, RLIM_INFINITY),
        ResourceLimit("memlock", 65536, 65536),
        ResourceLimit("stack", 8 << 20, RLIM_INFINITY),
        ResourceLimit("fsize", 10, 20),  # not YAML 1.1's sexagesimal 620
        ResourceLimit("nice", 25, 25),  # a nice level: 20 - level
        ResourceLimit("rtprio", 0, 0),
        ResourceLimit("rttime", 1000, 1000),
    )


def test_every_systemd_limit_name_resolves_to_its_rlimit() -> None:
    import resource

    limits = [ResourceLimit(name, 1, 1) for name in LIMIT_UNITS]
    numbers = [number for number, _, _ in resolve_limits(limits)]
    assert len(set(numbers)) == 16
    assert numbers[list(LIMIT_UNITS).index("nofile")] == resource.RLIMIT_NOFILE
    assert numbers[list(LIMIT_UNITS).index("locks")] == 10


def test_a_default_limit_applies_unless_the_unit_sets_that_resource() -> None:
    import resource

    defaults = ((resource.RLIMIT_NOFILE, 1024, 4096),)
    core = ResourceLimit("core", 0, 0)
    assert resolve_limits([core], defaults) == ((resource.RLIMIT_CORE, 0, 0), *defaults)
    own = ResourceLimit("nofile", 2048, 2048)
    assert resolve_limits([own], defaults) == ((resource.RLIMIT_NOFILE, 2048, 2048),)


def test_workers_default_to_the_soft_fd_limit_the_supervisor_started_with() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert worker_default_limits(None) == ()
    assert worker_default_limits(soft) == (), "not raised: nothing to set"
    if soft > 1:
        assert worker_default_limits(1) == ((resource.RLIMIT_NOFILE, 1, hard),)
    if hard != resource.RLIM_INFINITY:
        assert worker_default_limits(hard + 1) == (), "above the hard limit: not settable"


def test_umask_no_new_privileges_and_groups() -> None:
    service = load('umask: "0027"\nno-new-privileges: true\nsupplementary-groups: [adm, "4"]\n')
    assert service.service.umask == 0o027
    assert service.service.no_new_privileges
    assert service.service.supplementary_groups == ("adm", "4")
    defaults = load("").service
    assert (defaults.limits, defaults.umask, defaults.no_new_privileges) == ((), None, False)
    assert defaults.supplementary_groups is None


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("limits: {files: 10}", "web.yaml:3:12: service.limits: unknown key 'files'"),
        ("limits: {nofile: -1}", "web.yaml:3:20: service.limits.nofile: expected a number"),
        ("limits: {nofile: 10K}", "service.limits.nofile: expected a number of count"),
        ("limits: {nofile: '20:10'}", "the soft limit must not be above the hard limit"),
        ("limits: {nofile: 'infinity:10'}", "the soft limit must not be above the hard limit"),
        ("limits: {core: 99999999999999999999E}", "is too large; for none write infinity"),
        ("limits: {nice: 41}", "service.limits.nice: expected a nice level from -20 to +19"),
        ("limits: {nice: '+20'}", "service.limits.nice: expected a nice level"),
        ("limits: {nofile: ~}", "service.limits.nofile: expected a limit such as 1024"),
        ("limits: [nofile]", "service.limits: expected a mapping"),
        ("umask: '0800'", "service.umask: expected an octal file mode"),
        ("umask: '1777'", "service.umask: a umask is from 0000 to 0777, got 1777"),
        ("no-new-privileges: 1", "service.no-new-privileges: expected a boolean"),
        ("supplementary-groups: adm", "service.supplementary-groups: expected a list"),
        ("supplementary-groups: [adm, '']", "service.supplementary-groups.1: must not be empty"),
    ],
)
def test_bad_values_are_named_with_file_line_column(lines: str, expected: str) -> None:
    assert expected in error(lines + "\n")


def test_unknown_users_and_groups_are_unit_file_errors() -> None:
    unit = load(
        "user: nosuchuser\ngroup: nosuchgroup\nsupplementary-groups: [root, nosuchgroup2]\n"
    )
    found = [str(e) for e in account_errors(unit)]
    assert found == [
        "/srv/units/web.yaml:3:9: service.user: "
        "unknown user 'nosuchuser': not in the user database",
        "/srv/units/web.yaml:4:10: service.group: "
        "unknown group 'nosuchgroup': not in the group database",
        "/srv/units/web.yaml:5:32: service.supplementary-groups.1: "
        "unknown group 'nosuchgroup2': not in the group database",
    ]
    assert account_errors(load("user: root\nsupplementary-groups: ['0']\n")) == []


def test_supplementary_groups_replace_the_users_own() -> None:
    assert resolve_account("root", None, ["0"]).groups == (0,)
    assert resolve_account(None, None, ["root", "0"]).groups == (0,)  # once each
    nobody = resolve_account("nobody", None)
    assert nobody.groups is not None and 0 not in nobody.groups


# --------------------------------------------------------------------------- intake (sockets)


def socket_unit(socket_lines: str, service_lines: str = "accept: true\n") -> str:
    return (
        'sockets:\n  conn:\n    listen: "127.0.0.1:0"\n'
        + textwrap.indent(textwrap.dedent(socket_lines), "    ")
        + "service:\n  exec: [app]\n"
        + textwrap.indent(textwrap.dedent(service_lines), "  ")
    )


def socket_errors(text: str) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load_unit_text(text, SOURCE, SOURCE.parent)
    return [str(e) for e in info.value.errors]


def test_max_connections_per_source() -> None:
    unit = load_unit_text(socket_unit("max-connections-per-source: 3\n"), SOURCE, SOURCE.parent)
    assert unit.sockets[0].max_connections_per_source == 3
    plain = load_unit_text(socket_unit(""), SOURCE, SOURCE.parent)
    assert plain.sockets[0].max_connections_per_source is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            socket_unit("max-connections-per-source: 2\n", ""),
            "web.yaml:4:33: sockets.conn.max-connections-per-source: "
            "max-connections-per-source applies only with the service's accept: true",
        ),
        (
            socket_unit("max-connections-per-source: 0\n"),
            "web.yaml:4:33: sockets.conn.max-connections-per-source: "
            "expected an integer from 1 to 2147483647, got 0",
        ),
        (
            socket_unit("max-connections-per-source: 2\nkind: datagram\n"),
            "sockets.conn.max-connections-per-source: 'max-connections-per-source' "
            "applies to stream and seqpacket sockets (accept mode) only",
        ),
    ],
    ids=["without-accept", "zero", "datagram"],
)
def test_bad_max_connections_per_source(text: str, expected: str) -> None:
    assert any(expected in found for found in socket_errors(text)), socket_errors(text)


def test_trigger_limit() -> None:
    unit = load_unit_text(
        socket_unit("trigger-limit: {interval: 2s, burst: 200}\n", ""), SOURCE, SOURCE.parent
    )
    assert unit.sockets[0].trigger_limit == TriggerLimit(2.0, 200)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            "trigger-limit: {interval: 2s}",
            "sockets.conn.trigger-limit: missing required key 'burst'",
        ),
        ("trigger-limit: {interval: 0, burst: 5}", "trigger-limit.interval: must be a positive"),
        ("trigger-limit: {interval: 1s, burst: 0}", "trigger-limit.burst: expected an integer"),
        ("trigger-limit: {interval: 1s, burst: 2, rate: 1}", "unknown key 'rate'"),
        ("trigger-limit: 5", "sockets.conn.trigger-limit: expected a mapping"),
    ],
)
def test_bad_trigger_limits(lines: str, expected: str) -> None:
    found = socket_errors(socket_unit(lines + "\n", ""))
    assert len(found) == 1 and expected in found[0], found


def test_trigger_window_counts_a_burst_per_interval() -> None:
    window = TriggerWindow(TriggerLimit(interval=2.0, burst=3))
    assert window.trigger(10.0) is None
    assert window.trigger(10.5) is None
    assert window.trigger(11.0) == 12.0  # the 3rd within 2s: paused until the window ends
    assert window.trigger(12.0) is None  # a new window from here
    assert window.trigger(13.9) is None
    assert window.trigger(14.0) is None  # 14.0 opens the next window: the count starts again
