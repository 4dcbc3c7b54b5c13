"""Power loss: a node's whole disk forgets what it did not make durable, at any moment of its life.

Each node's MARS directory and data device (an image file) live on a lazyfs mount of their own
(tests/faults/lazyfs.py), which keeps file data only once fsynced and directory entries only once
their directory is fsynced. A cut SIGKILLs the node's marsd (a power loss kills every process),
drops everything not durable, optionally tearing an unsynced write, and starts marsd again on
what came back. What must hold after every cut:

* marsd starts on its own durable state (it never refuses it, never logs a traceback);
* every write acknowledged to the NBD client reads back, and a write in flight at the cut reads
  back wholly or not at all (tests/test_crash.py's recorder: Model, Req, CrashTest);
* the primary's data device equals the replay of its log (while no log was deleted);
* the secondary catches up and its device equals the primary's acknowledged content.

Cuts land after each marsadm command that changes a node's tree (create-cluster, join-cluster,
create-resource, join-resource, log-rotate, pause-/resume-replay, invalidate, log-delete-all),
during the secondary's sync, during its replay under load, and at random moments of the
primary's write load; every other one tears. Reproduce a failure with the seed in its message::

    MARS_POWER_SEED=<seed> python -m pytest tests/faults/test_fault_powerloss.py -x -s

``MARS_POWER_CUTS`` sets the number of random cuts under load (short: 3, `make torture`: 240).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from campaign import report, size  # noqa: E402
from harness import Node, caught_up, short_tempdir, start_pair, wait_until, write  # noqa: E402
from lazyfs import Mount  # noqa: E402
from mars.engine.log.files import scan_file  # noqa: E402
from mars.engine.log.format import Kind  # noqa: E402
from mars.engine.log.values import ReplayLink, first_record, log_name  # noqa: E402
from test_crash import DEV_SIZE, CrashTest, describe_sector, first_difference  # noqa: E402

CUTS = size(3, 240, "MARS_POWER_CUTS")


class Disk:
    """A node whose MARS directory (``<mount>/m``) and image (``<mount>/img``) are on one lazyfs."""

    def __init__(self, base: Path, host: str, ip: str) -> None:
        self.mount = Mount(base, f"d{host}")
        self.node = Node(base, host, ip)
        self.trace: list[str] = []  # the cuts and what each left (shared by the campaign's disks)
        self.node.mars_dir = self.mount.mnt / "m"
        self.img = self.mount.mnt / "img"
        self.cuts = 0
        self.torn = 0

    def power_cut(self, rng: random.Random | None = None, tear: bool = False) -> dict:
        Node.kill(self.node)  # the class's: a campaign step may stand in for the instance's
        before = self.positions()
        r = self.mount.cut(tear=rng.randrange(2**32) if tear and rng else None)
        self.cuts += 1
        self.torn += bool(r["torn"])
        self.trace.append(f"cut {self.node.host} #{self.cuts}: replay positions {before} -> {self.positions()}, "
                          f"torn {r['torn']}")
        return r

    def positions(self) -> dict:
        """What this node's tree says of every replay position (a failure's trace shows them)."""
        d = self.node.mars_dir / "resource-r"
        try:
            return {p.name: os.readlink(p) for p in sorted(d.glob("replay-*")) if p.is_symlink()}
        except OSError as e:
            return {"error": str(e)}


class Campaign:
    def __init__(self, base: Path, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.rng = random.Random(seed)
        self.disks: list[Disk] = []
        self.trace: list[str] = []
        self.step = "setup"
        self.t: CrashTest | None = None
        self.h = None
        self.logs_deleted = False
        self.prefix_checks = 0

    @property
    def step(self) -> str:
        return self._step

    @step.setter
    def step(self, name: str) -> None:
        self._step = name
        self.trace.append(f"step {name}")

    def disk(self, host: str, ip: str) -> Disk:
        d = Disk(self.base, host, ip)
        d.trace = self.trace
        self.disks.append(d)
        return d

    def tear(self) -> bool:
        return self.rng.random() < 0.5

    def close(self) -> None:
        for d in self.disks:
            d.node.kill()
        for d in self.disks:
            d.mount.close()

    # -- the primary's side --------------------------------------------------------------------

    def cut_primary(self, a: Disk) -> None:
        """A cut of the primary without load: its export comes back with everything acknowledged."""
        t = self.t
        a.power_cut(self.rng, self.tear())
        self.h = t.restart()
        self.check_primary()

    def cut_primary_under_load(self, a: Disk) -> None:
        t = self.t
        t.rnd += 1
        real_kill = a.node.kill

        def kill_and_cut() -> None:
            real_kill()
            a.power_cut(self.rng, self.tear())

        a.node.kill = kill_and_cut
        try:
            t.load_and_kill(self.h)
        finally:
            a.node.kill = real_kill
        self.h = t.restart()
        self.check_primary()

    def check_primary(self) -> None:
        t = self.t
        t.verify_readback(self.h)
        if not self.logs_deleted:
            t.verify_log_replay(full=True)
        t.check_marsd_log()

    # -- the secondary's side --------------------------------------------------------------------

    def cut_secondary_under_load(self, a: Disk, b: Disk) -> None:
        """b loses power while a writes and b fetches and replays; a's writes all complete."""
        t = self.t
        t.rnd += 1

        class Other:
            """Stands in for a in the load: its kill is b's power cut; a keeps serving."""

            def kill(_) -> None:
                b.power_cut(self.rng, self.tear())
                b.node.start()

            def log(_) -> str:
                return a.node.log()

            def __getattr__(_, name):
                return getattr(a.node, name)

        real = t.node
        t.node = Other()
        try:
            t.load_and_kill(self.h)
        finally:
            t.node = real
        t.verify_readback(self.h)
        self.check_secondary(a, b)

    def check_secondary(self, a: Disk, b: Disk, timeout: float = 90) -> None:
        try:
            wait_until(lambda: caught_up(a.node, b.node, "r"), timeout, f"b to catch up after step {self.step}")
        except AssertionError as e:
            e.add_note(self.describe(a, b))
            raise
        data = b.img.read_bytes()
        want = self.t.model.data
        if data != want:
            off = first_difference(want, data)
            e = AssertionError(f"after {self.step}: b's device differs from the acknowledged writes at {off}: "
                               f"b holds {describe_sector(data[off:off + 512])}, a acknowledged "
                               f"{describe_sector(want[off:off + 512])}")
            e.add_note(self.describe(a, b))
            raise e
        text = b.node.log_path.read_text(errors="replace")
        assert "Traceback" not in text, f"marsd b logged a traceback:\n{text[-6000:]}"

    def describe(self, *disks: Disk) -> str:
        out = ["the last steps and cuts:", *self.trace[-12:]]
        for d in disks:
            rdir = d.node.mars_dir / "resource-r"
            files = {p.name: (os.readlink(p) if p.is_symlink() else p.stat().st_size)
                     for p in sorted(rdir.iterdir()) if not p.is_dir()} if rdir.is_dir() else {}
            act = rdir / f"actual-{d.node.host}"
            acts = {p.name: os.readlink(p) for p in sorted(act.iterdir()) if p.is_symlink()} if act.is_dir() else {}
            out.append(f"--- {d.node.host}: {files}\n    actual: {acts}\n{d.node.log()[-3000:]}")
        return "\n".join(out)

    def check_prefix(self, a: Disk, b: Disk) -> None:
        """With b's replay paused and settled: b's device is the replay of a's log up to b's replay
        position, a record boundary (a write-order prefix of what a acknowledged)."""
        wait_until(lambda: b.node.tree_value("resource-r/actual-b/is-replaying") == "0", 30, "b's replay to stop")
        link = ReplayLink.parse(b.node.tree_value("resource-r/replay-b"))
        image = bytearray(DEV_SIZE)
        rdir = a.node.mars_dir / "resource-r"
        for seq in range(1, link.seq + 1):
            end = link.pos if seq == link.seq else None

            def on(d, end=end) -> None:
                if end is None or d.offset < end:
                    r = d.record
                    image[r.offset:r.offset + r.length] = r.payload if r.kind == Kind.WRITE else bytes(r.length)

            res = scan_file(rdir / log_name(seq, "a"), 0, first_record(seq), on)
            assert res.error is None, f"a's log {seq} does not scan: {res.error}"
            if end is not None:
                assert res.end >= end, f"b replayed {seq} to {end}, a's log has only {res.end} bytes"
        data = b.img.read_bytes()
        if data != image:
            off = first_difference(image, data)
            raise AssertionError(f"after {self.step}: b's device is not a's log replayed to {link} at {off}: b "
                                 f"holds {describe_sector(data[off:off + 512])}, the log says "
                                 f"{describe_sector(image[off:off + 512])}")
        self.prefix_checks += 1

    def cut_secondary(self, a: Disk, b: Disk) -> None:
        b.power_cut(self.rng, self.tear())
        b.node.start()
        self.check_secondary(a, b)


