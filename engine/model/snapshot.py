"""The status model: one typed snapshot of the cluster, built in one place, rendered by every face.

Why one builder: `marsadm view`, mars-status, the Prometheus and Zabbix exporters and the Nagios
check must never disagree about a node. They all call :func:`build` (or read its JSON from the
control socket) and render; none of them reads the tree or computes a verdict of its own.

The snapshot is built from the local tree alone, which holds every node's replicated entries
(``actual-<host>/…`` is what that node reported, with its Lamport stamp), plus the local log
files' sizes, plus, when marsd runs, its live figures (debug lines). So it also works when marsd
is down, and says so (``marsd_running``). One pass over the tree (one ``readlink`` + ``lstat`` per
entry) feeds everything; the rest is dictionary work, which keeps 8 nodes × 50 resources fast.

Units are in the names: ``_bytes``, ``_s`` (seconds), ``_bytes_per_s``; Lamport times are
seconds since the epoch as floats.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import __version__
from ..errors import MarsError
from ..log.files import ReplayLink, parse_log_name
from ..trigger import marsd_running
from ..tree import DELETED, LOCAL_DIRS, NONE

ALIVE_WINDOW_S = 30.0  # a node whose last report is older than this is not alive (the original: 30 s in mars-status)
ALMOST_EMPTY = 0  # rests at or below this many bytes count as reached


@dataclass(frozen=True)
class Progress:
    """A position moving towards a target: sync, fetch, replay."""

    pos_bytes: int
    size_bytes: int
    rate_bytes_per_s: float | None = None

    @property
    def rest_bytes(self) -> int:
        return max(0, self.size_bytes - self.pos_bytes)

    @property
    def percent(self) -> float:
        if self.size_bytes <= 0:
            return 100.0
        return min(100.0, 100.0 * self.pos_bytes / self.size_bytes)

    @property
    def reached(self) -> bool:
        return self.rest_bytes <= ALMOST_EMPTY

    @property
    def remaining_s(self) -> float | None:
        """Time left at the current rate; None when nothing moves (unknown, not zero)."""
        if self.reached:
            return 0.0
        if not self.rate_bytes_per_s:
            return None
        return self.rest_bytes / self.rate_bytes_per_s

    def to_json(self) -> dict[str, Any]:
        return {"pos_bytes": self.pos_bytes, "size_bytes": self.size_bytes, "rest_bytes": self.rest_bytes,
                "percent": round(self.percent, 2), "rate_bytes_per_s": self.rate_bytes_per_s,
                "remaining_s": self.remaining_s}


@dataclass(frozen=True)
class Message:
    """A message a node wrote into the tree (``msg-<class>-<key>``), or a link error."""

    node: str
    res: str | None
    level: str  # "err", "warn", "inf"
    key: str
    text: str
    age_s: float


@dataclass(frozen=True)
class Switches:
    """What the operator wants (``todo-<host>/…``): attach, connect (fetch), sync, allow-replay."""

    attach: bool
    fetch: bool
    sync: bool
    replay: bool


@dataclass(frozen=True)
class Actual:
    """What the node reports doing (``actual-<host>/is-…``)."""

    attached: bool
    primary: bool
    syncing: bool
    fetching: bool
    replaying: bool
    open_count: int


@dataclass(frozen=True)
class LogVersion:
    """One node's ``version-<seq>-<host>``: the digest of a finished log file, chained."""

    host: str
    digest: str
    origin: str
    length_bytes: int
    prev_digest: str


@dataclass
class LogFileStatus:
    seq: int
    origin: str
    local_bytes: int | None  # size of this node's copy; None when it has none
    versions: dict[str, LogVersion] = field(default_factory=dict)  # by host

    @property
    def name(self) -> str:
        return f"log-{self.seq:09d}-{self.origin}"


@dataclass(frozen=True)
class SplitBrain:
    """Two histories for the same log number: different origins or different digests."""

    seq: int
    digests: dict[str, str]  # host -> "<origin>:<digest>"


