"""marsd's counters: what happened since this marsd started, for rates and latency percentiles.

The tree says where things stand (positions, switches); it cannot say how many requests per
second a resource takes or how long a write waits for its acknowledgement, and publishing such
figures into the tree every round would replicate them to every node for nobody. So marsd
counts them in memory, one :class:`ResourceStats` per resource that outlives the runtimes
(a detach and attach keeps counting), and serves them through the control socket beside the
snapshot (``{"cmd": "snapshot"}``'s ``counters``). They start at zero when marsd starts, which
is what Prometheus's ``rate()`` expects of a counter (``started_at_s`` tells a reset apart).

Counting is on the hot path, so it is a few integer additions per request: no locks (each
figure is written by one thread: the event loop, or one resource's write-back thread for the
acknowledgement latencies, read whole by the snapshot), no per-request objects.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

__all__ = ["LATENCY_BOUNDS_S", "LatencyHistogram", "ResourceStats", "Stats"]

# Upper bounds of the acknowledged-write latency buckets, seconds: from a page-cache fdatasync
# (tens of µs) to a stalled disk; the group commit puts most writes within one fdatasync.
LATENCY_BOUNDS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)
#: The same bounds in integer nanoseconds, so an observation needs no division. Each bucket
#: holds what is at most its bound, like the seconds' bisect: a bound's own value lands in it.
_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BOUNDS_S)

# NBD commands by the names the counters carry (the protocol's own names, lower case).
COMMANDS = ("read", "write", "flush", "trim", "write_zeroes", "block_status")


class LatencyHistogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum, in seconds."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS_S) + 1)
        self.sum_ns = 0

    def observe_ns(self, ns: int) -> None:
        self.counts[bisect_left(_BOUNDS_NS, ns)] += 1
        self.sum_ns += ns

    def observe_since(self, now_ns: int, starts_ns: list[int]) -> None:
        """A group commit's acknowledgements at once: ``now_ns`` minus each start."""
        counts = self.counts
        for start in starts_ns:
            counts[bisect_left(_BOUNDS_NS, now_ns - start)] += 1
        self.sum_ns += now_ns * len(starts_ns) - sum(starts_ns)

    def to_json(self) -> dict[str, Any]:
        return {"bounds_s": list(LATENCY_BOUNDS_S), "counts": list(self.counts), "sum_s": self.sum_ns / 1e9}


class ResourceStats:
    """One resource's counters on this node, whatever role it has had since marsd started."""

    __slots__ = ("requests", "request_bytes", "log_records", "log_bytes", "group_commits", "write_latency",
                 "fetched_bytes", "replayed_bytes", "synced_bytes", "device_read_bytes")

    def __init__(self) -> None:
        self.requests = dict.fromkeys(COMMANDS, 0)
        self.request_bytes = dict.fromkeys(COMMANDS, 0)
        self.log_records = 0
        self.log_bytes = 0
        self.group_commits = 0
        self.write_latency = LatencyHistogram()
        self.fetched_bytes = 0
        self.replayed_bytes = 0
        self.synced_bytes = 0
        # Bytes NBD reads took from the data device: holes are answered without reading them, so
        # a copy of a sparse export shows here as far less than the bytes it asked for.
        self.device_read_bytes = 0

    def request(self, command: str, length: int) -> None:
        self.requests[command] += 1
        self.request_bytes[command] += length

    def to_json(self) -> dict[str, Any]:
        return {"nbd_requests": dict(self.requests), "nbd_bytes": dict(self.request_bytes),
                "log_records": self.log_records, "log_bytes": self.log_bytes,
                "group_commits": self.group_commits, "write_latency": self.write_latency.to_json(),
                "fetched_bytes": self.fetched_bytes, "replayed_bytes": self.replayed_bytes,
                "synced_bytes": self.synced_bytes, "device_read_bytes": self.device_read_bytes}


class Stats:
    """Every resource's counters of this marsd, created on first use and kept until marsd exits."""

    def __init__(self) -> None:
        self.started_at_s = time.time()
        self._resources: dict[str, ResourceStats] = {}

    def resource(self, res: str) -> ResourceStats:
        rs = self._resources.get(res)
        if rs is None:
            rs = self._resources[res] = ResourceStats()
        return rs

    def keep(self, resources: set[str]) -> None:
        """Only these resources' counters stay (those this node is a member of): a deleted resource
        or one this node left loses its counters, so an exporter shows no series for it."""
        for res in list(self._resources):
            if res not in resources:
                del self._resources[res]

    def activity(self) -> tuple:
        """A summary that changes whenever any resource did anything (marsd's quiet rounds)."""
        return tuple((r, s.log_records, s.fetched_bytes, s.replayed_bytes, s.synced_bytes, sum(s.requests.values()))
                     for r, s in self._resources.items())

    def to_json(self) -> dict[str, Any]:
        return {"started_at_s": self.started_at_s,
                "resources": {r: s.to_json() for r, s in sorted(self._resources.items())}}