def run_campaign(c: Campaign, cuts: int) -> None:
    rng = c.rng
    a = c.disk("a", "127.0.0.2")
    b = c.disk("b", "127.0.0.3")
    na, nb = a.node, b.node

    c.step = "create-cluster"
    na.create_cluster()
    a.power_cut()
    na.start()

    c.step = "join-cluster"
    nb.join_cluster(na)
    b.power_cut()
    nb.start()

    c.step = "create-resource"
    na.marsadm("create-resource", "r", str(a.img), str(DEV_SIZE))
    c.t = CrashTest(na, a.img, rng)
    c.t.rnd = 0
    c.cut_primary(a)
    # The load's log replay asserts the origin of every file is a.

    c.step = "join-resource"
    wait_until(lambda: nb.tree_value("resource-r/size") is not None, 30, "b to learn r")
    nb.marsadm("join-resource", "r", str(b.img), "--create")
    c.cut_secondary(a, b)

    c.step = "load, cut a"
    c.cut_primary_under_load(a)

    c.step = "log-rotate"
    na.marsadm("log-rotate", "r")
    c.cut_primary(a)
    c.check_secondary(a, b)

    c.step = "load, cut b (fetch and replay)"
    c.cut_secondary_under_load(a, b)

    c.step = "pause-replay"
    nb.marsadm("pause-replay", "r")
    c.check_prefix(a, b)
    b.power_cut(rng, c.tear())
    nb.start()
    c.step = "resume-replay"
    nb.marsadm("resume-replay", "r")
    c.cut_secondary(a, b)

    c.step = "invalidate"
    nb.marsadm("invalidate", "r")
    c.cut_secondary(a, b)

    c.step = "invalidate, cut during the sync"
    nb.marsadm("invalidate", "r")
    time.sleep(rng.uniform(0, 0.5))  # poll: a random moment of the sync, deliberately (not a synchronisation)
    c.cut_secondary(a, b)

    for i in range(cuts):
        if i % 3 == 2:
            c.step = f"random cut {i}: b under load"
            c.cut_secondary_under_load(a, b)
        else:
            c.step = f"random cut {i}: a under load"
            c.cut_primary_under_load(a)
            if rng.random() < 0.2:
                c.step = f"random cut {i}: log-rotate"
                na.marsadm("log-rotate", "r")
        if i % 4 == 3:
            c.check_secondary(a, b)
        if i % 5 == 4:
            c.step = f"random cut {i}: b paused"
            nb.marsadm("pause-replay", "r")
            c.check_prefix(a, b)
            nb.marsadm("resume-replay", "r")

    c.step = "log-delete-all"
    c.check_secondary(a, b)
    na.marsadm("log-delete-all", "r")
    c.logs_deleted = True
    c.cut_primary(a)
    c.check_secondary(a, b)


