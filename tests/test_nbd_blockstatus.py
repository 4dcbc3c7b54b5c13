"""Holes visible to real NBD clients: nbdinfo --map, qemu-img map, nbdcopy and qemu-img convert
against a real marsd serving a sparse image (issue 18).

marsd runs with a checkpoint interval of an hour, so after the first checkpoint nothing written
is synced to the data device: the writes these tests map are durable only in the log, as the
replay position (still behind the log's end) proves, and must show as data all the same.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess

import pytest

from harness import Node, run, wait_until

from mars.engine.log.files import read_replay
from mars.engine.log.values import LogPos
from mars.engine.model.client import live_snapshot
from mars.engine.tree import Tree, actual

MIB = 1 << 20
SIZE = 1 << 30  # 1 GiB sparse image
HOLE, DATA = 3, 0  # nbdinfo --map types: hole,zero and data


@pytest.fixture
def sparse(workdir):
    """Node a serving resource r on a 1 GiB sparse image, no checkpoint after the first."""
    base, nodes = workdir
    n = Node(base, "a", "127.0.0.2")
    nodes.append(n)
    n.extra_args = ["--checkpoint-interval", "3600"]
    n.create_cluster()
    n.start()
    img = base / "r.img"
    n.marsadm("create-resource", "r", str(img), "1G")
    # One write and the one checkpoint it triggers: afterwards the replay position stands still.
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 4k", n.uri("r")])
    wait_until(lambda: (r := _replay(n)) is not None and r.offset > 0 and r == _log_end(n), 30,
               "the first checkpoint")
    return n, img


def _tree(node: Node) -> Tree:
    return Tree(node.mars_dir, node.host)


def _replay(node: Node) -> LogPos | None:
    link = read_replay(_tree(node), "r", node.host)
    return link.logpos if link else None


def _log_end(node: Node) -> LogPos | None:
    return LogPos.parse(_tree(node).get(actual("r", node.host, "log-pos")) or "")


def _behind(node: Node) -> bool:
    """The replay position (what a sync made safe on the device) is behind the log's end."""
    r, e = _replay(node), _log_end(node)
    return r is not None and e is not None and (r.seq, r.offset) < (e.seq, e.offset)


def nbd_map(node: Node) -> list[tuple[int, int, int]]:
    """(offset, length, type) of nbdinfo --map, merged where the type repeats."""
    out = json.loads(run(["nbdinfo", "--map", "--json", node.uri("r")]).stdout)
    merged: list[list[int]] = []
    for e in out:
        if merged and merged[-1][2] == e["type"]:
            merged[-1][1] += e["length"]
        else:
            merged.append([e["offset"], e["length"], e["type"]])
    return [tuple(m) for m in merged]  # type: ignore[misc]


def data_ranges(extents) -> list[tuple[int, int]]:
    return [(o, o + n) for o, n, t in extents if t == DATA]


def device_read_bytes(node: Node) -> int:
    c = live_snapshot(node.mars_dir, node.host)[0].counters
    assert c is not None
    return c.resources["r"].device_read_bytes


def test_map_shows_holes_and_data_while_writes_are_only_in_the_log(sparse):
    node, img = sparse
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 4M 1M", "-c", "write -P 0xcd 100M 64k",
         "-c", "write -P 0xef 1020M 4M", node.uri("r")])
    # Only in the log: acknowledged, yet no checkpoint synced the device or moved replay.
    wait_until(lambda: _log_end(node) != _replay(node), 30, "the log end to be published")
    assert _behind(node)
    m = nbd_map(node)
    assert data_ranges(m) == [(0, 4096), (4 * MIB, 5 * MIB), (100 * MIB, 100 * MIB + 64 * 1024),
                              (1020 * MIB, 1024 * MIB)]
    assert m[1] == (4096, 4 * MIB - 4096, HOLE) and sum(n for _, n, _ in m) == SIZE
    assert _behind(node), "a checkpoint ran meanwhile: the test proved nothing"


