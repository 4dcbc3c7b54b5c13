"""Fast full sync: only differing chunks travel, holes are skipped, connect lists route the fetch."""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest

from harness import run, start_cluster, wait_until
from harness import caught_up
from harness import sha256 as sha

MiB = 1 << 20


@pytest.fixture
def pair(workdir):
    return start_cluster(*workdir, "ab")


def test_sync_sends_only_the_chunks_that_differ(pair):
    a, b = pair
    size = 256 * MiB
    a.marsadm("create-resource", "r", str(a.base / "a.img"), str(size))
    src = a.base / "src.img"
    src.write_bytes(os.urandom(size))
    run(["nbdcopy", str(src), a.uri("r")])
    # b starts from a copy that differs in 1% of its 1 MiB chunks.
    mine = b.base / "b.img"
    shutil.copyfile(src, mine)
    rng = random.Random(7)
    changed = rng.sample(range(size // MiB), 3)
    with open(mine, "r+b") as f:
        for i in changed:
            f.seek(i * MiB + rng.randrange(MiB - 100))
            f.write(os.urandom(100))
    wait_until(lambda: b.tree_value("resource-r/size") == str(size), 20, "b to learn r")
    b.marsadm("join-resource", "r", str(mine), "--create")
    wait_until(lambda: caught_up(a, b, "r"), 60, "b to catch up")
    copied = int(b.tree_value("resource-r/actual-b/sync-copied-bytes"))
    assert int(b.tree_value("resource-r/actual-b/sync-chunks-copied")) == len(changed)
    assert copied == len(changed) * MiB
    assert copied < 0.03 * size
    assert sha(mine) == sha(a.base / "a.img")


def test_sparse_8tib_image_joins_with_holes_skipped(pair):
    a, b = pair
    size = 8 << 40
    a.marsadm("create-resource", "big", str(a.base / "a8t.img"), "8T")
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 5T 4M", "-c", "write -P 0x33 0 1M", a.uri("big")])
    wait_until(lambda: b.tree_value("resource-big/size") == str(size), 20, "b to learn big")
    t0 = time.monotonic()
    b.marsadm("join-resource", "big", str(b.base / "b8t.img"), "--create")
    wait_until(lambda: b.tree_value("resource-big/syncstatus-b") == str(size), 120, "the 8 TiB sync")
    took = time.monotonic() - t0
    print(f"8 TiB sparse join: sync done in {took:.1f} s")
    wait_until(lambda: caught_up(a, b, "big"), 30, "b to catch up on big")
    img = b.base / "b8t.img"
    with open(img, "rb") as f:
        f.seek(5 << 40)
        assert f.read(4 * MiB) == b"\x5a" * (4 * MiB)
        f.seek(0)
        assert f.read(MiB) == b"\x33" * MiB
    assert os.stat(img).st_blocks * 512 < 64 * MiB  # still sparse
    assert int(b.tree_value("resource-big/actual-b/sync-copied-bytes")) <= 5 * MiB
    assert took < 60, f"an 8 TiB sparse join took {took:.1f} s"


def test_connect_list_fetches_through_another_secondary(workdir):
    a, b, c = start_cluster(*workdir, "abc")
    a.marsadm("create-resource", "r", str(a.base / "a.img"), "32M")
    for n in (b, c):
        wait_until(lambda: n.tree_value("resource-r/size") is not None, 20, f"{n.host} to learn r")
        n.marsadm("join-resource", "r", str(n.base / f"{n.host}.img"), "--create")
    wait_until(lambda: c.tree_value("resource-r/data-b") is not None, 20, "c to see b's membership")
    r = c.marsadm("set-connect-pref-list", "r", "c", check=False)
    assert r.returncode == 1 and "itself" in r.stderr
    c.marsadm("set-connect-pref-list", "r", "b")
    assert c.marsadm("get-connect-pref-list", "r").stdout.strip() == "b"
    wait_until(lambda: b.tree_value("resource-r/connect-c") == "b", 20, "b to see c's list")
    r = b.marsadm("set-connect-pref-list", "r", "c", check=False)
    assert r.returncode == 1 and "cycle" in r.stderr
    wait_until(lambda: c.tree_value("resource-r/actual-c/fetch-source") == "b", 20, "c to fetch from b")
    fetched_by_b = int(b.tree_value("resource-r/actual-b/fetch-bytes") or 0)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x42 0 8M", a.uri("r")])
    wait_until(lambda: caught_up(a, c, "r"), 60, "c to catch up through b")
    assert c.tree_value("resource-r/actual-c/fetch-source") == "b"
    wait_until(lambda: int(b.tree_value("resource-r/actual-b/fetch-bytes") or 0) >= fetched_by_b + 8 * MiB, 20,
               "b to have fetched the writes c got through it")
    assert sha(c.base / "c.img") == sha(a.base / "a.img")
    # b goes away: c falls back to the next source, the primary.
    b.kill()
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x43 8M 4M", a.uri("r")])
    wait_until(lambda: caught_up(a, c, "r"), 60, "c to catch up from a")
    wait_until(lambda: c.tree_value("resource-r/actual-c/fetch-source") == "a", 20, "c to fetch from a")
    assert sha(c.base / "c.img") == sha(a.base / "a.img")
