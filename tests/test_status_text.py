"""mars-status as text and as a monitor: the original's display, its blocks and its exit codes.

Integration tests run the installed ``mars-status`` against real clusters (stdout is a pipe, so
it prints plain text once, as in a cron job) and read what an operator or a monitor reads: the
seed's display fields, the ``--check`` line and the exit code (0 OK, 1 hints, 2 something to do,
3 state unreadable). Unit tests render hand-written trees (as tests/test_view.py writes them) to
pin the drawing of the history tree and of the progress bars.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest
from harness import BIN, Node, caught_up, run, wait_until, write
from mars.engine.model import build, findings
from mars.engine.tree import Tree
from mars.engine.trigger import take_lock
from mars.status.render import STYLES, VIEWS, Options, Span, bar, check, plain, render

TiB = 1 << 40


def status(node: Node, *args: str, host: str | None = None) -> subprocess.CompletedProcess[str]:
    """``mars-status`` on ``node``'s tree, stdout a pipe (plain text, once)."""
    cmd = [str(BIN / "mars-status"), "--mars-dir", str(node.mars_dir), "--host", host or node.host, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=node.env(), check=False)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r


def lines_with(text: str, prefix: str | tuple[str, ...]) -> list[str]:
    return [x for x in text.splitlines() if x.startswith(prefix)]


# --- the default display, against a cluster with a running sync ------------------------------------

def test_plain_text_shows_every_field_of_the_seed_example(sparse_8t):
    """Seed §4.3 a): header, cluster line, resource line, local and remote node blocks with Device,
    Sync, Fetch, Replay, Actual and Switches, the modus line, and a WORK line for the sync."""
    a, b, _ = sparse_8t
    base = a.base
    b.marsadm("join-resource", "r", str(base / "b.img"), "--create")

    def syncing() -> str | None:
        out = status(b).stdout
        return out if "---> WORK: sync of r on b at " in out and "synced = 100.00%" in out else None
    out = wait_until(syncing, 60, "b's mars-status to show the sync in progress")

    head = out.splitlines()
    assert head[0] == "MARS Status - b, mars-status 0.1.0"
    assert head[1].startswith("MARS Admin  - marsadm 0.1.0")
    assert re.match(r"MARS Daemon - a: 0\.1\.0, b: 0\.1\.0, c: 0\.1\.0$", head[2]), head[2]
    assert head[3].startswith("MARS Python - ")
    assert re.match(r"marsd: running \(pid \d+\)$", head[4]), head[4]
    assert set(head[5]) == {"─"}
    assert head[6] == "-> Cluster Diskspace: smoothly  Transactions: smoothly  Connects: smoothly  Synclimit: WORK"
    assert "---> Resources <---" in head
    assert "-> check resource r, with 8.0 TiB, Primary Node is a" in head

    # b is local (first), a and c remote; c is no member of r.
    local = head.index("   -> local Node (b [127.0.0.3]) as Secondary, System alive")
    remote = head.index("   -> remote Node (a [127.0.0.2]) as Primary, System alive")
    modus = head.index("   -> modus for resource r is clustered (2 nodes)")
    assert local < remote < modus
    assert not any("Node (c" in x for x in head)

    b_block, a_block = head[local:remote], head[remote:modus]
    for block in (a_block, b_block):
        for field in ("Device  : Disk-Device ", "Sync    : ", "Fetch   : ", "Replay  : ", "State   : ",
                      "Actual  : Status=", "Switches: Attach=on"):
            assert len(lines_with("\n".join(block), field)) == 1, (field, block)
    text_a, text_b = "\n".join(a_block), "\n".join(b_block)
    assert f"Disk-Device {base / 'a.img'}, not enlarged, used as Mars-Device NBD export r (open " in text_a
    assert f"Disk-Device {base / 'b.img'}, not enlarged\n" in text_b
    assert "Sync    : 8796093022208 bytes (8.0 TiB) synced = 100.00%" in text_a
    sync_b = lines_with(text_b, "Sync    : ")[0]
    m = re.match(r"Sync    : (\d+) bytes \([\d.]+ [KMGT]?i?B\) synced = (\d+\.\d\d)%, rest [\d.]+ [KMGT]iB, rate ",
                 sync_b)
    assert m and 0 <= int(m.group(1)) < 8 * TiB and float(m.group(2)) < 100, sync_b
    assert re.search(r"Fetch   : \d+ bytes \(.+\) in log-000000001-a at \d+ bytes active", text_a), text_a
    assert re.search(r"Replay  : \d+ bytes \(.+\) now replayed, Todo \d+ bytes, completed [\d.]+%", text_a)
    assert "Actual  : Status=Primary, Syncstatus=off, Logfileupdate=off, Replay=off, Attached=on" in text_a
    assert "Switches: Attach=on [masked: Connect=on Sync=on AllowReplay=on]" in text_a
    assert "Actual  : Status=Secondary, Syncstatus=on, " in text_b
    assert "Switches: Attach=on Connect=on Sync=on AllowReplay=on" in text_b
    assert "State   : InConsistent Syncing " in text_b
    work = lines_with(text_b, "---> WORK: ")
    assert work and work[0].startswith("---> WORK: sync of r on b at "), text_b
    print(out)
    # Every figure of the progress lines has a unit.
    for x in lines_with(out, ("Sync    : ", "Fetch   : ", "Replay  : ")):
        bare = re.findall(r"(?<![\w.-])\d+(?:\.\d+)?(?![\d.])(?!%| bytes| [KMGTP]?i?B\b| s\b| min\b| h\b| d\b)",
                          re.sub(r"log-\d{9}-\w+", "LOG", x))
        assert not bare, f"figures without a unit in {x!r}: {bare}"
    # What the monitor says about it: work in progress is no alarm.
    r = status(b, "--check")
    assert r.returncode == 0 and r.stdout.startswith("MARS OK - 1 resource, 3 of 3 nodes alive, 1 work: SYNC_RUNNING"), \
        r.stdout


