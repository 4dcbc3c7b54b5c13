"""The control socket's server: marsd's status, live, for local tools (marsadm view, mars-status,
exporters; their half is :mod:`mars.engine.model.client`).

``<mars-dir>/control.sock`` is a unix stream socket, mode 0600 inside the 0700 tree: status can
name devices, hosts and errors, so only root (the tree's owner) may read it. It is read-only;
desired state still goes through the tree (``marsadm``), so the tree stays the one source of
truth and every tool keeps working when marsd is down.

Protocol: newline-delimited JSON. The client sends one request line.

* ``{"cmd": "snapshot"}`` -> one line ``{"snapshot": {...}, "findings": [...], "counters": {...},
  "marsd_pid": N, "seq": S}``, then the server closes. ``seq`` is the bus's newest event when the
  snapshot was taken; ``counters`` are marsd's counters (:mod:`mars.engine.stats`) as of the reply.
* ``{"cmd": "counters"}`` -> one line ``{"counters": {...}, "local_host": H, "marsd_pid": N}``:
  only the counters, for a face that builds its snapshot from the tree anyway (mars-exporter
  scrapes often, and the snapshot line is hundreds of KiB on a big cluster).
* ``{"cmd": "events"}`` -> the snapshot line first, then one line per bus event (``log``,
  ``finding``, ``state``; see :mod:`.bus`) until the client goes away. A client that falls behind
  gets ``{"kind": "lagged"}`` (when there is room for it) and is disconnected: it should
  reconnect, and the snapshot line it then gets first tells it what it missed.
* anything else -> ``{"error": ..., "remedy": ...}``.

Why a reader can never hurt marsd: every connection writes through a bounded transport buffer,
waits for it to drain at most ``DRAIN_TIMEOUT`` seconds, and its bus queue is bounded too; past
either bound the connection is dropped. While a reader follows the events, the snapshot is
rebuilt after every reconcile round that changed the tree, and at least once a second (in the
disk executor); a request is served from that copy, so a busy poller costs marsd a socket write,
not a tree scan. With nobody following, no round builds one (an idle node would spend most of
its CPU on snapshots nobody reads): a request then builds it, unless the tree is as it was
when the latest one was built (``version``, marsd's change number) and that is less than a
second ago.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

from ..model import snapshot as model
from ..model.client import CONTROL_NAME
from ..model.findings import findings
from .bus import Bus, Subscription

log = logging.getLogger("mars.control")

REQUEST_LIMIT = 64 << 10  # bytes in one request line
REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request line
DRAIN_TIMEOUT = 5.0  # seconds a reader may leave a full buffer unread before it is dropped
WRITE_HIGH = 256 << 10  # transport write buffer high-water mark per connection
SEND_BUFFER = 64 << 10  # kernel send buffer per connection (SO_SNDBUF)
QUEUE_EVENTS = 1000  # bus events a reader may be behind before it is dropped
FRESH_S = 1.0  # a snapshot this old is served as it is; an older one is built anew first
USAGE = 'send one JSON line: {"cmd": "snapshot"}, {"cmd": "counters"} or {"cmd": "events"}'

StateKey = tuple[str | None, str, str]  # (resource or None for the node itself, node, field)


# --- what changed between two rounds (pure) -----------------------------------------------------

def finding_key(f: dict[str, Any]) -> tuple[Any, Any, Any]:
    """A finding's identity across rounds: its text may change (a percentage), its key does not."""
    return f.get("code"), f.get("res"), f.get("node")


def finding_changes(old: dict[tuple, dict], new: dict[tuple, dict]) -> list[tuple[str, dict]]:
    """("raised", finding) for keys new in ``new``, ("cleared", finding) for keys gone from ``old``."""
    out = [("cleared", f) for k, f in old.items() if k not in new]
    out += [("raised", f) for k, f in new.items() if k not in old]
    return out


