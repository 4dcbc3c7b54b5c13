"""Every decoder that takes bytes from outside, as one ``run(data, sizes, fix)`` each, with a corpus of valid inputs.

A run feeds ``data`` in reads of ``sizes`` (cycled) and returns ``"parsed"`` (every byte was
framed and handed out, or the input ended cleanly) or ``"rejected"`` (the decoder raised its
own protocol error, the RemoteProtocolError subclass the daemon catches per connection). Any
other exception, an event that breaks what the decoder promises (a WRITE beyond the export, a
message that cannot be encoded again), or a decoder that keeps producing events without
consuming input is a :class:`Bug`: what the campaign exists to find.

``fix`` is the structure-aware part a byte mutator alone cannot reach: it re-frames lengths
(peer frames) or recomputes header checks (log records) after the bytes were mutated, so that a
mutated length or field is *believed* by the framing and reaches the field checks behind it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import struct
import tempfile
from pathlib import Path

import xxhash

from mars.engine.daemon.control import REQUEST_LIMIT, ControlServer
from mars.engine.entry import Entry
from mars.engine.log import format as F
from mars.engine.log.files import scan_file
from mars.engine.log.values import LogPos, ReplayCode, ReplayLink, Version, parse_log_name
from mars.engine.nbd import protocol as N
from mars.engine.peer import protocol as P
from mars.engine.sansio import END, NEED_DATA
from mars.engine.tree import LamportClock, Tree, check_name, parse_hosts, parse_int
from mars.engine.errors import MarsError

from fuzzlib import chunked


class Bug(AssertionError):
    """A decoder did something other than parse or refuse with its protocol error."""


def _bound(events: int, data: bytes) -> None:
    # Every event consumes at least one byte (or ends the stream): more events than bytes is a loop.
    if events > len(data) + 4:
        raise Bug(f"{events} events from {len(data)} bytes: the decoder does not consume its input")


# --- NBD ----------------------------------------------------------------------------------------

EXPORT_SIZE = 1 << 20
_EXPORTS = {"r": N.ExportInfo("r", EXPORT_SIZE), "ro": N.ExportInfo("ro", EXPORT_SIZE, read_only=True),
            "": N.ExportInfo("", 4096)}


def _opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", N.IHAVEOPT, option, len(data)) + data


def _go(name: str, infos: tuple[int, ...] = (), option: int = N.OPT_GO) -> bytes:
    raw = name.encode()
    return _opt(option, struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))


def _req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, handle: int = 7, data: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", N.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data


def nbd_corpus() -> list[bytes]:
    flags = struct.pack(">I", N.FLAG_C_FIXED_NEWSTYLE | N.FLAG_C_NO_ZEROES)
    requests = (_req(1, 4096, 4096, 1, data=b"\xab" * 4096) + _req(0, 0, 8192) + _req(3) + _req(4, 0, 65536)
                + _req(6, 8192, 4096, 2) + _req(1, EXPORT_SIZE - 512, 512, data=b"z" * 512) + _req(7, 0, 512)
                + _req(5, 0, 512) + _req(2))
    return [
        flags + _go("r", (N.INFO_NAME, N.INFO_DESCRIPTION, N.INFO_BLOCK_SIZE)) + requests,
        struct.pack(">I", 1) + _opt(N.OPT_LIST) + _go("r", (), N.OPT_INFO) + _opt(N.OPT_EXPORT_NAME, b"r") + requests,
        flags + _opt(N.OPT_STRUCTURED_REPLY) + _opt(N.OPT_STARTTLS) + _go("nope") + _go("") + _req(0, 0, 512),
        flags + _go("ro") + _req(1, 0, 16, data=b"x" * 16) + _req(4, 0, 16) + _req(0, 0, 16),
        flags + _opt(N.OPT_LIST, b"junk") + _opt(N.OPT_ABORT),
        flags + _opt(N.OPT_EXPORT_NAME, b"r") + _req(1, 0, 100, data=b"\0" * 100) + _req(3, 0, 0, 1),
    ]


def run_nbd(data: bytes, sizes: list[int], fix: bool = False) -> str:
    chunks = chunked(data, sizes)
    conn = N.NbdServerConnection(_EXPORTS.get, lambda: sorted(_EXPORTS))
    conn.initial_bytes()
    events = 0
    try:
        for piece in [*chunks, b""]:
            conn.receive_data(piece)
            while True:
                ev = conn.next_event()
                conn.data_to_send()
                if ev is NEED_DATA:
                    break
                events += 1
                _bound(events, data)
                if isinstance(ev, N.ConnectionClosed):
                    return "parsed"
                if isinstance(ev, N.Request):
                    export = conn.export
                    if ev.offset + ev.length > export.size or (export.read_only and ev.cmd is not N.Cmd.READ
                                                               and ev.cmd is not N.Cmd.FLUSH):
                        raise Bug(f"request {ev} passed for export {export}")
                    if (ev.data is not None) != (ev.cmd is N.Cmd.WRITE) or (ev.data is not None
                                                                             and len(ev.data) != ev.length):
                        raise Bug(f"request {ev} carries the wrong payload")
                    conn.reply_header(ev.handle)
                elif isinstance(ev, N.Disconnect):
                    # The session is over: what follows is dropped, EOF then closes it.
                    pass
    except N.NbdProtocolError:
        return "rejected"
    raise Bug("EOF did not close the NBD connection")


# --- the peer protocol ----------------------------------------------------------------------------

OUR_HELLO = P.Hello(host="a", cluster="c1", proto=P.PROTO_VERSION, lamport_ns=1)

_ENTRIES = (Entry("resource-r/size", "67108864", 5), Entry("resource-r/replay-b", "log-000000001-a,4096,0", 6),
            Entry("resource-r/version-000000001-a", "0" * 32 + ",log-000000001-a,4096:" + "0" * 32, 7),
            Entry("actual-b/time", "1700000000.5", 8), Entry("resource-r/actual-b/replay-code", "-1,header-check,64", 9),
            Entry("resource-r/connect-b", "a,c", 10), Entry("ips/ip-b", "127.0.0.3", 11))


def peer_messages() -> list:
    return [
        P.TreeRequest(req=1, prefixes=("resource-r/", "")),
        P.TreeEntries(req=0, entries=_ENTRIES),
        P.TreeSince(req=2, incarnation=99, seq=3, fresh=True),
        P.TreeChanges(req=2, incarnation=99, from_seq=3, seq=9, digest=12345, entries=_ENTRIES[:3]),
        P.FetchRequest(req=3, res="r", name="log-000000001-a", offset=0, max_bytes=1 << 20, wait_ms=100),
        P.LogData(req=3, res="r", name="log-000000001-a", offset=0, size=300, finished=False, data=b"L" * 200),
        P.DigestRequest(req=4, res="r", offset=0, chunk=65536, count=4),
        P.DigestReply(req=4, res="r", offset=0, chunk=65536, digests=("00ff" * 8, None)),
        P.ReadRequest(req=5, res="r", offset=4096, length=4096),
        P.ReadReply(req=5, offset=4096, data=b"R" * 100),
        P.DirtyMapRequest(req=6, res="r"),
        P.DirtyMapReply(req=6, res="r", region=1 << 20, size=64 << 20, data=b"\x01" * 8),
        P.ErrorReply(req=7, code="refused", what="no", remedy="yes"),
        P.Bye(reason="done"),
    ]


PEER_HELLO = P.Hello(host="b", cluster="c1", proto=P.PROTO_VERSION, lamport_ns=2)

#: JSON values that break fields: wrong types, out of range, unsafe paths, bad Unicode, deep nesting.
BAD_VALUES = (0, -1, 1, 2**63 - 1, 2**63, 10**30, 1.5, True, False, None, "", ".", "..", "a/b", "/abs", "x\u0000y",
              "\udc80", "é" * 200, "x" * 256, "x" * 5000, [], {}, [[["deep"]]], ["a", "b", 3], {"k": 1},
              [["p", "v"]], [["p", "v", -1]], [["a/../b", "v", 1]], [["p", "", 1]], [["p", "v" * 5000, 1]],
              [["p" * 300, "v", 1]], ["../x"], "deadbeef", "DEADBEEF", "abc", [None, "zz"])


def _meta(msg) -> dict:
    return json.loads(P.encode(msg)[9:9 + struct.unpack_from(">I", P.encode(msg), 5)[0]])


def frame(type_: int, meta: dict | str | bytes, data: bytes = b"") -> bytes:
    raw = meta if isinstance(meta, bytes) else (meta if isinstance(meta, str) else json.dumps(meta)).encode(
        "utf-8", "surrogatepass")
    return struct.pack(">IBI", 5 + len(raw) + len(data), type_, len(raw)) + raw + data


def json_variant(rng: random.Random, msgs: list) -> bytes:
    """One valid message with one field changed at the JSON level, framed with correct lengths."""
    msg = rng.choice(msgs)
    meta = _meta(msg)
    data = getattr(msg, "data", b"")
    pick = rng.random()
    if pick < 0.6 and meta:
        meta[rng.choice(sorted(meta))] = rng.choice(BAD_VALUES)
    elif pick < 0.7 and meta:
        del meta[rng.choice(sorted(meta))]
    elif pick < 0.8:
        meta[rng.choice(("extra", "req", "data", ""))] = rng.choice(BAD_VALUES)
    elif pick < 0.85:
        return frame(msg.TYPE, "[" * rng.choice((10, 1000, 100000)))
    elif pick < 0.9:
        return frame(rng.randrange(256), meta, data)
    else:
        data = rng.randbytes(rng.randrange(0, 64))
    return frame(msg.TYPE, meta, data)


def peer_corpus(rng: random.Random | None = None, variants: int = 300) -> list[bytes]:
    rng = rng or random.Random(0)
    msgs = peer_messages()
    hello = P.encode(PEER_HELLO)
    out = [hello + b"".join(P.encode(m) for m in msgs)]
    out += [hello + P.encode(m) for m in msgs]
    out += [hello + json_variant(rng, msgs) for _ in range(variants)]
    out.append(json_variant(rng, [PEER_HELLO]))
    return out


def _reframe(data: bytes) -> bytes:
    """Make the first frames' length fields agree with their JSON meta again (the structure fix)."""
    out = bytearray()
    i = 0
    while i + 9 <= len(data):
        body_len, type_, meta_len = struct.unpack_from(">IBI", data, i)
        start = i + 9
        end = data.find(b"}", start)
        if end < 0:
            break
        meta = data[start:end + 1]
        rest_end = min(len(data), i + 4 + body_len) if body_len >= 5 + meta_len else end + 1
        payload = data[end + 1:rest_end] if type_ in (5, 9, 15) else b""
        out += frame(type_, meta, payload)
        i = max(rest_end, end + 1)
    return bytes(out + data[i:])


