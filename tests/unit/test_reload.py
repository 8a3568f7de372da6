"""Reload planning: old units + new units → keep, relisten, move, rebind, bind, close; pure."""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fdsupervisor.addresses import FdAddress, InetAddress, SocketAddress, UnixAddress, VsockAddress
from fdsupervisor.reload import ReloadPlan, SocketKey, plan_reload
from fdsupervisor.units import ServiceSpec, SocketKind, SocketSpec, Unit, load_unit_text

BASE = Path("/srv/units")

Sockets = dict[str, str | dict[str, Any]]


def unit(name: str, sockets: Sockets | None = None, service: dict[str, Any] | None = None) -> Unit:
    """A unit loaded from YAML, as ``load_units`` makes it; a string socket is its ``listen``."""
    doc = {
        "sockets": {
            socket: {"listen": spec} if isinstance(spec, str) else spec
            for socket, spec in (sockets or {}).items()
        },
        "service": {"exec": ["app"], **(service or {})},
    }
    return load_unit_text(yaml.safe_dump(doc, sort_keys=False), BASE / f"{name}.yaml", BASE)


WEB_SOCKETS: Sockets = {"http": "127.0.0.1:8080", "admin": {"listen": "unix:/run/web.sock"}}
API_SERVICE = {"environment": {"A": "1", "B": "2"}}
WEB = unit("web", WEB_SOCKETS)
API = unit("api", {"api": "127.0.0.1:9000"}, API_SERVICE)


def socket_groups_of_old(plan: ReloadPlan) -> Counter[SocketKey]:
    return Counter(
        [
            *plan.keep_sockets,
            *plan.relisten_sockets,
            *plan.rebind_sockets,
            *plan.close_sockets,
            *(source for source, _ in plan.move_sockets),
        ]
    )


def socket_groups_of_new(plan: ReloadPlan) -> Counter[SocketKey]:
    return Counter(
        [
            *plan.keep_sockets,
            *plan.relisten_sockets,
            *plan.rebind_sockets,
            *plan.bind_sockets,
            *(target for _, target in plan.move_sockets),
        ]
    )


def keys(units: list[Unit]) -> Counter[SocketKey]:
    return Counter((u.name, s.name) for u in units for s in u.sockets)


# --------------------------------------------------------------------------- nothing changed


def test_identical_units_change_nothing() -> None:
    plan = plan_reload([WEB, API], [WEB, API])
    assert plan == ReloadPlan(
        keep_sockets=(("web", "http"), ("web", "admin"), ("api", "api")),
        unchanged_units=("web", "api"),
    )
    assert plan.nothing_to_do
    assert plan.summary() == (
        "2 units unchanged, 0 restarted, 0 added, 0 removed; sockets: 3 kept, 0 relistened, "
        "0 moved, 0 rebound, 0 bound, 0 closed, 0 close-first"
    )


def test_a_freshly_loaded_copy_is_unchanged_whatever_its_positions_and_unit_order() -> None:
    moved_down = load_unit_text(
        textwrap.dedent(
            """\
            # a comment that moves every line down

            service: {exec: [app], environment: {B: "2", A: "1"}}
            sockets:
                api:
                    listen: {type: inet, host: 127.0.0.1, port: "9000"}
            """
        ),
        BASE / "elsewhere" / "api.yaml",  # another file, same unit name
        BASE,
    )
    assert moved_down.sockets[0].location != API.sockets[0].location
    plan = plan_reload([WEB, API], [moved_down, WEB])
    assert plan.unchanged_units == ("api", "web")
    assert plan.nothing_to_do


def test_no_units_at_all() -> None:
    plan = plan_reload([], [])
    assert plan == ReloadPlan() and plan.nothing_to_do
    assert plan.summary().startswith("0 units unchanged, 0 restarted")


# --------------------------------------------------------------------------- services


def test_an_environment_change_restarts_that_unit_only() -> None:
    changed = unit("api", {"api": "127.0.0.1:9000"}, {"environment": {"A": "1", "B": "3"}})
    plan = plan_reload([WEB, API], [WEB, changed])
    assert plan.restart_units == ("api",)
    assert plan.unchanged_units == ("web",)
    # The service changed, not the socket: its fd stays, the new workers get it.
    assert ("api", "api") in plan.keep_sockets
    assert not (plan.rebind_sockets or plan.bind_sockets or plan.close_sockets)
    assert not plan.nothing_to_do
    assert plan.roll_units == ("api",), "only the service changed: replaced one at a time"


