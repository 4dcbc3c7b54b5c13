"""Log file housekeeping: rotate, delete what every member has replayed, truncate a damaged log,
and ``cron``, the periodic job that does the first two where they are due."""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
import time

from .. import model
from ..errors import MarsError
from ..log.files import deletable_logs, delete_logs, list_logs, read_replay, replay_path, version_path
from ..log.values import ReplayLink, log_name
from ..tree import actual, require_cluster, res_dir
from ..model.units import human_bytes
from .base import RES_ARG, Ctx, command
from .switches import _attached


@command("log-rotate", "start a new log file now (on the primary); the finished one gets its version entry",
         RES_ARG, per_resource=True)
def log_rotate(ctx: Ctx) -> None:
    tree = ctx.tree
    if tree.get(f"{res_dir(ctx.res)}/primary") != ctx.host:
        raise ctx.fail(f"host {ctx.host} is not the primary of {ctx.res}", "run log-rotate on the primary")
    own = [f for f in list_logs(tree, ctx.res) if f.origin == ctx.host]
    if not own:
        raise ctx.fail("this host has no log file for the resource", "attach the resource first")
    cur = own[-1]
    if cur.size() == 0 and not ctx.force:
        ctx.say(f"{ctx.res}: {cur.name} is empty; nothing to rotate")
        return
    nxt = cur.seq + 1
    (tree.root / res_dir(ctx.res) / log_name(nxt, ctx.host)).touch(mode=0o600)
    tree.set(f"{res_dir(ctx.res)}/maxnr", nxt)
    ctx.say(f"{ctx.res}: rotating {cur.name} ({human_bytes(cur.size())}) -> {log_name(nxt, ctx.host)}")
    if _attached(ctx):
        ctx.wait(f"switch {ctx.res} to {log_name(nxt, ctx.host)}",
                 lambda: tree.get(version_path(ctx.res, cur.seq, ctx.host)) is not None)


def _delete(ctx: Ctx, only_oldest: bool) -> None:
    tree = ctx.tree
    files = deletable_logs(tree, ctx.res)
    if only_oldest:
        files = files[:1]
    if not files:
        logs = list_logs(tree, ctx.res)
        holders = [f"{h} at {read_replay(tree, ctx.res, h)}" for h in tree.members(ctx.res)]
        ctx.say(f"{ctx.res}: no log file can be deleted ({len(logs)} present; the newest is kept, and every "
                f"member must have replayed a file first: {', '.join(holders)})")
        return
    total = delete_logs(tree, ctx.res, files)
    for f in files:
        ctx.say(f"{ctx.res}: deleted {f.name}")
    ctx.poke()
    ctx.say(f"{ctx.res}: {len(files)} log file(s) deleted, {human_bytes(total)} freed")


@command("log-delete", "delete the log files every member has replayed", RES_ARG, per_resource=True)
def log_delete(ctx: Ctx) -> None:
    _delete(ctx, only_oldest=False)


@command("log-delete-all", "same as log-delete: every log file every member has replayed", RES_ARG, per_resource=True)
def log_delete_all(ctx: Ctx) -> None:
    _delete(ctx, only_oldest=False)


@command("log-delete-one", "delete only the oldest log file every member has replayed", RES_ARG, per_resource=True)
def log_delete_one(ctx: Ctx) -> None:
    _delete(ctx, only_oldest=True)


@command("log-truncate", "after replay stopped on a damaged record: cut the log there (loses the writes after it)",
         RES_ARG, per_resource=True)
def log_truncate(ctx: Ctx) -> None:
    """The way out of a damaged log on a single node: keep the good prefix, set the rest aside.

    Nothing is destroyed: the damaged tail and any later log files are moved into
    ``damaged-<time>/`` in the resource directory for inspection.
    """
    tree = ctx.tree
    link = read_replay(tree, ctx.res, ctx.host)
    logs = [f for f in list_logs(tree, ctx.res) if link is None or f.seq >= link.seq]
    damaged = None
    for f in logs:
        r = f.scan()
        if r.error is not None:
            damaged = (f, r)
            break
    if damaged is None:
        ctx.say(f"{ctx.res}: no damaged record found after the replay position; nothing to truncate")
        return
    f, r = damaged
    later = [g for g in logs if g.seq > f.seq]
    lost = f.size() - r.end + sum(g.size() for g in later)
    if not ctx.force:
        raise ctx.fail(f"{r.error}; cutting there loses {human_bytes(lost)} of log after offset {r.end}"
                       + (f" and {len(later)} later log file(s)" if later else ""),
                       "pass --force to cut (the cut-off part is kept in a damaged-* directory)")
    keep = tree.root / res_dir(ctx.res) / f"damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    keep.mkdir(mode=0o700)
    with open(f.path, "rb") as src, open(keep / f"{f.name}.from-{r.end}", "wb") as dst:
        src.seek(r.end)
        shutil.copyfileobj(src, dst)
    with open(f.path, "r+b") as fh:
        fh.truncate(r.end)
        os.fdatasync(fh.fileno())
    for g in later:
        os.replace(g.path, keep / g.name)
    if link is not None and link.seq > f.seq:
        tree.set(replay_path(ctx.res, ctx.host), ReplayLink(f.seq, f.origin, r.end, 0))
    tree.delete(actual(ctx.res, ctx.host, "msg-err-attach"))
    ctx.say(f"{ctx.res}: cut {f.name} at offset {r.end}; {human_bytes(lost)} set aside in {keep}")
    if tree.get(f"{res_dir(ctx.res)}/todo-{ctx.host}/attach") == "1":
        tree.set(f"{res_dir(ctx.res)}/todo-{ctx.host}/attach", 1, restamp=True)
        ctx.wait(f"attach resource {ctx.res}", lambda: _attached(ctx), ctx.attach_error)


