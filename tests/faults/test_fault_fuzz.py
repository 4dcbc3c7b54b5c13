"""Fuzzing every decoder that takes bytes from outside: each input is parsed or refused with the
decoder's own protocol error, never another exception, never a loop, never memory a length field asks for.

Two drivers, one mutator (fuzzlib.py) over a corpus of valid inputs per decoder (fuzz_decoders.py):

* hypothesis, in `make test`: few examples, but a failure is shrunk to its smallest input;
* a seeded loop of the same mutations for the campaign's million inputs per decoder: hypothesis
  costs about a millisecond per example of its own bookkeeping, more than most decoders, so a
  million per decoder would take hours; the loop runs at the decoders' own speed and a failure
  names the seed and the mutations, which `fuzzlib.mutate` replays.

Every bug the campaign found is pinned below as a plain regression test.

Short: ``pytest tests/faults/test_fault_fuzz.py``. Full: ``MARS_TORTURE=1 pytest -s tests/faults/test_fault_fuzz.py``
(``MARS_FUZZ_EXAMPLES`` sets the inputs per decoder, ``MARS_FUZZ_SEED`` the seed).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import resource
import struct
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor, as_completed

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_decoders as D
from campaign import report, size
from fuzzlib import chunks_strategy, mutate, ops_strategy, random_chunks, random_ops

from mars.engine.entry import Entry
from mars.engine.log import format as F
from mars.engine.log.values import LogPos, ReplayLink
from mars.engine.nbd import protocol as N
from mars.engine.peer import protocol as P
from mars.engine.tree import LamportClock, Tree

INPUTS = size(600, 1_000_000, "MARS_FUZZ_EXAMPLES")
HYPOTHESIS_EXAMPLES = size(25, 2000, "MARS_FUZZ_HYPOTHESIS")
SEED = int(os.environ.get("MARS_FUZZ_SEED", random.randrange(2**32)))
#: One input may take this long (a 32 MiB payload allocated and checked); longer is a hang.
SLOW_S = 5.0


def _make(name):
    """(runner, corpus, closer) of one decoder; some own a tmpfs directory."""
    if name == "nbd":
        return D.run_nbd, D.nbd_corpus(), None
    if name == "peer-stream":
        return D.run_peer, D.peer_corpus(), None
    if name == "peer-decode":
        return (D.run_peer_decode, [P.encode(m) for m in [D.PEER_HELLO, *D.peer_messages()]]
                + [c[len(P.encode(D.PEER_HELLO)):] for c in D.peer_corpus(random.Random(3), 200)], None)
    if name == "log-reader":
        return D.run_log, D.log_corpus(), None
    if name == "log-scan-file":
        scan = D.ScanFile()
        return scan, D.log_corpus(), scan.close
    if name == "tree-entries":
        entries = D.TreeEntries()
        return entries, D.entries_corpus(), entries.close
    if name == "tree-values":
        return D.run_values, D.values_corpus(), None
    if name == "control":
        control = D.Control()
        return control, D.control_corpus(), control.close
    raise KeyError(name)


NAMES = ["nbd", "peer-stream", "peer-decode", "log-reader", "log-scan-file", "tree-entries", "tree-values", "control"]
#: Decoders fuzzed side by side (processes): the full campaign's million inputs each take minutes.
JOBS = size(1, 2, "MARS_FUZZ_JOBS")


@pytest.fixture
def decoders():
    made = {name: _make(name) for name in NAMES}
    try:
        yield made
    finally:
        for _, _, close in made.values():
            if close is not None:
                close()


@pytest.mark.parametrize("name", NAMES)
def test_corpus_is_valid(decoders, name):
    """A mutation of a valid input only reaches deep if the input was valid: most must parse."""
    run, corpus, _ = decoders[name]
    results = [run(c, [1 << 20]) for c in corpus]
    assert results[0] == "parsed", f"{name}: the first corpus input is refused"


@pytest.mark.parametrize("name", NAMES)
def test_hypothesis(decoders, name):
    run, corpus, _ = decoders[name]

    @settings(max_examples=HYPOTHESIS_EXAMPLES, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.integers(0, len(corpus) - 1), ops_strategy, chunks_strategy, st.booleans())
    def check(base, ops, sizes, fix):
        assert run(mutate(corpus[base], ops, corpus), sizes, fix) in ("parsed", "rejected")

    check()


def fuzz_loop(name, inputs, seed):
    """``inputs`` seeded mutations of ``name``'s corpus through it; figures and the bugs found (at most 5)."""
    run, corpus, close = _make(name)
    try:
        return _loop(name, run, corpus, inputs, seed)
    finally:
        if close is not None:
            close()