def check_message(msg) -> None:
    """What the decoder promises about a message it hands out: it can be sent back out as it was."""
    again = P.decode(P.encode(msg))
    if again != msg:
        raise Bug(f"{msg!r} does not survive encode and decode: {again!r}")


def run_peer(data: bytes, sizes: list[int], fix: bool = False, on_message=None) -> str:
    if fix:
        data = _reframe(data)
    chunks = chunked(data, sizes)
    conn = P.PeerConnection(OUR_HELLO)
    conn.initial_bytes()
    events = 0
    try:
        for piece in [*chunks, b""]:
            conn.receive_data(piece)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                events += 1
                _bound(events, data)
                if isinstance(ev, P.Closed):
                    return "parsed"
                if type(ev) not in P.MESSAGE_TYPES.values():
                    raise Bug(f"next_event() returned {ev!r}")
                check_message(ev)
                if on_message is not None:
                    on_message(ev)
    except P.PeerProtocolError:
        return "rejected"
    raise Bug("EOF did not close the peer connection")


def run_peer_decode(data: bytes, sizes: list[int], fix: bool = False) -> str:
    """decode(): exactly one frame, as tools and tests use it."""
    if fix:
        data = _reframe(data)
    try:
        msg = P.decode(data)
    except P.PeerProtocolError:
        return "rejected"
    check_message(msg)
    return "parsed"


