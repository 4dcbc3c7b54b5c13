"""One peer link carries many requests at once (PeerClient is pipelined), over real TLS.

Why it matters: a link that sends its next request only once the previous reply is back idles
one round trip per request, so over a long path the fetcher could not fill the pipe
(docs/fault-campaign.md, bench/bench_wan.py). These tests run the real PeerClient with the
cluster's own credentials (engine/credentials.py) against a server that speaks the sans-I/O
peer protocol itself, so it can hold every reply back until it has seen all the requests (the
proof that they were sent before any reply) and answer in any order, and against the real
PeerServer, which answers a link's requests one after the other.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import pytest_asyncio

from mars.engine import credentials as C
from mars.engine.peer import protocol as P
from mars.engine.peer.link import PeerClient, PeerError, PeerServer

pytestmark = pytest.mark.asyncio

CLUSTER = "c0ffee"
NAME = "log-000000001-a"


def hello(host: str) -> P.Hello:
    return P.Hello(host=host, cluster=CLUSTER, proto=P.PROTO_VERSION, lamport_ns=1)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context of node a, client context of node b), both of one cluster CA."""
    base = tmp_path_factory.mktemp("creds")
    a, b = base / "a", base / "b"
    a.mkdir()
    b.mkdir()
    C.create_cluster_credential(a, CLUSTER)
    C.install_secret(b, C.export_secret(a))
    C.ensure_node_cert(a, "a")
    C.ensure_node_cert(b, "b")
    return C.server_context(a, "a"), C.client_context(b, "b")


def fetch(client: PeerClient, offset: int, timeout: float = 30) -> asyncio.Task[P.LogData]:
    return asyncio.ensure_future(client.request(lambda req: P.FetchRequest(
        req=req, res="r", name=NAME, offset=offset, max_bytes=4096, wait_ms=0), timeout=timeout))


def answer(msg: P.FetchRequest) -> P.LogData:
    """The bytes a request for ``offset`` gets: they name their offset, so a mix-up shows."""
    data = msg.offset.to_bytes(8, "big") * 16
    return P.LogData(req=msg.req, res=msg.res, name=msg.name, offset=msg.offset, size=msg.offset + len(data),
                     finished=False, data=data)


