"""The bus and the control socket: marsd's live status for local tools, and why no reader can hurt marsd.

Integration tests run real marsd processes; the bus tests at the top run without one.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import Node, caught_up, run, start_pair, wait_until

from mars.engine import model
from mars.engine.daemon.bus import Bus
from mars.engine.daemon.control import finding_changes, state_changes
from mars.engine.stats import LATENCY_BOUNDS_S, LatencyHistogram
from mars.engine.model import CONTROL_NAME, MarsError, live_snapshot, request_snapshot, stream_events

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
CONNECT_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
else:
    s.sendall(b'{"cmd": "snapshot"}\\n')
    print(s.makefile("rb").readline().decode().strip())
"""


# --- the bus, in-process ------------------------------------------------------------------------

def test_a_lagging_subscriber_is_dropped_and_the_others_get_everything():
    async def main():
        bus = Bus()
        bus.bind(asyncio.get_running_loop())
        slow, fast = bus.subscribe(maxsize=3), bus.subscribe(maxsize=100)
        got = []
        for i in range(10):
            bus.publish("state", i=i)  # never blocks, whatever the readers do
            got.append(await fast.get())
        assert [e["i"] for e in got] == list(range(10))
        assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
        assert slow.lagged and bus.subscribers == 1
        assert [await slow.get() for _ in range(4)][-1] is None  # three events, then the end
        assert await slow.get() is None  # and it stays ended: a reader's loop terminates
        fast.close()
        assert await fast.get() is None and bus.subscribers == 0
    asyncio.run(main())