# --- the log -------------------------------------------------------------------------------------

FIRST = 1 << 32


def log_records() -> list[F.LogRecord]:
    return [
        F.LogRecord(FIRST, 10, 0, 4096, F.Kind.WRITE, F.FLAG_FUA, b"\x11" * 4096),
        F.LogRecord(FIRST + 1, 11, 8192, 65536, F.Kind.TRIM),
        F.LogRecord(FIRST + 2, 12, 4096, 512, F.Kind.ZERO, F.FLAG_NO_HOLE),
        F.LogRecord(FIRST + 3, 13, 2**40, 100, F.Kind.WRITE, 0, bytes(range(100))),
        F.LogRecord(FIRST + 4, 14, 0, 0, F.Kind.WRITE, 0, b""),
    ]


def _renumbered(recs: list[F.LogRecord]) -> bytes:
    """Records as a file holds them: numbered on from its first record."""
    return b"".join(F.encode_record_bytes(F.LogRecord(FIRST + i, r.lamport_ns, r.offset, r.length, r.kind, r.flags,
                                                      r.payload)) for i, r in enumerate(recs))


def log_corpus() -> list[bytes]:
    recs = log_records()
    return [_renumbered(recs), _renumbered(recs[:1]), _renumbered(recs[1:3]), _renumbered(recs) + bytes(300),
            _renumbered(recs[3:]), _renumbered(recs[1:2] * 3)]


