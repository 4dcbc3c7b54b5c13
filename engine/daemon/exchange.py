"""The tree exchange between marsd peers: what changed travels, not the tree.

Three paths, each for what the other two cannot do:

* **Feed.** After each round, every peer gets what changed here since what it has (this node's
  own changes, its report among them, and what it relays), one-way: no answer, no round trip.
  A feed says which change numbers it carries (``from_seq`` .. ``seq``); the receiver takes it
  as the next step only when it starts where the last one ended. An operator's command on one
  node is seen everywhere within a round, and an idle node costs each peer one small frame per
  report (REPORT period, daemon/marsd.py), not a request and an answer every round.
* **Pull.** A peer is asked for what changed there since its last answer or feed
  (:class:`~mars.engine.peer.protocol.TreeSince` with the peer's change number, the per-peer
  high-water mark) when its feed cannot be trusted: at start, after a gap (a feed that does not
  start where the last ended: a lost link, a restart of either side), after a command here
  (``fresh``: the peer reports anew), and when it has been silent longer than ``silent_s``. A
  new life of either side starts from the whole tree. Answering a pull is also what tells the
  answering side where that peer's feed starts.
* **Repair.** Each answer and feed carries the sender's tree digest (peer/changes.py). Equal to
  ours: the trees are equal. Different in the same way for a while, or different all along for
  a long time: something was missed, and the next pull asks for the whole tree (the old full
  exchange, now the exception), backing off while the difference stays.

The disk work (applying entries, scanning for marsadm's writes) runs in the daemon's thread
pool, one pull and one feed per peer at most at a time, so a slow or unreachable peer delays
nobody.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from ..entry import Entry
from ..errors import MarsError
from ..peer import protocol as P
from ..peer.changes import FIGURE_PREFIXES, FIGURES, VOLATILE, ChangeIndex, Changes
from ..peer.link import PeerClient, PeerError
from ..tree import Tree, node_actual, nodes_of
from .watch import Changed, TreeWatch

log = logging.getLogger("mars.marsd")


def _report(path: str) -> bool:
    """A node's report or one of its figures for the faces: what its origin sends every peer
    itself, so a relay of it would be waste (see :meth:`Exchange._reaches_itself`)."""
    name = path.rpartition("/")[2]
    return name in VOLATILE or name in FIGURES or name.startswith(FIGURE_PREFIXES)


def _actual_dir(rel: str) -> bool:
    return rel.rpartition("/")[2].startswith("actual-")

PULL_TIMEOUT_S = 10.0
#: A difference of digests that stays the same this long is not a change on its way: repair it.
STABLE_MISMATCH_S = 5.0
#: A difference that keeps changing (a busy cluster) is repaired after this long all the same.
MAX_MISMATCH_S = 120.0
REPAIR_BACKOFF_S = (30.0, 600.0)  # after a repair that did not end the difference: first, longest wait
#: How often the desired state (every directory but the actual state, ``actual-*``) is scanned
#: for writes by other processes when no marsadm trigger came and the tree cannot be watched
#: (daemon/watch.py): an entry written by hand counts.
SCAN_S = 2.0
#: ... and how often the whole tree (marsadm, which writes actual state too, always triggers).
FULL_SCAN_S = 30.0
INLINE_ENTRIES = 8  # at most this many received entries are written on the event loop itself
#: A peer whose changes did not come in order (a feed or an answer) for this long is pulled
#: (its feed may have stopped: it lost its link to us, or it does not know where we are).
SILENT_S = 15.0


@dataclass(slots=True)
class _Peer:
    """What this node knows of its exchange with one peer."""

    incarnation: int = 0  # the peer's life, and its change number, as of its last answer
    seq: int = 0
    heard: bool = False  # its first pull since this marsd started has ended, answered or not
    heard_at: float = float("-inf")  # when its changes last came in order (an answer, a feed)
    gap: bool = False  # a feed did not start where we are: the next round pulls
    sent: int | None = None  # our change number it has (its last pull of us, our feeds since); None: unknown
    repair: bool = False  # the next pull asks for the whole tree
    pair: tuple[int, int] | None = None  # (its digest, ours) while they differ
    pair_since: float = 0.0
    differ_since: float | None = None
    next_repair: float = 0.0
    backoff: float = REPAIR_BACKOFF_S[0]
    pull: asyncio.Task[None] | None = None
    feed: asyncio.Task[None] | None = None


@dataclass(slots=True)
class ExchangeCounters:
    """Since this marsd started; the quiet-cluster bench and the tests read them."""

    pulls: int = 0
    full_pulls: int = 0
    repairs: int = 0
    pushes: int = 0
    entries_received: int = 0
    entries_taken: int = 0
    entries_sent: int = 0
    scans: int = 0
    external_changes: int = 0

    def to_json(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(slots=True)
class _Scan:
    seen: dict[str, tuple[int, tuple[str, ...]] | None] = field(default_factory=dict)
    last: float = 0.0
    last_full: float = 0.0
    dirty: bool = False  # a directory came or went, or events were lost: a whole scan is due
    task: asyncio.Future[int] | None = None


class Exchange:
    """This node's end of the tree exchange with every peer."""

    def __init__(self, tree: Tree, executor: Executor, connect: Callable[[str], PeerClient],
                 wake: Callable[[], None], report: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic, silent_s: float = SILENT_S,
                 watch: bool = True) -> None:
        self.tree = tree
        self.host = tree.host
        self.executor = executor
        self.connect = connect
        self.wake = wake  # a change that matters to the reconcile round: run one now
        self.report = report  # publish this node's report (its time) now: a peer asked fresh
        self.clock = clock  # monotonic seconds: when a scan is due, how long digests differed
        self.silent_s = silent_s  # more than some report periods of the peers (see SILENT_S)
        self.index = tree.changes = ChangeIndex()
        self.counters = ExchangeCounters()
        self.clients: dict[str, PeerClient] = {}  # pulls
        # Feeds go on links of their own: a feed never waits behind a pull's answer, which a
        # busy peer may take seconds to give, while the reports in the feed must not age.
        self.feed_clients: dict[str, PeerClient] = {}
        self.peers: dict[str, _Peer] = {}
        self._scan = _Scan()
        self._removed_noted = False
        self._watch: TreeWatch | None = None
        self._watching = watch  # False: scan every SCAN_S instead (a simulation without a loop of its own)

    # -- the round's part ----------------------------------------------------------------------

    async def load(self) -> None:
        """Index the tree as it is at start: the first scan reads every directory, and from then
        on the kernel names what others write (daemon/watch.py), where it can."""
        await self.scan()
        self.index.complete = True
        if not self._watching:
            return
        try:
            self._watch = TreeWatch(self.tree.root)
            self._watch.watch(list(self._scan.seen))
        except OSError as e:
            if self._watch is not None:
                self._watch.close()
            self._watch = None
            log.warning("cannot watch %s for changes by other processes (%s); scanning it every %g s instead. "
                        "If the limit fs.inotify.max_user_watches is reached, raise it (sysctl)",
                        self.tree.root, e.strerror or e, SCAN_S)
            return
        asyncio.get_running_loop().add_reader(self._watch.fileno(), self._watched)

    def _watched(self) -> None:
        """Entries that another process (or this one) wrote or removed: index what is on disk now."""
        assert self._watch is not None
        try:
            ch = self._watch.read()
        except OSError as e:
            log.warning("reading the changes of %s: %s; scanning it instead", self.tree.root, e)
            ch = Changed(overflow=True)
        if ch.overflow or ch.dirs:
            self._scan.dirty = True  # a whole scan reads the new directory and watches it
            self.wake()
        if not ch.paths:
            return
        index, root = self.index, str(self.tree.root)
        start = index.seq
        changed = []
        for path in ch.paths:
            full = os.path.join(root, path)
            try:
                e = Entry(path, os.readlink(full), os.lstat(full).st_mtime_ns)
            except FileNotFoundError:
                index.forget(path, noted_by=start)
                continue
            except OSError:
                continue  # not an entry (a socket of marsd's in the root, a file someone left)
            if index.note(e):
                changed.append(path)
        self.counters.external_changes += len(changed)
        if any(self._matters(p) for p in changed):
            self.wake()

    def heard(self, host: str) -> bool:
        p = self.peers.get(host)
        return p is not None and p.heard

    async def scan(self, full: bool = True) -> int:
        """Index what other processes wrote (marsadm, an operator by hand); how many changes.

        ``full`` False leaves out the actual state, which only marsd and marsadm write. One
        scan at a time: a caller waits for the running one, then starts its own.
        """
        while self._scan.task is not None and not self._scan.task.done():
            await asyncio.wait([self._scan.task])
        self._scan.dirty = False
        self._scan.task = asyncio.get_running_loop().run_in_executor(self.executor, self._scan_now, full)
        changed = await self._scan.task
        if self._watch is not None:
            try:
                self._watch.watch(list(self._scan.seen))
            except OSError as e:
                log.warning("cannot watch more directories of %s (%s): changes in them are found by the "
                            "scan every %g s; raise fs.inotify.max_user_watches (sysctl)",
                            self.tree.root, e.strerror or e, FULL_SCAN_S)
        return changed

    def _scan_now(self, full: bool = True) -> int:
        index = self.index
        start = index.seq
        found, read, gone = self.tree.scan(self._scan.seen, None if full else _actual_dir)
        self._scan.last = self.clock()
        if full:
            self._scan.last_full = self._scan.last
        self.counters.scans += 1
        changed = sum(index.note(e) for e in found)
        on_disk = {e.path for e in found}
        for d in read:
            for path in index.paths_in(d):
                if path not in on_disk:
                    index.forget(path, noted_by=start)
        for d in gone:
            for path in index.paths_in(d):
                index.forget(path, noted_by=start)
        self.counters.external_changes += changed if self.counters.scans > 1 else 0
        log.debug("scan: %d dirs read, %d changes, %d gone", len(read), changed, len(gone))
        return changed

    def scan_due(self) -> bool | None:
        """True when a whole scan is due, False for one of the desired state, None for none."""
        now = self.clock()
        if self._scan.dirty or now - self._scan.last_full >= FULL_SCAN_S:
            return True
        if self._watch is not None:
            return None  # the kernel names what changes (see load)
        return False if now - self._scan.last >= SCAN_S else None

    def start_pulls(self, fresh: bool = False) -> None:
        """Pull from every peer whose feed cannot be trusted (see the module), without waiting;
        ``fresh`` pulls from all of them and makes them report anew."""
        peers = [h for h in nodes_of(self.tree) if h != self.host]
        self._forget_gone(peers)
        loop = asyncio.get_running_loop()
        now = self.clock()
        for h in peers:
            p = self.peers.setdefault(h, _Peer())
            if p.pull is not None and not p.pull.done():
                continue
            if fresh or not p.incarnation or p.repair or p.gap or now - p.heard_at >= self.silent_s:
                p.pull = loop.create_task(self._pull(h, p, fresh), name=f"exchange-{h}")

    def feed(self) -> None:
        """Send every peer what changed here since what it has, without waiting for anything.

        What came from that peer is left out (it has it, or newer), and so are other nodes'
        reports that it gets from their origin itself. A peer whose last feed is still on its
        way is left out this time; the next feed starts where that one ended.
        """
        index = self.index
        if self._removed():
            return
        loop = asyncio.get_running_loop()
        for h, p in self.peers.items():
            if p.sent is None or p.sent >= index.seq or h not in self.clients:
                continue
            if p.feed is not None and not p.feed.done():
                continue
            ch = index.since(index.incarnation, p.sent, skip_source=h)
            if not ch.from_seq:
                p.sent = None  # not a number of ours (cannot be): its next pull tells
                continue
            entries = tuple(e for e in ch.entries if not self._reaches_itself(e.path, h))
            if entries:  # else p.sent stays: the next feed starts there and covers these numbers too
                p.feed = loop.create_task(self._feed(h, p, ch, entries), name=f"feed-{h}")

    async def close(self) -> None:
        if self._watch is not None:
            asyncio.get_running_loop().remove_reader(self._watch.fileno())
            self._watch.close()
            self._watch = None
        for p in self.peers.values():
            for t in (p.pull, p.feed):
                if t is not None:
                    t.cancel()
        for c in [*self.clients.values(), *self.feed_clients.values()]:
            await c.close()

    # -- pulling and pushing -------------------------------------------------------------------

    def _client(self, host: str) -> PeerClient | None:
        c = self.clients.get(host)
        if c is None:
            try:
                c = self.clients[host] = self.connect(host)
            except PeerError:
                return None
        return c

    async def _pull(self, host: str, p: _Peer, fresh: bool) -> None:
        try:
            c = self._client(host)
            if c is None:
                return  # no address to ask: a primary must not wait for it
            full = p.repair or not p.incarnation
            inc, seq = (0, 0) if p.repair else (p.incarnation, p.seq)
            try:
                reply = await c.request(lambda req: P.TreeSince(req=req, incarnation=inc, seq=seq, fresh=fresh),
                                        timeout=PULL_TIMEOUT_S)
                if not isinstance(reply, P.TreeChanges):
                    raise PeerError(f"peer {host} answered a tree request with {type(reply).__name__}",
                                    "it runs another version of marsd; update it")
            except PeerError as e:
                # What failed, for every node's findings (which name the remedy themselves); the log
                # line, once per change, has the remedy too.
                if self.tree.get(node_actual(self.host, f"msg-peer-{host}")) != e.what:
                    log.warning("exchange with %s: %s", host, e)
                self.tree.set(node_actual(self.host, f"msg-peer-{host}"), e.what, durable=False)
                return
            self.tree.delete(node_actual(self.host, f"msg-peer-{host}"), durable=False)
            self.counters.pulls += 1
            self.counters.full_pulls += reply.from_seq == 0
            p.repair = False
            try:
                await self.take(reply.entries, host)
            except MarsError as e:
                log.warning("exchange with %s: %s; %s", host, e.what, e.remedy)
                return  # the same changes are asked for again next round
            if reply.incarnation != p.incarnation and p.incarnation and not full:
                log.info("exchange with %s: it restarted; took its whole tree", host)
            p.incarnation, p.seq = reply.incarnation, reply.seq
            p.heard_at, p.gap = self.clock(), False
            self._compare(host, p, reply.digest)
        finally:
            if not p.heard:
                p.heard = True
                self.wake()

    async def _feed(self, host: str, p: _Peer, ch: Changes, entries: tuple[Entry, ...]) -> None:
        c = self.feed_clients.get(host)
        if c is None:
            try:
                c = self.feed_clients[host] = self.connect(host)
            except PeerError:
                p.sent, p.gap = None, True
                return
        batches = list(P.entry_batches(entries))
        try:
            for i, batch in enumerate(batches):
                # Every part but the last claims no numbers: a link lost half-way leaves the
                # receiver where it was, and it pulls the rest.
                last = i == len(batches) - 1
                await c.push(P.TreeChanges(req=0, incarnation=ch.incarnation, from_seq=ch.from_seq,
                                           seq=ch.seq if last else ch.from_seq, digest=ch.digest, entries=batch))
                self.counters.entries_sent += len(batch)
            self.counters.pushes += 1
            if p.sent is not None:
                p.sent = max(p.sent, ch.seq)
        except PeerError:
            # Where it is now is unknown: no more feeds until it pulls us, and we pull it (which
            # also tells the tree if it cannot be reached).
            p.sent, p.gap = None, True

    async def fed(self, msg: P.TreeChanges, peer: str) -> None:
        """A peer's feed: its entries are taken whatever they follow (the newer win, in any
        order); they move its high-water mark only when they start where we are."""
        self.refuse_removed(peer, msg.entries)
        await self.take(msg.entries, peer)
        p = self.peers.get(peer)
        if p is None:
            return  # not a node we know yet: its entries are here, the pulls start once it is
        if msg.incarnation == p.incarnation and 0 < msg.from_seq <= p.seq:
            if msg.seq > msg.from_seq:
                p.seq = max(p.seq, msg.seq)
                p.heard_at = self.clock()
                self._compare(peer, p, msg.digest)
        elif not p.gap:
            log.debug("exchange with %s: its feed starts at %d of life %x, we have %d of life %x; pulling",
                      peer, msg.from_seq, msg.incarnation, p.seq, p.incarnation)
            p.gap = True

    async def take(self, entries: tuple[Entry, ...], source: str) -> int:
        """Apply a peer's entries (the newer win); wake the round if one matters to it."""
        if not entries:
            return 0
        self.counters.entries_received += len(entries)

        def apply() -> list[str]:
            return self.tree.apply_all(entries, source)

        try:
            # A few entries (a quiet round: the peer's report) cost less here than the hand-over to
            # a disk thread and back; a listing goes to the thread pool.
            changed = apply() if len(entries) <= INLINE_ENTRIES else \
                await asyncio.get_running_loop().run_in_executor(self.executor, apply)
        except OSError as e:
            raise MarsError(f"cannot write tree entries from {source} into {self.tree.root}: "
                            f"{e.strerror or e}", f"free space in {self.tree.root} (df -h); nothing of theirs "
                            "is lost, they are asked for again") from None
        self.counters.entries_taken += len(changed)
        if any(self._matters(path) for path in changed):
            self.wake()
        return len(changed)

    def _matters(self, path: str) -> bool:
        """Whether a change from a peer needs a reconcile round now.

        Another node's actual state (``actual-<h>/…``, ``resource-*/actual-<h>/…``) never
        changes what this node runs; its rounds read it when they come. Everything else
        (desired state, roles, members) may.
        """
        parts = path.split("/")
        for part in parts[:2]:
            if part.startswith("actual-"):
                return part == f"actual-{self.host}"
        return True

    def _compare(self, host: str, p: _Peer, theirs: int) -> None:
        """Digests after an answer: equal, or a difference to repair if it stays (see the module)."""
        mine = self.index.digest
        now = self.clock()
        if theirs == mine:
            if p.differ_since is not None and now - p.differ_since > STABLE_MISMATCH_S:
                log.debug("exchange with %s: trees equal again", host)
            p.pair, p.differ_since, p.backoff = None, None, REPAIR_BACKOFF_S[0]
            return
        if p.differ_since is None:
            p.differ_since = now
        if p.pair != (theirs, mine):
            p.pair, p.pair_since = (theirs, mine), now
        stable = now - p.pair_since >= STABLE_MISMATCH_S
        if (stable or now - p.differ_since >= MAX_MISMATCH_S) and now >= p.next_repair:
            log.info("exchange with %s: its tree and this one differ (digests %016x, %016x %s); asking for its "
                     "whole tree", host, theirs, mine, "for a while" if stable else "all along")
            p.repair = True
            p.next_repair = now + p.backoff
            p.backoff = min(p.backoff * 2, REPAIR_BACKOFF_S[1])
            self.counters.repairs += 1

    def _forget_gone(self, peers: list[str]) -> None:
        """A node that left the cluster leaves no link, no pull and no 'cannot reach' behind."""
        for name in self.tree.names(f"actual-{self.host}"):
            gone = name[len("msg-peer-"):] if name.startswith("msg-peer-") else None
            if gone and gone not in peers:
                self.tree.delete(node_actual(self.host, name), durable=False)
        for host in [h for h in self.peers if h not in peers]:
            p = self.peers.pop(host)
            for t in (p.pull, p.feed):
                if t is not None:
                    t.cancel()
            for clients in (self.clients, self.feed_clients):
                c = clients.pop(host, None)
                if c is not None:
                    asyncio.get_running_loop().create_task(c.close())

    def _removed(self) -> bool:
        """Whether this host was removed from the cluster (its ``ips`` entry is a tombstone).

        Then its pushes would only be refused: it goes on pulling, so it learns what the others
        decided, and says once what to do.
        """
        e = self.tree.entry(f"ips/ip-{self.host}")
        removed = e is not None and e.deleted
        if removed and not self._removed_noted:
            log.error("host %s was removed from the cluster by another node; it sends no changes any more. "
                      "To make it a node again: 'marsadm join-cluster --force <ip of a node> --secret-file <file>'",
                      self.host)
        self._removed_noted = removed
        return removed

    # -- the peers' requests -------------------------------------------------------------------

    def answer(self, msg: P.TreeSince, peer: str) -> list[P.TreeEntries | P.TreeChanges]:
        """What changed here since the peer's last answer; the whole tree for a new life."""
        if msg.fresh:
            self.report()
        ch = self.index.since(msg.incarnation, msg.seq, skip_source=peer)
        # After this answer the peer has our changes up to ch.seq: our feeds go on from there.
        self.peers.setdefault(peer, _Peer()).sent = ch.seq
        entries = ch.entries
        if ch.from_seq:
            entries = tuple(e for e in entries if not self._reaches_itself(e.path, peer))
        self.counters.entries_sent += len(entries)
        batches = list(P.entry_batches(entries)) or [()]
        return [P.TreeEntries(req=0, entries=b) for b in batches[:-1]] + \
            [P.TreeChanges(req=msg.req, incarnation=ch.incarnation, from_seq=ch.from_seq, seq=ch.seq,
                           digest=ch.digest, entries=batches[-1])]

    def _reaches_itself(self, path: str, peer: str) -> bool:
        """Whether ``peer`` gets this report from its origin itself, so relaying it is waste.

        Another node's report (``actual-<h>/time``) changes every round, and its free space
        (``actual-<h>/rest-space``) with every write to its file system; relayed by every node
        to every node, they alone would grow with the square of the cluster. A peer that
        reaches ``h`` has them from ``h``'s own feeds and answers; one that does not says so in
        the tree (``actual-<peer>/msg-peer-<h>``), and then it gets them from here.
        """
        if not _report(path):
            return False
        top = path.partition("/")[0]
        origin = top[len("actual-"):] if top.startswith("actual-") else None
        if origin is None or origin in (self.host, peer):
            return False
        return self.tree.get(node_actual(peer, f"msg-peer-{origin}")) is None

    def refuse_removed(self, peer: str, entries: tuple[Entry, ...]) -> None:
        """A removed node's changes are refused, unless they make it a node again (a new ``ips``
        entry, newer than the tombstone, from 'marsadm join-cluster --force')."""
        path = f"ips/ip-{peer}"
        mine = self.tree.entry(path)
        if mine is None or not mine.deleted:
            return
        if any(e.path == path and not e.deleted and e.stamp_ns > mine.stamp_ns for e in entries):
            return
        raise MarsError(f"host {peer} was removed from the cluster; its tree changes are refused",
                        f"on {peer}: 'marsadm join-cluster --force <ip of a node> --secret-file <file>' makes it a "
                        "node again")
