"""The primary's write path: log append with group commit, then write-back, then acknowledge.

Invariants, and why:

* A write is acknowledged only after its record is in the log *and* the log is fdatasync'd: an
  acknowledged write survives any crash, and secondaries will see it in the same total order.
* The data device is written only after the log is durable: the data device never holds a write
  the log does not have, so "data device = replay of the log" holds after every crash.
* The data device is written before the acknowledgement, into the page cache: reads are plain
  reads of the device and always return the latest acknowledged data, with no overlay to keep.
* Group commit: every request that arrives while a batch is being made durable joins the next
  batch, so one ``pwritev`` + one ``fdatasync`` serve all concurrent writers. Under a queue depth
  of 32 that turns ~3k synced writes/s into tens of thousands.
* A failed batch (ENOSPC, EIO) is cut from the log file again before anything else is appended,
  so the log never carries a torn record in its middle; its requests get an error, nothing
  acknowledged is touched.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import logformat as lf
from .device import DataDevice
from .logfiles import LogPos, VersionHasher, log_name, version_path, version_value
from .tree import Tree

log = logging.getLogger("mars.logger")

IOV_MAX = 1024
MAX_BATCH_BYTES = 64 * 2**20


class LogWriteError(Exception):
    """A batch could not be made durable; ``errno`` says why (ENOSPC for a full /mars)."""

    def __init__(self, err: int, text: str) -> None:
        super().__init__(text)
        self.errno = err


@dataclass(slots=True)
class _Pending:
    kind: lf.Kind
    offset: int
    length: int
    flags: int
    payload: bytes | memoryview
    future: asyncio.Future[None]


@dataclass(slots=True)
class LogState:
    """Where the current log file stands; owned by the logger task once it runs."""

    seq: int  # number of the current log file
    path: Path
    end: int  # bytes of good records in it
    next_record: int  # sequence number of the next record
    hasher: VersionHasher
    prev_version: str | None  # value of version-<seq-1>-<host>, the chain's previous link
    records: int = 0
    bytes_written: int = field(default=0)


class Logger:
    def __init__(self, res: str, tree: Tree, device: DataDevice, state: LogState,
                 on_progress: Callable[[LogPos], None] | None = None) -> None:
        self.res = res
        self.tree = tree
        self.device = device
        self.state = state
        self._queue: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._fd = os.open(state.path, os.O_WRONLY | os.O_CLOEXEC)
        # One thread per stage: a stage's work is strictly ordered, and the two stages overlap.
        self._log_pool = ThreadPoolExecutor(1, thread_name_prefix=f"log-{res}")
        self._wb_pool = ThreadPoolExecutor(1, thread_name_prefix=f"writeback-{res}")
        self._writebacks: set[asyncio.Future[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._rotate_to: int | None = None
        self._closing = False
        self.on_progress = on_progress
        self.acked = LogPos(state.seq, state.end)
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"logger-{self.res}")

    def submit(self, kind: lf.Kind, offset: int, length: int, flags: int = 0,
               payload: bytes | memoryview = b"") -> asyncio.Future[None]:
        """Queue one request; the future resolves once it is durable and written back."""
        fut = asyncio.get_running_loop().create_future()
        if self._closing:
            fut.set_exception(LogWriteError(errno.ESHUTDOWN, f"resource {self.res}: logger is shutting down"))
            return fut
        self._queue.append(_Pending(kind, offset, length, flags, payload, fut))
        self._wake.set()
        return fut

    def request_rotate(self, seq: int) -> None:
        """Switch to log file ``seq`` (created empty by marsadm log-rotate) after the current batch."""
        if seq > self.state.seq:
            self._rotate_to = seq
            self._wake.set()

    async def close(self) -> None:
        """Finish the queued requests, then stop; new submissions fail with ESHUTDOWN."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        os.close(self._fd)
        self._log_pool.shutdown()
        self._wb_pool.shutdown()

    async def _run(self) -> None:
        """Two stages, each in its own thread and each strictly in order: append+fdatasync of
        batch N+1 overlaps the write-back of batch N, and a batch is acknowledged when its
        write-back is done. Ordering per stage keeps the device updates in log order."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue and self._rotate_to is None:
                if self._closing:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = self._take_batch()
            if batch:
                try:
                    records, pos = await loop.run_in_executor(self._log_pool, self._append, batch)
                except LogWriteError as e:
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(e)
                else:
                    wb = loop.run_in_executor(self._wb_pool, self._write_back, records)
                    self._writebacks.add(wb)
                    wb.add_done_callback(lambda f, b=batch, pos=pos: self._acknowledge(f, b, pos))
            if self._rotate_to is not None and not self._queue:
                seq, self._rotate_to = self._rotate_to, None
                await loop.run_in_executor(self._log_pool, self._rotate, seq)
                await self._drain_writebacks()
                self.acked = LogPos(self.state.seq, self.state.end)
                if self.on_progress:
                    self.on_progress(self.acked)
        await self._drain_writebacks()

    async def _drain_writebacks(self) -> None:
        if self._writebacks:
            await asyncio.wait(list(self._writebacks))

    def _acknowledge(self, fut: asyncio.Future[None], batch: list[_Pending], pos: LogPos) -> None:
        self._writebacks.discard(fut)
        exc = fut.exception()
        for p in batch:
            if p.future.done():
                continue
            if exc is None:
                p.future.set_result(None)
            else:
                p.future.set_exception(exc)
        if exc is None:
            self.batches += 1
            self.requests += len(batch)
            self.acked = pos
            if self.on_progress:
                self.on_progress(pos)

    def _take_batch(self) -> list[_Pending]:
        """Everything queued, up to the iovec and size limits of one pwritev."""
        batch: list[_Pending] = []
        size = 0
        q = self._queue
        while q and len(batch) < IOV_MAX // 3:
            n = len(q[0].payload)
            if batch and size + n > MAX_BATCH_BYTES:
                break
            batch.append(q.popleft())
            size += n
        return batch

    def _append(self, batch: list[_Pending]) -> tuple[list[lf.LogRecord], LogPos]:
        """Log stage, in the log thread: append and fdatasync. Raises LogWriteError."""
        st = self.state
        clock = self.tree.clock
        bufs: list[bytes | memoryview] = []
        records: list[lf.LogRecord] = []
        seq = st.next_record
        for p in batch:
            rec = lf.LogRecord(seq=seq, lamport_ns=clock.now(), offset=p.offset, length=p.length,
                               kind=p.kind, flags=p.flags, payload=p.payload)
            records.append(rec)
            bufs.extend(lf.encode_record(rec))
            seq += 1
        start = st.end
        try:
            written = _pwritev_all(self._fd, bufs, start)
            os.fdatasync(self._fd)
        except OSError as e:
            self._cut(start)
            raise LogWriteError(e.errno or errno.EIO,
                                f"resource {self.res}: cannot append to {st.path.name}: {e.strerror}") from None
        # Durable: now the chain and the device may move on.
        for hdr in bufs[0::3]:
            st.hasher.update(lf.header_check(hdr))
        st.end = start + written
        st.next_record = seq
        st.records += len(records)
        st.bytes_written += written
        return records, LogPos(st.seq, st.end)

    def _write_back(self, records: list[lf.LogRecord]) -> None:
        """Write-back stage, in its own thread: the records go to the device's page cache."""
        try:
            for rec in records:
                apply_record(self.device, rec)
        except OSError as e:
            # The log has the writes, so they are not lost; the device gets them by replay.
            log.error("resource %s: data device write failed: %s", self.res, e.strerror)
            raise LogWriteError(errno.EIO, f"resource {self.res}: data device write failed: {e.strerror}") from None

    def _cut(self, offset: int) -> None:
        try:
            os.ftruncate(self._fd, offset)
            os.fdatasync(self._fd)
        except OSError as e:
            log.error("resource %s: cannot cut %s back to %d after a failed append: %s",
                      self.res, self.state.path.name, offset, e.strerror)

    def _rotate(self, seq: int) -> None:
        """Finish the current log file with its version entry and continue in ``seq``."""
        st = self.state
        value = finish_version(self.tree, self.res, st)
        new_path = st.path.parent / log_name(seq, self.tree.host)
        fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(self._fd)
        self._fd = fd
        end = os.lseek(fd, 0, os.SEEK_END)
        if end:
            raise LogWriteError(errno.EEXIST, f"resource {self.res}: new log file {new_path.name} is not empty")
        self.state = LogState(seq=seq, path=new_path, end=0, next_record=first_record(seq),
                              hasher=VersionHasher(value.split(",", 1)[0]), prev_version=value)
        log.info("resource %s: rotated to %s", self.res, new_path.name)


