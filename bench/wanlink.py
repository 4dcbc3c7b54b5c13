#!/usr/bin/env python3
"""A userspace WAN link: a TCP proxy with one-way delay, a rate limit, connection loss and counters.

Why a proxy: this machine has no netem (``tc`` has tbf and htb for a rate, but no delay qdisc),
and a benchmark of replication over distance needs distance. Every TCP connection accepted on
``listen`` is forwarded to ``target``; each direction of the link has its own settings:

* **delay** — a propagation delay, not a stop-and-wait: every byte leaves ``delay`` seconds after
  it entered, and bytes keep entering meanwhile, so a stream's throughput does not depend on the
  delay (as long as the sender keeps enough bytes in flight, which is what is being measured).
* **rate** — bytes/s through the bottleneck, a token bucket shared by every connection of that
  direction (as a real link is shared); 0 = unlimited. Bytes pass the bottleneck first, then the
  delay line.
* **buffer** — what the path holds: the bandwidth-delay product (rate × delay) plus ``queue``
  bytes. A connection whose receiver does not read fills it, then the proxy stops reading from the
  sender, whose TCP window closes: back-pressure as on a real path, not an unbounded memory.
* **loss** — connection-level, not packet-level (TCP retransmits lost packets anyway; what an
  application sees of a bad WAN is connections that die): each connection is reset (RST both
  ways) after an exponentially distributed lifetime of mean ``1/loss`` seconds; ``cut_all()``
  resets every open connection at once.

What it does not model: the end-to-end TCP window. The proxy terminates TCP on both sides, so a
sender never sees the round trip in its own window; on a real WAN a connection moves at most
(window / RTT), where the window is capped by ``net.ipv4.tcp_rmem``'s maximum (see ``window_ceiling``).

As a library::

    async with WanLink(("127.0.0.1", 0), ("127.0.0.2", 7777), up=Path(0.05, 125e6)) as link:
        ... link.port, link.counters ...

    with WanLink(...).thread() as link:   # from synchronous code: its own event loop in a thread
        link.set(up=Path(0.2, 125e6))       # settings change while bytes flow

From the command line::

    python bench/wanlink.py --listen 127.0.0.1:9000 --target 127.0.0.2:7777 --delay 50ms --rate 1gbit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass

READ = 256 << 10  # bytes taken from a socket at once
MIN_QUEUE = 1 << 20  # the path's queue beyond its bandwidth-delay product, at least this
UNLIMITED_BUFFER = 64 << 20  # what the path holds when it has no rate (no product to size it by)


@dataclass(frozen=True)
class Path:
    """One direction's settings: one-way ``delay`` (s), ``rate`` (bytes/s, 0 = unlimited), ``queue``
    (bytes the path holds beyond rate × delay)."""

    delay: float = 0.0
    rate: float = 0.0
    queue: int = MIN_QUEUE

    def buffer(self) -> int:
        """Bytes the path holds at most: bandwidth-delay product plus the queue."""
        if self.rate <= 0:
            return UNLIMITED_BUFFER
        return int(self.rate * self.delay) + max(self.queue, READ)


@dataclass
class Counters:
    connections: int = 0  # accepted
    open: int = 0
    peak_open: int = 0  # the most connections open at once
    lost: int = 0  # reset by the loss setting or cut_all()
    failed: int = 0  # the target refused or could not be reached
    up_bytes: int = 0  # delivered listen -> target
    down_bytes: int = 0  # delivered target -> listen
    up_peak_buffered: int = 0  # the most bytes one connection's delay line held, per direction
    down_peak_buffered: int = 0


class Bucket:
    """A token bucket: bytes pass at ``rate`` with a burst of a few milliseconds."""

    BURST_S = 0.005

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.level = 0.0
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        burst = max(self.rate * self.BURST_S, READ)
        self.level = min(burst, self.level + (now - self.at) * self.rate) - n
        self.at = now
        if self.level < 0:
            # Debt: this taker waits it off; the next one finds the bucket emptier and waits longer.
            await asyncio.sleep(-self.level / self.rate)


class _Line:
    """One direction of one connection: the bottleneck, then the delay line, then the receiver."""

    def __init__(self, link: "WanLink", up: bool, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        self.link, self.up, self.src, self.dst = link, up, src, dst
        self.items: deque[tuple[float, bytes]] = deque()  # (due, bytes), in order
        self.held = 0
        self.space = asyncio.Event()
        self.ready = asyncio.Event()
        self.eof = False

    def path(self) -> Path:
        return self.link.up if self.up else self.link.down

    async def pump_in(self) -> None:
        while True:
            data = await self.src.read(READ)
            if not data:
                break
            while self.held and self.held + len(data) > self.path().buffer():
                self.space.clear()
                await self.space.wait()  # the path is full: stop reading, the sender's window closes
            await (self.link._up_bucket if self.up else self.link._down_bucket).take(len(data))
            self.items.append((time.monotonic() + self.path().delay, data))
            self.held += len(data)
            c = self.link.counters
            if self.up:
                c.up_peak_buffered = max(c.up_peak_buffered, self.held)
            else:
                c.down_peak_buffered = max(c.down_peak_buffered, self.held)
            self.ready.set()
        self.eof = True
        self.ready.set()

    async def pump_out(self) -> None:
        while True:
            if not self.items:
                if self.eof:
                    with contextlib.suppress(OSError, RuntimeError):
                        if self.dst.can_write_eof():
                            self.dst.write_eof()  # a half-close travels too (TLS's close_notify is data)
                    return
                self.ready.clear()
                await self.ready.wait()
                continue
            due = self.items[0][0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            now = time.monotonic()
            n = 0
            while self.items and self.items[0][0] <= now:
                _, data = self.items.popleft()
                self.dst.write(data)
                n += len(data)
            await self.dst.drain()
            self.held -= n
            if self.up:
                self.link.counters.up_bytes += n
            else:
                self.link.counters.down_bytes += n
            self.space.set()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a connection that died on the way looks to both ends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class WanLink:
    """The proxy: ``listen`` (host, port; port 0 picks one) forwarded to ``target``."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], up: Path = Path(), down: Path | None = None,
                 loss: float = 0.0, seed: int | None = None, source: str | None = None) -> None:
        self.listen = listen
        self.target = target
        self.source = source  # the address the proxy's own connections to target leave from
        self.up = up
        self.down = down if down is not None else up
        self.loss = loss  # connection resets per connection-second
        self.random = random.Random(seed)
        self.counters = Counters()
        self.port = listen[1]
        self._up_bucket = Bucket(self.up.rate)
        self._down_bucket = Bucket(self.down.rate)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self._cut: set[asyncio.Task] = set()  # tasks cut_all() cancelled: lost, not closed
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- settings ------------------------------------------------------------------------------

    def set(self, up: Path | None = None, down: Path | None = None, loss: float | None = None) -> None:
        """New settings from now on (bytes already in a delay line keep their time). Thread-safe."""
        def apply() -> None:
            if up is not None:
                self.up = up
                self._up_bucket.rate = up.rate
            if down is not None:
                self.down = down
                self._down_bucket.rate = down.rate
            if loss is not None:
                self.loss = loss
        self._call(apply)

    def cut_all(self) -> int:
        """Reset every open connection now; returns how many. Thread-safe."""
        def cut() -> int:
            n = 0
            for task in list(self._conns):
                if not task.done():
                    self._cut.add(task)
                    task.cancel()
                    n += 1
            return n
        return self._call(cut)

    def _lose(self, *writers: asyncio.StreamWriter) -> None:
        self.counters.lost += 1
        for w in writers:
            _reset(w)

    def _call(self, fn):
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return fn()
        fut = asyncio.run_coroutine_threadsafe(_as_coro(fn), loop)
        return fut.result(10)

    # -- running ---------------------------------------------------------------------------------

    async def start(self) -> "WanLink":
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._accept, self.listen[0], self.listen[1], limit=2 * READ,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def __aenter__(self) -> "WanLink":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @contextlib.contextmanager
    def thread(self) -> Iterator["WanLink"]:
        """Run on an event loop of its own in a daemon thread, for synchronous callers."""
        started = threading.Event()
        stop: list[asyncio.Event] = []
        error: list[BaseException] = []

        async def main() -> None:
            try:
                await self.start()
            except BaseException as e:
                error.append(e)
                started.set()
                return
            ev = asyncio.Event()
            stop.append(ev)
            started.set()
            try:
                await ev.wait()
            finally:
                await self.close()

        t = threading.Thread(target=asyncio.run, args=(main(),), name="wanlink", daemon=True)
        t.start()
        started.wait(30)
        if error:
            raise error[0]
        try:
            yield self
        finally:
            if stop and self._loop is not None:
                self._loop.call_soon_threadsafe(stop[0].set)
            t.join(30)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.counters.connections += 1
        self.counters.open += 1
        self.counters.peak_open = max(self.counters.peak_open, self.counters.open)
        try:
            try:
                treader, twriter = await asyncio.open_connection(
                    self.target[0], self.target[1], limit=2 * READ,
                    local_addr=(self.source, 0) if self.source else None)
            except OSError:
                self.counters.failed += 1
                _reset(writer)
                return
            for w in (writer, twriter):
                sock = w.get_extra_info("socket")
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up = _Line(self, True, reader, twriter)
            down = _Line(self, False, treader, writer)
            pumps = [asyncio.ensure_future(p) for p in (up.pump_in(), up.pump_out(), down.pump_in(), down.pump_out())]
            try:
                lifetime = self.random.expovariate(self.loss) if self.loss > 0 else None
                done, pending = await asyncio.wait(pumps, timeout=lifetime, return_when=asyncio.FIRST_EXCEPTION)
                failed = any(not p.cancelled() and p.exception() is not None for p in done)
                if pending and not failed:  # the lifetime ran out with bytes still to go
                    self._lose(writer, twriter)
            except asyncio.CancelledError:
                if task not in self._cut:
                    raise
                self._lose(writer, twriter)
            finally:
                for p in pumps:
                    p.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                twriter.close()
        finally:
            self.counters.open -= 1
            self._cut.discard(task)
            self._conns.discard(task)
            writer.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _as_coro(fn):
    return fn()