# --- the monitor function: exit codes and the --check line ----------------------------------------

def test_exit_codes_and_check_line_in_each_state(trio):
    a, _, c = trio
    # b and c have caught up; a learns their replay positions with the next exchange.
    r = wait_until(lambda: (x := status(a, "--check")).returncode == 0 and "work=0" in x.stdout and x, 30,
                   "a to see everything up to date")
    assert re.match(r"MARS OK - 1 resource, 3 of 3 nodes alive \| resources=1 nodes=3 nodes_alive=3 "
                    r"todo=0 hint=0 work=0\n$", r.stdout), r.stdout
    assert status(a).returncode == 0  # the plain display carries the same verdict

    c.marsadm("pause-replay", "r")
    write(a, "write -P 0x77 0 64k")  # something for c not to replay
    wait_until(lambda: status(a, "--check").returncode == 1, 30, "a's check to turn WARNING")
    r = status(a, "--check")
    assert r.stdout.startswith("MARS WARNING - ") and "REPLAY_PAUSED r@c: replay of r on c is paused" in r.stdout
    assert "| resources=1 nodes=3 nodes_alive=3 todo=0 hint=" in r.stdout
    out = status(a)
    assert out.returncode == 1
    assert "---> HINT: replay of r on c is paused" in out.stdout and "'marsadm resume-replay r' on c" in out.stdout
    assert out.stdout.splitlines()[-1].startswith("MARS WARNING - ")  # the plain display ends with the verdict
    c.marsadm("resume-replay", "r")
    wait_until(lambda: caught_up(a, c, "r"), 30, "c to catch up")
    wait_until(lambda: status(a, "--check").returncode == 0, 30, "a's check to turn OK again")

    c.kill()
    # a and b fail to reach c within a round: c is down at once, before its last report ages.
    r = wait_until(lambda: (x := status(a, "--check", "--window", "2")).returncode == 2 and "NODE_DOWN" in x.stdout
                   and x, 30, "a's check to report c down")
    assert r.stdout.startswith("MARS CRITICAL - "), r.stdout
    assert re.search(r"\d todo: .*NODE_DOWN @c: node c (is unreachable: a cannot reach it|has not reported for \d+ s "
                     r"\(alive window 2 s\))", r.stdout), r.stdout
    assert "nodes_alive=2 todo=" in r.stdout
    out = status(a, "--window", "2")
    assert out.returncode == 2
    assert "Connects: TODO" in out.stdout
    assert re.search(r"   -> remote Node \(c \[127\.0\.0\.4\]\) as Secondary, System (unreachable|unknown "
                     r"\(last message \d+ s ago\))", out.stdout), out.stdout
    assert lines_with(out.stdout, ("---> TODO: node c is unreachable: ", "---> TODO: node c has not reported for "))
    # On c itself, marsd is down: the tree is still shown, and it says so.
    out = status(c)
    assert "marsd: NOT RUNNING - showing what the tree knows" in out.stdout
    assert out.returncode == 2 and "---> TODO: marsd is not running on c" in out.stdout


