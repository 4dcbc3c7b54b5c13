"""Partitions of a three-node cluster on a network of its own (netns.py), with writes going on.

a is the primary of r (8 MiB), b and c its secondaries; each node has its own network namespace
and address on a switch, a writer keeps writing on a's NBD export all along, and each scenario
cuts links, holds the cut, heals it:

* a cut off from b (iptables DROP in a's namespace; c still reaches both). This is also the
  case "a secondary cut off from the primary but not from the other secondary": b must go on
  fetching a's log through c, as the original fetches from any node that has the log files;
* a cut off from both (a's switch port down): a goes on serving its writer alone;
* the a-b link flapping: cut and healed every few seconds, for MARS_FLAP_S seconds.

During each cut every node's findings (the control socket's, the same every face renders)
must tell the truth, as each node can know it: the unreachable peer named on the nodes that
cannot reach it, no node called down that some live node still reaches (the model tells "cut
off from someone" from "cut off from all"), and nothing else wrong. After each heal the
cluster converges: both secondaries replay the whole log, the three devices are equal (sha256),
and the links come back without a full sync (every node's sync counters unchanged: the tree's
``sync-read-bytes``, ``sync-copied-bytes``, and the primary's ``sync-served-bytes``).

Sizes: the short version (make test) holds each cut 2 s past the moment the findings are right
and flaps for 20 s; under MARS_TORTURE=1 each cut is held 60 s (past the 30 s alive window, so
the views of a node cut off from all show what the docs promise then too) and the link flaps
for 5 min. MARS_CUT_S, MARS_FLAP_S and MARS_SEED override them.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field

import pytest

from harness import Node, caught_up, cleanup, run, sha256, short_tempdir, start_cluster, wait_until

from campaign import report, seconds
from netns import Net, namespaces, network
from test_replication_faults import Writer as PacedWriter

from mars.engine.model.client import request_snapshot
from mars.engine.model.snapshot import ALIVE_WINDOW_S

MiB = 1 << 20
SIZE = 8 * MiB
RES = "r"
CUT_S = seconds(2, 60, "MARS_CUT_S")  # how long a cut is held once the findings are right
FLAP_S = seconds(20, 300, "MARS_FLAP_S")
FLAP_CUT_S = seconds(5, 15, "MARS_FLAP_CUT_S")  # the longest cut (and heal) of a flap; the shortest 1 s
SEED = int(os.environ.get("MARS_SEED") or random.SystemRandom().randrange(1 << 31))
TRUTH_S = 60  # how long the findings may take to show a cut (a pull's 10 s timeout, a round)
HOW = f"seed {SEED}; rerun: MARS_SEED={SEED} .venv/bin/python -m pytest -s tests/faults/test_fault_partition.py"

# One cluster for the whole module (its fixture is module-scoped): under pytest -n its tests stay on
# one worker, in order, or each worker would build a cluster of its own.
pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
              pytest.mark.xdist_group("partition")]


# -- the cluster -------------------------------------------------------------------------------------


@dataclass
class Cluster:
    net: Net
    a: Node
    b: Node
    c: Node
    figures: dict[str, str] = field(default_factory=dict)
    written: int = 0  # bytes the writers wrote on a

    @property
    def nodes(self) -> tuple[Node, Node, Node]:
        return self.a, self.b, self.c


def image(n: Node) -> str:
    p = n.base / f"{n.host}.img"
    run(["truncate", "-s", str(SIZE), str(p)])
    return str(p)


@pytest.fixture(scope="module")
def cluster():
    """The three nodes in their namespaces, synced; at the end every process stops, every
    namespace (and with it every veth, the bridge and every rule) goes, the figures are
    printed, and no marsd log may hold a traceback."""
    with network() as net:
        base = short_tempdir()
        nodes: list[Node] = []
        cl = None
        try:
            a, b, c = start_cluster(base, nodes, "abc", net=net)
            cl = Cluster(net, a, b, c)
            a.marsadm("create-resource", RES, image(a), str(SIZE))
            for n in (b, c):
                wait_until(lambda n=n: n.tree_value(f"resource-{RES}/size") is not None, 30, f"{n.host} to learn r")
                n.marsadm("join-resource", RES, image(n), "--create")
            for n in (b, c):
                wait_until(lambda n=n: caught_up(a, n, RES), 60, f"{n.host}'s initial sync")
            synced = sync_counters(cl)
            yield cl
            if cl.figures:
                resynced = sum(sync_counters(cl).values()) - sum(synced.values())
                report("partitions", seed=SEED, scenarios=len(cl.figures), written=f"{cl.written >> 20} MiB",
                       **cl.figures, bytes_re_synced=resynced)
        finally:
            net.heal()
            logs = {n.host: n.log() for n in nodes if n.proc is not None}
            cleanup(base, nodes)
    left = [ns for ns in namespaces() if ns.startswith(net.tag)]
    assert not left, f"namespaces left behind: {left}"
    for host, text in logs.items():
        assert "Traceback" not in text, f"marsd {host}:\n{text}"


# -- what the nodes say ------------------------------------------------------------------------------


def findings(n: Node) -> list[dict] | None:
    """The findings ``n``'s marsd published last (None: it did not answer in time)."""
    reply = request_snapshot(n.mars_dir, timeout=5)
    return reply["findings"] if reply else None


