"""Tests for the sans-I/O peer protocol core (mars.engine.peer.protocol).

Frames for the negative cases are built here with struct and json straight from the wire format
in the module docstring, independently of the module's own encoder, so a wrong constant in the
module shows up as a failing test rather than as two wrongs agreeing.
"""

from __future__ import annotations

import json
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import events_until

from mars.engine.peer import protocol as P
from mars.engine.peer.protocol import (
    MAX_DATA,
    MAX_FRAME,
    MAX_INT,
    MAX_META,
    NEED_DATA,
    PROTO_VERSION,
    Bye,
    Closed,
    DigestReply,
    DigestRequest,
    ErrorReply,
    FetchRequest,
    Hello,
    LocalProtocolError,
    LogData,
    PeerConnection,
    PeerProtocolError,
    ReadReply,
    ReadRequest,
    TreeChanges,
    TreeEntries,
    TreeRequest,
    TreeSince,
    decode,
    encode,
)
from mars.engine.entry import Entry

# The type numbers as the wire format fixes them (not taken from the module).
HELLO, TREE_REQUEST, TREE_ENTRIES, FETCH_REQUEST, LOG_DATA = 1, 2, 3, 4, 5
DIGEST_REQUEST, DIGEST_REPLY, READ_REQUEST, READ_REPLY, ERROR_REPLY, BYE = 6, 7, 8, 9, 10, 11


def frame(type_: int, meta: dict | list | bytes | str, data: bytes = b"") -> bytes:
    """A frame by hand: u32 body_len, u8 type, u32 meta_len, meta, data (big-endian)."""
    if isinstance(meta, bytes):
        raw = meta
    elif isinstance(meta, str):
        raw = meta.encode()
    else:
        raw = json.dumps(meta).encode()
    return struct.pack(">IBI", 5 + len(raw) + len(data), type_, len(raw)) + raw + data


OUR = Hello(host="alpha", cluster="c0ffee", proto=PROTO_VERSION, lamport_ns=1_000)
THEIRS = Hello(host="beta", cluster="c0ffee", proto=PROTO_VERSION, lamport_ns=2_000)
THEIR_HELLO_BYTES = frame(HELLO, {"host": "beta", "cluster": "c0ffee", "proto": PROTO_VERSION, "lamport_ns": 2000})


def opened() -> PeerConnection:
    """A connection that has sent its Hello and received the peer's."""
    conn = PeerConnection(OUR)
    conn.initial_bytes()
    conn.receive_data(THEIR_HELLO_BYTES)
    assert conn.next_event() == THEIRS
    return conn


def drain(conn: PeerConnection) -> list:
    """Every event the buffered bytes yield, up to NEED_DATA or Closed (inclusive)."""
    return events_until(conn, (Closed,))


# --- strategies ----------------------------------------------------------------------------

_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_component_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/")
components = st.text(_component_chars, min_size=1, max_size=16).filter(lambda s: s not in (".", ".."))
texts = st.text(_chars, max_size=40)
ints = st.integers(0, MAX_INT)
reqs = st.integers(1, MAX_INT)
payloads = st.binary(max_size=300)
paths = st.lists(components, min_size=1, max_size=4).map("/".join)
prefixes = st.lists(st.one_of(st.just(""), paths, paths.map(lambda p: p + "/")), max_size=4).map(tuple)
entries = st.builds(Entry, paths, st.text(_chars, min_size=1, max_size=40), ints)
digests = st.one_of(st.none(), st.binary(min_size=1, max_size=64).map(bytes.hex))
codes = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)


@st.composite
def log_data(draw) -> LogData:
    data = draw(payloads)
    offset = draw(st.integers(0, MAX_INT - len(data)))
    size = draw(st.integers(offset + len(data), MAX_INT))
    return LogData(draw(reqs), draw(components), draw(components), offset, size, draw(st.booleans()), data)


@st.composite
def tree_changes(draw) -> TreeChanges:
    from_seq = draw(ints)
    return TreeChanges(draw(reqs), draw(ints), from_seq, draw(st.integers(from_seq, MAX_INT)), draw(ints),
                       tuple(draw(st.lists(entries, max_size=5))))


def hellos(proto=ints):
    return st.builds(Hello, components, st.one_of(st.just(""), components), proto, ints)


body_messages = st.one_of(
    st.builds(TreeRequest, reqs, prefixes),
    st.builds(TreeEntries, st.integers(0, MAX_INT), st.lists(entries, max_size=5).map(tuple)),
    st.builds(FetchRequest, reqs, components, components, ints, st.integers(0, MAX_DATA), ints),
    log_data(),
    st.builds(DigestRequest, reqs, components, ints, st.integers(1, MAX_INT), ints),
    st.builds(DigestReply, reqs, components, ints, st.integers(1, MAX_INT), st.lists(digests, max_size=6).map(tuple)),
    st.builds(ReadRequest, reqs, components, ints, st.integers(0, MAX_DATA)),
    st.builds(ReadReply, reqs, ints, payloads),
    st.builds(ErrorReply, st.integers(0, MAX_INT), codes, texts, texts),
    st.builds(TreeSince, reqs, ints, ints, st.booleans()),
    tree_changes(),
)
all_messages = st.one_of(body_messages, hellos(), st.builds(Bye, texts))


