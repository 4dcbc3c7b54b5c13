"""What marsd answers on its peer links: tree entries, log bytes, chunk digests and chunks.

Every answer reads local state only. Log bytes are served only up to what is durable and
acknowledged on this node (a batch whose fdatasync failed is cut from the log again, and a peer
must never have replayed it); a fetch at the end of a log that is still growing waits for the
resource's :class:`~mars.engine.roles.runtime.LogPulse`, up to the requester's ``wait_ms``,
instead of making it poll.

The services get what they use explicitly (:class:`PeerServices`' arguments): the tree, the
disk executor, the runtime of a resource (through the one runtime interface, whatever its
role), its log pulse, and the tree exchange (daemon/exchange.py), which answers what changed
and takes a peer's changes.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MarsError
from ..log.files import finished_length, pread_file
from ..log.values import parse_log_name
from ..roles.runtime import LogPulse, Runtime
from ..roles.syncer import chunk_digests
from ..tree import Tree, check_name, res_dir
from . import protocol as P

if TYPE_CHECKING:
    from ..daemon.exchange import Exchange

MAX_FETCH = 16 << 20
MAX_READ = 32 << 20
MAX_WAIT_S = 120.0  # longest long poll a peer may ask for (a dead link ends sooner: TCP keepalive)
#: A copy (this node relays another's log) is checked this often while a fetch waits at its end:
#: its end can also come with a tree entry (the origin's version of it), which fires no pulse.
COPY_RECHECK_S = 1.0


class PeerServices:
    """The answers of this node's end of every peer link; one instance per marsd."""

    def __init__(self, tree: Tree, executor: Executor, runtime: Callable[[str], Runtime | None],
                 log_pulse: Callable[[str], LogPulse], exchange: Exchange) -> None:
        self.tree = tree
        self.executor = executor
        self.runtime = runtime
        self.log_pulse = log_pulse
        self.exchange = exchange
        self._fds: dict[str, tuple[str, int]] = {}  # resource -> (data device path, read-only fd)
        #: Bytes of each resource's data device read here for peers' syncs (digests and chunks):
        #: how an operator sees that a resync after an emergency read only the map's regions.
        self.sync_read_bytes: dict[str, int] = {}

    def close(self) -> None:
        for _, fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    async def handle(self, msg: Any, peer: str) -> Any:
        loop = asyncio.get_running_loop()
        tree = self.tree
        if isinstance(msg, P.TreeSince):
            return self.exchange.answer(msg, peer)
        if isinstance(msg, P.TreeChanges) and not msg.req:
            await self.exchange.fed(msg, peer)
            return None
        if isinstance(msg, (P.TreeChanges, P.TreeEntries)):
            self.exchange.refuse_removed(peer, msg.entries)
            await self.exchange.take(msg.entries, peer)
            return P.TreeEntries(req=msg.req, entries=()) if msg.req else None
        if isinstance(msg, P.TreeRequest):
            # The whole tree read from disk: what a joining node (marsadm join-cluster) asks for.
            entries = await loop.run_in_executor(self.executor, tree.walk, tuple(msg.prefixes))
            # A listing larger than one frame goes as unasked pushes, then the reply with the rest.
            batches = list(P.entry_batches(entries)) or [()]
            return [P.TreeEntries(req=0, entries=b) for b in batches[:-1]] + \
                [P.TreeEntries(req=msg.req, entries=batches[-1])]
        if isinstance(msg, P.FetchRequest):
            return await self._fetch(msg)
        if isinstance(msg, P.DigestRequest):
            fd, size = self._device(msg.res)
            count = min(msg.count, 1 << 16)
            digests = await loop.run_in_executor(self.executor, chunk_digests, fd, msg.offset, msg.chunk, count,
                                                 size)
            self._count(msg.res, sum(min(msg.chunk, size - msg.offset - i * msg.chunk)
                                     for i, d in enumerate(digests) if d is not None))
            return P.DigestReply(req=msg.req, res=msg.res, offset=msg.offset, chunk=msg.chunk,
                                 digests=tuple(digests))
        if isinstance(msg, P.ReadRequest):
            fd, size = self._device(msg.res)
            n = max(0, min(msg.length, MAX_READ, size - msg.offset))
            data = await loop.run_in_executor(self.executor, os.pread, fd, n, msg.offset)
            self._count(msg.res, len(data))
            return P.ReadReply(req=msg.req, offset=msg.offset, data=data)
        if isinstance(msg, P.DirtyMapRequest):
            self._device(msg.res)  # the same refusals as a sync's reads
            rt = self.runtime(msg.res)
            bits = rt.dirty_bits() if rt is not None else None
            if bits is None:
                raise MarsError(f"host {tree.host} keeps no dirty-region map of {msg.res}",
                                "sync the whole device (a fast full sync compares every chunk)")
            region, size, data = bits
            return P.DirtyMapReply(req=msg.req, res=msg.res, region=region, size=size, data=data)
        return None

    def _count(self, res: str, n: int) -> None:
        self.sync_read_bytes[res] = self.sync_read_bytes.get(res, 0) + n

    def _device(self, res: str) -> tuple[int, int]:
        """A read-only descriptor of the resource's data device (shares the page cache).

        Kept open between requests (a sync asks thousands of times); reopened, and the old one
        closed, when the resource's data device changed.
        """
        check_name("resource", res)
        tree = self.tree
        path = tree.get(f"{res_dir(res)}/data-{tree.host}")
        if path is None or tree.get(f"{res_dir(res)}/primary") != tree.host:
            raise MarsError(f"host {tree.host} is not the primary of {res}", "sync from the primary")
        if tree.get_int(f"actual-{tree.host}/emergency") >= 4:
            # The original answers syncs with EMEDIUMTYPE here: a sync now would have to start over.
            raise MarsError(f"host {tree.host} is in emergency mode (its MARS directory is full)",
                            f"free space on {tree.host}; the sync goes on by itself once it has left it")
        cached = self._fds.get(res)
        if cached is None or cached[0] != path:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if cached is not None:
                os.close(cached[1])
            self._fds[res] = cached = (path, fd)
        return cached[1], tree.get_int(f"{res_dir(res)}/size")

    async def _fetch(self, msg: P.FetchRequest) -> P.LogData:
        tree = self.tree
        check_name("resource", msg.res)
        parsed = parse_log_name(msg.name)
        if parsed is None:
            raise MarsError(f"{msg.name!r} is not a log file name", "ask for log-NNNNNNNNN-<host>")
        seq, origin = parsed
        path = tree.root / res_dir(msg.res) / msg.name
        rt = self.runtime(msg.res)
        if not path.exists() and (origin == tree.host or rt is None or rt.servable(msg.name) is None):
            raise MarsError(f"no log file {msg.name} of resource {msg.res} here",
                            "it was deleted or not yet created; fetch from the primary")
        # A copy our own fetcher has not started yet is simply empty for now: wait for it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(msg.wait_ms / 1000, MAX_WAIT_S)
        pulse = self.log_pulse(msg.res)
        while True:
            limit, finished = self._limit(msg.res, seq, origin, path)
            left = deadline - loop.time()
            if msg.offset < limit or finished or left <= 0:
                break
            await pulse.wait(left if origin == tree.host else min(left, COPY_RECHECK_S))
        if msg.offset > limit:
            if finished:
                raise MarsError(f"{msg.name} of {msg.res} ends at {limit} bytes in the history this node follows, "
                                f"before offset {msg.offset}", "the asking node holds more of it: a split brain")
            # The asker holds more of this copy than we do yet (we lag behind it): nothing to send.
            return P.LogData(req=msg.req, res=msg.res, name=msg.name, offset=msg.offset, size=msg.offset,
                             finished=False, data=b"")
        n = max(0, min(msg.max_bytes, MAX_FETCH, limit - msg.offset))
        data = b""
        if n:
            data = await loop.run_in_executor(self.executor, pread_file, path, n, msg.offset)
        return P.LogData(req=msg.req, res=msg.res, name=msg.name, offset=msg.offset, size=limit,
                         finished=finished, data=data)

    def _limit(self, res: str, seq: int, origin: str, path: Path) -> tuple[int, bool]:
        """How far a log may be served from here, and whether it will grow no more.

        Our own log: up to what is acknowledged. A copy (we are an intermediate in a connect
        list): up to what our fetcher has completely written, never a half-written tail; a
        complete copy at rest when nothing here fetches it.
        """
        if not path.exists():
            return 0, False
        final = finished_length(self.tree, res, seq, origin)
        rt = self.runtime(res)
        have = rt.servable(path.name) if rt is not None else None
        if origin == self.tree.host:
            if final is not None:
                return final, True
            return (have or 0), False
        if have is None:
            have = final if final is not None and path.stat().st_size >= final else 0
        if final is not None:
            return min(have, final), have >= final
        return have, False
