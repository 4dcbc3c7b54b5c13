"""Findings: the one verdict on a snapshot, rendered by every face.

Why one pure function: ``marsadm view``, mars-status, the Prometheus and Zabbix exporters and
``check_mars`` must never disagree about whether something is wrong. They all call
:func:`findings` on the same :class:`~mars.engine.model.Snapshot` and render the result; none of
them computes a verdict of its own. So every rule lives here, once, as data (:data:`CODES`) plus
one small function per concern.

Three levels (DESIGN.md, "One status model, many faces"):

* ``WORK``: the system is working and will finish by itself (sync, fetch, replay in progress).
* ``TODO``: something is wrong and needs an operator (a node is down, log versions differ).
* ``HINT``: an operator may want to act (old logs can be deleted, a switch is off).

Rules of this module:

* Pure: no I/O, no clock. Ages come from the snapshot (``seen_age_s``, ``clock_slip_s``).
* Total: a snapshot with missing parts (``None`` where a value is expected, a progress without
  figures, a member without switches) yields fewer findings, never an exception. An unknown
  value never triggers a rule: "switch off" means the snapshot says off, not that it says nothing.
* Deterministic: the result is sorted by level (:data:`LEVELS`), resource, node, code, text.
* One finding per (code, res, node): that triple is a finding's identity across snapshots (the
  control socket raises and clears by it), so several causes of one kind join into one text.
* Every finding names its figures with units and, for TODO and HINT, the exact command to run
  and where (``'marsadm resume-replay r' on b``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..peer.protocol import DEFAULT_PORT as DEFAULT_PEER_PORT
from .snapshot import ALMOST_EMPTY, Snapshot
from .units import figure as _num
from .units import human_bytes, human_seconds

__all__ = ["Finding", "CODES", "LEVELS", "findings", "worst"]

LEVELS = ("TODO", "HINT", "WORK")  # severity order: what sorts first is the most urgent

GiB = 1 << 30
SPACE_LOW_FRACTION = 0.10  # below this share of /mars free (or below SPACE_LOW_BYTES): TODO
SPACE_LOW_BYTES = 1 * GiB
SPACE_WARN_FRACTION = 0.20  # below this share free: HINT

CODES: dict[str, tuple[str, str]] = {
    # WORK: in progress, finishes by itself.
    "SYNC_RUNNING": ("WORK", "a member's full sync has bytes left and is switched on or running, on a live node"),
    "FETCH_RUNNING": ("WORK", "a synced secondary on a live node is fetching the log, with bytes left to fetch"),
    "REPLAY_RUNNING": ("WORK", "a synced secondary on a live node is replaying the log, with bytes left to replay"),
    # TODO: wrong, needs an operator.
    "MARSD_DOWN": ("TODO", "marsd is not running on this host; the status is what the tree last knew"),
    "NODE_DOWN": ("TODO", "a node has not reported within the alive window (or never did)"),
    "PEER_UNREACHABLE": ("TODO", "a live node reports that it cannot reach a peer"),
    "REPLAY_STOPPED": ("TODO", "replay stopped on a member (replay code < 0), usually at a damaged log record"),
    "SPLIT_BRAIN": ("TODO", "members hold different histories for the same log number"),
    "ATTACH_FAILED": ("TODO", "marsd could not attach the resource on a member (msg-err-attach)"),
    "FETCH_FAILING": ("TODO", "a member with fetch switched on reports a fetch error (msg-warn-fetch)"),
    "NO_PRIMARY": ("TODO", "a resource has no designated primary: nothing serves it"),
    "PRIMARY_NOT_MEMBER": ("TODO", "a resource's designated primary is not one of its members"),
    "PRIMARY_NOT_SERVING": ("TODO", "the designated primary is alive with attach on, but does not serve"),
    "SPACE_LOW": ("TODO", "a live node has less than 10 % or less than 1 GiB free in its MARS directory"),
    "EMERGENCY": ("TODO", "a node is in emergency mode (its MARS directory ran full)"),
    # HINT: an operator may want to act.
    "SPACE_WARN": ("HINT", "a live node has 10-20 % free in its MARS directory (and at least 1 GiB)"),
    "SYNC_PAUSED": ("HINT", "an attached secondary's sync is switched off with bytes left"),
    "FETCH_PAUSED": ("HINT", "an attached secondary's fetch (connect) is switched off"),
    "REPLAY_PAUSED": ("HINT", "an attached secondary's replay is switched off"),
    "DETACHED": ("HINT", "a member's attach switch is off"),
    "LOGS_DELETABLE": ("HINT", "log files replayed by every member can be deleted"),
    "LOGS_HELD_BACK": ("HINT", "a member's replay position keeps older log files from being deletable"),
    "RESIZE_POSSIBLE": ("HINT", "every member's disk is larger than the resource"),
    "CLOCK_SLIP": ("HINT", "the Lamport clock runs ahead of this host's wall clock by more than the alive window"),
    "MARSD_VERSIONS_DIFFER": ("HINT", "live nodes run different marsd versions"),
}


@dataclass(frozen=True)
class Finding:
    """One verdict. Invalid ones cannot exist: the level must be the one :data:`CODES` gives."""

    level: str  # "WORK" | "TODO" | "HINT"
    code: str  # stable code, UPPER_SNAKE, listed in CODES
    res: str | None  # resource, None for node/cluster-level
    node: str | None  # the node it is about, None for resource/cluster-level
    text: str  # one sentence for an operator, with figures and units
    remedy: str  # what to do, naming the exact command; "" for WORK

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"finding level {self.level!r} is not one of {', '.join(LEVELS)}")
        entry = CODES.get(self.code)
        if entry is None:
            raise ValueError(f"finding code {self.code!r} is not in CODES")
        if entry[0] != self.level:
            raise ValueError(f"finding code {self.code} is a {entry[0]}, not a {self.level}")

    @property
    def where(self) -> str:
        """``res@node``, ``res``, ``@node`` or ``cluster``: what the finding is about."""
        if self.res is not None:
            return f"{self.res}@{self.node}" if self.node is not None else self.res
        return f"@{self.node}" if self.node is not None else "cluster"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types: the control socket's, ``marsadm view --json``'s and the exporters' form."""
        return {"level": self.level, "code": self.code, "res": self.res, "node": self.node, "text": self.text,
                "remedy": self.remedy}

    def line(self) -> str:
        """One line, readable without colour: ``TODO REPLAY_STOPPED r@b: <text>; <remedy>``."""
        head = f"{self.level} {self.code} {self.where}: {self.text}"
        return f"{head}; {self.remedy}" if self.remedy else head


