#!/usr/bin/env python3
"""Write benchmark: MARS NBD export vs. qemu-nbd --cache=writethrough vs. a plain fdatasync'd file.

Run:  python bench/bench_write.py [--dir DIR] [--size 1G] [--runtime 10] [--seq-qd 8] [--json FILE]

Everything lives in one temporary directory under --dir (default /var/tmp), so the three
targets share a file system. Three images of --size are made there, allocated by default
(``--image allocated``: every block written once with O_DIRECT before any run, as a block device
or a preallocated image is, with nothing of it in the page cache) or sparse (``--image sparse``,
as ``marsadm create-resource`` makes a new image; every first write then also allocates):

* ``r.img``  the data device of a MARS resource ``r`` served by a fresh marsd (its log files
  and state tree are in the same directory);
* ``q.img``  served by ``qemu-nbd --cache=writethrough -f raw`` on a unix socket;
* ``p.img``  written by fio's psync engine with ``--fdatasync=1``.

Two workloads run against each: 4 KiB random writes at QD 32 and 1 MiB sequential writes at
QD --seq-qd (8). The 4 KiB workload also runs against --resources (4) resources of the same marsd
at once, one fio job of QD 32 each (``mars4``: what several busy resources on one host share, as
every node runs one marsd for all of them), and, with ``--separate`` (default), against as many
resources each in a marsd of its own (``mars4p``: the most a process per resource could give
on this machine, measured rather than guessed). For each MARS run marsd's CPU time (all threads)
is divided by the writes and MiB it logged: CPU microseconds per acknowledged write and per MiB. The psync engine is synchronous, so the plain-file runs are QD 1 (one job, one
write + one fdatasync at a time) whatever the NBD runs use. Every fio command line is printed so it
can be rerun by hand while the servers are up (``--keep`` leaves the directory behind).

All processes started here are stopped, and the directory removed, on success, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import mmap
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from harness import wait_until  # noqa: E402  (the tests' condition wait, with a deadline)
RES = "r"
HOST = "a"
RECORD_OVERHEAD = 64 + 16  # log record header + trailer (engine/logformat.py)

# Issue 17's goals, each a ratio to a limit or a peer measured in the same run.
GOAL_RAND_VS_QEMU = 4.0  # 4 KiB QD32 write IOPS >= 4x qemu-nbd writethrough
GOAL_CPU_US_PER_WRITE = 25.0  # ... with marsd's CPU <= 25 us per acknowledged write
GOAL_SEQ_VS_HALF_DISK = 0.9  # 1 MiB sequential MiB/s >= 0.9x half the disk's (the double-write ceiling)
GOAL_SEQ_VS_FILE = 0.45  # ... and >= 0.45x the plain fdatasync'd file
GOAL_MULTI_VS_ONE = 1.5  # 4 KiB QD32 on N resources at once: aggregate IOPS >= 1.5x one resource's


# -- small helpers ----------------------------------------------------------------------------

def parse_size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in "kmgt" else ""
    value = int(t[: len(t) - len(unit)]) * units[unit]
    if value <= 0 or value % 4096:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 KiB")
    return value


def fmt_size(n: int) -> str:
    for unit, f in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % f == 0:
            return f"{n // f}{unit}"
    return str(n)


def write_json(path, data: dict) -> None:
    """A bench's figures as JSON (``--json FILE``), for comparing runs."""
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nJSON written to {path}")


def run_guarded(work, teardown) -> int:
    """Run a benchmark so that Ctrl-C, SIGTERM or SIGHUP end it with its clean-up done.

    The signals become KeyboardInterrupt (exit 130 with a line, no traceback); while the
    clean-up runs they are ignored, so a second Ctrl-C cannot leave marsd processes or images
    behind. Returns 0, or 130 when interrupted.
    """
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        work()
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        try:
            teardown()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, on_term)
            signal.signal(signal.SIGHUP, on_term)
    return 0


