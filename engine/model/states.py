"""The original MARS's state names, read off the one snapshot: diskstate, replstate, flags, role.

MARS operators read a node as ``UpToDate Replaying DCAFSR Secondary`` (the upstream reference,
§2.2: first-match rules over switches, actual state and positions) and its progress in the
original's position arithmetic (§2.3: replay-size is the fetch position, work is fetch plus
replay). ``marsadm view``, mars-status and the exporters all show these names, so they are
computed here, once, from the snapshot, and never in a face.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..log.values import LogPos
from . import snapshot as model
from .units import human_bytes, human_seconds

__all__ = ["DISKSTATES", "REPLSTATES", "ROLES", "Member", "role_lines", "state_name"]

# Every name the first-match rules below can give, in the original's order: the exporters show a
# state as one series per possible value (a Prometheus stateset, a Zabbix value map), so the set
# must be known before any node is in it. tests/test_view.py checks the rules give no other.
DISKSTATES = ("NotJoined", "Detaching", "Detached", "DefectiveLog", "NoAttach", "InConsistent", "WriteBack",
              "Recovery", "OutDated", "EmergencyMode", "UpToDate")
REPLSTATES = ("MarsdNotRunning", "UnResponsive", "NotJoined", "NotStarted", "EmergencyMode", "Replicating",
              "NotYetPrimary", "Syncing", "PausedSync", "PausedFetch", "PausedReplay", "NoPrimaryDesignated",
              "PrimaryUnreachable", "Replaying")
# ForcedPrimary is ours (the original showed a forced primary as Primary): last, so the numbers
# the Zabbix value map gives the original's names stay what they were.
ROLES = ("None", "Primary", "NotYetPrimary", "RemainsPrimary", "Secondary", "ForcedPrimary")


def state_name(state: str) -> str:
    """A state without its detail in brackets: ``OutDated[FR]`` is ``OutDated``, one of DISKSTATES."""
    return state.split("[", 1)[0]


def _log_end_bytes(r: model.ResourceStatus) -> int:
    """The primary's log end as an absolute position (every member's fetch target)."""
    primary = r.nodes.get(r.primary or "")
    if primary is not None and primary.fetch is not None:
        return primary.fetch.size_bytes
    return max((p.size_bytes for n in r.nodes.values() for p in (n.fetch, n.replay) if p is not None), default=0)


@dataclass(frozen=True)
class Member:
    """One host's part in one resource: positions as the original's macros define them.

    The original's replay target is the *fetch position* (replay-size = fetch-pos), so the replay
    rest is what is fetched but not yet replayed; the fetch target is the log end; *work* is both
    (work-rest = log end − replay position). A host that is no member has zeros everywhere.
    """

    snap: model.Snapshot
    r: model.ResourceStatus
    host: str

    @property
    def n(self) -> model.NodeResource | None:
        return self.r.nodes.get(self.host)

    @property
    def node(self) -> model.NodeStatus | None:
        return self.snap.nodes.get(self.host)

    @property
    def alive(self) -> bool:
        return bool(self.node and self.node.alive)

    @property
    def designated(self) -> bool:
        return self.r.primary == self.host

    @property
    def primary_alive(self) -> bool:
        p = self.snap.nodes.get(self.r.primary or "")
        return bool(p and p.alive)

    # sync
    @property
    def sync_size(self) -> int:
        return self.r.size_bytes

    @property
    def sync_pos(self) -> int:
        return self.n.sync.pos_bytes if self.n else 0

    @property
    def sync_rate(self) -> float | None:
        return self.n.sync.rate_bytes_per_s if self.n else None

    # fetch
    @property
    def fetch_size(self) -> int:
        return self.n.fetch.size_bytes if self.n and self.n.fetch else _log_end_bytes(self.r)

    @property
    def fetch_pos(self) -> int:
        """What was replayed was fetched (or written here): never below the replay position."""
        known = self.n.fetch.pos_bytes if self.n and self.n.fetch else 0
        return max(known, self.replay_pos)

    @property
    def fetch_rate(self) -> float | None:
        return self.n.fetch.rate_bytes_per_s if self.n and self.n.fetch else None

    # replay
    @property
    def replay_pos(self) -> int:
        return self.n.replay.pos_bytes if self.n and self.n.replay else 0

    @property
    def replay_size(self) -> int:
        return self.fetch_pos

    @property
    def replay_rate(self) -> float | None:
        return self.n.replay.rate_bytes_per_s if self.n and self.n.replay else None

    # work = fetch + replay
    @property
    def work_pos(self) -> int:
        return self.replay_pos

    @property
    def work_size(self) -> int:
        return max(self.fetch_size, self.replay_pos)

    @property
    def work_rate(self) -> float | None:
        rates = [x for x in (self.fetch_rate, self.replay_rate) if x is not None]
        return max(rates) if rates else None

    def pos(self, what: str) -> int:
        return int(getattr(self, f"{what}_pos"))

    def size(self, what: str) -> int:
        return int(getattr(self, f"{what}_size"))

    def progress(self, what: str) -> model.Progress:
        """The macro's position as the model's Progress: rest, percent, stall and time left computed there."""
        return model.Progress(self.pos(what), self.size(what), self.rate(what), self._moved_age(what))

    def _moved_age(self, what: str) -> float | None:
        n = self.n
        if n is None or what == "work":
            return None
        p = {"sync": n.sync, "fetch": n.fetch, "replay": n.replay}[what]
        return p.moved_age_s if p is not None else None

    def rest(self, what: str) -> int:
        return self.progress(what).rest_bytes

    def reached(self, what: str) -> bool:
        return self.progress(what).reached

    def percent(self, what: str) -> float:
        return self.progress(what).percent

    def rate(self, what: str) -> float | None:
        rate: float | None = getattr(self, f"{what}_rate")
        return rate

    def remain(self, what: str) -> float | None:
        if what == "work":
            parts = [self.remain("fetch"), self.remain("replay")]
            return None if None in parts else sum(parts)  # type: ignore[arg-type]
        return self.progress(what).remaining_s

    def fetch_log(self) -> LogPos | None:
        """Where this member's log ends as far as it has it: the primary's acknowledged log end
        while it serves, a secondary's fetch position."""
        n = self.n
        if n is None:
            return None
        if self.designated and n.actual.primary:
            return self.r.log_end
        return n.fetch_pos

    def lognr(self, what: str) -> int | None:
        """The log file number of the replay or fetch position (the original's replay/fetch-lognr)."""
        n = self.n
        if n is None:
            return None
        pos = (n.replay_link.logpos if n.replay_link else None) if what == "replay" else self.fetch_log()
        return pos.seq if pos else None

    # the original's complex macros (§2.2), first match wins

    @property
    def disk_present(self) -> bool:
        """The data device is there as far as the tree knows: attached now, or its size was reported."""
        n = self.n
        return n is not None and (n.actual.attached or n.disk_bytes is not None)

    def diskstate(self) -> str:
        n = self.n
        if n is None:
            return "NotJoined"
        if not n.switches.attach:
            return "Detaching" if n.actual.attached else "Detached"
        if n.log_damaged and n.replay_code is not None:
            return f"DefectiveLog[{n.replay_code.brief}]"
        if not n.actual.attached:
            return "NoAttach"
        if not n.consistent:
            if not self.designated:
                return "InConsistent"
            return "WriteBack" if n.actual.primary else "Recovery"
        if not self.reached("work"):
            if not self.designated:
                return f"OutDated[{self.outdated_flags()}]"
            return "WriteBack" if n.actual.primary else "Recovery"
        p = self.snap.nodes.get(self.r.primary or "")
        if p is not None and p.emergency:
            return "EmergencyMode"
        return "UpToDate"

    def outdated_flags(self) -> str:
        return ("" if self.reached("fetch") else "F") + ("" if self.reached("replay") else "R")

    def replstate(self) -> str:
        n = self.n
        if self.host == self.snap.local_host and not self.snap.marsd_running:
            return "MarsdNotRunning"  # the original's ModuleNotLoaded
        if not self.alive:
            return "UnResponsive"
        if n is None:
            return "NotJoined"
        if not n.switches.attach:
            return "NotStarted"
        if self.designated:
            if self.node is not None and self.node.emergency:
                return "EmergencyMode"
            return "Replicating" if n.actual.primary else "NotYetPrimary"
        if not self.reached("sync"):
            return "Syncing" if n.switches.sync else "PausedSync"
        if n.actual.syncing:
            return "Syncing"
        if not n.switches.fetch:
            return "PausedFetch"
        if not n.switches.replay:
            return "PausedReplay"
        if self.r.primary is None:
            return "NoPrimaryDesignated"
        if not self.primary_alive:
            return "PrimaryUnreachable"
        return "Replaying"

    def flags(self) -> str:
        """Six characters: disk D/d/-, consistency C/c/-, attach A/a/-, sync S/s/-, fetch F/f/-, replay R/r/-.

        Capitals mean done (device served, consistent, attached, sync/fetch/replay reached),
        small letters mean switched on but not there yet, ``-`` means off.
        """
        n = self.n
        if n is None:
            return "------"
        disk = self.disk_present
        sw = n.switches
        return "".join((
            ("D" if n.actual.primary and n.actual.attached else "d") if disk else "-",
            "C" if n.consistent else ("c" if disk else "-"),
            ("A" if sw.attach else "a") if n.actual.attached else ("a" if sw.attach else "-"),
            "S" if self.reached("sync") else ("s" if sw.sync else "-"),
            "F" if self.reached("fetch") else ("f" if sw.fetch else "-"),
            "R" if self.reached("replay") else ("r" if sw.replay else "-"),
        ))

    def role(self) -> str:
        """The member's own :attr:`~mars.engine.model.NodeResource.role` (one definition: marsd's
        state events name it too); None for a host that is no member."""
        n = self.n
        return "None" if n is None else n.role

    def todo_role(self) -> str:
        if self.n is None:
            return "None"
        return "Primary" if self.designated else "Secondary"

    def primarynode(self) -> str:
        return self.host if self.designated else (self.r.primary or "(none)")