def test_only_a_service_change_with_overlap_on_both_sides_rolls() -> None:
    sockets: Sockets = {"api": "127.0.0.1:9000"}
    env = {"environment": {"A": "2"}}
    no_overlap = unit("api", sockets, {**API_SERVICE, "overlap": False})
    assert plan_reload([API], [unit("api", sockets, {**env, "overlap": False})]).roll_units == ()
    assert plan_reload([no_overlap], [unit("api", sockets, env)]).roll_units == ()
    moved = plan_reload([API], [unit("api", {"api": "127.0.0.1:9001"}, env)])
    assert moved.restart_units == ("api",) and moved.roll_units == (), "a new layout stops first"
    added = plan_reload([API], [unit("api", {**sockets, "more": "127.0.0.1:9002"}, env)])
    assert added.restart_units == ("api",) and added.roll_units == ()
    accept = {"accept": True}
    assert (
        plan_reload(
            [unit("api", sockets, accept)], [unit("api", sockets, {**accept, **env})]
        ).roll_units
        == ()
    )


@pytest.mark.parametrize(
    "service",
    [
        {"exec": ["app", "--verbose"]},
        {"activation": "on-demand"},
        {"restart": "always"},
        {"stop-timeout": "5s"},
        {"working-directory": "/tmp"},
    ],
)
def test_any_service_change_restarts(service: dict[str, Any]) -> None:
    plan = plan_reload([WEB], [unit("web", WEB_SOCKETS, service)])
    assert plan.restart_units == ("web",)
    assert plan.keep_sockets == (("web", "http"), ("web", "admin"))


# --------------------------------------------------------------------------- socket layout


def test_a_socket_added_is_bound_and_its_unit_restarted() -> None:
    new = unit("api", {"api": "127.0.0.1:9000", "metrics": "127.0.0.1:9100"}, API_SERVICE)
    plan = plan_reload([WEB, API], [WEB, new])
    assert plan.bind_sockets == (("api", "metrics"),)
    assert plan.keep_sockets == (("web", "http"), ("web", "admin"), ("api", "api"))
    assert plan.restart_units == ("api",) and plan.unchanged_units == ("web",)
    assert plan.close_first == () and plan.bind_after_close == ()


def test_a_socket_removed_is_closed_and_its_unit_restarted() -> None:
    new = unit("web", {"http": "127.0.0.1:8080"})
    plan = plan_reload([WEB, API], [new, API])
    assert plan.close_sockets == (("web", "admin"),)
    assert plan.restart_units == ("web",) and plan.unchanged_units == ("api",)


def test_sockets_reordered_keep_their_fds_but_the_workers_restart() -> None:
    # The fd order is the declaration order: a worker's fd 3 is now another socket.
    new = unit("web", {"admin": {"listen": "unix:/run/web.sock"}, "http": "127.0.0.1:8080"})
    plan = plan_reload([WEB], [new])
    assert plan.keep_sockets == (("web", "admin"), ("web", "http"))
    assert plan.restart_units == ("web",)


def test_an_address_change_rebinds_without_a_gap() -> None:
    new = unit("web", {"http": "127.0.0.1:8081", "admin": {"listen": "unix:/run/web.sock"}})
    plan = plan_reload([WEB], [new])
    assert plan.rebind_sockets == (("web", "http"),)
    assert plan.keep_sockets == (("web", "admin"),)
    assert plan.restart_units == ("web",)
    # Another port: bind the new one first, close the old one after.
    assert plan.close_first == () and plan.bind_after_close == ()


def test_an_option_change_on_the_same_unix_path_must_close_first() -> None:
    new = unit(
        "web", {"http": "127.0.0.1:8080", "admin": {"listen": "unix:/run/web.sock", "mode": "0600"}}
    )
    plan = plan_reload([WEB], [new])
    assert plan.rebind_sockets == (("web", "admin"),)
    assert plan.close_first == (("web", "admin"),)
    assert plan.bind_after_close == (("web", "admin"),)
    assert plan.summary().endswith("1 rebound, 0 bound, 0 closed, 1 close-first")


