"""The incremental tree exchange: the change index, the scan for other processes' writes, and a
cluster of exchanges run against each other in one process under generated histories.

The simulation drives the daemon's own :class:`~mars.engine.daemon.exchange.Exchange` and its
peer services' tree answers; only the socket is replaced by a direct call (a cut link raises the
PeerError a real one would). The real thing over TLS, with marsd processes, iptables partitions
and restarts, is tests/test_quiet.py.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from concurrent.futures import Executor, Future
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mars.engine.daemon import exchange as X
from mars.engine.entry import DELETED, Entry
from mars.engine.errors import MarsError
from mars.engine.peer import protocol as P
from mars.engine.peer.changes import ChangeIndex, entry_hash
from mars.engine.peer.link import PeerError
from mars.engine.tree import LamportClock, Tree


# --- the change index ----------------------------------------------------------------------------

def test_since_answers_exactly_the_changes_after_a_number_in_arrival_order():
    ix = ChangeIndex(incarnation=7)
    ix.note(Entry("a", "1", 100))
    ix.note(Entry("b", "1", 50), source="q")  # relayed: an older stamp arriving later
    first = ix.since(7, 0)
    assert [e.path for e in first.entries] == ["a", "b"] and first.from_seq == 0 and first.seq == 2
    ix.note(Entry("c", "1", 10), source="q")  # older still, but new here: it must come next
    ix.note(Entry("a", "2", 101))
    later = ix.since(7, first.seq)
    assert [(e.path, e.value) for e in later.entries] == [("c", "1"), ("a", "2")]
    assert ix.since(7, ix.seq).entries == ()
    # What came from the asker is left out of an incremental answer, never out of a whole tree.
    assert [e.path for e in ix.since(7, first.seq, skip_source="q").entries] == ["a"]
    assert {e.path for e in ix.since(0, 0, skip_source="q").entries} == {"a", "b", "c"}
    # Another life, or a number this life never reached: the whole tree.
    assert ix.since(8, 1).from_seq == 0 and ix.since(7, 99).from_seq == 0


def test_an_older_or_equal_report_is_no_change():
    ix = ChangeIndex()
    assert ix.note(Entry("x", "new", 20))
    assert not ix.note(Entry("x", "old", 10))
    assert not ix.note(Entry("x", "new", 20))
    assert ix.get("x") == Entry("x", "new", 20) and ix.seq == 1


def test_the_digest_is_the_trees_whatever_the_order_without_tombstones_or_reports():
    entries = [Entry(f"d/{i}", str(i), 1000 + i) for i in range(20)]
    one, two = ChangeIndex(), ChangeIndex()
    for e in entries:
        one.note(e)
    for e in reversed(entries):
        two.note(Entry(e.path, "older", 1), source="p")
        two.note(e, source="p")
    assert one.digest == two.digest != 0
    # A tombstone of something the other never had, and reports (time), change nothing.
    one.note(Entry("gone", DELETED, 5))
    one.note(Entry("actual-a/time", "123.4", 6))
    assert one.digest == two.digest
    one.note(Entry("d/3", DELETED, 2000))
    assert one.digest == two.digest ^ entry_hash(entries[3])
    one.forget("d/4")
    assert one.digest == two.digest ^ entry_hash(entries[3]) ^ entry_hash(entries[4])


def test_the_round_digest_leaves_out_the_figures_for_the_faces():
    """A node's free space moves with every write to its file system: were it in what the rounds
    compare, every node would run a full pass over its resources whenever any /mars changed."""
    ix = ChangeIndex(incarnation=1)
    ix.note(Entry("resource-r/primary", "a", 1))
    digest, rounds = ix.digest, ix.round_digest
    assert digest == rounds
    for i, path in enumerate(("actual-b/rest-space", "actual-b/total-space", "actual-b/version",
                              "actual-b/tunable-sync-limit"), start=2):
        ix.note(Entry(path, str(i), i))
    assert ix.round_digest == rounds and ix.digest != digest, "figures move the digest only"
    ix.note(Entry("resource-r/actual-b/is-primary", "0", 9))
    assert ix.round_digest != rounds, "the actual state of a resource is an input of the rounds"
    rounds = ix.round_digest
    ix.forget("actual-b/rest-space")
    ix.note(Entry("actual-b/rest-space", "7", 10))
    assert ix.round_digest == rounds


def test_forget_spares_what_was_written_after_the_scan_began():
    ix = ChangeIndex()
    ix.note(Entry("d/x", "1", 1))
    start = ix.seq
    ix.note(Entry("d/y", "1", 2))
    ix.forget("d/y", noted_by=start)
    ix.forget("d/x", noted_by=start)
    assert ix.get("d/y") is not None and ix.get("d/x") is None
    assert ix.paths_in("d") == ["d/y"]


# --- the tree: scanning, ties, reads from the index ----------------------------------------------

def test_scan_reads_only_changed_directories_and_finds_writes_removals_and_gone_dirs(tmp_path):
    t = Tree(tmp_path, "a")
    for d in range(5):
        t.set(f"resource-r{d}/size", 1, durable=False)
    seen: dict = {}
    found, read, gone = t.scan(seen)
    assert {e.path for e in found} == {f"resource-r{d}/size" for d in range(5)} and "" in read
    old = time.time_ns() - 10**9  # make every directory "not recently modified"
    for rel in list(seen):
        os.utime(tmp_path / rel, ns=(old, old))
    seen.clear()
    t.scan(seen)
    assert t.scan(seen) == ([], [], [])  # nothing changed: one stat per directory, nothing read
    other = Tree(tmp_path, "a")  # another process, as marsadm is
    other.set("resource-r2/data-a", "/dev/x")
    shutil.rmtree(tmp_path / "resource-r4")
    found, read, gone = t.scan(seen)
    assert sorted(e.path for e in found) == ["resource-r2/data-a", "resource-r2/size"]
    assert set(read) == {"", "resource-r2"} and gone == ["resource-r4"]


def test_equal_stamps_go_to_the_greater_value_on_every_node(tmp_path):
    x, y = Tree(tmp_path / "x", "x"), Tree(tmp_path / "y", "y")
    x.set("k", "apple", stamp_ns=5)
    y.set("k", "pear", stamp_ns=5)
    assert not y.apply(Entry("k", "apple", 5)) and x.apply(Entry("k", "pear", 5))
    assert x.get("k") == y.get("k") == "pear"


def test_reads_come_from_the_index_once_it_is_complete(tmp_path):
    t = Tree(tmp_path, "a")
    t.set("ips/ip-a", "127.0.0.2")
    t.changes = ix = ChangeIndex()
    Tree(tmp_path, "a").set("ips/ip-b", "127.0.0.3")  # another process, before marsd's first scan
    assert t.get("ips/ip-b") == "127.0.0.3"  # not complete yet: the disk answers
    ix.load(t.walk())
    ix.complete = True
    t.set("ips/ip-c", "127.0.0.4")
    assert t.get("ips/ip-c") == "127.0.0.4" and ix.get("ips/ip-c") is not None
    os.unlink(tmp_path / "ips/ip-c")
    assert t.get("ips/ip-c") == "127.0.0.4"  # until a scan notices the removal
    # The members of a resource too (every round asks each resource), tombstones left out.
    t.set("resource-r/size", 1)
    for h in "abc":
        t.set(f"resource-r/data-{h}", f"/dev/{h}")
    t.delete("resource-r/data-b")
    Tree(tmp_path, "a").set("resource-r/data-d", "/dev/d")  # another process: not indexed yet
    assert t.members("r") == ["a", "c"]
    assert Tree(tmp_path, "a").members("r") == ["a", "c", "d"], "without an index, the disk answers"


# --- a cluster of exchanges in one process -----------------------------------------------------

class Inline(Executor):
    """Runs the disk work at once: the simulation is one thread, and its order is the test's."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting side, as a pool does
            f.set_exception(e)
        return f


