"""Reload planning: the units running now and the units just loaded → what to change.

Part of the supervisor's reload (SIGHUP, the monitor's ``reload``), after
``units.load_units()`` has validated the whole new directory and before
anything is touched. :func:`plan_reload` is pure: it compares two lists of
:class:`~fdsupervisor.units.Unit` and never opens, closes or looks at an fd.
:class:`~fdsupervisor.reloader.Reloader` carries the resulting :class:`ReloadPlan` out.

What systemd does, and why we do more. ``systemctl daemon-reload`` re-reads
unit files but applies nothing to running units: a listening ``.socket``
keeps each fd whose address and type are unchanged (``socket_deserialize_item()``
in src/core/socket.c matches the serialized fds by ``socket_address_is()``),
keeps its old options on them, and binds nothing new ("Unit configuration
changed while unit was running, and some socket file descriptors have not
been opened yet. Unit not fully functional until restarted.", from
``socket_coldplug()``). Applying a changed socket takes ``systemctl restart
x.socket``, which closes every fd of the unit and binds them all again, and
which systemd refuses while the service runs ("Socket service x.service
already active, refusing."): the service is stopped first and connections
are refused until it is back. A changed ``.service`` applies at its next
restart. fdsupervisor does the re-read and the restarts in one step, socket
by socket, and keeps every fd it can.

The rules:

- A socket is identified by ``(unit name, socket name)`` (:data:`SocketKey`).
  It is **kept** when its :class:`~fdsupervisor.units.SocketSpec` is equal:
  address, kind, backlog, reuse-port, mode, user, group, directory-mode,
  keep-alive, no-delay, free-bind and the buffer sizes. ``location`` is
  metadata and never compared (``SocketSpec`` excludes it from ``==``). A
  relative unix path is resolved against its unit's ``base_dir`` first, as
  binding does.
- Only the **backlog** changed: **relisten**. Linux takes ``listen()`` again
  on a listening socket and only adjusts the backlog (``__inet_listen_sk()``,
  net/ipv4/af_inet.c: "if the socket is already in listen state we can only
  allow the backlog to be adjusted"; ``unix_listen()`` and ``vsock_listen()``
  likewise), so the fd stays and no connection is refused. Datagram sockets
  and inherited fds are never ``listen()``-ed by fdsupervisor, so a backlog
  change there changes nothing and the socket is kept.
- A socket whose bound identity (everything above but the backlog) now
  belongs to another key (another unit, another socket name, or both: a
  unit renamed, a socket renamed, two sockets swapped) is **moved**: the same
  fd gets a new owner in the store. Closing it and binding again would fail
  with EADDRINUSE while the old one is open, or refuse connections in
  between. A move whose backlog changed is also relistened
  (``relisten_moved``). Moves are found before rebinds, so that a socket
  that took over another's address takes over its fd too; among several
  candidates the same socket name wins, then the same unit, then the first.
- Anything else that changed, under the same key: **rebind** (bind a new
  socket, close the old one). A key only in the new units: **bind**; only in
  the old ones: **close**.
- Binding first and closing afterwards leaves no moment without a socket,
  but fails where the new socket's address conflicts with an old one still
  open (the same unix path or abstract name, the same vsock port, an inet
  port that overlaps on overlapping hosts; :func:`~fdsupervisor.matching.may_conflict`
  says which): such old sockets are in
  ``close_first`` and the new ones that must wait for them in
  ``bind_after_close``. That gap (connections refused) is the one the plan
  cannot avoid. The check is conservative: host names, service names and
  wildcards count as overlapping, and the address of an inherited fd is
  unknown to a pure planner, so an inherited fd being closed conflicts with
  every socket being bound (under systemd this buys nothing, as PID 1 keeps
  its own copy of a ``.socket``'s fd, but a parent that exec'd us, as
  ``systemd-socket-activate`` does, leaves ours the only one). Two inet
  sockets that both set reuse-port do not conflict (socket(7),
  SO_REUSEPORT), nor does an inet port 0.
- A socket **added at run time** (the monitor's ``socket-add`` with a
  ``unit``) belongs to no unit file, and a reload leaves it alone, unless
  the new unit file now declares a socket of that unit under its name: then
  it counts as that key's old socket. Bound the same way (address, kind and
  options; only the backlog may differ), it is **adopted**: the same fd,
  now the unit's own (``adopt_sockets``, also in ``keep_sockets`` or
  ``relisten_sockets``), as systemd keeps an fd whose address matches
  (``socket_address_is()``). Otherwise it is **rebound** as a changed socket
  would be: the declared socket is bound and the runtime one closed. Such a
  key takes part in no move, either way: the runtime fd holds it in the
  store until it is closed. A runtime socket that no unit file declares stays.
- **Inherited fds** (``{type: fd, str: "3"}``) are adopted at start-up only;
  those no unit used were closed then (SPEC section 2). An fd socket that is
  unchanged is kept, one that moves is moved; one that would have to be
  bound (a new fd number that no old socket held) or rebound (its kind or
  options changed: an inherited fd cannot be bound again) is a **problem**.
  Problems are returned in ``ReloadPlan.problems`` rather than raised, so
  that a caller can report them all with the rest of the plan (a dry run,
  the monitor's answer); a plan with problems must not be applied at all,
  as a unit directory with one bad unit changes nothing (SPEC section 3).
- A unit is **unchanged** when its ``ServiceSpec`` is equal (the order of
  ``environment`` entries does not matter) and its sockets have the same
  names in the same order, each kept or relistened: its workers run on
  untouched. A unit whose service changed or whose fd layout changed (a
  socket added, removed, reordered, renamed, rebound or moved) is
  **restarted**, because a worker learns its fds only when it starts
  (``LISTEN_FDS``). A unit only in the new units is **started** (as its
  activation says), one only in the old ones is **stopped**. A renamed unit
  is one stopped and one started; its sockets move.
- A restarted unit whose fd layout is unchanged (only its service changed)
  and whose old and new service both have ``overlap: true`` and no
  ``accept`` is **rolled** (``roll_units``, a part of ``restart_units``):
  its workers are replaced one at a time (rolling.py, SPEC 8) instead of
  stopped first, if it is running when the plan is carried out; otherwise,
  and for the other restarted units, stop-then-start. A new layout cannot
  roll: the new sockets may have to wait for the old ones to close
  (``close_first``), and every socket of a unit reaches its workers together.

Carrying a plan out (the supervisor's job). A socket is unbound only when
its last fd is closed, and every running worker holds copies of its unit's
sockets, so:

1. If ``problems``: change nothing.
2. Bind every new socket (``bind_sockets`` and the new side of
   ``rebind_sockets``) that is not in ``bind_after_close``. A failure here
   closes what was just bound, and nothing has changed.
3. Relisten; move (the fd is re-owned, never closed).
4. Start rolling ``roll_units`` (with the new definition, on the kept fds); stop
   the workers of ``stop_units`` and the other ``restart_units``. Once the
   workers holding a ``close_first`` socket have exited, close it and bind
   the ``bind_after_close`` sockets.
5. Close the other old sockets (``close_sockets``, the old side of
   ``rebind_sockets``); start ``start_units`` and ``restart_units`` with the
   new fd layout.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

from .addresses import FdAddress
from .errors import ConfigError, Location
from .matching import may_conflict, resolved_address
from .units import ServiceSpec, SocketKind, SocketSpec, Unit

SocketKey = tuple[str, str]
"""A socket's identity across a reload: ``(unit name, socket name)``."""

