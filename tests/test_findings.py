"""The findings function: one table row per code, plus order, rendering and robustness.

Each row starts from a healthy 3-node snapshot (a primary, b and c secondaries of resource r,
everything reached, every switch on) that has no findings at all, changes one thing, and states
exactly which findings that one change must produce. Stating the whole set, not just "contains",
is what keeps the rules from overlapping silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mars.engine.model import (
    CODES,
    LEVELS,
    Actual,
    Finding,
    LogPos,
    MarsError,
    Message,
    NodeResource,
    NodeStatus,
    Progress,
    ReplayCode,
    ReplayLink,
    ResourceStatus,
    Snapshot,
    SplitBrain,
    Switches,
    Tunable,
    findings,
    human_bytes,
    human_seconds,
    worst,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZE = 10 * GiB  # the resource
LOG_END = 5 * GiB  # the primary's acknowledged log end, as an absolute position
HOSTS = ("a", "b", "c")


# --- the healthy baseline and small mutators -------------------------------------------------

def healthy() -> Snapshot:
    """a primary, b and c secondaries of r; synced, fetched, replayed, all switches on, all alive."""
    nodes = {h: NodeStatus(host=h, ip=f"127.0.0.{i + 2}", alive=True, seen_age_s=1.0, version="0.1.0",
                           rest_space_bytes=80 * GiB, total_space_bytes=100 * GiB, emergency=False,
                           link_errors={}, tunables=[Tunable("port", None, "7777")])
             for i, h in enumerate(HOSTS)}
    members = {}
    for h in HOSTS:
        primary = h == "a"
        members[h] = NodeResource(
            host=h, disk=f"/dev/vg/r-{h}", disk_bytes=SIZE, designated_primary=primary,
            switches=Switches(attach=True, fetch=True, sync=True, replay=True),
            actual=Actual(attached=True, primary=primary, syncing=False, fetching=not primary,
                          replaying=not primary, open_count=1 if primary else 0),
            sync=Progress(SIZE, SIZE, 0.0), fetch=Progress(LOG_END, LOG_END, 0.0),
            replay=Progress(LOG_END, LOG_END, 0.0), replay_link=ReplayLink.parse("log-000000003-a,1048576,0"),
            fetch_pos=None if primary else LogPos.parse("log-000000003-a,1048576"),
            fetch_source=None if primary else "a", replay_code=ReplayCode(1), fetch_age_s=1.0, replay_age_s=1.0, fetch_lag_s=0.0, replay_lag_s=0.0, messages=[])
    res = ResourceStatus(name="r", size_bytes=SIZE, primary="a", nodes=members, logs=[],
                         log_end=LogPos.parse("log-000000003-a,1048576"), split_brain=[], deletable_logs=[], deletable_bytes=0,
                         held_back_by=[], logs_deleted_below=3)
    return Snapshot(local_host="a", mars_dir="/mars", taken_at_s=1_700_000_000.0, lamport_s=1_700_000_000.0,
                    clock_slip_s=0.0, tool_version="0.1.0", marsd_running=True, marsd_pid=1234,
                    cluster_uuid="u-1", window_s=30.0, nodes=nodes, resources={"r": res})


def member(s: Snapshot, h: str, **changes) -> None:
    """Change fields of r's member h (switches/actual given as dicts of their own fields, a
    replay code as the tree's text)."""
    nr = s.resources["r"].nodes[h]
    for name in ("switches", "actual"):
        if isinstance(changes.get(name), dict):
            changes[name] = dataclasses.replace(getattr(nr, name), **changes[name])
    if isinstance(changes.get("replay_code"), str):
        changes["replay_code"] = ReplayCode.parse(changes["replay_code"])
    s.resources["r"].nodes[h] = dataclasses.replace(nr, **changes)


def node(s: Snapshot, h: str, **changes) -> None:
    s.nodes[h] = dataclasses.replace(s.nodes[h], **changes)


def resource(s: Snapshot, **changes) -> None:
    s.resources["r"] = dataclasses.replace(s.resources["r"], **changes)


def snap(**changes) -> Callable[[Snapshot], Snapshot]:
    """A mutator of the snapshot's own fields: snapshots are frozen, so it returns a new one."""
    def mutate(s: Snapshot) -> Snapshot:
        return dataclasses.replace(s, **changes)
    return mutate


def msg(h: str, key: str, text: str) -> Message:
    return Message(h, "r", key.split("-", 1)[0], key, text, 2.0)


def no_primary(s: Snapshot) -> None:
    resource(s, primary=None)
    member(s, "a", designated_primary=False, actual={"primary": False})


def handover(s: Snapshot, age_s: float) -> None:
    """'marsadm primary r' on b, ``age_s`` ago: a stopped serving; b replayed all of a's log."""
    resource(s, primary=None, handover_to="b", handover_age_s=age_s, prev_primary="a")
    member(s, "a", designated_primary=False, actual={"primary": False})


def held_back(s: Snapshot) -> None:
    resource(s, held_back_by=["c"])
    member(s, "c", switches={"replay": False}, replay=Progress(4 * GiB, LOG_END, 0.0))


def attach_failed(s: Snapshot) -> None:
    member(s, "b", messages=[msg("b", "err-attach", "data device /dev/vg/r-b: No such file or directory")],
           actual={"attached": False})


# --- the table: one row per code -------------------------------------------------------------

class Row(NamedTuple):
    code: str
    mutate: Callable[[Snapshot], Snapshot | None]
    expect: tuple[str, str, str | None, str | None]  # level, code, res, node
    also: frozenset[str] = frozenset()  # other codes this one change must produce, and no more


