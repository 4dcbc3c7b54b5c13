"""The status model against real three-node clusters: `marsadm view`, the findings and the monitor's
exit code (`mars-status --check`) in each state.

Each test brings a cluster (a primary, b and c secondaries of resource r) into one state the
operator must be told about, then reads it the way operators and monitors do: `marsadm view`
(text) and `marsadm view --json` (the snapshot with its findings), on the node named.
"""

from __future__ import annotations

import json
import subprocess


from harness import BIN, Node, caught_up, wait_until, write

MiB = 1 << 20



def view(node: Node, *args: str) -> str:
    return node.marsadm("view", *args).stdout


def snapshot(node: Node, *args: str) -> dict:
    return json.loads(node.marsadm(*args, "view", "--json", "r").stdout)


def codes(doc: dict, level: str | None = None) -> set[tuple[str, str | None, str | None]]:
    """(code, res, node) of the findings in a `view --json` document."""
    return {(f["code"], f["res"], f["node"]) for f in doc["findings"] if level is None or f["level"] == level}


def res_line(text: str, res: str = "r") -> str:
    """The default view's line for the local node: `  <res> [n/m] <diskstate> <replstate> <flags> ...`."""
    for line in text.splitlines():
        if line.strip().startswith(f"{res} ["):
            return line
    raise AssertionError(f"no resource line for {res} in:\n{text}")


def monitor(node: Node, *args: str) -> int:
    """``mars-status --check`` on ``node``: the Nagios exit code (0 OK, 1 HINT, 2 TODO, 3 unreadable)."""
    cmd = [str(BIN / "mars-status"), "--mars-dir", str(node.mars_dir), "--host", node.host, *args, "--check"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=node.env(), check=False)
    assert r.stdout.startswith("MARS ") and len(r.stdout.splitlines()) == 1, r.stdout + r.stderr
    return r.returncode


def has_finding(node: Node, code: str, on: str | None, *args: str) -> bool:
    return any(c == code and n == on for c, _, n in codes(snapshot(node, *args)))


def test_all_up_to_date(trio):
    a, b, c = trio
    for n in (a, b, c):
        doc = snapshot(n)
        bad = [f for f in doc["findings"] if f["level"] in ("TODO", "HINT")]
        assert not bad, f"{n.host}: {bad}"
        assert doc["marsd_running"] is True
    line = res_line(view(b, "all"))
    # d: a disk but no device (only the primary serves one), as in the original's "dCASFR Secondary"
    assert " UpToDate " in line and " Replaying " in line and " dCASFR " in line and " Secondary " in line
    line = res_line(view(a, "all"))
    assert " UpToDate " in line and " Replicating " in line and " Primary " in line
    assert [monitor(n) for n in (a, b, c)] == [0, 0, 0]


def test_a_secondary_syncing_then_paused(sparse_8t):
    """An 8 TiB sparse image syncs for seconds: long enough to see it happen, from every node."""
    a, b, _ = sparse_8t
    base = a.base
    b.marsadm("join-resource", "r", str(base / "b.img"), "--create")
    wait_until(lambda: "Syncing" in res_line(view(b, "all")), 30, "b's view to show Syncing")
    wait_until(lambda: has_finding(a, "SYNC_RUNNING", "b"), 30, "a to report b's sync as WORK")
    assert monitor(a) == 0  # work is not a problem
    b.marsadm("pause-sync", "r")
    line = res_line(view(b, "all"))
    assert " InConsistent " in line and " PausedSync " in line, line
    wait_until(lambda: ("SYNC_PAUSED", "r", "b") in codes(snapshot(a), "HINT"), 20, "a to hint at b's paused sync")
    # b's sync position reaches a with the next exchange: part way, not done.
    wait_until(lambda: 0 < snapshot(a)["resources"]["r"]["nodes"]["b"]["sync"]["pos_bytes"] < 8 << 40, 20,
               "a to see b's sync part way")
    assert monitor(a) == 1  # a paused sync is a hint
    b.marsadm("resume-sync", "r")
    wait_until(lambda: " UpToDate " in res_line(view(b, "all")), 60, "b to finish the sync")


def test_fetch_paused(trio):
    a, b, c = trio
    b.marsadm("disconnect", "r")
    write(a, "write -P 0x22 1M 1M")
    wait_until(lambda: caught_up(a, c, "r"), 30, "c to catch up")
    # b learns a's new log end with the next exchange; then it knows it is behind.
    wait_until(lambda: " OutDated" in res_line(view(b, "all")), 20, "b's view to say it is outdated")
    line = res_line(view(b, "all"))
    assert " PausedFetch " in line and line.split()[4][4] == "-", line  # flags: the F place is '-'
    assert " OutDated[FR] " in line or " OutDated[F] " in line, line
    for n in (a, c):
        wait_until(lambda: has_finding(n, "FETCH_PAUSED", "b"), 20, f"{n.host} to report b's paused fetch")
    assert monitor(b) == 1
    b.marsadm("connect", "r")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    wait_until(lambda: not has_finding(a, "FETCH_PAUSED", "b"), 20, "the finding to clear")


