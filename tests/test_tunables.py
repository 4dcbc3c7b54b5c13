"""The tunables (seed chapter 5) with real marsd processes: set and get, durable across a restart,
in force without one, bad values refused with their range; the load limit holding fetch and the
traffic limits slowing a catch-up, lifted at once.

Timing is asserted loosely (a limit makes a catch-up take at least a share of what it should; a
lifted one lets it finish well before the limit would): the figure against the limit itself
is bench/bench_traffic.py's, on a quiet machine.
"""

from __future__ import annotations

import os
import time

import pytest

from harness import caught_up, start_pair, wait_until, write

from mars.engine import model

MiB = 1 << 20


@pytest.fixture
def pair(workdir):
    return start_pair(*workdir, "48M")


def in_force(n, name: str) -> str | None:
    return n.tree_value(f"actual-{n.host}/tunable-{name}")


def test_set_get_live_durable_and_default(node):
    # In force without a restart: set waits until marsd reports the new value.
    r = node.marsadm("set-traffic-out-limit-value", "20M")
    assert "in force" in r.stderr
    assert in_force(node, "traffic-out-limit") == str(20 * MiB)
    assert node.tree_value("defaults-a/traffic-out-limit") == str(20 * MiB)
    assert node.marsadm("get-traffic-out-limit-value").stdout.strip() == str(20 * MiB)
    node.marsadm("set-loadavg-limit-value", "7.5")
    node.marsadm("set-logdel-auto-value", "on")
    # The original's names of the sync limit still work, and set the same entry.
    node.marsadm("set-global-sync-limit-value", "3")
    assert node.marsadm("get-sync-limit-value").stdout.strip() == "3"
    assert node.marsadm("view-global-sync-limit-value").stdout.strip() == "3"
    # --logrot-auto is the default while the tree sets none.
    assert in_force(node, "logrot-auto") == str(4 << 30)
    node.marsadm("set-logrot-auto-value", "2M")
    assert in_force(node, "logrot-auto") == str(2 * MiB)
    listing = node.marsadm("tunables").stdout
    row = next(line for line in listing.splitlines() if line.startswith("traffic-out-limit "))
    assert row.split()[1:3] == ["20.0", "MiB/s"] or "20" in row.split()[1], listing

    # Durable: a restarted marsd runs with what the tree says.
    node.restart()
    wait_until(lambda: in_force(node, "traffic-out-limit") == str(20 * MiB) and in_force(node, "loadavg-limit")
               == "7.5" and in_force(node, "logrot-auto") == str(2 * MiB), 20, "the set values after a restart")
    assert in_force(node, "logdel-auto") == "1" and in_force(node, "sync-limit") == "3"

    # 'default' removes the set value: the command line's figure is back in force.
    node.marsadm("set-logrot-auto-value", "default")
    wait_until(lambda: in_force(node, "logrot-auto") == str(4 << 30), 20, "logrot-auto back to --logrot-auto")
    assert node.tree_value("defaults-a/logrot-auto") is None

    # The model shows set beside in force, with the unit.
    snap = model.build(node.mars_dir, "a")
    t = snap.nodes["a"].tunable("traffic-out-limit")
    assert t is not None and t.set_value == str(20 * MiB) and t.actual_value == str(20 * MiB)


@pytest.mark.parametrize("name, bad, why", [
    ("traffic-out-limit", "-5M", "negative"),
    ("traffic-in-limit", "20X", "not a rate"),
    ("io-limit", "fast", "not a rate"),
    ("loadavg-limit", "nan", "not a number"),
    ("loadavg-limit", "high", "not a number"),
    ("sync-limit", "1.5", "not a whole number"),
    ("logdel-auto", "2", "not 0 or 1"),
    ("mem-limit", "1M", "out of range"),
    ("logrot-auto", "4Q", "not a size"),
])
def test_bad_values_are_refused_with_the_range(node, name, bad, why):
    before = node.tree_value(f"defaults-a/{name}")
    r = node.marsadm(f"set-{name}-value", "--", bad, check=False)
    assert r.returncode == 2, r.stderr
    assert why in r.stderr and "give " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert node.tree_value(f"defaults-a/{name}") == before


