"""Which entries of the tree another process changed, from the kernel (inotify) instead of a scan.

marsadm, an operator with ``ln -s``, a script: anything may write the tree beside marsd, as with
the original's /mars. Finding those writes by stat-ing every directory every few seconds costs an
idle node more than its whole exchange with the peers at 50 resources; inotify names the entry
the moment it is written, and costs nothing while nothing is. The periodic whole-tree scan stays
(every FULL_SCAN_S, exchange.py) as the net for what a watch cannot see: a directory created
between its parent's scan and its watch, a queue overflow, a file system without inotify.

Events of marsd's own writes come too; reading such an entry finds what the index has already,
which costs one readlink. Temporary names (``.tmp*``, the write half of a write-then-rename) are
never read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from inotify_simple import INotify, flags

log = logging.getLogger("mars.marsd")

#: What marks an entry changed: written in place or renamed into the directory (a tree write is a
#: symlink under a temporary name renamed over the entry), removed or renamed away.
ENTRY_EVENTS = flags.CREATE | flags.MOVED_TO | flags.DELETE | flags.MOVED_FROM
MASK = ENTRY_EVENTS | flags.DELETE_SELF | flags.ONLYDIR | flags.DONT_FOLLOW | flags.EXCL_UNLINK


@dataclass(slots=True)
class Changed:
    """What a batch of events says: entries to read again, and whether a directory came or went
    (then a whole-tree scan finds what is in it, and watches it)."""

    paths: set[str] = field(default_factory=set)
    dirs: bool = False
    overflow: bool = False


class TreeWatch:
    """One inotify instance with a watch on every directory of a tree."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self._ino = INotify(nonblocking=True)
        self._dirs: dict[int, str] = {}  # watch descriptor -> directory, relative to the root
        self._wds: dict[str, int] = {}

    def fileno(self) -> int:
        return self._ino.fileno()

    def close(self) -> None:
        self._ino.close()

    def __len__(self) -> int:
        return len(self._wds)

    def watch(self, dirs: list[str]) -> None:
        """Watch these directories (relative, "" the root) too; those watched already stay as they
        are. OSError (the limit fs.inotify.max_user_watches, a file system without inotify) goes
        to the caller, which then scans instead."""
        for rel in dirs:
            if rel in self._wds:
                continue
            try:
                wd = self._ino.add_watch(os.path.join(self.root, rel) if rel else self.root, MASK)
            except FileNotFoundError:
                continue  # gone since the scan that found it
            self._dirs[wd] = rel
            self._wds[rel] = wd

    def read(self) -> Changed:
        """The events that are there, without waiting."""
        out = Changed()
        for ev in self._ino.read(timeout=0):
            if ev.mask & flags.Q_OVERFLOW:
                out.overflow = True
                continue
            rel = self._dirs.get(ev.wd)
            if ev.mask & flags.IGNORED:  # the directory is gone (or its watch was removed)
                if rel is not None:
                    del self._dirs[ev.wd]
                    if self._wds.get(rel) == ev.wd:
                        del self._wds[rel]
                continue
            if rel is None or ev.mask & flags.DELETE_SELF:
                continue
            if ev.mask & flags.ISDIR:
                out.dirs = True
                continue
            if not ev.name or ev.name.startswith(".tmp"):
                continue
            out.paths.add(f"{rel}/{ev.name}" if rel else ev.name)
        return out
