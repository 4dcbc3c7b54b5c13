"""Tests for the transaction log record format (mars.engine.log.format).

The properties that matter for replication safety: what is encoded decodes back
unchanged however the bytes are split; no single damaged byte is ever replayed;
every cut is recognised as a torn tail at the right offset; garbage only ever
raises LogCorruption.
"""

from __future__ import annotations

import os
import pickle
import struct
from dataclasses import dataclass

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mars.engine.log.format import (
    END,
    END_MAGIC,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAX_PAYLOAD,
    NEED_DATA,
    START_MAGIC,
    TRAILER_SIZE,
    Decoded,
    Kind,
    LogCorruption,
    LogRecord,
    RecordReader,
    encode_batch,
    encode_record,
    encode_record_bytes,
    header_check,
    record_size,
)
from mars.engine.log.files import ScanResult, VersionHasher, scan_file

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

U64 = 2**64 - 1


# -- helpers ---------------------------------------------------------------------


def drain(reader: RecordReader, out: list[Decoded]):
    """Pull events until the reader wants data; returns END, NEED_DATA or the error."""
    while True:
        try:
            ev = reader.next_event()
        except LogCorruption as e:
            return e
        if ev is NEED_DATA or ev is END:
            return ev
        assert isinstance(ev, Decoded)
        out.append(ev)


def decode(data: bytes, cuts=(), start_offset: int = 0, expect_seq=None, name: str = "t.log"):
    """Feed `data` split at `cuts`, pulling events after every piece (as a network
    reader would). Returns (decoded records, END or LogCorruption)."""
    reader = RecordReader(name, start_offset, expect_seq)
    out: list[Decoded] = []
    bounds = [0, *sorted(c for c in set(cuts) if 0 < c < len(data)), len(data)]
    for a, b in zip(bounds, bounds[1:]):
        if a == b:
            continue  # b"" would mean EOF
        reader.receive_data(data[a:b])
        res = drain(reader, out)
        if isinstance(res, LogCorruption):
            return out, res
        assert res is NEED_DATA
    reader.receive_data(b"")
    res = drain(reader, out)
    assert res is END or isinstance(res, LogCorruption)
    return out, res


def make_stream(recs):
    blobs = [encode_record_bytes(r) for r in recs]
    starts = []
    pos = 0
    for b in blobs:
        starts.append(pos)
        pos += len(b)
    return b"".join(blobs), starts, pos


def write_rec(seq, offset=0, data=b"abc", lamport=None, flags=0):
    return LogRecord(seq, seq * 10 if lamport is None else lamport, offset, len(data), Kind.WRITE, flags, data)


def forge_header(
    *,
    magic=START_MAGIC,
    version=FORMAT_VERSION,
    kind=1,
    flags=0,
    plen=0,
    seq=1,
    lamport=0,
    offset=0,
    length=0,
    reserved=0,
    digest=None,
):
    """A header with a *valid* header check but arbitrary fields, to reach the checks
    behind the header check."""
    if digest is None:
        digest = xxhash.xxh3_64_intdigest(b"")
    body = struct.pack("<8sHBBIQQQIIQ", magic, version, kind, flags, plen, seq, lamport, offset, length, reserved, digest)
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


@st.composite
def record_lists(draw, min_size=1, max_size=4, max_payload=64 * 1024):
    n = draw(st.integers(min_size, max_size))
    seq0 = draw(st.integers(0, U64 - n))
    recs = []
    for i in range(n):
        kind = draw(st.sampled_from(list(Kind)))
        fua = draw(st.booleans())
        flags = FLAG_FUA if fua else 0
        if kind is Kind.WRITE:
            size = draw(st.integers(0, max_payload))
            # Random bytes for small payloads, a cheap pattern for big ones.
            if size <= 256:
                payload = draw(st.binary(min_size=size, max_size=size))
            else:
                payload = bytes([draw(st.integers(0, 255))]) * size
            length = size
        else:
            payload = b""
            length = draw(st.integers(0, 2**32 - 1))
            if kind is Kind.ZERO and draw(st.booleans()):
                flags |= FLAG_NO_HOLE
        offset = draw(st.integers(0, min(U64, 2**64 - length)))
        lamport = draw(st.integers(0, U64))
        recs.append(LogRecord(seq0 + i, lamport, offset, length, kind, flags, payload))
    return recs