def _loop(name, run, corpus, inputs, seed):
    rng = random.Random(f"{seed}-{name}")
    counts = {"parsed": 0, "rejected": 0}
    bugs = []
    slowest = 0.0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    for i in range(inputs):
        base = rng.randrange(len(corpus))
        ops = random_ops(rng, corpus)
        sizes = random_chunks(rng)
        fix = rng.random() < 0.3
        t = time.perf_counter()
        try:
            counts[run(mutate(corpus[base], ops, corpus), sizes, fix)] += 1
        except Exception as e:  # noqa: BLE001 - every other exception is what the campaign looks for
            bugs.append(f"{name} input {i} (base {base}, ops {ops!r}, sizes {sizes}, fix {fix}): {e!r}"[:1500])
            if len(bugs) >= 5:
                break
        slowest = max(slowest, time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    return counts, bugs, elapsed, slowest, grew_mib


def test_fuzz_campaign():
    """The campaign's figures: inputs per decoder, parsed and refused, crashes (must be 0), speed."""
    total = {"parsed": 0, "rejected": 0}
    bugs: list[str] = []
    lines = []
    start = time.perf_counter()
    n = 0
    slowest = 0.0
    grew = 0.0
    def done(name, result):
        nonlocal n, slowest, grew
        counts, found, elapsed, slow, grew_mib = result
        n += sum(counts.values())
        for k in total:
            total[k] += counts[k]
        bugs.extend(found)
        slowest, grew = max(slowest, slow), max(grew, grew_mib)
        lines.append(f"{name}: {sum(counts.values())} inputs, {counts['rejected']} refused, {counts['parsed']} parsed, "
                     f"{len(found)} crashes, {sum(counts.values()) / elapsed:.0f} inputs/s, {elapsed:.0f} s")
        print(f"\nfuzz {lines[-1]}", flush=True)  # as each decoder ends: a long run shows its progress

    # Cheapest first, so a long run interrupted still has the figures of most decoders.
    order = ["peer-decode", "tree-values", "control", "nbd", "log-reader", "peer-stream", "tree-entries",
             "log-scan-file"]
    if JOBS > 1:
        with ProcessPoolExecutor(JOBS, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(fuzz_loop, name, INPUTS, SEED): name for name in order}
            for f in as_completed(futures):
                done(futures[f], f.result())
    else:
        for name in order:
            done(name, fuzz_loop(name, INPUTS, SEED))
    elapsed = time.perf_counter() - start
    report("fuzz (in process)", decoders=len(NAMES), jobs=JOBS, inputs_per_decoder=INPUTS, inputs=n,
           rejected=total["rejected"], parsed=total["parsed"], crashes=len(bugs),
           inputs_per_s=f"{n / elapsed:.0f}", slowest_input_s=f"{slowest:.3f}", max_rss_growth_mib=f"{grew:.0f}",
           time_s=f"{elapsed:.1f}", seed=SEED)
    assert not bugs, (f"seed {SEED} (rerun: MARS_FUZZ_SEED={SEED} MARS_FUZZ_EXAMPLES={INPUTS} pytest -s "
                      f"tests/faults/test_fault_fuzz.py -k campaign):\n" + "\n".join(bugs))
    assert slowest < SLOW_S, f"one input took {slowest:.1f} s (seed {SEED})"
    assert grew < 512, f"memory grew by {grew:.0f} MiB (seed {SEED})"


# --- lengths from outside must not size an allocation --------------------------------------------------

def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


HUGE = (2**31, 2**32 - 1)


@pytest.mark.parametrize("length", HUGE)
def test_huge_nbd_lengths_allocate_nothing(length):
    flags = struct.pack(">I", 3)
    go = D._go("r")
    for raw in (flags + struct.pack(">QII", N.IHAVEOPT, N.OPT_GO, length),       # option data
                flags + go + D._req(1, 0, length),                                # WRITE payload
                flags + go + D._req(0, 0, length)):                               # READ length (a BadRequest)
        result = []
        assert _peak(lambda raw=raw: result.append(D.run_nbd(raw, [7]))) < 1 << 20
        assert result == ["rejected"] or raw.endswith(D._req(0, 0, length))


@pytest.mark.parametrize("length", HUGE)
def test_huge_peer_lengths_allocate_nothing(length):
    hello = P.encode(D.PEER_HELLO)
    for raw in (struct.pack(">IBI", length, 3, 2) + b"{}",                       # body_len
                hello + struct.pack(">IBI", 1 << 20, 5, length) + b"{",          # meta_len
                hello + struct.pack(">IBI", P.MAX_FRAME, 5, 100) + b"{" + b"x" * 99):  # a big frame never comes
        result = []
        assert _peak(lambda raw=raw: result.append(D.run_peer(raw, [3]))) < 1 << 20
        assert result[0] in ("rejected", "parsed")


@pytest.mark.parametrize("length", HUGE)
def test_huge_log_lengths_allocate_nothing_even_with_a_valid_header_check(length):
    """The header check is recomputed (fix): the reader must still refuse the length by its own bound."""
    rec = bytearray(F.encode_record_bytes(F.LogRecord(D.FIRST, 1, 0, 16, F.Kind.WRITE, 0, b"x" * 16)))
    struct.pack_into("<I", rec, 12, length)
    struct.pack_into("<I", rec, 40, length)
    struct.pack_into("<Q", rec, 56, xxhash.xxh3_64_intdigest(bytes(rec[:56])))
    result = []
    assert _peak(lambda: result.append(D.run_log(bytes(rec), [64]))) < 1 << 20
    assert result == ["rejected"]


# --- regressions: the bugs this campaign found -----------------------------------------------------------

@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "resource-r").mkdir(parents=True)
    (root / "resource-r" / "log-000000001-a").write_bytes(b"")
    (root / "nbd.sock").write_bytes(b"")
    return Tree(root, "a", LamportClock())


