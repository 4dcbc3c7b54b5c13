"""The userspace WAN link (bench/wanlink.py) that bench/bench_wan.py puts between the nodes.

A benchmark over a simulated distance is only as good as the simulation: these checks measure,
on real loopback sockets, that the delay is a propagation delay (not a stop-and-wait), that the
rate holds, that the bytes arrive intact and in order, that a receiver that does not read is
held back by a bounded buffer, and that loss resets connections. Each prints its seed on failure.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sys
import time
from pathlib import Path as FsPath

import pytest

sys.path.insert(0, str(FsPath(__file__).resolve().parents[2] / "bench"))
from wanlink import Path, WanLink, parse_rate, parse_seconds  # noqa: E402

MIB = 1 << 20


class Sink:
    """A target server: notes when each byte arrives, echoes what it gets when asked to."""

    def __init__(self, echo: bool = True, read: bool = True) -> None:
        self.echo, self.read = echo, read
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time, bytes)
        self.hash = hashlib.sha256()
        self.got = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not self.read:
                await asyncio.sleep(3600)  # poll: a receiver that never reads (cancelled at the end)
            while data := await reader.read(1 << 16):
                self.arrivals.append((time.monotonic(), len(data)))
                self.hash.update(data)
                self.got += len(data)
                if self.echo:
                    writer.write(data)
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


def test_delay_rate_order():
    """One-way delays each way as set, the rate within 10 %, 4 MiB intact and in order, and the
    transfer takes size / rate + delay: bytes keep entering while earlier ones are on the way."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    payload = rnd.randbytes(4 * MIB)
    up, down, rate = 0.100, 0.030, 16 * MIB

    async def main():
        sink = Sink()
        port = await sink.start()
        async with WanLink(("127.0.0.1", 0), ("127.0.0.1", port), Path(up, rate), Path(down, rate)) as link:
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            t0 = time.monotonic()
            w.write(b"x")
            await w.drain()
            assert await r.readexactly(1) == b"x"
            t2 = time.monotonic()
            t1 = sink.arrivals[0][0]
            assert up - 0.005 <= t1 - t0 <= up + 0.030, f"up delay {t1 - t0:.3f} s, set {up} (seed {seed})"
            assert down - 0.005 <= t2 - t1 <= down + 0.030, f"down delay {t2 - t1:.3f} s, set {down} (seed {seed})"

            sink.arrivals.clear()
            back = bytearray()

            async def reader():
                while len(back) < len(payload):
                    back.extend(await r.read(1 << 20))
            rd = asyncio.ensure_future(reader())
            t0 = time.monotonic()
            for i in range(0, len(payload), 64 << 10):
                w.write(payload[i:i + (64 << 10)])
                await w.drain()
            await rd
            total = time.monotonic() - t0
            first, last = sink.arrivals[0][0], sink.arrivals[-1][0]
            measured = (sink.got - 1 - sink.arrivals[0][1]) / (last - first)
            assert abs(measured / rate - 1) < 0.10, f"rate {measured / MIB:.2f} MiB/s, set {rate / MIB} (seed {seed})"
            assert first - t0 >= up - 0.005, f"first byte after {first - t0:.3f} s, before the delay (seed {seed})"
            # a stop-and-wait of 256 KiB pieces would take 16 round trips (over 2 s); a delay line
            # takes the transfer time plus one trip each way
            ideal = len(payload) / rate + up + down
            assert total < ideal + 0.25, f"4 MiB took {total:.2f} s, ideal {ideal:.2f} s (seed {seed})"
            assert bytes(back) == payload, f"echoed bytes differ (seed {seed})"
            assert link.counters.up_bytes == len(payload) + 1 == link.counters.down_bytes
            w.close()
        sink.close()
    run(main())


def test_backpressure_bounded():
    """A receiver that does not read: the path fills to its bandwidth-delay product plus queue
    and no further, then the proxy stops reading and the sender's writes block, as on a real path."""
    p = Path(0.05, 8 * MIB, queue=1 * MIB)

    async def main():
        sink = Sink(read=False)
        port = await sink.start()
        async with WanLink(("127.0.0.1", 0), ("127.0.0.1", port), p) as link:
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            chunk = os.urandom(1 * MIB)
            sent = 0

            async def writer():
                nonlocal sent
                while True:
                    w.write(chunk)
                    await w.drain()
                    sent += len(chunk)
            wt = asyncio.ensure_future(writer())
            deadline = time.monotonic() + 5
            while link.counters.up_peak_buffered < p.buffer() - (256 << 10):
                assert time.monotonic() < deadline, f"the path never filled: {link.counters}"
                await asyncio.sleep(0.02)  # poll
            held = link.counters.up_peak_buffered
            assert held <= p.buffer() + (256 << 10), f"path held {held} B, bound {p.buffer()}"
            # Full. The kernel's socket buffers (the sender's, the link's receive side) may still
            # take a few MiB after the path is full, more slowly on a loaded machine: wait until
            # the sender stands still, then nothing may move.
            deadline = time.monotonic() + 10
            while True:
                before = sent
                await asyncio.sleep(0.25)  # poll: did the sender move in this window?
                if sent == before:
                    break
                assert time.monotonic() < deadline, f"the sender never stopped: {sent} B sent, {link.counters}"
            sent0, delivered0 = sent, link.counters.up_bytes
            await asyncio.sleep(0.5)  # poll: a window of 4 MiB at the rate, in which nothing may move
            assert sent - sent0 <= 1 * MIB and link.counters.up_bytes == delivered0, \
                f"still moving into a receiver that reads nothing: {sent - sent0} B sent, {link.counters}"
            assert link.counters.up_peak_buffered <= p.buffer() + (256 << 10)
            wt.cancel()
            w.close()
        sink.close()
    run(main())


def test_loss_resets_connections():
    """loss = 4 per second: a connection dies within a second or so, with an error at the client
    (a reset, not a clean end); a new one works; cut_all() resets every open one at once."""
    seed = random.randrange(1 << 30)

    async def main():
        sink = Sink()
        port = await sink.start()
        async with WanLink(("127.0.0.1", 0), ("127.0.0.1", port), Path(0.005), loss=4.0, seed=seed) as link:
            r, w = await asyncio.open_connection("127.0.0.1", link.port)
            t0 = time.monotonic()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                while time.monotonic() - t0 < 5:
                    w.write(b"ping")
                    await w.drain()
                    assert await r.readexactly(4) == b"ping"
            assert link.counters.lost == 1, f"counters {link.counters} (seed {seed})"
            w.close()
            link.set(loss=0.0)
            conns = [await asyncio.open_connection("127.0.0.1", link.port) for _ in range(3)]
            for r, w in conns:
                w.write(b"ok")
                assert await r.readexactly(2) == b"ok"
            assert link.cut_all() == 3
            for r, w in conns:
                with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                    await r.readexactly(1)
                w.close()
            assert link.counters.lost == 4
        sink.close()
    run(main())


def test_parse_units():
    assert parse_rate("1gbit") == 125e6
    assert parse_rate("50MiB") == 50 * MIB
    assert parse_seconds("200ms") == pytest.approx(0.2)
