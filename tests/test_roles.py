"""The runtime's small parts that need no cluster: the log pulse and the fetcher's drain.

Both are about waiting correctly: a peer's long-polling fetch waits on the pulse instead of
polling, and a fetcher that is stopped (marsd shutting down, fetch switched off) must stop even
while it waits for requests in flight.
"""

from __future__ import annotations

import asyncio
from collections import deque

import pytest

from mars.engine.roles.fetcher import Fetcher
from mars.engine.roles.runtime import LogPulse

pytestmark = pytest.mark.asyncio


async def one_turn() -> None:
    """Let every ready task run once: one pass of the event loop, not a delay."""
    loop = asyncio.get_running_loop()
    turn = loop.create_future()
    loop.call_soon(turn.set_result, None)
    await turn


def forever() -> asyncio.Future[None]:
    """A request that never gets an answer."""
    return asyncio.ensure_future(asyncio.shield(asyncio.get_running_loop().create_future()))


async def test_a_fire_wakes_every_waiter_and_a_timeout_says_so():
    pulse = LogPulse()
    waiters = [asyncio.ensure_future(pulse.wait(30)) for _ in range(3)]
    await one_turn()  # they wait now
    pulse.fire()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert await pulse.wait(0.01) is False
    assert await pulse.wait(0) is False and await pulse.wait(-1) is False
    assert pulse._waiters == []  # nobody left behind after timeouts


async def test_a_cancelled_waiter_leaves_no_trace():
    pulse = LogPulse()
    w = asyncio.ensure_future(pulse.wait(30))
    await one_turn()
    w.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w
    assert pulse._waiters == []
    pulse.fire()  # nothing to wake: no error


async def test_drain_lets_the_fetchers_own_cancellation_through():
    """A stop while the fetcher waits for a request in flight ends the fetcher. Swallowing that
    cancellation once kept a stopping marsd fetching from a dead peer (make demo hung on it)."""
    request = forever()
    drain = asyncio.ensure_future(Fetcher._drain(deque([(0, 0, request)])))
    await one_turn()
    drain.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(drain, 5)
    request.cancel()


async def test_drain_forgets_failed_and_cancelled_requests():
    async def fails() -> None:
        raise OSError("link reset")
    failed = asyncio.ensure_future(fails())
    pending = forever()
    await Fetcher._drain(deque([(0, 0, failed), (1, 1, pending)]), cancel=True)
    assert failed.done() and pending.cancelled()


