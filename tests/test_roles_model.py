"""The status model of role switching, on hand-written trees: handover, forced failover, two
primaries, split brain (issue 13).

Every test writes the entries marsd and marsadm would write (``Tree.set`` with stamps fixed
relative to NOW, so every age is the same on every run), builds the one snapshot and checks
what the model and its findings make of it. The faces render these same findings; the last
tests check that marsadm view and mars-status show them.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from mars.engine import marsadm
from mars.engine.model import CODES, ROLES, URGENT, Finding, Member, Snapshot, build, findings
from mars.engine.tree import NONE, Tree
from mars.engine.trigger import take_lock
from mars.status.render import Options, plain, render

MiB = 1 << 20
SIZE = 64 * MiB
R = "resource-r"
NOW = 1_764_547_200.0  # every stamp is relative to this
ZERO = f"{'0' * 32},log-000000000-a,0"
D4 = "4" * 32


def log(seq: int, origin: str) -> str:
    return f"log-{seq:09d}-{origin}"


def version(digest: str, seq: int, origin: str, length: int, prev: str = D4) -> str:
    return f"{digest},{log(seq, origin)},{length}:{prev}"


class Cluster:
    """Members of r, all alive, synced and attached, with every switch on; a is the primary and
    serves, log 4 (origin a, 1 MiB) is finished and every member has its version of it."""

    def __init__(self, root: Path, hosts: str = "ab", now: float = NOW) -> None:
        self.root = root
        self.now = now
        self.hosts = hosts
        self.t = Tree(root, "a")
        self.put("uuid", "roles")
        for i, h in enumerate(hosts):
            self.put(f"ips/ip-{h}", f"127.0.0.{2 + i}")
            self.put(f"actual-{h}/time", f"{now - 1:.9f}")
            self.put(f"{R}/data-{h}", f"/dev/vg/r-{h}")
            self.put(f"{R}/actsize-{h}", SIZE)
            self.put(f"{R}/syncstatus-{h}", SIZE)
            for sw in ("attach", "connect", "sync", "allow-replay"):
                self.put(f"{R}/todo-{h}/{sw}", 1)
            self.put(f"{R}/actual-{h}/is-attached", 1)
            self.put(f"{R}/actual-{h}/is-primary", 0)
            self.put(f"{R}/version-000000004-{h}", version(D4, 4, "a", MiB, "0" * 32))
        self.put(f"{R}/size", SIZE)
        self.primary("a")

    def put(self, path: str, value: object, age_s: float = 1.0) -> None:
        self.t.set(path, str(value), durable=False, stamp_ns=int((self.now - age_s) * 1e9))

    def drop(self, path: str) -> None:
        self.t.delete(path, durable=False)

    def primary(self, h: str | None, serving: bool = True) -> None:
        """``h`` designated primary (``(none)`` for None) and, when ``serving``, the only one serving."""
        self.put(f"{R}/primary", h or NONE)
        for x in self.hosts:
            self.put(f"{R}/actual-{x}/is-primary", int(serving and x == h))

    def positions(self, end: str, **replayed: str) -> None:
        """Everyone replayed up to ``end`` (``log-N-o,offset``), unless named otherwise; the
        secondaries fetched as far (a, the first primary, fetches only when named)."""
        for h in self.hosts:
            at = replayed.get(h, end)
            self.put(f"{R}/replay-{h}", f"{at},0")
            if h != "a" or h in replayed:
                self.put(f"{R}/actual-{h}/fetch-pos", at)
                self.put(f"{R}/actual-{h}/is-replaying", 1)
                self.put(f"{R}/actual-{h}/is-copying", 1)

    def snap(self) -> Snapshot:
        return build(self.root, "a", now_s=self.now)


def codes(s: Snapshot) -> set[str]:
    return {f.code for f in findings(s)}


def one(s: Snapshot, code: str) -> Finding:
    [f] = [f for f in findings(s) if f.code == code]
    return f


def _cluster(root: Path, hosts: str, now: float = NOW):
    """The cluster, with a's marsd 'running' (its lock held: the tools only look at the lock)."""
    c = Cluster(root, hosts, now)
    c.put(f"{R}/actual-a/log-pos", f"{log(5, 'a')},{2 * MiB}")
    c.positions(f"{log(5, 'a')},{2 * MiB}")
    fd = take_lock(root, "a")
    assert fd is not None
    yield c
    os.close(fd)


