"""One tree entry as a value: its path, its text and its Lamport stamp.

Its own module because two layers speak of it and neither should depend on the other: the
state tree (:mod:`mars.engine.tree`) reads and writes entries on disk, and the peer protocol
(:mod:`mars.engine.peer.protocol`) carries them between nodes. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DELETED", "Entry"]

#: The value of a deleted entry: a tombstone with a fresh stamp, so the deletion replicates and
#: wins over older values instead of being undone by the next exchange.
DELETED = ".deleted"


@dataclass(frozen=True, slots=True)
class Entry:
    """One tree entry. ``path`` is relative to the tree root; ``stamp_ns`` is its Lamport time."""

    path: str
    value: str
    stamp_ns: int

    @property
    def deleted(self) -> bool:
        return self.value == DELETED