def split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points + [len(raw)]:
        pieces.append(raw[last:p])
        last = p
    return [p for p in pieces if p]


# --- round trips ---------------------------------------------------------------------------


def test_type_numbers_are_the_wire_format():
    assert {n: cls.__name__ for n, cls in P.MESSAGE_TYPES.items()} == {
        1: "Hello", 2: "TreeRequest", 3: "TreeEntries", 4: "FetchRequest", 5: "LogData",
        6: "DigestRequest", 7: "DigestReply", 8: "ReadRequest", 9: "ReadReply", 10: "ErrorReply", 11: "Bye",
            12: "TreeSince", 13: "TreeChanges", 14: "DirtyMapRequest", 15: "DirtyMapReply",
    }


def test_encoding_is_the_documented_layout():
    assert encode(Bye(reason="x")) == struct.pack(">IBI", 5 + 14, BYE, 14) + b'{"reason":"x"}'
    msg = LogData(req=7, res="r", name="log-000000001-a", offset=3, size=10, finished=True, data=b"abc")
    meta = b'{"req":7,"res":"r","name":"log-000000001-a","offset":3,"size":10,"finished":true}'
    assert encode(msg) == struct.pack(">IBI", 5 + len(meta) + 3, LOG_DATA, len(meta)) + meta + b"abc"
    tree = TreeEntries(req=0, entries=(Entry("resource-r/size", "1048576", 5),))
    assert encode(tree).endswith(b'{"req":0,"entries":[["resource-r/size","1048576",5]]}')
    # Non-ASCII travels as UTF-8, not as \u escapes (the meta is UTF-8 JSON, compact).
    assert "é".encode() in encode(Bye(reason="é"))


def test_decoding_accepts_any_whitespace_and_key_order():
    raw = b' { "lamport_ns" : 2000 ,\n "proto":2, "cluster":"c0ffee","host":"beta" } '
    assert decode(frame(HELLO, raw)) == THEIRS


@given(all_messages)
def test_encode_decode_round_trip(msg):
    raw = encode(msg)
    back = decode(raw)
    assert back == msg
    assert type(back) is type(msg)
    assert encode(back) == raw  # canonical: one message, one encoding


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(body_messages, max_size=6), hellos(st.just(PROTO_VERSION)),
       st.lists(st.integers(0, 10**6), max_size=12))
def test_connection_round_trip_split_at_random_points(msgs, hello, cuts):
    sender = PeerConnection(hello)
    stream = sender.initial_bytes() + b"".join(sender.send(m) for m in msgs)
    receiver = PeerConnection(OUR)
    events = []
    for piece in split_at(stream, cuts):
        receiver.receive_data(piece)
        events += drain(receiver)
    receiver.receive_data(b"")
    events += drain(receiver)
    assert events == [hello, *msgs, Closed(truncated=False)]
    assert receiver.peer_hello == hello


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, max_examples=50)
@given(st.lists(all_messages.filter(lambda m: type(m) not in (Hello, Bye)), max_size=4))
def test_connection_round_trip_byte_by_byte(msgs):
    sender = PeerConnection(THEIRS)
    stream = sender.initial_bytes() + b"".join(sender.send(m) for m in msgs) + sender.send(Bye("done"))
    receiver = PeerConnection(OUR)
    events = []
    for i in range(len(stream)):
        receiver.receive_data(stream[i : i + 1])
        events += drain(receiver)
    assert events == [THEIRS, *msgs, Bye("done"), Closed(truncated=False)]  # after Bye: closed
    assert receiver.next_event() == Closed(truncated=False)


@given(st.lists(body_messages, min_size=1, max_size=4))
def test_send_buffers_join_to_send_and_do_not_copy_payloads(msgs):
    conn = PeerConnection(OUR)
    conn.initial_bytes()
    for m in msgs:
        buffers = conn.send_buffers(m)
        assert b"".join(buffers) == encode(m) == conn.send(m)
        if isinstance(m, (LogData, ReadReply)) and m.data:
            assert buffers[-1] is m.data


def test_payload_may_be_a_memoryview_or_bytearray():
    backing = bytearray(b"0123456789")
    view = memoryview(backing)[2:6]
    msg = ReadReply(req=1, offset=2, data=view)
    conn = PeerConnection(OUR)
    conn.initial_bytes()
    assert conn.send_buffers(msg)[-1] is view
    assert decode(conn.send(msg)) == ReadReply(req=1, offset=2, data=b"2345")
    assert decode(encode(ReadReply(req=1, offset=0, data=bytearray(b"xy")))).data == b"xy"


