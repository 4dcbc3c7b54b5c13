#!/usr/bin/env python3
"""Replication benchmark: log catch-up of a paused secondary, and fast full sync vs. rsync.

Run:  python bench/bench_replication.py [--dir DIR] [--log-gib 2] [--sync-gib 2] [--port P]

Everything lives in one temporary directory under --dir (default /var/tmp), so every figure is
taken on the same file system. Two marsd run on this machine: the primary ``a`` on 127.0.0.2 and
the secondary ``b`` on 127.0.0.3, both on one peer port (7777 when it is free on both addresses,
else a free port; --port forces one), joined the way tests/harness.py does it (create-cluster,
export-secret, join-cluster IP:PORT --secret-file).

(a) Catch-up: b joins resource ``r`` while it is empty (a trivial sync), its fetch is paused
    (``marsadm disconnect r``), --log-gib of 1 MiB sequential writes go through a's NBD export
    (fio's nbd engine, QD 8), the fetch is resumed and the time until b's ``replay-b`` equals a's
    ``replay-a`` is taken. Compared with a raw TCP copy over the same loopback (iperf3, or a
    Python socket copy when iperf3 is missing) and the file system's sequential write limit (fio,
    1 MiB psync writes + end_fsync=1).

(b) Fast full sync: a --sync-gib image of random data is written into resource ``s`` through a's
    NBD export (nbdcopy); b joins ``s`` with a copy of the same image in which 1 % of the 1 MiB
    chunks hold other random data; the time until ``syncstatus-b`` equals the size and the bytes
    copied (``actual-b/sync-copied-bytes``) are taken. Compared with
    ``rsync --inplace --no-whole-file --ignore-times --stats`` of a's image onto another copy of
    the 1 %-different image.

All processes started here are stopped, and the directory removed, on success, error, Ctrl-C or
SIGTERM (--keep keeps the directory).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_write import (Procs, disk_sectors_written, machine_facts, remove_workdir, run_guarded, run_text, sh,  # noqa: E402
                         wait_until, write_json)

from mars.engine.model import human_bytes  # noqa: E402
from mars.engine.tree import Tree  # noqa: E402
from mars.engine.trigger import poke  # noqa: E402

BIN = Path(sys.executable).parent
MIB = 1 << 20
GIB = 1 << 30
A_IP, B_IP = "127.0.0.2", "127.0.0.3"
RES_CATCHUP = "r"
RES_SYNC = "s"
RES_SPLIT = "q"  # --split: the catch-up again, fetch and replay one after the other
CHUNK = 1 << 20  # the syncer's chunk (engine/syncer.py) and the unit the secondary's image differs in
DIFFER = 0.01  # fraction of chunks that differ in the secondary's image
SEED = 20261123

GOAL_CATCHUP_MIB_S = 300.0
GOAL_CATCHUP_VS_LIMIT = 0.5
GOAL_SYNC_SENT = 0.03


def gib_arg(text: str) -> int:
    """--log-gib / --sync-gib: GiB as a float, rounded to whole MiB (so 0.25 is fine for a quick run)."""
    try:
        mib = round(float(text) * 1024)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if mib < 8:
        raise argparse.ArgumentTypeError(f"{text} GiB is too small; give at least 8 MiB (0.008)")
    return mib * MIB


def port_free(port: int) -> bool:
    for ip in (A_IP, B_IP):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


def pick_port(preferred: int = 7777) -> int:
    if port_free(preferred):
        return preferred
    for _ in range(50):
        with socket.socket() as s:
            s.bind((A_IP, 0))
            port = s.getsockname()[1]
        if port_free(port):
            return port
    raise RuntimeError("found no TCP port that is free on both 127.0.0.2 and 127.0.0.3")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (all threads)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def write_random_file(path: Path, size: int) -> None:
    """``size`` bytes of random data (os.urandom in 4 MiB pieces)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n


def py_spy_top(raw: Path, n: int = 12) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """From a py-spy ``-f raw`` file: total samples, top functions by self and by total samples."""
    self_c: collections.Counter[str] = collections.Counter()
    total_c: collections.Counter[str] = collections.Counter()
    samples = 0
    with contextlib.suppress(OSError):
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            try:
                c = int(count)
            except ValueError:
                continue
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";") if f]
            if not frames:
                continue
            samples += c
            self_c[frames[-1]] += c
            for f in set(frames):
                total_c[f] += c
    return samples, self_c.most_common(n), total_c.most_common(n)


# -- the engine's transport alone: asyncio + TLS with the cluster's own credentials ------------

FETCH_REPLY = 8 << 20  # the fetcher's request size (engine/fetcher.py FETCH_BYTES)


def tls_helper(argv: list[str]) -> int:
    """``--tls-helper serve|fetch``: one end of an asyncio TLS link built like marsd's peer links.

    The server answers each 8-byte request (a byte count) with that many bytes of one random
    buffer; the client asks for 8 MiB at a time, strictly one request in flight like the fetcher,
    reads in 1 MiB pieces like engine/peerlink.py, and prints MiB/s as JSON. No disk is touched.
    """
    import asyncio
    from mars.engine.credentials import client_context, server_context
    ap = argparse.ArgumentParser(prog="bench_replication.py --tls-helper")
    ap.add_argument("mode", choices=["serve", "fetch"])
    ap.add_argument("--mars-dir", type=Path, required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--ip", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--bytes", type=int, default=2 * GIB)
    a = ap.parse_args(argv)

    async def serve() -> None:
        data = memoryview(os.urandom(FETCH_REPLY))

        async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    n = int.from_bytes(await reader.readexactly(8), "big")
                    writer.write(data[:n])
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
        srv = await asyncio.start_server(one, a.ip, a.port, ssl=server_context(a.mars_dir, a.host),
                                         reuse_address=True)
        print("ready", flush=True)
        async with srv:
            await srv.serve_forever()

    async def fetch() -> None:
        reader, writer = await asyncio.open_connection(a.ip, a.port, ssl=client_context(a.mars_dir, a.host),
                                                       server_hostname=None)
        got = 0
        t0 = time.monotonic()
        while got < a.bytes:
            n = min(FETCH_REPLY, a.bytes - got)
            writer.write(n.to_bytes(8, "big"))
            await writer.drain()
            buf = bytearray()
            while len(buf) < n:
                chunk = await reader.read(min(1 << 20, n - len(buf)))
                if not chunk:
                    raise ConnectionError("server closed the link")
                buf += chunk
            got += n
        secs = time.monotonic() - t0
        writer.close()
        print(json.dumps({"bytes": got, "secs": secs, "mib_s": got / MIB / secs}), flush=True)

    try:
        asyncio.run(serve() if a.mode == "serve" else fetch())
    except KeyboardInterrupt:
        pass
    return 0


