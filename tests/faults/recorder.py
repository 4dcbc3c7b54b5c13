"""The acknowledged-write recorder of the crash tests: what a client wrote, what the device must hold.

A client keeps requests in flight through a real NBD connection (libnbd) and applies each
acknowledged one to a :class:`Model` of the device at once. After a crash, every acknowledged
request must read back, and every request that was still in flight must read back either wholly
as before or wholly as written (one request is one log record): :func:`resolve_in_flight` checks
that and takes over what was found, so the next round starts from the device's real state.
:class:`LogReplay` replays a resource's log files onto an in-memory device to compare with the
data device. tests/test_crash.py (one node) and tests/faults/test_fault_crash.py (a cluster) use it.
"""

from __future__ import annotations

import random
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from mars.engine.log.files import scan_file
from mars.engine.log.format import Decoded, Kind
from mars.engine.log.values import first_record, parse_log_name

SECTOR = 512
DEV_SIZE = 16 * 2**20
SECTORS = DEV_SIZE // SECTOR
MAX_SECTORS = 64 * 1024 // SECTOR

# Pattern of one sector of a test write: tag, round, write id, the device offset it was written
# for, its index in the write and the write's sector count, then a filler byte derived from the id.
TAG = b"MARSCRSH"
_HDR = struct.Struct("<8sIIQII")
_FILL = SECTOR - _HDR.size


def pattern(rnd: int, wid: int, offset: int, nsect: int) -> bytes:
    fill = bytes([(wid * 31 + rnd * 7) % 251 + 1]) * _FILL
    return b"".join(_HDR.pack(TAG, rnd, wid, offset + i * SECTOR, i, nsect) + fill for i in range(nsect))


def describe_sector(data: bytes | bytearray | memoryview) -> str:
    data = bytes(data)
    if data == bytes(SECTOR):
        return "zeros"
    if data[:8] == TAG:
        _, rnd, wid, off, i, n = _HDR.unpack_from(data)
        return f"write #{wid} of round {rnd} (its sector {i}/{n}, written for offset {off})"
    return f"unrecognised data {data[:32].hex()}..."


@dataclass
class Req:
    """One request of the client: WRITE, TRIM or ZERO, and what became of it."""

    wid: int
    rnd: int
    kind: Kind
    offset: int
    length: int
    data: bytes | None  # None for TRIM and ZERO, which leave zeros
    acked: bool = False
    error: int | None = None
    outcome: str = "in flight"

    @property
    def new(self) -> bytes:
        return self.data if self.data is not None else bytes(self.length)

    def __str__(self) -> str:
        return (f"{self.kind.name} #{self.wid} of round {self.rnd} [{self.offset}, {self.offset + self.length}) "
                f"({self.length} B), {self.outcome}")