def _fix_checks(data: bytes) -> bytes:
    """Recompute the payload digest and header check of every record whose start magic is intact,
    so a mutated field or length is believed and its own check is what must refuse it."""
    out = bytearray(data)
    i = out.find(F.START_MAGIC)
    while 0 <= i and i + F.HEADER_SIZE <= len(out):
        plen = struct.unpack_from("<I", out, i + 12)[0]
        payload = out[i + 64:i + 64 + plen]
        if len(payload) == plen:
            struct.pack_into("<Q", out, i + 48, xxhash.xxh3_64_intdigest(bytes(payload)))
        struct.pack_into("<Q", out, i + 56, xxhash.xxh3_64_intdigest(bytes(out[i:i + 56])))
        i = out.find(F.START_MAGIC, i + 8)
    return bytes(out)


def run_log(data: bytes, sizes: list[int], fix: bool = False) -> str:
    if fix:
        data = _fix_checks(data)
    chunks = chunked(data, sizes)
    reader = F.RecordReader("fuzz", 0, FIRST)
    events = 0
    end = 0
    try:
        for piece in [*chunks, b""]:
            reader.receive_data(piece)
            while True:
                ev = reader.next_event()
                if ev is NEED_DATA:
                    break
                if ev is END:
                    if end != len(data):
                        raise Bug(f"END at {end} of {len(data)} bytes")
                    return "parsed"
                events += 1
                _bound(events, data)
                if ev.offset != end or ev.end - ev.offset != F.record_size(ev.record.kind, ev.record.length):
                    raise Bug(f"record at {ev.offset}..{ev.end} after {end}")
                end = ev.end
    except F.LogCorruption as e:
        if e.offset != end:
            raise Bug(f"corruption reported at {e.offset}, the good prefix ends at {end}") from None
        return "rejected"
    raise Bug("EOF did not end the log reader")


class ScanFile:
    """files.scan_file over a real file (tmpfs): the blocking scanner replay and recovery use."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="mars-fuzz-", dir=base))
        self.path = self.dir / "log-000000001-a"

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __call__(self, data: bytes, sizes: list[int], fix: bool = False) -> str:
        if fix:
            data = _fix_checks(data)
        self.path.write_bytes(data)
        # Reads of 64 bytes and up: the reader itself is split byte by byte in run_log; a pread per
        # byte of a 4 KiB payload would only make this decoder the campaign's slowest.
        chunk = max(64, sizes[0]) if sizes else 4 << 20
        result = scan_file(self.path, 0, FIRST, chunk=chunk)
        if result.error is None:
            if result.end != len(data):
                raise Bug(f"clean scan ends at {result.end} of {len(data)} bytes")
            return "parsed"
        if not isinstance(result.error, F.LogCorruption) or result.error.offset != result.end:
            raise Bug(f"scan error {result.error!r} at {result.end}")
        return "rejected"


# --- tree entries from peers, and their values as the nodes read them -------------------------------

VALUE_SEEDS = ("log-000000001-a,4096", "log-000000001-a,4096,0", "log-000000729@1048576",
               "0" * 32 + ",log-000000002-a,4096:" + "0" * 32 + ",log-000000001-a,100", "1", "-1", "-1,header-check,64",
               "67108864", "a,b,c", "127.0.0.3", "1700000000.5", "log-000000001-a")
ODD = ("²", "١", "٣", "\u00a0", "_", "-", "+", ",", ":", "@", " ", "0", "9", "\x00", "\udc80", "ⅷ", "①", "é", "/")


def value_variant(rng: random.Random) -> str:
    v = list(rng.choice(VALUE_SEEDS))
    for _ in range(rng.choice((1, 1, 2, 3))):
        pos = rng.randrange(len(v) + 1)
        pick = rng.random()
        if pick < 0.4:
            v.insert(pos, rng.choice(ODD))
        elif pick < 0.7 and v:
            v[min(pos, len(v) - 1)] = rng.choice(ODD)
        elif pick < 0.85:
            del v[pos:pos + rng.randrange(1, 5)]
        else:
            v.insert(pos, rng.choice(("9" * 30, "x" * 300, "," * 5, "9" * 5000)))
    return "".join(v)


def parse_value(value: str) -> None:
    """Every typed parser a node applies to a tree value: each returns a value or None, never raises."""
    for parse in (LogPos.parse, ReplayLink.parse, Version.parse, ReplayCode.parse, parse_int, parse_hosts,
                  parse_log_name):
        try:
            parse(value)
        except Exception as e:
            raise Bug(f"{parse.__qualname__}({value[:100]!r}) raised {e!r}") from e
    for kind in ("host", "resource"):
        try:
            check_name(kind, value)
        except MarsError:
            pass
        except Exception as e:
            raise Bug(f"check_name({kind!r}, {value[:100]!r}) raised {e!r}") from e


def entries_corpus(rng: random.Random | None = None, variants: int = 200) -> list[bytes]:
    rng = rng or random.Random(1)
    hello = P.encode(PEER_HELLO)
    out = [hello + P.encode(P.TreeEntries(req=0, entries=_ENTRIES))]
    for _ in range(variants):
        entries = []
        for e in rng.sample(_ENTRIES, 3):
            entries.append([e.path, value_variant(rng), e.stamp_ns])
        if rng.random() < 0.3:
            entries.append([rng.choice(("resource-r/" + "x" * 300, "resource-r/log-000000001-a/x", "a/" * 400 + "b",
                                        "cluster/ca.pem", "resource-r/size/x", "nbd.sock/x", "resource-" + "é" * 120)),
                            rng.choice(("v", "v" * 4096, "é" * 2048)), 20])
        out.append(hello + frame(3, {"req": 0, "entries": entries}))
    return out


class TreeEntries:
    """A peer's TreeEntries/TreeChanges as marsd takes them: decoded, every value parsed by every
    typed parser, and applied to a real tree (Tree.apply, what exchange.take runs), where only an
    OSError of the disk itself may escape, never one a peer's entry provokes."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = Path(tempfile.mkdtemp(prefix="mars-fuzz-tree-", dir=base))
        self.runs = 0
        self._fresh()

    def _fresh(self) -> None:
        root = self.dir / "tree"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        (root / "resource-r").mkdir()
        (root / "resource-r" / "log-000000001-a").write_bytes(b"")  # a log file: entries never replace it
        (root / "nbd.sock").write_bytes(b"")
        self.tree = Tree(root, "a", LamportClock())

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _take(self, msg) -> None:
        if not isinstance(msg, (P.TreeEntries, P.TreeChanges)):
            return
        for e in msg.entries:
            parse_value(e.value)
            try:
                self.tree.apply(e, "b")
            except Exception as err:
                raise Bug(f"Tree.apply({e.path[:80]!r}, {e.value[:80]!r}) raised {err!r}") from err

    def __call__(self, data: bytes, sizes: list[int], fix: bool = False) -> str:
        self.runs += 1
        if self.runs % 5000 == 0:
            self._fresh()
        return run_peer(data, sizes, fix, on_message=self._take)


