"""Where the data is: the pure span functions and cache (mars.engine.extents), and the device's
SEEK_DATA/SEEK_HOLE scan on a real sparse file.

The model is a byte map: every function is checked against the answer a byte-by-byte walk
gives, so a merge or a cut that loses or invents a byte fails.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from mars.engine.device import DataDevice
from mars.engine.extents import HOLE_FLAGS, ExtentCache, normalize, overlay_data, read_plan, to_nbd


@st.composite
def spans(draw, start: int = 0):
    """Contiguous (start, end, hole) spans from ``start``, as a scan returns them."""
    out, pos = [], start
    for _ in range(draw(st.integers(1, 8))):
        n = draw(st.integers(1, 300))
        out.append((pos, pos + n, draw(st.booleans())))
        pos += n
    return out


def bytemap(sp) -> dict[int, bool]:
    return {i: hole for a, b, hole in sp for i in range(a, b)}


@given(sp=spans())
def test_normalize_keeps_every_byte_and_merges(sp):
    n = normalize(sp)
    assert bytemap(n) == bytemap(sp)
    assert all(x[2] != y[2] for x, y in zip(n, n[1:]))


@settings(max_examples=300)
@given(sp=spans(), ranges=st.lists(st.tuples(st.integers(-50, 2500), st.integers(0, 400)), max_size=4))
def test_overlay_makes_writes_in_flight_data(sp, ranges):
    rs = [(a, a + n) for a, n in ranges]
    got = bytemap(overlay_data(sp, rs))
    want = {i: hole and not any(a <= i < b for a, b in rs) for i, hole in bytemap(sp).items()}
    assert got == want


@settings(max_examples=300)
@given(sp=spans(start=100), cut=st.data())
def test_to_nbd_cuts_at_the_request(sp, cut):
    end = sp[-1][1]
    offset = cut.draw(st.integers(100, end - 1))
    length = cut.draw(st.integers(1, end - offset + 50))
    ext = to_nbd(sp, offset, length)
    told = [f for n, f in ext for _ in range(n)]
    m = bytemap(sp)
    want = [HOLE_FLAGS if m[i] else 0 for i in range(offset, min(offset + length, end))]
    assert told == want


@settings(max_examples=300)
@given(sp=spans(), data=st.data(), min_hole=st.sampled_from([1, 50, 200]))
def test_read_plan_covers_the_read_and_holes_pay(sp, data, min_hole):
    end = sp[-1][1]
    offset = data.draw(st.integers(0, end - 1))
    length = data.draw(st.integers(1, end - offset + 30))  # past the scan's end: read as data
    plan = read_plan(sp, offset, length, min_hole)
    assert plan[0][0] == offset and plan[-1][1] == offset + length
    assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
    m = bytemap(sp)
    for a, b, hole in plan:
        if hole:  # only real holes, and only those long enough
            assert b - a >= min_hole and all(m.get(i) for i in range(a, b))


@settings(max_examples=200)
@given(sp=spans(start=10), data=st.data())
def test_cache_answers_what_the_scan_said_until_invalidated(sp, data):
    c = ExtentCache()
    assert c.lookup(10, 5) is None
    g = c.generation
    assert c.store(g, sp)
    end = sp[-1][1]
    offset = data.draw(st.integers(10, end - 1))
    length = data.draw(st.integers(1, 400))
    got = c.lookup(offset, length)
    assert got is not None and got[0][0] == offset
    m = bytemap(sp)
    assert bytemap(got) == {i: m[i] for i in range(offset, min(offset + length, end))}
    assert c.lookup(end, 1) is None and c.lookup(9, 1) is None
    c.invalidate()
    assert c.lookup(offset, length) is None
    # A scan that started before the invalidation must not land.
    assert not c.store(g, sp) and c.lookup(offset, length) is None


def test_scan_of_a_sparse_file(tmp_path):
    path = tmp_path / "img"
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(64 * mib)
        f.seek(8 * mib)
        f.write(b"\xab" * mib)
        f.seek(40 * mib)
        f.write(b"\xcd" * 4096)
    dev = DataDevice(path, "r")
    try:
        sp = normalize(dev.scan(0, 64 * mib))
        data = [(a, b) for a, b, hole in sp if not hole]
        assert data[0] == (8 * mib, 9 * mib)
        assert data[1][0] <= 40 * mib < 40 * mib + 4096 <= data[1][1] and len(data) == 2
        assert sp[0] == (0, 8 * mib, True) and sp[-1][1] == 64 * mib and sp[-1][2]
        # A window, and beyond the file's end (a resource grown past its image) is a hole.
        assert normalize(dev.scan(8 * mib + 10, 100)) == [(8 * mib + 10, 8 * mib + 110, False)]
        assert dev.scan(64 * mib, 4096) == [(64 * mib, 64 * mib + 4096, True)]
        # A write that only reached the page cache is data already (no fsync).
        fd = os.open(path, os.O_WRONLY)
        os.pwrite(fd, b"x" * 4096, 20 * mib)
        os.close(fd)
        assert (20 * mib, 20 * mib + 4096, False) in normalize(dev.scan(20 * mib, 4096))
        # The span cap: the caller asks again where the answer stops.
        assert len(dev.scan(0, 64 * mib, max_spans=2)) == 2
    finally:
        dev.close()


def test_primary_block_status_counts_writes_in_flight_as_data(tmp_path):
    """The primary's BLOCK_STATUS path with a write submitted and not yet written back: the
    device still has a hole there, the answer says data; once the write is answered, the cached
    window is gone and the device is asked again. Built without marsd: the runtime's extent
    state, a real sparse device and a future standing in for the logger's."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from mars.engine.nbd import protocol as nbd
    from mars.engine.roles.primary import PrimaryRuntime

    mib = 1 << 20
    path = tmp_path / "img"
    with open(path, "wb") as f:
        f.truncate(64 * mib)
    dev = DataDevice(path, "r")
    pool = ThreadPoolExecutor(2)
    rt = object.__new__(PrimaryRuntime)
    rt.device, rt.executor, rt.info = dev, pool, nbd.ExportInfo("r", 64 * mib)
    rt.extent_cache, rt._mutating = ExtentCache(), {}

    async def status(offset: int, length: int) -> list[tuple[int, int]]:
        """BLOCK_STATUS through the runtime, answered at once (cache) or after a scan."""
        answer: asyncio.Future[list[tuple[int, int]]] = asyncio.get_running_loop().create_future()

        def reply(req, exc, data=None):
            answer.set_exception(exc) if exc else answer.set_result(data)

        rt._block_status(nbd.Request(nbd.Cmd.BLOCK_STATUS, 9, offset, length, 0), reply)
        return await answer

    async def scenario() -> None:
        answered: list[tuple[int, BaseException | None]] = []
        session_reply = lambda req, exc, data=None: answered.append((req.handle, exc))  # noqa: E731
        assert await status(0, 64 * mib) == [(64 * mib, HOLE_FLAGS)]
        assert rt.extent_cache.lookup(0, 1) is not None  # the scan was cached
        write = nbd.Request(nbd.Cmd.WRITE, 1, 8 * mib, mib, 0, b"")
        logger_reply = rt._mutation(write, session_reply)
        assert rt.extent_cache.lookup(0, 1) is None  # submitting dropped it
        # Nothing on the device yet, and still: data where the write goes.
        assert await status(0, 64 * mib) == [(8 * mib, HOLE_FLAGS), (mib, 0), (55 * mib, HOLE_FLAGS)]
        assert rt.extent_cache.lookup(0, 1) is None  # a scan with a write in flight is not kept
        dev.pwrite(b"\xab" * mib, 8 * mib)  # the write-back, then the acknowledgement
        logger_reply(write, None)
        assert answered == [(1, None)] and not rt._mutating
        assert await status(0, 64 * mib) == [(8 * mib, HOLE_FLAGS), (mib, 0), (55 * mib, HOLE_FLAGS)]
        # Reads of what the cached window covers: data read, holes not.
        pieces = rt._read_cached(7 * mib, 2 * mib)
        assert pieces is not None and [p if isinstance(p, int) else bytes(p) for p in pieces] == \
            [mib, b"\xab" * mib]
        trim = nbd.Request(nbd.Cmd.TRIM, 2, 8 * mib, mib, 0)
        logger_reply = rt._mutation(trim, session_reply)
        assert rt._read_cached(7 * mib, 2 * mib) is None  # in flight: the pool reads
        dev.trim(8 * mib, mib)
        logger_reply(trim, None)
        assert answered[-1] == (2, None)
        assert await status(0, 64 * mib) == [(64 * mib, HOLE_FLAGS)]

    try:
        asyncio.run(scenario())
    finally:
        pool.shutdown()
        dev.close()
