"""binding.py against real sockets: loopback and unix only, ports chosen by the kernel."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fdsupervisor.addresses import FdAddress, InetAddress, UnixAddress, VsockAddress
from fdsupervisor.binding import (
    DEFAULT_SOCKET_MODE,
    BoundSocket,
    InheritedFds,
    SocketInfo,
    adopt_socket,
    bind_socket,
    describe_socket,
)
from fdsupervisor.errors import BindError
from fdsupervisor.units import SocketKind, SocketSpec

NO_FDS = InheritedFds(frozenset())
KINDS = {
    SocketKind.STREAM: socket.SOCK_STREAM,
    SocketKind.DATAGRAM: socket.SOCK_DGRAM,
    SocketKind.SEQPACKET: socket.SOCK_SEQPACKET,
}


# --- helpers and fixtures ---------------------------------------------------


def open_fds() -> set[int]:
    """This process's open fds, without the one that listing /proc/self/fd used."""
    listed = {int(entry) for entry in os.listdir("/proc/self/fd")}
    return {fd for fd in listed if is_open(fd)}


def is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


@pytest.fixture
def no_fd_leak() -> Callable[[], contextlib.AbstractContextManager[None]]:
    """``with no_fd_leak():`` asserts the block leaves exactly the same fds open."""

    @contextlib.contextmanager
    def guard() -> Iterator[None]:
        before = open_fds()
        yield
        after = open_fds()
        assert after == before, f"leaked {sorted(after - before)}, lost {sorted(before - after)}"

    return guard


@pytest.fixture
def bound() -> Iterator[Callable[..., BoundSocket]]:
    """``bound(spec, ...)``: bind_socket() whose result is closed after the test."""
    owned: list[BoundSocket] = []

    def bind(
        spec: SocketSpec, base_dir: Path = Path("/"), inherited: InheritedFds = NO_FDS
    ) -> BoundSocket:
        result = bind_socket(spec, base_dir=base_dir, inherited=inherited)
        owned.append(result)
        return result

    yield bind
    for result in owned:
        result.close()


@pytest.fixture
def closing() -> Iterator[Callable[[socket.socket], socket.socket]]:
    """``closing(sock)``: closed after the test, whatever happens."""
    socks: list[socket.socket] = []

    def keep(sock: socket.socket) -> socket.socket:
        socks.append(sock)
        return sock

    yield keep
    for sock in socks:
        sock.close()


def spec(address: Any, **options: Any) -> SocketSpec:
    return SocketSpec(name="http", address=address, **options)


def loopback(port: str = "0", **members: Any) -> InetAddress:
    return InetAddress(host="127.0.0.1", port=port, **members)


def expect_bind_error(
    no_fd_leak: Callable[[], contextlib.AbstractContextManager[None]],
    socket_spec: SocketSpec,
    *,
    base_dir: Path = Path("/"),
    inherited: InheritedFds = NO_FDS,
) -> BindError:
    with no_fd_leak(), pytest.raises(BindError) as caught:
        bind_socket(socket_spec, base_dir=base_dir, inherited=inherited)
    assert caught.value.socket_name == socket_spec.name
    return caught.value


def is_blocking(fd: int) -> bool:
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


def sockopt(sock: socket.socket, level: int, option: int) -> int:
    return sock.getsockopt(level, option)


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def vsock_unavailable_reason() -> str | None:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return "this Python has no socket.AF_VSOCK"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((socket.VMADDR_CID_ANY, socket.VMADDR_PORT_ANY))
            probe.listen(1)
    except OSError as error:
        return f"no usable vsock transport on this host ({error})"
    return None


needs_ipv6 = pytest.mark.skipif(
    not ipv6_loopback_available(), reason="this host cannot bind ::1 (no IPv6 loopback)"
)
VSOCK_UNAVAILABLE = vsock_unavailable_reason()
needs_vsock = pytest.mark.skipif(VSOCK_UNAVAILABLE is not None, reason=str(VSOCK_UNAVAILABLE))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


# --- inet --------------------------------------------------------------------


def test_inet_stream_listens_blocking_and_not_inheritable(
    bound: Callable[..., BoundSocket],
) -> None:
    result = bound(spec(loopback()))
    sock = result.sock
    host, port = sock.getsockname()
    assert (sock.family, sock.type, host) == (socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
    assert port != 0
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR) == 1
    assert sock.get_inheritable() is False
    assert is_blocking(result.fileno())
    assert (result.name, result.adopted, result.created_path) == ("http", False, None)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        conn, _ = sock.accept()
        conn.close()


