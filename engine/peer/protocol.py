"""Peer protocol core, sans I/O: messages to bytes, bytes to messages, for one peer link.

Nodes talk over one TLS connection per peer link (port 7777). TLS, sockets and asyncio live in
peerlink.py; this module owns no socket and never blocks, so the link code, the tests and a
fuzzer drive the very same parser (the h11 design, as in nbd.py)::

    conn = PeerConnection(our_hello)
    send(conn.initial_bytes())
    while True:
        event = conn.next_event()          # may raise PeerProtocolError: drop this link
        if event is NEED_DATA:
            conn.receive_data(recv())      # b"" on EOF
        elif isinstance(event, (Closed, Bye)):
            break
        else:
            ...                            # later: sendv(conn.send_buffers(reply))

Wire format, all integers big-endian::

    frame = u32 body_len, body                      body_len <= MAX_FRAME
    body  = u8 type, u32 meta_len, meta, data       meta_len <= MAX_META
    meta  = UTF-8 JSON object of the message's fields (compact when we send it)
    data  = the rest of the body: the payload of LogData and ReadReply, empty otherwise

Why this shape: a length prefix lets the receiver refuse an oversized frame before buffering
it; the 9-byte header names the type and meta size, so a frame whose sizes cannot fit its type
(a 60 MiB Hello) is refused from its first 9 bytes; JSON keeps the small fields readable and
easy to extend in a later protocol version; and bulk bytes travel raw beside the JSON, never
base64-encoded inside it, so a 16 MiB LogData costs one copy to send and one to receive.

Trust: the peer is authenticated by TLS, but a bug or a compromised node on the other end must
cost at most this link. So every frame is checked completely here (sizes, JSON syntax, exact
field set, field types, ranges, path safety) and the only exception input can raise is
PeerProtocolError. Messages validate in their constructors as well, and the decoder builds
messages only through those constructors, so no message that this node could not have sent
itself is ever handed to the caller, and every message that exists can be encoded.

Conventions the checks enforce (deviations from a looser reading are noted in the classes):

* ``req`` ids of requests are >= 1. ``req == 0`` means "not a reply to anything": an
  unsolicited TreeEntries push, or an ErrorReply about the link rather than a request.
* ``res``, ``name`` and ``host`` are single path components (no "/", not "." or "..", no NUL),
  because the receiving side builds file names from them.
* Entry paths are canonical relative paths inside the tree: no leading "/", no empty, "." or
  ".." components, no NUL. A peer must not be able to name a file outside the tree.
* Integers are 0 .. 2**63-1 (they end up as file offsets, off_t) and JSON booleans are not
  integers (Python's ``True == 1`` must not sneak through). Floats, NaN and Infinity are refused.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..entry import Entry
from ..sansio import NEED_DATA, LocalProtocolError, ReceiveBuffer, RemoteProtocolError, Sentinel, show, transition

__all__ = [
    "PROTO_VERSION",
    "DEFAULT_PORT",
    "MAX_FRAME",
    "MAX_META",
    "MAX_DATA",
    "MAX_INT",
    "MAX_PATH",
    "MAX_VALUE",
    "MAX_NAME",
    "MAX_TEXT",
    "NEED_DATA",
    "PeerProtocolError",
    "LocalProtocolError",
    "Entry",
    "Hello",
    "TreeRequest",
    "TreeEntries",
    "TreeSince",
    "TreeChanges",
    "FetchRequest",
    "LogData",
    "DigestRequest",
    "DigestReply",
    "ReadRequest",
    "ReadReply",
    "DirtyMapRequest",
    "DirtyMapReply",
    "ErrorReply",
    "Bye",
    "Message",
    "MESSAGE_TYPES",
    "Closed",
    "PeerConnection",
    "encode",
    "encode_buffers",
    "decode",
    "entry_batches",
]

PROTO_VERSION = 2  # 2: TreeSince and TreeChanges, the incremental tree exchange
#: The TCP port of peer links unless ``marsd --port`` says otherwise: the original's 7777.
DEFAULT_PORT = 7777
# How a link error says the peer answered with another cluster's certificate: marsd records the
# error text (msg-peer-<host>), and the findings give this case its own remedy.
FOREIGN_CERT = "shows a certificate this cluster's CA did not sign"

#: Largest payload of a LogData or ReadReply, and largest read or fetch one may ask for.
MAX_DATA = 64 * 2**20
#: Largest body_len: a full payload plus room for its (small) meta.
MAX_FRAME = MAX_DATA + 64 * 2**10
#: Largest meta; tree listings are the big ones.
MAX_META = 4 * 2**20
#: Every integer field: non-negative and fits an off_t.
MAX_INT = 2**63 - 1
#: Limits in UTF-8 bytes, not characters: they protect buffers and file names, which count bytes.
MAX_PATH = 1024
MAX_VALUE = 4096
MAX_NAME = 255  # NAME_MAX of Linux file systems
MAX_TEXT = 16 * 1024  # error texts and Bye reasons
MAX_DIGEST = 128  # hex characters, a 512-bit digest

_PREFIX = struct.Struct(">I")  # body_len
_HEADER = struct.Struct(">IBI")  # body_len, type, meta_len
_HEADER_LEN = _HEADER.size  # 9
_TYPE_AND_META_LEN = 5  # the part of body_len that is not meta or data


class PeerProtocolError(RemoteProtocolError):
    """The peer broke the protocol; drop this link (never the daemon).

    Raised for anything the peer's bytes can do wrong, and for nothing else, so a caller that
    catches it alone is safe against any input. After it, the connection is poisoned: every
    later next_event() raises it again, because nothing after a bad frame can be framed.

    This side misusing the connection (sending before initial_bytes, after Bye, ...) is a
    LocalProtocolError instead (sansio.py), never mistaken for the peer's fault; a message that
    is itself invalid raises ValueError from its constructor, and one too big for a frame
    ValueError from encode().
    """


# --- field checks --------------------------------------------------------------------------
# Shared by constructors and decoder: the decoder only ever builds messages through the
# constructors, so the two can never disagree about what is valid.


def _int(cls: str, name: str, value: Any, lo: int = 0, hi: int = MAX_INT) -> None:
    if type(value) is not int:  # not isinstance: bool is an int subclass
        raise ValueError(f"{cls}.{name} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{cls}.{name} = {value} is outside {lo}..{hi}")


def _bool(cls: str, name: str, value: Any) -> None:
    if type(value) is not bool:
        raise ValueError(f"{cls}.{name} must be a bool, not {type(value).__name__}")


def _utf8_len(cls: str, name: str, value: Any) -> int:
    """Byte length of a str that can go on the wire: no NUL, no lone surrogates.

    Lone surrogates come from JSON escapes like "\\udc80"; they cannot be encoded as UTF-8, so a
    message holding one could not be sent back out, nor used as a file name.
    """
    if type(value) is not str:
        raise ValueError(f"{cls}.{name} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise ValueError(f"{cls}.{name} contains NUL")
    if value.isascii():
        return len(value)
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{cls}.{name} is not valid Unicode (lone surrogate)") from None


def _text(cls: str, name: str, value: Any, max_bytes: int = MAX_TEXT) -> None:
    if _utf8_len(cls, name, value) > max_bytes:
        raise ValueError(f"{cls}.{name} is longer than {max_bytes} bytes")


def _component(cls: str, name: str, value: Any, empty_ok: bool = False) -> None:
    """A single file-name component: the receiver builds paths from it."""
    n = _utf8_len(cls, name, value)
    if n > MAX_NAME:
        raise ValueError(f"{cls}.{name} is longer than {MAX_NAME} bytes")
    if not n:
        if empty_ok:
            return
        raise ValueError(f"{cls}.{name} is empty")
    if "/" in value or value in (".", ".."):
        raise ValueError(f"{cls}.{name} = {show(value)} is not a single path component")


def _tree_path(cls: str, name: str, value: Any) -> None:
    """A canonical path inside the tree: one spelling per entry, and no way out of the root."""
    n = _utf8_len(cls, name, value)
    if not n:
        raise ValueError(f"{cls}.{name} is empty")
    if n > MAX_PATH:
        raise ValueError(f"{cls}.{name} is longer than {MAX_PATH} bytes")
    if value[0] == "/":
        raise ValueError(f"{cls}.{name} = {show(value)} is absolute")
    for part in value.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"{cls}.{name} = {show(value)} has an empty, '.' or '..' component")


def _tree_prefix(cls: str, name: str, value: Any) -> None:
    """A prefix only filters names, so it may end in a partial name or a "/", or be empty; it
    still must not point outside the tree, in case a server walks the directory it names."""
    if _utf8_len(cls, name, value) > MAX_PATH:
        raise ValueError(f"{cls}.{name} is longer than {MAX_PATH} bytes")
    if value.startswith("/"):
        raise ValueError(f"{cls}.{name} = {show(value)} is absolute")
    if ".." in value.split("/"):
        raise ValueError(f"{cls}.{name} = {show(value)} has a '..' component")


def _data(cls: str, value: Any) -> int:
    """Length of a payload. bytes, bytearray or memoryview are taken by reference, not copied:
    a sender must not change a mutable one until its bytes are written."""
    if type(value) is bytes or isinstance(value, bytearray):
        n = len(value)
    elif isinstance(value, memoryview):
        n = value.nbytes
    else:
        raise ValueError(f"{cls}.data must be bytes, not {type(value).__name__}")
    if n > MAX_DATA:
        raise ValueError(f"{cls}.data holds {n} bytes, more than {MAX_DATA}")
    return n


def _req(cls: str, value: Any, reply_to_nothing_ok: bool = False) -> None:
    _int(cls, "req", value, 0 if reply_to_nothing_ok else 1)


_CODE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
_HEX_RE = re.compile(r"(?:[0-9a-f]{2}){1,%d}\Z" % (MAX_DIGEST // 2))


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """First message in each direction.

    ``cluster`` may be empty: a node that is joining has no cluster id yet and learns it from
    the peer's Hello. Whether the cluster and host are acceptable is the link's decision (it
    compares them with the certificate); only ``proto`` is checked by PeerConnection.
    """

    TYPE: ClassVar[int] = 1
    host: str
    cluster: str
    proto: int
    lamport_ns: int

    def __post_init__(self) -> None:
        _component("Hello", "host", self.host)
        _component("Hello", "cluster", self.cluster, empty_ok=True)
        _int("Hello", "proto", self.proto)
        _int("Hello", "lamport_ns", self.lamport_ns)


@dataclass(frozen=True, slots=True)
class TreeRequest:
    """Ask for the entries under any of ``prefixes``; an empty tuple asks for the whole tree."""

    TYPE: ClassVar[int] = 2
    req: int
    prefixes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _req("TreeRequest", self.req)
        if type(self.prefixes) is not tuple:
            raise ValueError(f"TreeRequest.prefixes must be a tuple, not {type(self.prefixes).__name__}")
        for p in self.prefixes:
            _tree_prefix("TreeRequest", "prefixes[]", p)


@dataclass(frozen=True, slots=True)
class TreeEntries:
    """Entries as a reply to a TreeRequest, or pushed unasked with ``req == 0``.

    A valid TreeEntries can still be too big for one frame (MAX_META); encode() refuses it then,
    and entry_batches() cuts a listing into messages that fit.
    """

    TYPE: ClassVar[int] = 3
    req: int
    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        _req("TreeEntries", self.req, reply_to_nothing_ok=True)
        _entries("TreeEntries", self.entries)


def _entries(cls: str, entries: Any) -> None:
    if type(entries) is not tuple:
        raise ValueError(f"{cls}.entries must be a tuple, not {type(entries).__name__}")
    for e in entries:
        if type(e) is not Entry:
            raise ValueError(f"{cls}.entries holds a {type(e).__name__}, not an Entry")
        _tree_path(cls, "entry.path", e.path)
        # Empty values are refused because a symlink cannot have an empty target.
        n = _utf8_len(cls, "entry.value", e.value)
        if not 0 < n <= MAX_VALUE:
            raise ValueError(f"{cls} entry {show(e.path)}: value of {n} bytes is not 1..{MAX_VALUE}")
        _int(cls, "entry.stamp_ns", e.stamp_ns)


@dataclass(frozen=True, slots=True)
class TreeSince:
    """Ask for the entries that changed on the peer after its change number ``seq``.

    Change numbers count the changes of one life of the peer's marsd (``incarnation``, a random
    number drawn at its start). They order changes by when they reached the peer, which Lamport
    stamps do not (an entry relayed from a node that was cut off arrives with an old stamp), so
    "everything after ``seq``" misses nothing. An ``incarnation`` that is not the peer's current
    one (0, or a life that ended) gets the whole tree: that is how a requester starts, and how
    a restart on either side is made safe. ``fresh`` asks the peer to report (its ``time``
    entry) before answering, for a command waiting for every node's next report.
    """

    TYPE: ClassVar[int] = 12
    req: int
    incarnation: int
    seq: int
    fresh: bool = False

    def __post_init__(self) -> None:
        _req("TreeSince", self.req)
        _int("TreeSince", "incarnation", self.incarnation)
        _int("TreeSince", "seq", self.seq)
        _bool("TreeSince", "fresh", self.fresh)


@dataclass(frozen=True, slots=True)
class TreeChanges:
    """The changes ``from_seq`` (exclusive) .. ``seq`` (inclusive) of the sender's life
    ``incarnation``: a reply to TreeSince, or (``req`` 0) a one-way feed after a round.

    ``from_seq == 0`` is the whole tree. ``digest`` sums up the sender's tree as of ``seq``
    (:mod:`mars.engine.peer.changes`): equal digests mean equal trees, which is how a receiver
    notices, cheaply, a difference that no change carried. A large reply goes as unasked
    TreeEntries first, then this message with the rest (as a TreeEntries reply does).
    """

    TYPE: ClassVar[int] = 13
    req: int
    incarnation: int
    from_seq: int
    seq: int
    digest: int
    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        _req("TreeChanges", self.req, reply_to_nothing_ok=True)
        _int("TreeChanges", "incarnation", self.incarnation)
        _int("TreeChanges", "from_seq", self.from_seq)
        _int("TreeChanges", "seq", self.seq)
        if self.from_seq > self.seq:
            raise ValueError(f"TreeChanges: from_seq {self.from_seq} is after seq {self.seq}")
        _int("TreeChanges", "digest", self.digest)
        _entries("TreeChanges", self.entries)


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """Ask for the bytes of log file ``name`` of ``res`` from ``offset``, at most ``max_bytes``.

    ``wait_ms`` lets the server hold the reply until new bytes arrive (a long poll), so a fetch
    loop that is up to date neither spins nor waits a whole polling period.
    """

    TYPE: ClassVar[int] = 4
    req: int
    res: str
    name: str
    offset: int
    max_bytes: int
    wait_ms: int

    def __post_init__(self) -> None:
        _req("FetchRequest", self.req)
        _component("FetchRequest", "res", self.res)
        _component("FetchRequest", "name", self.name)
        _int("FetchRequest", "offset", self.offset)
        _int("FetchRequest", "max_bytes", self.max_bytes, 0, MAX_DATA)  # the reply must fit a frame
        _int("FetchRequest", "wait_ms", self.wait_ms)


@dataclass(frozen=True, slots=True)
class LogData:
    """File bytes from ``offset``; ``size`` is the file's size on the server as of this reply.

    Invariant ``offset + len(data) <= size``: data never extends past the file it came from.
    ``finished`` promises that no more bytes will ever be appended to this file, so once the
    receiver holds ``size`` bytes it may move on to the next log file.
    """

    TYPE: ClassVar[int] = 5
    req: int
    res: str
    name: str
    offset: int
    size: int
    finished: bool
    data: bytes = field(repr=False)  # a 16 MiB repr helps nobody

    def __post_init__(self) -> None:
        _req("LogData", self.req)
        _component("LogData", "res", self.res)
        _component("LogData", "name", self.name)
        _int("LogData", "offset", self.offset)
        _int("LogData", "size", self.size)
        _bool("LogData", "finished", self.finished)
        n = _data("LogData", self.data)
        if self.offset + n > self.size:
            raise ValueError(f"LogData: {n} bytes at offset {self.offset} go past the file size {self.size}")


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """Ask for the digests of ``count`` chunks of ``chunk`` bytes from ``offset``.

    ``chunk`` is at least 1 (a zero chunk size would divide by zero on the server). The server
    may answer with fewer digests than asked (the device ends, or it caps the work per request).
    """

    TYPE: ClassVar[int] = 6
    req: int
    res: str
    offset: int
    chunk: int
    count: int

    def __post_init__(self) -> None:
        _req("DigestRequest", self.req)
        _component("DigestRequest", "res", self.res)
        _int("DigestRequest", "offset", self.offset)
        _int("DigestRequest", "chunk", self.chunk, 1)
        _int("DigestRequest", "count", self.count)


@dataclass(frozen=True, slots=True)
class DigestReply:
    """One digest per chunk from ``offset``: lowercase hex, or None for a hole on the sender.

    Hex is checked (even length, at most MAX_DIGEST characters, lowercase) so that comparing two
    digests as strings is the same as comparing the digests.
    """

    TYPE: ClassVar[int] = 7
    req: int
    res: str
    offset: int
    chunk: int
    digests: tuple[str | None, ...]

    def __post_init__(self) -> None:
        _req("DigestReply", self.req)
        _component("DigestReply", "res", self.res)
        _int("DigestReply", "offset", self.offset)
        _int("DigestReply", "chunk", self.chunk, 1)
        if type(self.digests) is not tuple:
            raise ValueError(f"DigestReply.digests must be a tuple, not {type(self.digests).__name__}")
        match = _HEX_RE.match
        for d in self.digests:
            if d is not None and (type(d) is not str or not match(d)):
                raise ValueError(f"DigestReply.digests holds {show(d)}, not a lowercase hex digest or None")


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Ask for ``length`` device bytes of ``res`` from ``offset`` (at most MAX_DATA: one frame)."""

    TYPE: ClassVar[int] = 8
    req: int
    res: str
    offset: int
    length: int

    def __post_init__(self) -> None:
        _req("ReadRequest", self.req)
        _component("ReadRequest", "res", self.res)
        _int("ReadRequest", "offset", self.offset)
        _int("ReadRequest", "length", self.length, 0, MAX_DATA)