@pytest.mark.parametrize(
    "option", [{"kind": "datagram"}, {"no-delay": True}, {"keep-alive": True}, {"free-bind": True}]
)
def test_every_other_option_rebinds(option: dict[str, Any]) -> None:
    new = unit(
        "web", {"http": {"listen": "127.0.0.1:8080", **option}, "admin": "unix:/run/web.sock"}
    )
    plan = plan_reload([WEB], [new])
    assert plan.rebind_sockets == (("web", "http"),)
    assert plan.restart_units == ("web",)


def test_a_backlog_change_is_a_relisten_and_the_workers_run_on() -> None:
    new = unit(
        "web",
        {"http": {"listen": "127.0.0.1:8080", "backlog": 4096}, "admin": "unix:/run/web.sock"},
    )
    plan = plan_reload([WEB], [new])
    assert plan.relisten_sockets == (("web", "http"),)
    assert plan.keep_sockets == (("web", "admin"),)
    assert plan.unchanged_units == ("web",)
    assert not plan.rebind_sockets and not plan.restart_units
    assert not plan.nothing_to_do  # the relisten is something to do
    assert "1 kept, 1 relistened" in plan.summary()


def test_a_backlog_that_nothing_listens_with_changes_nothing() -> None:
    # Datagram sockets and inherited fds are never listen()-ed by fdsupervisor
    # (the unit schema refuses the key there; a hand-made unit may still differ).
    datagram = unit("dns", {"udp": {"listen": "127.0.0.1:5353", "kind": "datagram"}})
    inherited = unit("sd", {"sd": "fd:3"})
    old = [datagram, inherited]
    new = [replace(u, sockets=tuple(replace(s, backlog=7) for s in u.sockets)) for u in old]
    plan = plan_reload(old, new)
    assert plan.keep_sockets == (("dns", "udp"), ("sd", "sd"))
    assert plan.nothing_to_do


# --------------------------------------------------------------------------- units


def test_a_unit_added_is_started_and_its_sockets_bound() -> None:
    plan = plan_reload([WEB], [WEB, API])
    assert plan.start_units == ("api",)
    assert plan.bind_sockets == (("api", "api"),)
    assert plan.unchanged_units == ("web",)


def test_a_unit_removed_is_stopped_and_its_sockets_closed() -> None:
    plan = plan_reload([WEB, API], [WEB])
    assert plan.stop_units == ("api",)
    assert plan.close_sockets == (("api", "api"),)
    assert plan.summary().startswith("1 unit unchanged, 0 restarted, 0 added, 1 removed;")


def test_a_unit_renamed_is_stopped_and_started_and_its_sockets_move() -> None:
    renamed = unit("www", {"http": "127.0.0.1:8080", "admin": {"listen": "unix:/run/web.sock"}})
    plan = plan_reload([WEB, API], [renamed, API])
    assert plan.stop_units == ("web",) and plan.start_units == ("www",)
    assert plan.move_sockets == (
        (("web", "http"), ("www", "http")),
        (("web", "admin"), ("www", "admin")),
    )
    # Moving hands the same fds over: nothing is bound or closed.
    assert not (plan.bind_sockets or plan.close_sockets or plan.rebind_sockets)
    assert plan.close_first == ()


def test_a_unit_renamed_with_a_changed_socket_closes_first_where_the_address_is_reused() -> None:
    renamed = unit(
        "www", {"http": "127.0.0.1:8080", "admin": {"listen": "unix:/run/web.sock", "mode": "0600"}}
    )
    plan = plan_reload([WEB], [renamed])
    assert plan.move_sockets == ((("web", "http"), ("www", "http")),)
    assert plan.close_sockets == (("web", "admin"),)
    assert plan.bind_sockets == (("www", "admin"),)
    assert plan.close_first == (("web", "admin"),)
    assert plan.bind_after_close == (("www", "admin"),)


def test_duplicate_unit_names_are_a_caller_error() -> None:
    with pytest.raises(ValueError, match="two new units are named 'web'"):
        plan_reload([WEB], [WEB, WEB])


# --------------------------------------------------------------------------- moves


def test_a_socket_moved_between_units_keeps_its_fd() -> None:
    api = unit("api", {"api": "127.0.0.1:9000", "admin": "unix:/run/web.sock"}, API_SERVICE)
    web = unit("web", {"http": "127.0.0.1:8080"})
    plan = plan_reload([WEB, API], [web, api])
    assert plan.move_sockets == ((("web", "admin"), ("api", "admin")),)
    assert plan.keep_sockets == (("web", "http"), ("api", "api"))
    assert plan.restart_units == ("web", "api")
    assert not (plan.bind_sockets or plan.close_sockets or plan.rebind_sockets)
    assert "1 moved" in plan.summary()


