"""Records onto the data device: the one place a log record becomes a device write.

The primary's write-back, start-up recovery and a secondary's replay all apply records the same
way, so "data device = replay of the log" means one thing for all three.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..device import DataDevice
from . import format as lf

IOV_MAX = 1024
MAX_BATCH_BYTES = 64 * 2**20


def apply_record(device: DataDevice, rec: lf.Entry) -> None:
    """Write one record to the data device; replaying twice gives the same result (idempotent)."""
    if rec.kind == lf.Kind.WRITE:
        device.pwrite(rec.payload, rec.offset)
    elif rec.kind == lf.Kind.TRIM:
        device.trim(rec.offset, rec.length)
    else:
        device.write_zeroes(rec.offset, rec.length, may_punch=not (rec.flags & lf.FLAG_NO_HOLE))


def apply_records(device: DataDevice, records: Sequence[lf.Entry]) -> tuple[int, int]:
    """Apply records in order, each run of adjacent writes as one ``pwritev``.

    A sequential load logs many records that continue each other on the device; one large
    write of them costs the kernel far less than many small ones (it takes larger page-cache
    folios and fewer calls), which is most of the CPU a replay of such a load needs. Order is
    kept exactly: a run ends at any record that does not continue it. Returns the lowest and
    highest device offsets touched (equal when none), for write-behind.
    """
    lo, hi = -1, 0
    run: list[bytes | memoryview] = []
    run_start = run_end = 0
    for rec in records:
        if rec.kind == lf.Kind.WRITE and rec.length and run and rec.offset == run_end \
                and len(run) < IOV_MAX and run_end - run_start < MAX_BATCH_BYTES:
            run.append(rec.payload)
            run_end += rec.length
        else:
            if run:
                pwritev_all(device.fd, run, run_start)
                run = []
            if rec.kind == lf.Kind.WRITE and rec.length:
                run, run_start, run_end = [rec.payload], rec.offset, rec.offset + rec.length
            else:
                apply_record(device, rec)
        if rec.length:
            lo = rec.offset if lo < 0 else min(lo, rec.offset)
            hi = max(hi, rec.offset + rec.length)
    if run:
        pwritev_all(device.fd, run, run_start)
    return max(lo, 0), hi


def pwritev_all(fd: int, bufs: list[bytes | memoryview], offset: int) -> int:
    """pwritev until everything is written (short writes happen on signals and huge batches).

    The first call takes the buffers as they are (an empty one costs the kernel nothing): it
    nearly always writes them all, and then no per-buffer Python runs at all; a group commit's
    iovec has three buffers a record (issue 17)."""
    if len(bufs) <= IOV_MAX:
        want = sum(map(len, bufs))
        if not want:
            return 0
        if len(bufs) == 1:
            n = os.pwrite(fd, bufs[0], offset)
        else:
            n = os.pwritev(fd, bufs, offset)
        if n == want:
            return n
        return n + _pwritev_rest(fd, bufs, offset, n)
    return _pwritev_rest(fd, bufs, offset, 0)


def _pwritev_rest(fd: int, bufs: list[bytes | memoryview], offset: int, done: int) -> int:
    """What is left of ``bufs`` after the first ``done`` bytes, however many calls it takes."""
    total = 0
    views = [memoryview(b) for b in bufs if len(b)]
    skip = done
    while skip and views:
        if skip >= len(views[0]):
            skip -= len(views.pop(0))
        else:
            views[0] = views[0][skip:]
            skip = 0
    offset += done
    while views:
        n = os.pwritev(fd, views[:IOV_MAX], offset + total)
        total += n
        while n and views:
            if n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][n:]
                n = 0
    return total
