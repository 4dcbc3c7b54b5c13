#!/usr/bin/env python3
"""`make demo`: three MARS nodes replicating a 1 GiB file-backed resource while it is being written.

What it shows, step by step: a cluster made with marsadm while marsd is down; two more nodes
joining it with the exported cluster credential; a resource created on node a and served as an
NBD export; nbdcopy writing 256 MiB of random data through it while b and c join the resource,
their fast full sync running while the writes go on (mars-status's progress bars on c every two
seconds); a log rotation and a few more writes; all three images identical
once the secondaries have caught up; the log files every member has replayed deleted; `marsadm
view all` on c showing every node's state and the findings. Beside the nodes run one
mars-exporter each and a real Prometheus scraping them with the alert rules of
dashboards/prometheus/; at the end the demo prints the URLs of its targets and alerts pages and
a few live series, asked through its HTTP API. It ends with a planned handover: b becomes the
primary (``marsadm primary demo``) and serves, and a follows b as a secondary without a sync.

The three nodes run on 127.0.0.2, 127.0.0.3 and 127.0.0.4, each with its own mars dir and image
under one demo directory; they share the peer port (7777, or a free one if 7777 is taken).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

from mars.engine.tree import Tree

BIN = Path(sys.executable).parent
MiB = 1 << 20
NODES = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
SECONDARIES = ("b", "c")
_out = threading.Lock()
SHORT: dict[str, str] = {}  # how commands are shown: "$D" for the demo directory, marsadm/marsd by name


def out(text: str) -> None:
    with _out:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def say(text: str) -> None:
    out(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}")


def shown(cmd: list[str]) -> str:
    text = " ".join(f'"{a}"' if "?" in a or " " in a else a for a in cmd)
    for long, short in SHORT.items():
        text = text.replace(long, short)
    return text


def sh(*cmd: str, to: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run and show a command and its output; ``to``: its output goes into that file (mode 600), unshown."""
    out("    $ " + shown(list(cmd)) + (f" > {shown([str(to)])}" if to else ""))
    r = subprocess.run(cmd, text=True, capture_output=True)
    if to:
        with os.fdopen(os.open(to, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(r.stdout)
    for line in ((r.stdout if not to else "") + r.stderr).strip().splitlines():
        out("      " + line)
    if r.returncode != 0:
        raise SystemExit(f"demo: {shown([cmd[0]])} failed with exit code {r.returncode}")
    return r


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def wait_for(cond, timeout: float, what: str, every: float = 0.0, report=None) -> None:
    """Poll ``cond`` until true; fail naming ``what`` after ``timeout`` s; call ``report`` every ``every`` s."""
    deadline = time.monotonic() + timeout
    next_report = time.monotonic() + every
    while not cond():
        now = time.monotonic()
        if now > deadline:
            raise SystemExit(f"demo: timed out after {timeout:g} s waiting for {what}")
        if report and now >= next_report:
            report()
            next_report = now + every
        time.sleep(0.05)  # poll


def peer_port() -> int:
    """7777, the default, if it is free on all three addresses; otherwise a free port."""
    for port in (7777, 0, 0, 0):
        try:
            socks = []
            for ip in NODES.values():
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as marsd's listener does
                s.bind((ip, port))
                port = s.getsockname()[1]
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit("demo: found no free peer port on 127.0.0.2-4")


class Node:
    def __init__(self, base: Path, host: str, port: int) -> None:
        self.base, self.host, self.ip, self.port = base, host, NODES[host], port
        self.mars_dir = base / host
        self.log = base / f"marsd-{host}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port_args = [] if port == 7777 else ["--port", str(port)]

    def adm(self, *args: str) -> list[str]:
        return [str(BIN / "marsadm"), "--mars-dir", str(self.mars_dir), "--host", self.host, *args]

    def value(self, rel: str) -> str | None:
        """A tree entry of this node (a symlink's target), None if missing or deleted."""
        return Tree(self.mars_dir, self.host).get(rel)

    def start(self) -> None:
        (self.mars_dir / "nbd.sock").unlink(missing_ok=True)
        cmd = [str(BIN / "marsd"), "--mars-dir", str(self.mars_dir), "--host", self.host, *self.port_args]
        out(f"    $ {shown(cmd)} > {shown([str(self.log)])} 2>&1 &")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: (self.mars_dir / "nbd.sock").exists() or self.proc.poll() is not None, 30,
                 f"marsd {self.host} to listen")
        if self.proc.poll() is not None:
            raise SystemExit(f"demo: marsd {self.host} exited with {self.proc.returncode}; see {self.log}")

    def terminate(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def reap(self) -> int | None:
        if not self.proc:
            return None
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            out(f"demo: marsd {self.host} did not stop within 30 s of SIGTERM; killing it")
            self.proc.kill()
            return self.proc.wait()


def free_port(ip: str, wanted: int) -> int:
    """``wanted`` if it is free on ``ip``, else any free port."""
    for port in (wanted, 0):
        with socket.socket() as s:
            try:
                s.bind((ip, port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise SystemExit(f"demo: no free port on {ip}")


def start_monitoring(base: Path, nodes: dict[str, Node], procs: list[subprocess.Popen]) -> str | None:
    """One mars-exporter per node on the node's address, and Prometheus scraping them every 2 s with
    our alert rules; returns Prometheus's URL (None when Prometheus is not installed)."""
    targets = []
    for n in nodes.values():
        listen = f"{n.ip}:{free_port(n.ip, 9777)}"
        cmd = [str(BIN / "mars-exporter"), "--mars-dir", str(n.mars_dir), "--host", n.host, "--listen", listen]
        out(f"    $ {shown(cmd)} > {shown([str(base / f'exporter-{n.host}.log')])} 2>&1 &")
        with open(base / f"exporter-{n.host}.log", "ab") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        targets.append(listen)
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        out("      (no prometheus installed: 'make deps' installs Debian's; the exporters run without it)")
        return None
    rules = Path(__file__).resolve().parent.parent / "dashboards" / "prometheus" / "mars-alerts.yml"
    config = base / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "mars", "static_configs": [{"targets": targets}]}]}, indent=2))
    url = f"http://127.0.0.1:{free_port('127.0.0.1', 9090)}"
    cmd = [prometheus, f"--config.file={config}", f"--storage.tsdb.path={base / 'prometheus-data'}",
           f"--web.listen-address={url[7:]}", "--log.level=warn"]
    out(f"    $ {shown(cmd)} > {shown([str(base / 'prometheus.log')])} 2>&1 &")
    with open(base / "prometheus.log", "ab") as log:
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    return url