ROWS = [
    Row("SYNC_RUNNING",
        lambda s: member(s, "b", sync=Progress(4 * GiB, SIZE, 35.0 * MiB), actual={"syncing": True}),
        ("WORK", "SYNC_RUNNING", "r", "b")),
    Row("FETCH_RUNNING", lambda s: member(s, "b", fetch=Progress(4 * GiB, LOG_END, 100.0 * MiB)),
        ("WORK", "FETCH_RUNNING", "r", "b")),
    Row("REPLAY_RUNNING", lambda s: member(s, "c", replay=Progress(4 * GiB, LOG_END, 80.0 * MiB)),
        ("WORK", "REPLAY_RUNNING", "r", "c")),
    Row("MARSD_DOWN", snap(marsd_running=False, marsd_pid=None), ("TODO", "MARSD_DOWN", None, "a")),
    Row("NODE_DOWN", lambda s: node(s, "c", alive=False, seen_age_s=125.0), ("TODO", "NODE_DOWN", None, "c")),
    Row("PEER_UNREACHABLE", lambda s: node(s, "b", link_errors={"c": "connection refused"}),
        ("TODO", "PEER_UNREACHABLE", None, "b")),
    Row("REPLAY_STOPPED",
        lambda s: member(s, "c", replay_code="-1,bad-check,4096",
                         messages=[msg("c", "err-replay-stop",
                                       "replay stopped: log-000000003-a: offset 4096: bad check")]),
        ("TODO", "REPLAY_STOPPED", "r", "c")),
    Row("SPLIT_BRAIN",
        lambda s: resource(s, split_brain=[SplitBrain(7, {"a": "a:11aa", "b": "b:22bb", "c": "a:11aa"})]),
        ("TODO", "SPLIT_BRAIN", "r", None)),
    Row("ATTACH_FAILED", attach_failed, ("TODO", "ATTACH_FAILED", "r", "b")),
    Row("FETCH_FAILING", lambda s: member(s, "b", messages=[msg("b", "warn-fetch", "a: connection reset")]),
        ("TODO", "FETCH_FAILING", "r", "b")),
    Row("NO_PRIMARY", no_primary, ("TODO", "NO_PRIMARY", "r", None)),
    Row("PRIMARY_NOT_MEMBER", lambda s: resource(s, primary="x"), ("TODO", "PRIMARY_NOT_MEMBER", "r", "x")),
    Row("PRIMARY_NOT_SERVING", lambda s: member(s, "a", actual={"primary": False}),
        ("TODO", "PRIMARY_NOT_SERVING", "r", "a")),
    Row("SPACE_LOW", lambda s: node(s, "b", rest_space_bytes=5 * GiB), ("TODO", "SPACE_LOW", None, "b")),
    Row("EMERGENCY", lambda s: node(s, "c", emergency=True), ("TODO", "EMERGENCY", None, "c")),
    Row("SPACE_WARN", lambda s: node(s, "b", rest_space_bytes=15 * GiB), ("HINT", "SPACE_WARN", None, "b")),
    Row("SYNC_PAUSED", lambda s: member(s, "c", sync=Progress(2 * GiB, SIZE, 0.0), switches={"sync": False}),
        ("HINT", "SYNC_PAUSED", "r", "c")),
    Row("FETCH_PAUSED", lambda s: member(s, "c", switches={"fetch": False}), ("HINT", "FETCH_PAUSED", "r", "c")),
    Row("REPLAY_PAUSED", lambda s: member(s, "c", switches={"replay": False}), ("HINT", "REPLAY_PAUSED", "r", "c")),
    Row("DETACHED",
        lambda s: member(s, "c", switches=Switches(False, False, False, False),
                         actual=Actual(False, False, False, False, False, 0)),
        ("HINT", "DETACHED", "r", "c")),
    Row("LOGS_DELETABLE",
        lambda s: resource(s, deletable_logs=[f"log-00000000{i}-a" for i in (1, 2, 3)], deletable_bytes=12 * GiB),
        ("HINT", "LOGS_DELETABLE", "r", None)),
    Row("LOGS_HELD_BACK", held_back, ("HINT", "LOGS_HELD_BACK", "r", "c"), frozenset({"REPLAY_PAUSED"})),
    Row("RESIZE_POSSIBLE",
        lambda s: [member(s, h, disk_bytes=SIZE + (2 if h == "b" else 3) * GiB) for h in HOSTS],
        ("HINT", "RESIZE_POSSIBLE", "r", None)),
    Row("CLOCK_SLIP", snap(clock_slip_s=45.0), ("HINT", "CLOCK_SLIP", None, "a")),
    Row("MARSD_VERSIONS_DIFFER", lambda s: node(s, "c", version="0.2.0"),
        ("HINT", "MARSD_VERSIONS_DIFFER", None, None)),
    Row("CONNECT_CYCLE", lambda s: (member(s, "b", connect_list=["c"]), member(s, "c", connect_list=["b"])),
        ("HINT", "CONNECT_CYCLE", "r", "b")),
    Row("HANDOVER", lambda s: handover(s, 4.0), ("WORK", "HANDOVER", "r", "b")),
    Row("HANDOVER_STALLED", lambda s: handover(s, 61.0), ("TODO", "HANDOVER_STALLED", "r", "b"),
        frozenset({"NO_PRIMARY"})),
    Row("TWO_PRIMARIES", lambda s: member(s, "c", actual={"primary": True}), ("TODO", "TWO_PRIMARIES", "r", "c")),
    Row("FORCED_PRIMARY", lambda s: (resource(s, forced_primary="a", prev_primary="c"), member(s, "a", forced=True)),
        ("HINT", "FORCED_PRIMARY", "r", "a")),
    Row("FETCH_HELD", lambda s: member(s, "c", messages=[msg("c", "warn-loadavg", "fetch held: load 3.10")]),
        ("HINT", "FETCH_HELD", "r", "c")),
]


