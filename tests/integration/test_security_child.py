"""The child's part of the security model, attacked for real: output files.

The defence lives between fork and exec, so every test runs the supervisor
with each spawn path: the C extension (``NATIVE_SPAWN``) and the os.fork()
fallback (``FORK_SPAWN``).

- A worker's ``stdout: append:PATH`` is opened by the child once it is the
  worker's user: a worker that swaps its log file for a symlink to a
  root-only file gets "stdout: Permission denied" at its restart, and the
  root-only file stays as it was.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import FORK_SPAWN, NATIVE_SPAWN

SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, needs nothing of ours

AS_ROOT_AND_NOBODY = pytest.mark.skipif(
    os.getuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to run a worker as nobody) and /usr/bin/python3",
)

SPAWN_PATHS = [
    pytest.param(NATIVE_SPAWN, id="native"),
    pytest.param(FORK_SPAWN, id="fork"),
]


@contextmanager
def world_traversable_dir() -> Iterator[Path]:
    """A directory nobody may enter (tmp_path is 0700 root); removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="fdsup-child-"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- 3. a worker's output file is opened as the worker -----------------------------------------

# The worker, as nobody: write a line to its log, then swap the log for a symlink
# to the root-only file and exit, so that the restart opens the link.
SWAP_LOG_FOR_SYMLINK = """
import os, sys
log, target = sys.argv[1], sys.argv[2]
print("written by the worker", flush=True)
os.unlink(log)
os.symlink(target, log)
sys.exit(1)
"""


@AS_ROOT_AND_NOBODY
@pytest.mark.parametrize("program", SPAWN_PATHS)
@pytest.mark.parametrize("kind", ["append", "file"])
def test_a_worker_cannot_make_root_open_a_file_as_its_output(
    supervisor, program: tuple[str, ...], kind: str
) -> None:
    nobody = pwd.getpwnam("nobody")
    with world_traversable_dir() as directory:
        logs = directory / "logs"
        logs.mkdir()
        os.chown(logs, nobody.pw_uid, nobody.pw_gid)  # the worker's own directory
        log = logs / "out.log"
        precious = directory / "shadow"
        precious.write_text("root:only\n")
        precious.chmod(0o600)
        unit = f"""
            sockets:
              http: {{listen: "127.0.0.1:0"}}
            service:
              exec: [{SYSTEM_PYTHON}, -c, {json.dumps(SWAP_LOG_FOR_SYMLINK)}, {log}, {precious}]
              user: nobody
              stdout: "{kind}:{log}"
              restart: always
              restart-delay: 0
            """
        sup = supervisor({"web": unit}, program=program)
        first = sup.wait_for("worker_exited")
        assert first["status"] == "code 1"
        assert log.is_symlink(), "the worker did not swap its log: no attack was mounted"
        # Failed either way: at once by the fix, else by the start limit of the looping attack.
        failed = sup.wait_for("service_failed", unit="web")
        assert precious.read_text() == "root:only\n", "root opened the link for the worker"
        assert precious.stat().st_mode & 0o777 == 0o600
        assert failed["reason"].endswith("stdout: Permission denied")  # not transient: no retry
        assert sup.count("worker_started") == 1


@AS_ROOT_AND_NOBODY
@pytest.mark.parametrize("program", SPAWN_PATHS)
def test_output_files_are_created_by_the_worker_and_shared_by_stdout_and_stderr(
    supervisor, program: tuple[str, ...]
) -> None:
    nobody = pwd.getpwnam("nobody")
    worker = "import sys; print('out', flush=True); print('err', file=sys.stderr, flush=True)"
    with world_traversable_dir() as directory:
        logs = directory / "logs"
        logs.mkdir()
        os.chown(logs, nobody.pw_uid, nobody.pw_gid)
        log = logs / "both.log"
        unit = f"""
            sockets:
              http: {{listen: "127.0.0.1:0"}}
            service:
              exec: [{SYSTEM_PYTHON}, -c, {json.dumps(worker)}]
              user: nobody
              stdout: "file:{log}"
              stderr: "file:{log}"
            """
        sup = supervisor({"web": unit}, program=program)
        assert sup.wait_for("worker_exited")["status"] == "code 0"
        assert log.stat().st_uid == nobody.pw_uid, "created by root, not by the worker"
        # One open file for both (as systemd does): two would each write at offset 0.
        assert log.read_text() == "out\nerr\n"