def test_cache_follows_writes_trims_and_zeroes(sparse):
    """Each map fills the server's cached window; each change must show in the next map."""
    node, img = sparse
    uri = node.uri("r")
    assert data_ranges(nbd_map(node)) == [(0, 4096)]
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 200M 128k", uri])
    assert data_ranges(nbd_map(node)) == [(0, 4096), (200 * MIB, 200 * MIB + 128 * 1024)]
    # Reads the cached window covers are answered from it on the event loop: the data is there.
    r = run(["qemu-io", "-f", "raw", "-c", "read -P 0x11 200M 128k", "-c", "read -P 0 199M 1M", uri])
    assert "Pattern verification failed" not in r.stdout + r.stderr
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 300M 64k", uri])  # into a hole the cache held
    r = run(["qemu-io", "-f", "raw", "-c", "read -P 0x22 300M 64k", uri])
    assert "Pattern verification failed" not in r.stdout + r.stderr
    assert data_ranges(nbd_map(node))[-1] == (300 * MIB, 300 * MIB + 64 * 1024)
    run(["qemu-io", "-f", "raw", "-c", "discard 300M 64k", uri])
    run(["qemu-io", "-f", "raw", "-c", "discard 200M 64k", uri])
    assert data_ranges(nbd_map(node)) == [(0, 4096), (200 * MIB + 64 * 1024, 200 * MIB + 128 * 1024)]
    run(["qemu-io", "-f", "raw", "-c", "write -z -u 200M 128k", uri])  # zeroes that may punch
    assert data_ranges(nbd_map(node)) == [(0, 4096)]
    r = run(["qemu-io", "-f", "raw", "-c", "read -P 0 200M 128k", "-c", "read -P 0x01 0 4k", uri])
    assert "Pattern verification failed" not in r.stdout + r.stderr


def test_qemu_img_map_agrees_with_nbdinfo(sparse):
    node, img = sparse
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xab 8M 3M", "-c", "write -P 0xcd 512M 4k", node.uri("r")])
    qm = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", node.uri("r")]).stdout)
    q: list[list[int]] = []
    for e in qm:
        t = DATA if e["data"] else HOLE
        assert e["zero"] == (not e["data"])
        if q and q[-1][2] == t:
            q[-1][1] += e["length"]
        else:
            q.append([e["start"], e["length"], t])
    assert [tuple(x) for x in q] == nbd_map(node)
    assert data_ranges(nbd_map(node)) == [(0, 4096), (8 * MIB, 11 * MIB), (512 * MIB, 512 * MIB + 4096)]


@pytest.mark.parametrize("copier", ["nbdcopy", "nbdcopy-null", "qemu-img"])
def test_copies_read_only_the_allocated_parts(sparse, copier):
    node, img = sparse
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 16M 2M", "-c", "write -P 0xa5 700M 1M", node.uri("r")])
    out = node.base / "copy.img"
    before = device_read_bytes(node)
    if copier == "nbdcopy":
        run(["nbdcopy", node.uri("r"), str(out)])
    elif copier == "nbdcopy-null":
        run(["nbdcopy", node.uri("r"), "null:"])
    else:
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", node.uri("r"), str(out)])
    read = device_read_bytes(node) - before
    allocated = 4096 + 3 * MIB
    # Everything allocated was read, and nothing much besides: not the 1 GiB of the device.
    assert allocated <= read <= allocated + 4 * MIB, read
    if copier != "nbdcopy-null":
        assert subprocess.run(["cmp", str(img), str(out)]).returncode == 0
        assert out.stat().st_size == SIZE


