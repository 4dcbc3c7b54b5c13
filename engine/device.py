"""The data device: a block device or an image file, accessed with blocking positional I/O.

All calls here block; marsd runs them in its small thread pool, never on the event loop.
Image files stay sparse: TRIM punches holes and WRITE_ZEROES zeroes ranges without writing pages,
which is what makes multi-terabyte image files cheap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
import threading
from pathlib import Path

from .errors import MarsError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WAIT_BEFORE = 0x1
SYNC_FILE_RANGE_WRITE = 0x2
SYNC_FILE_RANGE_WAIT_AFTER = 0x4
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
_ZERO_CHUNK = bytes(1 << 20)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2) with flags (os.posix_fallocate has none); False when the filesystem can't."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(e, os.strerror(e))


def device_size(path: str | os.PathLike[str]) -> int:
    """Size in bytes of an image file or block device."""
    st = os.stat(path)
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            return struct.unpack("Q", buf)[0]
        finally:
            os.close(fd)
    return st.st_size


class DataDevice:
    """An open data device. Block devices are opened O_EXCL so nothing else mounts them meanwhile."""

    def __init__(self, path: str | os.PathLike[str], res: str) -> None:
        self.path = Path(path)
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise MarsError(
                f"data device {self.path} does not exist",
                "create the image file or block device, or fix the data-<host> entry",
                subject=f"resource {res}",
            ) from None
        self.is_block = stat.S_ISBLK(st.st_mode)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if self.is_block else 0)
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            raise MarsError(
                f"cannot open data device {self.path}: {e.strerror}",
                "check that it exists, is writable and not mounted or in use elsewhere",
                subject=f"resource {res}",
            ) from None
        self._can_punch = True
        # Replay batches run in the thread pool; a cancelled replayer's batch may still be
        # running when a new one starts from the last checkpoint. Applying under one lock keeps
        # the older batch from landing after newer records.
        self.apply_lock = threading.Lock()

    def size(self) -> int:
        return device_size(self.path)

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:  # an image file shorter than the resource reads as zeros past its end
            data += bytes(length - len(data))
        return data

    def scan(self, offset: int, length: int, max_spans: int = 1 << 16) -> list[tuple[int, int, bool]]:
        """(start, end, hole) spans of [offset, offset+length), from SEEK_DATA/SEEK_HOLE.

        A block device reports no holes (all data); an image file's holes are what its
        filesystem has not allocated, page-cache data included (so a write-back not yet synced
        is data). Past the file's end (a resource grown beyond it) reads as zeros: a hole. At
        most ``max_spans`` spans: a fragmented file costs two lseeks a span, and the caller asks
        again where the answer stops.
        """
        end = offset + length
        if self.is_block or length <= 0:
            return [(offset, end, False)] if length > 0 else []
        size = os.fstat(self.fd).st_size
        out: list[tuple[int, int, bool]] = []
        pos = offset
        while pos < end and len(out) < max_spans:
            if pos >= size:
                out.append((pos, end, True))
                break
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:  # ENXIO: no data after pos
                    raise
                data = size
            if data > pos:
                stop = min(data, end)
                out.append((pos, stop, True))
                pos = stop
                continue
            hole = min(os.lseek(self.fd, pos, os.SEEK_HOLE), end)
            out.append((pos, hole, False))
            pos = hole
        return out

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def trim(self, offset: int, length: int) -> None:
        """Discard: on files a hole (reads as zeros), on block devices a punch where supported."""
        if length and self._can_punch:
            if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
                return
            self._can_punch = False
        # TRIM leaves contents unspecified; writing zeros keeps replicas byte-identical anyway.
        self.write_zeroes(offset, length, may_punch=False)

    def write_zeroes(self, offset: int, length: int, may_punch: bool = True) -> None:
        if not length:
            return
        if may_punch and self._can_punch:
            if _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
                return
        if _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.pwrite(memoryview(_ZERO_CHUNK)[:n], offset)
            offset += n

    def start_writeout(self, offset: int, length: int) -> None:
        """Start writing these pages to disk now, without waiting (sync_file_range WRITE).

        Write-behind: dirty pages of the data device otherwise pile up until the next checkpoint's
        fdatasync, which then flushes hundreds of MiB at once and stalls the log's own fdatasync
        behind it. Starting the writeout per batch keeps the disk queue short and even.
        """
        start_writeout(self.fd, offset, length)

    def drop_behind(self, offset: int, length: int) -> None:
        drop_behind(self.fd, offset, length)

    def fdatasync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def start_writeout(fd: int, offset: int, length: int) -> None:
    """sync_file_range WRITE: start writing these pages now, without waiting."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def drop_behind(fd: int, offset: int, length: int) -> None:
    """Wait until this range is on disk, then drop it from the page cache.

    For streams that are written once and not read again soon: a secondary's replayed log copy
    and its data device. Left in the cache, every byte takes a fresh page; on a virtual machine
    that page is often new to the host as well, and filling fresh pages cost several times the
    CPU of the copy itself here (4 GiB streamed: 5-8 s of system time kept, ~1 s dropped behind).
    Dropped pages are reused at once, warm. Nothing about durability changes: checkpoints still
    fdatasync. The caller keeps a window of recent chunks cached (the next reader of a log copy
    is the replayer, right behind the fetcher).
    """
    if length > 0:
        _libc.sync_file_range(fd, offset, length,
                              SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only: a file system without it keeps its cache