async def test_closing_a_link_lets_the_callers_cancellation_through():
    """PeerClient.close waits for the TLS close; a stop arriving then must end the caller (it
    once swallowed it, and the fetcher went on retrying a dead peer after SIGTERM)."""
    from mars.engine.peer.link import PeerClient

    class Stuck:
        """A writer whose close never completes."""

        def write(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            pass

        def is_closing(self) -> bool:
            return True

        async def wait_closed(self) -> None:
            await asyncio.get_running_loop().create_future()

    client = PeerClient("127.0.0.1", 1, None, None, None)  # type: ignore[arg-type]
    client._writer = Stuck()  # type: ignore[assignment]
    closing = asyncio.ensure_future(client.close())
    await one_turn()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(closing, 5)


async def test_a_retry_loop_stops_when_its_stop_was_swallowed():
    """A cancellation that an operation finishing at the same moment turned into its error must
    still end a retry loop (stop_if_stopping): the fetcher once retried a dead peer after SIGTERM."""
    from mars.engine.roles.runtime import stop_if_stopping
    rounds = 0

    async def retrying() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            try:
                await asyncio.get_running_loop().create_future()  # a request that is pending ...
            except asyncio.CancelledError:
                pass  # ... and whose end swallows the stop, as wait_for can in Python 3.11
            stop_if_stopping()
    task = asyncio.ensure_future(retrying())
    await one_turn()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert rounds == 1


async def test_a_replayer_whose_stop_was_swallowed_still_ends(tmp_path, monkeypatch):
    """The replayer waits for more log with wait_for, which in Python 3.11 can swallow the
    cancellation meant for the replayer itself. It then went on replaying after pause-replay,
    and a role switch waited for it for ever (marsd hung in 'marsadm primary')."""
    from concurrent.futures import ThreadPoolExecutor

    from mars.engine.device import DataDevice
    from mars.engine.log import replayer as rp
    from mars.engine.log.values import ReplayLink, log_name
    from mars.engine.tree import Tree

    tree = Tree(tmp_path / "mars", "b")
    d = tree.root / "resource-r"
    d.mkdir(parents=True)
    (d / log_name(1, "a")).touch()
    tree.set("resource-r/replay-b", ReplayLink(1, "a", 0, 0))
    img = tmp_path / "b.img"
    img.write_bytes(bytes(1 << 16))
    waits = 0
    real_wait_for = asyncio.wait_for

    async def swallowing_wait_for(aw, timeout):
        nonlocal waits
        waits += 1
        try:
            return await real_wait_for(aw, timeout)
        except asyncio.CancelledError:
            return None  # the 3.11 race: the inner wait finished as the cancel came

    monkeypatch.setattr(rp.asyncio, "wait_for", swallowing_wait_for)
    with ThreadPoolExecutor(2) as ex:
        device = DataDevice(img, "r")
        r = rp.Replayer(tree, "r", device, ex, lambda name: 0, checkpoint_interval=30)
        task = asyncio.ensure_future(r.run())
        while waits == 0:
            await one_turn()
        task.cancel()
        await asyncio.wait([task], timeout=5)  # not wait_for: it would wait for a task that never ends
        assert task.done(), "the replayer went on after its stop"
        assert task.cancelled()
        device.close()


async def test_a_link_that_times_out_says_so(monkeypatch):
    """A timeout's str() is empty: the message said 'cannot reach peer …: ' with nothing after it
    (49 such lines in a bench's logs). It names the timeout now."""
    import socket
    import ssl

    from mars.engine.peer import link
    from mars.engine.peer.link import PeerClient, PeerError

    monkeypatch.setattr(link, "CONNECT_TIMEOUT", 0.2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts the TCP connection, never answers the TLS handshake
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        client = PeerClient("127.0.0.1", silent.getsockname()[1], None, ctx, None)  # type: ignore[arg-type]
        with pytest.raises(PeerError) as err:
            await client.connect()
        assert "TimeoutError" in str(err.value)
    finally:
        silent.close()


async def test_a_secondary_cut_off_from_the_primary_fetches_from_another_member(tmp_path):
    """With no connect list the fetcher knew only the primary: a secondary that lost its link to
    it (a partition that left the other secondary reaching both) fetched nothing until the link
    came back, while the other member held every byte it lacked. The original fetches from any
    node that has the log files; tests/faults/test_fault_partition.py is the case on a real network."""
    import time

    from mars.engine.tree import Tree

    tree = Tree(tmp_path / "mars", "b")
    for h in "abc":
        tree.set(f"resource-r/data-{h}", f"/dev/{h}")
    tree.set("resource-r/primary", "a")
    f = Fetcher(tree, "r", executor=None, connect=None, on_data=lambda: None)
    assert f.sources() == ["a"], "the primary alone while it is reached"
    tree.set("actual-b/msg-peer-a", "cannot reach peer 198.18.0.2:7777: TimeoutError", durable=False)
    assert f.sources() == ["c", "a"], "cut off from it: the other member first, the primary last"
    tree.delete("actual-b/msg-peer-a", durable=False)
    assert f.sources() == ["a"], "and the primary alone again once it is reached"
    tree.set("resource-r/connect-b", "c")
    f._failed["c"] = time.monotonic()
    assert f.sources() == ["a", "c"], "a source whose fetch just failed goes last"
    f._failed["c"] -= 60
    assert f.sources() == ["c", "a"], "a connect list still comes first"


async def test_a_better_source_while_a_request_waits_ends_the_wait_quietly():
    """The request was cancelled, but cancel() only asks: reading its result at once raised
    InvalidStateError, which ended the whole fetch task, whenever a better source appeared
    while a long poll waited (a changed connect list, a source reachable again)."""
    f = Fetcher(None, "r", executor=None, connect=None, on_data=lambda: None)
    task = asyncio.ensure_future(asyncio.sleep(3600))  # poll: never ends; its cancel() takes a turn
    waiting = asyncio.ensure_future(f._reply_or_better(task))
    await one_turn()
    f._better.set()
    assert await waiting is None
    await asyncio.wait([task])
    assert task.cancelled()


async def test_a_source_with_less_than_the_published_position_is_followed_without_a_spin(tmp_path):
    """The fetcher's first requests ask for as much as the origin published (replay-<origin>),
    to fill a long path at once. A source that has less (a relay behind the origin) answers
    short, then empty: the copy holds exactly what the source has, and the fetcher then waits
    in one long poll instead of asking again and again for bytes that are not there."""
    from concurrent.futures import ThreadPoolExecutor

    from mars.engine.log.files import replay_path
    from mars.engine.log.values import LogPos, ReplayLink
    from mars.engine.peer import protocol as P
    from mars.engine.tree import Tree

    mib = 1 << 20
    blob = bytes(range(256)) * (45 * mib // 256)  # the relay has 45 MiB
    tree = Tree(tmp_path / "mars", "b")
    for h in "ab":
        tree.set(f"resource-r/data-{h}", f"/dev/{h}")
    tree.set("resource-r/primary", "a")
    tree.set(replay_path("r", "a"), str(ReplayLink.at(LogPos(1, 200 * mib, "a"))))  # the origin has 200
    (tmp_path / "mars" / "resource-r").mkdir(parents=True, exist_ok=True)
    asked: list[tuple[int, int, int]] = []
    polled = asyncio.get_running_loop().create_future()

    class Relay:
        connected = True

        async def open(self) -> None:
            pass

        async def close(self) -> None:
            pass

        async def request(self, make, timeout: float = 60.0):
            m = make(len(asked) + 1)
            asked.append((m.offset, m.max_bytes, m.wait_ms))
            if m.offset >= len(blob) and m.wait_ms:
                if not polled.done():
                    polled.set_result(m.offset)
                await asyncio.get_running_loop().create_future()  # a long poll nothing ends
            data = blob[m.offset:m.offset + m.max_bytes]
            return P.LogData(req=m.req, res="r", name=m.name, offset=m.offset, size=max(len(blob), m.offset),
                             finished=False, data=data)

    with ThreadPoolExecutor(2) as pool:
        f = Fetcher(tree, "r", executor=pool, connect=lambda host: Relay(), on_data=lambda: None)
        run = asyncio.ensure_future(f.run())
        try:
            assert await asyncio.wait_for(asyncio.shield(polled), 30) == len(blob)
            copy = tmp_path / "mars" / "resource-r" / "log-000000001-a"
            assert copy.read_bytes() == blob
            assert len(asked) <= 16, f"{len(asked)} requests for 45 MiB: {asked}"
            assert asked[0][2] == 0 and len({o for o, _, _ in asked[:8]}) == 8, "the guess filled the pipeline"
        finally:
            run.cancel()
            await asyncio.wait([run])


async def test_a_copy_this_process_wrote_is_not_read_again_at_the_next_start(tmp_path):
    """Each start of the fetch scanned every copy replay still needs, whole: with replay paused
    behind GiBs of copies, ``marsadm connect`` after a disconnect read them all before the first
    request. What this process wrote and nobody changed since is trusted (a power cut, which
    could take unsynced bytes, kills the process too); a changed copy, or a new process, scans."""
    from concurrent.futures import ThreadPoolExecutor

    from mars.engine.log.files import LogFile
    from mars.engine.log.values import LogPos
    from mars.engine.peer import protocol as P
    from mars.engine.tree import Tree

    tree = Tree(tmp_path / "mars", "b")
    (tmp_path / "mars" / "resource-r").mkdir(parents=True, exist_ok=True)
    copy = tmp_path / "mars" / "resource-r" / "log-000000001-a"
    blob = b"\x01not a log record" * 1000  # a scan would cut it at 0: no record starts here
    with ThreadPoolExecutor(1) as pool:
        f = Fetcher(tree, "r", executor=pool, connect=None, on_data=lambda: None)
        reply = P.LogData(req=1, res="r", name=copy.name, offset=0, size=len(blob), finished=False, data=blob)
        assert await f._store(copy, LogPos(1, 0, "a"), reply) == len(blob)
    lf = LogFile(1, "a", copy)
    assert f._cut_incomplete(lf) == len(blob), "what this process wrote was read again"
    assert copy.stat().st_size == len(blob)
    assert Fetcher(tree, "r", executor=None, connect=None, on_data=lambda: None)._cut_incomplete(lf) == 0, \
        "a new process must scan: its predecessor's unsynced bytes may be gone"
    copy.write_bytes(blob)  # the scan cut it to 0; written again behind the fetchers' backs
    f2 = Fetcher(tree, "r", executor=None, connect=None, on_data=lambda: None)
    f2._mine[copy.name] = (copy.stat().st_ino, len(blob) - 1)  # what it wrote itself was one byte less
    assert f2._cut_incomplete(lf) == 0, "a copy that changed since this process wrote it is scanned"
