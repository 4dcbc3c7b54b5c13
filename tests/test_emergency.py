"""Emergency mode: the MARS directory of the primary runs full under a write load through NBD.

The primary's /mars is a real small ext4 (a loop-mounted image the test makes and removes), so
statvfs, ENOSPC and the levels are the kernel's, not a simulation. An acknowledged-write recorder
(python3-libnbd, synchronous writes of whole 64 KiB blocks with a distinct pattern each) knows
what every block must read afterwards. What must hold at every level:

* each level is reached in turn, shown in the tree (``actual-a/emergency``) and by the model;
* at the last level writes go on and are acknowledged, though the log cannot take them;
* every acknowledged write reads back on the primary;
* after space is back, logging goes on in a new log file, and the secondaries converge to
  byte-identical by copying only the dirty-region map's regions (they read nothing of their
  own device; the primary reads about what they copy, far below the device size);
* also when the log meets ENOSPC in the middle of a batch (no limits at all), and when the
  directory runs full during a secondary's sync;
* no marsd crashes, no traceback in any log.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import nbd  # python3-libnbd
import pytest

from harness import Node, caught_up, log_end, run, sha256, short_tempdir, wait_until
from mars.engine import model
from mars.engine.tree import Tree

MiB = 1 << 20
BLOCK = 64 << 10
SIZE = 64 * MiB

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/loop-control"),
                                reason="a loop-mounted filesystem needs root and the kernel's loop devices")


@contextlib.contextmanager
def small_fs(base: Path, size_mib: int) -> Iterator[Path]:
    """An ext4 of ``size_mib`` MiB, loop-mounted at base/small; unmounted and removed at the end."""
    img, mnt = base / "small.img", base / "small"
    mnt.mkdir()
    run(["truncate", "-s", f"{size_mib}M", str(img)])
    run(["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", str(img)])
    run(["mount", "-o", "loop", str(img), str(mnt)])
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class Recorder:
    """Writes whole blocks through NBD and remembers what each acknowledged one must read."""

    def __init__(self, node: Node, rng: random.Random, blocks: int = SIZE // BLOCK) -> None:
        self.h = nbd.NBD()
        self.h.connect_uri(node.uri("r"))
        self.rng = rng
        self.blocks = blocks
        self.acked: dict[int, bytes] = {}
        self.count = 0

    def write(self, nbytes: int, lo: int = 0, hi: int | None = None) -> int:
        """Whole blocks, at least one: returns the bytes written (and acknowledged)."""
        n = max(1, nbytes // BLOCK)
        for _ in range(n):
            b = self.rng.randrange(lo, hi if hi is not None else self.blocks)
            self.count += 1
            data = (b.to_bytes(8, "little") + self.count.to_bytes(8, "little")) * (BLOCK // 16)
            self.h.pwrite(data, b * BLOCK)  # returns once acknowledged: an error raises
            self.acked[b] = data
        return n * BLOCK

    def write_until(self, nbytes: int, cond, timeout: float, what: str) -> None:
        """Write ``nbytes`` at a time until ``cond`` holds: the load itself is what moves the state."""
        wait_until(lambda: self.write(nbytes) and cond(), timeout, what, interval=0)

    def verify(self) -> None:
        for b, data in sorted(self.acked.items()):
            got = self.h.pread(BLOCK, b * BLOCK)
            assert got == data, f"block {b} (offset {b * BLOCK}) does not read back what was acknowledged"

    def close(self) -> None:
        self.h.shutdown()


def level(n: Node) -> int:
    v = n.tree_value(f"actual-{n.host}/emergency")
    return int(v) if v else 0


def set_limits(n: Node, step: int) -> None:
    t = Tree(n.mars_dir, n.host)
    for i in (1, 2, 3, 4):
        t.set(f"defaults-{n.host}/required-free-space-{i}", step)


def ballast_to(mnt: Path, rest: int) -> Path:
    """A file that leaves ``rest`` bytes free on the filesystem."""
    path = mnt / "ballast"
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize + (path.stat().st_blocks * 512 if path.exists() else 0)
    path.unlink(missing_ok=True)
    run(["fallocate", "-l", str(max(4096, free - rest)), str(path)])
    return path


def own_logs(n: Node) -> list[Path]:
    return sorted((n.mars_dir / "resource-r").glob("log-*-a"))


@pytest.fixture
def cluster(request):
    """a primary of r, b and c secondaries; the MARS directory of ``request.param`` (default a)
    on the small filesystem."""
    small_host = getattr(request, "param", "a")
    base = short_tempdir()
    nodes: list[Node] = []
    logs: dict[str, str] = {}
    try:
        with small_fs(base, 96) as mnt:
            a, b, c = Node(base, "a", "127.0.0.2"), Node(base, "b", "127.0.0.3"), Node(base, "c", "127.0.0.4")
            nodes += [a, b, c]
            for n in nodes:
                if n.host == small_host:
                    n.mars_dir = mnt / n.host
            a.create_cluster()
            a.start()
            for n in (b, c):
                n.join_cluster(a)
                n.start()
            run(["truncate", "-s", str(SIZE), str(base / "a.img")])
            a.marsadm("create-resource", "r", str(base / "a.img"), str(SIZE))
            for n in (b, c):
                wait_until(lambda n=n: n.tree_value("resource-r/size") is not None, 20, f"{n.host} to learn r")
                n.marsadm("join-resource", "r", str(base / f"{n.host}.img"), "--create")
            wait_until(lambda: caught_up(a, b, "r") and caught_up(a, c, "r"), 60, "b and c to sync")
            try:
                yield base, mnt, a, b, c
                logs = {n.host: n.log() for n in nodes}
            finally:
                for n in nodes:
                    n.kill()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for host, text in logs.items():
        assert "Traceback" not in text, f"marsd {host}:\n{text}"


def converge_and_compare(base: Path, rec: Recorder, a: Node, *secs: Node, timeout: float = 60) -> None:
    """The end of every case: the secondaries converge, every acknowledged write reads back on
    the primary, and every secondary's image is byte-identical to the primary's."""
    wait_converged(a, *secs, timeout=timeout)
    rec.verify()
    rec.close()
    for s in secs:
        assert sha256(base / "a.img") == sha256(base / f"{s.host}.img"), f"{s.host} differs from a"


def converged(a: Node, *secs: Node) -> bool:
    return all(caught_up(a, s, "r") for s in secs)


def wait_converged(a: Node, *secs: Node, timeout: float = 60) -> None:
    try:
        wait_until(lambda: converged(a, *secs), timeout, "the secondaries to converge")
    except AssertionError as e:
        state = {s.host: {k: s.tree_value(f"resource-r/{k}-{s.host}") for k in ("replay", "syncstatus")}
                 for s in secs}
        files = {n.host: sorted((p.name, p.stat().st_size) for p in (n.mars_dir / "resource-r").glob("log-*"))
                 for n in (a, *secs)}
        raise AssertionError(f"{e}: files {files}; a's log ends at {log_end(a, 'r')}, writethrough "
                             f"{a.tree_value('resource-r/writethrough-a')}; {state}\n"
                             + "\n".join(f"--- {n.host} ---\n{n.log()[-3000:]}" for n in (a, *secs))) from None


def test_each_level_in_turn_then_writethrough_and_a_resync_of_the_dirty_regions_only(cluster):
    base, mnt, a, b, c = cluster
    step = 8 * MiB
    set_limits(a, step)
    ballast = ballast_to(mnt, 4 * step + 6 * MiB)
    wait_until(lambda: level(a) == 0 and a.tree_value("actual-a/emergency-limits") == ",".join([str(step)] * 4),
               10, "a to take the limits")
    rec = Recorder(a, random.Random(15))
    seen = []
    for want in (1, 2, 3, 4):
        # Write until this level shows: 1 MiB at a time, so no level is skipped between two rounds.
        rec.write_until(MiB, lambda: level(a) >= want, 60, f"level {want}")
        seen.append(level(a))
        view = a.marsadm("view-is-emergency", "r").stdout.strip()
        assert view == ("1" if seen[-1] == 4 else "0"), f"view-is-emergency at level {seen[-1]}: {view}"
        # The one findings function says it, for every face: the level and what it does.
        found = {f.code: f for f in model.findings(model.build(a.mars_dir, "a")) if f.node == "a"}
        code = "EMERGENCY" if seen[-1] == 4 else "SPACE_LOW"
        assert code in found and f"level {seen[-1]} of 4" in found[code].text, (want, found)
        assert "log-delete-all all" in found[code].remedy
    assert seen == [1, 2, 3, 4], f"levels seen in turn: {seen}"
    wait_until(lambda: (a.tree_value("resource-r/writethrough-a") or "").endswith(":0"), 10, "a to write through")
    last = int(a.tree_value("resource-r/writethrough-a").split(":")[0])
    log_size = own_logs(a)[-1].stat().st_size
    # More than the free space is left: the log could not take it, the device does.
    rest = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    through = rec.write(rest + 8 * MiB, hi=SIZE // BLOCK // 2)
    assert own_logs(a)[-1].stat().st_size == log_size, "the log grew while writing through"
    wait_until(lambda: int(a.tree_value("resource-r/actual-a/writethrough-bytes")) >= through, 10,
               "a to report what it wrote through")
    rec.verify()
    # What the original refuses against a node in emergency mode, with the reason and the remedy.
    wait_until(lambda: b.tree_value("actual-a/emergency") == "4", 10, "b to learn a's level")
    for cmd in (["invalidate", "r"], ["primary", "r"]):
        r = b.marsadm(*cmd, check=False)
        assert r.returncode != 0 and "emergency mode" in r.stderr and "log-delete-all" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    # The secondaries stop at the end of the last logged file: consistent, older.
    end = f"log-{last:09d}-a,{log_size},0"
    for s in (b, c):
        s.wait_value(f"resource-r/replay-{s.host}", end, 20)
    # Space back: the level comes down one step per round; logging goes on in a new file.
    ballast.unlink()
    wait_until(lambda: level(a) == 0, 20, "a to leave emergency mode")
    wait_until(lambda: a.tree_value("resource-r/writethrough-a") == f"{last}:{last + 1}", 10, "the log to go on")
    rec.write(2 * MiB, lo=SIZE // BLOCK // 2)  # logged again
    assert (a.mars_dir / "resource-r" / f"log-{last + 1:09d}-a").stat().st_size > 0
    dirty = int(a.tree_value("resource-r/actual-a/dirty-bytes"))
    converge_and_compare(base, rec, a, b, c)
    for s in (b, c):
        assert s.tree_value(f"resource-r/actual-{s.host}/sync-kind") == "dirty-map"
        copied = int(s.tree_value(f"resource-r/actual-{s.host}/sync-copied-bytes"))
        assert 0 < copied <= dirty < SIZE * 0.7, f"{s.host} copied {copied} of {dirty} dirty bytes"
        assert s.tree_value(f"resource-r/actual-{s.host}/sync-read-bytes") == "0", "the resync read its own device"
    served = int(a.tree_value("resource-r/actual-a/sync-served-bytes"))
    assert served <= 2 * dirty + SIZE * 0.05, f"a read {served} bytes for syncs"
    print(f"\nemergency resync: {dirty / MiB:.1f} MiB dirty of {SIZE / MiB:.0f} MiB; "
          f"b copied {int(b.tree_value('resource-r/actual-b/sync-copied-bytes')) / MiB:.1f} MiB, read 0 B of its "
          f"own device; a read {served / MiB:.1f} MiB for both syncs")
    # Every member resynced: the map goes, the next emergency starts afresh.
    wait_until(lambda: a.tree_value("resource-r/writethrough-a") is None, 20, "the map to be cleared")


def test_enospc_in_the_middle_of_a_batch_writes_through_without_an_error(cluster):
    base, mnt, a, b, c = cluster
    set_limits(a, 0)  # no levels at all: only ENOSPC tells
    wait_until(lambda: a.tree_value("actual-a/emergency-limits") == "0,0,0,0", 10, "a to take the limits")
    ballast = ballast_to(mnt, 3 * MiB)
    rec = Recorder(a, random.Random(16))
    rec.write(12 * MiB)  # the log meets ENOSPC on the way: no write may fail
    wait_until(lambda: a.tree_value("resource-r/writethrough-a") is not None, 10, "the switch to be recorded")
    rec.verify()
    assert "emergency mode" in a.log()
    ballast.unlink()
    wait_until(lambda: (a.tree_value("resource-r/writethrough-a") or ":0").split(":")[1] != "0", 20,
               "a to log again")
    rec.write(MiB)
    converge_and_compare(base, rec, a, b, c)


def test_mars_directory_runs_full_during_a_sync(cluster):
    base, mnt, a, b, c = cluster
    step = 8 * MiB
    set_limits(a, step)
    rec = Recorder(a, random.Random(17))
    rec.write(8 * MiB)
    c.marsadm("pause-sync", "r")
    c.marsadm("invalidate", "r")  # c syncs the whole device again, once resumed
    ballast = ballast_to(mnt, step // 2)
    wait_until(lambda: level(a) == 4, 10, "a at the last level")
    rec.write(4 * MiB)  # written through
    c.marsadm("resume-sync", "r")
    # The primary refuses syncs at the last level: c's sync stays where it was, and says why.
    wait_until(lambda: "emergency mode" in (c.tree_value("resource-r/actual-c/msg-warn-sync") or c.log()), 20,
               "c's sync to be refused")
    assert int(c.tree_value("resource-r/syncstatus-c") or 0) < SIZE
    ballast.unlink()
    converge_and_compare(base, rec, a, b, c, timeout=90)


def test_following_the_emergency_remedy_frees_space_and_a_join_waits_for_it(cluster):
    """No ballast: the logs themselves fill /mars. The EMERGENCY finding names the remedy; doing
    what it says (log-delete-all on the primary) frees the space, and the rest happens by itself."""
    base, mnt, a, b, c = cluster
    a.stop()
    a.extra_args = ["--logrot-auto", "4M"]  # as a cron'd log-rotate would: logs that can be deleted
    a.start()
    set_limits(a, 8 * MiB)
    d = Node(base, "d", "127.0.0.5")
    d.join_cluster(a)
    d.start()
    try:
        rec = Recorder(a, random.Random(18))
        rec.write_until(4 * MiB, lambda: level(a) == 4, 120, "the logs to fill /mars")
        rec.write(4 * MiB)  # written through
        snap = model.build(a.mars_dir, "a")
        found = [f for f in model.findings(snap) if f.code == "EMERGENCY"]
        assert found and found[0].node == "a" and "written through" in found[0].text, found
        assert "'marsadm log-delete-all all' on a" in found[0].remedy, found[0].remedy
        wait_until(lambda: d.tree_value("actual-a/emergency") == "4", 10, "d to learn a's level")
        r = d.marsadm("join-resource", "r", str(base / "d.img"), "--create", check=False)
        assert r.returncode != 0 and "emergency mode" in r.stderr, r.stderr
        assert d.tree_value("resource-r/data-d") is None, "the refused join registered d"
        # The remedy, as the finding says it.
        a.marsadm("log-delete-all", "all")
        wait_until(lambda: level(a) == 0, 30, "a to leave emergency mode")
        rec.write(MiB)
        converge_and_compare(base, rec, a, b, c)
        d.marsadm("join-resource", "r", str(base / "d.img"), "--create")
        wait_converged(a, d)
    finally:
        d.kill()


def test_a_crash_while_writing_through_loses_nothing_acknowledged(cluster):
    """SIGKILL in emergency mode: the restarted primary goes on writing through (its log stopped
    at the same place), every acknowledged write reads back, and the resync still converges."""
    base, mnt, a, b, c = cluster
    set_limits(a, 8 * MiB)
    ballast = ballast_to(mnt, 4 * MiB)
    rec = Recorder(a, random.Random(19))
    rec.write(8 * MiB)
    wait_until(lambda: (a.tree_value("resource-r/writethrough-a") or "").endswith(":0"), 10, "a to write through")
    entry = a.tree_value("resource-r/writethrough-a")
    rec.write(4 * MiB)
    rec.h = None  # the connection dies with marsd
    a.kill()
    a.start()
    rec.h = nbd.NBD()
    wait_until(lambda: _connects(rec, a), 30, "a to serve again")
    rec.verify()
    assert a.tree_value("resource-r/writethrough-a") == entry, "the restart moved the gap"
    rec.write(4 * MiB)  # still written through
    wait_until(lambda: int(a.tree_value("resource-r/actual-a/writethrough-bytes") or 0) >= 4 * MiB, 10,
               "a to write through after the restart")
    ballast.unlink()
    wait_until(lambda: level(a) == 0, 20, "a to leave emergency mode")
    rec.write(MiB)
    converge_and_compare(base, rec, a, b, c)


def _connects(rec: Recorder, a: Node) -> bool:
    try:
        rec.h.connect_uri(a.uri("r"))
        return True
    except nbd.Error:
        rec.h = nbd.NBD()
        return False


@pytest.mark.parametrize("cluster", ["b"], indirect=True)
def test_a_secondary_frees_its_replayed_log_copies_and_stops_fetching_when_full(cluster):
    """b's MARS directory is the small one: its copies of a's logs fill it. At level 2 it deletes
    the copies it has replayed, at level 4 it stops fetching instead of running into ENOSPC, and
    it catches up once it has room again."""
    base, mnt, a, b, c = cluster
    a.stop()
    a.extra_args = ["--logrot-auto", "4M"]
    a.start()
    set_limits(b, 8 * MiB)
    ballast = ballast_to(mnt, 4 * 8 * MiB + 4 * MiB)
    b.marsadm("pause-replay", "r")  # nothing replayed: nothing b may delete, so it fills up
    rec = Recorder(a, random.Random(20))
    rec.write_until(2 * MiB, lambda: level(b) == 4, 120, "b's copies to fill its MARS directory")
    wait_until(lambda: b.tree_value("resource-r/actual-b/is-copying") == "0", 10, "b to stop fetching")
    copies = len(list((b.mars_dir / "resource-r").glob("log-*-a")))
    b.marsadm("resume-replay", "r")  # replayed copies become deletable: level 2 deletes them
    wait_until(lambda: "deleted" in (b.tree_value("resource-r/actual-b/msg-warn-space-low") or ""), 30,
               "b to delete replayed copies")
    ballast.unlink()
    converge_and_compare(base, rec, a, b, c, timeout=90)
    assert len(list((b.mars_dir / "resource-r").glob("log-*-a"))) < copies + 10
    assert "No space left" not in b.log(), b.log()
