"""Role switching on real three-node clusters: handover, forced failover, split brain and its resolution.

Named after the original MARS test suite (test_suite/…/switch2primary and friends); each test
writes through NBD with a client that records which writes were acknowledged, and checks them
where they must be:

* ``test_switch2primary``: a planned handover under a write load stopped just before it; every
  acknowledged write reads back on the new primary, the old primary and the third node become
  byte-identical to it without a sync, and the old primary stopped serving before the new one
  started. Then a handover while a client still writes (refused without --force; with --force
  the old primary answers what it has and closes the connection).
* ``test_handover_refusals``: each refusal of item 1 with its exit code and message, --ignore-sync,
  ``secondary`` and ``primary`` again without a sync, ``primary all``.
* ``test_switch2primary_force`` (and the original's ``logrot_spl_brain_orig_prim``): SIGKILL of the
  primary, ``primary --force`` on a secondary, the old primary restarted does not serve, the split
  brain is reported on all three nodes with the bytes beyond the split, ``invalidate`` on the old
  primary converges copying only the chunks that differ.
* ``test_reconnect_before_new_prim``: a partition of the primary healed before anyone is made
  primary: no split brain, the secondaries catch up without a sync.
* ``test_reconnect_after_new_prim`` (with ``logrot_spl_brain_orig_secon`` and
  ``leave_and_recreate_resource``): an iptables partition of the primary, a forced primary on the
  other side, both sides write and rotate their logs; after the heal the old primary stops
  serving, every node reports the split brain; the operator keeps the *old* primary's history:
  ``primary --force`` there, ``invalidate`` on one diverged node, ``leave-resource`` +
  ``join-resource`` on the other, ``log-purge-all`` for the leftovers.
* ``test_three_nodes``: 20 handovers back and forth under a write load between them.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from datetime import datetime
from pathlib import Path

import nbd  # python3-libnbd (Debian package; the Makefile installs it)
import pytest

from harness import Node, caught_up, sha256, three_members, wait_until

BLOCK = 4096
SIZE = 32 << 20
BLOCKS = SIZE // BLOCK
TAG = b"MARSROLE"


class Writes:
    """A client that writes numbered 4 KiB blocks through NBD and records which were acknowledged.

    Block ``first + i`` gets write ``i``'s pattern, each block once, one write at a time: a write
    is acknowledged when pwrite returned, in flight when the connection broke under it.
    """

    def __init__(self, node: Node, tag: int, first: int, count: int, res: str = "r") -> None:
        assert first + count <= BLOCKS, "the writes must fit the device"
        self.node, self.tag, self.first, self.count, self.res = node, tag, first, count, res
        self.acked: list[int] = []
        self.inflight: int | None = None
        self.error: Exception | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._connected = threading.Event()

    def pattern(self, i: int) -> bytes:
        return struct.pack("<8sIQ", TAG, self.tag, i).ljust(BLOCK, bytes([self.tag]))

    def _run(self) -> None:
        h = nbd.NBD()
        try:
            h.connect_uri(self.node.uri(self.res))
        except nbd.Error as e:
            self.error = e
            self._connected.set()
            return
        self._connected.set()
        try:
            for i in range(self.count):
                if self._stop.is_set():
                    break
                try:
                    h.pwrite(self.pattern(i), (self.first + i) * BLOCK)
                except nbd.Error:
                    self.inflight = i
                    break
                self.acked.append(i)
        finally:
            try:
                h.shutdown()
            except nbd.Error:
                pass

    def start(self) -> "Writes":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._connected.wait(30)
        assert self.error is None, f"cannot connect to {self.res} on {self.node.host}: {self.error}"
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)

    def run(self, count: int | None = None) -> "Writes":
        """Write ``count`` blocks (all by default) and return once they are acknowledged."""
        if count is not None:
            self.count = count
        self.start()
        self._thread.join(120)
        assert not self._thread.is_alive()
        assert len(self.acked) == self.count, f"only {len(self.acked)} of {self.count} writes acknowledged"
        return self

    def until(self, n: int) -> "Writes":
        """Start writing and return once ``n`` writes are acknowledged (the load goes on)."""
        self.start()
        wait_until(lambda: len(self.acked) >= n or not self._thread.is_alive(), 60, f"{n} writes on {self.node.host}")
        assert len(self.acked) >= n, f"the writes on {self.node.host} stopped after {len(self.acked)}"
        return self

    def check(self, data: bytes, where: str) -> None:
        """Every acknowledged write is in ``data`` (a whole device image); one in flight is old or new."""
        for i in self.acked:
            off = (self.first + i) * BLOCK
            assert data[off:off + BLOCK] == self.pattern(i), f"acknowledged write {self.tag}/{i} missing on {where}"
        if self.inflight is not None:
            off = (self.first + self.inflight) * BLOCK
            assert data[off:off + BLOCK] in (self.pattern(self.inflight), bytes(BLOCK)), \
                f"write {self.tag}/{self.inflight} in flight at the cut is torn on {where}"


def read_export(node: Node, res: str = "r") -> bytes:
    h = nbd.NBD()
    h.connect_uri(node.uri(res))
    try:
        return b"".join(h.pread(4 << 20, off) for off in range(0, h.get_size(), 4 << 20))
    finally:
        h.shutdown()


def serves(node: Node, res: str = "r") -> bool:
    h = nbd.NBD()
    try:
        h.connect_uri(node.uri(res))
    except nbd.Error:
        return False
    h.shutdown()
    return True


def image(node: Node) -> Path:
    return node.base / f"{node.host}.img"


def view(node: Node) -> dict:
    return json.loads(node.marsadm("view", "r", "--json").stdout)


def codes(node: Node) -> set[str]:
    return {f["code"] for f in view(node)["findings"]}


def sync_copied(node: Node) -> int:
    return int(node.tree_value(f"resource-r/actual-{node.host}/sync-copied-bytes") or 0)


def log_time(node: Node, pattern: str) -> datetime:
    """When ``node``'s marsd logged a line matching ``pattern`` last."""
    found = None
    for line in node.log_path.read_text(errors="replace").splitlines():
        if re.search(pattern, line):
            found = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    assert found is not None, f"no line /{pattern}/ in marsd-{node.host}'s log"
    return found