# -- round trip --------------------------------------------------------------------


@SETTINGS
@given(recs=record_lists(), data=st.data())
def test_round_trip_whole_and_split(recs, data):
    stream, starts, total = make_stream(recs)
    assert total == sum(record_size(r.kind, r.length) for r in recs)
    cuts = data.draw(st.lists(st.integers(0, max(0, total - 1)), max_size=12))
    start_offset = data.draw(st.integers(0, 2**40))
    for split in ((), cuts):
        out, res = decode(stream, split, start_offset=start_offset)
        assert res is END
        assert [d.record for d in out] == recs
        for d, r, s in zip(out, recs, starts):
            assert d.offset == start_offset + s
            assert d.end == d.offset + record_size(r.kind, r.length)
            header = encode_record(r)[0]
            assert d.check == header_check(header) == struct.unpack_from("<Q", header, 56)[0]
            assert d.record.digest == r.digest == xxhash.xxh3_64_intdigest(bytes(r.payload))
            assert isinstance(d.record.payload, memoryview) or d.record.payload == b""
            assert type(d.record.kind) is Kind


@SETTINGS
@given(recs=record_lists(max_size=3, max_payload=600))
def test_round_trip_one_byte_pieces(recs):
    stream, _, _ = make_stream(recs)
    out, res = decode(stream, range(len(stream)))
    assert res is END
    assert [d.record for d in out] == recs


@SETTINGS
@given(recs=record_lists(max_size=4, max_payload=5000), piece=st.integers(1, 3000))
def test_reused_receive_buffer(recs, piece):
    """A network reader receives into one reused bytearray; records already yielded,
    and payloads being assembled, must not change when it is overwritten."""
    stream, _, _ = make_stream(recs)
    buf = bytearray(piece)
    reader = RecordReader()
    out: list[Decoded] = []
    for i in range(0, len(stream), piece):
        n = len(stream[i : i + piece])
        buf[:n] = stream[i : i + piece]
        reader.receive_data(memoryview(buf)[:n])
        assert drain(reader, out) is NEED_DATA
        buf[:] = b"\xee" * piece
    reader.receive_data(b"")
    assert drain(reader, out) is END
    assert [d.record for d in out] == recs


def test_big_payload_split_across_pieces():
    payload = os.urandom(3 * 2**20 + 17)
    recs = [write_rec(1, data=payload), write_rec(2, data=b"x" * 5), write_rec(3, data=payload[:1000])]
    stream, _, _ = make_stream(recs)
    out, res = decode(stream, range(0, len(stream), 65536 + 3))
    assert res is END
    assert [d.record for d in out] == recs


def test_max_payload_round_trip():
    rec = LogRecord(1, 2, 0, MAX_PAYLOAD, Kind.WRITE, 0, bytes(MAX_PAYLOAD))
    stream = encode_record_bytes(rec)
    assert len(stream) == record_size(Kind.WRITE, MAX_PAYLOAD)
    out, res = decode(stream, [10, 100, 2**20, 2**24])
    assert res is END and out[0].record == rec


def test_payload_in_one_piece_is_not_copied():
    rec = write_rec(1, data=b"p" * 1000)
    stream = encode_record_bytes(rec)
    reader = RecordReader()
    reader.receive_data(stream)
    ev = reader.next_event()
    p = ev.record.payload
    assert isinstance(p, memoryview) and p.readonly and p.obj is stream


def test_mutable_input_cannot_change_a_verified_record():
    rec = write_rec(1, data=b"p" * 1000)
    buf = bytearray(encode_record_bytes(rec))
    reader = RecordReader()
    reader.receive_data(buf)
    ev = reader.next_event()
    buf[HEADER_SIZE : HEADER_SIZE + 1000] = b"q" * 1000
    assert ev.record.payload == b"p" * 1000
    assert ev.record.payload.readonly