def held_back(snap: model.Snapshot, n: model.NodeResource, what: str) -> str:
    """Why ``what`` (sync, fetch, replay) of this member cannot move, or "" when it may.

    The last rate a node published stays in the tree after it stopped; every face names the
    reason instead of that rate ("node not alive", "detached", "stopped", "paused").
    """
    ns = snap.nodes.get(n.host)
    if ns is None or not ns.alive:
        return "node not alive"
    if n.designated_primary:
        return ""
    if not n.switches.attach:
        return "detached"
    if what == "replay" and n.replay_stopped:
        return "stopped"
    on = {"sync": n.switches.sync, "fetch": n.switches.fetch, "replay": n.switches.replay}[what]
    return "" if on else "paused"


def role_lines(r: model.ResourceStatus) -> list[tuple[str, str]]:
    """The resource's role switching as every face shows it, one fact a line: a handover in
    progress, a forced primary, and per split brain which side is kept and which diverged, with
    each host's bytes beyond the split point. Facts of the snapshot, no verdict (the findings
    say what is wrong and what to do); empty for a resource that is in none of these states.

    Each line is (what, text), ``what`` one of "handover", "forced", "split": a face that
    styles lines styles by it, never by the text.
    """
    out: list[tuple[str, str]] = []
    if r.handover_to is not None:
        since = f" for {human_seconds(r.handover_age_s)}" if r.handover_age_s is not None else ""
        out.append(("handover", f"handover of {r.name} from {r.prev_primary or 'the old primary'} to {r.handover_to} "
                   f"in progress{since}"))
    if r.forced_primary is not None:
        before = r.prev_primary if r.prev_primary not in (None, r.forced_primary) else "unknown"
        out.append(("forced", f"forced primary: {r.forced_primary} (made primary by force; the primary before was "
                               f"{before})"))
    shown: set[str] = set()
    for s in sorted(r.split_brain, key=lambda s: s.seq):
        sides = s.sides
        kept = next((hs for hs in sides if r.primary in hs), sides[0] if sides else [])
        parts = []
        for hs in sides:
            beyond = [(h, s.beyond_bytes[h]) for h in hs if h in s.beyond_bytes]
            if len(hs) == 1 and beyond:
                figures = f"{human_bytes(beyond[0][1])} beyond the split point"
            elif beyond:
                figures = ", ".join(f"{human_bytes(n)} ({h})" for h, n in beyond) + " beyond the split point"
            else:
                figures = ""
            if hs is kept:
                why = "the designated primary's side" if r.primary in hs else "the furthest log end, once made primary"
                parts.append(f"kept {', '.join(hs)} ({why}{', ' + figures if figures else ''})")
            else:
                parts.append(f"diverged {', '.join(hs)}" + (f" ({figures})" if figures else ""))
            shown.update(hs)
        out.append(("split", f"split brain from log {s.seq} on: " + "; ".join(parts)))
    for h, text in r.split_reported.items():
        if h not in shown:
            out.append(("split", f"split brain: diverged {h} (its marsd reports it: {text})"))
    return out
