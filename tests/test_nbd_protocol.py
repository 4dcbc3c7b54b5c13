"""Tests for the sans-I/O NBD server core (mars.engine.nbd.protocol).

The client side is a few struct.pack lines written from the spec here, independently of the
module's own Struct objects, so a wrong constant in the module shows up as a failing test rather
than as two wrongs agreeing.
"""

from __future__ import annotations

import struct
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import events_until

from mars.engine import sansio
from mars.engine.nbd import protocol as nbd
from mars.engine.nbd.protocol import (
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    NEED_DATA,
    BadRequest,
    Cmd,
    ConnectionClosed,
    Disconnect,
    ExportInfo,
    NbdProtocolError,
    NbdServerConnection,
    Negotiated,
    Request,
)

# --- a tiny client encoder/decoder, straight from doc/proto.md ---------------------------------

IHAVEOPT = b"IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQ_MAGIC = 0x25609513

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = ERR | 1, ERR | 3, ERR | 6
INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE = 0, 1, 2, 3

TFLAGS_RW = 1 | 4 | 8 | 32 | 64 | 256  # HAS_FLAGS SEND_FLUSH SEND_FUA SEND_TRIM SEND_WRITE_ZEROES CAN_MULTI_CONN
TFLAGS_RO = TFLAGS_RW | 2

EPERM, EINVAL, ENOSPC = 1, 22, 28


def client_flags(flags: int = 3) -> bytes:
    return struct.pack(">I", flags)


def option(opt: int, data: bytes = b"") -> bytes:
    return IHAVEOPT + struct.pack(">II", opt, len(data)) + data


def info_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def go(name: str = "disk", infos: tuple[int, ...] = ()) -> bytes:
    return option(OPT_GO, info_data(name, infos))


def request(cmd: int, handle: int = 0, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, cmd, handle, offset, length) + data


def write(handle: int, offset: int, data: bytes, flags: int = 0) -> bytes:
    return request(Cmd.WRITE, handle, offset, len(data), flags, data)


def parse_option_replies(raw: bytes) -> list[tuple[int, int, bytes]]:
    replies, pos = [], 0
    while pos < len(raw):
        magic, opt, rtype, length = struct.unpack_from(">QIII", raw, pos)
        assert magic == OPT_REPLY_MAGIC
        pos += 20
        replies.append((opt, rtype, raw[pos : pos + length]))
        pos += length
    assert pos == len(raw)
    return replies


# --- fixtures ----------------------------------------------------------------------------------

DISK = ExportInfo("disk", 1 << 20, description="the main disk")
RO = ExportInfo("ro", 64 * 1024, read_only=True, description="read only")
EXPORTS = {e.name: e for e in (DISK, RO)}
MAX_PAYLOAD = 64 * 1024


def make_conn(exports: dict[str, ExportInfo] | None = None, **kw) -> NbdServerConnection:
    table = EXPORTS if exports is None else exports
    kw.setdefault("max_payload", MAX_PAYLOAD)
    return NbdServerConnection(table.get, lambda: list(table), **kw)


TERMINAL = (Disconnect, ConnectionClosed)


def drain(conn: NbdServerConnection) -> list:
    """Events until NEED_DATA or the first terminal event."""
    return events_until(conn, TERMINAL)


def feed(conn: NbdServerConnection, data: bytes) -> list:
    conn.receive_data(data)
    return drain(conn)


def negotiated(export: str = "disk", **kw) -> NbdServerConnection:
    conn = make_conn(**kw)
    events = feed(conn, client_flags() + go(export))
    assert isinstance(events[-1], Negotiated)
    conn.data_to_send()
    return conn


# --- handshake ---------------------------------------------------------------------------------


def test_greeting_bytes():
    conn = make_conn()
    assert conn.initial_bytes() == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    assert conn.state == "greeting"
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""


def test_go_known_export():
    conn = make_conn()
    assert feed(conn, client_flags()) == []
    assert conn.state == "options"
    assert feed(conn, go("disk")) == [Negotiated(DISK)]
    assert conn.state == "transmission"
    assert conn.export == DISK
    replies = parse_option_replies(conn.data_to_send())
    assert replies == [
        (OPT_GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, DISK.size, TFLAGS_RW)),
        (OPT_GO, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_PAYLOAD)),
        (OPT_GO, REP_ACK, b""),
    ]
    assert conn.data_to_send() == b""


def test_go_with_name_and_description_requested():
    conn = make_conn()
    assert feed(conn, client_flags() + go("ro", (INFO_DESCRIPTION, INFO_NAME, 999))) == [Negotiated(RO)]
    replies = parse_option_replies(conn.data_to_send())
    assert replies == [
        (OPT_GO, REP_INFO, struct.pack(">HQH", INFO_EXPORT, RO.size, TFLAGS_RO)),
        (OPT_GO, REP_INFO, struct.pack(">H", INFO_NAME) + b"ro"),
        (OPT_GO, REP_INFO, struct.pack(">H", INFO_DESCRIPTION) + b"read only"),
        (OPT_GO, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, MAX_PAYLOAD)),
        (OPT_GO, REP_ACK, b""),
    ]


def test_go_unknown_export_then_known():
    conn = make_conn()
    assert feed(conn, client_flags() + go("nope")) == []
    assert conn.state == "options"
    [(opt, rtype, msg)] = parse_option_replies(conn.data_to_send())
    assert (opt, rtype) == (OPT_GO, REP_ERR_UNKNOWN)
    assert b"nope" in msg
    assert feed(conn, go("disk")) == [Negotiated(DISK)]


def test_default_export_unknown_unless_lookup_knows_it():
    conn = make_conn()
    assert feed(conn, client_flags() + go("")) == []
    [(_, rtype, msg)] = parse_option_replies(conn.data_to_send())
    assert rtype == REP_ERR_UNKNOWN and msg

    default = ExportInfo("disk", 4096)
    conn = make_conn({"": default})
    assert feed(conn, client_flags() + go("")) == [Negotiated(default)]


def test_info_then_go():
    conn = make_conn()
    assert feed(conn, client_flags() + option(OPT_INFO, info_data("disk"))) == []
    assert conn.state == "options"
    info_replies = parse_option_replies(conn.data_to_send())
    assert [r[1] for r in info_replies] == [REP_INFO, REP_INFO, REP_ACK]
    assert all(r[0] == OPT_INFO for r in info_replies)
    assert info_replies[0][2] == struct.pack(">HQH", INFO_EXPORT, DISK.size, TFLAGS_RW)
    assert feed(conn, go("disk")) == [Negotiated(DISK)]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        struct.pack(">I", 10) + b"disk",  # name length beyond the data
        struct.pack(">I", 4) + b"disk" + b"\x00",  # no room for the count
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 2) + b"\x00\x01",  # count too big
        struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0) + b"xx",  # trailing bytes
        struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),  # not UTF-8
    ],
)
@pytest.mark.parametrize("opt", [OPT_INFO, OPT_GO])
def test_info_go_malformed_is_err_invalid(opt, data):
    conn = make_conn()
    assert feed(conn, client_flags() + option(opt, data)) == []
    [(o, rtype, _)] = parse_option_replies(conn.data_to_send())
    assert (o, rtype) == (opt, REP_ERR_INVALID)
    assert feed(conn, go()) == [Negotiated(DISK)]


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes):
    conn = make_conn()
    events = feed(conn, client_flags(3 if no_zeroes else 1) + option(OPT_EXPORT_NAME, b"ro"))
    assert events == [Negotiated(RO)]
    out = conn.data_to_send()
    expected = struct.pack(">QH", RO.size, TFLAGS_RO)
    assert out == (expected if no_zeroes else expected + bytes(124))
    assert conn.state == "transmission"