@dataclass(frozen=True, slots=True)
class ReadReply:
    """Device bytes from ``offset``; shorter than asked only where the device ends."""

    TYPE: ClassVar[int] = 9
    req: int
    offset: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _req("ReadReply", self.req)
        _int("ReadReply", "offset", self.offset)
        _data("ReadReply", self.data)


@dataclass(frozen=True, slots=True)
class DirtyMapRequest:
    """Ask the primary of ``res`` for its dirty-region map: what a resync after its emergency
    mode copies (and all it reads)."""

    TYPE: ClassVar[int] = 14
    req: int
    res: str

    def __post_init__(self) -> None:
        _req("DirtyMapRequest", self.req)
        _component("DirtyMapRequest", "res", self.res)


@dataclass(frozen=True, slots=True)
class DirtyMapReply:
    """The map: bit ``i`` of byte ``i // 8`` of ``data`` set means bytes ``[i * region,
    (i + 1) * region)`` of the device (cut at ``size``) may differ on the secondaries."""

    TYPE: ClassVar[int] = 15
    req: int
    res: str
    region: int
    size: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _req("DirtyMapReply", self.req)
        _component("DirtyMapReply", "res", self.res)
        _int("DirtyMapReply", "region", self.region, 1)
        _int("DirtyMapReply", "size", self.size)
        n = _data("DirtyMapReply", self.data)
        need = ((self.size + self.region - 1) // self.region + 7) // 8
        if n < need:
            raise ValueError(f"DirtyMapReply: {n} bytes of map for {need} bytes of regions")


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A request failed on the peer (``req``), or the link itself is refused (``req == 0``).

    ``code`` is a short token for programs (letters, digits, "_.-", at most 64); ``what`` and
    ``remedy`` are for the operator, as in MarsError.
    """

    TYPE: ClassVar[int] = 10
    req: int
    code: str
    what: str
    remedy: str = ""

    def __post_init__(self) -> None:
        _req("ErrorReply", self.req, reply_to_nothing_ok=True)
        if type(self.code) is not str or not _CODE_RE.match(self.code):
            raise ValueError(f"ErrorReply.code {show(self.code)} is not 1..64 of [A-Za-z0-9_.-]")
        _text("ErrorReply", "what", self.what)
        _text("ErrorReply", "remedy", self.remedy)


@dataclass(frozen=True, slots=True)
class Bye:
    """Orderly close: the sender sends nothing after it."""

    TYPE: ClassVar[int] = 11
    reason: str = ""

    def __post_init__(self) -> None:
        _text("Bye", "reason", self.reason)


Message = (
    Hello | TreeRequest | TreeEntries | FetchRequest | LogData | DigestRequest | DigestReply
    | ReadRequest | ReadReply | ErrorReply | Bye | TreeSince | TreeChanges | DirtyMapRequest | DirtyMapReply
)

#: type byte -> message class. The numbers are the wire format: never renumber, only add.
MESSAGE_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (Hello, TreeRequest, TreeEntries, FetchRequest, LogData, DigestRequest, DigestReply,
                ReadRequest, ReadReply, ErrorReply, Bye, TreeSince, TreeChanges, DirtyMapRequest, DirtyMapReply)
}
_DATA_TYPES = frozenset(cls for cls in MESSAGE_TYPES.values() if "data" in cls.__slots__)
#: Fields that travel in the JSON meta, in declaration order (everything but ``data``).
_META_FIELDS: dict[type, tuple[str, ...]] = {
    cls: tuple(f for f in cls.__slots__ if f != "data") for cls in MESSAGE_TYPES.values()
}
_META_KEYS = {cls: frozenset(names) for cls, names in _META_FIELDS.items()}
#: Fields that are tuples in Python and lists in JSON.
_TUPLE_FIELDS: dict[type, tuple[str, ...]] = {TreeRequest: ("prefixes",), DigestReply: ("digests",)}


@dataclass(frozen=True, slots=True)
class Closed:
    """The peer's byte stream is over: EOF, or everything after its Bye.

    ``truncated`` means EOF came inside a frame: the peer (or the network) died mid-message,
    which a caller may want to log differently from an orderly close.
    """

    truncated: bool = False


# --- encoding ------------------------------------------------------------------------------

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False,
                          allow_nan=False).encode


def _meta_of(msg: Any) -> dict[str, Any]:
    cls = type(msg)
    if cls is TreeEntries or cls is TreeChanges:
        meta = {name: getattr(msg, name) for name in _META_FIELDS[cls]}
        meta["entries"] = [[e.path, e.value, e.stamp_ns] for e in msg.entries]
        return meta
    return {name: getattr(msg, name) for name in _META_FIELDS[cls]}  # json writes tuples as lists


def encode_buffers(msg: Message) -> list[bytes | bytearray | memoryview]:
    """``[header_and_meta]`` or ``[header_and_meta, payload]`` for writev / writer.write.

    The payload is the message's own object, not a copy, because it can be 64 MiB. Raises
    ValueError if the message is valid but too big for one frame (only a huge TreeEntries,
    TreeRequest or DigestReply can be), TypeError for something that is not a message.
    """
    cls = type(msg)
    if cls not in _META_FIELDS:
        raise TypeError(f"not a peer message: {cls.__name__}")
    meta = _dumps(_meta_of(msg)).encode("utf-8")
    meta_len = len(meta)
    if meta_len > MAX_META:
        raise ValueError(f"{cls.__name__} needs {meta_len} bytes of meta, more than {MAX_META}: split it")
    if cls in _DATA_TYPES:
        data = msg.data
        data_len = data.nbytes if isinstance(data, memoryview) else len(data)
    else:
        data = b""
        data_len = 0
    body_len = _TYPE_AND_META_LEN + meta_len + data_len
    if body_len > MAX_FRAME:  # cannot happen for valid messages; kept as the last line of defence
        raise ValueError(f"{cls.__name__} frame of {body_len} bytes exceeds {MAX_FRAME}")
    head = _HEADER.pack(body_len, cls.TYPE, meta_len) + meta
    return [head, data] if data_len else [head]


def encode(msg: Message) -> bytes:
    """One frame as bytes (copies the payload once; see encode_buffers to avoid even that)."""
    buffers = encode_buffers(msg)
    return buffers[0] if len(buffers) == 1 else b"".join(buffers)


# --- decoding ------------------------------------------------------------------------------


def _refuse_float(text: str) -> Any:
    raise ValueError(f"non-integer number {text[:40]}")


def _refuse_constant(text: str) -> Any:
    raise ValueError(f"{text} is not JSON")


def _bounded_int(text: str) -> int:
    # Bounding digits first: int() of a megabyte of digits is quadratic, and far above any field.
    if len(text) > 20:
        raise ValueError(f"integer of {len(text)} digits")
    return int(text)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        # With duplicates, which one counts would depend on the parser: refuse the ambiguity.
        raise ValueError("duplicate key in JSON object")
    return obj


_json_decode = json.JSONDecoder(
    object_pairs_hook=_object,
    parse_float=_refuse_float,
    parse_int=_bounded_int,
    parse_constant=_refuse_constant,
    strict=True,
).decode


def _check_header(body_len: int, type_: int, meta_len: int, at: int) -> type:
    """The frame's sizes and type, checked before its body is buffered; returns the class."""
    cls = MESSAGE_TYPES.get(type_)
    if cls is None:
        raise PeerProtocolError(f"unknown message type {type_} at byte {at}")
    if meta_len > MAX_META:
        raise PeerProtocolError(f"{cls.__name__} with {meta_len} bytes of meta at byte {at} (limit {MAX_META})")
    data_len = body_len - _TYPE_AND_META_LEN - meta_len
    if data_len < 0:
        raise PeerProtocolError(f"{cls.__name__} at byte {at}: meta of {meta_len} bytes overruns a body of {body_len}")
    if data_len and cls not in _DATA_TYPES:
        raise PeerProtocolError(f"{cls.__name__} at byte {at} carries {data_len} bytes of data; it takes none")
    return cls


def _check_body_len(body_len: int, max_frame: int, at: int) -> None:
    if body_len > max_frame:
        raise PeerProtocolError(f"frame of {body_len} bytes at byte {at} (limit {max_frame})")
    if body_len < _TYPE_AND_META_LEN:
        raise PeerProtocolError(f"frame of {body_len} bytes at byte {at} is too short for its header")


def _decode_body(cls: type, meta_raw: bytes, data: bytes, at: int) -> Message:
    """Meta JSON and payload -> message, or PeerProtocolError naming what was wrong."""
    name = cls.__name__
    try:
        meta = _json_decode(meta_raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise PeerProtocolError(f"{name} at byte {at}: bad meta: {e}") from None
    if type(meta) is not dict:
        raise PeerProtocolError(f"{name} at byte {at}: meta is a JSON {type(meta).__name__}, not an object")
    keys = meta.keys()
    expected = _META_KEYS[cls]
    if keys != expected:
        problems = []
        if expected - keys:
            problems.append("missing " + ", ".join(sorted(expected - keys)))
        if keys - expected:
            problems.append("unknown " + ", ".join(sorted(show(k) for k in keys - expected)[:5]))
        raise PeerProtocolError(f"{name} at byte {at}: fields: {'; '.join(problems)}")
    try:
        for key in _TUPLE_FIELDS.get(cls, ()):
            value = meta[key]
            if type(value) is not list:
                raise ValueError(f"{name}.{key} must be a list, not {type(value).__name__}")
            meta[key] = tuple(value)
        if cls is TreeEntries or cls is TreeChanges:
            meta["entries"] = _entries_from_json(name, meta["entries"])
        if cls in _DATA_TYPES:
            meta["data"] = data
        return cls(**meta)
    except ValueError as e:
        raise PeerProtocolError(f"{name} at byte {at}: {e}") from None


def _entries_from_json(cls: str, items: Any) -> tuple[Entry, ...]:
    if type(items) is not list:
        raise ValueError(f"{cls}.entries must be a list, not {type(items).__name__}")
    out = []
    for item in items:
        if type(item) is not list or len(item) != 3:
            raise ValueError(f"{cls}.entries holds something other than a [path, value, stamp] list")
        out.append(Entry(item[0], item[1], item[2]))  # TreeEntries checks the three fields
    return tuple(out)


def decode(frame: bytes | bytearray | memoryview, max_frame: int = MAX_FRAME) -> Message:
    """Exactly one whole frame -> its message, without any handshake rules (tests, tools)."""
    frame = bytes(frame)
    if len(frame) < _HEADER_LEN:
        raise PeerProtocolError(f"{len(frame)} bytes cannot hold a frame header")
    body_len, type_, meta_len = _HEADER.unpack_from(frame)
    _check_body_len(body_len, max_frame, 0)
    cls = _check_header(body_len, type_, meta_len, 0)
    if len(frame) != 4 + body_len:
        raise PeerProtocolError(f"frame of {len(frame)} bytes, but its header says {4 + body_len}")
    return _decode_body(cls, frame[_HEADER_LEN : _HEADER_LEN + meta_len], frame[_HEADER_LEN + meta_len :], 0)


def entry_batches(entries: Iterable[Entry], budget: int = MAX_META - 4096) -> Iterator[tuple[Entry, ...]]:
    """Cut a tree listing into tuples whose TreeEntries meta stays within ``budget`` bytes.

    Why here: only this module knows how an entry is spelled on the wire, and a tree that
    outgrows one frame must not break the tree exchange. Each batch holds at least one entry
    (one entry is at most about 31 KiB of JSON, far below MAX_META).
    """
    batch: list[Entry] = []
    used = 0
    for e in entries:
        size = len(_dumps([e.path, e.value, e.stamp_ns]).encode("utf-8")) + 1  # + the comma
        if batch and used + size > budget:
            yield tuple(batch)
            batch, used = [], 0
        batch.append(e)
        used += size
    if batch:
        yield tuple(batch)


# --- the connection ------------------------------------------------------------------------

# The two halves of a link move independently, as in h11: both Hellos cross on the wire, and
# one side may say Bye while the other still has replies in flight. Each half's phases and the
# only ways between them (a transition the tables lack is a LocalProtocolError):
#   ours:   idle --hello--> open --bye--> closed        (hello: initial_bytes(); bye: send(Bye))
#   theirs: hello --hello--> open --bye--> closed; every live state: eof -> closed, error -> error
# In their ``hello`` state only a Hello frame is allowed, in ``open`` anything but a Hello.
IDLE = "idle"
HELLO = "hello"
OPEN = "open"
CLOSED = "closed"
ERROR = "error"
_OURS: dict[str, dict[str, str]] = {IDLE: {"hello": OPEN}, OPEN: {"bye": CLOSED}, CLOSED: {}}
_THEIRS: dict[str, dict[str, str]] = {
    HELLO: {"hello": OPEN, "eof": CLOSED, "error": ERROR},
    OPEN: {"bye": CLOSED, "eof": CLOSED, "error": ERROR},
    CLOSED: {},
    ERROR: {},
}
# Summary states (PeerConnection.state)
HANDSHAKE = "handshake"
CLOSING = "closing"


class PeerConnection:
    """One peer link, from Hellos to close.

    Caller errors (send before initial_bytes, after our Bye, a Hello through send, a second
    initial_bytes, receive_data after EOF) raise LocalProtocolError; the peer's errors raise
    PeerProtocolError from next_event. Sending stays allowed after the peer's Bye, EOF or
    protocol error, so a caller can still explain itself with an ErrorReply or Bye.
    """

    def __init__(self, our_hello: Hello, max_frame: int = MAX_FRAME) -> None:
        if type(our_hello) is not Hello:
            raise TypeError(f"our_hello must be a Hello, not {type(our_hello).__name__}")
        if not _HEADER_LEN <= max_frame <= 0xFFFFFFFF:
            raise ValueError(f"max_frame must be {_HEADER_LEN}..2**32-1 (a u32 on the wire), not {max_frame}")
        self.our_hello = our_hello
        self.max_frame = max_frame
        self.peer_hello: Hello | None = None
        self.our_state = IDLE
        self.their_state = HELLO
        self._rb = ReceiveBuffer()
        self._eof = False
        self._need = 4  # next_event parses nothing until avail >= _need
        self._pending: tuple[type, int, int, int] | None = None  # cls, meta_len, data_len, at
        self._closed: Closed | None = None
        self._error: PeerProtocolError | None = None

    # -- public API --------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """One word for logs and status: handshake, open, closing, closed or error."""
        ours, theirs = self.our_state, self.their_state
        if theirs == ERROR:
            return ERROR
        if ours == CLOSED and theirs == CLOSED:
            return CLOSED
        if ours == CLOSED or theirs == CLOSED:
            return CLOSING
        if ours == OPEN and theirs == OPEN:
            return OPEN
        return HANDSHAKE

    def initial_bytes(self) -> bytes:
        """Our Hello; must be sent before anything else, so it is the only way to send one."""
        if self.our_state != IDLE:
            raise LocalProtocolError("initial_bytes() was already called")
        self.our_state = transition(_OURS, "peer (ours)", self.our_state, "hello")
        return encode(self.our_hello)

    def send(self, msg: Message) -> bytes:
        """The frame for msg as one bytes object (the payload copied once)."""
        buffers = self.send_buffers(msg)
        return buffers[0] if len(buffers) == 1 else b"".join(buffers)

    def send_buffers(self, msg: Message) -> list[bytes | bytearray | memoryview]:
        """The frame for msg as buffers to write in order; the payload is not copied."""
        if self.our_state == IDLE:
            raise LocalProtocolError("send() before initial_bytes(): the peer expects our Hello first")
        if self.our_state == CLOSED:
            raise LocalProtocolError(f"send({type(msg).__name__}) after our Bye")
        if type(msg) is Hello:
            raise LocalProtocolError("a Hello is sent once, by initial_bytes()")
        buffers = encode_buffers(msg)
        if type(msg) is Bye:
            self.our_state = transition(_OURS, "peer (ours)", self.our_state, "bye")
        return buffers

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer peer bytes; b"" means EOF. Parsing happens in next_event.

        Bytes after the peer's Bye or after a protocol error are dropped unseen: nothing may be
        acted on from them, and buffering them would only cost memory.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        if self._closed is not None or self._error is not None:
            return
        self._rb.append(data)

    def next_event(self) -> Message | Closed | Sentinel:
        """The next message, NEED_DATA, or Closed (then Closed on every later call).

        Raises PeerProtocolError for anything the peer got wrong, then again on every later call.
        """
        if self._error is not None:
            raise PeerProtocolError(self._error.reason)
        if self._closed is not None:
            return self._closed
        rb = self._rb
        if rb.avail >= self._need:
            event = self._read_frame()
            if event is not NEED_DATA:
                return event
        if self._eof:
            return self._close(truncated=rb.avail > 0 or self._pending is not None)
        return NEED_DATA

    # -- internals ---------------------------------------------------------------------------

    def _theirs(self, trigger: str) -> None:
        self.their_state = transition(_THEIRS, "peer (theirs)", self.their_state, trigger)

    def _close(self, truncated: bool, trigger: str = "eof") -> Closed:
        self._closed = Closed(truncated)
        self._theirs(trigger)
        self._rb = ReceiveBuffer()  # nothing buffered will ever be used: free it now
        self._pending = None
        return self._closed

    def _fail(self, error: PeerProtocolError) -> PeerProtocolError:
        """Poison the connection and return the exception for the caller of next_event."""
        self._error = error
        self._theirs("error")
        self._rb = ReceiveBuffer()
        self._pending = None
        return error

    def _read_frame(self) -> Message | Sentinel:
        rb = self._rb
        pending = self._pending
        if pending is None:
            at = rb.consumed
            buf, off = rb.peek(4)
            (body_len,) = _PREFIX.unpack_from(buf, off)
            try:
                # The length alone is checked first: a stream that is not ours (an HTTP client,
                # a TLS record) fails here on its first four bytes.
                _check_body_len(body_len, self.max_frame, at)
                if rb.avail < _HEADER_LEN:
                    self._need = _HEADER_LEN
                    return NEED_DATA
                buf, off = rb.peek(_HEADER_LEN)
                body_len, type_, meta_len = _HEADER.unpack_from(buf, off)
                cls = _check_header(body_len, type_, meta_len, at)
            except PeerProtocolError as e:
                raise self._fail(e) from None
            if self.their_state == HELLO and cls is not Hello:
                raise self._fail(PeerProtocolError(f"first message is a {cls.__name__}, not a Hello"))
            if self.their_state == OPEN and cls is Hello:
                raise self._fail(PeerProtocolError(f"second Hello at byte {at}"))
            rb.skip(_HEADER_LEN)
            data_len = body_len - _TYPE_AND_META_LEN - meta_len
            pending = self._pending = (cls, meta_len, data_len, at)
            self._need = meta_len + data_len  # don't look again until the whole body is here
        cls, meta_len, data_len, at = pending
        if rb.avail < meta_len + data_len:
            return NEED_DATA
        meta = rb.take(meta_len)
        data = rb.take(data_len)
        self._pending = None
        self._need = 4
        try:
            msg = _decode_body(cls, meta, data, at)
        except PeerProtocolError as e:
            raise self._fail(e) from None
        if cls is Hello:
            if msg.proto != PROTO_VERSION:
                raise self._fail(PeerProtocolError(
                    f"peer {msg.host} speaks protocol version {msg.proto}, this node {PROTO_VERSION}:"
                    " run the same MARS version on both"))
            self.peer_hello = msg
            self._theirs("hello")
        elif cls is Bye:
            self._close(truncated=False, trigger="bye")
        return msg
