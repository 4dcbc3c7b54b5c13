"""Where a data device holds data: extents for NBD_CMD_BLOCK_STATUS and for reads with holes.

Pure functions and a one-window cache; the lseek calls that find the holes are the device's
(``DataDevice.scan``), run in the thread pool.

Why the answer is right while writes are in flight: the primary writes every write back to the
data device (its page cache) *before* acknowledging it (log/writer.py), and SEEK_DATA sees
page-cache data, so an acknowledged write is always visible to the scan. What the scan may miss
is a write, trim or write-zeroes that is submitted but not yet written back; its range is
reported as data (flags 0: "allocated, contents unknown"), which is always true enough. The
cache is dropped when such a request is submitted, and nothing is stored while one is in
flight: a scan stores its spans only if no request was in flight when it began or when it
ended and the cache's generation did not move meanwhile (every submission moves it). So no scan
that may have run before a write-back is served after it, and the answer to the request needs
no second invalidation on the write path.

Extents here are (start, end, hole) windows of the device; NBD wants (length, flags) from the
request's offset, which ``to_nbd`` makes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable

from .nbd.protocol import STATE_HOLE, STATE_ZERO

__all__ = ["Span", "HOLE_FLAGS", "normalize", "overlay_data", "to_nbd", "ExtentCache", "read_plan"]

#: (start, end, hole): bytes [start, end) of the device are a hole (read as zeros) or data.
Span = tuple[int, int, bool]

#: A hole in an image file is unallocated and reads as zeros.
HOLE_FLAGS = STATE_HOLE | STATE_ZERO


def normalize(spans: Iterable[Span]) -> list[Span]:
    """Adjacent spans of the same kind merged, empty ones dropped."""
    out: list[Span] = []
    for start, end, hole in spans:
        if end <= start:
            continue
        if out and out[-1][1] == start and out[-1][2] == hole:
            out[-1] = (out[-1][0], end, hole)
        else:
            out.append((start, end, hole))
    return out


def overlay_data(spans: list[Span], ranges: Iterable[tuple[int, int]]) -> list[Span]:
    """``spans`` with every byte in one of ``ranges`` ([start, end) of writes in flight) as data."""
    todo = sorted((a, b) for a, b in ranges if b > a)
    if not todo:
        return spans
    out: list[Span] = []
    for start, end, hole in spans:
        if not hole:
            out.append((start, end, hole))
            continue
        cur = start
        for a, b in todo:
            if b <= cur or a >= end:
                continue
            if a > cur:
                out.append((cur, a, True))
                cur = a
            stop = min(b, end)
            out.append((cur, stop, False))
            cur = stop
        if cur < end:
            out.append((cur, end, True))
    return normalize(out)


def to_nbd(spans: list[Span], offset: int, length: int) -> list[tuple[int, int]]:
    """(length, base:allocation flags) from ``offset``, cut at ``offset + length``."""
    end = offset + length
    out: list[tuple[int, int]] = []
    for start, stop, hole in spans:
        start, stop = max(start, offset), min(stop, end)
        if stop > start:
            out.append((stop - start, HOLE_FLAGS if hole else 0))
    return out


def read_plan(spans: list[Span], offset: int, length: int, min_hole: int) -> list[tuple[int, int, bool]]:
    """How to read [offset, offset+length): (start, end, hole) pieces, where a hole shorter than
    ``min_hole`` is read like data (a chunk header and a second pread cost more than it saves)."""
    end = offset + length
    cut = [(max(a, offset), min(b, end), h) for a, b, h in spans if b > offset and a < end]
    out: list[Span] = []
    pos = offset
    for a, b, h in cut:
        if a > pos:  # a gap the scan did not cover: read it
            out.append((pos, a, False))
        out.append((a, b, h and b - a >= min_hole))
        pos = b
    if pos < end:
        out.append((pos, end, False))
    return normalize(out)


class ExtentCache:
    """One window of a device's spans, answered on the event loop without a scan.

    ``generation`` moves on every invalidation; a scan stores its result only if the generation
    is still the one it started under, so a scan that raced a write never lands in the cache.
    """

    __slots__ = ("generation", "_spans", "_starts", "_start", "_end", "hits", "scans")

    def __init__(self) -> None:
        self.generation = 0
        self._spans: list[Span] = []
        self._starts: list[int] = []
        self._start = self._end = 0
        self.hits = 0
        self.scans = 0

    def invalidate(self) -> None:
        self.generation += 1
        if self._spans:
            self._spans, self._starts = [], []
            self._start = self._end = 0

    def store(self, generation: int, spans: list[Span]) -> bool:
        """Keep ``spans`` (contiguous, from a scan started under ``generation``); False if stale."""
        self.scans += 1
        if generation != self.generation or not spans:
            return False
        self._spans = spans
        self._starts = [s for s, _, _ in spans]
        self._start, self._end = spans[0][0], spans[-1][1]
        return True

    def lookup(self, offset: int, length: int) -> list[Span] | None:
        """The cached spans from ``offset`` (up to ``offset + length`` or the window's end), or
        None when the window does not hold ``offset``."""
        if not self._start <= offset < self._end:
            return None
        i = bisect_right(self._starts, offset) - 1
        end = offset + length
        out: list[Span] = []
        spans = self._spans
        while i < len(spans):
            a, b, h = spans[i]
            if a >= end:
                break
            out.append((max(a, offset), min(b, end), h))
            i += 1
        self.hits += 1
        return out