@dataclass
class NodeResource:
    """One member of one resource, as that member reported it."""

    host: str
    disk: str
    disk_bytes: int | None  # the data device's size as its node last saw it (actsize-<host>)
    designated_primary: bool
    switches: Switches
    actual: Actual
    sync: Progress
    fetch: Progress | None
    replay: Progress | None
    replay_link: str | None
    fetch_pos: str | None
    fetch_source: str | None
    replay_code: str | None
    fetch_age_s: float | None  # since the fetch position last moved
    replay_age_s: float | None  # since the replay position last moved
    fetch_lag_s: float | None  # how much older its fetch position is than the primary's log end (0 when none left)
    replay_lag_s: float | None  # how much older its replay position is than the primary's (0 when none left)
    messages: list[Message]

    @property
    def role(self) -> str:
        if self.actual.primary:
            return "Primary"
        if self.designated_primary:
            return "NotYetPrimary"
        return "Secondary"

    @property
    def consistent(self) -> bool:
        return self.sync.reached and self.replay_link is not None and not self.replay_stopped

    @property
    def replay_stopped(self) -> bool:
        """Replay stopped on a damaged record: ``-1,<code>,<offset>``. A bare ``-1`` is a failed
        attach (its message says why), not a statement about the log."""
        return bool(self.replay_code and self.replay_code.startswith("-") and "," in self.replay_code)


@dataclass
class ResourceStatus:
    name: str
    size_bytes: int
    primary: str | None
    nodes: dict[str, NodeResource]
    logs: list[LogFileStatus]
    log_end: str | None  # the primary's acknowledged log end (``actual-<primary>/log-pos``)
    split_brain: list[SplitBrain]
    deletable_logs: list[str]
    deletable_bytes: int
    held_back_by: list[str]  # members whose replay position keeps older logs from being deletable
    logs_deleted_below: int

    @property
    def members(self) -> list[str]:
        return sorted(self.nodes)


@dataclass(frozen=True)
class Tunable:
    name: str
    set_value: str | None  # what the tree asks for (defaults-<host>/<name>), None when not set
    actual_value: str | None  # what the running marsd uses


@dataclass
class NodeStatus:
    host: str
    ip: str | None
    alive: bool
    seen_age_s: float | None  # since its last report (actual-<host>/time)
    version: str | None
    rest_space_bytes: int | None
    total_space_bytes: int | None
    emergency: bool  # actual-<host>/emergency (no emergency mode exists yet: always False)
    link_errors: dict[str, str]  # peer -> why this node cannot reach it (msg-peer-<peer>)
    tunables: list[Tunable]


