"""Log file housekeeping: rotate, delete what every member has replayed, truncate a damaged log."""

from __future__ import annotations

import os
import shutil
import time

from ..log.files import deletable_logs, list_logs, read_replay, replay_path, version_path
from ..log.values import ReplayLink, log_name
from ..tree import actual, res_dir
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
    total = 0
    for f in files:
        total += f.size()
        f.path.unlink()
        ctx.say(f"{ctx.res}: deleted {f.name}")
    # Every member deletes its own copies below this number too, once it has replayed them.
    below = max(f.seq for f in files) + 1
    if below > tree.get_int(f"{res_dir(ctx.res)}/logs-deleted-below"):
        tree.set(f"{res_dir(ctx.res)}/logs-deleted-below", below)
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