def test_a_socket_renamed_in_its_unit_is_moved() -> None:
    new = unit("web", {"http": "127.0.0.1:8080", "control": {"listen": "unix:/run/web.sock"}})
    plan = plan_reload([WEB], [new])
    assert plan.move_sockets == ((("web", "admin"), ("web", "control")),)
    assert plan.restart_units == ("web",)  # LISTEN_FDNAMES changed


def test_two_sockets_that_swap_addresses_swap_fds() -> None:
    # Rebinding would need each other's address: two close-firsts. Moving needs none.
    new = unit("web", {"http": "unix:/run/web.sock", "admin": "127.0.0.1:8080"})
    plan = plan_reload([WEB], [new])
    assert set(plan.move_sockets) == {
        (("web", "http"), ("web", "admin")),
        (("web", "admin"), ("web", "http")),
    }
    assert not (plan.rebind_sockets or plan.close_first)
    assert plan.restart_units == ("web",)


def test_a_move_takes_the_fd_whose_address_a_rebind_would_fight_over() -> None:
    # api.api gives up 9000, web.http takes it: a move, and http's old port closes.
    web = unit("web", {"http": "127.0.0.1:9000", "admin": "unix:/run/web.sock"})
    api = unit("api", {"api": "127.0.0.1:9001"}, API_SERVICE)
    plan = plan_reload([WEB, API], [web, api])
    assert plan.move_sockets == ((("api", "api"), ("web", "http")),)
    assert plan.bind_sockets == (("api", "api"),)
    assert plan.close_sockets == (("web", "http"),)
    assert plan.close_first == ()


def test_a_move_prefers_the_same_socket_name_then_the_same_unit() -> None:
    # Two sockets on port 0 are bound the same way; a rename takes the matching name.
    old = [unit("a", {"x": ":0", "y": ":0"})]
    new = [unit("b", {"y": ":0", "z": ":0"})]
    plan = plan_reload(old, new)
    assert plan.move_sockets == ((("a", "y"), ("b", "y")), (("a", "x"), ("b", "z")))
    same_unit = plan_reload(
        [unit("a", {"x": ":0"}), unit("b", {"y": ":0"})], [unit("b", {"z": ":0"})]
    )
    assert same_unit.move_sockets == ((("b", "y"), ("b", "z")),)


def test_a_move_with_a_new_backlog_is_relistened_too() -> None:
    new = unit(
        "www", {"http": {"listen": "127.0.0.1:8080", "backlog": 16}, "admin": "unix:/run/web.sock"}
    )
    plan = plan_reload([WEB], [new])
    assert (("web", "http"), ("www", "http")) in plan.move_sockets
    assert plan.relisten_moved == (("www", "http"),)


# --------------------------------------------------------------------------- inherited fds


def fd_unit(name: str = "sd", **sockets: str) -> Unit:
    return unit(name, dict(sockets))


def test_an_unchanged_inherited_fd_is_kept() -> None:
    plan = plan_reload([fd_unit(sd="fd:3")], [fd_unit(sd="fd:3")])
    assert plan.keep_sockets == (("sd", "sd"),) and not plan.problems


def test_an_inherited_fd_number_changed_is_a_problem() -> None:
    new = fd_unit(sd="fd:4")
    plan = plan_reload([fd_unit(sd="fd:3")], [new])
    assert plan.rebind_sockets == (("sd", "sd"),)
    location = new.sockets[0].location
    assert location is not None and location.line > 0
    (problem,) = plan.problems
    assert problem.startswith(f"{location}: sockets.sd.listen: fd 4 cannot be adopted at a reload")
    assert "keep fd 3, or restart fdsupervisor" in problem
    assert plan.summary().endswith("; 1 problem")


def test_a_new_inherited_fd_is_a_problem() -> None:
    plan = plan_reload([WEB], [WEB, fd_unit(sd="fd:3")])
    assert plan.bind_sockets == (("sd", "sd"),)
    (problem,) = plan.problems
    assert "fd 3 cannot be adopted at a reload" in problem
    assert "those no unit used were closed" in problem
    assert plan.close_first == ()  # an fd is never bound


