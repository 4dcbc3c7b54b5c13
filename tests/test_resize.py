"""Online resize (marsadm resize) and a data device used up to its last byte, with real marsd
processes and real NBD clients. Named after the original's test scenarios ``resizing`` and
``datadev_full`` (test_suite/mars/test_cases/admin/).

Why the new region holds data before the resize: a grown LV holds whatever was on the disk
before, and the primary's copy of it is what the secondaries must end up with. Written straight
into the primary's image (not through MARS), it is what the sync of the new region has to copy,
and all it may copy: the counters prove that the old region is not copied again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import nbd  # python3-libnbd: one connection that stays open across the resize
import pytest

from harness import Node, caught_up, run, sha256, three_members, wait_until, write

MiB = 1 << 20
OLD, NEW = 64 * MiB, 128 * MiB
NEW_DATA = 8 * MiB  # what the grown region of the primary's disk holds before the resize


def image(n: Node) -> Path:
    return n.base / f"{n.host}.img"


def synced(a: Node, *others: Node) -> bool:
    return all(caught_up(a, o, "r") for o in others)


def counter(n: Node, name: str) -> int:
    return int(n.tree_value(f"resource-r/actual-{n.host}/{name}") or 0)


def export_size(a: Node) -> int:
    return json.loads(run(["nbdinfo", "--json", a.uri("r")]).stdout)["exports"][0]["export-size"]


def grow_disks(*nodes: Node, size: int = NEW) -> None:
    """truncate -s on every member's image, then until each marsd reported its new disk size."""
    for n in nodes:
        run(["truncate", "-s", str(size), str(image(n))])
    for n in nodes:
        wait_until(lambda n=n: all(m.tree_value(f"resource-r/actsize-{n.host}") == str(size) for m in nodes),
                   20, f"every node to see {n.host}'s disk of {size} bytes")


def connect(a: Node) -> nbd.NBD:
    """A libnbd connection that leaves the bounds check to the server (libnbd checks them
    itself by default, and then a request past the end would never reach marsd)."""
    h = nbd.NBD()
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)
    h.connect_uri(a.uri("r"))
    return h


def refused(n: Node, *args: str) -> str:
    r = n.marsadm(*args, check=False)
    assert r.returncode != 0, f"marsadm {' '.join(args)} should be refused:\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r.stderr


def create(n: Node, size: int = OLD) -> Path:
    run(["truncate", "-s", str(size), str(image(n))])
    return image(n)


def test_resizing():
    """64 MiB grown to 128 MiB under an NBD writer: the open connection keeps its size and goes
    on, new connections see the new size, the secondaries copy the new region only, and all
    three images end byte-identical."""
    with three_members("64M", create, synced) as (a, b, c, _):
        write(a, "write -P 0x11 0 16M")
        wait_until(lambda: synced(a, b, c), 60, "b and c to catch up")
        before = {n.host: counter(n, "sync-copied-bytes") for n in (b, c)}
        grow_disks(a, b, c)
        with open(image(a), "r+b") as f:  # what the primary's grown disk held before: copied by the sync
            f.seek(OLD + 4 * MiB)
            f.write(os.urandom(NEW_DATA))
        # The hint says what the resize would gain, with the original's words.
        view = json.loads(a.marsadm("view", "r", "--json").stdout)
        hint = next(f for f in view["findings"] if f["code"] == "RESIZE_POSSIBLE")
        assert hint["text"].startswith("marsadm resize would increase resource r by 64.0 MiB (67108864 bytes)")
        assert f"64.0 MiB on disk {image(b)} of b" in hint["text"] and "; you are wasting 64.0 MiB" in hint["text"]

        h = connect(a)
        stop, errors, count = threading.Event(), [], [0]

        def writer() -> None:
            i = 0
            while not stop.is_set():
                try:
                    h.pwrite(bytes([i % 251 + 1]) * 65536, (i % 512) * 65536)  # the first 32 MiB
                    count[0] += 1
                except nbd.Error as e:
                    errors.append(str(e))
                    return
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            wait_until(lambda: count[0] > 20, 20, "the writer to write")
            out = a.marsadm("resize", "r").stderr
            assert "grown from 64.0 MiB to 128.0 MiB" in out, out
            n_at_resize = count[0]
            wait_until(lambda: count[0] > n_at_resize + 20, 20, "the writer to go on after the resize")
            # The open connection negotiated 64 MiB, and NBD cannot tell it otherwise.
            assert h.get_size() == OLD
            with pytest.raises(nbd.Error):
                h.pwrite(b"x" * 4096, OLD)
        finally:
            stop.set()
            t.join(30)
        assert not errors, errors
        h.shutdown()
        # New connections see the new size: nbdinfo, qemu-img info, and a write at the very end.
        assert export_size(a) == NEW
        info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", a.uri("r")]).stdout)
        assert info["virtual-size"] == NEW
        write(a, f"write -P 0x77 {NEW - MiB} 1M")
        for n in (b, c):
            wait_until(lambda n=n: synced(a, n), 60, f"{n.host} to take up the new region")
        for n in (a, b, c):
            assert n.tree_value(f"resource-r/actual-{n.host}/size") == str(NEW)
        # The sync of the new region copied that region's data, nothing of the old region.
        for n in (b, c):
            copied = counter(n, "sync-copied-bytes")
            print(f"resize 64 MiB -> 128 MiB: {n.host} synced {copied} bytes of the new region "
                  f"(sync before the resize: {before[n.host]} bytes)")
            assert copied == NEW_DATA, (n.host, copied)
        digests = {n.host: sha256(image(n)) for n in (a, b, c)}
        assert len(set(digests.values())) == 1, digests
        view = json.loads(a.marsadm("view", "r", "--json").stdout)
        assert "RESIZE_POSSIBLE" not in {f["code"] for f in view["findings"]}


