#!/usr/bin/env python3
"""Quiet-cluster benchmark: what an idle cluster costs each node, and how fast one change spreads.

Run:  python bench/bench_quiet.py [--configs 2x1,4x1,8x1,12x1,2x50,8x50] [--quick] [--window 20] [--settle 10] [--profile DIR]

What issue 14 asked for, measured. Each configuration ``NxR`` is a fresh live cluster of N marsd on
127.0.0.2 .. 127.0.0.(N+1), one peer port for all, joined the way tests/harness.py and
bench_replication.py do it (create-cluster, export-secret, join-cluster IP:PORT --secret-file), every
marsd with its production defaults (``--interval 1``). R resources on sparse images (64 MiB) are
created on the first node and joined with ``--create`` on every other one. When every sync is done,
every node's replay equals the primary's and every node knows every member, the cluster idles for
--settle seconds, and then over --window seconds:

* CPU per node: utime + stime of each marsd (/proc/PID/stat), in % of one core;
* bytes sent per node per second: ``bytes_sent`` of every TCP socket the marsd owns
  (``ss -tinpHe``, tcp_info), sampled at the start, every --sample seconds and at the end;
* the tree's entry count per node (symlinks under its mars dir, as ``find -type l | wc -l``).

After the window, ``marsadm pause-replay`` of one resource on the last node is timed until every
other node's tree holds the new ``resource-<res>/todo-<last>/allow-replay`` = 0 (read with
os.readlink every 20 ms), then the same for ``resume-replay``.

A configuration with R > 1 grows in stages (--stages, default 10 and 25 resources, then R), measured
at each, so that a cluster that takes too long to set up (--setup-limit, default 300 s) still leaves
figures for fewer resources. The goals are issue 14's; the bench prints them with what it measured
and whether they are met. Each marsd's tree-exchange counters (control socket) are printed too:
pulls, whole-tree pulls and repairs in the window (a quiet cluster needs none of the last two).

--profile DIR records the first node (the primary of every resource) and the last one with
py-spy over each window (collapsed stacks, DIR/<config>-<host>.txt), to see where an idle node's
CPU goes; the figures of such a run include py-spy's load on the machine.

All processes started here are stopped, and the directory removed, on success, error, Ctrl-C or
SIGTERM (--keep keeps the directory).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_replication as repl  # noqa: E402  (its Node: one marsd, its marsadm, its log)
from bench_write import (Procs, machine_facts, parse_size, remove_workdir, run_guarded, run_text, sh,  # noqa: E402
                         wait_until, write_json)

from mars.engine.entry import DELETED  # noqa: E402
from mars.engine.marsadm import main as marsadm_main  # noqa: E402
from mars.engine.peer import protocol as P  # noqa: E402
from mars.engine.tree import Tree  # noqa: E402
from mars.engine.trigger import poke  # noqa: E402

BIN = Path(sys.executable).parent
# 2x50: the tree grows at a node count that does not saturate 2 CPUs, so bytes vs. tree size can be judged
DEFAULT_CONFIGS = "2x1,4x1,8x1,12x1,2x50,8x50"
QUICK_CONFIGS = "2x1,4x1"

GOAL_CPU_PCT = 1.0  # idle CPU per node <= 1 % of a core ...
GOAL_CPU_AT = (8, 50)  # ... at 8 nodes x 50 resources
GOAL_PROP_S = 2.0  # one changed entry seen by every other node within 2 s ...
GOAL_PROP_NODES = 12  # ... at 12 nodes, default interval
GOAL_BYTES_RATIO = 1.5  # "independent of the tree's size": within 1.5x while the tree grows >= 2x


class NotSettled(Exception):
    """A configuration's setup ran past --setup-limit (what is still missing is the message)."""