def run(mutate: Callable[[Snapshot], Snapshot | None]) -> list[Finding]:
    """The findings of the healthy snapshot after ``mutate`` (which edits its dicts in place, or
    returns a new snapshot for changes of the frozen snapshot's own fields)."""
    s = healthy()
    return findings(after(mutate, s))


def after(mutate: Callable[[Snapshot], object], s: Snapshot) -> Snapshot:
    new = mutate(s)
    return new if isinstance(new, Snapshot) else s


def keys(fs: list[Finding]) -> set[tuple[str, str, str | None, str | None]]:
    return {(f.level, f.code, f.res, f.node) for f in fs}


def test_every_code_has_a_row():
    assert {r.code for r in ROWS} == set(CODES)
    assert len(ROWS) == len(CODES)


def test_catalogue_is_well_formed():
    for code, (level, description) in CODES.items():
        assert code.isupper() and code.replace("_", "").isalpha(), code
        assert level in LEVELS and description


def test_healthy_snapshot_has_no_findings():
    assert findings(healthy()) == []
    assert worst(findings(healthy())) is None


@pytest.mark.parametrize("row", ROWS, ids=[r.code for r in ROWS])
def test_row(row: Row):
    fs = run(row.mutate)
    assert row.expect in keys(fs), [f.line() for f in fs]
    assert {f.code for f in fs} == {row.code} | row.also, [f.line() for f in fs]
    assert row.expect[0] == CODES[row.code][0]
    for f in fs:
        assert f.text, f
        assert (f.remedy == "") == (f.level == "WORK"), f  # TODO and HINT always say what to do
        if f.level != "WORK":
            assert "marsadm" in f.remedy or "marsd" in f.remedy or "NTP" in f.remedy, f


# --- texts and remedies: figures, units, exact commands --------------------------------------

def one(fs: list[Finding], code: str) -> Finding:
    [f] = [f for f in fs if f.code == code]
    return f


def test_sync_text_has_figures_and_units():
    f = one(run(ROWS[0].mutate), "SYNC_RUNNING")
    assert f.text == "sync of r on b at 40.0 % (6.0 GiB left, 35.0 MiB/s, about 2 min 56 s left)"
    assert f.remedy == ""


def test_sync_switched_on_but_not_running_yet_is_work():
    fs = run(lambda s: member(s, "b", sync=Progress(0, SIZE, None)))
    f = one(fs, "SYNC_RUNNING")
    assert "0.0 % (10.0 GiB left, rate unknown)" in f.text and "not running yet" in f.text


def test_sync_running_but_switched_off_is_still_work_and_a_pause_hint():
    fs = run(lambda s: member(s, "b", sync=Progress(GiB, SIZE, 0.0), switches={"sync": False},
                              actual={"syncing": True}))
    assert {f.code for f in fs} == {"SYNC_RUNNING", "SYNC_PAUSED"}
    assert "not moving" in one(fs, "SYNC_RUNNING").text


def test_no_work_on_a_dead_node():
    def dead_and_behind(s):
        node(s, "b", alive=False, seen_age_s=300.0)
        member(s, "b", sync=Progress(GiB, SIZE, 0.0), actual={"syncing": True})
        member(s, "c", fetch=Progress(GiB, LOG_END, 0.0), replay=Progress(GiB, LOG_END, 0.0))
        node(s, "c", alive=False, seen_age_s=300.0)
    assert {f.code for f in run(dead_and_behind)} == {"NODE_DOWN"}


def test_fetch_and_replay_wait_for_the_sync():
    def syncing(s):
        member(s, "b", sync=Progress(GiB, SIZE, MiB), actual={"syncing": True},
               fetch=Progress(GiB, LOG_END, 0.0), replay=Progress(0, LOG_END, 0.0))
    assert {f.code for f in run(syncing)} == {"SYNC_RUNNING"}


def test_replay_running_not_while_stopped():
    fs = run(lambda s: member(s, "c", replay=Progress(GiB, LOG_END, 0.0), replay_code="-1,bad-magic,0"))
    assert {f.code for f in fs} == {"REPLAY_STOPPED"}


def test_fetch_and_replay_texts():
    fs = run(lambda s: member(s, "b", fetch=Progress(4 * GiB, LOG_END, 100.0 * MiB),
                              replay=Progress(3 * GiB, LOG_END, 0.0)))
    assert one(fs, "FETCH_RUNNING").text == ("fetch of r on b from a at 80.0 % "
                                             "(1.0 GiB behind the log end, 100.0 MiB/s, about 10 s left)")
    assert one(fs, "REPLAY_RUNNING").text == "replay of r on b at 60.0 % (2.0 GiB behind the log end, not moving)"


def test_primary_does_no_fetch_or_replay_work_nor_pause_hints():
    fs = run(lambda s: member(s, "a", fetch=Progress(0, LOG_END, 0.0), replay=Progress(0, LOG_END, 0.0),
                              switches={"fetch": False, "replay": False, "sync": False}))
    assert fs == []


def test_marsd_down_covers_the_local_node_only():
    def down(s):
        node(s, "a", alive=False, seen_age_s=90.0)
        node(s, "b", alive=False, seen_age_s=None)
        return dataclasses.replace(s, marsd_running=False)
    fs = findings(healthy()) + run(down)
    assert keys(fs) == {("TODO", "MARSD_DOWN", None, "a"), ("TODO", "NODE_DOWN", None, "b")}
    f = one(fs, "MARSD_DOWN")
    assert "'marsd --mars-dir /mars --host a'" in f.remedy and "systemctl start marsd" in f.remedy
    assert "never reported" in one(fs, "NODE_DOWN").text


