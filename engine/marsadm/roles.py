"""primary, secondary, log-purge-all: who serves a resource, and how that changes.

``primary`` on the new host B is a planned handover while the old primary A is reachable:

1. B writes ``handover-to`` = B, ``prev-primary`` = A and ``primary`` = ``(none)``;
2. A learns it within a round, stops serving (queued writes are made durable and answered
   first), finishes its last log file with a version entry and reports ``is-primary`` 0;
3. B waits until it has replayed A's history to that file's end (a progress line with the bytes
   and the time left);
4. B writes ``primary`` = B; its marsd continues the history in a new log file of its own and
   serves. A, and every other member, follow B without a sync: their histories are B's.

Never two writable primaries: B takes over only after A said, with a stamp newer than B's
``(none)``, that it stopped, and A's marsd never serves a resource the tree gives to another
host (also after a restart: it asks its peers first).

``primary --force`` is the forced failover when A is lost: B becomes primary at once with what
it has; writes that A acknowledged and B never fetched stay on A alone. If A comes back and
holds such writes, both histories are kept and every node reports the split brain; the remedy
(``invalidate`` on the side to discard) is the operator's decision, never automatic.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .. import model
from ..log.files import LogFile, list_logs, read_version
from ..log.values import LogPos, Version
from ..model import human_bytes, human_seconds
from ..tree import NONE, Tree, actual, res_dir, todo
from .base import RES_ARG, Ctx, command
from .switches import _attached

POLL_S = 0.1  # a waiting CLI's polling interval (marsd itself never polls for marsadm)
OPEN_RECHECK_S = 3.0  # how long an open count > 0 is watched for the next report before refusing


@command("primary", "make this host the primary: a planned handover from the current one "
                    "(--force: a forced failover when it is lost)",
         RES_ARG,
         ("--ignore-sync", {"action": "store_true",
                            "help": "hand over although another member's sync is unfinished (it restarts from the "
                                    "new primary)"}),
         per_resource=True)
def primary(ctx: Ctx) -> None:
    tree, res, host = ctx.tree, ctx.res, ctx.host
    d = res_dir(res)
    snap = model.build(tree.root, host)
    rs = snap.require_resource(res)
    me = rs.nodes[host]
    old = rs.primary
    if old == host:
        if me.actual.primary:
            ctx.say(f"{res}: {host} is the primary already")
            return
        _wait_serving(ctx, time.monotonic())
        return
    _refuse_unless_ready(ctx, snap, rs, me)
    ctx.refuse_in_emergency(old, f"a handover from {old}")
    ctx.refuse_in_emergency(host, f"a handover to {host}")
    reachable = old is not None and snap.alive(old) and old not in snap.nodes[host].link_errors
    if old is not None and not reachable:
        if not ctx.force:
            raise ctx.fail(f"the primary {old} is unreachable ({_why_unreachable(snap, host, old)})",
                           f"bring {old} back and run this again for a handover without loss; if {old} is lost, "
                           f"'marsadm primary --force {res}' makes {host} primary with what it has replayed "
                           f"(writes {old} acknowledged and {host} never fetched stay on {old} alone)")
        _forced(ctx, old)
        return
    if rs.split_brain or _split_messages(rs):
        if not ctx.force:
            raise ctx.fail("the resource is in a split brain: two histories exist",
                           f"resolve it first ('marsadm view {res}' names the sides and the commands); to keep "
                           f"{host}'s history, 'marsadm primary --force {res}' here, then 'marsadm invalidate {res}' "
                           "on the other side")
        _forced(ctx, old)
        return
    if old is not None:
        _refuse_open(ctx, rs, old)
    _refuse_unsynced_members(ctx, snap, rs)
    if ctx.args.no_wait and (old or rs.prev_primary) not in (None, host):
        raise ctx.fail("a handover cannot be only recorded: each step waits for the one before",
                       "run it without --no-wait")
    for switch, cmd in (("connect", "resume-fetch"), ("allow-replay", "resume-replay")):
        if tree.get(todo(res, host, switch)) != "1":
            raise ctx.fail(f"{switch} is switched off on {host}: it cannot catch up with the primary's log",
                           f"switch it on with 'marsadm {cmd} {res}' (or 'marsadm up {res}')")
    start = time.monotonic()
    source = old or tree.get(f"{d}/prev-primary")
    if old is not None:
        tree.set(f"{d}/prev-primary", old)
        tree.set(f"{d}/handover-to", host, restamp=True)
        none = tree.set(f"{d}/primary", NONE, restamp=True)
        ctx.poke()
        try:
            _wait_stopped(ctx, old, none.stamp_ns, start)
        except BaseException:
            # The old primary did not let go: it stays the primary, as if nothing had been asked.
            tree.set(f"{d}/primary", old, restamp=True)
            tree.delete(f"{d}/handover-to")
            ctx.poke()
            raise
    elif source and source != host:
        tree.set(f"{d}/handover-to", host, restamp=True)
    if source and source != host:
        _wait_replayed(ctx, source, start)
    tree.set(f"{d}/primary", host, restamp=True)
    tree.delete(f"{d}/handover-to")
    tree.delete(f"{d}/forced-primary")
    ctx.poke()
    _wait_serving(ctx, start)
    if source and source != host:
        end = _final_pos(tree, res, source)
        mine = read_version(tree, res, end.seq, host) if end is not None else None
        theirs = read_version(tree, res, end.seq, source) if end is not None else None
        if mine is None or theirs is None or str(mine) != str(theirs):
            raise ctx.fail(f"{host} serves {res}, but its version of {end.name if end else 'the last log file'} "
                           f"({mine}) is not {source}'s ({theirs}): the histories differ",
                           f"'marsadm view {res}' shows the split brain and the commands to resolve it")
        ctx.say(f"{res}: {host} is the primary now, handed over from {source} in {time.monotonic() - start:.1f} s "
                f"with every write it acknowledged (version of {end.name} equal on both); {source} follows as a "
                "secondary")
    else:
        ctx.say(f"{res}: {host} is the primary now")


def _refuse_unless_ready(ctx: Ctx, snap: model.Snapshot, rs: model.ResourceStatus, me: model.NodeResource) -> None:
    """What a new primary must be, handover or forced: attached and running, fully synced, and
    its replay not stopped on damage (its device would be older than it looks)."""
    res, host = ctx.res, ctx.host
    if not _attached(ctx):
        raise ctx.fail(f"the resource is not attached on {host}" +
                       ("" if ctx.marsd_pid() else " (marsd is not running here)"),
                       f"start marsd and run 'marsadm up {res}' first")
    if not me.sync.reached:
        raise ctx.fail(f"{host}'s own sync is unfinished ({human_bytes(me.sync.pos_bytes)} of "
                       f"{human_bytes(me.sync.size_bytes)}): its data device is not a consistent copy",
                       f"wait for the sync ('marsadm view {res}' shows the time left) and run this again")
    if me.replay_code is not None and me.replay_code.stopped:
        raise ctx.fail(f"{host}'s replay stopped ({me.replay_code.brief}): its data device is older than its log",
                       f"'marsadm view {res}' says why; fix that first (e.g. 'marsadm invalidate {res}' here)")


def _split_messages(rs: model.ResourceStatus) -> list[str]:
    return [h for h, n in rs.nodes.items() if any(m.key == "err-split-brain" for m in n.messages)]


def _why_unreachable(snap: model.Snapshot, host: str, old: str) -> str:
    link = snap.nodes[host].link_errors.get(old)
    if link:
        return f"{host} cannot reach it: {link}"
    seen = snap.nodes[old].seen_age_s if old in snap.nodes else None
    return "it never reported" if seen is None else f"its last report is {human_seconds(seen)} old"


def _refuse_open(ctx: Ctx, rs: model.ResourceStatus, old: str) -> None:
    node = rs.nodes.get(old)
    if node is not None and not node.actual.primary:
        raise ctx.fail(f"{old} is the designated primary but does not serve {ctx.res} (attach is "
                       f"{'on' if node.switches.attach else 'off'} there): it cannot hand its log over",
                       f"attach it on {old} ('marsadm up {ctx.res}' there) and run this again, or force this host "
                       f"with 'marsadm primary --force {ctx.res}'")
    n = node.actual.open_count if node is not None else 0
    if n and not ctx.force:
        n = _fresh_open_count(ctx, old)
    if n and not ctx.force:
        raise ctx.fail(f"the NBD export {ctx.res} is open on {old} by {n} client(s)",
                       f"stop the applications and disconnect them on {old} first, or pass --force: {old} then "
                       "answers the writes it has, and closes those connections")


def _fresh_open_count(ctx: Ctx, host: str) -> int:
    """The open count ``host`` reports, after its next report: a client that disconnected a
    moment ago is still counted in the tree until then. Waits at most OPEN_RECHECK_S."""
    path = actual(ctx.res, host, "open-count")
    time_path = f"actual-{host}/time"
    before = ctx.tree.entry(time_path)
    ctx.poke()  # marsd then asks every peer for a fresh report
    deadline = time.monotonic() + OPEN_RECHECK_S
    while time.monotonic() < deadline:
        now = ctx.tree.entry(time_path)
        if int(ctx.tree.get(path) or 0) == 0:
            return 0
        if before is not None and now is not None and now.stamp_ns > before.stamp_ns:
            break  # a newer report came with the same pull as the count: it stands
        time.sleep(POLL_S)
    return int(ctx.tree.get(path) or 0)


def _refuse_unsynced_members(ctx: Ctx, snap: model.Snapshot, rs: model.ResourceStatus) -> None:
    if ctx.args.ignore_sync:
        return
    behind = [h for h, n in sorted(rs.nodes.items())
              if h != ctx.host and h != rs.primary and snap.alive(h) and not n.sync.reached]
    if behind:
        raise ctx.fail(f"the sync of {', '.join(behind)} is unfinished: after a handover it would start again from "
                       "the new primary",
                       "wait for it, or pass --ignore-sync to hand over anyway")


def _forced(ctx: Ctx, old: str | None) -> None:
    tree, res, host = ctx.tree, ctx.res, ctx.host
    d = res_dir(res)
    start = time.monotonic()
    if old is not None:
        tree.set(f"{d}/prev-primary", old)
    tree.set(f"{d}/forced-primary", host, restamp=True)
    tree.set(f"{d}/primary", host, restamp=True)
    tree.delete(f"{d}/handover-to")
    ctx.poke()
    _wait_serving(ctx, start)
    lost = f"; writes {old} acknowledged and {host} never fetched exist only on {old}" if old else ""
    ctx.say(f"{res}: {host} is the primary by force after {time.monotonic() - start:.1f} s{lost}. When {old or 'it'} "
            f"comes back it stops serving {res}; if it holds such writes, every node reports the split brain and "
            f"'marsadm view {res}' names the commands")


def _wait_serving(ctx: Ctx, start: float) -> None:
    ctx.wait(f"serve {ctx.res} as primary", lambda: ctx.actual("is-primary") == "1" and _attached(ctx),
             ctx.attach_error)


def _wait_stopped(ctx: Ctx, old: str, since_ns: int, start: float) -> None:
    """Until ``old`` reported, after our ``(none)``, that it no longer serves, and where its
    history ends (the version entry of its last log file)."""
    tree, res = ctx.tree, ctx.res
    if ctx.args.no_wait:
        return
    last: LogPos | None = None

    def stopped() -> bool:
        nonlocal last
        e = tree.entry(actual(res, old, "is-primary"))
        if e is None or e.deleted or e.value != "0" or e.stamp_ns <= since_ns:
            return False
        last = _final_pos(tree, res, old)
        return last is not None

    _poll(ctx, f"{old} to stop serving {ctx.res}", stopped, lambda: None, start,
          f"{old} did not stop serving within {ctx.args.timeout:g} s; the handover is abandoned and {old} stays the "
          f"primary", f"look at marsd's log on {old}; if it is lost, 'marsadm primary --force {res}'")


def _final_pos(tree: Tree, res: str, host: str) -> LogPos | None:
    """Where ``host``'s history as primary ended: its last log position, once the version entry
    of that file (its final length) is there too."""
    pos = LogPos.parse(tree.get(actual(res, host, "log-pos")))
    if pos is None or not pos.origin:
        return None
    v = read_version(tree, res, pos.seq, host)
    if v is None or v.origin != pos.origin or v.length_bytes != pos.offset:
        return None
    return pos


def _wait_replayed(ctx: Ctx, source: str, start: float) -> None:
    """Until this host replayed ``source``'s history to its end, with a progress line; the
    deadline is ``--timeout`` without progress, not in all (a large backlog takes its time)."""
    tree, res, host = ctx.tree, ctx.res, ctx.host
    end = _final_pos(tree, res, source)
    if end is None:
        raise ctx.fail(f"the end of {source}'s history is not known here (no version entry for its last log file)",
                       f"make {source} primary again ('marsadm primary {res}' there), or force this host with "
                       f"'marsadm primary --force {res}'")

    def done() -> bool:
        link = model.ReplayLink.parse(tree.get(f"{res_dir(res)}/replay-{host}"))
        return link is not None and link.logpos == end

    def failed() -> str | None:
        for key in ("msg-err-split-brain", "msg-err-replay-stop"):
            text = ctx.actual(key)
            if text:
                return (f"{host} cannot replay {source}'s history: {text}. The handover stopped; nothing serves "
                        f"{res}: 'marsadm primary {res}' on {source} makes it primary again")
        return None

    def progress() -> str | None:
        nr = model.build(tree.root, host).resources.get(res)
        n = nr.nodes.get(host) if nr else None
        if n is None or n.replay is None:
            return None
        left = human_seconds(n.replay.remaining_s) if n.replay.remaining_s is not None else "unknown time"
        return f"replaying {source}'s log: {human_bytes(n.replay.rest_bytes)} left, {left} left"

    _poll(ctx, f"{host} to replay {source}'s log to {end}", done, failed, start,
          f"{host} did not reach the end of {source}'s log ({end}) within {ctx.args.timeout:g} s without progress; "
          f"nothing serves {res} now", f"'marsadm view {res}' says why; 'marsadm primary {res}' on {source} makes it "
          "primary again", progress=progress, stall=True)


def _poll(ctx: Ctx, what: str, done, failed, start: float, timeout_what: str, timeout_remedy: str,
          progress=None, stall: bool = False) -> None:
    """Ctx.wait's loop, with a progress line of this command's own and, with ``stall``, a
    deadline that counts from the last change of that line rather than from the start."""
    tty = sys.stderr.isatty()
    deadline = time.monotonic() + ctx.args.timeout
    shown = ""
    last_said = 0.0
    while not done():
        msg = failed()
        if msg:
            raise ctx.fail(msg)
        now = time.monotonic()
        line = (progress() if progress else None) or f"waiting for {what}"
        if line != shown:
            if stall:
                deadline = now + ctx.args.timeout
            if tty:
                sys.stderr.write(f"\rmarsadm: {ctx.res}: {line} ({now - start:.1f} s)\033[K")
            elif now - last_said >= 1.0:
                ctx.say(f"{ctx.res}: {line}")
                last_said = now
            shown = line
        if now > deadline:
            if tty:
                sys.stderr.write("\n")
            raise ctx.fail(timeout_what, timeout_remedy)
        time.sleep(POLL_S)
    if tty and shown:
        sys.stderr.write("\n")


@command("secondary", "no host serves the resource any more (maintenance, final teardown); 'primary' picks it "
                      "up again without a sync", RES_ARG, per_resource=True)
def secondary(ctx: Ctx) -> None:
    tree, res = ctx.tree, ctx.res
    d = res_dir(res)
    old = tree.get(f"{d}/primary")
    if old in (None, NONE):
        ctx.say(f"{res}: no host is the primary already")
        return
    n = int(tree.get(actual(res, old, "open-count")) or 0)
    if n and not ctx.force:
        raise ctx.fail(f"the NBD export {res} is open on {old} by {n} client(s)",
                       f"stop the applications and disconnect them on {old} first, or pass --force: {old} then "
                       "answers the writes it has, and closes those connections")
    tree.set(f"{d}/prev-primary", old)
    none = tree.set(f"{d}/primary", NONE, restamp=True)
    tree.delete(f"{d}/handover-to")
    ctx.poke()
    if old == ctx.host:
        ctx.wait(f"stop serving {res}", lambda: _final_pos(tree, res, old) is not None and ctx.actual("is-primary") != "1")
    else:
        _wait_stopped(ctx, old, none.stamp_ns, time.monotonic())
    ctx.say(f"{res}: {old} no longer serves it; no host is the primary. 'marsadm primary {res}' on a member "
            f"makes it primary again (on {old}: at once, elsewhere after replaying {old}'s log)")


# -- histories that do not go on ------------------------------------------------------------------

def history_of(tree: Tree, res: str, host: str) -> dict[int, str]:
    """The origin of each log number in ``host``'s history, as its version entries and its log
    position (the file it writes) say."""
    out: dict[int, str] = {}
    d = res_dir(res)
    for name in tree.names(d):
        if name.startswith("version-") and name.endswith(f"-{host}"):
            v = Version.parse(tree.get(f"{d}/{name}"))
            if v is not None:
                out[v.seq] = v.origin
    pos = LogPos.parse(tree.get(actual(res, host, "log-pos")))
    if pos is not None and pos.origin and pos.seq not in out:
        out[pos.seq] = pos.origin
    return out


def other_history(tree: Tree, res: str, keep: str) -> list[LogFile]:
    """This node's log files that are no part of ``keep``'s history: the other side of a split
    brain (a file number ``keep`` has from another origin, or one past ``keep``'s newest that
    ``keep`` did not write). Files older than ``keep``'s oldest known version are left alone."""
    hist = history_of(tree, res, keep)
    if not hist:
        return []
    oldest = min(hist)
    return [f for f in list_logs(tree, res) if f.seq >= oldest and hist.get(f.seq) != f.origin]


