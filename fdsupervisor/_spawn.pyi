"""Types of the C extension ``fdsupervisor._spawn`` (``_spawn.c``); used by ``spawn.py`` only."""

from collections.abc import Sequence

LISTEN_FDS_START: int  # the C define; fdpassing.LISTEN_FDS_START is the fact

def spawn(
    executable: bytes,
    argv: Sequence[bytes],
    envp: Sequence[bytes],
    fds: Sequence[int],
    stdio_fd: int,
    cwd: bytes | None,
    uid: int,
    gid: int,
    groups: Sequence[int] | None,
    pid_variables: Sequence[bytes],
    reset_signals: Sequence[int],
    stdout_fd: int,
    stderr_fd: int,
    stdout_path: bytes | None,
    stdout_append: bool,
    stderr_path: bytes | None,
    stderr_append: bool,
    cgroup_fd: int,
    rlimits: Sequence[tuple[int, int, int]],
    umask: int,
    no_new_privileges: bool,
    migrate: bool,
    slot_anchor: int,
    slots: Sequence[int],
    /,
) -> int:
    """Start ``executable`` with ``clone(CLONE_VM | CLONE_VFORK)``; its pid once it exec'd.

    ``-1`` for ``stdio_fd``, ``uid``, ``gid``, ``stdout_fd``, ``stderr_fd`` or
    ``cgroup_fd`` means none; ``cgroup_fd`` is a cgroup's directory, which the child
    starts in: created there with ``clone3(CLONE_INTO_CGROUP)`` on x86-64, else (or
    with ``migrate``) made by ``clone()`` and moved there by a write to ``cgroup.procs``. ``stdout_path`` and ``stderr_path`` are opened by the child after the
    switch to ``uid``. ``rlimits`` are (``RLIMIT_*``, soft, hard) with -1 for
    infinity; ``umask`` -1 keeps the supervisor's. ``slots`` (ascending, each a copy of
    ``slot_anchor``; spawn_slots.py) let the child start on our fd table and copy only
    what lies below them; ``()`` copies the whole table. A failure in the child raises
    ``OSError(errno, "STAGE: reason")`` after the child was reaped.
    """
