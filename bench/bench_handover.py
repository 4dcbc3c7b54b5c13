#!/usr/bin/env python3
"""Handover benchmark: how long a resource is without a writable primary when the role moves.

Run:  python bench/bench_handover.py [--dir DIR] [--size 1G] [--repeat 5] [--backlog-mib 256] [--json FILE]

Two marsd with production settings (``--interval`` 1 s, the default) run in one temporary
directory under --dir (default /var/tmp): ``a`` on 127.0.0.2, the first primary of resource ``r``
(a sparse --size image), and ``b`` on 127.0.0.3, joined while ``r`` is empty, as
bench_replication.py starts them; then one 4 KiB write on ``a`` (--no-first-write leaves it out, to
check a handover while a's first log file is still empty). Every timed phase ends with the *first
write acknowledged* on the new primary's export: a libnbd client that starts connecting when the
phase starts, retries every 10 ms until the export answers, then writes 4 KiB with FUA.

1. Planned handover with nothing to replay: ``marsadm primary r`` on the secondary, --repeat
   times back and forth; the time to the first acknowledged write, split into marsadm's own
   duration and the rest. Goal: < 2 s (median).
2. Planned handover with a backlog: replay paused on the secondary, --backlog-mib of 1 MiB
   sequential writes through the primary's export (fio, QD 8), fetched in full by the secondary.
   First round: ``resume-replay`` alone, until replay-<new> is at the log's end (the plain replay
   time). Second round, a fresh backlog: ``resume-replay`` and at once ``marsadm primary r``, until
   the first acknowledged write. Goal: handover <= replay time + 2 s.
3. Forced failover: SIGKILL of the primary; the time until ``marsadm view r --json`` on the
   survivor shows it not alive, then ``marsadm primary --force r`` until the first acknowledged
   write.

Every acknowledged write is read back on the next primary (a handover that loses one fails the
run), the backlogs are checked with fio's crc32c verify on the new primary, and the marsd logs are
searched for tracebacks. All processes started here are stopped, and the directory removed, on
success, error, Ctrl-C or SIGTERM (--keep keeps the directory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_replication as repl  # noqa: E402  (its two-node cluster: Node, start_cluster, teardown)
from bench_write import machine_facts, parse_size, run_guarded, run_text, sh, wait_until, write_json  # noqa: E402

from mars.engine.log.values import LogPos, ReplayLink  # noqa: E402
from mars.engine.model import read_snapshot  # noqa: E402

try:
    import nbd  # python3-libnbd; the venv sees Debian's dist-packages (--system-site-packages)
except ImportError:
    nbd = None

BIN = repl.BIN
MIB = repl.MIB
RES = "r"
BLOCK = 4096
TAG = b"MARSHAND"
RETRY_S = 0.01  # the probe client's pause between connection attempts
GOAL_HANDOVER_S = 2.0  # planned handover, nothing to replay: first acknowledged write within 2 s
GOAL_BACKLOG_EXTRA_S = 2.0  # with a backlog: at most the plain replay time + 2 s
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
SAID_SECS = re.compile(r" (?:in|after) (\d+(?:\.\d+)?) s\b")  # "handed over from a in 0.3 s", "by force after 0.2 s"


class EngineFailure(RuntimeError):
    """The engine misbehaved (hung, lost or changed data, logged a traceback): the run fails."""


class FirstAck(threading.Thread):
    """A client that connects to an export as soon as it is served and writes one 4 KiB block.

    It retries the connection every RETRY_S until it succeeds or ``timeout`` passes, then writes
    ``data`` at ``offset`` with FUA (or write + flush where the server offers no FUA). The times
    are monotonic seconds; ``t_acked`` is when the write's reply arrived.
    """

    def __init__(self, uri: str, offset: int, data: bytes, timeout: float) -> None:
        super().__init__(daemon=True)
        self.uri, self.offset, self.data, self.timeout = uri, offset, data, timeout
        self.attempts = 0
        self.t_connected: float | None = None
        self.t_acked: float | None = None
        self.error: str | None = None
        self.last_refusal = ""

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            self.attempts += 1
            h = nbd.NBD()
            try:
                h.connect_uri(self.uri)
                break
            except nbd.Error as e:
                self.last_refusal = str(e)
            if time.monotonic() > deadline:
                self.error = f"no connection within {self.timeout:g} s (last refusal: {self.last_refusal})"
                return
            time.sleep(RETRY_S)
        self.t_connected = time.monotonic()
        try:
            if h.can_fua():
                h.pwrite(self.data, self.offset, nbd.CMD_FLAG_FUA)
            else:
                h.pwrite(self.data, self.offset)
                h.flush()
            self.t_acked = time.monotonic()
        except nbd.Error as e:
            self.error = f"the write was not acknowledged: {e}"
        finally:
            with contextlib.suppress(nbd.Error):
                h.shutdown()


class Bench(repl.Bench):
    """bench_replication's two-node cluster, with a single resource ``r`` that changes hands."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args)
        self.probes: list[tuple[int, bytes]] = []  # (offset, data) of every acknowledged probe write
        self.primary: repl.Node | None = None

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        if nbd is None:
            sys.exit(f"{sys.executable} cannot import nbd (python3-libnbd); apt-get install -y python3-libnbd and "
                     "run this with /usr/bin/python3 or a venv made with --system-site-packages")
        if not shutil.which("fio"):
            sys.exit("fio not found; install it: apt-get install -y fio")
        for tool in ("marsd", "marsadm"):
            if not (BIN / tool).exists():
                sys.exit(f"{BIN / tool} not found; install the project (pip install -e .) into this Python")
        if 2 * a.backlog + MIB > a.size:
            sys.exit(f"--size {a.size} is too small for two backlogs of {a.backlog} B and the probe blocks")
        self.loadavg0 = run_text(["cat", "/proc/loadavg"])
        self.base = Path(tempfile.mkdtemp(prefix="mars-handover-", dir=a.dir))
        if len(str(self.base / "a" / "nbd.sock")) >= 100:
            raise RuntimeError(f"{self.base} is too long for a unix socket path; give a shorter --dir")
        self.port = a.port or repl.pick_port()
        (self.base / "img").mkdir()
        need = 6 * a.backlog + 64 * MIB  # two backlogs: the primary's log, the copy, the new primary's device
        free = shutil.disk_usage(self.base).free
        if free < need:
            raise RuntimeError(f"{self.base} has {free / MIB:,.0f} MiB free; this run needs about "
                               f"{need / MIB:,.0f} MiB")

    def start(self) -> None:
        self.start_cluster()
        a, b = self.a, self.b
        size = self.args.size
        a.marsadm("create-resource", RES, str(self.image(a)), str(size))
        b.wait_value(f"resource-{RES}/size", str(size), 30)
        b.marsadm("join-resource", RES, str(self.image(b)), "--create")
        b.wait_value(f"resource-{RES}/syncstatus-b", str(size), 120)
        self.primary = a
        # A resource in use: one write on a before the first handover. (With a's first log file
        # still empty, the handover can race b's replay of that file's end: --no-first-write.)
        if not self.args.no_first_write:
            self.first_write(a)
        self.settle(a, b)

    def first_write(self, a: repl.Node) -> None:
        off, data = self.probe_write()
        self.commands.append(self.probe_cmd(a, off, "") + "  # one write before the first handover")
        first = FirstAck(a.uri(RES), off, data, 30)
        first.run()
        if first.t_acked is None:
            raise RuntimeError(f"the first write on a failed: {first.error}\n{self.logs()}")
        self.probes.append((off, data))

    def image(self, node: repl.Node) -> Path:
        return self.base / "img" / f"{node.host}.img"

    def other(self, node: repl.Node) -> repl.Node:
        return self.b if node is self.a else self.a

    # -- the tree: where logs end, what is fetched and replayed --------------------------------

    @staticmethod
    def log_end(node: repl.Node) -> LogPos:
        """Where ``node``'s own log ends now (its newest log file and that file's length)."""
        d = node.mars_dir / f"resource-{RES}"
        newest = max(d.glob(f"log-*-{node.host}"))
        return LogPos.parse(f"{newest.name},{newest.stat().st_size}")

    @staticmethod
    def replayed(node: repl.Node) -> LogPos | None:
        link = ReplayLink.parse(node.value(f"resource-{RES}/replay-{node.host}"))
        return link.logpos if link else None

    def settle(self, old: repl.Node, new: repl.Node) -> None:
        """Until ``old`` serves, ``new`` replayed all of ``old``'s log, and neither reports a client:
        the state a planned handover starts from (none of this is timed)."""
        last_look = [time.monotonic()]

        def ready():
            for n in (old, new):
                n.check_alive()
            if time.monotonic() - last_look[0] > 1:
                last_look[0] = time.monotonic()
                self.no_split_brain(new)
            end = self.log_end(old)
            return (old.value(f"resource-{RES}/actual-{old.host}/is-primary") == "1"
                    and new.value(f"resource-{RES}/actual-{old.host}/is-primary") == "1"
                    and self.replayed(new) == end
                    and new.value(f"resource-{RES}/actual-{old.host}/open-count") in (None, "0")
                    and old.value(f"resource-{RES}/actual-{new.host}/open-count") in (None, "0"))
        try:
            wait_until(ready, self.args.timeout, f"{new.host} to catch up with {old.host}", 0.05)
        except AssertionError as e:
            raise EngineFailure(f"{e}: replay-{new.host} = {self.replayed(new)}, {old.host}'s log ends at "
                                f"{self.log_end(old)}\n{self.logs()}") from None

    def no_split_brain(self, node: repl.Node) -> None:
        """A planned handover must never split the history: fail at once when ``node`` reports it."""
        try:
            snap, _ = read_snapshot(node.mars_dir, node.host, timeout=1.0)
        except Exception:  # the snapshot is a check here, not a precondition: look again later
            return
        rs = snap.resources.get(RES)
        if rs is None or not rs.split_brain:
            return
        warns = {n.host: n.value(f"resource-{RES}/actual-{n.host}/msg-warn-fetch") for n in (self.a, self.b)}
        files = {n.host: sorted(p.name for p in (n.mars_dir / f"resource-{RES}").glob("log-*"))
                 for n in (self.a, self.b)}
        raise EngineFailure(f"{node.host} reports a split brain of {RES} after a planned handover: {rs.split_brain}; "
                            f"fetch warnings: {warns}; log files: {files}\n{self.logs()}")

    def fetched(self, old: repl.Node, new: repl.Node) -> LogPos:
        """Until ``new`` has fetched all of ``old``'s log (its copy's length and its fetch-pos)."""
        end = self.log_end(old)
        copy = new.mars_dir / f"resource-{RES}" / end.name

        def done():
            new.check_alive()
            return (copy.exists() and copy.stat().st_size >= end.offset
                    and LogPos.parse(new.value(f"resource-{RES}/actual-{new.host}/fetch-pos")) == end)
        try:
            wait_until(done, self.args.timeout, f"{new.host} to fetch {old.host}'s log to {end}", 0.02)
        except AssertionError as e:
            raise EngineFailure(f"{e}\n{self.logs()}") from None
        return end

    # -- checks --------------------------------------------------------------------------------

    def logs(self) -> str:
        return "\n".join(n.log() for n in (self.a, self.b) if n is not None)

    def check_logs(self) -> None:
        """A traceback in a marsd log is an engine failure, whatever the figures say."""
        for n in (self.a, self.b):
            with contextlib.suppress(OSError):
                text = n.log_path.read_text(errors="replace")
                if "Traceback" in text:
                    i = text.index("Traceback")
                    raise EngineFailure(f"marsd {n.host} logged a traceback:\n{text[max(0, i - 1500):i + 3000]}")

    def probe_write(self) -> tuple[int, bytes]:
        """The next probe block: its own 4 KiB in the device's last MiB, with a pattern naming it."""
        k = len(self.probes)
        if k >= MIB // BLOCK:
            raise RuntimeError("more probe writes than the last MiB of the device holds")
        data = struct.pack("<8sIQ", TAG, k, time.time_ns()).ljust(BLOCK, bytes([k % 251 + 1]))
        return self.args.size - MIB + k * BLOCK, data

    def check_probes(self, node: repl.Node) -> None:
        """Every probe write acknowledged so far reads back on ``node``'s export."""
        h = nbd.NBD()
        h.connect_uri(node.uri(RES))
        try:
            for k, (off, data) in enumerate(self.probes):
                got = h.pread(BLOCK, off)
                if got != data:
                    raise EngineFailure(f"wrong data on {node.host}: the acknowledged probe write {k} at offset {off} "
                                        f"reads back as {got[:24]!r}..., want {data[:24]!r}...\n{self.logs()}")
        finally:
            with contextlib.suppress(nbd.Error):
                h.shutdown()

    def timed_switch(self, new: repl.Node, *cmds: tuple[str, ...]) -> dict:
        """Run the marsadm commands on ``new`` one after the other while a FirstAck client waits
        for ``new``'s export; all times in seconds from the start of the first command."""
        old = self.other(new)
        off, data = self.probe_write()
        self.commands.append(f"({self.probe_cmd(new, off, 'until ')}; do sleep {RETRY_S}; done) &  "
                             "# timed: the probe, started with the next command, until its write is acknowledged")
        probe = FirstAck(new.uri(RES), off, data, self.args.timeout)
        wall0 = time.time()
        t0 = time.monotonic()
        probe.start()
        steps = []
        for cmd in cmds:
            s0 = time.monotonic()
            r = new.marsadm(*cmd, check=False, timeout=self.args.timeout)
            said = (r.stderr.strip().splitlines() or [""])[-1]
            m = SAID_SECS.search(said)
            steps.append({"name": cmd[0], "cmd": sh(new.marsadm_cmd(*cmd)), "secs": time.monotonic() - s0,
                          "code": r.returncode, "said": said, "said_s": float(m.group(1)) if m else None})
            if r.returncode:
                probe.join(1)
                raise EngineFailure(f"{steps[-1]['cmd']} failed ({r.returncode}):\n{r.stderr}{r.stdout}\n{self.logs()}")
        t_cmds = time.monotonic() - t0
        probe.join(self.args.timeout + 5)
        if probe.is_alive() or probe.error or probe.t_acked is None:
            raise EngineFailure(f"no write was acknowledged on {new.host} after {' ; '.join(s['cmd'] for s in steps)}: "
                                f"{probe.error or 'the client hung'}\n{self.logs()}")
        self.probes.append((off, data))
        self.primary = new
        out = {"to": new.host, "from": old.host, "steps": steps, "cmds_s": t_cmds,
               "connected_s": probe.t_connected - t0, "ack_s": probe.t_acked - t0, "attempts": probe.attempts,
               "rest_s": probe.t_acked - t0 - t_cmds}
        # Where the time went, from the two marsd logs (wall clock, ms): the old primary's
        # "no longer primary" line and the new one's "serving NBD" line after the start.
        out["old_stopped_s"] = self.log_time(old, r"resource r: no longer primary", wall0)
        out["new_serving_s"] = self.log_time(new, r"resource r: attached .*serving NBD", wall0)
        if "--force" not in cmds[-1] and None not in (out["old_stopped_s"], out["new_serving_s"]) \
                and out["new_serving_s"] < out["old_stopped_s"]:
            raise EngineFailure(f"two primaries: {new.host} served {RES} at +{out['new_serving_s']:.3f} s, before "
                                f"{old.host} stopped at +{out['old_stopped_s']:.3f} s (marsd log lines)\n{self.logs()}")
        return out

    @staticmethod
    def probe_cmd(node: repl.Node, offset: int, prefix: str) -> str:
        """The probe write by hand: qemu-io's write with FUA (-f), 4 KiB at ``offset``."""
        return f"{prefix}qemu-io -f raw -c {sh([f'write -f -P 0x5a {offset} 4k'])} {sh([node.uri(RES)])}"

    @staticmethod
    def log_time(node: repl.Node, pattern: str, since: float) -> float | None:
        found = None
        with contextlib.suppress(OSError):
            for line in node.log_path.read_text(errors="replace").splitlines():
                m = LOG_TIME.match(line)
                if m and re.search(pattern, line):
                    t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    if t >= since - 0.001 and found is None:
                        found = t - since
        return found

    def fio(self, name: str, uri_or_file: str, offset: int, verify_only: bool) -> dict:
        """1 MiB sequential writes of the backlog (QD 8, crc32c verify headers), or their check."""
        out = self.base / f"fio-{name}.json"
        target = (["--ioengine=nbd", f"--uri={uri_or_file}", "--iodepth=8"] if uri_or_file.startswith("nbd")
                  else ["--ioengine=psync", f"--filename={uri_or_file}"])
        cmd = ["fio", f"--name={name}", *target, "--rw=write", "--bs=1m", f"--size={self.args.backlog}",
               f"--offset={offset}", "--verify=crc32c", "--verify_only" if verify_only else "--do_verify=0",
               "--verify_state_save=0",  # no local-*-verify.state file in the working directory
               "--output-format=json", f"--output={out}"]
        self.commands.append(sh(cmd))
        t0 = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.args.timeout, stdin=subprocess.DEVNULL)
        wall = time.monotonic() - t0
        if r.returncode:
            text = (r.stderr + r.stdout)[-2000:]
            if verify_only:
                raise EngineFailure(f"wrong data: {sh(cmd)} failed ({r.returncode}):\n{text}\n{self.logs()}")
            raise RuntimeError(f"{sh(cmd)} failed ({r.returncode}):\n{text}")
        return {"secs": wall, "cmd": sh(cmd)}

    # -- 1. planned handover, nothing to replay -----------------------------------------------

    def handovers(self) -> None:
        rounds = []
        self.status(f"1. planned handover with nothing to replay, {self.args.repeat} times back and forth ...")
        for i in range(self.args.repeat):
            old = self.primary
            new = self.other(old)
            self.settle(old, new)
            x = self.timed_switch(new, ("primary", RES))
            self.check_probes(new)
            self.check_logs()
            rounds.append(x)
            self.status(f"  {i + 1}: {old.host} -> {new.host}: first write acknowledged after {x['ack_s']:.2f} s "
                        f"(marsadm primary {x['cmds_s']:.2f} s, {x['attempts']} connection attempts)")
        self.res["handover"] = rounds

    # -- 2. planned handover with a backlog ---------------------------------------------------

    def backlog(self) -> None:
        mib = self.args.backlog // MIB
        self.status(f"2. planned handover with a backlog of {mib} MiB ...")
        out = {}
        for rnd, offset in (("replay", 0), ("handover", self.args.backlog)):
            old = self.primary
            new = self.other(old)
            self.settle(old, new)
            new.marsadm("pause-replay", RES)
            new.wait_value(f"resource-{RES}/actual-{new.host}/is-replaying", "0", 30)
            start = self.replayed(new)
            self.status(f"  {rnd}: writing {mib} MiB through {old.host}'s export, {new.host}'s replay paused ...")
            load = self.fio(f"backlog-{rnd}", old.uri(RES), offset, verify_only=False)
            end = self.fetched(old, new)
            if self.replayed(new) != start:
                raise EngineFailure(f"{new.host} replayed while its replay was paused: replay-{new.host} moved from "
                                    f"{start} to {self.replayed(new)}\n{self.logs()}")
            backlog = end.offset - start.offset if start and start.seq == end.seq else end.offset
            if rnd == "replay":
                self.commands.append(f"# timed: the next command until {new.host}'s replay-{new.host} = {end},0")
                t0 = time.monotonic()
                r = new.marsadm("resume-replay", RES)
                t_cmd = time.monotonic() - t0
                try:
                    wait_until(lambda: new.check_alive() or self.replayed(new) == end, self.args.timeout,
                               f"{new.host}'s replay to reach {end}", 0.01)
                except AssertionError as e:
                    raise EngineFailure(f"{e}: replay-{new.host} = {self.replayed(new)}\n{self.logs()}") from None
                secs = time.monotonic() - t0
                out["replay"] = {"secs": secs, "resume_s": t_cmd, "bytes": backlog, "load": load,
                                 "said": (r.stderr.strip().splitlines() or [""])[-1]}
                self.fio(f"backlog-{rnd}", str(self.image(new)), offset, verify_only=True)
                self.status(f"  replay alone: {secs:.2f} s for {backlog / MIB:,.1f} MiB of log "
                            f"({backlog / MIB / secs:,.0f} MiB/s); {new.host}'s device verified")
            else:
                x = self.timed_switch(new, ("resume-replay", RES), ("primary", RES))
                x.update(bytes=backlog, load=load)
                out["handover"] = x
                self.check_probes(new)
                self.fio(f"backlog-{rnd}", new.uri(RES), offset, verify_only=True)
                self.status(f"  resume-replay + primary: first write acknowledged on {new.host} after "
                            f"{x['ack_s']:.2f} s; backlog verified on its export")
            self.check_logs()
        self.res["backlog"] = out

    # -- 3. forced failover -------------------------------------------------------------------

    def alive_in_view(self, seen_from: repl.Node, host: str) -> bool | None:
        r = subprocess.run(seen_from.marsadm_cmd("view", RES, "--json"), capture_output=True, text=True,
                           timeout=60, env=self.env)
        if r.returncode:
            return None
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return bool(json.loads(r.stdout)["nodes"][host]["alive"])
        return None

    @staticmethod
    def watch_down(node: repl.Node, host: str, stop: threading.Event, seen: dict) -> None:
        """Every 20 ms, the snapshot marsadm view shows (read_snapshot, in this process) until it
        says ``host`` is not alive: the detection time without marsadm's start-up in it."""
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a read that fails is just tried again
                snap, _ = read_snapshot(node.mars_dir, node.host, timeout=1.0)
                if not snap.alive(host):
                    seen["t"] = time.monotonic()
                    return
            time.sleep(0.02)

    def failover(self) -> None:
        old = self.primary
        new = self.other(old)
        self.status(f"3. forced failover: SIGKILL {old.host}, then marsadm primary --force on {new.host} ...")
        self.settle(old, new)
        if not self.alive_in_view(new, old.host):
            raise EngineFailure(f"marsadm view on {new.host} shows {old.host} not alive before the kill")
        self.commands.append(f"kill -KILL {old.proc.pid}  # marsd {old.host}")
        seen: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=self.watch_down, args=(new, old.host, stop, seen), daemon=True)
        t_kill = time.monotonic()
        old.proc.send_signal(signal.SIGKILL)
        watcher.start()
        old.proc.wait(30)
        polls = []
        while True:
            p0 = time.monotonic()
            alive = self.alive_in_view(new, old.host)
            polls.append(time.monotonic() - p0)
            if alive is False:
                break
            new.check_alive()
            if time.monotonic() - t_kill > self.args.timeout:
                raise EngineFailure(f"{new.host} still shows {old.host} alive {self.args.timeout:g} s after the kill "
                                    f"(marsadm view {RES} --json)\n{self.logs()}")
        detect = time.monotonic() - t_kill
        watcher.join(5)
        stop.set()
        self.commands.append(f"until {sh(new.marsadm_cmd('view', RES, '--json'))} | "
                             f"jq -e '.nodes.{old.host}.alive == false'; do :; done")
        x = self.timed_switch(new, ("primary", "--force", RES))
        self.check_probes(new)
        self.check_logs()
        x.update(detect_s=detect, polls=len(polls), poll_s=statistics.median(polls), last_poll_s=polls[-1],
                 model_detect_s=seen["t"] - t_kill if "t" in seen else None)
        self.res["failover"] = x
        self.status(f"  {new.host} saw {old.host} down after {detect:.2f} s; first write acknowledged "
                    f"{x['ack_s']:.2f} s after primary --force")

    # -- report --------------------------------------------------------------------------------

    def report(self) -> dict:
        m = {**machine_facts(self.base), "fio": run_text(["fio", "--version"]),
             "loadavg": run_text(["cat", "/proc/loadavg"])}
        r = self.res
        p = print
        p()
        p(f"MARS handover benchmark  {m['date']}")
        p(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, kernel {m['kernel']}, python {m['python']}")
        p(f"fs:      {m['df_T']}")
        p(f"cluster: a {repl.A_IP}, b {repl.B_IP}, peer port {self.port} (TLS); marsd with its defaults "
          f"(--interval 1 s); resource {RES}: {self.args.size / MIB:,.0f} MiB sparse image")
        p(f"load:    /proc/loadavg at the start {self.loadavg0}, at the end {m['loadavg']}")
        p(f"probe:   libnbd connect_uri every {RETRY_S * 1000:.0f} ms until the export answers, then 4 KiB pwrite "
          "with FUA; 'ack' = its reply, in seconds from the start of the first command")
        goals: list[tuple[str, str, str, bool | None]] = []  # goal, measured, met
        hs = r.get("handover", [])
        if hs:
            p()
            p("1. planned handover, nothing to replay (marsadm primary r on the secondary)")
            hdr = (f"  {'#':>3} {'from->to':8} {'marsadm s':>9} {'its own s':>9} {'ack s':>7} {'ack-marsadm':>11} "
                   f"{'connect s':>9} {'tries':>5} {'old stopped s':>13} {'new serving s':>13}")
            p(hdr)
            p("  " + "-" * (len(hdr) - 2))

            def row(label: str, x: dict) -> None:
                own = x["steps"][-1]["said_s"] if "steps" in x else x.get("said_s")
                tries = x.get("attempts", "")
                p(f"  {label:>3} {x.get('from', '') + '->' + x.get('to', '') if 'to' in x else '':8} "
                  f"{x['cmds_s']:>9.2f} {fmt(own):>9} {x['ack_s']:>7.2f} {x['rest_s']:>+11.2f} "
                  f"{x['connected_s']:>9.2f} {tries:>5} {fmt(x.get('old_stopped_s')):>13} "
                  f"{fmt(x.get('new_serving_s')):>13}")
            for i, x in enumerate(hs, 1):
                row(str(i), x)

            def median(k):
                v = [x[k] for x in hs if x.get(k) is not None]
                return statistics.median(v) if v else None
            med = {k: median(k) for k in ("cmds_s", "rest_s", "ack_s", "connected_s", "old_stopped_s", "new_serving_s")}
            med["said_s"] = (statistics.median(v) if (v := [x["steps"][-1]["said_s"] for x in hs
                                                            if x["steps"][-1]["said_s"] is not None]) else None)
            row("med", med)
            acks = [x["ack_s"] for x in hs]
            p("  marsadm s: the command's wall time (process start-up, imports, snapshot and checks, the handover,")
            p("  until it reads actual-<new>/is-primary = 1); its own s: the handover time it reports itself (0.1 s")
            p("  steps); ack-marsadm: the rest, negative when the export answered before marsadm returned;")
            p("  old stopped / new serving: the marsd log lines 'no longer primary' / 'serving NBD', seconds from")
            p("  the start.")
            p(f"  median {med['ack_s']:.2f} s (min {min(acks):.2f}, max {max(acks):.2f}) = "
              f"{med['ack_s'] / GOAL_HANDOVER_S:.2f}x the goal = {med['ack_s'] / 1.0:.1f} marsd rounds of 1 s; "
              f"marsadm's wall time is {med['cmds_s'] / med['ack_s']:.0%} of it"
              + (f", its own handover {med['said_s'] / med['ack_s']:.0%}" if med["said_s"] else ""))
            p(f"  marsadm said: {hs[-1]['steps'][-1]['said']}")
            goals.append((f"handover, nothing to replay: first ack < {GOAL_HANDOVER_S:g} s (median of {len(hs)})",
                          f"{med['ack_s']:.2f} s ({min(acks):.2f}..{max(acks):.2f})", med["ack_s"] < GOAL_HANDOVER_S))
        bl = r.get("backlog", {})
        if bl.get("replay") and bl.get("handover"):
            rp, ho = bl["replay"], bl["handover"]
            p()
            p(f"2. planned handover with a backlog: {self.args.backlog / MIB:,.0f} MiB of 1 MiB writes, "
              f"{ho['from']}'s log fetched in full by {ho['to']}, replay paused there")
            p(f"  (a) resume-replay alone .. replay-{ho['to']} at the log's end: {rp['secs']:.2f} s for "
              f"{rp['bytes'] / MIB:,.1f} MiB ({rp['bytes'] / MIB / rp['secs']:,.0f} MiB/s); resume-replay "
              f"itself {rp['resume_s']:.2f} s")
            st = {s["name"]: s["secs"] for s in ho["steps"]}
            p(f"  (b) resume-replay + primary .. first ack on {ho['to']}: {ho['ack_s']:.2f} s "
              f"(resume-replay {st.get('resume-replay', 0):.2f} s, marsadm primary {st.get('primary', 0):.2f} s, "
              f"rest {ho['rest_s']:.2f} s; old stopped +{fmt(ho['old_stopped_s'])} s, new serving "
              f"+{fmt(ho['new_serving_s'])} s), {ho['bytes'] / MIB:,.1f} MiB of log")
            diff = ho["ack_s"] - rp["secs"]
            p(f"  handover - replay = {diff:+.2f} s; handover / replay = {ho['ack_s'] / rp['secs']:.2f}x")
            p(f"  marsadm said: {ho['steps'][-1]['said']}")
            goals.append((f"handover with backlog <= replay time + {GOAL_BACKLOG_EXTRA_S:g} s",
                          f"{ho['ack_s']:.2f} s vs {rp['secs']:.2f} + {GOAL_BACKLOG_EXTRA_S:g} s ({diff:+.2f} s)",
                          diff <= GOAL_BACKLOG_EXTRA_S))
        fo = r.get("failover")
        if fo:
            p()
            p(f"3. forced failover: SIGKILL of {fo['from']}, then marsadm primary --force r on {fo['to']}")
            p(f"  kill .. marsadm view r --json on {fo['to']} shows {fo['from']} not alive: {fo['detect_s']:.2f} s "
              f"({fo['polls']} run(s) of marsadm view, {fo['poll_s']:.2f} s each: that is its resolution)")
            p(f"  kill .. the same snapshot (read_snapshot, in this process, every 20 ms) says not alive: "
              f"{fmt(fo['model_detect_s'])} s")
            p(f"  primary --force .. first ack on {fo['to']}: {fo['ack_s']:.2f} s (marsadm {fo['cmds_s']:.2f} s, "
              f"rest {fo['rest_s']:.2f} s, new serving +{fmt(fo['new_serving_s'])} s)")
            p(f"  kill .. first ack: {fo['detect_s'] + fo['ack_s']:.2f} s (plus the operator's decision)")
            p(f"  marsadm said: {fo['steps'][-1]['said']}")
            goals.append(("failover: kill .. seen not alive (no goal set)", f"{fo['detect_s']:.2f} s", None))
            goals.append(("failover: primary --force .. first ack (no goal set)", f"{fo['ack_s']:.2f} s", None))
        p()
        p(f"acknowledged probe writes read back on every new primary: {len(self.probes)}; backlogs verified with "
          "fio crc32c; no traceback in the marsd logs")
        for n in self.notes:
            p(f"note: {n}")
        p()
        w = max(len(g) for g, _, _ in goals) if goals else 10
        p(f"  {'goal':{w}}  {'measured':34}  met")
        p("  " + "-" * (w + 43))
        for g, x, ok in goals:
            p(f"  {g:{w}}  {x:34}  {'-' if ok is None else 'PASS' if ok else 'MISS'}")
        p()
        p(f"commands (paths are this run's temporary directory {self.base}; --keep keeps it):")
        for c in self.commands:
            p(f"  {c}")
        p(f"\ncommand: {sys.executable} {' '.join(sys.argv)}")
        return {"machine": m, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items()},
                "results": r, "goals": [{"goal": g, "measured": x, "pass": ok} for g, x, ok in goals],
                "commands": self.commands, "notes": self.notes}


