"""NBD server protocol core, sans I/O: bytes in, events out, bytes to send.

Speaks fixed-newstyle negotiation and the transmission phase with simple replies, and with
structured replies (NBD_OPT_STRUCTURED_REPLY) for the clients that ask: reads then come back as
data and hole chunks, and the ``base:allocation`` meta context (NBD_OPT_SET/LIST_META_CONTEXT)
lets NBD_CMD_BLOCK_STATUS tell where the data of a sparse export is. The core frames those
replies; where the holes are is the caller's knowledge (``read_reply``, ``block_status_reply``).
And NBD_OPT_STARTTLS: the core says when to start TLS (``StartTls``), the caller
runs the handshake on its transport and reports back with ``tls_started()``; the bytes before and
after are the same protocol, so the core never sees ciphertext. The object owns no socket and
never blocks, so the asyncio server, the tests and a fuzzer drive the very same code (the h11
design)::

    conn = NbdServerConnection(lookup, list_names)
    send(conn.initial_bytes())
    while True:
        event = conn.next_event()          # may raise NbdProtocolError: close this connection
        send(conn.data_to_send())          # option replies, queued while parsing
        if event is NEED_DATA:
            conn.receive_data(recv())      # b"" on EOF
        elif isinstance(event, Request):
            ...                            # later: send(conn.reply_header(handle, err) + data)

Division of labour: everything the wire format alone decides (framing, magic numbers, option
haggling, request validation against the negotiated export) happens here; everything that needs
the disk or the replication log (executing requests, durability, reply ordering) is the caller's.
A client that breaks the protocol costs only its own connection (NbdProtocolError); a client that
sends a well-framed but invalid request gets an error reply and the connection goes on
(BadRequest), as the spec asks.

Receive buffering keeps the caller's chunks as they are and slices each payload out exactly once
(a payload that straddles chunks is joined once), so a 4 KiB WRITE costs one copy here and a
32 MiB WRITE arriving in thousands of small reads costs no quadratic re-copying.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable

from ..sansio import NEED_DATA, LocalProtocolError, ReceiveBuffer, RemoteProtocolError, Sentinel, show, transition

__all__ = [
    "NEED_DATA",
    "NbdProtocolError",
    "ExportInfo",
    "Cmd",
    "CMD_FLAG_FUA",
    "CMD_FLAG_NO_HOLE",
    "CMD_FLAG_REQ_ONE",
    "STATE_HOLE",
    "STATE_ZERO",
    "BASE_ALLOCATION",
    "Negotiated",
    "Request",
    "BadRequest",
    "Disconnect",
    "StartTls",
    "ConnectionClosed",
    "Event",
    "NbdServerConnection",
    "TLS_MODES",
    "EPERM",
    "EIO",
    "ENOMEM",
    "EINVAL",
    "ENOSPC",
    "EOVERFLOW",
    "ENOTSUP",
    "ESHUTDOWN",
]


class NbdProtocolError(RemoteProtocolError):
    """The client broke the protocol beyond recovery; close this connection (never the daemon).

    Only raised where the spec says the server must or may drop the connection, or where the
    byte stream can no longer be framed (after a bad magic nothing that follows can be trusted).
    """


# --- wire constants (NetworkBlockDevice/nbd doc/proto.md) ------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
_KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9

# NBD_REP_INFO payload types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# structured reply chunks: flags and types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) | 1

# base:allocation extent flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

#: The one meta context served, and the id it gets in NBD_OPT_SET_META_CONTEXT's reply (any
#: value will do for the spec; LIST replies carry 0, as the spec asks).
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
#: The spec's advice: no more than 2**20 descriptors per block status chunk.
MAX_EXTENTS = 1 << 20

# errno values as they go on the wire (fixed by the spec, independent of the host's errno.h)
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

#: Spec limit for every string (export names, descriptions, error messages).
MAX_STRING = 4096


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_REQ_ONE = 1 << 3

_GREETING = struct.Struct(">QQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, payload length
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + offset (OFFSET_DATA's start)
_CHUNK_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
_CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length
_EXTENT = struct.Struct(">II")  # length, status flags
_REQUEST_LEN = _REQUEST.size
_REQUEST_unpack_from = _REQUEST.unpack_from
_OPTION_HEADER_LEN = _OPTION_HEADER.size

_CMD_BY_VALUE = tuple(Cmd)  # index == value: a tuple lookup is much cheaper than Cmd(value)
_ZERO_PAD = bytes(124)


# --- exports and events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    size: int  # bytes
    read_only: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Option haggling is over; every byte from here on is a transmission-phase request."""

    export: ExportInfo