@pytest.fixture
def two(tmp_path):
    yield from _cluster(tmp_path / "two", "ab")


@pytest.fixture
def live(tmp_path):
    """Two members whose stamps are relative to the wall clock: for marsadm, which reads it."""
    yield from _cluster(tmp_path / "live", "ab", time.time())


@pytest.fixture
def three(tmp_path):
    yield from _cluster(tmp_path / "three", "abc")


def test_the_baseline_is_healthy(two, three):
    for c in (two, three):
        s = c.snap()
        assert findings(s) == [], [f.line() for f in findings(s)]
        r = s.resources["r"]
        assert (r.handover_to, r.prev_primary, r.forced_primary, r.split_brain) == (None, None, None, [])
        assert [Member(s, r, h).role() for h in c.hosts] == ["Primary"] + ["Secondary"] * (len(c.hosts) - 1)


# --- planned handover -----------------------------------------------------------------------

def handover(c: Cluster, target: str = "b", age_s: float = 4.0) -> None:
    """``marsadm primary r`` on ``target``: a stopped and finished log 5 at 3 MiB; the target
    replayed 2 MiB of it at 1 MiB/s."""
    c.put(f"{R}/handover-to", target, age_s)
    c.put(f"{R}/prev-primary", "a", age_s)
    c.primary(None)
    c.put(f"{R}/version-000000005-a", version("5" * 32, 5, "a", 3 * MiB), age_s)
    c.put(f"{R}/actual-a/log-pos", f"{log(5, 'a')},{3 * MiB}", age_s)
    c.put(f"{R}/replay-a", f"{log(5, 'a')},{3 * MiB},0")
    c.put(f"{R}/actual-{target}/fetch-pos", f"{log(5, 'a')},{3 * MiB}")
    c.put(f"{R}/actual-{target}/amount-replay_rate", MiB)


def test_a_handover_in_progress_is_work_not_no_primary(two):
    handover(two)
    s = two.snap()
    r = s.resources["r"]
    assert (r.handover_to, r.prev_primary, r.primary) == ("b", "a", None)
    assert r.handover_age_s == pytest.approx(4.0, abs=0.01)
    assert "NO_PRIMARY" not in codes(s)
    f = one(s, "HANDOVER")
    assert (f.level, f.node) == ("WORK", "b")
    # the target's rest is measured against a's final log end (3 MiB), not an unknown one
    assert f.text == ("planned handover of r from a to b in progress for 4 s: b has 1.0 MiB of log left to replay "
                      "(1.0 MiB/s, about 1 s left); nothing serves r until then")
    assert [Member(s, r, h).role() for h in "ab"] == ["Secondary", "Secondary"]


def test_the_old_primary_still_serving_during_a_handover_remains_primary(two):
    handover(two)
    two.put(f"{R}/actual-a/is-primary", 1)
    s = two.snap()
    r = s.resources["r"]
    assert Member(s, r, "a").role() == "RemainsPrimary" == r.nodes["a"].role
    assert one(s, "HANDOVER").text.endswith("; a still serves r")
    assert "TWO_PRIMARIES" not in codes(s)


def test_a_handover_whose_target_has_replayed_everything_takes_over(two):
    handover(two)
    two.put(f"{R}/replay-b", f"{log(5, 'a')},{3 * MiB},0")
    f = one(two.snap(), "HANDOVER")
    assert "b has replayed a's log and takes over" in f.text


def test_a_stalled_handover_by_age(two):
    handover(two, age_s=61.0)  # more than twice the 30 s alive window
    s = two.snap()
    assert {"HANDOVER_STALLED", "NO_PRIMARY"} <= codes(s) and "HANDOVER" not in codes(s)
    f = one(s, "HANDOVER_STALLED")
    assert (f.level, f.node) == ("TODO", "b")
    assert "has stalled: it started 1 min 1 s ago, more than 2 times the 30 s alive window" in f.text
    assert "nothing serves r" in f.text
    assert f.remedy == ("'marsadm primary r' on b again, or 'marsadm primary r' on a to go back; if a is lost, "
                        "'marsadm primary --force r' on b")
    assert one(s, "NO_PRIMARY").remedy.startswith("see HANDOVER_STALLED")


