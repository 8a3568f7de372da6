"""The one address matcher: plain specs, examples and properties (no sockets)."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fdsupervisor.addresses import (
    SUN_PATH_SIZE,
    FdAddress,
    InetAddress,
    SocketAddress,
    UnixAddress,
    VsockAddress,
)
from fdsupervisor.matching import (
    VMADDR_ANY,
    address_key,
    bound_unix_name,
    may_conflict,
    port_range,
    resolved_address,
    unix_name,
    vsock_matches,
)
from fdsupervisor.units import SocketKind, SocketSpec

HOSTS = st.sampled_from(
    [
        "",
        "127.0.0.1",
        "127.0.0.2",
        "0.0.0.0",
        "::",
        "::1",
        "0:0::1",
        "::ffff:127.0.0.1",
        "localhost",
    ]
)
PORTS = st.sampled_from(["0", "80", "8080", "8081", "http"])
PATHS = st.sampled_from(["/run/a.sock", "/run//a.sock", "/run/./a.sock", "/run/b.sock", "a.sock"])
NAMES = st.sampled_from(["web", "x" * (SUN_PATH_SIZE - 1), "other"])
NUMBERS = st.sampled_from(["3", "4", str(VMADDR_ANY)])


@st.composite
def inet(draw: st.DrawFn) -> InetAddress:
    port = draw(PORTS)
    to = draw(st.none() | st.integers(min_value=0, max_value=8090)) if port.isdigit() else None
    return InetAddress(
        draw(HOSTS), port, to=to, ipv4=draw(st.none() | st.booleans()), ipv6=draw(st.none())
    )


ADDRESSES: st.SearchStrategy[SocketAddress] = st.one_of(
    inet(),
    st.builds(UnixAddress, PATHS),
    st.builds(UnixAddress, NAMES, abstract=st.just(True), tight=st.booleans()),
    st.builds(VsockAddress, NUMBERS, NUMBERS),
    st.builds(FdAddress, st.sampled_from(["3", "4"])),
)
SPECS = st.builds(
    SocketSpec,
    name=st.just("s"),
    address=ADDRESSES,
    kind=st.sampled_from(SocketKind),
    reuse_port=st.booleans(),
)


@given(SPECS, SPECS)
def test_may_conflict_is_symmetric(a: SocketSpec, b: SocketSpec) -> None:
    assert may_conflict(a, b) == may_conflict(b, a)


@given(SPECS, SPECS)
def test_a_key_equal_pair_always_may_conflict(a: SocketSpec, b: SocketSpec) -> None:
    key = address_key(a)
    if key is not None and key == address_key(b):
        assert may_conflict(a, b)


@given(SPECS)
def test_a_keyed_spec_conflicts_with_itself(spec: SocketSpec) -> None:
    if address_key(spec) is not None:
        assert may_conflict(spec, spec)


@given(SPECS, SPECS)
def test_what_may_share_an_address_never_conflicts(a: SocketSpec, b: SocketSpec) -> None:
    if isinstance(a.address, InetAddress) and isinstance(b.address, InetAddress):
        if (a.kind is SocketKind.DATAGRAM) != (b.kind is SocketKind.DATAGRAM):
            assert not may_conflict(a, b)  # UDP beside TCP
        if a.reuse_port and b.reuse_port:
            assert not may_conflict(a, b)  # SO_REUSEPORT on both
        if a.address.port == "0" and a.address.to is None:
            assert not may_conflict(a, b) and address_key(a) is None
    if isinstance(a.address, FdAddress) or isinstance(b.address, FdAddress):
        assert may_conflict(a, b)  # an inherited fd's address is unknown
    if type(a.address) is not type(b.address) and FdAddress not in (
        type(a.address),
        type(b.address),
    ):
        assert not may_conflict(a, b)


@given(SPECS, st.sampled_from(["/units", "/units/", "/other/../units"]))
def test_keys_of_resolved_and_unresolved_specs_agree(spec: SocketSpec, base: str) -> None:
    resolved = SocketSpec(
        "s", resolved_address(spec.address, base), spec.kind, reuse_port=spec.reuse_port
    )
    assert address_key(spec, base) == address_key(resolved)
    assert address_key(spec, base) == address_key(spec, Path("/units"))


def test_unix_names_are_what_the_kernel_compares() -> None:
    assert unix_name(UnixAddress("/run//x/./a.sock")) == b"/run/x/a.sock"
    assert unix_name(UnixAddress("web", abstract=True)) == b"\0web"
    padded = unix_name(UnixAddress("web", abstract=True, tight=False))
    assert padded == b"\0web".ljust(SUN_PATH_SIZE, b"\0") and len(padded) == SUN_PATH_SIZE
    # a name that fills sun_path is the same address, tight or not
    full = "x" * (SUN_PATH_SIZE - 1)
    assert unix_name(UnixAddress(full, abstract=True)) == unix_name(
        UnixAddress(full, abstract=True, tight=False)
    )
    assert bound_unix_name(b"\0web") == b"\0web"
    assert bound_unix_name("/run/x/../a.sock") == unix_name(UnixAddress("/run/a.sock"))
    assert bound_unix_name("") == b""


def test_relative_unix_paths_resolve_against_the_unit_directory() -> None:
    assert resolved_address(UnixAddress("run/a.sock"), "/units") == UnixAddress("/units/run/a.sock")
    absolute = UnixAddress("/run/a.sock")
    assert resolved_address(absolute, "/units") is absolute
    abstract = UnixAddress("a", abstract=True)
    assert resolved_address(abstract, "/units") is abstract
    a = SocketSpec("a", UnixAddress("a.sock"))
    b = SocketSpec("b", UnixAddress("/units/a.sock"))
    assert address_key(a, "/units") == address_key(b, "/elsewhere")
    assert address_key(a, "/one") != address_key(a, "/two")


def test_port_ranges() -> None:
    assert port_range(InetAddress("", "8080")) == (8080, 8080)
    assert port_range(InetAddress("", "8080", to=8090)) == (8080, 8090)
    assert port_range(InetAddress("", "8080", to=10)) == (8080, 8080)
    assert port_range(InetAddress("", "http")) is None
    assert port_range(InetAddress("", "http", to=90), 80) == (80, 90)  # resolved


def test_vsock_wildcards() -> None:
    assert vsock_matches(VsockAddress("3", "1234"), 3, 1234)
    assert vsock_matches(VsockAddress(str(VMADDR_ANY), "1234"), 7, 1234)
    assert not vsock_matches(VsockAddress("3", "1234"), 4, 1234)
    assert not vsock_matches(VsockAddress("3", "1234"), 3, 1235)
    any_port = SocketSpec("a", VsockAddress("3", str(VMADDR_ANY)))
    assert address_key(any_port) is None and not may_conflict(any_port, any_port)


def test_inet_keys_normalise_ip_spellings_only() -> None:
    def key(host: str) -> object:
        return address_key(SocketSpec("s", InetAddress(host, "8080")))

    assert key("::1") == key("0:0::1")
    assert key("::ffff:127.0.0.1") == key("127.0.0.1")
    assert key("localhost") != key("127.0.0.1")  # a name is not resolved here
    datagram = address_key(SocketSpec("s", InetAddress("::1", "53"), SocketKind.DATAGRAM))
    assert datagram != address_key(SocketSpec("s", InetAddress("::1", "53")))