def test_received_buffers_are_copied_not_kept():
    """A caller may reuse its read buffer: decoded data must not change with it."""
    conn = opened()
    raw = bytearray(encode(ReadReply(req=1, offset=0, data=b"A" * 5000)))
    conn.receive_data(raw)
    raw[:] = b"B" * len(raw)
    assert conn.next_event().data == b"A" * 5000


# --- garbage -------------------------------------------------------------------------------


def consume_or_refuse(conn: PeerConnection, chunks: list[bytes], eof: bool) -> None:
    """Feed chunks; every event must be a valid message or Closed, the only error PeerProtocolError."""
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for ev in drain(conn):
                if not isinstance(ev, Closed):
                    assert decode(encode(ev)) == ev  # anything accepted is a well-formed message
        if eof:
            conn.receive_data(b"")
            assert isinstance(drain(conn)[-1], Closed)
    except PeerProtocolError as e:
        assert isinstance(e.reason, str) and e.reason
        with pytest.raises(PeerProtocolError):  # poisoned for good
            conn.next_event()
        assert conn.state == "error"


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.lists(st.integers(0, 10**4), max_size=5), st.booleans())
def test_garbage_after_hello_only_raises_protocol_error(garbage, cuts, eof):
    conn = opened()
    consume_or_refuse(conn, split_at(garbage, cuts), eof)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.lists(st.integers(0, 10**4), max_size=5), st.booleans())
def test_garbage_instead_of_hello_only_raises_protocol_error(garbage, cuts, eof):
    conn = PeerConnection(OUR)
    conn.initial_bytes()
    consume_or_refuse(conn, split_at(garbage, cuts), eof)
    assert conn.peer_hello is None or garbage.startswith(encode(conn.peer_hello))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
              st.text(max_size=12), st.sampled_from(["..", "/etc/passwd", "a/../b", "", "a\x00b", "ABCD", "00ff"])),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)


@st.composite
def structured_garbage(draw) -> bytes:
    """Frames that get past the framing: the right field names with random JSON values, some
    fields dropped or added, so the fuzzer reaches every field check rather than the length check."""
    type_ = draw(st.integers(0, 12))
    cls = P.MESSAGE_TYPES.get(type_, Bye)
    names = [n for n in cls.__slots__ if n != "data"]
    meta = {n: draw(json_values) for n in names if draw(st.integers(0, 9))}
    if draw(st.booleans()):
        meta.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    data = draw(st.binary(max_size=20)) if draw(st.booleans()) else b""
    return frame(type_, json.dumps(meta, allow_nan=True), data)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(structured_garbage(), min_size=1, max_size=4))
def test_structured_garbage_only_raises_protocol_error(frames):
    consume_or_refuse(opened(), frames, eof=True)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(all_messages, st.data())
def test_mutated_frames_only_raise_protocol_error(msg, data):
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        what = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        if what == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif what == "insert":
            raw.insert(i, data.draw(st.integers(0, 255)))
        elif len(raw) > 1:
            del raw[i]
    consume_or_refuse(opened(), [bytes(raw)], eof=True)


# --- strict validation: what a peer may not send -------------------------------------------

GOOD = {
    HELLO: {"host": "beta", "cluster": "c", "proto": PROTO_VERSION, "lamport_ns": 5},
    TREE_REQUEST: {"req": 1, "prefixes": ["resource-r/"]},
    TREE_ENTRIES: {"req": 1, "entries": [["resource-r/size", "4096", 7]]},
    FETCH_REQUEST: {"req": 1, "res": "r", "name": "log-000000001-a", "offset": 0, "max_bytes": 1 << 20,
                    "wait_ms": 1000},
    LOG_DATA: {"req": 1, "res": "r", "name": "log-000000001-a", "offset": 0, "size": 3, "finished": False},
    DIGEST_REQUEST: {"req": 1, "res": "r", "offset": 0, "chunk": 1 << 20, "count": 16},
    DIGEST_REPLY: {"req": 1, "res": "r", "offset": 0, "chunk": 1 << 20, "digests": ["00ff", None]},
    READ_REQUEST: {"req": 1, "res": "r", "offset": 0, "length": 4096},
    READ_REPLY: {"req": 1, "offset": 0},
    ERROR_REPLY: {"req": 0, "code": "refused", "what": "no such resource", "remedy": "create it"},
    BYE: {"reason": "shutting down"},
}
GOOD_DATA = {LOG_DATA: b"abc", READ_REPLY: b"xyz"}


@pytest.mark.parametrize("type_", sorted(GOOD))
def test_table_baseline_is_accepted(type_):
    """The cases below change one thing each; this shows the unchanged frame is fine."""
    conn = PeerConnection(OUR) if type_ == HELLO else opened()
    if type_ == HELLO:
        conn.initial_bytes()
    conn.receive_data(frame(type_, GOOD[type_], GOOD_DATA.get(type_, b"")))
    assert type(conn.next_event()).__name__ == P.MESSAGE_TYPES[type_].__name__


def changed(type_: int, **fields) -> tuple[int, dict]:
    meta = dict(GOOD[type_])
    for k, v in fields.items():
        if v is DROP:
            del meta[k]
        else:
            meta[k] = v
    return type_, meta


