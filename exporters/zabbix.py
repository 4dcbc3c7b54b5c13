"""mars-zabbix: the Zabbix 6.0 face of the status model.

Zabbix asks each node once a minute for one JSON document (``mars-zabbix status``, the *master
document*) and takes every figure out of it with JSONPath, in dependent items: one process start
and one snapshot per minute, however many items and discovered resources there are, and every
item of a minute shows the same moment. The same document can be pushed instead of polled
(``mars-zabbix send``, from cron, to a trapper item), for nodes the Zabbix server cannot reach.

Nothing here judges: the problems are :func:`mars.engine.model.findings`'s, one Zabbix trigger
per finding code (generated from :data:`CODES`, so a new code is in the template as soon as it
is regenerated), and each problem is named with the finding's own sentence and remedy.
The states are :class:`Member`'s, with value maps made from the model's state tuples. What is
left to this face is layout: where in Zabbix each finding shows (:data:`SCOPES`), which
priority each code gets (:func:`priority`), the thresholds an operator tunes (user macros) and
the trigger dependencies that keep one cause from raising a storm of consequences.

:func:`render` writes both templates (``MARS by Zabbix agent``, ``MARS by Zabbix trapper``)
into one file in the 6.0 export format, deterministically (UUIDv4 derived from each object's
path, sorted output, a fixed date), so ``zabbix-templates/mars_template.xml`` is a generated file
a test regenerates and compares; ``template --doc`` writes the tables of
``zabbix-templates/README.md`` from the same data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..engine import model
from ..engine.model import (
    value_text,
    CODES,
    DISKSTATES,
    REPLSTATES,
    ROLES,
    Finding,
    MarsError,
    Member,
    Snapshot,
)

FORMAT = 1  # of the master document; raised when a field changes meaning or goes away
TRAP_KEY = "mars.status.trap"
AGENT_KEY = "mars.status"
TEMPLATE_AGENT = "MARS by Zabbix agent"
TEMPLATE_TRAPPER = "MARS by Zabbix trapper"
GROUP = "Templates/MARS"
EXPORT_DATE = "2024-01-01T00:00:00Z"  # fixed: the file is generated, and a regeneration must compare equal
DEFAULT_AGENT_CONFIG = "/etc/zabbix/zabbix_agentd.conf"
SENDER = "zabbix_sender"
SENDER_ARG_MAX = 64 * 1024  # above this the document goes to zabbix_sender on stdin (one argv string is at most 128 KiB)
SNAPSHOT_TIMEOUT_S = 1.0  # marsd's control socket; the agent gives a UserParameter 3 s by default
TRANSFERS = ("sync", "fetch", "replay")

# --- where each finding shows -----------------------------------------------------------------
#
# A finding is about a member (res and node), a resource (res, no node, or a node that is no
# member), a node (node, no res) or the cluster (neither). In Zabbix each kind of thing is an
# entity with its own items: this node (template items), other nodes (the peers discovery),
# resources and members (their discoveries). Each code gets an item and a trigger only where it
# can appear; a code that is not listed here (a new one) gets them everywhere, so it is never
# missing from a regenerated template (tests/test_zabbix_template.py asks for it to be listed).

KINDS = ("node", "cluster", "peer", "resource", "member")
SCOPES: dict[str, tuple[str, ...]] = {
    # about this node only: marsd and the clock are local facts
    "MARSD_DOWN": ("node",), "CLOCK_SLIP": ("node",),
    # about any node: this one, or another seen from here
    "NODE_DOWN": ("node", "peer"), "PEER_UNREACHABLE": ("node", "peer"), "SPACE_LOW": ("node", "peer"),
    "SPACE_WARN": ("node", "peer"), "EMERGENCY": ("node", "peer"),
    "MARSD_VERSIONS_DIFFER": ("cluster",),
    "NO_PRIMARY": ("resource",), "PRIMARY_NOT_MEMBER": ("resource",), "SPLIT_BRAIN": ("resource",),
    "LOGS_DELETABLE": ("resource",), "RESIZE_POSSIBLE": ("resource",),
    "REPLAY_STOPPED": ("member",), "ATTACH_FAILED": ("member",), "FETCH_FAILING": ("member",),
    "PRIMARY_NOT_SERVING": ("member",), "DETACHED": ("member",), "SYNC_PAUSED": ("member",),
    "FETCH_PAUSED": ("member",), "FETCH_HELD": ("member",), "REPLAY_PAUSED": ("member",), "LOGS_HELD_BACK": ("member",),
    "CONNECT_CYCLE": ("member",),
    "SYNC_RUNNING": ("member",), "FETCH_RUNNING": ("member",), "REPLAY_RUNNING": ("member",),
    # role switching: about the member it names (the handover's target, the forced primary, the
    # one serving without being designated), about the resource when that is no member or none
    "HANDOVER": ("member", "resource"), "HANDOVER_STALLED": ("member", "resource"),
    "TWO_PRIMARIES": ("member", "resource"), "FORCED_PRIMARY": ("member", "resource"),
}

# TODO findings where data is at risk or not served now (the model's URGENT); the other TODOs are AVERAGE.
HIGH = model.URGENT
# HINT findings that leave a copy behind or a disk filling up if nobody acts; the other HINTs are INFO.
WARNING = frozenset({"SPACE_WARN", "SYNC_PAUSED", "FETCH_PAUSED", "FETCH_HELD", "REPLAY_PAUSED", "DETACHED", "LOGS_HELD_BACK",
                     "CLOCK_SLIP"})


def scope(code: str) -> tuple[str, ...]:
    return SCOPES.get(code, KINDS)


def priority(code: str) -> str | None:
    """The Zabbix severity of a finding code's trigger; None for WORK (progress is no problem)."""
    level = CODES[code][0]
    if level == "TODO":
        return "HIGH" if code in HIGH else "AVERAGE"
    if level == "HINT":
        return "WARNING" if code in WARNING else "INFO"
    return None


def alerting_codes(kind: str) -> list[str]:
    """The TODO and HINT codes that get an item and a trigger at entities of this kind."""
    return [c for c in sorted(CODES) if priority(c) is not None and kind in scope(c)]


# --- the master document ------------------------------------------------------------------------

def _int(v: float | None, unknown: int = -1) -> int:
    """Whole numbers for Zabbix, rounded up as marsadm rounds times (never 0 while something is
    left); ``unknown`` (-1, as marsadm view prints it) for no figure."""
    f = model.figure(v)
    if f is None:
        return unknown
    return math.ceil(f) if f > 0 else 0


def _num(v: float | None, digits: int = 2, unknown: float = -1) -> float:
    f = model.figure(v)
    return unknown if f is None else round(f, digits)


def _index(states: tuple[str, ...], state: str) -> int:
    """The state's place in the model's tuple: the value the Zabbix value map names."""
    name = model.state_name(state)
    return states.index(name) if name in states else -1


def _text(f: Finding) -> str:
    return f"{f.text}; remedy: {f.remedy}" if f.remedy else f.text


def _where(f: Finding, snap: Snapshot) -> tuple[str, Any]:
    """The kind of entity a finding is shown at, and which one, from the finding's own fields."""
    if f.res is None:
        if f.node is None:
            return "cluster", None
        return ("node", None) if f.node == snap.local_host else ("peer", f.node)
    rs = snap.resources.get(f.res)
    if f.node is not None and rs is not None and f.node in rs.nodes:
        return "member", (f.res, f.node)
    return "resource", f.res


def _finding_map(kind: str, found: Iterable[Finding]) -> dict[str, str]:
    """Every alerting code of this kind ("" when it has no finding), so every JSONPath of the
    template resolves; several findings of one code (not possible today) are joined."""
    out = {c: "" for c in alerting_codes(kind)}
    for f in found:
        if priority(f.code) is None:
            continue
        out[f.code] = f"{out[f.code]} / {_text(f)}" if out.get(f.code) else _text(f)
    return out