def test_log_records_from_any_thread_become_events_and_recent_lines():
    async def main():
        bus = Bus(recent=5)
        bus.bind(asyncio.get_running_loop())
        logger = logging.getLogger("mars.test-bus")
        logger.setLevel(logging.INFO)
        bus.attach_logging(logger)
        sub = bus.subscribe()
        try:
            threads = [threading.Thread(target=logger.warning, args=("from thread %d", i)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            events = [await asyncio.wait_for(sub.get(), 5) for _ in range(8)]
        finally:
            bus.detach_logging()
        assert sorted(e["text"] for e in events) == sorted(f"from thread {i}" for i in range(8))
        assert {(e["kind"], e["level"], e["logger"]) for e in events} == {("log", "WARNING", "mars.test-bus")}
        lines = bus.recent_lines()
        assert len(lines) == 5 and all("WARNING mars.test-bus: from thread" in ln for ln in lines)
    asyncio.run(main())


def test_changes_between_rounds():
    a = {("REPLAY_PAUSED", "r", "b"): {"code": "REPLAY_PAUSED"}, ("X", None, None): {"code": "X"}}
    b = {("REPLAY_PAUSED", "r", "b"): {"code": "REPLAY_PAUSED", "text": "new figures"}, ("Y", "r", None): {"code": "Y"}}
    assert finding_changes(a, b) == [("cleared", {"code": "X"}), ("raised", {"code": "Y"})]
    old = {("r", "b", "role"): "Secondary", (None, "b", "alive"): True}
    new = {("r", "b", "role"): "Primary", (None, "b", "alive"): True, ("r", "c", "role"): "Secondary"}
    assert state_changes(old, new) == [
        {"res": "r", "node": "b", "field": "role", "old": "Secondary", "new": "Primary"},
        {"res": "r", "node": "c", "field": "role", "old": None, "new": "Secondary"}]


# --- the socket, with real marsd ----------------------------------------------------------------

def raw_request(node: Node, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(node.mars_dir / CONTROL_NAME))
        s.sendall(payload)
        return json.loads(s.makefile("rb").readline())


def test_snapshot_over_the_socket_matches_the_tree(resource):
    node, res, img = resource
    path = node.mars_dir / CONTROL_NAME
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    reply = wait_until(lambda: (r := request_snapshot(node.mars_dir)) and res in r["snapshot"]["resources"] and r,
                       10, "marsd's snapshot to show the resource")
    assert reply["marsd_pid"] == node.proc.pid
    snap = reply["snapshot"]
    local = model.build(node.mars_dir, node.host)
    assert snap["local_host"] == "a" and snap["marsd_running"] and snap["marsd_pid"] == node.proc.pid
    assert snap["cluster_uuid"] == local.cluster_uuid == node.tree_value("uuid")
    assert sorted(snap["resources"]) == sorted(local.resources) == [res]
    assert snap["resources"][res]["members"] == local.resources[res].members == ["a"]
    assert snap["resources"][res]["size_bytes"] == 64 << 20
    assert any("started" in line for line in snap["debug_lines"])  # marsd's own log lines ride along
    assert isinstance(reply["findings"], list) and isinstance(reply["seq"], int)
    # Bad requests get an error that says what to send instead, and do not hurt marsd.
    err = raw_request(node, b'{"cmd": "reboot"}\n')
    assert "reboot" in err["error"] and "snapshot" in err["remedy"]
    err = raw_request(node, b"not json\n")
    assert "not JSON" in err["error"] and err["remedy"]
    assert request_snapshot(node.mars_dir)["marsd_pid"] == node.proc.pid


def test_only_root_may_read(node):
    path = str(node.mars_dir / CONTROL_NAME)

    def as_nobody(*args: str) -> str:
        return run([*NOBODY, *args]).stdout.strip()

    # The tree is 0700: nobody cannot even reach the socket.
    assert as_nobody(sys.executable, "-c", CONNECT_AS_NOBODY, path) == "EACCES"
    # The tool's helper says so with a remedy instead of claiming marsd is down.
    out = as_nobody(sys.executable, "-c", "import sys\nfrom mars.engine.model import request_snapshot\n"
                    "from mars.engine.errors import MarsError\n"
                    "try:\n    request_snapshot(sys.argv[1])\nexcept MarsError as e:\n    print(e)\n",
                    str(node.mars_dir))
    assert "permission denied" in out and "root" in out
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in (node.base, node.mars_dir)}
    try:
        # With the directories opened for traversal, the socket's own 0600 still refuses.
        for p in modes:
            os.chmod(p, 0o711)
        assert as_nobody(sys.executable, "-c", CONNECT_AS_NOBODY, path) == "EACCES"
        # And past a socket opened by mistake, marsd itself checks who connects (SO_PEERCRED).
        os.chmod(path, 0o666)
        reply = json.loads(as_nobody(sys.executable, "-c", CONNECT_AS_NOBODY, path))
        assert "uid 65534" in reply["error"] and "root" in reply["remedy"]
    finally:
        os.chmod(path, 0o600)
        for p, mode in modes.items():
            os.chmod(p, mode)
    assert request_snapshot(node.mars_dir)["marsd_pid"] == node.proc.pid


@pytest.fixture
def pair(workdir):
    a, b = start_pair(*workdir, "16M")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    return a, b


def test_marsds_counters_count_what_happened_and_restart_with_it(pair):
    """The counters beside the snapshot: NBD requests and bytes by command, log records, group
    commits and the acknowledged-write latency on the primary; fetched and replayed bytes on the
    secondary. A restart of marsd starts them at zero (a new started_at_s), as Prometheus expects."""
    from harness import write
    a, b = pair
    before = live_snapshot(a.mars_dir, "a")[0].counters
    assert before is not None and "r" in before.resources
    write(a, "write -P 0x31 0 256k", "write -P 0x32 1M 64k", "read 0 64k", "flush")
    wait_until(lambda: caught_up(a, b, "r"), 30, "b to catch up")
    after = live_snapshot(a.mars_dir, "a")[0].counters
    c0, c1 = before.resources["r"], after.resources["r"]
    assert c1.nbd_requests["write"] - c0.nbd_requests["write"] == 2
    assert c1.nbd_bytes["write"] - c0.nbd_bytes["write"] == (256 + 64) << 10
    assert c1.nbd_requests["read"] - c0.nbd_requests["read"] == 1 and c1.nbd_bytes["read"] - c0.nbd_bytes["read"] == 64 << 10
    assert c1.nbd_requests["flush"] > c0.nbd_requests["flush"]
    assert c1.log_records - c0.log_records == 2 and c1.log_bytes - c0.log_bytes > (256 + 64) << 10
    assert 1 <= c1.group_commits - c0.group_commits <= 2
    assert c1.write_latency.count - c0.write_latency.count == 2 and c1.write_latency.sum_s > c0.write_latency.sum_s
    assert c1.write_latency.cumulative()[-1] == (float("inf"), c1.write_latency.count)
    sec = wait_until(lambda: (c := live_snapshot(b.mars_dir, "b")[0].counters) and c.resources["r"].replayed_bytes
                     >= (256 + 64) << 10 and c, 30, "b's counters to show the replay")
    assert sec.resources["r"].fetched_bytes >= c1.log_bytes - c0.log_bytes
    assert sec.resources["r"].nbd_requests["write"] == 0  # a secondary serves no writes
    # What mars-exporter asks for: the counters alone, not the snapshot it builds from the tree anyway.
    light, answered = live_snapshot(a.mars_dir, "a", lines=False)
    assert answered and light.debug_lines == [] and light.counters.resources["r"].log_records >= c1.log_records
    assert request_snapshot(a.mars_dir, cmd="counters")["local_host"] == "a"
    a.restart()
    # A restarted primary serves (and counts) once its peer's tree came in: wait for that.
    restarted = wait_until(lambda: (c := live_snapshot(a.mars_dir, "a")[0].counters) and "r" in c.resources and c,
                           30, "a's marsd to answer and serve r")
    assert restarted.started_at_s > after.started_at_s and restarted.resources["r"].nbd_requests["write"] == 0
    a.kill()
    assert live_snapshot(a.mars_dir, "a")[0].counters is None  # no marsd, no counters: not stale ones


def read_until(events, seen: list[dict], done, what: str, timeout: float = 30) -> None:
    """Append events to ``seen`` until ``done(seen)``; the stream's own timeout and this deadline bound it."""
    deadline = time.monotonic() + timeout
    for ev in events:
        seen.append(ev)
        if done(seen):
            return
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no {what} within {timeout:g} s")


def replay_paused(change: str):
    return lambda ev: (ev["kind"] == "finding" and ev["change"] == change
                       and ev["finding"]["code"] == "REPLAY_PAUSED" and ev["finding"]["node"] == "b")


def replay_switch(new: bool):
    return lambda ev: (ev["kind"] == "state" and ev["field"] == "switch_replay" and ev["res"] == "r"
                       and ev["node"] == "b" and ev["old"] is (not new) and ev["new"] is new)


def test_events_stream_raises_and_clears_findings(pair):
    a, b = pair
    events = stream_events(b.mars_dir, timeout=30)
    first = next(events)
    assert first["marsd_pid"] == b.proc.pid and "r" in first["snapshot"]["resources"]
    seen: list[dict] = []
    try:
        b.marsadm("pause-replay", "r")
        read_until(events, seen, lambda s: any(map(replay_paused("raised"), s)) and any(map(replay_switch(False), s)),
                   "REPLAY_PAUSED raised and switch_replay off")
        raised = next(filter(replay_paused("raised"), seen))
        assert raised["finding"]["level"] == "HINT" and "resume-replay r" in raised["finding"]["remedy"]
        assert not any(map(replay_paused("cleared"), seen))
        b.marsadm("resume-replay", "r")
        read_until(events, seen, lambda s: any(map(replay_paused("cleared"), s)) and any(map(replay_switch(True), s)),
                   "REPLAY_PAUSED cleared and switch_replay on")
    finally:
        events.close()
    seqs = [ev["seq"] for ev in seen]
    assert seqs == sorted(set(seqs))  # strictly increasing


def restart_logging_debug(node: Node, res: str) -> None:
    """At debug level every control request logs a line: a flood of events on demand."""
    node.stop()
    node.start("--log-level", "debug")
    node.wait_value(f"resource-{res}/actual-{node.host}/is-primary", "1")


def test_a_slow_reader_never_blocks_marsd(resource):
    node, res, img = resource
    restart_logging_debug(node, res)
    ctl = str(node.mars_dir / CONTROL_NAME)
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(ctl)
    slow.sendall(b'{"cmd": "events"}\n')  # ...and never reads

    writes: list[subprocess.CompletedProcess[str]] = []

    def write_through_nbd():
        cmds = []
        for i in range(16):
            cmds += ["-c", f"write -P {0x40 + i} {i}M 1M"]
        writes.append(run(["qemu-io", "-f", "raw", *cmds, node.uri(res)], timeout=120))

    writer = threading.Thread(target=write_through_nbd)
    writer.start()
    worst = 0.0
    deadline = time.monotonic() + 120
    try:
        while "dropped it" not in node.log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, "the slow reader was never dropped"
            t0 = time.monotonic()
            reply = request_snapshot(node.mars_dir, timeout=5)
            worst = max(worst, time.monotonic() - t0)
            assert reply is not None and reply["marsd_pid"] == node.proc.pid
    finally:
        writer.join(120)
    assert worst < 2.0, f"a snapshot request took {worst:.2f} s while a reader stalled"
    assert writes and writes[0].returncode == 0
    r = run(["qemu-io", "-f", "raw", "-c", "read -P 0x4f 15M 1M", node.uri(res)])
    assert "Pattern verification failed" not in r.stdout + r.stderr
    # Its connection is closed: what was in flight drains, then end of file.
    slow.settimeout(10)
    while slow.recv(1 << 16):
        pass
    slow.close()


def test_a_dead_reader_leaves_marsd_healthy(resource):
    node, res, img = resource
    restart_logging_debug(node, res)
    ctl = str(node.mars_dir / CONTROL_NAME)
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(ctl)
        s.sendall(b'{"cmd": "events"}\n')
        s.close()  # gone without reading a byte
    # Each subscription ends at the hang-up, not at some later event.
    wait_until(lambda: node.log_path.read_text(errors="replace").count("events reader pid") >= 20, 20,
               "marsd to notice every dead reader")
    assert node.proc.poll() is None
    assert request_snapshot(node.mars_dir)["marsd_pid"] == node.proc.pid
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k", node.uri(res)])
    # A client that only half-closes (as socat and nc do) still gets its stream.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(ctl)
        s.sendall(b'{"cmd": "events"}\n')
        s.shutdown(socket.SHUT_WR)
        lines = s.makefile("rb")
        assert "snapshot" in json.loads(lines.readline())
        node.marsadm("pause-replay", res)  # any change; the switch is an event
        while (ev := json.loads(lines.readline()))["kind"] != "state":
            pass
        assert ev["field"] == "switch_replay" and ev["new"] is False


def test_marsd_down_tools_fall_back_to_the_tree(resource):
    node, res, img = resource
    snap, live = live_snapshot(node.mars_dir, node.host)
    assert live and snap.marsd_running and any("started" in line for line in snap.debug_lines)
    assert not live_snapshot(node.mars_dir, "other-host")[1]  # marsd answers for a, not for other-host

    events = stream_events(node.mars_dir, timeout=30)
    assert "snapshot" in next(events)
    assert node.stop() == 0  # an open stream does not hold marsd up...
    assert all(ev.get("kind") == "log" for ev in events)  # ...and ends with it
    assert not (node.mars_dir / CONTROL_NAME).exists()  # an orderly stop removes the socket
    assert request_snapshot(node.mars_dir) is None
    snap, live = live_snapshot(node.mars_dir, node.host)
    assert not live and not snap.marsd_running and res in snap.resources and snap.debug_lines == []
    with pytest.raises(MarsError, match="start marsd"):
        next(stream_events(node.mars_dir))

    node.start()
    node.kill()  # a crash leaves the socket file behind, with nobody listening
    assert (node.mars_dir / CONTROL_NAME).exists()
    assert request_snapshot(node.mars_dir) is None
    assert live_snapshot(node.mars_dir, node.host)[1] is False
    node.start()  # the stale file is replaced
    assert request_snapshot(node.mars_dir)["marsd_pid"] == node.proc.pid


@given(lat_ns=st.lists(st.one_of(st.sampled_from([round(b * 1e9) + d for b in LATENCY_BOUNDS_S for d in (-1, 0, 1)]),
                                 st.integers(0, 20 * 10**9)), max_size=40))
def test_a_group_commits_latencies_land_in_the_buckets_one_by_one_would(lat_ns):
    """The logger counts a batch's acknowledgement latencies at once, in integer nanoseconds;
    every latency, a bound's own value and its neighbours included, lands in the bucket that
    comparing its seconds with the bounds in seconds gives, and the sum is exact."""
    now = 50 * 10**9
    batch, single = LatencyHistogram(), LatencyHistogram()
    batch.observe_since(now, [now - ns for ns in lat_ns])
    for ns in lat_ns:
        single.observe_ns(ns)
    by_seconds = [0] * (len(LATENCY_BOUNDS_S) + 1)
    for ns in lat_ns:
        by_seconds[bisect.bisect_left(LATENCY_BOUNDS_S, ns / 1e9)] += 1
    assert batch.counts == single.counts == by_seconds
    assert batch.sum_ns == single.sum_ns == sum(lat_ns)