def test_node_down_text_and_remedy():
    f = one(run(ROWS[4].mutate), "NODE_DOWN")
    assert f.text == "node c has not reported for 2 min 5 s (alive window 30 s), member of r"
    assert "start marsd on c" in f.remedy and "127.0.0.4" in f.remedy
    assert "'marsadm leave-resource r --host c --force'" in f.remedy
    assert "'marsadm leave-cluster --host c --force'" in f.remedy


def test_member_without_node_entries_is_down():
    def ghost(s):
        del s.nodes["c"]
    f = one(run(ghost), "NODE_DOWN")
    assert (f.node, "never reported" in f.text) == ("c", True)


def test_peer_unreachable_text():
    f = one(run(ROWS[5].mutate), "PEER_UNREACHABLE")
    assert f.text == "b cannot reach c: connection refused"
    assert "127.0.0.4:7777" in f.remedy


def test_several_unreachable_peers_are_one_finding():
    fs = run(lambda s: node(s, "b", link_errors={"c": "connection refused", "a": "timed out"}))
    f = one(fs, "PEER_UNREACHABLE")
    assert f.text == "b cannot reach a: timed out, and c: connection refused"
    assert "127.0.0.2:7777 and 127.0.0.4:7777" in f.remedy


def test_peer_errors_of_dead_nodes_are_stale():
    fs = run(lambda s: node(s, "b", alive=False, seen_age_s=60.0, link_errors={"c": "timeout"}))
    assert {f.code for f in fs} == {"NODE_DOWN"}


def test_replay_stopped_on_a_secondary():
    f = one(run(ROWS[6].mutate), "REPLAY_STOPPED")
    assert f.text.startswith("replay of r on c stopped at a damaged log record (bad-check at offset 4096): "
                             "replay stopped: log-000000003-a")
    assert "'marsadm invalidate r' on c" in f.remedy and "corrupt record" in f.remedy
    assert "leave-resource" in f.remedy and "join-resource" in f.remedy


def test_replay_stopped_on_the_primary_means_log_truncate():
    fs = run(lambda s: member(s, "a", replay_code="-1,zero-tail,8192"))
    f = one(fs, "REPLAY_STOPPED")
    assert "'marsadm log-truncate r' on a" in f.remedy and "invalidate" not in f.remedy


def test_replay_code_minus_one_from_a_failed_attach():
    def failed(s):
        member(s, "b", replay_code="-1", actual={"attached": False},
               messages=[msg("b", "err-attach", "data device missing")])
    fs = run(failed)
    assert {f.code for f in fs} == {"REPLAY_STOPPED", "ATTACH_FAILED"}
    f = one(fs, "REPLAY_STOPPED")
    assert f.text == "replay of r on b is stopped (replay code -1): data device missing"
    assert f.remedy.startswith("fix the attach error, then 'marsadm attach r' on b")
    assert one(fs, "ATTACH_FAILED").remedy.startswith("fix what the message names, then 'marsadm attach r' on b")


def test_split_brain_text_and_remedy():
    f = one(run(ROWS[7].mutate), "SPLIT_BRAIN")
    assert f.text == ("r is in a split brain: from log 7 on, the designated primary's side, a, c, hold log 7 from a "
                      "(digest 11aa); the other side, b, holds log 7 from b (digest 22bb)")
    # three members: the diverged one leaves and joins again with its own device
    assert f.remedy.startswith("discard the diverged history on b: 'marsadm down r', 'marsadm leave-resource r', "
                               "then 'marsadm join-resource r /dev/vg/r-b' on b; then 'marsadm log-purge-all r'")
    two = one(run(lambda s: (ROWS[7].mutate(s), s.resources["r"].nodes.pop("c"))), "SPLIT_BRAIN")
    assert two.remedy.startswith("discard the diverged history: 'marsadm invalidate r' on b; then ")


def test_split_brain_by_log_file_origin():
    f = one(run(lambda s: resource(s, split_brain=[SplitBrain(5, {"a": "a:log file", "b": "b:log file"})])),
            "SPLIT_BRAIN")
    assert f.text == ("r is in a split brain: from log 5 on, the designated primary's side, a, holds a log file "
                      "log-000000005-a; the other side, b, holds a log file log-000000005-b")


def test_split_brain_bytes_beyond_and_no_primary():
    split = SplitBrain(5, {"a": "a:11aa", "b": "a:22bb"}, {"a": MiB, "b": 3 * MiB}, reference="b")
    def forced(s):
        resource(s, split_brain=[split], primary=None)
        member(s, "a", designated_primary=False, actual={"primary": False})
    f = one(run(forced), "SPLIT_BRAIN")
    assert f.text == ("r is in a split brain: from log 5 on, the side with the furthest log end, b, holds log 5 from "
                      "a (digest 22bb) and 3.0 MiB beyond the split point; the other side, a, holds log 5 from a "
                      "(digest 11aa) and 1.0 MiB beyond the split point")
    assert f.remedy.startswith("first make the side to keep primary: 'marsadm primary r' on b keeps b's side")
    assert "on a:" in f.remedy and "'marsadm join-resource r /dev/vg/r-a' on a" in f.remedy


def test_split_brain_reported_by_a_member_alone():
    f = one(run(lambda s: member(s, "c", messages=[msg("c", "err-split-brain", "history differs from a's")])),
            "SPLIT_BRAIN")
    assert f.text == "r is in a split brain: c's marsd reports: history differs from a's"
    assert "discard the diverged history on c:" in f.remedy


def test_handover_texts():
    f = one(run(lambda s: (handover(s, 4.0), member(s, "b", replay=Progress(4 * GiB, LOG_END, 80.0 * MiB)))),
            "HANDOVER")
    assert f.text == ("planned handover of r from a to b in progress for 4 s: b has 1.0 GiB of log left to replay "
                      "(80.0 MiB/s, about 13 s left); nothing serves r until then")
    f = one(run(lambda s: handover(s, 61.0)), "HANDOVER_STALLED")
    assert f.remedy == ("'marsadm primary r' on b again, or 'marsadm primary r' on a to go back; if a is lost, "
                        "'marsadm primary --force r' on b")
    assert one(run(lambda s: handover(s, 61.0)), "NO_PRIMARY").remedy.startswith("see HANDOVER_STALLED")


