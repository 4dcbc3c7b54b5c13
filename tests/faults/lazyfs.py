"""A FUSE file system that forgets everything not made durable, for power-loss tests (after LazyFS).

Why our own: a power cut must hit one node's disk at a moment the test chooses, deterministically
and within a second, and what survives must be exactly what POSIX promises and no more. A real
disk (or ext4 on a loop device) keeps far more than promised (its journal commits every 5 s,
a rename often reaches the disk with its data), so it hides the missing fsyncs this campaign
looks for. This file system is stricter than any real one:

* file data (and size) is durable only after fsync/fdatasync of that file; sync_file_range, a
  close, or a write of the same file through another descriptor is not durability;
* a directory entry (create, mkdir, mknod, symlink, link, rename, unlink, rmdir) is durable only
  after fsync of the directory it is in (a rename: both directories). A renamed or created entry
  whose inode never had its data synced comes back with only the inode's durable data (nothing);
* inode attributes (mode, times, a symlink's target) count as durable together with the inode
  (a simplification: a symlink cannot be fsynced, and its mtime is a tree entry's stamp, written
  before the rename that makes it visible).

Design: the durable state is one data file per inode in ``BACKING/dur/`` plus, per directory, a
durable entry table (in memory: this process is the disk and outlives every cut). The current
state is a second data file per inode in ``BACKING/cur/`` (reads come straight from it), the set
of 4 KiB pages written since the inode's last fsync, the lowest size it had since (a truncate),
and the current entry table per directory. fsync(file) copies the dirty pages to the durable
file and sets its size; fsync(dir) makes that directory's current entries its durable ones.

A cut (``cut [--tear SEED]`` on the control socket, after every process using the mount was
killed, as a power loss kills them) puts every directory back to its durable entries, drops the
inodes no durable entry reaches, and restores every file's current data from its durable data.
With ``--tear`` each file with unsynced writes has, with probability 1/2, a random sector-aligned
part of one of its unsynced ranges reach the durable state first (a write torn half-way); the
size grows to cover it. Open file handles die with the cut: a late request of a killed process
gets EBADF instead of changing the state that came back.

The control socket speaks one JSON line per request and reply: ``{"cmd": "cut", "tear": seed}``,
``{"cmd": "stats"}``, ``{"cmd": "ping"}``. Run as
``python tests/faults/lazyfs.py BACKING MOUNTPOINT --control SOCK``; :class:`Mount` does that for
tests and unmounts at the end.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

PAGE = 4096
#: The operations this file system answers (fusepy registers those that are attributes).
FUSE_OPS = frozenset({"init", "destroy", "getattr", "access", "statfs", "chmod", "chown", "utimens", "readlink",
                      "getxattr", "listxattr", "mkdir", "symlink", "mknod", "create", "link", "unlink", "rmdir",
                      "rename", "opendir", "readdir", "releasedir", "fsyncdir", "open", "read", "write",
                      "truncate", "flush", "release", "fsync"})
SECTOR = 512


class Inode:
    __slots__ = ("ino", "kind", "mode", "target", "size", "dsize", "zero_from", "dirty", "entries", "durable",
                 "atime", "mtime", "ctime", "fd", "rdev")

    def __init__(self, ino: int, kind: str, mode: int, target: str | None = None, rdev: int = 0) -> None:
        now = time.time_ns()
        self.ino = ino
        self.kind = kind  # "f" file, "d" directory, "l" symlink, "s" other (socket, fifo)
        self.mode = mode
        self.target = target
        self.rdev = rdev
        self.size = 0  # current size (files)
        self.dsize = 0  # durable size
        self.zero_from = 0  # durable bytes at and above this are gone (a truncate since the last fsync)
        self.dirty: set[int] = set()  # pages written since the last fsync
        self.entries: dict[str, int] | None = {} if kind == "d" else None  # current
        self.durable: dict[str, int] | None = {} if kind == "d" else None
        self.atime = self.mtime = self.ctime = now
        self.fd: int | None = None  # of the current data file

    def pending(self) -> bool:
        return bool(self.dirty) or self.size != self.dsize or self.zero_from < self.dsize


def _err(code: int):
    import fuse
    return fuse.FuseOSError(code)


def _runs(pages) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, end) runs of consecutive pages."""
    out: list[tuple[int, int]] = []
    for p in sorted(pages):
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def _copy(src: int, dst: int, off: int, n: int) -> None:
    while n > 0:
        done = os.copy_file_range(src, dst, n, off, off)
        if done == 0:  # past the source's end: the rest reads as zeros
            return
        off += done
        n -= done