def todo(fs: list[dict]) -> dict[tuple[str, str | None], str]:
    """``{(code, node): text}`` of the findings that say something is wrong."""
    return {(f["code"], f["node"]): f["text"] for f in fs if f["level"] == "TODO"}


def views(cl: Cluster) -> dict[str, dict[tuple[str, str | None], str]] | None:
    out = {}
    for n in cl.nodes:
        fs = findings(n)
        if fs is None:
            return None
        out[n.host] = todo(fs)
    return out


def show(cl: Cluster) -> str:
    lines = []
    for n in cl.nodes:
        fs = findings(n) or []
        lines.append(f"--- findings in {n.host}'s view ---")
        lines += [f"  {f['level']} {f['code']} {f['res'] or '-'} {f['node'] or '-'}: {f['text']}" for f in fs]
    return "\n".join(lines)


def sync_counters(cl: Cluster) -> dict[str, int]:
    """Every byte any sync read, copied or served: a full re-copy would raise some of them."""
    out = {}
    for n in cl.nodes:
        for name in ("sync-read-bytes", "sync-copied-bytes", "sync-served-bytes"):
            v = n.tree_value(f"resource-{RES}/actual-{n.host}/{name}")
            out[f"{n.host}:{name}"] = int(v) if v is not None else 0
    return out


@contextlib.contextmanager
def diagnostics(cl: Cluster, what: str):
    try:
        yield
    except BaseException:
        print(f"=== {what} failed; {HOW}")
        print(show(cl))
        for n in cl.nodes:
            print(f"--- marsd log of {n.host} (tail) ---\n{n.log()[-3000:]}")
        raise


# -- the load ----------------------------------------------------------------------------------------


class Writer(PacedWriter):
    """64 KiB of fresh data at a random place of a's export every 50 ms (about 1.2 MiB/s), over
    NBD from the root namespace, until finished."""

    def __init__(self, node: Node, seed: int) -> None:
        super().__init__(node.uri(RES), SIZE, total=1 << 62, chunk=64 << 10, pace=0.05, seed=seed)

    def more(self, nbytes: int, what: str) -> None:
        """Wait until ``nbytes`` more are written: the primary goes on serving."""
        start = self.written
        wait_until(lambda: self.written >= start + nbytes or not self.is_alive(), 60, what)
        assert self.is_alive(), f"the writer stopped: {self.error!r}"

    def finish(self, timeout: float = 60) -> int:
        self.stop()
        return super().finish(timeout)


@contextlib.contextmanager
def writing(cl: Cluster, seed: int):
    w = Writer(cl.a, seed)
    w.start()
    try:
        yield w
    finally:
        w._halt.set()
        w.join(60)