def test_inet_datagram_is_bound_but_does_not_listen(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(spec(loopback(), kind=SocketKind.DATAGRAM)).sock
    assert sock.type == socket.SOCK_DGRAM
    assert sock.getsockname()[1] != 0
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
    # No SO_REUSEADDR on datagram sockets: two of them could share a port.
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_REUSEADDR) == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.sendto(b"ping", sock.getsockname())
        sock.settimeout(5)
        assert sock.recv(16) == b"ping"


def test_inet_seqpacket_without_sctp_fails_cleanly(no_fd_leak: Any) -> None:
    # SOCK_SEQPACKET over IP is SCTP; where the kernel has it, it must listen.
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_SEQPACKET, socket.IPPROTO_SCTP):
            pass
    except OSError:
        error = expect_bind_error(no_fd_leak, spec(loopback(), kind=SocketKind.SEQPACKET))
        assert "127.0.0.1:0" in error.message
    else:
        result = bind_socket(
            spec(loopback(), kind=SocketKind.SEQPACKET), base_dir=Path("/"), inherited=NO_FDS
        )
        try:
            assert sockopt(result.sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        finally:
            result.close()


def test_address_in_use_names_address_and_os_error(
    no_fd_leak: Any, closing: Callable[[socket.socket], socket.socket]
) -> None:
    taken = closing(socket.create_server(("127.0.0.1", 0)))
    port = taken.getsockname()[1]
    error = expect_bind_error(no_fd_leak, spec(loopback(str(port))))
    assert error.message == f"cannot bind 127.0.0.1:{port}: [Errno 98] Address already in use"
    assert str(error) == f"socket http: {error.message}"


def test_to_range_takes_the_next_free_port(
    bound: Callable[..., BoundSocket], closing: Callable[[socket.socket], socket.socket]
) -> None:
    taken = closing(socket.create_server(("127.0.0.1", 0)))
    first = taken.getsockname()[1]
    if first > 65535 - 20:
        pytest.skip("the kernel chose a port too close to 65535 for a range")
    sock = bound(spec(loopback(str(first), to=first + 20))).sock
    port = sock.getsockname()[1]
    assert first < port <= first + 20
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_to_range_all_taken_fails_without_leak(
    no_fd_leak: Any, closing: Callable[[socket.socket], socket.socket]
) -> None:
    taken = closing(socket.create_server(("127.0.0.1", 0)))
    port = taken.getsockname()[1]
    error = expect_bind_error(no_fd_leak, spec(loopback(str(port), to=port)))
    assert f"127.0.0.1:{port}" in error.message
    assert f"no free port up to {port}" in error.message
    assert "Address already in use" in error.message


def test_empty_to_range_is_refused(no_fd_leak: Any) -> None:
    error = expect_bind_error(no_fd_leak, spec(loopback("2000", to=1000)))
    assert "no address or port to try" in error.message


def test_to_beyond_65535_is_refused(no_fd_leak: Any) -> None:
    error = expect_bind_error(no_fd_leak, spec(loopback("65530", to=70000)))
    assert "65535" in error.message


def test_host_name_resolves_when_not_numeric(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(spec(InetAddress(host="localhost", port="0", numeric=False))).sock
    assert sock.getsockname()[0] in {"127.0.0.1", "::1"}


def test_numeric_refuses_a_host_name(no_fd_leak: Any) -> None:
    address = InetAddress(host="localhost", port="0", numeric=True)
    error = expect_bind_error(no_fd_leak, spec(address))
    assert error.message.startswith("address resolution failed for localhost:0: ")


def test_service_name_port_resolves(no_fd_leak: Any) -> None:
    # "http" is port 80 in /etc/services; as root the bind may even succeed.
    try:
        with no_fd_leak():
            result = bind_socket(spec(loopback("http")), base_dir=Path("/"), inherited=NO_FDS)
            assert result.sock.getsockname() == ("127.0.0.1", 80)
            result.close()
    except BindError as error:
        assert error.message.startswith("cannot bind 127.0.0.1:80: "), error.message


def test_unknown_service_name_is_a_resolution_error(no_fd_leak: Any) -> None:
    error = expect_bind_error(no_fd_leak, spec(loopback("no-such-service-xyz")))
    assert error.message.startswith("address resolution failed for 127.0.0.1:no-such-service-xyz")


def test_ipv4_and_ipv6_both_false_is_refused(no_fd_leak: Any) -> None:
    error = expect_bind_error(no_fd_leak, spec(loopback(ipv4=False, ipv6=False)))
    assert error.message == "Cannot disable IPv4 and IPv6 at same time"


def test_ipv6_false_selects_ipv4(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(spec(InetAddress(host="", port="0", ipv6=False))).sock
    assert sock.family == socket.AF_INET
    assert sock.getsockname()[0] == "0.0.0.0"


@needs_ipv6
def test_ipv6_with_ipv4_false_is_v6_only(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(spec(InetAddress(host="::1", port="0", ipv4=False))).sock
    assert sock.family == socket.AF_INET6
    assert sockopt(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert describe_socket(sock.fileno()).address == f"[::1]:{sock.getsockname()[1]}"


@needs_ipv6
def test_ipv6_without_flags_is_dual_stack(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(spec(InetAddress(host="::", port="0"))).sock
    assert sockopt(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    with socket.create_connection(("127.0.0.1", sock.getsockname()[1]), timeout=5):
        sock.accept()[0].close()


@needs_ipv6
def test_ipv6_true_alone_is_v6_only_as_in_qemu(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(spec(InetAddress(host="", port="0", ipv6=True))).sock
    assert (sock.family, sock.getsockname()[0]) == (socket.AF_INET6, "::")
    assert sockopt(sock, socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1


def test_socket_options_are_applied(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(
        spec(loopback(), keep_alive=True, no_delay=True, reuse_port=True, receive_buffer=4096)
    ).sock
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sockopt(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 4096  # Linux doubles it


def test_options_are_off_by_default(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(spec(loopback())).sock
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    assert sockopt(sock, socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


def test_keep_alive_address_member(bound: Callable[..., BoundSocket]) -> None:
    sock = bound(spec(loopback(keep_alive=True))).sock
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_reuse_port_lets_two_sockets_share_a_port(bound: Callable[..., BoundSocket]) -> None:
    first = bound(spec(loopback(), reuse_port=True)).sock
    port = str(first.getsockname()[1])
    second = bound(spec(loopback(port), reuse_port=True)).sock
    assert second.getsockname() == first.getsockname()


def test_free_bind_allows_a_non_local_address(
    bound: Callable[..., BoundSocket], no_fd_leak: Any
) -> None:
    documentation_net = InetAddress(host="192.0.2.1", port="0", numeric=True)
    error = expect_bind_error(no_fd_leak, spec(documentation_net))
    assert "Cannot assign requested address" in error.message
    sock = bound(spec(documentation_net, free_bind=True)).sock
    assert sock.getsockname()[0] == "192.0.2.1"


# --- unix path ---------------------------------------------------------------


@pytest.mark.parametrize("kind", [k for k in SocketKind if k is not SocketKind.FIFO])  # sockets
def test_unix_path_each_kind(
    kind: SocketKind, tmp_path: Path, bound: Callable[..., BoundSocket]
) -> None:
    result = bound(spec(UnixAddress(path="web.sock"), kind=kind), base_dir=tmp_path)
    path = tmp_path / "web.sock"
    assert result.created_path == path
    assert result.sock.type == KINDS[kind]
    assert result.sock.getsockname() == str(path)
    listening = sockopt(result.sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert listening == (kind is not SocketKind.DATAGRAM)
    assert stat.S_ISSOCK(path.lstat().st_mode)
    assert result.sock.get_inheritable() is False
    assert is_blocking(result.fileno())


def test_unix_relative_path_parents_and_modes_ignore_umask(
    tmp_path: Path, bound: Callable[..., BoundSocket]
) -> None:
    old_umask = os.umask(0o077)
    try:
        socket_spec = spec(UnixAddress(path="run/deep/web.sock"), mode=0o660, directory_mode=0o751)
        result = bound(socket_spec, base_dir=tmp_path)
    finally:
        os.umask(old_umask)
    path = tmp_path / "run" / "deep" / "web.sock"
    assert result.created_path == path
    assert stat.S_IMODE(path.lstat().st_mode) == 0o660
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o751
    assert stat.S_IMODE((tmp_path / "run" / "deep").stat().st_mode) == 0o751
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))


def test_unix_default_mode_is_systemds_0666(
    tmp_path: Path, bound: Callable[..., BoundSocket]
) -> None:
    old_umask = os.umask(0o077)
    try:
        bound(spec(UnixAddress(path="web.sock")), base_dir=tmp_path)
    finally:
        os.umask(old_umask)
    assert DEFAULT_SOCKET_MODE == 0o666
    assert stat.S_IMODE((tmp_path / "web.sock").lstat().st_mode) == 0o666


def test_unix_absolute_path_ignores_base_dir(
    tmp_path: Path, bound: Callable[..., BoundSocket]
) -> None:
    path = tmp_path / "abs.sock"
    result = bound(spec(UnixAddress(path=str(path))), base_dir=tmp_path / "elsewhere")
    assert result.created_path == path
    assert not (tmp_path / "elsewhere").exists()


def test_existing_parent_directory_mode_is_left_alone(
    tmp_path: Path, bound: Callable[..., BoundSocket]
) -> None:
    os.chmod(tmp_path, 0o755)
    bound(spec(UnixAddress(path="web.sock"), directory_mode=0o700), base_dir=tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_stale_socket_file_is_replaced(tmp_path: Path, bound: Callable[..., BoundSocket]) -> None:
    path = tmp_path / "web.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(path))
    # A second link keeps the stale inode alive, so its number cannot be reused.
    os.link(path, tmp_path / "stale-link")
    result = bound(spec(UnixAddress(path="web.sock")), base_dir=tmp_path)
    assert path.lstat().st_ino != (tmp_path / "stale-link").lstat().st_ino
    assert result.created_inode == (path.lstat().st_dev, path.lstat().st_ino)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))


@pytest.mark.parametrize(
    ("live_kind", "spec_kind"),
    [
        (socket.SOCK_STREAM, SocketKind.STREAM),
        (socket.SOCK_DGRAM, SocketKind.DATAGRAM),
        (socket.SOCK_DGRAM, SocketKind.STREAM),  # another kind is alive too
    ],
)
def test_live_socket_file_is_refused(
    live_kind: int,
    spec_kind: SocketKind,
    tmp_path: Path,
    no_fd_leak: Any,
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    path = tmp_path / "web.sock"
    live = closing(socket.socket(socket.AF_UNIX, live_kind))
    live.bind(str(path))
    if live_kind == socket.SOCK_STREAM:
        live.listen(1)
    inode = path.lstat().st_ino
    error = expect_bind_error(
        no_fd_leak, spec(UnixAddress(path="web.sock"), kind=spec_kind), base_dir=tmp_path
    )
    assert f"{path} is in use by a listening socket" in error.message
    assert path.lstat().st_ino == inode


def test_regular_file_is_refused_and_untouched(tmp_path: Path, no_fd_leak: Any) -> None:
    path = tmp_path / "web.sock"
    path.write_text("precious")
    error = expect_bind_error(no_fd_leak, spec(UnixAddress(path="web.sock")), base_dir=tmp_path)
    assert "is a regular file, not a socket" in error.message
    assert path.read_text() == "precious"


def test_directory_is_refused_and_untouched(tmp_path: Path, no_fd_leak: Any) -> None:
    (tmp_path / "web.sock").mkdir()
    (tmp_path / "web.sock" / "inside").write_text("x")
    error = expect_bind_error(no_fd_leak, spec(UnixAddress(path="web.sock")), base_dir=tmp_path)
    assert "is a directory" in error.message
    assert (tmp_path / "web.sock" / "inside").read_text() == "x"


def test_symlink_is_refused_and_its_target_untouched(tmp_path: Path, no_fd_leak: Any) -> None:
    target = tmp_path / "target"
    target.write_text("precious")
    (tmp_path / "web.sock").symlink_to(target)
    error = expect_bind_error(no_fd_leak, spec(UnixAddress(path="web.sock")), base_dir=tmp_path)
    assert "is a symbolic link" in error.message
    assert (tmp_path / "web.sock").is_symlink()
    assert target.read_text() == "precious"


def test_symlink_to_a_stale_socket_is_not_followed(tmp_path: Path, no_fd_leak: Any) -> None:
    target = tmp_path / "real.sock"
    with socket.socket(socket.AF_UNIX) as old:
        old.bind(str(target))
    (tmp_path / "web.sock").symlink_to(target)
    expect_bind_error(no_fd_leak, spec(UnixAddress(path="web.sock")), base_dir=tmp_path)
    assert stat.S_ISSOCK(target.lstat().st_mode)
    assert (tmp_path / "web.sock").is_symlink()


def test_close_removes_the_file_it_created(tmp_path: Path) -> None:
    result = bind_socket(spec(UnixAddress(path="web.sock")), base_dir=tmp_path, inherited=NO_FDS)
    fd = result.fileno()
    result.close()
    assert not (tmp_path / "web.sock").exists()
    assert not is_open(fd)
    result.close()  # a second close does no harm


def test_close_keeps_a_file_replaced_since(tmp_path: Path) -> None:
    path = tmp_path / "web.sock"
    result = bind_socket(spec(UnixAddress(path="web.sock")), base_dir=tmp_path, inherited=NO_FDS)
    path.unlink()
    path.write_text("someone else's")
    result.close()
    assert path.read_text() == "someone else's"


def test_close_keeps_a_socket_file_rebound_since(tmp_path: Path) -> None:
    path = tmp_path / "web.sock"
    result = bind_socket(spec(UnixAddress(path="web.sock")), base_dir=tmp_path, inherited=NO_FDS)
    path.unlink()
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        result.close()
        assert stat.S_ISSOCK(path.lstat().st_mode)


@needs_root
def test_owner_by_name_and_by_number(tmp_path: Path, bound: Callable[..., BoundSocket]) -> None:
    bound(spec(UnixAddress(path="a.sock"), user="nobody", group="0"), base_dir=tmp_path)
    bound(spec(UnixAddress(path="b.sock"), user="65534", group="65534"), base_dir=tmp_path)
    nobody = pwd.getpwnam("nobody").pw_uid
    a, b = (tmp_path / "a.sock").lstat(), (tmp_path / "b.sock").lstat()
    assert (a.st_uid, a.st_gid) == (nobody, 0)
    assert (b.st_uid, b.st_gid) == (65534, 65534)


def test_unknown_user_creates_nothing(tmp_path: Path, no_fd_leak: Any) -> None:
    socket_spec = spec(UnixAddress(path="sub/web.sock"), user="no-such-user-xyz")
    error = expect_bind_error(no_fd_leak, socket_spec, base_dir=tmp_path)
    assert "unknown user 'no-such-user-xyz'" in error.message
    assert list(tmp_path.iterdir()) == []


def test_unknown_group_is_refused(tmp_path: Path, no_fd_leak: Any) -> None:
    socket_spec = spec(UnixAddress(path="web.sock"), group="no-such-group-xyz")
    error = expect_bind_error(no_fd_leak, socket_spec, base_dir=tmp_path)
    assert "unknown group 'no-such-group-xyz'" in error.message


def test_numeric_user_out_of_range(tmp_path: Path, no_fd_leak: Any) -> None:
    socket_spec = spec(UnixAddress(path="web.sock"), user=str(2**32))
    error = expect_bind_error(no_fd_leak, socket_spec, base_dir=tmp_path)
    assert "user id 4294967296 is out of range" in error.message


def test_failure_after_bind_removes_the_new_file(
    tmp_path: Path, no_fd_leak: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chmod", refuse)
    error = expect_bind_error(no_fd_leak, spec(UnixAddress(path="web.sock")), base_dir=tmp_path)
    assert error.message == (
        f"cannot set mode or owner of unix:{tmp_path}/web.sock: [Errno 1] Operation not permitted"
    )
    assert not os.path.lexists(tmp_path / "web.sock")


def test_huge_backlog_is_clamped_like_the_kernel_does(
    tmp_path: Path, bound: Callable[..., BoundSocket]
) -> None:
    sock = bound(spec(UnixAddress(path="web.sock"), backlog=2**40), base_dir=tmp_path).sock
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_path_too_long_fails_without_leak(tmp_path: Path, no_fd_leak: Any) -> None:
    error = expect_bind_error(no_fd_leak, spec(UnixAddress(path="x" * 200)), base_dir=tmp_path)
    assert error.message.startswith(f"cannot bind unix:{tmp_path}/xxx")


def test_parent_that_is_a_file_fails_without_leak(tmp_path: Path, no_fd_leak: Any) -> None:
    (tmp_path / "file").write_text("x")
    error = expect_bind_error(
        no_fd_leak, spec(UnixAddress(path="file/web.sock")), base_dir=tmp_path
    )
    assert "Not a directory" in error.message
    assert (tmp_path / "file").read_text() == "x"


# --- unix abstract -----------------------------------------------------------


def abstract_name(tmp_path: Path) -> str:
    return f"fdsupervisor-test-{os.getpid()}-{tmp_path.name}"


def test_abstract_tight(tmp_path: Path, bound: Callable[..., BoundSocket]) -> None:
    name = abstract_name(tmp_path)
    result = bound(spec(UnixAddress(path=name, abstract=True)))
    assert result.sock.getsockname() == b"\0" + name.encode()
    assert result.created_path is None
    assert describe_socket(result.fileno()).address == f"@{name}"
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(b"\0" + name.encode())


def test_abstract_not_tight_pads_to_sun_path(
    tmp_path: Path, bound: Callable[..., BoundSocket]
) -> None:
    name = abstract_name(tmp_path)
    result = bound(spec(UnixAddress(path=name, abstract=True, tight=False)))
    sockname = result.sock.getsockname()
    assert len(sockname) == 108
    assert sockname == (b"\0" + name.encode()).ljust(108, b"\0")
    assert describe_socket(result.fileno()).address == f"@{name}"


def test_abstract_name_in_use(
    tmp_path: Path, no_fd_leak: Any, closing: Callable[[socket.socket], socket.socket]
) -> None:
    name = abstract_name(tmp_path)
    closing(socket.socket(socket.AF_UNIX)).bind(b"\0" + name.encode())
    error = expect_bind_error(no_fd_leak, spec(UnixAddress(path=name, abstract=True)))
    assert error.message == f"cannot bind @{name}: [Errno 98] Address already in use"


def test_abstract_name_too_long(no_fd_leak: Any) -> None:
    error = expect_bind_error(no_fd_leak, spec(UnixAddress(path="a" * 108, abstract=True)))
    assert "longer than 107 bytes" in error.message


# --- vsock -------------------------------------------------------------------


@needs_vsock
def test_vsock_stream_listens(bound: Callable[..., BoundSocket]) -> None:
    any_cid, any_port = str(socket.VMADDR_CID_ANY), str(socket.VMADDR_PORT_ANY)
    result = bound(spec(VsockAddress(cid=any_cid, port=any_port)))
    cid, port = result.sock.getsockname()
    assert result.sock.family == socket.AF_VSOCK
    assert sockopt(result.sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    info = describe_socket(result.fileno())
    assert info == SocketInfo("vsock", "stream", listening=True, address=f"vsock:{cid}:{port}")


def test_vsock_bad_cid(no_fd_leak: Any) -> None:
    error = expect_bind_error(no_fd_leak, spec(VsockAddress(cid="4294967296", port="1")))
    assert error.message == "Failed to parse cid '4294967296'"


# --- fd: adopting inherited sockets -----------------------------------------


def fd_spec(number: int | str, kind: SocketKind = SocketKind.STREAM) -> SocketSpec:
    return spec(FdAddress(value=str(number)), kind=kind)


def test_adopts_an_inherited_listening_socket(
    bound: Callable[..., BoundSocket], closing: Callable[[socket.socket], socket.socket]
) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    fd = server.detach()
    os.set_inheritable(fd, True)
    inherited = InheritedFds(frozenset({fd}))
    result = bound(fd_spec(fd), inherited=inherited)
    assert (result.fileno(), result.adopted, result.created_path) == (fd, True, None)
    assert os.get_inheritable(fd) is False
    assert inherited.unclaimed() == []
    port = result.sock.getsockname()[1]
    closing(socket.create_connection(("127.0.0.1", port), timeout=5))
    result.sock.accept()[0].close()


def test_adopts_an_inherited_datagram_socket(bound: Callable[..., BoundSocket]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    fd = sock.detach()
    result = bound(fd_spec(fd, SocketKind.DATAGRAM), inherited=InheritedFds(frozenset({fd})))
    assert result.sock.type == socket.SOCK_DGRAM


def test_adopting_a_non_socket(no_fd_leak: Any) -> None:
    read_end, write_end = os.pipe()
    try:
        inherited = InheritedFds(frozenset({read_end}))
        error = expect_bind_error(no_fd_leak, fd_spec(read_end), inherited=inherited)
        assert error.message == f"File descriptor '{read_end}' is not a socket"
        assert inherited.unclaimed() == [read_end]
    finally:
        os.close(read_end)
        os.close(write_end)


def test_adopting_the_wrong_kind(
    no_fd_leak: Any, closing: Callable[[socket.socket], socket.socket]
) -> None:
    sock = closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    fd = sock.fileno()
    inherited = InheritedFds(frozenset({fd}))
    error = expect_bind_error(no_fd_leak, fd_spec(fd), inherited=inherited)
    assert error.message == (
        f"File descriptor '{fd}' is a datagram socket, but socket 'http' is declared as stream"
    )
    assert inherited.unclaimed() == [fd]


def test_adopting_a_seqpacket_declared_as_stream(
    no_fd_leak: Any, closing: Callable[[socket.socket], socket.socket]
) -> None:
    sock = closing(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    fd = sock.fileno()
    error = expect_bind_error(no_fd_leak, fd_spec(fd), inherited=InheritedFds(frozenset({fd})))
    assert error.message == (
        f"File descriptor '{fd}' is a seqpacket socket, but socket 'http' is declared as stream"
    )


@pytest.mark.parametrize("kind", [SocketKind.STREAM, SocketKind.SEQPACKET])
def test_adopting_a_socket_that_does_not_listen(
    kind: SocketKind, no_fd_leak: Any, closing: Callable[[socket.socket], socket.socket]
) -> None:
    sock = closing(socket.socket(socket.AF_UNIX, KINDS[kind]))
    sock.bind(b"")  # autobind: bound, but not listening
    fd = sock.fileno()
    error = expect_bind_error(
        no_fd_leak, fd_spec(fd, kind), inherited=InheritedFds(frozenset({fd}))
    )
    assert error.message == f"File descriptor '{fd}' is not listening"


def test_adopting_an_fd_that_was_not_inherited(
    no_fd_leak: Any, closing: Callable[[socket.socket], socket.socket]
) -> None:
    sock = closing(socket.create_server(("127.0.0.1", 0)))
    fd = sock.fileno()
    error = expect_bind_error(no_fd_leak, fd_spec(fd), inherited=NO_FDS)
    assert error.message.startswith(f"File descriptor '{fd}' was not inherited by the supervisor")


def test_a_named_fd_is_refused_at_startup(no_fd_leak: Any) -> None:
    error = expect_bind_error(no_fd_leak, fd_spec("vm0-mon"))
    assert "named file descriptors are only permitted in monitor commands" in error.message


def test_an_inherited_fd_backs_one_socket_only(
    no_fd_leak: Any, bound: Callable[..., BoundSocket]
) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    fd = server.detach()
    inherited = InheritedFds(frozenset({fd}))
    bound(fd_spec(fd), inherited=inherited)
    second = SocketSpec(name="other", address=FdAddress(value=str(fd)))
    error = expect_bind_error(no_fd_leak, second, inherited=inherited)
    assert error.message.startswith(f"File descriptor '{fd}' already backs socket 'http'")


def test_claim_twice_fails() -> None:
    inherited = InheritedFds(frozenset({1000}))
    assert inherited.claim(1000, "a") == 1000
    with pytest.raises(BindError, match="already backs socket 'a'"):
        inherited.claim(1000, "b")
    with pytest.raises(BindError, match="was not inherited"):
        inherited.claim(1001, "c")


def test_close_unclaimed_closes_only_unclaimed() -> None:
    keep_read, keep_write = os.pipe()
    drop_read, drop_write = os.pipe()
    inherited = InheritedFds(frozenset({keep_read, drop_read, drop_write}))
    inherited.claim(keep_read, "kept")
    try:
        assert inherited.unclaimed() == sorted([drop_read, drop_write])
        assert inherited.close_unclaimed() == sorted([drop_read, drop_write])
        assert not is_open(drop_read)
        assert not is_open(drop_write)
        assert is_open(keep_read)
        assert inherited.unclaimed() == []
        assert inherited.close_unclaimed() == []
        with pytest.raises(BindError, match="already closed as unused"):
            inherited.claim(drop_read, "late")
    finally:
        os.close(keep_read)
        os.close(keep_write)


def test_scan_sees_open_fds_but_not_its_own_listing_fd() -> None:
    read_end, write_end = os.pipe()
    try:
        before = open_fds()
        inherited = InheritedFds.scan()
        assert {read_end, write_end} <= inherited.numbers
        assert inherited.numbers == before - {0, 1, 2}
        assert open_fds() == before
    finally:
        os.close(read_end)
        os.close(write_end)


# --- adopt_socket: sockets from the monitor ----------------------------------


def monitor_spec(kind: SocketKind = SocketKind.STREAM) -> SocketSpec:
    return spec(FdAddress(value="vm0-mon"), kind=kind)


def test_adopt_socket_takes_a_listening_socket() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.set_inheritable(True)
    result = adopt_socket(sock, monitor_spec())
    try:
        assert (result.sock, result.adopted, result.name) == (sock, True, "http")
        assert sock.get_inheritable() is False
    finally:
        result.close()
    assert sock.fileno() == -1


def test_adopt_socket_errors_name_the_fd_and_leave_it_open(
    closing: Callable[[socket.socket], socket.socket],
) -> None:
    dgram = closing(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with pytest.raises(BindError) as caught:
        adopt_socket(dgram, monitor_spec())
    assert caught.value.message == (
        "File descriptor 'vm0-mon' is a datagram socket, but socket 'http' is declared as stream"
    )
    idle = closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with pytest.raises(BindError) as caught:
        adopt_socket(idle, monitor_spec())
    assert caught.value.message == "File descriptor 'vm0-mon' is not listening"
    with pytest.raises(BindError) as caught:
        adopt_socket(idle, monitor_spec(), fd_label="other-name")
    assert caught.value.message == "File descriptor 'other-name' is not listening"
    assert is_open(dgram.fileno())
    assert is_open(idle.fileno())


# --- describe_socket -----------------------------------------------------------


def test_describe_inet(closing: Callable[[socket.socket], socket.socket]) -> None:
    sock = closing(socket.create_server(("127.0.0.1", 0)))
    port = sock.getsockname()[1]
    info = describe_socket(sock.fileno())
    assert info == SocketInfo("inet", "stream", listening=True, address=f"127.0.0.1:{port}")


@needs_ipv6
def test_describe_inet6_datagram(closing: Callable[[socket.socket], socket.socket]) -> None:
    sock = closing(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM))
    sock.bind(("::1", 0))
    port = sock.getsockname()[1]
    info = describe_socket(sock.fileno())
    assert info == SocketInfo("inet6", "datagram", listening=False, address=f"[::1]:{port}")


def test_describe_unix_path_seqpacket(
    tmp_path: Path, closing: Callable[[socket.socket], socket.socket]
) -> None:
    sock = closing(socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    sock.bind(str(tmp_path / "s.sock"))
    sock.listen(1)
    info = describe_socket(sock.fileno())
    assert info == SocketInfo(
        "unix", "seqpacket", listening=True, address=f"unix:{tmp_path}/s.sock"
    )


def test_describe_unbound_unix_socket(closing: Callable[[socket.socket], socket.socket]) -> None:
    sock = closing(socket.socket(socket.AF_UNIX))
    assert describe_socket(sock.fileno()) == SocketInfo("unix", "stream", False, "")


def test_describe_non_socket_and_closed_fd(no_fd_leak: Any) -> None:
    read_end, write_end = os.pipe()
    try:
        with no_fd_leak():
            assert describe_socket(read_end) == SocketInfo("other", "other", False, "")
        assert is_open(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert describe_socket(read_end) == SocketInfo("other", "other", False, "")


def test_describe_does_not_take_the_fd(closing: Callable[[socket.socket], socket.socket]) -> None:
    sock = closing(socket.create_server(("127.0.0.1", 0)))
    for _ in range(3):
        describe_socket(sock.fileno())
    assert is_open(sock.fileno())
    assert sockopt(sock, socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_describe_other_family(closing: Callable[[socket.socket], socket.socket]) -> None:
    try:
        sock = closing(socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM))
    except OSError as error:
        pytest.skip(f"no netlink socket here: {error}")
    info = describe_socket(sock.fileno())
    assert (info.family, info.kind, info.address) == ("other", "datagram", "")


# --- backlog -------------------------------------------------------------------


@pytest.mark.parametrize("backlog", [1, 4])
def test_backlog_is_applied(
    backlog: int, tmp_path: Path, bound: Callable[..., BoundSocket]
) -> None:
    path = tmp_path / "web.sock"
    bound(spec(UnixAddress(path="web.sock"), backlog=backlog), base_dir=tmp_path)
    clients: list[socket.socket] = []
    try:
        for _ in range(backlog + 10):
            client = socket.socket(socket.AF_UNIX)
            clients.append(client)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                break
        else:
            pytest.fail("the queue never filled: backlog not applied")
        pending = len(clients) - 1
    finally:
        for client in clients:
            client.close()
    # Linux queues backlog + 1 connections on a unix listener.
    assert backlog <= pending <= backlog + 1