def test_no_primary_names_the_member_to_make_primary():
    assert one(run(no_primary), "NO_PRIMARY").remedy == \
        "make a primary, the member whose replay got furthest: 'marsadm primary r' on a"
    f = one(run(lambda s: (no_primary(s), resource(s, prev_primary="c"))), "NO_PRIMARY")
    assert f.remedy == "make c primary, the last primary: 'marsadm primary r' on c"


def test_fetch_failing_needs_the_fetch_switch():
    def off(s):
        member(s, "b", switches={"fetch": False}, messages=[msg("b", "warn-fetch", "a: timeout")])
    assert {f.code for f in run(off)} == {"FETCH_PAUSED"}
    f = one(run(ROWS[9].mutate), "FETCH_FAILING")
    assert f.text == "fetch of r on b from a fails: a: connection reset"
    assert "'marsadm get-connect-pref-list r' on b" in f.remedy


def test_primary_not_serving_only_when_alive_and_attach_on():
    assert run(lambda s: (member(s, "a", actual={"primary": False}), node(s, "a", alive=False))) != []
    assert "PRIMARY_NOT_SERVING" not in {
        f.code for f in run(lambda s: (member(s, "a", actual={"primary": False}), node(s, "a", alive=False)))}
    fs = run(lambda s: member(s, "a", actual={"primary": False}, switches={"attach": False}))
    assert {f.code for f in fs} == {"DETACHED"}
    assert one(fs, "DETACHED").remedy == "'marsadm attach r' on a"


@pytest.mark.parametrize("rest_gib, total_gib, code", [
    (9.99, 100, "SPACE_LOW"), (10, 100, "SPACE_WARN"), (19.99, 100, "SPACE_WARN"), (20, 100, None),
    (0.99, 5, "SPACE_LOW"), (1, 5, None), (0.5, 0.6, "SPACE_LOW"),
])
def test_space_thresholds(rest_gib, total_gib, code):
    fs = run(lambda s: node(s, "b", rest_space_bytes=int(rest_gib * GiB), total_space_bytes=int(total_gib * GiB)))
    assert {f.code for f in fs} == ({code} if code else set())


def test_space_text_and_dead_nodes():
    f = one(run(ROWS[13].mutate), "SPACE_LOW")
    assert f.text == "b has 5.0 GiB free of 100.0 GiB in its MARS directory (5.0 %)"
    assert "'marsadm log-delete-all all' on b" in f.remedy
    fs = run(lambda s: node(s, "b", rest_space_bytes=0, alive=False, seen_age_s=40.0))
    assert {f.code for f in fs} == {"NODE_DOWN"}


def test_paused_hints_name_the_command():
    assert one(run(ROWS[16].mutate), "SYNC_PAUSED").remedy == "'marsadm resume-sync r' on c"
    assert one(run(ROWS[17].mutate), "FETCH_PAUSED").remedy == "'marsadm connect r' on c"
    assert one(run(ROWS[18].mutate), "REPLAY_PAUSED").remedy == "'marsadm resume-replay r' on c"
    assert one(run(ROWS[19].mutate), "DETACHED").remedy == "'marsadm up r' on c"


def test_sync_switch_off_with_nothing_left_is_silent():
    assert run(lambda s: member(s, "b", switches={"sync": False})) == []


def test_logs_texts():
    f = one(run(ROWS[20].mutate), "LOGS_DELETABLE")
    assert f.text == "3 log files of r, 12.0 GiB on a, replayed everywhere, can be deleted"
    assert f.remedy == "'marsadm log-delete-all r'"
    f = one(run(held_back), "LOGS_HELD_BACK")
    assert f.text == "c's replay position holds back deletion of older logs of r (replay is paused there)"
    assert f.remedy == "'marsadm resume-replay r' on c"


def test_logs_held_back_by_a_dead_node():
    def dead(s):
        resource(s, held_back_by=["c"])
        node(s, "c", alive=False, seen_age_s=3600.0)
    fs = run(dead)
    f = one(fs, "LOGS_HELD_BACK")
    assert "(c is down)" in f.text and "leave-resource r --host c --force" in f.remedy


def test_resize_gain_in_bytes_and_unknown_disks():
    f = one(run(ROWS[22].mutate), "RESIZE_POSSIBLE")
    assert f"{2 * GiB} bytes" in f.text and "2.0 GiB" in f.text
    assert f.text.startswith("marsadm resize would increase resource r by 2.0 GiB")
    assert "; you are wasting 3.0 GiB on disk " in f.text and " of a, 2.0 GiB on disk " in f.text
    def barely(s):  # a's disk is larger by less than the original's 10 MiB threshold: not wasted
        ROWS[22].mutate(s)
        member(s, "a", disk_bytes=SIZE + 4096)
    f = one(run(barely), "RESIZE_POSSIBLE")
    assert "by 4.0 KiB (4096 bytes)" in f.text and " of a" not in f.text and " of b, " in f.text, f.text
    assert f.remedy == "'marsadm resize r' on a"
    def one_unknown(s):
        ROWS[22].mutate(s)
        member(s, "c", disk_bytes=None)
    assert run(one_unknown) == []
    assert run(lambda s: member(s, "b", disk_bytes=SIZE + GiB)) == []  # the others are not larger


