#!/usr/bin/env python3
"""mars-exporter benchmark: the time of one scrape, and the exporter's memory, for a big cluster.

Run:  python bench/bench_exporter.py [--nodes 8] [--resources 50] [--logs 3] [--rounds 30] [--dir DIR]

Writes bench_status.py's synthetic tree (--nodes nodes, each a member of every one of
--resources resources), starts real ``mars-exporter`` processes on it (no marsd: the snapshot
comes from the tree, as while marsd is down; with marsd the counters add a few dozen series per
resource) and times, --rounds times each over HTTP on loopback: a scrape in the text format
0.0.4 and one in OpenMetrics (as served by default: this node's own members, 50 here), a scrape
of an exporter with ``--members all`` (every member of the cluster), and beside them the
snapshot build + findings alone in this process, without and with a warm TreeCache (the
exporter keeps one: that is the floor of a scrape). It prints the exporter's resident memory
after the scrapes (VmRSS and its peak VmHWM), the series per scrape, and, when Debian's
prometheus-node-exporter is installed, the scrape time of node_exporter on the same machine in
the same run as a peer figure, with the ratios.

Goal: a scrape of 8 nodes x 50 resources under 100 ms (median).
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from bench_status import fmt, setup_tree, timed, tree_args  # noqa: E402
from bench_write import print_goals, remove_workdir  # noqa: E402

from mars.engine import model  # noqa: E402

GOAL_MS = 100.0
BIN = Path(sys.executable).parent
NODE_EXPORTER = Path("/usr/bin/prometheus-node-exporter")
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not answer within {timeout:g} s")


def memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def series(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def main() -> int:
    a = tree_args(__doc__.split("\n\n")[0], rounds=30)
    base = Path(tempfile.mkdtemp(prefix="mars-exporter-bench-", dir=a.dir))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        root, nodes = setup_tree(a, base, "mars-exporter benchmark")
        urls = {}
        for members in ("local", "all"):
            urls[members] = f"http://127.0.0.1:{free_port()}/metrics"
            procs.append(subprocess.Popen([str(BIN / "mars-exporter"), "--mars-dir", str(root), "--host", nodes[0],
                                           "--listen", urls[members].split("/")[2], "--members", members],
                                          stdout=subprocess.DEVNULL))
            wait_http(urls[members], procs[-1])
        url = urls["local"]
        rows = []
        floor_ms, _ = timed(lambda: model.findings(model.build(root, nodes[0])), a.rounds)
        rows.append(("snapshot build + findings (in process)", floor_ms))
        cache = model.TreeCache()  # what the exporter keeps between scrapes
        cached_ms, _ = timed(lambda: model.findings(model.build(root, nodes[0], cache=cache)), a.rounds)
        rows.append(("the same with a warm TreeCache (in process)", cached_ms))
        text_ms, text = timed(lambda: get(url), a.rounds)
        rows.append((f"scrape, text 0.0.4 ({len(text) / 1024:,.0f} KiB, {series(text):,} series)", text_ms))
        om_ms, om = timed(lambda: get(url, OPENMETRICS), a.rounds)
        rows.append((f"scrape, OpenMetrics ({len(om) / 1024:,.0f} KiB)", om_ms))
        all_ms, every = timed(lambda: get(urls["all"]), max(3, a.rounds // 3))
        rows.append((f"scrape --members all ({series(every):,} series)", all_ms))
        mem = memory_kib(procs[0].pid)
        peer_ms = None
        if NODE_EXPORTER.exists():
            peer_url = f"http://127.0.0.1:{free_port()}/metrics"
            peer = subprocess.Popen([str(NODE_EXPORTER), f"--web.listen-address={peer_url.split('/')[2]}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(peer)
            wait_http(peer_url, peer)
            peer_ms, peer_text = timed(lambda: get(peer_url), a.rounds)
            rows.append((f"peer: node_exporter scrape ({series(peer_text):,} series)", peer_ms))
        print()
        print(f"  {'what':<48} {'min ms':>8} {'median':>8} {'max ms':>8}   ({a.rounds} rounds)")
        print("  " + "-" * 78)
        for what, ms in rows:
            print(f"  {what:<48} {fmt(ms)}")
        print()
        med = statistics.median(text_ms)
        print(f"  series per scrape (default --members local): {series(text):,}; exporter memory after the scrapes: "
              f"RSS {mem.get('VmRSS', 0) / 1024:.1f} MiB, peak {mem.get('VmHWM', 0) / 1024:.1f} MiB")
        print(f"  scrape / (build + findings): {med / statistics.median(floor_ms):.2f}x, "
              f"/ (cached build + findings): {med / statistics.median(cached_ms):.2f}x")
        if peer_ms is not None:
            print(f"  scrape / node_exporter scrape: {med / statistics.median(peer_ms):.2f}x")
        print()
        print_goals([(med < GOAL_MS, f"scrape of {a.nodes} nodes x {a.resources} resources < {GOAL_MS:.0f} ms: "
                                     f"median {med:.1f} ms")])
        return 0
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        remove_workdir(base, a.keep)


if __name__ == "__main__":
    sys.exit(main())
