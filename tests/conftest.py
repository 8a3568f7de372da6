"""Shared fixtures: a real supervisor in a temp dir, synchronised on its log events.

The supervisor runs as a child process with ``--log-format json``; a thread
reads its stderr line by line, and tests wait for events (``ready``,
``worker_started``, ...) with a deadline instead of sleeping.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from fdsupervisor.cgroups import cgroup2_mounts, cgroup_directory, own_cgroup, parent_name
from fdsupervisor.spawn import native_spawn_available

ROOT = Path(__file__).resolve().parent.parent
REPORT_WORKER = str(ROOT / "tests" / "workers" / "report.py")
# The spawn path the supervisor takes (FDSUPERVISOR_SPAWN in its environment,
# docs/workers.md): the C extension, or the os.fork() fallback of installs
# without a C compiler. Tests of the child's work run both.
NATIVE_SPAWN = {"FDSUPERVISOR_SPAWN": "native"}
FORK_SPAWN = {"FDSUPERVISOR_SPAWN": "fork"}
SPAWN_PATHS = [
    pytest.param(NATIVE_SPAWN, id="native", marks=pytest.mark.skipif(
        not native_spawn_available(), reason="fdsupervisor._spawn is not built"
    )),
    pytest.param(FORK_SPAWN, id="fork"),
]  # fmt: skip
# The native spawn's second way into a worker's cgroup, the write to cgroup.procs of
# kernels without clone3(CLONE_INTO_CGROUP): for the tests of the cgroups themselves.
MIGRATE_SPAWN = {"FDSUPERVISOR_SPAWN": "migrate"}
CGROUP_SPAWN_PATHS = [
    *SPAWN_PATHS,
    pytest.param(MIGRATE_SPAWN, id="migrate", marks=pytest.mark.skipif(
        not native_spawn_available(), reason="fdsupervisor._spawn is not built"
    )),
]  # fmt: skip
ECHO_WORKER = str(ROOT / "contrib" / "workers" / "echo.py")
PYTHON = sys.executable


def fdsupervisor_command(*args: str) -> list[str]:
    """The installed package's command line, ``python -m fdsupervisor ARGS``.

    For a supervisor started under another program (systemd-socket-activate,
    systemd's exec step); one that runs to its end is :func:`run_fdsupervisor`,
    one that runs beside the test is the ``supervisor`` fixture.
    """
    return [PYTHON, "-m", "fdsupervisor", *args]


def run_fdsupervisor(
    *args: str, timeout: float = 30.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``fdsupervisor ARGS`` run to its end, its output captured as text.

    The environment is the test's own unless ``env=`` is given: the package
    is the installed one, no PYTHONPATH of ours. Other keywords go to
    :func:`subprocess.run` (``pass_fds=``, ``cwd=``).
    """
    return subprocess.run(
        fdsupervisor_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def open_fds(pid: int | str = "self") -> list[int]:
    """The fds open in ``pid``; in this process, after a collection.

    Objects an earlier test left to the garbage collector (a socket, a file)
    would otherwise close their fds in the middle of a later test's count.
    """
    if pid == "self" or pid == os.getpid():
        gc.collect()
    result = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue  # the listing's own fd, already closed
        result.append(int(name))
    return sorted(result)


class SupervisorProcess:
    """A running ``fdsupervisor run`` and the events it logged."""

    # Every supervisor this session started: none may leave its cgroup tree behind
    # (no_cgroup_left_behind, at the session's end).
    started_pids: ClassVar[set[int]] = set()

    def __init__(
        self,
        args: list[str],
        cwd: Path,
        pass_fds: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self.output: list[str] = []
        self._cond = threading.Condition()
        # The package is the installed one (pip install -e): no PYTHONPATH of ours.
        full_env = dict(os.environ, **(env or {}))
        self.proc = subprocess.Popen(
            # prefix: a program that runs the supervisor (unshare for a pid namespace).
            [*prefix, PYTHON, "-m", "fdsupervisor", "run", "--log-format", "json", *args],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            env=full_env,
        )
        self.pid = self.proc.pid
        SupervisorProcess.started_pids.add(self.pid)
        self.monitor_path = Path()
        # Two streams read apart: workers print to stdout, the supervisor logs
        # to stderr, and a line of one never lands inside a line of the other.
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for reader in self._readers:
            reader.start()

    @property
    def _reading(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def _read(self, stream: Any) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.output.append(line)
                if line.startswith("{"):
                    try:
                        self.events.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(
        self, event: str, timeout: float = 15.0, after: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The first event named ``event`` (index >= ``after``) whose fields match."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in self.events[after:]:
                    if item.get("event") == event and all(
                        item.get(k) == v for k, v in fields.items()
                    ):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reading):
                    raise AssertionError(
                        f"no {event} {fields} within {timeout}s; output:\n" + "\n".join(self.output)
                    )
                self._cond.wait(remaining)

    def output_mark(self) -> int:
        with self._cond:
            return len(self.output)

    def wait_output(self, text: str, timeout: float = 15.0, after: int = 0) -> str:
        """The first output line (index >= ``after``) containing ``text``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.output[after:]:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._reading:
                    raise AssertionError(
                        f"{text!r} not printed within {timeout}s; output:\n"
                        + "\n".join(self.output)
                    )
                self._cond.wait(remaining)

    def count(self, event: str, **fields: Any) -> int:
        with self._cond:
            return sum(
                1
                for e in self.events
                if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
            )

    def wait_count(self, event: str, count: int, timeout: float = 15.0, **fields: Any) -> int:
        """Wait until ``count`` events named ``event`` were logged; how many there are then.

        The log arrives on a pipe read by a thread: an event logged before a
        reply the test has read may not have been read yet.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                seen = sum(
                    1
                    for e in self.events
                    if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
                )
                remaining = deadline - time.monotonic()
                if seen >= count or remaining <= 0 or not self._reading:
                    return seen
                self._cond.wait(remaining)

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def address(self, socket_name: str, unit: str | None = None) -> str:
        fields = {"socket": socket_name} if unit is None else {"socket": socket_name, "unit": unit}
        return str(self.wait_for("socket_bound", **fields)["address"])

    def port(self, socket_name: str, unit: str | None = None) -> int:
        return int(self.address(socket_name, unit).rsplit(":", 1)[1])

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            for reader in self._readers:
                reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def supervisor_cgroups() -> Path | None:
    """Where the supervisors this process starts put their cgroup trees (None: no cgroups)."""
    try:
        mounts = cgroup2_mounts(Path("/proc/self/mountinfo").read_text())
        path = own_cgroup(Path("/proc/self/cgroup").read_text())
    except OSError:
        return None
    return cgroup_directory(mounts, path) if path is not None else None


@pytest.fixture(scope="session", autouse=True)
def no_cgroup_left_behind() -> Iterator[None]:
    """At the session's end, no supervisor of the session left its cgroup tree.

    A supervisor removes its tree when it stops (cgroups.py), and the next one
    to start removes what a killed one left; a tree still there at the end was
    left by a test (a supervisor it killed last, or one that failed to clean
    up). The empty ones are removed, so that the next run starts clean, and
    the session fails naming them.
    """
    yield
    base = supervisor_cgroups()
    if base is None:
        return
    namespace = os.stat("/proc/self/ns/pid").st_ino
    left = [
        base / parent_name(pid, namespace)
        for pid in sorted(SupervisorProcess.started_pids)
        if (base / parent_name(pid, namespace)).exists()
    ]
    for tree in left:
        for directory, _children, _files in os.walk(tree, topdown=False):
            try:
                os.rmdir(directory)
            except OSError:
                pass  # populated: a process is still in it, named below
    if left:
        pytest.fail(f"supervisors of this session left their cgroup trees: {left}")


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    """Start supervisors on unit texts: ``supervisor({"web": YAML}) → SupervisorProcess``.

    Waits for the ``ready`` event; every supervisor is stopped (then killed)
    at the end of the test.
    """
    started: list[SupervisorProcess] = []

    def start(
        units: dict[str, str] | None = None,
        args: list[str] | None = None,
        wait_ready: bool = True,
        **kwargs: Any,
    ) -> SupervisorProcess:
        unit_dir = tmp_path / "units"
        unit_dir.mkdir(exist_ok=True)
        for name, text in (units or {}).items():
            (unit_dir / f"{name}.yaml").write_text(textwrap.dedent(text))
        monitor = tmp_path / f"monitor-{len(started)}.sock"
        full_args = ["--monitor", str(monitor)]
        full_args += list(args) if args is not None else [str(unit_dir)]
        proc = SupervisorProcess(full_args, cwd=tmp_path, **kwargs)
        proc.monitor_path = monitor
        started.append(proc)
        if wait_ready:
            proc.wait_for("ready")
        return proc

    yield start
    for proc in started:
        try:
            proc.stop(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def connect_and_read(host: str, port: int, timeout: float = 10.0) -> bytes:
    with socket.create_connection((host, port), timeout=timeout) as conn:
        return read_until_eof(conn)


def read_until_eof(conn: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def report_from(host: str, port: int) -> dict[str, Any]:
    return dict(json.loads(connect_and_read(host, port)))
