"""One resource on a secondary: its data device with a syncer, a fetcher and a replayer.

The three run as independent tasks, each switched by its own todo entry (sync, connect,
allow-replay), so an operator can pause any of them alone. Replay waits for the sync: while the
sync copies chunks the device is inconsistent, and replay starts only after the last chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import ClassVar

from ..device import DataDevice
from ..log.files import designated_primary, list_logs, read_replay, read_writethrough, replay_path, version_path
from ..log.recovery import recover
from ..log.replayer import Replayer
from ..log.writer import finish_version
from ..log.values import ReplayLink, parse_log_name
from ..nbd.server import Export
from ..tree import actual, res_dir
from .fetcher import FETCH_BYTES, Fetcher
from .runtime import Attached, RuntimeDeps, Wanted
from .syncer import Syncer

log = logging.getLogger("mars.secondary")


class SecondaryRuntime(Attached):
    """A secondary: a fast full sync, then fetch and replay, each a task of its own."""

    role: ClassVar[str] = "secondary"

    def __init__(self, deps: RuntimeDeps, res: str, data_path: str, size: int) -> None:
        super().__init__(deps, res, data_path, size)
        self.fetcher: Fetcher | None = None
        self.syncer: Syncer | None = None
        self.replayer: Replayer | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._rates: dict[str, Rate] = {}
        self._tree_digest: int | None = -1  # the tree's digest at the last follow (see follow)

    # -- the runtime interface -----------------------------------------------------------------

    @property
    def export(self) -> Export | None:
        return None  # a secondary's device is the replay's alone: it exports nothing

    @property
    def open_count(self) -> int:
        return 0

    @property
    def syncing(self) -> bool:
        return self.running("sync")

    def servable(self, name: str) -> int | None:
        """Of a log copy (we are an intermediate in someone's connect list): what our fetcher has
        completely written, never a half-written tail; a copy at rest when the fetcher is off.
        Files of our own origin are not copies: only a primary serves those, up to its acks."""
        p = parse_log_name(name)
        if self.fetcher is None or p is None or p[1] == self.tree.host:
            return None
        return self.fetcher.available(name)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.device = await loop.run_in_executor(self.executor, DataDevice, self.data_path, self.res)
        try:
            await loop.run_in_executor(self.executor, self._finish_own_history)
        except BaseException:
            self.device.close()
            self.device = None
            raise
        self.fetcher = Fetcher(self.tree, self.res, self.executor, self.deps.connect, self._data_arrived,
                               self.deps.stats, depth=self._fetch_depth, floor=lambda: self.deps.limits.fetch_floor)

    def _finish_own_history(self) -> None:
        """A node that was primary and stopped without finishing its log (it crashed, and
        another node was made primary meanwhile) ends its own history first: recovery brings
        its device to the end of what it acknowledged, and the version entry of that file says
        how far that is. Whether the new primary's history contains all of it (the two versions
        agree) or not (a split brain) is then plain to every node; nothing is thrown away."""
        assert self.device is not None
        link = read_replay(self.tree, self.res, self.tree.host)
        logs = [f for f in list_logs(self.tree, self.res) if link is None or f.seq >= link.seq]
        if not logs or logs[-1].origin != self.tree.host:
            return
        last = logs[-1]
        if self.tree.get(version_path(self.res, last.seq, self.tree.host)) is not None:
            return
        result = recover(self.tree, self.res, self.device)
        finish_version(self.tree, self.res, result.state)
        self.tree.set(f"{res_dir(self.res)}/syncstatus-{self.tree.host}", self.size)
        log.info("resource %s: finished this node's history as primary in %s at %d bytes", self.res,
                 result.state.path.name, result.state.end)

    def grow(self, size: int) -> bool:
        """A sync that runs goes on to the new end; one that had finished starts again at its
        position, the old end, so only the new region is copied (``sync_needed``)."""
        if not super().grow(size):
            return False
        if self.syncer is not None:
            self.syncer.size = size
        return True
    def _fetch_depth(self) -> int:
        """Half the resource's buffer budget goes to fetch replies in flight, half to replay's reads."""
        return self.deps.limits.buffers // 2 // FETCH_BYTES

    def _replay_chunk(self) -> int:
        return self.deps.limits.buffers // 4  # two reads at a time: the chunk applied, the one ahead

    def _data_arrived(self) -> None:
        if self.replayer is not None:
            self.replayer.wake.set()
        self.deps.log_pulse.fire()  # a node fetching from our copy goes on at once

    def sync_needed(self) -> bool:
        return self.tree.get_int(f"{res_dir(self.res)}/syncstatus-{self.tree.host}") < self.size

    def follow(self, wanted: Wanted) -> None:
        """Start or stop the three tasks to match the switches (called every reconcile round)."""
        assert self.device is not None and self.fetcher is not None
        if wanted.level >= 2:
            self._free_oldest_copy()
        # The load limit holds fetch as the original does: the link goes, the switch stays on,
        # and fetch resumes by itself when the load is down (publish says why meanwhile).
        self._switch("fetch", wanted.fetch and self.deps.limits.fetch_held is None, self.fetcher.run)
        self.fetcher.reconsider()
        if self._follow_resync():
            return
        syncing = self.sync_needed()
        if syncing:
            self._switch("replay", False, None)
            primary = designated_primary(self.tree, self.res)
            if wanted.sync and "sync" not in self._tasks and primary is not None:
                if not self.deps.may_sync():
                    return  # the host's sync limit is reached; the next round tries again
                self.syncer = Syncer(self.tree, self.res, self.device, self.size, self.executor,
                                     lambda: self.deps.connect(primary or ""), self.deps.stats, self.deps.limits.io)
            self._switch("sync", wanted.sync, self.syncer.run if self.syncer else None)
        else:
            self._switch("sync", False, None)
            stuck = self._replay_stuck()
            if wanted.replay and "replay" not in self._tasks and not stuck:
                self.replayer = Replayer(self.tree, self.res, self.device, self.executor, self.fetcher.available,
                                         self.deps.checkpoint_interval, self.deps.stats, self.deps.limits.io,
                                         self._replay_chunk, barrier=self._barrier)
                self.replayer.deps_ended = self.deps.ended
            self._switch("replay", wanted.replay and not stuck, self.replayer.run if self.replayer else None)
            index = self.tree.changes
            digest = index.round_digest if index is not None else None
            if self.replayer is not None and (digest is None or digest != self._tree_digest):
                # The tree moved (more than reports): what the replayer waits for may be there now.
                self.replayer.wake.set()
            self._tree_digest = digest

    # -- after the primary's emergency mode ------------------------------------------------------

    def _barrier(self, seq: int, origin: str) -> bool:
        """Whether replay must stop at the end of file ``seq``: its origin wrote through after it."""
        wt = read_writethrough(self.tree, self.res, origin)
        return wt is not None and (seq == wt[0] or (wt[1] > 0 and seq == wt[1] - 1))

    def _follow_resync(self) -> bool:
        """Replay stopped at the primary's write-through gap and the primary logs again: sync the
        regions of its dirty-region map, then replay from the file its log went on in.

        The device here is consistent at the gap, and every block the primary changed since is
        in the map (written through) or in the log after the gap; so copying the map's regions
        and replaying the new files from their start makes it consistent again, as after a
        full sync, while reading only those regions. The replay task is stopped and waited for
        first (the next round): its last checkpoint must not land after the new position."""
        r = self.replayer
        primary = designated_primary(self.tree, self.res)
        if r is None or not r.at_barrier or primary is None or r.position is None:
            return False
        wt = read_writethrough(self.tree, self.res, r.position.origin)
        if wt is None or not wt[1] or r.position.origin != primary:
            return False
        task = self._tasks.get("replay")
        if task is not None and not task.done():
            task.cancel()
            return True
        self._tasks.pop("replay", None)
        self.replayer = None
        d, h = res_dir(self.res), self.tree.host
        self.tree.set(replay_path(self.res, h), ReplayLink(wt[1], primary, 0, 0), restamp=True)
        self.tree.set(f"{d}/syncstatus-{h}", 0, restamp=True)
        self.tree.delete(f"{d}/syncpos-{h}")
        log.warning("resource %s: %s wrote through after log %d (emergency mode): resyncing its dirty regions, "
                    "then replaying from log %d", self.res, primary, r.position.seq, wt[1])
        self.deps.ended()
        return True

    def _free_oldest_copy(self) -> None:
        """Emergency level 2: delete the oldest local log file that replay has passed (the
        original's "ruthlessly freeing old logfile"), one a round; never one replay needs."""
        link = read_replay(self.tree, self.res, self.tree.host)
        if link is None:
            return
        for f in list_logs(self.tree, self.res):
            if f.seq < link.seq:
                try:
                    f.path.unlink()
                except FileNotFoundError:
                    continue
                log.warning("resource %s: the MARS directory is short of space: deleted %s (replayed here)",
                            self.res, f.name)
                self.tree.set(actual(self.res, self.tree.host, "msg-warn-space-low"),
                              f"freeing old log files: deleted {f.name} (replayed here)", durable=False)
                return

    def _replay_stuck(self) -> bool:
        """Replay stopped on a damaged record and its position has not been written anew since."""
        stamp = self.replayer.stopped_at() if self.replayer is not None else None
        if stamp is None:
            return False
        entry = self.tree.entry(f"{res_dir(self.res)}/replay-{self.tree.host}")
        return entry is not None and entry.stamp_ns == stamp

    def _switch(self, name: str, on: bool, run: Callable[[], object] | None) -> None:
        task = self._tasks.get(name)
        if task is not None and task.done():
            if not task.cancelled() and task.exception() is not None:
                log.error("resource %s: %s task failed: %r", self.res, name, task.exception())
            del self._tasks[name]
            task = None
            if name == "sync":
                return  # finished: the next round sees the sync complete
        if on and task is None and run is not None:
            task = self._tasks[name] = asyncio.get_running_loop().create_task(run(), name=f"{name}-{self.res}")
            # A task that ends (a sync done, a fetch that gave up) is the next round's business:
            # a quiet daemon would not look at the resources for seconds otherwise.
            task.add_done_callback(lambda _t: self.deps.ended())
        elif not on and task is not None:
            task.cancel()
            del self._tasks[name]

    def running(self, name: str) -> bool:
        t = self._tasks.get(name)
        return t is not None and not t.done()

    def publish(self) -> None:
        t, h, r = self.tree, self.tree.host, self.res
        t.set(actual(r, h, "is-syncing"), int(self.running("sync")), durable=False)
        t.set(actual(r, h, "is-copying"), int(self.running("fetch")), durable=False)
        t.set(actual(r, h, "is-replaying"), int(self.running("replay")), durable=False)
        # Counters of this marsd's life: what crossed the link, for operators and for tests that
        # prove a resumed sync or fetch does not copy everything again.
        if self.syncer is not None:
            t.set(actual(r, h, "sync-copied-bytes"), self.syncer.bytes_copied, durable=False)
            t.set(actual(r, h, "sync-chunks-equal"), self.syncer.chunks_equal, durable=False)
            t.set(actual(r, h, "sync-chunks-copied"), self.syncer.chunks_differ, durable=False)
            t.set(actual(r, h, "sync-read-bytes"), self.syncer.read_bytes, durable=False)
            if self.syncer.dirty is not None:
                t.set(actual(r, h, "sync-kind"), "dirty-map" if self.syncer.dirty else "full", durable=False)
        if self.fetcher is not None:
            t.set(actual(r, h, "fetch-bytes"), self.fetcher.fetched_bytes, durable=False)
            if self.fetcher.source:
                t.set(actual(r, h, "fetch-source"), self.fetcher.source, durable=False)
        if self.replayer is not None:
            t.set(actual(r, h, "replay-bytes"), self.replayer.applied_bytes, durable=False)
        now = time.monotonic()
        counters = {"sync": self.syncer.pos if self.syncer else 0,
                    "file": self.fetcher.fetched_bytes if self.fetcher else 0,
                    "replay": self.replayer.applied_bytes if self.replayer else 0}
        for kind, count in counters.items():
            rate = self._rates.setdefault(kind, Rate()).update(now, count)
            t.set(actual(r, h, f"amount-{kind}_rate"), round(rate), durable=False)  # bytes/s, names as the original
        if self.fetcher is not None and self.fetcher.position is not None:
            t.set(actual(r, h, "fetch-pos"), self.fetcher.position, durable=False)
        if self.syncer is not None and self.syncer.error and self.running("sync"):
            t.set(actual(r, h, "msg-warn-sync"), self.syncer.error, durable=False)
        else:
            t.delete(actual(r, h, "msg-warn-sync"), durable=False)
        if self.fetcher and self.fetcher.error:
            t.set(actual(r, h, "msg-warn-fetch"), self.fetcher.error, durable=False)
        else:
            t.delete(actual(r, h, "msg-warn-fetch"), durable=False)
        held = self.deps.limits.fetch_held
        if held is not None and t.get(actual(r, h, "msg-warn-loadavg")) != held:
            t.set(actual(r, h, "msg-warn-loadavg"), held, durable=False)
        elif held is None:
            t.delete(actual(r, h, "msg-warn-loadavg"), durable=False)

    async def stop(self, finish: bool = False) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self.device is not None:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.device.fdatasync)
            self.device.close()
            self.device = None


class Rate:
    """Bytes per second of a growing counter over the last few seconds.

    A window rather than the last interval alone, so a rate read between two bursts of a fetch
    does not swing between zero and double; a counter that restarts (a new syncer) starts over.
    """

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, now: float, count: int) -> float:
        if self.samples and count < self.samples[-1][1]:
            self.samples.clear()
        self.samples.append((now, count))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