def test_export_name_unknown_closes():
    conn = make_conn()
    conn.receive_data(client_flags() + option(OPT_EXPORT_NAME, b"nope"))
    with pytest.raises(NbdProtocolError) as info:
        conn.next_event()
    assert "nope" in info.value.reason
    assert conn.state == "error"
    with pytest.raises(NbdProtocolError):  # sticky: a poisoned stream is never served
        conn.next_event()


def test_list():
    conn = make_conn()
    assert feed(conn, client_flags() + option(OPT_LIST)) == []
    replies = parse_option_replies(conn.data_to_send())
    assert replies == [
        (OPT_LIST, REP_SERVER, struct.pack(">I", 4) + b"disk"),
        (OPT_LIST, REP_SERVER, struct.pack(">I", 2) + b"ro"),
        (OPT_LIST, REP_ACK, b""),
    ]
    assert feed(conn, option(OPT_LIST, b"x")) == []
    [(opt, rtype, _)] = parse_option_replies(conn.data_to_send())
    assert (opt, rtype) == (OPT_LIST, REP_ERR_INVALID)


def test_abort():
    conn = make_conn()
    assert feed(conn, client_flags() + option(OPT_ABORT) + b"ignored") == [Disconnect()]
    assert parse_option_replies(conn.data_to_send()) == [(OPT_ABORT, REP_ACK, b"")]
    assert conn.state == "closed"
    conn.receive_data(b"more ignored bytes")
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("opt", [OPT_STARTTLS, 4, 11, 0, 0xFFFFFFFF])
def test_unsupported_option_then_go(opt):
    conn = make_conn()
    assert feed(conn, client_flags() + option(opt, b"some option data") + go()) == [Negotiated(DISK)]
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0][:2] == (opt, REP_ERR_UNSUP)
    assert replies[-1] == (OPT_GO, REP_ACK, b"")


@pytest.mark.parametrize("flags", [4, 0x80000000, 0xFFFFFFFF])
def test_bad_client_flags(flags):
    conn = make_conn()
    conn.receive_data(client_flags(flags))
    with pytest.raises(NbdProtocolError):
        conn.next_event()


def test_client_without_fixed_newstyle_is_accepted():
    conn = make_conn()
    assert feed(conn, client_flags(0) + option(OPT_EXPORT_NAME, b"disk")) == [Negotiated(DISK)]


def test_bad_option_magic():
    conn = make_conn()
    conn.receive_data(client_flags() + b"IHAVEOPX" + struct.pack(">II", OPT_GO, 0))
    with pytest.raises(NbdProtocolError) as info:
        conn.next_event()
    assert "at byte 4" in info.value.reason


def test_option_too_long_rejected_before_its_data_arrives():
    conn = make_conn(max_option_len=100)
    conn.receive_data(client_flags() + IHAVEOPT + struct.pack(">II", OPT_GO, 101))
    with pytest.raises(NbdProtocolError):
        conn.next_event()


def test_pipelined_requests_after_go():
    conn = make_conn()
    events = feed(conn, client_flags() + go() + request(Cmd.READ, 7, 0, 512))
    assert events == [Negotiated(DISK), Request(Cmd.READ, 7, 0, 512, 0, None)]


# --- transmission ------------------------------------------------------------------------------


def test_each_command():
    conn = negotiated()
    payload = bytes(range(256)) * 16
    stream = (
        request(Cmd.READ, 1, 4096, 4096)
        + request(Cmd.READ, 2, 0, 512, CMD_FLAG_FUA)
        + write(3, 8192, payload)
        + write(4, 0, b"abc", CMD_FLAG_FUA)
        + request(Cmd.FLUSH, 5)
        + request(Cmd.FLUSH, 6, flags=CMD_FLAG_FUA)
        + request(Cmd.TRIM, 7, 0, 65536)
        + request(Cmd.TRIM, 8, 0, 65536, CMD_FLAG_FUA)
        + request(Cmd.WRITE_ZEROES, 9, 4096, 4096)
        + request(Cmd.WRITE_ZEROES, 10, 4096, 4096, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA)
        + request(Cmd.DISC, 11)
        + request(Cmd.READ, 12, 0, 1)  # after DISC: never served
    )
    assert feed(conn, stream) == [
        Request(Cmd.READ, 1, 4096, 4096, 0, None),
        Request(Cmd.READ, 2, 0, 512, CMD_FLAG_FUA, None),
        Request(Cmd.WRITE, 3, 8192, 4096, 0, payload),
        Request(Cmd.WRITE, 4, 0, 3, CMD_FLAG_FUA, b"abc"),
        Request(Cmd.FLUSH, 5, 0, 0, 0, None),
        Request(Cmd.FLUSH, 6, 0, 0, CMD_FLAG_FUA, None),
        Request(Cmd.TRIM, 7, 0, 65536, 0, None),
        Request(Cmd.TRIM, 8, 0, 65536, CMD_FLAG_FUA, None),
        Request(Cmd.WRITE_ZEROES, 9, 4096, 4096, 0, None),
        Request(Cmd.WRITE_ZEROES, 10, 4096, 4096, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, None),
        Disconnect(),
    ]
    assert conn.state == "closed"
    assert conn.data_to_send() == b""
    assert conn.next_event() == ConnectionClosed()


def test_request_event_types():
    conn = negotiated()
    [ev] = feed(conn, write(0xFFFFFFFFFFFFFFFF, 0, b"x"))
    assert type(ev.cmd) is Cmd and type(ev.data) is bytes
    assert ev.handle == 0xFFFFFFFFFFFFFFFF


def test_zero_length_read_and_write():
    conn = negotiated()
    assert feed(conn, request(Cmd.READ, 1, 100, 0) + write(2, DISK.size, b"")) == [
        Request(Cmd.READ, 1, 100, 0, 0, None),
        Request(Cmd.WRITE, 2, DISK.size, 0, 0, b""),
    ]