def test_encode_record_does_not_copy_payload_and_suits_pwritev(tmp_path):
    payload = memoryview(bytearray(b"z" * 4096))
    rec = LogRecord(9, 1, 8192, 4096, Kind.WRITE, FLAG_FUA, payload)
    parts = encode_record(rec)
    assert len(parts) == 3 and parts[1] is payload
    assert len(parts[0]) == HEADER_SIZE and len(parts[2]) == TRAILER_SIZE
    assert parts[0][:8] == START_MAGIC and parts[2][:8] == END_MAGIC
    fd = os.open(tmp_path / "l", os.O_RDWR | os.O_CREAT)
    try:
        assert os.pwritev(fd, parts, 0) == record_size(Kind.WRITE, 4096)
    finally:
        os.close(fd)
    assert (tmp_path / "l").read_bytes() == encode_record_bytes(rec)
    trim = encode_record(LogRecord(10, 1, 0, 2**32 - 1, Kind.TRIM))
    assert [len(p) for p in trim] == [HEADER_SIZE, 0, TRAILER_SIZE]


@dataclass
class _Entry:
    """A request as the logger queues it: a record's fields without seq and stamp."""

    kind: Kind
    flags: int
    offset: int
    length: int
    payload: bytes | memoryview


@given(recs=record_lists(max_size=6), stamp=st.integers(0, U64 - 6))
def test_a_batch_encodes_byte_for_byte_as_its_records_would(recs, stamp):
    """The logger's group commit (encode_batch) writes exactly what encode_record would for
    records of consecutive stamps, and its checks are each record's header check: the reader
    takes the batch back unchanged and the version chain cannot tell the two apart."""
    seq0 = recs[0].seq
    entries = [_Entry(r.kind, r.flags, r.offset, r.length, r.payload) for r in recs]
    bufs, checks = encode_batch(entries, seq0, stamp)
    want = [LogRecord(seq0 + i, stamp + i, r.offset, r.length, r.kind, r.flags, r.payload) for i, r in enumerate(recs)]
    assert b"".join(bytes(b) for b in bufs) == b"".join(encode_record_bytes(r) for r in want)
    assert checks == b"".join(header_check(encode_record(r)[0]).to_bytes(8, "little") for r in want)
    assert all(bufs[3 * i + 1] is r.payload for i, r in enumerate(recs))  # payloads not copied
    reader = RecordReader(expect_seq=seq0)
    reader.receive_data(b"".join(bytes(b) for b in bufs))
    reader.receive_data(b"")
    got: list[Decoded] = []
    assert drain(reader, got) is END
    assert [d.record for d in got] == want
    one, many = VersionHasher("00" * 16), VersionHasher("00" * 16)
    for r in want:
        one.update(header_check(encode_record(r)[0]))
    many.update_checks(checks)
    assert one.hexdigest() == many.hexdigest()


@pytest.mark.parametrize(
    "fields",
    [
        dict(kind=Kind.WRITE, length=4, payload=b"abc"),
        dict(kind=Kind.TRIM, length=4, payload=b"abcd"),
        dict(kind=Kind.WRITE, length=1, payload=b"a", flags=FLAG_NO_HOLE),
        dict(kind=Kind.ZERO, length=1, flags=4),
        dict(kind=Kind.TRIM, length=10, offset=2**64 - 5),
        dict(kind=Kind.WRITE, length=2, payload=b"ab", offset=2**64 - 1),
    ],
)
def test_a_batch_refuses_what_a_record_refuses(fields):
    args = dict(offset=0, flags=0, payload=b"")
    args.update(fields)
    with pytest.raises(ValueError):
        LogRecord(seq=1, lamport_ns=1, **args)
    with pytest.raises((ValueError, struct.error)):
        encode_batch([_Entry(**args)], 1, 1)


