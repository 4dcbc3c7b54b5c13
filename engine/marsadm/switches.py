"""The switches an operator flips per resource: attach/detach, up/down.

Each writes ``todo-<host>/<switch>`` and waits until marsd's ``actual-<host>/…`` agrees.
detach and down refuse while an NBD client has the export open, because pulling the device from
under a mounted filesystem is the operator's mistake the tool can prevent; --force does it anyway
and marsd closes those connections.
"""

from __future__ import annotations

from ..tree import todo
from .base import RES_ARG, Ctx, command

SWITCHES = ("attach", "connect", "sync", "allow-replay")


def _attached(ctx: Ctx) -> bool:
    """Attached in fact: marsd runs and says so (after a crash the tree's last word is stale)."""
    return ctx.actual("is-attached") == "1" and ctx.marsd_pid() is not None


def _set_attach_and_wait(ctx: Ctx, on: bool) -> None:
    tree = ctx.tree
    if on:
        # Re-writing attach=1 gets a fresh stamp, which tells marsd to retry a failed attach.
        tree.set(todo(ctx.res, ctx.host, "attach"), 1, restamp=True)
        ctx.wait(f"attach resource {ctx.res}", lambda: _attached(ctx), ctx.attach_error)
    else:
        tree.set(todo(ctx.res, ctx.host, "attach"), 0)
        ctx.wait(f"detach resource {ctx.res}", lambda: not _attached(ctx))


def _refuse_if_open(ctx: Ctx) -> None:
    n = int(ctx.actual("open-count") or 0)
    if n and _attached(ctx) and not ctx.force:
        raise ctx.fail(f"the NBD export {ctx.res} is open by {n} client(s)",
                       "unmount and disconnect them first (umount, losetup -d, nbd-client -d), "
                       "or pass --force to cut them off")


def _done(ctx: Ctx, what: str) -> None:
    """One line saying what the command did (or recorded, with --no-wait): a silent success reads
    as nothing having happened."""
    ctx.say(f"{ctx.res}: {what}" + (" (recorded; marsd acts on it)" if ctx.args.no_wait else ""))


@command("attach", "open the data device and (on the primary) serve the NBD export", RES_ARG, per_resource=True)
def attach(ctx: Ctx) -> None:
    _set_attach_and_wait(ctx, True)
    _done(ctx, "attached")


@command("detach", "stop serving and close the data device (refused while clients are connected)", RES_ARG,
         per_resource=True)
def detach(ctx: Ctx) -> None:
    _refuse_if_open(ctx)
    _set_attach_and_wait(ctx, False)
    _done(ctx, "detached: the data device is closed")


@command("up", "switch everything on: attach, connect (fetch), sync, replay", RES_ARG, per_resource=True)
def up(ctx: Ctx) -> None:
    for s in SWITCHES[1:]:
        ctx.tree.set(todo(ctx.res, ctx.host, s), 1)
    _set_attach_and_wait(ctx, True)
    _done(ctx, "up: attached, with fetch, sync and replay switched on")


@command("down", "switch everything off: replay, sync, connect, then detach", RES_ARG, per_resource=True)
def down(ctx: Ctx) -> None:
    _refuse_if_open(ctx)
    for s in reversed(SWITCHES[1:]):
        ctx.tree.set(todo(ctx.res, ctx.host, s), 0)
    _set_attach_and_wait(ctx, False)
    _done(ctx, "down: replay, sync and fetch switched off, and detached")


def _flip(ctx: Ctx, switch: str, on: bool, actual_key: str, what: str) -> None:
    """Write one switch and wait until marsd's actual state follows (where it has one to follow)."""
    ctx.tree.set(todo(ctx.res, ctx.host, switch), int(on))
    if not _attached(ctx):
        ctx.say(f"{ctx.res}: {switch}={int(on)} recorded; it takes effect when the resource is attached")
        return
    if ctx.tree.get(f"resource-{ctx.res}/primary") == ctx.host:
        return  # the primary neither fetches, syncs nor replays from others
    if switch == "allow-replay" and on and ctx.actual("is-syncing") == "1":
        ctx.say(f"{ctx.res}: replay resumes when the sync is done")
        return
    def synced() -> bool:
        return ctx.tree.get_int(f"resource-{ctx.res}/syncstatus-{ctx.host}") >= ctx.tree.get_int(f"resource-{ctx.res}/size")

    if switch == "sync" and on and synced():
        return  # nothing left to sync
    # A resumed sync with little left may be over before this looks: done is done, too.
    ctx.wait(f"{what} {ctx.res}", lambda: (ctx.actual(actual_key) == "1") == on or (switch == "sync" and on and synced()),
             (lambda: _replay_stopped(ctx)) if switch == "allow-replay" and on else lambda: None)


def _replay_stopped(ctx: Ctx) -> str | None:
    """Why replay cannot resume: it stopped at a damaged record, and resuming reads that record again."""
    msg = ctx.actual("msg-err-replay-stop")
    if not msg:
        return None
    return f"{msg}; resuming would stop at the same record: run 'marsadm invalidate {ctx.res}' on {ctx.host}"


for _name, _switch, _on, _key, _what, _help in [
    ("connect", "connect", True, "is-copying", "resume fetching", "resume fetching the log"),
    ("disconnect", "connect", False, "is-copying", "stop fetching", "stop fetching the log"),
    ("resume-replay", "allow-replay", True, "is-replaying", "resume replaying", "resume replaying fetched logs"),
    ("pause-replay", "allow-replay", False, "is-replaying", "pause replaying",
     "stop replaying: the device stays at a write-order prefix (holds back log deletion cluster-wide)"),
    ("resume-sync", "sync", True, "is-syncing", "resume syncing", "resume a paused full sync"),
    ("pause-sync", "sync", False, "is-syncing", "pause syncing", "pause a running full sync"),
]:
    def _make(switch: str = _switch, on: bool = _on, key: str = _key, what: str = _what):
        return lambda ctx: _flip(ctx, switch, on, key, what)
    command(_name, _help, RES_ARG, per_resource=True,
            aliases={"connect": ("resume-fetch",), "disconnect": ("pause-fetch",)}.get(_name, ()))(_make())