class SkewedClock(LamportClock):
    """A node whose wall clock is off by ``skew_ns`` (clock slip)."""

    def __init__(self, skew_ns: int) -> None:
        super().__init__()
        self.skew_ns = skew_ns

    def now(self) -> int:
        with self._lock:
            t = time.time_ns() + self.skew_ns
            t = max(t, self._last + 1)
            self._last = t
            return t


class Sim:
    """N nodes, each a tree, an Exchange and the tree half of its peer services."""

    def __init__(self, base: Path, hosts: str, skews: dict[str, int]) -> None:
        self.base = base
        self.hosts = list(hosts)
        self.cut: set[frozenset[str]] = set()
        self.skews = skews
        self.now = 1000.0
        self.nodes: dict[str, X.Exchange] = {}
        for h in self.hosts:
            t = Tree(base / h, h, SkewedClock(skews.get(h, 0)))
            for o in self.hosts:
                t.set(f"ips/ip-{o}", f"10.0.0.{ord(o)}", stamp_ns=1, durable=False)
        for h in self.hosts:
            self.boot(h)

    def boot(self, h: str) -> None:
        tree = Tree(self.base / h, h, SkewedClock(self.skews.get(h, 0)))
        ex = X.Exchange(tree, Inline(), lambda peer, h=h: Link(self, h, peer), lambda: None,
                        lambda t=tree: t.set(f"actual-{h}/time", f"{t.clock.now() / 1e9:.9f}", durable=False),
                        clock=lambda: self.now, watch=False)
        asyncio.run(ex.load())
        self.nodes[h] = ex

    async def round(self, h: str) -> None:
        ex = self.nodes[h]
        due = ex.scan_due()
        if due is not None:
            await ex.scan(full=due)
        ex.report()  # every round, as marsd at its report period
        ex.start_pulls()
        ex.feed()
        await asyncio.gather(*(t for p in ex.peers.values() for t in (p.pull, p.feed) if t is not None and not t.done()))

    def trees(self) -> dict[str, dict[str, tuple[str, int]]]:
        out = {}
        for h, ex in self.nodes.items():
            out[h] = {e.path: (e.value, e.stamp_ns) for e in ex.tree.walk()
                      if not e.deleted and not e.path.endswith("/time") and "/msg-peer-" not in e.path}
        return out


