"""Workers speaking sd_notify to the supervisor: readiness, status, watchdog, fd store."""

from __future__ import annotations

import json
import os
import signal
from datetime import datetime

import pytest

from tests.conftest import PYTHON, ROOT, report_from, run_fdsupervisor
from tests.monitor_client import RawClient

NOTIFIER = str(ROOT / "tests" / "workers" / "notifier.py")


def unit(mode: str, extra: str = "", restart: str = "on-failure") -> str:
    return f"""
        sockets:
          http: {{listen: "127.0.0.1:0"}}
        service:
          exec: [{PYTHON}, {NOTIFIER}, {mode}]
          restart: {restart}
          restart-delay: 0
{extra}
        """


def services(sup) -> dict[str, dict[str, object]]:
    with RawClient(sup.monitor_path).negotiate() as client:
        return {s["unit"]: s for s in client.command("query-services")["return"]}


def info_line(sup, after: int = 0) -> dict[str, object]:
    line = sup.wait_output("notifier {", after=after)
    return dict(json.loads(line.split("notifier ", 1)[1]))


def test_ready_and_status(supervisor) -> None:
    sup = supervisor({"web": unit("ready", "          notify: true")})
    ready = sup.wait_for("service_ready", unit="web")
    info = info_line(sup)
    assert info["pid"] == ready["pid"]
    assert info["notify_socket"], "workers get NOTIFY_SOCKET"
    state = services(sup)["web"]
    assert state["state"] == "running"
    assert state["status"] == "serving requests"


def test_never_ready_is_failed_after_the_start_timeout(supervisor) -> None:
    sup = supervisor(
        {
            "slow": unit(
                "never-ready", "          notify: true\n          start-timeout: 300ms", "no"
            )
        }
    )
    assert services(sup)["slow"]["state"] == "starting"
    killed = sup.wait_for("worker_killed", unit="slow")
    assert "start timeout" in killed["reason"]
    sup.wait_for("worker_exited", unit="slow")
    assert services(sup)["slow"]["state"] == "failed"


def test_extend_timeout_gives_a_slow_start_the_time_it_asks_for(supervisor) -> None:
    """EXTEND_TIMEOUT_USEC=10s, then READY=1 after 1.5 s, with start-timeout: 1s."""
    sup = supervisor(
        {
            "slow": unit(
                "extend-then-ready", "          notify: true\n          start-timeout: 1s", "no"
            )
        }
    )
    started = sup.wait_for("worker_started", unit="slow")
    extended = sup.wait_for("timeout_extended", unit="slow")
    assert (extended["pid"], extended["timeouts"], extended["seconds"]) == (
        started["pid"],
        ["start"],
        10.0,
    )
    ready = sup.wait_for("service_ready", unit="slow")
    waited = datetime.fromisoformat(ready["timestamp"]) - datetime.fromisoformat(
        started["timestamp"]
    )
    assert waited.total_seconds() > 1.0, "READY=1 came after the unit's own start-timeout"
    assert sup.count("worker_killed", unit="slow") == 0
    state = services(sup)["slow"]
    assert (state["state"], state["status"]) == ("running", "ready after an extension")


def test_start_timeout_restarts_under_on_failure(supervisor) -> None:
    sup = supervisor(
        {"slow": unit("never-ready", "          notify: true\n          start-timeout: 200ms")}
    )
    first = sup.wait_for("worker_killed", unit="slow")
    exited = sup.wait_for("worker_exited", pid=first["pid"])
    assert exited["status"] == "signal SIGTERM"
    assert exited["restart_in"] == 0, "a start timeout is a failure, whatever the signal"


def test_watchdog_kills_a_worker_that_stops_pinging(supervisor) -> None:
    sup = supervisor({"dog": unit("ping-three-times", "          watchdog: 400ms")})
    info = info_line(sup)
    assert info["watchdog_usec"] == "400000"
    assert info["watchdog_pid"] == str(info["pid"])
    killed = sup.wait_for("worker_killed", unit="dog")
    assert killed["pid"] == info["pid"] and "watchdog" in killed["reason"]
    exited = sup.wait_for("worker_exited", pid=info["pid"])
    assert exited["status"] == "signal SIGABRT"
    assert exited["restart_in"] is not None, "a watchdog kill is a failure: restarted"


def test_stored_fd_comes_back_after_sigkill_with_its_name(supervisor) -> None:
    sup = supervisor({"keeper": unit("store", "          fd-store-max: 4")})
    first = info_line(sup)
    stored = sup.wait_for("fd_stored", unit="keeper")
    assert stored["fdname"] == "keep"
    mark, out = sup.mark(), sup.output_mark()
    os.kill(int(first["pid"]), signal.SIGKILL)
    sup.wait_for("worker_started", after=mark)
    second = info_line(sup, after=out)
    assert second["names"] == "http:keep"
    assert second["inodes"]["keep"] == first["stored_inode"], "the same socket came back"
    report = report_from("127.0.0.1", sup.port("http"))
    assert report["pid"] == second["pid"]
    with RawClient(sup.monitor_path).negotiate() as client:
        fds = client.command("query-fds")["return"]
    assert {"fdname": "keep", "owner": "service:keeper"}.items() <= next(
        f for f in fds if f["fdname"] == "keep"
    ).items()


def test_fd_store_remove_and_hangup(supervisor) -> None:
    sup = supervisor(
        {
            "remover": unit("store-then-remove", "          fd-store-max: 4"),
            "hangup": unit("store-hangup", "          fd-store-max: 4"),
        }
    )
    removed = sup.wait_for("fd_store_removed", owner="service:remover")
    assert removed["reason"] == "FDSTOREREMOVE=1"
    hung = sup.wait_for("fd_store_removed", owner="service:hangup")
    assert "hung up" in hung["reason"]
    with RawClient(sup.monitor_path).negotiate() as client:
        owners = {f["owner"] for f in client.command("query-fds")["return"]}
    assert "service:remover" not in owners and "service:hangup" not in owners