def converged(primary: Node, *others: Node) -> bool:
    return all(caught_up(primary, o, "r") for o in others)


def same_images(*nodes: Node) -> None:
    digests = {n.host: sha256(image(n)) for n in nodes}
    assert len(set(digests.values())) == 1, f"images differ: {digests}"


def refused(node: Node, *args: str) -> str:
    r = node.marsadm(*args, check=False)
    assert r.returncode == 1, f"marsadm {' '.join(args)} on {node.host} should be refused:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stderr


def unreachable(seen_from: Node, host: str) -> bool:
    return not view(seen_from)["nodes"][host]["alive"]


@pytest.fixture
def three():
    """a primary of r (32 MiB), b and c secondaries, synced; iptables rules removed at the end."""
    with three_members(str(SIZE), image, converged) as t:
        # Each secondary knows itself synced first; a handover asked on another node checks the
        # syncs as that node's tree has them, one exchange later.
        a, b, c, _ = t
        size = a.tree_value("resource-r/size")
        wait_until(lambda: all(n.tree_value(f"resource-r/syncstatus-{m.host}") == size for n in (a, b, c)
                               for m in (b, c)), 20, "every node to know b and c synced")
        yield t


def test_switch2primary(three):
    a, b, c, _ = three
    w1 = Writes(a, 1, 0, 4000).until(300)
    w1.stop()  # the load stops just before the handover
    r = b.marsadm("primary", "r")
    assert "b is the primary now" in r.stderr
    w1.check(read_export(b), "the new primary b")
    assert not serves(a), "the old primary still serves r"
    assert log_time(a, r"resource r: no longer primary") <= log_time(b, r"resource r: attached .*, serving NBD")
    w2 = Writes(b, 2, 4096, 300).run()
    wait_until(lambda: converged(b, a, c), 60, "a and c to follow b")
    same_images(a, b, c)
    w2.check(image(a).read_bytes(), "a")
    assert sync_copied(a) == 0 and sync_copied(c) == 0, "a handover must not sync"
    assert view(c)["resources"]["r"]["primary"] == "b"

    # A client still writing on b: refused; with --force b answers what it has, then closes it.
    w3 = Writes(b, 3, 6144, 2048).until(100)
    wait_until(lambda: b.tree_value("resource-r/actual-b/open-count") == "1", 10, "b to count the client")
    wait_until(lambda: view(c)["resources"]["r"]["nodes"]["b"]["actual"]["open_count"] == 1, 10,
               "c to see b's client")
    err = refused(c, "primary", "r")
    assert "open on b by 1 client" in err and "--force" in err
    c.marsadm("primary", "--force", "r")
    w3.stop()
    assert w3.inflight is not None, "the client's connection was not closed"
    w3.check(read_export(c), "c after a handover with --force")
    wait_until(lambda: converged(c, a, b), 60, "a and b to follow c")
    same_images(a, b, c)
    assert sync_copied(a) == sync_copied(b) == 0


