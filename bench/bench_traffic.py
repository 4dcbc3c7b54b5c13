#!/usr/bin/env python3
"""Traffic limit benchmark: a catch-up under traffic-out-limit / traffic-in-limit, and lifted.

Run:  python bench/bench_traffic.py [--limit-mib 20] [--mib 400] [--seconds 8]

Two marsd on this machine (a on 127.0.0.2 primary of resource r, b on 127.0.0.3 secondary),
built as the tests build them (tests/harness.py: create-cluster, join-cluster, join-resource).
For each case b's fetch is paused (``marsadm disconnect r``), --mib of 1 MiB writes go through
a's NBD export (qemu-io), the limit is set, and the fetch resumed; the rate is b's fetched bytes
(``actual-b/fetch-bytes``) over the time they took, sampled every marsd round:

1. unlimited: the whole catch-up, for reference;
2. traffic-out-limit on a (the serving end): the rate over --seconds, with its ratio to the
   limit (goal: within 15 %); then the limit is lifted and the rate of the next seconds, which
   must be far above the limit at once;
3. traffic-in-limit on b (the fetching end): the rate over --seconds and its ratio.

Everything lives in one temporary directory, removed with all processes on success or error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from harness import Node, caught_up, cleanup, short_tempdir, start_pair, wait_until, write  # noqa: E402

MIB = 1 << 20
GOAL = 0.15


def fetched(b: Node) -> int:
    return int(b.tree_value("resource-r/actual-b/fetch-bytes") or 0)


def rate_over(b: Node, seconds: float) -> tuple[float, int]:
    """b's fetch rate (bytes/s) and bytes moved, from one step of its counter to the first step
    after ``seconds``: the counter moves by whole fetch replies (16 MiB), so a rate taken
    between two arbitrary moments would be off by up to a reply."""
    start = fetched(b)
    wait_until(lambda: fetched(b) > start, 30, "the fetch to begin", interval=0.01)
    c0, t0 = fetched(b), time.monotonic()
    while True:
        c = fetched(b)
        t = time.monotonic()
        if c != c0 and t - t0 >= seconds:
            return (c - c0) / (t - t0), c - c0
        time.sleep(0.01)  # poll: the counter moves with marsd's rounds (0.2 s)


def backlog(a: Node, b: Node, mib: int, at: int) -> None:
    """``mib`` MiB of log on a that b has not fetched, written at device offset ``at`` MiB."""
    b.marsadm("disconnect", "r")
    wait_until(lambda: b.tree_value("resource-r/actual-b/is-copying") == "0", 20, "b's fetch to stop")
    write(a, f"write -P 0x5a {at}M {mib}M")


def catch_up(a: Node, b: Node) -> None:
    wait_until(lambda: caught_up(a, b, "r"), 600, "b to catch up", interval=0.05)


def limited(setter: Node, b: Node, name: str, label: str, limit: float, args: argparse.Namespace) -> bool:
    """b catches up under ``name`` set on ``setter``: the rate over --seconds and its ratio to the limit
    (the limit stays set; the caller lifts it)."""
    setter.marsadm(f"set-{name}-value", str(limit))
    b.marsadm("connect", "r")
    r, n = rate_over(b, args.seconds)
    ratio = r / limit
    good = abs(ratio - 1) <= GOAL
    print(f"{label}{r / MIB:8.1f} MiB/s over {args.seconds:g} s ({n / MIB:.0f} MiB), {ratio:.3f} of the limit  "
          f"[{'ok' if good else 'MISSED'}: within {GOAL:.0%}]")
    return good


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit-mib", type=float, default=20.0, help="the traffic limit in MiB/s (default 20)")
    ap.add_argument("--mib", type=int, default=400, help="MiB of backlog per case (default 400)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds measured under the limit (default 8)")
    args = ap.parse_args()
    limit = int(args.limit_mib * MIB)
    size = 3 * args.mib + 64
    base = short_tempdir()
    nodes: list[Node] = []
    ok = True
    try:
        a, b = start_pair(base, nodes, f"{size}M")
        write(a, "write -P 0x01 0 1M")
        catch_up(a, b)

        backlog(a, b, args.mib, 1)
        t0, c0 = time.monotonic(), fetched(b)
        b.marsadm("connect", "r")
        catch_up(a, b)
        free = (fetched(b) - c0) / (time.monotonic() - t0)
        print(f"unlimited catch-up:            {free / MIB:8.1f} MiB/s ({args.mib} MiB)")

        backlog(a, b, args.mib, 1 + args.mib)
        ok &= limited(a, b, "traffic-out-limit", f"traffic-out-limit {args.limit_mib:g} MiB/s on a: ", limit, args)
        a.marsadm("set-traffic-out-limit-value", "0")
        lifted, n = rate_over(b, 1.0)
        ok &= lifted > 2 * limit
        print(f"lifted, the next second:       {lifted / MIB:8.1f} MiB/s ({n / MIB:.0f} MiB), "
              f"{lifted / free:.2f} of the unlimited rate  [{'ok' if lifted > 2 * limit else 'MISSED'}: "
              f"above twice the limit]")
        catch_up(a, b)

        backlog(a, b, args.mib, 1 + 2 * args.mib)
        ok &= limited(b, b, "traffic-in-limit", f"traffic-in-limit {args.limit_mib:g} MiB/s on b:  ", limit, args)
        b.marsadm("set-traffic-in-limit-value", "0")
        catch_up(a, b)
    finally:
        cleanup(base, nodes)
        shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
