"""Replication under faults, with real marsd processes on 127.0.0.2 (primary a) and 127.0.0.3 (b).

* a secondary SIGKILLed in the middle of its fast full sync resumes from ``syncstatus-b``;
* a secondary SIGKILLed while it fetches the log resumes from its local log copies;
* a cut link (iptables DROP on the cluster's peer port) is reported in b's tree and healed by
  fetching, without a new full sync;
* with replay paused, b's device stays exactly at a write-order prefix of the primary's history
  while b keeps fetching, and reaches the final state once replay resumes.

Nothing here slows the engine down: the tests pick sizes and moments instead, and synchronise
only on tree entries, counters and files, with deadlines (``wait_until``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time

import pytest

from harness import Node, run, start_cluster, wait_until

from mars.engine.log.files import list_logs
from mars.engine.log.values import parse_log_name
from mars.engine.tree import Tree

MiB = 1 << 20
RES = "r"


# -- helpers ---------------------------------------------------------------------------------------


def sha(path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    left = limit if limit is not None else 1 << 62
    with open(path, "rb") as f:
        while left > 0 and (chunk := f.read(min(4 * MiB, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def rd(node: Node, rel: str) -> str | None:
    return node.tree_value(f"resource-{RES}/{rel}")


def rd_int(node: Node, rel: str, default: int = -1) -> int:
    v = rd(node, rel)
    try:
        return int(v) if v is not None else default
    except ValueError:
        return default


def counter(node: Node, name: str) -> int:
    """A counter of the current marsd life (``resource-r/actual-<host>/<name>``); -1 if absent."""
    return rd_int(node, f"actual-{node.host}/{name}")


def set_entry(node: Node, rel: str, value: str | int) -> None:
    """Write one tree entry of ``node`` the way marsadm does (atomic symlink, newer Lamport stamp)."""
    Tree(node.mars_dir, node.host).set(rel, value)


def forget_counters(node: Node) -> None:
    """Tombstone the life counters of a dead marsd, so the next life's values cannot be mistaken
    for the last life's (marsd publishes them only once its runtime objects exist)."""
    assert node.proc is None, "only while marsd is down"
    t = Tree(node.mars_dir, node.host)
    for name in ("sync-copied-bytes", "sync-chunks-equal", "sync-chunks-copied", "fetch-bytes", "replay-bytes"):
        t.delete(f"resource-{RES}/actual-{node.host}/{name}", durable=False)


def log_files(node: Node, min_seq: int = 0) -> dict[str, int]:
    """``{log file name: size}`` of the resource's log files in ``node``'s tree."""
    tree = Tree(node.mars_dir, node.host)
    return {f.name: f.size() for f in list_logs(tree, RES) if f.seq >= min_seq}


def first_seq(node: Node) -> int:
    names = log_files(node)
    return min(parse_log_name(n)[0] for n in names) if names else 0


def log_end(primary: Node) -> str | None:
    """The replay link of the end of the primary's newest log file (``log-N-a,<size>,0``)."""
    logs = log_files(primary)
    if not logs:
        return None
    last = max(logs, key=lambda n: parse_log_name(n)[0])
    return f"{last},{logs[last]},0"


def caught_up(primary: Node, sec: Node) -> bool:
    """Writes have stopped and ``sec`` has replayed all of them.

    Not just ``replay-b == replay-a``: the primary moves ``replay-a`` only at its checkpoints (up
    to --checkpoint-interval after a write), so right after a burst of writes both can still
    name the same older position while b lacks the burst. Both must name the end of the log.
    """
    want = log_end(primary)
    return (want is not None and rd(sec, f"syncstatus-{sec.host}") == rd(primary, "size")
            and rd(primary, f"replay-{primary.host}") == want and rd(sec, f"replay-{sec.host}") == want)


def state(*nodes: Node) -> str:
    """The replication entries and local log files of each node, for failure messages."""
    out = []
    for n in nodes:
        d = n.mars_dir / f"resource-{RES}"
        lines = []
        if d.is_dir():
            for dirpath, _, files in os.walk(d):
                for f in sorted(files):
                    p = os.path.join(dirpath, f)
                    rel = os.path.relpath(p, d)
                    if f.startswith(".tmp"):
                        continue
                    if os.path.islink(p):
                        if re.match(r"(syncstatus|syncpos|replay|size|primary)|actual-|todo-", rel):
                            lines.append(f"  {rel} -> {os.readlink(p)}")
                    elif f.startswith("log-"):
                        lines.append(f"  {rel}: {os.path.getsize(p)} bytes")
        for f in sorted((n.mars_dir / f"actual-{n.host}").glob("msg-*")):  # none if no such directory
            lines.append(f"  actual-{n.host}/{f.name} -> {os.readlink(f)}")
        out.append(f"--- tree of {n.host} (marsd {'running' if n.proc and n.proc.poll() is None else 'down'}) ---\n"
                   + "\n".join(lines))
    return "\n".join(out)