def test_fd_store_max_zero_refuses(supervisor) -> None:
    sup = supervisor({"nostore": unit("store")})
    full = sup.wait_for("fd_store_full", unit="nostore")
    assert full["fd_store_max"] == 0


def test_several_fds_under_one_name_all_come_back_each_named(supervisor) -> None:
    """As systemd keeps them: two fds stored as ``pair`` (and a duplicate of one, kept once)."""
    sup = supervisor({"twins": unit("store-two", "          fd-store-max: 4")})
    first = info_line(sup)
    assert sup.wait_count("fd_stored", 2, unit="twins", fdname="pair") == 2
    mark, out = sup.mark(), sup.output_mark()
    os.kill(int(first["pid"]), signal.SIGKILL)
    sup.wait_for("worker_started", after=mark)
    second = info_line(sup, after=out)
    assert second["names"] == "http:pair:pair"
    assert [inode for name, inode in second["named_inodes"] if name == "pair"] == first[
        "stored_inodes"
    ], "both fds came back, in the order stored"
    assert sup.count("fd_stored", unit="twins") == 2, "the duplicate was not kept"
    with RawClient(sup.monitor_path).negotiate() as client:
        rows = [f for f in client.command("query-fds")["return"] if f["owner"] == "service:twins"]
    assert [(row["fdname"], row["inode"]) for row in rows] == [
        ("pair", inode) for inode in first["stored_inodes"]
    ]


@pytest.mark.parametrize(
    ("preserve", "after_crash", "after_stop"),
    [("no", False, False), ("restart", True, False), ("yes", True, True)],
)
def test_fd_store_preserve(supervisor, preserve: str, after_crash: bool, after_stop: bool) -> None:
    """systemd's FileDescriptorStorePreserve=: is the stored fd handed to the next worker?

    After a crash and its automatic restart, then after service-stop and service-start.
    """
    extra = f"          fd-store-max: 4\n          fd-store-preserve: {preserve}"
    sup = supervisor({"keeper": unit("store", extra)})
    first = info_line(sup)
    sup.wait_for("fd_stored", unit="keeper")
    mark, out = sup.mark(), sup.output_mark()
    os.kill(int(first["pid"]), signal.SIGKILL)
    sup.wait_for("worker_started", after=mark)
    second = info_line(sup, after=out)
    assert ("keep" in str(second["names"]).split(":")) == after_crash
    if not after_crash:
        sup.wait_for("fd_stored", unit="keeper", after=mark)  # the new worker stores anew
    with RawClient(sup.monitor_path).negotiate() as client:
        mark = sup.mark()
        assert client.command("service-stop", unit="keeper") == {"return": {}}
        sup.wait_for("worker_exited", pid=second["pid"], after=mark)
        out = sup.output_mark()
        assert client.command("service-start", unit="keeper") == {"return": {}}
    third = info_line(sup, after=out)
    assert ("keep" in str(third["names"]).split(":")) == after_stop
    released = sup.count("fd_store_released", unit="keeper")
    assert released == {"no": 2, "restart": 1, "yes": 0}[preserve]


def test_fd_store_remove_drops_every_fd_of_the_name(supervisor) -> None:
    sup = supervisor({"twins": unit("store-two-then-remove", "          fd-store-max: 4")})
    removed = sup.wait_for("fd_store_removed", owner="service:twins")
    assert removed["reason"] == "FDSTOREREMOVE=1" and removed["fds"] == 2
    with RawClient(sup.monitor_path).negotiate() as client:
        owners = [f["owner"] for f in client.command("query-fds")["return"]]
    assert "service:twins" not in owners


def test_check_shows_fd_store_preserve_and_refuses_a_bad_one(tmp_path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    (units / "keeper.yaml").write_text(
        unit("store", "          fd-store-max: 2\n          fd-store-preserve: yes")
    )
    checked = run_fdsupervisor("check", str(units))
    assert checked.returncode == 0, checked.stderr
    assert "fd-store-max=2 fd-store-preserve=yes" in checked.stdout
    (units / "keeper.yaml").write_text(unit("store", "          fd-store-preserve: sometimes"))
    checked = run_fdsupervisor("check", str(units))
    assert checked.returncode == 1
    assert (
        f"{units / 'keeper.yaml'}:8:30: service.fd-store-preserve: "
        "expected one of no, restart, yes, got 'sometimes'"
    ) in checked.stderr


def test_a_reload_that_changes_the_service_keeps_what_its_workers_stored(
    supervisor, tmp_path
) -> None:
    """A changed unit's workers are replaced: a restart, which fd-store-preserve: restart survives."""
    sup = supervisor({"keeper": unit("store", "          fd-store-max: 4")})
    first = info_line(sup)
    stored = sup.wait_for("fd_stored", unit="keeper")
    changed = unit("store", "          fd-store-max: 4\n          environment: {CHANGED: 1}")
    (tmp_path / "units" / "keeper.yaml").write_text(changed)
    mark, out = sup.mark(), sup.output_mark()
    with RawClient(sup.monitor_path).negotiate() as client:
        assert "return" in client.command("reload")
    sup.wait_for("worker_started", after=mark)
    second = info_line(sup, after=out)
    assert second["pid"] != first["pid"] and second["names"] == "http:keep"
    assert second["inodes"]["keep"] == first["stored_inode"]
    assert not sup.count("fd_store_released", unit="keeper")
    assert stored["fdname"] == "keep"