def worst(fs: Iterable[Finding]) -> str | None:
    """The most urgent level present ("TODO" before "HINT" before "WORK"), None for no findings."""
    present = {f.level for f in fs}
    return next((lv for lv in LEVELS if lv in present), None)


# --- figures ---------------------------------------------------------------------------------

def _percent(pos: float, size: float, rest: float) -> str:
    """As Progress.percent, but never shows 100.0 % while bytes are left (or 0.0 % with some done)."""
    pct = 100.0 if size <= 0 else min(100.0, max(0.0, 100.0 * pos / size))
    if rest > 0 and pct >= 99.95:
        pct = 99.9
    return f"{pct:.1f} %"


@dataclass(frozen=True)
class _Figures:
    """A progress's figures, read defensively (any field may be missing)."""

    pos: float
    size: float
    rest: float
    rate: float | None

    @property
    def reached(self) -> bool:
        return self.rest <= ALMOST_EMPTY

    def describe(self, left: str = "left") -> str:
        """``42.0 % (1.2 GiB left, 35.0 MiB/s, about 36 s left)``."""
        parts = [f"{human_bytes(self.rest)} {left}"]
        if self.rate is None:
            parts.append("rate unknown")
        elif self.rate <= 0:
            parts.append("not moving")
        else:
            parts.append(f"{human_bytes(self.rate)}/s, about {human_seconds(self.rest / self.rate)} left")
        return f"{_percent(self.pos, self.size, self.rest)} ({', '.join(parts)})"