# -- record validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind=Kind.WRITE, length=4, payload=b"abc"),  # length != payload
        dict(kind=Kind.TRIM, length=3, payload=b"abc"),  # payload on TRIM
        dict(kind=Kind.ZERO, length=3, payload=b"a"),
        dict(kind=Kind.WRITE, length=MAX_PAYLOAD + 1, payload=bytes(MAX_PAYLOAD + 1)),
        dict(kind=Kind.TRIM, length=2**32),  # u32 field
        dict(kind=Kind.TRIM, length=-1),
        dict(kind=Kind.TRIM, length=10, offset=2**64 - 5),  # range wraps
        dict(kind=Kind.TRIM, length=0, offset=2**64),
        dict(kind=Kind.TRIM, length=0, seq=-1),
        dict(kind=Kind.TRIM, length=0, seq=2**64),
        dict(kind=Kind.TRIM, length=0, lamport_ns=2**64),
        dict(kind=Kind.WRITE, length=1, payload=b"a", flags=FLAG_NO_HOLE),  # NO_HOLE only for ZERO
        dict(kind=Kind.ZERO, length=1, flags=4),  # unknown flag
        dict(kind=Kind.ZERO, length=1, flags=256),
        dict(kind=4, length=0),
        dict(kind=0, length=0),
    ],
)
def test_invalid_records_are_refused(kwargs):
    args = dict(seq=1, lamport_ns=1, offset=0, flags=0, payload=b"")
    args.update(kwargs)
    with pytest.raises(ValueError):
        LogRecord(**args)


def test_record_accepts_plain_int_kind_and_caches_digest():
    rec = LogRecord(1, 2, 3, 3, 1, FLAG_FUA, b"abc")
    assert rec.kind is Kind.WRITE
    assert rec.digest == xxhash.xxh3_64_intdigest(b"abc")
    assert rec.digest == rec.digest
    assert LogRecord(1, 2, 3, 7, Kind.ZERO, FLAG_NO_HOLE | FLAG_FUA).digest == xxhash.xxh3_64_intdigest(b"")
    assert LogRecord(1, 2, 2**64 - 7, 7, Kind.TRIM).length == 7
    with pytest.raises(TypeError):
        LogRecord(1, 2, 3, 3, Kind.WRITE, 0, "abc")


def test_record_size():
    assert record_size(Kind.WRITE, 4096) == HEADER_SIZE + 4096 + TRAILER_SIZE
    assert record_size(Kind.TRIM, 2**30) == HEADER_SIZE + TRAILER_SIZE
    assert record_size(3, 5) == HEADER_SIZE + TRAILER_SIZE
    with pytest.raises(ValueError):
        record_size(7, 0)


# -- single-byte corruption ----------------------------------------------------------


SMALL = [
    write_rec(41, offset=4096, data=bytes(range(100))),
    LogRecord(42, 420, 0, 2**20, Kind.TRIM, FLAG_FUA),
    LogRecord(43, 430, 512, 1024, Kind.ZERO, FLAG_NO_HOLE),
]


def check_flip(recs, stream, starts, pos, mask):
    bad = bytearray(stream)
    bad[pos] ^= mask
    victim = max(i for i, s in enumerate(starts) if s <= pos)
    out, res = decode(bytes(bad))
    assert isinstance(res, LogCorruption), (pos, mask)
    # Everything before the damaged record is intact and returned; the damaged record
    # itself is never returned, and the error points at its start.
    assert [d.record for d in out] == recs[:victim], (pos, mask)
    assert res.offset == starts[victim], (pos, mask, res)
    assert not res.torn, (pos, mask, res)
    return res.code


def test_every_single_byte_corruption_is_detected_exhaustive():
    stream, starts, _ = make_stream(SMALL)
    codes = set()
    for pos in range(len(stream)):
        for mask in range(1, 256):
            codes.add(check_flip(SMALL, stream, starts, pos, mask))
    assert codes == {"bad-start-magic", "header-check", "payload-digest", "end-magic", "trailer-seq"}


@SETTINGS
@given(recs=record_lists(min_size=1, max_size=4, max_payload=3000), data=st.data())
def test_every_single_byte_corruption_is_detected_random(recs, data):
    stream, starts, total = make_stream(recs)
    pos = data.draw(st.integers(0, total - 1))
    mask = data.draw(st.integers(1, 255))
    check_flip(recs, stream, starts, pos, mask)