def window_ceiling(rtt: float) -> float | None:
    """Bytes/s one TCP connection can move at most over ``rtt`` on this machine: the largest
    receive window autotuning may grow to (tcp_rmem's maximum) per round trip."""
    try:
        rmem_max = int(open("/proc/sys/net/ipv4/tcp_rmem").read().split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return rmem_max / rtt if rtt > 0 else None


class Nat:
    """iptables nat OUTPUT rules that put a WanLink between two local addresses; ``clear`` removes
    every one again (call it in a ``finally``).

    Locally generated connections pass the nat table's OUTPUT chain, so ``dnat(src, dst, port, to)``
    sends every new connection from ``src`` to ``dst:port`` to the proxy at ``to`` instead; the
    proxy's own connection to ``dst`` leaves from another address and is not caught. Connections
    made before the rule keep going direct (NAT is decided at a connection's first packet).
    """

    def __init__(self) -> None:
        self.rules: list[list[str]] = []

    def dnat(self, src: str, dst: str, port: int, to: str) -> list[str]:
        rule = ["OUTPUT", "-s", src, "-d", dst, "-p", "tcp", "--dport", str(port), "-j", "DNAT",
                "--to-destination", to]
        subprocess.run(["iptables", "-t", "nat", "-A", *rule], check=True, capture_output=True, text=True)
        self.rules.append(rule)
        return ["iptables", "-t", "nat", "-A", *rule]

    def clear(self) -> None:
        while self.rules:
            rule = self.rules.pop()
            r = subprocess.run(["iptables", "-t", "nat", "-D", *rule], capture_output=True, text=True)
            if r.returncode:
                print(f"warning: could not remove iptables rule {rule}: {r.stderr.strip()}", file=sys.stderr)


# -- command line ----------------------------------------------------------------------------------

def parse_seconds(text: str) -> float:
    t = text.strip().lower()
    for suffix, f in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * f
    return float(t)


def parse_rate(text: str) -> float:
    """bytes/s: 125000000, 1gbit, 100mbit, 50MiB (per second), 0 = unlimited."""
    t = text.strip().lower().removesuffix("/s").removesuffix("ps")
    bits = {"gbit": 1e9, "mbit": 1e6, "kbit": 1e3}
    for suffix, f in bits.items():
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * f / 8
    byts = {"gib": 1 << 30, "mib": 1 << 20, "kib": 1 << 10, "gb": 1e9, "mb": 1e6, "kb": 1e3, "b": 1}
    for suffix, f in byts.items():
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * f
    return float(t)


def parse_addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _cli(args: argparse.Namespace) -> None:
    up = Path(args.delay, args.rate, args.queue)
    down = Path(args.down_delay if args.down_delay is not None else args.delay,
                args.down_rate if args.down_rate is not None else args.rate, args.queue)
    link = WanLink(parse_addr(args.listen), parse_addr(args.target), up, down, args.loss, args.seed, args.source)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with link:
        print(f"wanlink {args.listen.rpartition(':')[0]}:{link.port} -> {args.target}: up {up}, down {down}, "
              f"loss {args.loss}/s", flush=True)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), args.report or None)
            if args.report or stop.is_set():
                print(json.dumps(asdict(link.counters)), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", required=True, help="HOST:PORT to accept on (port 0 picks one)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--source", default=None, help="address the forwarded connections leave from")
    p.add_argument("--delay", type=parse_seconds, default=0.0, help="one-way delay, listen -> target (50ms)")
    p.add_argument("--down-delay", type=parse_seconds, default=None, help="target -> listen (default: --delay)")
    p.add_argument("--rate", type=parse_rate, default=0.0, help="bytes/s listen -> target (1gbit, 100MiB; 0 = none)")
    p.add_argument("--down-rate", type=parse_rate, default=None, help="target -> listen (default: --rate)")
    p.add_argument("--queue", type=int, default=MIN_QUEUE, help="bytes held beyond rate x delay")
    p.add_argument("--loss", type=float, default=0.0, help="connection resets per connection-second")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--report", type=float, default=0.0, help="print the counters every N s (and at the end)")
    args = p.parse_args(argv)
    asyncio.run(_cli(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
