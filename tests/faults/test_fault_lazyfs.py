"""The power-loss file system keeps exactly what POSIX promises: the campaign's verdicts rest on it.

If lazyfs kept more than was synced, missing fsyncs in marsd would go unseen; if it kept less,
the campaign would report bugs that are not. Each case here is one rule of tests/faults/lazyfs.py,
on a real FUSE mount, through ordinary system calls.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from lazyfs import SECTOR, Mount  # noqa: E402


@pytest.fixture(scope="module")
def mount():
    base = Path(tempfile.mkdtemp(prefix="lzfs-", dir="/tmp"))
    m = None
    try:
        m = Mount(base, "d")
        yield m
    finally:
        if m is not None:
            m.close()
        shutil.rmtree(base, ignore_errors=True)


def fsync_dir(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@pytest.fixture
def d(mount, request):
    """A fresh directory of the test, itself durable."""
    p = mount.mnt / request.node.name
    p.mkdir()
    fsync_dir(mount.mnt)
    return p


def write_file(p: Path, data: bytes, sync: bool) -> None:
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def test_file_data_needs_fsync_of_the_file(mount, d):
    write_file(d / "synced", b"s" * 10000, sync=True)
    write_file(d / "unsynced", b"u" * 10000, sync=False)
    with open(d / "synced", "r+b") as f:  # an overwrite and an append, never synced
        f.write(b"X" * 100)
        f.seek(0, 2)
        f.write(b"tail")
        os.sync()  # not the file's fsync: lazyfs does not see it, as a power cut does not care
    fsync_dir(d)
    assert (d / "synced").read_bytes()[:100] == b"X" * 100  # before the cut the writes are there
    mount.cut()
    assert (d / "synced").read_bytes() == b"s" * 10000
    assert (d / "unsynced").read_bytes() == b""  # the entry was synced, the data never


def test_fdatasync_counts_and_truncate_is_undone_without_it(mount, d):
    with open(d / "f", "wb") as f:
        f.write(b"a" * 8192)
        os.fdatasync(f.fileno())
        f.truncate(100)
        f.seek(0, 2)
        f.write(b"b" * 50)
    fsync_dir(d)
    assert os.path.getsize(d / "f") == 150
    mount.cut()
    assert (d / "f").read_bytes() == b"a" * 8192


def test_created_file_is_gone_without_fsync_of_its_directory(mount, d):
    write_file(d / "f", b"data", sync=True)  # the data is durable, its name is not
    (d / "sub").mkdir()
    os.symlink("value", d / "link")
    mount.cut()
    assert os.listdir(d) == []


def test_rename_is_durable_only_after_fsync_of_the_directory(mount, d):
    os.symlink("old", d / "e")
    fsync_dir(d)
    os.symlink("new", d / ".tmp.e")
    os.replace(d / ".tmp.e", d / "e")
    assert os.readlink(d / "e") == "new"
    mount.cut()
    assert os.readlink(d / "e") == "old" and os.listdir(d) == ["e"]
    os.symlink("new", d / ".tmp.e")
    os.utime(d / ".tmp.e", ns=(1, 1234567890123456789), follow_symlinks=False)
    os.replace(d / ".tmp.e", d / "e")
    fsync_dir(d)
    mount.cut()
    assert os.readlink(d / "e") == "new"
    assert os.lstat(d / "e").st_mtime_ns == 1234567890123456789  # a tree entry's stamp, to the ns


def test_renamed_file_keeps_only_its_durable_data(mount, d):
    """The classic: write a new file, rename it over the old one, sync the directory only."""
    write_file(d / "f", b"old", sync=True)
    fsync_dir(d)
    write_file(d / "f.tmp", b"new", sync=False)
    os.replace(d / "f.tmp", d / "f")
    fsync_dir(d)
    mount.cut()
    assert (d / "f").read_bytes() == b""


def test_unlink_comes_back_without_fsync_of_the_directory(mount, d):
    write_file(d / "f", b"keep", sync=True)
    fsync_dir(d)
    os.unlink(d / "f")
    mount.cut()
    assert (d / "f").read_bytes() == b"keep"
    os.unlink(d / "f")
    fsync_dir(d)
    mount.cut()
    assert not (d / "f").exists()


def test_new_directory_needs_its_parent_synced_and_itself(mount, d):
    (d / "sub").mkdir()
    fsync_dir(d)
    os.symlink("v", d / "sub" / "e")
    mount.cut()
    assert os.listdir(d) == ["sub"] and os.listdir(d / "sub") == []


def test_handle_from_before_the_cut_is_dead(mount, d):
    f = open(d / "f", "wb", buffering=0)
    try:
        fsync_dir(d)
        mount.cut()
        with pytest.raises(OSError) as e:
            f.write(b"late write of a dead process")
        assert e.value.errno == errno.EBADF
    finally:
        try:
            f.close()
        except OSError:
            pass
    assert (d / "f").read_bytes() == b""


def test_torn_write_keeps_a_sector_aligned_part_of_the_unsynced_range(mount, d):
    old = bytes(range(256)) * 64  # 16 KiB
    write_file(d / "f", old, sync=True)
    fsync_dir(d)
    new = b"\xee" * len(old)
    seen = set()
    for seed in range(40):
        with open(d / "f", "r+b") as f:
            f.write(new)
        torn = mount.cut(tear=seed)["torn"]
        got = (d / "f").read_bytes()
        assert len(got) == len(old)
        sectors = [got[i:i + SECTOR] for i in range(0, len(got), SECTOR)]
        kinds = ["new" if s == new[:SECTOR] else "old" if s == old[i * SECTOR:(i + 1) * SECTOR] else "?"
                 for i, s in enumerate(sectors)]
        assert "?" not in kinds, f"seed {seed}: a sector is neither old nor new: {kinds}"
        first, last = (kinds.index("new"), len(kinds) - kinds[::-1].index("new")) if "new" in kinds else (0, 0)
        assert all(k == "new" for k in kinds[first:last]), f"seed {seed}: the torn part is not one range"
        assert bool(torn) == ("new" in kinds), f"seed {seed}: lazyfs reported {torn}, the file says {kinds}"
        seen.add("whole" if kinds.count("new") == len(kinds) else "part" if "new" in kinds else "none")
        write_file(d / "f", old, sync=True)
    assert seen == {"none", "part", "whole"}, seen


def test_torn_append_grows_the_file_to_the_part_that_reached_the_disk(mount, d):
    write_file(d / "log", b"r" * 1000, sync=True)
    fsync_dir(d)
    sizes = set()
    for seed in range(30):
        with open(d / "log", "ab") as f:
            f.write(b"t" * 9000)
        mount.cut(tear=seed)
        got = (d / "log").read_bytes()
        assert got[:1000] == b"r" * 1000
        assert set(got[1000:]) <= {ord("t"), 0}, f"seed {seed}: the tail holds other data"
        sizes.add(len(got))
    assert 1000 in sizes and len(sizes) > 3, sizes


def test_stats_count_pending_and_durable_work(mount, d):
    before = mount.stats()
    with open(d / "f", "wb") as f:
        f.write(b"x" * 3 * 4096)
        mid = mount.stats()
        os.fsync(f.fileno())
    fsync_dir(d)
    after = mount.stats()
    assert mid["pending_bytes"] >= before["pending_bytes"] + 3 * 4096
    assert after["fsync"] == before["fsync"] + 1 and after["fsyncdir"] >= before["fsyncdir"] + 1
    assert after["durable_bytes"] == before["durable_bytes"] + 3 * 4096