# -- truncation and zero tails ----------------------------------------------------------


def test_every_truncation_is_a_torn_tail():
    recs = [*SMALL, write_rec(44, data=b"tail" * 30)]
    stream, starts, total = make_stream(recs)
    ends = starts[1:] + [total]
    for cut in range(total + 1):
        for cuts in ((), range(0, cut, 5)):
            out, res = decode(stream[:cut], cuts)
            complete = [r for r, e in zip(recs, ends) if e <= cut]
            assert [d.record for d in out] == complete
            if cut in (0, *ends):
                assert res is END, cut
            else:
                assert isinstance(res, LogCorruption), cut
                assert res.torn and res.code == "truncated", (cut, res)
                assert res.offset == starts[len(complete)]


@SETTINGS
@given(recs=record_lists(min_size=0, max_size=3, max_payload=2000), data=st.data())
def test_random_truncation(recs, data):
    stream, starts, total = make_stream(recs)
    cut = data.draw(st.integers(0, total))
    cuts = data.draw(st.lists(st.integers(0, total), max_size=5))
    out, res = decode(stream[:cut], cuts, start_offset=1000)
    ends = starts[1:] + [total]
    n = sum(e <= cut for e in ends)
    assert [d.record for d in out] == recs[:n]
    if cut == 0 or cut in ends:
        assert res is END
    else:
        assert res.torn and res.code == "truncated" and res.offset == 1000 + starts[n]


@SETTINGS
@given(
    recs=record_lists(min_size=0, max_size=3, max_payload=2000),
    zeros=st.one_of(st.integers(0, 300), st.just(2**20 + 5)),
    data=st.data(),
)
def test_zero_tail_is_torn(recs, zeros, data):
    stream, _, total = make_stream(recs)
    full = stream + bytes(zeros)
    cuts = data.draw(st.lists(st.integers(0, len(full)), max_size=6))
    out, res = decode(full, cuts)
    assert [d.record for d in out] == recs
    if zeros == 0:
        assert res is END
    else:
        assert isinstance(res, LogCorruption)
        assert res.torn and res.code == "zero-tail" and res.offset == total
        assert f"offset {total}:" in str(res)


@pytest.mark.parametrize("zeros", [64, 100, 5000])
def test_zeros_followed_by_data_is_not_torn(zeros):
    stream, _, total = make_stream(SMALL)
    out, res = decode(stream + bytes(zeros) + b"\x01" + bytes(10), range(0, 10**5, 33))
    assert len(out) == 3
    assert res.code == "bad-start-magic" and not res.torn and res.offset == total


def test_short_garbage_tail_is_torn_but_long_garbage_is_not():
    stream, _, total = make_stream(SMALL)
    _, res = decode(stream + b"junk")
    assert res.torn and res.code == "truncated" and res.offset == total
    _, res = decode(stream + b"j" * HEADER_SIZE)
    assert not res.torn and res.code == "bad-start-magic" and res.offset == total


# -- header field checks behind the header check -----------------------------------------


@pytest.mark.parametrize(
    "fields, code",
    [
        (dict(version=2), "bad-version"),
        (dict(version=0), "bad-version"),
        (dict(kind=0), "bad-kind"),
        (dict(kind=9), "bad-kind"),
        (dict(reserved=1), "bad-reserved"),
        (dict(kind=2, flags=FLAG_NO_HOLE), "bad-flags"),
        (dict(kind=3, flags=0x80), "bad-flags"),
        (dict(kind=1, plen=10, length=11), "bad-length"),
        (dict(kind=1, plen=MAX_PAYLOAD + 1, length=MAX_PAYLOAD + 1), "bad-length"),
        (dict(kind=1, plen=2**32 - 1, length=2**32 - 1), "bad-length"),
        (dict(kind=2, plen=5, length=5), "bad-length"),
        (dict(kind=3, plen=1, length=0), "bad-length"),
        (dict(kind=2, offset=2**64 - 1, length=2), "bad-length"),
        (dict(kind=2, seq=7), "seq-gap"),
    ],
)
def test_forged_headers_with_valid_check(fields, code):
    header = forge_header(**{"seq": 1, **fields})
    # Plenty of bytes after it, so that nothing is mistaken for a torn tail.
    out, res = decode(header + b"\xff" * 200, expect_seq=1)
    assert out == []
    assert isinstance(res, LogCorruption) and res.code == code and not res.torn and res.offset == 0