SocketMove = tuple[SocketKey, SocketKey]
"""``(old key, new key)`` of a socket whose fd changes owner."""


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload changes; every socket and unit of both sides is in exactly one group.

    Each old socket is in one of ``keep_sockets``, ``relisten_sockets``,
    ``rebind_sockets``, ``close_sockets`` or is the source of a
    ``move_sockets`` entry; each new socket in one of ``keep_sockets``,
    ``relisten_sockets``, ``rebind_sockets``, ``bind_sockets`` or is the
    target of a move. Each old unit is unchanged, restarted or stopped; each
    new unit unchanged, restarted or started. Sockets are listed in unit
    and declaration order (the new units' order, the old ones' for what is
    closed), units in the order given.
    """

    keep_sockets: tuple[SocketKey, ...] = ()
    """The fd stays as it is."""
    relisten_sockets: tuple[SocketKey, ...] = ()
    """Only the backlog changed: ``listen()`` again on the same fd."""
    move_sockets: tuple[SocketMove, ...] = ()
    """(old key, new key): the same fd, re-owned under its new unit and name."""
    relisten_moved: tuple[SocketKey, ...] = ()
    """New keys of moves whose backlog also changed: ``listen()`` again after the move."""
    rebind_sockets: tuple[SocketKey, ...] = ()
    """Changed address, kind or options: bind a new socket, close the old one."""
    close_sockets: tuple[SocketKey, ...] = ()
    """Gone from the new units."""
    bind_sockets: tuple[SocketKey, ...] = ()
    """New keys (in a kept or a new unit) that no old fd serves."""
    close_first: tuple[SocketKey, ...] = ()
    """Old keys (rebound or closed) whose address a new socket needs: close before binding."""
    bind_after_close: tuple[SocketKey, ...] = ()
    """New keys (rebound or bound) that can be bound only after ``close_first`` is closed."""
    start_units: tuple[str, ...] = ()
    """New units: start them as their activation says."""
    stop_units: tuple[str, ...] = ()
    """Removed units: stop their workers, then close their sockets (those not moved)."""
    restart_units: tuple[str, ...] = ()
    """Units whose service or fd layout changed: their workers must get the new layout."""
    unchanged_units: tuple[str, ...] = ()
    """Workers keep running untouched."""
    roll_units: tuple[str, ...] = ()
    """Of ``restart_units``: only the service changed, both sides overlap, no accept mode:
    workers replaced one at a time, if the service runs."""
    adopt_sockets: tuple[SocketKey, ...] = ()
    """Sockets added at run time that the unit file now declares, bound the same way:
    each is also in ``keep_sockets`` or ``relisten_sockets``; its spec becomes the declared one."""
    problems: tuple[str, ...] = ()
    """Why this plan cannot be applied (FILE:LINE:COL: key.path: message); empty if it can."""

    @property
    def nothing_to_do(self) -> bool:
        """True when every unit is unchanged and every socket kept as it is."""
        return not (
            self.relisten_sockets
            or self.move_sockets
            or self.rebind_sockets
            or self.close_sockets
            or self.bind_sockets
            or self.start_units
            or self.stop_units
            or self.restart_units
            or self.problems
        )

    def summary(self) -> str:
        """One line for the log and the monitor, e.g. ``2 units unchanged, 1 restarted, ...``."""
        unchanged = len(self.unchanged_units)
        text = (
            f"{unchanged} unit{'' if unchanged == 1 else 's'} unchanged, "
            f"{len(self.restart_units)} restarted, {len(self.start_units)} added, "
            f"{len(self.stop_units)} removed; sockets: {len(self.keep_sockets)} kept, "
            f"{len(self.relisten_sockets)} relistened, {len(self.move_sockets)} moved, "
            f"{len(self.rebind_sockets)} rebound, {len(self.bind_sockets)} bound, "
            f"{len(self.close_sockets)} closed, {len(self.close_first)} close-first"
        )
        if self.adopt_sockets:
            text += f", {len(self.adopt_sockets)} adopted"
        if self.problems:
            count = len(self.problems)
            text += f"; {count} problem{'' if count == 1 else 's'}"
        return text


# --------------------------------------------------------------------------- sockets


@dataclass(frozen=True, slots=True)
class _Placed:
    """A socket of one side of the reload, with its key and its unit."""

    key: SocketKey
    spec: SocketSpec  # a relative unix path resolved against the unit's base_dir
    unit: Unit


@dataclass(slots=True)
class _SocketMatch:
    """The socket groups of a :class:`ReloadPlan`, while they are being worked out."""

    keep: list[SocketKey] = field(default_factory=list)
    relisten: list[SocketKey] = field(default_factory=list)
    moves: list[SocketMove] = field(default_factory=list)
    relisten_moved: list[SocketKey] = field(default_factory=list)
    rebind: list[SocketKey] = field(default_factory=list)
    close: list[SocketKey] = field(default_factory=list)
    bind: list[SocketKey] = field(default_factory=list)


def _resolved(spec: SocketSpec, base_dir: os.PathLike[str]) -> SocketSpec:
    """``spec`` with a relative unix path made absolute, as binding makes it."""
    address = resolved_address(spec.address, base_dir)
    return spec if address is spec.address else replace(spec, address=address)


def _sockets(units: Iterable[Unit]) -> dict[SocketKey, _Placed]:
    """Every socket of ``units`` by key, in unit and declaration order."""
    placed: dict[SocketKey, _Placed] = {}
    for unit in units:
        for spec in unit.sockets:
            key = (unit.name, spec.name)
            placed[key] = _Placed(key, _resolved(spec, unit.base_dir), unit)
    return placed


def _listens(spec: SocketSpec) -> bool:
    """Whether fdsupervisor calls ``listen()`` on it (and so whether its backlog matters)."""
    return spec.kind in (SocketKind.STREAM, SocketKind.SEQPACKET) and not isinstance(
        spec.address, FdAddress
    )


def _bound_identity(spec: SocketSpec) -> SocketSpec:
    """What the bound socket is, apart from its name and its backlog."""
    return replace(spec, name="", backlog=0)


def _needs_relisten(old: SocketSpec, new: SocketSpec) -> bool:
    return _listens(new) and old.backlog != new.backlog


def _match_sockets(
    old: Mapping[SocketKey, _Placed],
    new: Mapping[SocketKey, _Placed],
    added: Collection[SocketKey] = (),
) -> _SocketMatch:
    """Keep, relisten, move, rebind, close or bind: each old and new socket exactly once.

    ``added`` are keys of sockets added at run time: matched by key only, never moved
    (a move onto such a key would meet the runtime socket's fd still in the store).
    """
    match = _SocketMatch()
    for key, placed in new.items():
        previous = old.get(key)
        if previous is None:
            continue
        # A unit file that did not change is the very same unit (units.load_units'
        # ``known``): the identity test first, the field by field one only after.
        same = previous.spec is placed.spec
        if not same and _bound_identity(previous.spec) != _bound_identity(placed.spec):
            continue
        if _needs_relisten(previous.spec, placed.spec):
            match.relisten.append(key)
        else:
            match.keep.append(key)
    matched = {*match.keep, *match.relisten}
    _match_moves(
        match,
        old,
        new,
        [k for k in old if k not in matched and k not in added],
        [k for k in new if k not in matched and k not in added],
    )
    matched_old = matched | {source for source, _ in match.moves}
    matched_new = matched | {target for _, target in match.moves}
    old_left = [k for k in old if k not in matched_old]
    new_left = [k for k in new if k not in matched_new]
    rebound = set(old_left).intersection(new_left)
    match.rebind = [k for k in new_left if k in rebound]
    match.bind = [k for k in new_left if k not in rebound]
    match.close = [k for k in old_left if k not in rebound]
    return match


def _match_moves(
    match: _SocketMatch,
    old: Mapping[SocketKey, _Placed],
    new: Mapping[SocketKey, _Placed],
    old_left: Sequence[SocketKey],
    new_left: Sequence[SocketKey],
) -> None:
    """Pair each unmatched new socket with an unmatched old one bound the same way."""
    candidates: dict[SocketSpec, list[SocketKey]] = {}
    for key in old_left:
        candidates.setdefault(_bound_identity(old[key].spec), []).append(key)
    for target in new_left:
        sources = candidates.get(_bound_identity(new[target].spec))
        if not sources:
            continue
        source = min(sources, key=lambda key: _move_preference(key, target))
        sources.remove(source)
        match.moves.append((source, target))
        if _needs_relisten(old[source].spec, new[target].spec):
            match.relisten_moved.append(target)


def _move_preference(source: SocketKey, target: SocketKey) -> tuple[bool, bool]:
    """Smaller is better: the same socket name first (a unit renamed), then the same unit."""
    return (source[1] != target[1], source[0] != target[0])


# --------------------------------------------------------------------------- conflicts


def _close_first(
    match: _SocketMatch, old: Mapping[SocketKey, _Placed], new: Mapping[SocketKey, _Placed]
) -> tuple[list[SocketKey], list[SocketKey]]:
    """The old sockets to close before binding, and the new ones that wait for them."""
    closed, bound = {*match.rebind, *match.close}, {*match.rebind, *match.bind}
    closing = [placed for key, placed in old.items() if key in closed]
    # An fd address is never bound (it is a problem instead): it needs no address.
    binding = [
        placed
        for key, placed in new.items()
        if key in bound and not isinstance(placed.spec.address, FdAddress)
    ]
    close_first = [o.key for o in closing if any(may_conflict(o.spec, n.spec) for n in binding)]
    bind_after = [n.key for n in binding if any(may_conflict(o.spec, n.spec) for o in closing)]
    return close_first, bind_after


# --------------------------------------------------------------------------- problems


def _problems(
    match: _SocketMatch, old: Mapping[SocketKey, _Placed], new: Mapping[SocketKey, _Placed]
) -> list[str]:
    """An inherited fd that would have to be adopted or bound anew: one problem each."""
    rebound, bound = set(match.rebind), set(match.bind)
    problems = []
    for key, placed in new.items():
        if not isinstance(placed.spec.address, FdAddress):
            continue
        if key in rebound:
            problems.append(_fd_problem(placed, old[key].spec))
        elif key in bound:
            problems.append(_fd_problem(placed, None))
    return problems


def _fd_problem(placed: _Placed, previous: SocketSpec | None) -> str:
    spec = placed.spec
    address = spec.address
    assert isinstance(address, FdAddress)
    path: tuple[str, ...] = ("sockets", spec.name, "listen")
    if previous is not None and previous.address == address:
        path = ("sockets", spec.name)
        message = (
            f"fd {address.value} is inherited and cannot be bound again, so its "
            f"{', '.join(_changed_options(previous, spec))} cannot change at a reload; "
            "undo the change, or restart fdsupervisor to apply it"
        )
    else:
        hint = "restart fdsupervisor to adopt it"
        if previous is not None and isinstance(previous.address, FdAddress):
            hint = f"keep fd {previous.address.value}, or {hint}"
        message = (
            f"fd {address.value} cannot be adopted at a reload: inherited fds are adopted "
            f"at start-up only, and those no unit used were closed then; {hint}"
        )
    location = spec.location or Location(str(placed.unit.source))
    return str(ConfigError(location, path, message))


def _changed_options(old: SocketSpec, new: SocketSpec) -> list[str]:
    """The unit-file keys whose values differ, bound identity only (``keep-alive``)."""
    before, after = _bound_identity(old), _bound_identity(new)
    return [
        f.name.replace("_", "-")
        for f in fields(SocketSpec)
        if f.compare and getattr(before, f.name) != getattr(after, f.name)
    ]


# --------------------------------------------------------------------------- units


def _by_name(units: Iterable[Unit], side: str) -> dict[str, Unit]:
    named: dict[str, Unit] = {}
    for unit in units:
        if unit.name in named:
            raise ValueError(f"two {side} units are named {unit.name!r}")
        named[unit.name] = unit
    return named


def _service_identity(service: ServiceSpec) -> ServiceSpec:
    # The environment is a mapping in the unit file: its order means nothing.
    return replace(service, environment=tuple(sorted(dict(service.environment).items())))


def _layout_unchanged(old: Unit, new: Unit, kept: Collection[SocketKey]) -> bool:
    return old.socket_names == new.socket_names and all(
        (new.name, name) in kept for name in new.socket_names
    )


def _unit_unchanged(old: Unit, new: Unit, kept: Collection[SocketKey]) -> bool:
    same = old.service is new.service  # an unchanged file's unit (units.load_units)
    return (
        same or _service_identity(old.service) == _service_identity(new.service)
    ) and _layout_unchanged(old, new, kept)


def _rolls(old: Unit, new: Unit, kept: Collection[SocketKey]) -> bool:
    """A restarted unit whose workers can be replaced one at a time (module docstring)."""
    services = (old.service, new.service)
    return _layout_unchanged(old, new, kept) and all(s.overlap and not s.accept for s in services)


@dataclass(frozen=True, slots=True)
class _UnitGroups:
    start: tuple[str, ...]
    stop: tuple[str, ...]
    restart: tuple[str, ...]
    unchanged: tuple[str, ...]
    roll: tuple[str, ...]


def _group_units(
    old: Mapping[str, Unit], new: Mapping[str, Unit], kept: Collection[SocketKey]
) -> _UnitGroups:
    start, restart, unchanged, roll = [], [], [], []
    for name, unit in new.items():
        previous = old.get(name)
        if previous is None:
            start.append(name)
        elif _unit_unchanged(previous, unit, kept):
            unchanged.append(name)
        else:
            restart.append(name)
            if _rolls(previous, unit, kept):
                roll.append(name)
    stop = [name for name in old if name not in new]
    return _UnitGroups(tuple(start), tuple(stop), tuple(restart), tuple(unchanged), tuple(roll))


# --------------------------------------------------------------------------- public


def _added_sockets(
    old_units: Mapping[str, Unit],
    new_sockets: Mapping[SocketKey, _Placed],
    added: Mapping[SocketKey, SocketSpec],
) -> dict[SocketKey, _Placed]:
    """The sockets added at run time that a new unit declares under their key, placed."""
    placed = {}
    for key, spec in added.items():
        unit = old_units.get(key[0])
        if unit is None or key not in new_sockets or key[1] in unit.socket_names:
            continue
        placed[key] = _Placed(key, _resolved(replace(spec, name=key[1]), unit.base_dir), unit)
    return placed


def plan_reload(
    old: Sequence[Unit],
    new: Sequence[Unit],
    added: Mapping[SocketKey, SocketSpec] | None = None,
) -> ReloadPlan:
    """What to change to go from the running ``old`` units to the loaded ``new`` ones.

    Pure: nothing is opened, closed or looked at. ``new`` must be a
    validated set (``units.load_units()``); a unit name given twice on one
    side raises :class:`ValueError`. ``added`` are the sockets added at run
    time to the old units (``socket-add``), by key, as they were bound; a
    relative unix path resolves against its unit's ``base_dir``. An
    inherited fd that would have to be adopted anew is reported in
    ``problems`` (see the module docstring), and a plan with problems must
    not be applied.
    """
    old_units, new_units = _by_name(old, "old"), _by_name(new, "new")
    old_sockets, new_sockets = _sockets(old), _sockets(new)
    declared_added = _added_sockets(old_units, new_sockets, added or {})
    old_sockets = {**old_sockets, **declared_added}
    match = _match_sockets(old_sockets, new_sockets, declared_added)
    close_first, bind_after_close = _close_first(match, old_sockets, new_sockets)
    kept = {*match.keep, *match.relisten}
    units = _group_units(old_units, new_units, kept)
    return ReloadPlan(
        keep_sockets=tuple(match.keep),
        relisten_sockets=tuple(match.relisten),
        move_sockets=tuple(match.moves),
        relisten_moved=tuple(match.relisten_moved),
        rebind_sockets=tuple(match.rebind),
        close_sockets=tuple(match.close),
        bind_sockets=tuple(match.bind),
        close_first=tuple(close_first),
        bind_after_close=tuple(bind_after_close),
        start_units=units.start,
        stop_units=units.stop,
        restart_units=units.restart,
        unchanged_units=units.unchanged,
        roll_units=units.roll,
        adopt_sockets=tuple(k for k in new_sockets if k in declared_added and k in kept),
        problems=tuple(_problems(match, old_sockets, new_sockets)),
    )