def node_states(snap: model.Snapshot) -> dict[StateKey, Any]:
    """The few per-node facts whose changes are worth an event, coarse enough not to chatter.

    Sync progress is floored to whole percents, so 100 means complete and a sync of many GiB
    makes at most 100 events; fetch and replay say only whether they have reached the log end.
    """
    out: dict[StateKey, Any] = {}
    for h, n in snap.nodes.items():
        out[(None, h, "alive")] = n.alive
    for res, r in snap.resources.items():
        for h, nr in r.nodes.items():
            out[(res, h, "role")] = nr.role
            out[(res, h, "sync_percent")] = math.floor(nr.sync.percent)
            out[(res, h, "fetch_reached")] = None if nr.fetch is None else nr.fetch.reached
            out[(res, h, "replay_reached")] = None if nr.replay is None else nr.replay.reached
            for name in ("attach", "fetch", "sync", "replay"):
                out[(res, h, f"switch_{name}")] = getattr(nr.switches, name)
    return out


def state_changes(old: dict[StateKey, Any], new: dict[StateKey, Any]) -> list[dict[str, Any]]:
    """One ``state`` event body per key whose value differs (None for appeared or gone)."""
    keys = sorted(old.keys() | new.keys(), key=lambda k: (k[0] or "", k[1], k[2]))
    return [{"res": k[0], "node": k[1], "field": k[2], "old": old.get(k), "new": new.get(k)}
            for k in keys if old.get(k) != new.get(k)]


