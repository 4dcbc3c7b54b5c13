"""asyncio around the sans-I/O NBD core: moves bytes, dispatches requests, writes replies.

One ``NbdSession`` per client connection. Requests are pipelined: every request is started as soon
as it is decoded and replied to when it completes, in any order (the handle pairs them up), so a
client at queue depth 32 keeps 32 writes in the logger's next group commit. Reading from a client
pauses while too many of its requests are in flight, which bounds memory per client.

A client that breaks the protocol loses its connection, logged once; the daemon and every other
client go on.

TLS (NBD_OPT_STARTTLS) swaps the session's transport for asyncio's TLS transport in the middle of
option haggling (``loop.start_tls``); the session object and the protocol core stay the same, so
everything after the upgrade runs the very code a plain connection runs. A failed handshake is
logged with what it most likely means and costs only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as E
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from . import protocol as nbd
from .psk import psk_identity

log = logging.getLogger("mars.nbd")

_READ = nbd.Cmd.READ
_WRITE = nbd.Cmd.WRITE
_BLOCK_STATUS = nbd.Cmd.BLOCK_STATUS

#: Send buffer asked for on unix-socket connections (the kernel caps it at net.core.wmem_max).
UNIX_SNDBUF = 4 * 2**20
MAX_IN_FLIGHT = 256
MAX_IN_FLIGHT_BYTES = 64 * 2**20
#: Bytes of small replies joined into one send.
COALESCE = 256 * 1024

ERRNO_TO_NBD = {E.EPERM: 1, E.EIO: 5, E.ENOMEM: 12, E.EINVAL: 22, E.ENOSPC: 28, E.EDQUOT: 28, E.EFBIG: 28,
                E.EOVERFLOW: 75, E.ENOTSUP: 95, E.ESHUTDOWN: 108}


#: How an export answers a request, on the event loop, exactly once: ``reply(req, None)`` done,
#: ``reply(req, None, data)`` a READ's data, ``reply(req, error)`` failed (an OSError's errno is
#: what the client is told). A callback rather than a future per request: see log/writer.py Done.
#: A READ's data is bytes, or pieces in order: bytes for data, an int for that many bytes of
#: hole (zeros; a hole chunk to clients that negotiated structured replies). BLOCK_STATUS's is
#: (length, base:allocation flags) extents from the request's offset.
Reply = Callable[..., None]


class Export(Protocol):
    """What a served resource offers the NBD layer (implemented by the resource runtime)."""

    info: nbd.ExportInfo

    def handle(self, req: nbd.Request, reply: Reply) -> None: ...
    def opened(self, session: "NbdSession") -> None: ...
    def closed(self, session: "NbdSession") -> None: ...


#: Seconds a client may take for the TLS handshake after STARTTLS before it is dropped.
TLS_HANDSHAKE_S = 30.0

#: What a failed handshake's OpenSSL reason means for the operator reading marsd's log.
_TLS_HINTS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client shows no certificate; give it one from "
                                         "'marsadm export-client-cert'",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate is not signed by this cluster's CA "
                                 "(another cluster's?); give it one from 'marsadm export-client-cert'",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this node's certificate; give it this cluster's "
                              "ca-cert.pem from 'marsadm export-client-cert'",
    "TLSV1_ALERT_BAD_CERTIFICATE": "the client rejects this node's certificate (does the address it dials "
                                   "appear in it? see marsd --nbd-tls-name)",
    # GnuTLS clients (qemu, libnbd, nbd-client) hang up without an alert when they reject us.
    "ConnectionResetError": "the client gave up during the handshake: most likely it does not trust this "
                            "node's certificate (another cluster's ca-cert.pem, or it dials an address the "
                            "certificate does not name: see marsd --nbd-tls-name)",
    "UNSUPPORTED_PROTOCOL": "the client offers no TLS version this node takes (1.2 or 1.3)",
    "WRONG_VERSION_NUMBER": "the client does not speak TLS after STARTTLS",
    "BINDER_DOES_NOT_VERIFY": "the client's key for its PSK identity is not the one in --nbd-tls-psk",
    "NO_SHARED_CIPHER": "the client offers no cipher this node takes (TLS 1.2: ECDHE with AES-GCM or "
                        "ChaCha20; PSK: TLS 1.3 only)",
}


def tls_failure(exc: BaseException) -> str:
    """One line for the log: OpenSSL's reason and, where known, what to do about it."""
    reason = getattr(exc, "reason", None) or type(exc).__name__
    hint = _TLS_HINTS.get(reason) if isinstance(reason, str) else None
    return f"{reason}: {hint}" if hint else f"{reason} ({exc})"