def test_an_inherited_fd_whose_kind_changed_cannot_be_rebound() -> None:
    old = fd_unit(sd="fd:3")
    new = unit("sd", {"sd": {"listen": "fd:3", "kind": "datagram"}})
    plan = plan_reload([old], [new])
    (problem,) = plan.problems
    assert "sockets.sd: fd 3 is inherited and cannot be bound again, so its kind" in problem


def test_inherited_fds_that_trade_places_are_moved() -> None:
    old = [fd_unit(a="fd:3", b="fd:4")]
    new = [fd_unit(a="fd:4", b="fd:3")]
    plan = plan_reload(old, new)
    assert set(plan.move_sockets) == {(("sd", "a"), ("sd", "b")), (("sd", "b"), ("sd", "a"))}
    assert not plan.problems


def test_an_inherited_fd_moves_to_another_unit() -> None:
    plan = plan_reload([fd_unit("old", sd="fd:3")], [fd_unit("new", sd="fd:3")])
    assert plan.move_sockets == ((("old", "sd"), ("new", "sd")),)
    assert not plan.problems


def test_an_inherited_fd_replaced_by_a_bound_socket_closes_first() -> None:
    # The fd's own address is unknown here: it may be the very one bound next.
    plan = plan_reload([fd_unit(sd="fd:3")], [fd_unit(sd="127.0.0.1:8080")])
    assert plan.rebind_sockets == (("sd", "sd"),)
    assert plan.close_first == (("sd", "sd"),) and not plan.problems


# --------------------------------------------------------------------------- address conflicts


@pytest.mark.parametrize(
    ("old", "new", "conflict"),
    [
        ("127.0.0.1:8080", {"listen": "127.0.0.1:8080", "no-delay": True}, True),
        ("0.0.0.0:8080", "127.0.0.1:8080", True),
        (":8080", "[::1]:8080", True),  # "" is every address
        ("[::]:8080", "127.0.0.1:8080", True),
        ("[::ffff:127.0.0.1]:8080", "127.0.0.1:8080", True),
        ("localhost:8080", "127.0.0.1:8080", True),  # a name may be any address
        ("127.0.0.1:http", "127.0.0.1:8080", True),  # a service name, any port
        ("127.0.0.1:8080,to=8090", "127.0.0.1:8085", True),
        ("127.0.0.1:8080", "127.0.0.2:8080", False),
        ("127.0.0.1:8080", "127.0.0.1:8081", False),
        ("127.0.0.1:8080,to=8084", "127.0.0.1:8085", False),
        ("127.0.0.1:0", {"listen": "127.0.0.1:0", "no-delay": True}, False),
        (
            {"listen": "127.0.0.1:8080", "reuse-port": True},
            {"listen": "127.0.0.1:8080", "reuse-port": True, "no-delay": True},
            False,
        ),
        ({"listen": "127.0.0.1:8080", "reuse-port": True}, "127.0.0.1:8080", True),
        ({"listen": "127.0.0.1:53", "kind": "datagram"}, "127.0.0.1:53", False),  # UDP and TCP
        ("unix:/run/a.sock", "unix:/run/b.sock", False),
        ("unix:/run/a.sock", {"listen": "unix:/run/a.sock", "kind": "seqpacket"}, True),
        ("@name", {"listen": "@name", "kind": "seqpacket"}, True),
        (
            "@name",
            {"listen": {"type": "unix", "path": "name", "abstract": True, "tight": False}},
            False,
        ),
        ("vsock:3:1234", {"listen": "vsock:3:1234", "kind": "seqpacket"}, True),
        ("vsock:4294967295:1234", "vsock:3:1234", True),
        ("vsock:3:1234", "vsock:4:1234", False),
        ("unix:/run/a.sock", "127.0.0.1:8080", False),
    ],
)
def test_which_rebinds_must_close_first(
    old: str | dict[str, Any], new: str | dict[str, Any], conflict: bool
) -> None:
    plan = plan_reload([unit("u", {"s": old})], [unit("u", {"s": new})])
    assert plan.rebind_sockets == (("u", "s"),)
    assert plan.close_first == ((("u", "s"),) if conflict else ())
    assert plan.bind_after_close == plan.close_first