class Node:
    """One marsd of the benchmark cluster (compare tests/harness.py's Node)."""

    def __init__(self, bench: "Bench", host: str, ip: str) -> None:
        self.bench = bench
        self.host = host
        self.ip = ip
        self.mars_dir = bench.base / host
        self.log_path = bench.base / f"marsd-{host}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def nbd_sock(self) -> Path:
        return self.mars_dir / "nbd.sock"

    def uri(self, res: str) -> str:
        return f"nbd+unix:///{res}?socket={self.nbd_sock}"

    def marsadm_cmd(self, *args: str) -> list[str]:
        return [str(BIN / "marsadm"), "--mars-dir", str(self.mars_dir), "--host", self.host, *args]

    def marsadm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = self.marsadm_cmd(*args)
        self.bench.commands.append(sh(cmd))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.bench.env)
        if check and r.returncode:
            raise RuntimeError(f"{sh(cmd)} failed ({r.returncode}):\n{r.stderr}{r.stdout}\n{self.log()}")
        return r

    def start(self) -> None:
        cmd = [BIN / "marsd", "--mars-dir", self.mars_dir, "--host", self.host, "--port", str(self.bench.port)]
        self.bench.commands.append(sh(cmd) + " &")
        self.proc = self.bench.procs.start(f"marsd-{self.host}", cmd, log=self.log_path)
        wait_until(lambda: self.nbd_sock.exists() or self.proc.poll() is not None, 30, f"marsd {self.host} to listen")
        self.check_alive()

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"marsd {self.host} exited with {self.proc.returncode}:\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            code = Procs.stop(self.proc)
            if code not in (0, None):
                print(f"warning: marsd {self.host} exited with {code} on SIGTERM", file=sys.stderr)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return f"--- {self.log_path.name} ---\n" + self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def value(self, rel: str) -> str | None:
        return Tree(self.mars_dir, self.host).get(rel)

    def set_value(self, rel: str, value: str) -> None:
        """Write a tree entry as marsadm does (engine/tree.py), and poke marsd to act on it."""
        Tree(self.mars_dir, self.host).set(rel, value, durable=False)
        poke(self.mars_dir)

    def wait_value(self, rel: str, want, timeout: float = 60) -> str:
        def ok():
            self.check_alive()
            v = self.value(rel)
            return v if (want(v) if callable(want) else v == want) else None
        return wait_until(ok, timeout, f"{self.host}: {rel} {'condition' if callable(want) else '== ' + str(want)}")

    def cpu(self) -> float | None:
        return cpu_seconds(self.proc.pid) if self.proc is not None else None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Procs()
        self.base: Path | None = None
        self.port = 0
        self.a: Node | None = None
        self.b: Node | None = None
        self.env = {k: v for k, v in os.environ.items() if k != "MARS_DIR"}
        self.commands: list[str] = []  # every command with a lasting effect, in order, for the report
        self.res: dict = {}
        self.notes: list[str] = []
        self.profiles: dict[str, Path] = {}
        self.have_switch_cmds: bool | None = None  # marsadm connect/disconnect/pause-replay exist

    # -- setup -------------------------------------------------------------------------------

    def check_tools(self) -> None:
        missing = [t for t in ("fio", "nbdcopy", "rsync", "cmp") if not shutil.which(t)]
        if missing:
            sys.exit(f"{', '.join(missing)} not found; install: apt-get install -y fio libnbd-bin rsync diffutils")
        for tool in ("marsd", "marsadm"):
            if not (BIN / tool).exists():
                sys.exit(f"{BIN / tool} not found; install the project (pip install -e .) into this Python")
        if self.args.profile and not Path(self.args.py_spy).exists() and not shutil.which(self.args.py_spy):
            sys.exit(f"py-spy not found at {self.args.py_spy}; give --py-spy PATH or leave out --profile")

    def setup(self) -> None:
        self.check_tools()
        self.loadavg0 = run_text(["cat", "/proc/loadavg"])
        self.base = Path(tempfile.mkdtemp(prefix="mars-repl-", dir=self.args.dir))
        if len(str(self.base / "a" / "nbd.sock")) >= 100:
            raise RuntimeError(f"{self.base} is too long for a unix socket path; give a shorter --dir")
        self.port = self.args.port or pick_port()
        (self.base / "img").mkdir()
        need = (8 if self.args.split else 4) * self.args.log_gib + 5 * self.args.sync_gib
        free = shutil.disk_usage(self.base).free
        if free < need * 1.1:
            raise RuntimeError(f"{self.base} has {human_bytes(free)} free; this run needs about {human_bytes(need)}")

    def start_cluster(self) -> None:
        self.a = Node(self, "a", A_IP)
        self.b = Node(self, "b", B_IP)
        self.a.marsadm("--ip", A_IP, "create-cluster")
        self.a.start()
        secret = self.base / "secret-b.pem"
        secret.write_text(self.a.marsadm("export-secret").stdout)
        os.chmod(secret, 0o600)
        self.commands[-1] += f" > {secret}"
        self.b.marsadm("--ip", B_IP, "join-cluster", f"{A_IP}:{self.port}", "--secret-file", str(secret))
        self.b.start()
        wait_until(lambda: self.a.value(f"ips/ip-{self.b.host}") == B_IP and self.b.value("actual-a/alive") == "1",
                   30, "a and b to see each other")

    def teardown(self) -> None:
        for n in (self.b, self.a):
            if n is not None:
                n.stop()
        self.procs.stop_all()
        remove_workdir(self.base, self.args.keep)

    def run(self, cmd: list, timeout: float, record: bool = True) -> tuple[subprocess.CompletedProcess[str], float]:
        """Run a command to completion (killed on timeout, error, Ctrl-C); returns it and its wall time."""
        cmd = [str(c) for c in cmd]
        if record:
            self.commands.append(sh(cmd))
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        if r.returncode:
            raise RuntimeError(f"{sh(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}{r.stdout[-2000:]}")
        return r, wall

    @staticmethod
    def status(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def drop_caches(self) -> None:
        os.sync()
        if self.args.drop_caches:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")

    # -- the two limits ----------------------------------------------------------------------

    def disk_limit(self) -> None:
        size = self.args.log_gib
        path = self.base / "img" / "fio-disk.img"
        out = self.base / "fio-disk.json"
        cmd = ["fio", "--name=disk-seq", f"--filename={path}", "--rw=write", "--bs=1m", f"--size={size}",
               "--ioengine=psync", "--end_fsync=1", "--output-format=json", f"--output={out}"]
        self.status(f"disk limit: fio sequential write of {human_bytes(size)} + end_fsync ...")
        self.drop_caches()
        d0 = disk_sectors_written(self.base)
        _, wall = self.run(cmd, 600, record=False)
        d1 = disk_sectors_written(self.base)
        fio_bw = None
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            text = out.read_text()
            fio_bw = json.loads(text[text.index("{"):])["jobs"][0]["write"]["bw_bytes"] / MIB
        path.unlink(missing_ok=True)
        self.res["disk"] = {"bytes": size, "wall_s": wall, "mib_s": size / MIB / wall, "fio_mib_s": fio_bw,
                            "disk_mib": (d1 - d0) * 512 / MIB if d0 is not None and d1 is not None else None,
                            "cmd": sh(cmd)}
        self.status(f"  {size / MIB / wall:,.0f} MiB/s (size / wall time incl. the final fsync)")

    def tcp_limit(self) -> None:
        size = self.args.log_gib
        port = pick_port(self.port + 1 if self.port < 65535 else 5201)
        if shutil.which("iperf3"):
            srv = ["iperf3", "-s", "-B", A_IP, "-p", str(port), "-1"]
            cli = ["iperf3", "-c", A_IP, "-B", B_IP, "-p", str(port), "-n", str(size), "-l", "128K", "-J"]
            self.status(f"TCP limit: iperf3 -n {human_bytes(size)} over loopback {B_IP} -> {A_IP} ...")
            server = self.procs.start("iperf3-server", srv, log=self.base / "iperf3-server.log")
            time.sleep(0.3)
            try:
                r, wall = self.run(cli, 300, record=False)
            finally:
                Procs.stop(server, timeout=10)
            j = json.loads(r.stdout)
            end = j["end"]
            recv = end.get("sum_received", end.get("sum", {}))
            mib_s = recv["bits_per_second"] / 8 / MIB
            self.res["tcp"] = {"tool": "iperf3", "bytes": recv.get("bytes", size), "mib_s": mib_s,
                               "wall_s": recv.get("seconds", wall), "cmd": f"{sh(srv)} & {sh(cli)}"}
        else:
            self.status("TCP limit: iperf3 not found, Python socket copy ...")
            mib_s, secs = self.python_tcp_copy(port, size)
            self.res["tcp"] = {"tool": "python socket copy (iperf3 not installed)", "bytes": size, "mib_s": mib_s,
                               "wall_s": secs, "cmd": f"(in-process) socket.sendall of {size} B {B_IP} -> {A_IP}:{port}"}
        self.status(f"  {self.res['tcp']['mib_s']:,.0f} MiB/s ({self.res['tcp']['tool']})")

    def tls_limit(self) -> None:
        """Informational: the engine's transport alone (asyncio + TLS 1.3 with the cluster's
        credentials, 8 MiB request/reply like the fetcher, two processes, no disk)."""
        size = self.args.log_gib
        port = pick_port(self.port + 2 if self.port < 65534 else 5202)
        me = [sys.executable, Path(__file__).resolve(), "--tls-helper"]
        srv = [*me, "serve", "--mars-dir", self.a.mars_dir, "--host", "a", "--ip", A_IP, "--port", str(port)]
        cli = [*me, "fetch", "--mars-dir", self.b.mars_dir, "--host", "b", "--ip", A_IP, "--port", str(port),
               "--bytes", str(size)]
        self.status(f"transport: asyncio+TLS 8 MiB request/reply, {human_bytes(size)} ...")
        log = self.base / "tls-server.log"
        server = self.procs.start("tls-server", srv, log=log)
        try:
            wait_until(lambda: "ready" in log.read_text() or server.poll() is not None, 30, "the TLS helper to listen")
            if server.poll() is not None:
                raise RuntimeError(f"TLS helper server exited: {log.read_text()[-2000:]}")
            r, _ = self.run(cli, 600, record=False)
        finally:
            Procs.stop(server, signal.SIGINT, 10)
        j = json.loads(r.stdout.strip().splitlines()[-1])
        self.res["tls"] = {**j, "cmd": f"{sh(srv)} & {sh(cli)}"}
        self.status(f"  {j['mib_s']:,.0f} MiB/s")

    @staticmethod
    def python_tcp_copy(port: int, size: int) -> tuple[float, float]:
        """Fallback raw TCP copy: one sender thread, the receiver here; MiB/s measured at the receiver."""
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((A_IP, port))
        srv.listen(1)
        buf = os.urandom(MIB)

        def send():
            with socket.socket() as c:
                c.bind((B_IP, 0))
                c.connect((A_IP, port))
                left = size
                while left:
                    n = min(left, len(buf))
                    c.sendall(buf[:n])
                    left -= n

        t = threading.Thread(target=send, daemon=True)
        t.start()
        conn, _ = srv.accept()
        got = 0
        rbuf = bytearray(MIB)
        t0 = time.monotonic()
        while got < size:
            n = conn.recv_into(rbuf)
            if not n:
                break
            got += n
        secs = time.monotonic() - t0
        conn.close()
        srv.close()
        t.join(10)
        return got / MIB / secs, secs

    # -- profiling ---------------------------------------------------------------------------

    def start_profiles(self, phase: str) -> list[subprocess.Popen]:
        if not self.args.profile:
            return []
        out = []
        for n in (self.a, self.b):
            raw = self.base / f"py-spy-{phase}-{n.host}.txt"
            cmd = [self.args.py_spy, "record", "-p", str(n.proc.pid), "-f", "raw", "-o", raw, "--nonblocking",
                   "-r", "200"]
            out.append(self.procs.start(f"py-spy-{n.host}", cmd, log=raw.with_suffix(".log")))
            self.profiles[f"{phase} marsd-{n.host}"] = raw
        time.sleep(1.0)  # py-spy attaches
        return out

    @staticmethod
    def stop_profiles(ps: list[subprocess.Popen]) -> None:
        for p in ps:
            Procs.stop(p, signal.SIGINT, 30)

    # -- (a) catch-up ------------------------------------------------------------------------

    def log_path(self, node: Node, res: str, name: str) -> Path:
        return node.mars_dir / f"resource-{res}" / name

    def settled(self, res: str) -> str:
        """a's replay-a once it covers a's whole log (the checkpoint after the last write)."""
        a = self.a

        def done():
            v = a.value(f"resource-{res}/replay-a")
            if not v or v.count(",") != 2:
                return None
            name, pos, _ = v.split(",")
            p = self.log_path(a, res, name)
            return v if p.exists() and int(pos) == p.stat().st_size else None
        return wait_until(done, 60, f"a's replay-a to cover its log of {res}", 0.05)

    def switch(self, res: str, switch: str, on: bool) -> str:
        """One of b's switches (connect = fetch, allow-replay = replay): marsadm's command when it
        has one, else the tree entry ``todo-b/<switch>`` itself. Returns the command for the report."""
        if self.have_switch_cmds is None:
            self.have_switch_cmds = subprocess.run(self.b.marsadm_cmd("disconnect", "--help"), capture_output=True,
                                                   env=self.env, timeout=60).returncode == 0
        if self.have_switch_cmds:
            name = {("connect", True): "connect", ("connect", False): "disconnect",
                    ("allow-replay", True): "resume-replay", ("allow-replay", False): "pause-replay"}[(switch, on)]
            self.b.marsadm(name, res)
            return sh(self.b.marsadm_cmd(name, res))
        rel = f"resource-{res}/todo-b/{switch}"
        self.b.set_value(rel, "1" if on else "0")
        what = f"ln -sfn {int(on)} {self.b.mars_dir / rel}  # atomically (temp symlink + rename), then poke marsd"
        self.commands.append(what)
        return what

    def prepare_catchup(self, res: str, size: int) -> str:
        """Resource ``res`` on a, b joined while it is empty (nothing to sync) and replaying; a's replay-a."""
        a, b = self.a, self.b
        a.marsadm("create-resource", res, str(self.base / "img" / f"a-{res}.img"), str(size))
        b.wait_value(f"resource-{res}/size", str(size), 30)
        b.marsadm("join-resource", res, str(self.base / "img" / f"b-{res}.img"), "--create")
        b.wait_value(f"resource-{res}/syncstatus-b", str(size), 120)
        start = self.settled(res)
        b.wait_value(f"resource-{res}/replay-b", start, 60)
        return start

    def load(self, res: str, size: int) -> dict:
        """1 MiB sequential writes through a's NBD export; then a's settled replay-a."""
        out = self.base / f"fio-load-{res}.json"
        cmd = ["fio", f"--name=load-{res}", "--ioengine=nbd", f"--uri={self.a.uri(res)}", "--rw=write", "--bs=1m",
               "--iodepth=8", f"--size={size}", "--output-format=json", f"--output={out}"]
        self.status(f"  writing {human_bytes(size)} through a's NBD export ...")
        _, wall = self.run(cmd, 1200)
        mib_s = None
        with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
            text = out.read_text()
            mib_s = json.loads(text[text.index("{"):])["jobs"][0]["write"]["bw_bytes"] / MIB
        return {"target": self.settled(res), "wall_s": wall, "mib_s": mib_s, "cmd": sh(cmd)}

    def catchup(self) -> None:
        a, b, res = self.a, self.b, RES_CATCHUP
        size = self.args.log_gib
        self.status(f"(a) catch-up: resource {res}, {human_bytes(size)} of log ...")
        start = self.prepare_catchup(res, size)
        pause_cmd = self.switch(res, "connect", False)
        b.wait_value(f"resource-{res}/actual-b/is-copying", "0", 30)
        ld = self.load(res, size)
        target = ld["target"]
        name, pos, _ = target.split(",")
        pos = int(pos)
        sname, spos, _ = start.split(",")
        log_bytes = pos - int(spos) if sname == name else pos
        copy = self.log_path(b, res, name)
        if b.value(f"resource-{res}/replay-b") != start:
            raise RuntimeError("b replayed while its fetch was paused: the pause did not hold")
        self.drop_caches()
        # Catch-up: resume the fetch and time until b has replayed a's whole log.
        self.status("  resuming b's fetch ...")
        profs = self.start_profiles("catchup")
        cpu0 = {n.host: n.cpu() for n in (a, b)}
        d0 = disk_sectors_written(self.base)
        t0 = time.monotonic()
        resume_cmd = self.switch(res, "connect", True)
        t_fetched = None
        last_print = t0
        while True:
            b.check_alive()
            a.check_alive()
            now = time.monotonic()
            if t_fetched is None:
                with contextlib.suppress(OSError):
                    if copy.stat().st_size >= pos:
                        t_fetched = now - t0
            if b.value(f"resource-{res}/replay-b") == target:
                break
            if now - t0 > self.args.timeout:
                raise RuntimeError(f"b did not catch up within {self.args.timeout} s: replay-b = "
                                   f"{b.value(f'resource-{res}/replay-b')}, want {target}\n{b.log()}")
            if now - last_print > 5:
                with contextlib.suppress(OSError):
                    self.status(f"    {now - t0:5.1f} s: fetched {copy.stat().st_size / MIB:,.0f} MiB, "
                                f"replay-b {b.value(f'resource-{res}/replay-b')}")
                last_print = now
            time.sleep(0.01)
        secs = time.monotonic() - t0
        d1 = disk_sectors_written(self.base)
        cpu1 = {n.host: n.cpu() for n in (a, b)}
        self.stop_profiles(profs)
        self.res["catchup"] = {
            "log_bytes": log_bytes, "secs": secs, "mib_s": log_bytes / MIB / secs,
            "fetch_secs": t_fetched, "fetch_mib_s": log_bytes / MIB / t_fetched if t_fetched else None,
            "cpu_s": {h: round(cpu1[h] - cpu0[h], 2) for h in cpu0 if cpu0[h] is not None and cpu1[h] is not None},
            "disk_mib": (d1 - d0) * 512 / MIB if d0 is not None and d1 is not None else None,
            "load_mib_s": ld["mib_s"], "load_wall_s": ld["wall_s"], "target": target,
            "cmds": [pause_cmd, ld["cmd"], resume_cmd],
        }
        c = self.res["catchup"]
        self.status(f"  caught up in {secs:.2f} s: {c['mib_s']:,.0f} MiB/s"
                    + (f" (log fetched after {t_fetched:.2f} s)" if t_fetched else ""))

    def split(self) -> None:
        """Diagnostic (--split): the same catch-up on a fresh resource, fetch and replay one after the other."""
        a, b, res = self.a, self.b, RES_SPLIT
        size = self.args.log_gib
        self.status(f"(a') split catch-up: resource {res}: fetch alone, then replay alone ...")
        self.prepare_catchup(res, size)
        self.switch(res, "allow-replay", False)
        self.switch(res, "connect", False)
        b.wait_value(f"resource-{res}/actual-b/is-copying", "0", 30)
        b.wait_value(f"resource-{res}/actual-b/is-replaying", "0", 30)
        ld = self.load(res, size)
        name, pos, _ = ld["target"].split(",")
        pos = int(pos)
        copy = self.log_path(b, res, name)
        out = {}
        for phase, switch in (("fetch", "connect"), ("replay", "allow-replay")):
            self.drop_caches()
            profs = self.start_profiles(f"split-{phase}")
            cpu0 = {n.host: n.cpu() for n in (a, b)}
            t0 = time.monotonic()
            self.switch(res, switch, True)
            if phase == "fetch":
                wait_until(lambda: copy.exists() and copy.stat().st_size >= pos, self.args.timeout, "b's fetch", 0.01)
            else:
                b.wait_value(f"resource-{res}/replay-b", ld["target"], self.args.timeout)
            secs = time.monotonic() - t0
            cpu1 = {n.host: n.cpu() for n in (a, b)}
            self.stop_profiles(profs)
            out[phase] = {"secs": secs, "mib_s": pos / MIB / secs,
                          "cpu_s": {h: round(cpu1[h] - cpu0[h], 2) for h in cpu0
                                    if cpu0[h] is not None and cpu1[h] is not None}}
            self.status(f"  {phase} alone: {secs:.2f} s, {pos / MIB / secs:,.0f} MiB/s")
        self.res["split"] = {"log_bytes": pos, **out}

    # -- (b) fast full sync vs rsync ---------------------------------------------------------

    def fullsync(self) -> None:
        a, b, res = self.a, self.b, RES_SYNC
        size = self.args.sync_gib
        img = self.base / "img"
        self.status(f"(b) full sync: resource {res}, {human_bytes(size)} image, {DIFFER:.0%} of 1 MiB chunks differ ...")
        a.marsadm("create-resource", res, str(img / "a-s.img"), str(size))
        src = img / "src.img"
        write_random_file(src, size)
        self.commands.append(f"head -c {size} /dev/urandom > {src}")
        self.run(["nbdcopy", src, a.uri(res)], 1200)
        self.settled(res)
        # The secondary's image: the same bytes with 1 % of the chunks replaced by other random data.
        nchunks = (size + CHUNK - 1) // CHUNK
        changed = sorted(random.Random(SEED).sample(range(nchunks), max(1, round(nchunks * DIFFER))))
        b_img, r_img = img / "b-s.img", img / "rsync-dst.img"
        shutil.copyfile(src, b_img)
        with open(b_img, "r+b") as f:
            for i in changed:
                f.seek(i * CHUNK)
                f.write(os.urandom(min(CHUNK, size - i * CHUNK)))
        shutil.copyfile(b_img, r_img)
        src.unlink()
        self.commands.append(f"cp {src} {b_img}; overwrite {len(changed)} random 1 MiB chunks with random data "
                             f"(seed {SEED}); cp {b_img} {r_img}")
        # A fresh log file, so that b's fetch has nothing to do while it syncs: join-resource starts
        # replay at the beginning of the primary's current log file, which holds the nbdcopy above.
        a.marsadm("log-rotate", res)
        b.wait_value(f"resource-{res}/size", str(size), 30)
        self.drop_caches()
        self.status("  MARS: b joins with its image ...")
        profs = self.start_profiles("sync")
        cpu0 = {n.host: n.cpu() for n in (a, b)}
        t0 = time.monotonic()
        b.marsadm("join-resource", res, str(b_img), "--create")
        t_joined = time.monotonic() - t0
        b.wait_value(f"resource-{res}/syncstatus-b", str(size), self.args.timeout)
        secs = time.monotonic() - t0
        cpu1 = {n.host: n.cpu() for n in (a, b)}
        self.stop_profiles(profs)
        b.wait_value(f"resource-{res}/actual-b/is-syncing", "0", 30)
        b.wait_value(f"resource-{res}/actual-b/sync-chunks-copied", lambda v: v is not None, 30)
        time.sleep(1.5)  # one more publish round, so the counters are the final ones
        copied = int(b.value(f"resource-{res}/actual-b/sync-copied-bytes") or 0)
        chunks_copied = int(b.value(f"resource-{res}/actual-b/sync-chunks-copied") or 0)
        chunks_equal = int(b.value(f"resource-{res}/actual-b/sync-chunks-equal") or 0)
        same = subprocess.run(["cmp", "-s", img / "a-s.img", b_img]).returncode == 0
        overhead = self.sync_protocol_bytes(nchunks, chunks_copied, img / "a-s.img")
        self.res["sync"] = {"bytes": size, "secs": secs, "join_secs": t_joined, "copied": copied,
                            "chunks": nchunks, "chunks_changed": len(changed), "chunks_copied": chunks_copied,
                            "chunks_equal": chunks_equal, "identical": same, "protocol_bytes": overhead,
                            "cpu_s": {h: round(cpu1[h] - cpu0[h], 2) for h in cpu0
                                      if cpu0[h] is not None and cpu1[h] is not None}}
        self.status(f"  MARS sync: {secs:.2f} s, {human_bytes(copied)} copied, identical: {same}")
        # rsync of a's image onto the other copy of b's original image.
        rs = ["rsync", "--inplace", "--no-whole-file", "--ignore-times", "--stats", img / "a-s.img", r_img]
        self.drop_caches()
        self.status("  rsync ...")
        r, wall = self.run(rs, 1800)
        stats = {}
        for key, pat in (("sent", r"Total bytes sent:\s*([\d,.]+)"), ("received", r"Total bytes received:\s*([\d,.]+)"),
                         ("literal", r"Literal data:\s*([\d,.]+)"), ("matched", r"Matched data:\s*([\d,.]+)")):
            m = re.search(pat, r.stdout)
            stats[key] = int(re.sub(r"[,.]", "", m.group(1))) if m else None
        same = subprocess.run(["cmp", "-s", img / "a-s.img", r_img]).returncode == 0
        self.res["rsync"] = {"secs": wall, **stats, "identical": same, "cmd": sh(rs)}
        self.status(f"  rsync: {wall:.2f} s, {human_bytes(stats['sent'] or 0)} sent, identical: {same}")

    def sync_protocol_bytes(self, nchunks: int, copied_chunks: int, image: Path) -> int | None:
        """What the sync sends besides chunk data: digest requests and replies, read request/reply frames.

        Encoded with the engine's own peer codec, with digests as long as the engine makes them;
        TLS record overhead (~0.2 %) is not counted.
        """
        try:
            from mars.engine.peer import protocol as P
            from mars.engine.roles import syncer as S
        except ImportError:
            return None
        try:
            fd = os.open(image, os.O_RDONLY)
            try:
                d = S.chunk_digests(fd, 0, S.CHUNK, 1, S.CHUNK)[0] or "0" * 32
            finally:
                os.close(fd)
            total = 0
            left = nchunks
            while left > 0:
                n = min(left, S.WINDOW)
                total += len(P.encode(P.DigestRequest(req=1, res=RES_SYNC, offset=0, chunk=S.CHUNK, count=n)))
                total += len(P.encode(P.DigestReply(req=1, res=RES_SYNC, offset=0, chunk=S.CHUNK, digests=(d,) * n)))
                left -= n
            total += copied_chunks * (len(P.encode(P.ReadRequest(req=1, res=RES_SYNC, offset=0, length=S.CHUNK)))
                                      + len(P.encode(P.ReadReply(req=1, offset=0, data=b""))))
            return total
        except Exception as e:  # the estimate is a side note; never fail the run for it
            self.notes.append(f"could not estimate the sync's protocol bytes: {e!r}")
            return None

    # -- report ------------------------------------------------------------------------------

    def machine(self) -> dict:
        return {**machine_facts(self.base), "fio": run_text(["fio", "--version"]),
                "rsync": run_text(["rsync", "--version"]).splitlines()[0] if shutil.which("rsync") else "?",
                "iperf3": run_text(["iperf3", "--version"]).splitlines()[0] if shutil.which("iperf3") else "-",
                "loadavg": run_text(["cat", "/proc/loadavg"])}

    def report(self) -> dict:
        m = self.machine()
        r = self.res
        p = print
        p()
        p(f"MARS replication benchmark  {m['date']}")
        p(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, kernel {m['kernel']}, python {m['python']}")
        p(f"tools:   {m['fio']}, {m['rsync']}, {m['iperf3']}")
        p(f"fs:      {m['df_T']}")
        p(f"cluster: a {A_IP} (primary), b {B_IP} (secondary), peer port {self.port} (TLS)")
        p(f"load:    /proc/loadavg at the start {self.loadavg0}, at the end {m['loadavg']} (other work on the "
          f"machine competes for its {m['nproc']} CPUs)")
        goals = []
        c, disk, tcp = r.get("catchup"), r.get("disk"), r.get("tcp")
        if c:
            p()
            p(f"(a) catch-up of {human_bytes(c['log_bytes'])} of log after b's fetch was paused")
            hdr = f"  {'what':52} {'bytes':>11} {'seconds':>8} {'MiB/s':>9}  {'MARS/this':>9}"
            p(hdr)
            p("  " + "-" * (len(hdr) - 2))
            p(f"  {'MARS catch-up (resume fetch .. replay-b = replay-a)':52} {human_bytes(c['log_bytes']):>11} "
              f"{c['secs']:>8.2f} {c['mib_s']:>9,.1f}")
            if c["fetch_secs"]:
                p(f"  {'  of which: log copy complete on b':52} {'':>11} {c['fetch_secs']:>8.2f} "
                  f"{c['fetch_mib_s']:>9,.1f}")
            limits = []
            if tcp:
                limits.append(tcp["mib_s"])
                p(f"  {'raw TCP over loopback (' + tcp['tool'].split(' (')[0] + ')':52} {human_bytes(tcp['bytes']):>11} "
                  f"{tcp['wall_s']:>8.2f} {tcp['mib_s']:>9,.1f}  {c['mib_s'] / tcp['mib_s']:>8.3f}x")
            tls = r.get("tls")
            if tls:
                p(f"  {'(info: asyncio+TLS 8 MiB req/reply, no disk)':52} {human_bytes(tls['bytes']):>11} "
                  f"{tls['secs']:>8.2f} {tls['mib_s']:>9,.1f}  {c['mib_s'] / tls['mib_s']:>8.3f}x")
            if disk:
                limits.append(disk["mib_s"])
                p(f"  {'disk: fio seq 1 MiB write + end_fsync':52} {human_bytes(disk['bytes']):>11} "
                  f"{disk['wall_s']:>8.2f} {disk['mib_s']:>9,.1f}  {c['mib_s'] / disk['mib_s']:>8.3f}x")
            if c.get("load_mib_s"):
                p(f"  {'(load: fio nbd 1 MiB seq QD8 into a)':52} {human_bytes(c['log_bytes']):>11} "
                  f"{c['load_wall_s']:>8.2f} {c['load_mib_s']:>9,.1f}")
            sp = r.get("split")
            if sp:
                for phase, label in (("fetch", "(--split: fetch alone, replay paused)"),
                                     ("replay", "(--split: then replay alone)")):
                    x = sp[phase]
                    cpu = ", ".join(f"{h} {v:.1f}" for h, v in x["cpu_s"].items())
                    p(f"  {label:52} {human_bytes(sp['log_bytes']):>11} {x['secs']:>8.2f} {x['mib_s']:>9,.1f}"
                      f"  {'':9}  CPU s: {cpu}")
            cpu = ", ".join(f"marsd-{h} {s:.1f} s" for h, s in c["cpu_s"].items())
            p(f"  during catch-up: CPU {cpu} in {c['secs']:.1f} s wall"
              + (f"; {c['disk_mib']:,.0f} MiB reached the disk" if c.get("disk_mib") is not None else ""))
            mib = c["log_bytes"] / 2**20
            if mib and "b" in c["cpu_s"]:  # issue 17: the secondary's CPU per replicated MiB
                p(f"  secondary marsd-b CPU per replicated MiB: {c['cpu_s']['b'] * 1e3 / mib:.2f} ms/MiB "
                  f"({c['cpu_s']['b']:.1f} s for {mib:,.0f} MiB)")
            lim = min(limits) if limits else None
            ok = c["mib_s"] >= GOAL_CATCHUP_MIB_S or (lim is not None and c["mib_s"] >= GOAL_CATCHUP_VS_LIMIT * lim)
            goals.append((ok, f"catch-up >= {GOAL_CATCHUP_MIB_S:g} MiB/s or >= {GOAL_CATCHUP_VS_LIMIT:g}x the smaller "
                              f"limit ({lim:,.1f} MiB/s)" if lim else f"catch-up >= {GOAL_CATCHUP_MIB_S:g} MiB/s",
                          f"{c['mib_s']:,.1f} MiB/s" + (f" = {c['mib_s'] / lim:.3f}x" if lim else "")))
        s, rs = r.get("sync"), r.get("rsync")
        if s:
            p()
            p(f"(b) full sync of a {human_bytes(s['bytes'])} image; the secondary's copy differs in "
              f"{s['chunks_changed']} of {s['chunks']} 1 MiB chunks ({s['chunks_changed'] / s['chunks']:.2%})")
            hdr = f"  {'what':44} {'seconds':>8} {'bytes sent':>12} {'% of image':>10}  {'identical':>9}"
            p(hdr)
            p("  " + "-" * (len(hdr) - 2))
            p(f"  {'MARS fast full sync (join .. syncstatus=size)':44} {s['secs']:>8.2f} {human_bytes(s['copied']):>12} "
              f"{s['copied'] / s['bytes']:>10.2%}  {'yes' if s['identical'] else 'NO':>9}")
            if rs:
                p(f"  {'rsync --inplace --no-whole-file (delta)':44} {rs['secs']:>8.2f} {human_bytes(rs['sent'] or 0):>12} "
                  f"{(rs['sent'] or 0) / s['bytes']:>10.2%}  {'yes' if rs['identical'] else 'NO':>9}")
                p(f"  MARS time / rsync time = {s['secs'] / rs['secs']:.3f}x; rsync literal data "
                  f"{human_bytes(rs['literal'] or 0)}, matched {human_bytes(rs['matched'] or 0)}, received "
                  f"{human_bytes(rs['received'] or 0)}")
            extra = (f"; digest/request frames add ~{human_bytes(s['protocol_bytes'])} "
                     f"({s['protocol_bytes'] / s['bytes']:.4%} of the image, TLS records ~0.2 % more)"
                     if s.get("protocol_bytes") is not None else "")
            p(f"  MARS: {s['chunks_copied']} chunks copied, {s['chunks_equal']} equal; bytes sent = "
              f"actual-b/sync-copied-bytes{extra}")
            cpu = ", ".join(f"marsd-{h} {v:.1f} s" for h, v in s["cpu_s"].items())
            p(f"  during the sync: CPU {cpu} in {s['secs']:.1f} s wall (join-resource returned after "
              f"{s['join_secs']:.2f} s)")
            goals.append((s["copied"] / s["bytes"] < GOAL_SYNC_SENT and s["identical"],
                          f"MARS sync sends < {GOAL_SYNC_SENT:.0%} of the image", f"{s['copied'] / s['bytes']:.2%}"))
            if rs:
                goals.append((s["secs"] < rs["secs"], "MARS sync time < rsync time",
                              f"{s['secs']:.2f} s vs {rs['secs']:.2f} s = {s['secs'] / rs['secs']:.3f}x"))
        p()
        p("goals:")
        for ok, goal, got in goals:
            p(f"  [{'PASS' if ok else 'MISS'}] {goal}: measured {got}")
        for name, raw in self.profiles.items():
            samples, top_self, top_total = py_spy_top(raw)
            if samples < 50:  # an idle process: nothing to learn
                continue
            p()
            p(f"py-spy {name}: {samples} samples (200/s, GIL holders and waiters, idle threads left out)")
            p(f"  {'self %':>7}  {'total %':>7}  function")
            totals = dict(top_total)
            for f, n in top_self[:10]:
                t = totals.get(f)
                p(f"  {100 * n / samples:>6.1f}%  {(f'{100 * t / samples:6.1f}%') if t else '':>7}  {f}")
        for n in self.notes:
            p(f"note: {n}")
        p()
        p("notes: MiB/s = log bytes (records incl. 80 B header/trailer per 1 MiB write) / seconds from the resume")
        p("command until b's replay-b equals a's replay-a. The catch-up writes every log byte twice on b (log copy +")
        p("data device), dropping both from the page cache behind the replay once on disk (so 2x the log reaches")
        p("the disk within the timed phase); the primary serves its log from the page cache. The disk limit is")
        p("size / wall time of fio incl. its final fsync. Both syncs read both images from the page cache (no")
        p("--drop-caches) or from disk (--drop-caches); rsync's bytes are local pipe bytes, MARS's go through TLS.")
        p()
        p(f"commands (paths are this run's temporary directory {self.base}; --keep keeps it):")
        if disk:
            p(f"  {disk['cmd']}")
        if tcp:
            p(f"  {tcp['cmd']}")
        if r.get("tls"):
            p(f"  {r['tls']['cmd']}")
        for cmd in self.commands:
            p(f"  {cmd}")
        p("  # (a) timed: from the resume command until b's resource-r/replay-b == a's resource-r/replay-a")
        p("  # (b) timed: from join-resource until b's resource-s/syncstatus-b == resource-s/size")
        return {"machine": m, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
                "results": r, "goals": [{"pass": ok, "goal": g, "measured": x} for ok, g, x in goals],
                "commands": self.commands, "notes": self.notes}


def main() -> int:
    if sys.argv[1:2] == ["--tls-helper"]:
        return tls_helper(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="where to make the temporary directory (the file system under test)")
    ap.add_argument("--log-gib", type=gib_arg, default=gib_arg("2"), help="GiB of log for the catch-up (default 2)")
    ap.add_argument("--sync-gib", type=gib_arg, default=gib_arg("2"), help="GiB of image for the full sync (default 2)")
    ap.add_argument("--port", type=int, default=0, help="peer port of both marsd (default 7777 if free, else a free one)")
    ap.add_argument("--skip", choices=["catchup", "sync"], action="append", default=[], help="leave out a part")
    ap.add_argument("--split", action="store_true",
                    help="diagnostic: repeat the catch-up on another resource with fetch and replay one after the other")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for a catch-up or a sync (default 900)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="sync and drop the page cache before each timed phase (affects the whole machine)")
    ap.add_argument("--profile", action="store_true", help="record both marsd with py-spy during the timed phases")
    ap.add_argument("--py-spy", default=shutil.which("py-spy") or "/root/.pyenv/shims/py-spy", help="py-spy to use")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (images, logs, profiles)")
    args = ap.parse_args()

    bench = Bench(args)
    data: dict = {}

    def work() -> None:
        bench.status("setting up ...")
        bench.setup()
        if "catchup" not in args.skip:
            bench.disk_limit()
            bench.tcp_limit()
        bench.start_cluster()
        if "catchup" not in args.skip:
            bench.tls_limit()
            bench.catchup()
            if args.split:
                bench.split()
        if "sync" not in args.skip:
            bench.fullsync()
        data.update(bench.report())
    if run_guarded(work, bench.teardown):
        return 130
    if args.json:
        write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