def _figures(p: Any) -> _Figures | None:
    pos, size = _num(getattr(p, "pos_bytes", None)), _num(getattr(p, "size_bytes", None))
    if pos is None or size is None:
        return None
    rate = _num(getattr(p, "rate_bytes_per_s", None))
    return _Figures(pos, size, max(0.0, size - pos), rate)


# --- defensive access ------------------------------------------------------------------------

def _flag(obj: Any, name: str) -> bool | None:
    """A switch or actual flag: True, False, or None when the snapshot does not say."""
    v = getattr(obj, name, None) if obj is not None else None
    return None if v is None else bool(v)


def _items(d: Any) -> list[tuple[str, Any]]:
    """A dict's (str key, value) pairs in key order; nothing for a missing dict.

    A key with a None value stays: a member or node whose details are missing still exists.
    """
    if not isinstance(d, dict):
        return []
    return sorted(((str(k), v) for k, v in d.items() if k is not None), key=lambda kv: kv[0])


def _list(v: Any) -> list[Any]:
    return [x for x in v if x is not None] if isinstance(v, (list, tuple)) else []


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def _messages(nr: Any, prefix: str) -> list[str]:
    """Texts of a member's messages whose key starts with ``prefix`` (key order)."""
    out = []
    for m in sorted(_list(getattr(nr, "messages", None)), key=lambda m: _str(getattr(m, "key", None))):
        if _str(getattr(m, "key", None)).startswith(prefix):
            out.append(_str(getattr(m, "text", None)) or "(no text)")
    return out


def _alive(snap: Snapshot, host: str) -> bool | None:
    ns = _nodes(snap).get(host)
    return None if ns is None else _flag(ns, "alive")


def _nodes(snap: Snapshot) -> dict[str, Any]:
    return dict(_items(getattr(snap, "nodes", None)))


def _resources(snap: Snapshot) -> list[tuple[str, Any]]:
    return [(r, rs) for r, rs in _items(getattr(snap, "resources", None)) if rs is not None]


def _members(rs: Any) -> list[tuple[str, Any]]:
    return _items(getattr(rs, "nodes", None))


def _primary(rs: Any) -> str | None:
    p = getattr(rs, "primary", None)
    return str(p) if p else None


def _is_primary(rs: Any, host: str, nr: Any) -> bool:
    return host == _primary(rs) or getattr(nr, "designated_primary", None) is True


def _replay_stopped(nr: Any) -> bool:
    code = getattr(nr, "replay_code", None)
    return isinstance(code, str) and code.startswith("-")


def _cmd(command: str, host: str | None) -> str:
    return f"'marsadm {command}' on {host}" if host else f"'marsadm {command}'"


# --- rules -----------------------------------------------------------------------------------
# One generator per concern; each yields Findings and reads the snapshot only through the
# defensive helpers above, so a missing part silences a rule instead of breaking the function.

def _work(snap: Snapshot) -> Iterator[Finding]:
    for res, rs in _resources(snap):
        primary = _primary(rs)
        for h, nr in _members(rs):
            if _alive(snap, h) is not True:
                continue  # a dead node does no work; NODE_DOWN says so
            sw, act = getattr(nr, "switches", None), getattr(nr, "actual", None)
            sync = _figures(getattr(nr, "sync", None))
            if sync is not None and not sync.reached and (_flag(act, "syncing") or _flag(sw, "sync")):
                text = f"sync of {res} on {h} at {sync.describe()}"
                if not _flag(act, "syncing"):
                    text += ", not running yet (waiting for attach or the host's sync limit)"
                yield Finding("WORK", "SYNC_RUNNING", res, h, text, "")
            if _is_primary(rs, h, nr) or sync is None or not sync.reached:
                continue  # fetch and replay follow the sync (replay never runs during a sync)
            fetch = _figures(getattr(nr, "fetch", None))
            if fetch is not None and fetch.rest > 0 and _flag(sw, "fetch"):
                src = _str(getattr(nr, "fetch_source", None)) or primary or "the primary"
                yield Finding("WORK", "FETCH_RUNNING", res, h,
                              f"fetch of {res} on {h} from {src} at {fetch.describe('behind the log end')}", "")
            replay = _figures(getattr(nr, "replay", None))
            if replay is not None and replay.rest > 0 and _flag(sw, "replay") and not _replay_stopped(nr):
                yield Finding("WORK", "REPLAY_RUNNING", res, h,
                              f"replay of {res} on {h} at {replay.describe('behind the log end')}", "")