DROP = object()
LONG = "x" * 300

BAD_FIELDS = {
    "hello missing field": changed(HELLO, lamport_ns=DROP),
    "hello extra field": changed(HELLO, extra=1),
    "hello proto as string": changed(HELLO, proto="1"),
    "hello proto as bool": changed(HELLO, proto=True),
    "hello proto as float": changed(HELLO, proto=1.0),
    "hello negative stamp": changed(HELLO, lamport_ns=-1),
    "hello stamp past int64": changed(HELLO, lamport_ns=2**63),
    "hello huge stamp": changed(HELLO, lamport_ns=10**40),
    "hello empty host": changed(HELLO, host=""),
    "hello host with slash": changed(HELLO, host="a/b"),
    "hello host dotdot": changed(HELLO, host=".."),
    "hello host with NUL": changed(HELLO, host="a\x00b"),
    "hello host lone surrogate": changed(HELLO, host="\udc80"),
    "hello host too long": changed(HELLO, host=LONG),
    "hello host null": changed(HELLO, host=None),
    "tree request req 0": changed(TREE_REQUEST, req=0),
    "tree request prefixes as string": changed(TREE_REQUEST, prefixes="resource-r/"),
    "tree request prefix not a string": changed(TREE_REQUEST, prefixes=[1]),
    "tree request absolute prefix": changed(TREE_REQUEST, prefixes=["/etc"]),
    "tree request dotdot prefix": changed(TREE_REQUEST, prefixes=["a/../b"]),
    "tree request NUL prefix": changed(TREE_REQUEST, prefixes=["a\x00"]),
    "entries dotdot path": changed(TREE_ENTRIES, entries=[["../x", "v", 1]]),
    "entries dotdot inside path": changed(TREE_ENTRIES, entries=[["a/../../x", "v", 1]]),
    "entries absolute path": changed(TREE_ENTRIES, entries=[["/etc/passwd", "v", 1]]),
    "entries empty component": changed(TREE_ENTRIES, entries=[["a//b", "v", 1]]),
    "entries trailing slash": changed(TREE_ENTRIES, entries=[["a/b/", "v", 1]]),
    "entries dot component": changed(TREE_ENTRIES, entries=[["a/./b", "v", 1]]),
    "entries empty path": changed(TREE_ENTRIES, entries=[["", "v", 1]]),
    "entries NUL in path": changed(TREE_ENTRIES, entries=[["a\x00b", "v", 1]]),
    "entries NUL in value": changed(TREE_ENTRIES, entries=[["a", "v\x00", 1]]),
    "entries empty value": changed(TREE_ENTRIES, entries=[["a", "", 1]]),
    "entries path too long": changed(TREE_ENTRIES, entries=[["a" * 1025, "v", 1]]),
    "entries value too long": changed(TREE_ENTRIES, entries=[["a", "v" * 4097, 1]]),
    "entries value too long in bytes": changed(TREE_ENTRIES, entries=[["a", "é" * 2049, 1]]),
    "entries negative stamp": changed(TREE_ENTRIES, entries=[["a", "v", -1]]),
    "entries stamp as bool": changed(TREE_ENTRIES, entries=[["a", "v", True]]),
    "entries value not a string": changed(TREE_ENTRIES, entries=[["a", 5, 1]]),
    "entries two fields": changed(TREE_ENTRIES, entries=[["a", "v"]]),
    "entries four fields": changed(TREE_ENTRIES, entries=[["a", "v", 1, 2]]),
    "entries as objects": changed(TREE_ENTRIES, entries=[{"path": "a", "value": "v", "stamp_ns": 1}]),
    "entries as object": changed(TREE_ENTRIES, entries={}),
    "entries null": changed(TREE_ENTRIES, entries=None),
    "entries negative req": changed(TREE_ENTRIES, req=-1),
    "fetch dotdot name": changed(FETCH_REQUEST, name=".."),
    "fetch name with slash": changed(FETCH_REQUEST, name="../log-1"),
    "fetch res with slash": changed(FETCH_REQUEST, res="a/b"),
    "fetch empty res": changed(FETCH_REQUEST, res=""),
    "fetch too much": changed(FETCH_REQUEST, max_bytes=MAX_DATA + 1),
    "fetch negative offset": changed(FETCH_REQUEST, offset=-1),
    "fetch float wait": changed(FETCH_REQUEST, wait_ms=1.5),
    "fetch req 0": changed(FETCH_REQUEST, req=0),
    "log data finished as int": changed(LOG_DATA, finished=1),
    "log data finished as string": changed(LOG_DATA, finished="true"),
    "log data past size": changed(LOG_DATA, size=2),
    "log data past size by offset": changed(LOG_DATA, offset=1),
    "log data with data field in meta": changed(LOG_DATA, data="abc"),
    "digest request chunk 0": changed(DIGEST_REQUEST, chunk=0),
    "digest request negative count": changed(DIGEST_REQUEST, count=-1),
    "digest reply not hex": changed(DIGEST_REPLY, digests=["xyz0"]),
    "digest reply upper case": changed(DIGEST_REPLY, digests=["ABCD"]),
    "digest reply odd length": changed(DIGEST_REPLY, digests=["abc"]),
    "digest reply empty": changed(DIGEST_REPLY, digests=[""]),
    "digest reply too long": changed(DIGEST_REPLY, digests=["00" * 65]),
    "digest reply int digest": changed(DIGEST_REPLY, digests=[1]),
    "digest reply digests as string": changed(DIGEST_REPLY, digests="00ff"),
    "read request too long": changed(READ_REQUEST, length=MAX_DATA + 1),
    "read reply req 0": changed(READ_REPLY, req=0),
    "error reply empty code": changed(ERROR_REPLY, code=""),
    "error reply code with space": changed(ERROR_REPLY, code="no way"),
    "error reply what not a string": changed(ERROR_REPLY, what=1),
    "error reply what too long": changed(ERROR_REPLY, what="w" * (16 * 1024 + 1)),
    "error reply missing remedy": changed(ERROR_REPLY, remedy=DROP),
    "bye reason null": changed(BYE, reason=None),
    "bye extra field": changed(BYE, why="x"),
    "bye missing reason": changed(BYE, reason=DROP),
}