def test_huge_forged_length_is_refused_before_allocation():
    import tracemalloc

    header = forge_header(kind=1, plen=2**32 - 1, length=2**32 - 1)
    tracemalloc.start()
    try:
        _, res = decode(header)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.code == "bad-length"
    assert peak < 2**20


def test_trailer_checks():
    rec = write_rec(5, data=b"hello")
    stream = encode_record_bytes(rec)
    wrong_seq = stream[:-8] + struct.pack("<Q", 6)
    _, res = decode(wrong_seq + stream)
    assert res.code == "trailer-seq" and not res.torn
    wrong_magic = stream[:-16] + START_MAGIC + stream[-8:]
    _, res = decode(wrong_magic)
    assert res.code == "end-magic" and not res.torn


# -- sequence continuity ----------------------------------------------------------------------


def test_seq_continuity():
    a, b, c = write_rec(10), write_rec(11), write_rec(12)
    out, res = decode(encode_record_bytes(a) + encode_record_bytes(b), expect_seq=10)
    assert res is END and len(out) == 2
    out, res = decode(encode_record_bytes(b), expect_seq=10)
    assert res.code == "seq-gap" and res.offset == 0 and not res.torn and out == []
    # Without expect_seq the first seq is free, later ones must follow it.
    gap = encode_record_bytes(a) + encode_record_bytes(c)
    out, res = decode(gap)
    assert [d.record for d in out] == [a]
    assert res.code == "seq-gap" and res.offset == len(encode_record_bytes(a))
    assert "expected seq 11, found 12" in res.reason
    repeat = encode_record_bytes(a) + encode_record_bytes(a)
    _, res = decode(repeat)
    assert res.code == "seq-gap"
    # A seq gap in the last record of a file is still not a torn tail.
    _, res = decode(encode_record_bytes(a), expect_seq=3)
    assert not res.torn


def test_reader_positions():
    a, b = write_rec(1), write_rec(2)
    reader = RecordReader("x", start_offset=500)
    assert reader.position == 500 and reader.last_seq is None
    reader.receive_data(encode_record_bytes(a) + encode_record_bytes(b))
    reader.next_event()
    assert reader.position == 500 + record_size(Kind.WRITE, 3) and reader.last_seq == 1


# -- garbage ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=400), data=st.data())
def test_garbage_only_raises_log_corruption(garbage, data):
    cuts = data.draw(st.lists(st.integers(0, len(garbage)), max_size=5))
    out, res = decode(garbage, cuts)
    assert res is END or isinstance(res, LogCorruption)
    assert res is END or res.code


@settings(max_examples=200, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {
            "version": st.sampled_from([0, 1, 1, 1, 2, 65535]),
            "kind": st.sampled_from([0, 1, 2, 3, 4, 255]),
            "flags": st.sampled_from([0, 1, 2, 3, 4, 255]),
            "plen": st.sampled_from([0, 1, 3, 16, 100, MAX_PAYLOAD + 1, 2**32 - 1]),
            "seq": st.sampled_from([0, 1, U64]),
            "offset": st.sampled_from([0, 2**64 - 1, 2**63]),
            "length": st.sampled_from([0, 1, 3, 16, 100, 2**32 - 1]),
            "reserved": st.sampled_from([0, 0, 1]),
        }
    ),
    tail=st.binary(max_size=200),
    data=st.data(),
)
def test_forged_header_fuzz(fields, tail, data):
    stream = forge_header(**fields) + tail
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=4))
    out, res = decode(stream, cuts)
    assert res is END or isinstance(res, LogCorruption)
    # The decoder accepts only canonical encodings: whatever it returns re-encodes
    # to exactly the bytes it came from.
    for d in out:
        assert encode_record_bytes(d.record) == stream[d.offset : d.end]


