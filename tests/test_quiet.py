"""The incremental tree exchange between real marsd processes: every node converges after a
restart with an older tree, after a partition of half a minute or more with changes on both sides (deletions
included), and a node removed while it was down stays removed when it comes back.

What the exchange promises, asserted here on its counters (the control socket's ``counters``):
after the first pull of each peer every answer is incremental, so a partition heals without any
node asking for a whole tree, and no digest repair is needed where nothing was lost.
MARS_PARTITION_S sets the partition's length (default 25 s, twice the 11 s in which a peer link
notices a silent peer, so every link has given up before the heal; ``MARS_PARTITION_S=600`` for ten
minutes, as `make torture` runs it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness import Node, caught_up, run, three_members, wait_until

from mars.engine.entry import Entry
from mars.engine.model.client import request_snapshot
from mars.engine.peer.changes import VOLATILE
from mars.engine.tree import Tree

SIZE = str(16 << 20)
PARTITION_S = float(os.environ.get("MARS_PARTITION_S", "25"))


@pytest.fixture
def three():
    """a primary of r (16 MiB), b and c secondaries, synced; iptables rules removed at the end."""
    with three_members(SIZE, image, lambda a, b, c: all(
            caught_up(a, n, "r") and n.tree_value("resource-r/syncstatus-" + n.host) == SIZE for n in (b, c))) as t:
        yield t


def image(n: Node) -> Path:
    p = n.base / f"{n.host}.img"
    if not p.exists():
        run(["truncate", "-s", SIZE, str(p)])
    return p


def entries(n: Node) -> dict[str, Entry]:
    return {e.path: e for e in Tree(n.mars_dir, n.host).walk()}


# Entries that follow the machine, not the cluster: the free space of the disk that every test (and
# the other pytest worker) writes to changes faster than a round can carry it, so it is never
# equal everywhere at one moment while anything else runs.
MACHINE = frozenset({"rest-space"})


def live(n: Node) -> dict[str, tuple[str, int]]:
    """The node's tree as the exchange must make it equal everywhere: live entries, no reports."""
    return {p: (e.value, e.stamp_ns) for p, e in entries(n).items()
            if not e.deleted and p.rsplit("/", 1)[-1] not in VOLATILE | MACHINE}


def converged(*nodes: Node) -> bool:
    first = live(nodes[0])
    return all(live(n) == first for n in nodes[1:])


def why_not(*nodes: Node) -> str:
    first = live(nodes[0])
    out = []
    for n in nodes[1:]:
        other = live(n)
        diff = sorted(p for p in first.keys() | other.keys() if first.get(p) != other.get(p))
        out.append(f"{nodes[0].host} vs {n.host}: " + ", ".join(
            f"{p}: {first.get(p)} / {other.get(p)}" for p in diff[:8]))
    return "; ".join(out)


def counters(n: Node) -> dict[str, int]:
    reply = request_snapshot(n.mars_dir, cmd="counters")
    assert reply is not None, f"marsd {n.host} does not answer on its control socket"
    return reply["counters"]["exchange"]


def wait_converged(*nodes: Node, timeout: float = 30) -> None:
    try:
        wait_until(lambda: converged(*nodes), timeout, "every tree to be equal")
    except AssertionError:
        raise AssertionError(f"trees differ after {timeout} s: {why_not(*nodes)}") from None


def test_a_node_restarted_with_an_older_tree_catches_up_and_changes_nobody(three):
    a, b, c, _ = three
    wait_converged(a, b, c)
    old = entries(c)
    c.marsadm("pause-replay", "r")
    a.marsadm("set-global-sync-limit-value", "3")
    wait_converged(a, b, c)
    paused = entries(c)["resource-r/todo-c/allow-replay"]
    c.stop()
    # c's tree goes back to what it was: newer values replaced by the old ones, with their old
    # stamps, and entries the old tree did not have removed (as a restored backup would).
    for path, e in entries(c).items():
        full = c.mars_dir / path
        before = old.get(path)
        if before is None:
            full.unlink()
        elif before != e:
            tmp = full.with_name(".tmp.restore")
            os.symlink(before.value, tmp)
            os.utime(tmp, ns=(before.stamp_ns, before.stamp_ns), follow_symlinks=False)
            os.replace(tmp, full)
    assert c.tree_value("resource-r/todo-c/allow-replay") == "1" and c.tree_value("defaults-a/sync-limit") != "3"
    c.start()
    wait_converged(a, b, c)
    assert entries(c)["resource-r/todo-c/allow-replay"] == paused  # the newer value, with its stamp
    assert a.tree_value("resource-r/todo-c/allow-replay") == "0" and c.tree_value("defaults-a/sync-limit") == "3"
    c.wait_value("resource-r/actual-c/is-replaying", "0")  # and c does what it says
    # The restarted node was taken whole once by each peer (a peer may have converged through the
    # other before its own next pull of c); nothing else needed a whole tree.
    for n, full in ((a, 3), (b, 3), (c, 2)):
        wait_until(lambda n=n, full=full: counters(n)["full_pulls"] >= full, 20, f"{n.host} to pull c's new life")
        got = counters(n)
        assert got["full_pulls"] == full and got["repairs"] == 0, (n.host, got)


