"""A secondary's fetcher: copies the primary's log files into its own tree, resumably.

Its position is never remembered, always recomputed from the copy on disk (at start and after
every error): the size of the local copy after cutting an incomplete last record. So a crash,
a cut link or a restart resumes exactly where the bytes on disk end, with nothing fetched twice
and nothing skipped. The serving side long-polls (``wait_ms``) and answers the moment the log
grows, so an idle fetcher costs one request every WAIT_MS (a node with many resources has one
fetcher each: a short poll would make an idle cluster's cost grow with them), and a busy one
streams as fast as the link allows. A link that dies meanwhile is noticed by TCP keepalive
(peer/link.py), not by the poll's end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any
from concurrent.futures import Executor
from pathlib import Path

from ..device import start_writeout
from ..log import format as lf
from ..log.files import LogFile, designated_primary, finished_length, list_logs, next_origin, read_replay
from ..log.values import LogPos, ReplayLink, log_name
from ..peer import protocol as P
from ..peer.link import PeerClient, PeerError
from ..stats import ResourceStats
from ..tree import Tree, connect_list, node_actual, res_dir
from .runtime import stop_if_stopping

log = logging.getLogger("mars.fetcher")

FETCH_BYTES = 16 << 20
#: Requests in flight while catching up; the node's mem-limit (``depth()``, 8 with the default
#: 256M) caps it lower. They must cover the path's bandwidth-delay product plus one reply: three
#: covered 1 Gbit/s only up to about 0.25 s of round trip (200 ms one way: at most 3 x 16 MiB /
#: (0.4 s + 0.13 s) = 0.75 of the rate); eight cover it up to 0.9 s (bench/bench_wan.py).
DEPTH = 8
#: Links they are spread over. A link is pipelined (PeerClient: several requests outstanding at
#: once), so one would do for the path; a second lets the source read the next chunk from disk
#: while it encrypts and sends one (it handles a link's requests one after the other). Eight
#: links, one request each, cost a TCP and TLS handshake each (three round trips) on every
#: catch-up, and as many TLS streams to feed on a shared CPU.
LINKS = 2
WAIT_MS = 120_000  # an idle fetcher asks every 2 min; new bytes, a finished file or a better source end it at once
RETRY_S = 1.0
FAILED_S = 10.0  # a source whose fetch failed goes after the others this long (sources())


def _request(coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """A fetch request as a task whose failure counts as seen even when nobody waits for it any
    more (a request given up on: the fetcher stopped, or moved to a better source); whoever
    still awaits it gets the exception as before."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


class SpaceHeld(Exception):
    """The MARS directory is down to a reserve under its last free-space limit (so level 4 is
    still reached and shown): fetch
    holds (emergency level 4 stops it at the next round) instead of running into ENOSPC. With
    eight replies in flight a catch-up can fill the directory faster than the rounds look."""


class Backlog:
    """One catch-up (requests pipelined because the source has more than one reply's worth) and
    how full the pipeline was: logged when it ends, so an operator (and the WAN test) sees the
    rate reached and whether the requests in flight were the limit."""

    NEWS = 64 << 20  # a backlog at least this large is logged at INFO

    def __init__(self) -> None:
        self.start: float | None = None
        self.bytes0 = 0
        self.most = 0  # requests in flight at once
        self.most_on_one = 0  # of them on one link

    def note(self, inflight: deque, fetched: int) -> None:
        if len(inflight) < 2 and self.start is None:
            return
        if self.start is None:
            self.start, self.bytes0, self.most, self.most_on_one = time.monotonic(), fetched, 0, 0
        self.most = max(self.most, len(inflight))
        per: dict[int, int] = {}
        for _, _, i, _ in inflight:
            per[i] = per.get(i, 0) + 1
        self.most_on_one = max([self.most_on_one, *per.values()])

    def end(self, res: str, source: str | None, links: int, fetched: int) -> None:
        if self.start is None:
            return
        secs, n = max(time.monotonic() - self.start, 1e-6), fetched - self.bytes0
        # A busy primary's bursts make small backlogs all day: only a real catch-up is news.
        log.log(logging.INFO if n >= self.NEWS else logging.DEBUG, "resource %s: caught up %d MiB from %s in %.1f s (%.1f MiB/s), at most %d requests in flight, "
                 "%d on one link, %d links", res, n >> 20, source, secs, n / secs / (1 << 20), self.most,
                 self.most_on_one, links)
        self.start = None