@dataclass(frozen=True, slots=True)
class Request:
    """A request that passed every check the wire format allows; the caller only executes it.

    ``data`` holds exactly ``length`` bytes for WRITE and is None for every other command.
    """

    cmd: Cmd
    handle: int
    offset: int
    length: int
    flags: int
    data: bytes | None = field(default=None, repr=False)  # a 32 MiB repr helps nobody


def _request_factory() -> Callable[[Cmd, int, int, int, int, bytes | None], Request]:
    """A Request constructor for the hot path, equal in effect to Request(...).

    Why: a frozen dataclass __init__ must go through object.__setattr__ per field, which costs
    about as much as parsing the request. Request has no __post_init__ and no defaults that
    matter here, so filling its slots through their descriptors yields the identical object in
    about half the time. Tests compare both constructors.
    """
    if tuple(Request.__slots__) != ("cmd", "handle", "offset", "length", "flags", "data"):
        raise AssertionError("Request fields changed: update _request_factory")
    new = object.__new__
    set_cmd, set_handle, set_offset, set_length, set_flags, set_data = (
        getattr(Request, name).__set__ for name in Request.__slots__
    )

    def new_request(cmd: Cmd, handle: int, offset: int, length: int, flags: int, data: bytes | None) -> Request:
        request = new(Request)
        set_cmd(request, cmd)
        set_handle(request, handle)
        set_offset(request, offset)
        set_length(request, length)
        set_flags(request, flags)
        set_data(request, data)
        return request

    return new_request


_new_request = _request_factory()
_READ = Cmd.READ
_WRITE = Cmd.WRITE


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A well-framed request the spec says to refuse with an errno; the connection stays usable."""

    handle: int
    error: int
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client asked to end the session (NBD_CMD_DISC or NBD_OPT_ABORT); flush, then close."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """NBD_OPT_STARTTLS was acknowledged: send data_to_send() in plain text, then run the TLS
    handshake as the server and call tls_started(); the client sends nothing in between."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its side; anything still buffered was an incomplete message."""


#: Everything next_event() can return besides NEED_DATA.
Event = Negotiated | Request | BadRequest | Disconnect | StartTls | ConnectionClosed


# --- the connection ----------------------------------------------------------------------------

GREETING = "greeting"
OPTIONS = "options"
TLS_HANDSHAKE = "tls-handshake"
TRANSMISSION = "transmission"
CLOSED = "closed"
ERROR = "error"

#: The whole state machine. state -> (method that parses input in that state, {trigger: next}).
#: Why a table: every way the connection can change phase is visible here, and a transition
#: the table does not allow is a bug in this module, caught at once instead of serving a
#: request in the wrong phase. The rules behind the edges:
#:   greeting -> options:   the 32-bit client flags came and were acceptable.
#:   options -> transmission: OPT_GO or OPT_EXPORT_NAME chose an export; from then on the
#:                          stream is requests, and option magic would be garbage.
#:   options -> closed:     OPT_ABORT, acknowledged; the client is about to hang up.
#:   options -> tls-handshake: OPT_STARTTLS acknowledged; the next bytes belong to TLS, so any
#:                          that reach this core are a client error.
#:   tls-handshake -> options: the caller's handshake succeeded (tls_started); haggling goes
#:                          on under TLS, and nothing said in plain text may carry over.
#:   transmission -> closed: NBD_CMD_DISC; nothing the client sends later is served.
#:   every live state:      EOF closes, garbage poisons.
_FROM_ANY_LIVE = {"eof": CLOSED, "client_error": ERROR}
_STATE_TABLE: dict[str, tuple[str, dict[str, str]]] = {
    GREETING: ("_read_client_flags", {"client_flags": OPTIONS, **_FROM_ANY_LIVE}),
    OPTIONS: ("_read_option", {"export_chosen": TRANSMISSION, "abort": CLOSED, "starttls": TLS_HANDSHAKE,
                               **_FROM_ANY_LIVE}),
    TLS_HANDSHAKE: ("_read_during_tls_handshake", {"tls_up": OPTIONS, **_FROM_ANY_LIVE}),
    TRANSMISSION: ("_read_request", {"disconnect": CLOSED, **_FROM_ANY_LIVE}),
    CLOSED: ("_read_when_closed", {}),
    ERROR: ("_read_after_error", {}),
}
_EDGES = {state: edges for state, (_, edges) in _STATE_TABLE.items()}
_TERMINAL = frozenset((CLOSED, ERROR))