@dataclass
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

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; progress objects with their derived figures (percent, rest, time left)."""
        def conv(o: Any) -> Any:
            if isinstance(o, Progress):
                return o.to_json()
            if isinstance(o, dict):
                return {k: conv(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [conv(v) for v in o]
            if hasattr(o, "__dataclass_fields__"):
                d = {k: conv(getattr(o, k)) for k in o.__dataclass_fields__}
                for extra in ("role", "consistent", "replay_stopped", "members", "name"):
                    if extra not in d and isinstance(getattr(type(o), extra, None), property):
                        d[extra] = conv(getattr(o, extra))
                return d
            return o
        return conv(self)


# --- building -------------------------------------------------------------------------------

class _Entries:
    """The tree as dicts: path -> value, directory -> entries, and the stamps (s) that ages need."""

    def __init__(self, root: Path) -> None:
        self.values: dict[str, str] = {}
        self.dirs: dict[str, dict[str, str]] = {}  # directory -> entry name -> value: no scans of everything
        self.stamps: dict[str, float] = {}
        self.files: dict[str, dict[str, int]] = {}  # directory -> regular file name -> size
        self.newest = 0.0
        self._read(str(root), "")

    def _read(self, full: str, rel: str) -> None:
        try:
            it = os.scandir(full)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        with it:
            for de in it:
                name = de.name
                if name.startswith(".tmp"):
                    continue
                path = f"{rel}/{name}" if rel else name
                if de.is_symlink():
                    try:
                        value = os.readlink(de.path)
                        # Stamps only where an age is shown: an lstat per entry is half the cost.
                        stamp = de.stat(follow_symlinks=False).st_mtime_ns / 1e9 if _aged(name) else None
                    except OSError:
                        continue
                    if value == DELETED:
                        continue
                    self.values[path] = value
                    self.dirs.setdefault(rel, {})[name] = value
                    if stamp is not None:
                        self.stamps[path] = stamp
                        if stamp > self.newest:
                            self.newest = stamp
                elif de.is_dir(follow_symlinks=False):
                    if not rel and name in LOCAL_DIRS:
                        continue
                    self._read(de.path, path)
                elif name.startswith("log-") and rel.startswith("resource-"):
                    try:
                        self.files.setdefault(rel, {})[name] = de.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass

    def get(self, path: str) -> str | None:
        return self.values.get(path)

    def names(self, directory: str, prefix: str) -> list[tuple[str, str]]:
        """(name without prefix, value) of the entries in ``directory`` whose names start with ``prefix``."""
        n = len(prefix)
        return [(k[n:], v) for k, v in self.dirs.get(directory, {}).items() if k.startswith(prefix)]

    def int(self, path: str, default: int | None = None) -> int | None:
        v = self.values.get(path)
        if v is None:
            return default
        try:
            return int(v)
        except ValueError:
            return default

    def flag(self, path: str) -> bool:
        return self.values.get(path) == "1"


def _aged(name: str) -> bool:
    """Entries whose age the snapshot shows; ``time`` (every node's, every round) also keeps
    the Lamport clock current, since it is the newest stamp in any live tree."""
    return name in ("time", "fetch-pos", "log-pos") or name.startswith(("replay-", "msg-"))


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None


def _parse_pos(v: str | None) -> tuple[int, str, int] | None:
    """``log-N-<origin>,<bytes>[,...]`` -> (seq, origin, bytes)."""
    if not v:
        return None
    parts = v.split(",")
    p = parse_log_name(parts[0])
    if p is None or len(parts) < 2:
        return None
    try:
        return p[0], p[1], int(parts[1])
    except ValueError:
        return None


def _parse_version(host: str, v: str) -> LogVersion | None:
    """``<digest>,log-N-<origin>,<len>:<prev digest>,…``."""
    try:
        head, _, prev = v.partition(":")
        digest, name, length = head.split(",")
        p = parse_log_name(name)
        if p is None:
            return None
        return LogVersion(host, digest, p[1], int(length), prev.split(",", 1)[0])
    except ValueError:
        return None


def build(mars_dir: str | os.PathLike[str], host: str, *, window_s: float = ALIVE_WINDOW_S,
          debug_lines: list[str] | None = None, now_s: float | None = None) -> Snapshot:
    """The snapshot of everything this node's tree knows, as of now."""
    root = Path(mars_dir)
    e = _Entries(root)
    wall = time.time() if now_s is None else now_s
    lamport = max(wall, e.newest)
    pid = marsd_running(root, host)

    hosts = sorted({h for h, _ in e.names("ips", "ip-")} |
                   {d[len("actual-"):] for d in e.dirs if d.startswith("actual-") and "/" not in d})
    nodes = {h: _node(e, h, host, lamport, window_s) for h in hosts}
    resources = {}
    for d in sorted(d for d in e.dirs if d.startswith("resource-") and "/" not in d):
        res = d[len("resource-"):]
        if e.get(f"{d}/size") is not None:
            resources[res] = _resource(e, res, host, lamport)
    return Snapshot(local_host=host, mars_dir=str(root), taken_at_s=wall, lamport_s=lamport, clock_slip_s=lamport - wall,
                    tool_version=__version__, marsd_running=pid is not None, marsd_pid=pid,
                    cluster_uuid=e.get("uuid"), window_s=window_s, nodes=nodes, resources=resources,
                    debug_lines=list(debug_lines or []))


def _node(e: _Entries, h: str, local: str, lamport: float, window_s: float) -> NodeStatus:
    a = f"actual-{h}"
    t_path = f"{a}/time"
    reported = _float(e.get(t_path))
    seen_age = None if reported is None else max(0.0, lamport - reported)
    link_errors = dict(e.names(a, "msg-peer-"))
    tunables = []
    names = sorted(n for n, _ in e.names(a, "tunable-"))
    for n in names:
        tunables.append(Tunable(n, e.get(f"defaults-{h}/{n}") or e.get(f"defaults/{n}"), e.get(f"{a}/tunable-{n}")))
    return NodeStatus(
        host=h, ip=e.get(f"ips/ip-{h}"), alive=seen_age is not None and seen_age <= window_s,
        seen_age_s=seen_age,
        version=e.get(f"{a}/version"), rest_space_bytes=e.int(f"{a}/rest-space"),
        total_space_bytes=e.int(f"{a}/total-space"), emergency=e.flag(f"{a}/emergency"), link_errors=link_errors, tunables=tunables)


def _messages(e: _Entries, directory: str, node: str, res: str | None, lamport: float) -> list[Message]:
    """``msg-<level>-<what>`` entries of one actual directory; "OK" means cleared."""
    out = []
    for key, v in e.names(directory, "msg-"):
        if v != "OK" and not key.startswith("peer-"):
            stamp = e.stamps.get(f"{directory}/msg-{key}", lamport)
            out.append(Message(node, res, key.split("-", 1)[0], key, v, max(0.0, lamport - stamp)))
    return sorted(out, key=lambda m: m.key)


def _resource(e: _Entries, res: str, local: str, lamport: float) -> ResourceStatus:
    d = f"resource-{res}"
    size = e.int(f"{d}/size", 0) or 0
    primary = e.get(f"{d}/primary")
    primary = None if primary in (None, NONE, "") else primary
    members = sorted(h for h, _ in e.names(d, "data-"))

    # Log files: local copies, and every node's version entries.
    logs: dict[tuple[int, str], LogFileStatus] = {}
    for name, nbytes in e.files.get(d, {}).items():
        p = parse_log_name(name)
        if p is not None:
            logs[p] = LogFileStatus(p[0], p[1], nbytes)
    by_seq: dict[int, dict[str, LogVersion]] = {}
    for name, v in e.names(d, "version-"):
        seq_s, _, h = name.partition("-")
        ver = _parse_version(h, v)
        if ver is None or not seq_s.isdigit():
            continue
        seq = int(seq_s)
        by_seq.setdefault(seq, {})[h] = ver
        logs.setdefault((seq, ver.origin), LogFileStatus(seq, ver.origin, None)).versions[h] = ver
    split = []
    for seq, vers in sorted(by_seq.items()):
        kinds = {f"{v.origin}:{v.digest}" for v in vers.values()}
        if len(kinds) > 1:
            split.append(SplitBrain(seq, {h: f"{v.origin}:{v.digest}" for h, v in sorted(vers.items())}))
    origins_by_seq: dict[int, set[str]] = {}
    for seq, origin in logs:
        origins_by_seq.setdefault(seq, set()).add(origin)
    for seq, origins in sorted(origins_by_seq.items()):
        if len(origins) > 1 and not any(s.seq == seq for s in split):
            split.append(SplitBrain(seq, {o: f"{o}:log file" for o in sorted(origins)}))

    # Absolute positions: bytes from the first known log, using finished lengths where known.
    lengths: dict[int, int] = {}
    for (seq, origin), f in logs.items():
        ver = f.versions.get(origin) or next(iter(f.versions.values()), None)
        if ver is not None:
            lengths[seq] = ver.length_bytes
        elif f.local_bytes is not None:
            lengths.setdefault(seq, f.local_bytes)
    seqs = sorted(lengths)
    base: dict[int, int] = {}
    acc = 0
    for s in seqs:
        base[s] = acc
        acc += lengths[s]

    def absolute(pos: tuple[int, str, int] | None) -> int | None:
        if pos is None:
            return None
        seq, _, off = pos
        if seq in base:
            return base[seq] + off
        return acc + off if not seqs or seq > seqs[-1] else off

    log_end_v = e.get(f"{d}/actual-{primary}/log-pos") if primary else None
    end_pos = _parse_pos(log_end_v)
    end_abs = absolute(end_pos)
    if end_abs is None:
        end_abs = acc

    nodes: dict[str, NodeResource] = {}
    for h in members:
        a = f"{d}/actual-{h}"
        td = f"{d}/todo-{h}"
        sw = Switches(attach=e.flag(f"{td}/attach"), fetch=e.flag(f"{td}/connect"), sync=e.flag(f"{td}/sync"),
                      replay=e.flag(f"{td}/allow-replay"))
        act = Actual(attached=e.flag(f"{a}/is-attached"), primary=e.flag(f"{a}/is-primary"),
                     syncing=e.flag(f"{a}/is-syncing"), fetching=e.flag(f"{a}/is-copying"),
                     replaying=e.flag(f"{a}/is-replaying"), open_count=e.int(f"{a}/open-count", 0) or 0)
        is_primary = h == primary
        # The primary is the sync source: complete by definition. A member without the entry is
        # the resource's creator (join-resource and invalidate always write one): complete too.
        syncpos = size if is_primary else e.int(f"{d}/syncstatus-{h}", size)
        sync = Progress(min(syncpos, size), size, _float(e.get(f"{a}/amount-sync_rate")))
        replay_v = e.get(f"{d}/replay-{h}")
        link = ReplayLink.parse(replay_v)
        replay_abs = absolute((link.seq, link.origin, link.pos)) if link else None
        fetch_v = e.get(f"{a}/fetch-pos")
        if is_primary:
            fetch_abs = end_abs  # the primary has its whole log
        else:
            fetch_abs = absolute(_parse_pos(fetch_v))
        fetch = None if fetch_abs is None else Progress(min(fetch_abs, end_abs), end_abs,
                                                       _float(e.get(f"{a}/amount-file_rate")))
        replay = None if replay_abs is None else Progress(min(replay_abs, end_abs), end_abs,
                                                          _float(e.get(f"{a}/amount-replay_rate")))
        if is_primary and replay is not None and log_end_v is None:
            replay = Progress(replay.pos_bytes, replay.pos_bytes, replay.rate_bytes_per_s)

        def age(path: str) -> float | None:
            s = e.stamps.get(path)
            return None if s is None else max(0.0, lamport - s)

        def lag(p: Progress | None, mine: str, primary_path: str) -> float | None:
            """As the original: the stamp of the primary's position minus ours, while behind."""
            if p is not None and p.reached:
                return 0.0
            s_mine, s_primary = e.stamps.get(mine), e.stamps.get(primary_path)
            if p is None or s_mine is None or s_primary is None:
                return None
            return max(0.0, s_primary - s_mine)
        nodes[h] = NodeResource(
            host=h, disk=e.get(f"{d}/data-{h}") or "", disk_bytes=e.int(f"{d}/actsize-{h}"),
            designated_primary=is_primary, switches=sw, actual=act,
            sync=sync, fetch=fetch, replay=replay, replay_link=replay_v, fetch_pos=fetch_v,
            fetch_source=e.get(f"{a}/fetch-source"), replay_code=e.get(f"{a}/replay-code"),
            fetch_age_s=age(f"{a}/fetch-pos"), replay_age_s=age(f"{d}/replay-{h}"),
            fetch_lag_s=lag(fetch, f"{a}/fetch-pos", f"{d}/actual-{primary}/log-pos"),
            replay_lag_s=lag(replay, f"{d}/replay-{h}", f"{d}/replay-{primary}"),
            messages=_messages(e, a, h, res, lamport))

    # Deletable logs: older than every member's replay position, never the newest. A member
    # "holds them back" when it sits in the oldest needed file and does not move on by itself:
    # replay switched off, stopped on a bad record, or detached (a lagging member catches up).
    local_logs = sorted(k for k, f in logs.items() if f.local_bytes is not None)
    links = {h: ReplayLink.parse(e.get(f"{d}/replay-{h}")) for h in members}
    deletable: list[str] = []
    held: list[str] = []
    if local_logs and members:
        newest = local_logs[-1][0]
        known = [lk.seq for lk in links.values() if lk]
        oldest = min(known) if len(known) == len(links) else 0
        deletable = [logs[k].name for k in local_logs if k[0] < oldest and k[0] < newest]
        for h, lk in links.items():
            n = nodes[h]
            stuck = not n.switches.replay or n.replay_stopped or not n.switches.attach
            if (lk is None or (lk.seq == oldest and oldest < newest)) and stuck and not n.designated_primary:
                held.append(h)
    deletable_bytes = sum(logs[k].local_bytes or 0 for k in local_logs if logs[k].name in deletable)
    return ResourceStatus(
        name=res, size_bytes=size, primary=primary, nodes=nodes,
        logs=[logs[k] for k in sorted(logs)], log_end=log_end_v, split_brain=split,
        deletable_logs=deletable, deletable_bytes=deletable_bytes, held_back_by=held,
        logs_deleted_below=e.int(f"{d}/logs-deleted-below", 0) or 0)
