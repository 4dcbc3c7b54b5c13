"""create-resource and delete-resource: the single-node part of a resource's lifecycle."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from ..device import device_size
from ..log.files import LogFile, list_logs, read_replay, replay_path
from ..log.values import ReplayLink, log_name
from ..entry import DELETED
from ..tree import check_name, connect_list, fsync_dir, require_cluster, res_dir, set_connect_list, todo
from ..model.units import human_bytes, parse_size
from . import roles
from .base import RES_ARG, Ctx, command
from .switches import SWITCHES, _attached, _refuse_if_open

MIN_SIZE = 64 * 1024


@command("create-resource", "create a resource on a data device or image file; this host becomes its primary",
         ("resource", {"help": "name of the new resource (also the NBD export name)"}),
         ("device", {"help": "absolute path of a block device or image file (created sparse if missing and size given)"}),
         ("size", {"nargs": "?", "help": "resource size, e.g. 1G (default: the device's size); a multiple of 4 KiB"}))
def create_resource(ctx: Ctx) -> None:
    tree = ctx.tree
    require_cluster(tree)
    res = ctx.res = check_name("resource", ctx.args.resource)
    if res in tree.resources():
        raise ctx.fail(f"resource {res} already exists",
                       f"choose another name, or remove it first with 'marsadm delete-resource {res}'")
    dev = Path(ctx.args.device)
    if not dev.is_absolute():
        raise ctx.fail(f"device {dev} is not an absolute path", f"give the full path, e.g. {Path.cwd() / dev}")
    size = parse_size(ctx.args.size) if ctx.args.size else None
    if size is not None and size % 4096:
        raise ctx.fail(f"size {size} B is not a multiple of 4 KiB", f"use {size // 4096 * 4096} or {(size // 4096 + 1) * 4096}")
    for other in tree.resources():
        if tree.get(f"{res_dir(other)}/data-{ctx.host}") == str(dev):
            raise ctx.fail(f"{dev} is already the data device of resource {other}", "give another device")
    created = False
    if not dev.exists():
        _refuse_missing_device(ctx, dev)
        if size is None:
            raise ctx.fail(f"device {dev} does not exist", "give a size to create a sparse image file there")
        _create_image(ctx, dev, size)
        created = True
    st = os.stat(dev)
    if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
        raise ctx.fail(f"{dev} is neither a block device nor a regular file", "give a block device or an image file")
    have = device_size(dev)
    if size is None:
        size = have // 4096 * 4096
    if size > have:
        raise ctx.fail(f"device {dev} has {have} B ({human_bytes(have)}), less than the size {size} B",
                       "grow the device (for an image: truncate -s) or give a smaller size")
    if size < MIN_SIZE:
        raise ctx.fail(f"size {size} B is below the minimum of {MIN_SIZE} B", "give a larger device or size")
    d = res_dir(res)
    rdir = tree.root / d
    leftovers = list_logs(tree, res)
    if leftovers and not ctx.force:
        raise ctx.fail(f"old log files remain in {rdir}: {', '.join(f.name for f in leftovers[:3])}",
                       f"remove them (marsadm delete-resource {res} --force) or pass --force to start after them")
    # After leftovers, and after the logs of a deleted resource of this name (its maxnr stays).
    first = max([f.seq + 1 for f in leftovers] + [tree.get_int(f"{d}/maxnr") + 1])
    tree.mkdir(d)
    (rdir / log_name(first, ctx.host)).touch(mode=0o600)
    tree.set(f"{d}/maxnr", first)
    tree.set(f"{d}/data-{ctx.host}", str(dev))
    tree.set(f"{d}/device-{ctx.host}", res)
    tree.set(replay_path(res, ctx.host), ReplayLink(first, ctx.host, 0, 0))
    for s in SWITCHES:
        tree.set(todo(res, ctx.host, s), 1)
    tree.set(f"{d}/primary", ctx.host)
    tree.set(f"{d}/size", size)  # last: a resource exists for readers once it has a size
    ctx.say(f"created resource {res}: {human_bytes(size)} on {dev}{' (new sparse image)' if created else ''}, "
            f"primary {ctx.host}")
    ctx.wait(f"attach resource {res} and serve it", lambda: _attached(ctx), ctx.attach_error)


def _refuse_missing_device(ctx: Ctx, dev: Path) -> None:
    """A missing path under /dev is a typo or a disk that is not there, never a place for an image:
    /dev is a RAM file system, and an image there would vanish with the next boot."""
    if str(dev).startswith("/dev/") or str(dev.resolve()).startswith("/dev/"):
        raise ctx.fail(f"device {dev} does not exist",
                       "check the name ('lsblk' lists the block devices); images are not created under /dev")


def _create_image(ctx: Ctx, dev: Path, size: int) -> None:
    if not dev.parent.is_dir():
        raise ctx.fail(f"directory {dev.parent} does not exist", "create it first")
    with open(dev, "xb") as f:
        f.truncate(size)
        os.fsync(f.fileno())
    # The image is the resource's data: a power cut right after create-resource or join-resource
    # must not take it away while the tree that names it (synced) stays.
    fsync_dir(dev.parent)


@command("delete-resource", "remove a resource from the tree and delete its log files (refused while attached)",
         ("resource", {"help": "the resource to delete"}))
def delete_resource(ctx: Ctx) -> None:
    tree = ctx.tree
    require_cluster(tree)
    res = ctx.res = check_name("resource", ctx.args.resource)
    if res not in tree.resources():
        raise ctx.fail(f"resource {res} does not exist", "nothing to delete")
    others = [h for h in tree.members(res) if h != ctx.host]
    if others and not ctx.force:
        raise ctx.fail(f"hosts {', '.join(others)} are still members",
                       "run 'marsadm leave-resource' there first, or pass --force to destroy it for everyone")
    if tree.get(todo(res, ctx.host, "attach")) == "1" or _attached(ctx):
        if not ctx.force:
            raise ctx.fail("the resource is attached on this host",
                           f"run 'marsadm down {res}' first, or pass --force to take it down")
        _refuse_if_open(ctx)
        for s in reversed(SWITCHES):
            tree.set(todo(res, ctx.host, s), 0)
        ctx.wait(f"detach resource {res}", lambda: not _attached(ctx))
    d = res_dir(res)
    # The size goes first: from then on nobody (marsd included) treats the directory as a resource.
    tree.delete(f"{d}/size")
    removed = 0
    for f in list_logs(tree, res):
        removed += f.size()
        f.path.unlink()
    for dirpath, dirnames, filenames in os.walk(tree.root / d):
        for n in filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(tree.root))
            # maxnr stays (as in the original): a resource made again under this name numbers its
            # logs on from there, so no old log file anywhere can be taken for one of the new.
            if p.is_symlink() and os.readlink(p) != DELETED and rel != f"{d}/maxnr":
                tree.delete(rel, durable=False)
    ctx.poke()
    ctx.say(f"deleted resource {res} ({human_bytes(removed)} of log files removed; the data device is untouched)")


@command("join-resource", "become a secondary of a resource: register the data device and start a fast full sync",
         ("resource", {"help": "the resource to join"}),
         ("device", {"help": "absolute path of a block device or image file"}),
         ("--create", {"action": "store_true",
                       "help": "create the image file (sparse, the resource's size) if it does not exist"}))
def join_resource(ctx: Ctx) -> None:
    tree = ctx.tree
    require_cluster(tree)
    res = ctx.res = check_name("resource", ctx.args.resource)
    if res not in tree.resources():
        raise ctx.fail(f"resource {res} does not exist in this node's tree",
                       "create it on the primary first; joined nodes learn it within a second")
    d = res_dir(res)
    if tree.get(f"{d}/data-{ctx.host}") is not None:
        raise ctx.fail(f"host {ctx.host} is already a member", "nothing to do")
    primary = tree.get(f"{d}/primary")
    if not primary or primary == "(none)":
        raise ctx.fail("the resource has no designated primary", "make one node primary first")
    ctx.refuse_in_emergency(primary, f"a join (its full sync from {primary})")
    size = tree.get_int(f"{d}/size")
    dev = Path(ctx.args.device)
    if not dev.is_absolute():
        raise ctx.fail(f"device {dev} is not an absolute path", f"give the full path, e.g. {Path.cwd() / dev}")
    created = False
    if not dev.exists():
        _refuse_missing_device(ctx, dev)
        if not ctx.args.create:
            raise ctx.fail(f"device {dev} does not exist",
                           f"give an existing block device or image, or pass --create to make a sparse image of "
                           f"{human_bytes(size)} there")
        _create_image(ctx, dev, size)
        created = True
    have = device_size(dev)
    if have < size and not ctx.force:
        raise ctx.fail(f"device {dev} has {have} B ({human_bytes(have)}), less than the resource's {size} B",
                       "give a device at least as large as the resource")
    link = read_replay(tree, res, primary)
    if link is None:
        raise ctx.fail(f"the primary {primary} has published no log position yet",
                       "wait until marsd runs on the primary and this node has exchanged trees with it")
    # Replay starts at the beginning of the primary's current log file: before the sync starts,
    # as consistency needs (replay is idempotent), and it holds that log back from deletion.
    tree.set(replay_path(res, ctx.host), ReplayLink(link.seq, link.origin, 0, 0))
    tree.set(f"{d}/syncstatus-{ctx.host}", 0)
    tree.set(f"{d}/device-{ctx.host}", res)
    for s in SWITCHES:
        tree.set(todo(res, ctx.host, s), 1)
    tree.set(f"{d}/data-{ctx.host}", str(dev))  # last: from now on this host is a member
    ctx.say(f"joined resource {res} as secondary of {primary}: {human_bytes(size)} on {dev}"
            f"{' (new sparse image)' if created else ''}; fast full sync starts")
    ctx.wait(f"attach resource {res}", lambda: _attached(ctx), ctx.attach_error)


def _secondary_only(ctx: Ctx) -> str:
    primary = ctx.tree.get(f"{res_dir(ctx.res)}/primary") or ""
    if primary == ctx.host:
        raise ctx.fail(f"host {ctx.host} is the primary of {ctx.res}",
                       "this command is for secondaries; the primary's data is the reference")
    return primary


@command("fake-sync", "mark this secondary as synced without copying (experts: only if the data is known equal)",
         RES_ARG, per_resource=True)
def fake_sync(ctx: Ctx) -> None:
    _secondary_only(ctx)
    if not ctx.force:
        raise ctx.fail("fake-sync declares the data equal to the primary's without checking",
                       "pass --force if you know it is (e.g. both were zeroed); otherwise let the sync run")
    d = res_dir(ctx.res)
    ctx.tree.set(f"{d}/syncstatus-{ctx.host}", ctx.tree.get_int(f"{d}/size"))
    ctx.say(f"{ctx.res}: marked as synced")


@command("invalidate", "discard this secondary's data and resync it from the primary (fast full sync)",
         RES_ARG, per_resource=True)
def invalidate(ctx: Ctx) -> None:
    primary = _secondary_only(ctx)
    ctx.refuse_in_emergency(primary, f"an invalidate (a full sync from {primary})")
    tree = ctx.tree
    d = res_dir(ctx.res)
    link = read_replay(tree, ctx.res, primary)
    if link is None:
        raise ctx.fail(f"the primary {primary} has published no log position", "wait until it runs and is reachable")
    was = {s: tree.get(todo(ctx.res, ctx.host, s)) == "1" for s in ("allow-replay", "connect")}
    # Replay and fetch stop first: replay's next checkpoint would overwrite the new start position,
    # and the fetcher must not append to a copy that is being set aside.
    for s in was:
        tree.set(todo(ctx.res, ctx.host, s), 0)
    if _attached(ctx):
        ctx.wait(f"stop replaying and fetching {ctx.res}",
                 lambda: ctx.actual("is-replaying") != "1" and ctx.actual("is-copying") != "1")
    aside = _set_aside_damaged_copies(ctx, link.seq)
    # After a split brain: this host's own files of the discarded history go aside, and its
    # version entries become the primary's, so the history it replays from now on is one.
    split = roles.set_aside(roles.other_history(tree, ctx.res, primary), "split-brain")
    adopted = roles.adopt_history(tree, ctx.res, primary)
    tree.set(replay_path(ctx.res, ctx.host), ReplayLink(link.seq, link.origin, 0, 0), restamp=True)
    tree.set(f"{d}/syncstatus-{ctx.host}", 0, restamp=True)
    tree.delete(f"{d}/syncpos-{ctx.host}")
    tree.delete(f"resource-{ctx.res}/actual-{ctx.host}/msg-err-replay-stop")
    for s, on in was.items():
        if on:
            tree.set(todo(ctx.res, ctx.host, s), 1)
    if aside:
        ctx.say(f"{ctx.res}: set aside the damaged log cop{'ies' if len(aside) > 1 else 'y'} "
                f"{', '.join(f.name for f in aside)} in {aside[0].path.parent.parent.name}/ (kept for inspection); "
                f"{'they are' if len(aside) > 1 else 'it is'} fetched again from {primary}")
    if split is not None or adopted:
        ctx.say(f"{ctx.res}: discarded this host's history after the split brain: "
                + (f"its log files of it are in {split.parent.name}/{split.name}/ (kept for inspection; "
                   f"'marsadm log-purge-all {ctx.res} --force' deletes them), " if split is not None else "")
                + f"its version entries are {primary}'s now")
    ctx.say(f"{ctx.res}: invalidated; a fast full sync from {primary} starts, then replay from {link}")
    ctx.poke()


def _set_aside_damaged_copies(ctx: Ctx, from_seq: int) -> list[LogFile]:
    """Clear this node's log copies that the new replay would read again; keep the damaged ones.

    Replay restarts at the primary's current log file, and the fetcher fetches it (and what
    follows) anew: whatever this node holds from there on is not to be trusted. A copy with a
    damaged record (not a torn tail) would stop the replay at the same record again; one of
    another history (after a split brain or a log-truncate on the primary) would be replayed as
    if it were the primary's. The damaged ones go to ``damaged-<time>/`` (an operator may need
    them to find the cause), the others are deleted. Never this node's own log.
    """
    out = []
    keep = ctx.tree.root / res_dir(ctx.res) / f"damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for f in list_logs(ctx.tree, ctx.res):
        if f.origin == ctx.host or f.seq < from_seq:
            continue
        r = f.scan()
        if r.error is not None and not r.error.torn:
            keep.mkdir(mode=0o700, exist_ok=True)
            os.replace(f.path, keep / f.name)
            out.append(LogFile(f.seq, f.origin, keep / f.name))
        else:
            f.path.unlink(missing_ok=True)
    return out


@command("leave-resource", "stop being a member of a resource (down first; --host <dead> --force for a dead node)",
         RES_ARG, per_resource=True)
def leave_resource(ctx: Ctx) -> None:
    tree = ctx.tree
    d = res_dir(ctx.res)
    if tree.get(f"{d}/primary") == ctx.host and not ctx.force:
        raise ctx.fail(f"host {ctx.host} is the primary", "make another node primary first, or delete the resource")
    if (tree.get(todo(ctx.res, ctx.host, "attach")) == "1" or _attached(ctx)) and not ctx.force:
        raise ctx.fail("the resource is still up on this host", f"run 'marsadm down {ctx.res}' first")
    if _attached(ctx):
        for s in reversed(SWITCHES):
            tree.set(todo(ctx.res, ctx.host, s), 0)
        ctx.wait(f"detach resource {ctx.res}", lambda: not _attached(ctx))
    for name in (f"data-{ctx.host}", f"device-{ctx.host}", f"replay-{ctx.host}", f"syncstatus-{ctx.host}",
                 f"syncpos-{ctx.host}", f"connect-{ctx.host}"):
        tree.delete(f"{d}/{name}")
    # Its version entries said which history it held; a host that left holds none (and one of
    # a discarded split-brain history would go on reporting the split).
    for name in tree.names(d):
        if name.startswith("version-") and name.endswith(f"-{ctx.host}"):
            tree.delete(f"{d}/{name}")
    for sub in (f"todo-{ctx.host}", f"actual-{ctx.host}"):
        for n in tree.names(f"{d}/{sub}"):
            tree.delete(f"{d}/{sub}/{n}", durable=False)
    if (tree.root / "cluster" / f"node-{ctx.host}.pem").exists():
        # Only on the leaving host itself (its node certificate is here): its fetched copies go.
        # With --host <dead> on a survivor the log files here are the survivor's: never touched.
        for f in list_logs(tree, ctx.res):
            if f.origin != ctx.host:
                f.path.unlink(missing_ok=True)
        primary = tree.get(f"{d}/primary")
        if primary and primary != ctx.host:
            roles.set_aside(roles.other_history(tree, ctx.res, primary), "split-brain")
    ctx.poke()
    ctx.say(f"{ctx.res}: host {ctx.host} left the resource; its log positions no longer hold logs back")


@command("set-connect-pref-list", "where this host fetches from: an ordered list of nodes (empty: the primary)",
         RES_ARG, ("hosts", {"nargs": "?", "default": "", "help": "comma-separated host names, e.g. b,a"}),
         per_resource=True)
def set_connect_pref_list(ctx: Ctx) -> None:
    tree = ctx.tree
    hosts = [check_name("host", h) for h in ctx.args.hosts.split(",") if h]
    if ctx.host in hosts:
        raise ctx.fail("a host cannot fetch from itself", "leave it out of the list")
    members = tree.members(ctx.res)
    unknown = [h for h in hosts if h not in members]
    if unknown:
        raise ctx.fail(f"{', '.join(unknown)} not a member of {ctx.res}", f"members are {', '.join(members)}")
    # Refuse cycles: following first choices from any listed host must not lead back here.
    seen, h = {ctx.host}, hosts[0] if hosts else None
    while h is not None:
        if h in seen:
            raise ctx.fail(f"the list makes a cycle through {h}", "let one of them fetch from the primary")
        seen.add(h)
        nxt = connect_list(tree, ctx.res, h)
        h = nxt[0] if nxt else None
    set_connect_list(tree, ctx.res, ctx.host, hosts)
    where = f"{', '.join(hosts)}, then the primary" if hosts else "the primary"
    ctx.say(f"{ctx.res}: {ctx.host} fetches from {where}")
    ctx.poke()


@command("get-connect-pref-list", "print where this host fetches from", RES_ARG, per_resource=True)
def get_connect_pref_list(ctx: Ctx) -> None:
    print(",".join(connect_list(ctx.tree, ctx.res, ctx.host)))
