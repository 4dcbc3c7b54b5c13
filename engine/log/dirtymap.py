"""The primary's dirty-region map: which regions it wrote while its log was off (emergency mode).

When the MARS directory runs full the primary stops logging and writes through to its data
device, so the application keeps running (the original's emergency mode). The secondaries then
miss those writes. The original re-reads the whole device afterwards; Veritas VVR keeps a data
change map instead, and so do we: one bit per region, set *durably before* the write reaches
the device, so after any crash the map names at least every region the device may differ in.
The resync afterwards copies only the regions with a bit set and reads nothing else.

Why a preallocated file: the map is needed exactly when the filesystem is full, so it is
created (with its blocks allocated) when the primary starts, and setting a bit later is a
``pwrite`` into blocks that exist: it cannot fail with ENOSPC. 8 TiB at 512 KiB a region is a
2 MiB file.

Layout: an 8-byte magic, the region size and the device size (little-endian u64 each), then the
bitmap, bit ``i`` of byte ``i // 8`` for region ``i``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

MAGIC = b"MARSDCM1"
_HEAD = struct.Struct("<8sQQ")
MIN_REGION = 64 << 10
#: Regions per map at most: the map of any device stays a few MiB.
MAX_REGIONS = 1 << 24


def region_size(device_size: int) -> int:
    """The smallest power of two from 64 KiB that keeps the map within MAX_REGIONS bits."""
    r = MIN_REGION
    while device_size > r * MAX_REGIONS:
        r *= 2
    return r


class DirtyMap:
    """One resource's map on its primary; every method is blocking (call it off the event loop)."""

    def __init__(self, path: Path, device_size: int) -> None:
        self.path = path
        self.region = region_size(device_size)
        self.size = device_size
        self.count = (device_size + self.region - 1) // self.region
        self.bits = bytearray((self.count + 7) // 8)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        head = os.pread(self._fd, _HEAD.size, 0)
        if len(head) == _HEAD.size and _HEAD.unpack(head)[0] == MAGIC:
            _, region, size = _HEAD.unpack(head)
            old = os.pread(self._fd, (((size + region - 1) // region) + 7) // 8, _HEAD.size)
            if region == self.region and size <= device_size:
                self.bits[:len(old)] = old
            elif any(old):
                self.bits = bytearray(b"\xff" * len(self.bits))  # a map we cannot read: everything is dirty
        self.regions_set = int.from_bytes(self.bits, "little").bit_count()
        # Allocated now, so that marking later never needs a block: the point of the file.
        os.posix_fallocate(self._fd, 0, _HEAD.size + len(self.bits))
        os.pwrite(self._fd, _HEAD.pack(MAGIC, self.region, self.size) + bytes(self.bits), 0)
        os.fdatasync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def mark(self, ranges: Iterable[tuple[int, int]]) -> bool:
        """Set the bits of ``(offset, length)`` ranges and make them durable; False if all were set."""
        lo_byte, hi_byte = len(self.bits), -1
        bits = self.bits
        for off, n in ranges:
            if n <= 0:
                continue
            first, last = off // self.region, min(self.count - 1, (off + n - 1) // self.region)
            for i in range(first, last + 1):
                b, m = i >> 3, 1 << (i & 7)
                if not bits[b] & m:
                    bits[b] |= m
                    self.regions_set += 1
                    lo_byte, hi_byte = min(lo_byte, b), max(hi_byte, b)
        if hi_byte < 0:
            return False
        os.pwrite(self._fd, bytes(bits[lo_byte:hi_byte + 1]), _HEAD.size + lo_byte)
        os.fdatasync(self._fd)
        return True

    def mark_all(self) -> None:
        self.mark([(0, self.size)])

    def clear(self) -> None:
        self.bits = bytearray(len(self.bits))
        self.regions_set = 0
        os.pwrite(self._fd, bytes(self.bits), _HEAD.size)
        os.fdatasync(self._fd)

    def dirty_bytes(self) -> int:
        """What a resync copies now (the last region may be short: an upper bound)."""
        return min(self.size, self.regions_set * self.region)


def runs(bits: bytes, region: int, size: int, start: int = 0) -> Iterator[tuple[int, int]]:
    """``(offset, length)`` of each run of set bits at or after ``start``, cut at ``size``."""
    count = (size + region - 1) // region
    i = start // region
    while i < count:
        if not bits[i >> 3] & (1 << (i & 7)):
            if not bits[i >> 3] and not i & 7:
                i += 8  # a clean byte: eight regions at once
                continue
            i += 1
            continue
        j = i
        while j < count and bits[j >> 3] & (1 << (j & 7)):
            j += 1
        lo, hi = max(start, i * region), min(size, j * region)
        if hi > lo:
            yield lo, hi - lo
        i = j