@pytest.mark.parametrize(
    "cmd, errno",
    [(Cmd.READ, EINVAL), (Cmd.WRITE, ENOSPC), (Cmd.TRIM, EINVAL), (Cmd.WRITE_ZEROES, ENOSPC)],
)
def test_out_of_range(cmd, errno):
    conn = negotiated()
    size = DISK.size

    def req(handle, offset, length):
        if cmd == Cmd.WRITE:
            return write(handle, offset, b"z" * length)
        return request(cmd, handle, offset, length)

    events = feed(conn, req(1, size - 512, 512) + req(2, size - 511, 512) + req(3, size + 4096, 1) + req(4, 0, 8))
    assert events[0] == Request(cmd, 1, size - 512, 512, 0, b"z" * 512 if cmd == Cmd.WRITE else None)
    assert [(e.handle, e.error) for e in events[1:3]] == [(2, errno), (3, errno)]
    assert all(isinstance(e, BadRequest) and e.reason for e in events[1:3])
    assert isinstance(events[3], Request)  # a bad WRITE's payload was consumed: framing intact


def test_huge_offset_does_not_wrap():
    conn = negotiated()
    [ev] = feed(conn, request(Cmd.READ, 1, 0xFFFFFFFFFFFFFFFF, 1))
    assert ev == BadRequest(1, EINVAL, ev.reason)


@pytest.mark.parametrize("cmd", [Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES])
def test_read_only_eperm(cmd):
    conn = negotiated("ro")
    data = b"q" * 16 if cmd == Cmd.WRITE else b""
    events = feed(conn, request(cmd, 1, 0, 16, 0, data) + request(Cmd.READ, 2, 0, 16) + request(Cmd.FLUSH, 3))
    assert isinstance(events[0], BadRequest) and (events[0].handle, events[0].error) == (1, EPERM)
    assert events[1:] == [Request(Cmd.READ, 2, 0, 16, 0, None), Request(Cmd.FLUSH, 3, 0, 0, 0, None)]


def test_oversized_write_is_protocol_error():
    conn = negotiated()
    conn.receive_data(request(Cmd.WRITE, 1, 0, MAX_PAYLOAD + 1))  # no payload needed to decide
    with pytest.raises(NbdProtocolError):
        conn.next_event()
    assert conn.state == "error"


def test_max_sized_write_and_oversized_read():
    conn = negotiated()
    payload = b"m" * MAX_PAYLOAD
    events = feed(conn, write(1, 0, payload) + request(Cmd.READ, 2, 0, MAX_PAYLOAD + 1) + request(Cmd.READ, 3, 0, MAX_PAYLOAD))
    assert events[0] == Request(Cmd.WRITE, 1, 0, MAX_PAYLOAD, 0, payload)
    assert isinstance(events[1], BadRequest) and (events[1].handle, events[1].error) == (2, EINVAL)
    assert events[2] == Request(Cmd.READ, 3, 0, MAX_PAYLOAD, 0, None)


@pytest.mark.parametrize("cmd", [Cmd.CACHE, Cmd.BLOCK_STATUS, 8, 99, 0xFFFF])
def test_unknown_or_unsupported_command(cmd):
    conn = negotiated()
    events = feed(conn, request(cmd, 42, 0, 4096) + request(Cmd.FLUSH, 43))
    assert isinstance(events[0], BadRequest) and (events[0].handle, events[0].error) == (42, EINVAL)
    assert events[1] == Request(Cmd.FLUSH, 43, 0, 0, 0, None)


@pytest.mark.parametrize(
    "raw",
    [
        request(Cmd.READ, 1, 0, 512, CMD_FLAG_NO_HOLE),
        request(Cmd.READ, 1, 0, 512, 4),  # DF needs structured replies
        write(1, 0, b"abcd", CMD_FLAG_NO_HOLE),
        request(Cmd.TRIM, 1, 0, 512, CMD_FLAG_NO_HOLE),
        request(Cmd.WRITE_ZEROES, 1, 0, 512, 16),  # FAST_ZERO never advertised
        request(Cmd.FLUSH, 1, flags=2),
        request(Cmd.FLUSH, 1, 4096, 0),
        request(Cmd.FLUSH, 1, 0, 1),
    ],
)
def test_bad_flags_or_arguments_are_einval(raw):
    conn = negotiated()
    events = feed(conn, raw + request(Cmd.READ, 2, 0, 1))
    assert isinstance(events[0], BadRequest) and (events[0].handle, events[0].error) == (1, EINVAL)
    assert events[1] == Request(Cmd.READ, 2, 0, 1, 0, None)


def test_bad_request_magic():
    conn = negotiated()
    conn.receive_data(request(Cmd.FLUSH, 1) + struct.pack(">I", 0x12345678) + bytes(24))
    assert conn.next_event() == Request(Cmd.FLUSH, 1, 0, 0, 0, None)
    with pytest.raises(NbdProtocolError) as info:
        conn.next_event()
    assert "0x12345678" in info.value.reason
    start = 4 + len(go())
    assert f"at byte {start + 28}" in info.value.reason


def test_reply_header():
    conn = negotiated()
    assert conn.reply_header(0x0102030405060708) == bytes.fromhex("67446698 00000000 0102030405060708")
    assert conn.reply_header(5, ENOSPC) == struct.pack(">IIQ", 0x67446698, ENOSPC, 5)


@pytest.mark.parametrize("cut", [1, 27, 28, 29, 28 + 4095])
def test_eof_mid_request(cut):
    conn = negotiated()
    raw = write(1, 0, b"w" * 4096)
    assert feed(conn, raw[:cut]) == []
    assert feed(conn, b"") == [ConnectionClosed()]
    assert conn.state == "closed"
    assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("prefix", [b"", b"\x00\x00", client_flags(), client_flags() + go()[:10]])
def test_eof_during_handshake(prefix):
    conn = make_conn()
    conn.receive_data(prefix)
    conn.receive_data(b"")
    assert drain(conn) == [ConnectionClosed()]


def test_complete_requests_before_eof_are_delivered():
    conn = negotiated()
    conn.receive_data(request(Cmd.FLUSH, 1) + request(Cmd.READ, 2, 0, 1)[:5])
    conn.receive_data(b"")
    assert drain(conn) == [Request(Cmd.FLUSH, 1, 0, 0, 0, None), ConnectionClosed()]


def test_data_after_eof_is_a_caller_bug():
    conn = make_conn()
    conn.receive_data(b"")
    with pytest.raises(RuntimeError):
        conn.receive_data(b"x")


def test_mutable_input_buffers_are_not_aliased():
    conn = negotiated()
    raw = bytearray(write(1, 0, b"A" * 8192))
    conn.receive_data(raw)
    small = bytearray(write(2, 0, b"B" * 10))
    conn.receive_data(memoryview(small))
    raw[:] = b"\x00" * len(raw)
    small[:] = b"\x00" * len(small)
    assert drain(conn) == [
        Request(Cmd.WRITE, 1, 0, 8192, 0, b"A" * 8192),
        Request(Cmd.WRITE, 2, 0, 10, 0, b"B" * 10),
    ]


def test_large_write_in_tiny_chunks():
    conn = negotiated()
    payload = bytes(i % 251 for i in range(MAX_PAYLOAD))
    raw = write(9, 4096, payload) + request(Cmd.FLUSH, 10)
    events = []
    for i in range(0, len(raw), 7):
        events += feed(conn, raw[i : i + 7])
    assert events == [Request(Cmd.WRITE, 9, 4096, MAX_PAYLOAD, 0, payload), Request(Cmd.FLUSH, 10, 0, 0, 0, None)]