def test_unreadable_state_is_unknown_with_a_message(tmp_path):
    def unknown(*args: str) -> str:
        r = subprocess.run([str(BIN / "mars-status"), "--host", "a", *args], capture_output=True, text=True,
                           timeout=60, check=False)
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stdout + r.stderr
        assert r.stdout.startswith("MARS UNKNOWN - ") and r.stdout.count("\n") == 1, r.stdout
        return r.stdout

    assert f"{tmp_path / 'none'} does not exist; " in unknown("--mars-dir", str(tmp_path / "none"))
    assert "holds no cluster" in unknown("--mars-dir", str(tmp_path), "--check")
    assert "create-cluster" in unknown("--mars-dir", str(tmp_path))
    (tmp_path / "file").write_text("")
    assert "is not a directory" in unknown("--mars-dir", str(tmp_path / "file"))
    assert "unrecognized arguments: --nonsense" in unknown("--nonsense")
    assert "not a positive number" in unknown("--interval", "0")


# --- the optional blocks ---------------------------------------------------------------------------

def test_blocks_are_added_combinable_ascii_and_limited_by_resource(trio):
    a, b, c = trio
    base = a.base
    run(["truncate", "-s", "16M", str(base / "s-a.img")])
    a.marsadm("create-resource", "s", str(base / "s-a.img"), "16M")
    wait_until(lambda: "check resource s" in status(b).stdout, 20, "b to learn s")
    write(a, "write -P 0x12 1M 3M")  # over the 2 MiB rotation size: a finished log with versions
    for n in (b, c):
        wait_until(lambda n=n: caught_up(a, n, "r"), 30, f"{n.host} to catch up")
    wait_until(lambda: b.tree_value("resource-r/version-000000001-c") is not None, 30, "c's version of log 1")

    plain_out = status(b).stdout
    headings = {"system": "---> Systemdata <---", "status": "---> Status <---", "debug": "---> Debug <---",
                "history": "---> History <---"}
    for heading in headings.values():
        assert heading not in plain_out
    for view, heading in headings.items():
        out = status(b, f"--{view}").stdout
        assert heading in out and all(h not in out for v, h in headings.items() if v != view), view
        assert out.startswith(plain_out.split("\n", 1)[0])

    everything = status(b, *(f"--{v}" for v in VIEWS)).stdout
    order = [everything.index(x) for x in ("---> Systemdata <---", "---> Resources <---", "---> Status <---",
                                           "---> Debug <---", "---> History <---")]
    assert order == sorted(order)
    system = everything[order[0]:order[1]]
    assert "-> local Node b [127.0.0.3], marsd 0.1.0, System alive" in system
    assert re.search(r"-> port is set to default, actually \d+", system), system
    assert re.search(r"-> LamportClockDifference -?\d+\.\d\d sec, Mars Port is set to \d+", system)
    assert re.search(rf"-> Free space on {re.escape(str(b.mars_dir))}: [\d.]+ [KMGT]iB of [\d.]+ [KMGT]iB "
                     r"\([\d.]+%\), Emergency is off", system), system
    bars = everything[order[2]:order[3]]
    assert re.search(r"      sync    \[█+\] 100\.00%  16\.0 MiB of 16\.0 MiB", bars), bars
    assert "░" not in bars  # all done
    debug = everything[order[3]:order[4]]
    assert "-> Debug for resource-r" in debug and "-> Main-Debug:" in debug
    history = everything[order[4]:]
    assert "   -> History Replay/Status of resource r" in history
    assert re.search(r"╠═══> Vers\.000000001 ═══> Logfile log-000000001-a Size: \d+ bytes", history), history
    assert re.search(r"║       ╠═══> Primary Node: a Check: [0-9a-f]{8} Size: \d+ bytes \(.+\) ---> replay OK, "
                     r"verify OK", history), history
    assert re.search(r"║       ╚═══> Secondary Node: c Check: [0-9a-f]{8} .* ---> replay OK, verify OK", history)

    ascii_out = status(b, "--ascii", *(f"--{v}" for v in VIEWS)).stdout
    assert ascii_out.isascii(), [x for x in ascii_out.splitlines() if not x.isascii()]
    assert re.search(r"\|--> Vers\.000000001 --> Logfile", ascii_out)
    assert re.search(r"      sync    \[#+\] 100\.00%", ascii_out)

    only_s = status(b, "--resource", "s", "--history", "--status")
    assert only_s.returncode == 0
    assert "-> check resource s, with 16.0 MiB" in only_s.stdout
    assert "check resource r" not in only_s.stdout and "History Replay/Status of resource r" not in only_s.stdout
    missing = status(b, "--resource", "nosuch")
    assert missing.returncode == 3
    assert missing.stdout == "MARS UNKNOWN - resource nosuch does not exist; the resources are: r, s\n"