class NbdSession(asyncio.Protocol):
    """One client connection. ``tls_context``/``tls_mode``: what STARTTLS offers (see
    protocol.TLS_MODES); the unix socket has neither, it is local and root only."""

    def __init__(self, exports: Callable[[], dict[str, Export]], peer: str,
                 tls_context: ssl.SSLContext | None = None, tls_mode: str = "off") -> None:
        if (tls_context is None) != (tls_mode == "off"):
            raise ValueError(f"tls_mode {tls_mode!r} with{'out' if tls_context is None else ''} a TLS context")
        self._exports = exports
        self.peer = peer
        self._tls_context = tls_context
        self.tls_client: str | None = None  # who TLS let in: "certificate of CN" or "PSK identity NAME"
        # Between STARTTLS and start_tls() returning: asyncio's TLS layer hands decrypted bytes to
        # this protocol as soon as its handshake is done, before start_tls() gives us the new
        # transport to answer on. They wait here and are fed in once the core knows TLS is up.
        self._tls_early: list[bytes] | None = None
        self._tls_task: asyncio.Future[None] | None = None
        self.conn = nbd.NbdServerConnection(self._lookup, self._names, tls=tls_mode)
        self.export: Export | None = None
        self.transport: asyncio.Transport | None = None
        self.in_flight = 0
        self.in_flight_bytes = 0
        self._paused = False
        self._write_paused = False
        self._closing = False
        # Replies wait here while the transport is above its high-water mark. asyncio's own
        # buffer is a bytearray that is shifted on every partial send; keeping it small and the
        # backlog in a deque of whole replies keeps large pipelined reads linear, not quadratic.
        self._outq: deque[bytes] = deque()
        # Replies of one pass of the event loop go out together (one send for a whole group
        # commit's acknowledgements, not one per request): _reply queues, _flush sends.
        self._flush_due = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def _lookup(self, name: str) -> nbd.ExportInfo | None:
        e = self._exports().get(name)
        return e.info if e is not None else None

    def _names(self) -> list[str]:
        return sorted(self._exports())

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        if self.peer == "tcp":
            addr = transport.get_extra_info("peername")
            if addr:
                self.peer = f"tcp:{addr[0]}:{addr[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            # A read reply is header + up to 32 MiB; with the default ~200 KiB of socket buffer
            # every 256 KiB reply goes out in two sends and a loop round trip between them.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
        self.transport.write(self.conn.initial_bytes())

    def data_received(self, data: bytes) -> None:
        if self._tls_early is not None:
            self._tls_early.append(data)
            return
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
        if self._tls_early is not None:
            self._tls_early.append(b"")
            return None
        self.conn.receive_data(b"")
        self._pump()
        return None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._drain()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self.export is not None:
            self.export.closed(self)
            self.export = None

    # -- dispatch ------------------------------------------------------------------------------

    def _pump(self) -> None:
        conn = self.conn
        while not self._closing:
            try:
                ev = conn.next_event()
            except nbd.NbdProtocolError as e:
                log.warning("nbd client %s: %s; closing that connection", self.peer, e.reason)
                self._flush_handshake()
                self.close()
                return
            if ev is nbd.NEED_DATA:
                break
            if type(ev) is nbd.Request:
                self._start(ev)
            elif type(ev) is nbd.BadRequest:
                log.warning("nbd client %s: %s", self.peer, ev.reason)
                self._write(conn.reply_error(ev.handle, ev.error, ev.reason))
            elif type(ev) is nbd.Negotiated:
                self._flush_handshake()
                export = self._exports().get(ev.export.name)
                if export is None:  # vanished between lookup and GO
                    self.close()
                    return
                self.export = export
                export.opened(self)
            elif type(ev) is nbd.StartTls:
                self._flush_handshake()  # the ACK goes out in plain text, then TLS begins
                # Not one more read into this protocol: the client's ClientHello may already be
                # on its way, and it belongs to the TLS layer start_tls puts in between.
                assert self.transport is not None
                self.transport.pause_reading()
                self._tls_early = []
                self._tls_task = asyncio.ensure_future(self._start_tls())  # held: the loop keeps only weak ones
                return
            elif type(ev) is nbd.Disconnect:
                self._flush_handshake()
                self._closing_after_flight()
                return
            elif type(ev) is nbd.ConnectionClosed:
                self.close()
                return
        self._flush_handshake()

    async def _start_tls(self) -> None:
        assert self.transport is not None and self._tls_context is not None
        plain = self.transport
        try:
            secured = await asyncio.get_running_loop().start_tls(
                plain, self, self._tls_context, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_S)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            # start_tls has closed the transport; connection_lost follows.
            log.warning("nbd client %s: TLS handshake failed: %s; closing that connection", self.peer, tls_failure(e))
            self._closing = True
            plain.close()
            return
        if secured is None:  # the client went away during the handshake
            self.close()
            return
        self.transport = secured  # type: ignore[assignment]
        identity = psk_identity(secured.get_extra_info("ssl_object"))
        if identity is not None:
            self.tls_client = f"PSK identity {identity}"
        else:
            cert = secured.get_extra_info("peercert") or {}
            cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
            self.tls_client = f"certificate of {cns[0] if cns else '?'}"
        log.info("nbd client %s: TLS up, %s", self.peer, self.tls_client)
        self.conn.tls_started()
        early, self._tls_early = self._tls_early or [], None
        for data in early:
            self.conn.receive_data(data)
            if not data:
                break
        self._pump()

    def _flush_handshake(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self._write(out)

    def _start(self, req: nbd.Request) -> None:
        assert self.export is not None
        self.in_flight += 1
        # Memory is what READ and WRITE hold; a BLOCK_STATUS or TRIM of 4 GiB holds nothing.
        self.in_flight_bytes += req.length if req.cmd is _READ or req.cmd is _WRITE else 0
        if (self.in_flight >= MAX_IN_FLIGHT or self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES) and not self._paused \
                and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self.export.handle(req, self._done)

    def _done(self, req: nbd.Request, exc: BaseException | None, data: Any = None) -> None:
        self.in_flight -= 1
        cmd = req.cmd
        self.in_flight_bytes -= req.length if cmd is _READ or cmd is _WRITE else 0
        if exc is None:
            if cmd is _READ:
                for buf in self.conn.read_reply(req.handle, req.offset, [data] if isinstance(data, bytes) else data):
                    self._reply(buf)
            elif cmd is _BLOCK_STATUS:
                # Sent now, not at the end of the loop pass: a client walking the device (nbdcopy,
                # qemu-img) waits for each answer before it asks the next, so a deferred send
                # costs a loop pass per 128 MiB of an 8 TiB export.
                self._write(self.conn.block_status_reply(req, data))
            else:
                self._reply(self.conn.reply_header(req.handle, 0))
        else:
            err = getattr(exc, "errno", None) or E.EIO
            if err not in (E.ESHUTDOWN,):
                log.error("nbd client %s: request failed: %s", self.peer, exc)
            self._reply(self.conn.reply_error(req.handle, ERRNO_TO_NBD.get(err, 5), str(exc)))
        if self._paused and self.in_flight < MAX_IN_FLIGHT // 2 and self.in_flight_bytes < MAX_IN_FLIGHT_BYTES // 2 \
                and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        if self._closing and self.in_flight == 0:
            self.close()

    def _closing_after_flight(self) -> None:
        self._closing = True
        if self.in_flight == 0:
            self.close()

    def _write(self, data: bytes) -> None:
        """Send now, after whatever replies are queued (the handshake's answers, in order)."""
        self._outq.append(data)
        self._drain()

    def _reply(self, data: bytes) -> None:
        """Send at the end of this pass of the event loop, with the other replies made in it."""
        self._outq.append(data)
        if not self._flush_due and self._loop is not None:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        self._drain()

    def _drain(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            self._outq.clear()
            return
        q = self._outq
        while q and not self._write_paused:
            # Small replies (headers, 4 KiB reads) are joined into one send of up to COALESCE
            # bytes; a large read's data goes on its own, uncopied.
            if len(q) == 1 or len(q[0]) >= COALESCE:
                t.write(q.popleft())
                continue
            parts, n = [], 0
            while q and n + len(q[0]) <= COALESCE:
                n += len(q[0])
                parts.append(q.popleft())
            t.write(b"".join(parts))

    def close(self) -> None:
        self._drain()
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