# -- reader protocol -----------------------------------------------------------------------------


def test_reader_protocol_edges():
    rec = write_rec(1)
    reader = RecordReader()
    assert reader.next_event() is NEED_DATA
    reader.receive_data(encode_record_bytes(rec))
    assert isinstance(reader.next_event(), Decoded)
    assert reader.next_event() is NEED_DATA
    reader.receive_data(b"")
    assert reader.next_event() is END
    assert reader.next_event() is END
    with pytest.raises(RuntimeError):
        reader.receive_data(b"more")
    assert repr(NEED_DATA) == "NEED_DATA" and repr(END) == "END"


def test_error_is_sticky():
    reader = RecordReader("f")
    reader.receive_data(bytes(100))
    assert reader.next_event() is NEED_DATA  # a zero tail or zeros then garbage? EOF tells
    reader.receive_data(b"x")
    with pytest.raises(LogCorruption) as first:
        reader.next_event()
    with pytest.raises(LogCorruption) as again:
        reader.next_event()
    assert again.value is first.value and not first.value.torn
    reader2 = RecordReader("f")
    reader2.receive_data(forge_header(version=9))
    with pytest.raises(LogCorruption) as e1:
        reader2.next_event()
    reader2.receive_data(encode_record_bytes(write_rec(1)))
    with pytest.raises(LogCorruption) as e2:
        reader2.next_event()
    assert e1.value is e2.value
    assert first.value.code == "bad-start-magic"


def test_log_corruption_message_and_pickle():
    rec = write_rec(3, data=b"q" * 50)
    good = encode_record_bytes(write_rec(2, data=b"g" * 8192))
    bad = bytearray(encode_record_bytes(rec))
    bad[HEADER_SIZE + 10] ^= 1
    _, res = decode(good + bytes(bad), name="log-000000001-a")
    msg = str(res)
    assert msg.startswith(f"log-000000001-a: offset {len(good)}: payload digest mismatch (stored 0x")
    assert ", computed 0x" in msg
    assert res.file == "log-000000001-a" and res.offset == len(good) and res.code == "payload-digest"
    copy = pickle.loads(pickle.dumps(res))
    assert (copy.file, copy.offset, copy.code, copy.reason, copy.torn) == (
        res.file,
        res.offset,
        res.code,
        res.reason,
        res.torn,
    )
    assert str(copy) == msg


# -- scan_file --------------------------------------------------------------------------------------


def scan_recs():
    recs = []
    for i in range(12):
        if i % 4 == 3:
            recs.append(LogRecord(100 + i, i, i * 4096, 8192, Kind.TRIM))
        else:
            recs.append(write_rec(100 + i, offset=i * 4096, data=os.urandom(1000 * (i + 1))))
    recs.append(write_rec(112, data=os.urandom(3 * 2**20 + 1)))  # straddles read chunks
    recs.append(LogRecord(113, 1, 0, 512, Kind.ZERO, FLAG_NO_HOLE))
    return recs


@pytest.mark.parametrize("chunk", [4 * 2**20, 2**20, 4096, 7])
def test_scan_good_file(tmp_path, chunk):
    recs = scan_recs()
    stream, starts, total = make_stream(recs)
    path = tmp_path / "log-000000001-a"
    path.write_bytes(stream)
    seen = []
    res = scan_file(path, expect_seq=100, on_record=seen.append, chunk=chunk if chunk > 7 else 7)
    assert res == ScanResult(total, 113, len(recs), None)
    assert [d.record for d in seen] == recs
    assert [d.offset for d in seen] == starts
    # Also from a record boundary in the middle, with and without expect_seq.
    seen = []
    res = scan_file(str(path), start=starts[5], expect_seq=105, on_record=seen.append, chunk=max(chunk, 64))
    assert res.error is None and res.count == len(recs) - 5 and res.end == total
    assert [d.record.seq for d in seen] == list(range(105, 114))
    assert seen[0].offset == starts[5]


def test_scan_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    assert scan_file(path) == ScanResult(0, None, 0, None)


