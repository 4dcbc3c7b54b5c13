"""mars-status as styled lines: one pure function of the snapshot and its findings.

Why lines of spans and not text or widgets: the plain-text output (cron mails, pipes, the
monitor function of the original, seed §4.2) and the Textual app show exactly the same thing,
so both are renderings of :func:`render`'s result. A span's style names a meaning ("todo",
"ok", "bar"), never a colour; the TUI maps meanings to colours in its stylesheet, and the plain
text drops them. Every WORK/TODO/HINT line carries its word, so nothing depends on colour.

What this module must not do (one status model, many faces): read the tree, ask marsd, or
decide whether something is wrong. It imports :mod:`mars.engine.model` and nothing else of the
engine: figures come from its snapshot, every verdict from its findings, and the original's
state names (diskstate, replstate, flags, role) from its :class:`Member`. The only judgement
here is *where* a finding is shown (which node, which resource) and which findings make up the
four words of the cluster line.

Layout, after the original's mars-status (the seed's chapter 4.3): header, cluster line,
``--system`` block, resources (per node Device/Sync/Fetch/Replay/Actual/Switches and the
findings about that node), then the ``--status`` bars, ``--debug`` and ``--history`` blocks.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from .. import __version__
from ..engine.model import (
    DEFAULT_PEER_PORT,
    Finding,
    LogFileStatus,
    Member,
    NodeResource,
    Progress,
    ResourceStatus,
    Snapshot,
    held_back,
    human_bytes,
    human_seconds,
    relevant,
    role_lines,
    verdict,
    worst,
)

__all__ = [
    "CLUSTER_ASPECTS",
    "STYLES",
    "VIEWS",
    "Line",
    "Options",
    "Span",
    "bar",
    "check",
    "cluster_words",
    "plain",
    "relevant",
    "render",
]

STYLES = ("", "head", "ok", "off", "work", "todo", "hint", "dim", "bar", "value")


class Span(NamedTuple):
    """A piece of a line and what it means (one of :data:`STYLES`; "" is ordinary text).

    A named tuple, not a validating dataclass: a big cluster's screen is ~70,000 spans per
    refresh, and checking each one's style cost a tenth of the render time; the tests check that
    render() only uses known styles.
    """

    text: str
    style: str = ""


Line = tuple[Span, ...]

VIEWS = ("history", "system", "status", "debug")


@dataclass(frozen=True)
class Options:
    """What to show. The default view is always shown; ``views`` adds the original's blocks."""

    views: frozenset[str] = frozenset()
    resource: str | None = None
    ascii: bool = False
    width: int = 100

    def __post_init__(self) -> None:
        unknown = set(self.views) - set(VIEWS)
        if unknown:
            raise ValueError(f"unknown view {', '.join(sorted(unknown))}; the views are {', '.join(VIEWS)}")


# The cluster line's four words (the original's "Diskspace / Transaktions / Connects / Synclimit"):
# each is "smoothly" or the worst level among the findings of these codes.
CLUSTER_ASPECTS: tuple[tuple[str, frozenset[str]], ...] = (
    ("Diskspace", frozenset({"SPACE_LOW", "SPACE_WARN", "EMERGENCY"})),
    ("Transactions", frozenset({"REPLAY_STOPPED", "SPLIT_BRAIN", "LOGS_DELETABLE", "LOGS_HELD_BACK"})),
    ("Connects", frozenset({"NODE_DOWN", "PEER_UNREACHABLE", "FETCH_FAILING"})),
    ("Synclimit", frozenset({"SYNC_RUNNING", "SYNC_PAUSED"})),
)

_LEVEL_STYLE = {"WORK": "work", "TODO": "todo", "HINT": "hint"}
_ROLE_STYLE = {"handover": "work", "forced": "hint", "split": "todo"}  # the model's role_lines kinds
BAR_MIN, BAR_MAX = 10, 50


# --- small builders --------------------------------------------------------------------------

def _line(*parts: str | Span) -> Line:
    return tuple(p if isinstance(p, Span) else Span(p) for p in parts if (p.text if isinstance(p, Span) else p))


def _v(text: str) -> Span:
    return Span(text, "value")


def _head(text: str) -> Line:
    return (Span(text, "head"),)


def _onoff(flag: bool) -> Span:
    return Span("on", "ok") if flag else Span("off", "off")


def _finding_line(f: Finding, indent: str = "") -> Line:
    """``---> TODO: <text>; <remedy>``: the word makes it readable without colour."""
    text = f"{indent}---> {f.level}: {f.text}"
    if f.remedy:
        text += f"; {f.remedy}"
    return (Span(text, _LEVEL_STYLE[f.level]),)