def _cluster(snap: Snapshot) -> Iterator[Finding]:
    local = _str(getattr(snap, "local_host", None)) or None
    mars_dir = _str(getattr(snap, "mars_dir", None)) or "/mars"
    marsd_down = getattr(snap, "marsd_running", None) is False
    if marsd_down:
        yield Finding("TODO", "MARSD_DOWN", None, local,
                      f"marsd is not running on {local or 'this host'}, so what is shown is what the tree in "
                      f"{mars_dir} last knew",
                      f"start marsd on {local or 'this host'}: 'systemctl start marsd', or "
                      f"'marsd --mars-dir {mars_dir}" + (f" --host {local}'" if local else "'"))

    slip, window = _num(getattr(snap, "clock_slip_s", None)), _num(getattr(snap, "window_s", None))
    if slip is not None and window is not None and slip > window:
        yield Finding("HINT", "CLOCK_SLIP", None, local,
                      f"the Lamport clock runs {human_seconds(slip)} ahead of the wall clock of "
                      f"{local or 'this host'}, more than the {human_seconds(window)} alive window: "
                      f"some node's clock is fast (or this one's is slow), so nodes may look dead or alive wrongly",
                      "synchronise the clocks of all nodes with NTP (chrony or systemd-timesyncd) "
                      "and compare 'date' on each node")

    nodes = _nodes(snap)
    membership: dict[str, list[str]] = {}
    for res, rs in _resources(snap):
        for h, _ in _members(rs):
            membership.setdefault(h, []).append(res)
    versions: dict[str, list[str]] = {}
    for h in sorted(set(nodes) | set(membership)):
        ns = nodes.get(h)
        alive = None if ns is None else _flag(ns, "alive")
        if ns is None or alive is False:
            if not (marsd_down and h == local):
                yield _node_down(snap, h, ns, membership.get(h, []))
        if ns is None:
            continue
        if _flag(ns, "emergency"):
            yield Finding("TODO", "EMERGENCY", None, h,
                          f"{h} is in emergency mode: its MARS directory ran full and its log stopped",
                          f"free space on {h} ({_cmd('log-delete-all all', h)}), then run 'marsadm invalidate "
                          f"<res>' on every secondary that fell behind")
        if alive is not True:
            continue
        unreachable = _items(getattr(ns, "link_errors", None))
        if unreachable:
            addrs = []
            for peer, _ in unreachable:
                pns = nodes.get(peer)
                ip = _str(getattr(pns, "ip", None))
                port = next((_str(getattr(t, "actual_value", None)) for t in _list(getattr(pns, "tunables", None))
                             if getattr(t, "name", None) == "port" and getattr(t, "actual_value", None)),
                            str(DEFAULT_PEER_PORT))
                addrs.append(f"{ip}:{port}" if ip else f"{peer} on port {port}")
            peers = [p for p, _ in unreachable]
            yield Finding("TODO", "PEER_UNREACHABLE", None, h,
                          f"{h} cannot reach " + ", and ".join(f"{p}: {_str(err)}" for p, err in unreachable),
                          f"check that marsd runs on {' and '.join(peers)} and that {h} can reach "
                          f"{' and '.join(addrs)} (firewall, routing, the ips/ip-<node> entries)")
        yield from _space(h, ns)
        version = getattr(ns, "version", None)
        if version:
            versions.setdefault(str(version), []).append(h)
    if len(versions) > 1:
        parts = [f"{v} ({', '.join(hs)})" for v, hs in sorted(versions.items())]
        yield Finding("HINT", "MARSD_VERSIONS_DIFFER", None, None,
                      f"live nodes run different marsd versions: {', '.join(parts)}",
                      "finish the upgrade: install the same MARS version on every node and restart marsd there, "
                      "one node at a time")