@pytest.mark.timeout(3600)
def test_power_loss_campaign():
    seed = int(os.environ.get("MARS_POWER_SEED", random.SystemRandom().randrange(2**32)))
    base = short_tempdir()
    c = Campaign(base, seed)
    t0 = time.monotonic()
    try:
        run_campaign(c, CUTS)
    except BaseException as e:
        e.add_note(f"power loss campaign: seed {seed}, at step {c.step!r}; reproduce with MARS_POWER_SEED={seed} "
                   f"python -m pytest tests/faults/test_fault_powerloss.py -x -s")
        raise
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)
    s = c.t.stats
    report("power loss", cuts=sum(d.cuts for d in c.disks), torn_cuts=sum(d.torn for d in c.disks),
           acked_writes=s.acked, prefix_checks=c.prefix_checks, in_flight_at_cuts=s.in_flight_at_kill, lost=0, seed=seed,
           time=f"{time.monotonic() - t0:.0f} s")


@pytest.mark.timeout(300)
def test_cluster_setup_survives_a_cut_after_each_command():
    """Regressions, each a cut at one exact point of a cluster's first minutes.

    * after ``create-cluster``: the tree's directories were never synced into their parents, so
      the whole tree vanished and marsd refused to start ("holds no cluster");
    * after ``join-cluster`` (b) and after a learned b: entries taken from a peer were never
      synced, so each node forgot the other's address (``ips/``) and neither could pull again;
    * after ``create-resource``: the new image file was never synced, so marsd found the tree
      naming a data device that did not exist.
    """
    base = short_tempdir()
    c = Campaign(base, 0)
    try:
        a = c.disk("a", "127.0.0.2")
        b = c.disk("b", "127.0.0.3")
        a.node.create_cluster()
        a.power_cut()
        assert a.node.tree_value("uuid") is not None, "the cluster is gone after a cut after create-cluster"
        a.node.start()
        b.node.join_cluster(a.node)
        b.power_cut()
        assert b.node.tree_value("ips/ip-a") == a.node.ip, "b forgot a's address, learned at join-cluster"
        b.node.start()
        wait_until(lambda: a.node.tree_value("ips/ip-b") is not None, 30, "a to learn b's address")
        a.power_cut()
        assert a.node.tree_value("ips/ip-b") == b.node.ip, "a forgot b's address, learned from b"
        a.node.start()
        a.node.marsadm("create-resource", "r", str(a.img), str(DEV_SIZE))
        a.power_cut()
        assert a.img.stat().st_size == DEV_SIZE, "the image made by create-resource is gone or short"
        a.node.start()
        a.node.wait_value("resource-r/actual-a/is-primary", "1", 30)
    finally:
        c.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(300)
