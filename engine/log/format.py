"""Transaction log record format: encoder, sans-I/O decoder, blocking file scanner.

A log file (``log-000000001-<host>``) is a plain concatenation of records. There is
no file header and no padding: every byte of a file belongs to some record, and every
byte of a record is covered by a check, so that *every* single-byte corruption is
detected and no damaged record is ever replayed. One record carries one whole NBD
request (up to ``MAX_PAYLOAD`` = 32 MiB of data), so a request is either entirely in
the log or not at all; there is no reassembly of fragments on replay.

All integers are little-endian.

Header, 64 bytes::

    off  size  field
      0     8  start magic  b"MARSLOG\\x00"
      8     2  format version, 1
     10     1  kind: 1 WRITE (payload = data), 2 TRIM, 3 ZERO (write zeroes)
     11     1  flags: bit0 FUA (as received), bit1 NO_HOLE (ZERO only); others 0
     12     4  payload_len (u32): == length for WRITE, 0 for TRIM and ZERO
     16     8  seq (u64): +1 per record; a file's first is its file number << 32 (values.first_record)
     24     8  lamport_ns (u64): Lamport time of the write
     32     8  offset (u64): device byte offset
     40     4  length (u32): device bytes affected
     44     4  reserved, 0
     48     8  payload digest: xxh3_64 of the payload (of b"" for TRIM and ZERO)
     56     8  header check: xxh3_64 of bytes 0..55

Payload: ``payload_len`` bytes.

Trailer, 16 bytes::

    off  size  field
      0     8  end magic  b"MARSEND\\x00"
      8     8  seq again (u64)

Why it is built this way:

* The header check covers the payload digest, so the header check alone pins the whole
  record; a chain of header checks is therefore a digest of the whole file without
  rehashing payloads (``Decoded.check``).
* The header is verified before any length in it is believed, so a damaged length can
  neither make the reader allocate a huge buffer nor make it skip over good records.
* The trailer repeats ``seq`` so that a record whose tail was never written, but
  whose file position now holds the tail of an *older* record (a reused or
  preallocated file), does not pass: the end magic alone would match.
* Start and end magic differ so that a trailer is never mistaken for a header.
* ``seq`` is checked for continuity, so a stale record from an earlier life of the
  file (valid by itself) is not replayed as if it were new.

Torn tails versus corruption. A crash while appending leaves the file ending inside a
record, or (with preallocation, or a file system that extends the size before the data
lands) followed by zero bytes. Cutting such a tail loses nothing that was ever
acknowledged, so ``LogCorruption.torn`` is True and the caller may cut at
``LogCorruption.offset``. Anything else (a full-length record with a bad check, or
garbage followed by more bytes) is real corruption in the middle of the log;
``torn`` is False and the caller must not silently cut it away.

The decoder (``RecordReader``) does no I/O, in the style of h11: feed bytes with
``receive_data``, pull ``Decoded`` / ``NEED_DATA`` / ``END`` from ``next_event``. That
lets the same code check local files (``scan_file``), network streams and tests that
split data at arbitrary points.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

import xxhash

from ..sansio import END, NEED_DATA, LocalProtocolError, RemoteProtocolError, Sentinel, transition

__all__ = [
    "HEADER_SIZE",
    "TRAILER_SIZE",
    "FORMAT_VERSION",
    "MAX_PAYLOAD",
    "START_MAGIC",
    "END_MAGIC",
    "Kind",
    "FLAG_FUA",
    "FLAG_NO_HOLE",
    "LogRecord",
    "record_size",
    "encode_record",
    "encode_record_bytes",
    "encode_batch",
    "Entry",
    "header_check",
    "Decoded",
    "LogCorruption",
    "RecordReader",
    "NEED_DATA",
    "END",
]

HEADER_SIZE = 64
TRAILER_SIZE = 16
FORMAT_VERSION = 1
MAX_PAYLOAD = 32 * 2**20

START_MAGIC = b"MARSLOG\x00"
END_MAGIC = b"MARSEND\x00"


class Kind(IntEnum):
    WRITE = 1
    TRIM = 2
    ZERO = 3


FLAG_FUA = 1
FLAG_NO_HOLE = 2
_KNOWN_FLAGS = FLAG_FUA | FLAG_NO_HOLE

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1

# Bytes 0..55 of the header (everything the header check covers), then the check.
_HDR_BODY = struct.Struct("<8sHBBIQQQIIQ")
_HDR = struct.Struct("<8sHBBIQQQIIQQ")
_CHECKED = _HDR_BODY.size  # 56
_U64 = struct.Struct("<Q")
_TRL = struct.Struct("<8sQ")
assert _HDR.size == HEADER_SIZE and _TRL.size == TRAILER_SIZE

_xxh3 = xxhash.xxh3_64_intdigest
_EMPTY_DIGEST = _xxh3(b"")
_KINDS = {int(k): k for k in Kind}


def _field_problem(kind: Kind, flags: int, payload_len: int, offset: int, length: int) -> tuple[str, str] | None:
    """Shared by the constructor and the decoder, so that the decoder can never
    produce a record the constructor would refuse (which would surface as a
    ValueError instead of LogCorruption)."""
    if flags & ~_KNOWN_FLAGS or (flags & FLAG_NO_HOLE and kind is not Kind.ZERO):
        return "bad-flags", f"invalid flags 0x{flags:02x} for a {kind.name} record"
    if kind is Kind.WRITE:
        if payload_len != length:
            return "bad-length", f"WRITE payload_len {payload_len} differs from length {length}"
        if length > MAX_PAYLOAD:
            return "bad-length", f"WRITE length {length} exceeds the maximum {MAX_PAYLOAD}"
    elif payload_len:
        return "bad-length", f"{kind.name} record with payload_len {payload_len} (must be 0)"
    if offset + length > 2**64:
        return "bad-length", f"offset {offset} + length {length} overflows 64 bits"
    return None


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One NBD request as logged.

    Invalid records are refused at construction, because a record that could not be
    decoded back must never reach the log (it would read as corruption later).
    ``payload`` is kept by reference, not copied: callers passing a mutable buffer
    must not change it until the record is written.
    """

    seq: int
    lamport_ns: int
    offset: int
    length: int
    kind: Kind
    flags: int = 0
    payload: bytes | memoryview = b""
    _digest: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kind = self.kind
        if type(kind) is not Kind:
            k = _KINDS.get(kind) if type(kind) is int else None
            if k is None:
                raise ValueError(f"unknown record kind {kind!r}")
            object.__setattr__(self, "kind", k)
            kind = k
        p = self.payload
        if type(p) is not bytes:
            if isinstance(p, memoryview):
                if p.ndim != 1 or p.format != "B":
                    p = p.cast("B")
                    object.__setattr__(self, "payload", p)
            elif not isinstance(p, bytearray):
                raise TypeError(f"payload must be bytes, bytearray or memoryview, not {type(p).__name__}")
        if not 0 <= self.seq <= _U64_MAX:
            raise ValueError(f"seq {self.seq} out of range")
        if not 0 <= self.lamport_ns <= _U64_MAX:
            raise ValueError(f"lamport_ns {self.lamport_ns} out of range")
        if not 0 <= self.offset <= _U64_MAX:
            raise ValueError(f"offset {self.offset} out of range")
        if not 0 <= self.length <= _U32_MAX:
            raise ValueError(f"length {self.length} out of range")
        if not 0 <= self.flags <= 0xFF:
            raise ValueError(f"flags {self.flags} out of range")
        problem = _field_problem(kind, self.flags, len(p), self.offset, self.length)
        if problem is not None:
            raise ValueError(problem[1])

    @property
    def digest(self) -> int:
        """xxh3_64 of the payload; computed once, because the encoder and the
        decoder's check both need it and payloads can be 32 MiB."""
        d = self._digest
        if d is None:
            d = _xxh3(self.payload) if self.payload else _EMPTY_DIGEST
            object.__setattr__(self, "_digest", d)
        return d