def test_relative_unix_paths_compare_resolved() -> None:
    def hand_made(base: str, path: str) -> Unit:
        spec = SocketSpec("s", UnixAddress(path))
        return Unit("u", Path(base) / "u.yaml", Path(base), (spec,), ServiceSpec(exec=("app",)))

    assert plan_reload([hand_made("/a", "s.sock")], [hand_made("/b", "/a/s.sock")]).nothing_to_do
    moved = plan_reload([hand_made("/a", "s.sock")], [hand_made("/b", "s.sock")])
    assert moved.rebind_sockets == (("u", "s"),) and moved.close_first == ()


# --------------------------------------------------------------------------- sockets added at run time


def added(name: str, address: SocketAddress, **options: Any) -> SocketSpec:
    """A socket as the monitor's socket-add binds it: address, kind and backlog, no options."""
    return SocketSpec(name, address, **options)


ADMIN = added("admin", InetAddress("127.0.0.1", "8081"))
WEB_ONLY_HTTP = unit("web", {"http": "127.0.0.1:8080"})
WEB_DECLARES_ADMIN = unit("web", {"http": "127.0.0.1:8080", "admin": "127.0.0.1:8081"})


def test_a_runtime_socket_the_unit_file_now_declares_is_adopted() -> None:
    plan = plan_reload([WEB_ONLY_HTTP], [WEB_DECLARES_ADMIN], {("web", "admin"): ADMIN})
    assert plan.adopt_sockets == (("web", "admin"),)
    assert ("web", "admin") in plan.keep_sockets
    assert not (plan.bind_sockets or plan.rebind_sockets or plan.close_sockets)
    assert not plan.close_first
    # its place in the fd layout changes (declared sockets come first): new workers
    assert plan.restart_units == ("web",)
    assert plan.summary().endswith(", 1 adopted")


def test_without_the_runtime_socket_the_same_file_binds_it() -> None:
    plan = plan_reload([WEB_ONLY_HTTP], [WEB_DECLARES_ADMIN])
    assert plan.bind_sockets == (("web", "admin"),) and not plan.adopt_sockets


def test_an_adopted_runtime_socket_with_another_backlog_is_relistened() -> None:
    plan = plan_reload(
        [WEB_ONLY_HTTP], [WEB_DECLARES_ADMIN], {("web", "admin"): replace(ADMIN, backlog=5)}
    )
    assert plan.adopt_sockets == plan.relisten_sockets == (("web", "admin"),)


@pytest.mark.parametrize(
    "runtime",
    [
        added("admin", InetAddress("127.0.0.1", "8082")),  # another port
        added("admin", InetAddress("127.0.0.1", "8081"), kind=SocketKind.DATAGRAM),
        added("admin", InetAddress("127.0.0.1", "8081"), keep_alive=True),  # other options
        added("admin", FdAddress("handed-in")),  # a getfd'd socket: its address is unknown
    ],
)
def test_a_mismatching_runtime_socket_is_rebound_as_a_changed_socket(runtime: SocketSpec) -> None:
    plan = plan_reload([WEB_ONLY_HTTP], [WEB_DECLARES_ADMIN], {("web", "admin"): runtime})
    assert plan.rebind_sockets == (("web", "admin"),)
    assert not (plan.adopt_sockets or plan.bind_sockets or plan.close_sockets)
    assert plan.restart_units == ("web",)
    assert not plan.problems


def test_a_runtime_socket_on_the_declared_address_with_other_options_closes_first() -> None:
    # The same address, bound with other options: the new one waits for the old to close.
    runtime = added("admin", InetAddress("127.0.0.1", "8081"), keep_alive=True)
    plan = plan_reload([WEB_ONLY_HTTP], [WEB_DECLARES_ADMIN], {("web", "admin"): runtime})
    assert plan.close_first == plan.bind_after_close == (("web", "admin"),)


def test_a_runtime_socket_relative_path_resolves_against_its_unit() -> None:
    declared = unit("web", {"http": "127.0.0.1:8080", "admin": "unix:admin.sock"})
    runtime = added("admin", UnixAddress("admin.sock"))
    plan = plan_reload([WEB_ONLY_HTTP], [declared], {("web", "admin"): runtime})
    assert plan.adopt_sockets == (("web", "admin"),)