def test_fetch_waiting_at_a_starting_primary_goes_on_when_it_attaches():
    """Regression: a fetch that reached the primary before its runtime was there waited 2 min.

    Found by the campaign: after a power cut of the primary, b's fetcher asked the restarted marsd
    for the rest of a log file while recovery still ran. With no runtime nothing was servable,
    so the request long-polled on the resource's pulse, and with no write coming nothing fired
    it: b stood still for the whole poll (120 s). Here the window is held open deterministically:
    a's image is away at its start, so its attach fails and the peer services answer without a
    runtime; once the image is back and the attach retried, b must go on at once.
    """
    base = short_tempdir()
    nodes: list[Node] = []
    try:
        a, b = Node(base, "a", "127.0.0.2"), Node(base, "b", "127.0.0.3")
        nodes += [a, b]
        a.create_cluster()
        a.start()
        b.join_cluster(a)
        b.start()
        img_a, img_b = base / "a.img", base / "b.img"
        a.marsadm("create-resource", "r", str(img_a), "8M")
        wait_until(lambda: b.tree_value("resource-r/size") is not None, 30, "b to learn r")
        b.marsadm("join-resource", "r", str(img_b), "--create")
        write(a, "write -P 0x11 0 1M")
        wait_until(lambda: caught_up(a, b, "r"), 60, "b to catch up")
        b.marsadm("pause-fetch", "r")
        write(a, "write -P 0x22 1M 1M")  # b is behind by this
        a.kill()
        os.rename(img_a, base / "a.away")
        a.start()
        wait_until(lambda: a.tree_value("resource-r/actual-a/msg-err-attach") is not None, 30, "a's attach to fail")
        b.marsadm("resume-fetch", "r")
        # b's fetch has reached a (no error on it) and waits there for bytes a cannot serve yet.
        wait_until(lambda: b.tree_value("resource-r/actual-b/fetch-source") == "a"
                   and b.tree_value("resource-r/actual-b/msg-warn-fetch") is None
                   and b.tree_value("resource-r/actual-b/is-copying") == "1", 30, "b to fetch from a")
        time.sleep(2)  # poll: time for the request to settle into its long poll (too short only weakens the test)
        os.rename(base / "a.away", img_a)
        a.marsadm("--no-wait", "attach", "r")  # its wait could read the old failure before marsd retried
        t0 = time.monotonic()
        wait_until(lambda: caught_up(a, b, "r"), 30, "b to go on fetching once a attached (the long poll ended)")
        assert time.monotonic() - t0 < 30
    finally:
        for n in nodes:
            n.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(300)