def _bytes(n: int) -> list[Span]:
    """``268435456000 bytes (250.0 GiB)``, as the original: exact bytes, then a human figure."""
    return [_v(f"{n} bytes"), Span(" ("), _v(human_bytes(n)), Span(")")]


def _pct(p: Progress) -> str:
    """Two decimals, never 100.00 % while bytes are left."""
    return f"{p.percent_text(2)}%"


def _rate_left(p: Progress, stalled: str = "") -> list[Span]:
    """``, rest 1.0 GiB, rate 35.0 MiB/s, 30 s left`` while something is left; nothing when done.

    ``stalled`` names why nothing can move (the model's :func:`held_back`): the last rate a node
    published stays in the tree after it stopped, so it is not shown then.
    """
    if p.reached:
        return []
    out = [Span(", rest "), _v(human_bytes(p.rest_bytes)), Span(", ")]
    if stalled:
        out.append(Span(stalled, "off"))
    elif p.stalled:
        out += [Span("no progress for ", "off"), _v(human_seconds(p.moved_age_s))]
    elif p.moving:
        out += [Span("rate "), _v(f"{human_bytes(p.rate_bytes_per_s)}/s"), Span(", "),
                _v(human_seconds(p.remaining_s)), Span(" left")]
    else:
        out += [Span("rate "), _v("unknown" if p.rate_bytes_per_s is None else "0 B/s (not moving)")]
    return out


def _rule(opts: Options) -> Line:
    return (Span(("-" if opts.ascii else "─") * max(20, opts.width - 1), "dim"),)


def _bar_width(opts: Options) -> int:
    return max(BAR_MIN, min(BAR_MAX, opts.width - 70))


def bar(fraction: float, width: int, ascii: bool) -> str:
    """``[##########..........]`` (ascii) or ``[██████████░░░░░░░░░░]``: ``fraction`` of 1 filled."""
    f = min(1.0, max(0.0, fraction))
    full = int(f * width)
    if f < 1.0:
        full = min(full, width - 1)  # never a full bar while something is left
    done, todo = ("#", ".") if ascii else ("█", "░")
    return "[" + done * full + todo * (width - full) + "]"


# --- what to show -----------------------------------------------------------------------------

def _selected(snap: Snapshot, opts: Options) -> list[ResourceStatus]:
    if opts.resource is None:
        return [snap.resources[r] for r in sorted(snap.resources)]
    r = snap.resources.get(opts.resource)
    return [r] if r is not None else []


def _node_order(snap: Snapshot, r: ResourceStatus) -> list[str]:
    """The local node first (as the original), then the others by name."""
    members = r.members
    return ([snap.local_host] if snap.local_host in r.nodes else []) + [h for h in members if h != snap.local_host]


def _alive_text(snap: Snapshot, host: str) -> Span:
    ns = snap.nodes.get(host)
    if ns is not None and ns.alive:
        return Span("System alive", "ok")
    if ns is not None and ns.unreachable:
        return Span("System unreachable (every other node's link to it fails)", "todo")
    if ns is None or ns.seen_age_s is None:
        return Span("System unknown (never reported)", "todo")
    return Span(f"System unknown (last message {human_seconds(ns.seen_age_s)} ago)", "todo")


# --- header and cluster line ---------------------------------------------------------------------

def _header(snap: Snapshot, opts: Options) -> list[Line]:
    versions = ", ".join(f"{h}: {ns.version or 'unknown'}" for h, ns in sorted(snap.nodes.items())) or "no nodes"
    if snap.marsd_running:
        marsd = Span(f"running (pid {snap.marsd_pid})" if snap.marsd_pid else "running", "ok")
    else:
        marsd = Span("NOT RUNNING - showing what the tree knows", "todo")
    return [
        _line(Span("MARS Status", "head"), f" - {snap.local_host}, mars-status {__version__}"),
        _line("MARS Admin  - marsadm ", _v(__version__), f" (state tree {snap.mars_dir})"),
        _line("MARS Daemon - ", versions),
        _line("MARS Python - ", platform.python_implementation(), " ", platform.python_version()),
        _line("marsd: ", marsd),
        _rule(opts),
    ]


def cluster_words(fs: Iterable[Finding]) -> list[tuple[str, str]]:
    """(aspect, "smoothly" or the worst level of its findings) for the cluster line."""
    fs = list(fs)
    return [(name, worst(f for f in fs if f.code in codes) or "smoothly") for name, codes in CLUSTER_ASPECTS]


