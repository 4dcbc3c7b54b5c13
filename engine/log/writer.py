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
* A failed batch (EIO) is cut from the log file again before anything else is appended,
  so the log never carries a torn record in its middle; its requests get an error, nothing
  acknowledged is touched.
* Emergency mode (the MARS directory is full): the logger stops logging and *writes through*,
  so the application keeps running. The current log file is finished first, the device synced
  and the replay position set to the log's end, so no recovery ever replays an older record over
  a written-through one; then each batch sets its regions in the dirty-region map (durably),
  goes to the device, and is acknowledged after the device's fdatasync. A batch that meets
  ENOSPC in the log is cut back and goes this way at once: the writer never fails a client
  because /mars is full, and never acknowledges what is not on disk. Leaving it, logging goes on
  in a new log file; the map tells the secondaries' resync what to copy (log/dirtymap.py).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..device import DataDevice
from .dirtymap import DirtyMap
from ..stats import ResourceStats
from ..tree import Tree
from . import format as lf
from .apply import IOV_MAX, MAX_BATCH_BYTES, apply_records, pwritev_all
from .files import VersionHasher, version_path
from .values import LogPos, Version, first_record, log_name

log = logging.getLogger("mars.logger")

#: Bytes written back between two starts of the data device's writeout (write-behind): small
#: enough that the next checkpoint's fdatasync finds little to flush, large enough that small
#: random writes share one sync_file_range.
WRITE_BEHIND = 4 * 2**20
#: Bytes at the end of the log kept in the page cache for fetchers (see Logger._drop_behind),
#: and how much more is written before the next drop.
LOG_CACHED = 64 * 2**20
LOG_DROP_STEP = 8 * 2**20

#: Called on the event loop once a request is durable and written back (``None``) or has failed,
#: with the ``token`` it was submitted with. A callback, not a future per request: at tens of
#: thousands of writes a second a future, its done-callback and the loop's scheduling of that
#: callback were a large part of marsd's CPU per write (issue 17).
Done = Callable[[object, BaseException | None], None]


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
    done: Done
    token: object
    submitted_ns: int  # monotonic: the acknowledged-write latency starts here


@dataclass(slots=True)
class _Committed:
    """What the log thread hands the write-back thread, in order: a logged batch, a batch to
    write through (``direct``), or a switch of emergency mode (``switch``, with the log state)."""

    batch: list[_Pending]  # also what the write-back applies: a _Pending has a record's fields
    pos: LogPos
    direct: bool = False
    switch: bool | None = None
    state: LogState | None = None


@dataclass(slots=True)
class LogState:
    """Where the current log file stands; owned by the logger task once it runs."""

    seq: int  # number of the current log file
    path: Path
    end: int  # bytes of good records in it
    next_record: int  # sequence number of the next record
    hasher: VersionHasher
    prev_version: Version | None  # version-<seq-1>-<host>, the chain's previous link
    records: int = 0
    bytes_written: int = field(default=0)