def prom_query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def show_prometheus(url: str) -> None:
    """What Prometheus now knows: its targets, then a few live series, each with its query."""
    wait_for(lambda: len(prom_query(url, 'up{job="mars"} == 1')) == 3, 30, "Prometheus to scrape all three exporters")
    out(f"      targets: {url}/targets    alerts: {url}/alerts    graph: {url}/graph")
    for expr, label, unit in (
            ('up{job="mars"}', "instance", ""),
            ('max by (host, mars_member_repl_state) (mars_member_repl_state{resource="demo"} == 1)',
             "mars_member_repl_state", ""),
            ('max by (host) (mars_member_replay_lag_seconds{resource="demo"})', None, "s"),
            ('sum by (host) (rate(mars_nbd_request_bytes_total{command="write"}[1m]))', None, "bytes/s"),
            ('histogram_quantile(0.99, sum by (le) (rate(mars_write_latency_seconds_bucket[5m])))', None, "s"),
            ('count by (level) (mars_finding)', "level", "findings")):
        out(f"      {expr}")
        for r in prom_query(url, expr) or [{"metric": {}, "value": [0, "(no series)"]}]:
            who = r["metric"].get("host") or r["metric"].get(label or "", "")
            extra = f" {r['metric'][label]}" if label and label in r["metric"] and label != "instance" else ""
            value = r["value"][1]
            try:
                value = f"{float(value):.6g} {unit}".rstrip()
            except ValueError:
                pass
            out(f"          {who:<16}{extra:<14} {value}")