def test_secondary_goes_on_after_its_unsynced_log_copy_came_back_as_zeros():
    """Regression: a torn power cut left b's log copy with zeros at its start; the fetch stopped.

    Found by the campaign (a cut of b with tearing): b never fsyncs its copies (the primary keeps
    the file), so the cut may keep a later part of an unsynced range and leave zeros before it.
    The fetcher took that for damage ("bad start magic") and stopped for good. The copy is cut
    at its first bad record and fetched again, as a torn tail is.
    """
    base = short_tempdir()
    nodes: list[Node] = []
    try:
        a, b = Node(base, "a", "127.0.0.2"), Node(base, "b", "127.0.0.3")
        nodes += [a, b]
        a.create_cluster()
        a.start()
        b.join_cluster(a)
        b.start()
        a.marsadm("create-resource", "r", str(base / "a.img"), "8M")
        wait_until(lambda: b.tree_value("resource-r/size") is not None, 30, "b to learn r")
        b.marsadm("join-resource", "r", str(base / "b.img"), "--create")
        write(a, "write -P 0x11 0 1M")
        wait_until(lambda: caught_up(a, b, "r"), 60, "b to catch up")
        b.kill()
        copy = max((b.mars_dir / "resource-r").glob("log-*-a"))
        with open(copy, "r+b") as f:  # what a torn cut of an unsynced copy may leave
            f.write(bytes(8192))
        write(a, "write -P 0x22 1M 1M")
        b.start()
        wait_until(lambda: caught_up(a, b, "r"), 60, "b to go on after its damaged copy")
        assert "fetch stopped" not in b.log()
    finally:
        for n in nodes:
            n.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(300)
def test_primary_serves_after_a_cut_left_zeros_before_a_surviving_tail():
    """Regression: a torn power cut left a hole of zeros in the primary's newest log, then bytes of
    a later unsynced append; recovery called it damage ("bad start magic") and served nothing.
    Nothing after the hole was acknowledged (the fdatasync before any acknowledgement would have
    made the hole durable too), so it is cut as a torn tail and the acknowledged write reads back."""
    import nbd
    from test_crash import pattern
    base = short_tempdir()
    nodes: list[Node] = []
    try:
        (a,) = [Node(base, "a", "127.0.0.2")]
        nodes.append(a)
        a.create_cluster()
        a.start()
        a.marsadm("create-resource", "r", str(base / "a.img"), "8M")
        h = nbd.NBD()
        h.connect_uri(a.uri("r"))
        acked = pattern(0, 1, 0, 8)
        h.pwrite(acked, 0)
        h.shutdown()
        del h
        a.kill()
        log1 = max((a.mars_dir / "resource-r").glob("log-*-a"))
        with open(log1, "ab") as f:  # a hole, then part of a later append that reached the disk
            f.write(bytes(4096) + b"MARSLOG\x00" + bytes(500))
        a.start()
        a.wait_value("resource-r/actual-a/is-primary", "1", 30)
        h = nbd.NBD()
        h.connect_uri(a.uri("r"))
        assert h.pread(len(acked), 0) == acked
        h.shutdown()
        assert "replay stopped" not in a.log()
    finally:
        for n in nodes:
            n.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.timeout(300)