class Logger:
    """Drives the write path with two threads, each fed by a queue and each strictly in order.

    The log thread takes whatever is queued the moment its previous fdatasync returns, so the
    next group commit starts without a round trip through the event loop; the write-back thread
    applies committed batches to the device and hands each batch's acknowledgement to the event
    loop in one call. Append+fdatasync of batch N+1 overlaps the write-back of batch N, and the
    device still receives the writes in log order.
    """

    def __init__(self, res: str, tree: Tree, device: DataDevice, state: LogState,
                 on_progress: Callable[[LogPos], None] | None = None, stats: ResourceStats | None = None,
                 dirtymap: DirtyMap | None = None, writethrough: bool = False,
                 switched: Callable[[bool, LogState], None] | None = None) -> None:
        self.res = res
        self.tree = tree
        self.device = device
        self.state = state
        self.on_progress = on_progress
        self.stats = stats or ResourceStats()
        self.acked = LogPos(state.seq, state.end, tree.host)
        self.batches = 0
        self.requests = 0
        self._fd = os.open(state.path, os.O_WRONLY | os.O_CLOEXEC)
        # A plain lock under the condition (not the default RLock), and the log thread says when
        # it waits: submit() then notifies only a thread that sleeps. Condition.notify builds a
        # deque even when nobody waits, and submit runs once per write (issue 17).
        self._cond = threading.Condition(threading.Lock())
        self._log_waits = False  # guarded by _cond
        self._queue: deque[_Pending] = deque()  # guarded by _cond
        self._rotate_to: int | None = None  # guarded by _cond
        self._asked = state.seq  # the newest file a rotation was asked for; guarded by _cond
        self._closing = False  # guarded by _cond
        self._committed: queue.SimpleQueue[_Committed | None] = queue.SimpleQueue()
        # Emergency mode. The map is the log thread's (marks) and the write-back thread's (never);
        # _wt is the log thread's mode, _wt_asked what the event loop asked for (under _cond),
        # writethrough what the event loop sees (set on it when the log thread switched).
        self.dirtymap = dirtymap
        self.switched = switched  # called in the write-back thread once a switch is on disk
        self._wt = writethrough
        self._wt_asked = writethrough  # guarded by _cond
        self.writethrough = writethrough
        self.writethrough_bytes = 0
        self._switch_failed: OSError | None = None  # the write-back thread's: see _writeback_thread
        # Write-behind, the write-back thread's: the range written since the last start of a writeout.
        self._behind_lo, self._behind_hi, self._behind_bytes = 0, 0, 0
        self._cached_from = 0  # the log thread's: the current log file is dropped from the cache below this
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: asyncio.Future[None] | None = None
        self._threads = [threading.Thread(target=self._log_thread, name=f"log-{res}", daemon=True),
                         threading.Thread(target=self._writeback_thread, name=f"writeback-{res}", daemon=True)]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._finished = self._loop.create_future()
        for t in self._threads:
            t.start()

    def submit(self, kind: lf.Kind, offset: int, length: int, flags: int, payload: bytes | memoryview,
               done: Done, token: object) -> None:
        """Queue one request; ``done(token, None)`` is called on the event loop once it is durable
        and written back, ``done(token, error)`` if it cannot be (never before this returns)."""
        assert self._loop is not None
        with self._cond:
            if not self._closing:
                self._queue.append(_Pending(kind, offset, length, flags, payload, done, token, time.monotonic_ns()))
                if self._log_waits:
                    self._log_waits = False
                    self._cond.notify()
                return
        self._loop.call_soon(done, token, LogWriteError(errno.ESHUTDOWN, f"resource {self.res}: logger is shutting down"))

    def request_rotate(self, seq: int) -> None:
        """Switch to log file ``seq`` (created empty by marsadm log-rotate) once the queue is empty."""
        with self._cond:
            # Compare with the newest file asked for so far, not only the current one: a request
            # repeated while the log thread is still switching must not switch a second time.
            if seq > max(self.state.seq, self._asked):
                self._rotate_to = self._asked = seq
                self._cond.notify()

    def request_writethrough(self, on: bool) -> None:
        """Enter (True) or leave (False) emergency mode between two batches, in request order."""
        with self._cond:
            if on and self.dirtymap is None:
                return
            self._wt_asked = on
            self._cond.notify()

    async def close(self) -> None:
        """Finish the queued requests, then stop; new submissions fail with ESHUTDOWN."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._finished is not None:
            await self._finished
        os.close(self._fd)

    # -- the two threads -----------------------------------------------------------------------

    def _log_thread(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and self._rotate_to is None and not self._closing \
                            and self._wt_asked == self._wt:
                        self._log_waits = True
                        self._cond.wait()
                    self._log_waits = False
                    batch = self._take_batch()
                    rotate = None
                    if not self._queue and self._rotate_to is not None and not self._wt:
                        rotate, self._rotate_to = self._rotate_to, None
                    wt = self._wt_asked
                    if not batch and rotate is None and self._closing and wt == self._wt:
                        break
                if wt != self._wt:
                    self._switch(wt)
                if batch and self._wt:
                    self._write_through(batch)
                elif batch:
                    try:
                        pos = self._append(batch)
                    except LogWriteError as e:
                        if e.errno == errno.ENOSPC and self.dirtymap is not None:
                            # /mars is full: this batch, and what follows, is written through.
                            log.error("resource %s: the MARS directory is full (%s); writing through "
                                      "to the data device, emergency mode", self.res, e)
                            with self._cond:
                                self._wt_asked = True
                            self._switch(True)
                            self._write_through(batch)
                        else:
                            self._call(self._fail, batch, e)
                    else:
                        self._committed.put(_Committed(batch, pos))
                if rotate is not None:
                    try:
                        self._rotate(rotate)
                    except (LogWriteError, OSError) as e:
                        log.error("resource %s: cannot rotate to log %d: %s", self.res, rotate, e)
                    else:
                        self._committed.put(_Committed([], LogPos(self.state.seq, 0, self.tree.host)))
        finally:
            self._committed.put(None)

    def _switch(self, on: bool) -> None:
        """In the log thread, between batches: enter or leave write-through. Leaving opens the
        next log file here, so the batches after it are logged again at once; the write-back
        thread makes the switch durable (device synced, replay position, the tree) before it
        applies anything that came after it."""
        self._wt = on
        if not on:
            try:
                self._rotate(self.state.seq + 1, finish=False)
            except (LogWriteError, OSError) as e:
                log.error("resource %s: cannot leave emergency mode, no new log file: %s", self.res, e)
                self._wt = True
                with self._cond:
                    self._wt_asked = True
                return
        self._committed.put(_Committed([], LogPos(self.state.seq, self.state.end, self.tree.host),
                                       switch=on, state=self.state))
        self._call(self._mode, on)

    def _write_through(self, batch: list[_Pending]) -> None:
        """In the log thread, emergency mode: the batch's regions into the map (durable), then on
        to the write-back thread, which writes and syncs the device before acknowledging."""
        assert self.dirtymap is not None
        try:
            self.dirtymap.mark((p.offset, p.length) for p in batch)
        except OSError as e:
            self._call(self._fail, batch, LogWriteError(e.errno or errno.EIO,
                                                        f"resource {self.res}: cannot record the written regions "
                                                        f"in {self.dirtymap.path.name}: {e.strerror}"))
            return
        self._committed.put(_Committed(batch, LogPos(self.state.seq, self.state.end, self.tree.host), direct=True))

    def _writeback_thread(self) -> None:
        while (item := self._committed.get()) is not None:
            try:
                if item.switch is not None:
                    self._switch_failed = None
                    try:
                        self.device.fdatasync()  # everything logged before is on the device now
                        if self.switched is not None and item.state is not None:
                            self.switched(item.switch, item.state)
                    except OSError as e:
                        # Without the replay position at the log's end a recovery could replay
                        # old records over written-through blocks: write nothing through then.
                        log.error("resource %s: cannot record the switch of emergency mode: %s; writes fail "
                                  "until it can", self.res, e)
                        self._switch_failed = e if item.switch else None
                    continue
                if item.direct and self._switch_failed is not None:
                    raise LogWriteError(self._switch_failed.errno or errno.ENOSPC,
                                        f"resource {self.res}: the MARS directory is full and emergency mode "
                                        f"could not be recorded: {self._switch_failed.strerror}")
                self._write_back(item.batch)
                if item.direct:
                    self.device.fdatasync()  # not in any log: acknowledged only once on the device
                    self.writethrough_bytes += sum(p.length for p in item.batch)
            except (LogWriteError, OSError) as e:
                if not isinstance(e, LogWriteError):
                    log.error("resource %s: write-back: %s", self.res, e)
                    e = LogWriteError(e.errno or errno.EIO, f"resource {self.res}: data device: {e.strerror}")
                self._call(self._fail, item.batch, e)
            else:
                self._call(self._acknowledge, item.batch, item.pos)
        self._call(self._finish)

    def _mode(self, on: bool) -> None:
        self.writethrough = on
        if self.on_progress:
            self.on_progress(self.acked)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone (process exit): nobody waits for the answer
            pass

    # -- on the event loop ---------------------------------------------------------------------

    def _acknowledge(self, batch: list[_Pending], pos: LogPos) -> None:
        now = time.monotonic_ns()
        for p in batch:
            p.done(p.token, None)
        self.stats.write_latency.observe_since(now, [p.submitted_ns for p in batch])
        if batch:
            self.stats.group_commits += 1
            self.stats.log_records += len(batch)
        self.batches += 1 if batch else 0
        self.requests += len(batch)
        self.acked = pos
        if self.on_progress:
            self.on_progress(pos)

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for p in batch:
            p.done(p.token, exc)

    def _finish(self) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_result(None)

    def _take_batch(self) -> list[_Pending]:
        """Everything queued, up to the iovec and size limits of one pwritev (caller holds _cond)."""
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

    def _append(self, batch: list[_Pending]) -> LogPos:
        """Log stage, in the log thread: append and fdatasync. Raises LogWriteError. The batch
        itself goes on to the write-back: its entries carry what a record applies (apply.py)."""
        st = self.state
        seq = st.next_record
        bufs, checks = lf.encode_batch(batch, seq, self.tree.clock.reserve(len(batch)))
        start = st.end
        try:
            written = pwritev_all(self._fd, bufs, start)
            os.fdatasync(self._fd)
        except OSError as e:
            self._cut(start)
            raise LogWriteError(e.errno or errno.EIO,
                                f"resource {self.res}: cannot append to {st.path.name}: {e.strerror}") from None
        # Durable: now the chain and the device may move on.
        st.hasher.update_checks(checks)
        st.end = start + written
        st.next_record = seq + len(batch)
        st.records += len(batch)
        st.bytes_written += written
        self.stats.log_bytes += written
        if st.end - self._cached_from >= LOG_CACHED + LOG_DROP_STEP:
            self._drop_behind(st.end - LOG_CACHED)
        return LogPos(st.seq, st.end, self.tree.host)

    def _drop_behind(self, upto: int) -> None:
        """Drop the durable log below ``upto`` from the page cache. The log is written once and
        read again only by fetchers, nearly always within the last LOG_CACHED bytes; left
        cached, every appended byte takes a fresh page, which on a virtual machine cost several
        times the copy itself (sequential 1 MiB writes: most of marsd's system time, issue 17).
        Dropped pages are reused at once, warm; they are clean (fdatasync'd), so nothing waits."""
        try:
            os.posix_fadvise(self._fd, self._cached_from, upto - self._cached_from, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # advice only
        self._cached_from = upto

    def _write_back(self, records: list[_Pending]) -> None:
        """Write-back stage, in its own thread: the records go to the device's page cache."""
        try:
            lo, hi = apply_records(self.device, records)
            if hi > lo:
                # Start the writeout once WRITE_BEHIND bytes are written, not per batch: under
                # small random writes one sync_file_range per group commit cost more CPU (a
                # virtqueue kick per call here) than the writes themselves (issue 17).
                if self._behind_bytes:
                    lo, hi = min(lo, self._behind_lo), max(hi, self._behind_hi)
                self._behind_bytes += sum(r.length for r in records)
                if self._behind_bytes >= WRITE_BEHIND:
                    self.device.start_writeout(lo, hi - lo)
                    self._behind_bytes = 0
                else:
                    self._behind_lo, self._behind_hi = lo, hi
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

    def _rotate(self, seq: int, finish: bool = True) -> None:
        """Finish the current log file with its version entry and continue in ``seq``
        (``finish`` False: it was finished already, when emergency mode began)."""
        st = self.state
        if seq <= st.seq:
            return  # already there: a finished file must never be finished twice
        value = finish_version(self.tree, self.res, st) if finish else (
            Version.parse(self.tree.get(version_path(self.res, st.seq, self.tree.host)))
            or finish_version(self.tree, self.res, st))
        new_path = st.path.parent / log_name(seq, self.tree.host)
        fd = os.open(new_path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(self._fd)
        self._fd = fd
        self._cached_from = 0
        end = os.lseek(fd, 0, os.SEEK_END)
        if end:
            raise LogWriteError(errno.EEXIST, f"resource {self.res}: new log file {new_path.name} is not empty")
        self.state = LogState(seq=seq, path=new_path, end=0, next_record=first_record(seq),
                              hasher=VersionHasher(value.digest), prev_version=value)
        log.info("resource %s: rotated to %s", self.res, new_path.name)


def finish_version(tree: Tree, res: str, st: LogState) -> Version:
    """Write ``version-<seq>-<host>`` for a log file that takes no more records."""
    value = Version.of(st.hasher.hexdigest(), st.seq, tree.host, st.end, st.prev_version)
    tree.set(version_path(res, st.seq, tree.host), value)
    return value