def test_undeclared_runtime_sockets_are_left_alone() -> None:
    runtime = {("web", "admin"): ADMIN, ("gone", "x"): ADMIN}
    plan = plan_reload([WEB_ONLY_HTTP], [WEB_ONLY_HTTP], runtime)
    assert plan.nothing_to_do
    renamed = unit("web", {"http": "127.0.0.1:8080", "mgmt": "127.0.0.1:8081"})
    plan = plan_reload([WEB_ONLY_HTTP], [renamed], runtime)
    # Not moved to another name: bound (the runtime socket stays, so this bind
    # fails at reload time with the address in use, and nothing changes).
    assert plan.bind_sockets == (("web", "mgmt"),) and not plan.move_sockets


def test_no_move_lands_on_a_runtime_socket_key() -> None:
    # http's address is now declared as admin, which a runtime socket holds:
    # a move onto admin would meet that fd in the store.
    swapped = unit("web", {"admin": "127.0.0.1:8080"})
    plan = plan_reload([WEB_ONLY_HTTP], [swapped], {("web", "admin"): ADMIN})
    assert not plan.move_sockets
    assert plan.rebind_sockets == (("web", "admin"),)
    assert plan.close_sockets == (("web", "http"),)
    assert plan.close_first == (("web", "http"),)
    assert plan.bind_after_close == (("web", "admin"),)


# --------------------------------------------------------------------------- summary


def test_summary_counts_everything() -> None:
    web = unit("web", {"http": {"listen": "127.0.0.1:8080", "backlog": 64}, "admin": "unix:/run/w"})
    plan = plan_reload(
        [WEB, API, fd_unit(sd="fd:3")],
        [web, unit("db", {"pg": "127.0.0.1:5432"}), fd_unit("sd2", sd="fd:4")],
    )
    assert plan.summary() == (
        "0 units unchanged, 1 restarted, 2 added, 2 removed; sockets: 0 kept, 1 relistened, "
        "0 moved, 1 rebound, 2 bound, 2 closed, 1 close-first; 1 problem"
    )


# --------------------------------------------------------------------------- properties

_ADDRESSES: list[SocketAddress] = [
    InetAddress("127.0.0.1", "8001"),
    InetAddress("127.0.0.1", "8002"),
    InetAddress("", "8001"),
    InetAddress("127.0.0.1", "0"),
    UnixAddress("/run/a.sock"),
    UnixAddress("/run/b.sock"),
    UnixAddress("n", abstract=True),
    VsockAddress("3", "1234"),
    FdAddress("3"),
    FdAddress("4"),
]


@st.composite
def socket_specs(draw: st.DrawFn, name: str) -> SocketSpec:
    return SocketSpec(
        name=name,
        address=draw(st.sampled_from(_ADDRESSES)),
        kind=draw(st.sampled_from([SocketKind.STREAM, SocketKind.DATAGRAM])),
        backlog=draw(st.sampled_from([64, 128])),
        reuse_port=draw(st.booleans()),
        mode=draw(st.sampled_from([None, 0o600])),
    )


@st.composite
def units(draw: st.DrawFn) -> Unit:
    name = draw(st.sampled_from(["a", "b", "c", "d"]))
    names = draw(st.lists(st.sampled_from(["x", "y", "z"]), unique=True, max_size=3))
    sockets = tuple(draw(socket_specs(n)) for n in names)
    service = ServiceSpec(exec=draw(st.sampled_from([("app",), ("app", "-v")])))
    return Unit(name, BASE / f"{name}.yaml", BASE, sockets, service)


unit_sets = st.lists(units(), unique_by=lambda u: u.name, max_size=4)


@st.composite
def edited_socket(draw: st.DrawFn, spec: SocketSpec) -> SocketSpec:
    edit = draw(st.sampled_from(["same", "backlog", "address", "option", "rename"]))
    if edit == "backlog":
        return replace(spec, backlog=spec.backlog * 2)
    if edit == "address":
        return replace(spec, address=draw(st.sampled_from(_ADDRESSES)))
    if edit == "option":
        return replace(spec, reuse_port=not spec.reuse_port)
    return replace(spec, name=spec.name + "2") if edit == "rename" else spec


@st.composite
def edited_unit(draw: st.DrawFn, unit: Unit) -> list[Unit]:
    edit = draw(st.sampled_from(["same", "drop", "rename", "service", "sockets"]))
    if edit == "drop":
        return []
    if edit == "rename":
        return [replace(unit, name=unit.name + "2")]
    if edit == "service":
        return [replace(unit, service=replace(unit.service, exec=("other",)))]
    if edit == "sockets":
        sockets = draw(st.permutations([draw(edited_socket(s)) for s in unit.sockets]))
        return [replace(unit, sockets=tuple(sockets))]
    return [unit]