def test_scan_truncated_file(tmp_path):
    recs = scan_recs()
    stream, starts, _ = make_stream(recs)
    path = tmp_path / "log"
    for cut in (starts[7] + 10, starts[12] + 2**20, starts[1] + 63):
        path.write_bytes(stream[:cut])
        n = max(i for i, s in enumerate(starts) if s < cut)
        res = scan_file(path, chunk=65536)
        assert res.count == n and res.end == starts[n] and res.last_seq == (100 + n - 1)
        assert res.error.torn and res.error.code == "truncated" and res.error.offset == res.end


def test_scan_zero_tail_file(tmp_path):
    stream, _, total = make_stream(scan_recs()[:4])
    path = tmp_path / "log"
    path.write_bytes(stream + bytes(3 * 2**20))
    res = scan_file(path, chunk=2**20)
    assert res.count == 4 and res.end == total
    assert res.error.torn and res.error.code == "zero-tail" and res.error.offset == total


def test_scan_corrupted_middle(tmp_path):
    recs = scan_recs()
    stream, starts, _ = make_stream(recs)
    bad = bytearray(stream)
    bad[starts[6] + HEADER_SIZE + 500] ^= 0x20
    path = tmp_path / "log-000000007-b"
    path.write_bytes(bytes(bad))
    seen = []
    res = scan_file(path, on_record=seen.append, chunk=4096)
    assert [d.record for d in seen] == recs[:6]
    assert res.count == 6 and res.end == starts[6] and res.last_seq == 105
    err = res.error
    assert not err.torn and err.code == "payload-digest" and err.offset == starts[6]
    assert str(err).startswith(f"{path}: offset {starts[6]}: payload digest mismatch")
    # A broken header in the middle.
    bad = bytearray(stream)
    bad[starts[9] + 20] ^= 1
    path.write_bytes(bytes(bad))
    res = scan_file(path)
    assert res.count == 9 and res.error.code == "header-check" and not res.error.torn
    assert res.error.offset == starts[9] == res.end


def test_scan_seq_gap_and_bad_start(tmp_path):
    recs = scan_recs()
    stream, starts, _ = make_stream(recs)
    path = tmp_path / "log"
    path.write_bytes(stream)
    res = scan_file(path, expect_seq=99)
    assert res.count == 0 and res.end == 0 and res.error.code == "seq-gap" and not res.error.torn
    # Starting off a record boundary is garbage to the reader, never a crash.
    res = scan_file(path, start=starts[2] + 1)
    assert res.count == 0 and res.error is not None and res.error.offset == starts[2] + 1
    # Starting beyond the end of the file: data known to exist is gone.
    res = scan_file(path, start=len(stream) + 1)
    assert res.error.code == "short-file" and not res.error.torn
    res = scan_file(path, start=len(stream))
    assert res == ScanResult(len(stream), None, 0, None)
    with pytest.raises(ValueError):
        scan_file(path, chunk=0)


def test_scan_missing_file_raises_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_file(tmp_path / "nope")


@given(sizes=st.lists(st.integers(0, 300), min_size=0, max_size=8), data=st.data())
def test_a_short_write_is_continued_where_it_stopped(tmp_path_factory, sizes, data):
    """pwritev_all writes everything in one call nearly always; when the kernel writes less (a
    signal, a huge batch), the rest goes on from the exact byte it stopped at."""
    from mars.engine.log.apply import _pwritev_rest, pwritev_all

    bufs = [bytes([i + 1]) * n for i, n in enumerate(sizes)]
    whole = b"".join(bufs)
    want = bytes(7) + whole if whole else b""  # nothing written does not extend the file
    stopped = data.draw(st.integers(0, len(whole)))
    path = tmp_path_factory.mktemp("w") / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert pwritev_all(fd, [memoryview(b) for b in bufs], 7) == len(whole)
        assert path.read_bytes() == want
        os.ftruncate(fd, 0)
        os.pwrite(fd, whole[:stopped], 7)  # what a short first call wrote
        assert _pwritev_rest(fd, bufs, 7, stopped) == len(whole) - stopped
        assert path.read_bytes() == (want if stopped or whole else b"")
    finally:
        os.close(fd)