@contextlib.contextmanager
def diagnostics(*nodes: Node):
    """On any failure inside, print each node's replication state and marsd log (pytest shows it)."""
    try:
        yield
    except BaseException:
        print(state(*nodes))
        for n in nodes:
            print(f"--- marsd log of {n.host} (tail) ---\n{n.log()}")
        raise


class Writer(threading.Thread):
    """Writes on the primary's NBD export from a thread until ``total`` bytes or ``stop()``.

    ``chunk``-sized writes of fresh random data at random chunk-aligned offsets in [0, span);
    ``pace`` seconds between writes (0: as fast as the primary acknowledges).
    """

    def __init__(self, uri: str, span: int, total: int, chunk: int = MiB, pace: float = 0.0, seed: int = 1) -> None:
        super().__init__(daemon=True)
        self.uri, self.span, self.total, self.chunk, self.pace = uri, span, total, chunk, pace
        self.rnd = random.Random(seed)
        self.written = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        import nbd
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            try:
                while self.written < self.total and not self._halt.is_set():
                    off = self.rnd.randrange(self.span // self.chunk) * self.chunk
                    h.pwrite(os.urandom(self.chunk), off)
                    self.written += self.chunk
                    if self.pace:
                        self._halt.wait(self.pace)  # pacing the workload, not synchronisation
            finally:
                h.shutdown()
        except BaseException as e:  # noqa: BLE001 - reported by finish()
            self.error = e

    def stop(self) -> None:
        self._halt.set()

    def finish(self, timeout: float = 300) -> int:
        self.join(timeout)
        assert not self.is_alive(), "writer did not finish"
        if self.error is not None:
            raise AssertionError(f"writing on the primary failed: {self.error!r}")
        return self.written


def make_pair(workdir) -> tuple[Node, Node]:
    a, b = start_cluster(*workdir, "ab")
    return a, b


def create(a: Node, size: int) -> None:
    a.marsadm("create-resource", RES, str(a.base / "a.img"), str(size))


def join(a: Node, b: Node, size: int) -> None:
    wait_until(lambda: rd(b, "size") == str(size) and rd(b, "replay-a") is not None, 30,
               "b to learn resource r and a's log position")
    b.marsadm("join-resource", RES, str(b.base / "b.img"), "--create")


def differing_blocks(x, y, block: int = 4096) -> list[int]:
    """Offsets of the ``block``-sized blocks in which two files differ."""
    out = []
    with open(x, "rb") as fx, open(y, "rb") as fy:
        off = 0
        while True:
            bx, by = fx.read(4 * MiB), fy.read(4 * MiB)
            if not bx and not by:
                return out
            if bx != by:
                out.extend(off + i for i in range(0, max(len(bx), len(by)), block)
                           if bx[i:i + block] != by[i:i + block])
            off += max(len(bx), len(by))


def pread_file(path, n: int, offset: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def converge(a: Node, b: Node, timeout: float = 180) -> None:
    """Writes have stopped: wait until b replayed everything, then compare the whole images."""
    wait_until(lambda: caught_up(a, b), timeout, "b to catch up with a")
    ia, ib = a.base / "a.img", b.base / "b.img"
    if sha(ib) != sha(ia):
        diff = differing_blocks(ia, ib)
        samples = []
        for o in diff[:3]:
            xa, xb = pread_file(ia, 4096, o), pread_file(ib, 4096, o)
            i = next(i for i in range(min(len(xa), len(xb))) if xa[i] != xb[i])
            samples.append((o + i, xa[max(0, i - 8):i + 32], xb[max(0, i - 8):i + 32]))
        raise AssertionError(f"b's image differs from the primary's in {len(diff)} blocks of 4 KiB, at offsets "
                             f"{diff[:10]}...; first difference (offset, a, b): {samples}")


def random_image(path, nbytes: int, seed: int) -> None:
    """An image file full of pseudo-random data (every 1 MiB chunk different from a hole)."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(rnd.randbytes(MiB))


# -- 1. SIGKILL during the fast full sync ------------------------------------------------------------


@pytest.mark.slow
def test_secondary_killed_during_sync_resumes_from_syncstatus(workdir):
    # The sync publishes its position once a second and copies 100-250 MiB/s here (faster on an
    # idle machine): with 1 GiB, a position between 20 % and 80 % is always published. The data
    # is on a's image before create-resource (an existing disk becoming a resource), so it goes
    # through no log: the sync alone carries it.
    size = 1024 * MiB
    a, b = make_pair(workdir)
    with diagnostics(a, b):
        random_image(a.base / "a.img", size, seed=1)
        create(a, size)
        join(a, b, size)
        seen: list[int] = []

        def midway() -> bool:
            s = rd_int(b, "syncstatus-b", 0)
            if not seen or seen[-1] != s:
                seen.append(s)
            assert s <= 0.8 * size, f"the sync passed 80 % unseen (positions seen: {seen}); use a bigger resource"
            return 0.2 * size <= s

        wait_until(midway, 120, "b's sync position to pass 20 %", interval=0.005)
        b.kill()
        at_kill = rd_int(b, "syncstatus-b", 0)
        assert 0.2 * size <= at_kill <= 0.8 * size, f"sync position {at_kill} at the kill"
        # Some writes while b is down: the resumed sync and the replay must bring them over too.
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {at_kill // 2} 3M",
             "-c", f"write -P 0xa5 {size - 5 * MiB} 2M", a.uri(RES)])
        forget_counters(b)
        b.start()
        wait_until(lambda: rd(b, "syncstatus-b") == str(size), 180, "the resumed sync to finish")
        # The first life died before its "sync done" line: the one in the log is the new life's.
        done = wait_until(lambda: re.search(r"sync done: .* \((\d+) bytes\)", b.log()), 30, "b to log the sync's end")
        copied = int(done.group(1))
        wait_until(lambda: counter(b, "sync-copied-bytes") == copied, 10, "the new life's sync-copied-bytes")
        assert b.log().count("sync done") == 1
        # Every chunk past the resume point is copied at most once (the ones written meanwhile too):
        # the bound is exact; the slack only absorbs a chunk of rounding.
        slack = 2 * MiB
        print(f"sync positions seen {seen}; killed at {at_kill} ({100 * at_kill / size:.0f} %); "
              f"resumed life copied {copied} bytes, equal chunks {counter(b, 'sync-chunks-equal')}, "
              f"copied chunks {counter(b, 'sync-chunks-copied')}")
        assert copied <= size - at_kill + slack, (
            f"the resumed sync copied {copied} bytes, more than the {size - at_kill} left after "
            f"syncstatus {at_kill} (+{slack} slack): it started over")
        converge(a, b)


# -- 2. SIGKILL while fetching and replaying -------------------------------------------------------


@pytest.mark.slow
def test_secondary_killed_during_fetch_resumes_from_its_log_copies(workdir):
    size = 64 * MiB
    a, b = make_pair(workdir)
    with diagnostics(a, b):
        create(a, size)
        join(a, b, size)
        wait_until(lambda: caught_up(a, b), 60, "b's initial sync and replay")
        w = Writer(a.uri(RES), size, total=400 * MiB, chunk=MiB, seed=2)
        w.start()
        try:
            last = [counter(b, "fetch-bytes")]

            def fetching() -> bool:
                now = counter(b, "fetch-bytes")
                grew = now > last[0]
                last[0] = now
                return grew and now >= 48 * MiB

            wait_until(fetching, 120, "b's fetch-bytes to pass 48 MiB and still grow")
            assert w.written < w.total, "the writer finished before b was killed: make it write more"
            fetched_first_life = counter(b, "fetch-bytes")
            b.kill()
            local = log_files(b)
            at_kill = sum(local.values())
            written_at_kill = w.written
            # a keeps writing while b is down, and starts a new log file in the middle: the restarted
            # fetcher must finish the file it was in, then move on.
            wait_until(lambda: w.written >= written_at_kill + 32 * MiB or not w.is_alive(), 120,
                       "32 MiB more writes on a while b is down")
            a.marsadm("log-rotate", RES)
            wait_until(lambda: w.written >= written_at_kill + 64 * MiB or not w.is_alive(), 120,
                       "64 MiB more writes on a while b is down")
            forget_counters(b)
            at_restart = sum(log_files(b).values())
            assert at_restart == at_kill, "b's log copies changed while its marsd was dead"
            b.start()
            # The writer goes on to its total while the new life fetches.
        except BaseException:
            w.stop()
            raise
        w.finish()
        wait_until(lambda: caught_up(a, b), 180, "b to catch up with a")
        primary_logs = log_files(a, min_seq=min(parse_log_name(n)[0] for n in local))
        total = sum(primary_logs.values())
        slack = 4 * MiB  # a torn last record (<= 1 MiB + header) is cut at restart and fetched again
        # The counter is published once per reconcile round: wait until it covers what b lacked.
        wait_until(lambda: counter(b, "fetch-bytes") >= total - at_restart - slack, 10,
                   f"the new life's fetch-bytes to reach {total - at_restart - slack}")
        refetched = counter(b, "fetch-bytes")
        print(f"first life fetched {fetched_first_life} bytes; b's log copies at restart {at_restart} "
              f"({local}); primary's logs {total} ({primary_logs}); new life fetched {refetched}; "
              f"{w.written >> 20} MiB written on a, {written_at_kill >> 20} MiB of it before the kill")
        assert 0 < at_restart < total and len(primary_logs) >= 2
        assert log_files(b, min_seq=first_seq(b)) == primary_logs, "b's log copies differ from a's logs"
        assert refetched <= total - at_restart + slack, (
            f"the new life fetched {refetched} bytes, more than the {total - at_restart} it lacked "
            f"(+{slack} slack): it fetched again what it had")
        converge(a, b)


# -- 3. a cut link -----------------------------------------------------------------------------------


def _have_iptables() -> bool:
    if os.environ.get("MARS_TEST_NO_IPTABLES"):
        return False  # exercise the SIGSTOP fallback
    if shutil.which("iptables") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "iptables"], capture_output=True, timeout=300)
    if shutil.which("iptables") is None:
        return False
    return subprocess.run(["iptables", "-w", "-L", "INPUT", "-n"], capture_output=True).returncode == 0


def _cut_rules(a: Node, b: Node) -> list[list[str]]:
    """DROP every packet to or from the peer-link listeners of a and b (this cluster's port only).

    The links are made without binding a source address, so on loopback their source is
    127.0.0.1, not the node's address: the rules match the listening ends (address and port),
    both directions. In a two-node cluster that is exactly the a<->b link; other clusters on
    this machine use other ports and are not touched.
    """
    p = str(a.port)
    rules = []
    for n in (a, b):
        rules.append(["INPUT", "-p", "tcp", "-d", n.ip, "--dport", p, "-j", "DROP"])
        rules.append(["INPUT", "-p", "tcp", "-s", n.ip, "--sport", p, "-j", "DROP"])
    return rules


class Watch(threading.Thread):
    """Samples b's sync state every 50 ms: a cut link must never start a new full sync."""

    def __init__(self, b: Node, size: int) -> None:
        super().__init__(daemon=True)
        self.b, self.size = b, size
        self.bad: list[str] = []
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):  # sampling period of a monitor, not synchronisation
            s, syncing = rd(self.b, "syncstatus-b"), rd(self.b, "actual-b/is-syncing")
            self.samples += 1
            if s != str(self.size) or syncing == "1":
                self.bad.append(f"syncstatus-b={s} is-syncing={syncing}")

    def stop(self) -> list[str]:
        self._halt.set()
        if self.is_alive():
            self.join(5)
        return self.bad


@pytest.mark.slow
def test_cut_link_is_reported_and_healed_without_full_sync(workdir):
    size = 64 * MiB
    a, b = make_pair(workdir)
    use_iptables = _have_iptables()
    with diagnostics(a, b):
        create(a, size)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 16M", "-c", f"write -P 0x22 {size - 8 * MiB} 8M",
             a.uri(RES)])
        join(a, b, size)
        wait_until(lambda: caught_up(a, b), 60, "b's initial sync and replay")
        copied_by_sync = counter(b, "sync-copied-bytes")
        chunks_copied = counter(b, "sync-chunks-copied")
        assert copied_by_sync >= 24 * MiB, "the initial sync should have copied the written chunks"
        watch = Watch(b, size)
        watch.start()
        # ~10 MiB/s of 256 KiB writes on a, for as long as the cut lasts.
        w = Writer(a.uri(RES), size, total=4096 * MiB, chunk=256 << 10, pace=0.02, seed=3)
        w.start()
        try:
            rules = _cut_rules(a, b)
            inserted: list[list[str]] = []
            stopped = False
            try:
                f0 = counter(b, "fetch-bytes")
                wait_until(lambda: counter(b, "fetch-bytes") > f0 + 2 * MiB, 30, "b to fetch a's new writes")
                t_cut = time.monotonic()
                if use_iptables:
                    for r in rules:
                        run(["iptables", "-w", "-I", *r])
                        inserted.append(r)
                else:
                    # Fallback where iptables cannot work: freeze b (its links go silent the same way).
                    b.proc.send_signal(signal.SIGSTOP)
                    stopped = True
                written_at_cut = w.written
                if use_iptables:
                    reported = wait_until(
                        lambda: b.tree_value("actual-b/msg-peer-a") or rd(b, "actual-b/msg-warn-fetch"), 60,
                        "b to report the cut link in its tree")
                else:
                    reported = wait_until(lambda: a.tree_value("actual-a/msg-peer-b"), 60,
                                          "a to report the silent peer b")
                t_report = time.monotonic() - t_cut
                # a keeps serving its writers; nothing reaches b (the rules really cut the link).
                f1, w1 = counter(b, "fetch-bytes"), w.written
                wait_until(lambda: w.written >= max(written_at_cut + 32 * MiB, w1 + 8 * MiB), 60,
                           "a to keep writing during the cut")
                during = w.written - written_at_cut
                if use_iptables:
                    assert counter(b, "fetch-bytes") == f1, "b kept fetching through the cut"
            finally:
                for r in inserted:
                    subprocess.run(["iptables", "-w", "-D", *r], capture_output=True)
                if stopped:
                    b.proc.send_signal(signal.SIGCONT)
            t_heal = time.monotonic()
            if use_iptables:
                left = subprocess.run(["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True).stdout
                assert f"--dport {a.port} " not in left and f"--sport {a.port} " not in left, left
            # Heal: a little more writing, then stop and let b catch up by fetching.
            w2 = w.written
            wait_until(lambda: w.written >= w2 + 4 * MiB, 30, "writes after the heal")
            w.stop()
            w.finish()
            converge(a, b, timeout=240)
            t_converged = time.monotonic() - t_heal
            wait_until(lambda: b.tree_value("actual-b/msg-peer-a") is None
                       and rd(b, "actual-b/msg-warn-fetch") is None, 30, "b's link messages to clear")
        finally:
            w.stop()
            bad = watch.stop()
        print(f"{'iptables' if use_iptables else 'SIGSTOP'} cut: reported after {t_report:.1f} s: {reported!r}; "
              f"{during >> 20} MiB written on a during the cut; b identical {t_converged:.1f} s after the heal; "
              f"{watch.samples} sync samples")
        assert not bad, f"b left the synced state during the cut: {bad[:5]}"
        assert counter(b, "sync-copied-bytes") == copied_by_sync and \
            counter(b, "sync-chunks-copied") == chunks_copied, "a second full sync ran"
        assert b.log().count("sync done") == 1, "a second full sync ran"


# -- 4. paused replay keeps a write-order prefix ----------------------------------------------------


BLOCK = 4096


def _ops(n: int, start: int = 0) -> list[tuple[int, bytes]]:
    """Write i puts block i (pattern naming i); every third write also overwrites an earlier block."""
    out = []
    for i in range(start, start + n):
        out.append((i, (f"write {i:06d} block {i:06d};".encode() * 200)[:BLOCK]))
        if i % 3 == 2:
            j = (i * 7) % (i + 1) // 2
            out.append((j, (f"overwrite {i:06d} of block {j:06d};".encode() * 200)[:BLOCK]))
    return out


def _apply(model: bytearray, op: tuple[int, bytes]) -> None:
    blk, data = op
    model[blk * BLOCK:(blk + 1) * BLOCK] = data


def _prefix_index(models_from: bytearray, ops: list[tuple[int, bytes]], image: bytes) -> int | None:
    """The k for which ``image`` equals the model after the first k of ``ops``; None if none."""
    model = bytearray(models_from)
    found = None
    if bytes(model) == image:
        found = 0
    for k, op in enumerate(ops, 1):
        _apply(model, op)
        if bytes(model) == image:
            found = k  # an overwrite may repeat an earlier state: the latest k is reported
    return found


def test_paused_replay_keeps_a_write_order_prefix(workdir):
    import nbd

    size = 64 * MiB
    nblocks = 400
    region = nblocks * BLOCK
    a, b = make_pair(workdir)
    with diagnostics(a, b):
        create(a, size)
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0xee 0 {region}", a.uri(RES)])
        join(a, b, size)
        wait_until(lambda: caught_up(a, b), 60, "b's initial sync and replay")
        img_b = b.base / "b.img"
        h = nbd.NBD()
        h.connect_uri(a.uri(RES))
        try:
            models: list[bytearray] = [bytearray(h.pread(region, 0))]
            all_ops: list[list[tuple[int, bytes]]] = []
            for phase, (first, count) in enumerate([(0, 200), (200, 200)]):
                set_entry(b, f"resource-{RES}/todo-b/allow-replay", 0)
                wait_until(lambda: rd(b, "actual-b/is-replaying") == "0", 10, "b to pause replay")
                replay_at_pause = rd(b, "replay-b")
                rest_at_pause = sha(img_b)
                fetched0 = counter(b, "fetch-bytes")
                ops = _ops(count, first)
                for blk, data in ops:
                    h.pwrite(data, blk * BLOCK)  # synchronous: acknowledged, hence logged, in this order
                all_ops.append(ops)
                final = bytearray(models[-1])
                for op in ops:
                    _apply(final, op)
                assert h.pread(region, 0) == bytes(final), "the primary does not hold the model's final state"
                # b keeps fetching: all of a's log reaches b while its device stays put.
                wait_until(lambda: log_files(b) == log_files(a), 30, "b to fetch everything a logged")
                wait_until(lambda: counter(b, "fetch-bytes") - fetched0 >= len(ops) * BLOCK, 10,
                           "b's fetch-bytes to count the fetched writes")
                assert rd(b, "actual-b/is-replaying") == "0" and rd(b, "replay-b") == replay_at_pause
                with open(img_b, "rb") as f:
                    got = f.read(region)
                k = _prefix_index(models[-1], ops, got)
                assert k is not None, f"phase {phase}: b's device is no write-order prefix of the primary's history"
                assert k == 0, f"phase {phase}: b's device moved to prefix {k} of {len(ops)} with replay paused"
                assert sha(img_b) == rest_at_pause, f"phase {phase}: b's device changed with replay paused"
                print(f"phase {phase}: {len(ops)} writes, {counter(b, 'fetch-bytes') - fetched0} bytes fetched, "
                      f"b stayed at prefix {k}")
                models.append(final)
                set_entry(b, f"resource-{RES}/todo-b/allow-replay", 1)
                converge(a, b, timeout=60)
                with open(img_b, "rb") as f:
                    assert f.read(region) == bytes(final), f"phase {phase}: b did not reach the final state"
        finally:
            h.shutdown()


def test_a_finished_log_copy_cut_short_by_a_crash_is_fetched_again(workdir):
    """Log copies are never fsynced (the source keeps the file), so a power cut can take the tail
    of an older, finished copy while a newer one survives. The restarted fetcher must start at the
    short copy, not at the newest: replay, still in the short one, would wait at its end for bytes
    nobody fetches again (found by the power-loss campaign, tests/faults/test_fault_powerloss.py)."""
    size = 16 * MiB
    a, b = make_pair(workdir)
    with diagnostics(a, b):
        create(a, size)
        join(a, b, size)
        wait_until(lambda: caught_up(a, b), 60, "b's initial sync and replay")
        set_entry(b, f"resource-{RES}/todo-b/allow-replay", 0)  # replay stays in the older file
        wait_until(lambda: rd(b, "actual-b/is-replaying") == "0", 10, "b to pause replay")
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x21 0 4M", a.uri(RES)])
        a.marsadm("log-rotate", RES)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 4M 4M", a.uri(RES)])
        wait_until(lambda: len(log_files(a)) >= 2 and log_files(b) == log_files(a), 60,
                   "b's copies to equal a's log files")
        b.kill()
        older = sorted(log_files(b), key=lambda n: parse_log_name(n)[0])[-2]
        full = log_files(b)[older]
        os.truncate(b.mars_dir / f"resource-{RES}" / older, full // 2)  # what the cut left of it
        b.start()
        set_entry(b, f"resource-{RES}/todo-b/allow-replay", 1)
        wait_until(lambda: caught_up(a, b), 60, f"b to fetch the rest of {older} again and catch up")
        assert log_files(b)[older] == full
        assert sha(b.base / "b.img") == sha(a.base / "a.img")
        assert "fetching the rest again" in b.log()