@dataclass
class Model:
    """What the device must hold: its bytes, and which request last wrote each sector (-1: nobody)."""

    data: bytearray = field(default_factory=lambda: bytearray(DEV_SIZE))
    owner: list[int] = field(default_factory=lambda: [-1] * SECTORS)
    reqs: dict[int, Req] = field(default_factory=dict)

    def apply(self, r: Req) -> None:
        self.data[r.offset:r.offset + r.length] = r.new
        s = r.offset // SECTOR
        n = r.length // SECTOR
        self.owner[s:s + n] = [r.wid] * n

    def who(self, offset: int) -> str:
        wid = self.owner[offset // SECTOR]
        return "never written (zeros)" if wid < 0 else str(self.reqs[wid])


def first_difference(a: bytes | bytearray, b: bytes | bytearray) -> int:
    """Offset of the first differing sector of two equally long buffers (-1 when equal)."""
    step = 64 * 1024
    for base in range(0, len(a), step):
        if a[base:base + step] != b[base:base + step]:
            for off in range(base, min(base + step, len(a)), SECTOR):
                if a[off:off + SECTOR] != b[off:off + SECTOR]:
                    return off
    return -1


class LogReplay:
    """Replays the resource's log files onto an in-memory device, incrementally from round to round.

    Records once scanned are complete and durable, so a later restart may only append after them
    (or cut a torn tail after them); the next check continues where the previous one stopped, and
    ``full=True`` starts over from an empty device to check that the earlier part is unchanged too.
    """

    def __init__(self, res_dir: Path) -> None:
        self.res_dir = res_dir
        self.reset()

    def reset(self) -> None:
        self.image = bytearray(DEV_SIZE)
        self.progress: dict[int, tuple[int, int]] = {}  # log file number -> (end offset, next record number)
        self.records = 0

    def _on_record(self, d: Decoded) -> None:
        rec = d.record
        end = rec.offset + rec.length
        assert end <= DEV_SIZE, f"log record {rec.seq} at file offset {d.offset} ends at {end}, past the device"
        if rec.kind == Kind.WRITE:
            self.image[rec.offset:end] = rec.payload
        else:
            self.image[rec.offset:end] = bytes(rec.length)
        self.records += 1

    def run(self, full: bool = False) -> bytearray:
        if full:
            self.reset()
        files = []
        for p in self.res_dir.iterdir():
            parsed = parse_log_name(p.name)
            if parsed is not None:
                assert parsed[1] == "a", f"log file of an unexpected origin: {p.name}"
                files.append((parsed[0], p))
        files.sort()
        assert files, f"no log files in {self.res_dir}"
        seqs = [s for s, _ in files]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"log files are not contiguous: {seqs}"
        for s in self.progress:
            assert s in seqs, f"log file number {s} disappeared (nothing deletes logs in this test)"
        for seq, path in files:
            start, expect = self.progress.get(seq, (0, first_record(seq)))
            res = scan_file(path, start, expect, self._on_record)
            assert res.error is None, (
                f"log {path.name} does not scan cleanly after recovery (scanned from offset {start}, "
                f"expecting record {expect}): {res.error} (torn={res.error.torn})")
            next_rec = res.last_seq + 1 if res.last_seq is not None else expect
            self.progress[seq] = (res.end, next_rec)
        return self.image


def new_request(rng: random.Random, model: Model, rnd: int, wid: int, busy: list[Req]) -> Req | None:
    """A random WRITE (90 %), TRIM or ZERO overlapping none of ``busy`` (None if no free spot was found).

    In-flight requests never overlap, so what the device must hold after a crash is always well
    defined: each of them is there wholly or not at all, independently of the others.
    """
    for _ in range(20):
        nsect = rng.randint(1, MAX_SECTORS)
        offset = rng.randrange(0, SECTORS - nsect + 1) * SECTOR
        length = nsect * SECTOR
        if any(offset < b.offset + b.length and b.offset < offset + length for b in busy):
            continue
        x = rng.random()
        if x < 0.05:
            r = Req(wid, rnd, Kind.TRIM, offset, length, None)
        elif x < 0.10:
            r = Req(wid, rnd, Kind.ZERO, offset, length, None)
        else:
            r = Req(wid, rnd, Kind.WRITE, offset, length, pattern(rnd, wid, offset, nsect))
        model.reqs[wid] = r
        return r
    return None


def resolve_in_flight(model: Model, uncertain: list[Req], got: bytes | bytearray) -> dict[str, int]:
    """Check a device read back after a crash against the model, and take over its real state.

    Acknowledged requests must be there; each request in ``uncertain`` (in flight at the crash)
    must be there wholly or not at all. Returns how many were found present, absent, or the same
    either way (e.g. a TRIM of zeros); raises AssertionError naming the first lost or torn sector.
    """
    counts = {"present": 0, "absent": 0, "same": 0}
    expected = bytearray(model.data)
    for r in uncertain:
        o, n = r.offset, r.length
        old = bytes(model.data[o:o + n])
        new = r.new
        g = bytes(got[o:o + n])
        if g == new and g == old:
            counts["same"] += 1
            r.outcome = "in flight at the kill; old and new content are equal"
        elif g == new:
            counts["present"] += 1
            r.outcome = "in flight at the kill, found written after the restart"
        elif g == old:
            counts["absent"] += 1
            r.outcome = "in flight at the kill, found not written after the restart"
        else:
            n_new = n_old = 0
            for k in range(0, n, SECTOR):
                gs, os_, ns = g[k:k + SECTOR], old[k:k + SECTOR], new[k:k + SECTOR]
                if gs != os_ and gs != ns:
                    raise AssertionError(
                        f"offset {o + k}: read {describe_sector(gs)}, but the sector must hold either "
                        f"{describe_sector(os_)} (last acknowledged there: {model.who(o + k)}) or "
                        f"{describe_sector(ns)} (from {r})")
                n_new += gs == ns and gs != os_
                n_old += gs == os_ and gs != ns
            raise AssertionError(
                f"torn request after the crash: {r} reads back with {n_new} sectors new and {n_old} "
                f"sectors old; one request is one log record and must be replayed wholly or not at all")
        expected[o:o + n] = g
    if got != expected:
        off = first_difference(expected, got)
        raise AssertionError(
            f"offset {off}: read {describe_sector(got[off:off + SECTOR])}, expected "
            f"{describe_sector(expected[off:off + SECTOR])} from {model.who(off)}"
            + (" -- an ACKNOWLEDGED write was lost or damaged" if model.owner[off // SECTOR] >= 0 else ""))
    for r in uncertain:
        if r.outcome.endswith("found written after the restart"):
            model.apply(r)
        r.data = None
    return counts


def drain(h, what: str, timeout: float = 30) -> None:
    """Let libnbd finish what is in flight on ``h`` after a kill: replies the server sent before it
    died still count as acknowledgements, the rest complete with an error once libnbd sees the
    connection gone."""
    import nbd

    deadline = time.monotonic() + timeout
    while h.aio_in_flight() > 0:
        assert time.monotonic() < deadline, what
        try:
            h.poll(100)
        except nbd.Error:
            break