def _cluster_line(fs: list[Finding]) -> Line:
    parts: list[str | Span] = [Span("-> Cluster", "head")]
    for name, word in cluster_words(fs):
        parts += [f" {name}: ", Span(word, _LEVEL_STYLE.get(word, "ok")), " "]
    return _line(*parts[:-1])


# --- the resources block -------------------------------------------------------------------------

def _device(r: ResourceStatus, n: NodeResource) -> Line:
    parts: list[str | Span] = ["Device  : Disk-Device ", _v(n.disk or "unknown")]
    if n.resize is not None and not n.resize.reached:
        parts += [", resize active (", _v(human_bytes(n.resize.pos_bytes)), " of the new ",
                  _v(human_bytes(n.resize.size_bytes)), " taken up)"]
    elif n.disk_bytes is not None and n.disk_bytes > r.size_bytes:
        parts += [", resize possible (disk ", _v(human_bytes(n.disk_bytes)), ", ",
                  _v(f"{human_bytes(n.disk_bytes - r.size_bytes)}"), " more than the resource)"]
    else:
        parts.append(", not enlarged")
    if n.actual.primary:
        parts += [", used as Mars-Device ", _v(f"NBD export {r.name}"), " (open ", _v(str(n.actual.open_count)), ")"]
    return _line(*parts)


def _sync(snap: Snapshot, n: NodeResource) -> Line:
    return _line("Sync    : ", *_bytes(n.sync.pos_bytes), " synced = ", _v(_pct(n.sync)),
                 *_rate_left(n.sync, held_back(snap, n, "sync")))


def _log_of(m: Member) -> list[Span]:
    """Where in the chain the node's log ends (the primary: where it writes): the file, and the
    offset in it, since the total bytes before count every earlier file too."""
    pos = m.fetch_log()
    if pos is None or not pos.origin:
        return [_v("no log file yet")]
    return [_v(pos.name), Span(" at "), _v(f"{pos.offset} bytes")]


def _lag(seconds: float | None) -> list[Span]:
    return [] if not seconds else [Span(", lag "), _v(human_seconds(seconds))]


def _fetch(snap: Snapshot, m: Member, n: NodeResource) -> Line:
    if n.fetch is None:
        return _line("Fetch   : ", Span("no fetch position yet", "dim"))
    if n.designated_primary:
        state = Span("active", "ok") if n.actual.primary else Span("inactive", "off")
    else:
        state = Span("active", "ok") if n.switches.fetch else Span("paused", "off")
    return _line("Fetch   : ", *_bytes(n.fetch.pos_bytes), " in ", *_log_of(m), " ", state,
                 *_rate_left(n.fetch, held_back(snap, n, "fetch")), *_lag(n.fetch_lag_s))


def _replay(snap: Snapshot, n: NodeResource) -> Line:
    if n.replay is None:
        return _line("Replay  : ", Span("no replay position yet", "dim"))
    p = n.replay
    age = [] if p.reached or n.replay_age_s is None else [Span(", last move "), _v(human_seconds(n.replay_age_s)),
                                                          Span(" ago")]
    return _line("Replay  : ", *_bytes(p.pos_bytes), " now replayed, Todo ", _v(f"{p.rest_bytes} bytes"),
                 ", completed ", _v(_pct(p)), *_rate_left(p, held_back(snap, n, "replay")), *_lag(n.replay_lag_s), *age)


def _state(m: Member) -> Line:
    return _line("State   : ", _v(m.diskstate()), " ", _v(m.replstate()), " flags ", _v(m.flags()))


def _actual(m: Member, n: NodeResource) -> Line:
    a = n.actual
    return _line("Actual  : Status=", _v(m.role()), ", Syncstatus=", _onoff(a.syncing),
                 ", Logfileupdate=", _onoff(a.fetching), ", Replay=", _onoff(a.replaying),
                 ", Attached=", _onoff(a.attached))


def _switches(n: NodeResource) -> Line:
    sw = n.switches
    rest: list[str | Span] = ["Connect=", _onoff(sw.fetch), " Sync=", _onoff(sw.sync), " AllowReplay=",
                              _onoff(sw.replay)]
    if n.designated_primary:
        # The primary neither fetches, syncs nor replays: its switches are shown but masked.
        return _line("Switches: Attach=", _onoff(sw.attach), " ", Span("[masked: ", "dim"),
                     *[Span(p.text if isinstance(p, Span) else p, "dim") for p in rest], Span("]", "dim"))
    return _line("Switches: Attach=", _onoff(sw.attach), " ", *rest)