def config_arg(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", part)
        if not m or not 2 <= int(m.group(1)) <= 250 or int(m.group(2)) < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: give NODESxRESOURCES, 2 to 250 nodes, e.g. 8x50")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def link(node: repl.Node, rel: str) -> str | None:
    """A tree entry's value as the node has it (a tombstone or no entry: None)."""
    try:
        v = os.readlink(node.mars_dir / rel)
    except OSError:
        return None
    return None if v == DELETED else v


def count_entries(d: Path) -> tuple[int, int]:
    """Symlinks below ``d`` (what ``find d -type l | wc -l`` counts) and how many are tombstones."""
    links = dead = 0
    with contextlib.suppress(OSError), os.scandir(d) as it:
        for e in it:
            if e.is_symlink():
                links += 1
                with contextlib.suppress(OSError):
                    dead += os.readlink(e.path) == DELETED
            elif e.is_dir(follow_symlinks=False):
                a, b = count_entries(Path(e.path))
                links, dead = links + a, dead + b
    return links, dead


def listing_bytes(node: repl.Node) -> int:
    """What one reply to a whole-tree TreeRequest from this node weighs on the wire before TLS:
    its tree listing (Tree.walk, as the peer services answer it) in frames of the engine's codec."""
    entries = Tree(node.mars_dir, node.host).walk(())
    return sum(len(P.encode(P.TreeEntries(req=1, entries=b))) for b in P.entry_batches(entries))


def port_free_on(port: int, ips: list[str]) -> bool:
    try:
        with contextlib.ExitStack() as stack:
            for ip in ips:
                s = stack.enter_context(socket.socket())
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((ip, port))
    except OSError:
        return False
    return True


def socket_counts(pids: set[int]) -> dict[int, tuple[int, int, int]]:
    """Every connected TCP socket of these processes: inode -> (pid, bytes_sent, bytes_received).

    From ``ss -tinpHe``: the kernel's tcp_info counters (what went onto the wire, TLS included), so
    exact for every socket alive at the sample; a socket's bytes after its last sample are lost.
    """
    r = subprocess.run(["ss", "-tinpHe", "state", "connected"], capture_output=True, text=True, timeout=30)
    out: dict[int, tuple[int, int, int]] = {}
    cur: tuple[int, int] | None = None
    for line in r.stdout.splitlines():
        if line[:1] not in (" ", "\t"):
            pid, ino = re.search(r"pid=(\d+)", line), re.search(r"\bino:(\d+)", line)
            cur = (int(ino.group(1)), int(pid.group(1))) if pid and ino and int(pid.group(1)) in pids else None
            continue
        if cur is not None:
            sent, recv = re.search(r"\bbytes_sent:(\d+)", line), re.search(r"\bbytes_received:(\d+)", line)
            out[cur[0]] = (cur[1], int(sent.group(1)) if sent else 0, int(recv.group(1)) if recv else 0)
            cur = None
    return out


def exchange_counters(mars_dir: Path) -> dict[str, int]:
    """The marsd's tree-exchange counters from its control socket ({} when it does not answer)."""
    from mars.engine.model.client import request_snapshot
    reply = request_snapshot(mars_dir, cmd="counters")
    return dict((reply or {}).get("counters", {}).get("exchange") or {})


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs so far (/proc/stat); idle and iowait are not busy."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(f) - f[3] - f[4], sum(f)


def status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Cluster:
    """One configuration's live cluster. It is what bench_replication's Node needs from its bench
    (base, port, procs, commands, env), for N nodes n1 .. nN on 127.0.0.2 .. 127.0.0.(N+1)."""

    def __init__(self, root: Path, name: str, n: int, port: int, size: int) -> None:
        self.base = root / name
        (self.base / "img").mkdir(parents=True)
        self.port = port
        self.size = size
        self.procs = Procs()
        self.commands: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if k != "MARS_DIR"}
        self.nodes = [repl.Node(self, f"n{i}", f"127.0.0.{i + 1}") for i in range(1, n + 1)]
        self.resources: list[str] = []
        self.stop_notes: list[str] = []  # how the marsd stopped, when not cleanly

    @property
    def first(self) -> repl.Node:
        return self.nodes[0]

    def image(self, node: repl.Node, res: str) -> Path:
        return self.base / "img" / f"{node.host}-{res}.img"

    def marsadm_fast(self, node: repl.Node, *args: str) -> None:
        """marsadm's own main() in this process, with --no-wait: the same command without a
        Python start-up each (400 of them for 8 x 50); the caller pokes marsd and waits."""
        argv = ["--mars-dir", str(node.mars_dir), "--host", node.host, "--no-wait", *args]
        self.commands.append(sh([BIN / "marsadm", *argv]))
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = marsadm_main(argv)
        if code == 130:
            raise KeyboardInterrupt
        if code:
            raise RuntimeError(f"{self.commands[-1]} failed ({code}): {out.getvalue().strip()}\n{node.log()}")

    def wait(self, cond, deadline: float, what: str, interval: float = 0.2) -> None:
        """Until ``cond()`` returns None (it returns what is still missing), the nodes alive."""
        last: list[str | None] = [None]

        def ok() -> bool:
            for n in self.nodes:
                n.check_alive()
            last[0] = cond()
            return last[0] is None
        try:
            wait_until(ok, max(0.0, deadline - time.monotonic()), what, interval)
        except AssertionError:
            raise NotSettled(f"{what}: still {last[0]}") from None

    def start(self, deadline: float) -> None:
        a = self.first
        a.marsadm("--ip", a.ip, "create-cluster")
        a.start()
        secret = self.base / "secret.pem"
        secret.write_text(a.marsadm("export-secret").stdout)
        os.chmod(secret, 0o600)
        self.commands[-1] += f" > {secret}"
        for n in self.nodes[1:]:
            n.marsadm("--ip", n.ip, "join-cluster", f"{a.ip}:{self.port}", "--secret-file", str(secret))
            n.start()
        hosts = [n.host for n in self.nodes]
        self.wait(lambda: next((f"{n.host} does not know {h}" for n in self.nodes for h in hosts
                                if link(n, f"ips/ip-{h}") is None), None), deadline, "every node to know every node")

    def add_resources(self, names: list[str], deadline: float) -> None:
        """create-resource on n1, join-resource --create on every other node (marsadm, in process)."""
        a = self.first
        for r in names:
            self.marsadm_fast(a, "create-resource", r, str(self.image(a, r)), str(self.size))
        poke(a.mars_dir)
        self.resources += names
        self.wait(lambda: next((f"{n.host} has no resource-{r}/size or replay-{a.host}" for n in self.nodes
                                for r in names if link(n, f"resource-{r}/size") is None
                                or link(n, f"resource-{r}/replay-{a.host}") is None), None),
                  deadline, "every node to learn the new resources")
        for n in self.nodes[1:]:
            for r in names:
                self.marsadm_fast(n, "join-resource", r, str(self.image(n, r)), "--create")
            poke(n.mars_dir)

    def unsettled(self) -> str | None:
        """What keeps the cluster from being idle and complete, or None: every node knows every
        member of every resource, every secondary attached, synced, not syncing, and replayed as
        far as the primary, and every node has the last node's allow-replay = 1 (the probe)."""
        a, last = self.first, self.nodes[-1]
        for r in self.resources:
            d = f"resource-{r}"
            if link(a, f"{d}/actual-{a.host}/is-primary") != "1":
                return f"{a.host} not serving {r}"
            size, replay = link(a, f"{d}/size"), link(a, f"{d}/replay-{a.host}")
            for n in self.nodes:
                for m in self.nodes:
                    if link(n, f"{d}/data-{m.host}") is None:
                        return f"{n.host} does not know {m.host} as a member of {r}"
                if n is a:
                    continue
                if link(n, f"{d}/syncstatus-{n.host}") != size or link(n, f"{d}/actual-{n.host}/is-syncing") == "1":
                    return f"{n.host} syncing {r}"
                if link(n, f"{d}/actual-{n.host}/is-attached") != "1":
                    return f"{n.host} not attached to {r}"
                if link(n, f"{d}/replay-{n.host}") != replay:
                    return f"{n.host}'s replay of {r} != {a.host}'s ({link(n, f'{d}/replay-{n.host}')} vs {replay})"
            probe = f"{d}/todo-{last.host}/allow-replay"
            for n in self.nodes:
                if link(n, probe) != "1":
                    return f"{n.host} has {probe} = {link(n, probe)}"
        return None

    def engine_findings(self) -> tuple[list[str], str | None]:
        """Tracebacks and error lines in the marsd logs (misbehaviour, whatever the figures say),
        and a summary of the warning lines."""
        out = []
        warns: collections.Counter[str] = collections.Counter()
        for n in self.nodes:
            with contextlib.suppress(OSError):
                text = n.log_path.read_text(errors="replace")
                if "Traceback" in text:
                    i = text.index("Traceback")
                    out.append(f"marsd {n.host} logged {text.count('Traceback')} traceback(s); the first:\n"
                               f"{text[max(0, i - 600):i + 2500]}")
                errors = [ln for ln in text.splitlines() if re.search(r"\b(ERROR|CRITICAL)\b", ln)]
                if errors:
                    out.append(f"marsd {n.host}: {len(errors)} error line(s), the first: {errors[0][:400]}")
                for ln in text.splitlines():
                    if " WARNING " in ln:
                        warns[re.sub(r"\d+", "#", ln.split(" WARNING ", 1)[1])[:200]] += 1
        summary = "; ".join(f"{v} x {k!r}" for k, v in warns.most_common(4)) if warns else None
        return out, summary

    def stop(self) -> None:
        live = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        for n in live:  # all at once, then wait for each (a second SIGTERM would kill one that is exiting)
            with contextlib.suppress(ProcessLookupError):
                n.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for n in live:
            try:
                code = n.proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                code = Procs.stop(n.proc, signal.SIGKILL, 10)
                self.stop_notes.append(f"marsd {n.host} did not stop within 60 s of SIGTERM; killed")
            if code not in (0, None):
                self.stop_notes.append(f"marsd {n.host} exited with {code} on SIGTERM")
        self.procs.stop_all()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root: Path | None = None
        self.cluster: Cluster | None = None
        self.results: list[dict] = []
        self.notes: list[str] = []

    def setup(self) -> None:
        if not (BIN / "marsd").exists() or not (BIN / "marsadm").exists():
            sys.exit(f"marsd/marsadm not found next to {sys.executable}; install the project (pip install -e .)")
        if subprocess.run(["ss", "-V"], capture_output=True).returncode:
            sys.exit("ss not found; install iproute2")
        self.loadavg0 = run_text(["cat", "/proc/loadavg"])
        self.root = Path(tempfile.mkdtemp(prefix="mars-quiet-", dir=self.args.dir))
        if len(str(self.root / "12x50" / "n12" / "control.sock")) >= 100:
            raise RuntimeError(f"{self.root} is too long for a unix socket path; give a shorter --dir")
        nmax = max(n for n, _ in self.args.configs)
        ips = [f"127.0.0.{i + 1}" for i in range(1, nmax + 1)]
        port = self.args.port or 7777
        for _ in range(50):
            if port_free_on(port, ips):
                break
            if self.args.port:
                raise RuntimeError(f"--port {port} is not free on all of {ips[0]} .. {ips[-1]}")
            with socket.socket() as s:
                s.bind((ips[0], 0))
                port = s.getsockname()[1]
        else:
            raise RuntimeError(f"found no TCP port free on all of {ips[0]} .. {ips[-1]}")
        self.port = port

    def teardown(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        remove_workdir(self.root, self.args.keep)

    def stages(self, r: int) -> list[int]:
        return [1] if r == 1 else sorted({s for s in self.args.stages if 1 <= s < r} | {r})

    # -- one configuration ---------------------------------------------------------------------

    def run_config(self, n: int, r: int) -> None:
        name = f"{n}x{r}"
        out: dict = {"config": name, "nodes": n, "resources": r, "stages": [], "error": None, "not_settled": None}
        self.results.append(out)
        t0 = time.monotonic()
        deadline = t0 + self.args.setup_limit  # measuring does not count against it
        c = self.cluster = Cluster(self.root, name, n, self.port, self.args.size)
        try:
            status(f"{name}: starting {n} marsd on {c.first.ip} .. {c.nodes[-1].ip}, port {self.port} ...")
            c.start(deadline)
            out["cluster_start_s"] = round(time.monotonic() - t0, 1)
            for stage in self.stages(r):
                names = [f"r{i}" for i in range(len(c.resources) + 1, stage + 1)]
                s0 = time.monotonic()
                status(f"{name}: {len(names)} resource(s) r{len(c.resources) + 1}..r{stage}: create, join, "
                       f"wait for the syncs ...")
                try:
                    c.add_resources(names, deadline)
                    joined = time.monotonic()
                    c.wait(c.unsettled, deadline, f"{n}x{stage} to settle", 0.5)
                except NotSettled as e:
                    out["not_settled"] = (f"{n}x{stage} was not set up within --setup-limit {self.args.setup_limit:g} s "
                                          f"from the config's start ({e})")
                    status(f"  {out['not_settled']}")
                    break
                setup = {"joins_s": round(joined - s0, 1), "settle_wait_s": round(time.monotonic() - joined, 1),
                         "since_config_start_s": round(time.monotonic() - t0, 1)}
                status(f"  settled after {setup['joins_s'] + setup['settle_wait_s']:.1f} s; idle {self.args.settle:g} s, "
                       f"then a {self.args.window:g} s window ...")
                m0 = time.monotonic()
                m = self.measure(c)
                m.update(resources=stage, setup=setup)
                out["stages"].append(m)
                deadline += time.monotonic() - m0
                self.print_stage(name, m, brief=True)
        except NotSettled as e:
            out["not_settled"] = f"the {n} nodes did not start within --setup-limit {self.args.setup_limit:g} s ({e})"
            status(f"  {out['not_settled']}")
        except (RuntimeError, AssertionError, subprocess.SubprocessError, OSError) as e:
            out["error"] = f"{type(e).__name__}: {e}"
            status(f"  {name} failed: {out['error'][:3000]}")
        finally:
            out["engine"], out["warnings"] = c.engine_findings()
            out["config_s"] = round(time.monotonic() - t0, 1)
            status(f"{name}: stopping ...")
            c.stop()
            out["engine"] += c.stop_notes
            self.cluster = None
            if not self.args.keep:
                remove_workdir(c.base, False)

    def measure(self, c: Cluster) -> dict:
        a = self.args
        time.sleep(a.settle)
        entries = {n.host: count_entries(n.mars_dir) for n in c.nodes}
        pids = {n.proc.pid: n for n in c.nodes}
        load0 = run_text(["cat", "/proc/loadavg"])
        ru0 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        first = socket_counts(set(pids))
        cpu0 = {n.host: n.cpu() for n in c.nodes}
        ex0 = {n.host: exchange_counters(n.mars_dir) for n in c.nodes}
        mach0 = cpu_ticks()
        spies = self.profile(c)
        t0 = time.monotonic()
        seen = dict(first)
        end = t0 + a.window
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(a.sample, left))
            if end - time.monotonic() > 0.5:
                seen.update(socket_counts(set(pids)))
        cpu1 = {n.host: n.cpu() for n in c.nodes}
        ex1 = {n.host: exchange_counters(n.mars_dir) for n in c.nodes}
        mach1 = cpu_ticks()
        for spy in spies:
            spy.wait(timeout=30)
        t1 = time.monotonic()
        last = socket_counts(set(pids))
        seen.update(last)
        ru1 = (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
        load1 = run_text(["cat", "/proc/loadavg"])
        for n in c.nodes:
            n.check_alive()
        secs = t1 - t0
        listing = {n.host: listing_bytes(n) for n in c.nodes}
        per: dict[str, dict] = {}
        for n in c.nodes:
            socks = [ino for ino, (pid, _, _) in seen.items() if pid == n.proc.pid]
            sent = sum(seen[i][1] - (first[i][1] if i in first else 0) for i in socks)
            recv = sum(seen[i][2] - (first[i][2] if i in first else 0) for i in socks)
            cpu = (cpu1[n.host] - cpu0[n.host]) if cpu0[n.host] is not None and cpu1[n.host] is not None else None
            per[n.host] = {"ip": n.ip, "cpu_pct": None if cpu is None else 100 * cpu / secs,
                           "sent_b_s": sent / secs, "recv_b_s": recv / secs,
                           "sockets": sum(1 for ino, (pid, _, _) in last.items() if pid == n.proc.pid),
                           "entries": entries[n.host][0], "tombstones": entries[n.host][1],
                           "listing_bytes": listing[n.host],
                           "listings_per_peer_s": sent / secs / listing[n.host] / (len(c.nodes) - 1)}
        bench_cpu = sum((x1.ru_utime + x1.ru_stime) - (x0.ru_utime + x0.ru_stime) for x0, x1 in zip(ru0, ru1))
        m = {"window_s": round(secs, 2), "loadavg_start": load0, "loadavg_end": load1, "nodes": per,
             "sockets_opened": sum(1 for i in last if i not in first),
             "sockets_closed": sum(1 for i in seen if i not in last),
             "bench_cpu_pct": 100 * bench_cpu / secs}
        cpus = [p["cpu_pct"] for p in per.values() if p["cpu_pct"] is not None]
        m["cpu_pct_mean"], m["cpu_pct_max"], m["cpu_pct_all"] = statistics.mean(cpus), max(cpus), sum(cpus)
        sent = [p["sent_b_s"] for p in per.values()]
        m["sent_b_s_mean"], m["sent_b_s_max"] = statistics.mean(sent), max(sent)
        m["recv_b_s_all"] = sum(p["recv_b_s"] for p in per.values())
        m["entries_mean"] = statistics.mean(p["entries"] for p in per.values())
        # Saturated: the machine's CPUs (all of them, whoever used them) were >= 90 % busy, so the
        # per-node figures are what the nodes got, not what they would have taken.
        m["machine_busy_pct"] = 100 * (mach1[0] - mach0[0]) / max(1, mach1[1] - mach0[1])
        m["others_cpu_pct"] = max(0.0, m["machine_busy_pct"] * os.cpu_count() - m["cpu_pct_all"] - m["bench_cpu_pct"])
        m["saturated"] = m["machine_busy_pct"] >= 90
        m["listings_per_peer_s_mean"] = statistics.mean(x["listings_per_peer_s"] for x in per.values())
        m["exchange"] = {k: sum(ex1[h].get(k, 0) - ex0[h].get(k, 0) for h in ex0)
                         for k in ("pulls", "full_pulls", "repairs", "entries_sent", "pushes")}
        res = c.resources[0]
        status(f"  propagation: pause-replay {res} on {c.nodes[-1].host} ...")
        m["pause"] = self.propagation(c, res, "pause-replay", "0")
        status(f"  propagation: resume-replay {res} on {c.nodes[-1].host} ...")
        m["resume"] = self.propagation(c, res, "resume-replay", "1")
        return m

    def profile(self, c: Cluster) -> list[subprocess.Popen]:
        """With --profile DIR: py-spy records the first and the last node over the window (collapsed
        stacks, non-blocking: the nodes are not paused), to find where an idle node's CPU goes."""
        if not self.args.profile:
            return []
        self.args.profile.mkdir(parents=True, exist_ok=True)
        name = f"{len(c.nodes)}x{len(c.resources)}"
        return [subprocess.Popen([str(BIN / "py-spy"), "record", "--nonblocking", "-r", "250", "-f", "raw",
                                  "-d", str(int(self.args.window)), "-p", str(n.proc.pid),
                                  "-o", str(self.args.profile / f"{name}-{n.host}.txt")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for n in {c.nodes[0].host: c.nodes[0], c.nodes[-1].host: c.nodes[-1]}.values()]

    def propagation(self, c: Cluster, res: str, command: str, want: str) -> dict:
        """From the entry's write on the last node until every other node's tree has it.

        The write's time is its stamp (the Lamport clock: this machine's wall clock in ns, as all
        nodes run here), never earlier than the marsadm start; seen = the first 20 ms poll that
        read the new value in that node's directory.
        """
        last, others = c.nodes[-1], c.nodes[:-1]
        rel = f"resource-{res}/todo-{last.host}/allow-replay"
        cmd = last.marsadm_cmd(command, res)
        c.commands.append(sh(cmd))
        t_start = time.time()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=c.env,
                             stdin=subprocess.DEVNULL)
        written = None
        seen: dict[str, float] = {}
        deadline = t_start + self.args.timeout
        try:
            while len(seen) < len(others) and time.time() < deadline:
                now = time.time()
                if written is None and link(last, rel) == want:
                    with contextlib.suppress(OSError):
                        written = min(now, max(t_start, os.lstat(last.mars_dir / rel).st_mtime_ns / 1e9))
                for n in others:
                    if n.host not in seen and link(n, rel) == want:
                        seen[n.host] = now
                time.sleep(0.02)
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        finally:
            if p.poll() is None:
                Procs.stop(p, signal.SIGTERM, 10)
        t_end = time.time()
        if written is None and link(last, rel) == want:
            written = t_end
        base = written if written is not None else t_start
        r = {"command": sh(cmd), "rc": p.returncode, "marsadm_s": t_end - t_start,
             "write_after_start_s": None if written is None else written - t_start,
             "seen_s": {h: t - base for h, t in seen.items()},
             "missing": [n.host for n in others if n.host not in seen]}
        if p.returncode:
            r["output"] = (out or "")[-1500:]
        r["max_s"] = max(r["seen_s"].values()) if r["seen_s"] and not r["missing"] else None
        return r

    # -- report --------------------------------------------------------------------------------

    @staticmethod
    def print_stage(name: str, m: dict, brief: bool = False) -> None:
        p = print if not brief else status
        pause = m["pause"]
        prop = f"{pause['max_s']:.2f} s" if pause["max_s"] is not None else f"not seen by {','.join(pause['missing'])}"
        p(f"  {name.split('x')[0]}x{m['resources']}: CPU/node mean {m['cpu_pct_mean']:.1f} % max {m['cpu_pct_max']:.1f} %, "
          f"sent/node mean {m['sent_b_s_mean'] / 1024:,.1f} KiB/s, {m['entries_mean']:,.0f} entries/node, "
          f"pause-replay seen everywhere after {prop}")
        x = m.get("exchange") or {}
        p(f"  {name.split('x')[0]}x{m['resources']}: tree exchange in the window, all nodes: {x.get('pulls', 0):,} pulls "
          f"({x.get('full_pulls', 0)} whole-tree, {x.get('repairs', 0)} repairs), {x.get('pushes', 0):,} feeds, "
          f"{x.get('entries_sent', 0):,} entries sent")

    def goals(self) -> list[tuple[str, str, str]]:
        stages = [(o, m) for o in self.results for m in o["stages"]]
        out = []

        def busy(m: dict) -> str:
            return f"the machine was {m['machine_busy_pct']:.0f} % busy (saturated)" if m["saturated"] else ""
        # 1. idle CPU at 8 x 50
        nn, rr = GOAL_CPU_AT
        g = f"idle CPU per node <= {GOAL_CPU_PCT:g} % of a core at {nn} nodes x {rr} resources"
        hit = [m for o, m in stages if o["nodes"] == nn and m["resources"] == rr]
        if hit:
            m = hit[-1]
            text = (f"max {m['cpu_pct_max']:.1f} %, mean {m['cpu_pct_mean']:.1f} % "
                    f"({m['cpu_pct_max'] / GOAL_CPU_PCT:.0f}x the goal)")
            if m["saturated"]:  # what the nodes got: a lower bound of what they need
                text += f"; {busy(m)}: a lower bound"
                met = "no" if m["cpu_pct_max"] > GOAL_CPU_PCT else "not measured"
            else:
                met = "yes" if m["cpu_pct_max"] <= GOAL_CPU_PCT else "no"
            out.append((g, text, met))
        else:
            lower = [m for o, m in stages if o["nodes"] == nn]
            extra = ""
            if lower:
                m = max(lower, key=lambda m: m["resources"])
                extra = (f"; with {m['resources']} resources already max {m['cpu_pct_max']:.1f} % "
                         f"({m['cpu_pct_max'] / GOAL_CPU_PCT:.0f}x the goal{', ' + busy(m) if m['saturated'] else ''})")
            out.append((g, f"{nn}x{rr} not measured in this run{extra}", "not measured"))
        # 2. bytes per idle second independent of the tree's size: same node count, trees >= 2x apart;
        # only where the machine was not saturated (there the bytes are bounded by the CPU, not the design)
        g = f"bytes per idle second per node independent of the tree's size (within {GOAL_BYTES_RATIO:g}x)"

        def best_pair(ms_of: list[tuple[dict, dict]]):
            groups: dict[int, list[dict]] = {}
            for o, m in ms_of:
                groups.setdefault(o["nodes"], []).append(m)
            best = None
            for nodes, ms in groups.items():
                lo, hi = min(ms, key=lambda m: m["entries_mean"]), max(ms, key=lambda m: m["entries_mean"])
                spread = hi["entries_mean"] / lo["entries_mean"] if lo["entries_mean"] else 0
                if spread >= 2 and (best is None or (nodes == nn, spread) > (best[0] == nn, best[3])):
                    best = (nodes, lo, hi, spread)
            return best
        free = best_pair([(o, m) for o, m in stages if not m["saturated"]])
        best = free or best_pair(stages)
        if best:
            nodes, lo, hi, spread = best
            ratio = hi["sent_b_s_mean"] / lo["sent_b_s_mean"] if lo["sent_b_s_mean"] else float("inf")
            text = (f"{nodes} nodes: {lo['sent_b_s_mean'] / 1024:,.1f} KiB/s at {lo['entries_mean']:,.0f} entries "
                    f"({nodes}x{lo['resources']}) vs {hi['sent_b_s_mean'] / 1024:,.1f} KiB/s at "
                    f"{hi['entries_mean']:,.0f} entries ({nodes}x{hi['resources']}): {ratio:.1f}x the bytes for "
                    f"{spread:.1f}x the entries (trees/peer/s {lo['listings_per_peer_s_mean']:.2f} -> "
                    f"{hi['listings_per_peer_s_mean']:.2f})")
            if free:
                met = "yes" if ratio <= GOAL_BYTES_RATIO else "no"
            else:
                text += ("; saturated (the nodes sent what their CPU share allowed, the pull rate fell instead): "
                         "cannot be judged")
                met = "no" if ratio > GOAL_BYTES_RATIO else "not measured"
            out.append((g, text, met))
        else:
            out.append((g, "no two measurements with the same node count and trees >= 2x apart in this run",
                        "not measured"))
        # 3. propagation at 12 nodes
        g = f"propagation of one changed entry <= {GOAL_PROP_S:g} s at {GOAL_PROP_NODES} nodes, --interval 1"
        hit = [m for o, m in stages if o["nodes"] == GOAL_PROP_NODES]
        if hit:
            m = min(hit, key=lambda m: m["resources"])
            pr = m["pause"]
            sat = f"; {busy(m)}" if m["saturated"] else ""
            if pr["max_s"] is None:
                out.append((g, f"not seen by {', '.join(pr['missing'])} within {self.args.timeout:g} s{sat}", "no"))
            else:
                out.append((g, f"{pr['max_s']:.2f} s (slowest of {GOAL_PROP_NODES - 1} nodes, "
                               f"{GOAL_PROP_NODES}x{m['resources']}){sat}", "yes" if pr["max_s"] <= GOAL_PROP_S else "no"))
        else:
            out.append((g, f"{GOAL_PROP_NODES} nodes not measured in this run", "not measured"))
        return out

    def report(self) -> dict:
        mf = machine_facts(self.root)
        load1 = run_text(["cat", "/proc/loadavg"])
        a = self.args
        p = print
        p()
        p(f"MARS quiet-cluster benchmark (issue 14)  {mf['date']}")
        p(f"machine: {mf['nproc']} CPUs ({mf['cpu']}), {mf['memory']} RAM, kernel {mf['kernel']}, python {mf['python']}")
        p(f"fs:      {mf['df_T']}")
        p(f"load:    /proc/loadavg at the start {self.loadavg0}, at the end {load1}")
        p(f"setup:   {fmt_mib(a.size)} sparse images, marsd production defaults (--interval 1), peer port {self.port}; "
          f"idle {a.settle:g} s after all settled, window {a.window:g} s")
        p()
        hdr = (f"{'config':>7} {'entries':>8} {'setup':>6}  {'CPU % of a core per node':^25} {'machine':>7}  "
               f"{'sent per node':^21} {'B/s per':>7} {'trees':>6}  {'propagation s':^15}")
        p(hdr)
        p(f"{'':>7} {'/node':>8} {'s':>6}  {'mean':>7} {'max':>7} {'all':>9} {'busy %':>7}  {'mean B/s':>10} {'max B/s':>10} "
          f"{'entry':>7} {'/peer/s':>6}  {'pause':>7} {'resume':>7}")
        p("-" * len(hdr))
        for o in self.results:
            for m in o["stages"]:
                s = m["setup"]
                pause, resume = m["pause"]["max_s"], m["resume"]["max_s"]
                p(f"{o['nodes']:>3}x{m['resources']:<3} {m['entries_mean']:>8,.0f} "
                  f"{s['joins_s'] + s['settle_wait_s']:>6.1f}  {m['cpu_pct_mean']:>7.1f} {m['cpu_pct_max']:>7.1f} "
                  f"{m['cpu_pct_all']:>9.1f} {m['machine_busy_pct']:>6.0f}{'*' if m['saturated'] else ' '}  "
                  f"{m['sent_b_s_mean']:>10,.0f} {m['sent_b_s_max']:>10,.0f} {m['sent_b_s_mean'] / m['entries_mean']:>7.1f} "
                  f"{m['listings_per_peer_s_mean']:>6.2f}  {fmt_s(pause):>7} {fmt_s(resume):>7}")
            if o["not_settled"]:
                p(f"{o['config']:>7}  NOT SET UP: {o['not_settled']}")
            if o["error"]:
                p(f"{o['config']:>7}  ERROR: {o['error'].splitlines()[0][:300]}")
        p()
        p("entries/node = symlinks in the node's tree (find <mars-dir> -type l | wc -l); setup = joins + wait until "
          "settled;")
        p("all = the sum over every marsd; machine busy = all CPUs of the machine, whoever used them (/proc/stat; * = at")
        p("least 90 %: saturated, the per-node figures are then what the nodes got, not what they would have taken);")
        p("sent = bytes_sent of every TCP socket of the marsd (tcp_info, TLS included) over the window; trees/peer/s =")
        p("sent / one whole-tree reply of the node (its listing in the engine's codec) / peers: about how many whole")
        p("trees each node sent each peer per second (an estimate: sent also holds feeds, pulls, fetch polls and")
        p("TLS; with the old whole-tree pull per --interval it would be about 1); propagation = from the write of")
        p("todo-<last>/allow-replay on the last node (pause-replay / resume-replay there) until the last other node's")
        p("tree has it (polled every 20 ms).")
        for o in self.results:
            for m in o["stages"]:
                p()
                pr, rs = m["pause"], m["resume"]
                p(f"{o['nodes']}x{m['resources']}: window {m['window_s']:.1f} s, loadavg {m['loadavg_start'].split()[0]} .. "
                  f"{m['loadavg_end'].split()[0]}; sockets opened {m['sockets_opened']}, closed {m['sockets_closed']} "
                  f"(a closed socket's bytes after its last sample are lost); received by all "
                  f"{m['recv_b_s_all']:,.0f} B/s vs sent by all {sum(x['sent_b_s'] for x in m['nodes'].values()):,.0f} B/s; "
                  f"CPU: machine {m['machine_busy_pct']:.0f} % busy, marsd {m['cpu_pct_all']:.0f} %, this bench "
                  f"{m['bench_cpu_pct']:.1f} %, other processes {m['others_cpu_pct']:.0f} % of a core")
                p(f"  {'node':>4} {'ip':>11} {'CPU %':>7} {'sent B/s':>10} {'recv B/s':>10} {'socks':>5} {'entries':>8} "
                  f"{'(dead)':>6} {'listing B':>10} {'≈/peer/s':>8} {'pause s':>8} {'resume s':>8}")
                for h, x in m["nodes"].items():
                    p(f"  {h:>4} {x['ip']:>11} {fmt1(x['cpu_pct']):>7} {x['sent_b_s']:>10,.0f} {x['recv_b_s']:>10,.0f} "
                      f"{x['sockets']:>5} {x['entries']:>8,} {x['tombstones']:>6,} {x['listing_bytes']:>10,} "
                      f"{x['listings_per_peer_s']:>8.2f} {fmt_s(pr['seen_s'].get(h)):>8} {fmt_s(rs['seen_s'].get(h)):>8}")
                for what, r in (("pause-replay", pr), ("resume-replay", rs)):
                    w = r["write_after_start_s"]
                    p(f"  {what}: marsadm {r['marsadm_s']:.2f} s (exit {r['rc']}), the entry written "
                      f"{fmt_s(w)} s after its start"
                      + (f"; never seen on {', '.join(r['missing'])}" if r["missing"] else "")
                      + (f"; output: {r['output'].strip()[-300:]}" if r.get("output") else ""))
                p(f"  setup: {o['nodes']} marsd started and joined in {o.get('cluster_start_s', 0):.1f} s; joins of this "
                  f"stage {m['setup']['joins_s']:.1f} s, settled {m['setup']['settle_wait_s']:.1f} s later "
                  f"({m['setup']['since_config_start_s']:.1f} s since the config's start, measurements included)")
        engine = [(o["config"], f) for o in self.results for f in o.get("engine", [])]
        p()
        if engine:
            p("engine misbehaviour seen in the marsd logs:")
            for cfg, f in engine:
                p(f"  [{cfg}] " + f.replace("\n", "\n    "))
        else:
            p("marsd logs: no traceback, no error line, every marsd stopped cleanly on SIGTERM")
        warned = [(o["config"], o["warnings"]) for o in self.results if o.get("warnings")]
        if warned:
            p("warnings in the marsd logs, most frequent first (digits shown as #; 'cannot reach peer' while the next")
            p("node starts is expected):")
            for cfg, w in warned:
                p(f"  [{cfg}] {w}")
        goals = self.goals()
        p()
        w1 = max(len(g) for g, _, _ in goals)
        p(f"{'goal (issue 14)':{w1}}  {'met':12}  measured")
        p("-" * (w1 + 40))
        for g, measured, met in goals:
            p(f"{g:{w1}}  {met:12}  {measured}")
        for n in self.notes:
            p(f"note: {n}")
        p()
        b = "<dir>/<config>"
        p(f"commands (per config, in {self.root}/<config>; --keep keeps it; i = 2 .. N, k = 1 .. R):")
        p(f"  marsadm --mars-dir {b}/n1 --host n1 --ip 127.0.0.2 create-cluster")
        p(f"  marsd --mars-dir {b}/n1 --host n1 --port {self.port} &")
        p(f"  marsadm --mars-dir {b}/n1 --host n1 export-secret > {b}/secret.pem")
        p(f"  marsadm --mars-dir {b}/ni --host ni --ip 127.0.0.(i+1) join-cluster 127.0.0.2:{self.port} "
          f"--secret-file {b}/secret.pem; marsd --mars-dir {b}/ni --host ni --port {self.port} &")
        p(f"  marsadm --mars-dir {b}/n1 --host n1 --no-wait create-resource rk {b}/img/n1-rk.img {a.size}  "
          "(marsadm's main() in this process)")
        p(f"  marsadm --mars-dir {b}/ni --host ni --no-wait join-resource rk {b}/img/ni-rk.img --create  (the same)")
        p(f"  marsadm --mars-dir {b}/nN --host nN pause-replay r1; ... resume-replay r1  (timed)")
        p(f"  ss -tinpHe state connected  (every {a.sample:g} s in the window)")
        p(f"\ncommand: {sys.executable} {' '.join(sys.argv)}")
        return {"machine": {**mf, "loadavg_start": self.loadavg0, "loadavg_end": load1},
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                "port": self.port, "results": self.results,
                "goals": [{"goal": g, "measured": x, "met": ok} for g, x, ok in goals], "notes": self.notes}


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def fmt1(x: float | None) -> str:
    return "?" if x is None else f"{x:.1f}"


def fmt_mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=config_arg, default=None,
                    help=f"NODESxRESOURCES, comma-separated (default {DEFAULT_CONFIGS})")
    ap.add_argument("--quick", action="store_true", help=f"only {QUICK_CONFIGS} (unless --configs is given)")
    ap.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",") if x], default=[10, 25],
                    help="for a config with more resources: also measure after this many (default 10,25)")
    ap.add_argument("--window", type=float, default=20, help="seconds of idle measured (default 20)")
    ap.add_argument("--settle", type=float, default=10, help="seconds of idle after all settled, before the window (default 10)")
    ap.add_argument("--sample", type=float, default=2, help="seconds between socket samples in the window (default 2)")
    ap.add_argument("--setup-limit", type=float, default=300,
                    help="seconds a config's setup may take in all, measurements left out (default 300)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds to wait for a propagation (default 60)")
    ap.add_argument("--size", type=parse_size, default=parse_size("64M"), help="size of each image (default 64M)")
    ap.add_argument("--dir", default="/var/tmp", help="where to make the temporary directory (default /var/tmp)")
    ap.add_argument("--port", type=int, default=0, help="peer port of every marsd (default 7777 if free, else a free one)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--profile", type=Path, help="record the first and last node with py-spy over each window "
                    "into this directory (collapsed stacks; the figures then include py-spy's load)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (trees, marsd logs)")
    args = ap.parse_args()
    if args.configs is None:
        args.configs = config_arg(QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    if args.window <= 0 or args.sample <= 0 or args.settle < 0:
        ap.error("--window and --sample must be positive, --settle not negative")

    bench = Bench(args)
    data: dict = {}

    def work() -> None:
        status("setting up ...")
        bench.setup()
        for n, r in args.configs:
            bench.run_config(n, r)
        data.update(bench.report())
    if run_guarded(work, bench.teardown):
        return 130
    if args.json:
        write_json(args.json, data)
    return 0 if all(o["error"] is None for o in bench.results) else 1


if __name__ == "__main__":
    sys.exit(main())
