"""Token buckets whose rate an operator changes while bytes flow (traffic-*-limit, io-limit).

Why not a sleep per chunk: a 16 MiB fetch reply at 20 MiB/s would hold its link for most of a
second in one sleep, and lifting the limit would only take effect after it. Here the bytes are
charged in slices as they go, a waiter sleeps only for its own debt, and a change of the rate
wakes every waiter at once: a lifted limit gives the full rate in the same moment, a lowered
one holds from the next slice on. Rate 0 means no limit and costs one comparison.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

#: The bucket holds this many seconds of the rate (and never less than MIN_BURST): a short
#: burst stays within a tenth of a second of the average, and a slice never waits alone.
BURST_S = 0.1
MIN_BURST = 256 << 10


class RateLimit:
    """Bytes per second through one direction of one node, shared by every stream that passes."""

    def __init__(self, rate: float = 0) -> None:
        self.rate = float(rate)
        self.bytes = 0  # everything charged since start: what passed, limited or not
        self._level = 0.0  # tokens in the bucket; negative: debt the takers wait off
        self._at = time.monotonic()
        self._changed: asyncio.Event | None = None

    def _burst(self) -> float:
        return max(self.rate * BURST_S, MIN_BURST)

    def _refill(self) -> None:
        now = time.monotonic()
        if self.rate > 0:
            self._level = min(self._burst(), self._level + (now - self._at) * self.rate)
        self._at = now

    def set_rate(self, rate: float) -> None:
        """A new rate in force from now on; waiters re-reckon their debt at once."""
        rate = float(rate)
        if rate == self.rate:
            return
        self._refill()
        if self.rate > 0 and rate > 0:
            self._level *= rate / self.rate  # the same time of debt left, not the same bytes
        else:
            self._level = 0.0
        self.rate = rate
        self._at = time.monotonic()
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def take(self, n: int) -> None:
        """Charge ``n`` bytes; return when the bucket has paid for them at the rate in force."""
        self.bytes += n
        if self.rate <= 0:
            return
        self._refill()
        self._level -= n
        while self._level < 0 and self.rate > 0:
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), -self._level / self.rate)
            except asyncio.TimeoutError:
                pass
            self._refill()


@dataclass
class Traffic:
    """A node's peer-link limits: what it sends as the serving end of fetch and sync (``out``),
    and what it receives on its own fetch and sync links (``inn``). The tree exchange is not
    charged: it is a few entries a round, and holding it back would make live nodes look dead."""

    out: RateLimit = field(default_factory=RateLimit)
    inn: RateLimit = field(default_factory=RateLimit)
