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
from typing import ClassVar

from ..device import DataDevice
from ..log import format as lf
from ..log.files import list_logs, replay_path, version_path
from ..log.recovery import recover
from ..log.values import LogPos, ReplayLink, log_name
from ..log.writer import Logger, LogWriteError, finish_version
from ..nbd import protocol as nbd
from ..nbd.server import Export, NbdSession
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

    def follow(self, wanted: Wanted) -> None:
        """The primary neither syncs, fetches nor replays: it only rotates its log when asked."""
        self.rotate_if_requested(self.deps.logrot_auto)

    def publish(self) -> None:
        if self.logger is not None:
            # The end of the acknowledged log: what secondaries converge to.
            self.tree.set(actual(self.res, self.tree.host, "log-pos"), self.logger.acked, durable=False)

    def servable(self, name: str) -> int | None:
        """Of our own current log file, only what is durable and acknowledged."""
        if self.logger is None:
            return None
        acked = self.logger.acked
        return acked.offset if acked.name == name else None

    def grow(self, size: int) -> bool:
        """New NBD connections see the new size; those open keep the size they negotiated (NBD
        cannot tell a client its device grew), so a client reconnects to use the new region."""
        if not super().grow(size):
            return False
        self.info = dataclasses.replace(self.info, size=size)
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
        self.logger = Logger(self.res, self.tree, self.device, result.state,
                             on_progress=self._progress, stats=self.deps.stats)
        self.logger.start()
        self._synced = LogPos(result.state.seq, result.state.end, self.tree.host)
        self._checkpoint_task = loop.create_task(self._checkpoints(), name=f"checkpoint-{self.res}")
        self.serving = True

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
        self.tree.set(replay_path(self.res, self.tree.host), ReplayLink.at(pos), durable=False)

    # -- the NBD export ------------------------------------------------------------------------

    def opened(self, session: NbdSession) -> None:
        self.sessions.add(session)
        self.publish_open_count()

    def closed(self, session: NbdSession) -> None:
        self.sessions.discard(session)
        self.publish_open_count()

    def publish_open_count(self) -> None:
        self.tree.set(actual(self.res, self.tree.host, "open-count"), len(self.sessions), durable=False)

    def handle(self, req: nbd.Request) -> asyncio.Future[bytes | None]:
        loop = asyncio.get_running_loop()
        if not self.serving or self.logger is None or self.device is None:
            f = loop.create_future()
            f.set_exception(OSError(errno.ESHUTDOWN, f"resource {self.res} is shutting down"))
            return f
        cmd = req.cmd
        self.deps.stats.request(COUNTED.get(cmd, "flush"), req.length)
        if cmd == nbd.Cmd.READ:
            return loop.run_in_executor(self.executor, self.device.pread, req.length, req.offset)
        if cmd == nbd.Cmd.WRITE:
            return self.logger.submit(lf.Kind.WRITE, req.offset, req.length, req.flags & nbd.CMD_FLAG_FUA,
                                      req.data or b"")
        if cmd == nbd.Cmd.TRIM:
            return self.logger.submit(lf.Kind.TRIM, req.offset, req.length, req.flags & nbd.CMD_FLAG_FUA)
        if cmd == nbd.Cmd.WRITE_ZEROES:
            flags = (lf.FLAG_FUA if req.flags & nbd.CMD_FLAG_FUA else 0) | (
                lf.FLAG_NO_HOLE if req.flags & nbd.CMD_FLAG_NO_HOLE else 0)
            return self.logger.submit(lf.Kind.ZERO, req.offset, req.length, flags)
        # FLUSH: every acknowledged write is already durable in the log, so there is nothing to wait for.
        f = loop.create_future()
        f.set_result(None)
        return f


# The counters' names of the NBD commands (engine/stats.py COMMANDS); FLUSH and anything else count as flush.
COUNTED = {nbd.Cmd.READ: "read", nbd.Cmd.WRITE: "write", nbd.Cmd.TRIM: "trim", nbd.Cmd.WRITE_ZEROES: "write_zeroes"}

__all__ = ["PrimaryRuntime", "LogWriteError"]