def test_a_handover_to_a_dead_target_is_stalled_at_once(two):
    handover(two, age_s=2.0)
    two.put("actual-b/time", f"{NOW - 300:.9f}", 300.0)
    s = two.snap()
    f = one(s, "HANDOVER_STALLED")
    assert "b is not alive" in f.text
    assert f.remedy.startswith("start marsd on b, then 'marsadm primary r' on b again")


def test_the_handover_entries_are_gone_when_it_completes(two):
    handover(two)
    for name in ("handover-to",):
        two.drop(f"{R}/{name}")
    two.primary("b")
    s = two.snap()
    r = s.resources["r"]
    assert (r.handover_to, r.handover_age_s, r.prev_primary, r.primary) == (None, None, "a", "b")
    assert not {"HANDOVER", "HANDOVER_STALLED", "NO_PRIMARY"} & codes(s)


# --- marsadm secondary: no primary, name the member to make one ---------------------------------

def test_no_primary_after_secondary_names_the_last_primary(three):
    three.put(f"{R}/prev-primary", "a")
    three.primary(None)
    s = three.snap()
    f = one(s, "NO_PRIMARY")
    assert f.remedy == "make a primary, the last primary: 'marsadm primary r' on a"


def test_no_primary_names_the_member_with_the_furthest_replay(three):
    three.put(f"{R}/prev-primary", "x")  # left the resource meanwhile
    three.primary(None)
    three.positions(f"{log(5, 'a')},{MiB}", c=f"{log(5, 'a')},{2 * MiB}")
    f = one(three.snap(), "NO_PRIMARY")
    assert f.remedy == "make c primary, the member whose replay got furthest: 'marsadm primary r' on c"


# --- two serving ------------------------------------------------------------------------------

def test_two_primaries(two):
    """b was made primary by force while a was cut off; a's last report still says it serves."""
    two.put(f"{R}/prev-primary", "a")
    two.put(f"{R}/forced-primary", "b")
    two.primary("b")
    two.put(f"{R}/actual-a/is-primary", 1)
    two.put("actual-a/time", f"{NOW - 95:.9f}", 95.0)
    s = two.snap()
    assert "TWO_PRIMARIES" in URGENT and CODES["TWO_PRIMARIES"][0] == "TODO"
    f = one(s, "TWO_PRIMARIES")
    assert f.node == "a"
    assert f.text.startswith("a and b both serve r (is-primary 1): b is the designated primary; a is not alive")
    assert f.remedy == ("stop the applications using r on a, then 'marsadm secondary r' on a, "
                        "or 'marsadm down r' on a; if a is gone for good, on a survivor "
                        "'marsadm leave-resource r --host a --force'")
    r = s.resources["r"]
    assert (Member(s, r, "a").role(), Member(s, r, "b").role()) == ("RemainsPrimary", "ForcedPrimary")


def test_two_serving_without_a_designated_primary(two):
    two.primary(None)
    for h in "ab":
        two.put(f"{R}/actual-{h}/is-primary", 1)
    f = one(two.snap(), "TWO_PRIMARIES")
    assert f.node is None and "none is the designated primary" in f.text
    assert "decide which of a, b goes on" in f.remedy


# --- forced failover -----------------------------------------------------------------------------

def test_forced_primary(two):
    two.put(f"{R}/prev-primary", "a")
    two.put(f"{R}/forced-primary", "b")
    two.primary("b")
    two.put("actual-a/time", f"{NOW - 300:.9f}", 300.0)  # a is lost
    s = two.snap()
    r = s.resources["r"]
    assert r.forced_primary == "b" and r.nodes["b"].forced and not r.nodes["a"].forced
    assert Member(s, r, "b").role() == "ForcedPrimary" and "ForcedPrimary" in ROLES
    f = one(s, "FORCED_PRIMARY")
    assert (f.level, f.node) == ("HINT", "b")
    assert "made primary on b by force" in f.text and "exist only on a" in f.text
    assert "once a is back, check for a split brain: 'marsadm view r'" in f.remedy
    assert "SPLIT_BRAIN" not in codes(s)  # nothing shows two histories yet


def test_a_forced_primary_not_serving_yet_is_not_yet_primary(two):
    two.put(f"{R}/forced-primary", "b")
    two.primary("b", serving=False)
    s = two.snap()
    assert Member(s, s.resources["r"], "b").role() == "NotYetPrimary"


# --- split brain --------------------------------------------------------------------------------

