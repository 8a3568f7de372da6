"""The spawn plan: argv, environment, fd layout and credentials of a worker, without a process.

Resolving (the user database, the program in PATH, the output fds) is
:func:`prepare_worker`'s; :func:`plan_worker` is pure and tested with what
was resolved given as plain values.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.errors import SpawnError
from fdsupervisor.fdpassing import LISTEN_FDS_START, SUPERVISOR_ONLY_ENV
from fdsupervisor.fdstore import FdStore, RawFd, service_owner, unit_owner
from fdsupervisor.spawn import (
    SPAWN_PATH_ENV,
    Account,
    OutputFile,
    PassedFd,
    Resolved,
    SpawnPlan,
    base_environment,
    plan_worker,
    prepare_worker,
    requested_spawn_path,
    worker_fd_numbers,
    worker_fds,
)
from fdsupervisor.units import ServiceSpec, Unit, load_unit_text
from tests.conftest import open_fds

PYTHON = sys.executable
SUPERVISOR_ENV = {
    "PATH": os.defpath,
    "HOME": "/root-of-supervisor",
    "LANG": "C.UTF-8",
    **{name: "the supervisor's own" for name in SUPERVISOR_ONLY_ENV},
}
HTTP = PassedFd("http", 7)
ADMIN = PassedFd("admin", 3)


def unit(**service: object) -> Unit:
    fields: dict[str, object] = {"exec": (PYTHON, "--port-fd={fd:http}", "{instance}")}
    fields.update(service)
    spec = ServiceSpec(**fields)  # type: ignore[arg-type]
    return Unit("web", Path("/units/web.yaml"), Path("/units"), (), spec)


def plan(**kwargs: object) -> SpawnPlan:
    """A worker's plan as the supervisor makes it: resolved, then planned."""
    service = kwargs.pop("service", {})
    passed = kwargs.pop("passed", [HTTP, ADMIN])
    return prepare_worker(
        unit(**service),  # type: ignore[arg-type]
        passed,  # type: ignore[arg-type]
        kwargs.pop("instance", 2),  # type: ignore[arg-type]
        kwargs.pop("environ", SUPERVISOR_ENV),  # type: ignore[arg-type]
        notify_socket=kwargs.pop("notify_socket", None),  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def pure_plan(resolved: Resolved, **service: object) -> SpawnPlan:
    """The pure plan alone, with what was resolved given by hand."""
    return plan_worker(unit(**service), [HTTP, ADMIN], 2, SUPERVISOR_ENV, resolved=resolved)


# --------------------------------------------------------------------------- fd layout


@given(st.lists(st.text(min_size=1), unique=True, max_size=20))
def test_fd_numbers_follow_declaration_order_from_3(names: list[str]) -> None:
    numbers = worker_fd_numbers(names)
    assert list(numbers) == names
    assert list(numbers.values()) == list(range(LISTEN_FDS_START, LISTEN_FDS_START + len(names)))


def test_fds_placeholders_and_listen_variables() -> None:
    result = plan()
    assert result.fds == (7, 3)  # supervisor numbers, in the order they go to 3, 4
    assert result.argv == (PYTHON, "--port-fd=3", "2")
    env = dict(result.environment)
    assert env["LISTEN_FDS"] == "2"
    assert env["LISTEN_FDNAMES"] == "http:admin"
    assert result.stdio_fd is None
    assert result.executable == PYTHON


def test_pid_variables_are_left_to_the_child() -> None:
    result = plan()
    assert result.pid_variables == ("LISTEN_PID",)
    assert "LISTEN_PID" not in dict(result.environment)


def test_inetd_connection_is_passed_as_stdio_too() -> None:
    connection = PassedFd("connection", 12)
    result = plan(passed=[connection], stdio_fd=12, service={"exec": (PYTHON,)})
    assert result.fds == (12,)
    assert result.stdio_fd == 12
    assert dict(result.environment)["LISTEN_FDNAMES"] == "connection"


# --------------------------------------------------------------------------- environment


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("inherit", None),
        ("null", None),
        ("journal", None),
        ("file:/var/log/web.log", OutputFile(b"/var/log/web.log", append=False)),
        ("append:/var/log/web.log", OutputFile(b"/var/log/web.log", append=True)),
    ],
)
def test_output_files_are_left_to_the_child(target: str, expected: OutputFile | None) -> None:
    """file: and append: travel in the plan, to be opened by the child as the worker's user."""
    plan = plan_worker(
        unit(stdout=target, stderr=target), [HTTP], 0, SUPERVISOR_ENV, resolved=Resolved(PYTHON)
    )
    assert plan.stdout_file == expected and plan.stderr_file == expected
    assert plan.stdout_fd is None and plan.stderr_fd is None  # nothing opened by the supervisor
    if expected is not None:
        assert expected.flags & os.O_APPEND == (os.O_APPEND if expected.append else 0)
        assert expected.flags & (os.O_WRONLY | os.O_CREAT) == os.O_WRONLY | os.O_CREAT