def _node_down(snap: Snapshot, h: str, ns: Any, resources: list[str]) -> Finding:
    age = _num(getattr(ns, "seen_age_s", None))
    window = _num(getattr(snap, "window_s", None))
    if ns is None:
        text = f"node {h} has never reported (it has no node entries)"
    elif age is None:
        text = f"node {h} has never reported"
    else:
        text = f"node {h} has not reported for {human_seconds(age)}"
        if window is not None:
            text += f" (alive window {human_seconds(window)})"
    if resources:
        text += f", member of {', '.join(resources)}"
    gone = [f"'marsadm leave-resource {r} --host {h} --force'" for r in resources]
    gone.append(f"'marsadm leave-cluster --host {h} --force'")
    ip = _str(getattr(ns, "ip", None))
    return Finding("TODO", "NODE_DOWN", None, h, text,
                   f"start marsd on {h} and check the network to it{' (' + ip + ')' if ip else ''}; "
                   f"if {h} is gone for good, run on a survivor: {', then '.join(gone)}")


def _space(h: str, ns: Any) -> Iterator[Finding]:
    rest, total = _num(getattr(ns, "rest_space_bytes", None)), _num(getattr(ns, "total_space_bytes", None))
    if rest is None or total is None or total <= 0:
        return
    text = (f"{h} has {human_bytes(rest)} free of {human_bytes(total)} in its MARS directory "
            f"({100.0 * rest / total:.1f} %)")
    if rest < SPACE_LOW_FRACTION * total or rest < SPACE_LOW_BYTES:
        yield Finding("TODO", "SPACE_LOW", None, h, text,
                      f"free space on {h}: {_cmd('log-delete-all all', h)} deletes the logs every member has "
                      f"replayed; otherwise grow the filesystem (when it runs full, logging stops)")
    elif rest < SPACE_WARN_FRACTION * total:
        yield Finding("HINT", "SPACE_WARN", None, h, text,
                      f"plan for space on {h}: {_cmd('log-delete-all all', h)} deletes the logs every member has "
                      f"replayed; or grow the filesystem")


def _resource(snap: Snapshot) -> Iterator[Finding]:
    local = _str(getattr(snap, "local_host", None)) or None
    for res, rs in _resources(snap):
        primary = _primary(rs)
        members = _members(rs)
        if primary is None:
            yield Finding("TODO", "NO_PRIMARY", res, None,
                          f"resource {res} has no primary: nothing serves it and no log is written",
                          f"make the member with the newest data primary: {_cmd('primary ' + res, '<that node>')}")
        elif primary not in dict(members):
            yield Finding("TODO", "PRIMARY_NOT_MEMBER", res, primary,
                          f"resource {res} names {primary} as its primary, but {primary} is not a member "
                          f"(members: {', '.join(h for h, _ in members) or 'none'})",
                          f"make a member primary: {_cmd('primary ' + res, '<that node>')}")

        split = sorted(_list(getattr(rs, "split_brain", None)), key=lambda s: _num(getattr(s, "seq", None)) or 0)
        if split:
            parts, hosts = [], set()
            for s in split:
                digests = _items(getattr(s, "digests", None))
                hosts.update(h for h, _ in digests)
                if digests and all(_str(v).endswith(":log file") for _, v in digests):
                    parts.append(f"log {_str(getattr(s, 'seq', '?'))} exists from {len(digests)} origins: "
                                 + ", ".join(h for h, _ in digests))
                else:
                    parts.append(f"log {_str(getattr(s, 'seq', '?'))}: "
                                 + ", ".join(f"{h} has {_str(v)}" for h, v in digests))
            yield Finding("TODO", "SPLIT_BRAIN", res, None,
                          f"log versions of {res} differ: {' / '.join(parts)}",
                          f"decide which node's data survives; run 'marsadm invalidate {res}' on the others"
                          + (f" (of {', '.join(sorted(hosts))})" if hosts else ""))

        yield from _logs(snap, res, rs, local)

        sizes = [_num(getattr(nr, "disk_bytes", None)) for _, nr in members]
        size = _num(getattr(rs, "size_bytes", None))
        if members and size is not None and all(s is not None for s in sizes):
            smallest = min(s for s in sizes if s is not None)
            if smallest > size:
                gain = smallest - size
                yield Finding("HINT", "RESIZE_POSSIBLE", res, None,
                              f"every member's disk of {res} is larger than the resource: it can grow by "
                              f"{human_bytes(gain)} ({gain:.0f} bytes), from {human_bytes(size)} to "
                              f"{human_bytes(smallest)}",
                              _cmd(f"resize {res}", primary))

        for h, nr in members:
            yield from _member(snap, res, rs, h, nr)