def forced_split(c: Cluster) -> None:
    """The example of issue 13: a wrote log 5 to 9 MiB; b, forced primary after fetching 8 MiB
    of it, finished its copy at 8 MiB and writes log 6 (3 MiB so far); a, demoted, finished log
    5 at 9 MiB. Other members followed b."""
    c.put(f"{R}/prev-primary", "a")
    c.put(f"{R}/forced-primary", "b")
    c.primary("b")
    c.put(f"{R}/version-000000005-a", version("a" * 32, 5, "a", 9 * MiB))
    c.put(f"{R}/actual-a/log-pos", f"{log(5, 'a')},{9 * MiB}")
    for h in c.hosts:
        if h != "a":
            c.put(f"{R}/version-000000005-{h}", version("b" * 32, 5, "a", 8 * MiB))
    c.put(f"{R}/actual-b/log-pos", f"{log(6, 'b')},{3 * MiB}")
    c.positions(f"{log(6, 'b')},{3 * MiB}", a=f"{log(5, 'a')},{9 * MiB}")


def test_split_brain_bytes_beyond_the_split_point(two):
    forced_split(two)
    s = two.snap()
    r = s.resources["r"]
    [sb] = r.split_brain
    assert sb.seq == 5 and sb.reference == "b"
    assert sb.beyond_bytes == {"a": 1 * MiB, "b": 3 * MiB}
    assert sb.sides == [["b"], ["a"]]
    assert sb.digests == {"a": f"a:{'a' * 32}", "b": f"a:{'b' * 32}"}
    assert r.diverged == ["a"] and r.is_split_brain
    f = one(s, "SPLIT_BRAIN")
    assert f.text == ("r is in a split brain: from log 5 on, the designated primary's side, b, holds log 5 from a "
                      "(digest bbbbbbbb) and 3.0 MiB beyond the split point; the other side, a, holds log 5 from a "
                      "(digest aaaaaaaa) and 1.0 MiB beyond the split point")
    assert f.remedy.startswith("discard the diverged history: 'marsadm invalidate r' on a; then "
                               "'marsadm log-purge-all r'")
    assert "on b" not in f.remedy  # never the designated primary's side
    # a cannot catch up with b's history by itself: no fetch or replay "in progress" for it
    assert not {"FETCH_RUNNING", "REPLAY_RUNNING"} & codes(s)


def test_split_brain_with_three_members_leaves_and_joins_again(three):
    forced_split(three)
    s = three.snap()
    [sb] = s.resources["r"].split_brain
    assert sb.sides == [["b", "c"], ["a"]]
    assert sb.beyond_bytes == {"a": 1 * MiB, "b": 3 * MiB, "c": 0}
    f = one(s, "SPLIT_BRAIN")
    assert "the designated primary's side, b, c, hold log 5 from a (digest bbbbbbbb) and 3.0 MiB (b), 0 B (c)" in f.text
    assert ("discard the diverged history on a: 'marsadm down r', 'marsadm leave-resource r', then "
            "'marsadm join-resource r /dev/vg/r-a' on a") in f.remedy
    assert "invalidate" not in f.remedy and "log-purge-all r" in f.remedy


def test_split_brain_without_a_primary_first_makes_one(two):
    forced_split(two)
    two.primary(None)
    s = two.snap()
    [sb] = s.resources["r"].split_brain
    assert sb.reference == "b"  # the furthest log end: log 6
    f = one(s, "SPLIT_BRAIN")
    assert f.remedy.startswith("first make the side to keep primary: 'marsadm primary r' on b keeps b's side")
    assert "the side with the furthest log end, b" in f.text


def test_two_primaries_writing_the_same_number_split_by_origin(two):
    """Both wrote a log 6 of their own: the open tails differ by origin, the whole files count."""
    two.put(f"{R}/version-000000005-a", version("5" * 32, 5, "a", 2 * MiB))
    two.put(f"{R}/version-000000005-b", version("5" * 32, 5, "a", 2 * MiB))
    two.put(f"{R}/actual-a/log-pos", f"{log(6, 'a')},{MiB}")
    two.put(f"{R}/actual-b/log-pos", f"{log(6, 'b')},{2 * MiB}")
    two.primary("b")
    two.put(f"{R}/actual-a/is-primary", 1)
    s = two.snap()
    [sb] = s.resources["r"].split_brain
    assert (sb.seq, sb.beyond_bytes) == (6, {"a": MiB, "b": 2 * MiB})
    assert sb.digests == {"a": "a:being written", "b": "b:being written"}
    assert {"SPLIT_BRAIN", "TWO_PRIMARIES"} <= codes(s)
    assert "holds log 6 from b (being written)" in one(s, "SPLIT_BRAIN").text


