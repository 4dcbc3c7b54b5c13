"""asyncio around the sans-I/O NBD core: moves bytes, dispatches requests, writes replies.

One ``NbdSession`` per client connection. Requests are pipelined: every request is started as soon
as it is decoded and replied to when it completes, in any order (the handle pairs them up), so a
client at queue depth 32 keeps 32 writes in the logger's next group commit. Reading from a client
pauses while too many of its requests are in flight, which bounds memory per client.

A client that breaks the protocol loses its connection, logged once; the daemon and every other
client go on.
"""

from __future__ import annotations

import asyncio
import errno as E
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

from . import protocol as nbd

log = logging.getLogger("mars.nbd")

MAX_IN_FLIGHT = 256
MAX_IN_FLIGHT_BYTES = 64 * 2**20

ERRNO_TO_NBD = {E.EPERM: 1, E.EIO: 5, E.ENOMEM: 12, E.EINVAL: 22, E.ENOSPC: 28, E.EDQUOT: 28, E.EFBIG: 28,
                E.EOVERFLOW: 75, E.ENOTSUP: 95, E.ESHUTDOWN: 108}


class Export(Protocol):
    """What a served resource offers the NBD layer (implemented by the resource runtime)."""

    info: nbd.ExportInfo

    def handle(self, req: nbd.Request) -> asyncio.Future[bytes | None]: ...
    def opened(self, session: "NbdSession") -> None: ...
    def closed(self, session: "NbdSession") -> None: ...


class NbdSession(asyncio.Protocol):
    def __init__(self, exports: Callable[[], dict[str, Export]], peer: str) -> None:
        self._exports = exports
        self.peer = peer
        self.conn = nbd.NbdServerConnection(self._lookup, self._names)
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

    def _lookup(self, name: str) -> nbd.ExportInfo | None:
        e = self._exports().get(name)
        return e.info if e is not None else None

    def _names(self) -> list[str]:
        return sorted(self._exports())

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.conn.initial_bytes())

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool | None:
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
                self._write(conn.reply_header(ev.handle, ev.error))
            elif type(ev) is nbd.Negotiated:
                self._flush_handshake()
                export = self._exports().get(ev.export.name)
                if export is None:  # vanished between lookup and GO
                    self.close()
                    return
                self.export = export
                export.opened(self)
            elif type(ev) is nbd.Disconnect:
                self._flush_handshake()
                self._closing_after_flight()
                return
            elif type(ev) is nbd.ConnectionClosed:
                self.close()
                return
        self._flush_handshake()

    def _flush_handshake(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self._write(out)

    def _start(self, req: nbd.Request) -> None:
        assert self.export is not None
        fut = self.export.handle(req)
        self.in_flight += 1
        self.in_flight_bytes += req.length
        if (self.in_flight >= MAX_IN_FLIGHT or self.in_flight_bytes >= MAX_IN_FLIGHT_BYTES) and not self._paused \
                and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        fut.add_done_callback(lambda f, h=req.handle, n=req.length: self._done(h, n, f))

    def _done(self, handle: int, length: int, fut: asyncio.Future[bytes | None]) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= length
        exc = fut.exception() if not fut.cancelled() else OSError(E.ESHUTDOWN, "cancelled")
        if exc is None:
            data = fut.result()
            self._write(self.conn.reply_header(handle, 0))
            if data:
                self._write(data)
        else:
            err = getattr(exc, "errno", None) or E.EIO
            if err not in (E.ESHUTDOWN,):
                log.error("nbd client %s: request failed: %s", self.peer, exc)
            self._write(self.conn.reply_header(handle, ERRNO_TO_NBD.get(err, 5)))
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
        self._outq.append(data)
        self._drain()

    def _drain(self) -> None:
        t = self.transport
        if t is None or t.is_closing():
            self._outq.clear()
            return
        q = self._outq
        while q and not self._write_paused:
            t.write(q.popleft())

    def close(self) -> None:
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