def test_datadev_full():
    """Writes up to the device's last byte succeed and replicate; a write that reaches past the
    end fails with an NBD error, costs the connection nothing and loses nothing."""
    with three_members("64M", create, synced) as (a, b, c, _):
        h = connect(a)
        try:
            h.pwrite(b"\xee" * 4096, OLD - 4096)  # the last block
            for offset in (OLD, OLD - 2048):  # beyond, and straddling the end
                with pytest.raises(nbd.Error) as e:
                    h.pwrite(b"\xdd" * 4096, offset)
                assert e.value.errno is not None
            with pytest.raises(nbd.Error):
                h.pread(4096, OLD - 2048)
            h.pwrite(b"\xcc" * 4096, 0)  # the same connection goes on
            assert h.pread(4096, OLD - 4096) == b"\xee" * 4096
            h.flush()
        finally:
            h.shutdown()
        wait_until(lambda: synced(a, b, c), 60, "b and c to catch up")
        for n in (a, b, c):
            assert image(n).stat().st_size == OLD, f"{n.host}'s image grew past the device"
            with open(image(n), "rb") as f:
                f.seek(OLD - 4096)
                assert f.read() == b"\xee" * 4096
                f.seek(0)
                assert f.read(4096) == b"\xcc" * 4096
        assert a.proc is not None and a.proc.poll() is None


def test_resize_while_secondary_syncs():
    """A secondary whose full sync has not finished when the resource grows syncs on to the new
    end, from where it stood: nothing is copied twice and the copy ends equal."""
    with three_members("64M", create, synced) as (a, b, c, _):
        write(a, "write -P 0x22 8M 16M")
        wait_until(lambda: synced(a, b, c), 60, "b and c to catch up")
        grow_disks(a, b, c)
        with open(image(c), "r+b") as f:  # a damaged copy: what c's full sync has to repair
            f.seek(8 * MiB)
            f.write(os.urandom(16 * MiB))
        with open(image(a), "r+b") as f:
            f.seek(OLD + 4 * MiB)
            f.write(os.urandom(NEW_DATA))
        # c starts its sync anew, as after a damaged disk, but with its sync switched off.
        c.marsadm("pause-sync", "r")
        c.marsadm("invalidate", "r")
        wait_until(lambda: all(n.tree_value("resource-r/syncstatus-c") == "0" for n in (a, c)), 20,
                   "c's sync to restart at 0")
        why = refused(a, "resize", "r")
        assert "the sync of r is paused on c" in why and "marsadm resume-sync r" in why, why
        a.marsadm("resize", "r", "--force")
        assert c.tree_value("resource-r/syncstatus-c") == "0"  # unfinished when the resource grew
        c.marsadm("resume-sync", "r")
        wait_until(lambda: synced(a, b, c), 60, "b and c to sync to the new end")
        # c copied the damaged part of the old region and the new region's data, each once.
        assert counter(c, "sync-copied-bytes") == 16 * MiB + NEW_DATA, counter(c, "sync-copied-bytes")
        assert counter(b, "sync-copied-bytes") == NEW_DATA
        digests = {n.host: sha256(image(n)) for n in (a, b, c)}
        assert len(set(digests.values())) == 1, digests