def test_constructor_validates_limits():
    with pytest.raises(ValueError):
        make_conn(max_payload=0)
    with pytest.raises(ValueError):
        make_conn(max_payload=1 << 32)
    with pytest.raises(ValueError):
        make_conn(max_option_len=-1)


def test_small_max_payload_keeps_block_size_consistent():
    conn = make_conn(max_payload=1000)
    feed(conn, client_flags() + go())
    replies = parse_option_replies(conn.data_to_send())
    _, minimum, preferred, maximum = struct.unpack(">HIII", replies[1][2])
    assert (minimum, preferred, maximum) == (1, 512, 1000)


# --- property tests ----------------------------------------------------------------------------

handles = st.integers(0, 2**64 - 1)
small_payloads = st.binary(max_size=600)


@st.composite
def valid_requests(draw, size: int = DISK.size):
    """(wire bytes, expected event) for a request that must be accepted."""
    cmd = draw(st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES]))
    handle = draw(handles)
    if cmd == Cmd.FLUSH:
        flags = draw(st.sampled_from([0, CMD_FLAG_FUA]))
        return request(cmd, handle, 0, 0, flags), Request(cmd, handle, 0, 0, flags, None)
    if cmd == Cmd.WRITE:
        data = draw(small_payloads)
        offset = draw(st.integers(0, size - len(data)))
        flags = draw(st.sampled_from([0, CMD_FLAG_FUA]))
        return write(handle, offset, data, flags), Request(cmd, handle, offset, len(data), flags, data)
    length = draw(st.integers(0, MAX_PAYLOAD if cmd == Cmd.READ else size))
    offset = draw(st.integers(0, size - length))
    allowed = [0, CMD_FLAG_FUA] + ([CMD_FLAG_NO_HOLE, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE] if cmd == Cmd.WRITE_ZEROES else [])
    flags = draw(st.sampled_from(allowed))
    return request(cmd, handle, offset, length, flags), Request(cmd, handle, offset, length, flags, None)


@st.composite
def any_requests(draw):
    """Well-framed requests, valid or not (not oversized WRITEs, which end the session)."""
    cmd = draw(st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF)))
    if cmd == Cmd.DISC:
        cmd = Cmd.FLUSH
    flags = draw(st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 3]))
    offset = draw(st.integers(0, 2**64 - 1) | st.integers(0, DISK.size))
    if cmd == Cmd.WRITE:
        data = draw(small_payloads)
        return request(cmd, draw(handles), offset, len(data), flags, data)
    return request(cmd, draw(handles), offset, draw(st.integers(0, 2**32 - 1)), flags)


@st.composite
def options_before_go(draw):
    opts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["list", "info", "unknown", "unsup", "bad_go", "structured"]))
        if kind == "structured":  # structured replies and a meta context: BLOCK_STATUS is then served
            opts.append(option(OPT_STRUCTURED_REPLY) + set_meta(draw(st.sampled_from(["disk", "ro"]))))
        elif kind == "list":
            opts.append(option(OPT_LIST))
        elif kind == "info":
            opts.append(option(OPT_INFO, info_data(draw(st.sampled_from(["disk", "ro", "x"])), (INFO_NAME,))))
        elif kind == "unknown":
            opts.append(go(draw(st.text(max_size=5).filter(lambda s: s not in EXPORTS))))
        elif kind == "unsup":
            opts.append(option(draw(st.sampled_from([5, 8, 9, 10, 11, 200])), draw(st.binary(max_size=40))))
        else:
            opts.append(option(OPT_GO, draw(st.binary(max_size=12))))
    return b"".join(opts)


@st.composite
def valid_sessions(draw):
    flags = draw(st.sampled_from([1, 3]))
    head = client_flags(flags) + draw(options_before_go())
    if draw(st.booleans()):
        head += go("disk", draw(st.lists(st.sampled_from([1, 2, 3]), max_size=3).map(tuple)))
    else:
        head += option(OPT_EXPORT_NAME, b"disk")
    body = b"".join(r for r, _ in draw(st.lists(valid_requests(), max_size=8)))
    body += b"".join(draw(st.lists(any_requests(), max_size=4)))
    tail = draw(st.sampled_from([b"", request(Cmd.DISC, 1), request(Cmd.READ, 1, 0, 8)[:13]]))
    return head + body + tail


def run_chunks(chunks: list[bytes]) -> tuple[list, bytes]:
    """Feed chunks then EOF; collect events until the first terminal one, and all output."""
    conn = make_conn()
    events, out = [], []
    for chunk in chunks + [b""]:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            out.append(conn.data_to_send())
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, TERMINAL):
                return events, b"".join(out)
    raise AssertionError("EOF must end every session")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(session=valid_sessions(), data=st.data())
def test_chunking_does_not_change_events(session, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(session)), max_size=30)))
    bounds = [0, *cuts, len(session)]
    chunks = [session[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    whole_events, whole_out = run_chunks([session])
    split_events, split_out = run_chunks(chunks)
    assert split_events == whole_events
    assert split_out == whole_out
    # Small reads are normally merged into one buffer; without merging, every cut becomes a
    # chunk boundary that headers and payloads straddle.
    with mock.patch.object(sansio, "_COALESCE_BELOW", 1):
        assert run_chunks(chunks) == (whole_events, whole_out)
    bytewise_events, _ = run_chunks([session[i : i + 1] for i in range(len(session))])
    assert bytewise_events == whole_events


EVENT_TYPES = (Negotiated, Request, BadRequest, Disconnect, ConnectionClosed)


def garbage_only_raises_protocol_errors(prefix: bytes, pieces: list[bytes], max_payload: int = MAX_PAYLOAD) -> None:
    conn = make_conn(max_payload=max_payload, max_option_len=2048)
    try:
        for chunk in [prefix, *pieces, b""]:
            conn.receive_data(chunk)
            while True:
                ev = conn.next_event()
                conn.data_to_send()
                if ev is NEED_DATA:
                    break
                assert isinstance(ev, EVENT_TYPES)
                if isinstance(ev, TERMINAL):
                    return
    except NbdProtocolError as exc:
        assert exc.reason
        with pytest.raises(NbdProtocolError):
            conn.next_event()


option_like = st.builds(
    lambda opt, data: option(opt, data),
    st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11]) | st.integers(0, 2**32 - 1),
    st.binary(max_size=64) | st.builds(info_data, st.text(max_size=6), st.lists(st.integers(0, 5), max_size=3).map(tuple)),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(
        st.one_of(st.binary(max_size=64), option_like, st.just(option(OPT_LIST)), st.just(go())),
        max_size=12,
    ),
    flags=st.sampled_from([b"", client_flags(), client_flags(1)]),
)
def test_garbage_in_handshake_only_raises_protocol_errors(flags, pieces):
    garbage_only_raises_protocol_errors(flags, pieces)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    pieces=st.lists(st.one_of(st.binary(max_size=64), any_requests(), valid_requests().map(lambda t: t[0])), max_size=12),
    export=st.sampled_from(["disk", "ro"]),
    max_payload=st.sampled_from([MAX_PAYLOAD, 512]),
)
def test_garbage_in_transmission_only_raises_protocol_errors(pieces, export, max_payload):
    garbage_only_raises_protocol_errors(client_flags() + go(export), pieces, max_payload)


