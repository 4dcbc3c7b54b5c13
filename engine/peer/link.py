"""Peer links over TLS (port 7777): asyncio around the sans-I/O peer protocol.

One TLS connection per purpose (tree exchange, a resource's fetch, a resource's sync), so a slow
log fetch never delays the tree exchange. On each, the peer answers requests in the order they
came, one after the other; the client may send many before the first reply is back (PeerClient
is pipelined: a long path does not idle a round trip per request); a message
with ``req`` 0 (a tree feed) is one-way and never answered, not even with an error. Both ends
are authenticated by the cluster CA (see credentials.py); on top of that, the host name a peer
claims in its Hello must be the name in its certificate, and its cluster id must be ours. A peer
that fails any of this is dropped before it sees a single tree entry or log byte.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol as P
from ..credentials import CredentialError, peer_host
from ..errors import MarsError
from ..ratelimit import RateLimit, Traffic

log = logging.getLogger("mars.peer")

DEFAULT_PORT = P.DEFAULT_PORT
READ_CHUNK = 4 << 20
HANDSHAKE_TIMEOUT = 10.0  # seconds a client may take for its TLS handshake
CONNECT_TIMEOUT = 5.0
#: TCP keepalive on every peer link: probes after 5 s of silence, every 2 s, 3 unanswered end the
#: link (about 11 s). A fetch long-polls for 30 s; without this, a peer that vanished without a
#: word (a cut cable, a partition) would be noticed only when the poll's own timeout ran out.
KEEPALIVE = (5, 2, 3)
USER_TIMEOUT_MS = 15_000  # sent data unacknowledged this long ends the link too


def _keepalive(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    except OSError:
        pass  # not TCP (a test's socketpair): nothing to keep alive


class PeerError(MarsError):
    """A peer link failed: unreachable, refused, or the peer answered with an error."""


Handler = Callable[[Any, str], Awaitable[Any]]


def _check_identity(conn: P.PeerConnection, writer: asyncio.StreamWriter, cluster: str) -> str:
    hello = conn.peer_hello
    assert hello is not None
    sslobj = writer.get_extra_info("ssl_object")
    try:
        cert_host = peer_host(sslobj) if sslobj is not None else None
    except CredentialError as e:  # an NBD client certificate, a certificate naming no valid host
        raise PeerError(e.what, e.remedy) from None
    if cert_host != hello.host:
        raise PeerError(f"peer says it is {hello.host!r} but its certificate names {cert_host!r}",
                        "the peer's credential belongs to another host; re-join it with its own name")
    # An empty cluster id is a node in the middle of join-cluster: its certificate, signed by our
    # CA, is what admits it; it learns the id from our tree.
    if hello.cluster and hello.cluster != cluster:
        raise PeerError(f"peer {hello.host} belongs to cluster {hello.cluster}, not {cluster}",
                        "join it to this cluster first ('marsadm join-cluster')")
    return hello.host


async def _next_message(conn: P.PeerConnection, reader: asyncio.StreamReader, limit: RateLimit | None = None,
                        idle: float | None = None) -> Any:
    """The next message; ``idle``: seconds the link may stay silent before TimeoutError.

    Silence, not the whole message: a reply held back by a traffic limit (ours or the
    sender's) takes as long as the limit says, and is as healthy as long as bytes come.
    """
    while True:
        ev = conn.next_event()
        if ev is not P.NEED_DATA:
            return ev
        data = await asyncio.wait_for(reader.read(READ_CHUNK), idle)
        # Buffered before the limit is charged: a reader cancelled while it waits on the limit
        # (its link closed, or a pipelined caller gone) must not drop bytes of the stream.
        conn.receive_data(data)
        if limit is not None:
            # Not reading on is what slows the sender: TCP's window closes behind us.
            await limit.take(len(data))


SEND_SLICE = 256 << 10


async def _send(writer: asyncio.StreamWriter, bufs: list, limit: RateLimit | None = None) -> None:
    """Write in slices, draining between them.

    asyncio keeps unsent bytes in one bytearray and shifts it on every partial send; handing it a
    16 MiB log chunk at once makes that quadratic. Slices keep the buffer near its high-water mark,
    and a traffic limit charged per slice holds the rate smoothly and changes within one slice.
    """
    for buf in bufs:
        view = memoryview(buf)
        for i in range(0, len(view), SEND_SLICE):
            piece = view[i:i + SEND_SLICE]
            if limit is not None:
                await limit.take(len(piece))
            writer.write(piece)
            await writer.drain()


#: What a failed handshake's OpenSSL reason means for the operator reading marsd's log.
_HANDSHAKE_HINTS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client shows no certificate (only nodes of this cluster may connect)",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this node's certificate (another cluster's node?)",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate is not signed by this cluster's CA",
    "HTTP_REQUEST": "the client speaks HTTP, not TLS",
    "WRONG_VERSION_NUMBER": "the client does not speak TLS 1.3",
    "UNSUPPORTED_PROTOCOL": "the client does not speak TLS 1.3",
}

#: Replies that carry a device's or a log's bytes: what the traffic-out-limit holds back.
BULK_REPLIES = (P.LogData, P.ReadReply)


class PeerServer:
    """Accepts authenticated peers and answers their requests with ``handler(msg, peer_host)``."""

    def __init__(self, hello: Callable[[], P.Hello], ctx: ssl.SSLContext, cluster: str, handler: Handler,
                 traffic: Traffic | None = None) -> None:
        self._hello = hello
        self._out = traffic.out if traffic is not None else None
        self._ctx = ctx
        self._cluster = cluster
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        # TLS starts per connection in _serve, not in the server: a failed handshake (a client
        # without the cluster's certificate, one that speaks no TLS) then reaches marsd's log;
        # asyncio's own handshake reports it only in its debug mode.
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        addr = writer.get_extra_info("peername")
        _keepalive(writer)
        conn = P.PeerConnection(self._hello())
        who = f"{addr[0]}:{addr[1]}" if addr else "?"
        try:
            try:
                await writer.start_tls(self._ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                if isinstance(e, (ConnectionResetError, asyncio.IncompleteReadError)):
                    # A port probe (a monitoring check's connect) looks like this too: no warning.
                    log.info("peer %s: closed the connection during its TLS handshake", who)
                    return
                reason = getattr(e, "reason", None) or str(e) or type(e).__name__
                log.warning("peer %s: TLS handshake failed: %s; closing that connection", who,
                            _HANDSHAKE_HINTS.get(reason, reason))
                return
            writer.write(conn.initial_bytes())
            first = await _next_message(conn, reader)
            if not isinstance(first, P.Hello):
                return
            who = _check_identity(conn, writer, self._cluster)
            while True:
                msg = await _next_message(conn, reader)
                if isinstance(msg, (P.Closed, P.Bye)):
                    return
                req = getattr(msg, "req", 0)
                try:
                    reply = await self._handler(msg, who)
                except MarsError as e:
                    if not req:
                        # A one-way message (a feed) has nobody waiting for an answer: an answer
                        # would be read as the reply to the sender's next request.
                        log.warning("peer %s: %s; %s", who, e.what, e.remedy)
                        continue
                    reply = P.ErrorReply(req=req, code="refused", what=e.what, remedy=e.remedy)
                if not req:
                    continue
                for m in reply if isinstance(reply, list) else [reply] if reply is not None else []:
                    await _send(writer, conn.send_buffers(m), self._out if isinstance(m, BULK_REPLIES) else None)
        except P.PeerProtocolError as e:
            log.warning("peer %s: protocol error: %s; closing that link", who, e.reason)
        except PeerError as e:
            log.warning("peer %s refused: %s", who, e)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError, OSError) as e:
            log.debug("peer %s: link closed: %s", who, e)
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


class PeerClient:
    """One link to a peer for one purpose; ``request`` sends a message and returns its reply.

    Pipelined: any number of requests may be outstanding on the link at once. A request is
    written as soon as the link is free for writing, not when the previous reply has arrived,
    so a long path does not idle a round trip per request (a fetch over 50 ms one way moved
    one reply per 0.1 s + transfer on each link before). The peer handles a link's requests one
    after the other (PeerServer._serve), so replies come in the order asked; each still finds
    its caller by its ``req`` id, and one that comes for a request nobody is owed is a
    protocol error. One reader task per link reads while any reply is due and hands each to
    its caller; a caller that gives up (cancelled) leaves its place, and its reply is dropped
    when it comes, so the stream stays in step.
    """

    def __init__(self, ip: str, port: int, hello: P.Hello, ctx: ssl.SSLContext, cluster: str | None,
                 local_ip: str | None = None, traffic: Traffic | None = None) -> None:
        self.ip = ip
        # A fetch or sync link: what it receives counts against the node's traffic-in-limit.
        self._in = traffic.inn if traffic is not None else None
        self.port = port
        # Leave from this node's own address (the one it listens on), not whatever the route
        # picks: peers and firewalls then see every link of a node come from one address.
        self.local_ip = local_ip
        self._hello = hello
        self._ctx = ctx
        self._cluster = cluster
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn: P.PeerConnection | None = None
        self._ids = itertools.count(1)
        # Held while connecting and while one frame is written: frames never interleave. Not
        # held while a reply is awaited: that is what lets requests overlap.
        self._lock = asyncio.Lock()
        #: The requests of the current connection whose replies are due, in the order sent:
        #: req id -> (the caller's future, seconds the link may stay silent while it is next).
        #: A new dict per connection, so a reader of a closed one never touches the next one's.
        self._due: dict[int, tuple[asyncio.Future[tuple[Any, tuple[P.Entry, ...]]], float]] = {}
        self._reading: asyncio.Task[None] | None = None
        self.peer: str | None = None
        self.peer_hello: P.Hello | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def outstanding(self) -> int:
        """Requests sent on this link whose replies have not arrived yet (given-up ones too)."""
        return len(self._due)

    @property
    def local_address(self) -> str | None:
        """The address this end of the link left from (what the peer sees), once connected."""
        name = self._writer.get_extra_info("sockname") if self._writer is not None else None
        return name[0] if name else None

    async def connect(self) -> None:
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.ip, self.port, ssl=self._ctx, server_hostname=None,
                                        local_addr=(self.local_ip, 0) if self.local_ip else None),
                CONNECT_TIMEOUT)
        except ssl.SSLCertVerificationError as e:
            # It answered, so it runs and the port is open: its certificate is another cluster's.
            self._reader = self._writer = None
            raise PeerError(f"peer {self.ip}:{self.port} {P.FOREIGN_CERT} "
                            f"({e.verify_message or e.reason}): it belongs to another cluster, or its tree was "
                            "made anew", "check that the ips/ip-<node> entry names the right address; a node "
                            "whose tree was made anew joins again: on it, 'marsadm join-cluster <ip of a node> "
                            "--secret-file <file>'") from None
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
            self._reader = self._writer = None
            raise PeerError(f"cannot reach peer {self.ip}:{self.port}: {str(e) or type(e).__name__}",
                            "check that marsd runs there, the address is right and the port is open") from None
        _keepalive(self._writer)
        self._conn = P.PeerConnection(self._hello)
        self._due = {}
        self._writer.write(self._conn.initial_bytes())
        try:
            first = await asyncio.wait_for(_next_message(self._conn, self._reader), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ssl.SSLError, P.PeerProtocolError) as e:
            await self.close()
            raise PeerError(f"peer {self.ip}:{self.port} did not complete the handshake: {e}",
                            "is it a marsd of this cluster?") from None
        if not isinstance(first, P.Hello):
            await self.close()
            raise PeerError(f"peer {self.ip}:{self.port} closed the link during the handshake",
                            "it does not accept this host's credential; check the cluster")
        cluster = self._cluster if self._cluster is not None else first.cluster
        try:
            self.peer = _check_identity(self._conn, self._writer, cluster)
        except PeerError:
            await self.close()
            raise
        self.peer_hello = first

    async def open(self) -> None:
        """Connect now unless connected: a request connects by itself, this opens a link ahead
        of its first request (the fetcher's second link, while the first carries the requests)."""
        async with self._lock:
            if not self.connected:
                await self.connect()

    async def request(self, make: Callable[[int], Any], timeout: float = 60.0) -> Any:
        """Send ``make(req_id)`` and return the reply; an ErrorReply becomes a PeerError.
        ``timeout``: seconds the link may stay silent while this reply is the next one due
        (a reply queued behind another's long poll is not timed while that one waits)."""
        async with self._lock:
            if not self.connected:
                await self.connect()
            assert self._conn is not None and self._writer is not None and self._reader is not None
            req = next(self._ids)
            msg = make(req)
            due = self._due
            fut: asyncio.Future[tuple[Any, tuple[P.Entry, ...]]] = asyncio.get_running_loop().create_future()
            due[req] = (fut, timeout)
            try:
                await _send(self._writer, self._conn.send_buffers(msg))
            except (OSError, ssl.SSLError) as e:
                raise self._break(due, f"failed: {str(e) or type(e).__name__}") from None
            except BaseException:
                # Cancelled with the frame perhaps half-written: nothing more can follow it on
                # this stream, so the link goes (every caller waiting on it is told).
                self._break(due, "was given up in the middle of a request")
                raise
            # Not when the link ended meanwhile (its reader failed, or close()): fut says so.
            if not fut.done() and (self._reading is None or self._reading.done()):
                self._reading = asyncio.ensure_future(self._read_replies(self._conn, self._reader, due))
        # Cancelling this await cancels fut: the reader drops the reply when it comes.
        reply, pushed = await fut
        if isinstance(reply, P.ErrorReply):
            raise PeerError(f"peer {self.peer}: {reply.what}", reply.remedy)
        if pushed and isinstance(reply, (P.TreeEntries, P.TreeChanges)):
            reply = dataclasses.replace(reply, entries=pushed + reply.entries)
        return reply

    async def _read_replies(self, conn: P.PeerConnection, reader: asyncio.StreamReader,
                            due: dict[int, tuple[asyncio.Future[Any], float]]) -> None:
        """Read the link's replies while any is due and give each to its caller.

        The silence allowed is that of the request answered next (the oldest due). A listing
        too large for one frame comes first as unasked parts (TreeEntries with ``req`` 0): they
        belong to the reply that follows them.
        """
        pushed: list[P.Entry] = []
        try:
            while due:
                _, idle = next(iter(due.values()))
                msg = await _next_message(conn, reader, self._in, idle=idle)
                if isinstance(msg, P.TreeEntries) and msg.req == 0:
                    pushed.extend(msg.entries)
                    continue
                if isinstance(msg, (P.Closed, P.Bye)):
                    self._break(due, "was closed by the peer", f"peer {self.peer or self.ip} closed the link")
                    return
                req = getattr(msg, "req", 0)
                if isinstance(msg, P.ErrorReply) and req == 0:
                    # About the link, not a request: the peer refuses it.
                    self._break(due, "", f"peer {self.peer or self.ip}: {msg.what}", msg.remedy)
                    return
                entry = due.pop(req, None)
                if entry is None:
                    raise P.PeerProtocolError(f"a {type(msg).__name__} for request {req}, which is not due")
                fut = entry[0]
                if not fut.done():  # not given up by its caller
                    fut.set_result((msg, tuple(pushed)))
                pushed = []
        except (OSError, asyncio.TimeoutError, ssl.SSLError, P.PeerProtocolError) as e:
            self._break(due, f"failed: {str(e) or type(e).__name__}")
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("peer link to %s: reading replies failed", self.peer or self.ip)
            self._break(due, f"failed: {type(e).__name__}")
        finally:
            if due:  # cancelled (the link closed, the loop ending): nobody reads for them any more
                self._break(due, "was closed")

    def _break(self, due: dict[int, tuple[asyncio.Future[Any], float]], how: str, what: str = "",
               remedy: str = "it is retried") -> PeerError:
        """End the connection whose requests are ``due`` now: every caller waiting on it gets
        the PeerError (returned, for a caller that raises it itself). Synchronous, so that a
        reader or a cancelled sender can do it without a turn in which another request could
        be written onto the broken stream."""
        err = PeerError(what or f"link to {self.peer or self.ip} {how}", remedy)
        for fut, _ in due.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # a caller that has given up never reads it: not "never retrieved"
        due.clear()
        if due is self._due:  # still this client's connection, not one closed already
            w, self._writer, self._reader = self._writer, None, None
            if w is not None:
                w.close()
            reading, self._reading = self._reading, None
            if reading is not None and reading is not asyncio.current_task():
                reading.cancel()
        return err

    async def push(self, msg: Any) -> None:
        """Send a one-way message (``req`` 0, a feed): nothing answers it."""
        async with self._lock:
            if not self.connected:
                await self.connect()
            assert self._conn is not None and self._writer is not None
            try:
                await _send(self._writer, self._conn.send_buffers(msg))
            except (OSError, ssl.SSLError) as e:
                raise self._break(self._due, f"failed: {str(e) or type(e).__name__}") from None
            except BaseException:
                self._break(self._due, "was given up in the middle of a message")
                raise

    async def close(self) -> None:
        due, self._due = self._due, {}
        for fut, _ in due.values():
            if not fut.done():
                fut.set_exception(PeerError(f"link to {self.peer or self.ip} closed", "it is retried"))
                fut.exception()
        reading, self._reading = self._reading, None
        if reading is not None and reading is not asyncio.current_task():
            reading.cancel()
        w, self._writer = self._writer, None
        self._reader = None
        if w is not None:
            try:
                if self._conn is not None:
                    w.write(self._conn.send(P.Bye(reason="closing")))
            except Exception:
                pass
            w.close()
            try:
                await asyncio.wait_for(w.wait_closed(), 2)
            except asyncio.CancelledError:
                # The link's own end may come as a cancellation; ours (marsd stopping, a task
                # switched off) must go through, or the caller loops on as if nothing happened.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
            except Exception:
                pass  # closing a link that is broken already: nothing more to do
