#!/usr/bin/env python3
"""`make demo`: one MARS node serving a 1 GiB file-backed resource, written and read by real NBD clients.

What it shows, step by step: a cluster made with marsadm while marsd is down; marsd serving the
resource as an NBD export; nbdcopy writing 256 MiB of random data through it while the
transaction log grows; a log rotation with its chained version entry; marsd killed with SIGKILL
and restarted; the data read back and compared, byte for byte.

(Three nodes replicating arrive with the replication issue; this demo grows with it.)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
MiB = 1 << 20


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess[str]:
    print("    $ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, text=True, capture_output=True, **kw)
    for line in (r.stdout + r.stderr).strip().splitlines():
        print("      " + line, flush=True)
    if r.returncode != 0:
        raise SystemExit(f"demo: {cmd[0]} failed with exit code {r.returncode}")
    return r


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)  # poll


class Marsd:
    def __init__(self, mars_dir: Path, host: str, log: Path) -> None:
        self.mars_dir, self.host, self.log = mars_dir, host, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.mars_dir / "nbd.sock").unlink(missing_ok=True)
        print(f"    $ marsd --mars-dir {self.mars_dir} --host {self.host} &   (log: {self.log})", flush=True)
        self.proc = subprocess.Popen([str(BIN / "marsd"), "--mars-dir", str(self.mars_dir), "--host", self.host],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: (self.mars_dir / "nbd.sock").exists(), 30, "marsd to listen")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)


def watch_log(res_dir: Path, stop: threading.Event) -> None:
    """Print the log's growth while the copy runs (what mars-status will show later)."""
    last = -1
    while not stop.wait(0.5):
        logs = sorted(res_dir.glob("log-*"))
        size = sum(p.stat().st_size for p in logs)
        try:
            replay = os.readlink(res_dir / "replay-a")
        except OSError:
            replay = "?"
        if size != last:
            print(f"      transaction log: {size / MiB:7.1f} MiB in {len(logs)} file(s); replay-a -> {replay}", flush=True)
            last = size


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", help="where to put the demo (default: a new directory under /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the directory and leave nothing running")
    p.add_argument("--mib", type=int, default=256, help="MiB of random data to copy (default 256)")
    args = p.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mars-demo-", dir="/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    mars_dir = base / "a"
    res_dir = mars_dir / "resource-demo"
    adm = [str(BIN / "marsadm"), "--mars-dir", str(mars_dir), "--host", "a"]
    marsd = Marsd(mars_dir, "a", base / "marsd-a.log")
    uri = f"nbd+unix:///demo?socket={mars_dir}/nbd.sock"
    try:
        say("1. create the cluster (marsd is not running yet; marsadm only writes the tree)")
        sh(*adm, "--ip", "127.0.0.2", "create-cluster")
        say("2. start marsd")
        marsd.start()
        say("3. create a 1 GiB resource on a sparse image file; host a becomes its primary")
        sh(*adm, "create-resource", "demo", str(base / "demo.img"), "1G")
        sh("nbdinfo", uri)

        say(f"4. write {args.mib} MiB of random data through NBD with nbdcopy while the log grows")
        src = base / "source.img"
        with open(src, "wb") as f:
            for _ in range(args.mib // 4):
                f.write(os.urandom(4 * MiB))
        stop = threading.Event()
        t = threading.Thread(target=watch_log, args=(res_dir, stop), daemon=True)
        t.start()
        t0 = time.monotonic()
        sh("nbdcopy", "--progress", str(src), uri)
        dt = time.monotonic() - t0
        stop.set()
        t.join()
        print(f"      {args.mib} MiB in {dt:.2f} s = {args.mib / dt:.0f} MiB/s, every write durable in the log "
              f"before its acknowledgement", flush=True)

        say("5. rotate the log: the finished file gets a version entry chained to its predecessor")
        sh(*adm, "log-rotate", "demo")
        sh("ls", "-l", "--time-style=+%H:%M:%S", str(res_dir))

        say("6. kill marsd with SIGKILL (a crash) and start it again: recovery replays the log")
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x4d 900M 1M", uri)
        marsd.kill()
        marsd.start()
        wait_for(lambda: os.path.islink(res_dir / "actual-a" / "is-attached")
                 and os.readlink(res_dir / "actual-a" / "is-attached") == "1", 30, "the resource to be served again")

        say("7. read everything back and compare")
        out = base / "readback.img"
        sh("nbdcopy", uri, str(out))
        sh("qemu-io", "-f", "raw", "-c", "read -P 0x4d 900M 1M", uri)
        a = sha256(src)
        with open(out, "rb") as f:
            h = hashlib.sha256(f.read(args.mib * MiB)).hexdigest()
        print(f"      sha256 written : {a}\n      sha256 read    : {h}", flush=True)
        if a != h:
            print("demo: MISMATCH: the data read back differs from the data written", file=sys.stderr)
            return 1
        say("identical: every acknowledged write survived the crash")

        say("8. log files that every member has replayed can go")
        sh(*adm, "log-delete-all", "demo")
        sh(*adm, "down", "demo")
        return 0
    finally:
        marsd.stop()
        if args.keep:
            print(f"demo: kept {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
