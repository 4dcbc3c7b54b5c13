"""What marsd answers on its peer links: tree entries, log bytes, chunk digests and chunks.

Every answer reads local state only. Log bytes are served only up to what is durable and
acknowledged on this node (a batch whose fdatasync failed is cut from the log again, and a peer
must never have replayed it); a fetch at the end of a log that is still growing waits for the
next batch, up to the requester's ``wait_ms``, instead of making it poll.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from . import protocol as P
from ..errors import MarsError
from ..log.files import parse_log_name
from ..log.replayer import finished_length
from ..roles.syncer import chunk_digests
from ..tree import check_name, res_dir

if TYPE_CHECKING:
    from ..daemon.marsd import Daemon

MAX_FETCH = 16 << 20
MAX_READ = 32 << 20


class PeerServices:
    def __init__(self, daemon: "Daemon") -> None:
        self.d = daemon
        self._fds: dict[str, tuple[str, int]] = {}

    async def handle(self, msg: Any, peer: str) -> Any:
        loop = asyncio.get_running_loop()
        tree = self.d.tree
        if isinstance(msg, P.TreeRequest):
            entries = await loop.run_in_executor(self.d.executor, tree.walk, tuple(msg.prefixes))
            # A listing larger than one frame goes as unasked pushes, then the reply with the rest.
            batches = list(P.entry_batches(entries)) or [()]
            return [P.TreeEntries(req=0, entries=b) for b in batches[:-1]] + \
                [P.TreeEntries(req=msg.req, entries=batches[-1])]
        if isinstance(msg, P.TreeEntries):
            changed = await loop.run_in_executor(self.d.executor, lambda: sum(tree.apply(e) for e in msg.entries))
            if changed:
                self.d._wake.set()
            return P.TreeEntries(req=msg.req, entries=()) if msg.req else None
        if isinstance(msg, P.FetchRequest):
            return await self._fetch(msg)
        if isinstance(msg, P.DigestRequest):
            fd, size = self._device(msg.res)
            count = min(msg.count, 1 << 16)
            digests = await loop.run_in_executor(self.d.executor, chunk_digests, fd, msg.offset, msg.chunk, count,
                                                 size)
            return P.DigestReply(req=msg.req, res=msg.res, offset=msg.offset, chunk=msg.chunk,
                                 digests=tuple(digests))
        if isinstance(msg, P.ReadRequest):
            fd, size = self._device(msg.res)
            n = max(0, min(msg.length, MAX_READ, size - msg.offset))
            data = await loop.run_in_executor(self.d.executor, os.pread, fd, n, msg.offset)
            return P.ReadReply(req=msg.req, offset=msg.offset, data=data)
        return None

    def _device(self, res: str) -> tuple[int, int]:
        """A read-only descriptor of the resource's data device (shares the page cache)."""
        check_name("resource", res)
        tree = self.d.tree
        path = tree.get(f"{res_dir(res)}/data-{tree.host}")
        if path is None or tree.get(f"{res_dir(res)}/primary") != tree.host:
            raise MarsError(f"host {tree.host} is not the primary of {res}", "sync from the primary")
        cached = self._fds.get(res)
        if cached is None or cached[0] != path:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._fds[res] = cached = (path, fd)
        return cached[1], tree.get_int(f"{res_dir(res)}/size")

    async def _fetch(self, msg: P.FetchRequest) -> P.LogData:
        tree = self.d.tree
        check_name("resource", msg.res)
        parsed = parse_log_name(msg.name)
        if parsed is None:
            raise MarsError(f"{msg.name!r} is not a log file name", "ask for log-NNNNNNNNN-<host>")
        seq, origin = parsed
        path = tree.root / res_dir(msg.res) / msg.name
        if not path.exists() and (origin == tree.host or getattr(self.d.runtimes.get(msg.res), "fetcher", None) is None):
            raise MarsError(f"no log file {msg.name} of resource {msg.res} here",
                            "it was deleted or not yet created; fetch from the primary")
        # A copy our own fetcher has not started yet is simply empty for now: wait for it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(msg.wait_ms, 10_000) / 1000
        while True:
            limit, finished = self._limit(msg.res, seq, origin, path)
            if msg.offset < limit or finished or loop.time() >= deadline:
                break
            rt = self.d.runtimes.get(msg.res)
            if rt is not None and hasattr(rt, "wait_append"):
                await rt.wait_append(deadline - loop.time())
            else:
                await asyncio.sleep(min(0.2, deadline - loop.time()))  # a copy that grows elsewhere
        n = max(0, min(msg.max_bytes, MAX_FETCH, limit - msg.offset))
        data = b""
        if n:
            data = await loop.run_in_executor(self.d.executor, _pread, path, n, msg.offset)
        return P.LogData(req=msg.req, res=msg.res, name=msg.name, offset=msg.offset, size=limit,
                         finished=finished, data=data)

    def _limit(self, res: str, seq: int, origin: str, path) -> tuple[int, bool]:
        """How far a log may be served from here, and whether it will grow no more.

        Our own log: up to what is acknowledged. A copy (we are an intermediate in a connect
        list): up to what our fetcher has completely written, never a half-written tail.
        """
        tree = self.d.tree
        final = finished_length(tree, res, seq, origin)
        rt = self.d.runtimes.get(res)
        if not path.exists():
            return 0, False
        if origin == tree.host:
            if final is not None:
                return final, True
            lim = rt.fetch_limit(seq) if rt is not None and hasattr(rt, "fetch_limit") else None
            return (lim if lim is not None else 0), False
        fetcher = getattr(rt, "fetcher", None)
        have = fetcher.available(path.name) if fetcher is not None else 0
        if final is not None and fetcher is None and path.stat().st_size >= final:
            have = final  # a complete copy at rest
        if final is not None:
            return min(have, final), have >= final
        return have, False


def _pread(path, n: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)