def test_handover_refusals(three):
    a, b, c, _ = three
    Writes(a, 1, 0, 200).run()
    wait_until(lambda: converged(a, b, c), 30, "catch up")

    # fetch switched off on the new primary: it could never catch up
    b.marsadm("pause-fetch", "r")
    assert "connect is switched off on b" in refused(b, "primary", "r")
    b.marsadm("resume-fetch", "r")

    # the new primary's own sync unfinished; another member's sync unfinished
    c.marsadm("pause-sync", "r")
    c.marsadm("invalidate", "r")
    wait_until(lambda: view(b)["resources"]["r"]["nodes"]["c"]["sync"]["rest_bytes"] > 0, 20, "b to see c unsynced")
    assert "c's own sync is unfinished" in refused(c, "primary", "r")
    err = refused(b, "primary", "r")
    assert "sync of c is unfinished" in err and "--ignore-sync" in err
    b.marsadm("primary", "--ignore-sync", "r")
    assert serves(b) and not serves(a)
    c.marsadm("resume-sync", "r")
    wait_until(lambda: converged(b, a, c), 60, "c to sync from b")

    # replay stopped on a damaged record in a's copy of b's log
    a.marsadm("pause-replay", "r")
    start = b.tree_value("resource-r/replay-a")  # where a's replay stands: the next record starts there
    Writes(b, 2, 1024, 1).run()
    link = start.split(",")
    copy = a.mars_dir / "resource-r" / link[0]
    wait_until(lambda: copy.stat().st_size > int(link[1]), 20, "a to fetch the write")
    with open(copy, "r+b") as f:
        f.seek(int(link[1]) + 64 + 100)  # a payload byte of that record
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    # The replay may stop on that record before resume-replay looks: then the command says so.
    r = a.marsadm("resume-replay", "r", check=False)
    assert r.returncode == 0 or "replay stopped" in r.stderr, r.stderr
    wait_until(lambda: (a.tree_value("resource-r/actual-a/replay-code") or "").startswith("-1"), 20, "replay to stop")
    assert "replay stopped" in refused(a, "primary", "r")
    a.marsadm("invalidate", "r")
    wait_until(lambda: converged(b, a, c), 60, "a to resync")

    # secondary: nobody serves; primary on the same node picks it up again without a sync
    w = Writes(b, 3, 2048, 2048).until(20)
    assert "open on b by 1 client" in refused(b, "secondary", "r")
    w.stop()
    b.marsadm("secondary", "r")
    assert not serves(b)
    wait_until(lambda: "NO_PRIMARY" in codes(a), 20, "NO_PRIMARY on a")
    b.marsadm("primary", "r")
    w.check(read_export(b), "b after secondary and primary")
    # ... and on another node after it replayed the end of b's history
    b.marsadm("secondary", "r")
    a.marsadm("primary", "r")
    w.check(read_export(a), "a after b's secondary")
    wait_until(lambda: converged(a, b, c), 60, "b and c to follow a")
    same_images(a, b, c)
    assert sync_copied(b) == 0

    # primary all: every resource of this host
    b.marsadm("primary", "all")
    assert serves(b) and not serves(a)


def test_switch2primary_force(three):
    """Forced failover after SIGKILL of the primary, then the original's logrot_spl_brain_orig_prim:
    the old primary's extra history is discarded with invalidate."""
    a, b, c, _ = three
    w1 = Writes(a, 1, 0, 400).run()
    wait_until(lambda: converged(a, b, c), 30, "catch up")
    for n in (b, c):
        n.marsadm("pause-fetch", "r")
    w2 = Writes(a, 2, 1024, 80).run()  # 320 KiB that only a has: 1 % of the device
    a.kill()
    wait_until(lambda: unreachable(b, "a"), 30, "b to see a down")
    err = refused(b, "primary", "r")
    assert "primary a is unreachable" in err and "--force" in err
    b.marsadm("primary", "--force", "r")
    assert "FORCED_PRIMARY" in codes(c) or view(c)["resources"]["r"]["primary"] == "b"
    w1.check(read_export(b), "the forced primary b")
    w3 = Writes(b, 3, 4096, 80).run()  # and 320 KiB only b's side has
    c.marsadm("resume-fetch", "r")
    wait_until(lambda: converged(b, c), 30, "c to follow b")

    # a comes back: it must not serve, and the split brain shows everywhere
    a.start()
    wait_until(lambda: a.tree_value("resource-r/version-000000001-a") is not None, 30, "a to finish its history")
    assert not serves(a)
    assert "serving NBD" not in a.log().split("marsd 0.1.0 on host a started")[-1]
    for n in (a, b, c):
        wait_until(lambda n=n: "SPLIT_BRAIN" in codes(n), 30, f"SPLIT_BRAIN on {n.host}")
    split = view(b)["resources"]["r"]["split_brain"][0]
    assert split["beyond_bytes"]["a"] >= 80 * BLOCK and split["beyond_bytes"]["b"] >= 80 * BLOCK, split
    assert "split brain" in refused(a, "primary", "r")

    # resolution: discard a's side
    a.marsadm("invalidate", "r")
    wait_until(lambda: converged(b, a, c), 60, "a to resync from b")
    same_images(a, b, c)
    w3.check(image(a).read_bytes(), "a after invalidate")
    copied = sync_copied(a)
    print(f"invalidate after the split copied {copied} B of {SIZE} B ({100 * copied / SIZE:.1f} %)")  # -s shows it
    assert 0 < copied < SIZE * 5 // 100, f"invalidate copied {copied} B of {SIZE} B"
    for n in (a, b, c):
        wait_until(lambda n=n: "SPLIT_BRAIN" not in codes(n), 30, f"SPLIT_BRAIN gone on {n.host}")
    del w2  # what only a acknowledged is gone with a's side: the price of --force