@settings(max_examples=200)
@given(reqs=st.lists(valid_requests(), max_size=40))
def test_request_round_trip(reqs):
    conn = negotiated()
    conn.receive_data(b"".join(raw for raw, _ in reqs))  # b"" when empty: EOF is tested elsewhere
    if not reqs:
        assert drain(conn) == [ConnectionClosed()]
        return
    assert drain(conn) == [ev for _, ev in reqs]
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b""


def test_module_exports_errno_values():
    assert (nbd.EPERM, nbd.EIO, nbd.ENOMEM, nbd.EINVAL, nbd.ENOSPC, nbd.EOVERFLOW, nbd.ENOTSUP, nbd.ESHUTDOWN) == (
        1, 5, 12, 22, 28, 75, 95, 108,
    )


def test_fast_request_constructor_matches_dataclass():
    fast = nbd._new_request(Cmd.WRITE, 1, 2, 3, CMD_FLAG_FUA, b"abc")
    slow = Request(Cmd.WRITE, 1, 2, 3, CMD_FLAG_FUA, b"abc")
    assert type(fast) is Request
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    with pytest.raises(AttributeError):  # still frozen
        fast.offset = 5  # type: ignore[misc]


@pytest.mark.parametrize("cut", [*range(0, 29), 28 + 2000, 28 + 4999])
def test_requests_straddling_large_chunks(cut):
    # Chunks of 4 KiB and more are kept as they arrive, so headers and payloads can straddle
    # chunk boundaries: every split point inside the second request must decode identically.
    conn = negotiated()
    p1, p2, p3 = (bytes([i]) * 5000 for i in (1, 2, 3))
    first = write(1, 0, p1)
    stream = first + write(2, 8192, p2) + request(Cmd.READ, 3, 0, 10) + write(4, 0, p3)
    split = len(first) + cut
    events = []
    for piece in (stream[:split], stream[split : split + 6000], stream[split + 6000 :]):
        if piece:  # b"" would mean EOF
            events += feed(conn, piece)
    assert events == [
        Request(Cmd.WRITE, 1, 0, 5000, 0, p1),
        Request(Cmd.WRITE, 2, 8192, 5000, 0, p2),
        Request(Cmd.READ, 3, 0, 10, 0, None),
        Request(Cmd.WRITE, 4, 0, 5000, 0, p3),
    ]


def test_long_strings_are_cut_to_the_spec_limit():
    export = ExportInfo("disk", 4096, description="é" * 3000)  # 6000 bytes of UTF-8
    conn = make_conn({"disk": export})
    feed(conn, client_flags() + go("disk", (INFO_DESCRIPTION,)))
    [desc] = [r[2] for r in parse_option_replies(conn.data_to_send()) if r[2][:2] == b"\x00\x02"]
    assert len(desc) - 2 == 4096
    assert desc[2:].decode() == "é" * 2048


def test_export_name_not_utf8_closes():
    conn = make_conn()
    conn.receive_data(client_flags() + option(OPT_EXPORT_NAME, b"\xff"))
    with pytest.raises(NbdProtocolError):
        conn.next_event()


# --- NBD_OPT_STARTTLS --------------------------------------------------------------------------

REP_ERR_TLS_REQD = ERR | 5
#: A name no refusal may give away: a plain client of a TLS-only server must not learn it.
SECRET = ExportInfo("secret-disk", 3 << 20, description="nobody may learn this")
SECRETS = {SECRET.name: SECRET}


def tls_conn(mode: str) -> NbdServerConnection:
    return make_conn(SECRETS, tls=mode)


def through_starttls(conn: NbdServerConnection, before: bytes = b"", greet: bool = True) -> list:
    """Feed flags (unless the client is past them), ``before`` and STARTTLS; play the caller's
    part (the handshake) on StartTls."""
    events = feed(conn, (client_flags() if greet else b"") + before + option(OPT_STARTTLS))
    assert events[-1] == nbd.StartTls()
    assert conn.state == "tls-handshake" and not conn.tls_active
    conn.tls_started()
    return events


@pytest.mark.parametrize("mode", ["on", "require"])
def test_starttls_then_go_under_tls(mode):
    conn = tls_conn(mode)
    through_starttls(conn)
    assert parse_option_replies(conn.data_to_send()) == [(OPT_STARTTLS, REP_ACK, b"")]
    assert conn.tls_active and conn.state == "options"
    assert feed(conn, option(OPT_LIST) + go(SECRET.name)) == [Negotiated(SECRET)]
    replies = parse_option_replies(conn.data_to_send())
    assert (OPT_LIST, REP_SERVER, struct.pack(">I", len(b"secret-disk")) + b"secret-disk") in replies
    assert replies[-1] == (OPT_GO, REP_ACK, b"")


def test_tls_on_serves_plain_clients_too():
    conn = tls_conn("on")
    assert feed(conn, client_flags() + go(SECRET.name)) == [Negotiated(SECRET)]
    assert not conn.tls_active


@pytest.mark.parametrize("opt, data", [
    (OPT_LIST, b""),
    (OPT_INFO, info_data("secret-disk", (INFO_NAME, INFO_DESCRIPTION))),
    (OPT_GO, info_data("secret-disk")),
    (OPT_GO, info_data("")),
    (OPT_STRUCTURED_REPLY, b""),
    (OPT_LIST_META_CONTEXT, b"x"),
    (4, b""),
    (0xFFFFFFFF, b"junk"),
])
def test_tls_required_refuses_every_option_before_tls(opt, data):
    conn = tls_conn("require")
    assert feed(conn, client_flags() + option(opt, data)) == []
    out = conn.data_to_send()
    [(o, rtype, _)] = parse_option_replies(out)
    assert (o, rtype) == (opt, REP_ERR_TLS_REQD)
    assert b"secret" not in out and struct.pack(">Q", SECRET.size) not in out
    # The same client may still upgrade and then get everything.
    through_starttls(conn, greet=False)
    conn.data_to_send()
    assert feed(conn, go(SECRET.name)) == [Negotiated(SECRET)]

def test_tls_required_export_name_before_tls_closes():
    conn = tls_conn("require")
    conn.receive_data(client_flags() + option(OPT_EXPORT_NAME, b"secret-disk"))
    with pytest.raises(NbdProtocolError, match="before TLS"):
        conn.next_event()
    assert b"secret" not in conn.data_to_send()


