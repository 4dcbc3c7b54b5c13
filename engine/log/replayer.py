"""A secondary's replayer: applies its local log copies, in order, onto its data device.

The secondary is always a consistent, maybe older, copy because replay applies whole records in
the primary's order and nothing else touches the device. The replay position (``replay-<host>``)
advances only after the device is synced, exactly as on the primary, so a crash of the secondary
replays a little twice and loses nothing (replay is idempotent).

It reads only what the fetcher has completely written (the fetcher tells it how far), and moves
to the next log file only when the current one is finished: its origin wrote a version entry
whose length this copy has reached. A damaged record stops replay at that record, with the
reason in the tree; it never applies a record that failed its checks.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from ..device import DataDevice, drop_behind
from ..ratelimit import RateLimit
from ..roles.runtime import stop_if_stopping
from ..stats import ResourceStats
from ..tree import Tree, actual, res_dir
from . import format as lf
from .apply import apply_records
from .files import (LogFile, VersionHasher, finished_length, list_logs, pread_file, read_replay, read_version, replay_path,
                    version_path)
from .values import ReplayCode, ReplayLink, Version, log_name

log = logging.getLogger("mars.replayer")

READ_CHUNK = 16 << 20  # as much as one fetch reply: whole runs of records per pwritev
#: An idle replayer (all applied, its position on disk) looks again this often by itself. New log
#: bytes wake it at once (the fetcher), and so does any change of the tree's desired state (its
#: runtime's follow: the end of a file, a new history after a failover); this is the net under both.
IDLE_WAIT_S = 5.0


class Replayer:
    """Applies one resource's local log copies, in order, onto a secondary's data device."""

    def __init__(self, tree: Tree, res: str, device: DataDevice, executor: Executor,
                 available: Callable[[str], int], checkpoint_interval: float = 1.0,
                 stats: ResourceStats | None = None, io_limit: RateLimit | None = None,
                 read_chunk: Callable[[], int] = lambda: READ_CHUNK,
                 barrier: Callable[[int, str], bool] = lambda seq, origin: False) -> None:
        self.tree = tree
        self.io_limit = io_limit or RateLimit()  # the node's io-limit: replay shares the disk with the primary's
        self.read_chunk = read_chunk  # two of these are in memory at a time (the node's mem-limit)
        self.stats = stats or ResourceStats()
        self.res = res
        self.device = device
        self.executor = executor
        self.available = available  # bytes of a local log copy that are completely written
        self.checkpoint_interval = checkpoint_interval
        self.wake = asyncio.Event()
        self.damage: lf.LogCorruption | None = None
        self.applied_bytes = 0
        self.position: ReplayLink | None = None
        # Whether replay may go on from a finished file into the next: not where the log has a
        # gap (its origin wrote through meanwhile, an emergency): the runtime resyncs instead.
        self.barrier = barrier
        self.at_barrier = False
        self.deps_ended: Callable[[], None] = lambda: None  # tells the runtime: the next round looks
        self._stopped_stamp: int | None = None
        self._behind: tuple[int, int, Path, int, int] | None = None  # last batch: device and log ranges

    def _dir(self) -> Path:
        return self.tree.root / res_dir(self.res)

    def stopped_at(self) -> int | None:
        """The stamp of the replay position this replayer stopped at on damage; None while it did not.

        A stopped replay is not started again by itself: the same record would stop it again,
        once a second, for ever. It starts again when the position is written anew (invalidate
        does), which gives the entry a new stamp, or when marsd starts again.
        """
        return self._stopped_stamp

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        code = actual(self.res, self.tree.host, "replay-code")
        if (ReplayCode.parse(self.tree.get(code)) or ReplayCode(1)).damaged:
            # A new start after a stop on damage (the position was written anew): the old verdict goes.
            self.tree.set(code, ReplayCode(1), durable=False)
            self.tree.delete(actual(self.res, self.tree.host, "msg-err-replay-stop"), durable=False)
        self.tree.delete(actual(self.res, self.tree.host, "msg-err-split-brain"), durable=False)
        self.damage = None
        self._stopped_stamp = None
        link = read_replay(self.tree, self.res, self.tree.host)
        if link is None:
            logs = list_logs(self.tree, self.res)
            if not logs:
                return
            link = ReplayLink(logs[0].seq, logs[0].origin, 0, 0)
        self.position = link
        synced = link
        last_sync = loop.time()
        reader = lf.RecordReader(log_name(link.seq, link.origin), start_offset=link.pos)
        read_at = link.pos
        # The file's version digest, taken along the way when replay saw the file from its start
        # (else it is scanned once more at the end): no second pass over a log long on disk.
        digest = self._start_digest(link) if link.pos == 0 else None
        ahead: tuple[Path, int, asyncio.Future[bytes]] | None = None  # the next chunk, being read
        while True:
            # A stop that the wait for more log swallowed (wait_for can, in 3.11) must still end
            # this task: a replayer that went on would write a device its runtime has closed,
            # and the runtime's stop would wait for it for ever.
            stop_if_stopping()
            name = log_name(self.position.seq, self.position.origin)
            path = self._dir() / name
            avail = self.available(name) if path.exists() else 0
            final = finished_length(self.tree, self.res, self.position.seq, self.position.origin)
            if final is not None:
                avail = min(avail, final)  # the history goes on elsewhere after that (a forced failover)
            progressed = False
            if avail > read_at:
                chunk = max(1 << 20, min(READ_CHUNK, self.read_chunk()))
                if ahead is None or ahead[:2] != (path, read_at):
                    ahead = (path, read_at, loop.run_in_executor(
                        self.executor, pread_file, path, min(chunk, avail - read_at), read_at))
                data = await ahead[2]
                read_at += len(data)
                # Read the next chunk while this one is checked and applied: the two overlap.
                ahead = None if avail <= read_at else (path, read_at, loop.run_in_executor(
                    self.executor, pread_file, path, min(chunk, avail - read_at), read_at))
                await self.io_limit.take(len(data))
                reader.receive_data(data)
                try:
                    batch = []
                    while True:
                        ev = reader.next_event()
                        if ev is lf.NEED_DATA or ev is lf.END:
                            break
                        batch.append(ev)
                        if digest is not None:
                            digest[1].update(ev.check)
                except lf.LogCorruption as e:
                    await loop.run_in_executor(self.executor, self._apply, batch, path)
                    self._stopped(e)
                    return
                if batch:
                    await loop.run_in_executor(self.executor, self._apply, batch, path)
                    self.position = ReplayLink(self.position.seq, self.position.origin, batch[-1].end, 0)
                    progressed = True
            else:
                if final is not None and self.position.pos >= final:
                    nxt = self._next_file()
                    if self.barrier(self.position.seq, self.position.origin):
                        if not self.at_barrier:
                            log.warning("resource %s: replay stops at the end of %s: its origin wrote through "
                                        "to its device after it (emergency mode); a resync follows",
                                        self.res, self.position.name)
                            self.deps_ended()
                        self.at_barrier = True
                        nxt = None
                    if nxt is not None:
                        await loop.run_in_executor(self.executor, self._write_version, self.position, digest)
                        same = self._same_history(self.position.seq, nxt[1])
                        if same is False:
                            await loop.run_in_executor(self.executor, self._split, nxt)
                            return
                    if nxt is not None and same:
                        self.position = ReplayLink(nxt[0], nxt[1], 0, 0)
                        digest = self._start_digest(self.position)
                        reader = lf.RecordReader(log_name(*nxt), start_offset=0)
                        read_at = 0
                        progressed = True
            now = loop.time()
            if self.position != synced and (now - last_sync >= self.checkpoint_interval or not progressed):
                await loop.run_in_executor(self.executor, self._checkpoint, self.position)
                synced = self.position
                last_sync = now
            if not progressed:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), max(self.checkpoint_interval, IDLE_WAIT_S))
                except asyncio.TimeoutError:
                    pass

    def _same_history(self, seq: int, next_origin: str) -> bool | None:
        """Whether the next file continues this node's history: its origin's version of file
        ``seq`` equals ours (the original's check before switching log files). None while
        either is not known here yet."""
        mine = read_version(self.tree, self.res, seq, self.tree.host)
        theirs = read_version(self.tree, self.res, seq, next_origin)
        if mine is None or theirs is None:
            return None
        return (mine.digest, mine.origin, mine.length_bytes) == (theirs.digest, theirs.origin, theirs.length_bytes)

    def _split(self, nxt: tuple[int, str]) -> None:
        """Stop before a file of another history: this device holds writes the next file's
        origin never had (a split brain). Replaying on would mix two histories into garbage."""
        assert self.position is not None
        seq = self.position.seq
        mine = read_version(self.tree, self.res, seq, self.tree.host)
        theirs = read_version(self.tree, self.res, seq, nxt[1])
        text = (f"split brain: this node's history of log {seq} ({mine.name if mine else '?'}, "
                f"{mine.length_bytes if mine else '?'} bytes) differs from {nxt[1]}'s "
                f"({theirs.name if theirs else '?'}, {theirs.length_bytes if theirs else '?'} bytes), "
                f"on which {log_name(*nxt)} builds; replay stopped before it, the data device is unchanged")
        log.error("resource %s: %s", self.res, text)
        self.tree.set(actual(self.res, self.tree.host, "msg-err-split-brain"), text, durable=False)
        self._checkpoint(self.position)
        entry = self.tree.entry(replay_path(self.res, self.tree.host))
        self._stopped_stamp = entry.stamp_ns if entry is not None else 0

    def _next_file(self) -> tuple[int, str] | None:
        seq = self.position.seq + 1
        for f in list_logs(self.tree, self.res):
            if f.seq == seq:
                return f.seq, f.origin
        return None

    def _prev_version(self, pos: ReplayLink) -> Version | None:
        return read_version(self.tree, self.res, pos.seq - 1, self.tree.host) or \
            read_version(self.tree, self.res, pos.seq - 1, pos.origin)

    def _start_digest(self, pos: ReplayLink) -> tuple[Version | None, VersionHasher]:
        prev = self._prev_version(pos)
        return prev, VersionHasher(Version.digest_of(prev))

    def _write_version(self, pos: ReplayLink, digest: tuple[Version | None, VersionHasher] | None) -> None:
        """Our own version entry for a log we replayed completely, digested from our copy.

        Equal to the origin's entry when the histories are equal; a different string for the same
        number is how a split brain or a damaged copy shows.
        """
        if self.tree.get(version_path(self.res, pos.seq, self.tree.host)) is not None:
            return
        prev = self._prev_version(pos)
        if digest is not None and digest[0] == prev:
            hasher, end = digest[1], pos.pos  # every record up to the end went through it
        else:
            # Up to where replay got, not to the copy's end: the copy may hold more of a file
            # than the history that goes on (the part a forced primary never fetched).
            hasher = VersionHasher(Version.digest_of(prev))

            def take(d: lf.Decoded) -> None:
                if d.end <= pos.pos:
                    hasher.update(d.check)
            r = LogFile(pos.seq, pos.origin, self._dir() / pos.name).scan(take)
            if r.end < pos.pos:
                return
            end = pos.pos
        self.tree.set(version_path(self.res, pos.seq, self.tree.host),
                      Version.of(hasher.hexdigest(), pos.seq, pos.origin, end, prev))

    def _apply(self, batch: list[lf.Decoded], path: Path) -> None:
        """Apply a batch, then let the previous batch's pages leave the cache (drop-behind).

        Neither the device nor the log copy of a secondary is read again soon, and keeping them
        cached is what made replay CPU-bound (see device.drop_behind). One batch stays cached so
        the wait for its writeout overlaps the next batch's writes.
        """
        if not batch:
            return
        with self.device.apply_lock:
            lo, hi = apply_records(self.device, [d.record for d in batch])
            if hi > lo:
                self.device.start_writeout(lo, hi - lo)  # write-behind, as on the primary
            applied = sum(d.record.length for d in batch)
            self.applied_bytes += applied
            self.stats.replayed_bytes += applied
            behind, self._behind = self._behind, (lo, hi, path, batch[0].offset, batch[-1].end)
        if behind is not None:
            b_lo, b_hi, b_path, b_start, b_end = behind
            self.device.drop_behind(b_lo, b_hi - b_lo)
            _drop_behind_file(b_path, b_start, b_end - b_start)

    def _checkpoint(self, pos: ReplayLink) -> None:
        """Sync the device, then say how far it holds the replay: durably, because peers act on
        it (the primary deletes log files every member has passed). A position lost in a power
        cut would send replay back into files that may be gone everywhere."""
        self.device.fdatasync()
        self.tree.set(replay_path(self.res, self.tree.host), pos)

    def _stopped(self, e: lf.LogCorruption) -> None:
        self.damage = e
        log.error("resource %s: replay stopped: %s", self.res, e)
        self.tree.set(actual(self.res, self.tree.host, "replay-code"), ReplayCode.damaged_at(e.code, e.offset),
                      durable=False)
        self.tree.set(actual(self.res, self.tree.host, "msg-err-replay-stop"),
                      f"replay stopped: {e}; the data device holds the state before that record", durable=False)
        if self.position is not None:
            self._checkpoint(self.position)
        entry = self.tree.entry(replay_path(self.res, self.tree.host))
        self._stopped_stamp = entry.stamp_ns if entry is not None else 0


def _drop_behind_file(path: Path, offset: int, length: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # deleted meanwhile (log-delete): nothing left to drop
    try:
        drop_behind(fd, offset, length)
    finally:
        os.close(fd)