def test_clock_slip_and_versions_texts():
    f = one(run(ROWS[23].mutate), "CLOCK_SLIP")
    assert "45 s ahead" in f.text and "30 s alive window" in f.text and "NTP" in f.remedy
    assert run(snap(clock_slip_s=30.0)) == []  # exactly the window is fine
    f = one(run(ROWS[24].mutate), "MARSD_VERSIONS_DIFFER")
    assert f.text == "live nodes run different marsd versions: 0.1.0 (a, b), 0.2.0 (c)"
    # a dead node's old version does not count
    assert {f.code for f in run(lambda s: node(s, "c", version="0.0.9", alive=False, seen_age_s=99.0))} == {"NODE_DOWN"}


# --- order, worst, line ----------------------------------------------------------------------

def everything(s: Snapshot) -> Snapshot:
    for r in ROWS:
        if r.code not in ("NO_PRIMARY", "PRIMARY_NOT_MEMBER", "NODE_DOWN", "SPACE_WARN"):
            s = after(r.mutate, s)
    return s


def test_sorted_by_level_then_res_node_code():
    fs = run(everything)
    assert len(fs) > 10
    order = [(LEVELS.index(f.level), f.res or "", f.node or "", f.code) for f in fs]
    assert order == sorted(order)
    assert [f.level for f in fs] == sorted((f.level for f in fs), key=LEVELS.index)
    assert fs[0].level == "TODO" and fs[-1].level == "WORK"
    assert fs == run(everything)  # deterministic


def test_order_example():
    s = healthy()
    s.resources["q"] = dataclasses.replace(s.resources["r"], name="q", primary=None, nodes={})
    member(s, "b", switches={"replay": False})
    node(s, "c", alive=False, seen_age_s=50.0)
    assert [(f.level, f.code, f.res, f.node) for f in findings(s)] == [
        ("TODO", "NODE_DOWN", None, "c"),
        ("TODO", "NO_PRIMARY", "q", None),
        ("HINT", "REPLAY_PAUSED", "r", "b"),
    ]


def test_worst():
    w = Finding("WORK", "SYNC_RUNNING", "r", "b", "t", "")
    h = Finding("HINT", "DETACHED", "r", "b", "t", "x")
    t = Finding("TODO", "NO_PRIMARY", "r", None, "t", "x")
    assert worst([]) is None
    assert worst([w]) == "WORK"
    assert worst([w, h]) == "HINT"
    assert worst([h, t, w]) == "TODO"


def test_line():
    f = Finding("TODO", "REPLAY_STOPPED", "r", "b", "replay of r on b stopped", "'marsadm invalidate r' on b")
    assert f.line() == "TODO REPLAY_STOPPED r@b: replay of r on b stopped; 'marsadm invalidate r' on b"
    assert Finding("WORK", "SYNC_RUNNING", "r", "b", "sync", "").line() == "WORK SYNC_RUNNING r@b: sync"
    assert Finding("TODO", "NODE_DOWN", None, "c", "down", "fix").line() == "TODO NODE_DOWN @c: down; fix"
    assert Finding("TODO", "NO_PRIMARY", "r", None, "none", "fix").line() == "TODO NO_PRIMARY r: none; fix"
    assert Finding("HINT", "MARSD_VERSIONS_DIFFER", None, None, "v", "u").line() == \
        "HINT MARSD_VERSIONS_DIFFER cluster: v; u"
    for f in run(everything):
        assert f.line().startswith(f"{f.level} {f.code} ") and "\x1b" not in f.line()