def test_tls_required_abort_is_still_answered():
    conn = tls_conn("require")
    assert feed(conn, client_flags() + option(OPT_ABORT)) == [Disconnect()]
    assert parse_option_replies(conn.data_to_send()) == [(OPT_ABORT, REP_ACK, b"")]


def test_starttls_with_data_or_twice_is_err_invalid():
    conn = tls_conn("on")
    assert feed(conn, client_flags() + option(OPT_STARTTLS, b"x")) == []
    assert parse_option_replies(conn.data_to_send())[0][:2] == (OPT_STARTTLS, REP_ERR_INVALID)
    through_starttls(conn, greet=False)
    conn.data_to_send()
    assert feed(conn, option(OPT_STARTTLS)) == []
    assert parse_option_replies(conn.data_to_send())[0][:2] == (OPT_STARTTLS, REP_ERR_INVALID)
    assert conn.state == "options"


def test_plain_bytes_after_starttls_are_a_protocol_error():
    """Plain text behind STARTTLS would be parsed as if it had come through TLS once that is up
    (the STARTTLS injection of CVE-2011-0411): refused, and STARTTLS is not even acknowledged."""
    conn = tls_conn("require")
    conn.receive_data(client_flags() + option(OPT_STARTTLS) + go(SECRET.name))
    with pytest.raises(NbdProtocolError, match="plain-text bytes after NBD_OPT_STARTTLS"):
        conn.next_event()
    assert conn.data_to_send() == b""
    # The same bytes arriving after the StartTls event, before the handshake is done.
    conn = tls_conn("require")
    assert feed(conn, client_flags() + option(OPT_STARTTLS)) == [nbd.StartTls()]
    conn.receive_data(go(SECRET.name))
    with pytest.raises(NbdProtocolError, match="plain-text bytes after NBD_OPT_STARTTLS"):
        conn.next_event()
    conn = tls_conn("require")
    assert feed(conn, client_flags() + option(OPT_STARTTLS)) == [nbd.StartTls()]
    conn.receive_data(go(SECRET.name))
    with pytest.raises(sansio.LocalProtocolError, match="plain-text bytes buffered"):
        conn.tls_started()


def test_eof_during_tls_handshake_closes():
    conn = tls_conn("require")
    assert feed(conn, client_flags() + option(OPT_STARTTLS)) == [nbd.StartTls()]
    assert feed(conn, b"") == [ConnectionClosed()]


def test_tls_started_only_after_starttls():
    conn = tls_conn("on")
    with pytest.raises(sansio.LocalProtocolError):
        conn.tls_started()
    with pytest.raises(ValueError, match="tls must be one of"):
        make_conn(tls="yes")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(option_like | st.just(option(OPT_LIST)) | st.just(go(SECRET.name)), max_size=10),
       data=st.data())
def test_plain_client_of_tls_only_server_learns_nothing(pieces, data):
    """Whatever options a plain client sends, in whatever chunks: every reply is TLS_REQD (or
    the ACK of ABORT/STARTTLS, or ERR_INVALID for a STARTTLS with data), nothing names or sizes
    the export, and no export is entered."""
    stream = client_flags() + b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    conn = make_conn(SECRETS, tls="require", max_option_len=2048)
    out = []
    try:
        for a, b in zip(bounds, bounds[1:]):
            conn.receive_data(stream[a:b])
            while (ev := conn.next_event()) is not NEED_DATA:
                out.append(conn.data_to_send())
                assert isinstance(ev, (Disconnect, nbd.StartTls, ConnectionClosed)), ev
                raise StopIteration  # the end, or TLS: the bytes after STARTTLS are not this test's
            out.append(conn.data_to_send())
    except (NbdProtocolError, StopIteration):
        out.append(conn.data_to_send())
    raw = b"".join(out)
    assert b"secret" not in raw and b"nobody" not in raw
    for opt, rtype, _ in parse_option_replies(raw):
        allowed = {REP_ERR_TLS_REQD} | ({REP_ACK} if opt in (OPT_ABORT, OPT_STARTTLS) else set()) \
            | ({REP_ERR_INVALID} if opt == OPT_STARTTLS else set())
        assert rtype in allowed, (opt, rtype)
    assert conn.export is None


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(before=options_before_go().filter(lambda raw: option(OPT_STARTTLS) not in raw),  # one upgrade
       session=valid_sessions(), data=st.data())
def test_chunking_does_not_change_events_across_starttls(before, session, data):
    """A session that upgrades: the plain part and the part under TLS, each cut anywhere."""
    plain = client_flags() + before + option(OPT_STARTTLS)
    secured = session[4:]  # valid_sessions starts with the client flags, sent only once

    def run(plain_chunks, secured_chunks):
        conn = make_conn(tls="on")
        events, out = [], []
        for chunk in plain_chunks:
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not NEED_DATA:
                out.append(conn.data_to_send())
                events.append(ev)
            out.append(conn.data_to_send())
        assert events[-1] == nbd.StartTls()
        conn.tls_started()
        for chunk in [*secured_chunks, b""]:
            conn.receive_data(chunk)
            while (ev := conn.next_event()) is not NEED_DATA:
                out.append(conn.data_to_send())
                events.append(ev)
                if isinstance(ev, TERMINAL):
                    return events, b"".join(out)
            out.append(conn.data_to_send())
        raise AssertionError("EOF must end every session")

    def cut(raw):
        points = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
        bounds = [0, *points, len(raw)]
        return [raw[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]

    assert run(cut(plain), cut(secured)) == run([plain], [secured])


# --- structured replies, meta contexts, BLOCK_STATUS ------------------------------------------

STRUCTURED_MAGIC = 0x668E33EF
REP_META_CONTEXT = 4
REPLY_FLAG_DONE = 1
T_NONE, T_OFFSET_DATA, T_OFFSET_HOLE, T_BLOCK_STATUS, T_ERROR = 0, 1, 2, 5, (1 << 15) | 1
REQ_ONE = 1 << 3
STATE_HOLE, STATE_ZERO = 1, 2


def meta_data(name: str, queries: list[str]) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode()
        out += struct.pack(">I", len(qb)) + qb
    return out


def set_meta(name: str = "disk", queries: tuple[str, ...] = ("base:allocation",)) -> bytes:
    return option(OPT_SET_META_CONTEXT, meta_data(name, list(queries)))


def list_meta(name: str = "disk", queries: tuple[str, ...] = ()) -> bytes:
    return option(OPT_LIST_META_CONTEXT, meta_data(name, list(queries)))


def parse_chunks(raw: bytes) -> list[tuple[int, int, int, bytes]]:
    """(flags, type, handle, payload) of every structured reply chunk in raw."""
    chunks, pos = [], 0
    while pos < len(raw):
        magic, flags, rtype, handle, length = struct.unpack_from(">IHHQI", raw, pos)
        assert magic == STRUCTURED_MAGIC
        pos += 20
        chunks.append((flags, rtype, handle, raw[pos : pos + length]))
        pos += length
    assert pos == len(raw)
    return chunks


def structured(export: str = "disk", meta: bool = True, **kw) -> NbdServerConnection:
    conn = make_conn(**kw)
    head = client_flags() + option(OPT_STRUCTURED_REPLY) + (set_meta(export) if meta else b"") + go(export)
    events = feed(conn, head)
    assert isinstance(events[-1], Negotiated)
    conn.data_to_send()
    return conn


def test_structured_reply_ack_and_its_data_is_invalid():
    conn = make_conn()
    assert feed(conn, client_flags() + option(OPT_STRUCTURED_REPLY, b"x") + option(OPT_STRUCTURED_REPLY) + go()) \
        == [Negotiated(DISK)]
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0][:2] == (OPT_STRUCTURED_REPLY, REP_ERR_INVALID)
    assert replies[1] == (OPT_STRUCTURED_REPLY, REP_ACK, b"")
    assert conn.structured and not conn.block_status