# --- render() on hand-written trees ------------------------------------------------------------------

SIZE = 64 << 20
R = "resource-r"
LOG1, LOG2 = "log-000000001-a", "log-000000002-a"
LEN1, LEN2 = 4096, 1024
D1, D2 = "1" * 32, "2" * 32


def _now() -> str:
    return f"{time.time():.9f}"


@pytest.fixture
def tree(tmp_path):
    """Three members of r (a primary, b and c secondaries); log 1 finished (b and c have a version
    of it, c a different one), log 2 being written; b replayed into log 2, c is still in log 1."""
    t = Tree(tmp_path, "a")
    t.set("uuid", "t")
    for h, ip in (("a", "127.0.0.2"), ("b", "127.0.0.3"), ("c", "127.0.0.4")):
        t.set(f"ips/ip-{h}", ip)
        t.set(f"actual-{h}/time", _now())
        t.set(f"{R}/data-{h}", f"/images/{h}.img")
        t.set(f"{R}/actsize-{h}", SIZE)
        for sw in ("attach", "connect", "sync", "allow-replay"):
            t.set(f"{R}/todo-{h}/{sw}", 1)
        t.set(f"{R}/actual-{h}/is-attached", 1)
        t.set(f"{R}/syncstatus-{h}", SIZE)
    t.set(f"{R}/size", SIZE)
    t.set(f"{R}/primary", "a")
    t.set(f"{R}/actual-a/is-primary", 1)
    t.set(f"{R}/actual-a/log-pos", f"{LOG2},{LEN2}")
    zero = f"{'0' * 32},log-000000000-a,0"
    for h, d in (("a", D1), ("b", D1), ("c", "c" * 32)):
        t.set(f"{R}/version-000000001-{h}", f"{d},{LOG1},{LEN1}:{zero}")
    t.set(f"{R}/replay-a", f"{LOG2},{LEN2},0")
    t.set(f"{R}/replay-b", f"{LOG2},{LEN2},0")
    t.set(f"{R}/replay-c", f"{LOG1},2048,0")
    for h, pos in (("b", f"{LOG2},{LEN2}"), ("c", f"{LOG2},{LEN2}")):
        t.set(f"{R}/actual-{h}/fetch-pos", pos)
    (tmp_path / R / LOG2).write_bytes(b"\0" * LEN2)  # log 1 is deleted here
    fd = take_lock(tmp_path, "a")
    yield t
    os.close(fd)


def _render(t: Tree, *views: str, ascii: bool = False, width: int = 100, host: str = "a") -> str:
    snap = build(t.root, host)
    return plain(render(snap, findings(snap), Options(views=frozenset(views), ascii=ascii, width=width)))


def _block(text: str, heading: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(heading)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("---> ")), len(lines))
    return lines[start:end]