class RawServer:
    """Node a's end of the link, driven by hand: the test says when it answers and in what order."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.connections = 0
        self.received: asyncio.Queue[P.FetchRequest] = asyncio.Queue()
        self.links: list[tuple[P.PeerConnection, asyncio.StreamWriter]] = []
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = P.PeerConnection(hello("a"))
        writer.write(conn.initial_bytes())
        self.links.append((conn, writer))
        try:
            while True:
                ev = conn.next_event()
                if ev is P.NEED_DATA:
                    conn.receive_data(await reader.read(1 << 16))
                elif isinstance(ev, (P.Closed, P.Bye)):
                    return
                elif isinstance(ev, P.FetchRequest):
                    await self.received.put(ev)
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            writer.close()

    async def reply(self, msg: P.LogData) -> None:
        conn, writer = self.links[-1]
        writer.write(conn.send(msg))
        await writer.drain()

    async def take(self, n: int) -> list[P.FetchRequest]:
        return [await asyncio.wait_for(self.received.get(), 30) for _ in range(n)]

    async def close(self) -> None:
        for _, w in self.links:
            w.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest_asyncio.fixture
async def raw(contexts):
    server = RawServer(contexts[0])
    port = await server.start()
    client = PeerClient("127.0.0.1", port, hello("b"), contexts[1], CLUSTER)
    try:
        yield server, client
    finally:
        await client.close()
        await server.close()


async def test_eight_requests_are_on_the_wire_before_the_first_reply(raw):
    """The server receives all eight on one connection without having answered any; it answers
    in reverse order, and each caller still gets its own reply (matched by ``req``)."""
    server, client = raw
    tasks = [fetch(client, i * 4096) for i in range(8)]
    got = await server.take(8)
    assert server.connections == 1
    assert client.outstanding == 8
    assert not any(t.done() for t in tasks)
    for msg in reversed(got):
        await server.reply(answer(msg))
    replies = await asyncio.gather(*tasks)
    for i, r in enumerate(replies):
        assert r.offset == i * 4096 and r.data == (i * 4096).to_bytes(8, "big") * 16
    assert client.outstanding == 0 and client.connected


async def test_a_caller_that_gives_up_leaves_the_link_in_step(raw):
    """A cancelled request's reply still comes; it is dropped, and the replies after it reach
    their callers (a fetcher moving to a better source cancels what it asked)."""
    server, client = raw
    tasks = [fetch(client, i * 4096) for i in range(3)]
    got = await server.take(3)
    tasks[1].cancel()
    await asyncio.wait([tasks[1]])
    for msg in got:
        await server.reply(answer(msg))
    first, last = await tasks[0], await tasks[2]
    assert (first.offset, last.offset) == (0, 8192)
    again = fetch(client, 12288)
    (msg,) = await server.take(1)
    await server.reply(answer(msg))
    assert (await again).offset == 12288
    assert server.connections == 1 and client.outstanding == 0


async def test_a_reply_nobody_is_owed_ends_the_link(raw):
    """A reply for a request id that was never sent (or answered already) is the peer's
    protocol error: every caller waiting on the link is told, none waits forever."""
    server, client = raw
    tasks = [fetch(client, i * 4096) for i in range(2)]
    got = await server.take(2)
    await server.reply(answer(got[0]))
    await server.reply(answer(got[0]))  # the same reply twice
    assert (await tasks[0]).offset == 0
    with pytest.raises(PeerError, match="not due"):
        await tasks[1]
    assert not client.connected and client.outstanding == 0


async def test_a_link_closed_by_the_peer_fails_every_waiting_request(raw):
    server, client = raw
    tasks = [fetch(client, i * 4096) for i in range(4)]
    await server.take(4)
    for _, w in server.links:
        w.close()
    for t in tasks:
        with pytest.raises(PeerError):
            await t
    assert not client.connected and client.outstanding == 0


async def test_closing_the_client_fails_the_requests_still_due(raw):
    server, client = raw
    tasks = [fetch(client, i * 4096) for i in range(3)]
    await server.take(3)
    await client.close()
    for t in tasks:
        with pytest.raises(PeerError, match="closed"):
            await t


async def test_the_real_peer_server_answers_a_pipelined_link_in_order(contexts, tmp_path: Path):
    """PeerServer handles a link's requests one after the other; 64 sent at once (16 callers
    at a time) all come back right, on one connection, with a one-way push in between."""
    seen: list[int] = []
    gate = asyncio.Event()

    async def handler(msg, peer: str):
        assert peer == "b"
        if isinstance(msg, P.FetchRequest):
            if not seen:
                await gate.wait()  # the first reply waits until all are sent
            seen.append(msg.offset)
            return answer(msg)
        return None  # the push: one-way

    server = PeerServer(lambda: hello("a"), contexts[0], CLUSTER, handler)
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]
    client = PeerClient("127.0.0.1", port, hello("b"), contexts[1], CLUSTER)
    try:
        tasks = [fetch(client, i * 4096) for i in range(16)]
        while client.outstanding < 16:
            await asyncio.sleep(0)  # one event-loop turn: the callers take turns writing their frames
        await client.push(P.TreeChanges(req=0, incarnation=1, from_seq=0, seq=1, digest=0, entries=()))
        gate.set()
        for i in range(16, 64):
            tasks.append(fetch(client, i * 4096))
            done = await tasks[i - 16]
            assert done.offset == (i - 16) * 4096
        rest = await asyncio.gather(*tasks[48:])
        assert [r.offset for r in rest] == [i * 4096 for i in range(48, 64)]
        assert seen == [i * 4096 for i in range(64)]
    finally:
        await client.close()
        await server.close()