def test_unknown_argument_shapes_are_usage_errors(node):
    r = node.marsadm("set-traffic-out-limit-value", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_load_limit_holds_fetch_and_says_why(pair):
    a, b = pair
    if os.getloadavg()[0] < 0.05:
        pytest.skip("the machine is idle: no load limit lies below its load")
    write(a, "write -P 0x11 0 1M")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    b.marsadm("set-loadavg-limit-value", "0.01")
    wait_until(lambda: b.tree_value("resource-r/actual-b/is-copying") == "0"
               and b.tree_value("resource-r/actual-b/msg-warn-loadavg"), 20, "b's fetch to be held")
    assert "loadavg-limit 0.01" in b.tree_value("resource-r/actual-b/msg-warn-loadavg")
    assert b.tree_value("resource-r/todo-b/connect") == "1"  # held, not switched off
    write(a, "write -P 0x22 1M 1M")
    # The status says why and what to do, on every node.
    wait_until(lambda: any(f.code == "FETCH_HELD" for f in model.findings(model.build(a.mars_dir, "a"))), 20,
               "FETCH_HELD on a")
    held = next(f for f in model.findings(model.build(b.mars_dir, "b")) if f.code == "FETCH_HELD")
    assert held.node == "b" and "set-loadavg-limit-value" in held.remedy
    assert not caught_up(a, b, "r")
    # Raised above the load: fetch goes on and b catches up.
    b.marsadm("set-loadavg-limit-value", "1000")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up after the limit was raised")
    assert b.tree_value("resource-r/actual-b/msg-warn-loadavg") is None


def test_traffic_limits_slow_a_catch_up_and_lifting_restores_it(pair):
    a, b = pair
    write(a, "write -P 0x01 0 1M")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    # The incoming limit of the fetching node: 10 MiB at 2 MiB/s take about 5 s.
    b.marsadm("set-traffic-in-limit-value", "2M")
    start = time.monotonic()
    write(a, "write -P 0x02 1M 10M")
    wait_until(lambda: caught_up(a, b, "r"), 60, "b to catch up at 2 MiB/s")
    took = time.monotonic() - start
    assert took >= 3.0, f"10 MiB at 2 MiB/s in {took:.1f} s"
    b.marsadm("set-traffic-in-limit-value", "0")
    # The outgoing limit of the serving node, lifted in the middle: 24 MiB at 1 MiB/s would
    # take 24 s, without the limit it is done in a few.
    a.marsadm("set-traffic-out-limit-value", "1M")
    write(a, "write -P 0x03 11M 24M")
    wait_until(lambda: int(b.tree_value("resource-r/actual-b/fetch-bytes") or 0) > 0, 20, "the fetch to begin")
    lifted = time.monotonic()
    a.marsadm("set-traffic-out-limit-value", "0")
    wait_until(lambda: caught_up(a, b, "r"), 60, "b to catch up after the limit was lifted")
    took = time.monotonic() - lifted
    assert took < 15.0, f"the rest of 24 MiB took {took:.1f} s after lifting a 1 MiB/s limit"


def test_a_lifted_rate_limit_releases_its_waiters_at_once():
    """The bucket alone: 8 MiB at 1 MiB/s would take 8 s; lifted after 0.3 s they go at once."""
    import asyncio

    from mars.engine.ratelimit import RateLimit

    async def go() -> tuple[float, float]:
        limit = RateLimit(MiB)
        t0 = time.monotonic()

        async def send() -> None:
            for _ in range(32):
                await limit.take(256 << 10)

        task = asyncio.ensure_future(send())
        await asyncio.sleep(0.3)  # poll: let it run into the limit
        held = limit.bytes
        limit.set_rate(0)
        await asyncio.wait_for(task, 2)
        return held, time.monotonic() - t0

    held, took = asyncio.run(go())
    assert held <= 1.5 * MiB, f"{held} bytes passed in 0.3 s at 1 MiB/s"
    assert took < 1.5, f"lifting took {took:.1f} s to release"
