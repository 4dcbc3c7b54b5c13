#!/usr/bin/env python3
"""TLS vs plain text on the NBD TCP export: sequential write and read throughput with nbdcopy.

Run:  .venv/bin/python bench/bench_nbd_tls.py [--size 512M] [--rounds 3] [--connections 4] [--json FILE]

One marsd (tests/harness.py's Node, on 127.0.0.2) serves a resource of --size on a sparse image
with ``--nbd-tls on``, so a plain ``nbd://`` client and a TLS ``nbds://`` client (a certificate
from ``marsadm export-client-cert``) reach the same server process, the same export and the same
disk. Each round copies a file of --size random bytes into the export (write: every byte goes
through the log and its group commit) and the export to ``null:`` (read), once plain and once
over TLS, alternating which goes first. Printed: the median MiB/s of each and the ratio TLS/plain
measured in the same run (the machine is shared: only ratios of one run compare). Exit 1 if a
copy read back differs from what was written.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_write import machine_facts, write_json  # noqa: E402
from harness import Node, cleanup, run, sha256, short_tempdir  # noqa: E402

from mars.engine.model.units import human_bytes, parse_size  # noqa: E402

MiB = 1 << 20
RES = "r"


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    run(cmd, timeout=3600)
    return time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="512M", help="bytes copied each way per run (default 512M)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each kind; the median counts (default 3)")
    p.add_argument("--connections", type=int, default=4, help="nbdcopy --connections (default 4, its own default)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE")
    args = p.parse_args()
    size = parse_size(args.size)
    base = short_tempdir()
    nodes: list[Node] = []
    try:
        a = Node(base, "a", "127.0.0.2")
        nodes.append(a)
        a.create_cluster()
        port = free_port(a.ip)
        a.start("--nbd-listen", f"{a.ip}:{port}", "--nbd-tls", "on")
        a.marsadm("create-resource", RES, str(base / "r.img"), str(size))
        certs = base / "client"
        a.marsadm("export-client-cert", "--out", str(certs))
        src = base / "src.img"
        with open(src, "wb") as f:
            for _ in range(size // (4 * MiB)):
                f.write(os.urandom(4 * MiB))  # no holes, nothing to compress
        uris = {"plain": f"nbd://{a.ip}:{port}/{RES}",
                "tls": f"nbds://{a.ip}:{port}/{RES}?tls-certificates={certs}"}
        conns = ["--connections", str(args.connections)]
        times: dict[tuple[str, str], list[float]] = {}
        for rnd in range(args.rounds):
            order = ("plain", "tls") if rnd % 2 == 0 else ("tls", "plain")
            for kind in order:
                times.setdefault(("write", kind), []).append(timed(["nbdcopy", *conns, str(src), uris[kind]]))
            for kind in order:
                times.setdefault(("read", kind), []).append(timed(["nbdcopy", *conns, uris[kind], "null:"]))
        out = base / "out.img"
        run(["nbdcopy", uris["tls"], str(out)])
        same = sha256(out) == sha256(src)
        print(f"nbdcopy --connections {args.connections}, {human_bytes(size)} per copy, {args.rounds} rounds, "
              f"marsd --nbd-tls on on {a.ip}:{port}")
        print(f"{'':6} {'plain MiB/s':>12} {'TLS MiB/s':>10} {'TLS/plain':>10}")
        figures: dict[str, dict[str, float]] = {}
        for op in ("write", "read"):
            rate = {k: size / MiB / statistics.median(times[(op, k)]) for k in ("plain", "tls")}
            ratio = rate["tls"] / rate["plain"]
            figures[op] = {"plain_mib_s": round(rate["plain"], 1), "tls_mib_s": round(rate["tls"], 1),
                           "ratio": round(ratio, 3)}
            print(f"{op:6} {rate['plain']:12.1f} {rate['tls']:10.1f} {ratio:10.2f}")
        print(f"read back over TLS equals what was written: {same}")
        if args.json:
            write_json(args.json, {"bench": "nbd_tls", "size": size, "rounds": args.rounds,
                                   "connections": args.connections, "figures": figures,
                                   "times_s": {f"{op}_{k}": v for (op, k), v in times.items()},
                                   "identical": same, "machine": machine_facts(base)})
        return 0 if same else 1
    finally:
        cleanup(base, nodes)


if __name__ == "__main__":
    sys.exit(main())
