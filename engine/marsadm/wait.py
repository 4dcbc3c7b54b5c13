"""Waiting for the cluster and for a resource: wait-cluster and wait-resource, for scripts.

Both only read: they build the model's snapshot (:mod:`mars.engine.model`) again and again until
what they wait for is true, through :meth:`Ctx.wait` (its deadline ``--timeout``, its progress
line). When the deadline passes they exit 1 saying what was reached and what to do, so a script
can tell "not yet" from "done" without parsing the view.

* ``wait-cluster [res]``: every node (with resources: every member) reports again. As the
  original's ping-pong: a node counts when its ``actual-<host>/time`` in this node's tree is newer
  than when the command started, which needs this node's marsd to pull it and the other's marsd
  to write it. The Lamport value, not the wall clock, decides, so skewed clocks do not matter.
* ``wait-resource <res> <cond>``: ``<what>-on`` or ``<what>-off``; ``<what>`` is a switch (the
  desired state in ``todo-<host>/``) or ``is-<what>`` what marsd reports doing (the actual state).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

from .. import model
from ..errors import UsageError
from ..model import Member
from ..tree import require_cluster
from .base import RES_ARG, Ctx, command
from .view import resources_named

POLL_S = 0.2  # a new snapshot at most this often while waiting (Ctx.wait asks every 50 ms)
REPORT_SLACK_S = 1e-3  # a report counts as new when it is this much newer (float round-off of Lamport seconds)


class _Watch:
    """The snapshot a waiting command looks at, rebuilt at most every POLL_S."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        window = getattr(ctx.args, "window", None)
        self.window_s = model.ALIVE_WINDOW_S if window is None else window
        if self.window_s <= 0:
            raise UsageError(f"--window {window:g} is not a positive number of seconds", "give e.g. --window 30")
        self._snap: model.Snapshot | None = None
        self._at = 0.0

    def snap(self) -> model.Snapshot:
        now = time.monotonic()
        if self._snap is None or now - self._at >= POLL_S:
            self._snap = model.build(self.ctx.tree.root, self.ctx.host, window_s=self.window_s)
            self._at = now
        return self._snap


def _wait(ctx: Ctx, what: str, done: Callable[[], bool], not_reached: Callable[[], str]) -> None:
    """Ctx.wait, with this command's own words when marsd is down or the deadline passes.

    ``not_reached()`` says what was reached and the remedy; it is asked once the deadline is
    over, which this clock (started before Ctx.wait's) notices first.
    """
    if ctx.args.no_wait:
        raise UsageError(f"{ctx.command} only waits, so --no-wait leaves it nothing to do", "drop --no-wait")
    if not done() and ctx.marsd_pid() is None:
        raise ctx.fail(f"marsd is not running on host {ctx.host}, so nothing can change here while waiting "
                       f"to {what}", f"start it ('marsd --mars-dir {ctx.tree.root} --host {ctx.host}')")
    start = time.monotonic()
    timeout = ctx.args.timeout

    def failed() -> str | None:
        return not_reached() if time.monotonic() - start >= timeout else None

    ctx.wait(what, done, failed)


# --- wait-cluster ------------------------------------------------------------------------------

def _reported(snap: model.Snapshot, host: str) -> float | None:
    """The Lamport time of the host's last report (its ``time`` entry), None when it never reported."""
    n = snap.nodes.get(host)
    if n is None or n.seen_age_s is None:
        return None
    return snap.lamport_s - n.seen_age_s


def _hosts(ctx: Ctx, snap: model.Snapshot, spec: str | None) -> list[str]:
    """The nodes of the cluster (a live ``ips/ip-<host>``), or the members of the named resources."""
    if spec is None:
        return sorted(h for h, n in snap.nodes.items() if n.ip is not None)
    names = resources_named(ctx, snap, spec)
    if not names:
        raise ctx.fail(f"host {ctx.host} is a member of no resource", "name a resource, or leave it out to "
                       "wait for every node of the cluster")
    return sorted({h for name in names for h in snap.resources[name].members})


@command("wait-cluster", "wait until every node of the cluster (with resources: every member) has reported since "
         "now; exit 1 naming the nodes that did not within --timeout",
         ("resource", {"nargs": "?", "default": None,
                       "help": "resource name, comma-separated names, or 'all' (default: every node of the cluster)"}),
         aliases=("wait-connect",))
