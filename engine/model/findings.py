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
* Typed: the rules read the snapshot's fields and the model's own derived properties
  (``replay_stopped``, ``Progress.reached``, ``NodeStatus.peer_port``), never a definition of
  their own, and mypy checks every name (``tests/test_layers.py``). What the types allow to be
  unknown (``None``: a position not yet published, a disk size never reported) yields fewer
  findings, never an exception, and neither does a figure that is not finite: an unknown value
  never triggers a rule.
* Deterministic: the result is sorted by level (:data:`LEVELS`), resource, node, code, text.
* One finding per (code, res, node): that triple is a finding's identity across snapshots (the
  control socket raises and clears by it), so several causes of one kind join into one text.
* Every finding names its figures with units and, for TODO and HINT, the exact command to run
  and where (``'marsadm resume-replay r' on b``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..peer.protocol import DEFAULT_PORT as DEFAULT_PEER_PORT
from ..peer.protocol import FOREIGN_CERT
from .snapshot import Message, NodeResource, NodeStatus, Progress, ResourceStatus, Snapshot, SplitBrain
from .units import figure, human_bytes, human_seconds

__all__ = ["Finding", "CODES", "HANDOVER_STALL_WINDOWS", "LEVELS", "URGENT", "findings", "worst"]

LEVELS = ("TODO", "HINT", "WORK")  # severity order: what sorts first is the most urgent

GiB = 1 << 30
SPACE_LOW_FRACTION = 0.10  # below this share of /mars free (or below SPACE_LOW_BYTES): TODO
SPACE_LOW_BYTES = 1 * GiB
SPACE_WARN_FRACTION = 0.20  # below this share free: HINT
WASTE_THRESHOLD_BYTES = 10 << 20  # a disk larger than its resource by more wastes space (the original's --threshold)

# The TODO codes where data is at risk or not served now: every face's most urgent class (a
# Prometheus alert's severity critical, a Zabbix trigger's HIGH), named once so the faces agree.
URGENT = frozenset({"SPLIT_BRAIN", "REPLAY_STOPPED", "NO_PRIMARY", "PRIMARY_NOT_SERVING", "EMERGENCY", "NODE_DOWN",
                    "TWO_PRIMARIES"})
# A planned handover that has not finished after this many alive windows has stalled: the old
# primary stops within a round, and the target only replays what it had nearly all fetched.
HANDOVER_STALL_WINDOWS = 2

CODES: dict[str, tuple[str, str]] = {
    # WORK: in progress, finishes by itself.
    "SYNC_RUNNING": ("WORK", "a member's full sync has bytes left and is switched on or running, on a live node"),
    "FETCH_RUNNING": ("WORK", "a synced secondary on a live node is fetching the log, with bytes left to fetch"),
    "REPLAY_RUNNING": ("WORK", "a synced secondary on a live node is replaying the log, with bytes left to replay"),
    "HANDOVER": ("WORK", "a planned handover (marsadm primary) is in progress: the target replays the old "
                         "primary's log, then serves"),
    # TODO: wrong, needs an operator.
    "MARSD_DOWN": ("TODO", "marsd is not running on this host; the status is what the tree last knew"),
    "NODE_DOWN": ("TODO", "a node has not reported within the alive window (or never did)"),
    "PEER_UNREACHABLE": ("TODO", "a live node reports that it cannot reach a peer"),
    "REPLAY_STOPPED": ("TODO", "replay stopped on a member (replay code < 0), usually at a damaged log record"),
    "SPLIT_BRAIN": ("TODO", "members hold different histories for the same log number"),
    "ATTACH_FAILED": ("TODO", "marsd could not attach the resource on a member (msg-err-attach)"),
    "FETCH_FAILING": ("TODO", "a member with fetch switched on reports a fetch error (msg-warn-fetch)"),
    "NO_PRIMARY": ("TODO", "a resource has no designated primary: nothing serves it"),
    "HANDOVER_STALLED": ("TODO", "a planned handover has not finished within twice the alive window, or its target "
                                 "is not alive: nothing serves the resource"),
    "TWO_PRIMARIES": ("TODO", "more than one member reports serving a resource (an old primary cut off by a forced "
                              "failover still serving)"),
    "PRIMARY_NOT_MEMBER": ("TODO", "a resource's designated primary is not one of its members"),
    "PRIMARY_NOT_SERVING": ("TODO", "the designated primary is alive with attach on, but does not serve"),
    "SPACE_LOW": ("TODO", "a live node has less than 10 % or less than 1 GiB free in its MARS directory"),
    "EMERGENCY": ("TODO", "a node is in emergency mode (its MARS directory ran full)"),
    # HINT: an operator may want to act.
    "SPACE_WARN": ("HINT", "a live node has 10-20 % free in its MARS directory (and at least 1 GiB)"),
    "SYNC_PAUSED": ("HINT", "an attached secondary's sync is switched off with bytes left"),
    "FETCH_PAUSED": ("HINT", "an attached secondary's fetch (connect) is switched off"),
    "FETCH_HELD": ("HINT", "a secondary's fetch is held because its load average is above its loadavg-limit "
                           "(msg-warn-loadavg); it resumes when the load falls"),
    "REPLAY_PAUSED": ("HINT", "an attached secondary's replay is switched off"),
    "DETACHED": ("HINT", "a member's attach switch is off"),
    "FORCED_PRIMARY": ("HINT", "a resource was made primary by force: writes only the old primary has may exist; "
                               "check for a split brain once it is back"),
    "LOGS_DELETABLE": ("HINT", "log files replayed by every member can be deleted"),
    "LOGS_HELD_BACK": ("HINT", "a member's replay position keeps older log files from being deletable"),
    "RESIZE_POSSIBLE": ("HINT", "every member's disk is larger than the resource"),
    "CONNECT_CYCLE": ("HINT", "members' connect preference lists lead back to where they start; they fetch from the "
                              "primary instead"),
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

    def to_json(self) -> dict[str, str | None]:
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

def _describe(p: Progress, left: str = "left") -> str:
    """``42.0 % (1.2 GiB left, 35.0 MiB/s, about 36 s left)``; a time left only from a real speed."""
    rest = p.rest_bytes
    rate = figure(p.rate_bytes_per_s)
    parts = [f"{human_bytes(rest)} {left}"]
    if p.stalled:
        parts.append(f"no progress for {human_seconds(p.moved_age_s)}")
    elif rate is None:
        parts.append("rate unknown")
    elif not p.moving:
        parts.append("not moving")
    else:
        parts.append(f"{human_bytes(rate)}/s, about {human_seconds(p.remaining_s)} left")
    return f"{p.percent_text()} % ({', '.join(parts)})"


def _texts(nr: NodeResource, prefix: str) -> list[str]:
    """Texts of a member's messages whose key starts with ``prefix`` (key order)."""
    return [m.text or "(no text)" for m in sorted(nr.messages, key=_key) if m.key.startswith(prefix)]


def _key(m: Message) -> str:
    return m.key


def _down(snap: Snapshot, host: str) -> bool:
    """A node the snapshot knows, and knows to be not alive (an unknown one is NODE_DOWN's case)."""
    ns = snap.nodes.get(host)
    return ns is not None and not ns.alive


def _is_primary(rs: ResourceStatus, host: str, nr: NodeResource) -> bool:
    return host == rs.primary or nr.designated_primary


def _cmd(command: str, host: str | None) -> str:
    return f"'marsadm {command}' on {host}" if host else f"'marsadm {command}'"


# --- rules -----------------------------------------------------------------------------------
# One generator per concern; each yields Findings.

def _work(snap: Snapshot) -> Iterator[Finding]:
    for res, rs in sorted(snap.resources.items()):
        diverged = set(rs.diverged)
        for h, nr in sorted(rs.nodes.items()):
            if not snap.alive(h):
                continue  # a dead node does no work; NODE_DOWN says so
            sw, act, sync = nr.switches, nr.actual, nr.sync
            if not sync.reached and (act.syncing or sw.sync):
                text = f"sync of {res} on {h} at {_describe(sync)}"
                if not act.syncing:
                    text += ", not running yet (waiting for attach or the host's sync limit)"
                yield Finding("WORK", "SYNC_RUNNING", res, h, text, "")
            if _is_primary(rs, h, nr) or not sync.reached:
                continue  # fetch and replay follow the sync (replay never runs during a sync)
            if h in diverged:
                continue  # its history is not the primary's: it cannot catch up by itself (SPLIT_BRAIN)
            if nr.fetch is not None and nr.fetch.rest_bytes > 0 and sw.fetch:
                src = nr.fetch_source or rs.primary or "the primary"
                yield Finding("WORK", "FETCH_RUNNING", res, h,
                              f"fetch of {res} on {h} from {src} at {_describe(nr.fetch, 'behind the log end')}", "")
            if nr.replay is not None and nr.replay.rest_bytes > 0 and sw.replay and not nr.replay_stopped:
                yield Finding("WORK", "REPLAY_RUNNING", res, h,
                              f"replay of {res} on {h} at {_describe(nr.replay, 'behind the log end')}", "")


def _cluster(snap: Snapshot) -> Iterator[Finding]:
    local = snap.local_host or None
    mars_dir = snap.mars_dir or "/mars"
    marsd_down = not snap.marsd_running
    if marsd_down:
        yield Finding("TODO", "MARSD_DOWN", None, local,
                      f"marsd is not running on {local or 'this host'}, so what is shown is what the tree in "
                      f"{mars_dir} last knew",
                      f"start marsd on {local or 'this host'}: 'systemctl start marsd', or "
                      f"'marsd --mars-dir {mars_dir}" + (f" --host {local}'" if local else "'"))

    slip, window = figure(snap.clock_slip_s), figure(snap.window_s)
    if slip is not None and window is not None and slip > window:
        yield Finding("HINT", "CLOCK_SLIP", None, local,
                      f"the Lamport clock runs {human_seconds(slip)} ahead of the wall clock of "
                      f"{local or 'this host'}, more than the {human_seconds(window)} alive window: "
                      f"some node's clock is fast (or this one's is slow), so nodes may look dead or alive wrongly",
                      "synchronise the clocks of all nodes with NTP (chrony or systemd-timesyncd) "
                      "and compare 'date' on each node")

    membership: dict[str, list[str]] = {}
    for res, rs in sorted(snap.resources.items()):
        for h in sorted(rs.nodes):
            membership.setdefault(h, []).append(res)
    versions: dict[str, list[str]] = {}
    for h in sorted(set(snap.nodes) | set(membership)):
        ns = snap.nodes.get(h)
        if ns is None or not ns.alive:
            if not (marsd_down and h == local):
                yield _node_down(snap, h, ns, membership.get(h, []))
        if ns is None:
            continue
        if ns.emergency:
            yield _emergency(h, ns)
        if not ns.alive:
            continue
        yield from _unreachable(snap, h, ns)
        yield from _space(h, ns)
        if ns.version:
            versions.setdefault(ns.version, []).append(h)
    if len(versions) > 1:
        parts = [f"{v} ({', '.join(hs)})" for v, hs in sorted(versions.items())]
        yield Finding("HINT", "MARSD_VERSIONS_DIFFER", None, None,
                      f"live nodes run different marsd versions: {', '.join(parts)}",
                      "finish the upgrade: install the same MARS version on every node and restart marsd there, "
                      "one node at a time")


def _unreachable(snap: Snapshot, h: str, ns: NodeStatus) -> Iterator[Finding]:
    # A link to a node that is down is NODE_DOWN's evidence, not a problem of its own.
    unreachable = sorted((p, why) for p, why in ns.link_errors.items() if p not in snap.nodes or snap.alive(p))
    if not unreachable:
        return
    addrs = {}
    for peer, _ in unreachable:
        pns = snap.nodes.get(peer)
        # The port the peer said it uses; else the one this node uses (a cluster shares one).
        port = (pns.peer_port if pns is not None else None) or ns.peer_port or str(DEFAULT_PEER_PORT)
        ip = pns.ip if pns is not None else None
        addrs[peer] = f"{ip}:{port}" if ip else f"{peer} on port {port}"
    # A peer that answered with another cluster's certificate runs and is reachable: it needs
    # another remedy than one that cannot be reached at all.
    foreign = [p for p, err in unreachable if FOREIGN_CERT in err]
    silent = [p for p, _ in unreachable if p not in foreign]
    remedies = []
    if silent:
        remedies.append(f"check that marsd runs on {' and '.join(silent)} and that {h} can reach "
                        f"{' and '.join(addrs[p] for p in silent)} (firewall, routing, the ips/ip-<node> entries)")
    if foreign:
        remedies.append(_foreign_remedy(foreign, [addrs[p] for p in foreign]))
    yield Finding("TODO", "PEER_UNREACHABLE", None, h,
                  f"{h} cannot reach " + ", and ".join(f"{p}: {err}" for p, err in unreachable),
                  "; ".join(remedies))


def _node_down(snap: Snapshot, h: str, ns: NodeStatus | None, resources: list[str]) -> Finding:
    age = figure(ns.seen_age_s) if ns is not None else None
    window = figure(snap.window_s)
    # What the live nodes' links to it say: the evidence, and (another cluster's certificate) the remedy.
    witnesses = sorted((o, on.link_errors[h]) for o, on in snap.nodes.items()
                       if o != h and on.alive and h in on.link_errors)
    if ns is None:
        text = f"node {h} has never reported (it has no node entries)"
    else:
        if ns.unreachable:
            text = f"node {h} is unreachable"
        elif age is None:
            text = f"node {h} has never reported"
        else:
            text = f"node {h} has not reported for {human_seconds(age)}"
            if window is not None:
                text += f" (alive window {human_seconds(window)})"
        if witnesses:
            text += ": " + "; ".join(f"{o} cannot reach it ({why})" for o, why in witnesses)
    if resources:
        text += f", member of {', '.join(resources)}"
    gone = [f"'marsadm leave-resource {r} --host {h} --force'" for r in resources]
    gone.append(f"'marsadm leave-cluster --host {h} --force'")
    ip = ns.ip if ns is not None else None
    local = snap.nodes.get(snap.local_host)
    port = (ns.peer_port if ns is not None else None) or (local.peer_port if local else None) or str(DEFAULT_PEER_PORT)
    addr = f"{ip}:{port}" if ip else f"{h} on port {port}"
    if any(FOREIGN_CERT in why for _, why in witnesses):
        remedy = _foreign_remedy([h], [addr])
    else:
        remedy = f"start marsd on {h} and check the network to it{f' ({addr})' if ip else ''}"
    return Finding("TODO", "NODE_DOWN", None, h, text,
                   f"{remedy}; if {h} is gone for good, run on a survivor: {', then '.join(gone)}")


def _foreign_remedy(hosts: list[str], addrs: list[str]) -> str:
    """What to do about peers that answer with another cluster's certificate: they run, and are
    reached, so "start marsd" would send the operator the wrong way."""
    return (f"{' and '.join(hosts)} answered at {' and '.join(addrs)} with another cluster's certificate: check "
            "the ips/ip-<node> entry; a node whose tree was made anew joins again: on it, "
            "'marsadm join-cluster <ip of a node> --secret-file <file>'")


#: What each emergency level does (the original's order), for the findings' texts.
LEVEL_ACTIONS = {1: "space is becoming low", 2: "its secondaries delete replayed log files",
                 3: "syncs stop", 4: "its primaries write through, its secondaries stop fetching"}


def _emergency(h: str, ns: NodeStatus) -> Finding:
    through = ", ".join(ns.writing_through)
    what = (f"{h} is in emergency mode (level {ns.emergency_level} of 4): its MARS directory is full"
            + (f"; {through} {'is' if len(ns.writing_through) == 1 else 'are'} written through to the data "
               f"device, not logged, and the secondaries stopped at the last logged write" if through else
               f"; {LEVEL_ACTIONS[4]}"))
    need = ns.space_needed_bytes
    return Finding("TODO", "EMERGENCY", None, h, what,
                   f"free space on {h}: {_cmd('log-delete-all all', h)} deletes the logs every member has replayed; "
                   f"remove other files from its MARS directory or grow the filesystem. "
                   + (f"With {human_bytes(need)} free " if need else "When space is back ")
                   + f"{h} logs again by itself and the secondaries resync only the written regions")


def _space(h: str, ns: NodeStatus) -> Iterator[Finding]:
    rest, total = figure(ns.rest_space_bytes), figure(ns.total_space_bytes)
    if rest is None or total is None or total <= 0:
        return
    text = (f"{h} has {human_bytes(rest)} free of {human_bytes(total)} in its MARS directory "
            f"({100.0 * rest / total:.1f} %)")
    if 1 <= ns.emergency_level <= 3 and not ns.emergency:
        yield Finding("TODO", "SPACE_LOW", None, h,
                      f"{text}: emergency level {ns.emergency_level} of 4, {LEVEL_ACTIONS[ns.emergency_level]}",
                      f"free space on {h}: {_cmd('log-delete-all all', h)} deletes the logs every member has "
                      f"replayed; otherwise grow the filesystem (at level 4 its primaries stop logging)")
    elif ns.emergency:
        return
    elif rest < SPACE_LOW_FRACTION * total or rest < SPACE_LOW_BYTES:
        yield Finding("TODO", "SPACE_LOW", None, h, text,
                      f"free space on {h}: {_cmd('log-delete-all all', h)} deletes the logs every member has "
                      f"replayed; otherwise grow the filesystem (when it runs full, logging stops)")
    elif rest < SPACE_WARN_FRACTION * total:
        yield Finding("HINT", "SPACE_WARN", None, h, text,
                      f"plan for space on {h}: {_cmd('log-delete-all all', h)} deletes the logs every member has "
                      f"replayed; or grow the filesystem")


def _resource(snap: Snapshot) -> Iterator[Finding]:
    local = snap.local_host or None
    for res, rs in sorted(snap.resources.items()):
        primary = rs.primary
        members = sorted(rs.nodes.items())
        stalled = _handover_stalled(snap, rs)
        if primary is None and (rs.handover_to is None or stalled):
            yield _no_primary(res, rs, stalled)
        elif primary is not None and primary not in rs.nodes:
            yield Finding("TODO", "PRIMARY_NOT_MEMBER", res, primary,
                          f"resource {res} names {primary} as its primary, but {primary} is not a member "
                          f"(members: {', '.join(h for h, _ in members) or 'none'})",
                          f"make a member primary: {_cmd('primary ' + res, '<that node>')}")
        yield from _handover(snap, res, rs, stalled)
        yield from _two_primaries(snap, res, rs)
        yield from _forced(res, rs)
        yield from _split(res, rs)
        yield from _cycles(res, rs)
        yield from _logs(snap, res, rs, local)
        yield from _resize(res, rs)
        for h, nr in members:
            yield from _member(snap, res, rs, h, nr)


# --- roles: handover, two primaries, forced failover, split brain --------------------------------

def _handover_stalled(snap: Snapshot, rs: ResourceStatus) -> bool:
    """A handover is in progress (``handover-to``) but its target is not alive (or no member),
    or it started more than HANDOVER_STALL_WINDOWS alive windows ago."""
    target = rs.handover_to
    if target is None:
        return False
    if target not in rs.nodes or not snap.alive(target):
        return True
    age, window = figure(rs.handover_age_s), figure(snap.window_s)
    return age is not None and window is not None and age > HANDOVER_STALL_WINDOWS * window


def _serving(rs: ResourceStatus) -> list[str]:
    return [h for h, nr in sorted(rs.nodes.items()) if nr.actual.primary]


def _newest(rs: ResourceStatus) -> tuple[str, str] | None:
    """The member with the newest data and why: the last primary when it is a member (it wrote
    the log), else the member whose replay got furthest."""
    if rs.prev_primary is not None and rs.prev_primary in rs.nodes:
        return rs.prev_primary, "the last primary"
    replayed = [(nr.replay.pos_bytes, h) for h, nr in sorted(rs.nodes.items()) if nr.replay is not None]
    if not replayed:
        return None
    best = max(p for p, _ in replayed)
    return next(h for p, h in replayed if p == best), "the member whose replay got furthest"


def _no_primary(res: str, rs: ResourceStatus, stalled: bool) -> Finding:
    text = f"resource {res} has no primary: nothing serves it and no log is written"
    if stalled and rs.handover_to is not None:
        text += f" (the handover to {rs.handover_to} has stalled)"
    newest = _newest(rs)
    if newest is None:
        remedy = f"make the member with the newest data primary: {_cmd('primary ' + res, '<that node>')}"
    else:
        h, why = newest
        remedy = f"make {h} primary, {why}: {_cmd('primary ' + res, h)}"
    if stalled:
        remedy = f"see HANDOVER_STALLED; or {remedy}"
    return Finding("TODO", "NO_PRIMARY", res, None, text, remedy)


def _handover(snap: Snapshot, res: str, rs: ResourceStatus, stalled: bool) -> Iterator[Finding]:
    target = rs.handover_to
    if target is None:
        return
    old = rs.prev_primary
    was = old or "the old primary"
    age = figure(rs.handover_age_s)
    head = f"planned handover of {res} from {was} to {target}"
    nr = rs.nodes.get(target)
    replay = nr.replay if nr is not None else None
    if nr is None:
        left = f"{target} is no member of {res}"
    elif replay is None:
        left = f"{target} has no replay position yet"
    elif replay.reached:
        left = f"{target} has replayed {was}'s log and takes over"
    else:
        left = f"{target} has {human_bytes(replay.rest_bytes)} of log left to replay"
        if replay.stalled:
            left += f" (no progress for {human_seconds(replay.moved_age_s)})"
        elif replay.moving:
            left += (f" ({human_bytes(replay.rate_bytes_per_s)}/s, about {human_seconds(replay.remaining_s)} "
                     f"left)")
        else:
            left += " (rate unknown)"
    serving = _serving(rs)
    gap = f"; nothing serves {res} until then" if not serving else \
        f"; {' and '.join(serving)} still serve{'s' if len(serving) == 1 else ''} {res}"
    if not stalled:
        since = f" for {human_seconds(age)}" if age is not None else ""
        yield Finding("WORK", "HANDOVER", res, target, f"{head} in progress{since}: {left}{gap}", "")
        return
    if nr is None or not snap.alive(target):
        why = f"{target} is no member of {res}" if nr is None else f"{target} is not alive"
    else:
        window = figure(snap.window_s)
        why = (f"it started {human_seconds(age)} ago, more than {HANDOVER_STALL_WINDOWS} times the "
               f"{human_seconds(window)} alive window")
    detail = f"; {left}" if nr is not None and snap.alive(target) else ""
    again = _cmd(f"primary {res}", target) + " again"
    if nr is not None and not snap.alive(target):
        again = f"start marsd on {target}, then {again}"
    back = _cmd(f"primary {res}", old) if old else f"'marsadm primary {res}' on the old primary"
    yield Finding("TODO", "HANDOVER_STALLED", res, target,
                  f"{head} has stalled: {why}{detail}" + (f"; nothing serves {res}" if not serving else gap),
                  f"{again}, or {back} to go back; if {was} is lost, {_cmd(f'primary --force {res}', target)}")


def _two_primaries(snap: Snapshot, res: str, rs: ResourceStatus) -> Iterator[Finding]:
    serving = _serving(rs)
    if len(serving) < 2:
        return
    primary = rs.primary
    others = [h for h in serving if h != primary]
    text = f"{' and '.join(serving)} {'both' if len(serving) == 2 else 'all'} serve {res} (is-primary 1): "
    text += f"{primary} is the designated primary" if primary in serving else \
        (f"{primary}, the designated primary, is not among them" if primary else "none is the designated primary")
    for h in others:
        ns = snap.nodes.get(h)
        if ns is not None and not ns.alive:
            seen = f"{human_seconds(ns.seen_age_s)} old" if ns.seen_age_s is not None else "unknown"
            text += f"; {h} is not alive (its last report is {seen}): cut off, it may still serve its clients"
    if primary in serving:
        remedy = "; ".join(f"stop the applications using {res} on {h}, then {_cmd(f'secondary {res}', h)}, "
                           f"or {_cmd(f'down {res}', h)}" for h in others)
        gone = [h for h in others if _down(snap, h)]
        if gone:
            remedy += "; if " + " or ".join(gone) + " is gone for good, on a survivor " + ", ".join(
                f"'marsadm leave-resource {res} --host {h} --force'" for h in gone)
    else:
        remedy = (f"decide which of {', '.join(serving)} goes on; on each other one stop the applications using "
                  f"{res}, then 'marsadm secondary {res}' there, or 'marsadm down {res}' there")
    yield Finding("TODO", "TWO_PRIMARIES", res, others[0] if len(others) == 1 else None, text, remedy)


def _forced(res: str, rs: ResourceStatus) -> Iterator[Finding]:
    h = rs.forced_primary
    if h is None:
        return
    old = rs.prev_primary if rs.prev_primary not in (None, h) else None
    was = old or "the old primary"
    yield Finding("HINT", "FORCED_PRIMARY", res, h,
                  f"{res} was made primary on {h} by force ('marsadm primary --force'): writes {was} acknowledged "
                  f"that {h} never fetched exist only on {was}",
                  f"once {was} is back, check for a split brain: 'marsadm view {res}' (SPLIT_BRAIN then names the "
                  f"commands)")


def _history(value: str, seq: int) -> str:
    """What a side holds at the split, from its :class:`SplitBrain` digest value."""
    origin, _, what = value.partition(":")
    if what == "log file":
        return f"a log file log-{seq:09d}-{origin}"
    if what == "being written":
        return f"log {seq} from {origin} (being written)"
    return f"log {seq} from {origin} (digest {what[:8]})"


def _split_text(rs: ResourceStatus, s: SplitBrain) -> str:
    sides = s.sides
    out = []
    for i, hs in enumerate(sides):
        if rs.primary is not None and rs.primary in hs:
            which = "the designated primary's side"
        elif rs.primary is None and s.reference in hs:
            which = "the side with the furthest log end"
        else:
            which = "the other side" if len(sides) == 2 else "another side"
        text = f"{which}, {', '.join(hs)}, {'holds' if len(hs) == 1 else 'hold'} {_history(s.digests[hs[0]], s.seq)}"
        beyond = [(h, s.beyond_bytes[h]) for h in hs if h in s.beyond_bytes]
        if len(beyond) == 1 and len(hs) == 1:
            text += f" and {human_bytes(beyond[0][1])} beyond the split point"
        elif beyond:
            text += " and " + ", ".join(f"{human_bytes(n)} ({h})" for h, n in beyond) + " beyond the split point"
        out.append(text)
    return f"from log {s.seq} on, " + "; ".join(out)


def _split(res: str, rs: ResourceStatus) -> Iterator[Finding]:
    """Two histories: which hosts hold which, what each has beyond the split point, and the
    commands that keep the designated primary's side and bring the others onto it."""
    if not rs.is_split_brain:
        return
    parts = [_split_text(rs, s) for s in sorted(rs.split_brain, key=lambda s: s.seq)]
    parts += [f"{h}'s marsd reports: {text}" for h, text in rs.split_reported.items()]
    steps = []
    if rs.primary is None:
        keep = next((s.reference for s in sorted(rs.split_brain, key=lambda s: s.seq) if s.reference), None)
        steps.append("first make the side to keep primary: " + (
            f"{_cmd('primary ' + res, keep)} keeps {keep}'s side (the commands below assume it)" if keep
            else _cmd('primary ' + res, '<a host of that side>')))
    diverged = [h for h in rs.diverged if h in rs.nodes]
    if not diverged:
        steps.append(f"decide which side's data survives; run {_cmd('invalidate ' + res, '<each host of the others>')}")
    elif len(rs.nodes) <= 2:
        steps.append("discard the diverged history: " + ", ".join(_cmd(f"invalidate {res}", h) for h in diverged))
    else:
        steps += [f"discard the diverged history on {h}: 'marsadm down {res}', 'marsadm leave-resource {res}', then "
                  f"'marsadm join-resource {res} {rs.nodes[h].disk or '<its device>'}' on {h}" for h in diverged]
    steps.append(f"then 'marsadm log-purge-all {res}' on each member lists the log files left of the discarded "
                 f"history (--force deletes them)")
    yield Finding("TODO", "SPLIT_BRAIN", res, None, f"{res} is in a split brain: {' / '.join(parts)}", "; ".join(steps))


def _cycles(res: str, rs: ResourceStatus) -> Iterator[Finding]:
    """Connect lists whose first choices lead back: each member's list is checked when written,
    but two set at once on two nodes (before either knew the other's) can still close a loop."""
    seen: set[frozenset[str]] = set()
    for start in sorted(rs.nodes):
        path, h = [start], start
        while True:
            nxt = rs.nodes[h].connect_list[0] if h in rs.nodes and rs.nodes[h].connect_list else None
            if nxt is None or nxt not in rs.nodes:
                break
            if nxt in path:
                loop = path[path.index(nxt):]
                if frozenset(loop) not in seen:
                    seen.add(frozenset(loop))
                    first = min(loop)
                    yield Finding("HINT", "CONNECT_CYCLE", res, first,
                                  f"the connect preference lists of {res} make a cycle: "
                                  f"{' -> '.join([*loop, nxt])}; these members fetch from "
                                  f"{rs.primary or 'the primary'} instead",
                                  _cmd(f"set-connect-pref-list {res} <nodes that do not lead back>", first)
                                  + " (an empty list fetches from the primary)")
                break
            path.append(nxt)
            h = nxt


def _resize(res: str, rs: ResourceStatus) -> Iterator[Finding]:
    """The original's two hints of ``marsadm view``: what a resize would gain, and the disks it
    would stop wasting (those larger than the resource by more than its 10 MiB threshold)."""
    smallest, size = figure(rs.possible_size), figure(rs.size_bytes)
    if smallest is None or size is None or smallest <= size:
        return
    gain = smallest - size
    wasted = [f"{human_bytes(w)} on disk {nr.disk or '?'} of {h}" for h, nr in sorted(rs.nodes.items())
              if (w := (figure(nr.disk_bytes) or 0) - size) > WASTE_THRESHOLD_BYTES]
    yield Finding("HINT", "RESIZE_POSSIBLE", res, None,
                  f"marsadm resize would increase resource {res} by {human_bytes(gain)} ({gain:.0f} bytes), "
                  f"from {human_bytes(size)} to {human_bytes(smallest)}, the smallest member's disk"
                  + (f"; you are wasting {', '.join(wasted)}" if wasted else ""),
                  _cmd(f"resize {res}", rs.primary))


def _logs(snap: Snapshot, res: str, rs: ResourceStatus, local: str | None) -> Iterator[Finding]:
    if rs.deletable_logs:
        n = len(rs.deletable_logs)
        yield Finding("HINT", "LOGS_DELETABLE", res, None,
                      f"{n} log file{'s' if n != 1 else ''} of {res}, {human_bytes(rs.deletable_bytes)}"
                      f"{' on ' + local if local else ''}, replayed everywhere, can be deleted",
                      f"'marsadm log-delete-all {res}'")
    for h in sorted(set(rs.held_back_by)):
        nr = rs.nodes.get(h)
        if _down(snap, h):
            why, remedy = f"{h} is down", (f"start marsd on {h}, or if it is gone for good "
                                           f"'marsadm leave-resource {res} --host {h} --force' on a survivor")
        elif nr is not None and nr.replay_stopped:
            why, remedy = "replay stopped there", f"see REPLAY_STOPPED: {_cmd('invalidate ' + res, h)}"
        elif nr is not None and not nr.switches.replay:
            why, remedy = "replay is paused there", _cmd(f"resume-replay {res}", h)
        elif nr is not None and nr.replay_link is None:
            why, remedy = f"{h} has no replay position yet", f"wait until {h} has synced and replays, or " \
                                                             f"{_cmd('leave-resource ' + res, h)}"
        else:
            why, remedy = "its replay has not reached the newer logs yet", \
                f"wait for replay on {h} to catch up, then {_cmd('log-delete-all ' + res, None)}"
        yield Finding("HINT", "LOGS_HELD_BACK", res, h,
                      f"{h}'s replay position holds back deletion of older logs of {res} ({why})", remedy)


def _member(snap: Snapshot, res: str, rs: ResourceStatus, h: str, nr: NodeResource) -> Iterator[Finding]:
    primary = rs.primary
    is_primary = _is_primary(rs, h, nr)
    sw, act = nr.switches, nr.actual
    attach_errors = _texts(nr, "err-attach")

    code = nr.replay_code
    if code is not None and code.stopped:
        if code.damage:
            where = f" at offset {code.offset}" if code.offset is not None else ""
            text = f"replay of {res} on {h} stopped at a damaged log record ({code.damage}{where})"
        else:
            text = f"replay of {res} on {h} is stopped (replay code {code})"
        msg = _texts(nr, "err-replay-stop") or attach_errors
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
        if not code.damage and attach_errors:
            remedy = f"fix the attach error, then {_cmd('attach ' + res, h)}; if the log is damaged: " + remedy
        yield Finding("TODO", "REPLAY_STOPPED", res, h, text, remedy)

    if attach_errors:
        yield Finding("TODO", "ATTACH_FAILED", res, h, f"attach of {res} on {h} failed: {' / '.join(attach_errors)}",
                      f"fix what the message names, then {_cmd('attach ' + res, h)} (marsd retries on that)")

    held = _texts(nr, "warn-loadavg")
    if sw.fetch and held:
        behind = f" ({human_bytes(nr.fetch.rest_bytes)} of log not fetched)" \
            if nr.fetch is not None and nr.fetch.rest_bytes > 0 else ""
        yield Finding("HINT", "FETCH_HELD", res, h, f"fetch of {res} on {h} is held by the load limit{behind}: "
                      f"{' / '.join(held)}",
                      f"it resumes by itself when the load falls; to fetch now raise the limit with "
                      f"{_cmd('set-loadavg-limit-value <load>', h)} (0: no limit), or lower the load there")
    if sw.fetch:
        src = nr.fetch_source or primary or "the primary"
        fetch_errors = _texts(nr, "warn-fetch")
        if fetch_errors:
            yield Finding("TODO", "FETCH_FAILING", res, h,
                          f"fetch of {res} on {h} from {src} fails: {' / '.join(fetch_errors)}",
                          f"check that marsd runs on {src} and that {h} can reach it; "
                          f"{_cmd('get-connect-pref-list ' + res, h)} shows where it fetches from")

    if h == primary and snap.alive(h) and sw.attach and not act.primary:
        state = "its data device is attached" if act.attached else "it is not attached"
        yield Finding("TODO", "PRIMARY_NOT_SERVING", res, h,
                      f"{h} is the primary of {res} and attach is on, but it does not serve {res} ({state})",
                      ("see ATTACH_FAILED; fix its cause, then " if attach_errors
                       else f"look at marsd's log on {h} ('journalctl -u marsd'); ")
                      + _cmd(f"attach {res}", h) + " retries")

    if not sw.attach:
        others_off = not is_primary and not (sw.fetch and sw.sync and sw.replay)
        yield Finding("HINT", "DETACHED", res, h,
                      f"{res} is detached on {h}" + (f" (the primary: nothing serves {res})" if is_primary else ""),
                      _cmd(f"{'up' if others_off else 'attach'} {res}", h))
        return  # the switches below are all off after 'marsadm down'; DETACHED says it once
    if is_primary:
        return  # the primary neither syncs, fetches nor replays
    if not sw.sync and not nr.sync.reached:
        yield Finding("HINT", "SYNC_PAUSED", res, h,
                      f"sync of {res} on {h} is paused at {_describe(nr.sync)}, and {h} stays inconsistent until it "
                      f"is done",
                      _cmd(f"resume-sync {res}", h))
    if not sw.fetch:
        behind = f" ({human_bytes(nr.fetch.rest_bytes)} of log not fetched)" \
            if nr.fetch is not None and nr.fetch.rest_bytes > 0 else ""
        yield Finding("HINT", "FETCH_PAUSED", res, h, f"fetch of {res} on {h} is switched off{behind}",
                      _cmd(f"connect {res}", h))
    if not sw.replay:
        behind = f" ({human_bytes(nr.replay.rest_bytes)} not replayed)" \
            if nr.replay is not None and nr.replay.rest_bytes > 0 else ""
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
