#!/usr/bin/env python3
"""WAN benchmark: does distance reach the application, and does the fetcher fill a long fat pipe?

Run:  python bench/bench_wan.py [--gib 2] [--rate 1gbit] [--delays 0,50,200] [--runtime 15] [--dir DIR]

Two marsd on this machine, the primary ``a`` on 127.0.0.2 and the secondary ``b`` on 127.0.0.3,
one peer port, joined as tests/harness.py does it. Between them runs bench/wanlink.py, a userspace
WAN link (there is no netem here), one proxy per direction of connection set-up:

* b -> a (b's fetch and tree links): ``iptables -t nat -A OUTPUT -s B -d A -p tcp --dport PORT
  -j DNAT --to-destination 127.0.0.1:P1``, proxy P1 forwards to A:PORT;
* a -> b (a's tree feeds): the same rule the other way onto proxy P2.

marsd binds its own address as the source of every peer link (engine/peer/link.py, ``local_ip``)
and dials the address in the tree (``ips/ip-<host>``), so the rules catch exactly the links
between a and b and nothing of other clusters on the machine (the port is this run's); the proxies
leave from 127.0.0.1, which no rule matches. Every byte of every a <-> b link then crosses the
link's delay (one way, each direction) and rate (each direction, shared by the links). The rules
go at the end, on success, error or Ctrl-C (and b's fetch and replay switches with the cluster).

b's replay is paused for the whole run: the figures are of the link and the fetcher, not of b's
disk. For each one-way delay of --delays (ms):

(a) write latency at the primary: fio, nbd engine, 4 KiB random writes at QD 1 for --runtime s,
    --rounds times per delay in alternating order (the figures are the medians: the machine is shared)
    (MARS acknowledges a write only once its log record is durable, so each one includes an
    fdatasync); b is connected and fetching the whole time. p50 / p99 completion latency.
(b) catch-up: b's fetch is paused (``marsadm disconnect r``), --gib of 1 MiB sequential writes go
    through a's export (fio, QD 8), the fetch is resumed (``marsadm connect r``) and the time until
    b's copies of a's log files are as long as a's is taken: log bytes / time, against the rate.

Goals: p99(200 ms) / p99(0 ms) <= 1.1 (a write waits for the local log only, never for a peer),
and catch-up / rate >= 0.80 at 50 ms and at 200 ms (the fetcher keeps a bandwidth-delay product
of requests in flight). The 0 ms catch-up is this machine's ceiling through the proxy (CPU: TLS
and the proxy in Python on shared cores); the ratio to it is printed too.

What the link does not model: TCP's own window over the round trip (the proxy ends TCP on each
side). On a real path one connection moves at most tcp_rmem's maximum per round trip; the run
prints that ceiling for each delay, and the fetcher's links in parallel must exceed the rate.

Everything lives in one temporary directory under --dir (default /var/tmp); all processes, the
iptables rules and the directory (unless --keep) go at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replication import A_IP, B_IP, GIB, MIB, Node, cpu_seconds, gib_arg, pick_port  # noqa: E402
from bench_write import Procs, machine_facts, remove_workdir, run_guarded, sh, wait_until, write_json  # noqa: E402
from wanlink import Nat, Path as WanPath, WanLink, parse_rate, window_ceiling  # noqa: E402

from mars.engine.model import human_bytes  # noqa: E402

RES = "r"
PROXY_IP = "127.0.0.1"
GOAL_P99_RATIO = 1.1
GOAL_CATCHUP_VS_RATE = 0.80


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Procs()
        self.nat = Nat()
        self.base: Path | None = None
        self.port = 0
        self.a: Node | None = None
        self.b: Node | None = None
        self.env = {k: v for k, v in os.environ.items() if k != "MARS_DIR"}
        self.commands: list[str] = []
        self.links: list[WanLink] = []
        self._stack = contextlib.ExitStack()
        self.res: dict = {"latency": {}, "catchup": {}, "runs": {}}

    @staticmethod
    def status(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    # -- set-up ----------------------------------------------------------------------------------

    def setup(self) -> None:
        for tool in ("fio", "iptables"):
            if not subprocess.run(["which", tool], capture_output=True).returncode == 0:
                sys.exit(f"{tool} not found")
        self.base = Path(tempfile.mkdtemp(prefix="mars-wan-", dir=self.args.dir))
        self.port = self.args.port or pick_port()
        need = 2 * self.args.gib * (len(self.args.delays) + 1)
        free = os.statvfs(self.base).f_bavail * os.statvfs(self.base).f_frsize
        if free < need * 1.1:
            raise RuntimeError(f"{self.base} has {human_bytes(free)} free; this run needs about {human_bytes(need)}")

    def start(self) -> None:
        """a, the WAN link, then b: b's first connection to a already crosses it."""
        self.a, self.b = Node(self, "a", A_IP), Node(self, "b", B_IP)
        a, b = self.a, self.b
        a.marsadm("--ip", A_IP, "create-cluster")
        a.start()
        secret = self.base / "secret-b.pem"
        secret.write_text(a.marsadm("export-secret").stdout)
        os.chmod(secret, 0o600)
        b.marsadm("--ip", B_IP, "join-cluster", f"{A_IP}:{self.port}", "--secret-file", str(secret))
        path = WanPath(0.0, self.args.rate)
        for src, dst in ((B_IP, A_IP), (A_IP, B_IP)) if not self.args.direct else ():
            link = self._stack.enter_context(WanLink((PROXY_IP, 0), (dst, self.port), path, path).thread())
            self.links.append(link)
            self.commands.append(sh(self.nat.dnat(src, dst, self.port, f"{PROXY_IP}:{link.port}")))
            self.commands.append(f"python bench/wanlink.py --listen {PROXY_IP}:{link.port} --target {dst}:{self.port} "
                                 f"--rate {self.args.rate:.0f} --delay <ms>ms &")
        b.start()
        wait_until(lambda: a.value("ips/ip-b") == B_IP and b.value("actual-a/alive") == "1", 60,
                   "a and b to see each other across the link")
        size = str(self.args.gib)
        a.marsadm("create-resource", RES, str(self.base / "a.img"), size)
        b.wait_value(f"resource-{RES}/size", size, 60)
        b.marsadm("join-resource", RES, str(self.base / "b.img"), "--create")
        b.wait_value(f"resource-{RES}/syncstatus-b", size, 300)
        b.marsadm("pause-replay", RES)
        b.wait_value(f"resource-{RES}/actual-b/is-replaying", "0", 60)
        for link in self.links:
            if link.counters.connections == 0 and not self.args.direct:
                raise RuntimeError(f"no connection crossed the WAN link to :{link.target[1]}: the NAT rule missed")

    def set_delay(self, ms: float) -> None:
        path = WanPath(ms / 1000, self.args.rate)
        for link in self.links:
            link.set(up=path, down=path)

    def teardown(self) -> None:
        for n in (self.b, self.a):
            if n is not None:
                n.stop()
        self.nat.clear()
        self._stack.close()
        self.procs.stop_all()
        remove_workdir(self.base, self.args.keep)

    # -- measurements ----------------------------------------------------------------------------

    def log_bytes(self, node: Node) -> int:
        d = node.mars_dir / f"resource-{RES}"
        return sum(p.stat().st_size for p in d.glob("log-*") if p.is_file())

    def fio(self, name: str, extra: list[str], timeout: float) -> dict:
        out = self.base / f"fio-{name}.json"
        cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={self.a.uri(RES)}", *extra,
               "--output-format=json", f"--output={out}"]
        self.commands.append(sh(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode:
            raise RuntimeError(f"{sh(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}{r.stdout[-2000:]}")
        text = out.read_text()
        return json.loads(text[text.index("{"):])["jobs"][0]["write"]

    def latency(self, ms: float) -> None:
        self.set_delay(ms)
        self.b.marsadm("connect", RES)
        self.b.wait_value(f"resource-{RES}/actual-b/is-copying", "1", 60)
        wait_until(lambda: self.log_bytes(self.b) >= self.log_bytes(self.a), 600, "b to fetch a's whole log")
        self.status(f"  latency at {ms:g} ms: fio 4 KiB random writes, QD 1, {self.args.runtime} s ...")
        fetched0 = self.log_bytes(self.b)
        w = self.fio(f"lat-{ms:g}", ["--rw=randwrite", "--bs=4k", "--iodepth=1", f"--size={self.args.gib}",
                                     "--time_based", f"--runtime={self.args.runtime}", "--ramp_time=1",
                                     "--percentile_list=50:99:99.9"], self.args.runtime + 120)
        pct = w["clat_ns"]["percentile"]
        # b fetched while a wrote: the link carried the live log, so its delay was in play
        wait_until(lambda: self.log_bytes(self.b) >= self.log_bytes(self.a), 120, "b to follow a's log")
        run = {"p50_ms": pct["50.000000"] / 1e6, "p99_ms": pct["99.000000"] / 1e6, "p999_ms": pct["99.900000"] / 1e6,
               "mean_ms": w["clat_ns"]["mean"] / 1e6, "iops": w["iops"], "fetched_live": self.log_bytes(self.b) - fetched0}
        self.res["runs"].setdefault(ms, []).append(run)
        runs = self.res["runs"][ms]
        # the median of the rounds: the machine is shared, one round's p99 is another process's burst
        self.res["latency"][ms] = {k: statistics.median(r[k] for r in runs) for k in run}
        self.status(f"    p50 {run['p50_ms']:.2f} ms, p99 {run['p99_ms']:.2f} ms, {run['iops']:.0f} IOPS; "
                    f"b fetched {human_bytes(run['fetched_live'])} meanwhile")

    def catchup(self, ms: float) -> None:
        a, b = self.a, self.b
        self.set_delay(0)
        b.marsadm("disconnect", RES)
        b.wait_value(f"resource-{RES}/actual-b/is-copying", "0", 60)
        self.status(f"  catch-up at {ms:g} ms: writing {human_bytes(self.args.gib)} on a while b's fetch is paused ...")
        self.fio(f"load-{ms:g}", ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={self.args.gib}"], 1800)
        target, start = self.log_bytes(a), self.log_bytes(b)
        self.set_delay(ms)
        os.sync()  # the load's dirty pages are not written back on the catch-up's time
        cpu0 = {"a": cpu_seconds(a.proc.pid), "b": cpu_seconds(b.proc.pid), "proxy": time.process_time()}
        up0 = self.links[0].counters.down_bytes if self.links else 0
        t0 = time.monotonic()
        b.marsadm("connect", RES)
        samples = []
        stored = None  # when b's copies first grew: the link's first byte may be the tree exchange's
        while (got := self.log_bytes(b)) < target:
            now = time.monotonic()
            if stored is None and got > start:
                stored = now - t0
            # what the link delivered to b (b's own copy grows in bursts: replies are stored in order)
            samples.append((now - t0, self.links[0].counters.down_bytes - up0 if self.links else got - start))
            if now - t0 > self.args.timeout:
                raise RuntimeError(f"b fetched {human_bytes(got - start)} of {human_bytes(target - start)} in "
                                   f"{self.args.timeout} s\n{b.log()}")
            b.check_alive()
            time.sleep(0.01)  # poll
        secs = time.monotonic() - t0
        cpu1 = {"a": cpu_seconds(a.proc.pid), "b": cpu_seconds(b.proc.pid), "proxy": time.process_time()}
        n = target - start
        # steady rate: the middle 80 % of the bytes, without the ramp (connect, TLS, the first replies)
        mid = [(t, x) for t, x in samples if 0.1 * n <= x <= 0.9 * n]
        steady = (mid[-1][1] - mid[0][1]) / (mid[-1][0] - mid[0][0]) if len(mid) > 2 and mid[-1][0] > mid[0][0] else None
        first = next((t for t, x in samples if x > 0), None)
        self.res["catchup"][ms] = {
            "bytes": n, "secs": secs, "bytes_s": n / secs, "steady_bytes_s": steady, "first_byte_s": first,
            "first_stored_s": stored,
            "link_bytes": self.links[0].counters.down_bytes - up0 if self.links else None,
            "cpu_s": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0 if cpu0[k] is not None and cpu1[k] is not None},
            "window_ceiling_bytes_s": window_ceiling(2 * ms / 1000) if ms else None}
        c = self.res["catchup"][ms]
        self.status(f"    {human_bytes(n)} in {secs:.2f} s: {n / secs / MIB:,.1f} MiB/s = {n / secs / self.args.rate:.2f} "
                    f"of the link (steady {steady / MIB if steady else 0:,.1f} MiB/s, first byte after "
                    f"{first or 0:.2f} s, first stored after {stored or 0:.2f} s); CPU s {c['cpu_s']}")

    # -- report ----------------------------------------------------------------------------------

    def report(self) -> dict:
        args, lat, cu = self.args, self.res["latency"], self.res["catchup"]
        rate = args.rate
        print(f"\nWAN benchmark: a (127.0.0.2) -> b (127.0.0.3) through bench/wanlink.py, link rate "
              f"{rate * 8 / 1e9:g} Gbit/s ({rate / MIB:,.1f} MiB/s) each way, one-way delay as given, "
              f"{human_bytes(args.gib)} of log per catch-up")
        facts = machine_facts(self.base)
        print(f"machine: {facts.get('cpu', '?')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        print(f"\n{'one-way delay':>13} {'write p50 ms':>12} {'p99 ms':>8} {'p99.9 ms':>9} {'IOPS':>7} "
              f"{'catch-up MiB/s':>14} {'of link':>7} {'steady MiB/s':>12} {'1st byte s':>10} {'stored s':>8} {'1-conn TCP ceiling':>18}")
        for ms in args.delays:
            lr, cr = lat.get(ms), cu.get(ms)
            ceil = cr and cr["window_ceiling_bytes_s"]
            print(f"{ms:>10g} ms {lr['p50_ms'] if lr else 0:>12.2f} {lr['p99_ms'] if lr else 0:>8.2f} "
                  f"{lr['p999_ms'] if lr else 0:>9.2f} {lr['iops'] if lr else 0:>7.0f} "
                  f"{cr['bytes_s'] / MIB if cr else 0:>14,.1f} {cr['bytes_s'] / rate if cr else 0:>7.2f} "
                  f"{(cr['steady_bytes_s'] or 0) / MIB if cr else 0:>12,.1f} "
                  f"{(cr['first_byte_s'] or 0) if cr else 0:>10.2f} {(cr['first_stored_s'] or 0) if cr else 0:>8.2f} "
                  f"{(f'{ceil / MIB:,.0f} MiB/s') if ceil else '-':>18}")
        goals = []
        lo, hi = min(args.delays), max(args.delays)
        if lo in lat and hi in lat and lo != hi:
            ratio = lat[hi]["p99_ms"] / lat[lo]["p99_ms"]
            self.res["p99_ratio"] = ratio
            goals.append((ratio <= GOAL_P99_RATIO, f"write p99 at {hi:g} ms / at {lo:g} ms = {ratio:.2f} "
                                                   f"(goal <= {GOAL_P99_RATIO})"))
        for ms in args.delays:
            if ms and ms in cu:
                ratio = cu[ms]["bytes_s"] / rate
                self.res[f"catchup_ratio_{ms:g}"] = ratio
                vs0 = f", {cu[ms]['bytes_s'] / cu[lo]['bytes_s']:.2f} of the {lo:g} ms catch-up" if lo in cu else ""
                goals.append((ratio >= GOAL_CATCHUP_VS_RATE, f"catch-up at {ms:g} ms / link rate = {ratio:.2f} "
                                                             f"(goal >= {GOAL_CATCHUP_VS_RATE}){vs0}"))
        print(f"\nlatency: fio clat (request sent .. reply received), a's NBD socket, b connected and fetching; "
              f"median of {args.rounds} runs of {args.runtime} s per delay, in alternating order; p99 of each run:")
        for ms in args.delays:
            print(f"  {ms:g} ms: " + ", ".join(f"{r['p99_ms']:.2f}" for r in self.res["runs"].get(ms, [])))
        print("catch-up: b's log copies from 'marsadm connect' until they are as long as a's; 'steady': what the link "
              "delivered during the middle 80 % of the bytes (without the ramp); '1st byte': from 'marsadm connect' (a process start, the fetcher's TLS "
              "handshake and Hello, one request) to the first byte on the link (the tree exchange's too); 'stored': to the first log byte in b's copies. 1-conn TCP ceiling: tcp_rmem max / RTT, what one real TCP connection could "
              "carry (not modelled by the proxy).")
        print("\ngoals:")
        for ok, text in goals:
            print(f"  [{'PASS' if ok else 'MISS'}] {text}")
        print("\ncommands:")
        for c in self.commands[:8]:
            print(f"  {c}")
        print(f"\ncommand: {sys.executable} {' '.join(sys.argv)}")
        return {**self.res, "rate": rate, "gib": args.gib, "delays": args.delays, "machine": facts}

    def work(self) -> None:
        self.status(f"setting up in {self.args.dir} ...")
        self.setup()
        self.start()
        for i in range(self.args.rounds):
            # alternating order: a drift of the machine's load during the run favours no delay
            for ms in (self.args.delays if i % 2 == 0 else reversed(self.args.delays)):
                self.latency(ms)
        for ms in self.args.delays:
            self.catchup(ms)


def delays_arg(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=gib_arg, default=2 * GIB, help="GiB of log per catch-up, and the resource's size (2)")
    ap.add_argument("--rate", type=parse_rate, default=parse_rate("1gbit"), help="link rate each way (1gbit)")
    ap.add_argument("--delays", type=delays_arg, default=[0.0, 50.0, 200.0], help="one-way delays in ms (0,50,200)")
    ap.add_argument("--runtime", type=int, default=15, help="seconds of each latency run (15)")
    ap.add_argument("--rounds", type=int, default=3, help="latency runs per delay, in alternating order; "
                    "the figures are their medians (3)")
    ap.add_argument("--dir", default="/var/tmp", help="where to make the temporary directory")
    ap.add_argument("--port", type=int, default=0, help="peer port (default 7777 if free, else a free one)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a catch-up may take (900)")
    ap.add_argument("--direct", action="store_true", help="diagnostic: no WAN link (no proxy, no rules) at all")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    bench = Bench(args)
    data: dict = {}

    def work() -> None:
        bench.work()
        data.update(bench.report())
    if run_guarded(work, bench.teardown):
        return 130
    if args.json:
        write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