def test_supervisor_protocol_variables_never_reach_a_worker() -> None:
    env = dict(plan().environment)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID"):
        assert name not in env
    assert env["HOME"] == "/root-of-supervisor"
    assert env["LANG"] == "C.UTF-8"


def test_base_environment() -> None:
    assert base_environment(SUPERVISOR_ENV, clear=True) == {}
    assert base_environment(SUPERVISOR_ENV, clear=False) == {
        "PATH": os.defpath,
        "HOME": "/root-of-supervisor",
        "LANG": "C.UTF-8",
    }


def test_unit_environment_and_extra_environment() -> None:
    result = plan(
        service={"environment": (("ADMIN_FD", "{fd:admin}"), ("LANG", "de_DE.UTF-8"))},
        extra_env={"REMOTE_ADDR": "192.0.2.1", "LANG": "from-extra"},
    )
    env = dict(result.environment)
    assert env["ADMIN_FD"] == "4"
    assert env["REMOTE_ADDR"] == "192.0.2.1"
    assert env["LANG"] == "from-extra"  # extra (per connection) wins over the unit


def test_clear_environment_keeps_only_the_units_and_the_protocols() -> None:
    result = plan(
        service={"clear_environment": True, "environment": (("PATH", os.defpath),)},
    )
    assert sorted(dict(result.environment)) == ["LISTEN_FDNAMES", "LISTEN_FDS", "PATH"]


def test_notify_socket_and_watchdog() -> None:
    result = plan(notify_socket="/run/sup/notify")
    env = dict(result.environment)
    assert env["NOTIFY_SOCKET"] == "/run/sup/notify"
    assert "WATCHDOG_USEC" not in env
    assert result.pid_variables == ("LISTEN_PID",)

    result = plan(notify_socket="@sup", service={"watchdog": 2.5})
    env = dict(result.environment)
    assert env["WATCHDOG_USEC"] == "2500000"
    assert result.pid_variables == ("LISTEN_PID", "WATCHDOG_PID")
    assert "WATCHDOG_PID" not in env

    result = plan(notify_socket="@sup", service={"watchdog": float("inf")})
    assert "WATCHDOG_USEC" not in dict(result.environment)
    assert result.pid_variables == ("LISTEN_PID",)


def test_watchdog_without_notify_socket_sets_nothing() -> None:
    result = plan(service={"watchdog": 2.5})
    assert "WATCHDOG_USEC" not in dict(result.environment)
    assert result.pid_variables == ("LISTEN_PID",)


# --------------------------------------------------------------------------- credentials


def test_no_user_keeps_the_supervisors_credentials() -> None:
    result = plan()
    assert (result.uid, result.gid, result.groups) == (None, None, None)


def test_user_by_name_and_number() -> None:
    for user in ("root", "0"):
        result = plan(service={"user": user})
        assert (result.uid, result.gid) == (0, 0)
        assert result.groups is not None and 0 in result.groups
        env = dict(result.environment)
        assert (env["USER"], env["LOGNAME"], env["HOME"]) == ("root", "root", "/root")