def _encode(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


# --- the server, inside marsd -------------------------------------------------------------------

class ControlServer:
    """marsd's end: keeps the latest snapshot, publishes what changed, serves the socket."""

    def __init__(self, mars_dir: Path, host: str, bus: Bus, executor: Executor | None = None,
                 counters: Callable[[], dict[str, Any]] | None = None,
                 version: Callable[[], int] | None = None) -> None:
        self.path = Path(mars_dir) / CONTROL_NAME
        self.counters = counters  # marsd's live counters (engine/stats.py), read at every reply
        self.mars_dir = Path(mars_dir)
        self.host = host
        self.bus = bus
        self.executor = executor
        self.queue_events = QUEUE_EVENTS
        self.drain_timeout = DRAIN_TIMEOUT
        self._server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._latest: tuple[str, str, int] | None = None  # snapshot JSON, findings JSON, bus seq
        self._built = -math.inf  # monotonic time the latest snapshot was built
        self.version = version  # the tree's change number: a snapshot of an unchanged tree stays true
        self._built_version: int | None = None
        self._findings: dict[tuple, dict] = {}
        self._states: dict[StateKey, Any] = {}
        self._failing = False

    # -- the round's snapshot -----------------------------------------------------------------

    async def refresh(self, changed: bool = True) -> None:
        """After a reconcile round: rebuild the snapshot and publish what changed. Never raises.

        Only while someone follows the events (see the module), and only when the round
        ``changed`` the tree or the last build is FRESH_S old. Status is a by-product of
        replication: a bug here is logged (once, until it heals) and must not stop the round
        that called it.
        """
        if not self.bus.subscribers or (not changed and time.monotonic() - self._built < FRESH_S):
            return
        try:
            self._adopt(*await self._in_thread(self._build), publish=self._latest is not None)
        except Exception:
            if not self._failing:
                log.exception("status snapshot failed (replication goes on)")
            self._failing = True
            return
        if self._failing:
            log.info("status snapshot works again")
        self._failing = False

    def _build(self) -> tuple[model.Snapshot, list[dict], str, str]:
        """Disk-bound (one pass over the tree) and JSON-heavy: runs in the executor."""
        self._built = time.monotonic()
        self._built_version = self.version() if self.version is not None else None
        snap = model.build(self.mars_dir, self.host, debug_lines=self.bus.recent_lines())
        found = [f.to_json() for f in findings(snap)]
        return snap, found, json.dumps(snap.to_json(), separators=(",", ":"), default=str), \
            json.dumps(found, separators=(",", ":"), default=str)

    async def _in_thread(self, fn: Callable[[], Any]) -> Any:
        if self.executor is None:
            return fn()
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)

    def _adopt(self, snap: model.Snapshot, found: list[dict], snap_json: str, found_json: str,
               publish: bool) -> None:
        """Make ``snap`` the latest; with ``publish``, first send what changed since the previous one.

        The very first snapshot is a baseline, not news: events always mean "changed since the
        snapshot line you got first", so a reader never sees a burst of None -> value events.
        """
        now = {finding_key(f): f for f in found}
        states = node_states(snap)
        if publish:
            for change, f in finding_changes(self._findings, now):
                self.bus.publish("finding", change=change, finding=f)
            for body in state_changes(self._states, states):
                self.bus.publish("state", **body)
        self._findings, self._states = now, states
        self._latest = (snap_json, found_json, self.bus.seq)

    async def _snapshot_line(self) -> bytes:
        """The reply to ``snapshot``: the latest one, built now when it is older than FRESH_S.

        Built here, it is news to nobody: the rounds publish changes while someone follows, and
        then the latest one is fresh; a new follower takes this line as its starting point.
        """
        stale = self._built_version is None or self.version is None or self.version() != self._built_version
        if self._latest is None or stale or time.monotonic() - self._built >= FRESH_S:
            built = await self._in_thread(self._build)
            self._adopt(*built, publish=False)
        assert self._latest is not None
        snap_json, found_json, seq = self._latest
        # The counters are read now, not with the round's snapshot: a scrape's rate is then
        # exact to the request, and they cost a few dicts, not a tree scan.
        counters = json.dumps(self.counters(), separators=(",", ":")) if self.counters is not None else "null"
        return (f'{{"snapshot":{snap_json},"findings":{found_json},"counters":{counters},'
                f'"marsd_pid":{os.getpid()},"seq":{seq}}}\n').encode()

    # -- the socket ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``control.sock``, replacing a stale one a killed marsd left behind.

        The mode is set on the socket before ``bind`` (Linux takes the new file's mode from the
        socket's inode), so the file never exists with a wider mode, not even for an instant,
        and no process-wide umask is touched while executor threads may create files.
        """
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), 0o600)
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)  # for kernels that ignore the socket inode's mode
            sock.listen(64)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=REQUEST_LIMIT)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stop listening, drop every connection, remove the socket file."""
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._conns.items()):
            writer.transport.abort()
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2)
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = writer
        who = _peer(writer)
        graceful = True
        try:
            _bound(writer)
            req = await self._request(reader)  # first, so every client gets its reply after its request
            if who[1] not in (0, os.geteuid()):
                writer.write(_encode({"error": f"uid {who[1]} may not read marsd's status",
                                      "remedy": "run the tool as root"}))
            elif isinstance(req, str):
                writer.write(_encode({"error": req, "remedy": USAGE}))
            elif req.get("cmd") == "snapshot":
                log.debug("control: snapshot for pid %s", who[0])
                writer.write(await self._snapshot_line())
            elif req.get("cmd") == "counters":
                writer.write(_encode({"counters": self.counters() if self.counters is not None else None,
                                      "local_host": self.host, "marsd_pid": os.getpid()}))
            elif req.get("cmd") == "events":
                log.debug("control: events for pid %s", who[0])
                graceful = await self._events(reader, writer, who)
            else:
                writer.write(_encode({"error": f"unknown command {req.get('cmd')!r}", "remedy": USAGE}))
        except (ConnectionError, OSError) as e:
            log.debug("control: client pid %s: %s", who[0], e)
            graceful = False
        except Exception as e:  # a bug here must cost one reply, never marsd
            log.exception("control: request of pid %s failed", who[0])
            writer.write(_encode({"error": f"marsd could not answer: {e!r}", "remedy": "see marsd's log"}))
        finally:
            self._conns.pop(task, None)
            await self._finish(writer, graceful)

    async def _request(self, reader: asyncio.StreamReader) -> dict[str, Any] | str:
        """The client's request, or why it is not one."""
        try:
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
        except TimeoutError:
            return f"no request line within {REQUEST_TIMEOUT:g} s"
        except ValueError:
            return f"request line longer than {REQUEST_LIMIT} bytes"
        try:
            req = json.loads(line)
        except ValueError:
            return f"request is not JSON: {line[:80]!r}"
        except RecursionError:  # 64 KiB of "[" or '{"a":' nest deeper than the parser recurses
            return f"request nests too deep to be a request: {line[:80]!r}"
        return req if isinstance(req, dict) else "request is not a JSON object"

    async def _events(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      who: tuple[int, int]) -> bool:
        """Stream bus events until the client leaves or lags; True when it ended in order.

        Subscribing before taking the snapshot line means no change falls between the two (at
        worst one appears in both).
        """
        sub = self.bus.subscribe(self.queue_events)
        try:
            writer.write(await self._snapshot_line())
            pump = asyncio.ensure_future(self._pump(sub, writer, who))
            gone = asyncio.ensure_future(_until_hangup(reader, writer))
            try:
                await asyncio.wait([pump, gone], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (pump, gone):
                    t.cancel()
                await asyncio.gather(pump, gone, return_exceptions=True)
            if not pump.cancelled() and pump.exception() is None:
                return pump.result()
            log.debug("control: events reader pid %s left", who[0])
            return False
        finally:
            sub.close()

    async def _pump(self, sub: Subscription, writer: asyncio.StreamWriter, who: tuple[int, int]) -> bool:
        """Bus -> socket. False when the reader was dropped for not keeping up."""
        while True:
            if not await self._drained(writer):
                log.warning("control: events reader pid %s did not read for %g s; dropped it",
                            who[0], self.drain_timeout)
                return False
            ev = await sub.get()
            if ev is None:
                if not sub.lagged:
                    return True
                log.warning("control: events reader pid %s fell %d events behind; dropped it",
                            who[0], sub.maxsize)
                return self._say_lagged(writer)
            writer.write(_encode(ev))

    def _say_lagged(self, writer: asyncio.StreamWriter) -> bool:
        """Tell a lagging reader why it is dropped, if its buffer has room; True if it was told."""
        if writer.transport.get_write_buffer_size() < WRITE_HIGH:
            writer.write(_encode({"kind": "lagged"}))
            return True
        return False

    async def _drained(self, writer: asyncio.StreamWriter) -> bool:
        """False when the reader left a full buffer unread too long; ConnectionError when it is gone."""
        try:
            await asyncio.wait_for(writer.drain(), self.drain_timeout)
            return True
        except TimeoutError:
            return False

    async def _finish(self, writer: asyncio.StreamWriter, graceful: bool) -> None:
        """Close after the reply is out; abort (discarding the buffer) when the reader will not read."""
        if graceful and not writer.transport.is_closing():
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), self.drain_timeout)
                return
            except (TimeoutError, OSError):
                pass
        writer.transport.abort()


def _bound(writer: asyncio.StreamWriter) -> None:
    """Per-connection buffer limits: what a reader that stops reading can cost marsd."""
    writer.transport.set_write_buffer_limits(high=WRITE_HIGH)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


def _peer(writer: asyncio.StreamWriter) -> tuple[int, int]:
    """(pid, uid) of the connected process, from the kernel (SO_PEERCRED), not from the client."""
    sock = writer.get_extra_info("socket")
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        return pid, uid
    except (OSError, AttributeError):
        return -1, -1


async def _until_hangup(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Returns when the client has closed its socket; anything it sends after the request is ignored.

    End of input alone is not enough: ``socat``/``nc`` shut down their sending side after the
    request and go on reading. Only a full close (POLLHUP) ends the stream here, so a dead reader
    releases its subscription at once, not at the next event's failed write.
    """
    while await reader.read(4096):
        pass
    if not _hung_up(writer.get_extra_info("socket")):
        # Half-closed: the client still reads. A later full close shows as a failed write.
        await asyncio.get_running_loop().create_future()


def _hung_up(sock: socket.socket | None) -> bool:
    """Whether the peer closed both directions (POLLHUP), not just its sending side."""
    if sock is None:
        return True
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))