@pytest.mark.parametrize("opt", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_meta_context_needs_structured_replies(opt):
    conn = make_conn()
    assert feed(conn, client_flags() + option(opt, meta_data("disk", ["base:allocation"])) + go()) == [Negotiated(DISK)]
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0][:2] == (opt, REP_ERR_INVALID) and b"STRUCTURED_REPLY" in replies[0][2]
    assert not conn.block_status


@pytest.mark.parametrize("queries,listed", [
    ((), True), (("base:",), True), (("base:allocation",), True), (("qemu:dirty-bitmap:x",), False),
    (("x-foo:bar", "base:"), True), (("base:other",), False),
])
def test_list_meta_context(queries, listed):
    conn = make_conn()
    feed(conn, client_flags() + option(OPT_STRUCTURED_REPLY) + list_meta("disk", queries))
    replies = parse_option_replies(conn.data_to_send())[1:]
    want = [(OPT_LIST_META_CONTEXT, REP_META_CONTEXT, struct.pack(">I", 0) + b"base:allocation")] if listed else []
    assert replies == want + [(OPT_LIST_META_CONTEXT, REP_ACK, b"")]


def test_set_meta_context_then_block_status():
    conn = make_conn()
    events = feed(conn, client_flags() + option(OPT_STRUCTURED_REPLY) + set_meta() + go())
    assert events == [Negotiated(DISK)]
    replies = parse_option_replies(conn.data_to_send())
    ctx = replies[1]
    assert ctx[:2] == (OPT_SET_META_CONTEXT, REP_META_CONTEXT) and ctx[2][4:] == b"base:allocation"
    assert replies[2] == (OPT_SET_META_CONTEXT, REP_ACK, b"")
    assert conn.structured and conn.block_status
    events = feed(conn, request(Cmd.BLOCK_STATUS, 1, 4096, 1 << 19) + request(Cmd.BLOCK_STATUS, 2, 0, 512, REQ_ONE)
                  + request(Cmd.BLOCK_STATUS, 3, 0, 512, CMD_FLAG_FUA) + request(Cmd.BLOCK_STATUS, 4, 0, 0)
                  + request(Cmd.BLOCK_STATUS, 5, DISK.size - 511, 512)
                  + request(Cmd.BLOCK_STATUS, 6, 0, DISK.size))  # the whole export: longer than max_payload
    assert events[0] == Request(Cmd.BLOCK_STATUS, 1, 4096, 1 << 19, 0)
    assert events[1] == Request(Cmd.BLOCK_STATUS, 2, 0, 512, REQ_ONE)
    assert [(e.handle, e.error) for e in events[2:5]] == [(3, EINVAL), (4, EINVAL), (5, EINVAL)]
    assert events[5] == Request(Cmd.BLOCK_STATUS, 6, 0, DISK.size, 0)


@pytest.mark.parametrize("head", [
    option(OPT_STRUCTURED_REPLY) + go(),  # no context chosen
    option(OPT_STRUCTURED_REPLY) + set_meta("ro") + go(),  # chosen for another export
    option(OPT_STRUCTURED_REPLY) + set_meta() + set_meta("disk", ()) + go(),  # replaced by nothing
    option(OPT_STRUCTURED_REPLY) + set_meta() + set_meta("nope") + go(),  # a failed SET replaces it too
    option(OPT_STRUCTURED_REPLY) + set_meta("disk", ("base:",)) + go(),  # "base:" selects nothing
    set_meta() + option(OPT_STRUCTURED_REPLY) + go(),  # SET before structured replies was refused
])
def test_block_status_without_a_selected_context_is_einval(head):
    conn = make_conn()
    assert feed(conn, client_flags() + head) == [Negotiated(DISK)]
    conn.data_to_send()
    assert not conn.block_status
    (ev,) = feed(conn, request(Cmd.BLOCK_STATUS, 9, 0, 4096))
    assert isinstance(ev, BadRequest) and (ev.handle, ev.error) == (9, EINVAL)


def test_set_meta_context_on_export_name_path():
    conn = make_conn()
    events = feed(conn, client_flags() + option(OPT_STRUCTURED_REPLY) + set_meta() + option(OPT_EXPORT_NAME, b"disk"))
    assert events == [Negotiated(DISK)] and conn.block_status


MALFORMED_META = {
    "empty": b"",
    "too short": b"\x00\x00\x00",
    "name length past the end": struct.pack(">I", 100) + b"disk",
    "name longer than 4096": struct.pack(">I", 5000) + bytes(5004),
    "no query count": struct.pack(">I", 4) + b"disk",
    "count past the end": struct.pack(">I", 4) + b"disk" + struct.pack(">I", 3),
    "count huge": struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0xFFFFFFFF) + bytes(8),
    "query length past the end": struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 50) + b"base:",
    "query without colon": meta_data("disk", ["allocation"]),
    "query with empty namespace": meta_data("disk", [":allocation"]),
    "query not UTF-8": struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 6) + b"base:\xff",
    "name not UTF-8": struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">I", 0),
    "bytes after the queries": meta_data("disk", ["base:allocation"]) + b"junk",
}


