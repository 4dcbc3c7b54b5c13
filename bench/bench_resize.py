#!/usr/bin/env python3
"""Online resize at issue 15's scale: a 1 GiB resource grown to 2 GiB under an NBD writer.

Run:  .venv/bin/python bench/bench_resize.py [--old 1G] [--new 2G] [--fill 1G]

Three marsd (a primary, b and c secondaries) on sparse images, as tests/harness.py starts them
(the bench reuses it). 64 MiB are written through NBD and replicated; then every image is grown
with ``truncate -s``, and the primary's grown region is filled with ``--fill`` bytes of data
written straight into its image (what a grown LV holds: the sync has to copy it; a hole would
cost nothing). A libnbd writer keeps writing into the old region over one connection while
``marsadm resize r`` runs. Printed: the export size on a new connection (nbdinfo, qemu-img info),
the writes the open connection made across the resize, and per secondary the bytes its sync
copied of the new region and how long taking it up took. The test suite's tests/test_resize.py
runs the same at 64 MiB -> 128 MiB.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import nbd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import caught_up, cleanup, run, sha256, short_tempdir, start_cluster, wait_until, write  # noqa: E402
from mars.engine.model.units import human_bytes, parse_size  # noqa: E402

MiB = 1 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="1G")
    p.add_argument("--new", default="2G")
    p.add_argument("--fill", default="1G", help="data in the primary's grown region before the resize")
    args = p.parse_args()
    old, new, fill = parse_size(args.old), parse_size(args.new), parse_size(args.fill)
    base = short_tempdir()
    nodes: list = []
    try:
        a, b, c = start_cluster(base, nodes, "abc")
        img = {n.host: base / f"{n.host}.img" for n in (a, b, c)}
        a.marsadm("create-resource", "r", str(img["a"]), str(old))
        for n in (b, c):
            wait_until(lambda n=n: n.tree_value("resource-r/size") is not None, 20, f"{n.host} to learn r")
            n.marsadm("join-resource", "r", str(img[n.host]), "--create")
        write(a, "write -P 0x11 0 64M")
        wait_until(lambda: all(caught_up(a, n, "r") for n in (b, c)), 300, "b and c to sync")
        for n in (a, b, c):
            run(["truncate", "-s", str(new), str(img[n.host])])
        chunk = bytes(range(256)) * (4 * MiB // 256)
        with open(img["a"], "r+b") as f:
            f.seek(old)
            for i in range(fill // len(chunk)):
                f.write(chunk[i % 256:] + chunk[:i % 256])  # no two chunks alike, none a hole
        wait_until(lambda: all(a.tree_value(f"resource-r/actsize-{h}") == str(new) for h in "abc"), 30,
                   "every member's new disk size")
        h = nbd.NBD()
        h.connect_uri(a.uri("r"))
        stop, count = threading.Event(), [0]

        def writer() -> None:
            i = 0
            while not stop.is_set():
                h.pwrite(bytes([i % 251 + 1]) * 65536, (i % 1024) * 65536)
                count[0] += 1
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        time.sleep(1.0)  # the writer runs before the resize, not synchronisation
        t0 = time.monotonic()
        n0 = count[0]
        a.marsadm("resize", "r")
        t_resize = time.monotonic() - t0
        done: dict[str, float] = {}

        def taken_up() -> bool:
            for n in (b, c):
                if n.host not in done and n.tree_value(f"resource-r/syncstatus-{n.host}") == str(new):
                    done[n.host] = time.monotonic() - t0
            return len(done) == 2

        wait_until(taken_up, 600, "b and c to sync the new region", interval=0.1)
        stop.set()
        t.join(30)
        across = count[0] - n0
        h.shutdown()
        info = json.loads(run(["nbdinfo", "--json", a.uri("r")]).stdout)["exports"][0]["export-size"]
        qimg = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", a.uri("r")]).stdout)["virtual-size"]
        wait_until(lambda: all(caught_up(a, n, "r") for n in (b, c)), 300, "b and c to catch up")
        same = len({sha256(img[x]) for x in "abc"}) == 1
        print(f"resize {human_bytes(old)} -> {human_bytes(new)}: marsadm resize took {t_resize:.2f} s; "
              f"{across} writes of 64 KiB on the open connection during it and the sync")
        print(f"new connection: nbdinfo export-size {info}, qemu-img virtual-size {qimg}")
        for n in (b, c):
            copied = int(n.tree_value(f"resource-r/actual-{n.host}/sync-copied-bytes") or 0)
            print(f"{n.host}: synced {copied} bytes ({human_bytes(copied)}) of the new region in "
                  f"{done[n.host]:.1f} s (grown region {human_bytes(new - old)}, data in it {human_bytes(fill)})")
        print(f"images byte-identical: {same}")
        return 0 if same and info == new == qimg else 1
    finally:
        cleanup(base, nodes)


if __name__ == "__main__":
    sys.exit(main())
