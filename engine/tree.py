"""The state tree: small entries, each a symlink whose target is the value and whose mtime is
the Lamport timestamp of that value (as in the original ``/mars``).

Why symlinks: one ``rename()`` replaces a value atomically, ``ls -l /mars/...`` shows the whole
state to an operator without any tool, and the timestamp travels with the value so that nodes
exchanging entries can let the newest one win. Deleting writes the value ``.deleted`` with a fresh
stamp instead of unlinking, so that the deletion itself replicates and wins over older values.

Rules kept here, in one place:

* A value is written under a temporary name in the same directory, stamped, then renamed over
  the old one: a reader sees the old or the new value, never a half-written one.
* A new stamp is always newer than the stamp it replaces (``max(clock, old + 1)``), so a local
  overwrite can never lose against the value it overwrote, even if the wall clock stepped back.
* Names starting with ``.tmp`` are in-flight writes and invisible to readers.
* The regular files beside the entries (``log-*`` transaction logs) are not entries; they are the
  log module's business.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .entry import DELETED, Entry
from .errors import MarsError, UsageError

if TYPE_CHECKING:
    from .peer.changes import ChangeIndex

NONE = "(none)"
DEFAULT_MARS_DIR = "/mars"
# Top-level directories that stay on their node: the credential must never travel.
LOCAL_DIRS = frozenset({"cluster"})
#: What a peer's entry may hold and still be stored: a symlink target is at most 4095 bytes
#: (PATH_MAX with its NUL), and a name at most NAME_MAX 255 less the room _write's temporary
#: ".tmp.<pid>.<thread>." prefix takes. The peer protocol allows a little more (4096, 255):
#: such an entry is refused like an unsafe path, not stored half-way.
MAX_TARGET = 4095
MAX_COMPONENT = 255 - 40

# Host and resource names end up in file names and in other hosts' trees: keep them to a
# conservative alphabet (the original's host rule) and away from the words used as selectors.
NAME_RE = re.compile(r"^[A-Za-z0-9_][-A-Za-z0-9_]{0,62}$")
RESERVED_NAMES = frozenset({"none", "all", "any", "full", "empty", "undefined", "remote", "local", "localhost"})


def check_name(kind: str, name: str) -> str:
    """Validate a host or resource name, naming the rule that failed."""
    if not NAME_RE.match(name):
        raise UsageError(
            f"{kind} name {name!r} is not valid",
            "use 1 to 63 characters of letters, digits, '_' and '-', not starting with '-'",
        )
    if name.lower() in RESERVED_NAMES:
        raise UsageError(f"{kind} name {name!r} is reserved", f"choose another {kind} name")
    return name


class LamportClock:
    """A physical Lamport clock in nanoseconds: max(wall clock, newest stamp seen) + strictness.

    Stamps order values across nodes; a stamp from the far future (a peer with a broken clock)
    is still taken, as in the original, but only ``observe`` moves the clock, never a read.
    """

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def now(self) -> int:
        with self._lock:
            t = time.time_ns()
            if t <= self._last:
                t = self._last + 1
            self._last = t
            return t

    def reserve(self, n: int) -> int:
        """The first of ``n`` consecutive stamps, all newer than any given before: what ``n``
        calls of ``now`` in a row would give at the earliest, for a group commit's records
        in one lock instead of ``n``."""
        with self._lock:
            t = time.time_ns()
            if t <= self._last:
                t = self._last + 1
            self._last = t + n - 1
            return t

    def observe(self, stamp_ns: int) -> None:
        with self._lock:
            if stamp_ns > self._last:
                self._last = stamp_ns


class Tree:
    """A node's view of the state tree rooted at ``root`` (``/mars`` by default)."""

    def __init__(self, root: str | os.PathLike[str], host: str, clock: LamportClock | None = None) -> None:
        self.root = Path(root)
        self.host = host
        self.clock = clock or LamportClock()
        #: marsd's index of changes (peer/changes.py); every write through this object reports to it.
        self.changes: ChangeIndex | None = None
        self.wrote = False  # whether anything was written through this object (marsadm then pokes marsd)

    # -- reading -----------------------------------------------------------------------------

    def entry(self, path: str) -> Entry | None:
        """The entry at ``path`` including a ``.deleted`` one; None when there is none.

        In marsd, from its index of the tree (peer/changes.py) once that holds the whole tree:
        a reconcile round reads thousands of entries, and two system calls each made an idle
        node with many resources busy. The index knows every write of marsd itself and every
        peer's; another process's write (marsadm, which then triggers marsd) is indexed by the
        scan marsd runs before its next round. Writing still reads the disk (:meth:`_read`).
        """
        changes = self.changes
        if changes is not None and changes.complete and path.partition("/")[0] not in LOCAL_DIRS:
            e = changes.get(path)
            if e is not None:
                self.clock.observe(e.stamp_ns)
            return e
        return self._read(path)

    def _read(self, path: str) -> Entry | None:
        """The entry at ``path`` as it is on disk."""
        full = self.root / path
        try:
            value = os.readlink(full)
            st = os.lstat(full)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == 22:  # EINVAL: a regular file or directory, not an entry
                return None
            raise
        self.clock.observe(st.st_mtime_ns)
        return Entry(path, value, st.st_mtime_ns)

    def get(self, path: str, default: str | None = None) -> str | None:
        """The live value at ``path``; ``default`` when absent or deleted."""
        e = self.entry(path)
        if e is None or e.deleted:
            return default
        return e.value

    def get_int(self, path: str, default: int = 0) -> int:
        v = parse_int(self.get(path))
        return default if v is None else v

    def exists(self, path: str) -> bool:
        return self.get(path) is not None

    def names(self, directory: str = "") -> list[str]:
        """Names in ``directory`` (entries, files and subdirectories), without in-flight temporaries."""
        try:
            return sorted(n for n in os.listdir(self.root / directory) if not n.startswith(".tmp"))
        except FileNotFoundError:
            return []

    def is_dir(self, path: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.root / path).st_mode)
        except FileNotFoundError:
            return False

    # -- writing -----------------------------------------------------------------------------

    def set(self, path: str, value: str | int, *, durable: bool = True, stamp_ns: int | None = None,
            restamp: bool = False, source: str | None = None) -> Entry:
        """Write ``value`` at ``path`` atomically with a stamp newer than the one it replaces.

        An unchanged value is left alone (its stamp too) unless ``restamp``: a fresh stamp on the
        same value is how an operator says "again" (e.g. retry an attach that failed).
        ``durable`` syncs the directory so the value survives a power loss; fast-changing actual
        state (rates, counters) passes False, desired state from marsadm keeps the default.
        ``source`` is the peer a value came from (apply), None for this node's own writes.
        """
        value = str(value)
        if not value:
            raise ValueError(f"empty value for tree entry {path}")
        if not durable and stamp_ns is None and not restamp and self.changes is not None and self.changes.complete:
            # marsd's own actual state, republished every round and mostly unchanged: the index
            # says so without a system call (only marsd writes these entries).
            known = self.changes.get(path)
            if known is not None and known.value == value:
                return known
        make_dirs((self.root / path).parent)
        old = self._read(path)
        if old is not None and old.value == value and stamp_ns is None and not restamp:
            return old
        stamp = stamp_ns if stamp_ns is not None else self.clock.now()
        if stamp_ns is None and old is not None and stamp <= old.stamp_ns:
            stamp = old.stamp_ns + 1
            self.clock.observe(stamp)
        return self._write(path, value, stamp, durable=durable, source=source, mkdir=False)

    def _write(self, path: str, value: str, stamp: int, *, durable: bool, source: str | None,
               mkdir: bool) -> Entry:
        """Put ``value`` with ``stamp`` at ``path``: a temporary symlink renamed into place."""
        full = self.root / path
        if mkdir:
            make_dirs(full.parent)
        tmp = full.parent / f".tmp.{os.getpid()}.{threading.get_ident()}.{full.name}"
        try:
            os.symlink(value, tmp)
        except FileExistsError:  # left by a write that died half-way
            os.unlink(tmp)
            os.symlink(value, tmp)
        os.utime(tmp, ns=(stamp, stamp), follow_symlinks=False)
        os.replace(tmp, full)
        self.wrote = True
        if durable:
            fsync_dir(full.parent)
        entry = Entry(path, value, stamp)
        if self.changes is not None and path.partition("/")[0] not in LOCAL_DIRS:
            self.changes.note(entry, source)
        return entry

    def delete(self, path: str, *, durable: bool = True) -> None:
        """Mark ``path`` deleted (a replicated tombstone), if it holds a live value."""
        if self.get(path) is not None:
            self.set(path, DELETED, durable=durable)

    def mkdir(self, path: str) -> None:
        make_dirs(self.root / path)

    # -- replication -------------------------------------------------------------------------

    def walk(self, prefixes: tuple[str, ...] = ()) -> list[Entry]:
        """Every entry (tombstones included) under the given top-level prefixes, for peers.

        The credential directory is never listed: it is the one secret of the cluster.
        """
        out: list[Entry] = []
        root = str(self.root)
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(dirpath, root)
            if rel_dir == ".":
                rel_dir = ""
                dirnames[:] = [d for d in dirnames if d not in LOCAL_DIRS]
            for n in filenames:
                if n.startswith(".tmp"):
                    continue
                rel = f"{rel_dir}/{n}" if rel_dir else n
                if prefixes and not rel.startswith(prefixes):
                    continue
                full = os.path.join(dirpath, n)
                try:
                    value = os.readlink(full)
                    st = os.lstat(full)
                except OSError:
                    continue  # a regular file (log, lock, socket) or gone meanwhile
                out.append(Entry(rel, value, st.st_mtime_ns))
        return out

    def apply_all(self, entries, source: str | None = None) -> list[str]:
        """Apply a peer's entries (:meth:`apply`), then make the changed ones durable: the paths changed.

        Entries from peers were never synced, so a power cut lost what this node had learned:
        after a cut right after ``join-cluster`` the node knew no other node's address
        (``ips/``) and neither could pull the other again. One fsync per changed directory per
        batch (not per entry) keeps this cheap; the peers' reported state (``actual-<host>/``,
        ``resource-*/actual-<host>/``), which changes every round and is reported again by the
        peer's next round, is left unsynced: losing it costs nothing.
        """
        changed = [e.path for e in entries if self.apply(e, source)]
        for d in sorted({p.rpartition("/")[0] for p in changed if not reported_state(p)}):
            fsync_dir(self.root / d)
        return changed

    def apply(self, entry: Entry, source: str | None = None) -> bool:
        """Take a peer's entry if it is newer than ours (the newest Lamport stamp wins).

        Equal stamps with different values (two nodes wrote in the same nanosecond) go to the
        greater value, so that every node picks the same one and their trees end up equal.
        """
        self.clock.observe(entry.stamp_ns)
        parts = entry.path.split("/")
        if parts[0] in LOCAL_DIRS or any(p in ("", ".", "..") for p in parts):
            return False  # the credential never comes from a peer; no path leaves the tree
        if (len(entry.value) > MAX_TARGET // 4 and len(entry.value.encode("utf-8", "surrogateescape")) > MAX_TARGET) \
                or any(len(p) > MAX_COMPONENT // 4 and len(p.encode("utf-8", "surrogateescape")) > MAX_COMPONENT
                       for p in parts):
            return False  # the file system could not hold it (ENAMETOOLONG): no node can have written it
        known = self.changes.get(entry.path) if self.changes is not None else None
        if known is not None and _wins(known, entry):
            # What the index holds is on disk or older than what is (writes only move forward),
            # so this answers without a system call: the common case of an exchange.
            return False
        if known is None:
            # A path new here: it must lead through directories only and end where no log file
            # or directory is. One the index holds is an entry already, so it passed this once.
            d = self.root
            for p in parts[:-1]:
                d = d / p
                try:
                    mode = os.lstat(d).st_mode
                except FileNotFoundError:
                    break  # the rest of the way is new: _write makes the directories
                if not stat.S_ISDIR(mode):
                    # An entry is a leaf: never write through one into elsewhere; a log file or a
                    # socket (nbd.sock) is no directory either (ENOTDIR on the way down).
                    return False
            full = self.root / entry.path
            if os.path.lexists(full) and not os.path.islink(full):
                return False  # a log file or directory here: entries never replace those
        mine = self._read(entry.path)  # the disk, not the index: marsadm may have written since
        if mine is not None and _wins(mine, entry):
            return False
        if mine is None and entry.deleted:
            return False  # never create a tombstone for something we never had
        if not entry.deleted and own_position(entry.path, self.host):
            # This node's own disks say where they are, never a peer. Said again with a fresh
            # stamp (the clock saw the peer's), so the peer takes ours and the trees agree
            # instead of differing, and being repaired, every round.
            if mine is not None and not mine.deleted:
                self.set(entry.path, mine.value, durable=False, restamp=True)
            return False
        self._write(entry.path, entry.value, entry.stamp_ns, durable=False, source=source, mkdir=mine is None)
        return True

    def scan(self, seen: dict[str, tuple[int, tuple[str, ...]] | None],
             skip: Callable[[str], bool] | None = None) -> tuple[list[Entry], list[str], list[str]]:
        """The entries of every directory that changed since the last scan, those directories,
        and the directories that are gone.

        Why: marsadm writes the tree from its own process, and an operator may write an entry by
        hand, as with the original's /mars; marsd must notice such writes to send them on. A
        write into a directory (each value is renamed into place) changes the directory's mtime,
        so one ``stat`` per directory finds them, and only a changed directory is read. ``seen``
        maps a directory to its mtime and subdirectories as of the last scan (updated here); a
        directory modified in the last 100 ms is not remembered as read, because another write in
        the same clock tick would leave its mtime as it is. ``skip`` leaves directories out (and
        then no directory counts as gone).
        """
        found: list[Entry] = []
        read: list[str] = []
        recent = time.time_ns() - 100_000_000
        root = str(self.root)
        stack = [""]
        present: set[str] = set()
        while stack:
            rel = stack.pop()
            if skip is not None and skip(rel):
                continue
            full = os.path.join(root, rel) if rel else root
            try:
                mtime = os.stat(full).st_mtime_ns
            except OSError:
                continue
            present.add(rel)
            cached = seen.get(rel)
            if cached is not None and cached[0] == mtime:
                stack.extend(cached[1])
                continue
            subdirs: list[str] = []
            try:
                with os.scandir(full) as it:
                    for d in it:
                        name = d.name
                        if name.startswith(".tmp"):
                            continue
                        path = f"{rel}/{name}" if rel else name
                        if d.is_symlink():
                            try:
                                found.append(Entry(path, os.readlink(d.path), d.stat(follow_symlinks=False).st_mtime_ns))
                            except OSError:
                                continue  # replaced or removed meanwhile: the next scan sees it
                        elif d.is_dir(follow_symlinks=False) and not (not rel and name in LOCAL_DIRS):
                            subdirs.append(path)
            except OSError:
                continue
            read.append(rel)
            seen[rel] = (mtime, tuple(subdirs)) if mtime < recent else None
            stack.extend(subdirs)
        gone = [d for d in seen if d not in present] if skip is None else []
        for d in gone:
            del seen[d]
        return found, read, gone

    # -- names of the tree (the original's, §3.2–3.3 of the upstream reference) ----------------

    def resources(self) -> list[str]:
        """Resources that exist (have a live ``size``), sorted by name."""
        out = []
        for n in self.names():
            if n.startswith("resource-") and self.exists(f"{n}/size"):
                out.append(n[len("resource-"):])
        return out

    def members(self, res: str) -> list[str]:
        """Hosts with a live ``data-<host>`` entry in the resource: its members."""
        d = res_dir(res)
        return sorted(n[len("data-"):] for n in self.entry_names(d) if n.startswith("data-") and self.exists(f"{d}/{n}"))

    def entry_names(self, directory: str) -> list[str]:
        """Names of the entries (tombstones too) directly in ``directory``; in marsd from its index
        (see :meth:`entry`): every round asks each resource for its members, and a listing of
        each resource directory made that an idle node's largest cost after its peer messages."""
        changes = self.changes
        if changes is not None and changes.complete and directory.partition("/")[0] not in LOCAL_DIRS:
            return [p.rpartition("/")[2] for p in changes.paths_in(directory)]
        return self.names(directory)


def _wins(mine: Entry, theirs: Entry) -> bool:
    """Whether our entry stays against a peer's: the newer stamp wins, a tie the greater value."""
    return mine.stamp_ns > theirs.stamp_ns or (mine.stamp_ns == theirs.stamp_ns and mine.value >= theirs.value)


def parse_int(value: str | None) -> int | None:
    """An integer entry's value; None when there is none or it is not an integer."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


#: A node's own positions on its own disks: how far its data device holds the replay of the log
#: (``replay-``), how far its sync got (``syncstatus-``, ``syncpos-``). Only its own disks know.
OWN_POSITIONS = ("replay-", "syncstatus-", "syncpos-")


def own_position(path: str, host: str) -> bool:
    """Whether ``path`` is one of ``host``'s positions on its own disks (``resource-R/replay-<host>``…).

    A peer's copy of such an entry is never taken over the node's own, however new its stamp:
    it says what this node's disk held when the value was written, not what it holds now. After
    a power cut the device may be older than any copy a peer keeps (replay from the last durable
    position was re-applying records when the cut came, and a sync of part of them reached the
    disk), and taking the peer's newer position skipped those records for good: the power-loss
    campaign found a secondary "caught up" with writes missing. A deletion still comes through
    (``leave-resource --host <dead>`` on a survivor removes a dead member's positions).
    """
    parts = path.split("/")
    return len(parts) == 2 and parts[0].startswith("resource-") \
        and any(parts[1] == f"{p}{host}" for p in OWN_POSITIONS)


def reported_state(path: str) -> bool:
    """Whether ``path`` is a node's reported state (``actual-<host>/…``), rewritten every round."""
    return any(part.startswith("actual-") for part in path.split("/")[:2])


def make_dirs(path: Path, mode: int = 0o700) -> None:
    """``mkdir -p`` whose new directories survive a power loss.

    A new directory is an entry of its parent, durable only once the parent is fsynced; without
    that, a power cut after ``create-cluster`` or after the first entry of a new resource left the
    files inside (each synced) unreachable: the tree was gone and marsd refused to start. The
    parent is synced only when a directory was created, so the common case (it exists) costs the
    one mkdir it always cost.
    """
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    except FileNotFoundError:
        make_dirs(path.parent, mode)
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            return
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def res_dir(res: str) -> str:
    return f"resource-{res}"


def todo(res: str, host: str, switch: str) -> str:
    """Desired state, written by marsadm: attach, connect, sync, allow-replay."""
    return f"resource-{res}/todo-{host}/{switch}"


def actual(res: str, host: str, key: str) -> str:
    """Actual state, written by marsd: is-primary, is-attached, open-count, replay-code, ..."""
    return f"resource-{res}/actual-{host}/{key}"


def parse_hosts(value: str | None) -> list[str]:
    """A comma-separated list of hosts (``connect-<host>``), in order; empty for none."""
    return [h for h in (value or "").split(",") if h]


def connect_list(tree: Tree, res: str, host: str) -> list[str]:
    """``connect-<host>``: the nodes ``host`` fetches ``res`` from, most preferred first (the
    original's connect preference list); empty when not set."""
    return parse_hosts(tree.get(f"{res_dir(res)}/connect-{host}"))


def set_connect_list(tree: Tree, res: str, host: str, hosts: list[str]) -> None:
    path = f"{res_dir(res)}/connect-{host}"
    if hosts:
        tree.set(path, ",".join(hosts))
    else:
        tree.delete(path)


def node_actual(host: str, key: str) -> str:
    return f"actual-{host}/{key}"


def tree_host(mars_dir: str | os.PathLike[str]) -> str | None:
    """The host this tree was made for, or None when it does not say.

    create-cluster and join-cluster give the tree one node certificate, ``cluster/node-<host>.pem``
    (credentials.node_paths), for the host that made it; that name is the tree's owner. It stays
    in ``cluster/``, which never travels to other nodes.
    """
    try:
        names = os.listdir(Path(mars_dir) / "cluster")
    except OSError:
        return None
    hosts = [n[len("node-"):-len(".pem")] for n in names if n.startswith("node-") and n.endswith(".pem")]
    return hosts[0] if len(hosts) == 1 and NAME_RE.match(hosts[0]) else None


def machine_name() -> str:
    """This machine's short name (``uname -n`` up to the first dot)."""
    return os.uname().nodename.split(".")[0]


def default_host(mars_dir: str | os.PathLike[str], given: str | None) -> tuple[str, str | None]:
    """(host, note): ``--host`` when given, else the host the tree was made for, else ``uname -n``.

    Why the tree first: a tree made for host ``a`` on a machine named ``vm`` must not make every
    tool act as a host ``vm`` that is no node of the cluster. The note, when there is one, says
    that the tree's name and the machine's name differ, so the operator knows which one is used.
    """
    if given:
        return check_name("host", given), None
    own, machine = tree_host(mars_dir), machine_name()
    if own is None:
        return check_name("host", machine), None
    note = None if own == machine else (f"acting as host {own}, the host this tree was made for "
                                        f"(this machine's name is {machine}; give --host to choose)")
    return own, note


def nodes_of(tree: Tree) -> list[str]:
    """The cluster's nodes as this tree knows them: a live ``ips/ip-<host>`` entry each."""
    return sorted(n[len("ip-"):] for n in tree.names("ips") if n.startswith("ip-") and tree.get(f"ips/{n}"))


def require_node(tree: Tree) -> None:
    """Refuse, before anything is written, to act as a host that is no node of the cluster."""
    if tree.get("uuid") is None or tree.get(f"ips/ip-{tree.host}") is not None:
        return
    known = ", ".join(nodes_of(tree)) or "none"
    raise MarsError(f"host {tree.host} is no node of this cluster (its nodes: {known})",
                    "give --host one of them, or make this host a node first with "
                    "'marsadm join-cluster <ip of a node> --secret-file <file>'")


def mars_dir_from(arg: str | None) -> Path:
    """``--mars-dir`` wins, then ``MARS_DIR``, then ``/mars``."""
    return Path(arg or os.environ.get("MARS_DIR") or DEFAULT_MARS_DIR)


def require_cluster(tree: Tree) -> None:
    if tree.get("uuid") is None:
        raise MarsError(
            f"{tree.root} holds no cluster (no uuid entry)",
            f"run 'marsadm --mars-dir {tree.root} create-cluster' first",
        )