def test_replay_paused_holds_back_logs(trio):
    a, b, c = trio
    c.marsadm("pause-replay", "r")
    write(a, "write -P 0x33 1M 3M")  # over the 2 MiB rotation size: a new log file
    wait_until(lambda: len(list((a.mars_dir / "resource-r").glob("log-*-a"))) >= 2, 20, "a rotation")
    write(a, "write -P 0x34 4M 1M")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    line = res_line(view(c, "all"))
    assert " PausedReplay " in line and line.split()[4][5] == "-", line
    doc = snapshot(a)
    assert ("REPLAY_PAUSED", "r", "c") in codes(doc, "HINT")
    wait_until(lambda: has_finding(a, "LOGS_HELD_BACK", "c"), 20, "a to say c holds back log deletion")
    assert monitor(a) == 1 and monitor(c) == 1


def test_node_down(trio):
    a, b, c = trio
    c.kill()
    wait_until(lambda: has_finding(a, "NODE_DOWN", "c", "--window", "2"), 30, "a to report c down")
    assert has_finding(b, "NODE_DOWN", "c", "--window", "2")
    assert not has_finding(a, "NODE_DOWN", "b", "--window", "2")
    assert monitor(a, "--window", "2") == 2
    # c's own tools still work with marsd down, from the tree alone, and say so.
    r = c.marsadm("view", "r", check=False)
    assert r.returncode == 0 and "marsd is not running" in r.stderr, r.stderr
    assert has_finding(c, "MARSD_DOWN", "c")


def test_corrupt_log_record_on_a_secondary(trio):
    a, b, c = trio
    b.marsadm("pause-replay", "r")
    write(a, "write -P 0x44 0 256k")
    copy = b.mars_dir / "resource-r" / "log-000000001-a"
    end = (a.mars_dir / "resource-r" / "log-000000001-a").stat().st_size
    wait_until(lambda: copy.exists() and copy.stat().st_size == end, 30, "b to fetch the new record")
    with open(copy, "r+b") as f:  # flip a byte inside the newest record's payload
        f.seek(end - 1000)
        byte = f.read(1)
        f.seek(end - 1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = b.marsadm("resume-replay", "r", check=False)  # replay may hit the record before marsadm looks
    assert r.returncode == 0 or "invalidate" in r.stderr, r.stderr
    wait_until(lambda: has_finding(a, "REPLAY_STOPPED", "b"), 30, "a to report b's stopped replay")
    again = b.marsadm("resume-replay", "r", check=False)
    assert again.returncode == 1 and "payload digest" in again.stderr, again.stderr
    assert "marsadm invalidate r" in again.stderr and "Traceback" not in again.stderr
    line = res_line(view(b, "all"))
    assert "DefectiveLog" in line, line
    doc = snapshot(b)
    f = next(f for f in doc["findings"] if f["code"] == "REPLAY_STOPPED")
    assert f["level"] == "TODO" and "invalidate" in f["remedy"]
    assert monitor(a) == 2 and monitor(b) == 2


def test_logs_deletable(trio):
    a, b, c = trio
    logs = a.mars_dir / "resource-r"
    write(a, "write -P 0x55 1M 3M")  # rotates at 2 MiB, in marsd's next round
    wait_until(lambda: len(list(logs.glob("log-*-a"))) >= 2, 20, "a rotation")
    write(a, "write -P 0x56 4M 3M")
    wait_until(lambda: len(list(logs.glob("log-*-a"))) >= 3, 20, "a second rotation")
    for n in (b, c):
        wait_until(lambda: caught_up(a, n, "r"), 30, f"{n.host} to catch up")
    wait_until(lambda: has_finding(a, "LOGS_DELETABLE", None), 20, "a to hint at deletable logs")
    doc = snapshot(a)
    assert doc["resources"]["r"]["deletable_logs"]
    assert monitor(a) == 1
    a.marsadm("log-delete-all", "r")
    wait_until(lambda: not has_finding(a, "LOGS_DELETABLE", None), 20, "the hint to clear")


def test_split_brain(trio):
    """Two histories for one log number: b's version entry for log 1 names another digest."""
    from mars.engine.tree import Tree
    a, b, c = trio
    write(a, "write -P 0x66 1M 3M")  # log 1 is finished by the rotation at 2 MiB
    wait_until(lambda: b.tree_value("resource-r/version-000000001-b") is not None, 30, "b's version of log 1")
    good = b.tree_value("resource-r/version-000000001-b")
    forged = "f" * len(good.split(",", 1)[0]) + "," + good.split(",", 1)[1]
    Tree(b.mars_dir, "b").set("resource-r/version-000000001-b", forged)
    for n in (a, b, c):
        wait_until(lambda: has_finding(n, "SPLIT_BRAIN", None), 30, f"{n.host} to report the split brain")
    doc = snapshot(c)
    assert doc["resources"]["r"]["split_brain"][0]["seq"] == 1
    r = a.marsadm("view-is-split-brain", "r")
    assert r.stdout.strip() == "1"
    assert [monitor(n) for n in (a, b, c)] == [2, 2, 2]
