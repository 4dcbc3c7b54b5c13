"""The primary's runtime of a resource: its data device, recovery, logger, NBD export and replay
checkpoints.

The runtime exists while the resource is attached on this node as its primary. It is the only
owner of the data device and the log files it appends to; marsadm talks to it through the tree
only.

Checkpoints: write-back goes to the device's page cache, so the replay position may advance only
after the device is synced. Every ``checkpoint_interval`` seconds (when anything changed) the device
is fdatasync'd and ``replay-<host>`` moves to the log position acknowledged before that sync began.
A crash replays from there; replaying a little too much is harmless because replay is idempotent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import threading
from typing import ClassVar

from ..device import DataDevice
from ..extents import ExtentCache, overlay_data, read_plan, to_nbd
from ..log import format as lf
from ..log.dirtymap import DirtyMap
from ..log.files import (dirtymap_file, list_logs, read_replay, read_writethrough, replay_path, version_path,
                         writethrough_path)
from ..log.recovery import recover
from ..log.values import LogPos, ReplayLink, log_name
from ..log.writer import Logger, LogState, LogWriteError, finish_version
from ..nbd import protocol as nbd
from ..nbd.server import Export, NbdSession, Reply
from ..tree import actual, res_dir
from .runtime import Attached, RuntimeDeps, Wanted

log = logging.getLogger("mars.resource")


class PrimaryRuntime(Attached):
    """The primary: serves the resource over NBD, logs every write, checkpoints the device."""

    role: ClassVar[str] = "primary"

    def __init__(self, deps: RuntimeDeps, res: str, data_path: str, size: int) -> None:
        super().__init__(deps, res, data_path, size)
        self.checkpoint_interval = deps.checkpoint_interval
        self.logger: Logger | None = None
        self.sessions: set[NbdSession] = set()
        self.info = nbd.ExportInfo(name=res, size=size, description=f"MARS resource {res}")
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._synced = LogPos()
        self._changed = asyncio.Event()
        self.serving = False
        self.dirtymap: DirtyMap | None = None
        self._clearing: asyncio.Future[None] | None = None
        # A checkpoint that read the acknowledged position before an emergency switch must not
        # write it after the switch set the replay position to the log's end: a recovery would
        # then replay old records over written-through blocks. The switch sets a floor.
        self._link_lock = threading.Lock()
        self._link_floor: tuple[int, int] = (0, 0)
        # Where the data is (NBD BLOCK_STATUS): one cached window of the device's spans, and the
        # writes, trims and write-zeroes submitted and not yet answered, by id(request): their
        # range and the session's reply (extents.py says why both).
        self.extent_cache = ExtentCache()
        self._mutating: dict[int, tuple[int, int, Reply]] = {}

    # -- the runtime interface -----------------------------------------------------------------

    @property
    def export(self) -> Export | None:
        return self if self.serving else None

    @property
    def open_count(self) -> int:
        return len(self.sessions)

    @property
    def syncing(self) -> bool:
        return False  # the primary is every sync's source, never a target

    @property
    def writing_through(self) -> bool:
        return self.logger is not None and self.logger.writethrough

    def follow(self, wanted: Wanted) -> None:
        """The primary neither syncs, fetches nor replays: it rotates its log when asked, and
        writes through while its MARS directory is at the last emergency level."""
        self.rotate_if_requested(self.deps.limits.logrot_auto)
        self.follow_space(wanted.level)

    # -- emergency mode ------------------------------------------------------------------------

    def follow_space(self, level: int) -> None:
        """Level 4: stop logging, write through. Back at level 0 (the hysteresis: the node came
        down one level per round): log again, in a new file. In between, nothing changes."""
        if self.logger is None:
            return
        if level >= 4 and not self.logger.writethrough:
            log.error("resource %s: the MARS directory is almost full; writing through to %s "
                      "(emergency mode), the secondaries resync afterwards", self.res, self.data_path)
            self.logger.request_writethrough(True)
        elif level == 0 and self.logger.writethrough:
            log.info("resource %s: space is back; logging again", self.res)
            self.logger.request_writethrough(False)
        elif not self.logger.writethrough:
            self._clear_if_resynced()

    def _switched(self, on: bool, st: LogState) -> None:
        """In the logger's write-back thread, once the device holds everything before the switch
        and before anything after it is written: the tree learns where the log stops or goes on.

        Entering: the entry first (a crash right after must come up writing through), then the
        finished file's version, then the replay position at the log's end, so no recovery
        replays an old record over a written-through block. A resync of an earlier emergency
        that some secondary has not finished keeps its boundary, and the logged writes since
        it go into the map too: the map then covers everything since that boundary.
        """
        t, h, path = self.tree, self.tree.host, writethrough_path(self.res, self.tree.host)
        old = read_writethrough(t, self.res, h)
        if on:
            if old is not None and old[1] and self.dirtymap is not None:
                self._mark_logged(old[1], st.seq)
            t.set(path, f"{old[0] if old else st.seq}:0")
            if t.get(version_path(self.res, st.seq, h)) is None:
                finish_version(t, self.res, st)
            self._set_link_floor(LogPos(st.seq, st.end, h))
            log.warning("resource %s: writing through from the end of %s", self.res, st.path.name)
        else:
            self._set_link_floor(LogPos(st.seq, 0, h))
            t.set(f"{res_dir(self.res)}/maxnr", st.seq)
            t.set(path, f"{old[0] if old else st.seq - 1}:{st.seq}")
            log.info("resource %s: logging again in %s; the secondaries resync %s of %s", self.res,
                     st.path.name, _mib(self.dirtymap.dirty_bytes() if self.dirtymap else self.size), self.data_path)
        self.deps.log_pulse.fire()

    def _mark_logged(self, first: int, last: int) -> None:
        """Add the regions of our logged records in files ``first``..``last`` to the map."""
        assert self.dirtymap is not None
        ranges: list[tuple[int, int]] = []
        for f in list_logs(self.tree, self.res):
            if first <= f.seq <= last and f.origin == self.tree.host:
                f.scan(lambda d: ranges.append((d.record.offset, d.record.length)))
        self.dirtymap.mark(ranges)

    def _clear_if_resynced(self) -> None:
        """Once every member has synced the map's regions and replays beyond the boundary, the
        map and its entry go: the next emergency starts a map of its own."""
        wt = read_writethrough(self.tree, self.res, self.tree.host)
        if wt is None or not wt[1] or self._clearing is not None:
            return
        d = res_dir(self.res)
        for h in self.tree.members(self.res):
            if h == self.tree.host:
                continue
            link = read_replay(self.tree, self.res, h)
            if self.tree.get_int(f"{d}/syncstatus-{h}") < self.size or link is None or link.seq < wt[1]:
                return
        loop = asyncio.get_running_loop()
        self._clearing = loop.run_in_executor(self.executor, self._clear_map, wt)
        self._clearing.add_done_callback(lambda _f: setattr(self, "_clearing", None))

    def _clear_map(self, wt: tuple[int, int]) -> None:
        if read_writethrough(self.tree, self.res, self.tree.host) != wt:
            return
        if self.dirtymap is not None:
            self.dirtymap.clear()
        self.tree.delete(writethrough_path(self.res, self.tree.host))
        log.info("resource %s: every secondary resynced after the emergency; dirty-region map cleared", self.res)

    def dirty_bits(self) -> tuple[int, int, bytes] | None:
        """The map for a secondary's resync: region size, device size, bits; None without one."""
        if self.dirtymap is None or read_writethrough(self.tree, self.res, self.tree.host) is None:
            return None
        return self.dirtymap.region, self.dirtymap.size, bytes(self.dirtymap.bits)

    def publish(self) -> None:
        if self.logger is not None:
            # The end of the acknowledged log: what secondaries converge to.
            self.tree.set(actual(self.res, self.tree.host, "log-pos"), self.logger.acked, durable=False)
            self.tree.set(actual(self.res, self.tree.host, "writethrough-bytes"), self.logger.writethrough_bytes,
                          durable=False)
            if self.dirtymap is not None:
                self.tree.set(actual(self.res, self.tree.host, "dirty-bytes"), self.dirtymap.dirty_bytes(),
                              durable=False)

    def servable(self, name: str) -> int | None:
        """Of our own current log file, only what is durable and acknowledged."""
        if self.logger is None:
            return None
        acked = self.logger.acked
        return acked.offset if acked.name == name else None

    def grow(self, size: int) -> bool:
        """New NBD connections see the new size; those open keep the size they negotiated (NBD
        cannot tell a client its device grew), so a client reconnects to use the new region.

        The dirty-region map grows first: a write in the new region that it could not record
        would be missed by the resync after an emergency. While writing through it waits (the
        map in use is the record of that emergency; marsadm resize refuses then anyway).
        """
        if self.writing_through:
            if self._grow_refused != size:
                log.warning("resource %s: not growing to %d bytes while writing through (emergency mode); "
                            "it grows once logging resumes", self.res, size)
                self._grow_refused = size
            return False
        if self.dirtymap is not None and self.dirtymap.size < size:
            try:
                bigger = DirtyMap(self.dirtymap.path, size)  # keeps the bits it has, allocates the rest
            except OSError as e:
                log.error("resource %s: cannot grow the dirty-region map to %d bytes (%s); staying at %d bytes",
                          self.res, size, e.strerror, self.size)
                return False
            old, self.dirtymap = self.dirtymap, bigger
            if self.logger is not None:
                self.logger.dirtymap = bigger
            old.close()
        if not super().grow(size):
            return False
        self.info = dataclasses.replace(self.info, size=size)
        self.extent_cache.invalidate()
        return True

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the device and recover; raises MarsError (LogDamage among them) and stays closed."""
        loop = asyncio.get_running_loop()
        self.device = await loop.run_in_executor(self.executor, DataDevice, self.data_path, self.res)
        try:
            result = await loop.run_in_executor(self.executor, recover, self.tree, self.res, self.device)
        except BaseException:
            self.device.close()
            self.device = None
            raise
        if result.replayed_records:
            log.info("resource %s: recovery replayed %d records (%d bytes) onto %s", self.res,
                     result.replayed_records, result.replayed_bytes, self.data_path)
        if result.cut is not None:
            self.tree.set(actual(self.res, self.tree.host, "msg-warn-torn-tail"), str(result.cut))
        self.dirtymap = await loop.run_in_executor(self.executor, self._open_map)
        writethrough = await loop.run_in_executor(self.executor, self._resume_writethrough, result.state)
        self.logger = Logger(self.res, self.tree, self.device, result.state,
                             on_progress=self._progress, stats=self.deps.stats, dirtymap=self.dirtymap,
                             writethrough=writethrough, switched=self._switched)
        self.logger.start()
        self._synced = LogPos(result.state.seq, result.state.end, self.tree.host)
        self._checkpoint_task = loop.create_task(self._checkpoints(), name=f"checkpoint-{self.res}")
        self.serving = True

    def _open_map(self) -> DirtyMap | None:
        """The map, its blocks allocated now: when it is needed /mars is full. Without one (no
        space even for that) a full /mars fails the writes instead of writing through."""
        try:
            return DirtyMap(dirtymap_file(self.tree, self.res, self.tree.host), self.size)
        except OSError as e:
            log.error("resource %s: no dirty-region map (%s): if the MARS directory runs full, writes fail "
                      "instead of going through to the device", self.res, e.strerror)
            return None

    def _resume_writethrough(self, st: LogState) -> bool:
        """After a crash in emergency mode: whether to go on writing through (the log had not
        gone on yet), and finishing what the crash interrupted of the switch either way."""
        wt = read_writethrough(self.tree, self.res, self.tree.host)
        if wt is None or wt[1] or self.dirtymap is None:
            return False
        if st.seq > wt[0]:  # it had opened the next log file: it was leaving
            self.tree.set(writethrough_path(self.res, self.tree.host), f"{wt[0]}:{wt[0] + 1}")
            return False
        self._switched(True, st)
        return True

    async def stop(self, finish: bool = False) -> None:
        """Stop serving, drain the logger, sync and record the final replay position.

        New requests fail at once; those already queued are made durable and answered before
        the connections close (a client that flushed has its writes). ``finish``: this node is
        no longer the designated primary, so its current log file takes no more records and
        gets its version entry, which tells the new primary where the old history ends.
        """
        self.serving = False
        if self.logger is not None:
            await self.logger.close()
        for s in list(self.sessions):
            s.close()
        if self._checkpoint_task is not None:
            self._checkpoint_task.cancel()
            try:
                await self._checkpoint_task
            except asyncio.CancelledError:
                pass
        if self.device is not None and self.logger is not None:
            await self._checkpoint()
            if finish:
                await asyncio.get_running_loop().run_in_executor(self.executor, self._finish, self.logger)
                self.deps.log_pulse.fire()  # a fetch long-polling at our end learns it is the end
        if self.device is not None:
            self.device.close()
            self.device = None
        if self.dirtymap is not None:
            self.dirtymap.close()
            self.dirtymap = None

    def _finish(self, logger: Logger) -> None:
        """The end of this node's history as primary: the version of its last file, and its data
        device as the complete copy of that history (it syncs from nobody when it follows)."""
        st = logger.state
        if self.tree.get(version_path(self.res, st.seq, self.tree.host)) is None:
            finish_version(self.tree, self.res, st)
        self.tree.set(actual(self.res, self.tree.host, "log-pos"), logger.acked, durable=False)
        self.tree.set(f"{res_dir(self.res)}/syncstatus-{self.tree.host}", self.size)
        # Restamped even if it said 0 already: the new primary waits for a report newer than its ask.
        self.tree.set(actual(self.res, self.tree.host, "is-primary"), 0, durable=False, restamp=True)
        log.info("resource %s: no longer primary; %s finished at %d bytes", self.res, st.path.name, st.end)

    def _progress(self, pos: LogPos) -> None:
        self._changed.set()
        self.deps.log_pulse.fire()  # a peer's fetch long-polling at our log end goes on at once

    def rotate_if_requested(self, auto_bytes: int = 0) -> None:
        """Switch to a newer log file: one marsadm log-rotate created, or one we create because
        the current file has grown past ``auto_bytes`` (automatic rotation; 0 = off)."""
        if self.logger is None:
            return
        own = [f for f in list_logs(self.tree, self.res) if f.origin == self.tree.host]
        cur = self.logger.state
        if auto_bytes and own and own[-1].seq == cur.seq and cur.end >= auto_bytes:
            nxt = cur.path.parent / log_name(cur.seq + 1, self.tree.host)
            nxt.touch(mode=0o600)
            self.tree.set(f"{res_dir(self.res)}/maxnr", cur.seq + 1)
            log.info("resource %s: %s reached %d bytes; rotating", self.res, cur.path.name, cur.end)
            own = [f for f in list_logs(self.tree, self.res) if f.origin == self.tree.host]
        if own and own[-1].seq > cur.seq:
            self.logger.request_rotate(own[-1].seq)

    # -- checkpoints ---------------------------------------------------------------------------

    async def _checkpoints(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self._checkpoint()
            await asyncio.sleep(self.checkpoint_interval)  # a minimum interval, not synchronisation

    async def _checkpoint(self) -> None:
        assert self.logger is not None and self.device is not None
        pos = self.logger.acked
        if pos == self._synced:
            return
        await asyncio.get_running_loop().run_in_executor(self.executor, self._sync_and_record, pos)
        self._synced = pos

    def _sync_and_record(self, pos: LogPos) -> None:
        assert self.device is not None
        self.device.fdatasync()
        with self._link_lock:
            if (pos.seq, pos.offset) >= self._link_floor:
                # Durable, as a secondary's (log/replayer.py): log deletion relies on it.
                self.tree.set(replay_path(self.res, self.tree.host), ReplayLink.at(pos))

    def _set_link_floor(self, pos: LogPos) -> None:
        """The replay position after an emergency switch (durable), and never below it again."""
        with self._link_lock:
            self._link_floor = (pos.seq, pos.offset)
            self.tree.set(replay_path(self.res, self.tree.host), ReplayLink.at(pos))

    # -- the NBD export ------------------------------------------------------------------------

    def opened(self, session: NbdSession) -> None:
        self.sessions.add(session)
        self.publish_open_count()

    def closed(self, session: NbdSession) -> None:
        self.sessions.discard(session)
        self.publish_open_count()

    def publish_open_count(self) -> None:
        self.tree.set(actual(self.res, self.tree.host, "open-count"), len(self.sessions), durable=False)

    def handle(self, req: nbd.Request, done: Reply) -> None:
        logger = self.logger
        if not self.serving or logger is None or self.device is None:
            done(req, OSError(errno.ESHUTDOWN, f"resource {self.res} is shutting down"))
            return
        cmd = req.cmd
        self.deps.stats.request(COUNTED.get(cmd, "flush"), req.length)
        if cmd == nbd.Cmd.WRITE:
            logger.submit(lf.Kind.WRITE, req.offset, req.length, req.flags & nbd.CMD_FLAG_FUA, req.data or b"",
                          self._mutation(req, done), req)
        elif cmd == nbd.Cmd.READ:
            pieces = self._read_cached(req.offset, req.length)
            if pieces is not None:
                self._count_read(pieces)
                done(req, None, pieces)
                return
            fut = asyncio.get_running_loop().run_in_executor(self.executor, self._read, req.offset, req.length)
            fut.add_done_callback(lambda f: self._read_done(req, done, f))
        elif cmd == nbd.Cmd.TRIM:
            logger.submit(lf.Kind.TRIM, req.offset, req.length, req.flags & nbd.CMD_FLAG_FUA, b"",
                          self._mutation(req, done), req)
        elif cmd == nbd.Cmd.WRITE_ZEROES:
            flags = (lf.FLAG_FUA if req.flags & nbd.CMD_FLAG_FUA else 0) | (
                lf.FLAG_NO_HOLE if req.flags & nbd.CMD_FLAG_NO_HOLE else 0)
            logger.submit(lf.Kind.ZERO, req.offset, req.length, flags, b"", self._mutation(req, done), req)
        elif cmd == nbd.Cmd.BLOCK_STATUS:
            self._block_status(req, done)
        else:
            # FLUSH: every acknowledged write is already durable in the log, nothing to wait for.
            done(req, None)

    # -- where the data is: reads with holes, BLOCK_STATUS ---------------------------------------

    def _mutation(self, req: nbd.Request, done: Reply) -> Reply:
        """A write, trim or write-zeroes goes in flight: its range counts as data until it is
        answered, and the cached spans go now (extents.py says why once is enough). Returns
        the reply the logger calls, which passes the answer on to the session's. On the write
        path of every request, so kept to a dict entry and a counter (issue 17 counts its CPU)."""
        self.extent_cache.invalidate()
        self._mutating[id(req)] = (req.offset, req.offset + req.length, done)
        return self._mutated

    def _mutated(self, req: nbd.Request, exc: BaseException | None) -> None:
        entry = self._mutating.pop(id(req), None)
        if entry is not None:
            entry[2](req, exc)

    def _in_flight(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b, _ in self._mutating.values()]

    def _read(self, offset: int, length: int) -> list[bytes | int]:
        """In the thread pool: the data of [offset, offset+length) as data pieces and holes (an
        int: that many zero bytes, read from nothing). The holes are the device's own, so only
        what is allocated is read; an acknowledged write is always data (extents.py)."""
        device = self.device
        if device is None:
            raise OSError(errno.ESHUTDOWN, f"resource {self.res} is shutting down")
        if length < MIN_HOLE_CHUNK or device.is_block:
            return [device.pread(length, offset)]
        pieces: list[bytes | int] = []
        for start, end, hole in read_plan(device.scan(offset, length), offset, length, MIN_HOLE_CHUNK):
            pieces.append(end - start if hole else device.pread(end - start, start))
        return pieces

    def _read_done(self, req: nbd.Request, done: Reply, fut: asyncio.Future[list[bytes | int]]) -> None:
        if fut.cancelled():
            done(req, OSError(errno.ESHUTDOWN, "read cancelled: marsd is stopping"))
        elif (exc := fut.exception()) is not None:
            done(req, exc)
        else:
            pieces = fut.result()
            self._count_read(pieces)
            done(req, None, pieces)

    def _read_cached(self, offset: int, length: int) -> list[bytes | bytearray | int] | None:
        """The read answered on the event loop, or None to take the thread pool.

        Only when nothing can block: the cached spans cover the read (nothing changed since
        they were scanned, and nothing is in flight), and every data piece is in the page
        cache (preadv with RWF_NOWAIT fails instead of waiting for the disk). A client that
        asked BLOCK_STATUS first, as nbdcopy and qemu-img do, then reads without a thread
        round trip, which is what a copy of a sparse export spends most of its time on.
        """
        device = self.device
        if self._mutating or device is None or not _RWF_NOWAIT:
            return None
        spans = self.extent_cache.lookup(offset, length)
        if not spans or spans[-1][1] < offset + length:
            return None
        pieces: list[bytes | bytearray | int] = []
        for start, end, hole in read_plan(spans, offset, length, MIN_HOLE_CHUNK):
            if hole:
                pieces.append(end - start)
                continue
            buf = bytearray(end - start)
            try:
                n = os.preadv(device.fd, [buf], start, _RWF_NOWAIT)
            except OSError:
                return None  # not cached (EAGAIN), or anything odd: the pool's read says
            if n != len(buf):
                return None  # partly cached, or past the file's end: the pool reads and pads
            pieces.append(buf)
        return pieces

    def _count_read(self, pieces: list[bytes | bytearray | int]) -> None:
        self.deps.stats.device_read_bytes += sum(len(p) for p in pieces if not isinstance(p, int))

    def _block_status(self, req: nbd.Request, done: Reply) -> None:
        """base:allocation of the request's range: from the cached window when it holds the
        offset (answered at once), else from a scan of a window of at least SCAN_WINDOW bytes
        (a client walking the device, as nbdcopy and qemu-img do, then finds the next answers
        in memory)."""
        offset, length = req.offset, req.length
        cache = self.extent_cache
        spans = cache.lookup(offset, length)
        if spans is not None:
            done(req, None, to_nbd(overlay_data(spans, self._in_flight()), offset, length))
            return
        generation = cache.generation
        before = self._in_flight()
        window = min(max(length, SCAN_WINDOW), self.info.size - offset)
        assert self.device is not None
        scan = asyncio.get_running_loop().run_in_executor(self.executor, self.device.scan, offset, window)

        def scanned(f: asyncio.Future[list[tuple[int, int, bool]]]) -> None:
            if f.cancelled():
                done(req, OSError(errno.ESHUTDOWN, "block status cancelled: marsd is stopping"))
                return
            exc = f.exception()
            if exc is not None:
                done(req, exc)
                return
            spans = f.result()
            if not before and not self._mutating:
                cache.store(generation, spans)
            done(req, None, to_nbd(overlay_data(spans, [*before, *self._in_flight()]), offset, length))

        scan.add_done_callback(scanned)


# The counters' names of the NBD commands (engine/stats.py COMMANDS); FLUSH and anything else count as flush.
COUNTED = {nbd.Cmd.READ: "read", nbd.Cmd.WRITE: "write", nbd.Cmd.TRIM: "trim", nbd.Cmd.WRITE_ZEROES: "write_zeroes",
           nbd.Cmd.BLOCK_STATUS: "block_status"}
#: Holes shorter than this are read like data: below it a hole chunk and a second pread cost
#: more than the zeros they save (a filesystem's holes are at least a block, 4 KiB, anyway).
MIN_HOLE_CHUNK = 64 * 1024
#: preadv2's "fail rather than wait" flag (Linux 4.14+); 0 where Python or the OS lacks it.
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
#: What one BLOCK_STATUS scan covers at least; its spans stay cached until the next write.
SCAN_WINDOW = 16 * 2**30

__all__ = ["PrimaryRuntime", "LogWriteError"]


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