def adopt_history(tree: Tree, res: str, keep: str) -> int:
    """Make this node's version entries those of ``keep`` (as the original's invalidate fakes
    them): what this node replays from now on is ``keep``'s history, and a version of the
    discarded one would go on reporting a split brain. Returns how many entries changed."""
    host = tree.host
    d = res_dir(res)
    theirs = {}
    for name in tree.names(d):
        if name.startswith("version-") and name.endswith(f"-{keep}"):
            seq = name[len("version-"):len("version-") + 9]
            if seq.isdigit():
                theirs[int(seq)] = tree.get(f"{d}/{name}")
    if not theirs:
        return 0
    changed = 0
    oldest = min(theirs)
    for name in list(tree.names(d)):
        if not (name.startswith("version-") and name.endswith(f"-{host}")):
            continue
        seq_s = name[len("version-"):len("version-") + 9]
        if not seq_s.isdigit() or int(seq_s) < oldest:
            continue
        want = theirs.get(int(seq_s))
        if want is None:
            tree.delete(f"{d}/{name}")
            changed += 1
        elif tree.get(f"{d}/{name}") != want:
            tree.set(f"{d}/{name}", want)
            changed += 1
    return changed


def set_aside(files: list[LogFile], why: str) -> Path | None:
    """Move log files into ``<why>-<time>/`` of their resource directory, kept for inspection."""
    if not files:
        return None
    keep = files[0].path.parent / f"{why}-{time.strftime('%Y%m%d-%H%M%S')}"
    keep.mkdir(mode=0o700, exist_ok=True)
    for f in files:
        os.replace(f.path, keep / f.name)
    return keep