#: TLS modes, named as nbdkit's --tls: "off" (ERR_UNSUP to STARTTLS), "on" (offered, plain text
#: served too), "require" (nothing but STARTTLS and ABORT is answered before TLS).
TLS_MODES = ("off", "on", "require")
#: What a client may do before TLS on a TLS-only server: upgrade, or leave.
_BEFORE_TLS = frozenset((OPT_STARTTLS, OPT_ABORT))


def _limit_string(text: str) -> bytes:
    """UTF-8 bytes of text cut to the spec's 4096-byte string limit at a character boundary."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= MAX_STRING:
        return raw
    return raw[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")


class NbdServerConnection:
    """One client connection, from greeting to close.

    Call ``data_to_send()`` after every ``next_event()``: option replies are queued while
    parsing, and a client waits for them before sending its next option, so holding them back
    would deadlock. In the transmission phase nothing is queued; replies are built by the caller
    with ``reply_header()`` because only it knows when a request has been executed.
    """

    def __init__(
        self,
        lookup: Callable[[str], ExportInfo | None],
        list_names: Callable[[], list[str]],
        max_payload: int = 32 * 2**20,
        max_option_len: int = 64 * 1024,
        tls: str = "off",
    ) -> None:
        if not 1 <= max_payload <= 0xFFFFFFFF:
            raise ValueError(f"max_payload must be 1..2**32-1 (a u32 on the wire), not {max_payload}")
        if max_option_len < 0:
            raise ValueError(f"max_option_len must not be negative, not {max_option_len}")
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        self._tls_mode = tls
        self._tls_active = False
        self._lookup = lookup
        self._list_names = list_names
        self._max_payload = max_payload
        self._max_option_len = max_option_len
        self._rb = ReceiveBuffer()
        self._out: list[bytes] = []
        self._eof = False
        self._need = 0  # no handler runs until avail >= _need; reset after every event
        self._error: NbdProtocolError | None = None
        self._no_zeroes = False
        self._export: ExportInfo | None = None
        self._size = 0
        self._read_only = False
        # Option state that STARTTLS wipes (tls_started): structured replies, and the meta
        # contexts chosen by the last SET_META_CONTEXT for the export it named.
        self._structured = False
        self._meta_export: str | None = None
        self._block_status = False  # in transmission: BLOCK_STATUS may be asked (base:allocation)
        self._state = GREETING
        self._handler: Callable[[], Event | Sentinel] = getattr(self, _STATE_TABLE[GREETING][0])

    # -- public API --------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def export(self) -> ExportInfo | None:
        """The negotiated export, None before negotiation."""
        return self._export

    @property
    def structured(self) -> bool:
        """Whether the client negotiated structured replies (NBD_OPT_STRUCTURED_REPLY)."""
        return self._structured

    @property
    def block_status(self) -> bool:
        """Whether the negotiated export has base:allocation selected, so BLOCK_STATUS is served."""
        return self._block_status

    @property
    def tls_active(self) -> bool:
        """Whether the caller reported a finished TLS handshake (tls_started)."""
        return self._tls_active

    def tls_started(self) -> None:
        """The caller's TLS handshake after StartTls succeeded: haggle on, now under TLS.

        The spec says a server forgets whatever was negotiated before STARTTLS (structured
        replies, meta contexts): an attacker on the path could have said them in plain text, and
        a client that wants them asks again under TLS.
        """
        if self._state != TLS_HANDSHAKE:
            raise LocalProtocolError(f"tls_started() in state {self._state}, not after StartTls")
        if self._rb.avail:
            # next_event() would have refused them; the caller fed bytes it did not read through TLS.
            raise LocalProtocolError(f"tls_started() with {self._rb.avail} plain-text bytes buffered")
        self._tls_active = True
        self._structured = False
        self._meta_export = None
        self._transition("tls_up")

    def initial_bytes(self) -> bytes:
        """The server greeting; the client says nothing until it has it."""
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer client bytes; b"" means EOF. Parsing happens in next_event.

        Bytes arriving after the session ended (DISC, ABORT, garbage) are dropped: the caller is
        closing anyway and nothing may be served from them.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._state in _TERMINAL:
            return
        self._rb.append(data)

    def next_event(self) -> Event | Sentinel:
        """The next event, or NEED_DATA; raises NbdProtocolError for client garbage.

        After ConnectionClosed or Disconnect every call returns ConnectionClosed; after an
        NbdProtocolError every call raises it again, so a caller cannot serve a poisoned stream.
        """
        if self._rb.avail >= self._need:
            event = self._handler()
            if event is not NEED_DATA:
                self._need = 0
                return event
        if self._eof:
            self._transition("eof")
            return ConnectionClosed()
        return NEED_DATA

    def data_to_send(self) -> bytes:
        """Queued handshake replies (returned once, then cleared); empty in transmission."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def reply_header(self, handle: int, error: int = 0) -> bytes:
        """The 16-byte simple reply; for a successful READ the caller sends the data after it.

        With structured replies a READ must not get one: use ``read_reply`` and ``reply_error``.
        """
        return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)

    def reply_error(self, handle: int, error: int, message: str = "") -> bytes:
        """An error reply to any request: a structured NBD_REPLY_TYPE_ERROR chunk (with the
        message, for a person) when structured replies are on, as the spec prefers and demands
        for READ; a simple reply otherwise."""
        if not error:
            raise LocalProtocolError("reply_error() with error 0")
        if not self._structured:
            return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        raw = _limit_string(message)
        raw = raw[:0xFFFF]  # a u16 length; _limit_string already keeps it at 4096
        return _CHUNK_ERROR.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle,
                                 6 + len(raw), error, len(raw)) + raw

    def read_reply(self, handle: int, offset: int, pieces: list[bytes | memoryview | int]) -> list[bytes | memoryview]:
        """The reply to a successful READ at ``offset``, as buffers to send in order.

        ``pieces`` covers the request from its offset on, in order: a bytes-like piece is data,
        an int is that many bytes that read as zeros (a hole). Simple replies: the header, then
        the data with holes filled in. Structured: one OFFSET_DATA chunk per data piece (the
        data is not copied) and one OFFSET_HOLE chunk per hole, the last chunk marked DONE; a
        read of nothing gets a NONE chunk. Where holes pay is the caller's choice: a hole of
        4 KiB costs a 32-byte chunk instead of 4 KiB on the wire and in the client.
        """
        if not self._structured:
            out: list[bytes | memoryview] = [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, handle)]
            for piece in pieces:
                if isinstance(piece, int):
                    if piece > 0:
                        out.append(bytes(piece))
                elif len(piece):
                    out.append(piece)
            return out
        live = [p for p in pieces if (p > 0 if isinstance(p, int) else len(p))]
        if not live:
            return [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)]
        out = []
        last = len(live) - 1
        pos = offset
        for i, piece in enumerate(live):
            flags = REPLY_FLAG_DONE if i == last else 0
            if isinstance(piece, int):
                out.append(_CHUNK_HOLE.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_HOLE, handle, 12, pos,
                                            piece))
                pos += piece
            else:
                n = len(piece)
                out.append(_CHUNK_OFFSET.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_OFFSET_DATA, handle, 8 + n,
                                              pos))
                out.append(piece)
                pos += n
        return out

    def block_status_reply(self, req: Request, extents: list[tuple[int, int]]) -> bytes:
        """The reply to a BLOCK_STATUS request: one base:allocation chunk, marked DONE.

        ``extents`` are (length, flags) from the request's offset on, in order; they may cover
        more or less than the request. Here they are held to the spec: merged where flags
        repeat, cut at the request's end (the first one alone with NBD_CMD_FLAG_REQ_ONE), at
        most MAX_EXTENTS, each nonzero. The caller must give at least one byte's status.
        """
        if req.cmd is not Cmd.BLOCK_STATUS:
            raise LocalProtocolError(f"block_status_reply() for {req.cmd.name}")
        left = req.length
        merged: list[list[int]] = []
        for length, flags in extents:
            if length <= 0 or left <= 0:
                if length < 0:
                    raise LocalProtocolError(f"extent of negative length {length}")
                if left <= 0:
                    break
                continue
            length = min(length, left)
            left -= length
            flags &= STATE_HOLE | STATE_ZERO
            if merged and merged[-1][1] == flags:
                merged[-1][0] += length
            else:
                if len(merged) == MAX_EXTENTS:
                    break
                merged.append([length, flags])
        if not merged:
            raise LocalProtocolError(f"block_status_reply() without an extent for {req.length} bytes at {req.offset}")
        if req.flags & CMD_FLAG_REQ_ONE:
            merged = merged[:1]
        body = b"".join(_EXTENT.pack(length, flags) for length, flags in merged)
        return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, req.handle,
                           4 + len(body)) + _U32.pack(BASE_ALLOCATION_ID) + body

    # -- state machine -----------------------------------------------------------------------

    def _transition(self, trigger: str) -> None:
        self._state = new = transition(_EDGES, "nbd", self._state, trigger)
        self._handler = getattr(self, _STATE_TABLE[new][0])
        if new in _TERMINAL:
            self._need = 0
            self._rb = ReceiveBuffer()  # nothing buffered will ever be served: free it now

    def _client_error(self, reason: str) -> NbdProtocolError:
        """Poison the connection and return the exception for the caller of next_event."""
        error = NbdProtocolError(reason)
        self._error = error
        self._transition("client_error")
        return error

    def _read_when_closed(self) -> Event | Sentinel:
        return ConnectionClosed()

    def _read_after_error(self) -> Event | Sentinel:
        assert self._error is not None
        raise NbdProtocolError(self._error.reason)

    # -- handshake ---------------------------------------------------------------------------

    def _read_client_flags(self) -> Event | Sentinel:
        rb = self._rb
        if rb.avail < 4:
            self._need = 4
            return NEED_DATA
        buf, off = rb.peek(4)
        (flags,) = _U32.unpack_from(buf, off)
        if flags & ~_KNOWN_CLIENT_FLAGS:
            # The spec says MUST drop: an unknown flag means the client expects behaviour we
            # would not provide, and every byte after this would be misread.
            raise self._client_error(f"unknown client flags 0x{flags:08x} at byte {rb.consumed}")
        rb.skip(4)
        self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._transition("client_flags")
        return self._read_option()

    def _read_option(self) -> Event | Sentinel:
        """Answer options until one produces an event; replies pile up in data_to_send()."""
        rb = self._rb
        while True:
            if rb.avail < _OPTION_HEADER_LEN:
                self._need = _OPTION_HEADER_LEN
                return NEED_DATA
            buf, off = rb.peek(_OPTION_HEADER_LEN)
            magic, option, length = _OPTION_HEADER.unpack_from(buf, off)
            if magic != IHAVEOPT:
                raise self._client_error(f"bad option magic 0x{magic:016x} at byte {rb.consumed}")
            if length > self._max_option_len:
                # Refusing before buffering: the length is the client's word, memory is ours.
                raise self._client_error(
                    f"option {option} with {length} bytes of data at byte {rb.consumed}"
                    f" (limit {self._max_option_len})"
                )
            if rb.avail < _OPTION_HEADER_LEN + length:
                self._need = _OPTION_HEADER_LEN + length
                return NEED_DATA
            start = rb.consumed
            rb.skip(_OPTION_HEADER_LEN)
            data = rb.take(length)
            handler = self._OPTION_HANDLERS.get(option, NbdServerConnection._opt_unsupported)
            if self._tls_mode == "require" and not self._tls_active and option not in _BEFORE_TLS:
                handler = NbdServerConnection._opt_tls_required
            event = handler(self, option, data, start)
            if event is not None:
                return event

    def _reply(self, option: int, reply_type: int, data: bytes = b"") -> None:
        self._out.append(_OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)))
        if data:
            self._out.append(data)

    def _reply_error(self, option: int, reply_type: int, message: str) -> None:
        self._reply(option, reply_type, _limit_string(message))

    def _transmission_flags(self, export: ExportInfo) -> int:
        """Every write is durable when acknowledged, so FUA and FLUSH are free and the export is
        the same for every connection at reply time: that is what CAN_MULTI_CONN promises."""
        flags = (
            FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
        )
        if export.read_only:
            flags |= FLAG_READ_ONLY
        return flags

    def _enter_transmission(self, export: ExportInfo) -> Negotiated:
        # BLOCK_STATUS only for the export the last SET_META_CONTEXT chose base:allocation on.
        self._block_status = self._structured and self._meta_export == export.name
        self._export = export
        self._size = export.size
        self._read_only = export.read_only
        self._transition("export_chosen")
        return Negotiated(export)

    def _opt_export_name(self, option: int, data: bytes, start: int) -> Negotiated:
        """The old way in: it has no error reply, so the spec says a refusal closes the session."""
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._client_error(f"NBD_OPT_EXPORT_NAME with a non-UTF-8 name at byte {start}") from None
        export = self._lookup(name)
        if export is None:
            raise self._client_error(f"NBD_OPT_EXPORT_NAME for unknown export {show(name)}")
        self._out.append(_EXPORT_NAME_REPLY.pack(export.size, self._transmission_flags(export)))
        if not self._no_zeroes:
            self._out.append(_ZERO_PAD)
        return self._enter_transmission(export)

    def _opt_abort(self, option: int, data: bytes, start: int) -> Disconnect:
        self._reply(option, REP_ACK)
        self._transition("abort")
        return Disconnect()

    def _opt_list(self, option: int, data: bytes, start: int) -> None:
        if data:
            self._reply_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            return None
        for name in self._list_names():
            raw = _limit_string(name)
            self._reply(option, REP_SERVER, _U32.pack(len(raw)) + raw)
        self._reply(option, REP_ACK)
        return None

    def _opt_info_go(self, option: int, data: bytes, start: int) -> Negotiated | None:
        """OPT_INFO and OPT_GO share a request format and the same answers; GO then commits.

        A refusal here is an error reply, not a close: the client may try another name.
        """
        verb = "NBD_OPT_GO" if option == OPT_GO else "NBD_OPT_INFO"
        total = len(data)
        if total < 6:
            self._reply_error(option, REP_ERR_INVALID, f"{verb}: {total} bytes of data is too short")
            return None
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > MAX_STRING or 4 + name_len + 2 > total:
            self._reply_error(option, REP_ERR_INVALID, f"{verb}: bad export name length {name_len}")
            return None
        (n_requests,) = _U16.unpack_from(data, 4 + name_len)
        if 4 + name_len + 2 + 2 * n_requests != total:
            self._reply_error(option, REP_ERR_INVALID, f"{verb}: length does not match {n_requests} info requests")
            return None
        requested = set(struct.unpack_from(f">{n_requests}H", data, 6 + name_len))
        try:
            name = data[4 : 4 + name_len].decode("utf-8")
        except UnicodeDecodeError:
            self._reply_error(option, REP_ERR_INVALID, f"{verb}: export name is not UTF-8")
            return None
        export = self._lookup(name)
        if export is None:
            message = f"unknown export {show(name)}" if name else "there is no default export"
            self._reply_error(option, REP_ERR_UNKNOWN, message)
            return None
        self._reply(option, REP_INFO, _INFO_EXPORT.pack(INFO_EXPORT, export.size, self._transmission_flags(export)))
        if INFO_NAME in requested:
            self._reply(option, REP_INFO, _U16.pack(INFO_NAME) + _limit_string(export.name))
        if INFO_DESCRIPTION in requested:
            self._reply(option, REP_INFO, _U16.pack(INFO_DESCRIPTION) + _limit_string(export.description))
        # Sent unasked: min 1 means no alignment demands (so no ERR_BLOCK_SIZE_REQD is ever due),
        # and max tells the client the WRITE/READ size we accept before it learns by EINVAL.
        maximum = self._max_payload
        preferred = 4096 if maximum >= 4096 else 1 << (maximum.bit_length() - 1)
        self._reply(option, REP_INFO, _INFO_BLOCK_SIZE.pack(INFO_BLOCK_SIZE, 1, preferred, maximum))
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            return self._enter_transmission(export)
        return None

    def _opt_structured_reply(self, option: int, data: bytes, start: int) -> None:
        if data:
            self._reply_error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
            return None
        self._structured = True
        self._reply(option, REP_ACK)
        return None

    def _opt_meta_context(self, option: int, data: bytes, start: int) -> None:
        """LIST and SET_META_CONTEXT share their request format; only base:allocation exists.

        SET replaces the previous choice even when it fails (the spec), so the choice is
        forgotten before anything is checked. A malformed request is ERR_INVALID, an unknown
        export ERR_UNKNOWN; queries of other namespaces are ignored, as the spec demands.
        """
        listing = option == OPT_LIST_META_CONTEXT
        verb = "NBD_OPT_LIST_META_CONTEXT" if listing else "NBD_OPT_SET_META_CONTEXT"
        if not listing:
            self._meta_export = None
        if not self._structured:
            self._reply_error(option, REP_ERR_INVALID, f"{verb} needs NBD_OPT_STRUCTURED_REPLY first")
            return None
        parsed = self._parse_meta_request(verb, data)
        if isinstance(parsed, str):
            self._reply_error(option, REP_ERR_INVALID, parsed)
            return None
        name, queries = parsed
        export = self._lookup(name)
        if export is None:
            self._reply_error(option, REP_ERR_UNKNOWN, f"unknown export {show(name)}" if name
                              else "there is no default export")
            return None
        if listing:
            # No query: everything there is. "base:" is the namespace's wildcard.
            if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
                self._reply(option, REP_META_CONTEXT, _U32.pack(0) + BASE_ALLOCATION.encode())
        elif BASE_ALLOCATION in queries:
            self._meta_export = export.name
            self._reply(option, REP_META_CONTEXT, _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        self._reply(option, REP_ACK)
        return None

    @staticmethod
    def _parse_meta_request(verb: str, data: bytes) -> tuple[str, list[str]] | str:
        """(export name, queries), or what is wrong with the request (for ERR_INVALID)."""
        total = len(data)
        if total < 8:
            return f"{verb}: {total} bytes of data is too short"
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > MAX_STRING or 4 + name_len + 4 > total:
            return f"{verb}: bad export name length {name_len}"
        try:
            name = data[4 : 4 + name_len].decode("utf-8")
        except UnicodeDecodeError:
            return f"{verb}: export name is not UTF-8"
        pos = 4 + name_len
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        if count > (total - pos) // 4:
            return f"{verb}: {count} queries cannot fit in {total - pos} bytes"
        queries: list[str] = []
        for i in range(count):
            if pos + 4 > total:
                return f"{verb}: query {i} runs past the option's end"
            (qlen,) = _U32.unpack_from(data, pos)
            pos += 4
            if qlen > MAX_STRING or pos + qlen > total:
                return f"{verb}: query {i} has a bad length {qlen}"
            try:
                query = data[pos : pos + qlen].decode("utf-8")
            except UnicodeDecodeError:
                return f"{verb}: query {i} is not UTF-8"
            pos += qlen
            if ":" not in query or query.startswith(":"):
                return f"{verb}: query {show(query)} does not start with a namespace and a colon"
            queries.append(query)
        if pos != total:
            return f"{verb}: {total - pos} bytes after the last query"
        return name, queries

    def _opt_unsupported(self, option: int, data: bytes, start: int) -> None:
        """STARTTLS when TLS is off, extended headers and anything newer: the
        option's data was already consumed (the length field exists so servers can skip what they
        don't know), and ERR_UNSUP makes every client we know fall back to what we speak."""
        self._reply_error(option, REP_ERR_UNSUP, f"option {option} is not supported")
        return None

    def _opt_tls_required(self, option: int, data: bytes, start: int) -> None:
        """Before TLS on a TLS-only server: the same refusal for every option, so a plain client
        learns nothing, not even whether an export exists. EXPORT_NAME has no error reply, so the
        spec says close."""
        if option == OPT_EXPORT_NAME:
            raise self._client_error("NBD_OPT_EXPORT_NAME before TLS on a TLS-only export")
        self._reply_error(option, REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first")
        return None

    def _opt_starttls(self, option: int, data: bytes, start: int) -> StartTls | None:
        if self._tls_mode == "off":
            return self._opt_unsupported(option, data, start)
        if data:
            self._reply_error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return None
        if self._tls_active:
            self._reply_error(option, REP_ERR_INVALID, "TLS is already on")
            return None
        if self._rb.avail:
            # Bytes behind STARTTLS came in plain text, yet would be parsed once TLS is up as
            # if they had come through it: an attacker on the path could inject options so.
            raise self._client_error(f"{self._rb.avail} plain-text bytes after NBD_OPT_STARTTLS, before TLS")
        self._reply(option, REP_ACK)
        self._transition("starttls")
        return StartTls()

    def _read_during_tls_handshake(self) -> Event | Sentinel:
        """The client must wait for the ACK and then speak TLS, which never reaches this core."""
        if self._rb.avail:
            raise self._client_error(f"{self._rb.avail} plain-text bytes after NBD_OPT_STARTTLS, before TLS")
        self._need = 1
        return NEED_DATA

    _OPTION_HANDLERS: dict[int, Callable[..., Event | None]] = {
        OPT_EXPORT_NAME: _opt_export_name,
        OPT_ABORT: _opt_abort,
        OPT_LIST: _opt_list,
        OPT_INFO: _opt_info_go,
        OPT_GO: _opt_info_go,
        OPT_STARTTLS: _opt_starttls,
        OPT_STRUCTURED_REPLY: _opt_structured_reply,
        OPT_LIST_META_CONTEXT: _opt_meta_context,
        OPT_SET_META_CONTEXT: _opt_meta_context,
    }

    # -- transmission ------------------------------------------------------------------------

    def _read_request(self) -> Event | Sentinel:
        """One request per call. The hot path: a valid WRITE or READ.

        A WRITE is framed by its own length, so an oversized one cannot be skipped without
        trusting the client with our memory: that is a protocol error. Everything else that is
        wrong with a well-framed request is a BadRequest (the payload of a bad WRITE is still
        consumed, so the next request header lines up).

        The header is unpacked in place from the buffer's head chunk when it lies there (nearly
        always, with 64 KiB reads); only the buffer's own methods move its position, so its
        invariants hold as proven in sansio.py.
        """
        rb = self._rb
        avail = rb.avail
        if avail < _REQUEST_LEN:
            self._need = _REQUEST_LEN
            return NEED_DATA
        chunk, pos = rb.chunks[0], rb.pos
        if len(chunk) - pos < _REQUEST_LEN:
            chunk, pos = rb.peek(_REQUEST_LEN)
        magic, flags, cmd, handle, offset, length = _REQUEST_unpack_from(chunk, pos)
        if magic != REQUEST_MAGIC:
            raise self._client_error(f"bad request magic 0x{magic:08x} at byte {rb.consumed}")
        if cmd == 1:  # WRITE
            if length > self._max_payload:
                raise self._client_error(
                    f"WRITE of {length} bytes at byte {rb.consumed} (limit {self._max_payload})"
                )
            total = _REQUEST_LEN + length
            if avail < total:
                self._need = total  # don't re-parse until the whole payload is here
                return NEED_DATA
            data = rb.take_after(_REQUEST_LEN, length)
            if flags & ~CMD_FLAG_FUA:
                return BadRequest(handle, EINVAL, f"WRITE with unsupported flags 0x{flags:04x}")
            if self._read_only:
                return BadRequest(handle, EPERM, "WRITE to a read-only export")
            if offset + length > self._size:
                return BadRequest(handle, ENOSPC, f"WRITE of {length} at {offset} beyond size {self._size}")
            return _new_request(_WRITE, handle, offset, length, flags, data)
        rb.skip(_REQUEST_LEN)
        if cmd == 0:  # READ
            if flags & ~CMD_FLAG_FUA:
                return BadRequest(handle, EINVAL, f"READ with unsupported flags 0x{flags:04x}")
            if length > self._max_payload:
                return BadRequest(handle, EINVAL, f"READ of {length} bytes (limit {self._max_payload})")
            if offset + length > self._size:
                return BadRequest(handle, EINVAL, f"READ of {length} at {offset} beyond size {self._size}")
            return _new_request(_READ, handle, offset, length, flags, None)
        return self._check_other(cmd, flags, handle, offset, length)

    def _check_other(self, cmd_value: int, flags: int, handle: int, offset: int, length: int) -> Request | BadRequest | Disconnect:
        """Everything but READ and WRITE: rarer, so clarity beats speed here."""
        if cmd_value == Cmd.DISC:
            self._transition("disconnect")
            return Disconnect()
        if cmd_value == Cmd.BLOCK_STATUS:
            return self._check_block_status(flags, handle, offset, length)
        if cmd_value not in (Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES):
            # CACHE was never advertised; unknown types cannot carry a payload a server could
            # know to skip.
            name = _CMD_BY_VALUE[cmd_value].name if cmd_value < len(_CMD_BY_VALUE) else str(cmd_value)
            return BadRequest(handle, EINVAL, f"unsupported command {name}")
        cmd = _CMD_BY_VALUE[cmd_value]
        allowed = CMD_FLAG_FUA | (CMD_FLAG_NO_HOLE if cmd is Cmd.WRITE_ZEROES else 0)
        if flags & ~allowed:
            return BadRequest(handle, EINVAL, f"{cmd.name} with unsupported flags 0x{flags:04x}")
        if cmd is Cmd.FLUSH:
            if offset or length:
                return BadRequest(handle, EINVAL, f"FLUSH with offset {offset} and length {length}, not 0")
            return Request(cmd, handle, offset, length, flags)
        if self._read_only:
            return BadRequest(handle, EPERM, f"{cmd.name} on a read-only export")
        if offset + length > self._size:
            error = ENOSPC if cmd is Cmd.WRITE_ZEROES else EINVAL
            return BadRequest(handle, error, f"{cmd.name} of {length} at {offset} beyond size {self._size}")
        return Request(cmd, handle, offset, length, flags)

    def _check_block_status(self, flags: int, handle: int, offset: int, length: int) -> Request | BadRequest:
        """EINVAL without a selected context (the spec's SHOULD), for flags other than REQ_ONE,
        for nothing asked and beyond the end; the length may exceed the payload limit (the
        reply's size is the server's to bound)."""
        if not self._block_status:
            return BadRequest(handle, EINVAL, "BLOCK_STATUS without NBD_OPT_SET_META_CONTEXT base:allocation")
        if flags & ~CMD_FLAG_REQ_ONE:
            return BadRequest(handle, EINVAL, f"BLOCK_STATUS with unsupported flags 0x{flags:04x}")
        if not length:
            return BadRequest(handle, EINVAL, "BLOCK_STATUS of 0 bytes")
        if offset + length > self._size:
            return BadRequest(handle, EINVAL, f"BLOCK_STATUS of {length} at {offset} beyond size {self._size}")
        return Request(Cmd.BLOCK_STATUS, handle, offset, length, flags)