def test_history_draws_versions_per_node(tree):
    got = _block(_render(tree, "history"), "---> History <---")
    assert got == [
        "---> History <---",
        "   -> History Replay/Status of resource r",
        "║",
        "╠═══> Vers.000000001 ═══> log-000000001-a: old version, logfile is deleted",
        "║       ╠═══> Primary Node: a Check: 11111111 Size: 4096 bytes (4.0 KiB) ---> replay OK, verify OK",
        "║       ╠═══> Secondary Node: b Check: 11111111 Size: 4096 bytes (4.0 KiB) ---> replay OK, verify OK",
        ("║       ╚═══> Secondary Node: c Check: cccccccc Size: 4096 bytes (4.0 KiB) ---> replay at 2048 bytes, "
         "verify differs (split brain)"),
        "║",
        ("╚═══> Vers.000000002 ═══> Logfile log-000000002-a Size: 1024 bytes (1.0 KiB) by a "
         "(being written, no version yet)"),
        "        ╠═══> Primary Node: a Check: none Size: 1024 bytes (1.0 KiB) ---> replay OK, no version yet",
        "        ╠═══> Secondary Node: b Check: none Size: 1024 bytes (1.0 KiB) ---> replay OK, no version yet",
        "        ╚═══> Secondary Node: c Check: none Size: 1024 bytes (1.0 KiB) ---> replay pending, no version yet",
    ]
    ascii = _block(_render(tree, "history", ascii=True), "---> History <---")
    assert ascii[2:5] == ["|", "|--> Vers.000000001 --> log-000000001-a: old version, logfile is deleted",
                          ("|       |--> Primary Node: a Check: 11111111 Size: 4096 bytes (4.0 KiB) ---> replay OK, "
                           "verify OK")]
    assert ascii[-1].startswith("        `--> Secondary Node: c ")
    # The split brain is a verdict of the findings, shown as a TODO line with its remedy.
    out = _render(tree)
    assert ("---> TODO: r is in a split brain: from log 1 on, the designated primary's side, a, b, hold log 1 "
            "from a (digest 11111111)") in out
    assert ("   -> split brain from log 1 on: kept a, b (the designated primary's side, 1.0 KiB (a), 0 B (b) beyond "
            "the split point); diverged c (0 B beyond the split point)") in out
    assert "Transactions: TODO" in out