def converge(cl: Cluster, w: Writer, before: dict[str, int]) -> float:
    """The links are back: a little more writing, then stop it and wait until every secondary
    replayed everything, all devices are equal, every node's findings are clean again, and no
    sync ran. Returns the seconds from the heal to all of it."""
    t_heal = time.monotonic()
    w.more(256 << 10, "writes after the heal")
    cl.written += w.finish()
    a, b, c = cl.nodes
    for n in (b, c):
        wait_until(lambda n=n: caught_up(a, n, RES), 120, f"{n.host} to replay all of a's log after the heal")
    imgs = {n.host: n.base / f"{n.host}.img" for n in cl.nodes}
    # a's own device is written back right after the log: equal within moments of the replays.
    try:
        wait_until(lambda: len({sha256(p) for p in imgs.values()}) == 1, 30, "the three devices to be equal")
    except AssertionError:
        raise AssertionError(f"devices differ after the heal: { {h: sha256(p)[:16] for h, p in imgs.items()} }") \
            from None
    wait_until(lambda: (v := views(cl)) is not None and not any(v.values()), 60,
               "every node's findings to be clean after the heal")
    took = time.monotonic() - t_heal
    wait_until(lambda: all(n.tree_value(f"resource-{RES}/actual-{n.host}/is-syncing") in (None, "0")
                           for n in (b, c)), 10, "no sync")
    after = sync_counters(cl)
    assert after == before, f"a sync ran across the partition: {before} -> {after}"
    return took


def hold(cl: Cluster, truth, seconds_: float) -> int:
    """Keep checking ``truth(views)`` (it asserts) for ``seconds_``; the number of checks."""
    end = time.monotonic() + seconds_
    checks = 0
    while True:
        v = views(cl)
        if v is not None:
            truth(v)
            checks += 1
        if time.monotonic() >= end:
            return checks
        time.sleep(0.3)  # poll


def wait_truth(cl: Cluster, truth, what: str) -> float:
    """Wait until ``truth`` holds on every view; the seconds it took."""
    t0 = time.monotonic()
    last = [""]

    def holds() -> bool:
        v = views(cl)
        if v is None:
            return False
        try:
            truth(v)
        except AssertionError as e:
            last[0] = str(e)
            return False
        return True

    try:
        wait_until(holds, TRUTH_S, what, interval=0.3)
    except AssertionError:
        raise AssertionError(f"timed out after {TRUTH_S} s waiting for {what}; last: {last[0]}") from None
    return time.monotonic() - t0


# -- the scenarios -----------------------------------------------------------------------------------


def test_the_primary_cut_off_from_one_secondary_which_fetches_through_the_other(cluster):
    cl = cluster
    a, b, c = cl.nodes
    before = sync_counters(cl)
    with diagnostics(cl, "a-b cut"), writing(cl, SEED) as w:
        w.more(256 << 10, "the first writes")
        cl.net.cut("a", "b")
        t_cut = time.monotonic()

        def truth(v):
            # In every view: a and b each say they cannot reach the other; nobody is down (c
            # reaches both and relays their reports); nothing else is wrong. b fetches through
            # c, so it has no fetch error either.
            for host, fs in v.items():
                assert set(fs) == {("PEER_UNREACHABLE", "a"), ("PEER_UNREACHABLE", "b")}, (host, fs)
                assert fs[("PEER_UNREACHABLE", "a")].startswith("a cannot reach b:"), (host, fs)
                assert fs[("PEER_UNREACHABLE", "b")].startswith("b cannot reach a:"), (host, fs)
            assert b.tree_value(f"resource-{RES}/actual-b/fetch-source") == "c"

        try:
            shown = wait_truth(cl, truth, "every view to show the a-b cut, and b to fetch from c")
            # b keeps up through c: it replays what a wrote after the truth was shown.
            w.more(512 << 10, "writes on a during the cut")
            end = log_end_now(a)
            wait_until(lambda: replayed_past(b, end), 60, f"b to replay past a's log end at {end} through c")
            checks = hold(cl, truth, CUT_S)
        finally:
            cl.net.heal()
        cut_s = time.monotonic() - t_cut
        took = converge(cl, w, before)
    cl.figures["a-b cut"] = f"{cut_s:.0f} s (shown after {shown:.1f} s, {checks} checks), converged in {took:.1f} s"


