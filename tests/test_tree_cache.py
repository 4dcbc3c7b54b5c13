"""The snapshot built with a TreeCache is the snapshot built without one, whatever changed.

A face that refreshes often (mars-exporter, the TUI) reuses what it read of a directory whose
inode, mtime and ctime did not move. Wrong reuse would show an operator a state that is gone,
so every kind of change a tree sees is made here, at once and in random order, and the cached
build is compared with a fresh one each time.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from harness import wait_until

from mars.engine import model
from mars.engine.tree import Tree

NOW = 1_800_000_000.0


def tree(root: Path) -> Tree:
    t = Tree(root, "a")
    t.set("uuid", "u-1")
    for i, h in enumerate("abc"):
        t.set(f"ips/ip-{h}", f"127.0.0.{2 + i}")
        t.set(f"actual-{h}/time", f"{NOW - 1:.9f}")
        t.set(f"actual-{h}/version", "0.1.0")
    for res in ("r", "s"):
        t.set(f"resource-{res}/size", str(64 << 20))
        t.set(f"resource-{res}/primary", "a")
        for h in "abc":
            t.set(f"resource-{res}/data-{h}", f"/dev/{res}-{h}")
            t.set(f"resource-{res}/todo-{h}/attach", "1")
            t.set(f"resource-{res}/actual-{h}/is-attached", "1")
            t.set(f"resource-{res}/syncstatus-{h}", str(64 << 20))
        (root / f"resource-{res}" / "log-000000001-a").write_bytes(b"x" * 100)
    return t


def same(root: Path, cache: model.TreeCache) -> None:
    fresh = model.build(root, "a", now_s=NOW).to_json()
    cached = model.build(root, "a", now_s=NOW, cache=cache).to_json()
    assert cached == fresh


def warm(root: Path, cache: model.TreeCache) -> None:
    """Until every directory is remembered: only those older than the guard are (about 1 s)."""
    dirs = sum(1 for _ in os.walk(root))
    wait_until(lambda: (model.build(root, "a", now_s=NOW, cache=cache), len(cache.dirs) == dirs)[1], 10,
               "the cache to hold every directory", interval=0.1)


def test_a_cached_build_sees_every_kind_of_change(tmp_path):
    root = tmp_path / "mars"
    t = tree(root)
    cache = model.TreeCache()
    warm(root, cache)
    same(root, cache)
    t.set("resource-r/actual-b/is-attached", "0", durable=False)  # a new value
    same(root, cache)
    t.delete("resource-s/todo-c/attach")  # a tombstone
    same(root, cache)
    t.set("resource-q/size", str(1 << 30))  # a new resource, a new directory
    t.set("resource-q/primary", "b")
    same(root, cache)
    with open(root / "resource-r" / "log-000000001-a", "ab") as f:  # a log file grows in place
        f.write(b"y" * 50)
    same(root, cache)
    (root / "resource-s" / "log-000000001-a").unlink()  # a log file deleted
    same(root, cache)
    d = root / "resource-r" / "actual-a"  # a change whose mtime is then set back to the old one
    st = os.stat(d)
    t.set("resource-r/actual-a/is-attached", "0", durable=False)
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))
    same(root, cache)  # the ctime moved all the same


def test_random_changes_never_leave_a_stale_snapshot(tmp_path):
    root = tmp_path / "mars"
    t = tree(root)
    cache = model.TreeCache()
    warm(root, cache)
    rng = random.Random(7)
    paths = [f"resource-{r}/actual-{h}/{k}" for r in "rs" for h in "abc" for k in ("is-attached", "replay-code")] + \
            [f"resource-{r}/syncstatus-{h}" for r in "rs" for h in "abc"] + [f"actual-{h}/time" for h in "abc"]
    for _ in range(200):
        p = rng.choice(paths)
        if rng.random() < 0.2:
            t.delete(p)
        else:
            t.set(p, str(rng.randrange(1 << 20)), durable=False)
        same(root, cache)