def _logs(snap: Snapshot, res: str, rs: Any, local: str | None) -> Iterator[Finding]:
    deletable = _list(getattr(rs, "deletable_logs", None))
    if deletable:
        n = len(deletable)
        nbytes = _num(getattr(rs, "deletable_bytes", None))
        yield Finding("HINT", "LOGS_DELETABLE", res, None,
                      f"{n} log file{'s' if n != 1 else ''} of {res}, {human_bytes(nbytes)}"
                      f"{' on ' + local if local else ''}, replayed everywhere, can be deleted",
                      f"'marsadm log-delete-all {res}'")
    nodes = dict(_members(rs))
    for h in sorted({_str(h) for h in _list(getattr(rs, "held_back_by", None))}):
        nr = nodes.get(h)
        sw = getattr(nr, "switches", None)
        if _alive(snap, h) is False:
            why, remedy = f"{h} is down", (f"start marsd on {h}, or if it is gone for good "
                                           f"'marsadm leave-resource {res} --host {h} --force' on a survivor")
        elif _replay_stopped(nr):
            why, remedy = "replay stopped there", f"see REPLAY_STOPPED: {_cmd('invalidate ' + res, h)}"
        elif _flag(sw, "replay") is False:
            why, remedy = "replay is paused there", _cmd(f"resume-replay {res}", h)
        elif nr is not None and getattr(nr, "replay_link", None) is None:
            why, remedy = f"{h} has no replay position yet", f"wait until {h} has synced and replays, or " \
                                                             f"{_cmd('leave-resource ' + res, h)}"
        else:
            why, remedy = "its replay has not reached the newer logs yet", \
                f"wait for replay on {h} to catch up, then {_cmd('log-delete-all ' + res, None)}"
        yield Finding("HINT", "LOGS_HELD_BACK", res, h,
                      f"{h}'s replay position holds back deletion of older logs of {res} ({why})", remedy)


