"""The state tree and log-file bookkeeping, without processes."""

from __future__ import annotations

import os

import pytest

from mars.engine.errors import UsageError
from mars.engine.log.files import VersionHasher, deletable_logs, list_logs
from mars.engine.log.values import LogPos, ReplayLink, Version, log_name, parse_log_name
from mars.engine.tree import DELETED, LamportClock, Tree, check_name


@pytest.fixture
def tree(tmp_path):
    return Tree(tmp_path / "mars", "a")


def test_entries_are_symlinks_stamped_with_lamport_time(tree):
    e = tree.set("resource-r/size", 4096)
    p = tree.root / "resource-r" / "size"
    assert os.readlink(p) == "4096"
    assert os.lstat(p).st_mtime_ns == e.stamp_ns
    assert tree.get("resource-r/size") == "4096"
    assert tree.get_int("resource-r/size") == 4096
    assert not [n for n in os.listdir(p.parent) if n.startswith(".tmp")]


def test_overwrite_is_always_newer_even_if_the_clock_steps_back(tree):
    first = tree.set("x", "1")
    future = first.stamp_ns + 10**12  # a value stamped far ahead (e.g. by a peer with a fast clock)
    tree.set("x", "2", stamp_ns=future)
    fresh = Tree(tree.root, "a", LamportClock())  # a new process: its clock knows nothing yet
    again = fresh.set("x", "3")
    assert again.stamp_ns > future
    assert fresh.get("x") == "3"


def test_unchanged_value_keeps_its_stamp_unless_restamped(tree):
    e1 = tree.set("todo-a/attach", 1)
    e2 = tree.set("todo-a/attach", 1)
    assert e1.stamp_ns == e2.stamp_ns
    e3 = tree.set("todo-a/attach", 1, restamp=True)
    assert e3.stamp_ns > e1.stamp_ns


def test_delete_writes_a_tombstone(tree):
    tree.set("resource-r/data-a", "/dev/x")
    tree.delete("resource-r/data-a")
    assert os.readlink(tree.root / "resource-r" / "data-a") == DELETED
    assert tree.get("resource-r/data-a") is None
    assert tree.entry("resource-r/data-a").deleted
    tree.delete("resource-r/nothing")  # deleting what is absent writes nothing
    assert not (tree.root / "resource-r" / "nothing").exists()


def test_resources_and_members(tree):
    tree.set("resource-r/size", 1)
    tree.set("resource-r/data-a", "/x")
    tree.set("resource-r/data-b", "/y")
    tree.delete("resource-r/data-b")
    tree.set("resource-gone/size", 1)
    tree.delete("resource-gone/size")
    assert tree.resources() == ["r"]
    assert tree.members("r") == ["a"]


def test_empty_value_is_refused(tree):
    with pytest.raises(ValueError):
        tree.set("x", "")


@pytest.mark.parametrize("name", ["", "-a", "a.b", "a/b", "x" * 64, "all", "localhost", "a b"])
def test_bad_names(name):
    with pytest.raises(UsageError):
        check_name("host", name)


def test_log_names_and_positions():
    assert log_name(729, "a") == "log-000000729-a"
    assert parse_log_name("log-000000729-host_1") == (729, "host_1")
    assert parse_log_name("log-1-a") is None
    assert str(LogPos(729, 1048576)) == "log-000000729@1048576"
    assert LogPos().is_zero()
    link = ReplayLink.parse("log-000000003-a,4096,0")
    assert link == ReplayLink(3, "a", 4096, 0) and str(link) == "log-000000003-a,4096,0"
    assert ReplayLink.parse("garbage") is None


def test_version_chain_depends_on_the_whole_history():
    def digest(prev, checks):
        h = VersionHasher(prev)
        for c in checks:
            h.update(c)
        return h.hexdigest()
    zero = "0" * 32
    d1 = digest(zero, [1, 2, 3])
    assert d1 == digest(zero, [1, 2, 3])
    assert d1 != digest(zero, [1, 2, 4]) and d1 != digest(zero, [1, 3, 2])
    assert digest(d1, [5]) != digest(digest(zero, [1, 2, 4]), [5])  # same last file, different past
    v1 = str(Version.of(d1, 1, "a", 100, None))
    v2 = str(Version.of(digest(d1, [5]), 2, "a", 50, Version.parse(v1)))
    assert v2.split(":")[1] == v1.split(":")[0]


def test_deletable_logs_wait_for_every_member(tree):
    d = tree.root / "resource-r"
    tree.set("resource-r/size", 1)
    for seq in (1, 2, 3):
        (d / log_name(seq, "a")).write_bytes(b"x")
    tree.set("resource-r/data-a", "/x")
    tree.set("resource-r/replay-a", "log-000000003-a,0,0")
    assert [f.seq for f in deletable_logs(tree, "r")] == [1, 2]
    tree.set("resource-r/data-b", "/y")  # a member without a replay position holds everything back
    assert deletable_logs(tree, "r") == []
    tree.set("resource-r/replay-b", "log-000000002-a,7,0")
    assert [f.seq for f in deletable_logs(tree, "r")] == [1]
    assert [f.seq for f in list_logs(tree, "r")] == [1, 2, 3]


def test_a_node_never_takes_its_own_disk_positions_from_a_peer(tmp_path):
    """replay-/syncstatus-/syncpos-<me> say what this node's disks hold; a peer's copy, however
    new, says what they held once (the power-loss campaign's finding). Ours is said again with a
    newer stamp so the peer takes it; a deletion (leave-resource --host <dead>) still comes in."""
    from mars.engine.tree import Entry

    t = Tree(tmp_path / "b", "b")
    t.set("resource-r/replay-b", "log-000000002-a,0,0")
    t.set("resource-r/syncstatus-b", 4096)
    mine = t.entry("resource-r/replay-b")
    theirs = Entry("resource-r/replay-b", "log-000000002-a,999,0", mine.stamp_ns + 10**9)
    assert not t.apply(theirs)
    again = t.entry("resource-r/replay-b")
    assert again.value == "log-000000002-a,0,0" and again.stamp_ns > theirs.stamp_ns, \
        "our own position, restamped to win at the peer"
    assert not t.apply(Entry("resource-r/syncstatus-b", "8192", again.stamp_ns + 10**9))
    assert t.get("resource-r/syncstatus-b") == "4096"
    # Another node's position, and a peer's deletion of ours, come through as ever.
    assert t.apply(Entry("resource-r/replay-a", "log-000000002-a,999,0", again.stamp_ns + 10**9))
    assert t.apply(Entry("resource-r/replay-b", DELETED, again.stamp_ns + 2 * 10**9))
    assert t.get("resource-r/replay-b") is None