@command("log-purge-all", "delete this host's log files that belong to no history the primary goes on with "
                          "(leftovers of a split brain); --force to delete them", RES_ARG, per_resource=True)
def log_purge_all(ctx: Ctx) -> None:
    tree, res = ctx.tree, ctx.res
    primary = tree.get(f"{res_dir(res)}/primary")
    if primary in (None, NONE):
        raise ctx.fail("the resource has no primary: no history is the one that goes on",
                       f"make the side to keep primary first ('marsadm primary {res}' there)")
    files = other_history(tree, res, primary)
    aside = [p for p in (tree.root / res_dir(res)).iterdir() if p.is_dir() and p.name.startswith(
        ("split-brain-", "damaged-"))]
    if not files and not aside:
        ctx.say(f"{res}: no leftovers: every log file here is part of {primary}'s history")
        return
    total = sum(f.size() for f in files) + sum(q.stat().st_size for p in aside for q in p.iterdir())
    names = [f.name for f in files] + [f"{p.name}/" for p in aside]
    if not ctx.force:
        raise ctx.fail(f"this would delete {', '.join(names)} ({human_bytes(total)}): writes of a history "
                       f"{primary} does not have",
                       "keep a copy if anyone may still need them, then pass --force")
    for f in files:
        f.path.unlink(missing_ok=True)
    for p in aside:
        for q in p.iterdir():
            q.unlink()
        p.rmdir()
    ctx.say(f"{res}: deleted {', '.join(names)} ({human_bytes(total)})")
