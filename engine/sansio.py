"""What the three sans-I/O protocol cores share: the NBD server, the peer link, the log reader.

Each core is driven the same way (the h11 design): ``receive_data(bytes)`` buffers (``b""``
means EOF), ``next_event()`` returns an event or :data:`NEED_DATA`, and nothing in a core does
I/O. Sharing the pieces below keeps the three alike where they should be:

* one :data:`NEED_DATA` (and :data:`END`, "clean end at an event boundary") sentinel;
* one pair of errors: :class:`LocalProtocolError` when this side misused a core (a bug here,
  never caught as the peer's fault) and :class:`RemoteProtocolError` when what arrived is wrong
  (the core's own subclass: a client's, a peer's, a damaged log's), which costs one connection
  or stops one replay, never the daemon;
* :func:`transition`, so each core's phases are a table of allowed edges and an edge the table
  lacks is a LocalProtocolError naming the core, the state and the trigger;
* :class:`ReceiveBuffer` for the two network cores: framed headers followed by payloads of up
  to tens of MiB in reads of any size, with its invariants proven once. (The log reader keeps
  read-only memoryview slices of its input instead, so a replayed payload is never copied.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

__all__ = ["END", "NEED_DATA", "LocalProtocolError", "ProtocolError", "ReceiveBuffer", "RemoteProtocolError",
           "Sentinel", "show", "transition"]


class Sentinel:
    """A named singleton: its repr reads well in test output, and it pickles as itself."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name  # the module global of that name: unpickling gives the same object


#: ``next_event()`` needs more bytes (or the EOF mark, ``receive_data(b"")``).
NEED_DATA = Sentinel("NEED_DATA")
#: Clean end of data: EOF fell exactly on an event boundary.
END = Sentinel("END")


class ProtocolError(Exception):
    """Something broke a protocol; see the two kinds below."""


class LocalProtocolError(ProtocolError, RuntimeError):
    """This side misused a core (receive after EOF, send before the greeting, an edge the state
    table lacks): a bug in the caller or the core, never the other side's fault."""


class RemoteProtocolError(ProtocolError):
    """What arrived breaks the protocol: drop that connection or stop that replay, never the
    daemon. ``reason`` is for people; after it the core stays poisoned (it raises again)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def transition(table: Mapping[str, Mapping[str, str]], core: str, state: str, trigger: str) -> str:
    """The state ``trigger`` leads to from ``state`` in ``table``; LocalProtocolError if none."""
    new = table.get(state, {}).get(trigger)
    if new is None:
        raise LocalProtocolError(f"{core}: no transition {trigger!r} from state {state!r}")
    return new


def show(value: object, limit: int = 80) -> str:
    """A value for a message: its repr, cut to ``limit`` characters (a peer's 4 KiB name is not
    worth a 4 KiB log line)."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


# --- the receive buffer of the network cores ---------------------------------------------------

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

    def take_after(self, skip: int, n: int) -> bytes:
        """Drop ``skip`` bytes, then remove and return the next ``n`` (avail >= skip + n).

        A framed message's header and payload in one call: the NBD core's hot path. When both lie
        in the head chunk (nearly always, with 64 KiB reads) it is one slice and two field updates.
        """
        c = self.chunks[0]
        start = self.pos + skip
        end = start + n
        if end < len(c) and type(c) is bytes:
            self.pos = end
            self.avail -= skip + n
            return c[start:end]
        self.skip(skip)
        return self.take(n)

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