def mib(v: str | None) -> float:
    return int(v or 0) / MiB


def pos(link: str | None) -> str:
    """``log-000000002-a,1234,0`` -> ``log 2 @ 0.0 MiB``."""
    if not link:
        return "-"
    name, at = link.split(",")[:2]
    return f"log {int(name.split('-')[1])} @ {mib(at):6.1f} MiB"


def status(nodes: dict[str, Node], size: int) -> None:
    """One line per secondary: sync progress, replay position vs the primary's, bytes fetched."""
    r = "resource-demo"
    want = nodes["a"].value(f"{r}/replay-a")
    for h in SECONDARIES:
        n = nodes[h]
        sync = int(n.value(f"{r}/syncstatus-{h}") or 0)
        out(f"      {h}: sync {sync / MiB:6.1f} MiB {100 * sync // size:3d}%"
            f" (copied {mib(n.value(f'{r}/actual-{h}/sync-copied-bytes')):6.1f} MiB)"
            f" | replay {pos(n.value(f'{r}/replay-{h}'))} (a: {pos(want)})"
            f" | fetched {mib(n.value(f'{r}/actual-{h}/fetch-bytes')):6.1f} MiB")


def caught_up(a: Node, n: Node, size: int) -> bool:
    r = "resource-demo"
    return (n.value(f"{r}/syncstatus-{n.host}") == str(size)
            and n.value(f"{r}/replay-{n.host}") == a.value(f"{r}/replay-a"))


def show_logs(nodes: dict[str, Node]) -> None:
    for n in nodes.values():
        logs = sorted((n.mars_dir / "resource-demo").glob("log-*"))
        out(f"      {n.host}: " + (", ".join(f"{p.name} ({p.stat().st_size / MiB:.1f} MiB)" for p in logs) or "-"))


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C: everything started gets stopped


def status_bars(node: Node) -> list[str]:
    """The progress bars of ``mars-status --status`` on ``node`` (its --status block alone)."""
    r = subprocess.run([str(BIN / "mars-status"), "--mars-dir", str(node.mars_dir), "--host", node.host,
                        "--status", "--ascii", "--once", "--resource", "demo"], text=True, capture_output=True)
    lines = r.stdout.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("---> Status <---")), None)
    if start is None:
        return [f"(mars-status: {r.stdout.strip() or r.stderr.strip()})"]
    block = []
    for ln in lines[start:]:
        if block and ln.startswith("---> "):
            break
        block.append(ln)
    return block


def watch(nodes: dict[str, Node], size: int, stop: threading.Event) -> None:
    """What mars-status on c shows while the writes and syncs run: its bars whenever they moved
    (looked at twice a second), so the syncs are seen moving, not only done."""
    last: list[str] = []
    while True:
        bars = status_bars(nodes["c"])
        if bars != last:
            show_bars(nodes, bars)
            last = bars
        if stop.wait(0.5):
            return


def show_bars(nodes: dict[str, Node], bars: list[str] | None = None) -> None:
    bars = bars if bars is not None else status_bars(nodes["c"])  # one out() call: never interleaved
    out("\n".join(["    $ mars-status --mars-dir $D/c --host c --status --ascii --once --resource demo   # its bars:"]
                  + ["      " + ln for ln in bars]))


