"""Crash consistency of the primary's write path, with a real marsd, a real NBD client and SIGKILL.

A client (libnbd) keeps ~16 writes in flight on resource ``r`` and records which of them were
acknowledged; marsd is SIGKILLed at a random moment of that load, restarted, and then:

* every acknowledged write reads back through NBD, and every write that was still in flight at
  the kill reads back either entirely as before or entirely as written (one request is one log
  record, so it is in the log whole or not at all; a mix of both is a torn write);
* the data device (the image file) equals the replay of all log files from an empty device;
* the marsd log holds no Traceback.

In about a quarter of the rounds ``marsadm log-rotate`` runs at a random moment of the load, so
the log spans many files and kills also land while a rotation is pending
(``MARS_CRASH_ROTATE_UNDER_LOAD=0`` rotates before the load instead).

The test keeps its own model of the device: acknowledged writes are applied to it at once, and
after each restart it takes over what was read for the in-flight writes, so every round starts
from the device's real state. In-flight writes never overlap, so the expected content is always
well defined.

Reproduce a failure with the seed printed in its message::

    MARS_CRASH_SEED=<seed> python -m pytest tests/test_crash.py -x -q

``MARS_CRASH_ROUNDS`` changes the number of rounds (default 20, 1000 under MARS_TORTURE=1).

``test_torn_tail_with_pending_log_rotation_is_cut`` builds deterministically the state that a kill
in the middle of an append leaves while a rotation is pending, which the crash rounds reach only
now and then.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbd  # python3-libnbd, a real NBD client (Debian package; the Makefile installs it)
import pytest

from harness import BIN, Node, start_cluster, wait_until
from mars.engine.log.files import scan_file
from mars.engine.log.format import HEADER_SIZE, Kind, LogRecord, encode_record_bytes
from mars.engine.log.values import first_record

sys.path.insert(0, str(Path(__file__).parent / "faults"))
from campaign import size  # noqa: E402
from recorder import (DEV_SIZE, SECTOR, LogReplay, Model, Req, describe_sector, drain, first_difference,  # noqa: E402
                      new_request, pattern, resolve_in_flight)

QUEUE_DEPTH = 16
READ_CHUNK = 4 * 2**20
# The cluster campaign (tests/faults/test_fault_crash.py) kills primaries too; this one-node case
# stays as the quick, focused check of the write path and its torn-tail recovery.
ROUNDS = size(20, 1000, "MARS_CRASH_ROUNDS")
ROTATE_SHARE = 0.25  # share of the rounds that run marsadm log-rotate
# Where those rotations happen: by default at a random moment of the load, so that kills also land
# while a rotation is pending; with MARS_CRASH_ROTATE_UNDER_LOAD=0 between the restart and the load.
ROTATE_UNDER_LOAD = os.environ.get("MARS_CRASH_ROTATE_UNDER_LOAD", "1") == "1"
FULL_REPLAY_EVERY = 10  # rounds between from-scratch replays; every other round replays incrementally

@dataclass
class Stats:
    acked: int = 0
    in_flight_at_kill: int = 0
    present: int = 0
    absent: int = 0
    same: int = 0  # in-flight requests whose content equals the old one (e.g. TRIM of zeros)
    rounds_with_flight: int = 0
    rotations: int = 0
    restart_s: float = 0.0
    replay_s: float = 0.0
    load_s: float = 0.0


class CrashTest:
    def __init__(self, node: Node, img: Path, rng: random.Random) -> None:
        self.node = node
        self.img = img
        self.rng = rng
        self.model = Model()
        self.replay = LogReplay(node.mars_dir / "resource-r")
        self.stats = Stats()
        self.next_wid = 0
        self.uncertain: list[Req] = []  # requests in flight at the last kill
        self.failures: list[Req] = []  # requests that completed with an error
        self.rnd = -1
        self.log_mark = 0  # size of marsd's log file at the last restart

    # -- client side -------------------------------------------------------------------------

    def connect(self) -> nbd.NBD:
        def attempt():
            proc = self.node.proc
            if proc is None or proc.poll() is not None:
                raise AssertionError(f"marsd is not running (exit code {proc and proc.returncode}):\n"
                                     f"{self.node.log()}")
            h = nbd.NBD()
            try:
                h.connect_uri(self.node.uri("r"))
            except nbd.Error:
                with open(self.node.log_path, "rb") as f:
                    f.seek(self.log_mark)
                    new = f.read().decode(errors="replace")
                if " ERROR " in new:  # e.g. recovery refused the log: no use waiting for the export
                    raise AssertionError(f"marsd did not serve r after the restart:\n{new[-6000:]}") from None
                return None
            return h

        h = wait_until(attempt, 60, "marsd to serve export r again")
        assert h.get_size() == DEV_SIZE, f"export size {h.get_size()}, expected {DEV_SIZE}"
        return h

    def new_request(self, busy: list[Req]) -> Req | None:
        r = new_request(self.rng, self.model, self.rnd, self.next_wid, busy)
        self.next_wid += r is not None
        return r

    def submit(self, h, r: Req) -> None:
        def done(err, r=r) -> int:
            if err.value == 0:
                r.acked = True
                r.outcome = "acknowledged"
                self.model.apply(r)
                r.data = None  # the model has it; keep memory flat over many rounds
                self.stats.acked += 1
            else:
                r.error = err.value
                self.failures.append(r)
            return 1  # retire the command

        fua = nbd.CMD_FLAG_FUA if self.rng.random() < 0.1 else 0
        if r.kind == Kind.WRITE:
            h.aio_pwrite(r.data, r.offset, completion=done, flags=fua)
        elif r.kind == Kind.TRIM:
            h.aio_trim(r.length, r.offset, completion=done, flags=fua)
        else:
            no_hole = nbd.CMD_FLAG_NO_HOLE if self.rng.random() < 0.5 else 0
            h.aio_zero(r.length, r.offset, completion=done, flags=fua | no_hole)

    def load_and_kill(self, h) -> None:
        """Keep QUEUE_DEPTH requests in flight for a random 10..300 ms, then SIGKILL marsd under them.

        In about every fourth round ``marsadm log-rotate`` runs first (or, with ROTATE_UNDER_LOAD,
        is started at a random moment of the load), so the log spans many files.
        """
        rng = self.rng
        load_s = rng.uniform(0.010, 0.300)
        rotate_at = None
        if rng.random() < ROTATE_SHARE:
            if ROTATE_UNDER_LOAD:
                rotate_at = rng.uniform(0, load_s)
            else:
                r = self.node.marsadm("log-rotate", "r")
                self.stats.rotations += "rotating" in r.stdout + r.stderr
        rotator: subprocess.Popen[str] | None = None
        busy: list[Req] = []
        t0 = time.monotonic()
        while True:
            busy = [r for r in busy if not r.acked and r.error is None]
            assert not self.failures, (f"requests failed while marsd was up: "
                                       f"{[(str(r), r.error) for r in self.failures[:5]]}\n{self.node.log()}")
            while len(busy) < QUEUE_DEPTH:
                r = self.new_request(busy)
                if r is None:
                    break
                self.submit(h, r)
                busy.append(r)
            elapsed = time.monotonic() - t0
            if rotate_at is not None and rotator is None and elapsed >= rotate_at:
                rotator = self.start_rotate()
            if elapsed >= load_s:
                break
            try:
                h.poll(5)
            except nbd.Error as e:
                raise AssertionError(f"the NBD connection failed while marsd should be up: {e}\n"
                                     f"{self.node.log()}") from None
        self.stats.load_s += time.monotonic() - t0
        self.node.kill()
        drain(h, "libnbd did not give up the requests of the killed server")
        self.failures = []  # errors were expected here: the server is gone
        self.uncertain = sorted((r for r in busy if not r.acked), key=lambda r: r.offset)
        for r in self.uncertain:
            r.outcome = "in flight at the kill"
        self.stats.in_flight_at_kill += len(self.uncertain)
        self.stats.rounds_with_flight += bool(self.uncertain)
        if rotator is not None:
            out, _ = rotator.communicate(timeout=60)
            assert rotator.returncode == 0, f"marsadm log-rotate failed ({rotator.returncode}):\n{out}"
            self.stats.rotations += "rotating" in out

    def start_rotate(self) -> subprocess.Popen[str]:
        """``marsadm log-rotate r`` in the background; --no-wait, because marsd may be killed before it switches."""
        n = self.node
        cmd = [str(BIN / "marsadm"), "--mars-dir", str(n.mars_dir), "--host", n.host, "--no-wait", "log-rotate", "r"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=n.env())

    # -- checks --------------------------------------------------------------------------------

    def read_all(self, h) -> bytearray:
        got = bytearray(DEV_SIZE)
        for off in range(0, DEV_SIZE, READ_CHUNK):
            got[off:off + READ_CHUNK] = h.pread(READ_CHUNK, off)
        return got

    def verify_readback(self, h) -> None:
        """Acknowledged writes read back; each in-flight request is there wholly or not at all."""
        counts = resolve_in_flight(self.model, self.uncertain, self.read_all(h))
        self.stats.present += counts["present"]
        self.stats.absent += counts["absent"]
        self.stats.same += counts["same"]
        self.uncertain = []

    def verify_log_replay(self, full: bool) -> None:
        """The data device equals the replay of the log (marsd is up and idle: recovery is done)."""
        t0 = time.monotonic()
        image = self.replay.run(full=full)
        with open(self.img, "rb") as f:
            device = f.read()
        assert len(device) == DEV_SIZE, f"image file is {len(device)} bytes, expected {DEV_SIZE}"
        if device != image:
            off = first_difference(image, device)
            raise AssertionError(
                f"data device differs from the replay of the log ({'from scratch' if full else 'incremental'}, "
                f"{self.replay.records} records) at offset {off}: device holds "
                f"{describe_sector(device[off:off + SECTOR])}, the log says "
                f"{describe_sector(image[off:off + SECTOR])}")
        assert image == self.model.data, (
            f"the log replay differs from the data read back through NBD at offset "
            f"{first_difference(self.model.data, image)}")
        self.stats.replay_s += time.monotonic() - t0

    def check_marsd_log(self) -> None:
        text = self.node.log_path.read_text(errors="replace")
        assert "Traceback" not in text, f"marsd logged a traceback:\n{text[-6000:]}"

    # -- rounds --------------------------------------------------------------------------------

    def restart(self) -> nbd.NBD:
        t0 = time.monotonic()
        self.log_mark = self.node.log_path.stat().st_size
        # SIGKILL leaves the socket file behind; without removing it, Node.start would return
        # before the new marsd listens.
        self.node.nbd_sock.unlink(missing_ok=True)
        self.node.start("--checkpoint-interval", f"{self.rng.choice([0.02, 0.1, 1.0]):g}")
        h = self.connect()
        self.stats.restart_s += time.monotonic() - t0
        return h

    def run(self, rounds: int) -> None:
        h = self.connect()
        for rnd in range(rounds):
            self.rnd = rnd
            self.load_and_kill(h)
            del h
            h = self.restart()
            self.verify_readback(h)
            self.verify_log_replay(full=(rnd + 1) % FULL_REPLAY_EVERY == 0)
            self.check_marsd_log()
        self.rnd = rounds
        h.shutdown()
        del h
        assert self.node.stop() == 0, f"marsd did not stop cleanly:\n{self.node.log()}"
        self.verify_log_replay(full=True)
        self.check_marsd_log()


def one_node_with_resource(workdir) -> tuple[Node, Path]:
    """Node a serving resource r on a fresh DEV_SIZE image."""
    base, nodes = workdir
    (node,) = start_cluster(base, nodes, "a")
    img = base / "r.img"
    node.marsadm("create-resource", "r", str(img), str(DEV_SIZE))
    return node, img


@pytest.mark.slow
@pytest.mark.timeout(0 if size(0, 1) else 600)  # 1000 rounds under MARS_TORTURE=1 take ~20 min
def test_sigkill_under_write_load(workdir):
    """20 rounds (1000 in the fault campaign): write load, SIGKILL at a random moment, restart, everything acknowledged is there."""
    node, img = one_node_with_resource(workdir)

    seed = int(os.environ.get("MARS_CRASH_SEED", random.SystemRandom().randrange(2**32)))
    t = CrashTest(node, img, random.Random(seed))
    t0 = time.monotonic()
    try:
        t.run(ROUNDS)
    except BaseException as e:
        e.add_note(f"crash test: seed {seed}, round {t.rnd} of {ROUNDS}; reproduce with MARS_CRASH_SEED={seed}")
        raise
    s = t.stats
    cuts = node.log_path.read_text(errors="replace").count("bytes of torn tail")
    print(f"\ncrash test: seed {seed}, {ROUNDS} rounds in {time.monotonic() - t0:.1f} s "
          f"(load {s.load_s:.1f} s, restarts {s.restart_s:.1f} s, log replays {s.replay_s:.1f} s); "
          f"{s.acked} requests acknowledged, {s.in_flight_at_kill} in flight at the kills "
          f"({s.present} found written, {s.absent} not, {s.same} undecidable); {s.rotations} log rotations, "
          f"{len(t.replay.progress)} log files, {cuts} torn tails cut by recovery")
    # The rounds must really have crashed under load, or the test proves nothing.
    assert s.acked >= ROUNDS, f"only {s.acked} acknowledged requests in {ROUNDS} rounds"
    assert s.rounds_with_flight >= ROUNDS * 0.9, (
        f"only {s.rounds_with_flight} of {ROUNDS} kills hit requests in flight")


def test_torn_tail_with_pending_log_rotation_is_cut(workdir):
    """A crash while appending, after log-rotate created the next file but before marsd switched.

    ``marsadm log-rotate`` only creates the empty next log file; marsd switches to it after the
    batch in progress, so for a while the logger still appends to the older file. A crash inside
    such an append (a SIGKILL inside the pwritev, or a power loss before the page cache reached
    the disk) leaves that file with a torn tail, exactly like the newest file after any crash; the
    torn record was never acknowledged and must simply be cut (this was once refused as damage).

    The crash rounds above hit this now and then with MARS_CRASH_ROTATE_UNDER_LOAD=1 (a SIGKILL
    must land inside the pwritev while a rotation is pending); this test builds the state such a
    kill leaves, deterministically: the tail of an append that did not finish, plus the file that
    log-rotate made.
    """
    node, img = one_node_with_resource(workdir)
    h = nbd.NBD()
    h.connect_uri(node.uri("r"))
    acked = pattern(0, 1, 0, 8)
    h.pwrite(acked, 0)  # acknowledged: must survive
    h.shutdown()
    del h
    node.kill()

    # The state the crash left: log-rotate had created log 2 ...
    node.marsadm("--no-wait", "log-rotate", "r")
    rdir = node.mars_dir / "resource-r"
    log1 = rdir / "log-000000001-a"
    assert (rdir / "log-000000002-a").exists()
    # ... while marsd was still appending its next batch to log 1, which did not complete.
    scan = scan_file(log1, 0, first_record(1))
    assert scan.error is None and scan.last_seq is not None
    torn = LogRecord(seq=scan.last_seq + 1, lamport_ns=time.time_ns(), offset=8192, length=4096,
                     kind=Kind.WRITE, payload=pattern(0, 2, 8192, 8))
    with open(log1, "ab") as f:
        f.write(encode_record_bytes(torn)[:HEADER_SIZE + 1000])

    node.nbd_sock.unlink(missing_ok=True)
    mark = node.log_path.stat().st_size
    node.start()

    def attempt():
        h = nbd.NBD()
        try:
            h.connect_uri(node.uri("r"))
        except nbd.Error:
            with open(node.log_path, "rb") as f:
                f.seek(mark)
                new = f.read().decode(errors="replace")
            if " ERROR " in new:
                raise AssertionError(f"marsd did not serve r after the crash:\n{new}") from None
            return None
        return h

    h = wait_until(attempt, 30, "marsd to serve export r after the crash")
    assert h.pread(len(acked), 0) == acked, "the acknowledged write was lost"
    assert h.pread(4096, 8192) == bytes(4096), "the torn, never acknowledged write was replayed"
    h.shutdown()
    del h
    assert node.stop() == 0
    end = scan_file(log1, 0, first_record(1))
    assert end.error is None, f"log 1 still ends in the torn record: {end.error}"
