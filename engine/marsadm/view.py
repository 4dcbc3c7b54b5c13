"""marsadm view: the original's status display and its macros, rendered from the one snapshot.

Three spellings, one source of truth:

* ``marsadm view [all|res[,res]]`` — for people: per resource the original's separator and status
  line (``<res> [alive/members] <diskstate> <replstate> <flags> <role> <primarynode>``), the
  sync and replay progress of this node, then one line per other member (the tree knows every
  member's state, so the view shows it), then the findings.
* ``marsadm view-<macro> <res>`` (or ``view --macro <macro> <res>``) — for scripts: exactly one
  value on stdout, as the original's primitive macros; bools are 0/1, sizes bytes (but
  ``rest-space`` and ``total-space`` are the original's whole GiB, for the scripts written
  against it; ``*-space-bytes`` give bytes), rates bytes/s, times seconds, and -1 means unknown.
  A few of the original's complex macros print the view's lines instead (``syncinfo``,
  ``replinfo`` and their ``*-line`` parts, ``comminfo``): for people, and empty when the view
  shows nothing there.
* ``marsadm view --json [res]`` — for programs: the snapshot plus its findings.

Why nothing here reads the tree or judges: this is a face of :mod:`mars.engine.model`, like
mars-status and the exporters. The snapshot, the original's state names (the model's
:class:`~mars.engine.model.Member`) and every verdict (WORK/TODO/HINT) come from there, so
this view and the other faces can never disagree. What is left here is layout and the macro
table.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import model
from ..errors import UsageError
from ..model import Finding, Member, figure, findings, human_bytes, human_seconds, role_lines, value_text
from ..tree import check_name, require_cluster
from .base import Ctx, command

BAR_WIDTH = 20


# --- the snapshot --------------------------------------------------------------------------

def _snapshot(ctx: Ctx) -> tuple[model.Snapshot, bool]:
    """The snapshot (with marsd's live lines when its control socket answers) and whether it answered."""
    window = getattr(ctx.args, "window", None)
    window_s = model.ALIVE_WINDOW_S if window is None else window
    if window_s <= 0:
        raise UsageError(f"--window {window:g} is not a positive number of seconds", "give e.g. --window 30")
    return model.live_snapshot(ctx.tree.root, ctx.host, window_s=window_s)


# --- macros ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Macro:
    name: str
    help: str
    func: Callable[[model.Snapshot, Member | None, str], object]
    per_resource: bool = True


MACROS: dict[str, Macro] = {}


def _macro(name: str, help: str, func: Callable[..., object], per_resource: bool = True) -> None:
    MACROS[name] = Macro(name, help, func, per_resource)


def _num(x: float | None) -> int:
    """Integers for scripts: rounded up for time left (never 0 while something is left), -1 unknown."""
    if x is None:
        return -1
    return math.ceil(x) if x > 0 else 0


def _pct(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _tunable(snap: model.Snapshot, host: str, name: str) -> str | None:
    node = snap.nodes.get(host)
    t = node.tunable(name) if node else None
    return t.value if t else None


def _tunable_in_force(snap: model.Snapshot, host: str, name: str) -> str:
    node = snap.nodes.get(host)
    t = node.tunable(name) if node else None
    return (t.actual_value or t.set_value or "") if t else ""


def _tunable_set(snap: model.Snapshot, host: str, name: str) -> str:
    node = snap.nodes.get(host)
    t = node.tunable(name) if node else None
    return t.set_value or "" if t else ""


def _register() -> None:
    _macro("get-primary", "the designated primary of the resource ('' when none)",
           lambda s, m, h: m.r.primary or "")
    _macro("todo-primary", "1 when this host is the designated primary", lambda s, m, h: m.designated)
    _macro("todo-secondary", "1 when no primary is designated", lambda s, m, h: m.r.primary is None)
    _macro("is-primary", "1 when this host actually serves as primary",
           lambda s, m, h: bool(m.n and m.n.actual.primary))
    _macro("is-secondary", "1 when this host is a member that does not serve as primary",
           lambda s, m, h: bool(m.n and not m.n.actual.primary))
    for sw, field_ in (("attach", "attach"), ("sync", "sync"), ("fetch", "fetch"), ("replay", "replay")):
        _macro(f"todo-{sw}", f"1 when the {sw} switch of this host is on",
               lambda s, m, h, f=field_: bool(m.n and getattr(m.n.switches, f)))
    for sw, field_ in (("attach", "attached"), ("sync", "syncing"), ("fetch", "fetching"),
                       ("replay", "replaying")):
        _macro(f"is-{sw}", f"1 when this host reports {field_}",
               lambda s, m, h, f=field_: bool(m.n and getattr(m.n.actual, f)))
    _macro("is-alive", "1 when this host reported within the alive window (the original asked about "
           "the primary by default; use --host for any node)",
           lambda s, m, h: bool(s.nodes.get(h) and s.nodes[h].alive), per_resource=False)
    _macro("is-module-loaded", "1 when marsd runs on this host (the original's kernel module)",
           lambda s, m, h: s.marsd_running, per_resource=False)
    _macro("is-split-brain", "1 when members hold different histories for the same log number, or a member's "
           "marsd reports that its history diverges from the primary's",
           lambda s, m, h: m.r.is_split_brain)
    _macro("is-emergency", "1 when this host is in emergency mode (/mars full: level 4, or still writing through)",
           lambda s, m, h: bool(s.nodes.get(h) and s.nodes[h].emergency))
    _macro("emergency-level", "this host's emergency level: 0 normal .. 4 (/mars full), as the original's",
           lambda s, m, h: s.nodes[h].emergency_level if s.nodes.get(h) else -1, per_resource=False)
    _macro("is-consistent", "1 when this host's data device holds a consistent state",
           lambda s, m, h: bool(m.n and m.n.consistent))
    _macro("is-orphan", "always 0: logs are deleted only after every member has replayed them",
           lambda s, m, h: False)
    _macro("is-member", "1 when this host is a member of the resource", lambda s, m, h: m.n is not None)
    _macro("get-disk", "this host's data device or image", lambda s, m, h: m.n.disk if m.n else "")
    _macro("disk-size", "bytes of this host's data device as it last reported (-1 unknown)",
           lambda s, m, h: m.n.disk_bytes if m.n and m.n.disk_bytes is not None else -1)
    _macro("resource-size", "bytes of the resource", lambda s, m, h: m.r.size_bytes)
    _macro("device-opened", "NBD clients connected to this host's export",
           lambda s, m, h: m.n.actual.open_count if m.n else 0)
    for what, noun in (("sync", "full sync"), ("fetch", "log fetch"), ("replay", "log replay"),
                       ("work", "fetch and replay together")):
        _macro(f"{what}-pos", f"bytes done of the {noun}", lambda s, m, h, w=what: m.pos(w))
        _macro(f"{what}-size", f"bytes to do for the {noun}", lambda s, m, h, w=what: m.size(w))
        _macro(f"{what}-rest", f"bytes left of the {noun}", lambda s, m, h, w=what: m.rest(w))
        _macro(f"{what}-reached", f"1 when the {noun} is complete", lambda s, m, h, w=what: m.reached(w))
        _macro(f"{what}-percent", f"percent done of the {noun}", lambda s, m, h, w=what: _pct(m.percent(w)))
        _macro(f"{what}-rate", f"bytes/s of the {noun} (0 when nothing moves)",
               lambda s, m, h, w=what: _num(m.rate(w) or 0))
        _macro(f"{what}-remain", f"seconds left of the {noun} at the current rate (-1 unknown)",
               lambda s, m, h, w=what: _num(m.remain(w)))
    _macro("replay-code", "this host's replay/attach code; negative (-1,<code>,<offset>) when replay "
           "stopped at a damaged record; 0 when none",
           lambda s, m, h: (str(m.n.replay_code) if m.n and m.n.replay_code else 0))
    _macro("deletable-size", "bytes of local log files every member has replayed",
           lambda s, m, h: m.r.deletable_bytes)
    _macro("rest-space", "GiB free in this host's /mars, rounded down, as the original (-1 unknown)",
           lambda s, m, h: _gib(_node_int(s, h, "rest_space_bytes")), per_resource=False)
    _macro("total-space", "GiB of this host's /mars filesystem, rounded down, as the original (-1 unknown)",
           lambda s, m, h: _gib(_node_int(s, h, "total_space_bytes")), per_resource=False)
    _macro("rest-space-bytes", "bytes free in this host's /mars (-1 unknown)",
           lambda s, m, h: _node_int(s, h, "rest_space_bytes"), per_resource=False)
    _macro("total-space-bytes", "bytes of this host's /mars filesystem (-1 unknown)",
           lambda s, m, h: _node_int(s, h, "total_space_bytes"), per_resource=False)
    _macro("fetch-age", "seconds since this host's fetch position last moved (-1 unknown)",
           lambda s, m, h: _num(m.n.fetch_age_s if m.n else None))
    _macro("replay-age", "seconds since this host's replay position last moved (-1 unknown)",
           lambda s, m, h: _num(m.n.replay_age_s if m.n else None))
    _macro("fetch-lag", "seconds its fetch position is older than the primary's log end (0 caught up, -1 unknown)",
           lambda s, m, h: _num(m.n.fetch_lag_s if m.n else None))
    _macro("replay-lag", "seconds its replay position is older than the primary's (0 caught up, -1 unknown)",
           lambda s, m, h: _num(m.n.replay_lag_s if m.n else None))
    _macro("alive-age", "seconds since this host's last report (-1 never)",
           lambda s, m, h: _num(s.nodes[h].seen_age_s if h in s.nodes else None), per_resource=False)
    _macro("resource-peers", "the members of the resource, comma-separated",
           lambda s, m, h: ",".join(m.r.members))
    _macro("count-resource-peers", "the number of members of the resource",
           lambda s, m, h: len(m.r.members))
    _macro("cluster-peers", "the nodes of the cluster, comma-separated",
           lambda s, m, h: ",".join(sorted(s.nodes)), per_resource=False)
    _macro("count-cluster-peers", "the number of nodes of the cluster",
           lambda s, m, h: len(s.nodes), per_resource=False)
    _macro("global-sync-limit-value", "how many full syncs this host runs at once (0 = no limit)",
           lambda s, m, h: _tunable(s, h, "sync-limit") or 0, per_resource=False)
    for name, spec in model.TUNABLES.items():
        _macro(f"{name}-value", f"{name} in force on this host, in {spec.unit} (marsd's report, else the tree's)",
               lambda s, m, h, name=name: _tunable_in_force(s, h, name), per_resource=False)
        _macro(f"{name}-set-value", f"{name} set in the tree for this host ('' when unset: the default holds)",
               lambda s, m, h, name=name: _tunable_set(s, h, name), per_resource=False)
    _macro("uuid", "the cluster's uuid", lambda s, m, h: s.cluster_uuid or "", per_resource=False)
    _macro("time", "the Lamport clock, seconds since the epoch", lambda s, m, h: f"{s.lamport_s:.9f}",
           per_resource=False)
    _macro("real-time", "the wall clock, whole seconds since the epoch", lambda s, m, h: int(s.taken_at_s),
           per_resource=False)
    _macro("diskstate", "the state of this host's data (UpToDate, OutDated[FR], InConsistent, ...)",
           lambda s, m, h: m.diskstate())
    _macro("replstate", "what this host's replication does (Replicating, Replaying, Syncing, Paused..., ...)",
           lambda s, m, h: m.replstate())
    _macro("flags", "six flags: disk D(device served)/d(disk only)/-, consistent C/c/-, attached A/a/-, "
           "sync S/s/-, fetch F/f/-, replay R/r/- (capital: done; small: switched on, not there yet; -: off)",
           lambda s, m, h: m.flags())
    _macro("role", "None, Secondary, NotYetPrimary, Primary, ForcedPrimary (made primary by force) or "
           "RemainsPrimary (serving, but no longer designated)", lambda s, m, h: m.role())
    _macro("todo-role", "the designated role: None, Primary or Secondary", lambda s, m, h: m.todo_role())
    _macro("primarynode", "this host when it is the designated primary, else the primary or (none)",
           lambda s, m, h: m.primarynode())
    # The original's complex macros that print lines of the view (§2.2), for people.
    _macro("syncinfo", "the sync progress line the view shows for this host (empty unless it is an attached "
           "secondary with sync left)", lambda s, m, h: _text(_sync_lines(m) if _sync_shown(m) else []))
    _macro("sync-line", "syncinfo's progress line (it carries the rate and time left itself; empty as syncinfo)",
           lambda s, m, h: _text((_sync_lines(m) if _sync_shown(m) else [])[:1]))
    _macro("replinfo", "the replay progress lines the view shows for this host: the bar, then fetch-line and "
           "replay-line (empty unless it is an attached secondary with fetch or replay left)",
           lambda s, m, h: _text(_repl_lines(m, s.window_s) if _repl_shown(m) else []))
    _macro("fetch-line", "replinfo's '> fetch:' line: bytes left, age when stuck, rate, time left (empty as replinfo)",
           lambda s, m, h: _text((_repl_lines(m, s.window_s) if _repl_shown(m) else [])[1:2]))
    _macro("replay-line", "replinfo's '> replay:' line: bytes left, age when stuck, rate, time left (empty as "
           "replinfo)", lambda s, m, h: _text((_repl_lines(m, s.window_s) if _repl_shown(m) else [])[2:3]))
    _macro("comminfo", "the heading '++++ Global / Communication Status ++++', then a line per peer link a live "
           "node reports broken and the Lamport time slip when it exceeds the alive window",
           lambda s, m, h: _text(_comm_lines(s)), per_resource=False)


def _node_int(snap: model.Snapshot, host: str, attr: str) -> int:
    node = snap.nodes.get(host)
    v = getattr(node, attr) if node else None
    return -1 if v is None else int(v)


def _gib(nbytes: int) -> int:
    """Whole GiB, rounded down, as the original's rest-space and total-space (scripts compare
    them with GiB thresholds); -1 (unknown) stays -1."""
    return -1 if nbytes < 0 else nbytes >> 30


_register()


def _help_text() -> str:
    width = max(len(n) for n in MACROS)
    lines = [("macros for 'marsadm view-<macro> <res>' (H is --host; bools 0/1, sizes bytes except rest-space and "
              "total-space in whole GiB as the original, rates bytes/s, times seconds, -1 unknown; syncinfo, replinfo, "
              "comminfo and the *-line macros print the view's lines, empty when it shows none):")]
    for name in sorted(MACROS):
        mac = MACROS[name]
        lines.append(f"  {name:<{width}}  {mac.help}{'' if mac.per_resource else ' [no resource needed]'}")
    return "\n".join(lines)


# --- resources -------------------------------------------------------------------------------

def resources_named(ctx: Ctx, snap: model.Snapshot, spec: str) -> list[str]:
    """``all``: the resources this host is a member of; else the named ones, which must exist.

    view and wait-cluster/wait-resource take resources the same way; an unknown name is refused
    with the names that do exist.
    """
    if spec == "all":
        return [name for name, r in sorted(snap.resources.items()) if ctx.host in r.nodes]
    names = [check_name("resource", x) for x in spec.split(",") if x]
    if not names:
        raise UsageError("no resource given", "name a resource or 'all'")
    for name in names:
        if name not in snap.resources:
            e = snap.unknown_resource(name)
            e.subject = f"{ctx.command} {name}"
            raise e
    return names


# --- the human view --------------------------------------------------------------------------

def _bar(done: int, mid: int, total: int, width: int = BAR_WIDTH) -> str:
    """``[=====+++....]``: '=' done, '+' on its way (fetched, not yet replayed), '.' still to come."""
    if total <= 0:
        return "[" + "=" * width + "]"
    a = min(width, int(width * done / total))
    b = min(width, max(a, int(width * mid / total)))
    return "[" + "=" * a + "+" * (b - a) + "." * (width - b) + "]"


def _rate_text(rate: float | None) -> str:
    return "unknown" if rate is None else f"{human_bytes(rate)}/s"


def _text(lines: list[str]) -> str:
    """A line macro's value: its lines, or the empty string when the view shows none there."""
    return "\n".join(lines)


def _sync_shown(m: Member) -> bool:
    """The view shows this member's sync: an attached secondary with bytes left to sync."""
    n = m.n
    return n is not None and not n.actual.primary and n.actual.attached and not m.reached("sync")


def _repl_shown(m: Member) -> bool:
    """The view shows this member's fetch and replay: an attached secondary with work left."""
    n = m.n
    return n is not None and not n.actual.primary and n.actual.attached and not m.reached("work")


def _comm_lines(snap: model.Snapshot) -> list[str]:
    """comminfo: the heading, each broken peer link a live node reports, a Lamport clock running ahead.

    Live by its report's age: the model also counts a node as down when no other node can reach
    it, but what such a node reports (it may be the one whose links broke) is the point here.
    """
    out = ["++++ Global / Communication Status ++++"]
    for h, n in sorted(snap.nodes.items()):
        if n.seen_age_s is not None and n.seen_age_s <= snap.window_s:
            out += [f"  {h} cannot reach {peer}: {why}" for peer, why in sorted(n.link_errors.items())]
    slip = figure(snap.clock_slip_s)
    if slip is not None and slip > snap.window_s:
        out.append(f"  Lamport time slip: {human_seconds(slip)}")
    return out


def _sync_lines(m: Member) -> list[str]:
    rem = human_seconds(m.remain("sync"))
    return [(f"     syncing: {_bar(m.sync_pos, m.sync_pos, m.sync_size)} {m.percent('sync'):6.2f}%  "
             f"({human_bytes(m.sync_pos)}/{human_bytes(m.sync_size)})  rate: {_rate_text(m.sync_rate)}  "
             f"remaining: {rem}")]


def _repl_lines(m: Member, window_s: float) -> list[str]:
    first, last = m.lognr("replay"), m.lognr("fetch")
    logs = f"  logs: [{first if first is not None else '?'}..{last if last is not None else '?'}]"
    out = [(f"     replaying: {_bar(m.replay_pos, m.fetch_pos, m.fetch_size)} {m.percent('work'):6.2f}%  "
            f"({human_bytes(m.replay_pos)}/{human_bytes(m.fetch_size)}){logs}")]
    n = m.n
    for what, age in (("fetch", n.fetch_age_s if n else None), ("replay", n.replay_age_s if n else None)):
        age_text = f" age: {human_seconds(age)}" if (m.rest(what) and age is not None and age >= window_s) else ""
        out.append(f"       > {what}: {human_bytes(m.rest(what))}{age_text} rate: {_rate_text(m.rate(what))} "
                   f"remaining: {human_seconds(m.remain(what))}")
    return out


def _brief(label: str, p: model.Progress | None) -> str:
    """The snapshot's own figures (the same the findings quote): done, or percent, rest, rate, time left."""
    if p is None:
        return f"{label}: unknown"
    if p.reached:
        return f"{label}: done"
    text = f"{label}: {p.percent_text()}% rest {human_bytes(p.rest_bytes)}"
    if p.stalled:
        text += f", no progress for {human_seconds(p.moved_age_s)}"
    elif p.moving:
        text += f" at {human_bytes(p.rate_bytes_per_s)}/s, {human_seconds(p.remaining_s)} left"
    return text


def _node_line(m: Member) -> str:
    n = m.n
    assert n is not None  # only members get a node line
    line = (f"    node {m.host}: {m.diskstate()} {m.replstate()} {m.flags()} {m.role()}  "
            f"{_brief('sync', n.sync)}  {_brief('fetch', n.fetch)}  {_brief('replay', n.replay)}")
    if not m.alive:
        age = m.node.seen_age_s if m.node else None
        line += "  (never reported)" if age is None else f"  (last report {human_seconds(age)} ago)"
    return line


def _log_lines(r: model.ResourceStatus) -> list[str]:
    out = ["    logs:"]
    if not r.logs:
        out.append("      none")
    for f in r.logs:
        here = "not here" if f.local_bytes is None else human_bytes(f.local_bytes)
        vers = " ".join(f"{h}={v.digest[:8]}" for h, v in sorted(f.versions.items())) or "no versions yet"
        mark = "  deletable" if f.name in r.deletable_logs else ""
        out.append(f"      {f.name}  {here}  {vers}{mark}")
    return out


def render(snap: model.Snapshot, names: list[str], fs: list[Finding], verbose: bool = False) -> str:
    """The human view of the named resources, then the node-level findings: one pure function."""
    lines: list[str] = []
    host = snap.local_host
    for name in names:
        r = snap.resources[name]
        members = r.members
        alive = sum(1 for h in members if snap.nodes.get(h) and snap.nodes[h].alive)
        peers = f"[{alive}/{len(members)}]"
        lines.append(f"--------- resource {name} {human_bytes(r.size_bytes)} {peers}")
        me = Member(snap, r, host)
        if me.n is not None:
            lines.append(f"  {name} {peers} {me.diskstate()} {me.replstate()} {me.flags()} {me.role()} "
                         f"{me.primarynode()}")
            if _sync_shown(me):
                lines += _sync_lines(me)
            if _repl_shown(me):
                lines += _repl_lines(me, snap.window_s)
        else:
            lines.append(f"  {name} {peers} host {host} is no member; primary {r.primary or '(none)'}")
        lines += [f"  {text}" for _, text in role_lines(r)]
        for h in members:
            if h != host:
                lines.append(_node_line(Member(snap, r, h)))
        if verbose:
            lines += _log_lines(r)
        lines += [f"  {f.line()}" for f in fs if f.res == name]
    node_fs = [f for f in fs if f.res is None]
    alive = sum(1 for n in snap.nodes.values() if n.alive)
    lines.append(f"--------- cluster {snap.cluster_uuid or '(no uuid)'} [{alive}/{len(snap.nodes)} nodes alive]")
    lines += [f"  {f.line()}" for f in node_fs]
    return "\n".join(lines) + "\n"


def to_json(snap: model.Snapshot, names: list[str] | None, fs: list[Finding]) -> dict[str, Any]:
    doc = snap.to_json()
    if names is not None:
        doc["resources"] = {k: v for k, v in doc["resources"].items() if k in names}
        fs = [f for f in fs if f.res is None or f.res in names]
    doc["findings"] = [f.to_json() for f in fs]
    return doc


# --- the command -----------------------------------------------------------------------------

@command("view", "show the state of resources, one macro's value (--macro, or view-<macro>), or JSON",
         ("resource", {"nargs": "?", "default": None,
                       "help": "resource name, comma-separated names, or 'all' (default: all)"}),
         ("--macro", {"metavar": "NAME", "default": None,
                      "help": "print one value, as 'marsadm view-NAME'; 'help' lists the macros"}),
         ("--json", {"action": "store_true", "help": "the whole snapshot and its findings as JSON"}),
         ("--verbose", {"action": "store_true", "help": "also list the log files with every node's versions"}),
         node=False)
def view(ctx: Ctx) -> None:
    args = ctx.args
    if args.macro is not None:
        _view_macro(ctx, args.macro, args.resource)
        return
    require_cluster(ctx.tree)
    snap, answered = _snapshot(ctx)
    spec = args.resource or "all"
    names = resources_named(ctx, snap, spec)
    fs = findings(snap)
    if not answered:
        why = "does not answer" if snap.marsd_running else "is not running"
        ctx.say(f"marsd {why} on host {ctx.host}; showing what the tree knows")
    if args.json:
        json.dump(to_json(snap, None if spec == "all" else names, fs), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    if not names:
        ctx.say(f"host {ctx.host} is a member of no resource; name one to view it")
    sys.stdout.write(render(snap, names, fs, verbose=args.verbose))


def _view_macro(ctx: Ctx, name: str, spec: str | None) -> None:
    if ctx.args.json:
        raise UsageError("--json and a macro exclude each other", "use one of them")
    if name == "help":
        print(_help_text())
        return
    mac = MACROS.get(name)
    if mac is None:
        raise UsageError(f"unknown macro {name!r}", "list the macros with 'marsadm view-help'")
    require_cluster(ctx.tree)
    snap, _ = _snapshot(ctx)
    member: Member | None = None
    names = resources_named(ctx, snap, spec) if spec else []  # a named resource must exist, even if unused
    if mac.per_resource:
        if not spec:
            raise UsageError(f"macro {name} needs a resource", f"run 'marsadm view-{name} <resource>'")
        if len(names) != 1 or spec == "all":
            raise UsageError(f"macro {name} prints one value and takes one resource, not {spec!r}",
                             f"run 'marsadm view-{name} <resource>' once per resource")
        member = Member(snap, snap.resources[names[0]], ctx.host)
    print(value_text(mac.func(snap, member, ctx.host)))


__all__ = ["MACROS", "Member", "render", "to_json", "view"]