def test_old_clients_without_structured_replies(sparse):
    """A client that asks for no structured replies gets simple ones, holes as zeros, and no
    meta context; plain nbdinfo still works."""
    nbd = pytest.importorskip("nbd")
    node, img = sparse
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 128k", node.uri("r")])
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.add_meta_context("base:allocation")
    h.connect_uri(node.uri("r"))
    try:
        assert not h.get_structured_replies_negotiated()
        assert not h.can_meta_context("base:allocation")
        data = h.pread(512 * 1024, 768 * 1024)  # hole, data, hole
        assert data == bytes(256 * 1024) + b"\x77" * 128 * 1024 + bytes(128 * 1024)
        with pytest.raises(nbd.Error):
            h.block_status(4096, 0, lambda *a: 0)
    finally:
        h.shutdown()
    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.connect_uri(node.uri("r"))
    try:
        assert h.get_structured_replies_negotiated() and h.can_meta_context("base:allocation")
        seen: list[int] = []
        h.block_status(2 * MIB, 4096, lambda ctx, off, ents, err: seen.extend(ents) or 0,
                       nbd.CMD_FLAG_REQ_ONE)
        assert seen == [MIB - 4096, HOLE]  # exactly one extent: the hole up to the data at 1 MiB
        seen.clear()
        h.block_status(2 * MIB, 4096, lambda ctx, off, ents, err: seen.extend(ents) or 0)
        assert seen == [MIB - 4096, HOLE, 128 * 1024, DATA, MIB - 128 * 1024 + 4096, HOLE]  # cut at the end asked
        assert h.pread(128 * 1024, MIB) == b"\x77" * 128 * 1024
        # The same read as above, now structured: the holes come as hole chunks, not as zeros.
        chunks: list[tuple[int, int, int]] = []
        data = h.pread_structured(512 * 1024, 768 * 1024,
                                  lambda buf, off, status, err: chunks.append((off, len(buf), status)) or 0)
        assert data == bytes(256 * 1024) + b"\x77" * 128 * 1024 + bytes(128 * 1024)
        assert sorted(chunks) == [(768 * 1024, 256 * 1024, nbd.READ_HOLE), (MIB, 128 * 1024, nbd.READ_DATA),
                                  (MIB + 128 * 1024, 128 * 1024, nbd.READ_HOLE)]
    finally:
        h.shutdown()
    r = run(["nbdinfo", node.uri("r")])
    assert "export-size: 1073741824" in r.stdout and "base:allocation" in r.stdout
    assert "block_size_preferred: 4096" in r.stdout and "block_size_maximum: 33554432" in r.stdout


def _opt(s: socket.socket, opt: int, data: bytes) -> list[tuple[int, bytes]]:
    s.sendall(struct.pack(">QII", 0x49484156454F5054, opt, len(data)) + data)
    replies = []
    while True:
        head = _recv(s, 20)
        _, _, rtype, length = struct.unpack(">QIII", head)
        replies.append((rtype, _recv(s, length)))
        if rtype == 1 or rtype & (1 << 31):
            return replies


def _recv(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def test_malformed_meta_context_options_get_err_invalid(sparse):
    node, img = sparse
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(node.nbd_sock))
    try:
        _recv(s, 18)
        s.sendall(struct.pack(">I", 3))
        err_invalid = (1 << 31) | 3
        # Before structured replies: refused, not served.
        assert _opt(s, 10, struct.pack(">I", 1) + b"r" + struct.pack(">I", 0))[0][0] == err_invalid
        assert _opt(s, 8, b"") == [(1, b"")]
        for bad in (b"", struct.pack(">I", 99) + b"r", struct.pack(">I", 1) + b"r" + struct.pack(">II", 5, 1),
                    struct.pack(">I", 1) + b"r" + struct.pack(">II", 1, 4) + b"nope"):
            for opt in (9, 10):
                (rtype, msg), = _opt(s, opt, bad)
                assert rtype == err_invalid and msg
        listed = _opt(s, 9, struct.pack(">I", 1) + b"r" + struct.pack(">II", 1, 5) + b"base:")
        assert listed == [(4, struct.pack(">I", 0) + b"base:allocation"), (1, b"")]
    finally:
        s.close()
    assert "Traceback" not in node.log()
    assert data_ranges(nbd_map(node)) == [(0, 4096)]


def test_map_after_an_online_resize(sparse):
    """The grown region shows what the grown device holds (here: data written into the image
    before the resize, as a grown LV holds old blocks), and the rest of it as a hole."""
    node, img = sparse
    assert data_ranges(nbd_map(node)) == [(0, 4096)]  # fills the cached window up to the old end
    with open(img, "r+b") as f:
        f.truncate(2 * SIZE)
        f.seek(SIZE + 8 * MIB)
        f.write(b"\x5e" * MIB)
    wait_until(lambda: node.tree_value("resource-r/actsize-a") == str(2 * SIZE), 30, "marsd to report the grown disk")
    out = node.marsadm("resize", "r").stderr
    assert "grown" in out, out
    wait_until(lambda: json.loads(run(["nbdinfo", "--json", node.uri("r")]).stdout)["exports"][0]["export-size"]
               == 2 * SIZE, 30, "the export to show the new size")
    m = nbd_map(node)
    assert sum(n for _, n, _ in m) == 2 * SIZE
    assert data_ranges(m) == [(0, 4096), (SIZE + 8 * MIB, SIZE + 9 * MIB)]
    r = run(["qemu-io", "-f", "raw", "-c", f"read -P 0x5e {SIZE + 8 * MIB} 1M", node.uri("r")])
    assert "Pattern verification failed" not in r.stdout + r.stderr