def test_after_invalidate_the_stale_log_end_of_the_discarded_side_is_no_history(two):
    """b's side was discarded: its versions are a's now (the one of its own log 6 is gone) and it
    replays a's log 6; its last log-pos still names its own log 6, which is no history of it."""
    test_two_primaries_writing_the_same_number_split_by_origin(two)
    two.put(f"{R}/actual-b/is-primary", 0)
    two.primary("a")
    two.put(f"{R}/replay-b", f"{log(6, 'a')},0,0")
    s = two.snap()
    assert s.resources["r"].split_brain == [] and "SPLIT_BRAIN" not in codes(s)
    two.put(f"{R}/replay-b", f"{log(5, 'a')},{2 * MiB},0")  # not yet following a there: still b's own log 6
    assert [x.seq for x in two.snap().resources["r"].split_brain] == [6]


def test_a_secondary_merely_behind_is_no_split(three):
    """Equal versions of log 5 everywhere; a writes log 6; c has not even fetched all of log 5."""
    for h in "ab":
        three.put(f"{R}/version-000000005-{h}", version("5" * 32, 5, "a", 2 * MiB))
    three.put(f"{R}/actual-a/log-pos", f"{log(6, 'a')},{3 * MiB}")
    three.positions(f"{log(6, 'a')},{3 * MiB}", b=f"{log(6, 'a')},{MiB}", c=f"{log(5, 'a')},{MiB}")
    three.put(f"{R}/actual-c/log-pos", f"{log(2, 'c')},{MiB}")  # an old primary's stale log end, long finished
    three.put(f"{R}/version-000000002-a", version("2" * 32, 2, "c", MiB))
    three.put(f"{R}/version-000000002-c", version("2" * 32, 2, "c", MiB))
    s = three.snap()
    r = s.resources["r"]
    assert r.split_brain == [] and not r.is_split_brain and r.diverged == []
    assert "SPLIT_BRAIN" not in codes(s)


def test_a_stale_open_tail_of_the_same_origin_is_a_prefix_not_a_split(two):
    """a's last log-pos is inside log 5, b has the finished version of it: one history."""
    two.put(f"{R}/version-000000005-b", version("5" * 32, 5, "a", 2 * MiB))
    two.put(f"{R}/actual-a/log-pos", f"{log(5, 'a')},{MiB}")
    assert two.snap().resources["r"].split_brain == []


def test_the_digests_of_one_number_still_split(three):
    """The old case: c's version of log 4 names another digest (and no open tail is involved)."""
    three.put(f"{R}/version-000000004-c", version("c" * 32, 4, "a", MiB, "0" * 32))
    s = three.snap()
    [sb] = s.resources["r"].split_brain
    assert sb.seq == 4 and sb.sides == [["a", "b"], ["c"]]
    assert s.resources["r"].diverged == ["c"]
    # the later logs of one history are not reported as splits of their own
    three.put(f"{R}/version-000000005-a", version("5" * 32, 5, "a", 2 * MiB))
    three.put(f"{R}/version-000000005-c", version("d" * 32, 5, "a", 2 * MiB))
    assert [x.seq for x in three.snap().resources["r"].split_brain] == [4]


def test_a_member_reporting_split_brain_is_in_it(three):
    three.put(f"{R}/actual-c/msg-err-split-brain",
              "log-000000005-a differs from a's history at offset 4096; replay stopped")
    s = three.snap()
    r = s.resources["r"]
    assert r.split_brain == [] and r.is_split_brain and r.diverged == ["c"]
    f = one(s, "SPLIT_BRAIN")
    assert f.text == ("r is in a split brain: c's marsd reports: log-000000005-a differs from a's history at "
                      "offset 4096; replay stopped")
    assert ("discard the diverged history on c: 'marsadm down r', 'marsadm leave-resource r', then "
            "'marsadm join-resource r /dev/vg/r-c' on c") in f.remedy
    three.put(f"{R}/actual-c/msg-err-split-brain", "OK")  # cleared
    assert "SPLIT_BRAIN" not in codes(three.snap())


