"""What changed in this node's tree, in the order it changed: the index the tree exchange serves.

A peer asks "what changed after your change number N?" (:class:`~mars.engine.peer.protocol.TreeSince`)
and gets exactly that, so an idle exchange costs a few bytes instead of the whole tree. Why
change numbers and not the entries' Lamport stamps: stamps order *values*, not *arrivals*. A
node that was cut off writes entries with stamps older than what the others have seen since;
relayed through a third node they arrive after newer ones, and "everything newer than the
newest stamp I saw from you" would skip them for good. The number of the change that brought
an entry here orders by arrival, which is what "since" needs.

The numbers count one life of the marsd (``incarnation``, random at its start), because the
index lives in memory: a restart begins a new count, and a peer asking in terms of the old life
gets the whole tree. The tree on disk stays the truth; this is an index of it.

Beside the order, the index keeps a digest of the tree: the XOR of a 63-bit hash of each live
entry's path, value and stamp. XOR makes it cheap to keep (one entry changes, two hashes
change it) and independent of order, so two nodes holding the same entries have the same digest
however they got them. Left out: tombstones (a node that never had an entry needs no tombstone
of it, and both then agree) and :data:`VOLATILE` entries, which are published again and again
because time passes and would make every digest differ all the time; a lost one is replaced by
the next anyway.

Thread-safe: marsd writes entries from its event loop and from its disk threads.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from ..entry import Entry

__all__ = ["VOLATILE", "ChangeIndex", "Changes", "entry_hash"]

#: Entry names (the last path component) that change only because time passes.
VOLATILE = frozenset({"time"})
#: Entry names that a node publishes for the faces alone: no reconcile round of any node acts on
#: another node's free space, version or tunables. Free space moves with every write to the file
#: system, so were it one of the round's inputs every node would run a full pass over all its
#: resources whenever any node's /mars changed by a little (:attr:`ChangeIndex.round_digest`).
FIGURES = frozenset({"rest-space", "total-space", "version"})
FIGURE_PREFIXES = ("tunable-",)
_MASK = (1 << 63) - 1  # digests travel as protocol integers, 0 .. 2**63-1


def entry_hash(e: Entry) -> int:
    """63 bits of a hash of one entry that every node computes alike (Python's hash() is salted
    per process, so it cannot be compared between nodes)."""
    h = hashlib.blake2b(f"{e.path}\0{e.value}\0{e.stamp_ns}".encode("utf-8", "surrogateescape"),
                        digest_size=8).digest()
    return int.from_bytes(h, "big") & _MASK


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _counts(e: Entry) -> bool:
    return not e.deleted and e.path.rsplit("/", 1)[-1] not in VOLATILE


def _figure(e: Entry) -> bool:
    name = e.path.rsplit("/", 1)[-1]
    return name in FIGURES or name.startswith(FIGURE_PREFIXES)


@dataclass(slots=True)
class _Rec:
    entry: Entry
    seq: int
    source: str | None  # the peer it came from; None for this node's own writes


@dataclass(frozen=True, slots=True)
class Changes:
    """An answer of :meth:`ChangeIndex.since`: entries with the change numbers they span."""

    incarnation: int
    from_seq: int
    seq: int
    digest: int
    entries: tuple[Entry, ...]


class ChangeIndex:
    """Every entry of the tree with the number of the change that brought it, oldest first."""

    def __init__(self, incarnation: int | None = None) -> None:
        self.incarnation = incarnation or (secrets.randbits(62) | 1)
        self._lock = threading.Lock()
        self._seq = 0
        self._recs: OrderedDict[str, _Rec] = OrderedDict()  # path -> record, least recently changed first
        self._dirs: dict[str, set[str]] = {}  # directory -> the indexed paths directly in it
        self._digest = 0
        self._round_digest = 0
        #: Whether the index holds the whole tree (after marsd's first scan): only then may a
        #: read that finds nothing here answer "no such entry" without asking the disk.
        self.complete = False

    @property
    def seq(self) -> int:
        return self._seq

    @property
    def digest(self) -> int:
        return self._digest

    @property
    def round_digest(self) -> int:
        """The digest without the :data:`FIGURES`: what a reconcile round compares to tell
        whether anything it acts on changed since the last full pass (daemon/marsd.py)."""
        return self._round_digest

    def _toggle(self, e: Entry) -> None:
        if _counts(e):
            h = entry_hash(e)
            self._digest ^= h
            if not _figure(e):
                self._round_digest ^= h

    def __len__(self) -> int:
        return len(self._recs)

    def get(self, path: str) -> Entry | None:
        rec = self._recs.get(path)
        return rec.entry if rec is not None else None

    def note(self, e: Entry, source: str | None = None) -> bool:
        """Record that the tree holds ``e`` now; False when the index had it (or newer) already.

        An older stamp than the one indexed is ignored: the tree's values only move forward,
        so an older one is a late report of a write that was overtaken meanwhile.
        """
        with self._lock:
            rec = self._recs.get(e.path)
            if rec is not None:
                old = rec.entry
                if old.stamp_ns > e.stamp_ns or (old.stamp_ns == e.stamp_ns and old.value == e.value):
                    return False
                self._toggle(old)
                self._recs.move_to_end(e.path)
            self._seq += 1
            if rec is None:
                self._recs[e.path] = _Rec(e, self._seq, source)
                self._dirs.setdefault(_parent(e.path), set()).add(e.path)
            else:
                rec.entry, rec.seq, rec.source = e, self._seq, source
            self._toggle(e)
            return True

    def forget(self, path: str, *, noted_by: int | None = None) -> None:
        """The entry's file is gone from disk (removed by hand or with its directory): drop it.

        Not a change to send anyone: a missing entry replicates nothing (a tombstone does).
        ``noted_by``: only if its record is no newer than that change number (a scan that
        began then must not forget what was written while it listed the directory).
        """
        with self._lock:
            rec = self._recs.get(path)
            if rec is None or (noted_by is not None and rec.seq > noted_by):
                return
            del self._recs[path]
            paths = self._dirs.get(_parent(path))
            if paths is not None:
                paths.discard(path)
                if not paths:
                    del self._dirs[_parent(path)]
            self._toggle(rec.entry)

    def paths_in(self, directory: str) -> list[str]:
        """Indexed paths directly in ``directory`` ("" for the top level)."""
        with self._lock:
            return list(self._dirs.get(directory, ()))

    def since(self, incarnation: int, seq: int, *, skip_source: str | None = None) -> Changes:
        """The changes after ``seq`` of life ``incarnation``; all entries for another life or seq 0.

        ``skip_source`` leaves out, in an incremental answer, what came from the asker itself
        (it has that entry or a newer one). A whole-tree answer leaves nothing out: it is what a
        restarted asker, which may have lost entries, starts from.
        """
        with self._lock:
            if incarnation != self.incarnation or seq > self._seq:
                seq = 0
            out: list[Entry] = []
            for rec in reversed(self._recs.values()):
                if rec.seq <= seq:
                    break
                if seq and skip_source is not None and rec.source == skip_source:
                    continue
                out.append(rec.entry)
            out.reverse()
            return Changes(self.incarnation, seq, self._seq, self._digest, tuple(out))

    def load(self, entries: Iterable[Entry]) -> None:
        """The tree as it is on disk at start: this node's state, numbered as its own changes."""
        for e in entries:
            self.note(e)