def _node_block(snap: Snapshot, r: ResourceStatus, host: str, fs: list[Finding]) -> list[Line]:
    n = r.nodes[host]
    m = Member(snap, r, host)
    ns = snap.nodes.get(host)
    where = "local" if host == snap.local_host else "remote"
    ip = f" [{ns.ip}]" if ns is not None and ns.ip else ""
    role = "Primary" if n.designated_primary else "Secondary"
    out = [_line(Span(f"   -> {where} Node ({host}{ip}) as {role}", "head"), ", ", _alive_text(snap, host)),
           _device(r, n), _sync(snap, n), _fetch(snap, m, n), _replay(snap, n)]
    out += [_finding_line(f) for f in fs if f.res == r.name and f.node == host]
    out += [_state(m), _actual(m, n), _switches(n)]
    return out


def _resource_block(snap: Snapshot, r: ResourceStatus, fs: list[Finding]) -> list[Line]:
    fs = [f for f in fs if f.res == r.name]  # once per resource, not once per node: 8 x 50 adds up
    primary = r.primary or "(none)"
    out = [_line(Span(f"-> check resource {r.name}", "head"), ", with ", _v(human_bytes(r.size_bytes)),
                 ", Primary Node is ", _v(primary))]
    out += [(Span(f"   -> {text}", _ROLE_STYLE[what]),) for what, text in role_lines(r)]
    for h in _node_order(snap, r):
        out += _node_block(snap, r, h, fs)
    count = len(r.nodes)
    modus = f"clustered ({count} nodes)" if count > 1 else "standalone"
    out.append(_head(f"   -> modus for resource {r.name} is {modus}"))
    out += [_finding_line(f) for f in fs if f.res == r.name and (f.node is None or f.node not in r.nodes)]
    return out


def _unknown_resource(snap: Snapshot, name: str) -> Line:
    return (Span(f"-> {snap.unknown_resource(name)}", "todo"),)


# --- --system ------------------------------------------------------------------------------------

def _system_block(snap: Snapshot, opts: Options) -> list[Line]:
    out = [_head("---> Systemdata <---")]
    for h in sorted(snap.nodes, key=lambda h: (h != snap.local_host, h)):
        ns = snap.nodes[h]
        where = "local" if h == snap.local_host else "remote"
        out.append(_line(Span(f"-> {where} Node {h}" + (f" [{ns.ip}]" if ns.ip else ""), "head"),
                         ", marsd ", _v(ns.version or "unknown"), ", ", _alive_text(snap, h)))
        for t in ns.tunables:
            out.append(_line(f"-> {t.name} is set to ",
                             _v(t.set_text) if t.set_text is not None else Span("default", "dim"),
                             ", actually ", _v(t.actual_text) if t.actual_text is not None else Span("unknown", "dim"),
                             *((Span(" (not applied yet)", "todo"),) if t.differs else ())))
        if not ns.tunables:
            out.append(_line("-> ", Span("no tunables reported", "dim")))
        port = ns.peer_port
        slip = ["-> "] if h != snap.local_host else ["-> LamportClockDifference ", _v(f"{snap.clock_slip_s:.2f} sec"),
                                                     ", "]
        out.append(_line(*slip, "Mars Port is set to ", _v(port or f"{DEFAULT_PEER_PORT} (default)")))
        where_dir = snap.mars_dir if h == snap.local_host else "its MARS directory"
        if ns.rest_space_bytes is not None and ns.total_space_bytes:
            pct = 100.0 * ns.rest_space_bytes / ns.total_space_bytes
            out.append(_line(f"-> Free space on {where_dir}: ", _v(human_bytes(ns.rest_space_bytes)), " of ",
                             _v(human_bytes(ns.total_space_bytes)), " (", _v(f"{pct:.1f}%"), ")",
                             ", Emergency is ", Span(f"on (level {ns.emergency_level} of 4)", "todo") if ns.emergency
                             else Span(f"level {ns.emergency_level} of 4", "todo") if ns.emergency_level
                             else Span("off", "ok")))
        else:
            out.append(_line(f"-> Free space on {where_dir}: ", Span("unknown", "dim")))
    if not snap.nodes:
        out.append(_line("-> ", Span("no nodes in the tree", "dim")))
    return out


# --- --status ------------------------------------------------------------------------------------

