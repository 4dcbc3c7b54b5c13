"""Peer links over TLS (port 7777): asyncio around the sans-I/O peer protocol.

One TLS connection per purpose (tree exchange, a resource's fetch, a resource's sync), each a
strict request → reply sequence, so a slow log fetch never delays the tree exchange; a message
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
        if limit is not None:
            # Not reading on is what slows the sender: TCP's window closes behind us.
            await limit.take(len(data))
        conn.receive_data(data)


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
    """One link to a peer for one purpose; ``request`` sends a message and returns its reply."""

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
        self._lock = asyncio.Lock()
        self.peer: str | None = None
        self.peer_hello: P.Hello | None = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

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

    async def request(self, make: Callable[[int], Any], timeout: float = 60.0) -> Any:
        """Send ``make(req_id)`` and return the reply; an ErrorReply becomes a PeerError.
        ``timeout``: seconds the link may stay silent meanwhile."""
        async with self._lock:
            if not self.connected:
                await self.connect()
            assert self._conn is not None and self._writer is not None and self._reader is not None
            req = next(self._ids)
            try:
                await _send(self._writer, self._conn.send_buffers(make(req)))
                pushed: list[P.Entry] = []
                while True:
                    reply = await _next_message(self._conn, self._reader, self._in, idle=timeout)
                    if not (isinstance(reply, P.TreeEntries) and reply.req == 0):
                        break
                    pushed.extend(reply.entries)  # a listing too large for one frame: the first parts
            except (OSError, asyncio.TimeoutError, ssl.SSLError, P.PeerProtocolError) as e:
                await self.close()
                raise PeerError(f"link to {self.peer or self.ip} failed: {str(e) or type(e).__name__}",
                                "it is retried") from None
            if isinstance(reply, P.Closed):
                await self.close()
                raise PeerError(f"peer {self.peer or self.ip} closed the link", "it is retried")
            if isinstance(reply, P.ErrorReply):
                raise PeerError(f"peer {self.peer}: {reply.what}", reply.remedy)
            if pushed and isinstance(reply, (P.TreeEntries, P.TreeChanges)):
                reply = dataclasses.replace(reply, entries=tuple(pushed) + reply.entries)
            return reply

    async def push(self, msg: Any) -> None:
        """Send a one-way message (``req`` 0, a feed): nothing answers it."""
        async with self._lock:
            if not self.connected:
                await self.connect()
            assert self._conn is not None and self._writer is not None
            try:
                await _send(self._writer, self._conn.send_buffers(msg))
            except (OSError, ssl.SSLError) as e:
                await self.close()
                raise PeerError(f"link to {self.peer or self.ip} failed: {str(e) or type(e).__name__}",
                                "it is retried") from None

    async def close(self) -> None:
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
