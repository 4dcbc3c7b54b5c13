#!/usr/bin/env python3
"""Status model benchmark: how long one snapshot (and its findings) takes for a big cluster.

Run:  python bench/bench_status.py [--nodes 8] [--resources 50] [--logs 3] [--rounds 30] [--dir DIR]

Writes a synthetic tree into a temporary directory (removed at the end): --nodes nodes, each a
member of every one of --resources resources (the worst case: every node's entries for every
resource), each member with the entries marsd writes (switches, actual state, rates, positions,
syncstatus, replay, disk size) and --logs version entries per member, plus --logs local log files
per resource. Then it times ``model.build`` (the whole tree read in one pass and turned into the
typed snapshot), ``findings`` (when engine/findings.py exists) and ``Snapshot.to_json`` + JSON
encoding, --rounds times each, and prints min / median / max in ms with the goal:
snapshot of 8 nodes x 50 resources < 100 ms. The original's manual states limits of 10 nodes and
30 resources.

The first round reads a cold dentry cache only if the machine dropped it; the median is the
figure, the min and max show the noise of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_write import machine_facts, print_goals, remove_workdir  # noqa: E402

from mars.engine import model  # noqa: E402
from mars.engine.tree import Tree  # noqa: E402

GOAL_MS = 100.0
GIB = 1 << 30


def make_tree(root: Path, nodes: list[str], resources: int, logs: int) -> int:
    """The synthetic tree; returns the number of entries written."""
    now = time.time()
    t = Tree(root, nodes[0])
    n = 0

    def put(path: str, value: object) -> None:
        nonlocal n
        t.set(path, str(value), durable=False)
        n += 1

    put("uuid", "bench_1")
    for i, h in enumerate(nodes):
        put(f"ips/ip-{h}", f"127.0.{i // 250}.{2 + i % 250}")
        put(f"actual-{h}/time", f"{now:.9f}")
        put(f"actual-{h}/alive", 1)
        put(f"actual-{h}/version", "0.1.0")
        put(f"actual-{h}/rest-space", 60 * GIB)
        put(f"actual-{h}/total-space", 250 * GIB)
        for tun, v in (("interval", 1), ("checkpoint-interval", 1), ("logrot-auto", 4 * GIB), ("sync-limit", 0)):
            put(f"actual-{h}/tunable-{tun}", v)
    size = 100 * GIB
    log_len = 1 << 30
    for r in range(resources):
        res = f"r{r:03d}"
        d = f"resource-{res}"
        primary = nodes[r % len(nodes)]
        put(f"{d}/size", size)
        put(f"{d}/primary", primary)
        for seq in range(1, logs + 1):
            f = root / d / f"log-{seq:09d}-{primary}"
            with open(f, "wb") as fh:
                fh.truncate(log_len)
        put(f"{d}/actual-{primary}/log-pos", f"log-{logs:09d}-{primary},{log_len}")
        for h in nodes:
            put(f"{d}/data-{h}", f"/dev/vg/{res}")
            put(f"{d}/actsize-{h}", size)
            for sw in ("attach", "connect", "sync", "allow-replay"):
                put(f"{d}/todo-{h}/{sw}", 1)
            for key, v in (("is-attached", 1), ("is-primary", int(h == primary)), ("is-syncing", 0),
                           ("is-copying", int(h != primary)), ("is-replaying", int(h != primary)),
                           ("open-count", 0), ("replay-code", 1), ("amount-sync_rate", 0),
                           ("amount-file_rate", 1 << 20), ("amount-replay_rate", 1 << 20),
                           ("fetch-pos", f"log-{logs:09d}-{primary},{log_len - 4096}")):
                put(f"{d}/actual-{h}/{key}", v)
            put(f"{d}/syncstatus-{h}", size)
            put(f"{d}/replay-{h}", f"log-{logs:09d}-{primary},{log_len - 8192},0")
            prev = "0" * 32
            for seq in range(1, logs):
                digest = f"{seq:032x}"
                put(f"{d}/version-{seq:09d}-{h}", f"{digest},log-{seq:09d}-{primary},{log_len}:{prev}")
                prev = digest
    return n


def tree_args(description: str, rounds: int) -> argparse.Namespace:
    """The synthetic tree's options, shared with bench_tui.py."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--resources", type=int, default=50)
    ap.add_argument("--logs", type=int, default=3, help="log files (and version entries per member) per resource")
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--dir", default="/var/tmp", help="where to make the temporary tree")
    ap.add_argument("--keep", action="store_true")
    return ap.parse_args()


def setup_tree(a: argparse.Namespace, base: Path, title: str) -> tuple[Path, list[str]]:
    """Write the synthetic tree under ``base`` and print the header: machine, file system, tree."""
    nodes = [f"n{i:02d}" for i in range(a.nodes)]
    root = base / "mars"
    root.mkdir(mode=0o700)
    t0 = time.perf_counter()
    entries = make_tree(root, nodes, a.resources, a.logs)
    setup_s = time.perf_counter() - t0
    print(f"{title}  {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    m = machine_facts(base)
    print(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, kernel {m['kernel']}, python {m['python']}")
    print(f"fs:      {m['df_T']}")
    print(f"tree:    {a.nodes} nodes x {a.resources} resources (every node a member of every resource), "
          f"{a.logs} logs each: {entries:,} entries, written in {setup_s:.1f} s under {root}")
    return root, nodes


def timed(fn, rounds: int) -> tuple[list[float], object]:
    out = []
    result = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out, result


def fmt(ms: list[float]) -> str:
    return f"{min(ms):8.1f} {statistics.median(ms):8.1f} {max(ms):8.1f}"


def main() -> int:
    a = tree_args(__doc__.split("\n\n")[0], rounds=30)
    base = Path(tempfile.mkdtemp(prefix="mars-status-bench-", dir=a.dir))
    try:
        root, nodes = setup_tree(a, base, "MARS status model benchmark")
        rows = []
        build_ms, snap = timed(lambda: model.build(root, nodes[0]), a.rounds)
        rows.append(("model.build (tree -> Snapshot)", build_ms))
        try:
            from mars.engine.model.findings import findings
        except ImportError:
            findings = None
        if findings is not None:
            f_ms, fs = timed(lambda: findings(snap), a.rounds)
            rows.append((f"findings(snapshot) ({len(fs)} findings)", f_ms))
            both_ms, _ = timed(lambda: findings(model.build(root, nodes[0])), a.rounds)
            rows.append(("build + findings", both_ms))
        j_ms, doc = timed(lambda: json.dumps(snap.to_json()), a.rounds)
        rows.append((f"to_json + json.dumps ({len(doc) / 1024:,.0f} KiB)", j_ms))
        print()
        print(f"  {'what':<44} {'min ms':>8} {'median':>8} {'max ms':>8}   ({a.rounds} rounds)")
        print("  " + "-" * 74)
        for what, ms in rows:
            print(f"  {what:<44} {fmt(ms)}")
        print()
        total = rows[2][1] if findings is not None else build_ms
        med = statistics.median(total)
        print_goals([(med < GOAL_MS, f"snapshot{' + findings' if findings else ''} of {a.nodes} nodes x "
                                     f"{a.resources} resources < {GOAL_MS:.0f} ms: median {med:.1f} ms")])
        return 0
    finally:
        remove_workdir(base, a.keep)


if __name__ == "__main__":
    sys.exit(main())