class Link:
    """A peer link without the socket: the request goes to the peer's answers at once."""

    def __init__(self, sim: Sim, me: str, peer: str) -> None:
        self.sim, self.me, self.peer = sim, me, peer

    async def request(self, make, timeout: float = 0) -> object:
        if frozenset((self.me, self.peer)) in self.sim.cut:
            raise PeerError(f"cannot reach peer {self.peer}", "it is retried")
        there = self.sim.nodes[self.peer]
        msg = make(1)
        if isinstance(msg, P.TreeSince):
            parts = there.answer(msg, self.me)
            reply = parts[-1]
            entries = tuple(e for part in parts for e in part.entries)
            return P.TreeChanges(req=1, incarnation=reply.incarnation, from_seq=reply.from_seq, seq=reply.seq,
                                 digest=reply.digest, entries=entries)
        try:
            there.refuse_removed(self.me, msg.entries)
        except MarsError as e:  # the server's refusal reaches the client as an ErrorReply
            raise PeerError(f"peer {self.peer}: {e.what}", e.remedy) from None
        await there.take(msg.entries, self.me)
        return P.TreeEntries(req=1, entries=())

    async def push(self, msg) -> None:
        """A one-way feed: the peer's refusal is only its log line, as over a real link."""
        if frozenset((self.me, self.peer)) in self.sim.cut:
            raise PeerError(f"cannot reach peer {self.peer}", "it is retried")
        try:
            await self.sim.nodes[self.peer].fed(msg, self.me)
        except MarsError:
            pass

    async def close(self) -> None:
        pass


PATHS = [f"resource-r/{n}" for n in ("primary", "todo-a/attach", "todo-b/attach", "connect-c", "x")] + \
    ["defaults-a/sync-limit", "actual-b/msg-x"]
ops = st.one_of(
    st.tuples(st.just("set"), st.sampled_from("abc"), st.sampled_from(PATHS), st.integers(0, 3)),
    st.tuples(st.just("delete"), st.sampled_from("abc"), st.sampled_from(PATHS)),
    st.tuples(st.just("external"), st.sampled_from("abc"), st.sampled_from(PATHS), st.integers(0, 3)),
    st.tuples(st.just("round"), st.sampled_from("abc")),
    st.tuples(st.just("cut"), st.sampled_from(["ab", "ac", "bc"])),
    st.tuples(st.just("heal"),),
    st.tuples(st.just("save"), st.sampled_from("abc")),
    st.tuples(st.just("restore"), st.sampled_from("abc")),
    st.tuples(st.just("restart"), st.sampled_from("abc")),
    st.tuples(st.just("lose"), st.sampled_from("abc"), st.sampled_from(PATHS)),
    # A node's own figure for the faces (its free space): sent by its origin only, never relayed
    # to a node that reaches the origin.
    st.tuples(st.just("figure"), st.sampled_from("abc"), st.integers(0, 3)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ops, min_size=5, max_size=40), st.dictionaries(st.sampled_from("abc"), st.integers(-10**10, 10**10)))