def _member(snap: Snapshot, res: str, rs: Any, h: str, nr: Any) -> Iterator[Finding]:
    primary = _primary(rs)
    is_primary = _is_primary(rs, h, nr)
    sw, act = getattr(nr, "switches", None), getattr(nr, "actual", None)
    attach_errors = _messages(nr, "err-attach")

    if _replay_stopped(nr):
        code = _str(getattr(nr, "replay_code", None))
        detail = code.split(",")
        stop = _messages(nr, "err-replay-stop")
        if len(detail) > 1 and detail[1]:
            where = f" at offset {detail[2]}" if len(detail) > 2 and detail[2] else ""
            text = f"replay of {res} on {h} stopped at a damaged log record ({detail[1]}{where})"
            damaged = True
        else:
            text = f"replay of {res} on {h} is stopped (replay code {code})"
            damaged = False
        msg = stop or attach_errors
        if msg:
            text += f": {'; '.join(msg)}"
        if is_primary:
            remedy = (f"the primary's own log is damaged: {_cmd('log-truncate ' + res, h)} shows what a cut at "
                      f"the damaged record loses, then 'marsadm log-truncate {res} --force' on {h} (the cut-off "
                      f"part is kept in a damaged-* directory)")
        else:
            remedy = (f"the log copy on {h} is damaged (the corrupt record cannot be replayed): "
                      f"{_cmd('invalidate ' + res, h)} (fresh log copy and fast full sync from "
                      f"{primary or 'the primary'}), or 'marsadm down {res}', 'marsadm leave-resource {res}' "
                      f"and 'marsadm join-resource {res} <device>' on {h}")
        if not damaged and attach_errors:
            remedy = f"fix the attach error, then {_cmd('attach ' + res, h)}; if the log is damaged: " + remedy
        yield Finding("TODO", "REPLAY_STOPPED", res, h, text, remedy)

    if attach_errors:
        yield Finding("TODO", "ATTACH_FAILED", res, h, f"attach of {res} on {h} failed: {' / '.join(attach_errors)}",
                      f"fix what the message names, then {_cmd('attach ' + res, h)} (marsd retries on that)")

    if _flag(sw, "fetch"):
        src = _str(getattr(nr, "fetch_source", None)) or primary or "the primary"
        fetch_errors = _messages(nr, "warn-fetch")
        if fetch_errors:
            yield Finding("TODO", "FETCH_FAILING", res, h,
                          f"fetch of {res} on {h} from {src} fails: {' / '.join(fetch_errors)}",
                          f"check that marsd runs on {src} and that {h} can reach it; "
                          f"{_cmd('get-connect-pref-list ' + res, h)} shows where it fetches from")

    if h == primary and _alive(snap, h) is True and _flag(sw, "attach") \
            and _flag(act, "primary") is False:
        state = "its data device is attached" if _flag(act, "attached") else "it is not attached"
        yield Finding("TODO", "PRIMARY_NOT_SERVING", res, h,
                      f"{h} is the primary of {res} and attach is on, but it does not serve {res} ({state})",
                      ("see ATTACH_FAILED; fix its cause, then " if attach_errors
                       else f"look at marsd's log on {h} ('journalctl -u marsd'); ")
                      + _cmd(f"attach {res}", h) + " retries")

    attach = _flag(sw, "attach")
    if attach is False:
        others_off = not is_primary and any(_flag(sw, s) is False for s in ("fetch", "sync", "replay"))
        yield Finding("HINT", "DETACHED", res, h,
                      f"{res} is detached on {h}" + (f" (the primary: nothing serves {res})" if is_primary else ""),
                      _cmd(f"{'up' if others_off else 'attach'} {res}", h))
        return  # the switches below are all off after 'marsadm down'; DETACHED says it once
    if is_primary:
        return  # the primary neither syncs, fetches nor replays
    sync = _figures(getattr(nr, "sync", None))
    if _flag(sw, "sync") is False and sync is not None and not sync.reached:
        yield Finding("HINT", "SYNC_PAUSED", res, h,
                      f"sync of {res} on {h} is paused at {sync.describe()}, and {h} stays inconsistent until it "
                      f"is done",
                      _cmd(f"resume-sync {res}", h))
    if _flag(sw, "fetch") is False:
        fetch = _figures(getattr(nr, "fetch", None))
        behind = f" ({human_bytes(fetch.rest)} of log not fetched)" if fetch is not None and fetch.rest > 0 else ""
        yield Finding("HINT", "FETCH_PAUSED", res, h, f"fetch of {res} on {h} is switched off{behind}",
                      _cmd(f"connect {res}", h))
    if _flag(sw, "replay") is False:
        replay = _figures(getattr(nr, "replay", None))
        behind = f" ({human_bytes(replay.rest)} not replayed)" if replay is not None and replay.rest > 0 else ""
        yield Finding("HINT", "REPLAY_PAUSED", res, h,
                      f"replay of {res} on {h} is paused{behind}",
                      _cmd(f"resume-replay {res}", h))


_RULES = (_cluster, _resource, _work)


def _order(f: Finding) -> tuple[int, str, str, str, str]:
    return LEVELS.index(f.level), f.res or "", f.node or "", f.code, f.text


def findings(snap: Snapshot) -> list[Finding]:
    """Every WORK, TODO and HINT finding of the snapshot, sorted by level, resource, node, code."""
    out: list[Finding] = []
    for rule in _RULES:
        out.extend(rule(snap))
    return sorted(out, key=_order)