def test_reconnect_before_new_prim(three):
    a, b, c, part = three
    part.cut(a, b)
    part.cut(a, c)
    w = Writes(a, 1, 0, 300).run()  # the primary keeps writing while cut off
    part.heal()
    wait_until(lambda: converged(a, b, c), 60, "b and c to catch up after the heal")
    same_images(a, b, c)
    w.check(image(c).read_bytes(), "c")
    assert "SPLIT_BRAIN" not in codes(b)
    assert sync_copied(b) == sync_copied(c) == 0
    b.marsadm("primary", "r")
    w.check(read_export(b), "b")


def test_reconnect_after_new_prim(three):
    a, b, c, part = three
    w1 = Writes(a, 1, 0, 300).run()
    wait_until(lambda: converged(a, b, c), 30, "catch up")
    part.cut(a, b)
    part.cut(a, c)
    wa = Writes(a, 2, 1024, 80).start()  # a keeps serving its client while cut off
    wait_until(lambda: unreachable(b, "a") and unreachable(c, "a"), 40, "b and c to see a cut off")
    b.marsadm("primary", "--force", "r")
    wb = Writes(b, 3, 4096, 80).run()
    wa._thread.join(60)
    assert len(wa.acked) == 80
    a.marsadm("log-rotate", "r")
    b.marsadm("log-rotate", "r")
    Writes(a, 4, 2048, 20).run()
    Writes(b, 5, 6144, 20).run()
    part.heal()
    # a learns that b was made primary after it, and stops serving
    wait_until(lambda: not serves(a), 30, "a to stop serving")
    for n in (a, b, c):
        wait_until(lambda n=n: "SPLIT_BRAIN" in codes(n), 30, f"SPLIT_BRAIN on {n.host}")
    split = view(c)["resources"]["r"]["split_brain"][0]
    assert split["beyond_bytes"]["a"] > 0 and split["beyond_bytes"]["b"] > 0, split

    # keep the old primary's history (logrot_spl_brain_orig_secon)
    assert "split brain" in refused(a, "primary", "r")
    a.marsadm("primary", "--force", "r")
    b.marsadm("invalidate", "r")
    c.marsadm("down", "r")
    c.marsadm("leave-resource", "r")
    c.marsadm("join-resource", "r", str(image(c)))
    wait_until(lambda: converged(a, b, c), 90, "b and c to resync from a")
    same_images(a, b, c)
    data = image(b).read_bytes()
    w1.check(data, "b")
    wa.check(data, "b")
    for n in (a, b, c):
        wait_until(lambda n=n: "SPLIT_BRAIN" not in codes(n), 30,
                   f"SPLIT_BRAIN gone on {n.host}: {view(n)['resources']['r']['split_brain']}")
    err = refused(b, "log-purge-all", "r")
    assert "--force" in err
    b.marsadm("log-purge-all", "r", "--force")
    assert not list((b.mars_dir / "resource-r").glob("split-brain-*"))
    assert wb.acked  # b's side was acknowledged and is gone: the operator chose a's


def test_three_nodes(three):
    """20 handovers back and forth between a and b under a write load between them; c follows."""
    a, b, c, _ = three
    # The first one before anything was written: a's log file is empty, b has no copy of it yet.
    b.marsadm("primary", "r")
    writes = [Writes(b, 9, 8000, 100).run()]
    wait_until(lambda: converged(b, a, c), 30, "a and c to follow b")
    assert "SPLIT_BRAIN" not in codes(a)
    primary, other = b, a
    for i in range(20):
        w = Writes(primary, 10 + i, i * 200, 200).until(50)
        w.stop()
        writes.append(w)
        other.marsadm("primary", "r")
        primary, other = other, primary
    wait_until(lambda: converged(primary, other, c), 60, "everyone to converge")
    same_images(a, b, c)
    data = read_export(primary)
    for w in writes:
        w.check(data, f"{primary.host} after 20 handovers")
    assert sync_copied(a) == sync_copied(b) == sync_copied(c) == 0