_new = object.__new__
_set = object.__setattr__


def _trusted_record(seq, lamport_ns, offset, length, kind, flags, payload, digest) -> LogRecord:
    """Build a decoded record without re-running ``__post_init__``: the decoder has
    applied the same ``_field_problem`` checks and the integer fields are in range by
    their width, and skipping the second pass is about a sixth of the per-record cost
    of scanning small records."""
    rec = _new(LogRecord)
    _set(rec, "seq", seq)
    _set(rec, "lamport_ns", lamport_ns)
    _set(rec, "offset", offset)
    _set(rec, "length", length)
    _set(rec, "kind", kind)
    _set(rec, "flags", flags)
    _set(rec, "payload", payload)
    _set(rec, "_digest", digest)
    return rec


def record_size(kind: Kind | int, length: int) -> int:
    """Bytes on disk for a record, so the logger can reserve file space (and compute
    the next append offset) before encoding."""
    if kind == Kind.WRITE:
        return HEADER_SIZE + length + TRAILER_SIZE
    if kind in _KINDS:
        return HEADER_SIZE + TRAILER_SIZE
    raise ValueError(f"unknown record kind {kind!r}")


def header_check(header_bytes: bytes | memoryview) -> int:
    """The header check of an encoded header (xxh3_64 of bytes 0..55).

    It covers the payload digest, so chaining these values per record digests a
    whole log file without touching payloads again.
    """
    return _xxh3(memoryview(header_bytes)[:_CHECKED])