def test_group_overrides_the_users_primary_group() -> None:
    result = plan(service={"group": "0"})
    assert (result.uid, result.gid, result.groups) == (None, 0, (0,))


def test_user_variables_are_not_added_to_a_cleared_environment() -> None:
    result = plan(service={"user": "root", "clear_environment": True})
    assert "USER" not in dict(result.environment)


@pytest.mark.parametrize(
    ("service", "message"),
    [
        ({"user": "no-such-user-here"}, "unknown user 'no-such-user-here'"),
        ({"user": "4294967296999"}, "unknown user '4294967296999'"),
        ({"group": "no-such-group-here"}, "unknown group 'no-such-group-here'"),
    ],
)
def test_unknown_credentials(service: dict[str, str], message: str) -> None:
    with pytest.raises(SpawnError, match=message):
        plan(service=service)


# --------------------------------------------------------------------------- executable


def test_program_found_in_the_workers_path(tmp_path: Path) -> None:
    program = tmp_path / "app"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    result = plan(
        service={"exec": ("app",), "environment": (("PATH", f"/nonexistent:{tmp_path}"),)}
    )
    assert result.executable == str(program)
    assert result.argv == ("app",)


def test_relative_program_resolves_against_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    program = tmp_path / "bin" / "app"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    result = plan(service={"exec": ("bin/app",), "working_directory": str(tmp_path)})
    assert result.executable == str(program)
    assert result.working_directory == str(tmp_path)


def test_missing_or_not_executable_program(tmp_path: Path) -> None:
    with pytest.raises(SpawnError, match=r"'no-such-app': not found in PATH=/nonexistent"):
        plan(service={"exec": ("no-such-app",), "environment": (("PATH", "/nonexistent"),)})
    text = tmp_path / "notes.txt"
    text.write_text("")
    with pytest.raises(SpawnError, match="not an executable file"):
        plan(service={"exec": (str(text),)})


# --------------------------------------------------------------------------- the pure plan


def test_the_plan_takes_what_was_resolved_as_it_is() -> None:
    """No user database, no PATH search: ids, names and program come in resolved."""
    account = Account(uid=4321, gid=99, groups=(99, 7), user_name="nobody-here", home="/nowhere")
    resolved = Resolved("/opt/app/bin/app", account, stdout_fd=41, stderr_fd=42, fork=True)
    result = pure_plan(resolved, exec=("app", "--fd={fd:http}"), user="no-such-user-here")
    assert result.executable == "/opt/app/bin/app"
    assert result.argv == ("app", "--fd=3")
    assert (result.uid, result.gid, result.groups) == (4321, 99, (99, 7))
    env = dict(result.environment)
    assert (env["USER"], env["LOGNAME"], env["HOME"]) == ("nobody-here", "nobody-here", "/nowhere")
    assert (result.stdout_fd, result.stderr_fd, result.fork) == (41, 42, True)
    assert result.cgroup_fd is None


def test_the_supervisors_own_account_changes_nothing() -> None:
    result = pure_plan(Resolved(PYTHON))
    assert (result.uid, result.gid, result.groups) == (None, None, None)
    assert "USER" not in dict(result.environment)
    assert result.fork is False


def test_a_cgroup_is_part_of_the_plan() -> None:
    result = plan_worker(unit(), [HTTP], 0, SUPERVISOR_ENV, resolved=Resolved(PYTHON), cgroup_fd=17)
    assert result.cgroup_fd == 17


# --------------------------------------------------------------------------- the spawn path


@pytest.mark.parametrize(
    ("value", "path", "fork", "migrate"),
    [
        (None, "native", False, False),
        ("", "native", False, False),
        ("native", "native", False, False),
        ("migrate", "migrate", False, True),
        ("fork", "fork", True, False),
    ],
)
def test_the_spawn_path_switch(value: str | None, path: str, fork: bool, migrate: bool) -> None:
    environ = {} if value is None else {SPAWN_PATH_ENV: value}
    assert requested_spawn_path(environ) == path
    result = plan(environ={**SUPERVISOR_ENV, **environ})
    assert (result.fork, result.migrate) == (fork, migrate)