# --- cron ------------------------------------------------------------------------------------

CRON_LOCK = "cron.lock"  # in the tree: one cron at a time per tree


def _cron_lock(ctx: Ctx) -> int | None:
    """Hold ``<mars-dir>/cron.lock`` for this run; None (and a line saying so) when another run holds it."""
    fd = os.open(ctx.tree.root / CRON_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        words = os.pread(fd, 64, 0).decode(errors="replace").split()
        os.close(fd)
        ctx.say(f"another marsadm cron (pid {words[0] if words else 'unknown'}) runs on {ctx.tree.root}; "
                "this one leaves the work to it")
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _cron_resource(ctx: Ctx, snap: model.Snapshot) -> None:
    """One resource: rotate and delete on the serving primary, a line saying why not elsewhere."""
    res, host = ctx.res, ctx.host
    m = model.Member(snap, snap.require_resource(res), host)
    n = m.n
    if n is None:
        ctx.say(f"{res}: host {host} is no member; nothing to do")
        return
    if not m.designated:
        ctx.say(f"{res}: host {host} is a secondary (primary: {m.r.primary or '(none)'}); nothing to do here, "
                "marsd deletes its log copies after the primary's cron")
        return
    if not (n.actual.primary and n.actual.attached):
        ctx.say(f"{res}: host {host} is the designated primary but does not serve {res} ({m.role()}, "
                f"{m.diskstate()}); nothing to rotate or delete until it does ('marsadm attach {res}')")
        return
    own = [f for f in m.r.logs if f.origin == host and f.local_bytes is not None]
    if not own:
        ctx.say(f"{res}: host {host} has no log file of its own; nothing to rotate")
    elif own[-1].local_bytes == 0:
        ctx.say(f"{res}: {own[-1].name} is empty; nothing to rotate")
    else:
        log_rotate(ctx)
    _delete(ctx, only_oldest=False)


@command("cron", "the periodic housekeeping, for cron every 10 minutes: where this host is the primary, rotate "
         "a log file that is not empty and delete the log files every member has replayed",
         ("resource", {"nargs": "?", "default": "all",
                       "help": "resource name, comma-separated names, or 'all' (default)"}))
def cron(ctx: Ctx) -> None:
    """The original's ``marsadm cron``: ``*/10 * * * * root marsadm cron`` (see the upstream cron.d).

    Per resource where this host is the primary and serves it: ``log-rotate`` when the current
    log file is not empty (waiting for marsd to switch to the new file), then ``log-delete`` of
    every file all members have replayed; the secondaries follow and delete their copies. A file
    rotated in this run is deleted once every member has replayed it: usually by the next run
    (the original slept 7 s between the two phases; waiting here would only delay the others). Elsewhere
    one line says why there is nothing to do. One line per action, on stderr as every marsadm
    line; a second cron on the same tree (``cron.lock``, flock'ed) says so and exits 0, a resource
    that fails is reported and the others are still done (then exit 1), and without marsd
    (nothing attached, nothing can switch) it exits 1 at once.

    What it does *not* do, unlike the original: purge tombstones (entries whose value is
    ``.deleted``). A tombstone is how a deletion reaches a node that was down when it happened.
    Purged here, the entry would be missing instead, and when that node comes back with its old
    live value, this node would take the value as new (a missing entry loses against any stamp)
    and the deleted entry would be resurrected everywhere. The original purged a tombstone once
    every peer had reported since the deletion (``ips/`` entries after a week regardless), which
    leans on every node's report and clock being right; keeping a tombstone costs one symlink.
    """
    tree = ctx.tree
    require_cluster(tree)
    fd = _cron_lock(ctx)
    if fd is None:
        return
    try:
        if ctx.marsd_pid() is None:
            raise ctx.fail(f"marsd is not running on host {ctx.host}, so nothing is attached to rotate or "
                           "clean up, and nothing could switch to a new log file",
                           f"start it ('marsd --mars-dir {tree.root} --host {ctx.host}'); the next cron does the work")
        snap = model.build(tree.root, ctx.host)
        spec = ctx.args.resource
        if spec == "all":
            names = [name for name, r in sorted(snap.resources.items()) if ctx.host in r.nodes]
            if not names:
                ctx.say(f"host {ctx.host} is a member of no resource; nothing to do")
        else:
            names = ctx.resource_list(spec)
        failed = []
        for res in names:
            ctx.res = res
            try:
                _cron_resource(ctx, snap)
            except MarsError as e:
                print(f"marsadm: {e}", file=sys.stderr)
                failed.append(res)
        ctx.res = ""
        if failed:
            raise ctx.fail(f"{len(failed)} of {len(names)} resource(s) failed: {', '.join(failed)}",
                           "see the lines above; the others were done")
    finally:
        os.close(fd)