def wait_cluster(ctx: Ctx) -> None:
    require_cluster(ctx.tree)
    watch = _Watch(ctx)
    first = watch.snap()
    hosts = _hosts(ctx, first, ctx.args.resource)
    before = {h: _reported(first, h) for h in hosts}

    def silent() -> list[str]:
        snap = watch.snap()
        out = []
        for h in hosts:
            now, then = _reported(snap, h), before[h]
            if now is None or (then is not None and now <= then + REPORT_SLACK_S):
                out.append(h)
        return out

    def not_reached() -> str:
        late = silent()
        snap = watch.snap()
        where = ", ".join(f"{h} ({snap.nodes[h].ip})" if h in snap.nodes and snap.nodes[h].ip else h for h in late)
        return (f"{len(hosts) - len(late)}/{len(hosts)} nodes reported within {ctx.args.timeout:g} s; no report "
                f"from {', '.join(late)}; start marsd there and check the network from this host to {where} "
                f"(firewall, routing, the ips/ip-<node> entries)")

    _wait(ctx, "hear from every node" if ctx.args.resource is None else "hear from every member",
          lambda: not silent(), not_reached)
    ctx.say(f"{len(hosts)}/{len(hosts)} nodes reported")


# --- wait-resource -------------------------------------------------------------------------------

def _live(m: Member) -> model.Actual | None:
    """What this host's marsd reports for the resource; None when marsd is down (its last report
    in the tree is stale then: nothing runs) or the host is no member."""
    return m.n.actual if m.n is not None and m.snap.marsd_running else None


# The desired state: todo-<host>/… and the resource's designated primary.
SWITCHES: dict[str, Callable[[Member], bool]] = {
    "attach": lambda m: bool(m.n and m.n.switches.attach),
    "fetch": lambda m: bool(m.n and m.n.switches.fetch),
    "connect": lambda m: bool(m.n and m.n.switches.fetch),
    "replay": lambda m: bool(m.n and m.n.switches.replay),
    "sync": lambda m: bool(m.n and m.n.switches.sync),
    "primary": lambda m: m.designated,  # this host is the designated primary (todo-primary)
    "secondary": lambda m: m.r.primary is None,  # no primary designated (todo-secondary, 'marsadm secondary')
}

# What marsd reports doing: actual-<host>/is-…
REPORTS: dict[str, Callable[[model.Actual], bool]] = {
    "attach": lambda a: a.attached,
    "fetch": lambda a: a.fetching,
    "copy": lambda a: a.fetching,
    "replay": lambda a: a.replaying,
    "sync": lambda a: a.syncing,
    "primary": lambda a: a.primary,
    "device": lambda a: a.primary and a.attached,  # the NBD export is served (the original's /dev/mars/<res>)
}


def _valid() -> str:
    return (f"give <what>-on or <what>-off, <what> a switch ({', '.join(SWITCHES)}) or what marsd reports "
            f"({', '.join('is-' + k for k in REPORTS)}), e.g. attach-on or is-replay-off")


@dataclass(frozen=True)
class Condition:
    text: str  # as given, e.g. is-attach-on
    what: str  # attach, is-attach
    on: bool

    def holds(self, m: Member) -> bool:
        if self.what.startswith("is-"):
            a = _live(m)
            return (a is not None and REPORTS[self.what[3:]](a)) == self.on
        return SWITCHES[self.what](m) == self.on


def parse_condition(text: str) -> Condition:
    """``attach-on``, ``is-replay-off``, ...; the original's ``has-`` prefix means ``is-``."""
    base, sep, state = text.rpartition("-")
    if sep and base.startswith("has-"):
        base = "is-" + base[4:]
    known = base[3:] in REPORTS if base.startswith("is-") else base in SWITCHES
    if not sep or state not in ("on", "off") or not known:
        raise argparse.ArgumentTypeError(f"unknown condition {text!r}; {_valid()}")
    return Condition(text, base, state == "on")


@command("wait-resource", "wait until a switch or what marsd reports for a resource is on or off (e.g. attach-on, "
         "is-replay-off); exit 1 with the state reached after --timeout",
         RES_ARG, ("condition", {"type": parse_condition, "metavar": "cond",
                                 "help": "<switch>-on|off (attach, fetch, connect, replay, sync, primary, secondary) "
                                         "or is-<what>-on|off (attach, fetch, copy, replay, sync, primary, device)"}),
         per_resource=True)
def wait_resource(ctx: Ctx) -> None:
    cond: Condition = ctx.args.condition
    watch = _Watch(ctx)

    def member() -> Member:
        snap = watch.snap()
        return Member(snap, snap.require_resource(ctx.res), ctx.host)

    def not_reached() -> str:
        m = member()
        now = "on" if Condition(cond.text, cond.what, True).holds(m) else "off"
        down = "" if m.snap.marsd_running else f"; marsd stopped on host {ctx.host}"
        return (f"{cond.text} not reached within {ctx.args.timeout:g} s: {cond.what} is {now} "
                f"({m.diskstate()} {m.replstate()} {m.flags()} {m.role()}){down}; see 'marsadm view {ctx.res}' "
                "and marsd's log, or raise --timeout if it is just slow")

    _wait(ctx, f"reach {cond.text} for {ctx.res}", lambda: cond.holds(member()), not_reached)
    ctx.say(f"{ctx.res}: {cond.text}")


__all__ = ["Condition", "parse_condition", "wait_cluster", "wait_resource"]