def test_progress_bars_adapt_to_width_and_show_rate_and_time_left(tree):
    tree.set(f"{R}/syncstatus-c", SIZE // 4)
    tree.set(f"{R}/actual-c/is-syncing", 1)  # a rate counts while the sync runs, as c reports it does
    tree.set(f"{R}/actual-c/amount-sync_rate", str(1 << 20))
    tree.set(f"{R}/actsize-a", 2 * SIZE)
    tree.set(f"{R}/actsize-b", 2 * SIZE)
    tree.set(f"{R}/actsize-c", 3 * SIZE)
    got = _block(_render(tree, "status", ascii=True, width=80), "---> Status <---")
    c = got.index("   -> c (Secondary)")
    assert got[c + 1] == ("      resize  [###.......]  33.33%  64.0 MiB of disk 192.0 MiB, resize gains up to "
                          "128.0 MiB")
    assert got[c + 2] == ("      sync    [##........]  25.00%  16.0 MiB of 64.0 MiB, rest 48.0 MiB, rate 1.0 MiB/s, "
                          "48 s left")
    assert got[c + 4].startswith("      replay  [####......]  40.00%") and "rate unknown" in got[c + 4]
    # A paused replay shows no rate: the last one published stays in the tree after it stopped.
    tree.set(f"{R}/todo-c/allow-replay", 0)
    tree.set(f"{R}/actual-c/amount-replay_rate", str(1 << 20))
    paused = _render(tree, "status", ascii=True, width=80)
    assert "      replay  [####......]  40.00%  2.0 KiB of 5.0 KiB, rest 3.0 KiB, paused" in paused
    assert re.search(r"Replay  : 2048 bytes \(2\.0 KiB\) now replayed, Todo 3072 bytes, completed 40\.00%, "
                     r"rest 3\.0 KiB, paused", paused), paused
    wide = _block(_render(tree, "status", width=200), "---> Status <---")
    assert "      sync    [" + "█" * 12 + "░" * 38 + "]  25.00%" in "\n".join(wide)
    # The resize hint comes from the findings; the device line says the disk is larger.
    out = _render(tree)
    assert "---> HINT: marsadm resize would increase resource r by 64.0 MiB (67108864 bytes), from 64.0 MiB to " \
           "128.0 MiB, the smallest member's disk; you are wasting 64.0 MiB on disk /images/a.img of a" in out
    assert "Device  : Disk-Device /images/c.img, resize possible (disk 192.0 MiB, 128.0 MiB more than the " \
           "resource)" in out


def test_bar_never_full_while_something_is_left():
    assert bar(0.999, 20, True) == "[" + "#" * 19 + "." + "]"
    assert bar(1.0, 10, False) == "[" + "█" * 10 + "]"
    assert bar(0.0, 10, False) == "[" + "░" * 10 + "]"
    assert bar(-1, 4, True) == "[....]" and bar(7, 4, True) == "[####]"


def test_render_styles_and_unknown_resource(tree):
    snap = build(tree.root, "a")
    fs = findings(snap)
    lines = render(snap, fs, Options())
    assert all(isinstance(s, Span) and s.style in STYLES for line in lines for s in line)
    todo = [line for line in lines if any(s.style == "todo" and s.text.startswith("---> TODO: ") for s in line)]
    assert todo
    lines = render(snap, fs, Options(resource="nosuch"))
    text = plain(lines)
    assert "-> resource nosuch does not exist; the resources are: r" in text and "check resource" not in text
    with pytest.raises(ValueError):
        Options(views=frozenset({"bogus"}))


def test_check_semantics_on_hand_written_trees(tree):
    snap = build(tree.root, "a")
    code, line = check(snap, findings(snap))  # the split brain of log 1
    assert code == 2 and line.startswith("MARS CRITICAL - 1 todo: SPLIT_BRAIN r: ")
    tree.set(f"{R}/version-000000001-c", tree.get(f"{R}/version-000000001-b"))
    tree.set(f"{R}/todo-c/allow-replay", 0)
    snap = build(tree.root, "a")
    code, line = check(snap, findings(snap))
    assert code == 1 and line.startswith("MARS WARNING - ") and "REPLAY_PAUSED r@c" in line
    assert line.endswith("todo=0 hint=2 work=0") or re.search(r"\| resources=1 nodes=3 nodes_alive=3 todo=0 hint=\d+ "
                                                                r"work=\d+$", line), line
    assert check(None, [], "x does not exist; do y") == (3, "MARS UNKNOWN - x does not exist; do y")
    assert check(snap, [], "permission denied")[0] == 3


def test_resize_in_progress_shows_the_new_region_per_member(tree):
    """After marsadm resize from 64 to 128 MiB: the primary serves the new size, b has synced a
    quarter of the new region, c's full sync is still below the old size (0 of the new region)."""
    tree.set(f"{R}/resize-from", SIZE)
    tree.set(f"{R}/size", 2 * SIZE)
    for h in "abc":
        tree.set(f"{R}/actsize-{h}", 2 * SIZE)
    tree.set(f"{R}/actual-a/size", 2 * SIZE)
    tree.set(f"{R}/syncstatus-a", 2 * SIZE)
    tree.set(f"{R}/syncstatus-b", SIZE + SIZE // 4)
    tree.set(f"{R}/syncstatus-c", SIZE // 2)
    got = _block(_render(tree, "status", ascii=True, width=80), "---> Status <---")
    a, b, c = (got.index(f"   -> {h} ({role})") for h, role in (("a", "Primary"), ("b", "Secondary"),
                                                                    ("c", "Secondary")))
    assert not got[a + 1].startswith("      resize")  # the primary has taken it up
    assert got[b + 1].startswith("      resize  [##........]  25.00%  16.0 MiB of 64.0 MiB"), got[b + 1]
    assert got[c + 1].startswith("      resize  [..........]   0.00%  0 B of 64.0 MiB"), got[c + 1]
    out = _render(tree)
    assert "Disk-Device /images/b.img, resize active (16.0 MiB of the new 64.0 MiB taken up)" in out
    assert "RESIZE_POSSIBLE" not in out and "resize would increase" not in out