def _transfer(m: Member, t: str) -> dict[str, Any]:
    n = m.n
    assert n is not None
    p = m.progress(t)
    held = model.held_back(m.snap, n, t)
    rate = None if held else m.rate(t)
    remaining = None if held else m.remain(t)
    age = {"sync": n.sync.moved_age_s, "fetch": n.fetch_age_s, "replay": n.replay_age_s}[t]
    stalled = age if (not p.reached and not held and model.figure(age) is not None) else 0.0
    return {f"{t}_pos_bytes": m.pos(t), f"{t}_size_bytes": m.size(t), f"{t}_rest_bytes": m.rest(t),
            f"{t}_percent": float(model.percent_shown(m.pos(t), m.size(t), 2)),
            f"{t}_rate_bytes_per_s": _num(rate, 1, 0.0), f"{t}_remaining_s": _int(remaining),
            f"{t}_age_s": _int(age), f"{t}_stalled_s": _int(stalled), f"{t}_held": held}


def _member_doc(m: Member, found: list[Finding]) -> dict[str, Any]:
    n = m.n
    assert n is not None
    role, disk, repl = m.role(), m.diskstate(), m.replstate()
    sw, act = n.switches, n.actual
    d: dict[str, Any] = {
        "resource": m.r.name, "host": m.host, "local": int(m.host == m.snap.local_host),
        "role": role, "role_index": _index(ROLES, role),
        "disk_state": disk, "disk_state_index": _index(DISKSTATES, disk),
        "repl_state": repl, "repl_state_index": _index(REPLSTATES, repl), "flags": m.flags(),
        "designated_primary": int(m.designated), "is_primary": int(act.primary), "attached": int(act.attached),
        "consistent": int(n.consistent), "replay_stopped": int(n.replay_stopped),
        "switch_attach": int(sw.attach), "switch_sync": int(sw.sync), "switch_fetch": int(sw.fetch),
        "switch_replay": int(sw.replay), "disk_size_bytes": -1 if n.disk_bytes is None else n.disk_bytes,
        "nbd_clients": act.open_count,
    }
    for t in TRANSFERS:
        d.update(_transfer(m, t))
    d["work_rest_bytes"] = m.rest("work")
    d["fetch_lag_s"] = _int(n.fetch_lag_s)
    d["replay_lag_s"] = _int(n.replay_lag_s)
    d["work"] = " / ".join(f.text for f in found if f.level == "WORK")
    d["findings"] = _finding_map("member", found)
    return d


def _node_doc(snap: Snapshot, h: str, found: list[Finding], kind: str) -> dict[str, Any]:
    ns = snap.nodes.get(h)
    local = snap.nodes.get(snap.local_host)
    rest = ns.rest_space_bytes if ns is not None else None
    total = ns.total_space_bytes if ns is not None else None
    pct = 100.0 * rest / total if rest is not None and total else None
    return {
        "peer" if kind == "peer" else "host": h, "ip": (ns.ip if ns else None) or "",
        "alive": int(snap.alive(h)), "unreachable": int(bool(ns and ns.unreachable)),
        "report_age_s": _int(ns.seen_age_s if ns else None), "version": (ns.version if ns else None) or "",
        "dir_free_bytes": -1 if rest is None else rest, "dir_total_bytes": -1 if total is None else total,
        "dir_free_percent": _num(pct), "emergency": int(bool(ns and ns.emergency)),
        # how this node's marsd sees the link to it (always 1 for this node itself)
        "link_up": int(not (local is not None and h in local.link_errors)),
        "findings": _finding_map(kind, found),
    }


def document(snap: Snapshot, found: list[Finding], answered: bool | None = None, members: str = "local",
             note: str | None = None) -> dict[str, Any]:
    """The master document: this node's view of the cluster, laid out for JSONPath.

    ``members="local"``: the resources and members of this node only (every node is a Zabbix
    host, and each member is shown once, on its own node's host), and of other nodes only what
    they cannot say themselves, being down. ``"all"``: every member and node this tree knows,
    for one Zabbix host that watches a whole cluster. ``findings`` is always the whole list.
    """
    here = snap.local_host
    marsd_up = snap.marsd_running if answered is None else answered
    placed: dict[tuple[str, Any], list[Finding]] = {}
    for f in found:
        placed.setdefault(_where(f, snap), []).append(f)

    def keep_resource(name: str) -> bool:
        return members == "all" or here in snap.resources[name].nodes

    def keep_member(h: str) -> bool:
        return members == "all" or h == here

    resources, member_docs = [], []
    for name, r in sorted(snap.resources.items()):
        if not keep_resource(name):
            continue
        local_logs = [lf for lf in r.logs if lf.local_bytes is not None]
        resources.append({
            "resource": name, "size_bytes": r.size_bytes, "primary": r.primary or "", "members": len(r.members),
            "members_alive": sum(1 for h in r.members if snap.alive(h)), "member_hosts": ",".join(r.members),
            "split_brain": int(r.is_split_brain), "log_files": len(local_logs),
            "log_bytes": sum(lf.local_bytes or 0 for lf in local_logs), "deletable_log_files": len(r.deletable_logs),
            "deletable_bytes": r.deletable_bytes,
            "findings": _finding_map("resource", placed.get(("resource", name), [])),
        })
        for h in r.members:
            if keep_member(h):
                member_docs.append(_member_doc(Member(snap, r, h), placed.get(("member", (name, h)), [])))
    peers = []
    for h in sorted(snap.nodes):
        if h == here:
            continue
        # A live node speaks for itself on its own Zabbix host; what only others can say about
        # it is that it is down.
        shown = placed.get(("peer", h), []) if members == "all" or not snap.alive(h) else []
        peers.append(_node_doc(snap, h, shown, "peer"))
    node = _node_doc(snap, here, placed.get(("node", None), []), "node")
    node["marsd_up"] = int(marsd_up)
    node["clock_slip_s"] = _num(snap.clock_slip_s)
    levels = {lv: sum(1 for f in found if f.level == lv) for lv in model.LEVELS}
    return {
        "format": FORMAT, "ok": 1, "error": "", "tool": "mars-zabbix", "version": __version__, "host": here,
        "mars_dir": snap.mars_dir, "taken_at_s": int(snap.taken_at_s), "window_s": _num(snap.window_s),
        "members_shown": members, "note": note or "", "marsd_up": int(marsd_up), "cluster_uuid": snap.cluster_uuid or "",
        "counts": {"nodes": len(snap.nodes), "nodes_alive": sum(1 for n in snap.nodes.values() if n.alive),
                   "resources": len(snap.resources), "members": sum(len(r.nodes) for r in snap.resources.values()),
                   "todo": levels["TODO"], "hint": levels["HINT"], "work": levels["WORK"], "findings": len(found)},
        "node": node,
        "cluster": {"findings": _finding_map("cluster", placed.get(("cluster", None), []))},
        "resources": resources, "members": member_docs, "peers": peers,
        "discovery": {"resources": [{"resource": r["resource"]} for r in resources],
                      "members": [{"resource": m["resource"], "host": m["host"]} for m in member_docs],
                      "peers": [{"peer": p["peer"]} for p in peers]},
        "findings": [{"code": f.code, "level": f.level, "resource": f.res, "host": f.node, "text": f.text,
                      "remedy": f.remedy} for f in found],
    }


