"""The monitor's verdict: one exit code, its word, a summary line and the figures behind it.

Why here, beside :func:`~mars.engine.model.findings`: ``mars-status --check`` and ``check_mars``
(and any later monitor face) must give the same exit code for the same cluster. Which findings
make a state CRITICAL is a rule, and rules live in the model, once; the faces only render the
:class:`Verdict` (``status/render.py`` as today's one line, ``exporters/nagios.py`` through
nagiosplugin, with its thresholds on top).

The mapping is the original's monitor function with Nagios semantics (seed §4.2):

* a TODO makes it CRITICAL (2): something is wrong and needs an operator;
* a HINT only WARNING (1): an operator may want to act;
* WORK is OK (0): the system finishes it by itself, so it is named but never alarms;
* a state that cannot be read at all is UNKNOWN (3), with the reason and its remedy.

Pure, like the findings: no I/O, no clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from .findings import LEVELS, Finding
from .snapshot import Snapshot

__all__ = ["CHECK_CRITICAL", "CHECK_LISTED", "CHECK_OK", "CHECK_STATES", "CHECK_UNITS", "CHECK_UNKNOWN",
           "CHECK_WARNING", "PerfFigure", "Verdict", "number_text", "relevant", "verdict"]

CHECK_OK, CHECK_WARNING, CHECK_CRITICAL, CHECK_UNKNOWN = 0, 1, 2, 3
CHECK_STATES = ("OK", "WARNING", "CRITICAL", "UNKNOWN")  # by exit code
CHECK_LISTED = 3  # findings named in the summary; the rest are counted ("and 4 more")
# The units of measure the monitoring-plugins guidelines allow in perfdata ("" is a count).
CHECK_UNITS = frozenset({"", "s", "ms", "us", "%", "B", "KB", "MB", "GB", "TB", "c"})

_CODE_OF_LEVEL = {"TODO": CHECK_CRITICAL, "HINT": CHECK_WARNING, "WORK": CHECK_OK}


def number_text(v: float) -> str:
    """A figure as perfdata and threshold ranges need it: plain decimals, never ``1e-06``.

    Python's ``str`` switches to scientific notation for small and large floats, which the
    monitoring-plugins guidelines forbid (graphing add-ons misread it); an integral value is
    written without ``.0``, as the counts always were.
    """
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{v!r} is not a finite number")
    if isinstance(v, int):
        return str(v)
    if v.is_integer():
        return str(int(v))
    return format(Decimal(repr(v)), "f")


@dataclass(frozen=True, slots=True)
class PerfFigure:
    """One figure of the perfdata: a name, its value (None: unknown, written ``U``), its unit
    (one of :data:`CHECK_UNITS`) and the bounds it can take.

    Invalid ones cannot exist: a name a perfdata parser cannot read back (``'`` or ``=`` in it),
    a unit the guidelines do not know, or a value that is not a finite number is refused here,
    not discovered by the monitoring server's graphs.
    """

    name: str
    value: float | None
    unit: str = ""
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if not self.name or "'" in self.name or "=" in self.name:
            raise ValueError(f"figure name {self.name!r} is empty or holds ' or =")
        if self.unit not in CHECK_UNITS:
            raise ValueError(f"figure unit {self.unit!r} is not one of {', '.join(sorted(CHECK_UNITS - {''}))} "
                             f"(or none)")
        for v in (self.value, self.min, self.max):
            if v is not None:
                number_text(v)

    @property
    def value_text(self) -> str:
        """The value with its unit as perfdata writes it: ``3.2s``, ``1024B``, ``3``; ``U`` unknown."""
        return "U" if self.value is None else number_text(self.value) + self.unit


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a monitor reports: the exit code, a summary for the status line, and the figures.

    ``summary`` never holds ``|`` (it starts Nagios's perfdata); ``figures`` are the cluster's
    counts (resources, nodes, live nodes, and the findings of each level), empty for UNKNOWN.
    """

    code: int
    summary: str
    figures: tuple[PerfFigure, ...] = ()

    def __post_init__(self) -> None:
        if self.code not in range(len(CHECK_STATES)):
            raise ValueError(f"verdict code {self.code} is not one of 0..{len(CHECK_STATES) - 1}")
        if "|" in self.summary:
            raise ValueError("a verdict's summary must not hold '|' (it starts the perfdata)")

    @property
    def state(self) -> str:
        """``OK``, ``WARNING``, ``CRITICAL`` or ``UNKNOWN``: the word of the exit code."""
        return CHECK_STATES[self.code]


def relevant(fs: Iterable[Finding], resource: str | None) -> list[Finding]:
    """With a resource: that resource's findings and the cluster- and node-level ones, since a
    dead node or a full MARS directory harms every resource on it."""
    if resource is None:
        return list(fs)
    return [f for f in fs if f.res is None or f.res == resource]


def _named(level: str, fs: list[Finding]) -> str:
    """``2 todo: NODE_DOWN @c: <text>; SPLIT_BRAIN r: <text>``, the first few named."""
    picked = [f for f in fs if f.level == level]
    text = "; ".join(f"{f.code} {f.where}: {f.text}" for f in picked[:CHECK_LISTED])
    more = len(picked) - CHECK_LISTED
    return f"{len(picked)} {level.lower()}: {text}" + (f" (and {more} more)" if more > 0 else "")


def _clean(text: str) -> str:
    return text.replace("|", "/")  # "|" starts Nagios perfdata


def verdict(snap: Snapshot | None, fs: Iterable[Finding], error: str | None = None) -> Verdict:
    """The verdict on ``snap`` judged by ``fs`` (its findings, limited to what is asked about:
    :func:`relevant`); UNKNOWN with ``error`` as the reason when the state could not be read."""
    if snap is None or error is not None:
        return Verdict(CHECK_UNKNOWN, _clean(error or "no status snapshot"))
    fs = list(fs)
    count = {lv: sum(1 for f in fs if f.level == lv) for lv in LEVELS}
    alive = sum(1 for ns in snap.nodes.values() if ns.alive)
    figures = (PerfFigure("resources", len(snap.resources), min=0),
               PerfFigure("nodes", len(snap.nodes), min=0),
               PerfFigure("nodes_alive", alive, min=0, max=len(snap.nodes)),
               *(PerfFigure(lv.lower(), count[lv], min=0) for lv in ("TODO", "HINT", "WORK")))
    worst_level = next((lv for lv in ("TODO", "HINT") if count[lv]), None)
    if worst_level is not None:
        return Verdict(_CODE_OF_LEVEL[worst_level], _clean(_named(worst_level, fs)), figures)
    n = len(snap.resources)
    text = f"{n} resource{'s' if n != 1 else ''}, {alive} of {len(snap.nodes)} nodes alive"
    if count["WORK"]:
        text += ", " + _named("WORK", fs)
    return Verdict(CHECK_OK, _clean(text), figures)