def test_invalid_findings_cannot_exist():
    with pytest.raises(ValueError):
        Finding("WARN", "NO_PRIMARY", "r", None, "t", "x")
    with pytest.raises(ValueError):
        Finding("TODO", "NO_SUCH_CODE", "r", None, "t", "x")
    with pytest.raises(ValueError):
        Finding("HINT", "NO_PRIMARY", "r", None, "t", "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Finding("TODO", "NO_PRIMARY", "r", None, "t", "x").level = "HINT"  # type: ignore[misc]


# --- figures ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536 * MiB, "1.5 GiB"),
    (12 * GiB, "12.0 GiB"), (1024 * MiB - 1, "1.0 GiB"), (3 << 40, "3.0 TiB"), (35.5 * MiB, "35.5 MiB"),
    (-2048, "-2.0 KiB"), (None, "unknown"), (math.nan, "unknown"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize("s, text", [
    (0, "0 s"), (36.4, "36 s"), (60, "1 min"), (303, "5 min 3 s"), (7500, "2 h 5 min"), (7200, "2 h"),
    (3 * 86400 + 4 * 3600 + 5, "3 d 4 h"), (None, "unknown"), (math.inf, "unknown"),
])
def test_human_seconds(s, text):
    assert human_seconds(s) == text


# --- robustness: unknown values never raise; ill-typed snapshots cannot reach the rules --------

def test_unknown_values_do_not_raise():
    """Every value the snapshot's types allow to be unknown, unknown at once: fewer findings."""
    def holes(s):
        member(s, "b", sync=Progress(SIZE, SIZE, math.nan), fetch=None, replay=None, fetch_pos=None,
               replay_link=None, fetch_source=None, fetch_age_s=None, replay_age_s=None, fetch_lag_s=None,
               replay_lag_s=None)
        member(s, "c", replay=Progress(LOG_END, LOG_END, None), replay_code=None, disk_bytes=None)
        node(s, "b", rest_space_bytes=None, total_space_bytes=None, seen_age_s=None, version=None, ip=None)
        resource(s, primary=None, log_end=None)
        return dataclasses.replace(s, clock_slip_s=math.nan, window_s=math.inf)
    fs = run(holes)
    assert {f.code for f in fs} == {"NO_PRIMARY"}  # unknown values trigger nothing


def test_an_empty_snapshot():
    empty = Snapshot(local_host="", mars_dir="", taken_at_s=0.0, lamport_s=0.0, clock_slip_s=0.0, tool_version="",
                     marsd_running=True, marsd_pid=None, cluster_uuid=None, window_s=30.0, nodes={}, resources={})
    assert findings(empty) == []
    down = dataclasses.replace(empty, marsd_running=False)
    assert keys(findings(down)) == {("TODO", "MARSD_DOWN", None, None)}
    lone = ResourceStatus("s", SIZE, "a", {"a": healthy().resources["r"].nodes["a"]}, [], None, [], [], 0, [], 0)
    assert {f.code for f in findings(dataclasses.replace(down, resources={"s": lone}))} == {"MARSD_DOWN", "NODE_DOWN"}


def test_snapshot_json_round_trip():
    s = healthy()
    member(s, "c", replay_code="-1,bad-check,4096", messages=[msg("c", "err-replay-stop", "bad check")])
    doc = s.to_json()
    assert doc["resources"]["r"]["nodes"]["c"]["replay_code"] == "-1,bad-check,4096"  # the tree's own text
    assert doc["resources"]["r"]["nodes"]["c"]["role"] == "Secondary"  # derived figures ride along
    assert Snapshot.from_json(doc) == s
    assert findings(Snapshot.from_json(doc)) == findings(s)


@pytest.mark.parametrize("path, bad", [
    (("resources", "r", "nodes", "b", "sync"), None),
    (("resources", "r", "nodes", "b", "sync", "pos_bytes"), None),
    (("resources", "r", "nodes", "c", "switches"), None),
    (("resources", "r", "nodes", "c", "actual", "primary"), 1),
    (("resources", "r", "nodes", "c", "messages"), None),
    (("resources", "r", "nodes", "c", "replay_code"), "-"),
    (("resources", "r", "nodes", "c", "replay_link"), "x"),
    (("nodes", "b", "link_errors"), None),
    (("nodes", "b", "tunables"), None),
    (("nodes", "b", "alive"), None),
    (("resources", "r", "deletable_bytes"), None),
    (("resources", "r", "split_brain"), None),
    (("marsd_running",), None),
    (("nodes",), None),
])
def test_ill_typed_snapshots_are_refused_at_the_boundary(path, bad):
    """What the old defensive getattr layer tolerated can no longer reach the rules: the JSON
    boundary refuses it, naming the field (build() only makes typed values)."""
    doc = healthy().to_json()
    at = doc
    for k in path[:-1]:
        at = at[k]
    at[path[-1]] = bad
    with pytest.raises(MarsError) as e:
        Snapshot.from_json(doc)
    assert ".".join(path) in str(e.value).replace("['", ".").replace("']", "") or path[-1] in str(e.value)


ints = st.integers(-(1 << 40), 1 << 44)
maybe_int = st.one_of(st.none(), ints)
rates = st.floats(allow_nan=True, allow_infinity=True)
maybe_rate = st.one_of(st.none(), rates)
progress = st.builds(Progress, ints, ints, maybe_rate)
maybe_progress = st.one_of(st.none(), progress)
messages = st.lists(st.builds(Message, st.sampled_from(HOSTS), st.just("r"), st.sampled_from(["err", "warn"]),
                              st.sampled_from(["err-attach", "warn-fetch", "err-replay-stop", "warn-torn-tail"]),
                              st.text(max_size=20), st.floats(0, 100)), max_size=3)
codes = st.sampled_from([None, ReplayCode(1), ReplayCode(-1), ReplayCode(-1, "bad-check", 12), ReplayCode(-1, None, 7),
                         ReplayCode(0)])


@st.composite
def snapshots(draw) -> Snapshot:
    s = healthy()
    for h in HOSTS:
        if draw(st.booleans()):
            node(s, h, alive=draw(st.booleans()), seen_age_s=draw(maybe_rate),
                 version=draw(st.sampled_from([None, "1", "2"])),
                 rest_space_bytes=draw(maybe_int), total_space_bytes=draw(maybe_int), emergency=draw(st.booleans()),
                 link_errors=draw(st.dictionaries(st.sampled_from(HOSTS), st.text(max_size=8))))
        if draw(st.booleans()):
            member(s, h, sync=draw(progress), fetch=draw(maybe_progress), replay=draw(maybe_progress),
                   switches=draw(st.builds(Switches, *[st.booleans()] * 4)),
                   actual=draw(st.builds(Actual, *[st.booleans()] * 5, st.integers(0, 3))),
                   replay_code=draw(codes), messages=draw(messages), disk_bytes=draw(maybe_int),
                   replay_link=draw(st.sampled_from([None, ReplayLink(3, "a", 4096)])),
                   designated_primary=draw(st.booleans()))
    resource(s, primary=draw(st.sampled_from([None, "a", "b", "x"])), size_bytes=draw(ints),
             split_brain=draw(st.lists(st.builds(SplitBrain, ints, st.dictionaries(
                 st.sampled_from(HOSTS), st.sampled_from(["a:1", "b:2", "a:log file"]))), max_size=2)),
             deletable_logs=draw(st.lists(st.text(max_size=5), max_size=3)), deletable_bytes=draw(ints),
             held_back_by=draw(st.lists(st.sampled_from([*HOSTS, "x"]), max_size=3)))
    return dataclasses.replace(s, marsd_running=draw(st.booleans()), clock_slip_s=draw(rates),
                               window_s=draw(st.floats(0, 100)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
def test_random_snapshots_never_raise(s: Snapshot):
    fs = findings(s)
    assert fs == findings(s)
    order = [(LEVELS.index(f.level), f.res or "", f.node or "", f.code, f.text) for f in fs]
    assert order == sorted(order)
    for f in fs:
        assert CODES[f.code][0] == f.level and f.text and f.line()
        assert (f.remedy == "") == (f.level == "WORK")
    identities = [(f.code, f.res, f.node) for f in fs]
    assert len(identities) == len(set(identities))  # the control socket raises and clears by this key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(snapshots())
def test_every_state_a_member_can_be_in_is_a_declared_one(s: Snapshot):
    """The exporters' statesets and value maps list DISKSTATES, REPLSTATES and ROLES before any
    node is in a state; a rule that gave a name outside them would be a series nobody sees."""
    from mars.engine.model import DISKSTATES, REPLSTATES, ROLES, Member, state_name
    for r in s.resources.values():
        for h in [*HOSTS, "x"]:
            m = Member(s, r, h)
            assert state_name(m.diskstate()) in DISKSTATES
            assert m.replstate() in REPLSTATES and m.role() in ROLES


def test_several_split_logs_in_one_finding():
    f = one(run(lambda s: resource(s, split_brain=[SplitBrain(9, {"a": "a:3", "b": "b:4"}),
                                                   SplitBrain(8, {"a": "a:1", "b": "b:2"})])), "SPLIT_BRAIN")
    assert f.text == ("r is in a split brain: from log 8 on, the designated primary's side, a, holds log 8 from a "
                      "(digest 1); the other side, b, holds log 8 from b (digest 2) / from log 9 on, the designated "
                      "primary's side, a, holds log 9 from a (digest 3); the other side, b, holds log 9 from b "
                      "(digest 4)")


def test_a_snapshot_built_from_an_empty_tree(tmp_path):
    from mars.engine.model import build
    fs = findings(build(tmp_path, "a", now_s=1_700_000_000.0))
    assert keys(fs) == {("TODO", "MARSD_DOWN", None, "a")}


def test_a_connect_cycle_is_named_once_with_its_path():
    fs = run(lambda s: (member(s, "b", connect_list=["c", "a"]), member(s, "c", connect_list=["b"])))
    f = one(fs, "CONNECT_CYCLE")
    assert f.text == "the connect preference lists of r make a cycle: b -> c -> b; these members fetch from a instead"
    assert run(lambda s: member(s, "b", connect_list=["c"])) == []  # a chain to a member that fetches normally


def test_a_near_zero_rate_gives_no_time_left_and_a_stall_says_so():
    slow = one(run(lambda s: member(s, "b", fetch=Progress(4 * GiB, LOG_END, 16.0))), "FETCH_RUNNING")  # 22 d left?
    assert slow.text.endswith("(1.0 GiB behind the log end, not moving)"), slow.text
    stalled = one(run(lambda s: member(s, "b", fetch=Progress(4 * GiB, LOG_END, 80.0 * MiB, 45.0))), "FETCH_RUNNING")
    assert stalled.text.endswith("(1.0 GiB behind the log end, no progress for 45 s)"), stalled.text


def test_a_node_all_peers_cannot_reach_is_down_at_once(tmp_path):
    """Built from a tree: c reported 2 s ago (inside the alive window) but a and b cannot reach it."""
    from mars.engine.model import build
    from mars.engine.tree import Tree
    t = Tree(tmp_path, "a")
    now = 1_700_000_000.0
    for i, h in enumerate("abc"):
        t.set(f"ips/ip-{h}", f"127.0.0.{2 + i}", stamp_ns=int((now - 1) * 1e9))
        t.set(f"actual-{h}/time", f"{now - 2:.9f}", stamp_ns=int((now - 2) * 1e9))
    t.set("actual-a/msg-peer-c", "connection refused", stamp_ns=int((now - 1) * 1e9))
    s = build(tmp_path, "a", now_s=now)
    assert s.nodes["c"].alive  # one witness is a link problem, not a dead node
    assert keys(findings(s)) >= {("TODO", "PEER_UNREACHABLE", None, "a")}
    t.set("actual-b/msg-peer-c", "connection refused", stamp_ns=int((now - 1) * 1e9))
    s = build(tmp_path, "a", now_s=now)
    assert not s.nodes["c"].alive and s.nodes["c"].unreachable
    f = one(findings(s), "NODE_DOWN")
    assert f.text == ("node c is unreachable: a cannot reach it (connection refused); b cannot reach it "
                      "(connection refused)")
    assert "PEER_UNREACHABLE" not in {x.code for x in findings(s)}  # NODE_DOWN says it, once


def test_a_node_whose_marsd_is_down_does_not_call_its_peers_down(tmp_path):
    """Built from a tree: c's marsd stopped 5 min ago. Its tree stands still since, so a's and
    b's last reports there are 5 min old too; they were fresh when c last reported. c's face
    (its exporter, mars-status) said NODE_DOWN for a and b: the fault is c's own (MARSD_DOWN).
    A peer that was already silent long before c stopped is still down."""
    from mars.engine.model import build
    from mars.engine.tree import Tree
    t = Tree(tmp_path, "c")
    now = 1_700_000_000.0
    stopped = now - 300
    for i, h in enumerate("abcd"):
        t.set(f"ips/ip-{h}", f"127.0.0.{2 + i}", stamp_ns=int((stopped - 1) * 1e9))
    for h, at in (("a", stopped - 1), ("b", stopped - 2), ("c", stopped), ("d", stopped - 120)):
        t.set(f"actual-{h}/time", f"{at:.9f}", stamp_ns=int(at * 1e9))
    s = build(tmp_path, "c", now_s=now)
    assert not s.marsd_running
    assert s.nodes["a"].alive and s.nodes["b"].alive, "judged as of c's last report, a and b were alive"
    assert not s.nodes["d"].alive and not s.nodes["c"].alive
    assert {(f.code, f.node) for f in findings(s) if f.code in ("NODE_DOWN", "MARSD_DOWN")} == \
        {("MARSD_DOWN", "c"), ("NODE_DOWN", "d")}
