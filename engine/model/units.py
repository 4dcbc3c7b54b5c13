"""Figures for people: bytes, seconds and percentages as every face prints them, and sizes as
operators type them.

Why one module: ``marsadm``, mars-status, the findings' texts and the exporters' help texts must
print the same figure the same way (``1.5 GiB``, ``2 min 56 s``, ``99.9 %`` while bytes are
left), and read ``4G`` the same way in every command line. Pure functions, no I/O.
"""

from __future__ import annotations

import math

from ..errors import UsageError

__all__ = ["figure", "human_bytes", "human_seconds", "parse_size", "percent_shown", "value_text"]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def figure(v: object) -> float | None:
    """A finite number, or None: bools, None, NaN, infinities and other types are not figures.

    A rate read from the tree may be any float (``nan`` included); a figure that cannot be
    shown as a number is shown as ``unknown``, never as ``nan B``.
    """
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def human_bytes(n: float | None) -> str:
    """Binary units, one decimal above 1 KiB: ``512 B``, ``1.5 GiB``; ``unknown`` for no figure."""
    v = figure(n)
    if v is None:
        return "unknown"
    if v < 0:
        return "-" + human_bytes(-v)
    if v < 1024:
        return f"{v:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        v /= 1024
        if round(v, 1) < 1024:
            return f"{v:.1f} {unit}"
    return f"{v:.1f} PiB"


def human_seconds(s: float | None) -> str:
    """``36 s``, ``5 min 3 s``, ``2 h 5 min``, ``3 d 4 h``; ``unknown`` for no figure."""
    v = figure(s)
    if v is None:
        return "unknown"
    if v < 0:
        return "-" + human_seconds(-v)
    t = round(v)
    if t < 60:
        return f"{t} s"
    if t < 3600:
        m, sec = divmod(t, 60)
        return f"{m} min {sec} s" if sec else f"{m} min"
    if t < 86400:
        h, rest = divmod(t, 3600)
        m = rest // 60
        return f"{h} h {m} min" if m else f"{h} h"
    d, rest = divmod(t, 86400)
    h = rest // 3600
    return f"{d} d {h} h" if h else f"{d} d"


def percent_shown(pos: float, size: float, decimals: int = 1) -> str:
    """``pos`` of ``size`` as a percentage with ``decimals`` digits, never 100 while bytes are left.

    An operator reads "100.0 %" as done; a sync of 8 TiB with 2 GiB left is 99.98 %, which
    rounds to 100.0. So a figure that is not done shows at most the largest value below 100
    at this precision (99.9, 99.99). Nothing done shows 0, a size of 0 is complete.
    """
    pct = 100.0 if size <= 0 else min(100.0, max(0.0, 100.0 * pos / size))
    top = 100.0 - 10.0 ** -decimals
    if pos < size and pct > top:
        pct = top
    return f"{pct:.{decimals}f}"


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``4k``/``4K``/``4KiB``, ``1G``/``1GiB``, ``2T`` (binary multiples)."""
    t = text.strip()
    low = t.lower().removesuffix("ib").removesuffix("b")
    num, unit = low, ""
    if low and low[-1] in "kmgtp":
        num, unit = low[:-1], low[-1]
    try:
        value = int(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise UsageError(f"size {text!r} is not a size",
                         "give bytes or a number with K, M, G, T (binary multiples)") from None
    if value <= 0:
        raise UsageError(f"size {text!r} must be positive", "give a size above 0")
    return value


def value_text(v: object) -> str:
    """One macro value as `marsadm view-<macro>` prints it (and so every face that offers the same
    values to scripts): booleans 0/1, whole floats without a point, others with two decimals."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.2f}"
    return str(v)
