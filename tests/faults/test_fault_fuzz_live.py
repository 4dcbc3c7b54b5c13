"""The fuzz campaign against a running marsd: mutated inputs on every socket it listens on, while a
well-behaved client goes on writing and reading back its own export.

Sockets: NBD on the unix socket and on ``--nbd-listen 127.0.0.2:PORT``; the peer port with
garbage before TLS, with a TLS client that shows no certificate, and with the cluster's own
credential (a node "b" certified by the cluster CA) sending mutated peer streams after its Hello;
the control socket. The same inputs go through the in-process decoder first, so the test knows
which connections marsd must refuse, and checks that the log names the very reason the decoder
gives. At the end marsd still runs, its log holds no traceback, and every write of the good
client (libnbd) read back as written.

Short in `make test` (12 inputs per socket); ``MARS_FUZZ_LIVE`` sets the inputs per
socket (`make torture`: 2,000).
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import threading
import time

import nbd
import pytest

import fuzz_decoders as D
from campaign import report, size
from fuzzlib import chunked, mutate, random_chunks, random_ops
from harness import Node, cleanup, short_tempdir, wait_until

from mars.engine.credentials import client_context, install_secret
from mars.engine.nbd import protocol as N
from mars.engine.peer import protocol as P

INPUTS = size(12, 2000, "MARS_FUZZ_LIVE")
SEED = int(os.environ.get("MARS_FUZZ_SEED", random.randrange(2**32)))
FUZZ_SIZE = 64 << 20
GOOD_SIZE = 16 << 20
READ_TIMEOUT = 15.0  # longer than marsd's TLS handshake timeout (10 s)


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


@pytest.fixture
def live():
    """Node a serving resource r (the fuzzed export) and g (the good client's), NBD also on TCP,
    and the credential of a node b the cluster CA certified (its marsd never runs)."""
    base = short_tempdir()
    nodes: list[Node] = []
    try:
        a = Node(base, "a", "127.0.0.2")
        nodes.append(a)
        a.create_cluster()
        port = _free_port(a.ip)
        a.start("--nbd-listen", f"{a.ip}:{port}")
        a.marsadm("create-resource", "r", str(base / "r.img"), "64M")
        a.marsadm("create-resource", "g", str(base / "g.img"), "16M")
        bdir = base / "b"
        bdir.mkdir()
        install_secret(bdir, a.marsadm("export-secret").stdout.encode())
        ctx = client_context(bdir, "b")
        yield a, port, ctx
    finally:
        cleanup(base, nodes)


class GoodClient(threading.Thread):
    """libnbd writing a fresh pattern at a random place of g and reading it back, until stopped."""

    def __init__(self, uri: str, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri, self.rng = uri, random.Random(seed)
        self.stop = threading.Event()
        self.done = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self.stop.is_set():
                off = self.rng.randrange(GOOD_SIZE // 4096) * 4096
                data = self.rng.randbytes(4096)
                h.pwrite(data, off)
                if h.pread(4096, off) != data:
                    self.errors.append(f"read back at {off} differs")
                self.done += 1
            h.shutdown()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))


def _exchange(s: socket.socket, data: bytes, sizes: list[int], timeout: float = READ_TIMEOUT,
              half_close: bool = True) -> str:
    """Send ``data`` in pieces, then read until marsd closes: "closed", or "open" if it waits on."""
    s.settimeout(timeout)
    try:
        pieces = chunked(data, sizes)
        if len(pieces) > 64:  # a few dozen separate sends, then the rest: enough to split every header
            pieces = pieces[:64] + [b"".join(pieces[64:])]
        for piece in pieces:
            s.sendall(piece)
        if half_close:
            s.shutdown(socket.SHUT_WR)
    except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
        pass  # marsd closed early: what a refusal looks like
    try:
        while s.recv(65536):
            pass
        return "closed"
    except (ConnectionResetError, ssl.SSLError):
        return "closed"
    except (TimeoutError, socket.timeout):
        return "open"
    except OSError:
        return "closed"


def _nbd_verdict(data: bytes) -> tuple[str, str | None]:
    """What the decoder says about ``data`` with marsd's exports: parsed, or refused and why."""
    exports = {"r": N.ExportInfo("r", FUZZ_SIZE), "g": N.ExportInfo("g", GOOD_SIZE)}
    conn = N.NbdServerConnection(exports.get, lambda: sorted(exports))
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        while not isinstance(conn.next_event(), N.ConnectionClosed):
            pass
    except N.NbdProtocolError as e:
        return "rejected", e.reason
    return "parsed", None


def _peer_verdict(data: bytes) -> tuple[str, str | None]:
    """The decoder's verdict, and what marsd's log must then say (None: nothing certain).

    marsd checks the Hello against b's certificate before it reads on (a mutated host or cluster
    is refused, not a protocol error), and answers requests one by one: behind a long-polling
    fetch the refusal comes only once the fetch is answered, maybe after we hung up.
    """
    conn = P.PeerConnection(D.OUR_HELLO)
    conn.receive_data(data)
    conn.receive_data(b"")
    try:
        while not isinstance(ev := conn.next_event(), (P.Closed, P.Bye)):
            if isinstance(ev, P.Hello) and ev.host != "b":
                return "rejected", f"peer says it is {ev.host!r}"
            if isinstance(ev, P.Hello) and ev.cluster:
                return "rejected", f"peer b belongs to cluster {ev.cluster}"
            if isinstance(ev, P.FetchRequest) and ev.wait_ms:
                try:
                    while not isinstance(conn.next_event(), (P.Closed, P.Bye)):
                        pass
                except P.PeerProtocolError:
                    return "rejected", None
                return "parsed", None
    except P.PeerProtocolError as e:
        return "rejected", e.reason
    return "parsed", None


LIVE_HELLO = P.Hello(host="b", cluster="", proto=P.PROTO_VERSION, lamport_ns=1)


def _live_peer_corpus() -> list[bytes]:
    """The in-process peer corpus with b's Hello (no cluster id: a joining node, which the
    certificate alone admits) and requests about r, never g (the good client's)."""
    hello = P.encode(LIVE_HELLO)
    old = P.encode(D.PEER_HELLO)
    out = []
    for c in D.peer_corpus(random.Random(4), 150):
        if c.startswith(old):
            body = c[len(old):]
            if b'"g"' not in body and b"resource-g" not in body:
                out.append(hello + body)
    return out


def test_fuzz_live_marsd(live):
    a, port, ctx = live
    rng = random.Random(SEED)
    good = GoodClient(a.uri("g"), SEED)
    good.start()
    counts: dict[str, int] = {}
    expected: list[str] = []  # reasons the log must name
    views = 0
    t0 = time.perf_counter()

    def tally(kind: str, outcome: str) -> None:
        counts[f"{kind} {outcome}"] = counts.get(f"{kind} {outcome}", 0) + 1

    nbd_corpus = [c for c in D.nbd_corpus()]
    peer_corpus = _live_peer_corpus()
    control_corpus = D.control_corpus()
    try:
        for i in range(INPUTS):
            # NBD, unix and TCP: the same kind of input, the reason checked in the log.
            for where in ("unix", "tcp"):
                data = mutate(rng.choice(nbd_corpus), random_ops(rng, nbd_corpus), nbd_corpus)
                verdict, reason = _nbd_verdict(data)
                if where == "unix":
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(str(a.nbd_sock))
                else:
                    s = socket.create_connection((a.ip, port), timeout=10)
                with s:
                    outcome = _exchange(s, data, random_chunks(rng))
                assert outcome == "closed", f"NBD over {where}: marsd neither closed nor answered {data[:200]!r}"
                tally(f"nbd-{where}", verdict)
                if reason:
                    expected.append(reason)
            # The peer port before TLS: garbage, a valid peer stream in clear, a TLS hello cut short.
            raw = rng.choice((rng.randbytes(rng.randrange(1, 600)), rng.choice(peer_corpus),
                              b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rng.randbytes(40)))
            with socket.create_connection((a.ip, a.port), timeout=10) as s:
                assert _exchange(s, raw, [rng.randrange(1, 600)]) == "closed", "peer port kept a non-TLS client"
            tally("peer-plain", "closed")
            # A TLS client without a certificate.
            bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            bare.check_hostname, bare.verify_mode = False, ssl.CERT_NONE
            try:
                with socket.create_connection((a.ip, a.port), timeout=10) as raw_s, \
                        bare.wrap_socket(raw_s) as s:
                    outcome = _exchange(s, P.encode(LIVE_HELLO), [4096], half_close=False)
                    assert outcome == "closed", "peer port served a TLS client without a certificate"
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
                pass
            tally("peer-tls-no-cert", "refused")
            # With the cluster's credential: mutated peer streams after b's Hello.
            data = mutate(rng.choice(peer_corpus), random_ops(rng, peer_corpus), peer_corpus)
            if rng.random() < 0.3:
                data = D._reframe(data)
            verdict, reason = _peer_verdict(data)
            with socket.create_connection((a.ip, a.port), timeout=10) as raw_s, \
                    ctx.wrap_socket(raw_s) as s:
                outcome = _exchange(s, data + (P.encode(P.Bye()) if verdict == "parsed" else b""),
                                    random_chunks(rng), timeout=READ_TIMEOUT if reason else 2.0,
                                    half_close=False)
            if verdict == "rejected" and reason is not None:
                assert outcome == "closed", f"marsd kept a link whose stream the decoder refuses ({reason})"
                expected.append(reason)
            tally("peer-tls", verdict)
            # The control socket.
            line = mutate(rng.choice(control_corpus), random_ops(rng, control_corpus), control_corpus)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(a.mars_dir / "control.sock"))
                s.settimeout(READ_TIMEOUT)
                try:
                    s.sendall(line)
                    s.shutdown(socket.SHUT_WR)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                reply = b""
                try:
                    # The first line is the answer ({"cmd": "events"} streams more until we hang up).
                    while b"\n" not in reply and (chunk := s.recv(1 << 20)):
                        reply += chunk
                except ConnectionResetError:
                    pass
            doc = json.loads(reply.splitlines()[0]) if reply.strip() else None
            assert isinstance(doc, dict), f"control socket answered {reply[:200]!r} to {line[:200]!r}"
            tally("control", "error-reply" if "error" in doc else "answered")
            if i % 10 == 0:
                r = a.marsadm("view", "g", check=False)
                assert r.returncode == 0, f"marsadm view failed during the campaign:\n{r.stderr}"
                views += 1
            assert a.proc.poll() is None, f"marsd died:\n{a.log()}"
            assert not good.errors, f"the good client failed: {good.errors}"
    finally:
        good.stop.set()
        good.join(60)
    elapsed = time.perf_counter() - t0
    assert not good.errors, f"the good client failed: {good.errors}"
    assert good.done > 0, "the good client did no write during the campaign"
    assert a.proc.poll() is None, f"marsd died:\n{a.log()}"

    def missing() -> list[str]:
        text = a.log_path.read_text(errors="replace")
        return [reason for reason in expected if reason not in text]
    try:
        wait_until(lambda: not missing(), 30, "marsd's log to name every refused input's reason")
    except AssertionError:
        raise AssertionError(f"seed {SEED}: marsd's log does not name these refusals: {missing()[:10]}") from None
    text = a.log_path.read_text(errors="replace")
    handshakes = text.count("TLS handshake failed") + text.count("closed the connection during its TLS handshake")
    assert handshakes >= counts["peer-plain closed"] + counts["peer-tls-no-cert refused"], \
        f"{handshakes} failed TLS handshakes logged for {counts['peer-plain closed']} non-TLS clients " \
        f"and {counts['peer-tls-no-cert refused']} without a certificate"
    assert text.count("the client shows no certificate") >= counts["peer-tls-no-cert refused"]
    assert "Traceback" not in text, f"marsd logged a traceback (seed {SEED}):\n{text[-6000:]}"
    connections = sum(counts.values())
    report("fuzz (live marsd)", inputs_per_socket=INPUTS, connections=connections,
           refused_and_logged=len(expected), **{k.replace(" ", "_").replace("-", "_"): v for k, v in sorted(counts.items())},
           good_writes_verified=good.done, views=views, crashes=0, tracebacks=0,
           connections_per_s=f"{connections / elapsed:.1f}", time_s=f"{elapsed:.1f}", seed=SEED)