def test_every_history_converges_once_the_links_heal(tmp_path_factory, history, skews):
    """Whatever happens (changes on all sides of partitions, deletions, clock slip, a restart with an
    older tree, an entry lost behind the index's back), after the links heal every node holds the
    same tree, and every entry is the newest any node held."""
    base = tmp_path_factory.mktemp("sim")
    sim = Sim(base, "abc", skews)
    saved: dict[str, Path] = {}
    for op in history:
        kind, *args = op
        sim.now += 1
        if kind in ("set", "external"):
            h, path, v = args
            tree = sim.nodes[h].tree if kind == "set" else Tree(base / h, h, SkewedClock(skews.get(h, 0)))
            tree.set(path, f"v{v}-{h}", durable=False)
            if kind == "external":
                asyncio.run(sim.nodes[h].scan())  # marsadm pokes marsd, which scans
        elif kind == "delete":
            sim.nodes[args[0]].tree.delete(args[1], durable=False)
        elif kind == "figure":
            h, v = args
            sim.nodes[h].tree.set(f"actual-{h}/rest-space", v << 30, durable=False)
        elif kind == "round":
            asyncio.run(sim.round(args[0]))
        elif kind == "cut":
            sim.cut.add(frozenset(args[0]))
        elif kind == "heal":
            sim.cut.clear()
        elif kind == "save":
            saved[args[0]] = base / f"saved-{args[0]}-{sim.now:.0f}"
            shutil.copytree(base / args[0], saved[args[0]], symlinks=True)
        elif kind in ("restore", "restart"):
            h = args[0]
            if kind == "restore" and h in saved:  # the node comes back with an older tree
                shutil.rmtree(base / h)
                shutil.copytree(saved[h], base / h, symlinks=True)
            sim.boot(h)
        elif kind == "lose":  # an entry vanishes and the index forgets it (a bug, a disk): repair
            h, path = args
            try:
                os.unlink(base / h / path)
            except FileNotFoundError:
                pass
            sim.nodes[h].index.forget(path)
    newest: dict[str, tuple[int, str]] = {}
    for h in sim.hosts:
        for e in sim.nodes[h].tree.walk():
            if not e.path.endswith("/time") and "/msg-peer-" not in e.path:  # link errors end with the cut
                newest[e.path] = max(newest.get(e.path, (0, "")), (e.stamp_ns, e.value))
    sim.cut.clear()
    for _ in range(8):  # rounds, each one time step; the repair waits for STABLE_MISMATCH_S
        for h in sim.hosts:
            sim.now += X.STABLE_MISMATCH_S / 2
            asyncio.run(sim.round(h))
    trees = sim.trees()
    assert trees["a"] == trees["b"] == trees["c"]
    assert {p: (v, s) for p, (s, v) in newest.items() if v != DELETED} == trees["a"]
    digests = {ex.index.digest for ex in sim.nodes.values()}
    assert len(digests) == 1


def test_an_idle_cluster_exchanges_nothing_and_needs_no_repair(tmp_path):
    sim = Sim(tmp_path, "abcd", {})
    for h in sim.hosts:
        for r in range(30):
            sim.nodes[h].tree.set(f"resource-r{r}/actual-{h}/is-primary", 0, durable=False)
    for _ in range(3):
        for h in sim.hosts:
            sim.now += 1
            asyncio.run(sim.round(h))
    before = {h: ex.counters.to_json() for h, ex in sim.nodes.items()}
    for _ in range(10):
        for h in sim.hosts:
            sim.now += 1
            asyncio.run(sim.round(h))
    for h, ex in sim.nodes.items():
        now = ex.counters.to_json()
        # Each round: its report, one entry in one feed to each of the 3 peers; no pull, no repair.
        assert now["entries_sent"] == before[h]["entries_sent"] + 30, h
        assert now["pushes"] == before[h]["pushes"] + 30, h
        assert now["pulls"] == before[h]["pulls"] and now["repairs"] == 0 and now["full_pulls"] == 3, h
    # A node's free space changes (another program writes to its file system): it goes to each
    # peer from that node once, no peer relays it to the others.
    before = {h: ex.counters.to_json() for h, ex in sim.nodes.items()}
    sim.nodes["a"].tree.set("actual-a/rest-space", 5 << 30, durable=False)
    for _ in range(2):
        for h in sim.hosts:
            sim.now += 1
            asyncio.run(sim.round(h))
    sent = {h: ex.counters.to_json()["entries_sent"] - before[h]["entries_sent"] for h, ex in sim.nodes.items()}
    assert sent == {"a": 2 * 3 + 3, "b": 2 * 3, "c": 2 * 3, "d": 2 * 3}, sent
    assert all(ex.tree.get("actual-a/rest-space") == str(5 << 30) for ex in sim.nodes.values())