def _bar_line(label: str, fraction: float, pct: str, detail: list[Span], opts: Options) -> Line:
    return _line(f"      {label:<7} ", Span(bar(fraction, _bar_width(opts), opts.ascii), "bar"),
                 " ", _v(f"{pct:>7}"), *detail)


def _progress_bar(label: str, p: Progress | None, stalled: str, opts: Options) -> Line:
    if p is None:
        return _line(f"      {label:<7} ", Span("unknown (no position yet)", "dim"))
    fraction = 1.0 if p.size_bytes <= 0 else p.pos_bytes / p.size_bytes
    detail = [Span("  "), _v(human_bytes(p.pos_bytes)), Span(" of "), _v(human_bytes(p.size_bytes))]
    detail += _rate_left(p, stalled)
    return _bar_line(label, fraction, _pct(p), detail, opts)


def _resize_bar(snap: Snapshot, r: ResourceStatus, n: NodeResource, opts: Options) -> Line | None:
    """While this member takes up a resize's new region (a secondary syncs it, the primary's export
    grows), how far it got; else the resource's size against its disk: the share in use, and
    what a resize gains."""
    if n.resize is not None and not n.resize.reached:
        return _progress_bar("resize", n.resize, held_back(snap, n, "sync"), opts)
    if n.disk_bytes is None or n.disk_bytes <= r.size_bytes:
        return None
    fraction = r.size_bytes / n.disk_bytes
    detail = [Span("  "), _v(human_bytes(r.size_bytes)), Span(" of disk "), _v(human_bytes(n.disk_bytes)),
              Span(", resize gains up to "), _v(human_bytes(n.disk_bytes - r.size_bytes))]
    return _bar_line("resize", fraction, f"{100.0 * fraction:.2f}%", detail, opts)


def _status_block(snap: Snapshot, rs: list[ResourceStatus], opts: Options) -> list[Line]:
    out = [_head("---> Status <---")]
    for r in rs:
        out.append(_head(f"-> resource {r.name}"))
        for h in _node_order(snap, r):
            n = r.nodes[h]
            role = "Primary" if n.designated_primary else "Secondary"
            out.append(_line(f"   -> {h} ({role})"))
            resize = _resize_bar(snap, r, n, opts)
            if resize is not None:
                out.append(resize)
            out += [_progress_bar(what, getattr(n, what), held_back(snap, n, what), opts)
                    for what in ("sync", "fetch", "replay")]
    return out


# --- --debug -------------------------------------------------------------------------------------

def _debug_block(snap: Snapshot, rs: list[ResourceStatus]) -> list[Line]:
    out = [_head("---> Debug <---")]
    for r in rs:
        out.append(_head(f"  -> Debug for resource-{r.name}"))
        msgs = [m for h in sorted(r.nodes) for m in r.nodes[h].messages]
        for m in msgs:
            style = {"err": "todo", "warn": "hint"}.get(m.level, "")
            out.append(_line(f"{m.node}: ", Span(f"[{m.level}] {m.key}: {m.text}", style),
                             Span(f" ({human_seconds(m.age_s)} ago)", "dim")))
        if not msgs:
            out.append(_line(Span("(no messages)", "dim")))
    out.append(_head("-> Main-Debug:"))
    if snap.debug_lines:
        out += [_line(x) for x in snap.debug_lines]
    elif not snap.marsd_running:
        out.append(_line(Span("(marsd is not running: no debug lines)", "dim")))
    else:
        out.append(_line(Span("(marsd sent no debug lines)", "dim")))
    return out


# --- --history -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tree:
    """The drawing characters of the history tree."""

    branch: str
    last: str
    down: str
    gap: str

    @classmethod
    def of(cls, ascii: bool) -> _Tree:
        return cls("|-->", "`-->", "|", " ") if ascii else cls("╠═══>", "╚═══>", "║", " ")


def _replay_state(r: ResourceStatus, f: LogFileStatus, host: str) -> Span:
    """Replay OK when the node's replay position is past this file (or at its end)."""
    n = r.nodes.get(host)
    link = n.replay_link if n is not None else None
    if link is None:
        return Span("replay unknown", "dim")
    length = f.length_bytes
    if link.seq > f.seq or (link.seq == f.seq and length is not None and link.pos >= length):
        return Span("replay OK", "ok")
    if link.seq == f.seq:
        return Span(f"replay at {link.pos} bytes", "work")
    return Span("replay pending", "work")


