#!/usr/bin/env python3
"""A sparse export copied whole: nbdcopy of an 8 TiB image with 1 GiB of data to null:, MARS vs qemu-nbd.

Run:  .venv/bin/python bench/bench_sparse.py [--size 8T] [--data 1G] [--pieces 64] [--rounds 3] [--json FILE]

The image is made sparse (``truncate``) and --data bytes of random data are written into it in
--pieces pieces spread evenly over it, before ``marsadm create-resource`` takes it as the data
device; so MARS (tests/harness.py's Node on 127.0.0.2, the unix socket) and ``qemu-nbd -r``
(read-only, on its own unix socket) serve the very same file. Each round runs ``nbdcopy URI
null:`` against both, alternating which goes first. nbdcopy asks BLOCK_STATUS for the holes and
reads only the data; a server that hid the holes would make it read all of --size. Printed: the
median seconds of each, the ratio MARS/qemu-nbd (issue 18's goal: at most 1.5), and how many
bytes marsd read from the device (its device_read_bytes counter) against --data. Exit 1 if marsd
read more than twice --data (the holes were not skipped).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_write import machine_facts, write_json  # noqa: E402
from harness import Node, cleanup, run, short_tempdir, wait_until  # noqa: E402

from mars.engine.model.client import live_snapshot  # noqa: E402
from mars.engine.model.units import human_bytes, parse_size  # noqa: E402

MiB = 1 << 20
RES = "r"


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    run(cmd, timeout=3600)
    return time.monotonic() - t0


def make_image(path: Path, size: int, data: int, pieces: int) -> None:
    """A sparse file of ``size`` with ``data`` random bytes in ``pieces`` evenly spread pieces."""
    piece = data // pieces
    stride = size // pieces
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(pieces):
            off = i * stride + stride // 2
            off -= off % (1 << 16)
            for j in range(0, piece, 4 * MiB):
                f.seek(off + j)
                f.write(os.urandom(min(4 * MiB, piece - j)))
        f.flush()
        os.fsync(f.fileno())


def device_read_bytes(node: Node) -> int:
    c = live_snapshot(node.mars_dir, node.host)[0].counters
    return c.resources[RES].device_read_bytes if c is not None else -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="8T", help="size of the sparse export (default 8T)")
    p.add_argument("--data", default="1G", help="bytes of data in it (default 1G)")
    p.add_argument("--pieces", type=int, default=64, help="pieces the data is written in (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="copies from each server; the median counts (default 3)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = p.parse_args()
    size, data = parse_size(args.size), parse_size(args.data)
    base = short_tempdir()
    nodes: list[Node] = []
    qemu: subprocess.Popen[bytes] | None = None
    try:
        img = base / "r.img"
        make_image(img, size, data, args.pieces)
        a = Node(base, "a", "127.0.0.2")
        nodes.append(a)
        a.create_cluster()
        a.start()
        a.marsadm("create-resource", RES, str(img), str(size))
        qsock = base / "qemu.sock"
        # Read-only, persistent (-t: it would exit after the first client), up to 8 clients (nbdcopy
        # opens 4 when the server allows multi-conn), the page cache as marsd has it.
        qemu = subprocess.Popen(["qemu-nbd", "-r", "-t", "-f", "raw", "--shared=8", "-k", str(qsock), str(img)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: qsock.exists() or qemu.poll() is not None, 30, "qemu-nbd to listen")
        uris = {"mars": a.uri(RES), "qemu-nbd": f"nbd+unix:///?socket={qsock}"}
        times: dict[str, list[float]] = {"mars": [], "qemu-nbd": []}
        read0 = device_read_bytes(a)
        for rnd in range(args.rounds):
            order = ("mars", "qemu-nbd") if rnd % 2 == 0 else ("qemu-nbd", "mars")
            for kind in order:
                times[kind].append(timed(["nbdcopy", uris[kind], "null:"]))
        read = (device_read_bytes(a) - read0) // args.rounds
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["mars"] / med["qemu-nbd"] if med["qemu-nbd"] > 0 else float("inf")
        print(f"nbdcopy URI null: of a {human_bytes(size)} sparse export with {human_bytes(data)} of data "
              f"in {args.pieces} pieces, {args.rounds} rounds, same image file")
        print(f"{'server':10} {'median s':>9} {'runs':>24}")
        for k in ("mars", "qemu-nbd"):
            print(f"{k:10} {med[k]:9.2f}   {' '.join(f'{t:.2f}' for t in times[k])}")
        print(f"MARS / qemu-nbd: {ratio:.2f} (goal: at most 1.5)")
        print(f"marsd read {human_bytes(read)} from the device per copy ({read / data:.2f} x the data, "
              f"{read / size * 100:.4f} % of the export)")
        if args.json:
            write_json(args.json, {"bench": "sparse", "size": size, "data": data, "pieces": args.pieces,
                                   "rounds": args.rounds, "times_s": times, "median_s": med, "ratio": ratio,
                                   "device_read_bytes_per_copy": read, "machine": machine_facts(base)})
        return 0 if 0 <= read <= 2 * data else 1
    finally:
        if qemu is not None and qemu.poll() is None:
            qemu.terminate()
            qemu.wait(30)
        cleanup(base, nodes)


if __name__ == "__main__":
    sys.exit(main())