def run(args: argparse.Namespace, base: Path, nodes: dict[str, Node], procs: list[subprocess.Popen]) -> int:
    a, b, c = nodes.values()
    port = a.port
    size = 1 << 30
    uri = f"nbd+unix:///demo?socket={a.mars_dir}/nbd.sock"

    say(f"1. create the cluster on a (marsd is not running yet; marsadm only writes the tree); peer port {port}")
    sh(*a.adm("--ip", a.ip, "create-cluster"))
    a.start()

    say("2. b and c join the cluster with a's exported credential, then start their marsd")
    secret = base / "secret.pem"
    sh(*a.adm("export-secret"), to=secret)
    sh("chmod", "600", str(secret))  # created so already; the credential lets anyone join the cluster
    for n in (b, c):
        sh(*n.adm("--ip", n.ip, "join-cluster", f"{a.ip}:{port}" if n.port_args else a.ip,
                  "--secret-file", str(secret)))
        n.start()
    wait_for(lambda: all(n.value(f"ips/ip-{o}") == ip for n in nodes.values() for o, ip in NODES.items()),
             30, "all three nodes to know each other")
    sh("ls", "-l", "--time-style=+%H:%M:%S", str(c.mars_dir / "ips"))
    say("   a mars-exporter per node, and a real Prometheus scraping them with MARS's alert rules")
    prom = start_monitoring(base, nodes, procs)

    say("3. a creates a 1 GiB resource on a sparse image file and becomes its primary")
    sh(*a.adm("create-resource", "demo", str(base / "a.img"), "1G"))
    sh("nbdinfo", uri)

    say(f"4. nbdcopy writes {args.mib} MiB of random data into a's export while b and c join the resource:"
        " their fast full sync runs while the writes go on")
    src = base / "random.bin"
    with open(src, "wb") as f:
        for _ in range(args.mib // 4):
            f.write(os.urandom(4 * MiB))
    for n in (b, c):  # the secondaries learn the resource and a's log position from a's tree
        wait_for(lambda: n.value("resource-demo/size") == str(size) and n.value("resource-demo/replay-a"),
                 30, f"{n.host} to learn resource demo")
    out(f"    $ {shown(['nbdcopy', str(src), uri])} &")
    t0 = time.monotonic()
    copy = subprocess.Popen(["nbdcopy", str(src), uri], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(copy)
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(nodes, size, stop), daemon=True)
    watcher.start()
    try:
        for n in (b, c):
            sh(*n.adm("join-resource", "demo", str(base / f"{n.host}.img"), "--create"))
        wait_for(lambda: copy.poll() is not None, 120, "nbdcopy to finish")
        wait_for(lambda: all(n.value(f"resource-demo/syncstatus-{n.host}") == str(size) for n in (b, c)), 120,
                 "the syncs of b and c to finish")
    finally:
        stop.set()
        watcher.join()
    dt = time.monotonic() - t0
    if copy.returncode != 0:
        raise SystemExit(f"demo: nbdcopy failed with exit code {copy.returncode}: {copy.stdout.read().strip()}")
    out(f"      nbdcopy done: {args.mib} MiB in {dt:.1f} s ({args.mib / dt:.0f} MiB/s) while b and c synced")
    src.unlink()

    say("5. rotate the log on a, then a few more writes with qemu-io")
    sh(*a.adm("log-rotate", "demo"))
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x4d 900M 1M", "-c", "write -P 0x61 10M 64k",
       "-c", "write -P 0x72 1020M 4M", uri)

    say("6. wait until b and c have synced everything and replayed up to a's position, then compare")
    wait_for(lambda: all(caught_up(a, n, size) for n in (b, c)), args.timeout,
             "b and c to catch up with a", every=2, report=lambda: show_bars(nodes))
    show_bars(nodes)
    status(nodes, size)
    sums = {h: sha256(base / f"{h}.img") for h in NODES}
    for h, s in sums.items():
        out(f"      sha256 {h}.img  {s}")
    if len(set(sums.values())) != 1:
        print("demo: MISMATCH: the secondaries' images differ from the primary's", file=sys.stderr)
        return 1
    say("identical: b and c hold exactly what a holds")

    say("7. log files that every member has replayed can go")
    show_logs(nodes)
    sh(*a.adm("log-delete-all", "demo"))
    out("      (b and c follow: each deletes its copies below the mark once it has replayed them)")
    first_logs = lambda: [p for n in nodes.values() for p in (n.mars_dir / "resource-demo").glob("log-000000001-*")]
    wait_for(lambda: not first_logs(), 30, "every node to delete log 1")
    show_logs(nodes)

    say("8. the whole cluster as c sees it (every node's reports travel with the tree): marsadm view,"
        " a macro, and mars-status with its monitor verdict")
    sh(*c.adm("view", "all"))
    sh(*c.adm("view-replay-rest", "demo"))
    sh(str(BIN / "mars-status"), "--mars-dir", str(c.mars_dir), "--host", "c", "--once")
    sh(str(BIN / "mars-status"), "--mars-dir", str(c.mars_dir), "--host", "c", "--check")
    if prom is not None:
        say("8b. the same cluster in Prometheus, through the exporters")
        show_prometheus(prom)

    say("9. a planned handover: b becomes the primary, a follows b (no sync: the histories are one)")
    synced_before = sum(mib(n.value(f"resource-demo/actual-{n.host}/sync-copied-bytes")) for n in (a, c))
    t0 = time.monotonic()
    sh(*b.adm("primary", "demo"))
    b_uri = f"nbd+unix:///demo?socket={b.mars_dir / 'nbd.sock'}"
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x62 100M 1M", b_uri)
    out(f"      b serves demo and acknowledged a write {time.monotonic() - t0:.1f} s after 'marsadm primary'")
    wait_for(lambda: all(n.value("resource-demo/replay-" + n.host) == b.value("resource-demo/replay-b")
                         for n in (a, c)), 60, "a and c to follow b")
    sums = {h: sha256(base / f"{h}.img") for h in NODES}
    if len(set(sums.values())) != 1:
        print(f"demo: MISMATCH after the handover: {sums}", file=sys.stderr)
        return 1
    copied = sum(mib(n.value(f"resource-demo/actual-{n.host}/sync-copied-bytes")) for n in (a, c)) - synced_before
    say(f"identical again, with b as the primary; a and c synced {copied:.1f} MiB for it")
    sh(*a.adm("view", "demo"))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="where to put the demo (default: a new directory under /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the directory (every marsd is stopped anyway)")
    p.add_argument("--mib", type=int, default=256, help="MiB of random data to copy (default 256)")
    p.add_argument("--timeout", type=float, default=60, help="seconds to wait for the secondaries (default 60)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, interrupted)
    t0 = time.monotonic()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mars-demo-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    port = peer_port()
    nodes = {h: Node(base, h, port) for h in NODES}
    SHORT.update({f"{BIN}/": "", str(base): "$D"})
    say(f"D={base}   (marsadm, marsd: {BIN})")
    procs: list[subprocess.Popen] = []
    rc = 1
    try:
        rc = run(args, base, nodes, procs)
    except KeyboardInterrupt:
        print("\ndemo: interrupted", file=sys.stderr)
        rc = 130
    except SystemExit as e:  # a failed step: say why first, then clean up
        print(e.code, file=sys.stderr)
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up below runs to its end
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc not in (0, 130):  # what each marsd last complained about, before stopping adds its own
            for n in nodes.values():
                text = n.log.read_text(errors="replace") if n.log.exists() else ""
                for line in [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln][-3:]:
                    out(f"      marsd-{n.host}.log: {line}")
        say("10. stop all three marsd with SIGTERM")
        for n in nodes.values():
            n.terminate()
        for n in nodes.values():
            if (code := n.reap()) is not None:
                out(f"      marsd {n.host} exited with {code}")
                if code != 0:
                    rc = rc or 1
        for n in nodes.values():
            if n.log.exists() and "Traceback" in n.log.read_text(errors="replace"):
                print(f"demo: {n.log} has a traceback", file=sys.stderr)
                rc = rc or 1
        if args.keep or rc not in (0, 130):  # a failure keeps everything for a look at the logs
            out(f"demo: kept {base} (marsd logs: {base}/marsd-*.log)")
        else:
            shutil.rmtree(base, ignore_errors=True)
        outcome = {0: "done", 130: "interrupted"}.get(rc, "FAILED")
        out(f"demo: {outcome} in {time.monotonic() - t0:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