# --- the wire form -----------------------------------------------------------------------------

def test_json_round_trip_of_the_new_fields(two):
    forced_split(two)
    two.put(f"{R}/handover-to", "b", 3.0)
    two.put(f"{R}/actual-a/msg-err-split-brain", "diverged")
    s = two.snap()
    doc = s.to_json()
    r = doc["resources"]["r"]
    assert (r["handover_to"], r["prev_primary"], r["forced_primary"]) == ("b", "a", "b")
    assert r["handover_age_s"] == pytest.approx(3.0, abs=0.01)
    assert r["split_brain"][0]["beyond_bytes"] == {"a": MiB, "b": 3 * MiB}
    assert r["split_brain"][0]["reference"] == "b" and r["split_brain"][0]["sides"] == [["b"], ["a"]]
    assert r["nodes"]["b"]["role"] == "ForcedPrimary" and r["nodes"]["b"]["forced"] is True
    assert r["is_split_brain"] is True and r["diverged"] == ["a"]
    back = Snapshot.from_json(doc)
    assert back == s and findings(back) == findings(s)


def test_an_older_document_without_the_new_fields_still_reads(two):
    s = two.snap()
    doc = s.to_json()
    r = doc["resources"]["r"]
    for name in ("handover_to", "handover_age_s", "prev_primary", "forced_primary"):
        del r[name]
    for n in r["nodes"].values():
        del n["forced"]
    doc["resources"]["r"]["split_brain"] = [{"seq": 7, "digests": {"a": "a:1", "b": "b:2"}}]
    back = Snapshot.from_json(doc).resources["r"]
    assert (back.handover_to, back.handover_age_s, back.prev_primary, back.forced_primary) == (None,) * 4
    assert back.split_brain[0].beyond_bytes == {} and back.split_brain[0].reference is None
    assert back.diverged == ["b"]  # the primary a's side is kept


# --- the faces show it ---------------------------------------------------------------------------

def _view(c: Cluster, capsys, host: str, *argv: str) -> str:
    code = marsadm.main(["--mars-dir", str(c.root), "--host", host, *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_view_shows_a_handover(live, capsys):
    handover(live)
    out = _view(live, capsys, "a", "view", "r")
    assert re.search(r"^  handover of r from a to b in progress for \d+ s$", out, re.M), out
    assert "WORK HANDOVER r@b: planned handover of r from a to b in progress" in out


def test_view_shows_the_split_brain_sides_and_the_macro_says_so(live, capsys):
    forced_split(live)
    out = _view(live, capsys, "a", "view", "r")
    assert "  forced primary: b (made primary by force; the primary before was a)" in out
    assert ("  split brain from log 5 on: kept b (the designated primary's side, 3.0 MiB beyond the split point); "
            "diverged a (1.0 MiB beyond the split point)") in out
    node_b = next(ln for ln in out.splitlines() if ln.startswith("    node b:"))
    assert node_b.split()[5] == "ForcedPrimary"
    assert _view(live, capsys, "a", "view-is-split-brain", "r").strip() == "1"
    assert _view(live, capsys, "a", "view-role", "r").strip() == "Secondary"


def test_view_is_split_brain_from_a_message_alone(live, capsys):
    assert _view(live, capsys, "a", "view-is-split-brain", "r").strip() == "0"
    live.put(f"{R}/actual-b/msg-err-split-brain", "history differs")
    assert _view(live, capsys, "a", "view-is-split-brain", "r").strip() == "1"
    out = _view(live, capsys, "a", "view", "r")
    assert "  split brain: diverged b (its marsd reports it: history differs)" in out


def test_mars_status_shows_handover_forced_primary_and_split_brain(two):
    handover(two)
    s = two.snap()
    text = plain(render(s, findings(s), Options()))
    assert "   -> handover of r from a to b in progress for 4 s" in text
    assert "---> WORK: planned handover of r from a to b in progress" in text
    two.drop(f"{R}/handover-to")
    forced_split(two)
    s = two.snap()
    text = plain(render(s, findings(s), Options()))
    assert "   -> forced primary: b (made primary by force; the primary before was a)" in text
    assert ("   -> split brain from log 5 on: kept b (the designated primary's side, 3.0 MiB beyond the split point); "
            "diverged a (1.0 MiB beyond the split point)") in text
    assert "---> TODO: r is in a split brain" in text
    assert "Status=ForcedPrimary" in text
