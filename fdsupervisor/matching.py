"""Address matching: when two socket specs name the same address, or may collide.

Between the validated model (``units.py``) and the bound sockets, three
places ask questions of socket addresses, and their answers must agree:

- ``units.py`` at load: do two sockets certainly want one address (a
  duplicate, refused before anything is bound)? :func:`address_key`.
- ``reload.py`` while planning: may binding one fail with ``EADDRINUSE``
  while the other is open (so close first)? :func:`may_conflict`.
- ``systemd.py`` at start-up: does a socket systemd's fd store kept still
  fit its spec? The spec side of that comparison: :func:`unix_name`,
  :func:`port_range`, :func:`vsock_matches`.

The facts, each stated once here: a unix socket's name is the bytes of
``sun_path`` the kernel compares (a normalised path, or an abstract name
that QEMU pads to the whole ``sun_path`` unless ``tight``); an inet port is
a number, a range (QEMU's ``to``), a service name (number unknown here) or
0 (the kernel picks a free one, so it never collides); hosts overlap when
equal or when either is a wildcard or a name; datagram sockets have a port
space of their own (UDP beside TCP); two sockets that both set
``SO_REUSEPORT`` may share an address (socket(7)); vsock's
``VMADDR_CID_ANY`` / ``VMADDR_PORT_ANY`` are wildcards. The address of an
inherited fd is unknown to a pure function, so it may collide with
anything, and two specs naming one inherited fd are duplicates (one fd
backs one socket, SPEC 2).

Pure: nothing here opens an fd or resolves a name. Relative unix paths are
resolved against the unit's directory as binding resolves them
(:func:`resolved_address`); ``address_key`` takes that directory,
``may_conflict`` wants specs already resolved.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from typing import Final, Protocol, TypeAlias, TypeVar, overload

from .addresses import (
    SUN_PATH_SIZE,
    FdAddress,
    FifoAddress,
    InetAddress,
    SocketAddress,
    UnixAddress,
    VsockAddress,
)

# <linux/vm_sockets.h>: VMADDR_CID_ANY and VMADDR_PORT_ANY are both -1U.
VMADDR_ANY: Final = 0xFFFFFFFF

# units.SocketKind.DATAGRAM's value (a StrEnum); units imports this module.
_DATAGRAM: Final = "datagram"

AddressKey: TypeAlias = tuple[object, ...]
"""What two sockets that certainly collide have in common (:func:`address_key`)."""

StrPath: TypeAlias = str | os.PathLike[str]
_Address = TypeVar("_Address", bound=SocketAddress)


class Bindable(Protocol):
    """What matching reads of a socket spec; :class:`~fdsupervisor.units.SocketSpec` is one."""

    @property
    def address(self) -> SocketAddress: ...

    @property
    def kind(self) -> str: ...

    @property
    def reuse_port(self) -> bool: ...


# --------------------------------------------------------------------------- unix


def resolved_address(address: _Address, base_dir: StrPath) -> _Address:
    """``address`` with a relative unix path made absolute against ``base_dir``, as bound."""
    if isinstance(address, FifoAddress) and not os.path.isabs(address.path):
        return replace(address, path=os.path.join(os.path.abspath(base_dir), address.path))
    if not isinstance(address, UnixAddress) or address.abstract or os.path.isabs(address.path):
        return address
    return replace(address, path=os.path.join(os.path.abspath(base_dir), address.path))


def unix_name(address: UnixAddress) -> bytes:
    """The bytes of ``sun_path`` that the kernel compares, for a spec's address.

    An abstract name is a NUL and the name; without ``tight`` QEMU passes
    the whole ``sun_path`` (the name padded with NULs), another address. A
    path is normalised (``a//b``, ``a/./b``); a relative one stays relative
    (resolve it first).
    """
    if address.abstract:
        name = b"\0" + os.fsencode(address.path)
        return name if address.tight else name.ljust(SUN_PATH_SIZE, b"\0")
    return os.fsencode(os.path.normpath(address.path))


def _path_name(address: UnixAddress | FifoAddress) -> bytes:
    if isinstance(address, FifoAddress):
        return os.fsencode(os.path.normpath(address.path))
    return unix_name(address)


def bound_unix_name(local: str | bytes) -> bytes:
    """A bound unix socket's ``getsockname()`` in :func:`unix_name`'s form.

    Python returns an abstract name as bytes (with its leading NUL) and a
    path as a string, exactly as it was bound.
    """
    if isinstance(local, bytes):
        return local
    return os.fsencode(os.path.normpath(local)) if local else b""


# --------------------------------------------------------------------------- inet


def is_ephemeral(address: InetAddress) -> bool:
    """Port 0 and no range: the kernel picks a free port, which collides with nothing."""
    return address.port == "0" and address.to is None


@overload
def port_range(address: InetAddress, first: int) -> tuple[int, int]: ...


@overload
def port_range(address: InetAddress, first: None = None) -> tuple[int, int] | None: ...


def port_range(address: InetAddress, first: int | None = None) -> tuple[int, int] | None:
    """First and last port it may bind (QEMU's ``to``: the first free one up to it).

    ``first`` is the first port where it is known (a service name resolved);
    otherwise a service name gives None: its number is not known here.
    """
    if first is None:
        if not (address.port.isascii() and address.port.isdigit()):
            return None
        first = int(address.port)
    return first, max(first, address.to if address.to is not None else first)


def _ports_overlap(a: InetAddress, b: InetAddress) -> bool:
    if is_ephemeral(a) or is_ephemeral(b):
        return False
    a_range, b_range = port_range(a), port_range(b)
    if a_range is None or b_range is None:
        return True  # a service name may be any port
    return a_range[0] <= b_range[1] and b_range[0] <= a_range[1]


_IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: str) -> _IPAddress | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _hosts_overlap(a: str, b: str) -> bool:
    if a == b:
        return True
    a_ip, b_ip = _ip(a), _ip(b)
    if a_ip is None or b_ip is None:
        return True  # a name (or "": every address) may stand for any address
    if a_ip.is_unspecified or b_ip.is_unspecified:
        return True
    return a_ip == b_ip


def _same_port_space(a: Bindable, b: Bindable) -> bool:
    """UDP has a port space of its own beside TCP's (stream and seqpacket)."""
    return (a.kind == _DATAGRAM) == (b.kind == _DATAGRAM)


def _inet_conflict(a: Bindable, b: Bindable) -> bool:
    if not _same_port_space(a, b):
        return False
    if a.reuse_port and b.reuse_port:
        return False  # socket(7), SO_REUSEPORT: both set it, both may bind
    a_address, b_address = a.address, b.address
    assert isinstance(a_address, InetAddress) and isinstance(b_address, InetAddress)
    return _ports_overlap(a_address, b_address) and _hosts_overlap(a_address.host, b_address.host)


# --------------------------------------------------------------------------- vsock


def vsock_matches(address: VsockAddress, cid: int, port: int) -> bool:
    """Whether a vsock socket bound to ``cid:port`` is one ``address`` would bind."""
    wanted = int(address.cid)
    return port == int(address.port) and (wanted == VMADDR_ANY or cid == wanted)


def _vsock_conflict(a: VsockAddress, b: VsockAddress) -> bool:
    # The kinds are not told apart: vsock datagrams are a transport's own
    # business, so the answer stays conservative.
    a_port, b_port = int(a.port), int(b.port)
    if a_port != b_port or a_port == VMADDR_ANY:
        return False  # VMADDR_PORT_ANY: the kernel picks a free port
    a_cid, b_cid = int(a.cid), int(b.cid)
    return a_cid == b_cid or VMADDR_ANY in (a_cid, b_cid)


# --------------------------------------------------------------------------- the questions


def address_key(spec: Bindable, base_dir: StrPath | None = None) -> AddressKey | None:
    """What two sockets that certainly cannot both be bound share; None where sharing may be fine.

    Equal keys always :func:`may_conflict`. None for an inet port 0, a port
    range, a service name, ``reuse-port`` and vsock's ``VMADDR_PORT_ANY``:
    each may share an address legitimately. ``base_dir``: where a relative
    unix path is (None: resolved already).
    """
    address = spec.address if base_dir is None else resolved_address(spec.address, base_dir)
    datagram = spec.kind == _DATAGRAM
    match address:
        case UnixAddress():
            return ("unix", unix_name(address))
        case FdAddress():
            return ("fd", address.value)
        case FifoAddress():  # a file at the path, as a unix socket's: the two collide
            return ("unix", os.fsencode(os.path.normpath(address.path)))
        case VsockAddress():
            port = int(address.port)
            return None if port == VMADDR_ANY else ("vsock", int(address.cid), port, datagram)
        case InetAddress():
            if spec.reuse_port or address.to is not None or is_ephemeral(address):
                return None
            ports = port_range(address)
            if ports is None:
                return None
            ip = _ip(address.host)
            host = address.host if ip is None else str(ip)
            return ("inet", host, ports[0], address.ipv4, address.ipv6, datagram)
    return None  # pragma: no cover - the match is exhaustive


def may_conflict(a: Bindable, b: Bindable) -> bool:
    """Whether binding one may fail (``EADDRINUSE``) while the other is open. Symmetric.

    Conservative: host names, service names and wildcards count as
    overlapping, an inherited fd (its address unknown) as colliding with
    everything. Specs with relative unix paths must be resolved first.
    """
    x, y = a.address, b.address
    if isinstance(x, FdAddress) or isinstance(y, FdAddress):
        return True
    if isinstance(x, UnixAddress | FifoAddress) and isinstance(y, UnixAddress | FifoAddress):
        return _path_name(x) == _path_name(y)
    if isinstance(x, InetAddress) and isinstance(y, InetAddress):
        return _inet_conflict(a, b)
    if isinstance(x, VsockAddress) and isinstance(y, VsockAddress):
        return _vsock_conflict(x, y)
    return False
