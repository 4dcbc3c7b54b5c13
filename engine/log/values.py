"""The typed values of the log's tree entries: positions, replay links, versions, replay codes.

Tree values are text (a symlink's target), and the same text is read by the write path, the
fetcher, the replayer, the status model and every face. Each kind of value therefore has one
type here with one ``parse`` (text -> value, or None for text that is not one) and one
``__str__`` (value -> text), and nothing else in the project splits such a string. ``parse``
never raises: a value another node wrote with a bug, or a future format, reads as unknown.

The entries and their text, as in the original MARS:

* ``actual-<host>/log-pos`` (the primary's acknowledged log end) and ``actual-<host>/fetch-pos``
  (how far a secondary's copy is fetched): a :class:`LogPos`, ``log-000000729-a,1048576``.
* ``replay-<host>`` and ``syncpos-<host>``: a :class:`ReplayLink`, ``log-000000729-a,1048576,0``
  (the position reached and the bytes not yet synced behind it).
* ``version-<seq>-<host>``: a :class:`Version`, ``<digest>,log-<seq>-<origin>,<length>:<previous
  version's digest>,log-<seq-1>-<origin>,<length>``.
* ``actual-<host>/replay-code``: a :class:`ReplayCode`, ``1``, ``-1`` or ``-1,<code>,<offset>``.

Pure: no I/O, so the protocol-free layers (the model, the faces) can use these types freely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["LOG_RE", "ZERO_DIGEST", "LogPos", "ReplayCode", "ReplayLink", "Version", "first_record", "log_name",
           "parse_log_name"]

# [0-9], not \d: \d also matches other scripts' digits ("١", which int() reads, and "²", which it
# refuses), and a value means one spelling of one number.
LOG_RE = re.compile(r"^log-([0-9]{9})-([A-Za-z0-9_][-A-Za-z0-9_]*)$")
ZERO_DIGEST = "0" * 32
_NUMBERED_RE = re.compile(r"^log-([0-9]{9})@([0-9]+)$")
_DIGEST_RE = re.compile(r"^[^,:\s]+$")  # any token: an odd digest must still be compared, not ignored


def log_name(seq: int, origin: str) -> str:
    """``log-000000729-a``: the file name of log number ``seq`` written by ``origin``."""
    return f"log-{seq:09d}-{origin}"


def parse_log_name(name: str) -> tuple[int, str] | None:
    """(seq, origin) of a log file name, None for any other name."""
    m = LOG_RE.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def first_record(file_seq: int) -> int:
    """The sequence number of the first record in log file ``file_seq``.

    Record numbers carry their log file's number in the upper 32 bits. So a record is tied to
    its file (a block of one file misplaced into another is caught by the sequence check),
    numbering restarts cleanly in every file, and the order of all records of a resource is
    still the order of their numbers.
    """
    return file_seq << 32


def _int(text: str) -> int | None:
    # isdigit() alone is also true for "²" and "①", which int() refuses; and int() refuses more
    # than 4300 digits (sys.int_info.str_digits_check_threshold): either would make parse raise.
    if not (text.isascii() and text.isdigit()):
        return None
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True, order=True)
class LogPos:
    """A byte position in a resource's log chain: ``offset`` bytes into log file ``seq``.

    With its file's ``origin`` it is the tree's ``log-000000729-a,1048576``; without one (a
    position known only by number) it prints as ``log-000000729@1048576``. The zero value
    (``seq`` 0) means unknown: log numbers start at 1.
    """

    seq: int = 0
    offset: int = 0
    origin: str = ""

    @property
    def name(self) -> str:
        """The log file's name; needs the origin."""
        return log_name(self.seq, self.origin)

    def is_zero(self) -> bool:
        return self.seq == 0

    def __str__(self) -> str:
        if self.origin:
            return f"{log_name(self.seq, self.origin)},{self.offset}"
        return f"log-{self.seq:09d}@{self.offset}"

    @classmethod
    def parse(cls, value: str | None) -> LogPos | None:
        """``log-N-<origin>,<offset>`` or ``log-N@<offset>``; None for anything else."""
        if not value:
            return None
        name, sep, offset = value.partition(",")
        if sep:
            p, off = parse_log_name(name), _int(offset)
            return None if p is None or off is None else cls(p[0], off, p[1])
        m = _NUMBERED_RE.match(value)
        off = _int(m.group(2)) if m else None
        return None if off is None else cls(int(m.group(1)), off)