def test_resize_refusals():
    """Each refusal names the reason and the remedy; nothing changes in the tree."""
    with three_members("64M", create, synced) as (a, b, c, _):
        why = refused(b, "resize", "r")
        assert "host b is not the primary of r (a)" in why and "on a" in why, why
        why = refused(a, "resize", "r")
        assert "no member's disk is larger than the resource (64.0 MiB)" in why and "truncate -s" in why, why
        grow_disks(a, b)
        why = refused(a, "resize", "r")  # the default is the smallest disk: c's, not grown
        assert f"no member's disk is larger than the resource (64.0 MiB): c has 64.0 MiB on {image(c)}" in why, why
        why = refused(a, "resize", "r", "128M")
        assert f"the disk of c (64.0 MiB on {image(c)}) is smaller than the new size 128.0 MiB" in why, why
        why = refused(a, "resize", "r", "32M")
        assert "a resource only grows" in why, why
        why = refused(a, "resize", "r", "100000")
        assert "not a multiple of 4 KiB" in why, why
        grow_disks(c)
        b.marsadm("pause-replay", "r")
        why = refused(a, "resize", "r")
        assert "the replay of r is paused on b" in why and "marsadm resume-replay r" in why, why
        b.marsadm("resume-replay", "r")
        assert a.tree_value("resource-r/size") == str(OLD)
        assert a.marsadm("resize", "r", "64M").returncode == 0  # the size it has: nothing to do
        a.marsadm("resize", "r", "96M")
        assert export_size(a) == 96 * MiB
        wait_until(lambda: synced(a, b, c), 60, "b and c to take up 96 MiB")
        a.marsadm("resize", "r")  # the rest, to the smallest disk
        assert export_size(a) == NEW


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0 or not shutil.which("nbdfuse"),
                    reason="needs root, /dev/fuse and nbdfuse (libnbd-bin) for a loop device on the export")
def test_resizing_ext4():
    """An ext4 made on the export, grown with resize2fs after the resize on a new connection,
    checks clean, and its files are there on every member."""
    with three_members("64M", create, synced) as (a, b, c, _):
        fuse_dir, mnt = a.base / "fuse", a.base / "mnt"
        fuse_dir.mkdir()
        mnt.mkdir()
        stack: dict[str, object] = {}

        def attach() -> str:
            fuse = subprocess.Popen(["nbdfuse", str(fuse_dir / "disk"), a.uri("r")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            stack["fuse"] = fuse
            wait_until(lambda: (fuse_dir / "disk").exists() or fuse.poll() is not None, 30, "nbdfuse to mount")
            assert fuse.poll() is None, fuse.stderr.read()
            loop = stack["loop"] = run(["losetup", "-f", "--show", str(fuse_dir / "disk")]).stdout.strip()
            return loop

        def detach() -> None:
            subprocess.run(["umount", str(mnt)], capture_output=True)
            if stack.get("loop"):
                subprocess.run(["losetup", "-d", str(stack.pop("loop"))], capture_output=True)
            subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
            fuse = stack.pop("fuse", None)
            if isinstance(fuse, subprocess.Popen):
                try:
                    fuse.wait(30)
                except subprocess.TimeoutExpired:
                    fuse.kill()
                    fuse.wait()

        try:
            loop = attach()
            run(["mkfs.ext4", "-q", "-F", loop])
            run(["mount", loop, str(mnt)])
            payload = os.urandom(5 * MiB)
            (mnt / "blob").write_bytes(payload)
            run(["sync", "-f", str(mnt / "blob")])
            grow_disks(a, b, c)
            a.marsadm("resize", "r")  # online: the filesystem stays mounted meanwhile
            (mnt / "after").write_text("written after the resize, on the old connection\n")
            run(["sync", "-f", str(mnt / "after")])
            detach()
            loop = attach()  # a new connection: the new size
            assert int(run(["blockdev", "--getsize64", loop]).stdout) == NEW
            # Clean as the old connection left it; -p (which changes nothing on a clean one) also
            # records the check that resize2fs asks for.
            r = run(["e2fsck", "-f", "-p", loop], check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            run(["resize2fs", loop])
            r = run(["e2fsck", "-f", "-n", loop], check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            run(["mount", loop, str(mnt)])
            st = os.statvfs(mnt)
            assert st.f_blocks * st.f_frsize > 100 * MiB, "the filesystem did not grow"
            assert (mnt / "blob").read_bytes() == payload
            assert (mnt / "after").read_text().startswith("written after the resize")
        finally:
            detach()
        wait_until(lambda: synced(a, b, c), 60, "b and c to catch up")
        digests = {n.host: sha256(image(n)) for n in (a, b, c)}
        assert len(set(digests.values())) == 1, digests