def error_document(reason: str, host: str | None, mars_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """What ``status`` says when it cannot read the state: why, and nothing else. Without the
    arrays the discovery rules fail instead of seeing no resources, so Zabbix keeps what it
    discovered rather than marking it lost; the template's "cannot read" trigger shows the reason."""
    return {"format": FORMAT, "ok": 0, "error": reason, "tool": "mars-zabbix", "version": __version__,
            "host": host or "", "mars_dir": str(mars_dir or ""), "taken_at_s": int(time.time())}


LLD_MACROS = {"resources": {"{#RESOURCE}": "resource"}, "members": {"{#RESOURCE}": "resource", "{#HOST}": "host"},
              "peers": {"{#PEER}": "peer"}}


def discovery(doc: dict[str, Any], what: str) -> list[dict[str, str]]:
    """The LLD JSON of ``mars-zabbix discovery``: the document's discovery array with macro names."""
    return [{macro: row[k] for macro, k in LLD_MACROS[what].items()} for row in doc["discovery"][what]]


# --- value KEY: one figure, for an ad-hoc agent check -----------------------------------------------

MEMBER_ALIASES = {"role": "role", "diskstate": "disk_state", "replstate": "repl_state", "flags": "flags",
                  "is-primary": "is_primary", "todo-primary": "designated_primary", "is-consistent": "consistent",
                  "is-attach": "attached", "disk-size": "disk_size_bytes", "device-opened": "nbd_clients",
                  "work-rest": "work_rest_bytes", "fetch-lag": "fetch_lag_s", "replay-lag": "replay_lag_s",
                  **{f"todo-{s}": f"switch_{s}" for s in ("attach", "sync", "fetch", "replay")},
                  **{f"{t}-{m}": f"{t}_{f}" for t in TRANSFERS for m, f in (
                      ("pos", "pos_bytes"), ("size", "size_bytes"), ("rest", "rest_bytes"), ("percent", "percent"),
                      ("rate", "rate_bytes_per_s"), ("remain", "remaining_s"), ("age", "age_s"))}}
RESOURCE_ALIASES = {"resource-size": "size_bytes", "get-primary": "primary", "count-resource-peers": "members",
                    "resource-peers": "member_hosts", "is-split-brain": "split_brain",
                    "deletable-size": "deletable_bytes"}
NODE_ALIASES = {"rest-space-bytes": "dir_free_bytes", "total-space-bytes": "dir_total_bytes", "is-alive": "alive",
                "alive-age": "report_age_s", "is-emergency": "emergency"}
GLOBAL_ALIASES = {"is-module-loaded": "marsd_up", "count-cluster-peers": "nodes", "uuid": "cluster_uuid"}
KEY_FORMS = ("<res>/<host>/<name> (a member: r/b/replay-rest), <res>/<name> (a resource: r/resource-size), "
             "<host>:<name> (a node: b:rest-space-bytes), <name> (this node: marsd-up, todo)")


def _pick(row: dict[str, Any], name: str, aliases: dict[str, str], what: str) -> object:
    field_ = aliases.get(name, name.replace("-", "_"))
    v = row.get(field_)
    if v is None or isinstance(v, (dict, list)):
        names = sorted({*aliases, *(k for k, x in row.items() if not isinstance(x, (dict, list)))})
        raise model.UsageError(f"{what} has no value {name!r}", f"one of: {', '.join(names)}")
    return v


def value(doc: dict[str, Any], key: str) -> str:
    """One value of the document, as text: ``r/b/replay-rest`` is what ``marsadm view-replay-rest r``
    says on b (the names of marsadm's macros, or the document's field names)."""
    if not key or key.count("/") > 2:
        raise model.UsageError(f"value key {key!r} is not a key", f"give one of the forms {KEY_FORMS}")
    parts = key.split("/")
    if len(parts) == 3:
        res, host, name = parts
        row = next((m for m in doc["members"] if m["resource"] == res and m["host"] == host), None)
        if row is None:
            known = ", ".join(f"{m['resource']}/{m['host']}" for m in doc["members"]) or "none"
            raise MarsError(f"{host} is no member of resource {res} here", f"the members are: {known}")
        return value_text(_pick(row, name, MEMBER_ALIASES, f"member {res}/{host}"))
    if len(parts) == 2:
        res, name = parts
        row = next((r for r in doc["resources"] if r["resource"] == res), None)
        if row is None:
            known = ", ".join(r["resource"] for r in doc["resources"]) or "none"
            raise MarsError(f"resource {res} does not exist", f"the resources are: {known}")
        return value_text(_pick(row, name, RESOURCE_ALIASES, f"resource {res}"))
    if ":" in key:
        host, _, name = key.partition(":")
        rows = [doc["node"], *doc["peers"]]
        row = next((n for n in rows if n.get("host", n.get("peer")) == host), None)
        if row is None:
            known = ", ".join(n.get("host", n.get("peer", "")) for n in rows)
            raise MarsError(f"node {host} is not known here", f"the nodes are: {known}")
        return value_text(_pick(row, name, NODE_ALIASES, f"node {host}"))
    flat = {k: v for k, v in doc.items() if not isinstance(v, (dict, list))} | doc["counts"]
    return value_text(_pick(flat, key, GLOBAL_ALIASES, "this node's document"))


# --- the template: what it holds (data), then its XML ---------------------------------------------

T = "\x00T\x00"  # stands for the template's technical name in expressions until it is rendered


@dataclass(frozen=True)
class Step:
    type: str
    params: tuple[str, ...]
    error_handler: str = ""
    error_params: str = ""


@dataclass(frozen=True)
class Item:
    key: str
    name: str
    value_type: str  # UNSIGNED FLOAT CHAR TEXT
    path: str = ""  # JSONPath into the master document; "" for the master itself
    units: str = ""
    description: str = ""
    valuemap: str | None = None
    history: str = "7d"
    steps: tuple[Step, ...] = ()  # after the JSONPath
    tags: tuple[tuple[str, str], ...] = ()
    error_handler: str = ""  # of the JSONPath step
    error_params: str = ""

    def preprocessing(self) -> tuple[Step, ...]:
        if not self.path:
            return self.steps
        return (Step("JSONPATH", (self.path,), self.error_handler, self.error_params), *self.steps)


@dataclass(frozen=True)
class Trigger:
    name: str
    expression: str  # with T for the template name
    priority: str
    description: str
    event_name: str = ""
    opdata: str = ""
    depends: tuple[str, ...] = ()  # names of triggers of the same template (and rule, for prototypes)
    tags: tuple[tuple[str, str], ...] = ()
    code: str = ""  # the finding code it raises, "" for the others


@dataclass(frozen=True)
class Graph:
    name: str
    keys: tuple[str, ...]
    percent: bool = False


@dataclass
class Rule:
    key: str
    name: str
    what: str  # resources, members, peers
    description: str
    items: list[Item] = field(default_factory=list)
    triggers: list[Trigger] = field(default_factory=list)
    graphs: list[Graph] = field(default_factory=list)


@dataclass
class Template:
    name: str
    master: Item
    items: list[Item]
    triggers: list[Trigger]
    rules: list[Rule]
    graphs: list[Graph]
    description: str


VALUEMAPS: dict[str, list[tuple[str, str]]] = {
    "MARS role": [(str(i), s) for i, s in enumerate(ROLES)],
    "MARS disk state": [(str(i), s) for i, s in enumerate(DISKSTATES)],
    "MARS replication state": [(str(i), s) for i, s in enumerate(REPLSTATES)],
    "MARS up/down": [("0", "down"), ("1", "up")],
    "MARS yes/no": [("0", "no"), ("1", "yes")],
}

MACROS: list[tuple[str, str, str]] = [
    ("{$MARS.FREE.MIN}", "30", "Percent free in a node's MARS directory below which 'free space below' fires (INFO; "
     "the model's own SPACE_WARN and SPACE_LOW fire at 20 % and 10 %). Per host: a host macro."),
    ("{$MARS.LAG.MAX}", "300", "Seconds a member's copy may be older than the primary's (replay lag) before 'replay "
     "lag too high' fires. Per resource: {$MARS.LAG.MAX:\"<resource>\"}."),
    ("{$MARS.NODATA.TIME}", "5m", "How long without a status document before 'no status' fires."),
    ("{$MARS.NOPROGRESS.TIME}", "600", "Seconds a sync, fetch or replay with bytes left may stand still (while it "
     "is switched on and its node alive) before 'no progress' fires. Per resource: "
     "{$MARS.NOPROGRESS.TIME:\"<resource>\"}."),
]

DISCARD = Step("DISCARD_UNCHANGED_HEARTBEAT", ("1h",))
ERROR_JS = """try {
    var doc = JSON.parse(value);
    return doc.ok === 1 ? '' : String(doc.error || 'the status document says it could not read the state');
} catch (e) {
    return 'the answer is not a mars-zabbix status document (check the UserParameter, the sudo rule and the agent Timeout, see zabbix-templates/README.md): ' + value.substring(0, 400);
}"""

_MEMBER_PATH = "$.members[?(@.resource=='{#RESOURCE}' && @.host=='{#HOST}')]"
_RESOURCE_PATH = "$.resources[?(@.resource=='{#RESOURCE}')]"
_PEER_PATH = "$.peers[?(@.peer=='{#PEER}')]"
ENTITY = {  # kind -> (key prefix, key parameters, JSONPath of the entity, name prefix)
    "node": ("mars.node", "", "$.node", "MARS"),
    "cluster": ("mars.cluster", "", "$.cluster", "MARS cluster"),
    "peer": ("mars.peer", "{#PEER}", _PEER_PATH, "MARS peer {#PEER}"),
    "resource": ("mars.resource", "{#RESOURCE}", _RESOURCE_PATH, "MARS {#RESOURCE}"),
    "member": ("mars.member", "{#RESOURCE},{#HOST}", _MEMBER_PATH, "MARS {#RESOURCE}@{#HOST}"),
}


def _key(kind: str, name: str, *extra: str) -> str:
    prefix, params, _, _ = ENTITY[kind]
    args = [a for a in (params, *extra) if a]
    return f"{prefix}.{name}[{','.join(args)}]" if args else f"{prefix}.{name}"


def _path(kind: str, field_: str) -> str:
    _, params, base, _ = ENTITY[kind]
    return f"{base}.{field_}.first()" if params else f"{base}.{field_}"


def _item(kind: str, name: str, field_: str, title: str, value_type: str, units: str = "", description: str = "",
          **kw: Any) -> Item:
    return Item(_key(kind, name), f"{ENTITY[kind][3]}: {title}", value_type, _path(kind, field_), units,
                description, tags=(("component", kind),), **kw)


def _finding_item(kind: str, code: str) -> Item:
    level, meaning = CODES[code]
    prefix, params, base, title = ENTITY[kind]
    path = f"{base}.findings.{code}" + (".first()" if params else "")
    return Item(_key(kind, "finding", code), f"{title}: finding {code}", "TEXT", path,
                description=f"{level} {code}: {meaning}. The finding's sentence and remedy while it holds, empty "
                            f"otherwise (mars.engine.model.findings).",
                steps=(DISCARD,), tags=(("component", kind), ("mars.code", code)))


def _finding_trigger(kind: str, code: str, depends: tuple[str, ...]) -> Trigger:
    level, meaning = CODES[code]
    prio = priority(code)
    assert prio is not None
    title = ENTITY[kind][3]
    return Trigger(
        name=f"{title}: {code}", expression=f"length(last(/{T}/{_key(kind, 'finding', code)}))>0", priority=prio,
        event_name=f"{title}: {code}: {{ITEM.VALUE}}",
        description=f"{level} {code}: {meaning}. The problem's name is the finding itself: what is wrong, with its "
                    f"figures, then the remedy (the exact command and where to run it); the item holds its current "
                    f"text. It recovers when the finding is gone.",
        depends=depends, tags=(("mars.code", code), ("mars.level", level), ("scope", _tag_scope(code))), code=code)


def _tag_scope(code: str) -> str:
    return "availability" if priority(code) in ("HIGH", "AVERAGE") else "capacity" if "SPACE" in code else "notice"


NODATA = "no status"
UNREADABLE = "cannot read the MARS state"
BASE_DEPENDS = (f"MARS: {NODATA}", f"MARS: {UNREADABLE}")
MARSD_DOWN_TRIGGER = "MARS: MARSD_DOWN"


def _build(name: str, trapper: bool) -> Template:
    if trapper:
        master = Item(TRAP_KEY, "MARS: status document (pushed)", "TEXT", history="1h",
                      description="The master document, pushed every minute by the cron job 'mars-zabbix send' "
                                  "(zabbix-templates/cron.d/mars-zabbix). Every other item is taken out of it.",
                      tags=(("component", "raw"),))
    else:
        master = Item(AGENT_KEY, "MARS: status document", "TEXT", history="1h",
                      description="The master document: 'mars-zabbix status' through the agent's UserParameter "
                                  "(zabbix-templates/userparameter_mars.conf), once a minute. Every other item is "
                                  "taken out of it, so the node is asked once per interval.",
                      tags=(("component", "raw"),))
    mk = master.key
    items = [
        Item("mars.ok", "MARS: state readable", "UNSIGNED", "$.ok", valuemap="MARS yes/no", steps=(DISCARD,),
             description="1 when mars-zabbix could read the node's MARS state; 0 when it could not, or when the "
                         "answer was no status document at all", error_handler="CUSTOM_VALUE", error_params="0",
             tags=(("component", "status"),)),
        Item("mars.error", "MARS: why the state cannot be read", "TEXT",
             steps=(Step("JAVASCRIPT", (ERROR_JS,)), DISCARD),
             description="Empty while the state is readable; else the reason and its remedy (or what the agent "
                         "answered instead of a status document)", tags=(("component", "status"),)),
        _item("node", "marsd_up", "marsd_up", "marsd answers", "UNSIGNED", valuemap="MARS up/down", steps=(DISCARD,),
              description="1 when this node's marsd answered on its control socket; 0 when the figures come from "
                          "the state tree alone"),
        Item("mars.version", "MARS: mars-zabbix version", "CHAR", "$.version", steps=(DISCARD,),
             tags=(("component", "status"),)),
        Item("mars.nodes", "MARS: nodes", "UNSIGNED", "$.counts.nodes", description="Nodes of the cluster",
             tags=(("component", "cluster"),)),
        Item("mars.nodes_alive", "MARS: nodes alive", "UNSIGNED", "$.counts.nodes_alive",
             description="Nodes that reported within the alive window", tags=(("component", "cluster"),)),
        Item("mars.resources", "MARS: resources", "UNSIGNED", "$.counts.resources", tags=(("component", "cluster"),)),
        Item("mars.members", "MARS: members", "UNSIGNED", "$.counts.members",
             description="Members of all resources", tags=(("component", "cluster"),)),
        *[Item(f"mars.findings.{lv.lower()}", f"MARS: {lv} findings", "UNSIGNED", f"$.counts.{lv.lower()}",
               description=f"How many {lv} findings this node's view has (marsadm view shows the same)",
               tags=(("component", "cluster"),)) for lv in model.LEVELS],
        _item("node", "dir_free_bytes", "dir_free_bytes", "MARS directory free", "FLOAT", "B",
              "Free bytes of this node's MARS directory (-1 unknown)"),
        _item("node", "dir_total_bytes", "dir_total_bytes", "MARS directory size", "FLOAT", "B",
              "Size of the file system holding this node's MARS directory (-1 unknown)"),
        _item("node", "dir_free_percent", "dir_free_percent", "MARS directory free, in percent", "FLOAT", "%",
              "-1 unknown"),
        _item("node", "clock_slip", "clock_slip_s", "Lamport clock ahead of the wall clock", "FLOAT", "s"),
    ]
    triggers = [
        Trigger(f"MARS: {NODATA}",
                f"nodata(/{T}/{mk},{{$MARS.NODATA.TIME}})=1", "AVERAGE",
                ("No status document was pushed for {$MARS.NODATA.TIME}: the cron job does not run, the node is "
                 "down, or the server refuses the values (run 'mars-zabbix send' on the node to see why)") if trapper
                else ("The agent gave no status document for {$MARS.NODATA.TIME}: the node or its agent is down, "
                      "or the UserParameter does not answer within the agent's Timeout"),
                event_name="MARS: no status for {$MARS.NODATA.TIME}", tags=(("scope", "availability"),)),
        Trigger(f"MARS: {UNREADABLE}", f"length(last(/{T}/mars.error))>0", "AVERAGE",
                "mars-zabbix answers, but cannot read the node's MARS state (no tree, no cluster, permission "
                "denied, or the agent could not run it): nothing else of this node is current. The problem's name "
                "says why and what to do.", event_name=f"MARS: {UNREADABLE}: {{ITEM.VALUE}}",
                depends=(f"MARS: {NODATA}",),
                tags=(("scope", "availability"),)),
        Trigger("MARS: free space below {$MARS.FREE.MIN} %",
                f"last(/{T}/mars.node.dir_free_percent)>=0 and last(/{T}/mars.node.dir_free_percent)<{{$MARS.FREE.MIN}}",
                "INFO", "This node's MARS directory has less free space than {$MARS.FREE.MIN} percent. Plan for "
                "space ('marsadm log-delete-all all'). The model's SPACE_WARN and SPACE_LOW take over below 20 and "
                "10 percent (this one waits on them).", opdata="free: {ITEM.LASTVALUE}",
                depends=(*BASE_DEPENDS, "MARS: SPACE_WARN", "MARS: SPACE_LOW"), tags=(("scope", "capacity"),)),
    ]
    for kind in ("node", "cluster"):
        for code in alerting_codes(kind):
            items.append(_finding_item(kind, code))
            triggers.append(_finding_trigger(kind, code, BASE_DEPENDS))
    # local marsd down: the tree stops learning, so every other node looks down and every figure stands
    rule_depends = (*BASE_DEPENDS, MARSD_DOWN_TRIGGER)

    peers = Rule("mars.discovery.peers", "MARS: peers", "peers",
                 "The other nodes of the cluster, as this node's tree knows them. With 'status' (members local, the "
                 "default) a live node's own findings show on its own Zabbix host; here only that it is down.")
    peers.items += [
        _item("peer", "alive", "alive", "alive", "UNSIGNED", valuemap="MARS yes/no", steps=(DISCARD,)),
        _item("peer", "report_age", "report_age_s", "last report", "FLOAT", "s",
              "Seconds since its last report reached this node (-1 never)"),
        _item("peer", "link_up", "link_up", "reachable from here", "UNSIGNED", valuemap="MARS yes/no", steps=(DISCARD,),
              description="0 when this node's marsd reports it cannot reach the peer"),
        _item("peer", "dir_free_percent", "dir_free_percent", "MARS directory free, in percent", "FLOAT", "%",
              "-1 unknown"),
    ]
    for code in alerting_codes("peer"):
        peers.items.append(_finding_item("peer", code))
        peers.triggers.append(_finding_trigger("peer", code, rule_depends))

    resources = Rule("mars.discovery.resources", "MARS: resources", "resources",
                     "The resources this node is a member of (every resource with members all).")
    resources.items += [
        _item("resource", "size", "size_bytes", "size", "UNSIGNED", "B"),
        _item("resource", "primary", "primary", "designated primary", "CHAR", steps=(DISCARD,),
              description="Empty when none is designated"),
        _item("resource", "members", "members", "members", "UNSIGNED"),
        _item("resource", "members_alive", "members_alive", "members alive", "UNSIGNED"),
        _item("resource", "log_bytes", "log_bytes", "log files here", "UNSIGNED", "B",
              "Bytes of the resource's log files on this node"),
        _item("resource", "deletable_bytes", "deletable_bytes", "deletable log bytes", "UNSIGNED", "B",
              "Bytes of log files every member has replayed ('marsadm log-delete-all' removes them)"),
    ]
    for code in alerting_codes("resource"):
        resources.items.append(_finding_item("resource", code))
        resources.triggers.append(_finding_trigger("resource", code, rule_depends))

    members = Rule("mars.discovery.members", "MARS: members", "members",
                   "This node's members (every member with members all): states as marsadm view names them, the "
                   "sync, fetch and replay progress, the lag, and the member's findings.")
    members.items += [
        _item("member", "role", "role_index", "role", "UNSIGNED", valuemap="MARS role", steps=(DISCARD,),
              description="As marsadm view-role names it: " + ", ".join(ROLES)),
        _item("member", "disk_state", "disk_state_index", "disk state", "UNSIGNED", valuemap="MARS disk state",
              steps=(DISCARD,), description="As marsadm view-diskstate names it, without the [...] detail: "
              + ", ".join(DISKSTATES)),
        _item("member", "repl_state", "repl_state_index", "replication state", "UNSIGNED",
              valuemap="MARS replication state", steps=(DISCARD,),
              description="As marsadm view-replstate names it: " + ", ".join(REPLSTATES)),
        _item("member", "flags", "flags", "flags", "CHAR", steps=(DISCARD,),
              description="marsadm view-flags: disk, consistent, attached, sync, fetch, replay (capital: done; "
                          "small: on, not there yet; -: off)"),
        _item("member", "work", "work", "work in progress", "TEXT", steps=(DISCARD,),
              description="The WORK findings (sync, fetch, replay running) with their figures; empty when idle"),
        _item("member", "fetch_lag", "fetch_lag_s", "fetch lag", "FLOAT", "s",
              "How much older its fetch position is than the primary's log end (0 caught up, -1 unknown)"),
        _item("member", "replay_lag", "replay_lag_s", "replay lag", "FLOAT", "s",
              "How much older its replay position is than the primary's: the age of its copy (0 caught up, "
              "-1 unknown)"),
    ]
    nouns = {"sync": "full sync", "fetch": "log fetch", "replay": "log replay"}
    for t in TRANSFERS:
        members.items += [
            _item("member", f"{t}_rest", f"{t}_rest_bytes", f"{t} bytes left", "UNSIGNED", "B",
                  f"marsadm view-{t}-rest: bytes left of the {nouns[t]}"),
            _item("member", f"{t}_percent", f"{t}_percent", f"{t} done", "FLOAT", "%",
                  f"Percent done of the {nouns[t]}; below 100 while any byte is left"),
            _item("member", f"{t}_rate", f"{t}_rate_bytes_per_s", f"{t} rate", "FLOAT", "Bps",
                  f"Bytes per second of the {nouns[t]}; 0 while it does not run"),
            _item("member", f"{t}_remaining", f"{t}_remaining_s", f"{t} time left", "FLOAT", "s",
                  f"Seconds left of the {nouns[t]} at the current rate (-1 unknown)"),
            _item("member", f"{t}_stalled", f"{t}_stalled_s", f"{t} standing still", "FLOAT", "s",
                  f"Seconds the {nouns[t]} has had bytes left without moving, while it is switched on and its node "
                  f"alive (0 otherwise)"),
        ]
    member_finding_triggers = []
    for code in alerting_codes("member"):
        members.items.append(_finding_item("member", code))
        member_finding_triggers.append(_finding_trigger("member", code, rule_depends))
    members.triggers += member_finding_triggers
    title = ENTITY["member"][3]
    # a lag or a standstill whose cause is a finding of the member shows the cause only
    causes = tuple(f"{title}: {c}" for c in ("REPLAY_STOPPED", "REPLAY_PAUSED", "FETCH_PAUSED", "FETCH_HELD", "FETCH_FAILING",
                                             "DETACHED", "ATTACH_FAILED", "SYNC_PAUSED")
                   if c in alerting_codes("member"))
    members.triggers.append(Trigger(
        f"{title}: replay lag too high",
        f"last(/{T}/{_key('member', 'replay_lag')})>{{$MARS.LAG.MAX:\"{{#RESOURCE}}\"}}", "WARNING",
        "The member's copy is older than the primary's by more than {$MARS.LAG.MAX:\"{#RESOURCE}\"} seconds (the "
        "macro {$MARS.LAG.MAX}, with the resource as its context for one resource of its own). It waits on the "
        "member's findings that would explain it.",
        event_name=f"{title}: replay lag above {{$MARS.LAG.MAX:\"{{#RESOURCE}}\"}} s", opdata="lag: {ITEM.LASTVALUE}",
        depends=(*rule_depends, *causes), tags=(("scope", "performance"),)))
    for t in TRANSFERS:
        members.triggers.append(Trigger(
            f"{title}: {t} makes no progress",
            f"last(/{T}/{_key('member', f'{t}_stalled')})>{{$MARS.NOPROGRESS.TIME:\"{{#RESOURCE}}\"}}", "WARNING",
            f"The {nouns[t]} has had bytes left and has not moved for more than "
            f"{{$MARS.NOPROGRESS.TIME:\"{{#RESOURCE}}\"}} seconds, "
            f"although it is switched on and its node is alive. It waits on the member's findings that would "
            f"explain it.",
            event_name=f"{title}: {t} stands still for more than {{$MARS.NOPROGRESS.TIME:\"{{#RESOURCE}}\"}} s",
            opdata="standing still: {ITEM.LASTVALUE}", depends=(*rule_depends, *causes),
            tags=(("scope", "performance"),)))
    members.graphs += [
        Graph(f"{title}: progress", tuple(_key("member", f"{t}_percent") for t in TRANSFERS), percent=True),
        Graph(f"{title}: bytes left", tuple(_key("member", f"{t}_rest") for t in TRANSFERS)),
        Graph(f"{title}: rates", tuple(_key("member", f"{t}_rate") for t in TRANSFERS)),
        Graph(f"{title}: lag", (_key("member", "fetch_lag"), _key("member", "replay_lag"))),
    ]
    how = ("pushed every minute by the cron job 'mars-zabbix send' to the trapper item mars.status.trap" if trapper
           else "polled every minute through the Zabbix agent (UserParameter mars.status)")
    return Template(
        name=name, master=master, items=items, triggers=triggers, rules=[peers, resources, members],
        graphs=[Graph("MARS: MARS directory space", ("mars.node.dir_total_bytes", "mars.node.dir_free_bytes"))],
        description=f"MARS block replication, one Zabbix host per MARS node; the status document is {how}. "
                    f"Generated by 'mars-zabbix template' (mars {__version__}); the problems are MARS's own findings, "
                    f"with their remedies. See zabbix-templates/README.md.")


def templates() -> list[Template]:
    return [_build(TEMPLATE_AGENT, False), _build(TEMPLATE_TRAPPER, True)]


# --- rendering (lxml) -------------------------------------------------------------------------------

COLORS = ("1A7C11", "F63100", "2774A4", "A54F10", "FC6EA3", "6C59DC")


def uuid4(path: str) -> str:
    """A UUIDv4 from the object's path: stable across regenerations (so a re-import updates the
    same objects, keeping their history), and version 4, as Zabbix 6.0's import requires."""
    return uuid.UUID(bytes=hashlib.sha256(path.encode()).digest()[:16], version=4).hex


def item_keys(expression: str) -> list[str]:
    """The item keys an expression (with T for the template) refers to, in order."""
    out, i = [], 0
    marker = f"/{T}/"
    while (j := expression.find(marker, i)) >= 0:
        k = end = j + len(marker)
        depth = 0
        while end < len(expression) and not (expression[end] in ",)" and depth == 0):
            depth += {"[": 1, "]": -1}.get(expression[end], 0)
            end += 1
        out.append(expression[k:end])
        i = end
    return out


class _Xml:
    """The export tree of one file; element order follows Zabbix's own exports."""

    def __init__(self) -> None:
        from lxml import etree

        self.etree = etree
        self.root = etree.Element("zabbix_export")

    def sub(self, parent: Any, tag: str, text: str | None = None) -> Any:
        el = self.etree.SubElement(parent, tag)
        if text is not None:
            el.text = text
        return el

    def tags(self, parent: Any, pairs: Iterable[tuple[str, str]]) -> None:
        pairs = sorted(pairs)
        if pairs:
            wrap = self.sub(parent, "tags")
            for tag, val in pairs:
                t = self.sub(wrap, "tag")
                self.sub(t, "tag", tag)
                self.sub(t, "value", val)

    def steps(self, parent: Any, steps: Iterable[Step]) -> None:
        steps = list(steps)
        if not steps:
            return
        pre = self.sub(parent, "preprocessing")
        for st in steps:
            s = self.sub(pre, "step")
            self.sub(s, "type", st.type)
            params = self.sub(s, "parameters")
            for p in st.params:
                self.sub(params, "parameter", p)
            if st.error_handler:
                self.sub(s, "error_handler", st.error_handler)
                self.sub(s, "error_handler_params", st.error_params)

    def item(self, parent: Any, tp: Template, it: Item, triggers: list[Trigger], known: list[Trigger],
             prototype: bool) -> None:
        tag = "item_prototype" if prototype else "item"
        el = self.sub(parent, tag)
        self.sub(el, "uuid", uuid4(f"{tp.name}/{tag}/{it.key}"))
        self.sub(el, "name", it.name)
        master = it is not tp.master
        self.sub(el, "type", "DEPENDENT" if master else "TRAP" if it.key == TRAP_KEY else "ZABBIX_PASSIVE")
        self.sub(el, "key", it.key)
        self.sub(el, "delay", "1m" if it.key == AGENT_KEY else "0")
        self.sub(el, "history", it.history)
        if it.value_type in ("TEXT", "CHAR"):
            self.sub(el, "trends", "0")
        self.sub(el, "value_type", it.value_type)
        if it.units:
            self.sub(el, "units", it.units)
        if it.description:
            self.sub(el, "description", it.description)
        if it.valuemap:
            self.sub(self.sub(el, "valuemap"), "name", it.valuemap)
        self.steps(el, it.preprocessing())
        if master:
            self.sub(self.sub(el, "master_item"), "key", tp.master.key)
        self.tags(el, it.tags)
        mine = [t for t in triggers if item_keys(t.expression) and set(item_keys(t.expression)) == {it.key}]
        if mine:
            wrap = self.sub(el, "trigger_prototypes" if prototype else "triggers")
            for t in sorted(mine, key=lambda t: t.name):
                self.trigger(wrap, tp, t, known, prototype)

    def trigger(self, parent: Any, tp: Template, t: Trigger, known: list[Trigger], prototype: bool) -> None:
        tag = "trigger_prototype" if prototype else "trigger"
        el = self.sub(parent, tag)
        self.sub(el, "uuid", uuid4(f"{tp.name}/{tag}/{t.name}"))
        self.sub(el, "expression", t.expression.replace(T, tp.name))
        self.sub(el, "name", t.name)
        if t.event_name:
            self.sub(el, "event_name", t.event_name)
        if t.opdata:
            self.sub(el, "opdata", t.opdata)
        self.sub(el, "priority", t.priority)
        self.sub(el, "description", t.description)
        if t.depends:
            deps = self.sub(el, "dependencies")
            by_name = {x.name: x for x in known}
            for name in sorted(t.depends):
                d = self.sub(deps, "dependency")
                self.sub(d, "name", name)
                self.sub(d, "expression", by_name[name].expression.replace(T, tp.name))
        self.tags(el, t.tags)

    def graph(self, parent: Any, tp: Template, g: Graph, prototype: bool) -> None:
        tag = "graph_prototype" if prototype else "graph"
        el = self.sub(parent, tag)
        self.sub(el, "uuid", uuid4(f"{tp.name}/{tag}/{g.name}"))
        self.sub(el, "name", g.name)
        if g.percent:
            self.sub(el, "ymin_type_1", "FIXED")
            self.sub(el, "ymax_type_1", "FIXED")
        gi = self.sub(el, "graph_items")
        for i, key in enumerate(g.keys):
            x = self.sub(gi, "graph_item")
            self.sub(x, "sortorder", str(i))
            self.sub(x, "color", COLORS[i % len(COLORS)])
            ref = self.sub(x, "item")
            self.sub(ref, "host", tp.name)
            self.sub(ref, "key", key)

    def template(self, parent: Any, tp: Template) -> tuple[list[Trigger], list[Graph]]:
        """One template; returns its triggers on several items and its graphs, which go at the top."""
        el = self.sub(parent, "template")
        self.sub(el, "uuid", uuid4(f"template/{tp.name}"))
        self.sub(el, "template", tp.name)
        self.sub(el, "name", tp.name)
        self.sub(el, "description", tp.description)
        self.sub(self.sub(self.sub(el, "groups"), "group"), "name", GROUP)
        items = self.sub(el, "items")
        for it in sorted([tp.master, *tp.items], key=lambda x: x.key):
            self.item(items, tp, it, tp.triggers, tp.triggers, prototype=False)
        rules = self.sub(el, "discovery_rules")
        for r in sorted(tp.rules, key=lambda x: x.key):
            rel = self.sub(rules, "discovery_rule")
            self.sub(rel, "uuid", uuid4(f"{tp.name}/discovery_rule/{r.key}"))
            self.sub(rel, "name", r.name)
            self.sub(rel, "type", "DEPENDENT")
            self.sub(rel, "key", r.key)
            self.sub(rel, "delay", "0")
            self.sub(rel, "lifetime", "7d")
            self.sub(rel, "description", r.description)
            known = [*r.triggers, *tp.triggers]
            protos = self.sub(rel, "item_prototypes")
            for it in sorted(r.items, key=lambda x: x.key):
                self.item(protos, tp, it, r.triggers, known, prototype=True)
            multi = [t for t in r.triggers if len(set(item_keys(t.expression))) != 1]
            if multi:
                wrap = self.sub(rel, "trigger_prototypes")
                for t in sorted(multi, key=lambda t: t.name):
                    self.trigger(wrap, tp, t, known, prototype=True)
            if r.graphs:
                wrap = self.sub(rel, "graph_prototypes")
                for g in sorted(r.graphs, key=lambda x: x.name):
                    self.graph(wrap, tp, g, prototype=True)
            self.sub(self.sub(rel, "master_item"), "key", tp.master.key)
            paths = self.sub(rel, "lld_macro_paths")
            for macro, k in sorted(LLD_MACROS[r.what].items()):
                p = self.sub(paths, "lld_macro_path")
                self.sub(p, "lld_macro", macro)
                self.sub(p, "path", f"$.{k}")
            self.steps(rel, (Step("JSONPATH", (f"$.discovery.{r.what}",)), DISCARD))
        self.tags(el, (("class", "software"), ("target", "mars")))
        macros = self.sub(el, "macros")
        for name, val, desc in sorted(MACROS):
            m = self.sub(macros, "macro")
            self.sub(m, "macro", name)
            self.sub(m, "value", val)
            self.sub(m, "description", desc)
        vms = self.sub(el, "valuemaps")
        for name, mappings in sorted(VALUEMAPS.items()):
            vm = self.sub(vms, "valuemap")
            self.sub(vm, "uuid", uuid4(f"{tp.name}/valuemap/{name}"))
            self.sub(vm, "name", name)
            ms = self.sub(vm, "mappings")
            for v, new in mappings:
                mp = self.sub(ms, "mapping")
                self.sub(mp, "value", v)
                self.sub(mp, "newvalue", new)
        return [t for t in tp.triggers if len(set(item_keys(t.expression))) != 1], tp.graphs


def render(tpls: list[Template] | None = None) -> str:
    """The export file of the templates: Zabbix 6.0's XML, the same bytes every time."""
    tpls = templates() if tpls is None else tpls
    x = _Xml()
    x.sub(x.root, "version", "6.0")
    x.sub(x.root, "date", EXPORT_DATE)
    g = x.sub(x.sub(x.root, "groups"), "group")
    x.sub(g, "uuid", uuid4(f"group/{GROUP}"))
    x.sub(g, "name", GROUP)
    wrap = x.sub(x.root, "templates")
    multi: list[tuple[Template, Trigger]] = []
    graphs: list[tuple[Template, Graph]] = []
    for tp in sorted(tpls, key=lambda t: t.name):
        ts, gs = x.template(wrap, tp)
        multi += [(tp, t) for t in ts]
        graphs += [(tp, g) for g in gs]
    if multi:
        wrap = x.sub(x.root, "triggers")
        for tp, t in sorted(multi, key=lambda p: (p[0].name, p[1].name)):
            x.trigger(wrap, tp, t, tp.triggers, prototype=False)
    if graphs:
        wrap = x.sub(x.root, "graphs")
        for tp, gr in sorted(graphs, key=lambda p: (p[0].name, p[1].name)):
            x.graph(wrap, tp, gr, prototype=False)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + x.etree.tostring(x.root, pretty_print=True, encoding="unicode")


# --- the README's tables -----------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def doc() -> str:
    """The generated part of zabbix-templates/README.md: macros, the triggers with their
    priorities and dependencies, and where each finding code shows (from the agent template;
    the trapper template is the same on mars.status.trap)."""
    tp = templates()[0]
    out = ["### Macros", "", "| Macro | Default | Meaning |", "|---|---|---|"]
    out += [f"| `{n}` | `{v}` | {_cell(d)} |" for n, v, d in sorted(MACROS)]
    out += ["", "### Triggers", "",
            "The expressions are the agent template's (`/MARS by Zabbix agent/`); the trapper template's are the "
            "same on its own name.", "",
            "| Trigger | Where | Priority | Expression | Depends on |", "|---|---|---|---|---|"]
    where = [("host", tp.triggers)] + [(f"discovery `{r.key}`", r.triggers) for r in tp.rules]
    for place, ts in where:
        for t in sorted(ts, key=lambda t: t.name):
            deps = "<br>".join(f"`{_cell(d)}`" for d in sorted(t.depends)) or "—"
            out.append(f"| `{_cell(t.name)}` | {place} | {t.priority} | `{_cell(t.expression.replace(T, tp.name))}` "
                       f"| {deps} |")
    out += ["", "### Finding codes", "",
            "One trigger per TODO and HINT code of the status model, at each kind of entity the code can be about; "
            "WORK codes are progress, shown in the member's `work` item, never a problem.", "",
            "| Code | Level | Priority | Shown at | Meaning |", "|---|---|---|---|---|"]
    for code, (level, meaning) in sorted(CODES.items()):
        kinds = ", ".join(k for k in scope(code))
        out.append(f"| `{code}` | {level} | {priority(code) or '— (no trigger)'} | {kinds} | {_cell(meaning)} |")
    return "\n".join(out) + "\n"


# --- zabbix_sender -----------------------------------------------------------------------------------

def _quote(text: str) -> str:
    """A field of zabbix_sender's input file: in double quotes, with \\ and " escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def send(payload: str, server: str | None, port: int | None, zhost: str | None, config: str | None,
         timeout: float = 30.0) -> str:
    """Push the document to the trapper item with zabbix_sender; the line to print, or MarsError
    naming the remedy."""
    sender = shutil.which(SENDER)
    if sender is None:
        raise MarsError(f"{SENDER} is not installed",
                        "install it: 'apt-get install zabbix-agent' (Debian ships zabbix_sender in that package)")
    cmd = [sender]
    if config:
        cmd += ["-c", config]
    if server:
        cmd += ["-z", server]
    if port is not None:
        cmd += ["-p", str(port)]
    if zhost:
        cmd += ["-s", zhost]
    if len(payload) <= SENDER_ARG_MAX:
        cmd += ["-k", TRAP_KEY, "-o", payload]
        stdin = None
    else:
        cmd += ["-i", "-"]
        stdin = f"{_quote(zhost) if zhost else '-'} {TRAP_KEY} {_quote(payload)}\n"
    target = f"{server or 'the ServerActive of ' + (config or '?')}:{port or 10051}"
    try:
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MarsError(f"{SENDER} got no answer from {target} within {timeout:g} s",
                        "check that the Zabbix server (or proxy) runs there and this node can reach its port "
                        "(firewall, --zabbix-server, --zabbix-port)") from None
    except OSError as e:
        raise MarsError(f"cannot run {sender}: {e.strerror or e}", "reinstall zabbix-agent") from None
    said = " ".join((r.stdout + " " + r.stderr).split())
    if r.returncode == 0:
        return f"sent the status to {target} as host {zhost or '(the config Hostname)'}: {said}"
    if r.returncode == 2 or "failed: 1" in said:
        raise MarsError(f"the Zabbix server at {target} refused the status of host {zhost or '(the config Hostname)'} "
                        f"({said})",
                        f"in Zabbix, create the host with exactly that technical name (or give --zabbix-host) and link "
                        f"the template '{TEMPLATE_TRAPPER}', whose trapper item is {TRAP_KEY}; the server takes a "
                        f"new item after its configuration cache refresh (CacheUpdateFrequency)")
    raise MarsError(f"{SENDER} could not send to {target} ({said or 'exit ' + str(r.returncode)})",
                    "check --zabbix-server and --zabbix-port (or the ServerActive of the agent config), that the "
                    "Zabbix server's trapper listens there (port 10051 by default) and that this node may reach it")


# --- the command -------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mars-zabbix",
        description="The Zabbix face of MARS: this node's status as one JSON document for the Zabbix agent or "
                    "zabbix_sender, its discoveries and single values, and the Zabbix 6.0 template.")
    p.add_argument("--mars-dir", default=None, help="the MARS state tree (default $MARS_DIR or /mars)")
    p.add_argument("--host", default=None, help="this node's name (default: the node the tree belongs to)")
    p.add_argument("--window", type=float, default=None, metavar="S",
                   help=f"seconds after which a silent node counts as not alive (default {model.ALIVE_WINDOW_S:g})")
    p.add_argument("--members", choices=("local", "all"), default="local",
                   help="whose resources and members to show: this node's (default: every node is a Zabbix host), "
                        "or every one this node's tree knows (one Zabbix host for a cluster)")
    p.add_argument("--version", action="version", version=f"mars-zabbix {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", help="print the master document (JSON) the template's items read; it says 'ok': 0 "
                                  "and why when the state cannot be read, and exits 0 either way")
    d = sub.add_parser("discovery", help="print one low-level discovery (JSON array with LLD macros)")
    d.add_argument("what", choices=sorted(LLD_MACROS), help="resources ({#RESOURCE}), members ({#RESOURCE}, "
                                                            "{#HOST}) or peers ({#PEER})")
    v = sub.add_parser("value", help="print one value for an ad-hoc agent check, e.g. 'value r/b/replay-rest'")
    v.add_argument("key", help=f"one of the forms {KEY_FORMS}; names are marsadm's view macros or the "
                               f"document's fields")
    s = sub.add_parser("send", help=f"push the master document to Zabbix with zabbix_sender (trapper item "
                                    f"{TRAP_KEY}), as the cron job does")
    s.add_argument("--zabbix-server", default=None, metavar="HOST",
                   help="the Zabbix server or proxy (default: ServerActive of the agent config)")
    s.add_argument("--zabbix-port", type=int, default=None, metavar="PORT", help="its trapper port (default 10051)")
    s.add_argument("--zabbix-host", default=None, metavar="NAME",
                   help="this node's technical host name in Zabbix (default: Hostname of the agent config, else "
                        "the MARS node name)")
    s.add_argument("--zabbix-config", default=None, metavar="FILE",
                   help=f"the agent config zabbix_sender reads ServerActive and Hostname from (default "
                        f"{DEFAULT_AGENT_CONFIG} when it exists)")
    t = sub.add_parser("template", help="write the Zabbix 6.0 template file (both templates)")
    t.add_argument("output", nargs="?", default="-", help="the file to write (default: standard output)")
    t.add_argument("--check", action="store_true", help="compare with the file instead: exit 1 when it differs")
    t.add_argument("--doc", action="store_true", help="print the generated tables of zabbix-templates/README.md")
    return p


def _read(args: argparse.Namespace, members: str) -> dict[str, Any]:
    """The master document of this node; MarsError when the state cannot be read."""
    if args.window is not None and not args.window > 0:
        raise model.UsageError(f"--window {args.window:g} is not a positive number of seconds", "for example --window 30")
    mars_dir = model.mars_dir_from(args.mars_dir)
    host, note = model.default_host(mars_dir, args.host)
    snap, answered = model.read_snapshot(mars_dir, host, window_s=args.window, timeout=SNAPSHOT_TIMEOUT_S,
                                         lines=False)
    return document(snap, model.findings(snap), answered, members, note)


def _status(args: argparse.Namespace) -> dict[str, Any]:
    """The document, or the error document: ``status`` and ``send`` always have one to give."""
    try:
        return _read(args, args.members)
    except MarsError as e:
        reason = str(e)
    except Exception as e:  # a bug must show in Zabbix as a reason, not break the JSON with a traceback
        reason = f"mars-zabbix failed to read the state: {e!r}; run 'mars-zabbix status' by hand and report it"
    mars_dir = model.mars_dir_from(args.mars_dir)
    try:
        host: str | None = model.default_host(mars_dir, args.host)[0]
    except MarsError:
        host = args.host
    return error_document(reason, host, mars_dir)


def _template(args: argparse.Namespace) -> int:
    text = doc() if args.doc else render()
    if args.check:
        if args.output == "-":
            raise model.UsageError("--check needs the file to compare", "give it: 'mars-zabbix template --check FILE'")
        try:
            old = Path(args.output).read_text()
        except OSError as e:
            raise MarsError(f"cannot read {args.output}: {e.strerror or e}", "give the template file to compare") from None
        if old != text:
            print(f"mars-zabbix: {args.output} is not what this version generates; regenerate it: "
                  f"'mars-zabbix template {'--doc ' if args.doc else ''}{args.output}'", file=sys.stderr)
            return 1
        return 0
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text)
    except OSError as e:
        raise MarsError(f"cannot write {args.output}: {e.strerror or e}", "choose a writable path") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "status":
            # One line of JSON on stdout and nothing on stderr: the agent hands both to Zabbix as one value.
            sys.stdout.write(json.dumps(_status(args), sort_keys=True, separators=(",", ":")) + "\n")
            return 0
        if args.command == "send":
            config = args.zabbix_config
            if config is None and Path(DEFAULT_AGENT_CONFIG).exists():
                config = DEFAULT_AGENT_CONFIG
            if args.zabbix_server is None and config is None:
                raise model.UsageError("no Zabbix server to send to",
                                       f"give --zabbix-server HOST, or --zabbix-config with an agent config whose "
                                       f"ServerActive names it (there is no {DEFAULT_AGENT_CONFIG})")
            doc_ = _status(args)
            zhost = args.zabbix_host or (None if config else doc_.get("host") or None)
            print(send(json.dumps(doc_, sort_keys=True, separators=(",", ":")), args.zabbix_server, args.zabbix_port,
                       zhost, config))
            return 0
        if args.command == "template":
            return _template(args)
        d = _read(args, args.members if args.command == "discovery" else "all")
        if args.command == "discovery":
            sys.stdout.write(json.dumps(discovery(d, args.what)) + "\n")
        else:
            print(value(d, args.key))
        return 0
    except MarsError as e:
        print(f"mars-zabbix: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