def fmt(x: float | None) -> str:
    return "?" if x is None else f"{x:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/var/tmp", help="where to make the temporary directory (default /var/tmp)")
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"), help="size of resource r's image (default 1G)")
    ap.add_argument("--repeat", type=int, default=5, help="planned handovers with nothing to replay (default 5)")
    ap.add_argument("--backlog-mib", dest="backlog", type=lambda s: int(s) * MIB, default=256 * MIB,
                    help="MiB of log to replay in part 2 (default 256)")
    ap.add_argument("--port", type=int, default=0,
                    help="peer port of both marsd (default 7777 if free, else a free one)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds any one step may take (default 300)")
    ap.add_argument("--no-first-write", action="store_true",
                    help="hand over before anything was written (a's first log file empty): a check of that case")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (images, logs)")
    args = ap.parse_args()
    if args.repeat < 1 or args.backlog < MIB:
        ap.error("--repeat and --backlog-mib must be at least 1")

    bench = Bench(args)
    data: dict = {}

    def work() -> None:
        bench.status("setting up ...")
        bench.setup()
        bench.start()
        bench.handovers()
        bench.backlog()
        bench.failover()
        data.update(bench.report())
    try:
        if run_guarded(work, bench.teardown):
            return 130
    except EngineFailure as e:
        print(f"\nFAILED (the engine misbehaved): {e}", file=sys.stderr)
        return 1
    except (RuntimeError, AssertionError, subprocess.SubprocessError) as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        return 1
    if args.json:
        write_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