@dataclass(frozen=True, slots=True)
class ReplayLink:
    """The value of ``replay-<host>``: everything in the chain before ``pos`` in log file ``seq``
    of ``origin`` is on the host's data device and synced; ``rest`` is the original's count of
    bytes not yet synced behind it (always 0 here: the position moves only after a sync)."""

    seq: int
    origin: str
    pos: int
    rest: int = 0

    @property
    def logpos(self) -> LogPos:
        return LogPos(self.seq, self.pos, self.origin)

    @property
    def name(self) -> str:
        return log_name(self.seq, self.origin)

    def __str__(self) -> str:
        return f"{self.logpos},{self.rest}"

    @classmethod
    def at(cls, pos: LogPos, rest: int = 0) -> ReplayLink:
        return cls(pos.seq, pos.origin, pos.offset, rest)

    @classmethod
    def parse(cls, value: str | None) -> ReplayLink | None:
        """``log-N-<origin>,<pos>,<rest>``; None for anything else."""
        if not value:
            return None
        head, sep, rest = value.rpartition(",")
        pos, r = LogPos.parse(head), _int(rest)
        if not sep or pos is None or not pos.origin or r is None:
            return None
        return cls.at(pos, r)


@dataclass(frozen=True, slots=True)
class Version:
    """The value of ``version-<seq>-<host>``: the digest of a finished log file, chained.

    ``digest`` covers the file's records *and* the previous version's digest, so two nodes with
    equal digests for one number share the whole history up to there, and two different
    digests for one number are a split brain. After the colon the previous version's digest
    and, as the original writes it, its file and length (``prev``), so a node can follow the
    chain backwards without the older entries.
    """

    digest: str
    seq: int
    origin: str
    length_bytes: int
    prev_digest: str = ZERO_DIGEST
    prev: LogPos | None = None  # the previous file and its length, when the value names them

    @property
    def name(self) -> str:
        return log_name(self.seq, self.origin)

    @classmethod
    def of(cls, digest: str, seq: int, origin: str, length_bytes: int, prev: Version | None) -> Version:
        """The version of log ``seq`` of ``origin``, chained to ``prev`` (None: the chain's start)."""
        if prev is None:
            return cls(digest, seq, origin, length_bytes, ZERO_DIGEST, LogPos(max(seq - 1, 0), 0, origin))
        return cls(digest, seq, origin, length_bytes, prev.digest, LogPos(prev.seq, prev.length_bytes, prev.origin))

    def __str__(self) -> str:
        tail = f",{self.prev}" if self.prev is not None and self.prev.origin else ""
        return f"{self.digest},{log_name(self.seq, self.origin)},{self.length_bytes}:{self.prev_digest}{tail}"

    @staticmethod
    def digest_of(value: Version | None) -> str:
        """The digest a chain continues from: ``value``'s, or the zero digest at its start."""
        return value.digest if value is not None else ZERO_DIGEST

    @classmethod
    def parse(cls, value: str | None) -> Version | None:
        """``<digest>,log-N-<origin>,<length>:<prev digest>[,log-M-<origin>,<length>]``; None otherwise."""
        if not value:
            return None
        head, sep, tail = value.partition(":")
        digest, _, rest = head.partition(",")
        cur = LogPos.parse(rest)
        prev_digest, comma, prev_rest = tail.partition(",")
        prev = LogPos.parse(prev_rest) if comma else None
        if not sep or not _DIGEST_RE.match(digest) or cur is None or not cur.origin \
                or not _DIGEST_RE.match(prev_digest) or (comma and (prev is None or not prev.origin)):
            return None
        return cls(digest, cur.seq, cur.origin, cur.offset, prev_digest, prev)


@dataclass(frozen=True, slots=True)
class ReplayCode:
    """The value of ``actual-<host>/replay-code``, the original's sign convention.

    ``1``: the member is attached and replays (or is the primary). Negative: marsd gave up on
    it, so replay does not run until an operator acts: ``-1,<code>,<offset>`` when replay
    stopped at a damaged record (the log format's damage code and the record's offset), a bare
    ``-1`` when the attach itself failed (its message says why).
    """

    value: int
    damage: str | None = None
    offset: int | None = None

    @classmethod
    def damaged_at(cls, damage: str, offset: int) -> ReplayCode:
        return cls(-1, damage, offset)

    @property
    def stopped(self) -> bool:
        """Replay does not run because marsd gave up on this member (damage or a failed attach)."""
        return self.value < 0

    @property
    def damaged(self) -> bool:
        """Replay stopped at a damaged log record (not merely a failed attach)."""
        return self.value < 0 and bool(self.damage)

    @property
    def brief(self) -> str:
        """``<code>@<offset>`` for damage (the diskstate ``DefectiveLog[...]`` shows it), else the code."""
        if self.damage:
            return f"{self.damage}@{self.offset}" if self.offset is not None else self.damage
        return str(self.value)

    def __str__(self) -> str:
        if self.damage is None and self.offset is None:
            return str(self.value)
        return f"{self.value},{self.damage or ''},{'' if self.offset is None else self.offset}"

    @classmethod
    def parse(cls, value: str | None) -> ReplayCode | None:
        if not value:
            return None
        parts = value.split(",")
        try:
            code = int(parts[0])
        except ValueError:
            return None
        if len(parts) > 3:
            return None
        damage = parts[1] if len(parts) > 1 and parts[1] else None
        offset = _int(parts[2]) if len(parts) > 2 else None
        return cls(code, damage, offset)