@pytest.mark.parametrize("path,value", [
    ("nbd.sock/x", "v"),                        # through a socket: ENOTDIR
    ("resource-r/log-000000001-a/x", "v"),      # through a log file: ENOTDIR
    ("resource-r/" + "x" * 255, "v"),           # a name the protocol allows (255) but _write's temporary cannot
    ("resource-r/size", "v" * 4096),            # a value the protocol allows (4096) but a symlink cannot hold
    ("resource-r/size", "é" * 2048),
], ids=["through-socket", "through-log-file", "long-name", "long-value", "long-utf8-value"])
def test_tree_refuses_a_peer_entry_the_file_system_cannot_hold(tree, path, value):
    """Found by the campaign: Tree.apply raised OSError, which exchange.take reported as a full disk
    and which failed every entry of the peer's batch, at every exchange."""
    msg = P.decode(P.encode(P.TreeEntries(req=0, entries=(Entry(path, value, 5),))))  # the protocol takes it
    assert tree.apply(msg.entries[0], "b") is False
    assert tree.apply(Entry("resource-r/size", "1024", 6), "b") is True  # the next entry still lands
    assert tree.get("resource-r/size") == "1024"


@pytest.mark.parametrize("value", ["log-000000001-a,²096", "log-000000001-a,4096,①", "log-000000729@" + "9" * 5000,
                                   "log-000000001-a," + "9" * 5000 + ",0", "log-١٢٣٤٥٦٧٨٩-a,0"],
                         ids=["superscript", "circled", "5000-digits", "5000-digits-link", "arabic-indic"])
def test_value_parsers_never_raise(value):
    """Found by the campaign: str.isdigit() accepts '²' and '①', which int() refuses, and int()
    refuses more than 4300 digits; a peer's value made parse() raise instead of reading as unknown."""
    D.parse_value(value)
    assert LogPos.parse(value) is None and ReplayLink.parse(value) is None


@pytest.mark.parametrize("line", [b"[" * 60000 + b"\n", b'{"a":' * 10000 + b"\n"], ids=["lists", "objects"])
def test_control_request_nested_too_deep_is_a_usage_error(line):
    """Found by the campaign: json.loads raised RecursionError, which _serve logged with a traceback."""
    control = D.Control()
    try:
        assert control(line, [len(line)]) == "rejected"
    finally:
        control.close()