def remove_workdir(base: Path | None, keep: bool) -> None:
    """The benchmark's temporary directory goes at the end, unless --keep asked to keep it."""
    if base is None:
        return
    if keep:
        print(f"kept {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)


def print_goals(goals: list[tuple[bool, str]]) -> None:
    """The goals as PASS/MISS lines, then the command that reruns the benchmark."""
    print("goals:")
    for ok, text in goals:
        print(f"  [{'PASS' if ok else 'MISS'}] {text}")
    print(f"\ncommand: {sys.executable} {' '.join(sys.argv)}")


FILL_CHUNK = 4 * 2**20


def make_image(path: Path, size: int, kind: str) -> None:
    """A sparse file, or one whose every block is written (zeros) with O_DIRECT.

    O_DIRECT because a buffered fill leaves the whole image in the page cache in large folios,
    and on this kernel (ext4, 6.x) a 4 KiB write into a cached large folio costs the kernel tens
    of microseconds (``ext4_block_write_begin`` walks every block of the folio): measured here,
    4 KiB writes after a buffered ``dd`` cost marsd 88-94 us each, after an O_DIRECT one 29 us.
    A block device or an image that has been in use a while is not in the cache that way."""
    with open(path, "wb") as f:
        f.truncate(size)
    if kind == "sparse":
        return
    if size % FILL_CHUNK:
        raise SystemExit(f"--size {size} is not a multiple of {FILL_CHUNK} bytes (needed to allocate the images)")
    buf = mmap.mmap(-1, FILL_CHUNK)  # page-aligned, as O_DIRECT wants; zeros
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        for off in range(0, size, FILL_CHUNK):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()


def can_connect(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def sh(cmd: list[str]) -> str:
    return shlex.join(str(c) for c in cmd)


def run_text(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_facts(where: Path) -> dict:
    """What a reader needs to compare figures across runs: date, machine, filesystem, Python."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        mem = f"{int(Path('/proc/meminfo').read_text().split()[1]) / 2**20:.1f} GiB"
    df = run_text(["df", "-T", str(where)]).splitlines()
    return {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "nproc": len(os.sched_getaffinity(0)), "cpu": cpu, "memory": mem, "kernel": platform.release(),
            "df_T": df[-1] if df else "?", "python": sys.version.split()[0]}


class Procs:
    """Every long-running child we start; all of them are stopped in ``stop_all``."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], log: Path | None = None, new_session: bool = True) -> subprocess.Popen:
        out = open(log, "ab") if log else subprocess.DEVNULL
        try:
            p = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                                 stdin=subprocess.DEVNULL, start_new_session=new_session)
        finally:
            if log:
                out.close()
        self.procs.append((name, p))
        return p

    @staticmethod
    def stop(p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(10)
        return p.returncode

    def stop_all(self) -> None:
        for _name, p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()


# -- results ----------------------------------------------------------------------------------

@dataclass
class Result:
    workload: str  # "rand4k" | "seq1m"
    target: str  # "mars" | "qemu" | "file"
    qd: int
    cmd: str
    iops: float = 0.0
    mib_s: float = 0.0
    clat_p99_ms: float = 0.0
    clat_mean_ms: float = 0.0
    sync_p99_ms: float | None = None  # file target only: fdatasync latency, reported apart by fio
    disk_mib_s: float | None = None  # what reached the disk (all writers, /proc/diskstats) during the run
    error: str | None = None
    server: dict = field(default_factory=dict)  # mars only: log growth, group-commit figures, CPU
    runs: list[dict] = field(default_factory=list)  # with --repeat: every run's figures (the above are medians)


def disk_sectors_written(path: Path) -> int | None:
    """Sectors written so far to the block device holding ``path`` (field 10 of /proc/diskstats).

    This is the physical limit's side of the comparison: MARS writes every byte twice (log and
    data device), so at the disk's bandwidth its client-visible rate can reach only half of it.
    """
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    try:
        for line in Path("/proc/diskstats").read_text().splitlines():
            f = line.split()
            if int(f[0]) == major and int(f[1]) == minor:
                return int(f[9])
    except (OSError, ValueError, IndexError):
        return None
    return None


def parse_fio(path: Path) -> dict:
    text = path.read_text()
    # The nbd engine prints "fio: connected to NBD server" on stdout; with --output it stays out of
    # the file, but be tolerant anyway.
    j = json.loads(text[text.index("{"):])
    job = j["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}")
    w = job["write"]
    out = {
        "iops": w["iops"],
        "mib_s": w["bw_bytes"] / 2**20,
        "clat_p99_ms": w["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6,
        "clat_mean_ms": w["clat_ns"]["mean"] / 1e6,
        "ios": w["total_ios"],
    }
    sync = job.get("sync", {}).get("lat_ns", {})
    if sync.get("N"):
        out["sync_p99_ms"] = sync.get("percentile", {}).get("99.000000", 0) / 1e6
    return out


def median_result(rs: list[Result]) -> Result:
    """One Result of several runs of the same cell: the median of each figure, every run kept in ``runs``."""
    ok = [r for r in rs if r.error is None]
    out = Result(rs[0].workload, rs[0].target, rs[0].qd, rs[0].cmd)
    out.runs = [{k: v for k, v in asdict(r).items() if k not in ("workload", "target", "qd", "cmd", "runs")} for r in rs]
    if not ok:
        out.error = rs[0].error
        return out
    for attr in ("iops", "mib_s", "clat_p99_ms", "clat_mean_ms"):
        setattr(out, attr, statistics.median(getattr(r, attr) for r in ok))
    syncs = [r.sync_p99_ms for r in ok if r.sync_p99_ms is not None]
    out.sync_p99_ms = statistics.median(syncs) if syncs else None
    disks = [r.disk_mib_s for r in ok if r.disk_mib_s is not None]
    out.disk_mib_s = statistics.median(disks) if disks else None
    keys = set().union(*(r.server for r in ok))
    out.server = {k: statistics.median(r.server[k] for r in ok if k in r.server) for k in keys}
    return out


# -- the benchmark ----------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = args.size
        self.procs = Procs()
        self.base: Path | None = None
        self.marsd: subprocess.Popen | None = None
        self.solo: list[tuple[Path, subprocess.Popen]] = []  # (mars dir, marsd) of the mars4p run
        self.results: list[Result] = []
        self.notes: list[str] = []

    # setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        for tool in ("fio", "qemu-nbd"):
            if not shutil.which(tool):
                sys.exit(f"{tool} not found; install it: apt-get install -y fio qemu-utils")
        for tool in ("marsd", "marsadm"):
            if not (BIN / tool).exists():
                sys.exit(f"{BIN / tool} not found; install the project (pip install -e .) into this Python")
        self.base = Path(tempfile.mkdtemp(prefix="mars-bench-", dir=a.dir))
        if len(str(self.base / HOST / "nbd.sock")) >= 100:
            raise RuntimeError(f"{self.base} is too long for a unix socket path; give a shorter --dir")
        b = self.base
        # MARS
        self.marsadm("--ip", "127.0.0.2", "create-cluster")
        self.marsd = self.procs.start("marsd", [BIN / "marsd", "--mars-dir", b / HOST, "--host", HOST],
                                      log=b / "marsd.log")
        wait_until(lambda: (b / HOST / "nbd.sock").exists() or self.marsd.poll() is not None, 30, "marsd to listen")
        if self.marsd.poll() is not None:
            raise RuntimeError(f"marsd exited with {self.marsd.returncode}:\n{self.marsd_log()}")
        # Every target gets the same kind of image: sparse (what create-resource makes of a new
        # file) or allocated before the runs (what a data device on a block device is).
        images = ["r.img", *(f"{name}.img" for name in self.more_resources()), "q.img", "p.img"]
        for name in images:
            make_image(b / name, self.size, a.image)
        self.marsadm("create-resource", RES, str(b / "r.img"), str(self.size))
        for name in self.more_resources():
            self.marsadm("create-resource", name, str(b / f"{name}.img"), str(self.size))
        self.start_solo()
        self.qemu = self.procs.start("qemu-nbd", ["qemu-nbd", "--cache=writethrough", "-f", "raw", "--persistent",
                                                 "-k", b / "q.sock", b / "q.img"], log=b / "qemu-nbd.log")
        wait_until(lambda: can_connect(b / "q.sock") or self.qemu.poll() is not None, 30, "qemu-nbd to listen")
        if self.qemu.poll() is not None:
            raise RuntimeError(f"qemu-nbd exited with {self.qemu.returncode}: {(b / 'qemu-nbd.log').read_text()}")

    def start_solo(self) -> None:
        """The ``mars4p`` targets: one cluster and one marsd per resource (hosts s1..sN on
        127.0.0.21..), each serving a resource ``r`` on its own image of the same kind."""
        if not self.args.separate or self.args.resources < 2:
            return
        b = self.base
        for i in range(1, self.args.resources + 1):
            host, d = f"s{i}", b / f"s{i}"
            self.marsadm("--ip", f"127.0.0.{20 + i}", "create-cluster", host=host)
            proc = self.procs.start(f"marsd-{host}", [BIN / "marsd", "--mars-dir", d, "--host", host],
                                    log=b / f"marsd-{host}.log")
            self.solo.append((d, proc))
        for i, (d, proc) in enumerate(self.solo, 1):
            wait_until(lambda: (d / "nbd.sock").exists() or proc.poll() is not None, 30, f"marsd s{i} to listen")
            if proc.poll() is not None:
                raise RuntimeError(f"marsd s{i} exited with {proc.returncode}:\n{self.marsd_log(f'marsd-s{i}.log')}")
            make_image(b / f"s{i}.img", self.size, self.args.image)
            self.marsadm("create-resource", RES, str(b / f"s{i}.img"), str(self.size), host=f"s{i}")

    def servers(self, target: str) -> list[tuple[Path, subprocess.Popen]]:
        """The marsd processes (with their mars dirs) that serve a MARS target."""
        return self.solo if target == "mars4p" else [(self.base / HOST, self.marsd)]

    def more_resources(self) -> list[str]:
        """The resources beside ``r`` that the ``mars4`` run writes at the same time."""
        return [f"{RES}{i}" for i in range(2, self.args.resources + 1)] if self.args.resources > 1 else []

    def marsadm(self, *args: str, host: str = HOST) -> None:
        cmd = [str(BIN / "marsadm"), "--mars-dir", str(self.base / host), "--host", host, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if r.returncode:
            log = self.marsd_log() if host == HOST else self.marsd_log(f"marsd-{host}.log")
            raise RuntimeError(f"{sh(cmd)} failed ({r.returncode}):\n{r.stderr}{r.stdout}\n{log}")

    def marsd_log(self, name: str = "marsd.log") -> str:
        with contextlib.suppress(OSError):
            return (self.base / name).read_text(errors="replace")[-4000:]
        return ""

    def teardown(self) -> None:
        if self.marsd is not None and self.marsd.poll() is None:
            code = Procs.stop(self.marsd)
            if code not in (0, None):
                print(f"warning: marsd exited with {code} on SIGTERM", file=sys.stderr)
        self.procs.stop_all()
        remove_workdir(self.base, self.args.keep)

    # fio -----------------------------------------------------------------------------------

    def workloads(self) -> list[tuple[str, str, str, int]]:
        return [("rand4k", "randwrite", "4k", 32), ("seq1m", "write", "1m", self.args.seq_qd)]

    def fio_cmd(self, workload: str, rw: str, bs: str, qd: int, target: str, out: Path) -> list[str]:
        b = self.base
        cmd = ["fio", f"--name={workload}-{target}", f"--rw={rw}", f"--bs={bs}", f"--size={self.size}",
               "--time_based", f"--runtime={self.args.runtime}", "--ramp_time=1", "--direct=0"]
        if target == "mars":
            cmd += ["--ioengine=nbd", f"--uri=nbd+unix:///{RES}?socket={b / HOST / 'nbd.sock'}", f"--iodepth={qd}"]
        elif target in ("mars4", "mars4p"):
            # One job per resource, all at once; group_reporting sums them into one result.
            # mars4: the resources of the one marsd; mars4p: resource r of each separate marsd.
            jobs = [(name, name, b / HOST) for name in (RES, *self.more_resources())] if target == "mars4" \
                else [(d.name, RES, d) for d, _ in self.solo]
            cmd = cmd[:1] + cmd[2:] + ["--ioengine=nbd", f"--iodepth={qd}", "--group_reporting"]
            for job, name, d in jobs:
                cmd += [f"--name={workload}-{job}", f"--uri=nbd+unix:///{name}?socket={d / 'nbd.sock'}"]
            return cmd + ["--output-format=json", f"--output={out}"]
        elif target == "qemu":
            cmd += ["--ioengine=nbd", f"--uri=nbd+unix:///?socket={b / 'q.sock'}", f"--iodepth={qd}"]
        else:
            cmd += ["--ioengine=psync", "--fdatasync=1", "--iodepth=1", "--numjobs=1", f"--filename={b / 'p.img'}"]
        return cmd + ["--output-format=json", f"--output={out}"]

    def log_fd(self) -> tuple[int, Path] | None:
        """The marsd file descriptor of the resource's current log file (for perf's fd filter)."""
        if self.marsd is None:
            return None
        fds = Path(f"/proc/{self.marsd.pid}/fd")
        best = None
        with contextlib.suppress(OSError):
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    t = Path(os.readlink(fd))
                    if t.parent.name == f"resource-{RES}" and t.name.startswith("log-"):
                        if best is None or t.name > best[1].name:
                            best = (int(fd.name), t)
        return best

    def marsd_cpu(self, target: str = "mars") -> float | None:
        """User + system CPU seconds the target's marsd processes have used so far (all threads)."""
        total = 0.0
        for _, proc in self.servers(target):
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, ValueError, IndexError):
                return None
        return total

    def log_bytes(self, target: str = "mars") -> int:
        """Bytes in the log files of every resource (only the written ones grow during a run)."""
        return sum(p.stat().st_size for d, _ in self.servers(target) for p in d.glob("resource-*/log-*"))

    def start_perf(self, out: Path) -> subprocess.Popen | None:
        """Count marsd's fdatasync calls on the log fd (= group commits) and all pwrite(v) calls."""
        if self.args.no_perf or not shutil.which("perf"):
            return None
        lf = self.log_fd()
        if lf is None:
            return None
        cmd = ["perf", "stat", "-x", ",", "-o", str(out), "-p", str(self.marsd.pid),
               "-e", "syscalls:sys_enter_fdatasync", "--filter", f"fd == {lf[0]}",
               "-e", "syscalls:sys_enter_fdatasync",
               "-e", "syscalls:sys_enter_pwritev2", "-e", "syscalls:sys_enter_pwritev",
               "-e", "syscalls:sys_enter_pwrite64"]
        p = self.procs.start("perf", cmd, log=out.with_suffix(".err"))
        time.sleep(0.3)
        if p.poll() is not None:
            self.notes.append("perf stat failed (no tracepoint access?); group-commit counts omitted")
            self.args.no_perf = True
            return None
        return p

    @staticmethod
    def read_perf(out: Path) -> dict[str, int] | None:
        counts: list[tuple[str, int]] = []
        with contextlib.suppress(OSError):
            for line in out.read_text().splitlines():
                parts = line.split(",")
                if len(parts) >= 3 and parts[2].startswith("syscalls:"):
                    with contextlib.suppress(ValueError):
                        counts.append((parts[2], int(parts[0])))
        if len(counts) < 5:
            return None
        return {"log_fdatasync": counts[0][1], "all_fdatasync": counts[1][1],
                "pwritev": counts[2][1] + counts[3][1], "pwrite": counts[4][1]}

    def run_one(self, workload: str, rw: str, bs: str, qd: int, target: str) -> Result:
        out = self.base / f"fio-{workload}-{target}.json"
        cmd = self.fio_cmd(workload, rw, bs, qd, target, out)
        res = Result(workload, target, qd if target != "file" else 1, sh(cmd))
        print(f"  {workload:6} {target:5} ... ", end="", flush=True, file=sys.stderr)
        os.sync()  # earlier runs' dirty pages should not be written back on this run's time
        perf = log0 = cpu0 = None
        if target.startswith("mars"):
            log0 = self.log_bytes(target)
            if target != "mars4p":  # perf counts the first marsd's log fd
                perf = self.start_perf(self.base / f"perf-{workload}.txt")
            cpu0 = self.marsd_cpu(target)
        disk0 = disk_sectors_written(self.base)
        t0 = time.monotonic()
        fio = self.procs.start("fio", cmd, log=self.base / f"fio-{workload}-{target}.log", new_session=False)
        try:
            fio.wait(self.args.runtime + 120)
        except subprocess.TimeoutExpired:
            Procs.stop(fio, signal.SIGKILL)
            res.error = "fio hung"
        wall = time.monotonic() - t0
        disk1 = disk_sectors_written(self.base)
        if disk0 is not None and disk1 is not None:
            res.disk_mib_s = (disk1 - disk0) * 512 / 2**20 / wall
        cpu1 = self.marsd_cpu(target) if cpu0 is not None else None
        if perf is not None:
            Procs.stop(perf, signal.SIGINT, 10)
        if res.error is None and fio.returncode != 0:
            log = (self.base / f"fio-{workload}-{target}.log").read_text(errors="replace")
            res.error = f"fio exit {fio.returncode}: {log.strip()[-300:]}"
        if res.error is None:
            try:
                f = parse_fio(out)
            except (OSError, ValueError, KeyError, RuntimeError) as e:
                res.error = f"cannot parse fio output: {e}"
            else:
                res.iops, res.mib_s = f["iops"], f["mib_s"]
                res.clat_p99_ms, res.clat_mean_ms = f["clat_p99_ms"], f["clat_mean_ms"]
                res.sync_p99_ms = f.get("sync_p99_ms")
        if target.startswith("mars") and log0 is not None:
            grown = self.log_bytes(target) - log0
            rec = RECORD_OVERHEAD + parse_size(bs)
            s = {"log_bytes": grown, "log_records": grown // rec, "wall_s": round(wall, 2)}
            if cpu1 is not None:
                s["cpu_s"] = round(cpu1 - cpu0, 2)
                if s["log_records"]:
                    # Over the whole fio run (ramp included) on both sides of the division.
                    s["cpu_us_per_write"] = round((cpu1 - cpu0) * 1e6 / s["log_records"], 1)
                    s["cpu_us_per_mib"] = round((cpu1 - cpu0) * 1e6 / (s["log_records"] * parse_size(bs) / 2**20), 1)
            pc = self.read_perf(self.base / f"perf-{workload}.txt") if perf is not None else None
            if pc:
                s.update(pc)
                if pc["log_fdatasync"]:
                    s["requests_per_commit"] = round(s["log_records"] / pc["log_fdatasync"], 2)
            res.server = s
        if self.marsd is not None and self.marsd.poll() is not None:
            raise RuntimeError(f"marsd died during {workload}:\n{self.marsd_log()}")
        for d, proc in self.solo:
            if proc.poll() is not None:
                raise RuntimeError(f"marsd {d.name} died during {workload}:\n{self.marsd_log(f'marsd-{d.name}.log')}")
        print("error" if res.error else f"{res.iops:,.0f} IOPS, {res.mib_s:,.1f} MiB/s", file=sys.stderr)
        return res

    def run(self) -> None:
        runs: dict[tuple[str, str], list[Result]] = {}
        for i in range(self.args.repeat):
            if self.args.repeat > 1:
                print(f"round {i + 1}/{self.args.repeat}", file=sys.stderr)
            for workload, rw, bs, qd in self.workloads():
                multi = ("mars4", *(("mars4p",) if self.solo else ())) \
                    if workload == "rand4k" and self.more_resources() else ()
                for target in ("mars", *multi, "qemu", "file"):
                    runs.setdefault((workload, target), []).append(self.run_one(workload, rw, bs, qd, target))
        for rs in runs.values():
            self.results.append(rs[0] if len(rs) == 1 else median_result(rs))

    # report --------------------------------------------------------------------------------

    def get(self, workload: str, target: str) -> Result:
        return next(r for r in self.results if r.workload == workload and r.target == target)

    def ratios(self) -> dict:
        def ratio(w, metric, other):
            a, b = self.get(w, "mars"), self.get(w, other)
            if a.error or b.error or not getattr(b, metric):
                return None
            return getattr(a, metric) / getattr(b, metric)
        out = {}
        for w in ("rand4k", "seq1m"):
            for other in ("qemu", "file"):
                out[f"{w}_iops_vs_{other}"] = ratio(w, "iops", other)
        g1 = out["rand4k_iops_vs_qemu"]
        g2 = out["seq1m_iops_vs_file"]  # same block size, so IOPS ratio == MiB/s ratio
        cpu = self.get("rand4k", "mars").server.get("cpu_us_per_write")
        # The disk's bandwidth in this run: what reached it while qemu-nbd or the plain file wrote
        # 1 MiB blocks (each writes a byte once); MARS writes twice, so half of it is its ceiling.
        disks = [x.disk_mib_s for x in (self.get("seq1m", "qemu"), self.get("seq1m", "file"))
                 if not x.error and x.disk_mib_s]
        seq = self.get("seq1m", "mars")
        out["disk_mib_s"] = max(disks) if disks else None
        g3 = seq.mib_s / (out["disk_mib_s"] / 2) if disks and not seq.error else None
        multi = next((x for x in self.results if x.workload == "rand4k" and x.target == "mars4"), None)
        g4 = None
        if multi is not None:
            out["rand4k_iops_vs_mars4"] = ratio("rand4k", "iops", "mars4")
            g4 = 1 / out["rand4k_iops_vs_mars4"] if out["rand4k_iops_vs_mars4"] else None
        out["rand4k_iops_multi_vs_one"] = g4
        solo = next((x for x in self.results if x.workload == "rand4k" and x.target == "mars4p"), None)
        if solo is not None and not solo.error and ratio("rand4k", "iops", "mars4p"):
            out["rand4k_iops_vs_mars4p"] = ratio("rand4k", "iops", "mars4p")
            out["rand4k_iops_multi_procs_vs_one"] = 1 / out["rand4k_iops_vs_mars4p"]
        n = self.args.resources

        def goal(text, value, target, at_most=False):
            ok = value is not None and (value <= target if at_most else value >= target)
            return {"goal": text, "ratio": value, "target": target, "pass": ok}
        out["goals"] = [
            goal(f"4 KiB QD32 write IOPS >= {GOAL_RAND_VS_QEMU:g}x qemu-nbd writethrough", g1, GOAL_RAND_VS_QEMU),
            goal(f"4 KiB QD32: marsd CPU <= {GOAL_CPU_US_PER_WRITE:g} us per acknowledged write (us, not a ratio)",
                 cpu, GOAL_CPU_US_PER_WRITE, at_most=True),
            goal(f"1 MiB sequential MiB/s >= {GOAL_SEQ_VS_HALF_DISK:g}x half the disk's bandwidth in this run", g3,
                 GOAL_SEQ_VS_HALF_DISK),
            goal(f"1 MiB sequential MiB/s >= {GOAL_SEQ_VS_FILE:g}x plain fdatasync'd file", g2, GOAL_SEQ_VS_FILE),
        ]
        if multi is not None:
            out["goals"].append(goal(f"4 KiB QD32 on {n} resources at once: aggregate IOPS >= {GOAL_MULTI_VS_ONE:g}x "
                                     "one resource's", g4, GOAL_MULTI_VS_ONE))
        return out

    def machine(self) -> dict:
        return {**machine_facts(self.base),
                "fio": run_text(["fio", "--version"]),
                "qemu_nbd": run_text(["qemu-nbd", "--version"]).splitlines()[0] if shutil.which("qemu-nbd") else "?",
                "dir": str(self.base), "size": self.size, "image": self.args.image, "runtime_s": self.args.runtime}

    def report(self) -> dict:
        m = self.machine()
        r = self.ratios()
        rep = self.args.repeat
        p = print
        p()
        p(f"MARS write benchmark  {m['date']}")
        p(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, kernel {m['kernel']}, python {m['python']}")
        p(f"tools:   {m['fio']}, {m['qemu_nbd']}")
        p(f"fs:      {m['df_T']}")
        p(f"images:  {fmt_size(self.size)} {self.args.image} each, runtime {self.args.runtime} s + 1 s ramp per run"
          + (f", {rep} interleaved rounds, medians shown [min..max]" if rep > 1
             else " (one round; on a noisy machine use --repeat 3)"))
        p()
        names = {"mars": "MARS export (nbd)", "mars4": f"MARS {self.args.resources} resources",
                 "mars4p": f"MARS {self.args.resources} res, {self.args.resources} marsd", "qemu": "qemu-nbd writethrough",
                 "file": "file psync+fdatasync"}
        wl = {"rand4k": "4 KiB randwrite", "seq1m": "1 MiB seq write"}
        hdr = (f"{'workload':16} {'target':22} {'QD':>3} {'IOPS':>10} {'MiB/s':>9} {'p99 clat ms':>12} "
               f"{'mean ms':>8} {'disk MiB/s':>10}  {'ours/this':>9}")
        p(hdr)
        p("-" * len(hdr))
        for res in self.results:
            if res.error:
                p(f"{wl[res.workload]:16} {names[res.target]:22} {res.qd:>3}  ERROR: {res.error}")
                continue
            ratio = "" if res.target == "mars" else r.get(f"{res.workload}_iops_vs_{res.target}")
            ratio = f"{ratio:8.2f}x" if isinstance(ratio, float) else ("" if ratio == "" else "n/a")
            extra = f"   (fdatasync p99 {res.sync_p99_ms:.2f} ms)" if res.sync_p99_ms is not None else ""
            if res.runs:
                mib = [x["mib_s"] for x in res.runs if x["error"] is None]
                extra += f"   [MiB/s {min(mib):,.1f}..{max(mib):,.1f}]" if mib else ""
            disk = f"{res.disk_mib_s:,.1f}" if res.disk_mib_s is not None else "?"
            p(f"{wl[res.workload]:16} {names[res.target]:22} {res.qd:>3} {res.iops:>10,.0f} {res.mib_s:>9,.1f} "
              f"{res.clat_p99_ms:>12.2f} {res.clat_mean_ms:>8.2f} {disk:>10}  {ratio:>9}{extra}")
        p()
        p("ours/this = MARS IOPS / that row's IOPS (same block size, so also the MiB/s ratio); the")
        p(f"{self.args.resources}-resource rows are the sum of their {self.args.resources} fio jobs (QD 32 each) at once;")
        p(f"'{self.args.resources} marsd': each resource in a marsd of its own (what a process per resource could give).")
        p("disk MiB/s = bytes that reached the disk during the run (all writers, /proc/diskstats, incl. ramp);")
        p("MARS writes every byte twice (log + data device), so its ceiling is half the disk's bandwidth.")
        p("NBD rows: clat = request sent .. reply received, so it includes the server's fdatasync.")
        p("file rows: fio's psync engine is synchronous, so QD is 1; clat is the write(2) alone, the")
        p("fdatasync(2) after every write is timed separately by fio (shown in brackets).")
        p()
        p("goals:")
        for g in r["goals"]:
            ratio = "n/a" if g["ratio"] is None else (f"{g['ratio']:.1f} us" if " us " in g["goal"] else f"{g['ratio']:.3f}x")
            p(f"  [{'PASS' if g['pass'] else 'MISS'}] {g['goal']}: measured {ratio}")
        if r.get("rand4k_iops_multi_procs_vs_one"):
            p(f"  (not a goal) the same {self.args.resources} resources, each in its own marsd: aggregate IOPS "
              f"{r['rand4k_iops_multi_procs_vs_one']:.3f}x one resource's")
        server = [res for res in self.results if res.target.startswith("mars") and res.server]
        if server:
            p()
            p("MARS server side, whole fio run incl. ramp" + (" (medians)" if rep > 1 else "") + ":")
            for res in server:
                s = res.server
                line = f"  {wl[res.workload]:16} log +{s['log_bytes'] / 2**20:,.1f} MiB = {s['log_records']:,.0f} records"
                if "cpu_s" in s and s.get("wall_s"):
                    line += f"; marsd CPU {s['cpu_s']:.1f} s in {s['wall_s']:.1f} s ({100 * s['cpu_s'] / s['wall_s']:.0f}% of a core)"
                p(f"{line}  [{res.target}]")
                if "cpu_us_per_write" in s:
                    p(f"  {'':16} marsd CPU {s['cpu_us_per_write']:,.1f} us per acknowledged write, "
                      f"{s['cpu_us_per_mib']:,.0f} us per MiB written")
                if "log_fdatasync" in s:
                    p(f"  {'':16} {s['log_fdatasync']:,.0f} log fdatasyncs = group commits -> "
                      f"{s.get('requests_per_commit', 0):.1f} writes/commit; "
                      f"{s['all_fdatasync'] - s['log_fdatasync']:,.0f} data-device fdatasyncs (checkpoints); "
                      f"{s['pwritev']:,.0f} pwritev, {s['pwrite']:,.0f} pwrite")
        for n in self.notes:
            p(f"note: {n}")
        b = self.base
        p()
        p(f"commands (paths are this run's temporary directory {b}; --keep keeps it):")
        p(f"  {sh([BIN / 'marsadm', '--mars-dir', b / HOST, '--host', HOST, '--ip', '127.0.0.2', 'create-cluster'])}")
        p(f"  {sh([BIN / 'marsd', '--mars-dir', b / HOST, '--host', HOST])} &")
        p(f"  {sh([BIN / 'marsadm', '--mars-dir', b / HOST, '--host', HOST, 'create-resource', RES, b / 'r.img', str(self.size)])}")
        p(f"  truncate -s {self.size} {b / 'q.img'} {b / 'p.img'}"
          + ("" if self.args.image == "sparse" else
             "  # then each image written whole: dd if=/dev/zero of=IMG bs=4M oflag=direct conv=notrunc"))
        p(f"  qemu-nbd --cache=writethrough -f raw --persistent -k {b / 'q.sock'} {b / 'q.img'} &")
        for res in self.results:
            p(f"  {res.cmd}")
        return {"machine": m, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
                "results": [asdict(x) for x in self.results], "ratios": r, "notes": self.notes}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="where to make the temporary directory (the file system under test)")
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"), help="size of each image (default 1G)")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio run, after 1 s ramp (default 10)")
    ap.add_argument("--seq-qd", type=int, default=8, help="queue depth of the 1 MiB sequential NBD runs (default 8)")
    ap.add_argument("--resources", type=int, default=4,
                    help="resources written at once in the multi-resource 4 KiB run (default 4; 1 skips it)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole matrix N times (interleaved) and report medians (default 1)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--no-perf", action="store_true", help="do not count marsd's syscalls with perf stat")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (images, logs, fio JSON)")
    ap.add_argument("--image", choices=("allocated", "sparse"), default="allocated",
                    help="images written whole with O_DIRECT before the runs, like a block device "
                         "(default), or sparse files whose first writes allocate")
    ap.add_argument("--separate", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the --resources 4 KiB workload with each resource in a marsd of its own "
                         "(default on)")
    args = ap.parse_args()

    bench = Bench(args)
    data: dict = {}

    def work() -> None:
        print("setting up ...", file=sys.stderr)
        bench.setup()
        bench.run()
        data.update(bench.report())
    if run_guarded(work, bench.teardown):
        return 130
    if args.json:
        write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
