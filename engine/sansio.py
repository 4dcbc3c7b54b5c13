"""The receive buffer shared by the sans-I/O protocol cores (NBD, peer links).

Both parse fixed headers followed by payloads of up to tens of MiB that arrive in reads of any
size; one buffer design serves both, so its invariants are proven once.
"""

from __future__ import annotations

from collections import deque

_COALESCE_BELOW = 4096  # reads smaller than this are merged, see ReceiveBuffer.append
_COALESCE_CAP = 64 * 1024


class ReceiveBuffer:
    """Unconsumed bytes from a peer or client, kept as the chunks they arrived in.

    Why chunks and not one bytearray: appending every read to a bytearray and slicing frames off
    its front re-copies the tail per frame and copies every payload twice. Here a payload is
    sliced out of the chunk that holds it (none copied when a read is exactly the payload) or
    joined once from the chunks it spans, so a 16 MiB LogData arriving in 64 KiB reads costs one
    copy and no quadratic re-buffering.

    Invariants: ``chunks[0][pos:]`` is the oldest unconsumed byte; ``avail`` counts the
    unconsumed bytes; no chunk is empty; a chunk is bytes unless it is a bytearray made here to
    merge tiny reads, and no memoryview of such a bytearray outlives the call that made it (a
    live view would make the next ``+=`` fail).
    """

    __slots__ = ("chunks", "pos", "avail", "received")

    def __init__(self) -> None:
        self.chunks: deque[bytes | bytearray] = deque()
        self.pos = 0
        self.avail = 0
        self.received = 0

    @property
    def consumed(self) -> int:
        """Stream offset of the next unconsumed byte, for error messages."""
        return self.received - self.avail

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if not n:
            return
        chunks = self.chunks
        if n < _COALESCE_BELOW:
            last = chunks[-1] if chunks else None
            if type(last) is bytearray and len(last) < _COALESCE_CAP:
                last += data
            else:
                chunks.append(bytearray(data))
        elif type(data) is bytes:
            chunks.append(data)
        else:
            chunks.append(bytes(data))  # the caller may reuse its buffer: take our own copy
        self.avail += n
        self.received += n

    def peek(self, n: int) -> tuple[bytes | bytearray, int]:
        """(buffer, offset) with the next n bytes at buffer[offset:] (avail >= n), for unpack_from."""
        c = self.chunks[0]
        if len(c) - self.pos >= n:
            return c, self.pos
        return self._gather(n, consume=False), 0

    def skip(self, n: int) -> None:
        """Drop the next n bytes (avail >= n)."""
        self.avail -= n
        chunks = self.chunks
        pos = self.pos + n
        while chunks and pos >= len(chunks[0]):
            pos -= len(chunks.popleft())
        self.pos = pos

    def take(self, n: int) -> bytes:
        """Remove and return the next n bytes (avail >= n), copying them at most once."""
        if not n:
            return b""
        c = self.chunks[0]
        pos = self.pos
        end = pos + n
        clen = len(c)
        if end > clen:
            return self._gather(n, consume=True)
        self.avail -= n
        if end == clen:
            self.chunks.popleft()
            self.pos = 0
            if type(c) is bytes:
                return c if pos == 0 else c[pos:]
        else:
            self.pos = end
            if type(c) is bytes:
                return c[pos:end]
        with memoryview(c) as view:
            return view[pos:end].tobytes()

    def _gather(self, n: int, consume: bool) -> bytes:
        """The next n bytes as one bytes object when they span several chunks."""
        pieces: list[memoryview] = []
        pos = self.pos
        need = n
        i = 0
        chunks = self.chunks
        while need:
            c = chunks[i]
            room = len(c) - pos
            if room <= need:
                pieces.append(memoryview(c)[pos:])
                need -= room
                pos = 0
                i += 1
            else:
                pieces.append(memoryview(c)[pos : pos + need])
                pos += need
                need = 0
        data = b"".join(pieces)
        for view in pieces:
            view.release()
        if consume:
            for _ in range(i):
                chunks.popleft()
            self.pos = pos
            self.avail -= n
        return data