def _verify_state(f: LogFileStatus, host: str) -> Span:
    """Verify OK when this node's version digest equals the origin's; "differs" is split brain."""
    mine, origin = f.versions.get(host), f.versions.get(f.origin)
    if mine is None:
        return Span("no version yet", "dim")
    if origin is None:
        return Span("verify pending (origin has no version)", "dim")
    if mine.digest == origin.digest and mine.origin == origin.origin:
        return Span("verify OK", "ok")
    return Span("verify differs (split brain)", "todo")


def _history_block(snap: Snapshot, rs: list[ResourceStatus], opts: Options) -> list[Line]:
    d = _Tree.of(opts.ascii)
    out = [_head("---> History <---")]
    for r in rs:
        out.append(_head(f"   -> History Replay/Status of resource {r.name}"))
        out.append(_line(d.down))
        if not r.logs:
            out.append(_line(d.last, " ", Span("no log files", "dim")))
        for i, f in enumerate(r.logs):
            last = i == len(r.logs) - 1
            out += _history_file(snap, r, f, last, d)
            if not last:
                out.append(_line(d.down))
    return out


def _history_file(snap: Snapshot, r: ResourceStatus, f: LogFileStatus, last: bool, d: _Tree) -> list[Line]:
    length = f.length_bytes
    head: list[str | Span] = [d.last if last else d.branch, " ", Span(f"Vers.{f.seq:09d}", "head"), " ",
                              d.branch[1:], " "]
    if f.local_bytes is None:
        head += [Span(f"{f.name}: old version, logfile is deleted", "dim")]
    else:
        head += [f"Logfile {f.name} Size: ", *_bytes(f.local_bytes), " by ", _v(f.origin)]
        if not f.versions:
            head.append(Span(" (being written, no version yet)", "work"))
    if f.name in r.deletable_logs:
        head.append(Span(" (replayed everywhere: deletable)", "hint"))
    out = [_line(*head)]
    prefix = (d.gap if last else d.down) + " " * 7
    hosts = sorted(set(r.nodes) | set(f.versions), key=lambda h: (h != f.origin, h))
    for j, h in enumerate(hosts):
        ver = f.versions.get(h)
        mark = d.last if j == len(hosts) - 1 else d.branch
        role = "Primary" if h == r.primary else ("Secondary" if h in r.nodes else "former member")
        parts: list[str | Span] = [prefix, mark, f" {role} Node: ", _v(h)]
        if ver is not None:
            parts += [" Check: ", _v(ver.digest[:8]), " Size: ", *_bytes(ver.length_bytes)]
        else:
            parts += [" Check: ", Span("none", "dim")]
            if length is not None:
                parts += [" Size: ", *_bytes(length)]
        parts += [" ---> ", _replay_state(r, f, h), ", ", _verify_state(f, h)]
        out.append(_line(*parts))
    return out


# --- the whole display ---------------------------------------------------------------------------

def render(snap: Snapshot, fs: list[Finding], opts: Options) -> list[Line]:
    """Everything to show, in the original's order."""
    fs = relevant(fs, opts.resource)
    rs = _selected(snap, opts)
    out = _header(snap, opts)
    out.append(_cluster_line(fs))
    if "system" in opts.views:
        out += _system_block(snap, opts)
    out.append(_head("---> Resources <---"))
    if opts.resource is not None and not rs:
        out.append(_unknown_resource(snap, opts.resource))
    elif not rs:
        out.append(_line(Span("-> no resources in this cluster", "dim")))
    for r in rs:
        out += _resource_block(snap, r, fs)
    out += [_finding_line(f) for f in fs if f.res is None]
    if "status" in opts.views:
        out += _status_block(snap, rs, opts)
    if "debug" in opts.views:
        out += _debug_block(snap, rs)
    if "history" in opts.views:
        out += _history_block(snap, rs, opts)
    return out


def plain(lines: list[Line]) -> str:
    """The lines without styles: what cron mails and pipes get."""
    return "".join("".join(s.text for s in line).rstrip() + "\n" for line in lines)


# --- the monitor function ------------------------------------------------------------------------

def check(snap: Snapshot | None, fs: list[Finding], error: str | None = None) -> tuple[int, str]:
    """The model's :func:`verdict` as the one line of ``--check`` (the exit code and
    ``MARS <STATE> - <summary> | <counts>``): check_mars renders the same verdict, so the two
    cannot disagree."""
    v = verdict(snap, fs, error)
    line = f"MARS {v.state} - {v.summary}"
    if v.figures:
        line += " | " + " ".join(f"{f.name}={f.value_text}" for f in v.figures)
    return v.code, line
