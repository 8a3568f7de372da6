"""Types of the C extension ``fdsupervisor._spawn`` (``_spawn.c``); used by ``spawn.py`` only."""

from collections.abc import Sequence

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
    /,
) -> int:
    """Start ``executable`` with ``clone(CLONE_VM | CLONE_VFORK)``; its pid once it exec'd.

    ``-1`` for ``stdio_fd``, ``uid`` or ``gid`` means none. A failure in the child
    raises ``OSError(errno, "STAGE: reason")`` after the child was reaped.
    """
