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
from .snapshot import Message, NodeResource, NodeStatus, Progress, ResourceStatus, Snapshot
from .units import figure, human_bytes, human_seconds

__all__ = ["Finding", "CODES", "LEVELS", "findings", "worst"]

LEVELS = ("TODO", "HINT", "WORK")  # severity order: what sorts first is the most urgent

GiB = 1 << 30
SPACE_LOW_FRACTION = 0.10  # below this share of /mars free (or below SPACE_LOW_BYTES): TODO
SPACE_LOW_BYTES = 1 * GiB
SPACE_WARN_FRACTION = 0.20  # below this share free: HINT

# The TODO codes where data is at risk or not served now: every face's most urgent class (a
# Prometheus alert's severity critical, a Zabbix trigger's HIGH), named once so the faces agree.
URGENT = frozenset({"SPLIT_BRAIN", "REPLAY_STOPPED", "NO_PRIMARY", "PRIMARY_NOT_SERVING", "EMERGENCY", "NODE_DOWN"})

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
            yield Finding("TODO", "EMERGENCY", None, h,
                          f"{h} is in emergency mode: its MARS directory ran full and its log stopped",
                          f"free space on {h} ({_cmd('log-delete-all all', h)}), then run 'marsadm invalidate "
                          f"<res>' on every secondary that fell behind")
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


def _space(h: str, ns: NodeStatus) -> Iterator[Finding]:
    rest, total = figure(ns.rest_space_bytes), figure(ns.total_space_bytes)
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
    local = snap.local_host or None
    for res, rs in sorted(snap.resources.items()):
        primary = rs.primary
        members = sorted(rs.nodes.items())
        if primary is None:
            yield Finding("TODO", "NO_PRIMARY", res, None,
                          f"resource {res} has no primary: nothing serves it and no log is written",
                          f"make the member with the newest data primary: {_cmd('primary ' + res, '<that node>')}")
        elif primary not in rs.nodes:
            yield Finding("TODO", "PRIMARY_NOT_MEMBER", res, primary,
                          f"resource {res} names {primary} as its primary, but {primary} is not a member "
                          f"(members: {', '.join(h for h, _ in members) or 'none'})",
                          f"make a member primary: {_cmd('primary ' + res, '<that node>')}")
        yield from _split(res, rs)
        yield from _cycles(res, rs)
        yield from _logs(snap, res, rs, local)
        yield from _resize(res, rs)
        for h, nr in members:
            yield from _member(snap, res, rs, h, nr)


def _split(res: str, rs: ResourceStatus) -> Iterator[Finding]:
    if not rs.split_brain:
        return
    parts: list[str] = []
    hosts: set[str] = set()
    for s in sorted(rs.split_brain, key=lambda s: s.seq):
        digests = sorted(s.digests.items())
        hosts.update(h for h, _ in digests)
        if digests and all(v.endswith(":log file") for _, v in digests):
            parts.append(f"log {s.seq} exists from {len(digests)} origins: " + ", ".join(h for h, _ in digests))
        else:
            parts.append(f"log {s.seq}: " + ", ".join(f"{h} has {v}" for h, v in digests))
    yield Finding("TODO", "SPLIT_BRAIN", res, None,
                  f"log versions of {res} differ: {' / '.join(parts)}",
                  f"decide which node's data survives; run 'marsadm invalidate {res}' on the others"
                  + (f" (of {', '.join(sorted(hosts))})" if hosts else ""))


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
    sizes = [figure(nr.disk_bytes) for nr in rs.nodes.values()]
    size = figure(rs.size_bytes)
    if not sizes or size is None or any(s is None for s in sizes):
        return
    smallest = min(s for s in sizes if s is not None)
    if smallest > size:
        gain = smallest - size
        yield Finding("HINT", "RESIZE_POSSIBLE", res, None,
                      f"every member's disk of {res} is larger than the resource: it can grow by "
                      f"{human_bytes(gain)} ({gain:.0f} bytes), from {human_bytes(size)} to "
                      f"{human_bytes(smallest)}",
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
