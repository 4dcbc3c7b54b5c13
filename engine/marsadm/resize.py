"""resize: grow a resource online after every member's data device has grown.

As the original (its ``resize_phase0..2``): the primary checks that every member's disk holds
the new size, marks its own data as the complete copy of the new size (``syncstatus-<host>``),
writes the new ``size`` last and waits until its marsd serves that size. Each secondary's sync
position stays where it was, at the old size (or below it, when its sync had not finished), so
its syncer copies only what lies beyond; its replay waits meanwhile and starts again at a
position before the sync began, which makes the grown copy consistent (see the syncer).

Only growth: a smaller size would cut data that secondaries and the log may still hold.
"""

from __future__ import annotations

from .. import model
from ..model import human_bytes
from ..model.units import parse_size
from ..tree import res_dir
from .base import RES_ARG, Ctx, command
from .switches import _attached


@command("resize", "grow the resource to the smallest member's disk (or to SIZE) after every member's disk has "
                   "grown; secondaries sync only the new region",
         RES_ARG,
         ("size", {"nargs": "?", "help": "the new size, e.g. 2G, a multiple of 4 KiB (default: the smallest "
                                         "member's disk)"}),
         per_resource=True)
def resize(ctx: Ctx) -> None:
    tree, res, host = ctx.tree, ctx.res, ctx.host
    d = res_dir(res)
    rs = model.build(tree.root, host).require_resource(res)
    old = rs.size_bytes
    _refuse_unless_serving(ctx, rs)
    possible = _possible(ctx, rs)
    if ctx.args.size:
        new = parse_size(ctx.args.size)
        if new % 4096:
            raise ctx.fail(f"size {new} B is not a multiple of 4 KiB",
                           f"use {new // 4096 * 4096} or {(new // 4096 + 1) * 4096}")
    else:
        new = possible
    if new < old:
        raise ctx.fail(f"{human_bytes(new)} ({new} B) is smaller than the resource's {human_bytes(old)} ({old} B): "
                       "a resource only grows", f"give a size of at least {old} B")
    if new == old:
        if ctx.args.size:
            ctx.say(f"{res}: is {human_bytes(old)} already; nothing to do")
            return
        raise ctx.fail(f"no member's disk is larger than the resource ({human_bytes(old)}): "
                       f"{_smallest(rs)}", _GROW_FIRST)
    if new > possible:
        small = [f"{h} ({human_bytes(n.disk_bytes or 0)} on {n.disk or '?'})"
                 for h, n in sorted(rs.nodes.items()) if (n.disk_bytes or 0) < new]
        raise ctx.fail(f"the disk of {', '.join(small)} is smaller than the new size {human_bytes(new)} ({new} B)",
                       _GROW_FIRST)
    _refuse_if_paused(ctx, rs)
    ctx.refuse_in_emergency(host, "a resize")
    tree.set(f"{d}/resize-from", old)
    # The primary's data is the complete copy of the new size (the original does the same); the
    # size comes last, so nobody syncs towards it before the primary's entry says so.
    tree.set(f"{d}/syncstatus-{host}", new)
    tree.set(f"{d}/size", new)
    ctx.wait(f"serve {res} with {human_bytes(new)}", lambda: ctx.actual("size") == str(new))
    me = rs.nodes[host]
    if me.disk_bytes is not None and me.disk_bytes > new:
        ctx.say(f"{res}: you are wasting {human_bytes(me.disk_bytes - new)} on disk {me.disk} here")
    ctx.say(f"{res}: grown from {human_bytes(old)} to {human_bytes(new)}; NBD connections opened from now on see "
            f"the new size (reconnect open ones, then grow the filesystem: resize2fs, xfs_growfs); the secondaries "
            f"sync the new {human_bytes(new - old)} ('mars-status --status' shows it)")


_GROW_FIRST = ("grow the data device on every member first (lvresize, or truncate -s for an image file); "
               "'mars-status' shows 'resize possible' for every member once each reported its new size")


def _refuse_unless_serving(ctx: Ctx, rs: model.ResourceStatus) -> None:
    if rs.primary != ctx.host:
        raise ctx.fail(f"host {ctx.host} is not the primary of {ctx.res} ({rs.primary or 'none is'})",
                       f"run 'marsadm resize {ctx.res}' on {rs.primary}" if rs.primary
                       else f"make a member primary first ('marsadm primary {ctx.res}')")
    me = rs.nodes[ctx.host]
    if not (_attached(ctx) and me.actual.primary):
        raise ctx.fail(f"{ctx.res} is not served here now (marsd down, or the resource detached)",
                       f"start marsd and 'marsadm up {ctx.res}', then resize")
    if me.size_bytes is not None and me.size_bytes < rs.size_bytes:
        raise ctx.fail(f"the last resize to {human_bytes(rs.size_bytes)} has not taken effect here yet "
                       f"(marsd serves {human_bytes(me.size_bytes)})",
                       "look at marsd's log (the data device may be smaller than the resource)")


def _possible(ctx: Ctx, rs: model.ResourceStatus) -> int:
    """The smallest member's disk, the most a resize can give; refused while one is not known."""
    unknown = [h for h, n in sorted(rs.nodes.items()) if n.disk_bytes is None]
    if unknown:
        raise ctx.fail(f"the disk size of {', '.join(unknown)} is not known (never attached since joining)",
                       f"attach it ('marsadm up {ctx.res}' there), so its marsd reports its disk")
    possible = rs.possible_size
    assert possible is not None
    return possible


def _smallest(rs: model.ResourceStatus) -> str:
    low = min(n.disk_bytes or 0 for n in rs.nodes.values())
    hosts = [f"{h} has {human_bytes(low)} on {n.disk or '?'}" for h, n in sorted(rs.nodes.items())
             if n.disk_bytes == low]
    return ", ".join(hosts)


def _refuse_if_paused(ctx: Ctx, rs: model.ResourceStatus) -> None:
    """As the original (manual 3.9): no resize while a member's sync or replay is switched off.

    Such a member could not take up the new region: it would stay inconsistent, at the old size,
    until someone switches it on again, which is easy to forget. ``--force`` resizes anyway.
    """
    if ctx.force:
        return
    for h, n in sorted(rs.nodes.items()):
        if h == rs.primary:
            continue
        off = [what for what, on in (("sync", n.switches.sync), ("replay", n.switches.replay)) if not on]
        if off:
            raise ctx.fail(f"the {' and '.join(off)} of {ctx.res} is paused on {h}: it could not take up the new "
                           f"region", f"run {' and '.join(f'marsadm resume-{w} {ctx.res}' for w in off)} on {h} "
                                      "first, or pass --force to resize anyway")