def test_an_unknown_spawn_path_fails_the_start() -> None:
    with pytest.raises(
        SpawnError, match=r"FDSUPERVISOR_SPAWN='vfork'.*expected native, migrate or fork"
    ):
        plan(environ={**SUPERVISOR_ENV, SPAWN_PATH_ENV: "vfork"})


def test_the_switch_is_the_supervisors_not_the_workers() -> None:
    """A unit's environment: cannot choose the path; the worker still sees the variable."""
    result = plan(service={"environment": ((SPAWN_PATH_ENV, "fork"),)})
    assert result.fork is False
    assert dict(result.environment)[SPAWN_PATH_ENV] == "fork"


# --------------------------------------------------------------------------- outputs


def test_null_outputs_are_opened_for_the_plan() -> None:
    before = open_fds()
    result = plan(service={"stdout": "null", "stderr": "null"})
    try:
        assert result.stdout_fd is not None and result.stderr_fd is not None
        assert result.stdout_fd != result.stderr_fd
        for fd in (result.stdout_fd, result.stderr_fd):
            assert os.readlink(f"/proc/self/fd/{fd}") == os.devnull
            assert not os.get_inheritable(fd)  # the child places it, nothing else inherits it
    finally:
        result.close()
    assert open_fds() == before


class Warnings:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, object]]] = []

    def warning(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))


def test_journal_outputs_or_the_supervisors_own_without_journald() -> None:
    log = Warnings()
    before = open_fds()
    result = prepare_worker(
        unit(stdout="journal"), [HTTP], 0, SUPERVISOR_ENV, notify_socket=None, log=log
    )
    try:
        if result.stdout_fd is None:  # no journald here: inherited, and said so
            assert [event for event, _ in log.events] == ["journal_unavailable"]
            assert log.events[0][1]["unit"] == "web"
        else:
            assert os.readlink(f"/proc/self/fd/{result.stdout_fd}").startswith("socket:")
            assert log.events == []
    finally:
        result.close()
    assert open_fds() == before


def test_a_failed_preparation_leaves_no_fd_open() -> None:
    before = open_fds()
    with pytest.raises(SpawnError, match="not found in PATH"):
        plan(
            service={
                "exec": ("no-such-app",),
                "environment": (("PATH", "/nonexistent"),),
                "stdout": "null",
                "stderr": "null",
            }
        )
    assert open_fds() == before


# --------------------------------------------------------------------------- fd order


UNIT_WITH_TWO_SOCKETS = """
sockets:
  http: {listen: "127.0.0.1:0"}
  admin: {listen: "127.0.0.1:0"}
service:
  exec: [app]
"""


def test_worker_fds_in_spec_order() -> None:
    """SPEC 4: declared sockets in declaration order, runtime sockets, then stored fds."""
    web = load_unit_text(UNIT_WITH_TWO_SOCKETS, Path("/units/web.yaml"), Path("/units"))
    assert [s.name for s in web.sockets] == ["http", "admin"]
    store = FdStore()
    opened: dict[str, int] = {}
    try:
        # added in another order than declared, with a runtime socket in between
        for owner, name in [
            (service_owner("web"), "state"),
            (unit_owner("web"), "added-at-run-time"),
            (unit_owner("web"), "admin"),
            (unit_owner("other"), "http"),
            (unit_owner("web"), "http"),
        ]:
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            opened[f"{owner}/{name}"] = fd
            store.add(owner, name, RawFd(fd))
        passed = worker_fds(store, web)
        assert [p.name for p in passed] == ["http", "admin", "added-at-run-time", "state"]
        assert [p.fd for p in passed] == [
            opened["unit:web/http"],
            opened["unit:web/admin"],
            opened["unit:web/added-at-run-time"],
            opened["service:web/state"],
        ]
    finally:
        store.close_all()