class Fetcher:
    """Copies one resource's log files from the first reachable source into this node's tree."""

    def __init__(self, tree: Tree, res: str, executor: Executor, connect: Callable[[str], PeerClient],
                 on_data: Callable[[], None], stats: ResourceStats | None = None,
                 depth: Callable[[], int] = lambda: DEPTH, floor: Callable[[], int] = lambda: 0) -> None:
        self.tree = tree
        self.floor = floor  # free bytes the MARS directory keeps: a reply that would go below waits
        self.depth = depth  # replies in flight while catching up, FETCH_BYTES each (the node's mem-limit)
        self.stats = stats or ResourceStats()
        self.res = res
        self.executor = executor
        self.connect = connect
        self.on_data = on_data
        self.complete: dict[str, int] = {}  # local copy name -> bytes completely written
        #: local copy name -> (inode, length) this process wrote or verified: no scan needed again
        self._mine: dict[str, tuple[int, int]] = {}
        self.fetched_bytes = 0
        self.error: str | None = None
        self.source: str | None = None
        self.active = False
        self.position: LogPos | None = None  # how far the copy being fetched is, for the tree
        self._better = asyncio.Event()  # a more preferred source than the current one is listed
        self._failed: dict[str, float] = {}  # source -> when a fetch from it last failed (monotonic)
        self._fallbacks: list[str] = []  # the members sources() lists after the connect list and the primary
        self._opening: asyncio.Task[None] | None = None  # a further fetch link being opened (_fill)
        self._backlog = Backlog()

    def reconsider(self) -> None:
        """Every round: a source listed before the current one ends the long poll at once, so a
        changed connect list (or a new primary) takes effect now, not when the poll runs out."""
        if self.source is None or self._better.is_set():
            return
        prefs = self.sources()
        if prefs and prefs[0] != self.source:
            self._better.set()

    def _dir(self) -> Path:
        return self.tree.root / res_dir(self.res)

    def sources(self) -> list[str]:
        """The connect list (``connect-<host>``) in order, then the primary, then the other
        members (the original fetches from any node that has the log files): on failure the next.

        A source this node cannot reach now goes to the end, so a secondary cut off from the
        primary keeps fetching through another member that still reaches it, and comes back to
        the preferred one the moment it is reachable again. "Cannot reach": this node's tree
        exchange says so (``actual-<host>/msg-peer-<h>``, cleared by its next pull that works),
        or this fetcher's own last try there failed less than FAILED_S ago (the exchange notices
        a partition only after its pull times out; a link that broke under the fetcher has
        told it already).
        """
        d = res_dir(self.res)
        me = self.tree.host
        prefs = [h for h in connect_list(self.tree, self.res, me)
                 if h != me and self.tree.get(f"{d}/data-{h}") is not None and not self._leads_back(h)]
        # Without a primary (a handover under way, or after 'marsadm secondary'), the last one
        # still has the end of the history for whoever has not fetched it yet.
        primary = designated_primary(self.tree, self.res) or self.tree.get(f"{d}/prev-primary")
        if primary and primary != me and primary not in prefs:
            prefs.append(primary)
        cut = {h for h in self.tree.members(self.res) if self.tree.get(node_actual(me, f"msg-peer-{h}")) is not None}
        self._fallbacks = []
        if prefs and all(h in cut for h in prefs):
            # Only when the exchange cannot reach any of them (a partition, not a peer's error
            # or restart): a member serves the copies it fetched itself (PeerServices._limit),
            # never more than it completely has, so it is a safe source of whatever it holds.
            self._fallbacks = [h for h in self.tree.members(self.res)
                               if h not in prefs and h not in cut and h != me and not self._leads_back(h)]
            prefs += self._fallbacks
        now = time.monotonic()
        down = {h for h in prefs if h in cut or now - self._failed.get(h, float("-inf")) < FAILED_S}
        return [h for h in prefs if h not in down] + [h for h in prefs if h in down]

    def _leads_back(self, h: str) -> bool:
        """Whether fetching from ``h`` would, following first choices, end at this node: a cycle
        (two lists set at once on two nodes) in which nobody fetches from the primary."""
        seen = {self.tree.host}
        while h not in seen:
            seen.add(h)
            nxt = connect_list(self.tree, self.res, h)
            if not nxt:
                return False
            h = nxt[0]
        return h == self.tree.host

    def available(self, name: str) -> int:
        """Bytes of a local copy that are completely written and may be replayed.

        While fetching, what this fetcher wrote (its tail is cut back at every start). While not
        fetching (switched off, after a restart), the copy at rest: nothing is appending to it.
        """
        if name in self.complete or self.active:
            return self.complete.get(name, 0)
        try:
            return (self._dir() / name).stat().st_size
        except FileNotFoundError:
            return 0

    def _start_position(self) -> tuple[int, str]:
        """The file to fetch next: the oldest copy replay still needs that is shorter than its
        finished length, else the newest local copy, or the one replay starts in.

        Copies are never fsynced, so a power cut can take the tail of an older, finished copy
        while a newer one survives: starting at the newest would leave replay waiting at the
        short one's end for bytes nobody fetches again (the power-loss campaign found it).
        """
        logs = list_logs(self.tree, self.res)
        link = read_replay(self.tree, self.res, self.tree.host) or ReplayLink(1, self.tree.get(
            f"{res_dir(self.res)}/primary") or "", 0, 0)
        logs = [f for f in logs if f.seq >= link.seq]
        if self._restore_lost(link, logs):
            logs = [f for f in list_logs(self.tree, self.res) if f.seq >= link.seq]
        # Rebuilt, not updated: a copy set aside meanwhile (invalidate) must not keep its old length.
        self.complete = {f.name: self._cut_incomplete(f) for f in logs}
        if not logs:
            return link.seq, link.origin
        for f in logs[:-1]:
            final = finished_length(self.tree, self.res, f.seq, f.origin)
            if f.origin != self.tree.host and final is not None and self.complete[f.name] < final:
                log.warning("resource %s: local copy %s holds %d of its %d bytes (cut by a crash); fetching "
                            "the rest again", self.res, f.name, self.complete[f.name], final)
                self.position = LogPos(f.seq, self.complete[f.name], f.origin)
                return f.seq, f.origin
        last = logs[-1]
        self.position = LogPos(last.seq, self.complete[last.name], last.origin)
        return last.seq, last.origin

    def _restore_lost(self, link: ReplayLink, logs: list[LogFile]) -> bool:
        """Put back an empty copy of every file replay still needs that a power cut took whole.

        A copy's directory entry is not synced either: a cut can take the file replay stands
        in (its position is durable), or one between two that survived. Only short copies were
        fetched again, so replay waited for ever at the end of a file whose copy was gone (it
        needs the copy for its version digest) or before a missing next one. The empty copy is
        short of its finished length, and the loop below fetches it like any short one.
        """
        have = {f.seq for f in logs}
        made = False
        for seq in range(link.seq, max(have, default=link.seq)):
            if seq in have:
                continue
            origin = link.origin if seq == link.seq else next_origin(self.tree, self.res, seq)
            if not origin or origin == self.tree.host:
                continue  # our own files are never fetched; unknown: nothing to ask for
            log.warning("resource %s: local copy %s is gone (a crash took it); fetching it again",
                        self.res, log_name(seq, origin))
            (self._dir() / log_name(seq, origin)).touch(mode=0o600)
            made = True
        return made

    def _cut_incomplete(self, f: LogFile) -> int:
        """The good prefix of a local file; a copy is cut back to it and fetched again from there.

        A copy is never fsynced (its source keeps the file), so after a power cut any of its
        unsynced bytes may be zeros or stale, not only a torn tail: such a copy is cut at its
        first bad record, as a torn one is, instead of stopping the fetch for good. Damage in a
        file of this node's own origin is still refused.

        A copy this process wrote (or verified) and nobody changed since (same inode, same
        length) is not read again: a power cut that could have taken its unsynced bytes kills
        this process too, and its successor scans. Reading every unreplayed copy whole at each
        start cost a catch-up seconds before its first byte (``marsadm connect`` after a
        disconnect, with replay paused behind GiBs of copies).
        """
        try:
            st = os.stat(f.path)
        except FileNotFoundError:
            return 0
        if self._mine.get(f.name) == (st.st_ino, st.st_size):
            return st.st_size
        r = f.scan()
        if r.error is not None:
            if not r.error.torn and f.origin == self.tree.host:
                raise lf.LogCorruption(r.error.file, r.error.offset, r.error.code, r.error.reason, False)
            if not r.error.torn:
                log.warning("resource %s: local copy %s damaged at %d (%s), unsynced before a crash; "
                            "cutting it there and fetching the rest again", self.res, f.name, r.end, r.error.reason)
            os.truncate(f.path, r.end)
        self._mine[f.name] = (st.st_ino, r.end)
        return r.end

    async def run(self) -> None:
        self.active = True
        try:
            await self._run()
        finally:
            self.active = False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        client: PeerClient | None = None
        tried: set[str] = set()  # sources failed since the last round through all of them
        while True:
            stop_if_stopping()
            try:
                seq, origin = await loop.run_in_executor(self.executor, self._start_position)
                if client is None:
                    sources = self.sources()
                    if not sources:
                        # No primary (marsadm secondary, or a handover under way): wait quietly.
                        self.error, self.source = None, None  # NO_PRIMARY says it; not a fetch failure
                        await asyncio.sleep(RETRY_S)
                        continue
                    self.source = next((h for h in sources if h not in tried), sources[0])
                    client = self.connect(self.source)
                await self._stream(client, seq, origin)
                # Returned: a more preferred source is listed now; go to it from the start.
                await client.close()
                client = None
                tried.clear()
            except (PeerError, OSError) as e:
                stop_if_stopping()
                self.error = f"from {self.source}: {e}"
                log.warning("resource %s: fetch from %s: %s", self.res, self.source, e)
                # A peer that answered with an error (no such file yet, emergency) is reached:
                # only a link that failed makes it a source to try after the others for a while.
                answered = client is not None and client.connected
                if client is not None:
                    await client.close()
                    client = None
                if self.source is not None:
                    tried.add(self.source)
                    if not answered:
                        self._failed[self.source] = time.monotonic()
                if any(h not in tried for h in self.sources()):
                    continue  # the next source in the list, at once
                tried.clear()
                await asyncio.sleep(RETRY_S)  # all failed: back-off before the next round
            except SpaceHeld as e:
                if self.error != str(e):
                    log.warning("resource %s: fetch holds: %s", self.res, e)
                self.error = str(e)
                if client is not None:
                    await client.close()
                    client = None
                await asyncio.sleep(RETRY_S)
            except lf.LogCorruption as e:
                self.error = f"local log copy damaged: {e}"
                log.error("resource %s: fetch stopped: %s", self.res, self.error)
                return

    async def _stream(self, client: PeerClient, seq: int, origin: str) -> None:
        """Copy log files from ``client`` until a more preferred source appears (then return).

        A pipeline: while the source has whole chunks beyond what is asked already (its last
        reply said how much it has), up to ``depth()`` chunks (at most ``DEPTH``) are in flight,
        spread over up to ``LINKS`` links (several on each: links are pipelined), and they are
        stored strictly in order. So the source's reading and encrypting, the transfer, and our
        decrypting and writing all overlap, and no link waits a round trip between two
        replies. Near the live end one long-polling request waits for more.
        """
        links = [client]
        self._opening = None
        self._backlog = Backlog()
        # (offset, bytes asked, link, request)
        inflight: deque[tuple[int, int, int, asyncio.Task[P.LogData]]] = deque()
        # How much of the current file the source has: first what its origin published (a
        # guess, so the first requests fill the pipe at once), then what the source's replies say.
        known, guessed = self._published(seq, origin), True
        self._better.clear()
        try:
            while True:
                name = log_name(seq, origin)
                path = self._dir() / name
                offset = self.complete.get(name, 0)
                final = finished_length(self.tree, self.res, seq, origin)
                if final is not None and offset >= final and not inflight:
                    # Complete here already (our own file of an earlier role, or a copy of more
                    # than the history that goes on holds): nothing to ask for. A file finished
                    # empty (an emergency's gap) still gets its empty copy: replay walks the files.
                    got, finished = 0, True
                    if final == 0 and not path.exists():
                        path.touch(mode=0o600)
                else:
                    self._fill(links, inflight, name, offset, known)
                    if not inflight:
                        # A file not copied yet is asked for without waiting: the answer (even an
                        # empty one) proves it exists there, and its copy here lets replay move
                        # on into it at once, not after a whole long poll of a file nobody writes.
                        inflight.append((offset, FETCH_BYTES, 0, _request(
                            self._fetch(links[0], name, offset, WAIT_MS if path.exists() else 0))))
                    _, asked, _, task = inflight.popleft()
                    reply = await self._reply_or_better(task)
                    if reply is None:
                        return  # a more preferred source: go to it from the start
                    self.error = None
                    self._failed.pop(self.source or "", None)
                    known = reply.size if guessed else max(known, reply.size)
                    guessed = False
                    self._fill(links, inflight, name, offset + len(reply.data), known)  # busy while we write
                    self._backlog.note(inflight, self.fetched_bytes)
                    got = await self._store(path, LogPos(seq, offset, origin), reply)
                    if not inflight:
                        self._backlog.end(self.res, self.source, len(links), self.fetched_bytes)
                    if got < asked and inflight:
                        await self._drain(inflight)  # a short reply: what was asked after it does not follow on
                    final = finished_length(self.tree, self.res, seq, origin)
                    finished = reply.finished or final is not None
                    if not got and not path.exists():
                        if self.source in self._fallbacks and not finished:
                            # A member answers empty for a copy it has not started (its own
                            # fetcher may be asking us for it): no proof the file exists. Two
                            # secondaries cut off together would make it for each other.
                            await asyncio.sleep(RETRY_S)
                        else:
                            path.touch(mode=0o600)
                preferred = self.sources()
                if preferred and (preferred.index(self.source) > 0 if self.source in preferred else True):
                    return
                done = offset + got
                if finished and done >= (final if final is not None else known) and not inflight:
                    nxt = next_origin(self.tree, self.res, seq + 1)
                    if nxt is None:
                        # Nobody has started the next file yet: a handover is under way.
                        await asyncio.sleep(RETRY_S)
                        continue
                    seq, origin = seq + 1, nxt
                    known, guessed = 0, False
                    self.on_data()
        finally:
            await self._drain(inflight, cancel=True)
            if self._opening is not None:
                self._opening.cancel()
                await asyncio.wait([self._opening])
                self._opening = None
            for extra in links[1:]:
                await extra.close()

    def _published(self, seq: int, origin: str) -> int:
        """How much of log file ``seq`` of ``origin`` its origin has acknowledged, as its
        ``replay-<origin>`` entry says (never past the file's finished length), else 0.

        A catch-up asks for that much at once, instead of waiting a round trip (0.4 s at 200 ms
        one way) for its first reply to say how much there is. Only a guess: a source that has
        less (a relay behind the origin, an entry older than this file) answers short or empty,
        which drains the rest as any short reply does, and from then on its replies alone count.
        """
        link = read_replay(self.tree, self.res, origin)
        if link is None or (link.seq, link.origin) != (seq, origin):
            return 0
        final = finished_length(self.tree, self.res, seq, origin)
        return link.pos if final is None else min(link.pos, final)

    async def _reply_or_better(self, task: asyncio.Task[P.LogData]) -> P.LogData | None:
        """The request's reply, or None when a better source appeared first (the request is
        cancelled; its link is closed by the caller, as the reply may still come on it)."""
        better = asyncio.ensure_future(self._better.wait())
        pending = True
        try:
            await asyncio.wait({task, better}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            better.cancel()
            pending = not task.done()
            if pending:
                # cancel() only asks: the task is not cancelled() yet, and its result() would
                # raise InvalidStateError (which ended the whole fetch task).
                task.cancel()
                task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return None if pending or task.cancelled() else task.result()

    def _fill(self, links: list[PeerClient], inflight: deque, name: str, offset: int, known: int) -> None:
        """Ask for more of what the source has, up to ``depth()`` requests in flight, each on the
        open link with the fewest outstanding.

        Whole chunks, and the part of one that the source has beyond them, asked for exactly:
        a catch-up's last bytes then follow the others on the wire, instead of being asked
        for a round trip later, once everything before them is stored.

        A further link (up to LINKS) is opened in the background the first time there is a
        backlog, and gets requests only once it is open: its handshakes take three round trips,
        in which the first link carries them all.
        """
        depth = max(1, min(DEPTH, self.depth()))
        next_off = inflight[-1][0] + inflight[-1][1] if inflight else offset
        if known - next_off >= FETCH_BYTES and len(links) < LINKS and self._opening is None:
            links.append(self.connect(self.source or ""))
            self._opening = _request(links[-1].open())
        while len(inflight) < depth and known > next_off and (inflight or known - next_off >= FETCH_BYTES):
            n = min(FETCH_BYTES, known - next_off)
            usable = [i for i, c in enumerate(links) if c.connected] or [0]
            idx = min(usable, key=lambda i: sum(1 for _, _, j, _ in inflight if j == i))
            inflight.append((next_off, n, idx, _request(self._fetch(links[idx], name, next_off, 0, n))))
            next_off += n

    @staticmethod
    async def _drain(inflight: deque, cancel: bool = False) -> None:
        """Forget requests in flight: wait for them (their link stays usable), or cancel them.

        ``asyncio.wait``, not ``await task``: a request's own error or cancellation is its
        link's business (the next request finds out again), but the fetcher's cancellation
        (marsd stopping, fetch switched off) must go through. Swallowing it here once kept a
        stopping marsd fetching from a dead peer forever.
        """
        while inflight:
            task = inflight.popleft()[-1]
            if cancel:
                task.cancel()
            await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved: a failed request is not an "exception never retrieved"

    async def _fetch(self, client: PeerClient, name: str, offset: int, wait_ms: int,
                     n: int = FETCH_BYTES) -> P.LogData:
        return await client.request(lambda req: P.FetchRequest(
            req=req, res=self.res, name=name, offset=offset, max_bytes=n, wait_ms=wait_ms),
            timeout=wait_ms / 1000 + 10)  # a silent link is noticed in seconds, not minutes

    async def _store(self, path: Path, at: LogPos, r: P.LogData) -> int:
        """Append a reply's bytes at ``at`` (where the copy ends); a reply that starts elsewhere is dropped."""
        if r.offset != at.offset or not r.data:
            return 0
        data = r.data
        floor = self.floor()
        if floor:
            # Only what leaves the reserve free is stored (a copy may end inside a record): the
            # directory reaches level 4, whose round stops the fetch, and never ENOSPC.
            st = await asyncio.get_running_loop().run_in_executor(self.executor, os.statvfs, path.parent)
            data = data[:max(0, st.f_bavail * st.f_frsize - floor)]
        if data:
            ino = await asyncio.get_running_loop().run_in_executor(self.executor, _append, path, data, r.offset)
            self.position = LogPos(at.seq, at.offset + len(data), at.origin)
            self.complete[at.name] = self.position.offset
            self._mine[at.name] = (ino, self.position.offset)
            self.fetched_bytes += len(data)
            self.stats.fetched_bytes += len(data)
            self.on_data()
        if len(data) < len(r.data):
            raise SpaceHeld(f"the MARS directory is down to its reserve of {floor / 2**20:.1f} MiB below the last "
                            f"free-space limit (required-free-space-4): fetch holds until there is room (see the "
                            f"EMERGENCY finding)")
        return len(data)


def _append(path: Path, data: bytes, offset: int) -> int:
    """Write ``data`` at ``offset`` of the copy; its inode number (what this process wrote)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        start = offset
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
        start_writeout(fd, start, offset - start)  # the replayer drops it from the cache once on disk
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)
