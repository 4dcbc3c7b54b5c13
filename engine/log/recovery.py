"""Start-up recovery: bring the data device up to the end of the log, cut a torn tail, stop at damage.

After a crash the data device may lack writes that were acknowledged (they were durable in the log
but the device had not been synced), and the log may end in a torn record that was never
acknowledged. Recovery replays every record after the last synced replay position, in order
(replay is idempotent, so starting too early is harmless), cuts a torn tail of the *newest* log
file, and refuses to go on past real damage: a bad record in the middle, a gap in the record
sequence, or a torn end of an older file. Then it syncs the device and advances ``replay-<host>``.

A refusal names the file, the offset and the reason, and leaves everything on disk as it was, so
nothing acknowledged is destroyed by the attempt.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ..device import DataDevice
from ..errors import MarsError
from ..tree import Tree, fsync_dir, res_dir
from . import format as lf
from .apply import apply_record
from .files import LogFile, VersionHasher, list_logs, read_replay, read_version, replay_path, version_path
from .values import ReplayLink, Version, first_record, log_name
from .writer import LogState

log = logging.getLogger("mars.recovery")


class LogDamage(MarsError):
    """Replay stopped at a damaged record; carries the LogCorruption for the tree and the status.

    Whether the data device already holds the writes behind the damage decides what is lost: if
    replay had passed that point before, the device is complete and only the log copy (what
    secondaries fetch) is damaged; otherwise the device holds the state just before the record.
    """

    def __init__(self, res: str, damage: lf.LogCorruption, device_complete: bool) -> None:
        if device_complete:
            state = ("the data device already holds every write (replay had passed this point); only the "
                     "log is damaged")
        else:
            state = "the data device holds the state before that record"
        super().__init__(
            f"replay stopped: {damage}; {state}; nothing is served",
            "keep the log for inspection; restore the resource from a good copy, or accept the loss with "
            f"'marsadm log-truncate {res} --force' (sets the damaged part aside and serves again)",
            subject=f"resource {res}",
        )
        self.damage = damage
        self.device_complete = device_complete


@dataclass(slots=True)
class RecoveryResult:
    state: LogState
    replayed_records: int
    replayed_bytes: int
    cut: lf.LogCorruption | None  # the torn tail that was cut, if any


def recover(tree: Tree, res: str, device: DataDevice) -> RecoveryResult:
    """Blocking: replay the log onto ``device`` and return where appends continue."""
    host = tree.host
    logs = list_logs(tree, res)
    link = read_replay(tree, res, host)
    if link is not None and link.origin != host and link.pos == 0 and not any(f.seq == link.seq for f in logs):
        # Replay stands at the start of another origin's file that nothing has been fetched of
        # yet (a handover right after a join, or a forced one before any fetch): the history
        # here holds none of it, and goes on after it. An empty copy says so.
        (tree.root / res_dir(res) / log_name(link.seq, link.origin)).touch(mode=0o600)
        logs = list_logs(tree, res)
    if not logs:
        first = tree.root / res_dir(res) / log_name(max(1, tree.get_int(f"{res_dir(res)}/maxnr")), host)
        first.touch(mode=0o600)
        logs = list_logs(tree, res)
    link = read_replay(tree, res, host) or ReplayLink(logs[0].seq, logs[0].origin, 0, 0)
    todo_files = [f for f in logs if f.seq >= link.seq]
    if not todo_files:
        raise MarsError(
            f"the replay position {link} points past every log file present",
            "the log files were removed by hand; restore them or recreate the resource",
            subject=f"resource {res}",
        )
    check_contiguous(res, todo_files)

    replayed = 0
    replayed_bytes = 0
    state: LogState | None = None
    cut: lf.LogCorruption | None = None
    for i, f in enumerate(todo_files):
        newest = i == len(todo_files) - 1
        # The file appends went to: the newest, or an older one whose rotation was asked for
        # (marsadm created the empty next file) but not yet done (no version entry). Only there
        # can a torn tail be an interrupted append rather than damage.
        open_for_appends = newest or (tree.get(version_path(res, f.seq, f.origin)) is None
                                      and all(g.size() == 0 for g in todo_files[i + 1:]))
        prev_version = read_version(tree, res, f.seq - 1, host) or read_version(tree, res, f.seq - 1, f.origin)
        hasher = VersionHasher(Version.digest_of(prev_version))
        start_apply = link.pos if f.seq == link.seq else 0

        def on_record(d: lf.Decoded, start_apply: int = start_apply, hasher: VersionHasher = hasher) -> None:
            nonlocal replayed, replayed_bytes
            hasher.update(d.check)
            if d.offset >= start_apply:
                apply_record(device, d.record)
                replayed += 1
                replayed_bytes += d.record.length

        result = f.scan(on_record)
        if result.error is not None:
            err = result.error
            if open_for_appends and (err.torn or _unsynced_hole(f.path, err.offset)):
                log.warning("resource %s: %s; cutting %d bytes of torn tail (never acknowledged)",
                            res, err, f.size() - err.offset)
                with open(f.path, "r+b") as fh:
                    fh.truncate(err.offset)
                    os.fdatasync(fh.fileno())
                cut = err
            else:
                device.fdatasync()
                if result.end > start_apply or f.seq > link.seq:
                    tree.set(replay_path(res, host), ReplayLink(f.seq, f.origin, max(result.end, start_apply), 0))
                complete = f.seq < link.seq or (f.seq == link.seq and err.offset < link.pos)
                raise LogDamage(res, err, complete)
        st = LogState(seq=f.seq, path=f.path, end=result.end,
                      next_record=first_record(f.seq) + result.count,
                      hasher=hasher, prev_version=prev_version)
        if not newest and tree.get(version_path(res, f.seq, host)) is None:
            # A crash between rotation and its version entry, or a file of another origin this
            # node replayed last: write our version now from the scan.
            tree.set(version_path(res, f.seq, host),
                     Version.of(hasher.hexdigest(), f.seq, f.origin, result.end, prev_version))
        state = st
    assert state is not None
    last = todo_files[-1]
    if last.origin != host or tree.get(version_path(res, last.seq, host)) is not None:
        state = _continue_after(tree, res, last, state)
    device.fdatasync()
    tree.set(replay_path(res, host), ReplayLink(state.seq, host, state.end, 0))
    return RecoveryResult(state, replayed, replayed_bytes, cut)


def _continue_after(tree: Tree, res: str, last: LogFile, state: LogState) -> LogState:
    """This node becomes primary where the history ends in a file it must not append to: a
    file of another origin (a handover or a forced failover: the old primary's last file) or
    its own file that it finished when it stopped being primary. The history goes on in a new
    file of this node, chained to this node's version of that last file."""
    host = tree.host
    mine = read_version(tree, res, last.seq, host)
    if mine is None:
        mine = Version.of(state.hasher.hexdigest(), last.seq, last.origin, state.end, state.prev_version)
        tree.set(version_path(res, last.seq, host), mine)
    seq = last.seq + 1
    path = last.path.parent / log_name(seq, host)
    with open(path, "ab"):
        pass
    os.chmod(path, 0o600)
    fsync_dir(path.parent)
    if tree.get_int(f"{res_dir(res)}/maxnr") < seq:
        tree.set(f"{res_dir(res)}/maxnr", seq)
    log.info("resource %s: the history goes on after %s (%d bytes) in %s", res, last.name, mine.length_bytes,
             path.name)
    return LogState(seq=seq, path=path, end=0, next_record=first_record(seq),
                    hasher=VersionHasher(mine.digest), prev_version=mine)


def _unsynced_hole(path, offset: int) -> bool:
    """Whether the log holds zeros where its next record should start: a power cut kept a later
    part of the appends since the last fdatasync but not this one (the file system had not
    written it yet). Nothing from here on was acknowledged (an acknowledgement waits for the
    fdatasync, which would have made these bytes durable too), so it is a torn tail; cut it."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(8)
    return len(head) > 0 and head == bytes(len(head))


def check_contiguous(res: str, files: list[LogFile]) -> None:
    for a, b in zip(files, files[1:]):
        if b.seq == a.seq:
            raise MarsError(
                f"two log files with number {a.seq}: {a.name} and {b.name} (split brain)",
                f"keep the history you trust and remove the other file from resource-{res}",
                subject=f"resource {res}",
            )
        if b.seq != a.seq + 1:
            raise MarsError(
                f"log files are not contiguous: {a.name} is followed by {b.name}",
                "a log file in between is missing; restore it from a backup or recreate the resource",
                subject=f"resource {res}",
            )
