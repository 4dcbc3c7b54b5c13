"""The status model: one typed snapshot of the cluster, built in one place, rendered by every face.

Why one builder: `marsadm view`, mars-status, the Prometheus and Zabbix exporters and the Nagios
check must never disagree about a node. They all call :func:`build` (or read its JSON from the
control socket, :meth:`Snapshot.from_json`) and render; none of them reads the tree or computes a
verdict of its own.

The snapshot is built from the local tree alone, which holds every node's replicated entries
(``actual-<host>/…`` is what that node reported, with its Lamport stamp), plus the local log
files' sizes, plus, when marsd runs, its live figures (debug lines). So it also works when marsd
is down, and says so (``marsd_running``). One pass over the tree (one ``readlink`` per entry, an
``lstat`` only where an age is shown) feeds everything; the rest is dictionary work, which keeps
8 nodes × 50 resources fast.

Rules of the types:

* Frozen: a snapshot is a fact about one moment; a face that wants another picture builds one
  (``dataclasses.replace``), it never edits the one it was given.
* Typed values: a tree entry's text is parsed once, by its type (:mod:`mars.engine.log.values`),
  so no face splits a position or version string; unknown or unparsable values are ``None``.
* Derived facts are properties defined once here (``replay_stopped``, ``consistent``, a
  progress's ``reached`` and ``percent_text``), and the findings read those properties.
* Units are in the names: ``_bytes``, ``_s`` (seconds), ``_bytes_per_s``; Lamport times are
  seconds since the epoch as floats.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from ... import __version__
from ..errors import MarsError
from ..log.values import LogPos, ReplayCode, ReplayLink, Version, parse_log_name
from ..entry import DELETED
from ..tree import LOCAL_DIRS, NONE, parse_hosts, parse_int
from ..trigger import marsd_running
from . import tunables
from .units import percent_shown

ALIVE_WINDOW_S = 30.0  # a node whose last report is older than this is not alive (the original: 30 s in mars-status)
ALMOST_EMPTY = 0  # rests at or below this many bytes count as reached
STALL_S = 10.0  # a position with bytes left that has not moved for this long is stalled (marsd moves it every round)
# bytes/s: below this a rate is the tail of a stopped transfer's moving average, not a speed (less than
# one small log record a second); a time left is never told from it.
MIN_RATE = 64.0


@dataclass(frozen=True, slots=True)
class Progress:
    """A position moving towards a target: sync, fetch, replay."""

    pos_bytes: int
    size_bytes: int
    rate_bytes_per_s: float | None = None  # None: not running, or too slow to be a speed (MIN_RATE)
    moved_age_s: float | None = None  # since the position last moved; None unknown

    @property
    def stalled(self) -> bool:
        """Bytes are left and the position has not moved for STALL_S: no time left can be told."""
        return not self.reached and self.moved_age_s is not None and self.moved_age_s >= STALL_S

    @property
    def rest_bytes(self) -> int:
        return max(0, self.size_bytes - self.pos_bytes)

    @property
    def percent(self) -> float:
        if self.size_bytes <= 0:
            return 100.0
        return min(100.0, 100.0 * self.pos_bytes / self.size_bytes)

    def percent_text(self, decimals: int = 1) -> str:
        """The percentage to show: never 100 while bytes are left (see units.percent_shown)."""
        return percent_shown(self.pos_bytes, self.size_bytes, decimals)

    @property
    def reached(self) -> bool:
        return self.rest_bytes <= ALMOST_EMPTY

    @property
    def remaining_s(self) -> float | None:
        """Time left at the current rate; None when nothing moves (unknown, not zero)."""
        if self.reached:
            return 0.0
        if not self.moving:
            return None
        assert self.rate_bytes_per_s is not None
        return self.rest_bytes / self.rate_bytes_per_s

    @property
    def moving(self) -> bool:
        """It moves at a speed a time left can be told from: a rate of at least MIN_RATE, not stalled."""
        rate = self.rate_bytes_per_s
        return rate is not None and math.isfinite(rate) and rate >= MIN_RATE and not self.stalled

    def to_json(self) -> dict[str, Any]:
        return {"pos_bytes": self.pos_bytes, "size_bytes": self.size_bytes, "rest_bytes": self.rest_bytes,
                "percent": round(self.percent, 2), "rate_bytes_per_s": _finite(self.rate_bytes_per_s),
                "moved_age_s": _finite(self.moved_age_s), "stalled": self.stalled,
                "remaining_s": _finite(self.remaining_s)}


@dataclass(frozen=True, slots=True)
class Message:
    """A message a node wrote into the tree (``msg-<class>-<key>``), or a link error."""

    node: str
    res: str | None
    level: str  # "err", "warn", "inf"
    key: str
    text: str
    age_s: float


@dataclass(frozen=True, slots=True)
class Switches:
    """What the operator wants (``todo-<host>/…``): attach, connect (fetch), sync, allow-replay."""

    attach: bool
    fetch: bool
    sync: bool
    replay: bool


@dataclass(frozen=True, slots=True)
class Actual:
    """What the node reports doing (``actual-<host>/is-…``)."""

    attached: bool
    primary: bool
    syncing: bool
    fetching: bool
    replaying: bool
    open_count: int


@dataclass(frozen=True, slots=True)
class LogFileStatus:
    """One log file of the chain: this node's copy (if any) and every node's version of it."""

    JSON_EXTRAS: ClassVar[tuple[str, ...]] = ("name", "length_bytes")

    seq: int
    origin: str
    local_bytes: int | None  # size of this node's copy; None when it has none
    versions: dict[str, Version] = field(default_factory=dict)  # by host

    @property
    def name(self) -> str:
        return f"log-{self.seq:09d}-{self.origin}"

    @property
    def length_bytes(self) -> int | None:
        """Its final length when a version names it (the origin's first), else this copy's size."""
        ver = self.versions.get(self.origin) or next(iter(self.versions.values()), None)
        return ver.length_bytes if ver is not None else self.local_bytes


@dataclass(frozen=True, slots=True)
class SplitBrain:
    """Two histories for the same log number ``seq``, the split point: different origins or digests.

    ``digests`` says what each host holds of log ``seq``: ``<origin>:<digest>`` from its version
    entry, ``<origin>:being written`` for a file its origin has no version of yet (its log end),
    ``<origin>:log file`` when only the log files of two origins show the split. Hosts with the
    same value are one side (:attr:`sides`). ``beyond_bytes``: per host, the bytes of log in its
    history beyond the split point (what it has that the other side has not). ``reference``: the
    host the others were compared with, the designated primary (else the one with the furthest
    log end); its side comes first.
    """

    JSON_EXTRAS: ClassVar[tuple[str, ...]] = ("sides",)

    seq: int
    digests: dict[str, str]  # host -> "<origin>:<digest>"
    beyond_bytes: dict[str, int] = field(default_factory=dict)  # host -> bytes beyond the split point
    reference: str | None = None

    @property
    def sides(self) -> list[list[str]]:
        """The hosts grouped by the history they hold at the split, the reference's side first."""
        groups: dict[str, list[str]] = {}
        for h, v in sorted(self.digests.items()):
            groups.setdefault(v, []).append(h)
        return sorted(groups.values(), key=lambda hs: (self.reference not in hs, hs))

    def side_of(self, host: str) -> list[str] | None:
        return next((hs for hs in self.sides if host in hs), None)


@dataclass(frozen=True, slots=True)
class NodeResource:
    """One member of one resource, as that member reported it."""

    JSON_EXTRAS: ClassVar[tuple[str, ...]] = ("role", "consistent", "replay_stopped")

    host: str
    disk: str
    disk_bytes: int | None  # the data device's size as its node last saw it (actsize-<host>)
    designated_primary: bool
    switches: Switches
    actual: Actual
    sync: Progress
    fetch: Progress | None
    replay: Progress | None
    replay_link: ReplayLink | None
    fetch_pos: LogPos | None
    fetch_source: str | None
    replay_code: ReplayCode | None
    fetch_age_s: float | None  # since the fetch position last moved
    replay_age_s: float | None  # since the replay position last moved
    fetch_lag_s: float | None  # how much older its fetch position is than the primary's log end (0 when none left)
    replay_lag_s: float | None  # how much older its replay position is than the primary's (0 when none left)
    messages: list[Message]
    connect_list: list[str] = field(default_factory=list)  # connect-<host>: where it fetches from first
    forced: bool = False  # made primary by force: ``forced-primary`` names it
    size_bytes: int | None = None  # the size its marsd works with (actual-<host>/size); None when not attached
    # The last resize's new region on this member: its sync (secondaries) or the export's growth
    # (the primary) from the old size to the new; None when the resource never grew.
    resize: Progress | None = None

    @property
    def role(self) -> str:
        """The original's role names, plus ForcedPrimary (see :data:`~mars.engine.model.ROLES`):
        serving and designated is Primary (ForcedPrimary when made so by ``primary --force``),
        designated but not serving yet NotYetPrimary, serving but not designated (an old primary
        that has not stopped yet, or one cut off after a forced failover) RemainsPrimary."""
        if self.designated_primary:
            if not self.actual.primary:
                return "NotYetPrimary"
            return "ForcedPrimary" if self.forced else "Primary"
        return "RemainsPrimary" if self.actual.primary else "Secondary"

    @property
    def split_brain_message(self) -> str | None:
        """What this member's marsd says when its replay refuses to go on because its history
        diverges from the designated primary's (``msg-err-split-brain``); None when it does not."""
        return next((m.text or "(no text)" for m in self.messages if m.key == "err-split-brain"), None)

    @property
    def consistent(self) -> bool:
        """Synced and replaying a whole-record prefix of the log. A replay that stopped at a
        damaged record leaves the device consistent at an older point; damage means it cannot
        move on, which ``log_damaged`` says, and the diskstate shows as DefectiveLog."""
        return self.sync.reached and self.replay_link is not None and not self.log_damaged

    @property
    def replay_stopped(self) -> bool:
        """marsd gave up on this member, so its replay does not run until an operator acts:
        replay stopped at a damaged record, or its attach failed (replay code < 0)."""
        return self.replay_code is not None and self.replay_code.stopped

    @property
    def log_damaged(self) -> bool:
        """Replay stopped at a damaged log record (``-1,<code>,<offset>``)."""
        return self.replay_code is not None and self.replay_code.damaged


@dataclass(frozen=True, slots=True)
class ResourceStatus:
    JSON_EXTRAS: ClassVar[tuple[str, ...]] = ("members", "is_split_brain", "diverged")

    name: str
    size_bytes: int
    primary: str | None
    nodes: dict[str, NodeResource]
    logs: list[LogFileStatus]
    log_end: LogPos | None  # the primary's acknowledged log end (``actual-<primary>/log-pos``); with none
    #                        designated, the last primary's final one (``prev-primary``'s)
    split_brain: list[SplitBrain]
    deletable_logs: list[str]
    deletable_bytes: int
    held_back_by: list[str]  # members whose replay position keeps older logs from being deletable
    logs_deleted_below: int
    # Role switching (marsadm primary / primary --force / secondary). Defaults: a document of an
    # older marsd, without them, still reads.
    handover_to: str | None = None  # the target of a planned handover in progress (``handover-to``)
    handover_age_s: float | None = None  # since that handover started (its entry's stamp)
    prev_primary: str | None = None  # the designated primary before the current value (``prev-primary``)
    forced_primary: str | None = None  # made primary by ``primary --force`` (until the next planned handover)
    resize_from: int | None = None  # the size before the last ``marsadm resize`` (``resize-from``)

    @property
    def possible_size(self) -> int | None:
        """What ``marsadm resize`` grows to by default: the smallest member's disk, 4 KiB-aligned;
        None while a member's disk size is not known (it never attached)."""
        sizes = [n.disk_bytes for n in self.nodes.values()]
        if not sizes or any(s is None for s in sizes):
            return None
        return min(s for s in sizes if s is not None) // 4096 * 4096

    @property
    def members(self) -> list[str]:
        return sorted(self.nodes)

    @property
    def split_reported(self) -> dict[str, str]:
        """Members whose marsd refuses to replay because their history diverges from the
        primary's (``msg-err-split-brain``), with what it says: a split brain the version
        entries may not show yet."""
        return {h: t for h, n in sorted(self.nodes.items()) if (t := n.split_brain_message) is not None}

    @property
    def is_split_brain(self) -> bool:
        """Two histories exist: the version entries (or log files) say so, or a member's marsd does."""
        return bool(self.split_brain) or bool(self.split_reported)

    @property
    def diverged(self) -> list[str]:
        """The hosts whose history is not the one going on: off the reference's side of a split
        (the designated primary's, else the furthest log end's), or reporting the split brain
        themselves. Never the designated primary."""
        out = set(self.split_reported)
        for s in self.split_brain:
            sides = s.sides
            kept = next((hs for hs in sides if self.primary in hs), sides[0] if sides else [])
            out.update(h for hs in sides if hs is not kept for h in hs)
        out.discard(self.primary or "")
        return sorted(out)

    def split_of(self, host: str) -> SplitBrain | None:
        """The first split that names ``host``."""
        return next((s for s in sorted(self.split_brain, key=lambda s: s.seq) if host in s.digests), None)


@dataclass(frozen=True, slots=True)
class Tunable:
    name: str
    set_value: str | None  # what the tree asks for (defaults-<host>/<name>), None when not set
    actual_value: str | None  # what the running marsd uses

    @property
    def value(self) -> str | None:
        """What is in force as far as the tree says: the set value, else the one marsd reports."""
        return self.set_value if self.set_value is not None else self.actual_value

    @property
    def unit(self) -> str | None:
        """The unit of the table (engine/model/tunables.py); None for marsd's own options (interval, port)."""
        s = tunables.SPECS.get(self.name)
        return s.unit if s is not None else None

    @property
    def set_text(self) -> str | None:
        return tunables.show_text(self.name, self.set_value)

    @property
    def actual_text(self) -> str | None:
        return tunables.show_text(self.name, self.actual_value)

    @property
    def set_number(self) -> float | None:
        return tunables.number(self.name, self.set_value)

    @property
    def actual_number(self) -> float | None:
        return tunables.number(self.name, self.actual_value)

    @property
    def differs(self) -> bool:
        """Set, reported, and not the same figure: marsd has not applied it yet (or is down)."""
        return (self.set_value is not None and self.actual_value is not None
                and self.set_number != self.actual_number)


@dataclass(frozen=True, slots=True)
class NodeStatus:
    host: str
    ip: str | None
    alive: bool
    seen_age_s: float | None  # since its last report (actual-<host>/time)
    version: str | None
    rest_space_bytes: int | None
    total_space_bytes: int | None
    emergency: bool  # at the last emergency level, or a primary here still writes through
    link_errors: dict[str, str]  # peer -> why this node cannot reach it (msg-peer-<peer>)
    tunables: list[Tunable]
    unreachable: bool = False  # every other live node reports it cannot reach this one (then not alive)
    emergency_level: int = 0  # actual-<host>/emergency: 0 normal .. 4 jammed (the original's levels)
    space_limits: list[int] = field(default_factory=list)  # the four free-space steps in bytes (L1..L4)
    writing_through: list[str] = field(default_factory=list)  # resources this node writes through (its log stopped)

    @property
    def space_needed_bytes(self) -> int | None:
        """Free bytes at which the node is out of emergency (level 0): the sum of its four steps."""
        return sum(self.space_limits) if len(self.space_limits) == 4 else None

    def tunable(self, name: str) -> Tunable | None:
        return next((t for t in self.tunables if t.name == name), None)

    @property
    def peer_port(self) -> str | None:
        """The peer port this node's marsd reports using (None when it has not said)."""
        t = self.tunable("port")
        return t.actual_value if t is not None and t.actual_value else None


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts per bucket, not cumulative: ``counts[i]`` are the observations up to ``bounds_s[i]``
    above the previous bound; the last count is above every bound (+Inf)."""

    bounds_s: list[float]
    counts: list[int]
    sum_s: float

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations up to it), +Inf last: the form Prometheus's buckets take."""
        out, total = [], 0
        for bound, n in zip([*self.bounds_s, math.inf], self.counts):
            total += n
            out.append((bound, total))
        return out


@dataclass(frozen=True, slots=True)
class ResourceCounters:
    """What this node's marsd did for one resource since it started (engine/stats.py counts it)."""

    nbd_requests: dict[str, int]  # by NBD command: read, write, flush, trim, write_zeroes, block_status
    nbd_bytes: dict[str, int]  # bytes those requests asked for, by command
    log_records: int  # records appended to the log (acknowledged writes, trims, zeroes)
    log_bytes: int  # bytes appended to the log, headers included
    group_commits: int  # appends, each one fdatasync for every record queued meanwhile
    write_latency: Histogram  # request received to acknowledged (durable in the log, written back)
    fetched_bytes: int  # log bytes fetched from peers
    replayed_bytes: int  # bytes of records replayed onto the data device
    synced_bytes: int  # bytes copied by the full sync
    device_read_bytes: int = 0  # bytes NBD reads took from the data device (holes are not read)


@dataclass(frozen=True, slots=True)
class ExchangeCounters:
    """What this node's tree exchange did since marsd started (engine/daemon/exchange.py).

    In a quiet cluster ``pushes`` (one-way feeds) grows by one per peer and report period and
    ``pulls`` hardly moves; ``full_pulls`` grows only when a peer starts (or restarts) and with ``repairs``, which
    stays 0 unless the trees differed without a change to explain it.
    """

    pulls: int  # answered pulls of peers' changes
    full_pulls: int  # of them, answered with the whole tree
    repairs: int  # whole-tree pulls asked for because digests differed
    pushes: int  # feeds sent to a peer (one-way change sets)
    entries_received: int  # entries received from peers (answers and feeds)
    entries_taken: int  # of them, newer than ours: written into the tree
    entries_sent: int  # entries sent to peers (answers and feeds)
    scans: int  # scans of the tree for other processes' writes
    external_changes: int  # entries those scans found changed (marsadm, an operator)


@dataclass(frozen=True, slots=True)
class Counters:
    """marsd's counters, present only when this node's marsd answered; they restart at zero
    with marsd (``started_at_s``), as Prometheus counters do."""

    started_at_s: float
    resources: dict[str, ResourceCounters]
    exchange: ExchangeCounters | None = None  # None from a marsd older than the incremental exchange


@dataclass(frozen=True, slots=True)
class Snapshot:
    local_host: str
    mars_dir: str
    taken_at_s: float  # wall clock
    lamport_s: float  # the local Lamport clock (the newest stamp seen, or the wall clock)
    clock_slip_s: float  # Lamport clock minus wall clock: a node whose clock runs ahead drags it forward
    tool_version: str
    marsd_running: bool
    marsd_pid: int | None
    cluster_uuid: str | None
    window_s: float
    nodes: dict[str, NodeStatus]
    resources: dict[str, ResourceStatus]
    debug_lines: list[str] = field(default_factory=list)
    counters: Counters | None = None  # marsd's live counters; None when it did not answer

    def resource(self, name: str) -> ResourceStatus | None:
        return self.resources.get(name)

    def unknown_resource(self, name: str) -> MarsError:
        """The error for a resource this snapshot does not have, naming the ones it has."""
        known = ", ".join(sorted(self.resources)) or "none"
        return MarsError(f"resource {name} does not exist", f"the resources are: {known}")

    def require_resource(self, name: str) -> ResourceStatus:
        r = self.resources.get(name)
        if r is None:
            raise self.unknown_resource(name)
        return r

    def alive(self, host: str) -> bool:
        ns = self.nodes.get(host)
        return ns is not None and ns.alive

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: every field, plus the derived figures a program should not recompute
        (a member's role, a progress's percent and time left). Floats that are not finite become
        null, so strict JSON parsers (Zabbix, browsers) read it."""
        out = _to_json(self)
        assert isinstance(out, dict)
        return out

    @classmethod
    def from_json(cls, doc: Any) -> Snapshot:
        """The snapshot :meth:`to_json` wrote (marsd's control socket sends it), checked field by
        field against the types; derived figures in the document are ignored, recomputed here.

        Raises MarsError naming the first field that does not fit, as from a marsd of another
        version.
        """
        try:
            snap: Snapshot = _from_json(cls, doc, "snapshot")
            return snap
        except (TypeError, ValueError) as e:
            raise MarsError(f"the status snapshot cannot be read: {e}",
                            "run the same MARS version for marsd and the status tools") from None


# --- JSON ------------------------------------------------------------------------------------

_VALUE_TYPES = (LogPos, ReplayLink, Version, ReplayCode)


def _finite(v: float | None) -> float | None:
    return v if v is None or math.isfinite(v) else None


def _to_json(o: Any) -> Any:
    if isinstance(o, _VALUE_TYPES):
        return str(o)  # the tree's own text: one format per value, parsed back by its type
    if isinstance(o, Progress):
        return o.to_json()
    if isinstance(o, float):
        return _finite(o)
    if isinstance(o, dict):
        return {k: _to_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_to_json(v) for v in o]
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        d = {f.name: _to_json(getattr(o, f.name)) for f in dataclasses.fields(o)}
        for name in getattr(o, "JSON_EXTRAS", ()):
            d[name] = _to_json(getattr(o, name))
        return d
    return o


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass(tp: Any) -> type | None:
    """``tp`` when it is a dataclass type (not an instance)."""
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _from_json(tp: Any, v: Any, where: str) -> Any:
    """``v`` as type ``tp``; TypeError/ValueError naming ``where`` when it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if v is None:
            if len(args) == len(typing.get_args(tp)):
                raise ValueError(f"{where} is null")
            return None
        return _from_json(args[0], v, where)
    if tp in _VALUE_TYPES:
        if not isinstance(v, str) or (parsed := tp.parse(v)) is None:
            raise ValueError(f"{where} = {v!r} is not a {tp.__name__}")
        return parsed
    cls = _dataclass(tp)
    if cls is not None:
        if not isinstance(v, dict):
            raise TypeError(f"{where} is not an object")
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in v:
                kw[f.name] = _from_json(_hints(cls)[f.name], v[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}.{f.name} is missing")
        return cls(**kw)
    if origin is dict:
        key_t, val_t = typing.get_args(tp)
        if not isinstance(v, dict):
            raise TypeError(f"{where} is not an object")
        return {k: _from_json(val_t, x, f"{where}[{k!r}]") for k, x in v.items()}
    if origin is list:
        (item_t,) = typing.get_args(tp)
        if not isinstance(v, list):
            raise TypeError(f"{where} is not a list")
        return [_from_json(item_t, x, f"{where}[{i}]") for i, x in enumerate(v)]
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{where} = {v!r} is not a number")
        return float(v)
    if tp in (int, str, bool):
        if type(v) is not tp:
            raise TypeError(f"{where} = {v!r} is not a {tp.__name__}")
        return v
    raise TypeError(f"{where}: no JSON form for {tp!r}")


# --- building -------------------------------------------------------------------------------

class TreeCache:
    """What a long-running face read of the tree, per directory, for reuse while it is unchanged.

    Why it is safe: a tree entry is a symlink, immutable once made; every change (a new value, a
    tombstone, a new entry) is a rename or an unlink in its directory, which moves the
    directory's mtime and ctime. So a directory whose inode, mtime and ctime are what they were
    holds the same entries with the same stamps. Two guards close the gaps: a directory is
    remembered only once its mtime is :data:`GUARD_S` older than the read (a change within the
    file system's timestamp granularity could otherwise keep the old mtime, the "racy git"
    problem), and every directory is read afresh at least every :data:`MAX_AGE_S` (a clock set
    back). Regular files (log files, whose size grows in place) are always stat'ed anew.

    Why: a scrape or a TUI refresh every few seconds would otherwise readlink every entry of a
    tree that mostly does not change (8,600 entries at 8 nodes x 50 resources).
    """

    GUARD_S: ClassVar[float] = 1.0
    MAX_AGE_S: ClassVar[float] = 60.0

    def __init__(self) -> None:
        # full path -> ((ino, mtime_ns, ctime_ns), when read, links [(name, value, stamp)], file names, subdirs)
        self.dirs: dict[str, tuple[tuple[int, int, int], float, list[tuple[str, str, float | None]], list[str],
                                   list[str]]] = {}


class _Entries:
    """The tree as dicts: path -> value, directory -> entries, and the stamps (s) that ages need."""

    def __init__(self, root: Path, cache: TreeCache | None = None) -> None:
        self.values: dict[str, str] = {}
        self.dirs: dict[str, dict[str, str]] = {}  # directory -> entry name -> value: no scans of everything
        self.stamps: dict[str, float] = {}
        self.files: dict[str, dict[str, int]] = {}  # directory -> regular file name -> size
        self.newest = 0.0
        self._cache = cache
        self._seen: dict[str, Any] = {}
        self._started = time.time()
        self._read(str(root), "")
        if cache is not None:
            cache.dirs = self._seen  # what vanished is forgotten

    def _read(self, full: str, rel: str) -> None:
        cache = self._cache
        key = None
        if cache is not None:
            try:
                st = os.stat(full)
            except OSError:
                return
            key = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            hit = cache.dirs.get(full)
            if hit is not None and hit[0] == key and self._started - hit[1] < cache.MAX_AGE_S:
                self._seen[full] = hit
                for name, value, stamp in hit[2]:
                    self._link(rel, name, value, stamp)
                for name in hit[3]:
                    self._file(f"{full}/{name}", rel, name)
                for name in hit[4]:
                    self._read(f"{full}/{name}", f"{rel}/{name}" if rel else name)
                return
        links: list[tuple[str, str, float | None]] = []
        files: list[str] = []
        subdirs: list[str] = []
        try:
            it = os.scandir(full)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        with it:
            for de in it:
                name = de.name
                if name.startswith(".tmp"):
                    continue
                if de.is_symlink():
                    try:
                        value = os.readlink(de.path)
                        # Stamps only where an age is shown: an lstat per entry is half the cost.
                        stamp = de.stat(follow_symlinks=False).st_mtime_ns / 1e9 if _aged(name) else None
                    except OSError:
                        continue
                    links.append((name, value, stamp))
                    self._link(rel, name, value, stamp)
                elif de.is_dir(follow_symlinks=False):
                    if not rel and name in LOCAL_DIRS:
                        continue
                    subdirs.append(name)
                    self._read(de.path, f"{rel}/{name}" if rel else name)
                elif name.startswith("log-") and rel.startswith("resource-"):
                    files.append(name)
                    self._file(de.path, rel, name)
        if cache is not None and key is not None and max(key[1], key[2]) / 1e9 < self._started - cache.GUARD_S:
            self._seen[full] = (key, self._started, links, files, subdirs)

    def _link(self, rel: str, name: str, value: str, stamp: float | None) -> None:
        if value == DELETED:
            return
        path = f"{rel}/{name}" if rel else name
        self.values[path] = value
        self.dirs.setdefault(rel, {})[name] = value
        if stamp is not None:
            self.stamps[path] = stamp
            if stamp > self.newest:
                self.newest = stamp

    def _file(self, full: str, rel: str, name: str) -> None:
        try:
            self.files.setdefault(rel, {})[name] = os.stat(full, follow_symlinks=False).st_size
        except OSError:
            pass

    def get(self, path: str) -> str | None:
        return self.values.get(path)

    def names(self, directory: str, prefix: str) -> list[tuple[str, str]]:
        """(name without prefix, value) of the entries in ``directory`` whose names start with ``prefix``."""
        n = len(prefix)
        return [(k[n:], v) for k, v in self.dirs.get(directory, {}).items() if k.startswith(prefix)]

    def integer(self, path: str, default: int | None = None) -> int | None:
        v = parse_int(self.values.get(path))
        return default if v is None else v

    def flag(self, path: str) -> bool:
        return self.values.get(path) == "1"

    def real(self, path: str) -> float | None:
        v = self.values.get(path)
        try:
            return float(v) if v is not None else None
        except ValueError:
            return None

    def age(self, path: str, lamport: float) -> float | None:
        """Seconds since the entry at ``path`` was written, by its Lamport stamp; None unknown."""
        s = self.stamps.get(path)
        return None if s is None else max(0.0, lamport - s)


def _aged(name: str) -> bool:
    """Entries whose age the snapshot shows; ``time`` (every node's, every round) also keeps
    the Lamport clock current, since it is the newest stamp in any live tree."""
    return name in ("time", "fetch-pos", "log-pos", "handover-to") or name.startswith(("replay-", "msg-", "syncstatus-"))


def build(mars_dir: str | os.PathLike[str], host: str, *, window_s: float = ALIVE_WINDOW_S,
          debug_lines: list[str] | None = None, now_s: float | None = None,
          counters: Counters | None = None, cache: TreeCache | None = None) -> Snapshot:
    """The snapshot of everything this node's tree knows, as of now.

    A face that builds snapshots again and again (an exporter, the TUI) passes one
    :class:`TreeCache` to every call: what did not change is then not read again.
    """
    root = Path(mars_dir)
    e = _Entries(root, cache)
    wall = time.time() if now_s is None else now_s
    lamport = max(wall, e.newest)
    pid = marsd_running(root, host)

    hosts = sorted({h for h, _ in e.names("ips", "ip-")} |
                   {d[len("actual-"):] for d in e.dirs if d.startswith("actual-") and "/" not in d})
    # While this node's marsd is down its tree stands still, and every peer's last report ages
    # only because nothing here takes the next one: peers are judged as of this node's own last
    # report, not as of now. Else a stopped marsd made its node call every live peer down
    # (MARSD_DOWN says what is wrong, and it is this node).
    mine = e.real(f"actual-{host}/time") if pid is None else None
    as_of = lamport if mine is None else min(lamport, mine)
    nodes = _reachability({h: _node(e, h, lamport if h == host else as_of, window_s, set(hosts)) for h in hosts},
                          host if pid is not None else None)
    resources = {}
    for d in sorted(d for d in e.dirs if d.startswith("resource-") and "/" not in d):
        res = d[len("resource-"):]
        if e.get(f"{d}/size") is not None:
            resources[res] = _resource(e, res, lamport)
    return Snapshot(local_host=host, mars_dir=str(root), taken_at_s=wall, lamport_s=lamport, clock_slip_s=lamport - wall,
                    tool_version=__version__, marsd_running=pid is not None, marsd_pid=pid,
                    cluster_uuid=e.get("uuid"), window_s=window_s, nodes=nodes, resources=resources,
                    debug_lines=list(debug_lines or []), counters=counters)


def _reachability(nodes: dict[str, NodeStatus], running: str | None) -> dict[str, NodeStatus]:
    """A node that every other live node reports it cannot reach is not alive, at once.

    Its own last report stays fresh for the alive window after it dies (30 s by default), while
    its peers' links to it break within a round: the links are the sooner and truer witness.
    One reporter that cannot reach it is a link problem (PEER_UNREACHABLE), not a dead node.
    ``running`` is this host when its marsd runs: it is alive whatever others report (a
    partition seen from inside), and it is never the only one to be believed against itself.
    """
    out = dict(nodes)
    for h, n in nodes.items():
        if h == running:
            continue
        witnesses = [o for o, on in nodes.items() if o != h and on.alive]
        if n.alive and witnesses and all(h in nodes[o].link_errors for o in witnesses):
            out[h] = dataclasses.replace(n, alive=False, unreachable=True)
    return out


def _node(e: _Entries, h: str, lamport: float, window_s: float, hosts: set[str]) -> NodeStatus:
    a = f"actual-{h}"
    reported = e.real(f"{a}/time")
    seen_age = None if reported is None else max(0.0, lamport - reported)
    tunables = [Tunable(n, e.get(f"defaults-{h}/{n}") or e.get(f"defaults/{n}"), e.get(f"{a}/tunable-{n}"))
                for n in sorted(n for n, _ in e.names(a, "tunable-"))]
    level = max(0, min(4, e.integer(f"{a}/emergency", 0) or 0))
    limits = [parse_int(x) or 0 for x in (e.get(f"{a}/emergency-limits") or "").split(",") if x]
    through = sorted(d.removeprefix("resource-") for d in e.dirs if d.startswith("resource-") and "/" not in d
                     and (e.get(f"{d}/writethrough-{h}") or "").endswith(":0"))
    return NodeStatus(
        host=h, ip=e.get(f"ips/ip-{h}"), alive=seen_age is not None and seen_age <= window_s,
        seen_age_s=seen_age, version=e.get(f"{a}/version"), rest_space_bytes=e.integer(f"{a}/rest-space"),
        total_space_bytes=e.integer(f"{a}/total-space"), emergency=level >= 4 or bool(through),
        link_errors={p: why for p, why in e.names(a, "msg-peer-") if p in hosts}, tunables=tunables,
        emergency_level=level, space_limits=limits if len(limits) == 4 else [], writing_through=through)


def _messages(e: _Entries, directory: str, node: str, res: str | None, lamport: float) -> list[Message]:
    """``msg-<level>-<what>`` entries of one actual directory; "OK" means cleared."""
    out = []
    for key, v in e.names(directory, "msg-"):
        if v != "OK" and not key.startswith("peer-"):
            stamp = e.stamps.get(f"{directory}/msg-{key}", lamport)
            out.append(Message(node, res, key.split("-", 1)[0], key, v, max(0.0, lamport - stamp)))
    return sorted(out, key=lambda m: m.key)


def _log_files(e: _Entries, d: str) -> dict[tuple[int, str], LogFileStatus]:
    """The chain's files: this node's copies, and every file a node's version entry names."""
    local: dict[tuple[int, str], int] = {}
    for name, nbytes in e.files.get(d, {}).items():
        p = parse_log_name(name)
        if p is not None:
            local[p] = nbytes
    versions: dict[tuple[int, str], dict[str, Version]] = {}
    for name, v in e.names(d, "version-"):
        seq_s, _, h = name.partition("-")
        ver = Version.parse(v)
        if ver is None or not seq_s.isdigit():
            continue
        versions.setdefault((int(seq_s), ver.origin), {})[h] = ver
    return {k: LogFileStatus(k[0], k[1], local.get(k), versions.get(k, {}))
            for k in local.keys() | versions.keys()}


@dataclass(frozen=True, slots=True)
class _Piece:
    """One log file in one host's history: its origin, its length and its digest (None for the
    open tail: the file its origin is writing, or stopped writing without a version entry)."""

    origin: str
    length: int
    digest: str | None

    @property
    def text(self) -> str:
        return f"{self.origin}:{self.digest}" if self.digest is not None else f"{self.origin}:being written"


def _histories(e: _Entries, d: str, logs: dict[tuple[int, str], LogFileStatus]) -> dict[str, dict[int, _Piece]]:
    """Per host, its history: log number -> the file it holds under that number.

    A host's history is its version entries (every host writes one for each file it finished
    or replayed completely), plus its open tail: the file its ``log-pos`` names, when that file
    is its own and it has no version of it yet (a primary writing, or one stopped while writing).
    Not when its replay position is in another origin's file of that number or a later one: it
    follows another history from there on (``invalidate`` after a split brain leaves a demoted
    primary's last ``log-pos`` behind, and takes its versions of the discarded files away).
    """
    hist: dict[str, dict[int, _Piece]] = {}
    for f in logs.values():
        for h, v in f.versions.items():
            hist.setdefault(h, {})[v.seq] = _Piece(v.origin, v.length_bytes, v.digest)
    prefix = f"{d}/actual-"
    for a in e.dirs:
        if not a.startswith(prefix) or "/" in a[len(prefix):]:
            continue
        h = a[len(prefix):]
        pos = LogPos.parse(e.get(f"{a}/log-pos"))
        if pos is None or pos.origin != h or pos.seq in hist.get(h, {}):
            continue
        link = ReplayLink.parse(e.get(f"{d}/replay-{h}"))
        if link is not None and link.origin != h and link.seq >= pos.seq:
            continue
        hist.setdefault(h, {})[pos.seq] = _Piece(h, pos.offset, None)
    return hist


def _differ(x: _Piece, y: _Piece) -> bool:
    """Two histories part at this file: other origins, or other digests. An open tail has no
    digest yet: of the same origin, one is a prefix of the other as far as the tree knows."""
    if x.origin != y.origin:
        return True
    return x.digest is not None and y.digest is not None and x.digest != y.digest


def _log_end(pieces: dict[int, _Piece]) -> tuple[int, int]:
    """How far a history goes: its last file's number and length."""
    if not pieces:
        return (0, 0)
    last = max(pieces)
    return (last, pieces[last].length)


def _beyond(mine: dict[int, _Piece], other: _Piece, seq: int) -> int:
    """Bytes of ``mine`` beyond the split at ``seq`` from a history holding ``other`` there: of
    the split file, what ``mine`` has past the common prefix (all of it when the origins
    differ), and every later file of ``mine``."""
    x = mine[seq]
    at = x.length - min(x.length, other.length) if x.origin == other.origin else x.length
    return at + sum(p.length for k, p in mine.items() if k > seq)


def _split_brain(logs: dict[tuple[int, str], LogFileStatus], hist: dict[str, dict[int, _Piece]],
                 primary: str | None) -> list[SplitBrain]:
    """Where histories part: the first log number at which two hosts hold different files.

    Every pair of hosts is compared number by number (a version entry or open tail of each);
    a split is reported at the first number where a pair that was one history so far parts, so
    two histories that went on apart after their split are one split, not one per later file.
    A number where only this host's log files come from two origins (no version or log end says
    it) is a split too. The reference is the designated primary (else the host with the furthest
    log end): its side comes first, and the others' bytes beyond are counted against it.
    """
    ref = primary if primary in hist else max(sorted(hist), key=lambda h: _log_end(hist[h]), default=None)
    by_seq: dict[int, dict[str, _Piece]] = {}
    for h, pieces in hist.items():
        for k, p in pieces.items():
            by_seq.setdefault(k, {})[h] = p
    origins: dict[int, set[str]] = {}
    for seq, origin in logs:
        origins.setdefault(seq, set()).add(origin)
    apart: set[frozenset[str]] = set()  # pairs already on two sides of an earlier split
    out = []
    for seq in sorted(by_seq.keys() | origins.keys()):
        held = by_seq.get(seq, {})
        hosts = sorted(held)
        pairs = {frozenset((x, y)) for i, x in enumerate(hosts) for y in hosts[i + 1:] if _differ(held[x], held[y])}
        if pairs:
            if pairs <= apart:
                continue
            digests = {h: held[h].text for h in hosts}
        elif len(origins.get(seq, ())) > 1:
            pairs = {frozenset((x, y)) for x in origins[seq] for y in origins[seq] if x < y}
            if pairs <= apart:
                continue
            digests = {o: f"{o}:log file" for o in sorted(origins[seq])}
        else:
            continue
        split = SplitBrain(seq, digests, reference=ref if ref in digests else None)
        sides = split.sides
        if split.reference is None and held:
            # the reference is not at this number: the furthest log end there stands in for it
            lead = max(sorted(h for h in digests if h in held), key=lambda h: _log_end(hist[h]), default=None)
            if lead is not None:
                split = dataclasses.replace(split, reference=lead)
                sides = split.sides
        kept = sides[0] if sides else []
        beyond: dict[str, int] = {}
        for h in sorted(digests):
            if h not in held:
                continue
            if h in kept:
                others = [held[hs[0]] for hs in sides[1:] if hs[0] in held]
            else:
                others = [held[kept[0]]] if kept and kept[0] in held else []
            if others:
                beyond[h] = max(_beyond(hist[h], o, seq) for o in others)
        out.append(dataclasses.replace(split, beyond_bytes=beyond))
        apart.update(frozenset((x, y)) for i, a in enumerate(sides) for b in sides[i + 1:] for x in a for y in b)
    return out


class _Chain:
    """Absolute positions: bytes from the first known log file, by finished lengths where known.

    Positions in the tree name a file and an offset in it; progress needs one number line, so
    every file starts where the one before it ended.
    """

    def __init__(self, logs: dict[tuple[int, str], LogFileStatus]) -> None:
        lengths: dict[int, int] = {}
        for (seq, _), f in logs.items():
            if f.versions:
                lengths[seq] = f.length_bytes or 0
            elif f.local_bytes is not None:
                lengths.setdefault(seq, f.local_bytes)
        self.seqs = sorted(lengths)
        self.base: dict[int, int] = {}
        acc = 0
        for s in self.seqs:
            self.base[s] = acc
            acc += lengths[s]
        self.total = acc

    def absolute(self, pos: LogPos | None) -> int | None:
        if pos is None:
            return None
        if pos.seq in self.base:
            return self.base[pos.seq] + pos.offset
        return self.total + pos.offset if not self.seqs or pos.seq > self.seqs[-1] else pos.offset


def _resource(e: _Entries, res: str, lamport: float) -> ResourceStatus:
    d = f"resource-{res}"
    size = e.integer(f"{d}/size", 0) or 0
    primary, handover_to, prev_primary, forced_primary = (_host(e.get(f"{d}/{name}")) for name in (
        "primary", "handover-to", "prev-primary", "forced-primary"))
    members = sorted(h for h, _ in e.names(d, "data-"))
    logs = _log_files(e, d)
    chain = _Chain(logs)
    # Every member's target is the primary's log end; while none is designated (a handover in
    # progress, or after 'marsadm secondary'), the last primary's: a demoted primary's log-pos
    # stays at its final position.
    source = primary or prev_primary
    log_end = LogPos.parse(e.get(f"{d}/actual-{source}/log-pos")) if source else None
    end_abs = chain.absolute(log_end)
    if end_abs is None:
        end_abs = chain.total
    # The primary publishes its log end once a round; a secondary may have fetched (or replayed)
    # past that figure since. The log end is at least the furthest any member got, so a rest is
    # never hidden by a stale figure.
    for h in members:
        for pos in (LogPos.parse(e.get(f"{d}/actual-{h}/fetch-pos")), _replay_pos(e.get(f"{d}/replay-{h}"))):
            if (where := chain.absolute(pos)) is not None:
                end_abs = max(end_abs, where)
    nodes = {h: _member(e, d, h, primary, source, size, chain, end_abs, log_end, lamport, h == forced_primary)
             for h in members}
    deletable, held = _deletable(logs, nodes)
    return ResourceStatus(
        name=res, size_bytes=size, primary=primary, nodes=nodes,
        logs=[logs[k] for k in sorted(logs)], log_end=log_end,
        split_brain=_split_brain(logs, _histories(e, d, logs), primary),
        deletable_logs=[logs[k].name for k in deletable], deletable_bytes=sum(logs[k].local_bytes or 0 for k in deletable),
        held_back_by=held, logs_deleted_below=e.integer(f"{d}/logs-deleted-below", 0) or 0,
        handover_to=handover_to, handover_age_s=e.age(f"{d}/handover-to", lamport) if handover_to else None,
        prev_primary=prev_primary, forced_primary=forced_primary, resize_from=e.integer(f"{d}/resize-from"))


def _host(value: str | None) -> str | None:
    """A host-valued entry (``primary``, ``handover-to``, ...): None for none (``(none)``)."""
    return None if value in (None, NONE, "") else value


def _replay_pos(value: str | None) -> LogPos | None:
    link = ReplayLink.parse(value)
    return link.logpos if link else None


def _rate(e: _Entries, path: str, running: bool) -> float | None:
    """A rate only while the transfer runs and at a speed: a stopped one has none, and the last
    seconds of a stopped one's moving average (a few bytes/s) are not a speed to divide by."""
    rate = e.real(path) if running else None
    return rate if rate is not None and rate >= MIN_RATE else None


def _member(e: _Entries, d: str, h: str, primary: str | None, source: str | None, size: int, chain: _Chain,
            end_abs: int, log_end: LogPos | None, lamport: float, forced: bool) -> NodeResource:
    a, td = f"{d}/actual-{h}", f"{d}/todo-{h}"
    sw = Switches(attach=e.flag(f"{td}/attach"), fetch=e.flag(f"{td}/connect"), sync=e.flag(f"{td}/sync"),
                  replay=e.flag(f"{td}/allow-replay"))
    act = Actual(attached=e.flag(f"{a}/is-attached"), primary=e.flag(f"{a}/is-primary"),
                 syncing=e.flag(f"{a}/is-syncing"), fetching=e.flag(f"{a}/is-copying"),
                 replaying=e.flag(f"{a}/is-replaying"), open_count=e.integer(f"{a}/open-count", 0) or 0)
    is_primary = h == primary
    # The primary is the sync source: complete by definition. A member without the entry is
    # the resource's creator (join-resource and invalidate always write one): complete too.
    syncpos = size if is_primary else e.integer(f"{d}/syncstatus-{h}", size) or 0
    code = ReplayCode.parse(e.get(f"{a}/replay-code"))
    sync = Progress(min(syncpos, size), size, _rate(e, f"{a}/amount-sync_rate", act.syncing),
                    e.age(f"{d}/syncstatus-{h}", lamport))
    link = ReplayLink.parse(e.get(f"{d}/replay-{h}"))
    fetch_pos = LogPos.parse(e.get(f"{a}/fetch-pos"))
    fetch_abs = end_abs if is_primary else chain.absolute(fetch_pos)  # the primary has its whole log
    replay_abs = chain.absolute(link.logpos) if link else None
    fetch = None if fetch_abs is None else Progress(
        min(fetch_abs, end_abs), end_abs, _rate(e, f"{a}/amount-file_rate", act.fetching),
        e.age(f"{a}/fetch-pos", lamport))
    replaying = act.replaying and not (code is not None and code.stopped)
    replay = None if replay_abs is None else Progress(
        min(replay_abs, end_abs), end_abs, _rate(e, f"{a}/amount-replay_rate", replaying),
        e.age(f"{d}/replay-{h}", lamport))
    if is_primary and replay is not None and log_end is None:
        replay = Progress(replay.pos_bytes, replay.pos_bytes, replay.rate_bytes_per_s)
    runs_with = e.integer(f"{a}/size")
    resize = _resize(e.integer(f"{d}/resize-from"), size, runs_with if is_primary else syncpos, sync)

    def lag(p: Progress | None, mine: str, primary_path: str) -> float | None:
        """As the original: the stamp of the primary's position minus ours, while behind."""
        if p is not None and p.reached:
            return 0.0
        s_mine, s_primary = e.stamps.get(mine), e.stamps.get(primary_path)
        if p is None or s_mine is None or s_primary is None:
            return None
        return max(0.0, s_primary - s_mine)

    return NodeResource(
        host=h, disk=e.get(f"{d}/data-{h}") or "", disk_bytes=e.integer(f"{d}/actsize-{h}"),
        designated_primary=is_primary, switches=sw, actual=act,
        sync=sync, fetch=fetch, replay=replay, replay_link=link, fetch_pos=fetch_pos,
        fetch_source=e.get(f"{a}/fetch-source"), replay_code=code,
        fetch_age_s=e.age(f"{a}/fetch-pos", lamport), replay_age_s=e.age(f"{d}/replay-{h}", lamport),
        fetch_lag_s=lag(fetch, f"{a}/fetch-pos", f"{d}/actual-{source}/log-pos"),
        replay_lag_s=lag(replay, f"{d}/replay-{h}", f"{d}/replay-{source}"),
        messages=_messages(e, a, h, d[len("resource-"):], lamport),
        connect_list=parse_hosts(e.get(f"{d}/connect-{h}")), forced=forced, size_bytes=runs_with, resize=resize)


def _resize(old: int | None, size: int, reached: int | None, sync: Progress) -> Progress | None:
    """The new region of the last resize as a progress from the old size to the new: on a
    secondary how far its sync got into it (a sync still below the old size is at 0), on the
    primary whether its export has the new size yet."""
    if old is None or old >= size:
        return None
    done = 0 if reached is None else max(0, min(reached, size) - old)
    return Progress(done, size - old, sync.rate_bytes_per_s, sync.moved_age_s)


def _deletable(logs: dict[tuple[int, str], LogFileStatus],
               nodes: dict[str, NodeResource]) -> tuple[list[tuple[int, str]], list[str]]:
    """The local log files every member has replayed, and the members that hold older ones back.

    Deletable: older than every member's replay position, never the newest. A member "holds them
    back" when it sits in the oldest needed file and does not move on by itself: replay switched
    off, stopped (marsd gave up on it), or detached (a lagging member catches up by itself).
    """
    local_logs = sorted(k for k, f in logs.items() if f.local_bytes is not None)
    if not local_logs or not nodes:
        return [], []
    newest = local_logs[-1][0]
    known = [n.replay_link.seq for n in nodes.values() if n.replay_link]
    oldest = min(known) if len(known) == len(nodes) else 0
    deletable = [k for k in local_logs if k[0] < oldest and k[0] < newest]
    held = []
    for h, n in nodes.items():
        lk = n.replay_link
        stuck = not n.switches.replay or n.replay_stopped or not n.switches.attach
        if (lk is None or (lk.seq == oldest and oldest < newest)) and stuck and not n.designated_primary:
            held.append(h)
    return deletable, held