def _raw_table() -> dict[str, bytes]:
    """Meta that is not acceptable JSON at all, as raw bytes."""
    return {
        "not UTF-8": frame(BYE, b'{"reason":"\xff"}'),
        "UTF-16": frame(BYE, '{"reason":"x"}'.encode("utf-16")),
        "UTF-8 BOM": frame(BYE, b'\xef\xbb\xbf{"reason":"x"}'),
        "empty meta": frame(BYE, b""),
        "not JSON": frame(BYE, b"reason=x"),
        "array": frame(BYE, b'["x"]'),
        "null": frame(BYE, b"null"),
        "string": frame(BYE, b'"x"'),
        "trailing data": frame(BYE, b'{"reason":"x"} {}'),
        "duplicate key": frame(BYE, b'{"reason":"x","reason":"y"}'),
        "NaN": frame(HELLO, b'{"host":"b","cluster":"c","proto":NaN,"lamport_ns":1}'),
        "Infinity": frame(HELLO, b'{"host":"b","cluster":"c","proto":1,"lamport_ns":Infinity}'),
        "exponent": frame(HELLO, b'{"host":"b","cluster":"c","proto":1,"lamport_ns":1e3}'),
        "a million digits": frame(HELLO, b'{"host":"b","cluster":"c","proto":1,"lamport_ns":' + b"9" * 10**6 + b"}"),
        "raw control character": frame(BYE, b'{"reason":"a\nb"}'),
        "escaped NUL": frame(BYE, b'{"reason":"a\\u0000b"}'),
        "deep nesting": frame(BYE, b'{"reason":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    }


BAD_FRAMES = {
    "body shorter than its header": struct.pack(">I", 4) + b"\x0b\x00\x00\x00",
    "empty body": struct.pack(">I", 0),
    "unknown type 0": frame(0, b"{}"),
    "unknown type 12": frame(12, b"{}"),
    "unknown type 255": frame(255, b"{}"),
    "meta overruns body": struct.pack(">IBI", 5 + 2, BYE, 20) + b"{}",
    "meta over 4 MiB": struct.pack(">IBI", 5 + MAX_META + 1, TREE_ENTRIES, MAX_META + 1),
    "data on a Bye": frame(BYE, {"reason": ""}, b"x"),
    "data on a FetchRequest": frame(FETCH_REQUEST, GOOD[FETCH_REQUEST], b"x"),
    "frame over the limit": struct.pack(">IBI", MAX_FRAME + 1, LOG_DATA, 10),
    "a 4 GiB frame": struct.pack(">IBI", 2**32 - 1, LOG_DATA, 10),
    "second Hello": frame(HELLO, GOOD[HELLO]),
}


ALL_BAD = {
    **{name: frame(t, meta, GOOD_DATA.get(t, b"")) for name, (t, meta) in BAD_FIELDS.items()},
    **_raw_table(),
    **BAD_FRAMES,
}


@pytest.mark.parametrize("name", list(ALL_BAD))
def test_invalid_frames_are_refused_on_receive(name):
    raw = ALL_BAD[name]
    if len(raw) > 4 and raw[4] == HELLO and name != "second Hello":  # a bad Hello is tested where Hellos belong
        conn = PeerConnection(OUR)
        conn.initial_bytes()
    else:
        conn = opened()
    conn.receive_data(raw)
    with pytest.raises(PeerProtocolError) as info:
        conn.next_event()
    assert info.value.reason
    if name != "second Hello":
        assert "second Hello" not in info.value.reason
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    conn.receive_data(encode(Bye("")))  # dropped: nothing after a bad frame is believed
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert conn.state == "error"


@pytest.mark.parametrize(
    "raw", [v for k, v in ALL_BAD.items() if k != "second Hello" and len(v) < MAX_FRAME],
    ids=[k for k, v in ALL_BAD.items() if k != "second Hello" and len(v) < MAX_FRAME],
)
def test_invalid_frames_are_refused_by_decode(raw):
    with pytest.raises(PeerProtocolError):
        decode(raw)


def test_oversized_frames_are_refused_before_their_body_is_buffered():
    for header in (struct.pack(">I", MAX_FRAME + 1), struct.pack(">IBI", 5 + MAX_META + 1, TREE_ENTRIES, MAX_META + 1),
                   struct.pack(">IBI", 5 + 10 + 60 * 2**20, HELLO, 10)):  # a 60 MiB "Hello"
        conn = PeerConnection(OUR)
        conn.receive_data(header)
        with pytest.raises(PeerProtocolError):
            conn.next_event()


def test_max_frame_is_the_receive_limit():
    msg = ReadReply(req=1, offset=0, data=b"x" * 1000)
    conn = PeerConnection(OUR, max_frame=1000)
    conn.initial_bytes()
    conn.receive_data(THEIR_HELLO_BYTES + encode(ReadReply(req=1, offset=0, data=b"x" * 900)))
    assert conn.next_event() == THEIRS
    assert conn.next_event().data == b"x" * 900
    conn.receive_data(encode(msg))
    with pytest.raises(PeerProtocolError, match="limit 1000"):
        conn.next_event()
    with pytest.raises(ValueError):
        PeerConnection(OUR, max_frame=8)
    with pytest.raises(ValueError):
        PeerConnection(OUR, max_frame=2**32)


# --- strict validation: what we may not construct ------------------------------------------

BAD_CONSTRUCTIONS = {
    "hello proto bool": lambda: Hello("a", "c", True, 1),
    "hello negative stamp": lambda: Hello("a", "c", 1, -1),
    "hello host with slash": lambda: Hello("a/b", "c", 1, 1),
    "hello host NUL": lambda: Hello("a\x00", "c", 1, 1),
    "hello host surrogate": lambda: Hello("\udc80", "c", 1, 1),
    "hello cluster dotdot": lambda: Hello("a", "..", 1, 1),
    "tree request req 0": lambda: TreeRequest(0, ()),
    "tree request list": lambda: TreeRequest(1, ["a"]),
    "tree request absolute prefix": lambda: TreeRequest(1, ("/a",)),
    "tree request dotdot prefix": lambda: TreeRequest(1, ("..",)),
    "tree entries list": lambda: TreeEntries(1, [Entry("a", "v", 1)]),
    "tree entries tuple item": lambda: TreeEntries(1, (("a", "v", 1),)),
    "tree entries dotdot": lambda: TreeEntries(1, (Entry("a/..", "v", 1),)),
    "tree entries absolute": lambda: TreeEntries(1, (Entry("/a", "v", 1),)),
    "tree entries NUL": lambda: TreeEntries(1, (Entry("a", "v\x00", 1),)),
    "tree entries long path": lambda: TreeEntries(1, (Entry("p" * 1025, "v", 1),)),
    "tree entries long value": lambda: TreeEntries(1, (Entry("a", "v" * 4097, 1),)),
    "tree entries float stamp": lambda: TreeEntries(1, (Entry("a", "v", 1.0),)),
    "tree entries huge stamp": lambda: TreeEntries(1, (Entry("a", "v", 2**64),)),
    "fetch name slash": lambda: FetchRequest(1, "r", "a/b", 0, 1, 0),
    "fetch too much": lambda: FetchRequest(1, "r", "log", 0, MAX_DATA + 1, 0),
    "fetch negative wait": lambda: FetchRequest(1, "r", "log", 0, 1, -1),
    "log data past size": lambda: LogData(1, "r", "log", 5, 7, False, b"abc"),
    "log data finished int": lambda: LogData(1, "r", "log", 0, 3, 1, b"abc"),
    "log data str": lambda: LogData(1, "r", "log", 0, 3, False, "abc"),
    "log data too big": lambda: LogData(1, "r", "log", 0, MAX_DATA + 1, False, bytes(MAX_DATA + 1)),
    "digest request chunk 0": lambda: DigestRequest(1, "r", 0, 0, 1),
    "digest reply upper hex": lambda: DigestReply(1, "r", 0, 1, ("AB",)),
    "digest reply bytes": lambda: DigestReply(1, "r", 0, 1, (b"ab",)),
    "read request too long": lambda: ReadRequest(1, "r", 0, MAX_DATA + 1),
    "read reply list": lambda: ReadReply(1, 0, [1, 2]),
    "dirty map request no resource": lambda: P.DirtyMapRequest(1, ""),
    "dirty map reply region 0": lambda: P.DirtyMapReply(1, "r", 0, 8, b"\x01"),
    "dirty map reply short map": lambda: P.DirtyMapReply(1, "r", 1, 64, b"\x01"),
    "error reply bad code": lambda: ErrorReply(1, "a b", "what"),
    "error reply NUL": lambda: ErrorReply(1, "x", "a\x00"),
    "bye None": lambda: Bye(None),
    "bye too long": lambda: Bye("x" * (16 * 1024 + 1)),
}


@pytest.mark.parametrize("make", list(BAD_CONSTRUCTIONS.values()), ids=list(BAD_CONSTRUCTIONS))
def test_invalid_messages_cannot_be_constructed(make):
    with pytest.raises(ValueError):
        make()


def test_messages_are_frozen():
    msg = Bye("x")
    with pytest.raises(AttributeError):
        msg.reason = "y"


def test_entry_limits_count_bytes_not_characters():
    TreeEntries(1, (Entry("p" * 1024, "v" * 4096, 0),))
    TreeEntries(1, (Entry("é" * 512, "é" * 2048, 0),))
    with pytest.raises(ValueError):
        TreeEntries(1, (Entry("é" * 513, "v", 0),))


def test_too_big_tree_listing_is_refused_by_encode_and_batched_by_entry_batches():
    many = tuple(Entry(f"resource-r{i:05d}/{'d' * 200}", "v" * 4000, i) for i in range(1200))
    msg = TreeEntries(1, many)  # valid ...
    with pytest.raises(ValueError, match="split"):
        encode(msg)  # ... but more than 4 MiB of meta
    batches = list(P.entry_batches(many))
    assert len(batches) > 1
    assert tuple(e for b in batches for e in b) == many
    for b in batches:
        raw = encode(TreeEntries(1, b))
        assert struct.unpack_from(">I", raw, 5)[0] <= MAX_META
        assert decode(raw).entries == b
    assert list(P.entry_batches([])) == []


def test_encode_refuses_what_is_not_a_message():
    with pytest.raises(TypeError):
        encode(Entry("a", "v", 1))


# --- connection rules ----------------------------------------------------------------------


def test_handshake_states_and_peer_hello():
    conn = PeerConnection(OUR)
    assert (conn.state, conn.our_state, conn.their_state, conn.peer_hello) == ("handshake", "idle", "hello", None)
    assert decode(conn.initial_bytes()) == OUR
    assert conn.state == "handshake"
    assert conn.next_event() is NEED_DATA
    conn.receive_data(THEIR_HELLO_BYTES)
    assert conn.next_event() == THEIRS
    assert conn.peer_hello == THEIRS
    assert conn.state == "open"
    conn.receive_data(frame(BYE, {"reason": "done"}))
    assert conn.next_event() == Bye("done")
    assert conn.state == "closing"
    conn.send(Bye("me too"))
    assert conn.state == "closed"


def test_hellos_may_cross_and_requests_may_follow_our_hello_at_once():
    a, b = PeerConnection(OUR), PeerConnection(THEIRS)
    to_b = a.initial_bytes() + a.send(TreeRequest(1, ()))
    to_a = b.initial_bytes()
    a.receive_data(to_a)
    b.receive_data(to_b)
    assert drain(b) == [OUR, TreeRequest(1, ())]
    assert drain(a) == [THEIRS]


@pytest.mark.parametrize(
    "first", [encode(Bye("x")), encode(TreeRequest(1, ())), frame(LOG_DATA, GOOD[LOG_DATA], b"abc")])
def test_first_message_must_be_a_hello(first):
    conn = PeerConnection(OUR)
    conn.receive_data(first)
    with pytest.raises(PeerProtocolError, match="not a Hello"):
        conn.next_event()
    assert conn.peer_hello is None


def test_first_non_hello_is_refused_from_its_header_alone():
    conn = PeerConnection(OUR)
    conn.receive_data(struct.pack(">IBI", 5 + 10 + 2**20, LOG_DATA, 10))
    with pytest.raises(PeerProtocolError, match="not a Hello"):
        conn.next_event()


def test_protocol_version_must_match():
    conn = PeerConnection(OUR)
    conn.receive_data(encode(Hello("beta", "c0ffee", PROTO_VERSION + 1, 1)))
    with pytest.raises(PeerProtocolError, match=f"protocol version {PROTO_VERSION + 1}"):
        conn.next_event()


def test_second_hello_is_refused():
    conn = opened()
    conn.receive_data(THEIR_HELLO_BYTES)
    with pytest.raises(PeerProtocolError, match="second Hello"):
        conn.next_event()


def test_cluster_is_not_checked_here():
    """The link decides about the cluster (a joining node has none yet); the core only frames."""
    conn = PeerConnection(OUR)
    conn.receive_data(encode(Hello("beta", "", PROTO_VERSION, 1)))
    assert conn.next_event().cluster == ""


def test_eof_before_anything_is_a_clean_close():
    conn = PeerConnection(OUR)
    conn.receive_data(b"")
    assert conn.next_event() == Closed(truncated=False)
    assert conn.next_event() == Closed(truncated=False)
    assert conn.their_state == "closed"


@pytest.mark.parametrize("cut", [1, 3, 4, 8, 9, 12, -1])
def test_eof_mid_frame_is_a_truncated_close(cut):
    conn = opened()
    raw = encode(LogData(1, "r", "log", 0, 10, False, b"0123456789"))
    conn.receive_data(raw[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() == Closed(truncated=True)
    assert conn.next_event() == Closed(truncated=True)


def test_eof_mid_hello_is_a_truncated_close():
    conn = PeerConnection(OUR)
    conn.receive_data(THEIR_HELLO_BYTES[:-1])
    conn.receive_data(b"")
    assert conn.next_event() == Closed(truncated=True)


def test_eof_between_frames_delivers_everything_then_a_clean_close():
    conn = opened()
    conn.receive_data(encode(TreeRequest(1, ())) + encode(TreeRequest(2, ())))
    conn.receive_data(b"")
    assert drain(conn) == [TreeRequest(1, ()), TreeRequest(2, ()), Closed(truncated=False)]


def test_after_bye_everything_is_closed():
    conn = opened()
    conn.receive_data(encode(Bye("done")) + encode(TreeRequest(1, ())) + b"garbage")
    assert conn.next_event() == Bye("done")
    assert conn.next_event() == Closed(truncated=False)
    conn.receive_data(b"\xff" * 100)  # dropped, not parsed
    assert conn.next_event() == Closed(truncated=False)
    conn.receive_data(b"")
    assert conn.next_event() == Closed(truncated=False)


def test_receive_after_eof_is_a_local_error():
    conn = opened()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


def test_send_rules():
    conn = PeerConnection(OUR)
    with pytest.raises(LocalProtocolError, match="before initial_bytes"):
        conn.send(TreeRequest(1, ()))
    with pytest.raises(LocalProtocolError):
        conn.send_buffers(TreeRequest(1, ()))
    conn.initial_bytes()
    with pytest.raises(LocalProtocolError):
        conn.initial_bytes()
    with pytest.raises(LocalProtocolError, match="Hello"):
        conn.send(OUR)
    with pytest.raises(TypeError):
        conn.send("not a message")
    conn.send(TreeRequest(1, ()))
    conn.send(Bye("done"))
    with pytest.raises(LocalProtocolError, match="after our Bye"):
        conn.send(TreeRequest(2, ()))
    with pytest.raises(LocalProtocolError):
        conn.send(Bye("again"))
    assert issubclass(LocalProtocolError, RuntimeError)
    assert not issubclass(LocalProtocolError, PeerProtocolError)


def test_sending_stays_possible_after_the_peer_failed():
    """So a node can still explain itself (ErrorReply, Bye) before hanging up."""
    conn = opened()
    conn.receive_data(b"\xff" * 16)
    with pytest.raises(PeerProtocolError):
        conn.next_event()
    assert decode(conn.send(ErrorReply(0, "protocol", "bad frame"))) == ErrorReply(0, "protocol", "bad frame")
    conn.send(Bye("protocol error"))


def test_connection_needs_a_hello():
    with pytest.raises(TypeError):
        PeerConnection(Bye("x"))


# --- efficiency ----------------------------------------------------------------------------


def test_16_mib_log_data_in_64_kib_chunks_decodes_fast():
    payload = bytes(range(256)) * (16 * 2**20 // 256)
    msg = LogData(req=9, res="r", name="log-000000042-a", offset=2**30, size=2**30 + len(payload) + 1,
                  finished=False, data=payload)
    sender = PeerConnection(THEIRS)
    sender.initial_bytes()
    wire = b"".join(sender.send_buffers(msg))
    chunks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    conn = opened()
    events = []
    start = time.perf_counter()
    for chunk in chunks:
        conn.receive_data(chunk)
        ev = conn.next_event()  # as a real read loop does: one call per read
        if ev is not NEED_DATA:
            events.append(ev)
    elapsed = time.perf_counter() - start
    print(f"\n16 MiB LogData in {len(chunks)} chunks of 64 KiB decoded in {elapsed * 1000:.1f} ms")
    assert events == [msg]
    assert elapsed < 2.0


def test_trickled_bytes_are_not_buffered_quadratically():
    """Many small reads (a slow link) must stay linear: 1 MiB in 100-byte reads."""
    msg = ReadReply(req=1, offset=0, data=b"z" * 2**20)
    wire = encode(msg)
    conn = opened()
    start = time.perf_counter()
    got = []
    for i in range(0, len(wire), 100):
        conn.receive_data(wire[i : i + 100])
        ev = conn.next_event()
        if ev is not NEED_DATA:
            got.append(ev)
    elapsed = time.perf_counter() - start
    assert got == [msg]
    assert elapsed < 2.0


def test_dirty_map_messages_round_trip():
    """The map travels as data, bit for bit: a resync copies exactly the regions it names."""
    req = P.DirtyMapRequest(req=3, res="r")
    reply = P.DirtyMapReply(req=3, res="r", region=65536, size=65536 * 20, data=b"\x05\x00\x08")
    assert decode(encode(req)) == req
    assert decode(encode(reply)) == reply