def test_a_node_takes_its_own_replay_position_from_its_own_disk_never_from_a_peer():
    """Regression, found by the campaign (seed 3080519134, step resume-replay, 1 run in 5).

    A power cut sent b's replay position back (it was written without a directory sync) while a
    kept b's newer one. b restarted and replayed from its older position; a sync of the device
    in the middle of that made the re-applied, older state of some blocks durable, and another
    cut came. b then took a's copy of its position (the newer stamp won), skipped every record
    up to it, and called itself caught up with writes missing. Here the state the cuts left is
    made directly: b's position back at the file's start with an older stamp than a's copy,
    and b's device without the writes. b must keep its own position (and a take it), then
    replay from it.
    """
    from mars.engine.tree import Tree

    base = short_tempdir()
    nodes: list[Node] = []
    try:
        a, b = start_pair(base, nodes, "8M")
        write(a, "write -P 0x5a 0 4M")
        wait_until(lambda: caught_up(a, b, "r"), 60, "b to catch up")
        end = b.tree_value("resource-r/replay-b")
        wait_until(lambda: a.tree_value("resource-r/replay-b") == end, 30, "a to learn b's position")
        b.marsadm("pause-replay", "r")
        b.kill()
        link = ReplayLink.parse(end)
        start = str(ReplayLink(link.seq, link.origin, 0, 0))
        theirs = os.lstat(a.mars_dir / "resource-r" / "replay-b").st_mtime_ns
        Tree(b.mars_dir, "b").set("resource-r/replay-b", start, stamp_ns=theirs - 1)
        with open(base / "b.img", "r+b") as f:
            f.write(bytes(4 << 20))  # what the cuts left of the device: the writes are gone
        b.start()

        def agreed() -> bool:
            return a.tree_value("resource-r/replay-b") == b.tree_value("resource-r/replay-b")
        wait_until(agreed, 30, f"a and b to agree on b's replay position (b's own: {start})")
        assert b.tree_value("resource-r/replay-b") == start, \
            f"b took a peer's copy of its own replay position ({end}) over its own ({start})"
        b.marsadm("resume-replay", "r")
        wait_until(lambda: caught_up(a, b, "r"), 60, "b to replay from its own position")
        assert (base / "b.img").read_bytes() == (base / "a.img").read_bytes(), "b's device misses replayed writes"
    finally:
        for n in nodes:
            n.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("where", ["start", "end"])
@pytest.mark.timeout(300)
def test_a_copy_a_cut_took_whole_is_fetched_again(where):
    """Regression, found by the campaign: a copy's directory entry is not synced, so a cut can
    take a whole copy while a later one survives. Only short copies were fetched again: replay
    standing at the start of the lost file waited for it for ever, and replay standing at its
    end (its position durable, the file's version entry not yet written) could not digest it
    to move on. b here loses its copy of log 2 of 3 and that file's version entry, with its
    position at the start (or the end) of log 2 and its device without what came after it."""
    from mars.engine.tree import Tree

    base = short_tempdir()
    nodes: list[Node] = []
    try:
        a, b = start_pair(base, nodes, "8M")
        for n, pattern in enumerate((0x11, 0x22, 0x33)):
            write(a, f"write -P {pattern} {n}M 1M")
            if n < 2:
                a.marsadm("log-rotate", "r")
        wait_until(lambda: caught_up(a, b, "r"), 60, "b to catch up")
        b.marsadm("pause-replay", "r")
        b.kill()
        rdir = b.mars_dir / "resource-r"
        two = rdir / log_name(2, "a")
        size = two.stat().st_size
        two.unlink()
        t = Tree(b.mars_dir, "b")
        t.delete("resource-r/version-000000002-b")
        t.set("resource-r/replay-b", str(ReplayLink(2, "a", 0 if where == "start" else size, 0)))
        lost = (1 << 20) if where == "start" else (2 << 20)  # the device holds the replay up to its position
        with open(base / "b.img", "r+b") as f:
            f.seek(lost)
            f.write(bytes((3 << 20) - lost))
        b.start()
        b.marsadm("resume-replay", "r")
        wait_until(lambda: caught_up(a, b, "r"), 60, "b to fetch the lost copy again and replay on")
        assert (base / "b.img").read_bytes() == (base / "a.img").read_bytes(), "b's device misses replayed writes"
        assert "fetching it again" in b.log()
    finally:
        for n in nodes:
            n.kill()
        shutil.rmtree(base, ignore_errors=True)