def encode_record(rec: LogRecord) -> list[bytes | memoryview]:
    """``[header, payload, trailer]`` for ``os.pwritev``; the payload is the
    caller's own object, not a copy, because it can be 32 MiB."""
    body = _HDR_BODY.pack(
        START_MAGIC,
        FORMAT_VERSION,
        rec.kind,
        rec.flags,
        len(rec.payload),
        rec.seq,
        rec.lamport_ns,
        rec.offset,
        rec.length,
        0,
        rec.digest,
    )
    return [body + _U64.pack(_xxh3(body)), rec.payload, _TRL.pack(END_MAGIC, rec.seq)]


def encode_record_bytes(rec: LogRecord) -> bytes:
    return b"".join(encode_record(rec))


class Entry(Protocol):
    """A record's fields without its place in a log (seq, stamp): what ``encode_batch`` encodes
    and what apply.py writes to a device. A ``LogRecord`` is one, and so is the logger's queued
    request, which therefore needs no ``LogRecord`` on its way to the log and the device."""

    @property
    def kind(self) -> Kind: ...
    @property
    def flags(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def payload(self) -> bytes | memoryview: ...


_FRAME = HEADER_SIZE + TRAILER_SIZE
#: Below this a WRITE's offset + length cannot overflow 64 bits, whatever its length.
_OFFSET_FAST = _U64_MAX - MAX_PAYLOAD
_HDR_BODY_pack_into = _HDR_BODY.pack_into
_U64_pack_into = _U64.pack_into
_TRL_pack_into = _TRL.pack_into


def encode_batch(entries: Sequence[Entry], first_seq: int, first_lamport_ns: int
                 ) -> tuple[list[bytes | memoryview], bytes]:
    """A group commit's records, ``first_seq`` and ``first_lamport_ns`` on, each one more than
    the one before: the iovec for ``os.pwritev`` and the records' header checks (8 bytes each,
    little-endian, in order: what ``VersionHasher.update_checks`` takes).

    Byte for byte what ``encode_record`` gives for each of them (tests compare the two), but the
    headers and trailers of the whole batch are packed into one buffer and no ``LogRecord`` is
    made: on the primary's write path that per-record Python was about a fifth of marsd's CPU
    per 4 KiB write (issue 17). The checks ``LogRecord`` makes at construction are made here too
    (``_field_problem``), so nothing the decoder would refuse reaches the log.
    """
    meta = bytearray(len(entries) * _FRAME)
    mv = memoryview(meta)
    bufs: list[bytes | memoryview] = []
    add = bufs.extend
    seq, stamp, h = first_seq, first_lamport_ns, 0
    for e in entries:
        kind, payload = e.kind, e.payload
        plen = len(payload)
        if plen:
            digest = _xxh3(payload)
        else:
            digest = _EMPTY_DIGEST
        if kind is not Kind.WRITE or e.flags or plen > MAX_PAYLOAD or plen != e.length or e.offset > _OFFSET_FAST:
            problem = _field_problem(kind, e.flags, plen, e.offset, e.length)
            if problem is not None:
                raise ValueError(problem[1])
        _HDR_BODY_pack_into(meta, h, START_MAGIC, FORMAT_VERSION, kind, e.flags, plen, seq, stamp, e.offset,
                            e.length, 0, digest)
        _U64_pack_into(meta, h + _CHECKED, _xxh3(mv[h:h + _CHECKED]))
        _TRL_pack_into(meta, h + HEADER_SIZE, END_MAGIC, seq)
        add((mv[h:h + HEADER_SIZE], payload, mv[h + HEADER_SIZE:h + _FRAME]))
        seq += 1
        stamp += 1
        h += _FRAME
    checks = b"".join([mv[i + _CHECKED:i + HEADER_SIZE] for i in range(0, h, _FRAME)])
    return bufs, checks


@dataclass(frozen=True, slots=True)
class Decoded:
    """A verified record and where it lies in the file.

    ``check`` is the record's header check, so the caller can build a digest chain
    without rehashing payloads.
    """

    record: LogRecord
    offset: int
    end: int
    check: int


class LogCorruption(RemoteProtocolError):
    """A record that must not be replayed, and where it starts: the log format's remote error
    (the file, not this reader, is at fault).

    ``torn`` is True only when the damage is a torn tail: the file ends inside the
    record, or everything from the record's start to the end of the file is zero
    bytes. Then cutting the file at ``offset`` loses nothing that was complete.
    Otherwise the log is damaged in a way that a crash while appending cannot
    explain, and cutting it would silently drop data.

    ``code`` is a short stable id for programs; ``reason`` is for people.
    """

    def __init__(self, file: str, offset: int, code: str, reason: str, torn: bool = False) -> None:
        # All constructor arguments go to args so that the exception pickles (it may
        # cross a process boundary in the daemon).
        Exception.__init__(self, file, offset, code, reason, torn)
        self.file = file
        self.offset = offset
        self.code = code
        self.reason = reason
        self.torn = torn

    def __str__(self) -> str:
        return f"{self.file}: offset {self.offset}: {self.reason}"


# A header's fields once its check passed, in the order _emit unpacks them: kind, flags,
# payload length, seq, lamport_ns, offset, length, payload digest. A plain tuple: building a
# NamedTuple per record cost 4 % of the reader's throughput here (bench: 20,000 4 KiB records).
_Header = tuple[Kind, int, int, int, int, int, int, int]


# The reader's phases and the only ways between them. state -> (method that reads in it,
# {trigger: next state}); a transition the table lacks is a LocalProtocolError (a bug here).
#   header -> fill:     the header is good and its payload arrives in pieces
#   header -> trailer:  header and payload consumed; the trailer is not here yet
#   header -> zeros:    a bad start magic: a zero tail (torn, safe to cut) or garbage, which only
#                       the bytes up to EOF can tell
#   header -> done:     EOF exactly at a record boundary
#   fill -> trailer, trailer -> header: the record is complete (a record that lies in one read
#                       is checked and yielded in place and never leaves header)
#   every live state -> failed: the first record that must not be replayed; sticky
_HEADER, _FILL, _TRAILER, _ZEROS, _DONE, _FAILED = "header", "fill", "trailer", "zeros", "done", "failed"
_STATES: dict[str, tuple[str, dict[str, str]]] = {
    _HEADER: ("_parse_header", {"fill": _FILL, "trailer": _TRAILER, "bad_magic": _ZEROS, "eof": _DONE,
                                "damage": _FAILED}),
    _FILL: ("_filling", {"filled": _TRAILER, "damage": _FAILED}),
    _TRAILER: ("_finish", {"record": _HEADER, "damage": _FAILED}),
    _ZEROS: ("_scan_zeros", {"damage": _FAILED}),
    _DONE: ("_at_end", {}),
    _FAILED: ("_after_damage", {}),
}
_EDGES = {state: edges for state, (_, edges) in _STATES.items()}

_ZERO_BLOCK = bytes(2**20)


def _all_zero(mv: memoryview) -> bool:
    # memoryview == compares element by element in C and is ~10x slower than a
    # bytes compare; this only runs on the error path, but a preallocated zero tail
    # may be large.
    n = len(mv)
    step = len(_ZERO_BLOCK)
    for i in range(0, n, step):
        piece = mv[i : i + step].tobytes()
        if piece != _ZERO_BLOCK[: len(piece)]:
            return False
    return True


class RecordReader:
    """Sans-I/O log decoder: bytes in (``receive_data``), events out (``next_event``).

    Data may arrive in pieces of any size. Bytes passed in are kept by reference
    (immutable inputs) so that a payload lying inside one piece is yielded as a
    memoryview slice of it, without a copy; a payload spread over several pieces is
    copied exactly once into a buffer of its checked length. Yielded payloads are
    read-only memoryviews.

    After ``LogCorruption`` is raised the reader is stuck: every further
    ``next_event`` raises the same exception, because nothing after a damaged record
    can be trusted to be in sequence.
    """

    __slots__ = (
        "_name",
        "_chunks",
        "_buffered",
        "_eof",
        "_state",
        "_handler",
        "_error",
        "_expect",
        "_rec_start",
        "_last_seq",
        "_hdr",
        "_check",
        "_pbuf",
        "_pfill",
        "_payload",
        "_zeros_seen",
    )

    def __init__(self, name: str = "<log>", start_offset: int = 0, expect_seq: int | None = None) -> None:
        self._name = name
        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._eof = False
        self._state = _HEADER
        self._handler: Callable[[], Decoded | Sentinel | None] = self._parse_header
        self._error: LogCorruption | None = None
        self._expect = expect_seq
        self._rec_start = start_offset
        self._last_seq: int | None = None
        self._hdr: _Header | None = None
        self._check = 0
        self._pbuf: bytearray | None = None
        self._pfill = 0
        self._payload: memoryview | bytes = b""
        self._zeros_seen = 0

    @property
    def position(self) -> int:
        """File offset just past the last record yielded: where the next one starts."""
        return self._rec_start

    @property
    def last_seq(self) -> int | None:
        """seq of the last record yielded (None before the first)."""
        return self._last_seq

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed the next bytes of the file; ``b""`` marks EOF."""
        if self._eof:
            raise LocalProtocolError("receive_data() after EOF")
        mv = memoryview(data)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        if not mv:
            self._eof = True
            return
        if self._state == _FAILED:
            return  # nothing after a damaged record is looked at again
        if self._state == _FILL:
            # Payload bytes go straight to their final buffer: one copy, and no
            # second 32 MiB of queued pieces.
            pbuf, fill = self._pbuf, self._pfill
            n = min(len(mv), len(pbuf) - fill)
            pbuf[fill : fill + n] = mv[:n]
            self._pfill = fill + n
            if self._pfill == len(pbuf):
                self._payload = memoryview(pbuf).toreadonly()
                self._pbuf = None
                self._to("filled")
            mv = mv[n:]
            if not mv:
                return
        if not mv.readonly:
            # Yielded payloads may be slices of the input; a caller reusing its
            # buffer must not be able to change a record after it was verified.
            mv = memoryview(mv.tobytes())
        self._chunks.append(mv)
        self._buffered += len(mv)

    # -- buffer helpers -------------------------------------------------------

    def _peek(self, n: int) -> bytes | memoryview:
        first = self._chunks[0]
        if len(first) >= n:
            return first[:n]
        parts = []
        need = n
        for c in self._chunks:
            parts.append(c[:need])
            need -= len(parts[-1])
            if not need:
                break
        return b"".join(parts)

    def _skip(self, n: int) -> None:
        chunks = self._chunks
        self._buffered -= n
        while n:
            c = chunks[0]
            if len(c) > n:
                chunks[0] = c[n:]
                return
            chunks.popleft()
            n -= len(c)

    def _fail(self, offset: int, code: str, reason: str, torn: bool = False) -> LogCorruption:
        err = LogCorruption(self._name, offset, code, reason, torn)
        self._error = err
        self._to("damage")
        self._chunks.clear()
        self._buffered = 0
        self._pbuf = None
        self._payload = b""
        return err

    # -- the state machine ----------------------------------------------------

    def _to(self, trigger: str) -> None:
        self._state = new = transition(_EDGES, "log reader", self._state, trigger)
        self._handler = getattr(self, _STATES[new][0])

    def next_event(self) -> Decoded | Sentinel:
        """The next verified record, ``NEED_DATA`` or ``END``; raises
        ``LogCorruption`` at the first record that must not be replayed."""
        ev = self._handler()
        while ev is None:  # the phase changed while parsing (header -> trailer, ...): go on in the new one
            ev = self._handler()
        return ev

    def _filling(self) -> Sentinel:
        if self._eof:
            raise self._truncated()
        return NEED_DATA

    def _at_end(self) -> Sentinel:
        return END

    def _after_damage(self) -> Decoded:
        assert self._error is not None
        raise self._error

    def _truncated(self) -> LogCorruption:
        have = self._buffered
        hdr = self._hdr
        if hdr is not None:
            have += HEADER_SIZE + (self._pfill if self._state == _FILL else len(self._payload))
            _, _, plen, *_ = hdr
            need = HEADER_SIZE + plen + TRAILER_SIZE
        else:
            need = HEADER_SIZE
        what = "record" if hdr is not None else "record header"
        return self._fail(
            self._rec_start, "truncated", f"file ends inside a {what} ({have} of {need} bytes present)", torn=True
        )

    def _parse_header(self) -> Decoded | Sentinel | None:
        """Decide on the header at ``_rec_start``; None means "go on to the body"."""
        buffered = self._buffered
        start = self._rec_start
        if buffered < HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            if not buffered:
                self._to("eof")
                return END
            if _all_zero(memoryview(self._peek(buffered))):
                raise self._fail(start, "zero-tail", f"zero-filled tail ({buffered} zero bytes to end of file)", True)
            raise self._truncated()
        raw = self._peek(HEADER_SIZE)
        (magic, version, kind_i, flags, plen, seq, lamport, offset, length, reserved, digest, stored) = _HDR.unpack(raw)
        if magic != START_MAGIC:
            # Either a zero-filled tail (torn, safe to cut) or garbage; which one
            # depends on every byte up to EOF, so keep reading without buffering.
            self._error = LogCorruption(
                self._name, start, "bad-start-magic", f"bad start magic {bytes(magic)!r} (expected {START_MAGIC!r})"
            )
            self._to("bad_magic")
            self._zeros_seen = 0
            return None
        # Magic bytes are nonzero, so from here on a zero tail is impossible.
        check = _xxh3(memoryview(raw)[:_CHECKED])
        if check != stored:
            raise self._fail(
                start, "header-check", f"header check mismatch (stored 0x{stored:016x}, computed 0x{check:016x})"
            )
        if version != FORMAT_VERSION:
            raise self._fail(start, "bad-version", f"unsupported format version {version} (expected {FORMAT_VERSION})")
        kind = _KINDS.get(kind_i)
        if kind is None:
            raise self._fail(start, "bad-kind", f"unknown record kind {kind_i}")
        if reserved:
            raise self._fail(start, "bad-reserved", f"reserved field is 0x{reserved:08x} (must be 0)")
        problem = _field_problem(kind, flags, plen, offset, length)
        if problem is not None:
            raise self._fail(start, *problem)
        expect = self._expect
        if expect is not None and seq != expect:
            raise self._fail(start, "seq-gap", f"sequence gap: expected seq {expect}, found {seq}")
        self._hdr = (kind, flags, plen, seq, lamport, offset, length, digest)
        self._check = check
        first = self._chunks[0]
        total = HEADER_SIZE + plen + TRAILER_SIZE
        if len(first) >= total:
            # The common case when reading a file in big chunks: the whole record is
            # in one piece, so verify it in place and consume it in one step.
            self._payload = first[HEADER_SIZE : HEADER_SIZE + plen]
            return self._emit(first[HEADER_SIZE + plen : total], total)
        self._skip(HEADER_SIZE)
        # The length is trusted from here on (the header check passed and it is
        # bounded by MAX_PAYLOAD), so it may size a buffer.
        if not plen:
            self._payload = b""
            self._to("trailer")
            return None
        chunks = self._chunks
        if chunks and len(chunks[0]) >= plen:
            self._payload = chunks[0][:plen]
            self._skip(plen)
            self._to("trailer")
            return None
        pbuf = bytearray(plen)
        fill = 0
        while chunks and fill < plen:
            c = chunks.popleft()
            n = min(len(c), plen - fill)
            pbuf[fill : fill + n] = c[:n]
            fill += n
            if n < len(c):
                chunks.appendleft(c[n:])
        self._buffered -= fill
        self._pfill = fill
        if fill == plen:
            self._payload = memoryview(pbuf).toreadonly()
            self._to("trailer")
        else:
            self._pbuf = pbuf
            self._to("fill")
        return None

    def _finish(self) -> Decoded | Sentinel:
        if self._buffered < TRAILER_SIZE:
            if self._eof:
                raise self._truncated()
            return NEED_DATA
        return self._emit(self._peek(TRAILER_SIZE), TRAILER_SIZE)

    def _emit(self, trailer: bytes | memoryview, consume: int) -> Decoded:
        """Check the trailer and the payload (in ``self._payload``) of the record whose
        header is ``self._hdr``; on success consume ``consume`` buffered bytes."""
        assert self._hdr is not None
        kind, flags, plen, seq, lamport, offset, length, digest = self._hdr
        start = self._rec_start
        end_magic, trailer_seq = _TRL.unpack(trailer)
        if end_magic != END_MAGIC:
            raise self._fail(start, "end-magic", f"bad end magic {bytes(end_magic)!r} (expected {END_MAGIC!r})")
        if trailer_seq != seq:
            raise self._fail(start, "trailer-seq", f"trailer seq {trailer_seq} does not match header seq {seq}")
        payload = self._payload
        computed = _xxh3(payload) if plen else _EMPTY_DIGEST
        if computed != digest:
            raise self._fail(
                start, "payload-digest", f"payload digest mismatch (stored 0x{digest:016x}, computed 0x{computed:016x})"
            )
        self._skip(consume)
        rec = _trusted_record(seq, lamport, offset, length, kind, flags, payload, computed)
        end = start + HEADER_SIZE + plen + TRAILER_SIZE
        ev = Decoded(rec, start, end, self._check)
        self._rec_start = end
        self._last_seq = seq
        self._expect = seq + 1
        self._hdr = None
        self._payload = b""
        if self._state is not _HEADER:  # a record that lay in one read never left it
            self._to("record")
        return ev

    def _scan_zeros(self) -> Sentinel:
        chunks = self._chunks
        while chunks:
            c = chunks.popleft()
            self._buffered -= len(c)
            if not _all_zero(c):
                err = self._error
                raise self._fail(err.offset, err.code, err.reason)
            self._zeros_seen += len(c)
        if not self._eof:
            return NEED_DATA
        raise self._fail(
            self._rec_start,
            "zero-tail",
            f"zero-filled tail ({self._zeros_seen} zero bytes to end of file)",
            torn=True,
        )