@st.composite
def reloads(draw: st.DrawFn) -> tuple[list[Unit], list[Unit]]:
    """Old units and the new ones an operator made of them by editing, or unrelated ones."""
    old = draw(unit_sets)
    if draw(st.booleans()):
        return old, draw(unit_sets)
    new = [edited for u in old for edited in draw(edited_unit(u))]
    added = draw(unit_sets)
    taken = {u.name for u in new}
    return old, draw(st.permutations(new + [u for u in added if u.name not in taken]))


def bound_identity(spec: SocketSpec) -> SocketSpec:
    return replace(spec, name="", backlog=0)


def specs(units: list[Unit]) -> dict[SocketKey, SocketSpec]:
    return {(u.name, s.name): s for u in units for s in u.sockets}


@settings(max_examples=300)
@given(unit_sets.flatmap(lambda x: st.tuples(st.just(x), st.permutations(x))))
def test_the_same_units_in_any_order_change_nothing(pair: tuple[list[Unit], list[Unit]]) -> None:
    old, new = pair
    plan = plan_reload(old, new)
    assert plan.nothing_to_do
    assert Counter(plan.keep_sockets) == keys(old)
    assert plan.unchanged_units == tuple(u.name for u in new)


@settings(max_examples=1000)
@given(reloads())
def test_every_socket_and_unit_is_in_exactly_one_group(
    reload: tuple[list[Unit], list[Unit]],
) -> None:
    old, new = reload
    plan = plan_reload(old, new)
    assert socket_groups_of_old(plan) == keys(old)
    assert socket_groups_of_new(plan) == keys(new)
    assert Counter([*plan.unchanged_units, *plan.restart_units, *plan.stop_units]) == Counter(
        u.name for u in old
    )
    assert Counter([*plan.unchanged_units, *plan.restart_units, *plan.start_units]) == Counter(
        u.name for u in new
    )
    assert set(plan.close_first) <= {*plan.rebind_sockets, *plan.close_sockets}
    assert set(plan.bind_after_close) <= {*plan.rebind_sockets, *plan.bind_sockets}
    assert bool(plan.close_first) == bool(plan.bind_after_close)
    assert set(plan.relisten_moved) <= {target for _, target in plan.move_sockets}


@settings(max_examples=1000)
@given(reloads())
def test_the_plan_keeps_every_fd_it_can(reload: tuple[list[Unit], list[Unit]]) -> None:
    old, new = reload
    plan = plan_reload(old, new)
    before, after = specs(old), specs(new)
    for key in plan.keep_sockets:
        assert bound_identity(before[key]) == bound_identity(after[key])
    for key in plan.relisten_sockets:
        assert before[key] == replace(after[key], backlog=before[key].backlog)
    for source, target in plan.move_sockets:
        assert bound_identity(before[source]) == bound_identity(after[target])
    # Nothing closed could have been moved to something bound.
    closed = {bound_identity(before[k]) for k in (*plan.rebind_sockets, *plan.close_sockets)}
    bound = {bound_identity(after[k]) for k in (*plan.rebind_sockets, *plan.bind_sockets)}
    assert not closed & bound
    # Unchanged units are those whose workers could keep every fd they have.
    for name in plan.unchanged_units:
        (unit_after,) = [u for u in new if u.name == name]
        assert all(
            (name, s) in {*plan.keep_sockets, *plan.relisten_sockets}
            for s in unit_after.socket_names
        )
    # One problem per inherited fd that would have to be adopted anew.
    adopted = [
        k
        for k in (*plan.rebind_sockets, *plan.bind_sockets)
        if isinstance(after[k].address, FdAddress)
    ]
    assert len(plan.problems) == len(adopted)


@settings(max_examples=300)
@given(reloads())
def test_kept_and_relistened_sockets_are_the_same_both_ways(
    reload: tuple[list[Unit], list[Unit]],
) -> None:
    old, new = reload
    forward, backward = plan_reload(old, new), plan_reload(new, old)
    assert set(forward.keep_sockets) == set(backward.keep_sockets)
    assert set(forward.relisten_sockets) == set(backward.relisten_sockets)
    assert set(forward.unchanged_units) == set(backward.unchanged_units)
