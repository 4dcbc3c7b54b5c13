"""A resource's log files on this node: which exist, how far each is finished, and their scan.

A resource's history is a chain of log files ``log-NNNNNNNNN-<origin>`` in its directory, numbered
without gaps; the origin is the host that wrote it. The typed values of the entries that describe
the chain (positions, replay links, versions) are in :mod:`.values`; this module reads and writes
them in the tree and looks at the files themselves.

A finished log file gets ``version-NNNNNNNNN-<host>``: a digest of its records chained to the
previous version's digest (:class:`VersionHasher`), so two nodes with the same version share the
same whole history, and two different versions for one number are a split brain.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..tree import NONE, Tree, res_dir
from .format import END, NEED_DATA, Decoded, LogCorruption, RecordReader
from .values import LogPos, ReplayLink, Version, first_record, log_name, parse_log_name

__all__ = ["LogFile", "ScanResult", "VersionHasher", "deletable_logs", "designated_primary", "finished_length",
           "list_logs", "next_origin",
           "pread_file", "read_replay", "read_version", "replay_path", "scan_file", "version_path"]


@dataclass(frozen=True, slots=True)
class LogFile:
    seq: int
    origin: str
    path: Path

    @property
    def name(self) -> str:
        return log_name(self.seq, self.origin)

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def scan(self, on_record: Callable[[Decoded], None] | None = None) -> ScanResult:
        """Verify the whole file (records numbered from its first) and report its good prefix."""
        return scan_file(self.path, 0, first_record(self.seq), on_record)


def list_logs(tree: Tree, res: str) -> list[LogFile]:
    """The log files present on this node, in chain order."""
    d = tree.root / res_dir(res)
    out = []
    for n in tree.names(res_dir(res)):
        p = parse_log_name(n)
        if p is not None and (d / n).is_file():
            out.append(LogFile(p[0], p[1], d / n))
    out.sort(key=lambda f: (f.seq, f.origin))
    return out


def replay_path(res: str, host: str) -> str:
    return f"{res_dir(res)}/replay-{host}"


def version_path(res: str, seq: int, host: str) -> str:
    return f"{res_dir(res)}/version-{seq:09d}-{host}"


def read_replay(tree: Tree, res: str, host: str) -> ReplayLink | None:
    return ReplayLink.parse(tree.get(replay_path(res, host)))


def read_version(tree: Tree, res: str, seq: int, host: str) -> Version | None:
    return Version.parse(tree.get(version_path(res, seq, host)))


def designated_primary(tree: Tree, res: str) -> str | None:
    """The host ``primary`` names, None for ``(none)`` or no entry."""
    p = tree.get(f"{res_dir(res)}/primary")
    return None if p in (None, "", NONE) else p


def finished_length(tree: Tree, res: str, seq: int, origin: str) -> int | None:
    """The length log ``seq`` of ``origin`` has in the history that goes on: None while it may grow.

    Usually its origin's version entry says it. After a forced failover the new primary's
    history holds only the part of the old primary's last file that it had fetched: its own
    version entry for that file (naming the same origin) is then the length everyone follows,
    and the old primary's longer version is the other side of a split brain.
    """
    for h in dict.fromkeys((designated_primary(tree, res), origin)):
        if h is None:
            continue
        v = read_version(tree, res, seq, h)
        if v is not None and v.origin == origin:
            return v.length_bytes
    return None


def next_origin(tree: Tree, res: str, seq: int) -> str | None:
    """Who wrote log file ``seq`` of the history that goes on, or None while nobody knows yet.

    A role switch changes the origin from one file to the next (``log-7-a`` is followed by
    ``log-8-b``), so a fetcher at the end of a file cannot assume the same origin goes on. The
    local copy says it once there is one; else the designated (or, during a handover, the last)
    primary's version entry or log position; else that primary itself, the only node that starts
    new files.
    """
    d = res_dir(res)
    local = {f.origin for f in list_logs(tree, res) if f.seq == seq}
    if len(local) == 1:
        return local.pop()
    # While a handover runs nobody is designated; the last primary's history is the one that ends.
    primary = designated_primary(tree, res) or tree.get(f"{d}/prev-primary") or None
    if primary is not None:
        v = read_version(tree, res, seq, primary)
        if v is not None:
            return v.origin
        pos = LogPos.parse(tree.get(f"{d}/actual-{primary}/log-pos"))
        if pos is not None and pos.seq == seq and pos.origin:
            return pos.origin
        return primary
    return None


class VersionHasher:
    """Accumulates a log file's digest from its records' header checks.

    Each header check covers the record's fields and its payload digest, so hashing the checks
    (not the payloads) digests the whole content at 8 bytes per record, cheaply on the hot path.
    The previous version's digest is the first input: equal digests mean equal whole histories.
    """

    def __init__(self, prev_digest: str) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._h.update(bytes.fromhex(prev_digest))

    def update(self, check: int) -> None:
        self._h.update(check.to_bytes(8, "little"))

    def update_checks(self, checks: bytes) -> None:
        """Several records' checks at once, 8 bytes little-endian each (format.encode_batch):
        the same digest as ``update`` for each of them in order."""
        self._h.update(checks)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def deletable_logs(tree: Tree, res: str) -> list[LogFile]:
    """Logs every member has replayed: older than the oldest replay position of any member.

    The newest log is never deletable (it is where writes go or will go); a member without a
    replay entry holds everything back, because nobody knows what it still needs.
    """
    logs = list_logs(tree, res)
    if not logs:
        return []
    oldest = None
    for host in tree.members(res):
        link = read_replay(tree, res, host)
        if link is None:
            return []
        oldest = link.seq if oldest is None else min(oldest, link.seq)
    if oldest is None:
        return []
    newest = logs[-1].seq
    return [f for f in logs if f.seq < oldest and f.seq < newest]


def delete_logs(tree: Tree, res: str, files: list[LogFile]) -> int:
    """Delete ``files`` (from :func:`deletable_logs`) here and tell every member to follow.

    The one way logs go, for an operator's ``marsadm log-delete`` and marsd's logdel-auto alike:
    ``logs-deleted-below`` is what makes each member drop its own copies once it has replayed
    them. Returns the bytes freed here.
    """
    total = 0
    for f in files:
        try:
            total += f.size()
            f.path.unlink()
        except FileNotFoundError:
            pass  # deleted meanwhile (the other of the two): gone is what was asked
    if files:
        below = max(f.seq for f in files) + 1
        if below > tree.get_int(f"{res_dir(res)}/logs-deleted-below"):
            tree.set(f"{res_dir(res)}/logs-deleted-below", below)
    return total


def pread_file(path: Path, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes of a log file at ``offset``, with its own descriptor: a copy another task
    appends to or deletes is never held open between reads."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


# --- the blocking scanner around the sans-I/O reader ------------------------------------------

@dataclass(frozen=True, slots=True)
class ScanResult:
    """Outcome of ``scan_file``.

    ``end`` is where the good prefix of the file stops: appends continue there after
    a clean scan, and a torn tail is cut there. When ``error`` is set,
    ``error.offset == end`` always (the problem is the record right after the good
    prefix).
    """

    end: int
    last_seq: int | None
    count: int
    error: LogCorruption | None


def scan_file(
    path: str | os.PathLike,
    start: int = 0,
    expect_seq: int | None = None,
    on_record: Callable[[Decoded], None] | None = None,
    chunk: int = 4 * 2**20,
) -> ScanResult:
    """Verify a log file from ``start`` (a record boundary) and report its good prefix.

    Bad data never raises: the first problem is returned in ``ScanResult.error`` so
    that recovery code decides what to do (cut a torn tail, stop on corruption)
    without exception plumbing. ``on_record`` sees each good record, in order, before
    the next one is read; its payload is only valid for reading, and may keep a read
    chunk alive while referenced. OSError from the file system propagates.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, not {chunk}")
    if start < 0:
        raise ValueError(f"start must not be negative, not {start}")
    name = os.fsdecode(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        size = os.fstat(fd).st_size
        if start > size:
            # Bytes the caller knew to be there are gone: not a crash artifact.
            err = LogCorruption(
                name, start, "short-file", f"file is only {size} bytes long, shorter than the scan start offset"
            )
            return ScanResult(start, None, 0, err)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, start, 0, os.POSIX_FADV_SEQUENTIAL)
        reader = RecordReader(name, start, expect_seq)
        pos = start
        count = 0
        last_seq = None
        end = start
        error = None
        next_event = reader.next_event
        while True:
            try:
                ev = next_event()
            except LogCorruption as e:
                error = e
                break
            if ev is NEED_DATA:
                data = os.pread(fd, chunk, pos)
                pos += len(data)
                reader.receive_data(data)
            elif ev is END:
                break
            else:
                count += 1
                last_seq = ev.record.seq
                end = ev.end
                if on_record is not None:
                    on_record(ev)
    finally:
        os.close(fd)
    return ScanResult(end, last_seq, count, error)


def writethrough_path(res: str, host: str) -> str:
    return f"{res_dir(res)}/writethrough-{host}"


def read_writethrough(tree: Tree, res: str, host: str) -> tuple[int, int] | None:
    """``writethrough-<host>`` as ``(last, after)``: ``host``'s log ends with file ``last`` before
    it wrote through to its device (emergency mode, log/dirtymap.py); ``after`` is the file its
    log went on in (0 while it still writes through). A secondary must not replay from ``last``
    (or from ``after - 1``) into the next file: it resyncs the map's regions instead. None: no
    emergency whose resync is unfinished."""
    raw = tree.get(writethrough_path(res, host))
    if not raw:
        return None
    last, sep, after = raw.partition(":")
    try:
        value = int(last), int(after or 0)
    except ValueError:
        return None
    return value if sep and value[0] > 0 and value[1] >= 0 else None


def dirtymap_file(tree: Tree, res: str, host: str) -> Path:
    """The primary's dirty-region map, a regular file beside the logs (not a tree entry)."""
    return tree.root / res_dir(res) / f"dirtymap-{host}"