class LazyFS:
    """The file system's state and operations (fusepy's Operations protocol, paths as given)."""

    use_ns = True

    def __init__(self, backing: str) -> None:
        self.backing = Path(backing)
        for sub in ("cur", "dur"):
            shutil.rmtree(self.backing / sub, ignore_errors=True)
            (self.backing / sub).mkdir(parents=True)
        self._mutex = threading.RLock()
        self.inodes: dict[int, Inode] = {}
        self.next_ino = 1
        self.root = self._new("d", stat.S_IFDIR | 0o755)
        self.handles: dict[int, int] = {}  # fh -> ino
        self.next_fh = 1
        self.counts = {"fsync": 0, "fsyncdir": 0, "durable_bytes": 0, "cuts": 0, "torn": 0, "torn_bytes": 0,
                       "lost_bytes": 0, "lost_entries": 0}
        self.mounted = threading.Event()

    # -- fusepy entry point ------------------------------------------------------------------------

    def __call__(self, op: str, *args):
        fn = getattr(self, op, None) if op in FUSE_OPS else None
        if fn is None:
            raise _err(errno.ENOSYS)
        with self._mutex:
            return fn(*args)

    # -- inodes and paths ------------------------------------------------------------------------

    def _new(self, kind: str, mode: int, target: str | None = None, rdev: int = 0) -> Inode:
        ino = Inode(self.next_ino, kind, mode, target, rdev)
        self.next_ino += 1
        self.inodes[ino.ino] = ino
        if kind == "f":
            for sub in ("cur", "dur"):
                open(self.backing / sub / str(ino.ino), "wb").close()
        return ino

    def _cur_fd(self, ino: Inode) -> int:
        if ino.fd is None:
            ino.fd = os.open(self.backing / "cur" / str(ino.ino), os.O_RDWR)
        return ino.fd

    def _lookup(self, path: str) -> Inode:
        ino = self.root
        for part in path.split("/"):
            if not part:
                continue
            if ino.kind != "d":
                raise _err(errno.ENOTDIR)
            n = ino.entries.get(part)
            if n is None:
                raise _err(errno.ENOENT)
            ino = self.inodes[n]
        return ino

    def _parent(self, path: str) -> tuple[Inode, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        d = self._lookup(head)
        if d.kind != "d":
            raise _err(errno.ENOTDIR)
        return d, name

    def _by_fh(self, path: str | None, fh) -> Inode:
        if fh:
            n = self.handles.get(fh)
            if n is None:
                raise _err(errno.EBADF)  # a handle from before a cut
            return self.inodes[n]
        return self._lookup(path)

    def _handle(self, ino: Inode) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = ino.ino
        return fh

    def _link_new(self, path: str, ino: Inode) -> Inode:
        d, name = self._parent(path)
        if name in d.entries:
            raise _err(errno.EEXIST)
        d.entries[name] = ino.ino
        d.mtime = d.ctime = time.time_ns()
        return ino

    # -- metadata ------------------------------------------------------------------------------

    def init(self, path):
        self.mounted.set()

    def destroy(self, path):
        pass

    def getattr(self, path, fh=None):
        ino = self._by_fh(path, fh)
        kinds = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}
        mode = ino.mode if ino.kind == "s" else kinds[ino.kind] | stat.S_IMODE(ino.mode)
        size = ino.size if ino.kind == "f" else len(ino.target.encode()) if ino.kind == "l" else 4096
        return {"st_mode": mode, "st_ino": ino.ino, "st_nlink": 2 if ino.kind == "d" else 1, "st_size": size,
                "st_uid": 0, "st_gid": 0, "st_atime": ino.atime, "st_mtime": ino.mtime, "st_ctime": ino.ctime,
                "st_blocks": (size + 511) // 512, "st_blksize": PAGE, "st_rdev": ino.rdev}

    def access(self, path, amode):
        self._lookup(path)
        return 0

    def statfs(self, path):
        v = os.statvfs(self.backing)
        return {k: getattr(v, k) for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                                          "f_ffree", "f_favail", "f_flag", "f_namemax")}

    def chmod(self, path, mode):
        ino = self._lookup(path)
        ino.mode = (ino.mode & ~0o7777) | (mode & 0o7777)
        ino.ctime = time.time_ns()
        return 0

    def chown(self, path, uid, gid):
        return 0

    def utimens(self, path, times=None):
        ino = self._lookup(path)
        now = time.time_ns()
        ino.atime, ino.mtime = times if times else (now, now)
        ino.ctime = now
        return 0

    def readlink(self, path):
        ino = self._lookup(path)
        if ino.kind != "l":
            raise _err(errno.EINVAL)
        return ino.target

    def getxattr(self, path, name, position=0):
        raise _err(errno.ENODATA)

    def listxattr(self, path):
        return []

    # -- directory entries ---------------------------------------------------------------------

    def mkdir(self, path, mode):
        self._link_new(path, self._new("d", stat.S_IFDIR | (mode & 0o7777)))
        return 0

    def symlink(self, path, target):
        self._link_new(path, self._new("l", stat.S_IFLNK | 0o777, target))
        return 0

    def mknod(self, path, mode, dev):
        if stat.S_ISREG(mode):
            self._link_new(path, self._new("f", mode))
        else:
            self._link_new(path, self._new("s", mode, rdev=dev))
        return 0

    def create(self, path, mode, fi=None):
        d, name = self._parent(path)
        n = d.entries.get(name)
        ino = self.inodes[n] if n is not None else self._link_new(path, self._new("f", stat.S_IFREG | (mode & 0o7777)))
        return self._handle(ino)

    def link(self, path, source):
        src = self._lookup(source)
        if src.kind == "d":
            raise _err(errno.EPERM)
        self._link_new(path, src)
        return 0

    def unlink(self, path):
        d, name = self._parent(path)
        n = d.entries.get(name)
        if n is None:
            raise _err(errno.ENOENT)
        if self.inodes[n].kind == "d":
            raise _err(errno.EISDIR)
        del d.entries[name]
        d.mtime = d.ctime = time.time_ns()
        return 0

    def rmdir(self, path):
        d, name = self._parent(path)
        n = d.entries.get(name)
        if n is None:
            raise _err(errno.ENOENT)
        ino = self.inodes[n]
        if ino.kind != "d":
            raise _err(errno.ENOTDIR)
        if ino.entries:
            raise _err(errno.ENOTEMPTY)
        del d.entries[name]
        d.mtime = d.ctime = time.time_ns()
        return 0

    def rename(self, old, new):
        od, oname = self._parent(old)
        nd, nname = self._parent(new)
        n = od.entries.get(oname)
        if n is None:
            raise _err(errno.ENOENT)
        ino = self.inodes[n]
        if ino.kind == "d":  # not into itself
            p = new
            while p and p != "/":
                if self._lookup_quiet(p) is ino and p != old:
                    raise _err(errno.EINVAL)
                p = p.rpartition("/")[0]
        over = nd.entries.get(nname)
        if over is not None and over != n:
            o = self.inodes[over]
            if o.kind == "d" and ino.kind != "d":
                raise _err(errno.EISDIR)
            if ino.kind == "d" and o.kind != "d":
                raise _err(errno.ENOTDIR)
            if o.kind == "d" and o.entries:
                raise _err(errno.ENOTEMPTY)
        del od.entries[oname]
        nd.entries[nname] = n
        od.mtime = od.ctime = nd.mtime = nd.ctime = time.time_ns()
        return 0

    def _lookup_quiet(self, path: str) -> Inode | None:
        try:
            return self._lookup(path)
        except Exception:
            return None

    def opendir(self, path):
        ino = self._lookup(path)
        if ino.kind != "d":
            raise _err(errno.ENOTDIR)
        return self._handle(ino)

    def readdir(self, path, fh):
        ino = self._by_fh(path, fh)
        return [".", "..", *ino.entries]

    def releasedir(self, path, fh):
        self.handles.pop(fh, None)
        return 0

    def fsyncdir(self, path, datasync, fh):
        ino = self._by_fh(path, fh)
        self.counts["fsyncdir"] += 1
        ino.durable = dict(ino.entries)
        return 0

    # -- file data ------------------------------------------------------------------------------

    def open(self, path, flags):
        ino = self._lookup(path)
        if ino.kind == "d":
            raise _err(errno.EISDIR)
        return self._handle(ino)

    def read(self, path, size, offset, fh):
        ino = self._by_fh(path, fh)
        if ino.kind != "f":
            raise _err(errno.EINVAL)
        return os.pread(self._cur_fd(ino), size, offset)

    def write(self, path, data, offset, fh):
        ino = self._by_fh(path, fh)
        if ino.kind != "f":
            raise _err(errno.EINVAL)
        n = os.pwrite(self._cur_fd(ino), data, offset)
        if n:
            ino.dirty.update(range(offset // PAGE, (offset + n - 1) // PAGE + 1))
            ino.size = max(ino.size, offset + n)
            ino.mtime = ino.ctime = time.time_ns()
        return n

    def truncate(self, path, length, fh=None):
        ino = self._by_fh(path, fh)
        if ino.kind != "f":
            raise _err(errno.EINVAL)
        os.ftruncate(self._cur_fd(ino), length)
        if length < ino.size:
            ino.zero_from = min(ino.zero_from, length)
            keep = (length + PAGE - 1) // PAGE
            ino.dirty = {p for p in ino.dirty if p < keep}
        ino.size = length
        ino.mtime = ino.ctime = time.time_ns()
        return 0

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        self.handles.pop(fh, None)
        return 0

    def fsync(self, path, datasync, fh):
        ino = self._by_fh(path, fh)
        self.counts["fsync"] += 1
        if ino.kind == "f":
            self._flush(ino)
        return 0

    def _flush(self, ino: Inode) -> None:
        if not ino.pending():
            return
        cur = self._cur_fd(ino)
        dfd = os.open(self.backing / "dur" / str(ino.ino), os.O_RDWR)
        try:
            os.ftruncate(dfd, min(ino.zero_from, ino.dsize))
            os.ftruncate(dfd, ino.size)
            for a, b in _runs(ino.dirty):
                off = a * PAGE
                n = min(b * PAGE, ino.size) - off
                if n > 0:
                    _copy(cur, dfd, off, n)
                    self.counts["durable_bytes"] += n
        finally:
            os.close(dfd)
        ino.dsize = ino.zero_from = ino.size
        ino.dirty.clear()

    # -- the power cut --------------------------------------------------------------------------

    def cut(self, tear: int | None = None) -> dict:
        """Lose everything not durable (tearing unsynced writes with ``tear`` as the seed)."""
        with self._mutex:
            rng = random.Random(tear) if tear is not None else None
            self.handles.clear()
            # What the durable entries reach survives; directories get their durable entries back.
            reach: set[int] = set()
            stack = [self.root.ino]
            while stack:
                n = stack.pop()
                if n in reach:
                    continue
                reach.add(n)
                ino = self.inodes[n]
                if ino.kind == "d":
                    stack.extend(ino.durable.values())
            torn = []
            for n in sorted(self.inodes):
                ino = self.inodes[n]
                if n not in reach:
                    self.counts["lost_entries"] += 1
                    self._drop(ino)
                    continue
                if ino.kind == "d":
                    self.counts["lost_entries"] += len(set(ino.entries.items()) ^ set(ino.durable.items()))
                    ino.entries = dict(ino.durable)
                elif ino.kind == "f" and ino.pending():
                    if rng is not None and ino.dirty and rng.random() < 0.5:
                        torn.append(self._tear(ino, rng))
                    self.counts["lost_bytes"] += len(ino.dirty) * PAGE
                    self._restore(ino)
            self.counts["cuts"] += 1
            self.counts["torn"] += len(torn)
            return {"torn": torn, "inodes": len(self.inodes)}

    def _tear(self, ino: Inode, rng: random.Random) -> dict:
        runs = [(a * PAGE, min(b * PAGE, ino.size)) for a, b in _runs(ino.dirty)]
        runs = [(a, b) for a, b in runs if b > a]
        if not runs:
            return {"ino": ino.ino, "bytes": 0}
        a, b = rng.choice(runs)
        sectors = (b - a + SECTOR - 1) // SECTOR
        if rng.random() < 0.5:  # a prefix: the disk wrote the range in order and stopped
            s, e = 0, rng.randint(1, sectors)
        else:  # any part of it
            s = rng.randrange(sectors)
            e = rng.randint(s + 1, sectors)
        lo, hi = a + s * SECTOR, min(b, a + e * SECTOR)
        dfd = os.open(self.backing / "dur" / str(ino.ino), os.O_RDWR)
        try:
            if ino.zero_from < ino.dsize:
                os.ftruncate(dfd, ino.zero_from)  # the truncate reached the disk with the write
                ino.dsize = ino.zero_from
            _copy(self._cur_fd(ino), dfd, lo, hi - lo)
            ino.dsize = max(ino.dsize, hi)
            os.ftruncate(dfd, ino.dsize)
        finally:
            os.close(dfd)
        self.counts["torn_bytes"] += hi - lo
        return {"ino": ino.ino, "from": lo, "to": hi}

    def _restore(self, ino: Inode) -> None:
        cur = self._cur_fd(ino)
        dfd = os.open(self.backing / "dur" / str(ino.ino), os.O_RDONLY)
        try:
            os.ftruncate(cur, ino.dsize)
            for a, b in _runs(ino.dirty):
                off = a * PAGE
                n = min(b * PAGE, ino.dsize) - off
                if n > 0:
                    _copy(dfd, cur, off, n)
            if ino.zero_from < ino.dsize:
                _copy(dfd, cur, ino.zero_from, ino.dsize - ino.zero_from)
        finally:
            os.close(dfd)
        ino.size = ino.zero_from = ino.dsize
        ino.dirty.clear()

    def _drop(self, ino: Inode) -> None:
        if ino.fd is not None:
            os.close(ino.fd)
        if ino.kind == "f":
            for sub in ("cur", "dur"):
                (self.backing / sub / str(ino.ino)).unlink(missing_ok=True)
        del self.inodes[ino.ino]

    def stats(self) -> dict:
        with self._mutex:
            pending_bytes = sum(len(i.dirty) * PAGE for i in self.inodes.values() if i.kind == "f")
            pending_entries = sum(len(set(i.entries.items()) ^ set(i.durable.items()))
                                  for i in self.inodes.values() if i.kind == "d")
            return {**self.counts, "pending_bytes": pending_bytes, "pending_entries": pending_entries,
                    "inodes": len(self.inodes)}


# -- the control socket ---------------------------------------------------------------------------

def serve_control(fs: LazyFS, path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def one(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                try:
                    req = json.loads(line)
                    cmd = req.get("cmd")
                    if cmd == "cut":
                        reply = {"ok": True, **fs.cut(req.get("tear"))}
                    elif cmd == "stats":
                        reply = {"ok": True, **fs.stats()}
                    elif cmd == "ping":
                        reply = {"ok": fs.mounted.is_set()}
                    else:
                        reply = {"ok": False, "error": f"unknown command {cmd!r}"}
                except Exception as e:  # the reply says what went wrong; the disk keeps running
                    reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
                f.write(json.dumps(reply).encode() + b"\n")
                f.flush()

    def loop() -> None:
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("backing", help="directory for the inodes' current and durable data (emptied)")
    p.add_argument("mountpoint")
    p.add_argument("--control", required=True, help="unix socket for cut / stats")
    a = p.parse_args(argv)
    import fuse
    fs = LazyFS(a.backing)
    serve_control(fs, a.control)
    fuse.FUSE(fs, a.mountpoint, foreground=True, nothreads=False, fsname="lazyfs", subtype="lazyfs",
              direct_io=True, hard_remove=True, big_writes=True, max_write=131072, use_ino=True,
              entry_timeout=0, attr_timeout=0, negative_timeout=0, default_permissions=True)
    return 0


# -- the test side ----------------------------------------------------------------------------------

class Mount:
    """One lazyfs process and its mount: ``cut()``, ``stats()``, ``close()`` (unmount, always)."""

    def __init__(self, base: Path, name: str) -> None:
        self.backing = base / f"{name}.backing"
        self.mnt = base / name
        self.sock = base / f"{name}.ctl"
        self.log = base / f"{name}.lazyfs.log"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.backing), str(self.mnt),
                                      "--control", str(self.sock)],
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"lazyfs exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if os.path.ismount(self.mnt) and self.request("ping")["ok"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"lazyfs did not mount {self.mnt}:\n{self.log.read_text()}")
            time.sleep(0.02)  # poll

    def request(self, cmd: str, **kw) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(str(self.sock))
            s.sendall(json.dumps({"cmd": cmd, **kw}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
        reply = json.loads(buf)
        if not reply.get("ok"):
            raise AssertionError(f"lazyfs {cmd}: {reply}")
        return reply

    def cut(self, tear: int | None = None) -> dict:
        """The power cut; every process using the mount must be dead already."""
        return self.request("cut", tear=tear)

    def stats(self) -> dict:
        return self.request("stats")

    def close(self) -> None:
        if self.proc.poll() is None:
            for cmd in (["umount", str(self.mnt)], ["fusermount", "-u", str(self.mnt)], ["umount", "-l", str(self.mnt)]):
                if subprocess.run(cmd, capture_output=True).returncode == 0:
                    break
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        shutil.rmtree(self.backing, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