def test_the_primary_cut_off_from_both(cluster):
    cl = cluster
    a, b, c = cl.nodes
    before = sync_counters(cl)
    with diagnostics(cl, "a cut off from all"), writing(cl, SEED + 1) as w:
        w.more(256 << 10, "the first writes")
        cl.net.link("a", up=False)
        t_cut = time.monotonic()

        def truth(v):
            # a's view: it cannot reach b nor c. It cannot know more: once their last reports
            # are older than the alive window, it calls them down, saying that it cannot reach
            # them (the docs' promise for a node cut off).
            fa = v["a"]
            for peer in ("b", "c"):
                down = fa.get(("NODE_DOWN", peer))
                if down is None:
                    assert f"{peer}: " in fa.get(("PEER_UNREACHABLE", "a"), ""), (peer, fa)
                else:
                    assert time.monotonic() - t_cut > ALIVE_WINDOW_S / 2 and "a cannot reach it" in down, (peer, fa)
            assert set(fa) <= {("PEER_UNREACHABLE", "a"), ("NODE_DOWN", "b"), ("NODE_DOWN", "c")}, fa
            # b's and c's views: a is down, because every live node cannot reach it, and the
            # text says so; nothing else (b and c reach each other and fetch without an error).
            for host in ("b", "c"):
                fs = v[host]
                assert set(fs) == {("NODE_DOWN", "a")}, (host, fs)
                assert "b cannot reach it" in fs[("NODE_DOWN", "a")] and "c cannot reach it" in fs[("NODE_DOWN", "a")], \
                    (host, fs)

        try:
            shown = wait_truth(cl, truth, "the views of a cut off from all")
            w.more(256 << 10, "a to serve its writer alone")
            checks = hold(cl, truth, CUT_S)
            for n in cl.nodes:
                assert n.tree_value(f"resource-{RES}/primary") == "a", f"{n.host} changed the primary"
        finally:
            cl.net.heal()
        cut_s = time.monotonic() - t_cut
        took = converge(cl, w, before)
    cl.figures["a cut off"] = f"{cut_s:.0f} s (shown after {shown:.1f} s, {checks} checks), converged in {took:.1f} s"


def test_a_flapping_link(cluster):
    cl = cluster
    rnd = random.Random(SEED + 2)
    before = sync_counters(cl)
    seen: dict[tuple[str, str, str | None], int] = {}
    with diagnostics(cl, "flapping a-b link"), writing(cl, SEED + 3) as w:
        w.more(256 << 10, "the first writes")
        end = time.monotonic() + FLAP_S
        cuts = 0
        cut_total = 0.0
        try:
            while time.monotonic() < end:
                cl.net.cut("a", "b")
                cuts += 1
                t0 = time.monotonic()
                sample(cl, seen, t0 + rnd.uniform(1, FLAP_CUT_S))
                cl.net.heal()
                cut_total += time.monotonic() - t0
                sample(cl, seen, time.monotonic() + rnd.uniform(1, FLAP_CUT_S))
        finally:
            cl.net.heal()
        assert cl.net.rules_in_force("a") == [], "the heal left rules behind"
        took = converge(cl, w, before)
    # Whatever a view showed at some moment was true then: only a and b lose each other.
    wrong = {k: n for k, n in seen.items() if k[1:] not in {("PEER_UNREACHABLE", "a"), ("PEER_UNREACHABLE", "b"),
                                                            ("FETCH_FAILING", "b")}}
    assert not wrong, f"findings that were never true while only a-b flapped (view, code, node: samples): {wrong}"
    codes: dict[str, int] = {}
    for (_, code, _), n in seen.items():
        codes[code] = codes.get(code, 0) + n
    cl.figures["flapping a-b"] = (f"{cuts} cuts of 1-{FLAP_CUT_S:.0f} s in {FLAP_S:.0f} s ({cut_total:.0f} s cut), "
                                  f"converged in {took:.1f} s, findings seen (all true) "
                                  + (", ".join(f"{c} x{n}" for c, n in sorted(codes.items())) or "none"))



def sample(cl: Cluster, seen: dict, until: float) -> None:
    """Count every TODO finding of every view until ``until``."""
    while time.monotonic() < until:
        v = views(cl)
        for host, fs in (v or {}).items():
            for code, node in fs:
                seen[(host, code, node)] = seen.get((host, code, node), 0) + 1
        time.sleep(0.3)  # poll


# -- positions ---------------------------------------------------------------------------------------


def log_end_now(primary: Node) -> tuple[int, int]:
    """(file number, size) where a's newest log file ends now."""
    d = primary.mars_dir / f"resource-{RES}"
    newest = max(d.glob(f"log-*-{primary.host}"))
    return int(newest.name.split("-")[1]), newest.stat().st_size


def replayed_past(n: Node, pos: tuple[int, int]) -> bool:
    v = n.tree_value(f"resource-{RES}/replay-{n.host}")
    if v is None:
        return False
    name, off, _ = v.split(",")
    return (int(name.split("-")[1]), int(off)) >= pos
