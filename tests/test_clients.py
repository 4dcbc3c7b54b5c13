"""Real NBD clients against a real marsd: qemu-io, qemu-img, nbdcopy, nbdinfo, nbdfuse + losetup + ext4."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from harness import run, wait_until
from harness import sha256 as _sha


def test_qemu_io_patterns(resource):
    node, res, img = resource
    uri = node.uri(res)
    r = run(["qemu-io", "-f", "raw",
             "-c", "write -P 0xab 0 1M", "-c", "write -P 0x5c 3M 4k", "-c", "write -z 1M 64k",
             "-c", "discard 2M 1M", "-c", "flush",
             "-c", "read -P 0xab 0 1M", "-c", "read -P 0x5c 3M 4k", uri])
    assert "Pattern verification failed" not in r.stdout + r.stderr
    # FUA writes (-f) and unaligned offsets go through as well.
    r = run(["qemu-io", "-f", "raw", "-c", "write -f -P 0x11 12345 777", "-c", "read -P 0x11 12345 777", uri])
    assert "Pattern verification failed" not in r.stdout + r.stderr
    # Negative check: a wrong pattern is noticed, so the reads above really compared.
    r = run(["qemu-io", "-f", "raw", "-c", "read -P 0x22 12345 777", uri], check=False)
    assert "Pattern verification failed" in r.stdout + r.stderr


def test_qemu_img_convert_and_compare(resource):
    node, res, img = resource
    src = node.base / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.truncate(64 << 20)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), node.uri(res)])
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), node.uri(res)])
    assert "Images are identical" in r.stdout
    with open(src, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"different")
    r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), node.uri(res)], check=False)
    assert r.returncode == 1


def test_nbdcopy_256mib_in_and_out(node):
    img = node.base / "big.img"
    node.marsadm("create-resource", "big", str(img), "256M")
    src = node.base / "src.img"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(4 << 20))
    run(["nbdcopy", str(src), node.uri("big")])
    out = node.base / "out.img"
    run(["nbdcopy", node.uri("big"), str(out)])
    assert _sha(src) == _sha(out)
    # The data device itself holds the data too (write-back happened before the acks).
    assert _sha(src) == _sha(img)


def test_nbdinfo_lists_export_with_capabilities(resource):
    node, res, img = resource
    r = run(["nbdinfo", "--json", node.uri(res)])
    info = json.loads(r.stdout)
    exp = info["exports"][0]
    assert exp["export-name"] == res
    assert exp["export-size"] == 64 << 20
    for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert exp[cap] is True, cap
    assert exp["is_read_only"] is False
    listing = run(["nbdinfo", "--list", "--json", f"nbd+unix://?socket={node.nbd_sock}"])
    names = [e["export-name"] for e in json.loads(listing.stdout)["exports"]]
    assert names == [res]


def test_unknown_export_is_refused(resource):
    node, res, img = resource
    r = run(["nbdinfo", f"nbd+unix:///nosuch?socket={node.nbd_sock}"], check=False)
    assert r.returncode != 0


@pytest.mark.skipif(not os.path.exists("/dev/fuse") or os.geteuid() != 0 or not shutil.which("nbdfuse"),
                    reason="needs root, /dev/fuse and nbdfuse (libnbd-bin) for a loop device on the export")
def test_ext4_on_the_export_survives_restart(node):
    """nbdfuse turns the export into a file, losetup into a block device, mkfs.ext4 + mount use it."""
    img = node.base / "fs.img"
    node.marsadm("create-resource", "fs", str(img), "128M")
    fuse_dir = node.base / "fuse"
    mnt = node.base / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = None
    loop = None

    def attach_stack():
        nonlocal fuse, loop
        fuse = subprocess.Popen(["nbdfuse", str(fuse_dir / "disk"), node.uri("fs")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: (fuse_dir / "disk").exists() or fuse.poll() is not None, 30, "nbdfuse to mount")
        assert fuse.poll() is None, fuse.stderr.read()
        loop = run(["losetup", "-f", "--show", str(fuse_dir / "disk")]).stdout.strip()

    def detach_stack():
        nonlocal fuse, loop
        subprocess.run(["umount", str(mnt)], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
            loop = None
        subprocess.run(["fusermount3", "-u", str(fuse_dir)], capture_output=True)
        if fuse is not None:
            try:
                fuse.wait(30)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait()
            fuse = None

    try:
        attach_stack()
        run(["mkfs.ext4", "-q", "-F", loop])
        run(["mount", loop, str(mnt)])
        payload = os.urandom(3 << 20)
        (mnt / "hello.txt").write_text("MARS keeps this\n")
        (mnt / "blob").write_bytes(payload)
        run(["sync", "-f", str(mnt / "blob")])
        detach_stack()

        node.restart()
        wait_until(lambda: node.tree_value("resource-fs/actual-a/is-attached") == "1", 30, "fs attached")

        attach_stack()
        run(["mount", loop, str(mnt)])
        assert (mnt / "hello.txt").read_text() == "MARS keeps this\n"
        assert (mnt / "blob").read_bytes() == payload
        run(["umount", str(mnt)])
        r = run(["e2fsck", "-n", "-f", loop], check=False)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        detach_stack()