def test_a_gap_in_a_feed_or_a_silent_peer_is_pulled(tmp_path):
    sim = Sim(tmp_path, "ab", {})
    for _ in range(2):
        for h in sim.hosts:
            sim.now += 1
            asyncio.run(sim.round(h))
    a, b = sim.nodes["a"], sim.nodes["b"]
    pulls = b.counters.pulls
    a.peers["b"].sent -= 1  # a feed that starts before where b is: taken as a step all the same
    a.tree.set("resource-r/todo-a/attach", 1, durable=False)
    asyncio.run(sim.round("a"))
    asyncio.run(sim.round("b"))
    assert b.counters.pulls == pulls and b.tree.get("resource-r/todo-a/attach") == "1"
    # A feed lost on the way (the link broke after the bytes left): the next one shows the gap.
    a.tree.set("resource-r/todo-a/attach", 2, durable=False)
    a.peers["b"].sent = a.index.seq
    a.tree.set("resource-r/todo-a/sync", 1, durable=False)
    asyncio.run(sim.round("a"))
    assert b.peers["a"].gap and b.tree.get("resource-r/todo-a/attach") == "1"
    asyncio.run(sim.round("b"))  # pulls what the lost feed carried
    assert b.counters.pulls == pulls + 1 and b.tree.get("resource-r/todo-a/attach") == "2"
    assert not b.peers["a"].gap
    # A peer whose feeds stopped (it lost track of us) is pulled once it was silent for silent_s.
    a.peers["b"].sent = None
    for _ in range(3):
        sim.now += b.silent_s / 2
        asyncio.run(sim.round("a"))
        asyncio.run(sim.round("b"))
    assert b.counters.pulls == pulls + 2 and a.peers["b"].sent is not None


def test_a_removed_node_cannot_write_back_into_the_others(tmp_path):
    sim = Sim(tmp_path, "abc", {})
    for h in sim.hosts:
        asyncio.run(sim.round(h))
    sim.nodes["a"].tree.delete("ips/ip-c")  # 'leave-cluster --host c --force' on a
    asyncio.run(sim.round("a"))
    asyncio.run(sim.round("b"))
    c = sim.nodes["c"]
    c.tree.set("actual-c/version", "0.9", durable=False)
    with pytest.raises(MarsError, match="host c was removed from the cluster"):
        sim.nodes["a"].refuse_removed("c", (Entry("actual-c/version", "0.9", time.time_ns()),))
    sim.now += c.silent_s  # the others stopped feeding it: once they were silent, its pulls tell it
    asyncio.run(sim.round("c"))  # (its feed is refused)
    assert c.tree.entry("ips/ip-c").deleted
    assert sim.nodes["a"].tree.get("actual-c/version") is None
    pushes = c.counters.pushes
    c.tree.set("actual-c/version", "1.0", durable=False)
    asyncio.run(sim.round("c"))  # knowing it, it does not even try
    assert c.counters.pushes == pushes and sim.nodes["b"].tree.get("actual-c/version") is None
    # Joining again (a new ips entry, newer than the tombstone) is let through.
    sim.nodes["a"].refuse_removed("c", (Entry("ips/ip-c", "10.0.0.99", time.time_ns()),))


def test_the_kernel_names_what_another_process_writes_no_scan_needed(tmp_path):
    """marsadm or an operator's ln -s: indexed as it happens (inotify), a new directory watched
    after the whole scan it asks for, a removal forgotten, a file that is no entry ignored."""

    async def until(cond, what: str) -> None:
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)  # poll

    async def main() -> None:
        t = Tree(tmp_path, "a")
        t.set("ips/ip-a", "127.0.0.2")
        woken: list[bool] = []
        ex = X.Exchange(t, Inline(), lambda h: None, lambda: woken.append(True), lambda: None)
        await ex.load()
        try:
            scans = ex.counters.scans
            assert ex.scan_due() is None  # watched: no periodic scan of the desired state
            other = Tree(tmp_path, "a")  # another process
            other.set("ips/ip-b", "127.0.0.3")
            await until(lambda: ex.index.get("ips/ip-b") is not None, "the new entry indexed")
            assert woken and ex.counters.external_changes == 1
            os.unlink(tmp_path / "ips/ip-b")
            await until(lambda: ex.index.get("ips/ip-b") is None, "the removed entry forgotten")
            (tmp_path / "stray.txt").write_text("not an entry")
            other.set("resource-r/todo-a/attach", "1")  # new directories
            await until(lambda: ex.scan_due() is True, "a whole scan asked for")
            await ex.scan()
            assert ex.index.get("resource-r/todo-a/attach").value == "1" and ex.index.get("stray.txt") is None
            other.set("resource-r/todo-a/attach", "0")
            await until(lambda: ex.index.get("resource-r/todo-a/attach").value == "0", "the new directory watched")
            assert ex.counters.scans == scans + 1 and ex.scan_due() is None
        finally:
            await ex.close()

    asyncio.run(main())
