"""Structure-aware mutation of valid inputs, shared by hypothesis and the seeded loop of the fuzz campaign.

Why one mutator for both: hypothesis finds and shrinks a failing input in `make test`, but costs
about a millisecond per example, too slow for a million inputs per decoder; the full campaign runs
the same mutations drawn from ``random.Random(seed)`` instead, so what the long run covers is what
the short run can shrink. A mutation is a plain tuple (kept in a failure's message), so any input
the loop finds can be replayed with :func:`mutate` and pinned as an ``@example``.
"""

from __future__ import annotations

import random
import struct

from hypothesis import strategies as st

#: Integers that break length fields: 0, signs, widths, and the ones that would allocate GiBs.
INTERESTING = (0, 1, 2, 7, 8, 9, 16, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000, 2**63 - 1, 2**63, 2**64 - 1,
               32 * 2**20, 32 * 2**20 + 1, 64 * 2**20 + 64 * 2**10 + 1, 4096, 4097)
WIDTHS = (1, 2, 4, 8)
OPS = ("flip", "byte", "trunc", "delete", "dup", "insert", "splice", "int", "random")


def _fit(value: int, width: int) -> int:
    return value & ((1 << (8 * width)) - 1)


def apply_op(data: bytearray, op: tuple, corpus: list[bytes]) -> bytearray:
    """One mutation of ``data`` (positions are taken modulo its length, so any tuple applies)."""
    kind = op[0]
    n = len(data)
    if kind == "random":
        return bytearray(op[1])
    if kind == "insert":
        pos = op[1] % (n + 1)
        data[pos:pos] = op[2]
        return data
    if kind == "splice":
        other = corpus[op[2] % len(corpus)]
        pos = op[1] % (n + 1)
        start = op[3] % (len(other) + 1)
        data[pos:pos] = other[start:start + op[4]]
        return data
    if not n:
        return data
    pos = op[1] % n
    if kind == "flip":
        data[pos] ^= 1 << (op[2] & 7)
    elif kind == "byte":
        data[pos] = op[2] & 0xFF
    elif kind == "trunc":
        del data[pos:]
    elif kind == "delete":
        del data[pos:pos + op[2]]
    elif kind == "dup":
        data[pos:pos] = data[pos:pos + op[2]]
    elif kind == "int":
        _, _, width, little, value = op
        raw = _fit(value, width).to_bytes(width, "little" if little else "big")
        data[pos:pos + width] = raw
    else:
        raise ValueError(f"unknown mutation {op!r}")
    return data


def mutate(base: bytes, ops: list[tuple], corpus: list[bytes]) -> bytes:
    data = bytearray(base)
    for op in ops:
        data = apply_op(data, op, corpus)
    return bytes(data)


def random_op(rng: random.Random, corpus: list[bytes]) -> tuple:
    kind = rng.choice(OPS)
    pos = rng.getrandbits(20)
    if kind == "flip":
        return ("flip", pos, rng.randrange(8))
    if kind == "byte":
        return ("byte", pos, rng.randrange(256))
    if kind == "trunc":
        return ("trunc", pos)
    if kind in ("delete", "dup"):
        return (kind, pos, rng.choice((1, 2, 4, 8, rng.randrange(1, 300))))
    if kind == "insert":
        return ("insert", pos, rng.randbytes(rng.choice((1, 4, 8, rng.randrange(0, 64)))))
    if kind == "splice":
        return ("splice", pos, rng.randrange(len(corpus)), rng.getrandbits(16), rng.randrange(1, 200))
    if kind == "int":
        value = rng.choice(INTERESTING) if rng.random() < 0.8 else rng.getrandbits(64)
        return ("int", pos, rng.choice(WIDTHS), rng.random() < 0.5, value)
    return ("random", rng.randbytes(rng.randrange(0, 200)))


def random_ops(rng: random.Random, corpus: list[bytes]) -> list[tuple]:
    """Mostly one or two mutations: a valid input with one thing wrong reaches deepest."""
    k = rng.choice((0, 1, 1, 1, 2, 2, 3, 5))
    return [random_op(rng, corpus) for _ in range(k)]


def random_chunks(rng: random.Random) -> list[int]:
    """Read sizes to split an input at: byte by byte, small, or large reads."""
    pick = rng.random()
    if pick < 0.15:
        return [1]
    if pick < 0.5:
        return [rng.randrange(1, 64) for _ in range(rng.randrange(1, 6))]
    return [rng.randrange(1, 70000)]


MAX_PIECES = 300


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of ``sizes`` (cycled), as reads would deliver it."""
    out = []
    i = 0
    k = 0
    while i < len(data):
        if k == MAX_PIECES:  # byte by byte through the headers, then the rest at once: cheap enough for 1M
            out.append(data[i:])
            break
        step = max(1, sizes[k % len(sizes)]) if sizes else len(data)
        out.append(data[i:i + step])
        i += step
        k += 1
    return out


# --- the same mutations as hypothesis strategies -----------------------------------------------

_pos = st.integers(0, 2**20)
op_strategy = st.one_of(
    st.tuples(st.just("flip"), _pos, st.integers(0, 7)),
    st.tuples(st.just("byte"), _pos, st.integers(0, 255)),
    st.tuples(st.just("trunc"), _pos),
    st.tuples(st.sampled_from(("delete", "dup")), _pos, st.integers(1, 300)),
    st.tuples(st.just("insert"), _pos, st.binary(max_size=64)),
    st.tuples(st.just("splice"), _pos, st.integers(0, 1000), st.integers(0, 2**16), st.integers(1, 200)),
    st.tuples(st.just("int"), _pos, st.sampled_from(WIDTHS), st.booleans(),
              st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))),
    st.tuples(st.just("random"), st.binary(max_size=200)),
)
ops_strategy = st.lists(op_strategy, max_size=4)
chunks_strategy = st.one_of(st.just([1]), st.lists(st.integers(1, 64), min_size=1, max_size=5),
                            st.lists(st.integers(1, 70000), min_size=1, max_size=1))

U32 = struct.Struct(">I")