def test_a_long_partition_with_changes_on_both_sides_converges_without_a_whole_tree(three):
    a, b, c, part = three
    b.marsadm("set-connect-pref-list", "r", "a")
    wait_converged(a, b, c)
    part.cut(a, c)
    part.cut(b, c)
    wait_until(lambda: a.tree_value("actual-a/msg-peer-c") is not None, 30, "a to notice that c is cut off")
    # Changes on both sides, one a deletion (a tombstone), one on each side to the same node's list.
    b.marsadm("pause-replay", "r")
    b.marsadm("set-connect-pref-list", "r", "")
    a.marsadm("set-global-sync-limit-value", "2")
    c.marsadm("pause-replay", "r")
    c.marsadm("set-global-sync-limit-value", "5")
    end = time.monotonic() + PARTITION_S
    wait_until(lambda: time.monotonic() >= end, PARTITION_S + 5, "the partition to last", interval=1)
    assert c.tree_value("resource-r/todo-b/allow-replay") == "1" and a.tree_value("defaults-c/sync-limit") != "5"
    part.heal()
    # A pull that was waiting for its connect timeout when the links healed reports once more.
    wait_until(lambda: all(n.tree_value(f"actual-{x}/msg-peer-{y}") is None for n in (a, b, c)
                           for x, y in (("a", "c"), ("b", "c"), ("c", "a"), ("c", "b"))), 60, "the link messages to clear")
    wait_converged(a, b, c, timeout=60)
    for n in (a, b, c):
        assert n.tree_value("resource-r/todo-b/allow-replay") == "0" and n.tree_value("resource-r/todo-c/allow-replay") == "0"
        assert n.tree_value("defaults-a/sync-limit") == "2" and n.tree_value("defaults-c/sync-limit") == "5"
        e = Tree(n.mars_dir, n.host).entry("resource-r/connect-b")
        assert e is not None and e.deleted, f"{n.host}: the deletion of b's connect list is a tombstone everywhere"
        assert n.tree_value("actual-a/msg-peer-c") is None and n.tree_value("actual-c/msg-peer-a") is None
    for n in (a, b, c):
        got = counters(n)
        assert got["full_pulls"] == 2 and got["repairs"] == 0, (n.host, got)


def test_a_node_removed_while_it_was_down_stays_removed_when_it_comes_back(three):
    a, b, c, _ = three
    c.stop()

    def adm_as_c(*args: str) -> int:
        r = run([str(a.bin / "marsadm"), "--mars-dir", str(a.mars_dir), "--host", "c", *args], check=False)
        return r.returncode

    assert adm_as_c("--force", "leave-resource", "r") == 0
    # A survivor removes a dead node only: c's last report must have aged past the alive window.
    wait_until(lambda: adm_as_c("--force", "leave-cluster") == 0, 60, "a to let c leave the cluster", interval=1)
    for n in (a, b):
        wait_until(lambda n=n: Tree(n.mars_dir, n.host).entry("ips/ip-c").deleted, 20, f"{n.host} to drop c")
    before = {n.host: entries(n)["actual-c/time"] for n in (a, b)}
    c.start()  # with its whole old tree, in which it is a node and a member
    wait_until(lambda: Tree(c.mars_dir, "c").entry("ips/ip-c").deleted, 30, "c to learn it was removed")
    wait_until(lambda: "was removed from the cluster" in c.log(), 20, "c to say so")
    assert c.tree_value("resource-r/data-c") is None
    c.wait_value("resource-r/actual-c/is-attached", "0")
    wait_until(lambda: c.tree_value("actual-c/time") is not None and
               float(c.tree_value("actual-c/time")) > before["a"].stamp_ns / 1e9 + 5, 30, "c to report on")
    for n in (a, b):
        e = entries(n)
        assert e["ips/ip-c"].deleted and e["resource-r/data-c"].deleted, n.host
        assert e["actual-c/time"] == before[n.host], f"{n.host} took c's reports after its removal"