@pytest.mark.parametrize("opt", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
@pytest.mark.parametrize("what", sorted(MALFORMED_META))
def test_malformed_meta_context_is_err_invalid(opt, what):
    conn = make_conn(max_option_len=8192)
    assert feed(conn, client_flags() + option(OPT_STRUCTURED_REPLY) + option(opt, MALFORMED_META[what]) + go()) \
        == [Negotiated(DISK)]
    replies = parse_option_replies(conn.data_to_send())
    assert [r[:2] for r in replies[1:2]] == [(opt, REP_ERR_INVALID)] and replies[1][2]
    assert replies[-1] == (OPT_GO, REP_ACK, b"")
    assert not conn.block_status


@pytest.mark.parametrize("opt", [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT])
def test_meta_context_unknown_export_is_err_unknown(opt):
    conn = make_conn()
    feed(conn, client_flags() + option(OPT_STRUCTURED_REPLY) + option(opt, meta_data("nope", ["base:allocation"])))
    assert parse_option_replies(conn.data_to_send())[1][:2] == (opt, REP_ERR_UNKNOWN)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(opt=st.sampled_from([OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT]),
       data=st.one_of(st.binary(max_size=80),
                      st.builds(meta_data, st.sampled_from(["disk", "ro", "", "x"]),
                                st.lists(st.sampled_from(["base:", "base:allocation", "qemu:x", "a", ":", "x-y:"])
                                         | st.text(max_size=8), max_size=4))))
def test_any_meta_context_request_gets_contexts_and_ack_or_one_error(opt, data):
    """Whatever the option carries: zero or more META_CONTEXT replies then ACK, or one error
    reply alone; never an exception, and the session goes on to GO."""
    conn = make_conn()
    assert feed(conn, client_flags() + option(OPT_STRUCTURED_REPLY) + option(opt, data) + go()) == [Negotiated(DISK)]
    replies = parse_option_replies(conn.data_to_send())[1:-3]  # GO: INFO_EXPORT, INFO_BLOCK_SIZE, ACK
    kinds = [r[1] for r in replies]
    assert (len(kinds) == 1 and kinds[0] & ERR) or (kinds[-1] == REP_ACK and set(kinds[:-1]) <= {REP_META_CONTEXT})
    for _, kind, payload in replies:
        if kind == REP_META_CONTEXT:
            assert payload[4:] == b"base:allocation"
    chose = opt == OPT_SET_META_CONTEXT and REP_META_CONTEXT in kinds
    assert conn.block_status == (chose and data[4:8] == b"disk" and data[:4] == struct.pack(">I", 4))


def test_starttls_forgets_structured_replies_and_meta_contexts():
    conn = make_conn(tls="on")
    events = feed(conn, client_flags() + option(OPT_STRUCTURED_REPLY) + set_meta() + option(OPT_STARTTLS))
    assert isinstance(events[-1], nbd.StartTls)
    conn.data_to_send()
    conn.tls_started()
    assert not conn.structured
    # After TLS a client that does not ask again gets neither: simple replies, no BLOCK_STATUS.
    assert feed(conn, go()) == [Negotiated(DISK)]
    assert not conn.structured and not conn.block_status
    conn2 = make_conn(tls="on")
    feed(conn2, client_flags() + option(OPT_STRUCTURED_REPLY) + set_meta() + option(OPT_STARTTLS))
    conn2.data_to_send()
    conn2.tls_started()
    assert feed(conn2, option(OPT_STRUCTURED_REPLY) + set_meta() + go()) == [Negotiated(DISK)]
    assert conn2.structured and conn2.block_status


def test_read_reply_simple_fills_holes():
    conn = negotiated()
    out = b"".join(conn.read_reply(7, 100, [b"ab", 3, b"", 0, b"c"]))
    assert out == struct.pack(">IIQ", 0x67446698, 0, 7) + b"ab\0\0\0c"


def decode_read(chunks, offset: int, length: int) -> bytes:
    """The client's view of a structured READ reply: the bytes it read, checking the spec's rules."""
    buf = bytearray(b"\xee" * length)
    seen = 0
    for i, (flags, rtype, handle, payload) in enumerate(chunks):
        assert bool(flags & REPLY_FLAG_DONE) == (i == len(chunks) - 1)
        if rtype == T_OFFSET_DATA:
            (off,) = struct.unpack_from(">Q", payload)
            data = payload[8:]
            assert len(data) > 0 and offset <= off and off + len(data) <= offset + length
            buf[off - offset : off - offset + len(data)] = data
            seen += len(data)
        elif rtype == T_OFFSET_HOLE:
            off, size = struct.unpack(">QI", payload)
            assert size > 0 and offset <= off and off + size <= offset + length
            buf[off - offset : off - offset + size] = bytes(size)
            seen += size
        else:
            assert rtype == T_NONE and not payload and length == 0
    assert seen == length
    return bytes(buf)


@settings(max_examples=200)
@given(pieces=st.lists(st.one_of(st.binary(max_size=40), st.integers(0, 100)), max_size=8),
       offset=st.integers(0, 1000), handle=handles)
def test_read_reply_structured_round_trip(pieces, offset, handle):
    conn = structured()
    want = b"".join(p if isinstance(p, bytes) else bytes(p) for p in pieces)
    raw = b"".join(conn.read_reply(handle, offset, pieces))
    chunks = parse_chunks(raw)
    assert {c[2] for c in chunks} == {handle}
    assert decode_read(chunks, offset, len(want)) == want
    holes = [p for p in pieces if isinstance(p, int) and p]
    assert sum(1 for c in chunks if c[1] == T_OFFSET_HOLE) == len(holes)


def test_reply_error_structured_and_simple():
    conn = structured()
    (flags, rtype, handle, payload), = parse_chunks(conn.reply_error(5, EINVAL, "bad flags"))
    assert (flags, rtype, handle) == (REPLY_FLAG_DONE, T_ERROR, 5)
    assert struct.unpack_from(">IH", payload) == (EINVAL, 9) and payload[6:] == b"bad flags"
    assert negotiated().reply_error(5, EINVAL, "bad flags") == struct.pack(">IIQ", 0x67446698, EINVAL, 5)
    with pytest.raises(sansio.LocalProtocolError):
        conn.reply_error(5, 0)


extent_lists = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 7)), min_size=1, max_size=12)


@settings(max_examples=300)
@given(extents=extent_lists, length=st.integers(1, 20000), req_one=st.booleans())
def test_block_status_reply_follows_the_spec(extents, length, req_one):
    if not any(n for n, _ in extents):
        extents = [*extents, (1, 0)]
    conn = structured()
    req = Request(Cmd.BLOCK_STATUS, 77, 0, length, REQ_ONE if req_one else 0)
    (flags, rtype, handle, payload), = parse_chunks(conn.block_status_reply(req, extents))
    assert (flags, rtype, handle) == (REPLY_FLAG_DONE, T_BLOCK_STATUS, 77)
    assert len(payload) >= 12 and (len(payload) - 4) % 8 == 0
    (ctx,) = struct.unpack_from(">I", payload)
    assert ctx == nbd.BASE_ALLOCATION_ID
    got = [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]
    assert all(n > 0 and f & ~3 == 0 for n, f in got)
    assert sum(n for n, _ in got) <= length
    assert all(a[1] != b[1] for a, b in zip(got, got[1:]))  # merged
    if req_one:
        assert len(got) == 1
    # Byte by byte, the reply says what the caller said (within what it covers).
    said = [f & 3 for n, f in extents for _ in range(n)][:length]
    told = [f for n, f in got for _ in range(n)]
    assert told == said[: len(told)]
    assert len(told) == min(len(said), length) or req_one


def test_block_status_reply_refuses_nothing():
    conn = structured()
    req = Request(Cmd.BLOCK_STATUS, 1, 0, 100, 0)
    with pytest.raises(sansio.LocalProtocolError):
        conn.block_status_reply(req, [(0, 0)])
    with pytest.raises(sansio.LocalProtocolError):
        conn.block_status_reply(Request(Cmd.READ, 1, 0, 100, 0), [(100, 0)])
