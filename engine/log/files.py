"""Names and bookkeeping of a resource's transaction log files.

A resource's history is a chain of log files ``log-NNNNNNNNN-<origin>`` in its directory, numbered
without gaps; the origin is the host that wrote it. Two positions describe a node's progress:

* ``LogPos(seq, offset)`` — a byte position inside log file number ``seq``; it prints as
  ``log-000000729@1048576`` and the zero value means "unknown".
* ``replay-<host>`` — the tree entry ``log-NNNNNNNNN-<origin>,<pos>,<rest>`` (the original's format):
  everything in the chain before that position is on the host's data device *and synced*.

A finished log file gets ``version-NNNNNNNNN-<host>``: a digest of its records chained to the
previous version's digest, so two nodes with the same version string share the same whole history,
and two different strings for one number are a split brain.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..tree import Tree, res_dir

LOG_RE = re.compile(r"^log-(\d{9})-([A-Za-z0-9_][-A-Za-z0-9_]*)$")
ZERO_DIGEST = "0" * 32


@dataclass(frozen=True, slots=True, order=True)
class LogPos:
    seq: int = 0
    offset: int = 0

    def __str__(self) -> str:
        return f"log-{self.seq:09d}@{self.offset}"

    def is_zero(self) -> bool:
        return self.seq == 0


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


def log_name(seq: int, origin: str) -> str:
    return f"log-{seq:09d}-{origin}"


def parse_log_name(name: str) -> tuple[int, str] | None:
    m = LOG_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


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


@dataclass(frozen=True, slots=True)
class ReplayLink:
    """The value of ``replay-<host>``: the log file and position reached, and the rest not yet synced."""

    seq: int
    origin: str
    pos: int
    rest: int = 0

    def __str__(self) -> str:
        return f"{log_name(self.seq, self.origin)},{self.pos},{self.rest}"

    @property
    def logpos(self) -> LogPos:
        return LogPos(self.seq, self.pos)

    @classmethod
    def parse(cls, value: str | None) -> "ReplayLink | None":
        if not value:
            return None
        try:
            name, pos, rest = value.split(",")
            p = parse_log_name(name)
            if p is None:
                return None
            return cls(p[0], p[1], int(pos), int(rest))
        except ValueError:
            return None


def replay_path(res: str, host: str) -> str:
    return f"{res_dir(res)}/replay-{host}"


def version_path(res: str, seq: int, host: str) -> str:
    return f"{res_dir(res)}/version-{seq:09d}-{host}"


def read_replay(tree: Tree, res: str, host: str) -> ReplayLink | None:
    return ReplayLink.parse(tree.get(replay_path(res, host)))


def version_value(digest: str, seq: int, origin: str, length: int, prev: str | None) -> str:
    """``<digest>,log-N-<origin>,<len>:<previous version's first part>`` as in the original."""
    head = f"{digest},{log_name(seq, origin)},{length}"
    prev_head = prev.split(":", 1)[0] if prev else f"{ZERO_DIGEST},{log_name(max(seq - 1, 0), origin)},0"
    return f"{head}:{prev_head}"


def version_digest(value: str | None) -> str:
    return value.split(",", 1)[0] if value else ZERO_DIGEST


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


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