def run_values(data: bytes, sizes: list[int], fix: bool = False) -> str:
    """The typed parsers alone, on text straight from the mutated bytes (a hand-edited or damaged tree)."""
    text = data.decode("utf-8", "surrogateescape")
    parse_value(text)
    return "parsed"


def values_corpus() -> list[bytes]:
    rng = random.Random(2)
    return [v.encode() for v in VALUE_SEEDS] + [value_variant(rng).encode("utf-8", "surrogatepass")
                                               for _ in range(300)]


# --- the control socket ----------------------------------------------------------------------------

class Control:
    """ControlServer._request, the control socket's decoder, on a real StreamReader in one event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(Path("/nonexistent"), "a", bus=None)  # only its decoder runs here

    def close(self) -> None:
        self.loop.close()

    async def _one(self, chunks: list[bytes]) -> object:
        reader = asyncio.StreamReader(limit=REQUEST_LIMIT, loop=self.loop)
        for c in chunks:
            reader.feed_data(c)
        reader.feed_eof()
        return await self.server._request(reader)

    def __call__(self, data: bytes, sizes: list[int], fix: bool = False) -> str:
        try:
            req = self.loop.run_until_complete(self._one(chunked(data, sizes)))
        except Exception as e:
            raise Bug(f"control request {data[:80]!r} raised {e!r}") from e
        if isinstance(req, str):
            return "rejected"
        if not isinstance(req, dict):
            raise Bug(f"control request decoded to {type(req).__name__}")
        req.get("cmd") == "snapshot"  # noqa: B015 - what _serve does next with it
        return "parsed"


def control_corpus() -> list[bytes]:
    return [b'{"cmd": "snapshot"}\n', b'{"cmd":"counters"}\n', b'{"cmd": "events"}\n', b'{"cmd": "nope", "x": [1]}\n',
            b'{"cmd": 1}\n', b'[1, 2]\n', b'"snapshot"\n', b'{"cmd": "snapshot"}', b"\n",
            b'{"cmd": "' + b"x" * 70000 + b'"}\n', b"[" * 5000 + b"]" * 5000 + b"\n", b'{"a":' * 3000 + b"\n",
            b'{"cmd": 1e400}\n', b'{"cmd": NaN}\n', b'{"cmd": "\\ud800"}\n', b'{"cmd": ' + b"9" * 5000 + b"}\n"]