def first_record(file_seq: int) -> int:
    """Record numbers carry their log file's number in the upper 32 bits.

    So a record is tied to its file (a block of one file misplaced into another is caught by
    the sequence check), numbering restarts cleanly in every file, and the order of all records
    of a resource is still the order of their numbers.
    """
    return file_seq << 32


def finish_version(tree: Tree, res: str, st: LogState) -> str:
    """Write ``version-<seq>-<host>`` for a log file that takes no more records."""
    value = version_value(st.hasher.hexdigest(), st.seq, tree.host, st.end, st.prev_version)
    tree.set(version_path(res, st.seq, tree.host), value)
    return value


def apply_record(device: DataDevice, rec: lf.LogRecord) -> None:
    """Write one record to the data device; replaying twice gives the same result (idempotent)."""
    if rec.kind == lf.Kind.WRITE:
        device.pwrite(rec.payload, rec.offset)
    elif rec.kind == lf.Kind.TRIM:
        device.trim(rec.offset, rec.length)
    else:
        device.write_zeroes(rec.offset, rec.length, may_punch=not (rec.flags & lf.FLAG_NO_HOLE))


def _pwritev_all(fd: int, bufs: list[bytes | memoryview], offset: int) -> int:
    """pwritev until everything is written (short writes happen on signals and huge batches)."""
    total = 0
    views = [memoryview(b) for b in bufs if len(b)]
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
